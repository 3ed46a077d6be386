"""The planning workstation's main window: wires the workflow steps to the viewers and menus.

Layout: a "research use only" banner on top; on the left the workflow steps (Load, Masks,
Register, Review, Measure, Template, Export; one module each in :mod:`app.steps`) and the panel of
the current step; on the right the viewers (Radiographs with masks, overlays and measurement
graphics, 3D, linked Slices, Template: the Template step's 3D view and radiographs).
The window owns the Qt-free :class:`Session`, the viewers, the menus, the project file, errors,
autosave and shutdown; each step owns its panel and the slots that act on it.
"""

from __future__ import annotations

import logging
import os
import pathlib
import traceback

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QImage, QUndoGroup
from PySide6.QtWidgets import (QDialog, QHBoxLayout, QLabel, QListWidget, QListWidgetItem, QMainWindow,
                               QMessageBox, QPushButton, QSplitter, QStackedWidget, QTabWidget, QVBoxLayout, QWidget)

from app.dialogs import SettingsDialog, about_html, shortcuts_html, show_user_guide
from app.isolated import WorkerProcess
from app.menus import build_menus
from app.recovery_ui import AutosaveKeeper
from app.screenshots import window_screenshot
from app.session import RESEARCH_NOTICE, Session, describe_model
from app.settings import Settings
from app.steps import STEP_CLASSES, STEPS
from app.steps.base import first_line
from app.style import style_sheet
from app.template_panel import TemplatePanel
from app.views.radiograph_view import RadiographPanel
from app.views.slice_view import SlicePanel
from app.views.surface_view import SurfaceView
from app.workers import collect_garbage_on_the_gui_thread
from inference import __version__
from inference.errors import HipAtlasError

log = logging.getLogger(__name__)

#: The surgeon's walk-through (Help > User guide).
USER_GUIDE = pathlib.Path(__file__).resolve().parents[1] / "docs" / "user-guide.md"


