"""Tests of inference.data.dataset (DRR pair data sets) and inference.data.augment (realism).

Everything runs on analytic subject models (a femur made of a head sphere and capsules), tiny
grids and tiny detectors, so the whole file takes seconds.
"""

from __future__ import annotations

import dataclasses
import json
import threading

import numpy as np
from synthetic_shapes import simple_femur_sdf
import pytest
from scipy import ndimage

from inference import geometry as g
from inference.data import augment as aug
from inference.data import dataset as ds
from inference.data import phantom as ph
from inference.errors import Cancelled, ConfigError, DataError, InputFileError

HEAD_R = 22.0


# ----------------------------------------------------------------------------------------------
# Analytic subjects and tiny grids
# ----------------------------------------------------------------------------------------------
def _femur_sdf(p):
    return simple_femur_sdf(p, HEAD_R)


def _bead_sdf(p):
    return np.linalg.norm(p, axis=0) - 25.0


def _pelvis_sdf(p):
    shell = np.abs(np.linalg.norm(p, axis=0) - (HEAD_R + 10)) - 7
    return np.maximum(shell, -(p[2] + 0.3 * p[0] - 5))


def _field(fn, low, high, spacing):
    low = np.asarray(low, float)
    n = ((np.asarray(high, float) - low) / spacing).astype(int) + 1
    ii, jj, kk = np.meshgrid(*[np.arange(c) for c in n], indexing="ij")
    p = np.stack([ii, jj, kk]).reshape(3, -1) * spacing + low[:, None]
    return ph.ScalarField(fn(p).reshape(n).transpose(2, 1, 0), low, spacing)


MARKS = {
    "head_centre": np.zeros(3), "lesser_trochanter": np.array([-30.0, -10, -55]),
    "greater_trochanter": np.array([-55.0, 0, 8]), "shaft_point_distal": np.array([-42.0, 0, -150]),
    "shaft_point_proximal": np.array([-42.0, 0, -60]), "neck_point": np.array([-20.0, 0, -15]),
}


@pytest.fixture(scope="module")
def femur_model():
    femur = _field(_femur_sdf, [-90, -50, -200], [40, 50, 45], 3.0)
    pelvis = _field(_pelvis_sdf, [-40, -50, -30], [50, 50, 50], 3.0)
    return ph.SubjectModel("synthetic:right", femur, pelvis, ph._body_distance(femur), ph._body_distance(pelvis),
                           MARKS, HEAD_R)


@pytest.fixture(scope="module")
def bead_model():
    bead = _field(_bead_sdf, [-60, -60, -60], [60, 60, 60], 2.0)
    return ph.SubjectModel("bead:right", bead, None, ph._body_distance(bead), None, MARKS, 25.0)


def _tiny_grid(detector_hw=(20, 28)) -> ds.DatasetGrid:
    geometry = g.VolumeGeometry.centered((24, 16, 24), (5.3, 5.3, 8.0), (-20.0, 0.0, -55.0))
    return ds.DatasetGrid("tiny", geometry, detector_hw)


FEMURS = [ds.SourceFemur("A:left", "A"), ds.SourceFemur("A:right", "A"), ds.SourceFemur("B:right", "B")]


def _config(**changes) -> ds.SynthConfig:
    base = dict(phantom=ds.PhantomSampling(shape=False), split={"train": ["A"], "val": ["B"]},
                split_fractions={"train": 0.6, "val": 0.4})
    base.update(changes)
    return ds.SynthConfig(**base)


def _models(model):
    return {f.name: model for f in FEMURS}


