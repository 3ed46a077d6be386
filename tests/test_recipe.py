"""Training recipes: the shipped model's recipe is complete and runnable, the runner resumes and fails clearly."""

from __future__ import annotations

import json
import pathlib
import stat
import sys
import threading

import pytest

from inference import recipe as R
from inference.cli import build_parser
from inference.errors import Cancelled, ConfigError, DataError
from inference.model_config import ModelConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]


#: every shipped model's card (the default and, e.g., the model that left a specimen out for evaluation)
SHIPPED = sorted(p.parent.name for p in (ROOT / "resources" / "models").glob("*/model_card.json"))


@pytest.fixture(params=SHIPPED)
def shipped(request) -> tuple[pathlib.Path, dict]:
    path = ROOT / "resources" / "models" / request.param / "model_card.json"
    return path, json.loads(path.read_text(encoding="utf-8"))


def _tiny_recipe() -> dict:
    return {"format": R.RECIPE_FORMAT, "name": "tiny", "model_config": {"grid": "compact"},
            "datasets": [{"name": "a", "synth": ["--subjects", "4", "--seed", "3"]},
                         {"name": "b", "synth": ["--subjects", "4", "--seed", "4"]}],
            "stages": [{"name": "s1", "data": ["a"], "init_from": None, "train": ["--steps", "2"]},
                       {"name": "s2", "data": ["a", "b"], "init_from": "s1", "train": ["--steps", "3"]}],
            "verify": {"dataset": "a", "split": "val", "dice": 0.5, "tolerance": 0.01}}


def test_shipped_model_card_holds_its_recipe(shipped):
    path, card = shipped
    recipe = R.load_recipe(path)
    # the same configuration (a recipe written before a switch existed leaves out its default)
    assert ModelConfig.from_dict(recipe["model_config"]) == ModelConfig.from_dict(card["config"])
    if "held_out_estimate" in card:  # trained on every specimen: no held-out split to verify on
        assert "verify" not in recipe and "val_metrics" not in card
    else:
        assert recipe["verify"]["dice"] == pytest.approx(card["val_metrics"]["dice"])
    # The data sets are the ones the card's manifests were made from (same seeds and sizes).
    seeds = [str(p["seed"]) for p in card["training"]["dataset_parameters"]]
    assert [d["synth"][d["synth"].index("--seed") + 1] for d in recipe["datasets"]] == seeds
    # The last stage is the card's training run.
    last = recipe["stages"][-1]["train"]
    config = card["training"]["train_config"]
    assert float(last[last.index("--lr") + 1]) == config["learning_rate"]
    assert int(last[last.index("--steps") + 1]) == config["steps"]
    assert int(last[last.index("--stop-at") + 1]) == card["training"]["steps"]


def test_every_recipe_command_parses(tmp_path, shipped):
    _, card = shipped
    recipe = card["training"]["recipe"]
    commands = R.recipe_commands(recipe, tmp_path)
    kinds = [name.split()[0] for name, _ in commands]
    assert kinds == (["shape"] * len(recipe.get("shape_models", {})) + ["data"] * len(recipe["datasets"])
                     + ["training"] * len(recipe["stages"]) + ["verification"] * ("verify" in recipe))
    for _, argv in commands:
        build_parser().parse_args(argv)  # SystemExit on any unknown or missing argument
    first, last = recipe["stages"][0]["name"], commands[kinds.index("training") + 1][1]
    assert last[last.index("--init-from") + 1] == str(tmp_path / "runs" / first / "model" / "hipatlas-compact.keras")


@pytest.mark.parametrize("change, message", [
    (lambda r: r.update(format="x"), "format"),
    (lambda r: r["stages"][1].update(data=["nope"]), "unknown"),
    (lambda r: r["stages"][0].update(init_from="s2"), "not an earlier stage"),
    (lambda r: r.pop("model_config"), "model_config"),
    (lambda r: r["verify"].update(dataset="zzz"), "verify"),
    (lambda r: r["datasets"][0].update(synth="--subjects 4"), "synth arguments"),
])
def test_bad_recipes_are_refused_with_the_reason(change, message):
    recipe = _tiny_recipe()
    change(recipe)
    with pytest.raises(ConfigError, match=message):
        R.check_recipe(recipe)


def _fake_python(tmp_path, exit_code=0, fail_on=None) -> pathlib.Path:
    """An executable that logs ``-m inference ARGS`` and writes the evaluation a verify step would."""
    script = tmp_path / "fake-python"
    script.write_text(f"""#!{sys.executable}
import json, pathlib, sys
args = sys.argv[3:]
with open({str(tmp_path / 'calls.log')!r}, 'a') as fh:
    fh.write(' '.join(args) + '\\n')
if {fail_on!r} and args[0] == {fail_on!r}:
    sys.exit({exit_code})
if args[0] == 'evaluate':
    out = pathlib.Path(args[args.index('--out') + 1]); out.mkdir(parents=True, exist_ok=True)
    (out / 'evaluation.json').write_text(json.dumps({{'summary': {{'dice': {{'mean': 0.505}}}}}}))
if args[0] == 'train':
    out = pathlib.Path(args[args.index('--out') + 1]) / 'model'; out.mkdir(parents=True, exist_ok=True)
    (out / 'model_card.json').write_text(json.dumps({{'format': 'hipatlas-model-card/1', 'sha256': '0' * 64,
                                                     'training': {{'steps': 3}}}}))
""")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script


