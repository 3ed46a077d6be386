"""Tests of inference.anatomy: sphere fit, cross-sections, femur landmarks and canonical frame."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from inference import anatomy as A
from inference import mesh as M
from inference.data import bones as B
from inference.errors import DataError, InputFileError
from inference.geometry import VolumeGeometry

logger = logging.getLogger(__name__)


def box_mesh(lo=(0.0, 0.0, 0.0), hi=(1.0, 2.0, 3.0)) -> M.Mesh:
    """Axis-aligned box with outward normals."""
    lo, hi = np.asarray(lo, float), np.asarray(hi, float)
    v = np.array([[(lo, hi)[i & 1][0], (lo, hi)[(i >> 1) & 1][1], (lo, hi)[(i >> 2) & 1][2]] for i in range(8)])
    quads = [(0, 2, 3, 1), (4, 5, 7, 6), (0, 1, 5, 4), (2, 6, 7, 3), (0, 4, 6, 2), (1, 3, 7, 5)]
    return M.Mesh(v, [t for a, b, c, d in quads for t in ((a, b, c), (a, c, d))])


def random_rigid(rng) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] *= -1
    T = np.eye(4)
    T[:3, :3] = q
    T[:3, 3] = rng.normal(0, 80, 3)
    return T


def apply(T, p):
    return np.asarray(p) @ T[:3, :3].T + T[:3, 3]


def angle_deg(a, b):
    a, b = np.asarray(a) / np.linalg.norm(a), np.asarray(b) / np.linalg.norm(b)
    return float(np.degrees(np.arccos(np.clip(a @ b, -1, 1))))


@pytest.fixture(scope="module")
def synthetic():
    femur = A.SyntheticFemur(head_radius_mm=23.0, offset_mm=42.0, neck_shaft_angle_deg=127.0, anteversion_deg=12.0)
    return femur, femur.surface(1.25)


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------
def test_fit_sphere_on_a_noisy_cap():
    rng = np.random.default_rng(0)
    centre, radius = np.array([10.0, -20.0, 5.0]), 21.5
    d = rng.normal(size=(3000, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    d = d[d[:, 2] > -0.3]  # a cap, as a femoral head is
    points = centre + d * (radius + rng.normal(0, 0.05, (len(d), 1)))
    c, r = A.fit_sphere(points)
    assert np.linalg.norm(c - centre) < 0.02 and abs(r - radius) < 0.02
    with pytest.raises(DataError, match="at least 4"):
        A.fit_sphere(points[:3])


def test_cross_sections_of_boxes():
    box = box_mesh((0, 0, 0), (4, 6, 10))
    sections = A.cross_sections(box, (1, 1, 3.3), (0, 0, 1))
    assert len(sections) == 1
    s = sections[0]
    assert s.area_mm2 == pytest.approx(24.0)
    assert np.allclose(s.centroid_mm, (2, 3, 3.3))
    assert s.contains((1, 5, 3.3)) and not s.contains((5, 5, 3.3))
    assert s.equivalent_radius_mm == pytest.approx(np.sqrt(24 / np.pi))
    # Oblique cut through the middle: a rectangle 4 x 6*sqrt(2)... centred on the box centre.
    oblique = A.cross_sections(box, (2, 3, 5), (0, 1, 1))[0]
    assert np.allclose(oblique.centroid_mm, (2, 3, 5))
    assert oblique.area_mm2 == pytest.approx(4 * 6 * np.sqrt(2))
    # Two boxes: two loops; a plane missing both: none.
    two = M.Mesh(np.vstack([box.vertices, box.vertices + [10, 0, 0]]), np.vstack([box.faces, box.faces + 8]))
    loops = A.cross_sections(two, (0, 0, 5), (0, 0, 1))
    assert len(loops) == 2 and {round(float(s.centroid_mm[0])) for s in loops} == {2, 12}
    assert A.cross_sections(box, (0, 0, 20), (0, 0, 1)) == []
    # A plane through a vertex layer exactly (z = 0 face) must not lose or double the contour.
    at_face = A.cross_sections(box, (0, 0, 10.0), (0, 0, 1))
    assert sum(s.area_mm2 for s in at_face) in (0.0, pytest.approx(24.0))


def test_cross_sections_skip_only_triangles_the_plane_cannot_cross(synthetic):
    """The cut looks only at triangles whose centre lies within reach of the plane; every loop,
    area and centroid must be bitwise those of the cut through all triangles (random planes)."""
    _, surface = synthetic

    class AllTriangles:  # the same surface without the pruning (infinite reach)
        vertices, faces = surface.vertices, surface.faces

        @staticmethod
        def faces_near_plane(origin_mm, normal):
            return np.arange(len(surface.faces))

    rng = np.random.default_rng(5)
    lo, hi = surface.vertices.min(axis=0), surface.vertices.max(axis=0)
    cut = 0
    for _ in range(40):
        origin, normal = rng.uniform(lo, hi), rng.normal(size=3)
        pruned, full = A.cross_sections(surface, origin, normal), A.cross_sections(AllTriangles, origin, normal)
        assert len(pruned) == len(full)
        cut += bool(full)
        for a, b in zip(pruned, full):
            assert a.area_mm2 == b.area_mm2
            assert np.array_equal(a.centroid_mm, b.centroid_mm) and np.array_equal(a.polygon_mm, b.polygon_mm)
    assert cut >= 20  # most planes meet the femur
    # A plane through vertices exactly (a corner on the plane counts on the + side) as well.
    vertex = surface.vertices[len(surface.vertices) // 2]
    for normal in ((0, 0, 1), (1, 0, 0)):
        pruned, full = A.cross_sections(surface, vertex, normal), A.cross_sections(AllTriangles, vertex, normal)
        assert [s.area_mm2 for s in pruned] == [s.area_mm2 for s in full] and full


# ----------------------------------------------------------------------------------------------
# Synthetic femur with known answers
# ----------------------------------------------------------------------------------------------
def _check_against_truth(femur: A.SyntheticFemur, marks: A.FemurLandmarks, T: np.ndarray, tol_deg: float = 1.0):
    assert np.linalg.norm(marks.head_centre_mm - apply(T, np.zeros(3))) < 0.3
    assert abs(marks.head_radius_mm - femur.head_radius_mm) < 0.25
    z_true = T[:3, :3] @ np.array([0.0, 0.0, 1.0])
    assert angle_deg(marks.shaft_direction, z_true) < 0.5
    shaft_line_point = apply(T, np.array([-femur.offset_mm, 0.0, -80.0]))
    rel = marks.shaft_point_mm - shaft_line_point
    assert np.linalg.norm(rel - (rel @ z_true) * z_true) < 0.4  # the fitted point is on the true axis
    assert angle_deg(marks.neck_direction, T[:3, :3] @ femur.neck_direction) < tol_deg
    offset = np.linalg.norm(np.cross(marks.head_centre_mm - marks.shaft_point_mm, marks.shaft_direction))
    assert offset == pytest.approx(femur.offset_mm, abs=0.5)
    nsa = angle_deg(marks.neck_direction, -marks.shaft_direction)
    assert nsa == pytest.approx(femur.neck_shaft_angle_deg, abs=tol_deg)
    assert np.linalg.norm(marks.lesser_trochanter_mm - apply(T, femur.lesser_trochanter_tip_mm)) < 3.0
    gt_top = femur.greater_trochanter_centre_mm + [0, 0, femur.greater_trochanter_radius_mm]
    assert np.linalg.norm(marks.greater_trochanter_mm - apply(T, gt_top)) < 3.0
    assert marks.femur_length_mm == pytest.approx(femur.shaft_length_mm + femur.head_radius_mm, abs=2.0)
    assert marks.head_coverage > 0.5 and marks.head_fit_rms_mm < 0.2


def test_synthetic_right_femur_in_a_random_pose(synthetic):
    femur, surface = synthetic
    T = random_rigid(np.random.default_rng(11))
    marks = A.femur_landmarks(surface.transformed(T), "right")
    assert marks.side == "right"
    _check_against_truth(femur, marks, T)
    # Canonical frame: head at the origin, shaft +z, head on +x, right-handed.
    C = marks.to_canonical @ T
    assert np.linalg.det(marks.to_canonical[:3, :3]) == pytest.approx(1.0)
    assert np.allclose(C[:3, :3], np.eye(3), atol=0.01)
    assert np.allclose(C[:3, 3], 0.0, atol=0.3)
    canonical = marks.canonical()
    assert np.allclose(canonical.head_centre_mm, 0, atol=1e-9)
    assert np.allclose(canonical.shaft_direction, [0, 0, 1])
    assert abs(canonical.shaft_point_mm[1]) < 1e-9 and canonical.shaft_point_mm[0] < 0
    assert np.allclose(marks.from_canonical_points(marks.to_canonical_points(marks.points_mm())), marks.points_mm())


def test_synthetic_left_femur_is_handled_as_its_mirror(synthetic):
    femur, surface = synthetic
    rng = np.random.default_rng(12)
    T = random_rigid(rng)
    left = surface.mirrored_x().transformed(T)  # a left femur in some scanner frame
    marks = A.femur_landmarks(left, "left")
    assert marks.side == "left"
    assert np.linalg.det(marks.to_canonical[:3, :3]) == pytest.approx(-1.0)
    T_mirror = T @ np.diag([-1.0, 1.0, 1.0, 1.0])
    _check_against_truth(femur, marks, T_mirror)
    # In the canonical frame the left femur looks like the right one.
    right = A.femur_landmarks(surface, "right").canonical()
    canon = marks.canonical()
    assert canon.side == "right"
    assert np.abs(canon.points_mm() - right.points_mm()).max() < 0.5


def test_synthetic_femur_from_a_label_map(synthetic):
    femur, surface = synthetic
    rng = np.random.default_rng(13)
    T = random_rigid(rng)
    moved = surface.transformed(T)
    lo, hi = moved.bounds_mm()
    direction = tuple(map(tuple, random_rigid(rng)[:3, :3]))
    size = np.linalg.norm(hi - lo) + 6
    geometry = VolumeGeometry.centered((int(size / 1.2),) * 3, (1.2, 1.2, 1.2), (lo + hi) / 2, direction)
    labels = M.voxelize(moved, geometry) * np.uint8(2)  # femur as label 2
    marks = A.femur_landmarks_from_labels(labels, geometry, "right", label=2)
    assert np.linalg.norm(marks.head_centre_mm - apply(T, np.zeros(3))) < 0.5
    assert abs(marks.head_radius_mm - femur.head_radius_mm) < 0.5
    nsa = angle_deg(marks.neck_direction, -marks.shaft_direction)
    assert nsa == pytest.approx(femur.neck_shaft_angle_deg, abs=1.5)
    offset = np.linalg.norm(np.cross(marks.head_centre_mm - marks.shaft_point_mm, marks.shaft_direction))
    assert offset == pytest.approx(femur.offset_mm, abs=1.0)


def test_proximal_only_femur_and_too_little_shaft():
    short = A.SyntheticFemur(shaft_length_mm=120.0)
    marks = A.femur_landmarks(short.surface(1.5), "right")
    offset = np.linalg.norm(np.cross(marks.head_centre_mm - marks.shaft_point_mm, marks.shaft_direction))
    assert offset == pytest.approx(short.offset_mm, abs=0.6)
    stub = A.SyntheticFemur(shaft_length_mm=55.0, lesser_trochanter_depth_mm=40.0)
    with pytest.raises(DataError, match="shaft"):
        A.femur_landmarks(stub.surface(1.5), "right")


def test_not_a_femur_is_refused():
    with pytest.raises(DataError, match="femoral head"):
        A.femur_landmarks(box_mesh((0, 0, 0), (30, 30, 200)), "right")
    with pytest.raises(ValueError, match="side"):
        A.femur_landmarks(box_mesh(), "up")
    open_box = box_mesh()
    with pytest.raises(Exception, match="closed"):
        A.femur_landmarks(M.Mesh(open_box.vertices, open_box.faces[1:]), "right")


def test_landmarks_transform_and_serialise(synthetic):
    _, surface = synthetic
    marks = A.femur_landmarks(surface, "right")
    T = random_rigid(np.random.default_rng(14))
    moved = marks.transformed(T)
    assert np.allclose(moved.points_mm(), apply(T, marks.points_mm()))
    assert np.allclose(moved.shaft_direction, T[:3, :3] @ marks.shaft_direction)
    # The canonical frame of the bone does not depend on the frame it is expressed in.
    assert np.allclose(moved.to_canonical_points(moved.points_mm()), marks.to_canonical_points(marks.points_mm()))
    data = json.loads(json.dumps(marks.to_dict()))
    assert data["side"] == "right" and len(data["to_canonical"]) == 4
    rebuilt = A.FemurLandmarks(**data)
    assert np.allclose(rebuilt.points_mm(), marks.points_mm())
    with pytest.raises(ValueError, match="shaft_direction"):
        A.FemurLandmarks(**{**data, "shaft_direction": [0, 0, 0]})
    with pytest.raises(ValueError, match="head_centre_mm"):
        A.FemurLandmarks(**{**data, "head_centre_mm": [0, 0]})
    with pytest.raises(ValueError, match="rigid"):
        marks.transformed(np.diag([2.0, 1.0, 1.0, 1.0]))


# ----------------------------------------------------------------------------------------------
# The shared femurs
# ----------------------------------------------------------------------------------------------
def _femur_files():
    try:
        return [(s.subject_id, side, path) for s in B.list_subjects() for side, path in sorted(s.femur_paths.items())]
    except InputFileError:
        return []


@pytest.mark.parametrize("subject,side,path", _femur_files() or [pytest.param(None, None, None, marks=pytest.mark.skip(
    reason="shared bone surfaces not available"))])
def test_shared_femurs_give_plausible_landmarks(subject, side, path):
    from inference.measure import measurements_from_femur_landmarks

    marks = A.femur_landmarks(M.read_stl(path), side)
    m = measurements_from_femur_landmarks(marks)
    logger.info(
        "%s %s: head r %.1f mm, offset %.1f mm, NSA %.1f deg, vertical offset %.1f mm, length %.0f mm",
        subject, side, m["head_radius_mm"], m["femoral_offset_mm"], m["neck_shaft_angle_deg"],
        m["vertical_offset_mm"], marks.femur_length_mm,
    )
    print(f"{subject} {side}: r={m['head_radius_mm']:.1f} offset={m['femoral_offset_mm']:.1f} "
          f"NSA={m['neck_shaft_angle_deg']:.1f} vertical={m['vertical_offset_mm']:.1f} len={marks.femur_length_mm:.0f}")
    assert 17 <= m["head_radius_mm"] <= 28
    assert 25 <= m["femoral_offset_mm"] <= 55
    assert 115 <= m["neck_shaft_angle_deg"] <= 145
    assert 30 <= m["vertical_offset_mm"] <= 75
    assert 350 <= marks.femur_length_mm <= 500  # whole femurs
    assert marks.head_fit_rms_mm < 0.8 and marks.head_coverage > 0.4
    canon = marks.canonical()
    # Anatomical sanity in the canonical frame of a right femur: the greater trochanter is lateral
    # of the shaft axis and near the head's height, the lesser trochanter posteromedial and below.
    shaft_x = canon.shaft_point_mm[0]
    assert canon.greater_trochanter_mm[0] < shaft_x and canon.greater_trochanter_mm[2] > -25
    assert canon.lesser_trochanter_mm[0] > shaft_x and canon.lesser_trochanter_mm[1] > 5
    assert canon.lesser_trochanter_mm[2] < -30
    # The head lies on the medial side: +x in LPS for a right femur, -x for a left one.
    lateral_to_head = marks.head_centre_mm - marks.greater_trochanter_mm
    assert np.sign(lateral_to_head[0]) == (1 if side == "right" else -1)


def test_landmarks_from_a_point_cloud(synthetic):
    femur, surface = synthetic
    T = random_rigid(np.random.default_rng(15))
    points = apply(T, surface.vertices)
    marks = A.femur_landmarks_from_points(points, "right", spacing_mm=1.0)
    assert np.linalg.norm(marks.head_centre_mm - apply(T, np.zeros(3))) < 0.6
    assert abs(marks.head_radius_mm - femur.head_radius_mm) < 0.8
    assert angle_deg(marks.neck_direction, -marks.shaft_direction) == pytest.approx(femur.neck_shaft_angle_deg, abs=2.0)
    with pytest.raises(DataError, match="at least 100"):
        A.femur_landmarks_from_points(points[:10], "right")
