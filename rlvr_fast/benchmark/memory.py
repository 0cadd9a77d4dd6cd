"""Peak memory growth of one call: how far above the memory already in use (inputs included) the call goes.

CUDA: the caching allocator's own counters. ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``,
minus ``memory_allocated`` before the call: exact, and blind to the allocator's cache.

CPU: PyTorch keeps no CPU allocator statistics, so the process's resident set size is read from Linux, which sees
every page the call touches. Two steps make that an honest per-call number:
1. ``malloc_trim(0)`` first hands freed heap pages back to the kernel; otherwise a call could reuse memory freed by
   an earlier one and look free of cost (glibc keeps sub-32 MiB blocks on its free lists).
2. writing "5" to /proc/self/clear_refs resets the kernel's high-water mark (VmHWM) just before the call, so VmHWM
   after it is the peak reached during the call (Linux >= 4.0). Unlike sampling, no short-lived peak is missed.
The number counts everything the process touches (allocator arenas, thread stacks, first-touched library pages), so
measure after a warm-up call, as the runner does (timing runs first). Where clear_refs cannot be written the CPU
measurement is reported as unavailable (None), never guessed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import torch


@dataclass(frozen=True)
class PeakMemory:
    growth_bytes: int  # peak during the call minus what was in use just before it
    method: str  # how it was measured ("cuda-allocator" or "linux-vmhwm")

    @property
    def growth_mb(self) -> float:
        return self.growth_bytes / 2**20


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


@cache
def _libc():
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name else None


def reset_high_water_mark() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _cpu_peak(fn: Callable[[], object]) -> PeakMemory | None:
    if not sys.platform.startswith("linux"):
        return None
    gc.collect()
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
    before = _status_kib("VmRSS")
    if not reset_high_water_mark():
        return None
    result = fn()
    peak = _status_kib("VmHWM")
    del result
    return PeakMemory(max(peak - before, 0) * 1024, "linux-vmhwm")


def _cuda_peak(fn: Callable[[], object], device: torch.device) -> PeakMemory:
    gc.collect()
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del result
    return PeakMemory(peak - before, "cuda-allocator")


def measure_peak_memory(fn: Callable[[], object], device: torch.device | str) -> PeakMemory | None:
    """Peak memory growth of one call of ``fn`` on ``device``; None where it cannot be measured honestly."""
    device = torch.device(device)
    if device.type == "cuda":
        return _cuda_peak(fn, device)
    if device.type == "cpu":
        return _cpu_peak(fn)
    return None
