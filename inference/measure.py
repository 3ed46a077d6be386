"""Surgical measurements of the proximal femur (``measurements.json``, docs/case-format.md).

All values are in the frame of the input (world LPS mm for a registration result) and degrees:

- ``hip_centre_mm``: centre of the femoral head sphere; ``head_radius_mm`` its radius.
- ``femoral_offset_mm``: perpendicular distance from the head centre to the shaft axis.
- ``neck_shaft_angle_deg``: angle between the neck axis (pointing to the head) and the shaft axis
  pointing distally, i.e. the CCD angle, measured in 3D (typically 120-140 degrees).
- ``vertical_offset_mm``: height of the head centre above the lesser trochanter tip, along the
  shaft axis.
- ``shaft_axis``/``neck_axis``: a point and a unit direction each; the shaft direction points
  proximally (towards the head), the neck direction from the neck towards the head.

:func:`measurements_from_landmarks` recomputes everything from landmark positions alone, so the GUI
can update the numbers when the surgeon moves a landmark.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from inference.anatomy import FemurLandmarks, femur_landmarks, femur_landmarks_from_labels
from inference.data.mesh import Mesh
from inference.errors import DataError

logger = logging.getLogger(__name__)

__all__ = [
    "MEASUREMENT_KEYS",
    "measure_femur",
    "measurements_from_landmarks",
    "measurements_from_femur_landmarks",
    "validate_measurements",
]

#: Keys of measurements.json, in the documented order.
MEASUREMENT_KEYS = (
    "side",
    "hip_centre_mm",
    "head_radius_mm",
    "femoral_offset_mm",
    "neck_shaft_angle_deg",
    "vertical_offset_mm",
    "shaft_axis",
    "neck_axis",
)


def _point(value, name: str) -> np.ndarray:
    try:
        v = np.asarray(value, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise DataError(f"{name} must be 3 numbers (x, y, z in mm), not {value!r}") from None
    if v.shape != (3,) or not np.all(np.isfinite(v)):
        raise DataError(f"{name} must be 3 finite numbers (x, y, z in mm), not {value!r}")
    return v


def _direction(value, name: str) -> np.ndarray:
    v = _point(value, name)
    n = float(np.linalg.norm(v))
    if n < 1e-9:
        raise DataError(f"{name} must be a non-zero direction, not {value!r}")
    return v / n


def _floats(v: np.ndarray) -> list[float]:
    return [float(x) + 0.0 for x in v]  # + 0.0 turns -0.0 into 0.0 for tidy JSON


def measurements_from_landmarks(
    side: str,
    head_centre_mm,
    head_radius_mm: float,
    shaft_point_mm,
    shaft_direction,
    neck_point_mm,
    neck_direction=None,
    lesser_trochanter_mm=None,
) -> dict:
    """The measurements.json dict from landmark positions (any frame, mm).

    Parameters
    ----------
    side : {"left", "right"}
    head_centre_mm : (3,)
        Femoral head centre.
    head_radius_mm : float
        Femoral head radius (> 0).
    shaft_point_mm, shaft_direction : (3,)
        A point on the shaft axis and its direction (either sense: it is turned to point
        towards the head).
    neck_point_mm : (3,)
        A point on the neck axis (e.g. the centre of the narrowest neck section).
    neck_direction : (3,), optional
        Neck axis direction (either sense: it is turned to point towards the head). If omitted,
        the neck axis runs from ``neck_point_mm`` through the head centre.
    lesser_trochanter_mm : (3,), optional
        Lesser trochanter tip; without it ``vertical_offset_mm`` is ``None``.

    Returns
    -------
    dict
        Keys :data:`MEASUREMENT_KEYS`, JSON-serialisable (floats and lists of floats).

    Raises
    ------
    DataError
        For non-finite or degenerate input (zero directions, neck parallel to nothing, ...).
    """
    if side not in ("left", "right"):
        raise DataError(f"side must be 'left' or 'right', not {side!r}")
    centre = _point(head_centre_mm, "head_centre_mm")
    try:
        radius = float(head_radius_mm)
    except (TypeError, ValueError):
        raise DataError(f"head_radius_mm must be a number, not {head_radius_mm!r}") from None
    if not (math.isfinite(radius) and radius > 0):
        raise DataError(f"head_radius_mm must be > 0 mm, not {head_radius_mm!r}")
    shaft_point = _point(shaft_point_mm, "shaft_point_mm")
    shaft_dir = _direction(shaft_direction, "shaft_direction")
    neck_point = _point(neck_point_mm, "neck_point_mm")
    if neck_direction is None:
        neck_dir = _direction(centre - neck_point, "neck axis (head centre - neck point)")
    else:
        neck_dir = _direction(neck_direction, "neck_direction")

    # Orient the axes: shaft towards the head (proximal), neck from the neck towards the head.
    if (centre - shaft_point) @ shaft_dir < 0:
        shaft_dir = -shaft_dir
    if (centre - neck_point) @ neck_dir < 0:
        neck_dir = -neck_dir

    rel = centre - shaft_point
    offset = float(np.linalg.norm(rel - (rel @ shaft_dir) * shaft_dir))
    # CCD angle: between the neck axis pointing to the head and the shaft axis pointing distally.
    angle = float(np.degrees(np.arccos(np.clip(neck_dir @ -shaft_dir, -1.0, 1.0))))
    vertical = None
    if lesser_trochanter_mm is not None:
        vertical = float((centre - _point(lesser_trochanter_mm, "lesser_trochanter_mm")) @ shaft_dir)
    return {
        "side": side,
        "hip_centre_mm": _floats(centre),
        "head_radius_mm": radius,
        "femoral_offset_mm": offset,
        "neck_shaft_angle_deg": angle,
        "vertical_offset_mm": vertical,
        "shaft_axis": {"point_mm": _floats(shaft_point), "direction": _floats(shaft_dir)},
        "neck_axis": {"point_mm": _floats(neck_point), "direction": _floats(neck_dir)},
    }


def measurements_from_femur_landmarks(landmarks: FemurLandmarks, shaft_axis=None, head=None) -> dict:
    """The measurements.json dict of a :class:`~inference.anatomy.FemurLandmarks`.

    ``shaft_axis`` (point_mm, direction) and ``head`` (centre_mm, radius_mm), optional, replace
    the landmarks' shaft axis and head sphere (e.g. those found on the radiographs' femur masks,
    :func:`inference.localize.shaft_axis_from_masks`, :func:`inference.localize.fit_head_sphere_to_masks`).
    """
    shaft_point, shaft_direction = (landmarks.shaft_point_mm, landmarks.shaft_direction) \
        if shaft_axis is None else shaft_axis
    head_centre, head_radius = (landmarks.head_centre_mm, landmarks.head_radius_mm) if head is None else head
    return measurements_from_landmarks(
        landmarks.side,
        head_centre,
        head_radius,
        shaft_point,
        shaft_direction,
        landmarks.neck_point_mm,
        landmarks.neck_direction,
        landmarks.lesser_trochanter_mm,
    )


def measure_femur(femur, geometry=None, *, side: str | None = None, label: int = 1, **kwargs) -> dict:
    """Measure a femur given as landmarks, a surface, or a label map.

    Parameters
    ----------
    femur : FemurLandmarks, Mesh or ndarray
        Landmarks (their own side is used), a closed femur surface, or a ``(z, y, x)`` label map.
    geometry : VolumeGeometry, optional
        Grid of the label map (required for a label map, ignored otherwise).
    side : {"left", "right"}
        Required for a surface or a label map.
    label : int
        Femur label value in the label map.
    **kwargs
        Passed on to :func:`inference.anatomy.femur_landmarks`.

    Returns
    -------
    dict
        measurements.json content (see the module docstring), in the frame of the input
        (world mm for a label map on a world grid).

    Raises
    ------
    DataError
        If the femur cannot be measured (no head, too little shaft, empty label, ...).
    MeshError
        If a surface is not closed.
    """
    if isinstance(femur, FemurLandmarks):
        landmarks = femur
    else:
        if side not in ("left", "right"):
            raise DataError(f"side must be 'left' or 'right' to measure a femur, not {side!r}")
        if isinstance(femur, Mesh):
            landmarks = femur_landmarks(femur, side, **kwargs)
        else:
            if geometry is None:
                raise DataError("measuring a label map needs its VolumeGeometry (origin, spacing, direction)")
            landmarks = femur_landmarks_from_labels(np.asarray(femur), geometry, side, label=label, **kwargs)
    result = measurements_from_femur_landmarks(landmarks)
    logger.info(
        "femur (%s): head r %.1f mm, offset %.1f mm, neck-shaft angle %.1f deg, vertical offset %s",
        result["side"], result["head_radius_mm"], result["femoral_offset_mm"], result["neck_shaft_angle_deg"],
        "n/a" if result["vertical_offset_mm"] is None else f"{result['vertical_offset_mm']:.1f} mm",
    )
    return result


def validate_measurements(data: dict) -> dict:
    """Check a measurements.json dict (e.g. read back from disk); return it unchanged.

    Raises
    ------
    DataError
        Naming the first missing or malformed field.
    """
    if not isinstance(data, dict):
        raise DataError(f"measurements must be a JSON object, not {type(data).__name__}")
    missing = [k for k in MEASUREMENT_KEYS if k not in data]
    if missing:
        raise DataError(f"measurements.json lacks {', '.join(missing)}")
    if data["side"] not in ("left", "right"):
        raise DataError(f"measurements.json side must be 'left' or 'right', not {data['side']!r}")
    _point(data["hip_centre_mm"], "hip_centre_mm")
    for key in ("head_radius_mm", "femoral_offset_mm", "neck_shaft_angle_deg", "vertical_offset_mm"):
        value = data[key]
        if value is None and key == "vertical_offset_mm":
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise DataError(f"measurements.json {key} must be a finite number, not {value!r}")
    if data["head_radius_mm"] <= 0:
        raise DataError(f"measurements.json head_radius_mm must be > 0, not {data['head_radius_mm']!r}")
    for axis in ("shaft_axis", "neck_axis"):
        entry = data[axis]
        if not isinstance(entry, dict) or "point_mm" not in entry or "direction" not in entry:
            raise DataError(f"measurements.json {axis} must hold point_mm and direction")
        _point(entry["point_mm"], f"{axis}.point_mm")
        d = _point(entry["direction"], f"{axis}.direction")
        if abs(np.linalg.norm(d) - 1.0) > 1e-3:
            raise DataError(f"measurements.json {axis}.direction must be a unit vector, not {entry['direction']!r}")
    return data
