"""The simulated cases of tools/eval_cases.py (inference.experiments.simcases): short-shaft films,
view pairs far from orthogonal, and the tool's old names for them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from inference.experiments import simcases

from tool_helpers import TOOLS, load_tool


@pytest.fixture(scope="module")
def eval_cases():
    return load_tool("eval_cases", "eval_cases_tool")


def test_the_tool_reports_the_measurement_errors_and_coverage(eval_cases):
    assert "femoral_offset_error_mm" in eval_cases.ERROR_METRICS and "femoral_offset_covered" in eval_cases.METRICS


@pytest.mark.parametrize("name", ["vertical_offset_study", "selfcal_search_study"])
def test_the_study_tools_use_only_names_that_exist(name):
    # they take the case machinery from inference.experiments.simcases and the tool helpers from eval_cases
    import ast

    source = (TOOLS / f"{name}.py").read_text(encoding="utf-8")
    modules = {"simcases": simcases, "eval_cases": load_tool("eval_cases", "eval_cases_for_" + name)}
    used = {(node.value.id, node.attr) for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules}
    assert used and all(hasattr(modules[module], attr) for module, attr in used), sorted(used)


def _project(matrix, point):
    h = np.asarray(matrix) @ np.append(point, 1.0)
    return h[:2] / h[2]


@pytest.mark.parametrize("flipped", [False, True], ids=["inferior-down", "inferior-up"])
def test_short_shaft_crop_ends_the_film_below_the_lesser_trochanter_and_keeps_P_true(tmp_path, flipped):
    from PIL import Image

    from inference import anatomy
    from inference.data import simulate
    from inference.io import write_png_atomic

    geometry = simulate.standard_geometry((0.0, 0.0, 0.0), "right", rows=200, cols=160, pixel_mm=1.0)
    case, truth = tmp_path / "case", tmp_path / "truth"
    case.mkdir()
    truth.mkdir()
    lesser = np.array([5.0, 3.0, -20.0])
    landmarks = [[0.0, 0.0, 0.0]] * len(anatomy.LANDMARK_NAMES)
    landmarks[anatomy.LANDMARK_NAMES.index("lesser_trochanter")] = lesser.tolist()
    (truth / "truth.json").write_text(json.dumps({"landmarks_mm": landmarks}))
    rng = np.random.default_rng(0)
    views, originals = [], []
    for number, view in enumerate(geometry["views"]):
        matrix = np.asarray(view["projection_matrix"], float)
        if flipped:  # an image stored upside down: v = rows - 1 - v
            matrix = np.array([[1.0, 0, 0], [0, -1.0, 199.0], [0, 0, 1.0]]) @ matrix
        pixels = rng.integers(0, 65535, (200, 160)).astype(np.uint16)
        write_png_atomic(case / f"v{number}.png", pixels)
        write_png_atomic(case / f"v{number}_mask.png", (pixels > 30000).astype(np.uint8) * 255)
        views.append({"name": view["name"], "image": f"v{number}.png", "mask": f"v{number}_mask.png",
                      "projection_matrix": matrix.tolist()})
        originals.append((matrix, pixels))
    (case / "case.json").write_text(json.dumps({"side": "right", "views": views}))

    simcases._crop_shaft(case, truth, 40.0)

    raw = json.loads((case / "case.json").read_text())
    for view, (matrix, pixels) in zip(raw["views"], originals):
        cropped = np.array(Image.open(case / view["image"]))
        mask = np.array(Image.open(case / view["mask"]))
        assert cropped.shape == mask.shape and cropped.shape[1] == 160 and 60 < cropped.shape[0] < 200
        new = np.asarray(view["projection_matrix"])
        # a point between the trochanter and the cut stays on its pixel, and keeps its value
        point = lesser - [0.0, 0.0, 30.0]
        u, v = _project(new, point)
        u0, v0 = _project(matrix, point)
        assert 0 <= v < cropped.shape[0]
        assert cropped[int(v), int(u)] == pixels[int(v0), int(u0)]
        # the cut point itself lies on the film's last (or first) row
        _, v_cut = _project(new, lesser - [0.0, 0.0, 40.0])
        assert min(abs(v_cut - (cropped.shape[0] - 1)), abs(v_cut)) < 1.0
        # 50 mm below the trochanter is off the film
        _, v_below = _project(new, lesser - [0.0, 0.0, 50.0])
        assert not 0 <= v_below < cropped.shape[0]


@pytest.mark.parametrize("side", ["right", "left"])
def test_view_separation_sets_the_angle_between_the_views(side):
    plan = simcases.case_plan(0, 2024, False, [side], view_separation_deg=40.0)
    lateral = 90.0 if side == "right" else -90.0
    assert abs(lateral + plan["angles_offset_deg"][1] - plan["angles_offset_deg"][0]) == pytest.approx(40.0)


def test_case_metrics_scores_against_the_phantom_surface_and_the_label_map(tmp_path, tmp_path_factory):
    """A result equal to the true surface on a 1 mm grid scores Dice 1 against the surface truth;
    against the phantom CT's 3 mm label map, resampled, it scores what that label map itself does."""
    import register_helpers as rh

    from inference import geometry, io
    from inference.data import simulate

    sim = rh.simulated_case(tmp_path_factory.getbasetemp(), "left")
    hip = sim.hip_centre_mm
    grid = geometry.VolumeGeometry.centered((70, 56, 56), (1.0, 1.0, 1.0), tuple(hip + [0.0, 0.0, -18.0]))
    femur = simulate.true_femur_mask(sim.truth_dir, grid)
    assert femur.sum() > 20000 and femur[tuple(np.round(grid.world_to_index()[:3] @ np.append(hip, 1.0))
                                               .astype(int)[::-1])]
    out = tmp_path / "out"
    out.mkdir()
    io.write_volume(out / "femur_labels.nii.gz", femur.astype(np.uint8), grid, dtype=np.uint8)
    (out / "measurements.json").write_text(json.dumps({"hip_centre_mm": hip.tolist(),
                                                        "head_radius_mm": sim.truth["head_radius_mm"]}))
    row = simcases.case_metrics(out, sim.truth_dir, "left", assd=True)
    assert row["dice_surface"] == 1.0 and row["assd_surface_mm"] == 0.0 and row["hd95_surface_mm"] == 0.0
    assert 0.85 < row["truth_label_dice"] < 0.98  # the 3 mm label map's staircase
    assert row["dice"] == pytest.approx(row["truth_label_dice"]) and row["assd_mm"] > 0.3
    assert row["hip_centre_error_mm"] == 0.0 and row["head_radius_error_mm"] == 0.0
    # One voxel layer less of femur: worse against the surface, by what a 1 mm shell costs.
    from scipy import ndimage

    io.write_volume(out / "femur_labels.nii.gz", ndimage.binary_erosion(femur).astype(np.uint8), grid,
                    dtype=np.uint8)
    eroded = simcases.case_metrics(out, sim.truth_dir, "left", assd=True)
    assert 0.8 < eroded["dice_surface"] < 0.97 and 0.5 < eroded["assd_surface_mm"] < 1.5


