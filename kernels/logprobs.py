"""Triton kernels of the fused log-prob gather (docs/design.md §3) and their launchers.

From hidden states (``token_logprobs``), z = (hidden @ weight^T + bias) * inv_t is never stored:

- forward: ``_token_logprobs_fwd_kernel`` multiplies a (BLOCK_N, D) tile of hidden against (BLOCK_V, D) tiles of the
  weight and folds every logit tile, still in registers, into per-row online statistics: the running max m, the sum
  s = sum_v exp(z_v - m), the entropy accumulator a = sum_v exp(z_v - m) (z_v - m) (kept relative to m, so |z| ~ 1e4
  loses nothing to cancellation) and the target logit, picked up in the same pass. The vocabulary is split over a
  second grid axis so that a few token blocks still fill the GPU; ``_token_logprobs_combine_kernel`` merges the
  O(splits * N) partials into logp, entropy and lse. Only lse and entropy (O(N)) are kept for the backward.
- backward: ``_token_logprobs_dlogits_kernel`` recomputes the logit tiles of one vocabulary chunk and writes
  dz = dlogp (1[v = t] - p_v) + dH p_v (E_p[z] - z_v), times inv_t, into an (N, chunk) buffer in the GEMM dtype; the
  two gradient GEMMs of that chunk (dhidden += dz @ W_c, dweight_c = dz^T @ hidden) run in cuBLAS with fp32
  accumulation. Nothing of size (N, V) is allocated.

From materialised logits (``logprobs_from_logits``): one program per row reads the row once with the same online
statistics; the backward writes dlogits directly (the only (N, V) buffer is the gradient itself).

All arithmetic is in fp32 (fp64 for fp64 inputs); offsets that can pass 2**31 are int64. Under the interpreter
(TRITON_INTERPRET=1) dot operands are upcast to the accumulator dtype first (bf16 dots are wrong there) and a single
small tile config is used (autotuning with several configs does not run interpreted).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from rlvr_fast.kernels.launch_plan import KernelLaunch

from rlvr_fast.ops.checks import accumulation_dtype

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Vocabulary splits of the forward are whole multiples of this many columns (a multiple of every BLOCK_V below).
_SPLIT_GRANULE = 64 if _INTERPRET else 256
# Programs the forward aims for, per SM: enough waves that the last, partial one costs little.
_PROGRAMS_PER_SM = 8
# Below this many multiply-adds (N * V * D) a fixed tile config is launched instead of autotuning: tuning a small
# problem costs more than it can win, and every distinct shape key would pay it again.
_AUTOTUNE_MIN_MACS = 1 << 34
# Budget of the backward's (N, chunk) dlogits buffer, in elements: 16M elements = 32 MiB in bf16, 1.3% of the bf16
# logits at N = 8192, V = 151936 (2048-column chunks). The chunk stays within [1024, 8192] columns so the two GEMMs
# stay efficient. The backward's other transient buffers: the fp32 dhidden accumulator (N x D x 4 bytes, 2D/V of the
# bf16 logits) and, for half-precision weights, one fp32 chunk of dweight (chunk x D x 4 bytes).
_DZ_BUFFER_ELEMENTS = 1 << 24
_MIN_DZ_CHUNK = 1024
# logits-input kernels: columns per loop step (TRL's near-floor choice). Combine kernel: rows per program, and the
# most partials one program holds (many splits, e.g. for N = 1, mean fewer rows per program). The combine keeps six
# (splits, rows) tiles live: 1024 elements over 4 warps is 8 per thread per tile, no spill; 8192 spilled ~10 KB and
# 2048 a few bytes on sm_80 (kernels/check/aot_compile.py).
_ROW_BLOCK_V = 1024
_COMBINE_ROWS = 128
_COMBINE_TILE = 1024


# (BLOCK_N, BLOCK_V, BLOCK_D, num_warps, num_stages) raced by the autotuner on the GPU. Half-precision inputs
# (tensor-core dots): the largest tile without register spills on sm_80 and sm_90 has the best arithmetic intensity;
# 128 x 256 (8 warps) spills 150-270 bytes per thread in the online-softmax epilogue and 128 x 128 with 4 warps holds
# 128 accumulators per thread, so neither is raced (kernels/check/aot_compile.py compiles every config for both).
GPU_TILES = [(128, 128, 64, 8, 3), (64, 256, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 4)]
# fp32 / fp64 inputs multiply exactly ("ieee": FMA dots, no tensor cores), which keeps operand fragments in registers
# too: smaller tiles, shallower pipelines (fp32 128 x 256 x 64 in 3 stages needs 192 KiB of shared memory, over sm_80's
# 163 KiB, and spilled 2.7 KB per thread).
GPU_TILES_EXACT = [(64, 64, 32, 4, 2), (64, 128, 32, 8, 2), (128, 64, 32, 8, 2)]
# The one tile of small problems (and of the interpreter, where autotuning with several configs does not run).
SMALL_TILE = (32, 64, 32, 4, 1) if _INTERPRET else (64, 64, 32, 4, 3)


def _config(tile) -> triton.Config:
    bn, bv, bd, w, s = tile
    return triton.Config({"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_D": bd}, num_warps=w, num_stages=s)


def _matmul_configs(tiles) -> list[triton.Config]:
    return [_config(SMALL_TILE)] if _INTERPRET else [_config(t) for t in tiles]


def _exact_dots(dtype: torch.dtype) -> bool:
    """fp32 / fp64 operands multiply exactly (FMA dots, GPU_TILES_EXACT); half types on tensor cores (GPU_TILES)."""
    return dtype in (torch.float32, torch.float64)


_ACC_DTYPES = {torch.float64: tl.float64}  # everything else accumulates in fp32


@triton.jit
def _logit_tile(
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    rows,
    row_ok,
    cols,
    col_ok,
    D,
    stride_h,
    stride_w,
    inv_t,
    HAS_BIAS: tl.constexpr,
    ACC: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """(BLOCK_N, BLOCK_V) tile of (hidden @ weight^T + bias) * inv_t, accumulated in ACC."""
    offs_d = tl.arange(0, BLOCK_D)
    h_ptrs = hidden_ptr + rows.to(tl.int64)[:, None] * stride_h + offs_d[None, :]
    w_ptrs = weight_ptr + cols.to(tl.int64)[:, None] * stride_w + offs_d[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=ACC)
    for k in range(0, D, BLOCK_D):
        d_ok = (k + offs_d) < D
        h = tl.load(h_ptrs + k, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        w = tl.load(w_ptrs + k, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            h = h.to(ACC)
            w = w.to(ACC)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=PRECISION, out_dtype=ACC)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
    return acc * inv_t


@triton.jit
def online_fold(z, valid, m, s, a, HAS_ENTROPY: tl.constexpr, AXIS: tl.constexpr):
    """Fold a tile of logits z (invalid entries ignored) into the running (max m, sum s, entropy accumulator a).

    s = sum exp(z - m) and a = sum exp(z - m) (z - m) are relative to the running max; when the max moves from m to
    m', a' = exp(m - m') (a + (m - m') s). Before the first tile s == 0 (after it s >= 1), which guards the -inf * 0.
    """
    z = tl.where(valid, z, -float("inf"))
    m_new = tl.maximum(m, tl.max(z, axis=AXIS))
    alpha = tl.exp(m - m_new)
    if AXIS == 1:
        zr = z - m_new[:, None]
    else:
        zr = z - m_new
    e = tl.exp(zr)
    if HAS_ENTROPY:
        # where() before the products: no -inf * 0 is ever formed, even in lanes that are discarded
        shift = tl.where(s > 0, m - m_new, 0.0) * s
        a = alpha * (a + shift) + tl.sum(e * tl.where(valid, zr, 0.0), axis=AXIS)
    s = alpha * s + tl.sum(e, axis=AXIS)
    return m_new, s, a


# --------------------------------------------------------------------------------------------------------------------
# token_logprobs: forward
# --------------------------------------------------------------------------------------------------------------------


# Sizes that only feed masks are not specialised on (divisibility by 16): N changes every step, and each new
# specialisation is another compile.
@triton.jit(do_not_specialize=["N", "vocab_per_split", "n_splits"])
def _token_logprobs_fwd_kernel(
    hidden_ptr,  # (N, D), row stride stride_h
    weight_ptr,  # (V, D), row stride stride_w
    bias_ptr,  # (V,) or a dummy
    targets_ptr,  # (N,) int, every one in [0, V)
    part_ptr,  # (4, SPLITS, N) ACC out: running max, sum, entropy accumulator, target logit
    N,
    V,
    D,
    stride_h,
    stride_w,
    inv_t,
    vocab_per_split,
    n_splits,
    HAS_BIAS: tl.constexpr,
    HAS_ENTROPY: tl.constexpr,
    ACC: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    tgt = tl.load(targets_ptr + rows, mask=row_ok, other=-1)

    m = tl.full((BLOCK_N,), -float("inf"), dtype=ACC)
    s = tl.zeros((BLOCK_N,), dtype=ACC)
    a = tl.zeros((BLOCK_N,), dtype=ACC)
    target_logit = tl.zeros((BLOCK_N,), dtype=ACC)
    v_start = split * vocab_per_split
    v_end = tl.minimum(v_start + vocab_per_split, V)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_end
        z = _logit_tile(
            hidden_ptr,
            weight_ptr,
            bias_ptr,
            rows,
            row_ok,
            cols,
            col_ok,
            D,
            stride_h,
            stride_w,
            inv_t,
            HAS_BIAS,
            ACC,
            UPCAST,
            PRECISION,
            BLOCK_N,
            BLOCK_V,
            BLOCK_D,
        )
        # The target's column lives in exactly one tile of one split; every other tile adds 0.
        hit = (cols[None, :] == tgt[:, None]) & col_ok[None, :]
        target_logit += tl.sum(tl.where(hit, z, 0.0), axis=1)
        m, s, a = online_fold(z, col_ok[None, :], m, s, a, HAS_ENTROPY, 1)

    plane = tl.full([], N, tl.int64) * n_splits  # int64: scalar arguments may arrive as int32 or constexpr
    out = part_ptr + split.to(tl.int64) * N + rows
    tl.store(out, m, mask=row_ok)
    tl.store(out + plane, s, mask=row_ok)
    if HAS_ENTROPY:
        tl.store(out + 2 * plane, a, mask=row_ok)
    tl.store(out + 3 * plane, target_logit, mask=row_ok)


@triton.jit(do_not_specialize=["N", "n_splits"])
def _token_logprobs_combine_kernel(
    part_ptr,  # (4, n_splits, N) ACC, as written by the forward kernel
    logp_ptr,  # (N,) ACC out
    entropy_ptr,  # (N,) ACC out (unused without HAS_ENTROPY)
    lse_ptr,  # (N,) ACC out
    N,
    n_splits,
    HAS_ENTROPY: tl.constexpr,
    SPLITS_P2: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < N
    splits = tl.arange(0, SPLITS_P2)
    ok = (splits[:, None] < n_splits) & row_ok[None, :]
    plane = tl.full([], N, tl.int64) * n_splits
    ptrs = part_ptr + splits.to(tl.int64)[:, None] * N + rows[None, :]
    m = tl.load(ptrs, mask=ok, other=-float("inf"))
    s = tl.load(ptrs + plane, mask=ok, other=0.0)
    target_logit = tl.sum(tl.load(ptrs + 3 * plane, mask=ok, other=0.0), axis=0)
    # rows past N hold no partials: give them a harmless max and sum instead of -inf and 0
    m_all = tl.where(row_ok, tl.max(m, axis=0), 0.0)
    dm = tl.where(ok, m - m_all[None, :], 0.0)
    w = tl.where(ok, tl.exp(dm), 0.0)
    s_all = tl.where(row_ok, tl.sum(w * s, axis=0), 1.0)
    log_s = tl.log(s_all)
    lse = m_all + log_s
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    # (target - max) first: both are logits as computed, their difference is exact when close, so logp keeps its own
    # precision at |z| ~ 1e4 instead of inheriting lse's rounding
    tl.store(logp_ptr + rows, (target_logit - m_all) - log_s, mask=row_ok)
    if HAS_ENTROPY:
        a = tl.load(ptrs + 2 * plane, mask=ok, other=0.0)
        a_all = tl.sum(w * (a + dm * s), axis=0)
        # entropy = lse - E_p[z] = log(s) - a / s: both terms relative to the max, no cancellation at |z| ~ 1e4
        tl.store(entropy_ptr + rows, log_s - a_all / s_all, mask=row_ok)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _default_splits(n: int, device: torch.device, sm_count: int | None = None) -> int:
    """Vocabulary splits so that about _PROGRAMS_PER_SM programs per SM run even for a few token blocks.

    ``sm_count`` overrides the device's SM count (the ahead-of-time check plans for GPUs it does not have).
    """
    if device.type != "cuda":
        return 1
    token_blocks = triton.cdiv(n, max(t[0] for t in GPU_TILES))
    return triton.cdiv(_PROGRAMS_PER_SM * (sm_count or _sm_count(device.index or 0)), token_blocks)


def split_plan(v: int, splits: int) -> tuple[int, int]:
    """(columns per split, number of splits): whole granules, every split non-empty, at most cdiv(V, granule)."""
    per_split = triton.cdiv(triton.cdiv(v, max(1, splits)), _SPLIT_GRANULE) * _SPLIT_GRANULE
    return per_split, triton.cdiv(v, per_split)


# Grids. Token blocks always ride axis 0 (up to 2**31 - 1 programs); the short axis 1 holds vocabulary splits or the
# tiles of one backward chunk (at most cdiv(V, 256) and cdiv(8192, BLOCK_V)), far below its 65535 limit.
def fwd_grid(n: int, n_splits: int):
    return lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), n_splits)


def dlogits_grid(n: int, width: int):
    return lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(width, meta["BLOCK_V"]))


def logits_fwd_grid(n: int) -> tuple[int]:
    return (n,)


def logits_bwd_grid(n: int, v: int, block_v: int) -> tuple[int, int]:
    return (n, triton.cdiv(v, block_v))


def _upcast_dots(device: torch.device) -> bool:
    return _INTERPRET or device.type != "cuda"


def _dot_precision(dtype: torch.dtype) -> str | None:
    """fp32 / fp64 operands multiply exactly (no TF32, like torch's default fp32 matmul); half types use the default."""
    return "ieee" if _exact_dots(dtype) else None


def _matmul_launch(raw, tuned, grid, macs: int, args: tuple, constexprs: dict) -> KernelLaunch:
    """The autotuned kernel for large problems on the GPU; the fixed SMALL_TILE otherwise."""
    if _INTERPRET or macs < _AUTOTUNE_MIN_MACS:
        cfg = _config(SMALL_TILE)
        return KernelLaunch(
            raw,
            grid(cfg.kwargs),
            args,
            {**constexprs, **cfg.kwargs},
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )
    return KernelLaunch(raw, grid, args, constexprs, autotuner=tuned)


# one autotuner per dot kind (keyed by _exact_dots), each racing its own tile list
_fwd_tuned = {
    exact: triton.autotune(
        configs=_matmul_configs(GPU_TILES_EXACT if exact else GPU_TILES), key=["V", "D", "HAS_ENTROPY"]
    )(_token_logprobs_fwd_kernel)
    for exact in (False, True)
}


def token_logprobs_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    inv_t: float,
    *,
    with_entropy: bool,
    splits: int | None = None,
    empty=torch.empty,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """logp, entropy (None unless ``with_entropy``) and lse, each (N,) in the accumulator dtype.

    hidden (N, D) and weight (V, D) of one floating dtype with unit column stride; bias (V,) or None; targets (N,)
    int in [0, V) (no ignore_index here: the op drops those rows first); N >= 1. ``splits`` overrides the number of
    vocabulary splits (tests use it to cover the merge); ``empty(shape, dtype=, device=)`` allocates every buffer.
    """
    n, d = hidden.shape
    v = weight.shape[0]
    acc = accumulation_dtype(hidden.dtype)
    per_split, n_splits = split_plan(v, splits or _default_splits(n, hidden.device))
    part = empty((4, n_splits, n), dtype=acc, device=hidden.device)
    _matmul_launch(
        _token_logprobs_fwd_kernel,
        _fwd_tuned[_exact_dots(hidden.dtype)],
        fwd_grid(n, n_splits),
        n * v * d,
        (
            hidden,
            weight,
            bias if bias is not None else hidden,
            targets,
            part,
            n,
            v,
            d,
            hidden.stride(0),
            weight.stride(0),
            inv_t,
            per_split,
            n_splits,
        ),
        dict(
            HAS_BIAS=bias is not None,
            HAS_ENTROPY=with_entropy,
            ACC=_ACC_DTYPES.get(acc, tl.float32),
            UPCAST=_upcast_dots(hidden.device),
            PRECISION=_dot_precision(hidden.dtype),
        ),
    ).launch()
    logp = empty((n,), dtype=acc, device=hidden.device)
    entropy = empty((n,), dtype=acc, device=hidden.device) if with_entropy else None
    lse = empty((n,), dtype=acc, device=hidden.device)
    splits_p2 = triton.next_power_of_2(n_splits)
    # a (splits, rows) tile of at most _COMBINE_TILE elements
    rows = max(1, min(_COMBINE_ROWS, _COMBINE_TILE // splits_p2))
    KernelLaunch(
        _token_logprobs_combine_kernel,
        (triton.cdiv(n, rows),),
        (
            part,
            logp,
            entropy if entropy is not None else logp,
            lse,
            n,
            n_splits,
        ),
        dict(
            HAS_ENTROPY=with_entropy,
            SPLITS_P2=splits_p2,
            BLOCK_R=rows,
        ),
    ).launch()
    return logp, entropy, lse


# --------------------------------------------------------------------------------------------------------------------
# token_logprobs: backward
# --------------------------------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["N", "v_begin", "v_count"])
def _token_logprobs_dlogits_kernel(
    hidden_ptr,  # (N, D)
    weight_ptr,  # (V, D)
    bias_ptr,  # (V,) or a dummy
    targets_ptr,  # (N,) int
    lse_ptr,  # (N,) ACC
    entropy_ptr,  # (N,) ACC (read only with HAS_G_ENT)
    g_logp_ptr,  # (N,) ACC, already times inv_t (read only with HAS_G_LOGP)
    g_ent_ptr,  # (N,) ACC, already times inv_t (read only with HAS_G_ENT)
    dz_ptr,  # (N, chunk) out, the GEMM dtype, row stride stride_dz
    N,
    D,
    v_begin,
    v_count,
    stride_h,
    stride_w,
    stride_dz,
    inv_t,
    HAS_BIAS: tl.constexpr,
    HAS_G_LOGP: tl.constexpr,
    HAS_G_ENT: tl.constexpr,
    ACC: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    local = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < N
    col_ok = local < v_count
    cols = v_begin + local
    z = _logit_tile(
        hidden_ptr,
        weight_ptr,
        bias_ptr,
        rows,
        row_ok,
        cols,
        col_ok,
        D,
        stride_h,
        stride_w,
        inv_t,
        HAS_BIAS,
        ACC,
        UPCAST,
        PRECISION,
        BLOCK_N,
        BLOCK_V,
        BLOCK_D,
    )
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    logp = z - lse[:, None]
    p = tl.exp(logp)
    dz = tl.zeros((BLOCK_N, BLOCK_V), dtype=ACC)
    if HAS_G_LOGP:
        # d logp_t / dz_v = 1[v = t] - p_v
        g = tl.load(g_logp_ptr + rows, mask=row_ok, other=0.0)
        tgt = tl.load(targets_ptr + rows, mask=row_ok, other=-1)
        dz += tl.where(cols[None, :] == tgt[:, None], g[:, None], 0.0) - p * g[:, None]
    if HAS_G_ENT:
        # d H / dz_v = p_v (E_p[z] - z_v) = -p_v (logp_v + H)
        g_e = tl.load(g_ent_ptr + rows, mask=row_ok, other=0.0)
        h_ent = tl.load(entropy_ptr + rows, mask=row_ok, other=0.0)
        dz -= p * (g_e[:, None] * (logp + h_ent[:, None]))
    out = dz_ptr + rows.to(tl.int64)[:, None] * stride_dz + local[None, :]
    tl.store(out, dz.to(dz_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


# Keyed on D (and the dtypes) only: N changes every step and the chunk width with it, a retune each time would cost
# more than it gains.
_dlogits_tuned = {
    exact: triton.autotune(configs=_matmul_configs(GPU_TILES_EXACT if exact else GPU_TILES), key=["D", "HAS_G_ENT"])(
        _token_logprobs_dlogits_kernel
    )
    for exact in (False, True)
}


def _dz_chunk(n: int, v: int) -> int:
    """Columns per backward chunk: a power of two within [_MIN_DZ_CHUNK, 8192] fitting the buffer budget."""
    fit = max(_DZ_BUFFER_ELEMENTS // max(n, 1), 1)
    return min(v, max(_MIN_DZ_CHUNK, min(8192, 1 << (fit.bit_length() - 1))))


# torch.addmm(..., out_dtype=torch.float32) from half-precision operands: CUDA, torch >= 2.8
_HAS_MM_OUT_DTYPE = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 8)


def addmm_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, beta: float) -> None:
    """acc = beta * acc + a @ b with ``acc`` fp32/fp64 and the product accumulated in it, never rounded to a's dtype.

    cuBLAS takes half-precision operands with an fp32 output directly (no reduced-precision split-K); elsewhere the
    operands are upcast (the CPU runs this only under the interpreter, in tests).
    """
    if acc.device.type == "cuda" and a.dtype in (torch.float16, torch.bfloat16) and _HAS_MM_OUT_DTYPE:
        torch.addmm(acc, a, b, beta=beta, out_dtype=acc.dtype, out=acc)
    else:
        torch.addmm(acc, a.to(acc.dtype), b.to(acc.dtype), beta=beta, out=acc)


def token_logprobs_bwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor | None,
    g_logp: torch.Tensor | None,
    g_ent: torch.Tensor | None,
    inv_t: float,
    *,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
    chunk: int | None = None,
    empty=torch.empty,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients w.r.t. hidden, weight, bias (None where not needed), in their dtypes, accumulated in fp32.

    g_logp / g_ent: (N,) upstream gradients of logp / entropy, or None. The vocabulary is walked in chunks of
    ``chunk`` columns (default: a 16M-element dlogits buffer); per chunk, one kernel recomputes the logits and writes
    dz, then dhidden += dz @ W_c (fp32 accumulator) and dweight_c = dz^T @ hidden (one GEMM over all N, fp32 inside).
    """
    n, d = hidden.shape
    v = weight.shape[0]
    acc = accumulation_dtype(hidden.dtype)
    dev = hidden.device
    c = min(v, chunk or _dz_chunk(n, v))
    dz_buf = empty((n * c,), dtype=hidden.dtype, device=dev)
    gl = None if g_logp is None else (g_logp.to(acc) * inv_t).contiguous()
    ge = None if g_ent is None else (g_ent.to(acc) * inv_t).contiguous()
    # every accumulator is first written by a beta=0 GEMM (or an assignment), so none needs zeroing
    dh = empty((n, d), dtype=acc, device=dev) if need_hidden else None
    dw = empty(tuple(weight.shape), dtype=weight.dtype, device=dev) if need_weight else None
    dw_acc = empty((c, d), dtype=acc, device=dev) if need_weight and weight.dtype != acc else None
    db = empty((v,), dtype=acc, device=dev) if need_bias else None
    upcast = _upcast_dots(dev)
    for v0 in range(0, v, c):
        width = min(c, v - v0)
        dz = dz_buf[: n * width].view(n, width)
        _matmul_launch(
            _token_logprobs_dlogits_kernel,
            _dlogits_tuned[_exact_dots(hidden.dtype)],
            dlogits_grid(n, width),
            n * v * d,
            (
                hidden,
                weight,
                bias if bias is not None else hidden,
                targets,
                lse,
                entropy if entropy is not None else lse,
                gl if gl is not None else lse,
                ge if ge is not None else lse,
                dz,
                n,
                d,
                v0,
                width,
                hidden.stride(0),
                weight.stride(0),
                dz.stride(0),
                inv_t,
            ),
            dict(
                HAS_BIAS=bias is not None,
                HAS_G_LOGP=gl is not None,
                HAS_G_ENT=ge is not None,
                ACC=_ACC_DTYPES.get(acc, tl.float32),
                UPCAST=upcast,
                PRECISION=_dot_precision(hidden.dtype),
            ),
        ).launch()
        w_c = weight[v0 : v0 + width]
        if dh is not None:
            addmm_fp32(dh, dz, w_c, beta=0.0 if v0 == 0 else 1.0)
        if dw is not None:
            if dw_acc is None:  # fp32 / fp64 weight: the GEMM writes the output slice directly
                torch.mm(dz.t(), hidden, out=dw[v0 : v0 + width])
            else:
                target = dw_acc[:width]
                addmm_fp32(target, dz.t(), hidden, beta=0.0)
                dw[v0 : v0 + width].copy_(target)
        if db is not None:
            db[v0 : v0 + width] = dz.sum(dim=0, dtype=acc)
    return (
        None if dh is None else dh.to(hidden.dtype),
        dw,
        None if db is None else db.to(bias.dtype),
    )


# --------------------------------------------------------------------------------------------------------------------
# logprobs_from_logits: forward and backward on materialised logits
# --------------------------------------------------------------------------------------------------------------------


@triton.jit
def _logits_fwd_kernel(
    logits_ptr,  # (N, V), row stride stride_row, unit column stride
    targets_ptr,  # (N,) int, in [0, V) or ignore_index
    logp_ptr,  # (N,) ACC out
    entropy_ptr,  # (N,) ACC out (unused without HAS_ENTROPY)
    lse_ptr,  # (N,) ACC out
    V,
    stride_row,
    inv_t,
    ignore_index,
    HAS_ENTROPY: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    tgt = tl.load(targets_ptr + row)
    if tgt == ignore_index:
        # padding: logp = entropy = 0 without reading the row (a NaN there must not leak)
        tl.store(logp_ptr + row, 0.0)
        tl.store(lse_ptr + row, 0.0)
        if HAS_ENTROPY:
            tl.store(entropy_ptr + row, 0.0)
    else:
        base = logits_ptr + row * stride_row
        m = tl.full([], -float("inf"), dtype=ACC)
        s = tl.zeros([], dtype=ACC)
        a = tl.zeros([], dtype=ACC)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            ok = cols < V
            z = tl.load(base + cols, mask=ok, other=0.0).to(ACC) * inv_t
            m, s, a = online_fold(z, ok, m, s, a, HAS_ENTROPY, 0)
        log_s = tl.log(s)
        lse = m + log_s
        tl.store(lse_ptr + row, lse)
        tl.store(logp_ptr + row, (tl.load(base + tgt).to(ACC) * inv_t - m) - log_s)
        if HAS_ENTROPY:
            tl.store(entropy_ptr + row, log_s - a / s)


@triton.jit
def _logits_bwd_kernel(
    logits_ptr,  # (N, V), row stride stride_row
    targets_ptr,  # (N,) int
    lse_ptr,  # (N,) ACC
    entropy_ptr,  # (N,) ACC (read only with HAS_G_ENT)
    g_logp_ptr,  # (N,) ACC, already times inv_t
    g_ent_ptr,  # (N,) ACC, already times inv_t
    dlogits_ptr,  # (N, V) out, contiguous, the logits' dtype
    V,
    stride_row,
    inv_t,
    ignore_index,
    HAS_G_LOGP: tl.constexpr,
    HAS_G_ENT: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    ok = cols < V
    out = dlogits_ptr + row * V + cols
    tgt = tl.load(targets_ptr + row)
    if tgt == ignore_index:
        tl.store(out, tl.zeros((BLOCK_V,), dtype=dlogits_ptr.dtype.element_ty), mask=ok)
    else:
        z = tl.load(logits_ptr + row * stride_row + cols, mask=ok, other=0.0).to(ACC) * inv_t
        logp = z - tl.load(lse_ptr + row)
        p = tl.exp(logp)
        dz = tl.zeros((BLOCK_V,), dtype=ACC)
        if HAS_G_LOGP:
            g = tl.load(g_logp_ptr + row)
            dz += tl.where(cols == tgt, g, 0.0) - p * g
        if HAS_G_ENT:
            dz -= p * (tl.load(g_ent_ptr + row) * (logp + tl.load(entropy_ptr + row)))
        tl.store(out, dz.to(dlogits_ptr.dtype.element_ty), mask=ok)


def _row_block(v: int, block_v: int | None) -> int:
    return block_v or min(_ROW_BLOCK_V, triton.next_power_of_2(v))


def logprobs_from_logits_fwd(
    logits: torch.Tensor,
    targets: torch.Tensor,
    inv_t: float,
    ignore_index: int,
    *,
    with_entropy: bool,
    block_v: int | None = None,
    empty=torch.empty,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """logp, entropy (None unless ``with_entropy``), lse: (N,) in the accumulator dtype; 0 on ignored rows.

    logits (N, V) with unit column stride, N >= 1; targets (N,) int in [0, V) or ``ignore_index``.
    """
    n, v = logits.shape
    acc = accumulation_dtype(logits.dtype)
    logp = empty((n,), dtype=acc, device=logits.device)
    entropy = empty((n,), dtype=acc, device=logits.device) if with_entropy else None
    lse = empty((n,), dtype=acc, device=logits.device)
    KernelLaunch(
        _logits_fwd_kernel,
        logits_fwd_grid(n),
        (
            logits,
            targets,
            logp,
            entropy if entropy is not None else logp,
            lse,
            v,
            logits.stride(0),
            inv_t,
            ignore_index,
        ),
        dict(
            HAS_ENTROPY=with_entropy,
            ACC=_ACC_DTYPES.get(acc, tl.float32),
            BLOCK_V=_row_block(v, block_v),
        ),
    ).launch()
    return logp, entropy, lse


def logprobs_from_logits_bwd(
    logits: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor | None,
    g_logp: torch.Tensor | None,
    g_ent: torch.Tensor | None,
    inv_t: float,
    ignore_index: int,
    *,
    block_v: int | None = None,
    empty=torch.empty,
) -> torch.Tensor:
    """dlogits (N, V), contiguous, in the logits' dtype: the only (N, V) buffer of the backward."""
    n, v = logits.shape
    acc = accumulation_dtype(logits.dtype)
    dlogits = empty((n, v), dtype=logits.dtype, device=logits.device)
    gl = None if g_logp is None else (g_logp.to(acc) * inv_t).contiguous()
    ge = None if g_ent is None else (g_ent.to(acc) * inv_t).contiguous()
    block = _row_block(v, block_v)
    KernelLaunch(
        _logits_bwd_kernel,
        logits_bwd_grid(n, v, block),
        (
            logits,
            targets,
            lse,
            entropy if entropy is not None else lse,
            gl if gl is not None else lse,
            ge if ge is not None else lse,
            dlogits,
            v,
            logits.stride(0),
            inv_t,
            ignore_index,
        ),
        dict(
            HAS_G_LOGP=gl is not None,
            HAS_G_ENT=ge is not None,
            ACC=_ACC_DTYPES.get(acc, tl.float32),
            BLOCK_V=block,
        ),
    ).launch()
    return dlogits
