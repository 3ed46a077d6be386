"""Known-answer tests of inference.localize: the femoral head of simulated cases is found in 3D."""

from __future__ import annotations

import numpy as np
import pytest

from inference import geometry, io
from inference.errors import DataError
from inference.localize import locate_femoral_head

import register_helpers as rh


def _locate(case_dir, mirror: bool = False):
    case = io.load_case(case_dir)
    pair = geometry.view_pair_check(case.views[0].P, case.views[1].P)
    projections = [geometry.normalise_projection(v.P, front_point_mm=pair.midpoint_mm) for v in case.views]
    if mirror:
        projections = [p @ np.diag([-1.0, 1.0, 1.0, 1.0]) for p in projections]
    return case, projections, locate_femoral_head(projections, [v.mask for v in case.views])


@pytest.mark.parametrize("side, angles", [("right", None), ("left", None), ("left", rh.OBLIQUE_LEFT_DEG)],
                         ids=["right-ap-lat", "left-ap-lat", "left-oblique"])
def test_head_found_within_3mm(tmp_path_factory, side, angles):
    sim = rh.simulated_case(tmp_path_factory.getbasetemp(), side, angles_deg=angles)
    case, projections, head = _locate(sim.case_dir)
    truth = sim.hip_centre_mm
    assert np.linalg.norm(head.centre_mm - truth) < 3.0, (head.centre_mm, truth)
    # the 2D head centres are where the 3D estimate projects, and the radius is a femoral head's
    for view_index, projection in enumerate(projections):
        np.testing.assert_allclose(geometry.project_points(projection, head.centre_mm[None])[0],
                                   head.pixels_2d[view_index], atol=3.0)
    assert 0.6 * sim.truth["head_radius_mm"] < head.radius_mm < 1.4 * sim.truth["head_radius_mm"]


def test_left_case_located_in_the_mirrored_world(tmp_path_factory):
    """The pipeline locates a left femur in the world mirrored in x: the answer mirrors the truth."""
    sim = rh.simulated_case(tmp_path_factory.getbasetemp(), "left")
    _, _, head = _locate(sim.case_dir, mirror=True)
    assert np.linalg.norm(head.centre_mm - sim.hip_centre_mm * [-1.0, 1.0, 1.0]) < 3.0


def test_disjoint_masks_are_refused(tmp_path_factory):
    """Masks that do not show the same femur (one moved far along the epipolar direction) fail clearly."""
    sim = rh.simulated_case(tmp_path_factory.getbasetemp(), "right")
    case, projections, _ = _locate(sim.case_dir)
    masks = [v.mask.copy() for v in case.views]
    rows, cols = masks[1].shape
    moved = np.zeros_like(masks[1])
    moved[-rows // 5:, : cols // 5] = True  # a blob in a lower corner, far below the femoral head
    with pytest.raises(DataError, match="overlap|outside"):
        locate_femoral_head(projections, [masks[0], moved])
    with pytest.raises(DataError, match="empty"):
        locate_femoral_head(projections, [masks[0], np.zeros_like(masks[1])])
