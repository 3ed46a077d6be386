"""Table 1's baselines: the SDM (registration, PCA), the two networks, the metrics and the report."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from inference.evaluate import dice, jaccard, sample_metrics, ssim
from inference.experiments import EXPERIMENTS, baselines, table1
from inference.experiments.common import ExperimentContext

SHAPE = (32, 24, 32)
SPACING = (2.0, 1.5, 1.5)
HW = (16, 24)


def _ellipsoid(centre, radii, shape=SHAPE):
    z, y, x = np.indices(shape).astype(float)
    return (((z - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2
            + ((x - centre[2]) / radii[2]) ** 2) <= 1


def test_registration_moves_the_atlas_onto_the_subject():
    atlas, subject = _ellipsoid((16, 12, 16), (9, 6, 8)), _ellipsoid((18, 11, 14), (10, 5, 8))
    field = baselines.register_atlas_to_subject(atlas, subject, SPACING)
    assert field.shape == (8, 6, 8, 3)
    # atlas index = subject index + field: the centre shift (-2, +1, +2) voxels at the subject's centre
    np.testing.assert_allclose(field[4, 3, 3], (-2.0, 1.0, 2.0), atol=0.6)
    warped = baselines.warp_with_coarse_field(atlas.astype(np.float32), field) > 0.5
    assert dice(atlas, subject) < 0.75 and dice(warped, subject) > 0.93


def test_sdm_pca_reconstructs_a_training_deformation():
    rng = np.random.default_rng(0)
    basis = rng.normal(size=(3, 4, 3, 4, 3))
    fields = np.einsum("nk,kzyxc->nzyxc", rng.normal(size=(10, 3)), basis) + 0.5
    sdm = baselines.StatisticalDeformationModel.fit(fields, n_components=3)
    np.testing.assert_allclose(sdm.field(sdm.weights(fields[4])), fields[4], atol=1e-4)
    # the mean field has weights 0; a truncated model does not reconstruct exactly
    np.testing.assert_allclose(sdm.weights(fields.mean(axis=0)), 0.0, atol=1e-4)
    small = baselines.StatisticalDeformationModel.fit(fields, n_components=1)
    assert np.abs(small.field(small.weights(fields[4])) - fields[4]).max() > 1e-2
    # normalised weights of the training set have unit variance
    np.testing.assert_allclose(np.stack([sdm.weights(f) for f in fields]).std(axis=0, ddof=1), 1.0, rtol=1e-4)


def test_sdm_saves_and_loads(tmp_path):
    fields = np.random.default_rng(1).normal(size=(5, 2, 2, 2, 3))
    sdm = baselines.StatisticalDeformationModel.fit(fields, 4)
    again = baselines.StatisticalDeformationModel.load(sdm.save(tmp_path / "sdm.npz"))
    np.testing.assert_array_equal(again.components, sdm.components)
    assert again.n_components == 4 and not list(tmp_path.glob(".*"))


def _views(n, seed=0):
    """Two 'radiographs' whose bright square's size encodes the target."""
    rng = np.random.default_rng(seed)
    size = rng.integers(3, 10, n)
    images = np.zeros((n, 2) + HW, np.float32)
    for i, s in enumerate(size):
        images[i, :, 2:2 + s, 4:4 + s] = 1.0
    return {"images": images, "masks": (images > 0).astype(np.float32)}, size


def _losses(run):
    return [loss for _, loss in json.loads((run / "state.json").read_text())["losses"]]


def test_sdm_regressor_trains_resumes_and_loads_safely(tmp_path):
    inputs, size = _views(32)
    targets = np.stack([size / 5.0 - 1.0, -(size / 5.0 - 1.0)], axis=1).astype(np.float32)

    def build():
        return baselines.build_sdm_regressor(HW, 2, filters=(8, 8), dense=16, lr=3e-3)

    run = tmp_path / "sdm"
    baselines.train_baseline(build, inputs, targets, run, steps=30, batch=8, checkpoint_every=15)
    assert (run / "checkpoint.keras").is_file() and json.loads((run / "state.json").read_text())["done"]
    losses = _losses(run)
    assert losses[-1] < losses[0]
    # a second call returns the finished model (safe_mode load) without training again
    model = baselines.train_baseline(lambda: pytest.fail("rebuilt"), inputs, targets, run, steps=30)
    loaded = baselines.load_baseline(run / "model.keras")
    np.testing.assert_allclose(loaded.predict_on_batch(inputs), model.predict_on_batch(inputs), atol=1e-6)


