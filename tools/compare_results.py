#!/usr/bin/env python3
"""Compare two ``hipatlas experiment`` results.json files: how far apart are their numbers?

Used to check that an experiment reproduces (docs/results/paper.md, "Reproduced from a fresh
clone")::

    python tools/compare_results.py REPORT_A/results.json REPORT_B/results.json [--json]

Every number found at the same place in both files is compared, except the run's provenance, the
ledger's bookkeeping and clock times (any key containing ``time``). Printed per top-level key:
how many numbers were compared, how many differ and the largest absolute difference.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
from typing import Any, Iterator

SKIPPED = ("provenance", "ledger")


def numbers(value: Any, path: tuple = ()) -> Iterator[tuple[tuple, float]]:
    """(path, number) for every number in ``value``, skipping clock times."""
    if isinstance(value, dict):
        for key, item in value.items():
            if "time" not in str(key):
                yield from numbers(item, path + (key,))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from numbers(item, path + (index,))
    elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        yield path, float(value)


def compare(a: dict, b: dict) -> dict[str, dict[str, float]]:
    """Per top-level key of ``a`` also in ``b``: compared, differing, largest absolute difference."""
    out = {}
    for key in a:
        if key in SKIPPED or key not in b:
            continue
        left, right = dict(numbers(a[key])), dict(numbers(b[key]))
        common = left.keys() & right.keys()
        diffs = [abs(left[p] - right[p]) for p in common]
        out[key] = {"compared": len(common), "differing": sum(d > 0 for d in diffs),
                    "max_abs_diff": max(diffs, default=0.0)}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=pathlib.Path)
    parser.add_argument("b", type=pathlib.Path)
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    args = parser.parse_args(argv)
    result = compare(json.loads(args.a.read_text()), json.loads(args.b.read_text()))
    for key, row in result.items():
        print(f"{key}: {row['compared']} numbers, {row['differing']} differ, "
              f"largest difference {row['max_abs_diff']:.3g}")
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
