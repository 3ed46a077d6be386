"""Copy the best model of a training run into ``resources/models/<name>/`` with a complete card.

    python tools/ship_model.py RUN_DIR NAME --evaluation EVAL_DIR/evaluation.json \
        --regenerate "hipatlas synth ..." [--regenerate "..."] [--recipe RECIPE.json] [--machine "..."]
        [--default]

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
    parser.add_argument("--evaluation", type=pathlib.Path, required=True,
                        help="evaluation.json of `hipatlas evaluate` on held-out subjects")
    parser.add_argument("--split-note", default="val (JIA_MRI specimen, held out of training)")
    parser.add_argument("--regenerate", action="append", default=[], help="command that regenerates a data set")
    parser.add_argument("--recipe", type=pathlib.Path,
                        help="hipatlas-recipe/1 file of the model (stored as training.recipe)")
    parser.add_argument("--machine", default="2-core x86-64 CPU, no GPU")
    parser.add_argument("--default", action="store_true", help="write resources/models/DEFAULT")
    args = parser.parse_args(argv)

    source = args.run_dir / "model"
    keras_file = next(source.glob("*.keras"))
    card = json.loads((source / "model_card.json").read_text())
    if card["sha256"] != sha256_file(keras_file):
        raise SystemExit(f"{keras_file} does not match its card")
    evaluation = json.loads(args.evaluation.read_text())
    summary = evaluation["summary"]
    metrics = {name: summary[name]["mean"] for name in ("dice", "assd_mm", "hd95_mm", "jaccard", "ssim",
                                                       "hip_centre_error_mm") if name in summary}
    metrics.update({f"{name}_sd": summary[name]["sd"] for name in ("dice", "assd_mm") if name in summary})
    metrics["samples"] = len(evaluation["rows"])
    metrics["split"] = args.split_note
    card["val_metrics"] = metrics
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
            recipe["verify"]["dice"] = metrics["dice"]
        training["recipe"] = recipe

    destination = REPO / "resources" / "models" / args.name
    destination.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(keras_file, destination / keras_file.name)
    (destination / keras_file.name).chmod(0o644)
    write_card_file(destination / "model_card.json", card)
    if args.default:
        write_text_atomic(REPO / "resources" / "models" / "DEFAULT", args.name + "\n")
    print(f"shipped {destination} sha256 {card['sha256']} steps {training['steps']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
