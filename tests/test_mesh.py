"""Tests of inference.mesh (STL I/O, closedness, volumes, voxelisation, signed distances) and of
inference.data.bones (the training bone folder)."""

from __future__ import annotations

import logging
import time

import numpy as np
import pytest

from inference import mesh as M
from inference.data import bones as B
from inference.errors import InputFileError, MeshError
from inference.mesh import Mesh, read_stl, write_stl
from inference.geometry import VolumeGeometry

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Test shapes
# ----------------------------------------------------------------------------------------------
def box_mesh(lo=(0.0, 0.0, 0.0), hi=(1.0, 2.0, 3.0)) -> Mesh:
    """Axis-aligned box, outward normals (12 triangles)."""
    lo, hi = np.asarray(lo, float), np.asarray(hi, float)
    v = np.array([[lo[0] if i & 1 == 0 else hi[0], lo[1] if i & 2 == 0 else hi[1], lo[2] if i & 4 == 0 else hi[2]]
                  for i in range(8)])
    quads = [(0, 2, 3, 1), (4, 5, 7, 6), (0, 1, 5, 4), (2, 6, 7, 3), (0, 4, 6, 2), (1, 3, 7, 5)]
    faces = []
    for a, b, c, d in quads:
        faces += [(a, b, c), (a, c, d)]
    mesh = Mesh(v, faces)
    assert mesh.signed_volume_mm3() > 0
    return mesh


def icosphere(radius: float = 1.0, subdivisions: int = 3, centre=(0.0, 0.0, 0.0)) -> Mesh:
    t = (1 + 5**0.5) / 2
    v = [(-1, t, 0), (1, t, 0), (-1, -t, 0), (1, -t, 0), (0, -1, t), (0, 1, t), (0, -1, -t), (0, 1, -t),
         (t, 0, -1), (t, 0, 1), (-t, 0, -1), (-t, 0, 1)]
    f = [(0, 11, 5), (0, 5, 1), (0, 1, 7), (0, 7, 10), (0, 10, 11), (1, 5, 9), (5, 11, 4), (11, 10, 2),
         (10, 7, 6), (7, 1, 8), (3, 9, 4), (3, 4, 2), (3, 2, 6), (3, 6, 8), (3, 8, 9), (4, 9, 5), (2, 4, 11),
         (6, 2, 10), (8, 6, 7), (9, 8, 1)]
    verts = [np.array(p, float) / np.linalg.norm(p) for p in v]
    faces = list(f)
    for _ in range(subdivisions):
        cache: dict = {}

        def mid(a, b):
            key = (min(a, b), max(a, b))
            if key not in cache:
                p = verts[a] + verts[b]
                verts.append(p / np.linalg.norm(p))
                cache[key] = len(verts) - 1
            return cache[key]

        new = []
        for a, b, c in faces:
            ab, bc, ca = mid(a, b), mid(b, c), mid(c, a)
            new += [(a, ab, ca), (b, bc, ab), (c, ca, bc), (ab, bc, ca)]
        faces = new
    mesh = Mesh(np.array(verts) * radius + np.asarray(centre), faces)
    return mesh if mesh.signed_volume_mm3() > 0 else mesh.flipped()


def random_rotation(rng) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] *= -1
    return q


# ----------------------------------------------------------------------------------------------
# Mesh basics
# ----------------------------------------------------------------------------------------------
def test_mesh_validates_its_arrays():
    with pytest.raises(MeshError, match="shape"):
        Mesh(np.zeros((4, 2)), [[0, 1, 2]])
    with pytest.raises(MeshError, match="vertex indices"):
        Mesh(np.zeros((3, 3)), [[0, 1, 3]])
    with pytest.raises(MeshError, match="NaN"):
        Mesh(np.full((3, 3), np.nan), [[0, 1, 2]])
    m = box_mesh()
    with pytest.raises(ValueError):
        m.vertices[0, 0] = 5.0  # read-only


def test_box_volume_normals_and_closedness():
    m = box_mesh((1, 2, 3), (3, 5, 7))
    assert m.is_closed()
    assert m.volume_mm3() == pytest.approx(2 * 3 * 4)
    assert m.area_mm2() == pytest.approx(2 * (6 + 8 + 12))
    # Outward normals: each face normal points away from the centre.
    centre = m.vertices.mean(axis=0)
    face_centres = m.triangles().mean(axis=1)
    assert np.all(np.einsum("ij,ij->i", m.normals, face_centres - centre) > 0)
    vn = m.vertex_normals()
    assert np.all(np.einsum("ij,ij->i", vn, m.vertices - centre) > 0)


