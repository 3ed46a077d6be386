"""Automatic femur masks for views that have none (``hipatlas register`` without masks, GUI proposals).

A proposed mask is a starting point for the user to confirm or edit, never a silent replacement:
the pipeline marks it ``"mask_source": "proposed", "mask_confirmed": false`` in report.json and
writes it to the output folder.

Method
------
1. **Coarse atlas pose from the images** (:func:`locate_atlas`). The world origin is wherever the
   calibration puts it, and the closest approach of the two central rays (the C-arm isocentre) is
   typically 10-40 mm from the femoral head, too far for the network (trained with the femur
   within about 5 mm and 10 deg of the atlas). The atlas femur is projected (:func:`project_label`)
   into both views at a few scales and in-plane rotations and matched against each radiograph by a
   *gradient-orientation correlation* computed with FFTs: the sum over the template's edges of
   ``|grad T| cos(angle(grad T, grad I))``, with the image gradient normalised (``g / (|g| + g75)``)
   so that a few strong straight edges (collimator, skin line, the CT field of simulated cases)
   cannot outweigh the femur's many weaker ones. Grey-value correlation is dominated by such edges
   and by the soft-tissue ramp. The two per-view score maps are combined over a 3D grid of
   translations (each 3D shift moves the template by the projection's 2x3 Jacobian in each view)
   with a mild penalty for distance from the start, then refined with the head and neck only.
2. **Outline, then network** (:func:`propose`): (a) the posed atlas femur is projected into each
   full-size radiograph and refined on the image (step 3); (b) those masks go with the radiographs
   through the registration model exactly as in registration, and the warped atlas femur is
   projected back and refined again. The network was trained on radiographs masked by the femur:
   given the whole radiograph around the grid instead (masks = the grid's footprint, as this
   module first did), the trained compact-v2 model distorted the femur and the proposals fell to
   Dice 0.40-0.45 (``tools/eval_cases.py --cases 2 --seed 2024 --no-masks``).
3. **Refinement on the image** (:func:`refine_mask`): a profile search along the silhouette's
   outward normals, solved as a shortest path over the outline (dynamic programming, as in active
   shape models), moves each outline point by up to :data:`REFINE_BAND_MM` onto the strongest
   bright-inside edge, with a smoothness limit between neighbours and a small cost for moving, so
   that a weak or cluttered edge cannot make the mask run away. (A morphological geodesic active
   contour was tried first: without a balloon force it does not cross the flat regions between a
   misplaced outline and the bone edge, Dice 0.83 vs 0.89 on the cases below.)

Known limits (measured on six simulated JIA_MRI cases, 192 px of 1.4 mm, untrained network, by
Dice against the true masks in the rows the proposal covers): the coarse search leaves the head
5-13 mm off (mean 8.7 mm) on this specimen, whose femur is much smaller and more valgus than the
atlas (offset ~22 vs 49 mm); the projected atlas gives Dice 0.82, the refined mask 0.89. The mask
covers the atlas field of view (to about 40 mm below the lesser trochanter), not the whole shaft.
``tools/eval_cases.py --no-masks`` measures it (``proposed_mask_dice``): 0.84 +- 0.15 on six
768 px cases, 0.80 +- 0.09 on six varied ones (sizes, pitches, +-30 deg obliques), untrained.
With compact-v2, ``--cases 4 --seed 2024 --no-masks``: 0.898, 0.524, 0.931, 0.933 with step 2b,
0.891, 0.549, 0.917, 0.929 after 2a alone; the 0.52 case is a coarse search that went wrong
(its registration then fails too: Dice 0.14), which the surgeon's confirmation must catch.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
from scipy import ndimage

from inference import geometry
from inference.errors import Cancelled, DataError

log = logging.getLogger(__name__)

__all__ = [
    "AtlasPose",
    "MaskProposal",
    "project_label",
    "label_silhouette",
    "locate_atlas",
    "refine_mask",
    "propose",
    "propose_masks",
]

#: Global scales of the atlas tried by the coarse search (femur sizes differ by +-15 %).
SEARCH_SCALES = (0.9, 1.0, 1.1)
#: In-plane rotations (about each view's principal axis through the head) tried per view, deg.
SEARCH_ANGLES_DEG = (-10.0, -5.0, 0.0, 5.0, 10.0)
#: Translation search radius around the start point and its step, mm.
SEARCH_RADIUS_MM = 50.0
SEARCH_STEP_MM = 2.0
#: The second, head-and-neck search: femur voxels within this distance of the head centre.
HEAD_PART_RADIUS_MM = 26.0
HEAD_SEARCH_RADIUS_MM = 16.0
#: Score penalty at the search radius (relative to a perfect match of 2, one per view): breaks
#: ties between similar-looking structures in favour of the one near the isocentre.
DISTANCE_PENALTY = 0.1
#: Pixel size (mm at the femur) of the template matching.
TEMPLATE_PIXEL_MM = 2.0
#: The refined outline stays within this distance of the network's projected femur, mm.
REFINE_BAND_MM = 12.0
#: Pixel size (mm at the femur) of the refinement.
REFINE_PIXEL_MM = 1.0
#: Path length through the femur (mm) above which a pixel belongs to the silhouette; the same
#: rule as the training masks (dataset RenderSettings.mask_threshold_mm).
SILHOUETTE_THRESHOLD_MM = 0.5


def _check(cancel: Callable[[], bool] | None) -> None:
    if cancel is not None and cancel():
        raise Cancelled("mask proposal cancelled")


# --------------------------------------------------------------------------------------------
# Projection of a label map (numpy splatting)
# --------------------------------------------------------------------------------------------

def _pixels_per_mm(projection: np.ndarray, point_mm: np.ndarray) -> float:
    """Detector pixels per mm of a small in-plane displacement at ``point_mm`` (geometric mean)."""
    x = np.append(np.asarray(point_mm, float), 1.0)
    w = float(projection[2] @ x)
    uv = projection[:2] @ x / w
    jacobian = (projection[:2, :3] - np.outer(uv, projection[2, :3])) / w
    return float(np.sqrt(np.sqrt(abs(np.linalg.det(jacobian @ jacobian.T)))))


def _splat_thickness(points_mm: np.ndarray, voxel_volume_mm3: float, projection: np.ndarray,
                     shape_hw: tuple[int, int], reference_mm: np.ndarray) -> np.ndarray:
    """Sum of ``voxel volume / pixel footprint`` of points, bilinearly splatted: path length (mm).

    A voxel of volume V seen by a pixel whose footprint at the voxel's depth is A mm^2 adds V / A
    mm of path to that pixel's ray. The footprint scales with the squared depth (perspective), so
    it is computed once at ``reference_mm`` and scaled by ``(w_ref / w)^2``.
    """
    rows, cols = shape_hw
    homogeneous = points_mm @ projection[:, :3].T + projection[:, 3]
    w = homogeneous[:, 2]
    front = w > 0
    homogeneous, w = homogeneous[front], w[front]
    u, v = homogeneous[:, 0] / w, homogeneous[:, 1] / w
    w_ref = float(projection[2] @ np.append(reference_mm, 1.0))
    weight = voxel_volume_mm3 * _pixels_per_mm(projection, reference_mm) ** 2 * (w_ref / w) ** 2
    u0, v0 = np.floor(u).astype(np.int64), np.floor(v).astype(np.int64)
    fu, fv = u - u0, v - v0
    out = np.zeros(rows * cols)
    for du, dv, share in ((0, 0, (1 - fu) * (1 - fv)), (1, 0, fu * (1 - fv)), (0, 1, (1 - fu) * fv),
                          (1, 1, fu * fv)):
        uu, vv = u0 + du, v0 + dv
        inside = (uu >= 0) & (uu < cols) & (vv >= 0) & (vv < rows)
        out += np.bincount(vv[inside] * cols + uu[inside], weights=(weight * share)[inside],
                           minlength=rows * cols)
    return out.reshape(rows, cols)


def label_points(labels: np.ndarray, grid: "geometry.VolumeGeometry", label: int = 1) -> np.ndarray:
    """World points (N, 3) of the voxel centres of ``label``: what :func:`project_label` splats,
    for callers that project one label map into several views (``points=``)."""
    kk, jj, ii = np.nonzero(np.asarray(labels) == label)
    ijk = np.stack([ii, jj, kk]).astype(np.float64)
    matrix = grid.index_to_world()
    return (matrix[:3, :3] @ ijk + matrix[:3, 3:4]).T


def project_label(labels: np.ndarray, grid: "geometry.VolumeGeometry", projection: np.ndarray,
                  shape_hw: tuple[int, int], *, label: int = 1, pixel_mm: float | None = None,
                  points: np.ndarray | None = None) -> np.ndarray:
    """Path length (mm) through ``label`` for every pixel of a ``shape_hw`` detector.

    A fast numpy stand-in for :func:`inference.drr.render_path_length` (no TensorFlow, no
    tracing): the label's voxel centres are splatted onto a detector whose pixels are about the
    voxel size at the grid (``pixel_mm``, default the largest voxel spacing), where every pixel
    inside the projection receives some voxel, and the result is upsampled to ``shape_hw``
    linearly. Edges are therefore soft on the scale of one voxel; the 0.5 mm level matches the
    ray-marched silhouette to about half a voxel.

    Parameters
    ----------
    labels : (Z, Y, X) integer array
    grid : VolumeGeometry of ``labels`` (any direction, spacing)
    projection : (3, 4) P of the full detector
    shape_hw : (rows, cols) of the full detector
    points : :func:`label_points` of ``labels``, ``grid`` and ``label``, when the caller has them
        (several views of one label map)
    """
    rows, cols = int(shape_hw[0]), int(shape_hw[1])
    if points is None:
        points = label_points(labels, grid, label)
    if len(points) == 0:
        return np.zeros((rows, cols), np.float32)
    centre = np.asarray(grid.center_mm(), float)
    pixel_mm = float(pixel_mm or max(grid.spacing_xyz_mm))
    # detector pixels per render pixel (>= 1: never render finer than the radiograph)
    factor = max(1.0, pixel_mm * _pixels_per_mm(projection, centre))
    small = (max(2, int(round(rows / factor))), max(2, int(round(cols / factor))))
    p_small = geometry.resize_to(projection, (rows, cols), small)
    thickness = _splat_thickness(points, float(np.prod(grid.spacing_xyz_mm)), p_small, small, centre)
    if small == (rows, cols):
        return thickness.astype(np.float32)
    # Upsample pixel-area aligned: full pixel (c, r) sits at small coordinate (c + 0.5) * s - 0.5;
    # bilinear (edge values beyond the border), as rows then columns: what map_coordinates with
    # order=1 gives, in a fifth of its time (this runs eight times per registration).
    rows_up = _linear_resample(thickness, (np.arange(rows) + 0.5) * (small[0] / rows) - 0.5, axis=0)
    return _linear_resample(rows_up, (np.arange(cols) + 0.5) * (small[1] / cols) - 0.5, axis=1).astype(np.float32)


def _linear_resample(image: np.ndarray, at: np.ndarray, axis: int) -> np.ndarray:
    """``image`` linearly interpolated at the coordinates ``at`` along ``axis`` (edge values beyond it)."""
    n = image.shape[axis]
    at = np.clip(at, 0.0, n - 1)
    low = np.minimum(at.astype(np.intp), max(n - 2, 0))
    high = np.minimum(low + 1, n - 1)
    shape = [1, 1]
    shape[axis] = len(at)
    t = (at - low).reshape(shape)
    return np.take(image, low, axis=axis) * (1.0 - t) + np.take(image, high, axis=axis) * t


def label_silhouette(labels: np.ndarray, grid: "geometry.VolumeGeometry", projection: np.ndarray,
                     shape_hw: tuple[int, int], *, label: int = 1) -> np.ndarray:
    """Bool mask of the pixels whose ray crosses at least 0.5 mm of ``label`` (holes filled)."""
    thickness = project_label(labels, grid, projection, shape_hw, label=label)
    return ndimage.binary_fill_holes(thickness >= SILHOUETTE_THRESHOLD_MM)


# --------------------------------------------------------------------------------------------
# Coarse pose by template matching
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AtlasPose:
    """A similarity placement of the atlas: its head centre at ``head_mm``, rotated and scaled.

    World = the registration world (mirrored in x for a left femur).
    """

    head_mm: np.ndarray
    rotation: np.ndarray = field(default_factory=lambda: np.eye(3))
    scale: float = 1.0
    score: float = float("nan")

    def grid(self, atlas_geometry: "geometry.VolumeGeometry",
             atlas_head_mm: np.ndarray) -> "geometry.VolumeGeometry":
        """The atlas grid moved so that ``atlas_head_mm`` lands on ``head_mm`` with this pose."""
        origin = np.asarray(self.head_mm, float) + self.rotation @ (
            self.scale * (np.asarray(atlas_geometry.origin_mm, float) - np.asarray(atlas_head_mm, float)))
        direction = self.rotation @ np.asarray(atlas_geometry.direction, float)
        return geometry.VolumeGeometry(atlas_geometry.shape_zyx,
                                       tuple(self.scale * np.asarray(atlas_geometry.spacing_xyz_mm, float)),
                                       tuple(origin), tuple(map(tuple, direction)))


def _gradient(image: np.ndarray, sigma: float) -> np.ndarray:
    """Complex gradient gx + i gy of a Gaussian-smoothed image."""
    gx = ndimage.gaussian_filter(image, sigma, order=(0, 1))
    gy = ndimage.gaussian_filter(image, sigma, order=(1, 0))
    return gx + 1j * gy


def _rotation_about(axis: np.ndarray, angle_deg: float) -> np.ndarray:
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    a = np.radians(angle_deg)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k


@dataclass
class _SearchView:
    projection: np.ndarray  # P of the reduced detector
    shape: tuple[int, int]
    gradient: np.ndarray  # normalised complex image gradient on the reduced detector


def _search_views(images: Sequence[np.ndarray], projections: Sequence[np.ndarray],
                  point_mm: np.ndarray) -> list[_SearchView]:
    out = []
    for image, projection in zip(images, projections):
        image = np.asarray(image, np.float32)
        rows, cols = image.shape
        factor = max(1.0, TEMPLATE_PIXEL_MM * _pixels_per_mm(projection, point_mm))
        small = (max(8, int(round(rows / factor))), max(8, int(round(cols / factor))))
        p_small = geometry.resize_to(projection, (rows, cols), small)
        # anti-aliased reduction (sigma ~ half a reduced pixel), then the same sampling rule as P
        smooth = ndimage.gaussian_filter(image, 0.5 * factor) if factor > 1.0 else image
        vv = (np.arange(small[0]) + 0.5) * rows / small[0] - 0.5
        uu = (np.arange(small[1]) + 0.5) * cols / small[1] - 0.5
        reduced = ndimage.map_coordinates(smooth, np.meshgrid(vv, uu, indexing="ij"), order=1, mode="nearest")
        gradient = _gradient(reduced, 1.0)
        magnitude = np.abs(gradient)
        # soft normalisation: strong edges count ~1, noise-level gradients much less
        gradient = gradient / (magnitude + np.percentile(magnitude, 75) + 1e-12)
        out.append(_SearchView(p_small, small, gradient))
    return out


def _score_maps(view: _SearchView, points_mm: np.ndarray, voxel_volume: float, head_mm: np.ndarray,
                rotations: Sequence[np.ndarray], scale: float, atlas_head_mm: np.ndarray):
    """Best orientation-correlation over ``rotations``, as a map indexed like the reduced image
    with the head's unshifted projection at its own pixel; and the index of the best rotation."""
    from scipy.signal import fftconvolve  # slow to import (~0.5 s); overlays do not need it

    head_uv = geometry.project_points(view.projection, head_mm[None])[0]
    best, best_index = None, None
    for index, rotation in enumerate(rotations):
        placed = head_mm + (scale * (points_mm - atlas_head_mm)) @ rotation.T
        template = _splat_thickness(placed, voxel_volume * scale ** 3, view.projection, view.shape, head_mm)
        template = ndimage.gaussian_filter(template, 0.7)
        vv, uu = np.nonzero(template > SILHOUETTE_THRESHOLD_MM)
        if vv.size == 0:
            continue
        r0, r1, c0, c1 = vv.min(), vv.max() + 1, uu.min(), uu.max() + 1
        patch = np.pad(template[r0:r1, c0:c1], 3)
        g_template = _gradient(patch, 1.0)
        # correlation = convolution with the flipped conjugate; "same" keeps the image's indexing
        score = np.real(fftconvolve(view.gradient, np.conj(g_template[::-1, ::-1]), mode="same"))
        score /= np.abs(g_template).sum() + 1e-12
        # re-index so that pixel p holds the score of the template moved by p - head_uv
        centre = np.array([(c0 + c1 - 1) / 2.0, (r0 + r1 - 1) / 2.0])
        score = ndimage.shift(score, (head_uv - centre)[::-1], order=1, mode="constant", cval=-1.0)
        if best is None:
            best, best_index = score, np.zeros(score.shape, np.int32)
        else:
            better = score > best
            best = np.where(better, score, best)
            best_index = np.where(better, index, best_index)
    return best, best_index, head_uv