# ----------------------------------------------------------------------------------------------
# Split
# ----------------------------------------------------------------------------------------------
def test_default_split_keeps_specimens_apart_on_the_shared_bones():
    femurs = ds.available_femurs()
    assignment = ds.assign_samples(60, femurs, ds.SynthConfig())
    specimens_by_split: dict[str, set] = {}
    for split, femur in assignment:
        specimens_by_split.setdefault(split, set()).add(femur.specimen)
    names = list(specimens_by_split)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not specimens_by_split[a] & specimens_by_split[b], (a, b)
    train_subjects = {f.name for s, f in assignment if s == "train"}
    # TLEM2 CT and MRI are one specimen: both scans, both sides, in the same split
    assert {"TLEM2_CT:left", "TLEM2_CT:right", "TLEM2_MRI:left", "TLEM2_MRI:right"} <= train_subjects
    assert {f.specimen for s, f in assignment if s == "val"} == {"JIA"}
    # sample i's split and femur depend on i only: a longer data set extends a shorter one
    assert ds.assign_samples(25, femurs, ds.SynthConfig()) == assignment[:25]


def test_split_with_a_specimen_in_two_splits_is_refused():
    with pytest.raises(ConfigError, match="both"):
        ds.SynthConfig(split={"train": ["TLEM2", "JIA"], "val": ["JIA"]})
    with pytest.raises(ConfigError, match="specimen 'NOPE'"):
        ds.assign_samples(5, FEMURS, _config(split={"train": ["A"], "val": ["NOPE"]}))


# ----------------------------------------------------------------------------------------------
# Geometry: a bead lands where P says
# ----------------------------------------------------------------------------------------------
def _bead_volume(centre_mm, sigma_mm=6.0):
    geometry = g.VolumeGeometry.centered((40, 40, 40), (2.0, 2.0, 2.0), centre_mm + np.array([3.3, -2.1, 1.7]))
    kk, jj, ii = np.meshgrid(*[np.arange(n) for n in geometry.shape_zyx], indexing="ij")
    ijk = np.stack([ii.ravel(), jj.ravel(), kk.ravel()]).astype(float)
    world = geometry.index_to_world()[:3, :3] @ ijk + geometry.index_to_world()[:3, 3:4]
    r2 = ((world - centre_mm[:, None]) ** 2).sum(0)
    # 1000 HU above air -> mu_water inside the Gaussian: an attenuation blob (HU = -1000 + 1000 g)
    hu = -1000.0 + 3000.0 * np.exp(-0.5 * r2 / sigma_mm**2)
    labels = (r2 <= (2 * sigma_mm) ** 2).astype(np.uint8)
    return hu.reshape(geometry.shape_zyx).astype(np.float32), labels.reshape(geometry.shape_zyx), geometry


def _centroid(image):
    weights = np.clip(image, 0, None)
    vv, uu = np.mgrid[: image.shape[0], : image.shape[1]]
    return np.array([(uu * weights).sum(), (vv * weights).sum()]) / weights.sum()


@pytest.mark.parametrize("mode", ["orthogonal", "generalised"])
def test_bead_lands_where_the_stored_projection_says(mode):
    rng = np.random.default_rng(3)
    grid = _tiny_grid((40, 56))
    centre = np.array([-12.0, 7.0, -40.0])
    hu, labels, geometry = _bead_volume(centre)
    views, angles = ds.sample_views(rng, ds.ViewSampling(mode=mode), centre)
    if mode == "orthogonal":
        np.testing.assert_allclose(angles, [0.0, 90.0])
    else:
        assert abs(angles[0]) <= 30 and abs(angles[1] - 90) <= 30 and not np.allclose(angles, [0, 90])
    # an even and an odd oversampling factor: the k x k area average must land on P_net exactly
    oversample = 2 if mode == "orthogonal" else 3
    out = ds.render_view_pair(hu, labels, geometry, grid, views, ds.RenderSettings(oversample=oversample))
    for view in range(2):
        expected = g.project_points(out["projection"][view], centre[None])[0]
        np.testing.assert_allclose(_centroid(out["images"][view]), expected, atol=0.15)
        np.testing.assert_allclose(_centroid(out["masks"][view].astype(float)), expected, atol=0.35)


