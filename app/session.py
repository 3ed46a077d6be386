"""The planning session: everything the workstation knows about the open case, without Qt.

The main window owns one :class:`Session` and calls its methods from slots; the session never
imports Qt, so the whole workflow (open, edit masks, register, move landmarks, export, save a
project) can be driven and tested without a display.

Workflow state
--------------
* **Case**: a ``hipatlas-case/1`` folder (:func:`inference.io.load_case`), or two radiographs
  imported with their calibration (:meth:`Session.import_radiographs` writes such a folder in the
  session's work folder, so the pipeline always reads a case folder).
* **Masks**: one bool mask per view: the case's mask file when there is one, else empty until the
  atlas-based proposal of :mod:`inference.mask_proposal` (TensorFlow: run by
  :meth:`Session.mask_proposal_job` in a child process) arrives, or the user draws it. (A grey-value
  threshold is no substitute: on a hip radiograph it finds soft tissue and pelvis as readily as the
  femur, and a wrong mask looks more finished than an empty one.) Each view must be *confirmed*
  before registering; any edit withdraws the confirmation.
* **Result**: the registration outputs loaded for display (:class:`LoadedResult`), built in the
  worker thread by the job from :meth:`Session.registration_job`.
* **Landmarks**: the surgeon may move the measurement landmarks; measurements are then recomputed
  with :func:`inference.measure.recompute_measurements` (the one measurement path: the pipeline
  and ``hipatlas measure`` compute them the same way). The pipeline's values are kept to reset.

Calibration JSON (for importing two radiographs that are not self-describing DICOM files)
----------------------------------------------------------------------------------------
``{"format": "hipatlas-calibration/1", "projection_matrix": [[4 numbers] x 3]}`` or, for a
C-arm described by its parameters (:class:`inference.geometry.CArmView`, image size taken from the
radiograph), ``{"format": "hipatlas-calibration/1", "carm": {"sdd_mm": ..., "sid_mm": ...,
"lao_deg": ..., "cranial_deg": ..., "pixel_mm": ..., optional "pixel_v_mm", "principal_point_px",
"isocentre_mm", "viewed_from"}}``.
"""

from __future__ import annotations

import csv
import dataclasses
import io as _stdio
import json
import logging
import os
import pathlib
import secrets
import shutil
import tempfile
from typing import Any, Callable, Generator, Sequence

import numpy as np

from app import imaging, masks as mask_ops
from app.export import EXPORT_WRITERS, ExportContext
from inference import __version__, geometry, graphics, io
from inference.checksums import sha256_bytes
from inference.errors import CalibrationError, CaseFormatError, DataError, InputFileError, OutputError
from inference.registration import RegistrationFrame

log = logging.getLogger(__name__)

CALIBRATION_FORMAT = "hipatlas-calibration/1"
#: mask_source of a view whose case has no mask file (empty until proposed or drawn).
MISSING_MASK = "missing"
RESEARCH_NOTICE = "Research use only \u2014 not for diagnosis or treatment decisions."
LENGTH_UNITS = {"mm": 1.0, "cm": 0.1}

#: Printed landmark names: one table, shared with the radiograph graphics and the report.
LANDMARK_LABELS = graphics.LANDMARK_LABELS

#: DICOM attributes that identify the patient (shown in the report unless anonymised).
PATIENT_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "InstitutionName")


# --------------------------------------------------------------------------------------------
# Data classes
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(eq=False)
class ViewState:
    """A view of the open case as the workstation shows and edits it."""

    name: str
    mask: np.ndarray                 # (rows, cols) bool, edited in place
    mask_source: str                 # "case file", "missing", "proposed", "edited", "cleared", ...
    confirmed: bool
    calibration: dict[str, Any]      # {"source": ..., details...} for display and the report
    display: np.ndarray              # (rows, cols) uint8 windowed radiograph


@dataclasses.dataclass(frozen=True)
class RadiographImport:
    """One radiograph to import: the image, its calibration JSON (None: the DICOM geometry tags)
    and optionally a mask image."""

    name: str
    image_path: pathlib.Path
    calibration_path: pathlib.Path | None = None
    mask_path: pathlib.Path | None = None


@dataclasses.dataclass(eq=False)
class LoadedResult:
    """Registration outputs loaded for display (built off the GUI thread)."""

    out_dir: pathlib.Path
    files: dict[str, pathlib.Path]
    measurements: dict[str, Any]
    landmarks_mm: dict[str, list[float]]
    warnings: list[str]
    report: dict[str, Any]
    surface_vertices: np.ndarray     # (N, 3) world mm
    surface_faces: np.ndarray        # (M, 3)
    labels: np.ndarray               # (z, y, x) uint8
    grid: geometry.VolumeGeometry
    volume: np.ndarray | None        # (z, y, x) warped atlas intensities (HU) or None
    contours: dict[str, tuple[np.ndarray, ...]]  # view name -> outline polylines, (N, 2) (u, v) pixels


