"""The PDF planning report: ``hipatlas report`` renders it off-screen; the pages are rendered with
pdftoppm and their text read with pdftotext (poppler-utils).

The report is made in a child process (the CLI), as a user would: VTK's off-screen rendering must
not share a process with TensorFlow, which other test modules import (see tests/gui/conftest.py).
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE / "gui"))

from gui_helpers import FEMUR, synthetic_register, write_synthetic_case  # noqa: E402

from inference import pipeline  # noqa: E402

needs_poppler = pytest.mark.skipif(not (shutil.which("pdftoppm") and shutil.which("pdftotext")),
                                   reason="poppler-utils (pdftoppm, pdftotext) not installed: make system-packages")


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """A synthetic case, its registration output, the landmarks and uncertainties a newer
    pipeline writes, and a patient file."""
    root = tmp_path_factory.mktemp("report")
    case = write_synthetic_case(root / "case")
    out = root / "out"
    pipeline.run_to_completion(synthetic_register(case, out))
    measurements = json.loads((out / "measurements.json").read_text())
    measurements["femoral_offset_mm_uncertainty"] = 1.7
    measurements["neck_shaft_angle_deg_uncertainty"] = 2.4
    (out / "measurements.json").write_text(json.dumps(measurements))
    (out / "landmarks.json").write_text(json.dumps(FEMUR.landmarks()))
    report = json.loads((out / "report.json").read_text())  # what the pipeline adds (inference.angle_sensitivity)
    report["angle_sensitivity"] = {"about": "the patient's long axis", "axis_point_mm": [0.0, 0.0, 0.0], "per_deg_of": 1.0,
                                   "AP": {"hip_centre_mm_per_deg": 0.28, "femur_mean_mm_per_deg": 0.36,
                                          "femur_max_mm_per_deg": 0.76},
                                   "LAT": {"hip_centre_mm_per_deg": 0.06, "femur_mean_mm_per_deg": 0.4,
                                           "femur_max_mm_per_deg": 0.79}}
    (out / "report.json").write_text(json.dumps(report))
    patient = root / "patient.json"
    patient.write_text(json.dumps({"name": "Testperson, Erika", "patient_id": "PID-4711",
                                   "birth_date": "1951-06-30", "study_date": "2026-11-02",
                                   "acquisition_date": "2026-11-02", "surgeon": "Dr. Example Surgeon"}))
    return {"case": case, "out": out, "patient": patient, "root": root}


def _hipatlas(*args, cwd) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("DISPLAY", None)  # off-screen without any display: EGL or OSMesa
    return subprocess.run([sys.executable, "-m", "app.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, encoding="utf-8", timeout=300)


def _normal_range(key: str) -> tuple[float, float]:
    """The typical range of measurement ``key`` in the descriptor table the report reads."""
    from inference.measure import MEASUREMENTS

    return next(m.normal_range for m in MEASUREMENTS if m.key == key)


@needs_poppler
def test_report_pages_hold_the_record_and_the_pictures(registered, tmp_path):
    pdf = tmp_path / "plan.pdf"
    done = _hipatlas("report", registered["out"], "--case", registered["case"], "--out", pdf,
                     "--patient-json", registered["patient"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert pdf.is_file() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    text = subprocess.run(["pdftotext", "-layout", str(pdf), "-"], capture_output=True, encoding="utf-8",
                          check=True).stdout
    flat = " ".join(text.split())
    for required in ("Testperson, Erika", "PID-4711", "1951-06-30", "Study date 2026-11-02",
                     "Acquisition date 2026-11-02", "Operated side: RIGHT hip", "Dr. Example Surgeon",
                     "Signature", "Reviewed and approved by", "Pixel at hip", "Magnification at hip",
                     "Radiographs with measurement graphics", "3D reconstruction", "Typical range",
                     "Research use only"):
        assert required in flat, f"{required!r} missing from the report"
    # Values with their uncertainty and typical range (the descriptor table's, inference.measure);
    # a value without an uncertainty shows none.
    low, high = _normal_range("femoral_offset_mm")
    assert f"Femoral offset {FEMUR.femoral_offset_mm:.1f} ± 1.7 mm {low:.1f}–{high:.1f}" in flat
    low, high = _normal_range("neck_shaft_angle_deg")
    assert f"Neck-shaft angle (CCD) 130.0 ± 2.4 ° {low:.1f}–{high:.1f}" in flat
    assert f"Vertical offset {FEMUR.measurements()['vertical_offset_mm']:.1f} mm" in flat
    # Calibration in human terms: the synthetic views' pixel size at the hip follows from P.
    from inference import graphics, io as hio

    case = hio.load_case(registered["case"])
    hip = FEMUR.measurements()["hip_centre_mm"]
    for view in case.views:
        expected = graphics.view_calibration(view.P, hip).mm_per_px_at_hip
        assert f"{expected:.3f} mm" in flat
    assert "(UTC" in flat  # local time with its offset
    # what a view's angle recorded a degree off would move (report.json -> angle_sensitivity)
    assert "AP: hip centre 0.28 mm, femur 0.36 mm on average and up to 0.76 mm" in flat
    assert "LAT: hip centre 0.06 mm, femur 0.40 mm on average and up to 0.79 mm" in flat

    # Every page renders, none is blank, and no page ends with a heading (no orphans).
    shutil.rmtree(tmp_path / "pages", ignore_errors=True)
    (tmp_path / "pages").mkdir()
    subprocess.run(["pdftoppm", "-r", "40", "-png", str(pdf), str(tmp_path / "pages" / "p")], check=True)
    pages = sorted((tmp_path / "pages").glob("p-*.png"))
    assert len(pages) >= 2
    from PIL import Image

    for page in pages:
        pixels = np.asarray(Image.open(page).convert("L"), dtype=np.float64)
        assert pixels.std() > 10, f"{page.name} looks blank"
    headings = {"Measurements", "Calibration", "Radiographs with measurement graphics", "3D reconstruction",
                "Landmarks (world LPS)", "Inputs", "Software", "Warnings", "Approval"}
    for number, page_text in enumerate(text.split("\f")[:len(pages)], start=1):
        body = [line.strip() for line in page_text.splitlines()
                if line.strip() and not line.strip().startswith("HipAtlas ")]  # the footer
        assert body and body[-1] not in headings, f"page {number} ends with the heading {body[-1]!r}"


@needs_poppler
def test_report_pictures_show_the_bone_and_the_graphics(registered, tmp_path):
    pdf = tmp_path / "plan.pdf"
    done = _hipatlas("report", registered["out"], "--case", registered["case"], "--out", pdf, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    subprocess.run(["pdfimages", "-png", str(pdf), str(tmp_path / "img")], check=True)
    from PIL import Image

    images = [np.asarray(Image.open(p).convert("RGB"), dtype=np.int64) for p in sorted(tmp_path.glob("img-*.png"))]
    assert len(images) == 3
    widest = max(images, key=lambda a: a.shape[1] / a.shape[0])   # the 3D picture: two views side by side
    bone = np.abs(widest - np.array([232, 220, 196])).sum(axis=-1) < 90
    for half in (bone[:, : bone.shape[1] // 2], bone[:, bone.shape[1] // 2:]):
        assert half.mean() > 0.005, "the 3D picture shows no bone"
    radiographs = [a for a in images if a is not widest]
    head = np.array([0x00, 0xE5, 0xFF])
    shaft = np.array([0xFF, 0xB3, 0x00])
    outline = np.array([0xFF, 0x40, 0x20])  # the femur outline, drawn from silhouette_<view>.json
    for picture in radiographs:
        for colour in (head, shaft, outline):
            assert (np.abs(picture - colour).sum(axis=-1) < 40).sum() > 50, "measurement graphics missing"
    # no patient identifiers without a patient file, and the record says so
    text = subprocess.run(["pdftotext", str(pdf), "-"], capture_output=True, encoding="utf-8", check=True).stdout
    assert "not recorded" in text


def test_report_cli_refuses_bad_input_in_one_line(registered, tmp_path):
    done = _hipatlas("report", tmp_path / "nowhere", "--out", tmp_path / "x.pdf", cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "no such registration output" in done.stderr
    bad = tmp_path / "patient.json"
    bad.write_text(json.dumps({"nmae": "typo"}))
    done = _hipatlas("report", registered["out"], "--case", registered["case"], "--out", tmp_path / "x.pdf",
                     "--patient-json", bad, cwd=tmp_path)
    assert done.returncode == 2 and "unknown patient field(s) nmae" in done.stderr
    assert not (tmp_path / "x.pdf").exists()
    done = _hipatlas("report", registered["out"], "--case", registered["case"], "--out", tmp_path / "x.pdf",
                     "--landmarks", tmp_path / "nowhere.json", cwd=tmp_path)
    assert done.returncode == 2 and "landmarks file not found" in done.stderr
    assert not (tmp_path / "x.pdf").exists()


def test_angle_sensitivity_lines_skip_what_the_registration_did_not_state():
    from app.report import angle_sensitivity_lines

    assert angle_sensitivity_lines(None) == [] and angle_sensitivity_lines({"about": "x"}) == []
    row = {"hip_centre_mm_per_deg": 0.5, "femur_mean_mm_per_deg": 1.0, "femur_max_mm_per_deg": None}
    assert angle_sensitivity_lines({"AP": row}) == []
    row["femur_max_mm_per_deg"] = 2.0
    assert angle_sensitivity_lines({"AP": row}, "cm") == ["AP: hip centre 0.050 cm, femur 0.100 cm on average and up to 0.200 cm"]


def test_uncertainty_forms_and_normal_ranges():
    from app.report import measurement_uncertainty, report_measurement_rows

    m = FEMUR.measurements()
    assert measurement_uncertainty(m, "femoral_offset_mm") is None
    assert measurement_uncertainty({**m, "femoral_offset_mm_uncertainty": 1.5}, "femoral_offset_mm") == 1.5
    assert measurement_uncertainty({**m, "femoral_offset_uncertainty_mm": 2.0}, "femoral_offset_mm") == 2.0
    assert measurement_uncertainty({**m, "uncertainty": {"neck_shaft_angle_deg": {"sd": 3.0}}},
                                   "neck_shaft_angle_deg") == 3.0
    rows = {r[0]: r for r in report_measurement_rows({**m, "head_radius_mm_uncertainty": 0.5}, "cm")}
    low, high = _normal_range("head_radius_mm")
    assert 12.0 < low  # the synthetic femur's 12 mm head is outside the typical range
    assert rows["Femoral head radius"] == ("Femoral head radius", "1.20", "\u00b1 0.05", "cm",
                                           f"{low / 10:.2f}\u2013{high / 10:.2f} (outside)")


@needs_poppler
def test_report_shows_the_saved_plan_with_the_headless_numbers(registered, tmp_path):
    """`hipatlas plan OUT --out OUT/plan`, then `hipatlas report OUT`: the report's plan section
    holds the implants and the very numbers and warnings the headless command printed, and both
    radiographs with the implants' outlines plus the plan in 3D."""
    from inference.templating.editor import CHANGE_ROWS, change_rows
    from inference.templating.library import load_library

    out = tmp_path / "out"
    shutil.copytree(registered["out"], out)
    done = _hipatlas("plan", out, "--out", out / "plan", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    pdf = tmp_path / "report.pdf"
    done = _hipatlas("report", out, "--case", registered["case"], "--out", pdf, cwd=tmp_path)
    assert done.returncode == 0, done.stderr

    flat = " ".join(subprocess.run(["pdftotext", "-layout", str(pdf), "-"], capture_output=True, encoding="utf-8",
                                   check=True).stdout.split())
    for heading in ("Implant plan", "Implant plan on the radiographs", "Implant plan in 3D"):
        assert heading in flat
    rows = change_rows(printed["changes"])
    assert len(rows) == len(CHANGE_ROWS)
    for label, value in rows:
        assert f"{label} {value}" in flat, f"{label} {value} missing from the report"
    assert printed["changes"]["warnings"]  # the synthetic volume has no canal: the plan says so
    for warning in printed["changes"]["warnings"]:
        assert f"Plan warning: {warning}" in flat
    stem, cup = printed["implants"]["stem"], printed["implants"]["cup"]
    outer = load_library().cup(cup["family"]).size(cup["size"]).outer_diameter_mm
    for text in (f"size {stem['size']}", f"{stem['variant']}, neck-shaft angle",
                 f"diameter {stem['head_diameter_mm']:g} mm, offset {stem['head_offset_mm']:+g} mm",
                 f"size {cup['size']}, outer diameter {outer:g} mm", "inclination 40°, anteversion 20°"):
        assert text in flat, f"{text!r} missing from the report"

    # Pictures: the report's three, then both radiographs with the outlines and the plan in 3D.
    subprocess.run(["pdfimages", "-png", str(pdf), str(tmp_path / "img")], check=True)
    from PIL import Image

    from app.plan_report import OUTLINE_COLOURS

    images = [np.asarray(Image.open(p).convert("RGB"), dtype=np.int64) for p in sorted(tmp_path.glob("img-*.png"))]
    assert len(images) == 6
    for picture in images[3:5]:
        for name in ("stem", "cup"):
            colour = np.array([int(OUTLINE_COLOURS[name][i:i + 2], 16) for i in (1, 3, 5)])
            assert (np.abs(picture - colour).sum(axis=-1) < 40).sum() > 50, f"{name} outline missing"

    # A plan folder named on the command line that is not there: one line, exit 2, no PDF.
    done = _hipatlas("report", out, "--case", registered["case"], "--out", tmp_path / "x.pdf",
                     "--plan", tmp_path / "nowhere", cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "plan file not found" in done.stderr
    assert not (tmp_path / "x.pdf").exists()
