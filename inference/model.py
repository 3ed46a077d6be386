"""The registration network of Van Houtte et al. (IJCARS 2022), built from a frozen config.

The network registers a CT atlas of the proximal femur to two calibrated radiographs (AP and
lateral). It has two parts, trained end to end:

Affine module
    Two ProST layers project the atlas along each view (line integrals). Each projection is stacked
    with its radiograph (2 channels) and encoded by a per-view 2D encoder (``len(affine_widths)``
    levels of strided conv, batch norm, leaky ReLU). With ``cross_view_fusion`` a fusion branch
    concatenates, at every level, both views' features and the previous fused features (average
    pooled to the level's size) and convolves them. A dense layer (zero bias, kernel drawn with
    stddev ``affine_init_stddev``, so the module starts at the identity) regresses 7 parameters
    (rotation, translation, log-scale) -> :class:`~inference.layers.warp.AffineToField` -> T.

Local module
    Per view: ProST (integral and beam output) of the affinely warped atlas; a 2D encoder (strided
    conv + plain conv per level) of [projection of warped atlas, radiograph]; the last map is copied
    ``depth_copies`` (M) times along the beam depth and decoded by a 3D decoder in *beam space*
    (conv, leaky ReLU, upsample x2 per level) with skip connections (each 2D encoder map copied
    along depth, 3D conv, batch norm, leaky ReLU, concatenated); the warped atlas's own beam samples
    (average pooled to the decoder's beam grid) join the last level. inv-ProST maps each view's
    beam-space feature volume onto the (possibly downsampled) atlas grid; both views are
    concatenated and convolved to a 3-channel stationary velocity field; scaling and squaring gives
    phi. The total field is ``Psi = phi + T o phi`` (first phi, then T).

Inputs (a dict; B = batch, H, W = ``detector_hw``)
    ``images`` (B, 2, H, W) float32 network-size radiographs (line integrals of mu, any scale);
    ``masks`` (B, 2, H, W) float32 (0/1) femur masks; ``projection`` (B, 2, 3, 4) float32 P of each
    network detector in world mm; ``index_to_world`` (B, 4, 4) float32 of the atlas grid.

Outputs (a dict; Z, Y, X = ``shape_zyx``)
    ``warped_affine`` (B, Z, Y, X, 1) atlas intensity warped by T; ``warped`` (B, Z, Y, X, 1) atlas
    warped by Psi; ``warped_labels`` (B, Z, Y, X, 1) atlas labels warped by Psi (nearest);
    ``phi`` (B, Z, Y, X, 3) and ``psi`` (B, Z, Y, X, 3) displacement fields (the convention of
    :mod:`inference.layers.warp`); ``affine_params`` (B, 7); with ``velocity_downsample > 1`` also
    ``phi_coarse`` (B, Z/f, Y/f, X/f, 3), phi on the velocity grid in its own voxels (the
    smoothness term uses it); with ``dice_weight > 0`` also
    ``warped_femur`` (B, Z, Y, X, 1), the atlas femur mask warped by Psi with trilinear weights
    (differentiable, for the Dice term).

Intensities and normalisation (decided here, applied inside the model so training and
``hipatlas register`` cannot disagree)
    * Atlas and fixed volumes use the *relative attenuation of the femur*:
      ``max(HU + 1000, 0) / 1000`` (water = 1, air = 0) inside the femur label, 0 elsewhere
      (:func:`femur_intensity`). The atlas is stored that way, as a non-trainable weight of the
      :class:`AtlasVolume` layer (saved in the ``.keras`` file, with the atlas labels).
    * Each radiograph is multiplied by its femur mask and divided by its mean over the mask;
      each atlas projection is divided by its mean over its own support (pixels above 1e-3 of its
      maximum). Dividing by a mean over the bone makes the inputs independent of the exposure,
      of mu's units and of the detector pixel size, and cheap and differentiable (no percentile).

The atlas is a constant of the model: ``build_model(config, atlas)`` stores it, so a saved model
needs only its ``.keras`` file (plus atlas landmarks) to register a case.

FLOPs (:func:`estimate_flops`) count 2 x the multiply-adds of every convolution and dense layer
of one forward pass at batch 1; sampling (ProST, inv-ProST, warps, scaling and squaring), batch
norm, activations and the loss are not counted.
"""

from __future__ import annotations

import logging
import os
import pathlib
from typing import Any, Mapping

import keras
import numpy as np
import tensorflow as tf

