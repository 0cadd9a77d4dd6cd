"""Command line: ``rlvr-fast <command>``. Commands live in a registry; each has its own parser."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import NoReturn

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


# Under torchrun, how long a rank other than 0 keeps a refusal to itself: every rank reaches the same verdict on the
# same config, rank 0 says it and exits, and torchrun's agent (polling every 0.1 s) stops the others before this ends.
NON_MAIN_RANK_GRACE_S = 5.0


def say_once(line: str) -> None:
    """Write ``line`` to stderr once per world: at once on rank 0 (or without torchrun); on another rank, tagged with
    its rank, only if it is still running after ``NON_MAIN_RANK_GRACE_S`` (a verdict of its own: rank 0 went on).
    Every rank reaches the same verdict on the same config or the same shared failure, so a world of N processes says
    it once, not N times."""
    if _world_size() > 1 and not _is_main_rank():
        time.sleep(NON_MAIN_RANK_GRACE_S)
        line = f"[rank {os.environ.get('RANK')}] {line}"
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def refuse(prog: str, message: str, hint: str = "") -> NoReturn:
    """Print ``<prog>: error: <message>`` (and a short ``hint``) in one line once per world (``say_once``) and exit
    with status 2 (no traceback, no usage text)."""
    say_once(f"{prog}: error: {message}" + (f" {hint}" if hint else ""))
    sys.exit(2)


class _Parser(argparse.ArgumentParser):
    """argparse's parser (the top level and every command's), whose errors are one line (``refuse``: exit 2, once per
    torchrun world) pointing at --help, instead of argparse's usage block of every option followed by the error."""

    def error(self, message: str) -> NoReturn:
        refuse(self.prog, message, hint=f"({self.prog} --help lists every option)")


def _config(args: argparse.Namespace):
    from rlvr_fast.trainer.config import config_from_args

    try:
        return config_from_args(args)
    except (ValueError, OSError) as exc:
        raise ConfigError(str(exc)) from exc


def _train(args: argparse.Namespace) -> int:
    from rlvr_fast.trainer.checkpoint.strict_loading import CheckpointWriteError
    from rlvr_fast.trainer.checks.capacity import check_world
    from rlvr_fast.trainer.checks.preflight import preflight
    from rlvr_fast.trainer.loop import train
    from rlvr_fast.trainer.update.finite_guard import NonFiniteError

    cfg = _config(args)
    # Everything checkable before the model loads: exit 2 in seconds, not after the load. Under torchrun rank 0 alone
    # runs it (only one process prepares the folder), before it joins the process group: a refusal is then one line
    # from rank 0, and torchrun stops the other ranks, which wait for rank 0 in the group's rendezvous.
    try:
        if _is_main_rank():
            preflight(cfg)
        else:
            check_world(cfg)  # what each rank checks alone before joining the group: refused by rank 0 too
    except (ValueError, OSError) as exc:
        raise ConfigError(str(exc)) from exc
    try:
        result = train(cfg)
    except (NonFiniteError, CheckpointWriteError) as exc:  # a diverged run, a checkpoint a full disk refused
        # every rank raises it (the checks agree across the world): rank 0 says it, once per world
        say_once(f"rlvr-fast train: error: {exc}")
        return 1
    finally:
        _leave_process_group()
    if not _is_main_rank():
        return 0
    print()
    print(
        f"held-out pass@k before and after training ({len(result.after['correct_counts'])} problems x "
        f"n={result.after['n']} samples, 95% CIs):"
    )
    print(result.table)
    print(f"report: {result.output_dir}/report.md")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from rlvr_fast.trainer.checkpoint.strict_loading import CheckpointError
    from rlvr_fast.trainer.checks.preflight import preflight_eval
    from rlvr_fast.trainer.evaluation.command import explicit_fields, run_eval

    cfg = _config(args)
    try:  # a checkpoint's run decides the held-out split unless the command line says otherwise (and it says which)
        cfg = preflight_eval(cfg, args.checkpoint, explicit=explicit_fields(args))
    except (ValueError, OSError) as exc:
        raise ConfigError(str(exc)) from exc
    try:
        result = run_eval(cfg, checkpoint=args.checkpoint)
    except (CheckpointError, OSError) as exc:  # a checkpoint of another model is refused after the load, strictly
        raise ConfigError(str(exc)) from exc
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


def _parse_set(text: str) -> tuple[str, object]:
    """'key=value' with a YAML value: --set lr=1e-5, --set rewards='{correct: 1.0}'."""
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    return key.strip(), yaml.safe_load(value)


def _study(args: argparse.Namespace) -> int:
    from rlvr_fast.study import plan_study, run_study
    from rlvr_fast.trainer.schema import ConfigFieldError

    try:
        plan = plan_study(
            args.preset,
            arms=[a for a in args.arms.split(",") if a.strip()] if args.arms is not None else None,
            arms_file=args.arms_file,
            steps=args.steps,
            seeds=args.seeds,
            model=args.model,
            task=args.task,
            overrides=dict(args.set or []),
            output_dir=args.output_dir,
            cells=[c.strip() for c in args.cells.split(",") if c.strip()] if args.cells is not None else None,
        )
    except (ValueError, OSError) as exc:
        raise ConfigError(str(exc)) from exc
    runs = ", ".join(r.key for r in plan.runs)
    print(f"study {args.output_dir}: preset {plan.preset}, {len(plan.runs)} runs: {runs}")
    if args.dry_run:
        return 0
    try:
        outcome = run_study(
            plan,
            keep_checkpoints=args.keep_checkpoints,
            retry_failed=not args.no_retry_failed,
            command="rlvr-fast " + " ".join(sys.argv[1:]),
        )
    except ConfigFieldError as exc:  # the output folder refused (held, not a study's, a changed finished run)
        raise ConfigError(str(exc)) from exc
    counts = {s: list(outcome.statuses.values()).count(s) for s in sorted(set(outcome.statuses.values()))}
    print(f"runs: {counts}; report: {outcome.report}; every number: {outcome.study_json}")
    return 0 if all(s == "done" for s in outcome.statuses.values()) else 1


