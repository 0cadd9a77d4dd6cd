"""Sparse RL fine-tuning (Mukherjee et al. 2025, arXiv:2505.11711; docs/design.md §4):
SparseAdamW (AdamW on a masked subnetwork with compact state, one fused launch), mask builders, and the
update-sparsity analysis."""

from rlvr_fast.optim.masks import (
    GradSaliency,
    load_masks,
    mask_density,
    masks_from_diff,
    masks_from_scores,
    random_masks,
    save_masks,
)
from rlvr_fast.optim.sparse_adamw import SparseAdamW, sparse_adamw_reference
from rlvr_fast.optim.sparsity import update_effective_rank, update_rank_ratio, update_sparsity

__all__ = [
    "GradSaliency",
    "SparseAdamW",
    "load_masks",
    "mask_density",
    "masks_from_diff",
    "masks_from_scores",
    "random_masks",
    "save_masks",
    "sparse_adamw_reference",
    "update_effective_rank",
    "update_rank_ratio",
    "update_sparsity",
]