@dataclasses.dataclass(frozen=True)
class ExportOptions:
    """What :meth:`Session.export` writes."""

    surface_stl: bool = True
    nifti: bool = True
    measurements_json: bool = True
    measurements_csv: bool = True
    pdf_report: bool = True
    plan: bool = True
    anonymise: bool = False
    units: str = "mm"

    def __post_init__(self) -> None:
        if self.units not in LENGTH_UNITS:
            raise ValueError(f"units must be one of {sorted(LENGTH_UNITS)}, not {self.units!r}")


# --------------------------------------------------------------------------------------------
# Helpers (pure)
# --------------------------------------------------------------------------------------------
def read_calibration_json(path: str | os.PathLike, image_shape: tuple[int, int]) -> tuple[np.ndarray, dict[str, Any]]:
    """``(P, details)`` from a calibration JSON file (format in the module docstring)."""
    path = pathlib.Path(path)
    data = io.read_json_object(path, "calibration file")
    if data.get("format") != CALIBRATION_FORMAT:
        raise CaseFormatError(f'{path}: "format" must be "{CALIBRATION_FORMAT}"')
    details: dict[str, Any] = {"file": path.name}
    if "projection_matrix" in data:
        try:
            P = np.asarray(data["projection_matrix"], dtype=np.float64)
        except (TypeError, ValueError):
            raise CaseFormatError(f"{path}: projection_matrix must be 3 rows of 4 numbers") from None
        if P.shape != (3, 4):
            raise CaseFormatError(f"{path}: projection_matrix has shape {P.shape}, expected 3 rows of 4 numbers")
    elif isinstance(data.get("carm"), dict):
        params = dict(data["carm"])
        allowed = {"sdd_mm", "sid_mm", "lao_deg", "cranial_deg", "pixel_mm", "pixel_v_mm",
                   "principal_point_px", "isocentre_mm", "viewed_from"}
        unknown = sorted(set(params) - allowed)
        if unknown:
            raise CaseFormatError(f"{path}: unknown C-arm parameter(s) {', '.join(unknown)}")
        missing = sorted({"sdd_mm", "sid_mm", "lao_deg", "cranial_deg", "pixel_mm"} - set(params))
        if missing:
            raise CaseFormatError(f"{path}: carm is missing {', '.join(missing)}")
        for key in ("principal_point_px", "isocentre_mm"):
            if key in params and params[key] is not None:
                params[key] = tuple(params[key])
        view = geometry.CArmView(rows=int(image_shape[0]), cols=int(image_shape[1]), **params)
        P = geometry.projection_matrix(view)
        details["carm"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in data["carm"].items()}
    else:
        raise CaseFormatError(f"{path}: give either projection_matrix or carm parameters")
    geometry.validate_projection_matrix(P, f"{path} projection_matrix")
    return P, details


def patient_identifiers(case: io.Case) -> dict[str, str]:
    """Patient identifiers found in the case's DICOM headers (empty for PNG/TIFF cases)."""
    found: dict[str, str] = {}
    for view in case.views:
        dataset = view.image.dicom_dataset
        if dataset is None:
            continue
        for keyword in PATIENT_KEYWORDS:
            value = getattr(dataset, keyword, None)
            if value not in (None, "") and keyword not in found:
                found[keyword] = str(value)
    return found


def format_length(value_mm: float, units: str) -> str:
    return f"{value_mm * LENGTH_UNITS[units]:.{1 if units == 'mm' else 2}f}"


def measurement_rows(measurements: dict[str, Any], units: str = "mm") -> list[tuple[str, str, str]]:
    """``(label, value text, unit)`` rows for the measurements table and the PDF report, one per
    descriptor of :data:`inference.measure.MEASUREMENTS` that has a value; the value text carries
    its uncertainty (``26.0 ± 4.0``) and ``(!)`` when the value has a caveat."""
    from inference import measure

    rows = []
    uncertainty = measurements.get("uncertainty") or {}
    caveats = measurements.get("caveats") or {}
    for m in measure.MEASUREMENTS:
        value = measurements.get(m.key)
        if value is None:
            continue
        unit = units if m.unit == "mm" else m.unit
        digits = (1 if units == "mm" else 2) if m.unit == "mm" else m.digits
        text = measure.format_value(m, value, uncertainty.get(m.key), scale=LENGTH_UNITS[units], digits=digits,
                                    unit="").strip().replace("+-", "\u00b1")
        rows.append((m.label, text + (" (!)" if m.key in caveats else ""), unit))
    return rows


landmark_label = graphics.landmark_label


def mask_png_bytes(mask: np.ndarray) -> bytes:
    """A mask as an 8-bit PNG (0/255), the form masks take in case folders and projects."""
    from PIL import Image

    buffer = _stdio.BytesIO()
    Image.fromarray((np.asarray(mask, dtype=bool).astype(np.uint8) * 255)).save(buffer, format="PNG")
    return buffer.getvalue()