def _search(search_views, points_mm, voxel_volume, atlas_head_mm, start: AtlasPose, angles_deg,
            scales, radius_mm, step_mm, cancel) -> AtlasPose:
    """Best similarity pose near ``start`` (translation on a grid, per-view rotation, scale)."""
    steps = np.arange(-radius_mm, radius_mm + 1e-6, step_mm)
    shifts = np.stack([g.ravel() for g in np.meshgrid(steps, steps, steps, indexing="ij")])
    shifts = shifts[:, np.linalg.norm(shifts, axis=0) <= radius_mm + 1e-6]
    head = np.asarray(start.head_mm, float)
    best_pose = None
    for scale in scales:
        _check(cancel)
        total = -DISTANCE_PENALTY * np.linalg.norm(shifts, axis=0) / radius_mm
        per_view = []
        for view in search_views:
            axis = geometry.principal_direction(view.projection)
            rotations = [_rotation_about(axis, a) @ start.rotation for a in angles_deg]
            score, index, head_uv = _score_maps(view, points_mm, voxel_volume, head, rotations,
                                                scale * start.scale, atlas_head_mm)
            if score is None:
                raise DataError("the atlas femur does not project onto the radiographs; check the calibration")
            jacobian = np.stack([geometry.project_points(view.projection, (head + e)[None])[0] - head_uv
                                 for e in np.eye(3)], axis=1)
            uv = head_uv[:, None] + jacobian @ shifts
            total = total + ndimage.map_coordinates(score, [uv[1], uv[0]], order=1, mode="constant", cval=-1.0)
            per_view.append((index, head_uv, jacobian, axis))
        k = int(np.argmax(total))
        if best_pose is None or total[k] > best_pose.score:
            shift = shifts[:, k]
            rotation = start.rotation
            for index, head_uv, jacobian, axis in per_view:
                uv = np.round(head_uv + jacobian @ shift).astype(int)
                uv = np.clip(uv, 0, np.array(index.shape[::-1]) - 1)
                angle = angles_deg[int(index[uv[1], uv[0]])]
                rotation = _rotation_about(axis, angle) @ rotation
            best_pose = AtlasPose(head + shift, rotation, scale * start.scale, float(total[k]))
    return best_pose


