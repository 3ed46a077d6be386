"""Training recipes: regenerate a shipped model from nothing with one command.

A recipe (``hipatlas-recipe/1``, JSON; also embedded in a model card as ``training.recipe``) lists
what made a model, in order:

``shape_models`` (optional)
    ``{"name": ..., "build": [ARGS]}``: ``hipatlas shape-model --out WORK/shape_models/<name>.npz ARGS``.
``datasets``
    ``{"name": ..., "synth": [ARGS], "shape_model": name or absent}``: ``hipatlas synth --out
    WORK/datasets/<name> ARGS [--shape-model WORK/shape_models/<shape_model>.npz]``.
``stages``
    ``{"name": ..., "data": [dataset names], "init_from": previous stage name or null,
    "train": [ARGS]}``: ``hipatlas train --data ... --out WORK/runs/<name> --model-config
    WORK/model_config.json [--init-from WORK/runs/<init_from>/model/<file>] ARGS``. Each stage's
    exported model is the best of its validations (``train``'s own checkpoint selection).
``model_config``
    The network (:class:`inference.model.ModelConfig` as a dict).
``verify``
    ``{"dataset": name, "split": "val", "dice": D, "tolerance": T}``: the final model is scored with
    ``hipatlas evaluate`` on that split and must reach ``D - T`` (the shipped card's figure).

:func:`run_recipe` is a generator of :class:`RecipeProgress` and resumes: each step is a
``hipatlas`` command that itself resumes (synth keeps finished samples, train continues from its
latest checkpoint), so running the same recipe into the same work folder again continues where it
stopped. Every step runs in its own process (``python -m inference``), so one stage's TensorFlow
state never leaks into the next.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pathlib
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

from inference.errors import Cancelled, ConfigError, DataError
from inference.io import read_json_object, write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)

RECIPE_FORMAT = "hipatlas-recipe/1"


@dataclass(frozen=True)
class RecipeProgress:
    """One step of a recipe: ``index`` of ``total``, its name and the command it runs."""

    index: int
    total: int
    name: str
    command: tuple[str, ...]


def load_recipe(path: str | os.PathLike) -> dict:
    """Read a recipe file, or the ``training.recipe`` of a model card; check its shape."""
    data = read_json_object(path, what="recipe")
    recipe = data if data.get("format") == RECIPE_FORMAT else (data.get("training") or {}).get("recipe")
    if not isinstance(recipe, Mapping):
        raise ConfigError(f"{path} is neither a {RECIPE_FORMAT} file nor a model card with a training recipe")
    check_recipe(recipe, path)
    return dict(recipe)


def check_recipe(recipe: Mapping[str, Any], source: Any = "recipe") -> None:
    """Raise :class:`ConfigError` naming the first thing wrong with ``recipe``."""
    if recipe.get("format") != RECIPE_FORMAT:
        raise ConfigError(f"{source}: format must be {RECIPE_FORMAT!r}")
    datasets = recipe.get("datasets")
    stages = recipe.get("stages")
    if not isinstance(datasets, list) or not isinstance(stages, list) or not stages:
        raise ConfigError(f"{source}: a recipe needs a list of datasets and a non-empty list of stages")
    shape_models = recipe.get("shape_models", [])
    if not isinstance(shape_models, list) or not all(isinstance(m, Mapping) and isinstance(m.get("name"), str)
                                                     and _is_args(m.get("build")) for m in shape_models):
        raise ConfigError(f"{source}: shape_models must be a list of {{name, build: [shape-model arguments]}}")
    names = set()
    for item in datasets:
        if not isinstance(item, Mapping) or not isinstance(item.get("name"), str) or not _is_args(item.get("synth")):
            raise ConfigError(f"{source}: each dataset needs a name and a list of synth arguments")
        if item.get("shape_model") is not None and item["shape_model"] not in {m["name"] for m in shape_models}:
            raise ConfigError(f"{source}: data set {item['name']} uses the unknown shape model {item['shape_model']!r}")
        names.add(item["name"])
    done: set[str] = set()
    for stage in stages:
        if not isinstance(stage, Mapping) or not isinstance(stage.get("name"), str) or not _is_args(stage.get("train")):
            raise ConfigError(f"{source}: each stage needs a name and a list of train arguments")
        unknown = [d for d in stage.get("data", []) if d not in names]
        if not stage.get("data") or unknown:
            raise ConfigError(f"{source}: stage {stage['name']} uses unknown or no data sets {unknown}")
        if stage.get("init_from") is not None and stage["init_from"] not in done:
            raise ConfigError(f"{source}: stage {stage['name']} starts from {stage['init_from']!r}, "
                              "which is not an earlier stage")
        done.add(stage["name"])
    if not isinstance(recipe.get("model_config"), Mapping):
        raise ConfigError(f"{source}: model_config is missing")
    verify = recipe.get("verify")
    if verify is not None and (not isinstance(verify, Mapping) or verify.get("dataset") not in names):
        raise ConfigError(f"{source}: verify must name one of the recipe's data sets")


def _is_args(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def recipe_commands(recipe: Mapping[str, Any], work: pathlib.Path) -> list[tuple[str, list[str]]]:
    """The ``hipatlas`` commands (argument lists, without the program) that the recipe runs."""
    commands: list[tuple[str, list[str]]] = []
    for item in recipe.get("shape_models", []):
        commands.append((f"shape model {item['name']}",
                         ["shape-model", "--out", str(shape_model_path(work, item["name"])), *item["build"],
                          "--quiet"]))
    for item in recipe["datasets"]:
        extra = ["--shape-model", str(shape_model_path(work, item["shape_model"]))] if item.get("shape_model") else []
        commands.append((f"data set {item['name']}",
                         ["synth", "--out", str(work / "datasets" / item["name"]), *item["synth"], *extra, "--quiet"]))
    grid = recipe["model_config"].get("grid", "compact")
    for stage in recipe["stages"]:
        args = ["train"]
        for name in stage["data"]:
            args += ["--data", str(work / "datasets" / name)]
        args += ["--out", str(work / "runs" / stage["name"]), "--model-config", str(work / "model_config.json")]
        if stage.get("init_from"):
            args += ["--init-from", str(work / "runs" / stage["init_from"] / "model" / f"hipatlas-{grid}.keras")]
        commands.append((f"training stage {stage['name']}", args + list(stage["train"])))
    verify = recipe.get("verify")
    if verify:
        commands.append(("verification", ["evaluate", "--model", str(final_model_dir(recipe, work)),
                                          "--data", str(work / "datasets" / verify["dataset"]),
                                          "--split", verify.get("split", "val"),
                                          "--out", str(work / "verification")]))
    return commands


def shape_model_path(work: pathlib.Path, name: str) -> pathlib.Path:
    """Where a recipe's shape model ``name`` is built."""
    return work / "shape_models" / f"{name}.npz"


