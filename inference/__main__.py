"""``python -m inference ARGS`` = ``hipatlas ARGS`` without the GUI (used by training recipes)."""

import sys

from inference.cli import main

if __name__ == "__main__":
    sys.exit(main())
