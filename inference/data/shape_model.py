"""A statistical deformation model of the bundled femurs: shape variety beyond the handful of bones.

What it is
----------
Every training femur (only the *train* split's specimens; a held-out specimen is never read) is
turned into a mask on one box of the canonical femur frame (:mod:`inference.anatomy`: head centre
at the origin, shaft along -z, left femurs mirrored to the right). One reference femur (the first
by name) is registered in 3D/3D to each of the others with the SDM baseline's registration
(:func:`inference.experiments.baselines.register_atlas_to_subject`: SimpleITK affine on the
smoothed masks, then symmetric-forces demons), which gives for every point ``x`` of the reference
the corresponding point ``x + f_i(x)`` of femur ``i``. A PCA of these displacement fields
(:class:`inference.experiments.baselines.StatisticalDeformationModel`, the baseline's PCA) is the
model: ``f = mean + sum_k w_k sd_k c_k``. It is saved as a small ``.npz``
(:meth:`FemurShapeModel.save`, about 0.5 MB for 6 femurs) with the femurs and specimens it was built from.

How ``hipatlas synth --shape-model PATH --shape-model-sd K`` uses it
--------------------------------------------------------------------
Each sample draws weights ``w_k`` from a standard normal truncated to ``[-K, K]`` (its own random
stream, so every other draw of the sample is unchanged) and deforms the source femur, before the
existing shape modes (:mod:`inference.data.shape`), by ``x -> x + u(x)`` with
``u = sum_k w_k sd_k c_k - (the same at the head centre)``: the variation about the mean shape,
as a displacement, moved so that the femoral head centre stays at the origin of the canonical
frame. The modes were learnt on the reference femur; applying them to another femur of the same
canonical frame transfers "how femurs differ" from one bone to another (an approximation, as for
any SDM used for augmentation).

Why it is a diffeomorphism
--------------------------
``u`` is trilinear on its lattice, so each partial derivative ``du_c/dx_j`` is bounded by the
largest lattice difference of ``u_c`` along ``j`` over the step; the Frobenius norm of those
bounds, ``L``, bounds ``|grad u|``. With ``L < 1`` the map ``x -> x + u(x)`` is invertible
(``x = y - u(x)`` is a contraction, solved by fixed-point iteration) and its Jacobian determinant is
positive everywhere (every eigenvalue of ``I + grad u`` lies within ``L`` of 1). A draw whose
``L`` exceeds :data:`LIPSCHITZ_MAX` has its weights scaled down until it does not (the scale is
recorded), so every sampled deformation is invertible by construction and stays within +-K sd.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage, special

from inference import validate
from inference.errors import Cancelled, ConfigError, DataError, InputFileError

logger = logging.getLogger(__name__)

__all__ = ["SHAPE_MODEL_FORMAT", "BOX_MIN_MM", "BOX_MAX_MM", "LIPSCHITZ_MAX", "FemurShapeModel",
           "ShapeModelDeformation", "ShapeModelSampling", "build_shape_model", "femur_mask", "lipschitz_bound",
           "load_shape_model"]

SHAPE_MODEL_FORMAT = "hipatlas-shape-model/1"
#: Canonical box (mm, xyz) of the masks: the atlas grids (x -84..44, y -43..43, z -151..41) with a
#: margin for the pose; below it the deformation continues unchanged along the shaft.
BOX_MIN_MM = (-104.0, -48.0, -200.0)
BOX_MAX_MM = (48.0, 48.0, 56.0)
#: Bound on |grad u| of a sampled deformation (< 1: invertible, Jacobian > 0).
LIPSCHITZ_MAX = 0.5
#: Seed-sequence tag of the shape model's own random stream in a synthetic sample.
STREAM_TAG = 5


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class FemurShapeModel:
    """PCA of reference-to-femur displacement fields on a lattice of the canonical femur frame.

    Attributes
    ----------
    sdm : inference.experiments.baselines.StatisticalDeformationModel
        Fields ``(z, y, x, 3)`` in mm, components in x, y, z order.
    origin_mm : (3,) ndarray
        Canonical position (xyz) of lattice point (0, 0, 0).
    step_mm : float
        Lattice step.
    meta : dict
        ``femurs``, ``specimens`` (what it was built from), ``reference``, ``excluded_specimens``
        (the split's val/test specimens, never read), registration settings.
    """

    sdm: Any
    origin_mm: np.ndarray
    step_mm: float
    meta: dict

    @property
    def specimens(self) -> tuple[str, ...]:
        return tuple(self.meta.get("specimens", ()))

    @property
    def n_components(self) -> int:
        return self.sdm.n_components

    def check_training_only(self, split: Mapping[str, Sequence[str]], source: Any = "the shape model") -> None:
        """Refuse a model built from any specimen that is not in ``split["train"]``."""
        train = set(split.get("train", ()))
        outside = sorted(set(self.specimens) - train)
        if outside:
            where = {s: name for name, group in split.items() for s in group}
            detail = ", ".join(f"{s} ({where[s]} split)" if s in where else f"{s} (in no split)" for s in outside)
            raise ConfigError(f"{source} was built from specimens that are not in the train split: {detail}; build "
                              f"one from the train split only (hipatlas shape-model --split train=...)")

    def sample_weights(self, rng: np.random.Generator, sd_limit: float) -> np.ndarray:
        """Normalised weights, standard normal truncated to ``[-sd_limit, sd_limit]`` (one uniform each)."""
        k = float(sd_limit)
        lo, hi = special.ndtr(-k), special.ndtr(k)
        return special.ndtri(rng.uniform(lo, hi, self.n_components)).astype(np.float64)

    def displacement(self, weights: Sequence[float]) -> np.ndarray:
        """``sum_k w_k sd_k c_k`` on the lattice, (z, y, x, 3) mm (the mean is left out)."""
        w = np.asarray(weights, np.float64)
        if w.shape != (self.n_components,):
            raise ConfigError(f"the shape model has {self.n_components} components, not {w.size} weights")
        flat = (w * self.sdm.sd.astype(np.float64)) @ self.sdm.components.astype(np.float64)
        return flat.reshape(self.sdm.mean.shape)

    def deformation(self, weights: Sequence[float]) -> "ShapeModelDeformation":
        """The invertible deformation of ``weights``, scaled down to :data:`LIPSCHITZ_MAX` if needed."""
        w = np.asarray(weights, np.float64)
        bound = lipschitz_bound(self.displacement(w), self.step_mm)
        scale = 1.0 if bound <= LIPSCHITZ_MAX else LIPSCHITZ_MAX / bound
        return ShapeModelDeformation(self, w * scale, scale)

    # -- files ---------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> pathlib.Path:
        from inference.io import atomic_file

        path = pathlib.Path(path)
        with atomic_file(path, ".npz") as tmp:
            np.savez(tmp, mean=self.sdm.mean, components=self.sdm.components, sd=self.sdm.sd,
                     origin_mm=np.asarray(self.origin_mm, np.float64), step_mm=np.float64(self.step_mm),
                     meta=np.array(json.dumps(self.meta, sort_keys=True)))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FemurShapeModel":
        from inference.experiments.baselines import StatisticalDeformationModel

        path = pathlib.Path(path)
        if not path.is_file():
            raise InputFileError(f"{path}: no shape model there (make one with hipatlas shape-model)")
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(str(data["meta"]))
                sdm = StatisticalDeformationModel(data["mean"], data["components"], data["sd"])
                model = cls(sdm, data["origin_mm"].astype(np.float64), float(data["step_mm"]), meta)
        except (OSError, KeyError, ValueError) as exc:
            raise InputFileError(f"{path}: not a HipAtlas shape model ({exc})") from exc
        if meta.get("format") != SHAPE_MODEL_FORMAT:
            raise InputFileError(f"{path}: format {meta.get('format')!r}, expected {SHAPE_MODEL_FORMAT!r}")
        return model


def lipschitz_bound(displacement: np.ndarray, step_mm: float) -> float:
    """Upper bound of ``|grad u|`` (spectral norm) of the trilinear interpolant of ``displacement``."""
    u = np.asarray(displacement, np.float64)
    bounds = np.zeros((3, 3))  # [component, axis x/y/z]
    for axis_zyx in range(3):
        if u.shape[axis_zyx] < 2:
            continue
        diff = np.abs(np.diff(u, axis=axis_zyx)).reshape(-1, 3).max(axis=0) / step_mm
        bounds[:, 2 - axis_zyx] = diff
    return float(np.sqrt((bounds ** 2).sum()))


class ShapeModelDeformation:
    """``x -> x + u(x)`` in the canonical frame (mm), with its exact inverse; the head centre stays put.

    The same interface as :class:`inference.data.shape.ShapeTransform` (``apply_points``,
    ``inverse_points``, ``jacobian_determinant``), so :func:`inference.data.phantom.make_phantom`
    can compose the two.
    """

    def __init__(self, model: FemurShapeModel, weights: np.ndarray, scale: float = 1.0):
        self.weights = np.asarray(weights, np.float64)
        self.scale = float(scale)
        self.origin_mm = np.asarray(model.origin_mm, np.float64)
        self.step_mm = float(model.step_mm)
        field = model.displacement(self.weights)
        # (3, z, y, x), components x, y, z
        self._field = np.ascontiguousarray(np.moveaxis(field, -1, 0))
        self.lipschitz = lipschitz_bound(field, self.step_mm)
        if self.lipschitz >= 1.0:
            raise DataError(f"a shape-model deformation with |grad u| up to {self.lipschitz:.2f} is not invertible")
        self._head_shift = np.zeros(3)
        self._head_shift = self._raw(np.zeros((1, 3)))[0]

    def _raw(self, X: np.ndarray) -> np.ndarray:
        index = ((np.asarray(X, np.float64) - self.origin_mm) / self.step_mm)[:, ::-1].T  # (z, y, x) rows
        return np.stack([ndimage.map_coordinates(self._field[c], index, order=1, mode="nearest")
                         for c in range(3)], axis=1)

    def displacement_at(self, X) -> np.ndarray:
        """``u`` at canonical points (N, 3), mm (zero at the head centre)."""
        return self._raw(np.asarray(X, np.float64).reshape(-1, 3)) - self._head_shift

    def apply_points(self, X) -> np.ndarray:
        pts = np.asarray(X, np.float64)
        flat = pts.reshape(-1, 3)
        return (flat + self.displacement_at(flat)).reshape(pts.shape)

    def inverse_points(self, Y, *, tolerance_mm: float = 1e-7, iterations: int = 100) -> np.ndarray:
        """The points that :meth:`apply_points` maps onto ``Y`` (fixed-point iteration, a contraction)."""
        target = np.asarray(Y, np.float64)
        flat = target.reshape(-1, 3)
        X = flat - self.displacement_at(flat)
        for _ in range(iterations):
            new = flat - self.displacement_at(X)
            change = float(np.abs(new - X).max()) if len(X) else 0.0
            X = new
            if change < tolerance_mm:
                break
        return X.reshape(target.shape)

    def jacobian_determinant(self, X, step_mm: float = 0.25) -> np.ndarray:
        """det(d apply_points / dX) at points (N, 3) by central differences."""
        pts = np.asarray(X, np.float64).reshape(-1, 3)
        columns = []
        for axis in range(3):
            e = np.zeros(3)
            e[axis] = step_mm
            columns.append((self.apply_points(pts + e) - self.apply_points(pts - e)) / (2 * step_mm))
        return np.linalg.det(np.stack(columns, axis=-1))

    def to_dict(self) -> dict:
        """What the manifest records of the sample's draw."""
        return {"weights": [float(w) for w in self.weights], "scale": self.scale, "lipschitz": self.lipschitz}


# ----------------------------------------------------------------------------------------------
# Sampling settings (part of a data set's SynthConfig)
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShapeModelSampling:
    """Use the shape model at ``path`` with weights truncated to +-``sd_limit`` standard deviations.

    ``sha256`` and ``specimens`` are read from the file; the manifest records them (not the path),
    so a data set resumes with the same model wherever it lies.
    """

    path: str
    sd_limit: float = 1.0
    sha256: str = ""
    specimens: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        from inference.checksums import sha256_file

        validate.number(self.sd_limit, "--shape-model-sd", 0, 3, low_open=True, error=ConfigError)
        path = pathlib.Path(self.path)
        model = _cached_model(path)
        object.__setattr__(self, "path", str(path))
        object.__setattr__(self, "sha256", sha256_file(path))
        object.__setattr__(self, "specimens", model.specimens)

    @property
    def model(self) -> FemurShapeModel:
        return _cached_model(pathlib.Path(self.path))

    def to_dict(self) -> dict:
        return {"sha256": self.sha256, "sd_limit": float(self.sd_limit), "specimens": list(self.specimens)}

    def check_split(self, split: Mapping[str, Sequence[str]]) -> None:
        """Refuse a model built from any specimen outside the data set's train split."""
        self.model.check_training_only(split, f"the shape model {self.path}")

    def deformation(self, seed: int, index: int) -> "ShapeModelDeformation":
        """The deformation of sample ``index`` of a data set of ``seed`` (its own random stream)."""
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(index), STREAM_TAG]))
        model = self.model
        return model.deformation(model.sample_weights(rng, self.sd_limit))


