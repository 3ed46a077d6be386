"""``hipatlas register`` on bad input (issue 5 item 7): exit status 2, one line on stderr naming the
file and the problem, no traceback, and no output folder left behind (not even a partial one).

Most cases run the command in-process (``app.cli.main``); one runs it as a subprocess, as a user
would. Every bad case is a copy of one simulated case with one thing broken.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from app import cli as app_cli
from inference import geometry

import register_helpers as rh


@pytest.fixture(scope="module")
def good_case(tmp_path_factory):
    return rh.simulated_case(tmp_path_factory.getbasetemp(), "right").case_dir


def _set(path, value):
    """An edit of case.json that sets a (dotted, indexable) path to ``value``."""
    def edit(raw):
        keys = path.split(".")
        target = raw
        for key in keys[:-1]:
            target = target[int(key)] if key.isdigit() else target[key]
        last = keys[-1]
        if value is _DELETE:
            del target[int(last) if last.isdigit() else last]
        else:
            target[int(last) if last.isdigit() else last] = value
    return edit


_DELETE = object()


def _write_image(path, array):
    Image.fromarray(array).save(path)


def _missing_case_json(case):
    (case / "case.json").unlink()


def _missing_image(case):
    rh.view_files(case, 1)[0].unlink()


def _missing_mask(case):
    rh.view_files(case, 0)[1].unlink()


def _garbage_image(case):
    rh.view_files(case, 0)[0].write_bytes(b"this is not an image at all" * 20)


def _truncated_image(case):
    image = rh.view_files(case, 1)[0]
    data = image.read_bytes()
    image.write_bytes(data[: len(data) // 2])


def _truncated_mask(case):
    mask = rh.view_files(case, 1)[1]
    data = mask.read_bytes()
    mask.write_bytes(data[: len(data) // 2])


def _mask_other_size(case):
    mask = rh.view_files(case, 0)[1]
    with Image.open(mask) as img:
        array = np.asarray(img)
    _write_image(mask, np.ascontiguousarray(array[:-7]))


def _empty_mask(case):
    mask = rh.view_files(case, 1)[1]
    with Image.open(mask) as img:
        shape = np.asarray(img).shape
    _write_image(mask, np.zeros(shape, np.uint8))


def _edit(case, edit):
    raw = json.loads((case / "case.json").read_text())
    edit(raw)
    (case / "case.json").write_text(json.dumps(raw))


def _nan_matrix(case):
    text = (case / "case.json").read_text()
    raw = json.loads(text)
    raw["views"][0]["projection_matrix"][1][2] = "__NAN__"
    (case / "case.json").write_text(json.dumps(raw).replace('"__NAN__"', "NaN"))


def _infinite_matrix(case):
    raw = json.loads((case / "case.json").read_text())
    raw["views"][1]["projection_matrix"][0][0] = "__INF__"
    (case / "case.json").write_text(json.dumps(raw).replace('"__INF__"', "1e999"))


def _singular_matrix(case):
    def edit(raw):
        matrix = raw["views"][1]["projection_matrix"]
        matrix[2] = [2 * a for a in matrix[0]]  # third row = 2 x first: rank 2, no source
    _edit(case, edit)


def _one_view(case):
    _edit(case, lambda raw: raw["views"].pop())


def _three_views(case):
    _edit(case, lambda raw: raw["views"].append(dict(raw["views"][0], name="EXTRA")))


def _views_too_close(case):
    """The lateral view replaced by an AP turned by 20 degrees (same image size, its own image)."""
    raw = json.loads((case / "case.json").read_text())
    ap = np.asarray(raw["views"][0]["projection_matrix"])
    source = geometry.source_position(ap)
    # rotate the camera about the vertical axis through the central ray's point 925 mm away
    pivot = source + 925.0 * geometry.principal_direction(ap)
    angle = np.radians(20.0)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    transform = np.eye(4)
    transform[:3, :3] = rotation
    transform[:3, 3] = pivot - rotation @ pivot
    raw["views"][1]["projection_matrix"] = (ap @ transform).tolist()
    (case / "case.json").write_text(json.dumps(raw))


def _unknown_side(case):
    _edit(case, _set("side", "middle"))


def _absolute_image_path(case):
    _edit(case, _set("views.0.image", str(case / "ap.png")))


def _head_out_of_view(case):
    """Both radiographs cropped (P updated) so that the top of the femur, the head, is cut off."""
    raw = json.loads((case / "case.json").read_text())
    for index, view in enumerate(raw["views"]):
        image_path, mask_path = rh.view_files(case, index)
        with Image.open(mask_path) as img:
            mask = np.asarray(img)
        rows = np.nonzero(mask.any(axis=1))[0]
        cut = rows.min() + 12  # 24 mm below the top of the head (2 mm pixels)
        for path in (image_path, mask_path):
            with Image.open(path) as img:
                array = np.asarray(img)
            _write_image(path, np.ascontiguousarray(array[cut:]))
        view["projection_matrix"] = geometry.crop_resize(np.asarray(view["projection_matrix"]), 0.0, cut,
                                                         1.0).tolist()
    (case / "case.json").write_text(json.dumps(raw))


def _masks_of_another_femur(case):
    """The lateral mask replaced by a blob in a lower corner: the masks no longer show one femur."""
    mask_path = rh.view_files(case, 1)[1]
    with Image.open(mask_path) as img:
        mask = np.asarray(img)
    blob = np.zeros_like(mask)
    blob[-20:, 5:25] = 255
    _write_image(mask_path, blob)


# (id, breaker, the file the message must name, words the message must hold)
BAD_CASES = [
    ("missing-case-json", _missing_case_json, "case.json", "not found"),
    ("missing-image", _missing_image, "lat.png", "not found"),
    ("missing-mask", _missing_mask, "ap_mask.png", "not found"),
    ("garbage-image", _garbage_image, "ap.png", ""),
    ("truncated-image", _truncated_image, "lat.png", "truncated"),
    ("truncated-mask", _truncated_mask, "lat_mask.png", "truncated"),
    ("mask-other-size", _mask_other_size, "ap_mask.png", "must match"),
    ("empty-mask", _empty_mask, "lat_mask.png", "empty"),
    ("nan-matrix", _nan_matrix, "case.json", "NaN"),
    ("infinite-matrix", _infinite_matrix, "case.json", "finite"),
    ("singular-matrix", _singular_matrix, "case.json", "rank"),
    ("one-view", _one_view, "case.json", "exactly 2"),
    ("three-views", _three_views, "case.json", "exactly 2"),
    ("views-20-deg-apart", _views_too_close, "case.json", "30 deg"),
    ("unknown-side", _unknown_side, "case.json", "side"),
    ("absolute-path", _absolute_image_path, "case.json", "relative"),
    ("head-out-of-view", _head_out_of_view, "mask.png", "field of view"),
    ("masks-disagree", _masks_of_another_femur, "case.json", "same femur"),
]


def _assert_one_line_error(status, stderr, out_dir, file_hint, words):
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert status == 2, stderr
    assert len(lines) == 1, stderr
    line = lines[0]
    assert line.startswith("hipatlas: error: ") and "Traceback" not in stderr
    assert file_hint in line, line
    assert words.lower() in line.lower(), line
    assert not out_dir.exists()
    assert not [p for p in out_dir.parent.iterdir() if p.name.startswith(f".{out_dir.name}")]


@pytest.mark.parametrize("breaker, file_hint, words", [c[1:] for c in BAD_CASES], ids=[c[0] for c in BAD_CASES])
def test_bad_input_exits_2_with_one_line(tmp_path, good_case, capsys, breaker, file_hint, words):
    case = rh.copy_case(good_case, tmp_path / "case")
    breaker(case)
    out = tmp_path / "results" / "out"
    (tmp_path / "results").mkdir()
    # no --model: every one of these must be refused before a model is needed (none is installed
    # in a fresh checkout, which would be a different error)
    status = app_cli.main(["register", str(case), "--out", str(out), "--quiet"])
    captured = capsys.readouterr()
    _assert_one_line_error(status, captured.err, out, file_hint, words)
    assert captured.out == ""


def test_missing_case_folder_and_model(tmp_path, good_case, capsys):
    out = tmp_path / "out"
    status = app_cli.main(["register", str(tmp_path / "nowhere"), "--out", str(out)])
    _assert_one_line_error(status, capsys.readouterr().err, out, "nowhere", "not found")
    status = app_cli.main(["register", str(good_case), "--out", str(out), "--model", str(tmp_path / "none.keras")])
    _assert_one_line_error(status, capsys.readouterr().err, out, "none.keras", "not found")


def test_existing_output_folder_is_kept(tmp_path, good_case, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "previous.txt").write_text("keep me")
    status = app_cli.main(["register", str(good_case), "--out", str(out)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and "not empty" in lines[0] and str(out) in lines[0]
    assert [p.name for p in out.iterdir()] == ["previous.txt"]


def test_command_line_subprocess(tmp_path, good_case):
    """As a user runs it: a separate process, its exit status and its stderr."""
    case = rh.copy_case(good_case, tmp_path / "case")
    _truncated_image(case)
    out = tmp_path / "out"
    completed = subprocess.run([sys.executable, "-m", "app.cli", "register", str(case), "--out", str(out)],
                               capture_output=True, text=True, timeout=120)
    _assert_one_line_error(completed.returncode, completed.stderr, out, "lat.png", "truncated")
    assert completed.stdout == ""


def test_several_cases_share_one_model_and_a_bad_one_is_reported(tmp_path, tmp_path_factory, good_case, capsys):
    """``hipatlas register A B C --out ROOT``: one output folder per case and cohort.csv; a case
    with bad input fails alone (its message in the summary) and the exit status says so."""
    import csv

    model = rh.saved_model(tmp_path_factory.getbasetemp())
    first = rh.copy_case(good_case, tmp_path / "cases" / "first")
    second = rh.copy_case(good_case, tmp_path / "cases" / "second")
    broken = rh.copy_case(good_case, tmp_path / "cases" / "broken")
    _truncated_image(broken)
    root = tmp_path / "results"
    status = app_cli.main(["register", str(first), str(broken), str(second), "--out", str(root),
                           "--model", str(model), "--quiet"])
    captured = capsys.readouterr()
    assert status == 2
    rows = list(csv.DictReader((root / "cohort.csv").open()))
    assert [r["status"] for r in rows] == ["ok", "failed", "ok"]
    assert "truncated" in rows[1]["error"] and "lat.png" in rows[1]["error"]
    assert float(rows[0]["head_radius_mm"]) > 0 and rows[0]["side"] == "right"
    assert (root / "first" / "measurements.json").is_file() and (root / "second" / "report.json").is_file()
    assert not (root / "broken").exists()
    assert "FAILED" in captured.err and "2 of 3 cases registered" in captured.err

    # two cases whose outputs would collide are refused before anything runs
    other = rh.copy_case(good_case, tmp_path / "elsewhere" / "first")
    status = app_cli.main(["register", str(first), str(other), "--out", str(tmp_path / "r2"), "--quiet"])
    assert status == 2 and "same folder name" in capsys.readouterr().err
    assert not (tmp_path / "r2").exists()


def _pipeline_arguments(tmp_path, monkeypatch, flags, names) -> dict:
    """What ``hipatlas register FLAGS`` passes the pipeline as ``names``, for one case and for a
    cohort: {"case": values, "cohort": values}."""
    from inference import pipeline

    seen = {}

    def fake(name):
        def run(*args, **kwargs):
            seen[name] = tuple(kwargs[key] for key in names)
            raise pipeline.DataError("stop here")
        return run

    monkeypatch.setattr(pipeline, "register_case", fake("case"))
    monkeypatch.setattr(pipeline, "register_cohort", fake("cohort"))
    assert app_cli.main(["register", str(tmp_path / "a"), "--out", str(tmp_path / "o"), *flags]) == 2
    assert app_cli.main(["register", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "o"),
                         *flags]) == 2
    return seen


@pytest.mark.parametrize("flags, expected", [([], None), (["--ensemble"], True), (["--no-ensemble"], False)])
def test_the_ensemble_flags_reach_the_pipeline(tmp_path, monkeypatch, capsys, flags, expected):
    """``--ensemble`` / ``--no-ensemble`` (default: the setting) for one case and for a cohort."""
    seen = _pipeline_arguments(tmp_path, monkeypatch, flags, ["ensemble"])
    assert seen == {"case": (expected,), "cohort": (expected,)}
    capsys.readouterr()


@pytest.mark.parametrize("flags, expected", [([], (True, True, True)), (["--no-shaft-fit"], (False, True, True)),
                                             (["--no-head-anchor"], (True, False, True)),
                                             (["--no-outline-fit"], (True, True, False))])
def test_the_mask_fit_flags_reach_the_pipeline(tmp_path, monkeypatch, capsys, flags, expected):
    """``--no-shaft-fit``, ``--no-head-anchor`` and ``--no-outline-fit`` (default: all on) for one case
    and for a cohort."""
    seen = _pipeline_arguments(tmp_path, monkeypatch, flags, ["shaft_fit", "head_anchor", "outline_fit"])
    assert seen == {"case": expected, "cohort": expected}
    capsys.readouterr()
