"""A registration's results as DICOM objects in the patient's study (``hipatlas dicom-export``,
``hipatlas register --dicom-out``).

From a registration output folder (``measurements.json``, ``femur_surface.stl``,
``overlay_<view>.png``, ``report.json``) and the DICOM radiographs it was made from, write:

* ``measurements_sr.dcm``: Comprehensive 3D SR holding a TID 1500 Measurement Report (highdicom):
  the femoral head (hip centre as a 3D point in the radiographs' frame of reference, head radius)
  and the proximal femur (femoral offset, neck-shaft angle, vertical offset), coded concepts with
  UCUM units, the device observer (HipAtlas, model id) and the algorithm (software and model
  version) as observer context, the two radiographs as evidence;
* ``report_pdf.dcm``: the planning report PDF as Encapsulated PDF, when the output folder holds
  one (``hipatlas register`` does not make a PDF; the workstation's export does);
* ``overlay_<view>.dcm``: each overlay (the radiograph with the registered femur's contour) as an
  RGB Secondary Capture image that names its radiograph as source image;
* ``gsps_<view>.dcm``: a Grayscale Softcopy Presentation State over each original radiograph: the
  outline of the registered femur's projection (from ``femur_labels.nii.gz`` and the view's
  projection matrix from its geometry tags), the projected hip centre, shaft and neck axes, and a
  line of text with the measurements, as graphics a PACS viewer draws over the radiograph;
* ``femur_surface_stl.dcm``: the femur surface as Encapsulated STL (model/stl, mm, LPS) in the
  radiographs' frame of reference.

Every object gets the source study's Study Instance UID and patient module, and new SOP Instance
UIDs that depend only on the source images and the content (:func:`inference.dicom_case.hipatlas_uid`),
so exporting the same results again gives the same UIDs and a PACS keeps one copy.

Concepts without a standard code (femoral offset, neck-shaft angle, vertical offset) use the private
coding scheme ``99HIPATLAS``, declared in each SR's Coding Scheme Identification Sequence.
"""

from __future__ import annotations

import datetime
import logging
import os
import pathlib
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from inference import __version__
from inference.checksums import sha256_file
from inference.dicom_case import hipatlas_uid, radiographs_in
from inference.errors import InputFileError, OutputError

logger = logging.getLogger(__name__)

__all__ = ["PRIVATE_SCHEME", "MEASUREMENT_CONCEPTS", "export_results", "source_radiographs"]

PRIVATE_SCHEME = "99HIPATLAS"
ENCAPSULATED_PDF = "1.2.840.10008.5.1.4.1.1.104.1"
ENCAPSULATED_STL = "1.2.840.10008.5.1.4.1.1.104.3"
MANUFACTURER = "HipAtlas developers"
#: Series numbers of the exported objects (kept apart from the radiographs' own series).
SERIES_NUMBERS = {"sr": 901, "pdf": 902, "overlay": 903, "stl": 904, "gsps": 905}
#: Longest contour polyline in a presentation state (points); longer outlines are thinned evenly.
MAX_CONTOUR_POINTS = 600


def _code(value: str, meaning: str, scheme: str = PRIVATE_SCHEME) -> Any:
    from highdicom.sr import CodedConcept

    return CodedConcept(value=value, scheme_designator=scheme, meaning=meaning)


def _measurement_concepts() -> dict[str, tuple[Any, Any]]:
    """measurements.json key -> (concept name, UCUM unit): the one table to extend."""
    from pydicom.sr.codedict import codes

    mm, degree = codes.UCUM.Millimeter, codes.UCUM.Degree
    return {
        "head_radius_mm": (codes.SCT.Radius, mm),
        "femoral_offset_mm": (_code("FO", "Femoral offset"), mm),
        "neck_shaft_angle_deg": (_code("NSA", "Femoral neck-shaft angle"), degree),
        "vertical_offset_mm": (_code("VO", "Vertical offset, head centre to lesser trochanter"), mm),
    }