from inference.checksums import sha256_file
from inference.errors import ConfigError, ModelError
from inference.io import atomic_file
from inference.layers import warp as warp_layers
from inference.layers.atlas import AtlasVolume, LabelMask
from inference.layers.grid import CoarseIndexToWorld, ResizeToGrid, UpsampleField
from inference.layers.normalise import MaskedMeanScale, SupportMeanScale
from inference.layers.plumbing import CopyAlongDepth, Recomputed, StopGradient, ViewSelect
from inference.model_config import (  # noqa: F401  (the TensorFlow-free part, re-exported)
    CONFIG_FORMAT,
    COMPACT,
    FEMUR_LABEL,
    MODEL_CARD_FORMAT,
    MODEL_CARD_NAME,
    NUM_AFFINE_PARAMS,
    NUM_VIEWS,
    PAPER,
    PRESETS,
    ModelConfig,
    card_path_for,
    case_inputs,
    preset,
    read_model_card,
    write_model_card,
)

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Intensities
# --------------------------------------------------------------------------------------------

def femur_intensity(volume_hu: np.ndarray, labels: np.ndarray, label: int = FEMUR_LABEL) -> np.ndarray:
    """Relative attenuation of the femur: ``max(HU + 1000, 0) / 1000`` inside ``label``, else 0.

    Water is 1 and air 0; it is mu / mu_water, so the projection of this volume is proportional
    to the femur's share of a radiograph's line integrals. Used for the atlas (stored in the
    model) and for the fixed volume of the training loss, so both are on the same scale.

    Parameters
    ----------
    volume_hu : array (Z, Y, X) (or with a batch axis), Hounsfield units
    labels : array of the same shape, integer labels (1 = femur)

    Returns
    -------
    array, float32, same shape
    """
    volume_hu = np.asarray(volume_hu, dtype=np.float32)
    labels = np.asarray(labels)
    if volume_hu.shape != labels.shape:
        raise ConfigError(f"volume shape {volume_hu.shape} and label shape {labels.shape} differ")
    relative = np.maximum(volume_hu + 1000.0, 0.0) / 1000.0
    return np.where(labels == label, relative, 0.0).astype(np.float32)


def _atlas_arrays(atlas: Any) -> tuple[np.ndarray, np.ndarray]:
    """(volume in HU, labels) from a Mapping with ``volume``/``labels`` (the npz keys), an object
    with ``volume_hu`` (or ``volume``) and ``labels`` attributes, or a (volume, labels) pair."""
    if isinstance(atlas, Mapping):
        volume = atlas.get("volume_hu", atlas.get("volume"))
        labels = atlas.get("labels")
    elif isinstance(atlas, (tuple, list)) and len(atlas) == 2:
        volume, labels = atlas
    else:
        volume = getattr(atlas, "volume_hu", getattr(atlas, "volume", None))
        labels = getattr(atlas, "labels", None)
    if volume is None or labels is None:
        raise ConfigError("the atlas must provide a volume in HU and a label map "
                          "(keys or attributes 'volume' / 'volume_hu' and 'labels')")
    volume, labels = np.asarray(volume), np.asarray(labels)
    if volume.ndim == 4 and volume.shape[-1] == 1:
        volume, labels = volume[..., 0], labels.reshape(volume.shape[:3])
    return volume, labels


# --------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------

def grid_matrix(config: ModelConfig) -> np.ndarray:
    """Index-to-grid-frame matrix used to express the affine parameters.

    The affine parameters are rotations about the atlas grid's own axes (through its centre) and
    translations in mm along them; only the voxel spacing matters for that, not where the grid
    sits in the world, so the model works wherever ``index_to_world`` places the grid.
    """
    sx, sy, sz = config.spacing_xyz_mm
    return np.diag([sx, sy, sz, 1.0])


def _conv_bn_act(x, filters, strides, name, config, dims=2, kernel_size=3):
    conv = keras.layers.Conv2D if dims == 2 else keras.layers.Conv3D
    # No conv bias: the batch norm right after it has its own offset.
    x = conv(filters, kernel_size, strides=strides, padding="same", use_bias=False,
             name=f"{name}_conv")(x)
    x = keras.layers.BatchNormalization(name=f"{name}_bn")(x)
    return keras.layers.LeakyReLU(negative_slope=config.leaky_slope, name=f"{name}_act")(x)


