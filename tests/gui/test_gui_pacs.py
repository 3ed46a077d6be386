"""The workstation's "Open from PACS" and "Send to PACS" dialogs against a real Orthanc."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pydicom
import pytest

from inference import dicom_case, io, pacs
from inference.orthanc_local import LocalOrthanc, free_port
from inference.pipeline import run_to_completion

DEMO = pathlib.Path(__file__).resolve().parents[2] / "resources" / "demo"


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    """A real Orthanc on free localhost ports (fails with a clear message if it is not installed)."""
    with LocalOrthanc(tmp_path_factory.mktemp("orthanc")) as server:
        yield server


@pytest.fixture()
def settings_file(tmp_path, orthanc):
    return str(pacs.save_settings(pacs.PacsSettings(port=orthanc.dicom_port, timeout_s=5.0), tmp_path / "pacs.json"))


def _wait_idle(qtbot, dialog, timeout_ms=20000):
    qtbot.waitUntil(lambda: dialog.worker is None, timeout=timeout_ms)


def test_open_from_pacs_searches_picks_two_views_and_retrieves_a_case(qtbot, tmp_path, orthanc, settings_file):
    from PySide6.QtCore import Qt
    from PySide6.QtWidgets import QDialog

    from app.pacs_dialog import OpenFromPacsDialog

    files = dicom_case.case_to_dicom(DEMO, tmp_path / "dicom", patient=dicom_case.PatientInfo(patient_id="GUI-1"))
    run_to_completion(pacs.send(pacs.load_settings(settings_file), files))
    dialog = OpenFromPacsDialog(None, settings_file=settings_file, case_root=tmp_path / "cases")
    dialog.quiet = True
    qtbot.addWidget(dialog)
    dialog.show()
    assert dialog.settings_box.port.value() == orthanc.dicom_port
    dialog.patient_id.setText("GUI-1")
    qtbot.mouseClick(dialog.search_button, Qt.MouseButton.LeftButton)
    _wait_idle(qtbot, dialog)
    assert dialog.study_table.rowCount() == 1 and dialog.study_table.item(0, 0).text() == "GUI-1"
    assert not dialog.retrieve_button.isEnabled()
    dialog.study_table.selectRow(0)
    _wait_idle(qtbot, dialog)
    assert [dialog.series_table.item(r, 2).text() for r in range(2)] == ["AP", "LAT"]
    assert len(dialog.checked_series()) == 2 and dialog.retrieve_button.isEnabled()
    dialog.series_table.item(1, 0).setCheckState(Qt.CheckState.Unchecked)
    assert not dialog.retrieve_button.isEnabled()  # two views are needed
    dialog.series_table.item(1, 0).setCheckState(Qt.CheckState.Checked)
    with qtbot.waitSignal(dialog.accepted, timeout=30000):
        qtbot.mouseClick(dialog.retrieve_button, Qt.MouseButton.LeftButton)
    assert dialog.result() == QDialog.DialogCode.Accepted
    case = io.load_case(dialog.case_dir)
    assert [v.calibration.source for v in case.views] == ["dicom-tags", "dicom-tags"]
    assert dialog.calibration_lines == ["AP: calibration from dicom-tags", "LAT: calibration from dicom-tags"]
    assert dialog.progress.value() == 100 and dialog.errors == []


def test_open_from_pacs_reports_an_unreachable_pacs_in_one_line(qtbot, tmp_path):
    from PySide6.QtCore import Qt

    from app.pacs_dialog import OpenFromPacsDialog

    settings_file = str(pacs.save_settings(pacs.PacsSettings(port=free_port(), timeout_s=2.0), tmp_path / "p.json"))
    dialog = OpenFromPacsDialog(None, settings_file=settings_file, case_root=tmp_path / "cases")
    dialog.quiet = True
    qtbot.addWidget(dialog)
    qtbot.mouseClick(dialog.search_button, Qt.MouseButton.LeftButton)
    _wait_idle(qtbot, dialog)
    assert len(dialog.errors) == 1 and "connection refused" in dialog.errors[0]
    assert "\n" not in dialog.errors[0] and dialog.search_button.isEnabled()


def test_send_to_pacs_stores_the_results_in_the_patients_study(qtbot, tmp_path, orthanc, settings_file):
    from PySide6.QtCore import Qt

    from app.pacs_dialog import SendToPacsDialog

    files = dicom_case.case_to_dicom(DEMO, tmp_path / "dicom", patient=dicom_case.PatientInfo(patient_id="GUI-2"))
    case_dir = dicom_case.study_to_case(files, tmp_path / "case")
    case = io.load_case(case_dir)
    results = tmp_path / "results"
    results.mkdir()
    io.write_json_atomic(results / "measurements.json", {"side": "right", "hip_centre_mm": [1.0, 2.0, 3.0],
                                                         "head_radius_mm": 24.0, "femoral_offset_mm": 40.0,
                                                         "neck_shaft_angle_deg": 130.0, "vertical_offset_mm": 50.0})
    io.write_json_atomic(results / "report.json", {"case_dir": str(case_dir), "model": {"name": "m"},
                                                   "views": [{"name": v.name, "image_sha256": v.image.sha256}
                                                             for v in case.views]})
    for view in case.views:
        io.write_png_atomic(results / f"overlay_{view.name}.png", np.zeros(view.image.shape + (3,), np.uint8))
    dialog = SendToPacsDialog(None, results, case_dir, settings_file=settings_file)
    dialog.quiet = True
    qtbot.addWidget(dialog)
    before = len(orthanc.instances())
    qtbot.mouseClick(dialog.send_button, Qt.MouseButton.LeftButton)
    _wait_idle(qtbot, dialog)
    assert dialog.errors == [] and len(dialog.stored) == 3  # SR + two overlays
    assert len(orthanc.instances()) == before + 3
    study_uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)
    series = pacs.find_series(pacs.load_settings(settings_file), study_uid)
    assert sorted(s["Modality"] for s in series) == ["OT", "SR"]  # in the radiographs' study
    qtbot.mouseClick(dialog.send_button, Qt.MouseButton.LeftButton)  # sending again changes nothing
    _wait_idle(qtbot, dialog)
    assert len(orthanc.instances()) == before + 3
    assert json.loads((case_dir / "dicom_source.json").read_text())["views"][0]["view"] == "AP"


def test_send_to_pacs_sends_the_sessions_current_measurements_and_report_pdf(qtbot, tmp_path, orthanc, settings_file):
    """What File > Send to PACS sends: the session's (edited) measurements, its PDF report, overlays, surface."""
    import highdicom as hd
    from PySide6.QtCore import Qt

    from app.pacs_dialog import SendToPacsDialog, results_for_sending
    from app.session import Session, load_result
    from gui_helpers import synthetic_register

    files = dicom_case.case_to_dicom(DEMO, tmp_path / "dicom", patient=dicom_case.PatientInfo(patient_id="GUI-3"))
    case_dir = dicom_case.study_to_case(files, tmp_path / "case")
    result = run_to_completion(synthetic_register(case_dir, tmp_path / "out"))
    session = Session(work_root=tmp_path, isolate=False)
    session.open_case(case_dir)
    session.set_result(load_result(result.out_dir, measurements=result.measurements, landmarks_mm=result.landmarks_mm,
                                   warnings=result.warnings, report=result.report, files=result.files,
                                   view_names=[v.name for v in session.views]))
    head = np.asarray(session.landmarks_mm["head_centre"]) + [4.0, 0.0, 0.0]
    session.move_landmark("head_centre", head)
    folder = results_for_sending(session, tmp_path / "send")
    sent = json.loads((folder / "measurements.json").read_text())
    assert sent["hip_centre_mm"] == pytest.approx(list(head)) and sent != result.measurements
    assert (folder / "planning_report.pdf").read_bytes().startswith(b"%PDF")
    dialog = SendToPacsDialog(None, folder, case_dir, settings_file=settings_file)
    dialog.quiet = True
    qtbot.addWidget(dialog)
    qtbot.mouseClick(dialog.send_button, Qt.MouseButton.LeftButton)
    _wait_idle(qtbot, dialog)
    assert dialog.errors == [] and len(dialog.stored) == 7  # SR, PDF, STL, two overlays, two presentation states
    for orthanc_id in orthanc.instances():
        tags = orthanc.rest(f"/instances/{orthanc_id}/simplified-tags")
        if tags.get("PatientID") == "GUI-3" and tags.get("Modality") == "SR":
            (tmp_path / "sr.dcm").write_bytes(orthanc.instance_file(orthanc_id))
    sr = hd.sr.srread(tmp_path / "sr.dcm")
    (group,) = sr.content.get_planar_roi_measurement_groups()
    np.testing.assert_allclose(group.roi.value[0], head)
    session.close()


