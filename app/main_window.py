"""The planning workstation's main window: a guided workflow over a Qt-free :class:`Session`.

Layout: a "research use only" banner on top; on the left the workflow steps (Load, Masks,
Register, Review, Measure, Export) and the panel of the current step; on the right the viewers
(Radiographs with masks and overlays, 3D, linked Slices). Slots only translate between widgets and
session calls; numerical work lives in :mod:`app.session`, :mod:`app.masks`, :mod:`app.imaging`
and :mod:`inference`. Registration runs in a :class:`app.workers.GeneratorWorker`.
"""

from __future__ import annotations

import logging
import os
import pathlib
import traceback
from typing import Sequence

import numpy as np
from PySide6.QtCore import Qt, QTimer, Signal
from PySide6.QtGui import QAction, QImage, QKeySequence, QPainter, QUndoCommand, QUndoStack
from PySide6.QtWidgets import (QAbstractItemView, QApplication, QCheckBox, QComboBox, QDialog, QDialogButtonBox,
                               QDoubleSpinBox, QFileDialog, QFormLayout, QGridLayout, QGroupBox,
                               QHBoxLayout, QHeaderView, QLabel, QLineEdit, QListWidget, QListWidgetItem,
                               QMainWindow, QMessageBox, QPlainTextEdit, QProgressBar, QPushButton,
                               QSpinBox, QSplitter, QStackedWidget, QTableWidget, QTableWidgetItem,
                               QTabWidget, QToolButton, QVBoxLayout, QWidget, QButtonGroup)

from app import project as project_io
from app.session import (RESEARCH_NOTICE, ExportOptions, RadiographImport, Session, describe_model,
                         landmark_label, measurement_rows)
from app.settings import Settings
from app.template_panel import TemplatePanel
from app.views.radiograph_view import RadiographPanel
from app.views.slice_view import SlicePanel
from app.views.surface_view import SurfaceView
from app.workers import GeneratorWorker
from inference import __version__
from inference.errors import HipAtlasError
from inference.measure import caveat_lines as measure_caveats

log = logging.getLogger(__name__)

STEPS = ("Load", "Masks", "Register", "Review", "Measure", "Export")
VIEWER_FOR_STEP = {"Load": 0, "Masks": 0, "Register": 0, "Review": 1, "Measure": 1, "Export": 1}

STYLE = """
QMainWindow, QWidget { background: #1E232B; color: #D8DEE9; font-size: 10pt; }
QLabel#banner { background: #B3261E; color: white; font-weight: bold; padding: 5px; font-size: 10.5pt; }
QLabel#viewTitle { font-weight: bold; color: #ECEFF4; }
QLabel#viewDetails, QLabel#hint { color: #9AA4B2; font-size: 9pt; }
QLabel#stepTitle { font-size: 14pt; font-weight: bold; color: #ECEFF4; padding: 2px 0 6px 0; }
QListWidget#steps { background: #161A20; border: none; font-size: 11pt; outline: none; }
QListWidget#steps::item { padding: 9px 10px; border-left: 3px solid transparent; }
QListWidget#steps::item:selected { background: #2B3340; border-left: 3px solid #4FC3F7; color: white; }
QListWidget#steps::item:disabled { color: #5B6472; }
QPushButton, QToolButton { background: #2E3440; border: 1px solid #3B4252; border-radius: 4px; padding: 5px 10px; }
QPushButton:hover, QToolButton:hover { background: #3B4252; }
QPushButton:disabled { color: #5B6472; }
QPushButton#primary { background: #0277BD; border-color: #0288D1; color: white; font-weight: bold; }
QPushButton#primary:disabled { background: #263238; color: #5B6472; }
QToolButton:checked { background: #0277BD; color: white; }
QTableWidget { background: #161A20; gridline-color: #2E3440; alternate-background-color: #1B2027; }
QHeaderView::section { background: #2E3440; color: #D8DEE9; border: none; padding: 4px; }
QTabWidget::pane { border: none; }
QTabBar::tab { background: #161A20; padding: 6px 16px; border: none; }
QTabBar::tab:selected { background: #2B3340; color: white; border-bottom: 2px solid #4FC3F7; }
QProgressBar { border: 1px solid #3B4252; border-radius: 4px; text-align: center; background: #161A20; }
QProgressBar::chunk { background: #0288D1; }
QGroupBox { border: 1px solid #2E3440; border-radius: 4px; margin-top: 14px; padding-top: 6px; }
QGroupBox::title { subcontrol-origin: margin; left: 8px; color: #9AA4B2; }
QLineEdit, QSpinBox, QDoubleSpinBox, QComboBox, QPlainTextEdit { background: #161A20; border: 1px solid #3B4252; border-radius: 3px; padding: 2px; }
QStatusBar { background: #161A20; color: #9AA4B2; }
QMenuBar { background: #161A20; } QMenuBar::item:selected { background: #2B3340; }
QMenu { background: #20252D; border: 1px solid #3B4252; } QMenu::item:selected { background: #2B3340; }
QSplitter::handle { background: #2E3440; }
QCheckBox { spacing: 7px; }
QCheckBox::indicator { width: 14px; height: 14px; border: 1px solid #6B7686; border-radius: 3px; background: #161A20; }
QCheckBox::indicator:checked { background: #0288D1; border-color: #4FC3F7; image: none; }
QCheckBox::indicator:disabled { border-color: #3B4252; }
"""


#: Short names of calibration sources for the case table (the tooltip has the details).
CALIBRATION_LABELS = {"case.json projection_matrix": "case.json matrix", "dicom-tags": "DICOM tags",
                      "calibration-json": "calibration file"}


def _calibration_tooltip(calibration: dict) -> str:
    lines = [f"source: {calibration.get('source', 'unknown')}"]
    for key, value in calibration.items():
        if key != "source" and not isinstance(value, (dict, list)):
            lines.append(f"{key}: {value}")
    for tag in calibration.get("tags_used", []) or []:
        lines.append(f"tag: {tag}")
    for warning in calibration.get("warnings", []) or []:
        lines.append(f"warning: {warning}")
    return "\n".join(lines)


def first_line(error: BaseException | str) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _pacs_dialog():
    """app.pacs_dialog, imported when a PACS action is used (it loads pynetdicom)."""
    from app import pacs_dialog

    return pacs_dialog


class MaskEditCommand(QUndoCommand):
    """One mask edit of one view (a brush stroke, a polygon, a reset) on the undo stack."""

    def __init__(self, window: "MainWindow", index: int, edit, text: str, applied: bool):
        super().__init__(f"{text} ({window.session.views[index].name})")
        self._window, self._index, self._edit = window, index, edit
        self._skip_first_redo = applied

    def redo(self) -> None:
        if self._skip_first_redo:  # the stroke was painted live; pushing must not paint it again
            self._skip_first_redo = False
        else:
            self._window.session.apply_mask_edit(self._index, self._edit)
        self._window.mask_changed(self._index, self._edit)

    def undo(self) -> None:
        self._window.session.apply_mask_edit(self._index, self._edit, undo=True)
        self._window.mask_changed(self._index, self._edit)


