"""GRPO-family policy loss on per-token log-probs: clipped surrogate, optional dual clip, KL to a reference, and the
grpo / bnpo / dr_grpo / dapo aggregations, with token or sequence (GSPO) importance ratios.

Formulas: docs/design.md §2; the registries (loss types with their normalisers, KL estimators,
importance-sampling levels) and their sources: ``rlvr_fast.ops.loss_types``.

    rho_bt = exp(logp_bt - old_bt)                      (token level)
    s_b    = exp(sum_t m_bt (logp_bt - old_bt) / max(sum_t m_bt, 1))   (sequence level, GSPO: every token uses s_b)
    pg_bt  = -min(r A_b, clip(r, 1 - eps_low, 1 + eps_high) A_b),   r = rho_bt or s_b      (PPO, Schulman 2017)
             min(pg_bt, -c A_b) where A_b < 0 and dual_clip = c is set                      (Ye et al. 2020)
    l_bt   = pg_bt + beta * KL(d_bt),  d_bt = ref_bt - logp_bt  (k1 | k2 | k3 | low_var_kl)
             pg_bt + beta * r * KL(d_bt) with kl_ratio_weighted (TRL's use_bias_correction_kl; r differentiable,
             unclipped: d(r KL_t)/dlogp_u = r dKL_t/dlogp_u [t = u] + KL_t dr/dlogp_u, dr/dlogp_u = rho_u [t = u] at
             token level, s_b m_u / max(W_b, 1) at sequence level)
    loss   = aggregation of m_bt l_bt by ``loss_type`` (table in rlvr_fast.ops.loss_types)

Gradients flow into ``logp`` only: old_logp, ref_logp, advantages, mask and entropy are constants (as in TRL).

NaN policy: values at masked-out positions (mask == 0) are never read into the result, so padding may hold anything
(NaN, -inf, garbage). Input errors are refused by name and (row, position), in one fused check (one host sync per
call): a negative / NaN / inf mask weight, a NaN / inf advantage, and, where the mask counts, an old_logp (and a
ref_logp when beta > 0) that is NaN, -inf or above OLD_LOGP_MAX. A NaN or inf in logp itself (the model's output) at
an active position, or in ref_logp at beta = 0 (only the mean_kl metric reads it), propagates to the loss / metric and
to the gradients it touches, exactly as in the reference: nothing is silently repaired.

Four pieces, as in every op: ``grpo_loss_reference`` (the specification: float64, autograd), the Triton kernels
``rlvr_fast.kernels.grpo_loss`` (one elementwise + reduction pass writing the loss, the metrics and d loss / d logp;
plus a light per-completion pre-pass for grpo's per-sequence mean and for GSPO), the torch path (the same closed-form
gradient, vectorised), and the public ``grpo_loss``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from torch.autograd.function import once_differentiable

from rlvr_fast.backends import select_backend
from rlvr_fast.ops.checks import accumulation_dtype, real_tensor
from rlvr_fast.ops.constants import (
    OLD_LOGP_MAX,
    STAT_CLIP_HIGH,
    STAT_CLIP_LOW,
    STAT_DUAL_CLIP,
    STAT_ENTROPY,
    STAT_KL,
    STAT_LOSS,
    STAT_RATIO,
    STAT_SKIPPED,
    STAT_TOKENS,
)
from rlvr_fast.ops.objective import DEFAULT, PolicyObjective, flat_arguments, objective_from_arguments
from rlvr_fast.ops.rollout_correction import (
    RolloutCorrectionMetrics,
    correction_code,
    correction_log_ratio,
    rollout_metrics,
    truncated_weight,
)

OP = "grpo_loss"


@dataclass
class GrpoLossMetrics:
    """Diagnostics of one ``grpo_loss`` call: 0-d tensors on the inputs' device (no host sync), never differentiable.

    Fractions and means are over the active tokens of this call, weighted by the mask (0 when there are none).
    At sequence level every token of a completion carries the completion's ratio and clip state (Liger's convention;
    TRL averages its sequence-level clip metrics per completion instead).

    clip_low_frac: A < 0 and ratio < 1 - eps_low (the low clip removes the gradient; TRL clip_ratio/low_mean).
    clip_high_frac: A > 0 and ratio > 1 + eps_high (TRL clip_ratio/high_mean).
    dual_clip_frac: A < 0 and the dual-clip bound -c A is active (0 without dual_clip).
    mean_ratio: the importance ratio (token rho or sequence s_b).
    mean_kl: the chosen KL estimator (times the importance ratio with kl_ratio_weighted: the term trained, TRL's
        logged "kl"); None when ref_logp was not given (computed whenever it is, even at beta = 0).
    mean_entropy: of the ``entropy`` passed in; None when it was not.
    tokens: tokens counted (the sum of the mask weights).
    tokens_skipped: active tokens whose gradient is zero by construction: completions with A == 0 when beta == 0
        (the fused-linear path skips their LM-head work; this elementwise op just counts them).
    backend: the backend that computed it.
    """

    clip_low_frac: torch.Tensor
    clip_high_frac: torch.Tensor
    dual_clip_frac: torch.Tensor
    mean_ratio: torch.Tensor
    mean_kl: torch.Tensor | None
    mean_entropy: torch.Tensor | None
    tokens: torch.Tensor
    tokens_skipped: torch.Tensor
    backend: str
    # The rollout correction's metrics (``RolloutCorrectionMetrics``) when the objective has one, else None. Not a
    # dataclass field on purpose: the fields are the per-token means and counts a caller combines by token weight
    # (METRIC_NAMES), while these include a min and a max and are over completions in sequence mode.
    rollout_correction = None

    def as_dict(self) -> dict[str, float]:
        """Python floats for logging (one device sync), with the rollout correction's as ``rollout_is_*``."""
        out = {n: float(getattr(self, n)) for n in METRIC_NAMES if getattr(self, n) is not None}
        if self.rollout_correction is not None:
            out.update(self.rollout_correction.as_dict())
        return out


