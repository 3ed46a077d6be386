"""Implant templates: versioned JSON files, their validation, and the generic HipAtlas designs.

A template file describes one implant *family* (docs/templating.md): a femoral stem family with
its sizes, neck variants (neck-shaft angle and offset class) and head options, or an acetabular
cup family with its sizes. Every dimension is in millimetres or degrees and named with its unit.

Stem frame (used by every stem template): origin at the stem tip, ``+z`` along the stem axis
towards the shoulder, ``+x`` medial in the neck plane, ``y`` completes a right-handed frame. The
neck axis meets the stem axis at ``neck_axis_height_mm`` above the tip and rises medially at the
variant's neck-shaft angle; the head centre (head offset 0) lies on it, ``offset_mm`` medial of
the stem axis. A head offset ``h`` moves the head centre by ``h`` along the neck axis.

The generic designs shipped in ``resources/implants/`` are our own parametric shapes (no vendor
data): :func:`generic_stem_family` and :func:`generic_cup_family` make them, and
``tools/make_generic_implants.py`` writes them. :func:`load_library` reads a folder of templates
(the shipped one by default, plus any a hospital adds) and refuses a malformed file with one
message that names the file and the field.
"""

from __future__ import annotations

import logging
import math
import os
import pathlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from inference.errors import DataError
from inference.io import read_json_object

logger = logging.getLogger(__name__)

__all__ = [
    "TEMPLATE_FORMAT",
    "ImplantTemplateError",
    "StemVariant",
    "StemSize",
    "StemFamily",
    "CupSize",
    "CupFamily",
    "ImplantLibrary",
    "implants_dir",
    "parse_template",
    "load_template",
    "load_library",
    "generic_stem_family",
    "generic_cup_family",
]

TEMPLATE_FORMAT = "hipatlas-implant/1"


class ImplantTemplateError(DataError):
    """An implant template file is malformed (the message names the file and the field)."""


def implants_dir() -> pathlib.Path:
    """``$HIPATLAS_IMPLANTS_DIR`` if set, else the shipped ``resources/implants``."""
    from inference.resources import resources_root

    env = os.environ.get("HIPATLAS_IMPLANTS_DIR")
    if env:
        return pathlib.Path(env).expanduser()
    return resources_root() / "implants"


# ----------------------------------------------------------------------------------------------
# Validation helpers: each raises ImplantTemplateError("<where>: <field> must be ..., not ...").
# ----------------------------------------------------------------------------------------------
class _Checker:
    def __init__(self, where: str):
        self.where = where

    def fail(self, field: str, wanted: str, value: Any) -> None:
        raise ImplantTemplateError(f"{self.where}: {field} must be {wanted}, not {value!r}")

    def get(self, obj: dict, key: str, field: str) -> Any:
        if not isinstance(obj, dict):
            self.fail(field.rsplit(".", 1)[0] or field, "a JSON object", obj)
        if key not in obj:
            raise ImplantTemplateError(f"{self.where}: {field} is missing")
        return obj[key]

    def number(self, obj: dict, key: str, field: str, low: float, high: float) -> float:
        value = self.get(obj, key, field)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or not low <= value <= high:
            self.fail(field, f"a number from {low:g} to {high:g}", value)
        return float(value)

    def text(self, obj: dict, key: str, field: str) -> str:
        value = self.get(obj, key, field)
        if not isinstance(value, str) or not value.strip():
            self.fail(field, "a non-empty text", value)
        return value

    def numbers(self, obj: dict, key: str, field: str, low: float, high: float) -> tuple[float, ...]:
        value = self.get(obj, key, field)
        if not isinstance(value, list) or not value or any(
                isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                or not low <= v <= high for v in value):
            self.fail(field, f"a non-empty list of numbers from {low:g} to {high:g}", value)
        if len(set(value)) != len(value):
            self.fail(field, "a list without repeated values", value)
        return tuple(float(v) for v in value)

    def items(self, obj: dict, key: str, field: str) -> list:
        value = self.get(obj, key, field)
        if not isinstance(value, list) or not value:
            self.fail(field, "a non-empty list", value)
        return value


def _named(items, attribute: str, name: str, owner: str, what: str):
    """The item whose ``attribute`` is ``name``; a DataError listing the choices otherwise."""
    for item in items:
        if getattr(item, attribute) == name:
            return item
    raise DataError(f"{owner} has no {what} {name!r}; it has {', '.join(getattr(i, attribute) for i in items)}")


# ----------------------------------------------------------------------------------------------
# Stems
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StemVariant:
    """A neck option of a stem family (e.g. "135 standard")."""

    name: str
    neck_shaft_angle_deg: float


