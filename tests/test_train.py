"""Training loop (inference/train.py) and evaluation metrics (inference/evaluate.py) on a tiny
synthetic data set written in the hipatlas-dataset/1 format."""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import types

import numpy as np
import pytest

from inference import evaluate as E
from inference import model as M
from inference.checksums import sha256_file
from inference import train as T
from inference.data.dataset import DATASET_FORMAT, write_npz
from inference.errors import Cancelled, ConfigError
from test_model import TINY, _ellipsoid, _index_to_world, _sample

SHIFTS = {"train": [(2.0, 0.0, 1.0), (-1.0, 1.0, 0.0), (1.0, -1.0, -1.0)],
          "val": [(0.0, 1.0, 2.0), (-2.0, 0.0, 0.0)]}


def _head_world(shift_zyx):
    """World position of the blob centre moved by ``shift_zyx`` voxels (the 'head centre')."""
    centre = (np.array(TINY.shape_zyx, float) - 1) / 2 + np.array(shift_zyx)
    return (_index_to_world(TINY).astype(float) @ np.append(centre[::-1], 1.0))[:3]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("tiny_dataset"))


def make_tiny_dataset(folder: pathlib.Path) -> pathlib.Path:
    """A hipatlas-dataset/1 folder of TINY blobs moved by SHIFTS (3 train, 2 val samples)."""
    samples = []
    index = 0
    for split, shifts in SHIFTS.items():
        for number, shift in enumerate(shifts):
            inputs, _, _ = _sample(TINY, shift)
            hu, labels = _ellipsoid(TINY, shift)
            arrays = {
                "volume": hu, "labels": labels,
                "images": inputs["images"][0], "masks": inputs["masks"][0].astype(np.uint8),
                "projection": inputs["projection"][0].astype(np.float64),
                "index_to_world": inputs["index_to_world"][0].astype(np.float64),
                "landmarks_mm": _head_world(shift)[None].astype(np.float32),
                "view_angles_deg": np.array([0.0, 90.0]),
            }
            subject = f"{split}{number % 2}"
            relative = f"{split}/s{subject}_{index:05d}.npz"
            write_npz(folder / relative, arrays)
            samples.append({"index": index, "file": relative, "split": split, "subject": subject,
                            "sha256": sha256_file(folder / relative)})
            index += 1
    manifest = {"format": DATASET_FORMAT, "grid": {"name": "tiny", "shape_zyx": list(TINY.shape_zyx)},
                "detector_hw": list(TINY.detector_hw), "samples": samples}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


@pytest.fixture(scope="module")
def atlas():
    hu, labels = _ellipsoid(TINY)
    return {"volume": hu, "labels": labels}


# --------------------------------------------------------------------------------------------
# Metrics (known answers)
# --------------------------------------------------------------------------------------------

def _cube(shift_z=0):
    mask = np.zeros((20, 16, 16), bool)
    mask[4 + shift_z:12 + shift_z, 4:12, 4:12] = True
    return mask


def test_overlap_and_surface_distances_of_shifted_cubes():
    a, b = _cube(), _cube(3)
    assert E.dice(a, a) == 1.0 and E.jaccard(a, a) == 1.0
    # 8-voxel cubes shifted by 3: 5 of 8 slices overlap
    assert E.dice(a, b) == pytest.approx(2 * 5 / 16)
    assert E.jaccard(a, b) == pytest.approx(5 / 11)
    spacing = (2.0, 1.0, 1.0)
    d_ab, d_ba = E.surface_distances(a, b, spacing)
    # every surface voxel finds its translate 3 voxels (6 mm) away, and the bottom face has
    # nothing closer
    assert d_ab.max() == pytest.approx(6.0) and d_ba.max() == pytest.approx(6.0)
    assert 0.0 < E.assd(a, b, spacing) < 6.0
    assert E.hd95(a, b, spacing) <= 6.0
    assert E.assd(a, a, spacing) == 0.0 and E.hd95(a, a, spacing) == 0.0
    assert math.isnan(E.assd(a, np.zeros_like(a), spacing))


