"""The pictures of the planning report, rendered off-screen with fixed settings (never a screen grab).

- :func:`annotated_radiograph_png`: a radiograph (with the outline of the registered femur, the
  polylines of ``silhouette_<view>.json``, when there is one) cropped to the hip, with the measurement graphics of
  :func:`inference.graphics.view_graphics` and a scale bar at the hip, drawn with Pillow.
- :func:`render_3d_png`: the reconstructed femur from the front and from the side by VTK in an
  off-screen render window (EGL or OSMesa without a display), with a fixed camera; the bone is
  always drawn (half see-through, so the axes inside it stay visible).

Both work without Qt, so ``hipatlas report`` renders on a headless machine.
"""

from __future__ import annotations

import io as _stdio
import logging
import os
from typing import Any, Mapping, Sequence

import numpy as np

from inference import graphics

log = logging.getLogger(__name__)

#: Colours of the measurement graphics (shared with the workstation's radiograph view).
COLOURS = {
    "head": "#00E5FF",
    "shaft_axis": "#FFB300",
    "neck_axis": "#76FF03",
    "offset": "#FF4081",
    "vertical_offset": "#B388FF",
    "landmark": "#FFFF00",
    "scale": "#FFFFFF",
    "epipolar": "#FF9100",
    "femur_outline": "#FF4020",  # inference.silhouettes.CONTOUR_RGB, as in the overlay PNGs
}
#: Width of an annotated radiograph in the report (pixels of the PNG).
RADIOGRAPH_WIDTH_PX = 1000
#: Margin around the drawn graphics when cropping to the hip (fraction of their extent).
CROP_MARGIN = 0.35
BONE_COLOUR = "#E8DCC4"
#: Opacity of the bone in the report's 3D picture: the bone is always shown, the axes inside stay visible.
REPORT_BONE_OPACITY = 0.45


def _font(size: int):
    from PIL import ImageFont

    for name in ("DejaVuSans-Bold.ttf", "DejaVuSans.ttf", "LiberationSans-Bold.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    return ImageFont.load_default(size=size)


def _crop_box(drawn: graphics.ViewGraphics) -> tuple[int, int, int, int]:
    """(col0, row0, col1, row1), end exclusive, around the graphics inside the image."""
    rows, cols = drawn.image_shape
    points = [line.points_uv for line in drawn.polylines]
    points += [np.array([label.uv]) for label in drawn.labels if label.inside]
    if not points:
        return 0, 0, cols, rows
    uv = np.concatenate(points)
    uv = uv[(uv[:, 0] >= -0.5) & (uv[:, 0] <= cols - 0.5) & (uv[:, 1] >= -0.5) & (uv[:, 1] <= rows - 0.5)]
    if len(uv) == 0:
        return 0, 0, cols, rows
    low, high = uv.min(axis=0), uv.max(axis=0)
    margin = CROP_MARGIN * max(high[0] - low[0], high[1] - low[1], 0.15 * max(rows, cols))
    c0, r0 = max(0, int(np.floor(low[0] - margin))), max(0, int(np.floor(low[1] - margin)))
    c1, r1 = min(cols, int(np.ceil(high[0] + margin)) + 1), min(rows, int(np.ceil(high[1] + margin)) + 1)
    return c0, r0, c1, r1


def picture_line_width(width_px: int) -> int:
    """Line width of the drawn graphics, sized for a picture half a page wide."""
    return max(2, round(width_px / 300))


def cropped_picture(image_rgb: np.ndarray, box: tuple[int, int, int, int], width_px: int):
    """The part ``box`` = (col0, row0, col1, row1) of a radiograph, scaled to ``width_px``: the
    Pillow picture, the scale (picture pixels per image pixel) and ``xy(uv)``, which maps an
    image pixel position (u, v) to picture coordinates."""
    from PIL import Image

    pixels = np.asarray(image_rgb, dtype=np.uint8)
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[..., None], 3, axis=2)
    c0, r0, c1, r1 = box
    scale = width_px / max(c1 - c0, 1)
    picture = Image.fromarray(pixels[r0:r1, c0:c1]).resize(
        (width_px, max(1, round((r1 - r0) * scale))), Image.Resampling.LANCZOS)

    def xy(uv) -> tuple[float, float]:
        # pixel centre u lies at u + 0.5 from the image edge; Pillow's coordinates index pixels
        return (float(uv[0]) + 0.5 - c0) * scale - 0.5, (float(uv[1]) + 0.5 - r0) * scale - 0.5

    return picture, scale, xy


