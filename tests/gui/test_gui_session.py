"""The workstation's Qt-free core: mask edits, calibration import, session, export, projects, recovery.

These tests need no display.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from app import imaging, masks, project
from app.session import ExportOptions, RadiographImport, Session, measurement_rows, read_calibration_json
from gui_helpers import FEMUR, DETECTOR, synthetic_register, view_projections, write_dicom, write_synthetic_case
from inference import geometry, io, pipeline
from inference.errors import CalibrationError, CaseFormatError, DataError, InputFileError, OutputError


# ------------------------------------------------------------------------------ mask edits
def test_brush_segment_paints_the_capsule_around_the_segment():
    mask = np.zeros((20, 24), dtype=bool)
    edit = masks.paint_segment(mask, (2.0, 10.0), (17.0, 10.0), radius_px=1.0, value=True)
    # Rows 9-11 for u = 2..17 (distance <= 1 from the segment) plus the two end caps (1,10), (18,10).
    expected = np.zeros_like(mask)
    expected[9:12, 2:18] = True
    expected[10, 1] = expected[10, 18] = True
    assert np.array_equal(mask, expected)
    assert edit.changed_pixels == 50
    masks.apply_edit(mask, edit, undo=True)
    assert not mask.any()
    masks.apply_edit(mask, edit)
    assert np.array_equal(mask, expected)


def test_eraser_and_out_of_image_strokes():
    mask = np.ones((10, 10), dtype=bool)
    masks.paint_segment(mask, (0.0, 0.0), (0.0, 0.0), radius_px=1.0, value=False)
    assert not mask[0, 0] and not mask[0, 1] and not mask[1, 0] and mask[1, 1]
    assert masks.paint_segment(mask, (50.0, 50.0), (60.0, 60.0), radius_px=2.0, value=False) is None


def test_polygon_fill_uses_pixel_centres_half_open():
    mask = np.zeros((12, 12), dtype=bool)
    edit = masks.fill_polygon(mask, np.array([[2, 2], [7, 2], [7, 7], [2, 7]], float), True)
    assert mask.sum() == 25 and mask[2:7, 2:7].all()
    assert edit.changed_pixels == 25
    # a triangle: pixel count close to its area (0.5 * 30 * 30 = 450)
    big = np.zeros((40, 40), dtype=bool)
    masks.fill_polygon(big, np.array([[5.2, 5.1], [35.2, 5.1], [5.2, 35.1]]), True)
    assert abs(int(big.sum()) - 450) <= 16
    masks.fill_polygon(big, np.array([[0, 0], [40, 0], [40, 40], [0, 40]], float), False)
    assert not big.any()


def test_edit_between_folds_a_stroke_into_one_rectangle():
    before = np.zeros((30, 30), dtype=bool)
    after = before.copy()
    after[5, 7] = after[20, 12] = True
    edit = masks.edit_between(before, after)
    assert (edit.row0, edit.col0, edit.before.shape) == (5, 7, (16, 6))
    restored = after.copy()
    masks.apply_edit(restored, edit, undo=True)
    assert np.array_equal(restored, before)
    assert masks.edit_between(before, before) is None


# ------------------------------------------------------------------------------ display helpers
@pytest.mark.parametrize("view", ["axial", "coronal", "sagittal"])
def test_slice_cursor_round_trip(view):
    shape = (7, 5, 6)
    index = (5, 1, 4)
    row, col = imaging.slice_cursor_px(index, shape, view)
    assert imaging.index_from_slice_px(index, shape, view, row, col) == index
    volume = np.arange(np.prod(shape)).reshape(shape)
    assert imaging.volume_slice(volume, view, index[imaging.SLICE_AXES[view][0]])[row, col] == volume[index]


def test_measurement_rows_in_cm():
    rows = dict((label, (value, unit)) for label, value, unit in measurement_rows(FEMUR.measurements(), "cm"))
    assert rows["Femoral head radius"] == ("1.20", "cm")
    assert rows["Neck-shaft angle (CCD)"] == ("130.0", "deg")
    assert rows["Hip centre (x, y, z)"] == ("3.50, 0.00, 2.00", "cm")


# ------------------------------------------------------------------------------ calibration import
def test_calibration_json_matrix_and_carm_forms(tmp_path):
    P = view_projections()[0]
    matrix_file = tmp_path / "ap.json"
    matrix_file.write_text(json.dumps({"format": "hipatlas-calibration/1", "projection_matrix": P.tolist()}))
    read, details = read_calibration_json(matrix_file, DETECTOR)
    assert np.array_equal(read, P) and details["file"] == "ap.json"

    carm_file = tmp_path / "lat.json"
    carm_file.write_text(json.dumps({"format": "hipatlas-calibration/1", "carm": {
        "sdd_mm": 1000, "sid_mm": 600, "lao_deg": 90, "cranial_deg": 0, "pixel_mm": 2.5,
        "isocentre_mm": [10, 0, -20]}}))
    read, _ = read_calibration_json(carm_file, DETECTOR)
    assert np.allclose(read, view_projections()[1])

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "hipatlas-calibration/1", "projection_matrix": [[1, 2, 3]]}))
    with pytest.raises(CaseFormatError, match="bad.json"):
        read_calibration_json(bad, DETECTOR)
    bad.write_text("{not json")
    with pytest.raises(CaseFormatError, match="not valid JSON"):
        read_calibration_json(bad, DETECTOR)


def test_import_png_with_calibration_json_and_refuse_png_without(tmp_path):
    case = io.load_case(write_synthetic_case(tmp_path / "src"))
    files = []
    for view in case.views:
        calibration = tmp_path / f"{view.name}.json"
        calibration.write_text(json.dumps({"format": "hipatlas-calibration/1", "projection_matrix": view.P.tolist()}))
        files.append((view, calibration))
    session = Session(work_root=tmp_path)
    try:
        session.import_radiographs([RadiographImport(v.name, v.image_path, c) for v, c in files], "right")
        assert [v.calibration["source"] for v in session.views] == ["calibration-json"] * 2
        assert np.array_equal(session.case.views[1].P, case.views[1].P)
        assert [v.mask_source for v in session.views] == ["missing"] * 2
        assert session.views_awaiting_proposal == [0, 1] and not any(v.mask.any() for v in session.views)
        with pytest.raises(CalibrationError, match="calibration JSON"):
            session.import_radiographs([RadiographImport(v.name, v.image_path, None) for v, _ in files], "right")
    finally:
        session.close()
    assert not session.work_dir.exists()


def test_import_dicom_takes_geometry_from_tags(tmp_path):
    rng = np.random.default_rng(1)
    paths = [write_dicom(tmp_path / f"v{i}.dcm", 1000 + rng.normal(0, 10, DETECTOR), primary_deg=angle)
             for i, angle in enumerate((0.0, 90.0))]
    session = Session(work_root=tmp_path)
    try:
        session.import_radiographs([RadiographImport("AP", paths[0]), RadiographImport("LAT", paths[1])], "left")
        assert [v.calibration["source"] for v in session.views] == ["dicom-tags"] * 2
        assert session.patient["PatientID"] == "PID-12345"
        assert session.pair_report.angle_deg == pytest.approx(90.0)
    finally:
        session.close()


@pytest.mark.skipif(not shutil.which("pdftotext"), reason="poppler-utils (pdftotext) not installed")
def test_report_of_a_dicom_case_names_the_patient_and_the_magnification(tmp_path):
    rng = np.random.default_rng(2)
    paths = [write_dicom(tmp_path / f"v{i}.dcm", 1000 + rng.normal(0, 10, DETECTOR), primary_deg=angle)
             for i, angle in enumerate((0.0, 90.0))]
    session = Session(work_root=tmp_path, register_fn=synthetic_register, isolate=False)
    try:
        session.import_radiographs([RadiographImport("AP", paths[0]), RadiographImport("LAT", paths[1])], "right")
        for index, view in enumerate(session.views):
            mask = np.zeros_like(view.mask)
            mask[20:70, 30:60] = True
            session.replace_mask(index, mask)
            session.set_confirmed(index, True)
        session.set_result(pipeline.run_to_completion(session.registration_job()(lambda: False)))
        session.report_patient = {"surgeon": "Dr. Example"}
        written = session.export(tmp_path / "out", ExportOptions(nifti=False, surface_stl=False))
        text = " ".join(subprocess.run(["pdftotext", "-layout", str(written["pdf_report"]), "-"],
                                       capture_output=True, encoding="utf-8", check=True).stdout.split())
    finally:
        session.close()
    for required in ("Doe, Jane", "PID-12345", "Birth date 1960-01-01", "Dr. Example", "Operated side: RIGHT hip"):
        assert required in text, required
    # DICOM: detector pitch 2.5 mm, source-detector 1000 mm; the hip centre of the synthetic
    # femur lies on the AP central ray's depth of the isocentre plane (y = 0, source 600 mm away).
    from inference import graphics

    ap = graphics.view_calibration(session.case.views[0].P, FEMUR.head_centre_mm, 2.5)
    assert ap.magnification == pytest.approx(1000.0 / ap.source_to_hip_mm)
    assert f"AP dicom-tags 2.500 mm {ap.mm_per_px_at_hip:.3f} mm {ap.magnification:.2f}\u00d7" in text


# ------------------------------------------------------------------------------ session workflow
@pytest.fixture
def registered(tmp_path):
    # in-process registration: fast; the isolated (child process) path has its own tests below
    session = Session(work_root=tmp_path, register_fn=synthetic_register, isolate=False)
    session.open_case(write_synthetic_case(tmp_path / "Doe_John_case"))
    yield session
    session.close()


def _register(session: Session):
    for index in range(len(session.views)):
        session.set_confirmed(index, True)
    result = pipeline.run_to_completion(session.registration_job()(lambda: False))
    session.set_result(result)
    return result


def test_registration_needs_confirmed_masks_and_edits_withdraw_confirmation(registered):
    session = registered
    assert session.register_blocker() == "confirm the mask of 'AP' and 'LAT'"
    with pytest.raises(DataError, match="cannot register yet"):
        session.registration_job()
    session.set_confirmed(0, True)
    session.set_confirmed(1, True)
    assert session.register_blocker() is None
    session.paint(1, (3.0, 3.0), (3.0, 3.0), 2.0, True)
    assert not session.views[1].confirmed and session.views[1].mask_source == "edited"
    session.replace_mask(0, np.zeros_like(session.views[0].mask), "cleared")
    with pytest.raises(DataError, match="empty"):
        session.set_confirmed(0, True)


def test_registration_result_and_projected_landmarks(registered):
    result = _register(registered)
    assert registered.measurements["head_radius_mm"] == FEMUR.head_radius_mm
    assert result.surface_faces.shape[1] == 3 and result.labels.shape == FEMUR.grid().shape_zyx
    # the outlines come as data (closed (u, v) polylines), read from silhouette_<view>.json
    assert set(result.contours) == {"AP", "LAT"}
    for polylines in result.contours.values():
        longest = polylines[0]
        assert len(longest) > 20 and np.array_equal(longest[0], longest[-1])
        rows, cols = registered.views[0].mask.shape
        assert np.all((longest >= 0) & (longest <= [cols - 1, rows - 1]))
    # the hip centre lands where P says in each view
    for index, P in enumerate(view_projections()):
        expected = geometry.project_points(P, np.array([FEMUR.head_centre_mm]))[0]
        assert np.allclose(registered.projected_landmarks(index)["hip_centre"], expected)


def test_cancelled_job_leaves_no_output(registered):
    session = registered
    session.set_confirmed(0, True)
    session.set_confirmed(1, True)
    job = session.registration_job()(lambda: True)
    with pytest.raises(Exception) as caught:
        pipeline.run_to_completion(job)
    assert type(caught.value).__name__ == "Cancelled"
    assert not any(p.name.startswith("run-") for p in session.work_dir.iterdir())


# ------------------------------------------------------------------------------ isolated registration
def _confirmed_session(tmp_path, register_fn) -> Session:
    session = Session(work_root=tmp_path, register_fn=register_fn)   # isolate=True: a child process
    session.open_case(write_synthetic_case(tmp_path / "case"))
    for index in range(len(session.views)):
        session.set_confirmed(index, True)
    return session


def test_isolated_registration_relays_progress_and_result(tmp_path):
    session = _confirmed_session(tmp_path, synthetic_register)
    try:
        messages = []
        result = pipeline.run_to_completion(session.registration_job(model="m.keras")(lambda: False),
                                            lambda p: messages.append(p.message))
        assert messages[0] == "Loading case" and messages[-1] == "Loading results for display"
        assert result.measurements == FEMUR.measurements() and result.report["model"]["path"] == "m.keras"
        assert result.out_dir.is_dir() and result.surface_faces.shape[1] == 3
    finally:
        session.close()


def test_isolated_registration_errors_and_crashes(tmp_path):
    from gui_helpers import crashing_register, failing_register
    from inference.errors import HipAtlasError

    session = _confirmed_session(tmp_path, failing_register)
    try:
        with pytest.raises(DataError, match="empty femur") as caught:
            pipeline.run_to_completion(session.registration_job()(lambda: False))
        assert any("in the registration process" in note for note in caught.value.__notes__)
        session.register_fn = crashing_register
        with pytest.raises(HipAtlasError, match=r"stopped unexpectedly \(signal 11\)"):
            pipeline.run_to_completion(session.registration_job()(lambda: False))
        assert not any(p.name.startswith("run-") for p in session.work_dir.iterdir())
    finally:
        session.close()


def test_isolated_registration_cancels_promptly(tmp_path):
    import functools
    import time

    session = _confirmed_session(tmp_path, functools.partial(synthetic_register, steps=1000, step_seconds=0.05))
    try:
        progress = []
        cancel = lambda: len(progress) >= 2  # noqa: E731
        started = time.monotonic()
        with pytest.raises(Exception) as caught:
            pipeline.run_to_completion(session.registration_job()(cancel), progress.append)
        assert type(caught.value).__name__ == "Cancelled"
        assert time.monotonic() - started < 30
        assert not any(p.name.startswith("run-") for p in session.work_dir.iterdir())
    finally:
        session.close()


# ------------------------------------------------------------------------------ export
def test_export_writes_valid_files(registered, tmp_path):
    from inference.mesh import read_stl

    result = _register(registered)
    written = registered.export(tmp_path / "out", ExportOptions())
    assert set(written) == {"surface_stl", "labels_nifti", "atlas_nifti", "measurements_json",
                            "measurements_csv", "pdf_report"}
    assert read_stl(written["surface_stl"]).n_faces == len(result.surface_faces)
    labels, grid = io.read_volume(written["labels_nifti"])
    assert np.array_equal(labels, result.labels)
    assert np.allclose(grid.origin_mm, FEMUR.grid().origin_mm, atol=1e-4)
    document = json.loads(written["measurements_json"].read_text())
    assert document["femoral_offset_mm"] == pytest.approx(FEMUR.femoral_offset_mm)
    assert document["provenance"]["views"][0]["image_sha256"] == registered.case.views[0].image.sha256
    with open(written["measurements_csv"], newline="") as handle:
        rows = {row["quantity"]: row for row in csv.DictReader(handle)}
    assert float(rows["neck_shaft_angle_deg"]["value"]) == pytest.approx(130.0)
    assert float(rows["hip_centre_z_mm"]["value"]) == pytest.approx(FEMUR.head_centre_mm[2])
    pdf = written["pdf_report"].read_bytes()
    assert pdf.startswith(b"%PDF") and b"Research use only" in pdf and b"Doe_John_case" in pdf
    assert pdf.count(b"/Subtype /Image") >= 3  # two annotated radiographs and the 3D picture, rendered off-screen
    if shutil.which("pdftotext"):
        text = " ".join(subprocess.run(["pdftotext", str(written["pdf_report"]), "-"], capture_output=True,
                                       encoding="utf-8", check=True).stdout.split())
        assert "Operated side: RIGHT hip" in text and "Radiographs with measurement graphics" in text
        assert "Signature" in text and "Pixel at hip" in text
    assert not [p for p in written["pdf_report"].parent.iterdir() if p.name.startswith(".")]


def test_anonymised_export_holds_no_identifier(registered, tmp_path):
    _register(registered)
    registered.patient = {"PatientName": "Doe^John", "PatientID": "PID-777"}
    written = registered.export(tmp_path / "anon", ExportOptions(anonymise=True))
    for path in written.values():
        data = path.read_bytes()
        for secret in (b"Doe_John", b"Doe^John", b"PID-777"):
            assert secret not in data, f"{secret!r} found in {path.name}"
    assert registered.pseudonym.encode() in written["pdf_report"].read_bytes()
    plain = registered.export(tmp_path / "plain", ExportOptions(anonymise=False, nifti=False, surface_stl=False))
    assert b"PID-777" in plain["pdf_report"].read_bytes()


def test_each_export_writer_writes_its_files_alone(registered, tmp_path):
    from app.export import EXPORT_WRITERS

    from app.plan_report import session_native_hip
    from inference.templating.library import load_library
    from inference.templating.plan import auto_plan

    _register(registered)
    fields = {f.name for f in dataclasses.fields(ExportOptions)}
    kinds = {"surface_stl": {"surface_stl"}, "nifti": {"labels_nifti", "atlas_nifti"},
             "measurements_json": {"measurements_json"}, "measurements_csv": {"measurements_csv"},
             "pdf_report": {"pdf_report"}, "plan": {"plan"}}
    assert [w.key for w in EXPORT_WRITERS] == list(kinds)
    # the plan writer writes nothing without a plan, and the folder hipatlas plan writes with one
    assert registered.export(tmp_path / "no-plan", ExportOptions(**{key: key == "plan" for key in kinds})) == {}
    registered.template_plan = auto_plan(session_native_hip(registered), load_library()).to_dict()
    for writer in EXPORT_WRITERS:
        assert writer.key in fields and writer.label
        only = ExportOptions(**{key: key == writer.key for key in kinds})
        written = registered.export(tmp_path / writer.key, only)
        assert set(written) == kinds[writer.key]
        assert sorted(p.name for p in (tmp_path / writer.key).iterdir()) == sorted(p.name for p in written.values())
    assert sorted(p.name for p in written["plan"].iterdir()) == ["cup.stl", "head.stl", "plan.json", "stem.stl"]


def test_export_refuses_a_filled_folder_and_changes_nothing(registered, tmp_path):
    _register(registered)
    target = tmp_path / "existing"
    target.mkdir()
    (target / "keep.txt").write_text("keep")
    with pytest.raises(OutputError, match="not empty"):
        registered.export(target, ExportOptions())
    assert [p.name for p in target.iterdir()] == ["keep.txt"]


# ------------------------------------------------------------------------------ projects
def test_an_output_folder_without_outlines_gets_them_projected_from_its_labels(registered):
    """Older projects hold no silhouette_<view>.json: their outlines come from the label map and
    the case's registration frame (data, not pixels of the overlay)."""
    from app.session import load_result

    result = _register(registered)
    for path in result.out_dir.glob("silhouette_*.json"):
        path.unlink()
    names = [v.name for v in registered.views]
    kwargs = dict(measurements=result.measurements, landmarks_mm=result.landmarks_mm, warnings=[], report={},
                  files=None, view_names=names)
    assert load_result(result.out_dir, **kwargs).contours == {}
    projected = load_result(result.out_dir, frame=registered.frame, **kwargs).contours
    assert set(projected) == set(names)
    for name in names:
        line, stored = projected[name][0], np.concatenate(result.contours[name])
        assert len(line) > 20 and np.array_equal(line[0], line[-1])
        # the synthetic registration drew its outline from a blurred voxel count: the same femur
        distance = np.min(np.hypot(line[:, None, 0] - stored[None, :, 0], line[:, None, 1] - stored[None, :, 1]), axis=1)
        assert np.median(distance) < 1.5 and distance.max() < 4.0


