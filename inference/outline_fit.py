"""The reconstruction's outlines fitted to the masks: a smooth 3D move read off the silhouette rims.

Why
---
Each confirmed mask is the femur's outline in its view, and the true femur projects onto the
masks almost exactly (a held-out JIA phantom 40 deg apart: silhouette Dice 0.992 in both views).
After the network, the shaft fit (:mod:`inference.shaft_fit`) and the head anchor
(:mod:`inference.head_anchor`) the reconstruction's own silhouettes still disagreed with the
masks: Dice 0.966-0.983 on eight pairs 40 deg apart (session 19, the kept outputs of
docs/results/head-anchor), where the greater trochanter sat up to 8 mm from where it belongs, a
part neither earlier step corrects.

What
----
:func:`fit_outline` works in :data:`ROUNDS` rounds. In each, per view, it projects the femur (its
0.5 mm path-length level, as :mod:`inference.silhouettes` draws outlines) and reads, for every
boundary voxel of the femur that projects onto that silhouette's edge (within :data:`RIM_VOXELS`
voxels inside it: the *rim* that draws the outline), how far along the outline's outward normal
the mask's outline lies (pixels, from the signed distance maps of both outlines). Each rim voxel
at X gives one linear equation on the 3D move d there: ``n . J(X) d(X) = -distance``, J the
projection's derivative (pixels per mm) and n the outline's normal. The move d is a trilinear
field on a lattice of :data:`LATTICE_MM`; its nodes solve those equations in the least-squares
sense with first differences between neighbouring nodes (:data:`SMOOTHNESS`) and a weak pull
towards zero (:data:`SHRINK`), which leaves unmoved what no view sees. Distances are clipped to
:data:`MAX_DISTANCE_MM`. Rims are not read within :data:`BORDER_PX` of the detector's edge (the
film cuts the femur and its mask there) nor within :data:`FACE_MARGIN_MM` of the grid's faces
(the field of view cuts the femur there, and the mask goes on).

:func:`apply_outline_fit` moves the voxels near the femur's boundary by all rounds' fields in one
pull-back (linear), like the shaft fit and the head anchor; the femur label is the moved soft
indicator's 0.5 level.

The fit believes the masks: a mask that misses part of the femur or adds soft tissue draws the
reconstruction with it. Below :data:`MIN_AGREEMENT` no fit is made, moves past
:data:`MAX_MOVE_MM` are refused, and past :data:`WARN_MOVE_MM` the registration warns
(:mod:`inference.pipeline`).

Measured (session 19, docs/results/outline-fit): see the report there.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Sequence

import numpy as np

from inference.fullres import grown_box, near_boundary, pull_back_voxels
from inference.mask_proposal import label_points
from inference.silhouettes import mask_agreement
from inference.workers import thread_map

log = logging.getLogger(__name__)

#: Rounds of reading the rims and fitting the move, each from the femur the last one moved.
ROUNDS = 2
#: Spacing of the move's lattice (mm).
LATTICE_MM = 15.0
#: Weight of the first differences between neighbouring lattice nodes ...
SMOOTHNESS = 1.0
#: ... and of the nodes' own size, relative to 1,000 rim equations.
SHRINK = 0.05
#: Distances between the outlines beyond this (mm at the rim) are read as this.
MAX_DISTANCE_MM = 8.0
#: Rims projecting within this many pixels of the detector's edge are not read ...
BORDER_PX = 3.0
#: ... nor those within this distance (mm) of the grid's faces, where the field of view cuts the
#: femur (the mask goes on: it shows more shaft than the atlas holds).
FACE_MARGIN_MM = 3.0
#: Boundary voxels whose projection lies within this many voxel sizes (and half a pixel) inside
#: the silhouette's edge draw the outline (the silhouette's level lies about half a voxel beyond
#: the outermost voxel centres, and its splatting blurs it by up to another voxel).
RIM_VOXELS = 1.5
#: The fewest rim voxels per view for a fit.
MIN_RIM = 200
#: Below this silhouette Dice with a mask, the two disagree too much for the outlines to be read
#: against each other (a wrong mask or a failed registration): no fit.
MIN_AGREEMENT = 0.8
#: A fit that would move the femur's boundary farther than this (mm) is refused ...
MAX_MOVE_MM = 15.0
#: ... and one that moves it farther than this is made, with a warning to check the masks.
WARN_MOVE_MM = 6.0
#: The silhouette's level (path length through the femur, mm), as the overlays draw it.
OUTLINE_MM = 0.5
#: The move's reach at a voxel is taken as its own move there plus this (mm): the field changes
#: little over a few millimetres.
REACH_MARGIN_MM = 1.0
#: Largest number of rim equations per view (more are thinned evenly).
MAX_RIM_PER_VIEW = 20_000


class Refusal(str):
    """Why :func:`fit_outline` made no fit (the text, for report.json). ``check_masks``: the masks
    disagree with the reconstruction so that they may be wrong; the registration warns then."""

    check_masks: bool

    def __new__(cls, text: str, *, check_masks: bool = False) -> "Refusal":
        refusal = super().__new__(cls, text)
        refusal.check_masks = check_masks
        return refusal


@dataclasses.dataclass(frozen=True)
class Lattice:
    """A trilinear move field: ``nodes_xyz3[a, b, c]`` is the move (mm) at ``origin_mm + (a, b, c) * spacing_mm``."""

    origin_mm: np.ndarray
    spacing_mm: float
    nodes_xyz3: np.ndarray

    def at(self, points_mm: np.ndarray) -> np.ndarray:
        """(N, 3) moves at ``points_mm`` (N, 3); the edge nodes' values beyond the lattice."""
        from scipy import ndimage

        f = ((np.asarray(points_mm, float) - self.origin_mm) / self.spacing_mm).T
        return np.stack(thread_map(lambda c: ndimage.map_coordinates(self.nodes_xyz3[..., c], f, order=1,
                                                                     mode="nearest"), range(3)), 1)


