"""Which TRL ``GRPOConfig`` settings the fused path trains exactly, and a refusal naming the field for every other.

TRL 1.16's ``GRPOTrainer._compute_loss`` reads a dozen settings that change the objective. The patched trainer
replaces that method with ``hidden_state_policy_loss``, so each of those settings is either

- translated into a ``PolicyObjective`` (loss_type grpo / bnpo / dr_grpo / dapo, beta, epsilon, epsilon_high,
  importance_sampling_level, temperature, max_completion_length, ``use_bias_correction_kl`` (TRL's default: the KL term
  times the differentiable importance ratio, ``kl_ratio_weighted``), ``delta`` as dual-clip PPO where the two
  agree, and with ``use_vllm`` TRL's ``vllm_importance_sampling_correction`` (its precomputed ratio through the
  loss's rollout correction: token_truncate, sequence_truncate and sequence_mask, TRL's default), or
- refused with ``UnsupportedTRLSetting`` (a ValueError) that names the GRPOConfig field, its value, why and what to do.

Nothing is dropped silently: a setting TRL would honour and we cannot is an error, never a different objective (TRL
#6808 / #7270: a fused loss in another integration ignored the loss type it was given).

Settings that act outside the loss are TRL's own code and need nothing here: scale_rewards,
multi_objective_aggregation, reward_weights and num_generations shape the advantages in
``_generate_and_score_completions``; mask_truncated_completions zeroes ``completion_mask``; num_iterations and
steps_per_generation decide when old log-probs are computed (through our head, see ``trl.install_hidden_state_head``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from rlvr_fast.ops.loss_types import IS_LEVELS, LOSS_TYPES
from rlvr_fast.ops.objective import PolicyObjective
from rlvr_fast.ops.rollout_correction import DEFAULT_CAP
from rlvr_fast.trainer.model import LOGIT_TRANSFORMS


class UnsupportedTRLSetting(ValueError):
    """A TRL setting (GRPOConfig field, trainer attribute or model property) the fused path cannot train exactly."""


@dataclass(frozen=True)
class TRLLossSettings:
    """The settings TRL 1.16's ``_compute_loss`` reads, under their GRPOConfig field names.

    Built from a ``GRPOConfig`` before the trainer exists (so a refusal comes before any model loads) and from the
    trainer's own attributes at every loss call (they are what TRL's loss reads, and a user may change them).
    """

    loss_type: str
    beta: float
    epsilon: float  # the low clip bound, TRL's ``epsilon_low``
    epsilon_high: float  # already defaulted to epsilon, as TRL does
    delta: float | None
    importance_sampling_level: str
    temperature: float
    max_completion_length: int | None
    top_entropy_quantile: float
    entropy_coef: float
    use_adaptive_entropy: bool
    off_policy_mask_threshold: float | None
    use_bias_correction_kl: bool
    use_vllm: bool
    vllm_importance_sampling_correction: bool
    vllm_importance_sampling_mode: str  # token_truncate | token_mask | sequence_truncate | sequence_mask
    vllm_importance_sampling_clip_max: float | None
    vllm_importance_sampling_clip_min: float | None
    router_aux_loss: bool  # the MoE load-balancing loss is added (known once the model is loaded)

    @classmethod
    def from_config(cls, args: Any) -> TRLLossSettings:
        return cls(
            loss_type=args.loss_type,
            beta=args.beta,
            epsilon=args.epsilon,
            epsilon_high=args.epsilon if args.epsilon_high is None else args.epsilon_high,
            delta=args.delta,
            importance_sampling_level=args.importance_sampling_level,
            temperature=args.temperature,
            max_completion_length=args.max_completion_length,
            top_entropy_quantile=args.top_entropy_quantile,
            entropy_coef=args.entropy_coef,
            use_adaptive_entropy=args.use_adaptive_entropy,
            off_policy_mask_threshold=args.off_policy_mask_threshold,
            use_bias_correction_kl=args.use_bias_correction_kl,
            use_vllm=args.use_vllm,
            vllm_importance_sampling_correction=args.vllm_importance_sampling_correction,
            vllm_importance_sampling_mode=args.vllm_importance_sampling_mode,
            vllm_importance_sampling_clip_max=args.vllm_importance_sampling_clip_max,
            vllm_importance_sampling_clip_min=args.vllm_importance_sampling_clip_min,
            router_aux_loss=False,
        )

    @classmethod
    def from_trainer(cls, trainer: Any) -> TRLLossSettings:
        args = trainer.args
        return cls(
            loss_type=trainer.loss_type,
            beta=trainer.beta,
            epsilon=trainer.epsilon_low,
            epsilon_high=trainer.epsilon_high,
            delta=args.delta,
            importance_sampling_level=trainer.importance_sampling_level,
            temperature=trainer.temperature,
            max_completion_length=trainer.max_completion_length,
            top_entropy_quantile=trainer.top_entropy_quantile,
            entropy_coef=trainer.entropy_coef,
            use_adaptive_entropy=trainer.use_adaptive_entropy,
            off_policy_mask_threshold=trainer.off_policy_mask_threshold,
            use_bias_correction_kl=args.use_bias_correction_kl,
            use_vllm=trainer.use_vllm,
            vllm_importance_sampling_correction=trainer.vllm_importance_sampling_correction,
            vllm_importance_sampling_mode=trainer.vllm_importance_sampling_mode,
            vllm_importance_sampling_clip_max=trainer.vllm_importance_sampling_clip_max,
            vllm_importance_sampling_clip_min=trainer.vllm_importance_sampling_clip_min,
            router_aux_loss=bool(trainer.aux_loss_enabled),
        )


@dataclass(frozen=True)
class Refusal:
    """One setting we refuse: ``applies(settings)`` says when; the message says why and what to do instead."""

    field: str  # the GRPOConfig field named in the error
    applies: Callable[[TRLLossSettings], bool]
    why: str
    instead: str


def _delta_is_dual_clip(s: TRLLossSettings) -> bool:
    """TRL's two-sided clip caps the ratio at delta before -min(r A, clip(r) A). For A < 0 that caps the token loss at
    -delta A, which is dual-clip PPO with c = delta; for A > 0 it changes nothing as long as delta >= 1 + epsilon_high
    (the min already takes the clipped term there). Below that bound the two objectives differ."""
    return s.delta is None or (s.delta > 1.0 and s.delta >= 1.0 + s.epsilon_high)


REFUSALS: tuple[Refusal, ...] = (
    Refusal(
        "loss_type",
        lambda s: s.loss_type not in LOSS_TYPES,
        "its objective is not a clipped surrogate with one of rlvr_fast's normalisers (cispo: clipped IS weight "
        "times log-prob, MiniMax-M1; sapo: soft sigmoid gate; luspo: length-scaled sequence loss; vespo: "
        "gamma-weighted sequence loss)",
        f"use one of {sorted(LOSS_TYPES)}, or the stock GRPOTrainer for this loss",
    ),
    Refusal(
        "importance_sampling_level",
        lambda s: s.importance_sampling_level not in IS_LEVELS,
        "it is not an importance-sampling level rlvr_fast implements",
        f"use one of {sorted(IS_LEVELS)}",
    ),
    Refusal(
        "top_entropy_quantile",
        lambda s: s.top_entropy_quantile < 1.0,
        "it trains on the high-entropy tokens only (Wang et al. 2025, arXiv:2506.01939), a per-token mask rlvr_fast's "
        "loss does not build",
        "set top_entropy_quantile=1.0",
    ),
    Refusal(
        "entropy_coef",
        lambda s: s.entropy_coef != 0.0,
        "it adds an entropy bonus to the loss, which rlvr_fast's loss does not include",
        "set entropy_coef=0.0",
    ),
    Refusal(
        "use_adaptive_entropy",
        lambda s: s.use_adaptive_entropy,
        "it adds an adaptively weighted entropy bonus to the loss, which rlvr_fast's loss does not include",
        "set use_adaptive_entropy=False",
    ),
    Refusal(
        "off_policy_mask_threshold",
        lambda s: s.off_policy_mask_threshold is not None,
        "off-policy sequence masking (DeepSeek-V3.2) drops negative-advantage completions by their KL, a mask "
        "rlvr_fast's loss does not build",
        "set off_policy_mask_threshold=None",
    ),
    Refusal(
        "delta",
        lambda s: not _delta_is_dual_clip(s),
        "two-sided clipping is trained as dual-clip PPO (c = delta), which is the same objective only when "
        "delta > 1 and delta >= 1 + epsilon_high",
        "set delta >= 1 + epsilon_high (INTELLECT-2 recommends delta > 1 + epsilon), or delta=None",
    ),
    Refusal(
        "vllm_importance_sampling_mode",
        lambda s: _vllm_correction(s) and s.vllm_importance_sampling_mode == "token_mask",
        "it zeroes single tokens' policy terms, and the fused loss's rollout correction can weight a token by any "
        "ratio but 0",
        "set vllm_importance_sampling_mode to 'token_truncate', 'sequence_truncate' or 'sequence_mask' (TRL's default)",
    ),
    Refusal(
        "vllm_importance_sampling_mode",
        lambda s: (
            _vllm_correction(s)
            and s.importance_sampling_level == "sequence"
            and s.vllm_importance_sampling_mode == "token_truncate"
        ),
        "with importance_sampling_level='sequence' (GSPO) the fused loss weights each completion by one rollout "
        "ratio, and a per-token vLLM ratio is not one",
        "set vllm_importance_sampling_mode='sequence_truncate' or 'sequence_mask', or importance_sampling_level="
        "'token'",
    ),
    Refusal(
        "vllm_importance_sampling_clip_min",
        lambda s: (
            _vllm_correction(s)
            and s.vllm_importance_sampling_mode.endswith("_truncate")
            and s.vllm_importance_sampling_clip_min is not None
        ),
        "a truncate mode with a lower bound raises small ratios, which the fused loss's rollout correction (a ratio of "
        "the trainer's log-probs to a rollout log-prob <= 0) cannot express",
        "set vllm_importance_sampling_clip_min=None (TRL's default)",
    ),
    Refusal(
        "router_aux_loss_coef",
        lambda s: s.router_aux_loss,
        "the model is a Mixture-of-Experts whose load-balancing loss TRL adds to the policy loss from router logits, "
        "which the hidden-state path does not return",
        "set router_aux_loss_coef=0.0, or use the stock GRPOTrainer",
    ),
)


def _vllm_correction(settings: TRLLossSettings) -> bool:
    """Whether TRL multiplies the policy term by its vLLM importance-sampling ratio (it does only with vLLM)."""
    return bool(settings.use_vllm and settings.vllm_importance_sampling_correction)


# TRL's importance_sampling_ratio reaches the fused loss as rollout log-probs (``trainer.rollout_inputs_from_ratio``):
# the loss's own truncation then only has to leave TRL's ratio alone. TRL's ratio is at most clip_max (truncate
# modes) or 0 / within [clip_min, clip_max] (mask modes); without a clip_max it is unbounded, and this cap stands in.
UNBOUNDED_RATIO_CAP = 1e30


def _value(settings: TRLLossSettings, field: str) -> Any:
    return getattr(settings, field) if field in {f.name for f in fields(settings)} else None


def check_settings(settings: TRLLossSettings) -> PolicyObjective:
    """The ``PolicyObjective`` that trains exactly TRL's objective under ``settings``; raises on anything else.

    TRL always knows max_completion_length (it caps generation): it is dr_grpo's L, and no field of the others.
    """
    for rule in REFUSALS:
        if rule.applies(settings):
            value = _value(settings, rule.field)
            shown = f"={value!r}" if value is not None else ""
            raise UnsupportedTRLSetting(
                f"rlvr_fast's TRL integration cannot train GRPOConfig.{rule.field}{shown} exactly: {rule.why}. "
                f"Fix: {rule.instead}."
            )
    return PolicyObjective.from_settings(
        loss_type=settings.loss_type,
        beta=float(settings.beta),
        kl="k3",  # TRL's KL: exp(ref - logp) - (ref - logp) - 1
        eps_low=float(settings.epsilon),
        eps_high=float(settings.epsilon_high),
        dual_clip=None if settings.delta is None else float(settings.delta),
        importance_sampling=settings.importance_sampling_level,
        temperature=float(settings.temperature),
        generation_length=settings.max_completion_length,  # dr_grpo's L; the other loss types do not read it
        # TRL's default: with beta != 0 the per-token KL is multiplied by the differentiable, unclipped importance
        # ratio of importance_sampling_level (DeepSeek-V3.2); TRL ignores the flag at beta == 0, so do we
        kl_ratio_weighted=settings.beta != 0.0 and bool(settings.use_bias_correction_kl),
        # TRL's vllm_importance_sampling_correction: the policy term times TRL's precomputed ratio (per token, or per
        # completion for the sequence_* modes), fed to the loss as rollout log-probs (trainer.rollout_inputs_from_ratio)
        rollout_correction=_rollout_correction(settings),
        rollout_correction_cap=_ratio_cap(settings),
    )


def _rollout_correction(settings: TRLLossSettings) -> str | None:
    """token_truncate for TRL's token_truncate; sequence_truncate for its sequence modes (one weight per completion,
    at either importance-sampling level; sequence_mask's dropped completions get advantage 0)."""
    if not _vllm_correction(settings):
        return None
    return "token_truncate" if settings.vllm_importance_sampling_mode == "token_truncate" else "sequence_truncate"


