"""Copy the best model of a training run into ``resources/models/<name>/`` with a complete card.

    python tools/ship_model.py RUN_DIR NAME --evaluation EVAL_DIR/evaluation.json \
        --regenerate "hipatlas synth ..." [--regenerate "..."] [--recipe RECIPE.json] [--machine "..."]
        [--default]
    python tools/ship_model.py RUN_DIR NAME --held-out-estimate LOSO_OUT/results.json --recipe ...

A model trained on every specimen has no held-out specimen left to evaluate on: give
``--held-out-estimate`` with the ``hipatlas experiment loso`` results that chose its setting instead
of ``--evaluation``; the card then holds ``held_out_estimate`` (that setting's pooled and per-fold
scores, each fold's specimen held out) and no ``val_metrics``.

The run's card (written by ``hipatlas train``: config, steps, wall time, data manifest sha256,
validation during training) is kept; this adds ``val_metrics`` from a ``hipatlas evaluate`` run on
held-out subjects, the commands that regenerate the training data (data sets are never
committed), the recipe that regenerates the model from nothing (``hipatlas train --recipe CARD``;
its ``verify.dice`` is set to the evaluation's mean Dice), and where it was trained. ``--default``
makes it the model ``register`` uses.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from inference.io import write_text_atomic  # noqa: E402
from inference.model_config import write_card_file  # noqa: E402
from inference.checksums import sha256_file  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=pathlib.Path)
    parser.add_argument("name", help="folder name under resources/models")
    held_out = parser.add_mutually_exclusive_group(required=True)
    held_out.add_argument("--evaluation", type=pathlib.Path,
                          help="evaluation.json of `hipatlas evaluate` on held-out subjects")
    held_out.add_argument("--held-out-estimate", type=pathlib.Path, metavar="LOSO_RESULTS",
                          help="results.json of `hipatlas experiment loso` (a model trained on every specimen)")
    parser.add_argument("--split-note", default="val (JIA_MRI specimen, held out of training)")
    parser.add_argument("--regenerate", action="append", default=[], help="command that regenerates a data set")
    parser.add_argument("--recipe", type=pathlib.Path,
                        help="hipatlas-recipe/1 file of the model (stored as training.recipe)")
    parser.add_argument("--machine", default="2-core x86-64 CPU, no GPU")
    parser.add_argument("--default", action="store_true", help="write resources/models/DEFAULT")
    parser.add_argument("--models-dir", type=pathlib.Path, default=REPO / "resources" / "models",
                        help="where models are shipped (default: resources/models)")
    args = parser.parse_args(argv)

    source = args.run_dir / "model"
    keras_file = next(source.glob("*.keras"))
    card = json.loads((source / "model_card.json").read_text())
    if card["sha256"] != sha256_file(keras_file):
        raise SystemExit(f"{keras_file} does not match its card")
    if args.evaluation:
        evaluation = json.loads(args.evaluation.read_text())
        summary = evaluation["summary"]
        metrics = {name: summary[name]["mean"] for name in ("dice", "assd_mm", "hd95_mm", "jaccard", "ssim",
                                                           "hip_centre_error_mm") if name in summary}
        metrics.update({f"{name}_sd": summary[name]["sd"] for name in ("dice", "assd_mm") if name in summary})
        metrics["samples"] = len(evaluation["rows"])
        metrics["split"] = args.split_note
        card["val_metrics"] = metrics
    else:
        card.pop("val_metrics", None)
        card["held_out_estimate"] = loso_estimate(json.loads(args.held_out_estimate.read_text()))
        metrics = card["held_out_estimate"]["pooled"]
    training = card["training"]
    folders = training["data_dir"] if isinstance(training["data_dir"], list) else [training["data_dir"]]
    training["data_dir"] = [f"{pathlib.Path(f).name} (regenerate: see training.regenerate)" for f in folders]
    training["regenerate"] = args.regenerate
    training["machine"] = args.machine
    if args.recipe:
        from inference.recipe import load_recipe

        recipe = load_recipe(args.recipe)
        if recipe["stages"][-1]["name"] != args.name:
            raise SystemExit(f"the recipe's last stage is {recipe['stages'][-1]['name']!r}, not {args.name!r}")
        if recipe.get("verify"):
            if not args.evaluation:
                raise SystemExit("the recipe verifies on a held-out split: ship it with --evaluation")
            recipe["verify"]["dice"] = metrics["dice"]
        training["recipe"] = recipe

    destination = args.models_dir / args.name
    destination.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(keras_file, destination / keras_file.name)
    (destination / keras_file.name).chmod(0o644)
    write_card_file(destination / "model_card.json", card)
    if args.default:
        write_text_atomic(args.models_dir / "DEFAULT", args.name + "\n")
    print(f"shipped {destination} sha256 {card['sha256']} steps {training['steps']}")
    return 0


def loso_estimate(results: dict) -> dict:
    """The card's ``held_out_estimate`` from ``hipatlas experiment loso``'s results.json."""
    chosen = results["chosen"]

    def means(table: dict) -> dict:
        return {name: table[name]["mean"] for name in ("dice", "jaccard", "assd_mm", "hd95_mm")
                if table.get(name, {}).get("mean") is not None}

    return {"method": "leave-one-specimen-out (hipatlas experiment loso)", "setting": chosen,
            "pooled": {**means(results["pooled"][chosen]), "dice_sd": results["pooled"][chosen]["dice"]["sd"],
                       "pairs": sum(results["test_pairs"].values())},
            "per_fold": {fold: means(table[chosen]) for fold, table in results["per_fold"].items()},
            "budget": results["budget"], "commit": results.get("provenance", {}).get("commit"),
            "note": "models of this setting trained on two specimens and scored on the third, one fold per "
                    "specimen; this model trained on all of them, so no specimen is left to hold out"}


if __name__ == "__main__":
    sys.exit(main())