# The metric names, from the type: every tensor field (``backend`` is a label), the counts, and the per-token means
# (the ones a caller combining calls weights by each call's ``tokens``: the trainer's micro-batches and ranks).
METRIC_NAMES: tuple[str, ...] = tuple(f.name for f in fields(GrpoLossMetrics) if f.name != "backend")
COUNT_METRICS: tuple[str, ...] = ("tokens", "tokens_skipped")
TOKEN_MEAN_METRICS: tuple[str, ...] = tuple(n for n in METRIC_NAMES if n not in COUNT_METRICS)


# --------------------------------------------------------------------------------------------------------------------
# Input checks (shared by the reference and the fused paths, so both reject the same inputs)
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckedLoss:
    """The tensors of one loss call, checked against each other, and its objective (shared by ``grpo_loss``, its
    reference and ``fused_linear_grpo_loss``, so all reject the same inputs)."""

    logp: torch.Tensor  # (B, T) floating
    old_logp: torch.Tensor | None  # (B, T) floating, None = on-policy
    ref_logp: torch.Tensor | None  # (B, T) floating
    advantages: torch.Tensor  # (B,)
    mask: torch.Tensor  # (B, T) bool / integer / floating
    entropy: torch.Tensor | None  # (B, T) floating
    objective: PolicyObjective
    rollout_logp: torch.Tensor | None = None  # (B, T) floating, the rollout engine's; given iff a correction is on

    def correction_diff(self, logp: torch.Tensor, masked) -> torch.Tensor:
        """d = old - rollout_logp (B, T) (old: old_logp, else ``logp``, the detached current log-probs), with
        ``masked`` (the caller's zero-padding cast) applied to each input."""
        old = logp.detach() if self.old_logp is None else masked(self.old_logp.detach())
        return old - masked(self.rollout_logp.detach())

    def correction_metrics(self, diff: torch.Tensor, w: torch.Tensor, rows: torch.Tensor | None = None):
        """The rollout correction's metrics from d (B, T) at the counted tokens w != 0 (None when off)."""
        obj = self.objective
        if obj.correction is None:
            return None
        rows = torch.ones(diff.shape[0], dtype=torch.bool, device=diff.device) if rows is None else rows
        return rollout_metrics(obj.rollout_correction, obj.rollout_correction_cap, diff, w, rows)

    def denominator(self, token_count: torch.Tensor) -> torch.Tensor | float:
        """The loss type's D for this call (``PolicyObjective.denominator``)."""
        return self.objective.denominator(self.logp.shape[0], token_count)


