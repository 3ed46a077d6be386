"""End-to-end tests of inference.pipeline.register_case with an untrained compact model.

Known answers come from simulated cases (inference.data.simulate, truth kept apart from the case): the
untrained network leaves the atlas where the pipeline put it, on the femoral head located from the
masks, so the hip centre must still come out near the true one and the outputs must line up with
the truth's world frame (by physical coordinates) for a right and a left femur.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from inference import geometry, head_anchor, io, mask_proposal, outline_fit, pipeline, registration, shaft_fit
from inference import silhouettes
from inference import mesh as mesh_lib
from inference.checksums import sha256_file
from inference.errors import Cancelled, HipAtlasError

import register_helpers as rh

OUTPUT_FILES = {"femur_labels.nii.gz", "warped_atlas.nii.gz", "femur_surface.stl", "measurements.json",
                "overlay_AP.png", "overlay_LAT.png", "silhouette_AP.json", "silhouette_LAT.json", "report.json"}
MEASUREMENT_KEYS = {"side", "hip_centre_mm", "head_radius_mm", "femoral_offset_mm", "neck_shaft_angle_deg",
                    "vertical_offset_mm", "shaft_axis", "neck_axis"}


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return rh.saved_model(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def right_run(tmp_path_factory, model_path):
    sim = rh.simulated_case(tmp_path_factory.getbasetemp(), "right")
    out = tmp_path_factory.mktemp("run") / "right_out"
    progress = []
    result = pipeline.run_to_completion(pipeline.register_case(sim.case_dir, out, model=model_path),
                                        on_progress=progress.append)
    return sim, out, result, progress


@pytest.fixture(scope="module")
def left_run(tmp_path_factory, model_path):
    sim = rh.simulated_case(tmp_path_factory.getbasetemp(), "left")
    out = tmp_path_factory.mktemp("run") / "left_out"
    result = pipeline.run_to_completion(pipeline.register_case(sim.case_dir, out, model=model_path))
    return sim, out, result


def _truth_on_output_grid(sim, out):
    """Truth labels resampled by physical coordinates onto the output label grid (nearest)."""
    reference = sitk.ReadImage(str(out / "femur_labels.nii.gz"))
    truth = sitk.ReadImage(str(sim.truth_dir / "labels.nii.gz"))
    resampled = sitk.Resample(truth, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, truth.GetPixelID())
    return sitk.GetArrayFromImage(resampled) == 1, sitk.GetArrayFromImage(reference) == 1


def _distances_px(points_uv, line_uv):
    """Distance of each point to the nearest vertex of a polyline (pixels)."""
    points_uv, line_uv = np.asarray(points_uv, float), np.asarray(line_uv, float)
    return np.min(np.hypot(points_uv[:, None, 0] - line_uv[None, :, 0], points_uv[:, None, 1] - line_uv[None, :, 1]),
                  axis=1)


def _check_outputs(sim, out, result):
    assert {p.name for p in out.iterdir()} == OUTPUT_FILES
    assert not [p for p in out.parent.iterdir() if ".partial" in p.name]
    truth_hip = sim.hip_centre_mm

    # NIfTI geometry: the true head centre lies inside the output grid and the femur label is there
    labels, grid = io.read_volume(out / "femur_labels.nii.gz")
    hu, hu_grid = io.read_volume(out / "warped_atlas.nii.gz")
    assert labels.dtype == np.uint8 and set(np.unique(labels)) <= {0, 1, 2} and (labels == 1).any()
    assert hu.dtype == np.float32 and hu.shape == labels.shape
    np.testing.assert_allclose(hu_grid.index_to_world(), grid.index_to_world(), atol=1e-4)
    assert np.linalg.det(np.asarray(grid.direction)) > 0
    ijk = grid.world_to_index() @ np.append(truth_hip, 1.0)
    assert np.all(ijk[:3] >= 0) and np.all(ijk[:3] <= np.array(grid.shape_zyx[::-1]) - 1)
    kk, jj, ii = np.nonzero(labels == 1)
    femur_mm = (grid.index_to_world() @ np.stack([ii, jj, kk, np.ones_like(ii)]))[:3].T
    assert np.min(np.linalg.norm(femur_mm - truth_hip, axis=1)) < 2.0  # the head is labelled there
    # the truth's femur and ours overlap when the truth is resampled by physical coordinates:
    # around the head, where the untrained model leaves the atlas head on the located one (the
    # rest differs with the femurs' shapes); the same output mirrored in its grid does not
    truth_femur, ours = _truth_on_output_grid(sim, out)
    kk, jj, ii = np.indices(ours.shape)
    world = np.tensordot(grid.index_to_world()[:3, :3], np.stack([ii, jj, kk]), axes=1)
    world += grid.index_to_world()[:3, 3, None, None, None]
    ball = np.linalg.norm(world - truth_hip[:, None, None, None], axis=0) < 25.0
    assert _dice(truth_femur & ball, ours & ball) > 0.7
    assert _dice(truth_femur & ball, ours[:, :, ::-1] & ball) < 0.65
    # bone is bright in the warped atlas where the femur label is
    assert hu[labels == 1].mean() > hu[labels == 0].mean() + 200

    # surface: closed, in world mm around the labelled femur
    surface = mesh_lib.read_stl(out / "femur_surface.stl")
    assert surface.is_closed and surface.n_faces > 100
    low, high = surface.bounds_mm()
    assert np.all(low <= femur_mm.min(0) + 2.0) and np.all(high >= femur_mm.max(0) - 2.0)

    measurements = json.loads((out / "measurements.json").read_text())
    assert set(measurements) >= MEASUREMENT_KEYS
    # one measurement path: the stored landmarks give the stored values again, bit for bit
    from inference import measure

    assert measure.recompute_measurements(measurements) == measurements
    assert set(measurements["uncertainty"]) == {m.key for m in measure.MEASUREMENTS}
    assert measurements["side"] == sim.truth["side"]
    # untrained: the atlas sits on the head located from the masks, within ~10 mm of the truth
    assert np.linalg.norm(np.asarray(measurements["hip_centre_mm"]) - truth_hip) < 10.0
    assert 10.0 < measurements["head_radius_mm"] < 35.0
    # the head is medial of the shaft axis: towards the midline, +x for a right femur (patient
    # right = -x in LPS) and -x for a left one; a missed mirror flips this
    point = np.asarray(measurements["shaft_axis"]["point_mm"])
    direction = np.asarray(measurements["shaft_axis"]["direction"])
    hip = np.asarray(measurements["hip_centre_mm"])
    foot = point + np.dot(hip - point, direction) * direction
    medial_x = 1.0 if sim.truth["side"] == "right" else -1.0
    assert (hip[0] - foot[0]) * medial_x > 20.0
    assert result.measurements == measurements

    case = io.load_case(sim.case_dir)
    frame = registration.RegistrationFrame.of_case(case)
    world_projections = {view.name: P for view, P in zip(case.views, frame.world_projections)}
    for view in case.views:
        with Image.open(out / f"overlay_{view.name}.png") as overlay:
            assert overlay.mode == "RGB" and overlay.size == (view.image.shape[1], view.image.shape[0])
            rgb = np.asarray(overlay)
        # the outline travels as data: closed (u, v) polylines inside the image, around the
        # projected label volume; the overlay's coloured pixels are those polylines
        outline = silhouettes.read_silhouette(out / f"silhouette_{view.name}.json")
        assert outline.view == view.name and outline.image_shape == tuple(view.image.shape)
        longest = outline.polylines[0]
        assert len(longest) > 20 and np.array_equal(longest[0], longest[-1])
        rows, cols = view.image.shape
        assert np.all((longest >= 0) & (longest <= [cols - 1, rows - 1]))
        projected = silhouettes.project_silhouette(labels, grid, world_projections[view.name], view.image.shape)
        assert _distances_px(projected.polylines[0], longest).max() < 0.05  # (NIfTI stores float32 geometry)
        contour = np.all(rgb == silhouettes.CONTOUR_RGB, axis=-1)
        assert contour.sum() > 20
        vv, uu = np.nonzero(contour)
        assert _distances_px(np.stack([uu, vv], axis=1), np.concatenate(outline.polylines)).max() < 1.5

    report = json.loads((out / "report.json").read_text())
    assert report["software"]["version"] and report["model"]["name"] == "compact_untrained"
    assert len(report["model"]["sha256"]) == 64
    assert report["case_json_sha256"] == sha256_file(sim.case_dir / "case.json")
    for entry, view in zip(report["views"], case.views):
        assert entry["image_sha256"] == sha256_file(view.image_path)
        assert entry["mask_sha256"] == sha256_file(view.mask_path)
        assert entry["mask_source"] == "case" and entry["mask_confirmed"] is True
        assert entry["calibration"]["source"] == "case.json projection_matrix"
    assert set(report["timings_s"]) >= {"load_model_s", "network_s", "overlay_s", "total_s"}
    assert isinstance(report["warnings"], list) and report["warnings"] == result.warnings
    assert report["shaft_axis_source"] in ("masks", "reconstruction")
    assert report["hip_centre_source"] in ("masks", "reconstruction")
    # the lesser trochanter's height from the masks' outlines (issue 13), with its uncertainty
    assert report["lesser_trochanter_source"] in ("masks", "reconstruction")
    # the shaft fitted to the masks (inference.shaft_fit): what it did, or why it did not
    fit = report["shaft_fit"]
    assert fit["used"] in (True, False) and "shaft_fit_s" in report["timings_s"]
    assert fit["heights"] >= 15 and set(fit["mean_width_factor"]) == {"AP", "LAT"} if fit["used"] else fit["reason"]
    # the head moved onto the masks' head (inference.head_anchor): how far, or why not
    anchor = report["head_anchor"]
    assert 0 < anchor["distance_mm"] <= head_anchor.MAX_SHIFT_MM if anchor["used"] else anchor["reason"]
    # the outlines fitted to the masks (inference.outline_fit): how far it moved them, or why not
    outline = report["outline_fit"]
    assert "outline_fit_s" in report["timings_s"]
    assert (0 <= outline["max_move_mm"] <= outline_fit.MAX_MOVE_MM
            and set(outline["mask_agreement_before"]) == {"AP", "LAT"} if outline["used"] else outline["reason"])
    if outline["used"]:  # the head anchor runs only where the outline fit made no fit
        assert anchor == {"used": False, "reason": pipeline.OUTLINE_FIT_ANCHORED}
    if fit["used"]:  # the shaft below the radiographs, continued straight
        assert fit["continued_below_mm"] >= 0 and 0 <= fit["max_continued_shift_mm"] <= shaft_fit.MAX_STRAIGHTENING_MM
    assert measurements["landmark_uncertainty_mm"]["lesser_trochanter"] == (
        pipeline.LT_FROM_MASKS_SD_MM if report["lesser_trochanter_source"] == "masks"
        else pipeline.LT_FROM_RECONSTRUCTION_SD_MM)
    # what a view's recorded angle off by a degree would move (inference.angle_sensitivity)
    sensitivity = report["angle_sensitivity"]
    for view in case.views:
        row = sensitivity[view.name]
        assert 0 <= row["hip_centre_mm_per_deg"] <= row["femur_max_mm_per_deg"] < 5.0
        assert 0 < row["femur_mean_mm_per_deg"] <= row["femur_max_mm_per_deg"]
    return measurements, report


def test_right_case_writes_every_output_in_the_world_frame(right_run):
    sim, out, result, progress = right_run
    _check_outputs(sim, out, result)
    fractions = [p.fraction for p in progress]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and len(fractions) >= 6


def test_left_case_is_mirrored_back(left_run):
    sim, out, result = left_run
    measurements, report = _check_outputs(sim, out, result)
    # a left hip lies at +x (LPS); so do the located head and the measured hip centre
    assert sim.hip_centre_mm[0] > 0
    assert measurements["hip_centre_mm"][0] > 0 and report["femoral_head_located_mm"][0] > 0
    np.testing.assert_allclose(report["femoral_head_located_mm"], sim.hip_centre_mm, atol=3.0)
    # landmarks come back mirrored too: the head landmark is near the measured hip centre
    np.testing.assert_allclose(result.landmarks_mm["head_centre"], measurements["hip_centre_mm"], atol=8.0)


def test_side_by_side_steps_give_what_one_thread_gives(tmp_path, left_run, model_path, monkeypatch):
    """The views' projections, the overlays drawn beside the measuring and the files written side
    by side (inference.workers) leave every output as one thread makes it, warnings in order."""
    from inference import workers

    sim, out, result = left_run
    monkeypatch.setenv(workers.THREADS_ENV, "1")
    alone = pipeline.run_to_completion(pipeline.register_case(sim.case_dir, tmp_path / "one", model=model_path))
    assert list(alone.files) == list(result.files)
    for key, path in result.files.items():
        other = alone.files[key]
        if path.name == "report.json":
            mine, theirs = (json.loads(p.read_text()) for p in (path, other))
            for report in (mine, theirs):
                for volatile in ("timings_s", "created", "case_dir"):
                    report.pop(volatile)
            assert mine == theirs
        elif path.suffix == ".gz":
            np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(path))),
                                          sitk.GetArrayFromImage(sitk.ReadImage(str(other))))
        else:
            assert path.read_bytes() == other.read_bytes(), path.name
    assert alone.warnings == result.warnings


def test_cancel_stops_without_output(tmp_path, tmp_path_factory, model_path):
    sim = rh.simulated_case(tmp_path_factory.getbasetemp(), "right")
    calls = []

    def cancel():
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(Cancelled):
        pipeline.run_to_completion(pipeline.register_case(sim.case_dir, tmp_path / "out", model=model_path,
                                                          cancel=cancel))
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


def test_existing_output_is_refused_before_work_and_kept(tmp_path, tmp_path_factory, model_path):
    sim = rh.simulated_case(tmp_path_factory.getbasetemp(), "right")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("previous result")
    from inference.errors import OutputError

    with pytest.raises(OutputError, match="not empty"):
        pipeline.run_to_completion(pipeline.register_case(sim.case_dir, out, model=model_path))
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_project_label_matches_ray_marching():
    """The numpy splat silhouette (overlays, proposals) agrees with drr.render_path_length."""
    from inference import drr

    grid = geometry.VolumeGeometry.centered((40, 30, 36), (2.0, 2.0, 2.5), (10.0, -20.0, 30.0))
    kk, jj, ii = np.mgrid[:40, :30, :36]
    centre = np.array([18.0, 15.0, 20.0])
    labels = (((ii - centre[0]) / 12) ** 2 + ((jj - centre[1]) / 9) ** 2 + ((kk - centre[2]) / 16) ** 2 <= 1)
    labels = labels.astype(np.uint8)
    for lao in (0.0, 60.0):
        projection = geometry.projection_matrix(geometry.CArmView(
            sdd_mm=1000.0, sid_mm=900.0, lao_deg=lao, cranial_deg=0.0, rows=150, cols=120, pixel_mm=0.8,
            isocentre_mm=(12.0, -18.0, 35.0)))
        marched = drr.render_path_length(labels, grid, projection, 150, 120) > 0.5
        splat = mask_proposal.project_label(labels, grid, projection, (150, 120))
        dice = 2 * (marched & (splat > 0.5)).sum() / (marched.sum() + (splat > 0.5).sum())
        assert dice > 0.95, dice
        # thickness agrees in the interior (the chord through an ellipsoid)
        interior = ndimage_erode(marched, 6)
        np.testing.assert_allclose(np.median(splat[interior] / drr.render_path_length(
            labels, grid, projection, 150, 120)[interior]), 1.0, atol=0.1)


def ndimage_erode(mask, iterations):
    from scipy import ndimage

    return ndimage.binary_erosion(mask, iterations=iterations)


def _without_masks(sim, dest):
    def drop(raw):
        for view in raw["views"]:
            view.pop("mask", None)

    copy = rh.copy_case(sim.case_dir, dest, drop)
    for view in json.loads((sim.case_dir / "case.json").read_text())["views"]:
        (copy / view["mask"]).unlink()
    return copy


def _dice(a, b):
    return 2 * (a & b).sum() / (a.sum() + b.sum())


def test_views_without_masks_get_proposed_unconfirmed_masks(tmp_path, tmp_path_factory, model_path):
    sim = rh.simulated_case(tmp_path_factory.getbasetemp(), "left")
    case_dir = _without_masks(sim, tmp_path / "case")
    out = tmp_path / "out"
    result = pipeline.run_to_completion(pipeline.register_case(case_dir, out, model=model_path))
    report = json.loads((out / "report.json").read_text())
    truth_case = io.load_case(sim.case_dir)
    for entry, view in zip(report["views"], truth_case.views):
        assert entry["mask_source"] == "proposed" and entry["mask_confirmed"] is False
        proposed = io.load_mask(out / entry["mask"], expected_shape=view.image.shape)
        assert entry["mask"] == f"proposed_mask_{view.name}.png"
        # the proposal covers the atlas field of view of the femur: compare where the truth mask
        # is not below the proposal's lowest row (the true mask runs down the whole shaft)
        rows = np.nonzero(proposed.any(axis=1))[0]
        window = np.zeros_like(proposed)
        window[: rows.max() + 1] = True
        assert _dice(proposed, view.mask & window) > 0.6  # 0.72 / 0.92 measured (AP / LAT)
    assert sum("proposed automatically" in w for w in result.warnings) == 2
    assert np.linalg.norm(np.asarray(result.measurements["hip_centre_mm"]) - sim.hip_centre_mm) < 25.0
    assert "mask_proposal" in report and report["timings_s"]["mask_proposal_s"] > 0
    assert report["shaft_fit"] == {"used": False, "reason": "needs a confirmed mask in every view"}
    assert report["head_anchor"] == {"used": False, "reason": "needs a confirmed mask in every view"}
    assert report["outline_fit"] == {"used": False, "reason": "needs a confirmed mask in every view"}


@pytest.mark.parametrize("side", ["right", "left"])
def test_propose_masks_api_for_the_gui(tmp_path_factory, model_path, side):
    """The masks come in the case's pixels: for a left hip the proposal, made on the registration
    frame's flipped images, is flipped back (before issue 16 the GUI got it mirrored)."""
    sim = rh.simulated_case(tmp_path_factory.getbasetemp(), side)
    case = io.load_case(sim.case_dir)
    masks = mask_proposal.propose_masks(case, model_path)
    assert len(masks) == 2
    for mask, view in zip(masks, case.views):
        assert mask.dtype == bool and mask.shape == view.image.shape and mask.any()
        # one connected region without holes, on the true femur (the untrained model leaves the
        # atlas's proportions: Dice 0.72 / 0.92 measured for AP / LAT in the covered rows)
        from scipy import ndimage

        assert ndimage.label(mask)[1] == 1 and not (ndimage.binary_fill_holes(mask) & ~mask).any()
        rows = np.nonzero(mask.any(axis=1))[0]
        window = np.zeros_like(mask)
        window[: rows.max() + 1] = True
        assert _dice(mask, view.mask & window) > 0.6


