"""A view's wrongly recorded angle about the long axis (inference.angle_sensitivity): the points
the true matrices triangulate from the recorded pixels, round trips, and the report's figures."""

from __future__ import annotations

import math

import numpy as np
import pytest

from inference import angle_sensitivity as sens
from inference import geometry


def _pair() -> list[np.ndarray]:
    """An AP and a lateral C-arm view, 90 deg apart about the long axis, isocentre at the origin."""
    return [geometry.projection_matrix(geometry.CArmView(sdd_mm=1000, sid_mm=925, lao_deg=angle, cranial_deg=0,
                                                         rows=400, cols=400, pixel_mm=0.5))
            for angle in (0.0, 90.0)]


def test_the_turns_axis_is_the_long_axis_through_the_isocentre():
    pair = _pair()
    np.testing.assert_allclose(sens.rotation_centre(pair), [0.0, 0.0, 0.0], atol=1e-6)
    turn = sens.rotation_about_z(90.0, [10.0, 0.0, 5.0])
    np.testing.assert_allclose(sens.apply_affine(turn, np.array([[20.0, 0.0, 7.0]])), [[10.0, 10.0, 7.0]], atol=1e-12)


@pytest.mark.parametrize("view", [0, 1])
def test_true_points_project_onto_the_recorded_pixels_and_invert(view):
    pair = _pair()
    rng = np.random.default_rng(4)
    recorded = rng.uniform(-60.0, 60.0, (200, 3))
    same, gap = sens.true_points(pair, recorded, view, 0.0)
    np.testing.assert_allclose(same, recorded, atol=1e-9)
    assert gap.max() < 1e-9
    angle = 5.0
    true, gap = sens.true_points(pair, recorded, view, angle)
    recorded_matrices = [P @ sens.rotation_about_z(angle, [0.0, 0.0, 0.0]) if i == view else P for i, P in enumerate(pair)]
    for P_true, P_recorded in zip(pair, recorded_matrices):
        # the true point is seen by the true camera where the recorded point is seen by the recorded one
        error_px = np.linalg.norm(geometry.project_points(P_true, true) - geometry.project_points(P_recorded, recorded), axis=1)
        assert error_px.max() < 3.0 and np.median(error_px) < 0.5
    assert gap.max() < 1.5 and np.median(gap) < 0.3  # the two true rays nearly meet: the error is invisible
    back = np.array([sens.recorded_point(pair, x, view, angle) for x in true[:20]])
    np.testing.assert_allclose(back, recorded[:20], atol=0.5)


def test_sensitivity_grows_with_the_distance_from_the_axis():
    pair = _pair()
    on_axis = np.array([[0.0, 0.0, z] for z in (-40.0, 0.0, 40.0)])
    off_axis = np.array([[40.0, 0.0, 0.0]])
    entry = sens.sensitivity(pair, np.vstack([on_axis, off_axis]), on_axis[1], ["AP", "LAT"])
    assert entry["per_deg_of"] == sens.REPORT_ANGLE_DEG
    for name in ("AP", "LAT"):
        assert entry[name]["hip_centre_mm_per_deg"] < 1e-6  # on the axis nothing moves
    # a point 40 mm off the axis along x moves by about 40 tan(1 deg) = 0.70 mm when the lateral
    # view is off (along y), and little when the AP is (x lies along the AP's rays)
    assert entry["LAT"]["femur_max_mm_per_deg"] == pytest.approx(40.0 * math.tan(math.radians(1.0)), rel=0.1)
    assert entry["AP"]["femur_max_mm_per_deg"] < 0.2


def test_a_registration_states_no_sensitivity_rather_than_fail(monkeypatch):
    """A pair whose sensitivity cannot be computed gets a reason in report.json, not an error."""
    from types import SimpleNamespace

    from inference import pipeline
    from inference.errors import DataError

    def refuse(*args, **kwargs):
        raise DataError("the two views' central rays are parallel")

    monkeypatch.setattr(sens, "sensitivity", refuse)
    job = SimpleNamespace(case=SimpleNamespace(views=[SimpleNamespace(name="AP"), SimpleNamespace(name="LAT")]),
                          frame=SimpleNamespace(world_projections=_pair()))
    entry = pipeline._angle_sensitivity(job, SimpleNamespace(mesh=SimpleNamespace(vertices=np.zeros((3, 3)))),
                                        SimpleNamespace(measurements={"hip_centre_mm": [0.0, 0.0, 0.0]}))
    assert entry == {"not_computed": "the two views' central rays are parallel"}
