"""Issue #18's "done when": the workstation reaches a complete implant plan with a few clicks
(open -> confirm masks -> register -> Template step -> Export) and the PDF it writes shows the plan
with the numbers the headless ``hipatlas plan`` prints for the same registration output.

The fast test runs the synthetic case with the synthetic registration; the slow one the bundled
demo case with the shipped model (the registration in the workstation's child process), as
``hipatlas gui --demo`` does.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
from PySide6.QtCore import Qt

from gui_helpers import synthetic_register

pytestmark = [pytest.mark.gui,
              pytest.mark.skipif(not shutil.which("pdftotext"), reason="poppler-utils (pdftotext) not installed")]

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _click_step(qtbot, window, name: str) -> None:
    """Click a step in the step list, as a user would."""
    from app.steps import STEPS

    item = window.steps.item(STEPS.index(name))
    assert item.flags() & Qt.ItemFlag.ItemIsEnabled, f"step {name} is not enabled"
    rect = window.steps.visualItemRect(item)
    qtbot.mouseClick(window.steps.viewport(), Qt.MouseButton.LeftButton, pos=rect.center())
    assert window.current_step() == name


def _headless_plan(out_dir: pathlib.Path, tmp_path: pathlib.Path) -> dict:
    """What ``hipatlas plan OUT --out PLAN`` prints (a child process, as a user runs it)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-m", "app.cli", "plan", str(out_dir), "--out", str(tmp_path / "plan")],
                          cwd=tmp_path, env=env, capture_output=True, encoding="utf-8", timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def plan_in_the_window(qtbot, window, case_dir, tmp_path, register_timeout_ms: int) -> None:
    from app.plan_report import implant_rows
    from gui_helpers import confirm_all
    from inference.templating.editor import change_rows

    assert window.open_path(case_dir), window.errors                      # Load
    _click_step(qtbot, window, "Masks")
    confirm_all(window)                                                   # Masks: confirm both
    _click_step(qtbot, window, "Register")
    with qtbot.waitSignal(window.registration_finished, timeout=register_timeout_ms) as blocker:
        qtbot.mouseClick(window.register_step.register_button, Qt.MouseButton.LeftButton)
    assert blocker.args == ["finished"], window.errors
    _click_step(qtbot, window, "Template")                                # Template: the automatic plan
    panel = window.template_panel
    qtbot.waitUntil(lambda: panel.editor is not None, timeout=30_000)
    assert panel.table.rowCount() > 0 and all(panel.outline_paths(i) for i in range(2))
    qtbot.mouseClick(panel.size_up, Qt.MouseButton.LeftButton)           # one size up, and back: undoable
    qtbot.mouseClick(panel.undo_button, Qt.MouseButton.LeftButton)
    editor = panel.editor

    headless = _headless_plan(window.session.result.out_dir, tmp_path)
    assert headless["implants"]["stem"]["size"] == editor.plan.stem_size
    shown = {panel.table.item(i, 0).text(): panel.table.item(i, 1).text() for i in range(panel.table.rowCount())}
    assert shown == dict(change_rows(headless["changes"]))                # the table = the headless numbers

    _click_step(qtbot, window, "Export")
    written = window.export_step.export_to(tmp_path / "export")
    assert written, window.errors
    text = " ".join(subprocess.run(["pdftotext", "-layout", str(written["pdf_report"]), "-"], capture_output=True,
                                   encoding="utf-8", check=True).stdout.split())
    assert "Implant plan on the radiographs" in text and "Implant plan in 3D" in text
    for label, value in change_rows(headless["changes"]):
        assert f"{label} {value}" in text, f"{label} {value} missing from the exported report"
    for _item, choice in implant_rows(editor.placed):
        assert " ".join(choice.split()) in text
    saved = json.loads((written["plan"] / "plan.json").read_text())
    assert saved["plan"] == editor.plan.to_dict()


def test_workstation_plans_and_exports_the_plan(make_window, synthetic_case, qtbot, tmp_path):
    window = make_window(synthetic_register)
    plan_in_the_window(qtbot, window, synthetic_case, tmp_path, 60_000)


@pytest.mark.slow
def test_demo_case_with_the_shipped_model_reaches_a_plan_in_its_pdf(make_window, qtbot, tmp_path):
    from inference import pipeline
    from inference.errors import ModelError

    demo = ROOT / "resources" / "demo"
    if not (demo / "case.json").is_file():
        pytest.skip("the demo case is not installed (resources/demo/case.json)")
    try:
        pipeline.default_model_path()
    except ModelError as error:
        pytest.skip(f"no shipped model: {error}")
    window = make_window(None)   # the real pipeline, in the workstation's child process
    plan_in_the_window(qtbot, window, demo, tmp_path, 900_000)
