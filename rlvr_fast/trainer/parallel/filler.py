"""Filler rows: what a rank with fewer update rows than the others appends so that every rank runs the same
micro-batches, hence the same collectives (each forward/backward holds DDP's all-reduce or FSDP's all-gathers)."""

from __future__ import annotations

from dataclasses import replace

import torch

from rlvr_fast.trainer.rollout.engines import Rollout


def pad_update_batch(batch, rollout, rows: int):
    """``batch`` with filler rows appended up to ``rows``: copies of ``rollout``'s first completion with loss mask 0
    and advantage 0 (and old / reference log-probs 0 when the batch holds them). They add nothing to the loss or the
    gradient, and a loss type's partial normaliser is unchanged by rows without tokens (grpo / dr_grpo divide by the
    rows of the call and scale by its share of the step's rows: the two cancel), yet they make every rank run the same
    micro-batches, hence the same collectives."""
    missing = rows - len(batch.advantages)
    if missing <= 0:
        return batch
    filler = rollout.select(torch.zeros(missing, dtype=torch.long))
    ro = batch.rollout
    if len(batch.advantages):
        width_p = max(ro.prompt_ids.shape[1], filler.prompt_ids.shape[1])
        width_c = max(ro.completion_ids.shape[1], filler.completion_ids.shape[1])
        ro, filler = _widen(ro, width_p, width_c), _widen(filler, width_p, width_c)
        merged = Rollout(
            prompt_ids=torch.cat([ro.prompt_ids, filler.prompt_ids]),
            prompt_mask=torch.cat([ro.prompt_mask, filler.prompt_mask]),
            completion_ids=torch.cat([ro.completion_ids, filler.completion_ids]),
            completion_mask=torch.cat([ro.completion_mask, filler.completion_mask]),
            truncated=torch.cat([ro.truncated, filler.truncated]),
            texts=ro.texts + filler.texts,
            rollout_logprobs=None
            if ro.rollout_logprobs is None
            else torch.cat([ro.rollout_logprobs, filler.rollout_logprobs]),
        )
    else:
        merged = filler
    lc = merged.completion_ids.shape[1]

    def grow(t: torch.Tensor | None, fill_rows: int) -> torch.Tensor | None:
        if t is None:
            return None
        t = torch.nn.functional.pad(t, (0, lc - t.shape[1])) if t.dim() == 2 else t
        shape = (fill_rows, *t.shape[1:])
        return torch.cat([t, t.new_zeros(shape)])

    return replace(
        batch,
        rollout=merged,
        advantages=grow(batch.advantages, missing),
        loss_mask=grow(batch.loss_mask, missing),
        old_logp=grow(batch.old_logp, missing),
        ref_logp=grow(batch.ref_logp, missing),
    )


def _widen(ro, prompt_width: int, completion_width: int):
    """``ro`` left-padded to ``prompt_width`` prompt columns and right-padded to ``completion_width`` completion
    columns (mask 0 on the padding; the token id of the padding is never read)."""
    from torch.nn.functional import pad

    dp, dc = prompt_width - ro.prompt_ids.shape[1], completion_width - ro.completion_ids.shape[1]
    return Rollout(
        prompt_ids=pad(ro.prompt_ids, (dp, 0)),
        prompt_mask=pad(ro.prompt_mask, (dp, 0)),
        completion_ids=pad(ro.completion_ids, (0, dc)),
        completion_mask=pad(ro.completion_mask, (0, dc)),
        truncated=ro.truncated,
        texts=ro.texts,
        rollout_logprobs=None if ro.rollout_logprobs is None else pad(ro.rollout_logprobs, (0, dc)),
    )
