"""The 3D view: femur surface, warped atlas as orthogonal slices, measurements as sphere + axes.

One pyvistaqt ``QtInteractor`` inside a widget with a row of toggles. Renders happen only on
request (``auto_update=False``): nothing redraws in the background while a registration runs.
:meth:`SurfaceView.close_plotter` must be called before the widget is destroyed (the main window
does it in ``closeEvent``) so that the render window and every VTK object are released.
"""

from __future__ import annotations

import logging

import numpy as np
from PySide6.QtCore import Signal
from PySide6.QtWidgets import QCheckBox, QHBoxLayout, QPushButton, QVBoxLayout, QWidget

from app import imaging
from inference import graphics

log = logging.getLogger(__name__)

SURFACE_COLOUR = "#E8DCC4"      # bone
HEAD_COLOUR = "#00B8D4"
SHAFT_COLOUR = "#FFB300"
NECK_COLOUR = "#7CB342"
LANDMARK_COLOUR = "#C6FF00"
AXIS_HALF_LENGTH_MM = 70.0
#: Opacity of the bone with "See-through bone" on.
SEE_THROUGH_OPACITY = 0.35


def _faces_for_vtk(faces: np.ndarray) -> np.ndarray:
    """VTK's flat cell array: ``[3, i, j, k, 3, ...]``."""
    faces = np.asarray(faces, dtype=np.int64)
    return np.hstack([np.full((len(faces), 1), 3, dtype=np.int64), faces]).ravel()


def _summary_text(measurements: dict) -> str:
    """The scalar measurements of :data:`inference.measure.MEASUREMENTS` shown in 3D, with their
    uncertainty (``Femoral offset: 26.0 \u00b1 4.0 mm``)."""
    from inference import measure

    uncertainty = measurements.get("uncertainty") or {}
    lines = []
    for m in measure.MEASUREMENTS:
        value = measurements.get(m.key)
        if m.show_in_3d and m.kind == "scalar" and isinstance(value, (int, float)):
            text = measure.format_value(m, value, uncertainty.get(m.key)).replace("+-", "\u00b1")
            lines.append(f"{m.label}: {text}")
    return "\n".join(lines)


def render_window_image(plotter) -> np.ndarray:
    """A pyvistaqt plotter's pixels as ``(rows, cols, 3)`` uint8 (read back from OpenGL)."""
    from vtkmodules.util.numpy_support import vtk_to_numpy
    from vtkmodules.vtkRenderingCore import vtkWindowToImageFilter

    plotter.render()
    window = plotter.ren_win
    window.Render()
    grabber = vtkWindowToImageFilter()
    grabber.SetInput(window)
    grabber.SetInputBufferTypeToRGB()
    grabber.ReadFrontBufferOff()
    grabber.Update()
    output = grabber.GetOutput()
    cols, rows, _ = output.GetDimensions()
    pixels = vtk_to_numpy(output.GetPointData().GetScalars()).reshape(rows, cols, -1)[..., :3]
    # VTK images start at the bottom row.
    return np.ascontiguousarray(pixels[::-1])


