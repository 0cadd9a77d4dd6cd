"""Triton kernel: one AdamW step over the masked entries of many parameters, in ONE launch (multi-tensor).

What a launch covers ("a bucket": the parameters of one device and dtype, built by ``rlvr_fast.optim.sparse_adamw``):

- the flat compact state: ``exp_avg`` and ``exp_avg_sq`` float32 (E,), ``indices`` int32 (or int64) (E,).
  Segment s (one parameter) owns entries ``[entry_start[s], entry_start[s] + count[s])``; ``indices`` holds the flat
  (row-major) positions of its masked entries, ascending. ``entry_start`` is a multiple of ``entry_align`` (16) so
  the compact streams are aligned vectors. A dense segment (no mask) stores no indices: entry i is position i.
- a launch table rebuilt by the host each step (grads are new tensors after each backward, parameters without a grad
  are skipped, and the learning rate may change): int64 rows ``entry_start, count, grad address, param address, dense``,
  an int32 row ``first_tile`` (exclusive prefix sum of tiles per segment) and float32 rows of the per-segment
  AdamW coefficients (``HYPER_ROWS``). It travels host -> device as one small copy.

Each program owns one TILE (= BLOCK * ITERS entries) of one segment. It finds its segment by counting the segments
whose first tile is <= its program id: a vector compare over the small table, so no per-tile table exists and the
state stays exactly 12 bytes per masked entry (plus O(1) per parameter). Per entry it gathers the gradient and the
parameter at ``indices[e]``, updates the compact moments in place and scatters the parameter back; unmasked
positions are never read or written (their value is bit-identical, whatever their gradient holds).

Bytes moved per masked entry: index 4 + moments 16 (read + write) + gradient 4 + parameter 8 (read + write) = 32 for
fp32 (26 for bf16 parameters and gradients); dense segments skip the index: 28, as fused AdamW. The gathers touch
whole 32-byte sectors, so a uniformly random mask at density d really moves 20 d + 12 (1 - (1 - d)^8) bytes per
parameter for fp32 (see ``rlvr_fast.benchmark.cases.sparse_adamw``).

Arithmetic follows torch.optim.AdamW (``_multi_tensor_adamw``) operation by operation, in fp32:
    p <- p * (1 - lr * wd);  m <- lerp(m, g, 1 - beta1);  v <- v * beta2 + (1 - beta2) * g * g
    p <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
with IEEE sqrt and division (``sqrt_rn`` / ``div_rn``). bf16 parameters are loaded to fp32, updated once and rounded
to nearest-even on store (done with integer ops, so the compiled kernel and the interpreter agree bit for bit).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from rlvr_fast.kernels.launch_plan import KernelLaunch

# Rows of the launch table. int64: entry_start, count, grad address, param address, dense flag.
INT_ROWS = 5
ROW_ENTRY_START, ROW_COUNT, ROW_GRAD_ADDR, ROW_PARAM_ADDR, ROW_DENSE = (tl.constexpr(i) for i in range(INT_ROWS))
# float32: the per-segment coefficients of one AdamW step, computed on the host in float64 and rounded once, in the
# order of HYPER_FIELDS: decay = 1 - lr*wd, w1 = 1 - beta1, beta2, w2 = 1 - beta2, step_size = lr / (1 - beta1^t),
# bc2_sqrt = sqrt(1 - beta2^t), eps.
HYPER_FIELDS = ("decay", "w1", "beta2", "w2", "step_size", "bc2_sqrt", "eps")
HYPER_ROWS = len(HYPER_FIELDS)
HYPER_DECAY, HYPER_W1, HYPER_BETA2, HYPER_W2, HYPER_STEP_SIZE, HYPER_BC2_SQRT, HYPER_EPS = (
    tl.constexpr(i) for i in range(HYPER_ROWS)
)

BLOCK = 1024  # entries per inner iteration: 8 per thread with 4 warps keeps ~100 registers, several CTAs per SM
ITERS = 4  # inner iterations per program: amortises the segment lookup over 4096 entries
NUM_WARPS = 4
SEARCH = 1024  # segments compared per step of the lookup loop

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16}
SUPPORTED_PARAM_DTYPES = tuple(_TL_DTYPES)


@triton.jit
def _bf16_rne_bits(x):
    """fp32 -> bf16 rounded to nearest-even, as torch's ``.to(torch.bfloat16)`` (NaN -> 0x7FC0)."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    rounded = tl.where(x != x, 0x7FC0, rounded)
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _adamw_entries(
    p_ptr,
    g_ptr,
    pos,  # positions in the parameter / gradient (contiguous for dense segments, gathered otherwise)
    m_ptr,
    v_ptr,
    e,  # positions in the compact state
    ok,  # in-bounds lanes; ignored when MASKED is False (a full block: unmasked accesses vectorise)
    decay,
    w1,
    beta2,
    w2,
    step_size,
    bc2_sqrt,
    eps,
    PARAM_IS_BF16: tl.constexpr,
    MASKED: tl.constexpr,
):
    if MASKED:
        g = tl.load(g_ptr + pos, mask=ok, other=0.0).to(tl.float32)
        p = tl.load(p_ptr + pos, mask=ok, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + e, mask=ok, other=0.0)
        v = tl.load(v_ptr + e, mask=ok, other=0.0)
    else:
        g = tl.load(g_ptr + pos).to(tl.float32)
        p = tl.load(p_ptr + pos).to(tl.float32)
        m = tl.load(m_ptr + e)
        v = tl.load(v_ptr + e)
    p = p * decay  # decoupled weight decay (Loshchilov & Hutter), applied before the Adam step as torch does
    # torch.lerp's two-sided formula keeps the result exact at weight 0 and 1
    m = tl.where(w1 < 0.5, m + w1 * (g - m), g - (g - m) * (1.0 - w1))
    v = v * beta2 + w2 * (g * g)
    denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    p = p - step_size * tl.div_rn(m, denom)
    if PARAM_IS_BF16:
        p_out = _bf16_rne_bits(p)
    else:
        p_out = p
    if MASKED:
        tl.store(m_ptr + e, m, mask=ok)
        tl.store(v_ptr + e, v, mask=ok)
        tl.store(p_ptr + pos, p_out, mask=ok)
    else:
        tl.store(m_ptr + e, m)
        tl.store(v_ptr + e, v)
        tl.store(p_ptr + pos, p_out)


