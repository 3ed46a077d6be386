"""Tests of inference.data.phantom: tissue model on analytic shapes, determinism, pose, real bones."""

from __future__ import annotations

import dataclasses

import numpy as np
from synthetic_shapes import capsule_sdf
import pytest

from inference.data import phantom as ph
from inference.data.atlas import GRID_CENTRE_CANONICAL_MM, grid_geometry
from inference.errors import DataError
from inference.geometry import VolumeGeometry
from scipy import ndimage

HEAD_R = 22.0
SHAFT_X = -40.0
SHAFT_R = 14.0
LT = np.array([-30.0, -10.0, -55.0])


# ----------------------------------------------------------------------------------------------
# A femur-like analytic shape: head sphere at the origin, neck and shaft capsules, a trochanter
# ball; and an acetabular cup (spherical shell) around the head. Exact signed distances
# (unions of SDFs by min, which is exact outside and a bound inside: enough for tissue classes).
# ----------------------------------------------------------------------------------------------
def synthetic_femur_sdf(p):
    head = np.linalg.norm(p, axis=0) - HEAD_R
    neck = capsule_sdf(p, [0, 0, 0], [SHAFT_X, 0, -30], 14)
    shaft = capsule_sdf(p, [SHAFT_X, 0, -10], [SHAFT_X, 0, -400], SHAFT_R)
    trochanter = np.linalg.norm(p - np.array([[-52.0], [0.0], [-5.0]]), axis=0) - 13
    return np.minimum.reduce([head, neck, shaft, trochanter])


def synthetic_pelvis_sdf(p):
    shell = np.abs(np.linalg.norm(p, axis=0) - (HEAD_R + 10)) - 7
    return np.maximum(shell, -(p[2] + 0.3 * p[0] - 5))


def _field(fn, low, high, spacing=1.0):
    low = np.asarray(low, float)
    n = (np.asarray(high, float) - low) / spacing
    n = n.astype(int) + 1
    ii, jj, kk = np.meshgrid(*[np.arange(c) for c in n], indexing="ij")
    p = np.stack([ii, jj, kk]).reshape(3, -1) * spacing + low[:, None]
    return ph.ScalarField(fn(p).reshape(n).transpose(2, 1, 0), low, spacing)


@pytest.fixture(scope="module")
def synthetic_model():
    femur = _field(synthetic_femur_sdf, [-75, -35, -270], [25, 35, 35])
    pelvis = _field(synthetic_pelvis_sdf, [-48, -45, -25], [45, 45, 48])
    marks = {
        "head_centre": np.zeros(3),
        "lesser_trochanter": LT,
        "greater_trochanter": np.array([-55.0, 0, 8]),
        "shaft_point_distal": np.array([SHAFT_X, 0, -150]),
        "shaft_point_proximal": np.array([SHAFT_X, 0, -60]),
        "neck_point": np.array([-20.0, 0, -15]),
    }
    return ph.SubjectModel.from_fields("synthetic:right", femur, marks, HEAD_R, pelvis)


def _quiet(**changes):
    """Nominal tissue without noise and texture, so HU are known exactly."""
    base = dict(noise_sigma_hu=0.0, trabecular_contrast=0.0, envelope_variation_mm=0.0, soft_tissue_variation_hu=0.0)
    base.update(changes)
    return ph.TissueParams(**base)


def _line_grid(start_mm, axis: int, length_mm: float, step_mm: float = 0.25) -> VolumeGeometry:
    """A one-voxel-thick line of voxels along world axis ``axis`` (0 x, 2 z)."""
    n = int(round(length_mm / step_mm)) + 1
    shape = [1, 1, 1]
    shape[2 - axis] = n  # (z, y, x)
    spacing = [1.0, 1.0, 1.0]
    spacing[axis] = step_mm
    return VolumeGeometry(tuple(shape), tuple(spacing), tuple(float(v) for v in start_mm))


