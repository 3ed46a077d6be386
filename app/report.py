"""The PDF planning report (reportlab), rendered off-screen from the data, never from the screen.

One A4 document for the patient record: a "research use only" banner on every page; the patient
(name, ID, birth date, study and acquisition dates), the operated side in large print, the
surgeon and the local time; the measurements with each value's uncertainty (when
measurements.json gives one) and typical adult ranges; per view the calibration in human terms
(mm per pixel at the detector and at the hip, magnification at the hip); the radiographs with the
measurement graphics and a scale (:mod:`app.report_figures`); the 3D reconstruction from fixed
cameras; landmarks, inputs with checksums, software and model, warnings; and an approval and
signature field. Headings are kept with what follows them (no heading alone at a page's foot).

:func:`report_for_output_dir` builds the report of a registration output folder (``hipatlas
report``); the workstation's Export builds it from its session (:meth:`app.session.Session.export`).
Neither imports Qt.
"""

from __future__ import annotations

import dataclasses
import datetime
import io
import logging
import math
import os
import pathlib
from typing import Any, Mapping, Sequence

import numpy as np

from inference.errors import InputFileError
from inference.io import atomic_file
from inference.measure import MEASUREMENTS, caveat_lines

log = logging.getLogger(__name__)

__all__ = ["PatientInfo", "ReportFigure", "ReportContent", "NORMAL_RANGES", "patient_from_case",
           "read_patient_json", "measurement_uncertainty", "report_measurement_rows", "build_report_content",
           "report_figures", "report_for_output_dir", "write_planning_report"]

#: Typical adult values, for orientation only (not patient-specific targets): key -> (low, high, source),
#: from the one measurement table (:data:`inference.measure.MEASUREMENTS`).
NORMAL_RANGES: dict[str, tuple[float, float, str]] = {
    m.key: (*m.normal_range, m.source) for m in MEASUREMENTS if m.normal_range is not None}

#: Fields of a patient JSON file (``--patient-json``) and their DICOM keywords.
PATIENT_FIELDS = {
    "name": "PatientName",
    "patient_id": "PatientID",
    "birth_date": "PatientBirthDate",
    "study_date": "StudyDate",
    "acquisition_date": "AcquisitionDate",
    "institution": "InstitutionName",
    "accession_number": "AccessionNumber",
    "surgeon": None,
}
NOT_RECORDED = "not recorded"
RADIOGRAPH_LEGEND = ("Lines: cyan head outline (the shadow of the head sphere), amber shaft axis, green neck axis, "
                     "pink offset, violet vertical offset. Points: HC head centre, NP neck axis point, SP1/SP2 "
                     "shaft axis points, LT lesser trochanter. Numbers on the images are the 3D measurements "
                     "(the projection foreshortens lines); the scale bar measures at the depth of the hip.")


# ----------------------------------------------------------------------------------- patient
@dataclasses.dataclass(frozen=True)
class PatientInfo:
    """Who and when, as printed in the report (empty string: not recorded)."""

    name: str = ""
    patient_id: str = ""
    birth_date: str = ""
    study_date: str = ""
    acquisition_date: str = ""
    institution: str = ""
    accession_number: str = ""
    surgeon: str = ""

    def merged(self, overrides: Mapping[str, str]) -> "PatientInfo":
        return dataclasses.replace(self, **{k: str(v) for k, v in overrides.items() if v not in (None, "")})


def _dicom_text(keyword: str, value: Any) -> str:
    text = str(value).strip()
    if keyword.endswith("Date") and len(text) == 8 and text.isdigit():
        return f"{text[:4]}-{text[4:6]}-{text[6:]}"   # DICOM DA: YYYYMMDD
    if keyword == "PatientName":
        return ", ".join(part for part in text.split("^") if part)  # Family^Given -> Family, Given
    return text


def patient_from_case(case) -> PatientInfo:
    """Patient and study facts from the case's DICOM headers (empty for PNG/TIFF cases)."""
    found: dict[str, str] = {}
    for view in case.views:
        dataset = view.image.dicom_dataset
        if dataset is None:
            continue
        for field, keyword in PATIENT_FIELDS.items():
            if keyword is None or field in found:
                continue
            value = getattr(dataset, keyword, None)
            if keyword == "AcquisitionDate" and value in (None, ""):
                value = getattr(dataset, "ContentDate", None)
            if value not in (None, ""):
                found[field] = _dicom_text(keyword, value)
    return PatientInfo(**found)


