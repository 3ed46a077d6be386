"""Wall time of ``hipatlas register`` per case, model loading included (issue 5 target: <= 5 s).

A simulated case (``JIA_MRI`` phantom, 768 x 768 radiographs of 0.4 mm, the default of
``hipatlas simulate``) is registered

* as a user runs it: ``python -m app.cli register CASE --out OUT --model MODEL`` in a fresh
  process (``register_wall_s``: TensorFlow import, model load, XLA compilation, everything);
* in-process, warm (``register_in_process_s``): the model is loaded and compiled already, as in
  the GUI after its first case;
* in-process without masks (``register_proposal_in_process_s``): the mask proposal included;
* as a cohort (``register_cohort_per_case_s``): one ``hipatlas register CASE1 ... CASEn`` command,
  wall time divided by n (TensorFlow, the model and compilation are paid once; from 8 cases on
  the network runs as a traced graph).

The model is the shipped default (``resources/models/DEFAULT``: since session 14 two models, whose
fields registration averages; every command gets them as repeated ``--model``) when there is one,
else an untrained compact model saved to a temporary ``.keras`` file with its model card (same
architecture and cost). The
breakdown comes from report.json's ``timings_s`` of the last command-line run, plus the cost of
importing TensorFlow and loading the model measured in their own processes.

    python benchmarks/bench_register.py --json
    python benchmarks/bench_register.py --case my_case --model resources/models/x --repeats 3
    python benchmarks/bench_register.py --profile          # where a cold run spends its time
    python benchmarks/bench_register.py --backends-only --case resources/demo --json

Backends (``--backends tf,onnx``, side by side in one run; each figure ``<backend>_...``):
``fresh_wall_s`` (``python -m inference.cli register CASE --backend B`` in a fresh process, median),
``fresh_peak_rss_mb`` (that process's peak resident memory), ``import_s`` (a fresh interpreter
importing the pipeline and the backend's runtime: TensorFlow + the Keras layers, or onnxruntime),
``first_call_s`` / ``warm_s`` (in a fresh process: the first ``register_case``, model load and
compilation included, then the median of the next ones) and ``first_network_s`` /
``warm_network_s`` (the network's share of those, from report.json). The figures above them
(``register_wall_s`` ...) use ``--backend`` (default: auto).

With ``--with-refine`` each backend also gets ``fresh_refine_wall_s``: the same fresh-process
command with ``--refine`` (the test-time refinement on every case; issue 13 target <= 15 s on the
demo), with ``fresh_refine_s`` the refinement's own share from report.json. The refinement runs
in TensorFlow whichever backend ran the network.

    python benchmarks/bench_register.py --backends-only --with-refine --case resources/demo --json
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

if __package__ in (None, ""):
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks._common import BenchReport, parse_args  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
QUIET_ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}


def _extra(parser) -> None:
    parser.add_argument("--case", help="case folder (default: a simulated JIA_MRI case)")
    parser.add_argument("--model", help="model folder or .keras (default: shipped, else untrained compact)")
    parser.add_argument("--detector", type=int, default=768, help="radiograph size of the simulated case")
    parser.add_argument("--profile", action="store_true", help="print a cProfile summary of a cold in-process run")
    parser.add_argument("--cohort", type=int, default=10,
                        help="also time one command registering this many copies of the case (0: skip)")
    parser.add_argument("--backend", choices=("auto", "tf", "onnx"), default="auto",
                        help="backend of the figures that do not compare backends (default auto)")
    parser.add_argument("--backends", default="tf,onnx",
                        help="backends to compare side by side (comma separated; empty: skip)")
    parser.add_argument("--backends-only", action="store_true", help="only the backend comparison")
    parser.add_argument("--with-refine", action="store_true",
                        help="also time each backend's fresh-process register with --refine")


#: Run in a fresh interpreter: register the case ``repeats + 1`` times with one backend and print
#: the first and the warm timings (argv: case, out root, backend, repeats, model(s)).
_PROBE = """
import json, statistics, sys, time
case, root, backend, repeats, *models = sys.argv[1:]
model = models if len(models) > 1 else models[0]
t0 = time.perf_counter()
from inference import pipeline
walls, network = [], []
for index in range(int(repeats) + 1):
    start = time.perf_counter()
    result = pipeline.run_to_completion(pipeline.register_case(case, f"{root}/{index}", model=model,
                                                               backend=backend))
    walls.append(time.perf_counter() - start)
    network.append(result.report["timings_s"]["network_s"])
