"""Throughput of the training input: can the streaming ``tf.data`` pipeline feed a GPU?

Figures (batch 1, compact grid unless the data set says otherwise):

* ``stream_samples_per_s``: the streaming pipeline alone (:mod:`inference.data.stream`: parallel
  file reads and npz decodes, prefetch), as ``hipatlas train`` builds it, after a warm-up batch;
  ``stream_cpu_s_per_sample`` is the process CPU time per sample (steadier on a shared machine;
  ``stream_samples_per_s_per_core`` = 1 / that).
* ``sequential_samples_per_s``: the same samples read one after the other in Python
  (:func:`inference.train.training_examples`, the reader the trainer used before).
* ``train_step_s`` (``--with-step``): one compact training step at batch 1 on this machine, in
  the trainer's own loop (``benchmarks/bench_model.py`` measures the same step on a fixed batch).
* ``gpu_step_s_fed``: the step time the pipeline keeps up with (1 / samples per s at batch 1);
  ``feeds_10x_faster_step`` says whether that is at most a tenth of this CPU's idle step
  (``--cpu-step-s``, default 0.46 s from ``bench_model.py``), in wall-clock samples/s.

    python benchmarks/bench_input.py --data DATASET_DIR --json
    python benchmarks/bench_input.py --samples 8 --json     # makes a small compact data set first

Samples are read from the page cache after the first epoch, as in training on a data set that
fits in memory; a data set larger than memory is read at the disk's speed (~1.1 MB per compact
sample).
"""

from __future__ import annotations

import pathlib
import sys
import tempfile
import time

if __package__ in (None, ""):
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks._common import BenchReport, parse_args  # noqa: E402


def _entries(data_dir: pathlib.Path) -> tuple[list[dict], dict]:
    from inference import train as T
    from inference.data.dataset import load_manifest

    manifest = load_manifest(data_dir)
    entries = [e for e in T.pooled_entries([data_dir], [manifest], "train")
               if (data_dir / e["file"]).is_file()]  # a data set still being written lists done files only
    return entries, manifest


def _rate(iterate, count: int) -> tuple[float, float]:
    """(samples per s wall, CPU s per sample) of ``iterate(count)`` after a warm-up of 2."""
    iterate(2)
    wall, cpu = time.perf_counter(), time.process_time()
    iterate(count)
    return count / (time.perf_counter() - wall), (time.process_time() - cpu) / count


def main(argv=None) -> dict:
    def extra(parser):
        parser.add_argument("--data", type=pathlib.Path, help="a compact hipatlas data set (default: make one)")
        parser.add_argument("--samples", type=int, default=8, help="samples of the data set made without --data")
        parser.add_argument("--count", type=int, default=200, help="samples read per measurement")
        parser.add_argument("--parallel", type=int, default=None, help="parallel reads/decodes (default autotune)")
        parser.add_argument("--with-step", action="store_true", help="also time the compact training step")
        parser.add_argument("--cpu-step-s", type=float, default=0.46,
                            help="this CPU's compact step when idle, to compare with (default 0.46 s, "
                            "benchmarks/bench_model.py compact_train_step_s); a step measured on a busy "
                            "machine would flatter the input")

    args = parse_args(argv, "training input throughput", extra)
    report = BenchReport("input", json_output=args.json)
    count = max(4, args.count // (4 if args.quick else 1))
    with tempfile.TemporaryDirectory(prefix="bench-input-") as scratch:
        data_dir = args.data
        if data_dir is None:
            from inference.data.dataset import generate_dataset

            data_dir = pathlib.Path(scratch) / "data"
            report.note(f"making a compact data set of {args.samples} samples in {data_dir}")
            generate_dataset(data_dir, args.samples, "compact", workers=2)
        entries, manifest = _entries(data_dir)
        from inference.distributed import pipeline_positions
        from inference.data.stream import training_dataset
        from inference import train as T

        grid = manifest["grid"]
        shape, detector = grid["shape_zyx"], manifest.get("detector_hw") or grid["detector_hw"]
        report.add("train_samples", len(entries), "", "training samples read (cycled)")
        report.add("npz_mb_per_sample", sum((data_dir / e["file"]).stat().st_size for e in entries)
                   / len(entries) / 1e6, "MB")

        dataset = training_dataset([e["_path"] for e in entries], 0, 1, lambda: pipeline_positions(0, 1),
                                   shape_zyx=shape, detector_hw=detector, parallel=args.parallel)
        stream_iter = iter(dataset)

        def stream(n):
            for _ in range(n):
                next(stream_iter)

        rate, cpu = _rate(stream, count)
        report.add("stream_samples_per_s", rate, "samples/s", "streaming tf.data input alone")
        report.add("stream_cpu_s_per_sample", cpu, "s", "CPU time per sample, streaming")
        report.add("stream_samples_per_s_per_core", 1.0 / cpu, "samples/s", "streaming, per core of CPU time")
        sequential_iter = T.training_examples(entries, 0)

        def sequential(n):
            for _ in range(n):
                next(sequential_iter)

        rate_seq, cpu_seq = _rate(sequential, max(4, count // 2))
        report.add("sequential_samples_per_s", rate_seq, "samples/s", "sequential Python reader")
        report.add("sequential_cpu_s_per_sample", cpu_seq, "s")

        cpu_step = args.cpu_step_s
        if args.with_step:
            _train_step(report, dataset, max(3, args.repeats))
        report.add("gpu_step_s_fed", 1.0 / rate, "s", "shortest batch-1 step the input keeps up with")
        report.add("cpu_step_s_compared", cpu_step, "s", "this CPU's compact step used for the comparison")
        report.add("feeds_10x_faster_step", bool(1.0 / rate <= cpu_step / 10.0), "",
                   "input keeps up with a step 10x faster than the CPU's")
    return report.finish()


def _train_step(report: BenchReport, dataset, repeats: int) -> float:
    """Median time of compact training steps (the trainer's step: forward, loss, backward, Adam)
    on batches from ``dataset``."""
    import statistics

    import keras
    import tensorflow as tf

    from inference import model as M
    from inference.data.atlas import load_atlas

    config = M.COMPACT
    keras.utils.set_random_seed(0)
    model = M.build_model(config, load_atlas(config.grid))
    optimizer = keras.optimizers.Adam(1e-4)
    optimizer.build(model.trainable_variables)

    @tf.function
    def step(inputs, targets):
        with tf.GradientTape() as tape:
            terms = M.registration_losses(config, model(inputs, training=True), targets["fixed"],
                                          targets["labels"])
        optimizer.apply(tape.gradient(terms["total"], model.trainable_variables), model.trainable_variables)
        return terms["total"]

    batches = iter(dataset)
    step(*next(batches)).numpy()  # trace
    times = []
    for _ in range(repeats):
        inputs, targets = next(batches)
        start = time.perf_counter()
        step(inputs, targets).numpy()
        times.append(time.perf_counter() - start)
    value = float(statistics.median(times))
    report.add("train_step_s", value, "s", "compact training step, batch 1, this CPU")
    return value


if __name__ == "__main__":
    main()