def load_result(out_dir: str | os.PathLike, *, measurements: dict[str, Any], landmarks_mm: dict[str, Any],
                warnings: Sequence[str], report: dict[str, Any], files: dict[str, Any] | None,
                view_names: Sequence[str], frame: RegistrationFrame | None = None,
                arrays: Any = None) -> LoadedResult:
    """Read a registration output folder for display (called in the worker thread).

    ``files`` maps output keys to paths (the pipeline's ``RegistrationResult.files``); missing keys
    fall back to the standard names of ``docs/case-format.md``. ``arrays`` (the pipeline's
    :class:`~inference.pipeline.OutputArrays`) are the outputs the registration just wrote: they
    are used instead of reading the files back (0.4 s of decompression and parsing per run on
    the 2-core machine), with the grid and surface rounded to float32 as the files store them.
    The outline of each view is read from ``silhouette_<view>.json``; a folder written before
    outlines were stored (an older project) gets them projected from its label map with the
    cameras of the case's ``frame``.
    """
    from inference import silhouettes

    out_dir = pathlib.Path(out_dir)
    names = {k: pathlib.Path(v).name for k, v in (files or {}).items()}
    standard = {"femur_surface": "femur_surface.stl", "femur_labels": "femur_labels.nii.gz",
                "warped_atlas": "warped_atlas.nii.gz", "measurements": "measurements.json",
                "report": "report.json"}
    for key, name in standard.items():
        names.setdefault(key, name)
    for view in view_names:
        names.setdefault(f"overlay_{view}", f"overlay_{io.safe_name(view)}.png")
        names.setdefault(f"silhouette_{view}", silhouettes.file_name(io.safe_name(view)))
    paths = {k: out_dir / v for k, v in names.items() if (out_dir / v).is_file()}
    for key in ("femur_surface", "femur_labels"):
        if key not in paths:
            raise InputFileError(f"{out_dir}: registration output {names[key]} is missing")
    if arrays is not None:
        vertices, faces = np.asarray(arrays.surface.vertices, np.float32).astype(np.float64), arrays.surface.faces
        labels, volume = np.asarray(arrays.labels, np.uint8), arrays.volume_hu
        grid = dataclasses.replace(arrays.grid, spacing_xyz_mm=_float32_tuple(arrays.grid.spacing_xyz_mm),
                                   origin_mm=_float32_tuple(arrays.grid.origin_mm))
    else:
        vertices, faces, labels, grid, volume = _read_outputs(paths)
    if volume is not None and volume.shape != labels.shape:
        log.warning("warped atlas and label map differ in shape; slices show labels only")
        volume = None
    contours = {}
    for index, view in enumerate(view_names):
        path = paths.get(f"silhouette_{view}")
        if path is not None:
            contours[view] = silhouettes.read_silhouette(path).polylines
        elif frame is not None:
            contours[view] = silhouettes.project_silhouette(labels, grid, frame.world_projections[index],
                                                            frame.image_shapes[index]).polylines
        else:
            log.info("%s: no outline of view %r (%s)", out_dir, view, names[f"silhouette_{view}"])
    return LoadedResult(
        out_dir=out_dir, files=paths, measurements=dict(measurements),
        landmarks_mm={k: [float(x) for x in v] for k, v in (landmarks_mm or {}).items()},
        warnings=list(warnings), report=dict(report or {}),
        surface_vertices=np.asarray(vertices), surface_faces=np.asarray(faces),
        labels=np.asarray(labels), grid=grid, volume=None if volume is None else np.asarray(volume),
        contours=contours)


def _read_outputs(paths: dict[str, pathlib.Path]):
    """(surface vertices, faces, labels, grid, warped atlas or None) read from the files."""
    from inference.mesh import read_stl

    mesh = read_stl(paths["femur_surface"])
    labels, grid = io.read_volume(paths["femur_labels"])
    volume = io.read_volume(paths["warped_atlas"])[0] if "warped_atlas" in paths else None
    return mesh.vertices, mesh.faces, labels, grid, volume


def _float32_tuple(values) -> tuple[float, ...]:
    return tuple(float(v) for v in np.asarray(values, np.float32))


def editable_landmarks(measurements: dict[str, Any], landmarks_mm: dict[str, Any]) -> dict[str, list[float]]:
    """The points the surgeon may move: the measurement landmarks the values were computed from
    (``measurements["landmarks_mm"]``, :mod:`inference.measure`), so that recomputing from unmoved
    points gives the pipeline's numbers again and moving a point changes only what depends on it.

    Measurements written before the landmarks were stored hold only the axes: the points are then
    placed on them, with the lesser trochanter of ``landmarks_mm`` (the registration's).
    """
    from inference import measure

    try:
        marks = measure.measurement_landmarks_from_json(
            measurements, landmarks_mm=None if measurements.get("landmarks_mm") else
            {k: v for k, v in landmarks_mm.items() if k == "lesser_trochanter"})
    except DataError:
        log.warning("measurements lack the axes; showing the registration landmarks as they are")
        return {k: [float(x) for x in v] for k, v in landmarks_mm.items()}
    return {k: [float(x) for x in v] for k, v in marks.points_mm.items()}


def measurements_from_landmarks(measurements: dict[str, Any], landmarks_mm: dict[str, Sequence[float]],
                                side: str | None = None) -> dict[str, Any]:
    """``measurements`` recomputed from (moved) editable landmarks: the one measurement path,
    :func:`inference.measure.recompute_measurements` (what ``hipatlas measure`` does)."""
    from inference import measure

    marks = measure.measurement_landmarks_from_json(measurements, landmarks_mm=landmarks_mm, side=side)
    return measure.measurements_from_measurement_landmarks(marks)


