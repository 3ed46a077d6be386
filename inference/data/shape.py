"""Shape augmentation of the proximal femur: a seeded parameter sampler and a deterministic map.

As in TorchIO's ``RandomAffine``/``Affine`` split, :func:`sample_shape_params` draws a
:class:`ShapeParams` from a random generator and :class:`ShapeTransform` applies it
deterministically. The transform works on points in the canonical femur frame
(:mod:`inference.anatomy`: head centre at the origin, +z up the shaft axis, +x towards the head):
``apply_points`` maps undeformed points to deformed ones; ``inverse_points`` maps back, which is
what resampling a volume needs (for every output voxel, where it came from).

The map is a composition of smooth, localised modes, applied in this order:

1. a smooth random deformation of a few mm (four random shear fields, cubic B-splines on a 40 mm
   lattice; zero on the head so that the head stays a sphere, and beyond the bone's box);
2. shaft width: the diaphysis widened or narrowed about the shaft axis below the lesser
   trochanter (its cross-sections scaled), fading out above it: the shaft's girth relative to the
   head and neck differs between people by about +-10 % (the bundled femurs' shaft diameter
   80 mm below the lesser trochanter is 0.51-0.62 head radii); off unless asked for
   (``hipatlas synth --shaft-width-range``);
3. head radius: radial scaling about the head centre, fading out over the head-neck junction;
4. neck length: translation of the head and neck along the neck axis, fading out towards the
   neck base;
5. neck-shaft angle: rotation of the head and neck in the neck-shaft plane about a pivot at the
   neck base;
6. anteversion: rotation of the head and neck about the shaft axis;
7. global scale about the head centre.

Why every mode is a diffeomorphism
----------------------------------
Each anatomical mode moves points along a family of curves that it maps onto itself: rays from
the head centre (3), lines parallel to the neck axis (4), circles about the rotation axis (5, 6).
The shaft width (2) scales each cross-section of the shaft by ``a(s) = 1 + (factor - 1) w(s)``, a
positive number, and leaves the height ``s`` along the axis alone: its inverse divides by the
same ``a(s)`` and its Jacobian determinant is ``a(s)**2 > 0``.
Its weight may change freely across the family (that only shears it) but along each curve the 1D
map ``t -> t + amount * w(t)`` must be increasing, i.e. ``|amount| * max|dw/dt| < 1``. Weights
are C2 "smootherstep" ramps with a known maximum slope (1.875 / width), and the widths below are
chosen (and checked in :class:`ShapeTransform`) so that this holds with margin for the parameter
ranges. That also makes each mode exactly invertible by a 1D Newton solve along its curve. The
random shears work the same way along lines (see :class:`_RandomShears`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from inference.errors import DataError
from inference.validate import number, whole_number

logger = logging.getLogger(__name__)

__all__ = [
    "ShapeParams",
    "ShapeRanges",
    "ShapeTransform",
    "sample_shape_params",
    "IDENTITY_SHAPE",
    "compose",
]


# ----------------------------------------------------------------------------------------------
# Parameters and sampler
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShapeParams:
    """Parameters of one shape augmentation (all zeros / ones = identity).

    Attributes
    ----------
    global_scale : float
        Isotropic scale about the head centre (1 = none).
    neck_shaft_delta_deg : float
        Change of the neck-shaft (CCD) angle; positive = valgus (larger angle).
    neck_length_factor : float
        Head-centre-to-shaft-axis distance along the neck axis is multiplied by this.
    head_radius_factor : float
        Head radius multiplier.
    anteversion_delta_deg : float
        Rotation of head and neck about the shaft axis; positive turns the head anteriorly
        (towards -y of the canonical frame of a right femur).
    deformation_amplitude_mm : float
        Largest displacement of the smooth random deformation (0 = none).
    deformation_spacing_mm : float
        Lattice spacing of the random deformation (its smoothness scale).
    deformation_seed : int
        Seed of the random deformation.
    shaft_width_factor : float
        The shaft's cross-sections below the lesser trochanter are scaled by this about the shaft
        axis (1 = none).
    """

    global_scale: float = 1.0
    neck_shaft_delta_deg: float = 0.0
    neck_length_factor: float = 1.0
    head_radius_factor: float = 1.0
    anteversion_delta_deg: float = 0.0
    deformation_amplitude_mm: float = 0.0
    deformation_spacing_mm: float = 40.0
    deformation_seed: int = 0
    shaft_width_factor: float = 1.0

    def __post_init__(self) -> None:
        for name, low, high in (("global_scale", 0.5, 2.0),
                                 ("neck_shaft_delta_deg", -15, 15),
                                 ("neck_length_factor", 0.75, 1.25),
                                 ("head_radius_factor", 0.85, 1.15),
                                 ("anteversion_delta_deg", -15, 15),
                                 ("deformation_amplitude_mm", 0.0, 5.0),
                                 ("deformation_spacing_mm", 20.0, 200.0),
                                 ("shaft_width_factor", 0.8, 1.25)):
            object.__setattr__(self, name, number(getattr(self, name), f"ShapeParams {name}", low, high))
        seed = whole_number(self.deformation_seed, "ShapeParams deformation_seed", 0, 2**63 - 1)
        object.__setattr__(self, "deformation_seed", seed)

    @property
    def is_identity(self) -> bool:
        """True when the transform these parameters make is the identity."""
        return (self.global_scale == 1.0 and self.neck_shaft_delta_deg == 0.0 and self.neck_length_factor == 1.0
                and self.head_radius_factor == 1.0 and self.anteversion_delta_deg == 0.0
                and self.deformation_amplitude_mm == 0.0 and self.shaft_width_factor == 1.0)

    def to_dict(self) -> dict:
        """JSON-friendly dict (for manifests); ``ShapeParams(**d)`` rebuilds it. Without
        ``shaft_width_factor`` when it is 1, so that the manifests of data sets made before it
        existed stay byte for byte the same."""
        data = dataclasses.asdict(self)
        if data["shaft_width_factor"] == 1.0:
            del data["shaft_width_factor"]
        return data


IDENTITY_SHAPE = ShapeParams()


@dataclass(frozen=True)
class ShapeRanges:
    """Ranges that :func:`sample_shape_params` draws from (uniformly)."""

    global_scale: tuple[float, float] = (0.85, 1.15)
    neck_shaft_delta_deg: tuple[float, float] = (-8.0, 8.0)
    neck_length_factor: tuple[float, float] = (0.85, 1.15)
    head_radius_factor: tuple[float, float] = (0.9, 1.1)
    anteversion_delta_deg: tuple[float, float] = (-10.0, 10.0)
    deformation_amplitude_mm: tuple[float, float] = (1.0, 3.0)
    deformation_spacing_mm: float = 40.0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if f.name == "deformation_spacing_mm":
                continue
            value = getattr(self, f.name)
            try:
                lo, hi = (float(v) for v in value)
            except (TypeError, ValueError):
                raise ValueError(f"ShapeRanges {f.name} must be (low, high), not {value!r}") from None
            if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
                raise ValueError(f"ShapeRanges {f.name} must be (low, high) with low <= high, not {value!r}")
            object.__setattr__(self, f.name, (lo, hi))
        # Building the extremes validates the ranges against ShapeParams' limits.
        ShapeParams(*(getattr(self, n)[0] for n in _SAMPLED), deformation_spacing_mm=self.deformation_spacing_mm)
        ShapeParams(*(getattr(self, n)[1] for n in _SAMPLED), deformation_spacing_mm=self.deformation_spacing_mm)


_SAMPLED = (
    "global_scale",
    "neck_shaft_delta_deg",
    "neck_length_factor",
    "head_radius_factor",
    "anteversion_delta_deg",
    "deformation_amplitude_mm",
)


def sample_shape_params(rng: np.random.Generator, ranges: ShapeRanges | None = None) -> ShapeParams:
    """Draw shape parameters uniformly within ``ranges`` (defaults: :class:`ShapeRanges`).

    Deterministic for a given generator state; the random deformation gets its own seed from
    ``rng`` so the whole augmentation is reproducible from the parameters alone.
    """
    ranges = ShapeRanges() if ranges is None else ranges
    values = {name: float(rng.uniform(*getattr(ranges, name))) for name in _SAMPLED}
    return ShapeParams(
        **values,
        deformation_spacing_mm=ranges.deformation_spacing_mm,
        deformation_seed=int(rng.integers(0, 2**31 - 1)),
    )


# ----------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------
#: Where the shaft-width mode is whole (this far below the lesser trochanter's tip) and where it
#: has faded out (this far above it), mm along the shaft axis.
SHAFT_WIDTH_FULL_BELOW_LT_MM = 10.0
SHAFT_WIDTH_ZERO_ABOVE_LT_MM = 20.0

#: Largest slope of the smootherstep ramp over a unit width.
_RAMP_SLOPE = 1.875


def _ramp(x: np.ndarray, x0: float, x1: float) -> np.ndarray:
    """C2 ramp: 0 at x0, 1 at x1 (either order), smootherstep between."""
    t = np.clip((np.asarray(x, dtype=np.float64) - x0) / (x1 - x0), 0.0, 1.0)
    return t * t * t * (t * (6.0 * t - 15.0) + 10.0)


def _ramp_derivative(x: np.ndarray, x0: float, x1: float) -> np.ndarray:
    t = (np.asarray(x, dtype=np.float64) - x0) / (x1 - x0)
    inside = (t > 0) & (t < 1)
    t = np.clip(t, 0.0, 1.0)
    return np.where(inside, 30.0 * t * t * (1 - t) * (1 - t) / (x1 - x0), 0.0)


def _window(x, full_lo, full_hi, zero_lo, zero_hi):
    """1 on [full_lo, full_hi], 0 outside [zero_lo, zero_hi], C2 ramps between."""
    return _ramp(x, zero_lo, full_lo) * _ramp(x, zero_hi, full_hi)


def _window_derivative(x, full_lo, full_hi, zero_lo, zero_hi):
    a, b = _ramp(x, zero_lo, full_lo), _ramp(x, zero_hi, full_hi)
    return _ramp_derivative(x, zero_lo, full_lo) * b + a * _ramp_derivative(x, zero_hi, full_hi)


def _solve_monotone(target: np.ndarray, h, dh, iterations: int = 30) -> np.ndarray:
    """Solve ``t + h(t) = target`` for increasing ``t + h(t)`` (Newton, vectorised)."""
    t = target - h(target)
    for _ in range(iterations):
        f = t + h(t) - target
        step = f / (1.0 + dh(t))
        t = t - step
        if np.all(np.abs(step) < 1e-10):
            break
    return t


def _dot(X: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Row-wise dot product of (N, 3) points with a 3-vector.

    Written out instead of ``X @ v``: a BLAS call here spawns threads whose start-up dominates
    and stalls badly on a loaded machine, while three fused multiply-adds are cheap and steady.
    """
    return X[:, 0] * v[0] + X[:, 1] * v[1] + X[:, 2] * v[2]


