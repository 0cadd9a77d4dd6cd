"""rlvr_fast inside verl, through verl's own extension points (verl 0.9.1, ``verl/trainer/ppo/core_algos.py``).

``register()`` (idempotent) adds to verl's registries:

- advantage estimators (``register_adv_est``), selected by ``algorithm.adv_estimator=<name>``: one per estimator of
  ``rlvr_fast.ops.group_advantage.ESTIMATORS`` and sample mode of ``SAMPLE_MODES``, named ``rlvr_fast_<estimator>``
  (sample mode "all") and ``rlvr_fast_<estimator>_<positive_only|negative_only>``: ``rlvr_fast_grpo``,
  ``rlvr_fast_dr_grpo``, ``rlvr_fast_rloo``, and the ones verl lacks, ``rlvr_fast_psr``, ``rlvr_fast_nsr``,
  ``rlvr_fast_w_reinforce`` (Zhu et al. 2025, arXiv:2506.01347), each also ``..._positive_only`` /
  ``..._negative_only``. They read what verl passes to every registered estimator: ``token_level_rewards`` (B, T)
  (summed per completion: outcome rewards), ``response_mask`` (B, T), ``index`` (the prompt ``uid`` of each
  completion) and the ``algorithm`` config (``norm_adv_by_std_in_grpo`` chooses grpo's std scaling; options of our
  own under ``algorithm.rlvr_fast``, see ``AdvantageConfig``). Completions are grouped by ``uid``, not by position:
  groups may come shuffled and of unequal sizes (they are padded and the padding masked out of the statistics).
  The advantage goes to every response token (A_i * response_mask), as verl's outcome estimators do.
- a policy loss (``register_policy_loss``), selected by ``actor_rollout_ref.actor.policy_loss.loss_mode=rlvr_fast``:
  verl's clipped PPO objective (low / high clip ratios, dual clip ``clip_ratio_c``) computed by
  ``rlvr_fast.grpo_loss``, aggregated as every ``loss_agg_mode`` of verl's ``agg_loss`` (including the global
  token / sequence counts and data-parallel scaling of ``config.global_batch_info``), rollout-correction weights
  applied per token, and the metrics verl's actor logs (``actor/pg_clipfrac``, ``actor/ppo_kl``,
  ``actor/pg_clipfrac_lower``). verl adds its KL and entropy terms outside the policy loss, as for its own losses.

``enable_fused_linear_logprobs()`` (or ``register(fused_linear_logprobs=True)``) replaces verl's fused log-prob paths
(``actor_rollout_ref.model.use_fused_kernels=True``): ``verl.utils.kernel.linear_cross_entropy.linear_cross_entropy``
(the ``triton`` backend, CUDA-only in verl) and ``FusedLinearForPPO.forward`` (the ``torch`` / ``liger`` backends)
both answer with ``rlvr_fast.token_logprobs`` (log-probs and entropy of the sampled tokens from the hidden states and
the LM head, forward and backward, temperature; never the tokens x vocab logits). ``disable_fused_linear_logprobs()``
puts verl's functions back.

verl runs its trainer and workers in Ray processes: the registration must happen in each of them. verl imports the
modules named in ``VERL_USE_EXTERNAL_MODULES`` whenever ``verl`` is imported, so
``VERL_USE_EXTERNAL_MODULES=rlvr_fast.integrations.verl_plugin`` (which calls ``register()``; with
``RLVR_FAST_VERL_FUSED_LOGPROBS=1`` also the fused log-probs) does it everywhere (docs/integrations.md, "verl").

Differences from verl's own functions, by design: a prompt with a single completion (or all-equal rewards) gets
advantage exactly 0 from the centred estimators (verl's grpo / rloo pass a singleton's raw reward through); our policy
loss does not clamp the log-ratio to [-20, 20] before exp (verl does; the clipped objective makes the difference
vanish except for ratios below e^-20); an aggregation whose denominator is 0 (no active token or completion) gives 0
where verl's gives NaN. Per-token advantages (verl's GAE with a critic) are refused: ``grpo_loss`` takes one advantage
per completion.

Supported verl: ``SUPPORTED_VERL``. Without verl installed this module still imports (``verl_group_advantages``,
``verl_policy_loss`` and ``verl_linear_cross_entropy`` are plain functions of tensors); ``register()`` needs verl.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch

from rlvr_fast.ops.checks import accumulation_dtype
from rlvr_fast.ops.group_advantage import ESTIMATORS, SAMPLE_MODES, group_advantages
from rlvr_fast.ops.grpo_loss import grpo_loss
from rlvr_fast.ops.logprobs import token_logprobs
from rlvr_fast.ops.objective import PolicyObjective

__all__ = [
    "ADVANTAGE_ESTIMATOR_NAMES",
    "LOSS_AGG_MODES",
    "POLICY_LOSS_NAME",
    "SUPPORTED_VERL",
    "AdvantageConfig",
    "Registration",
    "check_verl_version",
    "disable_fused_linear_logprobs",
    "enable_fused_linear_logprobs",
    "fused_linear_logprobs_enabled",
    "register",
    "unregister",
    "verl_group_advantages",
    "verl_linear_cross_entropy",
    "verl_policy_loss",
]

SUPPORTED_VERL = ">=0.9.1,<0.10"
POLICY_LOSS_NAME = "rlvr_fast"
NAME_PREFIX = "rlvr_fast"
CONFIG_KEY = "rlvr_fast"  # algorithm.rlvr_fast: our estimators' options (AdvantageConfig)
VERL_EPSILON = 1e-6  # verl's default epsilon of compute_grpo_outcome_advantage
VERL_MASKED_MEAN_EPS = 1e-8  # verl_F.masked_mean divides by mask.sum() + 1e-8; agg_loss's seq-mean-token-mean too


def check_verl_version(version: str | None = None) -> str:
    """The installed verl version, or ImportError naming it when it is outside ``SUPPORTED_VERL``."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    if version is None:
        try:
            import verl
        except ImportError as exc:
            raise ImportError(
                f"rlvr_fast.integrations.verl.register() needs verl{SUPPORTED_VERL}: pip install --no-deps "
                f"verl==0.9.1 && pip install -r requirements-verl.txt (or a full pip install verl==0.9.1)"
            ) from exc
        version = verl.__version__
    try:
        ok = Version(version) in SpecifierSet(SUPPORTED_VERL)
    except InvalidVersion:
        ok = False
    if not ok:
        raise ImportError(
            f"rlvr_fast's verl integration supports verl{SUPPORTED_VERL} (tested with 0.9.1), found verl {version}: "
            f"it registers into verl.trainer.ppo.core_algos and replaces verl.utils.kernel.linear_cross_entropy, "
            f"whose signatures change between releases. Install a supported version."
        )
    return version


