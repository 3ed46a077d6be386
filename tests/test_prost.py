"""Known-answer tests of the ProST / inv-ProST layers on tiny synthetic volumes."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from scipy.spatial.transform import Rotation

import keras

from inference.errors import ConfigError
from inference.geometry import (
    CArmView,
    VolumeGeometry,
    principal_direction,
    project_points,
    projection_matrix,
    source_position,
)
from inference.layers import prost
from inference.layers.prost import InvProST, ProST
from inference.layers.sampling import trilinear_sample

SHAPE = (18, 16, 20)  # (Z, Y, X)
SPACING = (2.0, 2.5, 3.0)  # x, y, z mm: anisotropic
DETECTOR = (24, 28)  # rows, cols


def _rotated_grid(shape=SHAPE, spacing=SPACING, centre=(5.0, -8.0, 12.0)):
    """A grid whose axes are NOT the world axes (rotated 25/-15/40 deg), centred off-origin."""
    rotation = Rotation.from_euler("zyx", [25.0, -15.0, 40.0], degrees=True).as_matrix()
    return VolumeGeometry.centered(shape, spacing, centre, tuple(map(tuple, rotation)))


def _view(lao_deg, cranial_deg=0.0, rows=DETECTOR[0], cols=DETECTOR[1], pixel_mm=3.5,
          isocentre=(0.0, 0.0, 0.0)):
    return projection_matrix(CArmView(sdd_mm=1000.0, sid_mm=800.0, lao_deg=lao_deg,
                                      cranial_deg=cranial_deg, rows=rows, cols=cols,
                                      pixel_mm=pixel_mm, isocentre_mm=isocentre))


VIEWS = {"AP": (0.0, 0.0), "lateral": (90.0, 0.0), "oblique": (35.0, 15.0)}


def _world_points(grid):
    k, j, i = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in grid.shape_zyx), indexing="ij")
    index = np.stack([i, j, k, np.ones_like(i)], axis=-1)
    return (index @ grid.index_to_world().T)[..., :3]  # (Z, Y, X, 3)


def _blob_volume(grid, centres_mm, sigma_mm):
    """Sum of isotropic Gaussian blobs defined in world mm, (Z, Y, X) float32."""
    points = _world_points(grid)
    volume = np.zeros(grid.shape_zyx)
    for centre in np.atleast_2d(centres_mm):
        volume += np.exp(-np.sum((points - centre) ** 2, axis=-1) / (2.0 * sigma_mm ** 2))
    return volume.astype(np.float32)


def _batch(volume, P, grid):
    return [tf.constant(volume[None, ..., None]), tf.constant(P[None], tf.float32),
            tf.constant(grid.index_to_world()[None], tf.float32)]


def _centroid(image):
    rows, cols = np.indices(image.shape)
    total = image.sum()
    return np.array([(cols * image).sum() / total, (rows * image).sum() / total])


@pytest.mark.parametrize("view", sorted(VIEWS))
def test_bead_projects_where_p_says(view):
    grid = _rotated_grid()
    bead = np.array([9.0, -13.0, 17.0])  # world mm, not on a voxel centre, off the isocentre
    volume = _blob_volume(grid, bead, sigma_mm=3.0)
    P = _view(*VIEWS[view])
    image = ProST(DETECTOR, 96)(_batch(volume, P, grid)).numpy()[0, ..., 0]
    expected = project_points(P, bead[None])[0]
    assert 3 < expected[0] < DETECTOR[1] - 4 and 3 < expected[1] < DETECTOR[0] - 4
    np.testing.assert_allclose(_centroid(image), expected, atol=0.3)


def test_near_far_and_beam_points_follow_the_definition():
    grid = _rotated_grid()
    P = _view(*VIEWS["oblique"])
    source, axis = source_position(P), principal_direction(P)
    depths_of_corners = (grid.corners_mm(edges=True) - source) @ axis
    near, far = (float(t[0]) for t in prost.near_far(P[None], grid.index_to_world()[None],
                                                     grid.shape_zyx))
    assert near == pytest.approx(depths_of_corners.min(), rel=1e-9)
    assert far == pytest.approx(depths_of_corners.max(), rel=1e-9)

    K = 8
    points = prost.beam_points_world(P[None], grid.index_to_world()[None], grid.shape_zyx,
                                     DETECTOR, K).numpy()[0]
    assert points.shape == (K, *DETECTOR, 3)
    # every sample lies on its pixel's ray, at its plane's depth
    uv = project_points(P, points.reshape(-1, 3)).reshape(K, *DETECTOR, 2)
    cols, rows = np.meshgrid(np.arange(DETECTOR[1]), np.arange(DETECTOR[0]))
    np.testing.assert_allclose(uv[..., 0], np.broadcast_to(cols, uv.shape[:-1]), atol=1e-6)
    np.testing.assert_allclose(uv[..., 1], np.broadcast_to(rows, uv.shape[:-1]), atol=1e-6)
    depth = (points - source) @ axis
    expected = near + (np.arange(K) + 0.5) * (far - near) / K
    np.testing.assert_allclose(depth, np.broadcast_to(expected[:, None, None], depth.shape),
                               rtol=1e-9)
    # the kernels' voxel-space plan describes the same points
    plan = prost.ray_march_plan(P[None], grid.index_to_world()[None], grid.shape_zyx,
                                tf.range(DETECTOR[0]), tf.range(DETECTOR[1]), K,
                                dtype=tf.float64)
    zyx = prost.beam_coords(plan).numpy()[0]
    index = np.concatenate([zyx[..., ::-1], np.ones(zyx.shape[:-1] + (1,))], axis=-1)
    np.testing.assert_allclose((index @ grid.index_to_world().T)[..., :3], points, atol=1e-6)


def test_uniform_cube_central_ray_equals_mu_times_path_length():
    shape = (24, 24, 24)
    grid = _rotated_grid(shape, (1.5, 2.0, 1.0), centre=(0.0, 0.0, 0.0))
    volume = np.zeros(shape, np.float32)
    volume[4:20, 4:20, 4:20] = 0.02  # mu in 1/mm
    rows = cols = 17
    P = _view(*VIEWS["oblique"], rows=rows, cols=cols, pixel_mm=4.0)  # iso at pixel (8, 8)
    image = ProST((rows, cols), 256)(_batch(volume, P, grid)).numpy()[0, ..., 0]

    # analytic: intersect the central ray with the cube's box [3.5, 19.5]^3 in index space
    to_index = grid.world_to_index()
    source = to_index[:3] @ np.append(source_position(P), 1.0)
    target = to_index[:3] @ np.array([0.0, 0.0, 0.0, 1.0])  # the isocentre, on pixel (8, 8)
    direction = target - source
    t_low = (3.5 - source) / direction
    t_high = (19.5 - source) / direction
    t_in = np.minimum(t_low, t_high).max()
    t_out = np.maximum(t_low, t_high).min()
    world_direction = grid.index_to_world()[:3, :3] @ direction
    length_mm = (t_out - t_in) * np.linalg.norm(world_direction)
    assert length_mm > 20.0
    assert image[8, 8] == pytest.approx(0.02 * length_mm, rel=0.01)


def test_beam_output_matches_integral_and_trilinear_samples():
    grid = _rotated_grid()
    volume = _blob_volume(grid, [[0.0, -5.0, 10.0], [12.0, -10.0, 15.0]], sigma_mm=6.0)
    inputs = _batch(volume, _view(*VIEWS["AP"]), grid)
    K = 40
    integral, beam = ProST(DETECTOR, K, output="both")(inputs)
    assert beam.shape == (1, K, *DETECTOR, 1)
    np.testing.assert_allclose(ProST(DETECTOR, K)(inputs).numpy(), integral.numpy(), rtol=1e-5,
                               atol=1e-5)
    plan = prost.ray_march_plan(inputs[1], inputs[2], SHAPE, tf.range(DETECTOR[0]),
                                tf.range(DETECTOR[1]), K)
    reference = trilinear_sample(inputs[0], prost.beam_coords(plan))
    np.testing.assert_allclose(beam.numpy(), reference.numpy(), atol=1e-6)


def _ncc(a, b):
    a = a - a.mean()
    b = b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def test_prost_beam_then_inv_prost_returns_the_volume_inside_the_cone():
    shape = (20, 20, 20)
    grid = VolumeGeometry.centered(shape, (2.0, 2.0, 2.0), (0.0, 0.0, 0.0))
    rng = np.random.default_rng(3)
    volume = _blob_volume(grid, rng.uniform(-12, 12, (5, 3)), sigma_mm=6.0)
    P = _view(*VIEWS["oblique"], rows=32, cols=32, pixel_mm=1.6)
    inputs = _batch(volume, P, grid)
    beam = ProST((32, 32), 48, output="beam")(inputs)
    back = InvProST(shape, (32, 32), 48)([beam, inputs[1], inputs[2]]).numpy()[0, ..., 0]
    # the region every ray covers: voxels projecting inside the detector (1 px margin)
    uv = project_points(P, _world_points(grid).reshape(-1, 3)).reshape(*shape, 2)
    inside = (uv[..., 0] > 1) & (uv[..., 0] < 30) & (uv[..., 1] > 1) & (uv[..., 1] < 30)
    assert 0.2 < inside.mean() < 1.0  # the detector cuts the volume: the test sees both sides
    assert _ncc(back[inside], volume[inside]) > 0.98
    assert np.abs(back[~inside]).max() <= np.abs(back[inside]).max()
    # far outside the cone the result is exactly zero
    outside = (uv[..., 0] < -2) | (uv[..., 0] > 33) | (uv[..., 1] < -2) | (uv[..., 1] > 33)
    assert outside.any() and np.all(back[outside] == 0.0)


def test_inv_prost_maps_voxels_to_their_pixel_and_depth_on_a_smaller_beam():
    """A beam whose values are its own full-resolution (k, v, u) coordinates must give, at each
    voxel, that voxel's depth index and projection: checks the pixel-centre-correct scaling."""
    grid = _rotated_grid()
    P = _view(*VIEWS["oblique"], pixel_mm=4.5)
    K, (H, W) = 32, DETECTOR
    small = (K // 4, H // 2, W // 4)  # different factors per axis
    k_s, v_s, u_s = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in small), indexing="ij")
    full = [(c + 0.5) * big / n - 0.5 for c, big, n in zip((k_s, v_s, u_s), (K, H, W), small)]
    beam = np.stack(full, axis=-1).astype(np.float32)[None]  # (1, K', H', W', 3)
    layer = InvProST(SHAPE, DETECTOR, K)
    out = layer([tf.constant(beam), tf.constant(P[None], tf.float32),
                 tf.constant(grid.index_to_world()[None], tf.float32)]).numpy()[0]

    points = _world_points(grid).reshape(-1, 3)
    uv = project_points(P, points)
    near, far = (float(t[0]) for t in prost.near_far(P[None], grid.index_to_world()[None], SHAPE))
    depth = (points - source_position(P)) @ principal_direction(P)
    k = (depth - near) / (far - near) * K - 0.5
    expected = np.stack([k, uv[:, 1], uv[:, 0]], axis=-1).reshape(*SHAPE, 3)
    # trilinear interpolation reproduces a linear function exactly where all 8 neighbours exist
    lo = [(big / n) * 0.5 - 0.5 for big, n in zip((K, H, W), small)]
    hi = [big - 1 - l for big, l in zip((K, H, W), lo)]
    interior = np.all([(expected[..., a] > lo[a] + 0.01) & (expected[..., a] < hi[a] - 0.01)
                       for a in range(3)], axis=0)
    assert interior.mean() > 0.3
    np.testing.assert_allclose(out[interior], expected[interior], atol=2e-3)


