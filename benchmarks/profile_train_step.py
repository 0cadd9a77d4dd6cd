"""Where one training step's time goes, op by op: torch.profiler over ``Trainer.train_step`` of the main job's model
at a train-step benchmark shape, after warm-up steps, as a short table.

    python benchmarks/profile_train_step.py                        # default shape, the run's dtype (auto)
    python benchmarks/profile_train_step.py --dtype float32 --steps 2

For each part of the step (``StepTimer``'s parts, labelled in the profile) the table gives the wall seconds, the
seconds inside torch operators (the profiler's self CPU time of every op under the part, summed) and the rest, which
is Python, dispatch and waiting; then the operators that take the most self CPU time, with their call counts (a
decode step's many small calls show up as high counts of cheap ops). Writes a markdown table and its JSON to
``benchmarks/results/`` named after the CPU and the dtype.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import trl_bench_common as common  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--shape", choices=sorted(common.SHAPES), default="default", help="the batch (trl_bench_common)"
    )
    parser.add_argument("--dtype", default="auto", help="RLVRConfig.dtype (auto, float32, bfloat16, autocast_bf16)")
    parser.add_argument("--warmup", type=int, default=1, help="steps before the profiled ones")
    parser.add_argument("--steps", type=int, default=1, help="profiled steps")
    parser.add_argument("--top", type=int, default=20, help="operators listed")
    parser.add_argument("--out", default=None, help="markdown path (default benchmarks/results/profile-...)")
    return parser


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def _parts_of(events) -> tuple[dict[str, float], dict[str, collections.Counter]]:
    """Self CPU microseconds of the operators under each ``step:<part>`` label (the innermost label wins): the total
    per part, and per part per operator name."""
    labels = [e for e in events if e.name.startswith("step:")]
    spans = sorted((e.time_range.start, e.time_range.end, e.name.removeprefix("step:")) for e in labels)
    totals: dict[str, float] = collections.defaultdict(float)
    by_op: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for e in events:
        if e.name.startswith("step:") or e.device_type.name != "CPU":
            continue
        start = e.time_range.start
        owner = "outside the parts"
        for s, end, part in spans:
            if s <= start < end:
                owner = part
        totals[owner] += e.self_cpu_time_total
        by_op[owner][e.name] += e.self_cpu_time_total
    return dict(totals), dict(by_op)


def main() -> int:
    args = build_parser().parse_args()
    import torch
    from torch.profiler import ProfilerActivity, profile

    from rlvr_fast.trainer.loop import Trainer

    shape = common.SHAPES[args.shape]
    with tempfile.TemporaryDirectory() as out:
        cfg = common.trainer_config(shape, out, steps=args.warmup + args.steps, dtype=args.dtype)
        trainer = Trainer(cfg)
        for step in range(args.warmup):
            trainer.train_step(step)
        records = []
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for step in range(args.warmup, args.warmup + args.steps):
                records.append(trainer.train_step(step))
    events = prof.events()
    inside, by_op = _parts_of(events)
    parts = [k.removeprefix("time_").removesuffix("_s") for k in records[0] if k.startswith("time_")]
    wall = {p: sum(r[f"time_{p}_s"] for r in records) for p in parts}
    rows = []
    for part in parts:
        ops_s = inside.get(part, 0.0) / 1e6
        rows.append((part, wall[part], ops_s, wall[part] - ops_s))
    table = sorted(prof.key_averages(), key=lambda a: a.self_cpu_time_total, reverse=True)[: args.top]
    total_wall = sum(r["seconds"] for r in records)
    precision = trainer.precision.describe()
    lines = [
        f"# One training step, op by op ({args.shape} shape, {args.steps} profiled step(s) after {args.warmup})",
        "",
        f"CPU: {_cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}; {precision}.",
        f"Step wall time: {total_wall / args.steps:.2f} s per step.",
        "",
        "| part | wall s | in torch ops s | Python, dispatch, waiting s | floor fraction |",
        "|---|---|---|---|---|",
    ]
    for part, w, ops_s, rest in rows:
        fractions = [r.get(f"floor_fraction_{part}") for r in records if r.get(f"floor_fraction_{part}") is not None]
        fraction = f"{100 * sum(fractions) / len(fractions):.1f}%" if fractions else "-"
        lines.append(f"| {part} | {w:.2f} | {ops_s:.2f} | {rest:.2f} | {fraction} |")
    lines += ["", "| operator | self CPU s | calls | per call ms |", "|---|---|---|---|"]
    for a in table:
        self_s = a.self_cpu_time_total / 1e6
        lines.append(f"| `{a.key}` | {self_s:.2f} | {a.count} | {1e3 * self_s / max(a.count, 1):.3f} |")
    for part in ("generation", "forward_backward"):
        top = by_op.get(part, collections.Counter()).most_common(8)
        lines += ["", f"{part}: the operators with the most self CPU time", ""]
        lines += [f"- `{name}` {us / 1e6:.2f} s" for name, us in top]
    text = "\n".join(lines) + "\n"
    print(text)
    cpu_tag = "".join(c if c.isalnum() else "-" for c in _cpu_name().lower()).strip("-")
    path = args.out or os.path.join(HERE, "results", f"profile-train-step-{args.shape}-{args.dtype}-{cpu_tag}.md")
    with open(path, "w") as fh:
        fh.write(text)
    with open(path.removesuffix(".md") + ".json", "w") as fh:
        json.dump(
            {
                "cpu": _cpu_name(),
                "precision": precision,
                "parts": [dict(zip(("part", "wall_s", "ops_s", "rest_s"), r, strict=True)) for r in rows],
                "operators": [
                    {"op": a.key, "self_cpu_s": a.self_cpu_time_total / 1e6, "calls": a.count} for a in table
                ],
                "records": records,
            },
            fh,
            indent=1,
        )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
