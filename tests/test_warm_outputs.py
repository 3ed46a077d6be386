"""The fast warm registration path gives the outputs of the plain one (issue 15 finding 9, issue 20).

* the sparse full-resolution warp on a real registration (the demo, and a left femur) against
  the dense method: label maps with Dice >= 0.999 and measurements within 0.05 mm;
* the workstation's results built from the arrays the registration wrote equal those read back
  from its files;
* ONNX Runtime's session options.
"""

from __future__ import annotations

import functools
import pathlib

import numpy as np
import pytest

from inference import geometry, io
from tests.register_helpers import assert_equivalent_outputs

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_results_built_from_the_written_arrays_equal_those_read_from_the_files(tmp_path):
    from app.session import load_result
    from inference import silhouettes
    from inference.pipeline import OutputArrays
    from inference.surface import label_surface, write_surface_stl

    # a grid whose origin and spacing are not float32 numbers: the files round them
    grid = geometry.VolumeGeometry((18, 16, 20), (0.6639999747276306 + 1e-9, 0.7, 1.0),
                                   (-155.08085631, -53.5833664, -161.376922))
    zz, yy, xx = np.indices(grid.shape_zyx)
    labels = np.zeros(grid.shape_zyx, np.uint8)
    labels[(zz - 9) ** 2 + (yy - 7.5) ** 2 + (xx - 10) ** 2 < 25] = 1
    labels[:2] = 2
    volume = np.random.default_rng(0).normal(0, 300, grid.shape_zyx).astype(np.float32)
    mesh = label_surface(labels, grid)
    overlay = np.random.default_rng(1).integers(0, 255, (30, 40, 3), dtype=np.uint8)
    outline = silhouettes.Silhouette("AP", (30, 40), (np.array([[5.0, 10.0], [30.0, 10.0], [30.0, 12.0], [5.0, 10.0]]),))
    files = {"femur_labels": io.write_volume(tmp_path / "femur_labels.nii.gz", labels, grid, dtype=np.uint8),
             "warped_atlas": io.write_volume(tmp_path / "warped_atlas.nii.gz", volume, grid, dtype=np.float32),
             "femur_surface": write_surface_stl(tmp_path / "femur_surface.stl", mesh),
             "overlay_AP": io.write_png_atomic(tmp_path / "overlay_AP.png", overlay),
             "silhouette_AP": silhouettes.write_silhouette(tmp_path / silhouettes.file_name("AP"), outline)}
    common = dict(measurements={"head_radius_mm": 24.0}, landmarks_mm={"head_centre": [1.0, 2.0, 3.0]},
                  warnings=["w"], report={"side": "right"}, files=files, view_names=["AP", "LAT"])
    read = load_result(tmp_path, **common)
    given = load_result(tmp_path, **common, arrays=OutputArrays(labels, grid, volume, mesh, {"AP": overlay}))
    np.testing.assert_array_equal(given.labels, read.labels)
    np.testing.assert_array_equal(given.volume, read.volume)
    assert given.grid == read.grid
    # the same triangles in the same order, corners in float32 as STL stores them (reading the
    # file numbers the shared vertices in its own order)
    np.testing.assert_array_equal(given.surface_vertices[given.surface_faces],
                                  read.surface_vertices[read.surface_faces])
    assert given.contours.keys() == read.contours.keys() == {"AP"}
    for given_line, read_line in zip(given.contours["AP"], read.contours["AP"], strict=True):
        np.testing.assert_array_equal(given_line, read_line)
    assert given.files == read.files
    assert (given.measurements, given.landmarks_mm, given.warnings) == (read.measurements, read.landmarks_mm,
                                                                        read.warnings)


def test_onnx_runtime_runs_on_two_threads_that_do_not_spin():
    onnxruntime = pytest.importorskip("onnxruntime")
    import os

    from inference import backends

    options = backends.session_options(onnxruntime)
    assert options.intra_op_num_threads == min(2, os.cpu_count())
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert options.graph_optimization_level == onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL


def _register_fast_and_dense(case_dir, out_root, monkeypatch):
    """The case registered twice with one loaded network: as shipped, and with the dense warp."""
    from inference import backends, fullres, pipeline

    net = backends.load_backend(None, "auto")
    fast = pipeline.run_to_completion(pipeline.register_case(case_dir, out_root / "fast", model=net))
    with monkeypatch.context() as patch:
        patch.setattr(fullres, "warp_fine", functools.partial(fullres.warp_fine, dense=True))
        dense = pipeline.run_to_completion(pipeline.register_case(case_dir, out_root / "dense", model=net))
    assert fast.report["output_resolution"]["grid"] == fullres.FINE_ATLAS
    return fast, dense


@pytest.mark.slow
def test_the_demo_registers_as_with_the_dense_warp(tmp_path, monkeypatch):
    fast, dense = _register_fast_and_dense(ROOT / "resources" / "demo", tmp_path, monkeypatch)
    assert_equivalent_outputs(dense.out_dir, dense.measurements, fast.out_dir, fast.measurements)


@pytest.mark.slow
def test_a_left_femur_registers_as_with_the_dense_warp(tmp_path, tmp_path_factory, monkeypatch):
    from tests.register_helpers import OBLIQUE_LEFT_DEG, simulated_case

    case = simulated_case(tmp_path_factory.getbasetemp(), side="left", seed=11, angles_deg=OBLIQUE_LEFT_DEG)
    fast, dense = _register_fast_and_dense(case.case_dir, tmp_path, monkeypatch)
    assert fast.measurements["side"] == "left"
    assert_equivalent_outputs(dense.out_dir, dense.measurements, fast.out_dir, fast.measurements)
