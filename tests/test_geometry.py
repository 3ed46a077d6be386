"""Tests for inference.geometry: known answers (beads, orientations, DICOM) and round trips."""

from __future__ import annotations

import math

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from scipy import ndimage
from skimage.transform import resize as sk_resize

from inference import geometry as g
from inference.errors import CalibrationError, GeometryError

SDD, SID, PITCH = 1000.0, 925.0, 0.5

VIEWS = {
    "AP": dict(lao_deg=0.0, cranial_deg=0.0),
    "LAT+90": dict(lao_deg=90.0, cranial_deg=0.0),
    "LAT-90": dict(lao_deg=-90.0, cranial_deg=0.0),
    "oblique30": dict(lao_deg=30.0, cranial_deg=0.0),
    "cranial15": dict(lao_deg=0.0, cranial_deg=15.0),
    "oblique-25_caudal10": dict(lao_deg=-25.0, cranial_deg=-10.0, principal_point_px=(20.3, 14.1),
                                pixel_v_mm=0.7, isocentre_mm=(12.0, -30.0, 80.0)),
    "detector-view": dict(lao_deg=180.0, cranial_deg=5.0, viewed_from="detector"),
}


def make_view(**overrides) -> g.CArmView:
    params = dict(sdd_mm=SDD, sid_mm=SID, lao_deg=0.0, cranial_deg=0.0, rows=32, cols=48, pixel_mm=PITCH)
    params.update(overrides)
    return g.CArmView(**params)


def gaussian_image(shape, uv, sigma_px):
    rows, cols = shape
    v, u = np.mgrid[0:rows, 0:cols].astype(np.float64)
    return np.exp(-((u - uv[0]) ** 2 + (v - uv[1]) ** 2) / (2.0 * sigma_px**2))


def centroid_uv(image):
    v, u = np.mgrid[0:image.shape[0], 0:image.shape[1]].astype(np.float64)
    image = np.clip(image, 0.0, None)  # spline overshoot is tiny and symmetric; drop the negatives
    return np.array([(u * image).sum(), (v * image).sum()]) / image.sum()


def distance_to_line(points, origins, directions):
    offset = points - origins
    along = np.sum(offset * directions, axis=-1, keepdims=True)
    return np.linalg.norm(offset - along * directions, axis=-1)


# ----------------------------------------------------------------------------- projection
@pytest.mark.parametrize("name", sorted(VIEWS))
def test_bead_projects_where_the_pinhole_model_says_and_its_ray_passes_through_it(name):
    view = make_view(**VIEWS[name])
    P = g.projection_matrix(view)
    rng = np.random.default_rng(1)
    beads = np.asarray(view.isocentre_mm) + rng.uniform(-80.0, 80.0, size=(20, 3))
    uv = g.project_points(P, beads)

    # Independent pinhole model: intersect the line source -> bead with the detector plane.
    frame = view.frame()
    source, n = frame["source_mm"], frame["n"]
    depth = (beads - source) @ n
    on_detector = source + (SDD / depth)[:, None] * (beads - source)
    centre = source + SDD * n
    pitch_u, pitch_v = view.pitch_uv_mm
    c_u, c_v = view.principal_point_uv_px
    expected = np.stack([c_u + (on_detector - centre) @ frame["e_u"] / pitch_u,
                         c_v + (on_detector - centre) @ frame["e_v"] / pitch_v], axis=1)
    np.testing.assert_allclose(uv, expected, atol=1e-9)

    origins, directions = g.pixel_rays(P, uv)
    np.testing.assert_allclose(origins, np.broadcast_to(source, origins.shape), atol=1e-9)
    assert np.max(distance_to_line(beads, origins, directions)) < 1e-9
    # Rays point forward: the bead lies at positive distance along its ray.
    assert np.all(np.sum((beads - origins) * directions, axis=1) > 0)
    # Normalisation: w > 0 in front, ||P[2, :3]|| = 1 / SDD, w = 1 on the detector plane.
    homogeneous = np.c_[beads, np.ones(len(beads))] @ P.T
    assert np.all(homogeneous[:, 2] > 0)
    assert np.linalg.norm(P[2, :3]) == pytest.approx(1.0 / SDD, rel=1e-12)
    assert (P @ np.append(on_detector[0], 1.0))[2] == pytest.approx(1.0, rel=1e-12)


