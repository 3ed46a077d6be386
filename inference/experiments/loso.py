"""Leave-one-specimen-out: which training setting generalises to a person the network never saw.

For each fold (one of the three bundled specimens, TLEM2, MC22 and JIA, held out; the other two
train) and each setting (:data:`SETTINGS`):

1. ``hipatlas shape-model`` of the fold's training femurs only (settings that use it);
2. ``hipatlas synth`` with ``--split train=<the other two>`` (no val, no test split: the held-out
   specimen is never rendered into training data), the same seed for every setting of a fold, so
   settings differ only in what they change;
3. ``hipatlas train`` from scratch with the shipped model's configuration, the same steps,
   learning rate and seed for every run; without a validation split the last model is the result
   (a checkpoint chosen on the held-out specimen would leak it into the choice);
4. scoring on held-out test pairs: phantoms of the held-out specimen's femurs (shape-, pose- and
   tissue-augmented as in ``hipatlas synth``), orthogonal views, the same pairs for every setting
   of a fold: Dice, Jaccard, ASSD, HD95, SSIM; two-sided paired t-tests between settings, per fold
   and over all folds' pairs.

The setting with the higher mean Dice over all folds' pairs is chosen, and ``final-recipe.json``
(:mod:`inference.recipe` format, ``hipatlas train --recipe final-recipe.json --out WORK``) trains
the shipped model's stages again with every specimen in training and that setting.

Every step resumes: a shape model with the same inputs is kept, ``synth`` keeps finished samples,
``train`` continues from its checkpoint (a ``done`` marker skips a finished run), and each scored
test pair is a unit (``OUT/folds/<fold>/units``). ``--dry-run`` prints the plan (folds x settings
and their commands) and which steps are already done.

Budget (``BUDGET``): quick = 240 phantoms per data set and 2,000 steps per training (batch 1, the
compact grid), 10 test pairs per fold. Measured in session 11 (2-core machine): 13-18 min per
training (0.40 s a step when idle), ~3 min of synth per data set, ~1 min of scoring per training:
the whole experiment in about 2 h. Earlier machines took 1.1-2 s a step (~5 h in all). Every finished
training's scores go to the ``--ledger``, so the experiment also resumes on a fresh machine.
full = 1,200 phantoms and 30,000 steps (a GPU).
"""

from __future__ import annotations

import math
import pathlib
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from inference.experiments.common import (METRICS, ExperimentContext, fmt, held_out_phantoms, pyplot, render_pair,
                                          data_set_complete, save_figure, summary, test_pairs_spec,
                                          write_results)

#: The bundled specimens; each fold holds out one of them (FOLDS) and trains on the others.
SPECIMENS = ("TLEM2", "MC22", "JIA")
FOLDS = SPECIMENS
#: Settings: whether the femurs are deformed by the fold's shape model (and within how many sd).
SETTINGS: dict[str, dict[str, Any]] = {
    "baseline": {"shape_model_sd": None},
    "shape-model": {"shape_model_sd": 1.0},
}
BUDGET = {"quick": {"subjects": 240, "steps": 2000, "checkpoint_every": 250, "test": 10, "workers": 2},
          "full": {"subjects": 1200, "steps": 30000, "checkpoint_every": 1000, "test": 30, "workers": 2}}
#: The metric that chooses the setting.
CHOICE_METRIC = "dice"
TESTED = ("dice", "assd_mm", "hd95_mm")


@dataclass(frozen=True)
class Step:
    """One command of the plan: ``hipatlas ARGS``; finished when ``done`` says so."""

    kind: str          # "shape-model", "synth" or "train"
    fold: str
    setting: str | None
    args: tuple[str, ...]
    marker: pathlib.Path
    #: the ledger holds the scores this step leads to: nothing to run
    recorded: bool = False

    def is_done(self) -> bool:
        if self.recorded:
            return True
        if self.kind == "synth":
            return data_set_complete(self.marker.parent)
        return self.marker.is_file()

    def finish(self) -> None:
        """Record that the command succeeded (train: the ``done`` marker; others write their own)."""
        if self.kind == "train":
            self.marker.write_text("", encoding="utf-8")


def runner(args: list[str], what: str) -> None:
    """Run ``hipatlas ARGS`` in its own process (tests replace it to watch the commands)."""
    from inference.recipe import run_hipatlas

    run_hipatlas(args, what)


def specimen_femurs(specimen: str) -> list[str]:
    """The bundled femurs of one specimen (e.g. TLEM2: both scans, both sides)."""
    from inference.data.dataset import available_femurs

    return [f.name for f in available_femurs() if f.specimen == specimen]


