"""Pictures of the workstation: the window as shown (the PDF report renders its own pictures
off-screen, :mod:`app.report`)."""

from __future__ import annotations

import numpy as np
from PySide6.QtGui import QImage, QPainter
from PySide6.QtWidgets import QApplication


def window_screenshot(window) -> QImage:
    """The whole window, with the OpenGL pixels of each visible 3D view (the 3D tab's, the
    Template step's) painted in.

    ``QWidget.grab`` cannot read a native OpenGL window's pixels (they come out black), so
    each render window is read back through VTK and composed onto the grab.
    """
    from app.views.qimage import rgba_qimage

    QApplication.processEvents()
    image = window.grab().toImage()
    for view in (window.surface_view, window.template_panel):
        plotter = getattr(view, "plotter", None)
        if plotter is None or not plotter.isVisible():
            continue
        pixels = view.render_image()
        ratio = plotter.devicePixelRatioF() if hasattr(plotter, "devicePixelRatioF") else 1.0
        rgba = np.concatenate([pixels, np.full(pixels.shape[:2] + (1,), 255, np.uint8)], axis=2)
        render = rgba_qimage(rgba)
        if ratio != 1.0:
            render = render.scaled(plotter.width(), plotter.height())
        origin = plotter.mapTo(window, plotter.rect().topLeft())
        painter = QPainter(image)
        painter.drawImage(origin, render)
        painter.end()
    return image
