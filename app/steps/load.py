"""Step 1, Load: open a case folder, import two radiographs with their calibration, or open a
saved project; the case table shows each view's size and calibration source."""

from __future__ import annotations

import os
import pathlib
from typing import Sequence

from PySide6.QtWidgets import (QComboBox, QDialog, QDialogButtonBox, QFileDialog, QGridLayout, QGroupBox,
                               QHBoxLayout, QLabel, QLineEdit, QPushButton, QTableWidgetItem, QVBoxLayout)

from app import project as project_io
from app.session import RadiographImport, Session
from app.steps.base import Step, busy, ignore_wheel_unless_focused, read_only_table

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
        ignore_wheel_unless_focused(self.side)  # scrolling past it must never switch the side
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


class LoadStep(Step):
    name, viewer = "Load", 0
    title = "Load a case"
    hint = ("Open a case folder (case.json with two calibrated radiographs), import two radiographs with "
            "their calibration, or open a saved project.")

    def __init__(self, window):
        super().__init__(window)
        layout = self.layout_
        for text, slot in (("Open case folder\u2026", self.choose_case_folder),
                           ("Import two radiographs\u2026", self.choose_radiographs),
                           ("Open project\u2026", self.choose_project)):
            button = QPushButton(text)
            button.clicked.connect(slot)
            layout.addWidget(button)
        self.case_summary = QLabel("No case open")
        self.case_summary.setWordWrap(True)
        layout.addWidget(self.case_summary)
        self.case_table = read_only_table(["View", "Image", "Size (px)", "Calibration source"], stretch=(1, 3))
        layout.addWidget(self.case_table, 1)
        self.pair_label = QLabel("")
        self.pair_label.setWordWrap(True)
        self.pair_label.setObjectName("hint")
        layout.addWidget(self.pair_label)

    # ---------------------------------------------------------------- refresh
    def refresh(self) -> None:
        s, w = self.session, self.window
        self.case_table.setRowCount(0)
        if not s.has_case:
            self.case_summary.setText("No case open")
            self.pair_label.setText("")
            for panel in w.radiograph_panels:
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
            panel = w.radiograph_panels[index]
            panel.view.set_image(state.display)
            panel.view.set_intensities(view.image.pixels)  # window/level (right-drag, presets)
            panel.view.set_mask(state.mask)
            panel.view.set_editable(w.current_step() == "Masks")
        report = s.pair_report
        if report is not None:
            text = f"Views {report.angle_deg:.0f}\u00b0 apart; central rays pass {report.closest_approach_mm:.0f} mm apart."
            if report.warnings:
                text += "<br><span style='color:#FFB74D'>" + "<br>".join(report.warnings) + "</span>"
            self.pair_label.setText(text)

    # ---------------------------------------------------------------- choosing
    def choose_case_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(self.window, "Open case folder", self.settings.last_folder)
        if folder:
            self.open_case_folder(folder)

    def choose_radiographs(self) -> None:
        dialog = ImportDialog(self.window, self.settings.last_folder)
        if dialog.exec() == QDialog.DialogCode.Accepted:
            self.import_radiographs(dialog.imports(), dialog.side.currentText())

    def choose_project(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self.window, "Open project", self.settings.last_folder,
                                              f"HipAtlas project (*{project_io.PROJECT_SUFFIX})")
        if path:
            self.open_project(path)

    # ---------------------------------------------------------------- opening
    def _may_open(self) -> bool:
        return self.window.register_step.worker is None and self.window.may_discard()

    def open_path(self, path: str | os.PathLike) -> bool:
        """Open a case folder or a project file (from the command line or the recent menu)."""
        path = pathlib.Path(path)
        if path.is_dir():
            return self.open_case_folder(path)
        if not path.exists():
            self.window.report_error(f"{path}: no such case folder or project file")
            return False
        return self.open_project(path)

    def open_case_folder(self, folder: str | os.PathLike) -> bool:
        w = self.window
        if not self._may_open():
            return False
        try:
            with busy():
                new = Session(**self.session.options())
                try:
                    new.open_case(folder)
                except BaseException:
                    new.close()
                    raise
        except Exception as error:  # noqa: BLE001 - bad files must never crash the workstation
            w.report_error(error)
            return False
        w.replace_session(new)
        w.remember(folder)
        w.go_to_step("Masks")
        w.status(f"Opened {new.case_label}: check and confirm both masks")
        w.masks_step.propose_if_needed()
        return True

    def import_radiographs(self, imports: Sequence[RadiographImport], side: str) -> bool:
        w = self.window
        if not self._may_open():
            return False
        new = Session(**self.session.options())
        try:
            with busy():
                new.import_radiographs(imports, side)
        except Exception as error:  # noqa: BLE001
            new.close()
            w.report_error(error)
            return False
        w.replace_session(new)
        self.settings.last_folder = str(pathlib.Path(imports[0].image_path).parent)
        w.go_to_step("Masks")
        w.status("Imported two radiographs: check and confirm both masks")
        w.masks_step.propose_if_needed()
        return True

    def open_project(self, path: str | os.PathLike) -> bool:
        w = self.window
        if not self._may_open():
            return False
        try:
            with busy():
                new = project_io.load_project(path, **self.session.options())
        except Exception as error:  # noqa: BLE001
            w.report_error(error)
            return False
        w.replace_session(new)
        w.remember(path)
        w.go_to_step("Review" if new.result is not None else "Masks")
        w.status(f"Opened project {pathlib.Path(path).name}")
        return True
