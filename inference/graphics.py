"""Measurement graphics on a radiograph, computed from the 3D measurements and the view's ``P``.

Everything here is in radiograph pixels ``(u, v)`` (``docs/case-format.md``) and Qt-free, so the
workstation (``app/views/radiograph_view.py``) and the PDF report draw the same lines:

- the femoral head as the outline of the head *sphere* seen from the X-ray source (an ellipse in
  the image, not a circle of the 3D radius: the silhouette is the circle where the rays graze the
  sphere, :func:`head_silhouette_mm`);
- the shaft and neck axes, the offset (head centre to its foot on the shaft axis) and the
  vertical offset (lesser trochanter to the head centre, measured along the shaft axis);
- labelled landmarks;
- a scale bar of a round length *at the hip* and the calibration in human terms
  (:class:`ViewCalibration`: mm per pixel at the detector and at the hip, magnification at the
  hip).

Lengths written next to the lines are the 3D measurements (the projection foreshortens them).
:func:`move_in_view_plane` and :func:`epipolar_segment` serve dragging a landmark in 2D: the
point keeps its depth in the dragged view, and the other view shows the line its ray projects to.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import numpy as np

from inference import geometry
from inference.errors import DataError

__all__ = [
    "Polyline",
    "Label",
    "ScaleBar",
    "ViewCalibration",
    "ViewGraphics",
    "LANDMARK_LABELS",
    "landmark_label",
    "detector_pixel_mm",
    "case_view_pixel_mm",
    "view_calibration",
    "head_silhouette_mm",
    "view_graphics",
    "move_in_view_plane",
    "epipolar_segment",
    "clip_line_to_image",
]

#: Printed names of the landmarks (others get their key, capitalised).
LANDMARK_LABELS = {
    "head_centre": "Head centre",
    "hip_centre": "Hip centre",
    "neck_point": "Neck axis point",
    "shaft_point_proximal": "Shaft axis, proximal point",
    "shaft_point_distal": "Shaft axis, distal point",
    "lesser_trochanter": "Lesser trochanter",
    "greater_trochanter": "Greater trochanter",
}

#: Short labels drawn beside the landmark handles on a radiograph.
SHORT_LABELS = {
    "head_centre": "HC",
    "hip_centre": "HC",
    "neck_point": "NP",
    "shaft_point_proximal": "SP1",
    "shaft_point_distal": "SP2",
    "lesser_trochanter": "LT",
    "greater_trochanter": "GT",
}

#: Round scale-bar lengths at the hip (mm); the longest that fits in a fifth of the image width.
SCALE_BAR_LENGTHS_MM = (200.0, 100.0, 50.0, 20.0, 10.0, 5.0, 2.0, 1.0)
#: Shaft axis drawn this far distal of its distal point and proximal of the head centre's foot (mm).
SHAFT_MARGIN_MM = 20.0
#: Neck axis drawn at most this far from the head centre towards the shaft (mm).
NECK_MAX_LENGTH_MM = 90.0
#: Points on the head silhouette polyline.
SILHOUETTE_POINTS = 96


def landmark_label(name: str) -> str:
    return LANDMARK_LABELS.get(name, name.replace("_", " ").capitalize())


@dataclasses.dataclass(frozen=True)
class Polyline:
    """A line drawn on a radiograph: ``kind`` picks its colour, ``text`` its label."""

    kind: str                       # "head", "shaft_axis", "neck_axis", "offset", "vertical_offset", "epipolar"
    points_uv: np.ndarray           # (N, 2) pixels
    closed: bool = False
    text: str = ""
    text_uv: tuple[float, float] | None = None
    text_side: str = "right"        # where the text sits from text_uv: "above", "left" or "right"


@dataclasses.dataclass(frozen=True)
class Label:
    """A landmark handle: its key, short and long label and pixel position."""

    name: str
    short: str
    text: str
    uv: tuple[float, float]
    inside: bool                    # within the image


@dataclasses.dataclass(frozen=True)
class ScaleBar:
    start_uv: tuple[float, float]
    end_uv: tuple[float, float]
    length_mm: float
    text: str


@dataclasses.dataclass(frozen=True)
class ViewCalibration:
    """A view's calibration in human terms, at a reference point (the hip centre).

    ``mm_per_px_at_hip`` follows from ``P`` alone (depth of the hip / focal length in pixels);
    the detector pitch, and with it the source-detector distance and the magnification at the
    hip, only when the calibration or the image file records the pitch.
    """

    mm_per_px_at_hip: float
    source_to_hip_mm: float
    detector_mm_per_px: float | None
    sdd_mm: float | None
    magnification: float | None

    def lines(self) -> list[str]:
        out = [f"{self.mm_per_px_at_hip:.3f} mm per pixel at the hip "
               f"(source to hip {self.source_to_hip_mm:.0f} mm)"]
        if self.detector_mm_per_px is None:
            out.append("detector pixel size not recorded: magnification unknown")
        else:
            out.append(f"{self.detector_mm_per_px:.3f} mm per pixel at the detector "
                       f"(source to detector {self.sdd_mm:.0f} mm)")
            out.append(f"magnification at the hip {self.magnification:.2f}\u00d7")
        return out

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class ViewGraphics:
    """Everything drawn over one radiograph."""

    image_shape: tuple[int, int]    # (rows, cols)
    polylines: tuple[Polyline, ...]
    labels: tuple[Label, ...]
    scale_bar: ScaleBar | None
    calibration: ViewCalibration | None


# ------------------------------------------------------------------------------------ calibration
def detector_pixel_mm(calibration: Mapping[str, Any] | None, pixel_spacing_mm: Sequence[float] | None = None
                      ) -> float | None:
    """The detector's column pitch (mm) from a view's calibration dict or the image's spacing.

    Looks in the DICOM-derived C-arm parameters (``view.pixel_mm``), a calibration JSON's
    ``carm.pixel_mm``, then the image file's spacing ``(row, column)``; None when none says.
    """
    calibration = calibration or {}
    for holder in ("view", "carm"):
        block = calibration.get(holder)
        if isinstance(block, Mapping) and isinstance(block.get("pixel_mm"), (int, float)):
            value = float(block["pixel_mm"])
            if math.isfinite(value) and value > 0:
                return value
    if pixel_spacing_mm is not None:
        try:
            value = float(pixel_spacing_mm[1])
        except (TypeError, ValueError, IndexError):
            return None
        if math.isfinite(value) and value > 0:
            return value
    return None


def case_view_pixel_mm(view) -> float | None:
    """Detector pitch of an :class:`inference.io.CaseView` (calibration, else the image file)."""
    return detector_pixel_mm(view.calibration.to_dict(), view.image.pixel_spacing_mm)


def view_calibration(P: Any, point_mm: Any, detector_mm_per_px: float | None = None) -> ViewCalibration:
    """Pixel size and magnification at ``point_mm`` (the hip centre) in the view ``P``.

    The depth of the point along the central ray divided by the focal length in pixels
    (``K[0, 0]`` of :func:`inference.geometry.decompose`) is the size of one pixel at that depth.
    With the detector pitch ``p``: SDD = focal length x ``p``, magnification = SDD / depth.
    """
    K, R, t = geometry.decompose(P)
    point = np.asarray(point_mm, dtype=np.float64).reshape(3)
    source = geometry.source_position(P)
    depth = float(abs((point - source) @ R[2]))
    if not depth > 0:
        raise DataError("the hip centre lies in the plane of the X-ray source; check the calibration")
    focal_px = float(K[0, 0])
    mm_per_px = depth / focal_px
    sdd = magnification = None
    if detector_mm_per_px is not None:
        sdd = focal_px * float(detector_mm_per_px)
        magnification = sdd / depth
    return ViewCalibration(mm_per_px_at_hip=mm_per_px, source_to_hip_mm=depth,
                           detector_mm_per_px=None if detector_mm_per_px is None else float(detector_mm_per_px),
                           sdd_mm=sdd, magnification=magnification)


# ------------------------------------------------------------------------------------ geometry
def head_silhouette_mm(P: Any, centre_mm: Any, radius_mm: float, n: int = SILHOUETTE_POINTS) -> np.ndarray:
    """The circle on the head sphere where rays from the source graze it, ``(n, 3)`` world mm.

    With ``d`` the source-centre distance the tangent points lie in the plane perpendicular to
    the source direction at ``r^2 / d`` from the centre, on a circle of radius ``r sqrt(d^2 - r^2) / d``;
    its projection is the outline of the sphere's shadow.
    """
    centre = np.asarray(centre_mm, dtype=np.float64).reshape(3)
    radius = float(radius_mm)
    to_source = geometry.source_position(P) - centre
    distance = float(np.linalg.norm(to_source))
    if not distance > radius > 0:
        raise DataError("the X-ray source lies inside the femoral head sphere; check the calibration")
    axis = to_source / distance
    helper = np.eye(3)[int(np.argmin(np.abs(axis)))]
    e1 = np.cross(axis, helper)
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(axis, e1)
    circle_centre = centre + axis * radius ** 2 / distance
    circle_radius = radius * math.sqrt(distance ** 2 - radius ** 2) / distance
    angles = np.linspace(0.0, 2.0 * math.pi, n, endpoint=False)
    return circle_centre + circle_radius * (np.cos(angles)[:, None] * e1 + np.sin(angles)[:, None] * e2)


def _unit(vector: Any, what: str) -> np.ndarray:
    v = np.asarray(vector, dtype=np.float64).reshape(3)
    norm = float(np.linalg.norm(v))
    if not (math.isfinite(norm) and norm > 0):
        raise DataError(f"measurements {what} has no direction")
    return v / norm


def _foot(point: np.ndarray, line_point: np.ndarray, direction: np.ndarray) -> np.ndarray:
    return line_point + ((point - line_point) @ direction) * direction


def _closest_on_first(p1, d1, p2, d2) -> float | None:
    """Parameter along line 1 of its point closest to line 2 (None when parallel)."""
    w = p1 - p2
    b = d1 @ d2
    denominator = 1.0 - b * b
    if denominator < 1e-9:
        return None
    return float((b * (d2 @ w) - (d1 @ w)) / denominator)


def _scale_bar(calibration: ViewCalibration, shape: tuple[int, int]) -> ScaleBar:
    rows, cols = shape
    px_per_mm = 1.0 / calibration.mm_per_px_at_hip
    length = next((mm for mm in SCALE_BAR_LENGTHS_MM if mm * px_per_mm <= 0.2 * cols), SCALE_BAR_LENGTHS_MM[-1])
    margin = 0.04 * min(rows, cols)
    start = (margin, rows - 1 - margin)
    end = (margin + length * px_per_mm, rows - 1 - margin)
    return ScaleBar(start_uv=start, end_uv=end, length_mm=length, text=f"{length:g} mm at the hip")


def view_graphics(measurements: Mapping[str, Any], landmarks_mm: Mapping[str, Any], P: Any,
                  image_shape: tuple[int, int], *, detector_mm_per_px: float | None = None) -> ViewGraphics:
    """The measurement graphics of one view.

    Parameters
    ----------
    measurements : dict
        measurements.json content (``hip_centre_mm``, ``head_radius_mm``, the axes, values).
    landmarks_mm : dict
        Landmark name -> (3,) world mm (the editable landmarks); drawn as labelled handles.
    P : (3, 4)
        The view's projection matrix.
    image_shape : (rows, cols)
    detector_mm_per_px : float, optional
        Detector pitch (:func:`detector_pixel_mm`) for the calibration text.

    Returns
    -------
    ViewGraphics
        Polylines with NaN-free points (parts behind the source are dropped), labels, scale bar.
    """
    P = geometry.validate_projection_matrix(P)
    shape = (int(image_shape[0]), int(image_shape[1]))
    polylines: list[Polyline] = []

    def project(points) -> np.ndarray:
        return np.asarray(geometry.project_points(P, np.asarray(points, dtype=np.float64)), dtype=np.float64)

    def add(kind, points_mm, *, closed=False, text="", text_at_mm=None, text_side="right"):
        uv = project(points_mm)
        uv = uv[np.all(np.isfinite(uv), axis=1)]
        if len(uv) < 2:
            return
        text_uv = None
        if closed:  # an outline is labelled at its top
            top = uv[int(np.argmin(uv[:, 1]))]
            text_uv = (float(top[0]), float(top[1]))
        elif text_at_mm is not None:
            at = project([text_at_mm])[0]
            text_uv = (float(at[0]), float(at[1])) if np.all(np.isfinite(at)) else None
        polylines.append(Polyline(kind=kind, points_uv=uv, closed=closed, text=text, text_uv=text_uv,
                                  text_side="above" if closed else text_side))

    centre = measurements.get("hip_centre_mm")
    radius = measurements.get("head_radius_mm")
    calibration = scale_bar = None
    if centre is not None:
        centre = np.asarray(centre, dtype=np.float64).reshape(3)
        if isinstance(radius, (int, float)) and radius > 0:
            add("head", head_silhouette_mm(P, centre, float(radius)), closed=True,
                text=f"Head \u00f8 {2 * float(radius):.1f} mm")
        calibration = view_calibration(P, centre, detector_mm_per_px)
        scale_bar = _scale_bar(calibration, shape)
    shaft = measurements.get("shaft_axis")
    neck = measurements.get("neck_axis")
    if centre is not None and isinstance(shaft, Mapping):
        shaft_point = np.asarray(shaft["point_mm"], dtype=np.float64).reshape(3)
        shaft_dir = _unit(shaft["direction"], "shaft_axis")  # points proximally
        head_foot = _foot(centre, shaft_point, shaft_dir)
        along = [0.0, float((head_foot - shaft_point) @ shaft_dir)]
        for name in ("shaft_point_distal", "shaft_point_proximal", "lesser_trochanter"):
            if name in landmarks_mm:
                along.append(float((np.asarray(landmarks_mm[name], dtype=np.float64) - shaft_point) @ shaft_dir))
        low, high = min(along) - SHAFT_MARGIN_MM, max(along) + SHAFT_MARGIN_MM
        add("shaft_axis", [shaft_point + low * shaft_dir, shaft_point + high * shaft_dir])
        offset = measurements.get("femoral_offset_mm")
        add("offset", [centre, head_foot],
            text=f"Offset {float(offset):.1f} mm" if isinstance(offset, (int, float)) else "",
            text_at_mm=0.5 * (centre + head_foot), text_side="above")
        lesser = landmarks_mm.get("lesser_trochanter")
        vertical = measurements.get("vertical_offset_mm")
        if lesser is not None:
            lesser = np.asarray(lesser, dtype=np.float64).reshape(3)
            lesser_foot = _foot(lesser, shaft_point, shaft_dir)
            add("vertical_offset", [lesser, lesser_foot, head_foot],
                text=f"Vertical offset {float(vertical):.1f} mm" if isinstance(vertical, (int, float)) else "",
                text_at_mm=0.5 * (lesser_foot + head_foot), text_side="left")
        if isinstance(neck, Mapping):
            neck_dir = _unit(neck["direction"], "neck_axis")  # points towards the head
            tip = centre + float(radius or 0.0) * neck_dir
            # Draw the neck axis down to where it passes the shaft axis (the CCD angle's vertex).
            t = _closest_on_first(centre, neck_dir, shaft_point, shaft_dir)
            start_t = -NECK_MAX_LENGTH_MM if t is None else max(-NECK_MAX_LENGTH_MM, min(t, -10.0))
            start = centre + start_t * neck_dir
            angle = measurements.get("neck_shaft_angle_deg")
            add("neck_axis", [start, tip],
                text=f"CCD {float(angle):.1f}\u00b0" if isinstance(angle, (int, float)) else "",
                text_at_mm=start)

    labels = []
    rows, cols = shape
    for name, point in landmarks_mm.items():
        uv = project([point])[0]
        if not np.all(np.isfinite(uv)):
            continue
        u, v = float(uv[0]), float(uv[1])
        labels.append(Label(name=name, short=SHORT_LABELS.get(name, name[:3].upper()), text=landmark_label(name),
                            uv=(u, v), inside=bool(-0.5 <= u <= cols - 0.5 and -0.5 <= v <= rows - 0.5)))
    return ViewGraphics(image_shape=shape, polylines=tuple(polylines), labels=tuple(labels),
                        scale_bar=scale_bar, calibration=calibration)


# ------------------------------------------------------------------------------------ 2D editing
def move_in_view_plane(P: Any, point_mm: Any, uv: Sequence[float]) -> np.ndarray:
    """The world point that projects to ``uv`` at the same depth (along the central ray) as
    ``point_mm``: dragging a landmark on one radiograph moves it parallel to that detector."""
    source = geometry.source_position(P)
    _, R, _ = geometry.decompose(P)
    normal = R[2]
    point = np.asarray(point_mm, dtype=np.float64).reshape(3)
    _, direction = geometry.pixel_rays(P, np.asarray(uv, dtype=np.float64).reshape(1, 2))
    direction = direction[0]
    depth = (point - source) @ normal
    along = direction @ normal
    if abs(along) < 1e-12:
        raise DataError("that pixel's ray runs parallel to the detector; check the calibration")
    return source + (depth / along) * direction


def clip_line_to_image(line: Sequence[float], image_shape: tuple[int, int]) -> np.ndarray | None:
    """The segment of the homogeneous line ``a u + b v + c = 0`` inside the image, ``(2, 2)`` or None."""
    a, b, c = (float(x) for x in line)
    rows, cols = image_shape
    u0, v0, u1, v1 = -0.5, -0.5, cols - 0.5, rows - 0.5
    hits = []
    if abs(b) > 1e-12:
        for u in (u0, u1):
            v = -(a * u + c) / b
            if v0 - 1e-9 <= v <= v1 + 1e-9:
                hits.append((u, v))
    if abs(a) > 1e-12:
        for v in (v0, v1):
            u = -(b * v + c) / a
            if u0 - 1e-9 <= u <= u1 + 1e-9:
                hits.append((u, v))
    unique: list[tuple[float, float]] = []
    for hit in hits:
        if all(math.hypot(hit[0] - h[0], hit[1] - h[1]) > 1e-6 for h in unique):
            unique.append(hit)
    if len(unique) < 2:
        return None
    # the two hits farthest apart (a line through a corner hits it twice)
    pairs = [(math.dist(p, q), p, q) for i, p in enumerate(unique) for q in unique[i + 1:]]
    _, p, q = max(pairs)
    return np.array([p, q], dtype=np.float64)


def epipolar_segment(P_from: Any, uv: Sequence[float], P_to: Any, image_shape: tuple[int, int]) -> np.ndarray | None:
    """Where the ray through pixel ``uv`` of view ``P_from`` appears in view ``P_to``: the
    epipolar line ``F x`` with ``F = [e']_x P' P^+``, clipped to the image (``(2, 2)`` or None)."""
    P_from = geometry.validate_projection_matrix(P_from)
    P_to = geometry.validate_projection_matrix(P_to)
    epipole = P_to @ np.append(geometry.source_position(P_from), 1.0)
    cross = np.array([[0.0, -epipole[2], epipole[1]], [epipole[2], 0.0, -epipole[0]],
                      [-epipole[1], epipole[0], 0.0]])
    fundamental = cross @ P_to @ np.linalg.pinv(P_from)
    line = fundamental @ np.array([float(uv[0]), float(uv[1]), 1.0])
    if not np.all(np.isfinite(line)) or np.linalg.norm(line[:2]) < 1e-15:
        return None
    return clip_line_to_image(line, image_shape)