# ----------------------------------------------------------------------------------------------
# Tissue model
# ----------------------------------------------------------------------------------------------
def test_compose_hu_known_tissues():
    t = _quiet(marrow_hu=-20.0, muscle_hu=50.0, fat_hu=-90.0, muscle_thickness_mm=30.0, fat_thickness_mm=20.0)
    # Points: diaphyseal cortex, canal marrow, head centre, muscle, fat, air, metaphysis.
    uvw = np.array([[-40, 0, -150], [-40, 0, -200], [0, 0, 0], [0, 0, 0], [0, 0, 0], [0, 0, 0], [-40, 0, -40]],
                   dtype=np.float32).T
    sdf = np.array([-2.5, -12.0, -22.0, 10.0, 40.0, 80.0, -10.0], dtype=np.float32)
    body = np.maximum(sdf, 0)
    zeros = np.zeros(7, dtype=np.float32)
    hu, labels = ph.compose_hu(femur_sdf=sdf, femur_uvw=uvw, pelvis_sdf=None, body_mm=body, femur_texture=zeros,
                               pelvis_texture=None, muscle_offset_mm=zeros, fat_offset_mm=zeros,
                               muscle_variation=zeros, tissue=t, head_radius_mm=HEAD_R,
                               lesser_trochanter_z_mm=-55.0, voxel_mm=1.0)
    assert hu[0] == pytest.approx(t.cortical_hu, abs=1)  # 2.5 mm deep in a 5 mm wall
    assert hu[1] == pytest.approx(t.marrow_hu, abs=1)  # canal 145 mm below the trochanter
    head_expected = t.cancellous_hu + t.head_cancellous_boost_hu * (0.6 + 0.8 * np.exp(-21.0 / 4.0))
    assert hu[2] == pytest.approx(head_expected, abs=1)
    assert hu[3] == pytest.approx(t.muscle_hu, abs=1)
    assert hu[4] == pytest.approx(t.fat_hu, abs=1)
    assert hu[5] == pytest.approx(ph.AIR_HU, abs=1)
    assert hu[6] == pytest.approx(t.cancellous_hu, abs=1)  # metaphysis: cancellous, no head boost
    assert labels.tolist() == [1, 1, 1, 0, 0, 0, 1]


def test_tissue_hu_ranges_in_phantom(synthetic_model):
    grid = grid_geometry("compact")
    params = ph.PhantomParams(tissue=ph.TissueParams(noise_sigma_hu=0.0, seed=3))
    p = ph.make_phantom(synthetic_model, params, grid)
    t = params.tissue
    world = _voxel_world(grid)
    fem = synthetic_femur_sdf(world).reshape(grid.shape_zyx)
    r = np.linalg.norm(world, axis=0).reshape(grid.shape_zyx)
    z = world[2].reshape(grid.shape_zyx)
    x = world[0].reshape(grid.shape_zyx)
    head_core = (r < HEAD_R - 5)
    y = world[1].reshape(grid.shape_zyx)
    canal = (z < -135) & (np.abs(x - SHAFT_X) < 4) & (np.abs(y) < 4)
    wall = (fem < -1.5) & (fem > -3.0) & (z < -135)
    assert head_core.sum() > 50 and canal.sum() > 10 and wall.sum() > 10
    head_hu = p.ct_hu[head_core]
    assert 150 <= np.median(head_hu) <= 450
    assert head_hu.std() > 20  # textured
    assert np.all(np.abs(p.ct_hu[canal] - t.marrow_hu) < 40)  # texture-free marrow, little lining
    assert np.median(p.ct_hu[wall]) > 1100
    assert p.ct_hu.max() <= t.cortical_hu + 1
    soft = (fem > 6) & (r > 45)  # away from bones, inside the body
    assert -130 <= np.median(p.ct_hu[soft]) <= 70
    # Labels: femur where the analytic femur is, pelvis only in the cup.
    # (they may differ only within a fraction of a mm of the surface: 1 mm trilinear SDF).
    differ = (p.labels == 1) != (fem < 0)
    assert np.all(np.abs(fem[differ]) < 0.3)
    assert np.all(p.labels[synthetic_pelvis_sdf(world).reshape(grid.shape_zyx) < -0.3] == 2)


