"""Real-CT import (``hipatlas prepare-ct``): training samples from a user's own CT and femur labels.

A CT (DICOM series folder, NIfTI or MHA; any orientation, spacing and field of view, in HU) and
its label map become samples of the same ``hipatlas-dataset/1`` format as the synthetic data
(:mod:`inference.data.dataset`), so users who own CTs train with the same pipeline:

1. read both (labels on another grid are resampled onto the CT by physical coordinates);
2. find the femur's canonical frame from its label (:func:`inference.anatomy.femur_landmarks_from_labels`;
   a left femur is mirrored to a right one, as everywhere else);
3. resample CT (linear) and labels (nearest) onto the atlas grid in that frame for the
   ``volume`` / ``labels`` of the sample;
4. render the view pairs (:func:`inference.data.dataset.render_view_pair`) from the *whole* CT
   (expressed in the canonical frame, mirrored for a left femur), so the radiographs hold
   everything the CT holds around the hip, with masks from the whole femur label.

Nothing is written unless everything succeeds; a folder that already holds a compatible data set
gets the new samples appended (each CT is one subject; a subject stays in one split).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import pathlib
import shutil
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from inference.errors import ConfigError, DataError, InputFileError
from inference.validate import choice, positive_int, whole_number

logger = logging.getLogger(__name__)

__all__ = ["read_ct", "read_labels", "femur_frame", "resample_to_grid", "prepare_ct", "load_ct", "LoadedCt", "CtCase",
           "read_case_list", "prepare_ct_list", "FOV_MIN_FRACTION", "CASE_COLUMNS"]

#: The atlas grid must lie at least this much inside the CT's field of view.
FOV_MIN_FRACTION = 0.5
#: HU of space outside the CT's field of view.
OUTSIDE_HU = -1000.0


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------
def _read_dicom_series(folder: pathlib.Path):
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    try:
        series = reader.GetGDCMSeriesIDs(str(folder))
    except RuntimeError as exc:
        raise InputFileError(f"{folder}: cannot list DICOM series ({exc})") from exc
    if not series:
        raise InputFileError(f"{folder}: no DICOM series found in this folder")
    files_by_series = {sid: reader.GetGDCMSeriesFileNames(str(folder), sid) for sid in series}
    chosen = max(series, key=lambda sid: len(files_by_series[sid]))
    if len(series) > 1:
        logger.warning("%s holds %d DICOM series; using the largest (%s, %d slices)", folder, len(series), chosen,
                       len(files_by_series[chosen]))
    files = files_by_series[chosen]
    if len(files) < 2:
        raise InputFileError(f"{folder}: the DICOM series has {len(files)} slice; a CT needs several")
    reader.SetFileNames(files)
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        detail = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unknown reason"
        raise InputFileError(f"{folder}: cannot read the DICOM series ({detail})") from exc
    return image, [pathlib.Path(f) for f in files]


def read_ct(path: str | os.PathLike) -> tuple[np.ndarray, Any, str]:
    """Read a CT in HU from a DICOM series folder, NIfTI, MHA or NRRD file.

    Returns
    -------
    volume : (Z, Y, X) float32, HU (DICOM rescale slope and intercept applied)
    geometry : inference.geometry.VolumeGeometry
    sha256 : str
        Of the file, or of the sorted slice files of a DICOM series.
    """
    from inference.geometry import VolumeGeometry

    source = pathlib.Path(path)
    if source.is_dir():
        import SimpleITK as sitk

        image, files = _read_dicom_series(source)
        if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
            raise InputFileError(f"{source}: the DICOM series is not a 3D greyscale volume")
        volume = sitk.GetArrayFromImage(image).astype(np.float32)
        geometry = VolumeGeometry.from_sitk(image)
        digest = hashlib.sha256()
        from inference.checksums import sha256_file

        for file in sorted(files):
            digest.update(sha256_file(file).encode())
        sha = digest.hexdigest()
    else:
        from inference.checksums import sha256_file
        from inference.io import read_volume

        volume, geometry = read_volume(source)
        volume = volume.astype(np.float32)
        sha = sha256_file(source)
    if not np.all(np.isfinite(volume)):
        raise DataError(f"{source}: the CT holds NaN or infinite values")
    return volume, geometry, sha


def read_labels(path: str | os.PathLike, ct_geometry: Any) -> tuple[np.ndarray, str]:
    """Read a label map and bring it onto the CT grid (nearest neighbour by world position).

    Returns
    -------
    labels : (Z, Y, X) int32 on ``ct_geometry``
    sha256 : str
    """
    labels, geometry, sha = read_ct(path)
    if not np.allclose(labels, np.round(labels)):
        raise DataError(f"{path}: a label map must hold whole numbers (found fractional values)")
    labels = np.round(labels).astype(np.int32)
    same = (tuple(geometry.shape_zyx) == tuple(ct_geometry.shape_zyx)
            and np.allclose(geometry.index_to_world(), ct_geometry.index_to_world(), atol=1e-3))
    if not same:
        logger.info("resampling the label map onto the CT grid")
        labels = _resample_nearest(labels, geometry, ct_geometry)
    return labels, sha


def _resample_nearest(values: np.ndarray, source: Any, target: Any) -> np.ndarray:
    index_map = source.world_to_index() @ target.index_to_world()
    return _map_grid(values, index_map, target.shape_zyx, order=0, cval=0).astype(values.dtype)


def _map_grid(values: np.ndarray, target_index_to_source_index: np.ndarray, shape_zyx, order: int,
              cval: float, chunk: int = 1 << 21) -> np.ndarray:
    """Sample ``values`` (z, y, x) at every voxel of a target grid (chunked over z slabs)."""
    from scipy import ndimage

    nz, ny, nx = (int(s) for s in shape_zyx)
    out = np.empty((nz, ny, nx), dtype=np.float32 if order > 0 else values.dtype)
    matrix = np.asarray(target_index_to_source_index, dtype=np.float64)
    jj, ii = np.meshgrid(np.arange(ny, dtype=np.float64), np.arange(nx, dtype=np.float64), indexing="ij")
    slab = max(1, chunk // (ny * nx))
    for k0 in range(0, nz, slab):
        k1 = min(nz, k0 + slab)
        kk = np.arange(k0, k1, dtype=np.float64)[:, None, None]
        ijk = np.stack(np.broadcast_arrays(ii[None], jj[None], kk)).reshape(3, -1)
        src = matrix[:3, :3] @ ijk + matrix[:3, 3:4]
        out[k0:k1] = ndimage.map_coordinates(values, src[::-1], order=order, mode="constant", cval=cval,
                                             prefilter=False).reshape(k1 - k0, ny, nx)
    return out


# ----------------------------------------------------------------------------------------------
# Femur frame and grid
# ----------------------------------------------------------------------------------------------
def femur_frame(labels: np.ndarray, geometry: Any, side: str, femur_label: int = 1):
    """Landmarks (:class:`inference.anatomy.FemurLandmarks`) of the femur label, in CT world mm.

    Raises
    ------
    DataError
        Empty femur label, or a femur whose head cannot be found (e.g. cut by the field of view).
    """
    from inference import anatomy
    from inference.errors import MeshError

    if side not in ("left", "right"):
        raise ConfigError(f"side must be 'left' or 'right', not {side!r}")
    count = int(np.count_nonzero(labels == femur_label))
    if count == 0:
        present = sorted(int(v) for v in np.unique(labels) if v != 0)[:10]
        raise DataError(f"the label map has no voxel with the femur label {femur_label} (labels present: "
                        f"{present or 'none'}); check --femur-label or the label file")
    try:
        return anatomy.femur_landmarks_from_labels((labels == femur_label).astype(np.uint8), geometry, side, label=1)
    except (MeshError, ValueError) as exc:
        raise DataError(f"the femur label does not look like a proximal femur ({exc}); the femoral head may be "
                        "outside the CT's field of view") from exc


def _check_field_of_view(ct_geometry: Any, grid_in_ct: Any, head_mm: np.ndarray, head_radius_mm: float) -> float:
    """Fraction of the grid inside the CT; raises DataError when the femur is not in view."""
    to_index = ct_geometry.world_to_index()
    size = np.asarray(ct_geometry.shape_zyx[::-1], dtype=np.float64)
    head = to_index[:3, :3] @ head_mm + to_index[:3, 3]
    margin = head_radius_mm / np.asarray(ct_geometry.spacing_xyz_mm)
    if np.any(head - margin < -0.5) or np.any(head + margin > size - 0.5):
        raise DataError("the femoral head is not fully inside the CT's field of view; the CT must include the "
                        "whole head, neck, trochanters and the upper shaft")
    nz, ny, nx = grid_in_ct.shape_zyx
    axes = [np.linspace(0, n - 1, 9) for n in (nx, ny, nz)]
    ii, jj, kk = np.meshgrid(*axes, indexing="ij")
    ijk = np.stack([ii.ravel(), jj.ravel(), kk.ravel()])
    world = grid_in_ct.index_to_world()[:3, :3] @ ijk + grid_in_ct.index_to_world()[:3, 3:4]
    index = to_index[:3, :3] @ world + to_index[:3, 3:4]
    inside = np.all((index >= -0.5) & (index <= size[:, None] - 0.5), axis=0)
    fraction = float(inside.mean())
    if fraction < FOV_MIN_FRACTION:
        raise DataError(f"only {100 * fraction:.0f}% of the proximal femur region lies inside the CT's field of "
                        f"view (at least {100 * FOV_MIN_FRACTION:.0f}% needed); the femur is not in view")
    return fraction


def resample_to_grid(ct_hu: np.ndarray, labels: np.ndarray, ct_geometry_in_grid_world: Any, grid: Any,
                     femur_label: int = 1, pelvis_label: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """CT (linear, -1000 HU outside) and labels (nearest; femur -> 1, pelvis -> 2) on ``grid``."""
    index_map = ct_geometry_in_grid_world.world_to_index() @ grid.index_to_world()
    volume = _map_grid(ct_hu.astype(np.float32), index_map, grid.shape_zyx, order=1, cval=OUTSIDE_HU)
    remapped = np.zeros(labels.shape, dtype=np.uint8)
    remapped[labels == femur_label] = 1
    if pelvis_label is not None:
        remapped[labels == pelvis_label] = 2
    grid_labels = _map_grid(remapped, index_map, grid.shape_zyx, order=0, cval=0)
    return volume.astype(np.float32), grid_labels.astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# prepare-ct
# ----------------------------------------------------------------------------------------------
def _subject_name(path: pathlib.Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    return "".join(c if c.isalnum() or c in "-." else "-" for c in name) or "ct"


def prepare_ct(ct: str | os.PathLike, labels: str | os.PathLike, side: str, out_dir: str | os.PathLike, *,
               grid: str | Any = "compact", pairs: int = 1, geometry: str = "orthogonal", seed: int = 0,
               subject: str | None = None, split: str = "train", femur_label: int = 1,
               pelvis_label: int | None = None, config: Any = None,
               progress: Callable[[int, int], None] | None = None, cancel: Any = None) -> pathlib.Path:
    """Turn one CT and its femur label map into data set samples (appended to ``out_dir``).

    Parameters
    ----------
    ct : path
        DICOM series folder, or a NIfTI / MHA / NRRD file, in HU.
    labels : path
        Label map (any grid overlapping the CT) where ``femur_label`` marks the femur.
    side : {"left", "right"}
        Which femur of the label map; a left femur is mirrored to a right one.
    out_dir : path
        Data set folder (created, or appended to if it holds a compatible data set).
    grid : {"compact", "paper"} or DatasetGrid
    pairs : int
        View pairs (samples) to render from this CT, each with its own views and augmentation.
    geometry : {"orthogonal", "generalised"}
    seed : int
    subject : str, optional
        Subject name in the manifest (default: the CT file or folder name). A subject may not be
        in two splits.
    split : {"train", "val", "test"}
    femur_label, pelvis_label : int
        Label values of the femur and (optionally) the pelvis.
    config : SynthConfig, optional
        View sampling, rendering and augmentation (phantom and split settings are not used).

    Returns
    -------
    pathlib.Path
        The manifest.

    Raises
    ------
    InputFileError, DataError, ConfigError
        Unreadable input, empty label, femur outside the field of view, incompatible folder. No
        file is left behind on error.
    """
    from inference.data import dataset as ds
    from inference.errors import Cancelled

    config, dgrid = _check_options(split, geometry, pairs, seed, config, grid)
    ct_path = pathlib.Path(ct)
    subject = subject or _subject_name(ct_path)
    out = pathlib.Path(out_dir)

    # Check the destination before the expensive work.
    manifest = ds._base_manifest("ct-import", dgrid, _parameters(config))
    manifest["geometry_mode"] = geometry
    existing: list[dict] = []
    if (out / ds.MANIFEST).exists():
        previous = ds.load_manifest(out)
        if previous.get("grid") != manifest["grid"] or previous.get("kind") != "ct-import":
            raise DataError(f"{out} holds a data set of another kind or grid; choose another --out folder")
        if "num_samples" in previous:
            raise DataError(f"{out} was made from a list of CTs (prepare-ct --cases); make a data set of this CT "
                            "in another --out folder and train on both (--data A --data B)")
        if previous.get("parameters") != manifest["parameters"] or previous.get("geometry_mode") != geometry:
            raise DataError(f"{out} was made with other view or augmentation settings; choose another --out folder")
        existing = list(previous["samples"])
        other = {e["split"] for e in existing if e.get("subject") == subject and e.get("split") != split}
        if other:
            raise DataError(f"subject {subject!r} is already in the {sorted(other)[0]} split of {out}; a subject "
                            "must stay in one split (use --subject to name a different CT)")
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out} exists and is not an empty folder or a HipAtlas data set; choose another --out")

    loaded = load_ct(ct_path, labels, side, femur_label, dgrid)
    start = 1 + max([int(e["index"]) for e in existing], default=-1)
    written: list[pathlib.Path] = []
    entries = []
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        for number in range(int(pairs)):
            if ds._is_cancelled(cancel):
                raise Cancelled("CT import was cancelled; nothing was written")
            entry = _write_sample(loaded, out, start + number, number, seed, number, dgrid, config, split, subject,
                                  {"ct": str(ct_path), "labels": str(labels)}, pelvis_label, cancel)
            written.append(out / entry["file"])
            entries.append(entry)
            if progress is not None:
                progress(number + 1, int(pairs))
        all_entries = {int(e["index"]): e for e in existing}
        all_entries.update({e["index"]: e for e in entries})
        ds._write_manifest(out, manifest, all_entries, complete=True)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    logger.info("added %d samples of %s (%s femur) to %s", len(entries), subject, side, out)
    return out / ds.MANIFEST


def _check_options(split: str, geometry: str, pairs: int, seed: int, config: Any, grid: Any) -> tuple[Any, Any]:
    """(config with the view mode, DatasetGrid) after checking the options shared by the two forms."""
    from inference.data import dataset as ds

    if split not in ds.SPLITS:
        raise ConfigError(f"split must be one of {ds.SPLITS}, not {split!r}")
    choice(geometry, "geometry", ds.GEOMETRY_MODES)
    positive_int(pairs, "pairs")
    whole_number(seed, "seed", 0)
    config = config or ds.SynthConfig()
    config = dataclasses.replace(config, views=dataclasses.replace(config.views, mode=geometry))
    return config, (ds.dataset_grid(grid) if isinstance(grid, str) else grid)


def _parameters(config: Any) -> dict:
    return {"kind": "ct-import", "config": {k: v for k, v in config.to_dict().items()
                                           if k not in ("split", "split_fractions")}}


@dataclasses.dataclass(frozen=True)
class LoadedCt:
    """A CT read and checked for import: HU, geometry, label map and the femur's frame."""

    hu: np.ndarray
    geometry: Any
    ct_sha256: str
    label_map: np.ndarray
    labels_sha256: str
    side: str
    femur_label: int
    marks: Any
    to_canonical: np.ndarray
    fov_fraction: float


