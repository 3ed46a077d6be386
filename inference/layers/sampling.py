"""Trilinear and nearest-neighbour sampling of batched volumes.

Both ProST (rays through the atlas), inv-ProST (voxels into beam space) and the spatial
transformer (warps) sample a (B, Z, Y, X, C) volume at continuous voxel coordinates. They share
these two functions.

Why flat gathers: on this CPU a single ``tf.gather`` on the flattened volume per corner, compiled
with XLA, samples about 6x faster than ``tf.gather_nd`` without XLA. Callers wrap their hot path
in ``tf.function(jit_compile=True)``; the functions themselves are plain TF ops.
"""

from __future__ import annotations

import tensorflow as tf


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


def nearest_sample(volume, coords_zyx):
    """Sample ``volume`` at the nearest voxel (for label maps); zero outside the grid.

    Shapes as :func:`trilinear_sample`. Not differentiable with respect to the coordinates.
    """
    volume = tf.convert_to_tensor(volume)
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
