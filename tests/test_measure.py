"""Tests of inference.measure: measurements.json from landmarks, surfaces and label maps."""

from __future__ import annotations

import json

import numpy as np
import pytest

from inference import anatomy as A
from inference import mesh as M
from inference.errors import DataError
from inference.geometry import VolumeGeometry
from inference.measure import (
    MEASUREMENT_KEYS,
    measure_femur,
    measurements_from_femur_landmarks,
    measurements_from_landmarks,
    validate_measurements,
)


@pytest.fixture(scope="module")
def synthetic():
    femur = A.SyntheticFemur(head_radius_mm=21.0, offset_mm=38.0, neck_shaft_angle_deg=133.0, anteversion_deg=8.0,
                             lesser_trochanter_depth_mm=66.0)
    return femur, femur.surface(1.25)


def test_hand_built_landmarks_give_known_numbers():
    # Shaft axis = the z axis, head 40 mm medial (+x) and 30 mm up, neck at 45 deg above
    # horizontal: CCD = 135 deg; lesser trochanter 20 mm below the origin.
    head = np.array([40.0, 0.0, 30.0])
    neck_point = head - 20 * np.array([1.0, 0.0, 1.0]) / np.sqrt(2)
    m = measurements_from_landmarks("right", head, 22.0, [0, 0, -50], [0, 0, -3], neck_point, None, [10, 5, -20])
    assert set(MEASUREMENT_KEYS) <= set(m)
    assert m["side"] == "right" and m["hip_centre_mm"] == [40.0, 0.0, 30.0]
    assert m["head_radius_mm"] == 22.0
    assert m["femoral_offset_mm"] == pytest.approx(40.0)
    assert m["neck_shaft_angle_deg"] == pytest.approx(135.0)
    assert m["vertical_offset_mm"] == pytest.approx(50.0)
    # Directions are unit and oriented: shaft proximally, neck towards the head.
    assert m["shaft_axis"]["direction"] == pytest.approx([0, 0, 1])
    assert m["neck_axis"]["direction"] == pytest.approx([np.sqrt(0.5), 0, np.sqrt(0.5)])
    # Passing the neck direction in the other sense changes nothing.
    m2 = measurements_from_landmarks("right", head, 22.0, [0, 0, -50], [0, 0, 1], neck_point, [-1, 0, -1],
                                     [10, 5, -20])
    for key in MEASUREMENT_KEYS[1:6]:
        assert m2[key] == pytest.approx(m[key])
    for axis in ("shaft_axis", "neck_axis"):
        assert m2[axis]["direction"] == pytest.approx(m[axis]["direction"])
    validate_measurements(json.loads(json.dumps(m)))


def test_angle_and_offset_follow_the_geometry():
    rng = np.random.default_rng(0)
    for nsa in (110.0, 125.0, 140.0):
        theta = np.radians(nsa)
        neck_dir = np.array([np.sin(theta), 0.0, -np.cos(theta)])
        head = np.array([35.0, 0.0, 0.0])
        R, _ = np.linalg.qr(rng.standard_normal((3, 3)))
        t = rng.normal(0, 100, 3)
        m = measurements_from_landmarks("left", R @ head + t, 20.0, R @ [0, 0, -80.0] + t, R @ [0, 0, 1.0],
                                        R @ (head - 25 * neck_dir) + t, None, R @ [5, 10, -55.0] + t)
        assert m["neck_shaft_angle_deg"] == pytest.approx(nsa)
        assert m["femoral_offset_mm"] == pytest.approx(35.0)
        assert m["vertical_offset_mm"] == pytest.approx(55.0)


def test_bad_landmarks_are_refused():
    good = dict(side="right", head_centre_mm=[0, 0, 0], head_radius_mm=20, shaft_point_mm=[-40, 0, -60],
                shaft_direction=[0, 0, 1], neck_point_mm=[-10, 0, -10])
    measurements_from_landmarks(**good)
    for key, value, match in [
        ("side", "both", "side"),
        ("head_radius_mm", -1, "head_radius_mm"),
        ("head_radius_mm", "big", "head_radius_mm"),
        ("shaft_direction", [0, 0, 0], "shaft_direction"),
        ("head_centre_mm", [0, np.nan, 0], "head_centre_mm"),
        ("neck_point_mm", [1, 2], "neck_point_mm"),
        ("neck_point_mm", [0, 0, 0], "neck axis"),
    ]:
        with pytest.raises(DataError, match=match):
            measurements_from_landmarks(**{**good, key: value})
    assert measurements_from_landmarks(**good)["vertical_offset_mm"] is None


