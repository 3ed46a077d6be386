"""A second radiograph renderer, independent of the one the network learnt from (evaluation only).

The training data and the simulated cases are rendered by :mod:`inference.drr`: monochromatic
(``mu`` at 60 keV from HU), through ProST's ray geometry and TensorFlow sampler, then the realism
augmentation of :mod:`inference.data.augment`. A network can learn that renderer's habits; a
held-out case drawn by the same renderer cannot show it. This one shares none of that code:

* **rays** from the camera centre of ``P`` through each pixel centre, traced in numpy between the
  nearest and farthest corner of the CT's box, sampled every ``step_mm`` with SciPy's trilinear
  :func:`scipy.ndimage.map_coordinates`;
* **two materials**: each voxel is split into water-like tissue (density ``1 + HU/1000`` at or
  below 0 HU) and a water/cortical-bone mixture above, whose bone fraction reproduces the voxel's
  HU at 60 keV (cortical bone ICRU, 1.92 g/cm^3: about +1935 HU there);
* **a polychromatic beam**: five energy bins of a filtered 80 kVp spectrum, mass attenuation of
  water and cortical bone per bin (NIST XCOM values, rounded), so bone's contrast hardens with
  thickness (beam hardening), which a monochromatic renderer cannot show;
* **a detector**: anode heel effect (a linear +-``heel`` gradient along the rows), scatter (a broad
  Gaussian of the primary, ``scatter_to_primary`` of it on average), quantum noise (Poisson at
  ``photons`` per pixel of open field), Gaussian unsharpness of ``blur_mm``; the image is
  ``-log(I / I0)`` (larger = more attenuation, the case format's convention).

The numbers are approximate on purpose: the point is a different renderer, not a calibrated one.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np

from inference.errors import DataError

log = logging.getLogger(__name__)

#: Energy bins (keV), their share of the photons of a filtered 80 kVp beam, and the mass attenuation
#: (cm^2/g) of water and of cortical bone (ICRU) at each (NIST XCOM, rounded).
SPECTRUM = (
    # keV, weight, water, cortical bone
    (35.0, 0.10, 0.31, 0.93),
    (45.0, 0.25, 0.245, 0.52),
    (55.0, 0.30, 0.215, 0.36),
    (65.0, 0.22, 0.200, 0.29),
    (75.0, 0.13, 0.188, 0.24),
)
#: Cortical bone's density (g/cm^3) and its HU at 60 keV (mass attenuation 0.3148 cm^2/g, water 0.2059).
BONE_DENSITY = 1.92
BONE_HU_60KEV = 1000.0 * (0.3148 * BONE_DENSITY / 0.2059 - 1.0)


@dataclasses.dataclass(frozen=True)
class Detector:
    """The detector and beam model (defaults: a plausible hip radiograph)."""

    photons: float = 4000.0
    scatter_to_primary: float = 0.4
    scatter_sigma_mm: float = 40.0
    blur_mm: float = 0.35
    heel: float = 0.08


def materials(ct_hu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(water, bone) densities (g/cm^3, float32) of each voxel, from its HU."""
    hu = np.asarray(ct_hu, np.float32)
    bone_fraction = np.clip(hu / np.float32(BONE_HU_60KEV), 0.0, 1.0)
    water = np.where(hu <= 0, np.clip(1.0 + hu / 1000.0, 0.0, None), 1.0 - bone_fraction).astype(np.float32)
    return water, (bone_fraction * np.float32(BONE_DENSITY)).astype(np.float32)


