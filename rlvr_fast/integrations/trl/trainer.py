"""rlvr_fast inside TRL's ``GRPOTrainer``: the fused hidden-state log-probs and loss, TRL's loop around them.

Use ``RLVRFastGRPOTrainer`` in place of ``trl.GRPOTrainer`` (same arguments, plus the options below), or
``patch_grpo_trainer(trainer)`` on a trainer already built. What changes, and what does not:

- log-probs: TRL's fused LM head (``add_fused_lm_head``: ``[4096, 32768]`` logit tiles, and on the CPU every position
  of prompt and completion scored) is replaced, on the policy and the reference model, by ``token_logprobs``:
  LM head + log-softmax + gather (+ entropy) in chunks, only on the completion positions, never the (N, V) logits.
  TRL's ``_get_per_token_logps_and_entropies`` keeps calling ``model(..., fused_lm_head=True)``; the model answers
  through our head. Old and reference log-probs (num_iterations > 1, beta > 0) go through it too.
- loss: ``_compute_loss`` runs the backbone once and, inside the model's forward, takes the last hidden states of the
  completion positions and calls ``rlvr_fast.integrations.policy_loss.hidden_state_policy_loss`` (token_logprobs +
  grpo_loss, or the fused op), with TRL's normalisers (gradient accumulation, dapo's ``num_items_in_batch``), and logs
  TRL's metric names (entropy, kl, clip_ratio/low_mean, high_mean, region_mean).
- FSDP2 (accelerate's ``fsdp_version=2``): the LM head (tied to the embedding or not) is a parameter of the root
  module, which FSDP2 all-gathers in the root's pre-forward hook. Both the log-prob head and the loss read
  ``lm_head.weight`` inside the model's forward, so they get the unsharded weight, only while the root is unsharded,
  and its gradient accumulates on FSDP2's unsharded parameter, which FSDP2 reduce-scatters after backward (the
  (tokens x vocab) logits are never formed, on any rank). A head still sharded inside the forward (an lm_head wrapped
  as its own FSDP unit) and FSDP1 are refused.
- every GRPOConfig setting that changes the loss is either trained exactly or refused by name
  (``rlvr_fast.integrations.trl.config``); the model is checked too (logit soft-capping / scaling, multimodal, MoE,
  a ZeRO-3-sharded LM head are refused).
- advantages: unchanged unless ``sample_mode`` / ``estimator`` say otherwise (``trl_advantages.AdvantageOptions``).
- generation, rewards, data, logging, checkpoints: TRL's, untouched.

Supported TRL: ``SUPPORTED_TRL`` (the methods replaced are private to TRL and change between minor releases; the
version is checked when a trainer is built or patched).
"""

from __future__ import annotations

import functools
from contextlib import nullcontext
from typing import Any

import torch

try:
    import trl
    from trl import GRPOTrainer
    from trl.trainer.utils import FusedCausalLMOutput
except ImportError as exc:  # pragma: no cover - exercised only without trl
    raise ImportError(
        "rlvr_fast.integrations.trl needs TRL: pip install 'rlvr_fast[trl]' (supported: trl>=1.16,<1.17)"
    ) from exc

from rlvr_fast.backends import check_backend_available, check_backend_name
from rlvr_fast.integrations import policy_loss
from rlvr_fast.integrations.policy_loss import IMPLEMENTATIONS, hidden_state_policy_loss
from rlvr_fast.integrations.trl.advantages import AdvantageOptions, recompute_advantages
from rlvr_fast.integrations.trl.config import (
    TRLLossSettings,
    UnsupportedTRLSetting,
    check_grpo_config,
    check_model,
    check_settings,
)
from rlvr_fast.integrations.trl.rewards import trl_reward_func
from rlvr_fast.ops.constants import IGNORE_INDEX
from rlvr_fast.ops.group_advantage import CUDA_OP as GROUP_ADVANTAGE_CUDA_OP
from rlvr_fast.ops.logprobs import token_logprobs
from rlvr_fast.ops.loss_types import StepShare
from rlvr_fast.optim.sharding import is_dtensor

SUPPORTED_TRL = ">=1.16,<1.17"
_HEAD_ATTR = "_rlvr_fast_head"

