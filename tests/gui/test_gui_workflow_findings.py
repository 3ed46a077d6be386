"""The workstation findings of the surgeon's walk-through (issue 15), one test each: undo per step
and object, out-of-date results, wheel on unfocused fields, radiograph navigation, truthful
status, file dialogs, the long-lived registration process, visible focus and check state."""

from __future__ import annotations

import functools
import os
import pathlib
import time

import numpy as np
import pytest
from PySide6.QtCore import QPoint, QPointF, Qt
from PySide6.QtGui import QWheelEvent
from PySide6.QtWidgets import QApplication, QFileDialog

from gui_helpers import confirm_all, model_loading_register, register, synthetic_register

pytestmark = pytest.mark.gui

SQUARE = np.array([[10.0, 10.0], [30.0, 10.0], [30.0, 30.0], [10.0, 30.0]])


def _wheel(widget, position: QPointF, notches: int = 1) -> None:
    global_position = QPointF(widget.mapToGlobal(position.toPoint()))
    event = QWheelEvent(position, global_position, QPoint(0, 0), QPoint(0, 120 * notches), Qt.MouseButton.NoButton,
                        Qt.KeyboardModifier.NoModifier, Qt.ScrollPhase.NoScrollPhase, False)
    QApplication.sendEvent(widget, event)


def _double_click(qtbot, widget, position: QPoint) -> None:
    """What a mouse sends for a double click: press, release, double-click, release (QTest's
    mouseDClick sends the double-click event alone)."""
    qtbot.mousePress(widget, Qt.MouseButton.LeftButton, pos=position)
    qtbot.mouseRelease(widget, Qt.MouseButton.LeftButton, pos=position)
    qtbot.mouseDClick(widget, Qt.MouseButton.LeftButton, pos=position)
    qtbot.mouseRelease(widget, Qt.MouseButton.LeftButton, pos=position)


def _registered(make_window, synthetic_case, qtbot, register_fn=synthetic_register):
    window = make_window(register_fn)
    assert window.open_case_folder(synthetic_case)
    confirm_all(window)
    assert register(qtbot, window) == "finished", window.errors
    return window


# ---------------------------------------------------------------------------- finding 2: undo, stale results
def test_undo_acts_on_the_current_step_and_covers_landmarks(make_window, synthetic_case, qtbot):
    window = make_window()
    window.open_case_folder(synthetic_case)
    window.masks_step._polygon_closed(0, SQUARE, True)             # a mask edit before registering
    confirm_all(window)
    assert register(qtbot, window) == "finished"
    masks = [v.mask.copy() for v in window.session.views]
    window.go_to_step("Measure")
    head = list(window.session.landmarks_mm["head_centre"])
    offset = window.session.measurements["femoral_offset_mm"]
    window.measure_step.move_landmark("head_centre", [head[0] + 5.0, head[1], head[2]])
    assert window.session.measurements["femoral_offset_mm"] != pytest.approx(offset)
    window.actions["undo"].trigger()                                # Ctrl+Z on the Measure step
    assert window.session.landmarks_mm["head_centre"] == pytest.approx(head)
    assert window.session.measurements["femoral_offset_mm"] == pytest.approx(offset)
    window.actions["undo"].trigger()                                # nothing more to undo here...
    assert all(np.array_equal(v.mask, m) for v, m in zip(window.session.views, masks))  # ...the masks stay
    assert window.session.all_confirmed and window.actions["export"].isEnabled()
    window.actions["redo"].trigger()
    assert window.session.landmarks_mm["head_centre"][0] == pytest.approx(head[0] + 5.0)
    assert window.measure_step.landmark_spins["head_centre"][0].value() == pytest.approx(head[0] + 5.0)
    window.go_to_step("Masks")                                      # the Masks step undoes mask edits...
    window.masks_step._polygon_closed(1, SQUARE, True)
    drawn = window.session.views[1].mask.copy()
    view = window.radiograph_panels[0].view
    qtbot.mouseMove(view.viewport(), view.viewport().rect().center())  # ...of the view under the pointer
    window.actions["undo"].trigger()
    assert not window.session.views[0].mask[15:25, 15:25].any()
    assert np.array_equal(window.session.views[1].mask, drawn)


def test_mask_edit_after_registration_marks_results_out_of_date(make_window, synthetic_case, qtbot):
    window = _registered(make_window, synthetic_case, qtbot)
    assert not window.stale_banner.isVisible() and window.actions["export"].isEnabled()
    window.go_to_step("Masks")
    window.masks_step._polygon_closed(1, SQUARE, True)
    assert window.stale_banner.isVisible() and "out of date" in window.stale_text.text()
    assert not window.actions["export"].isEnabled() and not window.export_step.export_button.isEnabled()
    register_row = window.steps.item(2).text()
    assert "\u2713" not in register_row and "!" in register_row     # shown by a mark, not only by colour
    window.masks_step.stack.undo()                                  # back to the registered masks:
    confirm_all(window)
    assert not window.stale_banner.isVisible() and window.actions["export"].isEnabled()
    window.masks_step._polygon_closed(1, SQUARE, True)
    window.keep_result_button.click()                               # the explicit "keep the old result"
    assert not window.stale_banner.isVisible() and window.actions["export"].isEnabled()
    assert "kept" in window.status_message.text().lower()
    window.masks_step._polygon_closed(0, SQUARE + 40, True)         # a further edit: out of date again
    assert window.stale_banner.isVisible()
    confirm_all(window)
    assert register(qtbot, window) == "finished"                    # re-running clears it
    assert not window.stale_banner.isVisible() and window.actions["export"].isEnabled()


