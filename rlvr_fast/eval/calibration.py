"""Calibration of stated confidences q against verdicts c (docs/design.md §7; RLCR, Damani et al. 2025,
arXiv:2507.16806).

- Brier score: mean (q - c)^2.
- Expected calibration error (Guo et al. 2017, arXiv:1706.04599) with M equal-width bins I_m = ((m-1)/M, m/M]
  (q = 0 falls in the first bin): ECE = sum_m (n_m / N) |mean q over I_m - accuracy over I_m|; empty bins add nothing.
  Bin edges are m/M computed by one correctly rounded division, so q = 0.3 lands in (0.2, 0.3] as written.
- AUROC: the probability that a random correct answer carries a higher confidence than a random wrong one, ties
  counting one half (the Mann-Whitney U statistic from mid-ranks). Undefined, returned as NaN, when every verdict is
  the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["ReliabilityBins", "auroc", "brier_score", "expected_calibration_error", "reliability_bins"]


def _as_array(x: Any) -> np.ndarray:
    return np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x)


def _pairs(conf: Any, correct: Any, fn: str) -> tuple[np.ndarray, np.ndarray]:
    q = _as_array(conf).astype(np.float64).ravel()
    c_raw = _as_array(correct)
    c = c_raw.astype(np.float64).ravel()
    if q.shape != c.shape:
        raise ValueError(f"{fn}: conf has {q.size} entries, correct {c.size} (expected equal)")
    if q.size == 0:
        raise ValueError(f"{fn}: conf and correct are empty")
    if not np.all(np.isfinite(q)) or np.any((q < 0) | (q > 1)):
        bad = q[~np.isfinite(q) | (q < 0) | (q > 1)][:3]
        raise ValueError(f"{fn}: conf must lie in [0, 1], got {bad.tolist()}")
    if np.any((c != 0) & (c != 1)):
        raise ValueError(
            f"{fn}: correct must hold only 0/1 (or bool), got {np.unique(c[(c != 0) & (c != 1)])[:3].tolist()}"
        )
    return q, c


def brier_score(conf: Any, correct: Any) -> float:
    """mean (q - c)^2 over the N samples."""
    q, c = _pairs(conf, correct, "brier_score")
    return float(np.mean((q - c) ** 2))


@dataclass(frozen=True)
class ReliabilityBins:
    """Per bin m: upper edge m/M, sample count, mean confidence and accuracy (NaN in empty bins)."""

    upper_edges: np.ndarray
    count: np.ndarray
    mean_confidence: np.ndarray
    accuracy: np.ndarray


def reliability_bins(conf: Any, correct: Any, n_bins: int = 10) -> ReliabilityBins:
    """The reliability diagram behind ``expected_calibration_error``."""
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"reliability_bins: n_bins must be a positive int, got {n_bins!r}")
    q, c = _pairs(conf, correct, "reliability_bins")
    inner_edges = np.arange(1, n_bins) / n_bins
    b = np.searchsorted(inner_edges, q, side="left")  # right-closed bins ((m-1)/M, m/M]
    count = np.bincount(b, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_q = np.bincount(b, weights=q, minlength=n_bins) / count
        acc = np.bincount(b, weights=c, minlength=n_bins) / count
    return ReliabilityBins(np.arange(1, n_bins + 1) / n_bins, count.astype(np.int64), mean_q, acc)


def expected_calibration_error(conf: Any, correct: Any, n_bins: int = 10) -> float:
    """ECE with ``n_bins`` equal-width bins (see the module docstring)."""
    bins = reliability_bins(conf, correct, n_bins)
    full = bins.count > 0
    n = bins.count.sum()
    return float(np.sum(bins.count[full] / n * np.abs(bins.mean_confidence[full] - bins.accuracy[full])))


def _midranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    # first and last position of each run of equal values -> the run's average rank (1-based)
    run_start = np.r_[True, sorted_x[1:] != sorted_x[:-1]]
    run_id = np.cumsum(run_start) - 1
    starts = np.flatnonzero(run_start)
    ends = np.r_[starts[1:], x.size]
    avg = (starts + ends + 1) / 2.0
    ranks = np.empty_like(x, dtype=np.float64)
    ranks[order] = avg[run_id]
    return ranks


def auroc(conf: Any, correct: Any) -> float:
    """Area under the ROC curve of ``conf`` as a score for ``correct``; NaN when all verdicts are equal."""
    q, c = _pairs(conf, correct, "auroc")
    pos = int(c.sum())
    neg = c.size - pos
    if pos == 0 or neg == 0:
        return float("nan")
    ranks = _midranks(q)
    u = ranks[c == 1].sum() - pos * (pos + 1) / 2.0
    return float(u / (pos * neg))
