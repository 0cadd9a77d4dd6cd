"""Command line: ``rlvr-fast <command>``. Commands live in a registry; each has its own parser."""

from __future__ import annotations

import argparse
import json
import sys

from rlvr_fast._version import __version__


def _bench(args: argparse.Namespace) -> int:
    import torch

    from rlvr_fast.benchmark.runner import format_table, run_benchmarks

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    report = run_benchmarks(device, args.ops)
    report["version"] = __version__
    print(format_table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}")
    return 0


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="time the fused ops against their baselines on this machine",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--ops", nargs="*", default=None, help="ops to time (default: all)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.set_defaults(func=_bench)


COMMANDS = [_add_bench]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlvr-fast", description="Fast RLVR (GRPO-family) training and its kernels.")
    parser.add_argument("--version", action="version", version=f"rlvr_fast {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