def test_ssim_and_spacing():
    rng = np.random.default_rng(0)
    volume = rng.random((12, 12, 12))
    assert E.ssim(volume, volume) == pytest.approx(1.0)
    assert E.ssim(volume + 0.3 * rng.random(volume.shape), volume) < 0.99
    i2w = np.array([[0, 0, 3.0, 1], [0, 2.0, 0, 2], [1.5, 0, 0, 3], [0, 0, 0, 1]])
    assert E.spacing_zyx_of(i2w) == (3.0, 2.0, 1.5)


def test_atlas_point_goes_through_the_inverse_of_psi():
    i2w = _index_to_world(TINY).astype(float)
    psi = np.zeros(TINY.shape_zyx + (3,), np.float32)
    psi[..., 0] = 2.0  # the patient's voxel x reads the atlas 2 voxels further in z
    atlas_point = i2w @ [7.0, 8.0, 9.0, 1.0]
    mapped = E.mapped_atlas_point(atlas_point[:3], psi, i2w)
    np.testing.assert_allclose(mapped, (i2w @ [7.0, 8.0, 7.0, 1.0])[:3], atol=1e-3)


def test_hip_centre_is_the_sphere_fit_of_the_warped_femur():
    from synthetic_shapes import simple_femur_sdf

    # A femur-like label map on an anisotropic grid whose head centre sits at a known point.
    shape, spacing = (120, 60, 80), np.array([1.5, 1.5, 2.0])  # (z, y, x) voxels; x, y, z mm
    i2w = np.diag(list(spacing) + [1.0])
    i2w[:3, 3] = [-75.0, -40.0, -170.0]
    centre = np.array([-14.0, 2.0, 28.0])
    k, j, i = np.mgrid[:shape[0], :shape[1], :shape[2]]
    world = i2w[:3, :3] @ np.stack([i, j, k]).reshape(3, -1) + i2w[:3, 3:4]
    femur = (simple_femur_sdf(world - centre[:, None], 21.0) <= 0).reshape(shape).astype(np.uint8)
    fitted = E.fitted_hip_centre(femur, i2w)
    assert np.linalg.norm(fitted - centre) < 1.0
    assert E.fitted_hip_centre(np.zeros(shape, np.uint8), i2w) is None  # nothing to measure
    rows = E.sample_metrics(femur, femur, i2w, psi=np.zeros(shape + (3,), np.float32),
                            atlas_head_centre_mm=centre + 30.0, head_centre_mm=centre)
    assert rows["hip_centre_method"] == "sphere_fit" and rows["hip_centre_error_mm"] < 1.0


def test_report_has_table_summary_and_strict_json(tmp_path):
    rows = [{"subject": "A", "sample_index": 0, "dice": 0.9, "assd_mm": 1.0},
            {"subject": "B", "sample_index": 1, "dice": 0.7, "assd_mm": math.nan}]
    report = E.write_report(rows, tmp_path)
    assert report.summary["dice"]["mean"] == pytest.approx(0.8)
    assert report.summary["dice"]["sd"] == pytest.approx(np.std([0.9, 0.7], ddof=1))
    assert report.summary["assd_mm"]["failures"] == 1
    text = report.markdown_path.read_text()
    assert "| A | 0 | 0.900 |" in text and "0.800 +- 0.141" in text and "Per subject" in text
    payload = json.loads(report.json_path.read_text())  # strict JSON: nan written as null
    assert payload["rows"][1]["assd_mm"] is None


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------

def test_train_config_validation_names_the_field():
    with pytest.raises(ConfigError, match="learning_rate"):
        T.TrainConfig(learning_rate=0)
    with pytest.raises(ConfigError, match="batch_size"):
        T.TrainConfig(batch_size=0)
    with pytest.raises(ConfigError, match="mixed_precision"):
        T.TrainConfig(mixed_precision="sometimes")


def test_data_order_is_seeded_and_resumable(data_dir):
    manifest = json.loads((data_dir / "manifest.json").read_text())
    entries = T.pooled_entries([data_dir], [manifest], "train")
    order = T.epoch_order(len(entries), seed=3, epoch=1)
    assert sorted(order) == list(range(len(entries)))
    np.testing.assert_array_equal(order, T.epoch_order(len(entries), seed=3, epoch=1))

    def first(start, count):
        stream = T.training_examples(entries, seed=3, start_sample=start)
        return [next(stream)[0]["images"] for _ in range(count)]

    straight = first(0, 7)  # more than two epochs of 3 samples
    resumed = first(4, 3)
    for a, b in zip(straight[4:], resumed):
        np.testing.assert_array_equal(a, b)


