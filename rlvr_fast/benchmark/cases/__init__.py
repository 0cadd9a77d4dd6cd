"""Benchmark cases, one module per op; importing this package registers them all in ``registry.CASES``."""

from __future__ import annotations

import torch

from rlvr_fast.benchmark.cases import (
    fused_linear_grpo_loss,  # noqa: F401
    group_advantage,  # noqa: F401
    grpo_loss,  # noqa: F401
    logprobs,  # noqa: F401
    sparse_adamw,  # noqa: F401
)
from rlvr_fast.benchmark.cases.registry import CASES, Case, Floor, register

__all__ = ["CASES", "Case", "Floor", "build_cases", "register"]


def build_cases(device: torch.device | str, ops: list[str] | None = None) -> list[Case]:
    """The cases of ``ops`` (default: every registered op) on ``device``. Lives here, beside the imports that register
    every op's builder, so that the registry module imports nothing back."""
    device = torch.device(device)
    names = ops if ops is not None else list(CASES)
    unknown = sorted(set(names) - set(CASES))
    if unknown:
        raise ValueError(f"unknown benchmark ops {unknown}; known: {sorted(CASES)}")
    return [case for name in names for case in CASES[name](device)]
