"""NIfTI-1 and MetaImage files with numpy alone, read and written as SimpleITK does.

The TensorFlow-free runtime installer leaves SimpleITK out (259 MiB, one library, for what the
registration only uses to read and write files; issue 20). :mod:`inference.io` reads and writes
NIfTI/MetaImage files with SimpleITK when it is importable and with this module otherwise, so
both must give the same answer:

* the array is in SimpleITK's ``GetArrayFromImage`` order: ``(z, y, x)`` or ``(y, x)``, the
  components of a multi-component pixel last;
* ``spacing``, ``origin`` and ``direction`` are ITK's, in ITK's axis order ``(x, y[, z])``, world
  in LPS millimetres; ``direction`` row-major, its columns the world directions of the index axes
  (``sitk.Image.GetDirection()``).

NIfTI stores RAS world coordinates, so the first two world axes change sign on the way in and
out. Which of the header's two transforms (qform, sform) gives the geometry follows
``itk::NiftiImageIO`` of ITK 5.4 (``SetImageIOOrientationFromNIfTI``): the sform when its code is
SCANNER_ANAT, or when the qform code is unknown, or when both describe the same grid; the qform
otherwise; the matrices are computed in float32 as niftilib does. ``scl_slope``/``scl_inter``
are applied as ITK applies them (integer data becomes float32). Files written here carry the
geometry in both transforms with code SCANNER_ANAT, as ITK writes them, so every reader (ITK,
nibabel, FSL) takes the same one; NIfTI holds it in float32, MetaImage in decimal text (exact).

What this module does not read (it raises :class:`ImageFileError`, an
:class:`~inference.errors.InputFileError`): NIfTI-2, Analyze 7.5 and two-file NIfTI
(``.hdr``/``.img``), vector/tensor NIfTI intents, complex data, images of more than three
dimensions, ASCII or multi-file MetaImage data, and shears that ITK refuses too.
"""

from __future__ import annotations

import dataclasses
import gzip
import math
import os
import pathlib
import zlib
from typing import Any

import numpy as np

from inference.errors import InputFileError, OutputError

__all__ = ["ImageData", "ImageFileError", "SUFFIXES", "image_format", "read_image", "write_image"]

#: File name endings this module reads and writes, longest first.
SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii", ".mha", ".mhd")


class ImageFileError(InputFileError):
    """An image file this module cannot read.

    Attributes
    ----------
    path : pathlib.Path
    reason : str
        What is wrong, without the file name (:mod:`inference.io` words its own message around it).
    corrupt : bool
        True when the file looks damaged (truncated, bad header), False when it is a valid file of
        a kind this module does not read.
    """

    def __init__(self, path: str | os.PathLike, reason: str, corrupt: bool = True) -> None:
        self.path = pathlib.Path(path)
        self.reason = reason
        self.corrupt = corrupt
        super().__init__(f"{self.path}: {reason}")


@dataclasses.dataclass(frozen=True, eq=False)
class ImageData:
    """An image as SimpleITK would hand it over.

    Attributes
    ----------
    array : np.ndarray
        ``(z, y, x)`` or ``(y, x)``, plus a trailing component axis for multi-component pixels.
    spacing : tuple of float
        Pixel size along x, y[, z] (mm).
    origin : tuple of float
        World (LPS mm) position of the centre of the first pixel.
    direction : tuple of float
        ``dimension * dimension`` values, row-major; column ``j`` is the world direction of index
        axis ``j`` (``sitk.Image.GetDirection()``).
    """

    array: np.ndarray
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]

    def __post_init__(self) -> None:
        dimension = len(self.spacing)
        if dimension not in (2, 3):
            raise ValueError(f"ImageData must be 2D or 3D, not {dimension}D (spacing {self.spacing})")
        if len(self.origin) != dimension or len(self.direction) != dimension * dimension:
            raise ValueError(f"ImageData of dimension {dimension} needs {dimension} origin and "
                             f"{dimension * dimension} direction values, not {len(self.origin)} and "
                             f"{len(self.direction)}")
        if np.ndim(self.array) not in (dimension, dimension + 1):
            raise ValueError(f"ImageData of dimension {dimension} cannot hold an array of shape "
                             f"{np.shape(self.array)}")
        object.__setattr__(self, "spacing", tuple(float(v) for v in self.spacing))
        object.__setattr__(self, "origin", tuple(float(v) for v in self.origin))
        object.__setattr__(self, "direction", tuple(float(v) for v in self.direction))

    @property
    def dimension(self) -> int:
        """2 or 3."""
        return len(self.spacing)

    @property
    def components(self) -> int:
        """Values per pixel (1 for a scalar image)."""
        return 1 if self.array.ndim == self.dimension else int(self.array.shape[-1])

    @property
    def size(self) -> tuple[int, ...]:
        """Pixels along x, y[, z] (``sitk.Image.GetSize()``)."""
        return tuple(int(n) for n in self.array.shape[:self.dimension][::-1])

    def direction_matrix(self) -> np.ndarray:
        """``direction`` as a (dimension, dimension) float64 array."""
        return np.asarray(self.direction, dtype=np.float64).reshape(self.dimension, self.dimension)