def _affine_module(config, view_inputs):
    """Per-view 2D encoders + cross-view fusion + dense regression of the 7 parameters."""
    features = []
    for view, x in enumerate(view_inputs):
        levels = []
        for level, width in enumerate(config.affine_widths):
            x = _conv_bn_act(x, width, 2, f"affine_v{view}_l{level}", config)
            levels.append(x)
        features.append(levels)
    if config.cross_view_fusion:
        top = _fuse_views(config, features, config.affine_widths, "affine_fusion")[-1]
    else:
        top = keras.layers.Concatenate(name="affine_top_concat")([features[0][-1], features[1][-1]])
    flat = keras.layers.Flatten(name="affine_flatten")(top)
    # A tiny kernel and zero bias make the raw parameters ~0 at initialisation, i.e. T ~ identity,
    # so training starts from the atlas as it is instead of a random pose.
    return keras.layers.Dense(
        NUM_AFFINE_PARAMS, name="affine_params", dtype="float32",
        kernel_initializer=keras.initializers.RandomNormal(stddev=config.affine_init_stddev),
        bias_initializer="zeros")(flat)


def _local_encoder(config, x, view):
    """2D encoder of the local module; returns the maps at every scale (input first)."""
    maps = [x]
    for level, width in enumerate(config.local_encoder_widths):
        x = _conv_bn_act(x, width, 2, f"local_v{view}_l{level}_down", config)
        x = _conv_bn_act(x, width, 1, f"local_v{view}_l{level}", config)
        maps.append(x)
    return maps


def _fused_local_encoder(config, view_maps):
    """The single-decoder variant's fusion: at every local encoder level, both views' maps and the
    previous fused map (pooled) are concatenated and convolved, as in the affine module (the
    inputs, level 0, are only concatenated)."""
    # level 0 (the encoder inputs, read by a skip when the decoder upsamples to full size)
    inputs = keras.layers.Concatenate(name="local_fusion_l0_concat")([view_maps[0][0], view_maps[1][0]])
    return [inputs, *_fuse_views(config, [maps[1:] for maps in view_maps], config.local_encoder_widths,
                                 "local_fusion", first_level=1)]


def _fuse_views(config, view_levels, widths, prefix, first_level=0):
    """Cross-view fusion: at every level both views' maps and the previous fused map (pooled) are
    concatenated and convolved; returns the fused map of every level."""
    fused_maps, fused = [], None
    for index, width in enumerate(widths):
        level = first_level + index
        parts = [view_levels[0][index], view_levels[1][index]]
        if fused is not None:
            # "same" pooling rounds up exactly like the strided "same" convolutions.
            parts.append(keras.layers.AveragePooling2D(2, padding="same", name=f"{prefix}_l{level}_pool")(fused))
        merged = keras.layers.Concatenate(name=f"{prefix}_l{level}_concat")(parts)
        fused = _conv_bn_act(merged, width, 1, f"{prefix}_l{level}", config)
        fused_maps.append(fused)
    return fused_maps


class _BeamDecoder:
    """The 3D beam-space decoder's layers; one instance per view, or one for both views."""

    def __init__(self, config, prefix):
        self.config = config
        self.convs = []
        self.skips = []
        for level, width in enumerate(config.decoder_widths):
            self.convs.append((
                keras.layers.Conv3D(width, 3, padding="same", name=f"{prefix}_l{level}_conv"),
                keras.layers.LeakyReLU(negative_slope=config.leaky_slope, name=f"{prefix}_l{level}_act")))
            if level > 0 and config.skip_connections:
                self.skips.append((
                    keras.layers.Conv3D(width, 3, padding="same", use_bias=False,
                                        name=f"{prefix}_skip{level}_conv"),
                    keras.layers.BatchNormalization(name=f"{prefix}_skip{level}_bn"),
                    keras.layers.LeakyReLU(negative_slope=config.leaky_slope,
                                           name=f"{prefix}_skip{level}_act")))
            else:
                self.skips.append(None)

    def __call__(self, maps, beam_atlas, view):
        """``maps`` from :func:`_local_encoder`; ``beam_atlas`` (B, K', H', W', 1)."""
        config = self.config
        levels = len(config.local_encoder_widths)
        upsamplings = config.decoder_upsamplings
        x = CopyAlongDepth(config.depth_copies, name=f"local_v{view}_bottom_copy")(maps[levels])
        for level in range(upsamplings + 1):
            parts = [x]
            if self.skips[level] is not None:
                depth = config.depth_copies * 2 ** level
                skip = CopyAlongDepth(depth, name=f"local_v{view}_skip{level}_copy")(maps[levels - level])
                for layer in self.skips[level]:
                    skip = layer(skip)
                parts.append(skip)
            if level == upsamplings:
                # The affinely warped atlas sampled in the same beam space: tells the decoder
                # where along each ray the bone is, which the copied 2D features cannot.
                parts.append(beam_atlas)
            if len(parts) > 1:
                x = keras.layers.Concatenate(name=f"local_v{view}_dec{level}_concat")(parts)
            conv, act = self.convs[level]
            x = act(conv(x))
            if level < upsamplings:
                x = keras.layers.UpSampling3D(2, name=f"local_v{view}_dec{level}_up")(x)
        return x


