"""Small tensor-plumbing layers of the registration network: pick a view, copy a map along the
beam depth, stop a gradient, recompute a block in the backward pass.

Registered under the package ``hipatlas`` (``hipatlas>ViewSelect`` ...), the names the shipped
``.keras`` files record, so moving a layer between modules never breaks loading.
"""

from __future__ import annotations

from collections.abc import Mapping

import keras
import tensorflow as tf

from inference.errors import ConfigError
from inference.validate import positive_int

__all__ = ["ViewSelect", "StopGradient", "CopyAlongDepth", "Recomputed"]

_PACKAGE = "hipatlas"


@keras.saving.register_keras_serializable(package=_PACKAGE)
class ViewSelect(keras.layers.Layer):
    """Pick one view of a stacked two-view tensor.

    Input (B, V, ...); output (B, ...) for view ``view``, with a trailing channel axis added when
    ``add_channel`` (images (B, 2, H, W) -> (B, H, W, 1)).
    """

    def __init__(self, view: int, add_channel: bool = False, **kwargs):
        # float32 even under mixed precision: projection matrices must not be rounded to float16.
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if isinstance(view, bool) or not isinstance(view, int) or view < 0:
            raise ConfigError(f"view must be a non-negative integer, not {view!r}")
        self.view = view
        self.add_channel = bool(add_channel)

    def call(self, inputs):
        selected = inputs[:, self.view]
        return selected[..., None] if self.add_channel else selected

    def compute_output_shape(self, input_shape):
        shape = (input_shape[0],) + tuple(input_shape[2:])
        return shape + (1,) if self.add_channel else shape

    def get_config(self):
        config = super().get_config()
        config.update(view=self.view, add_channel=self.add_channel)
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class StopGradient(keras.layers.Layer):
    """Identity in the forward pass, no gradient backwards (shape unchanged)."""

    def __init__(self, **kwargs):
        kwargs.setdefault("dtype", "float32")  # carries the warped atlas into ProST
        super().__init__(**kwargs)

    def call(self, inputs):
        return tf.stop_gradient(inputs)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class CopyAlongDepth(keras.layers.Layer):
    """Copy a 2D feature map along a new beam-depth axis: (B, H, W, C) -> (B, D, H, W, C)."""

    def __init__(self, copies: int, **kwargs):
        super().__init__(**kwargs)
        self.copies = positive_int(copies, "CopyAlongDepth copies")

    def call(self, inputs):
        return tf.repeat(inputs[:, None], self.copies, axis=1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.copies) + tuple(input_shape[1:])

    def get_config(self):
        config = super().get_config()
        config.update(copies=self.copies)
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class Recomputed(keras.layers.Layer):
    """A sub-model whose activations are recomputed in the backward pass (gradient checkpointing).

    Forward passes (``training`` false) simply call ``inner``. In training the forward pass keeps
    only the block's inputs and outputs; the backward pass runs ``inner`` again to get the
    activations it needs (:func:`keras.remat`, i.e. ``tf.recompute_grad``). Calling one instance
    on several inputs shares ``inner`` (and its weights) between them.

    Parameters
    ----------
    inner : keras.Model
        The block, a functional model taking a list of tensors.
    """

    def __init__(self, inner, **kwargs):
        super().__init__(**kwargs)
        if isinstance(inner, Mapping):  # from get_config
            inner = keras.saving.deserialize_keras_object(inner)
        if not isinstance(inner, keras.Model):
            raise ConfigError(f"{self.name}: the recomputed block must be a Keras model, not "
                              f"{type(inner).__name__}")
        self.inner = inner

    def build(self, input_shape):
        self.built = True  # ``inner`` is a built functional model

    def call(self, inputs, training=None):
        if not training:
            return self.inner(list(inputs), training=training)

        def block(*tensors):
            return self.inner(list(tensors), training=True)

        return keras.remat(block)(*inputs)

    def compute_output_spec(self, inputs, training=None):
        return self.inner.compute_output_spec(list(inputs))

    def get_config(self):
        config = super().get_config()
        config.update(inner=keras.saving.serialize_keras_object(self.inner))
        return config
