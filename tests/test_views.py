"""Known-answer tests of inference.views: the network detector's P says where its image shows a point."""

from __future__ import annotations

import numpy as np
import pytest

from inference import geometry, views
from inference.errors import GeometryError

GRID = geometry.VolumeGeometry.centered((96, 64, 96), (1.328, 1.328, 2.0), (-95.0, 12.0, 30.0))


def _view(lao_deg: float, rows: int, cols: int, pixel_mm: float, isocentre=(-90.0, 0.0, 40.0)) -> np.ndarray:
    return geometry.projection_matrix(geometry.CArmView(
        sdd_mm=1000.0, sid_mm=925.0, lao_deg=lao_deg, cranial_deg=0.0, rows=rows, cols=cols,
        pixel_mm=pixel_mm, isocentre_mm=isocentre))


def _bead_image(shape, uv, sigma_px):
    """A Gaussian bead centred at sub-pixel (u, v) on a faint ramp (pixel centres at integers)."""
    vv, uu = np.mgrid[: shape[0], : shape[1]].astype(float)
    bead = np.exp(-((uu - uv[0]) ** 2 + (vv - uv[1]) ** 2) / (2 * sigma_px ** 2))
    return (1000.0 * bead + 0.01 * uu).astype(np.float32)


def _peak(image):
    """Sub-pixel peak of a blob: intensity centroid around the maximum (background removed)."""
    v0, u0 = np.unravel_index(np.argmax(image), image.shape)
    window = image[v0 - 4: v0 + 5, u0 - 4: u0 + 5].astype(float)
    window = np.clip(window - 0.05 * window.max(), 0.0, None)
    vv, uu = np.mgrid[v0 - 4: v0 + 5, u0 - 4: u0 + 5]
    return np.array([(window * uu).sum(), (window * vv).sum()]) / window.sum()


@pytest.mark.parametrize("lao_deg, shape, pixel_mm", [
    (0.0, (900, 700), 0.3),    # large radiograph: downsampled (scale < 1)
    (90.0, (600, 800), 0.4),   # lateral, landscape
    (-30.0, (60, 50), 5.0),    # tiny radiograph: upsampled (scale > 1)
])
def test_bead_stays_on_its_pixel(lao_deg, shape, pixel_mm):
    projection = _view(lao_deg, *shape, pixel_mm)
    net = views.network_view(projection, GRID, (80, 112), shape)
    rng = np.random.default_rng(4)
    # beads anywhere inside the grid, away from its faces
    for _ in range(3):
        fraction = rng.uniform(0.25, 0.75, 3)
        point = GRID.corners_mm().min(0) + fraction * (GRID.corners_mm().max(0) - GRID.corners_mm().min(0))
        uv_source = geometry.project_points(projection, point[None])[0]
        # a bead a few network pixels wide, whatever the source resolution
        image = _bead_image(shape, uv_source, sigma_px=1.5 / net.scale)
        resampled = views.resample_to_network(image, net)
        expected = geometry.project_points(net.projection, point[None])[0]
        np.testing.assert_allclose(_peak(resampled), expected, atol=0.15)


def test_grid_fits_and_is_centred_on_the_network_detector():
    projection = _view(0.0, 1400, 1400, 0.3)
    net = views.network_view(projection, GRID, (80, 112), (1400, 1400))
    uv = geometry.project_points(net.projection, GRID.corners_mm())
    # every corner on the detector (pixel edges at -0.5 and size - 0.5), the farthest one on its
    # edge (isotropic scale: one direction just fits), the grid centre on the detector centre
    reach = np.max(np.abs(uv - [55.5, 39.5]) / [56.0, 40.0])
    np.testing.assert_allclose(reach, 1.0, atol=1e-9)
    np.testing.assert_allclose(geometry.project_points(net.projection, GRID.center_mm()[None])[0], [55.5, 39.5],
                               atol=1e-9)
    # the network pixel grid and the source coordinates agree with P_net: source (u, v) of a
    # network pixel centre, back through crop_resize, is that pixel
    vv, uu = net.source_coordinates()
    assert vv.shape == (80, 112) and net.covered_fraction() == 1.0
    point = GRID.center_mm() + [10.0, -5.0, 20.0]
    uv_source = geometry.project_points(projection, point[None])[0]
    uv_net = geometry.project_points(net.projection, point[None])[0]
    np.testing.assert_allclose((uv_source + 0.5 - [net.u0, net.v0]) * net.scale - 0.5, uv_net, atol=1e-9)


