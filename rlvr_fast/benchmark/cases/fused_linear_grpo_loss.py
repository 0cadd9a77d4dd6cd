"""Benchmark cases of fused_linear_grpo_loss: hidden states in, the GRPO-family loss and d/d hidden, d/d weight out
(forward + backward), against what a user would otherwise run:

- naive_torch: logits = hidden @ W^T, log_softmax, gather, then the loss written inline (TRL's token-level dapo loss
  with k3 KL, ``naive_grpo_loss`` of the grpo_loss cases); autograd through all of it. Materialises (N, V) logits.
- liger_chunked: Liger-Kernel's LigerFusedLinearGRPOLoss (compiled=False: pure PyTorch chunks over completions,
  use_ref_model=True so that its KL term is kept).
- CUDA only: liger_triton (the logits from one bf16 matmul, then Liger's Triton ``triton_grpo_loss`` on them, which
  reads (B, T + 1, V) logits; in place, its memory-saving default) and trl (GRPOTrainer's path: bf16 logits,
  ``selective_log_softmax``, the inline loss).
Each baseline is imported lazily and left out when its package is missing.

Inputs: every token counts and no advantage is 0, so no implementation can skip work: the comparison is of the same
dense computation (the op skips padding and, at beta = 0, zero-advantage completions, which only widens its lead).
old / ref log-probs are the policy's own, perturbed, so ratios and KL take realistic values.

Floor (docs/design.md, "Floors"): 6NDV FLOP (the logits once, the two gradient GEMMs); bytes: hidden and weight read,
their gradients written, once each.
"""

from __future__ import annotations

import importlib.util
import math

import torch

from rlvr_fast.benchmark.cases.grpo_loss import OBJECTIVE, naive_grpo_loss
from rlvr_fast.benchmark.cases.registry import Case, Floor, register
from rlvr_fast.ops.fused_linear_grpo_loss import fused_linear_grpo_loss
from rlvr_fast.ops.logprobs import token_logprobs

# (B, T, D, V, dtype)
CPU_SHAPES = [(8, 512, 576, 49152, torch.float32)]
CUDA_SHAPES = [(16, 1024, 4096, 151936, torch.bfloat16)]


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _inputs(B, T, D, V, dtype, device):
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(B, T, D, generator=gen, device=device).to(dtype)
    weight = (torch.randn(V, D, generator=gen, device=device) * (2.0 / math.sqrt(D))).to(dtype)
    targets = torch.randint(0, V, (B, T), generator=gen, device=device)
    mask = torch.ones(B, T, dtype=torch.long, device=device)
    advantages = torch.randn(B, generator=gen, device=device)
    with torch.no_grad():
        logp = token_logprobs(hidden, weight, targets)
    old = (logp + 0.1 * torch.randn(B, T, generator=gen, device=device)).clamp(max=0.0)  # log-probs are <= 0
    ref = (logp + 0.1 * torch.randn(B, T, generator=gen, device=device)).clamp(max=0.0)
    return hidden, weight, targets, mask, advantages, old, ref


def _grads(loss_fn, wrt):
    def step():
        loss = loss_fn()
        loss = loss[0] if isinstance(loss, tuple) else loss
        return torch.autograd.grad(loss, wrt)  # returned, so the memory measurement counts the gradients

    return step


def _impls(hidden, weight, targets, mask, adv, old, ref, device):
    h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()

    def ours():
        return fused_linear_grpo_loss(
            h,
            w,
            targets,
            mask,
            adv,
            old_logp=old,
            ref_logp=ref,
            objective=OBJECTIVE,
        )

    def naive():
        logits = (h @ w.t()).float()
        logp = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        return naive_grpo_loss(logp, old, ref, adv, mask)

    impls = {"rlvr_fast": _grads(ours, (h, w)), "naive_torch": _grads(naive, (h, w))}
    if _has("liger_kernel"):
        from liger_kernel.chunked_loss.grpo_loss import LigerFusedLinearGRPOLoss

        liger = LigerFusedLinearGRPOLoss(
            beta=OBJECTIVE.beta,
            compiled=False,
            use_ref_model=True,
            epsilon_low=OBJECTIVE.eps_low,
            epsilon_high=OBJECTIVE.eps_high,
            loss_type=OBJECTIVE.loss_type,
            temperature=OBJECTIVE.temperature,
        )

        def liger_chunked():
            return liger(h, w, targets, mask, adv, ref_per_token_logps=ref, old_per_token_logps=old)

        impls["liger_chunked"] = _grads(liger_chunked, (h, w))
    if device.type == "cuda":
        if _has("liger_kernel"):
            from liger_kernel.transformers.grpo_loss import triton_grpo_loss

            # Liger's kernel reads (B, T + 1, V) logits and drops the last position: the head runs on T + 1 states
            h_ext = torch.cat([hidden, hidden[:, :1]], dim=1).detach().requires_grad_()

            def liger_triton():
                logits = h_ext @ w.t()
                return triton_grpo_loss(
                    logits,
                    old,
                    ref,
                    targets,
                    adv,
                    mask.int(),
                    temperature=OBJECTIVE.temperature,
                    beta=OBJECTIVE.beta,
                    eps_low=OBJECTIVE.eps_low,
                    eps_high=OBJECTIVE.eps_high,
                    inplace=True,
                    loss_type=OBJECTIVE.loss_type,
                    reduce=True,
                )

            impls["liger_triton"] = _grads(liger_triton, (h_ext, w))
        if _has("trl"):
            from trl.trainer.utils import selective_log_softmax

            def trl():
                logp = selective_log_softmax(h @ w.t(), targets)
                return naive_grpo_loss(logp, old, ref, adv, mask)

            impls["trl"] = _grads(trl, (h, w))
    return impls


@register("fused_linear_grpo_loss")
def fused_linear_grpo_loss_cases(device: torch.device) -> list[Case]:
    shapes = CUDA_SHAPES if device.type == "cuda" else CPU_SHAPES
    cases = []
    for B, T, D, V, dtype in shapes:
        inputs = _inputs(B, T, D, V, dtype, device)
        n = B * T
        elt = torch.finfo(dtype).bits // 8
        cases.append(
            Case(
                op="fused_linear_grpo_loss",
                label=f"B={B} T={T} D={D} V={V} {str(dtype).removeprefix('torch.')}",
                impls=_impls(*inputs, device),
                floor=Floor(flops=6.0 * n * D * V, bytes=2.0 * (n * D + V * D) * elt),
                baseline="naive_torch",
                params={
                    "B": B,
                    "T": T,
                    "D": D,
                    "V": V,
                    "dtype": str(dtype),
                    "beta": OBJECTIVE.beta,
                    "loss_type": OBJECTIVE.loss_type,
                    "fwd_bwd": True,
                    "logits_mb": n * V * elt / 2**20,
                },
                memory=True,
            )
        )
    return cases