def _voxel_world(grid):
    nz, ny, nx = grid.shape_zyx
    kk, jj, ii = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    ijk = np.stack([ii.ravel(), jj.ravel(), kk.ravel()]).astype(float)
    m = grid.index_to_world()
    return m[:3, :3] @ ijk + m[:3, 3:4]


def _cortex_width(model, grid, tissue):
    p = ph.make_phantom(model, ph.PhantomParams(tissue=tissue), grid)
    line = p.ct_hu.ravel()
    threshold = 0.5 * (tissue.cortical_hu + tissue.cancellous_hu)
    return float((line > threshold).sum() * min(grid.spacing_xyz_mm))


def test_cortex_thin_at_head_thick_in_diaphysis(synthetic_model):
    tissue = _quiet(cortical_thickness_head_mm=1.0, cortical_thickness_shaft_mm=5.0)
    # Through the top of the head, along z (one wall), and across the shaft at z = -170 (two walls).
    head = _cortex_width(synthetic_model, _line_grid((0, 0, 10), 2, 14), tissue)  # below the cup
    shaft = _cortex_width(synthetic_model, _line_grid((SHAFT_X - 20, 0, -170), 0, 40), tissue) / 2
    assert head == pytest.approx(1.0, abs=0.5)
    assert shaft == pytest.approx(5.0, abs=0.5)
    # The thickness grows monotonically down the proximal shaft.
    widths = [_cortex_width(synthetic_model, _line_grid((SHAFT_X - 20, 0, z), 0, 40), tissue) / 2
              for z in (-70, -100, -130)]
    assert widths[0] < widths[1] < widths[2] <= shaft + 0.3


def test_same_seed_same_phantom_and_different_seed_differs(synthetic_model):
    grid = VolumeGeometry.centered((24, 20, 24), (2.0, 2.0, 2.0), (-10, 0, -10))
    a = ph.make_phantom(synthetic_model, ph.PhantomParams(tissue=ph.TissueParams(seed=5)), grid)
    b = ph.make_phantom(synthetic_model, ph.PhantomParams(tissue=ph.TissueParams(seed=5)), grid)
    c = ph.make_phantom(synthetic_model, ph.PhantomParams(tissue=ph.TissueParams(seed=6)), grid)
    assert np.array_equal(a.ct_hu, b.ct_hu) and np.array_equal(a.labels, b.labels)
    assert np.abs(a.ct_hu - c.ct_hu).mean() > 5
    # Random parameters from one generator state are reproducible too.
    pa = ph.sample_phantom_params(np.random.default_rng(1))
    pb = ph.sample_phantom_params(np.random.default_rng(1))
    assert pa == pb
    # ... and survive a JSON round trip (data set manifests).
    import json

    assert ph.PhantomParams.from_dict(json.loads(json.dumps(pa.to_dict()))) == pa
    with pytest.raises(DataError, match="malformed"):
        ph.PhantomParams.from_dict({"rotation_deg": [0, 0, 0]})


def test_chunking_does_not_change_the_phantom(synthetic_model):
    grid = VolumeGeometry.centered((20, 16, 20), (2.0, 2.0, 2.0), (-10, 0, -10))
    params = ph.PhantomParams(rotation_deg=(3, -4, 5), tissue=ph.TissueParams(seed=2))
    whole = ph.make_phantom(synthetic_model, params, grid)
    pieces = ph.make_phantom(synthetic_model, params, grid, chunk_voxels=16 * 20 * 3)
    np.testing.assert_allclose(whole.ct_hu, pieces.ct_hu, atol=1e-3)


