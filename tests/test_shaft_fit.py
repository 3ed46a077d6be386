"""inference.shaft_fit: a shaft drawn off-centre and too thin is moved onto the masks' outlines."""

from __future__ import annotations

import numpy as np
import pytest

from inference import geometry, shaft_fit
from inference.data import simulate
from inference.mask_proposal import project_label
from synthetic_shapes import ball_on_tube

LT_MM = np.array([0.0, 0.0, 40.0])  # the "lesser trochanter": the fit fades out above it


def femur(grid, centre_xy, radius_mm, bend_below_mm=None, bend_slope=0.0):
    """A tube along z (the shaft) under a ball (the proximal femur) that the fit must not touch;
    below ``bend_below_mm`` the tube's centre drifts along x by ``bend_slope`` mm per mm."""
    return ball_on_tube(grid, centre_xy, radius_mm, bend_below_mm=bend_below_mm, bend_slope=bend_slope)


@pytest.fixture(scope="module")
def scene():
    grid = geometry.VolumeGeometry((150, 70, 70), (0.8, 0.8, 1.0), (-27.6, -27.6, -50.0))
    views = simulate.standard_geometry((0.0, 0.0, 20.0), "right", rows=400, cols=300, pixel_mm=0.5)["views"]
    projections = [np.asarray(v["projection_matrix"]) for v in views]
    truth, world = femur(grid, (1.6, -0.8), 13.0)
    masks = [project_label(truth, grid, p, (400, 300)) >= shaft_fit.OUTLINE_MM for p in projections]
    ours, _ = femur(grid, (0.0, 0.0), 12.0)
    return grid, projections, masks, truth, ours, world


def _fit(grid, projections, masks, ours):
    return shaft_fit.fit_shaft(ours, grid, projections, masks, (0.0, 0.0, 0.0), (0.0, 0.0, 1.0), LT_MM, ["AP", "LAT"])


def _dice(a, b):
    return 2 * (a & b).sum() / (a.sum() + b.sum())


def test_a_thin_off_centre_shaft_is_moved_onto_the_masks(scene):
    grid, projections, masks, truth, ours, world = scene
    fit, reason = _fit(grid, projections, masks, ours)
    assert fit is not None, reason
    full = fit.weights >= 0.999
    # known answer: the tube moved by (1.6, -0.8) mm (whole voxels) and widened by 13/12 in both directions
    # (the plane basis is (b1, b2) perpendicular to z: compare in world x, y)
    shift_xy = fit.shift_mm[full] @ fit.basis[:, :2]
    assert np.abs(np.median(shift_xy, 0) - [1.6, -0.8]).max() < 0.25
    # (within the voxel staircase of two tubes on a 0.8 mm grid)
    assert np.abs(np.median(fit.width_factors[full], 0) - 13.0 / 12.0).max() < 0.05
    entry = fit.report_entry()
    assert entry["used"] and entry["heights"] >= 60 and set(entry["mean_width_factor"]) == {"AP", "LAT"}

    soft, = shaft_fit.apply_shaft_fit(fit, grid, ours.astype(np.float32))
    fitted = soft >= 0.5
    z = world[..., 2]
    shaft = z <= LT_MM[2] - shaft_fit.FADE_FULL_BELOW_LT_MM
    before, after = _dice(ours[shaft] == 1, truth[shaft] == 1), _dice(fitted[shaft], truth[shaft] == 1)
    assert before < 0.92 and after > 0.97, (before, after)
    # the proximal femur (above the fade) is left exactly as it was
    top = z >= LT_MM[2] + shaft_fit.FADE_ZERO_ABOVE_LT_MM
    assert np.array_equal(fitted[top], ours[top] == 1)
    # heights never change: every slice keeps femur iff it had some
    assert np.array_equal(fitted.any(axis=(1, 2)), (ours == 1).any(axis=(1, 2)))


