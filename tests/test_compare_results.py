"""tools/compare_results.py: how far apart two experiments' results.json are."""

from __future__ import annotations

import json

from tool_helpers import load_tool


def test_differences_per_key_leave_out_provenance_and_clock_times(tmp_path, capsys):
    tool = load_tool("compare_results")
    a = {"provenance": {"commit": 1}, "table": {"dice": [0.9, 0.8], "time_s": 3.0}, "rows": [{"n": 2, "ok": True}],
         "only_in_a": 1.0}
    b = {"provenance": {"commit": 2}, "table": {"dice": [0.9, 0.85], "time_s": 9.0}, "rows": [{"n": 2, "ok": False}]}
    result = tool.compare(a, b)
    assert set(result) == {"table", "rows"}
    assert result["table"] == {"compared": 2, "differing": 1, "max_abs_diff": 0.85 - 0.8}
    assert result["rows"] == {"compared": 1, "differing": 0, "max_abs_diff": 0.0}
    for name, value in (("a.json", a), ("b.json", b)):
        (tmp_path / name).write_text(json.dumps(value))
    assert tool.main([str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["table"]["differing"] == 1
