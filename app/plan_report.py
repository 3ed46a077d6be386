"""The implant plan in the PDF report, rendered off-screen from the plan itself (never the screen).

:func:`plan_section` turns a placed plan into the report's "Implant plan" section: the implants
(stem size and neck, head, cup with their diameters and angles), the table of changes with its
warnings (:func:`inference.templating.editor.change_rows`, the rows of the Template step's table),
both radiographs with the implants' outlines projected through each view's ``P`` (drawn with
Pillow), and the femur with the implants in 3D (VTK off-screen, like the report's other 3D picture:
only in a process that has not loaded TensorFlow).

The plan comes from the workstation's session (``session.template_plan``: :func:`session_plan`)
or from the plan folder ``hipatlas plan CASE_OUT --out CASE_OUT/plan`` writes
(:func:`output_dir_plan`); either way its placement and changes are recomputed from the native
hip of the registration by :mod:`inference.templating`, so the report shows the numbers ``hipatlas
plan`` prints. Qt-free.
"""

from __future__ import annotations

import dataclasses
import io as _stdio
import os
import pathlib
from typing import Any, Sequence

import numpy as np

from app.report_figures import RADIOGRAPH_WIDTH_PX

__all__ = ["IMPLANT_COLOURS", "OUTLINE_COLOURS", "PLAN_FOLDER", "ReportPlan", "implant_rows", "plan_radiograph_png",
           "plan_section", "plan_basis", "session_native_hip", "session_plan", "output_dir_plan"]

#: Implant colours in 3D (the Template step and the report).
IMPLANT_COLOURS = {"stem": "#B0BEC5", "head": "#FFD54F", "cup": "#4FC3F7"}
#: Outline colours on the radiographs: saturated, so that they stand out on grey bone.
OUTLINE_COLOURS = {"stem": "#FF7043", "head": "#FFD54F", "cup": "#4FC3F7"}
#: Where a registration output folder keeps its plan (``hipatlas plan OUT --out OUT/plan``; the
#: workstation's export writes it there too), and where ``hipatlas report`` looks for it.
PLAN_FOLDER = "plan"
#: Margin around the implants' outlines when cropping a radiograph (fraction of their extent).
PLAN_CROP_MARGIN = 0.45


@dataclasses.dataclass(frozen=True)
class ReportPlan:
    """The report's plan section, already formatted."""

    implant_rows: Sequence[tuple[str, str]]
    change_rows: Sequence[tuple[str, str]]
    warnings: Sequence[str]
    radiographs: Sequence[Any]          # app.report.ReportFigure, one per view
    picture_3d: Any = None              # app.report.ReportFigure or None


def implant_rows(placed) -> list[tuple[str, str]]:
    """``(item, text)`` rows naming the planned implants, their sizes, diameters, angles and seating."""
    plan = placed.plan
    stem_size, variant = placed.stem.size(plan.stem_size), placed.stem.variant(plan.stem_variant)
    cup_size = placed.cup.size(plan.cup_size)
    return [
        ("Stem", f"{placed.stem.name} ({placed.stem.id}), size {plan.stem_size}, {stem_size.length_mm:g} mm long"),
        ("Neck", f"{plan.stem_variant}, neck-shaft angle {variant.neck_shaft_angle_deg:g}\u00b0"),
        ("Stem seating", f"tip {-plan.stem_tip_height_mm:.1f} mm below the lesser trochanter; "
                         f"version change {plan.stem_version_change_deg:+.0f}\u00b0"),
        ("Head", f"diameter {plan.head_diameter_mm:g} mm, offset {plan.head_offset_mm:+g} mm"),
        ("Cup", f"{placed.cup.name} ({placed.cup.id}), size {plan.cup_size}, outer diameter "
                f"{cup_size.outer_diameter_mm:g} mm"),
        ("Cup angles", f"inclination {plan.cup_inclination_deg:.0f}\u00b0, "
                       f"anteversion {plan.cup_anteversion_deg:.0f}\u00b0 (radiographic)"),
    ]


