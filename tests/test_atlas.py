"""Tests of inference.data.atlas: the shipped atlas files, build/load round trip, checksums."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from scipy import ndimage

from inference.data import phantom as ph
from inference.data.atlas import GRID_SPECS, REFERENCE_SUBJECT, build_atlas, grid_geometry, load_atlas
from inference.errors import DataError, InputFileError

from test_phantom import HEAD_R, synthetic_model  # noqa: F401 (pytest fixture reused here)


@pytest.mark.parametrize("grid_name", sorted(GRID_SPECS))
def test_shipped_atlas_matches_grid_spec_and_landmarks_lie_in_the_femur(grid_name):
    atlas = load_atlas(grid_name)
    grid = grid_geometry(grid_name)
    assert atlas.volume.shape == grid.shape_zyx == tuple(GRID_SPECS[grid_name]["shape_zyx"])
    assert atlas.volume.dtype == np.float32 and atlas.labels.dtype == np.uint8
    np.testing.assert_allclose(atlas.geometry.spacing_xyz_mm, GRID_SPECS[grid_name]["spacing_xyz_mm"], atol=1e-6)
    np.testing.assert_allclose(atlas.geometry.index_to_world(), grid.index_to_world(), atol=1e-4)
    assert atlas.provenance["subject"] == REFERENCE_SUBJECT
    assert set(np.unique(atlas.labels)) <= {0, 1, 2} and (atlas.labels == 1).sum() > 1000
    # Grid placement: the head centre is the world origin, 20 mm medial / 55 mm above the centre.
    np.testing.assert_allclose(atlas.landmarks["head_centre"], 0.0, atol=1e-6)
    assert 18.0 < atlas.head_radius_mm < 30.0
    # Landmarks lie inside the femur label; trochanter tips are surface points, so one voxel of
    # tolerance (dilation) for all.
    femur = ndimage.binary_dilation(atlas.labels == 1, iterations=1)
    w2i = atlas.geometry.world_to_index()
    inside_grid = set()
    for name, point in atlas.landmarks.items():
        i, j, k = np.round(w2i[:3, :3] @ point + w2i[:3, 3]).astype(int)
        if not (0 <= k < femur.shape[0] and 0 <= j < femur.shape[1] and 0 <= i < femur.shape[2]):
            continue  # the distal shaft point may lie below the grid (it only defines the axis)
        inside_grid.add(name)
        assert femur[k, j, i], f"{name} at {point} is not in the femur label"
    assert {"head_centre", "neck_point", "lesser_trochanter", "greater_trochanter",
            "shaft_point_proximal"} <= inside_grid
    # Interior points are deep inside.
    for name in ("head_centre", "neck_point"):
        i, j, k = np.round(w2i[:3, :3] @ atlas.landmarks[name] + w2i[:3, 3]).astype(int)
        assert atlas.labels[k, j, i] == 1
    # Tissue sanity: bone in the head, soft tissue around, no noise (smooth atlas).
    i, j, k = np.round(w2i[:3, 3]).astype(int)  # world origin = head centre
    assert 150 < atlas.volume[k, j, i] < 600
    assert np.isclose(np.linalg.norm(atlas.directions["shaft"]), 1.0)
    assert atlas.volume.max() <= 1800 and atlas.volume.min() >= -1000.5


def test_atlas_files_are_small():
    from inference.data.atlas import atlas_root

    load_atlas("compact")  # loads and verifies the checksums

    sizes = {g: sum(p.stat().st_size for p in (atlas_root() / g).iterdir()) for g in GRID_SPECS}
    assert sizes["compact"] < 1_000_000
    assert sizes["paper"] < 8_000_000


def test_build_then_load_round_trip(tmp_path, synthetic_model):  # noqa: F811
    progress = []
    folder = build_atlas("compact", tmp_path, subject=synthetic_model, progress=lambda f, m: progress.append(f))
    assert folder == tmp_path / "compact" and progress[-1] == 1.0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers
    atlas = load_atlas("compact", tmp_path)
    expected = ph.make_phantom(synthetic_model, ph.PhantomParams(tissue=ph.TissueParams(
        noise_sigma_hu=0.0, envelope_variation_mm=0.0, soft_tissue_variation_hu=0.0, trabecular_contrast=0.0)),
        grid_geometry("compact"))
    np.testing.assert_array_equal(atlas.volume, expected.ct_hu)
    np.testing.assert_array_equal(atlas.labels, expected.labels)
    assert atlas.head_radius_mm == pytest.approx(HEAD_R)
    np.testing.assert_allclose(atlas.landmarks["lesser_trochanter"], expected.landmarks_mm["lesser_trochanter"])
    meta = json.loads((folder / "atlas.json").read_text())
    assert meta["subject"] == "synthetic:right" and meta["creation"]["tissue_noise"] == "off"
    # Rebuilding replaces the folder atomically and leaves a loadable atlas.
    build_atlas("compact", tmp_path, subject=synthetic_model)
    assert load_atlas("compact", tmp_path).volume.shape == (96, 64, 96)


def test_damaged_or_missing_atlas_is_reported(tmp_path, synthetic_model):  # noqa: F811
    with pytest.raises(InputFileError, match="no atlas"):
        load_atlas("compact", tmp_path)
    build_atlas("compact", tmp_path, subject=synthetic_model)
    target = tmp_path / "compact" / "labels.nii.gz"
    data = bytearray(target.read_bytes())
    data[-20] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(InputFileError, match="checksum"):
        load_atlas("compact", tmp_path)
    (tmp_path / "compact" / "landmarks.json").unlink()
    with pytest.raises(InputFileError, match="missing"):
        load_atlas("compact", tmp_path)
    with pytest.raises(DataError, match="unknown atlas grid"):
        grid_geometry("huge")


def test_copied_shipped_atlas_loads_from_another_root(tmp_path):
    from inference.data.atlas import atlas_root

    shutil.copytree(atlas_root() / "compact", tmp_path / "compact")
    a = load_atlas("compact", tmp_path)
    b = load_atlas("compact")
    np.testing.assert_array_equal(a.volume, b.volume)
