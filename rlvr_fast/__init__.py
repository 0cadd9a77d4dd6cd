"""rlvr_fast: fused kernels and a lean trainer for RLVR (GRPO-family) training.

The ops (each with a plain PyTorch reference beside it): ``group_advantages``, ``token_logprobs`` /
``logprobs_from_logits``, ``grpo_loss`` / ``fused_linear_grpo_loss``, ``SparseAdamW``. Rewards, filters and evaluation
metrics live in ``rlvr_fast.rewards`` and ``rlvr_fast.eval`` (the most used are re-exported here), clean tasks in
``rlvr_fast.tasks``, the trainer in ``rlvr_fast.trainer``, adapters for other trainers in ``rlvr_fast.integrations``.

Importing this package never imports a Triton kernel module and never queries the GPU, so ``TRITON_INTERPRET`` may be
set after ``import rlvr_fast`` but before the first op call that reaches a kernel.
"""

from rlvr_fast._version import __version__
from rlvr_fast.backends import BACKENDS, BackendUnavailableError, has_cuda_extension
from rlvr_fast.eval import (
    auroc,
    brier_score,
    contamination_probe,
    expected_calibration_error,
    format_frequency,
    pass_at_k,
    pass_at_k_curve,
    pass_at_k_delta,
    pass_at_k_summary,
)
from rlvr_fast.ops.fused_linear_grpo_loss import (
    FusedLinearGrpoConfig,
    fused_linear_grpo_loss,
    fused_linear_grpo_loss_reference,
)
from rlvr_fast.ops.group_advantage import (
    ESTIMATORS,
    SAMPLE_MODES,
    SCALES,
    GroupAdvantages,
    group_advantages,
    group_advantages_reference,
)
from rlvr_fast.ops.grpo_loss import GrpoLossMetrics, grpo_loss, grpo_loss_reference
from rlvr_fast.ops.logprobs import LogprobsConfig, logprobs_from_logits, token_logprobs
from rlvr_fast.ops.logprobs_reference import logprobs_from_logits_reference, token_logprobs_reference
from rlvr_fast.ops.loss_types import IS_LEVELS, KL_ESTIMATORS, LOSS_TYPES, StepShare
from rlvr_fast.ops.objective import PolicyObjective
from rlvr_fast.optim import (
    GradSaliency,
    SparseAdamW,
    load_masks,
    masks_from_diff,
    masks_from_scores,
    random_masks,
    save_masks,
    sparse_adamw_reference,
    update_sparsity,
)
from rlvr_fast.rewards import REWARD_MODES, compose, extract_answer, filter_groups, is_equivalent, reward_fn

HAS_CUDA_EXT: bool = has_cuda_extension()

__all__ = [
    "BACKENDS",
    # group advantages
    "ESTIMATORS",
    "HAS_CUDA_EXT",
    "IS_LEVELS",
    "KL_ESTIMATORS",
    # losses
    "LOSS_TYPES",
    # rewards and evaluation
    "REWARD_MODES",
    "SAMPLE_MODES",
    "SCALES",
    "BackendUnavailableError",
    "FusedLinearGrpoConfig",
    "GradSaliency",
    "GroupAdvantages",
    "GrpoLossMetrics",
    # log-probs
    "LogprobsConfig",
    "PolicyObjective",
    # sparse update
    "SparseAdamW",
    "StepShare",
    "__version__",
    "auroc",
    "brier_score",
    "compose",
    "contamination_probe",
    "expected_calibration_error",
    "extract_answer",
    "filter_groups",
    "format_frequency",
    "fused_linear_grpo_loss",
    "fused_linear_grpo_loss_reference",
    "group_advantages",
    "group_advantages_reference",
    "grpo_loss",
    "grpo_loss_reference",
    "is_equivalent",
    "load_masks",
    "logprobs_from_logits",
    "logprobs_from_logits_reference",
    "masks_from_diff",
    "masks_from_scores",
    "pass_at_k",
    "pass_at_k_curve",
    "pass_at_k_delta",
    "pass_at_k_summary",
    "random_masks",
    "reward_fn",
    "save_masks",
    "sparse_adamw_reference",
    "token_logprobs",
    "token_logprobs_reference",
    "update_sparsity",
]
