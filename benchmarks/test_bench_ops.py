"""Every benchmark case, every implementation, timed by pytest-benchmark (ratios: compare within a group)."""

import pytest
import torch

from rlvr_fast.benchmark.cases import CASES, build_cases


def _case_ids():
    # Build on the CPU once at collection to learn the (case, impl) pairs; inputs are rebuilt per device in the test.
    return [(op, case.label, impl) for op in CASES for case in build_cases("cpu", [op]) for impl in case.impls]


@pytest.mark.parametrize("op,label,impl", _case_ids(), ids=lambda v: str(v).replace(" ", "_"))
def test_bench(benchmark, bench_device, op, label, impl):
    case = next(c for c in build_cases(bench_device, [op]) if c.label == label)
    fn = case.impls[impl]
    benchmark.group = f"{op} {label}"
    benchmark.extra_info.update(op=op, shape=label, impl=impl, baseline=case.baseline, **case.params)
    if bench_device.type == "cuda":
        benchmark.pedantic(lambda: (fn(), torch.cuda.synchronize()), rounds=50, warmup_rounds=5)
    else:
        benchmark(fn)
