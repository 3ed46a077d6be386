"""Similarity, regularisation and overlap measures for registration training and evaluation.

All functions take batched tensors shaped (B, *spatial, C) with 2 or 3 spatial axes (radiographs
(B, H, W, C) or volumes (B, Z, Y, X, C)) and return one value per batch item, shape (B,), or per
item and class. Similarities are returned as similarities (NCC in [-1, 1], Dice in [0, 1]); the
losses are their negatives (``-NCC``) or complements (``1 - Dice``). The Keras ``Loss``
subclasses at the end wrap them for ``model.compile``.

Masks are optional weights shaped (B, *spatial) or (B, *spatial, 1); a statistic is then the
mask-weighted mean instead of the plain mean.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from inference.errors import ConfigError

_PACKAGE = "hipatlas"


def _spatial_axes(x):
    rank = x.shape.rank
    if rank not in (4, 5):
        raise ConfigError(
            f"expected a tensor shaped (batch, *spatial, channels) with 2 or 3 spatial axes, "
            f"got shape {tuple(x.shape)}")
    return list(range(1, rank - 1))


def _as_float_pair(a, b):
    a = tf.cast(a, tf.float32)
    b = tf.cast(b, tf.float32)
    axes = _spatial_axes(a)
    if a.shape.rank != b.shape.rank:
        raise ConfigError(f"tensors to compare have different ranks: {tuple(a.shape)} and "
                          f"{tuple(b.shape)}")
    return a, b, axes


def _mask_weights(mask, like):
    """Mask as float weights shaped (B, *spatial, 1), or None."""
    if mask is None:
        return None
    mask = tf.cast(mask, tf.float32)
    if mask.shape.rank == like.shape.rank - 1:
        mask = mask[..., None]
    if mask.shape.rank != like.shape.rank:
        raise ConfigError(f"mask shape {tuple(mask.shape)} does not match images "
                          f"{tuple(like.shape)}")
    return mask


def _weighted_mean(x, weights, axes):
    if weights is None:
        return tf.reduce_mean(x, axis=axes, keepdims=True)
    total = tf.reduce_sum(weights, axis=axes, keepdims=True)
    return tf.reduce_sum(x * weights, axis=axes, keepdims=True) / tf.maximum(total, 1e-12)


def ncc_global(a, b, mask=None, eps=1e-6):
    """Global normalised cross-correlation (Pearson correlation) per batch item.

    Parameters
    ----------
    a, b : tensor, shape (B, *spatial, C)
    mask : tensor (B, *spatial[, 1]) or None
        Weights of the voxels / pixels included.
    eps : float
        Added to each variance so that a constant image gives 0 instead of NaN. Relative to
        the image variance, so keep it well below it.

    Returns
    -------
    tensor, shape (B,)
        NCC averaged over channels, in [-1, 1]; 1 for ``b = s * a + t`` with ``s > 0``.
    """
    a, b, axes = _as_float_pair(a, b)
    weights = _mask_weights(mask, a)
    da = a - _weighted_mean(a, weights, axes)
    db = b - _weighted_mean(b, weights, axes)
    cov = _weighted_mean(da * db, weights, axes)
    var_a = _weighted_mean(da * da, weights, axes)
    var_b = _weighted_mean(db * db, weights, axes)
    ncc = cov / tf.sqrt((var_a + eps) * (var_b + eps))
    return tf.reduce_mean(tf.reshape(ncc, [tf.shape(ncc)[0], -1]), axis=1)


def _box_mean(x, window, axes):
    """Mean over a centred box, separably; near borders over the part inside the image.

    TF's average pooling with SAME padding divides by the number of in-image elements, so the
    local statistics near the border are exact statistics of the truncated window rather than
    being pulled towards zero. The box is a product of intervals, so three 1-D means give the
    same result as one 3-D mean at O(3k) instead of O(k^3) per voxel.
    """
    ndim = len(axes)
    pool = tf.nn.avg_pool3d if ndim == 3 else tf.nn.avg_pool2d
    for axis, size in enumerate(window):
        if size == 1:
            continue
        ksize = [1] * (ndim + 2)
        ksize[axis + 1] = size
        x = pool(x, ksize=ksize, strides=[1] * (ndim + 2), padding="SAME")
    return x


def _standardise(x, axes):
    # NCC is invariant to a global affine intensity change; standardising first keeps the
    # float32 difference ``E[ab] - E[a] E[b]`` well conditioned (e.g. HU images with means of
    # hundreds) and makes ``eps`` relative to the image's own variance.
    mean, var = tf.nn.moments(x, axes=axes, keepdims=True)
    return (x - mean) * tf.math.rsqrt(var + 1e-12)


def ncc_map(a, b, window=9, eps=1e-5):
    """Local NCC at every voxel / pixel over a centred box window.

    Parameters
    ----------
    a, b : tensor, shape (B, *spatial, C)
    window : int or sequence of ints (odd), one per spatial axis
    eps : float
        Added to each local variance (images are standardised globally first, so this is
        relative to the global variance); flat windows give 0.

    Returns
    -------
    tensor, shape (B, *spatial, C)
    """
    a, b, axes = _as_float_pair(a, b)
    window = _window(window, len(axes))
    a = _standardise(a, axes)
    b = _standardise(b, axes)
    # One pooling pass over all five moment maps stacked along channels.
    stacked = tf.concat([a, b, a * a, b * b, a * b], axis=-1)
    means = _box_mean(stacked, window, axes)
    mean_a, mean_b, mean_aa, mean_bb, mean_ab = tf.split(means, 5, axis=-1)
    cov = mean_ab - mean_a * mean_b
    var_a = tf.maximum(mean_aa - mean_a * mean_a, 0.0)
    var_b = tf.maximum(mean_bb - mean_b * mean_b, 0.0)
    return cov / tf.sqrt((var_a + eps) * (var_b + eps))


def _window(window, ndim):
    sizes = (window,) * ndim if isinstance(window, int) else tuple(window)
    if len(sizes) != ndim or any(int(s) != s or s < 1 or s % 2 == 0 for s in sizes):
        raise ConfigError(f"window must be an odd positive size per spatial axis ({ndim}), "
                          f"not {window!r}")
    return tuple(int(s) for s in sizes)


def ncc_windowed(a, b, window=9, mask=None, eps=1e-5):
    """Mean local (windowed) NCC per batch item.

    Parameters
    ----------
    a, b : tensor, shape (B, *spatial, C)
    window : int or sequence of odd ints
        Box size in voxels / pixels (9 as in VoxelMorph).
    mask : tensor (B, *spatial[, 1]) or None
        Weights of the voxels whose local NCC is averaged.
    eps : float
        See :func:`ncc_map`.

    Returns
    -------
    tensor, shape (B,)
    """
    local = ncc_map(a, b, window, eps)
    axes = list(range(1, local.shape.rank - 1))
    weights = _mask_weights(mask, local)
    mean = _weighted_mean(local, weights, axes)
    return tf.reduce_mean(tf.reshape(mean, [tf.shape(mean)[0], -1]), axis=1)


def smoothness_l2(field):
    """Mean squared forward-difference gradient of a displacement field.

    For each spatial axis, the mean over all voxels and components of the squared difference
    between neighbours along that axis; then the mean over axes (the VoxelMorph "Grad l2"
    definition, for which the paper's weight 0.01 was chosen). The caller applies the weight.

    Parameters
    ----------
    field : tensor, shape (B, *spatial, D)

    Returns
    -------
    tensor, shape (B,); 0 for a constant field.
    """
    field = tf.cast(field, tf.float32)
    axes = _spatial_axes(field)
    rank = field.shape.rank
    terms = []
    for axis in axes:
        ahead = tuple(slice(1, None) if i == axis else slice(None) for i in range(rank))
        behind = tuple(slice(None, -1) if i == axis else slice(None) for i in range(rank))
        diff = field[ahead] - field[behind]
        terms.append(tf.reduce_mean(tf.square(diff), axis=list(range(1, rank))))
    return tf.add_n(terms) / float(len(terms))


def soft_dice(a, b, eps=1e-6):
    """Soft Dice per batch item and channel.

    Parameters
    ----------
    a, b : tensor, shape (B, *spatial, C)
        Probabilities / occupancies in [0, 1].
    eps : float
        Smoothing in numerator and denominator: two empty maps give 1, disjoint ones ~0.

    Returns
    -------
    tensor, shape (B, C)
    """
    a, b, axes = _as_float_pair(a, b)
    overlap = tf.reduce_sum(a * b, axis=axes)
    total = tf.reduce_sum(a, axis=axes) + tf.reduce_sum(b, axis=axes)
    return (2.0 * overlap + eps) / (total + eps)


def soft_dice_loss(y_true, y_pred, eps=1e-6):
    """``1 - soft Dice`` averaged over channels, shape (B,)."""
    return 1.0 - tf.reduce_mean(soft_dice(y_true, y_pred, eps), axis=-1)


def dice(labels_a, labels_b, label_values=(1,)):
    """Hard Dice of integer label maps, per batch item and label value.

    Parameters
    ----------
    labels_a, labels_b : tensor, shape (B, *spatial) or (B, *spatial, 1), integer labels
    label_values : sequence of ints
        Labels to score (1 = femur, 2 = pelvis in HipAtlas label maps).

    Returns
    -------
    tensor, shape (B, len(label_values))
        ``2 |A & B| / (|A| + |B|)``; 1 where both maps lack the label (they agree).
    """
    labels_a = tf.convert_to_tensor(labels_a)
    labels_b = tf.convert_to_tensor(labels_b)
    if labels_a.shape.rank != labels_b.shape.rank:
        raise ConfigError(f"label maps have different ranks: {tuple(labels_a.shape)} and "
                          f"{tuple(labels_b.shape)}")
    if not label_values:
        raise ConfigError("label_values must name at least one label")
    # Round rather than truncate so that float label maps from nearest warping compare exactly.
    labels_a = tf.cast(tf.round(tf.cast(labels_a, tf.float32)), tf.int32)
    labels_b = tf.cast(tf.round(tf.cast(labels_b, tf.float32)), tf.int32)
    axes = list(range(1, labels_a.shape.rank))
    scores = []
    for value in label_values:
        in_a = tf.cast(tf.equal(labels_a, int(value)), tf.float32)
        in_b = tf.cast(tf.equal(labels_b, int(value)), tf.float32)
        overlap = tf.reduce_sum(in_a * in_b, axis=axes)
        total = tf.reduce_sum(in_a, axis=axes) + tf.reduce_sum(in_b, axis=axes)
        scores.append(tf.where(total > 0, 2.0 * overlap / tf.maximum(total, 1.0), 1.0))
    return tf.stack(scores, axis=-1)


# --------------------------------------------------------------------------------------------
# Keras losses
# --------------------------------------------------------------------------------------------

@keras.saving.register_keras_serializable(package=_PACKAGE)
class GlobalNCCLoss(keras.losses.Loss):
    """``-ncc_global(y_true, y_pred)`` per sample; inputs (B, *spatial, C)."""

    def __init__(self, eps=1e-6, name="global_ncc", **kwargs):
        super().__init__(name=name, **kwargs)
        self.eps = float(eps)

    def call(self, y_true, y_pred):
        return -ncc_global(y_true, y_pred, eps=self.eps)

    def get_config(self):
        return {**super().get_config(), "eps": self.eps}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class WindowedNCCLoss(keras.losses.Loss):
    """``-ncc_windowed(y_true, y_pred, window)`` per sample; inputs (B, *spatial, C)."""

    def __init__(self, window=9, eps=1e-5, name="windowed_ncc", **kwargs):
        super().__init__(name=name, **kwargs)
        self.window = window if isinstance(window, int) else [int(w) for w in window]
        self.eps = float(eps)

    def call(self, y_true, y_pred):
        return -ncc_windowed(y_true, y_pred, self.window, eps=self.eps)

    def get_config(self):
        return {**super().get_config(), "window": self.window, "eps": self.eps}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class SoftDiceLoss(keras.losses.Loss):
    """``1 - soft Dice`` per sample, averaged over channels; inputs (B, *spatial, C)."""

    def __init__(self, eps=1e-6, name="soft_dice", **kwargs):
        super().__init__(name=name, **kwargs)
        self.eps = float(eps)

    def call(self, y_true, y_pred):
        return soft_dice_loss(y_true, y_pred, self.eps)

    def get_config(self):
        return {**super().get_config(), "eps": self.eps}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class SmoothnessL2Loss(keras.losses.Loss):
    """:func:`smoothness_l2` of ``y_pred`` (a field); ``y_true`` is ignored."""

    def __init__(self, name="smoothness_l2", **kwargs):
        super().__init__(name=name, **kwargs)

    def call(self, y_true, y_pred):
        del y_true
        return smoothness_l2(y_pred)
