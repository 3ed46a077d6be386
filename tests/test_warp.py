"""Known-answer tests of inference.layers.warp on tiny synthetic grids."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from scipy.ndimage import gaussian_filter
from scipy.spatial.transform import Rotation

import keras

from inference.errors import ConfigError
from inference.layers.warp import (
    AffineToField,
    ComposeAffine,
    ComposeFields,
    SpatialTransformer,
    VecInt,
    affine_field,
    compose_affine,
    compose_fields,
    identity_grid,
    integrate_velocity,
    jacobian_determinant,
    params_to_matrix,
    warp,
    world_to_voxel_matrix,
)
from inference.losses import ncc_global

SHAPE = (16, 12, 20)  # (Z, Y, X)


def _smooth_image(rng, shape=SHAPE, sigma=2.0, channels=1):
    noise = rng.standard_normal(shape + (channels,))
    return np.stack([gaussian_filter(noise[..., c], sigma) for c in range(channels)],
                    axis=-1)[None].astype(np.float32)


def _smooth_velocity(rng, shape=SHAPE, sigma=3.0, max_abs=2.0):
    v = np.stack([gaussian_filter(rng.standard_normal(shape), sigma) for _ in range(3)], -1)
    return (v * (max_abs / np.abs(v).max()))[None].astype(np.float32)


def _oblique_grid():
    """index_to_world with anisotropic spacing, a rotated direction and an offset origin."""
    direction = Rotation.from_euler("zyx", [25.0, -10.0, 15.0], degrees=True).as_matrix()
    spacing_xyz = np.array([0.8, 1.1, 1.5])
    i2w = np.eye(4)
    i2w[:3, :3] = direction * spacing_xyz[None, :]  # columns = scaled axis directions
    i2w[:3, 3] = [-40.0, 12.5, 230.0]
    return i2w


def _centroid_zyx(volume):
    grid = identity_grid(volume.shape[:3]).numpy()
    weights = np.clip(volume, 0.0, None)
    return (grid * weights[..., None]).reshape(-1, 3).sum(0) / weights.sum()


# ---------------------------------------------------------------- SpatialTransformer

@pytest.mark.parametrize("jit", [True, False])
def test_zero_field_is_identity(jit):
    rng = np.random.default_rng(0)
    image = rng.standard_normal((2,) + SHAPE + (3,)).astype(np.float32)
    zero = np.zeros((2,) + SHAPE + (3,), np.float32)
    out = SpatialTransformer(jit_compile=jit)([image, zero]).numpy()
    np.testing.assert_array_equal(out, image)
    out_nearest = SpatialTransformer("nearest", jit_compile=jit)([image, zero]).numpy()
    np.testing.assert_array_equal(out_nearest, image)


def test_integer_shift_moves_content_backward():
    rng = np.random.default_rng(1)
    image = rng.standard_normal((1,) + SHAPE + (1,)).astype(np.float32)
    field = np.zeros((1,) + SHAPE + (3,), np.float32)
    field[..., 0], field[..., 1], field[..., 2] = 2.0, -1.0, 3.0  # (dz, dy, dx)
    out = warp(image, field).numpy()
    # warped(z, y, x) = image(z + 2, y - 1, x + 3); zero where that leaves the grid.
    expected = np.zeros_like(image)
    expected[0, :-2, 1:, :-3] = image[0, 2:, :-1, 3:]
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_half_voxel_shift_interpolates_linearly():
    ramp = np.broadcast_to(np.arange(SHAPE[2], dtype=np.float32), SHAPE)[None, ..., None]
    field = np.zeros((1,) + SHAPE + (3,), np.float32)
    field[..., 2] = 0.25
    out = warp(ramp, field).numpy()
    np.testing.assert_allclose(out[0, :, :, :-1, 0], ramp[0, :, :, :-1, 0] + 0.25, atol=1e-5)


def test_nearest_keeps_labels_integral():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 3, (1,) + SHAPE + (1,)).astype(np.float32)
    field = _smooth_velocity(rng, max_abs=3.0)
    out = SpatialTransformer("nearest")([labels, field]).numpy()
    np.testing.assert_array_equal(out, np.round(out))
    assert set(np.unique(out)) <= {0.0, 1.0, 2.0}
    linear = SpatialTransformer("linear")([labels, field]).numpy()
    assert np.any(linear != np.round(linear))  # the check above can fail


def test_spatial_transformer_gradients_flow():
    rng = np.random.default_rng(3)
    image = tf.constant(_smooth_image(rng))
    field = tf.Variable(_smooth_velocity(rng, max_abs=1.0))
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(SpatialTransformer()([image, field]) ** 2)
    grad = tape.gradient(loss, field)
    assert grad is not None and np.all(np.isfinite(grad.numpy())) and np.abs(grad).max() > 0


def test_shape_mismatch_is_reported():
    layer = SpatialTransformer()
    with pytest.raises(ConfigError, match="share the grid"):
        layer.build([(None, 16, 12, 20, 1), (None, 16, 12, 10, 3)])
    with pytest.raises(ConfigError, match="interp"):
        SpatialTransformer("cubic")


# ---------------------------------------------------------------- VecInt

def test_constant_velocity_integrates_to_translation():
    velocity = np.zeros((1,) + SHAPE + (3,), np.float32)
    velocity[...] = [1.5, -0.75, 2.25]
    phi = VecInt(7)(velocity).numpy()
    # Border clamping makes this exact everywhere, not only in the interior.
    np.testing.assert_allclose(phi, velocity, atol=1e-4)


def test_zero_steps_returns_velocity_and_zero_velocity_is_identity():
    rng = np.random.default_rng(4)
    velocity = _smooth_velocity(rng)
    np.testing.assert_array_equal(VecInt(0)(velocity).numpy(), velocity)
    zero = np.zeros_like(velocity)
    np.testing.assert_array_equal(VecInt(7)(zero).numpy(), zero)


def test_exp_v_then_exp_minus_v_returns_the_image():
    rng = np.random.default_rng(5)
    image = _smooth_image(rng, sigma=2.0)
    velocity = _smooth_velocity(rng, sigma=3.0, max_abs=2.0)
    forward = VecInt(7)(velocity)
    backward = VecInt(7)(-velocity)
    # warped(x) = (image o phi_+)(phi_-(x)) = image(phi_+(phi_-(x))) = image(x).
    once = warp(image, forward)
    twice = warp(once, backward).numpy()
    m = 3
    inner = (slice(None), slice(m, -m), slice(m, -m), slice(m, -m))
    assert float(ncc_global(twice[inner], image[inner])[0]) > 0.99
    # And the composed displacement is close to zero, which the image check alone might hide.
    composed = compose_fields(backward, forward).numpy()
    assert np.abs(composed[inner]).max() < 0.1
    assert np.abs(velocity).max() > 1.5  # the test is not trivially about tiny fields


def test_jacobian_positive_for_large_smooth_velocity():
    rng = np.random.default_rng(6)
    velocity = _smooth_velocity(rng, sigma=2.5, max_abs=6.0)
    # The raw velocity used as a displacement folds; its exponential must not.
    assert float(tf.reduce_min(jacobian_determinant(velocity))) < 0.0
    phi = VecInt(7)(velocity)
    assert float(tf.reduce_min(jacobian_determinant(phi))) > 0.0


def test_jacobian_of_known_affine():
    matrix = np.array([[1.2, 0.1, 0.0, 0.5], [0.0, 0.9, 0.0, 0.0], [0.0, 0.0, 1.1, -1.0],
                       [0, 0, 0, 1]], np.float32)
    field = affine_field(matrix[None], SHAPE)
    det = jacobian_determinant(field).numpy()
    np.testing.assert_allclose(det, np.linalg.det(matrix[:3, :3]), rtol=1e-4)


def test_vecint_gradients_flow_and_recompute_matches():
    rng = np.random.default_rng(7)
    velocity = tf.Variable(_smooth_velocity(rng, max_abs=2.0))
    grads = []
    for recompute in (False, True):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(VecInt(5, recompute=recompute)(velocity) ** 2)
        grads.append(tape.gradient(loss, velocity).numpy())
    assert np.all(np.isfinite(grads[0])) and np.abs(grads[0]).max() > 0
    np.testing.assert_allclose(grads[1], grads[0], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- affine

def _reference_world_matrix(angles_deg, translation_mm, scale, center):
    rot = Rotation.from_euler("xyz", angles_deg, degrees=True).as_matrix()  # extrinsic: Rz Ry Rx
    m = np.eye(4)
    m[:3, :3] = scale * rot
    m[:3, 3] = center + translation_mm - scale * rot @ center
    return m


def test_params_to_matrix_matches_reference():
    params = np.array([[0.3, -0.5, 1.0, 0.2, -0.4, 0.15, 0.5]], np.float32)
    center = np.array([10.0, -20.0, 35.0])
    got = params_to_matrix(params, center, rotation_unit_deg=10.0, translation_unit_mm=10.0,
                           log_scale_unit=0.1).numpy()[0]
    expected = _reference_world_matrix([3.0, -5.0, 10.0], [2.0, -4.0, 1.5], np.exp(0.05), center)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    np.testing.assert_allclose(got[:3, 3] + got[:3, :3] @ center, center + [2.0, -4.0, 1.5],
                               atol=1e-4)  # the centre only moves by the translation


def test_affine_to_field_zero_params_is_identity():
    layer = AffineToField(SHAPE, _oblique_grid())
    field = layer(np.zeros((2, 7), np.float32)).numpy()
    assert field.shape == (2,) + SHAPE + (3,)
    np.testing.assert_allclose(field, 0.0, atol=1e-4)


def test_voxel_matrix_matches_world_matrix():
    i2w = _oblique_grid()
    layer = AffineToField(SHAPE, i2w, center_mm=[-30.0, 20.0, 240.0])
    params = np.random.default_rng(8).standard_normal((3, 7)).astype(np.float32)
    via_world = world_to_voxel_matrix(layer.world_matrix(params), i2w).numpy()
    np.testing.assert_allclose(layer.voxel_matrix(params).numpy(), via_world, atol=2e-4)


def test_known_affine_moves_blob_where_matrix_says():
    i2w = _oblique_grid()
    shape = (20, 18, 24)
    layer = AffineToField(shape, i2w)  # rotation about the grid centre
    # 10 deg about world z plus a translation, in raw units of 10 deg and 10 mm, scale 1.05.
    params = np.array([[0.0, 0.0, 1.0, 0.25, -0.2, 0.15, np.log(1.05) / 0.1]], np.float32)
    world = layer.world_matrix(params).numpy()[0].astype(np.float64)
    expected_world = _reference_world_matrix([0.0, 0.0, 10.0], [2.5, -2.0, 1.5], 1.05,
                                             layer._center)
    np.testing.assert_allclose(world, expected_world, atol=1e-4)

    # Atlas: a Gaussian blob (sigma 2.5 mm) near, but not at, the centre of the grid.
    centre_index_xyz = np.array([(shape[2] - 1) / 2, (shape[1] - 1) / 2, (shape[0] - 1) / 2])
    atlas_point = (i2w @ np.append(centre_index_xyz + [2.0, -1.5, 1.0], 1.0))[:3]
    grid_zyx = identity_grid(shape).numpy().astype(np.float64)
    grid_world = grid_zyx[..., ::-1] @ i2w[:3, :3].T + i2w[:3, 3]
    atlas = np.exp(-np.sum((grid_world - atlas_point) ** 2, -1) / (2 * 2.5 ** 2))

    field = layer(params)
    warped = warp(atlas[None, ..., None].astype(np.float32), field).numpy()[0, ..., 0]
    # Backward warping: the atlas content at a shows up at T^-1(a).
    expected_point = (np.linalg.inv(world) @ np.append(atlas_point, 1.0))[:3]
    expected_index_zyx = (np.linalg.inv(i2w) @ np.append(expected_point, 1.0))[:3][::-1]
    np.testing.assert_allclose(_centroid_zyx(warped), expected_index_zyx, atol=0.3)
    # The blob did move (by more than 1 voxel), so the check above is not trivial.
    assert np.linalg.norm(_centroid_zyx(atlas) - expected_index_zyx) > 1.0


def test_compose_affine_equals_dense_composition_inside():
    rng = np.random.default_rng(9)
    layer = AffineToField(SHAPE, _oblique_grid())
    params = (0.3 * rng.standard_normal((1, 7))).astype(np.float32)
    phi = integrate_velocity(_smooth_velocity(rng, max_abs=1.5))
    exact = compose_affine(phi, layer.voxel_matrix(params)).numpy()
    dense = compose_fields(phi, layer(params)).numpy()
    m = 3
    inner = (slice(None), slice(m, -m), slice(m, -m), slice(m, -m))
    np.testing.assert_allclose(exact[inner], dense[inner], atol=2e-3)
    layered = ComposeAffine(SHAPE, _oblique_grid())([phi, params]).numpy()
    np.testing.assert_allclose(layered, exact, atol=1e-5)


def test_composition_order_is_outer_after_inner():
    # inner = translation by +2 voxels in x, outer = 90 deg rotation in the (y, x) plane about
    # the origin: outer(inner(p)) differs from inner(outer(p)).
    inner = np.zeros((1,) + SHAPE + (3,), np.float32)
    inner[..., 2] = 2.0
    rot = np.array([[1, 0, 0, 0], [0, 0, -1, 0], [0, 1, 0, 0], [0, 0, 0, 1]], np.float32)
    total = compose_affine(inner, rot[None]).numpy()
    p = np.array([3.0, 4.0, 5.0])
    moved = p + total[0, 3, 4, 5]
    np.testing.assert_allclose(moved, rot[:3, :3] @ (p + [0, 0, 2.0]), atol=1e-5)


def test_affine_config_validation():
    with pytest.raises(ConfigError, match="index_to_world"):
        AffineToField(SHAPE, np.zeros((4, 4)))
    with pytest.raises(ConfigError, match="center_mm"):
        AffineToField(SHAPE, np.eye(4), center_mm=[1.0, 2.0])
    with pytest.raises(ConfigError, match="num_steps"):
        VecInt(-1)


# ---------------------------------------------------------------- serialisation

@pytest.mark.parametrize("layer", [
    SpatialTransformer("nearest", jit_compile=False),
    VecInt(5, recompute=True),
    ComposeFields(),
    AffineToField(SHAPE, _oblique_grid(), center_mm=[1.0, 2.0, 3.0], rotation_unit_deg=5.0,
                  translation_unit_mm=4.0, log_scale_unit=0.05),
    ComposeAffine(SHAPE, _oblique_grid()),
], ids=lambda layer: type(layer).__name__)
def test_get_config_round_trip(layer):
    config = layer.get_config()
    clone = type(layer).from_config(config)
    assert clone.get_config() == config
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert type(restored) is type(layer) and restored.get_config() == config


def test_model_saves_and_loads_safe_mode(tmp_path):
    i2w = _oblique_grid()
    atlas = keras.Input(SHAPE + (1,), name="atlas")
    velocity = keras.Input(SHAPE + (3,), name="velocity")
    params = keras.Input((7,), name="params")
    affine = AffineToField(SHAPE, i2w)(params)
    affine_warped = SpatialTransformer()([atlas, affine])
    phi = VecInt(4)(velocity)
    total = ComposeAffine(SHAPE, i2w)([phi, params])
    total_dense = ComposeFields()([phi, affine])
    warped = SpatialTransformer()([atlas, total])
    labels = SpatialTransformer("nearest")([atlas, total_dense])
    model = keras.Model([atlas, velocity, params], [affine_warped, warped, labels])

    rng = np.random.default_rng(10)
    inputs = [_smooth_image(rng), _smooth_velocity(rng, max_abs=1.5),
              (0.2 * rng.standard_normal((1, 7))).astype(np.float32)]
    before = [o.numpy() for o in model(inputs)]
    path = tmp_path / "warp_model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    after = [o.numpy() for o in loaded(inputs)]
    for a, b in zip(before, after):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert np.abs(before[1] - inputs[0]).max() > 0.1  # the model did warp


@pytest.mark.parametrize("recompute", [False, True])
def test_layers_train_in_graph_mode(recompute):
    # model.fit traces the layers into a tf.function graph around the inner XLA functions.
    shape = (8, 10, 12)
    moving = keras.Input(shape + (1,))
    fixed = keras.Input(shape + (1,))
    velocity = keras.layers.Conv3D(3, 3, padding="same", kernel_initializer="zeros",
                                   bias_initializer=keras.initializers.Constant(0.2))(
        keras.layers.Concatenate()([moving, fixed]))
    warped = SpatialTransformer()([moving, VecInt(4, recompute=recompute)(velocity)])
    model = keras.Model([moving, fixed], warped)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    rng = np.random.default_rng(11)
    image = _smooth_image(rng, shape)
    history = model.fit([image, image], image, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    # Starting from a 0.2-voxel shift, the identity target must pull the loss down.
    assert history.history["loss"][1] < history.history["loss"][0]