# ---------------------------------------------------------------------------- finding 3: wheel on fields
def test_wheel_over_an_unfocused_landmark_field_edits_nothing(make_window, synthetic_case, qtbot):
    window = _registered(make_window, synthetic_case, qtbot)
    window.go_to_step("Measure")
    spin = window.measure_step.landmark_spins["head_centre"][0]
    before = list(window.session.landmarks_mm["head_centre"])
    assert not spin.hasFocus()
    _wheel(spin, QPointF(spin.width() / 2, spin.height() / 2), notches=3)
    assert window.session.landmarks_mm["head_centre"] == pytest.approx(before)
    assert spin.focusPolicy() != Qt.FocusPolicy.WheelFocus
    brush = window.masks_step.brush_size
    value = brush.value()
    _wheel(brush, QPointF(brush.width() / 2, brush.height() / 2), notches=2)
    assert brush.value() == value
    from app.steps.load import ImportDialog

    dialog = ImportDialog(window)
    dialog.show()
    _wheel(dialog.side, QPointF(5, 5), notches=-1)                    # the femur side of an import
    assert dialog.side.currentText() == "right"
    dialog.close()


# ---------------------------------------------------------------------------- finding 5: navigation
def test_radiograph_zooms_at_the_cursor_fits_by_button_and_double_click_never_paints(make_window, synthetic_case,
                                                                                     qtbot):
    window = make_window()
    window.open_case_folder(synthetic_case)
    panel = window.radiograph_panels[0]
    view = panel.view
    qtbot.wait(20)
    here = QPointF(view.viewport().width() * 0.75, view.viewport().height() * 0.7)
    qtbot.mouseMove(view.viewport(), QPoint(5, 5))
    qtbot.mouseMove(view.viewport(), here.toPoint())
    QApplication.processEvents()  # the layout has settled (the headers' texts were just set): fitted
    fitted = view.transform().m11()
    anchor = view.mapToScene(here.toPoint())
    _wheel(view.viewport(), here, notches=3)
    assert view.transform().m11() == pytest.approx(fitted * 1.25 ** 3)
    after = view.mapToScene(here.toPoint())
    assert abs(after.x() - anchor.x()) < 1.0 and abs(after.y() - anchor.y()) < 1.0
    # a middle drag pans by the distance dragged (also past the image edge); right-drag is window/level
    start, end = here.toPoint(), here.toPoint() + QPoint(-60, -40)
    qtbot.mousePress(view.viewport(), Qt.MouseButton.MiddleButton, pos=start)
    qtbot.mouseMove(view.viewport(), end)
    qtbot.mouseRelease(view.viewport(), Qt.MouseButton.MiddleButton, pos=end)
    moved = view.mapToScene(end)
    scale = view.transform().m11()
    assert abs(moved.x() - after.x()) < 2.0 / scale + 0.5 and abs(moved.y() - after.y()) < 2.0 / scale + 0.5
    # the visible fit control
    panel.fit_button.click()
    assert view.transform().m11() == pytest.approx(fitted)
    # brush mode: a double click neither paints nor stays painted
    _wheel(view.viewport(), here, notches=2)
    window.masks_step.set_tool("brush")
    mask = window.session.views[0].mask.copy()
    assert not mask[85, 8]
    _double_click(qtbot, view.viewport(), view.mapFromScene(QPointF(8.0, 85.0)))
    assert np.array_equal(window.session.views[0].mask, mask)
    assert window.masks_step.stack.count() == 0                       # and leaves nothing to redo
    assert view.transform().m11() == pytest.approx(fitted)            # it fits, as in the other modes


# ---------------------------------------------------------------------------- finding 6: truthful state
def test_status_register_button_and_shortcut_tell_the_truth(make_window, synthetic_case, qtbot):
    window = make_window()
    window.open_case_folder(synthetic_case)
    confirm_all(window)
    assert "ready to register" in window.status_message.text()
    window.masks_step._polygon_closed(0, SQUARE, True)               # the edit withdraws the confirmation
    assert "ready to register" not in window.status_message.text()
    assert "confirm the mask" in window.status_message.text()
    assert "confirm the mask" in window.register_step.register_button.toolTip()
    assert "confirm the mask" in window.actions["register"].toolTip()
    window.actions["register"].trigger()                              # Ctrl+R says why, rather than nothing
    assert window.errors and "confirm the mask" in window.errors[-1]