class _RecordingNet:
    """A registration model that remembers its inputs."""

    def __init__(self, net):
        self.net, self.inputs = net, []

    def get_layer(self, name):
        return self.net.get_layer(name)

    def __call__(self, inputs, training=False):
        self.inputs.append(inputs)
        return self.net(inputs, training=training)


def test_proposal_network_sees_the_refined_outline_as_registration_would(tmp_path_factory, model_path):
    """Step 2b feeds the network the refined outline of the posed atlas as the femur masks (a
    trained network shown the whole radiograph around the grid distorts the femur)."""
    from inference import views

    sim = rh.simulated_case(tmp_path_factory.getbasetemp(), "right")
    case = io.load_case(sim.case_dir)
    net = registration.load_registration_model(model_path)
    atlas = registration.atlas_for(net)
    frame = registration.RegistrationFrame.of_case(case)
    images, projections, start = frame.images_in(case), frame.projections, frame.start_mm
    outline = mask_proposal.propose(images, projections, net, atlas, start, network_step=False)
    recording = _RecordingNet(net)
    proposal = mask_proposal.propose(images, projections, recording, atlas, start)
    assert len(recording.inputs) == 1 and "network_s" in proposal.timings_s
    grid = outline.pose.grid(atlas.geometry, atlas.landmarks["head_centre"])
    detector_hw = recording.inputs[0]["masks"].shape[2:]
    for index, (image, projection, mask) in enumerate(zip(images, projections, outline.masks)):
        net_view = views.network_view(projection, grid, detector_hw, np.asarray(image).shape)
        expected = views.resample_mask_to_network(mask, net_view, outside=views.NETWORK_OUTSIDE)
        np.testing.assert_array_equal(recording.inputs[0]["masks"][0, index], expected)
        assert 0.05 < expected.mean() < 0.6  # a femur, not the grid's whole footprint


