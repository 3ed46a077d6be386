"""The workstation's PACS dialogs: "Open from PACS" and "Send to PACS".

The DICOM networking lives in :mod:`inference.pacs` (Qt-free); these dialogs only collect input,
run its generators in a :class:`app.workers.GeneratorWorker` (searches too: an unreachable PACS
blocks for up to the timeout) and show progress, results and errors.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import tempfile
from typing import Any, Callable

from PySide6.QtCore import Qt
from PySide6.QtWidgets import (QAbstractItemView, QDialog, QDialogButtonBox, QDoubleSpinBox, QFormLayout,
                               QGroupBox, QHBoxLayout, QLabel, QLineEdit, QMessageBox, QProgressBar, QPushButton,
                               QSpinBox, QTableWidget, QTableWidgetItem, QVBoxLayout, QWidget)

from app.workers import GeneratorWorker
from inference import pacs
from inference.errors import HipAtlasError

log = logging.getLogger(__name__)

__all__ = ["OpenFromPacsDialog", "SendToPacsDialog", "default_case_root"]

STUDY_COLUMNS = ("PatientID", "PatientName", "StudyDate", "AccessionNumber", "ModalitiesInStudy", "StudyDescription")
SERIES_COLUMNS = ("SeriesNumber", "Modality", "SeriesDescription", "NumberOfSeriesRelatedInstances")
IMAGE_MODALITIES = pacs.IMAGE_MODALITIES


def default_case_root() -> pathlib.Path:
    """Where retrieved cases go: ~/HipAtlas/pacs-cases."""
    return pathlib.Path.home() / "HipAtlas" / "pacs-cases"


def _one_shot(function: Callable[[], Any]):
    """A worker job that calls ``function`` once (for a C-FIND that may wait up to the timeout)."""
    def job(cancel):
        return function()
        yield  # pragma: no cover - makes this a generator

    return job


class _SettingsBox(QGroupBox):
    """Host, port, AE titles and timeout; saved to the shared settings file on request."""

    def __init__(self, settings_file: str | None, parent: QWidget | None = None):
        super().__init__("PACS", parent)
        self.settings_file = settings_file
        try:
            current = pacs.load_settings(settings_file)
        except HipAtlasError as error:
            log.warning("%s; using the defaults", error)
            current = pacs.PacsSettings()
        self._loaded = current  # keeps the TLS fields, which this box does not edit
        self.host = QLineEdit(current.host)
        self.port = QSpinBox()
        self.port.setRange(1, 65535)
        self.port.setValue(current.port)
        self.called_ae = QLineEdit(current.called_ae)
        self.calling_ae = QLineEdit(current.calling_ae)
        self.timeout = QDoubleSpinBox()
        self.timeout.setRange(0.5, 600.0)
        self.timeout.setSuffix(" s")
        self.timeout.setValue(current.timeout_s)
        form = QFormLayout(self)
        form.addRow("Host", self.host)
        form.addRow("Port", self.port)
        form.addRow("PACS AE title", self.called_ae)
        form.addRow("Our AE title", self.calling_ae)
        form.addRow("Timeout", self.timeout)
        self.save_button = QPushButton("Save as default")
        self.save_button.clicked.connect(self.save)
        form.addRow("", self.save_button)
        if current.tls:
            form.addRow("", QLabel("TLS on (certificates from the settings file)"))

    def settings(self) -> pacs.PacsSettings:
        return dataclasses.replace(self._loaded, host=self.host.text().strip(), port=int(self.port.value()),
                                   called_ae=self.called_ae.text().strip(), calling_ae=self.calling_ae.text().strip(),
                                   timeout_s=float(self.timeout.value()))

    def save(self) -> pathlib.Path:
        return pacs.save_settings(self.settings(), self.settings_file)


class _WorkerMixin:
    """Runs one worker at a time; errors go to ``report_error``."""

    worker: GeneratorWorker | None = None

    def _run(self, job, on_success: Callable[[Any], None], *, progress: QProgressBar | None = None) -> None:
        self.worker = GeneratorWorker(job, self)
        if progress is not None:
            progress.setValue(0)
            self.worker.progress.connect(lambda fraction, message: (progress.setValue(round(100 * fraction)),
                                                                     progress.setFormat(f"{message} (%p%)")))
        self.worker.succeeded.connect(on_success)
        self.worker.errored.connect(self.report_error)
        self.worker.cancelled.connect(lambda: self.status.setText("Cancelled; nothing was written"))
        self.worker.done.connect(self._worker_done)
        self._set_busy(True)
        self.worker.start()

    def _worker_done(self) -> None:
        self.worker.wait()
        self.worker = None
        self._set_busy(False)

    def report_error(self, error: Any) -> None:
        message = " ".join(str(error).split())
        self.errors.append(message)
        self.status.setText(message)
        if not getattr(self, "quiet", False):
            QMessageBox.warning(self, "HipAtlas PACS", message)


class OpenFromPacsDialog(_WorkerMixin, QDialog):
    """Search the PACS, pick a study and its two views, retrieve them as a case folder.

    After ``exec()`` returns Accepted, :attr:`case_dir` is the new case folder.
    """

    def __init__(self, parent: QWidget | None = None, *, settings_file: str | None = None,
                 case_root: str | pathlib.Path | None = None):
        super().__init__(parent)
        self.setWindowTitle("Open from PACS")
        self.case_root = pathlib.Path(case_root) if case_root else default_case_root()
        self.case_dir: pathlib.Path | None = None
        self.errors: list[str] = []
        self.studies: list[dict[str, str]] = []
        self.series: list[dict[str, str]] = []
        self.settings_box = _SettingsBox(settings_file, self)

        self.patient_id, self.patient_name = QLineEdit(), QLineEdit()
        self.study_date, self.accession = QLineEdit(), QLineEdit()
        self.patient_name.setPlaceholderText("DOE^J*")
        self.study_date.setPlaceholderText("YYYYMMDD or YYYYMMDD-YYYYMMDD")
        search_box = QGroupBox("Search")
        form = QFormLayout(search_box)
        form.addRow("Patient ID", self.patient_id)
        form.addRow("Patient name", self.patient_name)
        form.addRow("Study date", self.study_date)
        form.addRow("Accession number", self.accession)
        self.search_button = QPushButton("Search")
        self.search_button.clicked.connect(self.search)
        form.addRow("", self.search_button)

        self.study_table = QTableWidget(0, len(STUDY_COLUMNS))
        self.study_table.setHorizontalHeaderLabels(STUDY_COLUMNS)
        self.study_table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.study_table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.study_table.itemSelectionChanged.connect(self.list_series)
        self.series_table = QTableWidget(0, len(SERIES_COLUMNS))
        self.series_table.setHorizontalHeaderLabels(SERIES_COLUMNS)
        self.series_table.itemChanged.connect(lambda _item: self._update_buttons())

        self.progress = QProgressBar()
        self.status = QLabel("Search by patient ID, name, date or accession number")
        self.status.setWordWrap(True)
        self.retrieve_button = QPushButton("Retrieve the two checked views")
        self.retrieve_button.clicked.connect(self.retrieve)
        self.cancel_button = QPushButton("Cancel retrieve")
        self.cancel_button.clicked.connect(lambda: self.worker and self.worker.cancel())
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Close)
        buttons.rejected.connect(self.reject)

        left = QVBoxLayout()
        left.addWidget(self.settings_box)
        left.addWidget(search_box)
        left.addStretch(1)
        right = QVBoxLayout()
        right.addWidget(QLabel("Studies"))
        right.addWidget(self.study_table, 2)
        right.addWidget(QLabel("Series (check the two views)"))
        right.addWidget(self.series_table, 1)
        row = QHBoxLayout()
        row.addWidget(self.retrieve_button)
        row.addWidget(self.cancel_button)
        right.addLayout(row)
        right.addWidget(self.progress)
        right.addWidget(self.status)
        right.addWidget(buttons)
        layout = QHBoxLayout(self)
        layout.addLayout(left, 1)
        layout.addLayout(right, 3)
        self.resize(1100, 600)
        self._set_busy(False)

    # ------------------------------------------------------------------ state
    def _set_busy(self, busy: bool) -> None:
        for widget in (self.search_button, self.settings_box, self.study_table, self.series_table):
            widget.setEnabled(not busy)
        self.cancel_button.setEnabled(busy)
        self._update_buttons()

    def checked_series(self) -> list[str]:
        uids = []
        for row, series in enumerate(self.series):
            item = self.series_table.item(row, 0)
            if item is not None and item.checkState() == Qt.CheckState.Checked:
                uids.append(series["SeriesInstanceUID"])
        return uids

    def _update_buttons(self) -> None:
        self.retrieve_button.setEnabled(self.worker is None and len(self.checked_series()) == 2)

    def selected_study(self) -> dict[str, str] | None:
        rows = {index.row() for index in self.study_table.selectionModel().selectedRows()}
        return self.studies[rows.pop()] if len(rows) == 1 else None

    # ------------------------------------------------------------------ actions
    def search(self) -> None:
        settings = self.settings_box.settings()
        keys = dict(patient_id=self.patient_id.text().strip(), patient_name=self.patient_name.text().strip(),
                    study_date=self.study_date.text().strip(), accession_number=self.accession.text().strip())
        self.status.setText(f"Searching {settings.describe()}\u2026")
        self._run(_one_shot(lambda: pacs.find_studies(settings, **keys)), self._show_studies)

    def _show_studies(self, studies: list[dict[str, str]]) -> None:
        self.studies = list(studies)
        self.study_table.setRowCount(len(self.studies))
        for row, study in enumerate(self.studies):
            for column, key in enumerate(STUDY_COLUMNS):
                self.study_table.setItem(row, column, QTableWidgetItem(study.get(key, "")))
        self.series_table.setRowCount(0)
        self.series = []
        self.status.setText(f"{len(self.studies)} stud{'y' if len(self.studies) == 1 else 'ies'} found")

    def list_series(self) -> None:
        study = self.selected_study()
        if study is None or self.worker is not None:
            return
        settings = self.settings_box.settings()
        uid = study["StudyInstanceUID"]
        self._run(_one_shot(lambda: pacs.find_series(settings, uid)), self._show_series)

    def _show_series(self, series: list[dict[str, str]]) -> None:
        self.series = list(series)
        images = [s for s in self.series if s.get("Modality") in IMAGE_MODALITIES]
        self.series_table.blockSignals(True)
        self.series_table.setRowCount(len(self.series))
        for row, item in enumerate(self.series):
            for column, key in enumerate(SERIES_COLUMNS):
                cell = QTableWidgetItem(item.get(key, ""))
                cell.setFlags(cell.flags() & ~Qt.ItemFlag.ItemIsEditable)
                if column == 0:
                    cell.setFlags(cell.flags() | Qt.ItemFlag.ItemIsUserCheckable)
                    preset = len(images) == 2 and item in images
                    cell.setCheckState(Qt.CheckState.Checked if preset else Qt.CheckState.Unchecked)
                self.series_table.setItem(row, column, cell)
        self.series_table.blockSignals(False)
        self._update_buttons()
        self.status.setText(f"{len(self.series)} series; check the two views to retrieve")

    def retrieve(self) -> None:
        study = self.selected_study()
        series = self.checked_series()
        if study is None or len(series) != 2:
            self.report_error("choose a study and check exactly two series (the two views)")
            return
        settings = self.settings_box.settings()
        name = "_".join(part for part in (study.get("PatientID", ""), study.get("StudyDate", ""),
                                          study["StudyInstanceUID"][-8:]) if part)
        target = self.case_root / "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
        self.status.setText(f"Retrieving into {target}\u2026")
        job = lambda cancel: pacs.retrieve_case(settings, study["StudyInstanceUID"], target,  # noqa: E731
                                                series_uids=series, overwrite=True, cancel=cancel)
        self._run(job, self._retrieved, progress=self.progress)

    def _retrieved(self, case_dir: pathlib.Path) -> None:
        self.case_dir = pathlib.Path(case_dir)
        source = json.loads((self.case_dir / "dicom_source.json").read_text())
        lines = [f"{v['view']}: calibration from {v['calibration']['source']}" for v in source["views"]]
        self.status.setText("Retrieved. " + "; ".join(lines))
        self.calibration_lines = lines
        self.accept()


class SendToPacsDialog(_WorkerMixin, QDialog):
    """Write the current results as DICOM (SR, PDF, overlays, STL) and store them in the PACS."""

    def __init__(self, parent: QWidget | None, results_dir: str | pathlib.Path, case_dir: str | pathlib.Path, *,
                 pdf: str | pathlib.Path | None = None, settings_file: str | None = None):
        super().__init__(parent)
        self.setWindowTitle("Send to PACS")
        self.results_dir, self.case_dir, self.pdf = pathlib.Path(results_dir), pathlib.Path(case_dir), pdf
        self.errors: list[str] = []
        self.stored: list[str] = []
        self.settings_box = _SettingsBox(settings_file, self)
        self.progress = QProgressBar()
        self.status = QLabel("Stores the measurements (SR), the report PDF, the overlays and the femur surface "
                             "in the patient's study. Sending again is safe: the PACS keeps one copy.")
        self.status.setWordWrap(True)
        self.send_button = QPushButton("Send")
        self.send_button.clicked.connect(self.send)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Close)
        buttons.rejected.connect(self.reject)
        layout = QVBoxLayout(self)
        layout.addWidget(self.settings_box)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        layout.addWidget(self.send_button)
        layout.addWidget(buttons)

    def _set_busy(self, busy: bool) -> None:
        self.send_button.setEnabled(not busy)
        self.settings_box.setEnabled(not busy)

    def send(self) -> None:
        settings = self.settings_box.settings()
        results_dir, case_dir, pdf = self.results_dir, self.case_dir, self.pdf

        def job(cancel):
            from inference import dicom_results
            from inference.pipeline import Progress

            with tempfile.TemporaryDirectory(prefix="hipatlas-dicom-") as tmp:
                yield Progress(0.05, "Writing DICOM objects")
                dicom_results.export_results(results_dir, pathlib.Path(tmp) / "dicom", source=case_dir, pdf=pdf)
                return (yield from pacs.send(settings, [pathlib.Path(tmp) / "dicom"]))

        self._run(job, self._sent, progress=self.progress)

    def _sent(self, stored: list[str]) -> None:
        self.stored = list(stored)
        self.status.setText(f"Stored {len(stored)} object(s) in {self.settings_box.settings().describe()}")


# ------------------------------------------------------------------ main window hooks
def open_from_pacs(window: Any) -> pathlib.Path | None:
    """File > Open from PACS: run the dialog, then open the retrieved case in ``window``."""
    dialog = OpenFromPacsDialog(window)
    if dialog.exec() != QDialog.DialogCode.Accepted or dialog.case_dir is None:
        return None
    window.open_case_folder(dialog.case_dir)
    return dialog.case_dir


def results_for_sending(session: Any, folder: pathlib.Path) -> pathlib.Path:
    """The session's current results as a register-style output folder in ``folder``.

    The measurements are the session's current ones (landmarks moved in the workstation change
    them), and the planning report PDF is the one the workstation's export writes.
    """
    import shutil

    from app.session import ExportOptions
    from inference import io

    if session.result is None:
        raise HipAtlasError("nothing to send yet: register the case first")
    folder.mkdir(parents=True)
    for path in session.result.out_dir.iterdir():
        if path.suffix in (".stl", ".png") or path.name in ("report.json", "femur_labels.nii.gz"):
            shutil.copyfile(path, folder / path.name)
    io.write_json_atomic(folder / "measurements.json", session.measurements)
    pdf_only = ExportOptions(surface_stl=False, nifti=False, measurements_json=False, measurements_csv=False,
                             pdf_report=True, plan=False)
    exported = session.export(folder / "export", pdf_only)
    shutil.move(str(exported["pdf_report"]), folder / "planning_report.pdf")
    return folder


def send_to_pacs(window: Any) -> SendToPacsDialog | None:
    """File > Send to PACS: the current results, stored in the patient's study."""
    session = window.session
    try:
        results = results_for_sending(session, session.work_dir / f"pacs-send-{len(list(session.work_dir.glob('pacs-send-*')))}")
    except HipAtlasError as error:
        window.report_error(error)
        return None
    dialog = SendToPacsDialog(window, results, session.case.case_dir)
    dialog.exec()
    return dialog