def test_volume_gradient_is_the_exact_adjoint():
    grid = _rotated_grid()
    rng = np.random.default_rng(0)
    volume = rng.random(SHAPE, dtype=np.float32)
    P = _view(*VIEWS["oblique"])
    inputs = _batch(volume, P, grid)
    weights = tf.constant(rng.random((1, *DETECTOR, 1), dtype=np.float32))
    layer = ProST(DETECTOR, 64)
    with tf.GradientTape() as tape:
        tape.watch(inputs[0])
        loss = tf.reduce_sum(layer(inputs) * weights)
    gradient = tape.gradient(loss, inputs[0]).numpy()
    assert np.all(np.isfinite(gradient)) and np.abs(gradient).max() > 0
    # ProST is linear in the volume: a unit change of voxel i changes the loss by gradient[i]
    strong = np.argwhere(gradient[0, ..., 0] > 0.2 * gradient.max())
    picks = [tuple(strong[i]) for i in rng.choice(len(strong), 3, replace=False)]
    for index in picks + [tuple(np.argwhere(gradient[0, ..., 0] == 0)[0])]:
        bumped = volume.copy()
        bumped[index] += 1.0
        changed = tf.reduce_sum(layer(_batch(bumped, P, grid)) * weights)
        assert float(changed - loss) == pytest.approx(gradient[(0, *index, 0)], rel=2e-3,
                                                      abs=2e-3)


