"""Surgical measurements of the proximal femur (``measurements.json``, docs/case-format.md), declared once.

Every measurement is computed from one small set of **measurement landmarks** (world LPS mm for a
registration result; :data:`LANDMARK_NAMES`) plus the head radius:

- ``head_centre``: centre of the femoral head sphere;
- ``neck_point``: a point on the femoral neck axis (the axis runs from it through the head centre);
- ``shaft_point_proximal``, ``shaft_point_distal``: the two ends of the stretch of diaphysis the
  anatomical shaft axis was fitted to (their distance is the length of shaft the axis rests on);
- ``lesser_trochanter``: the lesser trochanter tip (optional).

Each landmark carries a standard uncertainty (mm). :data:`MEASUREMENTS` is the one table of
measurement descriptors: key, label, unit, clinical definition and source, normal range, the
function that computes the value from :class:`FemurAxes`, and an optional caveat. The CLI, the
pipeline, the workstation's table and 3D view, the report and the evaluation all read it. A
value's uncertainty is the landmarks' uncertainties propagated through its own function (first
order, by central differences; :func:`measurements_from_measurement_landmarks`), so a new
measurement gets its uncertainty for free.

The pipeline, the workstation (after a landmark is moved), ``hipatlas measure`` and the
evaluation all call :func:`measurements_from_measurement_landmarks` on the landmarks stored in
``measurements.json`` (``landmarks_mm``), so recomputing from unchanged landmarks reproduces the
stored values bit for bit. docs/measurements.md states the definitions, sources and the
uncertainty model.

Keys of the output (all in the frame of the input, mm and degrees):

- one key per descriptor (``hip_centre_mm``, ``head_radius_mm``, ``femoral_offset_mm``,
  ``neck_shaft_angle_deg``, ``vertical_offset_mm``, ...); ``None`` when it cannot be computed;
- ``shaft_axis``/``neck_axis``: a point and a unit direction each; the shaft direction points
  proximally (towards the head), the neck direction from the neck towards the head;
- ``uncertainty``: one standard uncertainty per value, same unit; ``display``: ``"26.0 +- 2.1 mm"``;
- ``caveats``: per value, a sentence when the value should not be relied on (e.g. too little shaft);
- ``landmarks_mm``, ``landmark_uncertainty_mm``: the inputs, to recompute from.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import TYPE_CHECKING, Any, Callable, Mapping

import numpy as np

from inference.errors import DataError

if TYPE_CHECKING:  # anatomy (scipy, meshes) is imported where a femur is measured: the table and the
    # landmark path stay light for the workstation's GUI thread (2 s of imports otherwise)
    from inference.anatomy import FemurLandmarks

logger = logging.getLogger(__name__)

__all__ = [
    "LANDMARK_NAMES",
    "MEASUREMENTS",
    "MEASUREMENT_KEYS",
    "FemurAxes",
    "Measurement",
    "MeasurementLandmarks",
    "caveat_lines",
    "format_value",
    "measure_femur",
    "measurement",
    "measurement_landmarks_from_femur",
    "measurement_landmarks_from_json",
    "measurements_from_femur_landmarks",
    "measurements_from_landmarks",
    "measurements_from_measurement_landmarks",
    "recompute_measurements",
    "validate_measurements",
]

#: The points every measurement is computed from, in display order.
LANDMARK_NAMES = ("head_centre", "neck_point", "shaft_point_proximal", "shaft_point_distal", "lesser_trochanter")
#: Where a neck point is placed when only the neck direction is known: this far from the head centre (mm).
NECK_POINT_DISTANCE_MM = 25.0
#: Length of shaft assumed when a shaft axis is given as a point and a direction only (mm).
SHAFT_POINT_SPACING_MM = 60.0

# ---- uncertainty model (docs/measurements.md, "Uncertainty") ---------------------------------
#: Standard uncertainty of each end of the shaft stretch across the axis (mm): how far diaphyseal
#: section midpoints stray from a straight line (anterior bow, metaphyseal flare, the lesser
#: trochanter's bulge in the sections, cortical asymmetry). With the two ends a shaft length L
#: apart, the axis direction is uncertain by about sqrt(2) * 2 mm / L: 4.1 deg for 40 mm of
#: shaft, 1.1 deg for 150 mm. Chosen so that the femoral offset errors reported on held-out real
#: femurs (1.4-2.9 mm with long shafts, 9.1/9.6 mm with ~60 mm of shaft below the lesser
#: trochanter, issue 13) lie within two standard uncertainties; not fitted to a data set.
SHAFT_POINT_SD_MM = 2.0
#: Default standard uncertainties (mm) of landmarks found on a reconstruction (a label map of
#: 1.3-2 mm voxels): about half a voxel for the fitted head sphere and neck axis, one voxel for the
#: lesser trochanter tip (a surface extreme, the least well defined point).
DEFAULT_LANDMARK_SD_MM = {
    "head_centre": 0.5,
    "head_radius": 0.5,
    "neck_point": 1.0,
    "shaft_point_proximal": SHAFT_POINT_SD_MM,
    "shaft_point_distal": SHAFT_POINT_SD_MM,
    "lesser_trochanter": 2.0,
}
#: Less shaft than this below the lesser trochanter (mm) makes the shaft axis, and so the femoral
#: offset and the neck-shaft angle, unreliable: held-out femurs whose radiographs showed about
#: 60 mm showed offset errors of 9 mm (issue 13), while longer shafts gave 1.4-2.9 mm. The demo
#: case rests on 79 mm. Templating radiographs should show the proximal third of the femur.
MIN_RELIABLE_SHAFT_MM = 70.0
#: Finite-difference step of the uncertainty propagation (mm).
_STEP_MM = 1e-3


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


def _floats(v) -> list[float]:
    return [float(x) + 0.0 for x in v]  # + 0.0 turns -0.0 into 0.0 for tidy JSON


# ----------------------------------------------------------------------------------------------
# Landmarks and the axes they define
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MeasurementLandmarks:
    """The inputs of every measurement: side, points (mm), head radius and their uncertainties.

    ``points_mm`` holds :data:`LANDMARK_NAMES` (``lesser_trochanter`` optional); ``sd_mm`` one
    standard uncertainty (mm, isotropic) per point and ``"head_radius"``; missing entries take
    :data:`DEFAULT_LANDMARK_SD_MM`.
    """

    side: str
    points_mm: Mapping[str, Any]
    head_radius_mm: float
    sd_mm: Mapping[str, float] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.side not in ("left", "right"):
            raise DataError(f"side must be 'left' or 'right', not {self.side!r}")
        missing = [k for k in LANDMARK_NAMES[:4] if k not in self.points_mm or self.points_mm[k] is None]
        if missing:
            raise DataError(f"cannot measure without the landmark(s) {', '.join(missing)}")
        points = {k: _point(self.points_mm[k], f"landmark {k}") for k in LANDMARK_NAMES
                  if self.points_mm.get(k) is not None}
        object.__setattr__(self, "points_mm", points)
        try:
            radius = float(self.head_radius_mm)
        except (TypeError, ValueError):
            raise DataError(f"head_radius_mm must be a number, not {self.head_radius_mm!r}") from None
        if not (math.isfinite(radius) and radius > 0):
            raise DataError(f"head_radius_mm must be > 0 mm, not {self.head_radius_mm!r}")
        object.__setattr__(self, "head_radius_mm", radius)
        sd = dict(DEFAULT_LANDMARK_SD_MM)
        for key, value in dict(self.sd_mm).items():
            if key not in sd:
                raise DataError(f"unknown landmark uncertainty {key!r}")
            value = float(value)
            if not (math.isfinite(value) and value >= 0):
                raise DataError(f"the uncertainty of {key} must be a number >= 0 mm, not {value!r}")
            sd[key] = value
        object.__setattr__(self, "sd_mm", sd)

    def moved(self, name: str, position_mm) -> "MeasurementLandmarks":
        """The same landmarks with ``name`` moved to ``position_mm``."""
        if name not in LANDMARK_NAMES:
            raise DataError(f"unknown landmark {name!r}")
        return dataclasses.replace(self, points_mm={**self.points_mm, name: _point(position_mm, f"landmark {name}")})

    def to_json(self) -> dict[str, Any]:
        return {"landmarks_mm": {k: _floats(v) for k, v in self.points_mm.items()},
                "landmark_uncertainty_mm": {k: float(v) for k, v in self.sd_mm.items()}}

    # parameter vector for the uncertainty propagation: every point coordinate, then the radius
    def _vector(self) -> tuple[list[str], np.ndarray, np.ndarray]:
        names = list(self.points_mm)
        values = np.concatenate([self.points_mm[n] for n in names] + [[self.head_radius_mm]])
        sd = np.concatenate([[self.sd_mm[n]] * 3 for n in names] + [[self.sd_mm["head_radius"]]])
        return names, values, sd

    def _from_vector(self, names: list[str], values: np.ndarray) -> "MeasurementLandmarks":
        points = {n: values[3 * i:3 * i + 3] for i, n in enumerate(names)}
        return MeasurementLandmarks(self.side, points, float(values[-1]), self.sd_mm)


@dataclasses.dataclass(frozen=True)
class FemurAxes:
    """The geometry the measurements read, derived from :class:`MeasurementLandmarks`."""

    side: str
    head_centre_mm: np.ndarray
    head_radius_mm: float
    shaft_point_mm: np.ndarray       # proximal end of the fitted shaft stretch
    shaft_direction: np.ndarray      # unit, proximal (towards the head)
    shaft_length_mm: float           # length of the fitted shaft stretch
    neck_point_mm: np.ndarray
    neck_direction: np.ndarray       # unit, from the neck towards the head
    lesser_trochanter_mm: np.ndarray | None

    @classmethod
    def of(cls, landmarks: MeasurementLandmarks) -> "FemurAxes":
        p = landmarks.points_mm
        centre = p["head_centre"]
        proximal, distal = p["shaft_point_proximal"], p["shaft_point_distal"]
        shaft = proximal - distal
        length = float(np.linalg.norm(shaft))
        if length < 1e-6:
            raise DataError("the two shaft axis points coincide; move one along the shaft")
        shaft_dir = shaft / length
        if (centre - proximal) @ shaft_dir < 0:
            shaft_dir = -shaft_dir
        neck = centre - p["neck_point"]
        if float(np.linalg.norm(neck)) < 1e-6:
            raise DataError("the neck axis point coincides with the head centre (neck axis undefined); "
                            "move it down the neck")
        return cls(landmarks.side, centre, landmarks.head_radius_mm, proximal, shaft_dir, length, p["neck_point"],
                   neck / np.linalg.norm(neck), p.get("lesser_trochanter"))

    def shaft_below_lesser_trochanter_mm(self) -> float:
        """Length of the fitted shaft stretch below the lesser trochanter (or its whole length)."""
        distal = self.shaft_point_mm - self.shaft_length_mm * self.shaft_direction
        top = self.lesser_trochanter_mm if self.lesser_trochanter_mm is not None else self.shaft_point_mm
        return float((top - distal) @ self.shaft_direction)


# ----------------------------------------------------------------------------------------------
# The measurement functions
# ----------------------------------------------------------------------------------------------
def hip_centre(axes: FemurAxes) -> np.ndarray:
    return axes.head_centre_mm


def head_radius(axes: FemurAxes) -> float:
    return axes.head_radius_mm


def femoral_offset(axes: FemurAxes) -> float:
    rel = axes.head_centre_mm - axes.shaft_point_mm
    return float(np.linalg.norm(rel - (rel @ axes.shaft_direction) * axes.shaft_direction))


def neck_shaft_angle(axes: FemurAxes) -> float:
    # between the neck axis pointing to the head and the shaft axis pointing distally
    return float(np.degrees(np.arccos(np.clip(axes.neck_direction @ -axes.shaft_direction, -1.0, 1.0))))


def vertical_offset(axes: FemurAxes) -> float | None:
    if axes.lesser_trochanter_mm is None:
        return None
    return float((axes.head_centre_mm - axes.lesser_trochanter_mm) @ axes.shaft_direction)


def neck_length(axes: FemurAxes) -> float:
    # head centre to the point of the neck axis nearest the shaft axis (where they cross in an AP view)
    w = axes.neck_point_mm - axes.shaft_point_mm
    b = float(axes.neck_direction @ axes.shaft_direction)
    d, e = float(axes.neck_direction @ w), float(axes.shaft_direction @ w)
    t = (b * e - d) / (1.0 - b * b)  # along the neck axis from the neck point (1 - b^2 > 0: CCD never 180 deg)
    return float(np.linalg.norm(axes.head_centre_mm - (axes.neck_point_mm + t * axes.neck_direction)))


def short_shaft_caveat(axes: FemurAxes) -> str | None:
    below = axes.shaft_below_lesser_trochanter_mm()
    if below >= MIN_RELIABLE_SHAFT_MM:
        return None
    return (f"the shaft axis rests on only {below:.0f} mm of shaft below the lesser trochanter "
            f"(at least {MIN_RELIABLE_SHAFT_MM:.0f} mm needed for a reliable value): use radiographs that "
            "show more of the femoral shaft")


@dataclasses.dataclass(frozen=True)
class Measurement:
    """One measurement: how it is named, defined, computed and shown.

    ``compute(axes)`` returns a float (a point: an array of 3) or None when it cannot be computed;
    ``caveat(axes)`` a sentence when the value should not be relied on, else None.
    """

    key: str                    # in measurements.json (unit in the name)
    label: str                  # for tables and reports
    unit: str                   # "mm" or "deg"
    definition: str             # the clinical definition we follow (one sentence)
    source: str                 # where the definition comes from (docs/measurements.md lists them)
    compute: Callable[[FemurAxes], Any]
    kind: str = "scalar"        # "scalar" or "point"
    normal_range: tuple[float, float] | None = None
    caveat: Callable[[FemurAxes], str | None] | None = None
    digits: int = 1
    show_in_3d: bool = True     # drawn in the 3D view (head sphere, axes, offset line)


#: The one table of measurements (order = display order).
MEASUREMENTS: tuple[Measurement, ...] = (
    Measurement(
        "hip_centre_mm", "Hip centre (x, y, z)", "mm",
        "Centre of the sphere fitted to the femoral head.",
        "Least-squares sphere fitted to the head (the centre of rotation of the hip).",
        hip_centre, kind="point"),
    Measurement(
        "head_radius_mm", "Femoral head radius", "mm",
        "Radius of the sphere fitted to the femoral head.",
        "Least-squares sphere fitted to the head; adult head diameters are typically 40-55 mm.",
        head_radius, normal_range=(19.0, 28.0)),
    Measurement(
        "femoral_offset_mm", "Femoral offset", "mm",
        "Perpendicular distance from the head centre to the anatomical shaft axis (the line through the "
        "diaphyseal section midpoints below the lesser trochanter), in 3D.",
        "Lecerf et al., Orthop Traumatol Surg Res 2009;95:210-219.",
        femoral_offset, normal_range=(30.0, 50.0), caveat=short_shaft_caveat),
    Measurement(
        "neck_shaft_angle_deg", "Neck-shaft angle (CCD)", "deg",
        "Angle between the femoral neck axis (through the head centre) and the anatomical shaft axis "
        "pointing distally, in 3D.",
        "Boese et al., Skeletal Radiol 2016;45:19-28 (systematic review: mean about 131 deg).",
        neck_shaft_angle, normal_range=(120.0, 140.0), caveat=short_shaft_caveat),
    Measurement(
        "vertical_offset_mm", "Vertical offset", "mm",
        "Height of the head centre above the tip of the lesser trochanter, along the anatomical shaft axis.",
        "Templating convention for leg length: head centre height over the lesser trochanter.",
        vertical_offset),
    Measurement(
        "neck_length_mm", "Neck length", "mm",
        "Distance from the head centre along the neck axis to where it meets the anatomical shaft axis "
        "(the point of the neck axis nearest the shaft axis, in 3D).",
        "Templating convention: head centre to the neck-shaft axis intersection.",
        neck_length, caveat=short_shaft_caveat),
)

#: Keys a measurements.json must hold (older outputs lack the later additions).
MEASUREMENT_KEYS = ("side", "hip_centre_mm", "head_radius_mm", "femoral_offset_mm", "neck_shaft_angle_deg",
                    "vertical_offset_mm", "shaft_axis", "neck_axis")


def measurement(key: str) -> Measurement:
    """The descriptor of ``key``."""
    for m in MEASUREMENTS:
        if m.key == key:
            return m
    raise KeyError(key)


def format_value(descriptor: Measurement, value, uncertainty=None, *, scale: float = 1.0, digits: int | None = None,
                 unit: str | None = None) -> str:
    """``"26.0 +- 2.1 mm"`` (a point: ``"x, y, z +- u mm"``); lengths scaled by ``scale`` (e.g. 0.1 for cm)."""
    if value is None:
        return "n/a"
    digits = descriptor.digits if digits is None else digits
    factor = scale if descriptor.unit == "mm" else 1.0
    if descriptor.kind == "point":
        text = ", ".join(f"{float(v) * factor:.{digits}f}" for v in value)
    else:
        text = f"{float(value) * factor:.{digits}f}"
    if uncertainty is not None:
        text += f" +- {float(uncertainty) * factor:.{digits}f}"
    return f"{text} {descriptor.unit if unit is None else unit}"


# ----------------------------------------------------------------------------------------------
# The one measurement path
# ----------------------------------------------------------------------------------------------
def _values(landmarks: MeasurementLandmarks) -> tuple[FemurAxes, dict[str, Any]]:
    axes = FemurAxes.of(landmarks)
    return axes, {m.key: m.compute(axes) for m in MEASUREMENTS}


def _uncertainties(landmarks: MeasurementLandmarks, values: dict[str, Any]) -> dict[str, float | None]:
    """First-order propagation of the landmarks' standard uncertainties (independent, isotropic)
    through each measurement's own function, by central differences."""
    names, x, sd = landmarks._vector()
    variance = {k: 0.0 for k, v in values.items() if v is not None}
    for i in np.flatnonzero(sd > 0):
        step = np.zeros_like(x)
        step[i] = _STEP_MM
        try:
            _, plus = _values(landmarks._from_vector(names, x + step))
            _, minus = _values(landmarks._from_vector(names, x - step))
        except DataError:
            continue
        for key in variance:
            if plus[key] is None or minus[key] is None:
                continue
            slope = (np.asarray(plus[key], float) - np.asarray(minus[key], float)) / (2 * _STEP_MM)
            variance[key] += float(np.sum(slope ** 2)) * float(sd[i]) ** 2
    return {k: (math.sqrt(variance[k]) if k in variance else None) for k in values}


