"""The machine's measured ceilings, taken in the same run as the op timings: a large device-to-device copy (GB/s,
counting the read and the write) and a large matmul (TFLOP/s) in the dtype the ops run in."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlvr_fast.benchmark.timing import time_cpu, time_cuda


@dataclass(frozen=True)
class Ceilings:
    copy_gbps: float
    matmul_tflops: float
    matmul_dtype: str


def measure_ceilings(
    device: torch.device,
    *,
    copy_bytes: int | None = None,
    matmul_n: int | None = None,
    dtype: torch.dtype | None = None,
    min_time_s: float = 0.2,
) -> Ceilings:
    """The copy bandwidth and the matmul rate of ``device``; the matmul in ``dtype`` (default: bfloat16 on CUDA,
    float32 elsewhere); on the CPU each timed for at least ``min_time_s`` (and 5 repetitions)."""
    cuda = device.type == "cuda"

    def timed(fn):
        return time_cuda(fn) if cuda else time_cpu(fn, min_time_s=min_time_s)

    copy_bytes = copy_bytes or (2 << 30 if cuda else 256 << 20)
    matmul_n = matmul_n or (8192 if cuda else 1024)
    dtype = dtype or (torch.bfloat16 if cuda else torch.float32)
    src = torch.empty(copy_bytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t_copy = timed(lambda s=src, d=dst: d.copy_(s))
    del src, dst
    a = torch.randn(matmul_n, matmul_n, device=device, dtype=dtype)
    b = torch.randn(matmul_n, matmul_n, device=device, dtype=dtype)
    t_mm = timed(lambda x=a, y=b: x @ y)
    del a, b
    return Ceilings(
        copy_gbps=2 * copy_bytes / (t_copy.median_ms * 1e-3) / 1e9,
        matmul_tflops=2 * matmul_n**3 / (t_mm.median_ms * 1e-3) / 1e12,
        matmul_dtype=str(dtype).removeprefix("torch."),
    )
