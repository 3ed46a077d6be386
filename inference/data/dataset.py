"""Training data sets of DRR pairs: view sampling, rendering, npz samples, manifest, readers.

One sample is one CT phantom on an atlas grid plus one pair of calibrated radiographs of it
(docs/architecture.md, "Data set on disk"). :func:`generate_dataset` makes N of them, in parallel
processes, resumably; :func:`iter_samples` and :func:`load_sample` read them back without
TensorFlow.

How a sample is made (:func:`synthesize_sample`, deterministic given ``(seed, index)``)
------------------------------------------------------------------------------------
1. Phantom: :func:`inference.data.phantom.make_phantom` of one shared femur (cycled within the
   sample's split) with random shape, pose (the femur moves inside the fixed atlas grid: that is
   what the affine module learns), hip rotation and tissue. The world frame of the sample is the
   grid's world (the canonical femur frame before the pose).
2. Views (:func:`sample_views`): SDD 1000 mm, SID 925 mm as in the paper, LAO angle 0 (AP) and
   90 (lateral); the *generalised* set draws each angle uniformly within +-30 deg around those.
   The isocentre sits at a random offset (+-25 mm per axis) from the femoral head: patients are
   never centred.
3. Network detector: :func:`inference.views.network_view` (the same crop rule that real cases go
   through) centres the network detector (compact 80x112, paper 160x224) on the projected grid.
4. Rendering (:func:`render_view_pair`): the DRR is rendered on a detector ``oversample`` times
   finer than the network detector (``P_full = crop_resize(P_net, 0, 0, k)``, pixel-area aligned),
   the realism augmentation (:mod:`inference.data.augment`) acts at that full resolution, and a
   k x k area average brings it to the network grid, where ``P_net`` is then exact. Masks are the
   projected femur label: the ray of a network pixel centre crosses at least ``mask_threshold_mm``
   of femur (:func:`inference.drr.render_path_length`).
5. An optional calibration error renders with a slightly wrong camera while the nominal ``P`` is
   stored (off by default).

Split: by specimen (the physical person), never by scan or side: TLEM2_CT and TLEM2_MRI are one
specimen, and a person's left and right femurs stay together. The default split is
``train = TLEM2 + MC22`` (adult bones, the population of hip arthroplasty) and ``val = JIA``
(an adolescent: a deliberately different shape, a fair test of generalisation); with only three
specimens there is no separate test specimen by default (``split`` overrides, e.g. train TLEM2,
val JIA, test MC22).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import math
import multiprocessing
import os
import pathlib
import struct
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from inference import __version__, validate
from inference.data.augment import (
    CalibrationErrorRanges,
    CalibrationPerturbation,
    RealismParams,
    RealismRanges,
    apply_realism,
    sample_calibration_perturbation,
    sample_realism_params,
)
from inference.errors import Cancelled, ConfigError, DataError, InputFileError

logger = logging.getLogger(__name__)

__all__ = [
    "DATASET_FORMAT",
    "SPLITS",
    "GEOMETRY_MODES",
    "DEFAULT_SPLIT",
    "DatasetGrid",
    "ViewSampling",
    "RenderSettings",
    "PhantomSampling",
    "SynthConfig",
    "SourceFemur",
    "dataset_grid",
    "available_femurs",
    "assign_samples",
    "sample_views",
    "ray_plan",
    "render_view_pair",
    "synthesize_sample",
    "synthesize_view_sets",
    "write_npz",
    "quantise_hu",
    "generate_dataset",
    "open_output",
    "build_samples",
    "shard_members",
    "sample_entry",
    "parse_shard",
    "merge_shards",
    "load_manifest",
    "load_sample",
    "decode_sample",
    "read_npz_bytes",
    "iter_samples",
]

DATASET_FORMAT = "hipatlas-dataset/1"
SPLITS = ("train", "val", "test")
GEOMETRY_MODES = ("orthogonal", "generalised")
MANIFEST = "manifest.json"

#: Default split by specimen (see the module docstring for the reasoning).
DEFAULT_SPLIT: dict[str, tuple[str, ...]] = {"train": ("TLEM2", "MC22"), "val": ("JIA",), "test": ()}
#: Fraction of the samples per split when a split has specimens (renormalised over those that do).
DEFAULT_SPLIT_FRACTIONS: dict[str, float] = {"train": 0.8, "val": 0.1, "test": 0.1}

#: The keys (and dtypes) of a sample npz (docs/architecture.md). ``pose`` is an addition.
SAMPLE_KEYS: dict[str, str] = {
    "volume": "float32", "labels": "uint8", "images": "float32", "masks": "uint8",
    "projection": "float64", "index_to_world": "float64", "landmarks_mm": "float32",
    "view_angles_deg": "float64",
}
OPTIONAL_KEYS: dict[str, str] = {"pose": "float64"}

# A fixed zip timestamp: np.savez stamps each member with the current time, which would make two
# runs of the same seed differ in bytes (and in sha256). 1980-01-01 is the zip epoch.
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
# 1/golden ratio: the fractional parts of i * phi^-1 fill [0, 1) evenly for any prefix of i, so
# the split of sample i depends on i alone (a data set can grow without reshuffling).
_INV_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0
# The manifest of a running generation is rewritten at most this often (seconds).
_MANIFEST_INTERVAL_S = 5.0


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class DatasetGrid:
    """The atlas grid of a data set and its network detector size.

    Attributes
    ----------
    name : str
        ``"paper"``, ``"compact"`` or a custom name (tests use tiny grids).
    geometry : inference.geometry.VolumeGeometry
        The grid in its world frame (the canonical femur frame for the atlas grids).
    detector_hw : (int, int)
        Network detector (rows, cols).
    """

    name: str
    geometry: Any
    detector_hw: tuple[int, int]

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ConfigError(f"DatasetGrid name must be a non-empty text, not {self.name!r}")
        if not hasattr(self.geometry, "index_to_world"):
            raise ConfigError(f"DatasetGrid geometry must be a VolumeGeometry, not {type(self.geometry).__name__}")
        hw = tuple(int(v) for v in self.detector_hw)
        if len(hw) != 2 or min(hw) < 2:
            raise ConfigError(f"DatasetGrid detector_hw must be two sizes >= 2, not {self.detector_hw!r}")
        object.__setattr__(self, "detector_hw", hw)

    def to_dict(self) -> dict:
        g = self.geometry
        return {"name": self.name, "shape_zyx": list(g.shape_zyx), "spacing_xyz_mm": list(g.spacing_xyz_mm),
                "origin_mm": list(g.origin_mm), "direction": [list(r) for r in g.direction],
                "index_to_world": g.index_to_world().tolist(), "detector_hw": list(self.detector_hw)}


def dataset_grid(name: str) -> DatasetGrid:
    """The named atlas grid (:func:`inference.data.atlas.grid_geometry`) and its network detector."""
    from inference.data.atlas import grid_geometry
    from inference.model import preset

    if name not in ("paper", "compact"):
        raise ConfigError(f"unknown grid {name!r}; choose 'paper' or 'compact'")
    return DatasetGrid(name, grid_geometry(name), tuple(preset(name).detector_hw))


@dataclass(frozen=True)
class ViewSampling:
    """How the two C-arm views of a sample are drawn (angles in LAO degrees, see geometry.CArmView).

    Attributes
    ----------
    mode : {"orthogonal", "generalised"}
        Orthogonal: exactly ``base_angles_deg``; generalised: each angle uniform within
        ``+-angle_range_deg`` around its base angle (the paper's generalised set: 30 deg).
    sdd_mm, sid_mm : float
        Source-detector and source-isocentre distances (paper: 1000 and 925 mm).
    base_angles_deg : (float, float)
        AP (0) and lateral (90: source at the patient's left, detector at the right hip).
    angle_range_deg : float
        Half-width of the generalised angle range.
    isocentre_offset_mm : float
        The isocentre lies uniformly within +-this per axis around the femoral head centre.
    view_names : (str, str)
    max_skew_deg : float or None
        Generalised only: a pair whose separation differs from 90 deg by more than this has its
        lateral jitter mirrored (deterministic, no extra draws), so wide ranges keep pairs that two
        radiographs can actually reconstruct. None (default): every drawn pair is kept.
    """

    mode: str = "orthogonal"
    sdd_mm: float = 1000.0
    sid_mm: float = 925.0
    base_angles_deg: tuple[float, float] = (0.0, 90.0)
    angle_range_deg: float = 30.0
    isocentre_offset_mm: float = 25.0
    view_names: tuple[str, str] = ("AP", "LAT")
    max_skew_deg: float | None = None

    def __post_init__(self) -> None:
        if self.mode not in GEOMETRY_MODES:
            raise ConfigError(f"ViewSampling mode must be one of {GEOMETRY_MODES}, not {self.mode!r}")
        sdd = validate.number(self.sdd_mm, "ViewSampling sdd_mm", 0, low_open=True)
        sid = validate.number(self.sid_mm, "ViewSampling sid_mm", 0, low_open=True)
        if sid >= sdd:
            raise ConfigError(f"ViewSampling sid_mm ({sid}) must be smaller than sdd_mm ({sdd})")
        if len(self.base_angles_deg) != 2:
            raise ConfigError(f"ViewSampling base_angles_deg must hold 2 angles, not {self.base_angles_deg!r}")
        object.__setattr__(self, "base_angles_deg",
                           tuple(validate.number(a, "ViewSampling base_angles_deg") for a in self.base_angles_deg))
        validate.number(self.angle_range_deg, "ViewSampling angle_range_deg", 0, 89)
        validate.number(self.isocentre_offset_mm, "ViewSampling isocentre_offset_mm", 0, 500)
        if self.max_skew_deg is not None:
            validate.number(self.max_skew_deg, "ViewSampling max_skew_deg", 0, 89)
        if len(self.view_names) != 2 or self.view_names[0] == self.view_names[1]:
            raise ConfigError(f"ViewSampling view_names must be two different names, not {self.view_names!r}")

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        if out["max_skew_deg"] is None:  # data sets made before the option keep their manifests
            del out["max_skew_deg"]
        return out


@dataclass(frozen=True)
class RenderSettings:
    """How DRRs and masks are rendered.

    Attributes
    ----------
    oversample : int
        The DRR is rendered on a detector this many times finer than the network detector, then
        area-averaged (anti-aliasing, and the realism transform acts at a detector-like pitch).
    step_mm : float or None
        Ray-marching step; None = the grid's smallest voxel spacing (the phantom holds no detail
        finer than its voxels, and trilinear sampling at that step is accurate to ~1%).
    mask_threshold_mm : float
        A network pixel is femur when its central ray crosses at least this much femur.
    """

    oversample: int = 2
    step_mm: float | None = None
    mask_threshold_mm: float = 0.5

    def __post_init__(self) -> None:
        object.__setattr__(self, "oversample", validate.whole_number(self.oversample, "RenderSettings oversample", 1, 8))
        if self.step_mm is not None:
            object.__setattr__(self, "step_mm",
                               validate.number(self.step_mm, "RenderSettings step_mm", 0, 20, low_open=True))
        validate.number(self.mask_threshold_mm, "RenderSettings mask_threshold_mm", 0, 50)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class PhantomSampling:
    """Arguments of :func:`inference.data.phantom.sample_phantom_params` (paper: +-10 deg pose)."""

    max_rotation_deg: float = 10.0
    max_translation_mm: float = 5.0
    max_hip_rotation_deg: float = 5.0
    shape: bool = True
    tissue: bool = True
    #: (low, high) of the shaft-width factor (:class:`inference.data.shape.ShapeParams`), drawn
    #: uniformly from the sample's own stream (so every other draw stays as it was); None: 1.
    shaft_width_range: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        validate.number(self.max_rotation_deg, "PhantomSampling max_rotation_deg", 0, 45)
        validate.number(self.max_translation_mm, "PhantomSampling max_translation_mm", 0, 50)
        validate.number(self.max_hip_rotation_deg, "PhantomSampling max_hip_rotation_deg", 0, 30)
        if self.shaft_width_range is not None:
            if not self.shape:
                raise ConfigError("a shaft-width range needs shape augmentation")
            try:
                low, high = (float(v) for v in self.shaft_width_range)
            except (TypeError, ValueError):
                raise ConfigError(f"the shaft-width range must be (low, high), not {self.shaft_width_range!r}") from None
            validate.number(low, "PhantomSampling shaft_width_range low", 0.8, 1.25)
            validate.number(high, "PhantomSampling shaft_width_range high", 0.8, 1.25)
            if low > high:
                raise ConfigError(f"the shaft-width range must have low <= high, not {low:g} > {high:g}")
            object.__setattr__(self, "shaft_width_range", (low, high))

    def to_dict(self) -> dict:
        # Without the range when it is off: manifests of earlier data sets stay as they were.
        data = dataclasses.asdict(self)
        if data["shaft_width_range"] is None:
            del data["shaft_width_range"]
        else:
            data["shaft_width_range"] = list(data["shaft_width_range"])
        return data

    def sample(self, rng: np.random.Generator, shape_rng: np.random.Generator):
        """Phantom parameters of a sample (:func:`inference.data.phantom.sample_phantom_params`),
        with the shaft width drawn from ``shape_rng`` when a range is set."""
        from inference.data import phantom as phantom_mod

        params = phantom_mod.sample_phantom_params(rng, max_rotation_deg=self.max_rotation_deg,
                                                   max_translation_mm=self.max_translation_mm,
                                                   max_hip_rotation_deg=self.max_hip_rotation_deg,
                                                   shape=self.shape, tissue=self.tissue)
        if self.shaft_width_range is None:
            return params
        factor = float(shape_rng.uniform(*self.shaft_width_range))
        return dataclasses.replace(params, shape=dataclasses.replace(params.shape, shaft_width_factor=factor))


def _normalise_split(split: Mapping[str, Sequence[str]] | None) -> dict[str, tuple[str, ...]]:
    split = DEFAULT_SPLIT if split is None else split
    unknown = set(split) - set(SPLITS)
    if unknown:
        raise ConfigError(f"split names must be among {SPLITS}, not {sorted(unknown)}")
    groups = {name: tuple(str(s) for s in split.get(name, ())) for name in SPLITS}
    seen: dict[str, str] = {}
    for name, specimens in groups.items():
        for specimen in specimens:
            if specimen in seen and seen[specimen] != name:
                raise ConfigError(f"specimen {specimen!r} is in both the {seen[specimen]} and the {name} split; "
                                  "a person's bones must stay in one split")
            seen[specimen] = name
    if not groups["train"]:
        raise ConfigError("the train split has no specimen")
    return groups


@dataclass(frozen=True)
class SynthConfig:
    """Everything that defines a synthetic data set besides its size, seed and grid."""

    views: ViewSampling = field(default_factory=ViewSampling)
    render: RenderSettings = field(default_factory=RenderSettings)
    phantom: PhantomSampling = field(default_factory=PhantomSampling)
    realism: RealismRanges = field(default_factory=RealismRanges)
    calibration_error: CalibrationErrorRanges = field(default_factory=CalibrationErrorRanges)
    split: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: dict(DEFAULT_SPLIT))
    split_fractions: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_SPLIT_FRACTIONS))
    #: Optional :class:`inference.data.shape_model.ShapeModelSampling`: a statistical deformation
    #: of the source femur before the shape modes; it must come from the train split only.
    shape_model: Any = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "split", _normalise_split(self.split))
        if self.shape_model is not None:
            self.shape_model.check_split(self.split)
        fractions = {name: validate.number(self.split_fractions.get(name, 0.0),
                                           f"SynthConfig split_fractions[{name}]", 0, 1)
                     for name in SPLITS}
        object.__setattr__(self, "split_fractions", fractions)

    def effective_fractions(self) -> dict[str, float]:
        """Split fractions over the splits that have specimens, summing to 1."""
        used = {name: self.split_fractions[name] for name in SPLITS if self.split[name]}
        total = sum(used.values())
        if total <= 0:
            raise ConfigError("the split fractions of the splits that have specimens are all 0")
        return {name: used.get(name, 0.0) / total for name in SPLITS}

    def to_dict(self) -> dict:
        out = {"views": self.views.to_dict(), "render": self.render.to_dict(), "phantom": self.phantom.to_dict(),
               "realism": self.realism.to_dict(), "calibration_error": self.calibration_error.to_dict(),
               "split": {k: list(v) for k, v in self.split.items()},
               "split_fractions": self.effective_fractions()}
        if self.shape_model is not None:  # only then: manifests of earlier data sets stay the same
            out["shape_model"] = self.shape_model.to_dict()
        return out


# ----------------------------------------------------------------------------------------------
# Subjects and split
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SourceFemur:
    """One source femur: ``name`` as :func:`inference.data.phantom.load_subject_model` takes it
    (``"MC22:left"``) and the specimen (physical person) it belongs to."""

    name: str
    specimen: str

    @property
    def file_stem(self) -> str:
        return self.name.replace(":", "-")


def available_femurs(folder: str | os.PathLike | None = None) -> list[SourceFemur]:
    """Every femur of the shared bone folder, with its specimen (sorted by name)."""
    from inference.data.bones import list_subjects

    femurs = []
    for subject in list_subjects(folder):
        for side in sorted(subject.femur_paths):
            femurs.append(SourceFemur(f"{subject.subject_id}:{side}", subject.specimen))
    return sorted(femurs, key=lambda f: f.name)


def _split_of_index(index: int, fractions: Mapping[str, float]) -> str:
    position = (0.5 + index * _INV_GOLDEN) % 1.0
    cumulative = 0.0
    last = None
    for name in SPLITS:
        if fractions[name] <= 0:
            continue
        cumulative += fractions[name]
        last = name
        if position < cumulative:
            return name
    return last  # rounding at the top end


def assign_samples(n: int, femurs: Sequence[SourceFemur], config: SynthConfig) -> list[tuple[str, SourceFemur]]:
    """(split, source femur) of samples ``0..n-1``.

    The split of sample ``i`` depends only on ``i`` and the split fractions; within a split the
    femurs are used in turn. No specimen appears in two splits.

    Raises
    ------
    ConfigError
        A specimen of the split is unknown, or a split with a non-zero fraction has no femur.
    """
    by_specimen: dict[str, list[SourceFemur]] = {}
    for femur in femurs:
        by_specimen.setdefault(femur.specimen, []).append(femur)
    split_femurs: dict[str, list[SourceFemur]] = {}
    for name in SPLITS:
        chosen: list[SourceFemur] = []
        for specimen in config.split[name]:
            if specimen not in by_specimen:
                raise ConfigError(f"the {name} split names specimen {specimen!r}, but the bone folder has only "
                                  f"{sorted(by_specimen)}")
            chosen.extend(by_specimen[specimen])
        split_femurs[name] = sorted(chosen, key=lambda f: f.name)
    unused = sorted(set(by_specimen) - {s for group in config.split.values() for s in group})
    if unused:
        logger.info("specimens %s are in no split and are not used", unused)
    fractions = config.effective_fractions()
    counters = dict.fromkeys(SPLITS, 0)
    assignment = []
    for index in range(int(n)):
        split = _split_of_index(index, fractions)
        pool = split_femurs[split]
        assignment.append((split, pool[counters[split] % len(pool)]))
        counters[split] += 1
    return assignment


# ----------------------------------------------------------------------------------------------
# Views and rendering
# ----------------------------------------------------------------------------------------------
def sample_views(rng: np.random.Generator, sampling: ViewSampling, head_centre_mm: Any,
                 detector_pixel_mm: float = 0.3, detector_size: int = 2048,
                 angles_deg: Any = None) -> tuple[list, np.ndarray]:
    """Two C-arm views around a femoral head.

    Always draws the same number of random values (so later draws of ``rng`` do not depend on
    the mode). ``angles_deg`` (two LAO angles) replaces the sampled angles (experiments that set
    the view pair themselves); the isocentre is drawn as always.

    Returns
    -------
    views : list of two inference.geometry.CArmView
        Nominal full-field detectors (``detector_size`` square at ``detector_pixel_mm``); only
        their projection matters, the network detector is cut from it.
    angles_deg : (2,) float64
    """
    from inference.geometry import CArmView

    jitter = rng.uniform(-1.0, 1.0, size=2)
    offset = rng.uniform(-1.0, 1.0, size=3) * sampling.isocentre_offset_mm
    angles = np.asarray(sampling.base_angles_deg, dtype=np.float64)
    if sampling.mode == "generalised":
        if (sampling.max_skew_deg is not None
                and abs(jitter[1] - jitter[0]) * sampling.angle_range_deg > sampling.max_skew_deg):
            jitter[1] = -jitter[1]  # |j1 + j0| <= max(|j0|, |j1|) <= 1 once the signs differ
        angles = angles + jitter * sampling.angle_range_deg
    if angles_deg is not None:
        angles = np.asarray(angles_deg, dtype=np.float64).reshape(2)
    isocentre = np.asarray(head_centre_mm, dtype=np.float64).reshape(3) + offset
    views = [CArmView(sdd_mm=sampling.sdd_mm, sid_mm=sampling.sid_mm, lao_deg=float(a), cranial_deg=0.0,
                      rows=detector_size, cols=detector_size, pixel_mm=detector_pixel_mm,
                      isocentre_mm=tuple(float(x) for x in isocentre))
             for a in angles]
    return views, angles


def _area_downsample(image: np.ndarray, factor: int) -> np.ndarray:
    if factor == 1:
        return image
    rows, cols = image.shape[0] // factor, image.shape[1] // factor
    return image.reshape(rows, factor, cols, factor).mean(axis=(1, 3), dtype=np.float64).astype(np.float32)


def ray_plan(projection: np.ndarray, volume_geometry: Any, rows: int, cols: int, step_mm: float) -> dict:
    """``num_samples`` (for ``step_mm``) and ``chunk_rows`` keyword arguments of the renderer.

    The whole detector goes in one call (the renderer's kernel bounds its memory by looping over
    depth planes itself): one call instead of several saves Python/TensorFlow overhead, and the
    kernel's shapes then depend less on the view -- every new shape costs an XLA compilation
    (0.3-1 s), far more than rendering (~0.05 s for the compact detector).
    """
    from inference import drr

    samples = drr.samples_for_step(projection, volume_geometry.index_to_world(), volume_geometry.shape_zyx, rows,
                                   cols, step_mm)
    # Rounded up to a multiple of 64 (a finer step, never a coarser one): fewer distinct kernels.
    samples = int(math.ceil(samples / 64.0) * 64)
    return {"num_samples": samples, "chunk_rows": int(rows)}


def render_view_pair(volume_hu: np.ndarray, labels: np.ndarray | None, volume_geometry: Any, grid: DatasetGrid,
                     views: Sequence[Any], render: RenderSettings,
                     realism: Sequence[RealismParams] | None = None,
                     calibration: Sequence[CalibrationPerturbation] | None = None,
                     calibration_centre_mm: Any = (0.0, 0.0, 0.0),
                     cancel: Any = None) -> dict[str, np.ndarray]:
    """Render the network-size radiographs and femur masks of a CT for the given views.

    Parameters
    ----------
    volume_hu : (Z, Y, X) array
        CT in HU on ``volume_geometry`` (a phantom on the grid, or a whole real CT).
    labels : (Z, Y, X) integer array or None
        Label map on ``volume_geometry`` (1 = femur); None gives empty masks.
    volume_geometry : VolumeGeometry
        The CT's grid in the world frame of ``grid``.
    grid : DatasetGrid
        Atlas grid (placed in the same world) the network detector is centred on.
    views : two inference.geometry.CArmView
    render : RenderSettings
    realism : two RealismParams or None
    calibration : two CalibrationPerturbation or None
        If given, images and masks are rendered with the perturbed cameras; ``projection`` is
        always the nominal one.
    calibration_centre_mm : (3,)
        Pivot of the calibration error's rotation (the isocentre).

    Returns
    -------
    dict
        ``images`` (2, H, W) float32, ``masks`` (2, H, W) uint8, ``projection`` (2, 3, 4) float64,
        ``pixel_mm`` (2,) float64 (network detector pitch at the detector plane).
    """
    from inference import drr, geometry, views as views_mod

    rows, cols = grid.detector_hw
    k = render.oversample
    step = render.step_mm if render.step_mm is not None else float(min(volume_geometry.spacing_xyz_mm))
    images, masks, projections, pitches = [], [], [], []
    for number, view in enumerate(views):
        source_p = geometry.projection_matrix(view)
        net = views_mod.network_view(source_p, grid.geometry, (rows, cols), (view.rows, view.cols))
        p_net = net.projection
        p_render = p_net
        if calibration is not None and not calibration[number].is_identity:
            p_render = calibration[number].apply(p_net, calibration_centre_mm)
        # Output pixel i of a k-times finer detector samples network coordinate (i + 0.5)/k - 0.5,
        # so a k x k block average of it lands exactly on network pixel i (pixel-area alignment).
        p_full = geometry.crop_resize(p_render, 0.0, 0.0, float(k))
        full = drr.render_drr(volume_hu, volume_geometry, p_full, rows * k, cols * k, cancel=cancel,
                              **ray_plan(p_full, volume_geometry, rows * k, cols * k, step))
        net_pixel_mm = view.pixel_mm / net.scale
        if realism is not None:
            full = apply_realism(full, realism[number], net_pixel_mm / k)
        images.append(_area_downsample(full, k))
        if labels is not None:
            path = drr.render_path_length(labels, volume_geometry, p_render, rows, cols, label=1, cancel=cancel,
                                          **ray_plan(p_render, volume_geometry, rows, cols, step))
            masks.append((path >= max(render.mask_threshold_mm, 1e-6)).astype(np.uint8))
        else:
            masks.append(np.zeros((rows, cols), dtype=np.uint8))
        projections.append(p_net)
        pitches.append(net_pixel_mm)
    return {"images": np.stack(images).astype(np.float32), "masks": np.stack(masks),
            "projection": np.stack(projections).astype(np.float64), "pixel_mm": np.asarray(pitches)}


def _landmark_array(landmarks: Mapping[str, Any]) -> np.ndarray:
    from inference.anatomy import LANDMARK_NAMES

    missing = [name for name in LANDMARK_NAMES if name not in landmarks]
    if missing:
        raise DataError(f"landmarks {missing} are missing (have {sorted(landmarks)})")
    return np.stack([np.asarray(landmarks[name], dtype=np.float64).reshape(3) for name in LANDMARK_NAMES]).astype(np.float32)


def _sample_rngs(seed: int, index: int) -> dict[str, np.random.Generator]:
    # Independent streams per purpose: changing e.g. the realism ranges never changes the phantom
    # or the views of a sample.
    # A stream added later goes last: spawned children are numbered, so the earlier ones keep theirs.
    names = ("phantom", "views", "realism", "calibration", "shape")
    children = np.random.SeedSequence([int(seed), int(index)]).spawn(len(names))
    return {name: np.random.default_rng(child) for name, child in zip(names, children)}


def synthesize_sample(config: SynthConfig, grid: DatasetGrid, seed: int, index: int, femur: str | Any,
                      cancel: Any = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Make sample ``index`` of a data set (deterministic given the arguments).

    Parameters
    ----------
    config : SynthConfig
        ``config.views.mode`` selects the orthogonal or the generalised view set.
    grid : DatasetGrid
    seed, index : int
    femur : str or inference.data.phantom.SubjectModel
        Source femur (``"MC22:left"``) or a ready subject model.

    Returns
    -------
    arrays : dict
        The npz content (:data:`SAMPLE_KEYS` plus ``pose``).
    meta : dict
        JSON-friendly generation parameters of the sample (for the manifest).
    """
    return synthesize_view_sets(config, grid, seed, index, femur, (config.views.mode,), cancel=cancel)[0]


def synthesize_view_sets(config: SynthConfig, grid: DatasetGrid, seed: int, index: int, femur: str | Any,
                         modes: Sequence[str] = GEOMETRY_MODES, cancel: Any = None
                         ) -> list[tuple[dict[str, np.ndarray], dict[str, Any]]]:
    """One phantom, one view pair per geometry mode (each equal to :func:`synthesize_sample` of that mode).

    The phantom is the expensive part; data sets of both view sets share it this way.
    """
    from inference.data import phantom as phantom_mod

    for mode in modes:
        if mode not in GEOMETRY_MODES:
            raise ConfigError(f"geometry mode must be one of {GEOMETRY_MODES}, not {mode!r}")
    rngs = _sample_rngs(seed, index)
    params = config.phantom.sample(rngs["phantom"], rngs["shape"])
    deformation = None if config.shape_model is None else config.shape_model.deformation(seed, index)
    phantom = phantom_mod.make_phantom(femur, params, grid.geometry, deformation=deformation)
    landmarks = _landmark_array(phantom.landmarks_mm)
    results = []
    for mode in modes:
        # Fresh streams per mode, so that each view set equals the single-mode sample.
        rngs = _sample_rngs(seed, index)
        sampling = dataclasses.replace(config.views, mode=mode)
        views, angles = sample_views(rngs["views"], sampling, landmarks[0])
        realism = [sample_realism_params(rngs["realism"], config.realism) for _ in views]
        calibration = None
        if config.calibration_error.enabled:
            calibration = [sample_calibration_perturbation(rngs["calibration"], config.calibration_error)
                           for _ in views]
        rendered = render_view_pair(phantom.ct_hu, phantom.labels, grid.geometry, grid, views, config.render,
                                    realism, calibration, views[0].isocentre_mm, cancel=cancel)
        arrays = {
            "volume": quantise_hu(phantom.ct_hu),
            "labels": phantom.labels.astype(np.uint8),
            "images": rendered["images"],
            "masks": rendered["masks"],
            "projection": rendered["projection"],
            "index_to_world": grid.geometry.index_to_world(),
            "landmarks_mm": landmarks,
            "view_angles_deg": angles.astype(np.float64),
            "pose": phantom_mod.pose_matrix(params),
        }
        meta = {
            "subject": phantom.subject,
            "geometry_mode": mode,
            "view_names": list(config.views.view_names),
            "view_angles_deg": angles.tolist(),
            "isocentre_mm": list(views[0].isocentre_mm),
            "network_pixel_mm": rendered["pixel_mm"].tolist(),
            "head_radius_mm": float(phantom.head_radius_mm),
            "phantom_params": params.to_dict(),
            "realism": [r.to_dict() for r in realism],
            "calibration_error": None if calibration is None else [c.to_dict() for c in calibration],
            "mask_pixels": [int(m.sum()) for m in rendered["masks"]],
        }
        if deformation is not None:
            meta["shape_model"] = deformation.to_dict()
        results.append((arrays, meta))
    return results


# ----------------------------------------------------------------------------------------------
# npz files
# ----------------------------------------------------------------------------------------------
def write_npz(path: str | os.PathLike, arrays: Mapping[str, np.ndarray]) -> pathlib.Path:
    """Write an ``.npz`` (deflate) atomically and byte-reproducibly; readable by ``np.load``.

    Unlike ``np.savez_compressed`` the zip members carry a fixed timestamp, so the same arrays
    always give the same bytes (and the same sha256 in the manifest). Object arrays are refused.
    """
    from inference.io import atomic_file

    final = pathlib.Path(path)
    with atomic_file(final, ".npz") as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name in sorted(arrays):
            array = np.ascontiguousarray(arrays[name])
            if array.dtype == object:
                raise DataError(f"array {name!r} has dtype object; samples hold numeric arrays only")
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, array, allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_EPOCH)
            info.external_attr = 0o644 << 16
            # Level 1 for large members: on CT-like data it compresses nearly as well as the
            # default level 6 at a quarter of the time (the volume dominates the writing time).
            level = 1 if array.nbytes > (1 << 20) else 6
            archive.writestr(info, buffer.getvalue(), compress_type=zipfile.ZIP_DEFLATED, compresslevel=level)
    return final