MEASUREMENT_CONCEPTS = ("head_radius_mm", "femoral_offset_mm", "neck_shaft_angle_deg", "vertical_offset_mm")


def source_radiographs(source: str | os.PathLike) -> list[Any]:
    """The DICOM radiographs (full datasets without pixel data) of a case folder or DICOM folder."""
    folder = pathlib.Path(source)
    if not folder.is_dir():
        raise InputFileError(f"{folder}: not a folder; give the case folder (or a folder of its DICOM images)")
    files = [p for p in sorted(folder.rglob("*")) if p.is_file() and _is_dicom(p)]
    images = [ds for _, ds in radiographs_in(files)]
    if not images:
        raise InputFileError(
            f"{folder}: holds no DICOM radiographs; DICOM results must reference the source study, so the case "
            "must have been made from DICOM images (e.g. by `hipatlas pacs get`)")
    studies = {str(ds.StudyInstanceUID) for ds in images}
    if len(studies) != 1:
        raise InputFileError(f"{folder}: the radiographs belong to {len(studies)} studies; expected one")
    return images


def _is_dicom(path: pathlib.Path) -> bool:
    with open(path, "rb") as handle:
        handle.seek(128)
        return handle.read(4) == b"DICM"


def _copy_patient_and_study(target: Any, source: Any) -> None:
    for keyword in ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex",
                    "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "AccessionNumber",
                    "ReferringPhysicianName", "StudyDescription"):
        if keyword in source:
            setattr(target, keyword, source.get(keyword))
        elif keyword not in target:
            setattr(target, keyword, "")


def _now() -> tuple[str, str]:
    now = datetime.datetime.now()
    return now.strftime("%Y%m%d"), now.strftime("%H%M%S")


def _frame_of_reference(images: Sequence[Any], key: str) -> str:
    uids = {str(ds.get("FrameOfReferenceUID", "")) for ds in images} - {""}
    return uids.pop() if len(uids) == 1 else hipatlas_uid("frame", key)


def _sr(images: Sequence[Any], measurements: dict, report: dict, key: str, frame_uid: str) -> Any:
    from highdicom import sr
    from pydicom.sr.codedict import codes

    concepts = _measurement_concepts()
    side = measurements.get("side", "right")
    laterality = codes.SCT.Right if side == "right" else codes.SCT.Left
    model = report.get("model", {}) if isinstance(report.get("model"), dict) else {}
    model_name = str(model.get("name") or model.get("id") or "unknown model")
    model_sha = str(model.get("sha256") or "")
    device = sr.DeviceObserverIdentifyingAttributes(
        uid=hipatlas_uid("device", __version__, model_sha), name="HipAtlas", manufacturer_name=MANUFACTURER,
        model_name=model_name[:64])
    context = sr.ObservationContext(observer_device_context=sr.ObserverContext(
        observer_type=codes.DCM.Device, observer_identifying_attributes=device))
    algorithm = sr.AlgorithmIdentification(
        name="HipAtlas", version=__version__,
        parameters=[f"model {model_name}"] + ([f"model sha256 {model_sha}"] if model_sha else []))
    source_images = [sr.SourceImageForMeasurementGroup.from_source_image(ds) for ds in images]

    def measurement(name: str) -> Any:
        concept, unit = concepts[name]
        return sr.Measurement(name=concept, value=float(measurements[name]), unit=unit, algorithm_id=algorithm)

    head = sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=sr.TrackingIdentifier(uid=hipatlas_uid("track-head", key), identifier="femoral head"),
        referenced_region=sr.ImageRegion3D(graphic_type=sr.GraphicTypeValues3D.POINT,
                                           graphic_data=np.asarray([measurements["hip_centre_mm"]], dtype=float),
                                           frame_of_reference_uid=frame_uid),
        finding_type=codes.SCT.HeadOfFemur, algorithm_id=algorithm,
        finding_sites=[sr.FindingSite(codes.SCT.HeadOfFemur, laterality=laterality)],
        geometric_purpose=codes.DCM.Center,
        measurements=[measurement("head_radius_mm")])
    femur = sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=sr.TrackingIdentifier(uid=hipatlas_uid("track-femur", key), identifier="proximal femur"),
        finding_type=codes.SCT.Femur, algorithm_id=algorithm,
        finding_sites=[sr.FindingSite(codes.SCT.Femur, laterality=laterality)],
        measurements=[measurement(n) for n in MEASUREMENT_CONCEPTS[1:] if measurements.get(n) is not None],
        source_images=source_images)
    content = sr.MeasurementReport(observation_context=context,
                                   procedure_reported=codes.DCM.GenericPlanningForHipReplacement,
                                   imaging_measurements=[head, femur])
    document = sr.Comprehensive3DSR(
        evidence=list(images), content=content, series_instance_uid=hipatlas_uid("series-sr", key),
        series_number=SERIES_NUMBERS["sr"], sop_instance_uid=hipatlas_uid("sr", key), instance_number=1,
        manufacturer=MANUFACTURER, is_complete=True, is_final=False, is_verified=False,
        series_description="HipAtlas measurements (research use only)")
    document.SoftwareVersions = __version__
    from pydicom import Dataset

    scheme = Dataset()
    scheme.CodingSchemeDesignator = PRIVATE_SCHEME
    scheme.CodingSchemeName = "HipAtlas hip planning measurements"
    scheme.CodingSchemeResponsibleOrganization = MANUFACTURER
    document.CodingSchemeIdentificationSequence = [scheme]
    return document


