"""Projective geometry of calibrated radiographs, and volume grids (numpy only).

Conventions (shared by every HipAtlas module; see ``docs/architecture.md``)
-------------------------------------------------------------------------
* World: patient LPS, millimetres: +x towards the patient's left, +y posterior, +z superior.
* Radiograph pixels: ``u`` = column, ``v`` = row, 0-based; the centre of pixel (0, 0) is (0, 0).
* Projection matrix ``P`` (3, 4) float64: ``[u*w, v*w, w] = P @ [x, y, z, 1]``. Matrices built
  here have ``w > 0`` for points in front of the source (between source and detector, and beyond)
  and ``||P[2, :3]|| = 1 / sdd_mm``, so ``w`` is the depth along the principal axis divided by
  the source-detector distance (``w == 1`` on the detector plane).

C-arm parameters (:class:`CArmView`)
------------------------------------
The C-arm turns rigidly about the isocentre; source, detector and the detector's pixel axes
move together.

* ``lao_deg = 0, cranial_deg = 0`` is an AP radiograph: source anterior, detector posterior,
  beam along +y.
* ``lao_deg`` rotates the C-arm about the patient's long axis (+z, right-handed). Positive
  values move the **source towards the patient's left**: ``lao_deg = +90`` puts the source at
  the patient's left and the detector at the right (beam along -x); ``-90`` the reverse. The
  beam axis at ``lao_deg = a`` is the same line as a DICOM/cardiology LAO ``a`` view, travelled
  the other way (AP instead of PA); see :func:`projection_from_dicom` for the exact mapping.
* ``cranial_deg`` then tilts the C-arm about its current horizontal detector axis. Positive
  values point the beam towards the head (cranial / cephalad angulation): the source moves
  towards the feet and the detector towards the head.
* Pixel axes with ``viewed_from="source"`` (default): the image shows the patient as seen from
  the X-ray source. For the AP view ``u`` increases towards the patient's **left** (the patient's
  right is on the image's left, the clinical AP display) and ``v`` increases **inferiorly**
  (superior at the top). Because the detector turns with the C-arm, at ``lao_deg = +90`` ``u``
  increases towards **posterior** (anterior on the image's left, superior at the top), and at
  ``lao_deg = -90`` towards anterior. ``viewed_from="detector"`` mirrors ``u`` (the image as
  seen from the detector looking at the source): this is the display convention of C-arm (XA)
  images, whose 0 deg view is PA, and is what :func:`projection_from_dicom` uses.

With unit vectors ``e_u``, ``e_v`` along the pixel axes, ``n`` from source to detector, pitch
``p_u``, ``p_v`` and principal point ``(c_u, c_v)`` (where the perpendicular from the source
meets the detector; the isocentre projects there), the matrix is (``docs/geometry.md``)::

    A = [[e_u / p_u + c_u n / SDD], [e_v / p_v + c_v n / SDD], [n / SDD]],   P = [A | -A S]

so that ``u = c_u + (SDD / depth) * e_u . (X - S) / p_u`` with ``depth = n . (X - S)``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from inference.errors import CalibrationError, GeometryError
from inference.validate import number, positive_int

logger = logging.getLogger(__name__)

__all__ = [
    "CALIBRATION_SOURCES",
    "Calibration",
    "CArmView",
    "ViewPairReport",
    "VolumeGeometry",
    "crop_resize",
    "decompose",
    "flip_horizontal",
    "flip_vertical",
    "mirror_world_x",
    "normalise_projection",
    "pixel_rays",
    "principal_direction",
    "project_points",
    "projection_from_dicom",
    "projection_matrix",
    "resize_to",
    "source_position",
    "transform_world",
    "triangulate",
    "validate_projection_matrix",
    "view_pair_check",
]

#: Where a view's projection matrix came from (shown in reports).
CALIBRATION_SOURCES = ("case.json projection_matrix", "dicom-tags", "calibration-json")

#: view_pair_check warns when the viewing axes are closer than this to parallel.
MIN_VIEW_PAIR_ANGLE_DEG = 20.0
#: view_pair_check warns when the two central rays pass further apart than this.
MAX_CENTRAL_RAY_GAP_MM = 50.0

# The left 3x3 block of P is treated as singular below this ratio of its smallest to its
# largest singular value. Real matrices sit near 1e-4 (rows of size 1/pitch against 1/SDD);
# 1e-10 only rejects matrices that really have lost a dimension.
_RANK_TOLERANCE = 1e-10


# ----------------------------------------------------------------------------- helpers
def _float_tuple(value: Any, length: int, what: str) -> tuple[float, ...]:
    try:
        items = np.asarray(value, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise GeometryError(f"{what} must be {length} numbers, not {value!r}") from None
    if items.size != length:
        raise GeometryError(f"{what} must have {length} values, not {items.size} ({value!r})")
    if not np.all(np.isfinite(items)):
        raise GeometryError(f"{what} must be finite, not {value!r}")
    return tuple(float(x) for x in items)


def _rotation_z(angle_rad: float) -> np.ndarray:
    c, s = math.cos(angle_rad), math.sin(angle_rad)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _rotation_x(angle_rad: float) -> np.ndarray:
    c, s = math.cos(angle_rad), math.sin(angle_rad)
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def _wrap_deg(angle_deg: float) -> float:
    """Wrap an angle to (-180, 180]."""
    wrapped = math.fmod(angle_deg + 180.0, 360.0)
    if wrapped <= 0.0:
        wrapped += 360.0
    return wrapped - 180.0


# ----------------------------------------------------------------------------- C-arm
@dataclass(frozen=True)
class CArmView:
    """Physical parameters of one C-arm / radiography view.

    Parameters
    ----------
    sdd_mm : float
        Source-to-detector distance (mm), > sid_mm.
    sid_mm : float
        Source-to-isocentre distance (mm), > 0.
    lao_deg : float
        Rotation about the patient's long axis; 0 = AP (source anterior), +90 = source at the
        patient's left (see the module docstring).
    cranial_deg : float
        Cranio-caudal tilt; positive = beam pointing towards the head.
    rows, cols : int
        Detector size in pixels (>= 1).
    pixel_mm : float
        Pixel pitch along ``u`` (distance between columns) in mm at the detector plane; also
        the pitch along ``v`` unless ``pixel_v_mm`` is given.
    principal_point_px : (float, float) or None
        ``(u, v)`` of the principal point (the foot of the perpendicular from the source; the
        isocentre projects here). Default: the image centre ``((cols-1)/2, (rows-1)/2)``.
    isocentre_mm : (float, float, float)
        World position of the isocentre (LPS mm).
    pixel_v_mm : float or None
        Pixel pitch along ``v`` (distance between rows) in mm; default ``pixel_mm``.
    viewed_from : {"source", "detector"}
        Whether the image shows the patient as seen from the source (AP radiograph display) or
        from the detector (``u`` mirrored; C-arm/XA display).
    """

    sdd_mm: float
    sid_mm: float
    lao_deg: float
    cranial_deg: float
    rows: int
    cols: int
    pixel_mm: float
    principal_point_px: tuple[float, float] | None = None
    isocentre_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    pixel_v_mm: float | None = None
    viewed_from: str = "source"

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        sdd = number(self.sdd_mm, "CArmView sdd_mm", 0, low_open=True, error=GeometryError)
        sid = number(self.sid_mm, "CArmView sid_mm", 0, low_open=True, error=GeometryError)
        if sid >= sdd:
            raise GeometryError(
                f"CArmView sid_mm ({sid:g} mm) must be smaller than sdd_mm ({sdd:g} mm): "
                "the isocentre lies between the source and the detector"
            )
        set_(self, "sdd_mm", sdd)
        set_(self, "sid_mm", sid)
        set_(self, "lao_deg", number(self.lao_deg, "CArmView lao_deg", error=GeometryError))
        set_(self, "cranial_deg", number(self.cranial_deg, "CArmView cranial_deg", error=GeometryError))
        empty = " (an empty detector has no pixels)"
        set_(self, "rows", positive_int(self.rows, "CArmView rows", error=GeometryError, hint=empty))
        set_(self, "cols", positive_int(self.cols, "CArmView cols", error=GeometryError, hint=empty))
        for name in ("pixel_mm", "pixel_v_mm"):
            value = getattr(self, name)
            if value is None:
                continue
            set_(self, name, number(value, f"CArmView {name} (detector pitch, mm)", 0, low_open=True,
                                    error=GeometryError))
        if self.principal_point_px is not None:
            set_(self, "principal_point_px",
                 _float_tuple(self.principal_point_px, 2, "CArmView principal_point_px"))
        set_(self, "isocentre_mm", _float_tuple(self.isocentre_mm, 3, "CArmView isocentre_mm"))
        if self.viewed_from not in ("source", "detector"):
            raise GeometryError(
                f"CArmView viewed_from must be 'source' or 'detector', not {self.viewed_from!r}"
            )

    @property
    def pitch_uv_mm(self) -> tuple[float, float]:
        """Pixel pitch ``(along u, along v)`` in mm."""
        return (self.pixel_mm, self.pixel_v_mm if self.pixel_v_mm is not None else self.pixel_mm)

    @property
    def principal_point_uv_px(self) -> tuple[float, float]:
        """The principal point, with the image-centre default filled in."""
        if self.principal_point_px is not None:
            return self.principal_point_px
        return ((self.cols - 1) / 2.0, (self.rows - 1) / 2.0)

    def frame(self) -> dict[str, np.ndarray]:
        """Source position and detector axes in world mm.

        Returns
        -------
        dict
            ``source_mm`` (3,), ``e_u``, ``e_v`` (unit vectors along increasing column / row),
            ``n`` (unit, source -> detector).
        """
        rotation = _rotation_z(math.radians(self.lao_deg)) @ _rotation_x(math.radians(self.cranial_deg))
        # AP reference frame: beam posterior (+y), u towards patient left (+x), v inferior (-z).
        n = rotation @ np.array([0.0, 1.0, 0.0])
        e_u = rotation @ np.array([1.0, 0.0, 0.0])
        e_v = rotation @ np.array([0.0, 0.0, -1.0])
        if self.viewed_from == "detector":
            e_u = -e_u
        source = np.asarray(self.isocentre_mm) - self.sid_mm * n
        return {"source_mm": source, "e_u": e_u, "e_v": e_v, "n": n}


def projection_matrix(view: CArmView) -> np.ndarray:
    """Projection matrix of a :class:`CArmView`.

    Parameters
    ----------
    view : CArmView

    Returns
    -------
    ndarray, shape (3, 4), float64
        ``P = [A | -A S]`` (see the module docstring), ``w > 0`` in front of the source and
        ``||P[2, :3]|| = 1 / view.sdd_mm``.
    """
    if not isinstance(view, CArmView):
        raise GeometryError(f"projection_matrix needs a CArmView, not {type(view).__name__}")
    frame = view.frame()
    pitch_u, pitch_v = view.pitch_uv_mm
    c_u, c_v = view.principal_point_uv_px
    n_over_sdd = frame["n"] / view.sdd_mm
    a = np.stack([
        frame["e_u"] / pitch_u + c_u * n_over_sdd,
        frame["e_v"] / pitch_v + c_v * n_over_sdd,
        n_over_sdd,
    ])
    return np.concatenate([a, -(a @ frame["source_mm"])[:, None]], axis=1)


# ----------------------------------------------------------------------------- validation
def validate_projection_matrix(P: Any, name: str = "projection_matrix") -> np.ndarray:
    """Check a projection matrix and return it as a float64 (3, 4) array.

    Parameters
    ----------
    P : array_like, shape (3, 4)
    name : str
        What to call the matrix in error messages (e.g. ``"view 'AP' projection_matrix"``).

    Returns
    -------
    ndarray, shape (3, 4), float64
        A copy of ``P``.

    Raises
    ------
    GeometryError
        If ``P`` is not numeric, not 3x4, not finite, or its left 3x3 block is singular (no
        single X-ray source position).
    """
    try:
        matrix = np.array(P, dtype=np.float64)
    except (TypeError, ValueError):
        raise GeometryError(f"{name} must be a 3x4 matrix of numbers, not {P!r}") from None
    if matrix.shape != (3, 4):
        raise GeometryError(f"{name} must be a 3x4 matrix, but has shape {matrix.shape}")
    bad = np.argwhere(~np.isfinite(matrix))
    if bad.size:
        row, col = (int(i) for i in bad[0])
        raise GeometryError(
            f"{name} contains a non-finite value ({matrix[row, col]} at row {row}, column {col}); "
            "the calibration is damaged or incomplete"
        )
    singular_values = np.linalg.svd(matrix[:, :3], compute_uv=False)
    if singular_values[0] == 0.0 or singular_values[-1] / singular_values[0] < _RANK_TOLERANCE:
        raise GeometryError(
            f"{name} is rank-deficient: its left 3x3 block has singular values "
            f"{np.array2string(singular_values, precision=3)}, so it does not define an X-ray "
            "source position; check the calibration"
        )
    return matrix


def _points(X: Any, width: int, what: str) -> np.ndarray:
    array = np.asarray(X, dtype=np.float64)
    if array.ndim == 0 or array.shape[-1] != width:
        raise GeometryError(f"{what} must have shape (..., {width}), not {array.shape}")
    return array


# ----------------------------------------------------------------------------- decomposition
def source_position(P: Any) -> np.ndarray:
    """X-ray source position: the null vector of ``P``.

    Parameters
    ----------
    P : array_like, shape (3, 4)

    Returns
    -------
    ndarray, shape (3,)
        Source position in world mm (``-P[:, :3]^-1 P[:, 3]``).
    """
    matrix = validate_projection_matrix(P)
    return -np.linalg.solve(matrix[:, :3], matrix[:, 3])


def principal_direction(P: Any) -> np.ndarray:
    """Unit vector of the principal (central) axis, from the source towards the detector.

    Relies on the sign convention ``w > 0`` in front of the source (use
    :func:`normalise_projection` with a ``front_point_mm`` for matrices of unknown sign).

    Parameters
    ----------
    P : array_like, shape (3, 4)

    Returns
    -------
    ndarray, shape (3,)
    """
    matrix = validate_projection_matrix(P)
    row = matrix[2, :3]
    return row / np.linalg.norm(row)


def normalise_projection(P: Any, *, front_point_mm: Any = None, sdd_mm: float | None = None) -> np.ndarray:
    """Rescale ``P`` to the HipAtlas normal form.

    A projection matrix is defined up to a non-zero scale; the sign decides which side of the
    source counts as "in front" and cannot be read from ``P`` alone (a mirrored image seen from
    the front is the same projective map as an unmirrored one seen from behind).

    Parameters
    ----------
    P : array_like, shape (3, 4)
    front_point_mm : array_like, shape (3,), optional
        A world point known to lie in front of the source (the patient; for two views the
        ``midpoint_mm`` of :func:`view_pair_check`). The sign is chosen so that ``w > 0``
        there. If omitted, the sign of ``P`` is kept.
    sdd_mm : float, optional
        If given, scale so that ``||P[2, :3]|| = 1 / sdd_mm`` (as :func:`projection_matrix`
        does); otherwise ``||P[2, :3]|| = 1`` so that ``w`` is the depth in mm.

    Returns
    -------
    ndarray, shape (3, 4)
    """
    matrix = validate_projection_matrix(P)
    scale = 1.0 / np.linalg.norm(matrix[2, :3])
    if sdd_mm is not None:
        scale /= number(sdd_mm, "sdd_mm", 0, low_open=True, error=GeometryError)
    if front_point_mm is not None:
        point = np.append(_float_tuple(front_point_mm, 3, "front_point_mm"), 1.0)
        w = float(matrix[2] @ point)
        if w == 0.0:
            raise GeometryError(
                f"front_point_mm {tuple(point[:3])} lies in the plane of the X-ray source, so it "
                "cannot tell which side is in front"
            )
        scale = math.copysign(scale, w)
    return matrix * scale


def decompose(P: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split ``P`` into intrinsics and pose: ``P = c K [R | t]`` with ``c = ||P[2, :3]|| > 0``.

    Parameters
    ----------
    P : array_like, shape (3, 4)

    Returns
    -------
    K : ndarray, shape (3, 3)
        Upper triangular with positive diagonal and ``K[2, 2] = 1``: focal lengths in pixels
        (``SDD / pitch``), skew, principal point in ``K[:2, 2]``.
    R : ndarray, shape (3, 3)
        Orthonormal world-to-camera rotation; ``R[2]`` is the principal direction when
        ``w > 0`` in front. ``det(R) = -1`` means a mirrored image (e.g. ``viewed_from=
        "detector"`` or after :func:`flip_horizontal`), not an error.
    t : ndarray, shape (3,)
        ``t = -R @ source_position(P)``.
    """
    matrix = validate_projection_matrix(P)
    m = matrix[:, :3]
    # RQ decomposition from numpy's QR: with J the row-reversal permutation, QR of (J M)^T
    # gives M = (J R' ^T J)(J Q'^T), an upper-triangular times an orthogonal matrix.
    reverse = np.eye(3)[::-1]
    q_prime, r_prime = np.linalg.qr((reverse @ m).T)
    upper = reverse @ r_prime.T @ reverse
    rotation = reverse @ q_prime.T
    # Move the signs into R so that K has a positive diagonal (makes the split unique).
    signs = np.diag(np.sign(np.diag(upper)))
    upper = upper @ signs
    rotation = signs @ rotation
    scale = upper[2, 2]
    intrinsics = upper / scale
    translation = np.linalg.solve(upper, matrix[:, 3])
    return intrinsics, rotation, translation


