"""Shift ensemble: the network run with the atlas grid placed a whole voxel off in a few directions,
its fields brought back onto one grid and averaged.

Why: the network's field depends on where the atlas grid happens to sit relative to the femur
(the grid is placed on the located head centre, and each view's detector crop follows it). Moving
the grid by one voxel is a change the network has learnt to absorb (its training data places the
femur up to 10 mm off), yet its answer changes by more than a voxel here and there; the mean of a
few such answers is usually closer to the truth. On 32 held-out simulated cases
(``tools/eval_cases.py --variants fullres,ensemble``, docs/results/ensemble/) the four extra
passes raised the femur's Dice in 23 and lowered it in 4 (by at most 0.003); mean 0.911 -> 0.914.

How: for a shift ``k`` (z, y, x voxels), the grid ``G_k`` has its origin moved by ``k`` voxels.
The network's pull-back field ``psi_k`` on ``G_k`` says that the patient voxel ``j`` of ``G_k``
takes the atlas value at ``j + psi_k(j)`` (atlas array coordinates, which do not depend on where
the grid is placed). The same patient point is voxel ``i = j + k`` of the reference grid, so its
displacement there is ``psi_k(i - k) - k``: a whole-voxel shift is exact index arithmetic, with no
resampling. The few voxels that a shifted grid does not cover (its last slice on one side) are
averaged over the passes that do. The spread of the passes' displacements over the femur is
reported (``report.json`` -> ``ensemble``) as a sign of how sure the network is.

The offsets are the four vertices of a tetrahedron inscribed in the cube of +-1 voxel: every axis
is moved both ways, and the mean of the offsets is zero. Eight (the cube's corners) measured no
better than four in a prototype on seven cases.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
from typing import Any, Callable, Generator, Sequence

import numpy as np

from inference.errors import ConfigError

#: Offsets (z, y, x voxels) of the extra passes beside the unshifted one.
DEFAULT_SHIFTS_ZYX: tuple[tuple[int, int, int], ...] = ((1, 1, 1), (1, -1, -1), (-1, 1, -1), (-1, -1, 1))

#: ``$HIPATLAS_ENSEMBLE``: ``on``, ``off`` or ``auto`` (the default); ``--ensemble`` / ``--no-ensemble`` win.
ENV_VAR = "HIPATLAS_ENSEMBLE"


def default_ensemble(models: int = 1) -> bool:
    """Whether registration runs the shift ensemble when not told: ``$HIPATLAS_ENSEMBLE`` ``on`` or
    ``off``; unset or ``auto``: on for one model, off when ``models`` (several) are averaged
    (:class:`inference.backends.EnsembleBackend`). Two models' fields averaged, one pass each,
    matched one model's five shifted passes on 8 held-out cases (Dice 0.925 against 0.923-0.924,
    ASSD 0.85 against 0.86 mm; docs/results/model-ensemble/): the shifts would then add their
    passes for every model, for 0.001 (10 passes, 0.926)."""
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value in ("on", "1", "true", "yes"):
        return True
    if value in ("off", "0", "false", "no"):
        return False
    if value == "auto":
        return int(models) <= 1
    raise ConfigError(f"${ENV_VAR} must be 'on', 'off' or 'auto', not {value!r}")


def shifted_grid(grid, shift_zyx: Sequence[int]):
    """``grid`` (:class:`inference.geometry.VolumeGeometry`) with its origin moved by whole voxels."""
    shift_xyz = np.asarray(shift_zyx, float)[::-1] * np.asarray(grid.spacing_xyz_mm, float)
    moved = np.asarray(grid.origin_mm, float) + np.asarray(grid.direction, float) @ shift_xyz
    return dataclasses.replace(grid, origin_mm=tuple(float(v) for v in moved))


def field_on_reference(psi: np.ndarray, shift_zyx: Sequence[int]) -> np.ndarray:
    """A pull-back field predicted on :func:`shifted_grid` ``(grid, shift)``, expressed on ``grid``:
    ``psi(i - k) - k`` (voxels, z y x), NaN where ``i - k`` lies outside the shifted grid."""
    psi = np.asarray(psi, np.float32)
    out = np.full(psi.shape, np.nan, np.float32)
    source, target = [], []
    for size, k in zip(psi.shape[:3], shift_zyx):
        k = int(k)
        if abs(k) >= size:
            return out
        target.append(slice(k, size) if k >= 0 else slice(0, size + k))
        source.append(slice(0, size - k) if k >= 0 else slice(-k, size))
    out[tuple(target)] = psi[tuple(source)] - np.asarray(shift_zyx, np.float32)
    return out


@dataclasses.dataclass(frozen=True)
class EnsembleField:
    """The mean field and how much the passes disagreed.

    Attributes
    ----------
    psi : (Z, Y, X, 3) float32 array
        Mean pull-back displacement (voxels) on the reference grid.
    spread_mm : (Z, Y, X) float32 array
        Per voxel, the root mean square distance (mm) of the passes' displacements from their mean.
    passes : int
    """

    psi: np.ndarray
    spread_mm: np.ndarray
    passes: int


def combine(fields: Sequence[np.ndarray], spacing_zyx_mm: Sequence[float]) -> EnsembleField:
    """Average fields already on the reference grid (:func:`field_on_reference`; NaN = not covered).
    The first field must cover the whole grid (the unshifted pass).

    One field at a time, in place: stacking the passes cost 0.36 s on the compact grid."""
    if not fields:
        raise ValueError("no fields to combine")
    first = np.asarray(fields[0], np.float32)
    if np.isnan(first).any():
        raise ValueError("the first field must cover the whole grid")
    total = first.copy()
    count = np.ones(first.shape[:3] + (1,), np.float32)
    for field in fields[1:]:
        field = np.asarray(field, np.float32)
        total += np.nan_to_num(field, nan=0.0)
        count += ~np.isnan(field[..., :1])
    mean = total / count
    spacing = np.asarray(spacing_zyx_mm, np.float32)
    squared = np.zeros(first.shape[:3], np.float32)
    for field in fields:
        offset = (np.asarray(field, np.float32) - mean) * spacing
        squared += np.nan_to_num(np.einsum("...c,...c->...", offset, offset), nan=0.0)
    spread = np.sqrt(squared / count[..., 0])
    return EnsembleField(mean, spread, len(fields))


def warped_labels(labels: np.ndarray, psi: np.ndarray) -> np.ndarray:
    """The atlas label map pulled back by ``psi`` (voxels, z y x) with nearest-neighbour lookup, 0
    outside the atlas grid (uint8; numpy only, for either backend)."""
    from inference import fullres

    labels = np.asarray(labels, np.uint8)
    coords = np.moveaxis(np.asarray(psi, np.float32), -1, 0) + np.indices(psi.shape[:3], dtype=np.float32)
    nearest = fullres.nearest_voxels(coords, labels.shape)
    out = labels.ravel()[nearest.flat]
    out[nearest.outside] = 0
    return out.reshape(psi.shape[:3])


def run_passes(run_pass: Callable[[Sequence[int]], np.ndarray], shifts: Sequence[Sequence[int]], workers: int,
               check: Callable[[], None]) -> Generator[int, None, list[np.ndarray]]:
    """Run ``run_pass(shift)`` for every shift, up to ``workers`` at once on a thread pool (one:
    in this thread), a generator: yields how many passes have ended (in shift order), calls
    ``check()`` before starting each pass and before waiting for each result (it raises to stop;
    passes not started then are dropped), returns their results in shift order."""
    results: list[np.ndarray] = []
    if workers <= 1:
        for shift in shifts:
            check()
            results.append(run_pass(shift))
            yield len(results)
        return results
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="hipatlas-ensemble") as pool:
        pending: list[concurrent.futures.Future] = []
        try:
            for shift in shifts:
                check()
                pending.append(pool.submit(run_pass, shift))
                if len(pending) - len(results) >= workers:
                    results.append(pending[len(results)].result())
                    yield len(results)
            while len(results) < len(shifts):
                check()
                results.append(pending[len(results)].result())
                yield len(results)
        except BaseException:
            for future in pending:
                future.cancel()
            raise
    return results


def report_entry(result: EnsembleField | None, shifts_zyx: Sequence[Sequence[int]],
                 femur: np.ndarray | None = None) -> dict[str, Any]:
    """``report.json`` -> ``ensemble``: passes, offsets, and the spread over ``femur`` (a boolean
    mask on the reference grid) as its median and 95th percentile (mm)."""
    if result is None:
        return {"passes": 1}
    entry: dict[str, Any] = {"passes": result.passes, "shifts_voxels_zyx": [list(map(int, s)) for s in shifts_zyx]}
    if femur is not None and np.any(femur):
        values = result.spread_mm[np.asarray(femur, bool)]
        entry["spread_mm"] = {"median": float(np.median(values)), "p95": float(np.percentile(values, 95))}
    return entry


__all__ = ["DEFAULT_SHIFTS_ZYX", "ENV_VAR", "EnsembleField", "combine", "default_ensemble", "field_on_reference",
           "report_entry", "run_passes", "shifted_grid", "warped_labels"]
