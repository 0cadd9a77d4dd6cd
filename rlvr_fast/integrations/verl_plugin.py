"""The old path of ``rlvr_fast.integrations.verl.plugin``, still accepted: importing it registers rlvr_fast into verl
exactly as the new path does, and warns once that the path moved."""

import warnings

warnings.warn(
    "rlvr_fast.integrations.verl_plugin moved to rlvr_fast.integrations.verl.plugin; "
    "set VERL_USE_EXTERNAL_MODULES=rlvr_fast.integrations.verl.plugin",
    FutureWarning,
    stacklevel=2,
)

from rlvr_fast.integrations.verl.plugin import FUSED_LOGPROBS_ENV, REGISTRATION  # noqa: E402

__all__ = ["FUSED_LOGPROBS_ENV", "REGISTRATION"]