def training_specimens(fold: str) -> list[str]:
    return [s for s in SPECIMENS if s != fold]


def model_config(ctx: ExperimentContext) -> dict:
    """The model configuration every run trains (the reference model's; read from its card)."""
    from inference.model_config import card_path_for, read_model_card

    card = card_path_for(ctx.model_path)
    if card.is_file():
        return dict(read_model_card(card)["config"])
    return ctx.config.to_dict()


def _synth_args(ctx: ExperimentContext, fold: str, setting: str) -> list[str]:
    """``hipatlas synth`` arguments of one fold and setting, without paths (the shape model's
    file is added by :func:`plan`)."""
    budget = BUDGET[ctx.scale]
    args = ["--subjects", str(budget["subjects"]), "--grid", model_config(ctx).get("grid", "compact"),
            "--geometry", "orthogonal", "--seed", str(ctx.seed + 20), "--max-translation-mm", "10",
            "--split", "train=" + ",".join(training_specimens(fold))]
    sd = SETTINGS[setting]["shape_model_sd"]
    return args if sd is None else args + ["--shape-model-sd", str(sd)]


def _train_args(ctx: ExperimentContext) -> list[str]:
    return ["--steps", str(BUDGET[ctx.scale]["steps"]), "--lr", "3e-4", "--seed", "0"]


def ledger_key(ctx: ExperimentContext, fold: str, setting: str) -> tuple[str, dict]:
    """The ledger label and inputs of one training: everything its scores depend on, no paths."""
    uses_model = SETTINGS[setting]["shape_model_sd"] is not None
    return f"loso-{fold}-{setting}", {
        "experiment": "loso", "fold": fold, "setting": setting, "model_config": model_config(ctx),
        "shape_model": {"split": "train=" + ",".join(training_specimens(fold))} if uses_model else None,
        "synth": _synth_args(ctx, fold, setting), "train": _train_args(ctx),
        "test": test_pairs_spec(ctx, BUDGET[ctx.scale]["test"], specimen_femurs(fold))}


def plan(ctx: ExperimentContext) -> list[Step]:
    """Every command of the experiment, in order (folds x settings)."""
    budget = BUDGET[ctx.scale]
    config_path = ctx.out / "model_config.json"
    steps: list[Step] = []
    for fold in FOLDS:
        train = training_specimens(fold)
        shape_model = ctx.out / "shape_models" / f"without-{fold}.npz"
        recorded = {setting: ctx.recorded(*ledger_key(ctx, fold, setting)) is not None for setting in SETTINGS}
        users = [setting for setting, change in SETTINGS.items() if change["shape_model_sd"] is not None]
        if users:
            steps.append(Step("shape-model", fold, None,
                              ("shape-model", "--out", str(shape_model), "--split", "train=" + ",".join(train),
                               "--split", f"test={fold}", "--quiet"), shape_model,
                              recorded=all(recorded[setting] for setting in users)))
        for setting, change in SETTINGS.items():
            data = ctx.out / "data" / fold / setting
            synth = _synth_args(ctx, fold, setting)
            if change["shape_model_sd"] is not None:
                synth[-2:-2] = ["--shape-model", str(shape_model)]
            steps.append(Step("synth", fold, setting,
                              ("synth", "--out", str(data), *synth, "--workers", str(budget["workers"]), "--quiet"),
                              data / "manifest.json", recorded=recorded[setting]))
            run = ctx.out / "runs" / fold / setting
            steps.append(Step("train", fold, setting,
                              ("train", "--data", str(data), "--out", str(run), "--model-config", str(config_path),
                               *_train_args(ctx), "--checkpoint-every", str(budget["checkpoint_every"])),
                              run / "done", recorded=recorded[setting]))
    return steps


def describe_plan(ctx: ExperimentContext) -> str:
    """The plan as text: one line per step, ``[done]`` or ``[todo]``, and its command."""
    lines = [f"# leave-one-specimen-out ({ctx.scale}): folds {', '.join(FOLDS)} x settings {', '.join(SETTINGS)}; "
             f"{BUDGET[ctx.scale]['test']} held-out test pairs per fold"
             + (f"; ledger {ctx.ledger.folder} ([ledger]: its scores are there, nothing to run)" if ctx.ledger else "")]
    for step in plan(ctx):
        state = "ledger" if step.recorded else "done" if step.is_done() else "todo"
        label = f"{step.fold} held out" + (f", {step.setting}" if step.setting else "")
        lines.append(f"[{state}] {step.kind} ({label}): hipatlas {' '.join(step.args)}")
    return "\n".join(lines)