def measurements_from_measurement_landmarks(landmarks: MeasurementLandmarks) -> dict[str, Any]:
    """The measurements.json dict of ``landmarks``: every value of :data:`MEASUREMENTS`, its
    uncertainty, display text and caveat, the axes and the landmarks themselves.

    This is the only place measurement values are computed; the same landmarks give the same
    dict, bit for bit.

    Raises
    ------
    DataError
        For degenerate landmarks (coinciding shaft points, neck point on the head centre).
    """
    axes, values = _values(landmarks)
    uncertainty = _uncertainties(landmarks, values)
    out: dict[str, Any] = {"side": landmarks.side}
    for m in MEASUREMENTS:
        value = values[m.key]
        out[m.key] = None if value is None else (_floats(value) if m.kind == "point" else float(value))
    out["shaft_axis"] = {"point_mm": _floats(axes.shaft_point_mm), "direction": _floats(axes.shaft_direction)}
    out["neck_axis"] = {"point_mm": _floats(axes.neck_point_mm), "direction": _floats(axes.neck_direction)}
    out["uncertainty"] = {m.key: uncertainty[m.key] for m in MEASUREMENTS}
    out["display"] = {m.key: format_value(m, values[m.key], uncertainty[m.key]) for m in MEASUREMENTS}
    caveats = {}
    for m in MEASUREMENTS:
        text = m.caveat(axes) if m.caveat is not None and values[m.key] is not None else None
        if text:
            caveats[m.key] = text
    out["caveats"] = caveats
    out["shaft_below_lesser_trochanter_mm"] = axes.shaft_below_lesser_trochanter_mm()
    out.update(landmarks.to_json())
    return out


