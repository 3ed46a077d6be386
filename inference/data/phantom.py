"""CT phantoms in Hounsfield units built from real bone surfaces.

A phantom is a synthetic hip CT on an atlas grid (docs/architecture.md, "Grids"): the femur of one
shared subject, shape-augmented (:mod:`inference.data.shape`) and posed, the same subject's
hemipelvis in its anatomical position, and soft tissue around them, with a label map
(1 = femur, 2 = pelvis) and the femur landmarks in the grid's world frame.

Two steps:

1. :func:`load_subject_model` (once per subject and side, cached in memory and on disk) turns the
   STL surfaces into fine signed-distance fields in the *canonical femur frame*
   (:mod:`inference.anatomy`; a left femur and its pelvis are mirrored to the right): the femur
   and pelvis at 1 mm, and coarse "distance to bone" fields at 3 mm for the body envelope.
2. :func:`make_phantom` (deterministic given :class:`PhantomParams`) maps every output voxel back
   to the undeformed canonical bone (inverse pose, then the inverse shape transform), samples the
   distance fields there and turns distances into tissue fractions and HU.

Tissue model (HU values are per-phantom parameters, see :class:`TissueParams`):

* cortical bone: a shell inside the femur surface whose thickness grows smoothly from about 1 mm
  at the head, neck and trochanters to 4-6 mm in the diaphysis (a function of the canonical height
  relative to the lesser trochanter), 1200-1800 HU;
* cancellous bone in the head, neck, trochanters and metaphysis: a trabecular-like texture (sheets
  at the zero crossings of band-passed 3D noise, anchored to the undeformed bone so it deforms with
  it), 150-300 HU in the metaphysis and up to about 450 HU in the head, densest under its
  articular surface;
* marrow in the diaphyseal canal (-50..+30 HU), cancellous bone fading into it below the lesser
  trochanter;
* the hemipelvis: a thin cortical shell (1-2 mm) around textured cancellous bone, kept at least
  :data:`JOINT_SPACE_MIN_MM` from the femoral head (joint space);
* soft tissue: muscle (30-60 HU, smooth low-contrast variation) within a smoothly varying distance
  of the bones (thicker medially than laterally), then a subcutaneous fat layer (about -100 HU),
  then air (-1000 HU) outside the body (usually beyond the grid);
* partial volume: every interface is a linear ramp of the signed distance over one voxel, so
  boundaries are anti-aliased instead of staircased; white Gaussian noise is added last.

Everything random in a phantom is drawn from :class:`PhantomParams` (its ``tissue.seed`` drives the
texture, the envelope variation and the noise), so the same parameters give the same phantom.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import pathlib
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import fft as sp_fft
from scipy import ndimage

from inference.errors import DataError, OutputError
from inference.validate import number, whole_number

logger = logging.getLogger(__name__)

__all__ = [
    "AIR_HU",
    "POSE_PIVOT_MM",
    "ScalarField",
    "SubjectModel",
    "TissueParams",
    "PhantomParams",
    "Phantom",
    "phantom_subjects",
    "load_subject_model",
    "body_distance_field",
    "place_pelvis_on_head",
    "sample_tissue_params",
    "sample_phantom_params",
    "pose_matrix",
    "make_phantom",
    "compose_hu",
]

AIR_HU = -1000.0

#: Pivot of the pose rotations, canonical mm: the centre of the atlas grids (docs/architecture.md,
#: "Grid placement"), so a rotation turns the volume about its own centre as in the paper.
POSE_PIVOT_MM = (-20.0, 0.0, -55.0)

#: Fine distance fields sample the bones at this spacing (canonical mm).
FINE_SPACING_MM = 1.0
#: Coarse "distance to bone" fields for the body envelope.
BODY_SPACING_MM = 3.0
#: Fine fields cover the bone inside this canonical box (mm) plus a margin. It contains the grids
#: (canonical x -84..44, y -43..43, z -151..41) grown by 45 mm: the largest pose (10 deg about
#: each axis moves the grid corners by up to 37 mm) plus translation, so every sample of a
#: phantom falls inside; below it the shaft continues as a prism (see ScalarField.sample).
ROI_MIN_MM = (-135.0, -95.0, -250.0)
ROI_MAX_MM = (100.0, 95.0, 100.0)
FINE_MARGIN_MM = 8.0
BODY_MARGIN_MM = 120.0
#: The shape transform is smooth on a scale of centimetres: it is evaluated exactly on a lattice
#: of about this step and interpolated trilinearly in between (measured: mean 0.02 mm, 99th
#: percentile 0.1 mm, max 0.2 mm error on the compact grid; many times faster than exact).
SHAPE_LATTICE_MM = 4.0
#: Edge of the periodic trabecular texture tile (mm, 1 mm voxels): larger than a femoral head, so
#: the repeat is not visible within one bone region.
TEXTURE_TILE_MM = 64
#: Smallest gap between the femoral head and the acetabular bone (mm, both cartilage layers). Some
#: segmentations (TLEM2's MRI pelvis) include cartilage and leave the head touching the pelvis;
#: a radiograph shows a joint space, so the pelvis is carved back to this distance.
JOINT_SPACE_MIN_MM = 3.0
#: Soft tissue is thicker medially, anteriorly and posteriorly of the femur than laterally (the
#: adductors, quadriceps and hamstrings versus the thin lateral vastus and fascia): the muscle
#: thickness is multiplied by up to 1 + this factor on the medial side.
MEDIAL_MUSCLE_GAIN = 0.8
#: Bump when the subject model computation changes, so disk caches are rebuilt.
CACHE_VERSION = 2


# ----------------------------------------------------------------------------------------------
# Sampled scalar fields
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class ScalarField:
    """A scalar field on an axis-aligned grid of the canonical frame.

    Parameters
    ----------
    values : ndarray, shape (Z, Y, X), float32
        Field values; ``values[k, j, i]`` sits at ``origin_mm + spacing_mm * (i, j, k)``.
    origin_mm : (3,) array_like
        Canonical position of voxel (0, 0, 0), xyz.
    spacing_mm : float
        Isotropic voxel size.
    """

    values: np.ndarray
    origin_mm: np.ndarray
    spacing_mm: float

    def __post_init__(self) -> None:
        values = np.ascontiguousarray(self.values, dtype=np.float32)
        if values.ndim != 3 or min(values.shape) < 2:
            raise DataError(f"a distance field must be a 3D array of at least 2^3 voxels, not shape {values.shape}")
        origin = np.asarray(self.origin_mm, dtype=np.float64).reshape(3)
        if not float(self.spacing_mm) > 0:
            raise DataError(f"distance field spacing_mm must be > 0, not {self.spacing_mm}")
        values.setflags(write=False)
        object.__setattr__(self, "values", values)
        object.__setattr__(self, "origin_mm", origin)
        object.__setattr__(self, "spacing_mm", float(self.spacing_mm))

    def sample(self, points_xyz: np.ndarray, mode: str = "nearest") -> np.ndarray:
        """Trilinear samples at points (3, N) in canonical mm (xyz rows); returns float32 (N,).

        ``mode="nearest"`` extends the border values outside the grid: the fine fields have a
        margin of positive distance on every side where the bone ends inside the box, and the
        femoral shaft, where the box cuts it, continues as a straight prism instead of ending.
        """
        index = (np.asarray(points_xyz, dtype=np.float32) - self.origin_mm[:, None].astype(np.float32))
        index /= np.float32(self.spacing_mm)
        return ndimage.map_coordinates(self.values, index[::-1], order=1, mode=mode, output=np.float32)

    @property
    def upper_mm(self) -> np.ndarray:
        """Canonical position of the last voxel, xyz."""
        return self.origin_mm + self.spacing_mm * (np.asarray(self.values.shape[::-1]) - 1)


def _box_geometry(low_mm: np.ndarray, high_mm: np.ndarray, spacing_mm: float):
    """VolumeGeometry (identity direction) covering [low, high] at ``spacing_mm``."""
    from inference.geometry import VolumeGeometry

    size = np.maximum(np.ceil((high_mm - low_mm) / spacing_mm).astype(int) + 1, 2)
    return VolumeGeometry(tuple(int(s) for s in size[::-1]), (spacing_mm,) * 3, tuple(float(v) for v in low_mm))


# ----------------------------------------------------------------------------------------------
# Subject models: distance fields in the canonical frame
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class SubjectModel:
    """One subject's bones in its canonical femur frame, ready for :func:`make_phantom`.

    Attributes
    ----------
    name : str
        ``"<subject_id>:<side>"``, e.g. ``"MC22:right"``.
    femur_sdf, pelvis_sdf : ScalarField
        Signed distance to the femur / pelvis surface (mm, negative inside), fine spacing.
        ``pelvis_sdf`` is None when no pelvis is known for the subject.
    femur_body, pelvis_body : ScalarField
        Coarse unsigned distance to the bone (0 inside) for the soft-tissue envelope.
    landmarks_mm : dict
        Femur landmarks (``inference.anatomy.LANDMARK_NAMES``) in the canonical frame, (3,) each.
    head_radius_mm : float
        Femoral head radius.
    shape_landmarks : inference.anatomy.FemurLandmarks or None
        The femur landmarks in the canonical frame, as :class:`inference.data.shape.ShapeTransform`
        takes them; None for synthetic models without shape augmentation.
    to_canonical : ndarray, shape (4, 4), or None
        Maps the femur STL's scan frame to the canonical frame (determinant -1 for a left femur).
    provenance : dict
        Source files and their sha256, pelvis placement, cache key.
    """

    name: str
    femur_sdf: ScalarField
    pelvis_sdf: ScalarField | None
    femur_body: ScalarField
    pelvis_body: ScalarField | None
    landmarks_mm: dict
    head_radius_mm: float
    shape_landmarks: Any = None
    to_canonical: np.ndarray | None = None
    provenance: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if "head_centre" not in self.landmarks_mm or "lesser_trochanter" not in self.landmarks_mm:
            raise DataError(
                f"subject model {self.name!r} needs at least the head_centre and lesser_trochanter "
                f"landmarks, has {sorted(self.landmarks_mm)}"
            )
        if not float(self.head_radius_mm) > 0:
            raise DataError(f"subject model {self.name!r}: head_radius_mm must be > 0, not {self.head_radius_mm}")
        marks = {k: np.asarray(v, dtype=np.float64).reshape(3) for k, v in self.landmarks_mm.items()}
        object.__setattr__(self, "landmarks_mm", marks)
        object.__setattr__(self, "head_radius_mm", float(self.head_radius_mm))

    @classmethod
    def from_fields(cls, name: str, femur_sdf: ScalarField, landmarks_mm: dict, head_radius_mm: float,
                    pelvis_sdf: ScalarField | None = None, **kwargs) -> "SubjectModel":
        """A model from signed-distance fields alone (e.g. analytic test shapes); the coarse body
        distance fields are derived from them (:func:`body_distance_field`)."""
        return cls(name, femur_sdf, pelvis_sdf, body_distance_field(femur_sdf),
                   None if pelvis_sdf is None else body_distance_field(pelvis_sdf),
                   landmarks_mm, head_radius_mm, **kwargs)


_HASHES: dict[tuple, str] = {}


def _cached_sha256(path: pathlib.Path) -> str:
    """sha256 of a file, remembered per (path, size, mtime) so repeated phantoms skip re-reading."""
    from inference.checksums import sha256_file

    stat = path.stat()
    memo = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if memo not in _HASHES:
        _HASHES[memo] = sha256_file(path)
    return _HASHES[memo]


def _side_name(side: str) -> str:
    key = str(side).strip().lower()
    if key in ("r", "right"):
        return "right"
    if key in ("l", "left"):
        return "left"
    raise DataError(f"side must be 'left' or 'right', not {side!r}")


def _parse_subject(subject: str) -> tuple[str, str]:
    """``"MC22:left"`` -> ("MC22", "left"); a bare id means the right femur."""
    text = str(subject).strip()
    if ":" in text:
        subject_id, side = text.rsplit(":", 1)
        return subject_id.strip(), _side_name(side)
    return text, "right"


def phantom_subjects(folder: str | os.PathLike | None = None) -> list[str]:
    """Every ``"<subject_id>:<side>"`` of the shared bones that has a femur surface, sorted."""
    from inference.data.bones import list_subjects

    names = []
    for subject in list_subjects(folder):
        for side in sorted(subject.femur_paths):
            names.append(f"{subject.subject_id}:{side}")
    return names


def place_pelvis_on_head(pelvis, head_centre_mm, head_radius_mm: float):
    """Translate a pelvis so that its acetabulum is concentric with the femoral head.

    The acetabular (lunate) surface is the part of the pelvis that wraps the head at about the
    head radius plus the cartilage gap, with its outward bone normal pointing at the head centre.
    It is found as the pelvis vertices within ``head_radius_mm + 10`` mm of the head centre whose
    normals point at it (cosine > 0.8; this drops the rim and the outer wall), and a sphere is
    fitted to them; vertices off that sphere (the deeper acetabular fossa) are dropped and the fit
    repeated.

    Parameters
    ----------
    pelvis : inference.mesh.Mesh
        Pelvis surface in the femur's frame (approximately placed, within about 10 mm).
    head_centre_mm : (3,) array_like
    head_radius_mm : float

    Returns
    -------
    placed : Mesh
        The translated pelvis.
    offset_mm : ndarray, shape (3,)
        Translation applied (head centre minus acetabulum centre).
    acetabulum_radius_mm : float

    Raises
    ------
    DataError
        If no acetabulum-like sphere is found near the head (the pelvis is not roughly in place).
    """
    from inference.anatomy import fit_sphere

    centre = np.asarray(head_centre_mm, dtype=np.float64).reshape(3)
    radius = float(head_radius_mm)
    vertices = pelvis.vertices
    to_centre = centre - vertices
    dist = np.linalg.norm(to_centre, axis=1)
    facing = np.einsum("ij,ij->i", pelvis.vertex_normals(), to_centre) / np.maximum(dist, 1e-9)
    pick = (dist < radius + 10.0) & (facing > 0.8)
    if pick.sum() < 30:
        raise DataError(
            f"no acetabulum found within {radius + 10.0:.0f} mm of the femoral head centre "
            f"(only {int(pick.sum())} pelvis vertices face the head there); the pelvis is not in place"
        )
    candidates = pick
    c, r = fit_sphere(vertices[pick])
    for _ in range(3):
        residual = np.abs(np.linalg.norm(vertices - c, axis=1) - r)
        pick = candidates & (residual < 2.0)
        if pick.sum() < 30:
            break
        c, r = fit_sphere(vertices[pick])
    if not (radius - 2.0 <= r <= radius + 10.0) or np.linalg.norm(c - centre) > 10.0:
        raise DataError(
            f"the pelvis near the femoral head does not look like an acetabulum (sphere radius "
            f"{r:.1f} mm for a head of {radius:.1f} mm, centre {np.linalg.norm(c - centre):.1f} mm "
            "from the head centre)"
        )
    offset = centre - c
    shift = np.eye(4)
    shift[:3, 3] = offset
    return pelvis.transformed(shift), offset, float(r)


def _cache_root() -> pathlib.Path | None:
    """Disk cache folder: ``$HIPATLAS_CACHE_DIR`` (empty = off) or ``<repo>/.cache/hipatlas``."""
    env = os.environ.get("HIPATLAS_CACHE_DIR")
    if env is not None:
        return pathlib.Path(env).expanduser() if env.strip() else None
    return pathlib.Path(__file__).resolve().parents[2] / ".cache" / "hipatlas"


def _ensure_cache_dir(root: pathlib.Path) -> bool:
    try:
        root.mkdir(parents=True, exist_ok=True)
        # The cache must never be committed: a .gitignore inside it ignores everything there,
        # without touching the repository's own ignore rules.
        marker = root.parent / ".gitignore" if root.parent.name == ".cache" else root / ".gitignore"
        if not marker.exists():
            marker.write_text("*\n")
        return True
    except OSError as exc:
        logger.info("phantom cache %s not writable (%s); working in memory only", root, exc)
        return False


_MODEL_CACHE: dict[str, SubjectModel] = {}
_MODEL_LOCK = threading.Lock()


def load_subject_model(subject: str, side: str | None = None, *, folder: str | os.PathLike | None = None,
                       use_disk_cache: bool = True, spacing_mm: float = FINE_SPACING_MM,
                       with_pelvis: bool = True) -> SubjectModel:
    """Distance fields and landmarks of one shared subject in its canonical femur frame.

    Parameters
    ----------
    subject : str
        Subject id of the shared bone folder (``"MC22"``), optionally with the side
        (``"MC22:left"``).
    side : {"left", "right"}, optional
        Femur side; overrides a side given in ``subject``; default right.
    folder : path, optional
        Bone folder (default :func:`inference.data.bones.bones_dir`).
    use_disk_cache : bool
        Read and write ``<repo>/.cache/hipatlas`` (or ``$HIPATLAS_CACHE_DIR``; set it empty to
        switch the disk cache off). The key is the sha256 of the meshes, of the landmark and
        distance code (``anatomy.py``, ``mesh.py``) and :data:`CACHE_VERSION`.
    spacing_mm : float
        Spacing of the bone distance fields (default 1 mm; coarser is faster to build, e.g. for
        tests, at the cost of rounder edges).
    with_pelvis : bool
        Include the pelvis (False: a femur-only model, faster to build).

    Returns
    -------
    SubjectModel
        Cached in memory for the process (about 40 MB per subject and side).

    Raises
    ------
    DataError
        Unknown subject or side, or landmarks that cannot be found.
    """
    from inference.data.bones import bones_dir, list_subjects

    subject_id, parsed_side = _parse_subject(subject)
    side = _side_name(side) if side is not None else parsed_side
    folder = bones_dir() if folder is None else pathlib.Path(folder)
    subjects = {s.subject_id: s for s in list_subjects(folder)}
    if subject_id not in subjects:
        raise DataError(f"unknown bone subject {subject_id!r}; the bone folder {folder} has {sorted(subjects)}")
    bone = subjects[subject_id]
    if side not in bone.femur_paths:
        raise DataError(f"subject {subject_id} has no {side} femur surface in {folder}")
    femur_path = pathlib.Path(bone.femur_paths[side])
    number(spacing_mm, "spacing_mm", 0, low_open=True, error=DataError)
    pelvis_path, pelvis_frame_path = _pelvis_source(bone, side, subjects) if with_pelvis else (None, None)
    files = [femur_path] + ([pelvis_path, pelvis_frame_path] if pelvis_path is not None else [])
    hashes = {str(p.name): _cached_sha256(p) for p in files}
    key_text = json.dumps({"v": CACHE_VERSION, "side": side, "files": hashes, "code": _code_version(),
                           "fine": float(spacing_mm), "body": BODY_SPACING_MM,
                           "roi": [ROI_MIN_MM, ROI_MAX_MM]}, sort_keys=True)
    key = hashlib.sha256(key_text.encode()).hexdigest()[:24]
    name = f"{subject_id}:{side}"
    tag = "" if (spacing_mm == FINE_SPACING_MM and with_pelvis) else f"_{spacing_mm:g}mm{'' if with_pelvis else '_femur'}"
    with _MODEL_LOCK:
        if key in _MODEL_CACHE:
            return _MODEL_CACHE[key]
    root = _cache_root() if use_disk_cache else None
    path = None if root is None else root / f"subject_{subject_id}_{side}{tag}_{key}.npz"
    model = _read_model(path, name) if path is not None and path.exists() else None
    if model is None:
        model = _build_model(name, side, femur_path, pelvis_path, pelvis_frame_path, hashes, key, float(spacing_mm))
        if path is not None and _ensure_cache_dir(root):
            _write_model(path, model)
            # Older versions of this subject's fields (other code or mesh hashes) are stale now.
            for stale in root.glob(f"subject_{subject_id}_{side}{tag}_*.npz"):
                if stale != path and len(stale.stem) == len(path.stem):
                    try:
                        stale.unlink()
                    except OSError:
                        pass
    with _MODEL_LOCK:
        _MODEL_CACHE[key] = model
    return model


def _code_version() -> str:
    """Hash of the code a subject model depends on (landmarks, distance fields), so a disk cache
    made before a change of :mod:`inference.anatomy` or :mod:`inference.mesh` is not reused."""
    from inference import anatomy
    from inference import mesh

    digest = hashlib.sha256()
    for module in (anatomy, mesh):
        digest.update(_cached_sha256(pathlib.Path(module.__file__)).encode())
    return digest.hexdigest()[:16]


def _pelvis_source(bone, side: str, subjects: dict):
    """(pelvis STL, femur STL whose frame the pelvis shares) or (None, None).

    A subject without its own pelvis borrows the pelvis of another scan of the same specimen
    (TLEM2_CT uses TLEM2_MRI's): that scan's femur of the same side brings the pelvis into the
    canonical frame, which is the same for both scans of one bone.
    """
    if bone.pelvis_path is not None:
        return pathlib.Path(bone.pelvis_path), pathlib.Path(bone.femur_paths[side])
    for other in subjects.values():
        if (other.specimen == bone.specimen and other.subject_id != bone.subject_id
                and other.pelvis_path is not None and side in other.femur_paths):
            return pathlib.Path(other.pelvis_path), pathlib.Path(other.femur_paths[side])
    logger.warning("no pelvis surface for subject %s; its phantoms have no pelvis", bone.subject_id)
    return None, None


def _femur_frame(mesh, side: str):
    """(to_canonical 4x4, canonical landmark points, head radius, canonical FemurLandmarks)."""
    from inference import anatomy

    marks = anatomy.femur_landmarks(mesh, side)
    canonical = marks.canonical()
    points = dict(zip(anatomy.LANDMARK_NAMES, canonical.points_mm()))
    return np.asarray(marks.to_canonical, dtype=np.float64), points, float(canonical.head_radius_mm), canonical


def _field_box(mesh, spacing_mm: float, margin_mm: float, clip: bool = True):
    low, high = mesh.bounds_mm()
    if clip:
        low = np.maximum(low, ROI_MIN_MM)
        high = np.minimum(high, ROI_MAX_MM)
    if np.any(high <= low):
        return None
    return _box_geometry(low - margin_mm, high + margin_mm, spacing_mm)


def _fine_sdf(mesh, what: str, spacing_mm: float = FINE_SPACING_MM) -> ScalarField:
    from inference.mesh import signed_distance

    geometry = _field_box(mesh, spacing_mm, FINE_MARGIN_MM)
    if geometry is None:
        raise DataError(f"the {what} lies outside the region of the atlas grids in the canonical frame")
    values = signed_distance(mesh, geometry, band_voxels=3.0)
    return ScalarField(values, geometry.origin_mm, spacing_mm)


def body_distance_field(fine: ScalarField) -> ScalarField:
    """Coarse unsigned distance to the bone of a fine SDF, for the soft-tissue envelope.

    A coarse voxel counts as bone when the fine SDF at its centre is below half a coarse voxel, so
    thin plates of the ilium (thinner than 3 mm) still mark their voxels; the Euclidean distance
    transform of the complement is then within about one coarse voxel of the true distance.
    """
    low = fine.origin_mm - BODY_MARGIN_MM
    high = fine.upper_mm + BODY_MARGIN_MM
    geometry = _box_geometry(low, high, BODY_SPACING_MM)
    ijk = np.indices(geometry.shape_zyx[::-1], dtype=np.float32).reshape(3, -1)
    points = ijk * np.float32(BODY_SPACING_MM) + np.asarray(geometry.origin_mm, dtype=np.float32)[:, None]
    # Outside the fine box (more than its margin away from bone) the value must read as "far".
    index = (points - fine.origin_mm[:, None].astype(np.float32)) / np.float32(fine.spacing_mm)
    near = ndimage.map_coordinates(fine.values, index[::-1], order=1, mode="constant", cval=1e3)
    bone = (near < 0.5 * BODY_SPACING_MM).reshape(geometry.shape_zyx[::-1]).transpose(2, 1, 0)
    if not bone.any():
        raise DataError("a bone distance field holds no bone voxel")
    dist = ndimage.distance_transform_edt(~bone, sampling=BODY_SPACING_MM).astype(np.float32)
    return ScalarField(dist, geometry.origin_mm, BODY_SPACING_MM)


_body_distance = body_distance_field  # old private name, used by some tests


def _build_model(name, side, femur_path, pelvis_path, pelvis_frame_path, hashes, key, spacing_mm) -> SubjectModel:
    from inference.mesh import read_stl

    logger.info("building distance fields of subject %s (cached afterwards)", name)
    femur = read_stl(femur_path)
    femur.check_closed(f"femur surface {femur_path.name}")
    to_canonical, landmarks, head_radius, shape_landmarks = _femur_frame(femur, side)
    femur_c = femur.transformed(to_canonical)
    provenance = {"subject": name, "files": hashes, "femur": femur_path.name, "cache_key": key}
    pelvis_sdf = pelvis_body = None
    provenance["spacing_mm"] = spacing_mm
    if pelvis_path is not None:
        pelvis = read_stl(pelvis_path)
        pelvis.check_closed(f"pelvis surface {pelvis_path.name}")
        if pelvis_frame_path == femur_path:
            pelvis_to_canonical = to_canonical
        else:
            # Another scan of the same bone: its femur frame is the same anatomical frame.
            other = read_stl(pelvis_frame_path)
            pelvis_to_canonical = _femur_frame(other, side)[0]
        pelvis_c = pelvis.transformed(pelvis_to_canonical)
        try:
            pelvis_c, offset, acetabulum_r = place_pelvis_on_head(pelvis_c, landmarks["head_centre"], head_radius)
            provenance["pelvis_offset_mm"] = [round(float(v), 3) for v in offset]
            provenance["acetabulum_radius_mm"] = round(acetabulum_r, 3)
            logger.info("%s: pelvis moved by %.1f mm onto the femoral head (acetabulum r %.1f mm)",
                        name, float(np.linalg.norm(offset)), acetabulum_r)
        except DataError as exc:
            if pelvis_frame_path != femur_path:
                raise
            logger.warning("%s: pelvis kept in its scanned position (%s)", name, exc)
        provenance["pelvis"] = pelvis_path.name
        provenance["pelvis_frame_from"] = pelvis_frame_path.name
        pelvis_sdf = _fine_sdf(pelvis_c, f"pelvis of {name}", spacing_mm)
        pelvis_body = body_distance_field(pelvis_sdf)
    femur_sdf = _fine_sdf(femur_c, f"femur of {name}", spacing_mm)
    femur_body = body_distance_field(femur_sdf)
    return SubjectModel(name, femur_sdf, pelvis_sdf, femur_body, pelvis_body, landmarks, head_radius,
                        shape_landmarks, to_canonical, provenance)


_FIELD_NAMES = ("femur_sdf", "pelvis_sdf", "femur_body", "pelvis_body")


def _write_model(path: pathlib.Path, model: SubjectModel) -> None:
    arrays = {}
    for name in _FIELD_NAMES:
        f = getattr(model, name)
        if f is not None:
            # float16 keeps 0.03 mm at 60 mm distance and halves the cache size.
            arrays[name] = f.values.astype(np.float16)
            arrays[name + "_origin"] = f.origin_mm
            arrays[name + "_spacing"] = np.float64(f.spacing_mm)
    shape_marks = model.shape_landmarks.to_dict() if model.shape_landmarks is not None else None
    meta = {"name": model.name, "landmarks_mm": {k: v.tolist() for k, v in model.landmarks_mm.items()},
            "head_radius_mm": model.head_radius_mm, "provenance": model.provenance,
            "femur_landmarks": shape_marks,
            "to_canonical": None if model.to_canonical is None else np.asarray(model.to_canonical).tolist()}
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    from inference.io import atomic_file

    try:
        with atomic_file(path, ".npz") as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, **arrays)
    except (OSError, OutputError) as exc:  # the cache is optional: go on without it
        logger.info("could not write phantom cache %s (%s)", path, exc)


def _read_model(path: pathlib.Path, name: str) -> SubjectModel | None:
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(bytes(data["meta"]).decode())
            fields = {}
            for f in _FIELD_NAMES:
                fields[f] = (ScalarField(data[f].astype(np.float32), data[f + "_origin"], float(data[f + "_spacing"]))
                             if f in data else None)
    except (OSError, ValueError, KeyError, DataError) as exc:
        logger.info("ignoring unreadable phantom cache %s (%s)", path, exc)
        return None
    landmarks = {k: np.asarray(v) for k, v in meta["landmarks_mm"].items()}
    return SubjectModel(name, fields["femur_sdf"], fields["pelvis_sdf"], fields["femur_body"],
                        fields["pelvis_body"], landmarks, meta["head_radius_mm"],
                        _landmarks_from_dict(meta.get("femur_landmarks")),
                        None if meta.get("to_canonical") is None else np.asarray(meta["to_canonical"]),
                        meta["provenance"])


def _landmarks_from_dict(data: dict | None):
    """Rebuild the canonical :class:`~inference.anatomy.FemurLandmarks` stored in a cache."""
    if data is None:
        return None
    from inference.anatomy import FemurLandmarks

    return FemurLandmarks(**{k: (np.asarray(v) if isinstance(v, list) else v) for k, v in data.items()})


# ----------------------------------------------------------------------------------------------
# Parameters
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TissueParams:
    """Tissue appearance of one phantom (HU, mm). Defaults are the atlas's nominal values.

    Parameters
    ----------
    cortical_hu : float
        Cortical bone of femur and pelvis (1200-1800 sampled).
    cortical_thickness_head_mm : float
        Femoral cortex at the head, neck and trochanters (0.7-1.4).
    cortical_thickness_shaft_mm : float
        Femoral cortex in the diaphysis, reached about 70 mm below the lesser trochanter (4-6).
    pelvis_cortical_thickness_mm : float
        Cortex of the pelvis (1-2).
    cancellous_hu : float
        Cancellous bone of the femoral metaphysis (mean, before texture; 150-320).
    head_cancellous_boost_hu : float
        Extra density of the femoral head's cancellous bone (40-150), highest under the cartilage.
    pelvis_cancellous_hu : float
        Cancellous bone of the pelvis (150-320).
    trabecular_contrast : float
        Relative modulation of cancellous bone by the trabecular texture (0 = smooth, 0.2-0.5).
    trabecular_scale_mm : float
        Typical spacing of the texture's plates (2.5-4).
    marrow_hu : float
        Fatty marrow of the diaphyseal canal (-50..+30).
    muscle_hu, fat_hu : float
        Muscle / soft tissue (30-60) and subcutaneous fat (-120..-80).
    muscle_thickness_mm, fat_thickness_mm : float
        Mean distance from the bones to the fat layer, and the fat layer's thickness.
    envelope_variation_mm : float
        Amplitude of the smooth random variation of both thicknesses.
    soft_tissue_variation_hu : float
        Amplitude of smooth HU variation in the muscle (fat between muscles, 0-15).
    noise_sigma_hu : float
        White Gaussian noise added at the end (0 for the atlas).
    seed : int
        Seed of the texture, envelope variation and noise (>= 0).
    """

    cortical_hu: float = 1500.0
    cortical_thickness_head_mm: float = 1.0
    cortical_thickness_shaft_mm: float = 5.0
    pelvis_cortical_thickness_mm: float = 1.5
    cancellous_hu: float = 230.0
    head_cancellous_boost_hu: float = 90.0
    pelvis_cancellous_hu: float = 220.0
    trabecular_contrast: float = 0.35
    trabecular_scale_mm: float = 3.0
    marrow_hu: float = -10.0
    muscle_hu: float = 45.0
    fat_hu: float = -100.0
    muscle_thickness_mm: float = 35.0
    fat_thickness_mm: float = 25.0
    envelope_variation_mm: float = 8.0
    soft_tissue_variation_hu: float = 8.0
    noise_sigma_hu: float = 10.0
    seed: int = 0

    def __post_init__(self) -> None:
        owner = "TissueParams"
        for name, low, high in (
                ("cortical_hu", 300, 3000),
                ("cortical_thickness_head_mm", 0.2, 5),
                ("cortical_thickness_shaft_mm", 0.2, 12),
                ("pelvis_cortical_thickness_mm", 0.2, 5),
                ("cancellous_hu", -100, 1500),
                ("head_cancellous_boost_hu", 0, 1000),
                ("pelvis_cancellous_hu", -100, 1500),
                ("trabecular_contrast", 0, 1),
                ("trabecular_scale_mm", 1, 16),
                ("marrow_hu", -200, 200),
                ("muscle_hu", -50, 150),
                ("fat_hu", -200, 0),
                ("muscle_thickness_mm", 1, 200),
                ("fat_thickness_mm", 0, 200),
                ("envelope_variation_mm", 0, 50),
                ("soft_tissue_variation_hu", 0, 100),
                ("noise_sigma_hu", 0, 200),
        ):
            number(getattr(self, name), f"{owner} {name}", low, high, error=DataError)
        object.__setattr__(self, "seed", whole_number(self.seed, f"{owner} seed", 0, error=DataError))
        if self.cortical_hu <= max(self.cancellous_hu + self.head_cancellous_boost_hu, self.pelvis_cancellous_hu):
            raise DataError(
                f"TissueParams cortical_hu ({self.cortical_hu}) must exceed the cancellous bone "
                f"({self.cancellous_hu} + {self.head_cancellous_boost_hu}, pelvis {self.pelvis_cancellous_hu})"
            )


def sample_tissue_params(rng: np.random.Generator) -> TissueParams:
    """Random tissue parameters within the ranges listed in :class:`TissueParams`."""
    u = rng.uniform
    return TissueParams(
        cortical_hu=u(1200, 1800),
        cortical_thickness_head_mm=u(0.7, 1.4),
        cortical_thickness_shaft_mm=u(4.0, 6.0),
        pelvis_cortical_thickness_mm=u(1.0, 2.0),
        cancellous_hu=u(150, 300),
        head_cancellous_boost_hu=u(40, 150),
        pelvis_cancellous_hu=u(150, 320),
        trabecular_contrast=u(0.2, 0.5),
        trabecular_scale_mm=u(2.5, 4.0),
        marrow_hu=u(-50, 30),
        muscle_hu=u(30, 60),
        fat_hu=u(-120, -80),
        muscle_thickness_mm=u(20, 50),
        fat_thickness_mm=u(10, 45),
        envelope_variation_mm=u(0, 15),
        soft_tissue_variation_hu=u(0, 15),
        noise_sigma_hu=u(0, 25),
        seed=int(rng.integers(0, 2**31 - 1)),
    )


def _vec3(owner: str, name: str, value, limit: float) -> tuple[float, float, float]:
    try:
        vec = tuple(float(v) for v in value)
    except TypeError:
        raise DataError(f"{owner} {name} must be 3 numbers, not {value!r}") from None
    if len(vec) != 3 or not all(math.isfinite(v) for v in vec) or max(abs(v) for v in vec) > limit:
        raise DataError(f"{owner} {name} must be 3 finite numbers within +-{limit}, not {value!r}")
    return vec


@dataclass(frozen=True)
class PhantomParams:
    """Everything that makes one phantom of a subject (a deterministic recipe).

    Parameters
    ----------
    shape : inference.data.shape.ShapeParams or None
        Shape augmentation in the canonical frame; None = the subject's own shape.
    rotation_deg : (3,) float
        Pose rotation about the canonical x, y, z axes through :data:`POSE_PIVOT_MM`, applied in
        the order x, then y, then z (``R = Rz @ Ry @ Rx``); the paper samples +-10 deg.
    translation_mm : (3,) float
        Pose translation after the rotation.
    hip_rotation_deg : (3,) float
        Extra rotation of the pelvis about the femoral head centre (x, y, z order as above): the
        hip joint's own variation between patients and positioning.
    tissue : TissueParams
    """

    shape: Any = None
    rotation_deg: tuple[float, float, float] = (0.0, 0.0, 0.0)
    translation_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    hip_rotation_deg: tuple[float, float, float] = (0.0, 0.0, 0.0)
    tissue: TissueParams = field(default_factory=TissueParams)

    def __post_init__(self) -> None:
        object.__setattr__(self, "rotation_deg", _vec3("PhantomParams", "rotation_deg", self.rotation_deg, 45.0))
        object.__setattr__(self, "translation_mm", _vec3("PhantomParams", "translation_mm", self.translation_mm, 50.0))
        object.__setattr__(self, "hip_rotation_deg",
                           _vec3("PhantomParams", "hip_rotation_deg", self.hip_rotation_deg, 30.0))
        if not isinstance(self.tissue, TissueParams):
            raise DataError(f"PhantomParams tissue must be a TissueParams, not {type(self.tissue).__name__}")

    def to_dict(self) -> dict:
        """JSON-friendly form (for manifests)."""
        shape = self.shape
        if shape is not None:
            shape = shape.to_dict() if hasattr(shape, "to_dict") else dataclasses.asdict(shape)
        return {"shape": shape, "rotation_deg": list(self.rotation_deg), "translation_mm": list(self.translation_mm),
                "hip_rotation_deg": list(self.hip_rotation_deg), "tissue": dataclasses.asdict(self.tissue)}

    @classmethod
    def from_dict(cls, data: dict) -> "PhantomParams":
        """Inverse of :meth:`to_dict` (e.g. to remake a data set sample from its manifest)."""
        try:
            shape = data.get("shape")
            if shape is not None:
                from inference.data.shape import ShapeParams

                shape = ShapeParams(**shape)
            return cls(shape, tuple(data["rotation_deg"]), tuple(data["translation_mm"]),
                       tuple(data.get("hip_rotation_deg", (0.0, 0.0, 0.0))), TissueParams(**data["tissue"]))
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, DataError):
                raise
            raise DataError(f"phantom parameters are incomplete or malformed: {exc}") from exc


def sample_phantom_params(rng: np.random.Generator, *, max_rotation_deg: float = 10.0,
                          max_translation_mm: float = 5.0, max_hip_rotation_deg: float = 5.0,
                          shape: bool = True, tissue: bool = True) -> PhantomParams:
    """Random phantom parameters: shape, pose within +-``max_rotation_deg`` about each axis (as in
    the paper), translation within +-``max_translation_mm``, hip rotation and tissue.

    ``shape=False`` keeps the subject's shape; ``tissue=False`` keeps the nominal tissue
    (:class:`TissueParams` defaults) with a random seed.
    """
    shape_params = None
    if shape:
        from inference.data.shape import sample_shape_params

        shape_params = sample_shape_params(rng)
    rotation = tuple(rng.uniform(-max_rotation_deg, max_rotation_deg, 3))
    translation = tuple(rng.uniform(-max_translation_mm, max_translation_mm, 3))
    hip = tuple(rng.uniform(-max_hip_rotation_deg, max_hip_rotation_deg, 3))
    tissue_params = (sample_tissue_params(rng) if tissue
                     else TissueParams(seed=int(rng.integers(0, 2**31 - 1))))
    return PhantomParams(shape_params, rotation, translation, hip, tissue_params)


def _rotation_xyz(angles_deg) -> np.ndarray:
    ax, ay, az = np.deg2rad(np.asarray(angles_deg, dtype=np.float64))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def pose_matrix(params: PhantomParams) -> np.ndarray:
    """4x4 taking deformed canonical femur coordinates to the grid's world (the pose)."""
    rotation = _rotation_xyz(params.rotation_deg)
    pivot = np.asarray(POSE_PIVOT_MM)
    matrix = np.eye(4)
    matrix[:3, :3] = rotation
    matrix[:3, 3] = pivot - rotation @ pivot + np.asarray(params.translation_mm)
    return matrix


# ----------------------------------------------------------------------------------------------
# Phantom
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Phantom:
    """A synthetic CT on a grid.

    Attributes
    ----------
    ct_hu : ndarray, (Z, Y, X) float32
    labels : ndarray, (Z, Y, X) uint8; 1 femur, 2 pelvis
    geometry : inference.geometry.VolumeGeometry
    landmarks_mm : dict of name -> (3,) float64, in the grid's world (``LANDMARK_NAMES``)
    head_radius_mm : float
        Radius of the (deformed) femoral head.
    params : PhantomParams
    subject : str
    """

    ct_hu: np.ndarray
    labels: np.ndarray
    geometry: Any
    landmarks_mm: dict
    head_radius_mm: float
    params: PhantomParams
    subject: str


def _smoothstep(x: np.ndarray) -> np.ndarray:
    t = np.clip(x, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _inside_fraction(sdf: np.ndarray, width_mm: float) -> np.ndarray:
    """Fraction of a voxel inside a surface from the signed distance at its centre.

    A plane through a voxel of size ``width`` cuts off a fraction that grows (nearly) linearly
    from 0 to 1 as the centre goes from ``width/2`` outside to ``width/2`` inside: a linear ramp is
    the partial-volume effect to first order and anti-aliases every boundary.
    """
    return np.clip(0.5 - sdf / np.float32(width_mm), 0.0, 1.0)


def _trabecular_tile(rng: np.random.Generator, scale_mm: float, blur_xyz_mm) -> ScalarField:
    """Periodic trabecular-like texture, zero mean and unit variance, 1 mm voxels.

    Band-passed white noise (a Gaussian shell around the spatial frequency 1/scale) has smooth
    blobs; ``exp(-(n / 0.5 sd)^2)`` keeps thin sheets at its zero crossings, which connect into a
    plate-and-rod network like trabecular bone. A final Gaussian blur of a fraction of the output
    voxel size stops the texture from aliasing on coarse grids. Periodic by construction (FFT), it
    is sampled with wrap-around.
    """
    n = TEXTURE_TILE_MM
    noise = rng.standard_normal((n, n, n)).astype(np.float32)
    freq = sp_fft.fftfreq(n)
    rfreq = sp_fft.rfftfreq(n)
    radius = np.sqrt(freq[:, None, None] ** 2 + freq[None, :, None] ** 2 + rfreq[None, None, :] ** 2)
    f0 = 1.0 / (2.0 * scale_mm)  # sheets come in pairs of zero crossings per wavelength
    band = np.exp(-0.5 * ((radius - f0) / (0.4 * f0)) ** 2)
    smooth = sp_fft.irfftn(sp_fft.rfftn(noise) * band, s=noise.shape).astype(np.float32)
    smooth /= max(float(smooth.std()), 1e-12)
    sheets = np.exp(-(smooth / 0.5) ** 2)
    sigma = [0.4 * b for b in blur_xyz_mm[::-1]]
    sheets = ndimage.gaussian_filter(sheets, sigma=sigma, mode="wrap")
    sheets -= sheets.mean()
    sheets /= max(float(sheets.std()), 1e-12)
    return ScalarField(sheets, np.zeros(3), 1.0)


class _SmoothNoise:
    """A smooth random scalar function of position with unit standard deviation.

    A sum of a few plane waves with random directions, wavelengths (80-200 mm) and phases: cheap
    to evaluate at any point and smooth on the scale of a body envelope.
    """

    def __init__(self, rng: np.random.Generator, terms: int = 4, wavelength_mm=(80.0, 200.0)):
        directions = rng.standard_normal((terms, 3))
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        wavelengths = rng.uniform(*wavelength_mm, terms)
        self.k = (2 * np.pi * directions / wavelengths[:, None]).astype(np.float32)
        self.phase = rng.uniform(0, 2 * np.pi, terms).astype(np.float32)
        self.scale = np.float32(np.sqrt(2.0 / terms))

    def __call__(self, points_xyz: np.ndarray) -> np.ndarray:
        return (np.sin(self.k @ points_xyz + self.phase[:, None]).sum(axis=0) * self.scale).astype(np.float32)


def compose_hu(*, femur_sdf: np.ndarray, femur_uvw: np.ndarray, pelvis_sdf: np.ndarray | None,
               body_mm: np.ndarray, femur_texture: np.ndarray, pelvis_texture: np.ndarray | None,
               muscle_offset_mm: np.ndarray, fat_offset_mm: np.ndarray, muscle_variation: np.ndarray,
               tissue: TissueParams, head_radius_mm: float, lesser_trochanter_z_mm: float,
               voxel_mm: float, shaft_xy_mm: tuple[float, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Tissue fractions and HU of voxels from their distances to the bones (no noise).

    All arrays are flat (N,) float32 except ``femur_uvw`` (3, N), the undeformed canonical
    position of each voxel in the femur's frame (head centre at the origin).

    Parameters
    ----------
    femur_sdf, pelvis_sdf : (N,)
        Signed distance to the femur / pelvis surface (mm, negative inside); pelvis may be None.
    body_mm : (N,)
        Distance from the nearest bone (mm, 0 inside bone).
    femur_texture, pelvis_texture : (N,)
        Trabecular texture (zero mean, unit variance).
    muscle_offset_mm, fat_offset_mm : (N,)
        Smooth variation added to the muscle and fat thicknesses.
    muscle_variation : (N,)
        Smooth unit variation of the muscle HU.
    lesser_trochanter_z_mm : float
        Canonical height of the lesser trochanter: the cortex thickens and the marrow canal opens
        below it.
    voxel_mm : float
        Width of the partial-volume ramps.
    shaft_xy_mm : (float, float), optional
        Canonical (x, y) of the shaft axis (relative to the head centre): the muscle is thicker
        medially of it (:data:`MEDIAL_MUSCLE_GAIN`); None = the same all round.

    Returns
    -------
    hu : (N,) float32
    labels : (N,) uint8 (1 femur, 2 pelvis)
    """
    t = tissue
    f32 = np.float32
    z = femur_uvw[2]
    z_lt = f32(lesser_trochanter_z_mm)
    # Cortical thickness: thin (head value) down to 10 mm below the lesser trochanter, full
    # diaphyseal thickness from 80 mm below it, smooth in between.
    grow = _smoothstep((z_lt - f32(10.0) - z) / f32(70.0))
    thickness = f32(t.cortical_thickness_head_mm) + f32(t.cortical_thickness_shaft_mm - t.cortical_thickness_head_mm) * grow
    outer = _inside_fraction(femur_sdf, voxel_mm)
    inner = _inside_fraction(femur_sdf + thickness, voxel_mm)
    cortex = outer - inner
    depth = np.maximum(-femur_sdf - thickness, f32(0.0))  # mm below the endosteal surface

    # Cancellous density: metaphysis value, plus a boost over the whole head that is largest in
    # the subchondral bone under the cartilage (first ~4 mm below the cortex).
    r = np.sqrt((femur_uvw * femur_uvw).sum(axis=0))
    head = _smoothstep((f32(1.05 * head_radius_mm) - r) / f32(0.35 * head_radius_mm))
    boost = f32(t.head_cancellous_boost_hu) * head * (f32(0.6) + f32(0.8) * np.exp(-depth / f32(4.0)))
    density = f32(t.cancellous_hu - t.marrow_hu) + boost
    cancellous = f32(t.marrow_hu) + density * np.maximum(f32(1.0) + f32(t.trabecular_contrast) * femur_texture, 0.0)
    # Cancellous bone fills the proximal femur and gives way to marrow from 20 to 60 mm below the
    # lesser trochanter; a thin cancellous lining stays on the endosteum a little further down.
    metaphysis = _smoothstep((z - (z_lt - f32(60.0))) / f32(40.0))
    lining = f32(0.6) * np.exp(-depth / f32(2.0)) * _smoothstep((z - (z_lt - f32(120.0))) / f32(50.0))
    w_cancellous = np.maximum(metaphysis, lining)
    interior = w_cancellous * cancellous + (f32(1.0) - w_cancellous) * f32(t.marrow_hu)
    bone_hu = cortex * f32(t.cortical_hu) + inner * interior
    bone_fraction = outer

    if pelvis_sdf is not None:
        p_outer = _inside_fraction(pelvis_sdf, voxel_mm)
        p_inner = _inside_fraction(pelvis_sdf + f32(t.pelvis_cortical_thickness_mm), voxel_mm)
        p_canc = f32(t.marrow_hu) + f32(t.pelvis_cancellous_hu - t.marrow_hu) * np.maximum(
            f32(1.0) + f32(t.trabecular_contrast) * pelvis_texture, 0.0)
        bone_hu = bone_hu + (p_outer - p_inner) * f32(t.cortical_hu) + p_inner * p_canc
        bone_fraction = bone_fraction + p_outer
        # Shape changes can make head and acetabulum touch; share the voxel rather than add.
        over = bone_fraction > 1.0
        if np.any(over):
            bone_hu[over] /= bone_fraction[over]
            bone_fraction = np.minimum(bone_fraction, f32(1.0))

    # Soft tissue: muscle within (thickness + variation) of the bone, a fat layer beyond it, air
    # outside the body. Ramps of at least 2 mm: these interfaces are not sharp in vivo.
    soft_width = max(voxel_mm, 2.0)
    muscle_mm = f32(t.muscle_thickness_mm)
    if shaft_xy_mm is not None:
        # Cosine of the angle between the direction from the shaft axis and the lateral (-x)
        # direction: 1 laterally, -1 medially; the gain grows smoothly from lateral to medial.
        dx = femur_uvw[0] - f32(shaft_xy_mm[0])
        dy = femur_uvw[1] - f32(shaft_xy_mm[1])
        cos_lateral = -dx / np.maximum(np.sqrt(dx * dx + dy * dy), f32(1e-3))
        muscle_mm = muscle_mm * (f32(1.0) + f32(0.5 * MEDIAL_MUSCLE_GAIN) * (f32(1.0) - cos_lateral))
    muscle_edge = np.maximum(muscle_mm + muscle_offset_mm, f32(5.0))
    body_edge = muscle_edge + np.maximum(f32(t.fat_thickness_mm) + fat_offset_mm, f32(0.0))
    in_muscle = _inside_fraction(body_mm - muscle_edge, soft_width)
    in_body = _inside_fraction(body_mm - body_edge, soft_width)
    muscle_hu = f32(t.muscle_hu) + f32(t.soft_tissue_variation_hu) * muscle_variation
    soft = in_muscle * muscle_hu + (in_body - in_muscle) * f32(t.fat_hu) + (f32(1.0) - in_body) * f32(AIR_HU)

    hu = bone_hu + (f32(1.0) - bone_fraction) * soft
    labels = np.zeros(hu.shape, dtype=np.uint8)
    if pelvis_sdf is not None:
        labels[pelvis_sdf < 0] = 2
    labels[femur_sdf < 0] = 1
    return hu.astype(np.float32, copy=False), labels


def _resolve_model(subject) -> SubjectModel:
    if isinstance(subject, SubjectModel):
        return subject
    if isinstance(subject, (tuple, list)) and len(subject) == 2:
        return load_subject_model(subject[0], subject[1])
    if isinstance(subject, str):
        return load_subject_model(subject)
    raise DataError(f"subject must be a SubjectModel or a name like 'MC22:right', not {subject!r}")


def _shape_transform(model: SubjectModel, params: PhantomParams, deformation: Any = None):
    """The shape map of a phantom: ``deformation`` (if any), then ``params.shape`` (if any)."""
    if params.shape is None:
        return deformation
    if model.shape_landmarks is None:
        raise DataError(f"subject model {model.name} has no landmarks for shape augmentation; use shape=None")
    from inference.data.shape import ShapeTransform, compose

    return compose(deformation, ShapeTransform(params.shape, model.shape_landmarks))


def _head_scale(transform, centre: np.ndarray, radius: float) -> tuple[np.ndarray, float]:
    """Deformed head centre and the head's scale factor under a shape transform.

    Six points on the head sphere along the axes are mapped; their mean distance from the mapped
    centre over the radius is the local scale the acetabulum must follow.
    """
    probe = np.vstack([centre, centre + radius * np.vstack([np.eye(3), -np.eye(3)])])
    moved = np.asarray(transform.apply_points(probe), dtype=np.float64)
    scale = float(np.linalg.norm(moved[1:] - moved[0], axis=1).mean() / radius)
    return moved[0], scale


def make_phantom(subject, params: PhantomParams, grid, *, chunk_voxels: int = 1 << 20,
                 deformation: Any = None) -> Phantom:
    """A CT phantom of ``subject`` made by ``params`` on ``grid`` (deterministic).

    The grid's world frame is the canonical femur frame after the pose: a femur point ``p`` of the
    undeformed subject lands at ``pose_matrix(params) @ shape(p)``. The pelvis follows the
    deformed femoral head (translated with its centre, scaled with its size, rotated about it by
    ``hip_rotation_deg``) and then the same pose.

    Parameters
    ----------
    subject : SubjectModel or str
        A model from :func:`load_subject_model`, or its name (``"MC22:left"``).
    params : PhantomParams
    grid : inference.geometry.VolumeGeometry
        Output grid, normally an atlas grid (``inference.data.atlas.grid_geometry``).
    chunk_voxels : int
        Voxels processed at once (bounds the memory of large grids).
    deformation : optional
        An invertible point map of the canonical frame (``apply_points``/``inverse_points``, e.g.
        :class:`inference.data.shape_model.ShapeModelDeformation`) applied before ``params.shape``.

    Returns
    -------
    Phantom

    Notes
    -----
    CPU time on one core once the subject model is cached (measured on the shared 2-core machine):
    compact grid 0.4 s without and 0.65 s with shape augmentation (the inverse shape transform is
    evaluated on a 4 mm lattice only); paper grid 2.8 s and 3.7 s.
    """
    if not isinstance(params, PhantomParams):
        raise DataError(f"params must be PhantomParams, not {type(params).__name__}")
    model = _resolve_model(subject)
    tissue = params.tissue
    rng = np.random.default_rng(tissue.seed)
    spacing = np.asarray(grid.spacing_xyz_mm, dtype=np.float64)
    voxel_mm = float(np.prod(spacing) ** (1.0 / 3.0))
    # Random fields, drawn in a fixed order from the tissue seed.
    texture = _trabecular_tile(rng, tissue.trabecular_scale_mm, spacing)
    muscle_noise, fat_noise, hu_noise = _SmoothNoise(rng), _SmoothNoise(rng), _SmoothNoise(rng, 6, (30.0, 90.0))
    pelvis_shift = rng.uniform(0.0, TEXTURE_TILE_MM, 3)  # pelvis texture must not copy the femur's

    pose = pose_matrix(params)
    i2w = grid.index_to_world()
    index_to_canonical, transform, displacement = _femur_sampling(model, params, grid, deformation)
    head = model.landmarks_mm["head_centre"]
    if transform is None:
        head_deformed, head_scale = head.copy(), 1.0
        landmarks = dict(model.landmarks_mm)
    else:
        head_deformed, head_scale = _head_scale(transform, head, model.head_radius_mm)
        names = list(model.landmarks_mm)
        moved = np.asarray(transform.apply_points(np.stack([model.landmarks_mm[n] for n in names])))
        landmarks = dict(zip(names, moved))
    # Pelvis: deformed-canonical c -> undeformed pelvis u = Rh^T (c - h') / s + h.
    hip = _rotation_xyz(params.hip_rotation_deg)
    canonical_to_pelvis = np.eye(4)
    canonical_to_pelvis[:3, :3] = hip.T / head_scale
    canonical_to_pelvis[:3, 3] = head - hip.T @ head_deformed / head_scale
    index_to_pelvis = canonical_to_pelvis @ index_to_canonical

    shape_zyx = tuple(grid.shape_zyx)
    nz, ny, nx = shape_zyx

    hu = np.empty(nz * ny * nx, dtype=np.float32)
    labels = np.empty(nz * ny * nx, dtype=np.uint8)
    lt_z = float(model.landmarks_mm["lesser_trochanter"][2])
    shaft = model.landmarks_mm.get("shaft_point_proximal")
    shaft_xy = None if shaft is None else (float(shaft[0] - head[0]), float(shaft[1] - head[1]))
    for k0, k1, ijk in _index_chunks(shape_zyx, chunk_voxels):
        world = _affine(i2w, ijk)
        femur_uvw = _femur_uvw(index_to_canonical, displacement, ijk)
        pelvis_uvw = _affine(index_to_pelvis, ijk)
        femur_sdf = model.femur_sdf.sample(femur_uvw)
        body = model.femur_body.sample(femur_uvw)
        pelvis_sdf = pelvis_tex = None
        if model.pelvis_sdf is not None:
            # Carve a joint space: no pelvis closer than JOINT_SPACE_MIN_MM to the head sphere.
            to_head = pelvis_uvw - head[:, None].astype(np.float32)
            head_gap = np.float32(model.head_radius_mm + JOINT_SPACE_MIN_MM) - np.sqrt((to_head * to_head).sum(axis=0))
            pelvis_sdf = np.maximum(model.pelvis_sdf.sample(pelvis_uvw), head_gap)
            body = np.minimum(body, model.pelvis_body.sample(pelvis_uvw))
            pelvis_tex = texture.sample(pelvis_uvw + pelvis_shift[:, None].astype(np.float32), mode="grid-wrap")
        femur_tex = texture.sample(femur_uvw, mode="grid-wrap")
        centred = femur_uvw - head[:, None].astype(np.float32)
        chunk_hu, chunk_labels = compose_hu(
            femur_sdf=femur_sdf, femur_uvw=centred, pelvis_sdf=pelvis_sdf, body_mm=body,
            femur_texture=femur_tex, pelvis_texture=pelvis_tex,
            muscle_offset_mm=np.float32(tissue.envelope_variation_mm) * muscle_noise(world),
            fat_offset_mm=np.float32(tissue.envelope_variation_mm) * fat_noise(world),
            muscle_variation=hu_noise(world), tissue=tissue, head_radius_mm=model.head_radius_mm,
            lesser_trochanter_z_mm=lt_z - float(head[2]), voxel_mm=voxel_mm, shaft_xy_mm=shaft_xy)
        hu[k0 * ny * nx:k1 * ny * nx] = chunk_hu
        labels[k0 * ny * nx:k1 * ny * nx] = chunk_labels
    hu = hu.reshape(shape_zyx)
    if tissue.noise_sigma_hu > 0:
        hu += np.float32(tissue.noise_sigma_hu) * rng.standard_normal(shape_zyx, dtype=np.float32)
    landmarks_world = {n: pose[:3, :3] @ np.asarray(p, dtype=np.float64) + pose[:3, 3] for n, p in landmarks.items()}
    return Phantom(hu, labels.reshape(shape_zyx), grid, landmarks_world,
                   model.head_radius_mm * head_scale, params, model.name)


def femur_mask(subject, params: PhantomParams, grid, *, chunk_voxels: int = 1 << 20,
               deformation: Any = None) -> np.ndarray:
    """The femur of ``make_phantom(subject, params, grid)`` alone: (Z, Y, X) bool, True where the
    phantom's femur signed distance is negative at the voxel centre.

    No CT is composed, so it is cheap on fine grids: the ground truth of a simulated case sampled
    on any grid (e.g. an output grid finer than the phantom CT), not a resampled voxel map. The
    grid may be mirrored (a left hip's grid brought into the phantom's right-femur frame).
    """
    if not isinstance(params, PhantomParams):
        raise DataError(f"params must be PhantomParams, not {type(params).__name__}")
    model = _resolve_model(subject)
    index_to_canonical, _, displacement = _femur_sampling(model, params, grid, deformation)
    shape_zyx = tuple(grid.shape_zyx)
    inside = np.empty(int(np.prod(shape_zyx)), dtype=bool)
    plane = shape_zyx[1] * shape_zyx[2]
    for k0, k1, ijk in _index_chunks(shape_zyx, chunk_voxels):
        inside[k0 * plane:k1 * plane] = model.femur_sdf.sample(_femur_uvw(index_to_canonical, displacement, ijk)) < 0
    return inside.reshape(shape_zyx)


def _femur_sampling(model: SubjectModel, params: PhantomParams, grid, deformation: Any = None):
    """(index_to_canonical, shape transform, inverse-shape lattice) of a phantom on ``grid``: the
    grid's voxel indices to the posed canonical frame, the shape map (None without one) and its
    inverse's displacement on a lattice (None without one)."""
    index_to_canonical = np.linalg.inv(pose_matrix(params)) @ grid.index_to_world()
    transform = _shape_transform(model, params, deformation)
    displacement = None if transform is None else _inverse_shape_lattice(
        transform, index_to_canonical, tuple(grid.shape_zyx), np.asarray(grid.spacing_xyz_mm, dtype=np.float64))
    return index_to_canonical, transform, displacement


def _femur_uvw(index_to_canonical: np.ndarray, displacement: dict | None, ijk: np.ndarray) -> np.ndarray:
    """The undeformed canonical femur coordinates (3, N) float32 of voxel indices ``ijk``, where
    the femur's distance fields are sampled."""
    uvw = _affine(index_to_canonical, ijk)
    if displacement is not None:
        uvw += _sample_lattice(displacement, ijk)
    return uvw


def femur_signed_distance_at(model: SubjectModel, params: PhantomParams, grid, ijk: np.ndarray,
                             chunk: int = 1 << 20) -> np.ndarray:
    """The phantom femur's signed distance (mm, < 0 inside) at continuous voxel indices ``ijk``
    (3, N: x, y, z) of ``grid`` (phantom frame): :func:`femur_mask`'s field at any points, not only
    voxel centres. The shape map's inverse is tabulated on a lattice tied to ``grid``; points a
    little outside the grid read its clamped edge, which the map's millimetre scale allows."""
    index_to_canonical, _, displacement = _femur_sampling(model, params, grid)
    ijk = np.asarray(ijk, np.float32)
    out = np.empty(ijk.shape[1], np.float32)
    for start in range(0, ijk.shape[1], chunk):
        part = ijk[:, start:start + chunk]
        out[start:start + part.shape[1]] = model.femur_sdf.sample(_femur_uvw(index_to_canonical, displacement, part))
    return out


def _index_chunks(shape_zyx, chunk_voxels: int):
    """(k0, k1, ijk) per slab of whole z slices: ijk the (3, N) float32 x, y, z indices of its voxels."""
    nz, ny, nx = shape_zyx
    rows_per_chunk = max(1, chunk_voxels // (ny * nx))
    for k0 in range(0, nz, rows_per_chunk):
        k1 = min(nz, k0 + rows_per_chunk)
        kk, jj, ii = np.meshgrid(np.arange(k0, k1, dtype=np.float32), np.arange(ny, dtype=np.float32),
                                 np.arange(nx, dtype=np.float32), indexing="ij")
        yield k0, k1, np.stack([ii.ravel(), jj.ravel(), kk.ravel()])


def _affine(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """4x4 affine applied to (3, N) float32 points."""
    return (matrix[:3, :3].astype(np.float32) @ points) + matrix[:3, 3].astype(np.float32)[:, None]


def _inverse_shape_lattice(transform, index_to_canonical: np.ndarray, shape_zyx, spacing_xyz) -> dict:
    """Displacement (undeformed - deformed canonical) of the inverse shape transform on a lattice.

    The lattice takes every ``stride``-th voxel of the grid per axis (about :data:`SHAPE_LATTICE_MM`)
    and one beyond the last voxel, so interpolation never extrapolates.
    """
    stride = np.maximum(1, np.round(SHAPE_LATTICE_MM / np.asarray(spacing_xyz)).astype(int))  # x, y, z
    axes = [np.arange(0, (n - 1) + s + 1, s, dtype=np.float64) for n, s in zip(shape_zyx[::-1], stride)]
    kk, jj, ii = np.meshgrid(axes[2], axes[1], axes[0], indexing="ij")
    ijk = np.stack([ii.ravel(), jj.ravel(), kk.ravel()])
    canonical = index_to_canonical[:3, :3] @ ijk + index_to_canonical[:3, 3:4]
    undeformed = np.asarray(transform.inverse_points(canonical.T), dtype=np.float64).T
    values = (undeformed - canonical).astype(np.float32).reshape(3, *kk.shape)
    return {"values": values, "stride": stride.astype(np.float32)}


def _sample_lattice(lattice: dict, ijk: np.ndarray) -> np.ndarray:
    coords = (ijk / lattice["stride"][:, None])[::-1]  # lattice (z, y, x) indices
    return np.stack([ndimage.map_coordinates(lattice["values"][c], coords, order=1, mode="nearest",
                                             output=np.float32) for c in range(3)])
