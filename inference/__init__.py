"""HipAtlas inference core: geometry, data, network, pipeline. Never imports Qt or VTK."""

from __future__ import annotations


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("hipatlas")
    except Exception:  # not installed (e.g. run from a source tree): read pyproject.toml
        import pathlib
        import re

        pyproject = pathlib.Path(__file__).resolve().parent.parent / "pyproject.toml"
        try:
            match = re.search(r'^version\s*=\s*"([^"]+)"', pyproject.read_text(), re.M)
            return match.group(1) if match else "0+unknown"
        except OSError:
            return "0+unknown"


__version__ = _version()
