"""Known-answer tests of full-size DRR rendering (inference.drr) on tiny synthetic CTs."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from scipy.ndimage import map_coordinates
from scipy.spatial.transform import Rotation

from inference.drr import (
    HU_TO_MU_CONSTANTS,
    MU_WATER_PER_MM,
    hu_to_mu,
    render_drr,
    render_path_length,
    samples_for_step,
)
from inference.errors import Cancelled, ConfigError, DataError, GeometryError
from inference.geometry import (
    CArmView,
    VolumeGeometry,
    project_points,
    projection_matrix,
    source_position,
)

SHAPE = (20, 18, 22)  # (Z, Y, X)
ROWS, COLS = 26, 30


def _grid(shape=SHAPE, spacing=(1.5, 2.0, 2.5), centre=(4.0, -6.0, 10.0)):
    rotation = Rotation.from_euler("zyx", [-30.0, 20.0, 10.0], degrees=True).as_matrix()
    return VolumeGeometry.centered(shape, spacing, centre, tuple(map(tuple, rotation)))


def _view(lao_deg, cranial_deg=0.0, rows=ROWS, cols=COLS, pixel_mm=3.0):
    return projection_matrix(CArmView(sdd_mm=1100.0, sid_mm=850.0, lao_deg=lao_deg,
                                      cranial_deg=cranial_deg, rows=rows, cols=cols,
                                      pixel_mm=pixel_mm))


VIEWS = {"AP": (0.0, 0.0), "lateral": (-90.0, 0.0), "oblique": (-40.0, -20.0)}


def _world_points(grid):
    k, j, i = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in grid.shape_zyx), indexing="ij")
    index = np.stack([i, j, k, np.ones_like(i)], axis=-1)
    return (index @ grid.index_to_world().T)[..., :3]


def _centroid(image):
    rows, cols = np.indices(image.shape)
    return np.array([(cols * image).sum(), (rows * image).sum()]) / image.sum()


def test_hu_to_mu_known_values():
    mu = hu_to_mu(np.array([-2000.0, -1000.0, 0.0, 1000.0]))
    assert mu.dtype == np.float32
    np.testing.assert_allclose(mu, [0.0, 0.0, MU_WATER_PER_MM, 2 * MU_WATER_PER_MM], rtol=1e-6)
    np.testing.assert_allclose(hu_to_mu([500.0], mu_water_per_mm=0.03), [0.045], rtol=1e-6)
    assert HU_TO_MU_CONSTANTS["mu_water_per_mm"] == MU_WATER_PER_MM
    with pytest.raises(ConfigError, match="mu_water_per_mm"):
        hu_to_mu([0.0], mu_water_per_mm=-1.0)


@pytest.mark.parametrize("view", sorted(VIEWS))
def test_bead_lands_where_p_projects_it(view):
    grid = _grid()
    bead = np.array([7.0, -9.0, 13.0])
    distance2 = np.sum((_world_points(grid) - bead) ** 2, axis=-1)
    mu = (0.05 * np.exp(-distance2 / (2 * 2.5 ** 2))).astype(np.float32)
    P = _view(*VIEWS[view])
    image = render_drr(mu, grid, P, ROWS, COLS, input="mu")
    assert image.shape == (ROWS, COLS) and image.dtype == np.float32
    expected = project_points(P, bead[None])[0]
    assert 4 < expected[0] < COLS - 5 and 4 < expected[1] < ROWS - 5
    np.testing.assert_allclose(_centroid(image), expected, atol=0.3)


def _central_ray_length_mm(grid, P, box_lo, box_hi, target_mm=(0.0, 0.0, 0.0)):
    """Analytic length of the ray source -> target inside an index-space box."""
    to_index = grid.world_to_index()
    source = to_index[:3] @ np.append(source_position(P), 1.0)
    direction = to_index[:3] @ np.append(target_mm, 1.0) - source
    t_lo = (np.asarray(box_lo) - source) / direction
    t_hi = (np.asarray(box_hi) - source) / direction
    t_in, t_out = np.minimum(t_lo, t_hi).max(), np.maximum(t_lo, t_hi).min()
    return (t_out - t_in) * np.linalg.norm(grid.index_to_world()[:3, :3] @ direction)


def test_uniform_cube_line_integral_and_path_length():
    shape = (24, 24, 24)
    grid = _grid(shape, (1.0, 1.5, 2.0), centre=(0.0, 0.0, 0.0))
    labels = np.zeros(shape, np.uint8)
    labels[5:19, 4:20, 6:18] = 1  # z, y, x
    hu = np.where(labels == 1, 1000.0, -1000.0).astype(np.float32)  # mu = 2 mu_water inside
    rows = cols = 15
    P = _view(*VIEWS["oblique"], rows=rows, cols=cols, pixel_mm=5.0)  # isocentre at (7, 7)
    length = _central_ray_length_mm(grid, P, (5.5, 3.5, 4.5), (17.5, 19.5, 18.5))  # x, y, z
    assert length > 20.0

    path = render_path_length(labels, grid, P, rows, cols, label=1)
    assert path[7, 7] == pytest.approx(length, rel=0.01)
    drr = render_drr(hu, grid, P, rows, cols)
    assert drr[7, 7] == pytest.approx(2 * MU_WATER_PER_MM * length, rel=0.01)
    # a label that is absent gives a zero path everywhere
    assert np.all(render_path_length(labels, grid, P, rows, cols, label=2) == 0.0)


def _numpy_ray_marcher(mu, grid, P, rows, cols, step_mm):
    """Independent reference: march each pixel's ray in world mm with a fine midpoint rule and
    scipy's linear interpolation with zero padding ('grid-constant')."""
    source = source_position(P)
    a_inv = np.linalg.inv(P[:, :3])
    cols_, rows_ = np.meshgrid(np.arange(cols, dtype=np.float64), np.arange(rows, dtype=np.float64))
    pixels = np.stack([cols_, rows_, np.ones_like(cols_)], axis=-1).reshape(-1, 3)
    directions = pixels @ a_inv.T  # A (X - S) = w [u, v, 1]: the ray direction, w > 0 ahead
    directions /= np.linalg.norm(directions, axis=-1, keepdims=True)
    corners = grid.corners_mm(edges=True)
    distances = np.linalg.norm(corners - source, axis=-1)
    t = np.arange(distances.min() - 5.0, distances.max() + 5.0, step_mm) + step_mm / 2
    to_index = grid.world_to_index()
    image = np.zeros(len(pixels))
    for start in range(0, len(pixels), 64):
        block = directions[start:start + 64]
        world = source + t[None, :, None] * block[:, None, :]  # (rays, samples, 3)
        index = world @ to_index[:3, :3].T + to_index[:3, 3]
        zyx = index[..., ::-1].reshape(-1, 3).T
        values = map_coordinates(mu, zyx, order=1, mode="grid-constant", cval=0.0)
        image[start:start + 64] = values.reshape(len(block), -1).sum(axis=1) * step_mm
    return image.reshape(rows, cols)


