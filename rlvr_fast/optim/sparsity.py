"""How sparse was an update: the fraction of entries unchanged between two checkpoints, and the rank of the change.

Mukherjee et al. 2025 (arXiv:2505.11711; docs/design.md §4) call an entry unchanged when
|theta_after - theta_before| <= 1e-5 on bf16 weights, and report that RL leaves 70-95% of entries unchanged while the
update of each matrix stays nearly full-rank. Part of that sparsity may be bf16 rounding (an update smaller than half
a bf16 ulp vanishes), so the comparison dtype is a parameter: ``dtype=torch.float32`` on fp32 checkpoints measures the
update itself, ``dtype=torch.bfloat16`` measures what a bf16 checkpoint keeps.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from rlvr_fast.ops.checks import accumulation_dtype

OVERALL = "overall"
RANK_PREFIX = "rank_ratio/"


def _check_states(state_a: Mapping, state_b: Mapping, where: str) -> list[str]:
    """The floating-point tensor names both states hold, in state_a's order; mismatches raise."""
    for arg, state in (("state_a", state_a), ("state_b", state_b)):
        if not isinstance(state, Mapping):
            raise TypeError(
                f"{where}: {arg} must be a mapping name -> tensor (a state dict), got {type(state).__name__}"
            )
    keys_a = [k for k, v in state_a.items() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    keys_b = {k for k, v in state_b.items() if isinstance(v, torch.Tensor) and v.is_floating_point()}
    only_a = [k for k in keys_a if k not in keys_b]
    only_b = sorted(keys_b - set(keys_a))
    if only_a or only_b:
        raise ValueError(
            f"{where}: state_a and state_b must hold the same floating-point tensors; only in state_a: {only_a[:5]}, "
            f"only in state_b: {only_b[:5]}"
        )
    if not keys_a:
        raise ValueError(f"{where}: the states hold no floating-point tensors")
    for k in keys_a:
        if tuple(state_a[k].shape) != tuple(state_b[k].shape):
            raise ValueError(
                f"{where}: tensor {k!r} has shape {tuple(state_a[k].shape)} in state_a but {tuple(state_b[k].shape)} "
                f"in state_b"
            )
    return keys_a


def _as_compared(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Both tensors rounded to the comparison dtype, then widened to float32 (or float64) so the difference is exact
    for bf16/fp16 values."""
    wide = accumulation_dtype(dtype)
    b = b.to(a.device)
    return a.detach().to(dtype).to(wide), b.detach().to(dtype).to(wide)


def update_rank_ratio(diff: torch.Tensor, rtol: float | None = None) -> float:
    """rank(diff) / min(m, n) for a 2-D update ``diff`` (m, n).

    Numerical rank: the number of singular values > rtol * sigma_max, with rtol = max(m, n) * eps(float32) by default
    (the tolerance of numpy / torch.linalg.matrix_rank for float32 inputs). The SVD runs in float32 on diff's device.
    An all-zero update has rank 0.
    """
    if diff.dim() != 2:
        raise ValueError(f"update_rank_ratio: diff must be 2-D (m, n), got shape {tuple(diff.shape)}")
    m, n = diff.shape
    if min(m, n) == 0:
        return 0.0
    if rtol is None:
        rtol = max(m, n) * torch.finfo(torch.float32).eps
    s = torch.linalg.svdvals(diff.to(torch.float32))
    if float(s[0]) == 0.0 or not math.isfinite(float(s[0])):
        return 0.0 if float(s[0]) == 0.0 else float("nan")
    return int((s > rtol * s[0]).sum()) / min(m, n)


def update_effective_rank(diff: torch.Tensor) -> float:
    """The entropy effective rank of a 2-D update ``diff`` (m, n): exp(H(p)) with p_i = sigma_i / sum_j sigma_j over
    its singular values (Roy & Vetterli 2007, "The effective rank: a measure of effective dimensionality").

    Unlike the numerical rank (``update_rank_ratio``), which counts every singular value above rounding level and so
    calls almost any dense update full-rank, it weighs directions by their share of the spectrum: r equal singular
    values give exactly r, a spectrum dominated by one direction gives close to 1. An all-zero update has 0; the SVD
    runs in float32 (float64 for a float64 diff) on diff's device.
    """
    if diff.dim() != 2:
        raise ValueError(f"update_effective_rank: diff must be 2-D (m, n), got shape {tuple(diff.shape)}")
    if min(diff.shape) == 0:
        return 0.0
    s = torch.linalg.svdvals(diff.to(torch.float64 if diff.dtype == torch.float64 else torch.float32))
    total = float(s.sum())
    if total == 0.0:
        return 0.0
    if not math.isfinite(total):
        return float("nan")
    p = (s / total)[s > 0].double()
    return float(torch.exp(-(p * p.log()).sum()))


def update_sparsity(
    state_a: Mapping[str, torch.Tensor],
    state_b: Mapping[str, torch.Tensor],
    atol: float = 1e-5,
    dtype: torch.dtype = torch.bfloat16,
    *,
    rank: bool = False,
    rank_rtol: float | None = None,
) -> dict[str, float]:
    """Fraction of entries unchanged between two state dicts, per tensor and overall.

    Args:
        state_a, state_b: name -> tensor (e.g. the reference model's and the trained model's state_dict()); the same
            floating-point tensors with the same shapes (non-floating tensors are ignored). Any devices.
        atol: an entry is unchanged when |a - b| <= atol after both are rounded to ``dtype``.
        dtype: the comparison dtype (bf16 by default, as Mukherjee et al.; float32 to see past bf16 rounding).
        rank: also report, for every 2-D tensor, the update-rank ratio rank(b - a) / min(m, n) under the key
            ``"rank_ratio/<name>"`` (see ``update_rank_ratio`` for the numerical tolerance, ``rank_rtol``).

    Returns:
        {name: fraction unchanged in [0, 1] for each floating-point tensor, "overall": unchanged entries / all entries
        (weighted by size), plus the rank ratios when ``rank``}. A NaN in either state counts as changed.
    """
    where = "update_sparsity"
    if isinstance(atol, bool) or not isinstance(atol, (int, float)) or not atol >= 0 or not math.isfinite(atol):
        raise ValueError(f"{where}: atol must be a finite number >= 0, got {atol!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"{where}: dtype must be a floating torch.dtype, got {dtype!r}")
    names = _check_states(state_a, state_b, where)
    if OVERALL in names:
        raise ValueError(f"{where}: a tensor is named {OVERALL!r}, the key reserved for the overall fraction")
    out: dict[str, float] = {}
    ranks: dict[str, float] = {}
    unchanged_total, total = 0, 0
    for name in names:
        a, b = _as_compared(state_a[name], state_b[name], dtype)
        diff = b - a
        unchanged = int((diff.abs() <= atol).sum())  # NaN compares False: counted as changed
        out[name] = unchanged / a.numel() if a.numel() else 1.0
        unchanged_total += unchanged
        total += a.numel()
        if rank and diff.dim() == 2:
            ranks[RANK_PREFIX + name] = update_rank_ratio(diff, rank_rtol)
    out[OVERALL] = unchanged_total / total if total else 1.0
    out.update(ranks)
    return out
