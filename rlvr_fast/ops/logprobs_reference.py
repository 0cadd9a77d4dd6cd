"""The specification of the per-token log-prob gather: plain PyTorch, readable, computed in float64 (or float32).

docs/design.md §3. With logits z = (hidden @ weight^T + bias) / temperature, for every token n whose target t_n
is not ``ignore_index``:

    logp_n    = z[n, t_n] - logsumexp(z[n])
    entropy_n = logsumexp(z[n]) - sum_v softmax(z[n])_v * z[n, v]

Tokens whose target is ``ignore_index`` get logp 0 and entropy 0 and take no part in the computation at all (their
hidden rows are never multiplied, so a NaN there reaches no gradient). Gradients come from autograd through these
formulas; the fused paths implement the closed form of docs/design.md §3 and are tested against this module.

This materialises the (N, V) logits on purpose: it is the specification, not a path anyone should run at scale.
Input checks live with the public functions (rlvr_fast.ops.logprobs); these functions assume valid inputs.
"""

from __future__ import annotations

import torch


def _scatter_rows(values: torch.Tensor, rows: torch.Tensor, n: int) -> torch.Tensor:
    """(n_valid,) values placed at ``rows`` of a zero (n,) vector (differentiable in ``values``)."""
    return values.new_zeros(n).index_copy(0, rows, values)


def token_logprobs_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    compute_dtype: torch.dtype = torch.float64,
):
    """logp (and entropy) of ``targets`` under softmax((hidden @ weight^T + bias) / temperature), in ``compute_dtype``.

    hidden (N, D) or (B, T, D); weight (V, D); bias (V,) or None; targets (N,) or (B, T), int. Returns tensors of the
    targets' shape in ``compute_dtype``, differentiable w.r.t. hidden, weight and bias.
    """
    shape = targets.shape
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1)
    rows = (t != ignore_index).nonzero().squeeze(1)
    z = h.index_select(0, rows).to(compute_dtype) @ weight.to(compute_dtype).t()
    if bias is not None:
        z = z + bias.to(compute_dtype)
    z = z / temperature
    log_probs = torch.log_softmax(z, dim=-1)
    logp = log_probs.gather(-1, t.index_select(0, rows).unsqueeze(-1)).squeeze(-1)
    logp = _scatter_rows(logp, rows, t.numel()).reshape(shape)
    if not return_entropy:
        return logp
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return logp, _scatter_rows(entropy, rows, t.numel()).reshape(shape)


def logprobs_from_logits_reference(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    compute_dtype: torch.dtype = torch.float64,
):
    """The same quantities from materialised logits (N, V) or (B, T, V); targets (N,) or (B, T)."""
    shape = targets.shape
    z = logits.reshape(-1, logits.shape[-1])
    t = targets.reshape(-1)
    rows = (t != ignore_index).nonzero().squeeze(1)
    z = z.index_select(0, rows).to(compute_dtype) / temperature
    log_probs = torch.log_softmax(z, dim=-1)
    logp = log_probs.gather(-1, t.index_select(0, rows).unsqueeze(-1)).squeeze(-1)
    logp = _scatter_rows(logp, rows, t.numel()).reshape(shape)
    if not return_entropy:
        return logp
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return logp, _scatter_rows(entropy, rows, t.numel()).reshape(shape)