def test_agrees_with_an_independent_numpy_ray_marcher():
    grid = _grid()
    rng = np.random.default_rng(11)
    points = _world_points(grid)
    mu = np.zeros(SHAPE)
    for centre in rng.uniform(-8, 8, (4, 3)) + np.array([4.0, -6.0, 10.0]):
        mu += 0.02 * np.exp(-np.sum((points - centre) ** 2, axis=-1) / (2 * 5.0 ** 2))
    mu[0], mu[-1], mu[:, 0], mu[:, -1], mu[..., 0], mu[..., -1] = 0, 0, 0, 0, 0, 0
    mu = mu.astype(np.float32)
    P = _view(*VIEWS["oblique"])
    ours = render_drr(mu, grid, P, ROWS, COLS, input="mu", step_mm=0.25)
    reference = _numpy_ray_marcher(mu, grid, P, ROWS, COLS, step_mm=0.1)
    assert reference.max() > 0.1
    np.testing.assert_allclose(ours, reference, atol=0.005 * reference.max())


def test_chunks_progress_and_index_to_world_input_give_the_same_image():
    grid = _grid()
    rng = np.random.default_rng(2)
    hu = rng.uniform(-1000.0, 1500.0, SHAPE).astype(np.float32)
    P = _view(*VIEWS["AP"])
    whole = render_drr(hu, grid, P, ROWS, COLS, chunk_rows=64)
    fractions = []
    chunked = render_drr(hu, grid.index_to_world(), P, ROWS, COLS, chunk_rows=7,
                         progress=fractions.append)
    np.testing.assert_allclose(chunked, whole, rtol=1e-6, atol=1e-6)
    assert len(fractions) >= 3 and fractions == sorted(set(fractions)) and fractions[-1] == 1.0
    # the explicit sample count ProST would use gives a close image too
    coarse = render_drr(hu, grid, P, ROWS, COLS, num_samples=256)
    assert np.abs(coarse - whole).max() < 0.05 * whole.max()