@dataclass(frozen=True)
class StemSize:
    """One stem size.

    ``body_heights_mm`` (ascending, first 0 = tip, last = ``length_mm`` = shoulder) with the body's
    medio-lateral and antero-posterior widths there; the body is linear between levels.
    ``offset_mm`` maps a variant name to the head centre's distance from the stem axis (head
    offset 0).
    """

    size: str
    length_mm: float
    neck_axis_height_mm: float
    offset_mm: dict
    body_heights_mm: tuple[float, ...]
    body_ml_width_mm: tuple[float, ...]
    body_ap_width_mm: tuple[float, ...]

    def _width_at(self, height_mm, widths) -> np.ndarray:
        h = np.asarray(height_mm, float)
        return np.where((h >= 0) & (h <= self.length_mm), np.interp(h, self.body_heights_mm, widths), np.nan)

    def ml_width_at(self, height_mm) -> np.ndarray:
        """Body ML width (mm) at heights above the tip; NaN outside the body."""
        return self._width_at(height_mm, self.body_ml_width_mm)

    def ap_width_at(self, height_mm) -> np.ndarray:
        """Body AP width (mm) at heights above the tip; NaN outside the body."""
        return self._width_at(height_mm, self.body_ap_width_mm)


@dataclass(frozen=True)
class StemFamily:
    id: str
    name: str
    version: str
    neck_diameter_mm: float
    taper: str
    head_offsets_mm: tuple[float, ...]
    head_diameters_mm: tuple[float, ...]
    variants: tuple[StemVariant, ...]
    sizes: tuple[StemSize, ...]
    source: str
    kind: str = "stem"

    def variant(self, name: str) -> StemVariant:
        return _named(self.variants, "name", name, f"stem family {self.id!r}", "variant")

    def size(self, name: str) -> StemSize:
        return _named(self.sizes, "size", name, f"stem family {self.id!r}", "size")

    def neck_direction(self, variant: str) -> np.ndarray:
        """Unit neck axis in the stem frame, pointing from the stem axis to the head."""
        angle = math.radians(self.variant(variant).neck_shaft_angle_deg)
        # The neck-shaft angle is between the neck (towards the head) and the stem axis pointing
        # distally (-z), as the CCD angle of measurements.json.
        return np.array([math.sin(angle), 0.0, -math.cos(angle)])

    def head_centre_mm(self, size: str, variant: str, head_offset_mm: float = 0.0) -> np.ndarray:
        """Head centre in the stem frame for a size, variant and head offset."""
        s = self.size(size)
        neck = self.neck_direction(variant)
        along = s.offset_mm[variant] / neck[0] + float(head_offset_mm)
        return np.array([0.0, 0.0, s.neck_axis_height_mm]) + along * neck


def _parse_stem(data: dict, check: _Checker) -> StemFamily:
    head_offsets = check.numbers(data, "head_offsets_mm", "head_offsets_mm", -15, 15)
    head_diameters = check.numbers(data, "head_diameters_mm", "head_diameters_mm", 22, 60)
    neck_diameter = check.number(data, "neck_diameter_mm", "neck_diameter_mm", 6, 25)
    variants = []
    for i, item in enumerate(check.items(data, "variants", "variants")):
        variants.append(StemVariant(
            check.text(item, "name", f"variants[{i}].name"),
            check.number(item, "neck_shaft_angle_deg", f"variants[{i}].neck_shaft_angle_deg", 110, 150)))
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        check.fail("variants", "a list of variants with distinct names", names)
    sizes = []
    for i, item in enumerate(check.items(data, "sizes", "sizes")):
        f = f"sizes[{i}]"
        size = check.get(item, "size", f"{f}.size")
        if not isinstance(size, str) or not size.strip():
            check.fail(f"{f}.size", "a non-empty text (the size label)", size)
        length = check.number(item, "length_mm", f"{f}.length_mm", 40, 300)
        height = check.number(item, "neck_axis_height_mm", f"{f}.neck_axis_height_mm", 10, 320)
        offsets = check.get(item, "offset_mm", f"{f}.offset_mm")
        if not isinstance(offsets, dict) or set(offsets) != set(names):
            check.fail(f"{f}.offset_mm", f"an object with one offset per variant ({', '.join(names)})", offsets)
        offset_mm = {n: check.number(offsets, n, f"{f}.offset_mm.{n}", 15, 70) for n in names}
        body = check.items(item, "body", f"{f}.body")
        if len(body) < 2:
            check.fail(f"{f}.body", "a list of at least 2 levels (tip and shoulder)", body)
        heights, ml, ap = [], [], []
        for j, level in enumerate(body):
            g = f"{f}.body[{j}]"
            heights.append(check.number(level, "height_mm", f"{g}.height_mm", 0, length))
            ml.append(check.number(level, "ml_width_mm", f"{g}.ml_width_mm", 2, 60))
            ap.append(check.number(level, "ap_width_mm", f"{g}.ap_width_mm", 2, 40))
        if heights[0] != 0 or heights[-1] != length or np.any(np.diff(heights) <= 0):
            check.fail(f"{f}.body[].height_mm", f"increasing from 0 (tip) to length_mm ({length:g})", heights)
        sizes.append(StemSize(size, length, height, offset_mm, tuple(heights), tuple(ml), tuple(ap)))
    labels = [s.size for s in sizes]
    if len(set(labels)) != len(labels):
        check.fail("sizes[].size", "distinct size labels", labels)
    return StemFamily(
        id=check.text(data, "id", "id"), name=check.text(data, "name", "name"),
        version=check.text(data, "version", "version"), neck_diameter_mm=neck_diameter,
        taper=check.text(data, "taper", "taper"), head_offsets_mm=head_offsets,
        head_diameters_mm=head_diameters, variants=tuple(variants), sizes=tuple(sizes),
        source=check.text(data, "source", "source"))