def test_calibration_error_moves_the_image_but_not_the_stored_matrix():
    grid = _tiny_grid((40, 56))
    centre = np.array([-20.0, 0.0, -50.0])
    hu, labels, geometry = _bead_volume(centre)
    views, _ = ds.sample_views(np.random.default_rng(0), ds.ViewSampling(isocentre_offset_mm=0.0), centre)
    error = aug.CalibrationPerturbation(rotation_deg=(0.0, 0.0, 1.0), translation_mm=(3.0, -2.0, 4.0),
                                        detector_shift_px=(0.7, -0.4))
    nominal = ds.render_view_pair(hu, labels, geometry, grid, views, ds.RenderSettings())
    perturbed = ds.render_view_pair(hu, labels, geometry, grid, views, ds.RenderSettings(),
                                    calibration=[error, error], calibration_centre_mm=centre)
    np.testing.assert_array_equal(nominal["projection"], perturbed["projection"])
    for view in range(2):
        truth = error.apply(perturbed["projection"][view], centre)
        expected = g.project_points(truth, centre[None])[0]
        seen = _centroid(perturbed["images"][view])
        np.testing.assert_allclose(seen, expected, atol=0.15)
        assert np.linalg.norm(seen - _centroid(nominal["images"][view])) > 0.5


def test_sample_landmark_projects_onto_its_mask_despite_pose_and_offset(bead_model):
    # The "femur" is a ball around the head centre: its mask is a disc centred where P sends the
    # head-centre landmark, whatever the pose of the phantom and the isocentre offset.
    config = _config(phantom=ds.PhantomSampling(shape=False, max_rotation_deg=10, max_translation_mm=5),
                     realism=aug.RealismRanges(enabled=False), views=ds.ViewSampling(mode="generalised"))
    grid = _tiny_grid((40, 56))
    for index in range(2):
        arrays, meta = ds.synthesize_sample(config, grid, seed=11, index=index, femur=bead_model)
        pose = arrays["pose"]
        np.testing.assert_allclose(arrays["landmarks_mm"][0], pose[:3, 3], atol=1e-4)  # head at the canonical origin
        assert np.linalg.norm(pose[:3, 3] - 0.0) > 0.5 or not np.allclose(pose[:3, :3], np.eye(3))
        for view in range(2):
            expected = g.project_points(arrays["projection"][view], arrays["landmarks_mm"][:1].astype(float))[0]
            mask = arrays["masks"][view].astype(float)
            assert mask.sum() > 10
            np.testing.assert_allclose(_centroid(mask), expected, atol=0.5)


# ----------------------------------------------------------------------------------------------
# Masks
# ----------------------------------------------------------------------------------------------
def test_masks_match_the_projected_femur_label(femur_model):
    config = _config(realism=aug.RealismRanges(enabled=False))
    grid = _tiny_grid((32, 44))
    arrays, _ = ds.synthesize_sample(config, grid, seed=5, index=0, femur=femur_model)
    geometry = grid.geometry
    # Independent of the renderer: splat 4^3 points per femur voxel through P.
    kk, jj, ii = np.nonzero(arrays["labels"] == 1)
    offsets = (np.stack(np.meshgrid(*[np.arange(4)] * 3, indexing="ij")).reshape(3, -1).T + 0.5) / 4 - 0.5
    ijk = (np.stack([ii, jj, kk], 1)[:, None, :] + offsets[None]).reshape(-1, 3)
    world = ijk @ geometry.index_to_world()[:3, :3].T + geometry.index_to_world()[:3, 3]
    for view in range(2):
        uv = np.round(g.project_points(arrays["projection"][view], world)).astype(int)
        rows, cols = arrays["masks"][view].shape
        keep = (uv[:, 0] >= 0) & (uv[:, 0] < cols) & (uv[:, 1] >= 0) & (uv[:, 1] < rows)
        hit = np.zeros((rows, cols), bool)
        hit[uv[keep, 1], uv[keep, 0]] = True
        mask = arrays["masks"][view].astype(bool)
        iou = (mask & hit).sum() / (mask | hit).sum()
        assert iou > 0.85, iou
        assert not (mask & ~ndimage.binary_dilation(hit)).any()


