"""Evaluation metrics (docs/design.md §7): pass@k and its error bars, calibration, format frequency, the
contamination probe, and update sparsity between checkpoints.

``update_sparsity`` is the optimizer's function (``rlvr_fast.optim.sparsity``), re-exported here, not a second copy;
it is imported on first use so this package imports without the optimizer module.
"""

from typing import Any

from rlvr_fast.eval.calibration import ReliabilityBins, auroc, brier_score, expected_calibration_error, reliability_bins
from rlvr_fast.eval.contamination import (
    ContaminationReport,
    FractionSummary,
    ProbeSample,
    contamination_probe,
    lcs_length,
    rouge_l,
)
from rlvr_fast.eval.formats import DEFAULT_FORMAT_CLASSES, UNMATCHED, FormatStats, format_frequency
from rlvr_fast.eval.passk import PassAtK, PassAtKDelta, pass_at_k, pass_at_k_curve, pass_at_k_delta, pass_at_k_summary

_LAZY = {"update_sparsity": "rlvr_fast.optim.sparsity"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later look-ups skip __getattr__
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DEFAULT_FORMAT_CLASSES",
    "UNMATCHED",
    "ContaminationReport",
    "FormatStats",
    "FractionSummary",
    "PassAtK",
    "PassAtKDelta",
    "ProbeSample",
    "ReliabilityBins",
    "auroc",
    "brier_score",
    "contamination_probe",
    "expected_calibration_error",
    "format_frequency",
    "lcs_length",
    "pass_at_k",
    "pass_at_k_curve",
    "pass_at_k_delta",
    "pass_at_k_summary",
    "reliability_bins",
    "rouge_l",
    "update_sparsity",
]
