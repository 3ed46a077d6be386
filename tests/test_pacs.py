"""Into the hospital: cases as DICOM studies, a real Orthanc PACS, results back as DICOM, de-identification.

The PACS tests talk to a real Orthanc (Debian package ``orthanc``, installed by ``make test``)
started on free localhost ports in a temporary folder; no mock servers.
"""

from __future__ import annotations

import io as stdio
import json
import os
import pathlib
import re
import struct
import subprocess
import sys
import time

import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes

from inference import __version__, dicom_case, dicom_results, geometry, io, pacs
from inference.cli import run as cli_run
from inference.errors import CalibrationError, Cancelled, GeometryError, PacsError
from inference.orthanc_local import LocalOrthanc, free_port
from inference.pipeline import run_to_completion

DEMO = pathlib.Path(__file__).resolve().parent.parent / "resources" / "demo"


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    """A real Orthanc on free localhost ports (fails with a clear message if it is not installed)."""
    with LocalOrthanc(tmp_path_factory.mktemp("orthanc")) as server:
        yield server


@pytest.fixture()
def settings(orthanc):
    return pacs.PacsSettings(port=orthanc.dicom_port, called_ae=orthanc.ae_title, timeout_s=5.0)


def _synthetic_case(folder: pathlib.Path, *, angles_deg=(10.0, 75.0), cranial_deg=8.0, mirrored=False,
                    seed=0) -> pathlib.Path:
    """A small seeded case with oblique, tilted views, non-square pixels and an off-centre principal point."""
    rng = np.random.default_rng(seed)
    views = []
    for index, (name, angle) in enumerate(zip(("AP", "OBL"), angles_deg)):
        view = geometry.CArmView(sdd_mm=1100.0, sid_mm=780.0, lao_deg=angle, cranial_deg=cranial_deg, rows=60,
                                 cols=72, pixel_mm=0.6, pixel_v_mm=0.7, principal_point_px=(30.25 + index, 33.5),
                                 isocentre_mm=(-40.0, 12.5, 95.0),
                                 viewed_from="detector" if (mirrored and index == 1) else "source")
        image = rng.integers(0, 4000, size=(60, 72)).astype(np.uint16)
        views.append({"name": name, "image": image, "P": geometry.projection_matrix(view)})
    return io.write_case(folder, "left", views)


def _pixel_error(P_a: np.ndarray, P_b: np.ndarray, centre_mm: np.ndarray) -> float:
    points = centre_mm + np.random.default_rng(1).normal(scale=60.0, size=(50, 3))
    return float(np.max(np.abs(geometry.project_points(P_a, points) - geometry.project_points(P_b, points))))


def _assert_round_trip(case_dir: pathlib.Path, dicom_files: list[pathlib.Path]) -> None:
    case = io.load_case(case_dir)
    origin, gap_mm = dicom_case.case_world_origin([v.P for v in case.views])
    assert gap_mm < 1e-6
    shift = np.eye(4)
    shift[:3, 3] = origin
    for view, path in zip(case.views, dicom_files):
        P_tags, calibration = geometry.projection_from_dicom(pydicom.dcmread(path), name=view.name)
        assert calibration.source == "dicom-tags"
        # Same camera in the world moved to the isocentre; FL-typed tags limit this to ~1e-4 px.
        assert _pixel_error(P_tags, geometry.transform_world(view.P, shift), np.zeros(3)) < 1e-3


# ----------------------------------------------------------------------------- geometry tags
def test_demo_case_tags_round_trip_to_the_same_projection(tmp_path):
    files = dicom_case.case_to_dicom(DEMO, tmp_path / "dicom")
    _assert_round_trip(DEMO, files)
    ap = pydicom.dcmread(files[0])
    assert ap.Modality == "DX" and ap.SOPClassUID == dicom_case.DX_SOP_CLASS_UID
    assert list(ap.PatientOrientation) == ["L", "F"]  # AP radiograph: patient's left to the right, feet down
    assert ap.FieldOfViewHorizontalFlip == "YES"
    # PixelSpacing (isocentre plane) = ImagerPixelSpacing / magnification; the geometry uses ImagerPixelSpacing.
    magnification = float(ap.DistanceSourceToDetector) / float(ap.DistanceSourceToPatient)
    assert float(ap.PixelSpacing[0]) == pytest.approx(float(ap.ImagerPixelSpacing[0]) / magnification, rel=1e-8)
    # Written twice: the same UIDs (a PACS keeps one copy).
    again = dicom_case.case_to_dicom(DEMO, tmp_path / "again")
    assert [pydicom.dcmread(f).SOPInstanceUID for f in again] == [pydicom.dcmread(f).SOPInstanceUID for f in files]


@pytest.mark.parametrize("mirrored", [False, True])
def test_oblique_tilted_case_tags_round_trip(tmp_path, mirrored):
    case_dir = _synthetic_case(tmp_path / "case", mirrored=mirrored)
    files = dicom_case.case_to_dicom(case_dir, tmp_path / "dicom")
    _assert_round_trip(case_dir, files)
    obl = pydicom.dcmread(files[1])
    assert obl.FieldOfViewHorizontalFlip == ("NO" if mirrored else "YES")
    assert float(obl.PositionerSecondaryAngle) == pytest.approx(8.0)
    assert obl.ImageLaterality == "L"