class ImportDialog(QDialog):
    """Two radiographs, their names and calibrations, and the side."""

    def __init__(self, parent=None, start_folder: str = ""):
        super().__init__(parent)
        self.setWindowTitle("Import two radiographs")
        self._folder = start_folder
        form = QVBoxLayout(self)
        self.rows = []
        for index, default in enumerate(("AP", "LAT")):
            group = QGroupBox(f"View {index + 1}")
            grid = QGridLayout(group)
            name = QLineEdit(default)
            image = QLineEdit()
            image.setPlaceholderText("DICOM, PNG or TIFF radiograph")
            calibration = QLineEdit()
            calibration.setPlaceholderText("empty: geometry from the DICOM tags")
            browse_image = QPushButton("Browse\u2026")
            browse_cal = QPushButton("Browse\u2026")
            browse_image.clicked.connect(lambda _=False, e=image: self._browse(e, "Radiographs (*.dcm *.dicom *.png *.tif *.tiff *.nii *.nii.gz *.mha);;All files (*)"))
            browse_cal.clicked.connect(lambda _=False, e=calibration: self._browse(e, "Calibration JSON (*.json)"))
            grid.addWidget(QLabel("Name"), 0, 0)
            grid.addWidget(name, 0, 1, 1, 2)
            grid.addWidget(QLabel("Image"), 1, 0)
            grid.addWidget(image, 1, 1)
            grid.addWidget(browse_image, 1, 2)
            grid.addWidget(QLabel("Calibration"), 2, 0)
            grid.addWidget(calibration, 2, 1)
            grid.addWidget(browse_cal, 2, 2)
            form.addWidget(group)
            self.rows.append((name, image, calibration))
        side_row = QHBoxLayout()
        side_row.addWidget(QLabel("Femur side"))
        self.side = QComboBox()
        self.side.addItems(["right", "left"])
        side_row.addWidget(self.side)
        side_row.addStretch(1)
        form.addLayout(side_row)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel)
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        form.addWidget(buttons)

    def _browse(self, edit: QLineEdit, filters: str) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Choose a file", self._folder, filters)
        if path:
            edit.setText(path)
            self._folder = str(pathlib.Path(path).parent)

    def imports(self) -> list[RadiographImport]:
        return [RadiographImport(name=name.text().strip(), image_path=pathlib.Path(image.text().strip()),
                                 calibration_path=pathlib.Path(cal.text().strip()) if cal.text().strip() else None)
                for name, image, cal in self.rows]


