"""Tests of inference.data.simulate (``hipatlas simulate``): cases from a CT and from a phantom."""

from __future__ import annotations

import json

import numpy as np
from synthetic_shapes import simple_femur_sdf
import pytest
from PIL import Image

from inference import geometry as g
from inference import io as hio
from inference.data import simulate as sim
from inference.data import phantom as ph
from inference.errors import CaseFormatError, DataError

HEAD_WORLD = np.array([-95.0, 20.0, 800.0])


def _femur_sdf(p):
    return simple_femur_sdf(p, 22.0)


@pytest.fixture(scope="module")
def ct_files(tmp_path_factory):
    """A right femur (head at HEAD_WORLD) in soft tissue, on an oblique 2.5 mm grid, as NIfTI."""
    root = tmp_path_factory.mktemp("sim")
    direction = np.array([[np.cos(0.2), -np.sin(0.2), 0], [np.sin(0.2), np.cos(0.2), 0], [0, 0, 1.0]])
    geometry = g.VolumeGeometry.centered((60, 40, 48), (2.5, 2.5, 3.0), HEAD_WORLD + [-25, 0, -60],
                                         tuple(map(tuple, direction)))
    kk, jj, ii = np.meshgrid(*[np.arange(n) for n in geometry.shape_zyx], indexing="ij")
    ijk = np.stack([ii.ravel(), jj.ravel(), kk.ravel()]).astype(float)
    world = geometry.index_to_world()[:3, :3] @ ijk + geometry.index_to_world()[:3, 3:4]
    sdf = _femur_sdf(world - HEAD_WORLD[:, None]).reshape(geometry.shape_zyx)
    hu = np.where(sdf < 0, 1000.0, 40.0).astype(np.float32)
    hio.write_volume(root / "ct.nii.gz", hu, geometry, dtype=np.float32)
    hio.write_volume(root / "labels.nii.gz", (sdf < 0).astype(np.uint8), geometry, dtype=np.uint8)
    return root


def _geometry_file(path, isocentre, **kwargs):
    kwargs.setdefault("rows", 40)
    kwargs.setdefault("cols", 48)
    kwargs.setdefault("pixel_mm", 5.0)
    return sim.write_geometry_file(path, sim.standard_geometry(isocentre, "right", **kwargs))


def test_simulated_case_reads_back_with_identical_matrices(tmp_path, ct_files):
    geometry_path = _geometry_file(tmp_path / "geom.json", HEAD_WORLD + [10.0, -5.0, -20.0])
    given = json.loads(geometry_path.read_text())
    progress = []
    case_dir = sim.simulate_case(ct_files / "ct.nii.gz", geometry_path, tmp_path / "case",
                                 labels=ct_files / "labels.nii.gz", progress=lambda f, m: progress.append(f))
    case = hio.load_case(case_dir)
    assert case.side == "right" and [v.name for v in case.views] == ["AP", "LAT"]
    for view, spec in zip(case.views, given["views"]):
        np.testing.assert_array_equal(view.P, np.asarray(spec["projection_matrix"]))  # bit for bit
        assert view.image.shape == (40, 48) and view.mask is not None
        u, v = np.round(g.project_points(view.P, HEAD_WORLD[None])[0]).astype(int)
        assert view.mask[v, u]  # the head centre lies on the femur mask
        # bone is brighter (more attenuation) than soft tissue beside it
        assert view.image.pixels[view.mask].mean() > view.image.pixels[~view.mask].mean()
    with Image.open(case_dir / json.loads((case_dir / "case.json").read_text())["views"][0]["image"]) as png:
        assert png.mode.startswith("I;16") or png.mode == "I"
    assert progress[-1] == 1.0
    assert sorted(p.name for p in case_dir.iterdir()) == ["ap.png", "ap_mask.png", "case.json", "lat.png",
                                                          "lat_mask.png"]