def test_measure_synthetic_surface_in_any_pose(synthetic):
    femur, surface = synthetic
    q, _ = np.linalg.qr(np.random.default_rng(1).standard_normal((3, 3)))
    if np.linalg.det(q) < 0:
        q[:, 0] *= -1
    T = np.eye(4)
    T[:3, :3], T[:3, 3] = q, [100.0, -40.0, 700.0]
    m = measure_femur(surface.transformed(T), side="right")
    validate_measurements(m)
    assert m["hip_centre_mm"] == pytest.approx(list(T[:3, 3]), abs=0.3)
    assert m["head_radius_mm"] == pytest.approx(femur.head_radius_mm, abs=0.25)
    assert m["femoral_offset_mm"] == pytest.approx(femur.offset_mm, abs=0.5)
    assert m["neck_shaft_angle_deg"] == pytest.approx(femur.neck_shaft_angle_deg, abs=1.0)
    # The lesser trochanter tip is the centre level of its bump on the synthetic bone.
    assert m["vertical_offset_mm"] == pytest.approx(femur.lesser_trochanter_depth_mm, abs=2.0)
    assert m["shaft_axis"]["direction"] == pytest.approx(list(q[:, 2]), abs=0.01)
    assert m["neck_axis"]["direction"] == pytest.approx(list(q @ femur.neck_direction), abs=0.02)


def test_measure_left_label_map_matches_right_surface(synthetic):
    femur, surface = synthetic
    right = measure_femur(surface, side="right")
    left_surface = surface.mirrored_x()
    lo, hi = left_surface.bounds_mm()
    geometry = VolumeGeometry.centered(tuple(int(v) for v in np.ceil((hi - lo + 8) / 1.0)[::-1]), (1.0, 1.0, 1.0),
                                       (lo + hi) / 2)
    labels = M.voxelize(left_surface, geometry)
    left = measure_femur(labels, geometry, side="left")
    assert left["side"] == "left"
    for key in ("head_radius_mm", "femoral_offset_mm", "neck_shaft_angle_deg", "vertical_offset_mm"):
        assert left[key] == pytest.approx(right[key], abs=1.5 if key == "vertical_offset_mm" else 0.8), key
    assert left["hip_centre_mm"] == pytest.approx([-v if i == 0 else v for i, v in enumerate(right["hip_centre_mm"])],
                                                  abs=0.5)


def test_measure_landmarks_and_input_errors(synthetic):
    _, surface = synthetic
    marks = A.femur_landmarks(surface, "right")
    assert measure_femur(marks) == measurements_from_femur_landmarks(marks)
    with pytest.raises(DataError, match="side"):
        measure_femur(surface)
    with pytest.raises(DataError, match="VolumeGeometry"):
        measure_femur(np.zeros((4, 4, 4), np.uint8), side="right")
    with pytest.raises(DataError, match="no voxel"):
        measure_femur(np.zeros((4, 4, 4), np.uint8), VolumeGeometry((4, 4, 4), (1, 1, 1)), side="right")


def test_validate_measurements_names_the_bad_field(synthetic):
    _, surface = synthetic
    good = measure_femur(surface, side="right")
    validate_measurements(good)
    bad_cases = [
        ({k: v for k, v in good.items() if k != "neck_axis"}, "neck_axis"),
        ({**good, "side": "middle"}, "side"),
        ({**good, "head_radius_mm": 0.0}, "head_radius_mm"),
        ({**good, "femoral_offset_mm": float("nan")}, "femoral_offset_mm"),
        ({**good, "shaft_axis": {"point_mm": [0, 0, 0], "direction": [0, 0, 2]}}, "unit"),
        ({**good, "hip_centre_mm": [0, 0]}, "hip_centre_mm"),
    ]
    for data, match in bad_cases:
        with pytest.raises(DataError, match=match):
            validate_measurements(data)