def test_gui_masks_replace_the_case_masks(tmp_path, tmp_path_factory, model_path):
    sim = rh.simulated_case(tmp_path_factory.getbasetemp(), "right")
    case = io.load_case(sim.case_dir)
    with pytest.raises(Exception, match="mask for view 'AP' is 3x3"):
        pipeline.run_to_completion(pipeline.register_case(sim.case_dir, tmp_path / "o", model=model_path,
                                                          masks=[np.ones((3, 3), bool), None]))
    with pytest.raises(HipAtlasError, match="mask of view 'AP' is empty"):
        pipeline.run_to_completion(pipeline.register_case(
            sim.case_dir, tmp_path / "o", model=model_path,
            masks=[np.zeros(case.views[0].image.shape, bool), None]))
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------ mask proposal parts

def _two_views(isocentre, rows=160, cols=160, pixel_mm=1.6):
    return [geometry.projection_matrix(geometry.CArmView(
        sdd_mm=1000.0, sid_mm=925.0, lao_deg=lao, cranial_deg=0.0, rows=rows, cols=cols, pixel_mm=pixel_mm,
        isocentre_mm=tuple(isocentre))) for lao in (0.0, 90.0)]


def test_locate_atlas_finds_a_known_pose():
    """Radiographs of the atlas femur itself at a known pose, on a soft-tissue ramp with noise and
    a strong straight edge (a collimator): the coarse search finds the head within 3 mm."""
    from inference.data import atlas as atlas_lib

    atlas = atlas_lib.load_atlas("compact")
    isocentre = np.array([-90.0, 5.0, 20.0])
    projections = _two_views(isocentre)
    angle = np.radians(6.0)
    rotation = np.array([[np.cos(angle), 0, np.sin(angle)], [0, 1, 0], [-np.sin(angle), 0, np.cos(angle)]])
    true_pose = mask_proposal.AtlasPose(isocentre + [14.0, -9.0, 17.0], rotation, 1.0)
    grid = true_pose.grid(atlas.geometry, atlas.landmarks["head_centre"])
    femur = (atlas.labels == 1).astype(np.uint8)
    rng = np.random.default_rng(7)
    images = []
    for projection in projections:
        thickness = mask_proposal.project_label(femur, grid, projection, (160, 160))
        vv, uu = np.mgrid[:160, :160]
        image = 0.02 * thickness + 0.3 + 0.002 * uu + rng.normal(0.0, 0.01, (160, 160))
        image[:, :12] = 0.0  # collimator shadow: one long, strong edge
        images.append(image.astype(np.float32))
    pose = mask_proposal.locate_atlas(images, projections, atlas, isocentre)
    assert np.linalg.norm(pose.head_mm - true_pose.head_mm) < 3.0, pose.head_mm - true_pose.head_mm
    assert pose.scale == 1.0