def test_project_round_trip(registered, tmp_path):
    _register(registered)
    registered.paint(0, (10.0, 10.0), (14.0, 10.0), 2.0, True)
    registered.set_confirmed(0, True)
    path = project.save_project(registered, tmp_path / "plan")
    assert path.suffix == ".hipatlas" and registered.project_path == path and not registered.dirty
    loaded = project.load_project(path, work_root=tmp_path)
    try:
        assert loaded.case_label == "Doe_John_case" and loaded.pseudonym == registered.pseudonym
        for a, b in zip(loaded.views, registered.views):
            assert np.array_equal(a.mask, b.mask)
            assert (a.confirmed, a.mask_source, a.calibration) == (b.confirmed, b.mask_source, b.calibration)
        assert loaded.measurements == registered.measurements
        assert loaded.landmarks_mm == registered.landmarks_mm
        assert np.array_equal(loaded.result.surface_faces, registered.result.surface_faces)
        assert np.array_equal(loaded.result.labels, registered.result.labels)
        assert loaded.project_path == path and not loaded.dirty
    finally:
        loaded.close()


def test_failed_save_keeps_the_previous_project(registered, tmp_path, monkeypatch):
    _register(registered)
    path = project.save_project(registered, tmp_path / "plan.hipatlas")
    before = path.read_bytes()
    original = project._write_member

    def failing(archive, name, data=None, source=None):
        if name.startswith("result/"):
            raise OSError(28, "No space left on device")
        return original(archive, name, data, source)

    monkeypatch.setattr(project, "_write_member", failing)
    with pytest.raises(OutputError, match="No space left"):
        project.save_project(registered, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".plan")) == []


