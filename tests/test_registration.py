"""The registration frame (inference.registration): a case into the network's right-handed frame and back."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from inference import geometry
from inference.errors import DataError
from inference.registration import MIRROR_X, RegistrationFrame, mirrored_volume

ROWS, COLS = 60, 80


def _views(lao_deg=(0.0, 90.0), seed: int = 5):
    rng = np.random.default_rng(seed)
    views = []
    for lao in lao_deg:
        P = geometry.projection_matrix(geometry.CArmView(sdd_mm=1000, sid_mm=925, lao_deg=lao, cranial_deg=0,
                                                         rows=ROWS, cols=COLS, pixel_mm=2.0))
        image = rng.random((ROWS, COLS)).astype(np.float32)
        views.append(SimpleNamespace(projection=-3.0 * P, image=SimpleNamespace(pixels=image)))  # any scale
    return views


def test_left_femur_is_registered_with_right_handed_cameras_on_flipped_images():
    """A left case is mirrored in x *and* its images flipped, so that the network sees a right femur
    through right-handed cameras as in training; a world point stays on its (flipped) pixel."""
    views = _views()
    point = np.array([60.0, -10.0, 20.0])  # a left hip: patient left is +x
    for side in ("right", "left"):
        case = SimpleNamespace(side=side, views=views)
        frame = RegistrationFrame.of_case(case)
        assert frame.mirror is (side == "left")
        mirrored = frame.point_in(point)
        np.testing.assert_array_equal(mirrored, point * ([-1.0, 1.0, 1.0] if side == "left" else 1.0))
        for view, image, P, P_world in zip(views, frame.images_in(case), frame.projections, frame.world_projections):
            _, R, _ = geometry.decompose(P)
            assert np.linalg.det(R) > 0, "registration cameras must be right-handed"
            np.testing.assert_allclose(P_world / P_world[2, 3], view.projection / view.projection[2, 3])
            u, v = geometry.project_points(P, mirrored[None])[0]
            u0, v0 = geometry.project_points(P_world, point[None])[0]
            expected_u = (COLS - 1 - u0) if side == "left" else u0
            assert abs(u - expected_u) < 1e-6 and abs(v - v0) < 1e-6
            np.testing.assert_array_equal(image[:, int(round(u))], view.image.pixels[:, int(round(u0))])


def test_cameras_are_normalised_once_with_the_patient_in_front():
    frame = RegistrationFrame.of_case(SimpleNamespace(side="left", views=_views()))
    for P_world, P in zip(frame.world_projections, frame.projections):
        # w > 0 at the patient (the midpoint of the central rays), in both frames
        assert (P_world @ np.append(frame.pair.midpoint_mm, 1.0))[2] > 0
        assert (P @ np.append(frame.start_mm, 1.0))[2] > 0
    assert frame.view_angle_deg == pytest.approx(90.0)
    np.testing.assert_allclose(frame.start_mm, frame.point_in(frame.pair.midpoint_mm))


def test_everything_carried_out_of_the_frame_comes_back():
    frame = RegistrationFrame.of_case(SimpleNamespace(side="left", views=_views()))
    rng = np.random.default_rng(1)
    point = rng.normal(size=3) * 50
    np.testing.assert_array_equal(frame.point_out(frame.point_in(point)), point)
    image = rng.random((ROWS, COLS))
    np.testing.assert_array_equal(frame.image_out(frame.image_in(image)), image)
    assert frame.points_out({"a": [1.0, 2.0, 3.0]}) == {"a": [-1.0, 2.0, 3.0]}
    # a rigid correction of the frame is F M F in the case's world: it moves the mirrored point
    angle = np.radians(7.0)
    M = np.eye(4)
    M[:3, :3] = [[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]
    M[:3, 3] = [1.0, -2.0, 3.0]
    moved_in_frame = (M @ np.append(frame.point_in(point), 1.0))[:3]
    np.testing.assert_allclose(frame.transform_out(M) @ np.append(point, 1.0),
                               np.append(frame.point_out(moved_in_frame), 1.0), atol=1e-9)
    # corrected cameras: a point still projects to the same (flipped) pixel in both frames
    corrected = frame.with_pose_corrections([None, M])
    np.testing.assert_array_equal(corrected.projections[0], frame.projections[0])
    u_frame = geometry.project_points(corrected.projections[1], frame.point_in(point)[None])[0]
    u_world = geometry.project_points(corrected.world_projections[1], point[None])[0]
    assert u_frame[0] == pytest.approx(COLS - 1 - u_world[0]) and u_frame[1] == pytest.approx(u_world[1])


def test_a_mirrored_volume_keeps_each_voxel_at_its_mirrored_world_position():
    grid = geometry.VolumeGeometry((4, 5, 6), (1.5, 2.0, 2.5), (10.0, -20.0, 30.0), np.eye(3))
    volume = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    frame = RegistrationFrame.of_case(SimpleNamespace(side="left", views=_views()))
    out, out_grid = frame.volume_out(volume, grid)
    k, j, i = 3, 1, 2
    world = (grid.index_to_world() @ [i, j, k, 1.0])[:3]
    ijk = (out_grid.world_to_index() @ np.append(frame.point_out(world), 1.0))[:3]
    np.testing.assert_allclose(ijk, np.round(ijk), atol=1e-9)
    ii, jj, kk = (int(round(x)) for x in ijk)
    assert out[kk, jj, ii] == volume[k, j, i]
    assert np.linalg.det(np.asarray(out_grid.direction)) > 0
    right = RegistrationFrame.of_case(SimpleNamespace(side="right", views=_views()))
    assert right.volume_out(volume, grid)[0] is volume
    np.testing.assert_array_equal(mirrored_volume(volume, grid)[0], out)


def test_the_mirror_is_the_geometry_modules():
    P = np.arange(12, dtype=float).reshape(3, 4) + np.eye(3, 4)
    np.testing.assert_array_equal(geometry.mirror_world_x(P), P @ MIRROR_X)


def test_views_too_close_are_refused_and_a_narrow_pair_warns():
    frame = RegistrationFrame.of_case(SimpleNamespace(side="right", views=_views((0.0, 20.0))))
    with pytest.raises(DataError, match="only 20.0 deg apart"):
        frame.check_view_angle("case.json", [])
    warnings: list[str] = []
    RegistrationFrame.of_case(SimpleNamespace(side="right", views=_views((0.0, 45.0)))).check_view_angle("c", warnings)
    assert warnings == ["views are 45 deg apart; accuracy is best near 90 deg"]
    with pytest.raises(DataError, match="side"):
        RegistrationFrame.from_projections("both", [v.projection for v in _views()], [(ROWS, COLS)] * 2)