_LOADED: dict[tuple, FemurShapeModel] = {}
_LOCK = threading.Lock()


def _cached_model(path: pathlib.Path) -> FemurShapeModel:
    try:
        stat = path.stat()
    except OSError:
        raise InputFileError(f"{path}: no shape model there (make one with hipatlas shape-model)") from None
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    with _LOCK:
        if key not in _LOADED:
            _LOADED[key] = FemurShapeModel.load(path)
        return _LOADED[key]


def load_shape_model(path: str | os.PathLike) -> FemurShapeModel:
    """The shape model at ``path`` (cached per process while the file is unchanged)."""
    return _cached_model(pathlib.Path(path))



# ----------------------------------------------------------------------------------------------
# Building it
# ----------------------------------------------------------------------------------------------
def _box(spacing_mm: float, box_min_mm, box_max_mm) -> tuple[np.ndarray, tuple[int, int, int]]:
    lo, hi = np.asarray(box_min_mm, np.float64), np.asarray(box_max_mm, np.float64)
    n_xyz = np.floor((hi - lo) / spacing_mm).astype(int) + 1
    return lo, (int(n_xyz[2]), int(n_xyz[1]), int(n_xyz[0]))


def femur_mask(model, origin_mm: np.ndarray, shape_zyx: Sequence[int], spacing_mm: float) -> np.ndarray:
    """The femur of a subject model (canonical frame) as a (z, y, x) bool mask on a box."""
    kk, jj, ii = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape_zyx), indexing="ij")
    points = np.stack([ii.ravel(), jj.ravel(), kk.ravel()]) * np.float32(spacing_mm)
    points += np.asarray(origin_mm, np.float32)[:, None]
    return (model.femur_sdf.sample(points) < 0).reshape(tuple(shape_zyx))