def locate_atlas(images: Sequence[np.ndarray], projections: Sequence[np.ndarray], atlas: Any,
                 start_mm: np.ndarray, *, cancel: Callable[[], bool] | None = None) -> AtlasPose:
    """Coarse similarity pose of the atlas femur in two radiographs (module docstring, step 1).

    Parameters
    ----------
    images : two (rows, cols) arrays, larger = more attenuation
    projections : two (3, 4) P (registration world: mirrored for a left femur)
    atlas : inference.data.atlas.Atlas
    start_mm : (3,) where to start (e.g. the central rays' closest approach)
    """
    femur = np.asarray(atlas.labels) == 1
    if not femur.any():
        raise DataError("the atlas has no femur label")
    atlas_head = np.asarray(atlas.landmarks["head_centre"], float)
    points = label_points(femur, atlas.geometry, 1)
    # Coarser point set for the search: every voxel of a 2 mm template is plenty.
    voxel_volume = float(np.prod(atlas.geometry.spacing_xyz_mm))
    start = AtlasPose(np.asarray(start_mm, float))
    views = _search_views(images, projections, start.head_mm)
    pose = _search(views, points, voxel_volume, atlas_head, start, SEARCH_ANGLES_DEG, SEARCH_SCALES,
                   SEARCH_RADIUS_MM, SEARCH_STEP_MM, cancel)
    _check(cancel)
    # Second pass on the head and neck at the chosen rotation and scale: the shaft dominates the
    # first score, and femurs differ most in offset and neck angle, which moves the head.
    near_head = np.linalg.norm(points - atlas_head, axis=1) < HEAD_PART_RADIUS_MM
    views = _search_views(images, projections, pose.head_mm)
    start_scale = AtlasPose(pose.head_mm, pose.rotation, pose.scale)
    refined = _search(views, points[near_head], voxel_volume, atlas_head, start_scale, (0.0,), (1.0,),
                      HEAD_SEARCH_RADIUS_MM, 1.0, cancel)
    refined = dataclasses.replace(refined, score=pose.score)
    log.info("atlas located at %s mm (scale %.2f) from start %s mm", np.round(refined.head_mm, 1), refined.scale,
             np.round(start.head_mm, 1))
    return refined


