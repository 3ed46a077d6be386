"""Known-answer tests of inference.losses on tiny synthetic images and label maps."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from scipy.ndimage import gaussian_filter

import keras

from inference.errors import ConfigError
from inference.layers.warp import warp
from inference.losses import (
    GlobalNCCLoss,
    SmoothnessL2Loss,
    SoftDiceLoss,
    WindowedNCCLoss,
    dice,
    ncc_global,
    ncc_map,
    ncc_windowed,
    smoothness_l2,
    soft_dice,
    soft_dice_loss,
)

SHAPE = (16, 12, 20)


def _smooth(rng, shape=SHAPE, sigma=1.5, batch=1):
    noise = rng.standard_normal((batch,) + shape)
    out = np.stack([gaussian_filter(n, sigma) for n in noise])
    return (out / out.std())[..., None].astype(np.float32)


# ---------------------------------------------------------------- NCC

def test_global_ncc_identity_affine_intensity_and_noise():
    rng = np.random.default_rng(0)
    a = _smooth(rng, batch=2)
    np.testing.assert_allclose(ncc_global(a, a).numpy(), 1.0, atol=1e-5)
    np.testing.assert_allclose(GlobalNCCLoss()(a, a).numpy(), -1.0, atol=1e-5)
    np.testing.assert_allclose(ncc_global(a, 3.0 * a + 200.0).numpy(), 1.0, atol=1e-5)
    np.testing.assert_allclose(ncc_global(a, -a).numpy(), -1.0, atol=1e-5)
    noisy = a + 0.5 * rng.standard_normal(a.shape).astype(np.float32)
    value = ncc_global(a, noisy).numpy()
    # Signal variance 1, noise variance 0.25: expected correlation 1 / sqrt(1.25).
    np.testing.assert_allclose(value, 1.0 / np.sqrt(1.25), atol=0.03)


def test_global_ncc_matches_numpy_and_respects_mask():
    rng = np.random.default_rng(1)
    a = _smooth(rng)
    b = a + rng.standard_normal(a.shape).astype(np.float32)
    mask = np.zeros(SHAPE, np.float32)
    mask[4:12, 2:10, 5:15] = 1.0
    inside = mask.astype(bool)
    expected = np.corrcoef(a[0, ..., 0][inside], b[0, ..., 0][inside])[0, 1]
    np.testing.assert_allclose(ncc_global(a, b, mask=mask[None]).numpy()[0], expected, atol=1e-4)
    # Outside the mask b can be anything.
    b_changed = np.where(inside[None, ..., None], b, 1e3 * rng.standard_normal(b.shape))
    np.testing.assert_allclose(ncc_global(a, b_changed, mask=mask[None]).numpy()[0], expected,
                               atol=1e-4)


def test_windowed_ncc_matches_brute_force_2d():
    rng = np.random.default_rng(2)
    a = _smooth(rng, shape=(9, 11), sigma=1.0)
    b = a + 0.7 * _smooth(rng, shape=(9, 11), sigma=0.7)
    window, eps = 3, 1e-5
    got = ncc_map(a, b, window=window, eps=eps).numpy()[0, ..., 0]
    # Brute force on the globally standardised images (as documented), truncated windows.
    sa = (a[0, ..., 0] - a.mean()) / a.std()
    sb = (b[0, ..., 0] - b.mean()) / b.std()
    expected = np.zeros_like(sa)
    for r in range(sa.shape[0]):
        for c in range(sa.shape[1]):
            pa = sa[max(r - 1, 0):r + 2, max(c - 1, 0):c + 2].ravel()
            pb = sb[max(r - 1, 0):r + 2, max(c - 1, 0):c + 2].ravel()
            cov = np.mean(pa * pb) - pa.mean() * pb.mean()
            expected[r, c] = cov / np.sqrt((pa.var() + eps) * (pb.var() + eps))
    np.testing.assert_allclose(got, expected, atol=2e-4)


def test_windowed_ncc_self_and_affine_intensity():
    rng = np.random.default_rng(3)
    a = _smooth(rng, batch=2)
    np.testing.assert_allclose(ncc_windowed(a, a, window=5).numpy(), 1.0, atol=2e-3)
    np.testing.assert_allclose(ncc_windowed(a, 2.0 * a - 7.0, window=5).numpy(), 1.0,
                               atol=2e-3)
    noisy = a + 0.5 * rng.standard_normal(a.shape).astype(np.float32)
    assert np.all(ncc_windowed(a, noisy, window=5).numpy() < 0.95)
    np.testing.assert_allclose(WindowedNCCLoss(window=5)(a, a).numpy(), -1.0, atol=2e-3)


def test_windowed_ncc_minimum_loss_at_identity():
    rng = np.random.default_rng(4)
    image = _smooth(rng, sigma=2.0)
    losses = {}
    for shift in (-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0):
        field = np.zeros((1,) + SHAPE + (3,), np.float32)
        field[..., 2] = shift
        moved = warp(image, field)
        mask = np.zeros((1,) + SHAPE, np.float32)
        mask[:, :, :, 3:-3] = 1.0  # ignore columns that moved out of the grid
        losses[shift] = float(-ncc_windowed(image, moved, window=5, mask=mask)[0])
    assert min(losses, key=losses.get) == 0.0
    assert losses[-2.0] > losses[-1.0] > losses[0.0] < losses[1.0] < losses[2.0]


def test_windowed_ncc_gradient_is_finite_on_flat_regions():
    flat = np.zeros((1, 8, 8, 8, 1), np.float32)
    flat[:, 2:5, 2:5, 2:5] = 1.0
    b = tf.Variable(flat + 0.01)
    with tf.GradientTape() as tape:
        loss = -tf.reduce_mean(ncc_windowed(flat, b, window=3))
    grad = tape.gradient(loss, b).numpy()
    assert np.all(np.isfinite(grad)) and np.abs(grad).max() > 0


def test_ncc_input_validation():
    with pytest.raises(ConfigError, match="spatial"):
        ncc_global(np.zeros((4, 4), np.float32), np.zeros((4, 4), np.float32))
    with pytest.raises(ConfigError, match="window"):
        ncc_windowed(np.zeros((1, 8, 8, 1), np.float32), np.zeros((1, 8, 8, 1), np.float32),
                     window=4)


# ---------------------------------------------------------------- smoothness

def test_smoothness_zero_for_constant_known_for_ramp():
    constant = np.broadcast_to(np.array([0.3, -2.0, 5.0], np.float32), (2,) + SHAPE + (3,))
    np.testing.assert_allclose(smoothness_l2(constant).numpy(), 0.0, atol=1e-12)
    # u_x = 0.5 * x index: only the x-axis differences are non-zero (0.5 in one component of
    # three), so the mean over axes of the mean squared differences is 0.25 / 3 / 3.
    ramp = np.zeros((1,) + SHAPE + (3,), np.float32)
    ramp[..., 2] = 0.5 * np.arange(SHAPE[2])
    np.testing.assert_allclose(smoothness_l2(ramp).numpy(), [0.25 / 9.0], rtol=1e-5)
    rng = np.random.default_rng(5)
    field = rng.standard_normal((1,) + SHAPE + (3,)).astype(np.float32)
    assert float(SmoothnessL2Loss()(np.zeros_like(field), field)) > 0.0  # y_true is ignored


# ---------------------------------------------------------------- Dice

def _cube(shape, lo, hi, value=1):
    out = np.zeros(shape, np.int32)
    out[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = value
    return out


def test_dice_identical_disjoint_and_known_cubes():
    a = _cube(SHAPE, (2, 2, 2), (6, 6, 6))  # 64 voxels
    b = _cube(SHAPE, (3, 3, 3), (8, 8, 8))  # 125 voxels, overlap [3, 6)^3 = 27
    far = _cube(SHAPE, (10, 8, 12), (14, 11, 18))
    np.testing.assert_allclose(dice(a[None], a[None]).numpy(), [[1.0]])
    np.testing.assert_allclose(dice(a[None], far[None]).numpy(), [[0.0]])
    np.testing.assert_allclose(dice(a[None], b[None]).numpy(), [[2 * 27 / (64 + 125)]], rtol=1e-6)
    fa, fb = a[None, ..., None].astype(np.float32), b[None, ..., None].astype(np.float32)
    np.testing.assert_allclose(soft_dice(fa, fb).numpy(), [[2 * 27 / (64 + 125)]], rtol=1e-5)
    np.testing.assert_allclose(soft_dice(fa, fa).numpy(), [[1.0]], rtol=1e-6)
    np.testing.assert_allclose(soft_dice_loss(fa, far[None, ..., None]).numpy(), [1.0], atol=1e-6)
    np.testing.assert_allclose(SoftDiceLoss()(fa, fb).numpy(), 1 - 2 * 27 / (64 + 125),
                               rtol=1e-5)


def test_dice_per_label_and_empty_label():
    a = _cube(SHAPE, (2, 2, 2), (6, 6, 6)) + _cube(SHAPE, (8, 6, 10), (12, 10, 16), value=2)
    b = a.copy()
    b[8:12, 6:10, 10:13] = 0  # half of label 2 removed: 96 vs 48 voxels, overlap 48
    got = dice(a[None], b[None], label_values=(1, 2, 3)).numpy()
    np.testing.assert_allclose(got, [[1.0, 2 * 48 / (96 + 48), 1.0]], rtol=1e-6)


def test_soft_dice_of_probabilities():
    p = np.full((1, 4, 4, 1), 0.5, np.float32)
    q = np.ones((1, 4, 4, 1), np.float32)
    # 2 * (16 * 0.5) / (8 + 16)
    np.testing.assert_allclose(soft_dice(p, q).numpy(), [[16.0 / 24.0]], rtol=1e-5)


# ---------------------------------------------------------------- Keras integration

@pytest.mark.parametrize("loss", [GlobalNCCLoss(eps=1e-4), WindowedNCCLoss(window=[3, 5, 7]),
                                  SoftDiceLoss(), SmoothnessL2Loss()],
                         ids=lambda loss: type(loss).__name__)
def test_loss_config_round_trip(loss):
    restored = keras.losses.deserialize(keras.losses.serialize(loss))
    assert type(restored) is type(loss) and restored.get_config() == loss.get_config()


def test_losses_compile_into_a_model():
    rng = np.random.default_rng(6)
    inputs = keras.Input((8, 8, 8, 1))
    outputs = keras.layers.Conv3D(1, 3, padding="same")(inputs)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer="adam", loss=WindowedNCCLoss(window=3))
    x = _smooth(rng, shape=(8, 8, 8), batch=2)
    history = model.fit(x, x, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