def test_bad_project_files_are_refused_with_a_clear_error(tmp_path):
    garbage = tmp_path / "garbage.hipatlas"
    garbage.write_bytes(os.urandom(2000))
    with pytest.raises(InputFileError, match="not a HipAtlas project file"):
        project.load_project(garbage, work_root=tmp_path)
    empty = tmp_path / "empty.hipatlas"
    with zipfile.ZipFile(empty, "w") as archive:
        archive.writestr("readme.txt", "hello")
    with pytest.raises(InputFileError, match="project.json is missing"):
        project.load_project(empty, work_root=tmp_path)
    evil = tmp_path / "evil.hipatlas"
    with zipfile.ZipFile(evil, "w") as archive:
        archive.writestr("project.json", "{}")
        archive.writestr("../../escaped.txt", "x")
    with pytest.raises(InputFileError, match="unsafe path"):
        project.load_project(evil, work_root=tmp_path)
    assert not (tmp_path.parent / "escaped.txt").exists()
    # no work folders are left behind by failed loads
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("hipatlas-session-")]


def test_truncated_project_is_refused(registered, tmp_path):
    _register(registered)
    path = project.save_project(registered, tmp_path / "plan")
    truncated = tmp_path / "truncated.hipatlas"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(InputFileError):
        project.load_project(truncated, work_root=tmp_path)