# --------------------------------------------------------------------------------------------
# Refinement on the image
# --------------------------------------------------------------------------------------------

def _largest_component(mask: np.ndarray) -> np.ndarray:
    labelled, count = ndimage.label(mask)
    if count <= 1:
        return mask
    sizes = ndimage.sum(mask, labelled, index=np.arange(1, count + 1))
    return labelled == (1 + int(np.argmax(sizes)))


def refine_mask(image: np.ndarray, prior: np.ndarray, mm_per_pixel: float, *,
                band_mm: float = REFINE_BAND_MM, smoothness_px: float = 0.5,
                stay_weight: float = 0.15) -> np.ndarray:
    """Move the outline of ``prior`` onto nearby bone edges of ``image`` (module docstring, step 3).

    A profile search along the outline's normals, solved as a shortest path (dynamic programming),
    in the manner of active shape models: every outline point may move by an offset ``d`` in
    ``[-band, band]`` along its outward normal; the cost of an offset is the directional derivative
    of the (smoothed, normalised) image along the outward normal there, which is most negative on
    the femur's outer edge (bone brighter inside than outside; this polarity ignores the inner
    cortical edges, whose gradient points the other way), plus ``stay_weight * |d| / band`` so that
    the outline stays put where there is no edge. Neighbouring points may differ by at most
    ``smoothness_px`` (reduced pixels), which keeps the outline smooth and makes the search
    robust to isolated strong edges (a collimator, the pelvis).

    Parameters
    ----------
    image : (rows, cols) radiograph, larger = more attenuation
    prior : (rows, cols) bool, the projected femur
    mm_per_pixel : float, size of a pixel at the femur
    band_mm : float, how far the outline may move

    Returns
    -------
    (rows, cols) bool mask: one connected component without holes.
    """
    from skimage.draw import polygon
    from skimage.measure import find_contours

    prior = np.asarray(prior, bool)
    if not prior.any():
        return prior.copy()
    rows, cols = prior.shape
    factor = max(1.0, REFINE_PIXEL_MM / max(mm_per_pixel, 1e-6))
    small = (max(8, int(round(rows / factor))), max(8, int(round(cols / factor))))
    vv = (np.arange(small[0]) + 0.5) * rows / small[0] - 0.5
    uu = (np.arange(small[1]) + 0.5) * cols / small[1] - 0.5
    coords = np.meshgrid(vv, uu, indexing="ij")
    image = np.asarray(image, np.float32)
    smooth = ndimage.gaussian_filter(image, 0.5 * factor) if factor > 1.0 else image
    reduced = ndimage.map_coordinates(smooth, coords, order=1, mode="nearest")
    prior_small = ndimage.map_coordinates(prior.astype(np.float32), coords, order=1, mode="nearest") >= 0.5
    if not prior_small.any():
        return prior.copy()
    pixel_mm = mm_per_pixel * factor
    band = max(1.0, band_mm / pixel_mm)

    # Outline of the prior (padded so that it closes along the image border), outward normals
    # from the gradient of its smoothed signed distance.
    padded = np.pad(prior_small, 1)
    outline = max(find_contours(padded.astype(np.float32), 0.5), key=len) - 1.0
    signed = (ndimage.distance_transform_edt(~prior_small) - ndimage.distance_transform_edt(prior_small))
    signed = ndimage.gaussian_filter(signed, 2.0)
    n_row = ndimage.map_coordinates(ndimage.sobel(signed, 0), outline.T, order=1, mode="nearest")
    n_col = ndimage.map_coordinates(ndimage.sobel(signed, 1), outline.T, order=1, mode="nearest")
    norm = np.hypot(n_row, n_col) + 1e-9
    normals = np.stack([n_row / norm, n_col / norm], axis=1)

    # Directional derivative along the outward normal at every candidate offset, normalised by a
    # robust edge scale so that the weight of the "stay" term means the same on any image.
    sigma = max(0.7, 1.0 / pixel_mm)
    g_row = ndimage.gaussian_filter(reduced, sigma, order=(1, 0))
    g_col = ndimage.gaussian_filter(reduced, sigma, order=(0, 1))
    offsets = np.arange(-band, band + 1e-6, 0.5)
    points = outline[:, None, :] + offsets[None, :, None] * normals[:, None, :]
    flat = points.reshape(-1, 2).T
    along_row = ndimage.map_coordinates(g_row, flat, order=1, mode="nearest").reshape(len(outline), len(offsets))
    along_col = ndimage.map_coordinates(g_col, flat, order=1, mode="nearest").reshape(len(outline), len(offsets))
    derivative = along_row * normals[:, :1] + along_col * normals[:, 1:]
    scale = np.percentile(np.abs(derivative), 90) + 1e-12
    # points outside the image have no evidence: their profile reads flat (mode="nearest")
    cost = derivative / scale + stay_weight * np.abs(offsets)[None, :] / band

    # Shortest path over offsets along the (open) outline: |step| <= smoothness_px between points.
    reach = int(round(smoothness_px / 0.5))
    total = cost[0].copy()
    back = np.zeros(cost.shape, np.int32)
    index = np.arange(len(offsets))
    for i in range(1, len(outline)):
        candidates = np.stack([np.roll(total, k) if k else total for k in range(-reach, reach + 1)])
        origin = np.stack([np.roll(index, k) for k in range(-reach, reach + 1)])
        # forbid wrap-around at the ends of the offset range
        invalid = np.abs(origin - index[None, :]) > reach
        candidates[invalid] = np.inf
        best = np.argmin(candidates, axis=0)
        back[i] = origin[best, index]
        total = candidates[best, index] + cost[i]
    choice = np.empty(len(outline), np.int32)
    choice[-1] = int(np.argmin(total))
    for i in range(len(outline) - 1, 0, -1):
        choice[i - 1] = back[i, choice[i]]
    moved = outline + offsets[choice][:, None] * normals
    refined = np.zeros(small, bool)
    rr, cc = polygon(moved[:, 0], moved[:, 1], shape=small)
    refined[rr, cc] = True
    refined = ndimage.binary_fill_holes(_largest_component(ndimage.binary_opening(refined)))
    # back to full size (linear interpolation of the reduced mask, threshold at one half)
    scale_v, scale_u = small[0] / rows, small[1] / cols
    fv = (np.arange(rows) + 0.5) * scale_v - 0.5
    fu = (np.arange(cols) + 0.5) * scale_u - 0.5
    full = ndimage.map_coordinates(refined.astype(np.float32), np.meshgrid(fv, fu, indexing="ij"), order=1,
                                   mode="nearest") >= 0.5
    if not full.any():
        return prior.copy()
    return ndimage.binary_fill_holes(_largest_component(full))


