"""GRPO-family loss from hidden states in one pass over the vocabulary: LM head, log-softmax, gather, the clipped
surrogate / KL / aggregation of ``grpo_loss``, and the gradients w.r.t. hidden, weight and bias, without (N, V) logits.

Formulas: docs/design.md §§2 (the loss) and 3 (log-probs). Four pieces, as in every op:

1. ``fused_linear_grpo_loss_reference``: the specification, composing ``token_logprobs_reference`` (float64,
   materialised logits) and ``grpo_loss_reference``; gradients by autograd.
2. the Triton kernels (rlvr_fast.kernels.fused_linear_grpo): per chunk of tokens, row statistics of the logits, the
   per-token loss terms (the ``grpo_token_terms`` helper ``grpo_loss`` uses) and the logits' gradient.
3. the torch path below: the same chunked algorithm in PyTorch (the CPU path), fp32 throughout, the chunk's logits
   held transposed (see ``_TorchChunks``).
4. the public ``fused_linear_grpo_loss``.

Why one pass. The loss is a scalar, so the gradient it sends into a token's log-prob, g_t = d loss / d logp_t, is known
as soon as logp_t is (Liger's fused-linear losses use the same observation). For each chunk of n tokens the op forms
the chunk's logits z = (h_c W^T + b) / T over the whole vocabulary (one (n, V) fp32 buffer, n chosen from a memory
budget, never (N, V)), their logsumexp, logp and entropy, g, then dz = g (onehot - softmax(z)) / T in place and the two
gradient GEMMs dh_c = dz W and dW += dz^T h_c. The gradients are complete when the forward returns; backward only
scales them by grad_output. Cost: 2NDV FLOP for the logits + 4NDV for the gradient GEMMs = 6NDV, against 8NDV for
``token_logprobs`` + ``grpo_loss`` (whose backward must recompute the logits) and 8NDV for Liger's chunked GRPO loss.
The vocabulary is not split inside a chunk on purpose: dz needs the row's final logsumexp, so a split vocabulary
would mean a second logits pass (8NDV).

What needs whole completions. g_t depends on the token alone except for
- loss_type grpo: the row coefficient 1 / max(W_b, 1) (W_b = the completion's mask sum) comes from the mask, known
  before any logit: no extra cost;
- importance_sampling "sequence" (GSPO): every token of a completion uses the ratio exp(mean_t m (logp - old)), which
  needs all of the completion's log-probs. Chunks are then packed with whole completions, so the ratio is formed
  between the chunk's row statistics and its gradient: still 6NDV. A completion with more tokens than a chunk holds
  (``FusedLinearGrpoConfig.chunk_tokens``) gets a log-prob pre-pass first (``token_logprobs``' forward): 8NDV for the
  tokens of those completions only. With ``kl_ratio_weighted`` the completion's mean KL (whose whole sum moves with
  s_b) is formed at the same two places as its ratio, at no extra logits cost.

Work skipped. Only tokens that count (mask != 0) reach a GEMM: padding costs nothing. With beta == 0, a completion
whose advantage is exactly 0 has an identically zero gradient (its clipped surrogate is 0 for any ratio): its tokens
are dropped before the LM head too and counted in ``metrics.tokens_skipped``. Normalisers still count them (they come
from the mask), so the loss and the gradients are those of the full computation. What cannot be computed for them is
their log-prob: ``mean_ratio``, ``mean_kl`` and ``mean_entropy`` then average over the tokens evaluated
(``tokens - tokens_skipped``); the clip fractions, which are exactly 0 for A = 0, stay fractions of all tokens.
``FusedLinearGrpoConfig(skip_zero_advantage=False)`` evaluates them anyway.

Memory (besides the inputs and the returned gradients): the chunk's fp32 logits; the Triton path's dz buffer in the
GEMM dtype (the torch path forms dz over its logits, or over its exp scratch when entropy is asked); the gathered
hidden rows of a chunk; and for half-precision weights an fp32 (V, D) accumulator of dweight (fp32 accumulation
across chunks; Liger's per-completion backward holds one too). The dweight GEMM of a chunk reads and writes that
accumulator (8VD bytes), so the Triton path collects the dz of several logits chunks (``grad_tokens`` rows, in bf16
half the bytes of the fp32 logits) before each dweight GEMM: fewer passes over the accumulator without a larger
logits buffer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from rlvr_fast.backends import select_backend
from rlvr_fast.ops.checks import accumulation_dtype, autocast_dtype
from rlvr_fast.ops.constants import (
    IGNORE_INDEX,
    N_STATS,
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
from rlvr_fast.ops.grpo_loss import (
    CheckedLoss,
    GrpoLossMetrics,
    check_loss_inputs,
    grpo_loss_reference,
    policy_term_torch,
    ratio_weighted_kl_torch,
)
from rlvr_fast.ops.logprobs import TOKEN_PATHS, LogprobsConfig
from rlvr_fast.ops.logprobs_reference import token_logprobs_reference
from rlvr_fast.ops.objective import DEFAULT, PolicyObjective, flat_arguments, objective_from_arguments
from rlvr_fast.ops.rollout_correction import RolloutCorrectionMetrics, correction_code, truncated_weight

OP = "fused_linear_grpo_loss"


def _check_linear_inputs(hidden, weight, targets, mask, advantages, bias) -> None:
    """Shape / dtype checks of the LM-head inputs (the objective checks itself, the per-token tensors are checked by
    ``grpo_loss``'s ``check_loss_inputs``)."""
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
    valid = targets != IGNORE_INDEX
    out_of_range = valid & ((targets < 0) | (targets >= V))
    # a padding target where the mask counts the token: its logp is 0 by convention, so it would enter the loss (and
    # its normaliser) as a token the policy predicted with certainty. Both counts in one reduction, one host sync.
    ignored = ~valid & (mask != 0)
    n_out, n_ignored = torch.stack([out_of_range.sum(), ignored.sum()]).tolist()
    if n_out:
        bad = targets[out_of_range][0].item()
        raise ValueError(f"{OP}: targets must be in [0, V={V}) or {IGNORE_INDEX} (padding), found {bad}")
    if n_ignored:
        where = ", ".join(f"({b}, {t})" for b, t in ignored.nonzero()[:5].tolist())
        raise ValueError(
            f"{OP}: targets hold the ignore index {IGNORE_INDEX} (padding) at {n_ignored} (row, position) where mask "
            f"!= 0: {where}; a padding position must have mask 0"
        )


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
    return_entropy: bool = False,
    objective: PolicyObjective | None = None,
    rollout_logp: torch.Tensor | None = None,
) -> tuple[torch.Tensor, GrpoLossMetrics]:
    """The specification of ``fused_linear_grpo_loss``: float64, autograd, materialised logits. Slow on purpose.

    Args:
        hidden: (B, T, D) last hidden states at the positions that predict ``targets``.
        weight: (V, D) LM head; bias: (V,) or None. logits = (hidden @ weight.T + bias) / objective.temperature.
        targets: (B, T) sampled token ids (IGNORE_INDEX = -100 on padding: logp 0, no gradient).
        mask, advantages, old_logp, ref_logp, rollout_logp: as ``grpo_loss``.
        return_entropy: also compute the per-token entropy of the policy for the ``mean_entropy`` metric.
        objective: the temperature and the loss settings as one ``PolicyObjective`` (None: its defaults). Unlike
            ``fused_linear_grpo_loss`` it takes no flat objective keywords (``temperature=``, ``beta=``, ...): the
            specification has one way to be called, so passing one is a TypeError.

    Returns:
        (loss, metrics) as ``grpo_loss_reference``; the loss is float64 and differentiable in hidden, weight and bias.
    """
    objective = objective_from_arguments(OP, objective)
    _check_linear_inputs(hidden, weight, targets, mask, advantages, bias)
    logp, entropy = token_logprobs_reference(
        hidden,
        weight,
        targets,
        bias=bias,
        temperature=objective.temperature,
        ignore_index=IGNORE_INDEX,
        return_entropy=True,
    )
    return grpo_loss_reference(
        logp,
        old_logp,
        ref_logp,
        advantages,
        mask,
        entropy=entropy.detach() if return_entropy else None,
        objective=objective,
        rollout_logp=rollout_logp,
    )


