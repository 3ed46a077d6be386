"""Find the femoral head in world space from two calibrated views and their femur masks.

The world origin is wherever the calibration put it, so the atlas cannot be assumed to sit at the
origin. We look for the femoral head because it is the one part of the proximal femur that is
round in every view and lies at the top of the femur mask, whatever else the mask contains (the
shaft may run off the image, the mask may extend beyond the atlas field of view).

Method
------
1. A rough 3D point ``X0``: the midpoint of the closest approach of the two central rays (a C-arm
   is centred near the anatomy), used only to know which way is superior in each image and how
   many pixels a millimetre spans there.
2. In the reference view (the one whose viewing direction is closest to AP), the head centre in 2D
   is the point of the upper part of the mask that lies deepest inside it (maximum of the distance
   transform) among those whose inscribed circle reaches the top of the mask: the head is the
   widest round part at the top, the neck and the greater trochanter's tip are narrower, and the
   region below the neck, as wide as the head in small or valgus femurs, does not reach the top.
3. The other view: search along the epipolar line of that point (sampling the reference ray in 3D)
   for the deepest point of its mask. The 3D point on the ray is the head centre estimate.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from inference import geometry
from inference.errors import DataError

log = logging.getLogger(__name__)

#: How far below the top of the mask the head centre may lie, in mm at the femur (head radius is
#: 17-28 mm, so its centre lies within ~35 mm of the mask top).
HEAD_BAND_MM = 40.0
#: How far below the top of the mask the head's inscribed circle may end (mm): heads are not
#: perfect circles in projection and mask edges are a pixel or two rough.
HEAD_TOP_TOLERANCE_MM = 4.0


@dataclass(frozen=True)
class HeadEstimate:
    centre_mm: np.ndarray  # (3,) world
    radius_mm: float  # from the reference view's distance transform
    reference_view: int
    pixels_2d: tuple[np.ndarray, np.ndarray]  # (u, v) in each view


def _mm_per_pixel(projection: np.ndarray, point_mm: np.ndarray) -> float:
    """Size of one detector pixel back-projected to ``point_mm`` (mm)."""
    offsets = np.eye(3) * 10.0
    base = geometry.project_points(projection, point_mm[None])[0]
    moved = geometry.project_points(projection, point_mm[None] + offsets)
    # largest in-plane displacement of a 10 mm step: the two in-plane directions give ~equal values
    pixels_per_10mm = np.sort(np.linalg.norm(moved - base, axis=1))[-1]
    return 10.0 / pixels_per_10mm


#: Public name for the measurement code (landmark uncertainties at the detector's resolution).
mm_per_pixel = _mm_per_pixel


def _superior_direction(projection: np.ndarray, point_mm: np.ndarray) -> np.ndarray:
    """Unit image direction (du, dv) in which the patient's superior (+z) points."""
    base = geometry.project_points(projection, point_mm[None])[0]
    up = geometry.project_points(projection, (point_mm + np.array([0.0, 0.0, 20.0]))[None])[0]
    direction = up - base
    norm = np.linalg.norm(direction)
    if norm < 1e-6:  # looking along z: no superior direction in this view
        raise DataError("a view looks along the patient's long axis; AP and lateral views are needed")
    return direction / norm


def _head_in_view(mask: np.ndarray, projection: np.ndarray, point_mm: np.ndarray):
    """2D head centre (u, v) and its radius in pixels in one mask, plus the distance map."""
    inside = mask > 0
    if not inside.any():
        raise DataError("the femur mask is empty")
    distance = ndimage.distance_transform_edt(inside)
    up = _superior_direction(projection, point_mm)
    vv, uu = np.nonzero(inside)
    height = uu * up[0] + vv * up[1]  # larger = more superior
    mm_per_pixel = _mm_per_pixel(projection, point_mm)
    band_px = HEAD_BAND_MM / mm_per_pixel
    top = height >= height.max() - band_px
    depth = distance[vv[top], uu[top]]
    # The head is the round top end: its largest inscribed circle reaches the top of the mask.
    # Deeper points lower down (the intertrochanteric region of a small or valgus femur can be as
    # wide as the head) are penalised by how far their circle stays below the mask's top.
    gap = (height.max() - height[top]) - depth
    score = depth - 2.0 * np.maximum(gap - HEAD_TOP_TOLERANCE_MM / mm_per_pixel, 0.0)
    best = np.argmax(score)
    return np.array([uu[top][best], vv[top][best]], float), float(depth[best]), distance


