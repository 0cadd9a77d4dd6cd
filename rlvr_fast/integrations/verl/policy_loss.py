"""verl's clipped policy loss by ``rlvr_fast.grpo_loss`` (verl 0.9.1, ``register_policy_loss``).

Selected by ``actor_rollout_ref.actor.policy_loss.loss_mode=rlvr_fast``: verl's clipped PPO objective (low / high clip
ratios, dual clip ``clip_ratio_c``) computed by ``rlvr_fast.grpo_loss``, aggregated as every ``loss_agg_mode`` of
verl's ``agg_loss`` (including the global token / sequence counts and data-parallel scaling of
``config.global_batch_info``), rollout-correction weights applied per token, and the metrics verl's actor logs
(``actor/pg_clipfrac``, ``actor/ppo_kl``, ``actor/pg_clipfrac_lower``). verl adds its KL and entropy terms outside the
policy loss, as for its own losses.

Differences from verl's ``compute_policy_loss_vanilla``, by design: no clamp of the log-ratio to [-20, 20] before exp
(the clipped objective makes the difference vanish except for ratios below e^-20); an aggregation whose denominator is
0 (no active token or completion) gives 0 where verl's gives NaN. Per-token advantages (verl's GAE with a critic) are
refused: ``grpo_loss`` takes one advantage per completion.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from rlvr_fast.integrations.verl.compat import NAME_PREFIX, config_get
from rlvr_fast.ops.checks import accumulation_dtype
from rlvr_fast.ops.grpo_loss import grpo_loss
from rlvr_fast.ops.objective import PolicyObjective

__all__ = ["LOSS_AGG_MODES", "POLICY_LOSS_NAME", "VERL_MASKED_MEAN_EPS", "LossAggregation", "verl_policy_loss"]

POLICY_LOSS_NAME = "rlvr_fast"
VERL_MASKED_MEAN_EPS = 1e-8  # verl_F.masked_mean divides by mask.sum() + 1e-8; agg_loss's seq-mean-token-mean too


@dataclass(frozen=True)
class LossAggregation:
    """One of verl's ``loss_agg_mode`` values as (per-completion token weights, denominator) of ``grpo_loss``.

    verl's ``agg_loss`` is ``sum_bt w_bt l_bt / D``: ``token_mean_per_sequence`` divides each completion's tokens by
    its own token count first (w_bt = m_bt / (n_b + 1e-8)), and ``denominator(mask, info)`` gives D from the local
    mask and ``config.global_batch_info`` (dp_size, batch_num_tokens, global_batch_size, loss_scale_factor).
    """

    name: str
    token_mean_per_sequence: bool
    denominator: Callable[[torch.Tensor, Mapping[str, Any]], float | torch.Tensor]


def _dp(info: Mapping[str, Any]) -> int:
    return int(info.get("dp_size", 1) or 1)


def _global_or_local(info: Mapping[str, Any], key: str, local: Callable[[], float | torch.Tensor], mode: str):
    value = info.get(key)
    if value is None:
        if _dp(info) > 1:
            raise ValueError(f"loss_agg_mode={mode!r}: config.global_batch_info[{key!r}] is required when dp_size > 1")
        return local()
    return value


def _token_denominator(mask: torch.Tensor, info: Mapping[str, Any]):
    return _global_or_local(info, "batch_num_tokens", lambda: mask.sum(), "token-mean") / _dp(info)


def _sequence_denominator(mask: torch.Tensor, info: Mapping[str, Any], mode: str):
    nonempty = lambda: (mask.sum(dim=-1) > 0).sum()  # noqa: E731 - fully masked completions do not count
    return _global_or_local(info, "global_batch_size", nonempty, mode) / _dp(info)


def _sequence_norm_denominator(mask: torch.Tensor, info: Mapping[str, Any]):
    scale = info.get("loss_scale_factor")
    return _sequence_denominator(mask, info, "seq-mean-token-sum-norm") * (mask.shape[-1] if scale is None else scale)


LOSS_AGG_MODES: dict[str, LossAggregation] = {
    a.name: a
    for a in (
        LossAggregation("token-mean", False, _token_denominator),
        LossAggregation("token-sum", False, lambda mask, info: 1.0 / _dp(info)),
        LossAggregation("seq-mean-token-sum", False, lambda m, i: _sequence_denominator(m, i, "seq-mean-token-sum")),
        LossAggregation("seq-mean-token-sum-norm", False, _sequence_norm_denominator),
        LossAggregation("seq-mean-token-mean", True, lambda m, i: _sequence_denominator(m, i, "seq-mean-token-mean")),
    )
}


def _per_completion_advantages(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The (B,) advantage of each completion from verl's (B, T) one (A_i on every response token), in mask's dtype."""
    m = mask
    a = advantages.to(mask.dtype)
    per_row = (a * m).sum(dim=-1) / m.sum(dim=-1).clamp_min(1.0)
    spread = ((a - per_row.unsqueeze(-1)).abs() * m).amax() if a.numel() else a.new_zeros(())
    tolerance = 1e-5 * (1.0 + per_row.abs().max()) if a.numel() else 0.0
    if bool(spread > tolerance):
        raise ValueError(
            f"advantages: loss_mode={POLICY_LOSS_NAME!r} takes one advantage per completion (outcome estimators: "
            f"grpo, rloo, {NAME_PREFIX}_*), but they vary across the response tokens of a completion by up to "
            f"{float(spread):.3g} (per-token advantages, e.g. GAE with a critic, need one of verl's own losses)"
        )
    return per_row


