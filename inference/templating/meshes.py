"""Implant surfaces from template parameters (numpy only) and their outlines on a radiograph.

Every part is built as a stack of rings closed by two poles (a surface of revolution or a loft of
rounded-rectangle sections), which is a closed, outward-oriented triangle mesh by construction:

- stem body: a loft of superelliptic sections with the template's ML/AP widths at its levels;
- neck: a cylinder of the family's neck diameter along the neck axis up to the head centre;
- head: a sphere; cup: a hemispherical shell (outer diameter, shell thickness), opening along +z.

Outlines: the projection of a convex body is convex, so the outline of each convex piece is the
convex hull of its projected vertices; the stem (body pieces between levels plus the neck) is the
union of such pieces, drawn into a fine raster and traced (:func:`projected_outlines`).
"""

from __future__ import annotations

import numpy as np

from inference.geometry import project_points
from inference.mesh import Mesh
from inference.templating.library import CupFamily, StemFamily

__all__ = ["ring_stack_mesh", "sphere_mesh", "cylinder_mesh", "stem_body_mesh", "stem_meshes",
           "cup_mesh", "merge_meshes", "convex_outline", "union_outline", "projected_outlines", "body_pieces",
           "sphere_outline_error_mm"]

#: Points around each ring (a 32-gon sphere of 36 mm deviates by at most 0.09 mm from the sphere).
RING_POINTS = 32
#: Superellipse exponent of the stem sections: 2 = ellipse, larger = boxier (rounded rectangle).
SECTION_EXPONENT = 4.0


def ring_stack_mesh(bottom_mm, rings_mm: np.ndarray, top_mm) -> Mesh:
    """A closed mesh from rings (K, N, 3) stacked from ``bottom_mm`` to ``top_mm`` (pole points).

    Rings run counter-clockwise seen from ``top_mm``; the result is oriented outward.
    """
    rings = np.asarray(rings_mm, float)
    k, n = rings.shape[:2]
    vertices = np.vstack([np.asarray(bottom_mm, float)[None], rings.reshape(-1, 3), np.asarray(top_mm, float)[None]])
    top = len(vertices) - 1
    idx = 1 + np.arange(k * n).reshape(k, n)
    nxt = np.roll(idx, -1, axis=1)
    faces = [np.stack([np.zeros(n, int), nxt[0], idx[0]], 1)]
    for r in range(k - 1):
        faces.append(np.stack([idx[r], nxt[r], nxt[r + 1]], 1))
        faces.append(np.stack([idx[r], nxt[r + 1], idx[r + 1]], 1))
    faces.append(np.stack([idx[-1], nxt[-1], np.full(n, top)], 1))
    mesh = Mesh(vertices, np.vstack(faces))
    return mesh if mesh.signed_volume_mm3() > 0 else mesh.flipped()


def _revolve(profile_rz, n: int = RING_POINTS) -> Mesh:
    """Surface of revolution about z of a profile (r, z) whose first and last points have r = 0."""
    profile = np.asarray(profile_rz, float)
    angles = np.linspace(0, 2 * np.pi, n, endpoint=False)
    rings = np.stack([np.stack([r * np.cos(angles), r * np.sin(angles), np.full(n, z)], 1)
                      for r, z in profile[1:-1]])
    return ring_stack_mesh([0, 0, profile[0, 1]], rings, [0, 0, profile[-1, 1]])


