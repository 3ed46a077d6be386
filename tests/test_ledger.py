"""The experiments' ledger: finished trainings' scores outlive the machine that trained them.

A fresh machine (a new ``--out``) with the same ledger runs only what the ledger lacks; the
commands that would run are watched by stand-ins, so nothing here trains."""

from __future__ import annotations

import json
import logging

import pytest

from inference import cli
from inference.errors import DataError
from inference.experiments import loso, table1, table2
from inference.experiments.common import ExperimentContext, Ledger, fingerprint
from inference.resources import default_model_file, held_out_model_file


def _row(dice: float) -> dict:
    return {"dice": dice, "jaccard": dice / (2 - dice), "assd_mm": 2 - 2 * dice, "hd95_mm": 3.0, "ssim": None}


def test_an_entry_is_found_only_for_the_same_inputs(tmp_path, caplog):
    ledger = Ledger(tmp_path / "ledger")
    inputs = {"train": ["--steps", "2000"], "test": {"seed": 7, "count": 10}}
    assert ledger.get("row-ours", inputs) is None
    path = ledger.put("row-ours", inputs, {"scores": [_row(0.9)]})
    assert path.parent == tmp_path / "ledger" and fingerprint(inputs)[:12] in path.name
    # key order does not matter; any changed input does
    assert ledger.get("row-ours", {"test": {"count": 10, "seed": 7}, "train": ["--steps", "2000"]}) == {
        "scores": [_row(0.9)]}
    assert ledger.get("row-ours", {**inputs, "train": ["--steps", "1000"]}) is None
    entry = json.loads(path.read_text())
    assert entry["inputs"] == inputs and entry["provenance"]["measured_at"] and "commit" in entry["provenance"]
    assert [e["label"] for e in ledger.entries()] == ["row-ours"]
    # an entry edited by hand no longer matches its own fingerprint: ignored, with a warning
    entry["inputs"]["train"] = ["--steps", "10"]
    path.write_text(json.dumps(entry))
    with caplog.at_level(logging.WARNING):
        assert ledger.get("row-ours", inputs) is None
    assert "does not match" in caplog.text


class Recorder:
    """Stands in for the ``hipatlas`` process: records the command and leaves its marker."""

    def __init__(self):
        self.commands: list[list[str]] = []

    def __call__(self, args, what):
        import pathlib

        self.commands.append(list(args))
        out = pathlib.Path(args[args.index("--out") + 1])
        if args[0] == "shape-model":
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(b"model")
        else:
            out.mkdir(parents=True, exist_ok=True)
            if args[0] == "synth":
                (out / "manifest.json").write_text(json.dumps({"complete": True}))


def test_loso_on_a_fresh_machine_trains_only_what_the_ledger_lacks(tmp_path, monkeypatch):
    monkeypatch.setitem(loso.BUDGET, "quick", {**loso.BUDGET["quick"], "test": 1})
    ledger = Ledger(tmp_path / "ledger")
    # the model run_experiment gives loso by default: a shipped one that never learnt from JIA
    ctx = ExperimentContext("loso", tmp_path / "machine-1", "quick", held_out_model_file("JIA"), ledger=ledger)
    recorded = {(f, s): _row(0.80 + 0.01 * k) for k, (f, s) in
                enumerate((f, s) for f in loso.FOLDS for s in loso.SETTINGS)}
    last = ("JIA", "shape-model")
    for (fold, setting), row in recorded.items():
        if (fold, setting) != last:
            ledger.put(*loso.ledger_key(ctx, fold, setting), {"scores": [row]})
    plan = loso.describe_plan(ctx).splitlines()
    assert sum(line.startswith("[ledger] ") for line in plan) == 12  # 2 folds x 5 steps, JIA's baseline x 2
    assert [line.split(" (")[0] for line in plan if line.startswith("[todo]")] == ["[todo] shape-model",
                                                                                  "[todo] synth", "[todo] train"]
    # the one training the ledger lacks: its pair's score is already a unit on this machine
    units = ctx.out / "folds" / "JIA" / "units"
    units.mkdir(parents=True)
    (units / "shape-model_p000.json").write_text(json.dumps(recorded[last]))
    runner = Recorder()
    monkeypatch.setattr(loso, "runner", runner)
    results = loso.run(ctx)
    assert [c[0] for c in runner.commands] == ["shape-model", "synth", "train"]
    assert all("JIA" in c[c.index("--out") + 1] for c in runner.commands)
    assert {(f, s): rows[0] for f, settings in results["scores"].items() for s, rows in settings.items()} == recorded
    # that model never learnt from JIA: it is scored on JIA's pair as a reference row
    assert set(results["reference_model"]["table"]) == {"JIA"}
    assert 0.5 < results["reference_model"]["scores"]["JIA"][0]["dice"] <= 1.0
    assert "| JIA | reference model, not retrained |" in (ctx.out / "results.md").read_text()
    written = json.loads((ctx.out / "results.json").read_text())["ledger"]
    assert len(written) == 6 and "loso-JIA-shape-model" in written
    assert "filed in the ledger" in (ctx.out / "results.md").read_text()

    # a fresh machine with the same ledger: nothing runs, the same table comes out
    fresh = Recorder()
    monkeypatch.setattr(loso, "runner", fresh)
    again = loso.run(ExperimentContext("loso", tmp_path / "machine-2", "quick", held_out_model_file("JIA"),
                                       ledger=Ledger(tmp_path / "ledger")))
    assert fresh.commands == [] and again["scores"] == results["scores"] and again["chosen"] == results["chosen"]
    assert not (tmp_path / "machine-2" / "data").exists()
    # another budget is another experiment: the ledger's entries do not match it
    monkeypatch.setitem(loso.BUDGET, "quick", {**loso.BUDGET["quick"], "steps": 10})
    assert not any(line.startswith("[ledger]") for line in loso.describe_plan(ctx).splitlines())


