"""Unbiased pass@k, pass@k curves, and standard errors of pass@k and of a base-vs-trained difference.

pass@k (Chen et al. 2021, arXiv:2107.03374; the curves of Yue et al. 2025, arXiv:2504.13837): a problem sampled n times
with c correct has

    pass@k = 1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n-c+1}^{n} (1 - k / i)        (1 when n - c < k)

The product form never forms the huge binomials and loses nothing to cancellation (every factor is in [0, 1)). Here it
is vectorised over problems: a (problems, max c) matrix of factors, ones past each problem's c, reduced with a
product in float64.

Standard errors are over problems (the benchmark is a sample of problems; Miller 2024, "Adding error bars to evals",
arXiv:2411.00640): SE = std_P(pass@k_p) / sqrt(P) with Bessel's correction, and for a comparison of two models on the
same problems the paired difference d_p = pass@k_p(B) - pass@k_p(A) gives SE(delta) = std_P(d_p) / sqrt(P); normal
confidence intervals mean +- z * SE.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np

__all__ = ["PassAtK", "PassAtKDelta", "pass_at_k", "pass_at_k_curve", "pass_at_k_delta", "pass_at_k_summary"]

_CHUNK = 1 << 22  # factor-matrix entries per chunk (32 MiB of float64)


def _as_counts(x: Any, name: str) -> np.ndarray:
    a = np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x)
    if a.dtype == bool or not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise TypeError(f"pass_at_k: {name} must hold integers, got dtype {a.dtype}")
    if np.issubdtype(a.dtype, np.floating) and not (np.all(np.isfinite(a)) and np.all(a == np.round(a))):
        bad = a[~np.isfinite(a) | (a != np.round(a))].ravel()[:3]
        raise ValueError(f"pass_at_k: {name} must hold whole numbers, got {bad.tolist()}")
    return a.astype(np.int64)


def _check(n: np.ndarray, c: np.ndarray, k: np.ndarray) -> None:
    for name, arr in (("n", n), ("c", c)):
        if np.any(arr < 0):
            raise ValueError(f"pass_at_k: {name} must be >= 0, got {arr[arr < 0].ravel()[:3].tolist()}")
    if np.any(k < 1):
        raise ValueError(f"pass_at_k: k must be >= 1, got {k[k < 1].ravel()[:3].tolist()}")
    n_b, c_b, k_b = np.broadcast_arrays(n, c, k)
    if np.any(c_b > n_b):
        i = np.flatnonzero(c_b > n_b)[0]
        raise ValueError(f"pass_at_k: c must be <= n, got c={c_b.flat[i]} > n={n_b.flat[i]}")
    if np.any(k_b > n_b):
        i = np.flatnonzero(k_b > n_b)[0]
        raise ValueError(f"pass_at_k: k must be <= n (the number of samples), got k={k_b.flat[i]} > n={n_b.flat[i]}")


def pass_at_k(n: Any, c: Any, k: Any) -> float | np.ndarray:
    """Unbiased pass@k, elementwise over broadcast ``n``, ``c``, ``k`` (ints, arrays, lists or tensors).

    Args:
        n: samples per problem; c: correct samples per problem (0 <= c <= n); k: 1 <= k <= n.

    Returns:
        A float for scalar inputs, else a float64 array of the broadcast shape.

    Raises:
        ValueError: a negative count, k < 1, c > n or k > n (the message shows the first offending values).
        TypeError: non-integer input.
    """
    n_a, c_a, k_a = (_as_counts(v, name) for v, name in ((n, "n"), (c, "c"), (k, "k")))
    scalar = n_a.ndim == c_a.ndim == k_a.ndim == 0
    _check(n_a, c_a, k_a)
    n_b, c_b, k_b = (a.ravel() for a in np.broadcast_arrays(n_a, c_a, k_a))
    shape = np.broadcast_shapes(n_a.shape, c_a.shape, k_a.shape)
    out = np.ones(n_b.shape, dtype=np.float64)  # n - c < k: every k-subset holds a correct sample
    todo = np.flatnonzero(n_b - c_b >= k_b)
    if todo.size:
        width = int(c_b[todo].max())
        rows = max(1, _CHUNK // max(width, 1))
        j = np.arange(width, dtype=np.float64)
        for start in range(0, todo.size, rows):
            idx = todo[start : start + rows]
            nn, cc, kk = (v[idx].astype(np.float64)[:, None] for v in (n_b, c_b, k_b))
            i = nn - cc + 1.0 + j  # i = n-c+1 .. n (columns past c are masked to factor 1)
            factors = np.where(j < cc, 1.0 - kk / i, 1.0)
            out[idx] = 1.0 - factors.prod(axis=1)
    if scalar:
        return float(out[0])
    return out.reshape(shape)


def pass_at_k_curve(n: Any, c: Any, ks: Sequence[int] | None = None) -> dict[int, float]:
    """Mean pass@k over problems for each k (default 1, 2, 4, ... up to the smallest n, plus that n itself)."""
    n_a = np.atleast_1d(_as_counts(n, "n"))
    if ks is None:
        n_min = int(n_a.min())
        if n_min < 1:
            raise ValueError("pass_at_k_curve: every problem needs n >= 1 samples")
        ks = [1 << e for e in range(n_min.bit_length()) if (1 << e) <= n_min]
        if ks[-1] != n_min:
            ks.append(n_min)
    return {int(k): float(np.mean(pass_at_k(n, c, int(k)))) for k in ks}


@dataclass(frozen=True)
class PassAtK:
    """Mean pass@k over P problems with its standard error and a normal confidence interval."""

    k: int
    mean: float
    se: float
    ci_low: float
    ci_high: float
    problems: int


@dataclass(frozen=True)
class PassAtKDelta:
    """Paired difference pass@k(trained) - pass@k(base) over the same problems."""

    k: int
    delta: float
    se: float
    ci_low: float
    ci_high: float
    problems: int


def _z(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    return NormalDist().inv_cdf(0.5 + confidence / 2.0)


def _mean_se(values: np.ndarray) -> tuple[float, float]:
    p = values.size
    mean = float(values.mean())
    se = float(values.std(ddof=1) / np.sqrt(p)) if p > 1 else float("nan")
    return mean, se


def pass_at_k_summary(n: Any, c: Any, k: int, *, confidence: float = 0.95) -> PassAtK:
    """Mean pass@k over problems, SE = std / sqrt(P) (NaN for one problem), and the normal CI at ``confidence``."""
    z = _z(confidence)
    values = np.atleast_1d(pass_at_k(n, c, k))
    mean, se = _mean_se(values)
    return PassAtK(int(k), mean, se, mean - z * se, mean + z * se, values.size)


def pass_at_k_delta(
    n_base: Any, c_base: Any, n_trained: Any, c_trained: Any, k: int, *, confidence: float = 0.95
) -> PassAtKDelta:
    """pass@k(trained) - pass@k(base) paired over the same problems (same order), with SE(delta) and a normal CI."""
    z = _z(confidence)
    base = np.atleast_1d(pass_at_k(n_base, c_base, k))
    trained = np.atleast_1d(pass_at_k(n_trained, c_trained, k))
    if base.shape != trained.shape:
        raise ValueError(
            f"pass_at_k_delta: base has {base.shape} problems, trained {trained.shape} (expected the same problems)"
        )
    delta, se = _mean_se(trained - base)
    return PassAtKDelta(int(k), delta, se, delta - z * se, delta + z * se, base.size)
