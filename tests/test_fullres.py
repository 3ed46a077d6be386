"""Known-answer tests of inference.fullres on tiny synthetic atlases (and the bundled grids)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from inference import fullres
from inference.errors import DataError
from inference.geometry import VolumeGeometry


def _atlases():
    coarse_grid = VolumeGeometry.centered((8, 6, 10), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0))
    fine_grid = VolumeGeometry.centered((16, 12, 20), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    zz, yy, xx = np.indices(fine_grid.shape_zyx)
    labels = np.zeros(fine_grid.shape_zyx, np.uint8)
    labels[(zz - 7.5) ** 2 + (yy - 5.5) ** 2 + (xx - 8.5) ** 2 < 16] = 1
    labels[:2] = 2
    volume = np.where(labels == 1, 800.0, -1000.0).astype(np.float32)
    fine = SimpleNamespace(volume=volume, labels=labels, geometry=fine_grid, grid="fine")
    return coarse_grid, fine


def test_zero_field_reproduces_the_fine_atlas():
    coarse_grid, fine = _atlases()
    out = fullres.warp_fine(fine, np.zeros(coarse_grid.shape_zyx + (3,), np.float32), coarse_grid, coarse_grid)
    np.testing.assert_array_equal(out.labels, fine.labels)
    np.testing.assert_allclose(out.volume_hu, fine.volume, atol=1e-3)
    assert out.grid == fine.geometry


def test_a_shift_of_one_coarse_voxel_moves_the_fine_labels_by_two():
    coarse_grid, fine = _atlases()
    psi = np.zeros(coarse_grid.shape_zyx + (3,), np.float32)
    psi[..., 2] = 1.0  # pull from one coarse voxel further in x
    out = fullres.warp_fine(fine, psi, coarse_grid, coarse_grid)
    np.testing.assert_array_equal(out.labels[:, :, :-2], fine.labels[:, :, 2:])
    assert (out.labels[:, :, -2:] == 0).all()  # beyond the atlas: background


def test_the_fine_grid_follows_the_placement_of_the_coarse_one():
    coarse_grid, fine = _atlases()
    placed = VolumeGeometry.centered(coarse_grid.shape_zyx, coarse_grid.spacing_xyz_mm, (10.0, -5.0, 3.0))
    out = fullres.warp_fine(fine, np.zeros(coarse_grid.shape_zyx + (3,), np.float32), placed, coarse_grid)
    np.testing.assert_allclose(out.grid.center_mm(), [10.0, -5.0, 3.0])
    np.testing.assert_allclose(out.grid.spacing_xyz_mm, (1.0, 1.0, 1.0))


def test_upsampled_displacement_doubles_in_fine_voxels():
    field = np.zeros((4, 4, 4, 3), np.float32)
    field[..., 0] = 0.75
    np.testing.assert_allclose(fullres.upsample_displacement(field), np.broadcast_to([1.5, 0, 0], (8, 8, 8, 3)))


def test_grids_of_different_boxes_are_refused():
    coarse_grid, fine = _atlases()
    shifted = VolumeGeometry.centered(fine.geometry.shape_zyx, (1.0, 1.0, 1.0), (3.0, 0.0, 0.0))
    with pytest.raises(DataError, match="does not cover"):
        fullres.spacing_ratio(coarse_grid, shifted)


def test_the_bundled_paper_atlas_is_twice_as_fine_as_the_compact_one():
    from inference.data import atlas as atlas_lib

    compact = atlas_lib.load_atlas("compact")
    fine = fullres.fine_atlas_for(compact)
    assert fine is not None and fine.grid == "paper"
    np.testing.assert_allclose(fullres.spacing_ratio(compact.geometry, fine.geometry), [2.0, 2.0, 2.0])


def test_numpy_upsampling_equals_the_network_layer():
    """The registration upsamples in numpy (no TensorFlow under ONNX Runtime) exactly as the model's layer."""
    from inference.layers.grid import UpsampleField

    field = np.random.default_rng(4).normal(size=(5, 4, 6, 3)).astype(np.float32)
    expected = np.asarray(UpsampleField()(field[None]))[0]
    np.testing.assert_allclose(fullres.upsample_displacement(field), expected, rtol=1e-6, atol=1e-6)
