"""Masks for SparseAdamW: which entries of each parameter to train (True = trained).

A mask set is a dict name -> bool tensor of the parameter's shape (names as in ``model.named_parameters()`` /
``model.state_dict()``), which ``SparseAdamW(model.named_parameters(), masks)`` takes directly.

Sources (Mukherjee et al. 2025, arXiv:2505.11711; docs/design.md §4):
- ``masks_from_diff``: the entries a prior RL run changed, |theta_RL - theta_0| > atol in a comparison dtype (the
  paper's subnetwork; it overlaps across seeds).
- ``GradSaliency`` + ``masks_from_scores``: the entries with the largest accumulated |grad| (or grad^2) over warm-up
  steps, keeping exactly round(density * n) entries, per tensor or globally.
- ``random_masks``: each entry independently with probability ``density`` (seeded): the control.
``save_masks`` / ``load_masks`` store them in safetensors, 8 entries per byte.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence

import torch

from rlvr_fast.optim.sharding import full_tensor, is_dtensor, local_tensor
from rlvr_fast.optim.sparsity import _as_compared, _check_states

MASKS_FORMAT = "rlvr_fast.masks/1"  # safetensors metadata "format": bit-packed bool masks, shapes in "shapes"
SCOPES = ("tensor", "global")
SALIENCY_MODES = {"abs": lambda g: g.abs(), "sq": lambda g: g * g}  # |grad| and grad^2 (Fisher diagonal)
_BIT_WEIGHTS = (128, 64, 32, 16, 8, 4, 2, 1)  # the first entry goes to the most significant bit (numpy.packbits)


def check_density(density, where: str) -> float:
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < density <= 1.0:
        raise ValueError(f"{where}: density must be a number in (0, 1], got {density!r}")
    return float(density)


def _keep_count(density: float, n: int) -> int:
    return min(n, math.floor(density * n + 0.5))


def mask_density(masks: Mapping[str, torch.Tensor | None]) -> float:
    """Fraction of entries kept over all the masks given (None entries, dense of unknown size, are skipped)."""
    kept = sum(int(m.sum()) for m in masks.values() if m is not None)
    total = sum(m.numel() for m in masks.values() if m is not None)
    return kept / total if total else 0.0


# --------------------------------------------------------------------------------------------------------------------
# From a prior run's diff
# --------------------------------------------------------------------------------------------------------------------


def masks_from_diff(
    state_a: Mapping[str, torch.Tensor],
    state_b: Mapping[str, torch.Tensor],
    atol: float = 1e-5,
    dtype: torch.dtype = torch.bfloat16,
) -> dict[str, torch.Tensor]:
    """Masks of the entries that changed between two checkpoints: |b - a| > atol after rounding both to ``dtype``.

    The complement of ``update_sparsity``'s "unchanged" (same atol and dtype semantics; NaN counts as changed).
    Non-floating tensors are skipped. Masks are on state_a's devices.
    """
    where = "masks_from_diff"
    if isinstance(atol, bool) or not isinstance(atol, (int, float)) or not atol >= 0 or not math.isfinite(atol):
        raise ValueError(f"{where}: atol must be a finite number >= 0, got {atol!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"{where}: dtype must be a floating torch.dtype, got {dtype!r}")
    out = {}
    for name in _check_states(state_a, state_b, where):
        a, b = _as_compared(state_a[name], state_b[name], dtype)
        out[name] = ~((b - a).abs() <= atol)
    return out


# --------------------------------------------------------------------------------------------------------------------
# From accumulated gradient saliency
# --------------------------------------------------------------------------------------------------------------------


class GradSaliency:
    """Accumulates |grad| (mode="abs") or grad^2 (mode="sq") per entry over warm-up steps, in float32.

    Usage: ``sal = GradSaliency(model.named_parameters())``; after each warm-up backward ``sal.accumulate()``; then
    ``masks = sal.masks(density=0.1, scope="global")``. Parameters whose grad is None at a step are skipped for it.
    Memory: 4 bytes per parameter while accumulating.

    FSDP2 (DTensor parameters): each rank accumulates the saliency of its local pieces (4 bytes per local entry);
    ``masks()`` gathers the scores to full shape (a collective: every rank calls it) and returns the same full-shape
    masks on every rank, the masks one process would pick from the same gradients.
    """

    def __init__(
        self, named_params: Iterable[tuple[str, torch.Tensor]] | Mapping[str, torch.Tensor], mode: str = "abs"
    ):
        if mode not in SALIENCY_MODES:
            raise ValueError(f"GradSaliency: mode must be one of {sorted(SALIENCY_MODES)}, got {mode!r}")
        items = list(named_params.items() if isinstance(named_params, Mapping) else named_params)
        for item in items:
            if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], torch.Tensor)):
                raise TypeError(f"GradSaliency: expected (name, tensor) pairs, got {type(item).__name__}")
        self.mode = mode
        self.params = dict(items)
        self.scores = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in self.params.items()}
        self.steps = 0

    @torch.no_grad()
    def accumulate(self) -> None:
        """Add this step's saliency of every parameter that has a grad."""
        for name, p in self.params.items():
            if p.grad is not None:
                score = local_tensor(self.scores[name])  # a DTensor's grad is laid out like its parameter
                score.add_(SALIENCY_MODES[self.mode](local_tensor(p.grad).detach().float()))
        self.steps += 1

    def masks(self, density: float, scope: str = "tensor") -> dict[str, torch.Tensor]:
        if self.steps == 0:
            raise ValueError("GradSaliency.masks: no step was accumulated yet (call accumulate() after backward)")
        return masks_from_scores({n: full_tensor(s) for n, s in self.scores.items()}, density, scope)