__all__ = [
    "SUPPORTED_TRL",
    "AdvantageOptions",
    "RLVRFastGRPOTrainer",
    "UnsupportedTRLSetting",
    "check_grpo_config",
    "check_trl_version",
    "install_hidden_state_head",
    "patch_grpo_trainer",
    "trl_reward_func",
]


def check_trl_version(version: str | None = None) -> str:
    """The installed TRL version, or ImportError when it is outside ``SUPPORTED_TRL``."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    found = trl.__version__ if version is None else version
    try:
        ok = Version(found) in SpecifierSet(SUPPORTED_TRL)
    except InvalidVersion:
        ok = False
    if not ok:
        raise ImportError(
            f"rlvr_fast's TRL integration supports trl{SUPPORTED_TRL}, found trl {found}: it replaces GRPOTrainer "
            f"methods that are private to TRL and change between minor releases. Install a supported version "
            f"(pip install 'rlvr_fast[trl]')."
        )
    return found


# --------------------------------------------------------------------------------------------------------------------
# The LM head: the model's forward answers TRL's fused_lm_head=True calls (log-probs) and our own hidden-state calls
# --------------------------------------------------------------------------------------------------------------------


def _head_params(model) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The LM head's weight and bias as the model's forward sees them: under FSDP2 the unsharded parameters (the root
    module's pre-forward all-gathered them), whose gradients FSDP2 reduce-scatters after backward."""
    head = model.get_output_embeddings()
    weight, bias = head.weight, getattr(head, "bias", None)
    if is_dtensor(weight):
        raise UnsupportedTRLSetting(
            f"rlvr_fast's TRL integration found {type(model).__name__}'s lm_head.weight still sharded (a DTensor of "
            f"placements {tuple(weight.placements)}) inside the model's forward: the LM head is wrapped as its own "
            f"FSDP unit, whose forward the fused head never calls. Let FSDP2 wrap the decoder layers and the root "
            f"only (accelerate's TRANSFORMER_BASED_WRAP), so the head belongs to the root"
        )
    return weight, bias


def _head_context(cast_fp32: bool, device_type: str):
    """TRL's cast_lm_head_to_fp32 projects in float32 outside autocast; otherwise the caller's autocast applies."""
    return torch.autocast(device_type, enabled=False) if cast_fp32 else nullcontext()


def install_hidden_state_head(
    model: torch.nn.Module,
    *,
    temperature: float,
    cast_lm_head_to_fp32: bool = False,
    with_entropy: bool = False,
    backend: str = "auto",
) -> None:
    """Make ``model(..., fused_lm_head=True, labels=...)`` return TRL's ``FusedCausalLMOutput`` from ``token_logprobs``,
    ``model(..., rlvr_fast_hidden_last=k)`` return the (B, k, D) last hidden states that predict the last k tokens, and
    ``model(..., rlvr_fast_hidden_last=k, rlvr_fast_head_fn=fn)`` return ``fn(hidden, weight, bias)`` with those
    hidden states and the LM head's parameters, called inside the forward (where FSDP2 has the head unsharded).

    Any other call runs the model's previous forward (generation is unchanged). Like TRL's own head, the forward is
    patched on the instance, so DDP / accelerate wrappers still route through it. Installing twice raises.
    """
    if getattr(model, _HEAD_ATTR, None) is not None:
        raise RuntimeError(f"install_hidden_state_head: {type(model).__name__} already has rlvr_fast's head")
    check_model(model)
    previous = model.forward
    settings = {
        "temperature": float(temperature),
        "cast_fp32": bool(cast_lm_head_to_fp32),
        "with_entropy": bool(with_entropy),
        "backend": backend,
    }

    @functools.wraps(type(model).forward)
    def forward(
        self,
        *args,
        fused_lm_head=False,
        rlvr_fast_hidden_last=None,
        rlvr_fast_head_fn=None,
        labels=None,
        shift_labels=None,
        **kwargs,
    ):
        if not fused_lm_head and rlvr_fast_hidden_last is None:
            if labels is not None:
                kwargs["labels"] = labels
            if shift_labels is not None:
                kwargs["shift_labels"] = shift_labels
            return previous(*args, **kwargs)
        kwargs["use_cache"] = False
        kwargs.pop("num_items_in_batch", None)
        hidden = self.base_model(*args, **kwargs).last_hidden_state  # the backbone: no LM head, no logits
        weight, bias = _head_params(self)
        hidden = hidden.to(weight.device)
        if rlvr_fast_hidden_last is not None:
            k = int(rlvr_fast_hidden_last)
            hidden = hidden[:, hidden.shape[1] - k - 1 : -1]
            return hidden if rlvr_fast_head_fn is None else rlvr_fast_head_fn(hidden, weight, bias)
        if shift_labels is None:
            if labels is None:
                raise ValueError("model(..., fused_lm_head=True) needs labels= (-100 where no log-prob is wanted)")
            hidden, targets = hidden[:, :-1], labels[:, 1:]
        else:
            targets = shift_labels
        targets = targets.to(weight.device)
        if settings["cast_fp32"]:
            hidden, weight, bias = hidden.float(), weight.float(), None if bias is None else bias.float()
        with _head_context(settings["cast_fp32"], hidden.device.type):
            out = token_logprobs(
                hidden,
                weight,
                targets,
                bias=bias,
                temperature=settings["temperature"],
                ignore_index=IGNORE_INDEX,
                return_entropy=settings["with_entropy"],
                backend=settings["backend"],
            )
        logp, entropy = out if settings["with_entropy"] else (out, None)
        mask = targets != IGNORE_INDEX
        return FusedCausalLMOutput(
            loss=-logp.sum() / mask.sum().clamp(min=1), log_probs=logp, entropy=entropy, label_mask=mask
        )

    model.forward = forward.__get__(model)
    setattr(model, _HEAD_ATTR, settings)


