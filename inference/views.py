"""From a full radiograph to the network's detector grid, and back.

The network sees each view on a small fixed detector (compact 80x112, paper 160x224). Training data
and real cases must be brought onto that grid the same way, so both use this module:

* :func:`network_view` chooses the crop and scale: the network detector is centred on the projection
  of the registration grid's centre and just covers the projection of the grid's eight corners
  (one isotropic scale, so pixels stay square), and returns the network detector's projection
  matrix (exactly updated with :func:`inference.geometry.crop_resize`).
* :func:`resample_to_network` resamples an image (or mask) onto it with an anti-aliasing prefilter.
* :func:`network_to_source_pixels` maps network pixels back (for overlays).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from inference import geometry
from inference.errors import GeometryError


@dataclass(frozen=True)
class NetworkView:
    """Where the network detector lies on a source radiograph.

    Network pixel ``(i, j)`` (column, row) samples the source image at
    ``u = u0 + (i + 0.5) / scale - 0.5``, ``v = v0 + (j + 0.5) / scale - 0.5`` (pixel centres at
    integers, as in the case format).
    """

    projection: np.ndarray  # (3, 4) P of the network detector
    detector_hw: tuple[int, int]
    source_hw: tuple[int, int]
    u0: float
    v0: float
    scale: float  # network pixels per source pixel

    def source_coordinates(self) -> tuple[np.ndarray, np.ndarray]:
        """(v, u) source coordinates of every network pixel centre, each (H, W)."""
        rows, cols = self.detector_hw
        u = self.u0 + (np.arange(cols) + 0.5) / self.scale - 0.5
        v = self.v0 + (np.arange(rows) + 0.5) / self.scale - 0.5
        return np.meshgrid(v, u, indexing="ij")

    def covered_fraction(self) -> float:
        """Fraction of the network detector that lies on the source image (1 = fully inside)."""
        vv, uu = self.source_coordinates()
        rows, cols = self.source_hw
        inside = (uu >= -0.5) & (uu <= cols - 0.5) & (vv >= -0.5) & (vv <= rows - 0.5)
        return float(inside.mean())


def network_view(projection: np.ndarray, grid: "geometry.VolumeGeometry", detector_hw: tuple[int, int],
                 source_hw: tuple[int, int], margin: float = 1.0) -> NetworkView:
    """Choose the network detector for one view of ``grid``.

    Parameters
    ----------
    projection : (3, 4) array
        P of the full source radiograph (world mm -> source pixels).
    grid : VolumeGeometry
        The registration grid (atlas grid placed in the world).
    detector_hw : (rows, cols)
        Network detector size.
    source_hw : (rows, cols)
        Size of the source radiograph.
    margin : float
        Extra field of view around the projected grid (1.0 = the grid's corners just fit).
    """
    rows, cols = (int(detector_hw[0]), int(detector_hw[1]))
    if rows <= 0 or cols <= 0:
        raise GeometryError(f"detector_hw must be positive, not {detector_hw}")
    corners_uv = geometry.project_points(projection, grid.corners_mm())
    centre_uv = geometry.project_points(projection, np.asarray(grid.center_mm())[None])[0]
    half_u = np.max(np.abs(corners_uv[:, 0] - centre_uv[0])) * margin
    half_v = np.max(np.abs(corners_uv[:, 1] - centre_uv[1])) * margin
    if not (np.isfinite(half_u) and np.isfinite(half_v)) or half_u <= 0 or half_v <= 0:
        raise GeometryError("the registration grid does not project onto the detector "
                            "(is the femur in front of the X-ray source?)")
    # One isotropic scale so that the projected grid fits on the network detector.
    scale = min(cols / (2.0 * half_u), rows / (2.0 * half_v))
    # Centre pixel of the network detector, (cols-1)/2, must sample the source at centre_uv:
    # centre_u = u0 + (cols/2)/scale - 0.5.
    u0 = centre_uv[0] + 0.5 - cols / (2.0 * scale)
    v0 = centre_uv[1] + 0.5 - rows / (2.0 * scale)
    projection_net = geometry.crop_resize(projection, u0, v0, scale)
    return NetworkView(projection=projection_net, detector_hw=(rows, cols),
                       source_hw=(int(source_hw[0]), int(source_hw[1])), u0=float(u0), v0=float(v0),
                       scale=float(scale))


#: How :func:`resample_to_network` fills network pixels beyond the source image.
OUTSIDE_MODES = {"zero": "constant", "edge": "nearest"}
#: How registration fills the network's views beyond a radiograph (and its mask). The network
#: was trained on views that show the whole atlas field of view; a shaft cut by the image border
#: and padded with zeros looked like a femur that ends there. Measured with
#: ``tools/eval_cases.py --cases 8 --seed 77 --vary``: mean Dice 0.830 with zeros, 0.901 with
#: the edge repeated; the three cases whose radiographs miss part of the field of view went
#: from 0.652-0.870 to 0.903-0.925.
NETWORK_OUTSIDE = "edge"


def resample_to_network(image: np.ndarray, view: NetworkView, order: int = 1, outside: str = "zero") -> np.ndarray:
    """Resample a source image onto the network detector.

    Downsampling is prefiltered with a Gaussian whose width follows the scale, so that thin
    structures (cortex, a mask's edge) are averaged rather than aliased. Beyond the source
    image the network pixels are zero (``outside="zero"``) or repeat the nearest edge pixel
    (``"edge"``: a femoral shaft cut by the image border runs on straight, instead of ending
    where the radiograph does).
    """
    if outside not in OUTSIDE_MODES:
        raise ValueError(f"outside must be one of {sorted(OUTSIDE_MODES)}, not {outside!r}")
    image = np.asarray(image, dtype=np.float32)
    if image.shape != tuple(view.source_hw):
        raise GeometryError(f"image is {image.shape[0]}x{image.shape[1]} pixels but the view was "
                            f"computed for {view.source_hw[0]}x{view.source_hw[1]}")
    if view.scale < 1.0:
        # sigma ~ 0.5 output pixel, in source pixels; minus the intrinsic pixel blur.
        sigma = 0.5 * np.sqrt(max((1.0 / view.scale) ** 2 - 1.0, 0.0))
        image = ndimage.gaussian_filter(image, sigma=sigma, mode="nearest")
    vv, uu = view.source_coordinates()
    return ndimage.map_coordinates(image, [vv, uu], order=order, mode=OUTSIDE_MODES[outside],
                                   cval=0.0).astype(np.float32)


def resample_mask_to_network(mask: np.ndarray, view: NetworkView, outside: str = "zero") -> np.ndarray:
    """Resample a binary mask onto the network detector (area-weighted, then thresholded at 0.5)."""
    fraction = resample_to_network((np.asarray(mask) > 0).astype(np.float32), view, outside=outside)
    return (fraction >= 0.5).astype(np.uint8)


@dataclass(frozen=True)
class NetworkInputs:
    """Both views brought onto the network's detectors, as registration feeds the network."""

    views: list[NetworkView]
    images: list[np.ndarray]  # (H, W) float32 each
    masks: list[np.ndarray]  # (H, W) uint8 each

    @property
    def projections(self) -> list[np.ndarray]:
        return [view.projection for view in self.views]


def network_inputs(images, masks, projections, grid: "geometry.VolumeGeometry",
                   detector_hw: tuple[int, int]) -> NetworkInputs:
    """Each radiograph and its femur mask on the network detector around ``grid`` (:func:`network_view`),
    filled beyond the radiograph as :data:`NETWORK_OUTSIDE` says. Registration and the mask proposal
    both use it, so the network sees their views alike."""
    net_views, images_net, masks_net = [], [], []
    for image, mask, projection in zip(images, masks, projections):
        pixels = np.asarray(image, np.float32)
        net_view = network_view(projection, grid, detector_hw, pixels.shape)
        net_views.append(net_view)
        images_net.append(resample_to_network(pixels, net_view, outside=NETWORK_OUTSIDE))
        masks_net.append(resample_mask_to_network(mask, net_view, outside=NETWORK_OUTSIDE))
    return NetworkInputs(net_views, images_net, masks_net)
