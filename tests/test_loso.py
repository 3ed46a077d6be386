"""Tests of ``hipatlas experiment loso`` (inference.experiments.loso): the plan, resume, the report
and the final recipe. The end-to-end run on tiny budgets (real shape models, synth and train
processes) is marked slow."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from inference import cli
from inference.errors import DataError
from inference.experiments import loso
from inference.experiments.common import ExperimentContext
from inference.model_config import ModelConfig
from inference.recipe import check_recipe, recipe_commands
from inference.resources import default_model_file


def _ctx(tmp_path, scale="quick") -> ExperimentContext:
    return ExperimentContext("loso", tmp_path / "loso", scale, default_model_file())


def _value(args, option):
    return [args[i + 1] for i, a in enumerate(args) if a == option]


# ----------------------------------------------------------------------------------------------
# The plan
# ----------------------------------------------------------------------------------------------
def test_plan_is_folds_by_settings_and_never_trains_on_the_held_out_specimen(tmp_path):
    ctx = _ctx(tmp_path)
    steps = loso.plan(ctx)
    assert [s.kind for s in steps].count("shape-model") == 3
    assert {(s.fold, s.setting) for s in steps if s.kind == "train"} == {
        (f, s) for f in ("TLEM2", "MC22", "JIA") for s in ("baseline", "shape-model")}
    seeds = {}
    for step in steps:
        args = list(step.args)
        if step.kind in ("shape-model", "synth"):
            train = [v for v in _value(args, "--split") if v.startswith("train=")]
            assert len(train) == 1
            specimens = set(train[0].split("=")[1].split(","))
            assert specimens == {"TLEM2", "MC22", "JIA"} - {step.fold}, step
        if step.kind == "synth":
            seeds.setdefault(step.fold, set()).update(_value(args, "--seed"))
            shape_models = _value(args, "--shape-model")
            if step.setting == "baseline":
                assert not shape_models
            else:  # this fold's model, built without the held-out specimen
                assert shape_models == [str(ctx.out / "shape_models" / f"without-{step.fold}.npz")]
                assert _value(args, "--shape-model-sd") == ["1.0"]
                index = steps.index(step)
                built = [s for s in steps[:index] if s.kind == "shape-model" and s.fold == step.fold]
                assert built and _value(list(built[0].args), "--out") == shape_models
        if step.kind == "train":
            assert _value(args, "--steps") == [str(loso.BUDGET["quick"]["steps"])]
            assert _value(args, "--data") == [str(ctx.out / "data" / step.fold / step.setting)]
            assert "--validate-every" not in args  # no checkpoint chosen on the held-out specimen
    # both settings of a fold see the same phantoms: one seed per fold
    assert all(len(v) == 1 for v in seeds.values())


def test_dry_run_prints_the_plan(tmp_path, capsys):
    out = tmp_path / "dry"
    assert cli.main(["experiment", "loso", "--scale", "quick", "--out", str(out), "--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("# leave-one-specimen-out (quick)")
    assert len(lines) == 1 + 3 + 6 + 6 and all(line.startswith("[todo] ") for line in lines[1:])
    assert sum("hipatlas train " in line for line in lines) == 6
    assert not (out / "model_config.json").exists()  # a dry run runs nothing
    assert cli.main(["experiment", "view-map", "--out", str(tmp_path / "vm"), "--dry-run"]) == 2


# ----------------------------------------------------------------------------------------------
# Resume
# ----------------------------------------------------------------------------------------------
class Recorder:
    """Stands in for the ``hipatlas`` process: records the command and leaves what it would leave."""

    def __init__(self, fail_on: str | None = None):
        self.commands: list[list[str]] = []
        self.fail_on = fail_on

    def __call__(self, args, what):
        self.commands.append(list(args))
        out = _value(args, "--out")[0]
        if self.fail_on and self.fail_on in out:
            raise DataError(f"{what} failed with exit status 1")
        import pathlib

        path = pathlib.Path(out)
        if args[0] == "shape-model":
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"model")
        elif args[0] == "synth":
            path.mkdir(parents=True, exist_ok=True)
            (path / "manifest.json").write_text(json.dumps({"complete": True}))
        else:
            path.mkdir(parents=True, exist_ok=True)


def test_resume_skips_finished_steps(tmp_path, monkeypatch):
    ctx = _ctx(tmp_path)
    steps = loso.plan(ctx)
    # finished before: the first fold's shape model and its baseline data set; a synth that
    # stopped half-way (manifest not complete) must run again
    first = [s for s in steps if s.fold == "TLEM2"]
    Recorder()(list(first[0].args), "")
    Recorder()(list(first[1].args), "")
    half = ctx.out / "data" / "TLEM2" / "shape-model"
    half.mkdir(parents=True)
    (half / "manifest.json").write_text(json.dumps({"complete": False}))

    failing = Recorder(fail_on=str(ctx.out / "runs" / "MC22" / "baseline"))
    monkeypatch.setattr(loso, "runner", failing)
    with pytest.raises(DataError):
        loso.run_steps(ctx)
    ran = [_value(c, "--out")[0] for c in failing.commands]
    assert str(first[0].marker) not in ran and str(first[1].marker.parent) not in ran
    assert str(half) in ran
    assert not (ctx.out / "runs" / "MC22" / "baseline" / "done").exists()

    again = Recorder()
    monkeypatch.setattr(loso, "runner", again)
    loso.run_steps(ctx)
    # only the failed training and what follows it
    assert again.commands[0][0] == "train" and _value(again.commands[0], "--out") == [
        str(ctx.out / "runs" / "MC22" / "baseline")]
    assert len(again.commands) == len(steps) - 2 - len(failing.commands) + 1  # 2 finished before
    assert "[todo]" not in loso.describe_plan(ctx)

    done = Recorder()
    monkeypatch.setattr(loso, "runner", done)
    loso.run_steps(ctx)
    assert done.commands == []


# ----------------------------------------------------------------------------------------------
# Report, choice, final recipe
# ----------------------------------------------------------------------------------------------
def _scores(gain: float, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    scores = {}
    for fold in loso.FOLDS:
        base = [{"dice": float(d), "jaccard": float(d / (2 - d)), "assd_mm": float(2 - d), "hd95_mm": 4.0,
                 "ssim": None} for d in rng.uniform(0.85, 0.92, 4)]
        better = [{**r, "dice": r["dice"] + gain + float(rng.normal(0, 0.001)),
                   "assd_mm": r["assd_mm"] - gain + float(rng.normal(0, 0.001))}
                  for r in base]
        scores[fold] = {"baseline": base, "shape-model": better}
    return scores


@pytest.mark.parametrize("gain", [0.02, -0.02])
def test_report_chooses_the_better_setting_and_writes_its_recipe(tmp_path, gain):
    ctx = _ctx(tmp_path)
    results = loso.report(ctx, _scores(gain), loso.BUDGET["quick"])
    chosen = "shape-model" if gain > 0 else "baseline"
    assert results["chosen"] == chosen
    pooled = results["pooled"]
    assert pooled["shape-model"]["dice"]["mean"] - pooled["baseline"]["dice"]["mean"] == pytest.approx(gain, abs=0.002)
    assert pooled["baseline"]["dice"]["n"] == 12 and results["test_pairs"] == {f: 4 for f in loso.FOLDS}
    p = results["p_values"]["shape-model"]
    assert p["pooled"]["dice"] < 1e-6 and all(p[f]["dice"] < 0.01 for f in loso.FOLDS)
    assert math.isnan(p["pooled"]["hd95_mm"])  # identical on every pair: no test
    for name in ("results.json", "results.md", "loso.png", "final-recipe.json"):
        assert (ctx.out / name).is_file()
    assert f"**{chosen}**" in (ctx.out / "results.md").read_text()

    recipe = json.loads((ctx.out / "final-recipe.json").read_text())
    check_recipe(recipe)
    work = tmp_path / "work"
    commands = recipe_commands(recipe, work)
    synths = [args for name, args in commands if args[0] == "synth"]
    assert synths and all(_value(a, "--split") == ["train=TLEM2,MC22,JIA"] for a in synths)
    assert all("--validate-every" not in args and "--val-limit" not in args for _, args in commands)
    assert not any(args[0] == "evaluate" for _, args in commands)
    if chosen == "shape-model":
        assert commands[0][1][:3] == ["shape-model", "--out", str(work / "shape_models" / "all-specimens.npz")]
        assert _value(commands[0][1], "--split") == ["train=TLEM2,MC22,JIA"]
        assert all(_value(a, "--shape-model") == [str(work / "shape_models" / "all-specimens.npz")] for a in synths)
    else:
        assert "shape_models" not in recipe and all("--shape-model" not in a for a in synths)
    shipped = json.loads(default_model_file().with_name("model_card.json").read_text())["training"]["recipe"]
    # compact-v2's stages become compact-v2-all's; a model trained on everyone keeps its names
    assert [s["name"] for s in recipe["stages"]] == [s["name"].removesuffix("-all") + "-all" for s in shipped["stages"]]
    assert [s["init_from"] for s in recipe["stages"]] == [s["init_from"] and s["init_from"].removesuffix("-all") + "-all"
                                                          for s in shipped["stages"]]
    assert ModelConfig.from_dict(recipe["model_config"]) == ModelConfig.from_dict(shipped["model_config"])


# ----------------------------------------------------------------------------------------------
# End to end on tiny budgets
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(2400)  # 5 hipatlas processes (TensorFlow start, bone models): ~15 min on a loaded machine
def test_tiny_loso_end_to_end_and_resume(tmp_path, monkeypatch):
    # one fold (JIA held out, trained on TLEM2 + MC22): every kind of step, with real processes
    monkeypatch.setattr(loso, "FOLDS", ("JIA",))
    monkeypatch.setitem(loso.BUDGET, "quick", {"subjects": 2, "steps": 2, "checkpoint_every": 1, "test": 1,
                                               "workers": 0})
    calls = []
    real = loso.runner
    monkeypatch.setattr(loso, "runner", lambda args, what: (calls.append(args), real(args, what)))
    ctx = _ctx(tmp_path)
    results = loso.run(ctx)
    assert len(calls) == 5
    for fold in loso.FOLDS:
        for setting in loso.SETTINGS:
            row = results["scores"][fold][setting][0]
            assert 0.0 <= row["dice"] <= 1.0 and (ctx.out / "runs" / fold / setting / "done").is_file()
    model = json.loads((ctx.out / "data" / "JIA" / "shape-model" / "manifest.json").read_text())
    assert model["parameters"]["config"]["shape_model"]["specimens"] == ["MC22", "TLEM2"]
    assert all(s["specimen"] != "JIA" for s in model["samples"])
    assert (ctx.out / "results.md").is_file() and (ctx.out / "loso.png").is_file()
    check_recipe(json.loads((ctx.out / "final-recipe.json").read_text()))
    calls.clear()
    again = loso.run(ctx)
    assert calls == [] and again["scores"] == results["scores"]


def test_a_recipe_naming_an_unknown_shape_model_is_refused(tmp_path):
    from inference.errors import ConfigError

    ctx = _ctx(tmp_path)
    recipe = loso.final_recipe(ctx, "shape-model")
    check_recipe(recipe)
    recipe["shape_models"] = [{"name": "other", "build": ["--split", "train=TLEM2"]}]
    with pytest.raises(ConfigError, match="unknown shape model 'all-specimens'"):
        check_recipe(recipe)
    recipe["shape_models"] = [{"name": "other", "build": "--split train=TLEM2"}]
    with pytest.raises(ConfigError, match="shape_models must be a list"):
        check_recipe(recipe)


def test_a_model_of_every_specimen_ships_with_the_loso_estimate_instead_of_a_validation(tmp_path):
    import hashlib

    from tool_helpers import load_tool

    ship_model = load_tool("ship_model")

    ctx = _ctx(tmp_path)
    results = loso.report(ctx, _scores(0.02), loso.BUDGET["quick"])
    recipe = ctx.out / "final-recipe.json"
    run = tmp_path / "run" / "model"
    run.mkdir(parents=True)
    (run / "m.keras").write_bytes(b"weights")
    card = {"sha256": hashlib.sha256(b"weights").hexdigest(), "training": {"data_dir": "/x/compact", "steps": 5}}
    (run / "model_card.json").write_text(json.dumps(card))
    models = tmp_path / "models"
    args = [str(run.parent), "compact-v2-all", "--held-out-estimate", str(ctx.out / "results.json"),
            "--recipe", str(recipe), "--models-dir", str(models)]
    assert ship_model.main(args) == 0
    shipped = json.loads((models / "compact-v2-all" / "model_card.json").read_text())
    estimate = shipped["held_out_estimate"]
    assert "val_metrics" not in shipped and estimate["setting"] == results["chosen"] == "shape-model"
    assert estimate["pooled"]["dice"] == pytest.approx(results["pooled"]["shape-model"]["dice"]["mean"])
    assert estimate["pooled"]["pairs"] == 12 and set(estimate["per_fold"]) == set(loso.FOLDS)
    assert shipped["training"]["recipe"]["stages"][-1]["name"] == "compact-v2-all"
    assert "verify" not in shipped["training"]["recipe"]
    # the recipe's last stage must be the model's name; a model of a held-out split needs --evaluation
    with pytest.raises(SystemExit, match="not 'other'"):
        ship_model.main([*args[:1], "other", *args[2:]])