def _about_line(X: np.ndarray, origin: np.ndarray, direction: np.ndarray):
    """(s, perp, rho) of points about the line through ``origin`` along the unit ``direction``:
    the coordinate along it, the offset from it and that offset's length."""
    rel = X - origin
    s = _dot(rel, direction)
    perp = rel - s[:, None] * direction
    return s, perp, np.sqrt(np.einsum("ij,ij->i", perp, perp))


def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


# ----------------------------------------------------------------------------------------------
# Modes
# ----------------------------------------------------------------------------------------------
class _LocalMap:
    """A smooth, localised, invertible map; subclasses implement ``_map(X, inverse)``."""

    def forward(self, X):
        return self._map(X, False)

    def inverse(self, Y):
        return self._map(Y, True)


@dataclass(frozen=True, eq=False)
class _RadialScale(_LocalMap):
    """Points move along rays from ``centre``: rho -> rho * (1 + (factor - 1) * w(rho))."""

    centre: np.ndarray
    factor: float
    full_mm: float
    zero_mm: float

    def _h(self, rho):
        return rho * (self.factor - 1.0) * _ramp(rho, self.zero_mm, self.full_mm)

    def _dh(self, rho):
        f = self.factor - 1.0
        return f * (_ramp(rho, self.zero_mm, self.full_mm) + rho * _ramp_derivative(rho, self.zero_mm, self.full_mm))

    def _map(self, X, inverse: bool):
        out = X  # modes work in place on the transform's own copy
        rel = X - self.centre
        rho = np.sqrt(np.einsum("ij,ij->i", rel, rel))
        active = rho < self.zero_mm
        if not active.any():
            return out
        r = rho[active]
        new = _solve_monotone(r, self._h, self._dh) if inverse else r + self._h(r)
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio = np.where(r > 0, new / r, 1.0)
        out[active] = self.centre + rel[active] * ratio[:, None]
        return out


