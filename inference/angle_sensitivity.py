"""How far a view's wrongly recorded angle moves the reconstruction (mm per degree).

Why
---
A view turned about the patient's long axis by a little more or less than its projection matrix
records cannot be seen in the two radiographs: the turn leaves the epipolar lines close to the
image rows, so another femur explains both images as well as the true one (its silhouettes match
the masks as well as the truth's). Each of its points lies where the AP ray and the LAT ray that
record the true point meet, one of them turned back by the error. Nothing in the images says which
femur is right, so HipAtlas reconstructs the one the matrices describe. On held-out simulated hips
a lateral view recorded 5 deg off cost 0.11 Dice for a perfect reconstruction, our pipeline
included (session 20, docs/results/lat-ambiguity).

What
----
The error is modelled as a turn of one view's camera about the world z axis (the patient's long
axis, LPS) through the point where the two central rays meet (:func:`rotation_about_z`), as
:func:`inference.experiments.simcases.perturb_lateral` records one. :func:`true_points` maps points
of the world the recorded matrices describe to the points that the true matrices triangulate from
the same pixels, with the rays' distance there. :func:`sensitivity` gives, per view, how far a
one-degree error would move the hip centre and the femur's surface: ``report.json`` ->
``angle_sensitivity``. It grows with the femur's distance from the axis, i.e. with how well the
hip was centred in both views.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

#: The angle error the report's figures are computed for (deg): small enough for the map to be
#: linear in it, so the figures read as millimetres per degree.
REPORT_ANGLE_DEG = 1.0
#: Surface points used for the report's femur figures (spread evenly over the vertices).
MAX_POINTS = 20_000


def rotation_about_z(angle_deg: float, centre_mm: Sequence[float]) -> np.ndarray:
    """(4, 4) rotation by ``+angle_deg`` about the world z axis through ``centre_mm``: a view turned
    by that error is recorded as ``P @ T``."""
    angle_rad = math.radians(angle_deg)
    transform = np.eye(4)
    transform[:2, :2] = [[math.cos(angle_rad), -math.sin(angle_rad)], [math.sin(angle_rad), math.cos(angle_rad)]]
    centre = np.asarray(centre_mm, float)
    transform[:3, 3] = centre - transform[:3, :3] @ centre
    return transform


def apply_affine(transform: np.ndarray, points_mm: np.ndarray) -> np.ndarray:
    """``transform`` (4, 4) applied to points (N, 3)."""
    return np.asarray(points_mm, float) @ transform[:3, :3].T + transform[:3, 3]


def closest_approach(origin1_mm: np.ndarray, through1_mm: np.ndarray, origin2_mm: np.ndarray,
                     through2_mm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Midpoints (N, 3) and distances (N,) of closest approach of the lines ``origin1 -> through1``
    and ``origin2 -> through2`` (origins (3,) or (N, 3), points (N, 3), mm). The lines must not be
    parallel (two views of a pair are tens of degrees apart)."""
    d1 = through1_mm - origin1_mm
    d2 = through2_mm - origin2_mm
    d1 = d1 / np.linalg.norm(d1, axis=-1, keepdims=True)
    d2 = d2 / np.linalg.norm(d2, axis=-1, keepdims=True)
    offset = origin1_mm - origin2_mm
    cosine = np.einsum("ij,ij->i", d1, d2)
    along1 = np.einsum("ij,ij->i", d1, np.broadcast_to(offset, d1.shape))
    along2 = np.einsum("ij,ij->i", d2, np.broadcast_to(offset, d2.shape))
    # normal equations of min |o1 + s d1 - o2 - t d2|
    denominator = 1.0 - cosine * cosine
    s = (cosine * along2 - along1) / denominator
    t = (along2 - cosine * along1) / denominator
    point1 = origin1_mm + s[:, None] * d1
    point2 = origin2_mm + t[:, None] * d2
    return 0.5 * (point1 + point2), np.linalg.norm(point1 - point2, axis=-1)


def rotation_centre(projections: Sequence[np.ndarray]) -> np.ndarray:
    """The point (mm) where the two views' central rays meet (their closest approach): the turns'
    axis passes through it."""
    from inference import geometry

    return np.asarray(geometry.view_pair_check(projections[0], projections[1]).midpoint_mm, float)