def test_runner_runs_every_step_in_order_and_verifies(tmp_path, monkeypatch):
    fake = _fake_python(tmp_path)
    work = tmp_path / "work"
    steps = list(R.run_recipe(_tiny_recipe(), work, python=str(fake)))
    assert [s.name for s in steps] == ["data set a", "data set b", "training stage s1", "training stage s2",
                                       "verification"]
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert calls[2].startswith(f"train --data {work}/datasets/a --out {work}/runs/s1")
    assert f"--init-from {work}/runs/s1/model/hipatlas-compact.keras" in calls[3]
    assert json.loads((work / "model_config.json").read_text()) == {"grid": "compact"}
    result = R.verification(_tiny_recipe(), work)
    assert result == {"dice": 0.505, "expected_dice": 0.5, "tolerance": 0.01, "within_tolerance": True}
    R.stamp_card(work / "runs" / "s2" / "model" / "model_card.json", _tiny_recipe(), {"model": "m", **result})
    card = json.loads((work / "runs" / "s2" / "model" / "model_card.json").read_text())
    assert card["training"]["steps"] == 3 and card["training"]["recipe"]["name"] == "tiny"
    assert card["training"]["reproduction"]["within_tolerance"] is True
    # The stamped card is itself a recipe source.
    assert R.load_recipe(work / "runs" / "s2" / "model" / "model_card.json")["name"] == "tiny"


def test_runner_names_the_failing_step_and_cancels_between_steps(tmp_path):
    fake = _fake_python(tmp_path, exit_code=3, fail_on="train")
    with pytest.raises(DataError, match="training stage s1.*exit status 3"):
        list(R.run_recipe(_tiny_recipe(), tmp_path / "w", python=str(fake)))
    event = threading.Event()
    runner = R.run_recipe(_tiny_recipe(), tmp_path / "w2", python=str(_fake_python(tmp_path)), cancel=event)
    next(runner)
    event.set()
    with pytest.raises(Cancelled, match="resume"):
        next(runner)


def test_a_far_verification_fails_the_command(tmp_path, monkeypatch, capsys):
    recipe = _tiny_recipe()
    recipe["verify"]["dice"] = 0.9
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(recipe))
    fake = _fake_python(tmp_path)
    code = R.run_cli(str(path), str(tmp_path / "w"), python=str(fake))
    assert code == 1
    assert json.loads((tmp_path / "w" / "reproduction.json").read_text())["within_tolerance"] is False


def test_dry_run_prints_the_commands(tmp_path, capsys, shipped):
    path, card = shipped
    recipe = card["training"]["recipe"]
    assert R.run_cli(str(path), str(tmp_path), dry_run=True) == 0
    out = capsys.readouterr().out
    assert out.count("hipatlas synth") == len(recipe["datasets"]) and out.count("hipatlas train") == len(recipe["stages"])
    assert out.count("hipatlas shape-model") == len(recipe.get("shape_models", {}))
    assert ("hipatlas evaluate" in out) == ("verify" in recipe)
    assert not (tmp_path / "datasets").exists()


def test_time_spent_adds_up_resumed_runs_from_their_logs(tmp_path):
    """Each step's time is summed over every run that worked on it: data sets from their samples'
    file times, training stages from TensorBoard event files (written here by TensorFlow itself)."""
    import os
    import time

    import tensorflow as tf

    work = tmp_path / "w"
    recipe = _tiny_recipe()
    folder = work / "datasets" / "a"
    (folder / "train").mkdir(parents=True)
    samples = []
    for index, mtime in enumerate((1000.0, 1100.0, 1250.0)):
        path = folder / "train" / f"s{index}.npz"
        path.write_bytes(b"x")
        os.utime(path, (mtime, mtime))
        samples.append({"file": f"train/s{index}.npz"})
    (folder / "manifest.json").write_text(json.dumps({"samples": samples}))
    # Two resumed runs of stage s1: two event files, each spanning its own writes.
    spans = []
    for run in range(2):
        start = time.time()
        writer = tf.summary.create_file_writer(str(work / "runs" / "s1" / "logs" / f"train{run}"))
        with writer.as_default():
            for step in range(3):
                tf.summary.write("loss", 1.0, step=step)  # what training writes without TensorBoard
                writer.flush()
                time.sleep(0.2)
        writer.close()
        spans.append((start, time.time()))
    spent = R.time_spent(recipe, work)
    assert spent["data set a"] == pytest.approx(250.0)
    assert spent["data set b"] is None and spent["training stage s2"] is None
    # Three scalars 0.2 s apart per run: each file spans about 0.4 s, within its run's own bounds.
    assert 0.7 <= spent["training stage s1"] <= sum(stop - start for start, stop in spans) + 0.1
    assert spent["total"] == pytest.approx(250.0 + spent["training stage s1"], abs=0.11)
    text = R.reproduction_markdown(recipe, work, {"time_spent_s": spent, "wall_time_s": 1.0})
    assert "| data set b | no record |" in text and "| **total** |" in text


def test_overlapping_log_spans_count_once():
    assert R._union_length([(0.0, 10.0), (5.0, 12.0), (20.0, 21.0)]) == pytest.approx(13.0)
    assert R._union_length([(3.0, 4.0), (0.0, 10.0)]) == pytest.approx(10.0)
