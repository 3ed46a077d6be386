"""Radiograph realism augmentation for DRRs: a parameter sampler plus a deterministic transform.

A DRR is a clean line integral ``p = integral(mu ds)`` of the phantom. Real radiographs differ in
ways that a network trained on clean DRRs must learn to ignore, so training images go through a
small physical model of the acquisition (order as in a real detector):

1. primary intensity ``I_p = exp(-p)`` (relative to the unattenuated beam),
2. scatter: a low-frequency haze ``S = scatter_fraction * G_wide * I_p`` added to the primary
   (scatter is roughly a very wide blur of the transmitted field),
3. quantum noise: photon counts ``N ~ Poisson(I0 * (I_p + S))`` with ``I0`` the unattenuated
   photons per pixel (``dose_photons_per_mm2 * pixel_area``),
4. detector blur: a Gaussian point-spread function applied to the counts (after the noise, so the
   noise becomes spatially correlated as in a scintillator),
5. back to line integrals ``p' = -log(N / I0)``,
6. display processing: an intensity scale and a gamma applied relative to the image's 99th
   percentile (so gamma changes contrast, not the overall level).

Plus an optional calibration error (:class:`CalibrationPerturbation`): the image is rendered with a
slightly wrong camera while the nominal projection matrix is stored, as with a real, imperfect
calibration.

Every random choice lives in the parameters (including the noise seed), so
``apply_realism(image, params, pixel_mm)`` is a pure function: the same parameters give the same
bytes. :func:`sample_realism_params` draws parameters from :class:`RealismRanges`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from inference.errors import ConfigError, DataError
from inference.validate import number, range_pair, whole_number

# Reference percentile for the gamma curve: the densest structures (cortex seen edge-on) sit
# around the top percent of a hip radiograph; normalising there keeps gamma a contrast change.
_GAMMA_REFERENCE_PERCENTILE = 99.0


@dataclass(frozen=True)
class RealismParams:
    """Parameters of one radiograph's realism transform (see module docstring).

    Attributes
    ----------
    dose_photons_per_mm2 : float
        Unattenuated photons per mm^2 at the detector; ``0`` disables quantum noise.
    scatter_fraction : float
        Scatter-to-primary ratio of the haze relative to the smoothed primary, >= 0.
    scatter_sigma_mm : float
        Width (Gaussian sigma, detector mm) of the scatter haze.
    blur_sigma_mm : float
        Detector point-spread function (Gaussian sigma, detector mm), >= 0.
    intensity_scale : float
        Multiplies the line integrals after the gamma curve, > 0.
    gamma : float
        Exponent of the display curve relative to the 99th percentile, > 0 (1 = linear).
    noise_seed : int
        Seed of the Poisson noise (makes the transform deterministic).
    """

    dose_photons_per_mm2: float = 0.0
    scatter_fraction: float = 0.0
    scatter_sigma_mm: float = 25.0
    blur_sigma_mm: float = 0.0
    intensity_scale: float = 1.0
    gamma: float = 1.0
    noise_seed: int = 0

    def __post_init__(self) -> None:
        for name in ("dose_photons_per_mm2", "scatter_fraction", "blur_sigma_mm"):
            number(getattr(self, name), f"RealismParams {name}", 0)
        for name in ("scatter_sigma_mm", "intensity_scale", "gamma"):
            number(getattr(self, name), f"RealismParams {name}", 0, low_open=True)
        whole_number(self.noise_seed, "RealismParams noise_seed", 0)

    @property
    def is_identity(self) -> bool:
        """True when the transform returns its input unchanged."""
        return (self.dose_photons_per_mm2 == 0 and self.scatter_fraction == 0 and self.blur_sigma_mm == 0
                and self.intensity_scale == 1 and self.gamma == 1)

    def to_dict(self) -> dict:
        return {k: (int(v) if k == "noise_seed" else float(v)) for k, v in dataclasses.asdict(self).items()}


@dataclass(frozen=True)
class RealismRanges:
    """Ranges that :func:`sample_realism_params` draws from (uniform; dose log-uniform).

    The defaults span clinical hip radiographs: unattenuated fluence of 1e4-3e5 photons/mm^2 at the
    detector (tens of photons per 0.15 mm pixel behind the pelvis), scatter-to-primary ratios up to
    0.5 without a grid, and a CsI detector PSF of 0.1-0.5 mm.
    """

    enabled: bool = True
    dose_photons_per_mm2: tuple[float, float] = (1.0e4, 3.0e5)
    scatter_fraction: tuple[float, float] = (0.0, 0.5)
    scatter_sigma_mm: tuple[float, float] = (15.0, 40.0)
    blur_sigma_mm: tuple[float, float] = (0.1, 0.5)
    intensity_scale: tuple[float, float] = (0.8, 1.25)
    gamma: tuple[float, float] = (0.8, 1.25)

    def __post_init__(self) -> None:
        # The dose is drawn log-uniformly and the widths, scale and gamma divide: all strictly positive.
        for name, low_open in (("dose_photons_per_mm2", True), ("scatter_fraction", False),
                               ("scatter_sigma_mm", True), ("blur_sigma_mm", False),
                               ("intensity_scale", True), ("gamma", True)):
            range_pair(getattr(self, name), f"RealismRanges {name}", 0, low_open=low_open)

    def to_dict(self) -> dict:
        return {k: (v if isinstance(v, bool) else [float(x) for x in v])
                for k, v in dataclasses.asdict(self).items()}


def sample_realism_params(rng: np.random.Generator, ranges: RealismRanges = RealismRanges()) -> RealismParams:
    """Draw one radiograph's realism parameters (identity parameters if ``ranges.enabled`` is False)."""
    noise_seed = int(rng.integers(0, 2**31 - 1))
    if not ranges.enabled:
        return RealismParams(noise_seed=noise_seed)
    lo, hi = np.log(ranges.dose_photons_per_mm2)
    return RealismParams(
        dose_photons_per_mm2=float(np.exp(rng.uniform(lo, hi))),
        scatter_fraction=float(rng.uniform(*ranges.scatter_fraction)),
        scatter_sigma_mm=float(rng.uniform(*ranges.scatter_sigma_mm)),
        blur_sigma_mm=float(rng.uniform(*ranges.blur_sigma_mm)),
        intensity_scale=float(rng.uniform(*ranges.intensity_scale)),
        gamma=float(rng.uniform(*ranges.gamma)),
        noise_seed=noise_seed,
    )


