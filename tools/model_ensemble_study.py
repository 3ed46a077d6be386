#!/usr/bin/env python3
"""Does averaging the fields of several trained models beat each of them? On table1's held-out pairs.

The test pairs are those of ``hipatlas experiment table1 --scale quick`` (seed 7: 20 JIA_MRI
phantoms, orthogonal views, made in ``OUT/phantoms`` if not there yet), so the single-model rows
can be checked against table1's "reference model" row. Each model runs once per pair (Keras); the
femur label is the atlas warped by each model's field and by the mean field, nearest neighbour on
the network grid (:func:`inference.ensemble.warped_labels`, as registration on the network grid).
Every model must have left JIA out of training (:func:`inference.resources.require_held_out`).

    python tools/model_ensemble_study.py --model resources/models/compact-v2 \\
        --model RUN/compact-v2-heldout-JIA/model --out docs/results/model-ensemble
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

log = logging.getLogger("model_ensemble_study")


def study(models: list[pathlib.Path], out: pathlib.Path, pairs: int) -> dict:
    from scipy import stats

    from inference import ensemble as ensemble_lib
    from inference.data.atlas import load_atlas
    from inference.evaluate import predict_sample, sample_metrics
    from inference.experiments.common import ExperimentContext, held_out_phantoms, render_pair
    from inference.model import load_model
    from inference.registration import model_file_in, model_identity
    from inference.resources import require_held_out

    files = [model_file_in(m) for m in models]
    for file in files:
        require_held_out(file, "JIA")
    ctx = ExperimentContext("model-ensemble", out, "quick", files[0])
    nets = [load_model(file) for file in files]
    labels = load_atlas(ctx.config.grid).labels
    names = [f"model {i + 1}" for i in range(len(nets))] + ["mean field"]
    rows = []
    for index, phantom in enumerate(held_out_phantoms(ctx, pairs)):
        sample = render_pair(ctx, phantom, (0.0, 90.0))
        fields = [predict_sample(net, sample)["psi"] for net in nets]
        row = {"pair": phantom.key, "femur": phantom.femur}
        for name, psi in zip(names, [*fields, np.mean(fields, axis=0)]):
            metrics = sample_metrics(ensemble_lib.warped_labels(labels, psi), sample["labels"], sample["index_to_world"])
            row[name] = {"dice": metrics["dice"], "assd_mm": metrics["assd_mm"]}
        rows.append(row)
        log.info("pair %d/%d %s: %s", index + 1, pairs, phantom.femur,
                 ", ".join(f"{n} {row[n]['dice']:.4f}" for n in names))
    summary = {}
    for name in names:
        dice = np.array([r[name]["dice"] for r in rows])
        assd = np.array([r[name]["assd_mm"] for r in rows])
        summary[name] = {"dice_mean": float(dice.mean()), "dice_sd": float(dice.std(ddof=1)),
                         "assd_mean_mm": float(assd.mean())}
        if name != "mean field":
            mean_dice = np.array([r["mean field"]["dice"] for r in rows])
            summary[name]["mean_field_better_in"] = int((mean_dice > dice).sum())
            summary[name]["paired_p"] = float(stats.ttest_rel(mean_dice, dice).pvalue)
    return {"models": [{**model_identity(net), "file": str(file)} for net, file in zip(nets, files)],
            "pairs": pairs, "seed": ctx.seed, "summary": summary, "rows": rows}


def markdown(result: dict, command: str) -> str:
    lines = ["# Averaging the fields of several models: table1's held-out pairs", "",
             f"- command: `{command}`",
             f"- {result['pairs']} JIA_MRI phantoms (seed {result['seed']}), orthogonal views, network grid, "
             "atlas labels warped by nearest neighbour", ""]
    for i, model in enumerate(result["models"]):
        lines.append(f"- model {i + 1}: `{model['file']}` (sha256 {model['sha256']})")
    lines += ["", "| field | Dice | ASSD (mm) | mean field better in | paired p (Dice) |", "|---|---|---|---|---|"]
    for name, row in result["summary"].items():
        better = f"{row['mean_field_better_in']} of {result['pairs']}" if "paired_p" in row else "-"
        p = f"{row['paired_p']:.2g}" if "paired_p" in row else "-"
        lines.append(f"| {name} | {row['dice_mean']:.4f} +- {row['dice_sd']:.4f} | {row['assd_mean_mm']:.3f} | "
                     f"{better} | {p} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", action="append", required=True, type=pathlib.Path,
                        help="model folder or .keras (twice or more)")
    parser.add_argument("--out", required=True, type=pathlib.Path, help="folder for results.md / .json (and phantoms)")
    parser.add_argument("--pairs", type=int, default=20, help="test pairs (default 20, as table1 quick)")
    args = parser.parse_args(argv)
    if len(args.model) < 2:
        parser.error("give --model at least twice")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    result = study(args.model, args.out, args.pairs)
    command = "python tools/model_ensemble_study.py " + " ".join(sys.argv[1:] if argv is None else argv)
    from inference.io import write_json_atomic, write_text_atomic

    write_json_atomic(args.out / "results.json", result)
    write_text_atomic(args.out / "results.md", markdown(result, command))
    print(markdown(result, command))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
