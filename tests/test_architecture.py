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


def _import_graph(root: pathlib.Path, package: str) -> dict[str, set[str]]:
    """Module -> the modules of ``package`` it imports, anywhere in its code (imports inside
    functions count: they hide a dependency, they do not remove it)."""
    import ast

    files = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def resolve(name: str) -> str | None:
        # "inference.geometry.project_points" -> "inference.geometry"
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    here = name.split(".") if is_package else name.split(".")[:-1]
                    base = ".".join(here[:len(here) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            for target in targets:
                module = resolve(target) if target.split(".")[0] == package else None
                if module is not None and module != name:
                    graph[name].add(module)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_import_graph_finds_a_cycle_hidden_in_a_function(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg import b\n")
    (package / "b.py").write_text("def f():\n    from pkg.sub.c import g\n")
    (package / "sub" / "c.py").write_text("from ..a import x\nimport numpy\n")
    (package / "d.py").write_text("import pkg.a\n")
    graph = _import_graph(tmp_path, "pkg")
    assert graph["pkg.b"] == {"pkg.sub.c"} and graph["pkg.sub.c"] == {"pkg.a"} and graph["pkg.d"] == {"pkg.a"}
    assert _cycles(graph) == [["pkg.a", "pkg.b", "pkg.sub.c"]]


def test_inference_has_no_import_cycle():
    """Modules that import each other (even through imports inside functions) are one module in
    disguise, or miss a layer between them (the registration frame between the pipeline and the
    mask proposal, issue 16)."""
    cycles = _cycles(_import_graph(ROOT, "inference"))
    assert cycles == [], "import cycles in inference: " + "; ".join(" <-> ".join(c) for c in cycles)


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


def _numpy_huge_pages_after(imports: str, environment: dict[str, str]) -> bool:
    """Whether NumPy still marks large arrays for huge pages after ``imports`` (a fresh interpreter)."""
    code = (f"{imports}\n"
            "from numpy._core.multiarray import _set_madvise_hugepage\n"
            "print(_set_madvise_hugepage(False))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            env={"PATH": "/usr/bin:/bin", **environment})
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()[-1] == "True"


def test_importing_inference_stops_numpy_asking_for_huge_pages():
    # NumPy asks for them on Linux >= 4.6; importing inference stops it (a fresh register's page
    # faults stalled 2-3 s in compaction: inference/__init__.py) unless the user chose otherwise.
    assert not _numpy_huge_pages_after("import inference", {})
    assert _numpy_huge_pages_after("import inference", {"NUMPY_MADVISE_HUGEPAGE": "1"})
    assert not _numpy_huge_pages_after("import inference", {"NUMPY_MADVISE_HUGEPAGE": "0"})
