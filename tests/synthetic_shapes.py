"""Analytic signed-distance shapes shared by the data tests (a femur-like union of a ball and capsules)."""

from __future__ import annotations

import numpy as np


def capsule_sdf(p: np.ndarray, a, b, radius: float) -> np.ndarray:
    """Signed distance (mm) of points ``p`` (3, N) to the capsule of ``radius`` around segment a-b."""
    a = np.asarray(a, float)[:, None]
    b = np.asarray(b, float)[:, None]
    ab = b - a
    t = np.clip(((p - a) * ab).sum(0) / (ab * ab).sum(), 0, 1)
    return np.linalg.norm(p - (a + ab * t), axis=0) - radius


def simple_femur_sdf(p: np.ndarray, head_radius_mm: float = 22.0) -> np.ndarray:
    """A right femur in its canonical frame (head centre at 0, shaft 42 mm lateral, along -z)."""
    head = np.linalg.norm(p, axis=0) - head_radius_mm
    neck = capsule_sdf(p, [0, 0, 0], [-40, 0, -30], 13)
    shaft = capsule_sdf(p, [-42, 0, -20], [-42, 0, -400], 14)
    return np.minimum.reduce([head, neck, shaft])


def ball_on_tube(grid, tube_centre_xy=(0.0, 0.0), tube_radius_mm: float = 12.0, head_mm=(0.0, 0.0, 75.0),
                 head_radius_mm: float = 22.0, bend_below_mm: float | None = None, bend_slope: float = 0.0):
    """A femur-like label map on ``grid`` (uint8, 1 inside) and its voxels' world positions: a ball
    (the head) on a tube along z up to z = 60 mm (the shaft); below ``bend_below_mm`` the tube's
    centre drifts along x by ``bend_slope`` mm per mm."""
    kk, jj, ii = np.meshgrid(*(np.arange(n) for n in grid.shape_zyx), indexing="ij")
    world = np.tensordot(np.stack([ii, jj, kk, np.ones_like(ii)], -1).astype(float), grid.index_to_world()[:3].T, 1)
    x, y, z = world[..., 0], world[..., 1], world[..., 2]
    drift = 0.0 if bend_below_mm is None else bend_slope * np.maximum(bend_below_mm - z, 0.0)
    tube = (np.hypot(x - tube_centre_xy[0] - drift, y - tube_centre_xy[1]) <= tube_radius_mm) & (z <= 60.0)
    ball = np.linalg.norm(world - np.asarray(head_mm, float), axis=-1) <= head_radius_mm
    return (tube | ball).astype(np.uint8), world
