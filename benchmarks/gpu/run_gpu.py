"""Time every op on the GPU against its baselines, with the ceilings measured in the same run, and write one JSON.

Called by benchmarks/gpu/run.sh; ``--device cpu`` runs the same code on the CPU as a dry run. For SparseAdamW it also
reports each implementation's bandwidth (GB/s, read + write) against the device-to-device copy measured in the run.
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


def sparse_adamw_bandwidth(report: dict) -> list[dict]:
    """GB/s of every SparseAdamW timing, counting the bytes each implementation must move: ours the sector-granular
    floor of its mask (``floor_bytes_per_param``; also the design count, 32 d), torch's dense AdamW 28 per parameter."""
    copy = report["ceilings"]["copy_gbps"]
    rows = []
    for r in report["results"]:
        if r["op"] != "sparse_adamw" or r.get("error"):  # a baseline that failed is a row of its own, without numbers
            continue
        p, seconds = r["params"], r["median_ms"] * 1e-3
        per_param = p["dense_adamw_bytes_per_param"] if r["impl"] == r["baseline"] else p["floor_bytes_per_param"]
        gbps = per_param * p["numel"] / seconds / 1e9
        rows.append(
            {
                "case": r["shape"],
                "impl": r["impl"],
                "density": p["density"],
                "median_ms": r["median_ms"],
                "bytes_per_param": per_param,
                "gbps": gbps,
                "fraction_of_copy": gbps / copy,
                "design_gbps": (
                    p["dense_adamw_bytes_per_param"]
                    if r["impl"] == r["baseline"]
                    else p["design_floor_bytes_per_param"]
                )
                * p["numel"]
                / seconds
                / 1e9,
            }
        )
    return rows


def format_bandwidth(rows: list[dict], copy_gbps: float) -> str:
    lines = [
        f"SparseAdamW bandwidth (measured copy: {copy_gbps:.0f} GB/s)",
        f"{'case':<24} {'impl':<20} {'ms':>9} {'B/param':>8} {'GB/s':>8} {'of copy':>8} {'GB/s (32d)':>11}",
    ]
    for r in rows:
        lines.append(
            f"{r['case']:<24} {r['impl']:<20} {r['median_ms']:>9.3f} {r['bytes_per_param']:>8.2f} {r['gbps']:>8.0f} "
            f"{100 * r['fraction_of_copy']:>7.1f}% {r['design_gbps']:>11.0f}"
        )
    return "\n".join(lines)


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
    report["sparse_adamw_bandwidth"] = sparse_adamw_bandwidth(report)
    print(format_table(report))
    if report["sparse_adamw_bandwidth"]:
        print(format_bandwidth(report["sparse_adamw_bandwidth"], report["ceilings"]["copy_gbps"]))
    slug = re.sub(r"[^A-Za-z0-9]+", "-", report["device"]).strip("-").lower()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"bench-{slug}-{dt.date.today().isoformat()}.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