@dataclass(frozen=True, eq=False)
class _AxialShift(_LocalMap):
    """Points move along lines parallel to ``direction`` by ``amount * w``.

    ``w = W_s(s) * W_perp(rho)`` with ``s`` the coordinate along the lines (from ``origin``) and
    ``rho`` the distance from the line through ``origin``; only ``W_s`` acts along the lines.
    """

    origin: np.ndarray
    direction: np.ndarray
    amount_mm: float
    s_window: tuple[float, float, float, float]  # full_lo, full_hi, zero_lo, zero_hi
    rho_full_mm: float
    rho_zero_mm: float

    def _map(self, X, inverse: bool):
        out = X
        s, perp, rho = _about_line(X, self.origin, self.direction)
        lo, hi = self.s_window[2], self.s_window[3]
        active = (rho < self.rho_zero_mm) & (s > lo - abs(self.amount_mm)) & (s < hi + abs(self.amount_mm))
        if not active.any():
            return out
        a = self.amount_mm * _ramp(rho[active], self.rho_zero_mm, self.rho_full_mm)
        s_a = s[active]
        h = lambda t: a * _window(t, *self.s_window)  # noqa: E731
        dh = lambda t: a * _window_derivative(t, *self.s_window)  # noqa: E731
        new = _solve_monotone(s_a, h, dh) if inverse else s_a + h(s_a)
        out[active] = X[active] + (new - s_a)[:, None] * self.direction
        return out


