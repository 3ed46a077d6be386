"""The paper's experiments, one command each: ``hipatlas experiment NAME --scale {quick,full} --out DIR``.

=====================  ==============================================================  =========
name                   what                                                            paper
=====================  ==============================================================  =========
``angle-sensitivity``  Dice/ASSD when the AP, LAT or both view angles are recorded      Fig. 3
                       0-10 deg off (orthogonal pairs, held-out phantoms)
``view-map``           median Dice over a grid of view-angle pairs (+-30 deg around     Fig. 4
                       AP and LAT) in 4-deg bins, with the 90-deg diagonal
``table1``             our network against an SDM baseline (PCA of 3D/3D deformations,    Table 1
                       weights regressed from the views) and a Kasten-style network
                       (label map regressed directly), paired t-tests
``table2``             ablations retrained on one data set (``hipatlas train``),        Table 2
                       affine-only and final metrics, paired t-tests, steps to converge
``loso``               leave one specimen out: each bundled specimen held out in turn,  (ours)
                       training settings compared on it, a recipe for the final model
=====================  ==============================================================  =========

``--scale quick`` uses the compact grid (the shipped model) and held-out phantom counts that fit a
2-core CPU; ``--scale full`` takes a paper-preset model (``--model``) and more phantoms. Each run
writes ``results.json`` (with provenance: command, commit, model sha256), ``results.md`` (a table
laid out like the paper's) and PNG plots into ``--out``, and resumes where it stopped when run
again with the same ``--out``. ``--ledger DIR`` (a folder kept in version control) also files each
finished training's scores there, so that a fresh machine resumes without training them again
(:class:`inference.experiments.common.Ledger`; table1, table2 and loso).
"""

from __future__ import annotations

import importlib
import logging
import pathlib
import sys
from typing import Any, Callable

log = logging.getLogger(__name__)

#: name -> module with ``run(ctx) -> dict``.
EXPERIMENTS: dict[str, str] = {
    "angle-sensitivity": "inference.experiments.angle",
    "view-map": "inference.experiments.viewmap",
    "table2": "inference.experiments.table2",
    "table1": "inference.experiments.table1",
    "loso": "inference.experiments.loso",
}


#: Experiments that score ``--model`` itself on the held-out phantoms (the others train their own
#: networks and name the model only in their provenance, or score it only on folds it never saw).
SCORES_THE_MODEL = ("angle-sensitivity", "view-map")


def run_experiment(name: str, out: str | pathlib.Path, *, scale: str = "quick", model: str | None = None,
                   seed: int = 7, progress: Callable | None = None, cancel: Any = None,
                   dry_run: bool = False, ledger: str | pathlib.Path | None = None) -> dict | str:
    """Run (or resume) experiment ``name``; returns its results (also written to ``out``).

    ``dry_run``: return the plan as text instead (experiments with a ``describe_plan``);
    ``ledger``: the folder of finished trainings' results to use and add to (see :class:`Ledger`)."""
    from inference.errors import ConfigError
    from inference.data.bones import specimen_of
    from inference.experiments.common import HELD_OUT_FEMURS, ExperimentContext, Ledger
    from inference.registration import model_file_in
    from inference.resources import held_out_model_file, require_held_out

    if name not in EXPERIMENTS:
        raise ConfigError(f"unknown experiment {name!r}; choose one of {', '.join(EXPERIMENTS)}")
    if scale == "full" and model is None:
        raise ConfigError("--scale full needs --model (a paper-preset model, e.g. from `hipatlas train --preset paper`)")
    held_out = specimen_of(HELD_OUT_FEMURS[0])
    model_path = model_file_in(model) if model else held_out_model_file(held_out)
    if name in SCORES_THE_MODEL:
        require_held_out(model_path, held_out)
    module = importlib.import_module(EXPERIMENTS[name])
    if dry_run and not hasattr(module, "describe_plan"):
        raise ConfigError(f"--dry-run is not available for {name}")
    ctx = ExperimentContext(name, pathlib.Path(out), scale, model_path, seed=seed, progress=progress, cancel=cancel,
                            ledger=Ledger(pathlib.Path(ledger)) if ledger else None)
    return module.describe_plan(ctx) if dry_run else module.run(ctx)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "experiment", help="reproduce one of the paper's experiments (Fig. 3, Fig. 4, Tables 1 and 2)",
        description="Run one of the paper's experiments on held-out phantoms and write results.json, "
        "results.md and plots; resumable (run again with the same --out).")
    parser.add_argument("name", choices=sorted(EXPERIMENTS), help="which experiment")
    parser.add_argument("--scale", choices=("quick", "full"), default="quick",
                        help="quick: compact grid, fits a 2-core CPU; full: a paper-preset model, more cases")
    parser.add_argument("--out", required=True, help="output folder (an existing run there is resumed)")
    parser.add_argument("--model", help="model .keras or folder (default: the shipped model that never learnt "
                        "from the held-out specimen JIA)")
    parser.add_argument("--seed", type=int, default=7, help="seed of the held-out phantoms and views (default 7)")
    parser.add_argument("--ledger", metavar="DIR",
                        help="folder (kept in version control, e.g. docs/results/ledger) where each finished "
                        "training's scores are filed and found again: a fresh machine trains only what is not there "
                        "(table1, table2, loso)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the plan (its steps: in the ledger, done or to do) and exit (loso, table1, table2, "
                        "angle-sensitivity)")
    parser.set_defaults(handler=_cli)


def _cli(args) -> int:
    def show(p) -> None:
        print(f"{100 * p.fraction:5.1f}% {p.message}", file=sys.stderr, flush=True)

    if args.dry_run:
        print(run_experiment(args.name, args.out, scale=args.scale, model=args.model, seed=args.seed, dry_run=True,
                             ledger=args.ledger))
        return 0
    run_experiment(args.name, args.out, scale=args.scale, model=args.model, seed=args.seed, progress=show,
                   ledger=args.ledger)
    print(pathlib.Path(args.out) / "results.md")
    return 0
