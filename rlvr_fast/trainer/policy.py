"""The policy update of one step: the loss from the model's last hidden states and its LM head through the fused ops
(never the (tokens x vocab) logits), with the completions that cannot contribute skipped before the decoder runs.

Skipping: with beta == 0 a completion whose advantage is exactly 0 has zero gradient whatever its ratio (the clipped
surrogate is -min(rho A, clip(rho) A) = 0), so its decoder forward and backward are skipped too, not only its LM-head
work. It still counts in the loss's normaliser exactly as if it had run: each micro-batch describes its part of the step
(``StepShare``: its completions and tokens against the step's kept ones) and the loss type's partial normaliser
(``rlvr_fast.ops.loss_types``) says what that part passes as ``num_items`` and by how much its loss is scaled.
"""

from __future__ import annotations

import torch

from rlvr_fast.ops.fused_linear_grpo_loss import fused_linear_grpo_loss
from rlvr_fast.ops.logprobs import token_logprobs
from rlvr_fast.ops.loss_types import StepShare
from rlvr_fast.ops.objective import PolicyObjective
from rlvr_fast.trainer.config import RLVRConfig
from rlvr_fast.trainer.generation import Rollout
from rlvr_fast.trainer.memory import checkpointed_forward
from rlvr_fast.trainer.model import last_hidden_states, lm_head_weight
from rlvr_fast.trainer.update_batch import UpdateBatch


def objective_from_config(cfg: RLVRConfig) -> PolicyObjective:
    """The run's objective. The config always holds max_completion_length (it caps generation too); the loss type
    keeps it only if its normaliser reads it (dr_grpo)."""
    return PolicyObjective.from_settings(
        loss_type=cfg.loss_type,
        beta=cfg.beta,
        kl=cfg.kl,
        eps_low=cfg.eps_low,
        eps_high=cfg.eps_high,
        dual_clip=cfg.dual_clip,
        importance_sampling=cfg.importance_sampling,
        temperature=cfg.temperature,
        max_completion_length=cfg.max_completion_length,
    )


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
    objective = objective_from_config(cfg)
    total_loss = 0.0
    sums: dict[str, float] = {}
    tokens_seen = 0.0
    for part in micro_batches(len(batch.advantages), cfg.grad_accumulation):
        ro = batch.rollout.select(torch.arange(part.start, part.stop))
        mask = batch.loss_mask[part]
        share = StepShare.of_part(part.stop - part.start, float(mask.sum()), batch.step_rows, batch.step_tokens)
        part_objective, scale = objective.for_share(share)
        with checkpointed_forward(model):
            h = completion_hidden(model, ro)
        loss, metrics = fused_linear_grpo_loss(
            h,
            weight,
            ro.completion_ids,
            mask,
            batch.advantages[part],
            old_logp=None if batch.old_logp is None else batch.old_logp[part],
            ref_logp=None if batch.ref_logp is None else batch.ref_logp[part],
            bias=bias,
            return_entropy=True,
            objective=part_objective,
        )
        if scale != 1.0:
            loss = loss * scale
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