def propose_case_masks(case_dir, *, model: Any, cancel: Callable[[], bool] | None):
    """Atlas-based femur mask proposals for every view of a case (a progress generator returning
    a list of bool masks): :func:`inference.mask_proposal.propose_masks`."""
    from inference import mask_proposal, pipeline

    yield pipeline.Progress(0.05, "Loading case")
    case = io.load_case(case_dir)
    yield pipeline.Progress(0.15, "Proposing femur masks from the atlas")
    masks = mask_proposal.propose_masks(case, model, cancel=cancel)
    yield pipeline.Progress(1.0, "Masks proposed")
    return [np.asarray(mask, dtype=bool) for mask in masks]


def register_and_load(register: Callable[..., Generator[Any, None, Any]], case_dir, out_dir,
                      view_names: Sequence[str], *, model: Any, masks: Sequence[np.ndarray],
                      cancel: Callable[[], bool] | None):
    """Register (``register``, the contract of :func:`inference.pipeline.register_case`) and read
    the outputs for display: a progress generator returning a :class:`LoadedResult`.

    Reading the outputs belongs to the job, not to the GUI: SimpleITK holds the GIL while it
    decompresses a NIfTI volume (a second for the paper grid), which would freeze the window if
    done in the GUI process; in the registration process it costs the window nothing.
    """
    from inference import pipeline

    result = yield from register(case_dir, out_dir, model=model, overwrite=False, masks=masks, cancel=cancel)
    yield pipeline.Progress(1.0, "Loading results for display")
    return load_result(result.out_dir, measurements=result.measurements,
                       landmarks_mm=getattr(result, "landmarks_mm", {}), warnings=result.warnings,
                       report=result.report, files=result.files, view_names=view_names,
                       arrays=getattr(result, "arrays", None))


# --------------------------------------------------------------------------------------------
# The session
# --------------------------------------------------------------------------------------------
RegisterFunction = Callable[..., Generator[Any, None, Any]]


