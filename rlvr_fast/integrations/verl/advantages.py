"""verl advantage estimators answered by ``rlvr_fast.group_advantages`` (verl 0.9.1, ``register_adv_est``).

One estimator per estimator of ``rlvr_fast.ops.group_advantage.ESTIMATORS`` and sample mode of ``SAMPLE_MODES``,
selected by ``algorithm.adv_estimator=<name>``, named ``rlvr_fast_<estimator>`` (sample mode "all") and
``rlvr_fast_<estimator>_<positive_only|negative_only>``: ``rlvr_fast_grpo``, ``rlvr_fast_dr_grpo``, ``rlvr_fast_rloo``,
and the ones verl lacks, ``rlvr_fast_psr``, ``rlvr_fast_nsr``, ``rlvr_fast_w_reinforce`` (Zhu et al. 2025,
arXiv:2506.01347), each also ``..._positive_only`` / ``..._negative_only``. They read what verl passes to every
registered estimator: ``token_level_rewards`` (B, T) (summed per completion: outcome rewards), ``response_mask``
(B, T), ``index`` (the prompt ``uid`` of each completion) and the ``algorithm`` config (``norm_adv_by_std_in_grpo``
chooses grpo's std scaling; options of our own under ``algorithm.rlvr_fast``, see ``AdvantageConfig``). Completions
are grouped by ``uid``, not by position: groups may come shuffled and of unequal sizes (they are padded and the padding
masked out of the statistics). The advantage goes to every response token (A_i * response_mask), as verl's outcome
estimators do.

By design, a prompt with a single completion (or all-equal rewards) gets advantage exactly 0 from the centred
estimators (verl's grpo / rloo pass a singleton's raw reward through).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch

from rlvr_fast.integrations.verl.compat import NAME_PREFIX, config_get
from rlvr_fast.ops.group_advantage import ESTIMATORS, SAMPLE_MODES, group_advantages

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "ADVANTAGE_ESTIMATOR_NAMES",
    "CONFIG_KEY",
    "VERL_EPSILON",
    "AdvantageConfig",
    "verl_group_advantages",
]

CONFIG_KEY = "rlvr_fast"  # algorithm.rlvr_fast: our estimators' options (AdvantageConfig)
VERL_EPSILON = 1e-6  # verl's default epsilon of compute_grpo_outcome_advantage


@dataclass(frozen=True)
class AdvantageConfig:
    """Options of our estimators, read from verl's ``algorithm.rlvr_fast`` (all optional).

    epsilon: added to grpo's std (verl's estimators default to 1e-6; an explicit ``epsilon=`` argument wins).
    lam: w_reinforce's weight on correct completions (Zhu et al. 2025 use 0.1). Not verl's ``algorithm.lam``, which
        is GAE's lambda.
    correct_threshold: the verdict c_i of psr / nsr / w_reinforce is ``score > correct_threshold``, with the score the
        completion's summed ``token_level_rewards`` (0.5 fits verl's 0/1 and -1/1 rule-based rewards).
    """

    epsilon: float = VERL_EPSILON
    lam: float = 0.1
    correct_threshold: float = 0.5

    @classmethod
    def from_algorithm_config(cls, config: Any) -> AdvantageConfig:
        section = config_get(config, CONFIG_KEY, None)
        if section is None:
            return cls()
        known = {f.name for f in fields(cls)}
        items = dict(section.items()) if hasattr(section, "items") else {}
        unknown = sorted(set(items) - known)
        if unknown:
            raise ValueError(
                f"algorithm.{CONFIG_KEY}: unknown option(s) {unknown}; valid options: {sorted(known)} (AdvantageConfig)"
            )
        out = cls(**{k: float(v) for k, v in items.items()})
        for name in ("epsilon", "lam", "correct_threshold"):
            value = getattr(out, name)
            if not math.isfinite(value):
                raise ValueError(f"algorithm.{CONFIG_KEY}.{name} must be finite, got {value}")
        if out.epsilon < 0:
            raise ValueError(f"algorithm.{CONFIG_KEY}.epsilon must be >= 0, got {out.epsilon}")
        return out


@dataclass(frozen=True)
class _Grouping:
    """Completions grouped by uid and laid out as a padded (groups, G) table: flat slot of completion i is slot[i]."""

    slot: torch.Tensor  # (B,) int64 position of each completion in the padded table
    n_groups: int
    group_size: int  # the largest group
    padded: bool  # some group is smaller than group_size


def _group_by_uid(index: Sequence[Any], device: torch.device) -> _Grouping:
    ids: dict[Any, int] = {}
    try:
        group_of = [ids.setdefault(uid, len(ids)) for uid in index]
    except TypeError as exc:
        raise TypeError(f"index: verl's uid of each completion must be hashable, got {type(index).__name__}") from exc
    inverse = torch.tensor(group_of, dtype=torch.int64, device=device)
    counts = torch.bincount(inverse, minlength=len(ids))
    group_size = int(counts.max())
    # rank of each completion inside its group, in batch order: a stable sort by group keeps the order within a group
    order = torch.sort(inverse, stable=True).indices
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(inverse)
    rank[order] = torch.arange(inverse.numel(), device=device) - starts[inverse[order]]
    slot = inverse * group_size + rank
    return _Grouping(slot, len(ids), group_size, bool((counts != group_size).any()))


def verl_group_advantages(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: Sequence[Any],
    *,
    estimator: str = "grpo",
    sample_mode: str = "all",
    norm_adv_by_std_in_grpo: bool = True,
    epsilon: float = VERL_EPSILON,
    lam: float = 0.1,
    correct_threshold: float = 0.5,
) -> torch.Tensor:
    """verl's outcome advantages computed by ``rlvr_fast.group_advantages``, completions grouped by ``index``.

    Args:
        token_level_rewards: (B, T) verl's rewards per response token; a completion's score is their sum.
        response_mask: (B, T) 1 on response tokens.
        index: (B,) the prompt uid of each completion (verl's ``non_tensor_batch["uid"]``, a numpy object array);
            groups may be in any order and of different sizes.
        estimator: a name of ``ESTIMATORS``; sample_mode: a name of ``SAMPLE_MODES``.
        norm_adv_by_std_in_grpo: grpo only: True divides by the group's Bessel std + epsilon, False does not
            (Dr. GRPO), as in verl's ``compute_grpo_outcome_advantage``.
        epsilon, lam, correct_threshold: see ``AdvantageConfig``.

    Returns:
        (B, T) advantages in ``token_level_rewards``' dtype: A_i * response_mask.
    """
    for name, value in (("token_level_rewards", token_level_rewards), ("response_mask", response_mask)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a (B, T) tensor, got {type(value).__name__}")
    if token_level_rewards.dim() != 2:
        raise ValueError(f"token_level_rewards must be (B, T), got shape {tuple(token_level_rewards.shape)}")
    if response_mask.shape != token_level_rewards.shape:
        raise ValueError(
            f"response_mask must have token_level_rewards' shape {tuple(token_level_rewards.shape)}, "
            f"got {tuple(response_mask.shape)}"
        )
    if index is None:
        raise ValueError(
            f"index: estimator {NAME_PREFIX}_{estimator} groups completions by prompt and needs verl's uid per "
            f"completion (non_tensor_batch['uid']), got None"
        )
    n = token_level_rewards.shape[0]
    if len(index) != n:
        raise ValueError(f"index must hold one uid per completion ({n}), got {len(index)}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {sorted(ESTIMATORS)}, got {estimator!r}")
    device = token_level_rewards.device
    with torch.no_grad():
        scores = token_level_rewards.sum(dim=-1).to(torch.float32)
        if n == 0:
            return torch.zeros_like(token_level_rewards)
        bad = ~torch.isfinite(scores)
        if bool(bad.any()):
            first = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"token_level_rewards: the score (sum over tokens) of completion {first} is {scores[first].item()}; "
                f"rewards must be finite"
            )
        grouping = _group_by_uid(index, device)
        table = torch.full((grouping.n_groups * grouping.group_size,), math.nan, device=device)
        table[grouping.slot] = scores
        correct = None
        if ESTIMATORS[estimator].needs_correct:
            correct = torch.zeros_like(table)
            correct[grouping.slot] = (scores > correct_threshold).to(torch.float32)
        out = group_advantages(
            table,
            grouping.group_size,
            estimator=estimator,
            scale=("group" if norm_adv_by_std_in_grpo else "none") if estimator == "grpo" else None,
            eps=float(epsilon),
            lam=float(lam),
            sample_mode=sample_mode,
            correct=correct,
            invalid="mask" if grouping.padded else "raise",  # the padding is NaN: masked out of every statistic
        )
        advantages = out.advantages[grouping.slot]
        return advantages.to(token_level_rewards.dtype).unsqueeze(-1) * response_mask


def _make_estimator(estimator: str, sample_mode: str) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """One registered estimator in verl's signature; verl's ``compute_advantage`` calls it with keywords."""

    def compute_advantage(
        token_level_rewards: torch.Tensor,
        response_mask: torch.Tensor,
        index: Sequence[Any] | None = None,
        epsilon: float | None = None,
        norm_adv_by_std_in_grpo: bool | None = None,
        config: Any = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        options = AdvantageConfig.from_algorithm_config(config)
        if norm_adv_by_std_in_grpo is None:
            norm_adv_by_std_in_grpo = bool(config_get(config, "norm_adv_by_std_in_grpo", True))
        advantages = verl_group_advantages(
            token_level_rewards,
            response_mask,
            index,
            estimator=estimator,
            sample_mode=sample_mode,
            norm_adv_by_std_in_grpo=norm_adv_by_std_in_grpo,
            epsilon=options.epsilon if epsilon is None else epsilon,
            lam=options.lam,
            correct_threshold=options.correct_threshold,
        )
        return advantages, advantages  # outcome estimators: returns == advantages, as verl's

    name = _estimator_name(estimator, sample_mode)
    compute_advantage.__name__ = compute_advantage.__qualname__ = f"compute_{name}_advantage"
    compute_advantage.__doc__ = (
        f"verl advantage estimator {name!r}: rlvr_fast.group_advantages(estimator={estimator!r}, "
        f"sample_mode={sample_mode!r}) on the summed token_level_rewards, grouped by uid "
        f"({ESTIMATORS[estimator].paper})."
    )
    return compute_advantage


def _estimator_name(estimator: str, sample_mode: str) -> str:
    return f"{NAME_PREFIX}_{estimator}" if sample_mode == "all" else f"{NAME_PREFIX}_{estimator}_{sample_mode}"


# Built once, so that registering twice registers the same functions (verl refuses a different one under a taken name)
ADVANTAGE_ESTIMATORS: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {
    _estimator_name(e, m): _make_estimator(e, m) for e in ESTIMATORS for m in SAMPLE_MODES
}
ADVANTAGE_ESTIMATOR_NAMES: tuple[str, ...] = tuple(ADVANTAGE_ESTIMATORS)
