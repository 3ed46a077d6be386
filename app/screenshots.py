"""Pictures of the workstation: the window as shown (the PDF report renders its own pictures
off-screen, :mod:`app.report`)."""

from __future__ import annotations

import numpy as np
from PySide6.QtGui import QImage, QPainter
from PySide6.QtWidgets import QApplication


def window_screenshot(window) -> QImage:
    """The whole window, with the 3D view's OpenGL pixels painted in where it is visible.

    ``QWidget.grab`` cannot read a native OpenGL window's pixels (they come out black), so
    the render window is read back through VTK and composed onto the grab.
    """
    QApplication.processEvents()
    image = window.grab().toImage()
    if window.viewers.currentWidget() is window.surface_view and window.surface_view.isVisible():
        pixels = window.surface_view.render_image()
        plotter = window.surface_view.plotter
        ratio = plotter.devicePixelRatioF() if hasattr(plotter, "devicePixelRatioF") else 1.0
        from app.views.qimage import rgba_qimage

        rgba = np.concatenate([pixels, np.full(pixels.shape[:2] + (1,), 255, np.uint8)], axis=2)
        render = rgba_qimage(rgba)
        if ratio != 1.0:
            render = render.scaled(plotter.width(), plotter.height())
        origin = plotter.mapTo(window, plotter.rect().topLeft())
        painter = QPainter(image)
        painter.drawImage(origin, render)
        painter.end()
    return image
