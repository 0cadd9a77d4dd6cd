"""rlvr_fast.benchmark.memory: the peak-memory growth the benchmark runner reports."""

import pytest
import torch

from rlvr_fast.benchmark.memory import measure_peak_memory

MIB = 2**20


def _measure(fn, device):
    peak = measure_peak_memory(fn, device)
    if peak is None:
        pytest.skip(f"peak memory cannot be measured on {device} here (needs Linux /proc/self/clear_refs on the CPU)")
    return peak


def test_counts_a_transient_buffer_freed_inside_the_call(device):
    """A 64 MiB buffer, filled and dropped before the call returns, still shows in the peak."""

    def transient():
        x = torch.empty(64 * MIB // 4, device=device).fill_(1.0)  # fill_: touch every page
        return float(x[-1])

    peak = _measure(transient, device)
    assert 60 * MIB <= peak.growth_bytes <= 100 * MIB, peak


def test_reuse_of_freed_memory_is_not_free(device):
    """An earlier call's freed memory must not hide the next call's use of it (malloc_trim / the CUDA counters)."""

    def transient():
        return float(torch.ones(32 * MIB // 4, device=device).sum())

    transient()
    peak = _measure(transient, device)
    assert peak.growth_bytes >= 28 * MIB, peak


def test_small_call_shows_small_growth(device):
    x = torch.randn(1024, device=device)
    peak = _measure(lambda: x.sum(), device)
    assert peak.growth_bytes < 16 * MIB, peak