def caveat_lines(measurements: Mapping[str, Any]) -> list[str]:
    """One line per distinct caveat of a measurements dict, naming the values it concerns."""
    grouped: dict[str, list[str]] = {}
    for key, text in (measurements.get("caveats") or {}).items():
        grouped.setdefault(text, []).append(measurement(key).label if any(m.key == key for m in MEASUREMENTS) else key)
    return [f"{', '.join(labels)}: {text}" for text, labels in grouped.items()]


def measurement_landmarks_from_json(measurements: Mapping[str, Any], *, landmarks_mm: Mapping[str, Any] | None = None,
                                    side: str | None = None) -> MeasurementLandmarks:
    """The landmarks a measurements.json dict was computed from (``landmarks_mm`` replaces them,
    wholly or in part, e.g. the landmarks a surgeon moved).

    A measurements.json written before the landmarks were stored holds only the axes: the
    landmarks are then placed on them (head centre, a neck point :data:`NECK_POINT_DISTANCE_MM`
    down the neck axis, two shaft points :data:`SHAFT_POINT_SPACING_MM` apart) with the lesser
    trochanter from ``landmarks_mm`` if given.
    """
    side = side or measurements.get("side")
    stored = measurements.get("landmarks_mm")
    if stored:
        points = dict(stored)
    else:
        try:
            centre = _point(measurements["hip_centre_mm"], "hip_centre_mm")
            shaft_point = _point(measurements["shaft_axis"]["point_mm"], "shaft_axis.point_mm")
            shaft_dir = _direction(measurements["shaft_axis"]["direction"], "shaft_axis.direction")
            neck_dir = _direction(measurements["neck_axis"]["direction"], "neck_axis.direction")
        except (KeyError, TypeError) as error:
            raise DataError(f"measurements lack the landmarks and the axes to place them ({error})") from None
        points = {"head_centre": centre, "neck_point": centre - NECK_POINT_DISTANCE_MM * neck_dir,
                  "shaft_point_proximal": shaft_point,
                  "shaft_point_distal": shaft_point - SHAFT_POINT_SPACING_MM * shaft_dir}
    points.update({k: v for k, v in (landmarks_mm or {}).items() if k in LANDMARK_NAMES})
    sd = {k: v for k, v in (measurements.get("landmark_uncertainty_mm") or {}).items() if k in DEFAULT_LANDMARK_SD_MM}
    return MeasurementLandmarks(side, points, measurements.get("head_radius_mm"), sd)