def test_field_of_view_horizontal_flip_mirrors_the_projection():
    tags = {"ImagerPixelSpacing": [0.3, 0.25], "DistanceSourceToDetector": 1100.0, "DistanceSourceToPatient": 800.0,
            "PositionerPrimaryAngle": 30.0, "PositionerSecondaryAngle": -5.0, "Rows": 90, "Columns": 120,
            "PositionOfIsocenterProjection": [40.0, 70.0]}
    P_detector, calibration = geometry.projection_from_dicom(tags)
    P_flipped, flipped_calibration = geometry.projection_from_dicom({**tags, "FieldOfViewHorizontalFlip": "YES"})
    points = np.random.default_rng(2).normal(scale=50.0, size=(20, 3))
    expected = geometry.project_points(geometry.flip_horizontal(P_detector, 120), points)
    np.testing.assert_allclose(geometry.project_points(P_flipped, points), expected, atol=1e-9)
    assert calibration.details["view"]["viewed_from"] == "detector"
    assert flipped_calibration.details["view"]["viewed_from"] == "source"
    assert flipped_calibration.details["warnings"] == []


def test_in_plane_rotated_detector_is_refused(tmp_path):
    view = geometry.CArmView(sdd_mm=1000, sid_mm=900, lao_deg=0, cranial_deg=0, rows=50, cols=50, pixel_mm=0.5)
    P = geometry.projection_matrix(view)
    angle = np.radians(7.0)
    rotate = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    with pytest.raises(GeometryError, match="rotated in its own plane"):
        dicom_case.geometry_tags(rotate @ P, 50, 50, (0.0, 0.0, 0.0))


def test_missing_geometry_tag_is_named_and_no_case_is_written(tmp_path):
    files = dicom_case.case_to_dicom(DEMO, tmp_path / "dicom")
    broken = pydicom.dcmread(files[1])
    del broken.DistanceSourceToDetector
    broken.save_as(files[1])
    with pytest.raises(CalibrationError, match=r"DistanceSourceToDetector \(0018,1110\) is missing"):
        dicom_case.study_to_case(files, tmp_path / "case")
    assert not (tmp_path / "case").exists()


# ----------------------------------------------------------------------------- PACS
def test_echo_find_get_makes_a_calibrated_case(tmp_path, orthanc, settings):
    patient = dicom_case.PatientInfo(patient_id="PACS-0001", patient_name="TEST^HIP", accession_number="ACC17",
                                     study_date="20260315")
    files = dicom_case.case_to_dicom(DEMO, tmp_path / "dicom", patient=patient)
    assert pacs.echo(settings) < settings.timeout_s
    stored = run_to_completion(pacs.send(settings, [tmp_path / "dicom"]))
    assert sorted(stored) == sorted(str(pydicom.dcmread(f).SOPInstanceUID) for f in files)

    studies = pacs.find_studies(settings, patient_id="PACS-0001")
    assert len(studies) == 1 and studies[0]["AccessionNumber"] == "ACC17"
    assert pacs.find_studies(settings, patient_name="TEST^H*", study_date="20260301-20260331")[0] == studies[0]
    assert pacs.find_studies(settings, accession_number="NO-SUCH") == []
    series = pacs.find_series(settings, studies[0]["StudyInstanceUID"])
    assert [s["SeriesDescription"] for s in series] == ["AP", "LAT"]

    fractions = []
    case_dir = run_to_completion(pacs.retrieve_case(settings, studies[0]["StudyInstanceUID"], tmp_path / "case",
                                                    series_uids=[s["SeriesInstanceUID"] for s in series]),
                                 lambda p: fractions.append(p.fraction))
    assert fractions[-1] == 1.0 and fractions == sorted(fractions)
    case = io.load_case(case_dir)
    assert case.side == "right" and [v.name for v in case.views] == ["AP", "LAT"]
    assert all(v.calibration.source == "dicom-tags" for v in case.views)
    source = json.loads((case_dir / "dicom_source.json").read_text())
    assert [v["calibration"]["source"] for v in source["views"]] == ["dicom-tags", "dicom-tags"]
    assert "FieldOfViewHorizontalFlip (0018,7034)" in source["views"][0]["calibration"]["tags_used"]
    demo = io.load_case(DEMO)
    origin, _ = dicom_case.case_world_origin([v.P for v in demo.views])
    shift = np.eye(4)
    shift[:3, 3] = origin
    for got, want in zip(case.views, demo.views):
        assert _pixel_error(got.P, geometry.transform_world(want.P, shift), np.zeros(3)) < 1e-3
        np.testing.assert_allclose(got.image.pixels, want.image.pixels)


def test_interrupted_retrieve_leaves_no_case(tmp_path, orthanc, settings):
    dicom_case.case_to_dicom(DEMO, tmp_path / "dicom", patient=dicom_case.PatientInfo(patient_id="PACS-CANCEL"))
    run_to_completion(pacs.send(settings, [tmp_path / "dicom"]))
    study = pacs.find_studies(settings, patient_id="PACS-CANCEL")[0]["StudyInstanceUID"]
    target = tmp_path / "cases" / "case"
    with pytest.raises(Cancelled):
        run_to_completion(pacs.retrieve_case(settings, study, target, cancel=lambda: True))
    assert not target.exists()
    assert list((tmp_path / "cases").iterdir()) == []  # no temporary leftovers either


