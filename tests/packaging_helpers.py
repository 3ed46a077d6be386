"""Runs packaging/hipatlas.spec against a recording stand-in of PyInstaller's build API.

Shared by tests/test_packaging.py (layout of the full build) and tests/test_packaging_runtime.py
(the TensorFlow-free flavour): the spec is executed as PyInstaller would, with ``Analysis``,
``PYZ``, ``EXE``, ``COLLECT`` and ``BUNDLE`` recording their arguments, and
``PyInstaller.utils.hooks`` listing files instead of importing packages.
"""

from __future__ import annotations

import pathlib
import sys
import tomllib
import types

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGING = ROOT / "packaging"
if str(PACKAGING) not in sys.path:
    sys.path.insert(0, str(PACKAGING))

import bundle_manifest as bm  # noqa: E402

VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


class _Recorder:
    calls: list

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs
        type(self).calls.append(self)


def _fake_pyinstaller(monkeypatch):
    """Minimal PyInstaller modules the spec imports; collect_submodules lists files, imports none."""
    def collect_submodules(package):
        base = ROOT / package.replace(".", "/")
        names = []
        for path in sorted(base.rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
        return names

    hooks = types.ModuleType("PyInstaller.utils.hooks")
    hooks.collect_submodules = collect_submodules
    hooks.copy_metadata = lambda name: [(f"/site-packages/{name}-{VERSION}.dist-info", f"{name}-{VERSION}.dist-info")]
    versioninfo = types.ModuleType("PyInstaller.utils.win32.versioninfo")
    for name in ("VSVersionInfo", "FixedFileInfo", "StringFileInfo", "StringTable", "StringStruct",
                 "VarFileInfo", "VarStruct"):
        setattr(versioninfo, name, type(name, (), {"__init__": lambda self, *a, **k: setattr(self, "a", (a, k))}))
    for name, module in {"PyInstaller": types.ModuleType("PyInstaller"),
                         "PyInstaller.utils": types.ModuleType("PyInstaller.utils"),
                         "PyInstaller.utils.hooks": hooks,
                         "PyInstaller.utils.win32": types.ModuleType("PyInstaller.utils.win32"),
                         "PyInstaller.utils.win32.versioninfo": versioninfo}.items():
        monkeypatch.setitem(sys.modules, name, module)
    sys.modules["PyInstaller.utils.win32"].versioninfo = versioninfo


def run_spec(monkeypatch, platform="linux", flavour=None, pure=("inference.cli", "numpy"),
             binaries=("numpy.libs/libopenblas.so",)):
    """Execute the spec; returns {class name: recorded calls, "namespace": the spec's globals}.

    ``flavour`` sets ``HIPATLAS_FLAVOUR`` (None: unset, the full build); ``pure`` and ``binaries``
    are the module names and bundle paths the stand-in Analysis reports as collected.
    """
    _fake_pyinstaller(monkeypatch)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the spec prepends packaging/
    monkeypatch.setattr(sys, "platform", platform)
    if flavour is None:
        monkeypatch.delenv(bm.FLAVOUR_ENV, raising=False)
    else:
        monkeypatch.setenv(bm.FLAVOUR_ENV, flavour)
    if bm.missing_resources():
        monkeypatch.setenv(bm.ALLOW_MISSING_ENV, "1")
    recorded = {}
    classes = {}
    for name in ("Analysis", "PYZ", "EXE", "COLLECT", "BUNDLE"):
        classes[name] = type(name, (_Recorder,), {"calls": []})
    cli = str(PACKAGING / "launchers" / "hipatlas_cli.py")
    gui = str(PACKAGING / "launchers" / "hipatlas_gui.py")

    def analysis(*args, **kwargs):
        obj = classes["Analysis"](*args, **kwargs)
        obj.pure = [(name, f"/site-packages/{name.replace('.', '/')}.py", "PYMODULE") for name in pure]
        obj.binaries = [(path, f"/site-packages/{path}", "BINARY") for path in binaries]
        obj.datas = [("resources/demo/case.json", "/src/resources/demo/case.json", "DATA")]
        obj.scripts = [("pyi_rth_a", "/hooks/pyi_rth_a.py", "PYSOURCE"),
                       ("hipatlas_cli", cli, "PYSOURCE"), ("hipatlas_gui", gui, "PYSOURCE")]
        return obj

    namespace = {"SPECPATH": str(PACKAGING), "__file__": str(PACKAGING / "hipatlas.spec"), **classes,
                 "Analysis": analysis}
    exec(compile((PACKAGING / "hipatlas.spec").read_text(), "hipatlas.spec", "exec"), namespace)
    for name, cls in classes.items():
        recorded[name] = cls.calls
    recorded["namespace"] = namespace
    return recorded
