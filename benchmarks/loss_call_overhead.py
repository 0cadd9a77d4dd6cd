"""Per-call cost of the GRPO losses' host-side work (argument and value checks, building the objective) at a small,
overhead-bound shape, for one or more source trees of rlvr_fast timed in turn in fresh processes.

    git worktree add /tmp/before <rev>
    python benchmarks/loss_call_overhead.py /tmp/before . --rounds 3

Each tree is timed in its own subprocess (one torch thread, the torch backend, forward + backward, median of the calls)
and the trees alternate round by round, so a busy machine slows them alike. The numbers are milliseconds per call.

Measured 2026-12-06 on this project's 2-core Intel Xeon (load 0.8), B=16, T=128, fp32 (D=256, V=4096 for the fused
loss), 3 rounds, 02e2ad8 (before the value checks) against b285259: ``grpo_loss`` 0.291-0.325 ms against 0.342-0.382 ms
(+0.05 ms a call: one fused reduction and one host sync of the value checks); ``fused_linear_grpo_loss`` 124.2-129.7
ms against 117.0-128.7 ms (within noise). Both trees import the installed ``rlvr_fast.kernels``; these ops' torch
paths do not use it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

# Run in a child process with the tree to time first on sys.path; prints one JSON line of medians.
CHILD = r"""
import json, os, statistics, sys, time
sys.path.insert(0, sys.argv[1])
os.environ.setdefault("TRITON_INTERPRET", "1")
import torch
torch.set_num_threads(1)
import rlvr_fast
assert rlvr_fast.__file__.startswith(os.path.abspath(sys.argv[1])), rlvr_fast.__file__
from rlvr_fast import fused_linear_grpo_loss, grpo_loss

g = torch.Generator().manual_seed(0)
B, T, D, V = 16, 128, 256, 4096
hidden = torch.randn(B, T, D, generator=g, requires_grad=True)
weight = (torch.randn(V, D, generator=g) * 0.05).requires_grad_(True)
targets = torch.randint(0, V, (B, T), generator=g)
mask = torch.ones(B, T)
adv = torch.randn(B, generator=g)
logp = -torch.rand(B, T, generator=g) * 3
old = (logp + 0.1 * torch.randn(B, T, generator=g)).clamp(max=0)
lp = logp.clone().requires_grad_(True)


def loss_of(out):
    return out.loss if hasattr(out, "loss") else out[0] if isinstance(out, tuple) else out


def fused():
    loss_of(fused_linear_grpo_loss(hidden, weight, targets, mask, adv, old_logp=old, backend="torch")).backward()


def plain():
    loss_of(grpo_loss(lp, old, None, adv, mask, backend="torch")).backward()


result = {}
for name, fn, calls in (("grpo_loss", plain, 200), ("fused_linear_grpo_loss", fused, 15)):
    fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    result[name] = statistics.median(times) * 1e3
print(json.dumps(result))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trees", nargs="+", help="source trees of rlvr_fast (a git worktree per revision)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONSAFEPATH": "1"}
    for round_ in range(args.rounds):
        for tree in args.trees:
            out = subprocess.run(
                [sys.executable, "-c", CHILD, os.path.abspath(tree)], capture_output=True, text=True, env=env
            )
            if out.returncode != 0:
                raise SystemExit(f"{tree}: {out.stderr[-2000:]}")
            medians = json.loads(out.stdout.strip().splitlines()[-1])
            shown = ", ".join(f"{k} {v:.3f} ms" for k, v in medians.items())
            print(f"round {round_} {tree}: {shown}")


if __name__ == "__main__":
    main()