def image_format(path: str | os.PathLike) -> str | None:
    """``"nifti"`` or ``"metaimage"`` from the file name, else None."""
    name = pathlib.Path(path).name.lower()
    if name.endswith((".nii", ".nii.gz")):
        return "nifti"
    if name.endswith((".mha", ".mhd")):
        return "metaimage"
    return None


def read_image(path: str | os.PathLike) -> ImageData:
    """Read a NIfTI-1 (``.nii``, ``.nii.gz``) or MetaImage (``.mha``, ``.mhd``) file.

    A file with another name is read when its content shows which of the two it is.

    Raises
    ------
    ImageFileError
        A missing, damaged or unsupported file (the message says which).
    """
    file = pathlib.Path(path)
    try:
        raw = file.read_bytes()
    except OSError as exc:
        raise ImageFileError(file, f"cannot read the file ({exc.strerror or exc})", corrupt=False) from exc
    kind = image_format(file)
    if kind is None:
        if raw[:2] == b"\x1f\x8b" or raw[344:348] in (b"n+1\x00", b"ni1\x00"):
            kind = "nifti"
        elif raw.lstrip()[:64].split(b"=")[0].strip() in _META_FIRST_KEYS:
            kind = "metaimage"
        else:
            raise ImageFileError(file, "neither a NIfTI-1 nor a MetaImage file", corrupt=False)
    if kind == "nifti":
        return _read_nifti(file, raw)
    return _read_metaimage(file, raw)


def write_image(path: str | os.PathLike, image: ImageData, compress: bool = True) -> None:
    """Write ``image`` as NIfTI-1 or MetaImage, chosen by the name of ``path``.

    ``.nii.gz`` is always gzip-compressed and ``.nii`` never; ``compress`` chooses zlib
    compression of MetaImage data (``.mhd`` puts the data in ``<name>.raw``/``.zraw`` beside it).
    Scalar and (MetaImage only) multi-component images of dtype int8/uint8/int16/uint16/int32/
    uint32/int64/uint64/float32/float64.

    Raises
    ------
    OutputError
        Unsupported file name, dtype or pixel type, or the file cannot be written.
    """
    file = pathlib.Path(path)
    kind = image_format(file)
    if kind is None:
        raise OutputError(f"{file}: unsupported image file type; use .nii.gz, .nii, .mha or .mhd")
    array = np.asarray(image.array)
    if array.dtype.newbyteorder("=") not in _DTYPES_WRITTEN:
        raise OutputError(f"{file}: cannot write pixels of type {array.dtype}; use one of "
                          f"{', '.join(str(d) for d in _DTYPES_WRITTEN)}")
    try:
        if kind == "nifti":
            _write_nifti(file, image, array)
        else:
            _write_metaimage(file, image, array, compress)
    except OSError as exc:
        raise OutputError(f"{file}: cannot write the image ({exc.strerror or exc})") from exc


_DTYPES_WRITTEN = tuple(np.dtype(t) for t in (np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32,
                                              np.int64, np.uint64, np.float32, np.float64))


# ----------------------------------------------------------------------------- NIfTI-1
_NIFTI1_HEADER = np.dtype([
    ("sizeof_hdr", "i4"), ("data_type", "S10"), ("db_name", "S18"), ("extents", "i4"),
    ("session_error", "i2"), ("regular", "S1"), ("dim_info", "u1"), ("dim", "i2", (8,)),
    ("intent_p1", "f4"), ("intent_p2", "f4"), ("intent_p3", "f4"), ("intent_code", "i2"),
    ("datatype", "i2"), ("bitpix", "i2"), ("slice_start", "i2"), ("pixdim", "f4", (8,)),
    ("vox_offset", "f4"), ("scl_slope", "f4"), ("scl_inter", "f4"), ("slice_end", "i2"),
    ("slice_code", "u1"), ("xyzt_units", "u1"), ("cal_max", "f4"), ("cal_min", "f4"),
    ("slice_duration", "f4"), ("toffset", "f4"), ("glmax", "i4"), ("glmin", "i4"),
    ("descrip", "S80"), ("aux_file", "S24"), ("qform_code", "i2"), ("sform_code", "i2"),
    ("quatern_b", "f4"), ("quatern_c", "f4"), ("quatern_d", "f4"),
    ("qoffset_x", "f4"), ("qoffset_y", "f4"), ("qoffset_z", "f4"),
    ("srow_x", "f4", (4,)), ("srow_y", "f4", (4,)), ("srow_z", "f4", (4,)),
    ("intent_name", "S16"), ("magic", "S4"),
])
assert _NIFTI1_HEADER.itemsize == 348  # the NIfTI-1 layout; a typo above would shift every field