def true_points(projections: Sequence[np.ndarray], points_mm: np.ndarray, view: int, angle_deg: float,
                centre_mm: Sequence[float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Where the true matrices put the points ``points_mm`` (N, 3) of the world that the recorded
    ones describe, when view ``view`` (0 or 1) of the pair ``projections`` (the true P of each) is
    recorded ``angle_deg`` off (``P @ T``, :func:`rotation_about_z` about ``centre_mm``, default
    :func:`rotation_centre`); and the two true rays' distance there (N,), mm.

    A recorded point ``Y`` is seen by the turned view at ``P (T Y)``: its true ray runs from that
    view's source through ``T Y``; the other view's runs from its source through ``Y``.
    """
    from inference import geometry

    projections = [np.asarray(P, float) for P in projections]
    centre = rotation_centre(projections) if centre_mm is None else np.asarray(centre_mm, float)
    points = np.asarray(points_mm, float).reshape(-1, 3)
    moved = apply_affine(rotation_about_z(angle_deg, centre), points)
    sources = [geometry.source_position(P) for P in projections]
    through = [moved if index == view else points for index in range(2)]
    return closest_approach(sources[0], through[0], sources[1], through[1])


def recorded_point(projections: Sequence[np.ndarray], true_point_mm: Sequence[float], view: int, angle_deg: float,
                   centre_mm: Sequence[float] | None = None) -> np.ndarray:
    """Where the recorded matrices triangulate the two true projections of ``true_point_mm`` (3,):
    the inverse of :func:`true_points` (the turned view's recorded ray is ``T^-1`` of its true one)."""
    from inference import geometry

    projections = [np.asarray(P, float) for P in projections]
    centre = rotation_centre(projections) if centre_mm is None else np.asarray(centre_mm, float)
    back = np.linalg.inv(rotation_about_z(angle_deg, centre))
    point = np.asarray(true_point_mm, float)[None]
    origins, through = [], []
    for index, P in enumerate(projections):
        source = geometry.source_position(P)[None]
        origins.append(apply_affine(back, source) if index == view else source)
        through.append(apply_affine(back, point) if index == view else point)
    found, _ = closest_approach(origins[0], through[0], origins[1], through[1])
    return found[0]


def sensitivity(projections: Sequence[np.ndarray], surface_mm: np.ndarray, hip_centre_mm: Sequence[float] | None,
                view_names: Sequence[str]) -> dict[str, Any]:
    """Per view, how far the reconstruction would move (mm per degree) if that view's recorded angle
    about the patient's long axis were :data:`REPORT_ANGLE_DEG` off: the hip centre, and the
    femur's surface points ``surface_mm`` (N, 3) on average and at most. JSON-friendly, for
    ``report.json``."""
    points = np.asarray(surface_mm, float).reshape(-1, 3)
    if len(points) > MAX_POINTS:
        points = points[np.linspace(0, len(points) - 1, MAX_POINTS).astype(int)]
    centre = rotation_centre(projections)
    entry: dict[str, Any] = {"about": "the patient's long axis (world z) through the point where the central rays meet",
                             "axis_point_mm": [float(v) for v in centre], "per_deg_of": REPORT_ANGLE_DEG}
    for view, name in enumerate(view_names[:2]):
        row: dict[str, Any] = {"hip_centre_mm_per_deg": None, "femur_mean_mm_per_deg": None,
                               "femur_max_mm_per_deg": None}
        if hip_centre_mm is not None:
            hip = np.asarray(hip_centre_mm, float)[None]
            moved, _ = true_points(projections, hip, view, REPORT_ANGLE_DEG, centre)
            row["hip_centre_mm_per_deg"] = float(np.linalg.norm(moved[0] - hip[0]) / REPORT_ANGLE_DEG)
        if len(points):
            moved, _ = true_points(projections, points, view, REPORT_ANGLE_DEG, centre)
            distance = np.linalg.norm(moved - points, axis=1) / REPORT_ANGLE_DEG
            row["femur_mean_mm_per_deg"] = float(distance.mean())
            row["femur_max_mm_per_deg"] = float(distance.max())
        entry[name] = row
    return entry
