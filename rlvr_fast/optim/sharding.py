"""Full-shape tensors and the local shards of DTensor parameters (FSDP2 ``fully_shard``; docs/design.md §4).

SparseAdamW takes masks of the parameters' full (global) shapes, the same masks and mask files at any world size, and
its world-size independent state dict holds full-shape tensors. Under FSDP2 a parameter is a DTensor whose rank-local
piece is ``to_local()``: rows ``[offset, offset + rows)`` of dim 0 (``Shard(0)``, torch.chunk sizes: the last ranks
may hold fewer rows, or none). These helpers cut a full-shape tensor to a parameter's local piece and wrap a local
piece back into a DTensor laid out like the parameter, for any Shard/Replicate placements (the offsets come from
DTensor's own layout function, the one torch.distributed.checkpoint uses).
"""

from __future__ import annotations

import torch

try:  # torch.distributed is optional in a torch build; without it no parameter is a DTensor
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
except ImportError:  # pragma: no cover - every supported torch build has it
    DTensor = None


def is_dtensor(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The rank-local piece of a DTensor (no autograd edge: call under no_grad or on detached data), else ``t``."""
    if not is_dtensor(t):
        return t
    return t._local_tensor


def check_placements(p, label: str, where: str) -> None:
    """Only Shard(dim) and Replicate placements map full-shape masks to local pieces by offsets."""
    for placement in p.placements:
        if type(placement) not in (Shard, Replicate):
            raise ValueError(
                f"{where}: {label} is a DTensor with placement {placement!r}; only Shard(dim) and Replicate "
                f"placements are supported (FSDP2's fully_shard shards dim 0), got placements {tuple(p.placements)}"
            )


def local_slices(p) -> tuple[slice, ...]:
    """The index of the DTensor ``p``'s local piece in its full (global) shape: one slice per dim."""
    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return tuple(slice(o, o + n) for o, n in zip(offset, shape))


def local_part(full: torch.Tensor, like) -> torch.Tensor:
    """The piece of a full-shape tensor that ``like`` (a DTensor parameter) holds on this rank, contiguous.

    ``full``: a plain tensor of ``like``'s global shape, or a DTensor laid out like ``like`` (its local piece is
    taken as is). ``like`` a plain tensor: ``full`` is returned (a plain parameter holds everything).
    """
    if not is_dtensor(like):
        return local_tensor(full) if is_dtensor(full) else full
    if is_dtensor(full):
        if tuple(full.placements) != tuple(like.placements) or full.device_mesh != like.device_mesh:
            full = full.redistribute(like.device_mesh, like.placements)
        return full._local_tensor.contiguous()
    return full[local_slices(like)].contiguous()


def like_sharded(local: torch.Tensor, like) -> torch.Tensor:
    """Wrap a local piece of ``like``'s local shape as a DTensor laid out like ``like`` (``like`` plain: ``local``)."""
    if not is_dtensor(like):
        return local
    return DTensor.from_local(
        local, like.device_mesh, like.placements, run_check=False, shape=like.shape, stride=like.stride()
    )


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered to its full shape (a collective: every rank of its mesh calls it); a plain tensor as is."""
    return t.full_tensor() if is_dtensor(t) else t