def apply_realism(line_integrals: np.ndarray, params: RealismParams, pixel_mm: float) -> np.ndarray:
    """Turn a clean DRR into a realistic radiograph (deterministic given ``params``).

    Parameters
    ----------
    line_integrals : (H, W) array
        Clean DRR, line integrals of mu (dimensionless, >= 0, larger = more attenuation).
    params : RealismParams
        Transform parameters (see :func:`sample_realism_params`).
    pixel_mm : float
        Detector pixel pitch in mm (sets the noise per pixel and the kernel widths in pixels).

    Returns
    -------
    (H, W) float32 array
        Augmented line integrals (same convention: larger = more attenuation).
    """
    p = np.asarray(line_integrals, dtype=np.float64)
    if p.ndim != 2:
        raise DataError(f"a radiograph must be a 2D array, not shape {p.shape}")
    if not np.all(np.isfinite(p)):
        raise DataError("the radiograph holds NaN or infinite values")
    number(pixel_mm, "pixel_mm", 0, low_open=True)
    if params.is_identity:
        return p.astype(np.float32)

    physics = params.dose_photons_per_mm2 > 0 or params.scatter_fraction > 0 or params.blur_sigma_mm > 0
    if physics:
        intensity = np.exp(-np.maximum(p, 0.0))
        if params.scatter_fraction > 0:
            haze = ndimage.gaussian_filter(intensity, params.scatter_sigma_mm / pixel_mm, mode="nearest")
            intensity = intensity + params.scatter_fraction * haze
        if params.dose_photons_per_mm2 > 0:
            photons = params.dose_photons_per_mm2 * pixel_mm * pixel_mm
            rng = np.random.default_rng(params.noise_seed)
            # Counts normalised back by I0 so the rest of the chain is dose-independent in mean.
            intensity = rng.poisson(intensity * photons) / photons
            # A pixel that caught no photon has an infinite line integral; half a photon is the
            # usual floor (it is what an unbiased log estimator would give for a zero count).
            intensity = np.maximum(intensity, 0.5 / photons)
        if params.blur_sigma_mm > 0:
            intensity = ndimage.gaussian_filter(intensity, params.blur_sigma_mm / pixel_mm, mode="nearest")
        p = -np.log(np.maximum(intensity, 1e-12))

    if params.gamma != 1.0 or params.intensity_scale != 1.0:
        p = np.maximum(p, 0.0)
        reference = float(np.percentile(p, _GAMMA_REFERENCE_PERCENTILE))
        if params.gamma != 1.0 and reference > 0:
            p = reference * (p / reference) ** params.gamma
        p = params.intensity_scale * p
    return p.astype(np.float32)


