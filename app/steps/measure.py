"""Step 5, Measure: the measurements (with their uncertainties and caveats) and the landmarks they
are computed from; a landmark typed in, dragged in 3D or on a radiograph, or reset recomputes the
measurements (each move undoable)."""

from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtGui import QUndoCommand, QUndoStack
from PySide6.QtWidgets import QCheckBox, QDoubleSpinBox, QHBoxLayout, QLabel, QPushButton, QTableWidgetItem

from app.session import landmark_label, measurement_rows
from app.steps.base import Step, ignore_wheel_unless_focused, read_only_table
from inference.measure import caveat_lines as measure_caveats


class LandmarkCommand(QUndoCommand):
    """Landmarks moved (one typed or dragged, or all reset) on the Measure step's undo stack.

    ``before`` and ``after`` hold the moved landmarks' positions and whether the landmarks were
    edited at all (``False``: the registration's own landmarks, restored exactly by a reset)."""

    def __init__(self, step: "MeasureStep", text: str, before: tuple[dict, bool], after: tuple[dict, bool]):
        super().__init__(text)
        self._step, self._before, self._after = step, before, after
        self._skip_first_redo = True  # pushed after the move was made

    def _apply(self, state: tuple[dict, bool]) -> None:
        points, edited = state
        session = self._step.session
        if not edited:
            session.reset_landmarks()
        else:
            for name, point in points.items():
                session.move_landmark(name, point)
        self._step.landmarks_changed()

    def redo(self) -> None:
        if self._skip_first_redo:
            self._skip_first_redo = False
        else:
            self._apply(self._after)

    def undo(self) -> None:
        self._apply(self._before)


