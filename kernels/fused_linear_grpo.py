"""Triton kernels of the fused-linear GRPO-family loss (rlvr_fast.ops.fused_linear_grpo_loss), and their launchers.

The op walks the tokens in chunks. For one chunk of n tokens the logits z = h_c @ W^T (n, V) come from one cuBLAS GEMM
with fp32 output (never rounded to bf16: a rounded logit moves logp, and with it the importance ratio, by |z| * 2^-9);
these kernels then do everything between that GEMM and the two gradient GEMMs, reading the chunk's logits twice:

1. ``_row_stats_kernel``: each program streams ROWS rows (one on a GPU) over the vocabulary, folding (z + bias) * inv_t
   into the online max / sum / entropy accumulator (``online_fold``, shared with the log-prob gather), and writes logp,
   lse and the entropy of each token.
2. ``_token_terms_kernel``: per token, the GRPO-family loss term and d loss / d logp (``grpo_token_terms``, shared with
   ``grpo_loss``) times the token's mask weight and its loss type's row coefficient, plus per-program partial sums of
   the loss and the metrics (the STAT_* columns of rlvr_fast.ops.constants). O(n) work.
3. ``_dlogits_kernel``: dz = g (1[v = target] - softmax(z)_v), written in the GEMM dtype (bf16 for bf16 inputs) for the
   GEMMs dhidden = dz @ W and dweight += dz^T @ h_c that follow in cuBLAS with fp32 accumulation.

Because the loss is a scalar, g = d loss / d logp is known once a token's logp is (for GSPO, once its completion's
logps are), so the gradient is formed in the forward pass: 2NDV FLOP for the logits and 4NDV for the gradient GEMMs,
with no logits recomputation in a backward pass (the log-prob gather alone costs 8NDV fwd + bwd).

Rows whose target is negative (a token that counts in the loss but has no target, see the op) get logp = 0,
entropy = 0 and an all-zero dz row, and their logits are never read.
Arithmetic is fp32 (fp64 for fp64 inputs); row offsets are int64 (n * V passes 2**31 at V = 151936 beyond 14k rows).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from rlvr_fast.kernels.grpo_loss import (
    C_ROLLOUT_SEQUENCE,
    C_ROLLOUT_TOKEN,
    C_STAT_CLIP_HIGH,
    C_STAT_CLIP_LOW,
    C_STAT_DUAL_CLIP,
    C_STAT_ENTROPY,
    C_STAT_KL,
    C_STAT_LOSS,
    C_STAT_RATIO,
    C_STAT_SKIPPED,
    C_STAT_TOKENS,
    grpo_token_terms,
    rollout_weight,
)
from rlvr_fast.kernels.launch_plan import KernelLaunch
from rlvr_fast.kernels.logprobs import online_fold

from rlvr_fast.ops.checks import accumulation_dtype
from rlvr_fast.ops.constants import N_STATS, ROLLOUT_OFF, ROLLOUT_SEQUENCE, ROLLOUT_TOKEN

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Columns per loop step of the row kernels: wide enough that each program streams whole cache lines at full
# bandwidth; the interpreter pays per step, so it takes wider ones.
_BLOCK_V = 4096 if _INTERPRET else 1024
# Tokens per program of the elementwise loss-term kernel (4 warps x 8 tokens per thread on a GPU).
_BLOCK_TOKENS = 4096 if _INTERPRET else 1024
# Rows per program of the row kernels. One on a GPU: a chunk of a few hundred rows then still spreads over every SM,
# each program streaming its row; the interpreter pays per program, so it takes 16.
ROWS = 16 if _INTERPRET else 1
_ACC = {torch.float64: tl.float64}


def _acc_tl(dtype: torch.dtype):
    return _ACC.get(accumulation_dtype(dtype), tl.float32)


@triton.jit(do_not_specialize=["n", "V"])
def _row_stats_kernel(
    z_ptr,  # (n, V) logits before bias and temperature, row stride stride_z, unit column stride
    bias_ptr,  # (V,) or a dummy
    targets_ptr,  # (n,) int, in [0, V), or < 0 for a row without target
    logp_ptr,  # (n,) ACC out
    lse_ptr,  # (n,) ACC out
    entropy_ptr,  # (n,) ACC out (written with HAS_ENTROPY)
    n,
    V,
    stride_z,
    inv_t,
    HAS_BIAS: tl.constexpr,
    HAS_ENTROPY: tl.constexpr,
    ACC: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n
    tgt = tl.load(targets_ptr + rows, mask=row_ok, other=-1).to(tl.int64)
    has_target = tgt >= 0
    base = z_ptr + rows * stride_z
    m = tl.full([ROWS], -float("inf"), dtype=ACC)
    s = tl.zeros([ROWS], dtype=ACC)
    a = tl.zeros([ROWS], dtype=ACC)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        ok = cols < V
        # rows without a target (or past n) read nothing and fold zeros: finite, and never stored
        x = tl.load(base[:, None] + cols[None, :], mask=(has_target & row_ok)[:, None] & ok[None, :], other=0.0)
        x = x.to(ACC)
        if HAS_BIAS:
            x += tl.load(bias_ptr + cols, mask=ok, other=0.0).to(ACC)[None, :]
        m, s, a = online_fold(x * inv_t, ok[None, :], m, s, a, HAS_ENTROPY, 1)
    # the target's logit through exactly the operations of the loop, so that z_t <= m and logp <= 0
    picked = has_target & row_ok
    safe_tgt = tl.where(picked, tgt, 0)
    zt = tl.load(base + safe_tgt, mask=picked, other=0.0).to(ACC)
    if HAS_BIAS:
        zt += tl.load(bias_ptr + safe_tgt, mask=picked, other=0.0).to(ACC)
    log_s = tl.log(s)
    zero = tl.zeros([ROWS], dtype=ACC)
    tl.store(lse_ptr + rows, tl.where(picked, m + log_s, zero), mask=row_ok)
    tl.store(logp_ptr + rows, tl.where(picked, (zt * inv_t - m) - log_s, zero), mask=row_ok)
    if HAS_ENTROPY:
        tl.store(entropy_ptr + rows, tl.where(picked, log_s - a / s, zero), mask=row_ok)


@triton.jit(do_not_specialize=["n", "V"])
def _dlogits_kernel(
    z_ptr,  # (n, V) logits before bias and temperature, row stride stride_z
    bias_ptr,  # (V,) or a dummy
    targets_ptr,  # (n,) int, < 0: a row without target (all-zero gradient, logits never read)
    lse_ptr,  # (n,) ACC
    g_ptr,  # (n,) ACC: d loss / d logp of the row, already times inv_t and the loss type's 1 / denominator
    dz_ptr,  # (n, V) out, the GEMM dtype, row stride stride_dz (may alias z_ptr: each element is read, then written)
    n,
    V,
    stride_z,
    stride_dz,
    inv_t,
    HAS_BIAS: tl.constexpr,
    ACC: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < n
    ok = cols < V
    tgt = tl.load(targets_ptr + rows, mask=row_ok, other=-1).to(tl.int64)
    has_target = tgt >= 0
    read = (has_target & row_ok)[:, None] & ok[None, :]
    x = tl.load(z_ptr + rows[:, None] * stride_z + cols[None, :], mask=read, other=0.0).to(ACC)
    if HAS_BIAS:
        x += tl.load(bias_ptr + cols, mask=ok, other=0.0).to(ACC)[None, :]
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
    p = tl.exp(x * inv_t - lse[:, None])
    # d logp_t / dz_v = 1[v = t] - p_v (docs/design.md §3), times the row's upstream gradient
    dz = tl.where(cols[None, :] == tgt[:, None], g[:, None], 0.0) - p * g[:, None]
    dz = tl.where(read, dz, 0.0)
    out = dz_ptr + rows[:, None] * stride_dz + cols[None, :]
    tl.store(out, dz.to(dz_ptr.dtype.element_ty), mask=row_ok[:, None] & ok[None, :])


@triton.jit(do_not_specialize=["n"])
def _token_terms_kernel(
    logp_ptr,  # (n,) ACC, the policy's log-probs of the chunk's tokens
    old_ptr,  # (n,) behaviour-policy log-probs (read with HAS_OLD)
    ref_ptr,  # (n,) reference log-probs (read with HAS_REF)
    w_ptr,  # (n,) mask weights (all != 0: the op only passes tokens that count)
    row_ptr,  # (n,) int, the completion of each token
    adv_ptr,  # (B,) advantages
    row_coef_ptr,  # (B,) 1 / max(W_b, 1) (read with ROW_NORM)
    seq_log_ratio_ptr,  # (B,) GSPO: the completion's masked mean log-ratio (read with SEQUENCE)
    pg_scale_ptr,  # (B,) GSPO: W_b / max(W_b, 1) (read with SEQUENCE)
    kl_row_mean_ptr,  # (B,) GSPO: sum_t m KL_t / max(W_b, 1) of the completion (read with SEQUENCE and KL_WEIGHTED)
    ent_ptr,  # (n,) entropies (read with HAS_ENTROPY)
    roll_ptr,  # (n,) the rollout engine's log-probs (read with ROLLOUT == token)
    roll_row_ptr,  # (B,) sum_t m (old - rollout) of the completion (read with ROLLOUT == sequence)
    g_ptr,  # (n,) ACC out: m_t c_b d l_t / d logp_t
    partial_ptr,  # (programs, N_STATS) ACC out
    n,
    beta,
    eps_low,
    eps_high,
    dual_clip,
    rollout_cap,
    HAS_OLD: tl.constexpr,
    HAS_REF: tl.constexpr,
    KL_IN_LOSS: tl.constexpr,
    HAS_ENTROPY: tl.constexpr,
    KL: tl.constexpr,
    SEQUENCE: tl.constexpr,
    ROW_NORM: tl.constexpr,
    DUAL_CLIP: tl.constexpr,
    KL_WEIGHTED: tl.constexpr,
    ROLLOUT: tl.constexpr,
    SERIES: tl.constexpr,
    ACC: tl.constexpr,
    N_STATS_: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    i = pid * BLOCK + tl.arange(0, BLOCK)
    ok = i < n
    w = tl.load(w_ptr + i, mask=ok, other=0).to(ACC)
    active = ok & (w != 0)
    logp = tl.load(logp_ptr + i, mask=active, other=0.0).to(ACC)
    row = tl.load(row_ptr + i, mask=ok, other=0).to(tl.int64)
    adv = tl.load(adv_ptr + row, mask=active, other=0.0).to(ACC)
    if HAS_REF:
        ref = tl.load(ref_ptr + i, mask=active, other=0.0).to(ACC)
    else:
        ref = logp
    kl_row_mean = tl.zeros([BLOCK], ACC)
    if SEQUENCE:
        log_ratio = tl.load(seq_log_ratio_ptr + row, mask=active, other=0.0).to(ACC)
        pg_grad_scale = tl.load(pg_scale_ptr + row, mask=active, other=0.0).to(ACC)
        if KL_WEIGHTED:
            kl_row_mean = tl.load(kl_row_mean_ptr + row, mask=active, other=0.0).to(ACC)
    else:
        if HAS_OLD:
            old = tl.load(old_ptr + i, mask=active, other=0.0).to(ACC)
        else:
            old = logp  # on-policy: old = logp.detach(), log-ratio 0 (NaN stays NaN, as in the reference)
        log_ratio = logp - old
        pg_grad_scale = tl.full([BLOCK], 1.0, ACC)
    # the rollout correction's truncated weight (old = old_logp, else logp: the detached current log-probs)
    if ROLLOUT == C_ROLLOUT_TOKEN:
        roll = tl.load(roll_ptr + i, mask=active, other=0.0).to(ACC)
        if HAS_OLD:
            behaviour = tl.load(old_ptr + i, mask=active, other=0.0).to(ACC)
        else:
            behaviour = logp
        pg_weight = rollout_weight(behaviour - roll, rollout_cap)
    elif ROLLOUT == C_ROLLOUT_SEQUENCE:
        pg_weight = rollout_weight(tl.load(roll_row_ptr + row, mask=active, other=0.0).to(ACC), rollout_cap)
    else:
        pg_weight = tl.full([BLOCK], 1.0, ACC)

    loss, dlogp, ratio, kl, low, high, dual = grpo_token_terms(
        logp,
        ref,
        log_ratio,
        adv,
        pg_grad_scale,
        kl_row_mean,
        pg_weight,
        beta,
        eps_low,
        eps_high,
        dual_clip,
        HAS_REF,
        KL_IN_LOSS,
        KL,
        DUAL_CLIP,
        SERIES,
        KL_WEIGHTED,
        SEQUENCE,
    )
    if ROW_NORM:
        coef = w * tl.load(row_coef_ptr + row, mask=active, other=0.0).to(ACC)
    else:
        coef = w
    zero = tl.zeros([BLOCK], ACC)
    tl.store(g_ptr + i, tl.where(active, coef * dlogp, zero), mask=ok)

    out = partial_ptr + pid * N_STATS_
    # one column per STAT_* constant (rlvr_fast.ops.constants, wrapped as constexpr in kernels.grpo_loss)
    tl.store(out + C_STAT_LOSS, tl.sum(tl.where(active, coef * loss, zero), axis=0))
    tl.store(out + C_STAT_KL, tl.sum(tl.where(active, w * kl, zero), axis=0))
    tl.store(out + C_STAT_RATIO, tl.sum(tl.where(active, w * ratio, zero), axis=0))
    if HAS_ENTROPY:
        ent = tl.load(ent_ptr + i, mask=active, other=0.0).to(ACC)
        tl.store(out + C_STAT_ENTROPY, tl.sum(tl.where(active, w * ent, zero), axis=0))
    else:
        tl.store(out + C_STAT_ENTROPY, tl.sum(zero, axis=0))
    tl.store(out + C_STAT_CLIP_LOW, tl.sum(tl.where(active & low, w, zero), axis=0))
    tl.store(out + C_STAT_CLIP_HIGH, tl.sum(tl.where(active & high, w, zero), axis=0))
    tl.store(out + C_STAT_DUAL_CLIP, tl.sum(tl.where(active & dual, w, zero), axis=0))
    tl.store(out + C_STAT_TOKENS, tl.sum(tl.where(active, w, zero), axis=0))  # (the tokens evaluated here)
    tl.store(out + C_STAT_SKIPPED, tl.sum(zero, axis=0))  # counted by the op, which decides what to skip


# --------------------------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------------------------


def row_stats_grid(n: int, rows: int = ROWS) -> tuple[int]:
    return (triton.cdiv(n, rows),)


def dlogits_grid(n: int, v: int, block_v: int, rows: int = ROWS) -> tuple[int, int]:
    """Row blocks on axis 0 (< 2**31), column blocks on axis 1: cdiv(V, block_v) <= 65535 for any V below 67M."""
    return (triton.cdiv(n, rows), triton.cdiv(v, block_v))


def terms_grid(n: int, block: int = _BLOCK_TOKENS) -> tuple[int]:
    return (triton.cdiv(n, block),)


def _block_v(v: int, block_v: int | None) -> int:
    return block_v or min(_BLOCK_V, triton.next_power_of_2(v))


def chunk_row_stats(
    z: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    inv_t: float,
    *,
    with_entropy: bool,
    block_v: int | None = None,
    rows: int = ROWS,
    empty=torch.empty,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """logp, lse, entropy (None unless ``with_entropy``), each (n,) in the accumulator dtype, of the rows of
    softmax((z + bias) * inv_t). z: (n, V) with unit column stride; targets: (n,) int, negative for no target;
    n >= 1."""
    n, v = z.shape
    acc = accumulation_dtype(z.dtype)
    logp = empty((n,), dtype=acc, device=z.device)
    lse = empty((n,), dtype=acc, device=z.device)
    entropy = empty((n,), dtype=acc, device=z.device) if with_entropy else None
    KernelLaunch(
        _row_stats_kernel,
        row_stats_grid(n, rows),
        (
            z,
            bias if bias is not None else z,
            targets,
            logp,
            lse,
            entropy if entropy is not None else logp,
            n,
            v,
            z.stride(0),
            inv_t,
        ),
        dict(
            HAS_BIAS=bias is not None,
            HAS_ENTROPY=with_entropy,
            ACC=_acc_tl(z.dtype),
            ROWS=rows,
            BLOCK_V=_block_v(v, block_v),
        ),
        num_warps=4,
    ).launch()
    return logp, lse, entropy


def chunk_dlogits(
    z: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    lse: torch.Tensor,
    g: torch.Tensor,
    inv_t: float,
    out: torch.Tensor,
    *,
    block_v: int | None = None,
    rows: int = ROWS,
) -> torch.Tensor:
    """Write dz = g * (onehot(target) - softmax((z + bias) * inv_t)) into ``out`` ((n, V), unit column stride, any
    floating dtype; may be ``z`` itself) and return it. g: (n,) the rows' upstream gradients, already times inv_t."""
    n, v = z.shape
    block = _block_v(v, block_v)
    KernelLaunch(
        _dlogits_kernel,
        dlogits_grid(n, v, block, rows),
        (
            z,
            bias if bias is not None else z,
            targets,
            lse,
            g,
            out,
            n,
            v,
            z.stride(0),
            out.stride(0),
            inv_t,
        ),
        dict(
            HAS_BIAS=bias is not None,
            ACC=_acc_tl(z.dtype),
            ROWS=rows,
            BLOCK_V=block,
        ),
        num_warps=4,
    ).launch()
    return out


