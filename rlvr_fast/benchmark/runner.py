"""Run benchmark cases and report each implementation's time, its ratio to the baseline and its fraction of the
floor (the floor's time at the measured ceilings divided by the measured time)."""

from __future__ import annotations

import gc
from dataclasses import asdict

import torch

from rlvr_fast.benchmark.cases import build_cases
from rlvr_fast.benchmark.ceilings import Ceilings, measure_ceilings
from rlvr_fast.benchmark.timing import time_fn


def floor_ms(flops: float, nbytes: float, ceilings: Ceilings) -> float:
    return max(flops / (ceilings.matmul_tflops * 1e12), nbytes / (ceilings.copy_gbps * 1e9)) * 1e3


def run_benchmarks(device: torch.device | str, ops: list[str] | None = None) -> dict:
    """Time every case on ``device``; returns {"ceilings": ..., "results": [row, ...]} (JSON-ready)."""
    device = torch.device(device)
    ceilings = measure_ceilings(device)
    rows = []
    for case in build_cases(device, ops):
        timings = {name: time_fn(fn, device) for name, fn in case.impls.items()}
        base = timings[case.baseline].median_ms
        best_floor = floor_ms(case.floor.flops, case.floor.bytes, ceilings)
        for name, t in timings.items():
            rows.append(
                {
                    "op": case.op,
                    "shape": case.label,
                    "impl": name,
                    **asdict(t),
                    "ratio_to_baseline": t.median_ms / base,
                    "baseline": case.baseline,
                    "floor_ms": best_floor,
                    "fraction_of_floor": best_floor / t.median_ms,
                    "params": case.params,
                }
            )
        del case
        gc.collect()
    return {"device": _device_name(device), "ceilings": asdict(ceilings), "results": rows}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def format_table(report: dict) -> str:
    c = report["ceilings"]
    lines = [
        f"device: {report['device']}; measured ceilings: copy {c['copy_gbps']:.1f} GB/s, "
        f"matmul {c['matmul_tflops']:.2f} TFLOP/s ({c['matmul_dtype']})",
        f"{'op':<18} {'shape':<24} {'impl':<14} {'median ms':>10} {'p20':>9} {'p80':>9} {'vs base':>8} {'of floor':>9}",
    ]
    for r in report["results"]:
        lines.append(
            f"{r['op']:<18} {r['shape']:<24} {r['impl']:<14} {r['median_ms']:>10.4f} {r['p20_ms']:>9.4f} "
            f"{r['p80_ms']:>9.4f} {r['ratio_to_baseline']:>7.2f}x {100 * r['fraction_of_floor']:>8.1f}%"
        )
    return "\n".join(lines)
