"""Tests of inference.data.shape: parameter sampler and the deterministic shape transform."""

from __future__ import annotations

import dataclasses
import json
import time

import numpy as np
import pytest

from inference import anatomy as A
from inference import mesh as M
from inference.data import bones as B
from inference.data.shape import (
    IDENTITY_SHAPE,
    ShapeParams,
    ShapeRanges,
    ShapeTransform,
    sample_shape_params,
)
from inference.errors import InputFileError
from inference.geometry import VolumeGeometry


@pytest.fixture(scope="module")
def bone():
    """A synthetic right femur in its canonical frame, with its detected landmarks."""
    femur = A.SyntheticFemur(head_radius_mm=22.0, offset_mm=40.0, neck_shaft_angle_deg=128.0, anteversion_deg=10.0)
    surface = femur.surface(1.5)
    marks = A.femur_landmarks(surface, "right")
    surface = surface.transformed(marks.to_canonical)
    return femur, surface, marks.canonical()


def nsa_deg(marks) -> float:
    return float(np.degrees(np.arccos(np.clip(marks.neck_direction @ -marks.shaft_direction, -1, 1))))


def bone_grid_points(surface, step_mm=4.0, margin_mm=12.0):
    lo, hi = surface.bounds_mm()
    axes = [np.arange(lo[i] - margin_mm, hi[i] + margin_mm, step_mm) for i in range(3)]
    return np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)


EXTREMES = [
    ShapeParams(1.15, 8.0, 1.15, 1.1, 10.0, 3.0, 40.0, 7),
    ShapeParams(0.85, -8.0, 0.85, 0.9, -10.0, 3.0, 40.0, 8),
    ShapeParams(1.0, 8.0, 0.85, 1.1, -10.0, 3.0, 40.0, 9),
]


# ----------------------------------------------------------------------------------------------
# Parameters and sampler
# ----------------------------------------------------------------------------------------------
def test_params_validate_with_named_fields():
    for field, value in [("global_scale", 3.0), ("neck_shaft_delta_deg", 40.0), ("neck_length_factor", 0.5),
                         ("head_radius_factor", 1.5), ("anteversion_delta_deg", np.nan),
                         ("deformation_amplitude_mm", -1.0), ("deformation_spacing_mm", 5.0)]:
        with pytest.raises(ValueError, match=field):
            ShapeParams(**{field: value})
    with pytest.raises(ValueError, match="deformation_seed"):
        ShapeParams(deformation_seed=-3)
    with pytest.raises(ValueError, match="neck_shaft_delta_deg"):
        ShapeRanges(neck_shaft_delta_deg=(-30.0, 30.0))
    with pytest.raises(ValueError, match="global_scale"):
        ShapeRanges(global_scale=(1.1, 0.9))
    assert IDENTITY_SHAPE.is_identity and not EXTREMES[0].is_identity


def test_sampler_is_seeded_and_within_ranges():
    ranges = ShapeRanges()
    a = [sample_shape_params(np.random.default_rng(5)) for _ in range(2)]
    assert a[0] == a[1]
    rng = np.random.default_rng(6)
    draws = [sample_shape_params(rng, ranges) for _ in range(200)]
    assert len({d.deformation_seed for d in draws}) == 200
    for name in ("global_scale", "neck_shaft_delta_deg", "neck_length_factor", "head_radius_factor",
                 "anteversion_delta_deg", "deformation_amplitude_mm"):
        values = np.array([getattr(d, name) for d in draws])
        lo, hi = getattr(ranges, name)
        assert values.min() >= lo and values.max() <= hi
        assert values.max() - values.min() > 0.8 * (hi - lo)  # the range is actually explored
    d = draws[0]
    assert ShapeParams(**json.loads(json.dumps(d.to_dict()))) == d


# ----------------------------------------------------------------------------------------------
# Transform: exactness and diffeomorphism
# ----------------------------------------------------------------------------------------------
def test_identity_params_give_the_identity(bone):
    _, surface, marks = bone
    T = ShapeTransform(IDENTITY_SHAPE, marks)
    assert T.is_identity
    X = np.random.default_rng(0).normal(0, 60, (1000, 3))
    assert np.array_equal(T.apply_points(X), X) and np.array_equal(T.inverse_points(X), X)
    # Zero-valued modes built explicitly are the identity too.
    T0 = ShapeTransform(dataclasses.replace(IDENTITY_SHAPE, deformation_seed=42), marks)
    assert np.allclose(T0.apply_points(surface.vertices), surface.vertices)


@pytest.mark.parametrize("params", EXTREMES)
def test_round_trip_and_positive_jacobian(bone, params):
    _, surface, marks = bone
    T = ShapeTransform(params, marks)
    grid = bone_grid_points(surface)
    Y = T.apply_points(grid)
    assert np.abs(T.inverse_points(Y) - grid).max() < 1e-3
    assert np.abs(T.apply_points(T.inverse_points(grid)) - grid).max() < 1e-3
    det = T.jacobian_determinant(grid)
    assert det.min() > 0.1, det.min()
    # Far away from the bone (beyond the random shears' box, whatever their directions) nothing
    # moves but the global scale about the head centre.
    far = np.array([[0.0, 0.0, 800.0], [800.0, 0.0, -600.0], [0.0, -800.0, 0.0]])
    assert np.allclose(T.apply_points(far), far * params.global_scale)


