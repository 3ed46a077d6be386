"""Reading and writing cases, radiographs, masks, NIfTI volumes and JSON, never half-written.

The case format is ``hipatlas-case/1`` (``docs/case-format.md``): a folder with ``case.json``
naming two calibrated radiographs, optional femur masks and a 3x4 projection matrix per view.

Decisions this module takes where the format leaves room
-------------------------------------------------------
* **Intensity convention.** Every loaded radiograph is float32 ``(rows, cols)`` with larger values =
  more attenuation. DICOM ``MONOCHROME1`` and TIFF ``MINISWHITE`` images are inverted within the
  range their bit depth can represent (after the DICOM modality rescale), so the result does not
  depend on the image content. The absolute intensity scale is free (the network normalises it).
* **Colour images.** An RGB(A) radiograph whose colour channels are identical (grey saved as
  colour) is accepted with a warning, using one channel; a radiograph with real colour is refused
  with :class:`InputFileError` (a colour picture is almost always a screenshot or an annotated
  export, not raw detector data). Alpha is ignored. Masks in colour count a pixel as femur when
  any colour channel is non-zero.
* **Multi-frame images** (multi-frame DICOM, multi-page TIFF): the first frame is used and a warning
  is logged; a DICOM's top-level geometry tags describe the first frame of an XA/RF run.
* **Paths in case.json** must be relative to the case folder and stay inside it (``..`` that
  escapes the folder and absolute paths are refused), so that a case folder is self-contained and
  can be copied or archived as a whole. ``\\`` is accepted as a separator (cases saved on Windows).
* **View names** are free text but must differ from each other, because outputs are named after
  them (``overlay_<view>.png``).
* **Calibration.** A ``projection_matrix`` in case.json always wins. Without one, a DICOM image's
  geometry tags define ``P`` (:func:`inference.geometry.projection_from_dicom`); any other image
  without a matrix is a :class:`CaseFormatError`.
* **Unknown keys** in case.json are tolerated and logged as warnings (forward compatibility).
* **DICOM metadata** kept in :attr:`Radiograph.dicom_meta` is a fixed subset of acquisition and
  geometry tags without patient identifiers, so that it can go into report.json.
* **Output folders** (:func:`atomic_output_dir`): the content is built in a hidden temporary
  sibling folder and renamed into place only when everything succeeded. An existing non-empty
  destination is refused unless ``overwrite=True``; then the old folder is first renamed aside,
  the new one renamed into place and only then the old one deleted, so at every instant the
  destination is either the complete old or the complete new result.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import pathlib
import posixpath
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from inference import imageio_numpy
from inference.checksums import sha256_file
from inference.errors import CaseFormatError, GeometryError, InputFileError, OutputError
from inference.geometry import Calibration, VolumeGeometry, projection_from_dicom, validate_projection_matrix
from inference.imageio_numpy import ImageData, ImageFileError

logger = logging.getLogger(__name__)

CASE_FORMAT = "hipatlas-case/1"
CASE_JSON = "case.json"
SIDES = ("right", "left")
#: Modalities of projection radiographs named by the case format.
RADIOGRAPH_MODALITIES = ("DX", "CR", "XA", "RF")
#: Modalities that are certainly not a projection radiograph (refused rather than misread).
_TOMOGRAPHIC_MODALITIES = ("CT", "MR", "PT", "NM", "US", "SEG", "RTSTRUCT", "RTDOSE", "OCT")

_CASE_KEYS = ("format", "side", "views")
_VIEW_KEYS = ("name", "image", "mask", "projection_matrix")

#: DICOM attributes copied into Radiograph.dicom_meta (no patient identifiers on purpose).
_DICOM_META_KEYWORDS = (
    "Modality",
    "SOPClassUID",
    "Manufacturer",
    "ManufacturerModelName",
    "PhotometricInterpretation",
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "PixelRepresentation",
    "SamplesPerPixel",
    "NumberOfFrames",
    "RescaleSlope",
    "RescaleIntercept",
    "RescaleType",
    "PixelIntensityRelationship",
    "PixelIntensityRelationshipSign",
    "ImagerPixelSpacing",
    "PixelSpacing",
    "DistanceSourceToDetector",
    "DistanceSourceToPatient",
    "EstimatedRadiographicMagnificationFactor",
    "PositionerPrimaryAngle",
    "PositionerSecondaryAngle",
    "ViewPosition",
    "PatientOrientation",
    "ImageLaterality",
    "Laterality",
    "BodyPartExamined",
    "DetectorType",
    "KVP",
)

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_IMAGE_SUFFIXES = (".nii", ".nii.gz", ".mha", ".mhd", ".nrrd", ".nhdr")


# --------------------------------------------------------------------------------------------
# data classes
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, eq=False)
class Radiograph:
    """One loaded radiograph.

    Attributes
    ----------
    pixels : np.ndarray
        float32 ``(rows, cols)``, larger = more attenuation; row = ``v``, column = ``u``.
    pixel_spacing_mm : tuple of float or None
        ``(row spacing, column spacing)`` in mm, DICOM order, at the detector when the file says so
        (DICOM ImagerPixelSpacing, else PixelSpacing; NIfTI/MHA spacing). ``None`` for PNG/TIFF.
        Informative only: the geometry is in ``P``.
    source_format : str
        ``"png"``, ``"tiff"``, ``"dicom"``, ``"nifti"``, ``"mha"`` or ``"nrrd"``.
    dicom_meta : dict or None
        A JSON-serialisable subset of DICOM acquisition/geometry attributes (no patient identifiers).
    sha256 : str
        Hex digest of the file as read (for report.json).
    path : pathlib.Path
        The file.
    dicom_dataset : pydicom.Dataset or None
        The DICOM header without pixel data (used to derive the projection matrix).
    """

    pixels: np.ndarray
    pixel_spacing_mm: tuple[float, float] | None
    source_format: str
    dicom_meta: dict[str, Any] | None
    sha256: str
    path: pathlib.Path
    dicom_dataset: Any = dataclasses.field(default=None, repr=False)

    @property
    def shape(self) -> tuple[int, int]:
        """``(rows, cols)``."""
        return (int(self.pixels.shape[0]), int(self.pixels.shape[1]))


@dataclasses.dataclass(frozen=True, eq=False)
class CaseView:
    """One view of a case: image, optional femur mask (bool, same shape) and its camera ``P``."""

    name: str
    image: Radiograph
    mask: np.ndarray | None
    P: np.ndarray
    calibration: Calibration
    image_path: pathlib.Path
    mask_path: pathlib.Path | None

    @property
    def projection(self) -> np.ndarray:
        """Alias of :attr:`P` (the name used by the pipeline)."""
        return self.P


@dataclasses.dataclass(frozen=True, eq=False)
class Case:
    """A loaded ``hipatlas-case/1`` folder. ``raw`` is case.json as parsed."""

    side: str
    views: list[CaseView]
    case_dir: pathlib.Path
    raw: dict[str, Any]


# --------------------------------------------------------------------------------------------
# small file helpers
# --------------------------------------------------------------------------------------------
def _temp_sibling(path: pathlib.Path, suffix: str) -> pathlib.Path:
    # A hidden name in the same folder, so os.replace is an atomic rename on one file system;
    # the suffix is kept because some writers (ITK, PIL) choose the format from it.
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:12]}{suffix}")


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, suffix: str = "") -> Iterator[pathlib.Path]:
    """Yield a temporary path beside ``path``; on success move it onto ``path``, else delete it.

    The one way HipAtlas writes a file (JSON, text, PNG, STL, npz, .keras, .onnx, PDF, project):
    whoever writes into the yielded path, a reader of ``path`` sees the old file or the whole new
    one, never a half-written one, and an error or cancel leaves no temporary file behind. The
    temporary name keeps ``suffix`` (some writers choose the format from it) and is created by a
    plain ``open``, so the finished file has the usual permissions (0666 less the umask).
    Folders: :func:`atomic_output_dir`.
    """
    final = pathlib.Path(path)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{final.parent}: cannot create the folder ({exc.strerror or exc})") from exc
    tmp = _temp_sibling(final, suffix)
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, (pathlib.PurePath,)):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


_FLAT_NUMBER_LIST = re.compile(r"\[\s*((?:-?[0-9][0-9.eE+-]*,\s*)*-?[0-9][0-9.eE+-]*)\s*\]")


def read_json_object(path: str | os.PathLike, what: str) -> dict[str, Any]:
    """A JSON file whose top level is an object, with typed errors naming the file.

    ``what`` names the file in messages ("geometry file", "calibration file").
    """
    file = pathlib.Path(path)
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputFileError(f"{file}: {what} not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputFileError(f"{file}: cannot read the {what} ({exc})") from exc
    except json.JSONDecodeError as exc:
        raise CaseFormatError(f"{file}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from exc
    if not isinstance(data, dict):
        raise CaseFormatError(f"{file}: the top level must be a JSON object")
    return data


def write_json_atomic(path: str | os.PathLike, obj: Any, *, indent: int = 2) -> pathlib.Path:
    """Write ``obj`` as JSON (numpy scalars/arrays allowed) via a temp file and an atomic rename.

    Floats are written with ``repr`` precision, so they read back bit-identical; flat lists of
    numbers are kept on one line. NaN and infinity are refused (they are not JSON) with :class:`OutputError`.
    """
    final = pathlib.Path(path)
    try:
        text = json.dumps(obj, indent=indent, allow_nan=False, default=_json_default)
    except (TypeError, ValueError) as exc:
        raise OutputError(f"{final}: cannot write JSON ({exc})") from exc
    if indent:
        # Put each flat list of numbers (a matrix row, a point) on one line so a person can read
        # the file; the number texts themselves are untouched, so precision is unchanged.
        text = _FLAT_NUMBER_LIST.sub(lambda m: "[" + re.sub(r"\s+", " ", m.group(1)) + "]", text)
    with atomic_file(final, ".json") as tmp:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text + "\n")
            handle.flush()
            os.fsync(handle.fileno())
    return final


def write_text_atomic(path: str | os.PathLike, text: str) -> pathlib.Path:
    """Write UTF-8 text via a temporary file and an atomic rename (never a half-written file)."""
    final = pathlib.Path(path)
    with atomic_file(final, final.suffix) as tmp:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
    return final


def write_png_atomic(path: str | os.PathLike, array: np.ndarray, compress_level: int = 6) -> pathlib.Path:
    """Write a PNG atomically.

    Parameters
    ----------
    array : np.ndarray
        ``(H, W)`` uint8 or uint16 (16-bit grey), bool (written 0/255), or ``(H, W, 3|4)`` uint8
        (RGB/RGBA, e.g. overlays). Other dtypes must be scaled by the caller.
    compress_level : int
        zlib level 0-9 (lossless at every level; PIL's default 6). A radiograph overlay of
        768 x 768 took 67 ms at 6 and 29 ms at 3 for a file 0.1 % larger.
    """
    from PIL import Image

    arr = np.asarray(array)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    if arr.ndim == 2 and arr.dtype in (np.uint8, np.uint16):
        image = Image.fromarray(np.ascontiguousarray(arr))
    elif arr.ndim == 3 and arr.shape[2] in (3, 4) and arr.dtype == np.uint8:
        image = Image.fromarray(np.ascontiguousarray(arr), mode=None)
    else:
        raise OutputError(
            f"{path}: cannot write a PNG from an array of shape {arr.shape} and dtype {arr.dtype}; "
            "expected (H, W) uint8/uint16/bool or (H, W, 3|4) uint8"
        )
    with atomic_file(path, ".png") as tmp:
        image.save(tmp, format="PNG", compress_level=int(compress_level))
    return pathlib.Path(path)


def plain_mode(folder: bool = False) -> int:
    """Permissions a plain open()/mkdir would give (0666/0777 less the umask).

    Temporary files and folders (mkstemp/mkdtemp) are private (0600/0700); finished outputs that
    are renamed into place get these instead, so other users can read them as usual.
    """
    return (0o777 if folder else 0o666) & ~_current_umask()


def _current_umask() -> int:
    """The process umask, read without changing it (os.umask would race with other threads)."""
    try:
        for line in pathlib.Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


@contextlib.contextmanager
def atomic_output_dir(final_dir: str | os.PathLike, *, overwrite: bool = False) -> Iterator[pathlib.Path]:
    """Build an output folder in a temporary sibling and move it into place only on success.

    Yields the temporary folder; write everything into it. On an exception (including
    :class:`~inference.errors.Cancelled`, KeyboardInterrupt or a closed generator) the temporary
    folder is deleted and ``final_dir`` is left untouched.

    Parameters
    ----------
    final_dir : path
        Destination folder. Its parent is created if needed.
    overwrite : bool
        If ``final_dir`` exists and is not empty: ``False`` raises :class:`OutputError` before any
        work starts; ``True`` replaces it (old renamed aside, new renamed in, old deleted).
        An existing empty folder is always replaced.
    """
    final = pathlib.Path(final_dir)
    if final.exists() and not final.is_dir():
        raise OutputError(f"{final}: exists and is not a folder; choose another output folder")
    if final.is_dir() and any(final.iterdir()) and not overwrite:
        raise OutputError(
            f"{final}: the output folder already exists and is not empty; choose a new folder "
            "or allow overwriting"
        )
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
        # mkdtemp makes the folder private (0700); the result is an ordinary folder, so give it
        # the permissions a plain mkdir would (0777 less the umask).
        tmp.chmod(plain_mode(folder=True))
    except OSError as exc:
        raise OutputError(f"{final}: cannot create the output folder ({exc.strerror or exc})") from exc
    try:
        yield tmp
        _move_dir_into_place(tmp, final, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _move_dir_into_place(tmp: pathlib.Path, final: pathlib.Path, *, overwrite: bool) -> None:
    old: pathlib.Path | None = None
    if final.exists():
        # Re-checked here: the folder may have been filled while we worked.
        if any(final.iterdir()) and not overwrite:
            raise OutputError(f"{final}: the output folder was filled by someone else meanwhile; nothing written")
        old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:12]}")
        os.rename(final, old)
    try:
        os.rename(tmp, final)
    except BaseException:
        if old is not None:
            os.rename(old, final)  # put the previous result back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# radiographs and masks
# --------------------------------------------------------------------------------------------
def _sniff_format(path: pathlib.Path) -> str:
    """Format from the file's magic bytes, else from its name."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(352)
    except OSError as exc:
        raise InputFileError(f"{path}: cannot read the file ({exc.strerror or exc})") from exc
    if not head:
        raise InputFileError(f"{path}: the file is empty (0 bytes)")
    if head.startswith(_PNG_MAGIC):
        return "png"
    if head[:4] in _TIFF_MAGICS:
        return "tiff"
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")) or head[344:348] in (b"n+1\x00", b"ni1\x00"):
        return "nifti"
    if name.endswith((".mha", ".mhd")):
        return "mha"
    if name.endswith((".nrrd", ".nhdr")):
        return "nrrd"
    if name.endswith((".dcm", ".dicom", ".ima")):
        return "dicom"  # DICOM without the 128-byte preamble; pydicom reads it with force=True
    if name.endswith(".png"):
        raise InputFileError(f"{path}: named .png but is not a PNG file (wrong signature)")
    if name.endswith((".tif", ".tiff")):
        raise InputFileError(f"{path}: named .tif but is not a TIFF file (wrong header)")
    raise InputFileError(
        f"{path}: unrecognised image format; expected PNG, TIFF, DICOM, NIfTI (.nii/.nii.gz) or MHA"
    )


def _single_channel(arr: np.ndarray, path: pathlib.Path, *, is_mask: bool) -> np.ndarray:
    """Reduce ``(H, W, C)`` to ``(H, W)`` following the colour policy of this module."""
    if arr.ndim == 2:
        return arr
    if arr.ndim != 3 or arr.shape[2] not in (2, 3, 4):
        raise InputFileError(f"{path}: expected a 2D image, found an array of shape {arr.shape}")
    channels = arr.shape[2]
    colour = arr[..., :3] if channels >= 3 else arr[..., :1]  # grey+alpha (2) and RGBA (4): drop alpha
    if is_mask:
        if channels >= 3 and not _channels_equal(colour):
            logger.warning("%s: colour mask; a pixel is femur where any colour channel is non-zero", path)
        return np.any(colour != 0, axis=2)
    if channels >= 3 and not _channels_equal(colour):
        raise InputFileError(
            f"{path}: colour image (RGB with different channels); a radiograph must be greyscale. "
            "Export the original detector image (DICOM or 16-bit greyscale PNG/TIFF)"
        )
    logger.warning("%s: greyscale stored as %d channels; using the first channel", path, channels)
    return colour[..., 0]


def _channels_equal(rgb: np.ndarray) -> bool:
    return bool(np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2]))


