"""A radiograph with its femur mask (editable), the registered contour and projected landmarks.

Scene coordinates are radiograph pixel coordinates ``(u, v)`` with the centre of pixel (0, 0)
at (0, 0) (``docs/case-format.md``), so mouse positions map to mask pixels without conversions.

The view does not change masks itself: it emits the user's gestures (``segment``, ``stroke_*``,
``polygon_closed``) and the main window applies them to the session and calls
:meth:`RadiographView.update_mask_region`.

Measurement graphics (:mod:`inference.graphics`: head outline, axes, offsets, labelled landmark
handles, scale bar and calibration) are one layer, set with :meth:`RadiographView.set_graphics`;
dragging a handle emits ``landmark_dragging`` / ``landmark_dragged`` with the new pixel position.
Window/level: right-drag (horizontal = width, vertical = level), :meth:`RadiographView.apply_preset`,
:meth:`RadiographView.set_inverted` (:mod:`app.windowing`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PySide6.QtCore import QEvent, QPointF, QRectF, Qt, Signal
from PySide6.QtGui import QBrush, QColor, QFont, QImage, QPainter, QPainterPath, QPen, QPixmap, QTransform
from PySide6.QtWidgets import (QCheckBox, QComboBox, QFrame, QGraphicsEllipseItem, QGraphicsItem, QGraphicsPathItem,
                               QGraphicsPixmapItem, QGraphicsRectItem, QGraphicsScene, QGraphicsSimpleTextItem, QGraphicsView,
                               QHBoxLayout, QLabel, QToolButton, QVBoxLayout, QWidget)

from app import imaging, windowing
from app.report_figures import COLOURS as GRAPHICS_COLOURS
from app.views.qimage import grey_qimage, rgba_qimage
from inference import graphics as measurement_graphics
from inference.silhouettes import CONTOUR_RGB

TOOLS = ("navigate", "brush", "eraser", "polygon")


class LayerItem(QGraphicsItem):
    """An RGBA image layer over the radiograph that can be updated one rectangle at a time.

    A brush stroke changes a few hundred pixels of a possibly 3000 x 3000 mask; converting the
    whole mask to a pixmap on every mouse move would take tens of milliseconds, so only the
    changed rectangle is re-tinted and painted into the layer.
    """

    def __init__(self, rows: int, cols: int, parent=None):
        super().__init__(parent)
        self._image = QImage(cols, rows, QImage.Format.Format_RGBA8888)
        self._image.fill(Qt.GlobalColor.transparent)
        self.setPos(-0.5, -0.5)  # pixel (0, 0) covers [-0.5, 0.5]: its centre is at scene (0, 0)

    def boundingRect(self) -> QRectF:
        return QRectF(0, 0, self._image.width(), self._image.height())

    def paint(self, painter: QPainter, option, widget=None) -> None:
        exposed = option.exposedRect.toAlignedRect().intersected(self._image.rect())
        if not exposed.isEmpty():
            painter.drawImage(exposed.topLeft(), self._image, exposed)

    def set_region(self, row0: int, col0: int, rgba: np.ndarray) -> None:
        if rgba.size == 0:
            return
        patch = rgba_qimage(rgba)
        painter = QPainter(self._image)
        painter.setCompositionMode(QPainter.CompositionMode.CompositionMode_Source)
        painter.drawImage(col0, row0, patch)
        painter.end()
        self.update(QRectF(col0, row0, rgba.shape[1], rgba.shape[0]))

    def set_all(self, rgba: np.ndarray | None) -> None:
        if rgba is None:
            self._image.fill(Qt.GlobalColor.transparent)
            self.update()
        else:
            self.set_region(0, 0, rgba)

    def image(self) -> QImage:
        return self._image


def _cosmetic_pen(colour: str, width: float, dashed: bool = False) -> QPen:
    pen = QPen(QColor(colour), width)
    pen.setCosmetic(True)  # the same width on screen at every zoom
    if dashed:
        pen.setStyle(Qt.PenStyle.DashLine)
    return pen


def _label_item(words: str, colour: str, parent: QGraphicsItem | None = None) -> QGraphicsRectItem:
    """Text on a dark plate: readable on bright bone and on dark soft tissue alike."""
    plate = QGraphicsRectItem(parent)
    text = QGraphicsSimpleTextItem(words, plate)
    font = QFont()
    font.setBold(True)
    text.setFont(font)
    text.setBrush(QBrush(QColor(colour)))
    box = text.boundingRect()
    plate.setRect(box.adjusted(-3, -1, 3, 1))
    plate.setBrush(QBrush(QColor(0, 0, 0, 170)))
    plate.setPen(QPen(Qt.PenStyle.NoPen))
    if parent is None:
        plate.setFlag(QGraphicsItem.GraphicsItemFlag.ItemIgnoresTransformations)
    return plate


class LandmarkHandle(QGraphicsEllipseItem):
    """A labelled landmark on the radiograph, dragged with the left button.

    It keeps its size on screen (``ItemIgnoresTransformations``); its position is the landmark's
    pixel ``(u, v)``. Moves are reported to the view, which emits ``landmark_dragging``.
    """

    RADIUS_PX = 6.0

    def __init__(self, view: "RadiographView", label: measurement_graphics.Label):
        r = self.RADIUS_PX
        super().__init__(-r, -r, 2 * r, 2 * r)
        self.name = label.name
        self._view = view
        self.setPos(QPointF(*label.uv))
        self.setPen(_cosmetic_pen(GRAPHICS_COLOURS["landmark"], 2))
        self.setBrush(QBrush(QColor(0, 0, 0, 90)))
        self.setFlag(QGraphicsItem.GraphicsItemFlag.ItemIgnoresTransformations)
        self.setFlag(QGraphicsItem.GraphicsItemFlag.ItemIsMovable)
        self.setFlag(QGraphicsItem.GraphicsItemFlag.ItemSendsScenePositionChanges)
        self.setCursor(Qt.CursorShape.SizeAllCursor)
        self.setToolTip(f"{label.text}: drag to move it in this view's plane")
        self.setZValue(8)
        plate = _label_item(label.short, GRAPHICS_COLOURS["landmark"], self)
        plate.setPos(r + 4, -r - plate.rect().height() + 2)

    def itemChange(self, change, value):
        if change == QGraphicsItem.GraphicsItemChange.ItemPositionHasChanged:
            self._view._handle_moved(self)
        return super().itemChange(change, value)


class RadiographView(QGraphicsView):
    """Zoomable radiograph with mask, contour and landmark layers; mask editing gestures."""

    segment = Signal(float, float, float, float)   # u0, v0, u1, v1 of a brush/eraser drag
    stroke_started = Signal()
    stroke_finished = Signal()
    polygon_closed = Signal(object, bool)          # (N, 2) array of (u, v); True = fill, False = erase
    cursor_moved = Signal(float, float)            # u, v under the mouse
    landmark_dragging = Signal(str, float, float)  # landmark name, u, v while its handle is dragged
    landmark_dragged = Signal(str, float, float)   # landmark name, u, v where its handle was dropped
    window_changed = Signal(float, float)          # window centre, width (image intensities)
    double_clicked = Signal()                      # a double click outside polygon drawing (the view fits)

    def __init__(self, parent=None):
        super().__init__(parent)
        self.setScene(QGraphicsScene(self))
        self.setRenderHints(QPainter.RenderHint.SmoothPixmapTransform)
        self.setTransformationAnchor(QGraphicsView.ViewportAnchor.AnchorUnderMouse)
        self.setBackgroundBrush(QColor("#101317"))
        self.setFrameShape(QFrame.Shape.NoFrame)
        self.setMouseTracking(True)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)  # pan by dragging
        self.setVerticalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self._image_item: QGraphicsPixmapItem | None = None
        self._mask_layer: LayerItem | None = None
        # The registered femur's outline: polylines in pixel coordinates (inference.silhouettes).
        self._contour_item = QGraphicsPathItem()
        contour_pen = QPen(QColor(*CONTOUR_RGB), 1.5)
        contour_pen.setCosmetic(True)
        self._contour_item.setPen(contour_pen)
        self._contour_item.setZValue(2)
        self.scene().addItem(self._contour_item)
        self._marker_items: list[QGraphicsItem] = []
        self._brush_outline = QGraphicsEllipseItem()
        self._brush_outline.setPen(QPen(QColor(255, 255, 255, 200), 0))
        self._brush_outline.setZValue(10)
        self._brush_outline.setVisible(False)
        self.scene().addItem(self._brush_outline)
        self._polygon_item = QGraphicsPathItem()
        pen = QPen(QColor("#4FC3F7"), 0)
        pen.setCosmetic(True)
        self._polygon_item.setPen(pen)
        self._polygon_item.setZValue(11)
        self.scene().addItem(self._polygon_item)
        self.tool = "navigate"
        self.brush_radius_px = 8.0
        self.editable = False
        self._polygon: list[tuple[float, float]] = []
        self._last_uv: tuple[float, float] | None = None
        self._panning_from = None
        self._fit_pending = True
        self._shape = (0, 0)
        self._init_window_level()
        self._init_graphics_layer()

    # ------------------------------------------------------------------ content
    def set_image(self, display_uint8: np.ndarray) -> None:
        """Show a new radiograph (uint8 grey); clears the layers."""
        self.clear_content()
        rows, cols = display_uint8.shape
        self._shape = (rows, cols)
        self._image_item = QGraphicsPixmapItem(QPixmap.fromImage(grey_qimage(display_uint8)))
        self._image_item.setPos(-0.5, -0.5)
        self._image_item.setTransformationMode(Qt.TransformationMode.SmoothTransformation)
        self.scene().addItem(self._image_item)
        self._mask_layer = LayerItem(rows, cols)
        self._mask_layer.setZValue(1)
        self.scene().addItem(self._mask_layer)
        self.setSceneRect(QRectF(-0.5, -0.5, cols, rows))
        self._fit_pending = True
        self.fit()

    def clear_content(self) -> None:
        self.set_graphics(None)
        self.show_epipolar(None)
        self._lut = None
        for item in (self._image_item, self._mask_layer, *self._marker_items):
            if item is not None:
                self.scene().removeItem(item)
        self._image_item = self._mask_layer = None
        self._contour_item.setPath(QPainterPath())
        self._marker_items = []
        self._polygon = []
        self._polygon_item.setPath(QPainterPath())
        self._shape = (0, 0)

    def set_mask(self, mask: np.ndarray) -> None:
        if self._mask_layer is not None:
            self._mask_layer.set_all(imaging.mask_rgba(mask))

    def update_mask_region(self, row0: int, col0: int, mask_region: np.ndarray) -> None:
        if self._mask_layer is not None:
            self._mask_layer.set_region(row0, col0, imaging.mask_rgba(mask_region))

    def set_mask_visible(self, visible: bool) -> None:
        if self._mask_layer is not None:
            self._mask_layer.setVisible(visible)

    def set_contour(self, polylines: Sequence[np.ndarray] | None) -> None:
        """Show the registered femur's outline: (N, 2) arrays of (u, v) pixels; None clears it."""
        path = QPainterPath()
        for line in polylines or ():
            points = np.asarray(line, float)
            if len(points) < 2:
                continue
            path.moveTo(float(points[0, 0]), float(points[0, 1]))
            for u, v in points[1:]:
                path.lineTo(float(u), float(v))
        self._contour_item.setPath(path)

    def contour_path(self) -> QPainterPath:
        """The outline shown (scene = pixel coordinates)."""
        return self._contour_item.path()

    def set_contour_visible(self, visible: bool) -> None:
        self._contour_item.setVisible(visible)

    def set_markers(self, points_uv: dict[str, tuple[float, float]], highlight: str | None = "hip_centre") -> None:
        """Small cross-hair markers (with names) at projected landmark positions."""
        for item in self._marker_items:
            self.scene().removeItem(item)
        self._marker_items = []
        rows, cols = self._shape
        size = max(rows, cols) / 120.0 if rows else 4.0
        for name, (u, v) in points_uv.items():
            colour = QColor("#00E5FF") if name == highlight else QColor("#C6FF00")
            path = QPainterPath()
            path.moveTo(u - size, v)
            path.lineTo(u + size, v)
            path.moveTo(u, v - size)
            path.lineTo(u, v + size)
            cross = QGraphicsPathItem(path)
            pen = QPen(colour, 2)
            pen.setCosmetic(True)
            cross.setPen(pen)
            cross.setZValue(5)
            cross.setToolTip(name)
            self.scene().addItem(cross)
            self._marker_items.append(cross)
        self.set_markers_visible(True)

    def set_markers_visible(self, visible: bool) -> None:
        for item in self._marker_items:
            item.setVisible(visible)

    def mask_layer_image(self) -> QImage | None:
        return None if self._mask_layer is None else self._mask_layer.image()

    # ------------------------------------------------------------------ navigation
    def _image_rect(self) -> QRectF:
        rows, cols = self._shape
        return QRectF(-0.5, -0.5, cols, rows)

    def fit(self) -> None:
        """Show the whole radiograph. The scene reaches one image size beyond each edge, so the
        image can be panned (and zoomed at the cursor) anywhere, as in a PACS viewer."""
        if self._image_item is not None:
            image = self._image_rect()
            self.setSceneRect(image.adjusted(-image.width(), -image.height(), image.width(), image.height()))
            self.fitInView(image, Qt.AspectRatioMode.KeepAspectRatio)

    def fit_to_view(self) -> None:
        """The Fit button: fit now and keep fitting when the view is resized."""
        self._fit_pending = True
        self.fit()

    def resizeEvent(self, event) -> None:
        super().resizeEvent(event)
        if self._fit_pending:
            self.fit()

    def wheelEvent(self, event) -> None:
        """Zoom by 1.25 per notch about the image point under the cursor."""
        if self._image_item is None:
            return
        factor = 1.25 ** (event.angleDelta().y() / 120.0)
        self._fit_pending = False
        cursor = event.position().toPoint()
        anchor = self.mapToScene(cursor)
        self.scale(factor, factor)
        drift = self.mapFromScene(anchor) - cursor  # Qt anchors at the last *move*, not at this event
        self.horizontalScrollBar().setValue(self.horizontalScrollBar().value() + drift.x())
        self.verticalScrollBar().setValue(self.verticalScrollBar().value() + drift.y())

    def set_tool(self, tool: str) -> None:
        if tool not in TOOLS:
            raise ValueError(f"unknown tool {tool!r}; one of {TOOLS}")
        self.tool = tool
        self._cancel_polygon()
        self._brush_outline.setVisible(False)
        self.setCursor(Qt.CursorShape.OpenHandCursor if tool == "navigate" or not self.editable
                       else Qt.CursorShape.CrossCursor)

    def set_editable(self, editable: bool) -> None:
        self.editable = bool(editable)
        self.set_tool(self.tool)

    # ------------------------------------------------------------------ mouse
    def _uv(self, event) -> tuple[float, float]:
        point = self.mapToScene(event.position().toPoint())
        return float(point.x()), float(point.y())

    def _editing(self) -> bool:
        return self.editable and self._image_item is not None and self.tool != "navigate"

    def mousePressEvent(self, event) -> None:
        if self._window_mouse_press(event) or self._graphics_mouse_press(event):
            return
        button = event.button()
        if button == Qt.MouseButton.RightButton:
            return  # right-drag is window/level (_window_mouse_press), never a pan
        if button == Qt.MouseButton.MiddleButton or (button == Qt.MouseButton.LeftButton and not self._editing()):
            self._panning_from = event.position()
            self.setCursor(Qt.CursorShape.ClosedHandCursor)
            return
        if button != Qt.MouseButton.LeftButton:
            return
        uv = self._uv(event)
        if self.tool in ("brush", "eraser"):
            self.stroke_started.emit()
            self._last_uv = uv
            self.segment.emit(uv[0], uv[1], uv[0], uv[1])
        elif self.tool == "polygon":
            self._polygon.append(uv)
            self._draw_polygon(uv)

    def mouseMoveEvent(self, event) -> None:
        if self._window_mouse_move(event) or self._graphics_mouse_move(event):
            return
        if self._panning_from is not None:
            delta = event.position() - self._panning_from
            self._panning_from = event.position()
            self.horizontalScrollBar().setValue(self.horizontalScrollBar().value() - int(delta.x()))
            self.verticalScrollBar().setValue(self.verticalScrollBar().value() - int(delta.y()))
            return
        uv = self._uv(event)
        self.cursor_moved.emit(*uv)
        if self._editing() and self.tool in ("brush", "eraser"):
            r = self.brush_radius_px
            self._brush_outline.setRect(uv[0] - r, uv[1] - r, 2 * r, 2 * r)
            self._brush_outline.setVisible(True)
            if self._last_uv is not None and event.buttons() & Qt.MouseButton.LeftButton:
                self.segment.emit(self._last_uv[0], self._last_uv[1], uv[0], uv[1])
                self._last_uv = uv
        elif self._editing() and self.tool == "polygon" and self._polygon:
            self._draw_polygon(uv)

    def mouseReleaseEvent(self, event) -> None:
        if self._window_mouse_release(event) or self._graphics_mouse_release(event):
            return
        if self._panning_from is not None:
            self._panning_from = None
            self.set_tool(self.tool)
            return
        if event.button() == Qt.MouseButton.LeftButton and self._last_uv is not None:
            self._last_uv = None
            self.stroke_finished.emit()

    def mouseDoubleClickEvent(self, event) -> None:
        if self._editing() and self.tool == "polygon":
            self.close_polygon(fill=not bool(event.modifiers() & Qt.KeyboardModifier.ShiftModifier))
        else:
            # In brush/eraser mode the double click's first press painted a dot: the window takes
            # it back on this signal (a double click fits, it does not paint).
            self.double_clicked.emit()
            self.fit_to_view()

    def keyPressEvent(self, event) -> None:
        key = event.key()
        if self.tool == "polygon" and self._polygon:
            if key in (Qt.Key.Key_Return, Qt.Key.Key_Enter):
                self.close_polygon(fill=not bool(event.modifiers() & Qt.KeyboardModifier.ShiftModifier))
                return
            if key == Qt.Key.Key_Escape:
                self._cancel_polygon()
                return
            if key == Qt.Key.Key_Backspace:
                self._polygon.pop()
                self._draw_polygon(None)
                return
        super().keyPressEvent(event)

    def leaveEvent(self, event) -> None:
        self._brush_outline.setVisible(False)
        super().leaveEvent(event)

    # ------------------------------------------------------------------ window / level, invert
    def _init_window_level(self) -> None:
        self._lut: windowing.DisplayLut | None = None
        self._window = (0.5, 1.0)          # centre, width in image intensities
        self._inverted = False
        self._window_drag_from = None

    def set_intensities(self, pixels: np.ndarray) -> None:
        """Give the view the raw radiograph (after :meth:`set_image`) so that it can re-window it."""
        if self._image_item is None or tuple(np.shape(pixels)) != self._shape:
            return
        self._lut = windowing.DisplayLut(pixels)
        self.apply_preset("Default")

    def apply_preset(self, name: str) -> None:
        """Window the radiograph with a :data:`app.windowing.WINDOW_PRESETS` entry."""
        if self._lut is not None:
            self.set_window(*self._lut.preset(name))

    def set_window(self, centre: float, width: float) -> None:
        if self._lut is None:
            return
        self._window = (float(centre), max(float(width), 1e-9))
        self._render_windowed()
        self.window_changed.emit(*self._window)

    def window_level(self) -> tuple[float, float]:
        return self._window

    def set_inverted(self, inverted: bool) -> None:
        self._inverted = bool(inverted)
        if self._lut is not None:
            self._render_windowed()

    def is_inverted(self) -> bool:
        return self._inverted

    def displayed_image(self) -> QImage | None:
        return None if self._image_item is None else self._image_item.pixmap().toImage()

    def _render_windowed(self) -> None:
        if self._image_item is not None and self._lut is not None:
            grey = self._lut.render(*self._window, inverted=self._inverted)
            self._image_item.setPixmap(QPixmap.fromImage(grey_qimage(grey)))

    def _window_mouse_press(self, event) -> bool:
        if event.button() != Qt.MouseButton.RightButton or self._lut is None:
            return False
        self._window_drag_from = (event.position(), self._window)
        self.setCursor(Qt.CursorShape.SizeAllCursor)
        return True

    def _window_mouse_move(self, event) -> bool:
        if self._window_drag_from is None:
            return False
        start, (centre, width) = self._window_drag_from
        delta = event.position() - start
        self.set_window(*windowing.drag_window(centre, width, delta.x(), delta.y(), self._lut.span))
        return True

    def _window_mouse_release(self, event) -> bool:
        if self._window_drag_from is None or event.button() != Qt.MouseButton.RightButton:
            return False
        self._window_drag_from = None
        self.set_tool(self.tool)
        return True

    # ------------------------------------------------------------------ measurement graphics layer
    def _init_graphics_layer(self) -> None:
        self._graphics: measurement_graphics.ViewGraphics | None = None
        self._graphics_items: list[QGraphicsItem] = []
        self._handles: dict[str, LandmarkHandle] = {}
        self._dragged_handle: LandmarkHandle | None = None
        self._graphics_visible = True
        self._epipolar_item = QGraphicsPathItem()
        self._epipolar_item.setPen(_cosmetic_pen(GRAPHICS_COLOURS["epipolar"], 1.5, dashed=True))
        self._epipolar_item.setZValue(7)
        self.scene().addItem(self._epipolar_item)
        # The scale bar is drawn in screen coordinates: scrolling must repaint, not shift pixels.
        self.setViewportUpdateMode(QGraphicsView.ViewportUpdateMode.FullViewportUpdate)

    def set_graphics(self, drawn: measurement_graphics.ViewGraphics | None) -> None:
        """Show the measurement graphics of this view (None clears them)."""
        for item in self._graphics_items:
            self.scene().removeItem(item)
        self._graphics_items, self._handles = [], {}
        self._dragged_handle = None
        self._graphics = drawn
        if drawn is not None and self._image_item is not None:
            for line in drawn.polylines:
                path = QPainterPath(QPointF(*line.points_uv[0]))
                for u, v in line.points_uv[1:]:
                    path.lineTo(u, v)
                if line.closed:
                    path.closeSubpath()
                item = QGraphicsPathItem(path)
                item.setPen(_cosmetic_pen(GRAPHICS_COLOURS.get(line.kind, "#FFFFFF"), 2))
                item.setZValue(6)
                item.setData(0, line.kind)
                self._graphics_items.append(item)
                if line.text and line.text_uv is not None:
                    text = _label_item(line.text, GRAPHICS_COLOURS.get(line.kind, "#FFFFFF"))
                    text.setPos(QPointF(*line.text_uv))
                    # offset in screen pixels (the item ignores the zoom): beside, not on, the line
                    box = text.rect()
                    dx, dy = {"above": (-box.width() / 2, -box.height() - 4),
                              "left": (-box.width() - 8, -box.height() / 2)}.get(line.text_side, (8, 2))
                    text.setTransform(QTransform.fromTranslate(dx, dy))
                    text.setZValue(6)
                    self._graphics_items.append(text)
            for label in drawn.labels:
                if not label.inside:  # a landmark off the image is listed, not drawn at the border
                    continue
                handle = LandmarkHandle(self, label)
                self._handles[label.name] = handle
                self._graphics_items.append(handle)
            for item in self._graphics_items:
                self.scene().addItem(item)
        self.set_graphics_visible(self._graphics_visible)

    def set_graphics_visible(self, visible: bool) -> None:
        self._graphics_visible = bool(visible)
        for item in self._graphics_items:
            item.setVisible(self._graphics_visible)
        self.viewport().update()

    def graphics_kinds(self) -> list[str]:
        return [item.data(0) for item in self._graphics_items if isinstance(item, QGraphicsPathItem)]

    def graphics_rect(self) -> QRectF:
        """Scene rectangle of the measurement lines (empty without graphics)."""
        rect = QRectF()
        for item in self._graphics_items:
            if isinstance(item, QGraphicsPathItem):
                rect = rect.united(item.sceneBoundingRect())
        return rect

    def handle_positions(self) -> dict[str, tuple[float, float]]:
        return {name: (h.pos().x(), h.pos().y()) for name, h in self._handles.items()}

    def show_epipolar(self, segment) -> None:
        """Draw (or with None hide) the epipolar line of a landmark dragged in the other view."""
        path = QPainterPath()
        if segment is not None:
            path.moveTo(QPointF(*segment[0]))
            path.lineTo(QPointF(*segment[1]))
        self._epipolar_item.setPath(path)

    def _handle_moved(self, handle: LandmarkHandle) -> None:
        if handle is self._dragged_handle:
            self.landmark_dragging.emit(handle.name, handle.pos().x(), handle.pos().y())

    def _handle_under(self, event) -> LandmarkHandle | None:
        for item in self.items(event.position().toPoint()):
            while item is not None and not isinstance(item, LandmarkHandle):
                item = item.parentItem()
            if item is not None:
                return item
        return None

    def _graphics_mouse_press(self, event) -> bool:
        # Handles take the left button unless a mask tool is painting.
        if event.button() != Qt.MouseButton.LeftButton or self._editing() or not self._graphics_visible:
            return False
        handle = self._handle_under(event)
        if handle is None:
            return False
        self._dragged_handle = handle
        QGraphicsView.mousePressEvent(self, event)
        return True

    def _graphics_mouse_move(self, event) -> bool:
        if self._dragged_handle is None:
            return False
        QGraphicsView.mouseMoveEvent(self, event)
        return True

    def _graphics_mouse_release(self, event) -> bool:
        handle = self._dragged_handle
        if handle is None:
            return False
        QGraphicsView.mouseReleaseEvent(self, event)
        self._dragged_handle = None
        self.landmark_dragged.emit(handle.name, handle.pos().x(), handle.pos().y())
        return True

    def scale_bar_on_screen(self) -> tuple[float, float] | None:
        """``(length_mm, screen pixels)`` of the scale bar at the current zoom (None: no bar)."""
        drawn = self._graphics
        if drawn is None or drawn.calibration is None:
            return None
        px_per_mm = self.transform().m11() / drawn.calibration.mm_per_px_at_hip
        width = self.viewport().width()
        length = next((mm for mm in measurement_graphics.SCALE_BAR_LENGTHS_MM if mm * px_per_mm <= 0.25 * width),
                      None)
        return None if length is None else (length, length * px_per_mm)

    def drawForeground(self, painter: QPainter, rect: QRectF) -> None:
        super().drawForeground(painter, rect)
        drawn = self._graphics
        if drawn is None or drawn.calibration is None or not self._graphics_visible or self._image_item is None:
            return
        # Scale bar and calibration in screen coordinates: always in the corner, sized to the zoom.
        length, pixels = self.scale_bar_on_screen() or (None, 0.0)
        painter.save()
        painter.resetTransform()
        lines = drawn.calibration.lines()
        metrics = painter.fontMetrics()
        x0, y = 12, self.viewport().height() - 12 - metrics.height() * len(lines)
        painter.fillRect(QRectF(x0 - 6, y - 34, max(metrics.horizontalAdvance(t) for t in lines) + 12,
                                34 + metrics.height() * len(lines) + 8), QColor(0, 0, 0, 150))
        if length is not None:
            painter.setPen(_cosmetic_pen(GRAPHICS_COLOURS["scale"], 2))
            painter.drawLine(QPointF(x0, y - 8), QPointF(x0 + pixels, y - 8))
            painter.drawLine(QPointF(x0, y - 14), QPointF(x0, y - 2))
            painter.drawLine(QPointF(x0 + pixels, y - 14), QPointF(x0 + pixels, y - 2))
            painter.drawText(QPointF(x0, y - 18), f"{length:g} mm at the hip")
        painter.setPen(QColor("#ECEFF4"))
        for index, text in enumerate(lines):
            painter.drawText(QPointF(x0, y + metrics.ascent() + index * metrics.height()), text)
        painter.restore()

    # ------------------------------------------------------------------ polygon
    def _draw_polygon(self, hover_uv) -> None:
        path = QPainterPath()
        points = list(self._polygon) + ([hover_uv] if hover_uv is not None else [])
        if points:
            path.moveTo(QPointF(*points[0]))
            for uv in points[1:]:
                path.lineTo(QPointF(*uv))
        self._polygon_item.setPath(path)

    def close_polygon(self, fill: bool = True) -> None:
        """Finish the polygon being drawn (>= 3 vertices) and emit it."""
        points = self._polygon
        # A double click also delivered a press at the same place: drop duplicate vertices.
        deduplicated = [p for i, p in enumerate(points) if i == 0 or np.hypot(p[0] - points[i - 1][0], p[1] - points[i - 1][1]) > 1e-6]
        self._cancel_polygon()
        if len(deduplicated) >= 3:
            self.polygon_closed.emit(np.asarray(deduplicated, dtype=np.float64), bool(fill))

    def _cancel_polygon(self) -> None:
        self._polygon = []
        self._polygon_item.setPath(QPainterPath())


