"""The PDF planning report (reportlab), without Qt.

One A4 document: a "research use only" banner on every page, the case and its side, the
measurements, the landmarks, screenshots of the views, per view the calibration source and input
checksums, the software and model versions and the registration warnings.
"""

from __future__ import annotations

import dataclasses
import io
import os
import pathlib
import tempfile
from typing import Any, Sequence

__all__ = ["ReportContent", "write_planning_report"]


@dataclasses.dataclass(frozen=True)
class ReportContent:
    """Everything the report shows (already formatted and, if asked for, anonymised)."""

    title: str
    notice: str
    created: str
    case_lines: Sequence[tuple[str, str]]
    measurement_rows: Sequence[tuple[str, str, str]]
    landmark_rows: Sequence[tuple[str, str, str]]
    landmarks_edited: bool
    views: Sequence[dict[str, Any]]
    software_version: str
    model_lines: Sequence[tuple[str, str]]
    warnings: Sequence[str]
    screenshots: Sequence[tuple[str, bytes]]   # (caption, PNG bytes)
    measurement_notes: Sequence[str] = ()      # caveats of values marked (!) (inference.measure.caveat_lines)


def _escape(text: Any) -> str:
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _calibration_text(calibration: dict[str, Any]) -> str:
    source = calibration.get("source", "unknown")
    details = [f"{k}: {v}" for k, v in calibration.items()
               if k not in ("source", "view", "tags_used", "warnings") and not isinstance(v, (dict, list))]
    return source + (f" ({'; '.join(details)})" if details else "")


def _current_umask() -> int:
    # /proc tells the umask without changing it; os.umask() can only read it by setting it,
    # which would briefly affect files created by other threads.
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def permissions_like_open(path: str | os.PathLike) -> None:
    """Give a file made by ``mkstemp`` (mode 0600) the mode a plain ``open()`` would (umask)."""
    os.chmod(path, 0o666 & ~_current_umask())


def write_planning_report(path: str | os.PathLike, content: ReportContent) -> pathlib.Path:
    """Write the report as a PDF at ``path`` (through a temporary file and a rename)."""
    from reportlab.lib import colors
    from reportlab.lib.pagesizes import A4
    from reportlab.lib.styles import ParagraphStyle, getSampleStyleSheet
    from reportlab.lib.units import mm
    from reportlab.lib.utils import ImageReader
    from reportlab.platypus import Image, KeepTogether, Paragraph, SimpleDocTemplate, Spacer, Table, TableStyle

    styles = getSampleStyleSheet()
    small = ParagraphStyle("small", parent=styles["BodyText"], fontSize=8, leading=10)
    mono = ParagraphStyle("mono", parent=small, fontName="Courier", fontSize=7, leading=9)
    cell = ParagraphStyle("cell", parent=styles["BodyText"], fontSize=9, leading=11)
    page_width = A4[0] - 36 * mm

    def table(rows, widths, header=True):
        data = [[Paragraph(_escape(c), cell) if not isinstance(c, Paragraph) else c for c in row] for row in rows]
        t = Table(data, colWidths=widths, hAlign="LEFT")
        style = [("GRID", (0, 0), (-1, -1), 0.25, colors.HexColor("#B0B7C3")),
                 ("VALIGN", (0, 0), (-1, -1), "TOP"),
                 ("TOPPADDING", (0, 0), (-1, -1), 2), ("BOTTOMPADDING", (0, 0), (-1, -1), 2)]
        if header:
            style += [("BACKGROUND", (0, 0), (-1, 0), colors.HexColor("#E6EAF0"))]
        t.setStyle(TableStyle(style))
        return t

    story: list[Any] = [Paragraph(_escape(content.title), styles["Title"]),
                        Paragraph(f"Created {_escape(content.created)}", small), Spacer(1, 4 * mm)]
    story.append(table([[k, v] for k, v in content.case_lines], [45 * mm, page_width - 45 * mm], header=False))
    story.append(Spacer(1, 4 * mm))

    story.append(Paragraph("Measurements", styles["Heading2"]))
    story.append(table([("Quantity", "Value", "Unit"), *content.measurement_rows],
                       [85 * mm, page_width - 105 * mm, 20 * mm]))
    story.append(Paragraph("Values are shown \u00b1 one standard uncertainty; definitions, sources and the "
                           "uncertainty model are in docs/measurements.md.", small))
    for note in content.measurement_notes:
        story.append(Paragraph(f"(!) {_escape(note)}", small))
    if content.landmarks_edited:
        story.append(Paragraph("Landmarks were moved by the user after registration; the measurements "
                               "were recomputed from the moved landmarks.", small))
    if content.landmark_rows:
        story.append(Paragraph("Landmarks (world LPS)", styles["Heading3"]))
        story.append(table([("Landmark", "Position (x, y, z)", "Unit"), *content.landmark_rows],
                           [60 * mm, page_width - 80 * mm, 20 * mm]))

    if content.screenshots:
        story.append(Paragraph("Views", styles["Heading2"]))
        for caption, png in content.screenshots:
            reader = ImageReader(io.BytesIO(png))
            width_px, height_px = reader.getSize()
            width = min(page_width, 170 * mm)
            height = width * height_px / max(width_px, 1)
            if height > 110 * mm:
                width, height = width * 110 * mm / height, 110 * mm
            story.append(KeepTogether([Image(io.BytesIO(png), width=width, height=height),
                                       Paragraph(_escape(caption), small), Spacer(1, 3 * mm)]))

    story.append(Paragraph("Inputs and calibration", styles["Heading2"]))
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
    story.append(table(rows, [20 * mm, 45 * mm, (page_width - 65 * mm) / 2, (page_width - 65 * mm) / 2]))

    story.append(Paragraph("Software", styles["Heading2"]))
    story.append(table([("HipAtlas version", content.software_version), *content.model_lines],
                       [45 * mm, page_width - 45 * mm], header=False))
    if content.warnings:
        story.append(Paragraph("Warnings", styles["Heading2"]))
        for warning in content.warnings:
            story.append(Paragraph("\u2022 " + _escape(warning), cell))

    notice = content.notice

    def banner(canvas, doc):
        # Drawn on every page, so no printed page can be separated from the notice.
        canvas.saveState()
        canvas.setFillColor(colors.HexColor("#B3261E"))
        canvas.rect(0, A4[1] - 12 * mm, A4[0], 12 * mm, stroke=0, fill=1)
        canvas.setFillColor(colors.white)
        canvas.setFont("Helvetica-Bold", 11)
        canvas.drawCentredString(A4[0] / 2, A4[1] - 8 * mm, notice)
        canvas.setFillColor(colors.grey)
        canvas.setFont("Helvetica", 7)
        canvas.drawString(18 * mm, 8 * mm, f"HipAtlas {content.software_version}")
        canvas.drawRightString(A4[0] - 18 * mm, 8 * mm, f"page {doc.page}")
        canvas.restoreState()

    final = pathlib.Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".pdf", dir=final.parent)
    os.close(fd)
    try:
        document = SimpleDocTemplate(tmp, pagesize=A4, topMargin=20 * mm, bottomMargin=15 * mm,
                                     leftMargin=18 * mm, rightMargin=18 * mm, title=content.title,
                                     author="HipAtlas", subject=notice,
                                     # Uncompressed page streams: the text stays greppable (audits
                                     # and the anonymisation test search it); images are compressed
                                     # on their own, so the file stays small.
                                     pageCompression=0)
        document.build(story, onFirstPage=banner, onLaterPages=banner)
        permissions_like_open(tmp)
        os.replace(tmp, final)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise
    return final
