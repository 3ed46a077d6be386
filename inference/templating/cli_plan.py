"""``hipatlas plan CASE_OUT --out PLAN``: the automatic implant plan of a registration, headless."""

from __future__ import annotations

import argparse
import json
import pathlib
import sys


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "plan", help="automatic hip implant plan of a registration output folder",
        description="Choose and place a stem and a cup from a `hipatlas register` output folder; write "
                    "PLAN/plan.json (plan, changes, warnings) and the implants as STL (world mm).")
    p.add_argument("case_out", type=pathlib.Path, help="output folder of `hipatlas register`")
    p.add_argument("--out", type=pathlib.Path, required=True,
                   help="plan folder to create (CASE_OUT/plan: `hipatlas report CASE_OUT` then prints the plan)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing plan folder")
    p.add_argument("--implants", type=pathlib.Path, action="append", default=None,
                   help="template folder (repeatable; default: the shipped generic library)")
    p.add_argument("--stem-family", default=None, help="stem family id (default: the first in the library)")
    p.add_argument("--cup-family", default=None, help="cup family id (default: the first in the library)")
    p.add_argument("--inclination", type=float, default=40.0, help="cup inclination, deg (default 40)")
    p.add_argument("--anteversion", type=float, default=20.0, help="cup anteversion, deg (default 20)")
    p.set_defaults(handler=_plan)


def _plan(args: argparse.Namespace) -> int:
    from inference.templating.library import load_library
    from inference.templating.plan import plan_case_out, write_plan

    library = load_library(*(args.implants or ()))
    native, placed = plan_case_out(args.case_out, library=library, stem_family=args.stem_family,
                                   cup_family=args.cup_family, cup_inclination_deg=args.inclination,
                                   cup_anteversion_deg=args.anteversion)
    doc = write_plan(args.out, native, placed, case_out=str(args.case_out), overwrite=args.overwrite)
    print(json.dumps({"implants": doc["implants"], "changes": doc["changes"]}, indent=2))
    for warning in doc["changes"]["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"plan written to {args.out.resolve()}", file=sys.stderr)
    return 0