class RadiographPanel(QWidget):
    """A radiograph view with a header: view name, size, calibration source, mask state, Confirm."""

    confirm_toggled = Signal(bool)

    def __init__(self, index: int, parent=None):
        super().__init__(parent)
        self.index = index
        self.view = RadiographView(self)
        self.title = QLabel("No case open")
        self.title.setObjectName("viewTitle")
        self.details = QLabel("")
        self.details.setObjectName("viewDetails")
        self.details.setWordWrap(True)
        self.confirm = QCheckBox("Mask confirmed")
        self.confirm.setToolTip("Confirm that the femur mask of this view is correct. Editing the mask "
                                "withdraws the confirmation.")
        self.confirm.toggled.connect(self.confirm_toggled)
        header = QHBoxLayout()
        header.setContentsMargins(6, 4, 6, 2)
        text = QVBoxLayout()
        text.setSpacing(0)
        text.addWidget(self.title)
        text.addWidget(self.details)
        header.addLayout(text, 1)
        self._build_display_controls(header)
        self.fit_button = QToolButton()
        self.fit_button.setText("Fit")
        self.fit_button.setToolTip("Show the whole radiograph (F); wheel zooms at the cursor, middle-drag pans, "
                                   "right-drag sets window/level")
        self.fit_button.clicked.connect(self.view.fit_to_view)
        header.addWidget(self.fit_button)
        header.addWidget(self.confirm)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(0)
        layout.addLayout(header)
        layout.addWidget(self.view, 1)

    def _build_display_controls(self, header: QHBoxLayout) -> None:
        """Window presets and invert (right-drag on the image changes the window freely)."""
        self.window_preset = QComboBox()
        self.window_preset.addItems(list(windowing.WINDOW_PRESETS))
        self.window_preset.setToolTip("Window/level preset. Right-drag on the image: left/right changes the "
                                      "contrast (window width), up/down the brightness (level).")
        self.window_preset.setFocusPolicy(Qt.FocusPolicy.StrongFocus)  # no wheel changes unless focused
        self.window_preset.activated.connect(lambda _i: self.view.apply_preset(self.window_preset.currentText()))
        self.invert = QCheckBox("Invert")
        self.invert.setToolTip("Show bone dark (as on film) or bright")
        self.invert.toggled.connect(self.view.set_inverted)
        self.window_preset.installEventFilter(self)
        header.addWidget(self.window_preset)
        header.addWidget(self.invert)

    def eventFilter(self, watched, event) -> bool:
        # The wheel over an unfocused preset box scrolls the page, not the window setting.
        if watched is self.window_preset and event.type() == QEvent.Type.Wheel and not watched.hasFocus():
            event.ignore()
            return True
        return super().eventFilter(watched, event)

    def set_header(self, name: str, details: str) -> None:
        self.title.setText(name)
        self.details.setText(details)

    def set_confirmed(self, confirmed: bool) -> None:
        blocked = self.confirm.blockSignals(True)
        self.confirm.setChecked(confirmed)
        self.confirm.blockSignals(blocked)