def test_cancelling_a_retrieve_in_the_dialog_writes_no_case(qtbot, tmp_path, orthanc, settings_file):
    from PySide6.QtCore import Qt

    from app.pacs_dialog import OpenFromPacsDialog

    files = dicom_case.case_to_dicom(DEMO, tmp_path / "dicom", patient=dicom_case.PatientInfo(patient_id="GUI-4"))
    run_to_completion(pacs.send(pacs.load_settings(settings_file), files))
    dialog = OpenFromPacsDialog(None, settings_file=settings_file, case_root=tmp_path / "cases")
    dialog.quiet = True
    qtbot.addWidget(dialog)
    dialog.patient_id.setText("GUI-4")
    qtbot.mouseClick(dialog.search_button, Qt.MouseButton.LeftButton)
    _wait_idle(qtbot, dialog)
    dialog.study_table.selectRow(0)
    _wait_idle(qtbot, dialog)
    qtbot.mouseClick(dialog.retrieve_button, Qt.MouseButton.LeftButton)
    assert dialog.cancel_button.isEnabled()
    qtbot.mouseClick(dialog.cancel_button, Qt.MouseButton.LeftButton)  # before the first image is in
    _wait_idle(qtbot, dialog)
    assert dialog.case_dir is None and dialog.status.text() == "Cancelled; nothing was written"
    assert not (tmp_path / "cases").exists() or list((tmp_path / "cases").iterdir()) == []
