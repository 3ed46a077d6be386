"""The paper's experiments: view pairs and angle errors are what they claim, results resume."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest

from inference.cli import build_parser
from inference.errors import ConfigError
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
    results = run_experiment("angle-sensitivity", tmp_path)
    assert len(list((tmp_path / "units").glob("*.json"))) == 4  # 0 deg once, 5 deg for AP, LAT, both
    assert (tmp_path / "angle_sensitivity.png").stat().st_size > 1000
    assert 0.5 < results["table"]["AP"]["0"]["dice"]["mean"] <= 1.0
    text = (tmp_path / "results.md").read_text()
    assert "| LAT | 5 |" in text and "commit" in text and "sha256" in text


def test_steps_to_converge_is_the_first_validation_near_the_best(tmp_path):
    from inference.experiments import table2

    history = [{"step": s, "metrics": {"dice": d}} for s, d in ((250, 0.80), (500, 0.905), (750, 0.91), (1000, 0.908))]
    (tmp_path / "history.json").write_text(json.dumps(history))
    assert table2._steps_to_converge(tmp_path) == 500
    import dataclasses

    from inference.model import ModelConfig

    switches = {f.name for f in dataclasses.fields(ModelConfig)}
    assert all(set(changes) <= switches for changes in table2.ROWS.values())


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_table2_trains_every_row_and_tests_them_pairwise(tmp_path, monkeypatch):
    from inference.experiments import table2

    monkeypatch.setattr(table2, "ROWS", {"ours": {}, "no skip connections": {"skip_connections": False}})
    monkeypatch.setitem(table2.BUDGET, "quick", {"subjects": 4, "steps": 2, "validate_every": 2, "val_limit": 1,
                                                 "test": 2})
    results = run_experiment("table2", tmp_path)
    assert set(results["table"]) == {"ours", "no skip connections"}
    assert 0 <= results["table"]["ours"]["affine_dice"]["mean"] <= 1
    assert results["steps_to_converge"]["ours"] == 2
    assert "| no skip connections |" in (tmp_path / "results.md").read_text()
    config = json.loads((tmp_path / "configs" / "no-skip-connections.json").read_text())
    assert config["skip_connections"] is False
