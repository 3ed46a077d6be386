"""Draw the HipAtlas icon as PNG (several sizes), Windows ICO and macOS ICNS.

The shapes are those of ``packaging/icons/hipatlas.svg`` (kept in the repository for Linux
desktops, which scale SVG icons themselves); Pillow draws them here so that no SVG renderer is
needed on a build machine. Usage::

    python packaging/make_icons.py --out build/icons
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from PIL import Image, ImageDraw

#: Sizes of the PNG files written (Linux hicolor theme) and of the ICO/ICNS entries.
PNG_SIZES = (16, 32, 48, 64, 128, 256, 512)
BACKGROUND = "#1d3557"
BONE = "#f1e9d2"
ACCENT = "#48cae4"
# Drawn at this supersampling of the 256-unit design grid, then reduced: Pillow's shapes have no
# anti-aliasing of their own.
SUPERSAMPLE = 4


def draw_icon(size: int = 256) -> Image.Image:
    """The icon as an RGBA image of ``size`` x ``size`` pixels."""
    big = 256 * SUPERSAMPLE
    image = Image.new("RGBA", (big, big), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)

    def s(*values):
        return [v * SUPERSAMPLE for v in values]

    def circle(cx, cy, r, **kwargs):
        draw.ellipse(s(cx - r, cy - r, cx + r, cy + r), **kwargs)

    draw.rounded_rectangle(s(8, 8, 248, 248), radius=48 * SUPERSAMPLE, fill=BACKGROUND)
    draw.line(s(100, 72, 156, 122), fill=BONE, width=40 * SUPERSAMPLE)
    circle(156, 122, 20, fill=BONE)  # round cap of the neck
    draw.polygon([tuple(s(136, 118)), tuple(s(184, 118)), tuple(s(176, 244)), tuple(s(132, 244))], fill=BONE)
    circle(170, 108, 26, fill=BONE)
    circle(134, 166, 13, fill=BONE)
    circle(98, 70, 34, fill=BONE)
    circle(98, 70, 45, outline=ACCENT, width=7 * SUPERSAMPLE)
    # Dashed neck axis.
    start, end = (98.0, 70.0), (164.0, 132.0)
    length = ((end[0] - start[0]) ** 2 + (end[1] - start[1]) ** 2) ** 0.5
    step_x, step_y = (end[0] - start[0]) / length, (end[1] - start[1]) / length
    position = 0.0
    while position < length:
        stop = min(position + 8.0, length)
        draw.line(s(start[0] + step_x * position, start[1] + step_y * position,
                    start[0] + step_x * stop, start[1] + step_y * stop), fill=ACCENT, width=4 * SUPERSAMPLE)
        position += 14.0
    return image.resize((size, size), Image.LANCZOS)


def write_icons(out_dir: str | pathlib.Path) -> dict[str, pathlib.Path]:
    """Write ``hipatlas-<n>.png``, ``hipatlas.png`` (256), ``hipatlas.ico``, ``hipatlas.icns``."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    master = draw_icon(1024)
    written = {}
    for size in PNG_SIZES:
        path = out / f"hipatlas-{size}.png"
        master.resize((size, size), Image.LANCZOS).save(path)
        written[f"png{size}"] = path
    written["png"] = out / "hipatlas.png"
    master.resize((256, 256), Image.LANCZOS).save(written["png"])
    written["ico"] = out / "hipatlas.ico"
    master.save(written["ico"], sizes=[(n, n) for n in (16, 24, 32, 48, 64, 128, 256)])
    written["icns"] = out / "hipatlas.icns"
    master.save(written["icns"])
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="build/icons", help="output folder")
    args = parser.parse_args(argv)
    for path in write_icons(args.out).values():
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
