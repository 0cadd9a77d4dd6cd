"""rlvr_fast inside TRL's ``GRPOTrainer`` (needs the ``trl`` extra): ``RLVRFastGRPOTrainer`` / ``patch_grpo_trainer``
(``trainer``), the GRPOConfig settings trained exactly or refused (``config``), rlvr_fast's sample modes and advantage
estimators as trainer options (``advantages``) and its reward modes as TRL reward functions (``rewards``)."""

from rlvr_fast.integrations.trl.trainer import (
    SUPPORTED_TRL,
    AdvantageOptions,
    RLVRFastGRPOTrainer,
    UnsupportedTRLSetting,
    check_grpo_config,
    check_trl_version,
    install_hidden_state_head,
    patch_grpo_trainer,
    trl_reward_func,
)

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
