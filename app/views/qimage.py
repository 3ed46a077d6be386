"""numpy arrays to QImage (copies, so the array may be freed or changed afterwards)."""

from __future__ import annotations

import numpy as np
from PySide6.QtGui import QImage


def grey_qimage(array: np.ndarray) -> QImage:
    """A ``(rows, cols)`` uint8 array as a Grayscale8 image."""
    data = np.ascontiguousarray(array, dtype=np.uint8)
    rows, cols = data.shape
    return QImage(data.data, cols, rows, data.strides[0], QImage.Format.Format_Grayscale8).copy()


def rgba_qimage(array: np.ndarray) -> QImage:
    """A ``(rows, cols, 4)`` uint8 RGBA array as an RGBA8888 image."""
    data = np.ascontiguousarray(array, dtype=np.uint8)
    rows, cols, channels = data.shape
    if channels != 4:
        raise ValueError(f"expected 4 channels, not {channels}")
    return QImage(data.data, cols, rows, data.strides[0], QImage.Format.Format_RGBA8888).copy()


def qimage_to_rgb(image: QImage) -> np.ndarray:
    """A QImage as a ``(rows, cols, 3)`` uint8 array (for tests and screenshots)."""
    converted = image.convertToFormat(QImage.Format.Format_RGB888)
    width, height = converted.width(), converted.height()
    buffer = np.frombuffer(converted.constBits(), dtype=np.uint8, count=converted.sizeInBytes())
    return buffer.reshape(height, converted.bytesPerLine())[:, : width * 3].reshape(height, width, 3).copy()
