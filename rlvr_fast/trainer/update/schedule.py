"""Learning-rate schedules: linear warm-up, then constant, linear or cosine decay to 0 at the last step."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

SCHEDULES: dict[str, Callable[[float], float]] = {
    # progress in [0, 1] after warm-up -> multiplier
    "constant": lambda progress: 1.0,
    "linear": lambda progress: 1.0 - progress,
    "cosine": lambda progress: 0.5 * (1.0 + math.cos(math.pi * progress)),
}


def lr_multiplier(step: int, *, schedule: str, warmup_steps: int, total_steps: int) -> float:
    """Multiplier of the peak lr for optimizer step ``step`` (0-based)."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    decay_steps = max(total_steps - warmup_steps, 1)
    return SCHEDULES[schedule](min((step - warmup_steps) / decay_steps, 1.0))


def build_scheduler(optimizer: torch.optim.Optimizer, *, schedule: str, warmup_steps: int, total_steps: int):
    if schedule not in SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {sorted(SCHEDULES)}, got {schedule!r}")
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_multiplier(step, schedule=schedule, warmup_steps=warmup_steps, total_steps=total_steps),
    )