def masks_from_scores(
    scores: Mapping[str, torch.Tensor], density: float, scope: str = "tensor"
) -> dict[str, torch.Tensor]:
    """Keep the entries with the largest non-negative scores: exactly round(density * n) of them.

    scope="tensor": n is each tensor's size (every tensor keeps the same fraction). scope="global": n is the total
    over all tensors (tensors that matter more keep more). Ties at the threshold are broken by order (the dict's order,
    then the flat position), so the count is exact and the result deterministic.

    The k-th largest score is found exactly by bisection on the float32 bit patterns (non-negative floats order like
    their bits): 31 counting passes, no sort and no concatenated copy of the scores.
    """
    where = "masks_from_scores"
    density = check_density(density, where)
    if scope not in SCOPES:
        raise ValueError(f"{where}: scope must be one of {SCOPES}, got {scope!r}")
    if not isinstance(scores, Mapping) or not scores:
        raise ValueError(f"{where}: scores must be a non-empty mapping name -> tensor")
    bits = {}
    for name, s in scores.items():
        if not isinstance(s, torch.Tensor) or not s.is_floating_point():
            raise TypeError(f"{where}: scores[{name!r}] must be a floating tensor, got {getattr(s, 'dtype', type(s))}")
        s32 = s.detach().to(torch.float32).contiguous()
        if bool(torch.isnan(s32).any()) or bool((s32 < 0).any()):
            raise ValueError(f"{where}: scores[{name!r}] must be non-negative and not NaN")
        bits[name] = s32.view(torch.int32)
    if scope == "global":
        total = sum(b.numel() for b in bits.values())
        return _top_k(bits, _keep_count(density, total))
    out = {}
    for name, b in bits.items():
        out.update(_top_k({name: b}, _keep_count(density, b.numel())))
    return out


