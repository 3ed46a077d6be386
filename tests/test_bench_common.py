"""The benchmarks' shared report: what it records of how the figures were measured."""

from __future__ import annotations

import json

from benchmarks._common import BenchReport


def _command_of(tmp_path, name: str) -> str:
    report = BenchReport("demo", report=str(tmp_path / name))
    report.model_file = []  # no model: the report names none
    report.add("wall_s", 1.5, "s", "wall")
    report.finish()
    record = json.loads((tmp_path / f"{name}.json").read_text())
    assert record["figures"] == {"wall_s": 1.5}
    assert f"`{record['provenance']['command']}`" in (tmp_path / f"{name}.md").read_text()
    return record["provenance"]["command"]


def test_report_writes_the_settings_that_change_the_figures_before_the_command(tmp_path, monkeypatch):
    monkeypatch.delenv("NUMPY_MADVISE_HUGEPAGE", raising=False)
    assert _command_of(tmp_path, "plain").startswith("python ")
    monkeypatch.setenv("NUMPY_MADVISE_HUGEPAGE", "1")
    assert _command_of(tmp_path, "huge").startswith("NUMPY_MADVISE_HUGEPAGE=1 python ")
