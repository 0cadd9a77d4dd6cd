"""``Rollout.rollout_logprobs`` (an engine's log-probs of its sampled tokens, the off-policy correction's input) stays
aligned with its rows and completion columns wherever the trainer rebuilds a rollout: row selection, a micro-batch's
trimmed view, and the filler rows and widening of a data-parallel rank (a rebuilt rollout that dropped it would
silently turn the correction off).
"""

from dataclasses import replace

import torch

from rlvr_fast.testing import char_tokenizer, random_rollout
from rlvr_fast.trainer.parallel.filler import pad_update_batch
from rlvr_fast.trainer.step import UpdateBatch
from rlvr_fast.trainer.update.micro_batches import plan_micro_batches

PROMPTS = ["What is 2 + 3?", "7-1=", "hello there, how many letters?"]


def rollout_with_logprobs(generator, group_size=4, width=9):
    rollout = random_rollout(char_tokenizer(), PROMPTS, group_size, width, generator)
    logprobs = -torch.rand(rollout.completion_ids.shape, generator=generator) * rollout.completion_mask
    return replace(rollout, rollout_logprobs=logprobs)


def test_select_keeps_rows_aligned(generator):
    rollout = rollout_with_logprobs(generator)
    rows = torch.tensor([5, 0, 11, 3])
    picked = rollout.select(rows)
    assert torch.equal(picked.rollout_logprobs, rollout.rollout_logprobs[rows])
    assert replace(rollout, rollout_logprobs=None).select(rows).rollout_logprobs is None


def test_micro_batches_trim_the_same_columns(generator):
    rollout = rollout_with_logprobs(generator)
    plan = plan_micro_batches(rollout, shared_prefix=True, budget=40)
    assert len(plan.parts) > 1
    for part in plan.parts:
        view = part.rollout(rollout)
        assert view.rollout_logprobs.shape == view.completion_ids.shape
        assert torch.equal(view.rollout_logprobs, part.columns(rollout.rollout_logprobs))


def test_filler_rows_and_widening_carry_them(generator):
    rollout = rollout_with_logprobs(generator)
    short = rollout.select(torch.tensor([1, 2]))  # narrower rows than the filler's source
    short = replace(
        short,
        completion_ids=short.completion_ids[:, :3],
        completion_mask=short.completion_mask[:, :3],
        rollout_logprobs=short.rollout_logprobs[:, :3],
    )
    batch = UpdateBatch(
        rollout=short,
        advantages=torch.ones(2),
        loss_mask=short.completion_mask.float(),
        step_rows=2.0,
        step_tokens=float(short.completion_mask.sum()),
        skipped_rows=0,
        skipped_tokens=0.0,
    )
    padded = pad_update_batch(batch, rollout, rows=5).rollout
    width = rollout.completion_ids.shape[1]
    assert padded.rollout_logprobs.shape == (5, width) == padded.completion_ids.shape
    assert torch.equal(padded.rollout_logprobs[:2, :3], short.rollout_logprobs)
    assert bool((padded.rollout_logprobs[:2, 3:] == 0).all())  # widened columns: mask 0, log-prob 0
    assert torch.equal(padded.rollout_logprobs[2:], rollout.rollout_logprobs[[0, 0, 0]])
