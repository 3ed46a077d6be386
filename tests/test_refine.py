"""Known-answer tests of the pieces of inference.refine (the optimisation itself: eval_cases)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tensorflow as tf

from inference import refine
from inference.geometry import VolumeGeometry


def _smooth_field(shape, seed=0, amplitude=0.8):
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    field = np.stack([gaussian_filter(rng.normal(size=shape), 2.0) for _ in range(3)], -1)
    return (amplitude * field / np.abs(field).max()).astype(np.float32)


def test_identity_correction_keeps_the_field():
    grid = VolumeGeometry.centered((12, 10, 14), (1.5, 1.5, 2.0), (5.0, 0.0, -3.0))
    psi = _smooth_field(grid.shape_zyx)
    out = refine.corrected_field(psi, grid, np.zeros((3, 3, 4, 3)), (3, 3, 4), np.eye(3), np.zeros(3),
                                 np.array([5.0, 0.0, -3.0]))
    np.testing.assert_allclose(out, psi, atol=1e-5)


def test_a_translation_correction_moves_the_pull_back_field():
    """C(x) = x + t: the corrected field pulls y from psi at y - t, i.e. -t (voxels) plus psi there."""
    grid = VolumeGeometry.centered((10, 10, 12), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0))
    psi = np.zeros(grid.shape_zyx + (3,), np.float32)
    shift = np.array([2.0, 0.0, 4.0])  # mm: 2 x voxels, 2 z voxels
    out = refine.corrected_field(psi, grid, np.zeros((3, 3, 3, 3)), (3, 3, 3), np.eye(3), shift, np.zeros(3))
    np.testing.assert_allclose(out[5, 5, 5], [-2.0, 0.0, -2.0], atol=1e-5)


def test_a_displacement_correction_is_inverted():
    """C(x) = x + d with a constant d: the same as a translation by d."""
    grid = VolumeGeometry.centered((10, 10, 12), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0))
    psi = np.zeros(grid.shape_zyx + (3,), np.float32)
    displacement = np.broadcast_to([0.0, 3.0, 0.0], (3, 3, 3, 3)).astype(np.float32)  # 3 mm in y
    out = refine.corrected_field(psi, grid, displacement, (3, 3, 3), np.eye(3), np.zeros(3), np.zeros(3))
    np.testing.assert_allclose(out[5, 5, 6], [0.0, -3.0, 0.0], atol=1e-4)


def test_splat_conserves_what_lands_on_the_detector():
    uv = tf.constant([[1.25, 2.5], [3.0, 0.0], [10.0, 1.0], [-3.0, 2.0]], tf.float32)
    values = tf.constant([[1.0], [2.0], [5.0], [7.0]])
    image = refine._splat(tf, uv, values, 4, 5).numpy()[..., 0]
    assert image.shape == (4, 5)
    np.testing.assert_allclose(image.sum(), 3.0, atol=1e-6)  # the last two points are off the detector
    np.testing.assert_allclose(image[2, 1], 0.75 * 0.5)
    np.testing.assert_allclose(image[0, 3], 2.0)


def test_pose_matrices_rotate_about_their_centre():
    centre = np.array([10.0, -20.0, 5.0])
    matrices = refine._pose_matrices(tf, tf.constant([[0.0, 0.0, 0.0], [0.0, 0.0, 90.0]]),
                                     tf.zeros((2, 3)), centre).numpy()
    np.testing.assert_allclose(matrices[0], np.eye(4), atol=1e-7)
    np.testing.assert_allclose(matrices[1] @ np.append(centre, 1.0), np.append(centre, 1.0), atol=1e-5)
    np.testing.assert_allclose(matrices[1][:3, :3] @ [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], atol=1e-6)


def _result_with_rotation(angle_deg):
    matrix = refine._pose_matrices(tf, tf.constant([[0.0, 0.0, angle_deg]]), tf.zeros((1, 3)),
                                   np.array([30.0, 0.0, 0.0])).numpy()[0]
    return refine.RefineResult(used=True, psi=np.zeros((2, 2, 2, 3)), pose_corrections=[None, matrix],
                               loss_before=0.1, loss_after=0.05, terms_before={}, terms_after={}, steps=3,
                               time_s=0.1, centre_mm=np.array([30.0, 0.0, 0.0]))


def _frame(side):
    """The registration frame of an AP and a lateral view of a ``side`` hip."""
    from inference import geometry
    from inference.registration import RegistrationFrame

    projections = [geometry.projection_matrix(geometry.CArmView(sdd_mm=1000, sid_mm=925, lao_deg=lao, cranial_deg=0,
                                                                rows=60, cols=80, pixel_mm=2.0)) for lao in (0, 90)]
    return RegistrationFrame.from_projections(side, projections, [(60, 80), (60, 80)])


@pytest.mark.parametrize("angle_deg, flagged", [(3.0, False), (10.0, True)])
def test_a_calibration_correction_past_the_limit_is_flagged(angle_deg, flagged):
    warnings: list[str] = []
    entry = refine.report_entry(_result_with_rotation(angle_deg), ["AP", "LAT"], _frame("right"), warnings)
    lat = entry["self_calibration"]["LAT"]
    assert math.isclose(lat["rotation_deg"], angle_deg, abs_tol=1e-3)
    assert lat["shift_at_head_mm"] < 1e-3  # a rotation about the head does not move it
    assert "AP" not in entry["self_calibration"]
    assert lat["exceeds_limit"] is flagged
    assert bool(warnings) is flagged


def test_a_left_hip_reports_its_correction_in_the_case_world():
    entry = refine.report_entry(_result_with_rotation(5.0), ["AP", "LAT"], _frame("left"), [])
    matrix = np.array(entry["self_calibration"]["LAT"]["matrix"])
    # mirrored in x: a rotation about z changes sign, the head centre is at -30 mm in x
    np.testing.assert_allclose(matrix[:3, :3] @ [1.0, 0.0, 0.0],
                               [math.cos(math.radians(5)), -math.sin(math.radians(5)), 0.0], atol=1e-6)
    np.testing.assert_allclose(matrix @ [-30.0, 0.0, 0.0, 1.0], [-30.0, 0.0, 0.0, 1.0], atol=1e-5)


def test_corrected_projections_apply_the_correction_in_both_frames():
    result = _result_with_rotation(4.0)
    frame = _frame("left")
    corrected = frame.with_pose_corrections(result.pose_corrections)
    np.testing.assert_array_equal(corrected.projections[0], frame.projections[0])
    np.testing.assert_array_equal(corrected.world_projections[0], frame.world_projections[0])
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    np.testing.assert_allclose(corrected.projections[1], frame.projections[1] @ result.pose_corrections[1])
    np.testing.assert_allclose(corrected.world_projections[1],
                               frame.world_projections[1] @ flip @ result.pose_corrections[1] @ flip)


def test_no_refinement_is_reported_as_not_run():
    assert refine.report_entry(None, ["AP", "LAT"], _frame("right"), []) == {"run": False}


@pytest.mark.parametrize("field, value", [("max_steps", 0), ("time_limit_s", -1.0), ("mask_bias_mm", -0.5),
                                          ("silhouette_mm", 0.0)])
def test_settings_refuse_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        refine.RefineSettings(**{field: value})


def test_shrunk_mask_moves_the_outline_inwards():
    mask = np.zeros((21, 21), np.float32)
    mask[5:16, 5:16] = 1.0
    shrunk = refine._shrunk_mask(mask, 2.0)
    assert shrunk.sum() == pytest.approx(7 * 7, abs=8)
    assert shrunk[10, 10] == 1.0 and shrunk[5, 10] == 0.0


def test_auto_refinement_runs_only_where_an_outline_disagrees_with_its_mask():
    agree = refine.auto_refine_decision({"AP": 0.97, "LAT": 0.96})
    assert not agree["run"] and agree["lowest"] == pytest.approx(0.96) and "agree" in agree["reason"]
    below = refine.auto_refine_decision({"AP": 0.97, "LAT": refine.AUTO_REFINE_BELOW - 0.001})
    assert below["run"] and "LAT" in below["mask_agreement_dice"] and "disagrees" in below["reason"]
    # the threshold itself does not refine; a view without a mask is left out
    assert not refine.auto_refine_decision({"AP": refine.AUTO_REFINE_BELOW, "LAT": None})["run"]
    assert not refine.auto_refine_decision({"AP": None})["run"]
    assert refine.auto_refine_decision({"AP": 0.99}, threshold=0.995)["run"]


def test_auto_refinement_says_why_it_cannot_run_without_tensorflow(monkeypatch):
    from inference import backends

    monkeypatch.setattr(backends, "tensorflow_available", lambda: False)
    decision = refine.auto_refine_decision({"AP": 0.5, "LAT": 0.9})
    assert not decision["run"] and "TensorFlow" in decision["reason"]


def test_the_default_refinement_is_automatic_unless_the_setting_says_otherwise(monkeypatch):
    from inference.errors import ConfigError

    monkeypatch.delenv(refine.REFINE_ENV, raising=False)
    assert refine.default_refine() == "auto" == refine.DEFAULT_REFINE
    for word, value in (("on", True), ("OFF", False), (" auto ", "auto")):
        monkeypatch.setenv(refine.REFINE_ENV, word)
        assert refine.default_refine() == value
    monkeypatch.setenv(refine.REFINE_ENV, "sometimes")
    with pytest.raises(ConfigError, match="HIPATLAS_REFINE"):
        refine.default_refine()


def test_a_disagreeing_outline_is_told_to_the_surgeon(monkeypatch):
    from inference import backends

    assert refine.auto_refine_warning(refine.auto_refine_decision({"AP": 0.97, "LAT": 0.96})) is None
    refined = refine.auto_refine_warning(refine.auto_refine_decision({"AP": 0.90, "LAT": 0.96}))
    assert "AP mask" in refined and "0.90" in refined and "refined" in refined
    monkeypatch.setattr(backends, "tensorflow_available", lambda: False)
    unrefined = refine.auto_refine_warning(refine.auto_refine_decision({"AP": 0.97, "LAT": 0.93}))
    assert "LAT mask" in unrefined and "TensorFlow" in unrefined and "check the overlays" in unrefined


def test_forced_refinement_is_refused_up_front_without_tensorflow(monkeypatch):
    from inference import backends
    from inference.errors import ConfigError

    monkeypatch.setattr(backends, "tensorflow_available", lambda: False)
    with pytest.raises(ConfigError, match="needs TensorFlow"):
        refine.require_tensorflow()


def test_tensorflow_is_preloaded_in_a_background_thread():
    import sys

    thread = refine.preload_tensorflow()
    assert thread.daemon and thread.name == "hipatlas-import-tensorflow"
    thread.join(timeout=300)
    assert not thread.is_alive() and "tensorflow" in sys.modules
