"""Entry script of the bundled ``hipatlas`` command (console executable).

Same as the ``hipatlas`` console script of a pip install: :func:`app.cli.main`.
"""

import multiprocessing
import sys

if __name__ == "__main__":
    # A frozen program that starts worker processes must call this first, or each worker would
    # re-run the whole command (PyInstaller, Windows and macOS "spawn").
    multiprocessing.freeze_support()
    from app.cli import main

    sys.exit(main())
