"""Outlines as data (inference.silhouettes): polylines from a projected label volume, JSON round
trip, and the overlay drawn from them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from inference import geometry, silhouettes
from inference.errors import InputFileError

RADIUS_MM = 20.0


def _ball(centre_mm=(0.0, 0.0, 0.0), spacing_mm: float = 1.0, half: int = 30):
    grid = geometry.VolumeGeometry((2 * half + 1,) * 3, (spacing_mm,) * 3,
                                   tuple(np.asarray(centre_mm) - half * spacing_mm), np.eye(3))
    k, j, i = np.indices(grid.shape_zyx)
    offsets = (np.stack([i, j, k], axis=-1) - half) * spacing_mm
    return (np.linalg.norm(offsets, axis=-1) <= RADIUS_MM).astype(np.uint8), grid


def _camera(rows=200, cols=240):
    return geometry.projection_matrix(geometry.CArmView(sdd_mm=1000, sid_mm=925, lao_deg=0, cranial_deg=0,
                                                        rows=rows, cols=cols, pixel_mm=0.5))


def test_a_ball_projects_to_one_closed_circle_of_the_known_radius():
    labels, grid = _ball()
    P = _camera()
    projected = silhouettes.project_silhouette(labels, grid, P, (200, 240))
    (circle,) = projected.polylines
    np.testing.assert_array_equal(circle[0], circle[-1])
    K, _, _ = geometry.decompose(P)
    distance_mm = np.linalg.norm(geometry.source_position(P))
    # the voxelised ball's surface lies half a voxel outside its outer voxel centres; a ball of
    # radius r at distance d projects to a circle of radius f r / sqrt(d^2 - r^2)
    radius_mm = RADIUS_MM + 0.5
    expected_px = K[0, 0] * radius_mm / np.sqrt(distance_mm ** 2 - radius_mm ** 2)
    centre_uv = geometry.project_points(P, np.zeros((1, 3)))[0]
    radii = np.linalg.norm(circle - centre_uv, axis=1)
    assert abs(radii.mean() - expected_px) < 1.5 and radii.std() < 0.7
    # the outline bounds the silhouette: inside pixels are in the mask, far outside ones are not
    u, v = np.meshgrid(np.arange(240), np.arange(200))
    distance_px = np.hypot(u - centre_uv[0], v - centre_uv[1])
    assert projected.mask[distance_px < radii.min() - 1].all()
    assert not projected.mask[distance_px > radii.max() + 1].any()


def test_an_outline_cut_by_the_image_border_closes_along_the_border():
    labels, grid = _ball()
    P = _camera()
    centre_uv = geometry.project_points(P, np.zeros((1, 3)))[0]
    cols = int(centre_uv[0])  # the image ends at the ball's centre
    (line,) = silhouettes.project_silhouette(labels, grid, P, (200, cols)).polylines
    np.testing.assert_array_equal(line[0], line[-1])
    assert np.all((line >= 0) & (line <= [cols - 1, 199]))
    on_border = np.isclose(line[:, 0], cols - 1)
    assert on_border.sum() > 10


def test_json_round_trip_and_damaged_files(tmp_path):
    labels, grid = _ball()
    projected = silhouettes.project_silhouette(labels, grid, _camera(), (200, 240))
    outline = projected.silhouette("AP")
    path = silhouettes.write_silhouette(tmp_path / silhouettes.file_name("AP"), outline)
    assert path.name == "silhouette_AP.json"
    back = silhouettes.read_silhouette(path)
    assert back.view == "AP" and back.image_shape == (200, 240) and len(back.polylines) == 1
    np.testing.assert_allclose(back.polylines[0], outline.polylines[0], atol=0.5 * 10 ** -silhouettes.DECIMALS)
    data = json.loads(path.read_text())
    assert data["format"] == silhouettes.FORMAT and data["polylines"][0]["closed"] is True
    (tmp_path / "bad.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(InputFileError, match="bad.json: not a HipAtlas silhouette"):
        silhouettes.read_silhouette(tmp_path / "bad.json")
    (tmp_path / "cut.json").write_text('{"format": "hipatlas-silhouette/1", "image_size_px": [2')
    with pytest.raises(InputFileError, match="cut.json: cannot read"):
        silhouettes.read_silhouette(tmp_path / "cut.json")


def test_the_overlay_is_drawn_from_the_polylines():
    rng = np.random.default_rng(3)
    pixels = rng.normal(1000.0, 50.0, (60, 80)).astype(np.float32)
    square = np.array([[10.0, 10.0], [50.0, 10.0], [50.0, 40.0], [10.0, 40.0], [10.0, 10.0]])
    rgb = silhouettes.draw_overlay(pixels, [square])
    coloured = np.all(rgb == silhouettes.CONTOUR_RGB, axis=-1)
    vv, uu = np.nonzero(coloured)
    on_edge = (np.isin(uu, (10, 50)) & (vv >= 10) & (vv <= 40)) | (np.isin(vv, (10, 40)) & (uu >= 10) & (uu <= 50))
    assert on_edge.all() and coloured.sum() == 2 * 41 + 2 * 29
    grey = ~coloured
    assert np.all(rgb[grey][:, 0] == rgb[grey][:, 1]) and np.all(rgb[grey][:, 1] == rgb[grey][:, 2])
    assert not np.any(np.all(silhouettes.draw_overlay(pixels, []) == silhouettes.CONTOUR_RGB, axis=-1))


def test_no_femur_no_outline():
    labels, grid = _ball()
    projected = silhouettes.project_silhouette(np.zeros_like(labels), grid, _camera(), (200, 240))
    assert projected.polylines == () and not projected.mask.any()
    assert silhouettes.similarity_ncc(np.ones((200, 240)), projected) is None


def test_projecting_shared_voxel_points_gives_the_same_thickness_and_the_upsampling_is_bilinear():
    """Several views of one label map share its voxel points (``points=``) with the same result,
    and the splatted detector is upsampled as map_coordinates' bilinear interpolation would."""
    from scipy import ndimage

    from inference import mask_proposal

    labels, grid = _ball(spacing_mm=1.5)
    points = mask_proposal.label_points(labels, grid)
    assert len(points) == int(labels.sum())
    for rows, cols in ((200, 240), (160, 300)):
        P = _camera(rows, cols)
        np.testing.assert_array_equal(mask_proposal.project_label(labels, grid, P, (rows, cols)),
                                      mask_proposal.project_label(None, grid, P, (rows, cols), points=points))
    rng = np.random.default_rng(3)
    small = rng.random((23, 31))
    at_rows = (np.arange(70) + 0.5) * (23 / 70) - 0.5
    at_cols = (np.arange(95) + 0.5) * (31 / 95) - 0.5
    expected = ndimage.map_coordinates(small, np.meshgrid(at_rows, at_cols, indexing="ij"), order=1, mode="nearest")
    resampled = mask_proposal._linear_resample(mask_proposal._linear_resample(small, at_rows, 0), at_cols, 1)
    np.testing.assert_allclose(resampled, expected, rtol=0, atol=1e-12)