def test_escape_just_after_a_run_never_leaves_cancelling(make_window, synthetic_case, qtbot):
    window = make_window()
    window.open_case_folder(synthetic_case)
    confirm_all(window)
    step = window.register_step
    with qtbot.waitSignal(window.registration_finished, timeout=60_000) as blocker:
        assert window.start_registration()
        # Esc lands after the job has returned but before the worker thread is released
        step.worker.succeeded.connect(lambda _result: window.actions["cancel"].trigger())
    assert blocker.args == ["finished"]
    assert step.progress_message.text() == "Done" and step.progress.value() == 1000
    assert window.session.result is not None


# ---------------------------------------------------------------------------- finding 7: dialogs
def test_file_dialogs_start_in_the_users_folder_not_the_installation(make_window, synthetic_case, monkeypatch):
    from inference.resources import demo_dir

    window = make_window()
    window.remember(pathlib.Path(demo_dir()) / "case.json")           # the demo lives in the installation
    starts = []
    monkeypatch.setattr(QFileDialog, "getExistingDirectory", lambda *args, **kw: starts.append(args[2]) or "")
    window.load_step.choose_case_folder()
    install = pathlib.Path(demo_dir()).resolve().parents[1]
    assert starts and install not in pathlib.Path(starts[0]).resolve().parents
    assert pathlib.Path(starts[0]).is_dir()
    window.open_case_folder(synthetic_case)                           # a user's folder is remembered
    starts.clear()
    window.load_step.choose_case_folder()
    assert pathlib.Path(starts[0]) == pathlib.Path(synthetic_case).resolve().parent


def test_export_into_a_new_folder_the_user_names(make_window, synthetic_case, qtbot, tmp_path, monkeypatch):
    window = _registered(make_window, synthetic_case, qtbot)
    target = tmp_path / "plans" / "Hip plan 2026"
    assert not target.parent.exists()
    monkeypatch.setattr(QFileDialog, "getExistingDirectory", lambda *args, **kw: str(target))
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *args, **kw: (str(target), ""))
    window.export_step.export_boxes["pdf_report"].setChecked(False)
    window.export_step.choose_export_folder()
    assert (target / "measurements.json").is_file(), window.errors


# ---------------------------------------------------------------------------- finding 9: model stays loaded
def test_the_registration_process_and_its_model_outlive_a_run(make_window, synthetic_case, qtbot):
    window = make_window(functools.partial(model_loading_register, load_seconds=4.0))
    window.open_case_folder(synthetic_case)
    confirm_all(window)
    started = time.monotonic()
    assert register(qtbot, window) == "finished", window.errors
    first_s = time.monotonic() - started
    first = window.session.result.report["process"]
    started = time.monotonic()
    assert register(qtbot, window) == "finished", window.errors
    second_s = time.monotonic() - started
    again = window.session.result.report["process"]
    assert again["pid"] == first["pid"] != os.getpid() and again["model_loads"] == 1
    assert second_s < first_s - 3.0                                   # no second model load
    os.kill(first["pid"], 9)                                          # the process dies: the next run restarts it
    qtbot.wait(200)
    assert register(qtbot, window) == "finished", window.errors
    assert window.session.result.report["process"]["pid"] != first["pid"]


# ---------------------------------------------------------------------------- "also": focus, check state
def _grab(widget) -> np.ndarray:
    image = widget.grab().toImage().convertToFormat(widget.grab().toImage().Format.Format_RGB888)
    pointer = image.constBits()
    return np.frombuffer(pointer, np.uint8, image.sizeInBytes()).reshape(image.height(), image.bytesPerLine())[
        :, : image.width() * 3].reshape(image.height(), image.width(), 3).copy()


def test_keyboard_focus_is_visible_and_check_state_is_not_colour_alone(make_window, qtbot):
    window = make_window()
    button = window.load_step.findChildren(type(window.export_step.export_button))[0]
    plain = _grab(button)
    window.activateWindow()
    button.setFocus(Qt.FocusReason.TabFocusReason)
    qtbot.waitUntil(button.hasFocus, timeout=2000)
    focused = _grab(button)
    changed = np.abs(plain.astype(int) - focused.astype(int)).sum(axis=2) > 60
    assert changed.sum() > 2 * (button.width() + button.height())     # a ring, not a hint of a change
    box = window.review_step.show_contours
    box.setChecked(False)
    unchecked = _grab(box).mean(axis=2)
    box.setChecked(True)
    checked = _grab(box).mean(axis=2)
    inside = checked[:, : box.height() + 4]                           # the indicator at the left
    # a tick: light strokes on the indicator, so the states differ in brightness, not only in hue
    assert (inside > 200).sum() >= 6 and (unchecked[:, : box.height() + 4] > 200).sum() < (inside > 200).sum()