def _positions(bad: torch.Tensor, values: torch.Tensor, name: str, limit: int = 5) -> str:
    """The first ``limit`` (row, position) pairs where ``bad`` (B, T) holds, with ``name``'s values there."""
    idx = bad.nonzero()[:limit].tolist()
    return ", ".join(f"{name}[{b}, {t}] = {float(values[b, t]):.6g}" for b, t in idx)


def _check_values(
    where: str,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    old_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    rollout_logp: torch.Tensor | None = None,
) -> None:
    """Values no loss can be computed from, rejected by name and position:

    - a negative mask weight flips the sign of its tokens' gradient, a NaN / inf one poisons the loss;
    - a NaN / inf advantage poisons every parameter through the backward;
    - at a token that counts (mask != 0), an old_logp (and a ref_logp, passed when beta > 0 uses it) that is NaN,
      -inf or above ``OLD_LOGP_MAX``: a log-probability is <= 0 (a positive one is a probability or a logit passed by
      mistake), and a sampled token's is finite (-inf means the sampler's probability underflowed, or garbage), so
      the ratio exp(logp - old_logp) or the KL to the reference would be silently wrong, inf or NaN.
      Positions with mask 0 are padding and may hold anything.

    All counts come from one fused reduction and one host sync; the positions are looked up only on failure."""
    counts = []
    float_mask = mask.dtype != torch.bool
    if float_mask:
        counts += [(mask < 0).sum(), (~torch.isfinite(mask)).sum()]
    float_adv = advantages.is_floating_point()
    if float_adv:
        counts.append((~torch.isfinite(advantages)).sum())
    # (name, values, bad positions) of each given log-prob tensor: not (finite and <= OLD_LOGP_MAX) where mask != 0
    logps = [
        (name, x, (mask != 0) & ~(torch.isfinite(x) & (x <= OLD_LOGP_MAX)))
        for name, x in (("old_logp", old_logp), ("ref_logp", ref_logp), ("rollout_logp", rollout_logp))
        if x is not None
    ]
    counts += [bad.sum() for _, _, bad in logps]
    if not counts:
        return
    got = torch.stack([c.to(torch.int64) for c in counts]).tolist()
    if float_mask:
        negative, non_finite = got.pop(0), got.pop(0)
        if negative or non_finite:
            bad = (mask < 0) | ~torch.isfinite(mask)
            raise ValueError(
                f"{where}: mask weights must be >= 0, got {negative} negative (min {float(mask.nan_to_num().min())}) "
                f"and {non_finite} NaN/inf (weights must be finite too); first at {_positions(bad, mask, 'mask')}"
            )
    if float_adv and got.pop(0):
        bad = (~torch.isfinite(advantages)).nonzero()[:, 0].tolist()
        raise ValueError(f"{where}: advantages must be finite, got NaN/inf at rows {bad[:5]}")
    for (name, x, bad), count in zip(logps, got, strict=True):
        if count:
            raise ValueError(
                f"{where}: {name} must be a finite log-probability (<= {OLD_LOGP_MAX}, not NaN or -inf) at every "
                f"token with mask != 0, got {count} such tokens: {_positions(bad, x, name)}"
            )