def _read_png(path: pathlib.Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()  # forces decoding now, so a truncated file fails here
            mode = image.mode
            if mode == "P":  # palette: resolve to the actual colours
                image = image.convert("RGBA" if "transparency" in image.info else "RGB")
            elif mode == "1":
                image = image.convert("L")
            elif mode == "CMYK" or mode == "YCbCr":
                image = image.convert("RGB")
            arr = np.array(image)
    except OSError as exc:
        raise InputFileError(f"{path}: cannot read the PNG file ({exc}); is it truncated or corrupt?") from exc
    except (ValueError, SyntaxError) as exc:  # PIL reports broken chunks as SyntaxError
        raise InputFileError(f"{path}: cannot read the PNG file ({exc}); is it corrupt?") from exc
    return arr


def _read_tiff(path: pathlib.Path) -> np.ndarray:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            if len(tif.pages) == 0:
                raise InputFileError(f"{path}: the TIFF file holds no image")
            if len(tif.pages) > 1:
                logger.warning("%s: TIFF with %d pages; using the first page", path, len(tif.pages))
            page = tif.pages[0]
            arr = page.asarray()
            photometric = int(page.photometric) if page.photometric is not None else None
    except InputFileError:
        raise
    except Exception as exc:  # tifffile raises many types (TiffFileError, ValueError, struct.error)
        raise InputFileError(f"{path}: cannot read the TIFF file ({exc}); is it truncated or corrupt?") from exc
    arr = np.asarray(arr)
    if photometric == 0:  # MINISWHITE: 0 is white, the TIFF analogue of DICOM MONOCHROME1
        arr = _invert_in_dtype_range(arr)
    return arr


def _invert_in_dtype_range(arr: np.ndarray) -> np.ndarray:
    # Invert inside the range the storage type can hold (not the image's own min/max) so the same
    # stored value always maps to the same result.
    if np.issubdtype(arr.dtype, np.integer):
        info = np.iinfo(arr.dtype)
        return (float(info.max) + float(info.min)) - arr.astype(np.float64)
    if arr.dtype == bool:
        return ~arr
    return -arr.astype(np.float64)


def _read_image_2d(path: pathlib.Path, kind: str) -> tuple[np.ndarray, tuple[float, float]]:
    image = _read_image_file(path, f"{kind} file")
    size = image.size  # ITK order (x, y[, z])
    kept = [axis for axis, n in enumerate(size) if n != 1]
    if len(kept) != 2:
        raise InputFileError(f"{path}: expected a 2D image (or a 3D image one slice thick), found size {size}")
    arr = image.array  # spatial axes reversed (row-major), components last
    components = image.components
    spatial = arr.shape[:-1] if components > 1 else arr.shape
    arr = arr.reshape(tuple(n for n in spatial if n != 1) + ((components,) if components > 1 else ()))
    spacing = image.spacing
    # ITK spacing is (x = column, y = row); Radiograph keeps DICOM's (row, column) order.
    return arr, (float(spacing[kept[1]]), float(spacing[kept[0]]))


def _dicom_meta(ds: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for keyword in _DICOM_META_KEYWORDS:
        value = ds.get(keyword, None)
        if value is None or value == "":
            continue
        meta[keyword] = _dicom_value_to_json(value)
    return meta


def _dicom_value_to_json(value: Any) -> Any:
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return [_dicom_value_to_json(v) for v in value]
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, (bytes, bytearray)):
        return value.hex()
    # pydicom DSfloat/IS subclass float/int and are handled above; UIDs and strings end here.
    return str(value)


def _read_dicom(path: pathlib.Path) -> tuple[np.ndarray, tuple[float, float] | None, dict[str, Any], Any]:
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut

    try:
        ds = pydicom.dcmread(str(path), force=True)
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError) as exc:
        raise InputFileError(f"{path}: cannot read the DICOM file ({exc}); is it truncated or corrupt?") from exc
    except Exception as exc:  # pydicom can raise struct.error etc. on garbage
        raise InputFileError(f"{path}: cannot read the DICOM file ({exc}); is it truncated or corrupt?") from exc

    modality = str(ds.get("Modality", "") or "").upper()
    if modality in _TOMOGRAPHIC_MODALITIES:
        raise InputFileError(
            f"{path}: DICOM modality {modality} is not a projection radiograph; "
            f"expected one of {', '.join(RADIOGRAPH_MODALITIES)}"
        )
    if modality not in RADIOGRAPH_MODALITIES:
        logger.warning(
            "%s: DICOM modality %r is not one of %s; reading it as a radiograph",
            path, modality or "(missing)", "/".join(RADIOGRAPH_MODALITIES),
        )
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise InputFileError(f"{path}: the DICOM file has no pixel data")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper().strip()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise InputFileError(
            f"{path}: DICOM PhotometricInterpretation {photometric}; a radiograph must be "
            "MONOCHROME1 or MONOCHROME2 (greyscale)"
        )
    try:
        stored = ds.pixel_array
    except Exception as exc:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        syntax_name = getattr(syntax, "name", str(syntax)) if syntax is not None else "unknown"
        raise InputFileError(
            f"{path}: cannot decode the DICOM pixel data (transfer syntax {syntax_name}): {exc}. "
            "The file may be truncated, or compressed in a way that needs an extra decoder "
            "(e.g. pylibjpeg); exporting it uncompressed also works"
        ) from exc
    stored = np.asarray(stored)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        logger.warning("%s: multi-frame DICOM with %d frames; using the first frame", path, frames)
        stored = stored[0]
    if stored.ndim != 2:
        raise InputFileError(f"{path}: expected a 2D DICOM image, found pixel data of shape {stored.shape}")

    # Modality LUT (RescaleSlope/Intercept or a Modality LUT Sequence) turns stored values into
    # the modality's units; applied before inversion so the inversion acts in those units.
    values = np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
    if photometric == "MONOCHROME1":
        bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)) or 16)
        if np.issubdtype(stored.dtype, np.floating):
            lo_hi_stored = np.array([stored.min(), stored.max()], dtype=stored.dtype)
        elif int(ds.get("PixelRepresentation", 0) or 0) == 1:
            lo_hi_stored = np.array([-(2 ** (bits - 1)), 2 ** (bits - 1) - 1], dtype=np.int64)
        else:
            lo_hi_stored = np.array([0, 2**bits - 1], dtype=np.int64)
        lo, hi = np.asarray(apply_modality_lut(lo_hi_stored, ds), dtype=np.float64)
        # MONOCHROME1: the minimum value is displayed white, i.e. low = most attenuation. Reflect
        # within the representable (rescaled) range so that larger = more attenuation.
        values = (lo + hi) - values

    spacing = None
    for keyword in ("ImagerPixelSpacing", "PixelSpacing"):
        value = ds.get(keyword, None)
        if value is not None and len(value) == 2:
            try:
                spacing = (float(value[0]), float(value[1]))
            except (TypeError, ValueError):
                continue
            break
    meta = _dicom_meta(ds)
    # Keep the header only: the pixel data is already decoded and can be large.
    for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
        if keyword in ds:
            delattr(ds, keyword)
    return values, spacing, meta, ds