# --------------------------------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------------------------------


def rollout_inputs_from_ratio(
    old_logp: torch.Tensor, ratio: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor, correction: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rollout_logp, advantages) that make the loss's rollout correction reproduce TRL's importance_sampling_ratio.

    TRL computes the ratio itself (from vLLM's sampling log-probs s, truncated or masked by its mode) and multiplies
    the policy term by it; the fused loss weights the policy term by ``min(exp(old - rollout), C)`` per token
    (``token_truncate``) or ``min(exp(sum_t m_t (old_t - rollout_t)), C)`` per completion (``sequence_truncate``), C =
    TRL's clip_max, which TRL's ratio never exceeds. The rollout log-probs chosen are log-probs (<= 0, as the loss
    checks) whenever the ratio came from real ones:

    - token_truncate, ratio (B, T) = min(exp(old - s), C): rollout = old - log(ratio) = max(s, old - log C) <= 0;
    - sequence modes, ratio R (B, 1): each counted token carries a share of log R proportional to its old log-prob,
      rollout_t = old_t * (1 - log R / S) with S = sum_t m_t old_t (<= 0 because log R >= S when R = exp(S - sum s)
      or R = C >= 1); an all-zero S splits log R evenly. A completion TRL's sequence_mask dropped (R = 0) gets
      advantage 0 instead, which zeroes its policy term as TRL's factor 0 does (its KL and normalisers stay).

    Shapes: old_logp (B, T), ratio (B, T) or (B, 1), mask (B, T), advantages (B,); returns (B, T) float32, (B,).
    """
    old = old_logp.float()
    if correction == "token_truncate":
        return old - torch.log(ratio.float()), advantages
    if ratio.shape[-1] != 1:
        raise ValueError(
            f"importance_sampling_ratio must be (B, 1) for a sequence-level correction, got {tuple(ratio.shape)}"
        )
    kept = ratio[:, 0] > 0
    log_r = torch.log(torch.where(ratio > 0, ratio.float(), 1.0))  # (B, 1)
    active = (mask != 0).float()
    total = (old * active).sum(dim=-1, keepdim=True)
    count = active.sum(dim=-1, keepdim=True).clamp(min=1.0)
    share = torch.where(total < 0, old * log_r / total.clamp(max=-1e-30), log_r / count)
    return old - share * active, torch.where(kept, advantages, torch.zeros_like(advantages))


def _refuse_sharded_head(trainer) -> None:
    """ZeRO-3 and FSDP1 shard the head in ways the fused head does not gather; FSDP2 is supported (module doc)."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        raise UnsupportedTRLSetting(
            "rlvr_fast's TRL integration reads lm_head.weight directly and does not gather DeepSpeed ZeRO-3 shards; "
            "use ZeRO stage <= 2, FSDP2 (fsdp_config fsdp_version=2) or the stock GRPOTrainer"
        )
    if getattr(trainer, "is_fsdp_enabled", False):
        version = getattr(trainer.accelerator.state.fsdp_plugin, "fsdp_version", 1)
        if version != 2:
            raise UnsupportedTRLSetting(
                f"rlvr_fast's TRL integration supports FSDP2 only (the head reads the root's unsharded parameters in "
                f"its forward; tested with fully_shard), got fsdp_version={version}; set fsdp_config "
                f"fsdp_version=2, or use the stock GRPOTrainer"
            )