# --------------------------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------------------------

# One chunk's fp32 logits: 128 MiB on the CPU (MKL runs the chunk's three GEMMs at its full rate from a few hundred rows
# up, and the elementwise passes over the chunk stay a small fraction of them), 256 MiB on a GPU (at V = 151936 that is
# 441 rows, a GEMM of 441 x 4096 x 151936: large enough for cuBLAS's best tiles).
_LOGITS_BYTES = {"cpu": 128 << 20, "cuda": 256 << 20}
# The Triton path's dz buffer on a GPU, in bytes: its rows are the K of each dweight GEMM, which reads and writes the
# fp32 (V, D) accumulator once (8VD bytes, 5 GB at V = 151936, D = 4096); 1 GiB of bf16 dz (3456 rows there) keeps
# that traffic to a few passes per call.
_DZ_BYTES = 1 << 30
_ROW_GRANULE = 64  # budget-derived row counts are multiples of it (full GEMM tiles)


@dataclass(frozen=True)
class FusedLinearGrpoConfig:
    """How ``fused_linear_grpo_loss`` walks the tokens. The defaults come from memory budgets; tests shrink them.

    chunk_tokens: tokens whose (chunk_tokens, V) fp32 logits are formed at once (None: a 128 MiB buffer on the CPU,
        256 MiB on a GPU). Under GSPO a completion with more tokens than this costs a log-prob pre-pass (module doc).
    grad_tokens: Triton path: rows of the dz buffer, the K of each dweight GEMM, rounded down to a multiple of the chunk
        size (None: a 1 GiB buffer on a GPU, one chunk elsewhere). The torch path forms dz in its exp scratch, one
        chunk at a time.
    skip_zero_advantage: with beta == 0, drop the tokens of completions whose advantage is exactly 0 before the LM head
        (they have no gradient); see the module docstring for the metrics that then average over evaluated tokens.
    block_v: columns per step of the Triton row kernels (None: 1024 compiled, 4096 interpreted).
    block_rows: rows per program of the Triton row kernels (None: 1 compiled, 16 interpreted), a power of two.
    empty(shape, dtype=, device=): allocates every buffer the op writes in full before reading it (scratch, gradient
        accumulators); tests pass one that fills with NaN to prove it.
    """

    chunk_tokens: int | None = None
    grad_tokens: int | None = None
    skip_zero_advantage: bool = True
    block_v: int | None = None
    block_rows: int | None = None
    empty: Callable[..., torch.Tensor] = torch.empty

    def __post_init__(self):
        for name in ("chunk_tokens", "grad_tokens", "block_v", "block_rows"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"FusedLinearGrpoConfig: {name} must be a positive int or None, got {value!r}")
        for name in ("block_v", "block_rows"):
            value = getattr(self, name)
            if value is not None and value & (value - 1):
                raise ValueError(f"FusedLinearGrpoConfig: {name} must be a power of two, got {value}")
        if not isinstance(self.skip_zero_advantage, bool):
            raise TypeError(
                f"FusedLinearGrpoConfig: skip_zero_advantage must be a bool, got {self.skip_zero_advantage!r}"
            )


DEFAULT_CONFIG = FusedLinearGrpoConfig()


