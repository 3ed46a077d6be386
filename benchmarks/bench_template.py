"""Templating speed: the automatic plan of a registration and one live edit (target: 200 ms).

One *edit* is what the Template step recomputes when the surgeon changes a size or a head: the
placement, the table of changes and the implant outlines on both radiographs (the 3D scene's
mesh update is measured by the GUI, not here). The registration output is the analytic test
femur written like `hipatlas register`'s (tests/templating_helpers.py), or ``--case-out DIR``.

    python benchmarks/bench_template.py --json
    python benchmarks/bench_template.py --case-out work/demo_out
    xvfb-run -a python benchmarks/bench_template.py --case-out work/demo_out --gui-case resources/demo

``--gui-case CASE_DIR`` (with the ``--case-out`` of that case; needs an X display) also times the
Template panel from an edit (stem size up/down, head offset, head diameter) until the events it
caused are processed: the above, the table, the 3D scene and its redraw (software OpenGL on a
machine without a GPU), the outlines drawn on both radiographs.
"""

from __future__ import annotations

import pathlib
import sys
import tempfile

if __package__ in (None, ""):
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks._common import BenchReport, parse_args  # noqa: E402


def main(argv=None) -> dict:
    args = parse_args(argv, __doc__.splitlines()[0],
                      extra=lambda p: (p.add_argument("--case-out", type=pathlib.Path, default=None),
                                       p.add_argument("--gui-case", type=pathlib.Path, default=None)))
    root = pathlib.Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "tests"))
    from inference.geometry import CArmView, projection_matrix
    from inference.templating.editor import PlanEditor
    from inference.templating.library import load_library
    from inference.templating.plan import auto_plan, implant_outlines, native_hip_from_case_out

    report = BenchReport("template", json_output=args.json, report=args.report)
    library = load_library()
    with tempfile.TemporaryDirectory() as tmp:
        case_out = args.case_out
        if case_out is None:
            from templating_helpers import analytic_measurements, analytic_volumes, write_case_out

            case_out = write_case_out(pathlib.Path(tmp) / "case_out", *analytic_volumes(), analytic_measurements())
        report.add_timing("read_case_out_s", lambda: native_hip_from_case_out(case_out), args.repeats,
                          "read measurements + volumes, canal profile")
        native = native_hip_from_case_out(case_out)
        report.add_timing("auto_plan_s", lambda: auto_plan(native, library), args.repeats, "automatic plan")
        editor = PlanEditor(native, library)
        views = [projection_matrix(CArmView(sdd_mm=1000, sid_mm=700, lao_deg=a, cranial_deg=0, rows=1500, cols=1200,
                                            pixel_mm=0.3, isocentre_mm=tuple(native.hip_centre_mm))) for a in (0, 90)]
        offsets = list(library.stem(editor.plan.stem_family).head_offsets_mm)
        state = {"i": 0}

        def edit():
            state["i"] += 1
            editor.edit(head_offset_mm=offsets[state["i"] % len(offsets)])
            editor.changes
            for P in views:
                implant_outlines(editor.placed, P)

        report.add_timing("edit_s", edit, max(args.repeats, 10), "one edit: changes + outlines on two views")
        if args.gui_case is not None:
            _gui_update(report, args.gui_case, case_out, max(args.repeats, 10))
    return report.finish()


def _gui_update(report, case_dir: pathlib.Path, case_out: pathlib.Path, repeats: int) -> None:
    import json
    import statistics
    import time

    from PySide6.QtWidgets import QApplication

    from app.session import Session, load_result
    from app.template_panel import TemplatePanel

    app = QApplication.instance() or QApplication(["bench-template"])
    session = Session(isolate=False)
    try:
        session.open_case(case_dir)
        session.set_result(load_result(case_out, measurements=json.loads((case_out / "measurements.json").read_text()),
                                       landmarks_mm={}, warnings=[], report={}, files=None,
                                       view_names=[v.name for v in session.views]))
        panel = TemplatePanel(session)
        panel.resize(1500, 900)
        panel.show()
        app.processEvents()
        stem = panel.library.stem(panel.editor.plan.stem_family)
        # what a surgeon clicks: stem size up / down, head offset, head diameter
        edits = [lambda: panel._step_size(+1), lambda: panel._step_size(-1)]
        edits += [lambda h=h: panel._edit(head_offset_mm=h) for h in stem.head_offsets_mm]
        edits += [lambda d=d: panel._edit(head_diameter_mm=d) for d in stem.head_diameters_mm]
        walls, cpus = [], []
        for i in range(max(repeats, len(edits)) + 1):
            started, started_cpu = time.perf_counter(), time.process_time()
            edits[i % len(edits)]()
            app.processEvents()   # the 3D view's redraw and the radiographs' repaint
            if i:  # the first edit builds the actors
                walls.append(time.perf_counter() - started)
                cpus.append(time.process_time() - started_cpu)
        report.add("gui_update_s", statistics.median(walls), "s",
                   "edit to updated table, outlines and redrawn 3D view (wall, median)")
        report.add("gui_update_cpu_s", statistics.median(cpus), "s",
                   "edit to updated table, outlines and redrawn 3D view (CPU, median)")
        report.add("gui_update_max_s", max(walls), "s", "the same, slowest edit (wall)")
        panel.close_plotter()
    finally:
        session.close()


if __name__ == "__main__":
    main()
