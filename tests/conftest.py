"""Test setup shared by every test module.

On a machine without CUDA the tests run on CPU tensors, the Triton kernels through the interpreter: TRITON_INTERPRET=1
must be set before any module defining an @triton.jit kernel is imported, so it is set here, at the very top. On a CUDA
machine the tests run on the GPU with compiled kernels (the interpreter stays off).
"""

import os
import sys
from pathlib import Path

# The repository root holds kernels/ (installed as the subpackage rlvr_fast.kernels). `python -m pytest` puts the
# current folder on sys.path, where that folder would shadow the PyPI package `kernels` that transformers >= 5.25
# imports ("cannot import name 'CUDAProperties' from 'kernels'"). The tests use the installed package, so the root
# leaves sys.path here, before anything imports transformers, and the tests' subprocesses do not put it back.
_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _ROOT]
os.environ["PYTHONSAFEPATH"] = "1"

import torch  # noqa: E402  (importing torch imports no kernel module of ours)

ON_CUDA = torch.cuda.is_available()
if not ON_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import hashlib  # noqa: E402
import random  # noqa: E402

import pytest  # noqa: E402

# Fresh random inputs on every run, reproducible from the seed printed in pytest's header:
# RLVR_FAST_TEST_SEED=<seed> pytest ... replays a failing run.
SESSION_SEED = int(os.environ.get("RLVR_FAST_TEST_SEED", random.SystemRandom().randrange(2**31)))


def pytest_report_header(config):
    interpret = os.environ.get("TRITON_INTERPRET")
    return f"rlvr_fast test seed: RLVR_FAST_TEST_SEED={SESSION_SEED}  TRITON_INTERPRET={interpret}"


@pytest.fixture(autouse=True)
def seeded(request):
    """Seed torch and random per test from the session seed and the test's id, and return the seed."""
    digest = hashlib.sha256(f"{SESSION_SEED}:{request.node.nodeid}".encode()).digest()
    seed = int.from_bytes(digest[:4], "little")
    torch.manual_seed(seed)
    random.seed(seed)
    return seed


@pytest.fixture(scope="session")
def device():
    """Where the tests run: CUDA when present (compiled kernels), else the CPU (Triton through the interpreter)."""
    return torch.device("cuda" if ON_CUDA else "cpu")


@pytest.fixture
def generator(seeded):
    """A torch.Generator on the CPU seeded like the test, for explicit draws."""
    return torch.Generator().manual_seed(seeded)
