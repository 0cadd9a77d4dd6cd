"""The policy update of one step: the loss from the model's last hidden states and its LM head through the fused ops
(never the (tokens x vocab) logits), with the completions that cannot contribute skipped before the decoder runs.

Skipping: with beta == 0 a completion whose advantage is exactly 0 has zero gradient whatever its ratio (the clipped
surrogate is -min(rho A, clip(rho) A) = 0), so its decoder forward and backward are skipped too, not only its LM-head
work. It still counts in the loss's normaliser exactly as if it had run: each micro-batch describes its part of the step
(``StepShare``: its completions and tokens against the step's kept ones) and the loss type's partial normaliser
(``rlvr_fast.ops.loss_types``) says what that part passes as ``num_items`` and by how much its loss is scaled.

Micro-batches (``micro_batches``): whole groups packed under a decoder-token budget, or a fixed count; each trimmed to
its own padding. Shared prefix (``prefix_sharing``): when on for the model, each micro-batch's distinct prompts run
once and their completions attend to that pass, in the loss's forward and backward and in the old-policy and reference
passes alike; the loss and the gradients are those of the unshared path (tests/trainer/test_shared_update.py).
"""

from __future__ import annotations

import torch

from rlvr_fast.ops.fused_linear_grpo_loss import fused_linear_grpo_loss
from rlvr_fast.ops.grpo_loss import TOKEN_MEAN_METRICS
from rlvr_fast.ops.logprobs import token_logprobs
from rlvr_fast.ops.loss_types import StepShare
from rlvr_fast.ops.objective import PolicyObjective
from rlvr_fast.trainer.config import RLVRConfig
from rlvr_fast.trainer.model import last_hidden_states, lm_head_weight
from rlvr_fast.trainer.precision import Precision, autocast_region, outside_autocast
from rlvr_fast.trainer.rollout.engines import Rollout
from rlvr_fast.trainer.step import UpdateBatch
from rlvr_fast.trainer.update.memory import activation_checkpointed_forward
from rlvr_fast.trainer.update.micro_batches import MicroBatchPlan, plan_micro_batches, plan_micro_batches_by_config
from rlvr_fast.trainer.update.shared_prefix_forward import shared_completion_hidden


def objective_from_config(cfg: RLVRConfig) -> PolicyObjective:
    """The run's objective (``RLVRConfig.objective``)."""
    return cfg.objective()


def completion_hidden(model: torch.nn.Module, rollout: Rollout, shared_prefix: bool = False) -> torch.Tensor:
    """(R, Lc, D): the hidden states at the positions that predict each completion token; with ``shared_prefix`` each
    distinct prompt runs once (``shared_prefix_forward.shared_completion_hidden``, equal to the unshared result)."""
    if shared_prefix:
        return shared_completion_hidden(model, rollout)
    hidden = last_hidden_states(model, rollout.input_ids, rollout.attention_mask)
    lp = rollout.prompt_ids.shape[1]
    return hidden[:, lp - 1 : -1]


@torch.no_grad()
def sequence_logprobs(
    model: torch.nn.Module,
    rollout: Rollout,
    temperature: float,
    plan: MicroBatchPlan | None = None,
    precision: Precision | None = None,
) -> torch.Tensor:
    """(R, Lc) float32 log-probs of the completion tokens under ``model`` (old policy or reference), fused, one
    micro-batch of ``plan`` at a time (None: one unshared pass); columns a micro-batch trims are 0. ``precision``: the
    run's (trainer/precision.py); under autocast the whole pass is one region (each weight cast once)."""
    with autocast_region(precision):
        return _sequence_logprobs(model, rollout, temperature, plan)


def _sequence_logprobs(
    model: torch.nn.Module, rollout: Rollout, temperature: float, plan: MicroBatchPlan | None
) -> torch.Tensor:
    if plan is None:
        plan = plan_micro_batches(rollout, shared_prefix=False, count=1)
    weight, bias = lm_head_weight(model)
    out = torch.zeros(rollout.completion_ids.shape, dtype=torch.float32, device=rollout.completion_ids.device)
    for part in plan.parts:
        ro = part.rollout(rollout)
        h = completion_hidden(model, ro, plan.shared_prefix)
        logp = token_logprobs(h, weight, ro.completion_ids, bias=bias, temperature=temperature)
        out[part.rows.to(out.device), : part.completion_width] = logp
    return out


