"""The CUDA extension rlvr_fast._C from the Python side, on any machine.

Its kernels run in tests/ops/test_group_advantage.py and tests/ops/test_sparse_adamw.py (the "cuda" backend cases,
skipped with the reason where the extension or a GPU is missing) and are compile-checked by
csrc/check/compile_check.sh. Here: the constants the C ABI (csrc/rlvr_fast_kernels.h) shares with Python agree, and
asking for backend="cuda" where it cannot run raises with the reason for both ops.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import rlvr_fast
from rlvr_fast.backends import BackendUnavailableError
from rlvr_fast.ops.group_advantage import ESTIMATORS, SAMPLE_MODE_CODES, SCALES, group_advantages
from rlvr_fast.optim import sparse_adamw as sa
from rlvr_fast.optim.sparse_adamw import SparseAdamW

CSRC = Path(__file__).resolve().parents[2] / "csrc"
HEADER = CSRC / "rlvr_fast_kernels.h"


def header_constants() -> dict[str, int]:
    return {name: int(value) for name, value in re.findall(r"\b(RF_\w+)\s*=\s*(-?\d+)", HEADER.read_text())}


def test_group_advantage_codes_match_the_c_abi():
    c = header_constants()
    assert {n: e.code for n, e in ESTIMATORS.items()} == {n: c[f"RF_GA_{n.upper()}"] for n in ESTIMATORS}
    assert {n: c[f"RF_GA_SCALE_{n.upper()}"] for n in SCALES} == SCALES
    short = {"all": "ALL", "positive_only": "POSITIVE", "negative_only": "NEGATIVE"}
    assert {n: c[f"RF_GA_SAMPLE_{short[n]}"] for n in SAMPLE_MODE_CODES} == SAMPLE_MODE_CODES


def test_sparse_adamw_layout_matches_the_c_abi():
    c = header_constants()
    assert c["RF_ENTRY_ALIGN"] == sa.ENTRY_ALIGN
    assert c["RF_ENTRY_ALIGN"] % c["RF_SPARSE_ADAMW_VEC"] == 0  # every segment starts on a vector boundary
    assert (
        c["RF_SPARSE_ADAMW_TILE"]
        == c["RF_SPARSE_ADAMW_THREADS"] * c["RF_SPARSE_ADAMW_VEC"] * c["RF_SPARSE_ADAMW_UNROLL"]
    )
    # the per-segment coefficients: the struct's float fields in HYPER_FIELDS order, and the binding's row count
    struct = re.search(r"typedef struct RfAdamwSegment \{(.*?)\} RfAdamwSegment;", HEADER.read_text(), re.S).group(1)
    assert tuple(re.findall(r"^\s*float (\w+);", struct, re.M)) == sa.HYPER_FIELDS
    rows = re.search(r"kHyperRows = (\d+);", (CSRC / "bindings.cpp").read_text())
    assert int(rows.group(1)) == len(sa.HYPER_FIELDS)


def test_extension_sources_are_what_setup_builds():
    """setup.py compiles csrc/*.cpp + csrc/*.cu (not csrc/check/): one binding and one kernel file per op."""
    sources = sorted(p.name for pat in ("*.cpp", "*.cu") for p in CSRC.glob(pat))
    assert sources == ["bindings.cpp", "group_advantage.cu", "sparse_adamw.cu"]
    ops = re.findall(r'm\.impl\("(\w+)"', (CSRC / "bindings.cpp").read_text())
    assert sorted(ops) == sorted([sa.CUDA_OP, rlvr_fast.ops.group_advantage.CUDA_OP])


def _expected_reason() -> str:
    if not rlvr_fast.HAS_CUDA_EXT:
        return "the extension rlvr_fast._C is not built"
    return "the CUDA kernel needs CUDA tensors; got tensors on cpu"


@pytest.mark.parametrize("op", ["group_advantages", "SparseAdamW"])
def test_cuda_backend_on_cpu_tensors_raises_with_the_reason(op):
    """On this machine (CPU tensors; the extension absent unless torch has CUDA): never a silent fallback."""
    match = re.escape(f"{op}: backend='cuda' is unavailable: {_expected_reason()}")
    with pytest.raises(BackendUnavailableError, match=match):
        if op == "group_advantages":
            group_advantages(torch.rand(8), 4, backend="cuda")
        else:
            SparseAdamW([torch.zeros(3)], [torch.tensor([True, False, True])], backend="cuda")


def test_auto_never_picks_cuda_for_cpu_tensors():
    assert group_advantages(torch.rand(8), 4, backend="auto").backend in ("triton", "torch")
    opt = SparseAdamW([torch.zeros(3)], None, backend="auto")
    assert set(opt.backends.values()) <= {"triton", "torch"}
