"""Screenshot of the Template step on a registered case (docs/template.png).

Usage (needs an X display; on a headless machine wrap it in ``xvfb-run -a``)::

    hipatlas register resources/demo --out work/demo_out
    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python tools/screenshot_template.py \\
        resources/demo work/demo_out --out docs/template.png
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("case_dir", type=pathlib.Path)
    parser.add_argument("case_out", type=pathlib.Path, help="its `hipatlas register` output folder")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("docs/template.png"))
    parser.add_argument("--size", default="1500x900", help="window size WIDTHxHEIGHT")
    args = parser.parse_args(argv)

    from PySide6.QtWidgets import QApplication

    from app.session import Session, load_result
    from app.template_panel import TemplatePanel

    app = QApplication.instance() or QApplication(["hipatlas-screenshot"])
    session = Session(isolate=False)
    try:
        session.open_case(args.case_dir)
        out = args.case_out
        session.set_result(load_result(
            out, measurements=json.loads((out / "measurements.json").read_text()), landmarks_mm={},
            warnings=[], report=json.loads((out / "report.json").read_text()) if (out / "report.json").is_file() else {},
            files=None, view_names=[v.name for v in session.views]))
        panel = TemplatePanel(session)
        width, height = (int(v) for v in args.size.split("x"))
        panel.resize(width, height)
        panel.show()
        app.processEvents()
        if panel.editor is None and not panel.load():  # showing it loads it
            print(f"cannot plan: {panel.status.text()}", file=sys.stderr)
            return 1
        panel.clip_bone.setChecked(True)
        panel.plotter.view_vector((0, -1, 0), viewup=(0, 0, 1))  # from the front (LPS: anterior is -y)
        panel.plotter.reset_camera()
        for _ in range(5):
            app.processEvents()
        panel.zoom_to_implants()
        app.processEvents()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        panel.grab().save(str(args.out))
        print(f"{args.out}: plan {panel.editor.plan.stem_size} / {panel.editor.plan.cup_size}, "
              f"update {1000 * panel.last_update_s:.0f} ms")
        panel.close_plotter()
    finally:
        session.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
