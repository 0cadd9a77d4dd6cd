"""The peak memory a run records: CUDA's allocator peak, or on Linux the process's peak RSS (VmHWM), which
``reset_peak_memory`` restarts so that several runs in one process (a study) each get their own."""

from __future__ import annotations

import mmap
import sys

import pytest
import torch

from rlvr_fast.trainer.reporting.log import peak_memory_bytes, reset_peak_memory

CPU = torch.device("cpu")
MIB = 2**20


def current_rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def resident(size: int) -> mmap.mmap:
    """``size`` bytes of fresh anonymous memory with every page written: resident until closed. (Not a tensor: an
    allocator may hand back memory a freed tensor left resident, which would not raise the RSS.)"""
    block = mmap.mmap(-1, size)
    block[:: mmap.PAGESIZE] = b"\x01" * len(range(0, size, mmap.PAGESIZE))
    return block


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM and clear_refs are Linux's")
def test_a_reset_restarts_the_peak_at_the_current_rss():
    start = current_rss()
    big = resident(96 * MIB)
    high = peak_memory_bytes(CPU)
    assert high >= start + 90 * MIB
    big.close()  # unmapped: the RSS falls back
    assert reset_peak_memory(CPU)
    after = peak_memory_bytes(CPU)
    assert after <= current_rss() + 8 * MIB and after <= high - 64 * MIB  # the old peak is forgotten
    now = current_rss()
    again = resident(96 * MIB)
    assert peak_memory_bytes(CPU) >= now + 90 * MIB  # and a new one is recorded
    again.close()