def patient_from_keywords(found: Mapping[str, str]) -> dict[str, str]:
    """PatientInfo fields from DICOM keyword -> value (e.g. :attr:`app.session.Session.patient`)."""
    return {field: _dicom_text(keyword, found[keyword]) for field, keyword in PATIENT_FIELDS.items()
            if keyword is not None and found.get(keyword) not in (None, "")}


def read_patient_json(path: str | os.PathLike) -> dict[str, str]:
    """A patient JSON file: an object with any of :data:`PATIENT_FIELDS` (strings)."""
    from inference.io import read_json_object

    path = pathlib.Path(path)
    data = read_json_object(path, "patient file")
    unknown = sorted(set(data) - set(PATIENT_FIELDS))
    if unknown:
        raise InputFileError(f"{path}: unknown patient field(s) {', '.join(unknown)}; "
                             f"allowed: {', '.join(PATIENT_FIELDS)}")
    return {k: str(v) for k, v in data.items() if v is not None}


# ----------------------------------------------------------------------------------- values
def measurement_uncertainty(measurements: Mapping[str, Any], key: str) -> float | None:
    """The uncertainty of ``measurements[key]`` if measurements.json gives one, else None.

    Accepted forms: ``<key>_uncertainty`` (e.g. ``femoral_offset_mm_uncertainty``), the unit moved
    to the end (``femoral_offset_uncertainty_mm``), or an ``uncertainty`` object keyed by ``key``;
    a number, or an object whose first number is taken (e.g. ``{"sd": 1.2}``).
    """
    stem, _, unit = key.rpartition("_")
    candidates = [measurements.get(f"{key}_uncertainty"), measurements.get(f"{stem}_uncertainty_{unit}")]
    block = measurements.get("uncertainty")
    if isinstance(block, Mapping):
        candidates.append(block.get(key))
    for value in candidates:
        if isinstance(value, Mapping):
            value = next((v for v in value.values() if isinstance(v, (int, float)) and not isinstance(v, bool)), None)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    return None


def report_measurement_rows(measurements: Mapping[str, Any], units: str = "mm") -> list[tuple[str, ...]]:
    """``(quantity, value, +- uncertainty, unit, typical range)`` rows of the measurements table, one per
    measurement of :data:`inference.measure.MEASUREMENTS` that has a value (``(!)``: it has a caveat)."""
    from app.session import format_length

    rows = []
    caveats = measurements.get("caveats") or {}
    for m in MEASUREMENTS:
        value = measurements.get(m.key)
        if value is None:
            continue
        if m.kind == "point":
            rows.append((m.label, ", ".join(format_length(float(v), units) for v in value), "", units, ""))
            continue
        is_angle = m.unit == "deg"

        def show(x: float) -> str:
            return f"{x:.{m.digits}f}" if is_angle else format_length(x, units)

        uncertainty = measurement_uncertainty(measurements, m.key)
        spread = "" if uncertainty is None else f"\u00b1 {show(uncertainty)}"
        normal = ""
        if m.normal_range is not None:
            low, high = m.normal_range
            normal = f"{show(low)}\u2013{show(high)}"
            if not low <= float(value) <= high:
                normal += " (outside)"
        flag = " (!)" if m.key in caveats else ""
        rows.append((m.label, show(float(value)) + flag, spread, "\u00b0" if is_angle else units, normal))
    return rows


# ----------------------------------------------------------------------------------- content
@dataclasses.dataclass(frozen=True)
class ReportFigure:
    caption: str
    png: bytes
    width_fraction: float = 1.0      # of the text width