# ----------------------------------------------------------------------------- projection
def project_points(P: Any, X: Any) -> np.ndarray:
    """Project world points to pixel coordinates.

    Parameters
    ----------
    P : array_like, shape (3, 4)
    X : array_like, shape (..., 3)
        World points (mm).

    Returns
    -------
    ndarray, shape (..., 2)
        ``(u, v)`` per point; NaN for points at or behind the source plane (``w <= 0``), whose
        "projection" would land mirrored on the detector.
    """
    matrix = validate_projection_matrix(P)
    points = _points(X, 3, "X")
    homogeneous = points @ matrix[:, :3].T + matrix[:, 3]
    w = homogeneous[..., 2:3]
    with np.errstate(divide="ignore", invalid="ignore"):
        uv = homogeneous[..., :2] / w
    return np.where(w > 0, uv, np.nan)


def pixel_rays(P: Any, uv: Any) -> tuple[np.ndarray, np.ndarray]:
    """Rays from the source through pixel positions.

    Parameters
    ----------
    P : array_like, shape (3, 4)
    uv : array_like, shape (..., 2)
        Pixel coordinates (``u`` column, ``v`` row).

    Returns
    -------
    origins : ndarray, shape (..., 3)
        The source position, repeated.
    directions : ndarray, shape (..., 3)
        Unit vectors pointing into the half-space in front of the source (``w`` increasing).
    """
    matrix = validate_projection_matrix(P)
    pixels = _points(uv, 2, "uv")
    homogeneous = np.concatenate([pixels, np.ones(pixels.shape[:-1] + (1,))], axis=-1)
    # d = M^-1 [u, v, 1] satisfies P (S + t d) = t [u, v, 1], so w grows with t: it points forward.
    directions = np.linalg.solve(matrix[:, :3], homogeneous.reshape(-1, 3).T).T.reshape(homogeneous.shape)
    directions /= np.linalg.norm(directions, axis=-1, keepdims=True)
    source = -np.linalg.solve(matrix[:, :3], matrix[:, 3])
    origins = np.broadcast_to(source, directions.shape).copy()
    return origins, directions


