"""What the workstation can export, declared once: one writer per row of :data:`EXPORT_WRITERS`.

Each writer has the key of its :class:`app.session.ExportOptions` field, the label of its check
box in the Export step, and a function ``write(session, folder, context) -> {kind: file name}``
that writes its files into ``folder`` (the export's temporary folder: :meth:`Session.export`
publishes all files together or none). Adding a format means one row, one function, one test.
Qt-free.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import TYPE_CHECKING, Any, Callable

from inference import io

if TYPE_CHECKING:  # pragma: no cover
    from app.session import ExportOptions, Session


@dataclasses.dataclass(frozen=True)
class ExportContext:
    """What the writers of one export share."""

    options: "ExportOptions"
    provenance: dict[str, Any]


def write_surface(session: "Session", folder: pathlib.Path, context: ExportContext) -> dict[str, str]:
    return {"surface_stl": session._copy_output("femur_surface", folder / "femur_surface.stl")}


def write_nifti(session: "Session", folder: pathlib.Path, context: ExportContext) -> dict[str, str]:
    written = {"labels_nifti": session._copy_output("femur_labels", folder / "femur_labels.nii.gz")}
    if "warped_atlas" in session.result.files:
        written["atlas_nifti"] = session._copy_output("warped_atlas", folder / "warped_atlas.nii.gz")
    return written


def write_measurements_json(session: "Session", folder: pathlib.Path, context: ExportContext) -> dict[str, str]:
    document = dict(session.measurements)
    document["landmarks_mm"] = session.landmarks_mm
    document["provenance"] = context.provenance
    return {"measurements_json": io.write_json_atomic(folder / "measurements.json", document).name}


def write_measurements_csv(session: "Session", folder: pathlib.Path, context: ExportContext) -> dict[str, str]:
    return {"measurements_csv": session._write_csv(folder / "measurements.csv").name}


def write_pdf_report(session: "Session", folder: pathlib.Path, context: ExportContext) -> dict[str, str]:
    from app import report  # the report renders its own pictures off-screen (app/report.py)

    content = session.report_content(context.options, context.provenance)
    return {"pdf_report": report.write_planning_report(folder / "planning_report.pdf", content).name}


def write_plan(session: "Session", folder: pathlib.Path, context: ExportContext) -> dict[str, str]:
    """The implant plan of the Template step as ``plan/`` (plan.json and the implants as STL, the
    folder ``hipatlas plan`` writes; ``hipatlas report`` on the export finds it); nothing without a plan."""
    from app.plan_report import PLAN_FOLDER, session_plan
    from inference.templating.plan import write_plan as write_plan_folder

    planned = session_plan(session)
    if planned is None:
        return {}
    write_plan_folder(folder / PLAN_FOLDER, *planned)
    return {"plan": PLAN_FOLDER}


@dataclasses.dataclass(frozen=True)
class ExportWriter:
    key: str     # the ExportOptions field that turns it on
    label: str   # the check box in the Export step
    write: Callable[["Session", pathlib.Path, ExportContext], dict[str, str]]


EXPORT_WRITERS = (
    ExportWriter("surface_stl", "Femur surface (STL)", write_surface),
    ExportWriter("nifti", "Label map and warped atlas (NIfTI)", write_nifti),
    ExportWriter("measurements_json", "Measurements (JSON)", write_measurements_json),
    ExportWriter("measurements_csv", "Measurements (CSV)", write_measurements_csv),
    ExportWriter("pdf_report", "Planning report (PDF)", write_pdf_report),
    ExportWriter("plan", "Implant plan (JSON and STL, when planned)", write_plan),
)
