"""Pixel conversions for display, without Qt: windowing, mask and label tints, slices.

The views turn the arrays returned here into ``QImage`` objects; keeping the arithmetic here keeps
it out of Qt slots and testable without a display.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "window_to_uint8", "robust_window", "png_bytes", "mask_rgba", "SLICE_AXES", "volume_slice", "label_rgba",
    "slice_spacing_mm", "slice_cursor_px", "index_from_slice_px",
]

#: Tint of the femur mask in the mask editor (RGB) and its opacity (0..255).
MASK_COLOUR = (255, 196, 0)
MASK_ALPHA = 96
#: Colour of each label in slice overlays (1 = femur, 2 = pelvis, others grey).
LABEL_COLOURS = {1: (255, 170, 0), 2: (80, 160, 255)}


def window_to_uint8(pixels: np.ndarray, low_percentile: float = 0.5, high_percentile: float = 99.5,
                    window: tuple[float, float] | None = None) -> np.ndarray:
    """Map intensities to 0..255 linearly between two percentiles (or an explicit window).

    Percentiles rather than min/max: one saturated marker or a dead pixel would otherwise
    compress the whole bone into a few grey levels. Large images are subsampled for the
    percentiles (every 4th pixel), which changes the window by a fraction of a grey level.
    """
    data = np.asarray(pixels, dtype=np.float32)
    if window is None:
        sample = data[::4, ::4] if data.ndim == 2 and data.size > 1_000_000 else data
        finite = sample[np.isfinite(sample)]
        if finite.size == 0:
            return np.zeros(data.shape, dtype=np.uint8)
        lo, hi = np.percentile(finite, [low_percentile, high_percentile])
    else:
        lo, hi = window
    scale = 255.0 / max(float(hi) - float(lo), 1e-6)
    out = np.nan_to_num((data - lo) * scale, nan=0.0, posinf=255.0, neginf=0.0)
    return np.clip(out, 0, 255).astype(np.uint8)


def robust_window(values: np.ndarray, low_percentile: float = 1.0, high_percentile: float = 99.5,
                  max_samples: int = 2_000_000) -> tuple[float, float]:
    """``(low, high)`` display window of a volume or image from two percentiles.

    Big arrays are subsampled with a regular stride (percentiles of 2 million samples are within
    a fraction of a grey level of the full array's). The window is never empty.
    """
    flat = np.asarray(values).ravel()
    if flat.size > max_samples:
        flat = flat[:: int(np.ceil(flat.size / max_samples))]
    flat = flat[np.isfinite(flat)]
    if flat.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(flat, [low_percentile, high_percentile])
    return float(lo), float(max(hi, lo + 1e-3))


def png_bytes(rgb: np.ndarray) -> bytes:
    """An ``(rows, cols, 3|4)`` uint8 array as PNG file bytes (for report screenshots)."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def mask_rgba(mask: np.ndarray, colour: tuple[int, int, int] = MASK_COLOUR, alpha: int = MASK_ALPHA) -> np.ndarray:
    """A ``(rows, cols, 4)`` uint8 RGBA tint: ``colour`` at ``alpha`` on the mask, transparent elsewhere."""
    mask = np.asarray(mask, dtype=bool)
    rgba = np.zeros(mask.shape + (4,), dtype=np.uint8)
    rgba[mask] = (*colour, alpha)
    return rgba


#: The three orthogonal slice views: name -> (fixed array axis, row axis, column axis, flip rows).
#: Arrays are (z, y, x). Axial shows y down (anterior at the top) and x to the right (the patient's
#: left on the right, radiological convention); coronal and sagittal show superior (+z) at the top.
SLICE_AXES = {
    "axial": (0, 1, 2, False),
    "coronal": (1, 0, 2, True),
    "sagittal": (2, 0, 1, True),
}


def volume_slice(volume_zyx: np.ndarray, view: str, index: int) -> np.ndarray:
    """The 2D slice of a ``(z, y, x)`` volume shown by ``view`` (see :data:`SLICE_AXES`)."""
    fixed, row_axis, col_axis, flip = SLICE_AXES[view]
    index = int(np.clip(index, 0, volume_zyx.shape[fixed] - 1))
    plane = np.take(volume_zyx, index, axis=fixed)
    # np.take keeps the other two axes in their original order, which is (row, col) already for
    # all three views because row_axis < col_axis in SLICE_AXES.
    return plane[::-1] if flip else plane


def slice_spacing_mm(spacing_xyz_mm: tuple[float, float, float], view: str) -> tuple[float, float]:
    """``(row pitch, column pitch)`` in mm of a slice view (for an undistorted display)."""
    spacing_zyx = tuple(reversed(tuple(float(s) for s in spacing_xyz_mm)))
    _, row_axis, col_axis, _ = SLICE_AXES[view]
    return spacing_zyx[row_axis], spacing_zyx[col_axis]


def slice_cursor_px(index_zyx: tuple[int, int, int], shape_zyx: tuple[int, int, int], view: str) -> tuple[int, int]:
    """``(row, col)`` in a slice view's image of the voxel ``index_zyx``."""
    _, row_axis, col_axis, flip = SLICE_AXES[view]
    row = int(index_zyx[row_axis])
    if flip:
        row = shape_zyx[row_axis] - 1 - row
    return row, int(index_zyx[col_axis])


def index_from_slice_px(current_zyx: tuple[int, int, int], shape_zyx: tuple[int, int, int], view: str,
                        row: float, col: float) -> tuple[int, int, int]:
    """The voxel index selected by clicking ``(row, col)`` in a slice view (the fixed axis kept)."""
    _, row_axis, col_axis, flip = SLICE_AXES[view]
    out = list(int(v) for v in current_zyx)
    r = int(round(row))
    if flip:
        r = shape_zyx[row_axis] - 1 - r
    out[row_axis] = int(np.clip(r, 0, shape_zyx[row_axis] - 1))
    out[col_axis] = int(np.clip(int(round(col)), 0, shape_zyx[col_axis] - 1))
    return tuple(out)


def label_rgba(labels_2d: np.ndarray, alpha: int = 80, outline_only: bool = False) -> np.ndarray:
    """RGBA tint of a label slice: each label in its colour (:data:`LABEL_COLOURS`), 0 transparent."""
    labels = np.asarray(labels_2d)
    rgba = np.zeros(labels.shape + (4,), dtype=np.uint8)
    for value in np.unique(labels):
        if value == 0:
            continue
        where = labels == value
        if outline_only:
            interior = np.zeros_like(where)
            interior[1:-1, 1:-1] = (where[1:-1, 1:-1] & where[:-2, 1:-1] & where[2:, 1:-1]
                                    & where[1:-1, :-2] & where[1:-1, 2:])
            where = where & ~interior
        rgba[where] = (*LABEL_COLOURS.get(int(value), (200, 200, 200)), alpha)
    return rgba