def load_radiograph(path: str | os.PathLike) -> Radiograph:
    """Load a radiograph as float32 ``(rows, cols)``, larger = more attenuation.

    Supports 8/16-bit greyscale PNG, TIFF (integer or float), DICOM (DX/CR/XA/RF; MONOCHROME1
    inverted, modality rescale applied; first frame of multi-frame files) and 2D NIfTI/MHA/NRRD
    (a 3D image one slice thick is accepted). See the module docstring for the colour policy.

    Raises
    ------
    InputFileError
        The file is missing, empty, truncated, colour, not 2D, or contains non-finite pixels.
    """
    file = pathlib.Path(path)
    if not file.exists():
        raise InputFileError(f"{file}: file not found")
    if not file.is_file():
        raise InputFileError(f"{file}: not a file")
    kind = _sniff_format(file)
    spacing: tuple[float, float] | None = None
    meta: dict[str, Any] | None = None
    header = None
    if kind == "png":
        arr = _single_channel(_read_png(file), file, is_mask=False)
    elif kind == "tiff":
        arr = _single_channel(_read_tiff(file), file, is_mask=False)
    elif kind == "dicom":
        arr, spacing, meta, header = _read_dicom(file)
    else:
        arr, spacing = _read_image_2d(file, {"nifti": "NIfTI", "mha": "MHA", "nrrd": "NRRD"}[kind])
        arr = _single_channel(arr, file, is_mask=False)
    if arr.ndim != 2:
        raise InputFileError(f"{file}: expected a 2D image, found an array of shape {arr.shape}")
    if min(arr.shape) < 2:
        raise InputFileError(f"{file}: the image is only {arr.shape[0]} x {arr.shape[1]} pixels")
    pixels = np.ascontiguousarray(arr, dtype=np.float32)
    bad = int(np.count_nonzero(~np.isfinite(pixels)))
    if bad:
        raise InputFileError(f"{file}: {bad} pixel values are not finite (NaN or infinity)")
    if float(pixels.max()) == float(pixels.min()):
        logger.warning("%s: the image is blank (every pixel is %g)", file, float(pixels.min()))
    return Radiograph(
        pixels=pixels,
        pixel_spacing_mm=spacing,
        source_format=kind,
        dicom_meta=meta,
        sha256=sha256_file(file),
        path=file,
        dicom_dataset=header,
    )