def test_no_fit_without_two_masks_or_with_views_seeing_alike(scene):
    grid, projections, masks, _, ours, _ = scene
    assert _fit(grid, projections, [masks[0], None], ours) == (None, "needs two views with masks")
    # the same view twice cannot tell the two directions of a cross-section apart
    fit, reason = _fit(grid, [projections[0]] * 2, [masks[0]] * 2, ours)
    assert fit is None and "apart" in reason
    # masks that show no shaft below the proximal femur
    cut = [m.copy() for m in masks]
    for m in cut:
        m[125:] = False  # rows below about 50 mm up the tube
    fit, reason = _fit(grid, projections, cut, ours)
    assert fit is None and "heights" in reason


def test_a_shaft_that_agrees_with_the_masks_is_left_alone(scene):
    grid, projections, masks, truth, _, _ = scene
    fit, reason = _fit(grid, projections, masks, truth)
    assert fit is not None, reason
    assert np.abs(fit.shift_mm).max() < 0.2 and np.abs(fit.width_factors - 1).max() < 0.02
    soft, = shaft_fit.apply_shaft_fit(fit, grid, truth.astype(np.float32))
    assert _dice(soft >= 0.5, truth == 1) > 0.995


def test_below_the_radiographs_the_shaft_is_continued_straight(scene):
    # The radiographs end 30 mm above the bottom of the grid; there the reconstruction's shaft bends
    # away (0.3 mm per mm, 9 mm at the bottom) while the true one goes on straight.
    grid, projections, masks, truth, _, world = scene
    edge_z = -20.0
    cut = []
    for projection, mask in zip(projections, masks):
        u, v = geometry.project_points(projection, np.array([[0.0, 0.0, edge_z]]))[0]
        mask = mask.copy()
        mask[int(np.ceil(v)):] = False  # the image ends at that row
        cut.append(mask)
    ours, _ = femur(grid, (1.6, -0.8), 13.0, bend_below_mm=edge_z, bend_slope=0.3)
    fit, reason = _fit(grid, projections, cut, ours)
    assert fit is not None, reason
    entry = fit.report_entry()
    assert 20.0 <= entry["continued_below_mm"] <= 31.0
    assert entry["max_continued_shift_mm"] <= shaft_fit.MAX_STRAIGHTENING_MM
    soft, = shaft_fit.apply_shaft_fit(fit, grid, ours.astype(np.float32))
    z = world[..., 2]
    unseen = z < edge_z - 2.0
    before, after = _dice(ours[unseen] == 1, truth[unseen] == 1), _dice(soft[unseen] >= 0.5, truth[unseen] == 1)
    assert before < 0.8 and after > 0.9, (before, after)
    # known answer: each unseen slice's centre is brought to within the tolerance of the true line
    # (and 0.6 mm: the smoothing's end effect at the bottom slices and the 0.8 mm voxel staircase)
    x = world[..., 0]
    for k in np.nonzero(unseen.all(axis=(1, 2)) & (truth == 1).any(axis=(1, 2)))[0]:
        ours_x, fitted_x = x[k][ours[k] == 1].mean(), x[k][soft[k] >= 0.5].mean()
        true_x = x[k][truth[k] == 1].mean()
        assert abs(fitted_x - true_x) <= shaft_fit.STRAIGHTENING_TOLERANCE_MM + 0.6, (k, ours_x, fitted_x, true_x)
    # where the masks show the shaft, it already agreed and stays where it was
    seen = (z > edge_z + 10.0) & (z <= LT_MM[2] - shaft_fit.FADE_FULL_BELOW_LT_MM)
    assert _dice(soft[seen] >= 0.5, ours[seen] == 1) > 0.99


def test_no_continuation_when_the_masks_show_the_whole_shaft(scene):
    grid, projections, masks, _, ours, _ = scene
    fit, _ = _fit(grid, projections, masks, ours)
    assert fit.report_entry()["continued_below_mm"] == 0.0
