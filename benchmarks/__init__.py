"""Benchmark scripts (run each as ``python benchmarks/bench_<name>.py [--json]``)."""