def _camera(projection: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    matrix = np.asarray(projection, np.float64)
    inverse = np.linalg.inv(matrix[:, :3])
    return -inverse @ matrix[:, 3], inverse


def line_integrals(volumes: list[np.ndarray], grid: Any, projection: np.ndarray, rows: int, cols: int, *,
                   step_mm: float, chunk_samples: int = 4_000_000) -> list[np.ndarray]:
    """Line integrals (value x mm) of each volume (on ``grid``) along the ray of every pixel.

    The ray from the camera centre of ``projection`` through the pixel centre, sampled every
    ``step_mm`` between the nearest and the farthest corner of the grid's box (one voxel out); trilinear, and zero
    beyond it (the outer voxels ramp to zero over one voxel: a box of n voxels integrates to n).
    """
    from scipy import ndimage

    centre, inverse = _camera(projection)
    # the corners of where trilinear sampling with zero beyond the grid is not zero (one voxel out)
    nz, ny, nx = grid.shape_zyx
    corners = np.array([[i, j, k] for i in (-1.0, nx) for j in (-1.0, ny) for k in (-1.0, nz)])
    corners_mm = corners @ grid.index_to_world()[:3, :3].T + grid.index_to_world()[:3, 3]
    towards = grid.center_mm() - centre
    distances = np.linalg.norm(corners_mm - centre, axis=1)
    t = np.arange(distances.min(), distances.max() + step_mm, step_mm)
    world_to_index = grid.world_to_index()
    start = world_to_index[:3, :3] @ centre + world_to_index[:3, 3]  # the camera centre in index space
    outputs = [np.zeros((rows, cols), np.float32) for _ in volumes]
    rows_per_chunk = max(1, chunk_samples // (cols * t.size))
    for r0 in range(0, rows, rows_per_chunk):
        r1 = min(rows, r0 + rows_per_chunk)
        vv, uu = np.meshgrid(np.arange(r0, r1, dtype=np.float64), np.arange(cols, dtype=np.float64), indexing="ij")
        directions = np.stack([uu.ravel(), vv.ravel(), np.ones(uu.size)]).T @ inverse.T
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        directions *= np.sign(directions @ towards)[:, None]
        # index coordinates of every sample: centre + t d, mapped to (k, j, i)
        step = directions @ world_to_index[:3, :3].T
        ijk = start[None, None, :] + t[None, :, None] * step[:, None, :]
        coords = ijk[..., ::-1].reshape(-1, 3).T.astype(np.float32)
        for volume, out in zip(volumes, outputs):
            samples = ndimage.map_coordinates(volume, coords, order=1, mode="grid-constant", cval=0.0,
                                              output=np.float32)
            out[r0:r1] = samples.reshape(r1 - r0, cols, t.size).sum(axis=2) * np.float32(step_mm)
    return outputs


def render(ct_hu: np.ndarray, grid: Any, projection: np.ndarray, rows: int, cols: int, pixel_mm: float,
           rng: np.random.Generator, *, detector: Detector = Detector(), step_mm: float | None = None) -> np.ndarray:
    """A radiograph (float32, larger = more attenuation) of ``ct_hu`` seen through ``projection``.

    Raises
    ------
    DataError
        The CT does not project onto the detector.
    """
    from scipy import ndimage

    step = float(step_mm) if step_mm is not None else 0.5 * float(min(grid.spacing_xyz_mm))
    water, bone = materials(ct_hu)
    water_mm, bone_mm = line_integrals([water, bone], grid, projection, rows, cols, step_mm=step)
    if not (water_mm > 0).any():
        raise DataError("the CT does not project onto the detector")
    # g/cm^2 = (g/cm^3) x mm / 10
    water_cm, bone_cm = water_mm / np.float32(10.0), bone_mm / np.float32(10.0)
    primary = np.zeros((rows, cols), np.float64)
    for _, weight, mu_water, mu_bone in SPECTRUM:
        primary += weight * np.exp(-(mu_water * water_cm + mu_bone * bone_cm))
    primary *= 1.0 + detector.heel * np.linspace(-1.0, 1.0, rows)[:, None]
    scatter = ndimage.gaussian_filter(primary, detector.scatter_sigma_mm / pixel_mm, mode="nearest")
    intensity = primary + detector.scatter_to_primary * scatter
    counts = rng.poisson(np.clip(intensity, 0.0, None) * detector.photons).astype(np.float64)
    counts = ndimage.gaussian_filter(counts, detector.blur_mm / pixel_mm, mode="nearest")
    image = -np.log(np.maximum(counts, 0.5) / detector.photons)
    return image.astype(np.float32)


def rerender_case(case_dir, truth_dir, seed: int, pixel_mm: float, detector: Detector = Detector()) -> None:
    """Replace every radiograph of a simulated case by this renderer's, from the truth's phantom CT
    (``truth_dir/ct.nii.gz``), with the case's own matrices and detector sizes (``pixel_mm`` their
    pitch); masks are kept. The images are written as float32 TIFF and ``case.json`` names them."""
    import json
    import pathlib

    import tifffile

    from inference import io

    case_dir = pathlib.Path(case_dir)
    ct, grid = io.read_volume(pathlib.Path(truth_dir) / "ct.nii.gz")
    raw = json.loads((case_dir / "case.json").read_text())
    rng = np.random.default_rng(seed)
    for view, loaded in zip(raw["views"], io.load_case(case_dir).views):
        rows, cols = loaded.image.shape[:2]
        image = render(ct, grid, np.asarray(view["projection_matrix"], float), rows, cols, pixel_mm, rng,
                       detector=detector)
        old = case_dir / view["image"]
        name = pathlib.Path(view["image"]).stem + ".tif"
        tifffile.imwrite(case_dir / name, image, photometric="minisblack")
        if old.name != name:
            old.unlink()
        view["image"] = name
    (case_dir / "case.json").write_text(json.dumps(raw, indent=2))
