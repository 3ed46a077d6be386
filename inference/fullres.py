"""Full-resolution outputs: the paper-grid atlas warped by the network's (upsampled) field.

The network predicts its displacement ``psi`` on its own grid (the compact grid: 1.328 x 1.328 x
2 mm). Its outputs would inherit that resolution: a perfect femur label resampled to the compact
grid and back already loses about 0.025 Dice and 0.36 mm ASSD (issue 13). Here the field is
upsampled to the grid twice as fine that covers the same box (``resources/atlas/paper``, 0.664 x
0.664 x 1 mm), and that atlas is warped with it:

* intensities (HU) linearly;
* labels softly: each label's indicator (one-hot) is warped linearly and thresholded at 0.5, so
  the boundary moves by sub-voxel amounts instead of inheriting a nearest-neighbour staircase.

Both grids must be axis-aligned and span the same box (voxel edges coincide at the box faces),
which :func:`spacing_ratio` verifies. The displacement convention is :mod:`inference.layers.warp`'s:
voxel units of the output grid, (dz, dy, dx), pull-back ``out(x) = atlas(x + u(x))``.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np

from inference.errors import DataError

log = logging.getLogger(__name__)

#: Name of the fine atlas used for the outputs.
FINE_ATLAS = "paper"


@dataclasses.dataclass(frozen=True)
class FineWarp:
    """The atlas warped onto the fine grid: label map (uint8), HU volume, soft femur indicator."""

    labels: np.ndarray
    volume_hu: np.ndarray
    femur_soft: np.ndarray
    grid: Any


def spacing_ratio(coarse_grid, fine_grid) -> np.ndarray:
    """Per-axis ratio (z, y, x) of coarse to fine spacing; both grids must span one box.

    Raises
    ------
    DataError
        The grids are not axis-aligned or do not cover the same box (the atlases do not belong
        together).
    """
    for grid in (coarse_grid, fine_grid):
        if not np.allclose(np.asarray(grid.direction, float), np.eye(3)):
            raise DataError("full-resolution output needs axis-aligned atlas grids")
    spacing_c = np.asarray(coarse_grid.spacing_xyz_mm, float)[::-1]
    spacing_f = np.asarray(fine_grid.spacing_xyz_mm, float)[::-1]
    lo_c = np.asarray(coarse_grid.origin_mm, float)[::-1] - spacing_c / 2
    lo_f = np.asarray(fine_grid.origin_mm, float)[::-1] - spacing_f / 2
    hi_c = lo_c + spacing_c * np.asarray(coarse_grid.shape_zyx)
    hi_f = lo_f + spacing_f * np.asarray(fine_grid.shape_zyx)
    if not (np.allclose(lo_c, lo_f, atol=0.05) and np.allclose(hi_c, hi_f, atol=0.05)):
        raise DataError(f"the fine atlas grid (box {lo_f.round(2)}..{hi_f.round(2)} mm) does not cover the "
                        f"network's grid (box {lo_c.round(2)}..{hi_c.round(2)} mm)")
    return spacing_c / spacing_f


def fine_grid_placed(coarse_placed, coarse_atlas_grid, fine_atlas_grid):
    """The fine atlas grid moved exactly as the coarse one was placed on the patient."""
    shift = np.asarray(coarse_placed.origin_mm, float) - np.asarray(coarse_atlas_grid.origin_mm, float)
    return dataclasses.replace(fine_atlas_grid, origin_mm=tuple(np.asarray(fine_atlas_grid.origin_mm) + shift))


def upsample_displacement(psi_zyx3: np.ndarray) -> np.ndarray:
    """The coarse displacement (coarse voxels) on the grid twice as fine (fine voxels).

    The same arithmetic as :class:`inference.layers.grid.UpsampleField`, the network's own x2
    upsampling (shared outer edges, linear weights 3/4 and 1/4, border values held; displacements
    double in fine voxels), so the fine field is exactly what the network would have produced with
    a full-resolution output layer; in numpy, so that a registration through ONNX Runtime never
    loads TensorFlow.
    """
    field = np.asarray(psi_zyx3, np.float32)
    for axis in range(3):
        n = field.shape[axis]
        before = np.take(field, np.r_[0, np.arange(n - 1)], axis=axis)
        after = np.take(field, np.r_[np.arange(1, n), n - 1], axis=axis)
        even = np.float32(0.75) * field + np.float32(0.25) * before
        odd = np.float32(0.75) * field + np.float32(0.25) * after
        stacked = np.stack([even, odd], axis=axis + 1)
        field = stacked.reshape(field.shape[:axis] + (2 * n,) + field.shape[axis + 1:])
    return np.float32(2.0) * field


def warp_linear(channels: list[np.ndarray], field: np.ndarray) -> list[np.ndarray]:
    """Pull-back warp ``out(x) = channel(x + field(x))`` of each channel, linear, zero outside.

    scipy's ``map_coordinates`` is used here rather than the TensorFlow warp layer: on the
    4.7 M-voxel fine grid it took 1.4 s for three channels on the 2-core machine, the layer
    2.1 s warm and 6.5 s with its first XLA compilation (a cold ``hipatlas register`` pays that).
    """
    from scipy import ndimage

    coords = np.indices(field.shape[:3], dtype=np.float32)
    coords += np.moveaxis(field, -1, 0)
    return [ndimage.map_coordinates(np.asarray(c, np.float32), coords, order=1, mode="constant", cval=0.0)
            for c in channels]


def warp_fine(fine_atlas, psi_coarse: np.ndarray, coarse_grid_placed, coarse_atlas_grid) -> FineWarp:
    """Warp the fine atlas by the coarse field ``psi_coarse`` (Z, Y, X, 3, coarse voxels).

    Returns the label map (0 background, 1 femur, 2 pelvis), the HU volume and the femur's soft
    indicator (for a smooth surface) on the fine grid placed like ``coarse_grid_placed``.
    """
    ratio = spacing_ratio(coarse_atlas_grid, fine_atlas.geometry)
    if not np.allclose(ratio, 2.0):
        raise DataError(f"the fine atlas must be twice as fine as the network's grid on every axis, not {ratio}")
    fine_grid = fine_grid_placed(coarse_grid_placed, coarse_atlas_grid, fine_atlas.geometry)
    field = upsample_displacement(psi_coarse)
    labels_in = np.asarray(fine_atlas.labels)
    # HU + 1000 so that the zero padding outside the atlas grid reads as air, not water.
    hu, femur, pelvis = warp_linear([np.asarray(fine_atlas.volume, np.float32) + 1000.0,
                                     (labels_in == 1).astype(np.float32), (labels_in == 2).astype(np.float32)],
                                    field)
    labels = np.zeros(hu.shape, np.uint8)
    labels[(pelvis >= 0.5) & (pelvis > femur)] = 2
    labels[(femur >= 0.5) & (femur >= pelvis)] = 1
    return FineWarp(labels=labels, volume_hu=hu - 1000.0, femur_soft=femur, grid=fine_grid)


_FINE_ATLAS_CACHE: dict[str, Any] = {}


def fine_atlas_for(coarse_atlas, name: str = FINE_ATLAS):
    """The fine atlas ``name`` when it covers the coarse atlas's box twice as finely, else None."""
    from inference.data import atlas as atlas_lib

    if coarse_atlas.grid == name:
        return None
    if name not in _FINE_ATLAS_CACHE:
        _FINE_ATLAS_CACHE[name] = atlas_lib.load_atlas(name)
    fine = _FINE_ATLAS_CACHE[name]
    try:
        ratio = spacing_ratio(coarse_atlas.geometry, fine.geometry)
    except DataError as error:
        log.warning("no full-resolution output: %s", error)
        return None
    return fine if np.allclose(ratio, 2.0) else None