def test_faces_near_a_plane_are_those_within_reach_of_it():
    """The sorted heights kept per normal select exactly what measuring every centroid selects,
    for parallel planes and for more normals than are kept."""
    rng = np.random.default_rng(11)
    sphere = icosphere(20.0, 4, centre=(3.0, -2.0, 40.0))
    centres, reach = sphere.face_centres_and_reach()
    normals = [n / np.linalg.norm(n) for n in rng.normal(size=(M.PLANE_NORMALS_KEPT + 2, 3))]
    for normal in normals + normals[:2]:
        for height in np.linspace(-25.0, 25.0, 11):
            origin = np.array([3.0, -2.0, 40.0]) + height * normal + np.cross(normal, [0.3, 0.1, 0.2])
            expected = np.flatnonzero(np.abs(centres @ normal - origin @ normal) <= reach)
            np.testing.assert_array_equal(sphere.faces_near_plane(origin, normal), expected)
    assert len(sphere._cache["plane_heights"]) == M.PLANE_NORMALS_KEPT


def test_open_or_inconsistent_meshes_are_not_closed():
    m = box_mesh()
    open_mesh = Mesh(m.vertices, m.faces[:-1])
    assert not open_mesh.is_closed()
    with pytest.raises(MeshError, match="not a closed"):
        open_mesh.volume_mm3()
    faces = m.faces.copy()
    faces[0] = faces[0, [0, 2, 1]]  # one flipped triangle
    assert not Mesh(m.vertices, faces).is_closed()
    doubled = Mesh(m.vertices, np.vstack([m.faces, m.faces]))  # every edge used four times
    assert not doubled.is_closed()
    with pytest.raises(MeshError, match="empty"):
        Mesh(np.zeros((0, 3)), np.zeros((0, 3), int)).check_closed()


def test_mirror_and_transform_keep_outward_orientation():
    rng = np.random.default_rng(0)
    m = icosphere(5.0, 2, centre=(10, -3, 2))
    mirrored = m.mirrored_x()
    assert np.allclose(mirrored.vertices[:, 0], -m.vertices[:, 0])
    assert mirrored.is_closed()
    assert mirrored.signed_volume_mm3() == pytest.approx(m.signed_volume_mm3())
    T = np.eye(4)
    T[:3, :3] = random_rotation(rng)
    T[:3, 3] = rng.normal(0, 50, 3)
    moved = m.transformed(T)
    assert moved.signed_volume_mm3() == pytest.approx(m.signed_volume_mm3())
    assert np.allclose(moved.vertices, m.vertices @ T[:3, :3].T + T[:3, 3])
    reflection = np.diag([1.0, -1.0, 1.0, 1.0])
    assert m.transformed(reflection).signed_volume_mm3() == pytest.approx(m.signed_volume_mm3())
    with pytest.raises(MeshError):
        m.transformed(np.eye(2))


# ----------------------------------------------------------------------------------------------
# STL
# ----------------------------------------------------------------------------------------------
def test_binary_stl_round_trip_is_atomic(tmp_path):
    m = icosphere(12.5, 2, centre=(1, 2, 3))
    path = write_stl(tmp_path / "sphere.stl", m)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sphere.stl"]  # no temporary left
    data = path.read_bytes()
    assert len(data) == 84 + 50 * m.n_faces
    assert not data[:5].lower().startswith(b"solid")
    back = read_stl(path)
    assert back.n_faces == m.n_faces and back.n_vertices == m.n_vertices
    assert back.is_closed()
    assert back.volume_mm3() == pytest.approx(m.volume_mm3(), rel=1e-5)
    # Same triangles, vertex positions rounded to float32.
    assert np.allclose(np.sort(back.triangles().reshape(-1, 9), axis=0),
                       np.sort(m.triangles().reshape(-1, 9), axis=0), atol=1e-5)


def test_write_stl_refuses_empty_and_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "x.stl"
    path.write_bytes(b"old")
    with pytest.raises(MeshError):
        write_stl(path, Mesh(np.zeros((0, 3)), np.zeros((0, 3), int)))
    assert path.read_bytes() == b"old"


def test_ascii_stl_is_read(tmp_path):
    m = box_mesh((0, 0, 0), (2, 2, 2))
    lines = ["solid box"]
    for tri, n in zip(m.triangles(), m.normals):
        lines += [f"facet normal {n[0]} {n[1]} {n[2]}", "outer loop"]
        lines += [f"vertex {p[0]:.6e} {p[1]:.6e} {p[2]:.6e}" for p in tri]
        lines += ["endloop", "endfacet"]
    lines.append("endsolid box")
    path = tmp_path / "box.stl"
    path.write_text("\n".join(lines))
    back = read_stl(path)
    assert back.n_vertices == 8 and back.n_faces == 12
    assert back.is_closed() and back.volume_mm3() == pytest.approx(8.0)