# ------------------------------------------------------------------ one table, one path, uncertainty
from inference import measure  # noqa: E402


def _landmarks(shaft_length_mm: float = 120.0, sd_mm: dict | None = None, side: str = "right",
               lesser_trochanter_depth_mm: float = 45.0) -> measure.MeasurementLandmarks:
    """A right femur: shaft axis = z (proximal +z) through the origin, head 38 mm medial (+x) and
    60 mm up, CCD 130 deg; the shaft stretch starts 12 mm below the lesser trochanter."""
    head = np.array([38.0, 0.0, 60.0])
    theta = np.radians(130.0)
    neck = np.array([np.sin(theta), 0.0, -np.cos(theta)])  # towards the head
    lt = np.array([6.0, 8.0, 60.0 - lesser_trochanter_depth_mm])
    top = lt[2] - 12.0
    points = {"head_centre": head, "neck_point": head - 25.0 * neck, "shaft_point_proximal": [0.0, 0.0, top],
              "shaft_point_distal": [0.0, 0.0, top - shaft_length_mm], "lesser_trochanter": lt}
    return measure.MeasurementLandmarks(side, points, 23.0, sd_mm or {})


def test_descriptor_table_declares_every_measurement_once():
    keys = [m.key for m in measure.MEASUREMENTS]
    assert len(keys) == len(set(keys)) and {"hip_centre_mm", "femoral_offset_mm", "neck_shaft_angle_deg"} <= set(keys)
    for m in measure.MEASUREMENTS:
        assert m.key.endswith("_" + m.unit) and m.unit in ("mm", "deg") and m.label and m.kind in ("scalar", "point")
        assert len(m.definition) > 20 and m.source
    out = measure.measurements_from_measurement_landmarks(_landmarks())
    for m in measure.MEASUREMENTS:
        assert out[m.key] is not None and out["uncertainty"][m.key] > 0
        assert "+-" in out["display"][m.key] and out["display"][m.key].endswith(m.unit)
    assert measure.validate_measurements(json.loads(json.dumps(out))) is not None
    # known answers of the construction
    assert out["femoral_offset_mm"] == pytest.approx(38.0) and out["neck_shaft_angle_deg"] == pytest.approx(130.0)
    assert out["vertical_offset_mm"] == pytest.approx(45.0) and out["head_radius_mm"] == 23.0


def test_recomputing_from_unchanged_landmarks_gives_identical_values(synthetic):
    _, surface = synthetic
    stored = json.loads(json.dumps(measure_femur(surface, side="left")))
    assert measure.recompute_measurements(stored) == stored
    again = measure.recompute_measurements(stored, {"lesser_trochanter": stored["landmarks_mm"]["lesser_trochanter"]})
    assert again == stored


def _geometric_bounds(base: dict, name: str, delta_mm: float) -> dict[str, float]:
    """How far each value may move when landmark ``name`` moves by ``delta_mm`` (first order)."""
    p = {k: np.asarray(v) for k, v in base["landmarks_mm"].items()}
    spacing = np.linalg.norm(p["shaft_point_proximal"] - p["shaft_point_distal"])
    neck = np.linalg.norm(p["head_centre"] - p["neck_point"])
    if name in ("shaft_point_proximal", "shaft_point_distal"):
        # the axis turns about the other end by at most delta / spacing and shifts by at most delta
        other = p["shaft_point_distal" if name == "shaft_point_proximal" else "shaft_point_proximal"]
        turn = delta_mm / spacing
        return {"femoral_offset_mm": delta_mm + np.linalg.norm(p["head_centre"] - other) * turn,
                "neck_shaft_angle_deg": np.degrees(turn),
                "vertical_offset_mm": np.linalg.norm(p["head_centre"] - p["lesser_trochanter"]) * turn}
    if name == "head_centre":
        return {"hip_centre_mm": delta_mm, "femoral_offset_mm": delta_mm, "vertical_offset_mm": delta_mm,
                "neck_shaft_angle_deg": np.degrees(delta_mm / neck)}
    if name == "neck_point":
        return {"neck_shaft_angle_deg": np.degrees(delta_mm / neck)}
    return {"vertical_offset_mm": delta_mm}  # lesser trochanter



