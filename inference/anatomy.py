"""Femur landmarks and the canonical femur frame, found from the bone's own geometry.

Input is a closed femur surface (:class:`~inference.mesh.Mesh`) in any frame and any
orientation, a label map on a :class:`~inference.geometry.VolumeGeometry` (its surface is taken
with marching cubes), or a dense cloud of surface points (rasterised into a label map). The femur may be whole or only its proximal part (head, neck, trochanters and
some shaft below the lesser trochanter, as in the atlas grids).

Method (all steps work on the surface of a right femur; a left femur is mirrored x -> -x first and
its landmarks are mirrored back):

1. **Femoral head**: every surface point votes, along its inward normal, for sphere centres at a
   range of radii (a Hough transform). The strongest peaks are refined by an iterative
   least-squares sphere fit to the surface points that lie on the sphere (within a tolerance,
   with radial normals), which drops the neck, the fovea and the trochanters. The head is the
   candidate with the most area on its sphere *and* the largest covered fraction of it: the
   condyles of a whole femur can offer as much area, but on a sphere twice as large.
2. **Shaft axis**: a first long axis from principal components of the bone away from the head is
   refined by a line fit through the area centroids of cross-sections of the proximal diaphysis
   (10 cm starting below the trochanters, where the section has narrowed to the shaft's width),
   sections re-cut perpendicular to each new axis until it settles.
3. **Neck axis**: the line from the head centre through the area centroid of the narrowest
   cross-section of the neck, sections cut perpendicular to the current neck axis, iterated.
4. **Trochanters**: the lesser trochanter tip is the outermost point of the lowest clear bump of
   the posteromedial outline of the cross-sections below the neck; the greater trochanter tip is
   the top of the bone lateral of the shaft axis.

Cross-sections (:func:`cross_sections`) are exact planar cuts of the closed surface, chained into
loops through shared mesh edges, so areas and centroids need no tolerance or voxelisation.

Canonical frame (docs/architecture.md): origin at the head centre, +z along the shaft axis towards
the head, +x from the shaft axis towards the head (perpendicular to z), +y = z x x. Left femurs
are mirrored to right first, so for a left femur ``to_canonical`` has determinant -1.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from inference.errors import DataError, MeshError
from inference.mesh import Mesh

logger = logging.getLogger(__name__)

__all__ = [
    "FemurLandmarks",
    "CrossSection",
    "femur_landmarks",
    "femur_landmarks_from_labels",
    "femur_landmarks_from_points",
    "fit_sphere",
    "cross_sections",
    "canonical_frame",
    "LANDMARK_NAMES",
    "SyntheticFemur",
]

# Names (and order) of the landmark points shared with the data set manifest.
LANDMARK_NAMES = (
    "head_centre",
    "shaft_point_distal",
    "shaft_point_proximal",
    "neck_point",
    "lesser_trochanter",
    "greater_trochanter",
)

_MIRROR_X = np.diag([-1.0, 1.0, 1.0, 1.0])


# ----------------------------------------------------------------------------------------------
# Small geometric helpers
# ----------------------------------------------------------------------------------------------
def _unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    n = np.linalg.norm(v)
    if not np.isfinite(n) or n == 0:
        raise DataError("a direction of zero length came up while locating femur landmarks")
    return v / n


def _perpendicular_basis(normal: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two unit vectors (u, v) with u x v = normal."""
    normal = _unit(normal)
    # np.cross(helper, normal) and np.cross(normal, u) written out (the same products and
    # differences): np.cross's generality cost ~0.1 ms a call, ~700 calls per registration.
    n0, n1, n2 = (float(c) for c in normal)
    helper = int(np.argmin(np.abs(normal)))
    if helper == 0:
        u = _unit(np.array([0.0, -n2, n1]))
    elif helper == 1:
        u = _unit(np.array([n2, 0.0, -n0]))
    else:
        u = _unit(np.array([-n1, n0, 0.0]))
    u0, u1, u2 = (float(c) for c in u)
    v = np.array([n1 * u2 - n2 * u1, n2 * u0 - n0 * u2, n0 * u1 - n1 * u0])
    return u, v


def _row_norms(vectors: np.ndarray) -> np.ndarray:
    """Euclidean norms of the rows of an (N, 3) array: the same values, bit for bit, as
    ``np.linalg.norm(vectors, axis=1)`` (the same sums in the same order), ~5x faster (numpy's
    reduction over a short last axis is slow; the sphere fits take ~400 of these per case)."""
    squares = np.square(vectors)
    return np.sqrt(squares[:, 0] + squares[:, 1] + squares[:, 2])


