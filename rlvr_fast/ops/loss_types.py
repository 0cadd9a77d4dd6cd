"""Registries of the GRPO-family policy loss: aggregations (loss types), KL estimators, importance-sampling levels.

Formulas: docs/design.md §2. Every path of ``grpo_loss`` (the float64 reference, the torch path,
the Triton kernel) reads these tables; a new loss type, KL estimator or importance-sampling level is a new row here
(plus its ``code`` in the kernel), never a new branch in the callers.

Aggregation. The per-token loss l_bt (policy term + beta * KL) of completion b, token t, with mask weight m_bt, is
reduced as ``loss = sum_b R_b / D`` where R_b = sum_t m_bt l_bt, divided first by the completion's own token count
max(sum_t m_bt, 1) when the loss type is ``per_sequence``, and D is the loss type's ``denominator``:

| loss type | per_sequence | D                                      | source                                        |
|-----------|--------------|----------------------------------------|-----------------------------------------------|
| grpo      | yes          | B (completions in the call)            | Shao et al. 2024 (2402.03300); TRL ``grpo``   |
| bnpo      | no           | max(sum m, 1) over the call            | TRL ``bnpo``                                  |
| dr_grpo   | no           | B * max_completion_length              | Liu et al. 2025 (2503.20783); TRL ``dr_grpo`` |
| dapo      | no           | num_items (default: max(sum m, 1))     | Yu et al. 2025 (2503.14476); TRL ``dapo``     |

B counts every completion passed in, fully masked ones included (TRL's ``.mean()`` over the batch, Liger's division by
``full_attention_mask.shape[0]``). The normalisers are the ones TRL 1.16's ``GRPOTrainer._compute_loss`` and
Liger-Kernel 0.8.5's ``LigerFusedLinearGRPOFunction.ppo_loss_fn`` apply to one micro-batch on one process with
gradient-accumulation factor 1. Liger #1082 (a fused path with 100x TRL's gradient norm) was a normaliser mismatch:
the tests pin each row of this table against TRL's and Liger's code.

``num_items`` (dapo): the number of active tokens that the whole optimiser step averages over, counted across all
gradient-accumulation micro-batches *before* any of them runs, so that summing the micro-batches' gradients gives the
token mean of the whole step (DAPO's token-level loss). Data-parallel training that averages gradients over P ranks
(DDP/FSDP) must pass the global count divided by P, which is what TRL (``num_items_in_batch / num_processes``) and
Liger do internally; this op never queries ``torch.distributed`` itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AggregationContext:
    """What a loss type's denominator may read."""

    n_rows: int  # B: completions in this call
    token_count: torch.Tensor  # 0-d, sum of the mask weights of this call
    max_completion_length: int | None
    num_items: float | torch.Tensor | None  # > 0 when given (checked)


@dataclass(frozen=True)
class LossType:
    """One aggregation of the per-token loss into a scalar (see the module table)."""

    name: str
    per_sequence: bool  # R_b is divided by max(sum_t m_bt, 1) before summing over completions
    denominator: Callable[[AggregationContext], torch.Tensor | float]
    uses: tuple[str, ...]  # the optional arguments this normaliser reads; passing them to another loss type is an error
    requires: tuple[str, ...]  # the subset of ``uses`` that must be given
    source: str


def _local_token_count(ctx: AggregationContext) -> torch.Tensor:
    return ctx.token_count.clamp(min=1.0)


def _dapo_denominator(ctx: AggregationContext) -> torch.Tensor | float:
    if ctx.num_items is None:
        return _local_token_count(ctx)
    return ctx.num_items


LOSS_TYPES: dict[str, LossType] = {
    lt.name: lt
    for lt in (
        LossType("grpo", True, lambda ctx: float(max(ctx.n_rows, 1)), (), (), "Shao et al. 2024, arXiv:2402.03300"),
        LossType("bnpo", False, _local_token_count, (), (), "TRL GRPOConfig loss_type='bnpo'"),
        LossType(
            "dr_grpo",
            False,
            lambda ctx: float(max(ctx.n_rows, 1) * ctx.max_completion_length),
            ("max_completion_length",),
            ("max_completion_length",),
            "Liu et al. 2025, arXiv:2503.20783",
        ),
        LossType("dapo", False, _dapo_denominator, ("num_items",), (), "Yu et al. 2025, arXiv:2503.14476"),
    )
}


