"""The shift ensemble (inference.ensemble): exact index arithmetic, averaging, and register_case with it."""

from __future__ import annotations

import numpy as np
import pytest

from inference import ensemble, geometry, pipeline
from inference.errors import Cancelled, ConfigError

import register_helpers as rh


def _rotated_grid() -> geometry.VolumeGeometry:
    angle = np.deg2rad(20.0)
    direction = np.array([[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0], [0, 0, 1.0]])
    return geometry.VolumeGeometry.centered((6, 7, 8), (1.5, 1.25, 2.0), (10.0, -20.0, 30.0), direction)


@pytest.mark.parametrize("shift", [(1, 1, 1), (-1, 1, -1), (0, -2, 3)])
def test_a_shifted_grid_index_is_the_reference_index_plus_the_shift(shift):
    grid = _rotated_grid()
    moved = ensemble.shifted_grid(grid, shift)
    j_xyz = np.array([2.0, 3.0, 1.0])
    world_moved = moved.index_to_world() @ np.r_[j_xyz, 1.0]
    world_reference = grid.index_to_world() @ np.r_[j_xyz + np.asarray(shift, float)[::-1], 1.0]
    np.testing.assert_allclose(world_moved, world_reference, atol=1e-9)
    assert moved.shape_zyx == grid.shape_zyx and moved.spacing_xyz_mm == grid.spacing_xyz_mm


def _consistent_fields(shape, shifts):
    """Fields a perfectly consistent network would give on each shifted grid: the same smooth map
    from patient points to atlas coordinates, a(i) = A i + b + a wave (i: reference index, z y x)."""
    rng = np.random.default_rng(0)
    matrix = np.eye(3) + 0.05 * rng.standard_normal((3, 3))
    offset = rng.uniform(-2, 2, 3)

    def atlas_coordinate(index):
        return index @ matrix.T + offset + 0.7 * np.sin(index[..., ::-1] / 3.0)

    own = np.indices(shape, dtype=float).transpose(1, 2, 3, 0)
    return [(atlas_coordinate(own + np.asarray(k, float)) - own).astype(np.float32) for k in shifts]


def test_fields_of_a_consistent_network_agree_on_the_reference_grid():
    shape = (9, 10, 11)
    shifts = [(0, 0, 0), *ensemble.DEFAULT_SHIFTS_ZYX, (0, 2, -3)]
    fields = _consistent_fields(shape, shifts)
    reference = fields[0]
    for field, shift in zip(fields, shifts):
        moved = ensemble.field_on_reference(field, shift)
        covered = ~np.isnan(moved[..., 0])
        # exactly the slab of the reference grid the shifted grid does not reach is uncovered
        expected = np.ones(shape, bool)
        for axis, k in enumerate(shift):
            index = [slice(None)] * 3
            index[axis] = slice(0, k) if k > 0 else slice(shape[axis] + k, shape[axis])
            expected[tuple(index)] = False
        np.testing.assert_array_equal(covered, expected)
        np.testing.assert_allclose(moved[covered], reference[covered], atol=1e-5)
    combined = ensemble.combine([ensemble.field_on_reference(f, s) for f, s in zip(fields, shifts)], (2.0, 1.5, 1.5))
    assert combined.passes == len(shifts)
    np.testing.assert_allclose(combined.psi, reference, atol=1e-5)
    assert float(combined.spread_mm.max()) < 1e-4


def test_combine_averages_where_covered_and_reports_the_spread_in_mm():
    shape = (4, 5, 6)
    a = np.zeros(shape + (3,), np.float32)
    b = np.full(shape + (3,), np.nan, np.float32)
    b[1:] = np.array([2.0, 0.0, 0.0], np.float32)  # z displacement 2 voxels, missing on slice 0
    result = ensemble.combine([a, b], spacing_zyx_mm=(3.0, 1.0, 1.0))
    np.testing.assert_allclose(result.psi[0], 0.0)
    np.testing.assert_allclose(result.psi[1:, ..., 0], 1.0)
    # each pass is 1 voxel = 3 mm from the mean in z
    np.testing.assert_allclose(result.spread_mm[1:], 3.0, rtol=1e-6)
    np.testing.assert_allclose(result.spread_mm[0], 0.0)
    with pytest.raises(ValueError, match="first"):
        ensemble.combine([b, a], (1.0, 1.0, 1.0))
    entry = ensemble.report_entry(result, [(1, 0, 0)], femur=np.ones(shape, bool))
    assert entry["passes"] == 2 and entry["shifts_voxels_zyx"] == [[1, 0, 0]]
    assert entry["spread_mm"]["median"] == pytest.approx(3.0, rel=1e-6)
    assert ensemble.report_entry(None, ()) == {"passes": 1}


