"""benchmarks/bench_onnx_forward.py: the inputs it saves are the ones the pipeline feeds the network,
and the standalone timing run (numpy + onnxruntime only) reproduces the pipeline's output."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from benchmarks import bench_onnx_forward  # noqa: E402
from inference import backends, resources  # noqa: E402


@pytest.fixture(scope="module")
def shipped_onnx():
    onnx_path, _ = backends.onnx_file_for(resources.default_model_file())
    if onnx_path is None:
        pytest.skip("the shipped model has no ONNX export here")
    return onnx_path


def test_dumped_inputs_run_standalone_and_agree(shipped_onnx, tmp_path, capsys):
    inputs = tmp_path / "demo_inputs.npz"
    assert bench_onnx_forward.main(["--dump-inputs", str(inputs)]) == 0
    with np.load(inputs, allow_pickle=False) as data:
        assert sorted(data.files) == ["images", "index_to_world", "masks", "projection"]
        assert data["images"].shape[:2] == (1, 2) and data["projection"].shape == (1, 2, 3, 4)
        feed = {name: data[name] for name in data.files}
    capsys.readouterr()

    assert bench_onnx_forward.main(["--onnx", str(shipped_onnx), "--inputs", str(inputs),
                                    "--repeats", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    cpu_runs = [run for run in result["runs"] if run["provider"] == "CPUExecutionProvider"]
    assert {run["threads"] for run in cpu_runs} >= {1}
    for run in cpu_runs:
        assert run["warm_median_s"] > 0 and run["labels_dice_to_cpu"] > 0.999
        assert run["psi_max_abs_diff_vox"] < 1e-3

    # The saved inputs are what the backend sees: the same forward pass gives the same field.
    net = backends.load_backend(resources.default_model_file(), "onnx")  # the first, if DEFAULT names several
    direct = net.run(feed)
    import onnxruntime

    session = onnxruntime.InferenceSession(str(shipped_onnx), providers=["CPUExecutionProvider"])
    standalone = dict(zip(bench_onnx_forward.OUTPUTS, session.run(list(bench_onnx_forward.OUTPUTS), feed)))
    assert np.abs(direct["psi"] - standalone["psi"]).max() < 1e-3
