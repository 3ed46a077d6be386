"""The reconstructed femoral head moved onto the head that the masks show.

Why
---
The hip centre that ``register`` reports comes from the head's outlines in the two masks
(:func:`inference.localize.fit_head_sphere_to_masks`): on held-out cases within 0.9 mm. The
reconstruction's own head can lie farther off: on views 40 deg apart 2.9 mm on average (session
18, docs/results/shaft-straight), so the surface, the label map and the overlays disagree with
the reported centre.

What
----
:func:`head_shift` fits a sphere to the reconstruction's surface near the head and the masks'
sphere from it; :func:`apply_head_shift` moves the head by their difference: voxels within
:data:`FULL_RADII` head radii of the masks' centre move whole, the move fades out over
:data:`FADE_MM` beyond (across the neck), the rest of the femur stays.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from inference.data.shape import _ramp  # the shape modes' C2 fade, 0 at its first argument, 1 at its second
from inference.fullres import pull_back_voxels

#: The move is whole within this many head radii of the head's centre ...
FULL_RADII = 1.1
#: ... and fades out over this distance beyond.
FADE_MM = 20.0
#: Moves shorter than this are not made (mm); longer than MAX_SHIFT_MM are refused.
MIN_SHIFT_MM = 0.3
MAX_SHIFT_MM = 6.0


@dataclasses.dataclass(frozen=True)
class HeadShift:
    """The reconstruction's head centre, the masks', and the head radius (registration frame, mm)."""

    from_mm: np.ndarray
    to_mm: np.ndarray
    radius_mm: float

    @property
    def shift_mm(self) -> np.ndarray:
        return self.to_mm - self.from_mm

    def report_entry(self) -> dict[str, Any]:
        return {"used": True, "shift_mm": [float(v) for v in self.shift_mm],
                "distance_mm": float(np.linalg.norm(self.shift_mm))}


def head_shift(mesh, projections: Sequence[np.ndarray], masks: Sequence[np.ndarray | None]
               ) -> tuple[HeadShift | None, str]:
    """(the move, "fitted") or (None, why not) for a femur surface in the registration frame."""
    from inference import anatomy, localize

    if len(masks) < 2 or any(m is None for m in masks):
        return None, "needs two views with masks"
    centre, radius = anatomy.femoral_head_sphere(mesh)
    sphere = localize.fit_head_sphere_to_masks(list(projections), list(masks), centre, radius)
    if sphere is None:
        return None, "the masks do not show the head's outline clearly"
    shift = HeadShift(np.asarray(centre, float), np.asarray(sphere.centre_mm, float), float(radius))
    distance = float(np.linalg.norm(shift.shift_mm))
    if distance < MIN_SHIFT_MM:
        return None, f"the head already agrees with the masks ({distance:.2f} mm)"
    if distance > MAX_SHIFT_MM:
        return None, f"the masks' head lies {distance:.1f} mm from the reconstruction's; not moved"
    return shift, "fitted"


def apply_head_shift(shift: HeadShift, grid, *volumes: np.ndarray) -> list[np.ndarray]:
    """``volumes`` (on ``grid``) with the head moved by ``shift`` (pull-back, linear); new float32
    arrays, in order."""
    outputs = [np.array(v, np.float32, copy=True) for v in volumes]
    t = shift.shift_mm
    full = FULL_RADII * shift.radius_mm
    reach = full + FADE_MM
    i2w = np.asarray(grid.index_to_world(), np.float64)
    w2i = np.linalg.inv(i2w)
    spacing_zyx = np.asarray(grid.spacing_xyz_mm, float)[::-1]
    centre_kji = (w2i[:3, :3] @ shift.to_mm + w2i[:3, 3])[::-1]
    half = np.ceil((reach + np.linalg.norm(t)) / spacing_zyx).astype(int) + 1
    lo = np.maximum(np.floor(centre_kji).astype(int) - half, 0)
    hi = np.minimum(np.ceil(centre_kji).astype(int) + half + 1, np.asarray(volumes[0].shape))
    if np.any(hi <= lo):
        return outputs
    k, j, i = (a.ravel() for a in np.meshgrid(*(np.arange(a, b) for a, b in zip(lo, hi)), indexing="ij"))
    world = np.stack([i, j, k], 1).astype(np.float64) @ i2w[:3, :3].T + i2w[:3, 3]
    distance = np.linalg.norm(world - shift.to_mm, axis=1)
    weight = _ramp(distance, reach, full)
    moving = weight > 0
    k, j, i, world, weight = k[moving], j[moving], i[moving], world[moving], weight[moving]
    pull_back_voxels(outputs, volumes, (k, j, i), world - weight[:, None] * t, grid)
    return outputs