def _fold_context(ctx: ExperimentContext, fold: str) -> ExperimentContext:
    return ExperimentContext(f"{ctx.name}-{fold}", ctx.out / "folds" / fold, ctx.scale, ctx.model_path, seed=ctx.seed,
                             progress=ctx.progress, cancel=ctx.cancel, ledger=ctx.ledger, _model=ctx.model)


def run_steps(ctx: ExperimentContext, after: Callable[[Step], None] | None = None) -> list[Step]:
    """Run every step of the plan that is not done yet (in order); ``after(step)`` is called once
    each step is done (run now, before, or in the ledger). Returns the plan."""
    from inference.io import write_json_atomic

    write_json_atomic(ctx.out / "model_config.json", model_config(ctx))
    steps = plan(ctx)
    for number, step in enumerate(steps):
        label = f"{step.kind}: {step.fold} held out" + (f", {step.setting}" if step.setting else "")
        ctx.report(number, len(steps) + 1, label)
        if not step.is_done():
            runner(list(step.args), f"loso {label}")
            step.finish()
        if after is not None:
            after(step)
    return steps


def score(ctx: ExperimentContext, fold: str, setting: str) -> list[dict]:
    """The held-out pairs' metrics of one finished training: from the ledger, else scored (each
    pair a unit in ``OUT/folds/<fold>/units``) and then filed in the ledger."""
    label, inputs = ledger_key(ctx, fold, setting)
    recorded = ctx.recorded(label, inputs)
    if recorded is not None:
        return recorded["scores"]
    from inference.model import load_model
    from inference.registration import model_file_in

    fold_ctx = _fold_context(ctx, fold)
    run_dir = ctx.out / "runs" / fold / setting
    model = None

    def compute(phantom):
        nonlocal model
        from inference.evaluate import evaluate_samples

        model = model or load_model(model_file_in(run_dir / "model"))
        row = evaluate_samples(model, [render_pair(fold_ctx, phantom, (0.0, 90.0))], with_hip_centre=False)[0]
        return {m: row[m] for m in METRICS}

    phantoms = held_out_phantoms(fold_ctx, BUDGET[ctx.scale]["test"], specimen_femurs(fold))
    rows = [fold_ctx.unit(f"{setting}_{p.key}", lambda p=p: compute(p)) for p in phantoms]
    ctx.record(label, inputs, {"scores": rows})
    return rows


def run(ctx: ExperimentContext) -> dict[str, Any]:
    scores: dict[str, dict[str, list[dict]]] = {fold: {} for fold in FOLDS}

    def after(step: Step) -> None:
        if step.kind == "train":
            ctx.report(0, 1, f"scoring {step.fold} held out, {step.setting}")
            scores[step.fold][step.setting] = score(ctx, step.fold, step.setting)

    run_steps(ctx, after)
    ctx.report(1, 1, "scoring the reference model")
    return report(ctx, scores, BUDGET[ctx.scale], reference_scores(ctx))


def paired_test(a: list[dict], b: list[dict], metric: str) -> float:
    """Two-sided paired t-test p-value of ``metric`` between two settings' rows (same pairs)."""
    from scipy import stats

    x = np.array([r.get(metric) if r.get(metric) is not None else np.nan for r in a], float)
    y = np.array([r.get(metric) if r.get(metric) is not None else np.nan for r in b], float)
    keep = np.isfinite(x) & np.isfinite(y)
    if keep.sum() < 2 or not np.any(x[keep] != y[keep]):
        return math.nan
    return float(stats.ttest_rel(x[keep], y[keep]).pvalue)


def choose(table: dict[str, dict[str, Any]]) -> str:
    """The setting with the higher pooled mean :data:`CHOICE_METRIC` (the first on a tie)."""
    best = None
    for setting in SETTINGS:
        mean = table[setting][CHOICE_METRIC]["mean"]
        if mean is not None and (best is None or mean > table[best][CHOICE_METRIC]["mean"]):
            best = setting
    return best or next(iter(SETTINGS))


