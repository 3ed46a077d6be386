#!/usr/bin/env python3
"""Compare two ``hipatlas register`` output folders: are the results bit-identical?

Used to show that a refactoring leaves behaviour unchanged (issue 16): register the same case
with the old and the new code, then::

    python tools/compare_outputs.py OUT_BEFORE OUT_AFTER [--json]

Must match exactly (exit status 1 otherwise):
  - ``femur_labels.nii.gz`` and ``warped_atlas.nii.gz``: voxel arrays (values and dtype) and world
    geometry (origin, spacing, direction);
  - ``measurements.json``: every value;
  - ``femur_surface.stl``: every byte;
  - ``proposed_mask_<view>.png``: every pixel;
  - ``report.json`` without what changes from run to run (``created``, ``timings_s``, the
    proposal's and the refinement's timings).
With ``--refine`` the refinement stops at a wall-clock time limit, so runs on a loaded machine may
take fewer steps and differ; the tool says so. Reported, not required to match: the overlay pictures (how many pixels differ) and files that
only one folder has. ``--json`` ends the output with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import Any

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

#: report.json entries that differ between two runs of the same code (clock times).
VOLATILE_REPORT_KEYS = (("created",), ("timings_s",), ("mask_proposal", "timings_s"), ("refinement", "time_s"),
                        ("model", "path"))  # where the code is installed, not what it computed


def _differences(a: Any, b: Any, path: str = "") -> list[str]:
    """Paths (``a.b[2]``) where two JSON values differ (floats compared exactly)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b), key=str):
            if key not in a or key not in b:
                out.append(f"{path}.{key} (only in {'after' if key not in a else 'before'})")
            else:
                out.extend(_differences(a[key], b[key], f"{path}.{key}"))
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path} (length {len(a)} vs {len(b)})"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y, f"{path}[{i}]")]
    return [] if a == b and type(a) is type(b) else [f"{path}: {a!r} vs {b!r}"]


def _without_volatile(report: dict) -> dict:
    report = json.loads(json.dumps(report))
    for keys in VOLATILE_REPORT_KEYS:
        node = report
        for key in keys[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(keys[-1], None)
    return report


def _volume(path: pathlib.Path) -> tuple[np.ndarray, tuple]:
    import SimpleITK as sitk

    image = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(image), (image.GetOrigin(), image.GetSpacing(), image.GetDirection())


def _pixels(path: pathlib.Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image)


def compare(before: str | pathlib.Path, after: str | pathlib.Path) -> dict[str, Any]:
    """``{"identical": bool, "checks": {file: verdict}, "only_before": [...], "only_after": [...]}``."""
    before, after = pathlib.Path(before), pathlib.Path(after)
    names_before = {p.name for p in before.iterdir() if p.is_file()}
    names_after = {p.name for p in after.iterdir() if p.is_file()}
    checks: dict[str, dict[str, Any]] = {}
    for name in sorted(names_before & names_after):
        a, b = before / name, after / name
        if name.endswith(".nii.gz"):
            (va, ga), (vb, gb) = _volume(a), _volume(b)
            same = va.dtype == vb.dtype and va.shape == vb.shape and np.array_equal(va, vb) and ga == gb
            entry = {"identical": bool(same), "required": True}
            if not same and va.shape == vb.shape:
                entry["voxels_differing"] = int(np.count_nonzero(va != vb))
                entry["geometry_equal"] = ga == gb
        elif name == "measurements.json":
            diffs = _differences(json.loads(a.read_text()), json.loads(b.read_text()))
            entry = {"identical": not diffs, "required": True, "differences": diffs[:20]}
        elif name == "report.json":
            report_a, report_b = json.loads(a.read_text()), json.loads(b.read_text())
            diffs = _differences(_without_volatile(report_a), _without_volatile(report_b))
            entry = {"identical": not diffs, "required": True, "differences": diffs[:20]}
            steps = [(r.get("refinement") or {}).get("steps") for r in (report_a, report_b)]
            if steps[0] != steps[1]:
                # refine.RefineSettings.time_limit_s is wall-clock time: a loaded machine stops sooner
                entry["note"] = (f"the refinement ran {steps[0]} and {steps[1]} steps (its time limit is wall "
                                 "clock: compare runs made on an equally quiet machine)")
        elif name.endswith(".png"):
            pa, pb = _pixels(a), _pixels(b)
            same = pa.shape == pb.shape and np.array_equal(pa, pb)
            entry = {"identical": bool(same), "required": name.startswith("proposed_mask_")}
            if not same and pa.shape == pb.shape:
                differing = np.any(pa != pb, axis=-1) if pa.ndim == 3 else pa != pb
                entry["pixels_differing"] = int(np.count_nonzero(differing))
                entry["pixels"] = int(differing.size)
        else:
            entry = {"identical": a.read_bytes() == b.read_bytes(), "required": name.endswith(".stl")}
        checks[name] = entry
    identical = all(entry["identical"] for entry in checks.values() if entry["required"])
    return {"identical": identical, "checks": checks, "only_before": sorted(names_before - names_after),
            "only_after": sorted(names_after - names_before)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", help="output folder of the reference run")
    parser.add_argument("after", help="output folder of the run to check")
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    args = parser.parse_args(argv)
    result = compare(args.before, args.after)
    for name, entry in result["checks"].items():
        verdict = "identical" if entry["identical"] else ("DIFFERS" if entry["required"] else "differs")
        extra = {k: v for k, v in entry.items() if k not in ("identical", "required") and v}
        print(f"{name:32s} {verdict}{'  ' + json.dumps(extra) if extra else ''}")
    for key in ("only_before", "only_after"):
        if result[key]:
            print(f"{key.replace('_', ' ')}: {', '.join(result[key])}")
    print("all required outputs identical" if result["identical"] else "REQUIRED OUTPUTS DIFFER")
    if args.json:
        print(json.dumps(result))
    return 0 if result["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
