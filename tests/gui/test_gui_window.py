"""The main window with pytest-qt under Xvfb: workflow, worker, editing, rendering, export, cleanup."""

from __future__ import annotations

import functools
import gc
import json
import os
import pathlib
import sys
import threading
import time

import numpy as np
from PIL import Image
import pytest
from PySide6.QtCore import QPoint, QPointF, Qt
from PySide6.QtWidgets import QApplication

from gui_helpers import (FEMUR, Heartbeat, busy_register, confirm_all, crashing_register, failing_register,
                         pipeline_like_register, register, synthetic_register, write_synthetic_case)

pytestmark = pytest.mark.gui


def _vtk_objects() -> set[int]:
    gc.collect()
    return {id(o) for o in gc.get_objects() if type(o).__name__.startswith("vtk")}


def _not_blank(rgb: np.ndarray, background_fraction: float = 0.97) -> bool:
    """More than a sliver of the image differs from its most common colour."""
    flat = rgb.reshape(-1, rgb.shape[-1]).astype(np.int32)
    codes = flat[:, 0] * 65536 + flat[:, 1] * 256 + flat[:, 2]
    _, counts = np.unique(codes, return_counts=True)
    return counts.max() / codes.size < background_fraction and rgb.std() > 5


def test_open_confirm_register_review_measure(make_window, synthetic_case, qtbot):
    window = make_window()
    assert window.open_case_folder(synthetic_case)
    assert window.current_step() == "Masks"
    assert [window.load_step.case_table.item(r, 3).text() for r in range(2)] == ["case.json matrix"] * 2
    assert "case.json projection_matrix" in window.load_step.case_table.item(0, 3).toolTip()
    assert not window.register_step.register_button.isEnabled() and "confirm the mask" in window.register_step.register_blocker.text()
    window.radiograph_panels[0].confirm.setChecked(True)      # the header checkbox of a view
    assert window.session.views[0].confirmed and window.masks_step.mask_rows[0][2].isChecked()
    assert not window.register_step.register_button.isEnabled()
    window.masks_step.mask_rows[1][2].setChecked(True)                   # the panel checkbox
    assert window.register_step.register_button.isEnabled()

    assert register(qtbot, window) == "finished"
    assert window.current_step() == "Review" and window.register_step.worker is None
    # measurements table holds the pipeline's values
    table = {window.measure_step.measure_table.item(r, 0).text(): window.measure_step.measure_table.item(r, 1).text()
             for r in range(window.measure_step.measure_table.rowCount())}
    assert table["Femoral head radius"] == "12.0"
    assert table["Femoral offset"] == f"{FEMUR.femoral_offset_mm:.1f}"
    assert table["Neck-shaft angle (CCD)"] == "130.0"
    # 3D: the surface actor, head sphere and axes are there and the render is not blank
    assert window.surface_view.has_surface()
    assert {"head_sphere", "shaft_axis", "neck_axis", "landmarks"} <= set(window.surface_view.actor_names())
    window.viewers.setCurrentIndex(1)
    qtbot.wait(50)
    pixels = window.surface_view.render_image()
    assert pixels.shape[0] > 100 and _not_blank(pixels)
    # the surface itself is drawn: hiding it changes a good part of the picture
    window.surface_view.show_surface.setChecked(False)
    without = window.surface_view.render_image()
    window.surface_view.show_surface.setChecked(True)
    changed = np.abs(pixels.astype(int) - without.astype(int)).sum(axis=2) > 30
    assert changed.mean() > 0.02
    # radiographs show the projected contour; slices show the label
    # (drawn from the registration's outline polylines, in pixel coordinates)
    radiograph = window.radiograph_panels[0].view
    polylines = window.session.result.contours[window.session.views[0].name]
    points = np.concatenate(polylines)
    path = radiograph.contour_path()
    assert path.elementCount() == len(points) > 20
    box = path.boundingRect()
    assert (box.left(), box.top(), box.right(), box.bottom()) == pytest.approx(
        (*points.min(axis=0), *points.max(axis=0)))
    window.viewers.setCurrentIndex(0)
    qtbot.wait(20)
    shown = radiograph.grab().toImage()
    radiograph.set_contour_visible(False)
    hidden = radiograph.grab().toImage()
    radiograph.set_contour_visible(True)
    assert shown != hidden
    assert window.slice_panel.cursor_zyx == tuple(s // 2 for s in FEMUR.grid().shape_zyx)
    # a click in the coronal view moves the linked cursor (and the 3D slices)
    view = window.slice_panel.views["coronal"]
    window.viewers.setCurrentIndex(2)
    qtbot.wait(20)
    before = window.slice_panel.cursor_zyx
    qtbot.mouseClick(view.viewport(), Qt.MouseButton.LeftButton, pos=QPoint(view.viewport().width() // 3,
                                                                              view.viewport().height() // 3))
    after = window.slice_panel.cursor_zyx
    assert after[1] == before[1] and (after[0], after[2]) != (before[0], before[2])
    assert window.surface_view._slice_point == pytest.approx(tuple(window.slice_panel.cursor_world_mm()))
    # the summary states what a view's angle a degree off would move (report.json -> angle_sensitivity)
    window.session.result.report["angle_sensitivity"] = {
        "per_deg_of": 1.0, "AP": {"hip_centre_mm_per_deg": 0.28, "femur_mean_mm_per_deg": 0.36, "femur_max_mm_per_deg": 0.76}}
    window.review_step.refresh()
    assert "AP: hip centre 0.28 mm, femur 0.36 mm on average and up to 0.76 mm" in window.review_step.review_summary.text()


def test_gui_thread_never_blocks_during_registration(make_window, synthetic_case, qtbot):
    window = make_window(busy_register)
    window.open_case_folder(synthetic_case)
    confirm_all(window)
    heartbeat, finished_at = Heartbeat(), []
    heartbeat.start()
    with qtbot.waitSignal(window.registration_finished, timeout=60_000) as blocker:
        started = heartbeat.now()
        assert window.start_registration()
        # Direct connection: runs in the worker thread the moment the job returns, so the time
        # excludes building the 3D scene afterwards (which runs on the GUI thread by design).
        window.register_step.worker.succeeded.connect(lambda _result: finished_at.append(heartbeat.now()),
                                        Qt.ConnectionType.DirectConnection)
    heartbeat.stop()
    assert blocker.args == ["finished"] and finished_at
    assert finished_at[0][0] - started[0] > 0.5
    block, wall_gap, ticks = heartbeat.longest_block(started, finished_at[0])
    assert ticks > 10
    assert block < 0.2, f"GUI thread blocked for {block * 1000:.0f} ms (longest wall gap {wall_gap * 1000:.0f} ms)"


def test_heartbeat_counts_a_worker_that_holds_the_gil(qtbot):
    """The negative control of the two responsiveness tests: a worker thread in one long C call
    that holds the GIL (sorting a list of floats) leaves the GUI thread asleep, and
    :meth:`Heartbeat.longest_block` must count that sleep, load on the machine or not."""
    import random

    rng = random.Random(7)
    values = [rng.random() for _ in range(4_000_000)]
    heartbeat, marks = Heartbeat(), {}
    heartbeat.start()
    qtbot.wait(100)
    marks["start"] = heartbeat.now()
    worker = threading.Thread(target=lambda: (values.sort(), marks.setdefault("sorted", time.perf_counter())))
    sort_started = time.perf_counter()
    worker.start()
    qtbot.waitUntil(lambda: "sorted" in marks, timeout=60_000)
    qtbot.wait(50)
    marks["end"] = heartbeat.now()
    heartbeat.stop()
    worker.join()
    block, wall_gap, ticks = heartbeat.longest_block(marks["start"], marks["end"])
    assert marks["sorted"] - sort_started > 0.4
    assert block > 0.3, f"a GIL-holding sort of {marks['sorted'] - sort_started:.2f} s showed as a {block * 1000:.0f} ms block"


def test_cancel_stops_between_steps_and_writes_nothing(make_window, synthetic_case, qtbot):
    window = make_window(functools.partial(synthetic_register, steps=400, step_seconds=0.02))
    window.open_case_folder(synthetic_case)
    confirm_all(window)
    with qtbot.waitSignal(window.registration_finished, timeout=30_000) as blocker:
        window.start_registration()
        qtbot.waitUntil(lambda: window.register_step.progress.value() > 0, timeout=10_000)
        assert window.register_step.cancel_button.isEnabled()
        qtbot.mouseClick(window.register_step.cancel_button, Qt.MouseButton.LeftButton)
    assert blocker.args == ["cancelled"]
    assert window.session.result is None and window.register_step.worker is None
    assert window.register_step.progress_message.text() == "Cancelled"
    assert not [p for p in window.session.work_dir.iterdir() if p.name.startswith("run-")]
    assert window.register_step.register_button.isEnabled()


def test_pipeline_error_shows_its_one_line_message(make_window, synthetic_case, qtbot):
    window = make_window(failing_register)
    window.open_case_folder(synthetic_case)
    confirm_all(window)
    assert register(qtbot, window) == "errored"
    message = "the registration produced an empty femur; check the masks and calibration"
    assert window.errors[-1] == message
    assert window.last_error_box.text() == message and window.last_error_box.isVisible()
    assert window.session.result is None


def test_a_crashing_registration_process_is_reported_and_the_window_survives(make_window, synthetic_case, qtbot):
    window = make_window(crashing_register)
    window.open_case_folder(synthetic_case)
    confirm_all(window)
    assert register(qtbot, window) == "errored"
    assert "registration process stopped unexpectedly (signal 11)" in window.errors[-1]
    assert not [p for p in window.session.work_dir.iterdir() if p.name.startswith("run-")]
    window.session.register_fn = synthetic_register
    assert register(qtbot, window) == "finished"


def test_bad_inputs_never_crash(make_window, tmp_path):
    window = make_window()
    assert not window.open_case_folder(tmp_path / "missing")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "case.json").write_text("{ this is not json")
    assert not window.open_case_folder(broken)
    bad_project = tmp_path / "x.hipatlas"
    bad_project.write_bytes(b"PK\x03\x04 truncated")
    assert not window.load_step.open_project(bad_project)
    assert len(window.errors) == 3 and all("Unexpected" not in e for e in window.errors)
    assert not window.session.has_case


def _drag(qtbot, view, points_uv):
    viewport = view.viewport()
    positions = [view.mapFromScene(QPointF(u, v)) for u, v in points_uv]
    qtbot.mousePress(viewport, Qt.MouseButton.LeftButton, pos=positions[0])
    for position in positions[1:]:
        qtbot.mouseMove(viewport, position)
    qtbot.mouseRelease(viewport, Qt.MouseButton.LeftButton, pos=positions[-1])


def test_mask_editing_with_the_mouse_and_undo(make_window, synthetic_case, qtbot):
    window = make_window()
    window.open_case_folder(synthetic_case)
    confirm_all(window)
    session, view = window.session, window.radiograph_panels[0].view
    original = session.views[0].mask.copy()
    window.masks_step.set_tool("brush")
    window.masks_step.brush_size.setValue(3)
    _drag(qtbot, view, [(5.0, 80.0), (12.0, 80.0), (20.0, 80.0)])
    painted = session.views[0].mask
    assert painted[80, 5:21].all() and not original[80, 5:21].any()
    assert not session.views[0].confirmed and not window.register_step.register_button.isEnabled()
    assert window.masks_step.stack.count() == 1  # the whole drag is one undo step
    window.masks_step.stack.undo()
    assert np.array_equal(session.views[0].mask, original)
    window.masks_step.stack.redo()
    assert session.views[0].mask[80, 5:21].all()
    # eraser, then a polygon (clicks + double click) in the other view
    window.masks_step.set_tool("eraser")
    _drag(qtbot, view, [(12.0, 80.0), (12.0, 80.0)])
    assert not session.views[0].mask[80, 11:14].any()
    window.masks_step.set_tool("polygon")
    other = window.radiograph_panels[1].view
    corners = [(80.0, 5.0), (100.0, 5.0), (100.0, 20.0), (80.0, 20.0)]
    for u, v in corners:
        qtbot.mouseClick(other.viewport(), Qt.MouseButton.LeftButton, pos=other.mapFromScene(QPointF(u, v)))
    qtbot.mouseDClick(other.viewport(), Qt.MouseButton.LeftButton, pos=other.mapFromScene(QPointF(80.0, 20.0)))
    assert session.views[1].mask[6:19, 81:99].all()
    assert [stack.count() for stack in window.masks_step.stacks] == [2, 1]   # one history per view
    window.masks_step.stack.undo()                                            # the view edited last
    assert not session.views[1].mask[6:19, 81:99].any()
    # the displayed mask layer follows the session's mask
    layer = view.mask_layer_image()
    assert layer.pixelColor(8, 80).alpha() > 0 and layer.pixelColor(12, 80).alpha() == 0


def test_export_project_round_trip_and_recent_files(make_window, synthetic_case, qtbot, tmp_path):
    window = make_window()
    window.open_case_folder(synthetic_case)
    confirm_all(window)
    assert register(qtbot, window) == "finished"
    written = window.export_step.export_to(tmp_path / "export")
    pdf = written["pdf_report"].read_bytes()
    assert pdf.startswith(b"%PDF") and pdf.count(b"/Subtype /Image") >= 3   # 3D, 2 annotated radiographs
    assert json.loads(written["measurements_json"].read_text())["head_radius_mm"] == FEMUR.head_radius_mm
    assert window.export_step._save_to(tmp_path / "plan.hipatlas")
    assert window.settings.recent_files[0] == str((tmp_path / "plan.hipatlas").resolve())

    second = make_window()
    assert second.load_step.open_project(tmp_path / "plan.hipatlas")
    assert second.current_step() == "Review"
    assert second.session.measurements == window.session.measurements
    assert second.surface_view.has_surface() and all(v.confirmed for v in second.session.views)
    assert "plan.hipatlas" in second.windowTitle()


def test_autosave_and_recovery(make_window, synthetic_case, gui_settings, tmp_path):
    window = make_window()
    window.open_case_folder(synthetic_case)
    window.set_mask_confirmed(0, True)
    assert window.autosave.autosave()
    assert window.autosave.store.project_file.is_file()
    # pretend the process died: the record now names a pid that is not running
    meta = json.loads(window.autosave.store.meta_file.read_text())
    meta["pid"] = 2 ** 22 + 12345
    dead_meta = window.autosave.store.folder / f"autosave-{meta['pid']}.json"
    dead_meta.write_text(json.dumps(meta))
    window.autosave.store.project_file.rename(dead_meta.with_suffix(".hipatlas"))
    window.autosave.store.meta_file.unlink()
    other = make_window()
    orphans = other.autosave.store.orphans()
    assert len(orphans) == 1
    assert other.autosave.recover(orphans[0])
    assert other.session.views[0].confirmed and not other.session.views[1].confirmed
    assert other.session.dirty and other.windowTitle().startswith("*")


def test_exception_hooks_route_to_the_error_dialog(make_window, qtbot):
    from app.main import ExceptionHooks

    window = make_window()
    hooks = ExceptionHooks(window.report_error).install()
    try:
        with qtbot.waitSignal(window.error_reported, timeout=5000) as blocker:
            sys.excepthook(ValueError, ValueError("boom in a slot"), None)
        assert blocker.args[0] == "Unexpected error: ValueError: boom in a slot"

        def crash():
            raise RuntimeError("boom in a thread")

        with qtbot.waitSignal(window.error_reported, timeout=5000) as blocker:
            thread = threading.Thread(target=crash)
            thread.start()
            thread.join()
        assert blocker.args[0] == "Unexpected error: RuntimeError: boom in a thread"
        assert "RuntimeError" in window.last_error_box.detailedText()
    finally:
        hooks.uninstall()
    assert sys.excepthook != hooks._sys_hook


def test_settings_model_path_reaches_the_pipeline_and_about(make_window, synthetic_case, qtbot, gui_settings):
    gui_settings.model_path = "/models/custom.keras"
    window = make_window()
    window.open_case_folder(synthetic_case)
    confirm_all(window)
    assert "custom.keras" in window.register_step.model_label.text()
    assert register(qtbot, window) == "finished"
    assert window.session.result.report["model"]["path"] == "/models/custom.keras"
    from inference import __version__

    assert window.about_text().startswith(f"HipAtlas {__version__}")
    assert window.actions["register"].shortcut().toString() == "Ctrl+R"
    assert window.banner.isVisible() and "Research use only" in window.banner.text()


def test_close_joins_the_worker_and_releases_vtk(qtbot, gui_settings, tmp_path):
    from app.main_window import MainWindow
    from app.session import Session

    before = _vtk_objects()
    case = write_synthetic_case(tmp_path / "case")
    window = MainWindow(gui_settings, Session(work_root=tmp_path, register_fn=synthetic_register), interactive=False)
    window.show()
    qtbot.waitExposed(window)
    window.open_case_folder(case)
    confirm_all(window)
    assert register(qtbot, window) == "finished"
    # close while a second registration runs: the worker is cancelled and joined first
    window.session.register_fn = functools.partial(synthetic_register, steps=500, step_seconds=0.02)
    assert window.start_registration()
    worker, bar = window.register_step.worker, window.register_step.progress
    qtbot.waitUntil(lambda: bar.value() > 0, timeout=10_000)
    work_dir = window.session.work_dir
    window.close()
    assert worker.isFinished() and window.register_step.worker is None
    assert window.surface_view._closed and not work_dir.exists()
    window.deleteLater()
    del window, worker
    QApplication.processEvents()
    leaked = _vtk_objects() - before
    assert not leaked, f"{len(leaked)} VTK objects survived the window"


def test_moving_a_landmark_updates_table_3d_and_radiographs(make_window, synthetic_case, qtbot):
    window = make_window()
    window.open_case_folder(synthetic_case)
    confirm_all(window)
    assert register(qtbot, window) == "finished"
    window.go_to_step("Measure")
    spins = window.measure_step.landmark_spins["head_centre"]
    assert [s.value() for s in spins] == pytest.approx(list(FEMUR.head_centre_mm))
    assert not window.measure_step.reset_landmarks_button.isEnabled()
    spins[0].setValue(FEMUR.head_centre_mm[0] + 5.0)   # as if typed (keyboard tracking is off)
    table = {window.measure_step.measure_table.item(r, 0).text(): window.measure_step.measure_table.item(r, 1).text()
             for r in range(window.measure_step.measure_table.rowCount())}
    assert table["Femoral offset"].startswith("40.0 \u00b1 ")
    assert window.measure_step.reset_landmarks_button.isEnabled()
    sphere_centre = window.surface_view.plotter.actors["head_sphere"].GetCenter()
    assert sphere_centre[0] == pytest.approx(FEMUR.head_centre_mm[0] + 5.0, abs=0.3)
    qtbot.mouseClick(window.measure_step.reset_landmarks_button, Qt.MouseButton.LeftButton)
    assert window.session.measurements["femoral_offset_mm"] == pytest.approx(FEMUR.femoral_offset_mm)
    assert spins[0].value() == pytest.approx(FEMUR.head_centre_mm[0])


def _table(window) -> dict[str, str]:
    return {window.measure_step.measure_table.item(r, 0).text(): window.measure_step.measure_table.item(r, 1).text()
            for r in range(window.measure_step.measure_table.rowCount())}


def test_a_hundredth_mm_landmark_move_changes_the_measurements_by_a_hundredth(make_window, synthetic_case, qtbot):
    """Issue 15 finding 1: moving the lesser trochanter by 0.01 mm changed the vertical offset from
    59.3 to 56.9 mm, because the values after registration and those recomputed from the
    landmarks came from different points. One measurement path: unchanged landmarks give the
    shown values again, and a 0.01 mm move changes the vertical offset by 0.01 mm, nothing else."""
    window = make_window(register_fn=pipeline_like_register)
    window.open_case_folder(synthetic_case)
    confirm_all(window)
    assert register(qtbot, window) == "finished"
    window.go_to_step("Measure")
    before = dict(window.session.measurements)
    shown = _table(window)
    assert shown["Vertical offset"].startswith(f"{FEMUR.head_centre_mm[2] - FEMUR.lesser_trochanter_z_mm:.1f} \u00b1 ")
    # recomputing from the unchanged landmarks (as typed back in) gives identical values
    spins = window.measure_step.landmark_spins["lesser_trochanter"]
    spins[0].setValue(spins[0].value() + 1.0)
    spins[0].setValue(spins[0].value() - 1.0)
    assert window.session.measurements == before and _table(window) == shown
    # a 0.01 mm move of the lesser trochanter (typed: keyboard tracking is off)
    spins[2].setValue(spins[2].value() + 0.01)
    after = window.session.measurements
    assert after["vertical_offset_mm"] == pytest.approx(before["vertical_offset_mm"] - 0.01, abs=1e-6)
    for key in ("femoral_offset_mm", "neck_shaft_angle_deg", "head_radius_mm", "hip_centre_mm"):
        assert after[key] == before[key], key
    assert _table(window)["Femoral offset"] == shown["Femoral offset"]
    # the synthetic femur's shaft stretch is short: the offset is marked and the tooltip says why
    assert shown["Femoral offset"].endswith("(!)") and "lesser trochanter" in window.measure_step.measure_table.item(0, 1).toolTip()


def test_dragging_a_3d_landmark_handle_moves_the_landmark(make_window, synthetic_case, qtbot):
    window = make_window()
    window.open_case_folder(synthetic_case)
    confirm_all(window)
    assert register(qtbot, window) == "finished"
    window.go_to_step("Measure")
    window.measure_step.drag_landmarks.setChecked(True)
    handles = window.surface_view.handle_widgets()
    names = list(window.session.landmarks_mm)
    assert len(handles) == len(names)
    head = handles[names.index("head_centre")]
    assert head.GetCenter() == pytest.approx(FEMUR.head_centre_mm)
    # what VTK does at the end of a drag: the widget has a new centre and fires its end event
    head.SetCenter(FEMUR.head_centre_mm[0] + 5.0, FEMUR.head_centre_mm[1], FEMUR.head_centre_mm[2])
    head.InvokeEvent("EndInteractionEvent")
    qtbot.waitUntil(lambda: window.session.landmarks_edited, timeout=5000)
    assert window.session.measurements["femoral_offset_mm"] == pytest.approx(40.0)
    assert window.measure_step.landmark_spins["head_centre"][0].value() == pytest.approx(FEMUR.head_centre_mm[0] + 5.0)
    # the handles were rebuilt at the new positions
    names = list(window.session.landmarks_mm)
    moved = window.surface_view.handle_widgets()[names.index("head_centre")]
    assert moved.GetCenter()[0] == pytest.approx(FEMUR.head_centre_mm[0] + 5.0)
    window.measure_step.drag_landmarks.setChecked(False)
    assert window.surface_view.handle_widgets() == []


def test_import_dialog_and_dicom_calibration_in_the_load_step(make_window, tmp_path):
    from app.steps.load import ImportDialog
    from gui_helpers import write_dicom

    rng = np.random.default_rng(3)
    files = [write_dicom(tmp_path / f"img{i}.dcm", 900 + rng.normal(0, 20, (64, 80)), primary_deg=a)
             for i, a in enumerate((0.0, 90.0))]
    window = make_window()
    dialog = ImportDialog(window)
    for (name, image, calibration), path, label in zip(dialog.rows, files, ("AP", "LAT")):
        name.setText(label)
        image.setText(str(path))
    dialog.side.setCurrentText("left")
    imports = dialog.imports()
    assert [i.calibration_path for i in imports] == [None, None]
    assert window.load_step.import_radiographs(imports, dialog.side.currentText())
    assert window.session.case.side == "left"
    assert [window.load_step.case_table.item(r, 3).text() for r in range(2)] == ["DICOM tags", "DICOM tags"]
    assert "DistanceSourceToDetector" in window.load_step.case_table.item(0, 3).toolTip()
    assert "dicom-tags" in window.radiograph_panels[1].details.text()
    assert "90\u00b0 apart" in window.load_step.pair_label.text()
    # a PNG without calibration is refused with an actionable message, the open case stays
    png = tmp_path / "plain.png"
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(png)
    from app.session import RadiographImport

    assert not window.load_step.import_radiographs([RadiographImport("A", png), RadiographImport("B", png)], "right")
    assert "choose a calibration JSON" in window.errors[-1]
    assert window.session.case.side == "left"


def test_settings_dialog_applies_units_and_autosave(make_window, gui_settings, monkeypatch):
    from app.dialogs import SettingsDialog
    from inference.backends import BACKEND_ENV
    from inference.ensemble import ENV_VAR as ENSEMBLE_ENV

    monkeypatch.setenv(BACKEND_ENV, "auto")  # restored afterwards: apply() sets it
    monkeypatch.setenv(ENSEMBLE_ENV, "off")  # the tests' default (tests/conftest.py), restored afterwards
    window = make_window()
    dialog = SettingsDialog(gui_settings, window)
    assert not dialog.ensemble.isChecked()  # unset: the environment's default
    dialog.units.setCurrentText("cm")
    dialog.autosave.setValue(5)
    dialog.model.setText("/opt/models/m.keras")
    dialog.backend.setCurrentText("onnx")
    dialog.ensemble.setChecked(True)
    dialog.apply()
    assert (gui_settings.units, gui_settings.autosave_minutes, gui_settings.model_path) == ("cm", 5.0, "/opt/models/m.keras")
    assert gui_settings.backend == "onnx" and os.environ[BACKEND_ENV] == "onnx"
    assert gui_settings.ensemble is True and os.environ[ENSEMBLE_ENV] == "on"
    assert SettingsDialog(gui_settings, window).ensemble.isChecked()
    window.autosave.restart()
    assert window.autosave.timer.isActive() and window.autosave.timer.interval() == 300_000


def test_settings_dialog_offers_no_tensorflow_backend_without_tensorflow(make_window, gui_settings, monkeypatch):
    from app import dialogs
    from inference import backends

    window = make_window()
    offered = [dialogs.SettingsDialog(gui_settings, window).backend.itemText(i) for i in range(3)]
    assert offered == ["auto", "tf", "onnx"]
    monkeypatch.setattr(backends, "tensorflow_available", lambda: False)
    dialog = dialogs.SettingsDialog(gui_settings, window)
    assert [dialog.backend.itemText(i) for i in range(dialog.backend.count())] == ["auto", "onnx"]
    assert "TensorFlow is not installed" in dialog.backend.toolTip()


def test_atlas_mask_proposal_fills_missing_masks(make_window, gui_settings, tmp_path, qtbot):
    from gui_helpers import synthetic_masks, synthetic_propose
    from inference import io

    gui_settings.auto_propose = True
    case = write_synthetic_case(tmp_path / "no_masks", with_masks=False)
    window = make_window(propose_fn=functools.partial(synthetic_propose, step_seconds=0.3))
    with qtbot.waitSignal(window.proposal_finished, timeout=60_000) as blocker:
        assert window.open_case_folder(case)
        assert [v.mask_source for v in window.session.views] == ["missing"] * 2
        assert window.masks_step.proposal_worker is not None and window.masks_step.proposal_progress.isVisible()
        # meanwhile the user draws LAT and confirms it; registration waits for the proposal
        window.session.fill_polygon(1, np.array([[40.0, 20.0], [70.0, 20.0], [70.0, 80.0], [40.0, 80.0]]), True)
        drawn = window.session.views[1].mask.copy()
        window.set_mask_confirmed(1, True)
        assert "mask proposal" in window.register_step.register_blocker.text() or not window.register_step.register_button.isEnabled()
    assert blocker.args == ["finished"]
    truth = synthetic_masks(io.load_case(case))
    assert window.session.views[0].mask_source == "proposed"
    assert np.array_equal(window.session.views[0].mask, truth[0])
    assert np.array_equal(window.session.views[1].mask, drawn)          # drawn by the user: kept
    assert window.session.views[1].confirmed and not window.session.views[0].confirmed
    window.masks_step.stack.undo()                                            # one step undoes the proposal
    assert not window.session.views[0].mask.any()
    window.masks_step.stack.redo()
    window.set_mask_confirmed(0, True)
    with qtbot.waitSignal(window.proposal_finished, timeout=60_000):     # registration waits for it
        assert window.masks_step.start_mask_proposal([0])
        assert not window.register_step.register_button.isEnabled() and "mask proposal" in window.register_step.register_blocker.text()
    # Propose on demand for a single view (the button), then stop one midway
    with qtbot.waitSignal(window.proposal_finished, timeout=60_000):
        window.masks_step.propose_buttons[0].click()
    assert np.array_equal(window.session.views[0].mask, truth[0])
    window.session.propose_fn = functools.partial(synthetic_propose, steps=200, step_seconds=0.05)
    with qtbot.waitSignal(window.proposal_finished, timeout=60_000) as blocker:
        assert window.masks_step.start_mask_proposal([0])
        qtbot.waitUntil(lambda: window.masks_step.proposal_progress.value() > 0, timeout=20_000)
        window.masks_step.proposal_cancel.click()
    assert blocker.args == ["cancelled"] and window.masks_step.proposal_worker is None


def test_help_opens_the_user_guide_with_its_pictures(make_window, monkeypatch):
    """Help > User guide opens docs/user-guide.md, whose pictures and links exist."""
    import re

    from PySide6.QtGui import QDesktopServices

    opened = []
    monkeypatch.setattr(QDesktopServices, "openUrl", lambda url: opened.append(url.toLocalFile()) or True)
    window = make_window()
    window.actions["user_guide"].trigger()
    assert len(opened) == 1 and opened[0].endswith("docs/user-guide.md")
    guide = pathlib.Path(opened[0])
    text = guide.read_text(encoding="utf-8")
    for step in ("Load", "Masks", "Register", "Review", "Measure", "Template", "Export"):
        assert re.search(rf"^## \d\. {step}", text, re.M), step
    targets = re.findall(r"\]\(([^)#\s]+)\)", text)
    assert sum(t.endswith(".png") for t in targets) >= 4
    assert all((guide.parent / t).is_file() for t in targets), targets


def test_garbage_made_in_a_worker_thread_is_collected_on_the_gui_thread(make_window, qtbot):
    """Cyclic garbage is collected only by the GUI thread's timer (app.workers): a worker thread
    that allocates far past the collector's thresholds must not run the destructors of garbage
    (in the application: Qt and VTK objects of an earlier window) in its own thread."""
    from app import workers

    make_window()
    assert workers._COLLECTOR is not None and not gc.isenabled()
    collected_in: list[str] = []

    class Cycle:
        def __init__(self):
            self.me = self

        def __del__(self):
            collected_in.append(threading.current_thread().name)

    def work():
        for _ in range(50):
            Cycle()  # unreachable at once, but a cycle: only the cyclic collector frees it
            [(i, [i]) for i in range(2_000)]  # container allocations: what triggers a collection

    worker = threading.Thread(target=work, name="allocating-worker")
    worker.start()
    worker.join()
    qtbot.waitUntil(lambda: len(collected_in) == 50, timeout=10_000)
    assert set(collected_in) == {threading.main_thread().name}


def test_the_gui_thread_collector_keeps_cpythons_rule_for_full_collections(qapp, monkeypatch):
    """A full collection (0.2 s for the workstation's objects) only once the oldest generation has
    grown by a quarter since the last one, as CPython decides; younger generations by their counts."""
    from app import workers

    collector = workers.collect_garbage_on_the_gui_thread()
    collector.long_lived_total = 1_000
    state = {"counts": (0, 0, 11), "old": 1_100}
    monkeypatch.setattr(workers.gc, "get_count", lambda: state["counts"])
    monkeypatch.setattr(workers.gc, "get_objects", lambda generation=None: range(state["old"]))
    assert collector.due_generation() == -1  # 100 new long-lived objects: under a quarter
    state["counts"] = (0, 11, 11)
    assert collector.due_generation() == 1
    state["counts"] = (701, 0, 0)
    assert collector.due_generation() == 0
    state["counts"], state["old"] = (0, 0, 11), 1_250
    assert collector.due_generation() == 2
    state["counts"] = (0, 0, 10)
    assert collector.due_generation() == -1  # not past its threshold