def recompute_measurements(measurements: Mapping[str, Any], landmarks_mm: Mapping[str, Any] | None = None) -> dict:
    """measurements.json recomputed from its landmarks, optionally (partly) replaced by ``landmarks_mm``:
    what the workstation shows after a landmark is moved and what ``hipatlas measure`` writes."""
    return measurements_from_measurement_landmarks(
        measurement_landmarks_from_json(measurements, landmarks_mm=landmarks_mm))


def measurement_landmarks_from_femur(femur: FemurLandmarks, shaft=None, head=None,
                                     sd_mm: Mapping[str, float] | None = None) -> MeasurementLandmarks:
    """Measurement landmarks of a :class:`~inference.anatomy.FemurLandmarks`.

    ``shaft`` (proximal point, distal point), optional, replaces the landmarks' shaft stretch and
    ``head`` (centre_mm, radius_mm) their head sphere (e.g. those found on the radiographs' femur
    masks, :func:`inference.localize.shaft_axis_from_masks`,
    :func:`inference.localize.fit_head_sphere_to_masks`). The neck point is put on the neck axis
    through the head centre, :data:`NECK_POINT_DISTANCE_MM` from it.
    """
    if shaft is None:
        # the ends of the reconstruction's shaft window, on its fitted axis
        point, direction = np.asarray(femur.shaft_point_mm, float), np.asarray(femur.shaft_direction, float)
        on_axis = lambda p: point + ((np.asarray(p, float) - point) @ direction) * direction  # noqa: E731
        shaft = (on_axis(femur.shaft_point_proximal_mm), on_axis(femur.shaft_point_distal_mm))
    centre, radius = (femur.head_centre_mm, femur.head_radius_mm) if head is None else head
    centre = _point(centre, "head centre")
    neck_dir = _direction(femur.neck_direction, "neck direction")
    if (centre - np.asarray(femur.neck_point_mm, float)) @ neck_dir < 0:
        neck_dir = -neck_dir
    points = {"head_centre": centre, "neck_point": centre - NECK_POINT_DISTANCE_MM * neck_dir,
              "shaft_point_proximal": shaft[0], "shaft_point_distal": shaft[1]}
    if femur.lesser_trochanter_mm is not None:
        points["lesser_trochanter"] = femur.lesser_trochanter_mm
    return MeasurementLandmarks(femur.side, points, radius, dict(sd_mm or {}))