def final_model_dir(recipe: Mapping[str, Any], work: pathlib.Path) -> pathlib.Path:
    """The folder of the recipe's result: the last stage's best model."""
    return work / "runs" / recipe["stages"][-1]["name"] / "model"


def run_recipe(recipe: Mapping[str, Any], work: str | os.PathLike, *, cancel: Any = None,
               python: str = sys.executable) -> Iterator[RecipeProgress]:
    """Run (or resume) every step of ``recipe`` in ``work``; yields before each step.

    Raises
    ------
    DataError
        When a step fails (its exit status and the command are in the message).
    Cancelled
        When ``cancel`` (a callable or an Event) fires between steps; run again to resume.
    """
    check_recipe(recipe)
    work = pathlib.Path(work)
    work.mkdir(parents=True, exist_ok=True)
    write_json_atomic(work / "recipe.json", recipe)
    write_json_atomic(work / "model_config.json", recipe["model_config"])
    commands = recipe_commands(recipe, work)
    for index, (name, args) in enumerate(commands):
        if cancel is not None and (cancel.is_set() if hasattr(cancel, "is_set") else cancel()):
            raise Cancelled(f"recipe cancelled before {name}; run the same command again to resume")
        yield RecipeProgress(index, len(commands), name, (python, "-m", "inference", *args))
        run_hipatlas(args, f"recipe step '{name}'", python=python)


