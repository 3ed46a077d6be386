"""Measurement graphics on radiographs (inference/graphics.py): known answers through P."""

from __future__ import annotations

import numpy as np
import pytest

from inference import geometry, graphics
from inference.measure import measurements_from_landmarks

ISOCENTRE = (20.0, -30.0, 900.0)


def _view(lao_deg: float, **kwargs) -> geometry.CArmView:
    params = dict(sdd_mm=1000.0, sid_mm=925.0, lao_deg=lao_deg, cranial_deg=0.0, rows=800, cols=600,
                  pixel_mm=0.4, isocentre_mm=ISOCENTRE)
    params.update(kwargs)
    return geometry.CArmView(**params)


def _hip(seed: int = 0):
    rng = np.random.default_rng(seed)
    centre = np.array(ISOCENTRE) + rng.normal(0, 5, 3)
    landmarks = {
        "head_centre": centre,
        "neck_point": centre + np.array([-18.0, 4.0, -14.0]) + rng.normal(0, 1, 3),
        "shaft_point_proximal": centre + np.array([-40.0, 6.0, -60.0]),
        "shaft_point_distal": centre + np.array([-32.0, 8.0, -120.0]),
        "lesser_trochanter": centre + np.array([-30.0, 12.0, -62.0]),
    }
    m = measurements_from_landmarks(
        "right", centre, 23.0, landmarks["shaft_point_proximal"],
        landmarks["shaft_point_proximal"] - landmarks["shaft_point_distal"], landmarks["neck_point"],
        lesser_trochanter_mm=landmarks["lesser_trochanter"])
    return m, {k: v.tolist() for k, v in landmarks.items()}


def test_landmarks_and_lines_project_where_P_says():
    view = _view(10.0)
    P = geometry.projection_matrix(view)
    measurements, landmarks = _hip()
    drawn = graphics.view_graphics(measurements, landmarks, P, (view.rows, view.cols), detector_mm_per_px=0.4)
    for label in drawn.labels:
        u, v = geometry.project_points(P, np.array(landmarks[label.name]))
        assert label.uv == pytest.approx((u, v), abs=1e-9)
        assert label.inside
    kinds = {line.kind: line for line in drawn.polylines}
    assert set(kinds) == {"head", "shaft_axis", "offset", "vertical_offset", "neck_axis"}
    # The offset line runs from the projected head centre to the projected foot on the shaft axis.
    centre = np.array(measurements["hip_centre_mm"])
    shaft_point = np.array(measurements["shaft_axis"]["point_mm"])
    shaft_dir = np.array(measurements["shaft_axis"]["direction"])
    foot = shaft_point + ((centre - shaft_point) @ shaft_dir) * shaft_dir
    np.testing.assert_allclose(kinds["offset"].points_uv, geometry.project_points(P, np.array([centre, foot])),
                               atol=1e-9)
    assert "Offset" in kinds["offset"].text and f"{measurements['femoral_offset_mm']:.1f}" in kinds["offset"].text
    # Every point of the projected shaft axis lies on the projection of the 3D axis line.
    a, b = geometry.project_points(P, np.array([shaft_point, shaft_point + 50 * shaft_dir]))
    normal = np.array([-(b - a)[1], (b - a)[0]]) / np.linalg.norm(b - a)
    assert np.max(np.abs((kinds["shaft_axis"].points_uv - a) @ normal)) < 1e-6


def test_head_outline_is_the_shadow_of_the_sphere():
    view = _view(-25.0)
    P = geometry.projection_matrix(view)
    measurements, landmarks = _hip(1)
    drawn = graphics.view_graphics(measurements, landmarks, P, (view.rows, view.cols))
    outline = next(line for line in drawn.polylines if line.kind == "head")
    assert outline.closed
    # The ray through each outline pixel grazes the sphere: its distance to the centre is r.
    origins, directions = geometry.pixel_rays(P, outline.points_uv)
    centre = np.array(measurements["hip_centre_mm"])
    rel = centre - origins
    distance = np.linalg.norm(rel - np.sum(rel * directions, axis=1, keepdims=True) * directions, axis=1)
    np.testing.assert_allclose(distance, measurements["head_radius_mm"], rtol=1e-9)
    # ... and its size in pixels is about 2 r / (mm per pixel at the hip).
    width = np.ptp(outline.points_uv[:, 0])
    assert width == pytest.approx(2 * 23.0 / drawn.calibration.mm_per_px_at_hip, rel=0.01)