#: NIfTI datatype code -> (numpy dtype, components per voxel).
_NIFTI_TYPES: dict[int, tuple[str, int]] = {
    2: ("u1", 1), 4: ("i2", 1), 8: ("i4", 1), 16: ("f4", 1), 64: ("f8", 1), 256: ("i1", 1),
    512: ("u2", 1), 768: ("u4", 1), 1024: ("i8", 1), 1280: ("u8", 1),
    128: ("u1", 3),    # RGB24
    2304: ("u1", 4),   # RGBA32
}
_NIFTI_TYPE_NAMES = {1: "binary", 32: "complex64", 1536: "float128", 1792: "complex128", 2048: "complex256"}
_NIFTI_CODES = {np.dtype(t): code for code, (t, n) in _NIFTI_TYPES.items() if n == 1}
#: Intents whose extra dimension holds a vector or matrix per voxel (ITK reads them as vector
#: images, with a sign change of RAS vectors in recent versions): not read here.
_NIFTI_VECTOR_INTENTS = {1004: "general matrix", 1005: "symmetric matrix", 1006: "displacement vector",
                         1007: "vector"}
_XFORM_UNKNOWN, _XFORM_SCANNER_ANAT = 0, 1
_FLOAT_EPS = float(np.finfo(np.float32).eps)


def _fixed_float(value: Any) -> float:
    # niftilib's FIXED_FLOAT: a non-finite header float reads as 0.
    value = float(value)
    return value if math.isfinite(value) else 0.0


def _read_nifti(file: pathlib.Path, raw: bytes) -> ImageData:
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise ImageFileError(file, f"the gzip stream is damaged ({exc})") from exc
    if len(raw) < 348:
        raise ImageFileError(file, f"the file ends after {len(raw)} bytes, inside the 348-byte NIfTI header")
    size_le, size_be = int.from_bytes(raw[:4], "little"), int.from_bytes(raw[:4], "big")
    if 540 in (size_le, size_be):
        raise ImageFileError(file, "NIfTI-2 files are not supported; save it as NIfTI-1", corrupt=False)
    if size_le == 348:
        header = np.frombuffer(raw, _NIFTI1_HEADER.newbyteorder("<"), count=1)[0]
        order = "<"
    elif size_be == 348:
        header = np.frombuffer(raw, _NIFTI1_HEADER.newbyteorder(">"), count=1)[0]
        order = ">"
    else:
        raise ImageFileError(file, "not a NIfTI-1 file (the header does not start with its size, 348)")
    magic = raw[344:348]
    if magic == b"ni1\x00":
        raise ImageFileError(file, "a two-file NIfTI header (.hdr/.img) is not supported; save it as one .nii",
                             corrupt=False)
    if magic != b"n+1\x00":
        raise ImageFileError(file, "an Analyze 7.5 file (no NIfTI magic) is not supported; save it as NIfTI-1",
                             corrupt=False)

    dim = [int(v) for v in header["dim"]]
    if not 1 <= dim[0] <= 7:
        raise ImageFileError(file, f"bad number of dimensions dim[0] = {dim[0]}")
    if dim[1] <= 0:
        raise ImageFileError(file, f"bad image size dim[1] = {dim[1]}")
    for i in range(2, dim[0] + 1):  # niftilib: a size <= 0 inside the used dimensions means 1
        if dim[i] <= 0:
            dim[i] = 1
    intent = int(header["intent_code"])
    if intent in _NIFTI_VECTOR_INTENTS:
        # The values of a voxel run along dim[5]; ITK's image dimension is then the last of
        # dim[2..4] above 1. One value per voxel reads like a scalar image.
        if dim[0] >= 5 and dim[5] > 1:
            raise ImageFileError(file, f"NIfTI {_NIFTI_VECTOR_INTENTS[intent]} images (intent code {intent}, "
                                 f"{dim[5]} values per voxel) are not supported; save one value per voxel",
                                 corrupt=False)
        dimension = next((d for d in (4, 3, 2) if dim[d] > 1), 1)
    else:
        # ITK: trailing dimensions of size 1 beyond the third are dropped (scanners write 3D as
        # 4D with T = 1).
        dimension = dim[0]
        while dimension > 3 and dim[dimension] == 1:
            dimension -= 1
    if dimension not in (2, 3):
        raise ImageFileError(file, f"a {dimension}D NIfTI image (size {dim[1:dim[0] + 1]}) is not supported; "
                             "expected a 2D or 3D image", corrupt=False)
    datatype = int(header["datatype"])
    if datatype not in _NIFTI_TYPES:
        name = _NIFTI_TYPE_NAMES.get(datatype, f"code {datatype}")
        raise ImageFileError(file, f"NIfTI data type {name} is not supported", corrupt=datatype not in _NIFTI_TYPE_NAMES)
    type_code, components = _NIFTI_TYPES[datatype]

    pixdim = [float(v) for v in header["pixdim"]]
    for i in range(1, dim[0] + 1):  # niftilib: a zero or non-finite grid spacing means 1
        if pixdim[i] == 0.0 or not math.isfinite(pixdim[i]):
            pixdim[i] = 1.0
    units = int(header["xyzt_units"]) & 0x07
    scale = {1: 1e3, 2: 1.0, 3: 1e-3}.get(units, 1.0)  # metre, mm, micron -> mm
    spacing = tuple(pixdim[i + 1] * scale for i in range(dimension))
    if min(spacing) <= 0:
        raise ImageFileError(file, f"negative pixel spacing {spacing} in the header")

    origin, direction = _nifti_orientation(file, header, pixdim, dimension, scale)

    offset = max(int(float(header["vox_offset"])), 348)
    shape = tuple(dim[1:dim[0] + 1])
    count = int(np.prod(shape, dtype=np.int64)) * components
    dtype = np.dtype(type_code).newbyteorder(order)
    needed = count * dtype.itemsize
    if len(raw) < offset + needed:
        raise ImageFileError(file, f"the voxel data ends after {max(len(raw) - offset, 0)} of {needed} bytes")
    data = np.frombuffer(raw, dtype=dtype, count=count, offset=offset)
    array = data.astype(dtype.newbyteorder("="), copy=True)
    # NIfTI stores x fastest: C order of the reversed sizes is SimpleITK's (z, y, x).
    array = array.reshape(tuple(reversed(shape[:dimension])) + ((components,) if components > 1 else ()))
    array = _apply_scaling(array, header)
    return ImageData(array, spacing, origin, direction)


