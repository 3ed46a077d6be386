"""The CT atlas: build it from a shared bone surface, load it from ``resources/atlas/<grid>/``.

The atlas is a noise-free phantom (:mod:`inference.data.phantom`) of one reference subject with
no shape or pose augmentation, on an atlas grid placed in the canonical femur frame
(docs/architecture.md, "Grid placement"). Training phantoms live on the same grid, so the network
never resamples the atlas.

Files of one grid (all written into a temporary folder first, then renamed into place)::

    resources/atlas/<grid>/
      atlas.nii.gz      float32 HU
      labels.nii.gz     uint8 (1 femur, 2 pelvis)
      landmarks.json    femur landmarks in the grid's world mm, head radius
      atlas.json        provenance: source mesh + sha256, subject, software version, grid,
                        creation parameters, sha256 of each file above
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import pathlib
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from inference.checksums import sha256_file
from inference.errors import DataError, InputFileError
from inference.io import atomic_output_dir, read_volume

logger = logging.getLogger(__name__)

__all__ = [
    "GRID_CENTRE_CANONICAL_MM",
    "GRID_SPECS",
    "REFERENCE_SUBJECT",
    "Atlas",
    "grid_geometry",
    "atlas_root",
    "load_atlas",
    "build_atlas",
]

#: Atlas grids (docs/architecture.md, "Grids"): shape (z, y, x) and spacing (x, y, z) mm.
GRID_SPECS: dict[str, dict[str, tuple]] = {
    "paper": {"shape_zyx": (192, 128, 192), "spacing_xyz_mm": (0.664, 0.664, 1.0)},
    "compact": {"shape_zyx": (96, 64, 96), "spacing_xyz_mm": (1.328, 1.328, 2.0)},
}
#: Centre of every atlas grid in the canonical femur frame: the head centre sits 20 mm medial of
#: it and 55 mm above it (room for the greater trochanter and ~40 mm of shaft below the lesser
#: trochanter).
GRID_CENTRE_CANONICAL_MM = (-20.0, 0.0, -55.0)

#: Reference subject of the shipped atlas (see resources/atlas/README.md for why).
REFERENCE_SUBJECT = "TLEM2_CT:right"

ATLAS_FORMAT = "hipatlas-atlas/1"
_FILES = ("atlas.nii.gz", "labels.nii.gz", "landmarks.json")


def grid_geometry(grid_name: str):
    """The :class:`~inference.geometry.VolumeGeometry` of a named atlas grid (canonical frame).

    Raises
    ------
    DataError
        For an unknown grid name.
    """
    from inference.geometry import VolumeGeometry

    if grid_name not in GRID_SPECS:
        raise DataError(f"unknown atlas grid {grid_name!r}; known grids: {', '.join(sorted(GRID_SPECS))}")
    spec = GRID_SPECS[grid_name]
    return VolumeGeometry.centered(spec["shape_zyx"], spec["spacing_xyz_mm"], GRID_CENTRE_CANONICAL_MM)


def atlas_root() -> pathlib.Path:
    """``$HIPATLAS_ATLAS_DIR`` if set, else ``<repo>/resources/atlas``."""
    from inference.resources import atlas_dir

    return atlas_dir()


@dataclass(frozen=True, eq=False)
class Atlas:
    """A loaded atlas.

    Attributes
    ----------
    volume : ndarray, (Z, Y, X) float32, HU
    labels : ndarray, (Z, Y, X) uint8 (1 femur, 2 pelvis)
    geometry : inference.geometry.VolumeGeometry
    landmarks : dict of name -> (3,) float64 world mm (``inference.anatomy.LANDMARK_NAMES``)
    head_radius_mm : float
    grid : str
    provenance : dict
        Contents of ``atlas.json``.
    directions : dict
        Unit ``"shaft"`` (towards the head) and ``"neck"`` (towards the head) axis directions.
    """

    volume: np.ndarray
    labels: np.ndarray
    geometry: Any
    landmarks: dict
    head_radius_mm: float
    grid: str
    provenance: dict
    directions: dict = dataclasses.field(default_factory=dict)


def load_atlas(grid_name: str, root: str | os.PathLike | None = None, *, verify: bool = True) -> Atlas:
    """Load the atlas of a grid.

    Parameters
    ----------
    grid_name : str
        ``"paper"`` or ``"compact"`` (a folder of ``root``).
    root : path, optional
        Folder holding ``<grid>/`` (default :func:`atlas_root`).
    verify : bool
        Check each file's sha256 against ``atlas.json``.

    Raises
    ------
    InputFileError
        Missing or unreadable files, or a checksum mismatch (a damaged installation).
    DataError
        Files that disagree with each other (shape, grid).
    """
    folder = (atlas_root() if root is None else pathlib.Path(root)) / grid_name
    meta_path = folder / "atlas.json"
    if not meta_path.is_file():
        raise InputFileError(
            f"no atlas for grid {grid_name!r} in {folder}; build it with tools/build_atlas.py "
            "or reinstall HipAtlas"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:
        raise InputFileError(f"cannot read {meta_path}: {exc}") from exc
    if meta.get("format") != ATLAS_FORMAT:
        raise InputFileError(f"{meta_path} is not a {ATLAS_FORMAT} file (format {meta.get('format')!r})")
    for name in _FILES:
        path = folder / name
        if not path.is_file():
            raise InputFileError(f"atlas file {path} is missing; rebuild the atlas or reinstall HipAtlas")
        if verify and sha256_file(path) != meta.get("files", {}).get(name):
            raise InputFileError(f"atlas file {path} does not match its checksum in atlas.json; it is damaged")
    # read_volume: SimpleITK where installed, the numpy NIfTI reader otherwise (the runtime installer)
    volume, geometry = read_volume(folder / "atlas.nii.gz")
    labels, label_geometry = read_volume(folder / "labels.nii.gz")
    try:
        marks = json.loads((folder / "landmarks.json").read_text())
    except (OSError, ValueError) as exc:
        raise InputFileError(f"cannot read the atlas in {folder}: {exc}") from exc
    volume = volume.astype(np.float32, copy=False)
    labels = labels.astype(np.uint8, copy=False)
    if labels.shape != volume.shape:
        raise DataError(f"atlas labels {labels.shape} and volume {volume.shape} differ in shape in {folder}")
    if not np.allclose(label_geometry.index_to_world(), geometry.index_to_world(), atol=1e-4):
        raise DataError(f"atlas labels and volume in {folder} have different geometry")
    landmarks = {k: np.asarray(v, dtype=np.float64) for k, v in marks["points_mm"].items()}
    directions = {k: np.asarray(v, dtype=np.float64) for k, v in marks.get("directions", {}).items()}
    return Atlas(volume, labels, geometry, landmarks, float(marks["head_radius_mm"]), grid_name, meta, directions)


def build_atlas(grid_name: str, out_root: str | os.PathLike | None = None, *,
                subject: str = REFERENCE_SUBJECT, progress: Callable[[float, str], None] | None = None,
                trabecular_contrast: float = 0.0) -> pathlib.Path:
    """Build and write the atlas of one grid.

    The reference subject's phantom is made with no shape or pose change and no noise; by default
    the cancellous bone is smooth (``trabecular_contrast=0``) because a random texture in the
    atlas would be a feature of one random draw, not of the anatomy.

    Parameters
    ----------
    grid_name : str
        ``"paper"`` or ``"compact"``.
    out_root : path, optional
        Folder that receives ``<grid>/`` (default :func:`atlas_root`); an existing atlas of the
        grid is replaced only once the new one is complete.
    subject : str or inference.data.phantom.SubjectModel
        ``"<subject_id>:<side>"`` of the shared bones, or a ready subject model.
    progress : callable(fraction, message), optional

    Returns
    -------
    pathlib.Path
        The written ``<grid>`` folder.
    """
    import SimpleITK as sitk

    from inference import __version__
    from inference.data import phantom

    def report(fraction: float, message: str) -> None:
        logger.info("atlas %s: %s", grid_name, message)
        if progress is not None:
            progress(fraction, message)

    grid = grid_geometry(grid_name)
    report(0.0, f"loading subject {getattr(subject, 'name', subject)}")
    model = subject if isinstance(subject, phantom.SubjectModel) else phantom.load_subject_model(subject)
    tissue = phantom.TissueParams(noise_sigma_hu=0.0, envelope_variation_mm=0.0, soft_tissue_variation_hu=0.0,
                                  trabecular_contrast=trabecular_contrast, seed=0)
    params = phantom.PhantomParams(tissue=tissue)
    report(0.3, "rendering the atlas volume")
    ph = phantom.make_phantom(model, params, grid)
    if not np.any(ph.labels == 1):
        raise DataError(f"the atlas of {model.name} has no femur voxel on grid {grid_name}")

    out_root = atlas_root() if out_root is None else pathlib.Path(out_root)
    target = out_root / grid_name
    # Built beside the installed atlas and swapped in whole (the old one is kept until then).
    with atomic_output_dir(target, overwrite=True) as tmp:
        report(0.7, "writing files")
        sitk.WriteImage(grid.to_sitk(ph.ct_hu.astype(np.float32)), str(tmp / "atlas.nii.gz"), useCompression=True)
        sitk.WriteImage(grid.to_sitk(ph.labels.astype(np.uint8)), str(tmp / "labels.nii.gz"), useCompression=True)
        marks = {
            "frame": "grid world mm (canonical femur frame, LPS-like axes of a right femur)",
            "points_mm": {k: [round(float(c), 4) for c in v] for k, v in ph.landmarks_mm.items()},
            "head_radius_mm": round(float(ph.head_radius_mm), 4),
        }
        if model.shape_landmarks is not None:
            # No pose: the grid's world is the canonical frame, so canonical directions hold as is.
            marks["directions"] = {
                "shaft": [round(float(c), 6) for c in model.shape_landmarks.shaft_direction],
                "neck": [round(float(c), 6) for c in model.shape_landmarks.neck_direction],
            }
        (tmp / "landmarks.json").write_text(json.dumps(marks, indent=2) + "\n")
        spec = GRID_SPECS[grid_name]
        meta = {
            "format": ATLAS_FORMAT,
            "grid": {"name": grid_name, "shape_zyx": list(spec["shape_zyx"]),
                     "spacing_xyz_mm": list(spec["spacing_xyz_mm"]),
                     "centre_canonical_mm": list(GRID_CENTRE_CANONICAL_MM),
                     "origin_mm": list(grid.origin_mm), "direction": [list(r) for r in grid.direction]},
            "subject": model.name,
            "sources": model.provenance,
            "software": {"hipatlas": __version__, "numpy": np.__version__, "simpleitk": sitk.Version_VersionString()},
            "creation": {"params": params.to_dict(), "tissue_noise": "off", "shape_augmentation": "none",
                         "pose": "identity", "created_utc": datetime.datetime.now(datetime.timezone.utc)
                         .replace(microsecond=0).isoformat()},
            "files": {name: sha256_file(tmp / name) for name in _FILES},
        }
        (tmp / "atlas.json").write_text(json.dumps(meta, indent=2) + "\n")
    report(1.0, f"atlas written to {target}")
    return target