def test_pose_moves_bone_and_landmarks_where_params_say(synthetic_model):
    grid = grid_geometry("compact")
    params = ph.PhantomParams(rotation_deg=(6.0, -8.0, 9.0), translation_mm=(3.0, -2.0, 4.0),
                              tissue=_quiet())
    p = ph.make_phantom(synthetic_model, params, grid)
    pose = ph.pose_matrix(params)
    # Known answer for the matrix: rotation about the pivot, then the translation.
    pivot = np.asarray(ph.POSE_PIVOT_MM)
    np.testing.assert_allclose(pose[:3, :3] @ pivot + pose[:3, 3], pivot + params.translation_mm, atol=1e-9)
    head = p.landmarks_mm["head_centre"]
    np.testing.assert_allclose(head, pose[:3, 3], atol=1e-9)  # the canonical head is the origin
    assert np.linalg.norm(head) > 5  # the rotation about the grid centre really moved it
    # The image: the label map equals the analytic femur seen through the inverse pose.
    world = _voxel_world(grid)
    canonical = np.linalg.inv(pose)[:3, :3] @ world + np.linalg.inv(pose)[:3, 3:4]
    expected = (synthetic_femur_sdf(canonical) < 0).reshape(grid.shape_zyx)
    assert np.mean(expected == (p.labels == 1)) > 0.999
    # The femur label voxels within the head sphere are centred on the predicted head centre.
    in_head = (np.linalg.norm(world - head[:, None], axis=0) < HEAD_R + 2).reshape(grid.shape_zyx) & (p.labels == 1)
    centroid = world[:, in_head.ravel()].mean(axis=1)
    direction_ok = np.linalg.norm(centroid - head) < 6.0  # the neck pulls it a little
    assert direction_ok
    # Other landmarks follow the same rigid transform.
    lt = p.landmarks_mm["lesser_trochanter"]
    np.testing.assert_allclose(lt, pose[:3, :3] @ LT + pose[:3, 3], atol=1e-9)


def test_grid_placement_of_the_identity_phantom(synthetic_model):
    grid = grid_geometry("compact")
    np.testing.assert_allclose(grid.center_mm(), GRID_CENTRE_CANONICAL_MM, atol=1e-9)
    p = ph.make_phantom(synthetic_model, ph.PhantomParams(tissue=_quiet()), grid)
    np.testing.assert_allclose(p.landmarks_mm["head_centre"], 0.0, atol=1e-9)
    assert p.head_radius_mm == pytest.approx(HEAD_R)


def test_hip_rotation_turns_the_pelvis_about_the_head(synthetic_model):
    grid = VolumeGeometry.centered((40, 40, 40), (2.0, 2.0, 2.0), (0, 0, 10))
    still = ph.make_phantom(synthetic_model, ph.PhantomParams(tissue=_quiet()), grid)
    turned = ph.make_phantom(synthetic_model, ph.PhantomParams(hip_rotation_deg=(0, 20, 0), tissue=_quiet()), grid)
    assert np.array_equal(still.labels == 1, turned.labels == 1)  # femur unchanged
    a, b = still.labels == 2, turned.labels == 2
    assert a.sum() > 100 and abs(int(a.sum()) - int(b.sum())) < 0.05 * a.sum()
    assert np.mean(a != b) > 0.005  # the cup moved
    # ... about the head centre: the cup's voxels keep their distance from it.
    world = _voxel_world(grid)
    r_a = np.linalg.norm(world[:, a.ravel()], axis=0).mean()
    r_b = np.linalg.norm(world[:, b.ravel()], axis=0).mean()
    assert r_a == pytest.approx(r_b, abs=0.5)


def test_params_validation_names_the_field():
    with pytest.raises(DataError, match="rotation_deg"):
        ph.PhantomParams(rotation_deg=(0, 90, 0))
    with pytest.raises(DataError, match="marrow_hu"):
        ph.TissueParams(marrow_hu=900)
    with pytest.raises(DataError, match="seed"):
        ph.TissueParams(seed=-1)
    with pytest.raises(DataError, match="cortical_hu"):
        ph.TissueParams(cortical_hu=400, cancellous_hu=450)


def test_sampled_tissue_params_within_documented_ranges():
    rng = np.random.default_rng(0)
    for _ in range(50):
        t = ph.sample_tissue_params(rng)
        assert 1200 <= t.cortical_hu <= 1800
        assert -50 <= t.marrow_hu <= 30
        assert 30 <= t.muscle_hu <= 60
        assert 0.7 <= t.cortical_thickness_head_mm <= 1.4 < 4.0 <= t.cortical_thickness_shaft_mm <= 6.0
        assert 150 <= t.cancellous_hu + t.head_cancellous_boost_hu <= 450


