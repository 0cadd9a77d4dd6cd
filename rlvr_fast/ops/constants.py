"""The numbers the ops and the Triton kernels must agree on, in one Triton-free module.

The kernels in ``rlvr_fast.kernels`` import these as plain Python ints and floats (wrapped in ``tl.constexpr`` where
``@triton.jit`` code reads them), the ops and the registries of ``rlvr_fast.ops.loss_types`` import them too: one
definition each, so a kernel and its op cannot drift apart.
"""

from __future__ import annotations

# Target id of a position that has no token to score (padding): logp 0, entropy 0, no gradient (PyTorch's and
# Hugging Face's cross-entropy convention).
IGNORE_INDEX = -100

# Largest old_logp the losses accept. A log-probability is <= 0; every usual way of computing one (log_softmax,
# logits - logsumexp with the running maximum) rounds to <= 0 too, but a sampler computing logsumexp in float32
# around logits of ~1e3 can round a near-certain token's log-prob up by ~ulp(1e3) = 6e-5. Beyond this it is not a
# log-probability (a probability, a logit, a sign error) and the ratio exp(logp - old_logp) would be silently wrong.
OLD_LOGP_MAX = 1e-4

# Advantage estimator, scale and sample-mode codes (rlvr_fast.ops.group_advantage's ESTIMATORS ``code``, SCALES and
# SAMPLE_MODE_CODES; the group-advantage kernel's constexprs; csrc/ switches on the same numbers). The centred
# estimators come first: ADV_RLOO is the last of them.
ADV_GRPO, ADV_DR_GRPO, ADV_RLOO, ADV_PSR, ADV_NSR, ADV_W_REINFORCE = range(6)
SCALE_GROUP, SCALE_BATCH, SCALE_NONE = range(3)
SAMPLE_ALL, SAMPLE_POSITIVE_ONLY, SAMPLE_NEGATIVE_ONLY = range(3)

# KL estimator codes (the ``code`` of rlvr_fast.ops.loss_types.KL_ESTIMATORS rows; the kernels' ``KL`` constexpr).
KL_K1, KL_K2, KL_K3, KL_LOW_VAR = range(4)

# Importance-sampling level codes (the ``code`` of rlvr_fast.ops.loss_types.IS_LEVELS rows).
IS_TOKEN, IS_SEQUENCE = range(2)

# Rollout-correction codes (rlvr_fast.ops.rollout_correction.ROLLOUT_CORRECTIONS ``code``; the kernels' ROLLOUT
# constexpr): off, a truncated weight per token, one per completion.
ROLLOUT_OFF, ROLLOUT_TOKEN, ROLLOUT_SEQUENCE = range(3)

# verl's low_var_kl clamps (verl/trainer/ppo/core_algos.py kl_penalty): d = ref - logp to [-20, 20], then the estimate
# to [-10, 10].
LOW_VAR_KL_D_CLAMP = 20.0
LOW_VAR_KL_VALUE_CLAMP = 10.0

# Columns of the summed statistics of the GRPO-family loss (the kernels' per-program partials and the ops' sums).
# LOSS holds sum m * c_b * l (c_b = 1 / max(sum_t m, 1) for per-sequence loss types, else 1); the others are plain
# mask-weighted sums over active tokens; SKIPPED counts the active tokens whose gradient is zero by construction.
(
    STAT_LOSS,
    STAT_KL,
    STAT_RATIO,
    STAT_ENTROPY,
    STAT_CLIP_LOW,
    STAT_CLIP_HIGH,
    STAT_DUAL_CLIP,
    STAT_TOKENS,
    STAT_SKIPPED,
) = range(9)
N_STATS = 9
