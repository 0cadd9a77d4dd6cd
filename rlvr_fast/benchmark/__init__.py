"""Benchmark cases shared by the pytest-benchmark suite (benchmarks/), the GPU script (benchmarks/gpu/) and
``rlvr-fast bench``: one definition of each shape, its implementations and its floor, timed three ways."""

from rlvr_fast.benchmark.cases import CASES, Case, Floor, build_cases

__all__ = ["CASES", "Case", "Floor", "build_cases"]
