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
