"""The atlas inside the network: its volume as non-trainable weights, and label masks of it.

Registered under the package ``hipatlas`` (``hipatlas>AtlasVolume``, ``hipatlas>LabelMask``), the
names the shipped ``.keras`` files record.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from inference.errors import ConfigError
from inference.model_config import FEMUR_LABEL, _as_int_tuple

__all__ = ["AtlasVolume", "LabelMask"]

_PACKAGE = "hipatlas"


@keras.saving.register_keras_serializable(package=_PACKAGE)
class AtlasVolume(keras.layers.Layer):
    """The atlas, stored as two non-trainable weights and broadcast to the batch.

    Call with any tensor whose first axis is the batch (e.g. ``index_to_world`` (B, 4, 4));
    returns ``[intensity, labels]``, each (B, Z, Y, X, 1) float32: the femur's relative attenuation
    (:func:`inference.model.femur_intensity`) and the label map (0 background, 1 femur, 2 pelvis).

    The model's :class:`~inference.model_config.ModelConfig` rides along in this layer's config
    (``model_config``), so a ``.keras`` file carries the config that built it
    (:func:`inference.model.model_config_of`).

    Parameters
    ----------
    shape_zyx : 3 ints
    model_config : dict or None
        ``ModelConfig.to_dict()`` of the model (stored verbatim).
    """

    def __init__(self, shape_zyx, model_config: dict | None = None, **kwargs):
        kwargs.setdefault("dtype", "float32")  # geometry stays float32 under mixed precision
        super().__init__(**kwargs)
        self.shape_zyx = _as_int_tuple("shape_zyx", shape_zyx, 3)
        self.model_config = None if model_config is None else dict(model_config)

    def build(self, input_shape):
        shape = self.shape_zyx + (1,)
        self.intensity = self.add_weight(name="intensity", shape=shape, initializer="zeros",
                                         trainable=False, dtype="float32")
        self.labels = self.add_weight(name="labels", shape=shape, initializer="zeros",
                                      trainable=False, dtype="float32")
        self.built = True

    def set_atlas(self, intensity: np.ndarray, labels: np.ndarray) -> None:
        """Store the atlas arrays, each (Z, Y, X) (or (Z, Y, X, 1))."""
        shape = self.shape_zyx + (1,)
        for name, array in (("intensity", intensity), ("labels", labels)):
            if np.asarray(array).reshape(-1).size != int(np.prod(shape)):
                raise ConfigError(f"atlas {name} has shape {np.shape(array)}, the model grid is "
                                  f"{self.shape_zyx}")
        self.intensity.assign(np.asarray(intensity, np.float32).reshape(shape))
        self.labels.assign(np.asarray(labels, np.float32).reshape(shape))

    def call(self, reference):
        batch = tf.shape(reference)[0]
        shape = tf.concat([[batch], tf.constant(self.shape_zyx + (1,), tf.int32)], axis=0)
        return [tf.broadcast_to(self.intensity[None], shape), tf.broadcast_to(self.labels[None], shape)]

    def compute_output_shape(self, input_shape):
        shape = (input_shape[0],) + self.shape_zyx + (1,)
        return [shape, shape]

    def get_config(self):
        config = super().get_config()
        config.update(shape_zyx=list(self.shape_zyx), model_config=self.model_config)
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class LabelMask(keras.layers.Layer):
    """1.0 where a label map equals ``label``, else 0.0; shape unchanged (B, ..., 1)."""

    def __init__(self, label: int = FEMUR_LABEL, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.label = int(label)

    def call(self, labels):
        return tf.cast(tf.equal(tf.round(labels), float(self.label)), tf.float32)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(label=self.label)
        return config