@pytest.mark.parametrize("name", sorted(VIEWS))
def test_source_sits_at_sid_from_isocentre_and_isocentre_hits_principal_point(name):
    view = make_view(**VIEWS[name])
    P = g.projection_matrix(view)
    source = g.source_position(P)
    iso = np.asarray(view.isocentre_mm)
    assert np.linalg.norm(source - iso) == pytest.approx(SID, rel=1e-12)
    np.testing.assert_allclose(g.principal_direction(P), (iso - source) / SID, atol=1e-12)
    np.testing.assert_allclose(g.project_points(P, iso), view.principal_point_uv_px, atol=1e-9)


def test_ap_view_displays_like_a_clinical_ap_radiograph():
    view = make_view()
    P = g.projection_matrix(view)
    np.testing.assert_allclose(g.source_position(P), [0.0, -SID, 0.0], atol=1e-9)  # anterior (-y)
    centre = np.array(view.principal_point_uv_px)
    uv = g.project_points(P, [[10.0, 0.0, 0.0], [-10.0, 0.0, 0.0], [0.0, 0.0, 10.0], [0.0, 0.0, -10.0]])
    magnified_px = 10.0 * SDD / SID / PITCH
    # Patient's left (+x) to the image right (larger u), patient's right to the image left.
    np.testing.assert_allclose(uv[0], centre + [magnified_px, 0.0], atol=1e-9)
    np.testing.assert_allclose(uv[1], centre - [magnified_px, 0.0], atol=1e-9)
    # Superior (+z) at the top (smaller v): v increases inferiorly.
    np.testing.assert_allclose(uv[2], centre - [0.0, magnified_px], atol=1e-9)
    np.testing.assert_allclose(uv[3], centre + [0.0, magnified_px], atol=1e-9)
    # A bead nearer the detector (posterior) is magnified less.
    near_detector = g.project_points(P, [10.0, 50.0, 0.0])
    assert near_detector[0] - centre[0] == pytest.approx(10.0 * SDD / (SID + 50.0) / PITCH)


def test_lateral_and_tilted_views_follow_the_documented_signs():
    P_left = g.projection_matrix(make_view(lao_deg=90.0))
    np.testing.assert_allclose(g.source_position(P_left), [SID, 0.0, 0.0], atol=1e-9)  # patient left
    posterior, anterior, superior = g.project_points(P_left, [[0, 10.0, 0], [0, -10.0, 0], [0, 0, 10.0]])
    assert posterior[0] > anterior[0]  # u increases posteriorly at lao_deg = +90
    assert superior[1] < 15.5  # superior still at the top

    P_right = g.projection_matrix(make_view(lao_deg=-90.0))
    np.testing.assert_allclose(g.source_position(P_right), [-SID, 0.0, 0.0], atol=1e-9)
    posterior, anterior = g.project_points(P_right, [[0, 10.0, 0], [0, -10.0, 0]])
    assert anterior[0] > posterior[0]

    # +LAO moves the source towards the patient's left.
    source = g.source_position(g.projection_matrix(make_view(lao_deg=30.0)))
    np.testing.assert_allclose(source, SID * np.array([math.sin(math.radians(30)), -math.cos(math.radians(30)), 0]),
                               atol=1e-9)

    # +cranial: beam towards the head, source towards the feet, image stays heads-up.
    P_cranial = g.projection_matrix(make_view(cranial_deg=15.0))
    assert g.principal_direction(P_cranial)[2] == pytest.approx(math.sin(math.radians(15.0)))
    assert g.source_position(P_cranial)[2] == pytest.approx(-SID * math.sin(math.radians(15.0)))
    up, down = g.project_points(P_cranial, [[0, 0, 10.0], [0, 0, -10.0]])
    assert up[1] < down[1] and up[0] == pytest.approx(down[0])

    # Viewed from the detector: u mirrored, v unchanged.
    P_mirror = g.projection_matrix(make_view(viewed_from="detector"))
    P_plain = g.projection_matrix(make_view())
    uv_mirror = g.project_points(P_mirror, [[10.0, 0.0, 5.0]])
    uv_plain = g.project_points(P_plain, [[10.0, 0.0, 5.0]])
    np.testing.assert_allclose(uv_mirror, [[47.0 - uv_plain[0, 0], uv_plain[0, 1]]], atol=1e-9)