# ----------------------------------------------------------------------------- image edits
def crop_resize(P: Any, u0: float, v0: float, scale_u: float, scale_v: float | None = None) -> np.ndarray:
    """Update ``P`` for a crop followed by a resampling of the image.

    The crop starts at input pixel ``(u0, v0)`` (``image[v0:, u0:]``; fractional values are
    allowed), then the crop is resampled by ``scale_u`` along columns and ``scale_v`` along
    rows with pixel-area alignment (the edges of the crop map to the edges of the output, as in
    ``skimage.transform.resize``, PIL, ``tf.image.resize`` and ``scipy.ndimage.zoom(...,
    grid_mode=True)``): output pixel centre ``i`` samples input coordinate
    ``u_in = u0 + (i + 0.5) / s - 0.5``.

    Solving for ``i`` gives ``i = s * u_in - s * u0 + (s - 1) / 2``, hence::

        P' = [[s_u, 0, (s_u - 1)/2 - s_u u0], [0, s_v, (s_v - 1)/2 - s_v v0], [0, 0, 1]] @ P

    The ``(s - 1) / 2`` term is the half-pixel offset that ``geometry.md`` warns about; it
    vanishes for a pure crop (``s = 1``). For a resampler that aligns the first and last pixel
    centres instead ("align corners"), the scale is ``(n_out - 1) / (n_in - 1)`` and the offset
    is 0 -- do not use this function's ``s`` for that.

    Parameters
    ----------
    P : array_like, shape (3, 4)
    u0, v0 : float
        Input coordinates of the centre of the crop's first pixel.
    scale_u : float
        Output pixels per input pixel along ``u`` (> 0); e.g. ``out_cols / crop_cols``.
    scale_v : float, optional
        Same along ``v``; default ``scale_u``.

    Returns
    -------
    ndarray, shape (3, 4)
    """
    matrix = validate_projection_matrix(P)
    u0 = number(u0, "crop_resize u0", error=GeometryError)
    v0 = number(v0, "crop_resize v0", error=GeometryError)
    s_u = number(scale_u, "crop_resize scale_u", 0, low_open=True, error=GeometryError)
    s_v = s_u if scale_v is None else number(scale_v, "crop_resize scale_v", 0, low_open=True, error=GeometryError)
    image_affine = np.array([
        [s_u, 0.0, 0.5 * (s_u - 1.0) - s_u * u0],
        [0.0, s_v, 0.5 * (s_v - 1.0) - s_v * v0],
        [0.0, 0.0, 1.0],
    ])
    return image_affine @ matrix


