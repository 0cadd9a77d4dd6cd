"""rlvr_fast: fused kernels and a lean trainer for RLVR (GRPO-family) training.

Importing this package never imports a Triton kernel module and never queries the GPU, so ``TRITON_INTERPRET`` may be
set after ``import rlvr_fast`` but before the first op call that reaches a kernel.
"""

from rlvr_fast._version import __version__
from rlvr_fast.backends import BACKENDS, BackendUnavailableError, has_cuda_extension
from rlvr_fast.ops.group_advantage import (
    ESTIMATORS,
    SAMPLE_MODES,
    SCALES,
    GroupAdvantages,
    group_advantages,
    group_advantages_reference,
)

HAS_CUDA_EXT: bool = has_cuda_extension()

__all__ = [
    "__version__",
    "BACKENDS",
    "BackendUnavailableError",
    "HAS_CUDA_EXT",
    "ESTIMATORS",
    "SAMPLE_MODES",
    "SCALES",
    "GroupAdvantages",
    "group_advantages",
    "group_advantages_reference",
]
