"""The ahead-of-time compile check (kernels/check/aot_compile.py) fails on what it must fail on.

The checker compiles real kernels, which the Triton interpreter (on in this test session, see conftest.py) replaces,
so each check runs in a subprocess without TRITON_INTERPRET: one tiny kernel compiled for sm_80 with a valid and with a
broken constexpr (a compile error), and result rows over the shared-memory and spill limits.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CHECKER = REPO / "kernels" / "check" / "aot_compile.py"

PROBE_KERNEL = """
import triton
import triton.language as tl


@triton.jit
def probe_kernel(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # BLOCK must be a power of 2
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    tl.store(x_ptr + offs, x * 2.0, mask=offs < n)
"""

DRIVER = """
import json, sys
import torch
sys.path[:0] = [sys.argv[1], sys.argv[2]]
import aot_compile as aot
from probe_kernels import probe_kernel
from rlvr_fast.kernels.launch_plan import KernelLaunch

x = torch.empty(1000)
out = {}
for block in (128, 96):
    launch = KernelLaunch(probe_kernel, (8,), (x, 1000), {"BLOCK": block}, num_warps=4)
    (job,) = aot.bind(launch, aot.TARGETS[80])
    row = aot.compile_job(job)
    out[str(block)] = {"row": row, "problems": aot.problems(row)}
ok = out["128"]["row"]
out["over_shared"] = aot.problems({**ok, "shared_bytes": aot.TARGETS[80].shared_limit + 1})
out["shared_at_limit"] = aot.problems({**ok, "shared_bytes": aot.TARGETS[80].shared_limit})
out["sm90_fits_more"] = aot.problems({**ok, "target": "sm_90", "shared_bytes": aot.TARGETS[80].shared_limit + 1})
out["spill"] = aot.problems({**ok, "spill_stores": 40, "spill_loads": 28})
out["spill_at_limit"] = aot.problems({**ok, "spill_stores": 32, "spill_loads": 32})
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def checked(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("aot")
    (tmp / "probe_kernels.py").write_text(textwrap.dedent(PROBE_KERNEL))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp / "triton-cache")
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, str(tmp), str(CHECKER.parent)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def test_a_valid_config_compiles_and_passes(checked):
    row = checked["128"]["row"]
    assert "error" not in row, row
    assert checked["128"]["problems"] == []
    assert row["target"] == "sm_80" and row["num_warps"] == 4
    assert 0 < row["registers"] <= 255
    assert row["spill_stores"] == row["spill_loads"] == 0
    assert row["compile_s"] > 0


def test_a_compile_error_fails(checked):
    row = checked["96"]["row"]  # tl.arange of a length that is not a power of 2
    assert "error" in row
    (problem,) = checked["96"]["problems"]
    assert problem.startswith("compile error")


def test_shared_memory_over_the_target_limit_fails(checked):
    (problem,) = checked["over_shared"]
    assert "shared memory 166913 B > 166912 B" in problem
    assert checked["shared_at_limit"] == []
    assert checked["sm90_fits_more"] == []  # sm_90 allows 232448 B per block


def test_spills_over_the_threshold_fail(checked):
    (problem,) = checked["spill"]
    assert "spills 40 B stored + 28 B loaded > 64 B allowed" in problem
    assert checked["spill_at_limit"] == []


def test_committed_table_covers_every_kernel_on_both_targets():
    """The committed result lists every @triton.jit kernel of kernels/*.py (the launched ones: named *_kernel; the
    others are device functions they call) on sm_80 and sm_90, with no failure."""
    data = json.loads((REPO / "benchmarks" / "results" / "triton-aot-sm80-sm90.json").read_text())
    assert data["failures"] == 0
    kernels = set()
    for path in (REPO / "kernels").glob("*.py"):
        kernels |= set(re.findall(r"@triton\.jit(?:\([^)]*\))?\ndef (\w+_kernel)\(", path.read_text()))
    assert len(kernels) >= 10, kernels
    compiled = {(r["kernel"], r["target"]) for r in data["results"]}
    assert compiled == {(k, t) for k in kernels for t in ("sm_80", "sm_90")}
    for r in data["results"]:
        assert "error" not in r, r
        assert r["spill_stores"] + r["spill_loads"] <= data["spill_limit_bytes"], r
        assert r["shared_bytes"] <= data["targets"][r["target"]]["shared_limit"], r


def test_record_launches_records_instead_of_running_and_the_plan_runs_as_the_launcher():
    """A launcher inside record_launches() returns without running its kernel; the recorded plan, launched, computes
    exactly what the launcher computes."""
    import torch
    from rlvr_fast.kernels import group_advantage as k
    from rlvr_fast.kernels.launch_plan import record_launches

    from rlvr_fast.ops import constants as codes

    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.5, 0.0, 2.0])
    kwargs = dict(
        n_groups=3, group_size=3, estimator=codes.ADV_GRPO, scale=codes.SCALE_GROUP, sample_mode=codes.SAMPLE_ALL
    )
    with record_launches() as recorded:
        out = k.group_advantage_fwd(rewards, None, **kwargs, eps=1e-6, lam=0.1, out=k.empty_outputs(3, 3, "cpu"))
    assert out.flags.abs().sum() == 0  # zeros as allocated: the kernel did not run
    (launch,) = recorded
    assert launch.name == "_group_advantage_fwd_kernel" and launch.num_warps == 4
    assert launch.constexprs["BLOCK_G"] == 4 and launch.constexprs["HAS_CORRECT"] is False
    (variant,) = launch.variants()
    assert variant.config == "fixed" and variant.constexprs == dict(launch.constexprs)
    launch.launch()
    expected = k.group_advantage_fwd(rewards, None, **kwargs, eps=1e-6, lam=0.1)
    torch.testing.assert_close(out.advantages, expected.advantages, rtol=0, atol=0)
    torch.testing.assert_close(out.flags, expected.flags, rtol=0, atol=0)
    assert out.flags[0].tolist() == [0, 1, 0]  # the all-equal group