@triton.jit
def _sparse_adamw_kernel(
    itab_ptr,  # int64 (INT_ROWS, n_seg): entry_start, count, grad address, param address, dense flag
    first_tile_ptr,  # int32 (n_seg,): first program id of each segment (ascending)
    hyper_ptr,  # float32 (HYPER_ROWS, n_seg)
    idx_ptr,  # int32 / int64 (E,) flat positions of the masked entries
    m_ptr,  # float32 (E,) exp_avg, updated in place
    v_ptr,  # float32 (E,) exp_avg_sq, updated in place
    n_seg,
    DTYPE: tl.constexpr,  # parameter and gradient element type
    PARAM_IS_BF16: tl.constexpr,
    ALIGNED: tl.constexpr,  # every parameter / gradient address is 16-byte aligned (checked by the host)
    BLOCK: tl.constexpr,
    ITERS: tl.constexpr,
    SEARCH: tl.constexpr,
    ENTRY_ALIGN: tl.constexpr,
):
    pid = tl.program_id(0)
    # Segment lookup: seg = #(segments whose first tile <= pid) - 1.
    hits = tl.zeros([SEARCH], dtype=tl.int32)
    for start in range(0, n_seg, SEARCH):
        s = start + tl.arange(0, SEARCH)
        first = tl.load(first_tile_ptr + s, mask=s < n_seg, other=2147483647)
        hits += (first <= pid).to(tl.int32)
    seg = tl.sum(hits, axis=0) - 1

    entry_start = tl.multiple_of(tl.load(itab_ptr + ROW_ENTRY_START * n_seg + seg), ENTRY_ALIGN)
    count = tl.load(itab_ptr + ROW_COUNT * n_seg + seg)
    g_ptr = tl.load(itab_ptr + ROW_GRAD_ADDR * n_seg + seg).to(tl.pointer_type(DTYPE))
    p_ptr = tl.load(itab_ptr + ROW_PARAM_ADDR * n_seg + seg).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        g_ptr = tl.multiple_of(g_ptr, 16)
        p_ptr = tl.multiple_of(p_ptr, 16)
    dense = tl.load(itab_ptr + ROW_DENSE * n_seg + seg)
    first_tile = tl.load(first_tile_ptr + seg)
    decay = tl.load(hyper_ptr + HYPER_DECAY * n_seg + seg)
    w1 = tl.load(hyper_ptr + HYPER_W1 * n_seg + seg)
    beta2 = tl.load(hyper_ptr + HYPER_BETA2 * n_seg + seg)
    w2 = tl.load(hyper_ptr + HYPER_W2 * n_seg + seg)
    step_size = tl.load(hyper_ptr + HYPER_STEP_SIZE * n_seg + seg)
    bc2_sqrt = tl.load(hyper_ptr + HYPER_BC2_SQRT * n_seg + seg)
    eps = tl.load(hyper_ptr + HYPER_EPS * n_seg + seg)

    tile_start = (pid - first_tile).to(tl.int64) * (BLOCK * ITERS)  # int64: a parameter may exceed 2^31 entries
    for it in range(ITERS):
        base = tile_start + it * BLOCK
        local = tl.max_contiguous(tl.multiple_of(base + tl.arange(0, BLOCK), BLOCK), BLOCK)
        e = entry_start + local
        ok = local < count
        # Full blocks take the unmasked path (vector loads); only a segment's last block is masked.
        if base + BLOCK <= count:
            if dense != 0:
                _adamw_entries(
                    p_ptr,
                    g_ptr,
                    local,
                    m_ptr,
                    v_ptr,
                    e,
                    ok,
                    decay,
                    w1,
                    beta2,
                    w2,
                    step_size,
                    bc2_sqrt,
                    eps,
                    PARAM_IS_BF16=PARAM_IS_BF16,
                    MASKED=False,
                )
            else:
                pos = tl.load(idx_ptr + e)
                _adamw_entries(
                    p_ptr,
                    g_ptr,
                    pos,
                    m_ptr,
                    v_ptr,
                    e,
                    ok,
                    decay,
                    w1,
                    beta2,
                    w2,
                    step_size,
                    bc2_sqrt,
                    eps,
                    PARAM_IS_BF16=PARAM_IS_BF16,
                    MASKED=False,
                )
        elif base < count:
            if dense != 0:
                _adamw_entries(
                    p_ptr,
                    g_ptr,
                    local,
                    m_ptr,
                    v_ptr,
                    e,
                    ok,
                    decay,
                    w1,
                    beta2,
                    w2,
                    step_size,
                    bc2_sqrt,
                    eps,
                    PARAM_IS_BF16=PARAM_IS_BF16,
                    MASKED=True,
                )
            else:
                pos = tl.load(idx_ptr + e, mask=ok, other=0)
                _adamw_entries(
                    p_ptr,
                    g_ptr,
                    pos,
                    m_ptr,
                    v_ptr,
                    e,
                    ok,
                    decay,
                    w1,
                    beta2,
                    w2,
                    step_size,
                    bc2_sqrt,
                    eps,
                    PARAM_IS_BF16=PARAM_IS_BF16,
                    MASKED=True,
                )