def sphere_mesh(centre_mm, radius_mm: float, n: int = RING_POINTS) -> Mesh:
    polar = np.linspace(np.pi, 0, n // 2 + 1)
    mesh = _revolve(np.stack([radius_mm * np.sin(polar), radius_mm * np.cos(polar)], 1), n)
    return mesh.transformed(_translation(centre_mm))


def cylinder_mesh(start_mm, end_mm, radius_mm: float, n: int = RING_POINTS) -> Mesh:
    start, end = np.asarray(start_mm, float), np.asarray(end_mm, float)
    length = float(np.linalg.norm(end - start))
    mesh = _revolve([[0, 0], [radius_mm, 0], [radius_mm, length], [0, length]], n)
    return mesh.transformed(_frame_z(start, (end - start) / length))


def _translation(t) -> np.ndarray:
    m = np.eye(4)
    m[:3, 3] = t
    return m


def _frame_z(origin, z_axis) -> np.ndarray:
    """4x4 taking local (x, y, z) to a frame at ``origin`` whose z is ``z_axis``."""
    z = np.asarray(z_axis, float) / np.linalg.norm(z_axis)
    helper = np.array([0.0, 1.0, 0.0]) if abs(z[1]) < 0.9 else np.array([1.0, 0.0, 0.0])
    x = np.cross(helper, z)
    x /= np.linalg.norm(x)
    m = np.eye(4)
    m[:3, :3] = np.stack([x, np.cross(z, x), z], 1)
    m[:3, 3] = origin
    return m


def stem_body_mesh(family: StemFamily, size: str, levels_per_segment: int = 1) -> Mesh:
    """The stem body in the stem frame: superelliptic sections at the template's levels."""
    s = family.size(size)
    t = np.linspace(0, 2 * np.pi, RING_POINTS, endpoint=False)
    c, sn = np.cos(t), np.sin(t)
    e = 2.0 / SECTION_EXPONENT
    shape_x = np.sign(c) * np.abs(c) ** e
    shape_y = np.sign(sn) * np.abs(sn) ** e
    heights = np.asarray(s.body_heights_mm)
    # The tip is rounded off over its first 2 mm so the distal pole is not a flat disc edge.
    rings = []
    for z in heights:
        ml, ap = float(s.ml_width_at(z)), float(s.ap_width_at(z))
        rings.append(np.stack([0.5 * ml * shape_x, 0.5 * ap * shape_y, np.full_like(t, z)], 1))
    return ring_stack_mesh([0, 0, -2.0], np.stack(rings), [0, 0, s.length_mm])


def stem_meshes(family: StemFamily, size: str, variant: str, head_offset_mm: float,
                head_diameter_mm: float) -> dict[str, Mesh]:
    """``{"body", "neck", "head"}`` meshes of a stem with its head, in the stem frame."""
    s = family.size(size)
    neck_start = np.array([0.0, 0.0, s.neck_axis_height_mm])
    head_zero = family.head_centre_mm(size, variant, 0.0)
    head = family.head_centre_mm(size, variant, head_offset_mm)
    return {
        "body": stem_body_mesh(family, size),
        "neck": cylinder_mesh(neck_start, head_zero, 0.5 * family.neck_diameter_mm),
        "head": sphere_mesh(head, 0.5 * head_diameter_mm),
    }


def cup_mesh(family: CupFamily, size: str) -> Mesh:
    """Hemispherical shell, centre at the origin, opening towards +z (the cup axis)."""
    outer = 0.5 * family.size(size).outer_diameter_mm
    inner = outer - family.shell_thickness_mm
    polar = np.linspace(0, np.pi / 2, RING_POINTS // 4 + 1)
    outside = np.stack([outer * np.sin(polar), -outer * np.cos(polar)], 1)
    inside = np.stack([inner * np.sin(polar[::-1]), -inner * np.cos(polar[::-1])], 1)
    return _revolve(np.vstack([outside, inside]))


def merge_meshes(meshes) -> Mesh:
    """One mesh holding several closed shells (for one STL per implant)."""
    vertices, faces, base = [], [], 0
    for m in meshes:
        vertices.append(m.vertices)
        faces.append(m.faces + base)
        base += m.n_vertices
    return Mesh(np.vstack(vertices), np.vstack(faces))


# ----------------------------------------------------------------------------------------------
# Outlines on a radiograph
# ----------------------------------------------------------------------------------------------
def convex_outline(points_uv: np.ndarray) -> np.ndarray:
    """Closed convex polygon (M, 2) around 2D points (first point not repeated)."""
    from scipy.spatial import ConvexHull

    pts = np.asarray(points_uv, float)
    pts = pts[np.all(np.isfinite(pts), axis=1)]
    if len(pts) < 3:
        return np.zeros((0, 2))
    hull = ConvexHull(pts)
    return pts[hull.vertices]


#: Raster step of :func:`union_outline` (px): the traced outline lies within half a step of the
#: true edge. 0.5 px keeps one edit (changes + outlines on two views) well inside the 200 ms
#: heartbeat on the 2-core machine (benchmarks/bench_template.py); 0.25 px took 4x longer.
OUTLINE_STEP_PX = 0.5
#: Largest raster side (samples): a very magnified view gets a coarser step instead of a huge raster.
OUTLINE_MAX_SAMPLES = 2000


def _fill_convex(raster: np.ndarray, polygon: np.ndarray) -> None:
    """Set the raster samples inside a convex polygon (raster coordinates, x = column) to 1.

    Row by row: every edge crossing a row gives an x; the polygon covers [min x, max x] there.
    """
    rows = np.arange(raster.shape[0], dtype=float)
    a, b = polygon, np.roll(polygon, -1, axis=0)
    dy = b[:, 1] - a[:, 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (rows[None, :] - a[:, 1:2]) / dy[:, None]
        x = a[:, 0:1] + t * (b[:, 0:1] - a[:, 0:1])
    x = np.where((t >= 0) & (t <= 1) & (dy[:, None] != 0), x, np.nan)
    covered = np.isfinite(x).any(axis=0)
    if not covered.any():
        return
    lo = np.where(covered, np.nanmin(np.where(np.isfinite(x), x, np.inf), axis=0), 1.0)
    hi = np.where(covered, np.nanmax(np.where(np.isfinite(x), x, -np.inf), axis=0), 0.0)
    cols = np.arange(raster.shape[1], dtype=float)
    raster |= (cols[None, :] >= lo[:, None]) & (cols[None, :] <= hi[:, None])


def union_outline(polygons, step_px: float = OUTLINE_STEP_PX) -> list[np.ndarray]:
    """Outline(s) of the union of convex polygons, traced on a raster of ``step_px`` pixels."""
    from skimage.measure import find_contours

    polygons = [np.asarray(p, float) for p in polygons if len(p) >= 3]
    if not polygons:
        return []
    allp = np.vstack(polygons)
    step = max(step_px, float(np.ptp(allp, axis=0).max()) / OUTLINE_MAX_SAMPLES)
    low = allp.min(0) - 2 * step
    shape = np.ceil((allp.max(0) + 2 * step - low) / step).astype(int) + 1
    raster = np.zeros((shape[1], shape[0]), bool)
    for p in polygons:
        _fill_convex(raster, (p - low) / step)
    # find_contours interpolates at 0.5 between samples that are 0 and 1: the traced line runs half
    # a raster step outside the filled samples, i.e. within step / 2 of the true edge.
    contours = find_contours(raster.astype(np.float32), 0.5)
    return [_drop_collinear(c)[:, ::-1] * step + low for c in contours]


def _drop_collinear(points: np.ndarray) -> np.ndarray:
    """The polyline without points in the middle of straight runs (exact: the line is unchanged).

    A traced raster outline runs along the grid for long stretches; dropping those points makes
    drawing it several times cheaper (vectorised; a Douglas-Peucker pass in Python cost more than
    the whole trace).
    """
    if len(points) < 3:
        return points
    d_in = points[1:-1] - points[:-2]
    d_out = points[2:] - points[1:-1]
    cross = d_in[:, 0] * d_out[:, 1] - d_in[:, 1] * d_out[:, 0]
    straight = (np.abs(cross) < 1e-9) & ((d_in * d_out).sum(1) > 0)
    keep = np.concatenate([[True], ~straight, [True]])
    return points[keep]


def projected_outlines(P, parts: dict[str, np.ndarray],
                       pieces: dict[str, list[np.ndarray]] | None = None) -> dict[str, list[np.ndarray]]:
    """Outlines (pixel (u, v) polygons) of placed implant parts on a view with projection ``P``.

    Parameters
    ----------
    parts : dict name -> (N, 3) points
        Vertices of convex parts in world mm; each gets the convex hull of its projected vertices.
    pieces : dict name -> list of (N, 3) points, optional
        Non-convex parts given as convex pieces; each gets the traced union of the pieces' hulls.
    """
    out = {name: [convex_outline(project_points(P, points))] for name, points in parts.items()}
    for name, meshes in (pieces or {}).items():
        out[name] = union_outline([convex_outline(project_points(P, points)) for points in meshes])
    return out


def body_pieces(body: Mesh) -> list[np.ndarray]:
    """Vertices (N, 3) of the convex pieces of a :func:`stem_body_mesh` body (one per pair of rings)."""
    n = RING_POINTS
    rings = body.vertices[1:-1].reshape(-1, n, 3)
    pieces = [np.vstack([body.vertices[:1], rings[0]])]
    pieces += [np.vstack([rings[i], rings[i + 1]]) for i in range(len(rings) - 1)]
    pieces.append(np.vstack([rings[-1], body.vertices[-1:]]))
    return pieces


def sphere_outline_error_mm(P, centre_mm, radius_mm: float, outline_uv: np.ndarray) -> np.ndarray:
    """Distance between the sphere centre and each outline pixel's ray, minus the radius (mm).

    Zero for an exact outline: every ray through the outline of a sphere is tangent to it.
    """
    from inference.geometry import pixel_rays

    origin, direction = pixel_rays(P, outline_uv)
    rel = np.asarray(centre_mm, float) - origin
    along = (rel * direction).sum(-1, keepdims=True)
    return np.linalg.norm(rel - along * direction, axis=-1) - radius_mm