def _budget_rows(elements: int, v: int) -> int:
    rows = max(1, elements // v)
    return rows if rows < 2 * _ROW_GRANULE else rows // _ROW_GRANULE * _ROW_GRANULE


def _chunk_sizes(
    config: FusedLinearGrpoConfig, n_tokens: int, v: int, device: torch.device, path: str, dz_bytes: int
) -> tuple[int, int]:
    """(rows of one logits chunk, rows of the dz buffer = a multiple of it) for ``n_tokens`` tokens."""
    kind = "cuda" if device.type == "cuda" else "cpu"
    rows = config.chunk_tokens or _budget_rows(_LOGITS_BYTES[kind] // 4, v)
    rows = max(1, min(rows, n_tokens))
    if path == "torch":
        return rows, rows
    grad = config.grad_tokens or (_budget_rows(_DZ_BYTES // dz_bytes, v) if kind == "cuda" else rows)
    grad = min(max(grad // rows, 1), -(-n_tokens // rows)) * rows
    return rows, grad


# --------------------------------------------------------------------------------------------------------------------
# Input checks: the head tensors (``_check_linear_inputs``, shared with the reference) and the per-token tensors
# (``grpo_loss``'s own ``check_loss_inputs``), so both reject the same inputs with the same messages
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _FusedInputs:
    """Everything of one call but the differentiable tensors, checked."""

    targets: torch.Tensor  # (B, T) int
    chk: CheckedLoss  # the objective and the per-token tensors (its ``logp`` is a shape-only placeholder)
    inv_t: float  # 1 / the objective's temperature
    return_entropy: bool
    config: FusedLinearGrpoConfig


def _check_fused_inputs(
    hidden,
    weight,
    targets,
    mask,
    advantages,
    old_logp,
    ref_logp,
    bias,
    objective,
    return_entropy,
    config,
    rollout_logp=None,
):
    _check_linear_inputs(hidden, weight, targets, mask, advantages, bias)
    B, T, _D = hidden.shape
    if weight.shape[0] == 0:
        raise ValueError(f"{OP}: weight must have V >= 1 rows, got shape {tuple(weight.shape)}")
    for name, x in (("old_logp", old_logp), ("ref_logp", ref_logp), ("rollout_logp", rollout_logp)):
        if x is not None and (not isinstance(x, torch.Tensor) or tuple(x.shape) != (B, T)):
            raise ValueError(f"{OP}: {name} must be (B, T) = {(B, T)} like hidden, got {getattr(x, 'shape', x)}")
    named = {
        "weight": weight,
        "bias": bias,
        "targets": targets,
        "mask": mask,
        "advantages": advantages,
        "old_logp": old_logp,
        "ref_logp": ref_logp,
        "rollout_logp": rollout_logp,
    }
    for name, x in named.items():
        if x is not None and x.device != hidden.device:
            raise ValueError(f"{OP}: {name} is on {x.device} but hidden is on {hidden.device}")
    if bias is not None and not bias.is_floating_point():
        raise TypeError(f"{OP}: bias must be a floating tensor, got dtype {bias.dtype}")
    autocast = autocast_dtype(hidden.device)
    if autocast is not None:  # the LM head's matmul runs in the autocast dtype, as nn.Linear's would
        hidden, weight = hidden.to(autocast), weight.to(autocast)
    if weight.dtype != hidden.dtype:
        raise TypeError(
            f"{OP}: hidden and weight must share a dtype, got hidden {hidden.dtype} and weight {weight.dtype}"
        )
    if not isinstance(return_entropy, bool):
        raise TypeError(f"{OP}: return_entropy must be a bool, got {type(return_entropy).__name__}")
    if not isinstance(config, FusedLinearGrpoConfig):
        raise TypeError(f"{OP}: config must be a FusedLinearGrpoConfig, got {type(config).__name__}")
    # grpo_loss's checks of the per-token tensors and options, against a placeholder of logp's shape (no memory)
    shape_only = torch.zeros((), dtype=accumulation_dtype(hidden.dtype), device=hidden.device).expand(B, T)
    chk = check_loss_inputs(OP, shape_only, old_logp, ref_logp, advantages, mask, objective, rollout_logp=rollout_logp)
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    problem = _FusedInputs(
        targets=targets,
        chk=chk,
        inv_t=1.0 / objective.temperature,
        return_entropy=return_entropy,
        config=config,
    )
    return hidden, weight, None if bias is None else bias.contiguous(), problem


# --------------------------------------------------------------------------------------------------------------------
# Planning: which tokens reach the LM head, and in which chunks
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class _Plan:
    """The tokens that count (mask != 0) and are not skipped, flattened in row-major order ("loss tokens")."""

    index: torch.Tensor  # (n,) int64 flat positions b * T + t
    rows: torch.Tensor  # (n,) int64 completion of each
    targets: torch.Tensor  # (n,) int64, -1 where the target is IGNORE_INDEX (logp 0, no gradient)
    w: torch.Tensor  # (n,) mask weights, accumulator dtype
    old: torch.Tensor | None  # (n,) accumulator dtype
    ref: torch.Tensor | None
    row_weight: torch.Tensor  # (B,) W_b = sum_t m_bt over every active token (skipped ones included)
    tokens: torch.Tensor  # 0-d, sum of the mask weights
    skipped: torch.Tensor  # 0-d, mask weight of the skipped tokens
    counts: list[int]  # loss tokens per completion
    any_untargeted: bool  # some loss token has target IGNORE_INDEX
    roll: torch.Tensor | None = None  # (n,) the rollout engine's log-probs (with a rollout correction)

    @property
    def n(self) -> int:
        return self.index.numel()


def _make_plan(prob: _FusedInputs, T: int, acc: torch.dtype) -> _Plan:
    chk = prob.chk
    w_full = chk.mask.to(acc)
    active = w_full != 0
    row_weight = w_full.sum(dim=1)
    zero = torch.zeros((), dtype=acc, device=w_full.device)
    if chk.objective.beta == 0.0 and prob.config.skip_zero_advantage:
        # A == 0 exactly (a NaN advantage is not skipped: it must reach the loss, as in the reference)
        dead = (chk.advantages == 0).unsqueeze(1) & active
        skipped = torch.where(dead, w_full, zero).sum()
        live = active & ~dead
    else:
        skipped, live = zero, active
    index = live.reshape(-1).nonzero().squeeze(1)
    targets = prob.targets.reshape(-1).index_select(0, index).to(torch.int64)
    untargeted = targets == IGNORE_INDEX
    *counts, any_untargeted = torch.cat([live.sum(dim=1), untargeted.any().reshape(1)]).tolist()

    def gather(x):
        return None if x is None else x.reshape(-1).index_select(0, index).to(acc)

    return _Plan(
        index=index,
        rows=torch.div(index, max(T, 1), rounding_mode="floor"),
        targets=torch.where(untargeted, -1, targets),
        w=gather(w_full),
        old=gather(chk.old_logp),
        ref=gather(chk.ref_logp),
        roll=gather(chk.rollout_logp),
        row_weight=row_weight,
        tokens=row_weight.sum(),
        skipped=skipped,
        counts=[int(c) for c in counts],
        any_untargeted=bool(any_untargeted),
    )


Chunk = tuple[int, int, "tuple[int, int] | None"]  # loss-token range [l0, l1), completions to finalise (GSPO)


def _chunks(plan: _Plan, rows: int, sequence: bool) -> tuple[list[Chunk], list[tuple[int, int, int]]]:
    """Chunks of at most ``rows`` loss tokens, and the GSPO pre-pass (completion, l0, l1) ranges.

    Token level: consecutive runs of ``rows`` tokens. GSPO: whole completions packed greedily (their ratio is formed
    inside the chunk, which then lists them as [r0, r1) to finalise); a completion longer than ``rows`` is split and
    its ratio comes from the pre-pass.
    """
    if not sequence:
        return [(i, min(i + rows, plan.n), None) for i in range(0, plan.n, rows)], []
    chunks: list[Chunk] = []
    prepass = []
    start, first_row, last_row = 0, None, None
    pos = 0

    def close():
        if first_row is not None:
            chunks.append((start, pos, (first_row, last_row + 1)))

    for b, count in enumerate(plan.counts):
        if count == 0:
            continue
        if count > rows:
            close()
            first_row = None
            chunks.extend((pos + i, pos + min(i + rows, count), None) for i in range(0, count, rows))
            prepass.append((b, pos, pos + count))
            pos += count
            start = pos
            continue
        if first_row is not None and pos + count - start > rows:
            close()
            first_row = None
        if first_row is None:
            start, first_row = pos, b
        last_row = b
        pos += count
    close()
    return chunks, prepass


# --------------------------------------------------------------------------------------------------------------------
# The two paths: what happens to one chunk between gathering its hidden rows and the gradient GEMMs
# --------------------------------------------------------------------------------------------------------------------


def _terms_torch(
    logp,
    old,
    ref,
    w,
    rows,
    adv,
    row_coef,
    seq_log_ratio,
    pg_scale,
    entropy,
    chk: CheckedLoss,
    kl_row_mean=None,
    roll=None,
    roll_row=None,
):
    """Per-token loss terms of n loss tokens (all with w != 0): (g = w c_b d l / d logp, (N_STATS,) sums). The torch
    twin of rlvr_fast.kernels.fused_linear_grpo._token_terms_kernel, on ``grpo_loss``'s policy term and KL registry.
    ``kl_row_mean``: (B,) GSPO's sum_t m KL_t / max(W_b, 1) per completion, read with a ratio-weighted KL.
    ``roll`` (n,) / ``roll_row`` (B,): the rollout correction's inputs, read in its token / sequence mode."""
    a = adv.index_select(0, rows)
    if seq_log_ratio is not None:  # GSPO: the completion's ratio, d log s_b / d logp_t = m_t / max(W_b, 1)
        log_ratio, scale = seq_log_ratio.index_select(0, rows), pg_scale.index_select(0, rows)
    else:
        log_ratio, scale = logp - (logp if old is None else old), 1.0  # on-policy: 0 (NaN stays NaN)
    obj = chk.objective
    pg, dpg, ratio, low, high, dual = policy_term_torch(log_ratio, a, obj.eps_low, obj.eps_high, obj.dual_clip)
    if obj.correction is not None:  # TIS: the policy term and its gradient times a constant truncated weight
        is_log = roll_row.index_select(0, rows) if obj.correction.sequence else (logp if old is None else old) - roll
        is_w = truncated_weight(is_log, obj.rollout_correction_cap)
        pg, dpg = pg * is_w, dpg * is_w
    loss, dl = pg, dpg * scale
    kl_tok = None
    if ref is not None:
        kl_tok, dkl = obj.kl_estimator.value_and_grad(ref - logp)
        if obj.kl_ratio_weighted:
            kl_bar = kl_tok if seq_log_ratio is None else kl_row_mean.index_select(0, rows)
            kl_tok, dkl = ratio_weighted_kl_torch(kl_tok, dkl, ratio, kl_bar)
        if obj.beta != 0.0:  # beta = 0: the KL is a metric only (an infinite KL must not turn the loss into NaN)
            loss, dl = loss + obj.beta * kl_tok, dl + obj.beta * dkl
    coef = w if row_coef is None else w * row_coef.index_select(0, rows)
    zero = logp.new_zeros(())

    def flag_sum(flag):
        return torch.where(flag, w, zero).sum()

    stats = torch.stack(
        [
            (coef * loss).sum(),
            (w * kl_tok).sum() if kl_tok is not None else zero,
            (w * ratio).sum(),
            (w * entropy).sum() if entropy is not None else zero,
            flag_sum(low),
            flag_sum(high),
            flag_sum(dual),
            w.sum(),
            zero,
        ]
    )
    return coef * dl, stats


class _TorchChunks:
    """The torch path: operands in fp32 (fp64 for fp64 inputs; a half-precision weight is upcast once per call).

    A chunk's logits are held transposed, z^T = W h_c^T (V, n), from one addmm with the bias and 1/T folded in: MKL
    forms this product, whose long side runs down its rows, 15-20% faster than h_c W^T on the CPUs measured, and the
    softmax statistics become reductions over dim 0, which vectorise across the chunk's tokens. exp(z - max) goes to
    the dz slot (with entropy) or over the logits themselves (without: one (V, n) buffer in all), and dz is formed in
    place there. One chunk per dweight GEMM: its dz^T is then a plain (V, n) matrix.
    """

    one_chunk_per_flush = True

    def __init__(self, weight, bias, inv_t, acc, with_entropy, config):
        self.w = weight.to(acc)
        self.b = None if bias is None else bias.to(acc).unsqueeze(1)
        self.inv_t, self.with_entropy = inv_t, with_entropy
        self.operand_dtype = self.dz_dtype = acc

    @staticmethod
    def dz_view(buf, off, n, v):
        """The (n, V) view of a (V, n) block (dz^T is what is stored)."""
        return buf[off * v : (off + n) * v].view(v, n).t()

    def logits_stats(self, h, targets, zbuf, slot):
        n, v = h.shape[0], self.w.shape[0]
        zt = zbuf[: n * v].view(v, n)
        if self.b is not None:
            torch.addmm(self.b, self.w, h.t(), beta=self.inv_t, alpha=self.inv_t, out=zt)
        elif self.inv_t == 1.0:
            torch.mm(self.w, h.t(), out=zt)
        else:  # beta = 0: zt's old contents are never read
            torch.addmm(zt, self.w, h.t(), beta=0.0, alpha=self.inv_t, out=zt)
        has_target = targets >= 0
        m = zt.amax(dim=0)
        # (target - max) first: both are logits as computed, so logp keeps its own precision at |z| ~ 1e4
        target_logit = zt.gather(0, targets.clamp(min=0).unsqueeze(0)).squeeze(0)
        zt.sub_(m)
        et = slot.t()  # (V, n); zt itself without entropy
        torch.exp(zt, out=et)
        s = et.sum(dim=0)
        log_s = torch.log(s)
        logp = torch.where(has_target, (target_logit - m) - log_s, 0.0)
        entropy = None
        if self.with_entropy:  # entropy = log s - sum_v e_v (z_v - m) / s; z - m is not needed afterwards
            entropy = torch.where(has_target, log_s - zt.mul_(et).sum(dim=0) / s, 0.0)
        return logp, entropy, (et, s)

    @staticmethod
    def dlogits(state, g, targets, out):
        et, s = state  # e = exp(z - max) (V, n), in ``out``'s memory
        et.mul_(-g / s)  # -g p
        n = et.shape[1]
        onehot = targets.clamp(min=0) * n + torch.arange(n, device=et.device)
        et.view(-1).index_add_(0, onehot, torch.where(targets >= 0, g, 0.0))
        return et.t()

    terms = staticmethod(_terms_torch)

    @staticmethod
    def mm(out, a, b, *, beta):
        torch.addmm(out, a, b, beta=beta, out=out)


class _TritonChunks:
    """The Triton path: cuBLAS GEMMs in the inputs' dtype with fp32 output (operands upcast where cuBLAS is absent,
    i.e. under the interpreter), the chunk's row statistics, loss terms and dz in rlvr_fast.kernels.fused_linear_grpo;
    dz is written in the GEMM dtype."""

    def __init__(self, weight, bias, inv_t, acc, with_entropy, config):
        from rlvr_fast.kernels import fused_linear_grpo as k  # imported late: TRITON_INTERPRET must be set first
        from rlvr_fast.kernels.logprobs import addmm_fp32

        self.k, self._addmm = k, addmm_fp32
        self.rows = config.block_rows or k.ROWS
        self.w, self.b = weight, bias
        self.inv_t, self.with_entropy, self.config = inv_t, with_entropy, config
        self.operand_dtype = self.dz_dtype = weight.dtype

    one_chunk_per_flush = False

    @staticmethod
    def dz_view(buf, off, n, v):
        return buf[off * v : (off + n) * v].view(n, v)

    def logits_stats(self, h, targets, zbuf, slot):
        n, v = h.shape[0], self.w.shape[0]
        z = zbuf[: n * v].view(n, v)
        self._addmm(z, h, self.w.t(), beta=0.0)  # raw h W^T: the kernels add the bias and apply 1/T as they read
        logp, lse, entropy = self.k.chunk_row_stats(
            z,
            self.b,
            targets,
            self.inv_t,
            with_entropy=self.with_entropy,
            block_v=self.config.block_v,
            rows=self.rows,
            empty=self.config.empty,
        )
        return logp, entropy, (z, lse)

    def dlogits(self, state, g, targets, out):
        z, lse = state
        return self.k.chunk_dlogits(
            z, self.b, targets, lse, g.contiguous(), self.inv_t, out, block_v=self.config.block_v, rows=self.rows
        )

    def terms(
        self,
        logp,
        old,
        ref,
        w,
        rows,
        adv,
        row_coef,
        seq_log_ratio,
        pg_scale,
        entropy,
        chk: CheckedLoss,
        kl_row_mean=None,
        roll=None,
        roll_row=None,
    ):
        g, partials = self.k.token_terms(
            logp,
            old,
            ref,
            w,
            rows,
            adv,
            row_coef,
            seq_log_ratio,
            pg_scale,
            entropy,
            kl_row_mean,
            beta=chk.objective.beta,
            eps_low=chk.objective.eps_low,
            eps_high=chk.objective.eps_high,
            dual_clip=chk.objective.dual_clip,
            kl=chk.objective.kl_estimator.code,
            kl_weighted=chk.objective.kl_ratio_weighted,
            roll=roll,
            roll_row=roll_row,
            rollout=correction_code(chk.objective.rollout_correction),
            rollout_cap=chk.objective.rollout_correction_cap,
            empty=self.config.empty,
        )
        return g, partials.sum(dim=0)

    def mm(self, out, a, b, *, beta):
        self._addmm(out, a, b, beta=beta)


_PATHS: dict[str, type] = {"torch": _TorchChunks, "triton": _TritonChunks}


# --------------------------------------------------------------------------------------------------------------------
# The gradient sink: the dz buffer, the hidden rows it multiplies, and the accumulators
# --------------------------------------------------------------------------------------------------------------------


class _GradSink:
    """Holds the last ``grad_rows`` tokens' hidden rows and dz; dhidden rows are finished per chunk (their GEMM runs
    over the whole vocabulary at once), dweight / dbias accumulate in fp32 over ``flush``es of the buffer."""

    def __init__(self, ops, hidden_flat, weight, bias, needs, rows, grad_rows, acc, config, share_z: bool):
        (n_flat, d), v, dev = hidden_flat.shape, weight.shape[0], weight.device
        self.ops, self.v, self.acc, self.needs = ops, v, acc, needs
        self.grad_rows, self.fill, self.flushed = grad_rows, 0, False
        empty = config.empty
        self.hbuf = empty((grad_rows, d), dtype=ops.operand_dtype, device=dev)
        self.zbuf = empty((rows * v,), dtype=acc, device=dev)
        # the dz slots (the torch path forms softmax's exp there first), or the logits buffer itself (share_z)
        self.share_z = share_z
        self.dzbuf = self.zbuf if share_z else empty((grad_rows * v,), dtype=ops.dz_dtype, device=dev)
        need_h, need_w, need_b = needs
        self.dh = torch.zeros((n_flat, d), dtype=hidden_flat.dtype, device=dev) if need_h else None
        self.dh_rows = empty((rows, d), dtype=acc, device=dev) if need_h else None
        self.weight_dtype = weight.dtype
        self.dw = empty(tuple(weight.shape), dtype=acc, device=dev) if need_w else None
        self.db = empty((v,), dtype=acc, device=dev) if need_b else None
        self.bias_dtype = None if bias is None else bias.dtype

    def reserve(self, n: int) -> int:
        # dz written over the logits must land on the rows the chunk's logits occupy: offset 0, one chunk per flush
        if self.fill + n > self.grad_rows or ((self.share_z or self.ops.one_chunk_per_flush) and self.fill):
            self.flush()
        off, self.fill = self.fill, self.fill + n
        return off

    def hidden_rows(self, off: int, n: int) -> torch.Tensor:
        return self.hbuf[off : off + n]

    def dz_slot(self, off: int, n: int) -> torch.Tensor:
        """(n, V) view of the dz rows [off, off + n) (in the path's layout)."""
        return self.ops.dz_view(self.dzbuf, off, n, self.v)

    def add(self, dz: torch.Tensor, index: torch.Tensor, weight: torch.Tensor) -> None:
        """dhidden rows of the chunk whose dz was just written: dz @ W over the whole vocabulary, finished here."""
        if self.dh is not None:
            rows = self.dh_rows[: dz.shape[0]]
            self.ops.mm(rows, dz, weight, beta=0.0)
            self.dh.index_copy_(0, index, rows.to(self.dh.dtype))

    def flush(self) -> None:
        if self.fill == 0:
            return
        dz, h = self.dz_slot(0, self.fill), self.hbuf[: self.fill]
        if self.dw is not None:
            self.ops.mm(self.dw, dz.t(), h, beta=1.0 if self.flushed else 0.0)
        if self.db is not None:
            if self.flushed:
                self.db += dz.sum(dim=0, dtype=self.acc)
            else:
                torch.sum(dz, dim=0, dtype=self.acc, out=self.db)
        self.fill, self.flushed = 0, True

    def results(self, hidden_shape) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        self.flush()
        self.hbuf = self.zbuf = self.dzbuf = self.dh_rows = None  # release the scratch before the casts below
        if not self.flushed:  # no token reached the head: the gradients are zero
            for name in ("dw", "db"):
                if getattr(self, name) is not None:
                    getattr(self, name).zero_()
        dh = None if self.dh is None else self.dh.view(hidden_shape)
        dw = None if self.dw is None else self.dw.to(self.weight_dtype)
        db = None if self.db is None else self.db.to(self.bias_dtype)
        return dh, dw, db


# --------------------------------------------------------------------------------------------------------------------
# The forward pass: loss, metrics and every gradient
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class _Outputs:
    loss: torch.Tensor  # 0-d, accumulator dtype
    stats: torch.Tensor  # (N_STATS,): STAT_TOKENS holds every counted token, STAT_SKIPPED the skipped ones
    evaluated: torch.Tensor  # 0-d, mask weight of the tokens whose log-probs were computed
    dhidden: torch.Tensor | None  # (B, T, D) hidden's dtype, d loss / d hidden
    dweight: torch.Tensor | None
    dbias: torch.Tensor | None
    correction: RolloutCorrectionMetrics | None = None  # the rollout correction's metrics


def _sequence_prepass(prob, plan, ranges, hidden_flat, weight, bias, path, wdiff, wkl, rows, is_diff=None):
    """GSPO completions longer than a chunk: their log-probs from ``token_logprobs``' forward (2 n D V FLOP), so that
    their ratios (and, for a ratio-weighted KL, their KL sums into ``wkl``) are known before their chunks form
    gradients. The same for sequence_truncate without old_logp: logp - rollout into ``is_diff``."""
    pos = torch.cat([torch.arange(l0, l1, device=plan.index.device) for _, l0, l1 in ranges])
    targets = plan.targets.index_select(0, pos)
    index = plan.index.index_select(0, pos)
    has_target = (targets >= 0).nonzero().squeeze(1) if plan.any_untargeted else None
    if has_target is not None:
        targets, head_index = targets.index_select(0, has_target), index.index_select(0, has_target)
    else:
        head_index = index
    logp = plan.w.new_zeros(pos.numel())
    if targets.numel():
        with torch.no_grad():
            out, _, _ = TOKEN_PATHS[path].fwd(
                hidden_flat.index_select(0, head_index),
                weight,
                bias,
                targets,
                prob.inv_t,
                False,
                LogprobsConfig(tokens=rows, empty=prob.config.empty),
            )
        logp = logp.index_copy(0, has_target, out.to(logp.dtype)) if has_target is not None else out.to(logp.dtype)
    old = logp if plan.old is None else plan.old.index_select(0, pos)
    w = plan.w.index_select(0, pos)
    if wdiff is not None:
        wdiff.view(-1).index_copy_(0, index, w * (logp - old))
    if is_diff is not None:
        is_diff.view(-1).index_copy_(0, index, old - plan.roll.index_select(0, pos))
    if wkl is not None:
        wkl.view(-1).index_copy_(0, index, w * _kl_value(prob.chk, plan.ref.index_select(0, pos), logp))


def _kl_value(chk: CheckedLoss, ref: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """The objective's KL estimate per token (no gradient needed: GSPO's weighted-KL sums are constants per chunk)."""
    return chk.objective.kl_estimator.value_and_grad(ref - logp)[0]


def _fused_forward(hidden, weight, bias, prob: _FusedInputs, path: str, needs: tuple[bool, bool, bool]) -> _Outputs:
    chk, config = prob.chk, prob.config
    B, T, D = hidden.shape
    V = weight.shape[0]
    acc = accumulation_dtype(hidden.dtype)
    dev = hidden.device
    plan = _make_plan(prob, T, acc)
    denom = chk.denominator(plan.tokens)
    need_grad = any(needs)
    ops = _PATHS[path](weight, bias, prob.inv_t, acc, prob.return_entropy, config)
    hidden_flat = hidden.reshape(B * T, D)
    rows, grad_rows = _chunk_sizes(config, max(plan.n, 1), V, dev, path, weight.element_size())
    if not need_grad:  # the loss alone (e.g. under no_grad): no dz, no buffer for it
        grad_rows = rows
    # dz over the logits, in place: the torch path without entropy (nothing reads z - max after its exp), the Triton
    # path when dz is fp32 and each chunk gets its own dweight GEMM (or when there is no dz at all)
    if path == "torch":
        share_z = not prob.return_entropy
    else:
        share_z = not need_grad or (ops.dz_dtype == acc and grad_rows == rows)
    sink = _GradSink(ops, hidden_flat, weight, bias, needs, rows, grad_rows, acc, config, share_z)

    # per-completion quantities (B,): advantages, grpo's 1 / max(W_b, 1), GSPO's log-ratio and its gradient scale
    adv = chk.advantages.to(acc)
    clamped = plan.row_weight.clamp(min=1.0)
    row_coef = 1.0 / clamped if chk.objective.aggregation.per_sequence else None
    seq_log_ratio = pg_scale = wdiff = wkl = kl_row_mean = None
    correction = chk.objective.correction
    is_diff = w_eval = roll_row = None
    roll_in_chunks = False  # sequence_truncate without old_logp: the completion's sum needs all its log-probs
    if correction is not None:
        w_eval = torch.zeros(B * T, dtype=acc, device=dev).index_copy_(0, plan.index, plan.w).view(B, T)
        is_diff = torch.zeros(B, T, dtype=acc, device=dev)  # old - rollout of the evaluated tokens (metrics)
        if correction.sequence and chk.old_logp is not None:  # known from the inputs before any logit
            w_full = chk.mask.to(acc)
            diff = chk.old_logp.to(acc) - chk.rollout_logp.to(acc)
            roll_row = torch.where(w_full != 0, w_full * diff, 0.0).sum(dim=1)
        elif correction.sequence:
            roll_row, roll_in_chunks = torch.zeros(B, dtype=acc, device=dev), True
    chunks, prepass = _chunks(plan, rows, chk.objective.sequence_level or roll_in_chunks)
    if prepass and not chk.objective.sequence_level:
        _sequence_prepass(prob, plan, prepass, hidden_flat, weight, bias, path, None, None, rows, is_diff)
        done = torch.tensor([b for b, _, _ in prepass], device=dev)
        roll_row[done] = (w_eval[done] * is_diff[done]).sum(dim=1)
    if chk.objective.sequence_level:
        pg_scale = plan.row_weight / clamped
        seq_log_ratio = torch.zeros(B, dtype=acc, device=dev)
        wdiff = torch.zeros(B, T, dtype=acc, device=dev)  # m (logp - old) of the loss tokens seen so far
        if chk.objective.kl_ratio_weighted:  # the completion's KL moves with s_b: its mean KL, as its ratio
            kl_row_mean = torch.zeros(B, dtype=acc, device=dev)
            wkl = torch.zeros(B, T, dtype=acc, device=dev)  # m KL of the loss tokens seen so far
        if prepass:
            _sequence_prepass(
                prob,
                plan,
                prepass,
                hidden_flat,
                weight,
                bias,
                path,
                wdiff,
                wkl,
                rows,
                is_diff if roll_in_chunks else None,
            )
            done = torch.tensor([b for b, _, _ in prepass], device=dev)
            seq_log_ratio[done] = wdiff[done].sum(dim=1) / clamped[done]
            if roll_in_chunks:
                roll_row[done] = (w_eval[done] * is_diff[done]).sum(dim=1)
            if wkl is not None:
                kl_row_mean[done] = wkl[done].sum(dim=1) / clamped[done]
    grad_scale = prob.inv_t / denom  # d loss / d z = (d loss / d logp) (onehot - p) / T, with the loss's 1 / D

    def chunk(l0: int, l1: int, finalise: tuple[int, int] | None) -> torch.Tensor:
        """One chunk, from its hidden rows to its gradients; returns its (N_STATS,) sums. (A function, so that its
        views of the scratch buffers are gone when the sink releases them.)"""
        n = l1 - l0
        index, targets = plan.index[l0:l1], plan.targets[l0:l1]
        untargeted = (targets < 0).nonzero().squeeze(1) if plan.any_untargeted else None
        off = sink.reserve(n)
        h = sink.hidden_rows(off, n)
        h.copy_(hidden_flat.index_select(0, index))
        if untargeted is not None and untargeted.numel():
            h.index_fill_(0, untargeted, 0.0)  # no target: its logits are never used, a NaN there must reach nothing
        logp, entropy, state = ops.logits_stats(h, targets, sink.zbuf, sink.dz_slot(off, n))
        w, rws = plan.w[l0:l1], plan.rows[l0:l1]
        old = None if plan.old is None else plan.old[l0:l1]
        roll = None if plan.roll is None else plan.roll[l0:l1]
        if is_diff is not None:
            is_diff.view(-1).index_copy_(0, index, (logp if old is None else old) - roll)
        if finalise is not None:  # this chunk holds these completions whole, their ratios are known now
            r0, r1 = finalise
            if roll_in_chunks:  # sequence_truncate: the completion's sum of logp - rollout
                roll_row[r0:r1] = (w_eval[r0:r1] * is_diff[r0:r1]).sum(dim=1)
        if finalise is not None and wdiff is not None:  # GSPO
            wdiff.view(-1).index_copy_(0, index, w * (logp - (logp if old is None else old)))
            seq_log_ratio[r0:r1] = wdiff[r0:r1].sum(dim=1) / clamped[r0:r1]
            if wkl is not None:
                wkl.view(-1).index_copy_(0, index, w * _kl_value(chk, plan.ref[l0:l1], logp))
                kl_row_mean[r0:r1] = wkl[r0:r1].sum(dim=1) / clamped[r0:r1]
        g, stats = ops.terms(
            logp,
            old,
            None if plan.ref is None else plan.ref[l0:l1],
            w,
            rws,
            adv,
            row_coef,
            seq_log_ratio,
            pg_scale,
            entropy,
            chk,
            kl_row_mean=kl_row_mean,
            roll=roll,
            roll_row=roll_row,
        )
        if need_grad:
            g = g * grad_scale
            if untargeted is not None:
                g = torch.where(targets >= 0, g, 0.0)  # a token without target has a constant logp
            sink.add(ops.dlogits(state, g, targets, sink.dz_slot(off, n)), index, ops.w)
        return stats

    partials = [chunk(*c) for c in chunks]
    dh, dw, db = sink.results(hidden.shape)

    stats = torch.stack(partials).sum(dim=0) if partials else torch.zeros(N_STATS, dtype=acc, device=dev)
    evaluated = stats[STAT_TOKENS].clone()
    stats[STAT_TOKENS] = plan.tokens
    stats[STAT_SKIPPED] = plan.skipped
    correction_metrics = None
    if correction is not None:  # over the evaluated tokens, and the completions not skipped
        skip = chk.objective.beta == 0.0 and config.skip_zero_advantage
        counted_rows = chk.advantages != 0 if skip else torch.ones(B, dtype=torch.bool, device=dev)
        correction_metrics = chk.correction_metrics(is_diff, w_eval, counted_rows)
    return _Outputs(stats[STAT_LOSS] / denom, stats, evaluated, dh, dw, db, correction_metrics)


class FusedLinearGrpoLossFunction(torch.autograd.Function):
    """Loss and its gradients w.r.t. hidden, weight and bias in the forward pass; backward scales them by grad_output.

    apply(hidden (B, T, D), weight (V, D), bias (V,) | None, problem: _FusedInputs, path "torch" | "triton"[, side])
    -> loss (0-d), stats (N_STATS,), evaluated (0-d). Saves only the three gradients (in the inputs' dtypes). ``side``
    (a list, optional) receives the rollout correction's metrics (None without one): not a tensor output.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, problem, path, side=None):
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        with torch.autocast(hidden.device.type, enabled=False):  # the paths pick their own precision
            out = _fused_forward(
                hidden.detach(), weight.detach(), None if bias is None else bias.detach(), problem, path, needs
            )
        ctx.save_for_backward(out.dhidden, out.dweight, out.dbias)
        if side is not None:
            side.append(out.correction)
        ctx.mark_non_differentiable(out.stats, out.evaluated)
        return out.loss, out.stats, out.evaluated

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, grad_stats, grad_evaluated):
        grads = ctx.saved_tensors
        # grad_output is almost always exactly 1 (loss.backward()): then the stored gradients are returned as they are,
        # which costs one host sync but no pass over the (V, D) gradient and no second copy of it
        if bool(grad_loss == 1):
            return (*grads, None, None, None)
        return (*(None if g is None else (g * grad_loss).to(g.dtype) for g in grads), None, None, None)


def _fused_metrics(stats: torch.Tensor, evaluated: torch.Tensor, prob: _FusedInputs, backend: str) -> GrpoLossMetrics:
    stats = stats.detach()
    tokens = stats[STAT_TOKENS]
    tiny = torch.finfo(stats.dtype).tiny

    def mean(x, n):
        return torch.where(n > 0, x / n.clamp(min=tiny), 0.0)

    return GrpoLossMetrics(
        clip_low_frac=mean(stats[STAT_CLIP_LOW], tokens),
        clip_high_frac=mean(stats[STAT_CLIP_HIGH], tokens),
        dual_clip_frac=mean(stats[STAT_DUAL_CLIP], tokens),
        # a skipped token's log-prob is never computed: these three average over the evaluated tokens
        mean_ratio=mean(stats[STAT_RATIO], evaluated),
        mean_kl=mean(stats[STAT_KL], evaluated) if prob.chk.ref_logp is not None else None,
        mean_entropy=mean(stats[STAT_ENTROPY], evaluated) if prob.return_entropy else None,
        tokens=tokens,
        tokens_skipped=stats[STAT_SKIPPED],
        backend=backend,
    )


# --------------------------------------------------------------------------------------------------------------------
# The public op
# --------------------------------------------------------------------------------------------------------------------


def fused_linear_grpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    *,
    old_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    temperature: float = DEFAULT.temperature,
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
    return_entropy: bool = False,
    backend: str = "auto",
    config: FusedLinearGrpoConfig = DEFAULT_CONFIG,
    objective: PolicyObjective | None = None,
    rollout_logp: torch.Tensor | None = None,
) -> tuple[torch.Tensor, GrpoLossMetrics]:
    """GRPO-family policy loss of B completions straight from the policy's last hidden states, with its gradients
    w.r.t. hidden, weight and bias formed in the same pass over the vocabulary (6NDV FLOP; no (N, V) logits).

    Args:
        hidden: (B, T, D) last hidden states at the positions that predict ``targets`` (fp16 / bf16 / fp32 / fp64).
        weight: (V, D) LM head (or tied embedding), hidden's dtype; bias: (V,) or None. Under ``torch.autocast``
            hidden and weight are cast to the autocast dtype first, as nn.Linear's matmul would be.
            logits = (hidden @ weight^T + bias) / temperature.
        targets: (B, T) sampled token ids in [0, V), or -100 (padding) where mask is 0.
        mask: (B, T) bool / integer / float; 1 on completion tokens that count (floats act as per-token weights).
            Tokens with mask 0 never reach the LM head: padding costs nothing.
        advantages: (B,) one scalar per completion.
        old_logp: (B, T) behaviour-policy log-probs, or None for on-policy (old = logp.detach(): ratio 1).
        ref_logp: (B, T) reference log-probs: needed when beta > 0, otherwise only the mean_kl metric reads it.
        temperature: > 0, the rollout's sampling temperature.
        beta, kl, eps_low, eps_high, dual_clip, loss_type, importance_sampling, max_completion_length, num_items,
        kl_ratio_weighted, rollout_correction, rollout_correction_cap: the objective, exactly as in
            ``rlvr_fast.grpo_loss`` (docs/design.md §2; registries in rlvr_fast.ops.loss_types); checked by
            ``PolicyObjective``, whose defaults they take.
        return_entropy: also compute each token's policy entropy for ``metrics.mean_entropy`` (no gradient).
        backend: "auto" | "triton" | "cuda" | "torch" (rlvr_fast.backends); an unavailable one raises.
        config: chunking and the zero-advantage skip (``FusedLinearGrpoConfig``; the defaults fit most uses).
        objective: temperature and beta ... num_items as one ``PolicyObjective`` (rlvr_fast.ops.objective); the flat
            arguments must then stay at their defaults.
        rollout_logp: (B, T) the rollout engine's log-probs of the sampled tokens, required exactly with a
            rollout_correction (as ``grpo_loss``). Without old_logp its weights use the log-probs formed here
            (detached); sequence_truncate then needs whole completions, as GSPO (module doc).

    Returns:
        (loss, metrics): loss is a 0-d fp32 tensor (fp64 for fp64 inputs), differentiable w.r.t. hidden, weight and
        bias; their gradients come back in their own dtypes, accumulated in fp32. ``metrics`` is a
        ``GrpoLossMetrics``; with beta == 0, ``tokens_skipped`` counts the tokens of zero-advantage completions, whose
        LM-head work was skipped (mean_ratio / mean_kl / mean_entropy then average over the other tokens).

    Cost: one logits pass plus the two gradient GEMMs (6NDV FLOP over the tokens that count and are not skipped);
    under GSPO, completions longer than ``config.chunk_tokens`` add a log-prob pass over their tokens (8NDV there).
    Host syncs: a few (the target range check, the token count, grad_output == 1 in backward).
    """
    objective = objective_from_arguments(OP, objective, **flat_arguments(locals()))
    hidden, weight, bias, problem = _check_fused_inputs(
        hidden,
        weight,
        targets,
        mask,
        advantages,
        old_logp,
        ref_logp,
        bias,
        objective,
        return_entropy,
        config,
        rollout_logp=rollout_logp,
    )
    chosen = select_backend(backend, hidden.device, op=OP)
    side: list = []
    loss, stats, evaluated = FusedLinearGrpoLossFunction.apply(hidden, weight, bias, problem, chosen, side)
    metrics = _fused_metrics(stats, evaluated, problem, chosen)
    metrics.rollout_correction = side[0] if side else None
    return loss, metrics
