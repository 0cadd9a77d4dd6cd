"""Row surgery on a ``Rollout``: replace some rows by others of different widths, and the behaviour log-probs carrier.

The rebuilt rollout carries each row's behaviour log-probs in ``Rollout.rollout_logprobs`` from the rebuild until the
update batch is weighted (``processor.TrajectoryProcessor.weight_batch``, which removes it): an off-policy row holds
the per-token log-probs of the policy that sampled it (0 past its mask), an on-policy row NaN. No rollout correction
reads the field meanwhile (preflight refuses rollout_correction with an off-policy mode).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from rlvr_fast.trainer.rollout.engines import Rollout


def _pad(t: torch.Tensor, width: int, value, left: bool) -> torch.Tensor:
    if t.shape[1] >= width:
        return t
    pad = t.new_full((t.shape[0], width - t.shape[1]), value)
    return torch.cat([pad, t] if left else [t, pad], dim=1)


def with_widths(ro: Rollout, prompt_width: int, completion_width: int, pad_id: int) -> Rollout:
    """``ro`` left-padded to ``prompt_width`` prompt columns and right-padded to ``completion_width`` completion
    columns (positions follow the mask's cumulative sum, so padding changes no row's log-probs)."""
    return Rollout(
        _pad(ro.prompt_ids, prompt_width, pad_id, left=True),
        _pad(ro.prompt_mask, prompt_width, 0, left=True),
        _pad(ro.completion_ids, completion_width, pad_id, left=False),
        _pad(ro.completion_mask, completion_width, 0, left=False),
        ro.truncated,
        list(ro.texts),
        None if ro.rollout_logprobs is None else _pad(ro.rollout_logprobs, completion_width, 0.0, left=False),
    )


def with_carrier(ro: Rollout, behaviour: torch.Tensor | None = None) -> Rollout:
    """``ro`` carrying ``behaviour`` (R, Lc) log-probs (off-policy rows), or NaN (on-policy rows) when None."""
    if behaviour is None:
        behaviour = torch.full(ro.completion_ids.shape, float("nan"), device=ro.completion_ids.device)
    return replace(ro, rollout_logprobs=behaviour.float() * ro.completion_mask.float())


def replace_rows(base: Rollout, rows: list[int], new: Rollout, pad_id: int) -> Rollout:
    """``base`` with its rows ``rows`` replaced, in order, by the rows of ``new``; both carry log-probs."""
    if len(rows) != len(new.texts):
        raise ValueError(f"replace_rows: {len(rows)} rows to replace, {len(new.texts)} given")
    pw = max(base.prompt_ids.shape[1], new.prompt_ids.shape[1])
    cw = max(base.completion_ids.shape[1], new.completion_ids.shape[1])
    a, b = with_widths(base, pw, cw, pad_id), with_widths(new, pw, cw, pad_id)
    idx = torch.tensor(rows, dtype=torch.long, device=a.prompt_ids.device)
    out = []
    for name in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "truncated", "rollout_logprobs"):
        t = getattr(a, name).clone()
        t[idx] = getattr(b, name).to(t.device, t.dtype)
        out.append(t)
    texts = list(a.texts)
    for i, r in enumerate(rows):
        texts[r] = b.texts[i]
    return Rollout(*out[:5], texts, out[5])
