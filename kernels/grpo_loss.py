"""Triton kernels of the GRPO-family loss on per-token log-probs: one elementwise + reduction pass, forward and
backward.

The loss is a scalar, so d loss / d logp is known as soon as the forward pass has seen a token: the main kernel writes
each token's gradient (before the global normaliser) in the same pass that sums the loss and the metrics, and the
autograd backward only scales it by grad_output / denominator. Each input is read once by the main pass (the pre-pass
below re-reads the mask, and logp / old_logp under GSPO).

Grid: one program per (completion, chunk of BLOCK_T tokens), flattened into grid dimension 0 (limit 2**31 - 1), so
any sequence length works: Liger PR #1294's unchunked kernel launched (B, L) and crashed at L >= 65,536.
A completion's sums that the per-token terms need first (its token count for grpo's per-sequence mean, its masked
log-ratio sum for GSPO's sequence ratio) come from a light pre-pass (``_grpo_row_stats_kernel``) whose per-chunk
partials are summed in a fixed order on the host side (deterministic, no atomics). Per-program partial sums of the loss
and the metrics are likewise written to a small (programs, N_STATS) buffer and summed after the launch.

Reusable pieces (phase 2's fused-linear kernel computes logp itself and then applies exactly these):
- ``grpo_policy_term(log_ratio, adv, ...)``: clipped surrogate, its derivative in log_ratio, clip flags.
- ``grpo_kl_term(logp, ref_logp, KL)``: the KL estimate and its derivative in logp.
- ``grpo_token_terms(...)``: both combined into the token loss and d(token loss)/d logp per unit mask weight.
Codes, statistics columns and clamps come from ``rlvr_fast.ops.constants`` (Triton-free), as the ops' do.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from rlvr_fast.kernels.launch_plan import KernelLaunch

from rlvr_fast.ops.checks import accumulation_dtype
from rlvr_fast.ops.constants import (
    KL_K1,
    KL_K2,
    KL_K3,
    LOW_VAR_KL_D_CLAMP,
    LOW_VAR_KL_VALUE_CLAMP,
    N_STATS,
    ROLLOUT_OFF,
    ROLLOUT_SEQUENCE,
    ROLLOUT_TOKEN,
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

# @triton.jit code reads only tl.constexpr globals: the shared constants (rlvr_fast.ops.constants), wrapped once here
# and imported by the fused-linear kernels too.
C_KL_K1 = tl.constexpr(KL_K1)
C_KL_K2 = tl.constexpr(KL_K2)
C_KL_K3 = tl.constexpr(KL_K3)
C_D_CLAMP = tl.constexpr(LOW_VAR_KL_D_CLAMP)
C_VALUE_CLAMP = tl.constexpr(LOW_VAR_KL_VALUE_CLAMP)
C_STAT_LOSS = tl.constexpr(STAT_LOSS)
C_STAT_KL = tl.constexpr(STAT_KL)
C_STAT_RATIO = tl.constexpr(STAT_RATIO)
C_STAT_ENTROPY = tl.constexpr(STAT_ENTROPY)
C_STAT_CLIP_LOW = tl.constexpr(STAT_CLIP_LOW)
C_STAT_CLIP_HIGH = tl.constexpr(STAT_CLIP_HIGH)
C_STAT_DUAL_CLIP = tl.constexpr(STAT_DUAL_CLIP)
C_STAT_TOKENS = tl.constexpr(STAT_TOKENS)
C_STAT_SKIPPED = tl.constexpr(STAT_SKIPPED)
C_ROLLOUT_TOKEN = tl.constexpr(ROLLOUT_TOKEN)
C_ROLLOUT_SEQUENCE = tl.constexpr(ROLLOUT_SEQUENCE)
# columns of the per-completion pre-pass: [sum_t m, sum_t m (logp - old), sum_t m KL_t, sum_t m (old - rollout)]
ROW_STATS = 4
C_ROW_STATS = tl.constexpr(ROW_STATS)
_TL_ACC = {torch.float64: tl.float64, torch.float32: tl.float32}

_MAX_BLOCK_T = 1024  # tokens per program on a GPU: 4 warps x 8 elements per thread, registers to spare
_MAX_BLOCK_T_INTERPRETED = 4096  # the interpreter pays per program, not per element
_MIN_BLOCK_T = 128  # 4 warps x 1 element per thread
_TARGET_PROGRAMS = 512  # about 4 programs per SM of an H100 (132 SMs) before blocks are narrowed


# --------------------------------------------------------------------------------------------------------------------
# Shared @triton.jit pieces (phase 2's fused-linear kernel reuses them unchanged)
# --------------------------------------------------------------------------------------------------------------------


@triton.jit
def _expm1(x, SERIES: tl.constexpr):
    """exp(x) - 1; for |x| < 0.5 through its Taylor series to x^9 (rel. truncation < 1e-9) when SERIES (fp32)."""
    if SERIES:
        small = tl.abs(x) < 0.5
        s = tl.where(small, x, 0.0)
        p = 1.0 / 362880.0
        p = p * s + 1.0 / 40320.0
        p = p * s + 1.0 / 5040.0
        p = p * s + 1.0 / 720.0
        p = p * s + 1.0 / 120.0
        p = p * s + 1.0 / 24.0
        p = p * s + 1.0 / 6.0
        p = p * s + 0.5
        p = p * s + 1.0
        return tl.where(small, p * s, tl.exp(x) - 1.0)
    else:
        return tl.exp(x) - 1.0


@triton.jit
def _expm1_minus_x(x, SERIES: tl.constexpr):
    """exp(x) - 1 - x (the k3 estimate); fp32 evaluates exp(x) - 1 - x with no correct digit at |x| ~ 1e-4."""
    if SERIES:
        small = tl.abs(x) < 0.5
        s = tl.where(small, x, 0.0)
        p = 1.0 / 3628800.0
        p = p * s + 1.0 / 362880.0
        p = p * s + 1.0 / 40320.0
        p = p * s + 1.0 / 5040.0
        p = p * s + 1.0 / 720.0
        p = p * s + 1.0 / 120.0
        p = p * s + 1.0 / 24.0
        p = p * s + 1.0 / 6.0
        p = p * s + 0.5
        return tl.where(small, p * s * s, tl.exp(x) - 1.0 - x)
    else:
        return tl.exp(x) - 1.0 - x


@triton.jit
def grpo_policy_term(log_ratio, adv, eps_low, eps_high, dual_clip, DUAL_CLIP: tl.constexpr):
    """Clipped surrogate of one token (or one sequence, for GSPO) and its derivative in log_ratio.

    ratio = exp(log_ratio); pg = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A); with DUAL_CLIP and A < 0,
    pg = min(pg, -dual_clip * A) (dual-clip PPO, Ye et al. 2020, arXiv:1912.09729). The gradient flows through the
    unclipped branch only: d pg / d log_ratio = -ratio * A where the min picks it (ties pick it), else 0. A NaN ratio
    picks the unclipped branch, so NaN reaches both the loss and the gradient.

    Returns (pg, d pg / d log_ratio, ratio, clipped_low, clipped_high, dual_clipped); clipped_low = A < 0 and
    ratio < 1 - eps_low, clipped_high = A > 0 and ratio > 1 + eps_high (TRL's clip_ratio/low and /high: the tokens whose
    gradient the clip removes), dual_clipped = A < 0 and the dual bound is active.
    """
    ratio = tl.exp(log_ratio)
    adv = tl.zeros_like(ratio) + adv  # a per-completion scalar: broadcast once (free when compiled)
    unclipped = ratio * adv
    clipped = tl.minimum(tl.maximum(ratio, 1.0 - eps_low), 1.0 + eps_high) * adv
    take_clipped = clipped < unclipped
    pg = -tl.where(take_clipped, clipped, unclipped)
    dpg = tl.where(take_clipped, 0.0, -unclipped)
    low = take_clipped & (adv < 0)
    high = take_clipped & (adv > 0)
    if DUAL_CLIP:
        cap = -dual_clip * adv
        dual = (adv < 0) & (pg > cap)
        pg = tl.where(dual, cap, pg)
        dpg = tl.where(dual, 0.0, dpg)
    else:
        dual = take_clipped & (adv < adv)  # all False (even for a NaN advantage), same shape
    return pg, dpg, ratio, low, high, dual


@triton.jit
def grpo_kl_term(logp, ref_logp, KL: tl.constexpr, SERIES: tl.constexpr):
    """KL estimate of one token from d = ref_logp - logp and its derivative in logp (codes KL_*).

    k1 = -d (d/dlogp = 1); k2 = d^2/2 (-d); k3 = exp(d) - d - 1 (1 - exp(d)); low_var_kl = verl's clamped k3 (zero
    gradient where a clamp is active, and at NaN, exactly like torch.clamp's backward).
    """
    d = ref_logp - logp
    if KL == C_KL_K1:
        kl = -d
        dkl = tl.zeros_like(d) + 1.0
    elif KL == C_KL_K2:
        kl = 0.5 * d * d
        dkl = -d
    elif KL == C_KL_K3:
        kl = _expm1_minus_x(d, SERIES)
        dkl = -_expm1(d, SERIES)
    else:  # KL_LOW_VAR
        dc = tl.where(d > C_D_CLAMP, C_D_CLAMP, tl.where(d < -C_D_CLAMP, -C_D_CLAMP, d))  # keeps NaN (tl.clamp may not)
        k = _expm1_minus_x(dc, SERIES)
        passes = (d >= -C_D_CLAMP) & (d <= C_D_CLAMP) & (k <= C_VALUE_CLAMP) & (k >= -C_VALUE_CLAMP)
        kl = tl.where(k > C_VALUE_CLAMP, C_VALUE_CLAMP, tl.where(k < -C_VALUE_CLAMP, -C_VALUE_CLAMP, k))
        dkl = tl.where(passes, -_expm1(dc, SERIES), 0.0)
    return kl, dkl


@triton.jit
def rollout_weight(log_ratio, cap):
    """Truncated importance weight min(exp(log_ratio), cap) of the rollout correction
    (rlvr_fast.ops.rollout_correction); a NaN stays NaN (tl.minimum may drop it)."""
    r = tl.exp(log_ratio)
    return tl.where(r > cap, cap, r)


@triton.jit
def grpo_token_terms(
    logp,
    ref_logp,
    log_ratio,
    adv,
    pg_grad_scale,
    kl_row_mean,
    pg_weight,
    beta,
    eps_low,
    eps_high,
    dual_clip,
    HAS_REF: tl.constexpr,
    KL_IN_LOSS: tl.constexpr,
    KL: tl.constexpr,
    DUAL_CLIP: tl.constexpr,
    SERIES: tl.constexpr,
    KL_WEIGHTED: tl.constexpr,
    SEQUENCE: tl.constexpr,
):
    """Token loss l = pg + beta * KL and d l / d logp, per unit of mask weight and of loss-type row coefficient.

    log_ratio: token level, logp - old_logp; sequence level (GSPO), the completion's masked mean log-ratio (the same
    for all its tokens). pg_grad_scale: 1 at token level; W / max(W, 1) at sequence level (W = the completion's mask
    sum), because the completion's W tokens all carry pg(s_b) and d log s_b / d logp_t = m_t / max(W, 1).
    The caller multiplies both returned terms by m_t * c_b (c_b = 1 / max(W, 1) for per-sequence loss types, else 1),
    sums, and divides by the loss type's denominator. HAS_REF: compute the KL (for the metric); KL_IN_LOSS: beta != 0,
    add it to the loss (kept apart so that beta = 0 never turns an infinite KL into NaN).
    KL_WEIGHTED (TRL's use_bias_correction_kl): the KL term is r * KL with r = ratio, differentiable and unclipped.
    Token level: d(rho_t KL_t)/dlogp_t = rho_t (dKL_t + KL_t). Sequence level: all of completion b's weighted KL
    moves with s_b (d s_b / d logp_u = s_b m_u / max(W, 1)), so token u gets s_b (dKL_u + kl_row_mean) with
    kl_row_mean = sum_t m_t KL_t / max(W, 1) of its completion (read only with SEQUENCE and KL_WEIGHTED).
    pg_weight: a constant factor of the policy term and its gradient, not of the KL (the rollout correction's
    truncated importance weight, as TRL applies it; 1 without one).

    Returns (loss, dloss_dlogp, ratio, kl, clipped_low, clipped_high, dual_clipped).
    """
    pg, dpg, ratio, low, high, dual = grpo_policy_term(log_ratio, adv, eps_low, eps_high, dual_clip, DUAL_CLIP)
    loss = pg * pg_weight
    dlogp = dpg * pg_grad_scale * pg_weight
    if HAS_REF:
        kl, dkl = grpo_kl_term(logp, ref_logp, KL, SERIES)
        if KL_WEIGHTED:
            if SEQUENCE:
                kl_bar = kl_row_mean
            else:
                kl_bar = kl
            dkl = ratio * (dkl + kl_bar)
            kl = ratio * kl
        if KL_IN_LOSS:
            loss = loss + beta * kl
            dlogp = dlogp + beta * dkl
    else:
        kl = tl.zeros_like(pg)
    return loss, dlogp, ratio, kl, low, high, dual


# --------------------------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------------------------


@triton.jit
def _grpo_row_stats_kernel(
    logp_ptr,
    old_ptr,
    ref_ptr,
    mask_ptr,
    roll_ptr,
    partial_ptr,  # (B, n_chunks, ROW_STATS) out: the ROW_STATS sums of this chunk
    T,
    n_chunks,
    s_logp_b,
    s_logp_t,
    s_old_b,
    s_old_t,
    s_ref_b,
    s_ref_t,
    s_mask_b,
    s_mask_t,
    s_roll_b,
    s_roll_t,
    HAS_OLD: tl.constexpr,
    SEQUENCE: tl.constexpr,
    ROLLOUT_SUM: tl.constexpr,
    KL_SUM: tl.constexpr,
    KL: tl.constexpr,
    SERIES: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    row = pid // n_chunks
    t = (pid % n_chunks) * BLOCK_T + tl.arange(0, BLOCK_T)
    w = tl.load(mask_ptr + row * s_mask_b + t * s_mask_t, mask=t < T, other=0).to(ACC)
    active = w != 0
    out = partial_ptr + pid * C_ROW_STATS
    tl.store(out, tl.sum(w, axis=0))
    if SEQUENCE:
        logp = tl.load(logp_ptr + row * s_logp_b + t * s_logp_t, mask=active, other=0.0).to(ACC)
        if HAS_OLD:
            old = tl.load(old_ptr + row * s_old_b + t * s_old_t, mask=active, other=0.0).to(ACC)
        else:
            old = logp  # on-policy: old = logp.detach(), log-ratio 0 (NaN stays NaN, as in the reference)
        tl.store(out + 1, tl.sum(tl.where(active, w * (logp - old), 0.0), axis=0))
        if KL_SUM:  # GSPO with a ratio-weighted KL: the completion's KL moves with s_b (grpo_token_terms)
            ref = tl.load(ref_ptr + row * s_ref_b + t * s_ref_t, mask=active, other=0.0).to(ACC)
            kl, _ = grpo_kl_term(logp, ref, KL, SERIES)
            tl.store(out + 2, tl.sum(tl.where(active, w * kl, 0.0), axis=0))
        else:
            tl.store(out + 2, tl.sum(w * 0.0, axis=0))
    else:
        tl.store(out + 1, tl.sum(w * 0.0, axis=0))
        tl.store(out + 2, tl.sum(w * 0.0, axis=0))
    if ROLLOUT_SUM:  # sequence_truncate: the completion's masked sum of old - rollout (TRL sums, GSPO averages)
        roll = tl.load(roll_ptr + row * s_roll_b + t * s_roll_t, mask=active, other=0.0).to(ACC)
        if HAS_OLD:
            behaviour = tl.load(old_ptr + row * s_old_b + t * s_old_t, mask=active, other=0.0).to(ACC)
        else:
            behaviour = tl.load(logp_ptr + row * s_logp_b + t * s_logp_t, mask=active, other=0.0).to(ACC)
        tl.store(out + 3, tl.sum(tl.where(active, w * (behaviour - roll), 0.0), axis=0))
    else:
        tl.store(out + 3, tl.sum(w * 0.0, axis=0))


@triton.jit
def _grpo_loss_fwd_kernel(
    logp_ptr,
    old_ptr,
    ref_ptr,
    mask_ptr,
    adv_ptr,
    ent_ptr,
    roll_ptr,  # (B, T) the rollout engine's log-probs (read with ROLLOUT == token)
    row_stats_ptr,  # (B, ROW_STATS) the pre-pass sums, read when ROW_NORM, SEQUENCE or ROLLOUT == sequence
    dlogp_ptr,  # (B, T) contiguous fp32/fp64 out: m_t * c_b * d l_t / d logp_t
    partial_ptr,  # (programs, N_STATS) out
    T,
    n_chunks,
    s_logp_b,
    s_logp_t,
    s_old_b,
    s_old_t,
    s_ref_b,
    s_ref_t,
    s_mask_b,
    s_mask_t,
    s_ent_b,
    s_ent_t,
    s_roll_b,
    s_roll_t,
    s_adv,
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
    WRITE_GRAD: tl.constexpr,
    SERIES: tl.constexpr,
    ACC: tl.constexpr,
    N_STATS_: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    row = pid // n_chunks
    t = (pid % n_chunks) * BLOCK_T + tl.arange(0, BLOCK_T)
    w = tl.load(mask_ptr + row * s_mask_b + t * s_mask_t, mask=t < T, other=0).to(ACC)
    active = w != 0
    # Padding is never loaded: it may hold garbage, NaN or -inf, none of which may reach the loss or the gradient.
    logp = tl.load(logp_ptr + row * s_logp_b + t * s_logp_t, mask=active, other=0.0).to(ACC)
    adv = tl.load(adv_ptr + row * s_adv).to(ACC)
    if HAS_REF:
        ref = tl.load(ref_ptr + row * s_ref_b + t * s_ref_t, mask=active, other=0.0).to(ACC)
    else:
        ref = logp

    one = tl.full([], 1.0, ACC)
    if ROW_NORM or SEQUENCE:
        n_row = tl.load(row_stats_ptr + row * C_ROW_STATS).to(ACC)
        n_row_clamped = tl.maximum(n_row, one)
    kl_row_mean = one * 0.0
    if SEQUENCE:
        seq_log_ratio = tl.load(row_stats_ptr + row * C_ROW_STATS + 1).to(ACC) / n_row_clamped
        log_ratio = tl.zeros([BLOCK_T], ACC) + seq_log_ratio
        pg_grad_scale = n_row / n_row_clamped
        if KL_WEIGHTED:
            kl_row_mean = tl.load(row_stats_ptr + row * C_ROW_STATS + 2).to(ACC) / n_row_clamped
    else:
        if HAS_OLD:
            old = tl.load(old_ptr + row * s_old_b + t * s_old_t, mask=active, other=0.0).to(ACC)
        else:
            old = logp
        log_ratio = logp - old
        pg_grad_scale = one
    # the rollout correction's truncated weight (old = old_logp, else logp: the detached current log-probs)
    if ROLLOUT == C_ROLLOUT_TOKEN:
        roll = tl.load(roll_ptr + row * s_roll_b + t * s_roll_t, mask=active, other=0.0).to(ACC)
        if HAS_OLD:
            behaviour = tl.load(old_ptr + row * s_old_b + t * s_old_t, mask=active, other=0.0).to(ACC)
        else:
            behaviour = logp
        pg_weight = rollout_weight(behaviour - roll, rollout_cap)
    elif ROLLOUT == C_ROLLOUT_SEQUENCE:
        row_log = tl.load(row_stats_ptr + row * C_ROW_STATS + 3).to(ACC)
        pg_weight = tl.zeros([BLOCK_T], ACC) + rollout_weight(row_log, rollout_cap)
    else:
        pg_weight = one

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
        coef = w / n_row_clamped
    else:
        coef = w

    if WRITE_GRAD:
        tl.store(dlogp_ptr + row * T + t, tl.where(active, coef * dlogp, 0.0), mask=t < T)

    zero = tl.zeros([BLOCK_T], ACC)
    out = partial_ptr + pid * N_STATS_
    # one column per STAT_* constant (rlvr_fast.ops.constants, wrapped as constexpr in kernels.grpo_loss)
    tl.store(out + C_STAT_LOSS, tl.sum(tl.where(active, coef * loss, zero), axis=0))
    tl.store(out + C_STAT_KL, tl.sum(tl.where(active, w * kl, zero), axis=0))
    tl.store(out + C_STAT_RATIO, tl.sum(tl.where(active, w * ratio, zero), axis=0))
    if HAS_ENTROPY:
        ent = tl.load(ent_ptr + row * s_ent_b + t * s_ent_t, mask=active, other=0.0).to(ACC)
        tl.store(out + C_STAT_ENTROPY, tl.sum(tl.where(active, w * ent, zero), axis=0))
    else:
        tl.store(out + C_STAT_ENTROPY, tl.sum(zero, axis=0))
    tl.store(out + C_STAT_CLIP_LOW, tl.sum(tl.where(active & low, w, zero), axis=0))
    tl.store(out + C_STAT_CLIP_HIGH, tl.sum(tl.where(active & high, w, zero), axis=0))
    tl.store(out + C_STAT_DUAL_CLIP, tl.sum(tl.where(active & dual, w, zero), axis=0))
    tokens = tl.sum(w, axis=0)
    tl.store(out + C_STAT_TOKENS, tokens)
    # With no KL in the loss, a completion with A == 0 has an identically zero gradient (the fused-linear path skips
    # its LM-head work; here it is only counted). STAT_SKIPPED.
    if KL_IN_LOSS:
        tl.store(out + C_STAT_SKIPPED, tokens * 0.0)
    else:
        tl.store(out + C_STAT_SKIPPED, tl.where(adv == 0.0, tokens, tokens * 0.0))


# --------------------------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------------------------


class GrpoLayout(NamedTuple):
    block_t: int
    n_chunks: int
    grid: tuple[int]


def grpo_layout(n_rows: int, n_tokens: int, *, interpreted: bool, block_t: int | None = None) -> GrpoLayout:
    """Programs for a (n_rows, n_tokens) batch: one per (row, BLOCK_T-chunk), all in grid dimension 0.

    Grid dimension 0 holds 2**31 - 1 programs: at BLOCK_T = 1024 that is 2.2e12 tokens, so no batch reaches it, while
    dimensions 1 and 2 (65,535) are never used (Liger PR #1294 put L there). ``block_t`` (a power of 2) overrides the
    choice, e.g. to force several chunks per row in tests.
    """
    if block_t is None:
        cap = _MAX_BLOCK_T_INTERPRETED if interpreted else _MAX_BLOCK_T
        block_t = max(16, min(cap, triton.next_power_of_2(max(n_tokens, 1))))
        if not interpreted:  # small batches: narrower programs, so that more of the GPU's SMs get one
            while block_t > _MIN_BLOCK_T and n_rows * triton.cdiv(n_tokens, block_t) < _TARGET_PROGRAMS:
                block_t //= 2
    n_chunks = triton.cdiv(n_tokens, block_t)
    return GrpoLayout(block_t, n_chunks, (n_rows * n_chunks,))


def _acc_dtype(dtype: torch.dtype):
    return _TL_ACC[accumulation_dtype(dtype)]


def grpo_row_stats(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    mask: torch.Tensor,
    *,
    sequence: bool,
    layout: GrpoLayout,
    ref_logp: torch.Tensor | None = None,
    kl: int = KL_K3,
    rollout_logp: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, ROW_STATS) per completion: [sum_t m, sum_t m (logp - old), sum_t m KL_t, sum_t m (old - rollout)]; the
    second column is 0 unless ``sequence``, the third unless ``sequence`` and ``ref_logp`` is given (GSPO with a
    ratio-weighted KL), the fourth unless ``rollout_logp`` is given (sequence_truncate; old = logp without old_logp)."""
    B, T = logp.shape
    acc = accumulation_dtype(logp.dtype)
    partial = torch.empty(B, layout.n_chunks, ROW_STATS, dtype=acc, device=logp.device)
    old = old_logp if old_logp is not None else logp
    ref = ref_logp if ref_logp is not None else logp
    roll = rollout_logp if rollout_logp is not None else logp
    KernelLaunch(
        _grpo_row_stats_kernel,
        layout.grid,
        (
            logp,
            old,
            ref,
            mask,
            roll,
            partial,
            T,
            layout.n_chunks,
            *logp.stride(),
            *old.stride(),
            *ref.stride(),
            *mask.stride(),
            *roll.stride(),
        ),
        dict(
            HAS_OLD=old_logp is not None,
            SEQUENCE=sequence,
            ROLLOUT_SUM=rollout_logp is not None,
            KL_SUM=sequence and ref_logp is not None,
            KL=kl,
            SERIES=logp.dtype != torch.float64,
            ACC=_acc_dtype(logp.dtype),
            BLOCK_T=layout.block_t,
        ),
        num_warps=4,
    ).launch()
    # Summing the chunks in a fixed order keeps the result bitwise reproducible (atomics would not).
    return partial[:, 0] if layout.n_chunks == 1 else partial.sum(dim=1)


class GrpoFwdOutputs(NamedTuple):
    partials: torch.Tensor  # (programs, N_STATS)
    dlogp: torch.Tensor | None  # (B, T) contiguous, m * c_b * dl/dlogp, before the denominator and grad_output


def grpo_loss_fwd(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    entropy: torch.Tensor | None,
    *,
    beta: float,
    eps_low: float,
    eps_high: float,
    dual_clip: float | None,
    kl: int,
    sequence: bool,
    row_norm: bool,
    write_grad: bool,
    kl_weighted: bool = False,
    rollout_logp: torch.Tensor | None = None,
    rollout: int = ROLLOUT_OFF,
    rollout_cap: float = 1.0,
    dlogp_out: torch.Tensor | None = None,
    block_t: int | None = None,
) -> GrpoFwdOutputs:
    """Launch the row pre-pass (when grpo's per-sequence mean or GSPO needs it) and the main pass.

    logp / old / ref / mask / entropy: (B, T), any strides; advantages: (B,); B, T >= 1. ``dlogp_out`` may supply the
    gradient buffer ((B, T) contiguous, fp32, or fp64 for fp64 logp), e.g. a poisoned one in tests; ``block_t``
    overrides the tokens per program (see ``grpo_layout``). ``kl_weighted``: the KL term times the importance ratio
    (needs ``ref_logp``; ``grpo_token_terms``). ``rollout`` (a ROLLOUT_* code) with ``rollout_logp`` (B, T) and
    ``rollout_cap``: the rollout correction's truncated weight on the policy term (``rollout_weight``).
    """
    if kl_weighted and ref_logp is None:
        raise ValueError("grpo_loss_fwd: kl_weighted=True needs ref_logp, got None")
    if (rollout != ROLLOUT_OFF) != (rollout_logp is not None):
        raise ValueError(f"grpo_loss_fwd: rollout={rollout} and rollout_logp must be given together")
    B, T = logp.shape
    layout = grpo_layout(B, T, interpreted=logp.device.type == "cpu", block_t=block_t)
    acc = accumulation_dtype(logp.dtype)
    row_stats = None
    rollout_sum = rollout == ROLLOUT_SEQUENCE
    if row_norm or sequence or rollout_sum:
        kl_ref = ref_logp if (sequence and kl_weighted) else None
        row_stats = grpo_row_stats(
            logp,
            old_logp,
            mask,
            sequence=sequence,
            layout=layout,
            ref_logp=kl_ref,
            kl=kl,
            rollout_logp=rollout_logp if rollout_sum else None,
        )
    partials = torch.empty(layout.grid[0], N_STATS, dtype=acc, device=logp.device)
    dlogp = None
    if write_grad:
        dlogp = dlogp_out if dlogp_out is not None else torch.empty(B, T, dtype=acc, device=logp.device)
    dummy = partials  # never read: its constexpr switch is off
    old = old_logp if old_logp is not None else logp
    ref = ref_logp if ref_logp is not None else logp
    ent = entropy if entropy is not None else logp
    roll = rollout_logp if rollout_logp is not None else logp
    KernelLaunch(
        _grpo_loss_fwd_kernel,
        layout.grid,
        (
            logp,
            old,
            ref,
            mask,
            advantages,
            ent,
            roll,
            row_stats if row_stats is not None else dummy,
            dlogp if dlogp is not None else dummy,
            partials,
            T,
            layout.n_chunks,
            *logp.stride(),
            *old.stride(),
            *ref.stride(),
            *mask.stride(),
            *ent.stride(),
            *roll.stride(),
            advantages.stride(0),
            float(beta),
            float(eps_low),
            float(eps_high),
            float(dual_clip) if dual_clip is not None else 0.0,
            float(rollout_cap),
        ),
        dict(
            HAS_OLD=old_logp is not None,
            HAS_REF=ref_logp is not None,
            KL_IN_LOSS=beta != 0.0,
            HAS_ENTROPY=entropy is not None,
            KL=kl,
            SEQUENCE=sequence,
            ROW_NORM=row_norm,
            DUAL_CLIP=dual_clip is not None,
            KL_WEIGHTED=kl_weighted,
            ROLLOUT=rollout,
            WRITE_GRAD=write_grad,
            SERIES=logp.dtype != torch.float64,
            ACC=_acc_dtype(logp.dtype),
            N_STATS_=N_STATS,
            BLOCK_T=layout.block_t,
        ),
        num_warps=4,
    ).launch()
    return GrpoFwdOutputs(partials, dlogp)
