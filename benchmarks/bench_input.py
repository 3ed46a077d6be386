"""Can the streaming training input feed a training step ten times faster than this CPU's?

The issue (#19) asks the input to keep up with a step at least 10x faster than this CPU's compact
training step (a GPU's). This script measures, at batch 1 on the compact grid:

* ``stream_samples_per_s``: the streaming ``tf.data`` pipeline alone (:mod:`inference.data.stream`:
  parallel file reads and npz decodes, prefetch), as ``hipatlas train`` builds it, for ``--count``
  samples after a warm-up; ``stream_cpu_s_per_sample``: the process CPU time per sample (all
  threads), steadier than the wall clock on a shared machine; ``stream_samples_per_s_per_core``
  = 1 / that.
* ``sequential_samples_per_s``: the same samples read one after the other in Python
  (:func:`inference.train.training_examples`, the reference the stream is tested against).
* ``train_step_s`` / ``train_step_cpu_s``: one compact training step (forward, loss, backward,
  Adam; batch 1, a batch of the stream held fixed) on this machine, wall and CPU time, median of
  ``--repeats`` (skip with ``--no-step``).
* ``input_vs_10x_step``: ``stream_samples_per_s / (10 / train_step_s)``, wall clock against wall
  clock on the same machine at the same time; >= 1 means the input keeps up with a step 10x
  faster than this CPU's. On a loaded machine both sides are slowed by the other jobs.
* ``--idle-step-s S``: a step time measured on the idle machine (``benchmarks/bench_model.py``,
  ``compact_train_step_s``) to compare with: ``input_vs_10x_idle_step`` (wall-clock input rate)
  and ``input_vs_10x_idle_step_per_core`` (one core's input rate from its CPU time, the figure
  least affected by other jobs: ``S / (10 * stream_cpu_s_per_sample)``).
  ``train_step_cpu_s`` is printed but not compared: TensorFlow's threads spin while they wait,
  so on a loaded machine a step's CPU time overstates its work.

``load_average`` and ``cpu_count`` say how busy the machine was; on a loaded machine the
wall-clock figures are pessimistic, and the CPU-time ones are the figures to compare.

    python benchmarks/bench_input.py --json                        # makes a small compact data set
    python benchmarks/bench_input.py --data DATASET_DIR --count 200 --json --report docs/results/bench_input

Samples are read from the page cache after the first pass, as in training on a data set that
fits in memory; a data set larger than memory is read at the disk's speed (~1.1 MB per compact
sample). With ``isal`` installed (``pip install hipatlas[fast-input]``) samples are inflated by
ISA-L, else by zlib: ``inflate`` says which.
"""

from __future__ import annotations

import os
import pathlib
import sys
import tempfile
import time

if __package__ in (None, ""):
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks._common import BenchReport, median_times, parse_args  # noqa: E402


def _entries(data_dir: pathlib.Path) -> tuple[list[dict], dict]:
    from inference import train as T
    from inference.data.dataset import load_manifest

    manifest = load_manifest(data_dir)
    entries = [e for e in T.pooled_entries([data_dir], [manifest], "train")
               if (data_dir / e["file"]).is_file()]  # a data set still being written lists done files only
    return entries, manifest


def _rate(iterate, count: int) -> tuple[float, float]:
    """(samples per s wall, CPU s per sample) of ``iterate(count)`` after a warm-up of 4."""
    iterate(4)
    wall, cpu = time.perf_counter(), time.process_time()
    iterate(count)
    return count / (time.perf_counter() - wall), (time.process_time() - cpu) / count


def _draw(iterator):
    def take(n: int) -> None:
        for _ in range(n):
            next(iterator)

    return take