# ----------------------------------------------------------------------------------------------
# Real bone surfaces
# ----------------------------------------------------------------------------------------------
def _bones_available() -> bool:
    try:
        from inference.data.bones import bones_dir

        bones_dir()
        return True
    except Exception:
        return False


needs_bones = pytest.mark.skipif(not _bones_available(), reason="shared bone surfaces not found")
#: Fast coverage of the code paths: own pelvis, a mirrored left femur. All subjects: slow test.
FAST_SUBJECTS = ("MC22:right", "JIA_MRI:left")


def _all_subjects():
    return ph.phantom_subjects() if _bones_available() else []


def _head_centre_from_labels(labels, grid, radius_mm):
    """Sphere fit to the femur label's boundary voxels on the upper head (independent check)."""
    from inference.anatomy import fit_sphere

    femur = labels == 1
    boundary = femur & ~ndimage.binary_erosion(femur)
    kk, jj, ii = np.nonzero(boundary)
    m = grid.index_to_world()
    pts = (m[:3, :3] @ np.stack([ii, jj, kk]).astype(float) + m[:3, 3:4]).T
    r = np.linalg.norm(pts, axis=1)
    pick = (np.abs(r - radius_mm) < 4.0) & (pts[:, 2] > -0.3 * radius_mm)
    centre, _ = fit_sphere(pts[pick])
    return centre


def _check_real_phantom(name, spacing_mm, with_pelvis):
    model = ph.load_subject_model(name, spacing_mm=spacing_mm, with_pelvis=with_pelvis)
    grid = grid_geometry("compact")
    p = ph.make_phantom(model, ph.PhantomParams(tissue=ph.TissueParams(seed=1)), grid)
    assert (p.labels == 1).sum() > 20000  # about 60-100 cm^3 of proximal femur in the grid
    if with_pelvis:
        assert (p.labels == 2).sum() > 1000
    np.testing.assert_allclose(p.landmarks_mm["head_centre"], 0.0, atol=1e-6)
    centre = _head_centre_from_labels(p.labels, grid, p.head_radius_mm)
    voxel = max(grid.spacing_xyz_mm)
    assert np.linalg.norm(centre) < 2 * voxel, f"{name}: head found at {centre}"
    assert 15.0 < p.head_radius_mm < 30.0
    # The grid holds the proximal femur: head at the top, the lesser trochanter well inside.
    lt = p.landmarks_mm["lesser_trochanter"]
    assert np.all(np.abs((grid.world_to_index()[:3, :3] @ lt + grid.world_to_index()[:3, 3])
                         - (np.array(grid.shape_zyx[::-1]) - 1) / 2) < np.array(grid.shape_zyx[::-1]) / 2)


@needs_bones
@pytest.mark.parametrize("name", FAST_SUBJECTS)
def test_real_subject_phantom_head_where_grid_placement_says(name):
    _check_real_phantom(name, spacing_mm=2.0, with_pelvis=False)