def test_calibration_in_human_terms_at_the_isocentre():
    view = _view(0.0)
    P = geometry.projection_matrix(view)
    calibration = graphics.view_calibration(P, ISOCENTRE, detector_mm_per_px=0.4)
    assert calibration.source_to_hip_mm == pytest.approx(925.0)
    assert calibration.mm_per_px_at_hip == pytest.approx(0.4 * 925.0 / 1000.0)
    assert calibration.sdd_mm == pytest.approx(1000.0)
    assert calibration.magnification == pytest.approx(1000.0 / 925.0)
    assert "magnification at the hip 1.08" in " ".join(calibration.lines())
    unknown = graphics.view_calibration(P * -3.0, ISOCENTRE)  # any scale of P is the same camera
    assert unknown.mm_per_px_at_hip == pytest.approx(calibration.mm_per_px_at_hip)
    assert unknown.magnification is None and "unknown" in " ".join(unknown.lines())


def test_scale_bar_has_its_length_at_the_hip():
    view = _view(0.0)
    P = geometry.projection_matrix(view)
    measurements, landmarks = _hip(2)
    drawn = graphics.view_graphics(measurements, landmarks, P, (view.rows, view.cols))
    bar = drawn.scale_bar
    pixels = bar.end_uv[0] - bar.start_uv[0]
    assert pixels * drawn.calibration.mm_per_px_at_hip == pytest.approx(bar.length_mm)
    assert pixels <= 0.2 * view.cols and bar.length_mm in graphics.SCALE_BAR_LENGTHS_MM
    assert 0 <= bar.start_uv[1] < view.rows


def test_detector_pitch_from_calibration_or_image():
    assert graphics.detector_pixel_mm({"source": "dicom-tags", "view": {"pixel_mm": 0.143}}) == 0.143
    assert graphics.detector_pixel_mm({"source": "calibration-json", "carm": {"pixel_mm": 0.2}}) == 0.2
    assert graphics.detector_pixel_mm({"source": "case.json projection_matrix"}, (0.15, 0.16)) == 0.16
    assert graphics.detector_pixel_mm({"source": "case.json projection_matrix"}, None) is None


def test_dragging_keeps_the_depth_and_the_other_view_shows_the_epipolar_line():
    first, second = _view(0.0), _view(80.0)
    P1, P2 = geometry.projection_matrix(first), geometry.projection_matrix(second)
    rng = np.random.default_rng(3)
    point = np.array(ISOCENTRE) + rng.normal(0, 20, 3)
    target = geometry.project_points(P1, point) + np.array([13.0, -7.5])
    moved = graphics.move_in_view_plane(P1, point, target)
    np.testing.assert_allclose(geometry.project_points(P1, moved), target, atol=1e-8)
    normal = geometry.decompose(P1)[1][2]
    source = geometry.source_position(P1)
    assert (moved - source) @ normal == pytest.approx((point - source) @ normal)
    # The moved point projects onto the epipolar line drawn in the second view.
    segment = graphics.epipolar_segment(P1, target, P2, (second.rows, second.cols))
    assert segment is not None
    direction = (segment[1] - segment[0]) / np.linalg.norm(segment[1] - segment[0])
    rel = geometry.project_points(P2, moved) - segment[0]
    assert abs(rel[0] * direction[1] - rel[1] * direction[0]) < 1e-6
    for u, v in segment:  # clipped to the image border
        assert -0.5 - 1e-9 <= u <= second.cols - 0.5 + 1e-9 and -0.5 - 1e-9 <= v <= second.rows - 0.5 + 1e-9


def test_clip_line_to_image():
    segment = graphics.clip_line_to_image((0.0, 1.0, -10.0), (20, 30))  # v = 10
    np.testing.assert_allclose(sorted(segment.tolist()), [[-0.5, 10.0], [29.5, 10.0]])
    assert graphics.clip_line_to_image((0.0, 1.0, 100.0), (20, 30)) is None  # v = -100: outside