def test_refine_mask_moves_the_outline_onto_the_edges():
    rows, cols = 120, 100
    vv, uu = np.mgrid[:rows, :cols]
    truth = ((uu - 50) / 18.0) ** 2 + ((vv - 60) / 40.0) ** 2 <= 1.0
    image = (0.5 * truth + 0.002 * vv + np.random.default_rng(3).normal(0, 0.02, (rows, cols))).astype(np.float32)
    prior = ((uu - 53) / 24.0) ** 2 + ((vv - 62) / 45.0) ** 2 <= 1.0  # too big and off-centre
    refined = mask_proposal.refine_mask(image, prior, mm_per_pixel=1.0)
    assert _dice(refined, truth) > max(0.9, _dice(prior, truth) + 0.05)
    # the band keeps a hopeless prior from running away: a prior far from any edge barely moves
    flat = np.full((rows, cols), 0.3, np.float32)
    kept = mask_proposal.refine_mask(flat, prior, mm_per_pixel=1.0, band_mm=3.0)
    assert _dice(kept, prior) > 0.8


@pytest.mark.slow
def test_eval_cases_tool_smoke(tmp_path):
    """tools/eval_cases.py end to end on one coarse case with an untrained model (about a minute)."""
    import pathlib
    import subprocess
    import sys

    tool = pathlib.Path(__file__).resolve().parents[1] / "tools" / "eval_cases.py"
    completed = subprocess.run([sys.executable, str(tool), "--untrained", "--cases", "1", "--ct-spacing", "4",
                                "--no-masks", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-2000:]
    result = json.loads((tmp_path / "eval_cases.json").read_text())
    row = result["rows"][0]
    assert 0.0 < row["dice"] <= 1.0 and row["hip_centre_error_mm"] < 40.0 and 0.0 < row["proposed_mask_dice"] <= 1.0
    assert "## Summary" in (tmp_path / "eval_cases.md").read_text()


def test_mask_agreement_is_dice_inside_the_projection_box():
    from inference.pipeline import mask_agreement

    silhouette = np.zeros((20, 20), bool)
    silhouette[2:10, 5:15] = True  # 80 px
    mask = np.zeros((20, 20), bool)
    mask[2:20, 5:10] = True  # 90 px, of which 40 inside the silhouette's box
    assert mask_agreement(silhouette, mask) == 2 * 40 / (80 + 40)
    assert mask_agreement(silhouette, silhouette) == 1.0
    assert mask_agreement(silhouette, None) is None


def test_graph_mode_network_matches_eager(tmp_path, tmp_path_factory, model_path):
    """The traced forward pass used for cohorts gives the eager pass's result."""
    sim = rh.simulated_case(tmp_path_factory.getbasetemp(), "right")
    net = registration.load_registration_model(model_path)
    eager = pipeline.run_to_completion(pipeline.register_case(sim.case_dir, tmp_path / "eager", model=net))
    graph = pipeline.run_to_completion(pipeline.register_case(sim.case_dir, tmp_path / "graph", model=net,
                                                              graph_mode=True))
    assert registration.network_function(net, graph=True) is registration.network_function(net, graph=True)
    labels = [sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / name / "femur_labels.nii.gz")))
              for name in ("eager", "graph")]
    assert (labels[0] != labels[1]).mean() < 1e-3
    np.testing.assert_allclose(eager.measurements["hip_centre_mm"], graph.measurements["hip_centre_mm"], atol=0.2)

