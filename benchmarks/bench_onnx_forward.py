"""The exported network's forward pass alone, per ONNX Runtime execution provider and thread count.

Two modes:

    # here, with HipAtlas installed: run the demo through the pipeline once and save the
    # network's inputs (plain arrays, no pickle) next to nothing else
    python benchmarks/bench_onnx_forward.py --dump-inputs work/demo_inputs.npz

    # anywhere numpy and onnxruntime are importable (no HipAtlas, no TensorFlow needed):
    python benchmarks/bench_onnx_forward.py --onnx resources/models/compact-v2/hipatlas-compact.onnx \
        --inputs work/demo_inputs.npz --json

The second mode is what runs on a lent GPU machine, whose image has ONNX Runtime but neither
TensorFlow nor SimpleITK. It times the first call (session creation excluded) and the median of
``--repeats`` warm calls for every provider ONNX Runtime offers there (CUDA when its build has
it; the CPU provider with 1, 2 and all cores, or the counts given with ``--threads``), and
checks each provider's outputs against the CPU provider's: the largest absolute difference of the
field ``psi`` in voxels and the Dice of the warped labels thresholded at 0.5. ``--gridsample``
adds how ONNX Runtime's GridSample alone uses threads (it parallelises over channels; our
samplers have one); ``--profile RUNS`` adds ONNX Runtime's own profile by operator type.
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time

import numpy as np

OUTPUTS = ("affine_params", "psi", "warped_labels")


def dump_inputs(path: pathlib.Path, model: str | None = None) -> None:
    """Register the demo once with the ONNX backend of ``model`` (default: the shipped model) and
    save the inputs its network received."""
    if __package__ in (None, ""):
        sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    import tempfile

    from inference import backends, pipeline
    from inference.resources import demo_dir

    net = backends.load_backend(model, "onnx")
    captured = {}
    real_run = net.run

    def capturing_run(inputs):
        captured.update({name: np.asarray(value, np.float32) for name, value in inputs.items()})
        return real_run(inputs)

    net.run = capturing_run
    with tempfile.TemporaryDirectory(prefix="bench_onnx_forward_") as out:
        for _ in pipeline.register_case(demo_dir(), pathlib.Path(out) / "out", model=net):
            pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, **captured)
    os.replace(tmp, path)
    print(f"saved {', '.join(f'{k}{tuple(v.shape)}' for k, v in captured.items())} to {path}")


def gpu_name() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def time_session(ort, onnx_path: pathlib.Path, feed: dict, provider: str, threads: int | None,
                 repeats: int) -> tuple[dict, dict]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    start = time.perf_counter()
    session = ort.InferenceSession(str(onnx_path), options, providers=[provider])
    create_s = time.perf_counter() - start
    start = time.perf_counter()
    values = session.run(list(OUTPUTS), feed)
    first_s = time.perf_counter() - start
    warm = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(list(OUTPUTS), feed)
        warm.append(time.perf_counter() - start)
    figures = {"provider": provider, "threads": threads or "default",
               "providers_used": session.get_providers(), "session_create_s": round(create_s, 4),
               "first_call_s": round(first_s, 4), "warm_median_s": round(statistics.median(warm), 4),
               "warm_min_s": round(min(warm), 4)}
    return figures, dict(zip(OUTPUTS, values))


def gridsample_threading(repeats: int, threads: int = 2) -> list[dict]:
    """How ONNX Runtime's 5-D GridSample uses threads: one (Y = X at a grid of 1.15 M points in a
    96 x 64 x 96 volume) against two channels on the same grid, and against the same grid split
    into a batch of two, each with 1 and ``threads`` intra-op threads (median seconds)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    def graph(batch: int, channels: int, depth_out: int) -> bytes:
        x = helper.make_tensor_value_info("X", TensorProto.FLOAT, [batch, channels, 96, 64, 96])
        g = helper.make_tensor_value_info("G", TensorProto.FLOAT, [batch, depth_out, 112, 128, 3])
        y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)
        node = helper.make_node("GridSample", ["X", "G"], ["Y"], mode="linear", padding_mode="zeros",
                                align_corners=1)
        model = helper.make_model(helper.make_graph([node], "gridsample", [x, g], [y]),
                                  opset_imports=[helper.make_opsetid("", 20)])
        model.ir_version = 9  # the oldest that has opset 20: older ONNX Runtimes refuse newer IR versions
        return model.SerializeToString()

    rng = np.random.default_rng(0)
    grid = rng.uniform(-1.0, 1.0, (1, 80, 112, 128, 3)).astype(np.float32)
    cases = {"1 channel": (1, 1, 80, grid), "2 channels": (1, 2, 80, grid),
             "batch of 2 (grid split)": (2, 1, 40, grid.reshape(2, 40, 112, 128, 3))}
    rows = []
    for count in sorted({1, threads}):
        options = ort.SessionOptions()
        options.intra_op_num_threads = count
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        for name, (batch, channels, depth_out, g) in cases.items():
            session = ort.InferenceSession(graph(batch, channels, depth_out), options,
                                           providers=["CPUExecutionProvider"])
            feed = {"X": rng.random((batch, channels, 96, 64, 96), dtype=np.float32), "G": g}
            session.run(None, feed)
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                session.run(None, feed)
                times.append(time.perf_counter() - start)
            median_s = round(statistics.median(times), 4)
            rows.append({"gridsample": name, "threads": count, "median_s": median_s})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def op_profile(onnx_path: pathlib.Path, feed: dict, runs: int, threads: int = 2) -> dict:
    """ONNX Runtime's own profile of ``runs`` warm calls (CPU, ``threads`` threads): milliseconds per
    call and node count by operator type, largest first."""
    import tempfile

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    session.run(list(OUTPUTS), feed)
    with tempfile.TemporaryDirectory(prefix="ort_profile_") as folder:
        options.enable_profiling = True
        options.profile_file_prefix = str(pathlib.Path(folder) / "profile")
        session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        for _ in range(runs):
            session.run(list(OUTPUTS), feed)
        events = json.loads(pathlib.Path(session.end_profiling()).read_text())
    time_us: dict[str, float] = {}
    count: dict[str, int] = {}
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            op = event["args"]["op_name"]
            time_us[op] = time_us.get(op, 0.0) + event["dur"]
            count[op] = count.get(op, 0) + 1
    ops = sorted(time_us, key=time_us.get, reverse=True)
    return {"threads": threads, "runs": runs, "total_ms": round(sum(time_us.values()) / runs / 1e3, 1),
            "ops": [{"op": op, "ms": round(time_us[op] / runs / 1e3, 1), "nodes": count[op] // runs} for op in ops]}


def agreement(reference: dict, other: dict) -> dict:
    a = reference["warped_labels"] > 0.5
    b = other["warped_labels"] > 0.5
    dice = 2.0 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)
    return {"psi_max_abs_diff_vox": float(np.abs(reference["psi"] - other["psi"]).max()),
            "labels_dice_to_cpu": round(float(dice), 6)}


def bench(onnx_path: pathlib.Path, inputs_path: pathlib.Path, repeats: int,
          threads: list[int] | None = None) -> dict:
    import onnxruntime as ort

    with np.load(inputs_path, allow_pickle=False) as data:
        feed = {name: data[name].astype(np.float32) for name in data.files}
    available = ort.get_available_providers()
    result = {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
              "onnxruntime": ort.__version__, "available_providers": available, "gpu": gpu_name(),
              "model": onnx_path.name, "runs": []}
    cpu_counts = sorted(set(threads or (1, 2, os.cpu_count() or 1)))
    reference = None
    for count in cpu_counts:
        figures, values = time_session(ort, onnx_path, feed, "CPUExecutionProvider", count, repeats)
        reference = reference or values
        figures.update(agreement(reference, values))
        result["runs"].append(figures)
        print(json.dumps(figures), flush=True)
    for provider in ("CUDAExecutionProvider", "TensorrtExecutionProvider"):
        if provider not in available:
            continue
        try:
            figures, values = time_session(ort, onnx_path, feed, provider, None, repeats)
        except Exception as error:  # noqa: BLE001 - a provider that fails is a finding, not a crash
            figures = {"provider": provider, "error": str(error)[:500]}
        else:
            figures.update(agreement(reference, values))
        result["runs"].append(figures)
        print(json.dumps(figures), flush=True)
    return result


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dump-inputs", metavar="NPZ", type=pathlib.Path,
                        help="register the demo here and save the network's inputs to NPZ, then stop")
    parser.add_argument("--model",
                        help="with --dump-inputs: the model (.keras with its export beside it, or .onnx)")
    parser.add_argument("--onnx", type=pathlib.Path, help="the exported model (.onnx)")
    parser.add_argument("--inputs", type=pathlib.Path, help="inputs saved with --dump-inputs")
    parser.add_argument("--repeats", type=int, default=10, help="warm calls per provider (median)")
    parser.add_argument("--gridsample", action="store_true",
                        help="also time ONNX Runtime's GridSample alone: 1 or 2 channels, batch split")
    parser.add_argument("--profile", type=int, metavar="RUNS", default=0,
                        help="also ONNX Runtime's profile by operator type over RUNS calls (2 threads)")
    parser.add_argument("--threads", help="comma-separated CPU thread counts (default: 1, 2 and all cores)")
    parser.add_argument("--json", action="store_true", help="end with one line of JSON holding the figures")
    args = parser.parse_args(argv)
    if args.dump_inputs:
        dump_inputs(args.dump_inputs, args.model)
        return 0
    if not (args.onnx and args.inputs):
        parser.error("give --onnx and --inputs (or --dump-inputs)")
    try:
        threads = [int(t) for t in args.threads.split(",")] if args.threads else None
    except ValueError:
        parser.error(f"--threads takes whole numbers separated by commas, not {args.threads!r}")
    if threads is not None and (not threads or min(threads) < 1):
        parser.error(f"--threads must list counts >= 1, not {args.threads!r}")
    result = bench(args.onnx, args.inputs, max(1, args.repeats), threads)
    if args.gridsample:
        result["gridsample"] = gridsample_threading(max(1, args.repeats))
    if args.profile > 0:
        with np.load(args.inputs, allow_pickle=False) as data:
            feed = {name: data[name].astype(np.float32) for name in data.files}
        result["profile"] = op_profile(args.onnx, feed, args.profile)
        for row in result["profile"]["ops"][:6]:
            print(f"{row['op']}: {row['ms']} ms per call, {row['nodes']} nodes", flush=True)
        print(f"all operators: {result['profile']['total_ms']} ms per call", flush=True)
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