def test_pacs_going_down_during_a_retrieve_leaves_no_case(tmp_path):
    files = dicom_case.case_to_dicom(DEMO, tmp_path / "dicom", patient=dicom_case.PatientInfo(patient_id="PACS-DOWN"))
    with LocalOrthanc(tmp_path / "orthanc") as server:
        settings = pacs.PacsSettings(port=server.dicom_port, timeout_s=3.0)
        run_to_completion(pacs.send(settings, files))
        series = [s["SeriesInstanceUID"] for s in pacs.find_series(settings, str(pydicom.dcmread(files[0]).StudyInstanceUID))]

        def pacs_dies():  # called after the first image arrived: the PACS process goes away
            server.stop()
            return False

        target = tmp_path / "cases" / "case"
        with pytest.raises(PacsError, match="the connection was lost during the retrieve .* nothing was kept"):
            run_to_completion(pacs.retrieve_case(settings, str(pydicom.dcmread(files[0]).StudyInstanceUID), target,
                                                 series_uids=series, cancel=pacs_dies))
    assert not target.exists() and list((tmp_path / "cases").iterdir()) == []


def test_unreachable_and_refusing_pacs_fail_fast_with_one_line(tmp_path, orthanc, capsys):
    refused = pacs.PacsSettings(port=free_port(), timeout_s=3.0)
    started = time.perf_counter()
    with pytest.raises(PacsError, match="connection refused"):
        pacs.echo(refused)
    assert time.perf_counter() - started < 3.0
    # The rejection's wording is checked here, not its speed: a loaded machine's Orthanc can take
    # more than 3 s to answer (seen once while a training ran beside the test suite).
    # Once in about five whole-suite runs (session 9, machine otherwise idle) the local Orthanc
    # aborted this association instead of rejecting it; a second attempt must give the rejection.
    wrong_ae = pacs.PacsSettings(port=orthanc.dicom_port, called_ae="NOT-ORTHANC", timeout_s=20.0)
    for attempt in range(2):
        with pytest.raises(PacsError) as refusal:
            pacs.echo(wrong_ae)
        if "aborted or not answered" not in str(refusal.value):
            break
    assert re.search("rejected the association.*NOT-ORTHANC", str(refusal.value)), str(refusal.value)
    started = time.perf_counter()
    status = cli_run(["pacs", "--port", str(refused.port), "--timeout", "3", "find", "--patient-id", "X"])
    assert status == 2 and time.perf_counter() - started < 3.0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hipatlas: error: PACS ORTHANC at 127.0.0.1:")


def test_pacs_that_never_answers_fails_within_the_timeout():
    import socket

    with socket.socket() as silent:  # accepts TCP connections (backlog) but never speaks DICOM
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        hung = pacs.PacsSettings(port=silent.getsockname()[1], timeout_s=1.5)
        started = time.perf_counter()
        with pytest.raises(PacsError, match="aborted or not answered"):
            pacs.echo(hung)
        assert time.perf_counter() - started < 1.5 + 2.0