def reference_scores(ctx: ExperimentContext) -> dict[str, list[dict]]:
    """The reference model itself (``--model``, default the shipped one), not retrained, scored on
    the pairs of each fold whose specimen it never learnt from: how far the quick budget's
    trainings are from a fully trained model. Folds it trained on are left out."""
    from inference.resources import trained_specimens

    trained = trained_specimens(ctx.model_path)
    if trained is None:
        return {}
    out = {}
    for fold in FOLDS:
        if fold in trained:
            continue
        fold_ctx = _fold_context(ctx, fold)

        def compute(phantom):
            from inference.evaluate import evaluate_samples

            row = evaluate_samples(ctx.model, [render_pair(fold_ctx, phantom, (0.0, 90.0))], with_hip_centre=False)[0]
            return {m: row[m] for m in METRICS}

        phantoms = held_out_phantoms(fold_ctx, BUDGET[ctx.scale]["test"], specimen_femurs(fold))
        out[fold] = [fold_ctx.unit(f"reference_{p.key}", lambda p=p: compute(p)) for p in phantoms]
    return out


def report(ctx: ExperimentContext, scores: dict[str, dict[str, list[dict]]], budget: dict,
           reference_rows: dict[str, list[dict]] | None = None) -> dict[str, Any]:
    """results.json, results.md, loso.png and final-recipe.json from the scored pairs;
    ``reference_rows`` (:func:`reference_scores`) add a row per fold, outside the choice."""
    from inference.io import write_json_atomic

    reference_rows = reference_rows or {}
    reference_table = {fold: {m: summary([r.get(m) for r in rows]) for m in METRICS}
                       for fold, rows in reference_rows.items()}

    settings = list(SETTINGS)
    per_fold = {fold: {s: {m: summary([r.get(m) for r in rows[s]]) for m in METRICS} for s in settings}
                for fold, rows in scores.items()}
    pooled_rows = {s: [r for fold in scores for r in scores[fold][s]] for s in settings}
    pooled = {s: {m: summary([r.get(m) for r in pooled_rows[s]]) for m in METRICS} for s in settings}
    reference = settings[0]
    p_values = {s: {"pooled": {m: paired_test(pooled_rows[reference], pooled_rows[s], m) for m in TESTED},
                    **{fold: {m: paired_test(scores[fold][reference], scores[fold][s], m) for m in TESTED}
                       for fold in scores}}
                for s in settings[1:]}
    chosen = choose(pooled)
    recipe = final_recipe(ctx, chosen)
    write_json_atomic(ctx.out / "final-recipe.json", recipe)
    _plot(ctx, per_fold, pooled)
    n_pairs = {fold: len(scores[fold][reference]) for fold in scores}
    lines = [f"Each run: `hipatlas synth` {budget['subjects']} phantoms of the two training specimens (orthogonal "
             f"views, the same seed for every setting of a fold), then `hipatlas train` {budget['steps']} steps from "
             "scratch (Adam 3e-4, seed 0, batch 1, the reference model's configuration; no validation split, the "
             "last model). Scored on held-out test pairs of the left-out specimen (orthogonal views; "
             + ", ".join(f"{fold} {n}" for fold, n in n_pairs.items())
             + " pairs). p: two-sided paired t-test against `" + reference + "` on the same pairs.", "",
             "| held out | setting | Dice | Jaccard | ASSD (mm) | HD95 (mm) | p (Dice) | p (ASSD) |",
             "|---|---|---|---|---|---|---|---|"]
    for fold in list(scores) + ["all folds"]:
        for s in settings:
            t = pooled[s] if fold == "all folds" else per_fold[fold][s]
            p = (p_values.get(s, {}).get("pooled" if fold == "all folds" else fold, {}))
            lines.append(f"| {fold} | {s} | {fmt(t['dice'])} | {fmt(t['jaccard'])} | {fmt(t['assd_mm'], 2)} | "
                         f"{fmt(t['hd95_mm'], 2)} | {_p(p.get('dice'))} | {_p(p.get('assd_mm'))} |")
        if fold in reference_table:
            t = reference_table[fold]
            lines.append(f"| {fold} | reference model, not retrained | {fmt(t['dice'])} | {fmt(t['jaccard'])} | "
                         f"{fmt(t['assd_mm'], 2)} | {fmt(t['hd95_mm'], 2)} | - | - |")
    if reference_table:
        lines += ["", f"Reference model: `{ctx.model_path.name}` as shipped (its full recipe, more phantoms and "
                  "steps than a run here), scored on the same pairs of the folds whose specimen it never learnt "
                  "from (" + ", ".join(reference_table) + "); it takes no part in the choice. The gap between it "
                  "and a fold's runs is what this quick budget leaves out."]
    lines += ["", f"Chosen setting (higher mean {CHOICE_METRIC} over all folds' pairs): **{chosen}**. The final model "
              "trains on every specimen with it: `hipatlas train --recipe final-recipe.json --out WORK`.", "",
              "![Dice per fold and setting](loso.png)"]
    results = {"budget": budget, "folds": list(scores), "settings": SETTINGS, "per_fold": per_fold, "pooled": pooled,
               "p_values": p_values, "chosen": chosen, "scores": scores, "test_pairs": n_pairs,
               "final_recipe": "final-recipe.json", "reference_model": {"table": reference_table,
                                                                        "scores": reference_rows}}
    write_results(ctx, results, "\n".join(lines))
    return results


