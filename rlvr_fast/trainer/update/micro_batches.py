"""The micro-batches of a step's update: which rows of the update batch run through the decoder together, and how many
decoder positions each computes (docs/design.md, "The training step").

By token budget (``micro_batch_tokens``, the default): rows are gathered into groups, a group being the rows that share
one prompt (the rows of one prompt's G completions that the update batch kept). Groups are sorted by length (longest
completion, then prompt) so that rows of similar lengths meet and little is padded, and packed greedily, whole, into
micro-batches that compute at most ``budget`` decoder positions. A group that alone exceeds the budget is split by rows
into the fewest near-equal parts that fit (a single row over the budget still runs, alone). The loss stays exact over
any split: each micro-batch's share of the step's normaliser is its own (``StepShare``, ``objective.for_share``).

By count (``grad_accumulation``, the behaviour before the budget): the rows in order, in that many near-equal parts.

Either way each micro-batch is trimmed to its own columns: the prompt columns that every one of its prompts pads (left)
and the completion columns past its longest completion (right) are dropped; positions come from the mask, so trimming
changes nothing but the work.

Decoder positions computed by a micro-batch of R rows, U distinct prompts, P prompt and Lc completion columns after
trimming: shared prefix U*P + R*max(Lc - 1, 1) (``shared_prefix_forward.shared_prefix_hidden``: each prompt once, the
last completion token predicts nothing); unshared R*(P + Lc). Padding: the computed positions whose mask is 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlvr_fast.trainer.config import RLVRConfig
from rlvr_fast.trainer.rollout.engines import Rollout
from rlvr_fast.trainer.step import UpdateBatch
from rlvr_fast.trainer.update.shared_prefix_forward import SharedPrompts, resolve_prefix_sharing


@dataclass(frozen=True)
class MicroBatch:
    """One forward/backward pass: ``rows`` of the update batch, trimmed to prompt columns ``prompt_start:`` and
    completion columns ``:completion_width``."""

    rows: torch.Tensor  # (r,) int64, ascending within a group
    prompt_start: int
    completion_width: int
    decoder_tokens: int  # positions the decoder computes, padding included
    padding_tokens: int  # of which padding (mask 0)

    def rollout(self, rollout: Rollout) -> Rollout:
        """The micro-batch's rows of ``rollout``, trimmed (module doc)."""
        part = rollout.select(self.rows.to(rollout.prompt_ids.device))
        return Rollout(
            prompt_ids=part.prompt_ids[:, self.prompt_start :],
            prompt_mask=part.prompt_mask[:, self.prompt_start :],
            completion_ids=part.completion_ids[:, : self.completion_width],
            completion_mask=part.completion_mask[:, : self.completion_width],
            truncated=part.truncated,
            texts=part.texts,
            rollout_logprobs=None
            if part.rollout_logprobs is None
            else part.rollout_logprobs[:, : self.completion_width],
        )

    def columns(self, per_token: torch.Tensor) -> torch.Tensor:
        """The micro-batch's rows and completion columns of an (R, Lc) per-token tensor of the update batch."""
        return per_token[self.rows.to(per_token.device), : self.completion_width]


@dataclass(frozen=True)
class MicroBatchPlan:
    """The micro-batches of one update batch, and what one pass over them computes."""

    parts: list[MicroBatch]
    shared_prefix: bool
    unshared_tokens: int  # what one pass would compute without sharing and trimming: R x (Lp + Lc) of the batch

    def metrics(self) -> dict[str, float | int]:
        """The step record's fields: micro-batches of one pass over the update batch, the decoder positions they
        compute, the fraction of those that is padding, and the positions today's unshared untrimmed pass computes."""
        computed = sum(p.decoder_tokens for p in self.parts)
        padded = sum(p.padding_tokens for p in self.parts)
        return {
            "micro_batches": len(self.parts),
            "decoder_tokens": computed,
            "decoder_tokens_unshared": self.unshared_tokens,
            "padding_fraction": padded / computed if computed else 0.0,
        }


