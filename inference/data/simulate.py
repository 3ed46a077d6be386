"""Simulated biplanar cases (``hipatlas simulate``): DRRs of a CT for given calibrated views.

From a CT (NIfTI / MHA / NRRD file or DICOM series folder; any orientation and spacing; HU) and a
*geometry file* -- a ``case.json`` of the ``hipatlas-case/1`` format whose views carry
``projection_matrix``, ``rows`` and ``cols`` but no images -- :func:`simulate_case` writes a case
folder (docs/case-format.md) that ``hipatlas register`` and the GUI open: one DRR per view
(16-bit PNG, or NIfTI), femur masks (8-bit PNG) when a label map is given, and a ``case.json``
that repeats the given matrices exactly.

:func:`simulate_phantom_case` does the same for a CT phantom of a shared bone subject
(:mod:`inference.data.phantom`), placed at the hip of a patient-like world, and writes the ground
truth (phantom CT, labels, landmarks) into a *separate* folder so that the case folder holds only
what a real case holds. :func:`standard_geometry` makes a geometry file for AP + lateral (or
oblique) views around an isocentre.

Geometry files may give ``pixel_mm`` per view (detector pitch, used only by the optional realism
augmentation, which needs a physical pixel size; default 0.3 mm).
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from inference.errors import CaseFormatError, ConfigError, DataError
from inference.validate import whole_number

logger = logging.getLogger(__name__)

__all__ = [
    "ViewSpec",
    "load_geometry_file",
    "standard_geometry",
    "write_geometry_file",
    "simulate_case",
    "simulate_phantom_case",
    "true_femur_mask",
    "FEMUR_IN_VIEW_MIN_FRACTION",
]

#: At least this fraction of the femur's voxels must project onto each detector.
FEMUR_IN_VIEW_MIN_FRACTION = 0.5
#: Default detector pitch (mm) when a geometry file does not give one.
DEFAULT_PIXEL_MM = 0.3
#: Largest detector simulate renders (pixels per side), to keep memory and time bounded.
MAX_DETECTOR_SIDE = 4096


@dataclass(frozen=True, eq=False)
class ViewSpec:
    """One view of a geometry file: name, 3x4 ``P`` (world mm -> pixels), detector size and pitch."""

    name: str
    projection: np.ndarray
    rows: int
    cols: int
    pixel_mm: float = DEFAULT_PIXEL_MM


def load_geometry_file(path: str | os.PathLike) -> tuple[str, list[ViewSpec]]:
    """Read a geometry file (``case.json`` with matrices and detector sizes, without images).

    Returns
    -------
    side : str
    views : list of two ViewSpec

    Raises
    ------
    InputFileError
        Missing or unreadable file.
    CaseFormatError
        Not the hipatlas-case/1 format, a view without ``projection_matrix``, ``rows`` or ``cols``.
    """
    from inference.geometry import validate_projection_matrix
    from inference.io import CASE_FORMAT, SIDES

    from inference.io import read_json_object

    file = pathlib.Path(path)
    raw = read_json_object(file, "geometry file")
    if raw.get("format", CASE_FORMAT) != CASE_FORMAT:
        raise CaseFormatError(f'{file}: "format" is {raw.get("format")!r}, expected "{CASE_FORMAT}"')
    side = raw.get("side")
    if side not in SIDES:
        raise CaseFormatError(f'{file}: "side" is {side!r}, expected "right" or "left"')
    views = raw.get("views")
    if not isinstance(views, list) or len(views) != 2:
        raise CaseFormatError(f'{file}: "views" must be a list of exactly two views')
    specs = []
    for index, view in enumerate(views):
        where = f"views[{index}]"
        if not isinstance(view, dict):
            raise CaseFormatError(f"{file}: {where} must be an object")
        name = view.get("name")
        if not isinstance(name, str) or not name.strip():
            raise CaseFormatError(f"{file}: {where}.name must be a non-empty text")
        if view.get("projection_matrix") is None:
            raise CaseFormatError(f"{file}: {where} ({name}) has no projection_matrix; simulate needs the 3x4 "
                                  "matrix of every view")
        if "image" in view:
            logger.warning("%s: %s.image is ignored (simulate renders the images)", file, where)
        projection = validate_projection_matrix(view["projection_matrix"], f"{file}: {where}.projection_matrix")
        rows, cols = (whole_number(view.get(key), f"{file}: {where}.{key} (pixels)", 2, MAX_DETECTOR_SIDE,
                                   error=CaseFormatError) for key in ("rows", "cols"))
        pixel = view.get("pixel_mm", DEFAULT_PIXEL_MM)
        if isinstance(pixel, bool) or not isinstance(pixel, (int, float)) or not 0 < pixel < 10:
            raise CaseFormatError(f"{file}: {where}.pixel_mm must be a pitch in mm (0..10), not {pixel!r}")
        specs.append(ViewSpec(name, projection, rows, cols, float(pixel)))
    if specs[0].name == specs[1].name:
        raise CaseFormatError(f"{file}: both views are named {specs[0].name!r}; names must differ")
    return side, specs


def standard_geometry(isocentre_mm: Sequence[float], side: str = "right", *,
                      angles_deg: Sequence[float] | None = None, names: Sequence[str] = ("AP", "LAT"),
                      rows: int = 768, cols: int = 768, pixel_mm: float = 0.4, sdd_mm: float = 1000.0,
                      sid_mm: float = 925.0, cranial_deg: float = 0.0) -> dict:
    """A geometry file (dict) for two C-arm views around ``isocentre_mm``.

    Default angles: AP (0) and lateral with the detector on the femur's side (LAO +90 for a right
    femur: source at the patient's left; -90 for a left femur). Oblique views: any angles.
    """
    from inference.geometry import CArmView, projection_matrix

    if side not in ("right", "left"):
        raise ConfigError(f"side must be 'right' or 'left', not {side!r}")
    if angles_deg is None:
        angles_deg = (0.0, 90.0 if side == "right" else -90.0)
    if len(angles_deg) != 2 or len(names) != 2:
        raise ConfigError("a geometry needs exactly two angles and two view names")
    views = []
    for name, angle in zip(names, angles_deg):
        view = CArmView(sdd_mm=sdd_mm, sid_mm=sid_mm, lao_deg=float(angle), cranial_deg=cranial_deg, rows=rows,
                        cols=cols, pixel_mm=pixel_mm, isocentre_mm=tuple(float(v) for v in isocentre_mm))
        views.append({"name": str(name), "projection_matrix": projection_matrix(view).tolist(), "rows": int(rows),
                      "cols": int(cols), "pixel_mm": float(pixel_mm), "lao_deg": float(angle),
                      "cranial_deg": float(cranial_deg), "sdd_mm": float(sdd_mm), "sid_mm": float(sid_mm)})
    return {"format": "hipatlas-case/1", "side": side, "views": views}


def write_geometry_file(path: str | os.PathLike, geometry: dict) -> pathlib.Path:
    """Write a geometry dict (e.g. :func:`standard_geometry`) atomically."""
    from inference.io import write_json_atomic

    return write_json_atomic(path, geometry)


# ----------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------
def _femur_points(labels: np.ndarray, geometry: Any, femur_label: int, max_points: int = 20000) -> np.ndarray:
    kk, jj, ii = np.nonzero(labels == femur_label)
    if kk.size == 0:
        raise DataError(f"the label map has no voxel with the femur label {femur_label}")
    step = max(1, kk.size // max_points)
    ijk = np.stack([ii[::step], jj[::step], kk[::step]]).astype(np.float64)
    matrix = geometry.index_to_world()
    return (matrix[:3, :3] @ ijk + matrix[:3, 3:4]).T


def _check_in_view(spec: ViewSpec, points_mm: np.ndarray, what: str) -> float:
    from inference.geometry import project_points

    homogeneous = np.concatenate([points_mm, np.ones((len(points_mm), 1))], axis=1) @ spec.projection.T
    in_front = homogeneous[:, 2] > 0
    uv = project_points(spec.projection, points_mm)
    inside = (in_front & (uv[:, 0] >= -0.5) & (uv[:, 0] <= spec.cols - 0.5)
              & (uv[:, 1] >= -0.5) & (uv[:, 1] <= spec.rows - 0.5))
    fraction = float(inside.mean())
    if fraction < FEMUR_IN_VIEW_MIN_FRACTION:
        raise DataError(f"only {100 * fraction:.0f}% of the {what} projects onto the detector of view "
                        f"{spec.name!r} (at least {100 * FEMUR_IN_VIEW_MIN_FRACTION:.0f}% needed); the femur is not "
                        "in view: check that the geometry and the CT share the same world coordinates")
    return fraction


# ----------------------------------------------------------------------------------------------
# Simulation
# ----------------------------------------------------------------------------------------------
def _render_views(ct_hu: np.ndarray, ct_geometry: Any, labels: np.ndarray | None, specs: Sequence[ViewSpec],
                  femur_label: int, step_mm: float | None, realism_seed: int | None,
                  progress: Callable[[float, str], None] | None, cancel: Any) -> list[dict]:
    from inference import drr
    from inference.data.augment import apply_realism, sample_realism_params
    from inference.data.dataset import RenderSettings, ray_plan

    if labels is not None:
        points = _femur_points(labels, ct_geometry, femur_label)
        what = "femur label"
    else:
        points = ct_geometry.center_mm()[None]
        what = "CT's centre"
    for spec in specs:
        _check_in_view(spec, points, what)
    step = step_mm if step_mm is not None else float(min(ct_geometry.spacing_xyz_mm))
    rng = None if realism_seed is None else np.random.default_rng(realism_seed)
    femur = None if labels is None else (labels == femur_label).astype(np.uint8)
    out = []
    total = len(specs) * (2 if labels is not None else 1)
    done = 0
    for spec in specs:
        if progress is not None:
            progress(done / total, f"rendering view {spec.name}")
        image = drr.render_drr(ct_hu, ct_geometry, spec.projection, spec.rows, spec.cols, cancel=cancel,
                               **ray_plan(spec.projection, ct_geometry, spec.rows, spec.cols, step))
        done += 1
        realism = None
        if rng is not None:
            params = sample_realism_params(rng)
            image = apply_realism(image, params, spec.pixel_mm)
            realism = params.to_dict()
        mask = None
        if femur is not None:
            if progress is not None:
                progress(done / total, f"projecting the femur label in view {spec.name}")
            path = drr.render_path_length(femur, ct_geometry, spec.projection, spec.rows, spec.cols, label=1,
                                          cancel=cancel,
                                          **ray_plan(spec.projection, ct_geometry, spec.rows, spec.cols, step))
            # the same mask rule as the training data (dataset.RenderSettings)
            mask = (path >= RenderSettings().mask_threshold_mm).astype(np.uint8)
            done += 1
            if not mask.any():
                raise DataError(f"the femur does not project onto the detector of view {spec.name!r}")
        out.append({"name": spec.name, "image": image, "mask": mask, "P": spec.projection, "realism": realism})
    return out


def simulate_case(ct: str | os.PathLike, geometry_file: str | os.PathLike, out_dir: str | os.PathLike, *,
                  labels: str | os.PathLike | None = None, femur_label: int = 1, image_format: str = "png",
                  step_mm: float | None = None, realism_seed: int | None = None, overwrite: bool = False,
                  progress: Callable[[float, str], None] | None = None, cancel: Any = None) -> pathlib.Path:
    """Write a case folder of DRRs of ``ct`` for the views of ``geometry_file``.

    Parameters
    ----------
    ct : path
        CT in HU (NIfTI / MHA / NRRD, or a DICOM series folder).
    geometry_file : path
        case.json-like file whose views have ``projection_matrix`` (world mm of the CT), ``rows``
        and ``cols`` (and optionally ``pixel_mm``).
    out_dir : path
        The case folder (written atomically; must not exist unless ``overwrite``).
    labels : path, optional
        Label map (any grid overlapping the CT); ``femur_label`` marks the femur. Gives masks and
        the check that the femur is in view.
    image_format : {"png", "nifti", "tiff"}
    step_mm : float, optional
        Ray-marching step (default: the CT's smallest voxel spacing).
    realism_seed : int, optional
        Apply the radiograph realism augmentation with parameters drawn from this seed.
    progress : callable(fraction, message), optional
    cancel : threading.Event or callable, optional

    Returns
    -------
    pathlib.Path
        ``out_dir``.
    """
    from inference.data.ct_import import read_ct, read_labels
    from inference.io import write_case

    side, specs = load_geometry_file(geometry_file)
    if image_format not in ("png", "nifti", "tiff"):
        raise ConfigError(f"image format must be png, nifti or tiff, not {image_format!r}")
    _refuse_existing(out_dir, overwrite)
    ct_hu, ct_geometry, _ = read_ct(ct)
    label_map = None
    if labels is not None:
        label_map, _ = read_labels(labels, ct_geometry)
    rendered = _render_views(ct_hu, ct_geometry, label_map, specs, femur_label, step_mm, realism_seed, progress,
                             cancel)
    path = write_case(out_dir, side, rendered, image_format=image_format, overwrite=overwrite)
    if progress is not None:
        progress(1.0, "case written")
    return path


def _refuse_existing(out_dir: str | os.PathLike, overwrite: bool) -> None:
    from inference.errors import OutputError

    folder = pathlib.Path(out_dir)
    if folder.exists() and not overwrite and (not folder.is_dir() or any(folder.iterdir())):
        raise OutputError(f"{folder}: the output folder already exists and is not empty; choose a new folder "
                          "or allow overwriting")


# ----------------------------------------------------------------------------------------------
# Phantom cases
# ----------------------------------------------------------------------------------------------
#: Grid of simulated phantom CTs in the canonical frame: wider than the atlas grids so that the
#: radiographs show the hip as a clinical one does (centre as the atlas grids', 1.5 mm voxels).
PHANTOM_CT_SHAPE_ZYX = (180, 150, 170)
PHANTOM_CT_SPACING_MM = (1.5, 1.5, 1.5)
#: Right hip joint centre in the patient-like world of phantom cases (LPS: patient right = -x).
HIP_POSITION_MM = (-90.0, 0.0, 0.0)


def _patient_placement(rng: np.random.Generator, side: str) -> np.ndarray:
    """4x4 from the phantom's (right-femur, canonical) frame to a patient-like LPS world."""
    placement = np.eye(4)
    if side == "left":
        placement[0, 0] = -1.0  # mirror: the phantom's right femur becomes a left one
    centre = np.asarray(HIP_POSITION_MM) * np.array([-1.0 if side == "left" else 1.0, 1.0, 1.0])
    placement[:3, 3] = centre + rng.uniform(-20.0, 20.0, 3)
    return placement


def _proper_geometry(volume: np.ndarray, geometry: Any) -> tuple[np.ndarray, Any]:
    """Same voxels, world positions and values, but a right-handed direction (flip x if needed):
    some viewers mishandle NIfTI files whose axes form a mirrored frame."""
    from inference.geometry import VolumeGeometry

    direction = np.asarray(geometry.direction)
    if np.linalg.det(direction) > 0:
        return volume, geometry
    nx = geometry.shape_zyx[2]
    first_axis = direction[:, 0] * geometry.spacing_xyz_mm[0]
    origin = np.asarray(geometry.origin_mm) + first_axis * (nx - 1)
    direction = direction.copy()
    direction[:, 0] *= -1.0
    flipped = VolumeGeometry(geometry.shape_zyx, geometry.spacing_xyz_mm, tuple(origin), tuple(map(tuple, direction)))
    return np.ascontiguousarray(volume[:, :, ::-1]), flipped


def simulate_phantom_case(subject: str, seed: int, out_dir: str | os.PathLike, *, side: str | None = None,
                          geometry_file: str | os.PathLike | None = None, truth_out: str | os.PathLike | None = None,
                          image_format: str = "png", realism: bool = True, step_mm: float | None = None,
                          overwrite: bool = False, progress: Callable[[float, str], None] | None = None,
                          cancel: Any = None, model: Any = None, ct_grid: Any = None,
                          detector: tuple[int, int, float] = (768, 768, 0.4)) -> pathlib.Path:
    """A case of a random phantom of a shared bone subject, and (optionally) its ground truth.

    Parameters
    ----------
    subject : str
        Shared femur, ``"MC22:left"`` (see :func:`inference.data.phantom.phantom_subjects`).
    seed : int
        Phantom parameters, placement, views (when no geometry file is given) and realism.
    out_dir : path
        The case folder.
    side : {"right", "left"}, optional
        Side of the simulated patient's femur (default: the subject's side).
    geometry_file : path, optional
        Views in the patient-like world; default: AP + lateral around the femoral head (offset
        by up to 25 mm), written into the case as usual.
    truth_out : path, optional
        Folder for ``ct.nii.gz``, ``labels.nii.gz`` and ``truth.json`` (landmarks, head radius,
        parameters, placement), kept out of the case folder so that ``register`` sees only a case.
    realism : bool
        Apply the realism augmentation (noise, scatter, blur, contrast).
    model, ct_grid : optional
        A ready SubjectModel and the phantom CT's grid (tests use small ones).
    detector : (rows, cols, pixel_mm)
        Detector of the default views (when no geometry file is given).
    """
    from inference.data import phantom as phantom_mod
    from inference.data.dataset import _landmark_array
    from inference.geometry import VolumeGeometry
    from inference.io import atomic_output_dir, write_case, write_json_atomic, write_volume

    seed = whole_number(seed, "seed", 0)
    if image_format not in ("png", "nifti", "tiff"):
        raise ConfigError(f"image format must be png, nifti or tiff, not {image_format!r}")
    subject_side = phantom_mod._parse_subject(subject)[1]
    side = side or subject_side
    if side not in ("right", "left"):
        raise ConfigError(f"side must be 'right' or 'left', not {side!r}")
    _refuse_existing(out_dir, overwrite)
    if truth_out is not None:
        _refuse_existing(truth_out, overwrite)
        if pathlib.Path(truth_out).resolve() == pathlib.Path(out_dir).resolve():
            raise ConfigError("the truth folder must differ from the case folder")
    rngs = [np.random.default_rng(s) for s in np.random.SeedSequence([int(seed), 7]).spawn(4)]
    if progress is not None:
        progress(0.0, "making the phantom")
    params = phantom_mod.sample_phantom_params(rngs[0])
    grid = ct_grid or VolumeGeometry.centered(PHANTOM_CT_SHAPE_ZYX, PHANTOM_CT_SPACING_MM, phantom_mod.POSE_PIVOT_MM)
    subject_model = phantom_mod._resolve_model(model if model is not None else subject)
    phantom = phantom_mod.make_phantom(subject_model, params, grid)
    placement = _patient_placement(rngs[1], side)
    ct_geometry = phantom.geometry.transformed(placement)
    landmarks = _landmark_array(phantom.landmarks_mm).astype(np.float64)
    landmarks_world = landmarks @ placement[:3, :3].T + placement[:3, 3]
    if geometry_file is not None:
        file_side, specs = load_geometry_file(geometry_file)
        if file_side != side:
            logger.warning("the geometry file says side %s, the phantom is a %s femur; using %s", file_side, side,
                           side)
    else:
        isocentre = landmarks_world[0] + rngs[2].uniform(-25.0, 25.0, 3)
        rows, cols, pixel_mm = detector
        geometry = standard_geometry(isocentre, side, rows=int(rows), cols=int(cols), pixel_mm=float(pixel_mm))
        specs = [ViewSpec(v["name"], np.asarray(v["projection_matrix"]), v["rows"], v["cols"], v["pixel_mm"])
                 for v in geometry["views"]]

    def sub_progress(fraction: float, message: str) -> None:
        if progress is not None:
            progress(0.2 + 0.75 * fraction, message)

    realism_seed = int(rngs[3].integers(0, 2**31 - 1)) if realism else None
    rendered = _render_views(phantom.ct_hu, ct_geometry, phantom.labels, specs, 1, step_mm, realism_seed,
                             sub_progress, cancel)
    truth = {
        "subject": subject, "seed": int(seed), "side": side,
        "landmark_names": list(__import__("inference.anatomy", fromlist=["LANDMARK_NAMES"]).LANDMARK_NAMES),
        "landmarks_mm": landmarks_world.tolist(),
        "hip_centre_mm": landmarks_world[0].tolist(),
        "head_radius_mm": float(phantom.head_radius_mm),
        "phantom_params": params.to_dict(),
        "phantom_to_world": placement.tolist(),
        "femur_field_spacing_mm": float(subject_model.femur_sdf.spacing_mm),
        "realism": [view["realism"] for view in rendered],
        "note": "ground truth of a simulated case; world = the case's world (LPS mm)",
    }
    ct_array, ct_geo = _proper_geometry(phantom.ct_hu, ct_geometry)
    label_array, _ = _proper_geometry(phantom.labels, ct_geometry)
    if truth_out is None:
        path = write_case(out_dir, side, rendered, image_format=image_format, overwrite=overwrite)
    else:
        with atomic_output_dir(truth_out, overwrite=overwrite) as tmp:
            write_volume(tmp / "ct.nii.gz", ct_array, ct_geo, dtype=np.float32)
            write_volume(tmp / "labels.nii.gz", label_array, ct_geo, dtype=np.uint8)
            write_json_atomic(tmp / "truth.json", truth)
            # The case is written inside the truth folder's transaction: if it fails, neither exists.
            path = write_case(out_dir, side, rendered, image_format=image_format, overwrite=overwrite)
    if progress is not None:
        progress(1.0, "case written")
    return path


def true_femur_mask(truth_dir: str | os.PathLike, grid: Any, model: Any = None) -> np.ndarray:
    """The true femur of a simulated case sampled on ``grid`` (case world): (Z, Y, X) bool.

    The phantom's femur surface itself (its signed distance < 0 at each voxel centre), rebuilt from
    ``truth.json`` (subject, phantom parameters, placement), not the phantom CT's label map
    resampled: on a grid finer than the phantom CT (an output grid of 0.664 x 0.664 x 1 mm against
    a 1.5 mm phantom) the resampled label map carries the coarse grid's staircase, which costs a
    perfect reconstruction about 0.03 Dice (it scores 0.97 on it).

    Parameters
    ----------
    truth_dir : path
        A truth folder written by :func:`simulate_phantom_case`.
    grid : inference.geometry.VolumeGeometry
        Where to sample, in the case's world.
    model : SubjectModel, optional
        The subject model the case was made with, when it was not a shared subject (tests);
        default: the shared subject named in ``truth.json`` with its distance fields' spacing.

    Raises
    ------
    DataError
        ``truth.json`` lacks what the phantom needs, or its subject is not a shared one.
    """
    from inference.data import phantom as phantom_mod

    model, params, placement = truth_phantom(truth_dir, model)
    return phantom_mod.femur_mask(model, params, grid.transformed(np.linalg.inv(placement)))


def true_femur_inside(truth_dir: str | os.PathLike, points_mm: np.ndarray, grid: Any, model: Any = None) -> np.ndarray:
    """(N,) bool: whether each world point ``points_mm`` (N, 3) lies inside the true femur of a
    simulated case: :func:`true_femur_mask` at any points (at ``grid``'s voxel centres it is that
    mask). ``grid`` (case world) ties the phantom's shape map to a lattice; points should lie on
    or near it. Raises DataError as :func:`true_femur_mask`."""
    from inference.data import phantom as phantom_mod

    model, params, placement = truth_phantom(truth_dir, model)
    world_to_index = grid.world_to_index()
    ijk = (np.asarray(points_mm, float) @ world_to_index[:3, :3].T + world_to_index[:3, 3]).T
    return phantom_mod.femur_signed_distance_at(model, params, grid.transformed(np.linalg.inv(placement)), ijk) < 0


def truth_phantom(truth_dir: str | os.PathLike, model: Any = None) -> tuple[Any, Any, np.ndarray]:
    """(subject model, phantom parameters, phantom-to-world 4x4) of a simulated case's truth, from
    ``truth.json`` (``model``, when given, stands for the subject model)."""
    from inference.data import phantom as phantom_mod

    truth = json.loads((pathlib.Path(truth_dir) / "truth.json").read_text())
    try:
        params = phantom_mod.PhantomParams.from_dict(truth["phantom_params"])
        placement = np.asarray(truth["phantom_to_world"], dtype=np.float64)
        if model is None:
            model = phantom_mod.load_subject_model(
                truth["subject"], spacing_mm=float(truth.get("femur_field_spacing_mm", phantom_mod.FINE_SPACING_MM)))
    except (KeyError, TypeError) as error:
        raise DataError(f"{truth_dir}: truth.json lacks the phantom's parameters or placement ({error})") from None
    return model, params, placement
