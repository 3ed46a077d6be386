"""Make the README's pictures from the demo case: the workstation's AP radiograph with the measurement
graphics (docs/radiograph-graphics.png), the Template step with the automatic implant plan
(docs/template.png), and the first page and the implant plan's page of the planning report the
workstation exports (docs/report-page1.png, docs/report-plan.png).

Runs the real workflow in the window (open the demo, confirm the masks, register in the child
process, Export) under the current display; headless: ``xvfb-run -a -s "-screen 0 1600x1000x24"
python tools/docs_figures.py``. Needs poppler-utils (pdftoppm) for the report page.
"""

from __future__ import annotations

import argparse
import pathlib
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs"), help="folder for the PNGs (default docs/)")
    parser.add_argument("--width", type=int, default=900, help="width of the report page PNG in pixels")
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from PySide6.QtCore import QEventLoop, QSettings, Qt, QTimer
    from PySide6.QtWidgets import QApplication

    app = QApplication.instance() or QApplication(sys.argv[:1])
    from app.main import DEMO_CASE
    from app.main_window import MainWindow
    from app.settings import Settings

    work = pathlib.Path(tempfile.mkdtemp(prefix="hipatlas-docs-"))
    settings = Settings(QSettings(str(work / "settings.ini"), QSettings.Format.IniFormat))
    settings.recovery_dir = work / "recovery"
    settings.autosave_minutes = 0
    window = MainWindow(settings, interactive=False)
    window.resize(1600, 1000)
    window.show()
    if not window.open_path(DEMO_CASE):
        print("cannot open the demo case", file=sys.stderr)
        return 1
    for index in range(len(window.session.views)):
        window.set_mask_confirmed(index, True)
    loop = QEventLoop()
    outcome = {}
    window.registration_finished.connect(lambda result: (outcome.setdefault("result", result), loop.quit()))
    QTimer.singleShot(600_000, loop.quit)
    if not window.start_registration():
        return 1
    loop.exec()
    if outcome.get("result") != "finished":
        print(f"registration did not finish: {outcome.get('result')}; {window.errors}", file=sys.stderr)
        return 1

    window.go_to_step("Measure")
    window.viewers.setCurrentIndex(0)
    panel = window.radiograph_panels[0]
    window.radiograph_panels[1].hide()       # the AP view alone, zoomed to the hip
    app.processEvents()
    window.review_step.show_masks.setChecked(False)
    panel.view._fit_pending = False          # keep this zoom when the layout settles
    hip = panel.view.graphics_rect()
    margin = 0.25 * max(hip.width(), hip.height())
    panel.view.fitInView(hip.adjusted(-margin, -margin, margin, margin), Qt.AspectRatioMode.KeepAspectRatio)
    app.processEvents()
    picture = panel.grab().toImage()
    picture = picture.scaledToWidth(min(picture.width(), 900), Qt.TransformationMode.SmoothTransformation)
    radiograph_png = out / "radiograph-graphics.png"
    picture.save(str(radiograph_png))
    template_png = template_step_picture(app, window, out / "template.png")

    written = window.export_step.export_to(work / "export")
    if not written:
        print(f"export failed: {window.errors}", file=sys.stderr)
        return 1
    stem = work / "page"
    subprocess.run(["pdftoppm", "-png", "-f", "1", "-l", "1", "-scale-to-x", str(args.width), "-scale-to-y", "-1",
                    str(written["pdf_report"]), str(stem)], check=True)
    page = next(work.glob("page*.png"))
    report_png = out / "report-page1.png"
    report_png.write_bytes(page.read_bytes())
    plan_png = report_page_picture(written["pdf_report"], "Implant plan", out / "report-plan.png", args.width)
    window.close()
    window.shutdown()
    print(radiograph_png)
    print(template_png)
    print(report_png)
    print(plan_png)
    return 0


def report_page_picture(pdf: pathlib.Path, heading: str, path: pathlib.Path, width: int) -> pathlib.Path:
    """The first page of the report whose text has a line ``heading``, as a PNG ``width`` wide."""
    pages = subprocess.run(["pdftotext", "-layout", str(pdf), "-"], capture_output=True, encoding="utf-8",
                           check=True).stdout.split("\f")
    number = next(i for i, text in enumerate(pages, 1) if heading in (line.strip() for line in text.splitlines()))
    stem = path.with_suffix("")
    subprocess.run(["pdftoppm", "-png", "-singlefile", "-f", str(number), "-l", str(number), "-scale-to-x", str(width),
                    "-scale-to-y", "-1", str(pdf), str(stem)], check=True)
    return path


def template_step_picture(app, window, path: pathlib.Path) -> pathlib.Path:
    """The window on the Template step: the automatic plan, the bone clipped at the neck plane and
    seen from the front, both radiographs zoomed to the implants' outlines."""
    import time

    window.go_to_step("Template")
    panel = window.template_panel
    deadline = time.monotonic() + 60
    while panel.editor is None and time.monotonic() < deadline:
        app.processEvents()
    if panel.editor is None:
        raise RuntimeError(f"the Template step made no plan: {panel.status.text()}")
    panel.clip_bone.setChecked(True)
    panel.plotter.view_vector((0, -1, 0), viewup=(0, 0, 1))  # from the front (LPS: anterior is -y)
    panel.plotter.reset_camera()
    for _ in range(5):
        app.processEvents()
    panel.zoom_to_implants()
    window.screenshot().save(str(path))
    return path


if __name__ == "__main__":
    sys.exit(main())