def test_training_resumed_from_a_checkpoint_matches_an_uninterrupted_run(tmp_path):
    inputs, size = _views(16)
    targets = (size[:, None] / 5.0).astype(np.float32)

    def build():
        return baselines.build_sdm_regressor(HW, 1, filters=(4,), dense=8, seed=3)

    baselines.train_baseline(build, inputs, targets, tmp_path / "straight", steps=8, batch=4, checkpoint_every=4)
    stopped = tmp_path / "stopped"
    baselines.train_baseline(build, inputs, targets, stopped, steps=4, batch=4, checkpoint_every=4)
    state = json.loads((stopped / "state.json").read_text())
    (stopped / "state.json").write_text(json.dumps({k: v for k, v in state.items() if k != "done"}))
    resumed = baselines.train_baseline(build, inputs, targets, stopped, steps=8, batch=4, checkpoint_every=4)
    straight = baselines.load_baseline(tmp_path / "straight" / "model.keras")
    np.testing.assert_allclose(resumed.predict_on_batch(inputs), straight.predict_on_batch(inputs), rtol=1e-4,
                               atol=1e-5)


def test_kasten_net_trains_with_dice_bce_and_loads_safely(tmp_path):
    inputs, size = _views(16)
    shape = (8, 8, 8)
    targets = np.stack([_ellipsoid((4, 4, 4), (s / 3,) * 3, shape) for s in size]).astype(np.float32)[..., None]

    def build():
        return baselines.build_kasten_net(HW, shape, filters=(8, 8), decoder=(8, 4), lr=3e-3)

    run = tmp_path / "kasten"
    model = baselines.train_baseline(build, inputs, targets, run, steps=40, batch=8, checkpoint_every=10)
    losses = _losses(run)
    assert losses[-1] < losses[0]
    assert model.output_shape == (None, 8, 8, 8, 1)
    loaded = baselines.load_baseline(run / "model.keras")
    np.testing.assert_allclose(loaded.predict_on_batch(inputs), model.predict_on_batch(inputs), atol=1e-6)
    with pytest.raises(Exception, match="divide"):
        baselines.build_kasten_net(HW, (9, 8, 8), decoder=(8, 4))


def test_dice_bce_loss_is_smallest_for_the_truth():
    import keras

    truth = _ellipsoid((4, 4, 4), (3, 3, 3), (8, 8, 8)).astype(np.float32)[None, ..., None]
    perfect = float(keras.ops.convert_to_numpy(baselines.dice_bce_loss(truth, np.clip(truth, 1e-4, 1 - 1e-4)))[0])
    wrong = float(keras.ops.convert_to_numpy(baselines.dice_bce_loss(truth, np.full_like(truth, 0.5)))[0])
    assert perfect < 0.01 < wrong


def test_kasten_labels_round_trip_the_half_resolution_target():
    labels = _ellipsoid((16, 12, 16), (9, 6, 8)).astype(np.uint8)
    back = baselines.kasten_labels(baselines.kasten_target(labels), labels.shape)
    assert back.shape == labels.shape and dice(back == 1, labels == 1) > 0.9


def test_metrics_jaccard_from_dice_and_ssim_of_identical_volumes():
    a, b = _ellipsoid((16, 12, 16), (9, 6, 8)), _ellipsoid((18, 11, 14), (10, 5, 8))
    d = dice(a, b)
    assert jaccard(a, b) == pytest.approx(d / (2 - d))
    volume = np.random.default_rng(2).normal(size=SHAPE)
    assert ssim(volume, volume) == pytest.approx(1.0)
    row = sample_metrics(b.astype(np.uint8), b.astype(np.uint8), np.diag([*SPACING[::-1], 1.0]))
    assert row["dice"] == 1.0 and row["assd_mm"] == 0.0 and math.isnan(row["ssim"])


def test_kasten_decoder_depth_follows_the_grid():
    assert table1._decoder((48, 32, 48)) == (32, 16, 8)
    assert table1._decoder((96, 64, 96)) == (64, 32, 16, 8)


def test_paired_p_values_against_ours():
    rng = np.random.default_rng(4)
    ours = rng.uniform(0.9, 0.95, 12)
    scores = {"ours": [{"dice": v, "ssim": None} for v in ours],
              "worse": [{"dice": v - 0.1 + rng.normal(0, 0.01), "ssim": None} for v in ours],
              "same": [{"dice": v + rng.normal(0, 0.01), "ssim": None} for v in ours]}
    p = table1.paired_p_values(scores)
    assert math.isnan(p["ours"]["dice"]) and p["worse"]["dice"] < 1e-6 and p["same"]["dice"] > 0.01
    assert math.isnan(p["worse"]["ssim"])  # no volume: no test


