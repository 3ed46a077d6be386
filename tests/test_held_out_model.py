"""Held-out figures stay held out when the shipped model learnt from every specimen: the evaluation
tools and experiments pick a shipped model that never saw the test specimen, and refuse one that did."""

from __future__ import annotations

import json
import pathlib

import pytest

from inference.data.bones import specimen_of
from inference.errors import ModelError
from inference.resources import RESOURCES_ENV, held_out_model_file, require_held_out, trained_specimens
from tool_helpers import load_tool


def _model(models: pathlib.Path, name: str, train: list[str] | None) -> pathlib.Path:
    folder = models / name
    folder.mkdir(parents=True)
    keras_file = folder / "hipatlas-compact.keras"
    keras_file.write_bytes(name.encode())
    training = {} if train is None else {"dataset_parameters": [{"config": {"split": {"train": train, "val": []}}}]}
    (folder / "model_card.json").write_text(json.dumps({"model_file": keras_file.name, "training": training}))
    return keras_file


@pytest.fixture
def models(tmp_path, monkeypatch):
    monkeypatch.setenv(RESOURCES_ENV, str(tmp_path))
    folder = tmp_path / "models"
    all_three = _model(folder, "b-all", ["TLEM2", "MC22", "JIA"])
    two = _model(folder, "c-two", ["TLEM2", "MC22"])
    unknown = _model(folder, "a-unknown", None)
    (folder / "DEFAULT").write_text("b-all\n")
    return {"all": all_three, "two": two, "unknown": unknown}


def test_specimen_of_subject_and_femur_names():
    assert specimen_of("JIA_MRI") == specimen_of("JIA_MRI:left") == "JIA"
    assert specimen_of("TLEM2_CT:right") == "TLEM2"
    assert specimen_of("SOMEONE") == "SOMEONE"


def test_the_default_is_kept_unless_it_learnt_from_the_specimen(models):
    assert trained_specimens(models["all"]) == {"TLEM2", "MC22", "JIA"}
    assert trained_specimens(models["unknown"]) is None
    # the default saw JIA: the first other model known to have left JIA out (not the one whose card says nothing)
    assert held_out_model_file("JIA") == models["two"]
    # a specimen nobody trained on: the default itself
    assert held_out_model_file("NEW") == models["all"]
    with pytest.raises(ModelError, match="learnt from MC22"):
        held_out_model_file("MC22")


def test_require_held_out_refuses_only_a_model_whose_card_names_the_specimen(models):
    require_held_out(models["two"], "JIA")
    require_held_out(models["unknown"], "JIA")  # a card that does not say is accepted
    with pytest.raises(ModelError, match="would not be held-out"):
        require_held_out(models["all"], "JIA")


def test_eval_cases_picks_the_held_out_model_and_refuses_one_that_saw_the_specimen(models):
    tool = load_tool("eval_cases", "eval_cases_held_out")
    assert tool.evaluation_model(None, "JIA_MRI") == models["two"]
    with pytest.raises(SystemExit, match="would not be held-out"):
        tool.evaluation_model(str(models["all"].parent), "JIA_MRI")
    assert tool.evaluation_model(str(models["all"]), "JIA_MRI", allow_trained=True) == models["all"]
    # an ONNX file is judged by the card of its folder's .keras
    assert tool.evaluation_model(str(models["two"].with_suffix(".onnx")), "JIA_MRI").suffix == ".onnx"


def test_experiments_that_score_the_model_refuse_one_that_saw_the_held_out_specimen(models, tmp_path):
    from inference.experiments import run_experiment

    with pytest.raises(ModelError, match="learnt from JIA"):
        run_experiment("angle-sensitivity", tmp_path / "out", model=str(models["all"]))


def test_a_card_of_one_data_set_names_its_specimens_too(tmp_path):
    """Cards of models trained on one data set hold its parameters alone, not in a list."""
    keras_file = _model(tmp_path, "one-set", None)
    card = {"model_file": keras_file.name,
            "training": {"dataset_parameters": {"config": {"split": {"train": ["TLEM2", "MC22"]}}}}}
    (keras_file.parent / "model_card.json").write_text(json.dumps(card))
    assert trained_specimens(keras_file) == {"TLEM2", "MC22"}
    require_held_out(keras_file, "JIA")