def _apply_scaling(array: np.ndarray, header: Any) -> np.ndarray:
    # itk::NiftiImageIO: a slope of (almost) zero means 1; only a slope other than 1 or an
    # intercept other than 0 rescales, integers are first cast to float32 (ITK's CastCopy), and
    # each value is computed in double and stored in the pixel type.
    slope, inter = _fixed_float(header["scl_slope"]), _fixed_float(header["scl_inter"])
    eps = float(np.finfo(np.float64).eps)
    if abs(slope) < eps:
        slope = 1.0
    if not (abs(slope - 1.0) > eps or abs(inter) > eps):
        return array
    target = np.float64 if array.dtype == np.float64 else np.float32
    values = array.astype(target).astype(np.float64) * slope + inter
    return values.astype(target)


def _quatern_to_mat44(b: float, c: float, d: float, qx: float, qy: float, qz: float,
                      dx: float, dy: float, dz: float, qfac: float) -> np.ndarray:
    """niftilib's ``nifti_quatern_to_mat44``: computed in double, stored in float32."""
    a = 1.0 - (b * b + c * c + d * d)
    if a < 1e-7:  # a 180 degree rotation: (b, c, d) is normalised
        norm = 1.0 / math.sqrt(b * b + c * c + d * d)
        b, c, d, a = b * norm, c * norm, d * norm, 0.0
    else:
        a = math.sqrt(a)
    xd, yd, zd = (dx if dx > 0 else 1.0), (dy if dy > 0 else 1.0), (dz if dz > 0 else 1.0)
    if qfac < 0:
        zd = -zd
    matrix = np.array([
        [(a * a + b * b - c * c - d * d) * xd, 2.0 * (b * c - a * d) * yd, 2.0 * (b * d + a * c) * zd, qx],
        [2.0 * (b * c + a * d) * xd, (a * a + c * c - b * b - d * d) * yd, 2.0 * (c * d - a * b) * zd, qy],
        [2.0 * (b * d - a * c) * xd, 2.0 * (c * d + a * b) * yd, (a * a + d * d - c * c - b * b) * zd, qz],
        [0.0, 0.0, 0.0, 1.0]])
    return matrix.astype(np.float32)


def _is_affine(matrix: np.ndarray) -> bool:
    # ITK's IsAffine: bottom row (0, 0, 0, 1) and an invertible 3x3 block.
    m = matrix.astype(np.float64)
    if abs(m[3, 3] - 1.0) + np.abs(m[3, :3]).sum() > _FLOAT_EPS:
        return False
    return bool(np.all(np.isfinite(m))) and np.linalg.cond(m[:3, :3]) < 1.0 / np.finfo(np.float64).eps


def _columns_orthonormal(block: np.ndarray) -> bool:
    # ITK: the 3x3 block with each column normalised (in float32) times its transpose is the
    # identity within 1e-4, i.e. the sform is a rotation times per-axis scales, no shear.
    norms = np.linalg.norm(block.astype(np.float32), axis=0)
    if np.any(norms == 0):
        return False
    rotation = (block / norms).astype(np.float32)
    return bool(np.all(np.abs(rotation @ rotation.T - np.eye(3, dtype=np.float32)) <= 1e-4))


