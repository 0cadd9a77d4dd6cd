"""The real entry point under torchrun: ``torchrun --nproc_per_node=2 -m rlvr_fast train ...`` on the CPU (gloo), the
flags of a tiny run, and the exit status, output and time it took. Shared by the distributed tests and the vLLM
engine's torchrun test."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from helpers.runs import write_task

DISTRIBUTED_TESTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "distributed")
KILLED_AFTER_CHECKPOINT = os.path.join(DISTRIBUTED_TESTS, "killed_after_checkpoint.py")
TORCHRUN_PROBE = os.path.join(DISTRIBUTED_TESTS, "torchrun_probe.py")


def torchrun(
    args: list[str],
    timeout: float,
    kill_after: tuple[int, int] | None = None,
    probe: tuple[str, int] | None = None,
) -> tuple[int, str, float]:
    """(exit status, stdout + stderr, seconds) of ``torchrun --nproc_per_node=2 -m rlvr_fast <args>`` on the CPU;
    ``kill_after`` (rank, step): that rank SIGKILLs itself right after the checkpoint of that step is in place;
    ``probe`` (marker file, failing rank or -1): through tests/distributed/torchrun_probe.py (a rank whose interpreter
    finalizes writes to the marker file; the failing rank raises in step 0's reward)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)  # the launcher sets them; inherited ones would point the ranks elsewhere
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    program = ["-m", "rlvr_fast"]
    if kill_after is not None:
        program = [KILLED_AFTER_CHECKPOINT, *map(str, kill_after)]
    elif probe is not None:
        program = [TORCHRUN_PROBE, *map(str, probe)]
    start = time.monotonic()
    done = subprocess.run([*command, *program, *args], env=env, capture_output=True, text=True, timeout=timeout)
    return done.returncode, done.stdout + done.stderr, time.monotonic() - start


def train_args(tmp_path, model: str, output_dir: str, **flags) -> list[str]:
    """``train --flag=value ...`` of a tiny run (8 train / 4 held-out problems of a JSONL task written to
    ``tmp_path``, 2 prompts x 4 completions of 6 tokens per step); ``flags`` override or add to them."""
    values = dict(
        model=model,
        task=write_task(tmp_path / "train.jsonl", 8, "train"),
        eval_file=write_task(tmp_path / "eval.jsonl", 4, "eval"),
        train_size=8,
        eval_size=4,
        group_size=4,
        prompts_per_step=2,
        max_prompt_length=64,
        max_completion_length=6,
        eval_samples=2,
        lr=1e-2,
        device="cpu",
        rewards="correct=1.0,random=0.5",
        progress="false",
        output_dir=output_dir,
    )
    values.update(flags)
    return ["train", *[f"--{k}={v}" for k, v in values.items()]]