def check_loss_inputs(
    where: str,
    logp,
    old_logp,
    ref_logp,
    advantages,
    mask,
    objective: PolicyObjective,
    entropy=None,
    rollout_logp=None,
) -> CheckedLoss:
    """Shapes, dtypes and devices of the per-token tensors, and what the objective needs of them (a reference when
    beta > 0, dr_grpo's max_completion_length >= T, the rollout engine's log-probs exactly when a rollout correction
    is on); the objective's own fields were checked when it was built."""
    logp = real_tensor(where, "logp", logp, floating=True)
    if logp.dim() != 2:
        raise ValueError(f"{where}: logp must be 2-D (B, T) per-token log-probs, got shape {tuple(logp.shape)}")
    B, T = logp.shape
    per_token = {
        "old_logp": old_logp,
        "ref_logp": ref_logp,
        "mask": mask,
        "entropy": entropy,
        "rollout_logp": rollout_logp,
    }
    for name, x in per_token.items():
        if x is None:
            if name == "mask":
                raise TypeError(f"{where}: mask must be a (B, T) tensor (1 on completion tokens that count), got None")
            continue
        real_tensor(where, name, x, floating=name != "mask")
        if tuple(x.shape) != (B, T):
            raise ValueError(
                f"{where}: {name} must have logp's shape (B, T) = {(B, T)}, got {name} shape {tuple(x.shape)}"
            )
    advantages = real_tensor(where, "advantages", advantages, floating=False)
    if tuple(advantages.shape) != (B,):
        raise ValueError(
            f"{where}: advantages must be (B,) = ({B},), one per completion (row of logp), "
            f"got shape {tuple(advantages.shape)}"
        )
    for name, x in (*per_token.items(), ("advantages", advantages)):
        if x is not None and x.device != logp.device:
            raise ValueError(f"{where}: {name} is on {x.device} but logp is on {logp.device}")
    _check_rollout_presence(where, objective, rollout_logp)
    # ref_logp is checked where the loss uses it (beta > 0); at beta = 0 it only feeds the mean_kl metric
    _check_values(where, mask, advantages, old_logp, ref_logp if objective.beta != 0.0 else None, rollout_logp)
    if objective.beta != 0.0 and ref_logp is None:
        raise ValueError(
            f"{where}: beta={objective.beta} > 0 needs ref_logp (the reference model's per-token log-probs, (B, T)), "
            f"got None"
        )
    length = objective.max_completion_length
    if length is not None and length < max(T, 1):
        raise ValueError(
            f"{where}: max_completion_length ({length}) must be >= 1 and >= the completion length "
            f"T = {T} of logp: dr_grpo's constant normaliser B * max_completion_length counts every position"
        )
    return CheckedLoss(
        logp=logp,
        old_logp=old_logp,
        ref_logp=ref_logp,
        advantages=advantages,
        mask=mask,
        entropy=entropy,
        objective=objective,
        rollout_logp=rollout_logp,
    )


def _check_rollout_presence(where: str, objective: PolicyObjective, rollout_logp) -> None:
    """rollout_logp is read exactly when the objective has a rollout correction: never silently ignored."""
    name = objective.rollout_correction
    if name is not None and rollout_logp is None:
        raise ValueError(
            f"{where}: rollout_correction={name!r} needs rollout_logp (the rollout engine's log-probs of the sampled "
            f"tokens, (B, T)), got None"
        )
    if name is None and rollout_logp is not None:
        raise ValueError(
            f"{where}: rollout_logp is read only with a rollout_correction (expected one of 'token_truncate', "
            f"'sequence_truncate'), got rollout_correction=None"
        )


def _metrics(stats: torch.Tensor, chk: CheckedLoss, backend: str) -> GrpoLossMetrics:
    stats = stats.detach()
    tokens = stats[STAT_TOKENS]
    per_token = torch.where(tokens > 0, stats / tokens.clamp(min=torch.finfo(stats.dtype).tiny), 0.0)
    return GrpoLossMetrics(
        clip_low_frac=per_token[STAT_CLIP_LOW],
        clip_high_frac=per_token[STAT_CLIP_HIGH],
        dual_clip_frac=per_token[STAT_DUAL_CLIP],
        mean_ratio=per_token[STAT_RATIO],
        mean_kl=per_token[STAT_KL] if chk.ref_logp is not None else None,
        mean_entropy=per_token[STAT_ENTROPY] if chk.entropy is not None else None,
        tokens=tokens,
        tokens_skipped=stats[STAT_SKIPPED],
        backend=backend,
    )


def _with_correction(metrics: GrpoLossMetrics, correction: RolloutCorrectionMetrics | None) -> GrpoLossMetrics:
    metrics.rollout_correction = correction
    return metrics


# --------------------------------------------------------------------------------------------------------------------
# 1. The reference: the specification, float64, gradients by autograd
# --------------------------------------------------------------------------------------------------------------------