def load_ct(ct: str | os.PathLike, labels: str | os.PathLike, side: str, femur_label: int, dgrid: Any) -> LoadedCt:
    """Read a CT and its label map, find the femur's frame and check the grid is in view.

    Raises InputFileError or DataError (unreadable file, no femur label, femur out of view).
    """
    ct_hu, ct_geometry, ct_sha = read_ct(ct)
    label_map, labels_sha = read_labels(labels, ct_geometry)
    if not np.any(label_map == femur_label):
        raise DataError(f"{labels}: no voxel with the femur label {femur_label} inside the CT's field of view")
    marks = femur_frame(label_map, ct_geometry, side, femur_label)
    # Canonical frame (mirrored for a left femur): the world of the samples.
    to_canonical = np.asarray(marks.to_canonical, dtype=np.float64)
    grid_in_ct = dgrid.geometry.transformed(np.linalg.inv(to_canonical))
    fov = _check_field_of_view(ct_geometry, grid_in_ct, marks.head_centre_mm, marks.head_radius_mm)
    return LoadedCt(ct_hu, ct_geometry, ct_sha, label_map, labels_sha, side, femur_label, marks, to_canonical, fov)


def _write_sample(loaded: LoadedCt, out: pathlib.Path, index: int, rng_index: int, seed: int, pair: int, dgrid: Any,
                  config: Any, split: str, subject: str, names: dict, pelvis_label: int | None,
                  cancel: Any = None) -> dict:
    """Render sample ``index`` of a CT (random draws of ``(seed, rng_index)``), write its npz to
    ``out`` and return its manifest entry; ``names`` (the CT's and labels' names) go in its source."""
    from inference.data import dataset as ds

    rngs = ds._sample_rngs(seed, rng_index)
    # The femur is posed inside the fixed atlas grid as the phantoms are (same ranges, same
    # convention), so that CT samples also teach the affine module.
    pose = _sample_pose(rngs["phantom"], config.phantom)
    to_world = pose @ loaded.to_canonical
    ct_world = loaded.geometry.transformed(to_world)
    landmarks = loaded.marks.transformed(to_world).points_mm().astype(np.float32)
    volume, grid_labels = resample_to_grid(loaded.hu, loaded.label_map, ct_world, dgrid.geometry,
                                           loaded.femur_label, pelvis_label)
    views, angles = ds.sample_views(rngs["views"], config.views, landmarks[0])
    realism = [ds.sample_realism_params(rngs["realism"], config.realism) for _ in views]
    calibration = None
    if config.calibration_error.enabled:
        calibration = [ds.sample_calibration_perturbation(rngs["calibration"], config.calibration_error)
                       for _ in views]
    femur_only = (loaded.label_map == loaded.femur_label).astype(np.uint8)
    rendered = ds.render_view_pair(loaded.hu, femur_only, ct_world, dgrid, views, config.render, realism,
                                   calibration, views[0].isocentre_mm, cancel=cancel)
    if any(int(m.sum()) == 0 for m in rendered["masks"]):
        raise DataError("the femur does not project onto the network detector of a view; the label map and "
                        "the CT do not overlap as expected")
    arrays = {"volume": ds.quantise_hu(volume), "labels": grid_labels, "images": rendered["images"],
              "masks": rendered["masks"], "projection": rendered["projection"],
              "index_to_world": dgrid.geometry.index_to_world(), "landmarks_mm": landmarks,
              "view_angles_deg": angles.astype(np.float64), "pose": pose}
    relative = f"{split}/s{subject}_{index:06d}.npz"
    if (out / relative).exists():
        raise DataError(f"{out / relative} already exists; the data set folder is inconsistent")
    entry = ds.sample_entry(ds.write_npz(out / relative, arrays), index, relative, split, subject, subject)
    entry.update({
        "side": loaded.side,
        "source": {"ct": names["ct"], "ct_sha256": loaded.ct_sha256, "labels": names["labels"],
                   "labels_sha256": loaded.labels_sha256, "femur_label": loaded.femur_label,
                   "pelvis_label": pelvis_label, "seed": seed, "pair": pair, "grid_fov_fraction": loaded.fov_fraction,
                   **({"list_line": names["line"]} if "line" in names else {})},
        "view_names": list(config.views.view_names), "view_angles_deg": angles.tolist(),
        "isocentre_mm": list(views[0].isocentre_mm), "network_pixel_mm": rendered["pixel_mm"].tolist(),
        "head_radius_mm": loaded.marks.head_radius_mm,
        "to_canonical": loaded.to_canonical.tolist(),
        "realism": [r.to_dict() for r in realism],
        "calibration_error": None if calibration is None else [c.to_dict() for c in calibration],
        "mask_pixels": [int(m.sum()) for m in rendered["masks"]],
    })
    return ds._json_normalise(entry)


