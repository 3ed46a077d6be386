"""Tests for inference.surface: marching-cubes surfaces in world mm, closed, outward, STL round trip."""

from __future__ import annotations

import numpy as np
import pytest

from inference import geometry as g
from inference.mesh import read_stl
from inference.errors import DataError, MeshError
from inference.surface import label_surface, write_surface_stl


def _rotation(axis, angle_rad: float) -> np.ndarray:
    axis = np.asarray(axis, dtype=np.float64)
    axis = axis / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle_rad) * k + (1 - np.cos(angle_rad)) * k @ k


def _world_centres(geometry: g.VolumeGeometry) -> np.ndarray:
    """World position of every voxel centre, shape (Z, Y, X, 3)."""
    k, j, i = np.meshgrid(*(np.arange(n) for n in geometry.shape_zyx), indexing="ij")
    ijk1 = np.stack([i, j, k, np.ones_like(i)], axis=-1).astype(np.float64)
    return (ijk1 @ geometry.index_to_world().T)[..., :3]


def _sphere(geometry: g.VolumeGeometry, centre_mm, radius_mm: float, label: int = 1) -> np.ndarray:
    distance = np.linalg.norm(_world_centres(geometry) - np.asarray(centre_mm), axis=-1)
    return np.where(distance <= radius_mm, label, 0).astype(np.uint8)


GEOMETRIES = {
    "rotated": g.VolumeGeometry((20, 22, 26), (0.8, 1.0, 1.3), (-20.0, 35.0, 110.0),
                                tuple(map(tuple, _rotation((1.0, 2.0, 0.5), 0.7)))),
    # A left-handed direction (det -1), as in some scanner frames: winding must still be outward.
    "left-handed": g.VolumeGeometry((20, 22, 26), (1.3, 0.8, 1.0), (5.0, -7.0, 3.0),
                                    tuple(map(tuple, _rotation((0.0, 1.0, 1.0), -0.4) @ np.diag([1.0, -1.0, 1.0])))),
}


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
@pytest.mark.parametrize("sigma", [0.0, 0.7])
def test_sphere_surface_in_world_mm(tmp_path, name, sigma):
    geometry = GEOMETRIES[name]
    radius = 6.0
    # Off the voxel lattice so that the test does not rely on symmetry.
    centre = geometry.center_mm() + np.array([0.37, -0.61, 0.23])
    labels = _sphere(geometry, centre, radius, label=2)
    mesh = label_surface(labels, geometry, label=2, smooth_sigma_vox=sigma)
    distances = np.linalg.norm(mesh.vertices - centre, axis=1)
    # The voxelised sphere boundary lies within half a voxel of the true sphere; marching cubes
    # puts vertices on voxel edges between an inside and an outside centre.
    half_voxel = 0.5 * max(geometry.spacing_xyz_mm)
    assert distances.min() >= radius - half_voxel - 1e-6
    assert distances.max() <= radius + half_voxel + 1e-6
    assert abs(np.mean(distances) - radius) < 0.25 * max(geometry.spacing_xyz_mm)
    assert mesh.is_closed()
    volume = mesh.signed_volume_mm3()
    assert volume > 0  # outward normals
    assert volume == pytest.approx(4.0 / 3.0 * np.pi * radius**3, rel=0.12)
    # Outward: each face normal points away from the centre.
    face_centres = mesh.triangles().mean(axis=1)
    outward = np.einsum("ij,ij->i", mesh.normals, face_centres - centre)
    assert np.mean(outward > 0) > 0.99

    path = write_surface_stl(tmp_path / "femur_surface.stl", mesh)
    back = read_stl(path)
    assert back.n_faces == mesh.n_faces and back.is_closed()
    assert back.signed_volume_mm3() == pytest.approx(volume, rel=1e-5)
    assert np.allclose(np.sort(back.vertices, axis=0), np.sort(mesh.vertices, axis=0), atol=1e-4)
    assert [p.name for p in tmp_path.iterdir()] == ["femur_surface.stl"]


