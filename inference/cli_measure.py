"""``hipatlas measure``: recompute a registration's measurements from its (edited) landmarks.

Reads ``OUT_DIR/measurements.json`` (written by ``hipatlas register``), replaces any landmarks given
in ``--landmarks FILE`` and recomputes every measurement with
:func:`inference.measure.recompute_measurements`, the one measurement path the pipeline and the
workstation use: unchanged landmarks give the stored values bit for bit.

``--landmarks FILE``: a JSON object ``{"landmarks_mm": {"head_centre": [x, y, z], ...}}`` or the
mapping itself, world LPS mm; any subset of :data:`inference.measure.LANDMARK_NAMES`.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from inference.errors import CaseFormatError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "measure", help="recompute the measurements of a registration output from its landmarks",
        description="Recompute femoral offset, neck-shaft angle, vertical offset ... (with their "
        "uncertainties) from the landmarks in OUT_DIR/measurements.json, optionally moved by "
        "--landmarks, exactly as the workstation does (docs/measurements.md).")
    parser.add_argument("out_dir", help="output folder of `hipatlas register` (holds measurements.json)")
    parser.add_argument("--landmarks", help="JSON file of moved landmarks (world LPS mm): "
                        '{"landmarks_mm": {"lesser_trochanter": [x, y, z], ...}}')
    parser.add_argument("--json", action="store_true", help="print the measurements as JSON")
    parser.add_argument("--write", metavar="FILE", help="also write the recomputed measurements.json to FILE")
    parser.set_defaults(handler=_measure)


def read_landmarks_file(path: str | pathlib.Path) -> dict:
    """The landmarks of a ``--landmarks`` file (names checked, points left to the measurement)."""
    from inference import io, measure

    data = io.read_json_object(path, "landmarks file")
    marks = data.get("landmarks_mm", data)
    if not isinstance(marks, dict):
        raise CaseFormatError(f"{path}: landmarks_mm must be an object of name: [x, y, z]")
    unknown = sorted(set(marks) - set(measure.LANDMARK_NAMES))
    if unknown:
        raise CaseFormatError(f"{path}: unknown landmark(s) {', '.join(unknown)}; "
                              f"known: {', '.join(measure.LANDMARK_NAMES)}")
    return marks


def _measure(args: argparse.Namespace) -> int:
    from inference import io, measure

    stored = measure.validate_measurements(
        io.read_json_object(pathlib.Path(args.out_dir) / "measurements.json", "measurements file"))
    moved = read_landmarks_file(args.landmarks) if args.landmarks else None
    result = measure.recompute_measurements(stored, moved)
    if args.write:
        io.write_json_atomic(args.write, result)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for m in measure.MEASUREMENTS:
            print(f"{m.label}: {result['display'][m.key]}")
    for line in measure.caveat_lines(result):
        print(f"caution: {line}", file=sys.stderr)
    return 0
