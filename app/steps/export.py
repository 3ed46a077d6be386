"""Step 7, Export: write the plan (surface, label map, measurements, report) into a new folder,
and save the project."""

from __future__ import annotations

import pathlib

from PySide6.QtWidgets import QCheckBox, QFileDialog, QLabel, QMessageBox, QPushButton

from app import project as project_io
from app.export import EXPORT_WRITERS
from app.session import ExportOptions
from app.steps.base import Step, busy


class ExportStep(Step):
    name, viewer = "Export", 1
    title = "Export"
    hint = "Write the plan to a new folder. Files are written completely or not at all."

    def __init__(self, window):
        super().__init__(window)
        layout = self.layout_
        self.export_boxes = {}
        for writer in EXPORT_WRITERS:
            key, box = writer.key, QCheckBox(writer.label)
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

    def export_options(self) -> ExportOptions:
        return ExportOptions(**{k: box.isChecked() for k, box in self.export_boxes.items()},
                             anonymise=self.anonymise_box.isChecked(), units=self.settings.units)

    def refresh(self) -> None:
        """Export only a result that matches the masks (or one the user chose to keep)."""
        stale = self.window.register_step.stale_reason()
        self.export_button.setEnabled(self.session.result is not None and stale is None)
        self.export_button.setToolTip("Register the case first" if self.session.result is None else
                                      f"Results out of date: {stale}" if stale else "Write the plan to a new folder")

    def choose_export_folder(self) -> None:
        """Ask for the export folder: a new one the user names (or an existing one to replace)."""
        if not self.export_button.isEnabled():
            return
        label = self.session.pseudonym if self.anonymise_box.isChecked() else self.session.case_label
        suggestion = pathlib.Path(self.settings.last_folder) / f"{label}-plan"
        # A save dialog, not a folder chooser: the folder to write is usually one that does not
        # exist yet, and a folder chooser only accepts existing folders.
        chosen, _ = QFileDialog.getSaveFileName(self.window, "Export the plan to a new folder", str(suggestion),
                                                "Plan folder (*)", options=QFileDialog.Option.DontConfirmOverwrite)
        if not chosen:
            return
        target = pathlib.Path(chosen)
        overwrite = False
        if target.exists() and (not target.is_dir() or any(target.iterdir())):
            if not target.is_dir():
                self.window.report_error(f"{target} is a file; choose a folder name")
                return
            answer = QMessageBox.question(self.window, "Replace export?", f"{target} exists. Replace it?")
            if answer != QMessageBox.StandardButton.Yes:
                return
            overwrite = True
        self.settings.last_folder = str(target.parent)
        self.export_to(target, overwrite=overwrite)

    def export_to(self, folder, options: ExportOptions | None = None, *, overwrite: bool = False) -> dict | None:
        options = options or self.export_options()
        try:
            with busy():  # the report renders its own pictures off-screen (app.report)
                written = self.session.export(folder, options, overwrite=overwrite)
        except Exception as error:  # noqa: BLE001
            self.window.report_error(error)
            return None
        self.export_summary.setText("Exported:<br>" + "<br>".join(p.name for p in written.values()))
        self.window.status(f"Exported to {folder}")
        return written

    # ---------------------------------------------------------------- project
    def save_project(self) -> bool:
        if self.session.project_path is None:
            return self.save_project_as()
        return self._save_to(self.session.project_path)

    def save_project_as(self) -> bool:
        if not self.session.has_case:
            return False
        suggestion = str(pathlib.Path(self.settings.last_folder) / f"{self.session.case_label}{project_io.PROJECT_SUFFIX}")
        path, _ = QFileDialog.getSaveFileName(self.window, "Save project", suggestion,
                                              f"HipAtlas project (*{project_io.PROJECT_SUFFIX})")
        return bool(path) and self._save_to(path)

    def _save_to(self, path) -> bool:
        try:
            with busy():
                saved = project_io.save_project(self.session, path)
        except Exception as error:  # noqa: BLE001
            self.window.report_error(error)
            return False
        self.window.autosave.store.clear()
        self.window.remember(saved)
        self.window.refresh_steps()
        self.window.status(f"Saved {saved}")
        return True