def load_mask(path: str | os.PathLike, expected_shape: Sequence[int] | None = None) -> np.ndarray:
    """Load a femur mask as a bool ``(rows, cols)`` array (non-zero = femur).

    Accepts 8-bit (or 16-bit) PNG/TIFF and, for convenience, 2D NIfTI/MHA.

    Raises
    ------
    InputFileError
        Missing/unreadable file, a size different from ``expected_shape`` (both sizes are given),
        or an empty mask.
    """
    file = pathlib.Path(path)
    if not file.exists():
        raise InputFileError(f"{file}: mask file not found")
    if not file.is_file():
        raise InputFileError(f"{file}: not a file")
    kind = _sniff_format(file)
    if kind == "png":
        arr = _read_png(file)
    elif kind == "tiff":
        arr = _read_tiff(file)
    elif kind in ("nifti", "mha", "nrrd"):
        arr, _ = _read_image_2d(file, kind.upper())
    else:
        raise InputFileError(f"{file}: a mask must be an 8-bit PNG or TIFF, not {kind.upper()}")
    arr = _single_channel(np.asarray(arr), file, is_mask=True)
    if arr.ndim != 2:
        raise InputFileError(f"{file}: expected a 2D mask, found an array of shape {arr.shape}")
    mask = np.ascontiguousarray(arr != 0)
    if expected_shape is not None:
        expected = tuple(int(s) for s in expected_shape)
        if mask.shape != expected:
            raise InputFileError(
                f"{file}: the mask is {mask.shape[0]} x {mask.shape[1]} pixels (rows x columns) "
                f"but its radiograph is {expected[0]} x {expected[1]}; they must match"
            )
    if not mask.any():
        raise InputFileError(f"{file}: the mask is empty (no non-zero femur pixels)")
    return mask