def _encapsulated(images: Sequence[Any], payload: bytes, *, kind: str, mime: str, sop_class: str, modality: str,
                  title: str, key: str, frame_uid: str | None = None) -> Any:
    """An Encapsulated Document (PDF, STL) in the source study."""
    from pydicom import Dataset
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    sop_uid = hipatlas_uid(kind, key)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
    _copy_patient_and_study(ds, images[0])
    ds.Modality = modality
    ds.SeriesInstanceUID = hipatlas_uid(f"series-{kind}", key)
    ds.SeriesNumber = SERIES_NUMBERS[kind]
    ds.SeriesDescription = title
    ds.InstanceNumber = 1
    ds.ContentDate, ds.ContentTime = _now()
    ds.AcquisitionDateTime = ds.ContentDate + ds.ContentTime
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = "HipAtlas"
    ds.DeviceSerialNumber = "0"
    ds.SoftwareVersions = __version__
    ds.BurnedInAnnotation = "YES" if mime == "application/pdf" else "NO"
    ds.DocumentTitle = title
    ds.ConceptNameCodeSequence = []
    ds.MIMETypeOfEncapsulatedDocument = mime
    ds.EncapsulatedDocumentLength = len(payload)
    # OB values have even length; the true length is EncapsulatedDocumentLength.
    ds.EncapsulatedDocument = payload + (b"\x00" if len(payload) % 2 else b"")
    sources = []
    for image in images:
        item = Dataset()
        item.ReferencedSOPClassUID = image.SOPClassUID
        item.ReferencedSOPInstanceUID = image.SOPInstanceUID
        sources.append(item)
    ds.SourceInstanceSequence = sources
    if frame_uid is not None:
        from pydicom.sr.codedict import codes

        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        unit = Dataset()
        unit.CodeValue, unit.CodingSchemeDesignator, unit.CodeMeaning = (
            codes.UCUM.Millimeter.value, "UCUM", codes.UCUM.Millimeter.meaning)
        ds.MeasurementUnitsCodeSequence = [unit]
    return ds


