"""Benchmark cases of the fused log-prob gather: ``token_logprobs`` (from hidden states) and ``logprobs_from_logits``.

Baselines, as a user would otherwise write or import them (each imported lazily; one whose package is missing is left
out of the case, one that is installed but cannot run here is reported with its error):
- naive_torch: matmul, log_softmax, gather, entropy, in the inputs' dtype (materialises several (N, V) tensors);
- trl_selective: TRL's ``selective_log_softmax`` + ``entropy_from_logits`` on materialised logits (Triton kernels on
  CUDA, row loops on the CPU);
- trl_chunked: TRL's ``ChunkedLogProbFunction`` with the vocabulary chunk GRPOTrainer uses (32768);
- CUDA only: cut-cross-entropy's ``linear_cross_entropy(reduction="none")`` (logp only: it has no entropy) and Liger's
  ``LigerFusedLinearScaledCrossEntropyFunction`` (its fused linear path with entropy);
- logits input, CUDA: TRL's Triton ``selective_log_softmax_and_entropy``.

Floors (docs/design.md, "Floors"): token_logprobs forward 2NDV FLOP, forward + backward 8NDV (the logits recomputed in
the backward); bytes: the weight and hidden read once per pass, gradients written once. logprobs_from_logits: reading
the logits once (forward), twice plus writing dlogits (forward + backward).
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable

import torch

from rlvr_fast.benchmark.cases.registry import Case, Floor, register
from rlvr_fast.ops.logprobs import logprobs_from_logits, token_logprobs

# (N, D, V, dtype, modes)
CPU_TOKEN_SHAPES = [(4096, 576, 49152, torch.float32, ("fwd+bwd",))]
CUDA_TOKEN_SHAPES = [
    (8192, 4096, 151936, torch.bfloat16, ("fwd", "fwd+bwd")),
    (8192, 4096, 131072, torch.bfloat16, ("fwd", "fwd+bwd")),
]
# (N, V, dtype, modes)
CPU_LOGITS_SHAPES = [(1024, 49152, torch.float32, ("fwd+bwd",))]
CUDA_LOGITS_SHAPES = [(8192, 151936, torch.bfloat16, ("fwd", "fwd+bwd"))]
TRL_VOCAB_CHUNK = 32768  # trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE, what GRPOTrainer passes

Outputs = tuple  # (logp, entropy) or (logp,) for baselines without entropy
TokenImpl = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Outputs]
LogitsImpl = Callable[[torch.Tensor, torch.Tensor], Outputs]


def naive_from_logits(logits: torch.Tensor, targets: torch.Tensor) -> Outputs:
    """log_softmax, gather, entropy: the baseline every fused path is measured against."""
    log_probs = torch.log_softmax(logits, dim=-1)
    logp = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return logp, -(log_probs.exp() * log_probs).sum(-1)


def naive_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> Outputs:
    return naive_from_logits(hidden @ weight.t(), targets)


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _trl_selective(hidden, weight, targets) -> Outputs:
    from trl.trainer.utils import entropy_from_logits, selective_log_softmax

    logits = hidden @ weight.t()
    return selective_log_softmax(logits, targets), entropy_from_logits(logits)


def _trl_chunked(hidden, weight, targets) -> Outputs:
    from trl.kernels import ChunkedLogProbFunction

    logp, entropy, *_ = ChunkedLogProbFunction.apply(
        hidden, weight, None, targets, 1.0, TRL_VOCAB_CHUNK, None, 1.0, ("entropy",)
    )
    return logp, entropy


def _cce(hidden, weight, targets) -> Outputs:
    from cut_cross_entropy import linear_cross_entropy

    return (-linear_cross_entropy(hidden, weight, targets, reduction="none"),)


def _liger(hidden, weight, targets) -> Outputs:
    from liger_kernel.ops.fused_linear_scaled_cross_entropy import LigerFusedLinearScaledCrossEntropyFunction

    nll, entropy = LigerFusedLinearScaledCrossEntropyFunction.apply(hidden, weight, targets, 1.0, -100, 1, True)
    return -nll, entropy


def _ours(hidden, weight, targets) -> Outputs:
    return token_logprobs(hidden, weight, targets, return_entropy=True)


def _ours_logp_only(hidden, weight, targets) -> Outputs:
    return (token_logprobs(hidden, weight, targets),)


def _trial_error(impl: TokenImpl, device: torch.device, dtype: torch.dtype) -> str | None:
    """A tiny forward + backward: None when it runs, else its error (the baseline is then reported as failed instead
    of being timed)."""
    try:
        h = torch.randn(16, 64, device=device, dtype=dtype, requires_grad=True)
        w = torch.randn(256, 64, device=device, dtype=dtype, requires_grad=True)
        out = impl(h, w, torch.randint(0, 256, (16,), device=device))
        sum(o.float().sum() for o in out).backward()
        return None
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


def token_impls(device: torch.device, dtype: torch.dtype, failed: dict[str, str] | None = None) -> dict[str, TokenImpl]:
    """Ours first, then every baseline that is installed and runs on ``device``; an installed baseline whose trial call
    fails goes into ``failed`` (name -> error) instead."""
    failed = {} if failed is None else failed
    impls: dict[str, TokenImpl] = {"rlvr_fast": _ours, "naive_torch": naive_token_logprobs}
    if _has("trl"):
        impls["trl_selective"] = _trl_selective
        impls["trl_chunked"] = _trl_chunked
    if device.type == "cuda":
        impls["rlvr_fast_logp"] = _ours_logp_only  # the like-for-like opponent of cut-cross-entropy
        for name, module, fn in (("cce", "cut_cross_entropy", _cce), ("liger", "liger_kernel", _liger)):
            if not _has(module):
                continue
            error = _trial_error(fn, device, dtype)
            if error is None:
                impls[name] = fn
            else:
                failed[name] = error
    return impls


def _weights(n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed upstream gradients for logp and entropy (a loss using both, like GRPO with an entropy bonus)."""
    g = torch.Generator(device=device).manual_seed(1)
    return torch.randn(n, generator=g, device=device), torch.randn(n, generator=g, device=device)


