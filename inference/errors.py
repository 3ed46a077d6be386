"""Typed exceptions for HipAtlas.

Every error raised for bad input is a :class:`HipAtlasError` whose message names the file or
parameter and the problem in words a clinician or IT person can act on. The CLI prints the
message on one line and exits with status 2; the GUI shows it in a dialog.
"""

from __future__ import annotations


class HipAtlasError(Exception):
    """Base class for all expected, user-facing HipAtlas errors."""


class GeometryError(HipAtlasError, ValueError):
    """A projection matrix, C-arm parameter or volume geometry is invalid."""


class CalibrationError(GeometryError):
    """A view's calibration is missing or cannot be derived (e.g. a missing DICOM tag)."""


class InputFileError(HipAtlasError):
    """An input file is missing, unreadable, truncated or of the wrong kind."""


class CaseFormatError(HipAtlasError):
    """case.json (or a geometry file) does not follow the hipatlas-case/1 format."""


class MeshError(HipAtlasError, ValueError):
    """A surface mesh is open, empty or otherwise unusable."""


class DataError(HipAtlasError, ValueError):
    """A volume, label map or data set is unusable (empty label, femur not in view, ...)."""


class ConfigError(HipAtlasError, ValueError):
    """A model or training configuration is inconsistent."""


class ModelError(HipAtlasError):
    """A model file is missing, corrupt, or does not match its model card."""


class Cancelled(HipAtlasError):
    """Long-running work was cancelled by the user."""


class OutputError(HipAtlasError):
    """An output file or folder cannot be written (exists and overwriting is not allowed, no
    permission, unsupported file type)."""


class PacsError(HipAtlasError):
    """A PACS cannot be reached, refuses the association, or refuses or fails a DICOM request."""


class ClusterError(HipAtlasError):
    """A worker of a multi-worker training is gone or unreachable (the run stops; restarting
    every worker with the same command resumes from the last checkpoint)."""
