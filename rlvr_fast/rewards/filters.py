"""Difficulty filtering of groups (docs/design.md §6).

Rules, applied in this order (a registry, ``FILTER_RULES``):

| rule       | removes a group when                       | why / source                                                  |
|------------|--------------------------------------------|---------------------------------------------------------------|
| all_equal  | max(r) - min(r) <= atol (all rewards equal) | zero advantage, no gradient: DAPO dynamic sampling (Yu et al. 2025, arXiv:2503.14476) |
| too_hard   | solve rate < p_min                         | lone lucky successes get the largest advantages ((G-1)/sqrt(G) under grpo) and teach shortcuts |
| too_easy   | solve rate > p_max                         | nothing left to learn                                         |

``removed[rule]`` counts the groups each rule removed, each group attributed to the first rule that matches it, so the
counts add up to ``total - kept``; ``matched[rule]`` counts every group the rule matches on its own. Refilling the batch
with freshly sampled prompts (DAPO) is the trainer's loop: call ``filter_groups`` on each new batch and accumulate
``keep``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["FILTER_RULES", "FilterResult", "filter_groups"]


@dataclass(frozen=True)
class _Groups:
    rewards: torch.Tensor  # (groups, G) float64
    solve_rate: torch.Tensor  # (groups,) float64


FILTER_RULES: dict[str, Callable[[_Groups, Mapping[str, Any]], torch.Tensor | None]] = {
    "all_equal": lambda g, p: (g.rewards.amax(1) - g.rewards.amin(1) <= p["atol"]) if p["drop_all_equal"] else None,
    "too_hard": lambda g, p: (g.solve_rate < p["p_min"]) if p["p_min"] is not None else None,
    "too_easy": lambda g, p: (g.solve_rate > p["p_max"]) if p["p_max"] is not None else None,
}


@dataclass
class FilterResult:
    """keep: (groups,) bool; solve_rate: (groups,) float32; removed / matched: rule -> number of groups."""

    keep: torch.Tensor
    solve_rate: torch.Tensor
    removed: dict[str, int]
    matched: dict[str, int]

    @property
    def total(self) -> int:
        return int(self.keep.numel())

    @property
    def kept(self) -> int:
        return int(self.keep.sum())

    def completion_mask(self, group_size: int) -> torch.Tensor:
        """(groups * group_size,) bool: the completions of the kept groups, in batch order."""
        return self.keep.repeat_interleave(group_size)


def _as_groups(x: Any, name: str, group_size: int | None) -> torch.Tensor:
    t = torch.as_tensor(x).detach().to("cpu", torch.float64)
    if t.dim() == 1:
        if group_size is None:
            raise ValueError(
                f"filter_groups: {name} is flat {tuple(t.shape)}; pass group_size= or a (groups, G) tensor"
            )
        if group_size < 1 or t.numel() % group_size:
            raise ValueError(
                f"filter_groups: {name} has {t.numel()} entries, "
                f"not a whole number of groups of group_size={group_size}"
            )
        t = t.reshape(-1, group_size)
    elif t.dim() != 2:
        raise ValueError(f"filter_groups: {name} must be (groups, G) or flat (N,), got shape {tuple(t.shape)}")
    if torch.isnan(t).any():
        raise ValueError(f"filter_groups: {name} contains NaN; mask or drop those completions first")
    return t


def filter_groups(
    rewards: Any,
    correct: Any = None,
    *,
    group_size: int | None = None,
    drop_all_equal: bool = True,
    p_min: float | None = None,
    p_max: float | None = None,
    atol: float = 0.0,
) -> FilterResult:
    """Which groups to keep for the policy update.

    Args:
        rewards: (groups, G) rewards, or flat (N,) with ``group_size``; tensor, array or nested list.
        correct: 0/1 verdicts of the same shape, for the solve rate; when None the rewards must be 0/1 themselves.
        drop_all_equal: apply the all_equal rule.
        p_min, p_max: solve-rate bounds (None: off); 0 <= p_min <= p_max <= 1.
        atol: rewards within ``atol`` of each other count as equal.

    Returns:
        FilterResult.
    """
    for name, p in (("p_min", p_min), ("p_max", p_max)):
        if p is not None and not (isinstance(p, (int, float)) and 0.0 <= p <= 1.0):
            raise ValueError(f"filter_groups: {name} must be in [0, 1] or None, got {p!r}")
    if p_min is not None and p_max is not None and p_min > p_max:
        raise ValueError(f"filter_groups: p_min={p_min} > p_max={p_max}")
    if not (isinstance(atol, (int, float)) and atol >= 0):
        raise ValueError(f"filter_groups: atol must be a number >= 0, got {atol!r}")
    r = _as_groups(rewards, "rewards", group_size)
    if correct is None:
        if ((r != 0) & (r != 1)).any() and (p_min is not None or p_max is not None):
            raise ValueError(
                "filter_groups: rewards are not 0/1, so the solve rate needs correct= (the verifier's verdicts)"
            )
        c = r
    else:
        c = _as_groups(correct, "correct", group_size)
        if c.shape != r.shape:
            raise ValueError(
                f"filter_groups: correct has shape {tuple(c.shape)}, rewards {tuple(r.shape)} (expected equal)"
            )
        if ((c != 0) & (c != 1)).any():
            raise ValueError("filter_groups: correct must hold only 0 and 1")
    groups = _Groups(r, c.mean(1))
    params = {"drop_all_equal": drop_all_equal, "p_min": p_min, "p_max": p_max, "atol": atol}
    keep = torch.ones(r.shape[0], dtype=torch.bool)
    removed: dict[str, int] = {}
    matched: dict[str, int] = {}
    for rule, predicate in FILTER_RULES.items():
        hit = predicate(groups, params)
        if hit is None:
            continue
        matched[rule] = int(hit.sum())
        removed[rule] = int((hit & keep).sum())
        keep &= ~hit
    return FilterResult(keep=keep, solve_rate=groups.solve_rate.float(), removed=removed, matched=matched)
