"""The two baselines of the paper's Table 1, and their small resumable training loop.

SDM (statistical deformation model)
    Each training subject's femur is registered in 3D/3D to the atlas with SimpleITK (an affine
    transform on the smoothed femur masks, then fast symmetric-forces demons), the total
    deformation (affine and deformable together) is sampled on a coarse grid (every
    ``SDM_FACTOR``-th voxel) and a PCA of these fields is the SDM
    (:class:`StatisticalDeformationModel`). A small network (:func:`build_sdm_regressor`: one 2D
    encoder per view, pooled, concatenated, dense) regresses the normalised PCA weights from the
    two radiographs and their masks; the prediction is the atlas warped by the reconstructed field.
Kasten-style direct regression
    :func:`build_kasten_net`: one 2D encoder per view, fused in a dense bottleneck and decoded by
    3D transposed convolutions into the femur label map at half the grid's resolution (Dice + BCE
    loss, :func:`dice_bce_loss`); no atlas, no deformation.

Neither network sees the projection matrices (the paper's baselines do not either); both use only
standard Keras layers and :class:`inference.model.ViewSelect`, are saved as ``.keras`` and load with
``safe_mode=True``. Fields are (z, y, x, 3) arrays in voxel units of the full grid (z, y, x order):
atlas index = grid index + field.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from inference.errors import ConfigError, DataError

log = logging.getLogger(__name__)

#: The SDM's fields keep every SDM_FACTOR-th voxel; registration runs at REGISTER_FACTOR.
SDM_FACTOR = 4
REGISTER_FACTOR = 2
#: The Kasten-style network predicts the label map at 1/KASTEN_FACTOR of the grid's resolution.
KASTEN_FACTOR = 2
_PACKAGE = "hipatlas"


# --------------------------------------------------------------------------------------------
# 3D/3D registration of the atlas to one subject
# --------------------------------------------------------------------------------------------

def _block_mean(volume: np.ndarray, factor: int) -> np.ndarray:
    z, y, x = (s // factor for s in volume.shape)
    v = np.asarray(volume, np.float32)[:z * factor, :y * factor, :x * factor]
    return v.reshape(z, factor, y, factor, x, factor).mean(axis=(1, 3, 5))


def _sitk_image(array: np.ndarray, spacing_zyx_mm: Sequence[float], factor: int):
    """A SimpleITK image whose physical frame is the full grid's index * spacing (block centres)."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.asarray(array, np.float32))
    spacing_xyz = [float(s) for s in spacing_zyx_mm[::-1]]
    image.SetSpacing([s * factor for s in spacing_xyz])
    image.SetOrigin([s * (factor - 1) / 2.0 for s in spacing_xyz])
    return image


def register_atlas_to_subject(atlas_mask: np.ndarray, subject_mask: np.ndarray, spacing_zyx_mm: Sequence[float], *,
                              affine_iterations: int = 100, demons_iterations: int = 60,
                              demons_sd: float = 1.5) -> np.ndarray:
    """The coarse field (every ``SDM_FACTOR``-th voxel, (z, y, x, 3), voxel units) that maps each
    subject voxel to its atlas voxel: affine on smoothed masks, then symmetric-forces demons."""
    import SimpleITK as sitk

    if atlas_mask.shape != subject_mask.shape:
        raise DataError(f"atlas {atlas_mask.shape} and subject {subject_mask.shape} are on different grids")
    if not np.any(atlas_mask) or not np.any(subject_mask):
        raise DataError("a femur mask for the SDM registration is empty")
    smooth = [_sitk_image(_block_mean(m.astype(np.float32), REGISTER_FACTOR), spacing_zyx_mm, REGISTER_FACTOR)
              for m in (subject_mask, atlas_mask)]
    fixed, moving = (sitk.SmoothingRecursiveGaussian(im, 1.5) for im in smooth)
    initial = sitk.CenteredTransformInitializer(fixed, moving, sitk.AffineTransform(3),
                                                sitk.CenteredTransformInitializerFilter.MOMENTS)
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMeanSquares()
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(learningRate=2.0, minStep=1e-3,
                                                    numberOfIterations=affine_iterations)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetInitialTransform(initial, inPlace=False)
    affine = method.Execute(fixed, moving)
    moved = sitk.Resample(moving, fixed, affine, sitk.sitkLinear, 0.0)
    demons = sitk.FastSymmetricForcesDemonsRegistrationFilter()
    demons.SetNumberOfIterations(demons_iterations)
    demons.SetStandardDeviations(demons_sd)
    displacement = demons.Execute(fixed, moved)
    total = sitk.CompositeTransform(affine)
    total.AddTransform(sitk.DisplacementFieldTransform(sitk.Cast(displacement, sitk.sitkVectorFloat64)))
    return _coarse_field(total, atlas_mask.shape, spacing_zyx_mm)