def _config_get(config: Any, key: str, default: Any = None) -> Any:
    """``config.key`` for verl's configs (OmegaConf DictConfig, verl's BaseConfig dataclasses) and plain mappings."""
    if config is None:
        return default
    if isinstance(config, Mapping) or hasattr(config, "get"):
        try:
            return config.get(key, default)
        except (AttributeError, KeyError):  # a dataclass config without the field
            return default
    return getattr(config, key, default)


# --------------------------------------------------------------------------------------------------------------------
# Advantage estimators
# --------------------------------------------------------------------------------------------------------------------


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
        section = _config_get(config, CONFIG_KEY, None)
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
            norm_adv_by_std_in_grpo = bool(_config_get(config, "norm_adv_by_std_in_grpo", True))
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


# --------------------------------------------------------------------------------------------------------------------
# Policy loss
# --------------------------------------------------------------------------------------------------------------------


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
    clip_ratio = _config_get(config, "clip_ratio", 0.2)
    low = _config_get(config, "clip_ratio_low", None)
    high = _config_get(config, "clip_ratio_high", None)
    low = clip_ratio if low is None else low
    high = clip_ratio if high is None else high
    clip_ratio_c = _config_get(config, "clip_ratio_c", 3.0)
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
    info = _config_get(config, "global_batch_info", None) or {}
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


# --------------------------------------------------------------------------------------------------------------------
# Fused log-probs: verl's linear_cross_entropy / FusedLinearForPPO answered by token_logprobs
# --------------------------------------------------------------------------------------------------------------------


