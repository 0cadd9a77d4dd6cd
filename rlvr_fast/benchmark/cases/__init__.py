"""Benchmark cases, one module per op; importing this package registers them all in ``registry.CASES``."""

from rlvr_fast.benchmark.cases import (
    fused_linear_grpo_loss,  # noqa: F401
    group_advantage,  # noqa: F401
    grpo_loss,  # noqa: F401
    logprobs,  # noqa: F401
    sparse_adamw,  # noqa: F401
)
from rlvr_fast.benchmark.cases.registry import CASES, Case, Floor, build_cases, register

__all__ = ["CASES", "Case", "Floor", "build_cases", "register"]