class MeasureStep(Step):
    name, viewer = "Measure", 1
    title = "Measure"
    hint = ("Values follow the landmarks: edit a landmark's coordinates, or drag its handle in the 3D view "
            "or on a radiograph, and the measurements are recomputed. Shown in 3D as the head sphere (cyan), shaft axis (amber) "
            "and neck axis (green).")

    def __init__(self, window):
        super().__init__(window)
        layout = self.layout_
        self.measure_table = read_only_table(["Quantity", "Value", "Unit"])
        layout.addWidget(self.measure_table, 2)
        title = QLabel("Landmarks (world LPS, mm)")
        title.setObjectName("viewTitle")
        layout.addWidget(title)
        self.landmark_table = read_only_table(["Landmark", "x", "y", "z"], stretch=(1, 2, 3))
        layout.addWidget(self.landmark_table, 3)
        self.landmark_spins: dict[str, list[QDoubleSpinBox]] = {}
        #: Landmark moves and resets of the current result (cleared by a new registration).
        self.stack = QUndoStack(self)
        row = QHBoxLayout()
        self.drag_landmarks = QCheckBox("Drag landmarks in 3D")
        self.drag_landmarks.setToolTip("Show a handle on each landmark in the 3D view; drag it with the left button")
        self.drag_landmarks.toggled.connect(lambda on: window.surface_view.set_landmark_handles(on))
        row.addWidget(self.drag_landmarks)
        row.addStretch(1)
        self.reset_landmarks_button = QPushButton("Reset landmarks")
        self.reset_landmarks_button.clicked.connect(self.reset_landmarks)
        row.addWidget(self.reset_landmarks_button)
        layout.addLayout(row)
        # Queued: the handle's callback runs inside VTK's event processing, and the slot rebuilds
        # the handles.
        window.surface_view.landmark_moved.connect(self.move_landmark, Qt.ConnectionType.QueuedConnection)
        for panel in window.radiograph_panels:
            view = panel.view
            view.landmark_dragging.connect(lambda n, u, v, i=panel.index: self._landmark_dragging(i, n, u, v))
            # Queued: the slot rebuilds the handles, one of which is finishing its mouse event.
            view.landmark_dragged.connect(lambda n, u, v, i=panel.index: self._landmark_dragged(i, n, u, v),
                                          Qt.ConnectionType.QueuedConnection)

    def refresh(self) -> None:
        s, w = self.session, self.window
        rows = measurement_rows(s.measurements, self.settings.units) if s.measurements else []
        self.measure_table.setRowCount(len(rows))
        notes = "\n".join(["\u00b1 one standard uncertainty (docs/measurements.md)",
                           *(f"(!) {line}" for line in measure_caveats(s.measurements))])
        for row, (label, value, unit) in enumerate(rows):
            for column, text in enumerate((label, value, unit)):
                item = QTableWidgetItem(text)
                item.setToolTip(notes)
                if column == 1:
                    item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
                self.measure_table.setItem(row, column, item)
        names = list(s.landmarks_mm)
        if names != list(self.landmark_spins):
            self._build_landmark_editors(names)
        for name, spins in self.landmark_spins.items():
            for spin, value in zip(spins, s.landmarks_mm.get(name, (0, 0, 0))):
                blocked = spin.blockSignals(True)
                spin.setValue(float(value))
                spin.blockSignals(blocked)
        self.reset_landmarks_button.setEnabled(s.landmarks_edited)
        w.surface_view.set_measurements(s.measurements, s.landmarks_mm)
        for index, panel in enumerate(w.radiograph_panels):
            panel.view.set_graphics(s.view_graphics(index) if index < len(s.views) else None)
        w.review_step.apply_overlay_toggles()

    def _build_landmark_editors(self, names: list[str]) -> None:
        self.landmark_spins = {}
        self.landmark_table.setRowCount(len(names))
        for row, name in enumerate(names):
            self.landmark_table.setItem(row, 0, QTableWidgetItem(landmark_label(name)))
            spins = []
            for axis in range(3):
                spin = QDoubleSpinBox()
                spin.setRange(-5000.0, 5000.0)
                spin.setDecimals(2)
                spin.setSingleStep(0.5)
                spin.setKeyboardTracking(False)
                spin.setFrame(False)
                ignore_wheel_unless_focused(spin)
                spin.valueChanged.connect(lambda value, n=name, a=axis: self._landmark_axis_edited(n, a, value))
                self.landmark_table.setCellWidget(row, axis + 1, spin)
                spins.append(spin)
            self.landmark_spins[name] = spins

    def _landmark_axis_edited(self, name: str, axis: int, value: float) -> None:
        """A coordinate typed into the landmark table: only that coordinate changes (the others
        keep their full precision rather than the table's rounded display)."""
        point = list(self.session.landmarks_mm.get(name, (0.0, 0.0, 0.0)))
        point[axis] = float(value)
        self.move_landmark(name, point)

    def _state(self, names) -> tuple[dict, bool]:
        return {n: list(self.session.landmarks_mm[n]) for n in names}, self.session.landmarks_edited

    def move_landmark(self, name: str, position_mm) -> None:
        """Move a landmark (typed, dragged in 3D, or from a script) and show the new measurements."""
        before = self._state([name]) if name in self.session.landmarks_mm else None
        try:
            self.session.move_landmark(name, [float(v) for v in position_mm])
        except Exception as error:  # noqa: BLE001
            self.window.report_error(error)
        else:
            self.stack.push(LandmarkCommand(self, f"Move {landmark_label(name)}", before, self._state([name])))
        self.landmarks_changed()

    def _landmark_dragging(self, index: int, name: str, u: float, v: float) -> None:
        """A landmark handle moves on radiograph ``index``: the other shows its epipolar line."""
        for other, panel in enumerate(self.window.radiograph_panels):
            if other != index and other < len(self.session.views):
                panel.view.show_epipolar(self.session.epipolar_segment(index, (u, v), other))

    def _landmark_dragged(self, index: int, name: str, u: float, v: float) -> None:
        """A landmark handle dropped on radiograph ``index``: the landmark moves in that view's
        plane (same depth), as one undoable move."""
        for panel in self.window.radiograph_panels:
            panel.view.show_epipolar(None)
        try:
            position = self.session.landmark_moved_in_view(index, name, (u, v))
        except Exception as error:  # noqa: BLE001
            self.window.report_error(error)
            return
        self.move_landmark(name, position)

    def reset_landmarks(self) -> None:
        before = self._state(list(self.session.landmarks_mm))
        self.session.reset_landmarks()
        if before[1]:
            self.stack.push(LandmarkCommand(self, "Reset landmarks", before, self._state(before[0])))
        self.landmarks_changed()

    def landmarks_changed(self) -> None:
        self.refresh()
        self.window.refresh_steps()