def _local_bound(base: dict, name: str, key: str, delta_mm: float) -> float:
    """For measurements without a hand-derived bound: the largest change a move of ``delta_mm``
    can make to first order (the gradient's norm from 1e-4 mm steps), plus 10 % for curvature.
    A jump (two code paths, a discontinuity) breaks it."""
    point = np.asarray(base["landmarks_mm"][name])
    rows = []
    for axis in np.eye(3):
        plus = measure.recompute_measurements(base, {name: point + 1e-4 * axis})[key]
        minus = measure.recompute_measurements(base, {name: point - 1e-4 * axis})[key]
        rows.append((np.asarray(plus, float) - np.asarray(minus, float)) / 2e-4)
    return 1.1 * float(np.linalg.norm(np.array(rows), 2)) * delta_mm


def test_a_small_landmark_move_changes_values_only_as_far_as_the_geometry_allows():
    base = measure.measurements_from_measurement_landmarks(_landmarks())
    rng = np.random.default_rng(11)
    delta = 0.1
    for name in measure.LANDMARK_NAMES:
        bounds = _geometric_bounds(base, name, delta)
        bounds.update({m.key: _local_bound(base, name, m.key, delta) for m in measure.MEASUREMENTS if m.key not in bounds})
        for _ in range(20):
            step = rng.normal(size=3)
            moved_point = np.asarray(base["landmarks_mm"][name]) + delta * step / np.linalg.norm(step)
            moved = measure.recompute_measurements(base, {name: moved_point})
            for m in measure.MEASUREMENTS:
                change = np.linalg.norm(np.subtract(moved[m.key], base[m.key]))
                allowed = bounds[m.key]
                assert change <= allowed * 1.01 + 1e-9, (name, m.key, change, allowed)


def test_lesser_trochanter_move_of_a_hundredth_mm_moves_the_vertical_offset_a_hundredth():
    # issue 15 finding 1: 0.01 mm changed the vertical offset from 59.3 to 56.9 mm
    base = measure.measurements_from_measurement_landmarks(_landmarks())
    lt = np.asarray(base["landmarks_mm"]["lesser_trochanter"])
    moved = measure.recompute_measurements(base, {"lesser_trochanter": lt + [0.0, 0.0, 0.01]})
    assert moved["vertical_offset_mm"] == pytest.approx(base["vertical_offset_mm"] - 0.01, abs=1e-9)
    for key in ("femoral_offset_mm", "neck_shaft_angle_deg", "head_radius_mm", "hip_centre_mm"):
        assert moved[key] == base[key]


def test_uncertainty_propagation_known_answers():
    # offset and vertical offset move one for one with the head centre across / along the shaft
    only_head = {k: 0.0 for k in measure.DEFAULT_LANDMARK_SD_MM} | {"head_centre": 0.7}
    out = measure.measurements_from_measurement_landmarks(_landmarks(sd_mm=only_head))
    assert out["uncertainty"]["femoral_offset_mm"] == pytest.approx(0.7, rel=1e-4)
    assert out["uncertainty"]["vertical_offset_mm"] == pytest.approx(0.7, rel=1e-4)
    assert out["uncertainty"]["head_radius_mm"] == 0.0
    assert out["uncertainty"]["hip_centre_mm"] == pytest.approx(0.7 * np.sqrt(3), rel=1e-4)
    only_lt = {k: 0.0 for k in measure.DEFAULT_LANDMARK_SD_MM} | {"lesser_trochanter": 1.5}
    out = measure.measurements_from_measurement_landmarks(_landmarks(sd_mm=only_lt))
    assert out["uncertainty"]["vertical_offset_mm"] == pytest.approx(1.5, rel=1e-4)
    assert out["uncertainty"]["femoral_offset_mm"] == 0.0