@dataclass(frozen=True, eq=False)
class _ShaftWidth(_LocalMap):
    """Cross-sections of the shaft scaled about its axis (through ``origin`` along ``direction``).

    A point at height ``s`` along the axis and distance ``rho`` from it keeps ``s`` and its
    direction from the axis; ``rho -> rho (1 + c(s) W(rho))`` with ``c = (factor - 1) w(s)``, ``w``
    1 below ``s_full`` and 0 above ``s_zero``, ``W`` 1 within ``rho_full_mm`` of the axis (the
    shaft) and 0 beyond ``rho_zero_mm`` (the thigh's far tissue and everything else stays).
    Increasing in ``rho`` for factors 0.8-1.25 with these widths (checked in ``ShapeTransform``).
    """

    origin: np.ndarray
    direction: np.ndarray
    factor: float
    s_full: float
    s_zero: float
    rho_full_mm: float = 40.0
    rho_zero_mm: float = 75.0

    def _map(self, X, inverse: bool):
        out = X
        s, perp, rho = _about_line(X, self.origin, self.direction)
        active = (s < self.s_zero) & (rho < self.rho_zero_mm)
        if not active.any():
            return out
        c = (self.factor - 1.0) * _ramp(s[active], self.s_zero, self.s_full)

        def h(r):
            return r * c * _ramp(r, self.rho_zero_mm, self.rho_full_mm)

        def dh(r):
            return c * (_ramp(r, self.rho_zero_mm, self.rho_full_mm)
                        + r * _ramp_derivative(r, self.rho_zero_mm, self.rho_full_mm))

        r = rho[active]
        new = _solve_monotone(r, h, dh) if inverse else r + h(r)
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio = np.where(r > 0, new / r, 1.0)
        out[active] = X[active] + perp[active] * (ratio - 1.0)[:, None]
        return out


@dataclass(frozen=True, eq=False)
class _WedgeRotation(_LocalMap):
    """Rotation about the line (``point``, ``axis``) by ``angle * w``; points stay on their circles.

    ``w = W_psi(psi) * W_R(R) * W_h(h)`` in cylindrical coordinates about the axis: azimuth ``psi``
    (0 along ``reference``), distance ``R`` and height ``h``. Only ``W_psi`` varies along a circle,
    so the circle map ``psi -> psi + angle * w`` is increasing when ``|angle| * max|W_psi'| < 1``.
    """

    point: np.ndarray
    axis: np.ndarray
    reference: np.ndarray
    angle_rad: float
    psi_full_rad: float
    psi_zero_rad: float
    r_window: tuple[float, float, float, float]
    h_window: tuple[float, float, float, float]

    def _map(self, X, inverse: bool):
        out = X
        e1 = self.reference
        e2 = np.cross(self.axis, e1)
        rel = X - self.point
        h = _dot(rel, self.axis)
        u, v = _dot(rel, e1), _dot(rel, e2)
        R = np.hypot(u, v)
        psi = np.arctan2(v, u)
        zr, zh = self.r_window, self.h_window
        active = (np.abs(psi) < self.psi_zero_rad + abs(self.angle_rad)) & (R > zr[2]) & (R < zr[3]) \
            & (h > zh[2]) & (h < zh[3])
        if not active.any():
            return out
        amp = self.angle_rad * _window(R[active], *zr) * _window(h[active], *zh)
        p = psi[active]
        win = (-self.psi_full_rad, self.psi_full_rad, -self.psi_zero_rad, self.psi_zero_rad)
        hfun = lambda t: amp * _window(t, *win)  # noqa: E731
        dhfun = lambda t: amp * _window_derivative(t, *win)  # noqa: E731
        new = _solve_monotone(p, hfun, dhfun) if inverse else p + hfun(p)
        Ra = R[active]
        out[active] = (self.point + h[active, None] * self.axis + (Ra * np.cos(new))[:, None] * e1
                       + (Ra * np.sin(new))[:, None] * e2)
        return out