@dataclass(frozen=True)
class CalibrationPerturbation:
    """A small error of the C-arm calibration: the camera actually used differs from the stored one.

    ``P_render = S @ P @ T`` where ``T`` rotates the world by ``rotation_deg`` (x, y, z Euler, about
    ``centre_mm``) and shifts it by ``translation_mm``, and ``S`` shifts the detector by
    ``detector_shift_px`` (u, v) pixels.
    """

    rotation_deg: tuple[float, float, float] = (0.0, 0.0, 0.0)
    translation_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    detector_shift_px: tuple[float, float] = (0.0, 0.0)

    def __post_init__(self) -> None:
        for name, n in (("rotation_deg", 3), ("translation_mm", 3), ("detector_shift_px", 2)):
            value = getattr(self, name)
            if len(value) != n or not all(np.isfinite(v) for v in value):
                raise ConfigError(f"CalibrationPerturbation {name} must hold {n} finite numbers, not {value!r}")

    @property
    def is_identity(self) -> bool:
        return not (any(self.rotation_deg) or any(self.translation_mm) or any(self.detector_shift_px))

    def to_dict(self) -> dict:
        return {k: [float(x) for x in v] for k, v in dataclasses.asdict(self).items()}

    def world_transform(self, centre_mm=(0.0, 0.0, 0.0)) -> np.ndarray:
        """The 4x4 rigid transform ``T`` (rotation about ``centre_mm``, then translation)."""
        ax, ay, az = np.deg2rad(self.rotation_deg)
        rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
        ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
        rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
        rotation = rz @ ry @ rx
        centre = np.asarray(centre_mm, dtype=np.float64)
        transform = np.eye(4)
        transform[:3, :3] = rotation
        transform[:3, 3] = centre - rotation @ centre + np.asarray(self.translation_mm, dtype=np.float64)
        return transform

    def apply(self, projection: np.ndarray, centre_mm=(0.0, 0.0, 0.0)) -> np.ndarray:
        """The projection matrix actually used to form the image (3, 4)."""
        shift = np.eye(3)
        shift[0, 2], shift[1, 2] = self.detector_shift_px
        return shift @ np.asarray(projection, dtype=np.float64) @ self.world_transform(centre_mm)


@dataclass(frozen=True)
class CalibrationErrorRanges:
    """Maximum calibration errors (each component uniform in +-max). All zero = no error (default)."""

    rotation_deg: float = 0.0
    translation_mm: float = 0.0
    detector_shift_px: float = 0.0

    def __post_init__(self) -> None:
        for name in ("rotation_deg", "translation_mm", "detector_shift_px"):
            number(getattr(self, name), f"CalibrationErrorRanges {name}", 0)

    @property
    def enabled(self) -> bool:
        return bool(self.rotation_deg or self.translation_mm or self.detector_shift_px)

    def to_dict(self) -> dict:
        return {k: float(v) for k, v in dataclasses.asdict(self).items()}


def sample_calibration_perturbation(rng: np.random.Generator,
                                    ranges: CalibrationErrorRanges = CalibrationErrorRanges()
                                    ) -> CalibrationPerturbation:
    """Draw a calibration error; always consumes the same number of random draws."""
    draws = rng.uniform(-1.0, 1.0, size=8)
    return CalibrationPerturbation(
        rotation_deg=tuple(float(x) for x in draws[0:3] * ranges.rotation_deg),
        translation_mm=tuple(float(x) for x in draws[3:6] * ranges.translation_mm),
        detector_shift_px=tuple(float(x) for x in draws[6:8] * ranges.detector_shift_px),
    )