# --------------------------------------------------------------------------------------------
# case.json
# --------------------------------------------------------------------------------------------
def _describe(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (str, int, float, bool, type(None))) else type(value).__name__
    return text if len(text) <= 60 else text[:57] + "..."


def _parse_matrix(value: Any, where: str, json_path: pathlib.Path) -> np.ndarray:
    def fail(problem: str) -> CaseFormatError:
        return CaseFormatError(f"{json_path}: {where} {problem}")

    if not isinstance(value, list):
        raise fail(f"is {_describe(value)}, expected a list of 3 rows of 4 numbers")
    if not all(isinstance(row, list) for row in value):
        bad = next(i for i, row in enumerate(value) if not isinstance(row, list))
        raise fail(f"row {bad} is {_describe(value[bad])}, expected a list of 4 numbers")
    lengths = {len(row) for row in value}
    if len(value) != 3 or lengths != {4}:
        if len(lengths) == 1:
            shape = f"{len(value)}x{lengths.pop()}"
        elif not value:
            shape = "0"
        else:
            shape = f"{len(value)} rows of " + "/".join(str(len(row)) for row in value)
        raise fail(f"has {shape} entries, expected 3x4")
    for r, row in enumerate(value):
        for c, entry in enumerate(row):
            if isinstance(entry, bool) or not isinstance(entry, (int, float)):
                raise CaseFormatError(f"{json_path}: {where}[{r}][{c}] is {_describe(entry)}, expected a number")
            if not math.isfinite(float(entry)):
                raise CaseFormatError(f"{json_path}: {where}[{r}][{c}] is {entry}, expected a finite number")
    matrix = np.array(value, dtype=np.float64)
    try:
        validate_projection_matrix(matrix, where)
    except GeometryError as exc:
        raise CaseFormatError(f"{json_path}: {exc}") from exc
    return matrix


def _relative_file(value: Any, where: str, json_path: pathlib.Path, case_dir: pathlib.Path) -> pathlib.Path:
    if not isinstance(value, str) or not value.strip():
        raise CaseFormatError(f"{json_path}: {where} is {_describe(value)}, expected a file name")
    text = value.replace("\\", "/")
    if text.startswith("/") or re.match(r"^[A-Za-z]:", text) or pathlib.PurePath(value).is_absolute():
        raise CaseFormatError(
            f"{json_path}: {where} is the absolute path {value!r}; give a path relative to the case "
            "folder and keep the file inside it"
        )
    normal = posixpath.normpath(text)
    if normal == ".." or normal.startswith("../") or normal == ".":
        raise CaseFormatError(f"{json_path}: {where} {value!r} points outside the case folder; keep the file inside it")
    return case_dir / pathlib.PurePosixPath(normal)


def _warn_unknown(obj: Mapping[str, Any], known: Sequence[str], where: str, json_path: pathlib.Path) -> None:
    for key in obj:
        if key not in known:
            logger.warning("%s: unknown key %s%r ignored", json_path, f"{where}." if where else "", key)


