"""Where does the vertical offset's error come from? (issue 13: a systematic negative bias)

For N held-out simulated cases (the cases of ``tools/eval_cases.py``: same plans, same phantom
simulation, same truth-in-field-of-view), registers each once with the given options and reports
the vertical offset (head centre above the lesser trochanter tip, along the shaft axis) computed by
the one measurement path (:func:`inference.measure.recompute_measurements`) with the lesser
trochanter (LT) taken from each candidate source, against each reference:

Our LT candidates (everything else, head centre and shaft axis, as the pipeline stored them):

* ``stored``: the LT the pipeline stored in ``measurements.json`` (``masks`` since issue 13's fix,
  falling back to ``detected``);
* ``detected``: the LT found on the reconstructed label map (what the pipeline stored before);
* ``masks``: ``detected`` moved along the shaft axis to the depth the masks' outlines show
  (:func:`inference.localize.lesser_trochanter_depth_from_masks`);
* ``atlas_warped``: the atlas's own LT landmark carried to the patient by the registration field
  (``RegistrationResult.landmarks_mm``, :func:`inference.registration.invert_displacement_at`);
* ``oracle_label_lt``: the LT the same detector finds on the true label map (not available to a
  registration: it isolates what the head centre and the axis contribute against reference
  ``truth_label``);
* ``oracle_phantom_lt``: the phantom's true LT (idem, against ``truth_phantom``).

References:

* ``truth_label``: :func:`inference.measure.measure_femur` on the true label map in the output's
  field of view (the reference of ``tools/eval_cases.py``);
* ``truth_phantom``: the same, with the phantom's true head centre and true LT (``truth.json``,
  from the bone model) in place of those detected on the label map.

``covered``: the error is within two standard uncertainties, those the pipeline stored (so for
the methods other than ``stored`` this is only indicative). It also reports how far apart the LT
points are (3D and along the true shaft axis, + = more
proximal) so that a bias can be traced to the point that causes it.

    nice -n 10 .venv/bin/python tools/vertical_offset_study.py --cases 4 --seed 11 --out /tmp/vo

Writes ``OUT/NAME.md`` and ``OUT/NAME.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import pathlib
import sys
import time
from typing import Any

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import eval_cases  # noqa: E402
from inference import anatomy, measure  # noqa: E402
from inference.experiments import simcases  # noqa: E402
from inference.errors import HipAtlasError  # noqa: E402

log = logging.getLogger("vertical_offset_study")

METHODS = ("stored", "detected", "atlas_warped", "masks", "oracle_label_lt", "oracle_phantom_lt")
REFERENCES = ("truth_label", "truth_phantom")
KEY = "vertical_offset_mm"
#: LT points compared (distance and height difference)
PAIRS = tuple((a, b) for a in ("detected", "atlas_warped", "masks", "oracle_label_lt")
              for b in ("oracle_label_lt", "oracle_phantom_lt") if a != b)


def _truth_point(truth: dict, name: str) -> np.ndarray:
    return np.asarray(truth["landmarks_mm"][anatomy.LANDMARK_NAMES.index(name)], float)


def _masks_lt(case_dir: pathlib.Path, ours: dict, detected: np.ndarray) -> tuple[np.ndarray, float | None]:
    """Our detected LT moved along our shaft axis to the depth the masks' outlines show
    (:func:`inference.localize.lesser_trochanter_depth_from_masks`), and that depth."""
    from inference import io, localize

    case = io.load_case(case_dir)
    head = np.asarray(ours["landmarks_mm"]["head_centre"], float)
    axis = np.asarray(ours["shaft_axis"]["direction"], float)
    depth = localize.lesser_trochanter_depth_from_masks(
        [v.P for v in case.views], [v.mask for v in case.views], head, ours["head_radius_mm"],
        np.asarray(ours["shaft_axis"]["point_mm"], float), axis, detected)
    if depth is None:
        return detected, None
    return detected + ((head - detected) @ axis - depth) * axis, depth


def study_case(case_dir: pathlib.Path, out_dir: pathlib.Path, truth_dir: pathlib.Path, side: str,
               warped_landmarks: dict) -> dict[str, Any]:
    """Vertical offsets of one registered case by every method against every reference."""
    truth = json.loads((truth_dir / "truth.json").read_text())
    ours = json.loads((out_dir / "measurements.json").read_text())
    truth_fov, labels, grid = simcases.truth_in_output_fov(out_dir, truth_dir)
    # the LT the detector finds on our reconstruction (what the pipeline stored before issue 13's fix)
    detected = anatomy.femur_landmarks_from_labels((labels == 1).astype(np.uint8), grid, side).lesser_trochanter_mm
    label_truth = measure.measure_femur(truth_fov.astype(np.uint8), grid, side=side)
    phantom_lt, phantom_head = _truth_point(truth, "lesser_trochanter"), np.asarray(truth["hip_centre_mm"], float)
    references = {
        "truth_label": label_truth,
        "truth_phantom": measure.recompute_measurements(
            label_truth, {"head_centre": phantom_head, "lesser_trochanter": phantom_lt}),
    }
    lt = {"stored": np.asarray(ours["landmarks_mm"]["lesser_trochanter"], float),
          "detected": np.asarray(detected, float),
          "atlas_warped": np.asarray(warped_landmarks["lesser_trochanter"], float),
          "masks": _masks_lt(case_dir, ours, detected)[0],
          "oracle_label_lt": np.asarray(label_truth["landmarks_mm"]["lesser_trochanter"], float),
          "oracle_phantom_lt": phantom_lt}
    axis = np.asarray(label_truth["shaft_axis"]["direction"], float)  # proximal
    row: dict[str, Any] = {"side": side}
    ours_head, ours_axis = np.asarray(ours["landmarks_mm"]["head_centre"], float), np.asarray(ours["shaft_axis"]["direction"], float)
    label_depth = float((ours_head - lt["oracle_label_lt"]) @ ours_axis)
    depth = _masks_lt(case_dir, ours, detected)[1]
    row["masks_depth_minus_label_mm"] = math.nan if depth is None else depth - label_depth
    row["detected_depth_minus_label_mm"] = float((ours_head - lt["detected"]) @ ours_axis) - label_depth
    for method, point in lt.items():
        values = measure.recompute_measurements(ours, {"lesser_trochanter": point})
        row[f"vo_{method}"] = values[KEY]
        row[f"sd_{method}"] = values["uncertainty"][KEY]
        for ref, reference in references.items():
            error = values[KEY] - reference[KEY]
            row[f"err_{method}_vs_{ref}"] = error
            row[f"covered_{method}_vs_{ref}"] = float(abs(error) <= 2.0 * values["uncertainty"][KEY])
    for ref, reference in references.items():
        row[f"vo_{ref}"] = reference[KEY]
    # where the points are: 3D distance and height difference along the true shaft axis (+ = higher)
    for a, b in PAIRS:
        row[f"lt_dist_{a}_to_{b}_mm"] = float(np.linalg.norm(lt[a] - lt[b]))
        row[f"lt_height_{a}_minus_{b}_mm"] = float((lt[a] - lt[b]) @ axis)
    ours_head = np.asarray(ours["landmarks_mm"]["head_centre"], float)
    row["head_height_ours_minus_label_mm"] = float(
        (ours_head - np.asarray(label_truth["landmarks_mm"]["head_centre"], float)) @ axis)
    row["head_height_ours_minus_phantom_mm"] = float((ours_head - phantom_head) @ axis)
    row["axis_angle_ours_vs_label_deg"] = float(np.degrees(np.arccos(np.clip(
        np.asarray(ours["shaft_axis"]["direction"], float) @ axis, -1.0, 1.0))))
    return row


def _summary(rows: list[dict[str, Any]]) -> list[str]:
    ok = [r for r in rows if "error" not in r]
    lines = ["| method | reference | mean error mm | sd | mean abs mm | covered (2 sd) |", "|---|---|---|---|---|---|"]
    for method in METHODS:
        for ref in REFERENCES:
            errors = np.array([r[f"err_{method}_vs_{ref}"] for r in ok])
            covered = sum(r[f"covered_{method}_vs_{ref}"] for r in ok)
            if errors.size:
                lines.append(f"| {method} | {ref} | {errors.mean():+.2f} | {errors.std(ddof=1) if errors.size > 1 else 0:.2f}"
                             f" | {np.abs(errors).mean():.2f} | {covered:.0f} of {errors.size} |")
    lines += ["", "| LT point difference | mean 3D distance mm | mean height difference mm (+ = higher) |",
              "|---|---|---|"]
    for a, b in PAIRS:
        d = np.array([r[f"lt_dist_{a}_to_{b}_mm"] for r in ok])
        h = np.array([r[f"lt_height_{a}_minus_{b}_mm"] for r in ok])
        if d.size:
            lines.append(f"| {a} - {b} | {d.mean():.2f} | {h.mean():+.2f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model folder, .keras or .onnx (default: the shipped model that never "
                        "learnt from --subject's specimen)")
    parser.add_argument("--backend", default="onnx", choices=["auto", "tf", "onnx"])
    parser.add_argument("--out", required=True)
    parser.add_argument("--name", default="vertical_offset_study")
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--subject", default="JIA_MRI")
    parser.add_argument("--sides", default="right,left")
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--ct-spacing", type=float, default=1.5)
    parser.add_argument("--variant", default="fullres", choices=list(simcases.VARIANTS))
    parser.add_argument("--view-separation-deg", type=float, default=None)
    parser.add_argument("--shaft-mm", type=float, default=None)
    parser.add_argument("--keep", action="store_true", help="keep cases and outputs under OUT/work")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]

    from inference import backends, evaluate, io, pipeline

    net = backends.load_backend(eval_cases.evaluation_model(args.model, args.subject), args.backend)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with eval_cases.work_folder(out, args.keep, "vo_study_") as work:
        for index in range(args.start, args.start + args.cases):
            plan = simcases.case_plan(index, args.seed, False, sides, args.view_separation_deg)
            row: dict[str, Any] = {"sample_index": index, "seed": plan["seed"]}
            try:
                case_dir, truth_dir = simcases.simulate_case(plan, f"{args.subject}:{plan['side']}", work,
                                                               args.ct_spacing, args.shaft_mm)
                result_dir = work / f"out_{index:03d}"
                start = time.process_time()
                result = pipeline.run_to_completion(pipeline.register_case(
                    case_dir, result_dir, model=net, overwrite=True, **simcases.VARIANTS[args.variant]))
                row["register_cpu_s"] = time.process_time() - start
                row.update(study_case(case_dir, result_dir, truth_dir, plan["side"], result.landmarks_mm))
            except HipAtlasError as error:
                log.error("case %d: %s", index, error)
                row["error"] = str(error)
            rows.append(row)
            log.info("case %d %s: %s", index, plan["side"], ", ".join(
                f"{m} {row.get(f'err_{m}_vs_truth_label', math.nan):+.2f}" for m in METHODS))

    command = "tools/vertical_offset_study.py " + " ".join(argv if argv is not None else sys.argv[1:])
    columns = ["vo_truth_label", "vo_truth_phantom"] + [f"err_{m}_vs_{r}" for m in METHODS for r in REFERENCES] + [
        "lt_height_detected_minus_oracle_label_lt_mm", "lt_height_atlas_warped_minus_oracle_label_lt_mm",
        "lt_height_oracle_label_lt_minus_oracle_phantom_lt_mm", "head_height_ours_minus_label_mm",
        "axis_angle_ours_vs_label_deg", "detected_depth_minus_label_mm", "masks_depth_minus_label_mm"]
    per_case = ["| case | side | " + " | ".join(columns) + " |", "|" + "---|" * (len(columns) + 2)]
    per_case += [f"| {r['sample_index']} | {r['side']} | " + " | ".join(evaluate._fmt(r.get(c, math.nan))
                                                                        for c in columns) + " |"
                 for r in rows if "error" not in r]
    markdown = (f"# Vertical offset by LT source, {args.cases} simulated {args.subject} cases\n\n"
                f"- command: `{command}`\n- backend {args.backend}, variant {args.variant}, seed {args.seed}, sides "
                f"{','.join(sides)}, CT spacing {args.ct_spacing} mm\n- error = ours - reference (mm)\n\n"
                "## Summary\n\n" + "\n".join(_summary(rows)) + "\n\n## Per case\n\n" + "\n".join(per_case) + "\n")
    failures = [r for r in rows if "error" in r]
    if failures:
        markdown += "\n## Failed cases\n\n" + "\n".join(f"- case {r['sample_index']}: {r['error']}"
                                                         for r in failures) + "\n"
    io.write_json_atomic(out / f"{args.name}.json", evaluate._json_safe({
        "command": command, "seed": args.seed, "variant": args.variant, "backend": args.backend, "rows": rows}))
    io.write_text_atomic(out / f"{args.name}.md", markdown)
    print(markdown)
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
