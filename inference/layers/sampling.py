"""Trilinear and nearest-neighbour sampling of batched volumes.

Both ProST (rays through the atlas), inv-ProST (voxels into beam space) and the spatial
transformer (warps) sample a (B, Z, Y, X, C) volume at continuous voxel coordinates. They share
these two functions.

Why flat gathers: on this CPU a single ``tf.gather`` on the flattened volume per corner, compiled
with XLA, samples about 6x faster than ``tf.gather_nd`` without XLA. Callers wrap their hot path
in ``tf.function(jit_compile=True)``; the functions themselves are plain TF ops.
"""

from __future__ import annotations

import contextlib
import threading

import tensorflow as tf

_PORTABLE = threading.local()


@contextlib.contextmanager
def portable_ops():
    """Trace the sampling layers with plain TensorFlow ops only, for an ONNX export.

    Inside this context (at trace time) ProST, inv-ProST, the warps and scaling and squaring
    skip their XLA kernels (``tf.function(jit_compile=True)`` calls, which converters keep as
    opaque function calls), their custom gradients and their chunk loops: the same arithmetic
    runs as flat gathers and element-wise ops on all sample points at once. Forward pass only.
    """
    previous = getattr(_PORTABLE, "on", False)
    _PORTABLE.on = True
    try:
        yield
    finally:
        _PORTABLE.on = previous


def portable() -> bool:
    """True inside :func:`portable_ops`."""
    return getattr(_PORTABLE, "on", False)


def _flat_volume(volume):
    shape = tf.shape(volume)
    batch, depth, height, width, channels = shape[0], shape[1], shape[2], shape[3], shape[4]
    flat = tf.reshape(volume, [batch * depth * height * width, channels])
    return flat, batch, depth, height, width, channels


def _batch_offsets(batch, voxels_per_item, points_shape):
    """Flat index of voxel 0 of each batch item, broadcast to the points' shape."""
    offsets = tf.range(batch) * voxels_per_item
    rank = tf.size(points_shape)
    return tf.reshape(offsets, tf.concat([[batch], tf.ones([rank - 1], tf.int32)], 0))


def trilinear_sample(volume, coords_zyx):
    """Sample ``volume`` at continuous voxel coordinates with trilinear interpolation.

    Parameters
    ----------
    volume : tensor, shape (B, Z, Y, X, C)
    coords_zyx : tensor, shape (B, ..., 3)
        Continuous voxel indices in (z, y, x) order; voxel centres sit at integers.

    Returns
    -------
    tensor, shape (B, ..., C)
        Interpolated values. Neighbours that fall outside the grid count as zero, so values fade
        to zero within one voxel outside the volume (zero padding, differentiable everywhere).
    """
    volume = tf.convert_to_tensor(volume)
    coords_zyx = tf.cast(coords_zyx, volume.dtype)
    if portable():
        return _trilinear_padded(volume, coords_zyx)
    flat, batch, depth, height, width, channels = _flat_volume(volume)
    points_shape = tf.shape(coords_zyx)[:-1]

    z, y, x = coords_zyx[..., 0], coords_zyx[..., 1], coords_zyx[..., 2]
    z0f, y0f, x0f = tf.floor(z), tf.floor(y), tf.floor(x)
    dz, dy, dx = z - z0f, y - y0f, x - x0f
    z0 = tf.cast(z0f, tf.int32)
    y0 = tf.cast(y0f, tf.int32)
    x0 = tf.cast(x0f, tf.int32)
    base = _batch_offsets(batch, depth * height * width, points_shape)

    result = None
    for cz in (0, 1):
        zi = z0 + cz
        wz = dz if cz else 1.0 - dz
        inside_z = (zi >= 0) & (zi < depth)
        for cy in (0, 1):
            yi = y0 + cy
            wy = dy if cy else 1.0 - dy
            inside_zy = inside_z & (yi >= 0) & (yi < height)
            for cx in (0, 1):
                xi = x0 + cx
                wx = dx if cx else 1.0 - dx
                inside = inside_zy & (xi >= 0) & (xi < width)
                index = base + (tf.clip_by_value(zi, 0, depth - 1) * height
                                + tf.clip_by_value(yi, 0, height - 1)) * width \
                    + tf.clip_by_value(xi, 0, width - 1)
                weight = wz * wy * wx * tf.cast(inside, volume.dtype)
                term = tf.gather(flat, index) * weight[..., None]
                result = term if result is None else result + term
    return result