def test_deformed_surface_stays_a_valid_closed_surface(bone):
    _, surface, marks = bone
    T = ShapeTransform(EXTREMES[1], marks)
    deformed = T.apply_mesh(surface)
    assert deformed.is_closed()
    # Volume sanity: about global_scale^3 times the original (local modes change it a little).
    ratio = deformed.volume_mm3() / surface.volume_mm3()
    assert ratio == pytest.approx(EXTREMES[1].global_scale ** 3, rel=0.2)
    # A self-intersecting surface would break the parity fill: voxel volume = mesh volume.
    lo, hi = deformed.bounds_mm()
    geometry = VolumeGeometry.centered(tuple(int(v) for v in np.ceil((hi - lo + 6) / 1.0)[::-1]), (1.0, 1.0, 1.0),
                                       (lo + hi) / 2)
    assert M.voxelize(deformed, geometry).sum() == pytest.approx(deformed.volume_mm3(), rel=0.03)


# ----------------------------------------------------------------------------------------------
# Transform: the modes do what they say
# ----------------------------------------------------------------------------------------------
def test_neck_shaft_angle_changes_by_delta(bone):
    _, surface, marks = bone
    for delta in (-8.0, 6.0):
        deformed = ShapeTransform(ShapeParams(neck_shaft_delta_deg=delta), marks).apply_mesh(surface)
        after = A.femur_landmarks(deformed, "right")
        assert nsa_deg(after) - nsa_deg(marks) == pytest.approx(delta, abs=1.5)
        assert after.head_radius_mm == pytest.approx(marks.head_radius_mm, rel=0.01)


def test_head_radius_and_global_scale(bone):
    _, surface, marks = bone
    params = ShapeParams(head_radius_factor=1.08, global_scale=0.9)
    T = ShapeTransform(params, marks)
    after = A.femur_landmarks(T.apply_mesh(surface), "right")
    assert after.head_radius_mm / marks.head_radius_mm == pytest.approx(1.08 * 0.9, rel=0.03)
    # The head centre is the scaling centre; far landmarks move by the global scale.
    assert np.allclose(T.apply_points(marks.head_centre_mm[None]), marks.head_centre_mm, atol=1e-9)
    distal = marks.shaft_point_distal_mm
    assert np.linalg.norm(T.apply_points(distal[None])[0] - marks.head_centre_mm) == pytest.approx(
        0.9 * np.linalg.norm(distal - marks.head_centre_mm), rel=1e-6)
    assert nsa_deg(after) == pytest.approx(nsa_deg(marks), abs=1.0)


def test_neck_length_moves_the_head_along_the_neck(bone):
    _, surface, marks = bone
    T = ShapeTransform(ShapeParams(neck_length_factor=1.12), marks)
    moved = T.apply_points(marks.head_centre_mm[None])[0]
    shift = moved - marks.head_centre_mm
    assert np.linalg.norm(shift) == pytest.approx(0.12 * T.neck_length_mm, rel=1e-6)
    assert shift / np.linalg.norm(shift) == pytest.approx(marks.neck_direction, abs=1e-9)
    # The head stays a sphere of the same radius.
    on_head = marks.head_centre_mm + marks.head_radius_mm * np.eye(3)
    assert np.allclose(np.linalg.norm(T.apply_points(on_head) - moved, axis=1), marks.head_radius_mm)


def test_anteversion_rotates_the_head_about_the_shaft(bone):
    _, surface, marks = bone
    T = ShapeTransform(ShapeParams(anteversion_delta_deg=9.0), marks)
    head = T.apply_points(marks.head_centre_mm[None])[0]
    axis_x = marks.shaft_point_mm[0]  # the shaft axis is the line x = axis_x, y = 0 (canonical)
    before = np.array([marks.head_centre_mm[0] - axis_x, marks.head_centre_mm[1]])
    after = np.array([head[0] - axis_x, head[1]])
    turn = np.degrees(np.arctan2(after[1], after[0]) - np.arctan2(before[1], before[0]))
    assert turn == pytest.approx(-9.0, abs=1e-6)  # anterior = -y for a right femur
    assert head[2] == pytest.approx(marks.head_centre_mm[2])
    # The shaft and the lesser trochanter stay put.
    assert np.allclose(T.apply_points(marks.shaft_point_distal_mm[None]), marks.shaft_point_distal_mm)
    assert np.linalg.norm(T.apply_points(marks.lesser_trochanter_mm[None])[0] - marks.lesser_trochanter_mm) < 0.5


