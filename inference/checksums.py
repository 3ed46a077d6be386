"""SHA-256 of files and bytes: the one helper every checksum in HipAtlas goes through.

Model cards, atlas descriptions, data-set manifests, registration reports, DICOM matching and the
integrity check of the shipped resources all record or compare these hex digests. Standard library
only, so the start-up check (:mod:`inference.resources`) stays cheap.

An unreadable file raises the ``OSError`` the system gives (``PermissionError``, ...): the callers
say what the file was for (the resource check reports it as a damaged installation, a case loader
as an unreadable input).
"""

from __future__ import annotations

import hashlib
import os

__all__ = ["sha256_file", "sha256_bytes"]

_BLOCK_BYTES = 1 << 20


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks (large models and volumes stay out of memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_BLOCK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of bytes in memory (a mask's PNG, a cache key)."""
    return hashlib.sha256(data).hexdigest()