SETTINGS = T.TrainConfig(steps=2, learning_rate=1e-3, seed=5, checkpoint_every=2, validate_every=2,
                         val_limit=2, log_every=1, run_eagerly=True)


def test_train_exports_logs_and_resumes(tmp_path, data_dir, atlas):
    reports = []
    first = T.train(TINY, data_dir, tmp_path, train_config=SETTINGS, atlas=atlas, progress=reports.append)
    assert first.steps_done == 2 and first.resumed_from_step == 0
    assert [r.step for r in reports if r.losses][:2] == [1, 2] and reports[-1].fraction == 1.0
    assert all(np.isfinite(r.losses["total"]) for r in reports if r.losses)
    assert any(r.validation for r in reports)
    assert first.best_model_path is not None and first.best_model_path.is_file()
    card = json.loads((first.best_model_path.parent / "model_card.json").read_text())
    assert card["training"]["steps"] == 2 and 0.0 < card["validation"]["dice"] <= 1.0
    assert M.model_config_of(M.load_model(first.best_model_path)) == TINY
    assert list((tmp_path / "logs" / "train").glob("events.out.tfevents.*"))
    history = json.loads((tmp_path / "history.json").read_text())
    assert [h["step"] for h in history] == [2]

    # Run again with more steps: resumes from the checkpoint instead of starting over.
    more = dataclasses.replace(SETTINGS, steps=3, validate_every=0)
    resumed = T.train(TINY, data_dir, tmp_path, train_config=more, atlas=atlas)
    assert resumed.resumed_from_step == 2 and resumed.steps_done == 3

    # A different model config or seed cannot resume into the same folder.
    with pytest.raises(ConfigError, match="another model config"):
        T.train(dataclasses.replace(TINY, smooth_weight=0.5), data_dir, tmp_path, train_config=more,
                atlas=atlas)
    with pytest.raises(ConfigError, match="seed"):
        T.train(TINY, data_dir, tmp_path, train_config=dataclasses.replace(more, seed=6), atlas=atlas)


@pytest.mark.slow
@pytest.mark.parametrize("recompute", [False, True], ids=["plain", "checkpointed"])
def test_cancelled_and_resumed_run_matches_an_uninterrupted_one(tmp_path, data_dir, atlas, recompute):
    # with gradient checkpointing the decoders are nested models: their variables must restore too
    config = dataclasses.replace(TINY, recompute=recompute)
    settings = dataclasses.replace(SETTINGS, steps=4)
    T.train(config, data_dir, tmp_path / "straight", train_config=settings, atlas=atlas)
    seen = []
    with pytest.raises(Cancelled):
        T.train(config, data_dir, tmp_path / "resumed", train_config=settings, atlas=atlas,
                progress=lambda p: seen.append(p.step) if p.losses else None,
                cancel=lambda: len(seen) >= 2)
    resumed = T.train(config, data_dir, tmp_path / "resumed", train_config=settings, atlas=atlas)
    assert resumed.resumed_from_step == 2 and resumed.steps_done == 4
    # Same data order, initialisation and optimizer state: the same final validation and weights.
    # (The cancel fired during the validation at step 2, which the resumed run does not repeat.)
    history_a = json.loads((tmp_path / "straight" / "history.json").read_text())
    history_b = json.loads((tmp_path / "resumed" / "history.json").read_text())
    assert history_a[-1] == history_b[-1] and history_b[-1]["step"] == 4
    import tensorflow as tf

    final_a = tf.train.load_checkpoint(str(tmp_path / "straight" / "checkpoints"))
    final_b = tf.train.load_checkpoint(str(tmp_path / "resumed" / "checkpoints"))
    names = sorted(final_a.get_variable_to_shape_map())
    assert names == sorted(final_b.get_variable_to_shape_map())
    assert any("optimizer" in name for name in names)  # the optimizer state is saved too
    for name in names:
        if "save_counter" in name or name.startswith(("_CHECKPOINTABLE_OBJECT_GRAPH", "wall_time")):
            continue  # bookkeeping: the wall-clock counter differs between runs by nature
        np.testing.assert_allclose(final_a.get_tensor(name), final_b.get_tensor(name), rtol=1e-4,
                                   atol=1e-6, err_msg=name)


