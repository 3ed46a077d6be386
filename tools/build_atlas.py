"""Build the shipped CT atlas (resources/atlas/<grid>/) from the shared bone surfaces.

Usage::

    .venv/bin/python tools/build_atlas.py                 # both grids, reference subject
    .venv/bin/python tools/build_atlas.py --grid compact --subject MC22:right --out /tmp/atlas

The first run builds the subject's distance fields (tens of seconds, then cached in
``.cache/hipatlas``); each grid then takes a few seconds.
"""

from __future__ import annotations

import argparse
import logging
import sys

from inference.data.atlas import GRID_SPECS, REFERENCE_SUBJECT, build_atlas
from inference.errors import HipAtlasError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", choices=sorted(GRID_SPECS) + ["all"], default="all")
    parser.add_argument("--subject", default=REFERENCE_SUBJECT, help="'<subject_id>:<side>' of the shared bones")
    parser.add_argument("--out", default=None, help="folder receiving <grid>/ (default resources/atlas)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    grids = sorted(GRID_SPECS) if args.grid == "all" else [args.grid]
    try:
        for grid in grids:
            build_atlas(grid, args.out, subject=args.subject)
    except HipAtlasError as exc:
        logging.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