def grpo_loss_reference(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    entropy: torch.Tensor | None = None,
    objective: PolicyObjective | None = None,
    rollout_logp: torch.Tensor | None = None,
) -> tuple[torch.Tensor, GrpoLossMetrics]:
    """docs/design.md §2 in float64 with autograd: differentiate the returned loss to get the reference gradient.

    The tensors and ``entropy`` as ``grpo_loss`` (same checks); the loss settings as one ``objective``
    (``PolicyObjective``; None: its defaults). Unlike ``grpo_loss`` it takes no flat objective keywords (``beta=``,
    ``loss_type=``, ...): the specification has one way to be called, so passing one is a TypeError. Returns a
    float64 loss (differentiable in ``logp``) and the metrics. ``rollout_logp``: as ``grpo_loss``.
    """
    objective = objective_from_arguments(OP, objective)
    chk = check_loss_inputs(OP, logp, old_logp, ref_logp, advantages, mask, objective, entropy, rollout_logp)
    obj = chk.objective
    f64 = torch.float64
    w = chk.mask.to(f64)
    active = w != 0
    zero = torch.zeros((), dtype=f64, device=w.device)

    def masked(x: torch.Tensor) -> torch.Tensor:  # padding never reaches the result, whatever it holds
        return torch.where(active, x.to(f64), zero)

    lp = masked(chk.logp)
    old = lp.detach() if chk.old_logp is None else masked(chk.old_logp.detach())
    A = chk.advantages.detach().to(f64).unsqueeze(1)  # (B, 1)
    n_row = w.sum(dim=1, keepdim=True)  # (B, 1)

    log_ratio = lp - old
    if obj.sequence_level:  # GSPO: one ratio per completion, the length-normalised sequence likelihood ratio
        log_ratio = (log_ratio * w).sum(dim=1, keepdim=True) / n_row.clamp(min=1.0)
    ratio = torch.exp(log_ratio)
    unclipped = ratio * A
    clipped = ratio.clamp(1.0 - obj.eps_low, 1.0 + obj.eps_high) * A
    pg = -torch.minimum(unclipped, clipped)
    if obj.dual_clip is not None:
        capped = torch.minimum(pg, -obj.dual_clip * A)
        dual = (A < 0) & (pg > -obj.dual_clip * A)
        pg = torch.where(A < 0, capped, pg)
    else:
        dual = torch.zeros_like(pg, dtype=torch.bool)
    correction = None
    if obj.correction is not None:  # TIS: the policy term times a constant truncated ratio, before the KL (as TRL)
        diff = chk.correction_diff(lp, masked)
        pg = pg * truncated_weight(correction_log_ratio(diff, w, obj.correction.sequence), obj.rollout_correction_cap)
        correction = chk.correction_metrics(diff, w)
    token_loss = pg.expand_as(lp)
    kl_tok = None
    if chk.ref_logp is not None:
        kl_tok = obj.kl_estimator.value(masked(chk.ref_logp.detach()) - lp)
        if obj.kl_ratio_weighted:  # TRL's use_bias_correction_kl: the ratio stays differentiable and unclipped
            kl_tok = ratio * kl_tok
        if obj.beta != 0.0:
            token_loss = token_loss + obj.beta * kl_tok

    rows = torch.where(active, token_loss * w, zero).sum(dim=1)
    if obj.aggregation.per_sequence:
        rows = rows / n_row.squeeze(1).clamp(min=1.0)
    tokens = w.sum()
    loss = rows.sum() / chk.denominator(tokens.detach())

    with torch.no_grad():
        low = (ratio < 1.0 - obj.eps_low) & (A < 0)
        high = (ratio > 1.0 + obj.eps_high) & (A > 0)

        def wsum(x):
            return torch.where(active, w * x.to(f64).expand_as(w), zero).sum()

        skipped = zero if obj.beta != 0.0 else torch.where((A == 0) & active, w, zero).sum()
        stats = torch.stack(
            [
                loss.detach() * 0.0,  # the loss column is not a metric
                wsum(kl_tok) if kl_tok is not None else zero,
                wsum(ratio),
                wsum(masked(chk.entropy)) if chk.entropy is not None else zero,
                wsum(low),
                wsum(high),
                wsum(dual),
                tokens,
                skipped,
            ]
        )
    return loss, _with_correction(_metrics(stats, chk, "reference"), correction)


# --------------------------------------------------------------------------------------------------------------------
# 2. The torch path: the kernel's closed-form gradient, vectorised (O(B T) memory, no vocabulary dimension here)
# --------------------------------------------------------------------------------------------------------------------


