"""Step 2, Masks: check and correct the femur mask of each radiograph (brush, eraser, polygon,
the atlas-based proposal, the case's mask file) and confirm both. Every edit is one undo command."""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
from PySide6.QtCore import QElapsedTimer
from PySide6.QtGui import QUndoCommand, QUndoStack
from PySide6.QtWidgets import (QButtonGroup, QCheckBox, QGridLayout, QGroupBox, QHBoxLayout, QLabel, QProgressBar,
                               QPushButton, QSpinBox, QToolButton)
from PySide6.QtWidgets import QApplication

from app.steps.base import Step, first_line, ignore_wheel_unless_focused, release_worker
from app.workers import GeneratorWorker
from inference.errors import HipAtlasError

log = logging.getLogger(__name__)


class MaskEditCommand(QUndoCommand):
    """One mask edit of one view (a brush stroke, a polygon, a reset) on the undo stack."""

    def __init__(self, step: "MasksStep", index: int, edit, text: str, applied: bool):
        super().__init__(f"{text} ({step.session.views[index].name})")
        self._step, self._index, self._edit = step, index, edit
        self._skip_first_redo = applied
        self.drop_on_undo = False  # undone once and removed (a double click's stray dot)

    def redo(self) -> None:
        if self._skip_first_redo:  # the stroke was painted live; pushing must not paint it again
            self._skip_first_redo = False
        else:
            self._step.session.apply_mask_edit(self._index, self._edit)
        self._step.mask_changed(self._index, self._edit)

    def undo(self) -> None:
        self._step.session.apply_mask_edit(self._index, self._edit, undo=True)
        self._step.mask_changed(self._index, self._edit)
        if self.drop_on_undo:
            self.setObsolete(True)  # QUndoStack deletes a command that turns obsolete in undo()