def verl_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    reduction: str = "none",
    dist_process_group: Any = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's ``linear_cross_entropy`` (``verl.utils.kernel.linear_cross_entropy``) by ``rlvr_fast.token_logprobs``.

    Args:
        hidden: (..., D) hidden states; weight: (V, D) the LM head; labels: (...) the token ids.
        temperature: the logits are divided by it.
        reduction: "none" only (the per-token values verl's actors use).
        dist_process_group: None only (a vocabulary split over tensor-parallel ranks is not supported).

    Returns:
        (logprobs, entropy): float32 (N,) with N the number of tokens, as verl's kernel returns them; both
        differentiable w.r.t. hidden and weight.
    """
    if reduction != "none":
        raise ValueError(f"reduction: rlvr_fast's linear_cross_entropy supports 'none' only, got {reduction!r}")
    if dist_process_group is not None:
        raise ValueError(
            "dist_process_group: rlvr_fast's linear_cross_entropy has no vocabulary-parallel (tensor-parallel LM head) "
            "mode; call disable_fused_linear_logprobs() for verl's own kernel"
        )
    logp, entropy = token_logprobs(
        hidden.reshape(-1, hidden.shape[-1]),
        weight,
        labels.reshape(-1),
        temperature=float(temperature),
        return_entropy=True,
    )
    return logp, entropy


def _fused_linear_for_ppo_forward(self, hidden_states, vocab_weights, input_ids, temperature: float = 1.0):
    """``FusedLinearForPPO.forward`` by ``token_logprobs``: (log_probs, entropy) in input_ids' shape, float32."""
    return token_logprobs(
        hidden_states, vocab_weights, input_ids.to(torch.int64), temperature=float(temperature), return_entropy=True
    )


_LCE_MODULE = "verl.utils.kernel.linear_cross_entropy"
_PPO_MODULE = "verl.utils.experimental.torch_functional"
_saved: dict[tuple[str, str], Any] = {}  # (module or class path, attribute) -> verl's original, while enabled


def fused_linear_logprobs_enabled() -> bool:
    return bool(_saved)


def enable_fused_linear_logprobs() -> None:
    """Route verl's fused log-prob paths through ``token_logprobs`` (idempotent; ``disable_...`` restores them).

    Patched: ``linear_cross_entropy`` in verl's kernel module and in every imported verl module that holds it by
    ``from ... import linear_cross_entropy`` (verl's Megatron forwards; the HF forwards import it at call time, and
    modules imported later bind the patched one), and ``FusedLinearForPPO.forward``.
    """
    check_verl_version()
    if _saved:
        return
    lce = importlib.import_module(_LCE_MODULE)
    ppo = importlib.import_module(_PPO_MODULE)
    original = lce.linear_cross_entropy
    for name, module in list(sys.modules.items()):
        if name.split(".")[0] == "verl" and getattr(module, "linear_cross_entropy", None) is original:
            _saved[(name, "linear_cross_entropy")] = original
            module.linear_cross_entropy = verl_linear_cross_entropy
    _saved[(f"{_PPO_MODULE}:FusedLinearForPPO", "forward")] = ppo.FusedLinearForPPO.forward
    ppo.FusedLinearForPPO.forward = _fused_linear_for_ppo_forward


def disable_fused_linear_logprobs() -> None:
    """Put verl's own fused log-prob functions back (a no-op when they were not replaced)."""
    while _saved:
        (where, attr), original = _saved.popitem()
        module_name, _, class_name = where.partition(":")
        target = sys.modules[module_name]
        setattr(getattr(target, class_name) if class_name else target, attr, original)


# --------------------------------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Registration:
    """What ``register`` added: the names to put in verl's config."""

    verl_version: str
    adv_estimators: tuple[str, ...]
    policy_loss: str
    fused_linear_logprobs: bool


def register(fused_linear_logprobs: bool = False) -> Registration:
    """Add our estimators and policy loss to verl's registries (idempotent), optionally the fused log-probs.

    Args:
        fused_linear_logprobs: also route verl's ``use_fused_kernels`` log-prob paths through ``token_logprobs``
            (``enable_fused_linear_logprobs``). False leaves them as they are (it does not disable a previous
            enable: call ``disable_fused_linear_logprobs()`` for that).

    Raises:
        ImportError: verl is missing or outside ``SUPPORTED_VERL``.
        ValueError: from verl, when another function is already registered under one of our estimator names.
    """
    version = check_verl_version()
    from verl.trainer.ppo import core_algos

    for name, fn in ADVANTAGE_ESTIMATORS.items():
        core_algos.register_adv_est(name)(fn)
    core_algos.register_policy_loss(POLICY_LOSS_NAME)(verl_policy_loss)
    if fused_linear_logprobs:
        enable_fused_linear_logprobs()
    return Registration(version, ADVANTAGE_ESTIMATOR_NAMES, POLICY_LOSS_NAME, fused_linear_logprobs_enabled())


def unregister() -> None:
    """Remove our names from verl's registries and restore verl's fused log-prob functions."""
    disable_fused_linear_logprobs()
    from verl.trainer.ppo import core_algos

    for name, fn in ADVANTAGE_ESTIMATORS.items():
        if core_algos.ADV_ESTIMATOR_REGISTRY.get(name) is fn:
            del core_algos.ADV_ESTIMATOR_REGISTRY[name]
    if core_algos.POLICY_LOSS_REGISTRY.get(POLICY_LOSS_NAME) is verl_policy_loss:
        del core_algos.POLICY_LOSS_REGISTRY[POLICY_LOSS_NAME]
