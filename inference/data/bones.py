"""The bundled training bone surfaces: where they are and which subjects (scans) they hold.

The surfaces (``<repo>/resources/bones``, or ``$HIPATLAS_BONES_DIR``) are training data: phantoms,
data sets and the atlas are made from them. :func:`list_subjects` groups the files per subject;
each subject keeps its own scan frame. Reading and voxelising a surface is :mod:`inference.mesh`.
"""

from __future__ import annotations

import os
import pathlib
import re
from dataclasses import dataclass

from inference.errors import InputFileError

__all__ = ["BoneSubject", "bones_dir", "list_subjects", "specimen_of"]


# ----------------------------------------------------------------------------------------------
# Shared bone surfaces
# ----------------------------------------------------------------------------------------------
# Source data sets of the bundled bones (see resources/bones/README.md). "specimen" groups the
# files of one physical person: TLEM2 CT and MRI are one specimen and must share a split.
_SOURCES = {
    "JIA_MRI": ("JIA-MRI (Montefiori et al. 2019)", "JIA", "MRI"),
    "MC22": ("Montefiori et al. 2020", "MC22", "MRI"),
    "TLEM2_MRI": ("TLEM 2.0 (Carbone et al. 2015)", "TLEM2", "MRI"),
    "TLEM2_CT": ("TLEM 2.0 (Carbone et al. 2015)", "TLEM2", "CT"),
}


def specimen_of(subject: str) -> str:
    """The physical person of a subject or femur name: ``"JIA_MRI"`` and ``"JIA_MRI:left"`` give
    ``"JIA"``, ``"TLEM2_CT"`` gives ``"TLEM2"``; an unknown subject is its own specimen."""
    name = subject.split(":", 1)[0]
    return _SOURCES.get(name, (name, name, ""))[1]


@dataclass(frozen=True)
class BoneSubject:
    """The surfaces of one subject (one scan) in the shared bone folder.

    Attributes
    ----------
    subject_id : str
        File prefix, e.g. ``"MC22"`` or ``"TLEM2_CT"``.
    source : str
        Source data set in words.
    specimen : str
        The physical person; several scans of one person share it (``"TLEM2"``). Split data sets
        by specimen.
    modality : str
        ``"CT"`` or ``"MRI"`` (or ``""`` if unknown).
    femur_paths : dict
        ``{"left": Path, "right": Path}`` for the sides that exist.
    pelvis_path : pathlib.Path or None
        Hemipelves without sacrum, if present.
    """

    subject_id: str
    source: str
    specimen: str
    modality: str
    femur_paths: dict
    pelvis_path: pathlib.Path | None


def bones_dir() -> pathlib.Path:
    """Folder of the bone STL files.

    ``$HIPATLAS_BONES_DIR`` if set, else the surfaces bundled with HipAtlas
    (``<repo>/resources/bones``; provenance, licence and citations in its README).

    Raises
    ------
    InputFileError
        If the folder does not exist.
    """
    env = os.environ.get("HIPATLAS_BONES_DIR")
    if env:
        folder = pathlib.Path(env).expanduser()
        if not folder.is_dir():
            raise InputFileError(f"HIPATLAS_BONES_DIR={env} is not a folder")
        return folder
    from inference.resources import bones_resource_dir

    folder = bones_resource_dir()
    if not folder.is_dir():
        raise InputFileError(
            f"bone surface folder {folder} not found; this installation does not ship the training "
            "surfaces: set HIPATLAS_BONES_DIR to a folder of <subject>_femur_l/_r.stl files"
        )
    return folder


_FILE_RE = re.compile(r"^(?P<subject>.+?)_(?:femur_(?P<side>[lr])|(?P<pelvis>pelvis)(?:_no_sacrum)?)\.stl$", re.I)


def list_subjects(folder: str | os.PathLike | None = None) -> list[BoneSubject]:
    """List the subjects of the bone folder (sorted by id), grouping femurs and pelvis per subject.

    Files are named ``<subject>_femur_l.stl``, ``<subject>_femur_r.stl`` and
    ``<subject>_pelvis_no_sacrum.stl``; other files are ignored.
    """
    folder = bones_dir() if folder is None else pathlib.Path(folder)
    femurs: dict[str, dict[str, pathlib.Path]] = {}
    pelves: dict[str, pathlib.Path] = {}
    for path in sorted(folder.iterdir()):
        match = _FILE_RE.match(path.name)
        if not match or not path.is_file():
            continue
        subject = match.group("subject")
        if match.group("pelvis"):
            pelves[subject] = path
        else:
            side = "left" if match.group("side").lower() == "l" else "right"
            femurs.setdefault(subject, {})[side] = path
    subjects = []
    for subject in sorted(set(femurs) | set(pelves)):
        source, specimen, modality = _SOURCES.get(subject, (subject, subject, ""))
        subjects.append(
            BoneSubject(subject, source, specimen, modality, dict(femurs.get(subject, {})), pelves.get(subject))
        )
    return subjects
