"""Can the network itself tell which lateral angle is right? A study of self-calibration by search.

The gradient self-calibration (:mod:`inference.refine`) moves the camera of the second view with the
network's reconstruction held (almost) fixed, and recovered only 0.3-1.3 deg of a 5 deg error
(docs/results/issue13.md). This study asks the question the other way round: re-run the network
with the lateral view's recorded matrix turned by each candidate correction (about the patient's
long axis through the hip, as ``eval_cases.py --lat-angle-errors`` turns it), and score every result
by signals available on a real case:

* ``mask_agreement``: Dice of the projected reconstruction and the femur masks (mean of the views);
* ``ncc``: NCC of the radiographs and the projected reconstruction (mean of the views);
* ``phi_femur_mm`` / ``phi_all_mm``: mean magnitude of the network's local (non-affine) field over the
  atlas femur / the whole grid: a wrong geometry should force the atlas to deform more;
* ``bending_femur`` / ``bending_all``: mean squared gradient of that field (same regions);
* ``models_disagree_mm`` (with ``--second-model``): RMS distance (mm) between the two models' pull-back
  fields over the voxels either puts in the femur: two networks that err differently may agree
  best where the geometry they are told is the true one.

For each signal the candidate it prefers (highest agreement or NCC, lowest deformation) is compared
with the recorded angle and with the oracle (the candidate of best Dice against the truth). A signal
is usable for self-calibration only if its choice beats the recorded angle when the angle is off and
does not lose when it is right.

    .venv/bin/python tools/selfcal_search_study.py --cases 8 --lat-angle-error 5 --out docs/results
    .venv/bin/python tools/selfcal_search_study.py --cases 8 --lat-angle-error 0 --out docs/results

Writes ``OUT/<name>.md`` and ``.json``. Needs TensorFlow (the local field ``phi`` is an output of the
Keras model only).
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import shutil
import sys
from typing import Any

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import eval_cases  # noqa: E402

from inference.experiments import simcases  # noqa: E402
from inference.io import write_text_atomic  # noqa: E402

log = logging.getLogger("selfcal_search_study")

#: signal -> True when higher is better
SIGNALS = {"mask_agreement": True, "ncc": True, "phi_femur_mm": False, "phi_all_mm": False,
           "bending_femur": False, "bending_all": False, "models_disagree_mm": False}


def _field_signals(net, atlas, run_dir: pathlib.Path, scratch: pathlib.Path, second=None) -> dict[str, float]:
    """Deformation statistics of the network's local field ``phi`` for the case in ``run_dir``, and
    (``second``: another Keras model) how far the two models' fields disagree."""
    from inference import ensemble as ensemble_lib
    from inference import pipeline
    from inference.model_config import case_inputs

    job = pipeline._load_job(run_dir, scratch, True, None)
    head = pipeline._locate_head(job)
    grid, network = pipeline._network_views(job, atlas, head, net.config.detector_hw)
    inputs = case_inputs(network.images, network.masks, network.projections, grid.index_to_world())
    outputs = net.model(inputs, training=False)
    phi = np.asarray(outputs["phi"])[0]
    femur = np.asarray(atlas.labels) == 1
    magnitude = np.linalg.norm(phi, axis=-1)
    bending = sum(np.sum(g ** 2, axis=-1) for g in np.gradient(phi, axis=(0, 1, 2)))
    out = {"phi_femur_mm": float(magnitude[femur].mean()), "phi_all_mm": float(magnitude.mean()),
           "bending_femur": float(bending[femur].mean()), "bending_all": float(bending.mean())}
    if second is not None:
        psi = [np.asarray(outputs["psi"])[0], np.asarray(second(inputs, training=False)["psi"])[0]]
        region = np.zeros(psi[0].shape[:3], bool)
        for field in psi:
            region |= ensemble_lib.warped_labels(atlas.labels, field) == 1
        offset = (psi[0] - psi[1]) * np.asarray(grid.spacing_xyz_mm[::-1], np.float32)
        out["models_disagree_mm"] = float(np.sqrt(np.mean(np.sum(offset[region] ** 2, axis=-1))))
    return out


def _mean_of_views(report: dict[str, Any], key: str) -> float:
    values = [v.get(key) for v in report.get("views", []) if v.get(key) is not None]
    return float(np.mean(values)) if values else float("nan")


