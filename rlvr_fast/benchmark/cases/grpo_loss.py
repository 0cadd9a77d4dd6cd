"""Benchmark cases of grpo_loss, forward + backward.

1. ``grpo_loss`` (per-token log-probs in): ours vs the loss as TRL's GRPOTrainer writes it inline in plain PyTorch
   (autograd through ratio / clamp / min / KL / masked mean). Floor: read logp, old, ref (4 B each), the mask (1 B)
   and write d loss / d logp (4 B): 17 bytes per token.
2. ``grpo_loss_logits`` (CUDA only; materialised logits in, as Liger's Triton ``triton_grpo_loss`` takes them): ours =
   ``logprobs_from_logits`` + ``grpo_loss`` vs Liger's ``triton_grpo_loss`` (where liger-kernel is installed) vs plain
   PyTorch (log_softmax + gather + the inline loss). Floor: read the bf16 logits once and write their gradient once.
"""

from __future__ import annotations

import torch

from rlvr_fast.benchmark.cases.registry import Case, Floor, register
from rlvr_fast.ops.grpo_loss import grpo_loss
from rlvr_fast.ops.objective import PolicyObjective

# The objective every GRPO-loss case times (ours and the baselines): TRL's token-level dapo loss with k3 KL and DAPO's
# clip-higher.
OBJECTIVE = PolicyObjective(loss_type="dapo", beta=0.04, kl="k3", eps_low=0.2, eps_high=0.28)


def naive_grpo_loss(logp, old_logp, ref_logp, advantages, mask, objective: PolicyObjective = OBJECTIVE):
    """The baseline: TRL's token-level dapo loss with k3 KL written inline, as GRPOTrainer._compute_loss does
    (``objective`` gives beta and the clip range; its loss type and KL estimator are TRL's dapo and k3)."""
    ratio = torch.exp(logp - old_logp)
    a = advantages.unsqueeze(1)
    clipped = torch.clamp(ratio, 1 - objective.eps_low, 1 + objective.eps_high) * a
    per_token = -torch.min(ratio * a, clipped)
    d = ref_logp - logp
    per_token = per_token + objective.beta * (torch.exp(d) - d - 1)
    m = mask.to(per_token.dtype)
    return (per_token * m).sum() / m.sum().clamp(min=1.0)


def _inputs(B: int, T: int, device: torch.device, gen: torch.Generator):
    logp = (-torch.rand(B, T, generator=gen) * 4).to(device)
    old = (logp + 0.2 * torch.randn(B, T, generator=gen).to(device)).clamp(max=0.0)  # log-probs are <= 0
    ref = (logp + 0.2 * torch.randn(B, T, generator=gen).to(device)).clamp(max=0.0)
    adv = torch.randn(B, generator=gen).to(device)
    lengths = torch.randint(T // 4, T + 1, (B,), generator=gen).to(device)
    mask = torch.arange(T, device=device)[None, :] < lengths[:, None]
    return logp.requires_grad_(True), old, ref, adv, mask


def _fwd_bwd(loss_fn, leaf):
    def step():
        loss = loss_fn()
        loss = loss[0] if isinstance(loss, tuple) else loss
        return torch.autograd.grad(loss, leaf)

    return step


def _logp_impls(logp, old, ref, adv, mask):
    def ours():
        return grpo_loss(logp, old, ref, adv, mask, objective=OBJECTIVE)

    def naive():
        return naive_grpo_loss(logp, old, ref, adv, mask)

    return {"rlvr_fast": _fwd_bwd(ours, logp), "naive_torch": _fwd_bwd(naive, logp)}


GRPO_LOSS_SHAPES = [(16, 1024), (64, 4096), (8, 32768)]  # (completions, completion length)


@register("grpo_loss")
def grpo_loss_cases(device: torch.device) -> list[Case]:
    gen = torch.Generator().manual_seed(0)
    cases = []
    for B, T in GRPO_LOSS_SHAPES:
        logp, old, ref, adv, mask = _inputs(B, T, device, gen)
        n = B * T
        cases.append(
            Case(
                op="grpo_loss",
                label=f"B={B} T={T}",
                impls=_logp_impls(logp, old, ref, adv, mask),
                floor=Floor(flops=40.0 * n, bytes=17.0 * n),
                baseline="naive_torch",
                params={"B": B, "T": T, "beta": OBJECTIVE.beta, "loss_type": OBJECTIVE.loss_type, "fwd_bwd": True},
            )
        )
    return cases


LOGITS_SHAPES = [(8, 1024, 32768)]  # (completions, completion length, vocabulary)


@register("grpo_loss_logits")
def grpo_loss_logits_cases(device: torch.device) -> list[Case]:
    if device.type != "cuda":
        return []  # Liger's triton_grpo_loss is CUDA-only; the logits-sized case is a GPU measurement
    from rlvr_fast.ops.logprobs import logprobs_from_logits

    gen = torch.Generator().manual_seed(0)
    cases = []
    for B, T, V in LOGITS_SHAPES:
        _, old, ref, adv, mask = _inputs(B, T, device, gen)
        ids = torch.randint(0, V, (B, T), generator=gen).to(device)
        logits = torch.randn(B, T, V, generator=gen).to(device, torch.bfloat16).requires_grad_(True)

        def ours(logits=logits, ids=ids, old=old, ref=ref, adv=adv, mask=mask):
            logp = logprobs_from_logits(logits, ids)
            return grpo_loss(logp, old, ref, adv, mask, objective=OBJECTIVE)

        def naive(logits=logits, ids=ids, old=old, ref=ref, adv=adv, mask=mask):
            logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
            return naive_grpo_loss(logp, old, ref, adv, mask)

        impls = {"rlvr_fast": _fwd_bwd(ours, logits), "naive_torch": _fwd_bwd(naive, logits)}
        try:
            from liger_kernel.transformers.grpo_loss import triton_grpo_loss
        except ImportError:
            triton_grpo_loss = None
        if triton_grpo_loss is not None:
            # Liger reads (B, T + 1, V) and drops the last position; inplace=False keeps the inputs intact between
            # timed calls (its default inplace=True overwrites the logits with their gradient).
            liger_logits = torch.cat([logits.detach(), logits.detach()[:, :1]], dim=1).requires_grad_(True)

            def liger(z=liger_logits, ids=ids, old=old, ref=ref, adv=adv, mask=mask, fn=triton_grpo_loss):
                return fn(
                    z,
                    old,
                    ref,
                    ids,
                    adv,
                    mask.int(),
                    temperature=OBJECTIVE.temperature,
                    beta=OBJECTIVE.beta,
                    eps_low=OBJECTIVE.eps_low,
                    eps_high=OBJECTIVE.eps_high,
                    inplace=False,
                    loss_type=OBJECTIVE.loss_type,
                    reduce=True,
                )

            impls["liger_triton"] = _fwd_bwd(liger, liger_logits)
        n = B * T
        cases.append(
            Case(
                op="grpo_loss_logits",
                label=f"B={B} T={T} V={V}",
                impls=impls,
                floor=Floor(flops=6.0 * n * V, bytes=2.0 * 2.0 * n * V),
                baseline="naive_torch",
                params={"B": B, "T": T, "V": V, "dtype": "bfloat16", "beta": OBJECTIVE.beta, "fwd_bwd": True},
                memory=True,
            )
        )
    return cases