print(json.dumps({"first_call_s": walls[0], "warm_s": statistics.median(walls[1:]),
                  "first_network_s": network[0], "warm_network_s": statistics.median(network[1:]),
                  "ran": result.report["model"].get("backend")}))
"""

#: Run in a fresh interpreter: the CLI as the installed ``hipatlas register`` runs it (without
#: Keras's import of matplotlib.pyplot, app/cli.py), then this process's peak resident memory
#: (argv: CLI args).
_CLI_WITH_RSS = """
import json, resource, sys
from inference.cli_commands import skip_pyplot_import
skip_pyplot_import()
from inference.cli import main
status = main(sys.argv[1:])
print(json.dumps({"status": status, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

_RUNTIME_IMPORT = {"tf": "import tensorflow, inference.model", "onnx": "import onnxruntime"}


def _model_args(models: list[pathlib.Path]) -> list[str]:
    """``--model M`` for each model (several: registration averages them)."""
    return [arg for model in models for arg in ("--model", str(model))]


def _fresh_registers(case: pathlib.Path, models: list[pathlib.Path], root: pathlib.Path, backend: str,
                     repeats: int, extra: tuple[str, ...] = ()) -> tuple[list[float], list[float], dict]:
    """Wall times and peak memory of ``repeats`` fresh-process registers, and the last report.json."""
    walls, rss, last = [], [], {}
    for index in range(repeats):
        out = root / f"fresh_{backend}_{index}"
        wall, completed = _timed_process(["-c", _CLI_WITH_RSS, "register", str(case), "--out", str(out),
                                          *_model_args(models), "--backend", backend, "--quiet", *extra])
        if completed.returncode != 0:
            raise SystemExit(f"register --backend {backend} {' '.join(extra)} failed: "
                             f"{completed.stderr.strip()[-2000:]}")
        walls.append(wall)
        rss.append(json.loads(completed.stdout.strip().splitlines()[-1])["peak_rss_mb"])
        last = json.loads((out / "report.json").read_text())
        shutil.rmtree(out)
    return walls, rss, last


def compare_backends(report, case: pathlib.Path, models: list[pathlib.Path], root: pathlib.Path,
                     backends: list[str], repeats: int, with_refine: bool = False) -> None:
    """The backend figures of the module docstring, one backend after the other."""
    for backend in backends:
        walls, rss, _ = _fresh_registers(case, models, root, backend, repeats)
        report.add(f"{backend}_fresh_wall_s", statistics.median(walls), "s",
                   f"hipatlas register --backend {backend} (fresh process, median)")
        report.add(f"{backend}_fresh_peak_rss_mb", max(rss), "MB", "  its peak resident memory")
        if with_refine:
            walls, rss, last = _fresh_registers(case, models, root, backend, repeats, ("--refine",))
            if not last.get("refinement", {}).get("run"):
                raise SystemExit(f"register --backend {backend} --refine did not refine")
            report.add(f"{backend}_fresh_refine_wall_s", statistics.median(walls), "s",
                       f"hipatlas register --backend {backend} --refine (fresh process, median)")
            report.add(f"{backend}_fresh_refine_s", float(last["timings_s"]["refine_s"]), "s",
                       "  of which the refinement (last run's report.json)")
            report.add(f"{backend}_fresh_refine_peak_rss_mb", max(rss), "MB", "  its peak resident memory")
        imports = []
        for _ in range(repeats):
            script = ("import time; t = time.perf_counter(); import inference.pipeline, inference.backends; "
                      f"{_RUNTIME_IMPORT[backend]}; print(time.perf_counter() - t)")
            _, completed = _timed_process(["-c", script])
            imports.append(float(completed.stdout.strip().splitlines()[-1]))
        report.add(f"{backend}_import_s", statistics.median(imports), "s", "  import pipeline + runtime")
        _, completed = _timed_process(["-c", _PROBE, str(case), str(root / f"probe_{backend}"), backend,
                                       str(max(1, repeats)), *map(str, models)])
        if completed.returncode != 0:
            raise SystemExit(f"in-process probe of {backend} failed: {completed.stderr.strip()[-2000:]}")
        probe = json.loads(completed.stdout.strip().splitlines()[-1])
        if probe.pop("ran") != backend:
            raise SystemExit(f"the probe did not run the {backend} backend")
        for key, value in probe.items():
            report.add(f"{backend}_{key}", value, "s", f"  in-process {key.replace('_s', '')}")
        shutil.rmtree(root / f"probe_{backend}", ignore_errors=True)
    if {"tf", "onnx"} <= set(backends):
        report.add("onnx_over_tf_fresh_wall", report_value(report, "onnx_fresh_wall_s")
                   / report_value(report, "tf_fresh_wall_s"), "", "fresh-process wall, ONNX / TensorFlow")


def report_value(report, name: str) -> float:
    return float(report.figures[name])


def _simulated_case(root: pathlib.Path, detector: int) -> pathlib.Path:
    from inference import geometry
    from inference.data import simulate
    from inference.data import phantom

    # a coarse phantom CT (3 mm) is enough for timing; the radiographs have the clinical size
    grid = geometry.VolumeGeometry.centered((90, 75, 85), (3.0, 3.0, 3.0), phantom.POSE_PIVOT_MM)
    return simulate.simulate_phantom_case("JIA_MRI:right", 11, root / "case", ct_grid=grid,
                                          detector=(detector, detector, 0.4 * 768 / detector))


def _models(root: pathlib.Path, given: str | None) -> tuple[list[pathlib.Path], str]:
    from inference import registration

    if given:
        return [registration.model_file_in(given)], "given"
    try:
        return registration.default_model_paths(), "shipped"
    except Exception:  # no trained model installed yet: an untrained one costs the same
        import keras

        from inference import model as model_lib
        from inference.data import atlas as atlas_lib

        keras.utils.set_random_seed(0)
        net = model_lib.build_model(model_lib.preset("compact"), atlas_lib.load_atlas("compact"))
        path, _ = model_lib.save_model(net, root / "model" / "compact_untrained.keras")
        return [path], "untrained compact"


def _timed_process(args: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    completed = subprocess.run([sys.executable, *args], cwd=REPO, env=QUIET_ENV, capture_output=True, text=True)
    return time.perf_counter() - start, completed


def main(argv=None) -> None:
    args = parse_args(argv, __doc__.splitlines()[0], _extra)
    report = BenchReport("register", json_output=args.json, report=args.report)
    repeats = 1 if args.quick else args.repeats
    root = pathlib.Path(tempfile.mkdtemp(prefix="bench_register_"))
    try:
        case = pathlib.Path(args.case) if args.case else _simulated_case(root, args.detector)
        models, model_kind = _models(root, args.model)
        report.model_file = models
        report.note(f"case {case}, model(s) {', '.join(map(str, models))} ({model_kind})")
        report.add("model_kind", model_kind)
        backends = [b.strip() for b in args.backends.split(",") if b.strip()]
        if backends:
            compare_backends(report, case, models, root, backends, repeats, args.with_refine)
        if args.backends_only:
            shutil.rmtree(root, ignore_errors=True)
            report.finish()
            return

        # Fixed costs of a fresh process, each measured alone.
        wall, _ = _timed_process(["-c", "import tensorflow"])
        report.add("tf_import_s", wall, "s", "python + import tensorflow")
        load_script = ("import time; from inference import model; t = time.perf_counter(); "
                       f"model.load_model({str(models[0])!r}); print(time.perf_counter() - t)")
        wall, completed = _timed_process(["-c", load_script])
        if completed.returncode == 0:
            report.add("model_load_s", float(completed.stdout.strip().splitlines()[-1]), "s",
                       "load_model (verified), the first model")

        walls, last_report = [], None
        for index in range(repeats):
            out = root / f"out_{index}"
            wall, completed = _timed_process(["-m", "app.cli", "register", str(case), "--out", str(out),
                                              *_model_args(models), "--backend", args.backend, "--quiet"])
            if completed.returncode != 0:
                raise SystemExit(f"register failed ({completed.returncode}): {completed.stderr.strip()[-2000:]}")
            walls.append(wall)
            last_report = json.loads((out / "report.json").read_text())
            shutil.rmtree(out)
        report.add("register_wall_s", statistics.median(walls), "s", "hipatlas register (fresh process, median)")
        for key, value in last_report["timings_s"].items():
            report.add(f"breakdown_{key}", float(value), "s", f"  report.json {key}")
        report.add("breakdown_outside_pipeline_s", statistics.median(walls) - last_report["timings_s"]["total_s"],
                   "s", "  process start, imports, output (not in total_s)")

        # A cohort in one command: TensorFlow, the model and the compilation once for all cases.
        if args.cohort > 1:
            cases = []
            for index in range(args.cohort):
                copy = root / "cohort_cases" / f"case_{index:03d}"
                shutil.copytree(case, copy)
                cases.append(str(copy))
            wall, completed = _timed_process(["-m", "app.cli", "register", *cases, "--out", str(root / "cohort"),
                                              *_model_args(models), "--backend", args.backend, "--quiet"])
            if completed.returncode != 0:
                raise SystemExit(f"cohort register failed: {completed.stderr.strip()[-2000:]}")
            report.add("register_cohort_per_case_s", wall / args.cohort, "s",
                       f"hipatlas register with {args.cohort} cases in one command, wall per case")
            shutil.rmtree(root / "cohort")

        from inference import pipeline

        def run(out, masks=None, case_dir=case):
            chosen = [str(m) for m in models] if len(models) > 1 else str(models[0])
            return pipeline.run_to_completion(pipeline.register_case(case_dir, out, model=chosen, masks=masks,
                                                                     backend=args.backend))

        start = time.perf_counter()
        if args.profile:
            import cProfile
            import pstats

            profiler = cProfile.Profile()
            profiler.enable()
            run(root / "cold")
            profiler.disable()
            report.add("register_in_process_first_s", time.perf_counter() - start, "s",
                       "in-process first run (profiled)")
            stats = pstats.Stats(profiler, stream=sys.stdout)
            stats.sort_stats("cumulative").print_stats(30)
        else:
            run(root / "cold")
            report.add("register_in_process_first_s", time.perf_counter() - start, "s",
                       "in-process first run (TF imported, model load + compile)")
        warm = []
        for index in range(max(1, repeats)):
            start = time.perf_counter()
            result = run(root / f"warm_{index}")
            warm.append(time.perf_counter() - start)
        report.add("register_in_process_s", statistics.median(warm), "s", "in-process warm (GUI after its first case)")
        for key, value in result.report["timings_s"].items():
            report.add(f"warm_{key}", float(value), "s", f"  warm {key}")

        # Without masks: the proposal runs first (its own network call and image refinement).
        no_masks = root / "case_no_masks"
        shutil.copytree(case, no_masks)
        raw = json.loads((no_masks / "case.json").read_text())
        for view in raw["views"]:
            view.pop("mask", None)
        (no_masks / "case.json").write_text(json.dumps(raw))
        run(root / "proposal_cold", case_dir=no_masks)
        start = time.perf_counter()
        result = run(root / "proposal_warm", case_dir=no_masks)
        report.add("register_proposal_in_process_s", time.perf_counter() - start, "s",
                   "in-process warm, masks proposed")
        report.add("proposal_s", float(result.report["timings_s"]["mask_proposal_s"]), "s", "  of which proposal")
        report.add("radiograph_px", list(pipeline.io.load_case(case).views[0].image.shape))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report.finish()


if __name__ == "__main__":
    main()
