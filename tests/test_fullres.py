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


def _smooth_field(shape_zyx, amplitude_vox: float, seed: int) -> np.ndarray:
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    field = np.stack([ndimage.gaussian_filter(rng.normal(size=shape_zyx), 3.0) for _ in range(3)], -1)
    return (amplitude_vox * field / np.abs(field).max()).astype(np.float32)


@pytest.mark.parametrize("amplitude_vox, seed", [(1.5, 0), (6.0, 1)])
def test_the_sparse_warp_equals_the_dense_one_on_a_tiny_atlas(amplitude_vox, seed):
    """Interpolating only next to label or intensity changes gives the dense result, including
    samples pulled from beyond the grid (the larger field) and from its border voxels."""
    coarse_grid, fine = _atlases()
    fine = SimpleNamespace(**{**vars(fine), "volume": fine.volume + np.linspace(0, 50, fine.volume.shape[2],
                                                                                  dtype=np.float32)[None, None] *
                              (fine.labels == 1)})
    psi = _smooth_field(coarse_grid.shape_zyx, amplitude_vox, seed)
    dense = fullres.warp_fine(fine, psi, coarse_grid, coarse_grid, dense=True)
    sparse = fullres.warp_fine(fine, psi, coarse_grid, coarse_grid)
    assert (dense.labels == 1).any() and (dense.labels == 0).any()
    np.testing.assert_array_equal(sparse.labels, dense.labels)
    np.testing.assert_allclose(sparse.femur_soft, dense.femur_soft, atol=1e-6)
    np.testing.assert_allclose(sparse.volume_hu, dense.volume_hu, atol=1e-3)


def test_the_sparse_warp_equals_the_dense_one_on_the_bundled_atlases():
    from inference.data import atlas as atlas_lib

    compact = atlas_lib.load_atlas("compact")
    fine = fullres.fine_atlas_for(compact)
    # a displacement of up to 12 coarse voxels: 6 % of the samples come from beyond the grid
    psi = _smooth_field(compact.geometry.shape_zyx, 12.0, 7)
    dense = fullres.warp_fine(fine, psi, compact.geometry, compact.geometry, dense=True)
    sparse = fullres.warp_fine(fine, psi, compact.geometry, compact.geometry)
    assert set(np.unique(dense.labels)) == {0, 1, 2}
    np.testing.assert_array_equal(sparse.labels, dense.labels)
    np.testing.assert_allclose(sparse.femur_soft, dense.femur_soft, atol=1e-6)
    np.testing.assert_allclose(sparse.volume_hu, dense.volume_hu, atol=1e-3)


def test_warps_through_the_reused_workspace_equal_fresh_ones_and_keep_their_results():
    """warp_fine's scratch arrays are reused (fullres.WORKSPACE): a warp through it is bitwise
    the warp with fresh arrays, a later warp leaves an earlier result alone, and a warp that
    finds the workspace busy (another thread's) makes its own."""
    coarse_grid, fine = _atlases()
    first_psi, second_psi = (_smooth_field(coarse_grid.shape_zyx, 3.0, seed) for seed in (2, 3))
    with fullres.WORKSPACE.lock:  # busy: both warps below get fresh arrays
        fresh_first = fullres.warp_fine(fine, first_psi, coarse_grid, coarse_grid)
        fresh_second = fullres.warp_fine(fine, second_psi, coarse_grid, coarse_grid)
    assert not fullres.WORKSPACE.lock.locked()
    first = fullres.warp_fine(fine, first_psi, coarse_grid, coarse_grid)
    kept = (first.labels.copy(), first.volume_hu.copy(), first.femur_soft.copy())
    assert fullres.WORKSPACE.arrays  # it was used
    second = fullres.warp_fine(fine, second_psi, coarse_grid, coarse_grid)
    for result, fresh in ((first, fresh_first), (second, fresh_second)):
        np.testing.assert_array_equal(result.labels, fresh.labels)
        np.testing.assert_array_equal(result.volume_hu, fresh.volume_hu)
        np.testing.assert_array_equal(result.femur_soft, fresh.femur_soft)
    for now, before in zip((first.labels, first.volume_hu, first.femur_soft), kept):
        np.testing.assert_array_equal(now, before)
    assert not np.array_equal(first.labels, second.labels)
    # the upsampled field and the nearest voxels themselves, through a workspace or not
    workspace = fullres.Workspace()
    np.testing.assert_array_equal(fullres.upsample_displacement_channels(first_psi, workspace),
                                  fullres.upsample_displacement_channels(first_psi))
    coords = fullres.sample_coordinates(fullres.upsample_displacement_channels(first_psi))
    a, b = fullres.nearest_voxels(coords, fine.labels.shape, workspace), fullres.nearest_voxels(coords, fine.labels.shape)
    np.testing.assert_array_equal(a.flat, b.flat)
    np.testing.assert_array_equal(a.outside, b.outside)