def final_recipe(ctx: ExperimentContext, setting: str) -> dict[str, Any]:
    """The shipped model's recipe (its card's ``training.recipe``) with every specimen in training
    and ``setting``'s augmentation; no validation split is left, so each stage's last model is its
    result and there is no ``verify`` (the held-out estimate is this experiment's table). Stages are
    renamed ``<name>-all`` (``compact-v2`` -> ``compact-v2-all``): another model, shipped beside the
    old one with ``tools/ship_model.py RUN NAME --held-out-estimate results.json``."""
    from inference.model_config import card_path_for, read_model_card
    from inference.recipe import RECIPE_FORMAT

    card = card_path_for(ctx.model_path)
    shipped = (read_model_card(card).get("training") or {}).get("recipe") if card.is_file() else None
    if not shipped:
        from inference.resources import default_model_file

        shipped = read_model_card(card_path_for(default_model_file()))["training"]["recipe"]
    everyone = "train=" + ",".join(SPECIMENS)
    sd = SETTINGS[setting]["shape_model_sd"]
    datasets = []
    for item in shipped["datasets"]:
        args = _without(_without(list(item["synth"]), "--split"), "--shape-model-sd")
        entry = {"name": item["name"], "synth": args + ["--split", everyone]}
        if sd is not None:
            entry["synth"] += ["--shape-model-sd", str(sd)]
            entry["shape_model"] = "all-specimens"
        datasets.append(entry)
    def all_of(name: str) -> str:  # idempotent: the recipe of a model already trained on everyone keeps its names
        return name if name.endswith("-all") else f"{name}-all"

    stages = []
    for stage in shipped["stages"]:
        args = list(stage["train"])
        stages.append({**stage, "name": all_of(stage["name"]), "train": _without(_without(args, "--validate-every"),
                                                                                  "--val-limit"),
                       "init_from": all_of(stage["init_from"]) if stage.get("init_from") else None})
    base_name = shipped.get("name", "model").removesuffix("-all-specimens")
    recipe = {"format": RECIPE_FORMAT, "name": f"{base_name}-all-specimens",
              "description": f"{base_name}'s stages with every bundled specimen "
              f"({', '.join(SPECIMENS)}) in training and the setting '{setting}' chosen by leave-one-specimen-out "
              f"({ctx.scale} scale, {ctx.out / 'results.md'}). No specimen is left for validation: each stage's "
              "last model is its result.",
              "datasets": datasets, "stages": stages, "model_config": model_config(ctx)}
    if sd is not None:
        recipe["shape_models"] = [{"name": "all-specimens", "build": ["--split", everyone]}]
    return recipe


def _without(args: list[str], option: str) -> list[str]:
    """``args`` without ``option`` and its value."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a == option:
            skip = True
        else:
            out.append(a)
    return out


def _p(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else (f"{value:.3f}" if value >= 0.001 else "<0.001")


def _plot(ctx: ExperimentContext, per_fold, pooled) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    groups = list(per_fold) + ["all"]
    width = 0.8 / len(SETTINGS)
    for ax, (metric, label) in zip(axes, (("dice", "Dice"), ("assd_mm", "ASSD (mm)"))):
        for k, s in enumerate(SETTINGS):
            stats = [per_fold[g][s][metric] if g in per_fold else pooled[s][metric] for g in groups]
            ax.bar(np.arange(len(groups)) + k * width, [t["mean"] or 0 for t in stats], width,
                   yerr=[t["sd"] or 0 for t in stats], capsize=3, label=s)
        ax.set_xticks(np.arange(len(groups)) + width * (len(SETTINGS) - 1) / 2, [f"{g} held out" if g != "all" else g
                                                                                 for g in groups], rotation=15)
        ax.set_ylabel(f"{label} (mean +- sd)")
    axes[0].legend()
    fig.suptitle(f"Leave one specimen out ({ctx.scale} scale)")
    save_figure(fig, ctx.out / "loso.png")
    plt.close(fig)


__all__ = ["SPECIMENS", "FOLDS", "SETTINGS", "BUDGET", "Step", "plan", "describe_plan", "run_steps", "run", "report",
           "final_recipe", "choose", "score", "ledger_key",
           "paired_test", "specimen_femurs", "training_specimens"]