@pytest.mark.parametrize("output", ["integral", "beam"])
def test_custom_gradients_match_automatic_differentiation(output):
    """The fast 8-wide-splat gradients (volume and geometry) equal TensorFlow's own gradients
    of the plain trilinear formulation, including with several kernel chunks."""
    grid = _rotated_grid()
    rng = np.random.default_rng(1)
    volume = tf.constant(rng.random((1, *SHAPE, 2), dtype=np.float32))
    P = _view(*VIEWS["oblique"])
    plan = prost.ray_march_plan(P[None], grid.index_to_world()[None], SHAPE,
                                tf.range(DETECTOR[0]), tf.range(DETECTOR[1]), 24)
    plan_tensors = [tf.Variable(t) for t in plan[:4]]
    shape = (1, *DETECTOR, 2) if output == "integral" else (1, 24, *DETECTOR, 2)
    weights = tf.constant(rng.random(shape, dtype=np.float32))

    def reference(v, p):
        samples = trilinear_sample(v, prost.beam_coords(p))
        if output == "beam":
            return samples
        return tf.reduce_sum(samples, 1) * (p.step[:, None, None] * p.ray_scale)[..., None]

    def fast(v, p):
        if output == "beam":
            return prost.beam_sample(v, p, geometry_gradients=True, chunk_points=5000)
        return prost.ray_integral(v, p, geometry_gradients=True, chunk_points=5000)

    results = []
    for fn in (fast, reference):
        with tf.GradientTape() as tape:
            tape.watch(volume)
            p = prost.RayPlan(*(tf.identity(t) for t in plan_tensors), plan.num_samples)
            value = fn(volume, p)
            loss = tf.reduce_sum(value * weights)
        results.append((value, tape.gradient(loss, [volume, *plan_tensors])))
    (fast_value, fast_grads), (ref_value, ref_grads) = results
    np.testing.assert_allclose(fast_value.numpy(), ref_value.numpy(), rtol=1e-5, atol=1e-4)
    names = ["volume", *prost.RayPlan._fields[:4]]
    for name, got, want in zip(names, fast_grads, ref_grads):
        if output == "beam" and name in ("step", "ray_scale") and want is None:
            continue
        scale = np.abs(want.numpy()).max()
        assert scale > 0, name
        np.testing.assert_allclose(got.numpy() / scale, want.numpy() / scale, atol=1e-4,
                                   err_msg=name)


