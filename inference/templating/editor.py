"""A plan being edited: the current plan, its placement and changes, undo and redo (Qt-free).

The workstation's Template step drives one :class:`PlanEditor`; every edit is a new immutable
:class:`~inference.templating.plan.Plan` pushed on the undo stack, so undo/redo restore exactly
the plans the surgeon saw. Placement and changes are recomputed on demand and cached per plan.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from inference.errors import DataError
from inference.templating.library import ImplantLibrary
from inference.templating.plan import NativeHip, Plan, PlacedPlan, auto_plan, place, plan_changes

__all__ = ["PlanEditor", "CHANGE_ROWS", "change_rows"]


class PlanEditor:
    """Edit a plan for one native hip with undo/redo."""

    def __init__(self, native: NativeHip, library: ImplantLibrary, plan: Plan | None = None):
        self.native = native
        self.library = library
        self._undo: list[Plan] = []
        self._redo: list[Plan] = []
        self._plan = plan or auto_plan(native, library)
        self._cache: tuple[Plan, PlacedPlan, dict] | None = None
        self.place_and_check(self._plan)  # refuse a plan that names unknown implants now, not later

    # ------------------------------------------------------------------ state
    @property
    def plan(self) -> Plan:
        return self._plan

    def place_and_check(self, plan: Plan) -> PlacedPlan:
        stem = self.library.stem(plan.stem_family)
        stem.size(plan.stem_size)
        stem.variant(plan.stem_variant)
        self.library.cup(plan.cup_family).size(plan.cup_size)
        if plan.head_offset_mm not in stem.head_offsets_mm:
            raise DataError(f"stem family {stem.id!r} has no head offset {plan.head_offset_mm:+g} mm")
        if plan.head_diameter_mm not in stem.head_diameters_mm:
            raise DataError(f"stem family {stem.id!r} has no {plan.head_diameter_mm:g} mm head")
        return place(self.native, plan, self.library)

    @property
    def placed(self) -> PlacedPlan:
        return self._current()[1]

    @property
    def changes(self) -> dict:
        return self._current()[2]

    def _current(self):
        if self._cache is None or self._cache[0] is not self._plan:
            placed = place(self.native, self._plan, self.library)
            self._cache = (self._plan, placed, plan_changes(self.native, placed))
        return self._cache

    # ------------------------------------------------------------------ edits
    def edit(self, **fields: Any) -> Plan:
        """Change plan fields (names of :class:`Plan`); an edit that changes nothing is not recorded."""
        new = dataclasses.replace(self._plan, **fields)
        if new == self._plan:
            return self._plan
        self.place_and_check(new)
        self._undo.append(self._plan)
        self._redo.clear()
        self._plan = new
        return new

    def step_stem_size(self, step: int) -> Plan:
        """Next (+1) or previous (-1) stem size, keeping the head centre's height (re-seated)."""
        stem = self.library.stem(self._plan.stem_family)
        names = [s.size for s in stem.sizes]
        i = min(max(names.index(self._plan.stem_size) + step, 0), len(names) - 1)
        old_head = stem.head_centre_mm(self._plan.stem_size, self._plan.stem_variant, self._plan.head_offset_mm)
        new_head = stem.head_centre_mm(names[i], self._plan.stem_variant, self._plan.head_offset_mm)
        return self.edit(stem_size=names[i], stem_tip_height_mm=self._plan.stem_tip_height_mm + old_head[2] - new_head[2])

    def reset_to_auto(self, **options: Any) -> Plan:
        plan = auto_plan(self.native, self.library, stem_family=self._plan.stem_family,
                         cup_family=self._plan.cup_family, cup_inclination_deg=self._plan.cup_inclination_deg,
                         cup_anteversion_deg=self._plan.cup_anteversion_deg, **options)
        return self.edit(**dataclasses.asdict(plan))

    @property
    def can_undo(self) -> bool:
        return bool(self._undo)

    @property
    def can_redo(self) -> bool:
        return bool(self._redo)

    def undo(self) -> Plan:
        if self._undo:
            self._redo.append(self._plan)
            self._plan = self._undo.pop()
        return self._plan

    def redo(self) -> Plan:
        if self._redo:
            self._undo.append(self._plan)
            self._plan = self._redo.pop()
        return self._plan


#: The table of changes: (label, key path into plan_changes, unit).
CHANGE_ROWS = (
    ("Femoral offset, native", ("native_offset_mm",), "mm"),
    ("Femoral offset, planned", ("planned_offset_mm",), "mm"),
    ("Offset change", ("offset_change_mm",), "mm"),
    ("Leg length change (femur)", ("leg_length_change_mm",), "mm"),
    ("Head centre shift, medial", ("head_centre_shift", "medial_mm"), "mm"),
    ("Head centre shift, superior", ("head_centre_shift", "superior_mm"), "mm"),
    ("Head centre shift, anterior", ("head_centre_shift", "anterior_mm"), "mm"),
    ("Cup COR shift, medial", ("cup_cor_shift", "medial_mm"), "mm"),
    ("Cup COR shift, superior", ("cup_cor_shift", "superior_mm"), "mm"),
    ("Cup COR shift, anterior", ("cup_cor_shift", "anterior_mm"), "mm"),
    ("Leg length change (hip)", ("hip_leg_length_change_mm",), "mm"),
    ("Offset change (hip)", ("hip_offset_change_mm",), "mm"),
    ("Canal fill ML, mean", ("canal_fit", "fill_ml_mean"), "%"),
    ("Canal fill ML, best level", ("canal_fit", "fill_ml_max"), "%"),
)


def change_rows(changes: dict) -> list[tuple[str, str]]:
    """``(label, formatted value)`` rows of the table of changes (the GUI table and the PDF report)."""
    rows = []
    for label, path, unit in CHANGE_ROWS:
        value: Any = changes
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        if value is None:
            text = "n/a"
        elif unit == "%":
            text = f"{100 * value:.0f} %"
        elif "change" in label or "shift" in label:
            text = f"{value:+.1f} mm"
        else:
            text = f"{value:.1f} mm"
        rows.append((label, text))
    return rows