def _add_study(sub: argparse._SubParsersAction) -> None:
    from rlvr_fast.study.arms import ALIASES, ARMS
    from rlvr_fast.study.presets import PRESETS

    p = sub.add_parser(
        "study",
        help="does reward engineering matter for this model? one short run per arm, one report with CIs",
        description="Runs a grid of short training runs from the same base model, one per arm (reward, sample, "
        "difficulty, optimizer), each a normal trainer run in OUTPUT_DIR/arms/<arm>/seed<i>/, and writes "
        "OUTPUT_DIR/report.md, PNG figures and study.json. Rerun the same command to continue an interrupted study. "
        f"Presets: {'; '.join(f'{n}: {p.doc}' for n, p in PRESETS.items())}. Arms: {', '.join(ARMS)}; aliases: "
        f"{', '.join(f'{a}={t}' for a, t in ALIASES.items())}.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--preset", default="default", choices=sorted(PRESETS), help="base config, arms and seeds")
    p.add_argument("--arms", default=None, help="comma-separated arm names replacing the preset's (e.g. correct,nsr)")
    p.add_argument(
        "--arms-file",
        default=None,
        help="YAML mapping arm name -> RLVRConfig overrides, merged into the "
        "registry (or name -> {overrides: ..., doc: ..., group: ..., mask_from: ...})",
    )
    p.add_argument(
        "--model", default=None, help="base model for every arm (None: the preset's, else the trainer's default)"
    )
    p.add_argument("--task", default=None, help="training task for every arm: 'arithmetic' or a JSONL file")
    p.add_argument("--steps", type=int, default=None, help="training steps per run (None: the preset's)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per arm (None: the preset's per-arm counts)")
    p.add_argument(
        "--cells",
        default=None,
        help="comma-separated cell names of a preset with cells (models-quick, models) to run (None: every cell)",
    )
    p.add_argument(
        "--set",
        action="append",
        type=_parse_set,
        default=None,
        metavar="KEY=VALUE",
        help="base RLVRConfig override for every arm (repeatable; YAML value)",
    )
    p.add_argument("--output-dir", default="runs/study", help="the study folder (state, runs, report)")
    p.add_argument(
        "--keep-checkpoints",
        default="none",
        choices=["all", "final", "none"],
        help="checkpoints kept of a finished run (default none: a SmolLM2-135M checkpoint with optimizer: 1.6 GB)",
    )
    p.add_argument("--no-retry-failed", action="store_true", help="leave failed / skipped runs as recorded on rerun")
    p.add_argument(
        "--dry-run", action="store_true", help="validate every arm's config and list the runs, train nothing"
    )
    p.set_defaults(func=_study)


COMMANDS = [_add_train, _add_eval, _add_study, _add_bench]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="rlvr-fast", description="Fast RLVR (GRPO-family) training and its kernels.")
    parser.add_argument("--version", action="version", version=f"rlvr_fast {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add in COMMANDS:
        add(sub)
    parser.commands = sub.choices  # name -> that command's parser, which reports its errors (``_main``)
    return parser


def _world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _leave_process_group() -> None:
    if _world_size() > 1:
        from rlvr_fast.trainer.parallel.collectives import leave_process_group

        leave_process_group()


def _is_main_rank() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def main(argv: list[str] | None = None) -> int:
    """``rlvr-fast <command>``. Under torchrun (WORLD_SIZE > 1) a rank that raises records its traceback for the
    elastic agent (``torch.distributed.elastic``'s ``@record``), which stops the other ranks and reports the failed
    rank's number and error (docs/design.md, "Data parallelism"). A rank that joined the process group does not return:
    it ends with its exit status without the interpreter's finalization
    (``parallel.collectives.exit_without_finalizing``)."""
    if _world_size() > 1:
        from torch.distributed.elastic.multiprocessing.errors import record

        from rlvr_fast.trainer.parallel.collectives import exit_status, exit_without_finalizing, joined_process_group

        try:
            code = record(_main)(argv)
        except BaseException as exc:
            if not joined_process_group():
                raise
            code = exit_status(exc)
        if not joined_process_group():
            return code
        # a rank that joined the group ends here, before the interpreter's finalization, in which the group's gloo
        # threads (alive past destroy_process_group) could abort it (``exit_without_finalizing``)
        _leave_process_group()
        exit_without_finalizing(0 if code is None else code)
    return _main(argv)


def _main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # reported by the command's parser (argparse's own would name only "rlvr-fast")
        parser.commands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return args.func(args)
    except ConfigError as exc:
        refuse(f"rlvr-fast {args.command}", str(exc))


if __name__ == "__main__":
    sys.exit(main())
