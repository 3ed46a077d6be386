"""Three linked orthogonal slice views of the warped atlas with the femur label overlay.

A shared cursor (a voxel index ``(z, y, x)``) links them: clicking in one view moves the other
two views' slices (and, through ``cursor_changed``, the 3D view's atlas slices). Pixels are shown
with their physical aspect (anisotropic voxels are stretched to millimetres).
"""

from __future__ import annotations

import numpy as np
from PySide6.QtCore import QRectF, Qt, Signal
from PySide6.QtGui import QColor, QPainter, QPen, QPixmap, QTransform
from PySide6.QtWidgets import (QCheckBox, QFrame, QGraphicsLineItem, QGraphicsPixmapItem, QGraphicsScene,
                               QGraphicsView, QGridLayout, QHBoxLayout, QLabel, QSlider, QVBoxLayout, QWidget)

from app import imaging
from app.views.qimage import grey_qimage, rgba_qimage

VIEWS = ("axial", "coronal", "sagittal")


class SliceView(QGraphicsView):
    """One slice view; emits the clicked ``(row, col)`` of its image."""

    clicked = Signal(float, float)

    def __init__(self, name: str, parent=None):
        super().__init__(parent)
        self.name = name
        self.setScene(QGraphicsScene(self))
        self.setBackgroundBrush(QColor("#0B0D10"))
        self.setFrameShape(QFrame.Shape.NoFrame)
        self.setRenderHints(QPainter.RenderHint.SmoothPixmapTransform)
        self._image = QGraphicsPixmapItem()
        self._labels = QGraphicsPixmapItem()
        self._labels.setZValue(1)
        pen = QPen(QColor(0, 229, 255, 160), 0)
        pen.setCosmetic(True)
        self._h_line, self._v_line = QGraphicsLineItem(), QGraphicsLineItem()
        for item in (self._h_line, self._v_line):
            item.setPen(pen)
            item.setZValue(2)
        for item in (self._image, self._labels, self._h_line, self._v_line):
            self.scene().addItem(item)
        self._spacing = (1.0, 1.0)
        self._shape = (0, 0)

    def set_slice(self, grey: np.ndarray, labels_rgba: np.ndarray | None, spacing_rc_mm: tuple[float, float]) -> None:
        self._spacing = spacing_rc_mm
        rows, cols = grey.shape
        reshaped = self._shape != (rows, cols)
        self._shape = (rows, cols)
        scale = QTransform.fromScale(spacing_rc_mm[1], spacing_rc_mm[0])
        self._image.setPixmap(QPixmap.fromImage(grey_qimage(grey)))
        self._image.setTransform(scale)
        self._labels.setPixmap(QPixmap() if labels_rgba is None else QPixmap.fromImage(rgba_qimage(labels_rgba)))
        self._labels.setTransform(scale)
        self.setSceneRect(QRectF(0, 0, cols * spacing_rc_mm[1], rows * spacing_rc_mm[0]))
        if reshaped:
            self.fit()

    def set_labels_visible(self, visible: bool) -> None:
        self._labels.setVisible(visible)

    def set_cursor(self, row: int, col: int) -> None:
        dr, dc = self._spacing
        rows, cols = self._shape
        y, x = (row + 0.5) * dr, (col + 0.5) * dc
        self._h_line.setLine(0, y, cols * dc, y)
        self._v_line.setLine(x, 0, x, rows * dr)

    def fit(self) -> None:
        self.fitInView(self.sceneRect(), Qt.AspectRatioMode.KeepAspectRatio)

    def resizeEvent(self, event) -> None:
        super().resizeEvent(event)
        self.fit()

    def mousePressEvent(self, event) -> None:
        if event.button() == Qt.MouseButton.LeftButton and self._shape != (0, 0):
            point = self.mapToScene(event.position().toPoint())
            self.clicked.emit(point.y() / self._spacing[0] - 0.5, point.x() / self._spacing[1] - 0.5)

    def mouseMoveEvent(self, event) -> None:
        if event.buttons() & Qt.MouseButton.LeftButton:
            self.mousePressEvent(event)


