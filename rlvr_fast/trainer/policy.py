"""The policy update of one step: the loss from the model's last hidden states and its LM head through the fused ops
(never the (tokens x vocab) logits), with the completions that cannot contribute skipped before the decoder runs.

Skipping: with beta == 0 a completion whose advantage is exactly 0 has zero gradient whatever its ratio (the clipped
surrogate is -min(rho A, clip(rho) A) = 0), so its decoder forward and backward are skipped too, not only its LM-head
work. It still counts in the loss's normaliser exactly as if it had run: dapo through ``num_items`` (the active tokens
of the whole step), bnpo by scaling each micro-batch by its share of the step's tokens, grpo / dr_grpo by its share of
the step's completions.
"""

from __future__ import annotations

import torch

from rlvr_fast.ops.fused_linear_grpo_loss import fused_linear_grpo_loss
from rlvr_fast.ops.logprobs import token_logprobs
from rlvr_fast.trainer.config import RLVRConfig
from rlvr_fast.trainer.generation import Rollout
from rlvr_fast.trainer.memory import checkpointed_forward
from rlvr_fast.trainer.model import last_hidden_states, lm_head_weight
from rlvr_fast.trainer.update_batch import UpdateBatch

# How a loss type's normaliser is reproduced when a micro-batch holds only part of the step's completions:
# "num_items" -> pass the step's active tokens as num_items; "tokens" -> scale the micro-batch loss by its tokens / the
# step's tokens; "rows" -> by its completions / the step's completions.
SUBSET_NORMALISATION = {"dapo": "num_items", "bnpo": "tokens", "grpo": "rows", "dr_grpo": "rows"}


def completion_hidden(model: torch.nn.Module, rollout: Rollout) -> torch.Tensor:
    """(R, Lc, D): the hidden states at the positions that predict each completion token."""
    hidden = last_hidden_states(model, rollout.input_ids, rollout.attention_mask)
    lp = rollout.prompt_ids.shape[1]
    return hidden[:, lp - 1 : -1]


@torch.no_grad()
def sequence_logprobs(model: torch.nn.Module, rollout: Rollout, temperature: float) -> torch.Tensor:
    """(R, Lc) float32 log-probs of the completion tokens under ``model`` (old policy or reference), fused."""
    weight, bias = lm_head_weight(model)
    h = completion_hidden(model, rollout)
    return token_logprobs(h, weight, rollout.completion_ids, bias=bias, temperature=temperature)


def micro_batches(rows: int, n: int) -> list[slice]:
    size = -(-rows // n) if rows else 0
    return [slice(i, min(i + size, rows)) for i in range(0, rows, size)] if rows else []


def policy_step(model: torch.nn.Module, batch: UpdateBatch, cfg: RLVRConfig) -> dict:
    """Forward + backward of the loss over ``batch`` in ``cfg.grad_accumulation`` micro-batches; returns metrics.

    The gradients accumulate in ``.grad``; the caller clips and steps the optimizer.
    """
    weight, bias = lm_head_weight(model)
    mode = SUBSET_NORMALISATION[cfg.loss_type]
    total_loss = 0.0
    sums: dict[str, float] = {}
    tokens_seen = 0.0
    for part in micro_batches(len(batch.advantages), cfg.grad_accumulation):
        ro = batch.rollout.select(torch.arange(part.start, part.stop))
        with checkpointed_forward(model):
            h = completion_hidden(model, ro)
        loss, metrics = fused_linear_grpo_loss(
            h,
            weight,
            ro.completion_ids,
            batch.loss_mask[part],
            batch.advantages[part],
            old_logp=None if batch.old_logp is None else batch.old_logp[part],
            ref_logp=None if batch.ref_logp is None else batch.ref_logp[part],
            bias=bias,
            temperature=cfg.temperature,
            beta=cfg.beta,
            kl=cfg.kl,
            eps_low=cfg.eps_low,
            eps_high=cfg.eps_high,
            dual_clip=cfg.dual_clip,
            loss_type=cfg.loss_type,
            importance_sampling=cfg.importance_sampling,
            max_completion_length=cfg.max_completion_length if cfg.loss_type == "dr_grpo" else None,
            num_items=batch.step_tokens if mode == "num_items" else None,
            return_entropy=True,
        )
        if mode == "rows":
            loss = loss * ((part.stop - part.start) / batch.step_rows)
        elif mode == "tokens":
            loss = loss * (float(batch.loss_mask[part].sum()) / batch.step_tokens)
        loss.backward()
        total_loss += float(loss.detach())
        m = metrics.as_dict()
        n_tok = m.get("tokens", 0.0)
        tokens_seen += n_tok
        for key in ("clip_low_frac", "clip_high_frac", "dual_clip_frac", "mean_ratio", "mean_kl", "mean_entropy"):
            if key in m:
                sums[key] = sums.get(key, 0.0) + m[key] * n_tok
    out = {"loss": total_loss, "tokens_updated": tokens_seen}
    out.update({k: v / tokens_seen for k, v in sums.items()} if tokens_seen else {})
    return out
