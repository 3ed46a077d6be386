"""Step 4, Review: the 3D surface with the warped atlas slices, the projected contour on each
radiograph and the linked slice views; which overlays the radiographs show."""

from __future__ import annotations

from PySide6.QtWidgets import QCheckBox, QHBoxLayout, QLabel, QPushButton

from app.report import angle_sensitivity_lines
from app.steps.base import Step


class ReviewStep(Step):
    name, viewer = "Review", 1
    title = "Review"
    hint = ("Check the reconstruction: the 3D surface with the warped atlas slices, the projected contour on "
            "each radiograph, and the linked slice views (click to move the cursor).")

    def __init__(self, window):
        super().__init__(window)
        layout = self.layout_
        self.show_contours = QCheckBox("Contour on radiographs")
        self.show_masks = QCheckBox("Masks on radiographs")
        self.show_markers = QCheckBox("Measurement graphics on radiographs")
        for box in (self.show_contours, self.show_masks, self.show_markers):
            box.setChecked(True)
            box.toggled.connect(self.apply_overlay_toggles)
            layout.addWidget(box)
        buttons = QHBoxLayout()
        for text, index in (("Radiographs", 0), ("3D", 1), ("Slices", 2)):
            button = QPushButton(text)
            button.clicked.connect(lambda _=False, i=index: window.viewers.setCurrentIndex(i))
            buttons.addWidget(button)
        layout.addLayout(buttons)
        reset = QPushButton("Reset 3D camera")
        reset.clicked.connect(window.surface_view.reset_camera)
        layout.addWidget(reset)
        self.review_summary = QLabel("")
        self.review_summary.setWordWrap(True)
        layout.addWidget(self.review_summary)
        layout.addStretch(1)

    def refresh(self) -> None:
        """Show the session's result (or nothing) in the 3D view, slices and radiographs."""
        s, w = self.session, self.window
        result = s.result
        if result is None:
            w.surface_view.clear()
            w.slice_panel.clear()
            for panel in w.radiograph_panels:
                panel.view.set_contour(None)
                panel.view.set_graphics(None)
            self.review_summary.setText("")
            return
        w.surface_view.set_result(result.surface_vertices, result.surface_faces, result.volume, result.grid)
        w.slice_panel.set_volume(result.volume, result.labels, result.grid)
        for index, panel in enumerate(w.radiograph_panels):
            if index < len(s.views):
                panel.view.set_contour(result.contours.get(s.views[index].name))
        similarity = [f"{v.get('name')}: NCC {v['similarity_ncc']:.2f}" for v in result.report.get("views", [])
                      if isinstance(v, dict) and v.get("similarity_ncc") is not None]
        size = " \u00d7 ".join(str(n) for n in result.labels.shape[::-1])
        lines = [f"Surface: {len(result.surface_faces):,} triangles", f"Label grid: {size} voxels"]
        if similarity:
            lines.append("Similarity " + ", ".join(similarity))
        sensitivity = angle_sensitivity_lines(result.report.get("angle_sensitivity"))
        if sensitivity:  # report.json -> angle_sensitivity (inference.angle_sensitivity)
            lines.append("A view's recorded angle 1\u00b0 off would not show in the images but would move "
                         + "; ".join(sensitivity))
        if result.warnings:
            lines.append(f"<span style='color:#FFB74D'>{len(result.warnings)} warning(s): see Register.</span>")
        self.review_summary.setText("<br>".join(lines))

    def apply_overlay_toggles(self, *_args) -> None:
        editing_masks = self.window.current_step() == "Masks"
        for panel in self.window.radiograph_panels:
            panel.view.set_contour_visible(self.show_contours.isChecked())
            panel.view.set_mask_visible(self.show_masks.isChecked() or editing_masks)
            panel.view.set_graphics_visible(self.show_markers.isChecked())
