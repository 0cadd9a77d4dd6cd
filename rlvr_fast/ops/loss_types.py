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

Part of a step. A caller that splits one optimiser step into several loss calls (gradient-accumulation micro-batches,
data-parallel ranks, or only the completions that were not skipped) describes each call's part with a ``StepShare``;
the loss type's ``partial_normaliser`` says what to pass as ``num_items`` and by how much to scale the call's loss so
that the calls' gradients sum to those of the whole step:

| loss type | num_items            | scale of the call's loss                        |
|-----------|----------------------|-------------------------------------------------|
| grpo      | -                    | row_fraction (its completions / the step's)     |
| bnpo      | -                    | token_fraction (its active tokens / the step's) |
| dr_grpo   | -                    | row_fraction                                    |
| dapo      | step_tokens          | 1                                               |

Callers never branch on a loss type: they build a ``StepShare`` and apply what the row returns
(``rlvr_fast.ops.objective.PolicyObjective.for_share``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from rlvr_fast.ops.constants import (
    IS_SEQUENCE,
    IS_TOKEN,
    KL_K1,
    KL_K2,
    KL_K3,
    KL_LOW_VAR,
    LOW_VAR_KL_D_CLAMP,
    LOW_VAR_KL_VALUE_CLAMP,
)


@dataclass(frozen=True)
class AggregationContext:
    """What a loss type's denominator may read."""

    n_rows: int  # B: completions in this call
    token_count: torch.Tensor  # 0-d, sum of the mask weights of this call
    max_completion_length: int | None
    num_items: float | torch.Tensor | None  # > 0 when given (checked)


@dataclass(frozen=True)
class StepShare:
    """The part of one optimiser step that one loss call holds, as the loss types' partial normalisers read it.

    row_fraction: completions in this call / completions the step's normaliser counts.
    token_fraction: active tokens (mask weight) in this call / those the step's normaliser counts.
    step_tokens: the active tokens of the whole step (dapo's ``num_items``), divided by the data-parallel world size
        when ranks average their gradients (module doc).

    ``of_part`` builds it from counts (an exact split); ``equal_parts`` gives every one of n calls the weight 1 / n,
    which is what TRL does under gradient accumulation.
    """

    row_fraction: float
    token_fraction: float
    step_tokens: float | torch.Tensor

    @classmethod
    def of_part(cls, rows: int, tokens: float, step_rows: int, step_tokens: float) -> StepShare:
        """A call holding ``rows`` completions with ``tokens`` active tokens, of a step of ``step_rows`` completions
        with ``step_tokens`` active tokens (a step without any has nothing to share: its fractions are 0)."""
        return cls(
            row_fraction=rows / step_rows if step_rows else 0.0,
            token_fraction=tokens / step_tokens if step_tokens else 0.0,
            step_tokens=step_tokens,
        )

    @classmethod
    def equal_parts(cls, n_parts: int, step_tokens: float | torch.Tensor) -> StepShare:
        """One of ``n_parts`` calls weighted equally (1 / n_parts each), the step counting ``step_tokens`` tokens."""
        if n_parts < 1:
            raise ValueError(f"StepShare.equal_parts: n_parts must be >= 1, got {n_parts}")
        return cls(row_fraction=1.0 / n_parts, token_fraction=1.0 / n_parts, step_tokens=step_tokens)


@dataclass(frozen=True)
class PartialNormaliser:
    """What one call of a split step passes and does: ``num_items`` for the op (None: the op's own), then multiply
    the call's loss by ``scale``."""

    num_items: float | torch.Tensor | None
    scale: float


@dataclass(frozen=True)
class LossType:
    """One aggregation of the per-token loss into a scalar (see the module table)."""

    name: str
    per_sequence: bool  # R_b is divided by max(sum_t m_bt, 1) before summing over completions
    denominator: Callable[[AggregationContext], torch.Tensor | float]
    uses: tuple[str, ...]  # the optional arguments this normaliser reads; passing them to another loss type is an error
    requires: tuple[str, ...]  # the subset of ``uses`` that must be given
    partial: Callable[[StepShare], PartialNormaliser]  # how a call holding part of a step is normalised
    source: str

    def reads(self, field: str) -> bool:
        """Whether this loss type's normaliser reads the optional objective field ``field``."""
        return field in self.uses

    def partial_normaliser(self, share: StepShare) -> PartialNormaliser:
        """``num_items`` and the loss scale of a call holding ``share`` of a step (module doc, "Part of a step")."""
        return self.partial(share)


def _local_token_count(ctx: AggregationContext) -> torch.Tensor:
    return ctx.token_count.clamp(min=1.0)


def _dapo_denominator(ctx: AggregationContext) -> torch.Tensor | float:
    if ctx.num_items is None:
        return _local_token_count(ctx)
    return ctx.num_items


def _share_of_rows(share: StepShare) -> PartialNormaliser:
    return PartialNormaliser(num_items=None, scale=share.row_fraction)


def _share_of_tokens(share: StepShare) -> PartialNormaliser:
    return PartialNormaliser(num_items=None, scale=share.token_fraction)


def _step_token_count(share: StepShare) -> PartialNormaliser:
    return PartialNormaliser(num_items=share.step_tokens, scale=1.0)


LOSS_TYPES: dict[str, LossType] = {
    lt.name: lt
    for lt in (
        LossType(
            name="grpo",
            per_sequence=True,
            denominator=lambda ctx: float(max(ctx.n_rows, 1)),
            uses=(),
            requires=(),
            partial=_share_of_rows,
            source="Shao et al. 2024, arXiv:2402.03300",
        ),
        LossType(
            name="bnpo",
            per_sequence=False,
            denominator=_local_token_count,
            uses=(),
            requires=(),
            partial=_share_of_tokens,
            source="TRL GRPOConfig loss_type='bnpo'",
        ),
        LossType(
            name="dr_grpo",
            per_sequence=False,
            denominator=lambda ctx: float(max(ctx.n_rows, 1) * ctx.max_completion_length),
            uses=("max_completion_length",),
            requires=("max_completion_length",),
            partial=_share_of_rows,
            source="Liu et al. 2025, arXiv:2503.20783",
        ),
        LossType(
            name="dapo",
            per_sequence=False,
            denominator=_dapo_denominator,
            uses=("num_items",),
            requires=(),
            partial=_step_token_count,
            source="Yu et al. 2025, arXiv:2503.14476",
        ),
    )
}


# --------------------------------------------------------------------------------------------------------------------
# KL estimators of KL(pi_theta || pi_ref) from one sample, with d = ref_logp - logp (Schulman 2020,
# http://joschu.net/blog/kl-approx.html). ``value`` is the specification (float64, differentiated by autograd in the
# reference); ``value_and_grad`` is the closed form (value, d value / d logp) the torch path uses. exp(d) - d - 1
# cancels catastrophically for small |d| in float32 (at |d| = 1e-4 an fp32 evaluation has no correct digit), so the
# torch path evaluates k3 in float64 and rounds once (the Triton kernel uses a short Taylor series instead).
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KLEstimator:
    name: str
    code: int  # the Triton kernel's constexpr id (rlvr_fast.ops.constants.KL_*)
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
        KLEstimator(
            name="k1",
            code=KL_K1,
            value=lambda d: -d,
            value_and_grad=_k1,
            doc="k1 = logp - ref = -d (unbiased, high variance, can be negative)",
        ),
        KLEstimator(name="k2", code=KL_K2, value=lambda d: 0.5 * d * d, value_and_grad=_k2, doc="k2 = d^2 / 2"),
        KLEstimator(
            name="k3",
            code=KL_K3,
            value=lambda d: torch.expm1(d) - d,
            value_and_grad=_k3,
            doc="k3 = exp(d) - d - 1 (GRPO's, TRL's and Liger's; unclamped, so a large |d| gives a large penalty)",
        ),
        KLEstimator(
            name="low_var_kl",
            code=KL_LOW_VAR,
            value=_low_var_kl_spec,
            value_and_grad=_low_var_kl,
            doc="verl's low_var_kl: k3 of d clamped to [-20, 20], the estimate clamped to [-10, 10] (no gradient "
            "beyond)",
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
        ImportanceSampling(name="token", code=IS_TOKEN, doc="rho_bt = exp(logp_bt - old_bt) (PPO / GRPO)"),
        ImportanceSampling(
            name="sequence",
            code=IS_SEQUENCE,
            doc="s_b = exp(sum_t m_bt (logp_bt - old_bt) / max(sum_t m_bt, 1)), shared by the completion's tokens "
            "(GSPO, Zheng et al. 2025, arXiv:2507.18071; TRL/Liger importance_sampling_level='sequence')",
        ),
    )
}
