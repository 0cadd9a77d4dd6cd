"""Timing helpers: triton.testing.do_bench on CUDA (median, p20, p80), a wall-clock loop on the CPU."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float


def time_cpu(fn: Callable[[], object], *, min_time_s: float = 0.2, max_reps: int = 1000) -> Timing:
    fn()  # warm-up (lazy imports, allocator)
    samples = []
    start = time.perf_counter()
    while len(samples) < max_reps and (time.perf_counter() - start < min_time_s or len(samples) < 5):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(samples, n=10) if len(samples) > 1 else [samples[0]] * 9
    return Timing(statistics.median(samples), q[1], q[7])


def time_cuda(fn: Callable[[], object]) -> Timing:
    from triton.testing import do_bench

    p50, p20, p80 = do_bench(fn, quantiles=[0.5, 0.2, 0.8])
    return Timing(p50, p20, p80)


def time_fn(fn: Callable[[], object], device: torch.device) -> Timing:
    return time_cuda(fn) if device.type == "cuda" else time_cpu(fn)