def _parse_case_json(
    json_path: pathlib.Path, case_dir: pathlib.Path
) -> tuple[dict[str, Any], str, list[dict[str, Any]]]:
    """Validate case.json completely (before any image is read). Returns raw, side, view specs."""
    try:
        text = json_path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise InputFileError(f"{json_path}: case.json not found; is {case_dir} a case folder?") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise InputFileError(f"{json_path}: cannot read case.json ({exc})") from exc

    def reject_constant(token: str) -> Any:
        raise CaseFormatError(f"{json_path}: contains {token}, which is not valid JSON; use finite numbers")

    try:
        raw = json.loads(text, parse_constant=reject_constant)
    except json.JSONDecodeError as exc:
        raise CaseFormatError(
            f"{json_path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})"
        ) from exc
    if not isinstance(raw, dict):
        raise CaseFormatError(f"{json_path}: the top level must be a JSON object, found {type(raw).__name__}")
    _warn_unknown(raw, _CASE_KEYS, "", json_path)

    if "format" not in raw:
        raise CaseFormatError(f'{json_path}: "format" is missing; expected "{CASE_FORMAT}"')
    fmt = raw["format"]
    if fmt != CASE_FORMAT:
        hint = ""
        if isinstance(fmt, str) and fmt.startswith("hipatlas-case/"):
            hint = " (a different version of the case format; this software reads version 1)"
        raise CaseFormatError(f'{json_path}: "format" is {_describe(fmt)}, expected "{CASE_FORMAT}"{hint}')

    if "side" not in raw:
        raise CaseFormatError(f'{json_path}: "side" is missing; expected "right" or "left"')
    side = raw["side"]
    if side not in SIDES:
        raise CaseFormatError(f'{json_path}: "side" is {_describe(side)}, expected "right" or "left"')

    if "views" not in raw:
        raise CaseFormatError(f'{json_path}: "views" is missing; expected a list of two views')
    views = raw["views"]
    if not isinstance(views, list):
        raise CaseFormatError(f'{json_path}: "views" is {_describe(views)}, expected a list of two views')
    if len(views) != 2:
        raise CaseFormatError(
            f'{json_path}: "views" has {len(views)} entries, expected exactly 2 (e.g. AP and lateral)'
        )

    specs: list[dict[str, Any]] = []
    for index, view in enumerate(views):
        where = f"views[{index}]"
        if not isinstance(view, dict):
            raise CaseFormatError(f"{json_path}: {where} is {_describe(view)}, expected an object")
        _warn_unknown(view, _VIEW_KEYS, where, json_path)
        for key in ("name", "image"):
            if key not in view:
                raise CaseFormatError(f'{json_path}: {where}.{key} is missing')
        name = view["name"]
        if not isinstance(name, str) or not name.strip():
            raise CaseFormatError(f"{json_path}: {where}.name is {_describe(name)}, expected a non-empty text")
        image_path = _relative_file(view["image"], f"{where}.image", json_path, case_dir)
        mask_value = view.get("mask", None)
        mask_path = None if mask_value is None else _relative_file(mask_value, f"{where}.mask", json_path, case_dir)
        matrix = None
        if view.get("projection_matrix", None) is not None:
            matrix = _parse_matrix(view["projection_matrix"], f"{where}.projection_matrix", json_path)
        specs.append({"name": name, "image": image_path, "mask": mask_path, "P": matrix, "where": where})
    if specs[0]["name"] == specs[1]["name"]:
        raise CaseFormatError(
            f"{json_path}: both views are named {specs[0]['name']!r}; give them different names (e.g. AP and LAT)"
        )
    return raw, side, specs


def load_case(case_dir: str | os.PathLike) -> Case:
    """Load and strictly validate a ``hipatlas-case/1`` folder.

    case.json is checked completely first (format, side, two views, names, file names, matrices),
    then images and masks are read. A view's ``P`` comes from case.json when present (calibration
    source ``"case.json projection_matrix"``), else from the DICOM geometry tags of its image
    (source ``"dicom-tags"``).

    Raises
    ------
    CaseFormatError
        case.json breaks the format; the message names case.json, the field and the problem.
    InputFileError
        The folder, case.json, an image or a mask is missing or unusable; the message names the file.
    CalibrationError
        A view has no projection_matrix and its DICOM tags do not define the camera.
    """
    folder = pathlib.Path(case_dir)
    if not folder.exists():
        raise InputFileError(f"{folder}: case folder not found")
    if not folder.is_dir():
        raise InputFileError(f"{folder}: not a folder; give the case folder that holds case.json")
    json_path = folder / CASE_JSON
    raw, side, specs = _parse_case_json(json_path, folder)

    views: list[CaseView] = []
    for spec in specs:
        where = spec["where"]
        image_path: pathlib.Path = spec["image"]
        if not image_path.is_file():
            raise InputFileError(f"{image_path}: image file not found (named in {json_path} {where}.image)")
        image = load_radiograph(image_path)
        mask = None
        mask_path: pathlib.Path | None = spec["mask"]
        if mask_path is not None:
            if not mask_path.is_file():
                raise InputFileError(f"{mask_path}: mask file not found (named in {json_path} {where}.mask)")
            mask = load_mask(mask_path, expected_shape=image.shape)
        if spec["P"] is not None:
            P = spec["P"]
            if image.source_format == "dicom":
                logger.info("%s: using case.json projection_matrix rather than the DICOM geometry tags", image_path)
            calibration = Calibration(
                source="case.json projection_matrix",
                details={"file": CASE_JSON, "field": f"{where}.projection_matrix"},
            )
        elif image.source_format == "dicom":
            # CalibrationError from here names the file and the missing tag, and says to add
            # a projection_matrix to case.json.
            P, calibration = projection_from_dicom(image.dicom_dataset, name=f"{image_path} ({where})")
            P = np.asarray(P, dtype=np.float64)
        else:
            raise CaseFormatError(
                f"{json_path}: {where}.projection_matrix is missing; it is required unless the image "
                "is a DICOM file whose geometry tags define the camera"
            )
        views.append(
            CaseView(
                name=spec["name"], image=image, mask=mask, P=P, calibration=calibration,
                image_path=image_path, mask_path=mask_path,
            )
        )
    return Case(side=side, views=views, case_dir=folder, raw=raw)


# --------------------------------------------------------------------------------------------
# writing cases
# --------------------------------------------------------------------------------------------
_IMAGE_SUFFIX = {"png": ".png", "tiff": ".tif", "nifti": ".nii.gz"}