def plan_radiograph_png(image_rgb: np.ndarray, outlines: dict, *, mm_per_px_at_hip: float | None = None,
                        width_px: int = RADIOGRAPH_WIDTH_PX) -> bytes:
    """A radiograph cropped to the implants with their outlines ``{name: [(M, 2) pixel polygons]}``
    (:func:`inference.templating.plan.implant_outlines`) in :data:`OUTLINE_COLOURS`, a legend and a
    scale bar at the hip, as PNG bytes."""
    from PIL import ImageDraw

    from app.report_figures import _draw_scale_bar, _font, cropped_picture, picture_line_width

    rows, cols = np.asarray(image_rgb).shape[:2]
    polygons = [np.asarray(p, float) for group in outlines.values() for p in group if len(p) >= 3]
    if polygons:
        points = np.concatenate(polygons)
        low, high = points.min(axis=0), points.max(axis=0)
        margin = PLAN_CROP_MARGIN * max(high[0] - low[0], high[1] - low[1])
        box = (max(0, int(np.floor(low[0] - margin))), max(0, int(np.floor(low[1] - margin))),
               min(cols, int(np.ceil(high[0] + margin)) + 1), min(rows, int(np.ceil(high[1] + margin)) + 1))
        if box[2] - box[0] < 2 or box[3] - box[1] < 2:   # the implants lie outside the image
            box = (0, 0, cols, rows)
    else:
        box = (0, 0, cols, rows)
    picture, scale, xy = cropped_picture(image_rgb, box, width_px)
    draw = ImageDraw.Draw(picture)
    line_width, font = picture_line_width(width_px), _font(max(12, width_px // 30))
    for name in ("cup", "stem", "head"):          # the head drawn last, on top of the cup
        for polygon in outlines.get(name, ()):
            if len(polygon) >= 3:
                points = [xy(p) for p in polygon]
                draw.line(points + points[:1], fill=OUTLINE_COLOURS[name], width=line_width, joint="curve")
    y = 0.03 * picture.height
    for name in ("stem", "head", "cup"):
        draw.text((0.03 * picture.width, y), name, fill=OUTLINE_COLOURS[name], font=font, stroke_width=3,
                  stroke_fill="#000000")
        y += font.size * 1.25
    if mm_per_px_at_hip is not None:
        _draw_scale_bar(draw, mm_per_px_at_hip / scale, picture.size, line_width, font)
    buffer = _stdio.BytesIO()
    picture.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def plan_section(case, native, placed, *, surface: tuple[np.ndarray, np.ndarray] | None = None) -> ReportPlan:
    """The report's plan section of a placed plan on a case (its radiographs and projections)."""
    from app import imaging
    from app.report import ReportFigure
    from app.report_figures import render_3d_png
    from inference import graphics
    from inference.templating.editor import change_rows
    from inference.templating.plan import implant_meshes, implant_outlines, plan_changes

    changes = plan_changes(native, placed)
    radiographs = []
    for view in case.views:
        calibration = graphics.view_calibration(view.P, native.hip_centre_mm, graphics.case_view_pixel_mm(view))
        png = plan_radiograph_png(imaging.window_to_uint8(view.image.pixels), implant_outlines(placed, view.P),
                                  mm_per_px_at_hip=calibration.mm_per_px_at_hip)
        radiographs.append(ReportFigure(f"{view.name}: the planned implants' outlines, projected through the "
                                        "view's calibration (stem orange, head yellow, cup blue).", png, 0.49))
    picture_3d = None
    if surface is not None:
        meshes = [(m.vertices, m.faces, IMPLANT_COLOURS[name], 0.6 if name == "cup" else 1.0)
                  for name, m in implant_meshes(placed).items()]
        png = render_3d_png(surface[0], surface[1], {}, {}, case.side, meshes=meshes, bone_opacity=0.3)
        picture_3d = ReportFigure("The plan in 3D (bone see-through), fixed cameras: anterior and lateral. Stem "
                                  "grey, head yellow, cup blue.", png, 1.0)
    return ReportPlan(implant_rows(placed), change_rows(changes), list(changes["warnings"]), radiographs, picture_3d)


#: The measurements a plan is placed on (inference.templating.plan.native_hip_from_measurements).
PLAN_INPUTS = ("side", "hip_centre_mm", "head_radius_mm", "femoral_offset_mm", "shaft_axis", "neck_axis",
               "vertical_offset_mm")


def plan_basis(measurements: dict) -> str:
    """A digest of the measurements a plan rests on: a plan whose recorded basis differs from the
    current measurements' was made before the landmarks moved (the Template step is out of date)."""
    import hashlib
    import json

    inputs = {k: measurements.get(k) for k in PLAN_INPUTS}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]


def session_native_hip(session):
    """The native hip of a registered session: its current measurements and the canal of its result."""
    from inference.templating.plan import native_hip_with_canal

    result = session.result
    return native_hip_with_canal(session.measurements, result.volume, result.labels, result.grid)


def session_plan(session, library=None):
    """``(native, placed)`` of the session's saved plan (``session.template_plan``), or None."""
    if session.result is None or not session.template_plan:
        return None
    from inference.templating.editor import PlanEditor
    from inference.templating.library import load_library
    from inference.templating.plan import Plan

    native = session_native_hip(session)
    editor = PlanEditor(native, library or load_library(), Plan.from_dict(session.template_plan))
    return native, editor.placed


def output_dir_plan(out_dir: str | os.PathLike, plan_dir: str | os.PathLike | None = None,
                    implant_folders: Sequence[str | os.PathLike] = ()):
    """``(native, placed)`` of the plan saved with a registration output folder, or None.

    ``plan_dir``: a plan folder (or its plan.json) written by ``hipatlas plan``; by default
    ``out_dir/plan`` when it exists. The plan's choices are placed on the native hip of ``out_dir``
    (its measurements and warped atlas), with the shipped implant library or ``implant_folders``.
    """
    from inference import io
    from inference.errors import InputFileError
    from inference.templating.editor import PlanEditor
    from inference.templating.library import load_library
    from inference.templating.plan import PLAN_FORMAT, Plan, native_hip_from_case_out

    given = plan_dir is not None
    path = pathlib.Path(plan_dir) if given else pathlib.Path(out_dir) / PLAN_FOLDER
    if path.is_dir():
        path = path / "plan.json"
    if not path.is_file():
        if given:
            raise InputFileError(f"{path}: plan file not found (write one with `hipatlas plan OUT --out PLAN`)")
        return None
    document = io.read_json_object(path, "plan file")
    if document.get("format") != PLAN_FORMAT or not isinstance(document.get("plan"), dict):
        raise InputFileError(f"{path}: not a HipAtlas plan ({PLAN_FORMAT!r} with a \"plan\" object)")
    native = native_hip_from_case_out(out_dir)
    editor = PlanEditor(native, load_library(*implant_folders), Plan.from_dict(document["plan"]))
    return native, editor.placed