def policy_term_torch(log_ratio, adv, eps_low, eps_high, dual_clip):
    """Torch twin of kernels.grpo_loss.grpo_policy_term (same tie and NaN rules)."""
    ratio = torch.exp(log_ratio)
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * adv
    take_clipped = clipped < unclipped
    pg = -torch.where(take_clipped, clipped, unclipped)
    dpg = torch.where(take_clipped, 0.0, -unclipped)
    low = take_clipped & (adv < 0)
    high = take_clipped & (adv > 0)
    if dual_clip is not None:
        cap = -dual_clip * adv
        dual = (adv < 0) & (pg > cap)
        pg = torch.where(dual, cap, pg)
        dpg = torch.where(dual, 0.0, dpg)
    else:
        dual = torch.zeros_like(take_clipped)
    return pg, dpg, ratio, low, high, dual


def ratio_weighted_kl_torch(kl_tok, dkl, ratio, kl_bar):
    """(r KL, d(r KL)/dlogp per unit of the token's loss coefficient): torch twin of the kernels' KL_WEIGHTED branch
    (``grpo_token_terms``). ``kl_bar`` is KL_t itself at token level (d rho_t / d logp_t = rho_t) and the completion's
    sum_t m_t KL_t / max(W_b, 1) at sequence level (its whole KL moves with s_b,
    d s_b / d logp_u = s_b m_u / max(W_b, 1)).
    """
    return ratio * kl_tok, ratio * (dkl + kl_bar)