def test_points_behind_the_source_do_not_project():
    P = g.projection_matrix(make_view())
    uv = g.project_points(P, [[0.0, -2000.0, 0.0], [0.0, 0.0, 0.0]])
    assert np.all(np.isnan(uv[0])) and np.all(np.isfinite(uv[1]))


def test_decompose_round_trip():
    rng = np.random.default_rng(7)
    matrices = [g.projection_matrix(make_view(**params)) for params in VIEWS.values()]
    matrices.append(rng.normal(size=(3, 4)))
    for P in matrices:
        K, R, t = g.decompose(P)
        assert np.allclose(np.tril(K, -1), 0.0) and np.all(np.diag(K) > 0) and K[2, 2] == 1.0
        np.testing.assert_allclose(R @ R.T, np.eye(3), atol=1e-12)
        np.testing.assert_allclose(np.linalg.norm(P[2, :3]) * K @ np.c_[R, t], P, atol=1e-12)
        np.testing.assert_allclose(t, -R @ g.source_position(P), atol=1e-9)
    K, R, _ = g.decompose(g.projection_matrix(make_view(pixel_v_mm=0.8, lao_deg=20.0)))
    np.testing.assert_allclose(np.diag(K), [SDD / PITCH, SDD / 0.8, 1.0], rtol=1e-12)
    np.testing.assert_allclose(K[:2, 2], [23.5, 15.5], atol=1e-9)
    assert np.linalg.det(R) == pytest.approx(1.0)
    _, R_mirror, _ = g.decompose(g.projection_matrix(make_view(viewed_from="detector")))
    assert np.linalg.det(R_mirror) == pytest.approx(-1.0)  # a mirrored image, not an error


def test_normalise_projection_restores_sign_and_scale():
    P = g.projection_matrix(make_view(lao_deg=40.0, isocentre_mm=(5.0, 6.0, 7.0)))
    scrambled = -3.7 * P
    np.testing.assert_allclose(g.normalise_projection(scrambled, front_point_mm=(5, 6, 7), sdd_mm=SDD), P,
                               atol=1e-15)
    unit = g.normalise_projection(scrambled, front_point_mm=(0, 0, 0))
    assert np.linalg.norm(unit[2, :3]) == pytest.approx(1.0)
    # With unit norm, w is the depth in mm along the principal axis.
    assert (unit @ [5.0, 6.0, 7.0, 1.0])[2] == pytest.approx(SID)
    kept = g.normalise_projection(scrambled)  # no front point: sign kept
    assert np.sign(kept[2, 1]) == np.sign(scrambled[2, 1])


# ----------------------------------------------------------------------------- image edits
def _bead_and_image(shape=(64, 80), target_uv=(37.3, 29.6), sigma_px=3.0):
    view = make_view(rows=shape[0], cols=shape[1], lao_deg=12.0, cranial_deg=-7.0)
    P = g.projection_matrix(view)
    origin, direction = g.pixel_rays(P, np.array(target_uv))
    bead = origin + (SID + 23.0) * direction
    uv = g.project_points(P, bead)
    np.testing.assert_allclose(uv, target_uv, atol=1e-9)
    return P, bead, gaussian_image(shape, uv, sigma_px)


def test_pure_crop_shifts_the_bead_by_the_crop_origin():
    P, bead, _ = _bead_and_image()
    P_crop = g.crop_resize(P, 11, 7, 1.0)
    np.testing.assert_allclose(g.project_points(P_crop, bead), g.project_points(P, bead) - [11, 7], atol=1e-9)