def annotated_radiograph_png(image_rgb: np.ndarray, drawn: graphics.ViewGraphics, *,
                             width_px: int = RADIOGRAPH_WIDTH_PX, outline_uv: Sequence[np.ndarray] = ()) -> bytes:
    """The radiograph cropped to the hip with the measurement graphics, as PNG bytes.

    Parameters
    ----------
    image_rgb : (rows, cols, 3) uint8 or (rows, cols) uint8
        The radiograph as displayed (the registration overlay or a windowed image).
    drawn : ViewGraphics
        Graphics of this view (:func:`inference.graphics.view_graphics`).
    outline_uv : sequence of (N, 2) arrays
        The registered femur's outline ((u, v) pixel polylines, :mod:`inference.silhouettes`),
        drawn under the graphics; it does not move the crop, which follows the graphics.
    """
    picture, scale, xy = cropped_picture(image_rgb, _crop_box(drawn), width_px)
    from PIL import ImageDraw

    draw = ImageDraw.Draw(picture)
    line_width, small = picture_line_width(width_px), _font(max(12, width_px // 30))
    placed: list[tuple[float, float, float, float]] = []

    def text(position, words, colour, fnt=small, anchor="la"):
        # Labels must not cover each other: move a colliding one down (then up) by its height.
        x, y = position
        box = draw.textbbox((x, y), words, font=fnt, anchor=anchor, stroke_width=3)
        # keep it inside the picture
        dx = max(0.0, 2 - box[0]) - max(0.0, box[2] - (picture.width - 2))
        x, box = x + dx, (box[0] + dx, box[1], box[2] + dx, box[3])
        height = box[3] - box[1] + 2
        for shift in (0, 1, -1, 2, -2, 3):
            moved = (box[0], box[1] + shift * height, box[2], box[3] + shift * height)
            if not any(moved[0] < b[2] and b[0] < moved[2] and moved[1] < b[3] and b[1] < moved[3] for b in placed):
                box, y = moved, y + shift * height
                break
        placed.append(box)
        draw.text((x, y), words, fill=colour, font=fnt, anchor=anchor, stroke_width=3, stroke_fill="#000000")

    for line in outline_uv:
        draw.line([xy(p) for p in line], fill=COLOURS["femur_outline"], width=max(1, line_width // 2), joint="curve")
    for line in drawn.polylines:
        points = [xy(p) for p in line.points_uv]
        if line.closed:
            points.append(points[0])
        draw.line(points, fill=COLOURS.get(line.kind, "#FFFFFF"), width=line_width, joint="curve")
    if drawn.calibration is not None:
        placed.append(_draw_scale_bar(draw, drawn.calibration.mm_per_px_at_hip / scale, picture.size, line_width,
                                      small))
    radius = 2.5 * line_width
    for label in drawn.labels:
        if not label.inside:
            continue
        x, y = xy(label.uv)
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), outline=COLOURS["landmark"], width=line_width)
        text((x + radius + 3, y - radius - 3), label.short, COLOURS["landmark"], small, anchor="lb")
    for line in drawn.polylines:
        if line.text and line.text_uv is not None:
            x, y = xy(line.text_uv)
            position, anchor = {"above": ((x, y - 6), "mb"), "left": ((x - 8, y), "rm")}.get(
                line.text_side, ((x + 8, y + 4), "la"))
            text(position, line.text, COLOURS.get(line.kind, "#FFFFFF"), small, anchor=anchor)
    buffer = _stdio.BytesIO()
    picture.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def _draw_scale_bar(draw, mm_per_output_px: float, size: tuple[int, int], line_width: int, font
                    ) -> tuple[float, float, float, float]:
    """A bar of a round length at the hip in the lower left corner; returns the box it covers."""
    width, height = size
    length = next((mm for mm in graphics.SCALE_BAR_LENGTHS_MM if mm / mm_per_output_px <= 0.3 * width),
                  graphics.SCALE_BAR_LENGTHS_MM[-1])
    pixels = length / mm_per_output_px
    x0, y = 0.04 * width, height - 0.04 * height
    tick = 3 * line_width
    words = f"{length:g} mm at the hip"
    text_box = draw.textbbox((x0, y - tick - 6), words, font=font, anchor="lb")
    box = (x0 - 8, text_box[1] - 6, max(x0 + pixels, text_box[2]) + 8, y + tick + 6)
    draw.rectangle(box, fill="#000000")
    draw.text((x0, y - tick - 6), words, fill=COLOURS["scale"], font=font, anchor="lb")
    draw.line([(x0, y), (x0 + pixels, y)], fill=COLOURS["scale"], width=line_width + 1)
    for x in (x0, x0 + pixels):
        draw.line([(x, y - tick), (x, y + tick)], fill=COLOURS["scale"], width=line_width)
    return box


# ------------------------------------------------------------------------------------------- 3D
def _prefer_egl_without_display() -> None:
    # Without an X display VTK would first try X (and log "bad X server connection") before
    # falling back to EGL; name EGL directly. Set before VTK creates its first render window.
    if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")


def render_3d_png(vertices: np.ndarray, faces: np.ndarray, measurements: Mapping[str, Any],
                  landmarks_mm: Mapping[str, Any], side: str, *, size: tuple[int, int] = (1400, 700),
                  meshes: Sequence[tuple[np.ndarray, np.ndarray, str, float]] = (),
                  bone_opacity: float = REPORT_BONE_OPACITY) -> bytes:
    """The femur from the front (left half) and from the lateral side (right half), PNG bytes.

    Off-screen VTK with fixed cameras (anterior: looking along +y in LPS with superior up;
    lateral: from the patient's right for a right femur, from the left for a left one).
    ``meshes``: more surfaces drawn with the bone, ``(vertices, faces, colour, opacity)`` (the
    planned implants).
    """
    _prefer_egl_without_display()
    import pyvista as pv

    vertices = np.asarray(vertices, dtype=np.float64)
    bone = _polydata(pv, vertices, faces)
    others = [(_polydata(pv, v, f), colour, opacity) for v, f, colour, opacity in meshes]
    plotter = pv.Plotter(off_screen=True, shape=(1, 2), window_size=size, border=False)
    try:
        low, high = vertices.min(axis=0), vertices.max(axis=0)
        centre = 0.5 * (low + high)
        extent = float(max(high - low)) or 1.0
        lateral = -1.0 if side == "right" else 1.0   # LPS: the patient's right is -x
        for column, (title, eye_direction) in enumerate((("Anterior view", (0.0, -1.0, 0.0)),
                                                          ("Lateral view", (lateral, 0.0, 0.0)))):
            plotter.subplot(0, column)
            plotter.set_background("#FFFFFF")
            plotter.add_mesh(bone, color=BONE_COLOUR, opacity=bone_opacity, smooth_shading=True, specular=0.2)
            for mesh, colour, opacity in others:
                plotter.add_mesh(mesh, color=colour, opacity=opacity, smooth_shading=True, specular=0.5)
            _add_measurements(plotter, measurements, landmarks_mm)
            plotter.add_text(title, position="upper_left", font_size=12, color="#222222")
            eye = centre + 3.0 * extent * np.asarray(eye_direction)
            plotter.camera_position = [tuple(eye), tuple(centre), (0.0, 0.0, 1.0)]
            plotter.reset_camera()
        pixels = plotter.screenshot(return_img=True)
    finally:
        plotter.close()
    from PIL import Image

    buffer = _stdio.BytesIO()
    Image.fromarray(np.asarray(pixels, dtype=np.uint8)).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def _polydata(pv, vertices, faces):
    faces = np.asarray(faces, dtype=np.int64)
    cells = np.hstack([np.full((len(faces), 1), 3, dtype=np.int64), faces]).ravel()
    return pv.PolyData(np.asarray(vertices, dtype=np.float64), cells).compute_normals(
        auto_orient_normals=False, split_vertices=False)


def _add_measurements(plotter, measurements: Mapping[str, Any], landmarks_mm: Mapping[str, Any]) -> None:
    import pyvista as pv

    centre = measurements.get("hip_centre_mm")
    radius = measurements.get("head_radius_mm")
    if centre is not None and isinstance(radius, (int, float)) and radius > 0:
        plotter.add_mesh(pv.Sphere(radius=float(radius), center=tuple(map(float, centre)), theta_resolution=40,
                                   phi_resolution=40), color=COLOURS["head"], opacity=0.25)
    for key, half in (("shaft_axis", 70.0), ("neck_axis", 35.0)):
        axis = measurements.get(key)
        if not isinstance(axis, Mapping):
            continue
        point = np.asarray(axis["point_mm"], dtype=np.float64)
        direction = np.asarray(axis["direction"], dtype=np.float64)
        direction = direction / (np.linalg.norm(direction) or 1.0)
        line = pv.Line(tuple(point - half * direction), tuple(point + half * direction))
        plotter.add_mesh(line.tube(radius=1.0), color=COLOURS[key])
    names = [n for n in landmarks_mm]
    if names:
        points = np.array([landmarks_mm[n] for n in names], dtype=np.float64)
        plotter.add_point_labels(points, [graphics.SHORT_LABELS.get(n, n) for n in names], point_size=14,
                                 point_color="#C51162", render_points_as_spheres=True, font_size=16,
                                 text_color="#000000", shape_color="#FFFFFF", shape_opacity=0.7,
                                 always_visible=True)
