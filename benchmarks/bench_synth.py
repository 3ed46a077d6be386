"""Throughput of synthetic data generation: subjects per minute on the compact and paper grids.

One *subject* is what ``hipatlas synth`` spends per phantom when both view sets are wanted: one
CT phantom of a shared femur (shape, pose and tissue augmented) plus the orthogonal and the
generalised DRR pair (realism augmentation, masks), both samples written as npz files. Work runs
in ``--workers`` spawned processes (default 2, as ``synth``), after a warm-up task per worker that
pays for the TensorFlow import and the XLA compilations, so the figure is the steady state.

    python benchmarks/bench_synth.py --json            # compact and paper
    python benchmarks/bench_synth.py --grids compact --subjects 12

Also reports the npz size per sample on disk, and the CPU time per subject (on a shared machine
the wall-clock throughput depends on everyone else's load; ``*_if_idle`` = workers x 60 / CPU s).
"""

from __future__ import annotations

import multiprocessing
import os
import pathlib
import sys
import tempfile
import time

if __package__ in (None, ""):
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks._common import BenchReport, parse_args  # noqa: E402

_STATE: dict = {}


def _init(grid_name: str, out_dir: str, threads: int, shape: bool, barrier) -> None:
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    from inference.data import dataset as ds

    _STATE.update(grid=ds.dataset_grid(grid_name), out=out_dir,
                  config=ds.SynthConfig(phantom=ds.PhantomSampling(shape=shape)),
                  femurs=[f.name for f in ds.available_femurs()])
    # Warm-up: load the subject models and compile the renderer's kernels in this worker, then
    # wait until every worker is ready, so the timed part is the steady state.
    _subject(10_000 + os.getpid() % 7)
    barrier.wait()


def _subject(index: int) -> tuple[float, list[int], float]:
    from inference.data import dataset as ds

    start = time.perf_counter()
    cpu_start = time.process_time()
    femurs = _STATE["femurs"]
    sets = ds.synthesize_view_sets(_STATE["config"], _STATE["grid"], 0, index, femurs[index % len(femurs)])
    sizes = []
    for mode, (arrays, _) in zip(ds.GEOMETRY_MODES, sets):
        path = ds.write_npz(pathlib.Path(_STATE["out"]) / f"{mode}_{index:04d}.npz", arrays)
        sizes.append(path.stat().st_size)
    return time.perf_counter() - start, sizes, time.process_time() - cpu_start


def measure(grid_name: str, subjects: int, workers: int, shape: bool) -> tuple[float, float, float, float]:
    """(subjects per minute, mean wall seconds per subject in a worker, mean npz bytes per sample,
    mean CPU seconds per subject in a worker)."""
    from inference.data import dataset as ds
    from inference.data.phantom import load_subject_model

    for femur in ds.available_femurs():  # build the disk cache once, outside the timing
        load_subject_model(femur.name)
    threads = max(1, (os.cpu_count() or 1) // workers)
    with tempfile.TemporaryDirectory(prefix="bench_synth_") as out:
        context = multiprocessing.get_context("spawn")
        with context.Manager() as manager:
            barrier = manager.Barrier(workers + 1)
            pool = context.Pool(workers, initializer=_init, initargs=(grid_name, out, threads, shape, barrier))
            barrier.wait(timeout=900)
            start = time.perf_counter()
            results = pool.map(_subject, range(subjects), chunksize=1)
            elapsed = time.perf_counter() - start
            pool.close()
            pool.join()
    per_subject = sum(r[0] for r in results) / len(results)
    sizes = [s for r in results for s in r[1]]
    cpu = sum(r[2] for r in results) / len(results)
    return 60.0 * subjects / elapsed, per_subject, sum(sizes) / len(sizes), cpu


def main(argv=None) -> dict:
    def extra(parser):
        parser.add_argument("--grids", nargs="+", default=["compact", "paper"], choices=["compact", "paper"])
        parser.add_argument("--subjects", type=int, default=0, help="subjects per grid (default 12 compact, 4 paper)")
        parser.add_argument("--workers", type=int, default=2)
        parser.add_argument("--no-shape", action="store_true", help="phantoms without shape augmentation")

    args = parse_args(argv, "synthetic data generation throughput", extra)
    report = BenchReport("synth", json_output=args.json, report=args.report)
    shape = not args.no_shape
    try:
        import inference.data.shape  # noqa: F401
    except ImportError:
        shape = False
        report.note("inference.data.shape is missing: phantoms without shape augmentation")
    report.note(f"{args.workers} workers on {os.cpu_count()} cores; one subject = phantom + orthogonal and "
                "generalised DRR pairs, written as npz")
    for grid_name in args.grids:
        n = args.subjects or ({"compact": 12, "paper": 4}[grid_name] // (2 if args.quick else 1))
        rate, per_subject, size, cpu = measure(grid_name, n, args.workers, shape)
        report.add(f"{grid_name}_subjects_per_min", rate, "subjects/min", f"{grid_name} throughput ({n} subjects)")
        report.add(f"{grid_name}_s_per_subject_per_worker", per_subject, "s", f"{grid_name} time per subject in a worker")
        # On a shared machine the wall-clock figure depends on the other load; the CPU time a
        # worker spends per subject does not, and bounds what idle cores reach.
        report.add(f"{grid_name}_cpu_s_per_subject", cpu, "s", f"{grid_name} CPU time per subject in a worker")
        report.add(f"{grid_name}_subjects_per_min_if_idle", 60.0 * args.workers / cpu, "subjects/min",
                   f"{grid_name} throughput if each worker had a whole core")
        report.add(f"{grid_name}_npz_mb_per_sample", size / 1e6, "MB", f"{grid_name} npz size per sample")
    return report.finish()


if __name__ == "__main__":
    main()
