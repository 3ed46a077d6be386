"""register_case with test-time refinement and self-calibration (untrained compact model)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from inference import io, pipeline, refine
from inference.errors import Cancelled



def test_refinement_reports_its_losses_and_pose_and_keeps_the_better_result(left_case_and_model, tmp_path):
    sim, model_path = left_case_and_model
    settings = refine.RefineSettings(max_steps=4, time_limit_s=120.0, self_calibrate=True)
    progress = []
    result = pipeline.run_to_completion(
        pipeline.register_case(sim.case_dir, tmp_path / "out", model=model_path, refine=settings),
        on_progress=progress.append)
    entry = result.report["refinement"]
    assert entry["run"] and entry["steps"] == 4
    assert math.isfinite(entry["loss_before"]) and entry["loss_after"] <= entry["loss_before"]
    assert entry["used"] == (entry["loss_after"] < entry["loss_before"] - 0.002 * abs(entry["loss_before"]))
    assert set(entry["terms_before"]) >= {"ncc_v0", "dice_v0", "ncc_v1", "dice_v1", "total"}
    if entry["used"]:
        lat = entry["self_calibration"]["LAT"]
        assert np.asarray(lat["matrix"]).shape == (4, 4) and lat["rotation_deg"] >= 0.0
    assert any(p.message.startswith("Refining") for p in progress)
    fractions = [p.fraction for p in progress]
    assert fractions == sorted(fractions)
    # outputs on the paper grid
    labels, grid = io.read_volume(tmp_path / "out" / "femur_labels.nii.gz")
    assert labels.shape == (192, 128, 192) and result.report["output_resolution"]["grid"] == "paper"


def test_refinement_can_be_cancelled(left_case_and_model, tmp_path):
    sim, model_path = left_case_and_model
    calls = {"n": 0}

    def cancel():
        calls["n"] += 1
        return calls["n"] > 6  # after the network (4 checks), inside the refinement

    with pytest.raises(Cancelled):
        pipeline.run_to_completion(pipeline.register_case(
            sim.case_dir, tmp_path / "out", model=model_path,
            refine=refine.RefineSettings(max_steps=50, time_limit_s=600.0), cancel=cancel))
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_without_refinement_the_report_says_so(left_case_and_model, tmp_path):
    sim, model_path = left_case_and_model
    result = pipeline.run_to_completion(pipeline.register_case(sim.case_dir, tmp_path / "out", model=model_path,
                                                               refine=False, full_resolution=False))
    assert result.report["refinement"] == {"run": False}
    labels, _ = io.read_volume(tmp_path / "out" / "femur_labels.nii.gz")
    assert labels.shape == (96, 64, 96) and result.report["output_resolution"]["grid"] == "compact"


@pytest.mark.parametrize("threshold", [0.0, 1.01])
def test_auto_refinement_follows_the_outlines_agreement(left_case_and_model, tmp_path, monkeypatch, threshold):
    sim, model_path = left_case_and_model
    monkeypatch.setattr(refine, "AUTO_REFINE_BELOW", threshold)
    progress = []
    result = pipeline.run_to_completion(pipeline.register_case(
        sim.case_dir, tmp_path / "out", model=model_path, full_resolution=False,
        refine=refine.RefineSettings(max_steps=2, time_limit_s=120.0, auto=True)), on_progress=progress.append)
    entry = result.report["refinement"]
    auto = entry["auto"]
    assert auto["threshold"] == threshold and set(auto["mask_agreement_dice"]) == {"AP", "LAT"}
    assert auto["run"] == (threshold > 1.0) == entry["run"]
    if entry["run"]:
        assert entry["steps"] == 2 and any(p.message.startswith("Refining") for p in progress)
        assert any("refined on the radiographs" in w for w in result.warnings)
        # the views' agreement in report.json is that of the written (refined or not) output
        assert all(0.0 <= v["mask_agreement_dice"] <= 1.0 for v in result.report["views"])
    else:
        assert not any(p.message.startswith("Refining") for p in progress)
    fractions = [p.fraction for p in progress]
    assert fractions == sorted(fractions)


def test_refine_refuses_an_unknown_word(left_case_and_model, tmp_path):
    from inference.errors import ConfigError

    sim, model_path = left_case_and_model
    with pytest.raises(ConfigError, match="auto"):
        pipeline.run_to_completion(pipeline.register_case(sim.case_dir, tmp_path / "out", model=model_path,
                                                          refine="sometimes"))


def test_the_demo_with_the_shipped_model_is_not_refined_by_default(tmp_path, monkeypatch):
    from inference.errors import ModelError
    from inference.resources import demo_dir

    monkeypatch.delenv(refine.REFINE_ENV, raising=False)
    try:
        result = pipeline.run_to_completion(pipeline.register_case(demo_dir(), tmp_path / "out"))
    except ModelError as error:
        pytest.skip(f"no shipped model: {error}")
    entry = result.report["refinement"]
    # the outlines agree with the masks (0.97-0.98 on the demo): the automatic refinement does not run
    assert entry["run"] is False and entry["auto"]["run"] is False
    assert entry["auto"]["lowest"] >= refine.AUTO_REFINE_BELOW and "agree" in entry["auto"]["reason"]