def test_random_deformation_is_smooth_small_and_spares_the_head(bone):
    _, surface, marks = bone
    T = ShapeTransform(ShapeParams(deformation_amplitude_mm=2.5, deformation_seed=3), marks)
    moved = T.apply_mesh(surface)
    disp = np.linalg.norm(moved.vertices - surface.vertices, axis=1)
    assert 0.5 < disp.max() < 2.5 * 1.5
    on_head = np.linalg.norm(surface.vertices - marks.head_centre_mm, axis=1) < marks.head_radius_mm * 1.05
    assert disp[on_head].max() < 1e-9
    # Shears along lines hardly change the volume.
    assert moved.volume_mm3() == pytest.approx(surface.volume_mm3(), rel=0.01)
    other = ShapeTransform(ShapeParams(deformation_amplitude_mm=2.5, deformation_seed=4), marks)
    assert not np.allclose(other.apply_points(surface.vertices), moved.vertices)


def test_speed_of_many_points(bone):
    _, _, marks = bone
    T = ShapeTransform(sample_shape_params(np.random.default_rng(1)), marks)
    X = np.random.default_rng(2).uniform([-90, -50, -170], [40, 50, 40], (600_000, 3))
    start = time.process_time()
    Y = T.apply_points(X)
    back = T.inverse_points(Y)
    cpu_s = time.process_time() - start
    assert np.abs(back - X).max() < 1e-3
    assert cpu_s < 4.0, f"600k points there and back took {cpu_s:.1f} s of CPU"


def test_shared_femur_deforms_into_a_valid_surface():
    try:
        subject = next(s for s in B.list_subjects() if s.subject_id == "TLEM2_CT")
    except (InputFileError, StopIteration):
        pytest.skip("shared bone surfaces not available")
    femur = M.read_stl(subject.femur_paths["left"])
    marks = A.femur_landmarks(femur, "left")
    canonical = femur.transformed(marks.to_canonical)  # a right femur now
    params = sample_shape_params(np.random.default_rng(20))
    T = ShapeTransform(params, marks)  # landmarks in any frame: the transform takes them canonical
    deformed = T.apply_mesh(canonical)
    assert deformed.is_closed()
    assert np.abs(T.inverse_points(deformed.vertices) - canonical.vertices).max() < 0.05
    det = T.jacobian_determinant(bone_grid_points(canonical, step_mm=6.0))
    assert det.min() > 0.1
    assert deformed.volume_mm3() / canonical.volume_mm3() == pytest.approx(params.global_scale ** 3, rel=0.1)


def test_shaft_width_scales_the_shaft_below_the_lesser_trochanter_only(bone):
    _, surface, marks = bone
    axis = marks.shaft_direction / np.linalg.norm(marks.shaft_direction)  # +z: towards the head
    s_lt = float((marks.lesser_trochanter_mm - marks.shaft_point_mm) @ axis)
    side = np.cross(axis, [1.0, 0.0, 0.0])
    side /= np.linalg.norm(side)

    def ring(s_mm, rho_mm):
        """Points at height s along the shaft axis, rho from it, all round."""
        angles = np.linspace(0, 2 * np.pi, 12, endpoint=False)
        other = np.cross(axis, side)
        return (marks.shaft_point_mm + s_mm * axis + rho_mm * (np.cos(angles)[:, None] * side
                                                              + np.sin(angles)[:, None] * other))

    def rho(points, s_mm):
        rel = points - marks.shaft_point_mm
        assert np.allclose(rel @ axis, s_mm)  # heights along the axis never change
        return np.linalg.norm(rel - np.outer(rel @ axis, axis), axis=1)

    for factor in (0.8, 0.9, 1.12, 1.25):
        T = ShapeTransform(ShapeParams(shaft_width_factor=factor), marks)
        below = s_lt - 30.0
        # The shaft's cross-sections (and the bone around them) scale by the factor
        assert rho(T.apply_points(ring(below, 14.0)), below) == pytest.approx(14.0 * factor, abs=1e-9)
        # ... the far tissue and everything from 20 mm above the lesser trochanter stays
        assert np.allclose(T.apply_points(ring(below, 80.0)), ring(below, 80.0))
        above = ring(s_lt + 21.0, 14.0)
        assert np.array_equal(T.apply_points(above), above)
        head = marks.head_centre_mm + np.random.default_rng(1).normal(0, marks.head_radius_mm / 2, (50, 3))
        assert np.array_equal(T.apply_points(head), head)
        # An exact inverse and a diffeomorphism over the whole bone, with the fade in between
        grid = bone_grid_points(surface)
        assert np.abs(T.inverse_points(T.apply_points(grid)) - grid).max() < 1e-6
        assert T.jacobian_determinant(grid).min() > 0.2
        assert T.jacobian_determinant(ring(below, 14.0)) == pytest.approx(factor ** 2, rel=1e-4)
    with pytest.raises(ValueError, match="shaft_width_factor"):
        ShapeParams(shaft_width_factor=1.4)


def test_shaft_width_is_left_out_of_manifests_when_off():
    # Data sets made before the mode existed keep byte-identical manifests.
    assert "shaft_width_factor" not in IDENTITY_SHAPE.to_dict()
    params = ShapeParams(global_scale=1.05, shaft_width_factor=1.1)
    assert params.to_dict()["shaft_width_factor"] == 1.1 and not params.is_identity
    assert ShapeParams(**json.loads(json.dumps(params.to_dict()))) == params
    assert ShapeParams(**IDENTITY_SHAPE.to_dict()) == IDENTITY_SHAPE