@pytest.mark.parametrize("scale_vu", [(0.75, 0.5), (1.5, 1.25), (0.5, 0.5)])
def test_crop_resize_matches_real_resamplers_to_a_twentieth_of_a_pixel(scale_vu):
    P, bead, image = _bead_and_image()
    u0, v0 = 11, 7
    crop = image[v0:v0 + 40, u0:u0 + 48]
    out_shape = (round(40 * scale_vu[0]), round(48 * scale_vu[1]))
    scale_v, scale_u = out_shape[0] / 40, out_shape[1] / 48
    P_new = g.crop_resize(P, u0, v0, scale_u, scale_v)
    expected = g.project_points(P_new, bead)

    zoomed = ndimage.zoom(crop, (scale_v, scale_u), order=3, mode="grid-constant", grid_mode=True)
    resized = sk_resize(crop, out_shape, order=3, mode="constant", anti_aliasing=False)
    for resampled in (zoomed, resized):
        assert resampled.shape == out_shape
        assert np.max(np.abs(centroid_uv(resampled) - expected)) < 0.05
    # Without the half-pixel term (geometry.md's bare formula) the error would be (s - 1) / 2 px.
    naive = (np.diag([scale_u, scale_v, 1.0]) @ np.array([[1, 0, -u0], [0, 1, -v0], [0, 0, 1.0]]) @ P)
    if scale_u != 1.0:
        assert abs(g.project_points(naive, bead)[0] - expected[0]) == pytest.approx(abs(scale_u - 1) / 2)


def test_resize_to_is_a_full_image_crop_resize():
    P, bead, image = _bead_and_image()
    P_small = g.resize_to(P, image.shape, (32, 40))
    np.testing.assert_allclose(P_small, g.crop_resize(P, 0, 0, 0.5, 0.5), atol=1e-15)
    small = sk_resize(image, (32, 40), order=3, mode="constant", anti_aliasing=False)
    assert np.max(np.abs(centroid_uv(small) - g.project_points(P_small, bead))) < 0.05


def test_flips_follow_the_flipped_image():
    P, bead, image = _bead_and_image()
    rows, cols = image.shape
    P_h = g.flip_horizontal(P, cols)
    P_v = g.flip_vertical(P, rows)
    assert np.max(np.abs(centroid_uv(np.fliplr(image)) - g.project_points(P_h, bead))) < 1e-6
    assert np.max(np.abs(centroid_uv(np.flipud(image)) - g.project_points(P_v, bead))) < 1e-6
    np.testing.assert_allclose(g.flip_horizontal(P_h, cols), P, atol=1e-12)
    np.testing.assert_allclose(g.source_position(P_h), g.source_position(P), atol=1e-9)


def test_mirror_world_x_maps_a_left_bead_to_the_same_pixel():
    P = g.projection_matrix(make_view(lao_deg=20.0, isocentre_mm=(-90.0, 10.0, 0.0)))
    left_bead = np.array([-95.0, 4.0, 12.0])
    mirrored = g.mirror_world_x(P)
    np.testing.assert_allclose(g.project_points(mirrored, left_bead * [-1, 1, 1]), g.project_points(P, left_bead),
                               atol=1e-9)
    np.testing.assert_allclose(g.source_position(mirrored), g.source_position(P) * [-1, 1, 1], atol=1e-9)
    np.testing.assert_allclose(g.mirror_world_x(mirrored), P, atol=1e-15)


def test_transform_world_expresses_p_in_a_new_frame():
    P = g.projection_matrix(make_view(lao_deg=-15.0))
    angle = math.radians(25.0)
    T = np.eye(4)
    T[:3, :3] = [[math.cos(angle), -math.sin(angle), 0], [math.sin(angle), math.cos(angle), 0], [0, 0, 1]]
    T[:3, 3] = [10.0, -20.0, 30.0]
    P_new = g.transform_world(P, T)
    point_new = np.array([3.0, -4.0, 5.0])
    point_world = (T @ np.append(point_new, 1.0))[:3]
    np.testing.assert_allclose(g.project_points(P_new, point_new), g.project_points(P, point_world), atol=1e-9)
    source_world = g.source_position(P)
    np.testing.assert_allclose(g.source_position(P_new), (np.linalg.inv(T) @ np.append(source_world, 1))[:3],
                               atol=1e-9)
    with pytest.raises(GeometryError, match="T_new_to_world"):
        g.transform_world(P, np.zeros((4, 4)))


