"""The compute core never depends on the GUI: `inference` must not import Qt, VTK, pyvista or `app`;
the Qt-free modules of `app` (session, project, report, export writers, mask and image helpers)
must not import Qt, and its pure image/mask helpers not VTK either."""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
FORBIDDEN = ("PySide6", "vtk", "vtkmodules", "pyvista", "pyvistaqt", "app")


def _inference_modules() -> list[str]:
    modules = []
    for path in sorted((ROOT / "inference").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules.append(".".join(parts))
    return modules


QT = ("PySide6", "shiboken6", "pyvistaqt", "superqt")
VTK = ("vtk", "vtkmodules", "pyvista")
# The same lists as the import-linter contracts in pyproject.toml.
APP_QT_FREE = ("app.session", "app.project", "app.report", "app.report_figures", "app.export", "app.masks",
               "app.imaging", "app.windowing", "app.isolated", "app.style")
APP_NUMPY_ONLY = ("app.masks", "app.imaging", "app.windowing", "app.isolated", "app.style")


def _loaded_after_import(modules, families) -> list[str]:
    """Top-level packages of ``families`` in sys.modules after importing ``modules`` in a fresh
    interpreter (import-linter reads the source; this also sees what runs at import time)."""
    code = (
        "import importlib, json, sys\n"
        f"for name in {list(modules)!r}:\n"
        "    importlib.import_module(name)\n"
        f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({list(families)!r}))))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            env={"TF_CPP_MIN_LOG_LEVEL": "3", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_app_contract_lists_match_pyproject():
    import tomllib

    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    sources = {contract["name"]: tuple(contract["source_modules"]) for contract in contracts}
    assert sources["the workstation's Qt-free modules never import Qt"] == APP_QT_FREE
    assert sources["the workstation's image and mask helpers import neither Qt nor VTK"] == APP_NUMPY_ONLY


def test_qt_free_app_modules_load_no_qt():
    assert _loaded_after_import(APP_QT_FREE, QT) == []
    assert _loaded_after_import(APP_NUMPY_ONLY, QT + VTK) == []


def test_the_runtime_check_sees_a_qt_import():
    # The check above would pass vacuously if it could not see Qt at all: the window module does load it.
    assert "PySide6" in _loaded_after_import(["app.main_window"], QT)


def test_import_linter_contract_holds():
    lint = shutil.which("lint-imports", path=str(pathlib.Path(sys.executable).parent)) or shutil.which("lint-imports")
    if lint is None:
        pytest.skip("import-linter is not installed (dev extra)")
    result = subprocess.run([lint, "--config", str(ROOT / "pyproject.toml")], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_importing_every_inference_module_loads_no_gui_library():
    # import-linter sees static imports; this also catches lazy imports that run at import time.
    loaded = _loaded_after_import(_inference_modules(), FORBIDDEN)
    assert loaded == [], f"inference imported GUI libraries: {loaded}"


def test_nothing_reads_outside_the_repository():
    """A clone stands on its own: no file of the project points at a folder beside it."""
    import pathlib
    import re

    import subprocess

    root = pathlib.Path(__file__).resolve().parents[1]
    pattern = re.compile(r"\.\./shared|parents\[2\]\s*/\s*[\"']shared")
    listed = subprocess.run(["git", "-C", str(root), "ls-files", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, text=True, check=True).stdout.splitlines()
    offenders = []
    for name in listed:
        path = root / name
        if path == pathlib.Path(__file__).resolve() or not path.is_file() or path.suffix in {".stl", ".png", ".keras", ".gz"}:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if pattern.search(text):
            offenders.append(name)
    assert not offenders, offenders
