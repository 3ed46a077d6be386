"""The femoral shaft fitted to the masks: each cross-section's centre and width from the outlines.

Why
---
The network reads the shaft's outline less well than the head's. On held-out JIA phantoms
(session 17) the reconstruction's shaft was 5 % thin on average (up to 11 %) and off-centre by
about a millimetre, while the head and neck were right; its projection was 2-9 pixels narrower
than the confirmed masks. Yet the diaphysis is nearly a straight tube, and two masks fix each of
its cross-sections' position and width along two directions.

What
----
:func:`fit_shaft` walks up the reconstruction's shaft axis in steps of :data:`STEP_MM`, from the
bottom of the femur to :data:`FADE_ZERO_ABOVE_LT_MM` above the lesser trochanter. At each height
it projects the axis point into every view and reads, along the image line across the projected
axis, where the mask's outline lies and where the reconstruction's projection (its 0.5 mm
path-length level, as :mod:`inference.silhouettes` draws it) lies. Per view that gives a centre
difference in pixels and a width ratio. With two views these fix the cross-section's shift within
its plane (two equations, two unknowns, through each view's projection derivative) and its
scaling along the two directions the views see. The profiles along the shaft are median filtered
and smoothed (:data:`SMOOTHING_MM`), limited to :data:`MAX_SHIFT_MM` and :data:`MAX_WIDTH_CHANGE`,
faded out above the lesser trochanter (the trochanters, neck and head are kept) and above the
heights the masks show. Below the lowest height they show (a radiograph that ends above the bottom
of the atlas's field of view), the network has nothing to read and its shaft may bend away; there
each cross-section's centre is brought to within :data:`STRAIGHTENING_TOLERANCE_MM` of the straight
line through the fitted centres just above (:func:`_continue_straight`).

:func:`apply_shaft_fit` moves every voxel near the shaft accordingly (pull-back, linear
interpolation) in the soft femur indicator and the warped intensities; the label map is the
indicator's 0.5 level again. Heights along the shaft never change, so the femur's length and the
lesser trochanter's height are the network's.

Measured (session 17, docs/results/shaft-fit): see the report there.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Sequence

import numpy as np

from inference.data.shape import _ramp, _unit  # _ramp: the shape modes' C2 fade, 0 at its first argument, 1 at its second
from inference.fullres import grown_box, near_boundary, pull_back_voxels
from inference.geometry import project_points
from inference.workers import thread_map

log = logging.getLogger(__name__)

#: Spacing of the heights read along the shaft axis (mm).
STEP_MM = 1.0
#: Gaussian smoothing of the profiles along the shaft (sd, mm), after a median over MEDIAN_MM.
SMOOTHING_MM = 6.0
MEDIAN_MM = 5.0
#: The correction is whole this far below the lesser trochanter's tip and gone this far above it.
FADE_FULL_BELOW_LT_MM = 10.0
FADE_ZERO_ABOVE_LT_MM = 20.0
#: ... and fades out over this length beyond the heights the masks show (below the lowest of them
#: the width's change fades so, but the shift is replaced: :func:`_continue_straight`).
FADE_BEYOND_OBSERVED_MM = 20.0
#: Below the lowest height the masks show, the cross-sections' centres are brought towards the
#: straight line through the fitted centres of this length of shaft above it ...
STRAIGHT_FROM_MM = 40.0
#: ... leaving a centre within this distance of the line where it is (the line's own error after
#: 20-35 mm of extrapolation: session 18 measured up to 1.5 mm) and bringing one farther away to
#: this distance, ...
STRAIGHTENING_TOLERANCE_MM = 1.5
#: ... moving it by at most this much.
MAX_STRAIGHTENING_MM = 12.0
#: Gaussian smoothing (sd, mm) of those moves along the shaft.
CENTRE_SMOOTHING_MM = 2.0
#: Largest shift of a cross-section (mm) and largest relative change of its width.
MAX_SHIFT_MM = 4.0
MAX_WIDTH_CHANGE = 0.15
#: How far across the projected axis the outlines are looked for (mm at the axis, each side).
SEARCH_MM = 45.0
#: Views whose width directions are closer than this (deg) cannot separate the two directions.
MIN_VIEW_SEPARATION_DEG = 25.0
#: The fewest heights with both outlines read for a fit.
MIN_HEIGHTS = 15
#: Sampling step along the lines across the projected axis (pixels).
PROFILE_STEP_PX = 0.25
#: Path length (mm) of the reconstruction's outline, as the silhouettes and the mask agreement.
OUTLINE_MM = 0.5


@dataclasses.dataclass(frozen=True)
class ShaftFit:
    """The correction of the shaft's cross-sections (registration frame, mm).

    ``heights_mm`` are positions along ``axis_direction`` from ``axis_point_mm``; per height,
    ``shift_mm`` (2 components in the plane basis ``basis``), ``matrices`` (2 x 2, the
    cross-section's scaling in that basis) and ``weights`` (the fades, already applied to both);
    ``width_factors`` are each view's smoothed width ratio (mask over reconstruction) before the
    fades; ``observed`` says which heights both views' outlines were read at.
    """

    axis_point_mm: np.ndarray
    axis_direction: np.ndarray
    basis: np.ndarray  # (2, 3) orthonormal, perpendicular to the axis
    heights_mm: np.ndarray
    shift_mm: np.ndarray
    matrices: np.ndarray
    weights: np.ndarray
    width_factors: np.ndarray
    observed: np.ndarray
    view_names: tuple[str, ...]
    #: heights below the lowest one the masks show whose centres were put on the straight line
    continued: np.ndarray | None = None

    def report_entry(self) -> dict[str, Any]:
        """JSON-friendly summary for report.json."""
        full = self.weights >= 0.999
        shift = np.linalg.norm(self.shift_mm, axis=1)
        continued = self.continued if self.continued is not None else np.zeros(len(shift), bool)
        full &= ~continued
        return {
            "used": True,
            "heights": int(self.observed.sum()),
            "shaft_length_mm": float(np.ptp(self.heights_mm[self.observed])) if self.observed.any() else 0.0,
            "mean_shift_mm": float(shift[full].mean()) if full.any() else 0.0,
            "max_shift_mm": float(shift[~continued].max()) if (~continued).any() else 0.0,
            "continued_below_mm": float(continued.sum() * STEP_MM),
            "max_continued_shift_mm": float(shift[continued].max()) if continued.any() else 0.0,
            "mean_width_factor": {name: float(self.width_factors[full, i].mean()) if full.any() else 1.0
                                  for i, name in enumerate(self.view_names)},
        }


def _outline_edges(profile: np.ndarray, inside_limit: int) -> tuple[float, float] | None:
    """Sub-sample positions where ``profile`` crosses 0.5 on both sides of its middle sample (the
    run of values >= 0.5 that holds the middle, or the nearest one); None when that run reaches
    the profile's ends or ``inside_limit`` samples from them (the outline is not seen whole)."""
    above = profile >= 0.5
    if not above.any():
        return None
    middle = len(profile) // 2
    idx = np.nonzero(above)[0]
    runs = np.split(idx, np.nonzero(np.diff(idx) > 1)[0] + 1)
    run = min(runs, key=lambda r: 0 if r[0] <= middle <= r[-1] else min(abs(r[0] - middle), abs(r[-1] - middle)))
    lo, hi = int(run[0]), int(run[-1])
    if lo <= inside_limit or hi >= len(profile) - 1 - inside_limit:
        return None

    def crossing(i_out: int, i_in: int) -> float:
        a, b = profile[i_out], profile[i_in]
        return i_out + (0.5 - a) / (b - a) * (i_in - i_out) if b != a else float(i_in)

    return crossing(lo - 1, lo), crossing(hi + 1, hi)


def _profile(image: np.ndarray, centre_uv: np.ndarray, normal_uv: np.ndarray, half_px: float,
             step_px: float) -> np.ndarray:
    """Bilinear samples of ``image`` (float32) along ``centre + s normal``, s in [-half, half]; NaN
    outside the image."""
    from scipy import ndimage

    s = np.arange(-half_px, half_px + step_px / 2, step_px)
    uv = centre_uv[None, :] + s[:, None] * normal_uv[None, :]
    rows, cols = image.shape
    inside = (uv[:, 0] >= 0) & (uv[:, 0] <= cols - 1) & (uv[:, 1] >= 0) & (uv[:, 1] <= rows - 1)
    values = ndimage.map_coordinates(image, [uv[:, 1], uv[:, 0]], order=1, mode="nearest")
    return np.where(inside, values, np.nan)


def _smooth(values: np.ndarray, valid: np.ndarray, step_mm: float) -> np.ndarray:
    """Median then Gaussian smoothing along the heights; invalid heights take their neighbours'."""
    from scipy import ndimage

    index = np.arange(len(values))
    filled = np.stack([np.interp(index, index[valid], values[valid, c]) for c in range(values.shape[1])], 1)
    size = max(1, int(round(MEDIAN_MM / step_mm)) | 1)
    filled = ndimage.median_filter(filled, size=(size, 1), mode="nearest")
    return ndimage.gaussian_filter1d(filled, SMOOTHING_MM / step_mm, axis=0, mode="nearest")


def fit_shaft(labels: np.ndarray, grid, projections: Sequence[np.ndarray], masks: Sequence[np.ndarray | None],
              axis_point_mm, axis_direction, lesser_trochanter_mm, view_names: Sequence[str] | None = None,
              label: int = 1) -> tuple[ShaftFit | None, str]:
    """Fit the shaft's cross-sections to the masks (see the module docstring).

    Parameters
    ----------
    labels, grid : the reconstruction's label map and its grid (registration frame)
    projections, masks : per view, P (world mm -> pixels) and the femur mask (bool, the radiograph's
        pixels; None: the view is not used)
    axis_point_mm, axis_direction : the reconstruction's shaft axis, its direction towards the hip
    lesser_trochanter_mm : its tip; the fit fades out above it

    Returns ``(fit, reason)``: the fit, or None and why none was made.
    """
    from inference.mask_proposal import label_points, project_label

    used = [i for i, m in enumerate(masks) if m is not None]
    if len(used) < 2:
        return None, "needs two views with masks"
    names = tuple(view_names[i] if view_names is not None else f"view {i}" for i in used)
    femur = labels == label
    if not femur.any():
        return None, "the reconstruction has no femur"
    a0 = np.asarray(axis_point_mm, float)
    lt = np.asarray(lesser_trochanter_mm, float)
    d = _unit(axis_direction)
    i2w = np.asarray(grid.index_to_world(), float)
    kk, jj, ii = np.nonzero(femur)
    stride = max(1, len(kk) // 200_000)
    points = (np.c_[ii[::stride], jj[::stride], kk[::stride], np.ones(len(kk[::stride]))] @ i2w.T)[:, :3]
    heights = (points - a0) @ d
    s_lt = float((lt - a0) @ d)
    s_top = s_lt + FADE_ZERO_ABOVE_LT_MM
    s_bottom = float(heights.min())
    if s_top - s_bottom < MIN_HEIGHTS * STEP_MM:
        return None, "too little shaft below the lesser trochanter"
    b1 = _unit(np.cross(d, [1.0, 0.0, 0.0] if abs(d[0]) < 0.9 else [0.0, 1.0, 0.0]))
    basis = np.stack([b1, np.cross(d, b1)])
    s_grid = np.arange(s_bottom + STEP_MM, s_top + STEP_MM / 2, STEP_MM)
    centres = a0[None, :] + s_grid[:, None] * d[None, :]

    n_views = len(used)
    du = np.full((len(s_grid), n_views), np.nan)
    ratio = np.full((len(s_grid), n_views), np.nan)
    gradient = np.zeros((len(s_grid), n_views, 2))
    femur_points = label_points(labels, grid, label)  # splatted into each view, the views side by side
    silhouettes = thread_map(lambda view: project_label(labels, grid, np.asarray(projections[view], float),
                                                        np.shape(masks[view]), label=label, points=femur_points)
                             >= OUTLINE_MM, used)
    for column, view in enumerate(used):
        projection = np.asarray(projections[view], float)
        mask = (np.asarray(masks[view]) > 0).astype(np.float32)
        ours = silhouettes[column].astype(np.float32)
        uv = project_points(projection, centres)
        along = project_points(projection, centres + 5.0 * d) - uv
        for n in range(len(s_grid)):
            t = along[n] / max(np.linalg.norm(along[n]), 1e-9)
            normal = np.array([-t[1], t[0]])
            # d(projection along the normal) / d(shift along b1, b2), pixels per mm
            moved = project_points(projection, centres[n] + np.stack([basis[0], basis[1]]) * 0.5)
            g = ((moved - uv[n]) @ normal) / 0.5
            px_per_mm = float(np.linalg.norm(g))
            if px_per_mm <= 0:
                continue
            half = SEARCH_MM * px_per_mm
            mask_line = _profile(mask, uv[n], normal, half, PROFILE_STEP_PX)
            ours_line = _profile(ours, uv[n], normal, half, PROFILE_STEP_PX)
            if np.isnan(mask_line).any() or np.isnan(ours_line).any():
                continue  # the line leaves the radiograph: the outline is not seen whole
            e_mask, e_ours = _outline_edges(mask_line, 2), _outline_edges(ours_line, 2)
            if e_mask is None or e_ours is None or (e_ours[1] - e_ours[0]) * PROFILE_STEP_PX < 1.0:
                continue
            du[n, column] = PROFILE_STEP_PX * ((e_mask[0] + e_mask[1]) - (e_ours[0] + e_ours[1])) / 2.0
            ratio[n, column] = (e_mask[1] - e_mask[0]) / (e_ours[1] - e_ours[0])
            gradient[n, column] = g
    observed = np.isfinite(du).all(1) & np.isfinite(ratio).all(1)
    if observed.sum() < MIN_HEIGHTS:
        return None, f"the masks show the shaft's outline at only {int(observed.sum())} heights"
    # The two views must see the cross-section along different directions.
    g1, g2 = gradient[observed, 0].mean(0), gradient[observed, 1].mean(0)
    angle = np.degrees(np.arccos(np.clip(abs(g1 @ g2) / (np.linalg.norm(g1) * np.linalg.norm(g2)), 0, 1)))
    if angle < MIN_VIEW_SEPARATION_DEG:
        return None, f"the views see the shaft from directions only {angle:.0f} deg apart"
    du_s = _smooth(du, observed, STEP_MM)
    ratio_s = np.clip(_smooth(ratio, observed, STEP_MM), 1 - MAX_WIDTH_CHANGE, 1 + MAX_WIDTH_CHANGE)
    g_s = _smooth(gradient.reshape(len(s_grid), -1), observed, STEP_MM).reshape(gradient.shape)

    seen = s_grid[observed]
    beyond = np.maximum(seen.min() - s_grid, 0) + np.maximum(s_grid - seen.max(), 0)
    weights = (_ramp(s_grid, s_lt + FADE_ZERO_ABOVE_LT_MM, s_lt - FADE_FULL_BELOW_LT_MM)
               * _ramp(beyond, FADE_BEYOND_OBSERVED_MM, 0.0))
    shift = np.zeros((len(s_grid), 2))
    matrices = np.repeat(np.eye(2)[None], len(s_grid), 0)
    for n in range(len(s_grid)):
        G = g_s[n]  # (views, 2)
        shift[n] = np.clip(np.linalg.lstsq(G, du_s[n], rcond=None)[0], -MAX_SHIFT_MM, MAX_SHIFT_MM) * weights[n]
        E = (G / np.linalg.norm(G, axis=1, keepdims=True)).T  # columns: the directions each view sees
        scaling = E @ np.diag(ratio_s[n]) @ np.linalg.pinv(E) if n_views == 2 else np.eye(2)
        matrices[n] = np.eye(2) + weights[n] * (scaling - np.eye(2))
    local = (points - a0 - np.outer(heights, d)) @ basis.T
    continued = _continue_straight(s_grid, shift, weights, observed, heights, local)
    fit = ShaftFit(a0, d, basis, s_grid, shift, matrices, weights, ratio_s, observed, names, continued)
    log.info("shaft fit: %d heights, mean shift %.2f mm, width factors %s", int(observed.sum()),
             float(np.linalg.norm(shift, axis=1)[weights > 0.999].mean()) if (weights > 0.999).any() else 0.0,
             np.round(ratio_s[weights > 0.999].mean(0), 3) if (weights > 0.999).any() else "-")
    return fit, "fitted"


def _continue_straight(s_grid: np.ndarray, shift: np.ndarray, weights: np.ndarray, observed: np.ndarray,
                       heights: np.ndarray, local: np.ndarray) -> np.ndarray:
    """Below the lowest height the masks show, move each cross-section's centre towards the straight
    line through the fitted centres (the reconstruction's centre plus the fit's shift) of the
    :data:`STRAIGHT_FROM_MM` of shaft above it, to within :data:`STRAIGHTENING_TOLERANCE_MM`;
    ``shift`` is changed in place. Returns which heights were so continued (moved or not).

    Why: a radiograph often ends above the bottom of the atlas's field of view. There the network
    has nothing to read and its shaft may bend away (held-out orthogonal JIA cases, session 18: up
    to 10 mm at the bottom of the field of view, 21 mm below the radiographs' lower edge), while a
    femoral diaphysis is straight over such lengths. ``heights`` and ``local`` are the
    reconstruction's femur voxels' positions along the axis and in the plane basis.
    """
    from scipy import ndimage

    continued = np.zeros(len(s_grid), bool)
    if not observed.any():
        return continued
    lowest = float(s_grid[observed].min())
    below = s_grid < lowest
    bins = np.rint((heights - s_grid[0]) / STEP_MM).astype(int)
    inside = (bins >= 0) & (bins < len(s_grid))
    count = np.bincount(bins[inside], minlength=len(s_grid)).astype(float)
    centre = np.stack([np.bincount(bins[inside], weights=local[inside, c], minlength=len(s_grid))
                       for c in range(2)], 1) / np.maximum(count, 1)[:, None]
    base = observed & (s_grid <= lowest + STRAIGHT_FROM_MM) & (weights >= 0.999) & (count > 0)
    if not below.any() or base.sum() < MIN_HEIGHTS:
        return continued
    design = np.c_[np.ones(base.sum()), s_grid[base]]
    line = np.linalg.lstsq(design, centre[base] + shift[base], rcond=None)[0]  # (2, 2): offset, slope
    rows = np.nonzero(below & (count > 0))[0]
    if len(rows) == 0:
        return continued
    target = np.c_[np.ones(len(rows)), s_grid[rows]] @ line
    # The centres of 1 mm slabs of voxels jitter by the voxel staircase only: a light smoothing
    # (SMOOTHING_MM would flatten the bend near the bottom end).
    move = ndimage.gaussian_filter1d(target - centre[rows], CENTRE_SMOOTHING_MM / STEP_MM, axis=0, mode="nearest")
    length = np.linalg.norm(move, axis=1, keepdims=True)
    kept = np.clip(length - STRAIGHTENING_TOLERANCE_MM, 0.0, MAX_STRAIGHTENING_MM)
    move *= kept / np.maximum(length, 1e-9)
    shift[rows] = move
    continued[rows] = True
    return continued


def apply_shaft_fit(fit: ShaftFit, grid, *volumes: np.ndarray) -> list[np.ndarray]:
    """``volumes`` (on ``grid``) with the shaft's cross-sections moved by ``fit``: each voxel within
    reach of the first volume's boundary (the soft femur indicator's non-zero part; the reach is
    the fit's largest move) and up to the fit's top takes the value from where the correction
    brings it from (linear interpolation); every other voxel is copied, as the correction would
    leave it inside or outside the femur. Returns new float32 arrays, in order."""
    outputs = [np.array(v, np.float32, copy=True) for v in volumes]
    active = fit.weights > 0
    if not active.any() or not volumes:
        return outputs
    i2w = np.asarray(grid.index_to_world(), np.float64)
    spacing_zyx = np.asarray(grid.spacing_xyz_mm, float)[::-1]
    femur = np.asarray(volumes[0]) > 0
    if not femur.any():
        return outputs
    # The femur up to the fit's top (and a little above), and how far the fit moves any of it:
    # the largest shift plus the largest change of scale times the femur's distance from the axis.
    zz, yy, xx = np.nonzero(femur)
    points = (np.c_[xx, yy, zz].astype(np.float32) @ i2w[:3, :3].T.astype(np.float32)
              + i2w[:3, 3].astype(np.float32)) - fit.axis_point_mm.astype(np.float32)
    along = points @ fit.axis_direction.astype(np.float32)
    lowish = along <= fit.heights_mm[-1] + 2 * float(spacing_zyx.max())
    if not lowish.any():
        return outputs
    radius_mm = float(np.sqrt(np.max(np.einsum("ij,ij->i", points[lowish], points[lowish]) - along[lowish] ** 2)))
    scale_change = max(float(np.linalg.norm(m - np.eye(2), 2)) for m in fit.matrices)
    reach = float(np.abs(fit.shift_mm).max() * np.sqrt(2) + scale_change * radius_mm + 2 * spacing_zyx.max())
    lo, hi = grown_box((zz[lowish], yy[lowish], xx[lowish]), reach, spacing_zyx, femur.shape)
    k, j, i = near_boundary(femur, lo, hi, reach, spacing_zyx)
    rel = np.stack([i, j, k], 1).astype(np.float64) @ i2w[:3, :3].T + (i2w[:3, 3] - fit.axis_point_mm)
    s = rel @ fit.axis_direction
    keep = s <= fit.heights_mm[-1]
    k, j, i, rel, s = k[keep], j[keep], i[keep], rel[keep], s[keep]
    local = (rel - np.outer(s, fit.axis_direction)) @ fit.basis.T  # (N, 2) in the plane basis
    # Per height the inverse of "local -> shift + M local", interpolated linearly between heights.
    inverse = np.linalg.inv(fit.matrices)
    last = len(fit.heights_mm) - 1
    pos = np.clip((s - fit.heights_mm[0]) / STEP_MM, 0, last)
    below = np.minimum(np.floor(pos).astype(int), max(last - 1, 0))
    above = np.minimum(below + 1, last)
    frac = (pos - below)[:, None]
    shift = (1 - frac) * fit.shift_mm[below] + frac * fit.shift_mm[above]
    q = local - shift
    inv = (1 - frac[:, :, None]) * inverse[below] + frac[:, :, None] * inverse[above]
    source_local = np.stack([inv[:, 0, 0] * q[:, 0] + inv[:, 0, 1] * q[:, 1],
                             inv[:, 1, 0] * q[:, 0] + inv[:, 1, 1] * q[:, 1]], 1)
    source = fit.axis_point_mm + np.outer(s, fit.axis_direction) + source_local @ fit.basis
    pull_back_voxels(outputs, volumes, (k, j, i), source, grid)
    return outputs