# ----------------------------------------------------------------------------- DICOM
def dicom_dataset(**overrides) -> pydicom.Dataset:
    ds = pydicom.Dataset()
    ds.ImagerPixelSpacing = [0.3, 0.25]  # [row spacing, column spacing]
    ds.DistanceSourceToDetector = "1100.0"
    ds.DistanceSourceToPatient = "800.0"
    ds.PositionerPrimaryAngle = "0"
    ds.PositionerSecondaryAngle = "0"
    ds.Rows = 40
    ds.Columns = 56
    for keyword, value in overrides.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return ds


@pytest.mark.parametrize("primary, secondary", [(0.0, 0.0), (90.0, 0.0), (-30.0, 20.0), (175.0, -12.5)])
def test_dicom_geometry_agrees_with_carm_view(primary, secondary):
    ds = dicom_dataset(PositionerPrimaryAngle=str(primary), PositionerSecondaryAngle=str(secondary))
    P, calibration = g.projection_from_dicom(ds, name="AP")
    lao = primary + 180.0 if primary <= 0 else primary - 180.0
    view = g.CArmView(sdd_mm=1100.0, sid_mm=800.0, lao_deg=lao, cranial_deg=secondary, rows=40, cols=56,
                      pixel_mm=0.25, pixel_v_mm=0.3, viewed_from="detector")
    np.testing.assert_allclose(P, g.projection_matrix(view), rtol=0, atol=1e-15)
    assert calibration.source == "dicom-tags"
    assert "DistanceSourceToPatient (0018,1111)" in calibration.details["tags_used"]
    assert calibration.to_dict()["view"]["lao_deg"] == pytest.approx(lao)

    # DICOM semantics, checked directly: the detector sits at `primary` from anterior towards the
    # patient's left and is tilted `secondary` towards the head; the source is opposite.
    a, b = math.radians(primary), math.radians(secondary)
    detector_dir = np.array([math.sin(a) * math.cos(b), -math.cos(a) * math.cos(b), math.sin(b)])
    np.testing.assert_allclose(g.source_position(P), -800.0 * detector_dir, atol=1e-9)
    # Heads-up display.
    up, down = g.project_points(P, [[0, 0, 10.0], [0, 0, -10.0]])
    assert up[1] < down[1]


def test_dicom_pa_view_shows_patient_right_on_image_left():
    P, _ = g.projection_from_dicom(dicom_dataset())
    np.testing.assert_allclose(g.source_position(P), [0.0, 800.0, 0.0], atol=1e-9)  # source posterior: PA
    left, right = g.project_points(P, [[10.0, 0, 0], [-10.0, 0, 0]])
    assert left[0] > right[0]
    P_lao, _ = g.projection_from_dicom(dicom_dataset(PositionerPrimaryAngle="90"))
    np.testing.assert_allclose(g.source_position(P_lao), [-800.0, 0.0, 0.0], atol=1e-9)  # detector at left


def test_dicom_magnification_factor_and_mapping_input():
    ds = dicom_dataset(DistanceSourceToPatient=None, EstimatedRadiographicMagnificationFactor="1.25")
    P, calibration = g.projection_from_dicom(ds)
    assert np.linalg.norm(g.source_position(P)) == pytest.approx(1100.0 / 1.25)
    assert any(tag.startswith("EstimatedRadiographicMagnificationFactor") for tag in calibration.details["tags_used"])
    mapping = {"ImagerPixelSpacing": [0.3, 0.25], "DistanceSourceToDetector": 1100.0,
               "EstimatedRadiographicMagnificationFactor": 1.25, "PositionerPrimaryAngle": 0.0,
               "PositionerSecondaryAngle": 0.0, "Rows": 40, "Columns": 56}
    P_mapping, _ = g.projection_from_dicom(mapping)
    np.testing.assert_allclose(P_mapping, P, atol=1e-15)


def test_dicom_isocentre_projection_sets_principal_point():
    ds = dicom_dataset(PositionOfIsocenterProjection=[20.0, 30.0])  # [along v, along u]
    P, calibration = g.projection_from_dicom(ds)
    np.testing.assert_allclose(g.project_points(P, [0.0, 0.0, 0.0]), [30.0, 20.0], atol=1e-9)
    assert "PositionOfIsocenterProjection (0018,9430)" in calibration.details["tags_used"]
    # 2x2 binning and a field of view starting at detector element (4, 6).
    binned = dicom_dataset(PositionOfIsocenterProjection=[44.5, 66.5], DetectorElementSpacing=[0.15, 0.125],
                           FieldOfViewOrigin=[4, 6])
    P_binned, _ = g.projection_from_dicom(binned)
    # Element 44.5 - 4 = 40.5 -> image row (40.5 - 0.5) / 2 = 20; column (60.5 - 0.5) / 2 = 30.
    np.testing.assert_allclose(g.project_points(P_binned, [0.0, 0.0, 0.0]), [30.0, 20.0], atol=1e-9)


