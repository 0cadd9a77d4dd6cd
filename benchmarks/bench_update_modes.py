"""One GRPO training step by update mode: full AdamW, sparse_adamw (random:0.1), LoRA (our trainer, ``adapter=lora``)
and TRL's stock GRPOTrainer with the same PEFT LoRA config, each in its own fresh process, on the same model, prompts,
batch, reward and sampling as ``bench_train_step_vs_trl.py`` (whose two sides this reuses; its module doc says what is
equal and what differs by design).

Reported per mode: seconds per step (median of ``--steps`` after ``--warmup``; the fastest too), the process's peak RSS
and the peak RSS of the training steps alone, and the ratios to full AdamW. LoRA: rank ``--lora-rank`` (16), alpha 32,
all-linear targets (lm_head excluded) on both sides.

    python benchmarks/bench_update_modes.py                # the default shape (minutes per mode)
    python benchmarks/bench_update_modes.py --quick        # a smoke run: 1 step of 2 prompts x 4 x 8 tokens
    python benchmarks/bench_update_modes.py --modes lora trl_lora
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench_train_step_vs_trl as base  # noqa: E402
import trl_bench_common as common  # noqa: E402

# mode -> (side, our RLVRConfig overrides)
MODES = {
    "adamw": ("ours", {}),
    "sparse_adamw": ("ours", {"optimizer": "sparse_adamw", "mask_source": "random:0.1"}),
    "lora": ("ours", {"adapter": "lora"}),
    "trl_lora": ("trl", {}),
}


def lora_overrides(args) -> dict:
    return {"lora_rank": args.lora_rank, "lora_alpha": 2 * args.lora_rank, "lora_target_modules": "all-linear"}


def child(args) -> None:
    side, overrides = MODES[args.mode]
    if args.mode == "lora":
        overrides = {**overrides, **lora_overrides(args)}
    plain_config = base.our_config
    base.our_config = lambda a, out: plain_config(a, out).__class__(**{**plain_config(a, out).to_dict(), **overrides})
    if args.mode == "trl_lora":  # TRL's GRPOTrainer given the same LoRA as ours
        import trl
        from peft import LoraConfig

        stock = trl.GRPOTrainer
        peft_config = LoraConfig(
            r=args.lora_rank, lora_alpha=2 * args.lora_rank, target_modules="all-linear", task_type="CAUSAL_LM"
        )

        class GRPOTrainerWithLora(stock):
            def __init__(self, *a, **k):
                super().__init__(*a, peft_config=peft_config, **k)

        trl.GRPOTrainer = GRPOTrainerWithLora
    args.side = side
    base.child(args)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--shape", choices=sorted(common.SHAPES), default="default")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 3; --quick: 1)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 1; --quick: 0)")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--precision", choices=sorted(base.PRECISIONS), default="float32")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 step, 2 prompts x 4 x 8 tokens")
    parser.add_argument("--out", default=None, help="JSON report (default: benchmarks/results/update-modes-<date>)")
    parser.add_argument("--mode", choices=list(MODES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = common.SHAPES[args.shape]
    args.prompts, args.group, args.completion_len = (
        (2, 4, 8) if args.quick else (shape.prompts, shape.group, shape.completion_len)
    )
    quick_steps = (1, 0) if args.quick else (3, 1)  # a smoke run times one cold step unless told otherwise
    args.steps = quick_steps[0] if args.steps is None else args.steps
    args.warmup = quick_steps[1] if args.warmup is None else args.warmup
    args.seed, args.trl_gradient_checkpointing, args.ours_grad_accumulation = 0, "off", None
    if args.mode:
        child(args)
        return 0
    shared = ["--shape", args.shape, "--steps", str(args.steps), "--warmup", str(args.warmup)]
    shared += ["--lora-rank", str(args.lora_rank), "--precision", args.precision, "--threads", str(args.threads)]
    shared += ["--quick"] if args.quick else []
    results = {}
    for mode in args.modes:
        results[mode], _ = common.run_side(os.path.abspath(__file__), ["--mode", mode, *shared])
    full = results.get("adamw")
    gb = 1024**3
    for mode, r in results.items():
        ratio = f", {r['seconds_per_step_median'] / full['seconds_per_step_median']:.2f}x adamw's time" if full else ""
        print(
            f"{mode:>12}: {r['seconds_per_step_median']:.2f} s/step{ratio}, peak RSS {r['peak_rss_bytes'] / gb:.2f} GB "
            f"(steps alone {(r['steps_peak_rss_bytes'] or 0) / gb:.2f} GB)"
        )
    report = {"benchmark": "one GRPO step by update mode", "machine": common.machine_info(), "modes": results}
    print(common.write_report(report, args.out or common.default_out("update-modes")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
