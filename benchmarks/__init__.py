"""Benchmark suites. Run one with ``python -m difftilt.benchmarks.<suite>``."""
