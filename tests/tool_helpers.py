"""Loading a script of ``tools/`` (not a package) as a module, for its tests."""

from __future__ import annotations

import importlib.util
import pathlib
from types import ModuleType

TOOLS = pathlib.Path(__file__).resolve().parents[1] / "tools"


def load_tool(name: str, module_name: str | None = None) -> ModuleType:
    """``tools/<name>.py`` executed as a fresh module called ``module_name`` (default ``name``)."""
    spec = importlib.util.spec_from_file_location(module_name or name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
