"""rlvr_fast inside verl, through verl's own extension points (verl 0.9.1, ``verl/trainer/ppo/core_algos.py``).

The rooms:

- ``advantages``: advantage estimators (``register_adv_est``),
  ``algorithm.adv_estimator=rlvr_fast_<estimator>[_<mode>]``, by ``rlvr_fast.group_advantages`` with completions
  grouped by verl's ``uid``; options in ``AdvantageConfig``.
- ``policy_loss``: the policy loss (``register_policy_loss``),
  ``actor_rollout_ref.actor.policy_loss.loss_mode=rlvr_fast``, verl's clipped PPO objective by ``rlvr_fast.grpo_loss``
  for every ``loss_agg_mode``.
- ``logprobs``: verl's fused log-prob paths (``use_fused_kernels=True``) answered by ``rlvr_fast.token_logprobs``.
- ``registration``: ``register()`` (idempotent) / ``unregister()``, the names verl's config then accepts.
- ``plugin``: the module verl's ``VERL_USE_EXTERNAL_MODULES`` imports in every Ray process (it calls ``register()``).
- ``compat``: the supported verl versions (``SUPPORTED_VERL``) and their check, shared by the others.

Without verl installed this package still imports (``verl_group_advantages``, ``verl_policy_loss`` and
``verl_linear_cross_entropy`` are plain functions of tensors); ``register()`` needs verl.
"""

from rlvr_fast.integrations.verl.advantages import ADVANTAGE_ESTIMATOR_NAMES, AdvantageConfig, verl_group_advantages
from rlvr_fast.integrations.verl.compat import SUPPORTED_VERL, check_verl_version
from rlvr_fast.integrations.verl.logprobs import (
    disable_fused_linear_logprobs,
    enable_fused_linear_logprobs,
    fused_linear_logprobs_enabled,
    verl_linear_cross_entropy,
)
from rlvr_fast.integrations.verl.policy_loss import LOSS_AGG_MODES, POLICY_LOSS_NAME, verl_policy_loss
from rlvr_fast.integrations.verl.registration import Registration, register, unregister

__all__ = [
    "ADVANTAGE_ESTIMATOR_NAMES",
    "LOSS_AGG_MODES",
    "POLICY_LOSS_NAME",
    "SUPPORTED_VERL",
    "AdvantageConfig",
    "Registration",
    "check_verl_version",
    "disable_fused_linear_logprobs",
    "enable_fused_linear_logprobs",
    "fused_linear_logprobs_enabled",
    "register",
    "unregister",
    "verl_group_advantages",
    "verl_linear_cross_entropy",
    "verl_policy_loss",
]
