"""The warm single-case registration in detail (issue 20 target: <= 0.5 s warm).

One process registers one case (default: the demo) with one backend (default: ONNX Runtime when
the model has its export, else TensorFlow) ``--repeats + 1`` times; the first call (model load,
caches, compilation) is not counted. For the warm calls it reports the median wall time and the
median CPU time of the process (all threads), in total and per pipeline step: the generator is
driven here, and each step is the stretch between two of its progress messages (``step_<name>``).
CPU time is the figure to compare on a busy machine: it does not count waiting for a core.

It also times the full-resolution warp of the last call's displacement by the dense method
(every voxel interpolated) and by the sparse one the pipeline uses (:func:`inference.fullres.warp_fine`).

    python benchmarks/bench_warm_register.py --json
    python benchmarks/bench_warm_register.py --backend tf --repeats 3
"""

from __future__ import annotations

import pathlib
import re
import shutil
import statistics
import sys
import tempfile
import time

if __package__ in (None, ""):
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks._common import BenchReport, median_times, parse_args  # noqa: E402


def _extra(parser) -> None:
    parser.add_argument("--case", help="case folder (default: the demo case)")
    parser.add_argument("--model", help="model folder, .keras or .onnx (default: the shipped model)")
    parser.add_argument("--backend", choices=("auto", "tf", "onnx"), default="auto")


def step_key(message: str) -> str:
    return "step_" + (re.sub(r"[^a-z0-9]+", "_", message.lower()).strip("_") or "start")


def timed_steps(generator) -> tuple[object, dict[str, tuple[float, float]]]:
    """Drive a progress generator; (its result, {step: (wall s, CPU s)}) where a step runs from
    one progress message to the next and is named after the first."""
    steps: dict[str, tuple[float, float]] = {}
    name = "step_start"
    wall, cpu = time.perf_counter(), time.process_time()
    while True:
        try:
            progress = next(generator)
        except StopIteration as stop:
            result = stop.value
            break
        now_wall, now_cpu = time.perf_counter(), time.process_time()
        previous = steps.get(name, (0.0, 0.0))
        steps[name] = (previous[0] + now_wall - wall, previous[1] + now_cpu - cpu)
        name, wall, cpu = step_key(progress.message), now_wall, now_cpu
    steps[name] = (time.perf_counter() - wall, time.process_time() - cpu)
    return result, steps


def main(argv=None) -> dict:
    args = parse_args(argv, __doc__.splitlines()[0], _extra)
    from inference import backends, fullres, pipeline, registration
    from inference.resources import demo_dir

    report = BenchReport("warm_register", json_output=args.json, report=args.report)
    case = pathlib.Path(args.case) if args.case else demo_dir()
    repeats = 2 if args.quick else args.repeats
    net = backends.load_backend(args.model, args.backend)
    report.add("backend", net.name)
    members = getattr(net, "members", [net])
    report.model_file = [registration.model_file_in(m.path.parent if m.path.suffix == ".onnx" else m.path)
                         for m in members]  # the .keras of each model that ran (its card's sha256)
    report.note(f"case {case}, model {', '.join(str(m.path) for m in members)}")
    root = pathlib.Path(tempfile.mkdtemp(prefix="bench_warm_"))
    captured = {}
    real_warp = fullres.warp_fine

    def capturing_warp(*warp_args, **warp_kwargs):
        captured["args"] = warp_args
        return real_warp(*warp_args, **warp_kwargs)

    try:
        fullres.warp_fine = capturing_warp
        walls, cpus, per_step = [], [], {}
        for index in range(repeats + 1):
            wall, cpu = time.perf_counter(), time.process_time()
            result, steps = timed_steps(pipeline.register_case(case, root / str(index), model=net))
            if index == 0:
                report.add("first_s", time.perf_counter() - wall, "s", "first call (caches, compilation)")
                continue
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
            for key, value in steps.items():
                per_step.setdefault(key, []).append(value)
            shutil.rmtree(root / str(index))
        report.add("warm_s", statistics.median(walls), "s", "warm call, wall (median)")
        report.add("warm_cpu_s", statistics.median(cpus), "s", "warm call, CPU of all threads (median)")
        for key, values in per_step.items():
            report.add(f"{key}_s", statistics.median(v[0] for v in values), "s", f"  {key}, wall")
            report.add(f"{key}_cpu_s", statistics.median(v[1] for v in values), "s", f"  {key}, CPU")
        report.add("last_network_s", result.report["timings_s"]["network_s"], "s", "network of the last call")
    finally:
        fullres.warp_fine = real_warp
        shutil.rmtree(root, ignore_errors=True)

    if "args" in captured:
        for dense in (True, False):
            label = "dense" if dense else "sparse"
            wall, cpu = median_times(lambda: real_warp(*captured["args"], dense=dense), repeats=max(1, repeats),
                                     warmup=1)
            report.add(f"fullres_warp_{label}_s", wall, "s", f"full-resolution warp, {label}, wall")
            report.add(f"fullres_warp_{label}_cpu_s", cpu, "s", f"full-resolution warp, {label}, CPU")
    return report.finish()


if __name__ == "__main__":
    main()