def test_cosine_schedule_decays_to_the_final_fraction():
    config = T.TrainConfig(steps=100, learning_rate=1e-3, lr_schedule="cosine", lr_final_fraction=0.1)
    rates = [T.learning_rate_at(config, step) for step in (0, 50, 100, 150)]
    assert rates[0] == pytest.approx(1e-3) and rates[1] == pytest.approx(0.55e-3)
    assert rates[2] == pytest.approx(1e-4) and rates[3] == pytest.approx(1e-4)
    assert T.learning_rate_at(T.TrainConfig(learning_rate=2e-4), 5000) == 2e-4
    with pytest.raises(ConfigError, match="lr_schedule"):
        T.TrainConfig(lr_schedule="step")
    with pytest.raises(ConfigError, match="lr_final_fraction"):
        T.TrainConfig(lr_final_fraction=1.5)


def test_pooled_data_sets_and_fine_tuning_from_a_saved_model(tmp_path, data_dir, atlas):
    import shutil

    second = tmp_path / "second"
    shutil.copytree(data_dir, second)
    folders = T.data_folders([data_dir, second])
    manifests = [json.loads((f / "manifest.json").read_text()) for f in folders]
    pooled = T.pooled_entries(folders, manifests, "train")
    assert len(pooled) == 2 * len(SHIFTS["train"])
    assert {pathlib.Path(e["_path"]).parent.parent for e in pooled} == set(folders)
    with pytest.raises(ConfigError, match="twice"):
        T.data_folders([data_dir, data_dir])

    # A source model with weights of its own, then a run that starts from it with a learning
    # rate so small that its weights stay where the source put them.
    source = M.build_model(TINY, atlas)
    rng = np.random.default_rng(1)
    source.set_weights([w + 0.01 * rng.standard_normal(w.shape).astype(w.dtype) for w in source.get_weights()])
    source_path, _ = M.save_model(source, tmp_path / "source" / "hipatlas-tiny.keras")
    settings = dataclasses.replace(SETTINGS, steps=1, learning_rate=1e-12, validate_every=1, val_limit=1,
                                   lr_schedule="cosine", init_from=str(source_path))
    result = T.train(TINY, [data_dir, second], tmp_path / "run", train_config=settings, atlas=atlas)
    tuned = M.load_model(result.best_model_path)
    kernels = [(a, b) for a, b in zip(source.weights, tuned.weights) if "kernel" in a.path]
    assert kernels
    for a, b in kernels:
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, err_msg=a.path)
    card = json.loads((result.best_model_path.parent / "model_card.json").read_text())
    assert card["training"]["data_manifest_sha256"] == [sha256_file(f / "manifest.json") for f in folders]
    assert card["training"]["dataset_samples"] == 2 * len(manifests[0]["samples"])
    assert card["training"]["wall_time_s"] > 0


def test_evaluate_dataset_writes_reports(tmp_path, data_dir, atlas):
    model = M.build_model(TINY, atlas)
    head = types.SimpleNamespace(landmarks={"head_centre": _head_world((0, 0, 0))}, geometry=None)
    report = E.evaluate_dataset(model, data_dir, tmp_path, split="val", atlas=head)
    assert len(report.rows) == len(SHIFTS["val"])
    for row, shift in zip(report.rows, SHIFTS["val"]):
        assert 0.0 < row["dice"] < 1.0 and row["assd_mm"] > 0
        # an untrained model leaves the atlas in place: the error is the blob's displacement
        expected = np.linalg.norm(np.array(shift) * np.array(TINY.spacing_xyz_mm)[::-1])
        assert row["hip_centre_error_mm"] == pytest.approx(expected, abs=0.1)
        assert -1.0 <= row["ssim"] <= 1.0
    assert report.markdown_path.is_file() and report.json_path.is_file()


