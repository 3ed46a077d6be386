"""Femur mask editing, without Qt (the mask editor view calls these).

Masks are ``(rows, cols)`` bool arrays on the radiograph's pixel grid (``u`` = column, ``v`` = row,
pixel centre of (0, 0) at (0, 0), as in ``docs/case-format.md``). Every edit returns a
:class:`MaskEdit` holding the changed rectangle before and after, so the GUI's undo stack stores a
few kilobytes per stroke rather than two whole images.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["MaskEdit", "paint_segment", "fill_polygon", "edit_between", "apply_edit"]


@dataclasses.dataclass(frozen=True, eq=False)
class MaskEdit:
    """A rectangular change of a mask: ``mask[rows, cols]`` went from ``before`` to ``after``."""

    row0: int
    col0: int
    before: np.ndarray
    after: np.ndarray

    @property
    def region(self) -> tuple[slice, slice]:
        rows, cols = self.before.shape
        return slice(self.row0, self.row0 + rows), slice(self.col0, self.col0 + cols)

    @property
    def changed_pixels(self) -> int:
        return int(np.count_nonzero(self.before != self.after))


def _clip_box(shape: tuple[int, int], r0: float, r1: float, c0: float, c1: float) -> tuple[int, int, int, int] | None:
    rows, cols = shape
    r0i, r1i = max(0, int(np.floor(r0))), min(rows, int(np.ceil(r1)) + 1)
    c0i, c1i = max(0, int(np.floor(c0))), min(cols, int(np.ceil(c1)) + 1)
    if r0i >= r1i or c0i >= c1i:
        return None
    return r0i, r1i, c0i, c1i


def paint_segment(mask: np.ndarray, start_uv: tuple[float, float], end_uv: tuple[float, float],
                  radius_px: float, value: bool) -> MaskEdit | None:
    """Paint (``value=True``, brush) or erase (``False``) a round-tipped stroke in place.

    The stroke is every pixel whose centre lies within ``radius_px`` of the segment from
    ``start_uv`` to ``end_uv`` (a capsule): consecutive mouse positions of a fast drag are far
    apart, and painting only discs at the positions would leave gaps.

    Returns the edit (None when no pixel of the image is touched).
    """
    radius = max(float(radius_px), 0.5)
    u0, v0 = map(float, start_uv)
    u1, v1 = map(float, end_uv)
    box = _clip_box(mask.shape, min(v0, v1) - radius, max(v0, v1) + radius,
                    min(u0, u1) - radius, max(u0, u1) + radius)
    if box is None:
        return None
    r0, r1, c0, c1 = box
    vv, uu = np.mgrid[r0:r1, c0:c1].astype(np.float64)
    du, dv = u1 - u0, v1 - v0
    length2 = du * du + dv * dv
    if length2 > 0:
        t = np.clip(((uu - u0) * du + (vv - v0) * dv) / length2, 0.0, 1.0)
    else:
        t = np.zeros_like(uu)
    distance2 = (uu - (u0 + t * du)) ** 2 + (vv - (v0 + t * dv)) ** 2
    inside = distance2 <= radius * radius
    before = mask[r0:r1, c0:c1].copy()
    mask[r0:r1, c0:c1][inside] = bool(value)
    return MaskEdit(r0, c0, before, mask[r0:r1, c0:c1].copy())


def polygon_pixels(shape: tuple[int, int], points_uv: np.ndarray) -> tuple[tuple[int, int, int, int], np.ndarray] | None:
    """Pixels whose centres lie inside a polygon: ``(box, inside)`` with ``inside`` on the box."""
    points = np.asarray(points_uv, dtype=np.float64).reshape(-1, 2)
    if len(points) < 3:
        return None
    box = _clip_box(shape, points[:, 1].min(), points[:, 1].max(), points[:, 0].min(), points[:, 0].max())
    if box is None:
        return None
    r0, r1, c0, c1 = box
    vv, uu = np.mgrid[r0:r1, c0:c1].astype(np.float64)
    # Even-odd crossing test with half-open edges, vectorised over the box: a horizontal ray
    # from each pixel centre to +u crosses edge (a, b) when the pixel's v lies in [va, vb).
    inside = np.zeros(uu.shape, dtype=bool)
    a = points
    b = np.roll(points, -1, axis=0)
    for (ua, va), (ub, vb) in zip(a, b):
        if va == vb:
            continue
        straddles = (va <= vv) != (vb <= vv)
        u_cross = ua + (vv - va) * (ub - ua) / (vb - va)
        inside ^= straddles & (uu < u_cross)
    return (r0, r1, c0, c1), inside


def fill_polygon(mask: np.ndarray, points_uv: np.ndarray, value: bool) -> MaskEdit | None:
    """Set every pixel inside the polygon (vertices ``(N, 2)`` as ``(u, v)``) to ``value``, in place."""
    found = polygon_pixels(mask.shape, points_uv)
    if found is None:
        return None
    (r0, r1, c0, c1), inside = found
    before = mask[r0:r1, c0:c1].copy()
    mask[r0:r1, c0:c1][inside] = bool(value)
    return MaskEdit(r0, c0, before, mask[r0:r1, c0:c1].copy())


def edit_between(before: np.ndarray, after: np.ndarray) -> MaskEdit | None:
    """The smallest rectangular edit that turns ``before`` into ``after`` (None if equal).

    Used to fold a whole brush stroke (many segments) into one undo step.
    """
    if before.shape != after.shape:
        raise ValueError(f"mask shapes differ: {before.shape} and {after.shape}")
    changed = before != after
    rows = np.flatnonzero(changed.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(changed.any(axis=0))
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    return MaskEdit(int(r0), int(c0), before[r0:r1, c0:c1].copy(), after[r0:r1, c0:c1].copy())


def apply_edit(mask: np.ndarray, edit: MaskEdit, *, undo: bool = False) -> None:
    """Write the edit's ``after`` (or ``before`` when ``undo``) into ``mask`` in place."""
    mask[edit.region] = edit.before if undo else edit.after