def test_shaft_metrics_see_a_shaft_drawn_too_thin():
    """A cylinder of radius 10 mm, ours 9 mm thin from 10 mm below the lesser trochanter down."""
    from inference import geometry

    for direction in (None, ((-1, 0, 0), (0, 1, 0), (0, 0, 1))):  # plain and mirrored grids
        x0 = -19.5 if direction is None else 19.5  # the mirrored grid runs from +x to -x
        grid = geometry.VolumeGeometry((60, 40, 40), (1.0, 1.0, 1.0), (x0, -19.5, -30.0),
                                       *(() if direction is None else (direction,)))
        kk, jj, ii = np.meshgrid(*(np.arange(n) for n in grid.shape_zyx), indexing="ij")
        world = np.tensordot(np.stack([ii, jj, kk, np.ones_like(ii)], -1), grid.index_to_world()[:3].T, 1)
        rho = np.hypot(world[..., 0], world[..., 1])
        lt_z = 5.0
        surface = rho <= 10.0
        ours = np.where(world[..., 2] <= lt_z - simcases.SHAFT_BELOW_LT_MM, rho <= 9.0, surface)
        truth = {"landmark_names": ["head_centre", "lesser_trochanter"],
                 "landmarks_mm": [[0.0, 0.0, 28.0], [0.0, 0.0, lt_z]]}
        row = simcases.shaft_metrics(ours, surface, grid, truth)
        area = (rho[0] <= 9.0).sum() / (rho[0] <= 10.0).sum()  # about 0.81
        assert row["shaft_volume_ratio"] == pytest.approx(area)
        assert row["shaft_dice"] == pytest.approx(2 * area / (1 + area))
        shaft_slices = 26  # z = -30 .. -5
        assert row["volume_ratio"] == pytest.approx((shaft_slices * area + 34) / 60)
    no_lt = simcases.shaft_metrics(ours, surface, grid, {"landmark_names": [], "landmarks_mm": []})
    assert no_lt["volume_ratio"] < 1 and np.isnan(no_lt["shaft_dice"])
    assert np.isnan(simcases.shaft_metrics(ours, None, grid, truth)["volume_ratio"])


def test_paired_variants_compares_two_reports_of_the_same_cases(tmp_path):
    paired = load_tool("paired_variants", "paired_variants_tool")

    def report(name, dices, seed=7):
        rows = [{"sample_index": i, "lat_angle_error_deg": 0.0, "variant": "ensemble-auto", "dice_surface": d,
                 "shaft_dice": d - 0.02} for i, d in enumerate(dices)]
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"seed": seed, "subject": "JIA_MRI", "rows": rows}))
        return path

    old, new = report("old", [0.92, 0.93, 0.91]), report("new", [0.93, 0.93, 0.90])
    result = paired.study([old], "ensemble-auto", "unused", against=[new])
    entry = result["overall"]["dice_surface"]
    assert entry["cases"] == 3 and entry["mean_delta"] == pytest.approx(0.0)
    assert (entry["better"], entry["worse"], entry["equal"]) == (1, 1, 1)
    assert result["overall"]["shaft_dice"]["mean_b"] == pytest.approx(0.9)
    with pytest.raises(SystemExit, match="same cases"):
        paired.study([old], "ensemble-auto", "unused", against=[report("other", [0.9], seed=8)])
    with pytest.raises(SystemExit, match="one report per report"):
        paired.study([old, new], "ensemble-auto", "unused", against=[new])
