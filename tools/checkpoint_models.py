#!/usr/bin/env python3
"""Models from a training run's checkpoints: export one step's weights, or average several models.

A run folder (``hipatlas train --out RUN``) keeps its last few checkpoints (``RUN/checkpoints/
ckpt-STEP``) but exports one model. To ask how held-out accuracy moves along a run, or whether the
mean of several checkpoints' weights generalises better than any of them (stochastic weight
averaging), each checkpoint becomes a model folder that every evaluation tool takes:

    python tools/checkpoint_models.py export RUN --step 5000 --out WORK/step5000
    python tools/checkpoint_models.py average --out WORK/mean WORK/step5000 WORK/step5500 RUN/model

Each model gets a card: the run's own card's ``training`` entry (so that the specimens it learnt
from are known: :func:`inference.resources.require_held_out`) with ``exported_checkpoint_step`` or
``weights_averaged_from`` added. Batch-norm statistics are averaged like every other weight.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import Any, Mapping

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _run_training_entry(run: pathlib.Path) -> dict[str, Any]:
    card = run / "model" / "model_card.json"
    return dict(json.loads(card.read_text()).get("training", {})) if card.is_file() else {}


def export_checkpoint(run: pathlib.Path, step: int, out: pathlib.Path, atlas: Mapping | None = None) -> pathlib.Path:
    """Save the weights of ``run``'s checkpoint at ``step`` as a model in ``out``; returns its path.
    ``atlas`` (volume + labels) defaults to the bundled atlas of the run's grid."""
    import keras
    import tensorflow as tf

    from inference.data.atlas import load_atlas
    from inference.errors import DataError
    from inference.model import build_model, save_model
    from inference.model_config import ModelConfig

    checkpoint_path = run / "checkpoints" / f"ckpt-{step}"
    if not pathlib.Path(f"{checkpoint_path}.index").is_file():
        kept = sorted(p.name.removesuffix(".index") for p in (run / "checkpoints").glob("ckpt-*.index"))
        raise DataError(f"{run}: no checkpoint at step {step} (kept: {', '.join(kept) or 'none'})")
    config = ModelConfig.from_dict(json.loads((run / "run.json").read_text())["model_config"])
    model = build_model(config, atlas if atlas is not None else load_atlas(config.grid))
    optimizer = keras.optimizers.Adam()
    optimizer.build(model.trainable_variables)
    # The same objects as inference.train saves, so that the checkpoint's names match.
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer,
                                     best_score=tf.Variable(np.nan, dtype=tf.float64, trainable=False),
                                     wall_time=tf.Variable(0.0, dtype=tf.float64, trainable=False))
    checkpoint.restore(str(checkpoint_path)).assert_existing_objects_matched().expect_partial()
    training = {**_run_training_entry(run), "exported_checkpoint_step": int(step), "run": str(run)}
    path, _ = save_model(model, out / f"hipatlas-{config.grid}.keras", card_extra={"training": training})
    return path


def average_models(models: list[pathlib.Path], out: pathlib.Path) -> pathlib.Path:
    """Save the element-wise mean of the weights of ``models`` (one architecture) in ``out``."""
    from inference.errors import ModelError
    from inference.model import load_model, model_config_of, save_model
    from inference.registration import model_file_in

    files = [model_file_in(m) for m in models]
    nets = [load_model(f) for f in files]
    configs = {json.dumps(model_config_of(n).to_dict(), sort_keys=True) for n in nets}
    if len(configs) != 1:
        raise ModelError("only models of one configuration can be averaged: " + ", ".join(map(str, files)))
    weights = [n.get_weights() for n in nets]
    nets[0].set_weights([np.mean([w[i] for w in weights], axis=0).astype(weights[0][i].dtype)
                         for i in range(len(weights[0]))])
    card = json.loads((files[0].parent / "model_card.json").read_text())
    training = {**card.get("training", {}), "weights_averaged_from": [str(f) for f in files]}
    path, _ = save_model(nets[0], out / files[0].name, card_extra={"training": training})
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="one checkpoint of a run as a model")
    export.add_argument("run", type=pathlib.Path, help="run folder of hipatlas train")
    export.add_argument("--step", type=int, required=True)
    export.add_argument("--out", type=pathlib.Path, required=True, help="model folder to write")
    average = commands.add_parser("average", help="the mean of several models' weights")
    average.add_argument("models", type=pathlib.Path, nargs="+", help="model folders or .keras files")
    average.add_argument("--out", type=pathlib.Path, required=True, help="model folder to write")
    args = parser.parse_args(argv)
    from inference.errors import HipAtlasError

    try:
        if args.command == "export":
            path = export_checkpoint(args.run, args.step, args.out)
        else:
            if len(args.models) < 2:
                parser.error("give at least two models to average")
            path = average_models(args.models, args.out)
    except HipAtlasError as error:
        print(f"checkpoint_models: {error}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
