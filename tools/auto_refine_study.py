"""How a gate on the outlines' agreement would have chosen which cases to refine (``--auto-refine``).

Reads ``tools/eval_cases.py`` reports made with ``--variants fullres,refine`` (each case registered
without and with the test-time refinement) and, for a threshold, takes for each case the refined
result when the lowest ``mask_agreement_dice`` of its unrefined output (report.json: the projected
outline against the view's mask) is below the threshold, else the unrefined one: what
``hipatlas register --auto-refine`` does. Prints, per report and over all, the mean and minimum
femur Dice without refinement, gated, and with refinement everywhere, and how many gated cases got
better or worse; ``--json`` ends with one JSON line of the same.

    .venv/bin/python tools/eval_cases.py --cases 8 --seed 99 --assd --variants fullres,refine --out OUT --name orth_99
    .venv/bin/python tools/auto_refine_study.py OUT/*.json --threshold 0.955
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys


def _cases(report: dict) -> dict[int, dict[str, dict]]:
    cases: dict[int, dict[str, dict]] = {}
    for row in report["rows"]:
        if "error" not in row:
            cases.setdefault(row["sample_index"], {})[row["variant"]] = row
    return cases


def study(paths: list[pathlib.Path], threshold: float) -> dict:
    sets, everything = [], {"without": [], "gated": [], "always": []}
    counts = {"cases": 0, "refined": 0, "better": 0, "worse": 0}
    for path in paths:
        report = json.loads(path.read_text(encoding="utf-8"))
        rows = []
        for index, variants in sorted(_cases(report).items()):
            if "fullres" not in variants or "refine" not in variants:
                continue
            without, refined = variants["fullres"], variants["refine"]
            agreement = min(a for a in without["mask_agreement_dice"] if a is not None)
            gate = agreement < threshold
            gated = refined["dice"] if gate else without["dice"]
            rows.append({"case": index, "side": without["side"], "lowest_agreement": agreement, "refined": gate,
                         "dice_without": without["dice"], "dice_refined": refined["dice"], "dice_gated": gated})
            counts["cases"] += 1
            if gate:
                counts["refined"] += 1
                counts["better" if refined["dice"] > without["dice"] else "worse"] += 1
        if not rows:
            continue
        summary = {key: {"mean": statistics.mean(r[f"dice_{key}"] for r in rows),
                         "min": min(r[f"dice_{key}"] for r in rows)}
                   for key in ("without", "gated", "refined")}
        for key, name in (("without", "without"), ("gated", "gated"), ("refined", "always")):
            everything[name] += [r[f"dice_{key}"] for r in rows]
        sets.append({"report": path.name, "command": report.get("command"), "cases": rows, "dice": summary})
    overall = {name: statistics.mean(values) for name, values in everything.items() if values}
    return {"threshold": threshold, "sets": sets, "counts": counts, "mean_dice": overall}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reports", nargs="+", type=pathlib.Path, help="eval_cases .json reports")
    parser.add_argument("--threshold", type=float, default=None,
                        help="refine below this lowest mask agreement (default: the product's, "
                             "inference.refine.AUTO_REFINE_BELOW)")
    parser.add_argument("--json", action="store_true", help="end with one line of JSON")
    args = parser.parse_args(argv)
    if args.threshold is None:
        if __package__ in (None, ""):
            sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
        from inference.refine import AUTO_REFINE_BELOW

        args.threshold = AUTO_REFINE_BELOW
    result = study(args.reports, args.threshold)
    for entry in result["sets"]:
        dice = entry["dice"]
        print(f"{entry['report']}: {len(entry['cases'])} cases; Dice without {dice['without']['mean']:.3f} "
              f"(min {dice['without']['min']:.3f}), gated {dice['gated']['mean']:.3f} "
              f"(min {dice['gated']['min']:.3f}), refined always {dice['refined']['mean']:.3f} "
              f"(min {dice['refined']['min']:.3f})")
        for row in entry["cases"]:
            print(f"  case {row['case']} {row['side']:5s} lowest agreement {row['lowest_agreement']:.3f}: "
                  f"{row['dice_without']:.3f} -> {row['dice_refined']:.3f}"
                  + ("  (refined)" if row["refined"] else ""))
    counts, mean = result["counts"], result["mean_dice"]
    if counts["cases"]:
        print(f"threshold {args.threshold:g}: {counts['refined']} of {counts['cases']} cases refined, "
              f"{counts['better']} better, {counts['worse']} worse; mean Dice without {mean['without']:.4f}, "
              f"gated {mean['gated']:.4f}, refined always {mean['always']:.4f}")
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
