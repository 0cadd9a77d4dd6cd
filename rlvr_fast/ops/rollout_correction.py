"""Off-policy correction of the rollout engine's sampling: truncated importance sampling (TIS).

A rollout engine (vLLM, SGLang) samples with other kernels, another precision and possibly weights a few steps old,
so its log-probs of the sampled tokens (``rollout_logp``) differ from the trainer's. Yao et al. 2025 ("Your efficient
RL framework secretly brings you off-policy RL training") weight each token's policy-gradient term by the truncated
ratio of the trainer's behaviour policy to the engine's:

    d_bt   = old_bt - rollout_bt        old = old_logp, or logp.detach() when old_logp is None (one update per rollout)
    token_truncate:     w_bt = min(exp(d_bt), C)
    sequence_truncate:  w_bt = min(exp(sum_t m_bt d_bt), C)          (one weight per completion, every token uses it)
    l_bt   = w_bt * pg_bt + beta * KL_bt                             (w is a constant: no gradient flows through it)

This is TRL 1.16's ``vllm_importance_sampling_correction`` with ``vllm_importance_sampling_mode`` "token_truncate" /
"sequence_truncate" and ``vllm_importance_sampling_clip_max`` = C (``clip_min`` None): TRL computes the ratio from its
``old_per_token_logps`` (the trainer's own log-probs before the update), sums the masked log-difference for the
sequence mode (a sum, not GSPO's mean), clamps, and multiplies ``per_token_loss`` by it before adding the KL term
(trl/trainer/grpo_trainer.py, ``_generate_and_score_completions`` and ``_compute_loss``). With float mask weights the
sequence sum is mask-weighted; for 0/1 masks this is TRL's formula exactly.

Metrics (``RolloutCorrectionMetrics``): TRL's ``sampling/importance_sampling_ratio/{min,mean,max}`` (of the truncated
weight, over counted tokens in token mode and over completions in sequence mode) and
``sampling/sampling_logp_difference/{mean,max}`` (|d| over counted tokens), plus the clipped fraction (the share of
tokens / completions whose ratio exceeded C, which TRL does not log).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from rlvr_fast.ops.constants import ROLLOUT_OFF, ROLLOUT_SEQUENCE, ROLLOUT_TOKEN


@dataclass(frozen=True)
class RolloutCorrection:
    """One correction mode: its kernel code and whether one weight serves the whole completion."""

    code: int
    sequence: bool
    source: str


# The modes, named after TRL's ``vllm_importance_sampling_mode`` values (its *_mask modes are not implemented here).
ROLLOUT_CORRECTIONS: dict[str, RolloutCorrection] = {
    "token_truncate": RolloutCorrection(ROLLOUT_TOKEN, False, "TRL token_truncate; Yao et al. 2025 (TIS)"),
    "sequence_truncate": RolloutCorrection(ROLLOUT_SEQUENCE, True, "TRL sequence_truncate"),
}
DEFAULT_CAP = 3.0  # TRL 1.16's vllm_importance_sampling_clip_max default


def correction_code(name: str | None) -> int:
    """The kernels' ROLLOUT constexpr for a correction name (None: off)."""
    return ROLLOUT_OFF if name is None else ROLLOUT_CORRECTIONS[name].code


def truncated_weight(log_ratio: torch.Tensor, cap: float) -> torch.Tensor:
    """min(exp(log_ratio), cap); a NaN stays NaN (as ``torch.clamp`` and the kernels' ``rollout_weight``)."""
    ratio = torch.exp(log_ratio)
    return torch.where(ratio > cap, cap, ratio)


def correction_log_ratio(diff: torch.Tensor, w: torch.Tensor, sequence: bool) -> torch.Tensor:
    """The log of the untruncated ratio from d = old - rollout (B, T), zero at padding: d itself (token mode) or
    the completion's mask-weighted sum (B, 1) (sequence mode)."""
    return (w * diff).sum(dim=1, keepdim=True) if sequence else diff


@dataclass
class RolloutCorrectionMetrics:
    """Diagnostics of the correction in one call: 0-d tensors, no host sync (``as_dict`` syncs once).

    ratio_mean / ratio_min / ratio_max: the truncated weight w (TRL's sampling/importance_sampling_ratio/*), over the
        counted tokens (mask-weighted mean) in token mode, over the completions in sequence mode.
    clipped_frac: share of those tokens / completions whose ratio exceeded the cap (truncated).
    logp_diff_mean / logp_diff_max: |old - rollout| over the counted tokens (TRL's sampling/sampling_logp_difference/*).
    units: what the ratio statistics are over (the mask weight of the tokens, or the completions), to combine calls
        (means weighted by it, min / max as such); tokens: the mask weight the logp_diff mean is over.
    Empty: every statistic is 0 (TRL's convention).
    """

    ratio_mean: torch.Tensor
    ratio_min: torch.Tensor
    ratio_max: torch.Tensor
    clipped_frac: torch.Tensor
    logp_diff_mean: torch.Tensor
    logp_diff_max: torch.Tensor
    units: torch.Tensor
    tokens: torch.Tensor

    def as_dict(self, prefix: str = "rollout_is_") -> dict[str, float]:
        values = torch.stack([getattr(self, f.name).to(torch.float64) for f in fields(self)]).tolist()
        return {prefix + f.name: v for f, v in zip(fields(self), values, strict=True)}


def rollout_metrics(
    name: str, cap: float, diff: torch.Tensor, w: torch.Tensor, rows: torch.Tensor
) -> RolloutCorrectionMetrics:
    """The metrics of correction ``name`` from d = old - rollout (B, T) at the tokens with weight w (B, T) != 0
    (other positions ignored whatever they hold) and ``rows`` (B,) bool, the completions counted in sequence mode."""
    with torch.no_grad():
        w = w.to(diff.dtype)
        counted = w != 0
        diff = torch.where(counted, diff, 0.0)
        zero = diff.new_zeros(())

        def mean(total, n):
            return torch.where(n > 0, total / n.clamp(min=torch.finfo(diff.dtype).tiny), zero)

        def extreme(x, keep, fn, fill):
            return torch.where(keep.any(), fn(torch.where(keep, x, fill)), zero)

        sequence = ROLLOUT_CORRECTIONS[name].sequence
        log_ratio = correction_log_ratio(diff, w, sequence)
        if sequence:
            log_ratio, unit_w = log_ratio.squeeze(1), rows.to(diff.dtype)
        else:
            unit_w = w
        keep = unit_w != 0
        ratio = truncated_weight(log_ratio, cap)
        units = unit_w.sum()
        tokens = w.sum()
        inf = torch.tensor(float("inf"), dtype=diff.dtype, device=diff.device)
        return RolloutCorrectionMetrics(
            ratio_mean=mean((unit_w * ratio).sum(), units),
            ratio_min=extreme(ratio, keep, torch.amin, inf),
            ratio_max=extreme(ratio, keep, torch.amax, -inf),
            clipped_frac=mean(torch.where(torch.exp(log_ratio) > cap, unit_w, zero).sum(), units),
            logp_diff_mean=mean((w * diff.abs()).sum(), tokens),
            logp_diff_max=extreme(diff.abs(), counted, torch.amax, -inf),
            units=units,
            tokens=tokens,
        )
