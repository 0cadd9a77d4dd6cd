"""From a rollout's rewards to its learning signal: the group advantages (``ops.group_advantages``: GRPO, Dr. GRPO,
RLOO, PSR / NSR / W-REINFORCE, sample modes; docs/design.md §1) and the difficulty filter (``rewards.filter_groups``:
drop all-equal groups, keep solve rates in [min_solve_rate, max_solve_rate]; docs/design.md §6).

The two are independent: the filter decides which groups the update sees, not their advantages (a dropped group keeps
the advantages it had; its completions just do not enter the update batch).
"""

from __future__ import annotations

from rlvr_fast.ops.group_advantage import GroupAdvantages, group_advantages
from rlvr_fast.rewards import FilterResult, filter_groups
from rlvr_fast.trainer.config import RLVRConfig
from rlvr_fast.trainer.scoring import Rewards


def compute_advantages(rewards: Rewards, cfg: RLVRConfig) -> GroupAdvantages:
    """Advantages of the N = groups x group_size completions (``.advantages``: (N,) float32) and the group statistics,
    with the run's estimator, scale, eps, lam and sample mode; ``psr`` / ``nsr`` / ``w_reinforce`` read the verdict."""
    return group_advantages(
        rewards.total,
        cfg.group_size,
        estimator=cfg.estimator,
        scale=cfg.scale,
        eps=cfg.adv_eps,
        lam=cfg.lam,
        sample_mode=cfg.sample_mode,
        correct=rewards.correct,
    )


def apply_difficulty_filter(rewards: Rewards, cfg: RLVRConfig) -> FilterResult:
    """Which groups the update keeps (``.keep``: (groups,) bool), by the run's filter_all_equal / min_solve_rate /
    max_solve_rate; the solve rate is the verifier's, never the reward's."""
    return filter_groups(
        rewards.total,
        rewards.correct,
        group_size=cfg.group_size,
        drop_all_equal=cfg.filter_all_equal,
        p_min=cfg.min_solve_rate,
        p_max=cfg.max_solve_rate,
    )
