"""inference.head_anchor: a reconstructed head off the masks' head is moved onto it."""

from __future__ import annotations

import numpy as np
import pytest

from inference import geometry, head_anchor, surface
from inference.data import simulate
from inference.mask_proposal import project_label
from synthetic_shapes import ball_on_tube

HEAD_MM = np.array([0.0, 0.0, 75.0])
HEAD_RADIUS_MM = 22.0


def femur(grid, head_mm):
    """A ball (the head) on a tube along z (the shaft)."""
    return ball_on_tube(grid, head_mm=head_mm, head_radius_mm=HEAD_RADIUS_MM)


@pytest.fixture(scope="module")
def scene():
    grid = geometry.VolumeGeometry((150, 80, 80), (0.8, 0.8, 1.0), (-31.6, -31.6, -50.0))
    views = simulate.standard_geometry((0.0, 0.0, 20.0), "right", rows=400, cols=300, pixel_mm=0.5)["views"]
    projections = [np.asarray(v["projection_matrix"]) for v in views]
    truth, world = femur(grid, HEAD_MM)
    masks = [project_label(truth, grid, p, (400, 300)) >= 0.5 for p in projections]
    return grid, projections, masks, truth, world


def _dice(a, b):
    return 2 * (a & b).sum() / (a.sum() + b.sum())


def test_a_head_off_the_masks_is_moved_onto_them(scene):
    grid, projections, masks, truth, world = scene
    ours, _ = femur(grid, HEAD_MM + [0.0, -2.5, 0.0])
    shift, reason = head_anchor.head_shift(surface.label_surface(ours, grid, label=1), projections, masks)
    assert shift is not None, reason
    # known answer: back by (0, 2.5, 0) mm, within a fraction of a voxel
    assert np.abs(shift.shift_mm - [0.0, 2.5, 0.0]).max() < 0.3, shift.shift_mm
    assert abs(shift.radius_mm - HEAD_RADIUS_MM) < 0.5
    assert shift.report_entry()["used"] and abs(shift.report_entry()["distance_mm"] - 2.5) < 0.3

    soft, = head_anchor.apply_head_shift(shift, grid, ours.astype(np.float32))
    moved = soft >= 0.5
    head = np.linalg.norm(world - HEAD_MM, axis=-1) <= HEAD_RADIUS_MM + 3.0
    before, after = _dice(ours[head] == 1, truth[head] == 1), _dice(moved[head], truth[head] == 1)
    assert before < 0.93 and after > 0.98, (before, after)
    # beyond the fade the femur is left exactly as it was
    far = np.linalg.norm(world - shift.to_mm, axis=-1) > head_anchor.FULL_RADII * shift.radius_mm + head_anchor.FADE_MM
    assert np.array_equal(moved[far], ours[far] == 1)


def test_a_head_on_the_masks_is_left_alone_and_a_missing_mask_refused(scene):
    grid, projections, masks, truth, _ = scene
    mesh = surface.label_surface(truth, grid, label=1)
    shift, reason = head_anchor.head_shift(mesh, projections, masks)
    assert shift is None and "agrees" in reason
    assert head_anchor.head_shift(mesh, projections, [masks[0], None]) == (None, "needs two views with masks")