class SurfaceView(QWidget):
    """3D view of a registration result (pyvistaqt)."""

    #: A landmark handle was dragged: (landmark name, (3,) new world position in mm).
    landmark_moved = Signal(str, object)

    def __init__(self, parent=None):
        super().__init__(parent)
        from pyvistaqt import QtInteractor

        self.plotter = QtInteractor(self, auto_update=False)
        self.plotter.set_background("#1B1F27", top="#2E3440")
        self.plotter.add_axes(interactive=False, line_width=2, labels_off=False)
        self._closed = False
        self._grid = None           # pyvista ImageData of the warped atlas
        self._actors: dict[str, list] = {"surface": [], "slices": [], "measurements": [], "landmarks": []}
        self._slice_point = None
        self._measurements: dict = {}
        self._landmarks: dict = {}
        self._handles_enabled = False
        self._handle_names: list[str] = []

        self.show_surface = QCheckBox("Surface")
        self.show_slices = QCheckBox("Atlas slices")
        self.show_measurements = QCheckBox("Measurements")
        self.show_landmarks = QCheckBox("Landmarks")
        for box in (self.show_surface, self.show_slices, self.show_measurements, self.show_landmarks):
            box.setChecked(True)
            box.toggled.connect(self._apply_visibility)
        self.see_through = QCheckBox("See-through bone")
        self.see_through.setToolTip("Show the bone half transparent, so the axes, head centre and landmarks "
                                    "inside it stay visible")
        self.see_through.toggled.connect(self.set_see_through)
        self.reset_button = QPushButton("Reset camera")
        self.reset_button.setToolTip("Show the whole femur from the front (R)")
        self.reset_button.clicked.connect(self.reset_camera)
        bar = QHBoxLayout()
        bar.setContentsMargins(8, 4, 6, 4)
        bar.setSpacing(14)
        for widget in (self.show_surface, self.see_through, self.show_slices, self.show_measurements,
                       self.show_landmarks):
            bar.addWidget(widget)
        bar.addStretch(1)
        bar.addWidget(self.reset_button)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(0)
        layout.addLayout(bar)
        layout.addWidget(self.plotter, 1)
        self._placeholder = self.plotter.add_text("Register a case to see the reconstructed femur",
                                                  position="upper_left", font_size=10, color="#9AA4B2")

    # ------------------------------------------------------------------ content
    def clear(self, render: bool = True) -> None:
        if self._closed:
            return
        for name in self._actors:
            self._remove(name)
        self._grid = None
        self._measurements, self._landmarks = {}, {}
        self._update_handles()
        if render:
            self.plotter.render()

    def _remove(self, name: str) -> None:
        for actor in self._actors[name]:
            self.plotter.remove_actor(actor, render=False)
        self._actors[name] = []

    def set_result(self, vertices: np.ndarray, faces: np.ndarray, volume: np.ndarray | None, grid_geometry) -> None:
        """Show a femur surface (world mm) and, if given, the warped atlas volume on its grid."""
        import pyvista as pv

        if self._closed:
            return
        self.clear(render=False)
        if self._placeholder is not None:
            self.plotter.remove_actor(self._placeholder, render=False)
            self._placeholder = None
        mesh = pv.PolyData(np.asarray(vertices, dtype=np.float64), _faces_for_vtk(faces))
        mesh = mesh.compute_normals(auto_orient_normals=False, split_vertices=False)
        actor = self.plotter.add_mesh(mesh, color=SURFACE_COLOUR, smooth_shading=True, specular=0.3,
                                      name="femur_surface", reset_camera=False, render=False)
        self._actors["surface"] = [actor]
        self.set_see_through(self.see_through.isChecked(), render=False)
        if volume is not None and grid_geometry is not None:
            image = pv.ImageData(dimensions=tuple(int(s) for s in reversed(volume.shape)),
                                 spacing=tuple(float(s) for s in grid_geometry.spacing_xyz_mm),
                                 origin=tuple(float(s) for s in grid_geometry.origin_mm))
            image.direction_matrix = np.asarray(grid_geometry.direction, dtype=np.float64)
            # VTK point order is x fastest, as a C-order (z, y, x) array flattened.
            image.point_data["intensity"] = np.ascontiguousarray(volume, dtype=np.float32).ravel()
            self._clim = imaging.robust_window(volume)
            self._grid = image
            self._slice_point = tuple(float(c) for c in image.center)
            self._update_slices()
        self.reset_camera()

    def set_slice_point(self, point_mm) -> None:
        """Move the three orthogonal atlas slices to pass through ``point_mm``."""
        self._slice_point = tuple(float(c) for c in point_mm)
        self._update_slices()
        self.plotter.render()

    def _update_slices(self) -> None:
        if self._closed or self._grid is None:
            return
        self._remove("slices")
        x, y, z = self._slice_point
        slices = self._grid.slice_orthogonal(x=x, y=y, z=z)
        actors = []
        for index, block in enumerate(slices):
            if block is None or block.n_points == 0:
                continue
            actors.append(self.plotter.add_mesh(block, scalars="intensity", cmap="gray", clim=self._clim,
                                                show_scalar_bar=False, name=f"atlas_slice_{index}",
                                                reset_camera=False, render=False, opacity=0.8))
        self._actors["slices"] = actors
        self._apply_visibility(render=False)

    def set_measurements(self, measurements: dict, landmarks_mm: dict) -> None:
        """Head sphere, shaft and neck axes, and landmark points."""
        import pyvista as pv

        if self._closed:
            return
        self._remove("measurements")
        self._remove("landmarks")
        self._measurements, self._landmarks = dict(measurements or {}), dict(landmarks_mm or {})
        actors = []
        centre = measurements.get("hip_centre_mm") if measurements else None
        radius = measurements.get("head_radius_mm") if measurements else None
        if centre is not None and radius:
            sphere = pv.Sphere(radius=float(radius), center=tuple(map(float, centre)),
                               theta_resolution=40, phi_resolution=40)
            actors.append(self.plotter.add_mesh(sphere, color=HEAD_COLOUR, opacity=0.35, name="head_sphere",
                                                reset_camera=False, render=False))
            actors.append(self.plotter.add_mesh(pv.Sphere(radius=1.5, center=tuple(map(float, centre))),
                                                color=HEAD_COLOUR, name="hip_centre", reset_camera=False, render=False))
        for key, colour, forward_only in (("shaft_axis", SHAFT_COLOUR, False), ("neck_axis", NECK_COLOUR, False)):
            axis = (measurements or {}).get(key)
            if not isinstance(axis, dict) or "point_mm" not in axis or "direction" not in axis:
                continue
            point = np.asarray(axis["point_mm"], dtype=np.float64)
            direction = np.asarray(axis["direction"], dtype=np.float64)
            norm = np.linalg.norm(direction)
            if not np.isfinite(norm) or norm == 0:
                continue
            direction = direction / norm
            half = AXIS_HALF_LENGTH_MM if key == "shaft_axis" else 0.5 * AXIS_HALF_LENGTH_MM
            line = pv.Line(tuple(point - half * direction), tuple(point + half * direction))
            actors.append(self.plotter.add_mesh(line.tube(radius=0.8), color=colour, name=key,
                                                reset_camera=False, render=False))
        summary = _summary_text(measurements or {})
        if summary:
            actors.append(self.plotter.add_text(summary, position="upper_left", font_size=9, color="#ECEFF4",
                                                name="measurement_summary"))
        self._actors["measurements"] = actors
        points = [np.asarray(v, dtype=np.float64) for v in self._landmarks.values()]
        if points:
            cloud = pv.PolyData(np.vstack(points))
            self._actors["landmarks"] = [self.plotter.add_mesh(
                cloud, color=LANDMARK_COLOUR, point_size=10, render_points_as_spheres=True, name="landmarks",
                reset_camera=False, render=False)]
            # Labels are drawn over everything (always_visible): a landmark inside the bone or
            # behind an atlas slice still says what it is.
            self._actors["landmarks"].append(self.plotter.add_point_labels(
                np.vstack(points), [graphics.landmark_label(n) for n in self._landmarks], name="landmark_labels",
                font_size=11, text_color="#101317", shape_color=LANDMARK_COLOUR, shape_opacity=0.8,
                show_points=False, always_visible=True, reset_camera=False, render=False))
        self._update_handles()
        self._apply_visibility()

    def set_see_through(self, enabled: bool, render: bool = True) -> None:
        """Bone half transparent (True) or opaque."""
        if self._closed:
            return
        blocked = self.see_through.blockSignals(True)
        self.see_through.setChecked(bool(enabled))
        self.see_through.blockSignals(blocked)
        for actor in self._actors["surface"]:
            actor.GetProperty().SetOpacity(SEE_THROUGH_OPACITY if enabled else 1.0)
        if render:
            self.plotter.render()

    def surface_opacity(self) -> float | None:
        actors = self._actors["surface"]
        return float(actors[0].GetProperty().GetOpacity()) if actors else None

    def set_landmark_handles(self, enabled: bool) -> None:
        """Show draggable spheres on the landmarks (left-drag moves one; emits landmark_moved)."""
        self._handles_enabled = bool(enabled)
        self._update_handles()
        self.plotter.render()

    def _update_handles(self) -> None:
        if self._closed:
            return
        names = list(self._landmarks) if self._handles_enabled else []
        widgets = self.handle_widgets()
        if names and names == self._handle_names and len(widgets) == len(names):
            for widget, name in zip(widgets, names):  # same landmarks: just move the handles
                widget.SetCenter(*map(float, self._landmarks[name]))
            return
        # Each widget's On()/Off() asks the interactor for a render (a few hundred ms each with
        # software OpenGL): suspend those and render once by the caller instead.
        interactor = self.plotter.iren.interactor
        interactor.EnableRenderOff()
        try:
            self.plotter.clear_sphere_widgets()
            self._handle_names = names
            if names:
                centres = np.array([self._landmarks[n] for n in names], dtype=np.float64)
                self.plotter.add_sphere_widget(self._handle_released, center=centres, radius=2.5,
                                               theta_resolution=16, phi_resolution=16,
                                               color=LANDMARK_COLOUR, selected_color="#FF4081",
                                               indices=list(range(len(centres))), interaction_event="end")
        finally:
            interactor.EnableRenderOn()

    def _handle_released(self, point, index) -> None:
        # Runs inside VTK's interaction callback: only emit here; receivers should use a queued
        # connection before rebuilding the handles.
        if not 0 <= index < len(self._handle_names):
            return
        name = self._handle_names[index]
        position = np.asarray(point, dtype=np.float64)
        # VTK also fires the end event for a click without a drag: report real moves only (a
        # report rebuilds the handles, and a rebuilt handle must not report itself again).
        if np.linalg.norm(position - np.asarray(self._landmarks.get(name, position), dtype=np.float64)) > 1e-6:
            self.landmark_moved.emit(name, position)

    def handle_widgets(self) -> list:
        # pyvista >= 0.47 keeps widgets under plotter.widgets; older versions on the plotter
        holder = getattr(self.plotter, "widgets", None)
        widgets = getattr(holder, "sphere_widgets", None) if holder is not None else None
        return list(widgets if widgets is not None else self.plotter.sphere_widgets)

    def _apply_visibility(self, *_args, render: bool = True) -> None:
        if self._closed:
            return
        for name, box in (("surface", self.show_surface), ("slices", self.show_slices),
                          ("measurements", self.show_measurements), ("landmarks", self.show_landmarks)):
            for actor in self._actors[name]:
                actor.SetVisibility(box.isChecked())
        if render:
            self.plotter.render()

    def reset_camera(self) -> None:
        """Anterior view (looking along +y in LPS: from the front), superior up, everything in view."""
        if self._closed:
            return
        actors = self._actors["surface"]
        if actors:
            bounds = actors[0].GetBounds()
            centre = np.array([(bounds[0] + bounds[1]) / 2, (bounds[2] + bounds[3]) / 2, (bounds[4] + bounds[5]) / 2])
            extent = max(bounds[1] - bounds[0], bounds[3] - bounds[2], bounds[5] - bounds[4], 1.0)
            self.plotter.camera_position = [tuple(centre - np.array([0.0, 3.0 * extent, 0.0])), tuple(centre), (0, 0, 1)]
        self.plotter.reset_camera()
        self.plotter.render()

    # ------------------------------------------------------------------ queries
    def actor_names(self) -> list[str]:
        return list(self.plotter.actors)

    def has_surface(self) -> bool:
        return bool(self._actors["surface"]) and "femur_surface" in self.plotter.actors

    def render_image(self) -> np.ndarray:
        """The render window's pixels as ``(rows, cols, 3)`` uint8 (read back from OpenGL)."""
        return render_window_image(self.plotter)

    def close_plotter(self) -> None:
        """Release the render window and every VTK object (call before destroying the widget)."""
        if self._closed:
            return
        self.plotter.clear_sphere_widgets()
        self._closed = True
        for name in self._actors:
            self._actors[name] = []
        self._grid = None
        self._placeholder = None
        self.plotter.close()
