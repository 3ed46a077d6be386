"""The Template panel driven like a surgeon would: plan, change size / head, undo, save, reload."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from gui_helpers import synthetic_register, write_synthetic_case
from inference import geometry, pipeline
from inference.templating.editor import CHANGE_ROWS


@pytest.fixture
def registered_session(tmp_path):
    from app.session import Session

    session = Session(work_root=tmp_path, register_fn=synthetic_register, isolate=False)
    session.open_case(write_synthetic_case(tmp_path / "case"))
    for index in range(len(session.views)):
        session.set_confirmed(index, True)
    session.set_result(pipeline.run_to_completion(session.registration_job()(lambda: False)))
    # The synthetic registration's volume is uniform bone; give it a 3 mm cortex around a canal.
    result = session.result
    depth = ndimage.distance_transform_edt(result.labels > 0, sampling=result.grid.spacing_xyz_mm[::-1])
    result.volume = np.where(result.labels == 0, -100.0, np.where(depth <= 3.0, 1500.0, 20.0)).astype(np.float32)
    yield session
    session.close()


@pytest.fixture
def panel(qtbot, registered_session):
    from app.template_panel import TemplatePanel

    widget = TemplatePanel(registered_session)
    qtbot.addWidget(widget)
    widget.resize(1300, 850)
    widget.show()
    qtbot.waitExposed(widget)
    yield widget
    widget.close_plotter()


def _table(panel) -> dict[str, str]:
    return {panel.table.item(i, 0).text(): panel.table.item(i, 1).text() for i in range(panel.table.rowCount())}


def _choose(combo, value) -> None:
    index = combo.findData(value)
    combo.setCurrentIndex(index)
    combo.activated.emit(index)


def test_template_panel_plans_edits_undoes_and_saves(qtbot, panel, registered_session, tmp_path):
    from PySide6.QtCore import Qt

    from app import project
    from app.template_panel import TemplatePanel

    session = registered_session
    assert panel.load()
    editor = panel.editor
    assert panel.table.rowCount() == len(CHANGE_ROWS)
    assert _table(panel)["Offset change"] == f"{editor.changes['offset_change_mm']:+.1f} mm"
    assert session.template_plan == editor.plan.to_dict()

    # Larger stem: re-seated so the leg length at the femur stays as it was.
    first = editor.plan
    ll_before = editor.changes["leg_length_change_mm"]
    qtbot.mouseClick(panel.size_up, Qt.MouseButton.LeftButton)
    assert int(editor.plan.stem_size) == int(first.stem_size) + 1
    assert editor.changes["leg_length_change_mm"] == pytest.approx(ll_before, abs=1e-9)
    assert _table(panel)["Offset change"] == f"{editor.changes['offset_change_mm']:+.1f} mm"

    # +7 mm head: the offset grows by (7 - old) sin(neck-shaft angle), shown in the table at once.
    before = editor.changes["offset_change_mm"]
    old_head = editor.plan.head_offset_mm
    _choose(panel.head_offset, 7.0)
    angle = math.radians(panel.library.stem().variant(editor.plan.stem_variant).neck_shaft_angle_deg)
    assert editor.changes["offset_change_mm"] - before == pytest.approx((7.0 - old_head) * math.sin(angle), abs=1e-6)
    assert _table(panel)["Offset change"] == f"{editor.changes['offset_change_mm']:+.1f} mm"

    # Outlines: the head's outline on each radiograph is centred where P puts the head centre.
    for index, view in enumerate(session.case.views):
        paths = panel.outline_paths(index)
        assert len(paths) >= 3
        centre_uv = geometry.project_points(view.P, editor.placed.head_centre_mm)
        head_boxes = [p.boundingRect() for p in paths]
        assert min(math.hypot(b.center().x() - centre_uv[0], b.center().y() - centre_uv[1]) for b in head_boxes) < 0.5

    # Undo twice -> the first plan; redo once -> the larger stem.
    qtbot.mouseClick(panel.undo_button, Qt.MouseButton.LeftButton)
    qtbot.mouseClick(panel.undo_button, Qt.MouseButton.LeftButton)
    assert editor.plan == first and not panel.undo_button.isEnabled()
    qtbot.mouseClick(panel.redo_button, Qt.MouseButton.LeftButton)
    assert int(editor.plan.stem_size) == int(first.stem_size) + 1
    assert panel.stem_size.currentData() == editor.plan.stem_size

    # Cup moved 2 mm up: the hip's leg length shortens by 2 mm.
    hip_ll = editor.changes["hip_leg_length_change_mm"]
    panel.cup_shift["superior"].setValue(2.0)
    assert editor.changes["hip_leg_length_change_mm"] == pytest.approx(hip_ll - 2.0, abs=1e-9)

    # Drag handles: the head handle 4 mm up the shaft axis seats the stem 4 mm higher (leg +4 mm);
    # the cup handle moves the cup centre.
    ll = editor.changes["leg_length_change_mm"]
    handle = panel._handle_points["head"]
    panel._handle_released(handle + 4.0 * editor.native.shaft_direction + [0.0, 1.5, 0.0], panel.HANDLES.index("head"))
    qtbot.waitUntil(lambda: abs(editor.changes["leg_length_change_mm"] - (ll + 4.0)) < 1e-6, timeout=5000)
    cup = np.asarray(editor.plan.cup_centre_mm)
    panel._handle_released(panel._handle_points["cup"] + [1.0, 0.0, -2.0], panel.HANDLES.index("cup"))
    qtbot.waitUntil(lambda: np.allclose(editor.plan.cup_centre_mm, cup + [1.0, 0.0, -2.0]), timeout=5000)
    qtbot.mouseClick(panel.undo_button, Qt.MouseButton.LeftButton)
    assert np.allclose(editor.plan.cup_centre_mm, cup)

    # The 3D view shows something; the report's plan (placed again from the saved plan, off-screen)
    # has the table's rows, and the window's undo stack holds the edits.
    rgb = panel.render_image()
    assert rgb.std() > 5
    from app.plan_report import session_plan
    from inference.templating.editor import change_rows
    from inference.templating.plan import plan_changes

    native, placed = session_plan(session, panel.library)
    assert placed.plan == editor.plan
    assert dict(change_rows(plan_changes(native, placed))) == _table(panel)
    assert panel.stack.canUndo() and panel.stack.undoText().startswith("Edit the plan")

    # Saved in the project file, and a new panel on the reloaded project shows the same plan.
    saved = project.save_project(session, tmp_path / "plan.hipatlas")
    reloaded = project.load_project(saved, work_root=tmp_path, isolate=False)
    try:
        assert reloaded.template_plan == editor.plan.to_dict()
        again = TemplatePanel(reloaded, library=panel.library)
        qtbot.addWidget(again)
        assert again.load()
        assert again.editor.plan == editor.plan
        assert again.editor.changes["offset_change_mm"] == pytest.approx(editor.changes["offset_change_mm"])
        again.close_plotter()
    finally:
        reloaded.close()


def test_template_panel_waits_for_a_registration(qtbot, tmp_path):
    from app.session import Session
    from app.template_panel import TemplatePanel

    session = Session(work_root=tmp_path, isolate=False)
    widget = TemplatePanel(session)
    qtbot.addWidget(widget)
    try:
        assert not widget.load()
        assert not widget.stem_size.isEnabled() and "Register" in widget.status.text()
    finally:
        widget.close_plotter()
        session.close()


def _mark(window, name: str) -> str:
    from app.steps import STEPS

    return window.steps.item(STEPS.index(name)).text().split()[0]


def test_main_window_template_step_plans_undoes_and_goes_out_of_date(make_window, synthetic_case, qtbot):
    from gui_helpers import confirm_all, register

    window = make_window()
    window.open_case_folder(synthetic_case)
    confirm_all(window)
    register(qtbot, window)
    panel = window.template_panel
    assert panel.editor is None  # not planned until the step is shown
    assert list(window.step_panels).index("Template") == list(window.step_panels).index("Measure") + 1
    window.actions["step_template"].trigger()            # Workflow > 6. Template (Ctrl+6)
    assert window.current_step() == "Template" and window.viewers.currentWidget() is panel
    assert panel.controls.isVisible() and window.template_step.isAncestorOf(panel.controls)
    qtbot.waitUntil(lambda: panel.editor is not None, timeout=10_000)
    assert window.session.template_plan == panel.editor.plan.to_dict()
    assert _mark(window, "Template") == "\u2713"
    # the synthetic registration's volume is uniform bone: no canal, and the plan says so
    assert any("canal" in w for w in panel.editor.changes["warnings"])
    # the headless command's plan of the same registration output gives the same numbers
    from inference.templating.plan import plan_case_out, plan_changes

    native, placed = plan_case_out(window.session.result.out_dir)
    assert placed.plan == panel.editor.plan
    assert plan_changes(native, placed) == panel.editor.changes

    # Edit > Undo undoes a plan edit while the Template step is shown.
    first = panel.editor.plan
    panel.size_up.click()
    assert panel.editor.plan != first and window.actions["undo"].isEnabled()
    window.actions["undo"].trigger()
    assert panel.editor.plan == first and window.session.template_plan == first.to_dict()

    # A landmark moved in Measure: Template is out of date until shown again, then recomputed.
    window.go_to_step("Measure")
    landmarks = window.session.landmarks_mm
    name = "lesser_trochanter" if "lesser_trochanter" in landmarks else next(iter(landmarks))
    moved = [v + d for v, d in zip(window.session.landmarks_mm[name], (0.0, 0.0, 3.0))]
    window.measure_step.move_landmark(name, moved)
    assert _mark(window, "Template") == "!"
    assert "landmarks moved" in window.steps.item(list(window.step_panels).index("Template")).toolTip()
    window.go_to_step("Template")
    qtbot.waitUntil(lambda: _mark(window, "Template") == "\u2713", timeout=10_000)
    assert "landmarks moved" in panel.status.text()
    assert panel.editor.plan == first                      # the plan stays; its changes follow the landmarks
    from app.plan_report import session_native_hip

    assert panel.editor.changes == plan_changes(session_native_hip(window.session), panel.editor.placed)
