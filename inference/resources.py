"""Where the shipped resources live, and an integrity check of them.

HipAtlas ships three kinds of resources beside its code (``resources/`` in the source tree, the same
folder inside an installed bundle)::

    resources/
      models/<name>/<file>.keras         trained registration model(s)
      models/<name>/<file>.card.json     its model card (format hipatlas-model-card/1, with sha256);
                                         ``model_card.json`` naming ``model_file`` is accepted too
      models/DEFAULT                     optional: the default model folder's name, or several
                                         (one per line: registration averages them)
      atlas/<grid>/atlas.json            atlas provenance with the sha256 of each atlas file
      atlas/<grid>/...                   atlas.nii.gz, labels.nii.gz, landmarks.json
      demo/case.json (+ images, masks)   the demo case (used by ``hipatlas --self-test``)

:func:`verify_resources` compares every shipped model and atlas file with the sha256 recorded
next to it. A damaged installation (a truncated download, a disk error, a file replaced by hand)
then stops the program with a message that says which file and what to do, instead of producing a
plausible-looking but wrong reconstruction.

This module only uses the standard library, so that the check is cheap at start-up (no TensorFlow
import): it reads model cards itself rather than through :mod:`inference.model`.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
from dataclasses import dataclass
from typing import Any

from inference.checksums import sha256_file
from inference.errors import DataError, ModelError

log = logging.getLogger(__name__)

__all__ = [
    "RESOURCES_ENV",
    "ResourceProblem",
    "resources_root",
    "models_dir",
    "atlas_dir",
    "demo_dir",
    "model_card_path",
    "default_model_file",
    "default_model_files",
    "default_model_names",
    "require_held_out",
    "trained_specimens",
    "held_out_model_file",
    "check_model_file",
    "check_models",
    "check_atlas_grid",
    "check_atlases",
    "check_demo_case",
    "find_resource_problems",
    "verify_resources",
]

#: Environment variable that points HipAtlas at another resources folder (tests, site installs).
RESOURCES_ENV = "HIPATLAS_RESOURCES_DIR"
#: Same value as ``inference.model.MODEL_CARD_FORMAT`` (not imported: that module loads Keras).
MODEL_CARD_FORMAT = "hipatlas-model-card/1"
#: Same value as ``inference.data.atlas.ATLAS_FORMAT``.
ATLAS_FORMAT = "hipatlas-atlas/1"
#: Files an atlas folder must hold besides atlas.json.
ATLAS_FILES = ("atlas.nii.gz", "labels.nii.gz", "landmarks.json")

_REINSTALL = "reinstall HipAtlas"


@dataclass(frozen=True)
class ResourceProblem:
    """One thing wrong with the shipped resources.

    Attributes
    ----------
    kind : {"model", "atlas", "demo"}
        Which resource; decides the exception type :func:`verify_resources` raises.
    path : pathlib.Path
        The file or folder concerned.
    message : str
        A complete sentence naming the file and what to do.
    """

    kind: str
    path: pathlib.Path
    message: str

    def __str__(self) -> str:
        return self.message


# --------------------------------------------------------------------------------------------
# Locations
# --------------------------------------------------------------------------------------------

def resources_root() -> pathlib.Path:
    """``$HIPATLAS_RESOURCES_DIR`` if set, else ``resources/`` beside the ``inference`` package.

    In a PyInstaller bundle the package's ``__file__`` lies in the bundle's data folder, where the
    spec puts ``resources/`` too, so the same rule finds the installed copy.
    """
    env = os.environ.get(RESOURCES_ENV)
    if env:
        return pathlib.Path(env).expanduser()
    return pathlib.Path(__file__).resolve().parent.parent / "resources"


def models_dir(root: str | os.PathLike | None = None) -> pathlib.Path:
    return (resources_root() if root is None else pathlib.Path(root)) / "models"


def atlas_dir(root: str | os.PathLike | None = None) -> pathlib.Path:
    """The atlas folder; with no ``root``, ``$HIPATLAS_ATLAS_DIR`` wins as in :mod:`inference.data.atlas`."""
    if root is None:
        env = os.environ.get("HIPATLAS_ATLAS_DIR")
        if env:
            return pathlib.Path(env).expanduser()
        return resources_root() / "atlas"
    return pathlib.Path(root) / "atlas"


def demo_dir(root: str | os.PathLike | None = None) -> pathlib.Path:
    return (resources_root() if root is None else pathlib.Path(root)) / "demo"


def bones_resource_dir(root: str | os.PathLike | None = None) -> pathlib.Path:
    """The bundled real bone surfaces (training data; ``$HIPATLAS_BONES_DIR`` overrides in
    :func:`inference.data.bones.bones_dir`)."""
    return (resources_root() if root is None else pathlib.Path(root)) / "bones"


def _read_json(path: pathlib.Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _visible(path: pathlib.Path) -> bool:
    # Dot-folders are work in progress (an atlas being rebuilt is written to ".<grid>.xxxx" and
    # renamed) or leftovers (".<grid>.old"): never part of the installation.
    return not path.name.startswith(".")


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------

def model_card_path(model_file: str | os.PathLike) -> pathlib.Path | None:
    """The model card of ``model_file``: ``<stem>.card.json`` beside it, else a ``model_card.json``
    in the same folder whose ``model_file`` names it (or that is the folder's only card); None if
    there is none."""
    model_file = pathlib.Path(model_file)
    beside = model_file.with_name(model_file.stem + ".card.json")
    if beside.is_file():
        return beside
    shared = model_file.with_name("model_card.json")
    if shared.is_file():
        try:
            named = _read_json(shared).get("model_file")
        except (OSError, ValueError, AttributeError):
            return shared  # unreadable: let check_model_file report it
        if named in (None, model_file.name):
            return shared
    return None


def default_model_names(root: str | os.PathLike | None = None) -> list[str] | None:
    """The folder names ``models/DEFAULT`` lists, one per line (None without the file)."""
    pointer = models_dir(root) / "DEFAULT"
    if not pointer.is_file():
        return None
    return [line.strip() for line in pointer.read_text(encoding="utf-8").splitlines() if line.strip()]


def default_model_files(root: str | os.PathLike | None = None) -> list[pathlib.Path]:
    """The shipped models used when none is chosen: the ``.keras`` file of each folder named in
    ``models/DEFAULT`` (one per line; several are averaged, :class:`inference.backends.EnsembleBackend`),
    else of the first model folder (sorted by name).

    Raises
    ------
    ModelError
        No model installed, or a chosen folder does not hold exactly one ``.keras`` file.
    """
    folder = models_dir(root)
    names = default_model_names(root)
    if names:
        chosen = [folder / name for name in names]
    else:
        candidates = sorted(p.parent for p in folder.glob("*/*.keras") if _visible(p.parent)) if folder.is_dir() else []
        if not candidates:
            raise ModelError(f"no trained model is installed in {folder}; {_REINSTALL}")
        chosen = candidates[:1]
    out = []
    for model_folder in chosen:
        files = sorted(p for p in model_folder.glob("*.keras") if _visible(p)) if model_folder.is_dir() else []
        if len(files) != 1:
            raise ModelError(f"the model folder {model_folder} should hold one .keras file, not {len(files)}; "
                             f"{_REINSTALL}")
        out.append(files[0])
    return out


def default_model_file(root: str | os.PathLike | None = None) -> pathlib.Path:
    """The first of :func:`default_model_files`: the model of everything that takes one (training
    from it, the experiments, the cards shown in the window)."""
    return default_model_files(root)[0]


def trained_specimens(model_file: str | os.PathLike) -> set[str] | None:
    """The specimens (``"TLEM2"``, ``"MC22"``, ``"JIA"``) in the train split of any data set the
    model learnt from, read from its card's ``training.dataset_parameters``; None when the card is
    missing or does not say."""
    card_path = model_card_path(model_file)
    try:
        card = _read_json(card_path) if card_path is not None else None
    except (OSError, ValueError):
        return None
    parameters = ((card or {}).get("training") or {}).get("dataset_parameters") if isinstance(card, dict) else None
    if not parameters:
        return None
    if isinstance(parameters, dict):  # a model trained on one data set records its parameters alone
        parameters = [parameters]
    return {s for p in parameters if isinstance(p, dict)
            for s in ((p.get("config") or {}).get("split") or {}).get("train", [])}


def require_held_out(model_file: str | os.PathLike, specimen: str) -> None:
    """Refuse a model whose card says it learnt from ``specimen``: its figures on that specimen's
    phantoms would not be held-out figures. A card that does not say is accepted.

    Raises
    ------
    ModelError
        The model learnt from ``specimen``.
    """
    model_file = pathlib.Path(model_file)
    if specimen in (trained_specimens(model_file) or ()):
        raise ModelError(f"{model_file.parent.name} learnt from {specimen}: its figures on {specimen} phantoms would "
                         f"not be held-out figures; choose a model trained without {specimen}")


def held_out_model_file(specimen: str, root: str | os.PathLike | None = None) -> pathlib.Path:
    """The shipped model to evaluate on phantoms of ``specimen``: the default model when its card
    says it never learnt from that specimen, else the first other shipped model (sorted by folder
    name) that never did. Figures on a specimen a model trained on are not held-out figures.

    Raises
    ------
    ModelError
        No shipped model is known to have left ``specimen`` out of training.
    """
    default = default_model_file(root)
    folder = models_dir(root)
    others = sorted(p for p in folder.glob("*/*.keras") if _visible(p.parent) and _visible(p) and p != default)
    for candidate in [default, *others]:
        trained = trained_specimens(candidate)
        if trained is not None and specimen not in trained:
            if candidate != default:
                log.info("the default model learnt from %s; evaluating with %s, which never did", specimen,
                         candidate.parent.name)
            return candidate
    raise ModelError(f"every shipped model in {folder} learnt from {specimen} (or its card does not say): none "
                     f"gives held-out figures on it; pass a model trained without {specimen} (--model)")


def check_model_file(model_file: str | os.PathLike) -> list[ResourceProblem]:
    """Problems of one ``.keras`` model file: missing or unreadable card, sha256 mismatch."""
    model_file = pathlib.Path(model_file)
    if not model_file.is_file():
        return [ResourceProblem("model", model_file, f"the shipped model file {model_file} is missing; {_REINSTALL}")]
    card_path = model_card_path(model_file)
    if card_path is None:
        return [ResourceProblem(
            "model", model_file,
            f"the shipped model file {model_file} has no model card ({model_file.stem}.card.json), so its "
            f"integrity cannot be checked; {_REINSTALL}")]
    try:
        card = _read_json(card_path)
    except (OSError, ValueError) as error:
        return [ResourceProblem("model", card_path, f"the model card {card_path} cannot be read ({error}); {_REINSTALL}")]
    expected = card.get("sha256") if isinstance(card, dict) else None
    if not isinstance(card, dict) or card.get("format") != MODEL_CARD_FORMAT or not isinstance(expected, str):
        return [ResourceProblem(
            "model", card_path,
            f"{card_path} is not a valid HipAtlas model card (format {MODEL_CARD_FORMAT} with a sha256); "
            f"{_REINSTALL}")]
    actual = sha256_file(model_file)
    if actual != expected.lower():
        return [ResourceProblem(
            "model", model_file,
            f"the shipped model file {model_file} is damaged (sha256 mismatch: {actual[:12]}... instead of "
            f"{expected[:12]}... recorded in {card_path.name}); {_REINSTALL}")]
    return _check_onnx_export(model_file, card, card_path)


def _check_onnx_export(model_file: pathlib.Path, card: dict, card_path: pathlib.Path) -> list[ResourceProblem]:
    """The ONNX export the card records beside the model (key ``onnx``, see
    :mod:`inference.onnx_export`): present and matching its sha256, like the ``.keras``."""
    entry = card.get("onnx")
    if entry is None:
        return []
    name = entry.get("file") if isinstance(entry, dict) else None
    expected = entry.get("sha256") if isinstance(entry, dict) else None
    if not isinstance(name, str) or not isinstance(expected, str) or pathlib.Path(name).name != name:
        return [ResourceProblem("model", card_path, f"{card_path} has an invalid 'onnx' entry (file and "
                                f"sha256 needed); {_REINSTALL}")]
    onnx_file = model_file.with_name(name)
    if not onnx_file.is_file():
        return [ResourceProblem("model", onnx_file, f"the shipped ONNX model {onnx_file} is missing; {_REINSTALL}")]
    actual = sha256_file(onnx_file)
    if actual != expected.lower():
        return [ResourceProblem(
            "model", onnx_file,
            f"the shipped ONNX model {onnx_file} is damaged (sha256 mismatch: {actual[:12]}... instead of "
            f"{expected[:12]}... recorded in {card_path.name}); {_REINSTALL}")]
    return []


def _model_grid(model_file: pathlib.Path) -> str | None:
    """The atlas grid a model needs, from its card's config (None if the card does not say)."""
    card_path = model_card_path(model_file)
    try:
        grid = _read_json(card_path).get("config", {}).get("grid") if card_path else None
    except (OSError, ValueError, AttributeError):
        return None
    return grid if isinstance(grid, str) else None


def check_models(root: str | os.PathLike | None = None) -> tuple[list[ResourceProblem], set[str]]:
    """Check every model folder under ``<root>/models``.

    Returns
    -------
    problems : list of ResourceProblem
    grids : set of str
        Atlas grids the shipped models need (from their cards), to check that those atlases exist.
    """
    folder = models_dir(root)
    problems: list[ResourceProblem] = []
    grids: set[str] = set()
    model_files = sorted(p for p in folder.glob("*/*.keras") if _visible(p.parent) and _visible(p)) \
        if folder.is_dir() else []
    if not model_files:
        return [ResourceProblem("model", folder, f"no trained model is installed in {folder}; {_REINSTALL}")], grids
    pointer = folder / "DEFAULT"
    for name in default_model_names(root) or []:
        if not (folder / name).is_dir():
            problems.append(ResourceProblem(
                "model", pointer, f"{pointer} names the model folder {name!r}, which is not installed; {_REINSTALL}"))
    for model_file in model_files:
        problems += check_model_file(model_file)
        grid = _model_grid(model_file)
        if grid:
            grids.add(grid)
    return problems, grids


# --------------------------------------------------------------------------------------------
# Atlas
# --------------------------------------------------------------------------------------------

def check_atlas_grid(folder: str | os.PathLike) -> list[ResourceProblem]:
    """Problems of one atlas grid folder: atlas.json missing or invalid, files missing or damaged."""
    folder = pathlib.Path(folder)
    meta_path = folder / "atlas.json"
    if not meta_path.is_file():
        return [ResourceProblem("atlas", folder, f"the atlas folder {folder} has no atlas.json; {_REINSTALL}")]
    try:
        meta = _read_json(meta_path)
    except (OSError, ValueError) as error:
        return [ResourceProblem("atlas", meta_path, f"the atlas description {meta_path} cannot be read ({error}); "
                                f"{_REINSTALL}")]
    files = meta.get("files") if isinstance(meta, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != ATLAS_FORMAT or not isinstance(files, dict):
        return [ResourceProblem("atlas", meta_path, f"{meta_path} is not a valid {ATLAS_FORMAT} description with "
                                f"file checksums; {_REINSTALL}")]
    problems = []
    for name in sorted(set(ATLAS_FILES) | set(files)):
        path = folder / name
        expected = files.get(name)
        if not path.is_file():
            problems.append(ResourceProblem("atlas", path, f"the atlas file {path} is missing; {_REINSTALL}"))
        elif not isinstance(expected, str):
            problems.append(ResourceProblem("atlas", path, f"the atlas file {path} has no checksum in {meta_path.name}; "
                                            f"{_REINSTALL}"))
        else:
            actual = sha256_file(path)
            if actual != expected.lower():
                problems.append(ResourceProblem(
                    "atlas", path,
                    f"the atlas file {path} is damaged (sha256 mismatch: {actual[:12]}... instead of "
                    f"{expected[:12]}... recorded in {meta_path.name}); {_REINSTALL}"))
    return problems


def check_atlases(root: str | os.PathLike | None = None, required_grids: set[str] | frozenset = frozenset()
                  ) -> list[ResourceProblem]:
    """Check every atlas grid under the atlas folder, and that each of ``required_grids`` exists."""
    folder = atlas_dir(root)
    grids = sorted(p for p in folder.iterdir() if p.is_dir() and _visible(p)) if folder.is_dir() else []
    if not grids:
        return [ResourceProblem("atlas", folder, f"no atlas is installed in {folder}; {_REINSTALL}")]
    problems = []
    for grid in grids:
        problems += check_atlas_grid(grid)
    for name in sorted(set(required_grids) - {g.name for g in grids}):
        problems.append(ResourceProblem(
            "atlas", folder / name, f"the shipped model needs the atlas of grid {name!r}, which is not installed "
            f"in {folder}; {_REINSTALL}"))
    return problems


# --------------------------------------------------------------------------------------------
# Demo case
# --------------------------------------------------------------------------------------------

def check_demo_case(folder: str | os.PathLike | None = None) -> list[ResourceProblem]:
    """The demo case exists and every file its case.json names is there (no checksums: the case
    loader validates the content, and a damaged demo cannot harm a patient's result)."""
    folder = demo_dir() if folder is None else pathlib.Path(folder)
    case_json = folder / "case.json"
    if not case_json.is_file():
        return [ResourceProblem("demo", folder, f"the demo case is missing ({case_json} not found); {_REINSTALL}")]
    try:
        case = _read_json(case_json)
        names = [view.get(key) for view in case["views"] for key in ("image", "mask")]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        return [ResourceProblem("demo", case_json, f"the demo case {case_json} cannot be read ({error}); {_REINSTALL}")]
    return [ResourceProblem("demo", folder / name, f"the demo case file {folder / name} is missing; {_REINSTALL}")
            for name in names if isinstance(name, str) and not (folder / name).is_file()]


# --------------------------------------------------------------------------------------------
# All together
# --------------------------------------------------------------------------------------------

def _unreadable(kind: str, fallback: pathlib.Path, error: OSError) -> list[ResourceProblem]:
    path = pathlib.Path(error.filename) if error.filename else fallback
    return [ResourceProblem(kind, path, f"{path} cannot be read ({error.strerror or error}); check the permissions "
                            f"of the HipAtlas installation or {_REINSTALL}")]


def find_resource_problems(root: str | os.PathLike | None = None, *, demo: bool = False) -> list[ResourceProblem]:
    """Every problem of the shipped models and atlases (and of the demo case with ``demo=True``).

    An unreadable file or folder (permissions) is reported as a problem, not raised.
    """
    try:
        problems, grids = check_models(root)
    except OSError as error:
        problems, grids = _unreadable("model", models_dir(root), error), set()
    try:
        problems += check_atlases(root, grids)
    except OSError as error:
        problems += _unreadable("atlas", atlas_dir(root), error)
    if demo:
        try:
            problems += check_demo_case(demo_dir(root))
        except OSError as error:
            problems += _unreadable("demo", demo_dir(root), error)
    return problems


def verify_resources(root: str | os.PathLike | None = None, *, demo: bool = False,
                     strict: bool = True) -> list[ResourceProblem]:
    """Check the shipped model(s) and atlas(es) against their recorded sha256.

    Call it once at start-up (GUI) and before a registration with the shipped model (CLI); it
    hashes every shipped file (well under a second for the shipped sizes).

    Parameters
    ----------
    root : path, optional
        Resources folder (default :func:`resources_root`).
    demo : bool
        Also check that the demo case is complete.
    strict : bool
        Raise on the first kind of problem found (default); with False only return them.

    Returns
    -------
    list of ResourceProblem
        Empty when everything is intact.

    Raises
    ------
    ModelError
        (``strict``) A model is missing, has no card, or does not match its card's sha256.
    DataError
        (``strict``) An atlas (or the demo case) is missing or damaged.
    """
    problems = find_resource_problems(root, demo=demo)
    for problem in problems:
        log.info("resource check: %s", problem.message)
    if strict and problems:
        first_kind = problems[0].kind
        error_type = ModelError if first_kind == "model" else DataError
        message = problems[0].message
        if len(problems) > 1:
            message += f" ({len(problems) - 1} more problem(s): " + "; ".join(p.message for p in problems[1:3]) + \
                       (" ..." if len(problems) > 3 else "") + ")"
        raise error_type(message)
    return problems
