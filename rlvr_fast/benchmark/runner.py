"""Run benchmark cases and report each implementation's time, its ratio to the baseline and its fraction of the
floor (the floor's time at the measured ceilings divided by the measured time); for cases that opt in
(``Case.memory``), also each implementation's peak memory growth during one call and its ratio to the baseline's."""

from __future__ import annotations

import gc
from dataclasses import asdict

import torch

from rlvr_fast.benchmark.cases import build_cases
from rlvr_fast.benchmark.ceilings import Ceilings, measure_ceilings
from rlvr_fast.benchmark.memory import measure_peak_memory
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
        # after timing, so every implementation is warm (lazy imports, autotuning) when its memory is read
        peaks = {name: measure_peak_memory(fn, device) for name, fn in case.impls.items()} if case.memory else {}
        base = timings[case.baseline].median_ms
        base_mem = peaks.get(case.baseline)
        best_floor = floor_ms(case.floor.flops, case.floor.bytes, ceilings)
        for name, t in timings.items():
            mem = peaks.get(name)
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
                    "peak_mem_mb": None if mem is None else mem.growth_mb,
                    "mem_ratio_to_baseline": (
                        None
                        if mem is None or not base_mem or not base_mem.growth_bytes
                        else mem.growth_bytes / base_mem.growth_bytes
                    ),
                    "mem_method": None if mem is None else mem.method,
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
        f"{'op':<18} {'shape':<24} {'impl':<16} {'median ms':>10} {'p20':>9} {'p80':>9} {'vs base':>8} {'of floor':>9}"
        f" {'peak MB':>9} {'mem vs base':>11}",
    ]
    for r in report["results"]:
        mem, mem_ratio = r.get("peak_mem_mb"), r.get("mem_ratio_to_baseline")
        lines.append(
            f"{r['op']:<18} {r['shape']:<24} {r['impl']:<16} {r['median_ms']:>10.4f} {r['p20_ms']:>9.4f} "
            f"{r['p80_ms']:>9.4f} {r['ratio_to_baseline']:>7.2f}x {100 * r['fraction_of_floor']:>8.1f}%"
            f" {'-' if mem is None else f'{mem:.1f}':>9} {'-' if mem_ratio is None else f'{mem_ratio:.3f}x':>11}"
        )
    return "\n".join(lines)