@pytest.mark.parametrize("keyword, number", [
    ("ImagerPixelSpacing", "(0018,1164)"), ("DistanceSourceToDetector", "(0018,1110)"),
    ("PositionerPrimaryAngle", "(0018,1510)"), ("PositionerSecondaryAngle", "(0018,1511)"),
    ("Rows", "(0028,0010)"), ("Columns", "(0028,0011)"),
])
def test_missing_dicom_tag_is_named(keyword, number):
    with pytest.raises(CalibrationError) as info:
        g.projection_from_dicom(dicom_dataset(**{keyword: None}), name="LAT")
    assert keyword in str(info.value) and number in str(info.value) and "LAT" in str(info.value)


def test_missing_source_distance_names_both_tags_and_bad_values_fail():
    with pytest.raises(CalibrationError, match=r"DistanceSourceToPatient \(0018,1111\).*\(0018,1114\)"):
        g.projection_from_dicom(dicom_dataset(DistanceSourceToPatient=None))
    with pytest.raises(CalibrationError, match="sid_mm"):  # SID beyond the detector
        g.projection_from_dicom(dicom_dataset(DistanceSourceToPatient="1200"))
    with pytest.raises(CalibrationError, match=r"ImagerPixelSpacing \(0018,1164\)"):
        g.projection_from_dicom(dicom_dataset(ImagerPixelSpacing=[0.3]))


def test_calibration_source_is_validated():
    assert g.Calibration("case.json projection_matrix").to_dict() == {"source": "case.json projection_matrix"}
    with pytest.raises(GeometryError, match="guess"):
        g.Calibration("guess")


# ----------------------------------------------------------------------------- two views
def test_view_pair_check_orthogonal_oblique_and_opposite():
    iso = (4.0, -3.0, 20.0)
    ap = g.projection_matrix(make_view(isocentre_mm=iso))
    lat = g.projection_matrix(make_view(lao_deg=90.0, isocentre_mm=iso))
    report = g.view_pair_check(ap, lat)
    assert report.angle_deg == pytest.approx(90.0)
    assert report.closest_approach_mm == pytest.approx(0.0, abs=1e-9)
    np.testing.assert_allclose(report.midpoint_mm, iso, atol=1e-9)
    assert report.warnings == ()

    near = g.view_pair_check(ap, g.projection_matrix(make_view(lao_deg=10.0, isocentre_mm=iso)))
    assert near.angle_deg == pytest.approx(10.0)
    assert any("10.0 deg apart" in w for w in near.warnings)
    # 100 deg apart folds to 80; 180 deg apart is the same viewing axis.
    assert g.view_pair_check(ap, g.projection_matrix(make_view(lao_deg=100.0))).angle_deg == pytest.approx(80.0)
    assert g.view_pair_check(ap, g.projection_matrix(make_view(lao_deg=180.0))).angle_deg == pytest.approx(0.0, abs=1e-6)


def test_view_pair_check_gap_midpoint_and_sign_warning():
    ap = g.projection_matrix(make_view(isocentre_mm=(0.0, 0.0, 0.0)))
    lat = g.projection_matrix(make_view(lao_deg=90.0, isocentre_mm=(0.0, 0.0, 5.0)))
    report = g.view_pair_check(ap, lat)
    assert report.closest_approach_mm == pytest.approx(5.0)
    np.testing.assert_allclose(report.midpoint_mm, [0.0, 0.0, 2.5], atol=1e-9)
    far = g.view_pair_check(ap, g.projection_matrix(make_view(lao_deg=90.0, isocentre_mm=(0.0, 0.0, 80.0))))
    assert any("80 mm apart" in w for w in far.warnings)
    flipped = g.view_pair_check(ap, -lat)
    assert flipped.midpoint_mm == pytest.approx(report.midpoint_mm)
    assert any("behind the source of view 2" in w for w in flipped.warnings)
    fixed = g.normalise_projection(-lat, front_point_mm=flipped.midpoint_mm)
    assert g.view_pair_check(ap, fixed).warnings == ()