class _RLVRFastMixin:
    """The methods that replace GRPOTrainer's loss and post-process its advantages (module doc)."""

    _rlvr_fast_options: AdvantageOptions
    _rlvr_fast_backend: str
    _rlvr_fast_implementation: str
    _rlvr_fast_rewards: torch.Tensor | None

    def _rlvr_fast_setup(self, options: AdvantageOptions, backend: str, implementation: str | None) -> None:
        check_trl_version()
        if implementation is not None and implementation not in IMPLEMENTATIONS:
            raise ValueError(f"implementation must be None or one of {sorted(IMPLEMENTATIONS)}, got {implementation!r}")
        check_settings(TRLLossSettings.from_trainer(self))
        _refuse_sharded_head(self)
        from accelerate.utils import is_peft_model

        policy = self.model.get_base_model() if is_peft_model(self.model) else self.model
        check_model(policy)
        device = next(policy.parameters()).device
        check_backend_available("RLVRFastGRPOTrainer", backend, device, _TRAINER_OPS)
        self._rlvr_fast_options = options.validate(self)
        self._rlvr_fast_backend = backend
        self._rlvr_fast_implementation = implementation or policy_loss.DEFAULT_IMPLEMENTATION
        self._rlvr_fast_rewards = None
        cast = bool(self.args.cast_lm_head_to_fp32)
        # The policy's head returns the entropy too, as TRL's does (its _get_per_token_logps_and_entropies contract).
        install_hidden_state_head(
            policy, temperature=self.temperature, cast_lm_head_to_fp32=cast, with_entropy=True, backend=backend
        )
        if self.ref_model is not None:
            install_hidden_state_head(
                self.ref_model, temperature=self.temperature, cast_lm_head_to_fp32=cast, backend=backend
            )

    # ---- the loss ---------------------------------------------------------------------------------------------------

    def _compute_loss(self, model, inputs):
        objective = check_settings(TRLLossSettings.from_trainer(self))  # TRL's loss reads these on every call
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        advantages = inputs["advantages"]
        if advantages.dim() != 1:
            raise UnsupportedTRLSetting(
                f"rlvr_fast's TRL integration trains one advantage per completion, got advantages of shape "
                f"{tuple(advantages.shape)} (per-token advantages from a subclass are not supported)"
            )
        cast = bool(self.args.cast_lm_head_to_fp32)
        mode = "train" if self.model.training else "eval"
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1
        # TRL's normalisers under gradient accumulation: every micro-batch of the window weighs 1 / accumulation, and
        # dapo's token count is the generation batch's active tokens per process, rescaled to one window
        step_tokens = inputs["num_items_in_batch"].float().clamp(min=1.0) / self.accelerator.num_processes
        if mode == "train":
            step_tokens = step_tokens * accumulation / self.args.steps_per_generation
        objective, scale = objective.for_share(StepShare.equal_parts(accumulation, step_tokens))
        rollout_logp = None
        if objective.rollout_correction is not None:  # TRL's vllm_importance_sampling_correction
            rollout_logp, advantages = rollout_inputs_from_ratio(
                inputs["old_per_token_logps"],
                inputs["importance_sampling_ratio"],
                mask,
                advantages,
                objective.rollout_correction,
            )

        def head_loss(hidden, weight, bias):  # called inside the model's forward: FSDP2 has the head unsharded there
            with _head_context(cast, hidden.device.type):
                return hidden_state_policy_loss(
                    hidden.float() if cast else hidden,
                    weight.float() if cast else weight,
                    completion_ids,
                    mask,
                    advantages,
                    objective,
                    bias=None if bias is None else (bias.float() if cast else bias),
                    old_logp=inputs.get("old_per_token_logps"),
                    ref_logp=inputs.get("ref_per_token_logps") if objective.beta != 0.0 else None,
                    rollout_logp=rollout_logp,
                    return_entropy=True,
                    backend=self._rlvr_fast_backend,
                    implementation=self._rlvr_fast_implementation,
                )

        with self.accelerator.autocast():
            loss, metrics = model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                rlvr_fast_hidden_last=completion_ids.size(1),
                rlvr_fast_head_fn=head_loss,
            )
        if scale != 1.0:  # HF's own loss scaling is off for GRPOTrainer: the share's scale is TRL's
            loss = loss * scale
        self._rlvr_fast_log(mode, objective, metrics)
        return loss

    def _rlvr_fast_log(self, mode: str, objective, metrics) -> None:
        """TRL's metric names, each a token-weighted mean over all processes (TRL's global_masked_mean).

        Two differences from TRL's values: at importance_sampling_level='sequence' TRL averages its clip fractions per
        completion, these per token (every token carries its completion's ratio); TRL's clip_ratio/low_min and
        high_max (per-completion extremes) are not logged.
        """
        names = ["entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"]
        values = [
            metrics.mean_entropy,
            metrics.clip_low_frac,
            metrics.clip_high_frac,
            metrics.clip_low_frac + metrics.clip_high_frac,
        ]
        if objective.beta != 0.0:
            names.append("kl")
            values.append(metrics.mean_kl)
        if objective.dual_clip is not None:  # TRL logs nothing for delta; the fraction of tokens at the -delta A cap
            names.append("rlvr_fast/dual_clip_frac")
            values.append(metrics.dual_clip_frac)
        tokens = metrics.tokens.float()
        # The fused op skips the LM-head work of zero-advantage completions (beta == 0), so its entropy and KL average
        # over the tokens it evaluated; weight them by that count (the clip fractions are over all tokens in both).
        evaluated = tokens - metrics.tokens_skipped.float() if self._rlvr_fast_implementation == "fused" else tokens
        weights = torch.stack([evaluated if name in ("entropy", "kl") else tokens for name in names])
        local = torch.stack([torch.stack(values).float() * weights, weights])
        totals = self.accelerator.reduce(local, reduction="sum")
        means = (totals[0] / totals[1].clamp(min=1.0)).tolist()
        for name, value in zip(names, means):
            self._metrics[mode][name].append(value)

    # ---- the advantages ---------------------------------------------------------------------------------------------

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._rlvr_fast_rewards = rewards_per_func  # (N, F) gathered over processes, read by the estimators below
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        options = self._rlvr_fast_options
        rewards, self._rlvr_fast_rewards = self._rlvr_fast_rewards, None
        if not options.changes_advantages:
            return output
        mode = "train" if self.model.training else "eval"
        advantages = recompute_advantages(
            options,
            rewards,
            self.reward_weights,
            list(self.reward_func_names),
            self.num_generations if mode == "train" else self.num_generations_eval,
            self.scale_rewards,
            output["advantages"],
            self.accelerator.process_index,
            backend=self._rlvr_fast_backend,
        )
        output["advantages"] = advantages
        # The completions table logged TRL's advantages a moment ago: show the ones trained on instead.
        gathered = self.accelerator.gather(advantages).tolist()
        logged = self._logs["advantages"]
        for _ in range(min(len(gathered), len(logged))):
            logged.pop()
        logged.extend(gathered)
        self._metrics[mode]["rlvr_fast/advantage_nonzero_frac"].append(sum(a != 0 for a in gathered) / len(gathered))
        return output


