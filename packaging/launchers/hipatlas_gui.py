"""Entry script of the bundled ``hipatlas-gui`` executable (windowed on Windows and macOS).

``hipatlas-gui [CASE_DIR] [--demo] ...`` is ``hipatlas gui [CASE_DIR] [--demo] ...``, so the GUI's
options live in one place (:mod:`app.cli`). ``--self-test`` and ``--version`` are passed to the
command itself, so that the desktop executable can be checked the same way as the console one.
"""

import multiprocessing
import sys

PASSED_THROUGH = ("--self-test", "--version")

if __name__ == "__main__":
    multiprocessing.freeze_support()
    from app.cli import main

    args = sys.argv[1:]
    if args and args[0] in PASSED_THROUGH:
        sys.exit(main(args))
    sys.exit(main(["gui", *args]))