def run_hipatlas(args: list[str], what: str, *, python: str = sys.executable) -> None:
    """Run ``hipatlas ARGS`` (without the GUI) in its own process; :class:`DataError` if it fails."""
    command = (python, "-m", "inference", *args)
    started = time.perf_counter()
    code = subprocess.call(command)
    if code != 0:
        raise DataError(f"{what} failed with exit status {code}: {' '.join(command)}")
    log.info("%s done in %.0f s", what, time.perf_counter() - started)


def verification(recipe: Mapping[str, Any], work: str | os.PathLike) -> dict:
    """Compare the reproduced model's score with the recipe's expected one."""
    verify = recipe.get("verify")
    if not verify:
        return {}
    path = pathlib.Path(work) / "verification" / "evaluation.json"
    summary = read_json_object(path, what="evaluation").get("summary", {})
    dice = (summary.get("dice") or {}).get("mean")  # hipatlas evaluate's summary: {"dice": {"mean": ...}}
    if dice is None:
        raise DataError(f"{path} holds no mean Dice")
    expected, tolerance = float(verify["dice"]), float(verify["tolerance"])
    return {"dice": float(dice), "expected_dice": expected, "tolerance": tolerance,
            "within_tolerance": abs(float(dice) - expected) <= tolerance}


def stamp_card(card_path: pathlib.Path, recipe: Mapping[str, Any], result: Mapping[str, Any]) -> None:
    """Put the recipe (and what its run measured) into the produced model's card, so the model
    carries the one command that regenerates it (``hipatlas train --recipe <its card>``)."""
    from inference.model_config import read_model_card, update_model_card

    training = dict(read_model_card(card_path).get("training") or {})
    training["recipe"] = dict(recipe)
    training["reproduction"] = {k: v for k, v in result.items() if k != "model"}
    update_model_card(card_path, {"training": training})


# --------------------------------------------------------------------------------------------
# Command line: hipatlas train --recipe CARD_OR_RECIPE --out WORK
# --------------------------------------------------------------------------------------------

def run_cli(recipe_path: str, work: str, dry_run: bool = False, python: str = sys.executable) -> int:
    recipe = load_recipe(recipe_path)
    work_dir = pathlib.Path(work)
    if dry_run:
        for name, args in recipe_commands(recipe, work_dir):
            print(f"# {name}\nhipatlas {' '.join(args)}")
        return 0
    started = time.perf_counter()
    for step in run_recipe(recipe, work_dir, python=python):
        print(f"[{step.index + 1}/{step.total}] {step.name}", file=sys.stderr, flush=True)
    result = {"model": str(final_model_dir(recipe, work_dir)), "wall_time_s": round(time.perf_counter() - started, 1),
              **verification(recipe, work_dir), "time_spent_s": time_spent(recipe, work_dir)}
    write_json_atomic(work_dir / "reproduction.json", result)
    stamp_card(final_model_dir(recipe, work_dir) / "model_card.json", recipe, result)
    write_text_atomic(work_dir / "reproduction.md", reproduction_markdown(recipe, work_dir, result, recipe_path))
    print(json.dumps(result, indent=2))
    return 0 if result.get("within_tolerance", True) else 1


