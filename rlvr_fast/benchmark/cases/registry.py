"""The benchmark case registry.

A case builder takes a device and returns ``Case`` objects whose ``impls`` are zero-argument callables over inputs
built once (so timing measures the op, not the input generation). The first implementation is ours; ratios are
reported against ``baseline``. Each op's builder lives in its own module of ``rlvr_fast.benchmark.cases`` and
registers itself with ``@register("<op>")``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Floor:
    """What the op must at least do: FLOPs and bytes moved (reads + writes) in the ideal kernel."""

    flops: float
    bytes: float


@dataclass
class Case:
    op: str
    label: str
    impls: dict[str, Callable[[], object]]
    floor: Floor
    baseline: str
    params: dict = field(default_factory=dict)
    # Also measure each implementation's peak memory growth (one extra call each; rlvr_fast.benchmark.memory), for
    # ops whose point is memory (the fused log-prob gather). Off by default: the extra call costs time.
    memory: bool = False
    # Baselines that are installed but could not run here (name -> the error of a trial call): reported as rows with
    # their error, so a failing opponent shows up in the table instead of vanishing from it.
    failed: dict[str, str] = field(default_factory=dict)


CaseBuilder = Callable[[torch.device], list[Case]]
CASES: dict[str, CaseBuilder] = {}


def register(op: str) -> Callable[[CaseBuilder], CaseBuilder]:
    def wrap(fn: CaseBuilder) -> CaseBuilder:
        CASES[op] = fn
        return fn

    return wrap
