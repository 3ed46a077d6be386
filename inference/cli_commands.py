"""Subcommands of ``hipatlas`` implemented in ``inference`` (see :mod:`inference.cli`).

Handlers import their implementation lazily so that ``hipatlas --help`` does not load TensorFlow.
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import sys

log = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    register = subparsers.add_parser(
        "register", help="reconstruct the femur of a case folder",
        description="Register the atlas to a case's two radiographs and write the reconstruction, "
        "measurements, overlays and a report to OUT_DIR (see docs/case-format).")
    register.add_argument("case_dir", nargs="+",
                          help="case folder holding case.json; with several, the model is loaded once "
                          "and each case goes to OUT/<case folder name>, with OUT/cohort.csv")
    register.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    register.add_argument("--model", action="append",
                          help="model folder or .keras file (default: the shipped model, or the models "
                          "resources/models/DEFAULT names); given more than once, the models' fields are averaged")
    register.add_argument("--backend", choices=("auto", "tf", "onnx"),
                          help="who runs the network: TensorFlow, ONNX Runtime, or auto (ONNX Runtime when "
                          "the model has its .onnx and onnxruntime is installed); default $HIPATLAS_BACKEND "
                          "or auto")
    register.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    register.add_argument("--quiet", action="store_true", help="no progress bar")
    register.add_argument("--dicom-out", metavar="DIR",
                          help="also write the results as DICOM in the source study (the case's radiographs must "
                          "be DICOM); see hipatlas dicom-export")
    register.add_argument("--refine", action=argparse.BooleanOptionalAction, default=None,
                          help="test-time refinement on the radiographs: --refine on every case, --no-refine "
                          "never (default: only where the network's femur outline disagrees with a mask, "
                          "or $HIPATLAS_REFINE; see docs/refinement.md)")
    register.add_argument("--auto-refine", action="store_true",
                          help="refine only where the network's femur outline disagrees with a mask (the "
                          "default unless $HIPATLAS_REFINE says otherwise); with TensorFlow only")
    register.add_argument("--self-calibrate", action=argparse.BooleanOptionalAction, default=None,
                          help="with --refine, also estimate the lateral view's pose")
    register.add_argument("--ensemble", action=argparse.BooleanOptionalAction, default=None,
                          help="average the network's field over five placements of the atlas grid, a voxel "
                          "apart (default $HIPATLAS_ENSEMBLE, else on for one model and off when several "
                          "models are averaged; --no-ensemble: one pass per model, about 2.5 s faster; see "
                          "docs/refinement.md)")
    register.add_argument("--shaft-fit", action=argparse.BooleanOptionalAction, default=True,
                          help="fit the reconstructed shaft's cross-sections below the lesser trochanter to the "
                          "masks (default on; --no-shaft-fit keeps the network's shaft; see docs/refinement.md)")
    register.add_argument("--head-anchor", action=argparse.BooleanOptionalAction, default=True,
                          help="where the outline fit is off or made no fit, move the reconstructed femoral head "
                          "onto the head the masks show (default on; --no-head-anchor keeps the network's head; "
                          "see docs/refinement.md)")
    register.add_argument("--outline-fit", action=argparse.BooleanOptionalAction, default=True,
                          help="fit the reconstruction's outlines in both views to the masks by a smooth move "
                          "(default on; --no-outline-fit skips it; see docs/refinement.md)")
    register.add_argument("--network-grid", action="store_true",
                          help="outputs on the network's grid instead of the full-resolution atlas grid")
    register.set_defaults(handler=_register)


def _progress_printer(quiet: bool):
    if quiet or not sys.stderr.isatty():
        return lambda progress: log.info("%3.0f%% %s", 100 * progress.fraction, progress.message)
    from tqdm import tqdm

    bar = tqdm(total=100, unit="%", leave=False, file=sys.stderr)

    def show(progress):
        bar.n = round(100 * progress.fraction)
        bar.set_description(progress.message)
        bar.refresh()
        if progress.fraction >= 1.0:
            bar.close()

    return show


def skip_pyplot_import() -> None:
    """Keep Keras from importing ``matplotlib.pyplot`` in this process.

    Keras imports pyplot when it is installed (pyvista pulls matplotlib in) for plotting helpers
    that registration never uses; that costs 0.5-0.7 s of every ``hipatlas register`` on the
    2-core machine. Only for processes that do not plot: the ``hipatlas register`` process calls
    it at its entry point (not when a test or a script calls the command in its own process).
    """
    if "matplotlib.pyplot" not in sys.modules:
        sys.modules["matplotlib.pyplot"] = None  # a later import raises ImportError, Keras copes


def _register(args: argparse.Namespace) -> int:
    from inference import pipeline

    if len(args.case_dir) > 1:
        if args.dicom_out:
            from inference.errors import InputFileError

            raise InputFileError("--dicom-out takes one case; run hipatlas dicom-export on each case's output")
        return _register_cohort(args)
    refine = args.refine
    if args.auto_refine:
        if args.refine is not None:
            from inference.errors import ConfigError

            raise ConfigError("--auto-refine decides by itself whether to refine; give it without --refine "
                              "or --no-refine")
        refine = "auto"
    result = pipeline.run_to_completion(
        pipeline.register_case(args.case_dir[0], args.out, model=args.model, overwrite=args.overwrite,
                               backend=args.backend, refine=refine, self_calibrate=args.self_calibrate,
                               full_resolution=not args.network_grid, ensemble=args.ensemble,
                               shaft_fit=args.shaft_fit, head_anchor=args.head_anchor,
                               outline_fit=args.outline_fit),
        on_progress=_progress_printer(args.quiet))
    print(json.dumps(result.measurements, indent=2))
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"outputs written to {pathlib.Path(args.out).resolve()}", file=sys.stderr)
    if args.dicom_out:
        from inference import dicom_results

        written = dicom_results.export_results(args.out, args.dicom_out, source=args.case_dir[0],
                                               overwrite=args.overwrite)
        print(f"DICOM results ({', '.join(written)}) written to {pathlib.Path(args.dicom_out).resolve()}",
              file=sys.stderr)
    return 0


def _register_cohort(args: argparse.Namespace) -> int:
    from inference import measure, pipeline

    result = pipeline.run_to_completion(
        pipeline.register_cohort(args.case_dir, args.out, model=args.model, overwrite=args.overwrite,
                                 backend=args.backend, ensemble=args.ensemble, shaft_fit=args.shaft_fit,
                                 head_anchor=args.head_anchor, outline_fit=args.outline_fit),
        on_progress=_progress_printer(args.quiet))
    for row in result.rows:
        if row["status"] == "ok":
            values = ", ".join(f"{m.label.lower()} {measure.format_value(m, row[m.key])}" for m in measure.MEASUREMENTS
                               if m.kind == "scalar" and row.get(m.key) is not None)
            print(f"{row['case']}: ok in {row['time_s']:.1f} s, {values}")
        else:
            print(f"{row['case']}: FAILED: {row['error']}", file=sys.stderr)
    print(f"{len(result.rows) - len(result.failures)} of {len(result.rows)} cases registered; summary in "
          f"{result.summary_csv.resolve()}", file=sys.stderr)
    return 2 if result.failures else 0
