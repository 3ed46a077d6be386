"""Small helpers shared by the benchmark scripts: timing and ``--json`` output.

Every ``benchmarks/bench_<name>.py`` prints human-readable figures and, with ``--json``, ends with
exactly one line of JSON holding the same figures, so CI and the lead can collect them:

    from benchmarks._common import BenchReport, median_time

    report = BenchReport("prost", description="ProST / DRR timings")
    report.add("paper_forward_s", median_time(run_once, repeats=5), "s", "ProST paper forward")
    report.finish()          # parses --json from sys.argv unless told otherwise
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from inference import HUGEPAGE_ENV

__all__ = ["BenchReport", "median_time", "median_times", "parse_args", "machine_info"]


def parse_args(argv: Sequence[str] | None = None, description: str = "",
               extra: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    """Parse the common benchmark options (``--json``, ``--repeats``, ``--quick``).

    ``extra`` may add script-specific options to the parser.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--json", action="store_true",
                        help="end the output with one line of JSON holding the figures")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed repeats per figure (the median is reported; default 5)")
    parser.add_argument("--quick", action="store_true",
                        help="fewer repeats and smaller optional workloads (smoke test)")
    parser.add_argument("--report", metavar="PATH",
                        help="also write PATH.md and PATH.json (the figures with the command, commit, "
                        "model sha256 and machine they were measured on), e.g. docs/results/bench_model")
    if extra is not None:
        extra(parser)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, not {args.repeats}")
    return args


def median_times(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> tuple[float, float]:
    """Median wall time and median process CPU time (all threads) of ``fn()``, in seconds.

    ``fn`` runs ``warmup`` times untimed first (compilation, caches), then ``repeats`` times;
    it must block until its work is done (e.g. call ``.numpy()`` on TensorFlow results).
    Medians, not means or minima, because the machines are shared: they ignore a few runs
    slowed by other processes without rewarding a lucky one. The CPU time is the steadier
    figure on a busy machine (it does not count time spent waiting for a core).
    """
    for _ in range(max(0, warmup)):
        fn()
    walls, cpus = [], []
    for _ in range(max(1, repeats)):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return float(statistics.median(walls)), float(statistics.median(cpus))


def median_time(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds (see :func:`median_times`)."""
    return median_times(fn, repeats, warmup)[0]


#: Environment variables that change what a benchmark measures, written before its command in
#: reports (NumPy's huge pages: docs/performance.md, *Session 18*).
MEASURED_ENVIRONMENT = (HUGEPAGE_ENV,)


def machine_info() -> dict[str, Any]:
    """Where the figures were measured (so figures from different machines are not compared)."""
    return {"python": platform.python_version(), "machine": platform.machine(),
            "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()}


class BenchReport:
    """Collects named figures, prints them as they come, and emits the final JSON line."""

    def __init__(self, name: str, json_output: bool = False, stream=None, report: str | None = None,
                 model_file: str | None = None):
        self.name = name
        self.json_output = json_output
        self.report = report
        self.model_file = model_file
        self.stream = stream if stream is not None else sys.stdout
        self.figures: dict[str, Any] = {}

    def add_timing(self, key: str, fn: Callable[[], Any], repeats: int, label: str = "") -> float:
        """Time ``fn`` (:func:`median_times`); record ``key`` (wall s) and ``key`` with its
        ``_s`` suffix replaced by ``_cpu_s`` (process CPU s); print both on one line."""
        wall, cpu = median_times(fn, repeats)
        cpu_key = (key[:-2] if key.endswith("_s") else key + "_") + "_cpu_s"
        self.figures[key] = wall
        self.figures[cpu_key] = cpu
        print(f"{label or key}: {wall:.4g} s wall, {cpu:.4g} s CPU  [{key}]", file=self.stream,
              flush=True)
        return wall

    def add(self, key: str, value: Any, unit: str = "", label: str = "") -> Any:
        """Record one figure and print it on its own line (``label: value unit [key]``)."""
        self.figures[key] = value
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        text = f"{label or key}: {shown}{(' ' + unit) if unit else ''}"
        if label:
            text += f"  [{key}]"
        print(text, file=self.stream, flush=True)
        return value

    def note(self, text: str) -> None:
        """Print a free-text line (not part of the JSON)."""
        print(text, file=self.stream, flush=True)

    def finish(self) -> dict[str, Any]:
        """Print the JSON line if requested; return the figures."""
        if self.json_output:
            payload = {"benchmark": self.name, **self.figures, "machine": machine_info()}
            print(json.dumps(payload, sort_keys=False), file=self.stream, flush=True)
        if self.report:
            self.write_report(self.report)
        return self.figures

    def write_report(self, path: str) -> None:
        """``path.md`` (a table of the figures under their provenance) and ``path.json``."""
        from inference.io import write_json_atomic, write_text_atomic
        from inference.provenance import provenance, provenance_markdown
        from inference.resources import default_model_files

        model = self.model_file
        if model is None:
            try:
                model = default_model_files()
            except Exception:  # no installed model: the report names none
                model = None
        # Variables that change the figures are part of the command that measured them.
        setting = [f"{name}={os.environ[name]}" for name in MEASURED_ENVIRONMENT if name in os.environ]
        record = provenance(model, command=[*setting, "python", *sys.argv])
        write_json_atomic(f"{path}.json", {"benchmark": self.name, "provenance": record, "figures": self.figures})
        rows = [f"| `{k}` | {v:.4g} |" if isinstance(v, float) else f"| `{k}` | {v} |" for k, v in self.figures.items()]
        write_text_atomic(f"{path}.md", f"# Benchmark {self.name}\n\n{provenance_markdown(record)}\n"
                          "| figure | value |\n|---|---|\n" + "\n".join(rows) + "\n")