def tiles_per_segment(count: torch.Tensor) -> torch.Tensor:
    """Programs each segment needs (int64, CPU)."""
    tile = BLOCK * ITERS
    return (count + (tile - 1)) // tile


def sparse_adamw_step(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    entry_start: torch.Tensor,
    count: torch.Tensor,
    dense: torch.Tensor,
    hyper: torch.Tensor,
    indices: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    entry_align: int,
) -> None:
    """One fused AdamW step over the segments given (one launch). Updates params, exp_avg, exp_avg_sq in place.

    Args:
        params, grads: n contiguous tensors, one dtype (``SUPPORTED_PARAM_DTYPES``), all on the state's device;
            grads[i] has params[i]'s shape.
        entry_start, count: (n,) int64 CPU: each segment's slice of the compact state (count >= 1, slices disjoint,
            starts multiples of ``entry_align``: the kernel loads the compact streams as aligned vectors).
        dense: (n,) bool CPU: the segment has no indices (count == numel, entry i is position i).
        hyper: (HYPER_ROWS, n) float32 CPU: the step's coefficients per segment.
        indices: (E,) int32/int64, exp_avg / exp_avg_sq: (E,) float32, on the parameters' device.
    """
    n = len(params)
    if n == 0:
        return
    device = exp_avg.device
    dtype = params[0].dtype
    addresses = torch.tensor([[g.data_ptr() for g in grads], [p.data_ptr() for p in params]], dtype=torch.int64)
    itab = torch.stack([entry_start, count, addresses[0], addresses[1], dense.to(torch.int64)])
    tiles = tiles_per_segment(count)
    ends = torch.cumsum(tiles, 0)
    n_programs = int(ends[-1])
    first_tile = (ends - tiles).to(torch.int32)
    aligned = bool((addresses % 16 == 0).all())

    # One host buffer, one copy: int64 rows, then the int32 row (padded to 8 bytes), then the float32 rows.
    n_int32 = n + (n % 2)
    host = torch.empty(
        8 * INT_ROWS * n + 4 * n_int32 + 4 * HYPER_ROWS * n, dtype=torch.uint8, pin_memory=device.type == "cuda"
    )
    o1, o2 = 8 * INT_ROWS * n, 8 * INT_ROWS * n + 4 * n_int32
    host[:o1].view(torch.int64).copy_(itab.reshape(-1))
    host[o1 : o1 + 4 * n].view(torch.int32).copy_(first_tile)
    host[o2:].view(torch.float32).copy_(hyper.reshape(-1))
    table = host.to(device, non_blocking=True) if device.type == "cuda" else host
    launch = plan_sparse_adamw(
        table[:o1].view(torch.int64),
        table[o1 : o1 + 4 * n].view(torch.int32),
        table[o2:].view(torch.float32),
        indices,
        exp_avg,
        exp_avg_sq,
        n_segments=n,
        n_programs=n_programs,
        param_dtype=dtype,
        aligned=aligned,
        entry_align=entry_align,
    )
    # Triton launches on the current device: make it the state's
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        launch.launch()


def plan_sparse_adamw(
    itab: torch.Tensor,
    first_tile: torch.Tensor,
    hyper: torch.Tensor,
    indices: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    n_segments: int,
    n_programs: int,
    param_dtype: torch.dtype,
    aligned: bool,
    entry_align: int,
) -> KernelLaunch:
    """The launch ``sparse_adamw_step`` runs, from its device-side launch table (rows as in the module docstring)."""
    return KernelLaunch(
        _sparse_adamw_kernel,
        (n_programs,),
        (itab, first_tile, hyper, indices, exp_avg, exp_avg_sq, n_segments),
        dict(
            DTYPE=_TL_DTYPES[param_dtype],
            PARAM_IS_BF16=param_dtype == torch.bfloat16,
            ALIGNED=aligned,
            BLOCK=BLOCK,
            ITERS=ITERS,
            SEARCH=SEARCH,
            ENTRY_ALIGN=entry_align,
        ),
        num_warps=NUM_WARPS,
    )