def test_geometry_gradient_matches_finite_differences():
    """Moving the volume's grid along world x: d(loss)/d(translation) from the layer's gradient
    w.r.t. index_to_world equals a central finite difference."""
    grid = VolumeGeometry.centered(SHAPE, SPACING, (0.0, 0.0, 0.0))
    volume = _blob_volume(grid, [[4.0, -3.0, 6.0]], sigma_mm=7.0)
    P = _view(*VIEWS["oblique"])
    weights = tf.constant(np.linspace(0.0, 1.0, DETECTOR[0] * DETECTOR[1],
                                      dtype=np.float32).reshape(1, *DETECTOR, 1))
    layer = ProST(DETECTOR, 64, geometry_gradients=True)

    def loss_at(shift_mm):
        matrix = grid.index_to_world().copy()
        matrix[0, 3] += shift_mm
        return layer([tf.constant(volume[None, ..., None]), tf.constant(P[None], tf.float32),
                      tf.constant(matrix[None], tf.float32)]) * weights

    matrix = tf.constant(grid.index_to_world()[None], tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(matrix)
        loss = tf.reduce_sum(layer([tf.constant(volume[None, ..., None]),
                                    tf.constant(P[None], tf.float32), matrix]) * weights)
    analytic = float(tape.gradient(loss, matrix)[0, 0, 3])
    delta = 0.2
    numeric = float(tf.reduce_sum(loss_at(delta)) - tf.reduce_sum(loss_at(-delta))) / (2 * delta)
    assert abs(numeric) > 1e-2
    assert analytic == pytest.approx(numeric, rel=0.03)
    # and the default layer gives no geometry gradient at all (documented)
    with tf.GradientTape() as tape:
        tape.watch(matrix)
        loss = tf.reduce_sum(ProST(DETECTOR, 64)([tf.constant(volume[None, ..., None]),
                                                  tf.constant(P[None], tf.float32), matrix]))
    assert tape.gradient(loss, matrix) is None


def test_inv_prost_gradient_reaches_the_beam():
    grid = VolumeGeometry.centered((12, 12, 12), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0))
    P = _view(*VIEWS["AP"], rows=16, cols=16, pixel_mm=2.5)
    rng = np.random.default_rng(5)
    beam = tf.constant(rng.random((1, 10, 8, 8, 3), dtype=np.float32))
    layer = InvProST((12, 12, 12), (16, 16), 20)
    with tf.GradientTape() as tape:
        tape.watch(beam)
        out = layer([beam, tf.constant(P[None], tf.float32),
                     tf.constant(grid.index_to_world()[None], tf.float32)])
        loss = tf.reduce_sum(out * out)
    gradient = tape.gradient(loss, beam).numpy()
    assert out.shape == (1, 12, 12, 12, 3)
    assert np.all(np.isfinite(gradient)) and np.abs(gradient).max() > 0