def _choices(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per signal: mean Dice at the recorded angle, at the signal's choice and at the oracle's."""
    cases = sorted({r["case"] for r in rows})
    result = {}
    for signal, higher in SIGNALS.items():
        if any(signal not in r for r in rows):
            continue
        recorded, chosen, oracle, picks = [], [], [], []
        for case in cases:
            members = [r for r in rows if r["case"] == case]
            pick = (max if higher else min)(members, key=lambda r: r[signal])
            recorded.append(next(r["dice"] for r in members if r["correction_deg"] == 0))
            chosen.append(pick["dice"])
            oracle.append(max(r["dice"] for r in members))
            picks.append(pick["correction_deg"])
        result[signal] = {"dice_recorded": float(np.mean(recorded)), "dice_chosen": float(np.mean(chosen)),
                          "dice_oracle": float(np.mean(oracle)), "corrections_chosen_deg": picks}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--seed", type=int, default=2024, help="base seed (as eval_cases.py)")
    parser.add_argument("--lat-angle-error", type=float, default=5.0, help="error of the recorded LAT angle, deg")
    parser.add_argument("--corrections", default="-8,-6,-4,-2,0,2,4",
                        help="candidate corrections of the LAT angle, deg (must include 0)")
    parser.add_argument("--second-model", help="another model that never learnt from JIA: adds the signal "
                        "models_disagree_mm")
    parser.add_argument("--out", required=True)
    parser.add_argument("--name", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    corrections = [float(c) for c in args.corrections.split(",") if c.strip()]
    if 0.0 not in corrections:
        parser.error("--corrections must include 0 (the recorded angle)")

    from inference import backends, pipeline

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = args.name or f"selfcal_search_lat{args.lat_angle_error:g}_seed{args.seed}"
    net = backends.load_backend(eval_cases.evaluation_model(None, "JIA_MRI"), "tf")
    atlas = pipeline.atlas_for(net)
    provenance = eval_cases._provenance(net.model)
    second = None
    if args.second_model:
        from inference import registration

        second = registration.load_registration_model(eval_cases.evaluation_model(args.second_model, "JIA_MRI"))
    rows = []
    with eval_cases.work_folder(out, False, "selfcal_search_") as work:
        for index in range(args.cases):
            plan = simcases.case_plan(index, args.seed, False, ["right", "left"], None)
            case_dir, truth_dir = simcases.simulate_case(plan, f"JIA_MRI:{plan['side']}", work, 1.5)
            for correction in corrections:
                run_dir, result_dir = work / f"run_{index:03d}", work / f"out_{index:03d}"
                shutil.rmtree(run_dir, ignore_errors=True)
                shutil.copytree(case_dir, run_dir)
                for angle in (args.lat_angle_error, correction):
                    if angle:
                        simcases.perturb_lateral(run_dir, angle)
                row = {"case": index, "side": plan["side"], "correction_deg": correction,
                       **_field_signals(net, atlas, run_dir, work / "scratch", second)}
                result = pipeline.run_to_completion(pipeline.register_case(
                    run_dir, result_dir, model=net, overwrite=True, full_resolution=False))
                row["dice"] = simcases.case_metrics(result_dir, truth_dir, plan["side"])["dice"]
                row["mask_agreement"] = _mean_of_views(result.report, "mask_agreement_dice")
                row["ncc"] = _mean_of_views(result.report, "similarity_ncc")
                rows.append(row)
                log.info("case %d, correction %+g deg: %s", index, correction,
                         ", ".join(f"{k} {v:.3f}" for k, v in row.items() if isinstance(v, float)))

    choices = _choices(rows)
    lines = [f"# Self-calibration by search: LAT recorded angle off by {args.lat_angle_error:g} deg, "
             f"{args.cases} simulated JIA_MRI cases", "",
             f"- command: `tools/selfcal_search_study.py --cases {args.cases} --seed {args.seed} "
             f"--lat-angle-error {args.lat_angle_error:g} --corrections {args.corrections} --out {args.out}"
             + (f" --second-model {args.second_model}" if args.second_model else "") + "`",
             f"- commit: {provenance['commit']}; model {provenance['model']} (sha256 {provenance['model_sha256']})",
             f"- the right correction is {0.0 - args.lat_angle_error:+g} deg; network grid (no full resolution), "
             "TensorFlow backend", "",
             "| signal | Dice at the recorded angle | Dice at the signal's choice | Dice at the best candidate "
             "(oracle) | corrections chosen (deg) |", "|---|---|---|---|---|"]
    for signal, c in choices.items():
        lines.append(f"| {signal} | {c['dice_recorded']:.3f} | {c['dice_chosen']:.3f} | {c['dice_oracle']:.3f} | "
                     f"{', '.join(f'{p:+g}' for p in c['corrections_chosen_deg'])} |")
    lines += ["", "## Per case: Dice / mask agreement / bending (femur) per correction", "",
              "| case | side | " + " | ".join(f"{c:+g} deg" for c in corrections) + " |",
              "|---|---|" + "---|" * len(corrections)]
    for index in sorted({r["case"] for r in rows}):
        members = {r["correction_deg"]: r for r in rows if r["case"] == index}
        lines.append(f"| {index} | {members[0.0]['side']} | " + " | ".join(
            f"{members[c]['dice']:.3f} / {members[c]['mask_agreement']:.3f} / {members[c]['bending_femur']:.3f}"
            for c in corrections) + " |")
    write_text_atomic(out / f"{name}.md", "\n".join(lines) + "\n")
    write_text_atomic(out / f"{name}.json", json.dumps(
        {**provenance, "lat_angle_error_deg": args.lat_angle_error, "corrections_deg": corrections,
         "seed": args.seed, "cases": args.cases, "choices": choices, "rows": rows}, indent=2))
    print(out / f"{name}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