# ----------------------------------------------------------------------------------------------
# Cups
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CupSize:
    size: str
    outer_diameter_mm: float
    head_diameters_mm: tuple[float, ...]


@dataclass(frozen=True)
class CupFamily:
    id: str
    name: str
    version: str
    shell_thickness_mm: float
    sizes: tuple[CupSize, ...]
    source: str
    kind: str = "cup"

    def size(self, name: str) -> CupSize:
        return _named(self.sizes, "size", name, f"cup family {self.id!r}", "size")


def _parse_cup(data: dict, check: _Checker) -> CupFamily:
    shell = check.number(data, "shell_thickness_mm", "shell_thickness_mm", 1, 15)
    sizes = []
    for i, item in enumerate(check.items(data, "sizes", "sizes")):
        f = f"sizes[{i}]"
        size = check.text(item, "size", f"{f}.size")
        outer = check.number(item, "outer_diameter_mm", f"{f}.outer_diameter_mm", 30, 90)
        heads = check.numbers(item, "head_diameters_mm", f"{f}.head_diameters_mm", 22, 60)
        if max(heads) > outer - 2 * shell:
            check.fail(f"{f}.head_diameters_mm", f"at most the inner diameter {outer - 2 * shell:g} mm", list(heads))
        sizes.append(CupSize(size, outer, heads))
    outers = [s.outer_diameter_mm for s in sizes]
    if np.any(np.diff(outers) <= 0):
        check.fail("sizes[].outer_diameter_mm", "increasing from one size to the next", outers)
    return CupFamily(id=check.text(data, "id", "id"), name=check.text(data, "name", "name"),
                     version=check.text(data, "version", "version"), shell_thickness_mm=shell,
                     sizes=tuple(sizes), source=check.text(data, "source", "source"))


def parse_template(data: Any, where: str = "implant template") -> StemFamily | CupFamily:
    """Validate a template dict and return its family.

    Raises
    ------
    ImplantTemplateError
        One message naming ``where`` and the first malformed field.
    """
    check = _Checker(where)
    if not isinstance(data, dict):
        check.fail("the top level", "a JSON object", type(data).__name__)
    fmt = check.get(data, "format", "format")
    if fmt != TEMPLATE_FORMAT:
        check.fail("format", f"{TEMPLATE_FORMAT!r} (a template of another format version cannot be read)", fmt)
    kind = check.get(data, "kind", "kind")
    if kind == "stem":
        return _parse_stem(data, check)
    if kind == "cup":
        return _parse_cup(data, check)
    check.fail("kind", "'stem' or 'cup'", kind)
    raise AssertionError("unreachable")


def load_template(path: str | os.PathLike) -> StemFamily | CupFamily:
    """Read and validate one template file (see :func:`parse_template`)."""
    from inference.errors import CaseFormatError, InputFileError

    try:
        data = read_json_object(path, "implant template")
    except (CaseFormatError, InputFileError) as exc:
        raise ImplantTemplateError(str(exc)) from exc
    return parse_template(data, str(path))


@dataclass(frozen=True)
class ImplantLibrary:
    """The stem and cup families of one or more template folders, by id."""

    stems: dict
    cups: dict

    def stem(self, family_id: str | None = None) -> StemFamily:
        return _pick(self.stems, family_id, "stem")

    def cup(self, family_id: str | None = None) -> CupFamily:
        return _pick(self.cups, family_id, "cup")