@needs_bones
def test_phantom_labels_match_the_deformed_posed_mesh():
    """Dice between the phantom's femur label and the voxelised deformed + posed STL surface."""
    from inference.data.bones import bones_dir
    from inference.mesh import read_stl, voxelize
    from inference.data.shape import ShapeParams, ShapeTransform

    model = ph.load_subject_model(FAST_SUBJECTS[0], spacing_mm=2.0, with_pelvis=False)
    shape = ShapeParams(global_scale=1.08, neck_shaft_delta_deg=6.0, neck_length_factor=0.9,
                        head_radius_factor=1.08, anteversion_delta_deg=-8.0, deformation_amplitude_mm=2.0,
                        deformation_seed=4)
    params = ph.PhantomParams(shape=shape, rotation_deg=(4.0, -7.0, 9.0), translation_mm=(2.0, -3.0, 1.0),
                              tissue=ph.TissueParams(seed=2))
    grid = grid_geometry("compact")
    p = ph.make_phantom(model, params, grid)
    transform = ShapeTransform(shape, model.shape_landmarks)
    surface = read_stl(bones_dir() / "MC22_femur_r.stl").transformed(model.to_canonical)
    expected = voxelize(transform.apply_mesh(surface).transformed(ph.pose_matrix(params)), grid) == 1
    femur = p.labels == 1
    dice = 2 * (femur & expected).sum() / (femur.sum() + expected.sum())
    assert dice > 0.97, dice
    # Without the deformation the labels would be clearly worse: the test can tell.
    plain = ph.make_phantom(model, dataclasses.replace(params, shape=None), grid).labels == 1
    assert 2 * (plain & expected).sum() / (plain.sum() + expected.sum()) < dice - 0.05
    # Landmarks and radius follow the shape and the pose.
    head = ph.pose_matrix(params) @ np.append(transform.apply_points(model.landmarks_mm["head_centre"][None])[0], 1)
    np.testing.assert_allclose(p.landmarks_mm["head_centre"], head[:3], atol=1e-6)
    # (the neck-length mode bends the head slightly, so the fitted scale is within 0.5 %)
    assert p.head_radius_mm == pytest.approx(model.head_radius_mm * 1.08 * 1.08, rel=5e-3)


@needs_bones
def test_femur_mask_is_the_phantom_label_on_any_grid():
    """femur_mask: the phantom's femur label without the CT, also on a mirrored or finer grid."""
    from inference.data.shape import ShapeParams

    model = ph.load_subject_model(FAST_SUBJECTS[0], spacing_mm=2.0, with_pelvis=False)
    shape = ShapeParams(global_scale=0.95, neck_shaft_delta_deg=-5.0, deformation_amplitude_mm=2.0, deformation_seed=3)
    params = ph.PhantomParams(shape=shape, rotation_deg=(-3.0, 5.0, 2.0), tissue=ph.TissueParams(seed=4))
    grid = VolumeGeometry.centered((40, 36, 36), (2.0, 2.0, 2.0), (-20.0, 0.0, -20.0))
    mask = ph.femur_mask(model, params, grid, chunk_voxels=36 * 36 * 7)
    assert mask.dtype == bool and mask.sum() > 3000
    np.testing.assert_array_equal(mask, ph.make_phantom(model, params, grid).labels == 1)
    # A mirrored grid (a left hip's output grid brought into the phantom's right-femur frame) holds
    # the same points as a right-handed grid running the other way along x.
    mirrored = grid.transformed(np.diag([-1.0, 1.0, 1.0, 1.0]))
    last_x = mirrored.index_to_world() @ [grid.shape_zyx[2] - 1, 0, 0, 1]
    reversed_x = VolumeGeometry(grid.shape_zyx, grid.spacing_xyz_mm, tuple(last_x[:3]),
                                tuple(map(tuple, np.asarray(mirrored.direction) * [-1.0, 1.0, 1.0])))
    assert np.linalg.det(np.asarray(mirrored.direction)) < 0 < np.linalg.det(np.asarray(reversed_x.direction))
    a, b = ph.femur_mask(model, params, mirrored), ph.femur_mask(model, params, reversed_x)[:, :, ::-1]
    assert a.sum() > 1000 and np.mean(a == b) > 0.999  # (the shape lattice is laid from the other end)
    # A finer grid over the same box agrees with the coarse label where both are sampled.
    fine = VolumeGeometry(tuple(2 * n - 1 for n in grid.shape_zyx), (1.0, 1.0, 1.0), grid.origin_mm)
    np.testing.assert_array_equal(ph.femur_mask(model, params, fine)[::2, ::2, ::2], mask)


@needs_bones
@pytest.mark.slow
@pytest.mark.parametrize("name", _all_subjects())
def test_every_shared_subject_makes_a_phantom(name):
    _check_real_phantom(name, spacing_mm=ph.FINE_SPACING_MM, with_pelvis=True)