def test_same_line_integrals_as_the_prost_layer_including_the_rim():
    """render_drr skips the rays that cannot meet the volume; everywhere else it is ProST."""
    import tensorflow as tf

    from inference.layers.prost import ProST

    grid = _grid()
    mu = np.full(SHAPE, 0.02, np.float32)  # non-zero up to the border: the rim matters
    P = _view(*VIEWS["oblique"], pixel_mm=2.0)
    ours = render_drr(mu, grid, P, ROWS, COLS, input="mu", num_samples=96)
    layer = ProST((ROWS, COLS), 96)([tf.constant(mu[None, ..., None]),
                                     tf.constant(P[None], tf.float32),
                                     tf.constant(grid.index_to_world()[None], tf.float32)])
    expected = layer.numpy()[0, ..., 0]
    assert (expected == 0).any() and (expected > 0).mean() > 0.3  # the volume is cut by the box
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-6)


def test_cancel_stops_between_chunks():
    grid = _grid()
    mu = np.ones(SHAPE, np.float32)
    event = threading.Event()
    event.set()
    with pytest.raises(Cancelled):
        render_drr(mu, grid, _view(0.0), ROWS, COLS, input="mu", cancel=event)
    calls = []

    def cancel_after_first_chunk():
        calls.append(1)
        return len(calls) > 1

    with pytest.raises(Cancelled):
        render_drr(mu, grid, _view(0.0), ROWS, COLS, input="mu", chunk_rows=8,
                   cancel=cancel_after_first_chunk)
    assert len(calls) == 2


def test_default_sampling_is_at_most_half_the_smallest_spacing():
    grid = _grid()
    P = _view(*VIEWS["oblique"])
    source = source_position(P)
    depths = (grid.corners_mm(edges=True) - source) @ (P[2, :3] / np.linalg.norm(P[2, :3]))
    # the most oblique ray of the detector goes through a corner pixel
    corner_rays = np.array([[u, v, 1.0] for u in (0, COLS - 1) for v in (0, ROWS - 1)])
    directions = corner_rays @ np.linalg.inv(P[:, :3]).T
    directions *= np.linalg.norm(P[2, :3])  # unit depth per unit of t
    max_ray_scale = np.linalg.norm(directions, axis=-1).max()
    for step_mm, expected_max in ((None, 0.75), (0.2, 0.2)):  # default: half of 1.5 mm
        k = samples_for_step(P, grid.index_to_world(), SHAPE, ROWS, COLS, step_mm=step_mm)
        assert k % 32 == 0
        step_along_rays = (depths.max() - depths.min()) / k * max_ray_scale
        assert step_along_rays <= expected_max
        # ... and not needlessly fine (rounded up to a multiple of 32 planes only)
        assert (depths.max() - depths.min()) / (k - 32) * max_ray_scale > expected_max


def test_input_validation_messages():
    grid = _grid()
    P = _view(0.0)
    volume = np.zeros(SHAPE, np.float32)
    with pytest.raises(GeometryError, match="shape"):
        render_drr(np.zeros((5, 5, 5), np.float32), grid, P, ROWS, COLS)
    with pytest.raises(DataError, match="3D"):
        render_drr(np.zeros((5, 5), np.float32), np.eye(4), P, ROWS, COLS)
    with pytest.raises(DataError, match="NaN"):
        render_drr(np.full(SHAPE, np.nan, np.float32), grid, P, ROWS, COLS)
    with pytest.raises(ConfigError, match="either step_mm or num_samples"):
        render_drr(volume, grid, P, ROWS, COLS, step_mm=1.0, num_samples=64)
    with pytest.raises(ConfigError, match="input"):
        render_drr(volume, grid, P, ROWS, COLS, input="density")
    with pytest.raises(ConfigError, match="rows"):
        render_drr(volume, grid, P, 0, COLS)
    with pytest.raises(GeometryError, match="3x4"):
        render_drr(volume, grid, np.eye(3), ROWS, COLS)
    with pytest.raises(DataError, match="integers"):
        render_path_length(volume, grid, P, ROWS, COLS)
    behind = P.copy()
    behind[2] = -behind[2]  # flips which side counts as "in front": the volume is behind
    with pytest.raises(GeometryError, match="behind"):
        render_drr(volume, grid, behind, ROWS, COLS)