class _BeamBranch:
    """One view's decoder and inv-ProST (beam space -> velocity grid); one instance per decoder.

    With ``config.recompute`` the branch is built once as a sub-model and run through a
    :class:`Recomputed` layer (a shared decoder is then one layer called for both views);
    otherwise its layers sit directly in the network, as before that option existed.
    """

    def __init__(self, config, prefix, view, maps, beam_atlas, matrix, index_to_world):
        self.config = config
        self.decoder = _BeamDecoder(config, prefix)
        self.used = self.used_maps(config)
        self.block = None
        if config.recompute:
            inputs = [keras.Input(maps[i].shape[1:], name=f"{prefix}_map{i}") for i in self.used]
            beam_in = keras.Input(beam_atlas.shape[1:], name=f"{prefix}_beam_atlas")
            matrix_in = keras.Input(matrix.shape[1:], name=f"{prefix}_projection")
            i2w_in = keras.Input(index_to_world.shape[1:], name=f"{prefix}_index_to_world")
            inner_maps = [None] * len(maps)
            for i, tensor in zip(self.used, inputs):
                inner_maps[i] = tensor
            output = self._layers(inner_maps, beam_in, matrix_in, i2w_in, view)
            self.block = Recomputed(keras.Model([*inputs, beam_in, matrix_in, i2w_in], output,
                                                name=f"{prefix}_branch"), name=f"{prefix}_recomputed")

    @staticmethod
    def used_maps(config) -> list[int]:
        """Indices of the local encoder maps the decoder reads (bottom, then skip levels)."""
        levels = len(config.local_encoder_widths)
        used = {levels}
        if config.skip_connections:
            used.update(levels - level for level in range(1, config.decoder_upsamplings + 1))
        return sorted(used)

    def _layers(self, maps, beam_atlas, matrix, index_to_world, view):
        from inference.layers.prost import InvProST

        config = self.config
        features = self.decoder(maps, beam_atlas, view)
        if config.use_inv_prost:
            return InvProST(config.velocity_shape_zyx, config.detector_hw, config.num_samples,
                            geometry_gradients=False, dtype="float32", name=f"inv_prost_v{view}")(
                [features, matrix, index_to_world])
        return ResizeToGrid(config.velocity_shape_zyx, dtype="float32", name=f"resize_to_grid_v{view}")(features)

    def __call__(self, maps, beam_atlas, matrix, index_to_world, view):
        if self.block is None:
            return self._layers(maps, beam_atlas, matrix, index_to_world, view)
        return self.block([*(maps[i] for i in self.used), beam_atlas, matrix, index_to_world])


