"""Size, FLOPs, timings and training memory of the registration network (inference/model.py).

Run: ``python benchmarks/bench_model.py [--json] [--repeats N] [--quick] [--no-paper]``

Figures (the issue's keys first):

* ``compact_infer_s`` / ``paper_infer_s``: inference per case, i.e. one forward pass
  (``training=False``) through the traced graph (:func:`inference.registration.network_function`,
  as ``hipatlas register`` runs cohorts), median after a warm-up call; ``<preset>_infer_eager_s``:
  the same pass as an eager Keras call (how a single case runs: no whole-model tracing);
  ``<preset>_first_infer_<mode>_s``: the warm-up calls (tracing + XLA compilation).
* ``paper_gflops`` / ``compact_gflops`` and ``<preset>_params``: analytic GFLOPs of one forward
  pass at batch 1 (2 x multiply-adds of the convolutions and dense layers, see
  :func:`inference.model.estimate_flops`; the paper reports 722 GFLOPs) and trainable parameters.
* ``paper_train_peak_gb``: peak resident memory (GiB) of a process that builds the paper preset
  and runs training steps (forward, loss, backward, Adam) at batch 1, measured in its own
  process (``ru_maxrss``; includes the TensorFlow runtime, about 0.6 GB, and the allocator's
  unused reserve) and set up as ``hipatlas train`` runs it: the preset's gradient checkpointing
  (``ModelConfig.recompute``) with one op at a time (:func:`inference.train.run_ops_one_at_a_time`).
  ``paper_train_tensor_peak_gb`` is TensorFlow's own peak of live tensors in that process. The
  paper reports 18.7 GB of GPU memory for its training at batch 1. When the full size cannot
  run here, it is extrapolated from reduced sizes (``paper_train_peak_estimated``).
* ``compact_train_step_s``: one optimisation step of the compact preset at batch 1 inside a
  ``tf.function`` (no global XLA), median after a warm-up step; ``compact_first_step_s`` is the
  warm-up step.

The atlas is a synthetic ellipsoid (timings do not depend on its content); the two views are an
AP and a lateral C-arm view (SDD 1000 mm, SID 925 mm) whose detectors cover the grid. The
machine may be shared: wall times taken while others work are pessimistic.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from benchmarks._common import BenchReport, parse_args  # noqa: E402
from inference import geometry  # noqa: E402
from inference import model as M  # noqa: E402


def _scene(config: M.ModelConfig):
    """Synthetic atlas, model inputs and fixed volume for ``config``'s grid."""
    z, y, x = np.mgrid[tuple(slice(0, s) for s in config.shape_zyx)].astype(np.float32)
    sz, sy, sx = config.shape_zyx
    r = np.sqrt(((z - sz / 2) / (0.35 * sz)) ** 2 + ((y - sy / 2) / (0.25 * sy)) ** 2
                + ((x - sx / 2) / (0.2 * sx)) ** 2)
    labels = (r < 1).astype(np.uint8)
    hu = np.where(labels > 0, 700.0, -1000.0).astype(np.float32)
    spacing = np.array(config.spacing_xyz_mm)
    i2w = np.diag(list(spacing) + [1.0])
    i2w[:3, 3] = -spacing * (np.array(config.shape_zyx[::-1]) - 1) / 2
    rows, cols = config.detector_hw
    extent_mm = spacing * np.array(config.shape_zyx[::-1])
    # pixels large enough that the magnified grid (x1.08) fits the detector in both views
    pixel_mm = 1.2 * max(extent_mm[2] / rows, max(extent_mm[0], extent_mm[1]) / cols)
    views = [geometry.projection_matrix(geometry.CArmView(
        sdd_mm=1000.0, sid_mm=925.0, lao_deg=angle, cranial_deg=0.0, rows=rows, cols=cols,
        pixel_mm=pixel_mm)) for angle in (0.0, 90.0)]
    rng = np.random.default_rng(0)
    images = rng.random((1, 2, rows, cols)).astype(np.float32)
    inputs = {"images": tf.constant(images), "masks": tf.constant((images > 0.3).astype(np.float32)),
              "projection": tf.constant(np.stack(views)[None].astype(np.float32)),
              "index_to_world": tf.constant(i2w[None].astype(np.float32))}
    fixed = M.femur_intensity(np.roll(hu, 2, axis=0), np.roll(labels, 2, axis=0))[None, ..., None]
    return {"volume": hu, "labels": labels}, inputs, tf.constant(fixed)