def resize_to(P: Any, in_shape: tuple[int, int], out_shape: tuple[int, int]) -> np.ndarray:
    """Update ``P`` for resizing a whole ``(rows, cols)`` image to ``out_shape`` (pixel-area aligned).

    Equivalent to ``crop_resize(P, 0, 0, out_cols / in_cols, out_rows / in_rows)``.

    Parameters
    ----------
    P : array_like, shape (3, 4)
    in_shape, out_shape : (int, int)
        ``(rows, cols)`` before and after.

    Returns
    -------
    ndarray, shape (3, 4)
    """
    in_rows, in_cols = (positive_int(x, "resize_to in_shape", error=GeometryError)
                        for x in _shape2(in_shape, "in_shape"))
    out_rows, out_cols = (positive_int(x, "resize_to out_shape", error=GeometryError)
                          for x in _shape2(out_shape, "out_shape"))
    return crop_resize(P, 0.0, 0.0, out_cols / in_cols, out_rows / in_rows)


def _shape2(shape: Any, what: str) -> tuple[Any, Any]:
    try:
        rows, cols = shape
    except (TypeError, ValueError):
        raise GeometryError(f"resize_to {what} must be (rows, cols), not {shape!r}") from None
    return rows, cols


def flip_horizontal(P: Any, cols: int) -> np.ndarray:
    """Update ``P`` for a left-right flip of an image with ``cols`` columns (``u -> cols-1-u``)."""
    matrix = validate_projection_matrix(P)
    n = positive_int(cols, "flip_horizontal cols", error=GeometryError)
    return np.array([[-1.0, 0.0, n - 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]) @ matrix


def flip_vertical(P: Any, rows: int) -> np.ndarray:
    """Update ``P`` for an up-down flip of an image with ``rows`` rows (``v -> rows-1-v``)."""
    matrix = validate_projection_matrix(P)
    n = positive_int(rows, "flip_vertical rows", error=GeometryError)
    return np.array([[1.0, 0.0, 0.0], [0.0, -1.0, n - 1.0], [0.0, 0.0, 1.0]]) @ matrix


def mirror_world_x(P: Any) -> np.ndarray:
    """``P @ diag(-1, 1, 1, 1)``: the same camera looking at the world mirrored in x.

    A left femur at ``X`` becomes the right femur ``(-x, y, z)``, which projects to the same
    pixel with the returned matrix (the image itself is unchanged).
    """
    matrix = validate_projection_matrix(P)
    return matrix @ np.diag([-1.0, 1.0, 1.0, 1.0])


def transform_world(P: Any, T_new_to_world: Any) -> np.ndarray:
    """Express ``P`` in another world frame.

    Parameters
    ----------
    P : array_like, shape (3, 4)
        Maps the current world frame to pixels.
    T_new_to_world : array_like, shape (4, 4)
        Invertible affine transform taking points of the new frame into the current world frame
        (``X_world = T @ X_new``), e.g. a femur's canonical-frame-to-patient pose.

    Returns
    -------
    ndarray, shape (3, 4)
        ``P @ T``, so that ``P_new @ X_new == P @ X_world``.
    """
    matrix = validate_projection_matrix(P)
    transform = _affine4(T_new_to_world, "T_new_to_world")
    return matrix @ transform


def _affine4(T: Any, what: str) -> np.ndarray:
    try:
        transform = np.array(T, dtype=np.float64)
    except (TypeError, ValueError):
        raise GeometryError(f"{what} must be a 4x4 matrix of numbers, not {T!r}") from None
    if transform.shape != (4, 4):
        raise GeometryError(f"{what} must be a 4x4 matrix, but has shape {transform.shape}")
    if not np.all(np.isfinite(transform)):
        raise GeometryError(f"{what} contains non-finite values")
    if not np.allclose(transform[3], [0.0, 0.0, 0.0, 1.0], atol=1e-12):
        raise GeometryError(f"{what} must be affine (last row 0, 0, 0, 1), not {transform[3].tolist()}")
    if abs(np.linalg.det(transform[:3, :3])) < 1e-12:
        raise GeometryError(f"{what} is singular (not invertible)")
    return transform


# ----------------------------------------------------------------------------- calibration / DICOM
@dataclass(frozen=True)
class Calibration:
    """Where a view's projection matrix came from (for reports).

    Parameters
    ----------
    source : str
        One of :data:`CALIBRATION_SOURCES`.
    details : dict
        JSON-friendly facts: for ``"dicom-tags"`` the tags used (``tags_used``), the derived
        ``view`` parameters and any ``warnings``.
    """

    source: str
    details: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.source not in CALIBRATION_SOURCES:
            raise GeometryError(
                f"Calibration source must be one of {CALIBRATION_SOURCES}, not {self.source!r}"
            )
        object.__setattr__(self, "details", dict(self.details))

    def to_dict(self) -> dict[str, Any]:
        """``{"source": ..., **details}`` for report.json."""
        return {"source": self.source, **self.details}


_DICOM_TAGS = {
    "ImagerPixelSpacing": "(0018,1164)",
    "DistanceSourceToDetector": "(0018,1110)",
    "DistanceSourceToPatient": "(0018,1111)",
    "EstimatedRadiographicMagnificationFactor": "(0018,1114)",
    "PositionerPrimaryAngle": "(0018,1510)",
    "PositionerSecondaryAngle": "(0018,1511)",
    "Rows": "(0028,0010)",
    "Columns": "(0028,0011)",
    "PositionOfIsocenterProjection": "(0018,9430)",
    "DetectorElementSpacing": "(0018,7022)",
    "FieldOfViewOrigin": "(0018,7030)",
    "FieldOfViewRotation": "(0018,7032)",
    "FieldOfViewHorizontalFlip": "(0018,7034)",
}


def _dicom_value(ds: Any, keyword: str) -> Any:
    """Value of a DICOM keyword in a pydicom Dataset or a mapping; None if absent or empty."""
    getter = getattr(ds, "get", None)
    value = getter(keyword, None) if callable(getter) else getattr(ds, keyword, None)
    value = getattr(value, "value", value)  # a pydicom DataElement stored in a plain dict
    if value is None or (isinstance(value, (str, bytes)) and not str(value).strip()):
        return None
    if isinstance(value, (list, tuple)) and len(value) == 0:
        return None
    return value


def _dicom_numbers(
    ds: Any, keyword: str, count: int, label: str, *, required: bool = True
) -> list[float] | None:
    value = _dicom_value(ds, keyword)
    tag = f"{keyword} {_DICOM_TAGS[keyword]}"
    if value is None:
        if required:
            raise CalibrationError(
                f"{label}: DICOM tag {tag} is missing, so the X-ray geometry is unknown; "
                "give this view a projection_matrix in case.json (or a calibration file)"
            )
        return None
    if isinstance(value, str):
        items = value.split("\\")  # a raw DS/IS string with several values
    elif hasattr(value, "__iter__") and not isinstance(value, bytes):
        items = list(value)  # pydicom MultiValue, list, tuple
    else:
        items = [value]
    try:
        numbers = [float(x) for x in items]
    except (TypeError, ValueError):
        raise CalibrationError(f"{label}: DICOM tag {tag} is not numeric: {value!r}") from None
    if len(numbers) != count or not all(math.isfinite(x) for x in numbers):
        raise CalibrationError(f"{label}: DICOM tag {tag} must hold {count} finite number(s), not {value!r}")
    return numbers


def projection_from_dicom(ds: Any, *, name: str = "view") -> tuple[np.ndarray, Calibration]:
    """Projection matrix from the X-ray geometry tags of a DICOM radiograph.

    Tags (``ds`` is a pydicom ``Dataset`` or any mapping with DICOM keywords as keys):

    * ImagerPixelSpacing (0018,1164): pitch at the detector plane, ``[row spacing, column
      spacing]`` = ``[pixel_v_mm, pixel_mm]``.
    * DistanceSourceToDetector (0018,1110): SDD.
    * DistanceSourceToPatient (0018,1111): source to isocentre; if absent,
      EstimatedRadiographicMagnificationFactor (0018,1114) gives ``SID = SDD / factor``.
    * PositionerPrimaryAngle (0018,1510) ``alpha`` and PositionerSecondaryAngle (0018,1511)
      ``beta``: DICOM places the detector at ``alpha`` from anterior, +90 = patient's left (LAO),
      and tilts it by ``beta`` towards the head (cranial). The source is opposite, so this is
      ``CArmView(lao_deg = alpha + 180 (wrapped to (-180, 180]), cranial_deg = beta,
      viewed_from="detector")``: an XA image is displayed heads-up as seen from the detector
      (at ``alpha = 0``, a PA view, the patient's right is on the image's left).
    * Rows (0028,0010), Columns (0028,0011).
    * PositionOfIsocenterProjection (0018,9430), if present: principal point, given in physical
      detector elements as ``[along the column (v), along the row (u)]`` from the top-left
      element; converted with DetectorElementSpacing (0018,7022) (binning) and
      FieldOfViewOrigin (0018,7030) when present. Otherwise the image centre.
    * FieldOfViewHorizontalFlip (0018,7034) = YES: the image is mirrored left-right relative to
      the detector readout (shown as seen from the source, ``viewed_from="source"``); the
      isocentre projection, given in detector elements, is mirrored with it.

    The world origin is the isocentre. Distances are never guessed.

    Parameters
    ----------
    ds : pydicom.Dataset or Mapping
    name : str
        View name for error messages.

    Returns
    -------
    P : ndarray, shape (3, 4)
    calibration : Calibration
        ``source="dicom-tags"``, details with ``tags_used``, ``view`` (the CArmView fields) and
        ``warnings``.

    Raises
    ------
    CalibrationError
        A required tag is missing or malformed (the message names its keyword and number).
    """
    used: list[str] = []
    warnings: list[str] = []

    def take(keyword: str, count: int = 1, required: bool = True) -> list[float] | None:
        numbers = _dicom_numbers(ds, keyword, count, name, required=required)
        if numbers is not None:
            used.append(f"{keyword} {_DICOM_TAGS[keyword]}")
        return numbers

    row_spacing, col_spacing = take("ImagerPixelSpacing", 2)
    (sdd,) = take("DistanceSourceToDetector")
    sid_values = take("DistanceSourceToPatient", required=False)
    if sid_values is not None:
        sid = sid_values[0]
    else:
        magnification = take("EstimatedRadiographicMagnificationFactor", required=False)
        if magnification is None:
            raise CalibrationError(
                f"{name}: neither DistanceSourceToPatient (0018,1111) nor "
                "EstimatedRadiographicMagnificationFactor (0018,1114) is present, so the "
                "source-to-patient distance is unknown; give this view a projection_matrix in case.json"
            )
        if magnification[0] <= 0:
            raise CalibrationError(
                f"{name}: EstimatedRadiographicMagnificationFactor (0018,1114) must be > 0, "
                f"not {magnification[0]}"
            )
        sid = sdd / magnification[0]
    (primary,) = take("PositionerPrimaryAngle")
    (secondary,) = take("PositionerSecondaryAngle")
    (rows,) = take("Rows")
    (cols,) = take("Columns")

    principal_point = None
    isocentre_projection = take("PositionOfIsocenterProjection", 2, required=False)
    if isocentre_projection is not None:
        along_v, along_u = isocentre_projection
        element_spacing = take("DetectorElementSpacing", 2, required=False)
        fov_origin = take("FieldOfViewOrigin", 2, required=False)
        if fov_origin is not None:
            along_v -= fov_origin[0]
            along_u -= fov_origin[1]
        bin_v = bin_u = 1.0
        if element_spacing is not None:
            bin_v, bin_u = row_spacing / element_spacing[0], col_spacing / element_spacing[1]
        # An image pixel made of b detector elements has its centre at element (b - 1) / 2.
        principal_point = ((along_u - (bin_u - 1.0) / 2.0) / bin_u, (along_v - (bin_v - 1.0) / 2.0) / bin_v)

    rotation = _dicom_value(ds, "FieldOfViewRotation")
    if rotation is not None and float(rotation) % 360.0 != 0.0:
        warnings.append(f"FieldOfViewRotation (0018,7032) = {rotation} deg is not applied")
    # FieldOfViewHorizontalFlip = YES: the image was mirrored left-right after readout, so it shows
    # the patient as seen from the source (a radiograph's usual display) rather than from the detector.
    flip = _dicom_value(ds, "FieldOfViewHorizontalFlip")
    flipped = flip is not None and str(flip).strip().upper() == "YES"
    if flipped:
        used.append(f"FieldOfViewHorizontalFlip {_DICOM_TAGS['FieldOfViewHorizontalFlip']}")
        if principal_point is not None:
            principal_point = (cols - 1.0 - principal_point[0], principal_point[1])
    for message in warnings:
        logger.warning("%s: %s; the image orientation may not match the geometry", name, message)

    try:
        view = CArmView(
            sdd_mm=sdd, sid_mm=sid, lao_deg=_wrap_deg(primary + 180.0), cranial_deg=secondary,
            rows=rows, cols=cols, pixel_mm=col_spacing, pixel_v_mm=row_spacing,
            principal_point_px=principal_point, viewed_from="source" if flipped else "detector",
        )
    except GeometryError as error:
        raise CalibrationError(f"{name}: the DICOM geometry tags are inconsistent: {error}") from None
    details = {
        "tags_used": used,
        "view": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(view).items()},
        "warnings": warnings,
    }
    return projection_matrix(view), Calibration(source="dicom-tags", details=details)


