"""SparseAdamW: AdamW on a masked subnetwork, with optimizer state stored only for the masked entries.

Why (docs/design.md §4; Mukherjee et al. 2025, arXiv:2505.11711): RL fine-tuning changes only
5-30% of an LLM's parameters, in a subnetwork that is consistent across seeds, and training only that subnetwork
matches full training. A masked update that keeps dense optimizer state saves nothing; this one stores 12 bytes per
masked entry (dense AdamW: 8 per parameter) and moves bytes in proportion to the density.

Semantics. Masked entries follow torch.optim.AdamW exactly (per-parameter step count, bias correction, decoupled
weight decay ``p *= 1 - lr * wd``), computed in fp32: within fp32 rounding of AdamW on the same gradients. Unmasked
entries are never read or written: bit-identical to before the step, whatever their gradient holds (NaN and inf
included). Parameters may be float32 or bfloat16; the moments are float32 (torch's AdamW keeps bf16 moments for bf16
parameters, so on bf16 this is AdamW with an fp32 update and one round-to-nearest-even per step). A parameter whose
grad is None is skipped (its step count does not advance), as torch.optim.AdamW does.

Under FSDP2 parameters may be DTensors: masks are still full-shape, each rank keeps state for the masked entries of its
local piece and steps ``to_local()``; state_dict() then saves the world-size independent "full" layout (full-shape
moments and mask, DTensors laid out like the parameters; ``state_layout``, docs/design.md §4).

State layout, per parameter ``p`` (``optimizer.state[p]``), the format state_dict() saves ("compact"):
    "step":        0-d float32 CPU tensor, the number of steps this parameter took (as torch.optim.AdamW).
    "exp_avg":     float32 on p's device; shape (k,) for a masked parameter (k = mask.sum()), p.shape when dense.
    "exp_avg_sq":  likewise.
    "indices":     (k,) int32 (int64 when p has 2^31 or more entries): the sorted flat (row-major) positions of the
                   masked entries; absent for dense parameters (mask None or all True).
    A parameter with an all-False mask is frozen: it has no state and is never written.
Internally the state of all parameters of one device and dtype lives in flat buffers (exp_avg, exp_avg_sq, indices;
masked parameters first, each slice starting at a multiple of ``ENTRY_ALIGN`` entries) and the per-parameter tensors
above are views into them, so the fused kernel updates everything in one launch and state_dict() needs no copy.
Do not rebind these tensors (in-place edits are fine); load_state_dict() is the way to replace the state.
Each step the host builds a small launch table (gradient addresses, coefficients): the step is not CUDA-graph
capturable.

Four pieces, as every op: ``sparse_adamw_reference`` (one step on one tensor, written densely: the specification),
the vectorised torch path (index_select / foreach over the compact state; the CPU path), the Triton kernel
``rlvr_fast.kernels.sparse_adamw`` (one launch per step per device and dtype), and the public ``SparseAdamW``. Where the
optional extension ``rlvr_fast._C`` is built, the CUDA C++ kernel ``csrc/sparse_adamw.cu`` is a fifth
(``backend="cuda"``): the same table and arithmetic, 16-byte vector loads of the compact streams.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from copy import deepcopy
from dataclasses import dataclass
from typing import Any

import torch

from rlvr_fast.backends import BACKENDS, select_backend
from rlvr_fast.optim.sharding import check_placements, is_dtensor, like_sharded, local_part, local_tensor

OP = "SparseAdamW"
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16)
ENTRY_ALIGN = 16  # each parameter's slice of the flat state starts at a multiple of 16 entries (aligned vectors)
INT32_POSITIONS = 2**31 - 1  # parameters with more entries than this store int64 indices
TORCH_CHUNK_ENTRIES = 1 << 19  # the torch path steps this many entries at a time: ~10 MB of streams, cache-resident
# The per-segment coefficients of one step, in the order the kernel reads them (kernels/sparse_adamw.HYPER_FIELDS).
HYPER_FIELDS = ("decay", "w1", "beta2", "w2", "step_size", "bc2_sqrt", "eps")
# What state_dict() saves (docs/design.md §4): "compact" = the live layout (indices + packed moments, rank-local under
# FSDP2); "full" = full-shape moments (zeros off the mask) and the full-shape mask, DTensors laid out like their
# parameters under FSDP2, so torch.distributed.checkpoint reshards them to any world size; "auto" = "full" when a
# parameter is a DTensor, else "compact".
STATE_LAYOUTS = ("auto", "compact", "full")
_MOMENTS = ("exp_avg", "exp_avg_sq")


# --------------------------------------------------------------------------------------------------------------------
# 1. The reference: one step on one tensor, written densely (the specification)
# --------------------------------------------------------------------------------------------------------------------


def sparse_adamw_reference(
    param: torch.Tensor,
    grad: torch.Tensor,
    mask: torch.Tensor | None,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: int,
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    compute_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One SparseAdamW step of one parameter, dense and readable. Slow on purpose: read it, test against it.

    Args:
        param: any shape, float32 or bfloat16. grad: param's shape. mask: bool of param's shape, or None (dense).
        exp_avg, exp_avg_sq: the moments as dense tensors of param's shape in ``compute_dtype`` (zeros before the
            first step; entries outside the mask stay whatever they were).
        step: this parameter's step count after this step (1 at its first step).
        lr, betas, eps, weight_decay: as torch.optim.AdamW.
        compute_dtype: float32 (what the optimizer computes in) or float64 (for tests).

    Returns:
        (new param in param's dtype, new exp_avg, new exp_avg_sq). Outside the mask the inputs come back untouched.
    """
    beta1, beta2 = betas
    p = param.to(compute_dtype)
    g = grad.to(compute_dtype)
    m = torch.lerp(exp_avg, g, 1.0 - beta1)  # beta1 * m + (1 - beta1) * g
    v = beta2 * exp_avg_sq + (1.0 - beta2) * g * g
    bias_correction1 = 1.0 - beta1**step
    bias_correction2 = 1.0 - beta2**step
    p = p * (1.0 - lr * weight_decay)  # decoupled weight decay (Loshchilov & Hutter 2019)
    p = p - (lr / bias_correction1) * m / (v.sqrt() / math.sqrt(bias_correction2) + eps)
    new_param = p.to(param.dtype)
    if mask is None:
        return new_param, m, v
    return torch.where(mask, new_param, param), torch.where(mask, m, exp_avg), torch.where(mask, v, exp_avg_sq)