def token_terms(
    logp: torch.Tensor,
    old: torch.Tensor | None,
    ref: torch.Tensor | None,
    w: torch.Tensor,
    rows: torch.Tensor,
    advantages: torch.Tensor,
    row_coef: torch.Tensor | None,
    seq_log_ratio: torch.Tensor | None,
    pg_scale: torch.Tensor | None,
    entropy: torch.Tensor | None,
    kl_row_mean: torch.Tensor | None = None,
    *,
    beta: float,
    eps_low: float,
    eps_high: float,
    dual_clip: float | None,
    kl: int,
    kl_weighted: bool = False,
    roll: torch.Tensor | None = None,
    roll_row: torch.Tensor | None = None,
    rollout: int = ROLLOUT_OFF,
    rollout_cap: float = 1.0,
    empty=torch.empty,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(g, partials) for n >= 1 tokens given as flat (n,) arrays (``rows``: each token's completion, indexing the (B,)
    per-completion arrays). g = m_t c_b d l_t / d logp_t; partials: (programs, N_STATS), to be summed over programs.

    ``row_coef`` (1 / max(W_b, 1)) switches on the per-sequence normalisation (grpo); ``seq_log_ratio`` and
    ``pg_scale`` switch on GSPO's sequence-level ratio; ``old`` None means on-policy. ``kl_weighted``: the KL term
    times the ratio (needs ``ref``; under GSPO also ``kl_row_mean``, (B,) sum_t m KL_t / max(W_b, 1)).
    ``rollout`` (a ROLLOUT_* code): the rollout correction's truncated weight on the policy term, from ``roll`` (n,)
    (token mode) or ``roll_row`` (B,), the completion's sum_t m (old - rollout) (sequence mode); cap ``rollout_cap``.
    """
    n = logp.shape[0]
    acc = accumulation_dtype(logp.dtype)
    grid = terms_grid(n)
    g = empty((n,), dtype=acc, device=logp.device)
    partials = empty((grid[0], N_STATS), dtype=acc, device=logp.device)
    sequence = seq_log_ratio is not None
    if kl_weighted and (ref is None or (sequence and kl_row_mean is None)):
        raise ValueError("token_terms: kl_weighted=True needs ref (and kl_row_mean under GSPO)")
    if (rollout == ROLLOUT_TOKEN and roll is None) or (rollout == ROLLOUT_SEQUENCE and roll_row is None):
        raise ValueError(f"token_terms: rollout={rollout} needs roll (token) or roll_row (sequence)")
    KernelLaunch(
        _token_terms_kernel,
        grid,
        (
            logp,
            old if old is not None else logp,
            ref if ref is not None else logp,
            w,
            rows,
            advantages,
            row_coef if row_coef is not None else logp,
            seq_log_ratio if sequence else logp,
            pg_scale if sequence else logp,
            kl_row_mean if (sequence and kl_weighted) else logp,
            entropy if entropy is not None else logp,
            roll if roll is not None else logp,
            roll_row if roll_row is not None else logp,
            g,
            partials,
            n,
            float(beta),
            float(eps_low),
            float(eps_high),
            float(dual_clip) if dual_clip is not None else 0.0,
            float(rollout_cap),
        ),
        dict(
            HAS_OLD=old is not None,
            HAS_REF=ref is not None,
            KL_IN_LOSS=beta != 0.0,
            HAS_ENTROPY=entropy is not None,
            KL=kl,
            SEQUENCE=sequence,
            ROW_NORM=row_coef is not None,
            DUAL_CLIP=dual_clip is not None,
            KL_WEIGHTED=kl_weighted,
            ROLLOUT=rollout,
            SERIES=acc != torch.float64,
            ACC=_acc_tl(logp.dtype),
            N_STATS_=N_STATS,
            BLOCK=_BLOCK_TOKENS,
        ),
        num_warps=4,
    ).launch()
    return g, partials
