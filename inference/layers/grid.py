"""Changes of grid inside the network: x2 upsampling of a displacement field, the index-to-world
matrix of a coarsened grid, and the plain resize of a beam-space volume to the atlas grid.

Registered under the package ``hipatlas``, the names the shipped ``.keras`` files record.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from inference.layers.sampling import trilinear_sample
from inference.model_config import _as_int_tuple
from inference.validate import positive_int

__all__ = ["UpsampleField", "CoarseIndexToWorld", "ResizeToGrid"]

_PACKAGE = "hipatlas"


@keras.saving.register_keras_serializable(package=_PACKAGE)
class UpsampleField(keras.layers.Layer):
    """Linear x2 upsampling of a voxel-unit displacement field to a grid twice as fine.

    Input (B, Z, Y, X, 3) on the coarse grid; output (B, 2Z, 2Y, 2X, 3) in fine-grid voxels.
    Coarse voxel ``a`` sits at fine index ``2a + 0.5`` (the grids share their outer edges), so
    fine index ``2i`` reads coarse coordinate ``i - 1/4`` and ``2i + 1`` reads ``i + 1/4``:
    weights 3/4 and 1/4 along each axis, with the border value repeated (as the fields are
    extended by clamping in :mod:`inference.layers.warp`). Displacements double in length
    because fine voxels are half as big.
    """

    def __init__(self, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)

    @staticmethod
    def _upsample_axis(field, axis):
        before = tf.concat([tf.gather(field, [0], axis=axis),
                            tf.gather(field, tf.range(tf.shape(field)[axis] - 1), axis=axis)], axis)
        after = tf.concat([tf.gather(field, tf.range(1, tf.shape(field)[axis]), axis=axis),
                           tf.gather(field, [tf.shape(field)[axis] - 1], axis=axis)], axis)
        even = 0.75 * field + 0.25 * before
        odd = 0.75 * field + 0.25 * after
        stacked = tf.stack([even, odd], axis=axis + 1)  # (..., n, 2, ...) interleaves on reshape
        shape = tf.shape(field)
        new_shape = tf.concat([shape[:axis], [2 * shape[axis]], shape[axis + 1:]], axis=0)
        return tf.reshape(stacked, new_shape)

    def call(self, field):
        for axis in (1, 2, 3):
            field = self._upsample_axis(field, axis)
        return 2.0 * field

    def compute_output_shape(self, input_shape):
        return (input_shape[0],) + tuple(None if s is None else 2 * s for s in input_shape[1:4]) \
            + (input_shape[4],)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class CoarseIndexToWorld(keras.layers.Layer):
    """``index_to_world`` of a grid coarsened by an integer factor (same outer edges).

    Input and output (B, 4, 4). Coarse index ``a`` lies at fine index ``f a + (f - 1) / 2``.
    """

    def __init__(self, factor: int, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.factor = positive_int(factor, "CoarseIndexToWorld factor")

    def call(self, index_to_world):
        f = float(self.factor)
        shift = (f - 1.0) / 2.0
        coarse_to_fine = tf.constant([[f, 0, 0, shift], [0, f, 0, shift], [0, 0, f, shift],
                                      [0, 0, 0, 1]], dtype=index_to_world.dtype)
        return tf.matmul(index_to_world, coarse_to_fine)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(factor=self.factor)
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class ResizeToGrid(keras.layers.Layer):
    """Trilinear resize of a beam-space volume to the atlas grid, ignoring the geometry.

    The ablation alternative to inv-ProST: input (B, K', H', W', C) is stretched to
    (B, Z, Y, X, C) with axis k -> z, v -> y, u -> x (cell centres aligned, border clamped).
    """

    def __init__(self, shape_zyx, **kwargs):
        super().__init__(**kwargs)
        self.shape_zyx = _as_int_tuple("shape_zyx", shape_zyx, 3)

    def call(self, volume):
        source = tf.cast(tf.shape(volume)[1:4], tf.float32)
        axes = []
        for axis, size in enumerate(self.shape_zyx):
            centres = (tf.range(size, dtype=tf.float32) + 0.5) * source[axis] / size - 0.5
            axes.append(tf.clip_by_value(centres, 0.0, source[axis] - 1.0))
        zz, yy, xx = tf.meshgrid(*axes, indexing="ij")
        coords = tf.stack([zz, yy, xx], axis=-1)[None]
        coords = tf.broadcast_to(coords, tf.concat([tf.shape(volume)[:1], tf.shape(coords)[1:]], 0))
        return trilinear_sample(volume, coords)

    def compute_output_shape(self, input_shape):
        return (input_shape[0],) + self.shape_zyx + (input_shape[-1],)

    def get_config(self):
        config = super().get_config()
        config.update(shape_zyx=list(self.shape_zyx))
        return config