@dataclasses.dataclass(frozen=True)
class OutlineFit:
    """The rounds' move fields (in order) and what the fit read and did."""

    rounds: tuple[Lattice, ...]
    rim_counts: dict[str, int]
    agreement_before: dict[str, float]
    max_move_mm: float
    mean_move_mm: float

    def source_points(self, points_mm: np.ndarray) -> np.ndarray:
        """Where the moved femur's points ``points_mm`` come from."""
        return _source_points(self.rounds, points_mm)

    def report_entry(self) -> dict[str, Any]:
        """JSON-friendly summary for report.json."""
        return {"used": True, "rounds": len(self.rounds), "rim_voxels": dict(self.rim_counts),
                "mask_agreement_before": dict(self.agreement_before),
                "max_move_mm": self.max_move_mm, "mean_move_mm": self.mean_move_mm}


def _source_points(rounds: Sequence[Lattice], points_mm: np.ndarray) -> np.ndarray:
    """Where the points ``points_mm`` of the femur moved by ``rounds`` come from (the pull-back:
    the last round's move undone first)."""
    source = np.asarray(points_mm, float)
    for lattice in reversed(list(rounds)):
        source = source - lattice.at(source)
    return source


def _moves(rounds: Sequence[Lattice], points_mm: np.ndarray) -> np.ndarray:
    """How far (mm) each of ``points_mm`` is moved by ``rounds`` (its pull-back distance)."""
    return np.linalg.norm(_source_points(rounds, points_mm) - points_mm, axis=1)


def _projection_jacobian(P: np.ndarray, points_mm: np.ndarray) -> np.ndarray:
    """(N, 2, 3): d(u, v)/d(x, y, z) of ``P`` at ``points_mm``."""
    P = np.asarray(P, float)
    h = points_mm @ P[:, :3].T + P[:, 3]
    w = h[:, 2][:, None, None]
    return (P[None, :2, :3] * w - h[:, :2, None] * P[None, 2:3, :3]) / w ** 2


def _signed_distance(inside: np.ndarray) -> np.ndarray:
    """Pixels from the outline of ``inside``: positive outside, negative inside."""
    from scipy import ndimage

    return (ndimage.distance_transform_edt(~inside) - ndimage.distance_transform_edt(inside)).astype(np.float32)


def _silhouette(femur_points: np.ndarray, grid, P: np.ndarray, shape_hw) -> np.ndarray:
    """The silhouette (bool, ``shape_hw`` pixels) at the overlays' path-length level of the femur
    whose voxel centres are ``femur_points`` (:func:`inference.mask_proposal.label_points`)."""
    from inference.mask_proposal import project_label

    return project_label(None, grid, P, shape_hw, points=femur_points) >= OUTLINE_MM