@dataclasses.dataclass(frozen=True)
class ReportContent:
    """Everything the report shows (already formatted and, if asked for, anonymised)."""

    title: str
    notice: str
    created: str                                    # local time with its UTC offset
    case_label: str
    patient: PatientInfo
    anonymised: bool
    side: str
    measurement_rows: Sequence[tuple[str, ...]]
    landmark_rows: Sequence[tuple[str, str, str]]
    landmarks_edited: bool
    calibration_rows: Sequence[tuple[str, ...]]     # view, source, detector, hip, magnification, distance
    radiographs: Sequence[ReportFigure]
    reconstruction: ReportFigure | None
    views: Sequence[dict[str, Any]]
    software_version: str
    model_lines: Sequence[tuple[str, str]]
    warnings: Sequence[str]
    measurement_notes: Sequence[str] = ()      # caveats of values marked (!) (inference.measure.caveat_lines)
    angle_sensitivity_lines: Sequence[str] = ()  # per view: what a 1-degree angle error would move (angle_sensitivity_lines)
    plan: Any = None                           # app.plan_report.ReportPlan: the implant plan, if one was made


def local_time_text(now: datetime.datetime | None = None) -> str:
    now = (now or datetime.datetime.now()).astimezone()
    return now.strftime("%Y-%m-%d %H:%M:%S ") + (now.tzname() or "") + now.strftime(" (UTC%z)")


def _view_calibrations(case, measurements: Mapping[str, Any]) -> list:
    from inference import graphics

    out = []
    centre = measurements.get("hip_centre_mm")
    for view in case.views:
        out.append(None if centre is None else
                   graphics.view_calibration(view.P, centre, graphics.case_view_pixel_mm(view)))
    return out


def calibration_rows(case, measurements: Mapping[str, Any]) -> list[tuple[str, ...]]:
    rows = []
    for view, calibration in zip(case.views, _view_calibrations(case, measurements)):
        source = view.calibration.source
        if calibration is None:
            rows.append((view.name, source, "", "", "", ""))
            continue
        detector = (NOT_RECORDED if calibration.detector_mm_per_px is None
                    else f"{calibration.detector_mm_per_px:.3f} mm")
        magnification = ("unknown (no detector pitch)" if calibration.magnification is None
                         else f"{calibration.magnification:.2f}\u00d7")
        rows.append((view.name, source, detector, f"{calibration.mm_per_px_at_hip:.3f} mm", magnification,
                     f"{calibration.source_to_hip_mm:.0f} mm"))
    return rows


def angle_sensitivity_lines(entry: Mapping[str, Any] | None, units: str = "mm") -> list[str]:
    """One line per view of ``report.json`` -> ``angle_sensitivity`` (:mod:`inference.angle_sensitivity`):
    how far one degree of error in that view's recorded angle would move the hip centre and the
    femur. Empty when the registration did not state it."""
    from app.session import LENGTH_UNITS

    def format_length(value_mm: float, units: str) -> str:  # tenths of a millimetre per degree matter here
        return f"{value_mm * LENGTH_UNITS[units]:.{2 if units == 'mm' else 3}f}"

    if not isinstance(entry, Mapping):
        return []
    lines = []
    for name, row in entry.items():
        if not isinstance(row, Mapping) or not all(isinstance(row.get(k), (int, float)) for k in
                                                   ("hip_centre_mm_per_deg", "femur_mean_mm_per_deg", "femur_max_mm_per_deg")):
            continue
        lines.append(f"{name}: hip centre {format_length(float(row['hip_centre_mm_per_deg']), units)} {units}, femur "
                     f"{format_length(float(row['femur_mean_mm_per_deg']), units)} {units} on average and up to "
                     f"{format_length(float(row['femur_max_mm_per_deg']), units)} {units}")
    return lines