class Session:
    """One open case, its masks, registration result, landmarks and measurements (Qt-free).

    Parameters
    ----------
    work_root : path, optional
        Where the session's work folder is created (default: the system temp folder). Imported
        cases, registration outputs and extracted projects live there until :meth:`close`.
    register_fn : callable, optional
        ``register_fn(case_dir, out_dir, *, model, overwrite, masks, cancel)``, a generator with
        the contract of :func:`inference.pipeline.register_case` (the default, looked up at call
        time).
    propose_fn : callable, optional
        ``propose_fn(case_dir, *, model, cancel)``: a progress generator returning one proposed
        mask per view (default :func:`propose_case_masks`).
    isolate : bool
        Run the registration and mask proposals in a child process (:mod:`app.isolated`; ``register_fn`` must then
        be picklable). True for the workstation, which must never load TensorFlow next to its
        OpenGL views; False runs it in the calling thread (scripts, tests of the session).
    """

    def __init__(self, work_root: str | os.PathLike | None = None, register_fn: RegisterFunction | None = None,
                 *, propose_fn: Callable[..., Generator[Any, None, Any]] | None = None, isolate: bool = True):
        self.work_root = work_root
        self.work_dir = pathlib.Path(tempfile.mkdtemp(prefix="hipatlas-session-", dir=work_root))
        self.register_fn = register_fn
        self.propose_fn = propose_fn
        self.isolate = bool(isolate)
        #: With ``isolate``: what runs a job in a child process (:func:`app.isolated.run_isolated`,
        #: or the workstation's long-lived :meth:`app.isolated.WorkerProcess.run`).
        self.runner: Callable[..., Generator[Any, None, Any]] | None = None
        self.case: io.Case | None = None
        self.case_label = ""
        self.views: list[ViewState] = []
        self.frame: RegistrationFrame | None = None
        self.pair_report: geometry.ViewPairReport | None = None
        self.patient: dict[str, str] = {}
        #: Report fields the user typed (surgeon, ...): app.report.PATIENT_FIELDS names.
        self.report_patient: dict[str, str] = {}
        self.result: LoadedResult | None = None
        self.landmarks_mm: dict[str, list[float]] = {}
        self.measurements: dict[str, Any] = {}
        self.landmarks_edited = False
        self.template_plan: dict[str, Any] | None = None   # Template step (inference.templating.plan.Plan dict)
        self.template_basis: str | None = None   # app.plan_report.plan_basis of the measurements it was made on
        self.project_path: pathlib.Path | None = None
        self.pseudonym = "ANON-" + secrets.token_hex(4).upper()
        self.dirty = False
        self._runs = 0

    def options(self) -> dict[str, Any]:
        """Constructor arguments for a new session that works like this one (open, import, load)."""
        return {"work_root": self.work_root, "register_fn": self.register_fn, "propose_fn": self.propose_fn,
                "isolate": self.isolate}

    # ---------------------------------------------------------------- case
    @property
    def has_case(self) -> bool:
        return self.case is not None

    def open_case(self, case_dir: str | os.PathLike, *, calibration_notes: Sequence[dict] | None = None,
                  label: str | None = None) -> None:
        """Open a case folder: load it, take its masks or propose masks, forget any result."""
        case = io.load_case(case_dir)
        views = []
        for index, view in enumerate(case.views):
            if view.mask is not None:
                mask, source = np.array(view.mask, dtype=bool), "case file"
            else:
                mask, source = np.zeros(view.image.shape, dtype=bool), MISSING_MASK
            calibration = view.calibration.to_dict()
            if calibration_notes is not None and calibration_notes[index]:
                calibration = dict(calibration_notes[index])
            views.append(ViewState(name=view.name, mask=mask, mask_source=source, confirmed=False,
                                   calibration=calibration, display=imaging.window_to_uint8(view.image.pixels)))
        # The case in the network's frame (the two-view check, normalised cameras), once per case.
        self.frame = RegistrationFrame.of_case(case)
        self.pair_report = self.frame.pair
        self.case = case
        self.case_label = label or case.case_dir.resolve().name
        self.views = views
        self.patient = patient_identifiers(case)
        self.clear_result()
        self.project_path = None
        self.dirty = True
        log.info("opened case %s (%s)", case.case_dir, case.side)

    def import_radiographs(self, imports: Sequence[RadiographImport], side: str) -> pathlib.Path:
        """Make a case folder from two radiographs and their calibrations, then open it.

        The images are copied unchanged (a DICOM keeps its geometry tags). A calibration JSON is
        written into case.json as the view's projection_matrix; the view's calibration is shown
        as coming from that file.
        """
        if len(imports) != 2:
            raise CaseFormatError(f"two radiographs are needed, not {len(imports)}")
        if side not in io.SIDES:
            raise CaseFormatError(f'side must be "right" or "left", not {side!r}')
        names = [spec.name.strip() for spec in imports]
        if not all(names) or names[0] == names[1]:
            raise CaseFormatError("give the two views different, non-empty names (e.g. AP and LAT)")
        self._runs += 1
        case_dir = self.work_dir / f"imported-{self._runs}"
        entries, notes = [], []
        with io.atomic_output_dir(case_dir) as tmp:
            for index, spec in enumerate(imports):
                image = io.load_radiograph(spec.image_path)
                stem = f"{io.safe_name(spec.name).lower()}_{index}"
                suffix = "".join(pathlib.Path(spec.image_path).suffixes[-2:]) or ".img"
                image_name = stem + suffix
                shutil.copyfile(spec.image_path, tmp / image_name)
                entry: dict[str, Any] = {"name": names[index], "image": image_name}
                if spec.mask_path is not None:
                    mask = io.load_mask(spec.mask_path, expected_shape=image.shape)
                    (tmp / f"{stem}_mask.png").write_bytes(mask_png_bytes(mask))
                    entry["mask"] = f"{stem}_mask.png"
                if spec.calibration_path is not None:
                    P, details = read_calibration_json(spec.calibration_path, image.shape)
                    entry["projection_matrix"] = [[float(x) for x in row] for row in P]
                    notes.append({"source": "calibration-json", **details})
                elif image.source_format == "dicom":
                    geometry.projection_from_dicom(image.dicom_dataset, name=str(spec.image_path))
                    notes.append({})
                else:
                    raise CalibrationError(
                        f"{spec.image_path}: a {image.source_format.upper()} image carries no geometry; "
                        "choose a calibration JSON file for this view")
                entries.append(entry)
            io.write_json_atomic(tmp / io.CASE_JSON, {"format": io.CASE_FORMAT, "side": side, "views": entries})
        label = pathlib.Path(imports[0].image_path).resolve().parent.name or "imported case"
        self.open_case(case_dir, calibration_notes=notes, label=label)
        return case_dir

    def close(self) -> None:
        """Delete the work folder (imported cases, outputs, extracted projects)."""
        shutil.rmtree(self.work_dir, ignore_errors=True)

    # ---------------------------------------------------------------- masks
    def _view(self, index: int) -> ViewState:
        if not 0 <= index < len(self.views):
            raise IndexError(f"no view {index}; the case has {len(self.views)} views")
        return self.views[index]

    def _edited(self, index: int) -> None:
        view = self._view(index)
        view.mask_source = "edited"
        view.confirmed = False
        self.dirty = True

    def paint(self, index: int, start_uv, end_uv, radius_px: float, value: bool) -> mask_ops.MaskEdit | None:
        """Brush (``value=True``) or erase a stroke segment in view ``index``'s mask."""
        edit = mask_ops.paint_segment(self._view(index).mask, start_uv, end_uv, radius_px, value)
        if edit is not None and edit.changed_pixels:
            self._edited(index)
        return edit

    def fill_polygon(self, index: int, points_uv, value: bool) -> mask_ops.MaskEdit | None:
        edit = mask_ops.fill_polygon(self._view(index).mask, points_uv, value)
        if edit is not None and edit.changed_pixels:
            self._edited(index)
        return edit

    def apply_mask_edit(self, index: int, edit: mask_ops.MaskEdit, *, undo: bool = False) -> None:
        """Redo (or undo) an edit (the undo stack calls this)."""
        mask_ops.apply_edit(self._view(index).mask, edit, undo=undo)
        self._edited(index)

    def replace_mask(self, index: int, mask: np.ndarray, source: str = "edited") -> mask_ops.MaskEdit | None:
        """Set a whole new mask (reset to the proposal, clear); returns the edit for undo."""
        view = self._view(index)
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != view.mask.shape:
            raise DataError(f"mask is {mask.shape[0]}x{mask.shape[1]} but view '{view.name}' is "
                            f"{view.mask.shape[0]}x{view.mask.shape[1]}")
        edit = mask_ops.edit_between(view.mask, mask)
        if edit is not None:
            mask_ops.apply_edit(view.mask, edit)
            self._edited(index)
            view.mask_source = source
        return edit

    def stroke_edit(self, index: int, before: np.ndarray) -> mask_ops.MaskEdit | None:
        """Fold a finished brush stroke (mask was ``before`` at its start) into one edit."""
        return mask_ops.edit_between(before, self._view(index).mask)

    @property
    def views_awaiting_proposal(self) -> list[int]:
        """Views without a mask file that nobody has drawn on yet."""
        return [i for i, v in enumerate(self.views) if v.mask_source == MISSING_MASK and not v.confirmed]

    def mask_proposal_job(self, model: Any = None):
        """A job for the worker: ``job(cancel)`` yields Progress and returns one mask per view."""
        if self.case is None:
            raise DataError("open a case first")
        propose = self.propose_fn or propose_case_masks
        case_dir = self.case.case_dir
        isolate, runner = self.isolate, self.runner

        def job(cancel: Callable[[], bool]):
            if isolate:
                from app.isolated import run_isolated

                return (yield from (runner or run_isolated)(propose, case_dir, cancel=cancel, model=model))
            return (yield from propose(case_dir, model=model, cancel=cancel))

        return job

    def case_mask(self, index: int) -> np.ndarray | None:
        mask = self.case.views[index].mask
        return None if mask is None else np.array(mask, dtype=bool)

    def set_confirmed(self, index: int, confirmed: bool) -> None:
        view = self._view(index)
        if confirmed and not view.mask.any():
            raise DataError(f"view '{view.name}': the mask is empty; draw the femur before confirming")
        if view.confirmed != bool(confirmed):
            view.confirmed = bool(confirmed)
            self.dirty = True

    @property
    def all_confirmed(self) -> bool:
        return bool(self.views) and all(v.confirmed for v in self.views)

    def register_blocker(self) -> str | None:
        """Why registration cannot start now, or None."""
        if self.case is None:
            return "open a case first"
        unconfirmed = [v.name for v in self.views if not v.confirmed]
        if unconfirmed:
            return "confirm the mask of " + " and ".join(repr(n) for n in unconfirmed)
        return None

    # ---------------------------------------------------------------- registration
    def registration_job(self, model: Any = None) -> Callable[[Callable[[], bool]], Generator[Any, None, LoadedResult]]:
        """A job for the worker: ``job(cancel)`` is a generator of Progress returning a LoadedResult.

        Everything the job needs is captured now, on the GUI thread (copies of the masks), so the
        user may keep editing while it runs without changing what is registered.
        """
        blocker = self.register_blocker()
        if blocker is not None:
            raise DataError(f"cannot register yet: {blocker}")
        from inference import pipeline

        register = self.register_fn or pipeline.register_case
        case_dir = self.case.case_dir
        masks = [v.mask.copy() for v in self.views]
        names = [v.name for v in self.views]
        isolate, runner = self.isolate, self.runner
        self._runs += 1
        # Each run writes into its own folder, deleted whole if the run fails or is cancelled
        # (a terminated child process cannot clean up its temporary output folder itself).
        run_dir = self.work_dir / f"run-{self._runs}"
        out_dir = run_dir / "result"

        def job(cancel: Callable[[], bool]):
            try:
                if isolate:
                    from app.isolated import run_isolated

                    return (yield from (runner or run_isolated)(register_and_load, register, case_dir, out_dir,
                                                                names, cancel=cancel, model=model, masks=masks))
                return (yield from register_and_load(register, case_dir, out_dir, names, model=model, masks=masks,
                                                     cancel=cancel))
            except BaseException:
                shutil.rmtree(run_dir, ignore_errors=True)
                raise

        return job

    def set_result(self, result: LoadedResult | None) -> None:
        self.result = result
        self.landmarks_mm = editable_landmarks(result.measurements, result.landmarks_mm) if result else {}
        self.measurements = dict(result.measurements) if result else {}
        self.landmarks_edited = False
        self.template_plan = self.template_basis = None
        self.dirty = True

    def clear_result(self) -> None:
        self.result = None
        self.template_plan = self.template_basis = None
        self.landmarks_mm = {}
        self.measurements = {}
        self.landmarks_edited = False

    # ---------------------------------------------------------------- landmarks
    def move_landmark(self, name: str, position_mm: Sequence[float]) -> dict[str, Any]:
        """Move a landmark and recompute the measurements; returns the new measurements."""
        if self.result is None:
            raise DataError("register the case before moving landmarks")
        if name not in self.landmarks_mm:
            raise DataError(f"unknown landmark {name!r}")
        point = [float(v) for v in position_mm]
        if len(point) != 3 or not all(np.isfinite(point)):
            raise DataError(f"landmark {name} needs 3 finite coordinates, not {position_mm!r}")
        moved = dict(self.landmarks_mm)
        moved[name] = point
        measurements = measurements_from_landmarks(self.result.measurements, moved, side=self.case.side)
        self.landmarks_mm = moved
        self.measurements = measurements
        self.landmarks_edited = True
        self.dirty = True
        return measurements

    def reset_landmarks(self) -> None:
        if self.result is not None:
            self.landmarks_mm = editable_landmarks(self.result.measurements, self.result.landmarks_mm)
            self.measurements = dict(self.result.measurements)
            self.landmarks_edited = False
            self.dirty = True

    def projected_landmarks(self, index: int) -> dict[str, tuple[float, float]]:
        """Pixel ``(u, v)`` of each landmark (and the hip centre) in view ``index``."""
        points = dict(self.landmarks_mm)
        if "hip_centre_mm" in self.measurements:
            points["hip_centre"] = self.measurements["hip_centre_mm"]
        if not points or self.case is None:
            return {}
        names = list(points)
        uv = geometry.project_points(self.case.views[index].P, np.array([points[n] for n in names], dtype=np.float64))
        return {n: (float(u), float(v)) for n, (u, v) in zip(names, np.asarray(uv).reshape(-1, 2))}

    # ---------------------------------------------------------------- measurement graphics (2D)
    def view_graphics(self, index: int):
        """Measurement graphics of view ``index`` (:func:`inference.graphics.view_graphics`), or None."""
        if self.result is None or self.case is None or not self.measurements:
            return None
        view = self.case.views[index]
        return graphics.view_graphics(self.measurements, self.landmarks_mm, view.P, view.image.shape,
                                      detector_mm_per_px=graphics.case_view_pixel_mm(view))

    def landmark_moved_in_view(self, index: int, name: str, uv) -> list[float]:
        """Where landmark ``name`` goes when dragged to pixel ``uv`` of view ``index``: the same
        depth in that view (:func:`inference.graphics.move_in_view_plane`)."""
        if name not in self.landmarks_mm:
            raise DataError(f"unknown landmark {name!r}")
        return [float(x) for x in graphics.move_in_view_plane(self.case.views[index].P, self.landmarks_mm[name], uv)]

    def epipolar_segment(self, from_index: int, uv, to_index: int):
        """The line in view ``to_index`` on which pixel ``uv`` of view ``from_index`` lies in 3D."""
        source, target = self.case.views[from_index], self.case.views[to_index]
        return graphics.epipolar_segment(source.P, uv, target.P, target.image.shape)

    # ---------------------------------------------------------------- report data
    def views_provenance(self, anonymise: bool = False) -> list[dict[str, Any]]:
        """Per view: name, calibration, image file and checksum, mask source, checksum, confirmed."""
        rows = []
        for state, view in zip(self.views, self.case.views if self.case else []):
            calibration = dict(state.calibration)
            if anonymise and "file" in calibration:
                calibration["file"] = f"{io.safe_name(state.name)}_calibration.json"
            rows.append({
                "name": state.name,
                "image": f"{io.safe_name(state.name)}{view.image_path.suffix}" if anonymise else view.image_path.name,
                "image_sha256": view.image.sha256,
                "image_size_px": list(view.image.shape),
                "calibration": calibration,
                "mask_source": state.mask_source,
                "mask_confirmed": state.confirmed,
                "mask_png_sha256": sha256_bytes(mask_png_bytes(state.mask)),
            })
        return rows

    def model_identity(self) -> dict[str, Any]:
        if self.result is None:
            return {}
        return dict(self.result.report.get("model") or {})

    def provenance(self, anonymise: bool = False) -> dict[str, Any]:
        case_block: dict[str, Any] = {"label": self.pseudonym if anonymise else self.case_label,
                                      "side": self.case.side if self.case else None}
        if not anonymise:
            case_block.update({k: v for k, v in self.patient.items()})
        return {
            "software": {"name": "hipatlas", "version": __version__},
            "model": self.model_identity(),
            "case": case_block,
            "views": self.views_provenance(anonymise),
            "landmarks_edited": self.landmarks_edited,
            "anonymised": bool(anonymise),
            "notice": RESEARCH_NOTICE,
        }

    # ---------------------------------------------------------------- export
    def export(self, out_dir: str | os.PathLike, options: ExportOptions = ExportOptions(),
               *, overwrite: bool = False) -> dict[str, pathlib.Path]:
        """Write the chosen outputs into ``out_dir`` (atomically: all or nothing).

        Returns the written files by kind. With ``options.anonymise`` no patient identifier
        (DICOM patient attributes, case folder name, input file names) appears in any file.
        """
        if self.result is None:
            raise DataError("nothing to export yet: register the case first")
        writers = [w for w in EXPORT_WRITERS if getattr(options, w.key)]
        if not writers:
            raise OutputError("choose at least one thing to export")
        context = ExportContext(options, self.provenance(options.anonymise))
        written: dict[str, str] = {}
        with io.atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
            for writer in writers:
                written.update(writer.write(self, tmp, context))
        final = pathlib.Path(out_dir)
        log.info("exported %s to %s", ", ".join(written), final)
        return {k: final / v for k, v in written.items()}

    def _copy_output(self, key: str, destination: pathlib.Path) -> str:
        source = self.result.files.get(key)
        if source is None or not pathlib.Path(source).is_file():
            raise OutputError(f"the registration output {key} is missing from {self.result.out_dir}")
        shutil.copyfile(source, destination)
        return destination.name

    def _write_csv(self, path: pathlib.Path) -> pathlib.Path:
        buffer = _stdio.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["quantity", "value", "uncertainty", "unit"])
        m = self.measurements
        uncertainty = m.get("uncertainty") or {}
        for key, value in m.items():
            if isinstance(value, bool) or value is None or key in ("uncertainty", "landmark_uncertainty_mm"):
                continue
            u = "" if uncertainty.get(key) is None else repr(float(uncertainty[key]))
            if isinstance(value, (int, float)):
                unit = "mm" if key.endswith("_mm") else "deg" if key.endswith("_deg") else ""
                writer.writerow([key, repr(float(value)), u, unit])
            elif isinstance(value, (list, tuple)) and len(value) == 3 and all(isinstance(v, (int, float)) for v in value):
                for axis, v in zip("xyz", value):
                    writer.writerow([f"{key}_{axis}" if not key.endswith("_mm") else f"{key[:-3]}_{axis}_mm",
                                     repr(float(v)), u, "mm" if key.endswith("_mm") else ""])
            elif isinstance(value, dict) and key != "landmarks_mm":
                for sub, vec in value.items():
                    if isinstance(vec, (list, tuple)) and len(vec) == 3:
                        for axis, v in zip("xyz", vec):
                            writer.writerow([f"{key}.{sub}_{axis}", repr(float(v)), "",
                                             "mm" if sub.endswith("_mm") else ""])
        sd = m.get("landmark_uncertainty_mm") or {}
        for name, point in self.landmarks_mm.items():
            for axis, v in zip("xyz", point):
                writer.writerow([f"landmark.{name}_{axis}_mm", repr(float(v)),
                                 "" if sd.get(name) is None else repr(float(sd[name])), "mm"])
        # Written straight into the export's temporary folder: atomic_output_dir publishes all
        # files together or none.
        path.write_text(buffer.getvalue(), encoding="utf-8")
        return path

    def report_content(self, options: ExportOptions, provenance: dict[str, Any] | None = None):
        """The data of the PDF planning report, its pictures rendered off-screen (never the screen)."""
        from app import plan_report, report

        provenance = provenance or self.provenance(options.anonymise)
        result = self.result
        surface = (result.surface_vertices, result.surface_faces)
        radiographs, reconstruction = report.report_figures(
            self.case, self.measurements, self.landmarks_mm,
            outlines=result.contours,
            surface=surface)
        planned = plan_report.session_plan(self)
        plan = None if planned is None else plan_report.plan_section(self.case, *planned, surface=surface)
        patient = report.patient_from_case(self.case).merged(report.patient_from_keywords(self.patient))
        patient = patient.merged(self.report_patient)
        return report.build_report_content(
            case=self.case, measurements=self.measurements, landmarks_mm=self.landmarks_mm,
            warnings=list(result.warnings), model=provenance["model"], views=provenance["views"],
            patient=patient, case_label=self.pseudonym if options.anonymise else self.case_label,
            landmarks_edited=self.landmarks_edited, units=options.units, anonymised=options.anonymise,
            radiographs=radiographs, reconstruction=reconstruction, plan=plan,
            angle_sensitivity=(getattr(result, "report", None) or {}).get("angle_sensitivity"))


