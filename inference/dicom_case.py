"""HipAtlas cases as DICOM radiograph studies, and back.

:func:`geometry_tags` turns a view's projection matrix ``P`` into the DICOM X-ray geometry tags
that :func:`inference.geometry.projection_from_dicom` reads, so that a case can be stored in a PACS
as a DX study and retrieved as a case again with the same cameras. :func:`case_to_dicom` writes a
case folder as such a study (one series per view); :func:`study_to_case` turns the radiographs of a
retrieved study into a case folder whose views are calibrated from those tags.

What the tags can hold, and so what round-trips
------------------------------------------------
DICOM places the world origin at the C-arm isocentre (a point on each view's central ray) and
describes each view by SDD, SID, two positioner angles, the pixel pitch, the isocentre's projection
and whether the image was mirrored. A case's ``P`` is an arbitrary pinhole camera in an arbitrary
world frame, so:

* the world origin moves to the point where the two central rays meet (the midpoint of their
  closest approach); the retrieved ``P`` equals ``P @ translate(origin)`` (the same cameras in a
  shifted world frame, which the case format allows);
* only ``SDD / pitch`` is fixed by ``P``; the physical SDD is taken from the usual normalisation of
  ``P`` (``||P[2, :3]|| = 1 / SDD``) when that is plausible, else 1000 mm, unless given;
* a camera that DICOM cannot describe -- an in-plane rotated detector, skewed pixels, or central
  rays that miss each other by more than :data:`MAX_RAY_GAP_MM` -- is refused with a
  :class:`~inference.errors.GeometryError` rather than stored wrongly.

Images are written MONOCHROME2 (larger = more attenuation, the case convention) as 16-bit
unsigned pixels, uncompressed (Explicit VR Little Endian).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import logging
import math
import os
import pathlib
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from inference import __version__
from inference.errors import CaseFormatError, GeometryError, InputFileError

logger = logging.getLogger(__name__)

__all__ = [
    "DX_SOP_CLASS_UID",
    "MAX_RAY_GAP_MM",
    "PatientInfo",
    "case_to_dicom",
    "case_world_origin",
    "geometry_tags",
    "hipatlas_uid",
    "patient_orientation",
    "study_to_case",
]

#: Digital X-Ray Image Storage - For Presentation.
DX_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.1.1"
#: The two central rays of a case may pass this far apart and still share one DICOM isocentre.
MAX_RAY_GAP_MM = 0.5
#: Largest allowed disagreement between ``P`` and the camera the tags describe (pixels).
MAX_TAG_RESIDUAL_PX = 1e-3
#: SDD used when the scale of ``P`` does not tell it (mm).
DEFAULT_SDD_MM = 1000.0
RADIOGRAPH_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.1": "CR",
    "1.2.840.10008.5.1.4.1.1.1.1": "DX",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "DX",
    "1.2.840.10008.5.1.4.1.1.12.1": "XA",
    "1.2.840.10008.5.1.4.1.1.12.2": "RF",
}
_IMAGE_MODALITIES = ("DX", "CR", "XA", "RF")


def hipatlas_uid(*parts: Any) -> str:
    """A DICOM UID that depends only on ``parts`` (``2.25.<integer>`` of a SHA-256).

    The same inputs always give the same UID, so storing the same object again replaces it in the
    PACS instead of making a duplicate.
    """
    digest = hashlib.sha256("\x1f".join(str(p) for p in ("hipatlas",) + parts).encode("utf-8")).digest()
    # 2.25 UIDs are decimal integers of at most 128 bits (PS3.5 B.2); 39 digits + "2.25." < 64 chars.
    return "2.25." + str(int.from_bytes(digest[:16], "big"))


@dataclasses.dataclass(frozen=True)
class PatientInfo:
    """Patient and study identity written into the DICOM objects."""

    patient_id: str = "HIPATLAS-DEMO"
    patient_name: str = "HIPATLAS^DEMO"
    patient_birth_date: str = ""
    patient_sex: str = "O"
    study_date: str = "20260101"
    study_time: str = "120000"
    accession_number: str = ""
    study_description: str = "HipAtlas biplanar hip radiographs"
    referring_physician_name: str = ""

    def __post_init__(self) -> None:
        if not self.patient_id.strip():
            raise CaseFormatError("PatientInfo patient_id must not be empty")
        if not re.fullmatch(r"\d{8}", self.study_date):
            raise CaseFormatError(f"PatientInfo study_date must be YYYYMMDD, not {self.study_date!r}")


# ----------------------------------------------------------------------------- geometry
def _ds(value: float) -> str:
    # DS strings hold at most 16 characters; 10 significant digits keep ~1e-10 relative precision.
    text = format(float(value), ".10g")
    if len(text) > 16:
        text = format(float(value), ".8g")
    return text


def patient_orientation(e_u: Sequence[float], e_v: Sequence[float]) -> list[str]:
    """DICOM PatientOrientation (0020,0020) of image axes given as LPS unit vectors.

    Each value names the patient directions of increasing column (row direction) and increasing
    row, strongest component first (PS3.3 C.7.6.1.1.1), e.g. ``["L", "F"]`` for an AP radiograph.
    """
    def letters(vector: Sequence[float]) -> str:
        names = (("R", "L"), ("A", "P"), ("F", "H"))
        order = np.argsort(-np.abs(np.asarray(vector, dtype=float)))
        text = ""
        for axis in order:
            component = float(vector[axis])
            if abs(component) > 1e-3:
                text += names[axis][1 if component > 0 else 0]
        return text

    return [letters(e_u), letters(e_v)]


def case_world_origin(projections: Sequence[np.ndarray]) -> tuple[np.ndarray, float]:
    """The common isocentre of two views: the midpoint of their central rays' closest approach.

    Returns
    -------
    origin_mm : ndarray, shape (3,)
    gap_mm : float
        How far apart the two central rays pass.
    """
    from inference.geometry import view_pair_check

    if len(projections) != 2:
        raise GeometryError(f"a biplanar study needs two views, not {len(projections)}")
    report = view_pair_check(projections[0], projections[1])
    return np.asarray(report.midpoint_mm, dtype=float), float(report.closest_approach_mm)


def geometry_tags(P: Any, rows: int, cols: int, origin_mm: Sequence[float], *, name: str = "view",
                  sdd_mm: float | None = None) -> dict[str, Any]:
    """DICOM geometry attributes (keyword -> value) that describe the camera ``P``.

    Parameters
    ----------
    P : array_like, shape (3, 4)
    rows, cols : int
        Image size in pixels.
    origin_mm : 3 floats
        World point that becomes the DICOM isocentre (on the central ray; see the module docs).
    name : str
        View name for messages.
    sdd_mm : float, optional
        Physical source-to-detector distance; by default read from the scale of ``P``.

    Raises
    ------
    GeometryError
        The camera cannot be written as DICOM geometry tags (in-plane detector rotation, skewed
        pixels, isocentre off the central ray); the message says which.
    """
    from inference.geometry import (CArmView, decompose, principal_direction, project_points,
                                    projection_matrix, source_position, validate_projection_matrix)

    matrix = validate_projection_matrix(P, f"view {name!r} projection_matrix")
    origin = np.asarray(origin_mm, dtype=float).reshape(3)
    intrinsics, rotation, _ = decompose(matrix)
    f_u, f_v, skew = float(intrinsics[0, 0]), float(intrinsics[1, 1]), float(intrinsics[0, 1])
    if abs(skew) > 1e-6 * f_u:
        raise GeometryError(f"view {name!r}: the projection matrix has skewed pixels (skew {skew:.3g} px), "
                            "which DICOM geometry tags cannot describe")
    source = source_position(matrix)
    n = principal_direction(matrix)
    if sdd_mm is None:
        scale_sdd = 1.0 / float(np.linalg.norm(matrix[2, :3]))
        sdd_mm = scale_sdd if 200.0 <= scale_sdd <= 3000.0 else DEFAULT_SDD_MM
    to_origin = origin - source
    sid_mm = float(to_origin @ n)
    off_axis_mm = float(np.linalg.norm(to_origin - sid_mm * n))
    if off_axis_mm > MAX_RAY_GAP_MM:
        raise GeometryError(
            f"view {name!r}: the isocentre is {off_axis_mm:.1f} mm off this view's central ray; the two "
            "views do not share a C-arm isocentre, which DICOM geometry tags need")
    cranial_deg = math.degrees(math.asin(max(-1.0, min(1.0, float(n[2])))))
    lao_deg = math.degrees(math.atan2(-float(n[0]), float(n[1])))
    mirrored = float(np.linalg.det(rotation)) < 0.0
    c_u, c_v = float(intrinsics[0, 2]), float(intrinsics[1, 2])
    try:
        view = CArmView(sdd_mm=sdd_mm, sid_mm=sid_mm, lao_deg=lao_deg, cranial_deg=cranial_deg, rows=rows,
                        cols=cols, pixel_mm=sdd_mm / f_u, pixel_v_mm=sdd_mm / f_v, principal_point_px=(c_u, c_v),
                        isocentre_mm=tuple(origin), viewed_from="detector" if mirrored else "source")
    except GeometryError as error:
        raise GeometryError(f"view {name!r}: cannot describe this camera with DICOM geometry tags: {error}") from None
    # The tags have no in-plane detector rotation: check that they reproduce P before trusting them.
    probe = origin + np.array([[0, 0, 0], [80, 0, 0], [0, 80, 0], [0, 0, 80], [-60, 40, -70]], dtype=float)
    residual_px = float(np.max(np.abs(project_points(projection_matrix(view), probe)
                                      - project_points(matrix, probe))))
    if residual_px > MAX_TAG_RESIDUAL_PX:
        raise GeometryError(
            f"view {name!r}: the detector is rotated in its own plane (tags reproduce P only to "
            f"{residual_px:.2f} px); DICOM geometry tags cannot describe it")
    frame = view.frame()
    magnification = view.sdd_mm / view.sid_mm
    pitch_u, pitch_v = view.pitch_uv_mm
    # PositionOfIsocenterProjection is in detector elements (before any mirroring), [along v, along u].
    along_u = (cols - 1.0 - c_u) if not mirrored else c_u
    primary_deg = lao_deg + 180.0
    primary_deg = primary_deg - 360.0 if primary_deg > 180.0 else primary_deg
    return {
        "ImagerPixelSpacing": [_ds(pitch_v), _ds(pitch_u)],
        # PixelSpacing is the pitch in the isocentre plane (PS3.3 C.8.11.7): ImagerPixelSpacing / magnification.
        "PixelSpacing": [_ds(pitch_v / magnification), _ds(pitch_u / magnification)],
        "PixelSpacingCalibrationType": "GEOMETRY",
        "PixelSpacingCalibrationDescription": "isocentre plane, from SDD and SID",
        "DistanceSourceToDetector": _ds(view.sdd_mm),
        "DistanceSourceToPatient": _ds(view.sid_mm),
        "EstimatedRadiographicMagnificationFactor": _ds(magnification),
        "PositionerType": "CARM",
        "PositionerPrimaryAngle": _ds(primary_deg),
        "PositionerSecondaryAngle": _ds(cranial_deg),
        "PositionOfIsocenterProjection": [float(c_v), float(along_u)],  # VR FL (32-bit): ~1e-5 px
        "FieldOfViewHorizontalFlip": "NO" if mirrored else "YES",
        "FieldOfViewRotation": "0",
        "PatientOrientation": patient_orientation(frame["e_u"], frame["e_v"]),
    }


# ----------------------------------------------------------------------------- case -> DICOM
def _view_position(P: np.ndarray) -> str:
    from inference.geometry import principal_direction

    n = principal_direction(P)
    axis = int(np.argmax(np.abs(n)))
    if axis == 1:
        return "AP" if n[1] > 0 else "PA"
    if axis == 0:
        return "LL" if n[0] > 0 else "RL"  # beam towards the patient's left: left side at the detector
    return ""


def _image_to_uint16(pixels: np.ndarray) -> np.ndarray:
    from inference.io import _image_to_uint16 as to_uint16

    return to_uint16(pixels)


def case_to_dicom(case_dir: str | os.PathLike, out_dir: str | os.PathLike, *, patient: PatientInfo | None = None,
                  sdd_mm: float | None = None, overwrite: bool = False) -> list[pathlib.Path]:
    """Write a case folder as a DICOM DX study (one series, one image per view) into ``out_dir``.

    UIDs depend only on the patient ID, the case images and geometry, so writing the same case
    again gives the same UIDs (a PACS keeps one copy). The study is written atomically.

    Returns
    -------
    list of pathlib.Path
        The files written (``<view>.dcm``).
    """
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    from inference import io

    patient = patient or PatientInfo()
    case = io.load_case(case_dir)
    projections = [v.P for v in case.views]
    origin, gap_mm = case_world_origin(projections)
    if gap_mm > MAX_RAY_GAP_MM:
        raise GeometryError(
            f"{case.case_dir}: the central rays of the two views pass {gap_mm:.1f} mm apart; DICOM geometry tags "
            "need one isocentre shared by both views")
    case_key = [patient.patient_id] + [v.image.sha256 for v in case.views] + [np.round(p, 9).tobytes().hex()
                                                                            for p in projections]
    study_uid = hipatlas_uid("study", *case_key)
    frame_uid = hipatlas_uid("frame", *case_key)
    written: list[pathlib.Path] = []
    with io.atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        for index, view in enumerate(case.views):
            rows, cols = view.image.shape
            tags = geometry_tags(view.P, rows, cols, origin, name=view.name, sdd_mm=sdd_mm)
            series_uid = hipatlas_uid("series", index, *case_key)
            sop_uid = hipatlas_uid("image", index, *case_key)
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = DX_SOP_CLASS_UID
            meta.MediaStorageSOPInstanceUID = sop_uid
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            meta.ImplementationVersionName = f"HIPATLAS_{__version__}"[:16]
            ds = pydicom.Dataset()
            ds.file_meta = meta
            ds.SpecificCharacterSet = "ISO_IR 192"
            ds.SOPClassUID = DX_SOP_CLASS_UID
            ds.SOPInstanceUID = sop_uid
            ds.StudyInstanceUID = study_uid
            ds.SeriesInstanceUID = series_uid
            ds.FrameOfReferenceUID = frame_uid
            ds.PatientName = patient.patient_name
            ds.PatientID = patient.patient_id
            ds.PatientBirthDate = patient.patient_birth_date
            ds.PatientSex = patient.patient_sex
            ds.StudyDate = ds.SeriesDate = ds.ContentDate = patient.study_date
            ds.StudyTime = ds.SeriesTime = ds.ContentTime = patient.study_time
            ds.AccessionNumber = patient.accession_number
            ds.ReferringPhysicianName = patient.referring_physician_name
            ds.StudyID = "1"
            ds.StudyDescription = patient.study_description
            ds.Modality = "DX"
            ds.SeriesNumber = index + 1
            ds.InstanceNumber = 1
            ds.SeriesDescription = view.name
            ds.Manufacturer = "HipAtlas"
            ds.ManufacturerModelName = "hipatlas case_to_dicom"
            ds.SoftwareVersions = __version__
            ds.BodyPartExamined = "HIP"
            ds.ImageLaterality = ds.Laterality = "R" if case.side == "right" else "L"
            ds.ViewPosition = _view_position(view.P)
            ds.PresentationIntentType = "FOR PRESENTATION"
            ds.ImageType = ["DERIVED", "PRIMARY"]
            ds.DetectorType = "DIRECT"
            ds.BurnedInAnnotation = "NO"
            for keyword, value in tags.items():
                setattr(ds, keyword, value)
            pixels = _image_to_uint16(view.image.pixels)
            ds.SamplesPerPixel = 1
            ds.PhotometricInterpretation = "MONOCHROME2"
            ds.Rows, ds.Columns = rows, cols
            ds.BitsAllocated = ds.BitsStored = 16
            ds.HighBit = 15
            ds.PixelRepresentation = 0
            ds.PixelIntensityRelationship = "LIN"
            ds.PixelIntensityRelationshipSign = 1
            ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", "1", "US"
            ds.WindowCenter = _ds((float(pixels.min()) + float(pixels.max())) / 2.0)
            ds.WindowWidth = _ds(max(1.0, float(pixels.max()) - float(pixels.min())))
            ds.LossyImageCompression = "00"
            ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()
            path = tmp / f"{io.safe_name(view.name, 'view' + str(index)).lower()}.dcm"
            ds.save_as(path, enforce_file_format=True)
            written.append(path)
    final = pathlib.Path(out_dir)
    return [final / p.name for p in written]


# ----------------------------------------------------------------------------- DICOM -> case
def _read_header(path: pathlib.Path) -> Any:
    import pydicom

    try:
        return pydicom.dcmread(str(path), stop_before_pixels=True, force=True)
    except Exception as exc:  # pydicom raises many kinds on garbage
        raise InputFileError(f"{path}: cannot read the DICOM file ({exc})") from exc


def radiographs_in(files: Iterable[str | os.PathLike]) -> list[tuple[pathlib.Path, Any]]:
    """The projection radiographs (DX/CR/XA/RF) among DICOM files, as (path, header)."""
    found = []
    for name in files:
        path = pathlib.Path(name)
        ds = _read_header(path)
        modality = str(ds.get("Modality", "")).upper()
        sop_class = str(ds.get("SOPClassUID", ""))
        if modality in _IMAGE_MODALITIES or sop_class in RADIOGRAPH_SOP_CLASSES:
            found.append((path, ds))
    return found


def _view_name(ds: Any, index: int, taken: set[str]) -> str:
    for keyword in ("SeriesDescription", "ViewPosition"):
        text = str(ds.get(keyword, "") or "").strip()
        if text and text not in taken:
            return text
    return f"view{index + 1}"


def study_to_case(files: Sequence[str | os.PathLike], out_dir: str | os.PathLike, *, side: str | None = None,
                  series_uids: Sequence[str] | None = None, provenance: Mapping[str, Any] | None = None,
                  overwrite: bool = False) -> pathlib.Path:
    """Make a case folder from two DICOM radiographs (e.g. a study retrieved from a PACS).

    The radiographs are copied into the case (``<view>.dcm``) and case.json names them without a
    ``projection_matrix``, so each view is calibrated from its DICOM geometry tags; every view's
    geometry is checked first, and a missing tag is named. ``dicom_source.json`` records the study,
    series, SOP instances and the calibration source of each view. Written atomically: on any
    error or interruption no folder is left.

    Parameters
    ----------
    files : DICOM files (other objects such as SRs among them are ignored).
    side : "right" or "left"; default from ImageLaterality / Laterality.
    series_uids : the two series to use when the study holds more than two radiographs.
    provenance : extra facts for dicom_source.json (e.g. the PACS it came from).
    """
    from inference import io
    from inference.geometry import projection_from_dicom

    images = radiographs_in(files)
    if series_uids:
        wanted = [str(u) for u in series_uids]
        images = [(p, ds) for p, ds in images if str(ds.get("SeriesInstanceUID", "")) in wanted]
    if len(images) != 2:
        raise InputFileError(
            f"a case needs exactly two radiographs (DX/CR/XA/RF), found {len(images)}"
            + ("; choose two series" if len(images) > 2 else ""))
    images.sort(key=lambda item: (int(item[1].get("SeriesNumber", 0) or 0), int(item[1].get("InstanceNumber", 0) or 0)))
    studies = {str(ds.get("StudyInstanceUID", "")) for _, ds in images}
    if len(studies) != 1:
        raise InputFileError("the two radiographs belong to different studies; choose two views of one study")
    if side is None:
        lateralities = {str(ds.get("ImageLaterality", "") or ds.get("Laterality", "") or "").upper() for _, ds in images}
        lateralities.discard("")
        if lateralities == {"R"}:
            side = "right"
        elif lateralities == {"L"}:
            side = "left"
        else:
            raise CaseFormatError("the radiographs do not say which hip (ImageLaterality (0020,0062) is "
                                  f"{sorted(lateralities) or 'missing'}); give the side")
    views, records, taken = [], [], set()
    for index, (path, ds) in enumerate(images):
        name = _view_name(ds, index, taken)
        taken.add(name)
        _, calibration = projection_from_dicom(ds, name=f"{path.name} ({name})")  # names a missing tag
        file_name = f"{io.safe_name(name, 'view' + str(index)).lower()}.dcm"
        views.append({"name": name, "image": file_name})
        records.append({"view": name, "image": file_name, "sop_instance_uid": str(ds.get("SOPInstanceUID", "")),
                        "series_instance_uid": str(ds.get("SeriesInstanceUID", "")),
                        "sop_class_uid": str(ds.get("SOPClassUID", "")),
                        "calibration": calibration.to_dict()})
    with io.atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        for (path, _), view in zip(images, views):
            (tmp / view["image"]).write_bytes(path.read_bytes())
        io.write_json_atomic(tmp / "case.json", {"format": "hipatlas-case/1", "side": side, "views": views})
        io.write_json_atomic(tmp / "dicom_source.json", {
            "study_instance_uid": studies.pop(),
            "views": records,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            **dict(provenance or {}),
        })
    return pathlib.Path(out_dir)