# ----------------------------------------------------------------------------- two views
@dataclass(frozen=True)
class ViewPairReport:
    """Result of :func:`view_pair_check`.

    Attributes
    ----------
    angle_deg : float
        Angle between the two viewing axes folded to [0, 90]: views 180 deg apart see along the
        same line and give no depth, so they count as 0.
    closest_approach_mm : float
        Shortest distance between the two central rays (as lines).
    midpoint_mm : tuple of 3 floats
        Midpoint of that shortest segment: where the two views look (normally the isocentre).
    warnings : tuple of str
        Human-readable problems (nearly parallel views, central rays far apart, midpoint behind
        a source).
    """

    angle_deg: float
    closest_approach_mm: float
    midpoint_mm: tuple[float, float, float]
    warnings: tuple[str, ...] = ()


def view_pair_check(P1: Any, P2: Any) -> ViewPairReport:
    """Check that two calibrated views can be combined (angle, central-ray intersection).

    The central rays are taken as lines (independent of the sign of ``P``), so the midpoint can
    serve as ``front_point_mm`` in :func:`normalise_projection`.

    Parameters
    ----------
    P1, P2 : array_like, shape (3, 4)

    Returns
    -------
    ViewPairReport
    """
    m1 = validate_projection_matrix(P1, "first view projection_matrix")
    m2 = validate_projection_matrix(P2, "second view projection_matrix")
    s1, s2 = source_position(m1), source_position(m2)
    n1 = m1[2, :3] / np.linalg.norm(m1[2, :3])
    n2 = m2[2, :3] / np.linalg.norm(m2[2, :3])
    cosine = min(1.0, abs(float(n1 @ n2)))
    angle_deg = math.degrees(math.acos(cosine))
    warnings = []

    # Closest points S1 + a n1 and S2 + b n2: solve the 2x2 normal equations.
    offset = s1 - s2
    b_dot = float(n1 @ n2)
    d1, d2 = float(n1 @ offset), float(n2 @ offset)
    denominator = 1.0 - b_dot * b_dot
    if denominator < 1e-12:
        # Parallel axes: every point pairs up; use the foot of S1 on axis 2.
        a, b = 0.0, d2
    else:
        a = (b_dot * d2 - d1) / denominator
        b = (d2 - b_dot * d1) / denominator
    point1, point2 = s1 + a * n1, s2 + b * n2
    gap = float(np.linalg.norm(point1 - point2))
    midpoint = 0.5 * (point1 + point2)

    if angle_deg < MIN_VIEW_PAIR_ANGLE_DEG:
        warnings.append(
            f"the two views are only {angle_deg:.1f} deg apart (viewing axes nearly parallel); "
            "depth will be poorly determined - use views about 90 deg apart"
        )
    if gap > MAX_CENTRAL_RAY_GAP_MM:
        warnings.append(
            f"the central rays of the two views pass {gap:.0f} mm apart; check that the "
            "calibrations share one world frame and that the hip is in both images"
        )
    homogeneous = np.append(midpoint, 1.0)
    for index, matrix in ((1, m1), (2, m2)):
        if float(matrix[2] @ homogeneous) <= 0.0:
            warnings.append(
                f"the views' crossing point lies behind the source of view {index}: its "
                "projection matrix has the opposite sign convention (w < 0 in front); "
                "normalise it with normalise_projection(P, front_point_mm=midpoint_mm)"
            )
    return ViewPairReport(
        angle_deg=angle_deg,
        closest_approach_mm=gap,
        midpoint_mm=tuple(float(x) for x in midpoint),
        warnings=tuple(warnings),
    )


