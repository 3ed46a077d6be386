"""Tests of inference.measure: measurements.json from landmarks, surfaces and label maps."""

from __future__ import annotations

import json

import numpy as np
import pytest

from inference import anatomy as A
from inference.data import mesh as M
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
    assert tuple(m) == MEASUREMENT_KEYS
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