def quantise_hu(volume: np.ndarray) -> np.ndarray:
    """Round HU to 1/4 HU (float32): invisible next to CT noise (>= 10 HU), but it empties the low
    mantissa bits, so the volume compresses ~2x better in the npz (e.g. 2.1 -> 1.1 MB compact)."""
    return (np.round(np.asarray(volume, dtype=np.float32) * 4.0) / 4.0).astype(np.float32)


def load_sample(path: str | os.PathLike, *, verify_sha256: str | None = None) -> dict[str, np.ndarray]:
    """Read one sample npz (``allow_pickle=False``) and check its keys, dtypes and shapes.

    Raises
    ------
    InputFileError
        Missing, truncated or corrupt file, or a sha256 that differs from ``verify_sha256``.
    DataError
        Missing keys or inconsistent shapes.
    """
    file = pathlib.Path(path)
    if not file.is_file():
        raise InputFileError(f"{file}: sample file not found")
    if verify_sha256 is not None:
        from inference.checksums import sha256_file

        actual = sha256_file(file)
        if actual != verify_sha256:
            raise InputFileError(f"{file}: checksum differs from the manifest (file changed or damaged); "
                                 "regenerate it with the same command (generation resumes)")
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise InputFileError(f"{file}: cannot read the sample ({exc})") from exc
    return decode_sample(data, file)


