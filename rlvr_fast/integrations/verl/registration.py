"""``register()``: rlvr_fast's estimators and policy loss into verl's registries (verl 0.9.1,
``verl/trainer/ppo/core_algos.py``), optionally the fused log-probs; ``unregister()`` takes them out again.

verl runs its trainer and workers in Ray processes: the registration must happen in each of them. verl imports the
modules named in ``VERL_USE_EXTERNAL_MODULES`` whenever ``verl`` is imported, so
``VERL_USE_EXTERNAL_MODULES=rlvr_fast.integrations.verl.plugin`` (which calls ``register()``; with
``RLVR_FAST_VERL_FUSED_LOGPROBS=1`` also the fused log-probs) does it everywhere (docs/integrations.md, "verl").
"""

from __future__ import annotations

from dataclasses import dataclass

from rlvr_fast.integrations.verl.advantages import ADVANTAGE_ESTIMATOR_NAMES, ADVANTAGE_ESTIMATORS
from rlvr_fast.integrations.verl.compat import check_verl_version
from rlvr_fast.integrations.verl.logprobs import (
    disable_fused_linear_logprobs,
    enable_fused_linear_logprobs,
    fused_linear_logprobs_enabled,
)
from rlvr_fast.integrations.verl.policy_loss import POLICY_LOSS_NAME, verl_policy_loss

__all__ = ["Registration", "register", "unregister"]


@dataclass(frozen=True)
class Registration:
    """What ``register`` added: the names to put in verl's config."""

    verl_version: str
    adv_estimators: tuple[str, ...]
    policy_loss: str
    fused_linear_logprobs: bool


def register(fused_linear_logprobs: bool = False) -> Registration:
    """Add our estimators and policy loss to verl's registries (idempotent), optionally the fused log-probs.

    Args:
        fused_linear_logprobs: also route verl's ``use_fused_kernels`` log-prob paths through ``token_logprobs``
            (``enable_fused_linear_logprobs``). False leaves them as they are (it does not disable a previous
            enable: call ``disable_fused_linear_logprobs()`` for that).

    Raises:
        ImportError: verl is missing or outside ``SUPPORTED_VERL``.
        ValueError: from verl, when another function is already registered under one of our estimator names.
    """
    version = check_verl_version()
    from verl.trainer.ppo import core_algos

    for name, fn in ADVANTAGE_ESTIMATORS.items():
        core_algos.register_adv_est(name)(fn)
    core_algos.register_policy_loss(POLICY_LOSS_NAME)(verl_policy_loss)
    if fused_linear_logprobs:
        enable_fused_linear_logprobs()
    return Registration(version, ADVANTAGE_ESTIMATOR_NAMES, POLICY_LOSS_NAME, fused_linear_logprobs_enabled())


def unregister() -> None:
    """Remove our names from verl's registries and restore verl's fused log-prob functions."""
    disable_fused_linear_logprobs()
    from verl.trainer.ppo import core_algos

    for name, fn in ADVANTAGE_ESTIMATORS.items():
        if core_algos.ADV_ESTIMATOR_REGISTRY.get(name) is fn:
            del core_algos.ADV_ESTIMATOR_REGISTRY[name]
    if core_algos.POLICY_LOSS_REGISTRY.get(POLICY_LOSS_NAME) is verl_policy_loss:
        del core_algos.POLICY_LOSS_REGISTRY[POLICY_LOSS_NAME]
