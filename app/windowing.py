"""Window/level of a radiograph as PACS viewers do it, without Qt.

A radiograph's intensities have any scale (12-bit counts, floats, inverted DICOM), so the presets
are percentiles of the image rather than fixed numbers. Re-windowing a 3000 x 3000 image on every
mouse move must be cheap: the image is quantised once into :data:`LEVELS` grey levels
(:class:`DisplayLut`), and each new window is a 4096-entry lookup table applied with one
``np.take`` (a few milliseconds) instead of float arithmetic over all pixels.
"""

from __future__ import annotations

import numpy as np

__all__ = ["WINDOW_PRESETS", "DisplayLut", "drag_window"]

#: Display presets: name -> (low, high) percentiles of the image's intensities.
WINDOW_PRESETS = {
    "Default": (0.5, 99.5),
    "Full range": (0.0, 100.0),
    "Bone": (35.0, 99.9),        # bright (dense) half of the image spread over the grey scale
    "Soft tissue": (0.5, 70.0),  # dim half: skin line, muscle, fat
}
#: Quantisation of the image for fast windowing (12 bits: finer than the 8-bit display).
LEVELS = 4096
#: Mouse travel (screen pixels) that changes the window by its whole value span.
DRAG_SPAN_PX = 600.0


class DisplayLut:
    """A radiograph quantised once; :meth:`render` windows it to uint8.

    Parameters
    ----------
    pixels : (rows, cols) array
        Raw intensities (larger = more attenuation).
    """

    def __init__(self, pixels: np.ndarray):
        data = np.asarray(pixels, dtype=np.float32)
        sample = data[::4, ::4] if data.size > 1_000_000 else data
        finite = sample[np.isfinite(sample)]
        self.low, self.high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        if self.high <= self.low:
            self.high = self.low + 1.0
        self._sorted = np.sort(finite) if finite.size else np.array([0.0, 1.0], dtype=np.float32)
        step = (self.high - self.low) / (LEVELS - 1)
        self._step = step
        quantised = np.nan_to_num((data - self.low) / step, nan=0.0, posinf=LEVELS - 1, neginf=0.0)
        self.levels = np.clip(np.rint(quantised), 0, LEVELS - 1).astype(np.uint16)
        self._values = self.low + step * np.arange(LEVELS, dtype=np.float64)

    @property
    def span(self) -> float:
        return self.high - self.low

    def percentile(self, q: float) -> float:
        return float(np.percentile(self._sorted, q))

    def preset(self, name: str) -> tuple[float, float]:
        """``(centre, width)`` of a :data:`WINDOW_PRESETS` entry."""
        if name not in WINDOW_PRESETS:
            raise ValueError(f"unknown window preset {name!r}; one of {', '.join(WINDOW_PRESETS)}")
        low, high = (self.percentile(q) for q in WINDOW_PRESETS[name])
        high = max(high, low + self._step)
        return 0.5 * (low + high), high - low

    def render(self, centre: float, width: float, inverted: bool = False) -> np.ndarray:
        """The image windowed to ``centre +- width / 2`` as ``(rows, cols)`` uint8."""
        width = max(float(width), self._step)
        lut = np.clip((self._values - (centre - 0.5 * width)) * (255.0 / width), 0.0, 255.0)
        if inverted:
            lut = 255.0 - lut
        return np.take(np.rint(lut).astype(np.uint8), self.levels)


def drag_window(centre: float, width: float, dx_px: float, dy_px: float, span: float) -> tuple[float, float]:
    """New ``(centre, width)`` after a right-drag of ``(dx, dy)`` screen pixels.

    As in PACS viewers: right/left widens/narrows the window (less/more contrast), down/up raises
    /lowers the level (darker/brighter image). :data:`DRAG_SPAN_PX` of travel moves by the value span.
    """
    per_px = span / DRAG_SPAN_PX
    return centre + dy_px * per_px, max(width + dx_px * per_px, span / 4096.0)