class MasksStep(Step):
    name, viewer = "Masks", 0
    title = "Femur masks"
    hint = ("Check the femur mask on each radiograph, correct it with the brush, eraser or polygon (Shift + "
            "double-click: erase polygon), then tick \u201cMask confirmed\u201d on both views. Mouse wheel zooms at the cursor, "
            "middle-drag pans, right-drag sets window/level.")

    def __init__(self, window):
        super().__init__(window)
        layout = self.layout_
        self.proposal_worker: GeneratorWorker | None = None
        self._stroke_before: dict[int, np.ndarray] = {}
        self._stroke_segments = 0
        #: The last stroke that was a single click: (view index, its command, a timer since then).
        self._last_click: tuple[int, MaskEditCommand, QElapsedTimer] | None = None
        #: One undo history per view's mask (each step, and each object in it, has its own);
        #: Ctrl+Z acts on the view last edited or pointed at (:meth:`activate_view`).
        self.stacks = [QUndoStack(self) for _ in range(2)]
        self.active_view = 0
        tools = QHBoxLayout()
        self.tool_group = QButtonGroup(self)
        self.tool_buttons = {}
        for tool, label, tip in (("navigate", "Pan", "Navigate (N)"), ("brush", "Brush", "Paint femur (B)"),
                                 ("eraser", "Eraser", "Erase (E)"), ("polygon", "Polygon",
                                 "Click vertices, double-click or Enter to fill; with Shift to erase (P)")):
            button = QToolButton()
            button.setText(label)
            button.setToolTip(tip)
            button.setCheckable(True)
            button.clicked.connect(lambda _=False, t=tool: self.set_tool(t))
            self.tool_group.addButton(button)
            self.tool_buttons[tool] = button
            tools.addWidget(button)
        tools.addStretch(1)
        layout.addLayout(tools)
        size_row = QHBoxLayout()
        size_row.addWidget(QLabel("Brush radius"))
        self.brush_size = QSpinBox()
        self.brush_size.setRange(1, 200)
        self.brush_size.setValue(12)
        self.brush_size.setSuffix(" px")
        self.brush_size.valueChanged.connect(self._brush_size_changed)
        ignore_wheel_unless_focused(self.brush_size)
        size_row.addWidget(self.brush_size)
        size_row.addStretch(1)
        layout.addLayout(size_row)
        history = QHBoxLayout()
        self.undo_button = QPushButton("Undo")
        self.redo_button = QPushButton("Redo")
        self.undo_button.clicked.connect(lambda: self.stack.undo())
        self.redo_button.clicked.connect(lambda: self.stack.redo())
        window.undo_group.canUndoChanged.connect(self.undo_button.setEnabled)
        window.undo_group.canRedoChanged.connect(self.redo_button.setEnabled)
        window.undo_group.undoTextChanged.connect(lambda text: self.undo_button.setText(f"Undo {text}".strip()))
        window.undo_group.redoTextChanged.connect(lambda text: self.redo_button.setText(f"Redo {text}".strip()))
        history.addWidget(self.undo_button)
        history.addWidget(self.redo_button)
        layout.addLayout(history)
        self.mask_rows = []
        self.propose_buttons = []
        for index in range(2):
            group = QGroupBox(f"View {index + 1}")
            grid = QGridLayout(group)
            status = QLabel("")
            status.setWordWrap(True)
            confirm = QCheckBox("Mask confirmed")
            confirm.toggled.connect(lambda checked, i=index: self.set_mask_confirmed(i, checked))
            propose = QPushButton("Propose")
            propose.setToolTip("Replace the mask with the atlas-based proposal (needs the model; undoable)")
            propose.clicked.connect(lambda _=False, i=index: self.start_mask_proposal([i]))
            self.propose_buttons.append(propose)
            original = QPushButton("Case mask")
            original.setToolTip("Go back to the mask file of the case (undoable)")
            original.clicked.connect(lambda _=False, i=index: self.reset_mask(i, "case file"))
            clear = QPushButton("Clear")
            clear.clicked.connect(lambda _=False, i=index: self.reset_mask(i, "cleared"))
            grid.addWidget(status, 0, 0, 1, 3)
            grid.addWidget(propose, 1, 0)
            grid.addWidget(original, 1, 1)
            grid.addWidget(clear, 1, 2)
            grid.addWidget(confirm, 2, 0, 1, 3)
            layout.addWidget(group)
            self.mask_rows.append((group, status, confirm, original))
        proposal_row = QHBoxLayout()
        self.proposal_progress = QProgressBar()
        self.proposal_progress.setRange(0, 1000)
        self.proposal_progress.setTextVisible(False)
        self.proposal_progress.setMaximumHeight(8)
        self.proposal_cancel = QPushButton("Stop")
        self.proposal_cancel.setToolTip("Stop the automatic mask proposal")
        self.proposal_cancel.clicked.connect(self.cancel_mask_proposal)
        proposal_row.addWidget(self.proposal_progress, 1)
        proposal_row.addWidget(self.proposal_cancel)
        layout.addLayout(proposal_row)
        self.proposal_status = QLabel("")
        self.proposal_status.setObjectName("hint")
        self.proposal_status.setWordWrap(True)
        layout.addWidget(self.proposal_status)
        self._show_proposal_progress(False)
        self.mask_next = QPushButton("Continue to registration")
        self.mask_next.setObjectName("primary")
        self.mask_next.clicked.connect(lambda: window.go_to_step("Register"))
        layout.addWidget(self.mask_next)
        layout.addStretch(1)

    @property
    def stack(self) -> QUndoStack:
        """The undo history of the active view's mask."""
        return self.stacks[self.active_view]

    def activate_view(self, index: int) -> None:
        """Undo/redo now act on view ``index`` (edited, confirmed or pointed at last)."""
        if index != self.active_view and 0 <= index < len(self.stacks):
            self.active_view = index
            if self.window.current_step() == self.name:
                self.window.undo_group.setActiveStack(self.stack)

    def connect_view(self, panel) -> None:
        """Wire a radiograph panel's editing gestures to this step."""
        i, view = panel.index, panel.view
        panel.confirm_toggled.connect(lambda checked: self.set_mask_confirmed(i, checked))
        view.stroke_started.connect(lambda: self._stroke_started(i))
        view.segment.connect(lambda u0, v0, u1, v1: self._stroke_segment(i, u0, v0, u1, v1))
        view.stroke_finished.connect(lambda: self._stroke_finished(i))
        view.polygon_closed.connect(lambda points, fill: self._polygon_closed(i, points, fill))
        view.double_clicked.connect(lambda: self._double_clicked(i))
        view.cursor_moved.connect(lambda _u, _v: self.activate_view(i))

    # ---------------------------------------------------------------- refresh
    def refresh(self) -> None:
        s = self.session
        for index, (group, status, confirm, original) in enumerate(self.mask_rows):
            if index < len(s.views):
                state = s.views[index]
                group.setTitle(state.name)
                group.setEnabled(True)
                status.setText(f"Mask: {state.mask_source}; {int(state.mask.sum()):,} px")
                blocked = confirm.blockSignals(True)
                confirm.setChecked(state.confirmed)
                confirm.blockSignals(blocked)
                original.setEnabled(s.case.views[index].mask is not None)
            else:
                group.setTitle(f"View {index + 1}")
                group.setEnabled(False)
                status.setText("")
        self.mask_next.setEnabled(s.all_confirmed)
        if s.has_case:
            self.refresh_view_headers()

    def refresh_view_headers(self) -> None:
        s = self.session
        for index, panel in enumerate(self.window.radiograph_panels):
            if index >= len(s.views):
                continue
            state, view = s.views[index], s.case.views[index]
            rows, cols = view.image.shape
            spacing = view.image.pixel_spacing_mm
            pitch = f", {spacing[1]:.3f} mm/px" if spacing else ""
            panel.set_header(f"{state.name}",
                             f"{cols} \u00d7 {rows} px{pitch} \u2022 calibration: {state.calibration.get('source', 'unknown')}"
                             f" \u2022 mask: {state.mask_source}")
            panel.set_confirmed(state.confirmed)

    # ---------------------------------------------------------------- tools
    def set_tool(self, tool: str) -> None:
        for name, button in self.tool_buttons.items():
            button.setChecked(name == tool)
        for panel in self.window.radiograph_panels:
            panel.view.set_tool(tool)
            panel.view.brush_radius_px = float(self.brush_size.value())

    def _brush_size_changed(self, value: int) -> None:
        for panel in self.window.radiograph_panels:
            panel.view.brush_radius_px = float(value)

    def _stroke_started(self, index: int) -> None:
        self._stroke_before[index] = self.session.views[index].mask.copy()
        self._stroke_segments = 0

    def _stroke_segment(self, index: int, u0: float, v0: float, u1: float, v1: float) -> None:
        view = self.window.radiograph_panels[index].view
        self._stroke_segments += 1
        edit = self.session.paint(index, (u0, v0), (u1, v1), view.brush_radius_px, view.tool == "brush")
        if edit is not None:
            view.update_mask_region(edit.row0, edit.col0, edit.after)

    def _stroke_finished(self, index: int) -> None:
        before = self._stroke_before.pop(index, None)
        if before is None:
            return
        edit = self.session.stroke_edit(index, before)
        if edit is not None:
            tool = self.window.radiograph_panels[index].view.tool
            command = self.push(index, edit, "Brush" if tool == "brush" else "Erase")
            if self._stroke_segments == 1:
                timer = QElapsedTimer()
                timer.start()
                self._last_click = (index, command, timer)

    def _double_clicked(self, index: int) -> None:
        """A double click fits the view; the dot its first click painted is taken back."""
        last, self._last_click = self._last_click, None
        if last is None or last[0] != index or last[2].elapsed() > QApplication.doubleClickInterval() + 100:
            return
        stack = self.stacks[index]
        if stack.index() > 0 and stack.command(stack.index() - 1) is last[1]:
            last[1].drop_on_undo = True  # undone and dropped: no redo entry for a dot nobody meant
            stack.undo()

    def _polygon_closed(self, index: int, points, fill: bool) -> None:
        edit = self.session.fill_polygon(index, points, fill)
        if edit is not None and edit.changed_pixels:
            self.push(index, edit, "Polygon" if fill else "Polygon erase")

    def push(self, index: int, edit, text: str) -> MaskEditCommand:
        """Put an edit of view ``index`` that is already applied on that view's undo stack."""
        command = MaskEditCommand(self, index, edit, text, applied=True)
        self.activate_view(index)
        self.stacks[index].push(command)
        return command

    def reset_mask(self, index: int, source: str) -> None:
        """Replace a mask with the proposal, the case's mask file or nothing (undoable)."""
        if index >= len(self.session.views):
            return
        try:
            if source == "case file":
                mask = self.session.case_mask(index)
                if mask is None:
                    return
            else:
                mask = np.zeros_like(self.session.views[index].mask)
            edit = self.session.replace_mask(index, mask, source)
        except Exception as error:  # noqa: BLE001
            self.window.report_error(error)
            return
        if edit is not None:
            self.push(index, edit, f"Mask: {source}")

    def mask_changed(self, index: int, edit) -> None:
        """Called by undo commands and edits: redraw the changed region and the workflow state."""
        mask = self.session.views[index].mask
        self.window.radiograph_panels[index].view.update_mask_region(edit.row0, edit.col0, mask[edit.region])
        self.refresh()
        self.window.register_step.refresh()
        self.window.refresh_steps()
        self.window.status(self.window.register_step.readiness())

    def set_mask_confirmed(self, index: int, confirmed: bool) -> None:
        w = self.window
        if index >= len(self.session.views):
            return
        try:
            self.session.set_confirmed(index, confirmed)
        except HipAtlasError as error:
            w.report_error(error)
        self.refresh()
        w.register_step.refresh()
        w.refresh_steps()
        w.status(w.register_step.readiness())

    # ---------------------------------------------------------------- proposals
    def propose_if_needed(self) -> None:
        waiting = self.session.views_awaiting_proposal
        if waiting and self.settings.auto_propose:
            self.start_mask_proposal(waiting, automatic=True)
        elif waiting:
            names = " and ".join(self.session.views[i].name for i in waiting)
            self.proposal_status.setText(f"No mask file for {names}: press Propose for the atlas-based "
                                         "proposal, or draw the femur (polygon or brush).")

    def start_mask_proposal(self, indices: Sequence[int], automatic: bool = False) -> bool:
        """Propose masks from the atlas (model + image edges) in the background for ``indices``.

        ``automatic``: started on opening a case; the proposal then replaces only masks nobody
        has edited or confirmed meanwhile, and a failure is shown in the panel, not in a dialog.
        """
        w = self.window
        if self.proposal_worker is not None or w.register_step.worker is not None or not self.session.has_case:
            return False
        try:
            job = self.session.mask_proposal_job(model=self.settings.model_path or None)
        except Exception as error:  # noqa: BLE001
            w.report_error(error)
            return False
        worker = GeneratorWorker(job, self)
        indices = list(indices)
        session = self.session  # a proposal must never land in a case opened meanwhile
        worker.progress.connect(lambda fraction, message: (
            self.proposal_progress.setValue(int(1000 * max(0.0, min(1.0, fraction)))),
            self.proposal_status.setText(message)))
        worker.succeeded.connect(lambda masks: self._on_proposed(masks, indices, automatic)
                                 if self.session is session else None)
        worker.cancelled.connect(lambda: self.proposal_status.setText("Mask proposal stopped."))
        worker.errored.connect(lambda error: self._on_proposal_failed(error, automatic))
        worker.done.connect(self._on_proposal_done)
        self.proposal_worker = worker
        self._show_proposal_progress(True)
        self.proposal_status.setText("Proposing femur masks from the atlas\u2026")
        worker.start()
        w.register_step.refresh()
        return True

    def cancel_mask_proposal(self) -> None:
        if self.proposal_worker is not None:
            self.proposal_worker.cancel()

    def _on_proposed(self, masks, indices: Sequence[int], automatic: bool) -> None:
        views = self.session.views
        if len(masks) != len(views):
            self._on_proposal_failed(f"the proposal gave {len(masks)} masks for {len(views)} views", automatic)
            return
        awaiting = set(self.session.views_awaiting_proposal)
        applied = []
        try:
            for index in indices:
                if automatic and index not in awaiting:
                    continue  # edited or confirmed by the user while the proposal ran
                edit = self.session.replace_mask(index, masks[index], "proposed")
                if edit is not None:
                    self.push(index, edit, "Mask proposal")
                applied.append(views[index].name)
        except Exception as error:  # noqa: BLE001
            self.window.report_error(error)
        self.refresh_view_headers()
        self.proposal_status.setText(
            ("Proposed masks for " + " and ".join(applied) + ": check them, correct them if needed and confirm.")
            if applied else "Proposal finished; your edited masks were kept.")

    def _on_proposal_failed(self, error, automatic: bool) -> None:
        message = first_line(error)
        if automatic:
            log.warning("automatic mask proposal failed: %s", message)
            self.proposal_status.setText(f"Automatic mask proposal unavailable ({message}). Draw the "
                                         "femur with the polygon or brush tool.")
        else:
            self.proposal_status.setText("Mask proposal failed.")
            self.window.report_error(error)

    def _on_proposal_done(self) -> None:
        outcome = release_worker(self, "proposal_worker")
        if outcome is None:
            return
        self._show_proposal_progress(False)
        self.window.register_step.refresh()
        self.window.proposal_finished.emit(outcome)

    def _show_proposal_progress(self, visible: bool) -> None:
        self.proposal_progress.setVisible(visible)
        self.proposal_cancel.setVisible(visible)
        if not visible:
            self.proposal_progress.setValue(0)

    def stop_proposal(self, wait_ms: int = 30_000) -> None:
        if self.proposal_worker is not None:
            self.proposal_worker.cancel()
            if not self.proposal_worker.wait(wait_ms):
                log.error("the mask proposal thread did not stop within %d s", wait_ms // 1000)

    def shutdown(self) -> None:
        self.stop_proposal(60_000)
        self.proposal_worker = None