def test_table1_report_and_resumable_units(tmp_path):
    """The report of scored units: results.md laid out like Table 1 with the paper column."""

    assert EXPERIMENTS["table1"] == "inference.experiments.table1"
    from inference.resources import default_model_file

    ctx = ExperimentContext("table1", tmp_path, "quick", default_model_file())
    calls = []

    def unit(row, key, value):
        return ctx.unit(f"{row}_{key}", lambda: calls.append(key) or {"dice": value, "jaccard": value / (2 - value),
                                                                      "assd_mm": 1 - value, "hd95_mm": 2.0,
                                                                      "ssim": None})
    rng = np.random.default_rng(5)
    values = rng.uniform(0.85, 0.95, 4)
    noise = rng.normal(0, 0.01, 4)
    scores = {row: [unit(row, f"p{i}", v - shift - (noise[i] if shift else 0.0)) for i, v in enumerate(values)]
              for row, shift in (("ours", 0.0), ("SDM", 0.1), ("Kasten-style", 0.05))}
    again = [unit("ours", f"p{i}", 0.0) for i in range(4)]
    assert len(calls) == 12 and again == scores["ours"]
    bounds = {"registration": [{"dice": 0.95, "assd_mm": 0.5, "hd95_mm": 1.0}] * 4, "best_weights": None,
              "kasten_grid": [{"dice": 0.96, "assd_mm": 0.4, "hd95_mm": 1.0}] * 4}
    results = table1.report(ctx, scores, table1.BUDGET["quick"], 4, bounds)
    text = (tmp_path / "results.md").read_text()
    assert "| ours | " in text and "| 0.94 | 0.84 |" in text and "not found" in text
    assert f"| {table1.BOUNDS['kasten_grid']} | 0.960 +- 0.000 |" in text
    assert f"| {table1.BOUNDS['best_weights']} | not measured" in text
    assert results["bounds"]["registration"]["dice"]["mean"] == pytest.approx(0.95)
    assert (tmp_path / "table1.png").stat().st_size > 1000
    assert results["table"]["SDM"]["dice"]["mean"] == pytest.approx(values.mean() - 0.1 - noise.mean())
    assert json.loads((tmp_path / "results.json").read_text())["test_pairs"] == 4


@pytest.mark.slow
def test_table1_runs_end_to_end_on_a_tiny_budget(tmp_path, monkeypatch):
    from inference.experiments import run_experiment

    tiny = {"subjects": 8, "steps": 4, "validate_every": 2, "val_limit": 1, "test": 2, "baseline_steps": 4,
            "batch": 2, "sdm_components": 3}
    monkeypatch.setitem(table1.BUDGET, "quick", tiny)
    results = run_experiment("table1", tmp_path)
    assert results["test_pairs"] == 2 and set(results["rows"]) == set(table1.ROWS)
    # per pair: the four rows and the two baselines' bounds
    assert len(list((tmp_path / "units").glob("*.json"))) == 2 * (len(table1.ROWS) + 2)
    assert 0.5 < results["table"]["ours (reference model)"]["dice"]["mean"] <= 1.0
    for row in ("SDM", "Kasten-style"):
        assert 0.0 <= results["table"][row]["dice"]["mean"] <= 1.0
    assert results["table"]["SDM"]["ssim"]["n"] == 2 and results["table"]["Kasten-style"]["ssim"]["n"] == 0
    # the bounds bound: the true label at the Kasten grid beats the network, the registration the SDM
    bounds = results["bounds"]
    assert bounds["kasten_grid"]["dice"]["mean"] > max(0.85, results["table"]["Kasten-style"]["dice"]["mean"])
    assert bounds["registration"]["dice"]["mean"] > results["table"]["SDM"]["dice"]["mean"]
    assert bounds["best_weights"]["dice"]["n"] == 2
    sdm = baselines.StatisticalDeformationModel.load(tmp_path / "sdm" / "sdm.npz")
    assert sdm.n_components == 3 and sdm.mean.shape[-1] == 3
    text = (tmp_path / "results.md").read_text()
    assert "| Kasten-style |" in text and "sha256" in text
    # run again: everything is read back (no unit recomputed, no training repeated)
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "units").glob("*.json")}
    assert run_experiment("table1", tmp_path)["table"] == json.loads((tmp_path / "results.json").read_text())["table"]
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "units").glob("*.json")} == stamps
