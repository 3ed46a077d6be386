"""Entry point of the ``hipatlas`` command: the inference subcommands plus ``gui``.

The GUI subcommand lives here, not in ``inference``, because ``inference`` never imports Qt.
"""

from __future__ import annotations

import argparse
import sys

from inference import cli as inference_cli


def _add_gui(subparsers: argparse._SubParsersAction) -> None:
    gui = subparsers.add_parser("gui", help="open the planning workstation window")
    gui.add_argument("case_dir", nargs="?", help="case folder or project file to open")
    gui.add_argument("--demo", action="store_true", help="open the bundled demo case")
    gui.add_argument("--screenshot", metavar="PATH", help="save a screenshot of the window after registering")
    gui.add_argument("--quit-after-register", action="store_true",
                     help="confirm masks, register, (screenshot,) and exit: for smoke tests and docs")
    gui.set_defaults(handler=_run_gui)


def _add_report(subparsers: argparse._SubParsersAction) -> None:
    report = subparsers.add_parser(
        "report", help="write the PDF planning report of a registration output folder",
        description="Render the planning report of OUT_DIR (measurements, annotated radiographs, 3D picture, "
        "calibration, patient, approval field, and the implant plan of OUT_DIR/plan when there is one) "
        "off-screen into a PDF.")
    report.add_argument("out_dir", metavar="OUT_DIR", help="output folder of hipatlas register")
    report.add_argument("--out", required=True, metavar="REPORT.pdf", help="PDF file to write")
    report.add_argument("--patient-json", metavar="FILE",
                        help="JSON object with name, patient_id, birth_date, study_date, acquisition_date, "
                        "institution, accession_number, surgeon (overrides the DICOM headers)")
    report.add_argument("--landmarks", metavar="FILE",
                        help="landmarks JSON {name: [x, y, z] mm} (default: OUT_DIR/landmarks.json if present)")
    report.add_argument("--case", metavar="CASE_DIR", help="case folder (default: the one named in OUT_DIR/report.json)")
    report.add_argument("--surgeon", help="surgeon's name (also settable in --patient-json)")
    report.add_argument("--units", choices=("mm", "cm"), default="mm", help="length units (default mm)")
    report.add_argument("--plan", metavar="PLAN", help="implant plan folder of `hipatlas plan` "
                        "(default: OUT_DIR/plan if present)")
    report.add_argument("--implants", metavar="DIR", action="append", default=[],
                        help="implant template folder of the plan (repeatable; default: the shipped library)")
    report.set_defaults(handler=_run_report)


def _run_report(args: argparse.Namespace) -> int:
    from app.report import report_for_output_dir  # Qt-free; VTK renders off-screen

    written = report_for_output_dir(args.out_dir, args.out, case_dir=args.case, patient_json=args.patient_json,
                                    landmarks=args.landmarks, surgeon=args.surgeon, units=args.units,
                                    plan_dir=args.plan, implant_folders=args.implants)
    print(written)
    return 0


def _run_gui(args: argparse.Namespace) -> int:
    from app.main import run_gui  # Qt is imported only when the window is wanted

    return run_gui(args)


#: The subcommands that live in ``app`` (they need Qt or VTK), added to the inference CLI's.
APP_SUBCOMMANDS = (_add_gui, _add_report)


def main(argv=None) -> int:
    import multiprocessing

    # The GUI runs registration in a spawned process; frozen (PyInstaller) builds need this.
    multiprocessing.freeze_support()
    if argv is None and sys.argv[1:2] == ["register"]:
        # a registration process never plots: spare it Keras's import of matplotlib.pyplot
        from inference.cli_commands import skip_pyplot_import

        skip_pyplot_import()
    return inference_cli.run(argv, extra=APP_SUBCOMMANDS)


if __name__ == "__main__":
    sys.exit(main())