def _pick(families: dict, family_id: str | None, kind: str):
    if not families:
        raise DataError(f"the implant library holds no {kind} family; add a template to resources/implants")
    if family_id is None:
        return families[sorted(families)[0]]
    if family_id not in families:
        raise DataError(f"no {kind} family {family_id!r} in the implant library; "
                        f"there are {', '.join(sorted(families))}")
    return families[family_id]


def load_library(*folders: str | os.PathLike) -> ImplantLibrary:
    """All ``*.json`` templates of the folders (default: :func:`implants_dir`).

    Raises
    ------
    ImplantTemplateError
        For the first malformed file, or two families with the same id.
    """
    stems: dict = {}
    cups: dict = {}
    for folder in folders or (implants_dir(),):
        folder = pathlib.Path(folder)
        if not folder.is_dir():
            raise ImplantTemplateError(f"{folder}: implant template folder not found")
        for path in sorted(folder.glob("*.json")):
            family = load_template(path)
            target = stems if family.kind == "stem" else cups
            if family.id in target:
                raise ImplantTemplateError(f"{path}: id {family.id!r} is already used by another {family.kind} template")
            target[family.id] = family
            logger.debug("implant template %s %s v%s from %s", family.kind, family.id, family.version, path)
    return ImplantLibrary(stems, cups)


# ----------------------------------------------------------------------------------------------
# The generic designs (our own parametric shapes; see docs/templating.md for the rationale)
# ----------------------------------------------------------------------------------------------
GENERIC_SOURCE = ("HipAtlas generic parametric design (no manufacturer data); dimensions chosen to span "
                  "typical adult femoral canals, see docs/templating.md")


def generic_stem_family() -> dict:
    """Template dict of the generic cementless tapered-wedge stem (10 sizes, 4 neck variants).

    Size k (1..10): length 115 + 5(k-1) mm; a double taper: the ML width grows 0.14 mm per mm
    from the tip (5 + 1.2(k-1) mm) to 70 % of the length, then flares to the shoulder; standard
    offset 33 + (k-1) mm, high offset 7 mm more; the neck axis crosses the stem axis 18 mm
    below the shoulder.
    """
    variants = [{"name": f"{angle} {kind}", "neck_shaft_angle_deg": angle}
                for angle in (135, 125) for kind in ("standard", "high")]
    sizes = []
    for k in range(10):
        length = 115.0 + 5.0 * k
        tip_ml, tip_ap = 5.0 + 1.2 * k, 5.0 + 0.8 * k
        waist = 0.7 * length
        levels = [0.0, 0.35 * length, waist, 0.85 * length, length]
        body = []
        for z in levels:
            if z <= waist:
                ml, ap = tip_ml + 0.14 * z, tip_ap + 0.06 * z
            else:
                f = (z - waist) / (length - waist)
                ml = tip_ml + 0.14 * waist + f * (8.0 + 0.4 * k)
                ap = tip_ap + 0.06 * waist + f * 2.0
            body.append({"height_mm": round(z, 2), "ml_width_mm": round(ml, 2), "ap_width_mm": round(ap, 2)})
        standard = 33.0 + 1.0 * k
        offsets = {v["name"]: round(standard + (7.0 if v["name"].endswith("high") else 0.0), 2) for v in variants}
        sizes.append({"size": str(k + 1), "length_mm": length, "neck_axis_height_mm": length - 18.0,
                      "offset_mm": offsets, "body": body})
    return {
        "format": TEMPLATE_FORMAT, "kind": "stem", "id": "hipatlas-generic-taper", "version": "1.0.0",
        "name": "HipAtlas generic tapered stem (cementless)", "source": GENERIC_SOURCE,
        "neck_diameter_mm": 12.0, "taper": "12/14",
        "head_offsets_mm": [-3.5, 0.0, 3.5, 7.0], "head_diameters_mm": [28.0, 32.0, 36.0],
        "variants": variants, "sizes": sizes,
    }


def generic_cup_family() -> dict:
    """Template dict of the generic hemispherical cup (44-66 mm outer diameter in 2 mm steps)."""
    sizes = []
    for outer in range(44, 68, 2):
        heads = [28.0] + ([32.0] if outer >= 48 else []) + ([36.0] if outer >= 52 else [])
        sizes.append({"size": str(outer), "outer_diameter_mm": float(outer), "head_diameters_mm": heads})
    return {"format": TEMPLATE_FORMAT, "kind": "cup", "id": "hipatlas-generic-hemi", "version": "1.0.0",
            "name": "HipAtlas generic hemispherical cup", "source": GENERIC_SOURCE,
            "shell_thickness_mm": 3.0, "sizes": sizes}
