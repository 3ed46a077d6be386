"""Two steps of ``tools/eval_cases.py`` compared case by case (paired), e.g. one network pass against the
shift ensemble.

Reads eval_cases ``.json`` reports that registered every case with both variants and prints, per
report and over all, for each metric: the cases, both means, the mean paired difference (B - A),
its smallest and largest value, and in how many cases B was better, worse or equal (to the
report's 3 decimals; for ``dice`` higher is better, for distances lower). ``--markdown PATH``
writes the same as a table; ``--json`` ends with one JSON line.

    .venv/bin/python tools/eval_cases.py --cases 8 --seed 2024 --assd --variants fullres,ensemble --out OUT --name orth
    .venv/bin/python tools/paired_variants.py OUT/orth.json --a fullres --b ensemble

Or the same step in two sets of reports of the same cases (e.g. two models), paired report by
report and case by case::

    .venv/bin/python tools/paired_variants.py OLD/orth_seed7.json --against NEW/orth_seed7.json --a ensemble-auto
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import statistics
import sys

#: Metrics compared, and whether a higher value is better.
METRICS = {"dice": True, "assd_mm": False, "hd95_mm": False, "dice_surface": True, "assd_surface_mm": False,
           "shaft_dice": True, "abs_femoral_offset_error_mm": False}


def _by_case(report: dict) -> dict[tuple, dict[str, dict]]:
    by_key: dict[tuple, dict[str, dict]] = {}
    for row in report["rows"]:
        if "error" not in row:
            key = (row["sample_index"], row.get("lat_angle_error_deg", 0.0))
            by_key.setdefault(key, {})[row["variant"]] = row
    return by_key


def pairs(report: dict, a: str, b: str) -> list[tuple[dict, dict]]:
    """(row of A, row of B) per case and LAT angle error that has both, in case order."""
    return [(v[a], v[b]) for _, v in sorted(_by_case(report).items()) if a in v and b in v]


def cross_pairs(report_a: dict, report_b: dict, variant: str) -> list[tuple[dict, dict]]:
    """(row of report A, row of report B) of ``variant`` per case that both have, in case order;
    the reports must be of the same cases (seed, subject and case plans)."""
    for key in ("seed", "subject", "vary", "view_separation_deg", "shaft_mm"):
        if report_a.get(key) != report_b.get(key):
            raise SystemExit(f"the reports are not of the same cases: {key} {report_a.get(key)!r} against "
                             f"{report_b.get(key)!r}")
    by_a, by_b = _by_case(report_a), _by_case(report_b)
    return [(by_a[k][variant], by_b[k][variant]) for k in sorted(by_a)
            if k in by_b and variant in by_a[k] and variant in by_b[k]]


def compare(rows: list[tuple[dict, dict]], metric: str, higher_is_better: bool) -> dict | None:
    """The paired summary of one metric (None when no pair has it)."""
    values = [(ra[metric], rb[metric]) for ra, rb in rows
              if isinstance(ra.get(metric), float) and isinstance(rb.get(metric), float)
              and math.isfinite(ra[metric]) and math.isfinite(rb[metric])]
    if not values:
        return None
    deltas = [round(vb, 3) - round(va, 3) for va, vb in values]
    sign = 1.0 if higher_is_better else -1.0
    return {"cases": len(values), "mean_a": statistics.fmean(v[0] for v in values),
            "mean_b": statistics.fmean(v[1] for v in values),
            "mean_delta": statistics.fmean(vb - va for va, vb in values), "min_delta": min(deltas),
            "max_delta": max(deltas), "better": sum(sign * d > 1e-9 for d in deltas),
            "worse": sum(sign * d < -1e-9 for d in deltas), "equal": sum(abs(d) <= 1e-9 for d in deltas)}


def study(paths: list[pathlib.Path], a: str, b: str, against: list[pathlib.Path] | None = None) -> dict:
    """Variant ``a`` against ``b`` in each report; with ``against``, variant ``a`` of each report
    against the same variant of its partner in ``against`` (labelled A and B)."""
    if against is not None and len(against) != len(paths):
        raise SystemExit(f"--against needs one report per report compared ({len(paths)}), not {len(against)}")
    load = lambda path: json.loads(path.read_text(encoding="utf-8"))  # noqa: E731
    sets, everything = [], []
    for index, path in enumerate(paths):
        rows = pairs(load(path), a, b) if against is None else cross_pairs(load(path), load(against[index]), a)
        everything += rows
        name = path.name if against is None else f"{path.name} / {against[index].name}"
        sets.append({"report": name, "metrics": {m: compare(rows, m, h) for m, h in METRICS.items()}})
    overall = {m: compare(everything, m, h) for m, h in METRICS.items()}
    labels = (a, b) if against is None else (f"A {a}", f"B {a}")
    return {"a": labels[0], "b": labels[1], "sets": sets, "overall": overall}


def markdown(result: dict) -> str:
    a, b = result["a"], result["b"]
    lines = [f"| report | metric | cases | {a} | {b} | mean {b} - {a} | range | {b} better / worse / equal |",
             "|---|---|---|---|---|---|---|---|"]
    for name, metrics in [*((s["report"], s["metrics"]) for s in result["sets"]), ("all", result["overall"])]:
        for metric, entry in metrics.items():
            if entry:
                lines.append(f"| {name} | {metric} | {entry['cases']} | {entry['mean_a']:.3f} | {entry['mean_b']:.3f} | "
                             f"{entry['mean_delta']:+.4f} | {entry['min_delta']:+.3f} to {entry['max_delta']:+.3f} | "
                             f"{entry['better']} / {entry['worse']} / {entry['equal']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reports", nargs="+", type=pathlib.Path, help="eval_cases .json reports")
    parser.add_argument("--a", default="fullres", help="the reference variant (default fullres)")
    parser.add_argument("--b", default="ensemble", help="the variant compared with it (default ensemble)")
    parser.add_argument("--against", nargs="+", type=pathlib.Path, metavar="REPORT",
                        help="reports B of the same cases, one per report A in the same order: compare "
                        "variant --a of A with the same variant of B")
    parser.add_argument("--markdown", type=pathlib.Path, help="also write the table to this file")
    parser.add_argument("--json", action="store_true", help="end with one line of JSON")
    args = parser.parse_args(argv)
    result = study(args.reports, args.a, args.b, args.against)
    table = markdown(result)
    print(table, end="")
    if args.markdown:
        args.markdown.write_text(table, encoding="utf-8")
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
