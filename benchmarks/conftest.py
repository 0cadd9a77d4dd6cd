"""pytest-benchmark suite on the CPU (or CUDA with --bench-device cuda).

Run: ``pytest benchmarks/ --benchmark-group-by=group --benchmark-columns=median,iqr,ops``. Each test times one
implementation of one case from ``rlvr_fast.benchmark.cases``; tests of a case share a benchmark group, so
pytest-benchmark's table puts ours and the baselines side by side.
"""

import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--bench-device", default="cpu", help="device to benchmark on (cpu or cuda)")


@pytest.fixture(scope="session")
def bench_device(pytestconfig):
    device = torch.device(pytestconfig.getoption("--bench-device"))
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return device