def decode_sample(data: bytes, name: Any = "sample", *, writable: bool = True) -> dict[str, np.ndarray]:
    """:func:`load_sample` of the bytes of a sample file (read elsewhere, e.g. by ``tf.data``).

    ``writable=False`` returns read-only arrays over the decompressed bytes (one copy fewer)."""
    try:
        arrays = read_npz_bytes(data, writable=writable)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, struct.error, *_INFLATE_ERRORS) as exc:
        raise InputFileError(f"{name}: cannot read the sample ({exc}); is it truncated?") from exc
    return _check_sample(arrays, name)


def read_npz_bytes(data: bytes, *, writable: bool = True) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` held in memory, like ``np.load`` with ``allow_pickle=False``.

    Faster than ``np.load`` on a sample: each deflated member is inflated by one zlib call
    (which releases Python's lock for the whole member, so parallel ``tf.data`` decodes run side
    by side) and checked against its CRC-32; arrays are views of the inflated bytes, copied only
    when ``writable``. Object arrays are refused (ValueError).
    """
    view = memoryview(data)
    arrays: dict[str, np.ndarray] = {}
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for info in archive.infolist():
            if info.compress_type == zipfile.ZIP_DEFLATED and not info.flag_bits & 0x1:
                signature, name_length, extra_length = struct.unpack_from("<4s22xHH", data, info.header_offset)
                if signature != b"PK\x03\x04":
                    raise zipfile.BadZipFile(f"no local header for {info.filename}")
                begin = info.header_offset + 30 + name_length + extra_length
                member = _inflate(view[begin:begin + info.compress_size], -15, info.file_size)
                if len(member) != info.file_size or zlib.crc32(member) != info.CRC:
                    raise zipfile.BadZipFile(f"bad CRC-32 or size of {info.filename}")
            else:
                member = archive.read(info)  # stored (or other) members: zipfile's own reader
            arrays[info.filename.removesuffix(".npy")] = _npy_array(member, writable)
    return arrays


def _raw_inflate() -> tuple[Callable[..., bytes], tuple[type[Exception], ...]]:
    """zlib's ``decompress`` and its error, or ISA-L's (the same bytes, ~1.6x faster) when
    ``isal`` is installed (``pip install hipatlas[fast-input]``)."""
    try:
        from isal import isal_zlib
    except ImportError:
        return zlib.decompress, (zlib.error,)
    return isal_zlib.decompress, (isal_zlib.error, zlib.error)


_inflate, _INFLATE_ERRORS = _raw_inflate()


def _npy_array(member: bytes, writable: bool) -> np.ndarray:
    header = io.BytesIO(member)
    version = np.lib.format.read_magic(header)
    reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran_order, dtype = reader(header)
    if dtype.hasobject:
        raise ValueError("the file holds an object array; samples hold numeric arrays only")
    count = math.prod(shape)
    array = np.frombuffer(member, dtype=dtype, count=count, offset=header.tell())
    array = array.reshape(shape[::-1]).transpose() if fortran_order else array.reshape(shape)
    return array.copy(order="K") if writable else array


def _check_sample(arrays: dict[str, np.ndarray], file: Any) -> dict[str, np.ndarray]:
    missing = [name for name in SAMPLE_KEYS if name not in arrays]
    if missing:
        raise DataError(f"{file}: sample lacks {missing}; not a {DATASET_FORMAT} sample")
    volume, images = arrays["volume"], arrays["images"]
    checks = [
        (volume.ndim == 3, "volume must be (Z, Y, X)"),
        (arrays["labels"].shape == volume.shape, "labels must match the volume's shape"),
        (images.ndim == 3 and images.shape[0] == 2, "images must be (2, H, W)"),
        (arrays["masks"].shape == images.shape, "masks must match the images' shape"),
        (arrays["projection"].shape == (2, 3, 4), "projection must be (2, 3, 4)"),
        (arrays["index_to_world"].shape == (4, 4), "index_to_world must be (4, 4)"),
        (arrays["landmarks_mm"].ndim == 2 and arrays["landmarks_mm"].shape[1] == 3, "landmarks_mm must be (L, 3)"),
        (arrays["view_angles_deg"].shape == (2,), "view_angles_deg must be (2,)"),
    ]
    for ok, message in checks:
        if not ok:
            raise DataError(f"{file}: {message}")
    return arrays


# ----------------------------------------------------------------------------------------------
# Manifest
# ----------------------------------------------------------------------------------------------
def load_manifest(data_dir: str | os.PathLike) -> dict:
    """Read and check ``DATA_DIR/manifest.json``."""
    path = pathlib.Path(data_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputFileError(f"{path}: no manifest; is {data_dir} a HipAtlas data set folder?") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputFileError(f"{path}: cannot read the manifest ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != DATASET_FORMAT:
        raise DataError(f"{path}: format is {manifest.get('format') if isinstance(manifest, dict) else None!r}, "
                        f"expected {DATASET_FORMAT!r}")
    if not isinstance(manifest.get("samples"), list):
        raise DataError(f"{path}: 'samples' must be a list")
    return manifest


def _json_normalise(obj: Any) -> Any:
    """Round-trip through JSON so that tuples/lists and numpy scalars compare equal to a loaded file."""
    from inference.io import _json_default

    return json.loads(json.dumps(obj, default=_json_default))


def _base_manifest(kind: str, grid: DatasetGrid, parameters: dict) -> dict:
    from inference import drr
    from inference.anatomy import LANDMARK_NAMES

    return {
        "format": DATASET_FORMAT,
        "kind": kind,
        "software_version": __version__,
        "grid": grid.to_dict(),
        "detector_hw": list(grid.detector_hw),
        "landmark_names": list(LANDMARK_NAMES),
        "hu_to_mu": dict(drr.HU_TO_MU_CONSTANTS),
        "npz_keys": {**SAMPLE_KEYS, **OPTIONAL_KEYS},
        "parameters": _json_normalise(parameters),
    }


def _write_manifest(out: pathlib.Path, manifest: dict, entries: Mapping[int, dict], complete: bool) -> None:
    from inference.io import write_json_atomic

    samples = [entries[i] for i in sorted(entries)]
    counts = {name: sum(1 for s in samples if s["split"] == name) for name in SPLITS}
    subjects = {name: sorted({s["subject"] for s in samples if s["split"] == name}) for name in SPLITS}
    document = dict(manifest, complete=bool(complete), updated=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    split_counts=counts, split_subjects=subjects, samples=samples)
    write_json_atomic(out / MANIFEST, document)


def _remove_stale_temporaries(out: pathlib.Path) -> None:
    for folder in [out, *(out / s for s in SPLITS)]:
        if folder.is_dir():
            for stale in folder.glob(".*.tmp-*"):
                with contextlib.suppress(OSError):
                    stale.unlink()


def _sample_file(split: str, femur: SourceFemur, index: int) -> str:
    return f"{split}/s{femur.file_stem}_{index:06d}.npz"


# ----------------------------------------------------------------------------------------------
# Workers
# ----------------------------------------------------------------------------------------------
_WORKER: dict[str, Any] = {}


def _init_worker(state: dict, threads: int | None) -> None:
    """Process initialiser: limit TensorFlow's threads (workers share the cores) and keep the state."""
    if threads:
        import tensorflow as tf

        with contextlib.suppress(RuntimeError):  # already initialised (in-process use)
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(1)
    _WORKER.clear()
    _WORKER.update(state)


def _make_and_write(state: Mapping[str, Any], task: tuple[int, str, str, str, str]) -> list[dict]:
    """Synthesise and write one sample (a task of :func:`generate_dataset`); its manifest entry."""
    index, split, femur_name, specimen, relative = task
    models = state.get("models") or {}
    femur = models.get(femur_name, femur_name)
    arrays, meta = synthesize_sample(state["config"], state["grid"], state["seed"], index, femur)
    entry = sample_entry(write_npz(pathlib.Path(state["out"]) / relative, arrays), index, relative, split,
                         femur_name, specimen)
    entry.update(meta)
    entry["subject"] = femur_name
    return [_json_normalise(entry)]


def sample_entry(path: pathlib.Path, index: int, relative: str, split: str, subject: str, specimen: str) -> dict:
    """The manifest entry of a written sample file (its checksum and size), without the details."""
    from inference.checksums import sha256_file

    return {"index": int(index), "file": relative, "split": split, "subject": subject, "specimen": specimen,
            "sha256": sha256_file(path), "bytes": path.stat().st_size}


def _run_task(task: Any) -> list[dict]:
    """A task of :func:`build_samples` in a worker process (or in this one)."""
    return _WORKER["run"](_WORKER, task)


def _is_cancelled(cancel: Any) -> bool:
    if cancel is None:
        return False
    if hasattr(cancel, "is_set"):
        return bool(cancel.is_set())
    return bool(cancel())


def generate_dataset(out_dir: str | os.PathLike, subjects: int, grid: str | DatasetGrid = "compact",
                     geometry: str = "orthogonal", seed: int = 0, workers: int = 2, *,
                     config: SynthConfig | None = None, split: Mapping[str, Sequence[str]] | None = None,
                     femurs: Sequence[SourceFemur] | None = None, models: Mapping[str, Any] | None = None,
                     progress: Callable[[int, int], None] | None = None, cancel: Any = None,
                     shard: tuple[int, int] | None = None) -> pathlib.Path:
    """Generate (or resume) a synthetic DRR data set, or one shard of it.

    Parameters
    ----------
    out_dir : path
        Data set folder (created). If it holds a manifest made with the same parameters, samples
        already there with a matching sha256 are kept (resume); a folder with other content is
        refused.
    subjects : int
        Number of samples N (phantoms; each with one view pair).
    grid : {"compact", "paper"} or DatasetGrid
    geometry : {"orthogonal", "generalised"}
        Overrides ``config.views.mode``.
    seed : int
        Sample ``i`` depends only on ``(seed, i)`` and the parameters, not on ``workers``.
    workers : int
        Processes (spawned; 0 or 1 = in this process).
    config : SynthConfig, optional
    split : mapping split -> specimens, optional
        Overrides ``config.split``.
    femurs : sequence of SourceFemur, optional
        Source femurs (default: every femur of the shared bones).
    models : mapping name -> SubjectModel, optional
        Ready subject models by femur name (tests use analytic ones).
    progress : callable(done, total), optional
    cancel : threading.Event or callable, optional
        Checked between samples; a cancelled run keeps what is done (resumable) and raises
        :class:`~inference.errors.Cancelled`.
    shard : (I, N), optional
        Make only the samples ``i`` with ``i % N == I`` (0 <= I < N) of the N-sample data set,
        into a shard folder whose manifest says so; :func:`merge_shards` joins the N shard
        folders into the data set an unsharded run makes (the same sample files, byte for byte).

    Returns
    -------
    pathlib.Path
        The manifest.
    """
    validate.positive_int(subjects, "subjects (number of samples)")
    validate.whole_number(seed, "seed", 0)
    if geometry not in GEOMETRY_MODES:
        raise ConfigError(f"geometry must be one of {GEOMETRY_MODES}, not {geometry!r}")
    config = config or SynthConfig()
    config = dataclasses.replace(config, views=dataclasses.replace(config.views, mode=geometry))
    if split is not None:
        config = dataclasses.replace(config, split=split)
    grid = dataset_grid(grid) if isinstance(grid, str) else grid
    femurs = list(femurs) if femurs is not None else available_femurs()
    n = int(subjects)
    seed = int(seed)
    assignment = assign_samples(n, femurs, config)

    parameters = {"seed": seed, "config": config.to_dict(),
                  "femurs": [{"name": f.name, "specimen": f.specimen} for f in femurs]}
    manifest = _base_manifest("synthetic", grid, parameters)
    manifest["geometry_mode"] = geometry
    manifest["seed"] = seed
    manifest["num_samples"] = n
    out = pathlib.Path(out_dir)
    entries = open_output(out, manifest, shard, "grid, geometry, seed, split or augmentation")
    mine = shard_members(manifest)
    tasks = [(i, split_name, femur.name, femur.specimen, _sample_file(split_name, femur, i))
             for i, (split_name, femur) in enumerate(assignment) if i in mine and i not in entries]
    state = {"run": _make_and_write, "config": config, "grid": grid, "seed": seed, "out": str(out),
             "models": dict(models or {})}
    build_samples(out, manifest, entries, tasks, len(mine), state, workers, progress=progress,
                  cancel=cancel, cancelled="data set generation was cancelled; run the same command again to resume")
    logger.info("data set %s: %d samples (%s)", out, len(entries), ", ".join(
        f"{name} {sum(1 for e in entries.values() if e['split'] == name)}" for name in SPLITS))
    return out / MANIFEST


def shard_members(manifest: Mapping[str, Any]) -> set[int]:
    """The sample indices (of ``manifest["num_samples"]``) that the shard of ``manifest`` makes
    (all of them without a ``shard``). Samples go to shards in groups of ``samples_per_ct``
    (1 for synth; the view pairs of one CT for prepare-ct, so that one shard reads each CT)."""
    shard = manifest.get("shard") or {"index": 0, "count": 1}
    group = int(manifest.get("samples_per_ct") or 1)
    return {i for i in range(int(manifest["num_samples"])) if (i // group) % shard["count"] == shard["index"]}


def open_output(out: pathlib.Path, manifest: dict, shard: Any, what: str) -> dict[int, dict]:
    """Prepare ``out`` for the data set (or shard) that ``manifest`` describes: create it, or
    resume it when it holds the same one. Sets ``manifest["shard"]`` from ``shard`` ((I, N) or
    None) and returns the entries of the samples already there with a matching checksum.

    Raises DataError when ``out`` holds anything else; ``what`` names the parameters in the message.
    """
    if shard is not None:
        shard_index, shard_count = parse_shard(shard)
        manifest["shard"] = {"index": shard_index, "count": shard_count}
    entries: dict[int, dict] = {}
    if (out / MANIFEST).exists():
        previous = load_manifest(out)
        if (previous.get("parameters") != manifest["parameters"] or previous.get("grid") != manifest["grid"]
                or previous.get("kind") != manifest["kind"]):
            raise DataError(f"{out} holds a data set made with other parameters ({what}); choose another --out "
                            "folder or repeat the original command")
        if previous.get("shard") != manifest.get("shard"):
            raise DataError(f"{out} holds {_shard_text(previous.get('shard'))}, not "
                            f"{_shard_text(manifest.get('shard'))}; choose another --out folder")
        if previous.get("software_version") != __version__:
            logger.warning("%s was started with HipAtlas %s; continuing with %s", out,
                           previous.get("software_version"), __version__)
        from inference.checksums import sha256_file

        mine = shard_members(manifest)
        for entry in previous["samples"]:
            index = entry.get("index")
            if not isinstance(index, int) or index not in mine:
                continue
            path = out / entry["file"]
            if path.is_file() and sha256_file(path) == entry.get("sha256"):
                entries[index] = entry
        logger.info("resuming %s: %d of %d samples already done", out, len(entries), len(mine))
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out} exists and is not an empty folder or a HipAtlas data set; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(out)
    for name in SPLITS:
        (out / name).mkdir(exist_ok=True)
    return entries


def build_samples(out: pathlib.Path, manifest: dict, entries: dict[int, dict], tasks: Sequence[Any], total: int,
                  state: dict, workers: int = 1, *, progress: Callable[[int, int], None] | None = None,
                  cancel: Any = None, cancelled: str = "cancelled; run the same command again to resume") -> None:
    """Run ``tasks`` (each makes and writes samples: ``state["run"](state, task)`` returns their
    manifest entries) in ``workers`` spawned processes (0 or 1: in this one), adding the entries
    to ``entries`` and the manifest of ``out`` as they come (rewritten every few seconds and at
    the end; ``complete`` once all are done). A failure or cancellation keeps what is done for a
    resume (no temporary file left) and raises; ``cancelled`` is the Cancelled message.
    """
    done = len(entries)
    if progress is not None:
        progress(done, total)
    last_write = time.monotonic()
    _write_manifest(out, manifest, entries, complete=not tasks)

    def record(made: list[dict]) -> None:
        nonlocal done, last_write
        for entry in made:
            entries[entry["index"]] = entry
            done += 1
            if progress is not None:
                progress(done, total)
        if time.monotonic() - last_write > _MANIFEST_INTERVAL_S:
            _write_manifest(out, manifest, entries, complete=False)
            last_write = time.monotonic()

    try:
        if workers <= 1 or len(tasks) <= 1:
            _init_worker(state, None)
            for task in tasks:
                if _is_cancelled(cancel):
                    raise Cancelled(cancelled)
                record(_run_task(task))
        else:
            threads = max(1, (os.cpu_count() or 1) // int(workers))
            env_backup = {key: os.environ.get(key) for key in ("TF_CPP_MIN_LOG_LEVEL",)}
            os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
            try:
                context = multiprocessing.get_context("spawn")
                with context.Pool(int(workers), initializer=_init_worker, initargs=(state, threads)) as pool:
                    try:
                        for made in pool.imap_unordered(_run_task, tasks, chunksize=1):
                            record(made)
                            if _is_cancelled(cancel):
                                raise Cancelled(cancelled)
                    except BaseException:
                        pool.terminate()
                        raise
            finally:
                for key, value in env_backup.items():
                    if value is None:
                        os.environ.pop(key, None)
                    else:
                        os.environ[key] = value
    except BaseException:
        _write_manifest(out, manifest, entries, complete=False)
        _remove_stale_temporaries(out)
        raise
    _write_manifest(out, manifest, entries, complete=True)


# ----------------------------------------------------------------------------------------------
# Shards
# ----------------------------------------------------------------------------------------------
def parse_shard(shard: Any) -> tuple[int, int]:
    """``"I/N"`` or ``(I, N)`` -> (I, N) with 0 <= I < N (I counts from 0, as Slurm array task ids)."""
    try:
        index, count = (str(shard).split("/") if isinstance(shard, str) else shard)
        index, count = int(index), int(count)
    except (TypeError, ValueError):
        raise ConfigError(f"--shard must be I/N (e.g. 0/8 for the first of 8 shards), not {shard!r}") from None
    if count < 1 or not 0 <= index < count:
        raise ConfigError(f"--shard {index}/{count}: I must be 0..N-1 (the first of 8 shards is 0/8)")
    return index, count


def _shard_text(shard: Any) -> str:
    return f"shard {shard['index']}/{shard['count']}" if isinstance(shard, dict) else "a whole data set"


# The keys a shard's manifest has beyond the data set's, and those rewritten on every write.
_SHARD_ONLY = ("shard",)
_PER_WRITE = ("complete", "updated", "split_counts", "split_subjects", "samples")


def _command(manifest: Mapping[str, Any]) -> str:
    """The command that makes a data set of ``manifest``'s kind (for messages)."""
    return "prepare-ct" if manifest.get("kind") == "ct-import" else "synth"


def _copy_verified(source: pathlib.Path, target: pathlib.Path, sha256: str, command: str = "synth") -> None:
    """Copy ``source`` to ``target`` (temp file + rename), hashing what is copied; a file whose
    sha256 is not ``sha256`` is refused and nothing is written."""
    import hashlib

    from inference.io import atomic_file

    digest = hashlib.sha256()
    with atomic_file(target) as tmp:
        with open(source, "rb") as reader, open(tmp, "wb") as writer:
            for chunk in iter(lambda: reader.read(1 << 20), b""):
                digest.update(chunk)
                writer.write(chunk)
        if digest.hexdigest() != sha256:
            raise InputFileError(f"{source}: checksum differs from its shard's manifest (file changed or damaged); "
                                 f"run that shard's {command} command again (it regenerates damaged samples)")


def merge_shards(out_dir: str | os.PathLike, shard_dirs: Sequence[str | os.PathLike], *,
                 progress: Callable[[int, int], None] | None = None, cancel: Any = None) -> pathlib.Path:
    """Join the N shard folders of one data set (``synth --shard I/N`` or ``prepare-ct --cases
    LIST --shard I/N``) into ``out_dir``.

    Every shard must be complete and made with the same parameters, grid, seed and size, and the
    N shards must all be there once. Each sample file is copied with its sha256 checked against
    its shard's manifest. The result is the data set an unsharded run with the same seed makes:
    the same sample files byte for byte and the same manifest (apart from its ``updated`` time).
    Resumable: files already in ``out_dir`` with the right checksum are kept.
    """
    from inference.checksums import sha256_file

    folders = [pathlib.Path(d) for d in shard_dirs]
    if not folders:
        raise ConfigError("--merge needs the shard folders")
    manifests = [load_manifest(folder) for folder in folders]
    reference = manifests[0]
    command = _command(reference)
    count = (reference.get("shard") or {}).get("count")
    by_index: dict[int, pathlib.Path] = {}
    for folder, manifest in zip(folders, manifests):
        shard = manifest.get("shard")
        if not isinstance(shard, dict) or "num_samples" not in manifest:
            raise DataError(f"{folder} is not a shard (made without {command} --shard); nothing to merge")
        for key in ("kind", "parameters", "grid", "num_samples", "seed", "geometry_mode", "samples_per_ct"):
            if manifest.get(key) != reference.get(key):
                raise DataError(f"{folder} and {folders[0]} are shards of different data sets ({key} differs); "
                                f"merge the shards of one {command} command")
        if shard["count"] != count:
            raise DataError(f"{folder} is shard {shard['index']}/{shard['count']}, {folders[0]} one of {count}")
        if shard["index"] in by_index:
            raise DataError(f"{folder} and {by_index[shard['index']]} are both shard {shard['index']}/{count}")
        by_index[shard["index"]] = folder
        expected = len(shard_members(manifest))
        if not manifest.get("complete") or len(manifest["samples"]) != expected:
            raise DataError(f"{folder}: shard {shard['index']}/{count} is not finished ({len(manifest['samples'])} "
                            f"of {expected} samples); run its {command} command again to finish it")
        if manifest.get("software_version") != reference.get("software_version"):
            logger.warning("%s was made with HipAtlas %s, %s with %s", folder, manifest.get("software_version"),
                           folders[0], reference.get("software_version"))
    missing = sorted(set(range(count)) - set(by_index))
    if missing:
        raise DataError(f"shard(s) {', '.join(f'{i}/{count}' for i in missing)} missing; give all {count} "
                        "shard folders")
    base = {k: v for k, v in reference.items() if k not in _SHARD_ONLY + _PER_WRITE}
    out = pathlib.Path(out_dir)
    if (out / MANIFEST).exists():
        previous = load_manifest(out)
        if {k: v for k, v in previous.items() if k not in _PER_WRITE} != base:
            raise DataError(f"{out} holds another data set; choose another --out folder")
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out} exists and is not an empty folder or a HipAtlas data set; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(out)
    jobs = sorted(((entry["index"], folder, entry) for folder, manifest in zip(folders, manifests)
                   for entry in manifest["samples"]), key=lambda job: job[0])
    entries: dict[int, dict] = {}
    try:
        for done, (index, folder, entry) in enumerate(jobs):
            if _is_cancelled(cancel):
                raise Cancelled("merging was cancelled; run the same command again to resume")
            target = out / entry["file"]
            if not (target.is_file() and sha256_file(target) == entry["sha256"]):
                _copy_verified(folder / entry["file"], target, entry["sha256"], command)
            entries[index] = entry
            if progress is not None:
                progress(done + 1, len(jobs))
    except BaseException:
        _write_manifest(out, base, entries, complete=False)
        _remove_stale_temporaries(out)
        raise
    _write_manifest(out, base, entries, complete=True)
    logger.info("merged %d shards into %s: %d samples", count, out, len(entries))
    return out / MANIFEST


# ----------------------------------------------------------------------------------------------
# Readers
# ----------------------------------------------------------------------------------------------
def iter_samples(data_dir: str | os.PathLike, split: str, *, shuffle_seed: int | None = None,
                 verify: bool = False) -> Iterator[dict[str, Any]]:
    """Yield the samples of one split (manifest order, or shuffled by ``shuffle_seed``).

    Each item is :func:`load_sample`'s dict of arrays plus ``"sample_index"`` (int),
    ``"subject"`` (str) and ``"path"`` (str).
    """
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {SPLITS}, not {split!r}")
    folder = pathlib.Path(data_dir)
    manifest = load_manifest(folder)
    entries = [e for e in manifest["samples"] if e.get("split") == split]
    if shuffle_seed is not None:
        order = np.random.default_rng(shuffle_seed).permutation(len(entries))
        entries = [entries[i] for i in order]
    for entry in entries:
        path = folder / entry["file"]
        arrays = load_sample(path, verify_sha256=entry.get("sha256") if verify else None)
        yield {**arrays, "sample_index": int(entry["index"]), "subject": entry["subject"], "path": str(path)}