def test_less_visible_shaft_gives_a_larger_offset_uncertainty_and_a_caveat():
    lengths = (30.0, 60.0, 120.0, 240.0)
    outs = [measure.measurements_from_measurement_landmarks(_landmarks(length)) for length in lengths]
    offset_u = [o["uncertainty"]["femoral_offset_mm"] for o in outs]
    angle_u = [o["uncertainty"]["neck_shaft_angle_deg"] for o in outs]
    assert all(a > b for a, b in zip(offset_u, offset_u[1:])) and all(a > b for a, b in zip(angle_u, angle_u[1:]))
    assert all(o["femoral_offset_mm"] == pytest.approx(38.0) for o in outs)  # the values themselves agree
    # 12 mm + the stretch below the lesser trochanter: 42 and 72 mm, the threshold 70 mm
    assert outs[0]["shaft_below_lesser_trochanter_mm"] == pytest.approx(42.0)
    assert {"femoral_offset_mm", "neck_shaft_angle_deg"} <= set(outs[0]["caveats"])
    assert not {"hip_centre_mm", "head_radius_mm", "vertical_offset_mm"} & set(outs[0]["caveats"])
    assert "42 mm" in outs[0]["caveats"]["femoral_offset_mm"] and not outs[1]["caveats"]
    lines = measure.caveat_lines(outs[0])
    assert len(lines) == 1 and lines[0].startswith("Femoral offset, Neck-shaft angle (CCD)")


def test_measure_command_recomputes_from_edited_landmarks(tmp_path, capsys):
    from inference import cli, io

    out_dir = tmp_path / "out"
    out_dir.mkdir()
    stored = measure.measurements_from_measurement_landmarks(_landmarks())
    io.write_json_atomic(out_dir / "measurements.json", stored)
    assert cli.main(["measure", str(out_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads((out_dir / "measurements.json").read_text())
    lt = np.asarray(stored["landmarks_mm"]["lesser_trochanter"]) + [0.0, 0.0, 2.0]
    io.write_json_atomic(tmp_path / "moved.json", {"landmarks_mm": {"lesser_trochanter": lt}})
    assert cli.main(["measure", str(out_dir), "--landmarks", str(tmp_path / "moved.json"), "--json",
                     "--write", str(tmp_path / "new.json")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["vertical_offset_mm"] == pytest.approx(43.0)
    assert printed == json.loads((tmp_path / "new.json").read_text())
    io.write_json_atomic(tmp_path / "bad.json", {"landmarks_mm": {"knee": [0, 0, 0]}})
    assert cli.main(["measure", str(out_dir), "--landmarks", str(tmp_path / "bad.json")]) == 2
    assert "unknown landmark(s) knee" in capsys.readouterr().err
    assert cli.main(["measure", str(tmp_path / "nowhere")]) == 2


def test_degenerate_landmarks_are_refused_with_a_clear_message():
    marks = _landmarks()
    with pytest.raises(DataError, match="shaft axis points coincide"):
        measure.measurements_from_measurement_landmarks(
            marks.moved("shaft_point_distal", marks.points_mm["shaft_point_proximal"]))
    with pytest.raises(DataError, match="neck axis point coincides"):
        measure.measurements_from_measurement_landmarks(marks.moved("neck_point", marks.points_mm["head_centre"]))
    with pytest.raises(DataError, match="without the landmark"):
        measure.MeasurementLandmarks("right", {"head_centre": [0, 0, 0]}, 20.0)


def test_neck_length_known_answer():
    # neck from the head (38, 0, 60) at CCD 130 deg meets the shaft axis x = 0 after 38 / sin(50 deg)
    out = measure.measurements_from_measurement_landmarks(_landmarks())
    assert out["neck_length_mm"] == pytest.approx(38.0 / np.sin(np.radians(50.0)))
    # anteversion-like skew: the neck passes the shaft 10 mm in front; the nearest point counts
    marks = _landmarks()
    skewed = measure.recompute_measurements(out, {
        "head_centre": marks.points_mm["head_centre"] + [0.0, -10.0, 0.0],
        "neck_point": marks.points_mm["neck_point"] + [0.0, -10.0, 0.0]})
    assert skewed["neck_length_mm"] == pytest.approx(out["neck_length_mm"])
    assert skewed["uncertainty"]["neck_length_mm"] > 0