def triangulate(
    P1: Any, uv1: Any, P2: Any, uv2: Any, *, refine: bool = True, return_residuals_px: bool = False
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """World point(s) seen at ``uv1`` in view 1 and ``uv2`` in view 2.

    A linear (DLT) estimate, then optionally Gauss-Newton on the reprojection error in pixels
    (the maximum-likelihood point for isotropic pixel noise).

    Parameters
    ----------
    P1, P2 : array_like, shape (3, 4)
    uv1, uv2 : array_like, shape (..., 2)
        Matching pixel positions.
    refine : bool
        Run the non-linear refinement (a few iterations).
    return_residuals_px : bool
        Also return the reprojection residuals.

    Returns
    -------
    X : ndarray, shape (..., 3)
        World points (mm).
    residuals : ndarray, shape (..., 2, 2), optional
        ``project(P_i, X) - uv_i`` for view i = 0, 1, in pixels.
    """
    matrices = [validate_projection_matrix(P1, "first view projection_matrix"),
                validate_projection_matrix(P2, "second view projection_matrix")]
    pixels = [_points(uv1, 2, "uv1"), _points(uv2, 2, "uv2")]
    try:
        batch_shape = np.broadcast_shapes(pixels[0].shape[:-1], pixels[1].shape[:-1])
    except ValueError:
        raise GeometryError(f"uv1 {pixels[0].shape} and uv2 {pixels[1].shape} do not match") from None
    pixels = [np.broadcast_to(p, batch_shape + (2,)).reshape(-1, 2) for p in pixels]
    # Scale each P so its rows are of order 1/mm; keeps the normal equations well conditioned.
    matrices = [m / np.linalg.norm(m[2, :3]) for m in matrices]

    # Linear step: u P[2] - P[0] and v P[2] - P[1] are zero at X; rows normalised so that each
    # equation measures a distance in mm (an algebraic error that does not favour one view).
    rows, rhs = [], []
    for matrix, uv in zip(matrices, pixels):
        for axis in (0, 1):
            row = uv[:, axis:axis + 1] * matrix[2] - matrix[axis]
            norm = np.linalg.norm(row[:, :3], axis=1, keepdims=True)
            row = row / norm
            rows.append(row[:, :3])
            rhs.append(-row[:, 3])
    design = np.stack(rows, axis=1)  # (N, 4, 3)
    target = np.stack(rhs, axis=1)  # (N, 4)
    normal = np.einsum("nij,nik->njk", design, design)
    try:
        points = np.linalg.solve(normal, np.einsum("nij,ni->nj", design, target)[..., None])[..., 0]
    except np.linalg.LinAlgError:
        raise GeometryError(
            "triangulate: the two rays are parallel; the views do not define a point"
        ) from None

    def residuals(x: np.ndarray) -> np.ndarray:
        return np.stack([project_points(m, x) - uv for m, uv in zip(matrices, pixels)], axis=1)

    if refine:
        for _ in range(10):
            jacobians, errors = [], []
            for matrix, uv in zip(matrices, pixels):
                homogeneous = points @ matrix[:, :3].T + matrix[:, 3]
                w = homogeneous[:, 2:3]
                projected = homogeneous[:, :2] / w
                # d(u)/dX = (P[0,:3] - u P[2,:3]) / w, same for v.
                jacobian = matrix[None, :2, :3] - projected[:, :, None] * matrix[None, 2:3, :3]
                jacobian = jacobian / w[:, :, None]
                jacobians.append(jacobian)
                errors.append(projected - uv)
            jac = np.concatenate(jacobians, axis=1)  # (N, 4, 3)
            err = np.concatenate(errors, axis=1)  # (N, 4)
            try:
                step = np.linalg.solve(np.einsum("nij,nik->njk", jac, jac),
                                       np.einsum("nij,ni->nj", jac, err)[..., None])[..., 0]
            except np.linalg.LinAlgError:
                break
            points = points - step
            if np.max(np.abs(step)) < 1e-10:
                break

    points_out = points.reshape(batch_shape + (3,))
    if return_residuals_px:
        return points_out, residuals(points).reshape(batch_shape + (2, 2))
    return points_out


# ----------------------------------------------------------------------------- volumes
_IDENTITY3 = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))


