"""The ``hipatlas`` command line (every subcommand except ``gui``, which lives in ``app.cli``).

Each subcommand is declared by a module-level ``add_parser(subparsers)`` function in the module that
implements it, listed in :data:`SUBCOMMAND_MODULES`. Modules are imported only when the parser is
built, and heavy dependencies (TensorFlow) only inside the handlers, so ``hipatlas --help`` stays fast.

Expected errors (:class:`inference.errors.HipAtlasError`) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Callable, Sequence

from inference import __version__
from inference.errors import Cancelled, HipAtlasError

log = logging.getLogger("hipatlas")

#: Modules that contribute subcommands through ``add_parser(subparsers)``.
SUBCOMMAND_MODULES: tuple[str, ...] = (
    "inference.cli_commands",
    "inference.cli_measure",
    "inference.selftest",
    "inference.train",
    "inference.evaluate",
    "inference.data.cli_data",
    "inference.experiments",
    "inference.cli_pacs",
    "inference.templating.cli_plan",
    "inference.onnx_export",
)

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


def build_parser(extra: Sequence[Callable[[argparse._SubParsersAction], None]] = ()) -> argparse.ArgumentParser:
    """Build the ``hipatlas`` parser; ``extra`` adds subcommands from outside ``inference``."""
    parser = argparse.ArgumentParser(
        prog="hipatlas",
        description="HipAtlas: 3D proximal femur from two calibrated radiographs "
        "(research use only, not for diagnosis).",
    )
    parser.add_argument("--version", action="version", version=f"hipatlas {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    parser.add_argument("--self-test", action="store_true",
                        help="check the installation (resources, demo registration) and exit 0 or 1; "
                        "same as the self-test subcommand")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in SUBCOMMAND_MODULES:
        importlib.import_module(module_name).add_parser(subparsers)
    for add in extra:
        add(subparsers)
    return parser


def _configure_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity == 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if verbosity < 2:
        # TensorFlow's C++ start-up chatter is noise for a clinician running a command.
        import os

        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def run(argv: Sequence[str] | None = None,
        extra: Sequence[Callable[[argparse._SubParsersAction], None]] = ()) -> int:
    """Parse ``argv`` and run the chosen subcommand; returns the process exit status."""
    parser = build_parser(extra)
    args = parser.parse_args(argv)
    _configure_logging(args.verbose)
    if args.self_test and not getattr(args, "handler", None):
        from inference import selftest

        args.handler = selftest.handle
    if not getattr(args, "handler", None):
        parser.print_help()
        return EXIT_BAD_INPUT
    try:
        result = args.handler(args)
    except Cancelled:
        print("hipatlas: cancelled", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("hipatlas: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except ModuleNotFoundError as error:
        if args.debug or error.name not in ("tensorflow", "keras", "tf2onnx", "onnx", "SimpleITK"):
            raise
        # the TensorFlow-free installation (packaging/requirements-onnx.txt) has no training,
        # evaluation, export or refinement, and no SimpleITK (CT import, the baselines)
        missing = "tensorflow (its Keras)" if error.name == "keras" else error.name
        hint = ("registration reads and writes NIfTI/MetaImage without it" if error.name == "SimpleITK"
                else "registration runs with --backend onnx")
        print(f"hipatlas: error: {args.command} needs the package {missing}, which this installation "
              f"does not have ({hint})", file=sys.stderr)
        return EXIT_BAD_INPUT
    except HipAtlasError as error:
        if args.debug:
            raise
        message = " ".join(str(error).split())  # one line, whatever the message holds
        print(f"hipatlas: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return int(result or 0)


def main(argv: Sequence[str] | None = None) -> int:
    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
