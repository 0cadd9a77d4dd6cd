"""Importing this module registers rlvr_fast into verl: the hook for verl's Ray processes.

verl imports every module named in the environment variable ``VERL_USE_EXTERNAL_MODULES`` (comma-separated) when
``verl`` itself is imported, in the driver and in each Ray worker, so

    VERL_USE_EXTERNAL_MODULES=rlvr_fast.integrations.verl.plugin python -m verl.trainer.main_ppo ...

makes ``algorithm.adv_estimator=rlvr_fast_*`` and ``actor_rollout_ref.actor.policy_loss.loss_mode=rlvr_fast`` known
wherever verl looks them up. ``RLVR_FAST_VERL_FUSED_LOGPROBS=1`` also routes verl's fused log-prob paths
(``use_fused_kernels=True``) through ``rlvr_fast.token_logprobs``; any other value leaves them alone.
"""

import os

from rlvr_fast.integrations.verl.registration import register

FUSED_LOGPROBS_ENV = "RLVR_FAST_VERL_FUSED_LOGPROBS"

REGISTRATION = register(fused_linear_logprobs=os.environ.get(FUSED_LOGPROBS_ENV, "0") == "1")