def _coarse_field(transform, shape_zyx: Sequence[int], spacing_zyx_mm: Sequence[float]) -> np.ndarray:
    import SimpleITK as sitk

    spacing = np.asarray(spacing_zyx_mm, np.float64)
    reference = _sitk_image(np.zeros([s // SDM_FACTOR for s in shape_zyx], np.float32), spacing, 1)
    reference.SetSpacing([float(s) * SDM_FACTOR for s in spacing[::-1]])
    reference.SetOrigin([0.0, 0.0, 0.0])
    field_xyz_mm = sitk.GetArrayFromImage(sitk.TransformToDisplacementField(
        transform, sitk.sitkVectorFloat64, reference.GetSize(), reference.GetOrigin(), reference.GetSpacing(),
        reference.GetDirection()))
    return (field_xyz_mm[..., ::-1] / spacing).astype(np.float32)


def warp_with_coarse_field(atlas: np.ndarray, field: np.ndarray, *, order: int = 0) -> np.ndarray:
    """``atlas`` sampled at grid index + the coarse ``field`` upsampled (linearly) to the grid."""
    from scipy import ndimage

    shape = atlas.shape
    coarse = np.asarray(field, np.float64)
    # coarse sample k sits at grid index k * SDM_FACTOR
    coords = [np.arange(s, dtype=np.float64) / SDM_FACTOR for s in shape]
    grid = np.meshgrid(*coords, indexing="ij")
    dense = np.stack([ndimage.map_coordinates(coarse[..., c], grid, order=1, mode="nearest") for c in range(3)])
    index = np.indices(shape, dtype=np.float64) + dense
    return ndimage.map_coordinates(np.asarray(atlas, np.float32), index, order=order, mode="constant", cval=0.0)


# --------------------------------------------------------------------------------------------
# The statistical deformation model
# --------------------------------------------------------------------------------------------

@dataclass
class StatisticalDeformationModel:
    """PCA of coarse deformation fields: field = mean + sum_k w_k * sd_k * component_k."""

    mean: np.ndarray          # (z, y, x, 3)
    components: np.ndarray    # (K, z*y*x*3), orthonormal rows
    sd: np.ndarray            # (K,), the components' standard deviations

    @classmethod
    def fit(cls, fields: np.ndarray, n_components: int) -> "StatisticalDeformationModel":
        fields = np.asarray(fields, np.float64)
        if fields.ndim != 5 or fields.shape[0] < 2:
            raise DataError(f"the SDM needs at least two (z, y, x, 3) fields, not an array of shape {fields.shape}")
        mean = fields.mean(axis=0)
        centred = (fields - mean).reshape(len(fields), -1)
        _, singular, vt = np.linalg.svd(centred, full_matrices=False)
        k = max(1, min(int(n_components), len(fields) - 1))
        sd = singular[:k] / np.sqrt(len(fields) - 1)
        return cls(mean.astype(np.float32), vt[:k].astype(np.float32), np.maximum(sd, 1e-8).astype(np.float32))

    @property
    def n_components(self) -> int:
        return int(len(self.sd))

    def weights(self, field: np.ndarray) -> np.ndarray:
        """Normalised PCA weights (units of sd) of ``field``."""
        centred = (np.asarray(field, np.float64) - self.mean).reshape(-1)
        return (self.components.astype(np.float64) @ centred / self.sd).astype(np.float32)

    def field(self, weights: np.ndarray) -> np.ndarray:
        flat = (np.asarray(weights, np.float64) * self.sd) @ self.components.astype(np.float64)
        return (self.mean + flat.reshape(self.mean.shape)).astype(np.float32)

    def save(self, path: str | os.PathLike) -> pathlib.Path:
        path = pathlib.Path(path)
        tmp = path.with_name(f".{path.stem}.tmp.npz")
        np.savez(tmp, mean=self.mean, components=self.components, sd=self.sd)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "StatisticalDeformationModel":
        with np.load(path, allow_pickle=False) as data:
            return cls(data["mean"], data["components"], data["sd"])


# --------------------------------------------------------------------------------------------
# Networks
# --------------------------------------------------------------------------------------------

def _keras():
    import keras

    return keras


def dice_bce_loss(y_true, y_pred):
    """Soft Dice + binary cross-entropy of a probability map (the Kasten-style network's loss)."""
    keras = _keras()
    ops = keras.ops
    y_true = ops.cast(y_true, y_pred.dtype)
    axes = tuple(range(1, len(y_pred.shape)))
    intersection = ops.sum(y_true * y_pred, axis=axes)
    soft_dice = (2.0 * intersection + 1.0) / (ops.sum(y_true, axis=axes) + ops.sum(y_pred, axis=axes) + 1.0)
    bce = ops.mean(keras.losses.binary_crossentropy(y_true, y_pred), axis=axes[:-1])
    return 1.0 - soft_dice + bce


def _registered_loss():
    keras = _keras()
    name = f"{_PACKAGE}>dice_bce_loss"
    if keras.saving.get_registered_object(name) is None:
        keras.saving.register_keras_serializable(package=_PACKAGE)(dice_bce_loss)
    return dice_bce_loss


def _view_encoders(detector_hw: Sequence[int], filters: Sequence[int]):
    keras = _keras()
    from inference.model import ViewSelect

    h, w = (int(v) for v in detector_hw)
    images = keras.Input((2, h, w), name="images")
    masks = keras.Input((2, h, w), name="masks")
    features = []
    for view in range(2):
        x = keras.layers.Concatenate(name=f"view{view}_input")([
            ViewSelect(view, add_channel=True, name=f"image{view}")(images),
            ViewSelect(view, add_channel=True, name=f"mask{view}")(masks)])
        for level, f in enumerate(filters):
            x = keras.layers.Conv2D(f, 3, strides=2, padding="same", activation="relu",
                                    name=f"view{view}_conv{level}")(x)
        features.append(x)
    return [images, masks], features


def build_sdm_regressor(detector_hw: Sequence[int], n_components: int, *, filters: Sequence[int] = (16, 32, 64, 64),
                        dense: int = 128, lr: float = 1e-3, seed: int = 0):
    """Two views -> the SDM's normalised PCA weights (MSE)."""
    keras = _keras()
    keras.utils.set_random_seed(seed)
    inputs, features = _view_encoders(detector_hw, filters)
    pooled = [keras.layers.GlobalAveragePooling2D(name=f"view{v}_pool")(f) for v, f in enumerate(features)]
    x = keras.layers.Concatenate(name="fused")(pooled)
    x = keras.layers.Dense(dense, activation="relu", name="dense")(x)
    out = keras.layers.Dense(int(n_components), name="sdm_weights")(x)
    model = keras.Model(inputs, out, name="sdm_regressor")
    model.compile(optimizer=keras.optimizers.Adam(lr), loss="mse")
    return model


def build_kasten_net(detector_hw: Sequence[int], label_shape_zyx: Sequence[int], *,
                     filters: Sequence[int] = (16, 32, 64, 64), decoder: Sequence[int] = (32, 16, 8),
                     lr: float = 1e-3, seed: int = 0):
    """Two views -> femur probability map of shape ``label_shape_zyx`` (Dice + BCE).

    The decoder starts at ``label_shape_zyx / 2**len(decoder)`` (each size must divide)."""
    keras = _keras()
    keras.utils.set_random_seed(seed)
    scale = 2 ** len(decoder)
    if any(int(s) % scale for s in label_shape_zyx):
        raise ConfigError(f"the label grid {tuple(label_shape_zyx)} must divide by {scale} for this decoder")
    start = [int(s) // scale for s in label_shape_zyx]
    inputs, features = _view_encoders(detector_hw, filters)
    flat = [keras.layers.Flatten(name=f"view{v}_flat")(
        keras.layers.Conv2D(8, 1, activation="relu", name=f"view{v}_squeeze")(f)) for v, f in enumerate(features)]
    x = keras.layers.Concatenate(name="fused")(flat)
    x = keras.layers.Dense(int(np.prod(start)) * int(decoder[0]), activation="relu", name="bottleneck")(x)
    x = keras.layers.Reshape((*start, int(decoder[0])), name="to_3d")(x)
    for level, f in enumerate(decoder):
        x = keras.layers.Conv3DTranspose(int(f), 2, strides=2, padding="same", activation="relu",
                                         name=f"up{level}")(x)
    out = keras.layers.Conv3D(1, 3, padding="same", activation="sigmoid", name="femur_probability")(x)
    model = keras.Model(inputs, out, name="kasten_net")
    model.compile(optimizer=keras.optimizers.Adam(lr), loss=_registered_loss())
    return model


def load_baseline(path: str | os.PathLike):
    """A baseline network saved by :func:`train_baseline` (``safe_mode=True``)."""
    from inference.model import ViewSelect  # noqa: F401  (registers the layer)

    _registered_loss()
    return _keras().saving.load_model(str(path), safe_mode=True)


def kasten_target(labels: np.ndarray) -> np.ndarray:
    """The femur mask at the Kasten-style network's resolution ((z, y, x, 1), 0/1)."""
    from inference.model import FEMUR_LABEL

    return (_block_mean(np.asarray(labels) == FEMUR_LABEL, KASTEN_FACTOR) >= 0.5).astype(np.float32)[..., None]


def kasten_labels(probability: np.ndarray, shape_zyx: Sequence[int]) -> np.ndarray:
    """The network's half-resolution probability map as a femur label map on the full grid."""
    p = np.asarray(probability)[..., 0] >= 0.5
    for axis in range(3):
        p = np.repeat(p, KASTEN_FACTOR, axis=axis)
    out = np.zeros(tuple(shape_zyx), np.uint8)
    z, y, x = (min(a, b) for a, b in zip(p.shape, shape_zyx))
    out[:z, :y, :x] = p[:z, :y, :x]
    return out


# --------------------------------------------------------------------------------------------
# A seeded, resumable training loop
# --------------------------------------------------------------------------------------------

def _save_keras(model, path: pathlib.Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".keras", dir=path.parent)
    os.close(fd)
    try:
        model.save(tmp)
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def train_baseline(build: Callable[[], Any], inputs: dict[str, np.ndarray], targets: np.ndarray,
                   out: str | os.PathLike, *, steps: int, batch: int = 4, seed: int = 0,
                   checkpoint_every: int = 200, report: Callable[[int, int, float], None] | None = None) -> Any:
    """Train ``build()`` on ``(inputs, targets)`` for ``steps`` steps; resumable.

    Batch ``s`` is drawn from ``default_rng([seed, s])``, so a run resumed from a checkpoint sees
    the same batches as one that never stopped. ``OUT/checkpoint.keras`` + ``OUT/state.json`` are
    written every ``checkpoint_every`` steps (the optimiser state is in the .keras file), the
    final model to ``OUT/model.keras``. ``report(step, steps, loss)`` is called at each
    checkpoint (it may raise :class:`~inference.errors.Cancelled`). Returns the trained model.
    """
    from inference.io import write_json_atomic

    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    final, checkpoint, state_path = out / "model.keras", out / "checkpoint.keras", out / "state.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {"step": 0, "losses": []}
    if final.is_file() and state.get("done"):
        return load_baseline(final)
    model = load_baseline(checkpoint) if checkpoint.is_file() and state["step"] > 0 else build()
    if not checkpoint.is_file():
        state = {"step": 0, "losses": []}
    n = len(targets)
    if n < 1:
        raise DataError("no training samples for the baseline")
    running: list[float] = []
    for step in range(int(state["step"]), int(steps)):
        rows = np.random.default_rng([seed, step]).choice(n, size=min(batch, n), replace=n < batch)
        loss = model.train_on_batch({k: v[rows] for k, v in inputs.items()}, targets[rows])
        running.append(float(np.asarray(loss).reshape(-1)[0]))
        if (step + 1) % checkpoint_every == 0 or step + 1 == steps:
            state = {"step": step + 1, "losses": state["losses"] + [[step + 1, float(np.mean(running))]]}
            running = []
            _save_keras(model, checkpoint)
            write_json_atomic(state_path, state)
            log.info("baseline %s: step %d/%d loss %.4f", out.name, step + 1, steps, state["losses"][-1][1])
            if report is not None:
                report(step + 1, steps, state["losses"][-1][1])
    _save_keras(model, final)
    write_json_atomic(state_path, {**state, "done": True})
    return model


__all__ = ["SDM_FACTOR", "REGISTER_FACTOR", "KASTEN_FACTOR", "register_atlas_to_subject", "warp_with_coarse_field",
           "StatisticalDeformationModel", "dice_bce_loss", "build_sdm_regressor", "build_kasten_net",
           "load_baseline", "kasten_target", "kasten_labels", "train_baseline"]
