"""3D landmark handles drag in the view plane (issue 15, finding 4): a real mouse drag through VTK's
interactor on an oblique camera, checked against the camera's view direction, then undone."""

from __future__ import annotations

import numpy as np
import pytest

from gui_helpers import confirm_all, register


def _display_point(plotter, point_mm) -> tuple[float, float]:
    renderer = plotter.renderer
    renderer.SetWorldPoint(*map(float, point_mm), 1.0)
    renderer.WorldToDisplay()
    x, y, _ = renderer.GetDisplayPoint()
    return x, y


def _drag(qtbot, plotter, start_xy, end_xy, steps: int = 4) -> None:
    """Drag with the left button from ``start_xy`` to ``end_xy`` (VTK display pixels: origin at the
    bottom left) as the user does: Qt mouse events on the 3D widget, which pyvistaqt hands to VTK."""
    from PySide6.QtCore import QPoint, Qt
    from PySide6.QtTest import QTest

    height = plotter.height()
    ratio = plotter.devicePixelRatioF()

    def qt_point(x, y):
        return QPoint(int(round(x / ratio)), int(round(height - 1 - y / ratio)))

    QTest.mouseMove(plotter, qt_point(*start_xy))
    QTest.mousePress(plotter, Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier, qt_point(*start_xy))
    for step in range(1, steps + 1):
        x = start_xy[0] + (end_xy[0] - start_xy[0]) * step / steps
        y = start_xy[1] + (end_xy[1] - start_xy[1]) * step / steps
        QTest.mouseMove(plotter, qt_point(x, y))
    QTest.mouseRelease(plotter, Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier, qt_point(*end_xy))


@pytest.mark.parametrize("azimuth_deg, elevation_deg", [(35.0, 25.0), (-60.0, -15.0)])
def test_a_dragged_3d_handle_moves_in_the_view_plane_and_undo_restores_it(make_window, synthetic_case, qtbot,
                                                                          azimuth_deg, elevation_deg):
    window = make_window()
    window.open_case_folder(synthetic_case)
    confirm_all(window)
    assert register(qtbot, window) == "finished"
    window.go_to_step("Measure")
    view = window.surface_view
    view.set_see_through(True)
    window.measure_step.drag_landmarks.setChecked(True)
    plotter = view.plotter
    # An oblique camera (perspective, as the window has it) looking at the head.
    name = "head_centre"
    start = np.array(window.session.landmarks_mm[name], dtype=float)
    camera = plotter.camera
    camera.SetFocalPoint(*start)
    camera.Azimuth(azimuth_deg)
    camera.Elevation(elevation_deg)
    camera.OrthogonalizeViewUp()
    plotter.renderer.ResetCameraClippingRange()
    plotter.render()
    direction = np.array(camera.GetDirectionOfProjection())
    assert abs(direction @ [0.0, 1.0, 0.0]) < 0.95  # not the anterior view the window starts with

    x, y = _display_point(plotter, start)
    _drag(qtbot, plotter, (x, y), (x + 40, y + 25))
    qtbot.waitUntil(lambda: window.session.landmarks_edited, timeout=5000)
    moved = np.array(window.session.landmarks_mm[name], dtype=float)
    displacement = moved - start
    assert np.linalg.norm(displacement) > 2.0  # it moved (40 x 25 pixels at the head)
    # ... in the plane through the handle perpendicular to the view direction
    assert abs(displacement @ direction) < 1e-6 * max(1.0, np.linalg.norm(displacement))
    # and the handle followed the mouse: the landmark now projects where the button was released
    np.testing.assert_allclose(_display_point(plotter, moved), (x + 40, y + 25), atol=1.5)
    # the handle was rebuilt at the new position
    names = list(window.session.landmarks_mm)
    np.testing.assert_allclose(view.handle_widgets()[names.index(name)].GetCenter(), moved, atol=1e-9)

    window.undo_group.undo()
    np.testing.assert_allclose(window.session.landmarks_mm[name], start, atol=1e-9)
    assert not window.session.landmarks_edited
    np.testing.assert_allclose(view.handle_widgets()[names.index(name)].GetCenter(), start, atol=1e-9)