def _grpo_loss_torch(chk: CheckedLoss, write_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    obj = chk.objective
    acc = accumulation_dtype(chk.logp.dtype)
    w = chk.mask.to(acc)
    active = w != 0

    def masked(x):  # padding is replaced by 0 before any arithmetic, so every derived value there is finite
        return torch.where(active, x.detach().to(acc), 0.0)

    lp = masked(chk.logp)
    old = lp if chk.old_logp is None else masked(chk.old_logp)
    adv = chk.advantages.detach().to(acc).unsqueeze(1)
    n_row = w.sum(dim=1, keepdim=True)
    n_row_c = n_row.clamp(min=1.0)
    if obj.sequence_level:
        log_ratio = (w * (lp - old)).sum(dim=1, keepdim=True) / n_row_c  # (B, 1), broadcast over tokens
        pg_grad_scale = n_row / n_row_c
    else:
        log_ratio = lp - old
        pg_grad_scale = 1.0
    pg, dpg, ratio, low, high, dual = policy_term_torch(log_ratio, adv, obj.eps_low, obj.eps_high, obj.dual_clip)
    if obj.correction is not None:  # TIS: the policy term and its gradient times a constant weight
        diff = chk.correction_diff(lp, masked)
        is_w = truncated_weight(correction_log_ratio(diff, w, obj.correction.sequence), obj.rollout_correction_cap)
        pg, dpg = pg * is_w, dpg * is_w
    token_loss, dlogp = pg, dpg * pg_grad_scale
    kl_tok = None
    if chk.ref_logp is not None:
        kl_tok, dkl = obj.kl_estimator.value_and_grad(masked(chk.ref_logp) - lp)
        if obj.kl_ratio_weighted:  # padding has w = 0 and KL = 0 (its inputs were zeroed)
            kl_bar = (w * kl_tok).sum(dim=1, keepdim=True) / n_row_c if obj.sequence_level else kl_tok
            kl_tok, dkl = ratio_weighted_kl_torch(kl_tok, dkl, ratio, kl_bar)
        if obj.beta != 0.0:
            token_loss = token_loss + obj.beta * kl_tok
            dlogp = dlogp + obj.beta * dkl
    coef = w / n_row_c if obj.aggregation.per_sequence else w

    # Padding has w = 0 and finite ratio / KL / entropy (its inputs were zeroed), so w * x needs no mask there; the
    # loss and the gradient involve the advantage, which may be non-finite on a fully masked row: those keep the mask.
    zero = torch.zeros((), dtype=acc, device=w.device)

    def flag_sum(flag):
        return torch.where(flag, w, zero).sum()

    tokens = w.sum()
    skipped = zero if obj.beta != 0.0 else flag_sum((adv == 0) & active)
    stats = torch.stack(
        [
            torch.where(active, coef * token_loss, zero).sum(),
            (w * kl_tok).sum() if kl_tok is not None else zero,
            (w * ratio).sum(),
            (w * masked(chk.entropy)).sum() if chk.entropy is not None else zero,
            flag_sum(low),
            flag_sum(high),
            flag_sum(dual),
            tokens,
            skipped,
        ]
    )
    grad = torch.where(active, coef * dlogp, zero) if write_grad else None
    return stats, grad


# --------------------------------------------------------------------------------------------------------------------
# 3. The Triton path (rlvr_fast.kernels.grpo_loss)
# --------------------------------------------------------------------------------------------------------------------


def _grpo_loss_triton(chk: CheckedLoss, write_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    obj = chk.objective
    from rlvr_fast.kernels.grpo_loss import grpo_loss_fwd  # imported late: TRITON_INTERPRET must be set first

    def detached(x):
        return None if x is None else x.detach()

    out = grpo_loss_fwd(
        chk.logp.detach(),
        detached(chk.old_logp),
        detached(chk.ref_logp),
        chk.mask,
        chk.advantages.detach(),
        detached(chk.entropy),
        rollout_logp=detached(chk.rollout_logp),
        rollout=correction_code(obj.rollout_correction),
        rollout_cap=obj.rollout_correction_cap,
        beta=obj.beta,
        eps_low=obj.eps_low,
        eps_high=obj.eps_high,
        dual_clip=obj.dual_clip,
        kl=obj.kl_estimator.code,
        sequence=obj.sequence_level,
        row_norm=obj.aggregation.per_sequence,
        kl_weighted=obj.kl_ratio_weighted,
        write_grad=write_grad,
    )
    return out.partials.sum(dim=0), out.dlogp


_PATHS: dict[str, Callable[[CheckedLoss, bool], tuple[torch.Tensor, torch.Tensor | None]]] = {
    "torch": _grpo_loss_torch,
    "triton": _grpo_loss_triton,
}


class GrpoLossFunction(torch.autograd.Function):
    """Loss and d loss / d logp in one forward pass; backward scales the stored gradient by grad_output."""

    @staticmethod
    def forward(ctx, logp, chk: CheckedLoss, path: str):
        stats, dlogp = _PATHS[path](chk, ctx.needs_input_grad[0])
        denom = chk.denominator(stats[STAT_TOKENS])
        loss = stats[STAT_LOSS] / denom
        ctx.mark_non_differentiable(stats)
        if isinstance(denom, torch.Tensor):
            ctx.save_for_backward(dlogp, denom)
        else:
            ctx.save_for_backward(dlogp)
        ctx.denom = denom if not isinstance(denom, torch.Tensor) else None
        ctx.logp_dtype = logp.dtype
        return loss, stats

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, grad_stats):
        dlogp, *denom = ctx.saved_tensors
        scale = grad_loss / (denom[0] if denom else ctx.denom)
        return (dlogp * scale).to(ctx.logp_dtype), None, None


# --------------------------------------------------------------------------------------------------------------------
# 4. The public op
# --------------------------------------------------------------------------------------------------------------------


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    beta: float = DEFAULT.beta,
    kl: str = DEFAULT.kl,
    eps_low: float = DEFAULT.eps_low,
    eps_high: float | None = DEFAULT.eps_high,
    dual_clip: float | None = DEFAULT.dual_clip,
    loss_type: str = DEFAULT.loss_type,
    importance_sampling: str = DEFAULT.importance_sampling,
    max_completion_length: int | None = DEFAULT.max_completion_length,
    num_items: float | torch.Tensor | None = DEFAULT.num_items,
    kl_ratio_weighted: bool = DEFAULT.kl_ratio_weighted,
    rollout_correction: str | None = DEFAULT.rollout_correction,
    rollout_correction_cap: float = DEFAULT.rollout_correction_cap,
    entropy: torch.Tensor | None = None,
    objective: PolicyObjective | None = None,
    backend: str = "auto",
    rollout_logp: torch.Tensor | None = None,
) -> tuple[torch.Tensor, GrpoLossMetrics]:
    """GRPO-family policy loss of B completions from their per-token log-probs, in one fused pass.

    Args:
        logp: (B, T) log-probs of the sampled tokens under the policy being trained (fp16 / bf16 / fp32 / fp64);
            the only input that receives a gradient (same dtype as logp).
        old_logp: (B, T) log-probs under the behaviour policy that sampled them, or None for on-policy training with
            one update per rollout (old = logp.detach(): ratio 1, gradient A * grad logp).
        ref_logp: (B, T) reference-model log-probs; needed when beta > 0, optional otherwise (then only the mean_kl
            metric uses it).
        advantages: (B,) one scalar per completion (rlvr_fast.group_advantages).
        mask: (B, T) bool / integer / float; 1 on completion tokens that count, 0 on padding (float values act as
            per-token weights).
        beta ... kl_ratio_weighted: the objective's fields, checked by ``PolicyObjective`` (rlvr_fast.ops.objective),
            whose defaults they take (the signature shows them):
        beta: KL coefficient, >= 0 (0: no reference model needed).
        kl: KL estimator of d = ref - logp: "k1" (-d), "k2" (d^2 / 2), "k3" (exp(d) - d - 1, unclamped, as in TRL and
            Liger), or "low_var_kl" (verl's k3, clamped: d to [-20, 20], the estimate to [-10, 10]).
        eps_low, eps_high: clip range [1 - eps_low, 1 + eps_high] of the ratio; eps_low in [0, 1], eps_high >= 0,
            defaults to eps_low (DAPO's clip-higher uses eps_high = 0.28).
        dual_clip: c > 1 caps the loss of negative-advantage tokens at -c A (dual-clip PPO), or None.
        loss_type: "grpo" | "bnpo" | "dr_grpo" | "dapo" (normalisers in rlvr_fast.ops.loss_types.LOSS_TYPES).
        importance_sampling: "token" (PPO ratio per token) or "sequence" (GSPO's length-normalised sequence ratio).
        max_completion_length: dr_grpo's fixed length L (>= T): loss = sum m l / (B * L). Required by dr_grpo only.
        num_items: dapo's denominator: the active-token count of the whole accumulated batch (all micro-batches;
            divided by the data-parallel world size under DDP). Default: this call's token count (= bnpo). A tensor
            is read once on the host (one device sync) to check that it is > 0.
        kl_ratio_weighted: multiply the KL term by the importance ratio (differentiable, unclipped; token rho_t or
            GSPO's s_b): TRL's use_bias_correction_kl. Requires beta > 0. ``mean_kl`` is then the mean of r * KL.
        rollout_correction, rollout_correction_cap: truncated importance sampling of the rollout engine's samples:
            None | "token_truncate" | "sequence_truncate" and its cap C (rlvr_fast.ops.rollout_correction); with one,
            ``rollout_logp`` is required.
        entropy: (B, T) per-token entropies, for the mean_entropy metric only (no gradient).
        objective: the objective as one ``PolicyObjective`` (rlvr_fast.ops.objective) instead of beta ... num_items,
            which must then stay at their defaults. Its ``temperature`` is not read here (logp already includes it).
        backend: "auto" | "triton" | "cuda" | "torch" (see rlvr_fast.backends); an unavailable one raises.
        rollout_logp: (B, T) the rollout engine's log-probs of the sampled tokens; required exactly when
            ``rollout_correction`` is set, finite and <= OLD_LOGP_MAX where mask != 0. No gradient.

    Returns:
        (loss, metrics): loss is a 0-d fp32 tensor (fp64 for fp64 logp), differentiable in logp; metrics is a
        ``GrpoLossMetrics`` of 0-d tensors (with ``rollout_correction`` metrics when a correction is on).
    """
    objective = objective_from_arguments(OP, objective, **flat_arguments(locals()))
    chk = check_loss_inputs(OP, logp, old_logp, ref_logp, advantages, mask, objective, entropy, rollout_logp)
    chosen = select_backend(backend, logp.device, op=OP)
    path = chosen if logp.numel() else "torch"  # nothing to launch: the torch path returns zeros of the right shapes
    loss, stats = GrpoLossFunction.apply(logp, chk, path)
    correction = None
    if objective.correction is not None:
        acc = accumulation_dtype(logp.dtype)
        w = chk.mask.to(acc)
        diff = chk.correction_diff(logp.detach().to(acc), lambda x: torch.where(w != 0, x.to(acc), 0.0))
        correction = chk.correction_metrics(torch.where(w != 0, diff, 0.0), w)
    return loss, _with_correction(_metrics(stats, chk, chosen), correction)