@dataclass(frozen=True)
class VolumeGeometry:
    """Grid of a 3D volume with SimpleITK semantics.

    ``world = origin + direction @ (spacing * [i, j, k])`` where ``(i, j, k)`` are the x, y, z
    indices of the array element ``vol[k, j, i]`` (numpy arrays are (z, y, x)); voxel centres
    sit at integer indices.

    Parameters
    ----------
    shape_zyx : (int, int, int)
        Array shape.
    spacing_xyz_mm : (float, float, float)
        Voxel size along i, j, k (mm, > 0).
    origin_mm : (float, float, float)
        World position of the centre of voxel (0, 0, 0).
    direction : 3x3, tuple of tuples (row-major)
        Orthonormal; its **columns** are the world directions of the i, j, k axes (as
        ``sitk.Image.GetDirection()`` read row by row).
    """

    shape_zyx: tuple[int, int, int]
    spacing_xyz_mm: tuple[float, float, float]
    origin_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: tuple[tuple[float, float, float], ...] = _IDENTITY3

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        try:
            shape = tuple(self.shape_zyx)
        except TypeError:
            raise GeometryError(f"VolumeGeometry shape_zyx must be 3 sizes, not {self.shape_zyx!r}") from None
        if len(shape) != 3:
            raise GeometryError(f"VolumeGeometry shape_zyx must be 3D (z, y, x), not {self.shape_zyx!r}")
        set_(self, "shape_zyx", tuple(positive_int(n, "VolumeGeometry shape_zyx", error=GeometryError) for n in shape))
        spacing = _float_tuple(self.spacing_xyz_mm, 3, "VolumeGeometry spacing_xyz_mm")
        if min(spacing) <= 0:
            raise GeometryError(f"VolumeGeometry spacing_xyz_mm must be > 0 mm, not {self.spacing_xyz_mm}")
        set_(self, "spacing_xyz_mm", spacing)
        set_(self, "origin_mm", _float_tuple(self.origin_mm, 3, "VolumeGeometry origin_mm"))
        matrix = np.array(_float_tuple(self.direction, 9, "VolumeGeometry direction")).reshape(3, 3)
        if not np.allclose(matrix.T @ matrix, np.eye(3), atol=1e-6):
            raise GeometryError(
                f"VolumeGeometry direction must be orthonormal, not {matrix.round(6).tolist()}"
            )
        set_(self, "direction", tuple(tuple(float(x) for x in row) for row in matrix))

    # -- constructors
    @classmethod
    def centered(
        cls, shape_zyx: Any, spacing_xyz_mm: Any, center_mm: Any, direction: Any = _IDENTITY3
    ) -> VolumeGeometry:
        """Grid of the given shape and spacing whose centre sits at ``center_mm``."""
        probe = cls(shape_zyx, spacing_xyz_mm, (0.0, 0.0, 0.0), direction)
        center = np.array(_float_tuple(center_mm, 3, "VolumeGeometry center_mm"))
        return dataclasses.replace(probe, origin_mm=tuple(center - probe.center_mm()))

    @classmethod
    def from_sitk(cls, image: Any) -> VolumeGeometry:
        """Geometry of a 3D ``SimpleITK.Image``."""
        if image.GetDimension() != 3:
            raise GeometryError(f"VolumeGeometry needs a 3D image, not {image.GetDimension()}D")
        direction = np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3)
        return cls(tuple(image.GetSize())[::-1], image.GetSpacing(), image.GetOrigin(),
                   tuple(map(tuple, direction)))

    def to_sitk(self, array_zyx: Any) -> Any:
        """``SimpleITK.Image`` of ``array_zyx`` (shape ``shape_zyx``, or ``shape_zyx + (C,)``
        for a vector image) carrying this geometry."""
        import SimpleITK as sitk

        array = np.asarray(array_zyx)
        if tuple(array.shape[:3]) != self.shape_zyx or array.ndim not in (3, 4):
            raise GeometryError(
                f"array of shape {array.shape} does not match the grid shape_zyx {self.shape_zyx}"
            )
        image = sitk.GetImageFromArray(array, isVector=array.ndim == 4)
        image.SetSpacing(self.spacing_xyz_mm)
        image.SetOrigin(self.origin_mm)
        image.SetDirection(tuple(np.asarray(self.direction).reshape(-1)))
        return image

    # -- matrices and derived quantities
    def index_to_world(self) -> np.ndarray:
        """(4, 4) affine taking ``[i, j, k, 1]`` (x, y, z indices) to world mm."""
        matrix = np.eye(4)
        matrix[:3, :3] = np.asarray(self.direction) * np.asarray(self.spacing_xyz_mm)[None, :]
        matrix[:3, 3] = self.origin_mm
        return matrix

    def world_to_index(self) -> np.ndarray:
        """(4, 4) inverse of :meth:`index_to_world` (world mm -> continuous ``[i, j, k, 1]``)."""
        # direction is orthonormal, so the inverse is diag(1/spacing) D^T without a general inverse.
        linear = np.asarray(self.direction).T / np.asarray(self.spacing_xyz_mm)[:, None]
        matrix = np.eye(4)
        matrix[:3, :3] = linear
        matrix[:3, 3] = -linear @ np.asarray(self.origin_mm)
        return matrix

    @property
    def extent_mm(self) -> tuple[float, float, float]:
        """Edge-to-edge size along i, j, k (``spacing * shape``), mm."""
        return tuple(s * n for s, n in zip(self.spacing_xyz_mm, self.shape_zyx[::-1]))

    def center_mm(self) -> np.ndarray:
        """World position of the grid centre (index ``(n - 1) / 2``), shape (3,)."""
        centre_index = (np.asarray(self.shape_zyx[::-1], dtype=np.float64) - 1.0) / 2.0
        return self.index_to_world()[:3] @ np.append(centre_index, 1.0)

    def corners_mm(self, edges: bool = True) -> np.ndarray:
        """The 8 corners of the grid in world mm, shape (8, 3).

        Parameters
        ----------
        edges : bool
            True (default): the outer faces of the corner voxels (indices -0.5 and n - 0.5),
            i.e. the full bounding box that ``extent_mm`` measures. False: the centres of the
            corner voxels (indices 0 and n - 1).
        """
        size = np.asarray(self.shape_zyx[::-1], dtype=np.float64)
        low, high = (-0.5 * np.ones(3), size - 0.5) if edges else (np.zeros(3), size - 1.0)
        corners = np.array([[(high if (c >> a) & 1 else low)[a] for a in range(3)] for c in range(8)])
        return corners @ self.index_to_world()[:3, :3].T + self.index_to_world()[:3, 3]

    def transformed(self, T_4x4: Any) -> VolumeGeometry:
        """The grid moved by a rigid world transform (``X' = T @ X`` for every voxel centre)."""
        transform = _affine4(T_4x4, "VolumeGeometry.transformed T_4x4")
        rotation = transform[:3, :3]
        if not np.allclose(rotation.T @ rotation, np.eye(3), atol=1e-6):
            raise GeometryError(
                "VolumeGeometry.transformed needs a rigid transform (orthonormal 3x3 block); "
                f"got {rotation.round(6).tolist()}"
            )
        return VolumeGeometry(
            self.shape_zyx,
            self.spacing_xyz_mm,
            tuple(rotation @ np.asarray(self.origin_mm) + transform[:3, 3]),
            tuple(map(tuple, rotation @ np.asarray(self.direction))),
        )