class MainWindow(QMainWindow):
    """The planning workstation window.

    Parameters
    ----------
    settings : Settings, optional
    session : Session, optional
        Defaults to a new session; tests inject one with a small ``register_fn``.
    interactive : bool
        False (tests, ``--quit-after-register``): never block on a question; errors are logged and
        collected in :attr:`errors` (and still shown in a non-modal dialog).
    """

    registration_finished = Signal(str)   # "finished", "cancelled" or "errored"
    error_reported = Signal(str)          # the one-line message of every reported error
    closed = Signal()                     # after the window has shut down (close accepted)
    proposal_finished = Signal(str)       # a mask proposal ended: "finished", "cancelled", "errored"

    def __init__(self, settings: Settings | None = None, session: Session | None = None, *, interactive: bool = True):
        super().__init__()
        collect_garbage_on_the_gui_thread()  # never in a worker thread (app.workers)
        self.settings = settings or Settings()
        self.session = session or Session()
        self.interactive = interactive
        self.errors: list[str] = []
        self.last_error_box: QMessageBox | None = None
        #: Undo/redo act on the current step's own history (masks, landmarks), never another's.
        self.undo_group = QUndoGroup(self)
        #: The registration and mask proposals run here, one job after the other; the model it
        #: loads stays loaded for the next job (restarted if it dies).
        self.worker_process = WorkerProcess()
        self.session.runner = self.worker_process.run
        self._closing = False
        self.setWindowTitle("HipAtlas planning workstation")
        self.setStyleSheet(style_sheet())
        self.resize(1500, 920)
        self._build_viewers()
        self.step_panels = {cls.name: cls(self) for cls in STEP_CLASSES}
        (self.load_step, self.masks_step, self.register_step, self.review_step, self.measure_step,
         self.template_step, self.export_step) = self.step_panels.values()
        for panel in self.radiograph_panels:
            self.masks_step.connect_view(panel)
        for stack in (*self.masks_step.stacks, self.measure_step.stack, self.template_step.stack):
            self.undo_group.addStack(stack)
        self._build_layout()
        self.actions = build_menus(self)
        self.rebuild_recent_menu()
        self.autosave = AutosaveKeeper(self)
        self.autosave.restart()
        self.refresh_all()

    # ================================================================== UI construction
    def _build_viewers(self) -> None:
        self.radiograph_panels = [RadiographPanel(i) for i in range(2)]
        self.radiographs = QSplitter(Qt.Orientation.Horizontal)
        for panel in self.radiograph_panels:
            self.radiographs.addWidget(panel)
            panel.view.cursor_moved.connect(lambda u, v, i=panel.index: self._cursor_moved(i, u, v))
        self.surface_view = SurfaceView()
        self.slice_panel = SlicePanel()
        self.slice_panel.cursor_changed.connect(self.surface_view.set_slice_point)
        self.viewers = QTabWidget()
        self.viewers.addTab(self.radiographs, "Radiographs")
        self.viewers.addTab(self.surface_view, "3D")
        self.viewers.addTab(self.slice_panel, "Slices")
        self.template_panel = TemplatePanel(self.session)  # its controls go to the Template step
        self.viewers.addTab(self.template_panel, "Template")

    def _build_layout(self) -> None:
        self.banner = QLabel("\u26a0  " + RESEARCH_NOTICE)
        self.banner.setObjectName("banner")
        self.banner.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.steps = QListWidget()
        self.steps.setObjectName("steps")
        self.steps.setFixedWidth(150)
        for number, name in enumerate(STEPS, 1):
            self.steps.addItem(QListWidgetItem(f"{number}  {name}"))
        self.steps.currentRowChanged.connect(self._step_changed)
        self.step_stack = QStackedWidget()
        self.step_stack.setMinimumWidth(420)
        for step in self.step_panels.values():
            self.step_stack.addWidget(step)
        left = QWidget()
        left_layout = QHBoxLayout(left)
        left_layout.setContentsMargins(0, 0, 0, 0)
        left_layout.setSpacing(0)
        left_layout.addWidget(self.steps)
        left_layout.addWidget(self.step_stack, 1)
        splitter = QSplitter(Qt.Orientation.Horizontal)
        splitter.addWidget(left)
        splitter.addWidget(self.viewers)
        splitter.setStretchFactor(1, 1)
        splitter.setSizes([590, 910])
        central = QWidget()
        layout = QVBoxLayout(central)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(0)
        layout.addWidget(self.banner)
        layout.addWidget(self._build_stale_banner())
        layout.addWidget(splitter, 1)
        self.setCentralWidget(central)
        self.status_message = QLabel("Open a case to start")
        self.statusBar().addWidget(self.status_message, 1)
        self.cursor_label = QLabel("")
        self.statusBar().addPermanentWidget(self.cursor_label)

    def _build_stale_banner(self) -> QWidget:
        """Shown while the result no longer matches the masks: register again or keep it."""
        self.stale_banner = QWidget()
        self.stale_banner.setObjectName("staleBanner")
        row = QHBoxLayout(self.stale_banner)
        row.setContentsMargins(10, 3, 10, 3)
        self.stale_text = QLabel("")
        self.stale_text.setWordWrap(True)
        row.addWidget(self.stale_text, 1)
        again = QPushButton("Register again")
        again.clicked.connect(lambda: self.go_to_step("Register"))
        self.keep_result_button = QPushButton("Keep the old result")
        self.keep_result_button.setToolTip("Use the registration result although the masks changed since")
        self.keep_result_button.clicked.connect(lambda: self.register_step.keep_result())
        row.addWidget(again)
        row.addWidget(self.keep_result_button)
        self.stale_banner.setVisible(False)
        return self.stale_banner

    # ================================================================== the public entry points
    def open_path(self, path: str | os.PathLike) -> bool:
        return self.load_step.open_path(path)

    def open_case_folder(self, folder: str | os.PathLike) -> bool:
        return self.load_step.open_case_folder(folder)

    def set_mask_confirmed(self, index: int, confirmed: bool) -> None:
        self.masks_step.set_mask_confirmed(index, confirmed)

    def start_registration(self) -> bool:
        return self.register_step.start_registration()

    # ================================================================== refresh
    def refresh_all(self) -> None:
        self.load_step.refresh()
        self.masks_step.refresh()
        self.register_step.refresh()
        self.refresh_result()
        self.refresh_steps()

    def refresh_result(self) -> None:
        self.review_step.refresh()
        self.register_step.show_result(self.session.result)
        self.measure_step.refresh()
        self.template_step.refresh()
        self.review_step.apply_overlay_toggles()

    def refresh_steps(self) -> None:
        s = self.session
        stale, plan_stale = self.register_step.stale_reason(), self.template_step.stale_reason()
        enabled = {"Load": True, "Masks": s.has_case, "Register": s.has_case,
                   **dict.fromkeys(("Review", "Measure", "Template", "Export"), s.result is not None)}
        done = {"Load": s.has_case, "Masks": s.all_confirmed, **dict.fromkeys(("Register", "Review"), s.result is not None),
                "Measure": bool(s.measurements), "Template": bool(s.template_plan), "Export": False}
        for row, name in enumerate(STEPS):
            item = self.steps.item(row)
            flags = Qt.ItemFlag.ItemIsSelectable | Qt.ItemFlag.ItemIsEnabled if enabled[name] else Qt.ItemFlag.NoItemFlags
            item.setFlags(flags)
            # a mark, not only a colour: done, out of date, or the step's number
            why = {"Register": stale, "Review": stale, "Measure": stale, "Template": stale or plan_stale}.get(name)
            mark = "!" if why else "\u2713" if done[name] else str(row + 1)
            item.setText(f"{mark}  {name}")
            item.setToolTip(f"Out of date: {why}" if why else "")
        self.stale_banner.setVisible(stale is not None)
        if stale:
            self.stale_text.setText(f"\u26a0  Results out of date: {stale}. Register again, or keep the old result.")
        self.export_step.refresh()
        if self.steps.currentRow() < 0:
            self.steps.setCurrentRow(0)
        title = "HipAtlas planning workstation"
        if s.has_case:
            title = f"{s.case_label} \u2014 {title}"
            if s.project_path:
                title = f"{s.project_path.name} \u2014 {title}"
            if s.dirty:
                title = "* " + title
        self.setWindowTitle(title)
        self.actions["save"].setEnabled(s.has_case)
        self.actions["save_as"].setEnabled(s.has_case)
        self.actions["export"].setEnabled(self.export_step.export_button.isEnabled())

    # ================================================================== steps
    def current_step(self) -> str:
        row = self.steps.currentRow()
        return STEPS[row] if 0 <= row < len(STEPS) else "Load"

    def go_to_step(self, name: str) -> None:
        row = STEPS.index(name)
        if self.steps.item(row).flags() & Qt.ItemFlag.ItemIsEnabled:
            self.steps.setCurrentRow(row)

    def _step_changed(self, row: int) -> None:
        if row < 0:
            return
        self.step_stack.setCurrentIndex(row)
        step = self.step_stack.widget(row)
        self.undo_group.setActiveStack(getattr(step, "stack", None))
        self.viewers.setCurrentIndex(step.viewer)
        editing = step.name == "Masks"
        for panel in self.radiograph_panels:
            panel.view.set_editable(editing)
        if editing and not any(b.isChecked() for b in self.masks_step.tool_buttons.values()):
            self.masks_step.set_tool("brush")
        self.review_step.apply_overlay_toggles()

    def _cursor_moved(self, index: int, u: float, v: float) -> None:
        s = self.session
        if index < len(s.views):
            rows, cols = s.views[index].mask.shape
            ui, vi = int(round(u)), int(round(v))
            if 0 <= ui < cols and 0 <= vi < rows:
                self.cursor_label.setText(f"{s.views[index].name}  u {ui}  v {vi}  "
                                          f"value {float(s.case.views[index].image.pixels[vi, ui]):.4g}")

    # ================================================================== session, project, recent files
    def may_discard(self) -> bool:
        if not self.session.dirty or not self.session.has_case or not self.interactive:
            return True
        answer = QMessageBox.question(self, "Unsaved changes", "The open case has unsaved changes. Save them first?",
                                      QMessageBox.StandardButton.Save | QMessageBox.StandardButton.Discard
                                      | QMessageBox.StandardButton.Cancel)
        if answer == QMessageBox.StandardButton.Save:
            return self.export_step.save_project()
        return answer == QMessageBox.StandardButton.Discard

    def replace_session(self, session: Session) -> None:
        self.masks_step.stop_proposal()
        old = self.session
        self.session = session
        if old is not session:
            old.close()
        session.runner = self.worker_process.run
        for stack in (*self.masks_step.stacks, self.measure_step.stack, self.template_step.stack):
            stack.clear()
        self.register_step.session_replaced()
        self.refresh_all()

    def remember(self, path) -> None:
        self.settings.add_recent(path)
        self.settings.last_folder = str(pathlib.Path(path).resolve().parent)
        self.rebuild_recent_menu()

    def rebuild_recent_menu(self) -> None:
        self.recent_menu.clear()
        recent = self.settings.recent_files
        for path in recent:
            act = self.recent_menu.addAction(path)
            act.triggered.connect(lambda _=False, p=path: self._open_recent(p))
        self.recent_menu.setEnabled(bool(recent))

    def _open_recent(self, path: str) -> None:
        if not pathlib.Path(path).exists():
            self.settings.remove_recent(path)
            self.rebuild_recent_menu()
            self.report_error(f"{path}: no longer exists; removed from the recent files")
            return
        self.open_path(path)

    def screenshot(self) -> QImage:
        """The whole window as shown (the 3D views' OpenGL pixels included)."""
        return window_screenshot(self)

    # ================================================================== errors, dialogs
    def report_error(self, error: BaseException | str) -> None:
        """The one place errors reach the user: a dialog with the one-line message."""
        expected = isinstance(error, (HipAtlasError, str))
        message = first_line(error) if expected else f"Unexpected error: {type(error).__name__}: {first_line(error)}"
        self.errors.append(message)
        log.error("%s", message)
        self.status(message)
        box = QMessageBox(QMessageBox.Icon.Critical if not expected else QMessageBox.Icon.Warning,
                          "HipAtlas", message, QMessageBox.StandardButton.Ok, self)
        if isinstance(error, BaseException) and not expected:
            box.setDetailedText("".join(traceback.format_exception(error)))
        box.setWindowModality(Qt.WindowModality.WindowModal)
        box.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        box.open()
        self.last_error_box = box
        self.error_reported.emit(message)

    def show_about(self) -> None:
        QMessageBox.about(self, "About HipAtlas", about_html(self.settings.model_path or None))

    def about_text(self) -> str:
        model = describe_model(self.settings.model_path or None)
        return f"HipAtlas {__version__}; model {model.get('id', model.get('error'))}"

    def show_user_guide(self) -> None:
        show_user_guide(self, USER_GUIDE)

    def show_shortcuts(self) -> None:
        QMessageBox.information(self, "Keyboard shortcuts", shortcuts_html(self.actions.values()))

    def edit_settings(self) -> None:
        dialog = SettingsDialog(self.settings, self)
        if dialog.exec() == QDialog.DialogCode.Accepted:
            dialog.apply()
            self.autosave.restart()
            self.register_step.refresh()
            self.measure_step.refresh()

    def status(self, message: str) -> None:
        self.status_message.setText(message)

    # ================================================================== closing
    def shutdown(self) -> None:
        """Stop and join the worker, release VTK, delete the session's work files."""
        if self._closing:
            return
        self._closing = True
        self.autosave.timer.stop()
        for step in self.step_panels.values():
            step.shutdown()
        self.worker_process.close()
        self.surface_view.close_plotter()
        self.session.close()
        self.autosave.stop()
        self.settings.sync()

    def closeEvent(self, event) -> None:
        if self.interactive and not self._closing and not self.may_discard():
            event.ignore()
            return
        self.shutdown()
        super().closeEvent(event)
        self.closed.emit()