def _boundary_points(femur: np.ndarray, grid) -> np.ndarray:
    """World points (N, 3) of the femur's voxels that have a neighbour outside it (6-connected),
    except within :data:`FACE_MARGIN_MM` of the grid's faces: where the field of view cuts the
    femur, its outline is the cut's, not the bone's."""
    from scipy import ndimage

    box = ndimage.find_objects(femur.astype(np.uint8))[0]
    box = tuple(slice(max(b.start - 1, 0), b.stop + 1) for b in box)
    part = femur[box]
    k, j, i = (c + b.start for c, b in zip(np.nonzero(part & ~ndimage.binary_erosion(part, border_value=1)), box))
    margin = np.ceil(FACE_MARGIN_MM / np.asarray(grid.spacing_xyz_mm, float)[::-1]).astype(int)
    keep = np.ones(len(k), bool)
    for index, m, n in zip((k, j, i), margin, femur.shape):
        keep &= (index >= m) & (index <= n - 1 - m)
    k, j, i = k[keep], j[keep], i[keep]
    i2w = np.asarray(grid.index_to_world(), float)
    return np.stack([i, j, k], 1).astype(np.float64) @ i2w[:3, :3].T + i2w[:3, 3]


def _rim_equations(femur_points: np.ndarray, points: np.ndarray, grid, P: np.ndarray, mask: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """For one view: the rim points (M, 3) among the boundary ``points``, their rows ``n . J``
    (M, 3, pixels per mm), the right-hand sides (M, pixels), and the agreement with the mask
    (Dice) of the silhouette of the femur whose voxel centres are ``femur_points``."""
    from scipy import ndimage

    from inference.geometry import project_points

    rows, cols = mask.shape
    silhouette = _silhouette(femur_points, grid, P, mask.shape)
    agreement = mask_agreement(silhouette, mask) or 0.0
    uv = project_points(P, points)
    inside = ((uv[:, 0] >= BORDER_PX) & (uv[:, 0] <= cols - 1 - BORDER_PX)
              & (uv[:, 1] >= BORDER_PX) & (uv[:, 1] <= rows - 1 - BORDER_PX))
    points, uv = points[inside], uv[inside]
    if len(points) == 0:
        return points, np.zeros((0, 3)), np.zeros(0), agreement
    # Work in the box that holds both outlines (and a margin for the distances).
    margin = 40
    ys, xs = np.nonzero(silhouette | mask)
    if len(ys) == 0:
        return points[:0], np.zeros((0, 3)), np.zeros(0), agreement
    r0, r1 = max(ys.min() - margin, 0), min(ys.max() + margin + 1, rows)
    c0, c1 = max(xs.min() - margin, 0), min(xs.max() + margin + 1, cols)
    ours = _signed_distance(silhouette[r0:r1, c0:c1])
    theirs = _signed_distance(mask[r0:r1, c0:c1])
    smooth = ndimage.gaussian_filter(ours, 1.0)
    grad_v, grad_u = np.gradient(smooth)
    at = [uv[:, 1] - r0, uv[:, 0] - c0]
    depth = ndimage.map_coordinates(ours, at, order=1, mode="nearest")
    J = _projection_jacobian(P, points)
    px_per_mm = np.linalg.norm(J, axis=(1, 2)) / np.sqrt(2.0)
    # the rim: within RIM_VOXELS voxels (projected) inside the silhouette's edge
    rim = depth >= -(RIM_VOXELS * float(max(grid.spacing_xyz_mm)) * px_per_mm + 0.5)
    points, uv, J, depth, px_per_mm = points[rim], uv[rim], J[rim], depth[rim], px_per_mm[rim]
    at = [a[rim] for a in at]
    normal = np.stack([ndimage.map_coordinates(grad_u, at, order=1, mode="nearest"),
                       ndimage.map_coordinates(grad_v, at, order=1, mode="nearest")], 1)
    length = np.linalg.norm(normal, axis=1)
    ok = length > 1e-3
    normal = normal[ok] / length[ok, None]
    points, J, depth, px_per_mm = points[ok], J[ok], depth[ok], px_per_mm[ok]
    at = [a[ok] for a in at]
    # how far outside the mask's outline our outline lies there (pixels; < 0: inside it)
    distance = ndimage.map_coordinates(theirs, at, order=1, mode="nearest") - depth
    limit = MAX_DISTANCE_MM * px_per_mm
    distance = np.clip(distance, -limit, limit)
    if len(points) > MAX_RIM_PER_VIEW:
        keep = np.linspace(0, len(points) - 1, MAX_RIM_PER_VIEW).astype(int)
        points, J, normal, distance = points[keep], J[keep], normal[keep], distance[keep]
    rows_3 = np.einsum("ni,nij->nj", normal, J)
    return points, rows_3, -distance, agreement


def _view_rims(femur_points: np.ndarray, points: np.ndarray, grid, projections: Sequence[np.ndarray],
               masks: Sequence[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, float]]:
    """:func:`_rim_equations` of every view, the views side by side (:mod:`inference.workers`)."""
    return thread_map(lambda view: _rim_equations(femur_points, points, grid, np.asarray(view[0], float), view[1]),
                      list(zip(projections, masks)))


def _solve_lattice(points: np.ndarray, rows_3: np.ndarray, rhs: np.ndarray) -> Lattice:
    """The trilinear field whose moves at ``points`` best satisfy ``rows_3 . d = rhs`` (see the
    module docstring)."""
    from scipy import sparse
    from scipy.sparse.linalg import lsqr

    h = LATTICE_MM
    origin = points.min(0) - h
    shape = tuple(int(v) for v in np.ceil((points.max(0) + h - origin) / h).astype(int) + 1)
    n_nodes = int(np.prod(shape))
    f = (points - origin) / h
    base = np.floor(f).astype(int)
    t = f - base
    n = len(points)
    weight = 1.0 / np.sqrt(max(n, 1) / 1000.0)  # the data term per 1,000 equations
    rows, columns, values = [], [], []
    for corner in np.ndindex(2, 2, 2):
        w = np.prod([t[:, a] if c else 1 - t[:, a] for a, c in enumerate(corner)], axis=0)
        node = np.ravel_multi_index(tuple(base[:, a] + c for a, c in enumerate(corner)), shape)
        for c in range(3):
            rows.append(np.arange(n))
            columns.append(node * 3 + c)
            values.append(weight * w * rows_3[:, c])
    blocks = [sparse.csr_matrix((np.concatenate(values), (np.concatenate(rows), np.concatenate(columns))),
                                shape=(n, 3 * n_nodes))]
    index = np.arange(n_nodes).reshape(shape)
    for axis in range(3):
        a = np.take(index, np.arange(shape[axis] - 1), axis=axis).ravel()
        b = np.take(index, np.arange(1, shape[axis]), axis=axis).ravel()
        m = len(a)
        for c in range(3):
            blocks.append(sparse.csr_matrix(
                (np.sqrt(SMOOTHNESS) * np.r_[np.ones(m), -np.ones(m)], (np.r_[np.arange(m), np.arange(m)],
                                                                         np.r_[3 * a + c, 3 * b + c])),
                shape=(m, 3 * n_nodes)))
    blocks.append(np.sqrt(SHRINK) * sparse.identity(3 * n_nodes, format="csr"))
    A = sparse.vstack(blocks, format="csr")
    b = np.zeros(A.shape[0])
    b[:n] = weight * rhs
    solution = lsqr(A, b, atol=1e-6, btol=1e-6, iter_lim=2000)[0]
    return Lattice(origin, h, solution.reshape(shape + (3,)))


def _moved_femur(soft: np.ndarray, grid, fit_rounds: Sequence[Lattice], reach_mm: float) -> np.ndarray:
    """The femur (soft indicator >= 0.5) after ``fit_rounds``."""
    moved = _pull_back([soft], grid, fit_rounds, reach_mm)[0]
    return moved >= 0.5


def _pull_back(volumes: Sequence[np.ndarray], grid, fit_rounds: Sequence[Lattice], reach_mm: float
               ) -> list[np.ndarray]:
    outputs = [np.array(v, np.float32, copy=True) for v in volumes]
    femur = np.asarray(volumes[0]) > 0
    if not femur.any() or not fit_rounds:
        return outputs
    spacing_zyx = np.asarray(grid.spacing_xyz_mm, float)[::-1]
    lo, hi = grown_box(np.nonzero(femur), reach_mm, spacing_zyx, femur.shape)
    i2w = np.asarray(grid.index_to_world(), np.float64)
    kji_to_world = np.ascontiguousarray(i2w[:3, :3][:, ::-1].T)  # rows: the world step of k, j, i

    def world(kji: np.ndarray) -> np.ndarray:
        return kji @ kji_to_world + i2w[:3, 3]

    def reach_at(centres_kji: np.ndarray) -> np.ndarray:
        return _moves(fit_rounds, world(centres_kji)) + REACH_MARGIN_MM

    k, j, i = near_boundary(femur, lo, hi, reach_mm, spacing_zyx, reach_at=reach_at)
    source = _source_points(fit_rounds, world(np.stack([k, j, i], 1).astype(np.float64)))
    pull_back_voxels(outputs, volumes, (k, j, i), source, grid)
    return outputs


def fit_outline(soft: np.ndarray, grid, projections: Sequence[np.ndarray], masks: Sequence[np.ndarray | None],
                view_names: Sequence[str] | None = None) -> tuple[OutlineFit | None, str]:
    """Fit the femur's outlines to the masks (see the module docstring).

    Parameters
    ----------
    soft : the reconstruction's soft femur indicator (the femur where >= 0.5) on ``grid``
        (registration frame)
    projections, masks : per view, P (world mm -> pixels) and the femur mask (bool, the
        radiograph's pixels)

    Returns ``(fit, "fitted")``, or None and why no fit was made (a :class:`Refusal`).
    """
    if len(masks) < 2 or any(m is None for m in masks):
        return None, Refusal("needs two views with masks")
    names = [view_names[i] if view_names is not None else f"view {i}" for i in range(len(masks))]
    masks = [np.asarray(m) > 0 for m in masks]
    femur = np.asarray(soft) >= 0.5
    if not femur.any():
        return None, Refusal("the reconstruction has no femur")
    rounds: list[Lattice] = []
    counts: dict[str, int] = {}
    before: dict[str, float] = {}
    reach = 0.0
    boundary = points = _boundary_points(femur, grid)  # the femur's own boundary, then the moved one's
    for round_index in range(ROUNDS):
        if round_index:
            points = _boundary_points(femur, grid)
        equations = []
        femur_points = label_points(femur, grid)  # splatted into each view
        for name, (rim, rows_3, rhs, agreement) in zip(names, _view_rims(femur_points, points, grid, projections,
                                                                        masks)):
            if round_index == 0:
                before[name], counts[name] = agreement, len(rim)
                if agreement < MIN_AGREEMENT:
                    return None, Refusal(f"view '{name}': the reconstruction's outline and the mask disagree too much "
                                         f"to be fitted (Dice {agreement:.2f}); not fitted: check the mask",
                                         check_masks=True)
            equations.append((rim, rows_3, rhs))
        if any(len(e[0]) < MIN_RIM for e in equations):
            if not rounds:
                return None, Refusal(f"the masks show too little of the femur's outline ({min(counts.values())} rim "
                                     "voxels)")
            break
        lattice = _solve_lattice(*(np.concatenate(parts) for parts in zip(*equations)))
        rounds.append(lattice)
        reach = max(reach, float(_moves(rounds, points).max()))
        if reach > MAX_MOVE_MM:
            return None, Refusal(f"the masks' outlines lie up to {reach:.0f} mm from the reconstruction's; not "
                                 "fitted: check that the masks follow the femur", check_masks=True)
        if round_index + 1 < ROUNDS:
            femur = _moved_femur(soft, grid, rounds, reach)
    moves = _moves(rounds, boundary)
    fit = OutlineFit(tuple(rounds), counts, before, float(moves.max()), float(moves.mean()))
    log.info("outline fit: %d rounds, moves mean %.2f / max %.2f mm, mask agreement before %s", len(rounds),
             fit.mean_move_mm, fit.max_move_mm, before)
    return fit, "fitted"


def apply_outline_fit(fit: OutlineFit, grid, *volumes: np.ndarray) -> list[np.ndarray]:
    """``volumes`` (on ``grid``; the first is the soft femur indicator) moved by ``fit``: each voxel
    within reach of the femur's boundary takes its value from where the fit brings it from
    (linear interpolation); the rest are copied. New float32 arrays, in order."""
    return _pull_back(volumes, grid, fit.rounds, fit.max_move_mm)