def bench_sizes(report: BenchReport) -> None:
    for name, config in M.PRESETS.items():
        model = M.build_model(config)
        report.add(f"{name}_params", M.count_params(model)["trainable"], "", f"{name} trainable parameters")
        flops = M.estimate_flops(config)
        report.add(f"{name}_gflops", flops["total"] / 1e9, "GFLOP", f"{name} forward, batch 1")
        for part in ("affine", "local_encoder", "decoder", "velocity"):
            report.add(f"{name}_gflops_{part}", flops[part] / 1e9, "GFLOP")
        del model


def _train_step_fn(config, model, inputs, fixed):
    optimizer = keras.optimizers.Adam(1e-4)
    optimizer.build(model.trainable_variables)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            terms = M.registration_losses(config, model(inputs, training=True), fixed)
        grads = tape.gradient(terms["total"], model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)
        return terms["total"]

    return step


def _bench_inference(report: BenchReport, name: str, config, model, inputs, repeats: int) -> None:
    from inference.registration import network_function

    for mode, graph in (("eager", False), ("graph", True)):
        forward = network_function(model, graph=graph)

        def infer():
            return np.asarray(forward(inputs)["warped_labels"])

        start = time.perf_counter()
        infer()
        report.add(f"{name}_first_infer_{mode}_s", time.perf_counter() - start, "s",
                   f"{name} first inference, {mode} (tracing + XLA compilation)")
        key = f"{name}_infer_s" if graph else f"{name}_infer_eager_s"
        report.add_timing(key, infer, repeats, f"{name} inference per case, {mode}")


def bench_compact(report: BenchReport, repeats: int) -> None:
    config = M.COMPACT
    atlas, inputs, fixed = _scene(config)
    keras.utils.set_random_seed(0)
    model = M.build_model(config, atlas)
    _bench_inference(report, "compact", config, model, inputs, repeats)
    step = _train_step_fn(config, model, inputs, fixed)
    start = time.perf_counter()
    step().numpy()
    report.add("compact_first_step_s", time.perf_counter() - start, "s",
               "compact first train step (trace + XLA compile)")
    report.add_timing("compact_train_step_s", lambda: step().numpy(), repeats,
                      "compact train step, batch 1")


def bench_paper_inference(report: BenchReport, repeats: int) -> None:
    config = M.PAPER
    atlas, inputs, _ = _scene(config)
    model = M.build_model(config, atlas)
    _bench_inference(report, "paper", config, model, inputs, repeats)


#: Reduced paper configs for the memory estimate when the full one does not fit: detector rows
#: and grid depth (the craniocaudal axis, which maps to detector rows in both views) scaled
#: together by about the given fraction; the other sizes and all widths stay the paper's.
PAPER_SCALES = {0.2: (32, 48), 0.4: (64, 80), 0.6: (96, 112)}
#: Below this much free memory the full paper training step is not attempted (with gradient
#: checkpointing it measured 12.7 GB resident here; without, it passed 22.9 GB and was killed on
#: this 24 GB machine). The child is stopped when it comes within the margin of the free memory
#: it started with, and the figure is then estimated from reduced sizes.
FULL_PAPER_TRAIN_MIN_GB = 16.0
FULL_PAPER_TRAIN_MARGIN_GB = 1.5


def _paper_config(scale: float | None):
    if scale is None:
        return M.PAPER
    rows, depth = PAPER_SCALES[scale]
    return dataclasses.replace(M.PAPER, detector_hw=(rows, M.PAPER.detector_hw[1]),
                               shape_zyx=(depth,) + tuple(M.PAPER.shape_zyx[1:]))


def paper_train_child(steps: int, scale: float | None) -> None:
    """In a process of its own: paper-preset training steps at batch 1; print the peak RSS."""
    from inference.train import run_ops_one_at_a_time

    config = _paper_config(scale)
    one_at_a_time = run_ops_one_at_a_time(config)  # as ``hipatlas train`` runs it
    atlas, inputs, fixed = _scene(config)
    model = M.build_model(config, atlas)
    step = _train_step_fn(config, model, inputs, fixed)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = float(step().numpy())
        times.append(time.perf_counter() - start)
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0 ** 2
    tensors_gb = tf.config.experimental.get_memory_info("CPU:0")["peak"] / 1024.0 ** 3
    print(json.dumps({"peak_gb": peak_gb, "tensor_peak_gb": tensors_gb, "step_s": times, "loss": loss,
                      "recompute": config.recompute, "ops_one_at_a_time": one_at_a_time}))


