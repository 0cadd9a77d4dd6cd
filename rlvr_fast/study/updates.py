"""What each arm's update changed (finding 5): update sparsity against the base weights, the changed sets saved
bit-packed, and their overlaps between arms and seeds.

Mukherjee et al. 2025 (arXiv:2505.11711; docs/design.md §4) find RL leaves 70-95% of the entries unchanged, in a
subnetwork that overlaps across seeds (~60% vs ~37% by chance), and warn that part of the sparsity may be bf16
rounding. So every arm's final weights are compared with the base weights twice, each time for exact equality
(atol 0): in float32 (the update itself) and after rounding both to bfloat16 (what a bf16 checkpoint keeps), with
``rlvr_fast.optim.update_sparsity``. The changed sets (``masks_from_diff``, the complement) are written with
``save_masks`` (8 entries per byte: 17 MB per dtype for a 135M model), which is also the mask-file format SparseAdamW's
``mask_source`` reads, so a sparse-reuse arm trains exactly the set another arm changed.

Overlaps stream over tensors: for each tensor, every run's packed bits are read once and each pair's intersection and
union are counted with a popcount, so memory holds one tensor per run at a time. Jaccard J = |A & B| / |A | B|; for two
independent random sets of the same densities p and q, E|A & B| = pqN and E|A | B| = (p + q - pq)N, so the chance level
is pq / (p + q - pq).
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Mapping

import numpy as np
import torch

from rlvr_fast.optim import masks_from_diff, save_masks, update_effective_rank, update_rank_ratio, update_sparsity
from rlvr_fast.optim.masks import MASKS_FORMAT

__all__ = [
    "ATOL",
    "COMPARE_DTYPES",
    "MASK_FILES",
    "UPDATE_FILE",
    "changed_set_overlaps",
    "containment",
    "record_update",
    "tensor_kind",
]

ATOL = 0.0  # exact equality after rounding to the comparison dtype
COMPARE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MASK_FILES = {"float32": "changed_fp32.safetensors", "bfloat16": "changed_bf16.safetensors"}
UPDATE_FILE = "update_sparsity.json"


def tensor_kind(name: str) -> str:
    """A parameter's kind across layers: 'model.layers.3.mlp.up_proj.weight' -> 'mlp.up_proj.weight'."""
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[i + 1 :])
    return ".".join(parts[-2:]) if len(parts) >= 2 else name