def test_triangulate_recovers_known_points():
    rng = np.random.default_rng(3)
    P1 = g.projection_matrix(make_view(lao_deg=-8.0, cranial_deg=4.0, isocentre_mm=(-80.0, 10.0, 5.0)))
    P2 = g.projection_matrix(make_view(lao_deg=85.0, isocentre_mm=(-70.0, 0.0, 0.0), pixel_v_mm=0.6))
    points = np.array([-80.0, 10.0, 5.0]) + rng.uniform(-40, 40, size=(6, 3))
    uv1, uv2 = g.project_points(P1, points), g.project_points(P2, points)
    np.testing.assert_allclose(g.triangulate(P1, uv1, P2, uv2), points, atol=1e-6)
    np.testing.assert_allclose(g.triangulate(P1, uv1[0], P2, uv2[0], refine=False), points[0], atol=1e-6)
    assert g.triangulate(P1, uv1[0], P2, uv2[0]).shape == (3,)

    noisy1 = uv1 + rng.normal(scale=0.5, size=uv1.shape)
    noisy2 = uv2 + rng.normal(scale=0.5, size=uv2.shape)
    _, linear_res = g.triangulate(P1, noisy1, P2, noisy2, refine=False, return_residuals_px=True)
    refined, refined_res = g.triangulate(P1, noisy1, P2, noisy2, return_residuals_px=True)
    assert refined_res.shape == (6, 2, 2)
    assert np.all(np.sum(refined_res**2, axis=(1, 2)) <= np.sum(linear_res**2, axis=(1, 2)) + 1e-12)
    assert np.max(np.linalg.norm(refined - points, axis=1)) < 1.0  # 0.5 px noise ~ 0.25 mm at this pitch


# ----------------------------------------------------------------------------- volumes
def _rotation(axis, angle_deg):
    axis = np.asarray(axis, dtype=np.float64) / np.linalg.norm(axis)
    skew = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    a = math.radians(angle_deg)
    return np.eye(3) + math.sin(a) * skew + (1 - math.cos(a)) * skew @ skew


def test_volume_geometry_matches_simpleitk():
    direction = _rotation([1.0, 2.0, -0.5], 37.0)
    geometry = g.VolumeGeometry((3, 4, 5), (0.5, 0.8, 2.0), (10.0, -20.0, 30.0), tuple(map(tuple, direction)))
    image = sitk.Image(5, 4, 3, sitk.sitkFloat32)
    image.SetSpacing((0.5, 0.8, 2.0))
    image.SetOrigin((10.0, -20.0, 30.0))
    image.SetDirection(tuple(direction.reshape(-1)))
    rng = np.random.default_rng(0)
    for index in rng.uniform(-1, 5, size=(10, 3)):
        expected = image.TransformContinuousIndexToPhysicalPoint(tuple(index))
        np.testing.assert_allclose((geometry.index_to_world() @ np.append(index, 1))[:3], expected, atol=1e-9)
        back = geometry.world_to_index() @ np.append(expected, 1.0)
        np.testing.assert_allclose(back[:3], image.TransformPhysicalPointToContinuousIndex(expected), atol=1e-9)
    assert g.VolumeGeometry.from_sitk(image) == geometry

    array = rng.normal(size=(3, 4, 5)).astype(np.float32)
    converted = geometry.to_sitk(array)
    assert converted.GetPixel(4, 1, 2) == pytest.approx(float(array[2, 1, 4]))  # (i, j, k) <-> [k, j, i]
    assert g.VolumeGeometry.from_sitk(converted) == geometry
    with pytest.raises(GeometryError, match="does not match"):
        geometry.to_sitk(np.zeros((5, 4, 3)))