# ----------------------------------------------------------------------------------------------
# Data set files: format, determinism, resume, cancel
# ----------------------------------------------------------------------------------------------
def _generate(out, model, n=3, **kwargs):
    kwargs.setdefault("config", _config())
    return ds.generate_dataset(out, n, _tiny_grid(), "generalised", seed=7, workers=1, femurs=FEMURS,
                               models=_models(model), **kwargs)


def test_dataset_format_determinism_and_resume(tmp_path, femur_model, monkeypatch):
    manifest_path = _generate(tmp_path / "a", femur_model)
    manifest = json.loads(manifest_path.read_text())
    assert manifest["format"] == "hipatlas-dataset/1" and manifest["complete"] is True
    assert manifest["landmark_names"][0] == "head_centre" and manifest["hu_to_mu"]["mu_water_per_mm"] > 0
    assert manifest["grid"]["detector_hw"] == [20, 28] and manifest["geometry_mode"] == "generalised"
    samples = manifest["samples"]
    assert [s["index"] for s in samples] == [0, 1, 2]
    for split in ds.SPLITS:  # no subject, and no specimen, in two splits
        others = [s for s in samples if s["split"] != split]
        mine = [s for s in samples if s["split"] == split]
        assert not {s["specimen"] for s in mine} & {s["specimen"] for s in others}
    assert {s["split"] for s in samples} == {"train", "val"}

    sample = ds.load_sample(tmp_path / "a" / samples[0]["file"])
    for key, dtype in ds.SAMPLE_KEYS.items():
        assert sample[key].dtype == np.dtype(dtype), key
    assert sample["volume"].shape == (24, 16, 24) and sample["images"].shape == (2, 20, 28)
    assert sample["landmarks_mm"].shape == (6, 3)
    np.testing.assert_allclose(sample["index_to_world"], _tiny_grid().geometry.index_to_world())
    assert sample["masks"].any() and np.isfinite(sample["images"]).all()
    with np.load(tmp_path / "a" / samples[0]["file"], allow_pickle=False) as data:
        assert set(data.files) == set(ds.SAMPLE_KEYS) | set(ds.OPTIONAL_KEYS)

    # same seed, another folder: byte-identical files
    _generate(tmp_path / "b", femur_model, n=1)
    entry = samples[0]
    assert (tmp_path / "a" / entry["file"]).read_bytes() == (tmp_path / "b" / entry["file"]).read_bytes()

    # resume: one file missing, one damaged -> exactly those two are made again
    (tmp_path / "a" / samples[0]["file"]).unlink()
    with open(tmp_path / "a" / samples[2]["file"], "ab") as handle:
        handle.write(b"junk")
    made = []
    original = ds.synthesize_sample
    monkeypatch.setattr(ds, "synthesize_sample", lambda *a, **k: made.append(a[3]) or original(*a, **k))
    progress = []
    _generate(tmp_path / "a", femur_model, progress=lambda done, total: progress.append((done, total)))
    assert sorted(made) == [0, 2]
    assert progress[0] == (1, 3) and progress[-1] == (3, 3)
    resumed = json.loads(manifest_path.read_text())["samples"]
    assert [s["sha256"] for s in resumed] == [s["sha256"] for s in samples]

    # a larger N extends the set without touching the first samples
    made.clear()
    _generate(tmp_path / "a", femur_model, n=4)
    assert made == [3]

    # other parameters on the same folder are refused
    with pytest.raises(DataError, match="other parameters"):
        _generate(tmp_path / "a", femur_model, config=_config(realism=aug.RealismRanges(enabled=False)))

    # reader
    final = ds.load_manifest(tmp_path / "a")["samples"]
    train = list(ds.iter_samples(tmp_path / "a", "train", verify=True))
    assert {item["sample_index"] for item in train} == {s["index"] for s in final if s["split"] == "train"}
    assert all(item["subject"] in {"A:left", "A:right"} for item in train)


