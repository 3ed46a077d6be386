"""tools/compare_outputs.py: are two registration output folders bit-identical where they must be?"""

from __future__ import annotations

import json
import pathlib
import shutil
import sys

import numpy as np

from inference import io
from inference.geometry import VolumeGeometry

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tools"))
import compare_outputs  # noqa: E402


def _outputs(folder: pathlib.Path, seed: int = 0) -> pathlib.Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    grid = VolumeGeometry((6, 5, 4), (1.0, 1.5, 2.0), (-3.0, 4.0, 10.0), np.eye(3))
    io.write_volume(folder / "femur_labels.nii.gz", (rng.random((6, 5, 4)) > 0.5).astype(np.uint8), grid,
                    dtype=np.uint8)
    io.write_json_atomic(folder / "measurements.json", {"side": "left", "hip_centre_mm": [1.0, 2.0, 3.000000001]})
    io.write_json_atomic(folder / "report.json", {"created": "2026-01-01", "timings_s": {"total_s": 1.0},
                                                  "model": {"name": "m", "path": str(folder)}, "warnings": []})
    io.write_png_atomic(folder / "overlay_AP.png", rng.integers(0, 255, (8, 9, 3), dtype=np.uint8))
    (folder / "femur_surface.stl").write_bytes(b"solid femur")
    return folder


def test_identical_runs_pass_and_clock_times_do_not_count(tmp_path):
    before = _outputs(tmp_path / "before")
    after = tmp_path / "after"
    shutil.copytree(before, after)
    report = json.loads((after / "report.json").read_text())
    report.update(created="2026-02-02", timings_s={"total_s": 9.0}, model={"name": "m", "path": "/elsewhere"})
    io.write_json_atomic(after / "report.json", report)
    (after / "silhouette_AP.json").write_text("{}")
    io.write_png_atomic(after / "overlay_AP.png", np.zeros((8, 9, 3), np.uint8))  # pictures may differ
    result = compare_outputs.compare(before, after)
    assert result["identical"] and result["only_after"] == ["silhouette_AP.json"]
    assert result["checks"]["overlay_AP.png"]["pixels_differing"] > 0
    assert compare_outputs.main([str(before), str(after)]) == 0


def test_one_voxel_one_float_or_one_warning_is_a_difference(tmp_path):
    before = _outputs(tmp_path / "before")
    after = tmp_path / "after"
    shutil.copytree(before, after)
    labels, grid = io.read_volume(after / "femur_labels.nii.gz")
    labels[2, 3, 1] = 1 - labels[2, 3, 1]
    io.write_volume(after / "femur_labels.nii.gz", labels, grid, dtype=np.uint8)
    io.write_json_atomic(after / "measurements.json", {"side": "left", "hip_centre_mm": [1.0, 2.0, 3.0]})
    io.write_json_atomic(after / "report.json", {**json.loads((before / "report.json").read_text()),
                                                 "warnings": ["new"]})
    result = compare_outputs.compare(before, after)
    checks = result["checks"]
    assert not result["identical"]
    assert checks["femur_labels.nii.gz"]["voxels_differing"] == 1
    assert checks["measurements.json"]["differences"] == [".hip_centre_mm[2]: 3.000000001 vs 3.0"]
    assert checks["report.json"]["differences"] == [".warnings (length 0 vs 1)"]
    assert checks["overlay_AP.png"]["identical"] and checks["femur_surface.stl"]["identical"]
    assert compare_outputs.main([str(before), str(after), "--json"]) == 1
