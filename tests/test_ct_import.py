"""Tests of inference.data.ct_import (``hipatlas prepare-ct``) on CTs written by the test itself.

The CT is an analytic femur (head sphere, neck, shaft, trochanters; the femur's canonical frame is
the frame it is drawn in) in a body of soft tissue, placed obliquely in a patient world and
written as a small DICOM series with SimpleITK.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
from synthetic_shapes import capsule_sdf
import pytest
import SimpleITK as sitk

from inference import geometry as g
from inference.data import ct_import
from inference.data import dataset as ds
from inference.errors import DataError, InputFileError
from inference.io import write_volume

SPACING = (2.5, 2.5, 3.0)


def femur_sdf(p):
    """Signed distance (mm) to a right femur drawn in its canonical frame (head centre at 0)."""
    head = np.linalg.norm(p, axis=0) - 22
    neck = capsule_sdf(p, [0, 0, 0], [-40, 0, -30], 13)
    shaft = capsule_sdf(p, [-42, 0, -20], [-42, 0, -400], 14)
    greater = np.linalg.norm(p - np.array([[-55.0], [0.0], [-8.0]]), axis=0) - 13
    lesser = np.linalg.norm(p - np.array([[-32.0], [8.0], [-62.0]]), axis=0) - 8
    return np.minimum.reduce([head, neck, shaft, greater, lesser])


def _rotation_z(deg):
    a = np.deg2rad(deg)
    return np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1.0]])


def patient_ct(side="left", angle_deg=12.0, shift_mm=(0.0, 0.0, 0.0)):
    """(HU (z, y, x), labels, geometry, canonical->world 4x4) of a femur placed in a patient world
    (turned by ``angle_deg`` about z and moved by ``shift_mm`` from the standard place)."""
    mirror = np.diag([-1.0 if side == "left" else 1.0, 1.0, 1.0])
    to_world = np.eye(4)
    to_world[:3, :3] = _rotation_z(angle_deg) @ mirror
    # the hip of a patient on a table
    to_world[:3, 3] = np.array([95.0 if side == "left" else -95.0, 20.0, 800.0]) + np.asarray(shift_mm)
    # CT grid: oblique axes (scanner gantry tilt about x) around the proximal femur
    direction = np.array([[1.0, 0, 0], [0, np.cos(0.15), -np.sin(0.15)], [0, np.sin(0.15), np.cos(0.15)]])
    centre = to_world[:3, :3] @ np.array([-25.0, 0.0, -60.0]) + to_world[:3, 3]
    geometry = g.VolumeGeometry.centered((68, 40, 56), SPACING, centre, tuple(map(tuple, direction)))
    kk, jj, ii = np.meshgrid(*[np.arange(n) for n in geometry.shape_zyx], indexing="ij")
    ijk = np.stack([ii.ravel(), jj.ravel(), kk.ravel()]).astype(float)
    world = geometry.index_to_world()[:3, :3] @ ijk + geometry.index_to_world()[:3, 3:4]
    canonical = np.linalg.inv(to_world)[:3, :3] @ world + np.linalg.inv(to_world)[:3, 3:4]
    sdf = femur_sdf(canonical).reshape(geometry.shape_zyx)
    body = np.linalg.norm((canonical - np.array([[-30.0], [0.0], [0.0]]))[:2] / np.array([[70.0], [55.0]]), axis=0)
    hu = np.where(body.reshape(geometry.shape_zyx) < 1.0, 40.0, -1000.0)
    hu = np.where(sdf < 0, 900.0, hu)
    return hu.astype(np.int16), (sdf < 0).astype(np.uint8), geometry, to_world


def write_dicom_series(folder: pathlib.Path, hu: np.ndarray, geometry: g.VolumeGeometry) -> pathlib.Path:
    folder.mkdir(parents=True)
    image = geometry.to_sitk(hu.astype(np.int16))
    direction = np.asarray(geometry.direction)
    orientation = "\\".join(f"{v:.10f}" for v in (*direction[:, 0], *direction[:, 1]))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(hu.shape[0]):
        slice_image = image[:, :, k]
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        tags = {"0008|0060": "CT", "0020|000d": "1.2.826.0.1.3680043.2.1125.1", "0020|000e":
                "1.2.826.0.1.3680043.2.1125.2", "0020|0037": orientation,
                "0020|0032": "\\".join(f"{v:.6f}" for v in position), "0020|0013": str(k + 1),
                "0018|0050": f"{SPACING[2]}", "0008|0018": f"1.2.826.0.1.3680043.2.1125.3.{k + 1}"}
        for tag, value in tags.items():
            slice_image.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(slice_image)
    return folder


@pytest.fixture(scope="module")
def left_ct(tmp_path_factory):
    root = tmp_path_factory.mktemp("ct")
    hu, labels, geometry, to_world = patient_ct("left")
    dicom = write_dicom_series(root / "dicom", hu, geometry)
    write_volume(root / "labels.nii.gz", labels, geometry, dtype=np.uint8)
    return {"dicom": dicom, "labels": root / "labels.nii.gz", "hu": hu, "label_map": labels, "geometry": geometry,
            "to_world": to_world, "root": root}


def _tiny_grid():
    geometry = g.VolumeGeometry.centered((32, 22, 32), (4.0, 4.0, 6.0), (-20.0, 0.0, -55.0))
    return ds.DatasetGrid("tiny", geometry, (24, 32))


def _config():
    from inference.data.augment import RealismRanges

    return ds.SynthConfig(realism=RealismRanges(enabled=False))


def test_read_ct_reads_the_dicom_series_in_hu_with_its_geometry(left_ct):
    volume, geometry, sha = ct_import.read_ct(left_ct["dicom"])
    np.testing.assert_array_equal(volume, left_ct["hu"].astype(np.float32))
    np.testing.assert_allclose(geometry.index_to_world(), left_ct["geometry"].index_to_world(), atol=1e-3)
    assert len(sha) == 64


def test_prepare_ct_left_femur_from_dicom(tmp_path, left_ct):
    out = tmp_path / "data"
    manifest_path = ct_import.prepare_ct(left_ct["dicom"], left_ct["labels"], "left", out, grid=_tiny_grid(),
                                         pairs=2, geometry="generalised", seed=3, subject="ct1", config=_config())
    manifest = json.loads(manifest_path.read_text())
    assert manifest["format"] == "hipatlas-dataset/1" and manifest["kind"] == "ct-import"
    assert [s["index"] for s in manifest["samples"]] == [0, 1]
    assert {s["split"] for s in manifest["samples"]} == {"train"} and {s["subject"] for s in manifest["samples"]} == {"ct1"}
    grid = _tiny_grid().geometry
    for entry in manifest["samples"]:
        sample = ds.load_sample(out / entry["file"], verify_sha256=entry["sha256"])
        pose = sample["pose"]
        # the analytic femur is drawn in its canonical frame: the head centre lands at pose @ 0
        np.testing.assert_allclose(sample["landmarks_mm"][0], pose[:3, 3], atol=1.5)
        # the left femur was mirrored to a right one: grid labels match the right analytic femur
        kk, jj, ii = np.meshgrid(*[np.arange(n) for n in grid.shape_zyx], indexing="ij")
        ijk = np.stack([ii.ravel(), jj.ravel(), kk.ravel()]).astype(float)
        world = grid.index_to_world()[:3, :3] @ ijk + grid.index_to_world()[:3, 3:4]
        canonical = np.linalg.inv(pose)[:3, :3] @ world + np.linalg.inv(pose)[:3, 3:4]
        expected = (femur_sdf(canonical) < 0).reshape(grid.shape_zyx)
        # only where the CT covers the grid
        covered = sample["volume"] > -999
        femur = (sample["labels"] == 1) & covered
        dice = 2 * (femur & expected & covered).sum() / (femur.sum() + (expected & covered).sum())
        assert dice > 0.85, dice
        assert sample["volume"][femur].mean() > 600  # bone HU where the label is
        for view in range(2):
            u, v = np.round(g.project_points(sample["projection"][view], sample["landmarks_mm"][:1].astype(float))[0])
            assert sample["masks"][view][int(v), int(u)] == 1
            # bone is brighter than the soft tissue beside it in the DRR
            assert sample["images"][view][sample["masks"][view] == 1].mean() > sample["images"][view].mean()
    assert manifest["samples"][0]["source"]["femur_label"] == 1
    assert not np.allclose(manifest["samples"][0]["view_angles_deg"], [0, 90])


def test_second_ct_appends_and_a_subject_stays_in_one_split(tmp_path, left_ct):
    out = tmp_path / "data"
    kwargs = dict(grid=_tiny_grid(), config=_config())
    ct_import.prepare_ct(left_ct["dicom"], left_ct["labels"], "left", out, subject="ct1", **kwargs)
    ct_import.prepare_ct(left_ct["dicom"], left_ct["labels"], "left", out, subject="ct2", split="val", seed=1,
                         **kwargs)
    samples = ds.load_manifest(out)["samples"]
    assert [(s["index"], s["subject"], s["split"]) for s in samples] == [(0, "ct1", "train"), (1, "ct2", "val")]
    before = sorted(p.name for p in out.rglob("*"))
    with pytest.raises(DataError, match="one split"):
        ct_import.prepare_ct(left_ct["dicom"], left_ct["labels"], "left", out, subject="ct1", split="test", **kwargs)
    assert sorted(p.name for p in out.rglob("*")) == before


def test_bad_inputs_raise_typed_errors_and_write_nothing(tmp_path, left_ct):
    geometry = left_ct["geometry"]
    kwargs = dict(grid=_tiny_grid(), config=_config())
    empty = tmp_path / "empty.nii.gz"
    write_volume(empty, np.zeros_like(left_ct["label_map"]), geometry, dtype=np.uint8)
    with pytest.raises(DataError, match="no voxel with the femur label"):
        ct_import.prepare_ct(left_ct["dicom"], empty, "left", tmp_path / "o1", **kwargs)
    with pytest.raises(DataError, match="femur label 3"):
        ct_import.prepare_ct(left_ct["dicom"], left_ct["labels"], "left", tmp_path / "o1", femur_label=3, **kwargs)

    # labels of a femur somewhere else: nothing of it inside the CT
    far = g.VolumeGeometry(geometry.shape_zyx, geometry.spacing_xyz_mm,
                           tuple(np.asarray(geometry.origin_mm) + [0.0, 0.0, 600.0]), geometry.direction)
    write_volume(tmp_path / "far.nii.gz", left_ct["label_map"], far, dtype=np.uint8)
    with pytest.raises(DataError, match="field of view"):
        ct_import.prepare_ct(left_ct["dicom"], tmp_path / "far.nii.gz", "left", tmp_path / "o1", **kwargs)

    # a CT cut through the femoral head
    hu, labels = left_ct["hu"], left_ct["label_map"]
    cut = 30
    cut_geometry = g.VolumeGeometry((cut, *geometry.shape_zyx[1:]), geometry.spacing_xyz_mm, geometry.origin_mm,
                                    geometry.direction)
    write_volume(tmp_path / "cut.nii.gz", hu[:cut], cut_geometry, dtype=np.int16)
    write_volume(tmp_path / "cut_labels.nii.gz", labels[:cut], cut_geometry, dtype=np.uint8)
    with pytest.raises(DataError):
        ct_import.prepare_ct(tmp_path / "cut.nii.gz", tmp_path / "cut_labels.nii.gz", "left", tmp_path / "o1", **kwargs)

    with pytest.raises(InputFileError):
        ct_import.prepare_ct(tmp_path / "missing.nii.gz", left_ct["labels"], "left", tmp_path / "o1", **kwargs)
    with pytest.raises(InputFileError, match="no DICOM series"):
        ct_import.read_ct(tmp_path)
    assert not (tmp_path / "o1").exists()


def test_prepare_ct_command_line(tmp_path, left_ct):
    from inference import cli

    out = tmp_path / "cli"
    status = cli.run(["prepare-ct", "--ct", str(left_ct["dicom"]), "--labels", str(left_ct["labels"]), "--side",
                      "left", "--out", str(out), "--quiet", "--no-realism"], extra=_extra_commands())
    assert status == 0
    manifest = ds.load_manifest(out)
    assert manifest["grid"]["name"] == "compact" and len(manifest["samples"]) == 1
    sample = ds.load_sample(out / manifest["samples"][0]["file"])
    assert sample["volume"].shape == (96, 64, 96) and sample["images"].shape == (2, 80, 112)
    status = cli.run(["prepare-ct", "--ct", str(left_ct["dicom"]), "--labels", str(tmp_path / "nope.nii.gz"),
                      "--side", "left", "--out", str(tmp_path / "cli2"), "--quiet"], extra=_extra_commands())
    assert status == 2 and not (tmp_path / "cli2").exists()


def _extra_commands():
    """The data subcommands, unless inference.cli already registers them."""
    from inference import cli
    from inference.data import cli_data

    return [] if "inference.data.cli_data" in cli.SUBCOMMAND_MODULES else [cli_data.add_parser]