def plan_micro_batches(
    rollout: Rollout, *, shared_prefix: bool, budget: int | None = None, count: int | None = None
) -> MicroBatchPlan:
    """The micro-batches of the update batch's ``rollout`` (R rows): by decoder-token ``budget``, or by ``count`` when
    given (exactly one of the two)."""
    if (budget is None) == (count is None):
        raise ValueError(f"plan_micro_batches takes exactly one of budget and count, got budget={budget} count={count}")
    limit = budget if budget is not None else count
    if limit < 1:
        raise ValueError(f"plan_micro_batches: {'budget' if budget is not None else 'count'} must be >= 1, got {limit}")
    rows, lc = rollout.completion_ids.shape
    unshared = rows * (rollout.prompt_ids.shape[1] + lc)
    if rows == 0:
        return MicroBatchPlan([], shared_prefix, unshared)
    lengths = _Lengths.of(rollout)
    if count is not None:
        size = -(-rows // count)
        row_sets = [torch.arange(i, min(i + size, rows)) for i in range(0, rows, size)]
    else:
        row_sets = _pack_groups(lengths, shared_prefix, budget)
    parts = [lengths.micro_batch(r, shared_prefix) for r in row_sets]
    return MicroBatchPlan(parts, shared_prefix, unshared)


def plan_micro_batches_by_config(
    model: torch.nn.Module, batch: UpdateBatch, cfg: RLVRConfig, shared_prefix: bool | None = None
) -> MicroBatchPlan:
    """The micro-batches of ``batch`` under ``cfg`` (by ``grad_accumulation`` when set, else by
    ``micro_batch_tokens``); ``shared_prefix`` None: resolved from ``cfg.prefix_sharing`` for ``model``."""
    if shared_prefix is None:
        shared_prefix = resolve_prefix_sharing(model, cfg.prefix_sharing)
    if cfg.grad_accumulation is not None:
        return plan_micro_batches(batch.rollout, shared_prefix=shared_prefix, count=cfg.grad_accumulation)
    return plan_micro_batches(batch.rollout, shared_prefix=shared_prefix, budget=cfg.micro_batch_tokens)


def row_micro_batches(rollout: Rollout, rows: list[int], *, shared_prefix: bool) -> list[MicroBatch]:
    """One micro-batch per row of ``rows`` (of ``rollout``), trimmed and costed like a planned one (the filler
    micro-batches a rank appends under torchrun: ``TrainingWorld.equal_micro_batches``)."""
    lengths = _Lengths.of(rollout)
    return [lengths.micro_batch(torch.tensor([row]), shared_prefix) for row in rows]


# --------------------------------------------------------------------------------------------------------------------
# Lengths and costs
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Lengths:
    """Per-row lengths of a rollout (prompts left-padded, completions right-padded) and each row's group."""

    prompt: torch.Tensor  # (R,) real prompt tokens
    completion: torch.Tensor  # (R,) real completion tokens (the mask's extent)
    group: torch.Tensor  # (R,) index of the row's distinct prompt
    lp: int  # the rollout's prompt columns
    prompt_mask: torch.Tensor  # (R, Lp)
    completion_mask: torch.Tensor  # (R, Lc)

    @classmethod
    def of(cls, rollout: Rollout) -> _Lengths:
        pm, cm = rollout.prompt_mask.cpu(), rollout.completion_mask.cpu()
        lp, lc = pm.shape[1], cm.shape[1]
        # left-padded: a prompt spans from its first real column to the end; right-padded: a completion from column 0
        # to one past its last real column
        first_real = torch.where(pm.bool().any(1), pm.bool().int().argmax(1), lp)
        cols = torch.arange(1, lc + 1)
        extent = (cm.bool() * cols).amax(1) if lc else torch.zeros(cm.shape[0], dtype=torch.long)
        group = SharedPrompts.from_rows(rollout.prompt_ids.cpu(), pm).prompt_index
        return cls(lp - first_real, extent.long(), group, lp, pm, cm)

    def micro_batch(self, rows: torch.Tensor, shared_prefix: bool) -> MicroBatch:
        p = int(self.prompt[rows].max())
        c = max(int(self.completion[rows].max()), 1)
        tokens = _cost(self.group[rows], p, c, len(rows), shared_prefix)
        start = self.lp - p
        real_prompt = self.prompt_mask[rows, start:]
        if shared_prefix:  # each distinct prompt once; completions without their last column
            _, first = _unique_first(self.group[rows])
            real = int(real_prompt[first].sum()) + int(self.completion_mask[rows, : max(c - 1, 1)].sum())
        else:
            real = int(real_prompt.sum()) + int(self.completion_mask[rows, :c].sum())
        return MicroBatch(rows, start, c, tokens, tokens - real)


def _unique_first(groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(distinct values, the position of each one's first occurrence) of a 1-D tensor."""
    values, inverse = torch.unique(groups, return_inverse=True)
    first = torch.full((len(values),), len(groups), dtype=torch.long)
    first.scatter_reduce_(0, inverse, torch.arange(len(groups)), reduce="amin")
    return values, first


def _cost(groups: torch.Tensor, p: int, c: int, rows: int, shared_prefix: bool) -> int:
    """Decoder positions of a micro-batch of ``rows`` rows over P = ``p`` prompt and Lc = ``c`` completion columns
    (module doc)."""
    if shared_prefix:  # the completion pass runs even at c == 1, on one column (prefix_sharing.shared_prefix_hidden)
        return len(torch.unique(groups)) * p + rows * max(c - 1, 1)
    return rows * (p + c)


def _pack_groups(lengths: _Lengths, shared_prefix: bool, budget: int) -> list[torch.Tensor]:
    """Row sets of whole groups, sorted by length, packed greedily under ``budget`` (module doc)."""
    groups = []
    for g in torch.unique(lengths.group).tolist():
        rows = (lengths.group == g).nonzero().squeeze(1)
        groups.append((int(lengths.completion[rows].max()), int(lengths.prompt[rows].max()), g, rows))
    groups.sort(key=lambda item: item[:3])

    out: list[torch.Tensor] = []
    current: list[torch.Tensor] = []
    p = c = 0
    for c_g, p_g, _, rows in groups:
        c_g = max(c_g, 1)
        if _cost(lengths.group[rows], p_g, c_g, len(rows), shared_prefix) > budget:
            out.extend(_split_group(rows, p_g, c_g, shared_prefix, budget))
            continue
        p_new, c_new = max(p, p_g), max(c, c_g)
        together = torch.cat([*current, rows])
        if current and _cost(lengths.group[together], p_new, c_new, len(together), shared_prefix) > budget:
            out.append(torch.cat(current))
            current, p_new, c_new = [], p_g, c_g
        current.append(rows)
        p, c = p_new, c_new
    if current:
        out.append(torch.cat(current))
    return out


def _split_group(rows: torch.Tensor, p: int, c: int, shared_prefix: bool, budget: int) -> list[torch.Tensor]:
    """A group over the budget in the fewest near-equal row parts that each fit (a row that alone exceeds it: alone)."""
    per_row = max(c - 1, 1) if shared_prefix else (p + c)
    fixed = p if shared_prefix else 0
    fits = max((budget - fixed) // per_row, 1) if per_row else len(rows)
    parts = -(-len(rows) // fits)
    return [chunk for chunk in torch.tensor_split(rows, parts) if len(chunk)]