def test_surface_touching_the_border_is_closed():
    geometry = g.VolumeGeometry((12, 10, 14), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    labels = np.zeros(geometry.shape_zyx, np.uint8)
    labels[:6, 2:8, 0:14] = 1  # touches z = 0, x = 0 and x = 13
    mesh = label_surface(labels, geometry, smooth_sigma_vox=0.0)
    assert mesh.is_closed() and mesh.signed_volume_mm3() > 0
    # Without smoothing the box surface sits half a voxel outside the outer voxel centres.
    low, high = mesh.bounds_mm()
    assert np.allclose(low, (-0.5, 1.5, -0.5)) and np.allclose(high, (13.5, 7.5, 5.5))
    assert mesh.signed_volume_mm3() == pytest.approx(14 * 6 * 6, rel=0.05)


def test_largest_component_and_all_components():
    geometry = g.VolumeGeometry((16, 16, 32), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    big = _sphere(geometry, (8.0, 8.0, 8.0), 5.0)
    small = _sphere(geometry, (25.0, 8.0, 8.0), 2.5)
    labels = np.maximum(big, small)
    kept = label_surface(labels, geometry)
    assert kept.vertices[:, 0].max() < 15.0  # only the big sphere, centred at x = 8
    both = label_surface(labels, geometry, largest_component=False)
    assert both.vertices[:, 0].max() > 25.0 and both.is_closed()
    assert both.signed_volume_mm3() > kept.signed_volume_mm3() > 0


def test_step_size_reduces_triangles():
    geometry = g.VolumeGeometry((20, 20, 20), (1.0, 1.0, 1.0))
    labels = _sphere(geometry, (9.5, 9.5, 9.5), 7.0)
    fine = label_surface(labels, geometry)
    coarse = label_surface(labels, geometry, step_size=2)
    assert coarse.n_faces < fine.n_faces / 2 and coarse.signed_volume_mm3() > 0


def test_errors():
    geometry = g.VolumeGeometry((8, 8, 8), (1.0, 1.0, 1.0))
    with pytest.raises(DataError, match="no voxel with label 1"):
        label_surface(np.zeros((8, 8, 8), np.uint8), geometry)
    with pytest.raises(DataError, match=r"shape \(8, 8, 9\) does not match"):
        label_surface(np.ones((8, 8, 9), np.uint8), geometry)
    with pytest.raises(ValueError, match="smooth_sigma_vox"):
        label_surface(np.ones((8, 8, 8), np.uint8), geometry, smooth_sigma_vox=-1.0)
    from inference.mesh import Mesh

    with pytest.raises(MeshError, match="empty surface"):
        write_surface_stl("/nonexistent/x.stl", Mesh(np.zeros((0, 3)), np.zeros((0, 3), int)))


@pytest.mark.parametrize("step", [1, 2])
def test_the_surface_of_a_label_away_from_the_origin_equals_marching_cubes_on_the_whole_grid(step):
    """label_surface works on the label's bounding box; the result is that of the whole grid."""
    from scipy import ndimage
    from skimage.measure import marching_cubes

    geometry = GEOMETRIES["rotated"]
    labels = _sphere(geometry, geometry.center_mm() + np.array([3.1, -2.2, 4.4]), 5.0, label=1)
    labels[:3, :4, :5] = 2  # another label in the corner
    mesh = label_surface(labels, geometry, step_size=step)
    # the plain way: the whole grid padded and blurred (sigma 0.7 reaches 2 voxels; pad 3)
    field = ndimage.gaussian_filter(np.pad((labels == 1).astype(np.float32), 3), sigma=0.7, mode="constant",
                                    truncate=3.0)
    verts_zyx, faces, _, _ = marching_cubes(field, level=0.5, step_size=step, allow_degenerate=False)
    expected = (verts_zyx[:, ::-1].astype(np.float64) - 3) @ geometry.index_to_world()[:3, :3].T \
        + geometry.index_to_world()[:3, 3]
    assert mesh.n_faces == len(faces) > 100
    np.testing.assert_allclose(np.sort(mesh.vertices, axis=0), np.sort(expected, axis=0), atol=1e-4)


def test_the_surface_of_a_mirrored_label_map_is_the_mirrored_surface():
    """The pipeline mirrors a left femur's surface instead of extracting it again from the
    mirrored label map: the same vertices (edge crossings); marching cubes may join them
    differently in ambiguous cells (scikit-image's cases are not mirror symmetric), which moves
    the enclosed volume by a few parts in 10 000."""
    from inference.registration import mirrored_volume

    geometry = g.VolumeGeometry((24, 20, 22), (0.7, 0.7, 1.0), (-30.0, 12.0, 40.0))
    labels = _sphere(geometry, geometry.center_mm() + np.array([2.3, 0.4, -1.7]), 5.5)
    labels[4:9, 8:12, 3:15] = 1  # a bar sticking out: not symmetric
    mirrored_labels, mirrored_grid = mirrored_volume(labels, geometry)
    direct = label_surface(mirrored_labels, mirrored_grid)
    mirrored = label_surface(labels, geometry).mirrored_x()
    assert direct.n_faces == mirrored.n_faces and mirrored.is_closed()

    def rows(vertices):
        rounded = np.round(vertices, 5)
        return rounded[np.lexsort(rounded.T[::-1])]

    np.testing.assert_allclose(rows(direct.vertices), rows(mirrored.vertices), atol=1e-4)
    assert mirrored.signed_volume_mm3() == pytest.approx(direct.signed_volume_mm3(), rel=1e-3)


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_a_soft_indicator_puts_the_surface_on_its_sub_voxel_boundary(name):
    """With a continuous indicator (linear across the boundary, 0.5 on the true sphere), the surface
    lies on the sphere far closer than the label map's staircase allows; islands of the indicator
    away from the kept label are ignored."""
    geometry = GEOMETRIES[name]
    radius = 6.0
    centre = geometry.center_mm() + np.array([0.37, -0.61, 0.23])
    distance = np.linalg.norm(_world_centres(geometry) - centre, axis=-1)
    soft = np.clip(0.5 - (distance - radius) / 2.0, 0.0, 1.0).astype(np.float32)  # 0.5 at the radius
    labels = (soft >= 0.5).astype(np.uint8)
    stray = np.zeros_like(soft)
    stray[1:3, 1:3, 1:3] = 0.9  # a blob of indicator with no label under it
    staircase = np.linalg.norm(label_surface(labels, geometry).vertices - centre, axis=1) - radius
    mesh = label_surface(labels, geometry, soft=soft + stray)
    smooth = np.linalg.norm(mesh.vertices - centre, axis=1) - radius
    assert mesh.is_closed() and mesh.signed_volume_mm3() > 0
    assert np.abs(smooth).max() < 0.15 < np.abs(staircase).max()
    assert np.abs(smooth).mean() < 0.3 * np.abs(staircase).mean()
    with pytest.raises(DataError, match="shape"):
        label_surface(labels, geometry, soft=soft[:-1])
