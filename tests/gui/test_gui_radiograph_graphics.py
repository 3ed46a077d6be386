"""Measurement graphics on the radiographs, landmark dragging in 2D with the epipolar line, and
window/level / invert as in PACS viewers (issue 15, findings 4 and 5)."""

from __future__ import annotations

import numpy as np
import pytest
from PySide6.QtCore import QPointF, Qt

from gui_helpers import FEMUR, confirm_all, register

from app.windowing import DisplayLut, drag_window
from inference import geometry

pytestmark = pytest.mark.gui


def _grey(view) -> np.ndarray:
    image = view.displayed_image()
    return np.array([[image.pixelColor(c, r).red() for c in range(image.width())] for r in range(image.height())])


def test_display_lut_windows_like_float_arithmetic():
    rng = np.random.default_rng(5)
    pixels = rng.normal(1000.0, 300.0, (40, 50)).astype(np.float32)
    lut = DisplayLut(pixels)
    centre, width = 1100.0, 400.0
    expected = np.clip((pixels - (centre - width / 2)) * 255.0 / width, 0, 255)
    assert np.abs(lut.render(centre, width).astype(float) - expected).max() <= 1.5  # 12-bit quantisation
    assert np.array_equal(lut.render(centre, width, inverted=True), 255 - lut.render(centre, width))
    low, high = np.percentile(pixels, [0.0, 100.0])
    assert lut.preset("Full range") == pytest.approx((0.5 * (low + high), high - low))
    assert drag_window(centre, width, 60.0, -30.0, 600.0) == pytest.approx((centre - 30.0, width + 60.0))


def test_right_drag_changes_window_and_invert_flips(make_window, synthetic_case, qtbot):
    window = make_window()
    window.open_case_folder(synthetic_case)
    panel = window.radiograph_panels[0]
    view = panel.view
    centre, width = view.window_level()
    before = _grey(view)
    viewport = view.viewport()
    start = viewport.rect().center()
    qtbot.mousePress(viewport, Qt.MouseButton.RightButton, pos=start)
    qtbot.mouseMove(viewport, start + type(start)(120, 0))
    qtbot.mouseRelease(viewport, Qt.MouseButton.RightButton, pos=start + type(start)(120, 0))
    new_centre, new_width = view.window_level()
    assert new_width > width and new_centre == pytest.approx(centre)
    wider = _grey(view)
    assert wider.std() < before.std()  # a wider window: less contrast
    qtbot.mousePress(viewport, Qt.MouseButton.RightButton, pos=start)
    qtbot.mouseMove(viewport, start + type(start)(0, 80))
    qtbot.mouseRelease(viewport, Qt.MouseButton.RightButton, pos=start + type(start)(0, 80))
    assert view.window_level()[0] > new_centre and _grey(view).mean() < wider.mean()  # higher level: darker
    panel.invert.setChecked(True)
    assert np.array_equal(_grey(view), 255 - view._lut.render(*view.window_level()))
    panel.window_preset.setCurrentText("Full range")
    panel.window_preset.activated.emit(panel.window_preset.currentIndex())
    assert view.window_level() == pytest.approx(view._lut.preset("Full range"))
    # the mask editor's view was not panned or edited by the right button
    assert not any(stack.count() for stack in window.masks_step.stacks)


def _registered_window(make_window, case, qtbot, tab: int):
    window = make_window()
    window.open_case_folder(case)
    confirm_all(window)
    assert register(qtbot, window) == "finished"
    window.viewers.setCurrentIndex(tab)
    return window


