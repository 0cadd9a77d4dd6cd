"""The one place where an integration turns last hidden states into the GRPO-family policy loss.

Every adapter (``rlvr_fast.integrations.trl`` today) calls ``hidden_state_policy_loss`` and nothing else for its loss,
so the implementation behind it is chosen here, once:

- ``"composed"``: ``token_logprobs`` (LM head + log-softmax + gather + entropy, chunked, no (N, V) logits) followed by
  ``grpo_loss`` (clipped surrogate + KL + aggregation in one elementwise pass). Two ops, one (B, T) log-prob tensor
  between them.
- ``"fused"`` (the default): ``rlvr_fast.ops.fused_linear_grpo_loss.fused_linear_grpo_loss``, one op from hidden states
  to the loss with its gradients formed in the same pass over the vocabulary, which also skips the LM-head work of
  zero-advantage completions when beta == 0 (its entropy / KL metrics then average over the tokens it evaluated).

Both take the same arguments (the tensors and one ``PolicyObjective``), so the choice changes no caller.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable

import torch

from rlvr_fast.ops.constants import IGNORE_INDEX
from rlvr_fast.ops.grpo_loss import GrpoLossMetrics, grpo_loss
from rlvr_fast.ops.logprobs import token_logprobs
from rlvr_fast.ops.objective import PolicyObjective


def _composed(
    hidden,
    weight,
    targets,
    mask,
    advantages,
    *,
    old_logp,
    ref_logp,
    bias,
    objective,
    return_entropy,
    backend,
    rollout_logp=None,
):
    out = token_logprobs(
        hidden,
        weight,
        targets,
        bias=bias,
        temperature=objective.temperature,
        ignore_index=IGNORE_INDEX,
        return_entropy=return_entropy,
        backend=backend,
    )
    logp, entropy = out if return_entropy else (out, None)
    return grpo_loss(
        logp,
        old_logp,
        ref_logp,
        advantages,
        mask,
        entropy=None if entropy is None else entropy.detach(),
        backend=backend,
        objective=objective,
        rollout_logp=rollout_logp,
    )


def _fused_op() -> Callable | None:
    """``fused_linear_grpo_loss`` when its module provides the fused op (only the reference exists before it lands)."""
    module = importlib.import_module("rlvr_fast.ops.fused_linear_grpo_loss")
    return getattr(module, "fused_linear_grpo_loss", None)


def _fused(hidden, weight, targets, mask, advantages, *, backend, **kwargs):
    op = _fused_op()
    if op is None:
        raise RuntimeError(
            "hidden_state_policy_loss(implementation='fused'): rlvr_fast.ops.fused_linear_grpo_loss does not provide "
            "fused_linear_grpo_loss in this installation; use implementation='composed'"
        )
    if "backend" in inspect.signature(op).parameters:
        kwargs["backend"] = backend
    elif backend != "auto":
        raise ValueError(
            f"hidden_state_policy_loss: the fused op takes no backend argument, so backend={backend!r} "
            f"cannot be honoured; pass backend='auto'"
        )
    return op(hidden, weight, targets, mask, advantages, **kwargs)


IMPLEMENTATIONS: dict[str, Callable[..., tuple[torch.Tensor, GrpoLossMetrics]]] = {
    "composed": _composed,
    "fused": _fused,
}

# The implementation every integration uses unless told otherwise: the one-op path (tested against its reference in
# tests/ops/test_fused_linear_grpo_loss.py, and against stock TRL in tests/integrations/test_trl_integration.py).
# Switching is this line.
DEFAULT_IMPLEMENTATION = "fused"


def hidden_state_policy_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    objective: PolicyObjective,
    *,
    bias: torch.Tensor | None = None,
    old_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    rollout_logp: torch.Tensor | None = None,
    return_entropy: bool = True,
    backend: str = "auto",
    implementation: str | None = None,
) -> tuple[torch.Tensor, GrpoLossMetrics]:
    """GRPO-family loss of B completions straight from the policy's last hidden states: no (B, T, V) logits.

    Args:
        hidden: (B, T, D) last hidden states at the positions that predict ``targets`` (differentiable).
        weight: (V, D) LM head (or tied embedding); bias: (V,) or None.
        targets: (B, T) sampled token ids; positions with mask 0 may hold anything (they are set to -100 here, so no
            LM-head work is spent on them).
        mask: (B, T) 1 on the completion tokens that count (bool / integer / float weights).
        advantages: (B,) one scalar per completion.
        objective: the objective (``rlvr_fast.ops.objective.PolicyObjective``); for one part of a split step (a
            gradient-accumulation window, a rank) use ``objective.for_share(...)``, which sets dapo's num_items.
        old_logp, ref_logp: (B, T) behaviour-policy and reference log-probs, or None (on-policy / no KL).
        rollout_logp: (B, T) the rollout engine's log-probs of ``targets``, read by ``objective.rollout_correction``
            (truncated importance sampling, ``rlvr_fast.ops.rollout_correction``); None without one.
        return_entropy: compute the per-token entropy for the mean_entropy metric (no gradient flows through it).
        backend: "auto" | "triton" | "cuda" | "torch", forwarded to the ops.
        implementation: a key of ``IMPLEMENTATIONS`` (None: ``DEFAULT_IMPLEMENTATION``).

    Returns:
        (loss, metrics): 0-d fp32 loss differentiable in hidden, weight and bias; ``GrpoLossMetrics``.
    """
    name = DEFAULT_IMPLEMENTATION if implementation is None else implementation
    if name not in IMPLEMENTATIONS:
        raise ValueError(
            f"hidden_state_policy_loss: implementation must be one of {sorted(IMPLEMENTATIONS)}, got {name!r}"
        )
    if not isinstance(objective, PolicyObjective):
        raise TypeError(
            f"hidden_state_policy_loss: objective must be a PolicyObjective, got {type(objective).__name__}"
        )
    if not isinstance(targets, torch.Tensor) or not isinstance(mask, torch.Tensor) or targets.shape != mask.shape:
        raise ValueError(
            f"hidden_state_policy_loss: targets and mask must be tensors of the same (B, T) shape, got "
            f"{tuple(getattr(targets, 'shape', ()))} and {tuple(getattr(mask, 'shape', ()))}"
        )
    targets = targets.masked_fill(mask == 0, IGNORE_INDEX)
    return IMPLEMENTATIONS[name](
        hidden,
        weight,
        targets,
        mask,
        advantages,
        old_logp=old_logp,
        ref_logp=ref_logp,
        rollout_logp=rollout_logp,
        bias=bias,
        objective=objective,
        return_entropy=return_entropy,
        backend=backend,
    )