def _overlay(image: Any, rgb: np.ndarray, key: str, index: int, view: str) -> Any:
    from highdicom.sc import SCImage
    from pydicom import Dataset

    sc = SCImage.from_ref_dataset(
        ref_dataset=image, pixel_array=np.ascontiguousarray(rgb, dtype=np.uint8), photometric_interpretation="RGB",
        bits_allocated=8, coordinate_system="PATIENT", series_instance_uid=hipatlas_uid("series-overlay", key),
        series_number=SERIES_NUMBERS["overlay"], sop_instance_uid=hipatlas_uid("overlay", key, view),
        instance_number=index + 1, manufacturer=MANUFACTURER,
        patient_orientation=tuple(image.get("PatientOrientation", ["", ""])) if image.get("PatientOrientation") else None,
        series_description="HipAtlas overlays (research use only)")
    sc.ImageComments = f"{view}: radiograph with the contour of the registered femur (HipAtlas {__version__})"
    sc.BurnedInAnnotation = "NO"  # a contour line, no text
    sc.DerivationDescription = "HipAtlas registration overlay"
    source = Dataset()
    source.ReferencedSOPClassUID = image.SOPClassUID
    source.ReferencedSOPInstanceUID = image.SOPInstanceUID
    sc.SourceImageSequence = [source]
    sc.SoftwareVersions = __version__
    return sc


def _outline_px(labels: np.ndarray, grid: Any, P: np.ndarray, shape_hw: tuple[int, int]) -> list[np.ndarray]:
    """Outlines of the femur label's projection as closed (N, 2) arrays of (u, v) pixel centres: the
    registration's outline polylines (:func:`inference.silhouettes.project_silhouette`), the three
    longest, thinned to :data:`MAX_CONTOUR_POINTS`."""
    from inference.silhouettes import project_silhouette

    outlines = []
    for line in project_silhouette(labels, grid, P, shape_hw).polylines[:3]:
        if len(line) < 20:
            continue
        step = max(1, int(np.ceil(len(line) / MAX_CONTOUR_POINTS)))
        outlines.append(np.vstack([line[:-1:step], line[:1]]))  # closed
    return outlines


def _presentation_state(image: Any, labels: np.ndarray, grid: Any, measurements: dict, key: str, index: int,
                        view: str) -> Any:
    """A GSPS over ``image``: the femur outline and the measurement graphics (see the module docs)."""
    from highdicom.pr import (GraphicAnnotation, GraphicLayer, GraphicObject, GrayscaleSoftcopyPresentationState,
                              TextObject)

    from inference.geometry import project_points, projection_from_dicom

    P, _ = projection_from_dicom(image, name=view)
    rows, cols = int(image.Rows), int(image.Columns)

    def to_dicom(uv: np.ndarray) -> np.ndarray:
        # PIXEL units put 0.0\0.0 at the top-left corner of the first pixel; our (u, v) are pixel centres.
        return np.asarray(uv, dtype=np.float64) + 0.5

    outline_layer = GraphicLayer("FEMUR", order=1, description="outline of the registered femur")
    measure_layer = GraphicLayer("MEASUREMENTS", order=2, description="hip centre, shaft and neck axes")
    outline = [GraphicObject("POLYLINE", to_dicom(points), "PIXEL") for points in _outline_px(labels, grid, P, (rows, cols))]
    def inside(uv: np.ndarray) -> np.ndarray:
        return (uv[:, 0] >= 0) & (uv[:, 0] <= cols - 1) & (uv[:, 1] >= 0) & (uv[:, 1] <= rows - 1)

    graphics = []
    centre_uv = project_points(P, np.asarray(measurements["hip_centre_mm"], dtype=float)[None])
    if inside(centre_uv).all():
        graphics.append(GraphicObject("POINT", to_dicom(centre_uv), "PIXEL"))
    for axis_key, half_length_mm in (("shaft_axis", 80.0), ("neck_axis", 30.0)):
        axis = measurements.get(axis_key)
        if isinstance(axis, dict) and "point_mm" in axis and "direction" in axis:
            point, direction = np.asarray(axis["point_mm"], float), np.asarray(axis["direction"], float)
            # A 3D line projects to a 2D line: keep the part of it that lies on the image.
            along = np.linspace(-half_length_mm, half_length_mm, 161)[:, None]
            uv = project_points(P, point + along * direction)
            uv = uv[inside(uv)]
            if len(uv) >= 2:
                graphics.append(GraphicObject("POLYLINE", to_dicom(uv[[0, -1]]), "PIXEL"))
    parts = [f"head radius {measurements['head_radius_mm']:.1f} mm"]
    for name, label, unit in (("femoral_offset_mm", "offset", "mm"), ("neck_shaft_angle_deg", "neck-shaft", "deg"),
                              ("vertical_offset_mm", "vertical offset", "mm")):
        if measurements.get(name) is not None:
            parts.append(f"{label} {float(measurements[name]):.1f} {unit}")
    text = TextObject("HipAtlas (research use only): " + ", ".join(parts), "PIXEL",
                      bounding_box=(5.0, 5.0, cols - 5.0, min(rows - 5.0, 5.0 + rows * 0.05)))
    annotations = [GraphicAnnotation([image], outline_layer, graphic_objects=outline or None),
                   GraphicAnnotation([image], measure_layer, graphic_objects=graphics, text_objects=[text])]
    if not outline:
        annotations = annotations[1:]
        logger.warning("%s: the registered femur does not project onto the radiograph; no outline", view)
    return GrayscaleSoftcopyPresentationState(
        referenced_images=[image], series_instance_uid=hipatlas_uid("series-gsps", key),
        series_number=SERIES_NUMBERS["gsps"], sop_instance_uid=hipatlas_uid("gsps", key, view),
        instance_number=index + 1, manufacturer=MANUFACTURER, manufacturer_model_name="HipAtlas",
        software_versions=__version__, device_serial_number="0", content_label=f"HIPATLAS_{index + 1}",
        content_description=f"HipAtlas femur outline and measurements, {view}"[:64],
        graphic_annotations=annotations, graphic_layers=[outline_layer, measure_layer])