def test_read_stl_errors(tmp_path):
    with pytest.raises(InputFileError, match="cannot read"):
        read_stl(tmp_path / "missing.stl")
    junk = tmp_path / "junk.stl"
    junk.write_bytes(b"\x01" * 200)
    with pytest.raises(MeshError, match="not an STL"):
        read_stl(junk)
    empty = tmp_path / "empty.stl"
    empty.write_bytes(b"\0" * 80 + (0).to_bytes(4, "little"))
    with pytest.raises(MeshError, match="no triangles"):
        read_stl(empty)


# ----------------------------------------------------------------------------------------------
# Shared bones folder
# ----------------------------------------------------------------------------------------------
def test_bones_dir_env_override_and_subject_listing(tmp_path, monkeypatch):
    for name in ("MC22_femur_l.stl", "MC22_femur_r.stl", "MC22_pelvis_no_sacrum.stl", "TLEM2_CT_femur_r.stl",
                 "TLEM2_MRI_femur_l.stl", "README.md"):
        (tmp_path / name).write_bytes(b"")
    monkeypatch.setenv("HIPATLAS_BONES_DIR", str(tmp_path))
    assert B.bones_dir() == tmp_path
    subjects = {s.subject_id: s for s in B.list_subjects()}
    assert sorted(subjects) == ["MC22", "TLEM2_CT", "TLEM2_MRI"]
    assert set(subjects["MC22"].femur_paths) == {"left", "right"}
    assert subjects["MC22"].pelvis_path.name == "MC22_pelvis_no_sacrum.stl"
    assert subjects["TLEM2_CT"].pelvis_path is None
    assert subjects["TLEM2_CT"].specimen == subjects["TLEM2_MRI"].specimen == "TLEM2"
    assert subjects["TLEM2_CT"].modality == "CT"
    monkeypatch.setenv("HIPATLAS_BONES_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(InputFileError, match="HIPATLAS_BONES_DIR"):
        B.bones_dir()


def _shared_bones():
    try:
        return B.list_subjects()
    except InputFileError:
        return []


def test_shared_bones_are_listed_and_closed():
    subjects = _shared_bones()
    if not subjects:
        pytest.skip("shared bone surfaces not available")
    femurs = [p for s in subjects for p in s.femur_paths.values()]
    assert len(femurs) == 8
    for path in femurs[:2]:
        m = read_stl(path)
        assert m.is_closed()
        assert 2e5 < m.volume_mm3() < 8e5  # a whole adult femur is a few hundred cm^3


# ----------------------------------------------------------------------------------------------
# Voxelisation and signed distance
# ----------------------------------------------------------------------------------------------
def _grid_points(geometry: VolumeGeometry) -> np.ndarray:
    kk, jj, ii = np.indices(geometry.shape_zyx)
    ijk = np.stack([ii, jj, kk], axis=-1).astype(float)
    T = geometry.index_to_world()
    return ijk @ T[:3, :3].T + T[:3, 3]


def _box_sdf(p, lo, hi):
    centre, half = (np.asarray(lo) + hi) / 2, (np.asarray(hi) - lo) / 2
    q = np.abs(p - centre) - half
    return np.linalg.norm(np.maximum(q, 0), axis=-1) + np.minimum(q.max(axis=-1), 0)


def test_voxelize_box_on_a_rotated_grid_is_exact():
    rng = np.random.default_rng(1)
    lo, hi = np.array([-7.0, -4.0, -9.0]), np.array([6.0, 5.0, 8.0])
    box = box_mesh(lo, hi)
    direction = random_rotation(rng)
    geometry = VolumeGeometry.centered((30, 28, 26), (0.9, 0.8, 1.1), (0.3, -0.2, 0.1), tuple(map(tuple, direction)))
    labels = M.voxelize(box, geometry, label=3)
    assert labels.dtype == np.uint8 and labels.shape == (30, 28, 26)
    assert set(np.unique(labels)) == {0, 3}
    truth = _box_sdf(_grid_points(geometry), lo, hi) < 0
    assert np.array_equal(labels == 3, truth)


def test_voxelize_grid_aligned_box_counts_voxel_centres():
    # Box faces exactly through voxel-centre planes and edges: the jittered rays must still give
    # a consistent fill (a box from index 2 to 7.5 contains the centres 2..7 when it includes 2).
    box = box_mesh((2.0, 3.0, 1.0), (7.5, 8.5, 5.5))
    geometry = VolumeGeometry((8, 12, 10), (1.0, 1.0, 1.0))
    labels = M.voxelize(box, geometry)
    count = labels.sum()
    # Faces on voxel centres may go either way but the fill must be whole rows/slabs, never a
    # parity error that fills to the grid edge.
    assert 6 * 6 * 5 - 100 <= count <= 6 * 6 * 5 + 130
    assert labels[:, :, 9].sum() == 0 and labels[:, 11, :].sum() == 0 and labels[7].sum() == 0


def test_voxelize_sphere_volume_and_open_mesh_error():
    sphere = icosphere(10.0, 4)
    geometry = VolumeGeometry.centered((28, 28, 28), (0.8, 0.8, 0.8), (0.0, 0.0, 0.0))
    labels = M.voxelize(sphere, geometry)
    assert labels.sum() * 0.8**3 == pytest.approx(sphere.volume_mm3(), rel=0.02)
    with pytest.raises(MeshError):
        M.voxelize(Mesh(sphere.vertices, sphere.faces[1:]), geometry)


def test_signed_distance_of_a_sphere():
    r = 10.0
    sphere = icosphere(r, 5)  # faceting error < 0.01 mm
    geometry = VolumeGeometry.centered((30, 26, 34), (1.1, 1.3, 0.9), (0.4, -0.3, 0.2))
    sd = M.signed_distance(sphere, geometry)
    assert sd.dtype == np.float32 and sd.shape == geometry.shape_zyx
    truth = np.linalg.norm(_grid_points(geometry), axis=-1) - r
    err = np.abs(sd - truth)
    near = np.abs(truth) < 1.0
    assert err[near].max() < 0.03  # exact band (two voxel layers each side)
    assert err.max() < 0.5  # propagated far field, within half a voxel
    assert np.all(np.sign(sd[np.abs(truth) > 0.1]) == np.sign(truth[np.abs(truth) > 0.1]))


def test_signed_distance_of_a_box_on_a_rotated_grid():
    rng = np.random.default_rng(2)
    lo, hi = np.array([-6.0, -3.0, -5.0]), np.array([5.0, 4.0, 6.0])
    direction = random_rotation(rng)
    geometry = VolumeGeometry.centered((24, 22, 20), (1.0, 1.0, 1.0), (0.2, 0.1, -0.3), tuple(map(tuple, direction)))
    sd = M.signed_distance(box_mesh(lo, hi), geometry)
    truth = _box_sdf(_grid_points(geometry), lo, hi)
    err = np.abs(sd - truth)
    assert err[np.abs(truth) < 1.0].max() < 1e-4
    assert err.max() < 0.5


def test_closest_points_on_triangles_matches_brute_force():
    rng = np.random.default_rng(3)
    tri = rng.normal(size=(200, 3, 3))
    points = rng.normal(scale=2.0, size=(200, 3))
    q = M.closest_points_on_triangles(points, tri)
    uv = rng.uniform(size=(4000, 2))
    uv[uv.sum(1) > 1] = 1 - uv[uv.sum(1) > 1]
    for k in range(0, 200, 20):
        a, b, c = tri[k]
        samples = a + uv[:, :1] * (b - a) + uv[:, 1:] * (c - a)
        brute = np.linalg.norm(samples - points[k], axis=1).min()
        assert np.linalg.norm(q[k] - points[k]) <= brute + 1e-9
        assert np.linalg.norm(q[k] - points[k]) >= brute - 0.05


def test_shared_femur_voxelises_fast_and_consistently():
    subjects = _shared_bones()
    if not subjects:
        pytest.skip("shared bone surfaces not available")
    femur = read_stl(next(s for s in subjects if s.subject_id == "MC22").femur_paths["right"])
    lo, hi = femur.bounds_mm()
    geometry = VolumeGeometry.centered(tuple(int(v) for v in np.ceil(hi - lo + 10)[::-1]), (1.0, 1.0, 1.0),
                                       (lo + hi) / 2)
    start = time.process_time()
    labels = M.voxelize(femur, geometry)
    vox_s = time.process_time() - start
    start = time.process_time()
    sd = M.signed_distance(femur, geometry)
    sdf_s = time.process_time() - start
    logger.info("femur grid %s: voxelize %.2f s, signed distance %.2f s (CPU)", geometry.shape_zyx, vox_s, sdf_s)
    assert labels.sum() == pytest.approx(femur.volume_mm3(), rel=0.01)
    assert np.array_equal(sd < 0, labels > 0)
    # Vertices lie on the surface: the distance field interpolates to ~0 there.
    from scipy import ndimage

    idx = (femur.vertices[::50] - geometry.origin_mm) @ np.asarray(geometry.direction)  # unit spacing
    values = ndimage.map_coordinates(sd, idx[:, ::-1].T, order=1)
    assert np.abs(values).max() < 0.6
    assert vox_s < 10 and sdf_s < 30