def policy_step(
    model: torch.nn.Module,
    batch: UpdateBatch,
    cfg: RLVRConfig,
    plan: MicroBatchPlan | None = None,
    precision: Precision | None = None,
) -> dict:
    """Forward + backward of the loss over ``batch``, one micro-batch of ``plan`` at a time (None:
    ``plan_micro_batches_by_config``); returns metrics.

    ``precision``: the run's (trainer/precision.py). Under autocast the micro-batch loop is ONE region, so each weight
    is cast to bf16 once per optimizer step, not once per micro-batch (and once more per activation-checkpointed
    recompute); each backward runs with autocast off (``outside_autocast``), in the dtypes its forward chose.

    The gradients accumulate in ``.grad``; the caller clips and steps the optimizer. ``batch.old_logp`` /
    ``batch.ref_logp`` must cover each micro-batch's columns (``sequence_logprobs`` with the same plan does).
    """
    if plan is None:
        plan = plan_micro_batches_by_config(model, batch, cfg)
    weight, bias = lm_head_weight(model)
    objective = objective_from_config(cfg)
    with autocast_region(precision):
        return _policy_step(model, batch, cfg, plan, weight, bias, objective)


def _policy_step(model, batch, cfg, plan, weight, bias, objective) -> dict:
    total_loss = 0.0
    sums: dict[str, float] = {}
    tokens_seen = 0.0
    correction = CorrectionSummary()
    for part in plan.parts:
        ro = part.rollout(batch.rollout)
        mask = part.columns(batch.loss_mask)
        share = StepShare.of_part(len(part.rows), float(mask.sum()), batch.step_rows, batch.step_tokens)
        part_objective, scale = objective.for_share(share)
        with activation_checkpointed_forward(model):
            h = completion_hidden(model, ro, plan.shared_prefix)
        loss, metrics = fused_linear_grpo_loss(
            h,
            weight,
            ro.completion_ids,
            mask,
            batch.advantages[part.rows.to(batch.advantages.device)],
            old_logp=None if batch.old_logp is None else part.columns(batch.old_logp),
            ref_logp=None if batch.ref_logp is None else part.columns(batch.ref_logp),
            # the engine's log-probs of the sampled tokens, read by the rollout correction only
            rollout_logp=ro.rollout_logprobs if objective.rollout_correction is not None else None,
            bias=bias,
            return_entropy=True,
            objective=part_objective,
        )
        if scale != 1.0:
            loss = loss * scale
        with outside_autocast(loss.device.type):
            loss.backward()
        total_loss += float(loss.detach())
        m = metrics.as_dict()
        n_tok = m.get("tokens", 0.0)
        tokens_seen += n_tok
        for key in TOKEN_MEAN_METRICS:
            if key in m:
                sums[key] = sums.get(key, 0.0) + m[key] * n_tok
        correction.add(m)
    out = {"loss": total_loss, "tokens_updated": tokens_seen}
    out.update({k: v / tokens_seen for k, v in sums.items()} if tokens_seen else {})
    out.update(correction.metrics())
    return out


class CorrectionSummary:
    """The rollout correction's metrics of one optimizer step from its micro-batches' ``rollout_is_*``: means weighted
    by what each is over (``units``: tokens or completions; ``tokens``), minima and maxima as such."""

    def __init__(self):
        self.parts: list[dict[str, float]] = []

    def add(self, m: dict[str, float]) -> None:
        if "rollout_is_units" in m:
            self.parts.append(m)

    def metrics(self) -> dict[str, float]:
        counted = [m for m in self.parts if m["rollout_is_units"] > 0]
        if not counted:
            return {}
        units = sum(m["rollout_is_units"] for m in counted)
        tokens = sum(m["rollout_is_tokens"] for m in counted)

        def mean(key: str, weight: str, total: float) -> float:
            return sum(m[key] * m[weight] for m in counted) / total if total else 0.0

        return {
            "rollout_is_ratio_mean": mean("rollout_is_ratio_mean", "rollout_is_units", units),
            "rollout_is_ratio_min": min(m["rollout_is_ratio_min"] for m in counted),
            "rollout_is_ratio_max": max(m["rollout_is_ratio_max"] for m in counted),
            "rollout_is_clipped_frac": mean("rollout_is_clipped_frac", "rollout_is_units", units),
            "rollout_is_logp_diff_mean": mean("rollout_is_logp_diff_mean", "rollout_is_tokens", tokens),
            "rollout_is_logp_diff_max": max(m["rollout_is_logp_diff_max"] for m in counted),
        }
