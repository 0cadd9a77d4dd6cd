"""Time every op on the GPU against its baselines, with the ceilings measured in the same run, and write one JSON.

Called by benchmarks/gpu/run.sh; ``--device cpu`` runs the same code on the CPU as a dry run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import subprocess
import sys

import torch

from rlvr_fast import __version__
from rlvr_fast.benchmark.runner import format_table, run_benchmarks


def _commit() -> str:
    if os.environ.get("RLVR_FAST_COMMIT"):
        return os.environ["RLVR_FAST_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tests-rc", type=int, default=None, help="exit status of the CUDA test run")
    parser.add_argument("--ops", nargs="*", default=None)
    args = parser.parse_args()

    device = torch.device(args.device)
    report = run_benchmarks(device, args.ops)
    import triton

    report.update(
        date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        commit=_commit(),
        rlvr_fast=__version__,
        torch=torch.__version__,
        triton=triton.__version__,
        cuda=torch.version.cuda,
        tests_rc=args.tests_rc,
    )
    print(format_table(report))
    slug = re.sub(r"[^A-Za-z0-9]+", "-", report["device"]).strip("-").lower()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"bench-{slug}-{dt.date.today().isoformat()}.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