def describe_model(model_path: str | os.PathLike | None) -> dict[str, Any]:
    """File, id and sha256 of the model a registration would use (for the About box); when
    ``resources/models/DEFAULT`` names several (averaged), their ids joined and each in ``members``.

    Reads the model card JSON directly: loading :mod:`inference.model` would import TensorFlow
    (seconds) just to show a name (:func:`inference.resources.model_card_path` finds the card).
    """
    from inference import registration
    from inference.errors import ModelError

    try:
        paths = [registration.model_file_in(model_path)] if model_path else registration.default_model_paths()
    except ModelError as exc:
        return {"error": str(exc)}
    infos = [_describe_model_file(path) for path in paths]
    if len(infos) == 1:
        return infos[0]
    return {"id": " + ".join(str(info["id"]) for info in infos), "file": ", ".join(info["file"] for info in infos),
            "members": infos}


def _describe_model_file(path: pathlib.Path) -> dict[str, Any]:
    from inference.resources import model_card_path

    info: dict[str, Any] = {"file": str(path), "id": path.stem}
    card_path = model_card_path(path)
    try:
        card = json.loads(card_path.read_text(encoding="utf-8")) if card_path is not None else None
    except (OSError, ValueError):
        card = None
    if not isinstance(card, dict):
        info["card"] = "missing or unreadable"
        return info
    info["id"] = str(card.get("name") or card.get("model_id") or path.stem)
    info["sha256"] = card.get("sha256")
    info["software_version"] = card.get("software_version")
    return info
