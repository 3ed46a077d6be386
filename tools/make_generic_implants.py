"""Write the generic implant templates (resources/implants/*.json) from their parametric design.

Usage::

    .venv/bin/python tools/make_generic_implants.py            # into resources/implants
    .venv/bin/python tools/make_generic_implants.py --out DIR

The files are validated on the way out (the same check ``hipatlas plan`` runs on load).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from inference.io import write_json_atomic
from inference.templating.library import (generic_cup_family, generic_stem_family, implants_dir, load_template,
                                          parse_template)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=implants_dir())
    args = parser.parse_args(argv)
    for data in (generic_stem_family(), generic_cup_family()):
        parse_template(data, data["id"])
        path = write_json_atomic(args.out / f"{data['id']}.json", data)
        load_template(path)
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