def test_warped_labels_pull_back_with_the_nearest_voxel():
    labels = np.zeros((5, 6, 7), np.uint8)
    labels[2, 3, 4] = 1
    labels[1, 1, 1] = 2
    psi = np.zeros(labels.shape + (3,), np.float32)
    np.testing.assert_array_equal(ensemble.warped_labels(labels, psi), labels)
    psi[..., 2] = 1.2  # every voxel takes the label one voxel further along x (rounded)
    warped = ensemble.warped_labels(labels, psi)
    assert warped[2, 3, 3] == 1 and warped[1, 1, 0] == 2 and warped.sum() == 3
    assert not warped[..., -1].any()  # pulled from beyond the grid: background


def test_the_default_follows_the_environment(monkeypatch):
    monkeypatch.setenv(ensemble.ENV_VAR, "off")
    assert ensemble.default_ensemble() is False
    monkeypatch.setenv(ensemble.ENV_VAR, "ON")
    assert ensemble.default_ensemble() is True
    monkeypatch.delenv(ensemble.ENV_VAR)
    assert ensemble.default_ensemble() is True
    assert ensemble.default_ensemble(models=2) is False  # several models averaged: no shifts
    monkeypatch.setenv(ensemble.ENV_VAR, "auto")
    assert ensemble.default_ensemble(1) is True and ensemble.default_ensemble(2) is False
    monkeypatch.setenv(ensemble.ENV_VAR, "on")
    assert ensemble.default_ensemble(2) is True
    monkeypatch.setenv(ensemble.ENV_VAR, "sometimes")
    with pytest.raises(ConfigError, match="HIPATLAS_ENSEMBLE"):
        ensemble.default_ensemble()


def test_register_with_the_ensemble_runs_five_passes_and_reports_their_spread(left_case_and_model, tmp_path):
    sim, model_path = left_case_and_model
    progress = []
    result = pipeline.run_to_completion(pipeline.register_case(
        sim.case_dir, tmp_path / "out", model=model_path, refine=False, full_resolution=False, ensemble=True),
        on_progress=progress.append)
    entry = result.report["ensemble"]
    assert entry["passes"] == 5 and entry["shifts_voxels_zyx"] == [list(s) for s in ensemble.DEFAULT_SHIFTS_ZYX]
    assert 0.0 <= entry["spread_mm"]["median"] <= entry["spread_mm"]["p95"]
    assert [p.message for p in progress if "pass" in p.message] == [
        f"Registering atlas (pass {n} of 5)" for n in range(2, 6)]
    fractions = [p.fraction for p in progress]
    assert fractions == sorted(fractions)
    single = pipeline.run_to_completion(pipeline.register_case(
        sim.case_dir, tmp_path / "single", model=model_path, refine=False, full_resolution=False, ensemble=False))
    assert single.report["ensemble"] == {"passes": 1}
    # the averaged femur is a femur near the single pass's (an untrained model: loosely)
    ours = result.arrays.labels == 1
    theirs = single.arrays.labels == 1
    assert ours.any() and rh.dice(ours, theirs) > 0.8


def test_the_ensemble_can_be_cancelled_between_passes(left_case_and_model, tmp_path):
    sim, model_path = left_case_and_model
    seen = []

    def cancel():
        return any("pass 3" in p for p in seen)

    steps = pipeline.register_case(sim.case_dir, tmp_path / "out", model=model_path, refine=False,
                                   full_resolution=False, ensemble=True, cancel=cancel)
    with pytest.raises(Cancelled):
        pipeline.run_to_completion(steps, on_progress=lambda p: seen.append(p.message))
    assert any("pass 3" in p for p in seen) and not any("pass 4" in p for p in seen)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("tensorflow_loaded", [False, True])