def build_model(config: ModelConfig, atlas: Any = None, *, name: str = "hipatlas_registration",
                jit_compile: bool = True) -> keras.Model:
    """Build the registration network for ``config``, storing ``atlas`` in it.

    Parameters
    ----------
    config : ModelConfig
    atlas : Mapping, object or (volume, labels) pair, optional
        The atlas volume in HU (Z, Y, X) on the config's grid and its label map (1 = femur).
        Accepted as a Mapping with ``volume``/``labels`` keys (the npz keys), an object with
        ``volume_hu`` (or ``volume``) and ``labels`` attributes, or a pair. None leaves a zero atlas
        (e.g. to load weights into).
    name : str
    jit_compile : bool
        Passed to the sampling layers (XLA for the gathers; convolutions are never XLA-compiled,
        which is slow for Conv3D on CPU).

    Returns
    -------
    keras.Model
        Inputs and outputs as in the module docstring.
    """
    from inference.layers.prost import ProST

    if not isinstance(config, ModelConfig):
        raise ConfigError(f"config must be a ModelConfig, not {type(config).__name__}")
    height, width = config.detector_hw
    images = keras.Input((NUM_VIEWS, height, width), name="images")
    masks = keras.Input((NUM_VIEWS, height, width), name="masks")
    projection = keras.Input((NUM_VIEWS, 3, 4), name="projection")
    index_to_world = keras.Input((4, 4), name="index_to_world")

    atlas_layer = AtlasVolume(config.shape_zyx, model_config=config.to_dict(), name="atlas")
    atlas_intensity, atlas_labels = atlas_layer(index_to_world)
    if atlas is not None:
        volume_hu, labels = _atlas_arrays(atlas)
        if volume_hu.shape != config.shape_zyx:
            raise ConfigError(f"the atlas grid {volume_hu.shape} differs from the model's shape_zyx "
                              f"{config.shape_zyx}")
        atlas_layer.set_atlas(femur_intensity(volume_hu, labels), labels)

    radiographs, matrices = [], []
    for view in range(NUM_VIEWS):
        image = ViewSelect(view, add_channel=True, name=f"image_v{view}")(images)
        mask = ViewSelect(view, add_channel=True, name=f"mask_v{view}")(masks)
        radiographs.append(MaskedMeanScale(name=f"radiograph_v{view}_scale")([image, mask]))
        matrices.append(ViewSelect(view, name=f"projection_v{view}")(projection))

    # Affine module ---------------------------------------------------------------------
    affine_inputs = []
    for view in range(NUM_VIEWS):
        drr = ProST(config.detector_hw, config.num_samples, output="integral", geometry_gradients=False,
                    dtype="float32",
                    name=f"affine_prost_v{view}")([atlas_intensity, matrices[view], index_to_world])
        drr = SupportMeanScale(name=f"affine_drr_v{view}_scale")(drr)
        affine_inputs.append(keras.layers.Concatenate(name=f"affine_input_v{view}")(
            [drr, radiographs[view]]))
    params = _affine_module(config, affine_inputs)
    grid = grid_matrix(config)
    affine_field = warp_layers.AffineToField(config.shape_zyx, grid, dtype="float32",
                                             name="affine_field")(params)
    warped_affine = warp_layers.SpatialTransformer(jit_compile=jit_compile, dtype="float32",
                                                   name="warp_affine")([atlas_intensity, affine_field])

    # Local module ----------------------------------------------------------------------
    # By default the local module takes the affine result as given: no gradient flows back
    # through its ProST (which needs a scatter-add over the whole beam volume). The affine module
    # still learns from both similarity terms through T and through Psi = T o phi.
    # ``local_gradient_to_affine`` lets that gradient through (an ablation row of Table 2).
    local_atlas = warped_affine
    if not config.local_gradient_to_affine:
        local_atlas = StopGradient(name="local_atlas_stop_gradient")(warped_affine)
    levels = len(config.local_encoder_widths)
    beam_depth, beam_h, beam_w = config.beam_shape
    coarse = 2 ** (levels - config.decoder_upsamplings)
    velocity_i2w = index_to_world
    if config.velocity_downsample > 1:
        velocity_i2w = CoarseIndexToWorld(config.velocity_downsample,
                                          name="velocity_index_to_world")(index_to_world)
    decoders = {}
    grid_features = []
    view_maps, beam_atlases = [], []
    for view in range(NUM_VIEWS):
        drr, beam = ProST(config.detector_hw, config.num_samples, output="both", geometry_gradients=False,
                          dtype="float32",
                          name=f"local_prost_v{view}")([local_atlas, matrices[view], index_to_world])
        drr = SupportMeanScale(name=f"local_drr_v{view}_scale")(drr)
        encoder_input = keras.layers.Concatenate(name=f"local_input_v{view}")([drr, radiographs[view]])
        maps = _local_encoder(config, encoder_input, view)
        beam_atlas = keras.layers.AveragePooling3D(
            (config.num_samples // beam_depth, coarse, coarse), dtype="float32",
            name=f"local_beam_atlas_v{view}")(beam)
        view_maps.append(maps)
        beam_atlases.append(beam_atlas)
    for view in range(NUM_VIEWS):
        if config.single_decoder:
            break
        maps, beam_atlas = view_maps[view], beam_atlases[view]
        key = "shared" if config.shared_decoder else view
        if key not in decoders:
            decoders[key] = _BeamBranch(config, "decoder" if config.shared_decoder else f"decoder_v{view}",
                                        view, maps, beam_atlas, matrices[view], velocity_i2w)
        grid_features.append(decoders[key](maps, beam_atlas, matrices[view], velocity_i2w, view))
    if config.single_decoder:
        fused_maps = _fused_local_encoder(config, view_maps)
        both_beams = keras.layers.Concatenate(name="local_beam_atlas_both")(beam_atlases)
        features = _BeamDecoder(config, "decoder")(fused_maps, both_beams, "f")
        grid_features.append(ResizeToGrid(config.velocity_shape_zyx, dtype="float32",
                                          name="resize_to_grid")(features))
    merged = (grid_features[0] if len(grid_features) == 1
              else keras.layers.Concatenate(name="views_concat")(grid_features))
    # As in VoxelMorph, a tiny initial velocity keeps phi ~ identity at the start.
    velocity = keras.layers.Conv3D(
        3, 3, padding="same", dtype="float32", name="velocity",
        kernel_initializer=keras.initializers.RandomNormal(stddev=config.velocity_init_stddev),
        bias_initializer="zeros")(merged)
    phi = warp_layers.VecInt(config.int_steps, jit_compile=jit_compile, recompute=config.recompute,
                             dtype="float32", name="integrate")(velocity)
    phi_coarse = phi
    if config.velocity_downsample > 1:
        phi = UpsampleField(name="phi_upsample")(phi)
    psi = warp_layers.ComposeAffine(config.shape_zyx, grid, dtype="float32", name="psi")([phi, params])
    warped = warp_layers.SpatialTransformer(jit_compile=jit_compile, dtype="float32",
                                           name="warp")([atlas_intensity, psi])
    warped_labels = warp_layers.SpatialTransformer(interp="nearest", jit_compile=jit_compile,
                                                   dtype="float32", name="warp_labels")([atlas_labels, psi])
    outputs = {"warped_affine": warped_affine, "warped": warped, "warped_labels": warped_labels,
               "phi": phi, "psi": psi, "affine_params": params}
    if config.velocity_downsample > 1:
        outputs["phi_coarse"] = phi_coarse
    if config.dice_weight > 0:
        femur = LabelMask(FEMUR_LABEL, name="atlas_femur")(atlas_labels)
        outputs["warped_femur"] = warp_layers.SpatialTransformer(
            jit_compile=jit_compile, dtype="float32", name="warp_femur")([femur, psi])
    inputs = {"images": images, "masks": masks, "projection": projection,
              "index_to_world": index_to_world}
    return keras.Model(inputs=inputs, outputs=outputs, name=name)


def model_config_of(model: keras.Model) -> ModelConfig:
    """The :class:`ModelConfig` stored in a model built by :func:`build_model`."""
    try:
        layer = model.get_layer("atlas")
    except ValueError:
        raise ModelError(f"model {model.name!r} has no atlas layer: it was not built by HipAtlas") from None
    if not isinstance(layer, AtlasVolume) or layer.model_config is None:
        raise ModelError(f"model {model.name!r} does not carry a HipAtlas model config")
    return ModelConfig.from_dict(layer.model_config)


def set_atlas(model: keras.Model, atlas: Any) -> None:
    """Replace the atlas stored in ``model`` (same grid)."""
    volume_hu, labels = _atlas_arrays(atlas)
    layer = model.get_layer("atlas")
    if volume_hu.shape != layer.shape_zyx:
        raise ConfigError(f"the atlas grid {volume_hu.shape} differs from the model's {layer.shape_zyx}")
    layer.set_atlas(femur_intensity(volume_hu, labels), labels)


def inputs_from_sample(sample: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Model inputs (batch of 1, float32) from a data set sample (the npz keys)."""
    try:
        return {
            "images": np.asarray(sample["images"], np.float32)[None],
            "masks": np.asarray(sample["masks"], np.float32)[None],
            "projection": np.asarray(sample["projection"], np.float32)[None],
            "index_to_world": np.asarray(sample["index_to_world"], np.float32)[None],
        }
    except KeyError as error:
        raise ConfigError(f"a sample for the model needs the key {error}") from None


# --------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------

def registration_losses(config: ModelConfig, outputs: Mapping[str, Any], fixed_intensity,
                        fixed_labels=None) -> dict[str, Any]:
    """The training loss and its terms, each a scalar tensor (mean over the batch).

    ``total = -NCC(V o T, Vf) - NCC(V o Psi, Vf) + smooth_weight * smooth(phi)
    [+ dice_weight * (1 - softDice(femur o Psi, fixed femur))]``, global NCC.

    Parameters
    ----------
    config : ModelConfig
    outputs : dict
        The model's outputs.
    fixed_intensity : tensor (B, Z, Y, X[, 1])
        :func:`femur_intensity` of the fixed (patient) volume.
    fixed_labels : tensor (B, Z, Y, X[, 1]), optional
        Needed when ``config.dice_weight > 0``.
    """
    from inference import losses

    fixed = tf.cast(fixed_intensity, tf.float32)
    if fixed.shape.rank == 4:
        fixed = fixed[..., None]
    terms = {
        "ncc_affine": tf.reduce_mean(losses.ncc_global(outputs["warped_affine"], fixed)),
        "ncc": tf.reduce_mean(losses.ncc_global(outputs["warped"], fixed)),
        # On the velocity grid when it is coarser (VoxelMorph regularises its downsampled field
        # too): the upsampled phi is a linear interpolation of it, and 8x fewer voxels.
        "smoothness": tf.reduce_mean(losses.smoothness_l2(outputs.get("phi_coarse", outputs["phi"]))),
    }
    total = -terms["ncc_affine"] - terms["ncc"] + config.smooth_weight * terms["smoothness"]
    if config.dice_weight > 0:
        if fixed_labels is None or "warped_femur" not in outputs:
            raise ConfigError("dice_weight > 0 needs the fixed labels and a model built with it")
        labels = tf.cast(fixed_labels, tf.float32)
        if labels.shape.rank == 4:
            labels = labels[..., None]
        femur = tf.cast(tf.equal(tf.round(labels), float(FEMUR_LABEL)), tf.float32)
        terms["dice"] = tf.reduce_mean(losses.soft_dice(outputs["warped_femur"], femur))
        total = total + config.dice_weight * (1.0 - terms["dice"])
    terms["total"] = total
    return terms


# --------------------------------------------------------------------------------------------
# Size and cost
# --------------------------------------------------------------------------------------------

def count_params(model: keras.Model) -> dict[str, int]:
    """Parameter counts: ``trainable``, ``non_trainable`` (batch-norm statistics) and ``atlas``
    (the stored atlas voxels, two per grid voxel), each an int."""
    atlas = 0
    non_trainable = 0
    for weight in model.non_trainable_weights:
        size = int(np.prod(weight.shape))
        if weight.path.startswith("atlas/"):
            atlas += size
        else:
            non_trainable += size
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    return {"trainable": trainable, "non_trainable": non_trainable, "atlas": atlas}


def _conv_flops(out_voxels: int, kernel_voxels: int, in_channels: int, out_channels: int) -> int:
    return 2 * out_voxels * kernel_voxels * in_channels * out_channels


def estimate_flops(config: ModelConfig) -> dict[str, int]:
    """Analytic FLOPs of one forward pass at batch 1: 2 x multiply-adds of convs and dense layers.

    Sampling layers (ProST, inv-ProST, warps, scaling and squaring), batch norm, activations and
    pooling are not counted (they are memory-bound gathers and element-wise work). Matches
    :func:`flops_of_model` on a built model.

    Returns
    -------
    dict
        ``affine``, ``local_encoder``, ``decoder``, ``velocity`` and ``total`` (ints).
    """
    height, width = config.detector_hw
    views = NUM_VIEWS
    out = {"affine": 0, "local_encoder": 0, "decoder": 0, "velocity": 0}

    # Affine module: "same" padding rounds sizes up.
    h, w, channels = height, width, 2
    sizes = []
    for level, filters in enumerate(config.affine_widths):
        h, w = -(-h // 2), -(-w // 2)
        sizes.append((h, w))
        out["affine"] += views * _conv_flops(h * w, 9, channels, filters)
        channels = filters
    if config.cross_view_fusion:
        previous = 0
        for level, filters in enumerate(config.affine_widths):
            h, w = sizes[level]
            out["affine"] += _conv_flops(h * w, 9, 2 * filters + previous, filters)
            previous = filters
        flat = sizes[-1][0] * sizes[-1][1] * config.affine_widths[-1]
    else:
        flat = sizes[-1][0] * sizes[-1][1] * 2 * config.affine_widths[-1]
    out["affine"] += 2 * flat * NUM_AFFINE_PARAMS

    # Local encoder: strided conv then plain conv per level.
    levels = len(config.local_encoder_widths)
    channels = 2
    map_channels = [2]
    for level, filters in enumerate(config.local_encoder_widths):
        pixels = (height // 2 ** (level + 1)) * (width // 2 ** (level + 1))
        out["local_encoder"] += views * (_conv_flops(pixels, 9, channels, filters)
                                         + _conv_flops(pixels, 9, filters, filters))
        channels = filters
        map_channels.append(filters)

    # The single-decoder variant's fusion convs, one per encoder level.
    if config.single_decoder:
        previous = 0
        for level, filters in enumerate(config.local_encoder_widths):
            pixels = (height // 2 ** (level + 1)) * (width // 2 ** (level + 1))
            out["local_encoder"] += _conv_flops(pixels, 9, 2 * filters + previous, filters)
            previous = filters

    # Beam-space decoder (per view, shared weights or not: the work is the same; one decoder in
    # the single-decoder variant).
    decoders = 1 if config.single_decoder else views
    upsamplings = config.decoder_upsamplings
    previous = config.local_encoder_widths[-1]
    for level, filters in enumerate(config.decoder_widths):
        scale = 2 ** (levels - level)
        voxels = config.depth_copies * 2 ** level * (height // scale) * (width // scale)
        in_channels = previous
        if level > 0 and config.skip_connections:
            skip_in = map_channels[levels - level]
            if config.single_decoder and level == levels:
                skip_in *= 2  # both views' encoder inputs
            out["decoder"] += decoders * _conv_flops(voxels, 27, skip_in, filters)
            in_channels += filters
        if level == upsamplings:
            in_channels += 2 if config.single_decoder else 1  # the atlas's beam samples
        out["decoder"] += decoders * _conv_flops(voxels, 27, in_channels, filters)
        previous = filters

    velocity_voxels = int(np.prod(config.velocity_shape_zyx))
    out["velocity"] = _conv_flops(velocity_voxels, 27, decoders * config.decoder_widths[-1], 3)
    out["total"] = sum(out.values())
    return out


def flops_of_model(model: keras.Model) -> int:
    """FLOPs of the conv and dense layers of a built model (batch 1), from its layer shapes.

    Counts every call of a layer (a shared decoder is called once per view).
    """
    total = 0
    for layer in model.layers:
        if isinstance(layer, Recomputed):
            total += flops_of_model(layer.inner) * len(layer._inbound_nodes)
        elif isinstance(layer, (keras.layers.Conv2D, keras.layers.Conv3D)):
            kernel = layer.kernel.shape
            per_voxel = 2 * int(np.prod(kernel))
            for node in layer._inbound_nodes:
                shape = node.outputs[0].shape
                total += per_voxel * int(np.prod(shape[1:-1]))
        elif isinstance(layer, keras.layers.Dense):
            total += 2 * int(np.prod(layer.kernel.shape)) * len(layer._inbound_nodes)
    return total


# --------------------------------------------------------------------------------------------
# Saving and loading (model cards: inference.model_config)
# --------------------------------------------------------------------------------------------

def save_model(model: keras.Model, path: str | os.PathLike,
               card_extra: Mapping[str, Any] | None = None) -> tuple[pathlib.Path, pathlib.Path]:
    """Save ``model`` to a ``.keras`` file atomically and write its model card beside it.

    Returns
    -------
    (model_path, card_path)
    """
    path = pathlib.Path(path)
    if path.suffix != ".keras":
        raise ConfigError(f"model files end in .keras, not {path.name!r}")
    config = model_config_of(model)
    with atomic_file(path, ".keras") as tmp:
        model.save(tmp)
    return path, write_model_card(path, config, card_extra)


def load_model(path: str | os.PathLike, card: str | os.PathLike | Mapping[str, Any] | None = None,
               *, require_card: bool = True) -> keras.Model:
    """Load a registration model, refusing files that do not match their model card.

    Parameters
    ----------
    path : path of the ``.keras`` file
    card : path of the model card, the card itself (a dict), or None for :func:`card_path_for`.
    require_card : bool
        With False a missing card (only when ``card`` is None) is tolerated with a warning.

    Raises
    ------
    ModelError
        Missing or unreadable file, sha256 or config mismatch with the card.
    """
    import inference.layers.prost  # noqa: F401  (registers ProST / InvProST for deserialisation)

    path = pathlib.Path(path)
    if not path.is_file():
        raise ModelError(f"model file {path} does not exist")
    if card is None:
        card_file = card_path_for(path)
        if card_file.is_file():
            card = read_model_card(card_file)
        elif require_card:
            raise ModelError(f"model {path.name} has no model card ({card_file.name} is missing); "
                             "refusing to load an unverified model")
        else:
            log.warning("loading %s without a model card: its integrity is not verified", path)
    elif not isinstance(card, Mapping):
        card = read_model_card(card)
    if card is not None:
        if card.get("model_file", path.name) != path.name:
            raise ModelError(f"the model card names {card.get('model_file')!r}, not {path.name!r}: it "
                             "belongs to another model")
        digest = sha256_file(path)
        if digest != card.get("sha256"):
            raise ModelError(f"model file {path.name} does not match its model card (sha256 "
                             f"{digest[:12]}... instead of {str(card.get('sha256'))[:12]}...): the "
                             "file is corrupt or was replaced; reinstall the model")
    try:
        model = keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as error:  # Keras raises many types for bad archives
        raise ModelError(f"model file {path} cannot be loaded: {error}") from error
    config = model_config_of(model)
    if card is not None and "config" in card:
        try:
            card_config = ModelConfig.from_dict(card["config"])
        except ConfigError as error:
            raise ModelError(f"model card of {path.name} has an invalid config: {error}") from None
        if card_config != config:
            raise ModelError(f"model {path.name} was built with a different config than its card says")
    # For reports (inference.registration.model_identity): which model, verified how.
    model._hipatlas_card = {**(dict(card) if card is not None else {"name": path.stem}),
                            "path": str(path)}
    return model