def test_cancel_keeps_finished_samples_and_a_partial_manifest(tmp_path, femur_model):
    stop = threading.Event()
    calls = []

    def progress(done, total):
        calls.append(done)
        if done >= 1:
            stop.set()

    with pytest.raises(Cancelled):
        _generate(tmp_path / "c", femur_model, progress=progress, cancel=stop)
    manifest = ds.load_manifest(tmp_path / "c")
    assert manifest["complete"] is False and len(manifest["samples"]) == 1
    assert not list((tmp_path / "c").rglob(".*tmp*"))


def test_folder_with_other_content_is_refused(tmp_path, femur_model):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not an empty folder"):
        _generate(tmp_path / "d", femur_model)


def test_load_sample_rejects_damaged_or_foreign_files(tmp_path):
    with pytest.raises(InputFileError, match="not found"):
        ds.load_sample(tmp_path / "missing.npz")
    ds.write_npz(tmp_path / "partial.npz", {"volume": np.zeros((2, 2, 2), np.float32)})
    with pytest.raises(DataError, match="lacks"):
        ds.load_sample(tmp_path / "partial.npz")
    good = tmp_path / "partial.npz"
    (tmp_path / "cut.npz").write_bytes(good.read_bytes()[:40])
    with pytest.raises(InputFileError, match="cannot read"):
        ds.load_sample(tmp_path / "cut.npz")
    with pytest.raises(DataError, match="object"):
        ds.write_npz(tmp_path / "obj.npz", {"x": np.array([{"a": 1}], dtype=object)})
    assert not (tmp_path / "obj.npz").exists() and not list(tmp_path.glob(".obj*"))


def test_config_validation_names_the_field():
    with pytest.raises(ConfigError, match="oversample"):
        ds.RenderSettings(oversample=0)
    with pytest.raises(ConfigError, match="sid_mm"):
        ds.ViewSampling(sid_mm=1200.0)
    with pytest.raises(ConfigError, match="mode"):
        ds.ViewSampling(mode="oblique")
    with pytest.raises(ConfigError, match="subjects"):
        ds.generate_dataset("/nonexistent", 0)


# ----------------------------------------------------------------------------------------------
# Realism augmentation
# ----------------------------------------------------------------------------------------------
def _test_image():
    p = np.full((96, 96), 3.0)
    p[30:66, 40:56] += 2.0  # a "bone"
    return ndimage.gaussian_filter(p, 1.0)


def test_realism_is_deterministic_given_its_parameters():
    rng = np.random.default_rng(4)
    params = aug.sample_realism_params(rng)
    image = _test_image()
    a = aug.apply_realism(image, params, 0.5)
    b = aug.apply_realism(image, params, 0.5)
    assert a.dtype == np.float32 and a.tobytes() == b.tobytes()
    other = dataclasses.replace(params, noise_seed=params.noise_seed + 1)
    assert not np.array_equal(a, aug.apply_realism(image, other, 0.5))
    again = aug.sample_realism_params(np.random.default_rng(4))
    assert again == params
    assert aug.apply_realism(image, aug.RealismParams(), 0.5).tobytes() == image.astype(np.float32).tobytes()
    assert aug.sample_realism_params(rng, aug.RealismRanges(enabled=False)).is_identity


def test_realism_changes_statistics_as_intended():
    image = _test_image()
    noise = lambda dose: np.std(aug.apply_realism(image, aug.RealismParams(dose_photons_per_mm2=dose,  # noqa: E731
                                                                              noise_seed=1), 0.5) - image)
    low, high = noise(1e4), noise(1e6)
    assert high < low / 5  # Poisson: noise ~ 1/sqrt(dose) -> x10 for x100 dose
    # noise of -log(N/I0) is 1/sqrt(expected counts) -> check the level, not just the trend
    expected = 1 / np.sqrt(1e4 * 0.25 * np.exp(-3.0))
    assert 0.7 * expected < low < 1.4 * expected

    contrast = lambda img: img[48, 48] - img[48, 10]  # noqa: E731
    hazy = aug.apply_realism(image, aug.RealismParams(scatter_fraction=0.5), 0.5)
    assert contrast(hazy) < 0.9 * contrast(image)
    assert hazy.mean() < image.mean()  # scatter adds photons: less apparent attenuation

    blurred = aug.apply_realism(image, aug.RealismParams(blur_sigma_mm=2.0), 0.5)
    gradient = lambda img: np.abs(np.diff(img, axis=1)).max()  # noqa: E731
    assert gradient(blurred) < 0.7 * gradient(image)

    scaled = aug.apply_realism(image, aug.RealismParams(intensity_scale=1.2), 0.5)
    np.testing.assert_allclose(scaled, 1.2 * image, rtol=1e-5)
    reference = np.percentile(image, 99)
    steep = aug.apply_realism(image, aug.RealismParams(gamma=2.0), 0.5)
    np.testing.assert_allclose(steep, reference * (image / reference) ** 2, rtol=1e-5)
    assert contrast(steep) > contrast(image)


