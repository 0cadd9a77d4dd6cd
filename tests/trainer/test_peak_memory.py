"""The peak memory a run records: CUDA's allocator peak, or on Linux the process's peak RSS (VmHWM), which
``reset_peak_memory`` restarts so that several runs in one process (a study) each get their own."""

from __future__ import annotations

import sys

import pytest
import torch

from rlvr_fast.trainer.reporting.log import peak_memory_bytes, reset_peak_memory

CPU = torch.device("cpu")
MIB = 2**20


def current_rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM and clear_refs are Linux's")
def test_a_reset_restarts_the_peak_at_the_current_rss():
    start = current_rss()
    big = torch.ones(96 * MIB // 4)  # 96 MiB, touched
    assert peak_memory_bytes(CPU) >= start + 90 * MIB
    del big
    assert reset_peak_memory(CPU)
    # the peak is now the resident set of this moment (whatever the allocator kept of the freed 96 MiB), not the old one
    assert peak_memory_bytes(CPU) <= current_rss() + 8 * MIB
    now = current_rss()
    again = torch.ones(96 * MIB // 4)
    assert peak_memory_bytes(CPU) >= now + 90 * MIB
    del again
