"""What a run writes as it goes: metrics.jsonl (one JSON object per step) and a progress bar."""

from __future__ import annotations

import json
import math
import os
import resource
import sys
from typing import Any

import torch


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory so far: allocated CUDA memory on a GPU; the process's peak RSS on the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB, macOS bytes


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


class MetricsLog:
    """Appends one line per step to ``metrics.jsonl``. On resume, lines after the resumed step are dropped first,
    so the file reads exactly as an uninterrupted run's would."""

    def __init__(self, path: str, resume_step: int | None = None):
        self.path = path
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        if resume_step is None:
            open(path, "w").close()
        elif os.path.exists(path):
            with open(path) as f:
                kept = [line for line in f if line.strip() and json.loads(line).get("step", -1) < resume_step]
            with open(path, "w") as f:
                f.writelines(kept)

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(_jsonable(record)) + "\n")

    def read(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in open(self.path) if line.strip()]


class Progress:
    """A tqdm bar showing step, reward, tokens/s and the ETA (silent when disabled or not a terminal-friendly run)."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)

    def update(self, reward: float, tokens_per_s: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(reward=f"{reward:.3f}", tok_s=f"{tokens_per_s:.0f}")
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
