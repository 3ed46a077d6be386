"""The registration network's configuration and model cards, without TensorFlow.

:class:`ModelConfig` (the frozen config a model is built from), the presets, the model card
(``model_card.json`` beside a model file) and the network's input dict. Split from
:mod:`inference.model` (which re-exports all of it) so that the ONNX Runtime backend
(:mod:`inference.backends`) can read a model's config and card without importing TensorFlow.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from inference.errors import ConfigError, ModelError
from inference.io import write_text_atomic
from inference.checksums import sha256_file
from inference.validate import number, positive_int

#: Label value of the femur in atlas and data set label maps (2 = pelvis).
FEMUR_LABEL = 1
#: Number of views the network takes (AP and lateral).
NUM_VIEWS = 2
#: Number of affine parameters: rotation (3), translation (3), log-scale (1).
NUM_AFFINE_PARAMS = 7
MODEL_CARD_FORMAT = "hipatlas-model-card/1"
CONFIG_FORMAT = "hipatlas-model-config/1"


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------

def _as_int_tuple(name: str, value: Any, length: int | None = None) -> tuple[int, ...]:
    try:
        items = tuple(value)
    except TypeError:
        raise ConfigError(f"{name} must be a sequence of integers, not {value!r}") from None
    if length is not None and len(items) != length:
        raise ConfigError(f"{name} must have {length} entries, not {len(items)} ({value!r})")
    out = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (int, np.integer)) or item <= 0:
            raise ConfigError(f"{name} must hold positive integers, not {value!r}")
        out.append(int(item))
    return tuple(out)


def _as_float_tuple(name: str, value: Any, length: int) -> tuple[float, ...]:
    try:
        items = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be {length} numbers, not {value!r}") from None
    if len(items) != length or not all(math.isfinite(v) and v > 0 for v in items):
        raise ConfigError(f"{name} must be {length} positive numbers, not {value!r}")
    return items


@dataclass(frozen=True)
class ModelConfig:
    """Everything that defines the network's shape (saved in the ``.keras`` file and model card).

    Parameters
    ----------
    grid : str
        Name of the atlas grid (``paper``, ``compact`` or a custom name).
    shape_zyx : (int, int, int)
        Atlas grid shape (z, y, x).
    spacing_xyz_mm : (float, float, float)
        Atlas voxel spacing (x, y, z) in mm (informative: the geometry comes from ``index_to_world``).
    detector_hw : (int, int)
        Network detector rows x columns; must be divisible by ``2 ** len(local_encoder_widths)``.
    num_samples : int
        K, ProST samples per ray; a multiple of the decoder's beam depth
        ``depth_copies * 2 ** (len(decoder_widths) - 1)``.
    affine_widths : tuple of int
        Features of the affine 2D encoder levels (each halves the image size).
    local_encoder_widths : tuple of int
        Features of the local 2D encoder levels (each halves the image size).
    depth_copies : int
        M, copies of the last local encoder map along the beam depth.
    decoder_widths : tuple of int
        Features of the 3D beam-space decoder levels; ``len - 1`` upsamplings (<= encoder levels).
        With fewer upsamplings than encoder levels the decoder stops at a coarser beam grid.
    velocity_downsample : int
        1 or 2: the velocity field and its integration live on the atlas grid divided by this
        (then the displacement is linearly upsampled), as in VoxelMorph; 2 saves ~8x in sampling.
    int_steps : int
        Scaling-and-squaring steps (phi = exp(v) with 2**int_steps).
    smooth_weight, dice_weight : float
        Loss weights of the smoothness of phi and of the (optional) femur Dice term.
    leaky_slope : float
        Negative slope of the leaky ReLUs.
    affine_init_stddev, velocity_init_stddev : float
        Stddev of the normal initialiser of the affine dense layer and of the velocity conv
        (tiny, so that the network starts at the identity transform).
    cross_view_fusion, skip_connections, shared_decoder, use_inv_prost : bool
        Ablation switches. Without inv-ProST the beam-space features are simply resized to the
        grid (k -> z, v -> y, u -> x), ignoring the geometry.
    single_decoder : bool
        The paper's single-decoder variant (its Table 2): the two views' local 2D encoders are
        fused at every level (concatenation + conv, as in the affine module), one 3D decoder
        reads the fused maps (skips from the fused maps too) with both views' beam samples of the
        atlas as two channels, and its output is resized to the grid. It needs
        ``use_inv_prost=False`` (no single view's geometry fits fused features) and
        ``shared_decoder=False``.
    local_gradient_to_affine : bool
        Let the local module's loss reach the affine module through the local ProST of the affinely
        warped atlas (our default stops that gradient, see :func:`inference.model.build_model`);
        the affine module then also learns from what the local module needs.
    recompute : bool
        Gradient checkpointing for training memory (the paper preset uses it): each view's
        beam-space decoder and its inv-ProST run as one :class:`Recomputed` block, and each
        scaling-and-squaring step keeps only its input; their activations (the largest tensors
        of the network) are recomputed in the backward pass instead of being kept from the
        forward pass. Same weights, same outputs; costs about one more forward pass of those
        parts per training step. The blocks' batch norms update their moving statistics twice
        per step (once more in the recomputation), with the same batch statistics.
    """

    grid: str = "compact"
    shape_zyx: tuple[int, int, int] = (96, 64, 96)
    spacing_xyz_mm: tuple[float, float, float] = (1.328, 1.328, 2.0)
    detector_hw: tuple[int, int] = (80, 112)
    num_samples: int = 128
    affine_widths: tuple[int, ...] = (8, 16, 32, 32, 64)
    local_encoder_widths: tuple[int, ...] = (8, 16, 32, 32)
    depth_copies: int = 4
    decoder_widths: tuple[int, ...] = (32, 16, 16, 8)
    velocity_downsample: int = 2
    int_steps: int = 7
    smooth_weight: float = 0.01
    dice_weight: float = 0.0
    leaky_slope: float = 0.2
    affine_init_stddev: float = 1e-5
    velocity_init_stddev: float = 1e-5
    cross_view_fusion: bool = True
    skip_connections: bool = True
    shared_decoder: bool = False
    use_inv_prost: bool = True
    single_decoder: bool = False
    local_gradient_to_affine: bool = False
    recompute: bool = False

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        if not isinstance(self.grid, str) or not self.grid.strip():
            raise ConfigError(f"grid must be a non-empty name, not {self.grid!r}")
        set_("shape_zyx", _as_int_tuple("shape_zyx", self.shape_zyx, 3))
        set_("spacing_xyz_mm", _as_float_tuple("spacing_xyz_mm", self.spacing_xyz_mm, 3))
        set_("detector_hw", _as_int_tuple("detector_hw", self.detector_hw, 2))
        for name in ("num_samples", "depth_copies", "velocity_downsample", "int_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                raise ConfigError(f"{name} must be a non-negative integer, not {value!r}")
            set_(name, int(value))
        for name in ("affine_widths", "local_encoder_widths", "decoder_widths"):
            set_(name, _as_int_tuple(name, getattr(self, name)))
            if not getattr(self, name):
                raise ConfigError(f"{name} must have at least one level")
        for name in ("smooth_weight", "dice_weight", "leaky_slope", "affine_init_stddev",
                     "velocity_init_stddev"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) \
                    or not math.isfinite(value) or value < 0:
                raise ConfigError(f"{name} must be a finite number >= 0, not {value!r}")
            set_(name, float(value))
        for name in ("cross_view_fusion", "skip_connections", "shared_decoder", "use_inv_prost",
                     "single_decoder", "local_gradient_to_affine", "recompute"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, not {getattr(self, name)!r}")
        if self.single_decoder:
            clashes = [name for name in ("use_inv_prost", "shared_decoder", "recompute") if getattr(self, name)]
            if clashes:
                raise ConfigError("single_decoder (one decoder for the fused views, resized to the grid) cannot be "
                                  f"combined with {', '.join(clashes)}: set {' and '.join(clashes)} to false")

        positive_int(self.num_samples, "num_samples (K)")
        positive_int(self.depth_copies, "depth_copies (M)")
        if self.int_steps > 12:
            raise ConfigError(f"int_steps must be <= 12 (2**int_steps squarings), not {self.int_steps}")
        if self.velocity_downsample not in (1, 2):
            raise ConfigError(f"velocity_downsample must be 1 or 2, not {self.velocity_downsample}")
        levels = len(self.local_encoder_widths)
        factor = 2 ** levels
        if any(size % factor for size in self.detector_hw):
            raise ConfigError(
                f"detector_hw {self.detector_hw} must be divisible by 2**{levels} = {factor} "
                f"(local_encoder_widths has {levels} levels, each halving the image)")
        upsamplings = len(self.decoder_widths) - 1
        if upsamplings > levels:
            raise ConfigError(
                f"decoder_widths has {len(self.decoder_widths)} levels ({upsamplings} upsamplings) "
                f"but the detector {self.detector_hw} is only halved {levels} times by "
                f"local_encoder_widths; use at most {levels + 1} decoder levels")
        beam_depth = self.depth_copies * 2 ** upsamplings
        if self.num_samples % beam_depth:
            raise ConfigError(
                f"num_samples (K = {self.num_samples}) must be a multiple of the decoder's beam depth "
                f"depth_copies * 2**(len(decoder_widths) - 1) = {beam_depth}")
        if any(size % self.velocity_downsample for size in self.shape_zyx):
            raise ConfigError(
                f"shape_zyx {self.shape_zyx} must be divisible by velocity_downsample "
                f"{self.velocity_downsample}")
        if min(self.shape_zyx) // self.velocity_downsample < 2:
            raise ConfigError(f"shape_zyx {self.shape_zyx} is too small for velocity_downsample "
                              f"{self.velocity_downsample}")
        number(self.leaky_slope, "leaky_slope", 0.0, 1.0, high_open=True)

    # Derived sizes -------------------------------------------------------------------------
    @property
    def decoder_upsamplings(self) -> int:
        return len(self.decoder_widths) - 1

    @property
    def beam_shape(self) -> tuple[int, int, int]:
        """(K', H', W') of the decoder's output beam-space grid."""
        coarse = 2 ** (len(self.local_encoder_widths) - self.decoder_upsamplings)
        return (self.depth_copies * 2 ** self.decoder_upsamplings,
                self.detector_hw[0] // coarse, self.detector_hw[1] // coarse)

    @property
    def velocity_shape_zyx(self) -> tuple[int, int, int]:
        return tuple(s // self.velocity_downsample for s in self.shape_zyx)  # type: ignore[return-value]

    # Serialisation --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for key, value in data.items():
            if isinstance(value, tuple):
                data[key] = list(value)
        return {"format": CONFIG_FORMAT, **data}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelConfig":
        if not isinstance(data, Mapping):
            raise ConfigError(f"a model config must be a JSON object, not {type(data).__name__}")
        data = dict(data)
        fmt = data.pop("format", CONFIG_FORMAT)
        if fmt != CONFIG_FORMAT:
            raise ConfigError(f"model config format {fmt!r} is not supported (expected {CONFIG_FORMAT!r})")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown model config field(s): {', '.join(unknown)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ConfigError(f"model config is not valid JSON: {error}") from None
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


#: The grid and widths of the paper (about 722 GFLOPs in the paper's count), with gradient
#: checkpointing so that a training step at batch 1 stays below the paper's 18.7 GB
#: (benchmarks/bench_model.py: ``paper_train_peak_gb``).
PAPER = ModelConfig(
    grid="paper", shape_zyx=(192, 128, 192), spacing_xyz_mm=(0.664, 0.664, 1.0),
    detector_hw=(160, 224), num_samples=256, affine_widths=(16, 32, 64, 128, 256),
    local_encoder_widths=(16, 32, 64, 64, 64), depth_copies=4,
    decoder_widths=(64, 32, 32, 16, 16, 16), velocity_downsample=1, recompute=True)

#: Half-resolution grid with narrower widths for CPU training and tests of the full pipeline:
#: 4 local levels (80 x 112 / 16 = 5 x 7), the decoder stops at beam grid (32, 40, 56) and the
#: velocity field lives on the half grid (48, 32, 48), whose sizes match.
COMPACT = ModelConfig()

PRESETS: dict[str, ModelConfig] = {"paper": PAPER, "compact": COMPACT}


def preset(name: str) -> ModelConfig:
    """The preset config called ``name`` (``paper`` or ``compact``)."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}") from None



def case_inputs(images, masks, projections, index_to_world) -> dict[str, np.ndarray]:
    """The model's input dict (batch of one) from per-view network-size arrays.

    ``images``/``masks``: two (H, W) arrays each; ``projections``: two (3, 4) P of the network
    detectors; ``index_to_world``: (4, 4) of the placed atlas grid.
    """
    return {
        "images": np.stack(images)[None].astype(np.float32),
        "masks": np.stack(masks)[None].astype(np.float32),
        "projection": np.stack(projections)[None].astype(np.float32),
        "index_to_world": np.asarray(index_to_world)[None].astype(np.float32),
    }


#: File name of a model card: one model per folder (``<folder>/<name>.keras`` + this file), the
#: layout :mod:`inference.pipeline` looks for under ``resources/models/``.
MODEL_CARD_NAME = "model_card.json"


def card_path_for(model_path: str | os.PathLike) -> pathlib.Path:
    """Where the model card of ``model_path`` lives: ``model_card.json`` in the same folder."""
    return pathlib.Path(model_path).with_name(MODEL_CARD_NAME)


def write_model_card(model_path: str | os.PathLike, config: ModelConfig,
                     extra: Mapping[str, Any] | None = None) -> pathlib.Path:
    """Write the model card (:func:`card_path_for`) of a saved model: format, name, file name,
    sha256, config, software version.

    ``extra`` (JSON-serialisable: training data, metrics, ...) is stored under its own keys.
    """
    from inference import __version__

    model_path = pathlib.Path(model_path)
    card = {
        "format": MODEL_CARD_FORMAT,
        "name": model_path.stem,
        "model_file": model_path.name,
        "sha256": sha256_file(model_path),
        "config": config.to_dict(),
        "software_version": __version__,
        "intended_use": "research use only; not for diagnosis or treatment decisions",
    }
    for key, value in dict(extra or {}).items():
        if key in card:
            raise ConfigError(f"model card key {key!r} is reserved")
        card[key] = value
    return write_card_file(card_path_for(model_path), card)


def update_model_card(path: str | os.PathLike, updates: Mapping[str, Any]) -> pathlib.Path:
    """Replace top-level keys of an existing model card (an ONNX export, a recipe's record),
    written as :func:`write_model_card` writes cards; the card must be valid to begin with."""
    card = read_model_card(path)
    card.update(updates)
    return write_card_file(pathlib.Path(path), card)


def write_card_file(path: pathlib.Path, card: Mapping[str, Any]) -> pathlib.Path:
    """Write a whole card dict to ``path`` (atomic; the one layout of every model card)."""
    write_text_atomic(path, json.dumps(card, indent=2, sort_keys=True) + "\n")
    return path


def read_model_card(path: str | os.PathLike) -> dict[str, Any]:
    path = pathlib.Path(path)
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"model card {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelError(f"model card {path} cannot be read: {error}") from None
    if not isinstance(card, dict) or card.get("format") != MODEL_CARD_FORMAT:
        raise ModelError(f"{path} is not a HipAtlas model card (format {MODEL_CARD_FORMAT!r})")
    if not isinstance(card.get("sha256"), str) or len(card["sha256"]) != 64:
        raise ModelError(f"model card {path} has no valid sha256")
    return card