def test_a_forced_refinement_preloads_tensorflow_only_after_the_first_pass(monkeypatch, tensorflow_loaded):
    """With a network that runs without TensorFlow, its import starts after the first pass (when this
    thread has imported what it needs), never while TensorFlow is already there."""
    import sys
    import types

    from inference import refine

    calls = []
    monkeypatch.setattr(refine, "preload_tensorflow", lambda: calls.append("preload") or "thread")
    if not tensorflow_loaded:
        monkeypatch.delitem(sys.modules, "tensorflow", raising=False)
    else:
        monkeypatch.setitem(sys.modules, "tensorflow", sys.modules.get("tensorflow", types.ModuleType("tensorflow")))

    class Net:
        def run(self, inputs):
            calls.append("pass")
            return {"psi": np.zeros((1, 3, 4, 5, 3), np.float32), "warped_labels": np.ones((1, 3, 4, 5, 1), np.float32)}

    job = pipeline._Job(case=None, frame=None, masks=[], mask_sources=[])
    network = types.SimpleNamespace(images=[np.zeros((2, 2))] * 2, masks=[np.zeros((2, 2))] * 2,
                                    projections=[np.zeros((3, 4))] * 2)
    grid = geometry.VolumeGeometry.centered((3, 4, 5), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    psi, labels, entry = pipeline.run_to_completion(pipeline._run_network(
        job, Net(), None, network, grid, ensemble=False, cancel=None, preload_tensorflow=True))
    assert labels.all() and entry == {"passes": 1}
    assert calls == (["pass"] if tensorflow_loaded else ["pass", "preload"])
    assert job.tensorflow_import == (None if tensorflow_loaded else "thread")


@pytest.mark.parametrize("concurrent_runs", [1, 2])
def test_a_consistent_network_gives_the_same_field_with_and_without_the_ensemble(left_case_and_model, tmp_path, concurrent_runs):
    """A stand-in network that maps every patient point to the same atlas coordinate however the grid
    is placed: the ensemble's mean is its single pass exactly, passes run concurrently or not."""
    import threading
    import types

    from inference.data import atlas as atlas_lib

    sim, _ = left_case_and_model
    atlas = atlas_lib.load_atlas("compact")
    job = pipeline._load_job(sim.case_dir, tmp_path / "out", False, None)
    head = pipeline._locate_head(job)
    grid, network = pipeline._network_views(job, atlas, head, (80, 112))
    world_to_reference = np.linalg.inv(grid.index_to_world())
    shape = grid.shape_zyx
    own = np.indices(shape, dtype=float).reshape(3, -1)[::-1]  # x, y, z indices
    threads = []

    class Net:
        config = types.SimpleNamespace(detector_hw=(80, 112))

        def run(self, inputs):
            threads.append(threading.current_thread().name)
            world = inputs["index_to_world"][0].astype(float) @ np.vstack([own, np.ones(own.shape[1])])
            reference = (world_to_reference @ world)[:3]
            atlas_xyz = reference + 0.8 * np.sin(world[:3] / 15.0)
            psi = (atlas_xyz - own)[::-1].T.reshape(shape + (3,))
            return {"psi": psi[None].astype(np.float32),
                    "warped_labels": np.ones((1, *shape, 1), np.float32)}

    net = Net()
    net.concurrent_runs = concurrent_runs
    single, _, _ = pipeline.run_to_completion(pipeline._run_network(job, net, atlas, network, grid, False, None))
    progress = []
    psi, labels, entry = pipeline.run_to_completion(
        pipeline._run_network(job, net, atlas, network, grid, True, None), on_progress=progress.append)
    np.testing.assert_allclose(psi, single, atol=2e-4)
    assert entry["passes"] == 5 and entry["spread_mm"]["p95"] < 1e-3
    assert [p.message for p in progress] == [f"Registering atlas (pass {n} of 5)" for n in range(2, 6)]
    pool_threads = [name for name in threads if name.startswith("hipatlas-ensemble")]
    assert len(pool_threads) == (4 if concurrent_runs > 1 else 0)


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_run_passes_returns_results_in_order_and_stops_when_told(workers):
    import time

    def run_pass(shift):
        time.sleep(0.02 * (3 - shift[0]))  # later passes end sooner
        return np.full(1, shift[0])

    shifts = [(0, 0, 0), (1, 0, 0), (2, 0, 0), (3, 0, 0)]
    steps = ensemble.run_passes(run_pass, shifts, workers, lambda: None)
    done = []
    while True:
        try:
            done.append(next(steps))
        except StopIteration as stop:
            results = stop.value
            break
    assert done == [1, 2, 3, 4] and [int(r[0]) for r in results] == [0, 1, 2, 3]

    class Stop(Exception):
        pass

    seen = []

    def check():
        if len(seen) >= 2:
            raise Stop

    steps = ensemble.run_passes(run_pass, shifts, workers, check)
    with pytest.raises(Stop):
        for count in steps:
            seen.append(count)
    assert seen == [1, 2]
