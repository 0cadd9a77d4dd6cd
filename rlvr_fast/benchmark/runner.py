"""Run benchmark cases and report each implementation's time, its ratio to the baseline and its fraction of the
floor (the floor's time at the measured ceilings divided by the measured time); for cases that opt in
(``Case.memory``), also each implementation's peak memory growth during one call and its ratio to the baseline's."""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import asdict, fields
from typing import TypeVar

import torch

from rlvr_fast.benchmark.cases import build_cases
from rlvr_fast.benchmark.cases.registry import Case
from rlvr_fast.benchmark.ceilings import Ceilings, measure_ceilings
from rlvr_fast.benchmark.memory import measure_peak_memory
from rlvr_fast.benchmark.timing import Timing, time_fn

T = TypeVar("T")


def floor_ms(flops: float, nbytes: float, ceilings: Ceilings) -> float:
    return max(flops / (ceilings.matmul_tflops * 1e12), nbytes / (ceilings.copy_gbps * 1e9)) * 1e3


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _measure_all(case: Case, measure: Callable[[Callable[[], object]], T], errors: dict[str, str]) -> dict[str, T]:
    """``measure`` of each implementation not yet in ``errors``. A baseline that raises goes into ``errors`` (its row
    then says why) so one broken opponent neither stops the run nor vanishes; ours (the first) raising is a bug in the
    op and propagates."""
    ours = next(iter(case.impls))
    out: dict[str, T] = {}
    for name, fn in case.impls.items():
        if name in errors:
            continue
        if name == ours:
            out[name] = measure(fn)
            continue
        try:
            out[name] = measure(fn)
        except Exception as exc:
            errors[name] = _error_text(exc)
    return out


def _failed_row(case: Case, name: str, error: str, best_floor: float) -> dict:
    """A baseline that did not run: its row keeps the columns of a measured one, with no numbers and its error."""
    row = {"op": case.op, "shape": case.label, "impl": name}
    row.update(dict.fromkeys(f.name for f in fields(Timing)))
    row.update(
        ratio_to_baseline=None,
        baseline=case.baseline,
        floor_ms=best_floor,
        fraction_of_floor=None,
        peak_mem_mb=None,
        mem_ratio_to_baseline=None,
        mem_method=None,
        params=case.params,
        error=error,
    )
    return row


def run_benchmarks(device: torch.device | str, ops: list[str] | None = None) -> dict:
    """Time every case on ``device``; returns {"ceilings": ..., "results": [row, ...]} (JSON-ready).

    A baseline that cannot run (its trial call failed when the case was built, or it raised while timed or measured)
    is a row with ``error`` set and no numbers; every other row has ``error: None``. Ratios to a baseline that failed
    are None.
    """
    device = torch.device(device)
    ceilings = measure_ceilings(device)
    rows = []
    for case in build_cases(device, ops):
        errors = dict(case.failed)
        timings = _measure_all(case, lambda fn: time_fn(fn, device), errors)
        # after timing, so every implementation is warm (lazy imports, autotuning) when its memory is read
        peaks = _measure_all(case, lambda fn: measure_peak_memory(fn, device), errors) if case.memory else {}
        base = timings.get(case.baseline)
        base_mem = peaks.get(case.baseline)
        best_floor = floor_ms(case.floor.flops, case.floor.bytes, ceilings)
        for name in [*case.impls, *(n for n in case.failed if n not in case.impls)]:
            if name in errors:
                rows.append(_failed_row(case, name, errors[name], best_floor))
                continue
            t, mem = timings[name], peaks.get(name)
            rows.append(
                {
                    "op": case.op,
                    "shape": case.label,
                    "impl": name,
                    **asdict(t),
                    "ratio_to_baseline": None if base is None else t.median_ms / base.median_ms,
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
                    "error": None,
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


ERROR_CHARS = 160  # of a failed row's error in the table (the JSON keeps all of it)


def format_table(report: dict) -> str:
    c = report["ceilings"]
    lines = [
        f"device: {report['device']}; measured ceilings: copy {c['copy_gbps']:.1f} GB/s, "
        f"matmul {c['matmul_tflops']:.2f} TFLOP/s ({c['matmul_dtype']})",
        f"{'op':<18} {'shape':<24} {'impl':<16} {'median ms':>10} {'p20':>9} {'p80':>9} {'vs base':>8} {'of floor':>9}"
        f" {'peak MB':>9} {'mem vs base':>11}",
    ]
    for r in report["results"]:
        if r.get("error"):
            error = r["error"] if len(r["error"]) <= ERROR_CHARS else r["error"][: ERROR_CHARS - 3] + "..."
            lines.append(f"{r['op']:<18} {r['shape']:<24} {r['impl']:<16} FAILED: {error}")
            continue
        mem, mem_ratio = r.get("peak_mem_mb"), r.get("mem_ratio_to_baseline")
        ratio = r["ratio_to_baseline"]
        lines.append(
            f"{r['op']:<18} {r['shape']:<24} {r['impl']:<16} {r['median_ms']:>10.4f} {r['p20_ms']:>9.4f} "
            f"{r['p80_ms']:>9.4f} {'-' if ratio is None else f'{ratio:.2f}x':>8} {100 * r['fraction_of_floor']:>8.1f}%"
            f" {'-' if mem is None else f'{mem:.1f}':>9} {'-' if mem_ratio is None else f'{mem_ratio:.3f}x':>11}"
        )
    return "\n".join(lines)