def test_evaluate_command_takes_the_issue_s_options(tmp_path, data_dir, atlas, capsys):
    from app import cli as app_cli

    path, _ = M.save_model(M.build_model(TINY, atlas), tmp_path / "model" / "hipatlas-tiny.keras")
    status = app_cli.main(["evaluate", "--model", str(path.parent), "--data", str(data_dir), "--split", "val",
                           "--out", str(tmp_path / "eval")])
    assert status == 0 and "dice:" in capsys.readouterr().out
    payload = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert len(payload["rows"]) == len(SHIFTS["val"])
    assert app_cli.main(["evaluate", "--data", str(data_dir), "--out", str(tmp_path / "e2")]) == 2


def test_stop_at_ends_early_on_the_full_schedule(tmp_path, data_dir, atlas):
    """``stop_at`` reproduces a run stopped early: it ends there, with the rates of the long schedule."""
    with pytest.raises(ConfigError, match="stop_at"):
        T.TrainConfig(steps=4, stop_at=5)
    config = dataclasses.replace(SETTINGS, steps=4, stop_at=2, lr_schedule="cosine", validate_every=2)
    result = T.train(TINY, data_dir, tmp_path, train_config=config, atlas=atlas)
    assert result.steps_done == 2
    card = json.loads((result.best_model_path.parent / "model_card.json").read_text())
    assert card["training"]["steps"] == 2 and card["training"]["train_config"]["stop_at"] == 2
    # Half-way along a 4-step cosine, not at its end: the schedule is the long run's.
    assert T.learning_rate_at(config, 2) == pytest.approx(1e-3 * (0.05 + 0.95 * 0.5))


def test_export_last_keeps_the_final_step_and_still_reports_validation(tmp_path, data_dir, atlas):
    """``export="last"``: validation runs and is recorded, but the result is the last step's model."""
    with pytest.raises(ConfigError, match="export"):
        T.TrainConfig(export="newest")
    config = dataclasses.replace(SETTINGS, steps=3, validate_every=1, val_limit=1, export="last")
    result = T.train(TINY, data_dir, tmp_path, train_config=config, atlas=atlas)
    history = json.loads((tmp_path / "history.json").read_text())
    assert [h["step"] for h in history] == [1, 2, 3]
    card = json.loads((result.best_model_path.parent / "model_card.json").read_text())
    assert card["training"]["steps"] == 3 and card["training"]["train_config"]["export"] == "last"
    assert card["validation"] == history[-1]["metrics"]


def test_checkpoints_become_models_and_models_average(tmp_path, data_dir, atlas):
    """tools/checkpoint_models.py: the last checkpoint exported is the run's exported model (same
    weights, same outputs); an earlier one differs; the mean of two models is their midpoint."""
    from tool_helpers import load_tool

    tool = load_tool("checkpoint_models")
    config = dataclasses.replace(SETTINGS, steps=2, checkpoint_every=1, validate_every=0, export="last")
    run = T.train(TINY, data_dir, tmp_path / "run", train_config=config, atlas=atlas)
    last = tool.export_checkpoint(tmp_path / "run", 2, tmp_path / "step2", atlas=atlas)
    early = tool.export_checkpoint(tmp_path / "run", 1, tmp_path / "step1", atlas=atlas)
    exported = M.load_model(run.best_model_path).get_weights()
    for a, b in zip(M.load_model(last).get_weights(), exported):
        np.testing.assert_array_equal(a, b)
    early_weights = M.load_model(early).get_weights()
    assert any(not np.array_equal(a, b) for a, b in zip(early_weights, exported))
    card = json.loads((early.parent / "model_card.json").read_text())
    assert card["training"]["exported_checkpoint_step"] == 1 and card["training"]["steps"] == 2
    mean = tool.average_models([tmp_path / "step1", tmp_path / "step2"], tmp_path / "mean")
    for m, a, b in zip(M.load_model(mean).get_weights(), early_weights, exported):
        np.testing.assert_allclose(m, (a.astype(np.float64) + b) / 2, rtol=1e-6, atol=1e-7)
    assert json.loads((mean.parent / "model_card.json").read_text())["training"]["weights_averaged_from"]
    with pytest.raises(Exception, match="no checkpoint at step 3"):
        tool.export_checkpoint(tmp_path / "run", 3, tmp_path / "step3", atlas=atlas)
