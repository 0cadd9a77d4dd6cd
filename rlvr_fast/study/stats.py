"""The error bars of the study's findings.

- pass@k and paired pass@k differences: ``rlvr_fast.eval.pass_at_k_summary`` / ``pass_at_k_delta`` (normal intervals
  over problems, Miller 2024, arXiv:2411.00640), for every k = 1..n.
- calibration (ECE, Brier, AUROC; ``rlvr_fast.eval.calibration``): a percentile bootstrap over problems (the problems
  are the sample; a problem's n completions are resampled together), paired when two models answered the same
  problems.
- an elicitation-free confidence, the agreement of a problem's n samples (``agreement_confidence``), for models
  that do not state one.
- frequencies (format classes): the Wilson score interval over completions (completions of one prompt are correlated,
  so it is somewhat narrow for training rollouts).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict
from statistics import NormalDist

import numpy as np

from rlvr_fast.eval import auroc, brier_score, expected_calibration_error, pass_at_k_delta, pass_at_k_summary

__all__ = [
    "BOOTSTRAP_RESAMPLES",
    "CONFIDENCE",
    "agreement_confidence",
    "bootstrap_calibration",
    "intervals_overlap",
    "pass_at_k_curve_ci",
    "pass_at_k_deltas",
    "wilson",
]

CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 1000
_Z = NormalDist().inv_cdf(0.5 + CONFIDENCE / 2)
CAL_METRICS: dict[str, Callable] = {"ece": expected_calibration_error, "brier": brier_score, "auroc": auroc}


def pass_at_k_curve_ci(eval_result: dict) -> dict[int, dict]:
    """k -> {mean, se, ci_low, ci_high, problems} for every k = 1..n of an evaluation (``EvalResult.to_dict()``)."""
    n, counts = eval_result["n"], eval_result["correct_counts"]
    return {k: asdict(pass_at_k_summary([n] * len(counts), counts, k, confidence=CONFIDENCE)) for k in range(1, n + 1)}


def pass_at_k_deltas(before: dict, after: dict) -> dict[int, dict]:
    """k -> paired difference after - before {delta, se, ci_low, ci_high, problems}; both on the same problems."""
    n_b, n_a = before["n"], after["n"]
    if len(before["correct_counts"]) != len(after["correct_counts"]):
        raise ValueError(
            f"pass_at_k_deltas: {len(before['correct_counts'])} vs {len(after['correct_counts'])} "
            f"problems (expected the same problems)"
        )
    out = {}
    for k in range(1, min(n_b, n_a) + 1):
        d = pass_at_k_delta(
            [n_b] * len(before["correct_counts"]),
            before["correct_counts"],
            [n_a] * len(after["correct_counts"]),
            after["correct_counts"],
            k,
            confidence=CONFIDENCE,
        )
        out[k] = asdict(d)
    return out


def before_after_pass_at_k(before: dict, after: dict) -> dict[int, dict]:
    """k -> {"before", "after", "delta"} for every k both evaluations report (their curves may stop at 1, 2, 4, ...):
    each side's pass@k with its interval and the paired difference after - before (``pass_at_k_deltas``)."""
    return {
        k: {"before": before["pass_at_k"][str(k)], "after": after["pass_at_k"][str(k)], "delta": d}
        for k, d in pass_at_k_deltas(before, after).items()
        if str(k) in before["pass_at_k"] and str(k) in after["pass_at_k"]
    }


def wilson(count: int, total: int) -> tuple[float, float]:
    """Wilson score interval of a proportion count / total at ``CONFIDENCE`` ((nan, nan) when total is 0)."""
    if total <= 0:
        return float("nan"), float("nan")
    p = count / total
    denom = 1 + _Z**2 / total
    centre = (p + _Z**2 / (2 * total)) / denom
    half = _Z * math.sqrt(p * (1 - p) / total + _Z**2 / (4 * total**2)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def intervals_overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] <= b[1] and b[0] <= a[1]


