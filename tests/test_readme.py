"""Every command the README prints parses: a printed command that exits 2 cannot ship again.

``hipatlas`` commands (fenced blocks and inline code) go through the real argument parser; the
``python tools/...`` and ``python benchmarks/...`` commands must name only options their script's
``--help`` lists; ``make`` targets must exist in the Makefile; linked reports must exist.
"""

from __future__ import annotations

import pathlib
import re
import shlex
import subprocess
import sys

import pytest

from app.cli import APP_SUBCOMMANDS
from inference.cli import build_parser

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _fenced_lines(text: str) -> list[str]:
    lines, inside = [], False
    for line in text.splitlines():
        if line.strip().startswith("```"):
            inside = not inside
            continue
        if inside and line.strip():
            lines.append(line.split("  #")[0].strip())
    return lines


def _inline_spans(text: str) -> list[str]:
    return [m.group(1).strip() for m in re.finditer(r"`([^`\n]+)`", text)]


def _commands(prefix: str) -> list[str]:
    found = [c for c in _fenced_lines(README) if c.startswith(prefix)]
    # In prose, `hipatlas register` names a command; with arguments it is one to run.
    found += [c for c in _inline_spans(README) if c.startswith(prefix) and len(c.split()) > 2]
    # "hipatlas train ..." in prose elides its arguments on purpose; everything else must parse.
    return sorted({c for c in found if not c.rstrip().endswith("...") and "... >" not in c})


def _placeholders(command: str) -> list[str]:
    """Split a README command; ``[A | B]`` alternatives become their first choice."""
    command = re.sub(r"\[([^\]|]+?)(?:\s*\|[^\]]*)?\]", r"\1", command)
    command = re.sub(r"\(([^)|]+?)(?:\s*\|[^)]*)?\)", r"\1", command)
    return shlex.split(command)


HIPATLAS = _commands("hipatlas ")
SCRIPTS = [c if c.startswith("python ") else f"python {c}" for prefix in
           ("python tools/", "python benchmarks/", "tools/", "benchmarks/") for c in _commands(prefix)
           if ".py" in c.split()[0 if prefix.endswith("/") and not prefix.startswith("python") else 1]]


def test_readme_names_commands():
    assert len(HIPATLAS) >= 8, HIPATLAS
    assert any(c.startswith("hipatlas train --recipe") for c in HIPATLAS), "the recipe command is not in the README"


@pytest.mark.parametrize("command", HIPATLAS)
def test_readme_hipatlas_command_parses(command):
    argv = _placeholders(command)[1:]
    parser = build_parser(extra=APP_SUBCOMMANDS)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        assert exit_.code == 0, f"README command exits {exit_.code}: {command}"
        return
    if getattr(args, "command", None) == "evaluate":
        assert (args.model_option or args.model) and (args.data_option or args.data_dir), command


@pytest.mark.parametrize("command", SCRIPTS)
def test_readme_script_command_options_exist(command):
    argv = _placeholders(command)
    script = ROOT / argv[1]
    assert script.is_file(), command
    help_text = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True,
                               cwd=ROOT, timeout=120).stdout
    for option in (a.split("=")[0] for a in argv[2:] if a.startswith("--")):
        assert option in help_text, f"{option} is not an option of {argv[1]} (README: {command})"


def test_readme_make_targets_exist():
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    targets = set(re.findall(r"^([\w-]+):", makefile, re.M))
    named = set(re.findall(r"`make ([\w-]+)`", README)) | {line.split()[1] for line in _fenced_lines(README)
                                                           if line.startswith("make ")}
    assert named and named <= targets, named - targets


def test_readme_links_exist():
    links = re.findall(r"\]\(((?!https?://)[^)#\s]+)", README)
    missing = [link for link in links if not (ROOT / link).exists()]
    assert not missing, missing