def test_constant_neighbourhoods_exclude_label_boundaries_and_the_grid_border():
    labels = np.zeros((6, 7, 8), np.uint8)
    labels[2:, :, :] = 1
    constant = fullres.constant_neighbourhoods(labels)
    assert not constant[0].any() and not constant[-1].any()
    assert not constant[:, 0].any() and not constant[:, :, -1].any()
    assert not constant[1:3, 1:-1, 1:-1].any()          # next to the boundary between z = 1 and z = 2
    assert constant[3:-1, 1:-1, 1:-1].all()             # inside label 1, away from the border



@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_constant_neighbourhoods_are_where_the_3x3x3_minimum_equals_the_maximum(dtype):
    """The axis-by-axis equalities give what the definition gives: the 3x3x3 minimum and maximum
    filters agree, the grid's border excluded (blocky random data: some voxels constant, most not)."""
    from scipy import ndimage

    rng = np.random.default_rng(5)
    values = rng.integers(0, 3, (5, 6, 7)).repeat(3, 0).repeat(3, 1).repeat(3, 2).astype(dtype)
    values[rng.random(values.shape) < 0.01] = 7  # isolated odd voxels
    expected = ndimage.minimum_filter(values, size=3, mode="nearest") == ndimage.maximum_filter(
        values, size=3, mode="nearest")
    for axis in range(3):
        edges = [slice(None)] * 3
        edges[axis] = [0, -1]
        expected[tuple(edges)] = False
    constant = fullres.constant_neighbourhoods(values)
    assert 0.05 < expected.mean() < 0.5
    np.testing.assert_array_equal(constant, expected)
    assert not fullres.constant_neighbourhoods(np.zeros((2, 5, 5), dtype)).any()

def _ellipsoid(points_zyx: np.ndarray) -> np.ndarray:
    """A tilted ellipsoid (voxel coordinates of the 1 mm test grid), True inside."""
    z, y, x = points_zyx[0] - 11.3, points_zyx[1] - 10.8, points_zyx[2] - 12.2
    u, v = (x + 0.6 * z) / 1.17, (z - 0.6 * x) / 1.17
    return (u / 8.3) ** 2 + (y / 6.1) ** 2 + (v / 5.2) ** 2 < 1.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_blurred_femur_indicator_follows_the_true_surface_better(seed, monkeypatch):
    """Warped by sub-voxel fields, the blurred femur indicator's 0.5 level stays closer to the true
    (analytic) surface than the plain indicator's, which inherits the label map's staircase."""
    coarse_grid = VolumeGeometry.centered((12, 12, 12), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0))
    fine_grid = VolumeGeometry.centered((24, 24, 24), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    labels = _ellipsoid(np.indices(fine_grid.shape_zyx).astype(float)).astype(np.uint8)
    fine = SimpleNamespace(volume=np.zeros(labels.shape, np.float32), labels=labels, geometry=fine_grid, grid="fine")
    psi = _smooth_field(coarse_grid.shape_zyx, 1.0, seed)
    coords = fullres.sample_coordinates(fullres.upsample_displacement_channels(psi))
    truth = _ellipsoid(coords)
    scores = {}
    for sigma_mm in (0.0, fullres.FEMUR_SMOOTHING_MM):
        monkeypatch.setattr(fullres, "FEMUR_SMOOTHING_MM", sigma_mm)
        femur = fullres.warp_fine(fine, psi, coarse_grid, coarse_grid).labels == 1
        scores[sigma_mm] = 2 * (femur & truth).sum() / (femur.sum() + truth.sum())
    assert scores[0.0] < scores[fullres.FEMUR_SMOOTHING_MM] < 1.0, scores


def test_the_femur_indicator_is_blurred_near_the_surface_only_and_cached():
    _, fine = _atlases()
    femur = fullres.femur_indicator(fine)
    assert femur is fullres.femur_indicator(fine) and not femur.flags.writeable
    plain = fine.labels == 1
    from scipy import ndimage

    far = ~ndimage.binary_dilation(plain ^ ndimage.binary_erosion(plain), iterations=3)
    np.testing.assert_array_equal(femur[far], plain[far].astype(np.float32))  # exactly 0 or 1 away from it
    assert ((femur > 0) & (femur < 1)).sum() > 50