def test_table2_and_table1_share_the_ledger_and_train_nothing_it_holds(tmp_path, monkeypatch):
    monkeypatch.setattr(table2, "ROWS", {"ours": {}, "no skip connections": {"skip_connections": False}})
    budget = {**table1.BUDGET["quick"], "test": 1}
    monkeypatch.setitem(table2.BUDGET, "quick", budget)
    monkeypatch.setitem(table1.BUDGET, "quick", budget)

    def no_process(args, what):
        raise DataError(f"{what}: nothing should run")

    monkeypatch.setattr("inference.recipe.run_hipatlas", no_process)
    ledger = Ledger(tmp_path / "ledger")
    ctx = ExperimentContext("table2", tmp_path / "t2", "quick", default_model_file(), ledger=ledger)
    affine = {"affine_dice": 0.7, "affine_jaccard": 0.5, "affine_assd_mm": 2.0, "affine_hd95_mm": 5.0}
    for row, changes in table2.ROWS.items():
        ledger.put(*table2.ledger_key(ctx, row, changes, budget),
                   {"scores": [{**_row(0.9 if row == "ours" else 0.85), **affine}], "steps_to_converge": 250,
                    "validation": [{"step": 250, "dice": 0.8}]})
    results = table2.run(ctx)
    assert results["table"]["no skip connections"]["dice"]["mean"] == pytest.approx(0.85)
    assert results["steps_to_converge"] == {"ours": 250, "no skip connections": 250}
    assert not (tmp_path / "t2" / "data").exists()

    # table1 finds table2's 'ours' (the same training) and the baselines it filed before; it
    # scores only the shipped model itself (one held-out pair)
    t1 = ExperimentContext("table1", tmp_path / "t1", "quick", default_model_file(), ledger=Ledger(tmp_path / "ledger"))
    for row in ("SDM", "Kasten-style"):
        t1.ledger.put(*table1._baseline_key(t1, row, budget), {"scores": [_row(0.6)]})
    results = table1.run(t1)
    assert results["table"]["ours"]["dice"]["mean"] == pytest.approx(0.9)
    assert results["table"]["SDM"]["dice"]["mean"] == pytest.approx(0.6)
    assert 0.5 < results["table"]["ours (reference model)"]["dice"]["mean"] <= 1.0
    written = json.loads((tmp_path / "t1" / "results.json").read_text())["ledger"]
    assert set(written) == {"row-ours", "table1-SDM", "table1-Kasten-style"}
    # an SDM entry without bounds (filed by older code) says so; the Kasten grid's bound needs no training
    assert results["bounds"]["registration"] is None and results["bounds"]["kasten_grid"]["dice"]["n"] == 1
    assert "not measured" in (tmp_path / "t1" / "results.md").read_text()
    assert not (tmp_path / "t1" / "data").exists()


def test_the_ledger_option_reaches_the_plan(tmp_path, capsys):
    ledger = tmp_path / "ledger"
    assert cli.main(["experiment", "loso", "--out", str(tmp_path / "out"), "--ledger", str(ledger), "--dry-run"]) == 0
    head = capsys.readouterr().out.splitlines()[0]
    assert f"ledger {ledger}" in head


def test_table_plans_show_what_the_ledger_holds(tmp_path, monkeypatch):
    budget = table2.BUDGET["quick"]
    ledger = Ledger(tmp_path / "ledger")
    ctx = ExperimentContext("table2", tmp_path / "t2", "quick", default_model_file(), ledger=ledger)
    ledger.put(*table2.ledger_key(ctx, "ours", {}, budget), {"scores": [], "steps_to_converge": None})
    (ctx.out / "runs" / "no-skip-connections").mkdir(parents=True)
    (ctx.out / "runs" / "no-skip-connections" / "done").write_text("")
    lines = table2.describe_plan(ctx).splitlines()
    states = {line.split("] ")[1].split(":")[0]: line.split("]")[0][1:] for line in lines[1:]}
    assert states["ours"] == "ledger" and states["no skip connections"] == "done"
    assert states["data set"] == "todo" and list(states.values()).count("todo") == 1 + len(table2.ROWS) - 2
    # table1's ours is the same training: in the ledger too; the baselines are not
    t1 = ExperimentContext("table1", tmp_path / "t1", "quick", default_model_file(), ledger=ledger)
    plan = table1.describe_plan(t1)
    assert "[ledger] ours:" in plan and "[todo] SDM:" in plan and "[todo] Kasten-style:" in plan
    assert "[todo] data set:" in plan  # the baselines train on it although ours is filed
    # with every row filed, the data set is not needed
    monkeypatch.setattr(table2, "ROWS", {"ours": {}})
    assert table2.describe_plan(ctx).splitlines()[1].startswith("[not needed] data set")