# The ops the trainer runs with ``backend`` (op name -> its CUDA C++ op, None where there is none): checked at
# construction so that an unavailable backend fails before any generation, not at the first loss.
_TRAINER_OPS: dict[str, str | None] = {
    "token_logprobs": None,
    "fused_linear_grpo_loss": None,
    "grpo_loss": None,
    "group_advantages": GROUP_ADVANTAGE_CUDA_OP,
}


def _check_options(backend, implementation) -> None:
    """The wrapper's own options, by name and value (the advantage options are checked by ``_options``)."""
    check_backend_name("RLVRFastGRPOTrainer", backend)
    if implementation is not None and implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"RLVRFastGRPOTrainer: implementation must be None or one of {sorted(IMPLEMENTATIONS)}, "
            f"got {implementation!r}"
        )


def _options(sample_mode: str, estimator: str | None, lam: float, verifier: str | None) -> AdvantageOptions:
    return AdvantageOptions(estimator=estimator, sample_mode=sample_mode, lam=lam, verifier=verifier).validate()


class RLVRFastGRPOTrainer(_RLVRFastMixin, GRPOTrainer):
    """``trl.GRPOTrainer`` with rlvr_fast's fused hidden-state log-probs and loss (module doc).

    Takes GRPOTrainer's arguments, plus (keyword-only):
        sample_mode: "all" | "positive_only" | "negative_only" (Zhu et al. 2025): clip the advantages to one sign.
        estimator: None (TRL's advantages) or grpo | dr_grpo | rloo | psr | nsr | w_reinforce (``AdvantageOptions``).
        lam: w_reinforce's weight on correct completions.
        verifier: name of the reward function whose reward > 0.5 is the verdict (psr / nsr / w_reinforce).
        backend: "auto" | "triton" | "cuda" | "torch" for the fused ops.
        implementation: None (``policy_loss.DEFAULT_IMPLEMENTATION``) | "composed" | "fused".

    Raises ``UnsupportedTRLSetting`` (a ValueError naming the GRPOConfig field) before loading any model when ``args``
    asks for an objective the fused path cannot train exactly, and ImportError outside ``SUPPORTED_TRL``.
    """

    def __init__(
        self,
        *args: Any,
        sample_mode: str = "all",
        estimator: str | None = None,
        lam: float = 0.1,
        verifier: str | None = None,
        backend: str = "auto",
        implementation: str | None = None,
        **kwargs: Any,
    ):
        check_trl_version()
        options = _options(sample_mode, estimator, lam, verifier)
        _check_options(backend, implementation)  # before TRL loads any model
        config = kwargs.get("args", args[2] if len(args) > 2 else None)
        if config is not None:
            check_grpo_config(config)  # fail before TRL loads the policy and the reference model
        super().__init__(*args, **kwargs)
        self._rlvr_fast_setup(options, backend, implementation)