def safe_name(name: str, fallback: str = "view") -> str:
    """``name`` as a file-name part: each run of characters other than ASCII letters, digits, ``_``
    and ``-`` becomes one ``_``, leading/trailing ``_`` are dropped, and an empty result is
    ``fallback``. The one rule for every file named after a view (case folders, overlays,
    proposed masks, DICOM files, project exports), so a name maps to the same file everywhere
    and a file can be matched back to its view."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", str(name)).strip("_") or fallback


def _image_to_uint16(image: np.ndarray) -> np.ndarray:
    # Integer images that already fit are stored unchanged (exact round trip); anything else is
    # mapped linearly min..max -> 0..65535, which the case format allows (the intensity scale is
    # free) and which keeps the most precision a 16-bit PNG can hold.
    if np.issubdtype(image.dtype, np.integer) and image.min() >= 0 and image.max() <= 65535:
        return image.astype(np.uint16)
    data = image.astype(np.float64)
    lo, hi = float(data.min()), float(data.max())
    if hi <= lo:
        return np.zeros(image.shape, dtype=np.uint16)
    return np.round((data - lo) * (65535.0 / (hi - lo))).astype(np.uint16)


def _write_image(path: pathlib.Path, image: np.ndarray, image_format: str) -> None:
    if image_format == "png":
        write_png_atomic(path, _image_to_uint16(image))
    elif image_format == "tiff":
        import tifffile

        data = image if image.dtype in (np.uint8, np.uint16, np.int16, np.float32) else image.astype(np.float32)
        tifffile.imwrite(path, np.ascontiguousarray(data), photometric="minisblack")
    else:  # NIfTI / MetaImage: unit spacing, no geometry (the camera is in case.json)
        pixels = image.astype(np.float32)
        _write_image_file(path, ImageData(pixels, (1.0,) * pixels.ndim, (0.0,) * pixels.ndim,
                                          tuple(np.eye(pixels.ndim).reshape(-1))), compress=True)


def write_case(
    case_dir: str | os.PathLike,
    side: str,
    views: Sequence[Mapping[str, Any]],
    *,
    image_format: str = "png",
    overwrite: bool = False,
) -> pathlib.Path:
    """Write a ``hipatlas-case/1`` folder atomically.

    Parameters
    ----------
    case_dir : path
        Destination folder, created via :func:`atomic_output_dir`.
    side : {"right", "left"}
    views : sequence of two mappings
        Keys ``name`` (str), ``image`` ((rows, cols) array, larger = more attenuation),
        ``mask`` ((rows, cols) array, non-zero = femur, or None / absent) and ``P`` (3x4).
    image_format : {"png", "tiff", "nifti"}
        ``png``: 16-bit greyscale; integer images within 0..65535 are stored as they are, others are
        scaled linearly to the full 0..65535 range. ``tiff``: uint8/uint16/int16/float32 stored as
        they are (other dtypes as float32). ``nifti``: float32 ``.nii.gz``. Masks are always 8-bit
        PNG with 0/255.
    overwrite : bool
        Replace an existing non-empty ``case_dir``.

    Returns
    -------
    pathlib.Path
        ``case_dir``. ``P`` is written with full float precision and reads back bit-identical.
    """
    if side not in SIDES:
        raise CaseFormatError(f'side is {_describe(side)}, expected "right" or "left"')
    if image_format not in _IMAGE_SUFFIX:
        raise ValueError(f"image_format must be one of {sorted(_IMAGE_SUFFIX)}, not {image_format!r}")
    if len(views) != 2:
        raise CaseFormatError(f"a case needs exactly 2 views, not {len(views)}")
    prepared = []
    used_stems: set[str] = set()
    for index, view in enumerate(views):
        name = view.get("name")
        if not isinstance(name, str) or not name.strip():
            raise CaseFormatError(f"views[{index}].name is {_describe(name)}, expected a non-empty text")
        image = np.asarray(view["image"])
        if image.ndim != 2 or min(image.shape) < 2:
            raise CaseFormatError(f"views[{index}].image has shape {image.shape}, expected (rows, cols)")
        if not np.all(np.isfinite(image)):
            raise CaseFormatError(f"views[{index}].image has non-finite pixel values")
        mask = view.get("mask", None)
        if mask is not None:
            mask = np.asarray(mask)
            if mask.shape != image.shape:
                raise CaseFormatError(f"views[{index}].mask has shape {mask.shape}, but its image has {image.shape}")
        P = np.asarray(view["P"], dtype=np.float64)
        if P.shape != (3, 4):
            raise CaseFormatError(f"views[{index}].P has shape {P.shape}, expected (3, 4)")
        validate_projection_matrix(P, f"views[{index}].P")
        stem = safe_name(name, f"view{index}").lower()
        if stem in used_stems:
            stem = f"{stem}_{index}"
        used_stems.add(stem)
        prepared.append((name, stem, image, mask, P))
    if prepared[0][0] == prepared[1][0]:
        raise CaseFormatError(f"both views are named {prepared[0][0]!r}; view names must differ")

    final = pathlib.Path(case_dir)
    with atomic_output_dir(final, overwrite=overwrite) as tmp:
        entries = []
        for name, stem, image, mask, P in prepared:
            image_name = stem + _IMAGE_SUFFIX[image_format]
            _write_image(tmp / image_name, image, image_format)
            entry: dict[str, Any] = {"name": name, "image": image_name}
            if mask is not None:
                mask_name = f"{stem}_mask.png"
                write_png_atomic(tmp / mask_name, (mask != 0).astype(np.uint8) * 255)
                entry["mask"] = mask_name
            # float() of each float64 entry: json writes repr(), the shortest text that reads back
            # to the identical double, so P survives the round trip bit for bit.
            entry["projection_matrix"] = [[float(x) for x in row] for row in P]
            entries.append(entry)
        write_json_atomic(tmp / CASE_JSON, {"format": CASE_FORMAT, "side": side, "views": entries})
    logger.info("wrote case %s (%s, %s images)", final, side, image_format)
    return final


# --------------------------------------------------------------------------------------------
# NIfTI / MetaImage / NRRD files: SimpleITK where installed, else inference.imageio_numpy
# --------------------------------------------------------------------------------------------
def _simpleitk() -> Any | None:
    """The SimpleITK module, or None where it cannot be imported.

    The one place that decides how image files are read and written. SimpleITK comes first, so
    the full installation reads and writes exactly as it always has; the TensorFlow-free runtime
    installer leaves it out (259 MiB of one library, for file I/O alone; issue 20) and gets
    :mod:`inference.imageio_numpy`, which reads and writes NIfTI-1 and MetaImage the way
    SimpleITK does. Imported here, on first use, never when a module is imported.
    """
    try:
        import SimpleITK
    except ImportError:
        return None
    return SimpleITK


_NEEDS_SIMPLEITK = ("NRRD files (.nrrd, .nhdr) need SimpleITK, which this installation does not include "
                    "(the TensorFlow-free runtime); save the image as NIfTI (.nii, .nii.gz) or MetaImage (.mha)")


def _read_image_file(path: pathlib.Path, what: str) -> ImageData:
    """Read a NIfTI/MetaImage/NRRD file as SimpleITK hands it over (2D or 3D).

    Raises
    ------
    InputFileError
        ``"<path>: cannot read the <what> (...)"``, or an image that is neither 2D nor 3D.
    """
    sitk = _simpleitk()
    if sitk is None:
        if path.name.lower().endswith((".nrrd", ".nhdr")):
            raise InputFileError(f"{path}: cannot read the {what}: {_NEEDS_SIMPLEITK}")
        try:
            return imageio_numpy.read_image(path)
        except ImageFileError as exc:
            if exc.corrupt:
                raise InputFileError(
                    f"{path}: cannot read the {what} ({exc.reason}); is it truncated or corrupt?") from exc
            raise InputFileError(f"{path}: cannot read the {what}: {exc.reason}") from exc
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        detail = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unknown reason"
        raise InputFileError(f"{path}: cannot read the {what} ({detail}); is it truncated or corrupt?") from exc
    if image.GetDimension() not in (2, 3):
        raise InputFileError(f"{path}: expected a 2D or 3D image, found {image.GetDimension()}D "
                             f"(size {tuple(image.GetSize())})")
    return ImageData(sitk.GetArrayFromImage(image), image.GetSpacing(), image.GetOrigin(), image.GetDirection())


def _write_image_file(path: pathlib.Path, image: ImageData, compress: bool, *, what: str = "image",
                      shown_as: pathlib.Path | None = None) -> None:
    """Write ``image`` in the format of ``path``'s suffix (NRRD only with SimpleITK).

    ``shown_as`` is the file name for messages when ``path`` is a temporary name of it.

    Raises
    ------
    OutputError
        ``"<file>: cannot write the <what> ..."``: the file type or pixel type cannot be written,
        or the file system refuses.
    """
    shown = path if shown_as is None else shown_as
    sitk = _simpleitk()
    if sitk is None:
        if path.name.lower().endswith((".nrrd", ".nhdr")):
            raise OutputError(f"{shown}: cannot write the {what}: {_NEEDS_SIMPLEITK}")
        try:
            imageio_numpy.write_image(path, image, compress=compress)
        except OutputError as exc:
            detail = str(exc).removeprefix(f"{path}: ")
            raise OutputError(f"{shown}: cannot write the {what} ({detail})") from exc
        return
    itk_image = sitk.GetImageFromArray(np.ascontiguousarray(image.array), isVector=image.components > 1)
    itk_image.SetSpacing(image.spacing)
    itk_image.SetOrigin(image.origin)
    itk_image.SetDirection(image.direction)
    try:
        sitk.WriteImage(itk_image, str(path), useCompression=compress)
    except RuntimeError as exc:
        raise OutputError(f"{shown}: cannot write the {what} ({str(exc).strip().splitlines()[-1]})") from exc


# --------------------------------------------------------------------------------------------
# volumes
# --------------------------------------------------------------------------------------------
def _volume_suffix(path: pathlib.Path) -> str:
    name = path.name.lower()
    for suffix in sorted(_IMAGE_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return suffix
    raise OutputError(f"{path}: unsupported volume file type; use .nii.gz, .nii, .mha or .nrrd")


def write_volume(
    path: str | os.PathLike,
    array_zyx: np.ndarray,
    geometry: VolumeGeometry,
    dtype: Any = None,
) -> pathlib.Path:
    """Write a 3D volume with its world geometry (origin, spacing, direction) atomically.

    The file is first written under a hidden temporary name in the same folder with the same
    suffix (``.nii.gz`` keeps the writer on compressed NIfTI), then renamed onto ``path``.
    NIfTI stores the geometry in float32, so it reads back to about 1e-6 relative precision.
    SimpleITK writes it where installed, :mod:`inference.imageio_numpy` otherwise (not NRRD).

    Parameters
    ----------
    array_zyx : np.ndarray
        ``(Z, Y, X)``, must equal ``geometry.shape_zyx``. Bool is written as uint8.
    dtype : numpy dtype, optional
        Cast before writing (e.g. ``np.uint8`` for labels, ``np.float32`` for intensities).
    """
    final = pathlib.Path(path)
    suffix = _volume_suffix(final)
    arr = np.asarray(array_zyx)
    if dtype is not None:
        arr = arr.astype(dtype)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if arr.dtype == np.float64:
        logger.debug("%s: writing float64 volume", final)
    if tuple(arr.shape) != tuple(int(s) for s in geometry.shape_zyx):
        raise GeometryError(
            f"{final}: volume of shape {arr.shape} does not match its geometry shape_zyx {tuple(geometry.shape_zyx)}"
        )
    image = ImageData(np.ascontiguousarray(arr), geometry.spacing_xyz_mm, geometry.origin_mm,
                      tuple(np.asarray(geometry.direction).reshape(-1)))
    with atomic_file(final, suffix) as tmp:
        _write_image_file(tmp, image, compress=suffix in (".nii.gz", ".mha", ".nrrd"), what="volume", shown_as=final)
    return final


def read_volume(path: str | os.PathLike) -> tuple[np.ndarray, VolumeGeometry]:
    """Read a 3D scalar volume: ``(array (Z, Y, X), VolumeGeometry)``.

    Raises
    ------
    InputFileError
        Missing or unreadable file, not 3D, or more than one component per voxel.
    """
    file = pathlib.Path(path)
    if not file.is_file():
        raise InputFileError(f"{file}: volume file not found")
    image = _read_image_file(file, "volume")
    if image.dimension != 3:
        raise InputFileError(f"{file}: expected a 3D volume, found {image.dimension}D")
    if image.components != 1:
        raise InputFileError(f"{file}: expected one value per voxel, found {image.components}")
    direction = image.direction_matrix()
    return image.array, VolumeGeometry(image.array.shape, image.spacing, image.origin, tuple(map(tuple, direction)))