def _same_grid(sform: np.ndarray, qform: np.ndarray) -> bool:
    # ITK compares the two transforms by their SVD factors U (rotation), W (scales), offsets and
    # bottom rows, each within 1e-4. For a scaled rotation, the usual sform, the signs of U's
    # columns are decided by rounding noise, so ITK calls two identical grids different at random
    # and then takes the qform (measured with SimpleITK 2.5.7: 10 of 20 random rotations with
    # distinct spacings, 16 of 20 with isotropic voxels). Here the rotations are compared through
    # the polar factor U V^T, which has no sign ambiguity. So only a file with both codes set, an
    # sform code other than SCANNER_ANAT and transforms equal within 1e-4 but not within ITK's
    # first, strict test (1e-5) can read differently, and then by less than 1e-4.
    def polar(block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        u, w, vt = np.linalg.svd(block.astype(np.float64))
        return u @ vt, w

    rotation_s, scales_s = polar(sform[:3, :3])
    rotation_q, scales_q = polar(qform[:3, :3])
    return bool(np.all(np.abs(rotation_s @ rotation_q.T - np.eye(3)) <= 1e-4)
                and np.all(np.abs(scales_s - scales_q) <= 1e-4)
                and np.all(np.abs(sform[:3, 3].astype(np.float64) - qform[:3, 3]) <= 1e-4)
                and np.all(np.abs(sform[3].astype(np.float64) - qform[3]) <= 1e-4))


def _nifti_orientation(file: pathlib.Path, header: Any, pixdim: list[float], dimension: int,
                       scale: float) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Origin and direction as ``itk::NiftiImageIO::SetImageIOOrientationFromNIfTI`` finds them."""
    qform_code = int(header["qform_code"]) if int(header["qform_code"]) > 0 else _XFORM_UNKNOWN
    sform_code = int(header["sform_code"]) if int(header["sform_code"]) > 0 else _XFORM_UNKNOWN
    if qform_code == _XFORM_UNKNOWN and sform_code == _XFORM_UNKNOWN:
        # neither transform: ITK puts the first voxel at the origin with identity directions
        return (0.0,) * dimension, tuple(np.eye(dimension).reshape(-1))

    if qform_code != _XFORM_UNKNOWN:
        qfac = -1.0 if pixdim[0] < 0 else 1.0
        qform = _quatern_to_mat44(
            _fixed_float(header["quatern_b"]), _fixed_float(header["quatern_c"]), _fixed_float(header["quatern_d"]),
            _fixed_float(header["qoffset_x"]), _fixed_float(header["qoffset_y"]), _fixed_float(header["qoffset_z"]),
            pixdim[1], pixdim[2], pixdim[3], qfac)
    else:
        qform = np.diag([pixdim[1], pixdim[2], pixdim[3], 1.0]).astype(np.float32)
    if sform_code != _XFORM_UNKNOWN:
        sform = np.vstack([header["srow_x"], header["srow_y"], header["srow_z"],
                           np.array([0, 0, 0, 1], dtype=np.float32)]).astype(np.float32)
    else:
        sform = np.zeros((4, 4), dtype=np.float32)

    difference = np.abs(sform.astype(np.float64) - qform.astype(np.float64))
    prefer_sform = bool(np.all(difference[:3, :3] <= 1e-5) and difference[:, 3].sum() <= 1e-7
                        and difference[3].sum() <= 1e-7)
    if not prefer_sform or sform_code != _XFORM_UNKNOWN:
        if _is_affine(sform) and _columns_orthonormal(sform[:3, :3]):
            if qform_code == _XFORM_UNKNOWN and sform_code != _XFORM_UNKNOWN:
                prefer_sform = True
            elif sform_code == _XFORM_SCANNER_ANAT:
                prefer_sform = True
            elif qform_code != _XFORM_UNKNOWN and sform_code != _XFORM_UNKNOWN:
                prefer_sform = _same_grid(sform, qform)
    if prefer_sform:
        matrix = sform
    elif qform_code != _XFORM_UNKNOWN:
        matrix = qform
    else:
        raise ImageFileError(file, "the sform is not a rotation with scaling (it shears) and there is no "
                             "qform: the image has no orthonormal direction cosines", corrupt=False)

    m = matrix.astype(np.float64)
    origin = (-m[0, 3] * scale, -m[1, 3] * scale, m[2, 3] * scale)[:dimension]
    direction = np.zeros((dimension, dimension))
    flip = np.array([-1.0, -1.0, 1.0])[:dimension]  # RAS -> LPS
    for axis in range(dimension):
        column = m[:dimension, axis] * flip
        norm = math.sqrt(float(column @ column))
        direction[:, axis] = column / norm if norm > 0 else column
    return tuple(float(v) for v in origin), tuple(float(v) for v in direction.reshape(-1))


def _orthonormalised(matrix: np.ndarray) -> np.ndarray:
    # nifti_make_orthog_mat44 takes the closest orthogonal matrix (polar decomposition); U V^T
    # of the SVD is that matrix.
    u, _, vt = np.linalg.svd(matrix)
    return u @ vt


def _mat44_to_quatern(matrix: np.ndarray) -> tuple[float, float, float, float]:
    """niftilib's ``nifti_mat44_to_quatern`` for an orthonormal 3x3 block: (b, c, d, qfac)."""
    r = _orthonormalised(matrix[:3, :3].astype(np.float64))
    qfac = 1.0
    if np.linalg.det(r) <= 0:  # improper: the third column is flipped, qfac says so
        qfac = -1.0
        r[:, 2] = -r[:, 2]
    a = r[0, 0] + r[1, 1] + r[2, 2] + 1.0
    if a > 0.5:
        a = 0.5 * math.sqrt(a)
        b = 0.25 * (r[2, 1] - r[1, 2]) / a
        c = 0.25 * (r[0, 2] - r[2, 0]) / a
        d = 0.25 * (r[1, 0] - r[0, 1]) / a
    else:
        xd = 1.0 + r[0, 0] - (r[1, 1] + r[2, 2])
        yd = 1.0 + r[1, 1] - (r[0, 0] + r[2, 2])
        zd = 1.0 + r[2, 2] - (r[0, 0] + r[1, 1])
        if xd > 1.0:
            b = 0.5 * math.sqrt(xd)
            c, d, a = 0.25 * (r[0, 1] + r[1, 0]) / b, 0.25 * (r[0, 2] + r[2, 0]) / b, 0.25 * (r[2, 1] - r[1, 2]) / b
        elif yd > 1.0:
            c = 0.5 * math.sqrt(yd)
            b, d, a = 0.25 * (r[0, 1] + r[1, 0]) / c, 0.25 * (r[1, 2] + r[2, 1]) / c, 0.25 * (r[0, 2] - r[2, 0]) / c
        else:
            d = 0.5 * math.sqrt(zd)
            b, c, a = 0.25 * (r[0, 2] + r[2, 0]) / d, 0.25 * (r[1, 2] + r[2, 1]) / d, 0.25 * (r[1, 0] - r[0, 1]) / d
        if a < 0:
            b, c, d = -b, -c, -d
    return float(b), float(c), float(d), qfac


def _write_nifti(file: pathlib.Path, image: ImageData, array: np.ndarray) -> None:
    if image.components != 1:
        raise OutputError(f"{file}: this writer stores one value per voxel in NIfTI, not {image.components}; "
                          "use .mha for multi-component images")
    dimension = image.dimension
    header = np.zeros((), dtype=_NIFTI1_HEADER.newbyteorder("<"))
    header["sizeof_hdr"] = 348
    header["regular"] = b"r"
    size = image.size
    header["dim"] = [dimension, *size, *([1] * (7 - dimension))]
    dtype = array.dtype.newbyteorder("=")
    header["datatype"] = _NIFTI_CODES[dtype]
    header["bitpix"] = 8 * dtype.itemsize
    header["vox_offset"] = 352.0
    header["scl_slope"] = 1.0
    header["xyzt_units"] = 2 | 8  # mm, s (as ITK writes)
    header["magic"] = b"n+1"

    # As itk::NiftiImageIO::SetNIfTIOrientationFromImageIO: the direction columns in RAS (x and y
    # negated), a 2D image's third axis along +z, the closest orthogonal matrix, then the spacing
    # on the columns for the sform and a quaternion for the qform; the origin in RAS.
    rotation = np.eye(3)
    rotation[:dimension, :dimension] = image.direction_matrix()
    rotation[:2, :] *= -1.0
    if dimension == 2:
        rotation[:, 2] = (0.0, 0.0, 1.0)
        rotation[2, :2] = 0.0
    rotation = _orthonormalised(rotation.astype(np.float32).astype(np.float64))
    spacing = np.ones(3)
    spacing[:dimension] = image.spacing
    origin = np.zeros(3)
    origin[:dimension] = image.origin
    offset = origin * np.array([-1.0, -1.0, 1.0])
    sform = rotation * spacing[None, :]
    quatern_b, quatern_c, quatern_d, qfac = _mat44_to_quatern(rotation)
    header["pixdim"] = [qfac, *spacing, 0.0, 0.0, 0.0, 0.0]
    header["qform_code"] = header["sform_code"] = _XFORM_SCANNER_ANAT
    header["quatern_b"], header["quatern_c"], header["quatern_d"] = quatern_b, quatern_c, quatern_d
    header["qoffset_x"], header["qoffset_y"], header["qoffset_z"] = offset
    header["srow_x"] = [*sform[0], offset[0]]
    header["srow_y"] = [*sform[1], offset[1]]
    header["srow_z"] = [*sform[2], offset[2]]

    data = header.tobytes() + b"\x00" * 4 + np.ascontiguousarray(array, dtype=dtype.newbyteorder("<")).tobytes()
    if file.name.lower().endswith(".gz"):
        # mtime=0: the same image gives the same bytes (checksums in report.json stay meaningful)
        data = gzip.compress(data, compresslevel=6, mtime=0)
    file.write_bytes(data)


# ----------------------------------------------------------------------------- MetaImage
_META_FIRST_KEYS = {b"ObjectType", b"NDims", b"Comment"}
_META_TYPES: dict[str, str] = {
    "MET_CHAR": "i1", "MET_UCHAR": "u1", "MET_SHORT": "i2", "MET_USHORT": "u2", "MET_INT": "i4",
    "MET_UINT": "u4", "MET_LONG": "i4", "MET_ULONG": "u4", "MET_LONG_LONG": "i8", "MET_ULONG_LONG": "u8",
    "MET_FLOAT": "f4", "MET_DOUBLE": "f8",
}
_META_NAMES = {np.dtype("i1"): "MET_CHAR", np.dtype("u1"): "MET_UCHAR", np.dtype("i2"): "MET_SHORT",
               np.dtype("u2"): "MET_USHORT", np.dtype("i4"): "MET_INT", np.dtype("u4"): "MET_UINT",
               np.dtype("i8"): "MET_LONG_LONG", np.dtype("u8"): "MET_ULONG_LONG", np.dtype("f4"): "MET_FLOAT",
               np.dtype("f8"): "MET_DOUBLE"}
_META_HEADER_LIMIT = 1 << 16


def _meta_header(file: pathlib.Path, raw: bytes) -> tuple[dict[str, str], int]:
    """The ``key = value`` fields up to ``ElementDataFile`` (the last one) and the offset after it."""
    fields: dict[str, str] = {}
    position = 0
    while position < min(len(raw), _META_HEADER_LIMIT):
        end = raw.find(b"\n", position)
        line_end = len(raw) if end < 0 else end
        line = raw[position:line_end].decode("latin-1").strip()
        position = line_end + 1
        if not line:
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise ImageFileError(file, f"MetaImage header line {line[:60]!r} is not 'key = value'")
        fields[key.strip()] = value.strip()
        if key.strip() == "ElementDataFile":
            return fields, min(position, len(raw))
    raise ImageFileError(file, "not a MetaImage file (no ElementDataFile line in its header)")


def _meta_numbers(file: pathlib.Path, fields: dict[str, str], key: str, count: int) -> list[float]:
    try:
        values = [float(v) for v in fields[key].split()]
    except ValueError:
        raise ImageFileError(file, f"MetaImage {key} = {fields[key]!r} is not a list of numbers") from None
    if len(values) < count:
        raise ImageFileError(file, f"MetaImage {key} has {len(values)} values, expected {count}")
    return values[:count]


def _meta_true(value: str) -> bool:
    return value.strip().lower() in ("true", "1", "yes")


def _read_metaimage(file: pathlib.Path, raw: bytes) -> ImageData:
    fields, data_start = _meta_header(file, raw)
    if "NDims" not in fields:
        raise ImageFileError(file, "the MetaImage header has no NDims")
    try:
        dimension = int(fields["NDims"])
    except ValueError:
        raise ImageFileError(file, f"MetaImage NDims = {fields['NDims']!r} is not a number") from None
    if dimension not in (2, 3):
        raise ImageFileError(file, f"a {dimension}D MetaImage is not supported; expected a 2D or 3D image",
                             corrupt=False)
    for key in ("DimSize", "ElementType"):
        if key not in fields:
            raise ImageFileError(file, f"the MetaImage header has no {key}")
    size = [int(v) for v in _meta_numbers(file, fields, "DimSize", dimension)]
    if min(size) <= 0:
        raise ImageFileError(file, f"MetaImage DimSize {size} has a size <= 0")
    element_type = fields["ElementType"].upper()
    if element_type not in _META_TYPES:
        raise ImageFileError(file, f"MetaImage ElementType {fields['ElementType']} is not supported",
                             corrupt=False)
    if "BinaryData" in fields and not _meta_true(fields["BinaryData"]):
        raise ImageFileError(file, "MetaImage files with ASCII data (BinaryData = False) are not supported",
                             corrupt=False)
    components = int(fields.get("ElementNumberOfChannels", "1") or 1)
    if components < 1:
        raise ImageFileError(file, f"MetaImage ElementNumberOfChannels = {components}")

    # MetaIO reads these in this order, a later one replacing an earlier one.
    spacing = [1.0] * dimension
    if "ElementSize" in fields:
        spacing = _meta_numbers(file, fields, "ElementSize", dimension)
    if "ElementSpacing" in fields:
        spacing = _meta_numbers(file, fields, "ElementSpacing", dimension)
    origin = [0.0] * dimension
    for key in ("Position", "Offset", "Origin", "ImagePosition"):
        if key in fields:
            origin = _meta_numbers(file, fields, key, dimension)
    transform = list(np.eye(dimension).reshape(-1))
    for key in ("Orientation", "Rotation", "TransformMatrix"):
        if key in fields:
            transform = _meta_numbers(file, fields, key, dimension * dimension)
    # MetaImageIO: row i of TransformMatrix is the direction of index axis i, i.e. column i of ITK's
    # direction matrix.
    direction = np.asarray(transform, dtype=np.float64).reshape(dimension, dimension).T

    big_endian = False
    for key in ("ElementByteOrderMSB", "BinaryDataByteOrderMSB"):
        if key in fields:
            big_endian = _meta_true(fields[key])
    dtype = np.dtype(_META_TYPES[element_type]).newbyteorder(">" if big_endian else "<")
    count = int(np.prod(size, dtype=np.int64)) * components
    needed = count * dtype.itemsize

    data_file = fields["ElementDataFile"]
    if data_file.upper() == "LOCAL":
        payload = raw[data_start:]
    else:
        if data_file.upper().startswith("LIST") or "%" in data_file or len(data_file.split()) > 1:
            raise ImageFileError(file, f"MetaImage data in several files (ElementDataFile = {data_file}) is not "
                                 "supported", corrupt=False)
        data_path = pathlib.Path(data_file)
        if not data_path.is_absolute():
            data_path = file.parent / data_path
        try:
            payload = data_path.read_bytes()
        except OSError as exc:
            raise ImageFileError(file, f"cannot read its data file {data_path} ({exc.strerror or exc})") from exc
    compressed = _meta_true(fields.get("CompressedData", "False"))
    header_size = int(float(fields.get("HeaderSize", "0") or 0))
    if not compressed:
        if header_size == -1:  # the data are the last bytes of the file
            payload = payload[max(len(payload) - needed, 0):]
        elif header_size > 0:
            payload = payload[header_size:]
    else:
        try:
            # wbits 47: zlib or gzip header, as MetaIO's inflateInit2 accepts
            payload = zlib.decompressobj(47).decompress(payload, needed)
        except zlib.error as exc:
            raise ImageFileError(file, f"the compressed MetaImage data are damaged ({exc})") from exc
    if len(payload) < needed:
        raise ImageFileError(file, f"the pixel data end after {len(payload)} of {needed} bytes")
    array = np.frombuffer(payload, dtype=dtype, count=count).astype(dtype.newbyteorder("="), copy=True)
    array = array.reshape(tuple(reversed(size)) + ((components,) if components > 1 else ()))
    return ImageData(array, tuple(spacing), tuple(origin), tuple(direction.reshape(-1)))


def _meta_number(value: float) -> str:
    # MetaIO writes doubles with 17 significant digits: they read back exactly.
    return f"{value:.17g}"


def _anatomical_orientation(direction: np.ndarray) -> str:
    # ITK's code of the closest orientation, named by where each index axis starts (ITK's "RAI"
    # for the identity: x runs from right to left, y from anterior to posterior, z from inferior
    # to superior). Informative only: no reader uses it.
    letters = (("R", "L"), ("A", "P"), ("I", "S"))
    code = ""
    for axis in range(3):
        column = direction[:, axis]
        world = int(np.argmax(np.abs(column)))
        code += letters[world][0 if column[world] > 0 else 1]
    return code


def _write_metaimage(file: pathlib.Path, image: ImageData, array: np.ndarray, compress: bool) -> None:
    dimension = image.dimension
    dtype = array.dtype.newbyteorder("=")
    data = np.ascontiguousarray(array, dtype=dtype.newbyteorder("<")).tobytes()
    if compress:
        data = zlib.compress(data, 6)
    direction = image.direction_matrix()
    detached = file.name.lower().endswith(".mhd")
    data_name = file.name[:-4] + (".zraw" if compress else ".raw") if detached else "LOCAL"
    lines = [
        "ObjectType = Image",
        f"NDims = {dimension}",
        "BinaryData = True",
        "BinaryDataByteOrderMSB = False",
        f"CompressedData = {'True' if compress else 'False'}",
    ]
    if compress:
        lines.append(f"CompressedDataSize = {len(data)}")
    lines += [
        "TransformMatrix = " + " ".join(_meta_number(v) for v in direction.T.reshape(-1)),
        "Offset = " + " ".join(_meta_number(v) for v in image.origin),
        "CenterOfRotation = " + " ".join("0" for _ in range(dimension)),
    ]
    if dimension == 3:
        lines.append(f"AnatomicalOrientation = {_anatomical_orientation(direction)}")
    lines += [
        "ElementSpacing = " + " ".join(_meta_number(v) for v in image.spacing),
        "DimSize = " + " ".join(str(n) for n in image.size),
    ]
    if dimension == 2:
        lines.append("AnatomicalOrientation = ??")
    if image.components > 1:
        lines.append(f"ElementNumberOfChannels = {image.components}")
    lines += [f"ElementType = {_META_NAMES[dtype]}", f"ElementDataFile = {data_name}"]
    header = ("\n".join(lines) + "\n").encode("ascii")
    if detached:
        (file.parent / data_name).write_bytes(data)
        file.write_bytes(header)
    else:
        file.write_bytes(header + data)