def test_volume_geometry_centre_corners_extent_and_transform():
    direction = _rotation([0.0, 0.0, 1.0], 90.0)
    geometry = g.VolumeGeometry.centered((4, 6, 8), (1.0, 2.0, 3.0), (5.0, 6.0, 7.0), tuple(map(tuple, direction)))
    np.testing.assert_allclose(geometry.center_mm(), [5.0, 6.0, 7.0], atol=1e-12)
    assert geometry.extent_mm == pytest.approx((8.0, 12.0, 12.0))
    edges = geometry.corners_mm()
    centres = geometry.corners_mm(edges=False)
    assert edges.shape == centres.shape == (8, 3)
    # x index runs along world +y after the 90 deg turn, so the world y-range is the x extent.
    np.testing.assert_allclose(np.ptp(edges, axis=0), [12.0, 8.0, 12.0], atol=1e-9)
    np.testing.assert_allclose(np.ptp(centres, axis=0), [10.0, 7.0, 9.0], atol=1e-9)
    np.testing.assert_allclose(edges.mean(axis=0), [5.0, 6.0, 7.0], atol=1e-9)

    T = np.eye(4)
    T[:3, :3] = _rotation([1.0, -1.0, 0.3], -50.0)
    T[:3, 3] = [1.0, 2.0, 3.0]
    moved = geometry.transformed(T)
    np.testing.assert_allclose(moved.index_to_world(), T @ geometry.index_to_world(), atol=1e-12)
    with pytest.raises(GeometryError, match="rigid"):
        geometry.transformed(np.diag([2.0, 1.0, 1.0, 1.0]))


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("bad, message", [
    (np.full((3, 4), np.nan), "non-finite value"),
    (np.c_[np.eye(3)[:, :2], np.zeros(3), np.ones(3)], "rank-deficient"),
    (np.eye(3), "3x4"),
    ("not a matrix", "3x4 matrix"),
])
def test_bad_projection_matrix_is_rejected_with_its_name(bad, message):
    with pytest.raises(GeometryError, match=message) as info:
        g.validate_projection_matrix(bad, name="view 'AP' projection_matrix")
    assert "view 'AP' projection_matrix" in str(info.value)


def test_non_finite_entry_is_located():
    P = g.projection_matrix(make_view())
    P[1, 2] = np.inf
    with pytest.raises(GeometryError, match=r"inf at row 1, column 2"):
        g.source_position(P)


@pytest.mark.parametrize("overrides, field, value", [
    (dict(pixel_mm=-0.2), "pixel_mm", "-0.2"),
    (dict(pixel_v_mm=0.0), "pixel_v_mm", "0.0"),
    (dict(rows=0), "rows", "0"),
    (dict(cols=-3), "cols", "-3"),
    (dict(sid_mm=1000.0), "sid_mm", "1000"),
    (dict(sdd_mm=float("nan")), "sdd_mm", "nan"),
    (dict(viewed_from="patient"), "viewed_from", "patient"),
    (dict(principal_point_px=(1.0,)), "principal_point_px", "1"),
])
def test_bad_carm_view_names_field_and_value(overrides, field, value):
    with pytest.raises(GeometryError) as info:
        make_view(**overrides)
    assert field in str(info.value) and value in str(info.value)


@pytest.mark.parametrize("kwargs, field", [
    (dict(shape_zyx=(4, 4), spacing_xyz_mm=(1, 1, 1)), "shape_zyx"),
    (dict(shape_zyx=(4, 0, 4), spacing_xyz_mm=(1, 1, 1)), "shape_zyx"),
    (dict(shape_zyx=(4, 4, 4), spacing_xyz_mm=(1, -1, 1)), "spacing_xyz_mm"),
    (dict(shape_zyx=(4, 4, 4), spacing_xyz_mm=(1, 1, 1), direction=((1, 0, 0), (0, 2, 0), (0, 0, 1))), "direction"),
])
def test_bad_volume_geometry_names_field(kwargs, field):
    with pytest.raises(GeometryError, match=field):
        g.VolumeGeometry(**kwargs)


def test_bad_image_edit_arguments():
    P = g.projection_matrix(make_view())
    with pytest.raises(GeometryError, match="scale_u"):
        g.crop_resize(P, 0, 0, 0.0)
    with pytest.raises(GeometryError, match="cols"):
        g.flip_horizontal(P, 0)
    with pytest.raises(GeometryError, match="out_shape"):
        g.resize_to(P, (32, 48), (0, 10))
