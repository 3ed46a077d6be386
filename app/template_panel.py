"""The Template step's panel: choose and place the stem and the cup, see what the plan changes.

A self-contained widget: a 3D view with the transparent femur and the implants (optionally
clipped through the stem's neck plane), both radiographs with the implants' projected outlines
(through each view's ``P``), the implant controls (:attr:`TemplatePanel.controls`), and the table
of changes, which follows every edit at once. In the workstation the controls sit in the Template
step (:mod:`app.steps.template`) and the rest in the viewers' Template tab; standalone (tests,
tools) the panel shows all three side by side. The plan logic is Qt-free:
:class:`inference.templating.editor.PlanEditor` over :mod:`inference.templating.plan`; every edit is
also a command on :attr:`TemplatePanel.stack` (the window's Edit > Undo). The plan lives in
``session.template_plan`` (a :class:`~inference.templating.plan.Plan` dict), which
:mod:`app.project` saves in the project file, and the PDF report renders it off-screen
(:mod:`app.plan_report`).
"""

from __future__ import annotations

import logging
import time

import numpy as np
from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QColor, QPainterPath, QPen, QUndoCommand, QUndoStack
from PySide6.QtWidgets import (QCheckBox, QComboBox, QDoubleSpinBox, QFormLayout, QGraphicsPathItem, QGroupBox,
                               QHBoxLayout, QHeaderView, QLabel, QPushButton, QSplitter, QTableWidget,
                               QTableWidgetItem, QVBoxLayout, QWidget)

from app.plan_report import IMPLANT_COLOURS, OUTLINE_COLOURS, plan_basis, session_native_hip
from app.report_figures import BONE_COLOUR
from app.views.radiograph_view import RadiographView
from app.views.surface_view import _faces_for_vtk, render_window_image
from inference.templating.editor import PlanEditor, change_rows
from inference.templating.library import ImplantLibrary, load_library
from inference.templating.plan import Plan, implant_meshes, implant_outlines

log = logging.getLogger(__name__)

#: Triangles of the bone shown around the implants (a registration's surface has ~80 000): with
#: fewer, the 3D view's redraw after an edit stays inside the 200 ms heartbeat in software OpenGL.
BONE_TRIANGLES = 20_000


class PlanCommand(QUndoCommand):
    """One plan edit on the panel's undo stack; undo and redo step the editor's own history."""

    def __init__(self, panel: "TemplatePanel", text: str):
        super().__init__(text)
        self._panel = panel
        self._skip_first_redo = True  # pushed after the edit was made

    def redo(self) -> None:
        if self._skip_first_redo:
            self._skip_first_redo = False
        elif self._panel.editor is not None:
            self._panel.editor.redo()
            self._panel._update()

    def undo(self) -> None:
        if self._panel.editor is not None:
            self._panel.editor.undo()
            self._panel._update()


def _polydata(vertices, faces):
    import pyvista as pv

    return pv.PolyData(np.asarray(vertices, dtype=np.float64), _faces_for_vtk(faces))


def _spin(low: float, high: float, step: float, suffix: str, decimals: int = 1) -> QDoubleSpinBox:
    box = QDoubleSpinBox()
    box.setRange(low, high)
    box.setSingleStep(step)
    box.setDecimals(decimals)
    box.setSuffix(suffix)
    box.setKeyboardTracking(False)  # one edit per finished number, not one per typed digit
    return box