def measurements_from_femur_landmarks(landmarks: FemurLandmarks, shaft=None, head=None,
                                      sd_mm: Mapping[str, float] | None = None) -> dict:
    """The measurements.json dict of a :class:`~inference.anatomy.FemurLandmarks`
    (:func:`measurement_landmarks_from_femur`)."""
    return measurements_from_measurement_landmarks(measurement_landmarks_from_femur(landmarks, shaft, head, sd_mm))


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
    """The measurements.json dict from a head, a shaft axis (point and direction, either sense),
    a neck point and optionally a neck direction (else the neck axis runs from the neck point
    through the head centre) and the lesser trochanter tip (else ``vertical_offset_mm`` is None).

    A convenience for hand-built axes: the shaft axis becomes two landmarks
    :data:`SHAFT_POINT_SPACING_MM` apart and the neck direction a neck point on the axis through
    the head centre; then :func:`measurements_from_measurement_landmarks`.
    """
    centre = _point(head_centre_mm, "head_centre_mm")
    shaft_point = _point(shaft_point_mm, "shaft_point_mm")
    shaft_dir = _direction(shaft_direction, "shaft_direction")
    neck_point = _point(neck_point_mm, "neck_point_mm")
    if neck_direction is not None:
        neck_dir = _direction(neck_direction, "neck_direction")
        if (centre - neck_point) @ neck_dir < 0:
            neck_dir = -neck_dir
        neck_point = centre - NECK_POINT_DISTANCE_MM * neck_dir
    elif np.linalg.norm(centre - neck_point) < 1e-9:
        raise DataError(f"neck axis (head centre - neck point) must be a non-zero direction, not {neck_point_mm!r}")
    points = {"head_centre": centre, "neck_point": neck_point, "shaft_point_proximal": shaft_point,
              "shaft_point_distal": shaft_point - SHAFT_POINT_SPACING_MM * shaft_dir}
    if lesser_trochanter_mm is not None:
        points["lesser_trochanter"] = _point(lesser_trochanter_mm, "lesser_trochanter_mm")
    return measurements_from_measurement_landmarks(MeasurementLandmarks(side, points, head_radius_mm))


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
    from inference.anatomy import FemurLandmarks, femur_landmarks, femur_landmarks_from_labels
    from inference.mesh import Mesh

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
    if data.get("landmarks_mm") is not None:
        measurement_landmarks_from_json(data)  # the landmarks to recompute from must be usable too
    return data