def _least_squares(A: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``argmin |A x - b|`` of a tall (N, 4) system by its normal equations, which a sphere fit's
    centred columns keep well conditioned; ``lstsq`` (an SVD of the N x 4 matrix) where they are
    singular. The fits of one registration solve ~340 of these: the SVDs took ~0.2 s of CPU."""
    try:
        return np.linalg.solve(A.T @ A, A.T @ b)
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(A, b, rcond=None)[0]


def fit_sphere(points: np.ndarray, weights: np.ndarray | None = None, iterations: int = 10) -> tuple[np.ndarray, float]:
    """Least-squares sphere through points.

    An algebraic fit (linear in centre and ``r^2 - |c|^2``) gives the start; Gauss-Newton steps on
    the geometric residuals ``|p - c| - r`` then remove the algebraic fit's bias for partial caps.

    Parameters
    ----------
    points : ndarray, shape (N, 3), N >= 4
    weights : ndarray, shape (N,), optional
        Non-negative weights (e.g. surface area per point).

    Returns
    -------
    centre : ndarray, shape (3,)
    radius : float
    """
    p = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    if len(p) < 4:
        raise DataError(f"a sphere fit needs at least 4 points, got {len(p)}")
    w = np.ones(len(p)) if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
    sw = np.sqrt(w)
    shift = np.average(p, axis=0, weights=w)  # centring keeps the normal equations well conditioned
    q = p - shift
    A = np.column_stack([2 * q, np.ones(len(q))]) * sw[:, None]
    b = np.einsum("ij,ij->i", q, q) * sw
    sol = _least_squares(A, b)
    c = sol[:3]
    r = float(np.sqrt(max(sol[3] + c @ c, 1e-12)))
    for _ in range(iterations):
        d = q - c
        dist = _row_norms(d)
        dist = np.maximum(dist, 1e-12)
        res = (dist - r) * sw
        J = np.column_stack([-d / dist[:, None], -np.ones(len(q))]) * sw[:, None]
        step = _least_squares(J, -res)
        c = c + step[:3]
        r = r + float(step[3])
        if np.linalg.norm(step) < 1e-9:
            break
    return c + shift, abs(r)


# ----------------------------------------------------------------------------------------------
# Planar cross-sections of a closed surface
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class CrossSection:
    """One closed contour of a planar cut through a closed surface.

    Attributes
    ----------
    origin_mm, normal : ndarray, shape (3,)
        The cutting plane (normal is unit).
    area_mm2 : float
        Signed enclosed area: positive for an outer contour, negative for a hole.
    centroid_mm : ndarray, shape (3,)
        Area centroid of the enclosed region (in the plane).
    polygon_mm : ndarray, shape (K, 3)
        The contour's points in order, counter-clockwise seen from the +normal side.
    """

    origin_mm: np.ndarray
    normal: np.ndarray
    area_mm2: float
    centroid_mm: np.ndarray
    polygon_mm: np.ndarray

    def contains(self, point_mm: np.ndarray) -> bool:
        """Whether the projection of a point onto the plane lies inside this contour."""
        u, v = _perpendicular_basis(self.normal)
        rel = self.polygon_mm - np.asarray(point_mm, dtype=np.float64)
        x, y = rel @ u, rel @ v
        x2, y2 = np.roll(x, -1), np.roll(y, -1)
        # Crossing number of a ray from the point along +u (half-open rule on y for vertices).
        straddle = (y > 0) != (y2 > 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_cross = x + (0 - y) * (x2 - x) / (y2 - y)
        return bool(np.count_nonzero(straddle & (x_cross > 0)) % 2)

    @property
    def equivalent_radius_mm(self) -> float:
        """Radius of the circle with the same area."""
        return float(np.sqrt(abs(self.area_mm2) / np.pi))


def cross_sections(mesh: Mesh, origin_mm: np.ndarray, normal: np.ndarray) -> list[CrossSection]:
    """Cut a closed, consistently oriented surface with a plane; one :class:`CrossSection` per loop.

    Every triangle whose corners lie on both sides of the plane contributes one segment between
    its two crossing edges. Segments are oriented combinatorially from the winding (so that the
    enclosed region lies on the left seen from +normal) and chained through their shared mesh
    edges, which is exact and needs no distance tolerance. A corner exactly on the plane counts as
    being on the + side, for both triangles that share it, so no crossing is lost or doubled.

    Returns
    -------
    list of CrossSection
        Sorted by decreasing absolute area; empty if the plane misses the surface.
    """
    origin = np.asarray(origin_mm, dtype=np.float64)
    normal = _unit(normal)
    V = mesh.vertices
    # Only triangles whose centre lies within the largest centre-to-corner distance of the plane
    # can cross it: on the registration's ~77k-triangle surface about 1 %, so only their
    # corners' distances to the plane are computed (~260 calls per registration).
    F = mesh.faces[mesh.faces_near_plane(origin, normal)]
    d = np.zeros(len(V))
    corners = F.ravel()  # with repeats (each writes the same value): cheaper than np.unique's sort
    d[corners] = (V[corners] - origin) @ normal
    pos = d >= 0
    # Corners on the + side per triangle, summed as uint8 columns: numpy's sum over the short
    # axis of a (M, 3) bool array took half of this function's time (it is called ~230 times
    # per registration, on a ~77k-triangle surface).
    pos8 = pos.view(np.uint8)
    npos = pos8[F[:, 0]] + pos8[F[:, 1]] + pos8[F[:, 2]]
    tri = np.nonzero((npos == 1) | (npos == 2))[0]
    if len(tri) == 0:
        return []
    fp = pos[F[tri]]
    # The odd corner is the one alone on its side of the plane.
    odd_is_pos = npos[tri] == 1
    odd = np.where(odd_is_pos, np.argmax(fp, axis=1), np.argmin(fp, axis=1))
    rows = np.arange(len(tri))
    f = F[tri]
    v_odd = f[rows, odd]
    v_next = f[rows, (odd + 1) % 3]
    v_prev = f[rows, (odd + 2) % 3]
    # With outward normals the contour runs from the (odd, next) edge to the (prev, odd) edge
    # when the odd corner is on the + side, and the other way round otherwise.
    start_a = np.where(odd_is_pos, v_odd, v_prev)
    start_b = np.where(odd_is_pos, v_next, v_odd)
    end_a = np.where(odd_is_pos, v_prev, v_odd)
    end_b = np.where(odd_is_pos, v_odd, v_next)
    n = np.int64(len(V))

    def edge_point(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = np.minimum(a, b), np.maximum(a, b)
        # The same (lo, hi) order in both triangles of an edge gives bitwise-identical points.
        t = d[lo] / (d[lo] - d[hi])
        return V[lo] + t[:, None] * (V[hi] - V[lo]), lo * n + hi

    p, start_code = edge_point(start_a, start_b)
    q, end_code = edge_point(end_a, end_b)
    order = np.argsort(start_code)
    idx = np.searchsorted(start_code[order], end_code)
    idx = np.minimum(idx, len(order) - 1)
    nxt = order[idx]
    if not np.all(start_code[nxt] == end_code):
        raise MeshError("cannot cut the surface into closed contours: it is not a closed, consistently oriented surface")
    # Loop labels: follow the successor permutation (cycles of a permutation).
    # (Python lists: this walk touches every segment once, and numpy scalar indexing cost ~10x
    # more per step; it was most of this function's time.)
    successor = nxt.tolist()
    labels = [-1] * len(tri)
    loops: list[list[int]] = []
    for s0 in range(len(tri)):
        if labels[s0] >= 0:
            continue
        loop = []
        s = s0
        while labels[s] < 0:
            labels[s] = len(loops)
            loop.append(s)
            s = successor[s]
        loops.append(loop)
    label = np.array(labels, dtype=np.int64)
    u, v = _perpendicular_basis(normal)
    pu, pv = (p - origin) @ u, (p - origin) @ v
    qu, qv = (q - origin) @ u, (q - origin) @ v
    cross = pu * qv - qu * pv
    k = len(loops)
    area2 = np.bincount(label, weights=cross, minlength=k)  # twice the signed area
    cu = np.bincount(label, weights=(pu + qu) * cross, minlength=k)
    cv = np.bincount(label, weights=(pv + qv) * cross, minlength=k)
    sections = []
    for i, loop in enumerate(loops):
        a2 = area2[i]
        if a2 == 0:
            continue
        centroid = origin + (cu[i] / (3 * a2)) * u + (cv[i] / (3 * a2)) * v
        sections.append(CrossSection(origin, normal, float(a2 / 2), centroid, p[np.array(loop)]))
    sections.sort(key=lambda s: -abs(s.area_mm2))
    return sections


# ----------------------------------------------------------------------------------------------
# Femoral head
# ----------------------------------------------------------------------------------------------
def _vertex_area_weights(mesh: Mesh) -> np.ndarray:
    """Surface area represented by each vertex (a third of each incident triangle)."""
    w = np.zeros(mesh.n_vertices)
    areas = mesh.face_areas_mm2() / 3.0
    for c in range(3):
        w += np.bincount(mesh.faces[:, c], weights=areas, minlength=mesh.n_vertices)
    return w


def _hough_sphere_candidates(
    points: np.ndarray,
    normals: np.ndarray,
    weights: np.ndarray,
    radius_range_mm: tuple[float, float],
    radius_step_mm: float = 2.0,
    bin_mm: float = 3.0,
) -> list[tuple[np.ndarray, float, float]]:
    """Sphere candidates (centre, radius, votes), the best centre for each trial radius.

    Each point votes for the centre ``p - r n`` at every radius; a sphere of radius r puts all its
    votes (its area) into one place at that radius, while a cylinder such as the shaft spreads them
    along its axis, and irregular surfaces scatter them. Votes are summed over 3x3x3 bins so that
    the peak does not depend on where the bin edges fall, and so that noisy normals still add up.
    """
    radii = np.arange(radius_range_mm[0], radius_range_mm[1] + 1e-9, radius_step_mm)
    lo = points.min(axis=0) - radius_range_mm[1] - 2 * bin_mm
    hi = points.max(axis=0) + radius_range_mm[1] + 2 * bin_mm
    shape = tuple(int(s) for s in np.ceil((hi - lo) / bin_mm) + 1)
    found: list[tuple[np.ndarray, float, float]] = []
    for r in radii:
        idx = np.floor((points - r * normals - lo) / bin_mm).astype(np.int64)
        flat = np.ravel_multi_index(idx.T, shape, mode="clip")
        acc = np.bincount(flat, weights=weights, minlength=int(np.prod(shape))).astype(np.float32).reshape(shape)
        # Separable box sum over 3 bins per axis (cheaper than a 3D filter call on float64).
        for axis in range(3):
            acc = ndimage.uniform_filter1d(acc, size=3, axis=axis, mode="constant")
        best = int(np.argmax(acc))
        centre = lo + (np.array(np.unravel_index(best, shape)) + 0.5) * bin_mm
        found.append((centre, float(r), float(acc.flat[best] * 27.0)))
    found.sort(key=lambda c: -c[2])
    return found


def _refine_sphere(
    points: np.ndarray,
    normals: np.ndarray,
    weights: np.ndarray,
    centre: np.ndarray,
    radius: float,
    iterations: int = 8,
) -> tuple[np.ndarray, float, np.ndarray]:
    """Iterative least-squares sphere fit to the points lying on (centre, radius).

    Inliers are within a tolerance of the sphere and have a normal close to radial; the tolerance
    shrinks from 3 mm to about 4% of the radius so that the fit first locks on, then ignores the
    head-neck junction (inside the sphere) and osteophyte-like bumps.
    """
    c, r = np.asarray(centre, dtype=np.float64), float(radius)
    inliers = np.zeros(len(points), dtype=bool)
    for it in range(iterations):
        tol = max(0.04 * r, 0.75) if it >= 2 else 3.0
        d = points - c
        dist = _row_norms(d)
        radial = np.einsum("ij,ij->i", d, normals) / np.maximum(dist, 1e-9)
        new = (np.abs(dist - r) < tol) & (radial > 0.85)
        if new.sum() < 20:
            break
        inliers = new
        c, r = fit_sphere(points[inliers], weights[inliers])
    return c, r, inliers


def _find_head(mesh: Mesh, normals: np.ndarray, weights: np.ndarray, radius_range_mm: tuple[float, float]):
    """Best femoral head sphere: refine the strongest Hough candidates, keep the best supported."""
    points = mesh.vertices
    candidates = _hough_sphere_candidates(points, normals, weights, radius_range_mm)
    best = None
    tried: list[np.ndarray] = []
    for centre0, radius0, _votes in candidates:
        if any(np.linalg.norm(centre0 - t) < 3.0 for t in tried):
            continue  # the same peak seen at a neighbouring radius
        tried.append(centre0)
        centre, radius, inliers = _refine_sphere(points, normals, weights, centre0, radius0)
        if not (radius_range_mm[0] <= radius <= radius_range_mm[1]) or inliers.sum() < 20:
            continue
        support = float(weights[inliers].sum())  # surface area (mm^2) lying on the sphere
        # Area on the sphere times the fraction of the sphere it covers: a big, loosely spherical
        # patch (the condyles of a whole femur) can match the head's area but covers only a
        # fifth of its sphere, while the head covers half of it or more.
        score = support * support / (4 * np.pi * radius**2)
        if best is None or score > best[4]:
            best = (centre, radius, inliers, support, score)
        if len(tried) >= 6:
            break
    if best is None:
        raise DataError(
            "no femoral head found on the surface (no spherical cap with a radius of "
            f"{radius_range_mm[0]:g}-{radius_range_mm[1]:g} mm); is this a femur including its head?"
        )
    centre, radius, inliers, support, _ = best
    residual = _row_norms(points[inliers] - centre) - radius
    coverage = support / (4 * np.pi * radius**2)
    rms = float(np.sqrt(np.average(residual**2, weights=weights[inliers])))
    if coverage < 0.2:
        raise DataError(
            f"the best femoral head sphere (radius {radius:.1f} mm) covers only {100 * coverage:.0f}% "
            "of a sphere; the head looks incomplete or is not in the surface"
        )
    return centre, radius, rms, coverage


# ----------------------------------------------------------------------------------------------
# Axes
# ----------------------------------------------------------------------------------------------
def _section_near(mesh: Mesh, origin: np.ndarray, normal: np.ndarray, near_point: np.ndarray) -> CrossSection | None:
    """The outer contour of a plane section around the line (near_point, normal).

    The contour containing the line wins; failing that, the one whose centroid is nearest the
    line among contours of at least 5% of the largest area (segmented surfaces carry tiny
    spurious loops that must not be taken for the bone).
    """
    sections = [s for s in cross_sections(mesh, origin, normal) if s.area_mm2 > 0]
    if not sections:
        return None
    largest = max(s.area_mm2 for s in sections)
    sections = [s for s in sections if s.area_mm2 >= 0.05 * largest]
    inside = [s for s in sections if s.contains(near_point)]
    if inside:
        return max(inside, key=lambda s: s.area_mm2)

    def distance(s: CrossSection) -> float:
        off = s.centroid_mm - near_point
        return float(np.linalg.norm(off - (off @ normal) * normal))

    return min(sections, key=distance)


def _principal_axis(points: np.ndarray, weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(mean, unit direction of largest spread) of points."""
    w = np.ones(len(points)) if weights is None else weights
    mean = np.average(points, axis=0, weights=w)
    _, _, vt = np.linalg.svd((points - mean) * np.sqrt(w)[:, None], full_matrices=False)
    return mean, vt[0]


def _shaft_axis(
    mesh: Mesh,
    weights: np.ndarray,
    head_centre: np.ndarray,
    head_radius: float,
    shaft_length_mm: float,
    step_mm: float = 5.0,
    max_iterations: int = 8,
    min_window_mm: float = 40.0,
):
    """Line through the centroids of proximal-diaphysis cross-sections.

    The window starts where the cross-section radius has come down to within 10% of the
    narrowest section (below the trochanters) and runs ``shaft_length_mm`` distally, or to 10 mm
    short of the end of the bone if that comes first (a proximal-only femur). A window shorter
    than ``min_window_mm`` is extended proximally over sections within 30% of the narrowest
    radius.
    """
    points = mesh.vertices
    far = _row_norms(points - head_centre) > 1.5 * head_radius
    if far.sum() < 20:
        raise DataError("the femur surface holds no shaft (nothing beyond the femoral head and neck)")
    point, axis = _principal_axis(points[far], weights[far])
    if axis @ (head_centre - point) < 0:
        axis = -axis
    window = (0.0, 0.0)
    for _ in range(max_iterations):
        t_end = float(np.max((head_centre - points) @ axis))  # distal end, mm below the head centre
        levels = np.arange(2.0 * head_radius, min(t_end - 10.0, 2.0 * head_radius + 250.0), step_mm)
        if len(levels) < 5:
            raise DataError(
                f"the femur surface ends {t_end:.0f} mm below the head centre; at least "
                f"{2.0 * head_radius + 35.0:.0f} mm of bone (with about 3 cm of shaft) is needed to find the shaft axis"
            )
        sections = [_section_near(mesh, head_centre - t * axis, axis, point) for t in levels]
        keep = np.array([s is not None for s in sections], dtype=bool)
        levels = levels[keep]
        sections = [s for s in sections if s is not None]
        if len(sections) < 2:
            break
        radius = np.array([s.equivalent_radius_mm for s in sections])
        start = int(np.argmax(radius <= 1.10 * radius.min()))
        if levels[-1] - levels[start] < min_window_mm:
            # Little shaft below the narrowest section (a field of view that ends soon below
            # the trochanters, or a reconstruction that narrows there): a few centimetres of
            # centroids give a poorly defined axis, so extend the window proximally while the
            # sections stay slim (not yet the flare of the trochanters).
            slim = radius <= 1.30 * radius.min()
            while start > 0 and slim[start - 1] and levels[-1] - levels[start] < min_window_mm:
                start -= 1
        in_window = (levels >= levels[start]) & (levels <= levels[start] + shaft_length_mm)
        if in_window.sum() < 5:
            raise DataError(
                f"the femur surface holds only {levels[-1] - levels[start]:.0f} mm of shaft below the "
                "trochanters; at least 25 mm is needed to find the shaft axis"
            )
        centroids = np.array([s.centroid_mm for s, k in zip(sections, in_window) if k])
        new_point, new_axis = _principal_axis(centroids)
        # One robust refit: a bump on the surface (the lesser trochanter, a muscle ridge) pulls
        # the centroids of a few sections off the line; drop those and fit again.
        rel = centroids - new_point
        residual = _row_norms(rel - np.outer(rel @ new_axis, new_axis))
        good = residual <= max(0.5, 3.0 * float(np.median(residual)))
        if good.sum() >= 5 and not good.all():
            new_point, new_axis = _principal_axis(centroids[good])
        if new_axis @ (head_centre - new_point) < 0:
            new_axis = -new_axis
        change = float(np.degrees(np.arccos(np.clip(new_axis @ axis, -1.0, 1.0))))
        point, axis = new_point, new_axis
        window = (float(levels[start]), float(levels[in_window][-1]))
        if change < 0.02:
            break
    if window == (0.0, 0.0):
        raise DataError("could not cut the femoral shaft into cross-sections; is the surface a whole proximal femur?")
    return point, axis, window


def _neck_axis(mesh: Mesh, head_centre: np.ndarray, head_radius: float, max_iterations: int = 8):
    """Head centre -> centroid of the narrowest neck section (sections perpendicular to the axis)."""
    points = mesh.vertices
    dist = _row_norms(points - head_centre)
    shell = (dist > 1.1 * head_radius) & (dist < 1.6 * head_radius)
    if shell.sum() < 10:
        raise DataError("the femur surface has no neck next to the femoral head")
    # The neck is the only part of the bone crossing a thin shell around the head, so the shell's
    # points surround the neck axis.
    direction = _unit(points[shell].mean(axis=0) - head_centre)
    levels = np.arange(0.5 * head_radius, 2.5 * head_radius, 1.0)
    neck = None
    for _ in range(max_iterations):
        sections = [_section_near(mesh, head_centre + s * direction, direction, head_centre) for s in levels]
        area = np.array([s.area_mm2 if s is not None else np.inf for s in sections])
        # A 3-level median ignores a single odd section (a cut grazing a bump of the surface).
        smooth = ndimage.median_filter(area, size=3, mode="nearest")
        k = int(np.argmin(smooth))
        if not np.isfinite(smooth[k]) or sections[k] is None:
            raise DataError("could not cut the femoral neck into cross-sections")
        neck = sections[k]
        new_direction = _unit(neck.centroid_mm - head_centre)
        change = float(np.degrees(np.arccos(np.clip(new_direction @ direction, -1.0, 1.0))))
        direction = new_direction
        if change < 0.02:
            break
    return neck.centroid_mm, direction, neck.equivalent_radius_mm


def canonical_frame(head_centre_mm, shaft_point_mm, shaft_direction, mirror: bool = False) -> np.ndarray:
    """4x4 taking input-frame points to the canonical femur frame.

    Origin at the head centre, +z = shaft direction (towards the head), +x from the shaft axis
    towards the head centre (perpendicular to z), +y = z x x. With ``mirror`` (a left femur) the
    input is first mirrored x -> -x and the landmarks given are those of the mirrored bone.
    """
    c = np.asarray(head_centre_mm, dtype=np.float64)
    z = _unit(shaft_direction)
    p = np.asarray(shaft_point_mm, dtype=np.float64)
    foot = p + ((c - p) @ z) * z
    x = c - foot
    if np.linalg.norm(x) < 1e-6:
        raise DataError("the head centre lies on the shaft axis; the femur frame is undefined")
    x = _unit(x)
    y = np.cross(z, x)
    R = np.stack([x, y, z])  # rows: canonical axes in input coordinates
    T = np.eye(4)
    T[:3, :3] = R
    T[:3, 3] = -R @ c
    return T @ _MIRROR_X if mirror else T


# ----------------------------------------------------------------------------------------------
# Trochanters (found in the canonical frame of a right femur)
# ----------------------------------------------------------------------------------------------
def _lesser_trochanter(mesh_c: Mesh, head_radius: float, offset: float, shaft_start_mm: float) -> np.ndarray:
    """Tip of the lesser trochanter, canonical coordinates of a right femur.

    Going down the bone below the neck, the posteromedial extent of each cross-section (measured
    from the shaft axis along a posteromedial direction, over the half of the section medial of
    the shaft axis) falls with the neck, rises over the lesser trochanter, then falls to the shaft.
    Profiles are taken over a fan of directions (the trochanter's direction varies with version).
    The lesser trochanter is the most distal clear bump (prominence >= 2 mm) above the shaft;
    bumps higher up belong to the neck base and the intertrochanteric crest.
    """
    z_axis = np.array([0.0, 0.0, 1.0])
    deepest = 4.0 * head_radius
    levels = np.arange(-0.5 * head_radius, -deepest, -1.0)
    contours = []
    for z in levels:
        sections = [s for s in cross_sections(mesh_c, np.array([0.0, 0.0, z]), z_axis) if s.area_mm2 > 0]
        if sections:  # drop tiny spurious loops of segmented surfaces
            largest = max(s.area_mm2 for s in sections)
            sections = [s for s in sections if s.area_mm2 >= 0.05 * largest]
        contours.append(np.concatenate([s.polygon_mm for s in sections]) if sections else np.empty((0, 3)))
    peaks = []  # (level index, prominence, direction)
    for phi_deg in (30.0, 45.0, 60.0, 75.0, 90.0):
        u = np.array([np.cos(np.radians(phi_deg)), np.sin(np.radians(phi_deg))])
        extent = np.array([_extent(c, offset, u, -np.inf) for c in contours])
        valid = np.isfinite(extent)
        if valid.sum() < 5:
            continue
        extent = np.where(valid, extent, np.min(extent[valid]))
        peaks += [(k, prominence, u) for k, prominence in _peak_prominences(extent)]
    clear = [p for p in peaks if p[1] >= 2.0]
    if clear:
        lowest = max(p[0] for p in clear)
        # Among the bumps at (about) that level, the direction that sees it most clearly.
        k, _, u = max((p for p in clear if p[0] >= lowest - 5), key=lambda p: p[1])
    elif peaks:
        k, _, u = max(peaks, key=lambda p: p[1])
    else:
        k = None
    if k is not None:
        medial = contours[k][contours[k][:, 0] + offset > 0]
        return medial[int(np.argmax((medial[:, :2] + [offset, 0.0]) @ u))]
    # No bump at all (a flat or truncated trochanter): the most posteromedial point below the
    # neck's waist (the lowest point of the profile in its upper half).
    logger.warning("no distinct lesser trochanter bump; using the most posteromedial point below the neck")
    u = np.array([np.cos(np.radians(60.0)), np.sin(np.radians(60.0))])
    extent = np.array([_extent(c, offset, u, np.inf) for c in contours])
    waist = int(np.argmin(extent[: max(1, len(extent) // 2)])) if len(extent) else 0
    below = [c[c[:, 0] + offset > 0] for c in contours[waist:]]
    below = [c for c in below if len(c)]
    if not below:
        raise DataError("could not find the lesser trochanter: the surface has no bone below the neck")
    pts = np.concatenate(below)
    return pts[int(np.argmax((pts[:, :2] + [offset, 0.0]) @ u))]


def _extent(contour: np.ndarray, offset: float, direction_xy: np.ndarray, empty: float) -> float:
    """Largest extent along a horizontal direction, from the shaft axis, of the contour's medial half.

    Only points medial of the shaft axis count: the greater trochanter bulges posteriorly too,
    on the lateral side, and must not be taken for the lesser trochanter.
    """
    medial = contour[contour[:, 0] + offset > 0] if len(contour) else contour
    if len(medial) == 0:
        return empty
    return float(((medial[:, :2] + [offset, 0.0]) @ direction_xy).max())


def _peak_prominences(values: np.ndarray) -> list[tuple[int, float]]:
    """Interior local maxima of a 1D profile with their topographic prominence.

    The prominence of a peak is its height above the higher of the two lowest points separating
    it from higher ground (or the profile's end) on either side. (The same definition as
    scipy.signal.peak_prominences, written out here because importing scipy.signal is slow.)
    """
    out = []
    n = len(values)
    for i in range(1, n - 1):
        v = values[i]
        if not (v > values[i - 1] and v >= values[i + 1]):
            continue
        j = i - 1
        left_min = v
        while j >= 0 and values[j] <= v:
            left_min = min(left_min, values[j])
            j -= 1
        j = i + 1
        right_min = v
        while j < n and values[j] <= v:
            right_min = min(right_min, values[j])
            j += 1
        out.append((i, float(v - max(left_min, right_min))))
    return out


def _greater_trochanter(points_c: np.ndarray, head_radius: float, offset: float, shaft_start_mm: float) -> np.ndarray:
    """Tip (top) of the greater trochanter: the most proximal bone lateral of the shaft axis.

    Canonical coordinates of a right femur.
    """
    lateral = (points_c[:, 0] < -offset) & (points_c[:, 2] > -shaft_start_mm)
    if not lateral.any():
        raise DataError("could not find the greater trochanter: no bone lateral of the shaft axis near the neck")
    candidates = points_c[lateral]
    # The top of the trochanter is often a flat ridge: the single highest vertex can sit anywhere
    # on it. The vertex nearest the middle of the top 2 mm is a reproducible tip.
    top = candidates[candidates[:, 2] >= candidates[:, 2].max() - 2.0]
    return top[int(np.argmin(_row_norms(top - top.mean(axis=0))))]


# ----------------------------------------------------------------------------------------------
# Landmarks
# ----------------------------------------------------------------------------------------------
def _vec3(value, name: str) -> np.ndarray:
    v = np.array(value, dtype=np.float64).reshape(-1)
    if v.shape != (3,) or not np.all(np.isfinite(v)):
        raise ValueError(f"{name} must be 3 finite numbers, not {value!r}")
    v.setflags(write=False)
    return v


@dataclass(frozen=True, eq=False)
class FemurLandmarks:
    """Femur landmarks and axes, in millimetres in the frame of the input surface.

    Attributes
    ----------
    side : str
        ``"left"`` or ``"right"``.
    head_centre_mm, head_radius_mm
        Femoral head sphere.
    shaft_point_mm, shaft_direction
        A point on the shaft axis and its unit direction, pointing proximally (towards the head).
    shaft_point_proximal_mm, shaft_point_distal_mm
        Points on the shaft axis at the two ends of the diaphysis segment it was fitted to.
    neck_point_mm, neck_direction
        Centroid of the narrowest neck cross-section and the unit neck-axis direction, pointing
        from the neck towards the head (the neck axis passes through the head centre).
    neck_radius_mm : float
        Equivalent radius (same area) of the narrowest neck section.
    lesser_trochanter_mm, greater_trochanter_mm
        Tips of the trochanters (surface points).
    femur_length_mm : float
        Extent of the surface along the shaft axis (whole femur, or the part present).
    head_fit_rms_mm, head_coverage : float
        Sphere-fit residual and the fraction of the sphere covered by the fitted surface.
    to_canonical : ndarray, shape (4, 4)
        Maps input-frame points to the canonical femur frame (determinant -1 for a left femur,
        which is mirrored to a right one).
    """

    side: str
    head_centre_mm: np.ndarray
    head_radius_mm: float
    shaft_point_mm: np.ndarray
    shaft_direction: np.ndarray
    shaft_point_proximal_mm: np.ndarray
    shaft_point_distal_mm: np.ndarray
    neck_point_mm: np.ndarray
    neck_direction: np.ndarray
    neck_radius_mm: float
    lesser_trochanter_mm: np.ndarray
    greater_trochanter_mm: np.ndarray
    femur_length_mm: float
    head_fit_rms_mm: float
    head_coverage: float
    to_canonical: np.ndarray

    def __post_init__(self) -> None:
        if self.side not in ("left", "right"):
            raise ValueError(f"side must be 'left' or 'right', not {self.side!r}")
        for name in (
            "head_centre_mm", "shaft_point_mm", "shaft_point_proximal_mm", "shaft_point_distal_mm",
            "neck_point_mm", "lesser_trochanter_mm", "greater_trochanter_mm",
        ):
            object.__setattr__(self, name, _vec3(getattr(self, name), name))
        for name in ("shaft_direction", "neck_direction"):
            v = _vec3(getattr(self, name), name)
            n = np.linalg.norm(v)
            if n == 0:
                raise ValueError(f"{name} must not be zero")
            v = v / n
            v.setflags(write=False)
            object.__setattr__(self, name, v)
        for name in ("head_radius_mm", "neck_radius_mm", "femur_length_mm", "head_fit_rms_mm", "head_coverage"):
            value = float(getattr(self, name))
            if not np.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, not {getattr(self, name)!r}")
            object.__setattr__(self, name, value)
        T = np.array(self.to_canonical, dtype=np.float64)
        if T.shape != (4, 4) or not np.all(np.isfinite(T)):
            raise ValueError(f"to_canonical must be a finite 4x4 matrix, not shape {T.shape}")
        T.setflags(write=False)
        object.__setattr__(self, "to_canonical", T)

    # -- frames --------------------------------------------------------------------------------
    def from_canonical(self) -> np.ndarray:
        """4x4 taking canonical-frame points back to the input frame."""
        return np.linalg.inv(self.to_canonical)

    def to_canonical_points(self, points_mm: np.ndarray) -> np.ndarray:
        """Input-frame points (N, 3) -> canonical frame."""
        p = np.asarray(points_mm, dtype=np.float64)
        return p @ self.to_canonical[:3, :3].T + self.to_canonical[:3, 3]

    def from_canonical_points(self, points_mm: np.ndarray) -> np.ndarray:
        """Canonical-frame points (N, 3) -> input frame."""
        T = self.from_canonical()
        p = np.asarray(points_mm, dtype=np.float64)
        return p @ T[:3, :3].T + T[:3, 3]

    def points_mm(self) -> np.ndarray:
        """The named landmark points (in :data:`LANDMARK_NAMES` order), shape (6, 3)."""
        return np.stack([
            self.head_centre_mm,
            self.shaft_point_distal_mm,
            self.shaft_point_proximal_mm,
            self.neck_point_mm,
            self.lesser_trochanter_mm,
            self.greater_trochanter_mm,
        ])

    def transformed(self, matrix: np.ndarray) -> "FemurLandmarks":
        """The landmarks of the same bone expressed in another frame, ``X_new = T @ X``.

        ``T`` must be rigid, possibly with a reflection; a reflection turns a left femur into a
        right one (and back), as mirroring the bone does.
        """
        T = np.asarray(matrix, dtype=np.float64)
        if T.shape != (4, 4):
            raise ValueError(f"transform must be 4x4, not shape {T.shape}")
        R, t = T[:3, :3], T[:3, 3]
        if not np.allclose(R.T @ R, np.eye(3), atol=1e-6):
            raise ValueError("FemurLandmarks.transformed needs a rigid transform (rotation, translation, reflection)")
        reflect = np.linalg.det(R) < 0
        p = lambda v: R @ v + t  # noqa: E731 - small local mapping
        return dataclasses.replace(
            self,
            side={"left": "right", "right": "left"}[self.side] if reflect else self.side,
            head_centre_mm=p(self.head_centre_mm),
            shaft_point_mm=p(self.shaft_point_mm),
            shaft_direction=R @ self.shaft_direction,
            shaft_point_proximal_mm=p(self.shaft_point_proximal_mm),
            shaft_point_distal_mm=p(self.shaft_point_distal_mm),
            neck_point_mm=p(self.neck_point_mm),
            neck_direction=R @ self.neck_direction,
            lesser_trochanter_mm=p(self.lesser_trochanter_mm),
            greater_trochanter_mm=p(self.greater_trochanter_mm),
            to_canonical=self.to_canonical @ np.linalg.inv(T),
        )

    def canonical(self) -> "FemurLandmarks":
        """These landmarks in the canonical frame (a right femur, head centre at the origin)."""
        return self.transformed(self.to_canonical)

    def to_dict(self) -> dict:
        """JSON-friendly dict (lists of floats)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.tolist() if isinstance(value, np.ndarray) else value
        return out


def femoral_head_sphere(surface: Mesh, head_radius_range_mm: tuple[float, float] = (12.0, 36.0)
                        ) -> tuple[np.ndarray, float]:
    """(centre, radius) of the femoral head on a closed femur surface: the sphere
    :func:`femur_landmarks` finds, without the rest of its landmarks. Raises DataError as it."""
    surface.check_closed("femur surface")
    centre, radius, _, _ = _find_head(surface, surface.vertex_normals(), _vertex_area_weights(surface),
                                      tuple(float(v) for v in head_radius_range_mm))
    return centre, radius


def femur_landmarks(
    surface: Mesh,
    side: str,
    *,
    head_radius_range_mm: tuple[float, float] = (12.0, 36.0),
    shaft_length_mm: float = 100.0,
) -> FemurLandmarks:
    """Landmarks and canonical frame of a femur surface.

    Parameters
    ----------
    surface : Mesh
        Closed femur surface in mm, in any frame and orientation; the whole femur or its proximal
        part with at least ~3 cm of shaft below the lesser trochanter.
    side : {"left", "right"}
        Which femur it is (a left femur is handled as its mirror image).
    head_radius_range_mm : (float, float)
        Radii searched for the femoral head.
    shaft_length_mm : float
        Length of proximal diaphysis (starting below the trochanters) that defines the shaft axis.

    Returns
    -------
    FemurLandmarks
        In the frame of ``surface``.

    Raises
    ------
    MeshError
        If the surface is not closed.
    DataError
        If the head, neck or shaft cannot be found (not a femur, or too little of it).
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', not {side!r}")
    lo, hi = (float(v) for v in head_radius_range_mm)
    if not 0 < lo < hi:
        raise ValueError(f"head_radius_range_mm must be (min, max) with 0 < min < max, not {head_radius_range_mm}")
    if not shaft_length_mm >= 25:
        raise ValueError(f"shaft_length_mm must be >= 25 mm, not {shaft_length_mm}")
    surface.check_closed("femur surface")
    mirror = side == "left"
    mesh = surface.mirrored_x() if mirror else surface
    normals = mesh.vertex_normals()
    weights = _vertex_area_weights(mesh)

    centre, radius, rms, coverage = _find_head(mesh, normals, weights, (lo, hi))
    shaft_point, shaft_dir, (t_start, t_stop) = _shaft_axis(mesh, weights, centre, radius, shaft_length_mm)
    neck_point, neck_dir_out, neck_radius = _neck_axis(mesh, centre, radius)

    T = canonical_frame(centre, shaft_point, shaft_dir)
    T_inv = np.linalg.inv(T)
    mesh_c = mesh.transformed(T)
    points_c = mesh_c.vertices
    foot = shaft_point + ((centre - shaft_point) @ shaft_dir) * shaft_dir
    offset = float(np.linalg.norm(centre - foot))
    lt_c = _lesser_trochanter(mesh_c, radius, offset, t_start)
    gt_c = _greater_trochanter(points_c, radius, offset, t_start)
    to_input = lambda q: T_inv[:3, :3] @ q + T_inv[:3, 3]  # noqa: E731
    along = points_c[:, 2]
    landmarks = FemurLandmarks(
        side="right",
        head_centre_mm=centre,
        head_radius_mm=radius,
        shaft_point_mm=shaft_point,
        shaft_direction=shaft_dir,
        shaft_point_proximal_mm=foot - t_start * shaft_dir,
        shaft_point_distal_mm=foot - t_stop * shaft_dir,
        neck_point_mm=neck_point,
        neck_direction=-neck_dir_out,
        neck_radius_mm=neck_radius,
        lesser_trochanter_mm=to_input(lt_c),
        greater_trochanter_mm=to_input(gt_c),
        femur_length_mm=float(along.max() - along.min()),
        head_fit_rms_mm=rms,
        head_coverage=coverage,
        to_canonical=T,
    )
    if mirror:
        landmarks = landmarks.transformed(_MIRROR_X)  # back to the input frame, side becomes left
    logger.debug(
        "femur landmarks: head r=%.1f mm (rms %.2f, coverage %.0f%%), neck r=%.1f mm, shaft window %.0f-%.0f mm",
        radius, rms, 100 * coverage, neck_radius, t_start, t_stop,
    )
    return landmarks


def femur_landmarks_from_labels(
    labels_zyx: np.ndarray,
    geometry,
    side: str,
    *,
    label: int = 1,
    smooth_sigma_vox: float = 0.7,
    **kwargs,
) -> FemurLandmarks:
    """Landmarks of the femur in a label map (world mm of ``geometry``).

    The label's largest connected component is turned into a closed surface by marching cubes
    (:func:`inference.surface.label_surface`, lightly smoothed to remove the voxel staircase) and
    passed to :func:`femur_landmarks` (keyword arguments are forwarded).
    """
    from inference.surface import label_surface

    surface = label_surface(labels_zyx, geometry, label=label, smooth_sigma_vox=smooth_sigma_vox)
    return femur_landmarks(surface, side, **kwargs)


def femur_landmarks_from_points(
    points_mm: np.ndarray,
    side: str,
    *,
    spacing_mm: float = 1.0,
    **kwargs,
) -> FemurLandmarks:
    """Landmarks of a femur given only as points on its surface (a dense point cloud).

    The points are rasterised on a grid of ``spacing_mm`` in their own frame, closed into a solid
    label map (dilation as wide as the sampling gaps, hole filling, erosion) and passed to
    :func:`femur_landmarks_from_labels`. The points must sample the whole surface (e.g. the
    vertices of a mesh, or a surface scan); results carry about half a voxel of rasterisation
    error, more where the sampling is sparse (the closing rounds off concave corners).
    """
    pts = np.asarray(points_mm, dtype=np.float64).reshape(-1, 3)
    if len(pts) < 100 or not np.all(np.isfinite(pts)):
        raise DataError(f"a femur point cloud needs at least 100 finite points, got {len(pts)}")
    if not spacing_mm > 0:
        raise ValueError(f"spacing_mm must be > 0, not {spacing_mm}")
    from inference.geometry import VolumeGeometry

    margin = 4 * spacing_mm + 14.0
    lo = pts.min(axis=0) - margin
    size = np.ceil((pts.max(axis=0) + margin - lo) / spacing_mm).astype(int) + 1
    if np.prod(size) > 60_000_000:
        raise DataError(f"the point cloud spans {size * spacing_mm} mm; too large for a {spacing_mm} mm grid")
    geometry = VolumeGeometry(tuple(int(v) for v in size[::-1]), (spacing_mm,) * 3, tuple(lo))
    idx = np.round((pts - lo) / spacing_mm).astype(int)
    occupied = np.zeros(tuple(size[::-1]), dtype=bool)
    occupied[idx[:, 2], idx[:, 1], idx[:, 0]] = True
    # Dilate to close the gaps between samples, fill the enclosed inside, erode back.
    # Close the gaps between samples (a morphological closing as wide as the sampling gaps),
    # fill the enclosed inside, then erode back. The full 3x3x3 neighbourhood also closes diagonal
    # gaps, through which the outside would leak into the bone when filling.
    from scipy.spatial import cKDTree

    gap_mm = float(np.percentile(cKDTree(pts).query(pts, k=2)[0][:, 1], 99))
    iterations = max(1, int(np.ceil(0.75 * gap_mm / spacing_mm)))
    cube = np.ones((3, 3, 3), dtype=bool)
    while True:
        # Neighbour distances miss holes in uneven sampling (long thin triangles of a decimated
        # mesh); if the shell still leaks, close wider, up to 12 mm.
        shell = ndimage.binary_dilation(occupied, cube, iterations=iterations)
        filled = ndimage.binary_fill_holes(shell)
        solid = ndimage.binary_erosion(filled, cube, iterations=iterations, border_value=0)
        # A closed shell fills to the whole bone, several times the volume of the shell itself
        # (eroded back the same way); a leaking one fills nothing and stays a shell.
        layer = ndimage.binary_erosion(shell, cube, iterations=iterations, border_value=0)
        if solid.sum() >= 1.5 * max(int(layer.sum()), 1):
            break
        if 2 * iterations * spacing_mm > 12.0:
            raise DataError("the point cloud does not enclose a volume; it must sample a closed femur surface densely")
        iterations *= 2
    return femur_landmarks_from_labels(solid.astype(np.uint8), geometry, side, **kwargs)


# ----------------------------------------------------------------------------------------------
# An analytic femur-like shape with known landmarks (tests, demos, phantom checks)
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SyntheticFemur:
    """A right femur made of simple solids, with exactly known landmarks, in its canonical frame.

    Head sphere at the origin; shaft = vertical capped cylinder on the line ``x = -offset_mm,
    y = 0``; neck = cylinder from the head centre along the neck axis (which makes
    ``neck_shaft_angle_deg`` with the distal shaft axis and turns ``anteversion_deg`` towards
    anterior, -y); a greater trochanter sphere on top of the shaft laterally; a lesser trochanter
    sphere posteromedially on the shaft. Solids are blended with a smooth minimum of their signed
    distances and meshed with marching cubes.
    """

    head_radius_mm: float = 22.0
    offset_mm: float = 40.0
    neck_shaft_angle_deg: float = 130.0
    anteversion_deg: float = 10.0
    neck_radius_mm: float = 14.0
    shaft_radius_mm: float = 13.0
    shaft_length_mm: float = 160.0
    lesser_trochanter_depth_mm: float = 70.0
    lesser_trochanter_radius_mm: float = 7.0
    blend_mm: float = 3.0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not np.isfinite(value):
                raise ValueError(f"{f.name} must be finite, not {value}")
            if f.name not in ("anteversion_deg",) and value <= 0:
                raise ValueError(f"{f.name} must be > 0, not {value}")
        if not 95 <= self.neck_shaft_angle_deg <= 170:
            raise ValueError(f"neck_shaft_angle_deg must be in 95..170, not {self.neck_shaft_angle_deg}")

    @property
    def neck_direction(self) -> np.ndarray:
        """Unit neck axis from the neck towards the head."""
        theta, v = np.radians(self.neck_shaft_angle_deg), np.radians(self.anteversion_deg)
        return np.array([np.sin(theta) * np.cos(v), -np.sin(theta) * np.sin(v), -np.cos(theta)])

    @property
    def lesser_trochanter_centre_mm(self) -> np.ndarray:
        u = np.array([np.cos(np.radians(60.0)), np.sin(np.radians(60.0)), 0.0])
        return np.array([-self.offset_mm, 0.0, -self.lesser_trochanter_depth_mm]) + 0.8 * self.shaft_radius_mm * u

    @property
    def lesser_trochanter_tip_mm(self) -> np.ndarray:
        """Outermost point of the trochanter sphere in the posteromedial (60 deg) direction."""
        u = np.array([np.cos(np.radians(60.0)), np.sin(np.radians(60.0)), 0.0])
        return self.lesser_trochanter_centre_mm + self.lesser_trochanter_radius_mm * u

    @property
    def greater_trochanter_centre_mm(self) -> np.ndarray:
        return np.array([-self.offset_mm - 4.0, 3.0, -0.8 * self.head_radius_mm])

    @property
    def greater_trochanter_radius_mm(self) -> float:
        return 0.75 * self.head_radius_mm

    def signed_distance(self, points_mm: np.ndarray) -> np.ndarray:
        """Approximate signed distance (mm, negative inside) of the blended solids at points (..., 3)."""
        p = np.asarray(points_mm, dtype=np.float64)
        head = np.linalg.norm(p, axis=-1) - self.head_radius_mm
        n = self.neck_direction
        neck_end = -n * (self.offset_mm / max(np.hypot(n[0], n[1]), 1e-6))
        neck = _capsule_like_cylinder(p, np.zeros(3), neck_end, self.neck_radius_mm)
        top = self.greater_trochanter_centre_mm[2]
        shaft = _capsule_like_cylinder(
            p,
            np.array([-self.offset_mm, 0.0, top]),
            np.array([-self.offset_mm, 0.0, -self.shaft_length_mm]),
            self.shaft_radius_mm,
        )
        gt = np.linalg.norm(p - self.greater_trochanter_centre_mm, axis=-1) - self.greater_trochanter_radius_mm
        lt = np.linalg.norm(p - self.lesser_trochanter_centre_mm, axis=-1) - self.lesser_trochanter_radius_mm
        d = _smooth_min(shaft, gt, self.blend_mm)
        d = _smooth_min(d, neck, self.blend_mm)
        d = _smooth_min(d, lt, self.blend_mm)
        # The head joins the neck with a plain minimum so that the sphere stays exact.
        return np.minimum(d, head)

    def surface(self, spacing_mm: float = 1.0) -> Mesh:
        """Closed surface (marching cubes of the signed distance on a grid of ``spacing_mm``)."""
        from skimage.measure import marching_cubes

        r = self.head_radius_mm
        lo = np.array([-self.offset_mm - 4.0 - 0.75 * r - 3 * spacing_mm - 2, -r - 3 * spacing_mm - 2,
                       -self.shaft_length_mm - self.shaft_radius_mm - 3 * spacing_mm])
        hi = np.array([r + 3 * spacing_mm + 2, r + 3 * spacing_mm + 2, r + 3 * spacing_mm + 2])
        axes = [np.arange(lo[i], hi[i] + spacing_mm, spacing_mm) for i in range(3)]
        grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)
        sdf = self.signed_distance(grid)
        verts, faces, _, _ = marching_cubes(sdf, level=0.0, spacing=(spacing_mm,) * 3)
        mesh = Mesh(verts + lo, faces)
        return mesh if mesh.signed_volume_mm3() > 0 else mesh.flipped()


def _smooth_min(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Polynomial smooth minimum: a fillet of size ~k where two solids meet."""
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return b + (a - b) * h - k * h * (1.0 - h)


def _capsule_like_cylinder(p: np.ndarray, a: np.ndarray, b: np.ndarray, radius: float) -> np.ndarray:
    """Signed distance to a flat-capped cylinder with axis from a to b."""
    ab = b - a
    length = np.linalg.norm(ab)
    axis = ab / length
    rel = p - a
    t = rel @ axis
    radial = np.linalg.norm(rel - t[..., None] * axis, axis=-1) - radius
    along = np.abs(t - 0.5 * length) - 0.5 * length
    outside = np.linalg.norm(np.stack([np.maximum(radial, 0), np.maximum(along, 0)]), axis=0)
    return outside + np.minimum(np.maximum(radial, along), 0.0)