def test_realism_and_calibration_validate_their_parameters():
    with pytest.raises(ValueError, match="gamma"):
        aug.RealismParams(gamma=0.0)
    with pytest.raises(ValueError, match="dose_photons_per_mm2"):
        aug.RealismRanges(dose_photons_per_mm2=(0.0, 1.0))
    with pytest.raises(ValueError, match="detector_shift_px"):
        aug.CalibrationPerturbation(detector_shift_px=(1.0,))
    with pytest.raises(DataError, match="2D"):
        aug.apply_realism(np.zeros((2, 2, 2)), aug.RealismParams(gamma=1.1), 0.5)
    ranges = aug.CalibrationErrorRanges(rotation_deg=1.0, translation_mm=2.0, detector_shift_px=0.5)
    draws = [aug.sample_calibration_perturbation(np.random.default_rng(i), ranges) for i in range(20)]
    assert all(max(map(abs, d.rotation_deg)) <= 1.0 and max(map(abs, d.translation_mm)) <= 2.0 for d in draws)
    assert aug.sample_calibration_perturbation(np.random.default_rng(0)).is_identity


# ----------------------------------------------------------------------------------------------
# Slow: worker processes and the command line on the real bones
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_worker_count_does_not_change_the_bytes(tmp_path, femur_model):
    serial = _generate(tmp_path / "serial", femur_model, n=4)
    parallel = ds.generate_dataset(tmp_path / "parallel", 4, _tiny_grid(), "generalised", seed=7, workers=2,
                                   femurs=FEMURS, models=_models(femur_model), config=_config())
    a = ds.load_manifest(serial.parent)["samples"]
    b = ds.load_manifest(parallel.parent)["samples"]
    assert [(s["file"], s["sha256"]) for s in a] == [(s["file"], s["sha256"]) for s in b]


@pytest.mark.slow
def test_synth_command_line_on_the_shared_bones(tmp_path):
    from inference import cli

    out = tmp_path / "synth"
    status = cli.run(["synth", "--out", str(out), "--subjects", "3", "--grid", "compact", "--geometry",
                      "generalised", "--seed", "1", "--workers", "2", "--quiet"], extra=_extra_commands())
    assert status == 0
    manifest = ds.load_manifest(out)
    assert manifest["complete"] and len(manifest["samples"]) == 3
    for entry in manifest["samples"]:
        sample = ds.load_sample(out / entry["file"], verify_sha256=entry["sha256"])
        assert sample["images"].shape == (2, 80, 112) and sample["masks"].sum() > 100


def _extra_commands():
    """The data subcommands, unless inference.cli already registers them."""
    from inference import cli
    from inference.data import cli_data

    return [] if "inference.data.cli_data" in cli.SUBCOMMAND_MODULES else [cli_data.add_parser]


