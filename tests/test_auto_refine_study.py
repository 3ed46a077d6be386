"""tools/auto_refine_study.py: the gate picks the refined result exactly below the threshold."""

from __future__ import annotations

import json

from tool_helpers import load_tool


def _tool():
    return load_tool("auto_refine_study")


def _row(index, variant, dice, agreement=None):
    row = {"sample_index": index, "variant": variant, "side": "right", "dice": dice}
    if agreement is not None:
        row["mask_agreement_dice"] = agreement
    return row


def test_the_gate_takes_the_refined_result_only_below_the_threshold(tmp_path, capsys):
    rows = [_row(0, "fullres", 0.92, [0.97, 0.96]), _row(0, "refine", 0.90),      # agrees: kept
            _row(1, "fullres", 0.80, [0.97, 0.90]), _row(1, "refine", 0.88),      # disagrees: refined, better
            _row(2, "fullres", 0.85, [0.95, None]), _row(2, "refine", 0.84),      # disagrees: refined, worse
            {"sample_index": 3, "variant": "fullres", "error": "simulation failed"}]
    report = tmp_path / "set.json"
    report.write_text(json.dumps({"command": "tools/eval_cases.py ...", "rows": rows}))
    result = _tool().study([report], threshold=0.955)
    assert result["counts"] == {"cases": 3, "refined": 2, "better": 1, "worse": 1}
    dice = result["sets"][0]["dice"]
    assert abs(dice["gated"]["mean"] - (0.92 + 0.88 + 0.84) / 3) < 1e-12
    assert abs(dice["without"]["mean"] - (0.92 + 0.80 + 0.85) / 3) < 1e-12
    assert dice["refined"]["min"] == 0.84 and dice["gated"]["min"] == 0.84

    assert _tool().main([str(report), "--threshold", "0.955", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["counts"]["refined"] == 2