def _sample_pose(rng: np.random.Generator, sampling: Any) -> np.ndarray:
    """A femur pose inside the grid drawn like a phantom's (rotation about the grid centre, shift)."""
    from inference.data.phantom import PhantomParams, pose_matrix

    rotation = rng.uniform(-sampling.max_rotation_deg, sampling.max_rotation_deg, 3)
    translation = rng.uniform(-sampling.max_translation_mm, sampling.max_translation_mm, 3)
    return pose_matrix(PhantomParams(rotation_deg=tuple(rotation), translation_mm=tuple(translation)))


def prepare_ct_grids(ct: str | os.PathLike, labels: str | os.PathLike, side: str, out_dir: str | os.PathLike,
                     grids: Sequence[str], **kwargs) -> list[pathlib.Path]:
    """:func:`prepare_ct` for several grids, each into ``out_dir/<grid>`` (``--grid both``)."""
    return [prepare_ct(ct, labels, side, pathlib.Path(out_dir) / name, grid=name, **kwargs) for name in grids]


# ----------------------------------------------------------------------------------------------
# prepare-ct --cases LIST [--shard I/N]: many CTs into one data set, on many machines
# ----------------------------------------------------------------------------------------------
#: Columns of a case list (CSV with a header line): required, then optional.
CASE_COLUMNS = ("ct", "labels", "side", "subject", "split")