# --------------------------------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------------------------------


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_hyperparameters(lr, betas, eps, weight_decay, where: str = OP) -> None:
    """ValueError/TypeError naming the argument, the expected and the actual value."""
    if not _is_number(lr) or not math.isfinite(lr) or lr < 0:
        raise ValueError(f"{where}: lr must be a finite number >= 0, got {lr!r}")
    if isinstance(betas, (str, bytes)) or not isinstance(betas, Sequence) or len(betas) != 2:
        raise ValueError(f"{where}: betas must be a pair (beta1, beta2), got {betas!r}")
    for i, beta in enumerate(betas):
        if not _is_number(beta) or not 0.0 <= beta < 1.0:
            raise ValueError(f"{where}: betas[{i}] must be a number in [0, 1), got {beta!r}")
    if not _is_number(eps) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"{where}: eps must be a finite number >= 0, got {eps!r}")
    if not _is_number(weight_decay) or not math.isfinite(weight_decay) or weight_decay < 0:
        raise ValueError(f"{where}: weight_decay must be a finite number >= 0, got {weight_decay!r}")


def _check_param(p: torch.Tensor, label: str) -> None:
    if is_dtensor(p):
        check_placements(p, label, OP)
        p = local_tensor(p)  # the piece this rank steps
    if p.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{OP}: {label} must be float32 or bfloat16, got dtype {p.dtype}")
    if not p.is_contiguous():
        raise ValueError(
            f"{OP}: {label} must be contiguous (masks index its row-major layout), got strides {p.stride()}"
        )
    if p.is_sparse:
        raise TypeError(f"{OP}: {label} must be a dense tensor, got layout {p.layout}")


def _mask_positions(mask, p: torch.Tensor, label: str) -> torch.Tensor | bool | None:
    """The sorted flat positions a mask keeps, on p's device: None = dense, False = frozen (all-false mask).

    For a DTensor parameter (FSDP2) the mask has the full shape (or is a DTensor laid out like the parameter); the
    positions are those of the rank-local piece, flat in its row-major layout. Dense and frozen are decided on the full
    mask, so every rank agrees; a partly masked parameter keeps indices on every rank, even where its local piece is
    all kept, or empty (a segment of 0 entries that still counts its steps)."""
    if mask is None:
        return None
    _check_mask(mask, p, label)
    if is_dtensor(p):
        return _local_mask_positions(mask, p)
    positions = mask.reshape(-1).nonzero().squeeze(1)
    if positions.numel() == p.numel():
        return None  # all True: dense, no indices stored
    if positions.numel() == 0:
        return False
    index_dtype = torch.int32 if p.numel() <= INT32_POSITIONS else torch.int64
    return positions.to(device=p.device, dtype=index_dtype)