def _clip_settings(config: Any) -> tuple[float, float, float]:
    if config is None:
        raise ValueError(f"config: loss_mode={POLICY_LOSS_NAME!r} needs verl's actor config (clip ratios), got None")
    clip_ratio = config_get(config, "clip_ratio", 0.2)
    low = config_get(config, "clip_ratio_low", None)
    high = config_get(config, "clip_ratio_high", None)
    low = clip_ratio if low is None else low
    high = clip_ratio if high is None else high
    clip_ratio_c = config_get(config, "clip_ratio_c", 3.0)
    if not clip_ratio_c > 1.0:
        raise ValueError(f"config.clip_ratio_c (dual-clip PPO's lower bound) must be > 1.0, got {clip_ratio_c}")
    return float(low), float(high), float(clip_ratio_c)


def _positive(value: float | torch.Tensor) -> float:
    """The denominator as a number (one host read, as grpo_loss does for num_items). 0 means nothing is active (the
    numerator is 0 too): 1 keeps the loss 0 where verl's is NaN."""
    value = float(value)
    return value if value > 0 else 1.0


def verl_policy_loss(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """verl's clipped policy loss (``compute_policy_loss_vanilla``'s objective) by ``rlvr_fast.grpo_loss``.

    The signature is verl's ``PolicyLossFn``: old_log_prob, log_prob, advantages, response_mask all (B, T);
    ``advantages`` one value per completion on its response tokens; ``config`` verl's actor config (clip_ratio,
    clip_ratio_low / clip_ratio_high, clip_ratio_c, global_batch_info); ``rollout_is_weights`` (B, T) per-token
    weights of verl's rollout correction, or None.

    Returns:
        (loss, metrics): the 0-d loss, differentiable in ``log_prob``, and verl's metric names with Python floats.
    """
    if loss_agg_mode not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg_mode must be one of {sorted(LOSS_AGG_MODES)}, got {loss_agg_mode!r}")
    if log_prob.dim() != 2:
        raise ValueError(f"log_prob must be (B, T), got shape {tuple(log_prob.shape)}")
    for name, value in (("old_log_prob", old_log_prob), ("advantages", advantages), ("response_mask", response_mask)):
        if value.shape != log_prob.shape:
            raise ValueError(f"{name} must have log_prob's shape {tuple(log_prob.shape)}, got {tuple(value.shape)}")
    if rollout_is_weights is not None and rollout_is_weights.shape != log_prob.shape:
        raise ValueError(
            f"rollout_is_weights must have log_prob's shape {tuple(log_prob.shape)}, "
            f"got {tuple(rollout_is_weights.shape)}"
        )
    eps_low, eps_high, clip_ratio_c = _clip_settings(config)
    aggregation = LOSS_AGG_MODES[loss_agg_mode]
    info = config_get(config, "global_batch_info", None) or {}
    acc = accumulation_dtype(log_prob.dtype)  # weights and advantages
    mask = response_mask.to(acc)
    per_completion = _per_completion_advantages(advantages, mask)
    denominator = _positive(aggregation.denominator(mask, info))

    weights = mask
    if aggregation.token_mean_per_sequence:
        weights = weights / (mask.sum(dim=-1, keepdim=True) + VERL_MASKED_MEAN_EPS)
    if rollout_is_weights is not None:
        weights = weights * rollout_is_weights.to(acc)
    # dapo with num_items = verl's denominator: sum of the weighted token losses / that denominator
    objective = PolicyObjective(
        loss_type="dapo", eps_low=eps_low, eps_high=eps_high, dual_clip=clip_ratio_c, num_items=denominator
    )
    loss, stats = grpo_loss(log_prob, old_log_prob, None, per_completion, weights, objective=objective)
    if weights is not mask:  # the clip fractions verl logs are plain token means: count them over the 0/1 mask
        with torch.no_grad():
            unweighted = dataclasses.replace(objective, num_items=None)  # the fractions need no normaliser
            _, stats = grpo_loss(log_prob.detach(), old_log_prob, None, per_completion, mask, objective=unweighted)
    with torch.no_grad():
        log_ratio = (log_prob.detach() - old_log_prob).clamp(-20.0, 20.0)  # in the inputs' dtype, as verl's
        ppo_kl = (-log_ratio * mask).sum() / (mask.sum() + VERL_MASKED_MEAN_EPS)
        values = [stats.clip_low_frac + stats.clip_high_frac, ppo_kl, stats.dual_clip_frac]
        values = torch.stack([v.to(torch.float64) for v in values]).tolist()  # one host sync for the three
    metrics = dict(zip(("actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"), values, strict=True))
    return loss, metrics