# --------------------------------------------------------------------------------------------
# The whole proposal
# --------------------------------------------------------------------------------------------

@dataclass
class MaskProposal:
    """Result of :func:`propose`.

    Attributes
    ----------
    masks : list of (rows, cols) bool arrays, one per view
    pose : AtlasPose of the coarse search (registration world)
    prior_masks : the projected femur (the network's, after step 2b) before the image refinement
    timings_s : seconds per step
    """

    masks: list[np.ndarray]
    pose: AtlasPose
    prior_masks: list[np.ndarray]
    timings_s: dict[str, float]


def propose(images: Sequence[np.ndarray], projections: Sequence[np.ndarray], net: Any, atlas: Any,
            start_mm: np.ndarray, *, refine: bool = True, network_step: bool = True,
            cancel: Callable[[], bool] | None = None) -> MaskProposal:
    """Propose a femur mask for each view (module docstring).

    Parameters
    ----------
    images : two (rows, cols) radiographs
    projections : two (3, 4) P in the registration world (mirrored for a left femur), w > 0 in
        front of the source
    net : the registration model (trained or not)
    atlas : its atlas (:func:`inference.data.atlas.load_atlas` of the model's grid)
    start_mm : (3,) start of the search (registration world)
    refine : bool, refine the projected femur on the image
    network_step : bool, run step 2b (the network with the first masks); False stops after 2a
    """
    from inference import views as views_lib
    from inference.backends import as_backend
    from inference.model_config import case_inputs

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    pose = locate_atlas(images, projections, atlas, start_mm, cancel=cancel)
    timings["locate_s"] = time.perf_counter() - t0
    _check(cancel)

    def outlines(labels, grid):
        """The femur of ``labels`` projected into each view, and refined on each image."""
        priors, masks = [], []
        for image, projection in zip(images, projections):
            prior = _largest_component(label_silhouette(labels, grid, projection, np.asarray(image).shape))
            if not prior.any():
                raise DataError("the proposed femur does not project onto a radiograph; check the calibration")
            priors.append(prior)
            if refine:
                mm_per_pixel = 1.0 / _pixels_per_mm(projection, pose.head_mm)
                masks.append(refine_mask(image, prior, mm_per_pixel))
            else:
                masks.append(prior.copy())
            _check(cancel)
        return priors, masks

    # 2a. The posed atlas's outline, refined on the images.
    t0 = time.perf_counter()
    grid = pose.grid(atlas.geometry, atlas.landmarks["head_centre"])
    posed_femur = (np.asarray(atlas.labels) == 1).astype(np.uint8)
    priors, masks = outlines(posed_femur, grid)
    timings["posed_refine_s"] = time.perf_counter() - t0
    if not network_step:
        return MaskProposal(masks=masks, pose=pose, prior_masks=priors, timings_s=timings)

    # 2b. The network with those masks, as registration runs it; its femur projected and refined.
    t0 = time.perf_counter()
    net = as_backend(net)
    network = views_lib.network_inputs(images, masks, projections, grid, net.config.detector_hw)
    outputs = net.run(case_inputs(network.images, network.masks, network.projections, grid.index_to_world()))
    warped = outputs["warped_labels"][0, ..., 0].round().astype(np.uint8)
    timings["network_s"] = time.perf_counter() - t0
    if not (warped == 1).any():
        # an untrained or confused network may lose the femur: keep the posed atlas's outline
        log.warning("the network's warped femur is empty; proposing the refined outline of the posed atlas")
        return MaskProposal(masks=masks, pose=pose, prior_masks=priors, timings_s=timings)
    _check(cancel)
    t0 = time.perf_counter()
    priors, masks = outlines((warped == 1).astype(np.uint8), grid)
    timings["project_refine_s"] = time.perf_counter() - t0
    return MaskProposal(masks=masks, pose=pose, prior_masks=priors, timings_s=timings)


def propose_masks(case: Any, model: Any = None, *, refine: bool = True,
                  cancel: Callable[[], bool] | None = None, backend: str | None = None) -> list[np.ndarray]:
    """Proposed femur masks (bool, full size) for both views of a loaded case, for the GUI.

    Parameters
    ----------
    case : inference.io.Case
    model : path, keras.Model or None (the shipped model), as :func:`inference.pipeline.register_case`

    The masks are in the case's pixels (for a left hip, the proposal made in the registration
    frame's flipped images is flipped back).
    """
    from inference.backends import load_backend
    from inference.registration import RegistrationFrame, atlas_for

    net = load_backend(model, backend)
    atlas = atlas_for(net)
    frame = RegistrationFrame.of_case(case)
    proposal = propose(frame.images_in(case), frame.projections, net, atlas, frame.start_mm, refine=refine,
                       cancel=cancel)
    return [frame.image_out(mask) for mask in proposal.masks]