def test_config_round_trip():
    layer = ProST((24, 28), 64, output="both", geometry_gradients=True, name="prost_ap")
    clone = ProST.from_config(layer.get_config())
    assert (clone.detector_hw, clone.num_samples, clone.output_mode, clone.geometry_gradients,
            clone.name) == ((24, 28), 64, "both", True, "prost_ap")
    inv = InvProST((18, 16, 20), (24, 28), 64, name="inv")
    clone = InvProST.from_config(inv.get_config())
    assert (clone.volume_shape_zyx, clone.detector_hw, clone.num_samples) == (
        (18, 16, 20), (24, 28), 64)


def test_model_with_both_layers_saves_and_reloads_safely(tmp_path):
    grid = VolumeGeometry.centered((12, 10, 14), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0))
    volume_in = keras.Input((12, 10, 14, 1), name="volume")
    p_in = keras.Input((3, 4), name="projection")
    m_in = keras.Input((4, 4), name="index_to_world")
    integral, beam = ProST((16, 16), 20, output="both")([volume_in, p_in, m_in])
    back = InvProST((12, 10, 14), (16, 16), 20)([beam, p_in, m_in])
    model = keras.Model([volume_in, p_in, m_in], [integral, back])

    rng = np.random.default_rng(7)
    inputs = [rng.random((1, 12, 10, 14, 1), dtype=np.float32),
              _view(*VIEWS["lateral"], rows=16, cols=16, pixel_mm=2.5)[None].astype(np.float32),
              grid.index_to_world()[None].astype(np.float32)]
    expected = model(inputs)
    path = tmp_path / "prost_model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    for got, want in zip(loaded(inputs), expected):
        np.testing.assert_array_equal(got.numpy(), want.numpy())
    assert np.abs(expected[0].numpy()).max() > 0 and np.abs(expected[1].numpy()).max() > 0


@pytest.mark.parametrize("kwargs, message", [
    (dict(detector_hw=(0, 10), num_samples=8), "detector_hw"),
    (dict(detector_hw=(10,), num_samples=8), "detector_hw"),
    (dict(detector_hw=(10, 10), num_samples=0), "num_samples"),
    (dict(detector_hw=(10, 10), num_samples=8, output="image"), "output"),
])
def test_prost_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        ProST(**kwargs)


def test_inv_prost_rejects_bad_arguments():
    with pytest.raises(ConfigError, match="volume_shape_zyx"):
        InvProST((10, 10), (8, 8))
    with pytest.raises(ConfigError, match="num_samples"):
        InvProST((10, 10, 10), (8, 8), num_samples=-3)


@pytest.mark.parametrize("shapes, message", [
    ([(None, 8, 8, 8), (None, 3, 4), (None, 4, 4)], "volume must have shape"),
    ([(None, 8, 8, 8, 1), (None, 3, 3), (None, 4, 4)], "projection must have shape"),
    ([(None, 8, 8, 8, 1), (None, 3, 4), (None, 3, 4)], "index_to_world must have shape"),
])
def test_prost_build_rejects_bad_input_shapes(shapes, message):
    with pytest.raises(ConfigError, match=message):
        ProST((10, 10), 8).build(shapes)


def test_build_messages_name_the_bad_input():
    with pytest.raises(ConfigError, match="three inputs"):
        ProST((10, 10), 8).build([(1, 8, 8, 8, 1), (1, 3, 4)])
    with pytest.raises(ConfigError, match="channel count"):
        ProST((10, 10), 8).build([(1, 8, 8, 8, None), (1, 3, 4), (1, 4, 4)])
    with pytest.raises(ConfigError, match="beam must have shape"):
        InvProST((8, 8, 8), (10, 10)).build([(1, 4, 5, 1), (1, 3, 4), (1, 4, 4)])
    with pytest.raises(ConfigError, match="must be known"):
        InvProST((8, 8, 8), (10, 10)).build([(1, None, 5, 5, 1), (1, 3, 4), (1, 4, 4)])
    with pytest.raises(ConfigError, match="projection must have shape"):
        InvProST((8, 8, 8), (10, 10)).build([(1, 4, 5, 5, 1), (1, 4, 4), (1, 4, 4)])