def _ratio_cap(settings: TRLLossSettings) -> float:
    if not _vllm_correction(settings):
        return DEFAULT_CAP  # unread without a correction
    cap = settings.vllm_importance_sampling_clip_max
    return UNBOUNDED_RATIO_CAP if cap is None else float(cap)


def check_grpo_config(args: Any) -> PolicyObjective:
    """Refuse a ``GRPOConfig`` the fused path cannot train exactly (before any model loads); else its objective."""
    return check_settings(TRLLossSettings.from_config(args))


# --------------------------------------------------------------------------------------------------------------------
# The model: the fused path projects hidden states through ``lm_head.weight`` itself, so any transformation TRL's head
# (or the model's own forward) applies to the logits must be one we apply too.
# --------------------------------------------------------------------------------------------------------------------


def check_model(model: Any) -> None:
    """Refuse a model whose log-probs the hidden-state path would compute differently from TRL's head."""
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if text_config is not config:
        raise UnsupportedTRLSetting(
            f"rlvr_fast's TRL integration supports text-only causal LMs; {type(model).__name__} is multimodal "
            f"(its config has a separate text_config). Use the stock GRPOTrainer for vision-language models."
        )
    for attr in LOGIT_TRANSFORMS:  # the trainer's list (TRL's add_fused_lm_head reads these)
        value = getattr(text_config, attr, None)
        if value is not None and value != 1.0:
            raise UnsupportedTRLSetting(
                f"rlvr_fast's TRL integration cannot reproduce {type(model).__name__}'s logits: its config sets "
                f"{attr}={value!r}, a transformation of the logits the fused LM head does not apply. Use the stock "
                f"GRPOTrainer for this model."
            )
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise UnsupportedTRLSetting(f"{type(model).__name__} has no output embedding (lm_head) to project through")
    if hasattr(head, "base_layer"):  # a PEFT tuner layer: the adapter's update would not be in lm_head.weight
        raise UnsupportedTRLSetting(
            "rlvr_fast's TRL integration projects through lm_head.weight directly, so an adapter on lm_head would be "
            "ignored; remove 'lm_head' from the PEFT target_modules"
        )