@dataclass(frozen=True, eq=False)
class _Scale:
    centre: np.ndarray
    factor: float

    def forward(self, X):
        X -= self.centre
        X *= self.factor
        X += self.centre
        return X

    def inverse(self, Y):
        Y -= self.centre
        Y /= self.factor
        Y += self.centre
        return Y


def _cubic_bspline(t: np.ndarray) -> np.ndarray:
    """Centred cubic B-spline basis function."""
    t = np.abs(t)
    return np.where(t < 1, 2.0 / 3.0 - t * t + 0.5 * t**3, np.where(t < 2, (2.0 - t) ** 3 / 6.0, 0.0))


class _RandomShears:
    """Smooth random deformation as a composition of random "shear fields".

    Each shear moves points along a random unit direction ``e`` by
    ``g(X . b1, X . b2) * w(X . e)``, where ``(b1, b2, e)`` is a random orthonormal frame, ``g`` a
    smooth random 2D field (cubic B-spline of Gaussian coefficients on a lattice of
    ``spacing_mm``) and ``w`` a window that confines the shear to the bone's box along ``e``. As a
    point moves along ``e`` only, ``X . b1`` and ``X . b2`` stay fixed: each shear maps every
    line parallel to ``e`` onto itself by ``t -> t + g * w(t)``, increasing because
    ``|g| * max|w'|`` is far below 1, so it is a diffeomorphism inverted by a 1D Newton solve
    with ``g`` evaluated once. Four shears in random directions give a generic smooth deformation
    at the cost of one 2D interpolation per shear and point. ``g`` is zero on a cylinder (along ``e``)
    around the femoral head, which therefore does not move and stays a sphere, and zero beyond
    the bone's box (the B-spline's outer coefficients are zero).
    """

    STEP_MM = 2.0
    COUNT = 4
    WINDOW_RAMP_MM = 40.0

    def __init__(self, amplitude_mm: float, spacing_mm: float, seed: int, box_lo, box_hi, head_centre,
                 head_zero_mm: float, head_full_mm: float):
        rng = np.random.default_rng(seed)
        lo, hi = np.asarray(box_lo, dtype=np.float64), np.asarray(box_hi, dtype=np.float64)
        corners = np.array([[(lo, hi)[i & 1][0], (lo, hi)[(i >> 1) & 1][1], (lo, hi)[(i >> 2) & 1][2]]
                            for i in range(8)])
        head_centre = np.asarray(head_centre, dtype=np.float64)
        # Bilinear interpolation reaches one lattice diagonal beyond the zero disc: widen it by
        # that much so that the head itself gets exactly zero.
        head_zero_mm = head_zero_mm + 1.5 * self.STEP_MM
        head_full_mm = max(head_full_mm, head_zero_mm + 10.0)
        self.shears = []
        peak = amplitude_mm / math.sqrt(self.COUNT)
        for _ in range(self.COUNT):
            q, r = np.linalg.qr(rng.standard_normal((3, 3)))
            frame = q * np.sign(np.diag(r))[None, :]  # columns b1, b2, e: a uniformly random frame
            b = frame[:, :2]
            e = frame[:, 2]
            proj = corners @ b
            p_lo = proj.min(axis=0)
            n_ctrl = np.ceil((proj.max(axis=0) - p_lo) / spacing_mm).astype(int) + 5
            p_lo = p_lo - 2 * spacing_mm  # two zero rings of coefficients on each side
            coeffs = rng.standard_normal(tuple(n_ctrl))
            coeffs[:2], coeffs[-2:], coeffs[:, :2], coeffs[:, -2:] = 0, 0, 0, 0
            shape = tuple(int(v) for v in np.floor((n_ctrl - 1) * spacing_mm / self.STEP_MM) + 1)
            # Separable evaluation of the 2D B-spline on its fine lattice.
            basis = [
                _cubic_bspline(np.arange(shape[i])[:, None] * (self.STEP_MM / spacing_mm) - np.arange(n_ctrl[i])[None])
                for i in range(2)
            ]
            field = basis[0] @ coeffs @ basis[1].T
            # Fade out around the head: a disc in the (b1, b2) plane = a cylinder along e.
            head_2d = head_centre @ b
            gu = p_lo[0] + np.arange(shape[0]) * self.STEP_MM - head_2d[0]
            gv = p_lo[1] + np.arange(shape[1]) * self.STEP_MM - head_2d[1]
            field *= _ramp(np.hypot(gu[:, None], gv[None, :]), head_zero_mm, head_full_mm)
            top = float(np.abs(field).max())
            if top > 0:
                field *= peak / top
            t_along = corners @ e
            window = (float(t_along.min()), float(t_along.max()),
                      float(t_along.min()) - self.WINDOW_RAMP_MM, float(t_along.max()) + self.WINDOW_RAMP_MM)
            self.shears.append((b, e, p_lo, field, window))

    def _amount(self, X, b, p_lo, field) -> np.ndarray:
        idx = np.stack([(_dot(X, b[:, 0]) - p_lo[0]) / self.STEP_MM, (_dot(X, b[:, 1]) - p_lo[1]) / self.STEP_MM])
        return ndimage.map_coordinates(field, idx, order=1, mode="constant", cval=0.0)

    def _map(self, X, shear, inverse: bool) -> np.ndarray:
        b, e, p_lo, field, window = shear
        g = self._amount(X, b, p_lo, field)  # constant along the line of each point
        t = _dot(X, e)
        if not inverse:
            X += (g * _window(t, *window))[:, None] * e
            return X
        # Inverse: t_x + g * w(t_x) = t. Where w is 1 (or 0) all along between t_x and t the
        # answer is t - g (or t); only points near the ramps of w need the 1D Newton solve.
        peak = np.abs(g)
        full = (t - peak > window[0]) & (t + peak < window[1])
        none = (t + peak < window[2]) | (t - peak > window[3]) | (g == 0)
        shift = np.where(full, -g, 0.0)
        ramp = ~(full | none)
        if ramp.any():
            g_r, t_r = g[ramp], t[ramp]
            h = lambda s: g_r * _window(s, *window)  # noqa: E731
            dh = lambda s: g_r * _window_derivative(s, *window)  # noqa: E731
            shift[ramp] = _solve_monotone(t_r, h, dh) - t_r
        X += shift[:, None] * e
        return X

    def forward(self, X):
        for shear in self.shears:
            X = self._map(X, shear, False)
        return X

    def inverse(self, Y):
        for shear in reversed(self.shears):
            Y = self._map(Y, shear, True)
        return Y


