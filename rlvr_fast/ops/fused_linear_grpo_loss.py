"""GRPO-family loss from hidden states: LM head, log-softmax, gather and ``grpo_loss`` composed.

This module holds the specification of the fused-linear op: ``fused_linear_grpo_loss_reference`` composes the two
references, ``token_logprobs_reference`` (float64, materialised logits; ALGORITHMS.md section 3) and
``grpo_loss_reference`` (section 2). The fused kernel, which never materialises the logits and skips the LM-head work of
zero-advantage completions when beta == 0, is tested against it.
"""

from __future__ import annotations

import torch

from rlvr_fast.ops.grpo_loss import GrpoLossMetrics, grpo_loss_reference
from rlvr_fast.ops.logprobs_reference import token_logprobs_reference

OP = "fused_linear_grpo_loss"
IGNORE_INDEX = -100


def _check_linear_inputs(hidden, weight, targets, mask, advantages, bias, temperature) -> None:
    """Shape / dtype checks of the LM-head inputs (the loss arguments are checked by grpo_loss's own checks)."""
    for name, x in (("hidden", hidden), ("weight", weight)):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            got = getattr(x, "dtype", type(x).__name__)
            raise TypeError(f"{OP}: {name} must be a floating torch.Tensor, got {got}")
    if hidden.dim() != 3:
        raise ValueError(f"{OP}: hidden must be (B, T, D), got shape {tuple(hidden.shape)}")
    B, T, D = hidden.shape
    if weight.dim() != 2 or weight.shape[1] != D:
        raise ValueError(f"{OP}: weight must be (V, D) with D = hidden's {D}, got weight shape {tuple(weight.shape)}")
    if not isinstance(targets, torch.Tensor) or targets.is_floating_point() or targets.is_complex():
        got = getattr(targets, "dtype", type(targets).__name__)
        raise TypeError(f"{OP}: targets must be an integer tensor of token ids, got {got}")
    if tuple(targets.shape) != (B, T):
        raise ValueError(f"{OP}: targets must be (B, T) = {(B, T)} like hidden, got shape {tuple(targets.shape)}")
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (B, T):
        raise ValueError(f"{OP}: mask must be (B, T) = {(B, T)} like hidden, got {getattr(mask, 'shape', mask)}")
    if not isinstance(advantages, torch.Tensor) or tuple(advantages.shape) != (B,):
        raise ValueError(f"{OP}: advantages must be (B,) = ({B},), got {getattr(advantages, 'shape', advantages)}")
    V = weight.shape[0]
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (V,)):
        raise ValueError(f"{OP}: bias must be (V,) = ({V},) or None, got {getattr(bias, 'shape', bias)}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"{OP}: temperature must be a positive number, got {temperature!r}")
    valid = targets != IGNORE_INDEX
    if bool(((targets < 0) | (targets >= V))[valid].any()):
        bad = targets[valid & ((targets < 0) | (targets >= V))][0].item()
        raise ValueError(f"{OP}: targets must be in [0, V={V}) or {IGNORE_INDEX} (padding), found {bad}")


def fused_linear_grpo_loss_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    *,
    old_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    beta: float = 0.0,
    kl: str = "k3",
    eps_low: float = 0.2,
    eps_high: float | None = None,
    dual_clip: float | None = None,
    loss_type: str = "dapo",
    importance_sampling: str = "token",
    max_completion_length: int | None = None,
    num_items: float | torch.Tensor | None = None,
    return_entropy: bool = False,
) -> tuple[torch.Tensor, GrpoLossMetrics]:
    """The specification of ``fused_linear_grpo_loss``: float64, autograd, materialised logits. Slow on purpose.

    Args:
        hidden: (B, T, D) last hidden states at the positions that predict ``targets``.
        weight: (V, D) LM head; bias: (V,) or None. logits = (hidden @ weight.T + bias) / temperature.
        targets: (B, T) sampled token ids (IGNORE_INDEX = -100 on padding: logp 0, no gradient).
        mask, advantages, old_logp, ref_logp and the loss options: as ``grpo_loss``.
        return_entropy: also compute the per-token entropy of the policy for the ``mean_entropy`` metric.

    Returns:
        (loss, metrics) as ``grpo_loss_reference``; the loss is float64 and differentiable in hidden, weight and bias.
    """
    _check_linear_inputs(hidden, weight, targets, mask, advantages, bias, temperature)
    logp, entropy = token_logprobs_reference(
        hidden, weight, targets, bias=bias, temperature=temperature, ignore_index=IGNORE_INDEX, return_entropy=True
    )
    return grpo_loss_reference(
        logp,
        old_logp,
        ref_logp,
        advantages,
        mask,
        beta=beta,
        kl=kl,
        eps_low=eps_low,
        eps_high=eps_high,
        dual_clip=dual_clip,
        loss_type=loss_type,
        importance_sampling=importance_sampling,
        max_completion_length=max_completion_length,
        num_items=num_items,
        entropy=entropy.detach() if return_entropy else None,
    )