def build_shape_model(out: str | os.PathLike, split: Mapping[str, Sequence[str]], *,
                      femurs: Sequence[Any] | None = None, models: Mapping[str, Any] | None = None,
                      spacing_mm: float = 2.0, n_components: int | None = None,
                      box_min_mm: Sequence[float] = BOX_MIN_MM, box_max_mm: Sequence[float] = BOX_MAX_MM,
                      progress: Callable[[int, int], None] | None = None, cancel: Any = None) -> FemurShapeModel:
    """Build the shape model of the train split's femurs and save it to ``out``.

    Parameters
    ----------
    split : mapping split -> specimens
        Only ``split["train"]`` is read; the val and test specimens are recorded as excluded.
    femurs : sequence of inference.data.dataset.SourceFemur, optional
        Candidate femurs (default: every bundled femur); those of other specimens are skipped.
    models : mapping femur name -> SubjectModel, optional
        Ready subject models (tests use analytic ones); default :func:`load_subject_model`.
    spacing_mm : float
        Mask voxel size; registration runs at twice and the fields are kept at four times it.
    n_components : int, optional
        Default: all (number of femurs - 1).

    Raises
    ------
    ConfigError
        A malformed split, or fewer than two femurs in its train split.
    Cancelled
        ``cancel`` fired between registrations (nothing is written).

    A model already at ``out`` built from the same femurs and settings is kept (resume).
    """
    from inference.data.dataset import SynthConfig, available_femurs
    from inference.data.phantom import load_subject_model
    from inference.experiments import baselines

    groups = SynthConfig(split=split).split
    train = set(groups["train"])
    candidates = list(femurs) if femurs is not None else available_femurs()
    chosen = sorted((f for f in candidates if f.specimen in train), key=lambda f: f.name)
    missing = sorted(train - {f.specimen for f in chosen})
    if missing:
        raise ConfigError(f"the train split names {missing}, but there is no femur of them")
    if len(chosen) < 2:
        raise ConfigError(f"a shape model needs at least two femurs; the train split {sorted(train)} has "
                          f"{len(chosen)}")
    validate.number(spacing_mm, "shape model spacing_mm", 0.5, 10, error=ConfigError)
    origin, shape_zyx = _box(float(spacing_mm), box_min_mm, box_max_mm)
    spacing_zyx = (float(spacing_mm),) * 3
    models = {} if models is None else models

    def mask_of(femur) -> np.ndarray:
        model = models[femur.name] if femur.name in models else load_subject_model(femur.name)
        mask = femur_mask(model, origin, shape_zyx, spacing_mm)
        if not mask.any():
            raise DataError(f"femur {femur.name} has no voxel inside the shape model's box")
        return mask

    settings = {"format": SHAPE_MODEL_FORMAT, "femurs": [f.name for f in chosen], "specimens": sorted(train),
                "excluded_specimens": sorted(set(groups["val"]) | set(groups["test"])),
                "spacing_mm": float(spacing_mm), "box_min_mm": [float(v) for v in box_min_mm],
                "box_max_mm": [float(v) for v in box_max_mm],
                "n_components": len(chosen) - 1 if n_components is None else int(n_components)}
    if pathlib.Path(out).is_file():
        try:
            existing = FemurShapeModel.load(out)
        except InputFileError:
            existing = None
        if existing is not None and all(existing.meta.get(k) == v for k, v in settings.items()):
            logger.info("shape model %s exists with the same inputs; kept", out)
            return existing
    reference = chosen[0]
    reference_mask = mask_of(reference)
    fields = []
    for number, femur in enumerate(chosen):
        if cancel is not None and (cancel.is_set() if hasattr(cancel, "is_set") else cancel()):
            raise Cancelled("shape model building was cancelled; nothing was written")
        if progress is not None:
            progress(number, len(chosen))
        if femur is reference:
            coarse = [s // baselines.SDM_FACTOR for s in shape_zyx]
            fields.append(np.zeros((*coarse, 3), np.float32))
            continue
        # The reference is the fixed image: the field lives on the reference's lattice and maps
        # each reference point to its corresponding point of this femur.
        voxels = baselines.register_atlas_to_subject(mask_of(femur), reference_mask, spacing_zyx)
        fields.append((voxels[..., ::-1] * float(spacing_mm)).astype(np.float32))  # zyx voxels -> xyz mm
        logger.info("shape model: registered %s to %s, largest displacement %.1f mm", reference.name, femur.name,
                    float(np.linalg.norm(fields[-1], axis=-1).max()))
    if progress is not None:
        progress(len(chosen), len(chosen))
    sdm = baselines.StatisticalDeformationModel.fit(np.stack(fields), settings["n_components"])
    meta = {**settings, "reference": reference.name, "sd_mm": [float(s) for s in sdm.sd],
            "registration": "SimpleITK affine (mean squares) + fast symmetric-forces demons on smoothed masks "
                            "(inference.experiments.baselines.register_atlas_to_subject)"}
    model = FemurShapeModel(sdm, origin, float(spacing_mm) * baselines.SDM_FACTOR, meta)
    model.save(out)
    logger.info("shape model of %d femurs (%s) written to %s: sd %s mm", len(chosen), ", ".join(sorted(train)), out,
                np.round(sdm.sd, 1).tolist())
    return model