class TemplatePanel(QWidget):
    """Template step of one session (``session.result`` and ``session.measurements`` must be set
    before :meth:`load`)."""

    #: The plan changed (its dict, as saved in the project).
    plan_changed = Signal(dict)
    #: A 3D handle was dragged: ("head" = the stem's, or "cup", (3,) new world position in mm).
    handle_moved = Signal(str, object)

    #: The drag handles of the 3D view, in widget index order.
    HANDLES = ("head", "cup")

    def __init__(self, session, library: ImplantLibrary | None = None, parent=None):
        super().__init__(parent)
        self.session = session
        self.library = library or load_library()
        self.editor: PlanEditor | None = None
        self.last_update_s = 0.0       # wall time of the last update (s)
        self.last_update_cpu_s = 0.0   # its process CPU time (s): steadier on a shared machine
        self._closed = False
        self._stale = True          # the session changed since the last load()
        self._updating = False
        self._actors: dict[str, object] = {}
        self._implant_data: dict[str, object] = {}   # pyvista PolyData shown per implant
        self._bone_key = None
        self._outline_items: list[list[QGraphicsPathItem]] = [[], []]

        # ---- 3D view: the render window is made on the first load (a window that never plans
        # needs no second OpenGL context)
        self.plotter = None
        self.handle_moved.connect(self._move_handle, Qt.ConnectionType.QueuedConnection)
        self._handle_points: dict[str, np.ndarray] = {}
        self.clip_bone = QCheckBox("Clip bone at the neck plane")
        self.clip_bone.toggled.connect(lambda _=False: self._update_scene())
        self.bone_opacity = _spin(0.05, 1.0, 0.05, "", 2)
        self.bone_opacity.setValue(0.3)
        self.bone_opacity.valueChanged.connect(lambda _=0: self._update_scene())
        # ---- radiographs
        self.views = [RadiographView(), RadiographView()]
        self.view_titles = [QLabel(), QLabel()]

        # ---- controls
        self.stem_size = QComboBox()
        self.size_down, self.size_up = QPushButton("\u2212"), QPushButton("+")
        for b, tip in ((self.size_down, "Smaller stem (keeps the head height)"),
                       (self.size_up, "Larger stem (keeps the head height)")):
            b.setFixedWidth(30)
            b.setToolTip(tip)
        self.size_down.clicked.connect(lambda: self._step_size(-1))
        self.size_up.clicked.connect(lambda: self._step_size(+1))
        self.variant = QComboBox()
        self.head_offset = QComboBox()
        self.head_diameter = QComboBox()
        self.tip_depth = _spin(0.0, 300.0, 1.0, " mm")
        self.tip_depth.setToolTip("Stem tip distance below the lesser trochanter, along the shaft axis "
                                  "(deeper = shorter leg)")
        self.version = _spin(-45.0, 45.0, 1.0, " deg")
        self.version.setToolTip("Stem rotation about the shaft axis from the native neck plane (+ = more anteversion)")
        self.cup_size = QComboBox()
        self.inclination = _spin(20.0, 70.0, 1.0, " deg")
        self.anteversion = _spin(-10.0, 45.0, 1.0, " deg")
        self.cup_shift = {k: _spin(-30.0, 30.0, 0.5, " mm") for k in ("medial", "superior", "anterior")}
        self.auto_button = QPushButton("Automatic plan")
        self.auto_button.setToolTip("Replace the plan with the automatic first plan (undoable)")
        self.auto_button.clicked.connect(self._auto)
        #: Plan edits of the current plan (Edit > Undo in the workstation; cleared by a reload).
        self.stack = QUndoStack(self)
        self.undo_button, self.redo_button = QPushButton("Undo"), QPushButton("Redo")
        self.undo_button.clicked.connect(self.undo)
        self.redo_button.clicked.connect(self.redo)
        # the stack's own signals: while a command's undo() runs, the stack has not moved yet
        self.stack.canUndoChanged.connect(self.undo_button.setEnabled)
        self.stack.canRedoChanged.connect(self.redo_button.setEnabled)

        for combo, field, convert in ((self.stem_size, "stem_size", str), (self.variant, "stem_variant", str),
                                      (self.head_offset, "head_offset_mm", float),
                                      (self.head_diameter, "head_diameter_mm", float),
                                      (self.cup_size, "cup_size", str)):
            combo.activated.connect(lambda _i, c=combo, f=field, conv=convert: self._edit(**{f: conv(c.currentData())}))
        self.tip_depth.valueChanged.connect(lambda v: self._edit(stem_tip_height_mm=-float(v)))
        self.version.valueChanged.connect(lambda v: self._edit(stem_version_change_deg=float(v)))
        self.inclination.valueChanged.connect(lambda v: self._edit(cup_inclination_deg=float(v)))
        self.anteversion.valueChanged.connect(lambda v: self._edit(cup_anteversion_deg=float(v)))
        for box in self.cup_shift.values():
            box.valueChanged.connect(lambda _v: self._edit_cup_centre())

        stem_box = QGroupBox("Stem")
        form = QFormLayout(stem_box)
        size_row = QHBoxLayout()
        size_row.addWidget(self.size_down)
        size_row.addWidget(self.stem_size, 1)
        size_row.addWidget(self.size_up)
        form.addRow("Size", size_row)
        form.addRow("Neck", self.variant)
        form.addRow("Head offset", self.head_offset)
        form.addRow("Head diameter", self.head_diameter)
        form.addRow("Tip below LT", self.tip_depth)
        form.addRow("Version change", self.version)
        cup_box = QGroupBox("Cup")
        form = QFormLayout(cup_box)
        form.addRow("Size", self.cup_size)
        form.addRow("Inclination", self.inclination)
        form.addRow("Anteversion", self.anteversion)
        for name, box in self.cup_shift.items():
            form.addRow(f"Shift {name}", box)
        buttons = QHBoxLayout()
        for b in (self.auto_button, self.undo_button, self.redo_button):
            buttons.addWidget(b)

        self.table = QTableWidget(0, 2)
        self.table.setHorizontalHeaderLabels(["Change", "Value"])
        self.table.verticalHeader().setVisible(False)
        self.table.horizontalHeader().setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        self.table.horizontalHeader().setSectionResizeMode(1, QHeaderView.ResizeMode.ResizeToContents)
        self.table.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        self.warnings = QLabel()
        self.warnings.setWordWrap(True)
        self.warnings.setStyleSheet("color: #FF8A65;")
        self.status = QLabel("Register a case to plan implants")
        self.status.setWordWrap(True)

        #: The controls, status, table and warnings (the workstation shows them in its Template step).
        self.controls = controls = QWidget()
        left = QVBoxLayout(controls)
        left.setContentsMargins(0, 0, 0, 0)
        left.addWidget(self.status)
        left.addLayout(buttons)
        left.addWidget(stem_box)
        left.addWidget(cup_box)
        left.addWidget(self.table, 1)
        left.addWidget(self.warnings)
        controls.setMinimumWidth(330)

        scene = QWidget()
        scene_layout = QVBoxLayout(scene)
        scene_layout.setContentsMargins(0, 0, 0, 0)
        bar = QHBoxLayout()
        bar.addWidget(self.clip_bone)
        bar.addWidget(QLabel("Bone opacity"))
        bar.addWidget(self.bone_opacity)
        bar.addStretch(1)
        scene_layout.addLayout(bar)
        self._scene_layout = scene_layout
        self._scene_placeholder = QLabel("Register a case to plan implants")
        self._scene_placeholder.setAlignment(Qt.AlignmentFlag.AlignCenter)
        scene_layout.addWidget(self._scene_placeholder, 1)
        radiographs = QSplitter(Qt.Orientation.Vertical)
        for title, view in zip(self.view_titles, self.views):
            box = QWidget()
            column = QVBoxLayout(box)
            column.setContentsMargins(0, 0, 0, 0)
            column.addWidget(title)
            column.addWidget(view, 1)
            radiographs.addWidget(box)
        split = QSplitter(Qt.Orientation.Horizontal)
        split.addWidget(controls)
        split.addWidget(scene)
        split.addWidget(radiographs)
        split.setStretchFactor(1, 3)
        split.setStretchFactor(2, 2)
        split.setSizes([340, 600, 460])
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(split)
        self._set_enabled(False)

    # ------------------------------------------------------------------ loading
    def set_session(self, session) -> None:
        """Follow a (new or changed) session: reload now if shown, else when next shown (loading
        builds the canal profile and the 3D scene, which need not run while nobody looks)."""
        self.session = session
        self._stale = True
        if self.isVisible():
            self.load()

    def showEvent(self, event) -> None:
        super().showEvent(event)
        if self._stale and not self._closed:
            self.load()

    def load(self) -> bool:
        """(Re)build the editor from the session: its saved plan, else the automatic plan.

        Returns False (and shows why) when the session has no registration result yet.
        """
        s = self.session
        self._stale = False
        if s.result is None or not s.measurements:
            self.editor = None
            self.status.setText("Register a case to plan implants")
            self._set_enabled(False)
            return False
        from inference.errors import HipAtlasError

        saved = getattr(s, "template_plan", None)
        self.stack.clear()
        try:
            native = session_native_hip(s)
            self.editor = PlanEditor(native, self.library, Plan.from_dict(saved) if saved else None)
        except HipAtlasError as exc:
            self.editor = None
            self.status.setText(f"Cannot plan this case: {exc}")
            self._set_enabled(False)
            return False
        moved = bool(saved) and s.template_basis not in (None, plan_basis(s.measurements))
        self.status.setText(f"{native.side.capitalize()} hip. " + (
            "The landmarks moved since this plan was made: its changes are recomputed from the new "
            "landmarks; check them." if moved else "Saved plan." if saved
            else "Automatic first plan: adjust as needed."))
        self._make_plotter()
        self._fill_choices()
        self._show_bone()
        self._show_radiographs()
        self._set_enabled(True)
        self._update()
        self.zoom_to_implants()
        self.plotter.reset_camera()
        self.plotter.render()
        return True

    def _make_plotter(self) -> None:
        if self.plotter is not None or self._closed:
            return
        from pyvistaqt import QtInteractor

        # No multisampling: pyvista's default 8x MSAA doubles a redraw in software OpenGL (120 -> 64 ms
        # CPU on the demo) for edges that look the same at this size; the redraw follows every edit.
        self.plotter = QtInteractor(self, auto_update=False, multi_samples=0)
        self.plotter.set_background("#1B1F27", top="#2E3440")
        self.plotter.add_axes(interactive=False, line_width=2)
        self._scene_layout.replaceWidget(self._scene_placeholder, self.plotter)
        self._scene_placeholder.deleteLater()

    def zoom_to_implants(self, margin: float = 1.6) -> None:
        """Fit each radiograph to its implant outlines (``margin`` times their extent)."""
        from PySide6.QtCore import QRectF

        for index, view in enumerate(self.views):
            paths = self.outline_paths(index)
            if not paths:
                continue
            box = paths[0].boundingRect()
            for path in paths[1:]:
                box = box.united(path.boundingRect())
            side = margin * max(box.width(), box.height())
            centre = box.center()
            view.fitInView(QRectF(centre.x() - side / 2, centre.y() - side / 2, side, side),
                           Qt.AspectRatioMode.KeepAspectRatio)

    def _set_enabled(self, enabled: bool) -> None:
        for w in (self.stem_size, self.size_down, self.size_up, self.variant, self.head_offset, self.head_diameter,
                  self.tip_depth, self.version, self.cup_size, self.inclination, self.anteversion,
                  self.auto_button, *self.cup_shift.values()):
            w.setEnabled(enabled)
        self.undo_button.setEnabled(enabled and self.stack.canUndo())
        self.redo_button.setEnabled(enabled and self.stack.canRedo())

    def _fill_choices(self) -> None:
        stem = self.library.stem(self.editor.plan.stem_family)
        cup = self.library.cup(self.editor.plan.cup_family)
        for combo, items in ((self.stem_size, [(f"Size {s.size} ({s.length_mm:g} mm)", s.size) for s in stem.sizes]),
                             (self.variant, [(v.name, v.name) for v in stem.variants]),
                             (self.head_offset, [(f"{h:+g} mm", h) for h in stem.head_offsets_mm]),
                             (self.head_diameter, [(f"{d:g} mm", d) for d in stem.head_diameters_mm]),
                             (self.cup_size, [(f"{c.outer_diameter_mm:g} mm", c.size) for c in cup.sizes])):
            combo.blockSignals(True)
            combo.clear()
            for text, data in items:
                combo.addItem(text, data)
            combo.blockSignals(False)

    def _show_bone(self) -> None:
        r = self.session.result
        self._bone = _polydata(r.surface_vertices, r.surface_faces)
        if self._bone.n_cells > BONE_TRIANGLES:
            # context around the implants, drawn see-through: a lighter surface renders several times faster
            self._bone = self._bone.decimate(1.0 - BONE_TRIANGLES / self._bone.n_cells)
        for actor in self._actors.values():
            self.plotter.remove_actor(actor, render=False)
        self._actors, self._implant_data, self._bone_key = {}, {}, None

    def _show_radiographs(self) -> None:
        s = self.session
        for i, view in enumerate(self.views):
            if i < len(s.views):
                view.set_image(s.views[i].display)
                self.view_titles[i].setText(s.views[i].name)
            self._outline_items[i] = []

    # ------------------------------------------------------------------ edits
    def _change(self, text: str, change) -> None:
        """Make one change through the editor; if the plan changed, record it on the undo stack."""
        before = self.editor.plan
        change()
        if self.editor.plan is not before:
            self.stack.push(PlanCommand(self, text))
        self._update()

    def _edit(self, **fields) -> None:
        if self._updating or self.editor is None:
            return
        from inference.errors import HipAtlasError

        try:
            self._change("Edit the plan (" + ", ".join(f.replace("_", " ") for f in fields) + ")",
                         lambda: self.editor.edit(**fields))
        except HipAtlasError as exc:
            self.warnings.setText(str(exc))

    def _edit_cup_centre(self) -> None:
        if self._updating or self.editor is None:
            return
        n = self.editor.native
        shift = (self.cup_shift["medial"].value() * n.medial + self.cup_shift["superior"].value() * np.array([0, 0, 1.0])
                 + self.cup_shift["anterior"].value() * np.array([0, -1.0, 0]))
        self._edit(cup_centre_mm=tuple(float(v) for v in n.hip_centre_mm + shift))

    def _step_size(self, step: int) -> None:
        if self.editor is not None:
            self._change("Larger stem" if step > 0 else "Smaller stem", lambda: self.editor.step_stem_size(step))

    def _auto(self) -> None:
        if self.editor is not None:
            self._change("Automatic plan", self.editor.reset_to_auto)

    def undo(self) -> None:
        self.stack.undo()

    def redo(self) -> None:
        self.stack.redo()

    # ------------------------------------------------------------------ display
    def _update(self) -> None:
        """Controls, table, 3D scene and outlines from the editor's current plan."""
        started, started_cpu = time.perf_counter(), time.process_time()
        plan, changes = self.editor.plan, self.editor.changes
        self._updating = True
        try:
            for combo, value in ((self.stem_size, plan.stem_size), (self.variant, plan.stem_variant),
                                 (self.head_offset, plan.head_offset_mm), (self.head_diameter, plan.head_diameter_mm),
                                 (self.cup_size, plan.cup_size)):
                combo.setCurrentIndex(combo.findData(value))
            self.tip_depth.setValue(-plan.stem_tip_height_mm)
            self.version.setValue(plan.stem_version_change_deg)
            self.inclination.setValue(plan.cup_inclination_deg)
            self.anteversion.setValue(plan.cup_anteversion_deg)
            for key, box in self.cup_shift.items():
                box.setValue(changes["cup_cor_shift"][f"{key}_mm"])
        finally:
            self._updating = False
        rows = change_rows(changes)
        if self.table.rowCount() != len(rows):
            self.table.setRowCount(len(rows))
            for i in range(len(rows)):
                self.table.setItem(i, 0, QTableWidgetItem())
                item = QTableWidgetItem()
                item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
                self.table.setItem(i, 1, item)
        for i, row in enumerate(rows):   # in place: only the cells whose text changes repaint
            for column, text in enumerate(row):
                if self.table.item(i, column).text() != text:
                    self.table.item(i, column).setText(text)
        self.warnings.setText("\n".join(f"\u26a0 {w}" for w in changes["warnings"]))
        self._update_scene()
        self._update_outlines()
        self.session.template_plan = plan.to_dict()
        self.session.template_basis = plan_basis(self.session.measurements)
        self.session.dirty = True
        self.last_update_s = time.perf_counter() - started
        self.last_update_cpu_s = time.process_time() - started_cpu
        self.plan_changed.emit(plan.to_dict())

    def _update_scene(self) -> None:
        """Show the bone and the implants. Implant meshes keep their topology from one plan to the
        next (same rings for every size), so an edit only moves their points; the bone is
        re-added only when its clipping or opacity changes."""
        if self._closed or self.editor is None or self.plotter is None:
            return
        placed = self.editor.placed
        bone_key = (self.clip_bone.isChecked(), self.bone_opacity.value(),
                    tuple(np.round(placed.stem_to_world[:3, 1:4:2].ravel(), 6)) if self.clip_bone.isChecked() else ())
        if self._bone_key != bone_key:
            if "bone" in self._actors:
                self.plotter.remove_actor(self._actors.pop("bone"), render=False)
            bone = self._bone
            if self.clip_bone.isChecked():
                # Cut through the stem axis, perpendicular to the neck plane: the back half stays.
                normal = placed.stem_to_world[:3, 1]
                bone = bone.clip(normal=tuple(-normal), origin=tuple(placed.stem_to_world[:3, 3]))
            self._actors["bone"] = self.plotter.add_mesh(bone, color=BONE_COLOUR, opacity=self.bone_opacity.value(),
                                                         smooth_shading=True, reset_camera=False, render=False)
            self._bone_key = bone_key
        for name, mesh in implant_meshes(placed).items():
            shown = self._implant_data.get(name)
            if shown is not None and shown.n_points == mesh.n_vertices and shown.n_cells == mesh.n_faces:
                shown.points = mesh.vertices
                continue
            if name in self._actors:
                self.plotter.remove_actor(self._actors.pop(name), render=False)
            data = _polydata(mesh.vertices, mesh.faces)
            self._implant_data[name] = data
            self._actors[name] = self.plotter.add_mesh(
                data, color=IMPLANT_COLOURS[name], smooth_shading=True, specular=0.6,
                opacity=0.55 if name == "cup" else 1.0, reset_camera=False, render=False)
        self._update_handles(placed)
        self.plotter.update()   # one redraw, at the next paint (an explicit render() drew twice)

    # ------------------------------------------------------------------ drag handles
    def _update_handles(self, placed) -> None:
        """Sphere handles (outside the implants, so they can be grabbed): on the stem axis at the
        shoulder (drag = seat the stem along the shaft axis) and in front of the cup's opening on
        its axis (drag = move the cup)."""
        shoulder = placed.stem.size(placed.plan.stem_size).length_mm
        cup_radius = 0.5 * placed.cup.size(placed.plan.cup_size).outer_diameter_mm
        self._handle_points = {
            "head": placed.stem_to_world[:3, :3] @ [0.0, 0.0, shoulder + 6.0] + placed.stem_to_world[:3, 3],
            "cup": placed.cup_to_world[:3, 3] + (cup_radius + 6.0) * placed.cup_to_world[:3, 2]}
        interactor = self.plotter.iren.interactor
        interactor.EnableRenderOff()
        try:
            self.plotter.clear_sphere_widgets()
            centres = np.array([self._handle_points[n] for n in self.HANDLES])
            self.plotter.add_sphere_widget(self._handle_released, center=centres, radius=3.0,
                                           theta_resolution=16, phi_resolution=16, color="#C6FF00",
                                           selected_color="#FF4081", indices=list(range(len(centres))),
                                           interaction_event="end")
        finally:
            interactor.EnableRenderOn()

    def _handle_released(self, point, index) -> None:
        # Runs inside VTK's interaction callback: only emit here (the slot, queued, rebuilds the
        # handles); a click without a drag also ends an interaction and is ignored.
        if not 0 <= index < len(self.HANDLES):
            return
        name = self.HANDLES[index]
        position = np.asarray(point, dtype=np.float64)
        if np.linalg.norm(position - self._handle_points.get(name, position)) > 1e-6:
            self.handle_moved.emit(name, position)

    def _move_handle(self, name: str, position) -> None:
        if self.editor is None:
            return
        delta = np.asarray(position, float) - self._handle_points[name]
        if name == "head":
            along = float(delta @ self.editor.native.shaft_direction)
            self._edit(stem_tip_height_mm=self.editor.plan.stem_tip_height_mm + along)
        else:
            self._edit(cup_centre_mm=tuple(float(v) for v in np.asarray(self.editor.plan.cup_centre_mm) + delta))

    def _update_outlines(self) -> None:
        s = self.session
        placed = self.editor.placed
        for i, view in enumerate(self.views):
            for item in self._outline_items[i]:
                view.scene().removeItem(item)
            self._outline_items[i] = []
            if s.case is None or i >= len(s.case.views):
                continue
            for name, polygons in implant_outlines(placed, s.case.views[i].P).items():
                for polygon in polygons:
                    if len(polygon) < 3:
                        continue
                    path = QPainterPath()
                    path.moveTo(*polygon[0])
                    for u, v in polygon[1:]:
                        path.lineTo(u, v)
                    path.closeSubpath()
                    item = QGraphicsPathItem(path)
                    pen = QPen(QColor(OUTLINE_COLOURS[name]), 1.5)
                    pen.setCosmetic(True)
                    item.setPen(pen)
                    item.setZValue(6)
                    view.scene().addItem(item)
                    self._outline_items[i].append(item)

    def outline_paths(self, index: int) -> list[QPainterPath]:
        """The outlines drawn on radiograph ``index`` (for tests and the report)."""
        return [item.path() for item in self._outline_items[index]]

    def render_image(self) -> np.ndarray:
        return render_window_image(self.plotter)

    def close_plotter(self) -> None:
        """Release the render window and every VTK object (call before destroying the widget)."""
        if self._closed:
            return
        self._closed = True
        self._actors, self._implant_data = {}, {}
        self._bone = None
        if self.plotter is not None:
            self.plotter.clear_sphere_widgets()
            self.plotter.close()