def locate_femoral_head(projections: list[np.ndarray], masks: list[np.ndarray],
                        view_names: list[str] | None = None) -> HeadEstimate:
    """Estimate the femoral head centre in world mm from two views and femur masks.

    ``view_names`` only name the views in error messages.

    Raises
    ------
    DataError
        If a mask is empty or the head cannot be found consistently in both views.
    """
    if len(projections) != 2 or len(masks) != 2:
        raise DataError("two views with masks are needed to locate the femur")
    names = list(view_names) if view_names is not None else ["first", "second"]
    for name, mask in zip(names, masks):
        if not np.any(mask):
            raise DataError(f"the femur mask of view '{name}' is empty")
    pair = geometry.view_pair_check(projections[0], projections[1])
    rough = np.asarray(pair.midpoint_mm, float)
    # Reference view: the one looking most nearly along the patient's y (anteroposterior) axis.
    along_y = [abs(geometry.principal_direction(p)[1]) for p in projections]
    ref = int(np.argmax(along_y))
    other = 1 - ref
    uv_ref, radius_px, _ = _head_in_view(masks[ref], projections[ref], rough)
    distance_other = ndimage.distance_transform_edt(masks[other] > 0)

    origin, direction = geometry.pixel_rays(projections[ref], uv_ref[None])
    origin, direction = origin[0], direction[0]
    depth_rough = float(np.dot(rough - origin, direction))
    # Search +-250 mm around the rough depth in 0.5 mm steps: covers any table height.
    depths = depth_rough + np.arange(-250.0, 250.0, 0.5)
    points = origin[None] + depths[:, None] * direction[None]
    uv = geometry.project_points(projections[other], points)
    rows, cols = masks[other].shape
    valid = (uv[:, 0] >= 0) & (uv[:, 0] <= cols - 1) & (uv[:, 1] >= 0) & (uv[:, 1] <= rows - 1)
    if not valid.any():
        raise DataError("the femoral head seen in one view falls outside the other radiograph; "
                        "check the projection matrices")
    score = np.full(len(depths), -1.0)
    score[valid] = ndimage.map_coordinates(distance_other, [uv[valid, 1], uv[valid, 0]], order=1)
    if score.max() <= 0:
        raise DataError("the two femur masks do not overlap along the epipolar line of the femoral "
                        "head; check that both masks show the same femur and the calibration")
    # Among near-maximal depths take the middle one: the mask's depth profile has a plateau.
    near_best = np.nonzero(score >= score.max() - 0.5)[0]
    best = near_best[len(near_best) // 2]
    centre = points[best]
    pixel_mm = _mm_per_pixel(projections[ref], centre)
    uv_pair = [None, None]
    uv_pair[ref] = uv_ref
    uv_pair[other] = uv[best]
    log.info("femoral head located at %s mm (reference view %d)", np.round(centre, 1), ref)
    return HeadEstimate(centre_mm=centre, radius_mm=radius_px * pixel_mm, reference_view=ref,
                        pixels_2d=(uv_pair[0], uv_pair[1]))


# --------------------------------------------------------------------------------------------
# Shaft axis from the two masks
# --------------------------------------------------------------------------------------------

#: Sections of the shaft closer than this to where a mask ends are not used (the mask tapers or
#: is cut there, by the image border or by a drawn line).
SHAFT_END_MARGIN_MM = 5.0
#: Least length of shaft (mm) below the start point that each mask must show.
MIN_SHAFT_LENGTH_MM = 20.0
#: Planes back-projected from the two views' 2D shaft lines closer than this (degrees) do not
#: define a line well (nearly parallel views).
MIN_PLANE_ANGLE_DEG = 15.0


@dataclass(frozen=True)
class ShaftAxis:
    point_mm: np.ndarray  # (3,) world, on the axis, nearest the start point
    direction: np.ndarray  # (3,) unit, pointing distally (away from the start point)
    length_mm: tuple[float, ...]  # length of shaft used in each view (mm at the femur)
    rms_px: tuple[float, ...]  # RMS distance of each view's section midpoints from its 2D line


def _shaft_midline(mask: np.ndarray, projection: np.ndarray, start_mm: np.ndarray,
                   direction: np.ndarray, mm_per_px: float) -> tuple[np.ndarray, float] | None:
    """Midpoints (u, v) of the mask's cross-sections along the projected axis, and the length
    of shaft they span (mm); None when the mask shows too little shaft."""
    rows, cols = mask.shape
    u0, u1 = geometry.project_points(projection, np.stack([start_mm, start_mm + 100.0 * direction]))
    along = u1 - u0
    if np.linalg.norm(along) < 1e-6:
        return None
    along = along / np.linalg.norm(along)
    across = np.array([-along[1], along[0]])
    reach = int(np.ceil(80.0 / mm_per_px))  # half-width searched across (a shaft is < 40 mm wide)
    offsets = np.arange(-reach, reach + 1, dtype=float)
    midpoints = []  # one section per pixel along the axis
    for k in range(int(np.ceil(400.0 / mm_per_px))):
        centre = u0 + k * along
        line = centre[None] + offsets[:, None] * across[None]
        c = np.round(line[:, 0]).astype(int)
        r = np.round(line[:, 1]).astype(int)
        inside_image = (c >= 0) & (c < cols) & (r >= 0) & (r < rows)
        if not inside_image[reach]:
            break
        values = np.zeros(len(offsets), bool)
        values[inside_image] = mask[r[inside_image], c[inside_image]]
        # the run of mask pixels around the centre; off the mask (the end of the shaft, or a
        # gap), search a few pixels sideways
        near = np.flatnonzero(values[reach - 3:reach + 4])
        if not values[reach] and near.size == 0:
            break
        centre_index = reach if values[reach] else reach - 3 + int(near[0])
        lo = centre_index
        while lo > 0 and values[lo - 1]:
            lo -= 1
        hi = centre_index
        while hi < len(values) - 1 and values[hi + 1]:
            hi += 1
        touches = (lo == 0 or not inside_image[lo - 1]) or (hi == len(values) - 1 or not inside_image[hi + 1])
        if touches:
            break  # the section reaches the image border: not a whole section
        midpoints.append(centre + 0.5 * (offsets[lo] + offsets[hi]) * across)
    margin = int(np.ceil(SHAFT_END_MARGIN_MM / mm_per_px))
    midpoints = midpoints[:max(0, len(midpoints) - margin)]
    length_mm = len(midpoints) * mm_per_px
    if length_mm < MIN_SHAFT_LENGTH_MM:
        return None
    return np.asarray(midpoints), length_mm


def _fit_line_2d(points: np.ndarray) -> tuple[np.ndarray, float]:
    """Homogeneous line (a, b, c), a u + b v + c = 0 with (a, b) unit, fitted with one
    outlier-rejecting refit; and the RMS distance of the kept points."""
    def fit(p):
        centre = p.mean(axis=0)
        _, _, vt = np.linalg.svd(p - centre)
        normal = vt[1]
        return np.array([normal[0], normal[1], -normal @ centre])

    line = fit(points)
    distance = np.abs(points @ line[:2] + line[2])
    keep = distance <= max(1.0, 3.0 * float(np.median(distance)))
    if keep.sum() >= 10 and not keep.all():
        line = fit(points[keep])
        distance = np.abs(points[keep] @ line[:2] + line[2])
    return line, float(np.sqrt(np.mean(distance ** 2)))


def shaft_axis_from_masks(projections: list[np.ndarray], masks: list[np.ndarray], start_mm: np.ndarray,
                          direction: np.ndarray) -> ShaftAxis | None:
    """The femoral shaft axis triangulated from the two views' femur masks.

    In each view the midpoints of the mask's cross-sections, taken perpendicular to the projection
    of a first estimate of the axis (``start_mm`` below the trochanters, ``direction`` pointing
    distally) from the start point down to where the mask ends or meets the image border, are
    fitted with a 2D line. Each line back-projects to a plane through its view's source; the axis
    is the intersection of the two planes. The masks usually show far more shaft than the atlas
    field of view, and a mask edge is sharper than a reconstructed surface near the border of the
    registration grid, so this axis is the better one for the offset and the neck-shaft angle.

    Returns None (the caller keeps its first estimate) when a mask shows less than
    :data:`MIN_SHAFT_LENGTH_MM` of shaft or the two planes are nearly parallel.
    """
    start = np.asarray(start_mm, float)
    direction = np.asarray(direction, float) / np.linalg.norm(direction)
    planes, lengths, residuals = [], [], []
    for projection, mask in zip(projections, masks):
        mm_per_px = _mm_per_pixel(projection, start)
        midline = _shaft_midline(np.asarray(mask) > 0, projection, start, direction, mm_per_px)
        if midline is None:
            log.info("shaft axis from masks: a mask shows too little shaft below the trochanters")
            return None
        points, length = midline
        line, rms = _fit_line_2d(points)
        plane = np.asarray(projection, float).T @ line
        planes.append(plane / np.linalg.norm(plane[:3]))  # unit normal, offset
        lengths.append(length)
        residuals.append(rms)
    normals, offsets = np.array(planes)[:, :3], np.array(planes)[:, 3]
    axis = np.cross(normals[0], normals[1])
    sine = np.linalg.norm(axis)
    if sine < np.sin(np.radians(MIN_PLANE_ANGLE_DEG)):
        log.info("shaft axis from masks: the two back-projected planes are nearly parallel")
        return None
    axis /= sine
    if axis @ direction < 0:
        axis = -axis
    # the point of the line nearest the start point
    point = start - normals.T @ np.linalg.solve(normals @ normals.T, normals @ start + offsets)
    point = point + ((start - point) @ axis) * axis
    return ShaftAxis(point, axis, tuple(lengths), tuple(residuals))


# --------------------------------------------------------------------------------------------
# Femoral head sphere from the two masks' outlines
# --------------------------------------------------------------------------------------------

#: Least arc of the head's outline (degrees around its projected centre) each view must show.
MIN_HEAD_ARC_DEG = 120.0
#: A sphere fitted to the outlines is used only if its rays fit within this RMS (mm).
MAX_HEAD_FIT_RMS_MM = 0.8


@dataclass(frozen=True)
class HeadSphere:
    centre_mm: np.ndarray  # (3,) world
    radius_mm: float
    rms_mm: float  # RMS of (distance from the centre to each outline ray - radius)
    points: tuple[int, ...]  # outline points used in each view
    arc_deg: tuple[float, ...]  # arc of the outline covered in each view


def mask_edge_points(mask: np.ndarray) -> np.ndarray:
    """Points (u, v) halfway between each pair of 4-neighbour pixels of which one is in the mask
    and the other not: the outline with half-pixel precision."""
    mask = np.asarray(mask, bool)
    rows, cols = np.nonzero(mask[:, 1:] != mask[:, :-1])
    horizontal = np.stack([cols + 0.5, rows.astype(float)], axis=1)
    rows, cols = np.nonzero(mask[1:, :] != mask[:-1, :])
    vertical = np.stack([cols.astype(float), rows + 0.5], axis=1)
    return np.concatenate([horizontal, vertical])


def _ray_distances(centre: np.ndarray, origins: np.ndarray, directions: np.ndarray):
    """Distance from ``centre`` to each ray and the unit vectors from the rays to the centre."""
    rel = centre[None] - origins
    perpendicular = rel - (rel * directions).sum(axis=1, keepdims=True) * directions
    distance = np.linalg.norm(perpendicular, axis=1)
    return distance, perpendicular / np.maximum(distance, 1e-9)[:, None]


def _arc_coverage_deg(points: np.ndarray, centre_uv: np.ndarray, bins: int = 36) -> float:
    angles = np.degrees(np.arctan2(points[:, 1] - centre_uv[1], points[:, 0] - centre_uv[0]))
    occupied = np.unique(((angles + 180.0) // (360.0 / bins)).astype(int) % bins)
    return float(len(occupied) * 360.0 / bins)


def fit_head_sphere_to_masks(projections: list[np.ndarray], masks: list[np.ndarray], centre_mm: np.ndarray,
                             radius_mm: float, iterations: int = 12) -> HeadSphere | None:
    """Refine the femoral head sphere on the outlines of the two femur masks.

    A sphere's outline in a radiograph is where the rays from the source just touch it: every
    outline pixel's ray lies at the radius from the centre. Starting from a first estimate (the
    sphere fitted to the reconstruction), the outline points of each mask whose rays pass within
    a shrinking band around that radius (the head's outline; the neck and trochanters lie
    elsewhere) are fitted by Gauss-Newton with Huber weights on (centre, radius).

    Returns None (keep the first estimate) when a view shows less than
    :data:`MIN_HEAD_ARC_DEG` of the head's outline, the fit's RMS exceeds
    :data:`MAX_HEAD_FIT_RMS_MM`, or it moves implausibly far (> 8 mm, radius change > 4 mm).
    """
    start_centre = np.asarray(centre_mm, float)
    start_radius = float(radius_mm)
    rays = []
    for projection, mask in zip(projections, masks):
        edges = mask_edge_points(np.asarray(mask) > 0)
        if len(edges) == 0:
            return None
        origins, directions = geometry.pixel_rays(projection, edges)
        rays.append((edges, origins, directions))
    centre, radius = start_centre.copy(), start_radius
    bands = np.linspace(4.0, 1.5, iterations)
    for band in bands:
        residuals, jacobians = [], []
        for _, origins, directions in rays:
            distance, toward = _ray_distances(centre, origins, directions)
            near = np.abs(distance - radius) < band
            residuals.append(distance[near] - radius)
            # d(distance)/d(centre) = unit vector from the ray to the centre; d/d(radius) = -1
            jacobians.append(np.concatenate([toward[near], -np.ones((near.sum(), 1))], axis=1))
        r = np.concatenate(residuals)
        J = np.concatenate(jacobians)
        if len(r) < 12:
            return None
        scale = 0.5  # Huber threshold, mm
        weights = np.where(np.abs(r) <= scale, 1.0, scale / np.maximum(np.abs(r), 1e-12))
        JtW = J.T * weights
        step = np.linalg.lstsq(JtW @ J, -JtW @ r, rcond=None)[0]
        centre, radius = centre + step[:3], radius + step[3]
    used, arcs, final = [], [], []
    for (edges, origins, directions), projection in zip(rays, projections):
        distance, _ = _ray_distances(centre, origins, directions)
        near = np.abs(distance - radius) < bands[-1]
        centre_uv = geometry.project_points(projection, centre[None])[0]
        used.append(int(near.sum()))
        arcs.append(_arc_coverage_deg(edges[near], centre_uv) if near.any() else 0.0)
        final.append(distance[near] - radius)
    rms = float(np.sqrt(np.mean(np.concatenate(final) ** 2))) if sum(used) else float("inf")
    if (min(arcs) < MIN_HEAD_ARC_DEG or rms > MAX_HEAD_FIT_RMS_MM
            or np.linalg.norm(centre - start_centre) > 8.0 or abs(radius - start_radius) > 4.0):
        log.info("head sphere from masks rejected: arcs %s deg, rms %.2f mm, moved %.1f mm, radius %.1f -> %.1f mm",
                 [round(a) for a in arcs], rms, np.linalg.norm(centre - start_centre), start_radius, radius)
        return None
    return HeadSphere(centre, float(radius), rms, tuple(used), tuple(arcs))


# --------------------------------------------------------------------------------------------
# Height of the lesser trochanter from the masks' outlines
# --------------------------------------------------------------------------------------------

#: Least prominence (mm at the femur) of an outline bump taken for the lesser trochanter (the
#: masks' edges are sharp: a detector pixel is ~0.3 mm at the hip).
MIN_LT_OUTLINE_PROMINENCE_MM = 1.0
#: Depths below the head centre (in head radii) searched for the lesser trochanter's bump: the
#: trochanter lies 2.5-2.9 radii down on our specimens; bumps higher up belong to the neck and the
#: head's own outline.
LT_DEPTH_RANGE_RADII = (1.5, 4.0)


def lesser_trochanter_depth_from_masks(projections: list[np.ndarray], masks: list[np.ndarray],
                                       head_centre_mm: np.ndarray, head_radius_mm: float,
                                       shaft_point_mm: np.ndarray, shaft_direction: np.ndarray,
                                       lesser_trochanter_mm: np.ndarray, step_mm: float = 0.5) -> float | None:
    """Depth (mm below the head centre, along the shaft axis) of the lesser trochanter seen on the
    femur masks' outlines, or None where no outline shows a clear bump.

    In each view the outline's extent is read on lines perpendicular to the shaft axis (a point and
    a proximal direction), through points of the axis from :data:`LT_DEPTH_RANGE_RADII` head radii
    below the head's level, in the direction that lies in the image plane (perpendicular to the
    axis and to the view's ray) on the trochanter's side (``lesser_trochanter_mm``, e.g. the
    reconstruction's, gives the side, nothing else). The trochanter is the most prominent local
    maximum of these profiles over both views (prominence at least
    :data:`MIN_LT_OUTLINE_PROMINENCE_MM`): it stands out in profile on the view that sees it from
    the side (on our simulated pairs the lateral view, where the bump is 3-8 mm; an AP outline
    often shows it as a shoulder only).
    """
    from inference.anatomy import _peak_prominences

    centre = np.asarray(head_centre_mm, float)
    axis = np.asarray(shaft_direction, float) / np.linalg.norm(shaft_direction)  # proximal
    point = np.asarray(shaft_point_mm, float)
    foot = point + ((centre - point) @ axis) * axis  # the head centre's level on the shaft axis
    lo, hi = LT_DEPTH_RANGE_RADII
    depths_mm = np.arange(lo * head_radius_mm, hi * head_radius_mm, step_mm)
    origins = foot - depths_mm[:, None] * axis
    lt = np.asarray(lesser_trochanter_mm, float)
    side = (lt - foot) - ((lt - foot) @ axis) * axis
    distances = np.arange(0.0, 4.0 * head_radius_mm, step_mm)
    best: tuple[float, float] | None = None  # (prominence, depth)
    for projection, mask in zip(projections, masks):
        mask = np.asarray(mask) > 0
        u = np.cross(axis, lt - geometry.source_position(projection))
        if np.linalg.norm(u) < 1e-9:
            continue
        u = u / np.linalg.norm(u) * (1.0 if u @ side >= 0 else -1.0)
        points = origins[:, None, :] + distances[None, :, None] * u
        uv = geometry.project_points(projection, points.reshape(-1, 3)).reshape(len(depths_mm), len(distances), 2)
        col, row = np.round(uv[..., 0]).astype(int), np.round(uv[..., 1]).astype(int)
        valid = (row >= 0) & (row < mask.shape[0]) & (col >= 0) & (col < mask.shape[1])
        if not valid.all():
            continue  # the profile lines leave the image: this view cannot show the trochanter whole
        inside = mask[row, col]
        if not inside.any(axis=1).all():
            continue  # the mask ends within the range
        # the outline's distance from the axis: the farthest mask pixel along each line
        extent = distances[inside.shape[1] - 1 - np.argmax(inside[:, ::-1], axis=1)]
        for k, prominence in _peak_prominences(extent):
            if prominence >= MIN_LT_OUTLINE_PROMINENCE_MM and (best is None or prominence > best[0]):
                # the middle of the peak's plateau (the outline is read in whole pixels, so a
                # rounded tip is flat over a few levels; its first level would lie too high)
                end = k
                while end + 1 < len(extent) and extent[end + 1] == extent[k]:
                    end += 1
                best = (prominence, float(0.5 * (depths_mm[k] + depths_mm[end])))
    return None if best is None else best[1]