def _top_k(bits: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Masks of exactly k entries with the largest values over all tensors (bit patterns of non-negative floats)."""
    masks = {n: torch.zeros(b.shape, dtype=torch.bool, device=b.device) for n, b in bits.items()}
    if k == 0:
        return masks

    def count_at_least(t: int) -> int:
        return sum(int((b >= t).sum()) for b in bits.values())

    # Largest threshold T with count(bits >= T) >= k; count(bits >= 0) is the total >= k. +inf is 0x7F800000.
    lo, hi = 0, 0x7F800000
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count_at_least(mid) >= k:
            lo = mid
        else:
            hi = mid - 1
    threshold = lo
    need = k
    for name, b in bits.items():
        masks[name] = b > threshold
        need -= int(masks[name].sum())
    for name, b in bits.items():  # fill up with ties at the threshold, in order (-0.0 has negative bits: tie with 0)
        if need == 0:
            break
        tie = (b == threshold) if threshold > 0 else (b <= 0)
        positions = tie.reshape(-1).nonzero().squeeze(1)[:need]
        masks[name].view(-1)[positions] = True
        need -= positions.numel()
    return masks


# --------------------------------------------------------------------------------------------------------------------
# Random
# --------------------------------------------------------------------------------------------------------------------


def random_masks(
    shapes: Mapping[str, torch.Tensor | torch.Size | tuple[int, ...]]
    | Sequence[torch.Tensor | torch.Size | tuple[int, ...]],
    density: float,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> dict[str, torch.Tensor] | list[torch.Tensor]:
    """Each entry kept independently with probability ``density``.

    ``shapes``: name -> tensor (its shape and device are used) or shape, or a sequence of them (e.g.
    ``list(model.parameters())``), whose masks come back as a list in the same order (entry i is parameter i's:
    the form ``SparseAdamW(params, masks)`` takes for unnamed parameters). Drawn on the CPU from one generator seeded
    with ``seed``, in order, so the same seed gives the same masks on any device; ``device`` (default: each tensor's
    device, else CPU) is where they are returned.
    """
    where = "random_masks"
    density = check_density(density, where)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"{where}: seed must be an int, got {type(seed).__name__}")
    if isinstance(shapes, Mapping):
        items = list(shapes.items())
    elif isinstance(shapes, (torch.Tensor, str, bytes)) or not isinstance(shapes, Iterable):
        raise TypeError(
            f"{where}: shapes must be a mapping name -> tensor/shape or a sequence of tensors/shapes, "
            f"got {type(shapes).__name__}"
        )
    else:
        items = list(enumerate(shapes))
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, spec in items:
        if not isinstance(spec, (torch.Tensor, torch.Size, tuple, list)):
            raise TypeError(f"{where}: shapes[{name!r}] must be a tensor or a shape, got {type(spec).__name__}")
        shape = tuple(spec.shape) if isinstance(spec, torch.Tensor) else tuple(spec)
        target = device if device is not None else (spec.device if isinstance(spec, torch.Tensor) else "cpu")
        out[name] = (torch.rand(shape, generator=gen) < density).to(target)
    return out if isinstance(shapes, Mapping) else [out[i] for i in range(len(items))]


# --------------------------------------------------------------------------------------------------------------------
# Save / load (safetensors, 8 entries per byte)
# --------------------------------------------------------------------------------------------------------------------


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """(n,) bool (any shape, flattened row-major) -> (ceil(n / 8),) uint8, first entry in the most significant bit."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=flat.device)
    return (flat.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    n = math.prod(shape)
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=packed.device)
    bits = (packed.reshape(-1, 1) >> shifts) & 1
    return bits.reshape(-1)[:n].bool().reshape(shape)


def save_masks(masks: Mapping[str, torch.Tensor], path: str, metadata: Mapping[str, str] | None = None) -> None:
    """Save name -> bool mask to a safetensors file (bit-packed; shapes and ``metadata`` in the header).

    The file always holds full-shape masks, so it loads at any world size. DTensor masks (sharded like FSDP2
    parameters) are gathered to their full shapes: then every rank must call save_masks (a collective), rank 0 writes
    the file and the ranks leave together (a barrier), so no rank reads a half-written file."""
    from safetensors.torch import save_file

    meta = dict(metadata or {})
    for reserved in ("format", "shapes"):
        if reserved in meta:
            raise ValueError(f"save_masks: metadata key {reserved!r} is reserved")
    packed, shapes = {}, {}
    for name, m in masks.items():
        if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
            got = getattr(m, "dtype", type(m))
            raise TypeError(f"save_masks: masks[{name!r}] must be a torch.bool tensor, got {got}")
        packed[name] = pack_bits(full_tensor(m.detach())).cpu()
        shapes[name] = list(m.shape)
    gathered = any(is_dtensor(m) for m in masks.values())
    writer = not gathered or not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    if writer:
        meta.update(format=MASKS_FORMAT, shapes=json.dumps(shapes))
        save_file(packed, path, metadata=meta)
    if gathered and torch.distributed.is_initialized():
        torch.distributed.barrier()


def load_masks(path: str, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Load the masks ``save_masks`` wrote, as bool tensors on ``device``."""
    from safetensors import safe_open

    with safe_open(path, framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
        if meta.get("format") != MASKS_FORMAT:
            raise ValueError(
                f"load_masks: {path} is not a mask file (format {meta.get('format')!r}, expected {MASKS_FORMAT!r})"
            )
        shapes = json.loads(meta["shapes"])
        return {name: unpack_bits(f.get_tensor(name), tuple(shape)).to(device) for name, shape in shapes.items()}