@torch.no_grad()
def record_update(
    base: Mapping[str, torch.Tensor], trained: Mapping[str, torch.Tensor], run_dir: str, *, rank: bool = False
) -> dict:
    """Compare ``trained`` with ``base`` (name -> tensor, e.g. ``dict(model.named_parameters())``), write the changed
    masks and ``update_sparsity.json`` into ``run_dir``, and return that JSON's content:
    {"atol", "overall": {dtype: unchanged fraction}, "tensors": {name: {"numel", "kind", "unchanged": {dtype: frac}}},
    "masks": {dtype: file name}}. ``rank``: also store, per 2-D tensor, the "effective_rank" and "rank_ratio" of the
    update ``trained - base`` (an SVD per weight: seconds for a large embedding, so only where a preset asks)."""
    base = {n: t.detach() for n, t in base.items()}
    trained = {n: t.detach() for n, t in trained.items()}
    out: dict = {"atol": ATOL, "overall": {}, "tensors": {}, "masks": {}}
    for name, t in base.items():
        out["tensors"][name] = {"numel": t.numel(), "kind": tensor_kind(name), "unchanged": {}}
        if rank and t.dim() == 2 and name in trained:
            # the difference in float64 (exact for float32 weights, and keeps a merged LoRA product clear of W's
            # rounding), its SVD in float32
            diff = (trained[name].double() - t.to(trained[name].device).double()).float()
            out["tensors"][name]["effective_rank"] = update_effective_rank(diff)
            out["tensors"][name]["rank_ratio"] = update_rank_ratio(diff)
    for label, dtype in COMPARE_DTYPES.items():
        fractions = update_sparsity(base, trained, atol=ATOL, dtype=dtype)
        masks = masks_from_diff(base, trained, atol=ATOL, dtype=dtype)
        changed = sum(int(m.sum()) for m in masks.values())
        total = sum(m.numel() for m in masks.values())
        # The two functions are complements by contract; a disagreement would mean a bug in one of them.
        if abs((1.0 - changed / total) - fractions["overall"]) > 1e-9:
            raise RuntimeError(
                f"update_sparsity ({fractions['overall']}) and masks_from_diff "
                f"({1.0 - changed / total}) disagree on the {label} comparison"
            )
        out["overall"][label] = fractions["overall"]
        for name in base:
            out["tensors"][name]["unchanged"][label] = fractions[name]
        path = os.path.join(run_dir, MASK_FILES[label])
        tmp = path + ".tmp"
        save_masks({n: m.cpu() for n, m in masks.items()}, tmp, metadata={"dtype": label, "atol": repr(ATOL)})
        os.replace(tmp, path)
        out["masks"][label] = MASK_FILES[label]
        del masks
    tmp = os.path.join(run_dir, UPDATE_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(out, f)
    os.replace(tmp, os.path.join(run_dir, UPDATE_FILE))
    return out


def _open(path: str):
    from safetensors import safe_open

    handle = safe_open(path, framework="numpy")
    meta = handle.metadata() or {}
    if meta.get("format") != MASKS_FORMAT:
        raise ValueError(f"{path} is not a mask file written by save_masks (format {meta.get('format')!r})")
    return handle, json.loads(meta["shapes"])


_POPCOUNT = getattr(np, "bitwise_count", None)
_TABLE = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def _popcount(x: np.ndarray) -> int:
    """Set bits in a uint8 array (the padding bits save_masks appends are zero, so they never count)."""
    if _POPCOUNT is not None:
        return int(_POPCOUNT(x).sum(dtype=np.int64))
    return int(_TABLE[x].sum(dtype=np.int64))


def changed_set_overlaps(paths: Mapping[str, str]) -> dict:
    """Pairwise overlaps of changed sets given as mask files (run key -> path), streamed tensor by tensor.

    Returns {"changed": {key: count}, "total": entries, "pairs": {"a|b": {"intersection", "union", "jaccard",
    "chance_jaccard"}}}; every file must hold the same tensors with the same shapes.
    """
    keys = list(paths)
    handles = {k: _open(paths[k]) for k in keys}
    if not keys:
        return {"changed": {}, "total": 0, "pairs": {}}
    names = list(handles[keys[0]][1])
    for k in keys[1:]:
        if handles[k][1] != handles[keys[0]][1]:
            raise ValueError(f"mask files {paths[keys[0]]} and {paths[k]} hold different tensors or shapes")
    changed = dict.fromkeys(keys, 0)
    inter = {p: 0 for p in itertools.combinations(keys, 2)}
    union = dict.fromkeys(inter, 0)
    total = 0
    for name in names:
        total += int(np.prod(handles[keys[0]][1][name]))
        bits = {k: handles[k][0].get_tensor(name) for k in keys}
        for k in keys:
            changed[k] += _popcount(bits[k])
        for a, b in inter:
            inter[(a, b)] += _popcount(bits[a] & bits[b])
            union[(a, b)] += _popcount(bits[a] | bits[b])
    pairs = {}
    for (a, b), i in inter.items():
        p, q = changed[a] / total, changed[b] / total
        chance = p * q / (p + q - p * q) if p + q > 0 else float("nan")
        pairs[f"{a}|{b}"] = {
            "intersection": i,
            "union": union[(a, b)],
            "jaccard": i / union[(a, b)] if union[(a, b)] else float("nan"),
            "chance_jaccard": chance,
        }
    return {"changed": changed, "total": total, "pairs": pairs}


def containment(inner: str, outer: str) -> dict:
    """How much of the set in mask file ``inner`` lies inside the set in ``outer``: {"inner", "inside", "outside"}
    (entry counts). A sparse-reuse arm's float32-changed set must lie inside the mask it was trained with."""
    (hi, si), (ho, so) = _open(inner), _open(outer)
    if si != so:
        raise ValueError(f"mask files {inner} and {outer} hold different tensors or shapes")
    count = inside = 0
    for name in si:
        a, b = hi.get_tensor(name), ho.get_tensor(name)
        count += _popcount(a)
        inside += _popcount(a & b)
    return {"inner": count, "inside": inside, "outside": count - inside}