def agreement_confidence(per_completion: dict, n: int) -> list[float]:
    """An elicitation-free confidence for each completion: the share of its problem's n samples whose answer equals
    its own (``per_completion["answer"]`` keys; no answer counts as one more answer). The empirical probability that
    the model gives this answer, in {1/n, ..., 1}: a model that collapses onto one answer states 1 whether right or
    wrong (the confident guessing binary rewards encourage, RLCR)."""
    answers = per_completion["answer"]
    if len(answers) % n:
        raise ValueError(f"agreement_confidence: {len(answers)} answers is not problems x n={n}")
    out = []
    for start in range(0, len(answers), n):
        group = answers[start : start + n]
        out += [group.count(a) / n for a in group]
    return out


def _arrays(per_completion: dict, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(problems, n) confidence (NaN where none was stated) and verdict arrays."""
    conf = np.array([np.nan if q is None else q for q in per_completion["confidence"]], dtype=float)
    corr = np.asarray(per_completion["correct"], dtype=float)
    if conf.size % n or conf.size != corr.size:
        raise ValueError(
            f"per-completion data of {conf.size} confidences / {corr.size} verdicts is not problems x n={n}"
        )
    return conf.reshape(-1, n), corr.reshape(-1, n)


def _metrics(conf: np.ndarray, corr: np.ndarray) -> dict[str, float]:
    q, c = conf.ravel(), corr.ravel()
    keep = ~np.isnan(q)
    out = {"answered": float(keep.mean()) if q.size else float("nan")}
    for name, fn in CAL_METRICS.items():
        out[name] = float(fn(q[keep], c[keep])) if keep.any() else float("nan")
    return out


def _ci(values: list[float]) -> tuple[float, float, int]:
    v = np.asarray(values, dtype=float)
    v = v[~np.isnan(v)]
    if v.size == 0:
        return float("nan"), float("nan"), 0
    lo, hi = np.percentile(v, [50 * (1 - CONFIDENCE), 100 - 50 * (1 - CONFIDENCE)])
    return float(lo), float(hi), int(v.size)


def bootstrap_calibration(
    per_completion: dict, n: int, other: dict | None = None, *, seed: int = 0, resamples: int = BOOTSTRAP_RESAMPLES
) -> dict:
    """Calibration of one evaluation with bootstrap CIs, and with ``other`` (same problems) the paired difference
    self - other.

    Returns {"answered", "ece", "brier", "auroc": {"value", "ci_low", "ci_high", "defined_in"}, "answered_count",
    "total", "resamples", and "difference": {metric: {...}} when ``other`` is given}. "defined_in" counts the
    resamples where the metric exists (AUROC needs right and wrong answers among the stated confidences).
    """
    conf, corr = _arrays(per_completion, n)
    paired = other is not None
    if paired:
        conf_b, corr_b = _arrays(other, n)
        if conf_b.shape != conf.shape:
            raise ValueError(f"bootstrap_calibration: {conf.shape[0]} vs {conf_b.shape[0]} problems (expected equal)")
    point = _metrics(conf, corr)
    point_b = _metrics(conf_b, corr_b) if paired else None
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {m: [] for m in point}
    diffs: dict[str, list[float]] = {m: [] for m in point}
    problems = conf.shape[0]
    for _ in range(resamples):
        idx = rng.integers(0, problems, problems)
        m = _metrics(conf[idx], corr[idx])
        for k, v in m.items():
            draws[k].append(v)
        if paired:
            mb = _metrics(conf_b[idx], corr_b[idx])
            for k in m:
                diffs[k].append(m[k] - mb[k])
    out: dict = {}
    for k, v in point.items():
        lo, hi, defined = _ci(draws[k])
        out[k] = {"value": v, "ci_low": lo, "ci_high": hi, "defined_in": defined}
    if paired:
        out["difference"] = {}
        for k in point:
            lo, hi, defined = _ci(diffs[k])
            out["difference"][k] = {"value": point[k] - point_b[k], "ci_low": lo, "ci_high": hi, "defined_in": defined}
    answered = ~np.isnan(conf)
    out.update(resamples=resamples, answered_count=int(answered.sum()), total=int(answered.size))
    return out