def _proc_gib(path: str, key: str, missing: float) -> float:
    """A ``key: N kB`` line of a /proc file in GiB (``missing`` where there is none, e.g. not Linux)."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) / 1024.0 ** 2
    except (OSError, ValueError):
        pass
    return missing


def _run_child(steps: int, scale: float | None, limit_gb: float = float("inf")) -> dict | None:
    """Run :func:`paper_train_child` in a fresh process; stopped (None) past ``limit_gb`` resident."""
    command = [sys.executable, str(Path(__file__).resolve()), "--paper-train-child", str(steps)]
    if scale is not None:
        command += ["--paper-train-scale", str(scale)]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}) as child:
        while child.poll() is None:
            # stop it before the machine starts swapping
            if _proc_gib(f"/proc/{child.pid}/status", "VmRSS", 0.0) > limit_gb:
                child.kill()
                child.wait()
                return None
            time.sleep(0.2)
        output = child.stdout.read()
    if child.returncode != 0:
        return None
    return json.loads(output.strip().splitlines()[-1])


def _available_gb() -> float:
    return _proc_gib("/proc/meminfo", "MemAvailable", float("inf"))


def bench_paper_training(report: BenchReport, steps: int) -> None:
    available = _available_gb()
    child = None
    if available >= FULL_PAPER_TRAIN_MIN_GB:
        child = _run_child(steps, None, limit_gb=available - FULL_PAPER_TRAIN_MARGIN_GB)
    if child is not None:
        report.add("paper_train_peak_gb", child["peak_gb"], "GiB",
                   "paper preset training process, batch 1 (the paper: 18.7 GB on its GPU)")
        report.add("paper_train_tensor_peak_gb", child["tensor_peak_gb"], "GiB",
                   "  of which TensorFlow's own peak of live tensors")
        report.add("paper_train_recompute", child["recompute"], "", "  gradient checkpointing")
        report.add("paper_train_ops_one_at_a_time", child["ops_one_at_a_time"], "", "  inter-op threads = 1")
        report.add("paper_train_step_s", child["step_s"][-1], "s", "paper train step, batch 1")
        return
    # Too big for this machine: measure reduced sizes and extrapolate linearly in the scale.
    report.note(f"the full paper training step was not measured ({available:.1f} GiB free at the start, or "
                "it came too close to that); estimating from reduced detector rows and grid depth")
    fractions, peaks = [], []
    for scale, (rows, depth) in PAPER_SCALES.items():
        child = _run_child(steps, scale)
        if child is None:
            report.note(f"reduced paper training at scale {scale} failed")
            continue
        fraction = rows / M.PAPER.detector_hw[0]
        fractions.append(fraction)
        peaks.append(child["peak_gb"])
        report.add(f"paper_train_peak_gb_at_{scale}", child["peak_gb"], "GiB",
                   f"paper training, detector rows {rows}, grid depth {depth}")
    if len(peaks) >= 2:
        slope, intercept = np.polyfit(fractions, peaks, 1)
        residual = float(np.max(np.abs(np.polyval([slope, intercept], fractions) - peaks)))
        report.add("paper_train_peak_gb", float(slope + intercept), "GiB",
                   "paper training, batch 1: linear extrapolation to full size (the paper: 18.7 GB)")
        report.add("paper_train_peak_fit_residual_gb", residual, "GiB", "largest residual of that fit")
        report.add("paper_train_peak_estimated", True, "", "paper_train_peak_gb is an extrapolation")


def main(argv=None) -> dict:
    def extra(parser):
        parser.add_argument("--no-paper", action="store_true",
                            help="skip the paper preset (its inference needs ~5 GB and its training ~GBs more)")
        parser.add_argument("--paper-train-steps", type=int, default=2,
                            help="paper training steps in the memory measurement (default 2)")
        parser.add_argument("--paper-train-child", type=int, help=argparse.SUPPRESS)
        parser.add_argument("--paper-train-scale", type=float, help=argparse.SUPPRESS)

    args = parse_args(argv, description=__doc__.splitlines()[0], extra=extra)
    if args.paper_train_child:
        paper_train_child(args.paper_train_child, args.paper_train_scale)
        return {}
    repeats = 2 if args.quick else args.repeats
    report = BenchReport("model", json_output=args.json, report=args.report)
    report.note(f"TensorFlow {tf.__version__}, {os.cpu_count()} CPU cores, load average "
                f"{os.getloadavg()[0]:.1f}; median of {repeats}")
    if not args.no_paper:
        # first, while this process is still small: the training child needs all the memory
        bench_paper_training(report, max(1, args.paper_train_steps))
    bench_sizes(report)
    bench_compact(report, repeats)
    if not args.no_paper:
        bench_paper_inference(report, max(1, min(repeats, 2)))
    report.add("peak_rss_mb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, "MB",
               "peak resident memory of this process")
    return report.finish()


if __name__ == "__main__":
    main()