class SlicePanel(QWidget):
    """Axial, coronal and sagittal views with sliders, linked by one cursor."""

    cursor_changed = Signal(object)   # world position (3,) mm of the cursor voxel

    def __init__(self, parent=None):
        super().__init__(parent)
        self.views = {name: SliceView(name, self) for name in VIEWS}
        self.sliders = {name: QSlider(Qt.Orientation.Horizontal, self) for name in VIEWS}
        self.show_labels = QCheckBox("Femur label overlay")
        self.show_labels.setChecked(True)
        self.show_labels.toggled.connect(self._labels_toggled)
        self.position_label = QLabel("")
        self.position_label.setObjectName("viewDetails")
        grid = QGridLayout()
        grid.setSpacing(4)
        for column, name in enumerate(VIEWS):
            title = QLabel(name.capitalize())
            title.setObjectName("viewTitle")
            box = QVBoxLayout()
            box.addWidget(title)
            box.addWidget(self.views[name], 1)
            box.addWidget(self.sliders[name])
            grid.addLayout(box, 0, column)
            self.views[name].clicked.connect(lambda r, c, n=name: self._clicked(n, r, c))
            self.sliders[name].valueChanged.connect(lambda value, n=name: self._slider_moved(n, value))
        bar = QHBoxLayout()
        bar.addWidget(self.show_labels)
        bar.addStretch(1)
        bar.addWidget(self.position_label)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(6, 4, 6, 4)
        layout.addLayout(bar)
        layout.addLayout(grid, 1)
        self._volume = None
        self._labels = None
        self._geometry = None
        self._window = (0.0, 1.0)
        self.cursor_zyx = (0, 0, 0)

    def clear(self) -> None:
        self._volume = self._labels = self._geometry = None
        for view in self.views.values():
            view.scene().update()

    def set_volume(self, volume: np.ndarray | None, labels: np.ndarray, geometry) -> None:
        """Show a result: ``volume`` (z, y, x) intensities (None: labels only) and ``labels``."""
        self._labels = np.asarray(labels)
        self._volume = np.asarray(volume) if volume is not None else (self._labels > 0).astype(np.float32)
        self._geometry = geometry
        self._window = imaging.robust_window(self._volume)
        shape = self._volume.shape
        for name in VIEWS:
            fixed = imaging.SLICE_AXES[name][0]
            slider = self.sliders[name]
            blocked = slider.blockSignals(True)
            slider.setRange(0, shape[fixed] - 1)
            slider.blockSignals(blocked)
        self.set_cursor(tuple(s // 2 for s in shape))

    def set_cursor(self, index_zyx) -> None:
        if self._volume is None:
            return
        shape = self._volume.shape
        self.cursor_zyx = tuple(int(np.clip(i, 0, s - 1)) for i, s in zip(index_zyx, shape))
        for name in VIEWS:
            fixed = imaging.SLICE_AXES[name][0]
            slider = self.sliders[name]
            blocked = slider.blockSignals(True)
            slider.setValue(self.cursor_zyx[fixed])
            slider.blockSignals(blocked)
            self._render(name)
        world = self.cursor_world_mm()
        self.position_label.setText("cursor  x %.1f  y %.1f  z %.1f mm" % tuple(world))
        self.cursor_changed.emit(world)

    def cursor_world_mm(self) -> np.ndarray:
        k, j, i = self.cursor_zyx
        return (self._geometry.index_to_world() @ np.array([i, j, k, 1.0]))[:3]

    def set_cursor_world(self, point_mm) -> None:
        if self._geometry is None:
            return
        ijk = (self._geometry.world_to_index() @ np.append(np.asarray(point_mm, dtype=np.float64), 1.0))[:3]
        self.set_cursor(tuple(int(round(v)) for v in ijk[::-1]))

    def _render(self, name: str) -> None:
        index = self.cursor_zyx[imaging.SLICE_AXES[name][0]]
        grey = imaging.window_to_uint8(imaging.volume_slice(self._volume, name, index), window=self._window)
        labels = imaging.label_rgba(imaging.volume_slice(self._labels, name, index))
        view = self.views[name]
        view.set_slice(grey, labels, imaging.slice_spacing_mm(self._geometry.spacing_xyz_mm, name))
        view.set_cursor(*imaging.slice_cursor_px(self.cursor_zyx, self._volume.shape, name))
        view.set_labels_visible(self.show_labels.isChecked())

    def _clicked(self, name: str, row: float, col: float) -> None:
        if self._volume is not None:
            self.set_cursor(imaging.index_from_slice_px(self.cursor_zyx, self._volume.shape, name, row, col))

    def _slider_moved(self, name: str, value: int) -> None:
        if self._volume is None:
            return
        cursor = list(self.cursor_zyx)
        cursor[imaging.SLICE_AXES[name][0]] = int(value)
        self.set_cursor(tuple(cursor))

    def _labels_toggled(self, visible: bool) -> None:
        for view in self.views.values():
            view.set_labels_visible(visible)
