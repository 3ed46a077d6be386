"""Scale normalisation of the network's 2D inputs: a radiograph by its mean over the femur mask,
an atlas projection by its mean over its own support (see :mod:`inference.model`, "Intensities").

Registered under the package ``hipatlas``, the names the shipped ``.keras`` files record.
"""

from __future__ import annotations

import keras
import tensorflow as tf

__all__ = ["MaskedMeanScale", "SupportMeanScale"]

_PACKAGE = "hipatlas"


@keras.saving.register_keras_serializable(package=_PACKAGE)
class MaskedMeanScale(keras.layers.Layer):
    """Mask an image and divide it by its mean inside the mask.

    Call with ``[image, mask]``, both (B, H, W, 1); returns (B, H, W, 1)
    ``image * mask / mean(image | mask)``. The mean over the femur makes the radiograph's scale
    (exposure, mu units, pixel size) irrelevant; an empty mask gives zeros.
    """

    def __init__(self, epsilon: float = 1e-6, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.epsilon = float(epsilon)

    def call(self, inputs):
        image, mask = inputs
        mask = tf.cast(mask > 0.5, image.dtype)
        masked = image * mask
        count = tf.reduce_sum(mask, axis=[1, 2, 3], keepdims=True)
        mean = tf.reduce_sum(masked, axis=[1, 2, 3], keepdims=True) / tf.maximum(count, 1.0)
        return masked / (tf.abs(mean) + self.epsilon)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[0])

    def get_config(self):
        config = super().get_config()
        config.update(epsilon=self.epsilon)
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class SupportMeanScale(keras.layers.Layer):
    """Divide a projection by its mean over its own support.

    Input and output (B, H, W, C). The support is where the image exceeds ``relative_threshold``
    times its maximum (per item and channel): for a projection of the bone-only atlas that is
    the bone's shadow, so the result is on the same footing as :class:`MaskedMeanScale`.
    """

    def __init__(self, relative_threshold: float = 1e-3, epsilon: float = 1e-6, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.relative_threshold = float(relative_threshold)
        self.epsilon = float(epsilon)

    def call(self, image):
        peak = tf.reduce_max(image, axis=[1, 2], keepdims=True)
        # The support is a hard threshold: no gradient flows through it (only through the sums).
        support = tf.cast(image > self.relative_threshold * peak, image.dtype)
        count = tf.reduce_sum(support, axis=[1, 2], keepdims=True)
        mean = tf.reduce_sum(image * support, axis=[1, 2], keepdims=True) / tf.maximum(count, 1.0)
        return image / (tf.abs(mean) + self.epsilon)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(relative_threshold=self.relative_threshold, epsilon=self.epsilon)
        return config
