"""Where a reported figure came from: the command, the code's commit, the model, the machine, the time.

Every committed report (``docs/results/``, evaluation and benchmark reports) carries
:func:`provenance` so that a figure in the README can be traced to the code and model that
produced it and re-measured with the command recorded beside it.
"""

from __future__ import annotations

import datetime
import os
import pathlib
import platform
import shlex
import subprocess
import sys
from typing import Any

from inference import __version__

_REPO = pathlib.Path(__file__).resolve().parents[1]


def git_commit(repo: str | os.PathLike = _REPO) -> dict[str, Any]:
    """``{"commit": sha, "dirty": bool}`` of the checkout, or ``{"commit": None}`` outside git."""
    try:
        sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        # Reports being written (docs/results) do not make the code they measure dirty.
        status = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no", "--",
                                 ".", ":!docs/results"], capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": sha, "dirty": bool(status.strip())}


def provenance(model_file: str | os.PathLike | None = None, command: list[str] | None = None) -> dict[str, Any]:
    """The provenance record of a report (JSON-ready).

    ``model_file``: the ``.keras`` model the figures were measured with (its sha256 is recorded),
    or a list of them (several averaged: each is recorded under ``models``, the first also as
    ``model_file``); ``command``: the argument list that produced the report (default ``sys.argv``).
    """
    from inference.checksums import sha256_file

    record: dict[str, Any] = {
        "command": shlex.join(command if command is not None else [pathlib.Path(sys.argv[0]).name, *sys.argv[1:]]),
        **git_commit(),
        "software_version": __version__,
        "measured_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"python": platform.python_version(), "machine": platform.machine(),
                    "cpu_count": os.cpu_count()},
    }
    files = [pathlib.Path(f) for f in (model_file if isinstance(model_file, (list, tuple)) else [model_file])
             if f is not None]
    if files:
        record["model_file"] = files[0].name
        record["model_sha256"] = sha256_file(files[0])
    if len(files) > 1:
        record["models"] = [{"file": f"{path.parent.name}/{path.name}", "sha256": sha256_file(path)} for path in files]
    return record


def provenance_markdown(record: dict[str, Any]) -> str:
    """A short Markdown block of :func:`provenance` for the head of a report."""
    lines = [f"- command: `{record['command']}`",
             f"- commit: `{record.get('commit')}`" + (" (with uncommitted changes)" if record.get("dirty") else ""),
             f"- software version: {record['software_version']}; measured {record['measured_at']}",
             f"- machine: {record['machine']['machine']}, {record['machine']['cpu_count']} CPUs, "
             f"Python {record['machine']['python']}"]
    if "models" in record:
        lines.append("- models (their fields averaged): " + ", ".join(
            f"`{m['file']}` sha256 `{m['sha256']}`" for m in record["models"]))
    elif "model_sha256" in record:
        lines.append(f"- model: `{record['model_file']}` sha256 `{record['model_sha256']}`")
    return "\n".join(lines) + "\n"