def main(argv=None) -> dict:
    def extra(parser):
        parser.add_argument("--data", type=pathlib.Path, help="a compact hipatlas data set (default: make one)")
        parser.add_argument("--samples", type=int, default=8, help="samples of the data set made without --data")
        parser.add_argument("--count", type=int, default=200, help="samples read per measurement (default 200)")
        parser.add_argument("--parallel", type=int, default=None, help="parallel reads/decodes (default autotune)")
        parser.add_argument("--no-step", action="store_true", help="do not time the compact training step")
        parser.add_argument("--zlib", action="store_true",
                            help="inflate with zlib even when isal is installed (to compare)")
        parser.add_argument("--idle-step-s", type=float, default=None,
                            help="this CPU's compact step measured when idle (bench_model.py "
                            "compact_train_step_s), for one more comparison")

    args = parse_args(argv, "training input throughput against the training step", extra)
    report = BenchReport("input", json_output=args.json, report=args.report)
    count = max(8, args.count // (4 if args.quick else 1))
    report.add("cpu_count", os.cpu_count() or 1, "", "CPU cores")
    report.add("load_average", round(os.getloadavg()[0], 2), "", "load average (1 min) at the start")
    with tempfile.TemporaryDirectory(prefix="bench-input-") as scratch:
        data_dir = args.data
        if data_dir is None:
            from inference.data.dataset import generate_dataset

            data_dir = pathlib.Path(scratch) / "data"
            report.note(f"making a compact data set of {args.samples} samples in {data_dir}")
            generate_dataset(data_dir, args.samples, "compact", workers=2)
        _measure(report, data_dir, args, count)
    report.add("load_average_end", round(os.getloadavg()[0], 2), "", "load average (1 min) at the end")
    if report.figures["load_average_end"] > report.figures["cpu_count"]:
        report.note("the machine was loaded (load average above the core count): the wall-clock figures are "
                    "pessimistic; compare the CPU-time ones, or re-run when the machine is quiet")
    return report.finish()


def _measure(report: BenchReport, data_dir: pathlib.Path, args, count: int) -> None:
    from inference import train as T
    from inference.data import dataset as ds
    from inference.data.stream import training_dataset
    from inference.distributed import pipeline_positions

    if args.zlib:
        import zlib

        ds._inflate, ds._INFLATE_ERRORS = zlib.decompress, (zlib.error,)
    entries, manifest = _entries(data_dir)
    grid = manifest["grid"]
    shape, detector = grid["shape_zyx"], manifest.get("detector_hw") or grid["detector_hw"]
    report.add("train_samples", len(entries), "", "training samples read (cycled)")
    report.add("npz_mb_per_sample", sum((data_dir / e["file"]).stat().st_size for e in entries)
               / len(entries) / 1e6, "MB")
    report.add("inflate", ds._inflate.__module__ or "zlib", "", "npz inflate")

    dataset = training_dataset([e["_path"] for e in entries], 0, 1, lambda: pipeline_positions(0, 1),
                               shape_zyx=shape, detector_hw=detector, parallel=args.parallel)
    stream = iter(dataset)
    rate, cpu = _rate(_draw(stream), count)
    report.add("stream_samples_per_s", rate, "samples/s", "streaming tf.data input alone, wall clock")
    report.add("stream_cpu_s_per_sample", cpu, "s", "streaming input, CPU time per sample")
    report.add("stream_samples_per_s_per_core", 1.0 / cpu, "samples/s", "streaming input per core of CPU time")
    batch = next(stream)
    del stream

    rate_seq, cpu_seq = _rate(_draw(T.training_examples(entries, 0)), max(8, count // 2))
    report.add("sequential_samples_per_s", rate_seq, "samples/s", "sequential Python reader, wall clock")
    report.add("sequential_cpu_s_per_sample", cpu_seq, "s", "sequential Python reader, CPU time per sample")

    if not args.no_step:
        step_s, step_cpu_s = _train_step(batch, max(3, args.repeats))
        report.add("train_step_s", step_s, "s", "compact training step, batch 1, this machine now, wall clock")
        report.add("train_step_cpu_s", step_cpu_s, "s", "compact training step, batch 1, CPU time")
        ratio = report.add("input_vs_10x_step", rate * step_s / 10.0, "",
                           "input samples/s / (10 x step samples/s), wall clock (>= 1: keeps up)")
        report.add("feeds_10x_faster_step", bool(ratio >= 1.0), "",
                   "input keeps up with a step 10x faster than this CPU's (wall clock)")
    if args.idle_step_s:
        report.add("input_vs_10x_idle_step", rate * args.idle_step_s / 10.0, "",
                   f"input samples/s (wall) / (10 / {args.idle_step_s:g} s idle step)")
        report.add("input_vs_10x_idle_step_per_core", args.idle_step_s / (10.0 * cpu), "",
                   f"one core's input samples/s (CPU time) / (10 / {args.idle_step_s:g} s idle step)")


def _train_step(batch, repeats: int) -> tuple[float, float]:
    """Median wall and CPU time of the trainer's compact training step (forward, loss, backward,
    Adam) on one fixed batch of the stream."""
    import keras
    import tensorflow as tf

    from inference import model as M
    from inference.data.atlas import load_atlas

    config = M.COMPACT
    keras.utils.set_random_seed(0)
    model = M.build_model(config, load_atlas(config.grid))
    optimizer = keras.optimizers.Adam(1e-4)
    optimizer.build(model.trainable_variables)
    inputs, targets = batch

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            terms = M.registration_losses(config, model(inputs, training=True), targets["fixed"],
                                          targets["labels"])
        optimizer.apply(tape.gradient(terms["total"], model.trainable_variables), model.trainable_variables)
        return terms["total"]

    return median_times(lambda: step().numpy(), repeats, warmup=1)


if __name__ == "__main__":
    main()
