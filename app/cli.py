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


def _run_gui(args: argparse.Namespace) -> int:
    from app.main import run_gui  # Qt is imported only when the window is wanted

    return run_gui(args)


def main(argv=None) -> int:
    import multiprocessing

    # The GUI runs registration in a spawned process; frozen (PyInstaller) builds need this.
    multiprocessing.freeze_support()
    if argv is None and sys.argv[1:2] == ["register"]:
        # a registration process never plots: spare it Keras's import of matplotlib.pyplot
        from inference.cli_commands import skip_pyplot_import

        skip_pyplot_import()
    return inference_cli.run(argv, extra=(_add_gui,))


if __name__ == "__main__":
    sys.exit(main())
