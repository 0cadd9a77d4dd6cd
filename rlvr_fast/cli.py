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


class ConfigError(Exception):
    """A bad option: reported in one line, exit status 2, no traceback."""


def _config(args: argparse.Namespace):
    from rlvr_fast.trainer.config import config_from_args

    try:
        return config_from_args(args)
    except (ValueError, OSError) as exc:
        raise ConfigError(str(exc)) from exc


def _train(args: argparse.Namespace) -> int:
    from rlvr_fast.trainer.loop import train

    cfg = _config(args)
    result = train(cfg)
    print()
    print(f"held-out pass@k before and after training ({len(result.after['correct_counts'])} problems x "
          f"n={result.after['n']} samples, 95% CIs):")
    print(result.table)
    print(f"report: {result.output_dir}/report.md")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from rlvr_fast.trainer.evaluate_cli import run_eval

    cfg = _config(args)
    result = run_eval(cfg, checkpoint=args.checkpoint)
    print(result)
    return 0


def _add_train(sub: argparse._SubParsersAction) -> None:
    from rlvr_fast.trainer.config import add_config_arguments

    p = sub.add_parser(
        "train",
        help="train a policy with GRPO-family RLVR (defaults: SmolLM2-135M-Instruct on clean arithmetic)",
        description="Every option below is a field of rlvr_fast.trainer.RLVRConfig; --config reads them from YAML.",
    )
    add_config_arguments(p)
    p.set_defaults(func=_train)


def _add_eval(sub: argparse._SubParsersAction) -> None:
    from rlvr_fast.trainer.config import add_config_arguments

    p = sub.add_parser("eval", help="pass@k (and calibration, formats) of a model or checkpoint on held-out problems")
    p.add_argument("--checkpoint", default=None, help="a checkpoint folder (output_dir/checkpoints/step-N) to load")
    add_config_arguments(p)
    p.set_defaults(func=_eval)


COMMANDS = [_add_train, _add_eval, _add_bench]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlvr-fast", description="Fast RLVR (GRPO-family) training and its kernels.")
    parser.add_argument("--version", action="version", version=f"rlvr_fast {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        parser.exit(2, f"rlvr-fast {args.command}: error: {exc}\n")


if __name__ == "__main__":
    sys.exit(main())