def test_recovery_offers_autosaves_of_dead_processes_only(registered, tmp_path):
    folder = tmp_path / "recovery"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    crashed = project.RecoveryStore(folder, pid=dead.pid)
    crashed.autosave(registered)
    alive = project.RecoveryStore(folder, pid=os.getppid())
    alive.autosave(registered)
    mine = project.RecoveryStore(folder)
    orphans = mine.orphans()
    assert [o.pid for o in orphans] == [dead.pid]
    recovered = mine.recover(orphans[0], work_root=tmp_path)
    try:
        assert recovered.dirty and recovered.case_label == registered.case_label
        assert not crashed.project_file.exists() and mine.orphans() == []
    finally:
        recovered.close()
    alive.clear()
    assert not alive.project_file.exists()


# ------------------------------------------------------------------------------ landmarks
def test_unmoved_landmarks_reproduce_the_measurements(registered):
    _register(registered)
    assert set(registered.landmarks_mm) == {"head_centre", "neck_point", "shaft_point_proximal",
                                            "shaft_point_distal", "lesser_trochanter"}
    again = registered.move_landmark("head_centre", FEMUR.head_centre_mm)
    expected = FEMUR.measurements()
    for key in ("head_radius_mm", "femoral_offset_mm", "neck_shaft_angle_deg", "vertical_offset_mm"):
        assert again[key] == pytest.approx(expected[key], abs=1e-9), key
    assert np.allclose(again["neck_axis"]["direction"], expected["neck_axis"]["direction"])


