"""The paper's experiments: view pairs and angle errors are what they claim, results resume."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest

from inference.cli import build_parser
from inference.errors import Cancelled, ConfigError
from inference.experiments import EXPERIMENTS, run_experiment
from inference.experiments import angle, common, viewmap


def test_view_map_pairs_cover_the_map_stratified():
    pairs = np.concatenate([viewmap._angle_pairs(75, seed=7, offset=k) for k in range(3)])
    assert np.all(np.abs(pairs[:, 0]) <= 30) and np.all(np.abs(pairs[:, 1] - 90) <= 30)
    bins = {(int((ap + 30) // 4), int((lat - 60) // 4)) for ap, lat in pairs}
    assert len(bins) == 225  # 3 x 75 pairs: every 4-deg bin of the 15 x 15 map exactly once
    np.testing.assert_array_equal(pairs[:75], viewmap._angle_pairs(75, seed=7, offset=0))


def test_experiment_command_parses_and_refuses_full_scale_without_a_model(tmp_path):
    args = build_parser().parse_args(["experiment", "angle-sensitivity", "--out", str(tmp_path)])
    assert args.name == "angle-sensitivity" and args.scale == "quick"
    assert set(EXPERIMENTS) >= {"angle-sensitivity", "view-map"}
    with pytest.raises(ConfigError, match="--model"):
        run_experiment("view-map", tmp_path, scale="full")
    with pytest.raises(ConfigError, match="unknown experiment"):
        run_experiment("table9", tmp_path)


class _CompactContext(common.ExperimentContext):
    """A context on the compact grid without loading a model (rendering only)."""

    config = types.SimpleNamespace(grid="compact")


def _context(tmp_path):
    return _CompactContext("angle-sensitivity", tmp_path, "quick", tmp_path / "none.keras", seed=3)


def test_an_angle_error_moves_only_the_radiograph_of_that_view(tmp_path):
    ctx = _context(tmp_path)
    phantom = next(common.held_out_phantoms(ctx, 1))
    assert phantom.femur == "JIA_MRI:left" and (tmp_path / "phantoms" / "p000.npz").is_file()
    exact = common.render_pair(ctx, phantom, (0.0, 90.0))
    lat_off = common.render_pair(ctx, phantom, (0.0, 90.0), angle_error_deg=(0.0, 5.0))
    # The network is told the same (nominal) cameras; the AP radiograph is the same; the LAT one moved.
    np.testing.assert_allclose(exact["projection"], lat_off["projection"])
    np.testing.assert_allclose(exact["images"][0], lat_off["images"][0], atol=1e-6)
    moved = np.mean(exact["masks"][1] != lat_off["masks"][1])
    assert moved > 0.005, moved
    # The cached phantom is reused as it was.
    again = next(common.held_out_phantoms(ctx, 1))
    np.testing.assert_array_equal(again.labels, phantom.labels)


def test_units_resume_instead_of_recomputing(tmp_path):
    ctx = _context(tmp_path)
    calls = []
    first = ctx.unit("u1", lambda: calls.append(1) or {"dice": 0.9, "assd_mm": float("nan")})
    second = ctx.unit("u1", lambda: calls.append(2) or {"dice": 0.1})
    assert calls == [1] and first == second == {"dice": 0.9, "assd_mm": None}
    assert json.loads((tmp_path / "units" / "u1.json").read_text())["assd_mm"] is None


@pytest.mark.slow
def test_angle_sensitivity_runs_end_to_end_with_the_shipped_model(tmp_path, monkeypatch):
    monkeypatch.setattr(angle, "ERRORS_DEG", (0.0, 5.0))
    monkeypatch.setattr(angle, "PHANTOMS", {"quick": 1, "full": 1})
    monkeypatch.setattr(angle, "SELFCAL_CASES", {"quick": 1, "full": 1})  # about a minute more
    results = run_experiment("angle-sensitivity", tmp_path)
    # network: 0 deg once, 5 deg for AP, LAT, both; register: 0 and 5 deg, without and with self-calibration
    assert len(list((tmp_path / "units").glob("*.json"))) == 8
    assert (tmp_path / "angle_sensitivity.png").stat().st_size > 1000
    assert 0.5 < results["table"]["AP"]["0"]["dice"]["mean"] <= 1.0
    register = results["register"]["table"]
    assert all(0.8 < register[variant]["0"]["dice"]["mean"] <= 1.0 for variant in ("fullres", "selfcal"))
    assert register["selfcal"]["5"]["selfcal_lat_deg"]["n"] == 1
    text = (tmp_path / "results.md").read_text()
    assert "| LAT | 5 |" in text and "commit" in text and "sha256" in text
    assert "| 5 |" in text.split("Dice with self-calibration")[1]


def test_steps_to_converge_is_the_first_validation_near_the_best(tmp_path):
    from inference.experiments import table2

    history = [{"step": s, "metrics": {"dice": d}} for s, d in ((250, 0.80), (500, 0.905), (750, 0.91), (1000, 0.908))]
    (tmp_path / "history.json").write_text(json.dumps(history))
    assert table2.steps_to_converge(table2._validation(tmp_path)) == 500
    assert table2._validation(tmp_path / "no-val-split") == [] and table2.steps_to_converge([]) is None
    import dataclasses

    from inference.model import ModelConfig

    switches = {f.name for f in dataclasses.fields(ModelConfig)}
    assert all(set(changes) <= switches for changes in table2.ROWS.values())


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_table2_trains_every_row_and_tests_them_pairwise(tmp_path, monkeypatch):
    from inference.experiments import table2

    monkeypatch.setattr(table2, "ROWS", {"ours": {}, "no skip connections": {"skip_connections": False}})
    # 8 phantoms: one of them falls in the val split, so each run validates
    monkeypatch.setitem(table2.BUDGET, "quick", {"subjects": 8, "steps": 2, "validate_every": 2, "val_limit": 1,
                                                 "test": 2})
    results = run_experiment("table2", tmp_path)
    assert set(results["table"]) == {"ours", "no skip connections"}
    assert 0 <= results["table"]["ours"]["affine_dice"]["mean"] <= 1
    assert results["steps_to_converge"]["ours"] == 2
    assert "| no skip connections |" in (tmp_path / "results.md").read_text()
    config = json.loads((tmp_path / "configs" / "no-skip-connections.json").read_text())
    assert config["skip_connections"] is False


# --------------------------------------------------------------------------------------------
# angle-sensitivity through hipatlas register, without and with self-calibration
# --------------------------------------------------------------------------------------------

def _rotation_about_z(angle_deg, centre_mm=(0.0, 0.0, 0.0)):
    import math

    angle = math.radians(angle_deg)
    rotation = np.eye(4)
    rotation[:2, :2] = [[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]]
    move, back = np.eye(4), np.eye(4)
    move[:3, 3], back[:3, 3] = centre_mm, -np.asarray(centre_mm)
    return move @ rotation @ back


def _write_fake_case(case_dir, truth_dir, side="right"):
    """A case folder of two standard views (AP, LAT) with blank images, and a truth folder."""
    from inference.data import simulate
    from inference.io import write_png_atomic

    geometry = simulate.standard_geometry((0.0, 0.0, 0.0), side, rows=32, cols=32, pixel_mm=8.0)
    case_dir.mkdir(parents=True)
    truth_dir.mkdir(parents=True)
    views = []
    for number, view in enumerate(geometry["views"]):
        write_png_atomic(case_dir / f"v{number}.png", np.zeros((32, 32), np.uint16))
        views.append({"name": view["name"], "image": f"v{number}.png", "projection_matrix": view["projection_matrix"]})
    (case_dir / "case.json").write_text(json.dumps({"side": side, "views": views}))
    (truth_dir / "truth.json").write_text(json.dumps({"side": side}))


def _matrices(case_dir):
    return [np.asarray(v["projection_matrix"]) for v in json.loads((case_dir / "case.json").read_text())["views"]]


def test_the_lat_angle_self_calibration_finds_is_the_recorded_error(tmp_path):
    from inference.experiments import simcases
    from inference.geometry import view_pair_check
    from inference.refine import corrected_world_projection

    _write_fake_case(tmp_path / "case", tmp_path / "truth")
    true_p = _matrices(tmp_path / "case")
    simcases.perturb_lateral(tmp_path / "case", 5.0)
    recorded = _matrices(tmp_path / "case")
    np.testing.assert_allclose(recorded[0], true_p[0])
    assert not np.allclose(recorded[1], true_p[1])
    # the perfect correction M (P_recorded @ M = P_true) is the rotation by -5 deg about the long axis
    correction = _rotation_about_z(-5.0, view_pair_check(*true_p).midpoint_mm)
    np.testing.assert_allclose(corrected_world_projection(recorded[1], correction), true_p[1], atol=1e-6)
    found = angle._lat_angle_found({"LAT": {"matrix": correction.tolist()}}, tmp_path / "case")
    assert found == pytest.approx(5.0)
    assert angle._lat_angle_found({}, tmp_path / "case") is None


class _FakeModelContext(_CompactContext):
    model = "the context's model"


def test_angle_sensitivity_registers_cases_without_and_with_self_calibration_and_resumes(tmp_path, monkeypatch):
    from inference.experiments import simcases

    monkeypatch.setattr(angle, "ERRORS_DEG", (0.0, 5.0))
    monkeypatch.setattr(angle, "PHANTOMS", {"quick": 1, "full": 1})
    monkeypatch.setattr(angle, "SELFCAL_CASES", {"quick": 1, "full": 1})
    calls = {"network": 0, "simulate": [], "register": []}

    def fake_phantoms(ctx, count):
        yield types.SimpleNamespace(key="p000", femur="JIA_MRI:left")

    def fake_network(ctx, sample):
        calls["network"] += 1
        return {"dice": 0.9, "assd_mm": 1.0}

    def fake_simulate(plan, subject, work, ct_spacing_mm, shaft_mm=None):
        calls["simulate"].append((plan["index"], subject, ct_spacing_mm))
        case_dir, truth_dir = work / f"case_{plan['index']:03d}", work / f"truth_{plan['index']:03d}"
        _write_fake_case(case_dir, truth_dir, plan["side"])
        return case_dir, truth_dir

    def fake_register(net, run_dir, result_dir, variant, *, truth_dir, side, assd=False):
        original = truth_dir.parent / truth_dir.name.replace("truth", "case")
        recorded, true_p = _matrices(run_dir), _matrices(original)
        perturbed = not np.allclose(recorded[1], true_p[1])
        np.testing.assert_allclose(recorded[0], true_p[0])  # the AP view is never touched
        calls["register"].append((net, run_dir.name, variant, perturbed, assd))
        result_dir.mkdir()
        row = {"dice": 0.92 - (0.06 if variant == "fullres" else 0.02) * perturbed, "assd_mm": 1.0 + perturbed,
               "time_s": 1.0, "warnings": []}
        if variant == "selfcal":
            row["self_calibration"] = {"LAT": {"matrix": _rotation_about_z(-5.0 * perturbed).tolist()}}
        return row

    monkeypatch.setattr(angle, "held_out_phantoms", fake_phantoms)
    monkeypatch.setattr(angle, "render_pair", lambda *args, **kwargs: None)
    monkeypatch.setattr(angle, "register_metrics", fake_network)
    monkeypatch.setattr(simcases, "simulate_case", fake_simulate)
    monkeypatch.setattr(simcases, "register_variant", fake_register)
    (tmp_path / "none.keras").write_bytes(b"not a model")
    ctx = _FakeModelContext("angle-sensitivity", tmp_path, "quick", tmp_path / "none.keras", seed=3)
    assert "[todo] case000_LAT_5_selfcal" in angle.describe_plan(ctx)

    results = angle.run(ctx)

    units = {p.stem for p in (tmp_path / "units").glob("*.json")}
    assert units == {"p000_AP_0", "p000_AP_5", "p000_LAT_5", "p000_both_5", "case000_LAT_0_fullres",
                     "case000_LAT_0_selfcal", "case000_LAT_5_fullres", "case000_LAT_5_selfcal"}
    assert calls["simulate"] == [(0, "JIA_MRI:right", 1.5)]  # once, the held-out specimen, 1.5 mm CT
    assert [(c[0], c[2], c[3], c[4]) for c in calls["register"]] == [
        ("the context's model", "fullres", False, True), ("the context's model", "selfcal", False, True),
        ("the context's model", "fullres", True, True), ("the context's model", "selfcal", True, True)]
    # the outputs, perturbed copies and, with all its units done, the simulated case are removed
    assert not list((tmp_path / "cases").iterdir())
    register = results["register"]
    assert register["cases"] == 1 and register["seed"] == 3 and len(register["rows"]) == 4
    assert register["dice_drop"]["fullres"]["5"]["mean"] == pytest.approx(0.06)
    assert register["dice_drop"]["selfcal"]["5"]["mean"] == pytest.approx(0.02)
    assert register["table"]["selfcal"]["5"]["selfcal_lat_deg"]["mean"] == pytest.approx(5.0)
    assert register["table"]["fullres"]["0"]["assd_mm"]["mean"] == pytest.approx(1.0)
    assert register["table"]["fullres"]["5"]["selfcal_lat_deg"]["n"] == 0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["register"]["lat_5deg_dice_drop"] == {"fullres": pytest.approx(0.06), "selfcal": pytest.approx(0.02)}
    text = (tmp_path / "results.md").read_text()
    assert "| LAT error (deg) | Dice without | Dice with self-calibration | ASSD without (mm) | ASSD with (mm) " in text
    assert "| 5 | 0.860 | 0.900 | 2.00 | 2.00 | 0.060 | 0.020 | 5.00 |" in text
    assert "On 1 case, LAT 5 deg off costs 0.060 Dice through `hipatlas register` without self-calibration " \
           "and 0.020 with it." in text
    assert "| LAT | 5 |" in text  # the network curves are still there
    assert (tmp_path / "angle_sensitivity.png").stat().st_size > 1000
    assert "todo" not in angle.describe_plan(ctx)

    # Run again: everything is read back, nothing is simulated or registered.
    before = (calls["network"], len(calls["simulate"]), len(calls["register"]))
    again = angle.run(ctx)
    assert (calls["network"], len(calls["simulate"]), len(calls["register"])) == before
    assert again["register"]["table"] == register["table"]

    # Stopped within a case, a run keeps the case and the next run goes on with it.
    for key in ("case000_LAT_5_fullres", "case000_LAT_5_selfcal"):
        (tmp_path / "units" / f"{key}.json").unlink()
    ctx.cancel = lambda: len(calls["register"]) >= 5
    with pytest.raises(Cancelled):
        angle.run(ctx)
    assert len(calls["simulate"]) == 2 and (tmp_path / "cases" / "case000" / "case_000" / "case.json").is_file()
    ctx.cancel = None
    angle.run(ctx)
    assert len(calls["simulate"]) == 2 and [c[1:3] for c in calls["register"][4:]] == [
        ("lat5_fullres", "fullres"), ("lat5_selfcal", "selfcal")]
    assert not list((tmp_path / "cases").iterdir())


def test_angle_sensitivity_records_a_failed_registration_and_carries_on(tmp_path, monkeypatch):
    from inference.errors import GeometryError
    from inference.experiments import simcases

    monkeypatch.setattr(angle, "ERRORS_DEG", (0.0, 5.0))
    monkeypatch.setattr(angle, "PHANTOMS", {"quick": 0, "full": 0})
    monkeypatch.setattr(angle, "SELFCAL_CASES", {"quick": 1, "full": 1})
    monkeypatch.setattr(angle, "held_out_phantoms", lambda ctx, count: iter(()))

    def fake_simulate(plan, subject, work, ct_spacing_mm, shaft_mm=None):
        case_dir, truth_dir = work / "case_000", work / "truth_000"
        _write_fake_case(case_dir, truth_dir)
        return case_dir, truth_dir

    def fake_register(net, run_dir, result_dir, variant, *, truth_dir, side, assd=False):
        if run_dir.name != "case_000":
            raise GeometryError("the head is not on the LAT view")
        return {"dice": 0.9, "assd_mm": 1.0}

    monkeypatch.setattr(simcases, "simulate_case", fake_simulate)
    monkeypatch.setattr(simcases, "register_variant", fake_register)
    (tmp_path / "none.keras").write_bytes(b"not a model")
    results = angle.run(_FakeModelContext("angle-sensitivity", tmp_path, "quick", tmp_path / "none.keras"))
    failed = [r for r in results["register"]["rows"] if r.get("error")]
    assert len(failed) == 2 and results["register"]["table"]["fullres"]["5"]["dice"]["n"] == 0
    assert "2 registrations failed" in (tmp_path / "results.md").read_text()
    assert not list((tmp_path / "cases" / "case000").glob("lat*"))