def _check_mask(mask, p: torch.Tensor, label: str) -> None:
    """A mask is a bool tensor of its parameter's shape; for a DTensor parameter, the full shape (module doc)."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{OP}: the mask of {label} must be a bool tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{OP}: the mask of {label} must have dtype torch.bool, got {mask.dtype}")
    if tuple(mask.shape) != tuple(p.shape):
        which = "full shape" if is_dtensor(p) else "shape"
        why = " (the same masks at any world size)" if is_dtensor(p) else ""
        raise ValueError(
            f"{OP}: the mask of {label} must have the parameter's {which} {tuple(p.shape)}{why}, "
            f"got {tuple(mask.shape)}"
        )


def _local_mask_positions(mask, p) -> torch.Tensor | bool | None:
    """_mask_positions for a DTensor parameter: dense/frozen from the full mask, positions in the local piece."""
    kept = int(mask.sum())  # a DTensor mask: an all-reduce, the same on every rank
    if kept == p.numel():
        return None
    if kept == 0:
        return False
    local = local_tensor(p)
    positions = local_part(mask, p).reshape(-1).nonzero().squeeze(1)
    index_dtype = torch.int32 if local.numel() <= INT32_POSITIONS else torch.int64
    return positions.to(device=local.device, dtype=index_dtype)


def _resolve_masks(masks, params: list[torch.Tensor], names: list[str] | None) -> list:
    """Masks aligned with ``params``: from a sequence (one entry per parameter) or a dict name -> mask."""
    if masks is None:
        return [None] * len(params)
    if isinstance(masks, Mapping):
        if names is None:
            raise TypeError(
                f"{OP}: masks is a dict (name -> mask) but the parameters were given without names; pass named "
                f"parameters (e.g. model.named_parameters()) or masks as a sequence aligned with the parameters"
            )
        held = set(names)
        unknown = [k for k in masks if k not in held]
        if unknown:
            raise ValueError(
                f"{OP}: masks has a mask for a parameter the optimizer does not hold: {unknown[0]!r} "
                f"({len(unknown)} unknown names; the optimizer holds {len(names)} parameters, e.g. {names[:3]})"
            )
        return [masks.get(n) for n in names]
    if isinstance(masks, torch.Tensor) or not isinstance(masks, Iterable) or isinstance(masks, (str, bytes)):
        raise TypeError(
            f"{OP}: masks must be a sequence aligned with the parameters (bool tensor or None each) or a dict "
            f"name -> mask, got {type(masks).__name__}"
        )
    masks = list(masks)
    if len(masks) != len(params):
        raise ValueError(f"{OP}: masks must have one entry per parameter ({len(params)}), got {len(masks)}")
    return masks


# --------------------------------------------------------------------------------------------------------------------
# The flat layout: one bucket per (device, dtype, index dtype)
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class _Segment:
    param: torch.Tensor  # the optimizer's parameter: a plain tensor, or a DTensor (FSDP2) whose local piece steps
    group: int  # index into param_groups
    label: str  # for messages
    count: int  # entries in the state (masked entries of the local piece, or its numel when dense)
    dense: bool
    entry_start: int = 0

    @property
    def tensor(self) -> torch.Tensor:
        """The tensor stepped: the parameter, or its rank-local piece, looked up at each step (FSDP2 may re-point a
        DTensor's local piece, e.g. at lazy init)."""
        return local_tensor(self.param)

    def grad(self) -> torch.Tensor | None:
        g = self.param.grad
        return None if g is None else local_tensor(g)


@dataclass
class _Bucket:
    """The parameters of one device, dtype and index dtype, stepped together (one kernel launch)."""

    device: torch.device
    dtype: torch.dtype
    backend: str
    segments: list[_Segment]
    exp_avg: torch.Tensor  # (E,) float32
    exp_avg_sq: torch.Tensor  # (E,) float32
    indices: torch.Tensor  # (E_masked,) int32/int64, E_masked <= E: masked segments come first
    steps: torch.Tensor  # (n_seg,) float32 CPU, the segments' step counts (state["step"] are views)
    entry_start: torch.Tensor  # (n_seg,) int64 CPU
    count: torch.Tensor  # (n_seg,) int64 CPU
    dense: torch.Tensor  # (n_seg,) bool CPU
    group_index: torch.Tensor  # (n_seg,) int64 CPU


def _align(n: int) -> int:
    return -(-n // ENTRY_ALIGN) * ENTRY_ALIGN


# --------------------------------------------------------------------------------------------------------------------
# 2. The torch path: index_select / foreach over the compact state, in chunks
# --------------------------------------------------------------------------------------------------------------------


def _step_torch(bucket: _Bucket, sel, segments: list[_Segment], grads: list[torch.Tensor], hyper: torch.Tensor) -> None:
    """Step the entries in chunks of at most TORCH_CHUNK_ENTRIES (large segments are split): the eight foreach passes
    of a chunk then run on cache-resident data, and the temporaries stay small."""
    coeffs = list(zip(*hyper.tolist()))  # per segment: a tuple in HYPER_FIELDS order
    chunk, room = [], TORCH_CHUNK_ENTRIES
    for seg, g, c in zip(segments, grads, coeffs):
        g = g.reshape(-1)
        lo = 0
        while lo < seg.count:
            hi = min(seg.count, lo + room)
            chunk.append((seg, g, c, lo, hi))
            room -= hi - lo
            lo = hi
            if room == 0:
                _step_torch_chunk(bucket, chunk)
                chunk, room = [], TORCH_CHUNK_ENTRIES
    if chunk:
        _step_torch_chunk(bucket, chunk)


def _step_torch_chunk(bucket: _Bucket, pieces: list[tuple[_Segment, torch.Tensor, tuple, int, int]]) -> None:
    """One AdamW step on pieces (segment, flat grad, coefficients, lo, hi) of the stepping segments' entries."""
    params, gs, ms, vs, positions = [], [], [], [], []
    for seg, g, _, lo, hi in pieces:
        flat_p = seg.tensor.view(-1)
        state = slice(seg.entry_start + lo, seg.entry_start + hi)
        if seg.dense:
            pos = None
            p32 = flat_p[lo:hi] if flat_p.dtype == torch.float32 else flat_p[lo:hi].float()  # fp32: in place
            g32 = g[lo:hi].float()
        else:
            pos = bucket.indices[state].long()  # CPU index_select / index_copy_ are ~2-3x faster with int64
            p32 = flat_p.index_select(0, pos).float()
            g32 = g.index_select(0, pos).float()
        params.append(p32)
        gs.append(g32)
        ms.append(bucket.exp_avg[state])
        vs.append(bucket.exp_avg_sq[state])
        positions.append(pos)
    c = dict(zip(HYPER_FIELDS, zip(*(piece[2] for piece in pieces))))
    # torch.optim.AdamW's _multi_tensor_adamw, operation by operation, with per-segment coefficients
    torch._foreach_mul_(params, c["decay"])
    torch._foreach_lerp_(ms, gs, c["w1"])
    torch._foreach_mul_(vs, c["beta2"])
    torch._foreach_addcmul_(vs, gs, gs, c["w2"])
    denom = torch._foreach_sqrt(vs)
    torch._foreach_div_(denom, c["bc2_sqrt"])
    torch._foreach_add_(denom, c["eps"])
    torch._foreach_addcdiv_(params, ms, denom, [-s for s in c["step_size"]])
    for (seg, _, _, lo, hi), p32, pos in zip(pieces, params, positions):
        flat_p = seg.tensor.view(-1)
        if pos is not None:
            flat_p.index_copy_(0, pos, p32.to(flat_p.dtype))  # scatter: only the masked positions are written
        elif p32.data_ptr() != flat_p[lo:hi].data_ptr():
            flat_p[lo:hi].copy_(p32)  # bf16 dense: one round-to-nearest-even


# --------------------------------------------------------------------------------------------------------------------
# 3. The Triton path: one launch per bucket (rlvr_fast.kernels.sparse_adamw)
# --------------------------------------------------------------------------------------------------------------------


def _step_triton(
    bucket: _Bucket, sel, segments: list[_Segment], grads: list[torch.Tensor], hyper: torch.Tensor
) -> None:
    from rlvr_fast.kernels.sparse_adamw import sparse_adamw_step  # imported late: TRITON_INTERPRET must be set first

    def pick(t: torch.Tensor) -> torch.Tensor:
        return t[sel]

    sparse_adamw_step(
        [s.tensor for s in segments],
        [g if g.is_contiguous() else g.contiguous() for g in grads],  # the kernel indexes the row-major layout
        pick(bucket.entry_start),
        pick(bucket.count),
        pick(bucket.dense),
        hyper,
        bucket.indices,
        bucket.exp_avg,
        bucket.exp_avg_sq,
        entry_align=ENTRY_ALIGN,
    )


# --------------------------------------------------------------------------------------------------------------------
# 3b. The CUDA C++ path: one launch per bucket (csrc/sparse_adamw.cu through torch.ops.rlvr_fast, rlvr_fast._C)
# --------------------------------------------------------------------------------------------------------------------

CUDA_OP = "sparse_adamw_step"  # torch.ops.rlvr_fast.<CUDA_OP>


def _step_cuda(bucket: _Bucket, sel, segments: list[_Segment], grads: list[torch.Tensor], hyper: torch.Tensor) -> None:
    """The same segments, layout and coefficients as the Triton path; the op checks them, builds the launch table
    (addresses + coefficients, one pinned host-to-device copy) and steps every segment in one launch."""
    getattr(torch.ops.rlvr_fast, CUDA_OP)(
        [s.tensor for s in segments],
        [g if g.is_contiguous() else g.contiguous() for g in grads],  # the kernel indexes the row-major layout
        bucket.indices,
        bucket.exp_avg,
        bucket.exp_avg_sq,
        bucket.entry_start[sel],
        bucket.count[sel],
        bucket.dense[sel],
        hyper.contiguous(),  # (len(HYPER_FIELDS), n) float32, the order of RfAdamwSegment's float fields
    )


# (bucket, selection of the stepping segments, those segments, their grads, (len(HYPER_FIELDS), n) coefficients)
_PATHS: dict[str, Callable[[_Bucket, Any, list, list, torch.Tensor], None]] = {
    "torch": _step_torch,
    "triton": _step_triton,
    "cuda": _step_cuda,
}


# --------------------------------------------------------------------------------------------------------------------
# 4. The public optimizer
# --------------------------------------------------------------------------------------------------------------------


class SparseAdamW(torch.optim.Optimizer):
    """AdamW on the masked entries only; state for the masked entries only; one fused launch per step.

    Args:
        params_or_groups: parameters, (name, parameter) pairs (e.g. ``model.named_parameters()``), or param-group
            dicts (which may override lr, betas, eps, weight_decay), as torch.optim.AdamW takes. float32 or bfloat16,
            contiguous.
        masks: one entry per parameter, in the order the groups list them: a bool tensor of the parameter's shape
            (True = trained) or None (dense); or a dict name -> mask when named parameters are given (parameters
            absent from the dict are dense; a name the optimizer does not hold raises). An all-True mask is stored as
            dense; an all-False mask freezes the parameter (no state, never written). None: every parameter dense.
        lr, betas, eps, weight_decay: as torch.optim.AdamW (decoupled weight decay). Defaults suit RL fine-tuning.
        backend: "auto" | "cuda" | "triton" | "torch" (rlvr_fast.backends): "auto" takes the CUDA C++ kernel for CUDA
            parameters when the extension rlvr_fast._C is built, else the Triton kernel (also for CPU parameters with
            TRITON_INTERPRET=1), else the torch path; an unavailable backend raises.
        state_layout: what state_dict() saves: "compact" (the live layout above), "full" (full-shape moments, zeros off
            the mask, plus the full-shape bool "mask"; DTensors laid out like their parameters under FSDP2, which
            torch.distributed.checkpoint saves sharded and reshards to any world size), or "auto" ("full" when a
            parameter is a DTensor, else "compact"). load_state_dict() takes either layout.

    FSDP2 (``fully_shard``): parameters may be DTensors (Shard/Replicate placements; uneven shards and empty local
    pieces included). Masks are still given full-shape (the same masks and mask files at any world size); each rank
    keeps indices and moments only for the masked entries of its local piece and steps ``to_local()`` in place.

    The module docstring gives the semantics and the state layout. Memory: 12 bytes per masked entry (float32 moments +
    int32 index) plus at most 12 * ENTRY_ALIGN bytes of padding and a 4-byte step per parameter; dense parameters take
    8 bytes per entry, as torch.optim.AdamW.
    """

    def __init__(
        self,
        params_or_groups,
        masks,
        lr: float = 1e-6,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        backend: str = "auto",
        state_layout: str = "auto",
    ):
        check_hyperparameters(lr, betas, eps, weight_decay)
        if backend not in BACKENDS:
            raise ValueError(f"{OP}: backend must be one of {BACKENDS}, got {backend!r}")
        if state_layout not in STATE_LAYOUTS:
            raise ValueError(f"{OP}: state_layout must be one of {STATE_LAYOUTS}, got {state_layout!r}")
        self._backend = backend
        self._state_layout = state_layout
        self._buckets: list[_Bucket] = []
        self._frozen: set[torch.Tensor] = set()
        self._ready = False
        defaults = dict(lr=lr, betas=(betas[0], betas[1]), eps=eps, weight_decay=weight_decay)
        super().__init__(params_or_groups, defaults)
        params = self._params()
        labels = self._labels()
        resolved = _resolve_masks(masks, params, self._names())
        self._rebuild({p: {"indices": pos} for p, pos in self._positions(params, resolved, labels)}, params, labels)
        self._ready = True
        if state_layout == "compact" and any(is_dtensor(p) for p in params):
            raise ValueError(
                f"{OP}: state_layout='compact' with DTensor (sharded) parameters: the compact state holds rank-local "
                f"positions, which no other world size can load; use state_layout='full' or 'auto'"
            )

    @property
    def state_layout(self) -> str:
        """The layout state_dict() saves: "compact" or "full" (``state_layout="auto"`` resolved)."""
        if self._state_layout != "auto":
            return self._state_layout
        return "full" if any(is_dtensor(p) for p in self._params()) else "compact"

    # -- parameters and their masks ---------------------------------------------------------------------------------

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _names(self) -> list[str] | None:
        if all("param_names" in g for g in self.param_groups):
            return [n for g in self.param_groups for n in g["param_names"]]
        return None

    def _labels(self) -> list[str]:
        names = self._names()
        if names is not None:
            return [f"parameter {n!r}" for n in names]
        return [
            f"param_groups[{gi}]['params'][{j}]"
            for gi, g in enumerate(self.param_groups)
            for j in range(len(g["params"]))
        ]

    def _positions(self, params, masks, labels):
        """(param, positions-or-None) for every parameter that is not frozen; frozen ones go to self._frozen."""
        out = []
        for p, m, label in zip(params, masks, labels):
            _check_param(p, label)
            pos = _mask_positions(m, p, label)
            if pos is False:
                self._frozen.add(p)
            else:
                out.append((p, pos))
        return out

    def add_param_group(self, param_group: dict[str, Any], masks=None) -> None:
        """torch's add_param_group, plus ``masks`` for the new group's parameters (sequence or dict; None = dense)."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        where = f"{OP}: param_groups[{len(self.param_groups) - 1}]"
        check_hyperparameters(group["lr"], group["betas"], group["eps"], group["weight_decay"], where=where)
        if not self._ready:  # called by torch's __init__; the masks of all groups are resolved there
            return
        labels = self._labels()[-len(group["params"]) :]
        resolved = _resolve_masks(masks, group["params"], group.get("param_names"))
        sources = {p: dict(self.state[p]) for b in self._buckets for p in (s.param for s in b.segments)}
        sources.update({p: {"indices": pos} for p, pos in self._positions(group["params"], resolved, labels)})
        self._rebuild(sources, self._params(), self._labels())

    # -- building the flat state -------------------------------------------------------------------------------------

    def _rebuild(self, sources: dict[torch.Tensor, dict], params: list[torch.Tensor], labels: list[str]) -> None:
        """Lay out the flat state of every non-frozen parameter, copying whatever ``sources`` holds for it.

        sources[p]: "indices" (positions; None = dense) and optionally "exp_avg", "exp_avg_sq", "step" to copy in.
        """
        group_of = {p: gi for gi, g in enumerate(self.param_groups) for p in g["params"]}
        label_of = dict(zip(params, labels))
        keyed: dict[tuple, list[tuple[_Segment, dict]]] = defaultdict(list)
        for p in params:
            if p in self._frozen:
                continue
            src = sources[p]
            pos = src.get("indices")
            index_dtype = torch.int32 if pos is None else pos.dtype
            count = local_tensor(p).numel() if pos is None else pos.numel()
            seg = _Segment(p, group_of[p], label_of[p], count, pos is None)
            keyed[(p.device, p.dtype, index_dtype)].append((seg, src))

        buckets = []
        self.state = defaultdict(dict)
        for (device, dtype, index_dtype), items in keyed.items():
            items.sort(key=lambda it: it[0].dense)  # masked segments first: the index array covers only them
            offset, masked_end = 0, 0
            for seg, _ in items:
                seg.entry_start = offset
                offset = _align(offset + seg.count)
                if not seg.dense:
                    masked_end = offset
            exp_avg = torch.zeros(max(offset, 1), dtype=torch.float32, device=device)
            exp_avg_sq = torch.zeros_like(exp_avg)
            indices = torch.zeros(max(masked_end, 1), dtype=index_dtype, device=device)
            steps = torch.zeros(len(items), dtype=torch.float32)
            segments = [seg for seg, _ in items]
            bucket = _Bucket(
                device=device,
                dtype=dtype,
                backend=select_backend(self._backend, device, op=OP, cuda_op=CUDA_OP),
                segments=segments,
                exp_avg=exp_avg,
                exp_avg_sq=exp_avg_sq,
                indices=indices,
                steps=steps,
                entry_start=torch.tensor([s.entry_start for s in segments], dtype=torch.int64),
                count=torch.tensor([s.count for s in segments], dtype=torch.int64),
                dense=torch.tensor([s.dense for s in segments], dtype=torch.bool),
                group_index=torch.tensor([s.group for s in segments], dtype=torch.int64),
            )
            for i, (seg, src) in enumerate(items):
                sl = slice(seg.entry_start, seg.entry_start + seg.count)
                state = {"step": steps[i]}
                shape = seg.tensor.shape if seg.dense else (seg.count,)
                state["exp_avg"] = exp_avg[sl].view(shape)
                state["exp_avg_sq"] = exp_avg_sq[sl].view(shape)
                if not seg.dense:
                    indices[sl].copy_(src["indices"])
                    state["indices"] = indices[sl]
                for key in ("exp_avg", "exp_avg_sq"):
                    if key in src:
                        state[key].copy_(src[key].reshape(shape))
                if "step" in src:
                    steps[i] = float(src["step"])
                self.state[seg.param] = state
            buckets.append(bucket)
        self._buckets = buckets

    # -- the step -------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step on the masked entries of every parameter that has a grad."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for bucket in self._buckets:
            self._step_bucket(bucket)
        return loss

    def _step_bucket(self, bucket: _Bucket) -> None:
        segments, grads, rows = [], [], []
        for i, seg in enumerate(bucket.segments):
            g = seg.grad()
            if g is None:
                continue
            if g.is_sparse:
                raise TypeError(f"{OP}: {seg.label} has a sparse gradient; SparseAdamW takes dense gradients")
            p = seg.tensor
            if g.shape != p.shape or g.dtype != p.dtype or g.device != p.device:
                raise ValueError(
                    f"{OP}: the grad of {seg.label} must match the parameter (shape {tuple(p.shape)}, dtype "
                    f"{p.dtype}, device {p.device}), got shape {tuple(g.shape)}, dtype {g.dtype}, device {g.device}"
                )
            segments.append(seg)
            grads.append(g)
            rows.append(i)
        if not segments:
            return
        sel = torch.tensor(rows, dtype=torch.int64) if len(rows) < len(bucket.segments) else slice(None)
        bucket.steps[sel] += 1.0
        hyper = self._coefficients(bucket, sel)
        # A sharded parameter's local piece may hold no masked entry (or no entry at all): its step counts (the count
        # is the parameter's, the same on every rank) but nothing is launched for it (the kernels take count >= 1).
        keep = [j for j, seg in enumerate(segments) if seg.count > 0]
        if not keep:
            return
        if len(keep) < len(segments):
            rows = [rows[j] for j in keep]
            segments, grads = [segments[j] for j in keep], [grads[j] for j in keep]
            hyper = hyper[:, keep]
            sel = torch.tensor(rows, dtype=torch.int64)
        _PATHS[bucket.backend](bucket, sel, segments, grads, hyper)

    def _coefficients(self, bucket: _Bucket, sel) -> torch.Tensor:
        """(len(HYPER_FIELDS), n) float32: each stepping segment's AdamW coefficients, from float64 as torch does."""
        table = torch.tensor(
            [[g["lr"], g["betas"][0], g["betas"][1], g["eps"], g["weight_decay"]] for g in self.param_groups],
            dtype=torch.float64,
        )
        lr, beta1, beta2, eps, wd = table[bucket.group_index[sel]].unbind(1)
        t = bucket.steps[sel].double()
        rows = {
            "decay": 1.0 - lr * wd,
            "w1": 1.0 - beta1,
            "beta2": beta2,
            "w2": 1.0 - beta2,
            "step_size": lr / (1.0 - beta1**t),
            "bc2_sqrt": (1.0 - beta2**t).sqrt(),
            "eps": eps,
        }
        return torch.stack([rows[f] for f in HYPER_FIELDS]).float()

    # -- introspection --------------------------------------------------------------------------------------------

    @property
    def backends(self) -> dict[tuple[torch.device, torch.dtype], str]:
        """The backend each (device, dtype) group of parameters steps with."""
        return {(b.device, b.dtype): b.backend for b in self._buckets}

    def state_bytes(self) -> int:
        """Bytes of optimizer state: the flat buffers on the devices plus the 4-byte step counts."""
        return sum(
            t.untyped_storage().nbytes() for b in self._buckets for t in (b.exp_avg, b.exp_avg_sq, b.indices, b.steps)
        )

    def num_masked(self) -> int:
        """Entries that are trained (masked entries of masked parameters plus every entry of dense ones)."""
        return sum(s.count for b in self._buckets for s in b.segments)

    # -- state dict ---------------------------------------------------------------------------------------------------

    @torch._disable_dynamo
    def state_dict(self) -> dict[str, Any]:
        """torch's state dict, in ``self.state_layout``: "compact" holds references to the live state (no copy); "full"
        builds, per parameter, full-shape float32 moments (zeros off the mask) and for masked parameters the
        full-shape bool "mask", as DTensors laid out like DTensor parameters (8 bytes + 1 per local entry while the
        dict lives; a dense parameter's moments are the live tensors)."""
        state_dict = super().state_dict()
        if self.state_layout == "compact":
            return state_dict
        for pid, p in enumerate(self._params()):
            if pid in state_dict["state"]:
                state_dict["state"][pid] = self._full_state(p)  # a new dict: the live one stays as it is
            elif p in self._frozen:  # torch.distributed.checkpoint wants a state for every trainable parameter
                local = local_tensor(p)
                mask = torch.zeros(local.shape, dtype=torch.bool, device=local.device)
                state_dict["state"][pid] = {"step": torch.tensor(0.0), "mask": like_sharded(mask, p)}
        return state_dict

    def _full_state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        live = self.state[p]
        full = {"step": live["step"]}
        positions = live.get("indices")
        local = local_tensor(p)
        if positions is None:
            for key in ("exp_avg", "exp_avg_sq"):
                full[key] = like_sharded(live[key], p)
            return full
        positions = positions.long()
        mask = torch.zeros(local.numel(), dtype=torch.bool, device=local.device)
        mask[positions] = True
        full["mask"] = like_sharded(mask.view(local.shape), p)
        for key in ("exp_avg", "exp_avg_sq"):
            moment = torch.zeros(local.numel(), dtype=torch.float32, device=local.device)
            moment[positions] = live[key]
            full[key] = like_sharded(moment.view(local.shape), p)
        return full

    def _compact_from_saved(self, p, label: str, ours: torch.Tensor | None, saved: dict) -> dict[str, torch.Tensor]:
        """The saved moments of ``p`` in the live layout (entries at ``ours``, or every local entry when dense),
        from either saved layout; a mismatched mask raises."""
        if "mask" in saved:  # the full layout: full-shape (or DTensor) moments and mask; pick this rank's piece
            if ours is None:
                raise ValueError(
                    f"{OP}.load_state_dict: {label} is dense here but masked in the state dict (the masks must agree)"
                )
            mask = local_part(saved["mask"], p)
            expected = torch.zeros(local_tensor(p).numel(), dtype=torch.bool, device=mask.device)
            expected[ours.long().to(mask.device)] = True
            if mask.shape != local_tensor(p).shape or not torch.equal(mask.reshape(-1), expected):
                raise ValueError(f"{OP}.load_state_dict: the saved mask of {label} differs from this optimizer's mask")
            positions = ours.long()
            return {k: local_part(saved[k], p).reshape(-1).to(positions.device)[positions] for k in _MOMENTS}
        theirs = saved.get("indices")
        if (ours is None) != (theirs is None):
            raise ValueError(
                f"{OP}.load_state_dict: {label} is {'dense' if ours is None else 'masked'} here but "
                f"{'dense' if theirs is None else 'masked'} in the state dict (the masks must agree)"
            )
        if ours is None:  # dense: full-shape moments in either layout (DTensors under FSDP2)
            moments = {k: local_part(saved[k], p) for k in _MOMENTS}
            expected = local_tensor(p).numel()
        else:
            if is_dtensor(p):
                raise ValueError(
                    f"{OP}.load_state_dict: the state of {label} is compact (rank-local indices), which a sharded "
                    f"parameter cannot map to its shard; save it with state_layout='full'"
                )
            if not torch.equal(theirs.to(device=ours.device, dtype=ours.dtype), ours):
                raise ValueError(
                    f"{OP}.load_state_dict: the saved indices of {label} differ from this optimizer's mask"
                )
            moments = {k: saved[k] for k in _MOMENTS}
            expected = ours.numel()
        for key, moment in moments.items():
            if moment.numel() != expected:
                raise ValueError(
                    f"{OP}.load_state_dict: {label} {key} must have {expected} entries, got shape {tuple(moment.shape)}"
                )
        return moments

    @torch._disable_dynamo
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by SparseAdamW.state_dict(), from any device, in either layout ("compact" or "full",
        the latter also from another world size: full-shape tensors or DTensors are cut to this rank's pieces): the
        moments are copied, exactly, into this optimizer's float32 buffers on its parameters' devices (torch's loader
        would cast them to the parameters' dtype). The masks must agree: the saved indices (or mask) must equal this
        optimizer's."""
        state_dict = state_dict.copy()
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        saved_groups = deepcopy(state_dict["param_groups"])
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"{OP}.load_state_dict: expected {len(self.param_groups)} parameter groups, got {len(saved_groups)}"
            )
        for gi, (g, sg) in enumerate(zip(self.param_groups, saved_groups)):
            if len(g["params"]) != len(sg["params"]):
                raise ValueError(
                    f"{OP}.load_state_dict: group {gi} expected {len(g['params'])} parameters, got {len(sg['params'])}"
                )
            where = f"{OP}.load_state_dict group {gi}"
            check_hyperparameters(sg["lr"], sg["betas"], sg["eps"], sg["weight_decay"], where=where)
        id_map = {sid: p for g, sg in zip(self.param_groups, saved_groups) for sid, p in zip(sg["params"], g["params"])}
        label_of = dict(zip(self._params(), self._labels()))

        sources = {}
        for b in self._buckets:
            for seg in b.segments:
                sources[seg.param] = {"indices": None if seg.dense else self.state[seg.param]["indices"]}
        for sid, saved in state_dict["state"].items():
            if sid not in id_map:
                raise ValueError(f"{OP}.load_state_dict: state for parameter id {sid!r}, which no saved group lists")
            p = id_map[sid]
            label = label_of[p]
            if p in self._frozen:
                if saved and ("mask" not in saved or bool(local_part(saved["mask"], p).any())):
                    raise ValueError(
                        f"{OP}.load_state_dict: state for {label}, which this optimizer freezes (all-false mask)"
                    )
                continue
            if "mask" in saved and not any(k in saved for k in _MOMENTS):
                raise ValueError(
                    f"{OP}.load_state_dict: {label} is frozen (all-false mask) in the state dict but trained here "
                    f"(the masks must agree)"
                )
            src = sources[p]
            missing = [k for k in ("step", *_MOMENTS) if k not in saved]
            if missing:
                raise ValueError(f"{OP}.load_state_dict: the state of {label} lacks {missing}")
            src.update(self._compact_from_saved(p, label, src["indices"], saved), step=saved["step"])

        for g, sg in zip(self.param_groups, saved_groups):
            sg["params"] = g["params"]
            if "param_names" in g and "param_names" not in sg:
                sg["param_names"] = g["param_names"]
        self.param_groups = saved_groups
        self._rebuild(sources, self._params(), self._labels())
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update(backend=self._backend, frozen=list(self._frozen), state_layout=self._state_layout)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        backend, frozen = state.pop("backend", "auto"), state.pop("frozen", [])
        state_layout = state.pop("state_layout", "auto")
        super().__setstate__(state)
        self._backend, self._frozen, self._ready = backend, set(frozen), True
        self._state_layout = state_layout
        # The per-parameter state is self-describing ("indices" present = masked): rebuild the flat buffers from it.
        sources = {
            p: {"indices": s.get("indices"), **{k: s[k] for k in ("step", "exp_avg", "exp_avg_sq")}}
            for p, s in self.state.items()
        }
        self._rebuild(sources, self._params(), self._labels())