def test_moving_the_head_centre_updates_the_measurements(registered):
    _register(registered)
    neck_point = np.asarray(registered.landmarks_mm["neck_point"])
    moved = np.asarray(FEMUR.head_centre_mm) + [5.0, 0.0, 3.0]
    result = registered.move_landmark("head_centre", moved)
    # shaft axis is the z axis: offset = distance of the head centre from it, vertical offset =
    # height above the lesser trochanter, CCD angle between the new neck line and -z
    assert result["femoral_offset_mm"] == pytest.approx(40.0)
    assert result["vertical_offset_mm"] == pytest.approx(23.0 - FEMUR.lesser_trochanter_z_mm)
    neck = (moved - neck_point) / np.linalg.norm(moved - neck_point)
    assert result["neck_shaft_angle_deg"] == pytest.approx(np.degrees(np.arccos(-neck[2])))
    assert result["head_radius_mm"] == FEMUR.head_radius_mm and registered.landmarks_edited
    # moving a shaft point tilts the shaft axis: the offset follows
    registered.move_landmark("shaft_point_distal", [10.0, 0.0, -70.0])
    assert registered.measurements["femoral_offset_mm"] != pytest.approx(40.0)
    registered.reset_landmarks()
    assert registered.measurements == registered.result.measurements and not registered.landmarks_edited
    with pytest.raises(DataError, match="3 finite"):
        registered.move_landmark("head_centre", [1.0, float("nan"), 2.0])


def test_session_modules_do_not_import_qt_or_vtk():
    # The session, editing, imaging, project and report modules are the workstation's testable
    # core: they must run without Qt (scripts, tests without a display).
    code = ("import sys, app.session, app.masks, app.imaging, app.project, app.report\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('PySide6', 'vtk', 'vtkmodules', 'pyvista', 'pyvistaqt')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_the_workstation_process_does_not_import_tensorflow():
    # TensorFlow must stay in the registration process (app/isolated.py): with Mesa's software
    # OpenGL the two crash each other. Everything the window imports, and what loading a result
    # imports, must be free of it.
    code = ("import sys, app.main_window, app.session, app.project, app.isolated, app.main\n"
            "import inference.pipeline, inference.io, inference.mesh, inference.surface, inference.measure\n"
            "print('tensorflow' in sys.modules, 'keras' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "QT_QPA_PLATFORM": "offscreen"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "False False"