def _forward_only(impl, *inputs):
    def run():
        with torch.no_grad():
            return impl(*inputs)

    return run


def _forward_backward(impl, inputs: tuple, wrt: tuple, g_logp: torch.Tensor, g_ent: torch.Tensor):
    def run():
        outputs = impl(*inputs)
        loss = sum((o.float() * g).sum() for o, g in zip(outputs, (g_logp, g_ent)))
        return torch.autograd.grad(loss, wrt)  # the gradients are returned (and counted by the memory measurement)

    return run


@register("token_logprobs")
def token_logprobs_cases(device: torch.device) -> list[Case]:
    shapes = CUDA_TOKEN_SHAPES if device.type == "cuda" else CPU_TOKEN_SHAPES
    cases = []
    for n, d, v, dtype, modes in shapes:
        gen = torch.Generator(device=device).manual_seed(0)  # drawn where they live: a 1.2 GB weight, no host copy
        hidden = torch.randn(n, d, generator=gen, device=device).to(dtype)
        weight = (torch.randn(v, d, generator=gen, device=device) * (2.0 / math.sqrt(d))).to(dtype)
        targets = torch.randint(0, v, (n,), generator=gen, device=device)
        g_logp, g_ent = _weights(n, device)
        failed: dict[str, str] = {}
        impls = token_impls(device, dtype, failed)
        elt = hidden.element_size()
        for mode in modes:
            if mode == "fwd":
                run = {name: _forward_only(fn, hidden, weight, targets) for name, fn in impls.items()}
                floor = Floor(flops=2.0 * n * d * v, bytes=(v * d + n * d) * elt + 8.0 * n)
            else:
                h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
                run = {
                    name: _forward_backward(fn, (h, w, targets), (h, w), g_logp, g_ent) for name, fn in impls.items()
                }
                floor = Floor(flops=8.0 * n * d * v, bytes=3.0 * (v * d + n * d) * elt)
            cases.append(
                Case(
                    op="token_logprobs",
                    label=f"{n}x{d}x{v} {str(dtype).removeprefix('torch.')} {mode}",
                    impls=run,
                    floor=floor,
                    baseline="naive_torch",
                    params={
                        "N": n,
                        "D": d,
                        "V": v,
                        "dtype": str(dtype),
                        "mode": mode,
                        "entropy": True,
                        "logits_mb": n * v * elt / 2**20,
                    },
                    memory=True,
                    failed=failed,
                )
            )
    return cases


def logits_impls(device: torch.device) -> dict[str, LogitsImpl]:
    impls: dict[str, LogitsImpl] = {
        "rlvr_fast": lambda z, t: logprobs_from_logits(z, t, return_entropy=True),
        "naive_torch": naive_from_logits,
    }
    if _has("trl"):
        if device.type == "cuda":

            def trl_fused(z, t):
                from trl.kernels import selective_log_softmax_and_entropy

                return selective_log_softmax_and_entropy(z, t)

            impls["trl_fused"] = trl_fused
        else:

            def trl_selective(z, t):
                from trl.trainer.utils import entropy_from_logits, selective_log_softmax

                return selective_log_softmax(z, t), entropy_from_logits(z)

            impls["trl_selective"] = trl_selective
    return impls


@register("logprobs_from_logits")
def logprobs_from_logits_cases(device: torch.device) -> list[Case]:
    shapes = CUDA_LOGITS_SHAPES if device.type == "cuda" else CPU_LOGITS_SHAPES
    cases = []
    for n, v, dtype, modes in shapes:
        gen = torch.Generator(device=device).manual_seed(0)
        logits = (torch.randn(n, v, generator=gen, device=device) * 2.0).to(dtype)
        targets = torch.randint(0, v, (n,), generator=gen, device=device)
        g_logp, g_ent = _weights(n, device)
        impls = logits_impls(device)
        size = n * v * logits.element_size()
        for mode in modes:
            if mode == "fwd":
                run = {name: _forward_only(fn, logits, targets) for name, fn in impls.items()}
                floor = Floor(flops=4.0 * n * v, bytes=float(size))
            else:
                z = logits.detach().requires_grad_()
                run = {name: _forward_backward(fn, (z, targets), (z,), g_logp, g_ent) for name, fn in impls.items()}
                floor = Floor(flops=10.0 * n * v, bytes=3.0 * size)
            cases.append(
                Case(
                    op="logprobs_from_logits",
                    label=f"{n}x{v} {str(dtype).removeprefix('torch.')} {mode}",
                    impls=run,
                    floor=floor,
                    baseline="naive_torch",
                    params={
                        "N": n,
                        "V": v,
                        "dtype": str(dtype),
                        "mode": mode,
                        "entropy": True,
                        "logits_mb": size / 2**20,
                    },
                    memory=True,
                )
            )
    return cases
