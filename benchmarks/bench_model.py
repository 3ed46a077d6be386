"""Size, FLOPs and timings of the registration network (inference/model.py) on this machine.

Run: ``python benchmarks/bench_model.py [--json] [--repeats N] [--quick] [--paper-forward]``

Figures:

* ``<preset>_params`` / ``<preset>_gflops``: trainable parameters and analytic GFLOPs of one
  forward pass at batch 1 (2 x multiply-adds of the convolutions and dense layers, see
  :func:`inference.model.estimate_flops`; the paper reports 722 GFLOPs for its network).
* ``compact_train_step_s``: one optimisation step (forward, loss, backward, Adam) of the compact
  preset at batch 1 inside a ``tf.function`` (no global XLA; the sampling layers compile their
  own kernels), median after a warm-up step; ``compact_first_step_s`` is the warm-up step
  (tracing + XLA compilation).
* ``compact_forward_s``: one inference forward pass (``training=False``).
* ``paper_forward_s`` (``--paper-forward``): one inference forward pass of the paper preset.

The atlas is a synthetic ellipsoid (timings do not depend on its content); the two views are an
AP and a lateral C-arm view (SDD 1000 mm, SID 925 mm) whose detectors cover the grid. The
machine is shared: wall times taken while others work are pessimistic; CPU times are steadier.
"""

from __future__ import annotations

import os
import resource
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


def bench_compact(report: BenchReport, repeats: int) -> None:
    config = M.COMPACT
    atlas, inputs, fixed = _scene(config)
    keras.utils.set_random_seed(0)
    model = M.build_model(config, atlas)
    optimizer = keras.optimizers.Adam(1e-4)
    optimizer.build(model.trainable_variables)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            terms = M.registration_losses(config, model(inputs, training=True), fixed)
        grads = tape.gradient(terms["total"], model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)
        return terms["total"]

    start = time.perf_counter()
    step().numpy()
    report.add("compact_first_step_s", time.perf_counter() - start, "s",
               "compact first train step (trace + XLA compile)")
    report.add_timing("compact_train_step_s", lambda: step().numpy(), repeats,
                      "compact train step, batch 1")
    forward = tf.function(lambda: model(inputs, training=False)["warped"])
    report.add_timing("compact_forward_s", lambda: forward().numpy(), repeats, "compact forward")


def bench_paper_forward(report: BenchReport, repeats: int) -> None:
    config = M.PAPER
    atlas, inputs, _ = _scene(config)
    model = M.build_model(config, atlas)
    forward = tf.function(lambda: model(inputs, training=False)["warped"])
    report.add_timing("paper_forward_s", lambda: forward().numpy(), repeats, "paper forward")


def main(argv=None) -> dict:
    def extra(parser):
        parser.add_argument("--paper-forward", action="store_true",
                            help="also time a forward pass of the paper preset (slow, ~4 GB)")

    args = parse_args(argv, description=__doc__.splitlines()[0], extra=extra)
    repeats = 2 if args.quick else args.repeats
    report = BenchReport("model", json_output=args.json)
    report.note(f"TensorFlow {tf.__version__}, {os.cpu_count()} CPU cores, load average "
                f"{os.getloadavg()[0]:.1f}; median of {repeats}")
    bench_sizes(report)
    bench_compact(report, repeats)
    if args.paper_forward:
        bench_paper_forward(report, max(1, min(repeats, 2)))
    report.add("peak_rss_mb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, "MB",
               "peak resident memory")
    return report.finish()


if __name__ == "__main__":
    main()