def test_wide_generalised_views_keep_pairs_near_orthogonal_when_asked():
    """--angle-range-deg 50 --max-skew-deg 50: each view within 50 deg of AP/LAT, each pair 40-140 apart."""
    centre = np.zeros(3)
    wide = ds.ViewSampling(mode="generalised", angle_range_deg=50.0, max_skew_deg=50.0)
    free = ds.ViewSampling(mode="generalised", angle_range_deg=50.0)
    kept, mirrored = [], 0
    for seed in range(300):
        _, angles = ds.sample_views(np.random.default_rng(seed), wide, centre)
        _, unlimited = ds.sample_views(np.random.default_rng(seed), free, centre)
        assert abs(angles[0]) <= 50 and abs(angles[1] - 90) <= 50 and angles[0] == unlimited[0]
        assert 40 - 1e-9 <= angles[1] - angles[0] <= 140 + 1e-9
        mirrored += angles[1] != unlimited[1]
        kept.append(angles[1] - angles[0])
    # Without the limit about a quarter of the pairs would be more than 50 deg from orthogonal.
    assert 40 < mirrored < 120 and min(kept) < 50 and max(kept) > 130
    # The default keeps every draw (and the manifests of data sets made before the option).
    assert "max_skew_deg" not in ds.ViewSampling(mode="generalised").to_dict()
    assert wide.to_dict()["max_skew_deg"] == 50.0
    with pytest.raises(ConfigError, match="max_skew_deg"):
        ds.ViewSampling(max_skew_deg=95.0)


def test_synth_refuses_a_wide_range_without_generalised_views(tmp_path, capsys):
    from app import cli as app_cli

    assert app_cli.main(["synth", "--out", str(tmp_path / "d"), "--subjects", "1", "--angle-range-deg", "50"]) == 2
    assert "--geometry generalised" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_shaft_width_range_draws_from_its_own_stream():
    """A shaft-width range adds the factor and changes no other draw of a sample."""
    plain = ds.PhantomSampling(max_translation_mm=10.0)
    wide = ds.PhantomSampling(max_translation_mm=10.0, shaft_width_range=(0.9, 1.1))
    factors = []
    for index in range(40):
        rngs, again = ds._sample_rngs(7, index), ds._sample_rngs(7, index)
        a = plain.sample(rngs["phantom"], rngs["shape"])
        b = wide.sample(again["phantom"], again["shape"])
        assert dataclasses.replace(b, shape=dataclasses.replace(b.shape, shaft_width_factor=1.0)) == a
        factors.append(b.shape.shaft_width_factor)
    assert 0.9 <= min(factors) < 0.95 and 1.05 < max(factors) <= 1.1
    # The streams that existed before the shape stream was added are unchanged.
    old = np.random.SeedSequence([7, 3]).spawn(4)
    rngs = ds._sample_rngs(7, 3)
    for name, child in zip(("phantom", "views", "realism", "calibration"), old):
        assert rngs[name].integers(0, 2**62) == np.random.default_rng(child).integers(0, 2**62)
    # Manifests: the range is recorded when set, absent when off (earlier manifests unchanged).
    assert "shaft_width_range" not in plain.to_dict() and wide.to_dict()["shaft_width_range"] == [0.9, 1.1]
    for bad in ((1.1, 0.9), (0.5, 1.0), ("a", 1.0)):
        with pytest.raises((ConfigError, ValueError), match="shaft"):
            ds.PhantomSampling(shaft_width_range=bad)
    with pytest.raises(ConfigError, match="shape augmentation"):
        ds.PhantomSampling(shape=False, shaft_width_range=(0.9, 1.1))


def test_synth_shaft_width_range_reaches_the_phantoms(tmp_path, capsys):
    from app import cli as app_cli
    from inference import cli

    out = tmp_path / "synth"
    assert cli.run(["synth", "--out", str(out), "--subjects", "1", "--grid", "compact", "--seed", "3",
                    "--workers", "1", "--shaft-width-range", "1.12", "1.12", "--quiet"], extra=_extra_commands()) == 0
    manifest = ds.load_manifest(out)
    assert manifest["parameters"]["config"]["phantom"]["shaft_width_range"] == [1.12, 1.12]
    assert manifest["samples"][0]["phantom_params"]["shape"]["shaft_width_factor"] == 1.12
    # Out of the mode's limits: one line, exit status 2, nothing written
    assert app_cli.main(["synth", "--out", str(tmp_path / "d"), "--subjects", "1",
                         "--shaft-width-range", "0.6", "1.0"]) == 2
    assert "shaft_width_range" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
