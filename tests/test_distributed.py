"""Distributed training (inference/distributed.py), the streaming input (inference/data/stream.py)
and multi-worker runs of real worker processes on 127.0.0.1 (CPU only)."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from inference import distributed as D
from inference import train as T
from inference.data import stream
from inference.errors import ConfigError, InputFileError
from test_model import TINY, _ellipsoid
from test_train import SETTINGS, atlas, data_dir, make_tiny_dataset  # noqa: F401 (fixtures)

WORKER = pathlib.Path(__file__).with_name("dist_worker.py")


# --------------------------------------------------------------------------------------------
# Cluster, batch split, sample shares
# --------------------------------------------------------------------------------------------

def test_cluster_from_the_command_line_and_tf_config():
    cluster = D.parse_cluster("node1:23456, node2:23456", 1)
    assert cluster.workers == ("node1:23456", "node2:23456")
    assert cluster.tf_config() == {"cluster": {"worker": ["node1:23456", "node2:23456"]},
                                   "task": {"type": "worker", "index": 1}}
    assert D.tf_config_tasks({"TF_CONFIG": json.dumps(cluster.tf_config())}) == ("worker", 1, 2)
    with_chief = {"cluster": {"chief": ["a:1"], "worker": ["b:1", "c:1"]}, "task": {"type": "chief", "index": 0}}
    assert D.tf_config_tasks({"TF_CONFIG": json.dumps(with_chief)}) == ("chief", 0, 3)
    assert D.tf_config_tasks({}) is None
    for text, index, match in [("node1:23456", 1, "task-index"), ("node1", 0, "host:port"),
                               ("a:1,a:1", 0, "twice"), ("a:70000", 0, "host:port"), ("", 0, "no worker")]:
        with pytest.raises(ConfigError, match=match):
            D.parse_cluster(text, index)
    with pytest.raises(ConfigError, match="TF_CONFIG"):
        D.tf_config_tasks({"TF_CONFIG": "{not json"})
    with pytest.raises(ConfigError, match="worker:2"):
        D.tf_config_tasks({"TF_CONFIG": json.dumps({"cluster": {"worker": ["a:1"]},
                                                    "task": {"type": "worker", "index": 2}})})


def test_global_batch_must_split_evenly_over_the_replicas():
    assert D.split_batch(4, None, 2) == (2, 4)
    assert D.split_batch(1, None, 1) == (1, 1)
    assert D.split_batch(None, 3, 4) == (3, 12)
    with pytest.raises(ConfigError, match="global batch of 1 does not split evenly over 2 replicas"):
        D.split_batch(1, None, 2)
    with pytest.raises(ConfigError, match="global batch of 3"):
        D.split_batch(3, None, 2)
    with pytest.raises(ConfigError, match="per-replica batch"):
        D.split_batch(None, 0, 2)


def test_workers_read_disjoint_shares_that_make_up_each_global_batch():
    def take(iterator, count):
        return [next(iterator) for _ in range(count)]

    single = take(D.pipeline_positions(3, 6), 12)
    assert single == list(range(18, 30))
    shares = [take(D.pipeline_positions(3, 6, worker, 3), 4) for worker in range(3)]
    assert shares == [[18, 19, 24, 25], [20, 21, 26, 27], [22, 23, 28, 29]]
    with pytest.raises(ConfigError, match="does not split over 4 workers"):
        next(D.pipeline_positions(0, 6, 0, 4))


# --------------------------------------------------------------------------------------------
# Streaming input
# --------------------------------------------------------------------------------------------

def _entries(folder):
    manifest = json.loads((folder / "manifest.json").read_text())
    return T.pooled_entries([folder], [manifest], "train")


def _stream_batches(entries, seed, batch, positions, count, parallel=None):
    ds = stream.training_dataset([e["_path"] for e in entries], seed, batch, positions,
                                 shape_zyx=TINY.shape_zyx, detector_hw=TINY.detector_hw, parallel=parallel)
    return [batch for batch in ds.take(count).as_numpy_iterator()]


def test_streaming_input_gives_the_batches_of_the_sequential_reader(data_dir):
    entries = _entries(data_dir)
    seed, batch, start_step = 3, 2, 2
    reference = T.training_examples(entries, seed, start_sample=start_step * batch)  # resumed at step 2
    expected = [next(reference) for _ in range(8)]
    for parallel in (1, 4):
        batches = _stream_batches(entries, seed, batch, lambda: D.pipeline_positions(start_step, batch), 4,
                                  parallel)
        for step, (inputs, targets) in enumerate(batches):
            for row in range(batch):
                want_inputs, want_targets = expected[step * batch + row]
                for key, value in want_inputs.items():
                    np.testing.assert_array_equal(inputs[key][row], value, err_msg=key)
                for key, value in want_targets.items():
                    np.testing.assert_array_equal(targets[key][row], value, err_msg=key)
                assert targets["labels"].dtype == np.uint8 and inputs["images"].dtype == np.float32

    # two workers' pipelines: each its half of every global batch of the same sequence
    halves = [_stream_batches(entries, seed, 1, lambda w=w: D.pipeline_positions(start_step, batch, w, 2), 4)
              for w in range(2)]
    for step in range(4):
        for worker in range(2):
            np.testing.assert_array_equal(halves[worker][step][0]["images"][0],
                                          expected[step * batch + worker][0]["images"])


def test_streaming_input_names_a_damaged_file(tmp_path):
    folder = make_tiny_dataset(tmp_path / "data")
    entries = _entries(folder)
    pathlib.Path(entries[0]["_path"]).write_bytes(b"not a zip")
    import tensorflow as tf

    with pytest.raises(tf.errors.OpError, match="cannot read the sample") as raised:
        _stream_batches(entries, 0, 3, lambda: D.pipeline_positions(0, 3), 1)
    error = stream.input_error(raised.value)  # what train() raises: the typed one-line error
    assert isinstance(error, InputFileError)
    assert str(error).startswith(entries[0]["_path"]) and "cannot read the sample" in str(error)
    assert stream.input_error(tf.errors.UnknownError(None, None, "socket closed")) is None


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arguments, message", [
    (["--cluster", "a:1,b:2", "--task-index", "2"], "--task-index must be 0..1"),
    (["--cluster", "a:1,b:2"], "--cluster needs --task-index"),
    (["--task-index", "0"], "--task-index needs --cluster"),
    (["--batch-size", "2", "--per-replica-batch", "1"], "not both"),
])
def test_train_command_refuses_bad_cluster_options(tmp_path, capsys, arguments, message):
    from inference import cli

    status = cli.run(["train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), *arguments])
    assert status == 2 and message in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Mixed precision
# --------------------------------------------------------------------------------------------

def test_mixed_float16_training_step_runs_on_cpu(tmp_path, data_dir, atlas):
    import keras

    before = keras.config.dtype_policy().name
    settings = dataclasses.replace(SETTINGS, steps=2, mixed_precision="on", validate_every=2, val_limit=1)
    reports = []
    result = T.train(TINY, data_dir, tmp_path, train_config=settings, atlas=atlas, progress=reports.append)
    assert result.steps_done == 2
    assert all(np.isfinite(r.losses["total"]) for r in reports if r.losses)
    import tensorflow as tf

    names = tf.train.load_checkpoint(str(tmp_path / "checkpoints")).get_variable_to_shape_map()
    # the optimizer was a LossScaleOptimizer (float16 gradients are scaled): its inner Adam is saved
    assert any(name.startswith("optimizer/inner_optimizer/") for name in names)
    assert keras.config.dtype_policy().name == before  # the global policy is restored


# --------------------------------------------------------------------------------------------
# Real worker processes
# --------------------------------------------------------------------------------------------

def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _start(tmp_path, out, steps, name, extra):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(WORKER.parent.parent), str(WORKER.parent)]),
           "CUDA_VISIBLE_DEVICES": ""}
    env.pop("TF_CONFIG", None)
    log = open(tmp_path / f"{name}.log", "w")
    command = [sys.executable, str(WORKER), "--data", str(tmp_path / "data"), "--out", str(out),
               "--atlas", str(tmp_path / "atlas.npz"), "--steps", str(steps), *extra]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, text=True)
    _STARTED.append(process)
    return process


def _workers(tmp_path, out, steps, tag, **options):
    ports = _free_ports(2)
    cluster = ",".join(f"127.0.0.1:{p}" for p in ports)
    extra = [item for key, value in options.items() for item in (f"--{key.replace('_', '-')}", str(value))]
    return [_start(tmp_path, out, steps, f"{tag}-w{i}", ["--cluster", cluster, "--task-index", str(i), *extra])
            for i in range(2)]


def _finish(process, tmp_path, name, timeout=900):
    process.wait(timeout=timeout)
    text = (tmp_path / f"{name}.log").read_text()
    return process.returncode, text


def _result(text):
    return json.loads([line for line in text.splitlines() if line.startswith("{")][-1])


@pytest.fixture()
def worker_data(tmp_path):
    make_tiny_dataset(tmp_path / "data")
    hu, labels = _ellipsoid(TINY)
    np.savez(tmp_path / "atlas.npz", volume=hu, labels=labels)
    yield tmp_path
    for process in _STARTED:  # a failed test leaves no worker behind
        if process.poll() is None:
            process.kill()
            process.wait()
    _STARTED.clear()


_STARTED: list[subprocess.Popen] = []


@pytest.mark.slow
@pytest.mark.timeout(1800)  # six TensorFlow processes; minutes on a busy 2-core machine
def test_two_workers_train_to_the_weights_of_one_process(worker_data):
    tmp_path = worker_data
    # The reference: one process, two replicas (logical CPUs) of batch 1 = the same global batch
    # 2 with the same per-replica batch normalisation as two workers of batch 1 each.
    single = _start(tmp_path, tmp_path / "single", 4, "single", ["--local-replicas", "2"])
    workers = _workers(tmp_path, tmp_path / "multi", 4, "multi")
    outcomes = [_finish(p, tmp_path, name) for p, name in zip([single, *workers],
                                                              ["single", "multi-w0", "multi-w1"])]
    for status, text in outcomes:
        assert status == 0, text[-3000:]
        assert _result(text) == {"steps": 4, "resumed_from_step": 0, "batch_size": 2}
    import tensorflow as tf

    a = tf.train.load_checkpoint(str(tmp_path / "single" / "checkpoints"))
    b = tf.train.load_checkpoint(str(tmp_path / "multi" / "checkpoints"))
    names = sorted(a.get_variable_to_shape_map())
    assert names == sorted(b.get_variable_to_shape_map())
    compared = 0
    for name in names:
        if "save_counter" in name or name.startswith(("_CHECKPOINTABLE_OBJECT_GRAPH", "wall_time")):
            continue
        np.testing.assert_allclose(a.get_tensor(name), b.get_tensor(name), rtol=1e-4, atol=1e-5, err_msg=name)
        compared += 1
    assert compared > 50
    # only the chief wrote: one run folder, with the model and logs; no worker scratch left over
    assert (tmp_path / "multi" / "model" / "hipatlas-tiny.keras").is_file()
    assert sorted(p.name for p in (tmp_path / "multi" / "checkpoints").glob("ckpt-*.index")) == \
        ["ckpt-2.index", "ckpt-4.index"]
    assert len(list((tmp_path / "multi" / "logs" / "train").glob("events.out.tfevents.*"))) == 1


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_killed_worker_is_reported_and_the_run_resumes_from_the_last_checkpoint(worker_data):
    tmp_path = worker_data
    out = tmp_path / "run"
    chief, worker = _workers(tmp_path, out, 200, "first")
    deadline = time.monotonic() + 600
    while not (out / "checkpoints" / "ckpt-2.index").is_file():
        assert chief.poll() is None and worker.poll() is None, "a worker ended before the first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint within 10 minutes"
        time.sleep(0.2)
    worker.send_signal(signal.SIGKILL)
    status, text = _finish(chief, tmp_path, "first-w0", timeout=300)
    worker.wait()
    assert status == 2, text[-3000:]
    message = [line for line in text.splitlines() if line.startswith("error:")][-1]
    assert "another worker is gone or unreachable" in message and "restart every worker" in message, message
    assert "task:1" in message and "{{" not in message, message  # names the lost worker, no op names
    import tensorflow as tf

    last = int(pathlib.Path(tf.train.latest_checkpoint(str(out / "checkpoints"))).name.split("-")[1])
    assert last >= 2 and f"ckpt-{last}" in message

    resumed = _workers(tmp_path, out, last + 2, "again")
    for process, name in zip(resumed, ["again-w0", "again-w1"]):
        status, text = _finish(process, tmp_path, name)
        assert status == 0, text[-3000:]
        assert _result(text)["resumed_from_step"] == last and _result(text)["steps"] == last + 2