def test_dicom_over_tls(tmp_path):
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        pytest.fail("openssl is needed to make the test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    with LocalOrthanc(tmp_path / "orthanc", tls=(str(cert), str(key), str(cert))) as server:
        secure = pacs.PacsSettings(port=server.dicom_port, timeout_s=3.0, tls=True, tls_ca_file=str(cert))
        assert pacs.echo(secure) < 3.0
        started = time.perf_counter()
        with pytest.raises(PacsError, match="aborted or not answered"):
            pacs.echo(pacs.PacsSettings(port=server.dicom_port, timeout_s=2.0))  # plain DICOM to a TLS port
        assert time.perf_counter() - started < 2.0 + 2.0
        untrusted = pacs.PacsSettings(port=server.dicom_port, timeout_s=2.0, tls=True)  # system CAs only
        with pytest.raises(PacsError, match="TLS"):
            pacs.echo(untrusted)


def test_cli_settings_file_echo_and_find(tmp_path, orthanc, capsys, monkeypatch):
    monkeypatch.setenv("HIPATLAS_CONFIG_DIR", str(tmp_path / "config"))
    assert cli_run(["pacs", "--port", str(orthanc.dicom_port), "--aet", "ORTHANC", "--timeout", "4", "configure"]) == 0
    saved = json.loads((tmp_path / "config" / "pacs.json").read_text())
    assert saved["port"] == orthanc.dicom_port and saved["timeout_s"] == 4 and saved["tls"] is False
    assert pacs.load_settings().port == orthanc.dicom_port
    capsys.readouterr()
    assert cli_run(["pacs", "echo"]) == 0
    assert "answered C-ECHO" in capsys.readouterr().out
    dicom_case.case_to_dicom(DEMO, tmp_path / "dicom", patient=dicom_case.PatientInfo(patient_id="PACS-CLI"))
    assert cli_run(["pacs", "send", str(tmp_path / "dicom")]) == 0
    capsys.readouterr()
    assert cli_run(["pacs", "find", "--patient-id", "PACS-CLI", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 1 and rows[0]["PatientID"] == "PACS-CLI"


# ----------------------------------------------------------------------------- results as DICOM
def _binary_stl(triangles: np.ndarray) -> bytes:
    out = stdio.BytesIO()
    out.write(b"HipAtlas femur surface, world LPS mm".ljust(80, b" "))
    out.write(struct.pack("<I", len(triangles)))
    for tri in triangles:
        normal = np.cross(tri[1] - tri[0], tri[2] - tri[0])
        out.write(struct.pack("<12fH", *normal, *tri.reshape(-1), 0))
    return out.getvalue()


def _small_pdf() -> bytes:
    from reportlab.pdfgen import canvas

    buffer = stdio.BytesIO()
    page = canvas.Canvas(buffer)
    page.drawString(72, 720, "HipAtlas planning report (test)")
    page.save()
    return buffer.getvalue()


BALL_RADIUS_MM = 20.0


def _results_folder(folder: pathlib.Path, case_dir: pathlib.Path) -> dict:
    """A registration output folder with known content, for a case made of DICOM radiographs."""
    rng = np.random.default_rng(3)
    case = io.load_case(case_dir)
    folder.mkdir()
    measurements = {"side": case.side, "hip_centre_mm": [12.5, -3.25, 40.0], "head_radius_mm": 23.5,
                    "femoral_offset_mm": 41.2, "neck_shaft_angle_deg": 128.5, "vertical_offset_mm": 55.0}
    io.write_json_atomic(folder / "measurements.json", measurements)
    report = {"case_dir": str(case_dir), "model": {"name": "hipatlas-test-model", "sha256": "ab" * 32},
              "views": [{"name": v.name, "image_sha256": v.image.sha256} for v in case.views]}
    io.write_json_atomic(folder / "report.json", report)
    (folder / "femur_surface.stl").write_bytes(_binary_stl(rng.normal(size=(4, 3, 3)).astype(np.float32)))
    for view in case.views:
        io.write_png_atomic(folder / f"overlay_{view.name}.png",
                            rng.integers(0, 255, size=view.image.shape + (3,)).astype(np.uint8))
    (folder / "planning_report.pdf").write_bytes(_small_pdf())
    # The "femur": a 20 mm ball at the hip centre, 1 mm voxels.
    grid = geometry.VolumeGeometry((50, 50, 50), (1.0, 1.0, 1.0), tuple(np.asarray(measurements["hip_centre_mm"]) - 24.5))
    k, j, i = np.mgrid[:50, :50, :50]
    labels = ((i - 24.5) ** 2 + (j - 24.5) ** 2 + (k - 24.5) ** 2 <= BALL_RADIUS_MM ** 2).astype(np.uint8)
    io.write_volume(folder / "femur_labels.nii.gz", labels, grid, dtype=np.uint8)
    return measurements


def _text_items(dataset, concept) -> list[str]:
    """TextValue of every content item named ``concept``, at any depth of an SR."""
    found = []
    for item in dataset.get("ContentSequence", []):
        name = item.get("ConceptNameCodeSequence")
        if name and name[0].CodeValue == concept.value and "TextValue" in item:
            found.append(str(item.TextValue))
        found += _text_items(item, concept)
    return found


def test_results_stored_in_pacs_read_back_and_resend_does_not_duplicate(tmp_path, orthanc, settings):
    import highdicom as hd

    patient = dicom_case.PatientInfo(patient_id="PACS-RESULTS", patient_name="RESULT^TEST")
    files = dicom_case.case_to_dicom(DEMO, tmp_path / "dicom", patient=patient)
    case_dir = dicom_case.study_to_case(files, tmp_path / "case")
    measurements = _results_folder(tmp_path / "out", case_dir)
    written = dicom_results.export_results(tmp_path / "out", tmp_path / "dicom_out")
    assert sorted(written) == ["gsps_AP", "gsps_LAT", "overlay_AP", "overlay_LAT", "pdf", "sr", "stl"]

    run_to_completion(pacs.send(settings, [tmp_path / "dicom"]))
    before = len(orthanc.instances())
    run_to_completion(pacs.send(settings, [tmp_path / "dicom_out"]))
    assert len(orthanc.instances()) == before + 7
    run_to_completion(pacs.send(settings, [tmp_path / "dicom_out"]))  # a retried send
    again = dicom_results.export_results(tmp_path / "out", tmp_path / "dicom_again")  # a repeated export
    run_to_completion(pacs.send(settings, [tmp_path / "dicom_again"]))
    assert len(orthanc.instances()) == before + 7

    source = pydicom.dcmread(files[0])
    stored = {}
    for orthanc_id in orthanc.instances(patient_id="PACS-RESULTS"):
        ds = pydicom.dcmread(stdio.BytesIO(orthanc.instance_file(orthanc_id)))
        stored[str(ds.SOPInstanceUID)] = ds
    assert len(stored) == 2 + 7
    by_file = {name: stored[str(pydicom.dcmread(path).SOPInstanceUID)] for name, path in written.items()}
    assert {str(ds.StudyInstanceUID) for ds in by_file.values()} == {str(source.StudyInstanceUID)}
    assert len({str(ds.SeriesInstanceUID) for ds in by_file.values()}) == 5
    assert not {str(ds.SOPInstanceUID) for ds in by_file.values()} & {str(pydicom.dcmread(f).SOPInstanceUID)
                                                                      for f in files}
    assert {name: str(pydicom.dcmread(p).SOPInstanceUID) for name, p in again.items()} == \
        {name: str(ds.SOPInstanceUID) for name, ds in by_file.items()}

    # The study now holds results too; retrieving it again still makes a case of its two radiographs.
    again_case = run_to_completion(pacs.retrieve_case(settings, str(source.StudyInstanceUID), tmp_path / "again"))
    assert [v.name for v in io.load_case(again_case).views] == ["AP", "LAT"]

    # The SR: TID 1500 with coded concepts, UCUM units, the hip centre in 3D, the observer context.
    sr_file = tmp_path / "sr_back.dcm"
    by_file["sr"].save_as(sr_file)
    sr = hd.sr.srread(sr_file)
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    (head,) = sr.content.get_planar_roi_measurement_groups()
    np.testing.assert_allclose(head.roi.value, [measurements["hip_centre_mm"]])
    assert head.roi.frame_of_reference_uid == source.FrameOfReferenceUID
    (radius,) = head.get_measurements()
    assert (radius.name.value, radius.name.scheme_designator) == ("131190003", "SCT")
    assert radius.value == pytest.approx(23.5) and radius.unit.value == "mm"
    (femur,) = sr.content.get_image_measurement_groups()
    got = {m.name.meaning: (m.value, m.unit.value) for m in femur.get_measurements()}
    assert got == {"Femoral offset": (pytest.approx(41.2), "mm"),
                   "Femoral neck-shaft angle": (pytest.approx(128.5), "deg"),
                   "Vertical offset, head centre to lesser trochanter": (pytest.approx(55.0), "mm")}
    (device,) = [o.observer_identifying_attributes for o in sr.content.get_observer_contexts()
                 if o.observer_type.value == "121007"]  # DCM Device
    assert (device.name, device.model_name) == ("HipAtlas", "hipatlas-test-model")
    assert set(_text_items(sr, codes.DCM.AlgorithmVersion)) == {__version__}
    assert set(_text_items(sr, codes.DCM.AlgorithmName)) == {"HipAtlas"}
    evidence = {str(item.ReferencedSOPInstanceUID) for study in sr.CurrentRequestedProcedureEvidenceSequence
                for series in study.ReferencedSeriesSequence for item in series.ReferencedSOPSequence}
    assert evidence == {str(pydicom.dcmread(f).SOPInstanceUID) for f in files}

    # PDF and STL come back byte for byte; overlays name their radiograph.
    pdf = by_file["pdf"]
    assert pdf.MIMETypeOfEncapsulatedDocument == "application/pdf"
    assert bytes(pdf.EncapsulatedDocument)[:pdf.EncapsulatedDocumentLength] == \
        (tmp_path / "out" / "planning_report.pdf").read_bytes()
    stl = by_file["stl"]
    assert stl.MIMETypeOfEncapsulatedDocument == "model/stl" and stl.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert bytes(stl.EncapsulatedDocument)[:stl.EncapsulatedDocumentLength] == \
        (tmp_path / "out" / "femur_surface.stl").read_bytes()
    overlay = by_file["overlay_AP"]
    assert overlay.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    from PIL import Image

    np.testing.assert_array_equal(overlay.pixel_array, np.asarray(Image.open(tmp_path / "out" / "overlay_AP.png")))

    # The presentation state over the AP radiograph: the ball's outline where the camera puts it.
    gsps = by_file["gsps_AP"]
    assert gsps.SOPClassUID == "1.2.840.10008.5.1.4.1.1.11.1" and gsps.StudyInstanceUID == source.StudyInstanceUID
    assert gsps.ReferencedSeriesSequence[0].ReferencedImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    layers = {a.GraphicLayer: a for a in gsps.GraphicAnnotationSequence}
    (outline,) = layers["FEMUR"].GraphicObjectSequence
    assert outline.GraphicType == "POLYLINE" and outline.GraphicAnnotationUnits == "PIXEL"
    outline_uv = np.asarray(outline.GraphicData, dtype=float).reshape(-1, 2) - 0.5  # to pixel centres
    P, _ = geometry.projection_from_dicom(source)
    centre = np.asarray(measurements["hip_centre_mm"])
    centre_uv = geometry.project_points(P, centre[None])[0]
    K, _, _ = geometry.decompose(P)
    distance_mm = np.linalg.norm(centre - geometry.source_position(P))
    # The voxelised ball's surface lies half a voxel outside its outer voxel centres; a ball of radius r
    # at distance d projects to a circle of radius f r / sqrt(d^2 - r^2). project_label blurs by ~1 voxel.
    radius_mm = BALL_RADIUS_MM + 0.5
    expected_px = K[0, 0] * radius_mm / np.sqrt(distance_mm ** 2 - radius_mm ** 2)
    radii = np.linalg.norm(outline_uv - centre_uv, axis=1)
    assert abs(radii.mean() - expected_px) < 1.5 and radii.std() < 1.0, (radii.mean(), expected_px, radii.std())
    point = [o for o in layers["MEASUREMENTS"].GraphicObjectSequence if o.GraphicType == "POINT"][0]
    np.testing.assert_allclose(np.asarray(point.GraphicData, dtype=float) - 0.5, centre_uv, atol=1e-3)
    assert "head radius 23.5 mm" in layers["MEASUREMENTS"].TextObjectSequence[0].UnformattedTextValue


def test_results_need_dicom_radiographs(tmp_path):
    _results_folder(tmp_path / "out", DEMO)
    with pytest.raises(Exception, match="no DICOM radiographs"):
        dicom_results.export_results(tmp_path / "out", tmp_path / "dicom_out")
    assert not (tmp_path / "dicom_out").exists()


# ----------------------------------------------------------------------------- de-identification
_SAMPLE_VALUES = {"DA": "20240229", "TM": "101530", "DT": "20240229101530", "PN": "DOE^JANE", "AS": "045Y",
                  "CS": "SECRET", "AE": "SECRETAE", "UI": "1.2.826.0.1.3680043.8.498.{n}", "IS": "7", "DS": "7.5",
                  "US": 7, "SS": 7, "UL": 7, "SL": 7, "FL": 7.5, "FD": 7.5, "SV": 7, "UV": 7, "AT": 0x00100010}


def _value_for(vr: str, n: int):
    if vr in _SAMPLE_VALUES:
        value = _SAMPLE_VALUES[vr]
        return value.format(n=n) if isinstance(value, str) else value
    if vr in ("OB", "OW", "OD", "OF", "OL", "OV", "UN"):
        return b"SECRET!!"
    if vr == "UR":
        return "http://example.org/SECRET"
    return "SECRET TEXT"  # LO, SH, ST, LT, UT, UC


def _dataset_with_every_profile_tag():
    """A dataset holding every attribute the Basic Profile acts on (that pydicom knows), with values to find."""
    from pydicom import Dataset
    from pydicom.datadict import dictionary_VR

    from inference.deidentify import basic_profile_actions

    ds, actions = Dataset(), basic_profile_actions()
    for n, (tag, action) in enumerate(sorted(actions.items())):
        if tag >> 16 in (0x0000, 0x0002):  # command and file meta elements live outside a stored dataset
            continue
        try:
            vr = dictionary_VR(tag).split(" or ")[0]
        except KeyError:
            continue
        if vr == "SQ":
            item = Dataset()
            item.PatientName = "DOE^JANE"
            item.ReferencedSOPInstanceUID = f"1.2.826.0.1.3680043.8.498.9{n}"
            ds.add_new(tag, vr, [item])
        else:
            ds.add_new(tag, vr, _value_for(vr, n))
    ds.add_new(0x00291010, "LO", "PRIVATE SECRET")  # a private attribute
    ds.add_new(0x00290010, "LO", "SOME VENDOR")
    ds.add_new(0x60000022, "LO", "overlay description")  # an overlay plane
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    return ds, actions


def test_deidentification_applies_every_basic_profile_action(tmp_path):
    from pydicom.datadict import keyword_for_tag

    from inference.deidentify import Deidentifier

    original, actions = _dataset_with_every_profile_tag()
    assert len(original) > 400
    original.save_as(tmp_path / "in.dcm", implicit_vr=False, little_endian=True)
    deidentify = Deidentifier(pseudonym="STUDY-042", salt="test-salt")
    cleaned = deidentify(pydicom.dcmread(tmp_path / "in.dcm", force=True))
    cleaned.save_as(tmp_path / "out.dcm", implicit_vr=False, little_endian=True)
    cleaned = pydicom.dcmread(tmp_path / "out.dcm", force=True)
    checked = 0
    for tag, action in actions.items():
        if tag not in original:
            continue
        before = original[tag]
        name = keyword_for_tag(tag)
        if tag in (0x00100010, 0x00100020):  # Patient's Name and ID: the pseudonym
            assert str(cleaned[tag].value) == "STUDY-042"
        elif tag == 0x0040A730:  # Content Sequence: kept (Clean Structured Content), UIDs replaced
            item = cleaned[tag].value[0]
            assert item.ReferencedSOPInstanceUID != before.value[0].ReferencedSOPInstanceUID
        elif tag == 0x00420011:  # Encapsulated Document: kept (a HipAtlas mesh; see inference.deidentify)
            assert cleaned[tag].value == before.value
        elif action == "U" or (action == "XU" and before.VR == "UI"):
            assert str(cleaned[tag].value).startswith("2.25.") and cleaned[tag].value != before.value, name
        elif action in ("X", "XU"):
            assert tag not in cleaned, f"{name} must be removed"
        elif action == "Z":
            assert tag in cleaned and cleaned[tag].value in (None, "", b"", []), f"{name} must be empty"
        elif action == "D":
            assert tag in cleaned, f"{name} must be replaced, not removed"
            if before.VR == "SQ":
                assert all(str(item.get("PatientName", "")) != "DOE^JANE" for item in cleaned[tag].value), name
            else:
                assert cleaned[tag].value != before.value, f"{name} still holds its value"
        checked += 1
    assert checked > 400
    assert 0x00291010 not in cleaned and 0x00290010 not in cleaned and 0x60000022 not in cleaned
    assert cleaned.PatientIdentityRemoved == "YES"
    assert [c.CodeValue for c in cleaned.DeidentificationMethodCodeSequence] == ["113100", "113104"]
    # One new UID per old UID: references between de-identified objects still resolve.
    second = deidentify(pydicom.dcmread(tmp_path / "in.dcm", force=True))
    assert second.StudyInstanceUID == cleaned.StudyInstanceUID and second.SOPInstanceUID == cleaned.SOPInstanceUID
    assert Deidentifier(salt="other").new_uid(str(original.StudyInstanceUID)) != cleaned.StudyInstanceUID


def test_anonymised_export_holds_no_identifiers_and_references_resolve(tmp_path):
    patient = dicom_case.PatientInfo(patient_id="SECRET-ID", patient_name="SECRET^NAME", accession_number="SECRETACC",
                                     patient_birth_date="19500101", study_date="20260315")
    files = dicom_case.case_to_dicom(DEMO, tmp_path / "dicom", patient=patient)
    case_dir = dicom_case.study_to_case(files, tmp_path / "case")
    _results_folder(tmp_path / "out", case_dir)
    with pytest.raises(Exception, match="PDF cannot be de-identified"):
        dicom_results.export_results(tmp_path / "out", tmp_path / "anon", anonymise=True,
                                     pdf=tmp_path / "out" / "planning_report.pdf")
    written = dicom_results.export_results(tmp_path / "out", tmp_path / "anon", anonymise=True, pseudonym="R-7")
    assert "pdf" not in written and {"radiograph_1", "radiograph_2", "sr", "stl"} <= set(written)
    originals = {str(pydicom.dcmread(f).SOPInstanceUID) for f in files} | {str(pydicom.dcmread(files[0]).StudyInstanceUID)}
    radiograph_uids = {str(pydicom.dcmread(written[k]).SOPInstanceUID) for k in ("radiograph_1", "radiograph_2")}
    for path in written.values():
        raw = path.read_bytes()
        for secret in (b"SECRET", b"19500101", b"20260315", *(u.encode() for u in originals)):
            assert secret not in raw, f"{path.name} still holds {secret!r}"
        assert pydicom.dcmread(path).PatientID == "R-7"
    sr = pydicom.dcmread(written["sr"])
    evidence = {str(item.ReferencedSOPInstanceUID) for study in sr.CurrentRequestedProcedureEvidenceSequence
                for series in study.ReferencedSeriesSequence for item in series.ReferencedSOPSequence}
    assert evidence == radiograph_uids
    # The geometry survives: the de-identified radiographs still calibrate the same cameras.
    for key, original in zip(("radiograph_1", "radiograph_2"), files):
        P_anon, _ = geometry.projection_from_dicom(pydicom.dcmread(written[key]))
        P_orig, _ = geometry.projection_from_dicom(pydicom.dcmread(original))
        np.testing.assert_allclose(P_anon, P_orig)


@pytest.mark.slow
def test_retrieve_register_and_store_results_end_to_end(tmp_path, orthanc, settings):
    """The hospital round trip with the shipped model: PACS -> case -> register --dicom-out -> PACS."""
    import highdicom as hd

    dicom_case.case_to_dicom(DEMO, tmp_path / "dicom", patient=dicom_case.PatientInfo(patient_id="PACS-E2E"))
    run_to_completion(pacs.send(settings, [tmp_path / "dicom"]))
    study = pacs.find_studies(settings, patient_id="PACS-E2E")[0]["StudyInstanceUID"]
    case_dir = run_to_completion(pacs.retrieve_case(settings, study, tmp_path / "case"))
    assert cli_run(["register", str(case_dir), "--out", str(tmp_path / "out"), "--dicom-out",
                    str(tmp_path / "dicom_out"), "--quiet"]) == 0
    measurements = json.loads((tmp_path / "out" / "measurements.json").read_text())
    stored = run_to_completion(pacs.send(settings, [tmp_path / "dicom_out"]))
    assert len(stored) == 6  # SR, STL, two overlays, two presentation states (register makes no PDF)
    sr_uid = str(pydicom.dcmread(tmp_path / "dicom_out" / "measurements_sr.dcm").SOPInstanceUID)
    (orthanc_id,) = [i for i in orthanc.instances(patient_id="PACS-E2E")
                     if orthanc.rest(f"/instances/{i}/simplified-tags").get("SOPInstanceUID") == sr_uid]
    (tmp_path / "back.dcm").write_bytes(orthanc.instance_file(orthanc_id))
    sr = hd.sr.srread(tmp_path / "back.dcm")
    assert str(sr.StudyInstanceUID) == study
    (head,) = sr.content.get_planar_roi_measurement_groups()
    np.testing.assert_allclose(head.roi.value[0], measurements["hip_centre_mm"], rtol=1e-6)
    assert head.get_measurements()[0].value == pytest.approx(measurements["head_radius_mm"])


def test_cli_case_to_dicom_get_and_dicom_export(tmp_path, orthanc, capsys):
    port = ["pacs", "--port", str(orthanc.dicom_port), "--timeout", "5"]
    assert cli_run(["case-to-dicom", str(DEMO), "--out", str(tmp_path / "dicom"), "--patient-id", "PACS-CLI-GET",
                    "--accession", "A-17"]) == 0
    assert cli_run(port + ["send", str(tmp_path / "dicom")]) == 0
    capsys.readouterr()
    assert cli_run(port + ["find", "--accession", "A-17", "--json"]) == 0
    (study,) = json.loads(capsys.readouterr().out)
    assert cli_run(port + ["get", study["StudyInstanceUID"], "--out", str(tmp_path / "case")]) == 0
    assert capsys.readouterr().out.splitlines() == ["AP: ap.dcm, calibration from dicom-tags",
                                                    "LAT: lat.dcm, calibration from dicom-tags"]
    assert cli_run(port + ["get", study["StudyInstanceUID"], "--out", str(tmp_path / "case")]) == 2  # exists
    assert "already exists" in capsys.readouterr().err
    _results_folder(tmp_path / "out", tmp_path / "case")
    assert cli_run(["dicom-export", str(tmp_path / "out"), "--out", str(tmp_path / "dicom_out")]) == 0
    listed = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    assert set(listed) == {"sr", "pdf", "stl", "overlay_AP", "overlay_LAT", "gsps_AP", "gsps_LAT"}
    assert all(pathlib.Path(p).is_file() for p in listed.values())


@pytest.mark.slow
def test_simulated_case_through_the_pacs_keeps_its_cameras(tmp_path, orthanc, settings):
    """A `hipatlas simulate` phantom case, stored as DX and retrieved: same cameras, same pixels."""
    from inference.data.simulate import simulate_phantom_case

    case_dir = simulate_phantom_case("MC22:left", 5, tmp_path / "sim", detector=(256, 256, 1.2))
    files = dicom_case.case_to_dicom(case_dir, tmp_path / "dicom", patient=dicom_case.PatientInfo(patient_id="SIM-5"))
    _assert_round_trip(case_dir, files)
    run_to_completion(pacs.send(settings, files))
    study = pacs.find_studies(settings, patient_id="SIM-5")[0]["StudyInstanceUID"]
    retrieved = io.load_case(run_to_completion(pacs.retrieve_case(settings, study, tmp_path / "case")))
    original = io.load_case(case_dir)
    assert retrieved.side == original.side == "left"
    origin, _ = dicom_case.case_world_origin([v.P for v in original.views])
    shift = np.eye(4)
    shift[:3, 3] = origin
    for got, want in zip(retrieved.views, original.views):
        assert _pixel_error(got.P, geometry.transform_world(want.P, shift), np.zeros(3)) < 1e-3
        np.testing.assert_allclose(got.image.pixels, want.image.pixels)


@pytest.mark.slow
def test_pacs_demo_runs_the_whole_round_trip(tmp_path):
    """`make pacs-demo`: load, retrieve, register, report, store back, read back (one process that
    renders the report's 3D pictures, so it must never have loaded TensorFlow)."""
    root = pathlib.Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, str(root / "tools" / "pacs_demo.py"), "--out", str(tmp_path / "demo")],
                          cwd=root, capture_output=True, encoding="utf-8", timeout=1200,
                          env=dict(os.environ, PYTHONPATH=str(root)))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "stored 7 result objects: sr, pdf, stl" in done.stdout
    assert "(no duplicates)" in done.stdout and "SR read back from the PACS" in done.stdout


class _GoneAfterFirstSeries:
    """An association whose PACS answers the first C-GET completely and is gone before the next
    (the race the test above meets now and then): pynetdicom then raises RuntimeError."""

    def __init__(self, races: bool):
        self.is_established = True
        self.races = races  # True: still 'established' when the second C-GET starts, then drops
        self.requests = 0

    def send_c_get(self, query, sop_class):
        self.requests += 1
        if self.requests > 1:
            self.is_established = False
            raise RuntimeError("The association with a peer SCP must be established before sending a C-GET request")
        status = pydicom.Dataset()
        status.Status = 0x0000
        yield status, None
        self.is_established = self.races

    def release(self):
        self.is_established = False


@pytest.mark.parametrize("races", [False, True])
def test_a_pacs_gone_between_two_series_is_a_lost_connection_not_a_crash(tmp_path, monkeypatch, races):
    assoc = _GoneAfterFirstSeries(races)
    monkeypatch.setattr(pacs, "_associate", lambda *args, **kwargs: assoc)
    settings = pacs.PacsSettings(port=free_port(), timeout_s=3.0)
    with pytest.raises(PacsError, match="the connection was lost during the retrieve .* nothing was kept"):
        run_to_completion(pacs.retrieve_files(settings, "1.2.3", tmp_path, series_uids=["1.2.3.1", "1.2.3.2"]))
    assert assoc.requests == (2 if races else 1)
