"""The update batch of a step: the completions that run through the model in the policy update, and the normaliser of
the whole step they belong to.

A completion runs when its group was kept by the difficulty filter, it has tokens in the loss, and it can contribute a
gradient: with beta == 0 a completion whose advantage is exactly 0 has none (the clipped surrogate is
-min(rho A, clip(rho) A) = 0), so it is skipped before the decoder runs. Skipped completions still count in the loss's
normaliser (``step_rows`` / ``step_tokens``), exactly as if they had run (``trainer/policy.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlvr_fast.rewards import FilterResult
from rlvr_fast.trainer.config import RLVRConfig
from rlvr_fast.trainer.generation import Rollout


@dataclass
class UpdateBatch:
    rollout: Rollout  # the completions that run (kept by the filter, and non-zero advantage unless beta > 0)
    advantages: torch.Tensor  # (R,) float32
    loss_mask: torch.Tensor  # (R, Lc) float32
    step_rows: float  # completions of the step that count in the normaliser (kept by the filter); / world size
    step_tokens: float  # their active tokens; under data parallelism both are the whole step's / the world size
    skipped_rows: int  # kept completions skipped because A == 0 and beta == 0
    skipped_tokens: float
    old_logp: torch.Tensor | None = None  # (R, Lc) when num_iterations > 1, set by the update before its first step
    ref_logp: torch.Tensor | None = None  # (R, Lc) when beta > 0, likewise


def build_update_batch(rollout: Rollout, advantages: torch.Tensor, kept: FilterResult, cfg: RLVRConfig) -> UpdateBatch:
    """The update batch of ``rollout`` (N completions) from its advantages ((N,) float32) and the filter's verdict.

    ``cfg.mask_truncated_completions`` takes truncated completions out of the loss (and the normaliser); the old-policy
    and reference log-probs are left to the update (``Trainer.update``), which computes them once for all iterations.
    """
    loss_mask = rollout.completion_mask.float()
    if cfg.mask_truncated_completions:
        loss_mask = loss_mask * (~rollout.truncated).float()[:, None]
    in_kept_group = kept.completion_mask(cfg.group_size).to(loss_mask.device)
    advantages = advantages.to(loss_mask.device)
    counted = in_kept_group & (loss_mask.sum(dim=1) > 0)  # completions with tokens in the loss
    runs = counted & ((advantages != 0) | (cfg.beta > 0))
    skipped = counted & ~runs  # zero advantage, beta == 0: no gradient, so no forward either
    rows = runs.nonzero().squeeze(1)
    return UpdateBatch(
        rollout=rollout.select(rows),
        advantages=advantages[rows],
        loss_mask=loss_mask[rows],
        step_rows=int(in_kept_group.sum()),
        step_tokens=float(loss_mask[in_kept_group].sum()),
        skipped_rows=int(skipped.sum()),
        skipped_tokens=float(loss_mask[skipped].sum()),
    )
