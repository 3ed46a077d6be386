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