class SettingsDialog(QDialog):
    def __init__(self, settings: Settings, parent=None):
        super().__init__(parent)
        self.setWindowTitle("Settings")
        self.settings = settings
        form = QFormLayout(self)
        self.model = QLineEdit(settings.model_path)
        self.model.setPlaceholderText("shipped model")
        browse = QPushButton("Browse\u2026")
        browse.clicked.connect(self._browse)
        row = QHBoxLayout()
        row.addWidget(self.model, 1)
        row.addWidget(browse)
        form.addRow("Model (.keras)", row)
        self.device = QComboBox()
        self.device.addItems(["cpu", "gpu"])
        self.device.setCurrentText(settings.device)
        form.addRow("Compute device", self.device)
        self.backend = QComboBox()
        self.backend.addItems(["auto", "tf", "onnx"])
        self.backend.setCurrentText(settings.backend)
        self.backend.setToolTip("Who runs the registration network: ONNX Runtime (onnx), TensorFlow (tf), "
                                "or auto (ONNX Runtime when the model has its .onnx export)")
        form.addRow("Inference backend", self.backend)
        note = QLabel("The device takes effect the next time the workstation starts.")
        note.setObjectName("hint")
        form.addRow("", note)
        self.units = QComboBox()
        self.units.addItems(["mm", "cm"])
        self.units.setCurrentText(settings.units)
        form.addRow("Length units", self.units)
        self.auto_propose = QCheckBox("Propose masks from the atlas when a case has none")
        self.auto_propose.setChecked(settings.auto_propose)
        form.addRow("Masks", self.auto_propose)
        self.autosave = QSpinBox()
        self.autosave.setRange(0, 60)
        self.autosave.setSuffix(" min")
        self.autosave.setSpecialValueText("off")
        self.autosave.setValue(int(round(settings.autosave_minutes)))
        form.addRow("Autosave every", self.autosave)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel)
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        form.addRow(buttons)

    def _browse(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Choose a model", "", "Keras model (*.keras)")
        if path:
            self.model.setText(path)

    def apply(self) -> None:
        self.settings.model_path = self.model.text().strip()
        self.settings.device = self.device.currentText()
        self.settings.backend = self.backend.currentText()
        self.settings.apply_backend()
        self.settings.units = self.units.currentText()
        self.settings.auto_propose = self.auto_propose.isChecked()
        self.settings.autosave_minutes = self.autosave.value()
        self.settings.sync()


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
        self.settings = settings or Settings()
        self.session = session or Session()
        self.interactive = interactive
        self.errors: list[str] = []
        self.last_error_box: QMessageBox | None = None
        self.worker: GeneratorWorker | None = None
        self.proposal_worker: GeneratorWorker | None = None
        self.undo_stack = QUndoStack(self)
        self.recovery = project_io.RecoveryStore(self.settings.recovery_dir)
        self._stroke_before: dict[int, np.ndarray] = {}
        self._closing = False
        self.setWindowTitle("HipAtlas planning workstation")
        self.setStyleSheet(STYLE)
        self.resize(1500, 920)
        self._build_ui()
        self._build_actions()
        self.autosave_timer = QTimer(self)
        self.autosave_timer.timeout.connect(self.autosave)
        self._restart_autosave()
        self.refresh_all()

    # ================================================================== UI construction
    def _build_ui(self) -> None:
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
        for builder in (self._build_load_panel, self._build_masks_panel, self._build_register_panel,
                        self._build_review_panel, self._build_measure_panel, self._build_export_panel):
            self.step_stack.addWidget(builder())

        self.radiograph_panels = [RadiographPanel(i) for i in range(2)]
        radiographs = QSplitter(Qt.Orientation.Horizontal)
        for panel in self.radiograph_panels:
            radiographs.addWidget(panel)
            panel.confirm_toggled.connect(lambda checked, i=panel.index: self.set_mask_confirmed(i, checked))
            view = panel.view
            view.stroke_started.connect(lambda i=panel.index: self._stroke_started(i))
            view.segment.connect(lambda u0, v0, u1, v1, i=panel.index: self._stroke_segment(i, u0, v0, u1, v1))
            view.stroke_finished.connect(lambda i=panel.index: self._stroke_finished(i))
            view.polygon_closed.connect(lambda points, fill, i=panel.index: self._polygon_closed(i, points, fill))
            view.cursor_moved.connect(lambda u, v, i=panel.index: self._cursor_moved(i, u, v))
            view.landmark_dragging.connect(lambda n, u, v, i=panel.index: self._landmark_dragging(i, n, u, v))
            # Queued: the slot rebuilds the handles, one of which is finishing its mouse event.
            view.landmark_dragged.connect(lambda n, u, v, i=panel.index: self._landmark_dragged(i, n, u, v),
                                          Qt.ConnectionType.QueuedConnection)
        self.surface_view = SurfaceView()
        # Queued: the handle's callback runs inside VTK's event processing, and the slot rebuilds
        # the handles.
        self.surface_view.landmark_moved.connect(self.move_landmark, Qt.ConnectionType.QueuedConnection)
        self.slice_panel = SlicePanel()
        self.slice_panel.cursor_changed.connect(self.surface_view.set_slice_point)
        self.viewers = QTabWidget()
        self.viewers.addTab(radiographs, "Radiographs")
        self.viewers.addTab(self.surface_view, "3D")
        self.viewers.addTab(self.slice_panel, "Slices")
        self.template_panel = TemplatePanel(self.session)  # implant templating (app/template_panel.py)
        self.viewers.addTab(self.template_panel, "Template")

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
        layout.addWidget(splitter, 1)
        self.setCentralWidget(central)
        self.status_message = QLabel("Open a case to start")
        self.statusBar().addWidget(self.status_message, 1)
        self.cursor_label = QLabel("")
        self.statusBar().addPermanentWidget(self.cursor_label)

    def _panel(self, title: str, hint: str) -> tuple[QWidget, QVBoxLayout]:
        panel = QWidget()
        layout = QVBoxLayout(panel)
        layout.setContentsMargins(12, 10, 12, 10)
        heading = QLabel(title)
        heading.setObjectName("stepTitle")
        layout.addWidget(heading)
        if hint:
            text = QLabel(hint)
            text.setObjectName("hint")
            text.setWordWrap(True)
            layout.addWidget(text)
        return panel, layout

    def _build_load_panel(self) -> QWidget:
        panel, layout = self._panel("Load a case", "Open a case folder (case.json with two calibrated "
                                    "radiographs), import two radiographs with their calibration, or "
                                    "open a saved project.")
        for text, slot in (("Open case folder\u2026", self.choose_case_folder),
                           ("Import two radiographs\u2026", self.choose_radiographs),
                           ("Open project\u2026", self.choose_project)):
            button = QPushButton(text)
            button.clicked.connect(slot)
            layout.addWidget(button)
        self.case_summary = QLabel("No case open")
        self.case_summary.setWordWrap(True)
        layout.addWidget(self.case_summary)
        self.case_table = self._table(["View", "Image", "Size (px)", "Calibration source"], stretch=(1, 3))
        layout.addWidget(self.case_table, 1)
        self.pair_label = QLabel("")
        self.pair_label.setWordWrap(True)
        self.pair_label.setObjectName("hint")
        layout.addWidget(self.pair_label)
        return panel

    def _build_masks_panel(self) -> QWidget:
        panel, layout = self._panel("Femur masks", "Check the femur mask on each radiograph, correct it with "
                                    "the brush, eraser or polygon (Shift + double-click: erase polygon), then "
                                    "tick \u201cMask confirmed\u201d on both views. Mouse wheel zooms, right-drag pans.")
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
        size_row.addWidget(self.brush_size)
        size_row.addStretch(1)
        layout.addLayout(size_row)
        history = QHBoxLayout()
        self.undo_button = QPushButton("Undo")
        self.redo_button = QPushButton("Redo")
        self.undo_button.clicked.connect(self.undo_stack.undo)
        self.redo_button.clicked.connect(self.undo_stack.redo)
        self.undo_stack.canUndoChanged.connect(self.undo_button.setEnabled)
        self.undo_stack.canRedoChanged.connect(self.redo_button.setEnabled)
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
        self.mask_next.clicked.connect(lambda: self.go_to_step("Register"))
        layout.addWidget(self.mask_next)
        layout.addStretch(1)
        return panel

    def _build_register_panel(self) -> QWidget:
        panel, layout = self._panel("Register", "The atlas is registered to both radiographs; this takes "
                                    "from seconds to a few minutes. The window stays usable meanwhile.")
        self.model_label = QLabel("")
        self.model_label.setWordWrap(True)
        self.model_label.setObjectName("hint")
        layout.addWidget(self.model_label)
        self.register_button = QPushButton("Register")
        self.register_button.setObjectName("primary")
        self.register_button.clicked.connect(self.start_registration)
        layout.addWidget(self.register_button)
        self.register_blocker = QLabel("")
        self.register_blocker.setObjectName("hint")
        self.register_blocker.setWordWrap(True)
        layout.addWidget(self.register_blocker)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1000)
        self.progress.setValue(0)
        self.progress.setFormat("")
        layout.addWidget(self.progress)
        self.progress_message = QLabel("")
        layout.addWidget(self.progress_message)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel_registration)
        layout.addWidget(self.cancel_button)
        self.warnings_box = QPlainTextEdit()
        self.warnings_box.setReadOnly(True)
        self.warnings_box.setPlaceholderText("Registration warnings appear here")
        self.warnings_box.setMaximumHeight(140)
        layout.addWidget(self.warnings_box)
        layout.addStretch(1)
        return panel

    def _build_review_panel(self) -> QWidget:
        panel, layout = self._panel("Review", "Check the reconstruction: the 3D surface with the warped atlas "
                                    "slices, the projected contour on each radiograph, and the linked slice "
                                    "views (click to move the cursor).")
        self.show_contours = QCheckBox("Contour on radiographs")
        self.show_masks = QCheckBox("Masks on radiographs")
        self.show_markers = QCheckBox("Measurement graphics on radiographs")
        for box in (self.show_contours, self.show_masks, self.show_markers):
            box.setChecked(True)
            box.toggled.connect(self._overlay_toggles)
            layout.addWidget(box)
        buttons = QHBoxLayout()
        for text, index in (("Radiographs", 0), ("3D", 1), ("Slices", 2)):
            button = QPushButton(text)
            button.clicked.connect(lambda _=False, i=index: self.viewers.setCurrentIndex(i))
            buttons.addWidget(button)
        layout.addLayout(buttons)
        reset = QPushButton("Reset 3D camera")  # connected in _build_actions, once the 3D view exists
        self._reset_camera_button = reset
        layout.addWidget(reset)
        self.review_summary = QLabel("")
        self.review_summary.setWordWrap(True)
        layout.addWidget(self.review_summary)
        layout.addStretch(1)
        return panel

    def _build_measure_panel(self) -> QWidget:
        panel, layout = self._panel("Measure", "Values follow the landmarks: edit a landmark's coordinates, or "
                                    "drag its handle in the 3D view, and the measurements are recomputed. "
                                    "Shown in 3D as the head sphere (cyan), shaft axis (amber) and neck "
                                    "axis (green).")
        self.measure_table = self._table(["Quantity", "Value", "Unit"])
        layout.addWidget(self.measure_table, 2)
        title = QLabel("Landmarks (world LPS, mm)")
        title.setObjectName("viewTitle")
        layout.addWidget(title)
        self.landmark_table = self._table(["Landmark", "x", "y", "z"], stretch=(1, 2, 3))
        layout.addWidget(self.landmark_table, 3)
        self.landmark_spins: dict[str, list[QDoubleSpinBox]] = {}
        row = QHBoxLayout()
        self.drag_landmarks = QCheckBox("Drag landmarks in 3D")
        self.drag_landmarks.setToolTip("Show a handle on each landmark in the 3D view; drag it with the left button")
        self.drag_landmarks.toggled.connect(lambda on: self.surface_view.set_landmark_handles(on))
        row.addWidget(self.drag_landmarks)
        row.addStretch(1)
        self.reset_landmarks_button = QPushButton("Reset landmarks")
        self.reset_landmarks_button.clicked.connect(self.reset_landmarks)
        row.addWidget(self.reset_landmarks_button)
        layout.addLayout(row)
        return panel

    def _build_export_panel(self) -> QWidget:
        panel, layout = self._panel("Export", "Write the plan to a new folder. Files are written completely "
                                    "or not at all.")
        self.export_boxes = {}
        for key, text in (("surface_stl", "Femur surface (STL)"), ("nifti", "Label map and warped atlas (NIfTI)"),
                          ("measurements_json", "Measurements (JSON)"), ("measurements_csv", "Measurements (CSV)"),
                          ("pdf_report", "Planning report (PDF)")):
            box = QCheckBox(text)
            box.setChecked(True)
            self.export_boxes[key] = box
            layout.addWidget(box)
        self.anonymise_box = QCheckBox("Anonymise (remove patient identifiers from every file)")
        layout.addWidget(self.anonymise_box)
        self.export_button = QPushButton("Export\u2026")
        self.export_button.setObjectName("primary")
        self.export_button.clicked.connect(self.choose_export_folder)
        layout.addWidget(self.export_button)
        save = QPushButton("Save project\u2026")
        save.clicked.connect(self.save_project_as)
        layout.addWidget(save)
        self.export_summary = QLabel("")
        self.export_summary.setWordWrap(True)
        self.export_summary.setObjectName("hint")
        layout.addWidget(self.export_summary)
        layout.addStretch(1)
        return panel

    @staticmethod
    def _table(headers: Sequence[str], stretch: Sequence[int] = (0,)) -> QTableWidget:
        """A read-only table; columns in ``stretch`` share the free width, others fit their text."""
        table = QTableWidget(0, len(headers))
        table.setHorizontalHeaderLabels(list(headers))
        table.verticalHeader().setVisible(False)
        table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        table.setSelectionMode(QAbstractItemView.SelectionMode.NoSelection)
        table.setAlternatingRowColors(True)
        table.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        header = table.horizontalHeader()
        for column in range(len(headers)):
            header.setSectionResizeMode(column, QHeaderView.ResizeMode.Stretch if column in stretch
                                        else QHeaderView.ResizeMode.ResizeToContents)
        return table

    def _build_actions(self) -> None:
        menu = self.menuBar()
        file_menu = menu.addMenu("&File")
        self.actions: dict[str, QAction] = {}

        def action(key, text, slot, shortcut=None, menu_=file_menu, tip=None):
            act = QAction(text, self)
            if shortcut:
                act.setShortcut(QKeySequence(shortcut))
            if tip:
                act.setStatusTip(tip)
            act.triggered.connect(slot)
            menu_.addAction(act)
            self.actions[key] = act
            return act

        action("open_case", "Open case folder\u2026", self.choose_case_folder, "Ctrl+O")
        action("import", "Import two radiographs\u2026", self.choose_radiographs, "Ctrl+I")
        action("open_pacs", "Open from PACS\u2026", lambda: _pacs_dialog().open_from_pacs(self))
        action("open_project", "Open project\u2026", self.choose_project, "Ctrl+Shift+O")
        self.recent_menu = file_menu.addMenu("Open recent")
        file_menu.addSeparator()
        action("save", "Save project", self.save_project, QKeySequence.StandardKey.Save)
        action("save_as", "Save project as\u2026", self.save_project_as, "Ctrl+Shift+S")
        action("export", "Export\u2026", self.choose_export_folder, "Ctrl+E")
        action("send_pacs", "Send to PACS\u2026", lambda: _pacs_dialog().send_to_pacs(self))
        file_menu.addSeparator()
        action("settings", "Settings\u2026", self.edit_settings, "Ctrl+,")
        file_menu.addSeparator()
        action("quit", "Quit", self.close, "Ctrl+Q")

        edit_menu = menu.addMenu("&Edit")
        undo = self.undo_stack.createUndoAction(self, "Undo")
        undo.setShortcut(QKeySequence.StandardKey.Undo)
        redo = self.undo_stack.createRedoAction(self, "Redo")
        redo.setShortcuts([QKeySequence.StandardKey.Redo, QKeySequence("Ctrl+Y")])
        edit_menu.addAction(undo)
        edit_menu.addAction(redo)
        self.actions["undo"], self.actions["redo"] = undo, redo
        edit_menu.addSeparator()
        for key, text, shortcut in (("navigate", "Pan tool", "N"), ("brush", "Brush", "B"),
                                    ("eraser", "Eraser", "E"), ("polygon", "Polygon", "P")):
            action(f"tool_{key}", text, lambda _=False, t=key: self.set_tool(t), shortcut, edit_menu)
        action("brush_bigger", "Larger brush", lambda: self.brush_size.setValue(int(self.brush_size.value() * 1.25) + 1),
               "]", edit_menu)
        action("brush_smaller", "Smaller brush", lambda: self.brush_size.setValue(max(1, int(self.brush_size.value() / 1.25))),
               "[", edit_menu)

        work_menu = menu.addMenu("&Workflow")
        for number, name in enumerate(STEPS, 1):
            action(f"step_{name.lower()}", f"{number}. {name}", lambda _=False, n=name: self.go_to_step(n),
                   f"Ctrl+{number}", work_menu)
        work_menu.addSeparator()
        action("register", "Register", self.start_registration, "Ctrl+R", work_menu)
        action("cancel", "Cancel registration", self.cancel_registration, "Esc", work_menu)
        view_menu = menu.addMenu("&View")
        action("reset_camera", "Reset 3D camera", self.surface_view.reset_camera, "R", view_menu)
        self._reset_camera_button.clicked.connect(self.surface_view.reset_camera)
        for index, name in enumerate(("Radiographs", "3D", "Slices")):
            action(f"viewer_{index}", name, lambda _=False, i=index: self.viewers.setCurrentIndex(i),
                   f"Alt+{index + 1}", view_menu)
        help_menu = menu.addMenu("&Help")
        action("shortcuts", "Keyboard shortcuts", self.show_shortcuts, "F1", help_menu)
        action("about", "About HipAtlas", self.show_about, None, help_menu)
        self._rebuild_recent_menu()

    # ================================================================== refresh
    def refresh_all(self) -> None:
        self._refresh_case()
        self._refresh_masks_panel()
        self._refresh_register_panel()
        self._refresh_result()
        self._refresh_steps()

    def _refresh_steps(self) -> None:
        s = self.session
        enabled = {"Load": True, "Masks": s.has_case, "Register": s.has_case,
                   "Review": s.result is not None, "Measure": s.result is not None, "Export": s.result is not None}
        done = {"Load": s.has_case, "Masks": s.all_confirmed, "Register": s.result is not None,
                "Review": s.result is not None, "Measure": bool(s.measurements), "Export": False}
        for row, name in enumerate(STEPS):
            item = self.steps.item(row)
            flags = Qt.ItemFlag.ItemIsSelectable | Qt.ItemFlag.ItemIsEnabled if enabled[name] else Qt.ItemFlag.NoItemFlags
            item.setFlags(flags)
            mark = "\u2713" if done[name] else str(row + 1)
            item.setText(f"{mark}  {name}")
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
        self.actions["export"].setEnabled(s.result is not None)

    def _refresh_case(self) -> None:
        s = self.session
        self.case_table.setRowCount(0)
        if not s.has_case:
            self.case_summary.setText("No case open")
            self.pair_label.setText("")
            for panel in self.radiograph_panels:
                panel.view.clear_content()
                panel.set_header("No case open", "")
            return
        summary = f"<b>{s.case_label}</b> \u2014 {s.case.side} femur"
        if s.patient:
            who = ", ".join(f"{k}: {v}" for k, v in s.patient.items() if k in ("PatientName", "PatientID"))
            summary += f"<br><span style='color:#9AA4B2'>{who}</span>" if who else ""
        self.case_summary.setText(summary)
        for index, (state, view) in enumerate(zip(s.views, s.case.views)):
            self.case_table.insertRow(index)
            rows, cols = view.image.shape
            source = state.calibration.get("source", "unknown")
            for column, text in enumerate((state.name, view.image_path.name, f"{cols} \u00d7 {rows}",
                                           CALIBRATION_LABELS.get(source, source))):
                item = QTableWidgetItem(text)
                item.setToolTip(_calibration_tooltip(state.calibration) if column == 3 else text)
                self.case_table.setItem(index, column, item)
            panel = self.radiograph_panels[index]
            panel.view.set_image(state.display)
            panel.view.set_intensities(view.image.pixels)
            panel.view.set_mask(state.mask)
            panel.view.set_editable(self._current_step() == "Masks")
        report = s.pair_report
        if report is not None:
            text = f"Views {report.angle_deg:.0f}\u00b0 apart; central rays pass {report.closest_approach_mm:.0f} mm apart."
            if report.warnings:
                text += "<br><span style='color:#FFB74D'>" + "<br>".join(report.warnings) + "</span>"
            self.pair_label.setText(text)
        self._refresh_view_headers()

    def _refresh_view_headers(self) -> None:
        s = self.session
        for index, panel in enumerate(self.radiograph_panels):
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

    def _refresh_masks_panel(self) -> None:
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
            self._refresh_view_headers()

    def _refresh_register_panel(self) -> None:
        running = self.worker is not None
        blocker = self.session.register_blocker()
        if blocker is None and self.proposal_worker is not None:
            blocker = "wait for the mask proposal to finish (or stop it)"
        self.register_button.setEnabled(blocker is None and not running)
        self.actions["register"].setEnabled(blocker is None and not running)
        self.actions["cancel"].setEnabled(running)
        self.cancel_button.setEnabled(running)
        self.register_blocker.setText("" if blocker is None or running else f"To register: {blocker}.")
        model = self.settings.model_path or "shipped model"
        self.model_label.setText(f"Model: {model} \u2022 device: {self.settings.device.upper()}")
        for key in ("open_case", "import", "open_project"):
            self.actions[key].setEnabled(not running)

    def _refresh_result(self) -> None:
        s = self.session
        result = s.result
        if result is None:
            self.surface_view.clear()
            self.slice_panel.clear()
            for panel in self.radiograph_panels:
                panel.view.set_contour(None)
                panel.view.set_markers({})
            self.review_summary.setText("")
            self.warnings_box.setPlainText("")
            self._refresh_measurements()
            self.template_panel.set_session(s)
            return
        self.surface_view.set_result(result.surface_vertices, result.surface_faces, result.volume, result.grid)
        self.slice_panel.set_volume(result.volume, result.labels, result.grid)
        for index, panel in enumerate(self.radiograph_panels):
            if index < len(s.views):
                panel.view.set_contour(result.contours.get(s.views[index].name))
        self.warnings_box.setPlainText("\n".join(result.warnings) or "No warnings.")
        similarity = [f"{v.get('name')}: NCC {v['similarity_ncc']:.2f}" for v in result.report.get("views", [])
                      if isinstance(v, dict) and v.get("similarity_ncc") is not None]
        size = " \u00d7 ".join(str(n) for n in result.labels.shape[::-1])
        lines = [f"Surface: {len(result.surface_faces):,} triangles", f"Label grid: {size} voxels"]
        if similarity:
            lines.append("Similarity " + ", ".join(similarity))
        if result.warnings:
            lines.append(f"<span style='color:#FFB74D'>{len(result.warnings)} warning(s): see Register.</span>")
        self.review_summary.setText("<br>".join(lines))
        self._refresh_measurements()
        self._overlay_toggles()
        self.template_panel.set_session(s)  # loads when the Template tab is shown

    def _refresh_measurements(self) -> None:
        s = self.session
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
        self.surface_view.set_measurements(s.measurements, s.landmarks_mm)
        for index, panel in enumerate(self.radiograph_panels):
            panel.view.set_graphics(s.view_graphics(index) if index < len(s.views) else None)
        self._overlay_toggles()

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
                spin.valueChanged.connect(lambda value, n=name, a=axis: self._landmark_axis_edited(n, a, value))
                self.landmark_table.setCellWidget(row, axis + 1, spin)
                spins.append(spin)
            self.landmark_spins[name] = spins

    def _overlay_toggles(self, *_args) -> None:
        for panel in self.radiograph_panels:
            panel.view.set_contour_visible(self.show_contours.isChecked())
            panel.view.set_mask_visible(self.show_masks.isChecked() or self._current_step() == "Masks")
            panel.view.set_graphics_visible(self.show_markers.isChecked())

    # ================================================================== steps
    def _current_step(self) -> str:
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
        name = STEPS[row]
        self.viewers.setCurrentIndex(VIEWER_FOR_STEP[name])
        editing = name == "Masks"
        for panel in self.radiograph_panels:
            panel.view.set_editable(editing)
        if editing and not any(b.isChecked() for b in self.tool_buttons.values()):
            self.set_tool("brush")
        self._overlay_toggles()

    # ================================================================== load
    def choose_case_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Open case folder", self.settings.last_folder)
        if folder:
            self.open_case_folder(folder)

    def choose_radiographs(self) -> None:
        dialog = ImportDialog(self, self.settings.last_folder)
        if dialog.exec() == QDialog.DialogCode.Accepted:
            self.import_radiographs(dialog.imports(), dialog.side.currentText())

    def choose_project(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Open project", self.settings.last_folder,
                                              f"HipAtlas project (*{project_io.PROJECT_SUFFIX})")
        if path:
            self.open_project(path)

    def _may_discard(self) -> bool:
        if not self.session.dirty or not self.session.has_case or not self.interactive:
            return True
        answer = QMessageBox.question(self, "Unsaved changes", "The open case has unsaved changes. Save them first?",
                                      QMessageBox.StandardButton.Save | QMessageBox.StandardButton.Discard
                                      | QMessageBox.StandardButton.Cancel)
        if answer == QMessageBox.StandardButton.Save:
            return self.save_project()
        return answer == QMessageBox.StandardButton.Discard

    def _replace_session(self, session: Session) -> None:
        if self.proposal_worker is not None:
            self.proposal_worker.cancel()
            self.proposal_worker.wait(30_000)
        old = self.session
        self.session = session
        if old is not session:
            old.close()
        self.undo_stack.clear()
        self.refresh_all()

    def open_path(self, path: str | os.PathLike) -> bool:
        """Open a case folder or a project file (from the command line or the recent menu)."""
        path = pathlib.Path(path)
        if path.is_dir():
            return self.open_case_folder(path)
        if not path.exists():
            self.report_error(f"{path}: no such case folder or project file")
            return False
        return self.open_project(path)

    def open_case_folder(self, folder: str | os.PathLike) -> bool:
        if self.worker is not None or not self._may_discard():
            return False
        try:
            with _busy():
                new = Session(**self.session.options())
                try:
                    new.open_case(folder)
                except BaseException:
                    new.close()
                    raise
        except Exception as error:  # noqa: BLE001 - bad files must never crash the workstation
            self.report_error(error)
            return False
        self._replace_session(new)
        self._remember(folder)
        self.go_to_step("Masks")
        self._status(f"Opened {new.case_label}: check and confirm both masks")
        self._propose_if_needed()
        return True

    def import_radiographs(self, imports: Sequence[RadiographImport], side: str) -> bool:
        if self.worker is not None or not self._may_discard():
            return False
        new = Session(**self.session.options())
        try:
            with _busy():
                new.import_radiographs(imports, side)
        except Exception as error:  # noqa: BLE001
            new.close()
            self.report_error(error)
            return False
        self._replace_session(new)
        self.settings.last_folder = str(pathlib.Path(imports[0].image_path).parent)
        self.go_to_step("Masks")
        self._status("Imported two radiographs: check and confirm both masks")
        self._propose_if_needed()
        return True

    def open_project(self, path: str | os.PathLike) -> bool:
        if self.worker is not None or not self._may_discard():
            return False
        try:
            with _busy():
                new = project_io.load_project(path, **self.session.options())
        except Exception as error:  # noqa: BLE001
            self.report_error(error)
            return False
        self._replace_session(new)
        self._remember(path)
        self.go_to_step("Review" if new.result is not None else "Masks")
        self._status(f"Opened project {pathlib.Path(path).name}")
        return True

    def _remember(self, path) -> None:
        self.settings.add_recent(path)
        self.settings.last_folder = str(pathlib.Path(path).resolve().parent)
        self._rebuild_recent_menu()

    def _rebuild_recent_menu(self) -> None:
        self.recent_menu.clear()
        recent = self.settings.recent_files
        for path in recent:
            act = self.recent_menu.addAction(path)
            act.triggered.connect(lambda _=False, p=path: self._open_recent(p))
        self.recent_menu.setEnabled(bool(recent))

    def _open_recent(self, path: str) -> None:
        if not pathlib.Path(path).exists():
            self.settings.remove_recent(path)
            self._rebuild_recent_menu()
            self.report_error(f"{path}: no longer exists; removed from the recent files")
            return
        self.open_path(path)

    # ================================================================== masks
    def set_tool(self, tool: str) -> None:
        for name, button in self.tool_buttons.items():
            button.setChecked(name == tool)
        for panel in self.radiograph_panels:
            panel.view.set_tool(tool)
            panel.view.brush_radius_px = float(self.brush_size.value())

    def _brush_size_changed(self, value: int) -> None:
        for panel in self.radiograph_panels:
            panel.view.brush_radius_px = float(value)

    def _stroke_started(self, index: int) -> None:
        self._stroke_before[index] = self.session.views[index].mask.copy()

    def _stroke_segment(self, index: int, u0: float, v0: float, u1: float, v1: float) -> None:
        view = self.radiograph_panels[index].view
        edit = self.session.paint(index, (u0, v0), (u1, v1), view.brush_radius_px, view.tool == "brush")
        if edit is not None:
            view.update_mask_region(edit.row0, edit.col0, edit.after)

    def _stroke_finished(self, index: int) -> None:
        before = self._stroke_before.pop(index, None)
        if before is None:
            return
        edit = self.session.stroke_edit(index, before)
        if edit is not None:
            tool = self.radiograph_panels[index].view.tool
            self.undo_stack.push(MaskEditCommand(self, index, edit, "Brush" if tool == "brush" else "Erase", applied=True))

    def _polygon_closed(self, index: int, points, fill: bool) -> None:
        edit = self.session.fill_polygon(index, points, fill)
        if edit is not None and edit.changed_pixels:
            self.undo_stack.push(MaskEditCommand(self, index, edit, "Polygon" if fill else "Polygon erase", applied=True))

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
            self.report_error(error)
            return
        if edit is not None:
            self.undo_stack.push(MaskEditCommand(self, index, edit, f"Mask: {source}", applied=True))

    # ---------------------------------------------------------------- mask proposals
    def _propose_if_needed(self) -> None:
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
        if self.proposal_worker is not None or self.worker is not None or not self.session.has_case:
            return False
        try:
            job = self.session.mask_proposal_job(model=self.settings.model_path or None)
        except Exception as error:  # noqa: BLE001
            self.report_error(error)
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
        self._refresh_register_panel()
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
        self.undo_stack.beginMacro("Atlas mask proposal")
        try:
            for index in indices:
                if automatic and index not in awaiting:
                    continue  # edited or confirmed by the user while the proposal ran
                edit = self.session.replace_mask(index, masks[index], "proposed")
                if edit is not None:
                    self.undo_stack.push(MaskEditCommand(self, index, edit, "Mask proposal", applied=True))
                applied.append(views[index].name)
        except Exception as error:  # noqa: BLE001
            self.report_error(error)
        finally:
            self.undo_stack.endMacro()
        self._refresh_view_headers()
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
            self.report_error(error)

    def _on_proposal_done(self) -> None:
        outcome = self._release_worker("proposal_worker")
        if outcome is None:
            return
        self._show_proposal_progress(False)
        self._refresh_register_panel()
        self.proposal_finished.emit(outcome)

    def _release_worker(self, attribute: str) -> str | None:
        """Join the finished worker thread held in ``attribute``, drop it and return its outcome
        (None when there was none)."""
        worker = getattr(self, attribute)
        if worker is None:
            return None
        worker.wait()  # run() has returned or is returning: join the thread before dropping it
        setattr(self, attribute, None)
        worker.deleteLater()
        return worker.outcome or "errored"

    def _show_proposal_progress(self, visible: bool) -> None:
        self.proposal_progress.setVisible(visible)
        self.proposal_cancel.setVisible(visible)
        if not visible:
            self.proposal_progress.setValue(0)

    def mask_changed(self, index: int, edit) -> None:
        """Called by undo commands and edits: redraw the changed region and the workflow state."""
        mask = self.session.views[index].mask
        self.radiograph_panels[index].view.update_mask_region(edit.row0, edit.col0, mask[edit.region])
        self._refresh_masks_panel()
        self._refresh_register_panel()
        self._refresh_steps()

    def set_mask_confirmed(self, index: int, confirmed: bool) -> None:
        if index >= len(self.session.views):
            return
        try:
            self.session.set_confirmed(index, confirmed)
        except HipAtlasError as error:
            self.report_error(error)
        self._refresh_masks_panel()
        self._refresh_register_panel()
        self._refresh_steps()
        if self.session.all_confirmed:
            self._status("Both masks confirmed: ready to register (Ctrl+R)")

    def _cursor_moved(self, index: int, u: float, v: float) -> None:
        s = self.session
        if index < len(s.views):
            rows, cols = s.views[index].mask.shape
            ui, vi = int(round(u)), int(round(v))
            if 0 <= ui < cols and 0 <= vi < rows:
                self.cursor_label.setText(f"{s.views[index].name}  u {ui}  v {vi}  "
                                          f"value {float(s.case.views[index].image.pixels[vi, ui]):.4g}")

    # ================================================================== registration
    def start_registration(self) -> bool:
        if self.worker is not None:
            return False
        blocker = self.session.register_blocker()
        if blocker is None and self.proposal_worker is not None:
            blocker = "wait for the mask proposal to finish (or stop it)"
        if blocker is not None:
            self.report_error(f"Cannot register yet: {blocker}.")
            return False
        try:
            job = self.session.registration_job(model=self.settings.model_path or None)
        except Exception as error:  # noqa: BLE001
            self.report_error(error)
            return False
        self.worker = GeneratorWorker(job, self)
        self.worker.progress.connect(self._on_progress)
        self.worker.succeeded.connect(self._on_registered)
        self.worker.cancelled.connect(self._on_cancelled)
        self.worker.errored.connect(self._on_failed)
        self.worker.done.connect(self._on_worker_done)
        self.progress.setValue(0)
        self.progress.setFormat("%p%")
        self.progress_message.setText("Starting")
        self.go_to_step("Register")
        self.worker.start()
        self._refresh_register_panel()
        self._status("Registering\u2026")
        return True

    def cancel_registration(self) -> None:
        if self.worker is not None:
            self.worker.cancel()
            self.progress_message.setText("Cancelling\u2026")
            self.cancel_button.setEnabled(False)

    def _on_progress(self, fraction: float, message: str) -> None:
        self.progress.setValue(int(round(1000 * max(0.0, min(1.0, fraction)))))
        self.progress_message.setText(message)

    def _on_registered(self, result) -> None:
        self.session.set_result(result)
        self.progress_message.setText("Done")
        self._refresh_result()
        self._refresh_steps()
        self.go_to_step("Review")
        self._status("Registration finished" + (f" with {len(result.warnings)} warning(s)" if result.warnings else ""))

    def _on_cancelled(self) -> None:
        self.progress.setValue(0)
        self.progress.setFormat("")
        self.progress_message.setText("Cancelled")
        self._status("Registration cancelled")

    def _on_failed(self, error: BaseException) -> None:
        self.progress.setFormat("")
        self.progress_message.setText("Failed")
        self.report_error(error)

    def _on_worker_done(self) -> None:
        outcome = self._release_worker("worker")
        if outcome is None:
            return
        self._refresh_register_panel()
        self._refresh_steps()
        self.registration_finished.emit(outcome)

    # ================================================================== landmarks
    def _landmark_axis_edited(self, name: str, axis: int, value: float) -> None:
        """A coordinate typed into the landmark table: only that coordinate changes (the others
        keep their full precision rather than the table's rounded display)."""
        point = list(self.session.landmarks_mm.get(name, (0.0, 0.0, 0.0)))
        point[axis] = float(value)
        self.move_landmark(name, point)

    def move_landmark(self, name: str, position_mm) -> None:
        """Move a landmark (typed, dragged in 3D, or from a script) and show the new measurements."""
        try:
            self.session.move_landmark(name, [float(v) for v in position_mm])
        except Exception as error:  # noqa: BLE001
            self.report_error(error)
        self._refresh_measurements()
        self._refresh_steps()

    def _landmark_dragging(self, index: int, name: str, u: float, v: float) -> None:
        """A landmark handle moves on radiograph ``index``: the other shows its epipolar line."""
        for other, panel in enumerate(self.radiograph_panels):
            if other != index and other < len(self.session.views):
                panel.view.show_epipolar(self.session.epipolar_segment(index, (u, v), other))

    def _landmark_dragged(self, index: int, name: str, u: float, v: float) -> None:
        for panel in self.radiograph_panels:
            panel.view.show_epipolar(None)
        try:
            position = self.session.landmark_moved_in_view(index, name, (u, v))
        except Exception as error:  # noqa: BLE001
            self.report_error(error)
            return
        self.move_landmark(name, position)

    def reset_landmarks(self) -> None:
        self.session.reset_landmarks()
        self._refresh_measurements()
        self._refresh_steps()

    # ================================================================== save / export
    def save_project(self) -> bool:
        if self.session.project_path is None:
            return self.save_project_as()
        return self._save_to(self.session.project_path)

    def save_project_as(self) -> bool:
        if not self.session.has_case:
            return False
        suggestion = str(pathlib.Path(self.settings.last_folder) / f"{self.session.case_label}{project_io.PROJECT_SUFFIX}")
        path, _ = QFileDialog.getSaveFileName(self, "Save project", suggestion,
                                              f"HipAtlas project (*{project_io.PROJECT_SUFFIX})")
        return bool(path) and self._save_to(path)

    def _save_to(self, path) -> bool:
        try:
            with _busy():
                saved = project_io.save_project(self.session, path)
        except Exception as error:  # noqa: BLE001
            self.report_error(error)
            return False
        self.recovery.clear()
        self._remember(saved)
        self._refresh_steps()
        self._status(f"Saved {saved}")
        return True

    def export_options(self) -> ExportOptions:
        return ExportOptions(**{k: box.isChecked() for k, box in self.export_boxes.items()},
                             anonymise=self.anonymise_box.isChecked(), units=self.settings.units)

    def choose_export_folder(self) -> None:
        if self.session.result is None:
            return
        parent = QFileDialog.getExistingDirectory(self, "Export into folder", self.settings.last_folder)
        if not parent:
            return
        label = self.session.pseudonym if self.anonymise_box.isChecked() else self.session.case_label
        target = pathlib.Path(parent) / f"{label}-plan"
        overwrite = False
        if target.exists() and any(target.iterdir()):
            answer = QMessageBox.question(self, "Replace export?", f"{target} exists. Replace it?")
            if answer != QMessageBox.StandardButton.Yes:
                return
            overwrite = True
        self.export_to(target, overwrite=overwrite)

    def export_to(self, folder, options: ExportOptions | None = None, *, overwrite: bool = False) -> dict | None:
        options = options or self.export_options()
        try:
            with _busy():  # the report renders its own pictures off-screen (app.report)
                written = self.session.export(folder, options, overwrite=overwrite)
        except Exception as error:  # noqa: BLE001
            self.report_error(error)
            return None
        self.export_summary.setText("Exported:<br>" + "<br>".join(p.name for p in written.values()))
        self._status(f"Exported to {folder}")
        return written

    # ================================================================== screenshots
    def screenshot(self) -> QImage:
        """The whole window, with the 3D view's OpenGL pixels painted in where it is visible.

        ``QWidget.grab`` cannot read a native OpenGL window's pixels (they come out black), so
        the render window is read back through VTK and composed onto the grab.
        """
        QApplication.processEvents()
        image = self.grab().toImage()
        if self.viewers.currentWidget() is self.surface_view and self.surface_view.isVisible():
            pixels = self.surface_view.render_image()
            plotter = self.surface_view.plotter
            ratio = plotter.devicePixelRatioF() if hasattr(plotter, "devicePixelRatioF") else 1.0
            from app.views.qimage import rgba_qimage

            rgba = np.concatenate([pixels, np.full(pixels.shape[:2] + (1,), 255, np.uint8)], axis=2)
            render = rgba_qimage(rgba)
            if ratio != 1.0:
                render = render.scaled(plotter.width(), plotter.height())
            origin = plotter.mapTo(self, plotter.rect().topLeft())
            painter = QPainter(image)
            painter.drawImage(origin, render)
            painter.end()
        return image

    # ================================================================== errors, dialogs
    def report_error(self, error: BaseException | str) -> None:
        """The one place errors reach the user: a dialog with the one-line message."""
        expected = isinstance(error, (HipAtlasError, str))
        message = first_line(error) if expected else f"Unexpected error: {type(error).__name__}: {first_line(error)}"
        self.errors.append(message)
        log.error("%s", message)
        self._status(message)
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
        model = describe_model(self.settings.model_path or None)
        if "error" in model:
            model_text = f"<i>{model['error']}</i>"
        else:
            model_text = f"{model.get('id')}<br><small>{model.get('file')}</small>"
            if model.get("sha256"):
                model_text += f"<br><small>sha256 {str(model['sha256'])[:16]}\u2026</small>"
        QMessageBox.about(self, "About HipAtlas",
                          f"<h3>HipAtlas planning workstation</h3><p>Version {__version__}</p>"
                          f"<p><b>Model:</b> {model_text}</p>"
                          "<p>3D proximal femur reconstruction from two calibrated radiographs by deep "
                          "atlas registration (after Van Houtte et al., IJCARS 2022).</p>"
                          f"<p style='color:#E57373'><b>{RESEARCH_NOTICE}</b></p>")

    def about_text(self) -> str:
        model = describe_model(self.settings.model_path or None)
        return f"HipAtlas {__version__}; model {model.get('id', model.get('error'))}"

    def show_shortcuts(self) -> None:
        lines = []
        for key, act in self.actions.items():
            if act.shortcut() and not act.shortcut().isEmpty():
                lines.append(f"<tr><td><b>{act.shortcut().toString(QKeySequence.SequenceFormat.NativeText)}</b></td>"
                             f"<td>{act.text().replace('&', '')}</td></tr>")
        QMessageBox.information(self, "Keyboard shortcuts", "<table cellspacing=4>" + "".join(lines) + "</table>")

    def edit_settings(self) -> None:
        dialog = SettingsDialog(self.settings, self)
        if dialog.exec() == QDialog.DialogCode.Accepted:
            dialog.apply()
            self._restart_autosave()
            self._refresh_register_panel()
            self._refresh_measurements()

    def _status(self, message: str) -> None:
        self.status_message.setText(message)

    # ================================================================== autosave / recovery
    def _restart_autosave(self) -> None:
        minutes = self.settings.autosave_minutes
        if minutes > 0:
            self.autosave_timer.start(int(minutes * 60_000))
        else:
            self.autosave_timer.stop()

    def autosave(self) -> bool:
        """Save a recovery copy if there are unsaved changes (not while registering)."""
        if not self.session.has_case or not self.session.dirty or self.worker is not None:
            return False
        try:
            self.recovery.autosave(self.session)
        except Exception as error:  # noqa: BLE001 - autosave must never interrupt the user
            log.warning("autosave failed: %s", error)
            return False
        log.info("autosaved to %s", self.recovery.project_file)
        return True

    def offer_recovery(self) -> bool:
        """Offer to restore autosaves left by a crashed session; returns True if one was restored."""
        orphans = self.recovery.orphans()
        if not orphans or not self.interactive:
            return False
        for autosave in orphans:
            answer = QMessageBox.question(
                self, "Recover unsaved work?",
                f"HipAtlas did not close properly. Recover the unsaved work on "
                f"\u201c{autosave.case_label}\u201d from {autosave.saved}?",
                QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No)
            if answer == QMessageBox.StandardButton.Yes:
                return self.recover(autosave)
            self.recovery.discard(autosave)
        return False

    def recover(self, autosave: project_io.Autosave) -> bool:
        try:
            session = self.recovery.recover(autosave, **self.session.options())
        except Exception as error:  # noqa: BLE001
            self.report_error(error)
            return False
        self._replace_session(session)
        self.go_to_step("Review" if session.result is not None else "Masks")
        self._status("Recovered unsaved work; save it to keep it")
        return True

    # ================================================================== closing
    def shutdown(self) -> None:
        """Stop and join the worker, release VTK, delete the session's work files."""
        if self._closing:
            return
        self._closing = True
        self.autosave_timer.stop()
        for name in ("worker", "proposal_worker"):
            worker = getattr(self, name)
            if worker is not None:
                worker.cancel()
                if not worker.wait(60_000):
                    log.error("the %s thread did not stop within 60 s", name)
                setattr(self, name, None)
        self.surface_view.close_plotter()
        self.template_panel.close_plotter()
        self.session.close()
        self.recovery.clear()
        self.settings.sync()

    def closeEvent(self, event) -> None:
        if self.interactive and not self._closing and not self._may_discard():
            event.ignore()
            return
        self.shutdown()
        super().closeEvent(event)
        self.closed.emit()


class _busy:
    """Context manager: a wait cursor while the GUI thread does a short blocking job."""

    def __enter__(self):
        QApplication.setOverrideCursor(Qt.CursorShape.WaitCursor)
        return self

    def __exit__(self, *exc):
        QApplication.restoreOverrideCursor()
        return False