@functools.cache
def _patched_class(cls: type) -> type:
    return type(f"RLVRFast{cls.__name__}", (_RLVRFastMixin, cls), {"__module__": __name__})


def patch_grpo_trainer(
    trainer: GRPOTrainer,
    *,
    sample_mode: str = "all",
    estimator: str | None = None,
    lam: float = 0.1,
    verifier: str | None = None,
    backend: str = "auto",
    implementation: str | None = None,
) -> GRPOTrainer:
    """Turn an already-built ``GRPOTrainer`` (or subclass) into the rlvr_fast one, in place; returns it.

    The options are ``RLVRFastGRPOTrainer``'s. Call it before ``trainer.train()``. Raises the same errors, and
    RuntimeError when the trainer is already patched.
    """
    if not isinstance(trainer, GRPOTrainer):
        raise TypeError(f"patch_grpo_trainer: expected a trl.GRPOTrainer, got {type(trainer).__name__}")
    if isinstance(trainer, _RLVRFastMixin):
        raise RuntimeError("patch_grpo_trainer: this trainer already uses rlvr_fast's loss")
    check_trl_version()
    options = _options(sample_mode, estimator, lam, verifier)
    _check_options(backend, implementation)
    check_grpo_config(trainer.args)
    original = type(trainer)
    trainer.__class__ = _patched_class(original)
    try:
        trainer._rlvr_fast_setup(options, backend, implementation)
    except Exception:
        trainer.__class__ = original  # a refused trainer stays the stock one
        raise
    return trainer