def time_spent(recipe: Mapping[str, Any], work: str | os.PathLike) -> dict[str, float | None]:
    """Wall time of each step, summed over every run that worked on it (a recipe is resumed across
    sessions, so the last invocation's own time says little).

    A data set's time is the span of its samples' file times (synth writes them in order); a training
    stage's is the time its TensorBoard event files span (one file per resumed run, train and val logs
    merged); the
    verification's is the span from the final model to its evaluation. ``None`` where the step left no
    trace.
    """
    work = pathlib.Path(work)
    spent: dict[str, float | None] = {}
    for item in recipe["datasets"]:
        manifest = work / "datasets" / item["name"] / "manifest.json"
        times = []
        if manifest.is_file():
            for sample in read_json_object(manifest, what="data set manifest").get("samples", []):
                path = manifest.parent / sample["file"]
                if path.is_file():
                    times.append(path.stat().st_mtime)
        spent[f"data set {item['name']}"] = round(max(times) - min(times), 1) if len(times) > 1 else None
    for stage in recipe["stages"]:
        spans = [_event_span(path) for path in sorted((work / "runs" / stage["name"] / "logs").glob("*/events.*"))]
        spans = [span for span in spans if span is not None]
        spent[f"training stage {stage['name']}"] = round(_union_length(spans), 1) if spans else None
    evaluation = work / "verification" / "evaluation.json"
    model = final_model_dir(recipe, work) / "model_card.json"
    if recipe.get("verify") and evaluation.is_file() and model.is_file():
        # From the later of the final model and the last stage's last logged step (the best model may
        # be exported long before its stage ends) to the evaluation.
        last = recipe["stages"][-1]["name"]
        ends = [span[1] for span in map(_event_span, (work / "runs" / last / "logs").glob("*/events.*")) if span]
        start = max([model.stat().st_mtime, *ends])
        spent["verification"] = round(max(0.0, evaluation.stat().st_mtime - start), 1)
    known = [v for v in spent.values() if v is not None]
    spent["total"] = round(sum(known), 1) if known else None
    return spent


def _event_span(path: pathlib.Path) -> tuple[float, float] | None:
    """First and last wall time of a TensorBoard event file (TFRecord framing; each Event's field 1,
    ``wall_time``, is read without TensorFlow). ``None`` when it holds no event."""
    times = []
    with open(path, "rb") as fh:
        while True:
            header = fh.read(12)  # uint64 length + uint32 masked crc
            if len(header) < 12:
                break
            (length,) = struct.unpack("<Q", header[:8])
            data = fh.read(length)
            fh.read(4)
            if len(data) < length:
                break
            # Field 1, 64-bit: double wall_time. The file's header event (file_version "brain.Event:2")
            # carries whole seconds only, so it is skipped.
            if length >= 9 and data[0] == 0x09 and b"brain.Event" not in data:
                times.append(struct.unpack("<d", data[1:9])[0])
    return (min(times), max(times)) if times else None


def _union_length(spans: list[tuple[float, float]]) -> float:
    """Total length of the union of time intervals (a stage's train and val logs overlap)."""
    total, end = 0.0, -math.inf
    for start, stop in sorted(spans):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def reproduction_markdown(recipe: Mapping[str, Any], work: str | os.PathLike, result: Mapping[str, Any],
                          recipe_path: Any = None) -> str:
    """The reproduction report: the command, the code and model it produced, its score against the
    recipe's expected one, and the time each step took."""
    from inference.provenance import provenance, provenance_markdown

    work = pathlib.Path(work)
    models = sorted(final_model_dir(recipe, work).glob("*.keras"))
    command = ["hipatlas", "train", "--recipe", str(recipe_path or "RECIPE"), "--out", str(work)]
    lines = [f"# Reproduction of `{recipe.get('name', 'model')}` from its recipe", "",
             provenance_markdown(provenance(models[0] if models else None, command)).rstrip(), ""]
    if "dice" in result:
        verdict = "within" if result["within_tolerance"] else "NOT within"
        lines += [f"Validation Dice of the reproduced model: **{result['dice']:.4f}**; the shipped card's: "
                  f"{result['expected_dice']:.4f}; {verdict} the tolerance of {result['tolerance']:g}.", ""]
    lines += ["| step | wall time |", "|---|---|"]
    for name, seconds in (result.get("time_spent_s") or {}).items():
        shown = "no record" if seconds is None else f"{seconds / 3600:.2f} h ({seconds:.0f} s)"
        lines.append(f"| {'**total**' if name == 'total' else name} | {shown} |")
    lines += ["", "Times are summed over every run that worked on a step (the recipe resumes across sessions): "
              "data sets from their samples' file times, training stages from the span of their TensorBoard "
              "event files, the verification from the end of training to its evaluation. This invocation itself took "
              f"{result.get('wall_time_s', 0):.0f} s.", ""]
    return "\n".join(lines)