def report_figures(case, measurements: Mapping[str, Any], landmarks_mm: Mapping[str, Any], *,
                   outlines: Mapping[str, Sequence[np.ndarray]] | None = None,
                   surface: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[list[ReportFigure], ReportFigure | None]:
    """The annotated radiographs (one per view) and the 3D picture, rendered off-screen.

    ``outlines``: view name -> the registered femur's outline polylines ((u, v) pixels, as in
    ``silhouette_<view>.json``), drawn on the radiograph."""
    from app import imaging, report_figures as figures
    from inference import graphics

    radiographs = []
    for view, calibration in zip(case.views, _view_calibrations(case, measurements)):
        drawn = graphics.view_graphics(measurements, landmarks_mm, view.P, view.image.shape,
                                       detector_mm_per_px=graphics.case_view_pixel_mm(view))
        pixels = imaging.window_to_uint8(view.image.pixels)
        scale = "" if calibration is None else ": " + "; ".join(calibration.lines())
        png = figures.annotated_radiograph_png(pixels, drawn, outline_uv=(outlines or {}).get(view.name, ()))
        radiographs.append(ReportFigure(f"{view.name}{scale}.", png, 0.49))
    reconstruction = None
    if surface is not None:
        png = figures.render_3d_png(surface[0], surface[1], measurements, landmarks_mm, case.side)
        reconstruction = ReportFigure(
            "3D reconstruction (bone half see-through), fixed cameras: anterior and lateral. "
            "Head sphere cyan, shaft axis amber, neck axis green; landmarks labelled.", png, 1.0)
    return radiographs, reconstruction


def build_report_content(*, case, measurements: Mapping[str, Any], landmarks_mm: Mapping[str, Any],
                         warnings: Sequence[str], model: Mapping[str, Any], views: Sequence[dict[str, Any]],
                         patient: PatientInfo, case_label: str, landmarks_edited: bool = False,
                         units: str = "mm", anonymised: bool = False,
                         radiographs: Sequence[ReportFigure] = (), reconstruction: ReportFigure | None = None,
                         plan: Any = None, now: datetime.datetime | None = None,
                         angle_sensitivity: Mapping[str, Any] | None = None) -> ReportContent:
    """The report's content from a case, its measurements and the registration's facts
    (``angle_sensitivity``: ``report.json``'s entry of that name, when the registration wrote one)."""
    from app.session import RESEARCH_NOTICE, format_length, landmark_label
    from inference import __version__

    if anonymised:
        patient = PatientInfo(surgeon=patient.surgeon)
    return ReportContent(
        title="Hip planning report",
        notice=RESEARCH_NOTICE,
        created=local_time_text(now),
        case_label=case_label,
        patient=patient,
        anonymised=anonymised,
        side=case.side,
        measurement_rows=report_measurement_rows(measurements, units),
        angle_sensitivity_lines=angle_sensitivity_lines(angle_sensitivity, units),
        landmark_rows=[(landmark_label(n), ", ".join(format_length(float(v), units) for v in p), units)
                       for n, p in landmarks_mm.items()],
        landmarks_edited=landmarks_edited,
        calibration_rows=calibration_rows(case, measurements),
        radiographs=list(radiographs),
        reconstruction=reconstruction,
        views=list(views),
        software_version=__version__,
        model_lines=[("Model", str(model.get("name") or model.get("id") or "unknown")),
                     ("Model sha256", str(model.get("sha256") or "not recorded"))],
        warnings=list(warnings),
        measurement_notes=caveat_lines(measurements),
        plan=plan,
    )


def _output_landmarks(out_dir: pathlib.Path, measurements: dict[str, Any],
                      landmarks_file: str | os.PathLike | None = None) -> dict[str, list[float]]:
    """Landmarks of an output folder: ``landmarks_file`` or ``landmarks.json`` ({name: [x, y, z]} or
    {"landmarks_mm": {...}}), else ``landmarks_mm`` in measurements.json (a workstation export),
    else the points that reproduce the measurements."""
    from app.session import editable_landmarks

    path = pathlib.Path(landmarks_file) if landmarks_file is not None else out_dir / "landmarks.json"
    if landmarks_file is not None and not path.is_file():
        raise InputFileError(f"{path}: landmarks file not found")
    if path.is_file():
        from inference.io import read_json_object

        data = read_json_object(path, "landmarks file")
        data = data.get("landmarks_mm", data)
        if isinstance(data, dict):
            return {k: [float(x) for x in v] for k, v in data.items() if isinstance(v, list) and len(v) == 3}
    if isinstance(measurements.get("landmarks_mm"), dict):
        return {k: [float(x) for x in v] for k, v in measurements["landmarks_mm"].items()}
    return editable_landmarks(measurements, {})


def report_for_output_dir(out_dir: str | os.PathLike, pdf_path: str | os.PathLike, *,
                          case_dir: str | os.PathLike | None = None,
                          patient_json: str | os.PathLike | None = None,
                          landmarks: str | os.PathLike | None = None,
                          surgeon: str | None = None, units: str = "mm",
                          plan_dir: str | os.PathLike | None = None,
                          implant_folders: Sequence[str | os.PathLike] = ()) -> pathlib.Path:
    """Write the planning report of a registration output folder (``hipatlas report``).

    The case (radiographs and projection matrices) is the one named in the folder's report.json
    (``case_dir``) unless ``case_dir`` is given. The report shows the implant plan of ``plan_dir``
    (a ``hipatlas plan`` folder), by default the one in ``out_dir/plan`` if there is one
    (:func:`app.plan_report.output_dir_plan`).
    """
    from app import plan_report
    from inference import io as hio, silhouettes
    from inference.measure import validate_measurements

    out_dir = pathlib.Path(out_dir)
    if not out_dir.is_dir():
        raise InputFileError(f"{out_dir}: no such registration output folder")
    measurements = hio.read_json_object(out_dir / "measurements.json", "measurements file")
    validate_measurements({k: v for k, v in measurements.items()})
    run_report: dict[str, Any] = {}
    if (out_dir / "report.json").is_file():
        run_report = hio.read_json_object(out_dir / "report.json", "registration report")
    if case_dir is None:
        case_dir = run_report.get("case_dir")
        if not case_dir:
            raise InputFileError(f"{out_dir}/report.json does not name the case folder; give it with --case")
    case = hio.load_case(case_dir)
    landmarks_mm = _output_landmarks(out_dir, measurements, landmarks)
    patient = patient_from_case(case)
    if patient_json is not None:
        patient = patient.merged(read_patient_json(patient_json))
    if surgeon:
        patient = patient.merged({"surgeon": surgeon})
    surface = None
    stl = out_dir / "femur_surface.stl"
    if stl.is_file():
        from inference.mesh import read_stl

        mesh = read_stl(stl)
        surface = (np.asarray(mesh.vertices), np.asarray(mesh.faces))
    outlines = {}
    for view in case.views:  # the pipeline writes safe names (letters, digits, _ and -)
        safe = "".join(c if c.isalnum() or c in "_-" else "_" for c in view.name)
        path = out_dir / silhouettes.file_name(safe)
        if path.is_file():
            outlines[view.name] = silhouettes.read_silhouette(path).polylines
    radiographs, reconstruction = report_figures(case, measurements, landmarks_mm, outlines=outlines,
                                                 surface=surface)
    planned = plan_report.output_dir_plan(out_dir, plan_dir, implant_folders)
    plan = None if planned is None else plan_report.plan_section(case, *planned, surface=surface)
    views = []
    for index, view in enumerate(case.views):
        run_view = (run_report.get("views") or [{}] * len(case.views))[index] if run_report.get("views") else {}
        views.append({"name": view.name, "image": view.image_path.name, "image_sha256": view.image.sha256,
                      "calibration": view.calibration.to_dict(),
                      "mask_source": run_view.get("mask_source", "case file" if view.mask is not None else "none"),
                      "mask_confirmed": run_view.get("mask_confirmed", view.mask is not None),
                      "mask_png_sha256": run_view.get("mask_sha256") or ""})
    content = build_report_content(
        case=case, measurements=measurements, landmarks_mm=landmarks_mm,
        warnings=list(run_report.get("warnings") or []), model=run_report.get("model") or {}, views=views,
        patient=patient, case_label=pathlib.Path(case.case_dir).resolve().name,
        landmarks_edited=bool((measurements.get("provenance") or {}).get("landmarks_edited")), units=units,
        radiographs=radiographs, reconstruction=reconstruction, plan=plan,
        angle_sensitivity=run_report.get("angle_sensitivity"))
    return write_planning_report(pdf_path, content)


# ----------------------------------------------------------------------------------- PDF
def _escape(text: Any) -> str:
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _calibration_text(calibration: dict[str, Any]) -> str:
    source = calibration.get("source", "unknown")
    details = [f"{k}: {v}" for k, v in calibration.items()
               if k not in ("source", "view", "tags_used", "warnings") and not isinstance(v, (dict, list))]
    return source + (f" ({'; '.join(details)})" if details else "")


def _story(content: ReportContent) -> list[Any]:
    from reportlab.lib import colors
    from reportlab.lib.enums import TA_CENTER
    from reportlab.lib.pagesizes import A4
    from reportlab.lib.styles import ParagraphStyle, getSampleStyleSheet
    from reportlab.lib.units import mm
    from reportlab.lib.utils import ImageReader
    from reportlab.platypus import Image, KeepTogether, Paragraph, Spacer, Table, TableStyle

    styles = getSampleStyleSheet()
    small = ParagraphStyle("small", parent=styles["BodyText"], fontSize=8, leading=10)
    mono = ParagraphStyle("mono", parent=small, fontName="Courier", fontSize=7, leading=9)
    cell = ParagraphStyle("cell", parent=styles["BodyText"], fontSize=9, leading=11)
    # keepWithNext: a heading never ends a page on its own (reportlab moves it to the next page).
    heading = ParagraphStyle("heading", parent=styles["Heading2"], keepWithNext=1, spaceBefore=8, spaceAfter=4)
    side_style = ParagraphStyle("side", parent=styles["Title"], fontSize=26, leading=32, alignment=TA_CENTER,
                                textColor=colors.HexColor("#0D47A1"))
    page_width = A4[0] - 36 * mm

    def table(rows, widths, header=True, style_extra=()):
        data = [[c if isinstance(c, Paragraph) else Paragraph(_escape(c), cell) for c in row] for row in rows]
        t = Table(data, colWidths=widths, hAlign="LEFT", repeatRows=1 if header else 0)
        style = [("GRID", (0, 0), (-1, -1), 0.25, colors.HexColor("#B0B7C3")),
                 ("VALIGN", (0, 0), (-1, -1), "TOP"),
                 ("TOPPADDING", (0, 0), (-1, -1), 2), ("BOTTOMPADDING", (0, 0), (-1, -1), 2), *style_extra]
        if header:
            style += [("BACKGROUND", (0, 0), (-1, 0), colors.HexColor("#E6EAF0"))]
        t.setStyle(TableStyle(style))
        return t

    def section(title, *flowables):
        # The heading and its first block stay together; later blocks may flow on.
        first, *rest = flowables
        return [KeepTogether([Paragraph(_escape(title), heading), first]), *rest]

    def picture(figure: ReportFigure, max_height):
        reader = ImageReader(io.BytesIO(figure.png))
        width_px, height_px = reader.getSize()
        width = page_width * figure.width_fraction
        height = width * height_px / max(width_px, 1)
        if height > max_height:
            width, height = width * max_height / height, max_height
        return Image(io.BytesIO(figure.png), width=width, height=height)

    def picture_grid(figures: Sequence[ReportFigure], max_height):
        """Pictures side by side, each with its caption below."""
        images = [picture(f, max_height) for f in figures]
        captions = [Paragraph(_escape(f.caption), small) for f in figures]
        grid = Table([images, captions], colWidths=[page_width / len(images)] * len(images))
        grid.setStyle(TableStyle([("VALIGN", (0, 0), (-1, -1), "TOP"), ("ALIGN", (0, 0), (-1, 0), "CENTER"),
                                  ("LEFTPADDING", (0, 0), (-1, -1), 2), ("RIGHTPADDING", (0, 0), (-1, -1), 2)]))
        return grid

    p = content.patient

    def shown(value):
        return value or NOT_RECORDED

    story: list[Any] = [Paragraph(_escape(content.title), styles["Title"])]
    if content.anonymised:
        who = [("Case", content.case_label), ("Patient identifiers", "removed (anonymised report)")]
    else:
        who = [("Patient name", shown(p.name)), ("Patient ID", shown(p.patient_id)),
               ("Birth date", shown(p.birth_date)), ("Case", content.case_label)]
    when = [("Study date", shown(p.study_date)), ("Acquisition date", shown(p.acquisition_date)),
            ("Institution", shown(p.institution) if not content.anonymised else "removed"),
            ("Report created", content.created)]
    rows = [[a, b, c, d] for (a, b), (c, d) in zip(who + [("", "")] * (len(when) - len(who)), when)]
    story.append(table(rows, [30 * mm, page_width / 2 - 30 * mm, 32 * mm, page_width / 2 - 32 * mm], header=False,
                       style_extra=[("FONTNAME", (0, 0), (0, -1), "Helvetica-Bold")]))
    story.append(Spacer(1, 3 * mm))
    side_box = Table([[Paragraph(f"Operated side: {_escape(content.side.upper())} hip", side_style)]],
                     colWidths=[page_width])
    side_box.setStyle(TableStyle([("BOX", (0, 0), (-1, -1), 2, colors.HexColor("#0D47A1")),
                                  ("TOPPADDING", (0, 0), (-1, -1), 6), ("BOTTOMPADDING", (0, 0), (-1, -1), 8)]))
    story.append(side_box)
    story.append(Spacer(1, 2 * mm))
    story.append(table([["Surgeon", p.surgeon or "_" * 40]], [30 * mm, page_width - 30 * mm], header=False))

    note = Paragraph("Typical ranges are adult population values for orientation, not targets for this patient "
                     "(" + "; ".join(f"{_escape(src)}" for _, _, src in NORMAL_RANGES.values()) + "). "
                     "\u00b1: one standard uncertainty recorded in measurements.json (blank where none was recorded); "
                     "definitions, sources and the uncertainty model: docs/measurements.md.", small)
    measurement_table = table([("Quantity", "Value", "Uncertainty", "Unit", "Typical range"),
                               *content.measurement_rows],
                              [55 * mm, 38 * mm, 24 * mm, 14 * mm, page_width - 131 * mm])
    story += section("Measurements", measurement_table, note)
    for caveat in content.measurement_notes:
        story.append(Paragraph(f"(!) {_escape(caveat)}", small))
    if content.landmarks_edited:
        story.append(Paragraph("Landmarks were moved by the user after registration; the measurements were "
                               "recomputed from the moved landmarks.", small))

    if content.radiographs:
        story += section("Radiographs with measurement graphics", picture_grid(content.radiographs, 100 * mm),
                         Paragraph(_escape(RADIOGRAPH_LEGEND), small))

    calibration = table([("View", "Source", "Detector pixel", "Pixel at hip", "Magnification at hip",
                          "Source\u2013hip"), *content.calibration_rows],
                        [14 * mm, 38 * mm, 26 * mm, 24 * mm, page_width - 126 * mm, 24 * mm])
    story += section("Calibration", calibration,
                     Paragraph("Pixel sizes in mm per pixel. The size at the hip follows from the projection "
                               "matrix; the detector pixel size and the magnification need the detector pitch "
                               "(DICOM or calibration file).", small))
    if content.angle_sensitivity_lines:
        story.append(Paragraph(
            "A view whose recorded angle about the patient's long axis is wrong cannot be recognised in the "
            "radiographs: another femur explains both as well. Per degree of such an error the reconstruction "
            "would move by: " + _escape("; ".join(content.angle_sensitivity_lines)) + ".", small))

    if content.reconstruction is not None:
        story += section("3D reconstruction", picture(content.reconstruction, 110 * mm),
                         Paragraph(_escape(content.reconstruction.caption), small))
    if content.plan is not None:
        story += _plan_story(content.plan, section, table, picture, picture_grid, page_width, small, cell)
    if content.landmark_rows:
        story += section("Landmarks (world LPS)", table([("Landmark", "Position (x, y, z)", "Unit"),
                                                          *content.landmark_rows],
                                                         [60 * mm, page_width - 80 * mm, 20 * mm]))
    rows = [("View", "Calibration source", "Image (sha256)", "Mask")]
    for view in content.views:
        rows.append((
            view.get("name", ""),
            _calibration_text(view.get("calibration") or {}),
            Paragraph(f"{_escape(view.get('image', ''))}<br/>{_escape(view.get('image_sha256', ''))}", mono),
            Paragraph(f"{_escape(view.get('mask_source', ''))}, "
                      f"{'confirmed' if view.get('mask_confirmed') else 'NOT confirmed'}<br/>"
                      f"{_escape(view.get('mask_png_sha256', ''))}", mono),
        ))
    story += section("Inputs", table(rows, [20 * mm, 45 * mm, (page_width - 65 * mm) / 2,
                                            (page_width - 65 * mm) / 2]))
    story += section("Software", table([("HipAtlas version", content.software_version), *content.model_lines],
                                       [45 * mm, page_width - 45 * mm], header=False))
    if content.warnings:
        story += section("Warnings", *[Paragraph("\u2022 " + _escape(w), cell) for w in content.warnings])
    sign = table([["Reviewed and approved by (surgeon)", ""], ["Date and time", ""], ["Signature", ""]],
                 [70 * mm, page_width - 70 * mm], header=False,
                 style_extra=[("BOTTOMPADDING", (0, 0), (-1, -1), 14), ("TOPPADDING", (0, 0), (-1, -1), 10)])
    story.append(KeepTogether([Paragraph("Approval", heading), sign,
                               Paragraph("The plan is valid only when approved and signed by the responsible "
                                         "surgeon.", small)]))
    return story


def _plan_story(plan, section, table, picture, picture_grid, page_width, small, cell) -> list[Any]:
    """The "Implant plan" section: implants, the table of changes, warnings, both radiographs with
    the outlines and the 3D picture (the helpers are :func:`_story`'s)."""
    from reportlab.lib.units import mm
    from reportlab.platypus import CondPageBreak, KeepTogether, Paragraph

    # the implants and the table of changes start the plan together, on a new page if need be
    story = [CondPageBreak(140 * mm), *section("Implant plan", table([("Implant", "Choice"), *plan.implant_rows],
                                                                     [32 * mm, page_width - 32 * mm]))]
    story.append(KeepTogether([  # the table of changes is read as a whole: never split across pages
        table([("Change", "Value"), *plan.change_rows], [75 * mm, 30 * mm]),
        Paragraph("Shifts: + = medial, superior, anterior. Leg length at the femur: the head centre's height "
                  "change relative to the lesser trochanter; at the hip: with the cup's shift of the centre of "
                  "rotation. Definitions: docs/templating.md.", small)]))
    for warning in plan.warnings:
        story.append(Paragraph("Plan warning: " + _escape(warning), cell))
    if plan.radiographs:
        story += section("Implant plan on the radiographs", picture_grid(plan.radiographs, 95 * mm))
    if plan.picture_3d is not None:
        story += section("Implant plan in 3D", picture(plan.picture_3d, 110 * mm),
                         Paragraph(_escape(plan.picture_3d.caption), small))
    return story


def write_planning_report(path: str | os.PathLike, content: ReportContent) -> pathlib.Path:
    """Write the report as a PDF at ``path`` (through a temporary file and a rename)."""
    from reportlab.lib import colors
    from reportlab.lib.pagesizes import A4
    from reportlab.lib.units import mm
    from reportlab.platypus import SimpleDocTemplate

    story = _story(content)
    notice = content.notice
    patient_line = ("anonymised" if content.anonymised else
                    " \u2022 ".join(x for x in (content.patient.name, content.patient.patient_id) if x)) or content.case_label

    def banner(canvas, doc):
        # Drawn on every page, so no printed page can be separated from the notice and the patient.
        canvas.saveState()
        canvas.setFillColor(colors.HexColor("#B3261E"))
        canvas.rect(0, A4[1] - 12 * mm, A4[0], 12 * mm, stroke=0, fill=1)
        canvas.setFillColor(colors.white)
        canvas.setFont("Helvetica-Bold", 11)
        canvas.drawCentredString(A4[0] / 2, A4[1] - 8 * mm, notice)
        canvas.setFillColor(colors.grey)
        canvas.setFont("Helvetica", 7)
        canvas.drawString(18 * mm, 8 * mm, f"HipAtlas {content.software_version} \u2022 {patient_line} \u2022 "
                                           f"{content.side} hip \u2022 {content.created}")
        canvas.drawRightString(A4[0] - 18 * mm, 8 * mm, f"page {doc.page}")
        canvas.restoreState()

    final = pathlib.Path(path)
    with atomic_file(final, ".pdf") as tmp:
        document = SimpleDocTemplate(str(tmp), pagesize=A4, topMargin=18 * mm, bottomMargin=15 * mm,
                                     leftMargin=18 * mm, rightMargin=18 * mm, title=content.title,
                                     author="HipAtlas", subject=notice,
                                     # Uncompressed page streams: the text stays greppable (audits
                                     # and the anonymisation test search it); images are compressed
                                     # on their own, so the file stays small.
                                     pageCompression=0)
        document.build(story, onFirstPage=banner, onLaterPages=banner)
    return final