def test_mask_resampling_and_coverage():
    shape = (500, 400)
    projection = _view(0.0, *shape, 0.5)
    net = views.network_view(projection, GRID, (80, 112), shape)
    mask = np.zeros(shape, bool)
    uv = geometry.project_points(projection, GRID.center_mm()[None])[0]
    radius = 40.0
    vv, uu = np.mgrid[: shape[0], : shape[1]]
    mask[(uu - uv[0]) ** 2 + (vv - uv[1]) ** 2 <= radius ** 2] = True
    small = views.resample_mask_to_network(mask, net)
    assert small.dtype == np.uint8 and set(np.unique(small)) == {0, 1}
    # the disc's area scales with scale^2 and its centre maps to P_net of the grid centre
    np.testing.assert_allclose(small.sum(), np.pi * (radius * net.scale) ** 2, rtol=0.1)
    jj, ii = np.nonzero(small)
    np.testing.assert_allclose([ii.mean(), jj.mean()], [55.5, 39.5], atol=0.5)
    # the grid covers more than this small radiograph: coverage < 1 and zero outside the image
    assert 0.0 < net.covered_fraction() < 1.0
    image = views.resample_to_network(np.ones(shape, np.float32), net)
    np.testing.assert_allclose(image.mean(), net.covered_fraction(), atol=0.05)


def test_edge_mode_continues_a_shaft_cut_by_the_image_border():
    """A vertical bar (a shaft) running off the bottom of a small radiograph runs on, straight
    and with its profile, beyond the border with ``outside="edge"``; zeros with the default."""
    shape = (100, 100)
    projection = _view(0.0, *shape, 1.0)
    net = views.network_view(projection, GRID, (80, 112), shape)
    vv, uu = views.NetworkView.source_coordinates(net)
    below = vv > shape[0] - 0.5  # network pixels under the radiograph's bottom edge
    assert below.any() and net.covered_fraction() < 1.0
    image = np.zeros(shape, np.float32)
    image[40:, 45:56] = 2.0  # the bar reaches the bottom edge
    mask = image > 0
    column = np.abs(uu[0] - 50.0).argmin()
    zero = views.resample_to_network(image, net)
    edge = views.resample_to_network(image, net, outside="edge")
    edge_mask = views.resample_mask_to_network(mask, net, outside="edge")
    assert np.all(zero[below] == 0)
    rows_below = below[:, column]
    np.testing.assert_allclose(edge[rows_below, column], 2.0, rtol=1e-3)
    assert edge_mask[rows_below, column].all()
    # the bar's width below the border is its width above it
    last_inside = np.nonzero(~rows_below)[0].max()
    assert edge_mask[rows_below].sum(axis=1).tolist() == [edge_mask[last_inside].sum()] * int(rows_below.sum())
    # inside the image's outer pixel centres both modes agree
    inner = (vv <= shape[0] - 1) & (uu >= 0) & (uu <= shape[1] - 1)
    np.testing.assert_allclose(edge[inner], zero[inner], atol=1e-5)
    with pytest.raises(ValueError, match="outside"):
        views.resample_to_network(image, net, outside="mirror")


def test_bad_inputs_raise_geometry_errors():
    projection = _view(0.0, 100, 100, 1.0)
    with pytest.raises(GeometryError, match="detector_hw"):
        views.network_view(projection, GRID, (0, 112), (100, 100))
    net = views.network_view(projection, GRID, (80, 112), (100, 100))
    with pytest.raises(GeometryError, match="100x100"):
        views.resample_to_network(np.zeros((90, 100), np.float32), net)