def _match_overlay(view_name: str, images_by_sha: dict[str, Any], report: dict) -> Any:
    """The source radiograph of an overlay: by the image checksum report.json gives, else by view name."""
    for view in report.get("views", []):
        if view.get("name") == view_name and view.get("image_sha256") in images_by_sha:
            return images_by_sha[view["image_sha256"]]
    images = list(images_by_sha.values())
    for ds in images:
        if view_name in (str(ds.get("SeriesDescription", "")), str(ds.get("ViewPosition", ""))):
            return ds
    return None


def export_results(results_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                   source: str | os.PathLike | None = None, pdf: str | os.PathLike | None = None,
                   overwrite: bool = False, anonymise: bool = False, pseudonym: str = "ANONYMOUS",
                   salt: str | None = None) -> dict[str, pathlib.Path]:
    """Write a registration's results as DICOM into ``out_dir`` (atomically).

    Parameters
    ----------
    results_dir : the ``hipatlas register`` output folder.
    source : the case folder (or a folder of its DICOM radiographs); default: ``case_dir`` from
        the results' report.json.
    pdf : a planning report PDF to encapsulate; default: ``planning_report.pdf`` or ``report.pdf``
        in ``results_dir`` when present (none is written otherwise).
    anonymise : de-identify every object (:mod:`inference.deidentify`); the radiographs are then
        exported too, de-identified with the same UID mapping, so that the results' references
        resolve; no PDF is exported (it may print identifiers). ``pseudonym`` replaces the patient's
        name and ID; ``salt`` (kept secret) makes the new UIDs repeatable.

    Returns
    -------
    dict
        Object name (``sr``, ``pdf``, ``stl``, ``overlay_<view>``) -> file written.
    """
    from inference import io

    results = pathlib.Path(results_dir)
    measurements = io.read_json_object(results / "measurements.json", "measurements file")
    report_path = results / "report.json"
    report = io.read_json_object(report_path, "registration report") if report_path.is_file() else {}
    if source is None:
        source = report.get("case_dir")
        if not source:
            raise InputFileError(f"{results}: report.json does not name the case folder; give the source case")
    images = source_radiographs(source)
    images_by_sha = {sha256_file(ds.filename): ds for ds in images}  # to match report.json's views
    content_key = [str(images[0].StudyInstanceUID)] + sorted(str(ds.SOPInstanceUID) for ds in images)
    content_key.append(sha256_file(results / "measurements.json"))
    key = "|".join(content_key)
    frame_uid = _frame_of_reference(images, key)
    objects: dict[str, Any] = {"sr": _sr(images, measurements, report, key, frame_uid)}
    if pdf is None and not anonymise:
        pdf = next((results / n for n in ("planning_report.pdf", "report.pdf") if (results / n).is_file()), None)
        if pdf is None:
            logger.info("%s: no planning report PDF; none exported (the workstation's export makes one)", results)
    if pdf is not None and anonymise:
        raise InputFileError(f"{pdf}: a PDF cannot be de-identified here; export it from the workstation with "
                             "'anonymise' instead")
    if pdf is not None:
        data = pathlib.Path(pdf).read_bytes()
        if not data.startswith(b"%PDF"):
            raise InputFileError(f"{pdf}: not a PDF file")
        objects["pdf"] = _encapsulated(images, data, kind="pdf", mime="application/pdf", sop_class=ENCAPSULATED_PDF,
                                       modality="DOC", title="HipAtlas planning report", key=key)
    surface = results / "femur_surface.stl"
    if surface.is_file():
        objects["stl"] = _encapsulated(images, surface.read_bytes(), kind="stl", mime="model/stl",
                                       sop_class=ENCAPSULATED_STL, modality="M3D",
                                       title="HipAtlas femur surface (mm, patient LPS)", key=key, frame_uid=frame_uid)
    for index, overlay in enumerate(sorted(results.glob("overlay_*.png"))):
        view = overlay.stem[len("overlay_"):]
        names = [v.get("name", "") for v in report.get("views", [])]
        view_name = next((n for n in names if io.safe_name(n) == view), view)
        image = _match_overlay(view_name, images_by_sha, report)
        if image is None:
            raise InputFileError(f"{overlay}: no source radiograph for view {view_name!r}")
        from PIL import Image

        rgb = np.asarray(Image.open(overlay).convert("RGB"))
        objects[f"overlay_{view}"] = _overlay(image, rgb, key, index, view_name)
    labels_path = results / "femur_labels.nii.gz"
    if labels_path.is_file():
        labels, grid = io.read_volume(labels_path)
        for index, image in enumerate(sorted(images, key=lambda ds: int(ds.get("SeriesNumber", 0) or 0))):
            view = str(image.get("SeriesDescription", "") or image.get("ViewPosition", "") or f"view{index + 1}")
            objects[f"gsps_{re.sub(r'[^A-Za-z0-9_-]+', '_', view)}"] = _presentation_state(
                image, labels, grid, measurements, key, index, view)
    if anonymise:
        import pydicom

        from inference.deidentify import Deidentifier

        for index, ds in enumerate(images):
            if str(ds.get("BurnedInAnnotation", "NO")).upper() != "NO":
                raise InputFileError(f"{ds.filename}: BurnedInAnnotation is not NO; the radiograph may show "
                                     "identifiers in its pixels, which de-identification cannot remove")
            objects[f"radiograph_{index + 1}"] = pydicom.dcmread(ds.filename)
        deidentify = Deidentifier(pseudonym=pseudonym, salt=salt)
        objects = {name: deidentify(ds) for name, ds in objects.items()}
    written: dict[str, pathlib.Path] = {}
    try:
        with io.atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
            for name, ds in objects.items():
                file_name = {"sr": "measurements_sr.dcm", "pdf": "report_pdf.dcm",
                             "stl": "femur_surface_stl.dcm"}.get(name, f"{name}.dcm")
                ds.save_as(tmp / file_name, enforce_file_format=True)
                written[name] = pathlib.Path(out_dir) / file_name
    except OSError as exc:
        raise OutputError(f"{out_dir}: cannot write the DICOM results ({exc})") from exc
    return written