# --------------------------------------------------------------------------------------------------------------------
# KL estimators of KL(pi_theta || pi_ref) from one sample, with d = ref_logp - logp (Schulman 2020,
# http://joschu.net/blog/kl-approx.html). ``value`` is the specification (float64, differentiated by autograd in the
# reference); ``value_and_grad`` is the closed form (value, d value / d logp) the torch path uses. exp(d) - d - 1
# cancels catastrophically for small |d| in float32 (at |d| = 1e-4 an fp32 evaluation has no correct digit), so the
# torch path evaluates k3 in float64 and rounds once (the Triton kernel uses a short Taylor series instead).
# --------------------------------------------------------------------------------------------------------------------

# verl's low_var_kl clamps (verl/trainer/ppo/core_algos.py kl_penalty): d to [-20, 20], then the estimate to [-10, 10]
LOW_VAR_KL_D_CLAMP = 20.0
LOW_VAR_KL_VALUE_CLAMP = 10.0


@dataclass(frozen=True)
class KLEstimator:
    name: str
    code: int  # the Triton kernel's constexpr id (rlvr_fast.kernels.grpo_loss.KL_*)
    value: Callable[[torch.Tensor], torch.Tensor]  # spec: KL from d, differentiable
    value_and_grad: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # (KL, dKL/dlogp) from d
    doc: str


def _k1(d):
    return -d, torch.ones_like(d)


def _k2(d):
    return 0.5 * d * d, -d


def _k3(d):
    d64 = d.to(torch.float64)
    e = torch.expm1(d64)
    return (e - d64).to(d.dtype), (-e).to(d.dtype)


def _low_var_kl_spec(d: torch.Tensor) -> torch.Tensor:
    dc = d.clamp(-LOW_VAR_KL_D_CLAMP, LOW_VAR_KL_D_CLAMP)
    return (torch.expm1(dc) - dc).clamp(-LOW_VAR_KL_VALUE_CLAMP, LOW_VAR_KL_VALUE_CLAMP)


def _low_var_kl(d):
    dc = d.to(torch.float64).clamp(-LOW_VAR_KL_D_CLAMP, LOW_VAR_KL_D_CLAMP)
    e = torch.expm1(dc)
    k = e - dc
    # torch.clamp passes the gradient only inside [min, max] (a NaN input gets none): mirror it exactly
    passes = (d.abs() <= LOW_VAR_KL_D_CLAMP) & (k <= LOW_VAR_KL_VALUE_CLAMP) & (k >= -LOW_VAR_KL_VALUE_CLAMP)
    value = k.clamp(-LOW_VAR_KL_VALUE_CLAMP, LOW_VAR_KL_VALUE_CLAMP)
    return value.to(d.dtype), torch.where(passes, -e, 0.0).to(d.dtype)


KL_ESTIMATORS: dict[str, KLEstimator] = {
    e.name: e
    for e in (
        KLEstimator("k1", 0, lambda d: -d, _k1, "k1 = logp - ref = -d (unbiased, high variance, can be negative)"),
        KLEstimator("k2", 1, lambda d: 0.5 * d * d, _k2, "k2 = d^2 / 2"),
        KLEstimator(
            "k3",
            2,
            lambda d: torch.expm1(d) - d,
            _k3,
            "k3 = exp(d) - d - 1 (GRPO's, TRL's and Liger's; unclamped, so a large |d| gives a large penalty)",
        ),
        KLEstimator(
            "low_var_kl",
            3,
            _low_var_kl_spec,
            _low_var_kl,
            "verl's low_var_kl: k3 of d clamped to [-20, 20], the estimate clamped to [-10, 10] (no gradient beyond)",
        ),
    )
}


@dataclass(frozen=True)
class ImportanceSampling:
    name: str
    code: int
    doc: str


IS_LEVELS: dict[str, ImportanceSampling] = {
    s.name: s
    for s in (
        ImportanceSampling("token", 0, "rho_bt = exp(logp_bt - old_bt) (PPO / GRPO)"),
        ImportanceSampling(
            "sequence",
            1,
            "s_b = exp(sum_t m_bt (logp_bt - old_bt) / max(sum_t m_bt, 1)), shared by the completion's tokens "
            "(GSPO, Zheng et al. 2025, arXiv:2507.18071; TRL/Liger importance_sampling_level='sequence')",
        ),
    )
}
