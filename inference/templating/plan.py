"""Automatic first plan of a total hip, and what a plan changes, computed in 3D (world LPS mm).

Input: a registration output folder (``hipatlas register``: measurements.json, warped_atlas.nii.gz,
femur_labels.nii.gz) read into a :class:`NativeHip`. A :class:`Plan` holds the surgeon's choices
(implant sizes, head, stem seating and version, cup position and angles); :func:`place` turns it
into implant poses in the world and :func:`plan_changes` into the numbers a surgeon checks:
femoral offset native vs planned, head centre and cup centre-of-rotation shifts (medial/lateral,
superior/inferior, anterior/posterior), leg-length change at the femur and canal fill, with
warnings past :data:`TARGETS`.

:func:`auto_plan` makes the first plan: the largest stem that fits the canal below the lesser
trochanter, its axis on the anatomical shaft axis, its neck in the plane of the shaft axis and the
native head centre, the
neck variant and head offset that best restore the native offset, seated so that the head centre
keeps its height above the lesser trochanter; a cup from the native head diameter plus
:data:`CUP_MARGIN_MM` on the native centre of rotation at 40 deg inclination / 20 deg anteversion.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import pathlib
from dataclasses import dataclass, field

import numpy as np

from inference.errors import DataError
from inference.templating.library import CupFamily, ImplantLibrary, StemFamily

logger = logging.getLogger(__name__)

__all__ = ["PLAN_FORMAT", "TARGETS", "CANAL_HU_THRESHOLD", "CUP_MARGIN_MM", "NativeHip", "CanalProfile",
           "Plan", "PlacedPlan", "canal_profile", "native_hip_from_case_out", "native_hip_with_canal", "place",
           "plan_changes", "auto_plan", "cup_axis"]

PLAN_FORMAT = "hipatlas-plan/1"
#: Common targets of a hip plan: changes beyond these get a warning.
TARGETS = {"offset_change_mm": 5.0, "leg_length_change_mm": 5.0, "canal_fill_min": 0.8}
#: Endosteal boundary: halfway between the warped atlas's cancellous bone and marrow (at most about
#: 450 HU, inference/data/phantom.py) and its cortex (1200-1800 HU); on the shipped atlas it gives
#: canal widths within one voxel of the cortex's inner edge at both grids.
CANAL_HU_THRESHOLD = 600.0
#: Cup outer diameter = native head diameter + this (cartilage on both surfaces plus reaming).
CUP_MARGIN_MM = 4.0
#: Canal levels: from this far below the lesser trochanter, every CANAL_STEP_MM, as far as the volume goes.
CANAL_START_BELOW_LT_MM = 5.0
CANAL_STEP_MM = 2.5


def _unit(v) -> np.ndarray:
    v = np.asarray(v, float)
    return v / np.linalg.norm(v)


@dataclass(frozen=True)
class CanalProfile:
    """Canal widths at levels along the shaft axis (heights relative to the lesser trochanter, mm)."""

    heights_mm: tuple[float, ...] = ()
    ml_width_mm: tuple[float, ...] = ()
    ap_width_mm: tuple[float, ...] = ()


@dataclass(frozen=True)
class NativeHip:
    """The native proximal femur in world LPS mm (from measurements.json and the volumes)."""

    side: str
    hip_centre_mm: np.ndarray
    head_radius_mm: float
    femoral_offset_mm: float
    shaft_point_mm: np.ndarray
    shaft_direction: np.ndarray       # unit, proximal (towards the head)
    neck_direction: np.ndarray        # unit, towards the head
    lesser_trochanter_height_mm: float  # along the shaft axis, from shaft_point_mm
    canal: CanalProfile = field(default_factory=CanalProfile)

    @property
    def side_sign(self) -> float:
        return 1.0 if self.side == "right" else -1.0

    @property
    def medial(self) -> np.ndarray:
        """World medial direction (LPS: a right hip's medial is +x)."""
        return np.array([self.side_sign, 0.0, 0.0])

    def neck_plane_x(self) -> np.ndarray:
        """Unit direction from the shaft axis to the head centre, perpendicular to the shaft axis.

        A stem's neck plane holds the stem axis; the native neck plane that holds the shaft axis
        and the head centre is the one in which a stem restores the head centre. The measured neck
        axis usually passes a few mm in front of or behind the shaft axis (on the shipped atlas its
        projection is 5 deg from this direction): :meth:`neck_axis_version_deg` reports the angle.
        """
        d = self.shaft_direction
        rel = self.hip_centre_mm - self.shaft_point_mm
        x = rel - (rel @ d) * d
        if np.linalg.norm(x) < 1e-6:
            raise DataError("the head centre lies on the shaft axis; check the measurements")
        return _unit(x)

    def neck_axis_version_deg(self) -> float:
        """Angle (deg, + = more anteverted) of the neck axis's projection from :meth:`neck_plane_x`."""
        d = self.shaft_direction
        n = self.neck_direction - (self.neck_direction @ d) * d
        x = self.neck_plane_x()
        angle = math.degrees(math.atan2(np.cross(x, n) @ d, x @ n))
        return -self.side_sign * angle

    def height(self, point_mm) -> float:
        """Height of a point along the shaft axis above the lesser trochanter (mm)."""
        return float((np.asarray(point_mm, float) - self.shaft_point_mm) @ self.shaft_direction
                     - self.lesser_trochanter_height_mm)

    def axis_point(self, height_above_lt_mm: float) -> np.ndarray:
        return self.shaft_point_mm + (self.lesser_trochanter_height_mm + height_above_lt_mm) * self.shaft_direction


def native_hip_from_measurements(m: dict, canal: CanalProfile = CanalProfile()) -> NativeHip:
    from inference.measure import validate_measurements

    validate_measurements(m)
    if m["vertical_offset_mm"] is None:
        raise DataError("measurements.json has no vertical_offset_mm (lesser trochanter); a plan needs it "
                        "for the leg length")
    centre = np.asarray(m["hip_centre_mm"], float)
    point = np.asarray(m["shaft_axis"]["point_mm"], float)
    d = _unit(m["shaft_axis"]["direction"])
    if (centre - point) @ d < 0:
        d = -d
    neck = _unit(m["neck_axis"]["direction"])
    lt_height = float((centre - point) @ d - m["vertical_offset_mm"])
    return NativeHip(m["side"], centre, float(m["head_radius_mm"]), float(m["femoral_offset_mm"]), point, d,
                     neck, lt_height, canal)


def canal_profile(hu: np.ndarray, labels: np.ndarray, geometry, native: NativeHip, *, femur_label: int = 1,
                  threshold_hu: float = CANAL_HU_THRESHOLD, step_mm: float = 0.25,
                  reach_mm: float = 40.0) -> CanalProfile:
    """Endosteal canal widths (ML in the neck plane, AP across it) below the lesser trochanter.

    At each level the boundary along each of four half-rays from the shaft axis is the first sample
    at or above ``threshold_hu`` or outside the femur label. Levels whose axis point is outside
    the femur, or whose rays leave the volume before meeting the cortex, are left out.
    """
    from scipy.ndimage import map_coordinates

    w2i = geometry.world_to_index()
    shape = np.asarray(hu.shape)
    x = native.neck_plane_x()
    y = np.cross(native.shaft_direction, x)
    radii = np.arange(0.0, reach_mm, step_mm)
    heights, ml, ap = [], [], []
    h = -CANAL_START_BELOW_LT_MM
    while True:
        centre = native.axis_point(h)
        kji = (w2i[:3, :3] @ centre + w2i[:3, 3])[::-1]
        if np.any(kji < 0) or np.any(kji > shape - 1):
            break
        widths = []
        for direction in (x, -x, y, -y):
            pts = centre[None] + radii[:, None] * direction[None]
            idx = (pts @ w2i[:3, :3].T + w2i[:3, 3])[:, ::-1].T
            inside = np.all((idx >= 0) & (idx <= shape[:, None] - 1), axis=0)
            values = map_coordinates(hu.astype(np.float32, copy=False), idx, order=1, cval=np.nan)
            lab = map_coordinates(labels, idx, order=0, cval=0)
            wall = (values >= threshold_hu) | (lab != femur_label)
            first = int(np.argmax(wall)) if wall.any() else -1
            if first < 0 or not inside[:first + 1].all():
                widths = None
                break
            radius = radii[first]
            if first > 0 and lab[first] == femur_label and values[first] > values[first - 1]:
                # Where the cortex (not the label's edge) stops the ray, place the boundary at the
                # threshold crossing between the two samples instead of on the sample grid.
                radius -= step_mm * (values[first] - threshold_hu) / (values[first] - values[first - 1])
            widths.append(radius)
        if widths is not None and widths[0] + widths[1] > 0:
            heights.append(h)
            ml.append(float(widths[0] + widths[1]))
            ap.append(float(widths[2] + widths[3]))
        h -= CANAL_STEP_MM
    return CanalProfile(tuple(heights), tuple(ml), tuple(ap))


def native_hip_from_case_out(case_out: str | os.PathLike) -> NativeHip:
    """Read a ``hipatlas register`` output folder into a :class:`NativeHip` with its canal profile."""
    from inference import io

    folder = pathlib.Path(case_out)
    if not folder.is_dir():
        raise DataError(f"{folder}: registration output folder not found")
    m = io.read_json_object(folder / "measurements.json", "measurements file")
    hu, geometry = io.read_volume(folder / "warped_atlas.nii.gz")
    labels, label_geometry = io.read_volume(folder / "femur_labels.nii.gz")
    if labels.shape != hu.shape:
        raise DataError(f"{folder}: femur_labels.nii.gz and warped_atlas.nii.gz have different grids")
    return native_hip_with_canal(m, hu, labels, geometry, where=str(folder))


def native_hip_with_canal(measurements: dict, hu: np.ndarray | None, labels: np.ndarray, geometry, *,
                          where: str = "the reconstruction") -> NativeHip:
    """The native hip of measurements and a registration's warped atlas (HU) and femur labels
    (``hu`` None: no canal, the plan's changes then say the canal fill is unknown)."""
    native = native_hip_from_measurements(measurements)
    if hu is None:
        return native
    canal = canal_profile(hu, labels, geometry, native)
    if not canal.heights_mm:
        # The plan still places the implants; its changes say that the canal fill is unknown.
        logger.warning("%s: no canal found below the lesser trochanter in the warped atlas", where)
    return dataclasses.replace(native, canal=canal)


# ----------------------------------------------------------------------------------------------
# Plan
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """The surgeon's choices (all editable; JSON via :meth:`to_dict` / :meth:`from_dict`)."""

    stem_family: str
    stem_size: str
    stem_variant: str
    head_offset_mm: float
    head_diameter_mm: float
    stem_tip_height_mm: float          # tip along the shaft axis, relative to the lesser trochanter
    stem_version_change_deg: float     # stem rotation about the shaft axis vs the native neck (+ = more anteverted)
    cup_family: str
    cup_size: str
    cup_centre_mm: tuple[float, float, float]
    cup_inclination_deg: float = 40.0
    cup_anteversion_deg: float = 20.0

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["cup_centre_mm"] = [float(v) for v in self.cup_centre_mm]
        return d

    @classmethod
    def from_dict(cls, data: dict) -> "Plan":
        names = {f.name for f in dataclasses.fields(cls)}
        missing = names - set(data) - {"cup_inclination_deg", "cup_anteversion_deg"}
        if missing:
            raise DataError(f"the plan lacks {', '.join(sorted(missing))}")
        values = {k: data[k] for k in names if k in data}
        values["cup_centre_mm"] = tuple(float(v) for v in values["cup_centre_mm"])
        return cls(**values)


def cup_axis(side: str, inclination_deg: float, anteversion_deg: float) -> np.ndarray:
    """Unit cup opening axis in world LPS (radiographic inclination and anteversion, Murray 1993).

    The axis points out of the opening: laterally (-x on a right hip), inferiorly and anteriorly
    (-y); its angle to the coronal plane is the anteversion and the angle of its coronal projection
    to the body's long axis the inclination.
    """
    i, a = math.radians(inclination_deg), math.radians(anteversion_deg)
    lateral = -1.0 if side == "right" else 1.0
    return np.array([lateral * math.sin(i) * math.cos(a), -math.sin(a), -math.cos(i) * math.cos(a)])


@dataclass(frozen=True)
class PlacedPlan:
    """A plan placed in the world: implant poses (4x4, implant frame -> world) and key points."""

    plan: Plan
    stem_to_world: np.ndarray
    cup_to_world: np.ndarray
    head_centre_mm: np.ndarray
    stem: StemFamily
    cup: CupFamily


def _rotation_about(axis, angle_deg: float) -> np.ndarray:
    k = _unit(axis)
    a = math.radians(angle_deg)
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + math.sin(a) * kx + (1 - math.cos(a)) * kx @ kx


def place(native: NativeHip, plan: Plan, library: ImplantLibrary) -> PlacedPlan:
    """Implant poses for a plan: the stem axis on the shaft axis, its neck plane turned by the version
    change from the native plane of the shaft axis and head centre, its tip at the planned height;
    the cup at its centre along :func:`cup_axis`."""
    stem, cup = library.stem(plan.stem_family), library.cup(plan.cup_family)
    z = native.shaft_direction
    # A right femur's anteversion turns the neck from medial (+x) towards anterior (-y): a negative
    # turn about the proximal axis (+z); a left femur's the opposite.
    x = _rotation_about(z, -native.side_sign * plan.stem_version_change_deg) @ native.neck_plane_x()
    stem_to_world = np.eye(4)
    stem_to_world[:3, :3] = np.stack([x, np.cross(z, x), z], 1)
    stem_to_world[:3, 3] = native.axis_point(plan.stem_tip_height_mm)
    head_local = stem.head_centre_mm(plan.stem_size, plan.stem_variant, plan.head_offset_mm)
    head = stem_to_world[:3, :3] @ head_local + stem_to_world[:3, 3]
    cz = cup_axis(native.side, plan.cup_inclination_deg, plan.cup_anteversion_deg)
    helper = np.array([0.0, 0.0, 1.0]) if abs(cz[2]) < 0.9 else np.array([0.0, 1.0, 0.0])
    cx = _unit(np.cross(helper, cz))
    cup_to_world = np.eye(4)
    cup_to_world[:3, :3] = np.stack([cx, np.cross(cz, cx), cz], 1)
    cup_to_world[:3, 3] = plan.cup_centre_mm
    return PlacedPlan(plan, stem_to_world, cup_to_world, head, stem, cup)


def _patient_components(native: NativeHip, vector) -> dict:
    """Medial (+) / superior (+) / anterior (+) components of a world vector, mm."""
    v = np.asarray(vector, float)
    return {"medial_mm": float(v @ native.medial), "superior_mm": float(v[2]), "anterior_mm": float(-v[1])}


def stem_canal_fit(native: NativeHip, placed: PlacedPlan) -> dict:
    """Canal fill of the placed stem at the canal levels it spans (ML and AP width ratios)."""
    size = placed.stem.size(placed.plan.stem_size)
    levels = np.asarray(native.canal.heights_mm)
    above_tip = levels - placed.plan.stem_tip_height_mm
    stem_ml = size.ml_width_at(above_tip)
    stem_ap = size.ap_width_at(above_tip)
    spanned = np.isfinite(stem_ml)
    if not spanned.any():
        return {"levels": 0, "fill_ml_mean": None, "fill_ml_max": None, "fill_ap_mean": None,
                "fits": None, "min_ml_gap_mm": None}
    canal_ml = np.asarray(native.canal.ml_width_mm)[spanned]
    canal_ap = np.asarray(native.canal.ap_width_mm)[spanned]
    fill_ml = stem_ml[spanned] / canal_ml
    gap = canal_ml - stem_ml[spanned]
    return {"levels": int(spanned.sum()), "fill_ml_mean": float(fill_ml.mean()), "fill_ml_max": float(fill_ml.max()),
            "fill_ap_mean": float((stem_ap[spanned] / canal_ap).mean()),
            "fits": bool(gap.min() >= 0), "min_ml_gap_mm": float(gap.min())}


def plan_changes(native: NativeHip, placed: PlacedPlan) -> dict:
    """What the plan changes (mm), the canal fill, and warnings past :data:`TARGETS`.

    Offset: the planned head centre's distance from the shaft axis minus the native femoral
    offset. Leg length at the femur: the head centre's change in height along the shaft axis
    relative to the lesser trochanter (+ = longer leg). The hip's overall changes add the cup's
    shift of the centre of rotation: a cup moved up shortens the leg, moved medially reduces the
    overall offset.
    """
    plan = placed.plan
    d = native.shaft_direction
    rel = placed.head_centre_mm - native.shaft_point_mm
    planned_offset = float(np.linalg.norm(rel - (rel @ d) * d))
    offset_change = planned_offset - native.femoral_offset_mm
    ll_change = native.height(placed.head_centre_mm) - native.height(native.hip_centre_mm)
    head_shift = _patient_components(native, placed.head_centre_mm - native.hip_centre_mm)
    cor_shift = _patient_components(native, np.asarray(plan.cup_centre_mm) - native.hip_centre_mm)
    fit = stem_canal_fit(native, placed)
    warnings = []
    if abs(offset_change) > TARGETS["offset_change_mm"]:
        warnings.append(f"femoral offset changes by {offset_change:+.1f} mm (target within "
                        f"+-{TARGETS['offset_change_mm']:g} mm)")
    if abs(ll_change) > TARGETS["leg_length_change_mm"]:
        warnings.append(f"leg length at the femur changes by {ll_change:+.1f} mm (target within "
                        f"+-{TARGETS['leg_length_change_mm']:g} mm)")
    if fit["fits"] is False:
        warnings.append(f"stem size {plan.stem_size} is {-fit['min_ml_gap_mm']:.1f} mm wider than the canal; "
                        "choose a smaller size or seat it higher")
    elif fit["fill_ml_max"] is not None and fit["fill_ml_max"] < TARGETS["canal_fill_min"]:
        # A tapered wedge locks where it is tightest: undersized if it fills the canal well nowhere.
        warnings.append(f"stem size {plan.stem_size} fills at most {100 * fit['fill_ml_max']:.0f} % of the canal "
                        "width (ML); it may be undersized")
    elif fit["fits"] is None:
        warnings.append("no canal measured where the stem sits (none found in the reconstruction below the "
                        "lesser trochanter, or the stem does not reach it): canal fill unknown, size by eye")
    cup_size = placed.cup.size(plan.cup_size)
    if plan.head_diameter_mm not in cup_size.head_diameters_mm:
        warnings.append(f"a {plan.head_diameter_mm:g} mm head does not fit cup {plan.cup_size} "
                        f"(it takes {', '.join(f'{h:g}' for h in cup_size.head_diameters_mm)} mm)")
    return {
        "native_offset_mm": native.femoral_offset_mm,
        "planned_offset_mm": planned_offset,
        "offset_change_mm": offset_change,
        "leg_length_change_mm": ll_change,
        "head_centre_shift": head_shift,
        "cup_cor_shift": cor_shift,
        "hip_leg_length_change_mm": ll_change - cor_shift["superior_mm"],
        "hip_offset_change_mm": offset_change - cor_shift["medial_mm"],
        "canal_fit": fit,
        "warnings": warnings,
    }


# ----------------------------------------------------------------------------------------------
# Automatic first plan
# ----------------------------------------------------------------------------------------------
def _seat_for_leg_length(native: NativeHip, stem: StemFamily, size: str, variant: str, head_offset_mm: float,
                         leg_length_change_mm: float = 0.0) -> float:
    """Tip height (above the lesser trochanter) that gives the head centre the wanted height."""
    head_local = stem.head_centre_mm(size, variant, head_offset_mm)
    return native.height(native.hip_centre_mm) + leg_length_change_mm - float(head_local[2])


def best_neck(stem: StemFamily, size: str, target_offset_mm: float) -> tuple[str, float]:
    """Variant and head offset whose offset is closest to the target (ties: listed variant order,
    then the smaller head offset)."""
    options = []
    for vi, variant in enumerate(stem.variants):
        sin_a = math.sin(math.radians(variant.neck_shaft_angle_deg))
        for h in stem.head_offsets_mm:
            offset = stem.size(size).offset_mm[variant.name] + h * sin_a
            options.append((round(abs(offset - target_offset_mm), 6), abs(h), vi, variant.name, h))
    best = min(options)
    return best[3], best[4]


def auto_plan(native: NativeHip, library: ImplantLibrary, *, stem_family: str | None = None,
              cup_family: str | None = None, cup_inclination_deg: float = 40.0,
              cup_anteversion_deg: float = 20.0) -> Plan:
    """The automatic first plan (module docstring)."""
    stem, cup = library.stem(stem_family), library.cup(cup_family)
    wanted_cup = 2.0 * native.head_radius_mm + CUP_MARGIN_MM
    cups = [c for c in cup.sizes if c.outer_diameter_mm >= wanted_cup - 1e-6] or [cup.sizes[-1]]
    cup_size = cups[0]
    heads = [h for h in stem.head_diameters_mm if h in cup_size.head_diameters_mm]
    if not heads:
        raise DataError(f"no head of stem family {stem.id!r} fits cup {cup_size.size} of {cup.id!r}")
    chosen = None
    for size in reversed(stem.sizes):
        variant, head_offset = best_neck(stem, size.size, native.femoral_offset_mm)
        tip = _seat_for_leg_length(native, stem, size.size, variant, head_offset)
        plan = Plan(stem.id, size.size, variant, head_offset, max(heads), tip, 0.0, cup.id, cup_size.size,
                    tuple(float(v) for v in native.hip_centre_mm), cup_inclination_deg, cup_anteversion_deg)
        fit = stem_canal_fit(native, place(native, plan, library))
        chosen = plan
        if fit["fits"]:
            break
    logger.info("auto plan: stem %s %s head %+g mm, cup %s", chosen.stem_size, chosen.stem_variant,
                chosen.head_offset_mm, chosen.cup_size)
    return chosen


# ----------------------------------------------------------------------------------------------
# Implant surfaces and outlines of a placed plan; the plan document; headless planning
# ----------------------------------------------------------------------------------------------
#: Implant shapes in their own frames, by family and choice (an edit that keeps a shape reuses it).
_PARTS_CACHE: dict = {}
_PARTS_CACHE_SIZE = 64


def _implant_parts(placed: PlacedPlan) -> dict:
    """The placed plan's implant meshes in the stem and cup frames (cached): ``body``, ``neck``,
    ``head``, ``stem`` (body and neck), ``body_pieces`` (convex pieces of the body) and ``cup``."""
    from inference.templating import meshes

    plan, stem, cup = placed.plan, placed.stem, placed.cup
    key = (id(stem), stem.id, stem.version, plan.stem_size, plan.stem_variant, plan.head_offset_mm,
           plan.head_diameter_mm, id(cup), cup.id, cup.version, plan.cup_size)
    parts = _PARTS_CACHE.get(key)
    if parts is None:
        parts = meshes.stem_meshes(stem, plan.stem_size, plan.stem_variant, plan.head_offset_mm,
                                   plan.head_diameter_mm)
        parts["stem"] = meshes.merge_meshes([parts["body"], parts["neck"]])
        parts["body_pieces"] = meshes.body_pieces(parts["body"])
        parts["cup"] = meshes.cup_mesh(cup, plan.cup_size)
        for value in parts.values():   # shared by every later call: read-only
            for array in ([value.vertices, value.faces] if hasattr(value, "faces") else value):
                array.flags.writeable = False
        if len(_PARTS_CACHE) >= _PARTS_CACHE_SIZE:
            _PARTS_CACHE.pop(next(iter(_PARTS_CACHE)))
        _PARTS_CACHE[key] = parts
    return parts


def implant_meshes(placed: PlacedPlan) -> dict:
    """World-space meshes ``{"stem", "head", "cup"}`` (the stem = body and neck shells)."""
    parts = _implant_parts(placed)
    return {"stem": parts["stem"].transformed(placed.stem_to_world),
            "head": parts["head"].transformed(placed.stem_to_world),
            "cup": parts["cup"].transformed(placed.cup_to_world)}


def implant_outlines(placed: PlacedPlan, P) -> dict:
    """Outlines ``{"stem", "head", "cup"}`` (lists of (M, 2) pixel polygons) on a view with ``P``."""
    from inference.templating import meshes

    parts = _implant_parts(placed)

    def world(points):
        return points @ placed.stem_to_world[:3, :3].T + placed.stem_to_world[:3, 3]

    stem_pieces = [world(p) for p in parts["body_pieces"]] + [world(parts["neck"].vertices)]
    cup = parts["cup"].transformed(placed.cup_to_world)
    return meshes.projected_outlines(P, {"head": world(parts["head"].vertices), "cup": cup.vertices},
                                     pieces={"stem": stem_pieces})


def _plain(v):
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def plan_document(native: NativeHip, placed: PlacedPlan, changes: dict, *, case_out: str | None = None) -> dict:
    """The plan.json content (docs/templating.md)."""
    import datetime

    from inference import __version__

    return _plain({
        "format": PLAN_FORMAT,
        "software": {"name": "hipatlas", "version": __version__},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "case_out": case_out,
        "side": native.side,
        "plan": placed.plan.to_dict(),
        "implants": {
            "stem": {"family": placed.stem.id, "name": placed.stem.name, "version": placed.stem.version,
                     "size": placed.plan.stem_size, "variant": placed.plan.stem_variant,
                     "head_offset_mm": placed.plan.head_offset_mm, "head_diameter_mm": placed.plan.head_diameter_mm},
            "cup": {"family": placed.cup.id, "name": placed.cup.name, "version": placed.cup.version,
                    "size": placed.plan.cup_size},
        },
        "native": {"hip_centre_mm": native.hip_centre_mm, "head_radius_mm": native.head_radius_mm,
                   "femoral_offset_mm": native.femoral_offset_mm,
                   "shaft_axis": {"point_mm": native.shaft_point_mm, "direction": native.shaft_direction},
                   "lesser_trochanter_mm": native.axis_point(0.0),
                   "neck_axis_version_deg": native.neck_axis_version_deg()},
        "poses": {"stem_to_world": placed.stem_to_world, "cup_to_world": placed.cup_to_world},
        "planned": {"head_centre_mm": placed.head_centre_mm,
                    "cup_axis": placed.cup_to_world[:3, 2]},
        "changes": changes,
        "canal": {"heights_above_lesser_trochanter_mm": list(native.canal.heights_mm),
                  "ml_width_mm": list(native.canal.ml_width_mm), "ap_width_mm": list(native.canal.ap_width_mm)},
        "files": {"stem": "stem.stl", "head": "head.stl", "cup": "cup.stl"},
    })


def write_plan(out_dir: str | os.PathLike, native: NativeHip, placed: PlacedPlan, *, case_out: str | None = None,
               overwrite: bool = False) -> dict:
    """Write ``plan.json`` and the implant STLs (world mm) into a new folder, all or nothing."""
    from inference import io
    from inference.mesh import write_stl

    changes = plan_changes(native, placed)
    document = plan_document(native, placed, changes, case_out=case_out)
    with io.atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        for name, mesh in implant_meshes(placed).items():
            path = write_stl(tmp / document["files"][name], mesh, header=f"HipAtlas planned {name} (world LPS mm)")
            path.chmod(io.plain_mode())  # write_stl's temporary file is private (0600); plan.json is not
        io.write_json_atomic(tmp / "plan.json", document)
    return document


def plan_case_out(case_out: str | os.PathLike, *, library: ImplantLibrary | None = None, **options):
    """Native hip, automatic plan and its placement for a registration output folder."""
    from inference.templating.library import load_library

    library = library or load_library()
    native = native_hip_from_case_out(case_out)
    plan = auto_plan(native, library, **options)
    return native, place(native, plan, library)