def test_nifti_images_and_no_labels(tmp_path, ct_files):
    geometry_path = _geometry_file(tmp_path / "geom.json", HEAD_WORLD)
    case_dir = sim.simulate_case(ct_files / "ct.nii.gz", geometry_path, tmp_path / "case", image_format="nifti")
    case = hio.load_case(case_dir)
    assert all(v.mask is None and v.image.source_format == "nifti" for v in case.views)
    # without realism the NIfTI holds the DRR line integrals themselves: all >= 0, bone > 0
    assert min(float(v.image.pixels.min()) for v in case.views) >= 0.0
    assert max(float(v.image.pixels.max()) for v in case.views) > 1.0


def test_bad_geometry_or_femur_out_of_view_writes_nothing(tmp_path, ct_files):
    geometry = sim.standard_geometry(HEAD_WORLD, "right", rows=40, cols=48, pixel_mm=5.0)
    del geometry["views"][1]["projection_matrix"]
    sim.write_geometry_file(tmp_path / "nomatrix.json", geometry)
    with pytest.raises(CaseFormatError, match="no projection_matrix"):
        sim.simulate_case(ct_files / "ct.nii.gz", tmp_path / "nomatrix.json", tmp_path / "out")
    geometry = sim.standard_geometry(HEAD_WORLD, "right", rows=40, cols=48, pixel_mm=5.0)
    del geometry["views"][0]["rows"]
    sim.write_geometry_file(tmp_path / "norows.json", geometry)
    with pytest.raises(CaseFormatError, match="rows"):
        sim.simulate_case(ct_files / "ct.nii.gz", tmp_path / "norows.json", tmp_path / "out")
    # views centred 400 mm away from the femur: it projects off the detector
    far = _geometry_file(tmp_path / "far.json", HEAD_WORLD + [0.0, 0.0, 400.0])
    with pytest.raises(DataError, match="not in view"):
        sim.simulate_case(ct_files / "ct.nii.gz", far, tmp_path / "out", labels=ct_files / "labels.nii.gz")
    with pytest.raises(DataError, match="centre"):
        sim.simulate_case(ct_files / "ct.nii.gz", far, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def _ball_model():
    def field(fn, low, high, spacing):
        low = np.asarray(low, float)
        n = ((np.asarray(high, float) - low) / spacing).astype(int) + 1
        ii, jj, kk = np.meshgrid(*[np.arange(c) for c in n], indexing="ij")
        p = np.stack([ii, jj, kk]).reshape(3, -1) * spacing + low[:, None]
        return ph.ScalarField(fn(p).reshape(n).transpose(2, 1, 0), low, spacing)

    femur = field(_femur_sdf, [-90, -50, -200], [40, 50, 45], 3.0)
    marks = {"head_centre": np.zeros(3), "lesser_trochanter": np.array([-30.0, -10, -55]),
             "greater_trochanter": np.array([-55.0, 0, 8]), "shaft_point_distal": np.array([-42.0, 0, -150]),
             "shaft_point_proximal": np.array([-42.0, 0, -60]), "neck_point": np.array([-20.0, 0, -15])}
    return ph.SubjectModel("synthetic:right", femur, None, ph._body_distance(femur), None, marks, 22.0)


@pytest.mark.parametrize("side", ["right", "left"])
def test_phantom_case_and_separate_truth(tmp_path, side, monkeypatch):
    # sample_phantom_params without shape augmentation (the analytic model has no shape landmarks)
    original = ph.sample_phantom_params
    monkeypatch.setattr(ph, "sample_phantom_params", lambda rng, **k: original(rng, shape=False))
    grid = g.VolumeGeometry.centered((40, 30, 34), (4.0, 4.0, 5.0), ph.POSE_PIVOT_MM)
    geometry_path = None
    case_dir = sim.simulate_phantom_case("synthetic:right", 5, tmp_path / "case", side=side,
                                         truth_out=tmp_path / "truth", model=_ball_model(), ct_grid=grid,
                                         geometry_file=geometry_path, detector=(64, 64, 4.0))
    truth = json.loads((tmp_path / "truth" / "truth.json").read_text())
    assert truth["side"] == side and truth["landmark_names"][0] == "head_centre"
    hip = np.asarray(truth["hip_centre_mm"])
    assert (hip[0] > 0) == (side == "left")  # LPS: the left hip is at +x
    ct, ct_geometry = hio.read_volume(tmp_path / "truth" / "ct.nii.gz")
    labels, _ = hio.read_volume(tmp_path / "truth" / "labels.nii.gz")
    assert np.linalg.det(np.asarray(ct_geometry.direction)) > 0 and labels.max() == 1
    # the true femur rebuilt from truth.json is the label map on its own grid, and on a finer grid
    # the same surface (the phantom's, not the label map's staircase)
    np.testing.assert_array_equal(sim.true_femur_mask(tmp_path / "truth", ct_geometry, model=_ball_model()), labels == 1)
    fine = g.VolumeGeometry(tuple(2 * n - 1 for n in labels.shape), tuple(s / 2 for s in ct_geometry.spacing_xyz_mm),
                            ct_geometry.origin_mm, ct_geometry.direction)
    fine_mask = sim.true_femur_mask(tmp_path / "truth", fine, model=_ball_model())
    np.testing.assert_array_equal(fine_mask[::2, ::2, ::2], labels == 1)
    assert fine_mask[1::2, 1::2, 1::2].sum() > 0
    # ... and at any points: the voxel centres give the mask, the hip centre is inside
    k_, j_, i_ = np.indices(labels.shape).reshape(3, -1)
    centres = (np.stack([i_, j_, k_], 1) @ np.asarray(ct_geometry.index_to_world())[:3, :3].T
               + np.asarray(ct_geometry.index_to_world())[:3, 3])
    inside = sim.true_femur_inside(tmp_path / "truth", centres, ct_geometry, model=_ball_model())
    np.testing.assert_array_equal(inside.reshape(labels.shape), labels == 1)
    assert sim.true_femur_inside(tmp_path / "truth", hip[None], fine, model=_ball_model()).tolist() == [True]
    # the truth CT's femur label contains the hip centre (world positions agree with the case)
    i, j, k = np.round(ct_geometry.world_to_index()[:3] @ np.append(hip, 1.0)).astype(int)
    assert labels[k, j, i] == 1
    case = hio.load_case(case_dir)
    assert case.side == side
    for view in case.views:
        u, v = np.round(g.project_points(view.P, hip[None])[0]).astype(int)
        assert view.mask[v, u]
    assert sorted(p.suffix for p in case_dir.iterdir()) == [".json", ".png", ".png", ".png", ".png"]


def test_geometry_command_line(tmp_path, ct_files):
    from inference import cli

    path = tmp_path / "geom.json"
    status = cli.run(["simulate", "--write-geometry", str(path), "--isocentre", *map(str, HEAD_WORLD), "--rows",
                      "40", "--cols", "48", "--pixel-mm", "5", "--side", "left"], extra=_extra_commands())
    assert status == 0
    side, views = sim.load_geometry_file(path)
    assert side == "left" and [(v.rows, v.cols) for v in views] == [(40, 48), (40, 48)]
    # the isocentre projects to the principal point (image centre) of both views
    for view in views:
        np.testing.assert_allclose(g.project_points(view.projection, HEAD_WORLD[None])[0], [23.5, 19.5], atol=1e-9)
    status = cli.run(["simulate", "--ct", str(ct_files / "ct.nii.gz"), "--geometry", str(tmp_path / "missing.json"),
                      "--out", str(tmp_path / "case"), "--quiet"], extra=_extra_commands())
    assert status == 2 and not (tmp_path / "case").exists()


def _extra_commands():
    """The data subcommands, unless inference.cli already registers them."""
    from inference import cli
    from inference.data import cli_data

    return [] if "inference.data.cli_data" in cli.SUBCOMMAND_MODULES else [cli_data.add_parser]
