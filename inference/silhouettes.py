"""Silhouettes as data: the outline of the registered femur's projection on each radiograph.

A registration writes, per view, ``silhouette_<view>.json`` (``docs/case-format.md``): the closed
polylines, in the radiograph's pixel coordinates ``(u, v)`` (u = column, v = row, the centre of
pixel (0, 0) at (0, 0)), where the projected femur is :data:`THICKNESS_MM` thick. The overlay PNG
(:func:`draw_overlay`), the workstation's contour layer and the planning report draw these
polylines; nothing recovers an outline from coloured pixels.

The outline is the :data:`THICKNESS_MM` isoline of the femur label's path length
(:func:`inference.mask_proposal.project_label`), so it bounds exactly the pixels that
:func:`project_silhouette` counts as the silhouette (used for the mask agreement).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any, Mapping, Sequence

import numpy as np

from inference import io
from inference.errors import InputFileError

FORMAT = "hipatlas-silhouette/1"
#: A pixel belongs to the silhouette where the projected femur is thicker than this (mm).
THICKNESS_MM = 0.5
#: Colour of the femur outline in overlay PNGs (RGB).
CONTOUR_RGB = (255, 64, 32)
#: Decimals of pixel coordinates in the JSON (a thousandth of a pixel).
DECIMALS = 3


@dataclasses.dataclass(frozen=True)
class Silhouette:
    """The outline of the projected femur on one radiograph.

    Attributes
    ----------
    view : the view's name
    image_shape : (rows, cols) of the radiograph
    polylines : tuple of (N, 2) float arrays of (u, v) pixel coordinates; each is closed (its last
        point repeats its first)
    """

    view: str
    image_shape: tuple[int, int]
    polylines: tuple[np.ndarray, ...]

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "view": self.view,
                "image_size_px": [int(n) for n in self.image_shape],
                "coordinates": "pixel (u, v) = (column, row); the centre of pixel (0, 0) is (0, 0)",
                "thickness_mm": THICKNESS_MM,
                "polylines": [{"closed": True, "points_uv": np.round(line, DECIMALS).tolist()}
                              for line in self.polylines]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: Any = "silhouette") -> "Silhouette":
        if not isinstance(data, Mapping) or data.get("format") != FORMAT:
            raise InputFileError(f"{where}: not a HipAtlas silhouette file (format {FORMAT} expected)")
        try:
            rows, cols = (int(n) for n in data["image_size_px"])
            lines = tuple(np.asarray(line["points_uv"], float).reshape(-1, 2) for line in data["polylines"])
        except (KeyError, TypeError, ValueError) as error:
            raise InputFileError(f"{where}: damaged silhouette file ({error}); register the case again") from None
        return cls(str(data.get("view", "")), (rows, cols), lines)


def outline_polylines(thickness_mm: np.ndarray, level_mm: float = THICKNESS_MM) -> tuple[np.ndarray, ...]:
    """Closed (u, v) polylines of the ``level_mm`` isoline of a projected thickness image.

    The image is padded by one pixel of zero thickness so that an outline touching the border
    still closes (along the border, half a pixel outside it, clipped back onto the image).
    """
    from skimage.measure import find_contours

    thickness = np.asarray(thickness_mm, np.float64)
    if not (thickness > level_mm).any():
        return ()
    rows, cols = thickness.shape
    lines = []
    for contour in find_contours(np.pad(thickness, 1), level_mm):  # (row, col), padded
        uv = contour[:, ::-1] - 1.0
        lines.append(np.clip(uv, 0.0, [cols - 1.0, rows - 1.0]))
    lines.sort(key=len, reverse=True)
    return tuple(lines)


@dataclasses.dataclass(frozen=True)
class Projection:
    """The femur label projected onto one radiograph: its thickness (mm) and outline."""

    thickness_mm: np.ndarray
    polylines: tuple[np.ndarray, ...]

    @property
    def mask(self) -> np.ndarray:
        """The silhouette: pixels where the femur is thicker than :data:`THICKNESS_MM`."""
        return self.thickness_mm > THICKNESS_MM

    def silhouette(self, view: str) -> Silhouette:
        return Silhouette(view, tuple(self.thickness_mm.shape), self.polylines)


def project_silhouette(labels: np.ndarray, grid: Any, projection: np.ndarray, shape_hw: Sequence[int],
                       label: int = 1, points: np.ndarray | None = None) -> Projection:
    """Project ``label`` of a label volume onto a radiograph of ``shape_hw`` with ``projection``.

    The thickness is the label's path length from :func:`inference.mask_proposal.project_label`:
    voxel centres splatted onto a detector of about the voxel size, then upsampled. It is numpy
    only; ray marching with :func:`inference.drr.render_path_length` gave the same outline but
    cost ~3 s per new image size in TensorFlow tracing, most of a command-line run. ``points``:
    the label's voxel centres (:func:`inference.mask_proposal.label_points`), when the caller
    projects the label map into several views.
    """
    from inference.mask_proposal import project_label

    thickness = project_label(labels, grid, projection, tuple(int(n) for n in shape_hw), label=label, points=points)
    return Projection(thickness, outline_polylines(thickness))


def similarity_ncc(pixels: np.ndarray, projected: Projection) -> float | None:
    """NCC between the radiograph and the projected femur thickness inside the silhouette's
    bounding box (None without a silhouette or on a flat image)."""
    silhouette = projected.mask
    if not silhouette.any():
        return None
    vv, uu = np.nonzero(silhouette)
    box = (slice(vv.min(), vv.max() + 1), slice(uu.min(), uu.max() + 1))
    a, b = np.asarray(pixels, np.float32)[box].ravel(), projected.thickness_mm[box].ravel()
    if a.std() > 0 and b.std() > 0:
        return float(np.corrcoef(a, b)[0, 1])
    return None


def line_width_px(image_shape: Sequence[int]) -> int:
    """Width of the outline in an overlay PNG: one pixel per 600 pixels of the longer side."""
    return max(1, int(round(max(image_shape) / 600)))


def grey_rgb(pixels: np.ndarray) -> np.ndarray:
    """The radiograph in grey (0.5 to 99.5 percentile window) as (rows, cols, 3) uint8."""
    pixels = np.asarray(pixels, np.float32)
    lo, hi = np.percentile(pixels, [0.5, 99.5])
    grey = np.clip((pixels - lo) / max(hi - lo, 1e-6), 0, 1)
    return np.repeat((grey * 255).astype(np.uint8)[..., None], 3, axis=2)


def draw_overlay(pixels: np.ndarray, polylines: Sequence[np.ndarray], colour: tuple[int, int, int] = CONTOUR_RGB
                 ) -> np.ndarray:
    """The radiograph in grey with ``polylines`` ((u, v) pixels) drawn in ``colour``: RGB uint8."""
    from PIL import Image, ImageDraw

    rgb = grey_rgb(pixels)
    picture = Image.fromarray(rgb)
    draw = ImageDraw.Draw(picture)
    width = line_width_px(rgb.shape[:2])
    for line in polylines:
        # Pillow's integer coordinates are pixel centres, like (u, v).
        draw.line([(float(u), float(v)) for u, v in line], fill=tuple(colour), width=width, joint="curve")
    return np.asarray(picture)


def file_name(safe_view_name: str) -> str:
    """``silhouette_<view>.json`` (the view's name made safe for a file name by the caller)."""
    return f"silhouette_{safe_view_name}.json"


def write_silhouette(path: str | os.PathLike, silhouette: Silhouette) -> pathlib.Path:
    """Write ``silhouette`` as JSON (atomically)."""
    return io.write_json_atomic(path, silhouette.to_json())


def read_silhouette(path: str | os.PathLike) -> Silhouette:
    """Read a ``silhouette_<view>.json``; :class:`InputFileError` names the file when it is damaged."""
    import json

    path = pathlib.Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise InputFileError(f"{path}: cannot read the silhouette ({error})") from None
    return Silhouette.from_json(data, where=path)


def mask_agreement(silhouette: np.ndarray, mask: np.ndarray | None) -> float | None:
    """Dice between the projected reconstruction and the femur mask, inside the projection's
    bounding box (the mask usually shows more shaft than the atlas field of view holds)."""
    if mask is None or not silhouette.any():
        return None
    vv, uu = np.nonzero(silhouette)
    box = (slice(vv.min(), vv.max() + 1), slice(uu.min(), uu.max() + 1))
    a, b = silhouette[box], np.asarray(mask, bool)[box]
    total = a.sum() + b.sum()
    return float(2.0 * (a & b).sum() / total) if total else None