def _padded_flat(volume, coords_zyx, high_pad):
    """Zero-pad ``volume`` by one voxel before and ``high_pad`` after each spatial axis, flatten
    it, and clamp the coordinates (shifted into the padded grid) onto the padded grid.

    A clamped point outside the volume lands on a zero layer, so it samples 0 as the masked
    version of the samplers does: no per-corner validity test or clipping is needed.
    """
    shape = volume.shape
    batch, depth, height, width, channels = (int(shape[i]) for i in range(5))
    padded = tf.pad(volume, [[0, 0], [1, high_pad], [1, high_pad], [1, high_pad], [0, 0]])
    dims = (depth + 1 + high_pad, height + 1 + high_pad, width + 1 + high_pad)
    flat = tf.reshape(padded, [batch * dims[0] * dims[1] * dims[2], channels])
    upper = tf.constant([dims[0] - high_pad, dims[1] - high_pad, dims[2] - high_pad], volume.dtype)
    coords = tf.clip_by_value(coords_zyx + 1.0, tf.zeros_like(upper), upper)
    offsets = tf.reshape(tf.range(batch) * (dims[0] * dims[1] * dims[2]),
                         [batch] + [1] * (coords.shape.rank - 2))
    return flat, dims, coords, offsets


def _trilinear_padded(volume, coords_zyx):
    """:func:`trilinear_sample` for static shapes in fewer, simpler ops (one index computation,
    eight gathers at constant offsets): the form an ONNX export runs fastest."""
    flat, (_, rows, cols), coords, offsets = _padded_flat(volume, coords_zyx, 2)
    base_f = tf.floor(coords)
    frac = coords - base_f
    base = tf.cast(base_f, tf.int32)
    index = offsets + (base[..., 0] * rows + base[..., 1]) * cols + base[..., 2]
    fz, fy, fx = frac[..., 0:1], frac[..., 1:2], frac[..., 2:3]
    result = None
    for cz, wz in ((0, 1.0 - fz), (1, fz)):
        for cy, wy in ((0, 1.0 - fy), (1, fy)):
            wzy = wz * wy
            for cx, wx in ((0, 1.0 - fx), (1, fx)):
                term = tf.gather(flat, index + ((cz * rows + cy) * cols + cx)) * (wzy * wx)
                result = term if result is None else result + term
    return result


def nearest_sample(volume, coords_zyx):
    """Sample ``volume`` at the nearest voxel (for label maps); zero outside the grid.

    Shapes as :func:`trilinear_sample`. Not differentiable with respect to the coordinates.
    """
    volume = tf.convert_to_tensor(volume)
    if portable():
        # round before the shift into the padded grid: rounding is half to even
        flat, (_, rows, cols), coords, offsets = _padded_flat(
            volume, tf.round(tf.cast(coords_zyx, tf.float32)), 1)
        rounded = tf.cast(coords, tf.int32)
        return tf.gather(flat, offsets + (rounded[..., 0] * rows + rounded[..., 1]) * cols
                         + rounded[..., 2])
    flat, batch, depth, height, width, channels = _flat_volume(volume)
    points_shape = tf.shape(coords_zyx)[:-1]
    rounded = tf.cast(tf.round(tf.cast(coords_zyx, tf.float32)), tf.int32)
    zi, yi, xi = rounded[..., 0], rounded[..., 1], rounded[..., 2]
    inside = ((zi >= 0) & (zi < depth) & (yi >= 0) & (yi < height) & (xi >= 0) & (xi < width))
    base = _batch_offsets(batch, depth * height * width, points_shape)
    index = base + (tf.clip_by_value(zi, 0, depth - 1) * height
                    + tf.clip_by_value(yi, 0, height - 1)) * width + tf.clip_by_value(xi, 0, width - 1)
    values = tf.gather(flat, index)
    return tf.where(inside[..., None], values, tf.zeros_like(values))
