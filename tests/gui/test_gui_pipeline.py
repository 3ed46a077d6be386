"""The workstation running the real registration pipeline (TensorFlow) in its worker.

The fast test registers the small synthetic case with an *untrained* compact network built in the
registration process (the pipeline accepts a model object): it is about the GUI driving the real pipeline (progress,
output files, 3D view, measurements, GUI responsiveness), not about accuracy. The slow test runs
``hipatlas gui --demo --screenshot PATH --quit-after-register`` end to end with the shipped model.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from PySide6.QtCore import Qt

from gui_helpers import Heartbeat, confirm_all, untrained_compact_register

pytestmark = pytest.mark.gui

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_real_pipeline_in_the_worker(make_window, synthetic_case, qtbot):
    window = make_window(untrained_compact_register)
    assert window.open_case_folder(synthetic_case), window.errors
    confirm_all(window)
    heartbeat, finished_at, messages = Heartbeat(), [], []
    heartbeat.start()
    with qtbot.waitSignal(window.registration_finished, timeout=300_000) as blocker:
        started = heartbeat.now()
        assert window.start_registration()
        window.register_step.worker.progress.connect(lambda fraction, message: messages.append(message))
        window.register_step.worker.succeeded.connect(lambda _r: finished_at.append(heartbeat.now()),
                                        Qt.ConnectionType.DirectConnection)
    heartbeat.stop()
    assert blocker.args == ["finished"], window.errors
    assert "Registering atlas" in messages and messages[-1] == "Loading results for display"
    block, wall_gap, ticks = heartbeat.longest_block(started, finished_at[0])
    assert ticks > 50
    # 0.5 s, not the 0.2 s of test_gui_thread_never_blocks_during_registration: in three of the
    # session-14 full `make test` runs this test alone saw one stall of 0.27-0.39 s that the
    # heartbeat charges to this process (run alone, also under three CPU hogs: 0.03 s); its cause
    # was not found. The freezes this test is for (a NIfTI decompressed in the GUI process: about
    # 1 s; a worker holding the GIL) are longer.
    assert block < 0.5, f"GUI thread blocked for {block * 1000:.0f} ms (longest wall gap {wall_gap * 1000:.0f} ms)"
    assert window.surface_view.has_surface()
    measurements = window.session.measurements
    assert {"femoral_offset_mm", "neck_shaft_angle_deg", "head_radius_mm"} <= set(measurements)
    assert window.measure_step.measure_table.rowCount() >= 4
    # the pipeline's warnings reach the Register panel
    for warning in window.session.result.warnings:
        assert warning in window.register_step.warnings_box.toPlainText()
    # moving the head centre recomputes with inference.measure: offset grows by the lateral move
    window.go_to_step("Measure")
    shaft_dir = np.asarray(measurements["shaft_axis"]["direction"])
    head = np.asarray(window.session.landmarks_mm["head_centre"])
    shaft_point = np.asarray(measurements["shaft_axis"]["point_mm"])
    radial = head - shaft_point - ((head - shaft_point) @ shaft_dir) * shaft_dir
    window.measure_step.move_landmark("head_centre", head + 4.0 * radial / np.linalg.norm(radial))
    assert window.session.measurements["femoral_offset_mm"] == pytest.approx(measurements["femoral_offset_mm"] + 4.0)


@pytest.mark.slow
def test_hipatlas_gui_demo_end_to_end(tmp_path, x_display):
    from inference import registration
    from inference.errors import ModelError

    if not (ROOT / "resources" / "demo" / "case.json").is_file():
        pytest.skip("the demo case is not installed (resources/demo/case.json)")
    try:
        registration.default_model_path()
    except ModelError as error:
        pytest.skip(f"no shipped model: {error}")
    shot = tmp_path / "demo.png"
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config"), "XDG_DATA_HOME": str(tmp_path / "data")}
    done = subprocess.run([sys.executable, "-m", "app.cli", "gui", "--demo", "--screenshot", str(shot),
                           "--quit-after-register"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    image = np.asarray(Image.open(shot).convert("RGB"))
    assert image.shape[0] > 500 and image.std() > 10


def test_real_mask_proposal_in_a_child_process(tmp_path):
    """The workstation's proposal job runs inference.mask_proposal (TensorFlow) in a child process."""
    from app.session import Session
    from gui_helpers import untrained_compact_propose, write_synthetic_case
    from inference import pipeline

    demo = ROOT / "resources" / "demo"
    case = demo if (demo / "case.json").is_file() else write_synthetic_case(tmp_path / "case")
    session = Session(work_root=tmp_path, propose_fn=untrained_compact_propose)
    try:
        session.open_case(case)
        messages = []
        masks = pipeline.run_to_completion(session.mask_proposal_job()(lambda: False),
                                           lambda p: messages.append(p.message))
        assert messages[-1] == "Masks proposed"
        assert [m.shape for m in masks] == [v.mask.shape for v in session.views]
        assert all(m.dtype == bool and m.any() for m in masks)
        if case == demo:  # the demo's masks are the true femur: the proposal must overlap them
            for mask, view in zip(masks, session.views):
                assert (mask & view.mask).sum() / (mask | view.mask).sum() > 0.1
        assert "tensorflow" not in sys.modules  # it ran in the child
    finally:
        session.close()