def test_measurement_graphics_and_landmark_drag_with_epipolar_line(make_window, synthetic_case, qtbot):
    window = _registered_window(make_window, synthetic_case, qtbot, tab=0)
    session = window.session
    for index, panel in enumerate(window.radiograph_panels):
        kinds = set(panel.view.graphics_kinds())
        assert {"head", "shaft_axis", "neck_axis", "offset", "vertical_offset"} <= kinds
        P = session.case.views[index].P
        for name, (u, v) in panel.view.handle_positions().items():   # handles sit where P projects them
            assert (u, v) == pytest.approx(tuple(geometry.project_points(P, np.array(session.landmarks_mm[name]))),
                                           abs=1e-6)
    view, other = window.radiograph_panels[0].view, window.radiograph_panels[1].view
    name = "lesser_trochanter"
    assert name in view.handle_positions()
    before = np.array(session.landmarks_mm[name])
    offset_before = session.measurements["vertical_offset_mm"]
    u0, v0 = view.handle_positions()[name]
    viewport = view.viewport()
    start = view.mapFromScene(QPointF(u0, v0))
    target = view.mapFromScene(QPointF(u0, v0 - 6.0))
    qtbot.mousePress(viewport, Qt.MouseButton.LeftButton, pos=start)
    qtbot.mouseMove(viewport, view.mapFromScene(QPointF(u0, v0 - 3.0)))
    qtbot.mouseMove(viewport, target)
    assert not other._epipolar_item.path().isEmpty()   # the other view shows the landmark's ray
    qtbot.mouseRelease(viewport, Qt.MouseButton.LeftButton, pos=target)
    qtbot.waitUntil(lambda: session.landmarks_edited, timeout=3000)
    assert other._epipolar_item.path().isEmpty()
    moved = np.array(session.landmarks_mm[name])
    P = session.case.views[0].P
    # the handle moves with the mouse: by the scene distance between press and release
    dropped = QPointF(u0, v0) + view.mapToScene(target) - view.mapToScene(start)
    assert tuple(geometry.project_points(P, moved)) == pytest.approx((dropped.x(), dropped.y()), abs=1e-6)
    normal = geometry.decompose(P)[1][2]
    source = geometry.source_position(P)
    assert (moved - source) @ normal == pytest.approx((before - source) @ normal)  # same depth in this view
    assert session.measurements["vertical_offset_mm"] != pytest.approx(offset_before)
    assert view.handle_positions()[name] == pytest.approx((dropped.x(), dropped.y()), abs=1e-6)
    assert FEMUR.head_radius_mm == session.measurements["head_radius_mm"]
    # the 2D drag is one undoable landmark move (the Measure step's history), redone exactly
    stack = window.measure_step.stack
    assert stack.count() == 1 and stack.undoText().startswith("Move ")
    stack.undo()
    assert np.array(session.landmarks_mm[name]) == pytest.approx(before) and not session.landmarks_edited
    assert session.measurements["vertical_offset_mm"] == pytest.approx(offset_before)
    assert view.handle_positions()[name] == pytest.approx((u0, v0), abs=1e-6)
    stack.redo()
    assert np.array(session.landmarks_mm[name]) == pytest.approx(moved)


def test_scale_bar_follows_the_zoom_and_the_preset_box_ignores_the_wheel(make_window, synthetic_case, qtbot):
    from PySide6.QtCore import QPoint
    from PySide6.QtGui import QWheelEvent
    from PySide6.QtWidgets import QApplication

    window = _registered_window(make_window, synthetic_case, qtbot, tab=0)
    panel = window.radiograph_panels[0]
    view = panel.view
    calibration = window.session.view_graphics(0).calibration
    length, pixels = view.scale_bar_on_screen()
    assert pixels == pytest.approx(length / calibration.mm_per_px_at_hip * view.transform().m11())
    assert pixels <= 0.25 * view.viewport().width()
    view.scale(2.0, 2.0)
    zoomed_length, zoomed_pixels = view.scale_bar_on_screen()
    assert zoomed_pixels / zoomed_length == pytest.approx(2.0 * pixels / length)
    # the bar is drawn: white pixels along its row in the lower left corner
    grab = view.viewport().grab().toImage()
    rows = range(grab.height() - 120, grab.height())
    widest = max(sum(1 for x in range(0, 12 + int(zoomed_pixels) + 4)
                     if grab.pixelColor(x, y).lightness() > 240) for y in rows)
    assert widest >= 0.9 * zoomed_pixels
    # a wheel turn over the unfocused preset box changes nothing
    box = panel.window_preset
    before = (box.currentText(), view.window_level())
    event = QWheelEvent(QPointF(5, 5), QPointF(box.mapToGlobal(QPoint(5, 5))), QPoint(0, 0), QPoint(0, -120),
                        Qt.MouseButton.NoButton, Qt.KeyboardModifier.NoModifier, Qt.ScrollPhase.NoScrollPhase, False)
    QApplication.sendEvent(box, event)
    assert (box.currentText(), view.window_level()) == before


def test_see_through_bone_shows_the_axes_inside_and_landmarks_are_labelled(make_window, synthetic_case, qtbot):
    window = _registered_window(make_window, synthetic_case, qtbot, tab=1)
    surface = window.surface_view
    qtbot.waitUntil(lambda: surface.isVisible(), timeout=3000)
    assert any(name.startswith("landmark_labels") for name in surface.actor_names()), surface.actor_names()
    surface.show_slices.setChecked(False)
    surface.show_landmarks.setChecked(False)
    surface.reset_camera()
    assert surface.surface_opacity() == 1.0

    def shaft_pixels() -> int:
        rgb = surface.render_image().astype(np.int64)
        # the amber shaft axis: red high, blue low (the bone is beige: blue well above 150)
        return int(((rgb[..., 0] > 150) & (rgb[..., 2] < 90) & (rgb[..., 0] - rgb[..., 2] > 120)).sum())

    opaque = shaft_pixels()
    surface.see_through.setChecked(True)
    assert surface.surface_opacity() == pytest.approx(0.35)
    assert shaft_pixels() > opaque + 200   # the axis inside the shaft shows through the bone
    surface.see_through.setChecked(False)
    assert surface.surface_opacity() == 1.0