@dataclasses.dataclass(frozen=True)
class CtCase:
    """One row of a case list: a CT, its label map and which femur, as written in the list (paths
    relative to the list's folder), with the subject (default: from the CT's path) and split."""

    ct: str
    labels: str
    side: str
    subject: str
    split: str = "train"
    line: int = 0

    def to_dict(self) -> dict:
        return {"ct": self.ct, "labels": self.labels, "side": self.side, "subject": self.subject,
                "split": self.split}


def read_case_list(path: str | os.PathLike) -> list[CtCase]:
    """Read a case list: CSV with a header line naming the columns ``ct``, ``labels``, ``side``
    and optionally ``subject`` and ``split`` (default train); empty lines and lines starting with
    ``#`` are skipped. Relative paths are relative to the list's folder.

    The default subject is the CT's path without its extension, e.g. ``p017-ct`` for
    ``p017/ct.nii.gz``, so that one patient's two femurs (two rows, one CT) are one subject.

    Raises
    ------
    InputFileError
        The list cannot be read.
    ConfigError
        A missing column or value, an unknown side or split, a subject in two splits, an
        empty list; the message names the line.
    """
    import csv

    from inference.data import dataset as ds

    file = pathlib.Path(path)
    try:
        text = file.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputFileError(f"{file}: cannot read the case list ({exc})") from exc
    lines = [(number, line) for number, line in enumerate(text.splitlines(), 1)
             if line.strip() and not line.lstrip().startswith("#")]
    if not lines:
        raise ConfigError(f"{file}: the case list is empty (expected a header line 'ct,labels,side[,subject][,split]' "
                          "and one line per CT)")
    rows = csv.DictReader([line for _, line in lines], skipinitialspace=True)
    header = [name.strip().lower() for name in (rows.fieldnames or [])]
    missing = [name for name in CASE_COLUMNS[:3] if name not in header]
    unknown = [name for name in header if name not in CASE_COLUMNS]
    if missing or unknown:
        raise ConfigError(f"{file} line {lines[0][0]}: the header must name the columns ct, labels, side and "
                          f"optionally subject, split ({'missing ' + ', '.join(missing) if missing else ''}"
                          f"{'; ' if missing and unknown else ''}{'unknown ' + ', '.join(unknown) if unknown else ''})")
    rows.fieldnames = header
    cases: list[CtCase] = []
    for (number, _), row in zip(lines[1:], rows):
        values = {k: (v or "").strip() for k, v in row.items() if k is not None}
        where = f"{file} line {number}"
        if None in row:
            raise ConfigError(f"{where}: more values than columns (a comma in a path? quote it)")
        for name in CASE_COLUMNS[:3]:
            if not values.get(name):
                raise ConfigError(f"{where}: no {name}")
        if values["side"] not in ("left", "right"):
            raise ConfigError(f"{where}: side must be left or right, not {values['side']!r}")
        split = values.get("split") or "train"
        if split not in ds.SPLITS:
            raise ConfigError(f"{where}: split must be one of {', '.join(ds.SPLITS)}, not {split!r}")
        subject = values.get("subject") or _list_subject(values["ct"])
        cases.append(CtCase(values["ct"], values["labels"], values["side"], subject, split, number))
    if not cases:
        raise ConfigError(f"{file}: the case list names no CT (only a header line)")
    first: dict[str, CtCase] = {}
    for case in cases:
        seen = first.setdefault(case.subject, case)
        if seen.split != case.split:
            raise ConfigError(f"{file} lines {seen.line} and {case.line}: subject {case.subject!r} is in the "
                              f"{seen.split} and the {case.split} split; a subject must stay in one split")
    return cases