# ----------------------------------------------------------------------------------------------
# The transform
# ----------------------------------------------------------------------------------------------
def _closest_point_on_line_to_line(p1, d1, p2, d2) -> np.ndarray:
    """Point on line 1 closest to line 2."""
    w = p1 - p2
    a, b, c = d1 @ d1, d1 @ d2, d2 @ d2
    d, e = d1 @ w, d2 @ w
    denom = a * c - b * b
    t = 0.0 if abs(denom) < 1e-12 else (b * e - c * d) / denom
    return p1 + t * d1


class ShapeTransform:
    """Deterministic shape augmentation in the canonical femur frame.

    Parameters
    ----------
    params : ShapeParams
    landmarks : inference.anatomy.FemurLandmarks
        The bone's landmarks; they are taken in the canonical frame (``landmarks.canonical()``), so
        landmarks in any frame work. Only the head sphere, shaft and neck axes, neck point and femur
        length are used.

    Notes
    -----
    ``apply_points`` and ``inverse_points`` take and return (N, 3) arrays of canonical-frame mm.
    ``inverse_points(apply_points(X)) == X`` to about 1e-6 mm.
    """

    def __init__(self, params: ShapeParams, landmarks):
        if not isinstance(params, ShapeParams):
            raise TypeError(f"params must be a ShapeParams, not {type(params).__name__}")
        self.params = params
        canon = landmarks.canonical()
        self.landmarks = canon
        c = np.asarray(canon.head_centre_mm, dtype=np.float64)
        r = float(canon.head_radius_mm)
        z = _unit(canon.shaft_direction)
        shaft_point = np.asarray(canon.shaft_point_mm, dtype=np.float64)
        n = _unit(canon.neck_direction)  # towards the head
        rel = c - shaft_point
        offset = float(np.linalg.norm(rel - (rel @ z) * z))
        if offset < 5.0:
            raise DataError(f"femoral offset of {offset:.1f} mm is too small for shape augmentation")
        # Neck geometry: neck length = head centre to the point of the neck axis nearest the shaft
        # axis; the narrowest neck section sits d_np from the head centre.
        base = _closest_point_on_line_to_line(c, -n, shaft_point, z)
        neck_length = float(np.linalg.norm(base - c))
        d_np = float(np.clip((c - np.asarray(canon.neck_point_mm)) @ n, 0.3 * r, 0.9 * neck_length))
        self.neck_length_mm = neck_length
        self.offset_mm = offset
        p = params
        modes = []

        if p.deformation_amplitude_mm > 0:
            length = max(float(canon.femur_length_mm), 3 * r)
            lo = np.array([-offset - 100.0, -100.0, -length - 40.0])
            hi = np.array([r + 100.0, 100.0, r + 100.0])
            modes.append(_RandomShears(p.deformation_amplitude_mm, p.deformation_spacing_mm,
                                       p.deformation_seed, lo, hi, c, 1.1 * r, 1.1 * r + 15.0))

        if p.shaft_width_factor != 1.0:
            # Full below 10 mm under the lesser trochanter's tip, none from 20 mm above it: the
            # trochanters, neck and head keep their shape.
            s_lt = float((np.asarray(canon.lesser_trochanter_mm, dtype=np.float64) - shaft_point) @ z)
            mode = _ShaftWidth(shaft_point, z, p.shaft_width_factor, s_lt - SHAFT_WIDTH_FULL_BELOW_LT_MM,
                               s_lt + SHAFT_WIDTH_ZERO_ABOVE_LT_MM)
            # rho -> rho (1 + c W(rho)) increases while 1 + c (W + rho W') > 0 (c <= factor - 1);
            # W + rho W' lies between its minimum over the fade (sampled finely) and 1.
            rho = np.linspace(mode.rho_full_mm, mode.rho_zero_mm, 701)
            slope = mode.rho_zero_mm, mode.rho_full_mm
            lowest = float(np.min(_ramp(rho, *slope) + rho * _ramp_derivative(rho, *slope)))
            c = p.shaft_width_factor - 1.0
            if 1.0 + min(c * lowest, c) <= 0.2:
                raise DataError(f"shaft_width_factor {p.shaft_width_factor} is too far from 1 to stay a smooth "
                                "deformation")
            modes.append(mode)

        if p.head_radius_factor != 1.0:
            modes.append(_RadialScale(c, p.head_radius_factor, 1.05 * r, 1.05 * r + max(0.8 * r, 12.0)))

        if p.neck_length_factor != 1.0:
            amount = (p.neck_length_factor - 1.0) * neck_length
            # s = coordinate along the neck axis towards the head, 0 at the head centre. Full shift
            # from the narrowest neck section to beyond the head, none from 10 mm past the neck
            # base; on the far side it fades out 1.1 r + 10 mm beyond the head centre.
            far = 1.1 * r * p.head_radius_factor + 10.0
            s_window = (-d_np, far, -(neck_length + 10.0), far + 35.0)
            width = min(neck_length + 10.0 - d_np, 35.0)
            if abs(amount) * _RAMP_SLOPE / width >= 0.8:
                raise DataError(
                    f"neck_length_factor {p.neck_length_factor} changes this neck ({neck_length:.0f} mm) by "
                    f"{amount:.1f} mm, too much to stay a smooth deformation"
                )
            modes.append(_AxialShift(c, n, amount, s_window, 1.5 * r, 1.5 * r + 25.0))

        pivot = c - n * (0.5 * (d_np + neck_length))
        arm = float(np.linalg.norm(c - pivot))
        if p.neck_shaft_delta_deg != 0.0:
            axis = np.cross(n, z)
            if np.linalg.norm(axis) < 1e-6:
                raise DataError("the neck axis is parallel to the shaft axis; cannot change the neck-shaft angle")
            axis = _unit(axis)
            shrink = max(0.0, -(p.neck_length_factor - 1.0) * neck_length)
            head_angle = math.asin(min(1.0, 1.05 * r * p.head_radius_factor / max(arm - shrink, 1e-3)))
            psi_full = float(np.clip(head_angle + math.radians(3.0), math.radians(35.0), math.radians(55.0)))
            psi_zero = psi_full + math.radians(35.0)
            reach = arm + 1.5 * r * p.head_radius_factor + abs(p.neck_length_factor - 1.0) * neck_length
            modes.append(_WedgeRotation(
                pivot, axis, n, math.radians(p.neck_shaft_delta_deg), psi_full, psi_zero,
                (12.0, reach, 3.0, reach + 40.0),
                (-1.5 * r, 1.5 * r, -1.5 * r - 30.0, 1.5 * r + 30.0),
            ))

        if p.anteversion_delta_deg != 0.0:
            foot = shaft_point + ((c - shaft_point) @ z) * z
            x_dir = _unit(c - foot)
            head_angle = math.asin(min(1.0, 1.05 * r * p.head_radius_factor / offset))
            psi_full = float(np.clip(head_angle + math.radians(5.0), math.radians(35.0), math.radians(60.0)))
            psi_zero = psi_full + math.radians(35.0)
            reach = offset + 1.5 * r * p.head_radius_factor + 15.0
            # Heights relative to the head centre: full above the head's lower edge, none 25 mm
            # lower (the lesser trochanter stays on the shaft).
            z_full = -(r * p.head_radius_factor + 5.0)
            modes.append(_WedgeRotation(
                foot, -z, x_dir, math.radians(p.anteversion_delta_deg), psi_full, psi_zero,
                (0.5 * offset, reach, 5.0, reach + 40.0),
                (-(r + 100.0), -z_full, -(r + 130.0), -z_full + 25.0),
            ))

        if p.global_scale != 1.0:
            modes.append(_Scale(c, p.global_scale))
        self._modes = modes
        logger.debug("shape transform: %d modes, neck length %.1f mm, offset %.1f mm, pivot %.1f mm from the head",
                     len(modes), neck_length, offset, arm)

    # -- public --------------------------------------------------------------------------------
    @property
    def is_identity(self) -> bool:
        """True when no mode is active (the parameters are neutral)."""
        return not self._modes

    @staticmethod
    def _points(X) -> tuple[np.ndarray, tuple]:
        arr = np.asarray(X, dtype=np.float64)
        if arr.shape[-1:] != (3,):
            raise ValueError(f"points must have shape (N, 3), not {arr.shape}")
        if not np.all(np.isfinite(arr)):
            raise ValueError("points must be finite")
        return arr.reshape(-1, 3), arr.shape

    #: Points per chunk: the modes make a dozen temporaries per point, and chunks that fit in
    #: the CPU caches run about twice as fast per point as one huge batch.
    CHUNK = 1 << 18

    def _run(self, X, inverse: bool) -> np.ndarray:
        pts, shape = self._points(X)
        out = pts.copy()  # the modes work in place on this copy
        modes = list(reversed(self._modes)) if inverse else self._modes
        for start in range(0, len(out), self.CHUNK):
            chunk = out[start : start + self.CHUNK]
            for mode in modes:
                chunk = mode.inverse(chunk) if inverse else mode.forward(chunk)
            out[start : start + self.CHUNK] = chunk
        return out.reshape(shape)

    def apply_points(self, X) -> np.ndarray:
        """Deform undeformed canonical-frame points, (N, 3) mm -> (N, 3) mm."""
        return self._run(X, inverse=False)

    def inverse_points(self, Y) -> np.ndarray:
        """Undeformed positions of deformed canonical-frame points (exact inverse of ``apply_points``)."""
        return self._run(Y, inverse=True)

    def jacobian_determinant(self, X, step_mm: float = 0.25) -> np.ndarray:
        """det(d apply_points / dX) at points (N, 3) by central differences."""
        pts, _ = self._points(X)
        columns = []
        for axis in range(3):
            e = np.zeros(3)
            e[axis] = step_mm
            columns.append((self.apply_points(pts + e) - self.apply_points(pts - e)) / (2 * step_mm))
        J = np.stack(columns, axis=-1)  # (N, 3 outputs, 3 inputs)
        return np.linalg.det(J)

    def apply_mesh(self, mesh):
        """A mesh (canonical frame) with deformed vertices and the same triangles."""
        return mesh.with_vertices(self.apply_points(mesh.vertices))


class _Composed:
    """``then(first(x))`` and its inverse; ``first`` and ``then`` have ``apply_points``/``inverse_points``."""

    def __init__(self, first, then):
        self.first, self.then = first, then

    def apply_points(self, X):
        return self.then.apply_points(self.first.apply_points(X))

    def inverse_points(self, Y):
        return self.first.inverse_points(self.then.inverse_points(Y))


def compose(first, then):
    """The point map ``first`` then ``then`` (either may be None; None if both are)."""
    if first is None or then is None:
        return then if first is None else first
    return _Composed(first, then)