def _list_subject(ct: str) -> str:
    """``p017/ct.nii.gz`` -> ``p017-ct``: the CT's path in the list, without extension."""
    parts = [part for part in pathlib.PurePosixPath(ct.replace("\\", "/")).parts if part not in ("/", ".", "..")]
    return _subject_name(pathlib.Path("-".join(parts) or "ct"))


def prepare_ct_list(cases: str | os.PathLike | Sequence[CtCase], out_dir: str | os.PathLike, *,
                    grid: str | Any = "compact", pairs: int = 1, geometry: str = "orthogonal", seed: int = 0,
                    femur_label: int = 1, pelvis_label: int | None = None, config: Any = None, workers: int = 1,
                    shard: Any = None, root: str | os.PathLike | None = None,
                    progress: Callable[[int, int], None] | None = None, cancel: Any = None) -> pathlib.Path:
    """Make one data set of many CTs (``prepare-ct --cases LIST``), or one shard of it.

    CT ``k`` of the list (0-based) gives the samples ``k * pairs + p`` (``p < pairs``), each drawn
    from ``(seed, k * pairs + p)`` alone, so a CT's samples do not depend on the other CTs, on
    ``workers`` or on sharding; a list of one CT gives the samples of :func:`prepare_ct` into an
    empty folder. With ``shard=(I, N)`` only the CTs ``k`` with ``k % N == I`` are read, into a
    shard folder; :func:`inference.data.dataset.merge_shards` joins the N shard folders into the
    data set the unsharded run makes (the same sample files, byte for byte).

    Like ``synth`` (and unlike :func:`prepare_ct`, which appends one CT to a folder), the folder
    holds this list's data set alone and the run resumes: run the same command again after a
    failure or cancellation. A CT that cannot be used stops the run with an error naming its line
    of the list; its samples are not written (those of other CTs are kept).

    Parameters
    ----------
    cases : path of a case list (:func:`read_case_list`) or sequence of CtCase
    root : path, optional
        Folder that relative paths of ``cases`` are relative to (default: the list's folder, or
        the current folder for a sequence).
    workers : int
        CTs imported side by side in separate processes (each holds its CT in memory).
    Other parameters as :func:`prepare_ct`.

    Returns
    -------
    pathlib.Path
        The manifest.
    """
    from inference.data import dataset as ds

    if isinstance(cases, (str, os.PathLike)):
        root = pathlib.Path(cases).parent if root is None else root
        cases = read_case_list(cases)
    cases = list(cases)
    if not cases:
        raise ConfigError("the case list names no CT")
    config, dgrid = _check_options("train", geometry, pairs, seed, config, grid)
    pairs, seed = int(pairs), int(seed)
    parameters = dict(_parameters(config), seed=seed, pairs=pairs, femur_label=femur_label, pelvis_label=pelvis_label,
                      cases=[case.to_dict() for case in cases])
    manifest = ds._base_manifest("ct-import", dgrid, parameters)
    manifest.update(geometry_mode=geometry, seed=seed, num_samples=len(cases) * pairs, samples_per_ct=pairs)
    out = pathlib.Path(out_dir)
    entries = ds.open_output(out, manifest, shard, "grid, geometry, seed, pairs, labels, CT list or augmentation")
    mine = ds.shard_members(manifest)
    base = pathlib.Path(root) if root is not None else pathlib.Path.cwd()
    tasks = []
    for k, case in enumerate(cases):
        todo = [p for p in range(pairs) if k * pairs + p in mine and k * pairs + p not in entries]
        if todo:
            for name in ("ct", "labels"):
                if not (base / getattr(case, name)).exists():
                    raise InputFileError(f"line {case.line} of the case list: {name} {getattr(case, name)} not found "
                                         f"(relative paths are relative to {base})")
            tasks.append((k, case, todo))
    state = {"run": _import_case, "config": config, "grid": dgrid, "seed": seed, "pairs": pairs, "out": str(out),
             "root": str(base), "femur_label": femur_label, "pelvis_label": pelvis_label}
    ds.build_samples(out, manifest, entries, tasks, len(mine), state, workers, progress=progress, cancel=cancel,
                     cancelled="CT import was cancelled; run the same command again to resume")
    logger.info("data set %s: %d samples of %d CTs", out, len(entries), len({e["subject"] for e in entries.values()}))
    return out / ds.MANIFEST


def _import_case(state: dict, task: tuple[int, CtCase, list[int]]) -> list[dict]:
    """The samples ``pairs`` of CT ``k`` (a task of :func:`prepare_ct_list`): written, or none."""
    k, case, todo = task
    root, out, pairs = pathlib.Path(state["root"]), pathlib.Path(state["out"]), state["pairs"]
    entries: list[dict] = []
    try:
        loaded = load_ct(root / case.ct, root / case.labels, case.side, state["femur_label"], state["grid"])
        for p in todo:
            index = k * pairs + p
            stale = out / f"{case.split}/s{case.subject}_{index:06d}.npz"
            stale.unlink(missing_ok=True)  # left by an earlier, interrupted run (not in the manifest)
            entries.append(_write_sample(loaded, out, index, index, state["seed"], p, state["grid"], state["config"],
                                         case.split, case.subject, {"ct": case.ct, "labels": case.labels,
                                                                    "line": case.line}, state["pelvis_label"]))
    except BaseException as exc:
        for entry in entries:
            (out / entry["file"]).unlink(missing_ok=True)
        if isinstance(exc, (DataError, InputFileError, ConfigError)):
            raise type(exc)(f"line {case.line} of the case list ({case.ct}): {exc}") from exc
        raise
    return entries
