"""Triton kernel: group-relative advantages and group statistics in one launch.

Each program owns BLOCK_GROUPS groups laid out as a (BLOCK_GROUPS, BLOCK_G) tile (one group per row), so a group's
reductions (mean, Bessel std, min/max for the all-equal test, solve rate) are row reductions in registers. With
scale="batch" every program first reduces the whole batch itself (three passes: min / max, sum, squared
deviations): the batch holds at most a few hundred thousand rewards, so the redundant reads cost microseconds and save
a second launch.

The estimator, scale and sample-mode codes come from ``rlvr_fast.ops.constants`` (Triton-free), as the op's do.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from rlvr_fast.kernels.launch_plan import KernelLaunch

from rlvr_fast.ops.constants import (
    ADV_DR_GRPO,
    ADV_GRPO,
    ADV_NSR,
    ADV_PSR,
    ADV_RLOO,
    SAMPLE_NEGATIVE_ONLY,
    SAMPLE_POSITIVE_ONLY,
    SCALE_BATCH,
    SCALE_GROUP,
)

# @triton.jit code reads only tl.constexpr globals: the shared codes, wrapped
C_GRPO = tl.constexpr(ADV_GRPO)
C_DR_GRPO = tl.constexpr(ADV_DR_GRPO)
C_RLOO = tl.constexpr(ADV_RLOO)
C_PSR = tl.constexpr(ADV_PSR)
C_NSR = tl.constexpr(ADV_NSR)
C_SCALE_GROUP = tl.constexpr(SCALE_GROUP)
C_SCALE_BATCH = tl.constexpr(SCALE_BATCH)
C_SAMPLE_POSITIVE = tl.constexpr(SAMPLE_POSITIVE_ONLY)
C_SAMPLE_NEGATIVE = tl.constexpr(SAMPLE_NEGATIVE_ONLY)

_TILE_ELEMENTS = 4096  # elements per program's tile: enough rows to amortise a program, small enough for registers
# Groups per program at most: each group keeps ~10 per-row values (mean, std, min, max, counts, flags) live beside the
# tile, so rows cost registers too. 2048 rows of 2 spilled 1-1.4 KB per thread on sm_80 / sm_90 (with scale="batch");
# 256 rows is 2 per thread with 4 warps (kernels/check/aot_compile.py).
_MAX_BLOCK_GROUPS = 256
_BATCH_BLOCK = 1024  # chunk of the batch-wide reduction for scale="batch"


@triton.jit
def _unit_of(peak, IS_F64: tl.constexpr):
    """2^floor(log2(peak)) for peak >= 1, else 1: the exponent bits of ``peak`` (rlvr_fast.ops.group_advantage.unit_of;
    exact, and values / unit lie in (-2, 2), so no sum, mean or deviation of finite rewards overflows)."""
    if IS_F64:
        unit = (peak.to(tl.int64, bitcast=True) & 0x7FF0000000000000).to(tl.float64, bitcast=True)
    else:
        unit = (peak.to(tl.int32, bitcast=True) & 0x7F800000).to(tl.float32, bitcast=True)
    return tl.maximum(unit, 1.0)


@triton.jit
def _group_advantage_fwd_kernel(
    rewards_ptr,  # (n_groups * group_size,) any float dtype
    correct_ptr,  # (n_groups * group_size,) float32 0/1, or a dummy when HAS_CORRECT is False
    adv_ptr,  # (n_groups * group_size,) float32 out
    mean_ptr,  # (n_groups,) float32 out
    std_ptr,  # (n_groups,) float32 out
    solve_ptr,  # (n_groups,) float32 out
    all_equal_ptr,  # (n_groups,) int8 out
    all_correct_ptr,  # (n_groups,) int8 out
    all_wrong_ptr,  # (n_groups,) int8 out
    n_groups,
    group_size,
    eps,
    lam,
    ESTIMATOR: tl.constexpr,
    SCALE: tl.constexpr,
    SAMPLE_MODE: tl.constexpr,
    HAS_CORRECT: tl.constexpr,
    IS_F64: tl.constexpr,
    BLOCK_GROUPS: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BATCH_BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    groups = pid * BLOCK_GROUPS + tl.arange(0, BLOCK_GROUPS)
    members = tl.arange(0, BLOCK_G)
    in_bounds = (groups[:, None] < n_groups) & (members[None, :] < group_size)
    offsets = groups[:, None].to(tl.int64) * group_size + members[None, :]

    r = tl.load(rewards_ptr + offsets, mask=in_bounds, other=0.0)
    if IS_F64:  # float64 rewards stay float64 (beyond float32's range they are still finite); the rest in float32
        r = r.to(tl.float64)
    else:
        r = r.to(tl.float32)
    # Non-finite rewards reach the kernel only under invalid="mask" (the op raises on them otherwise).
    valid = in_bounds & (tl.abs(r) < float("inf"))
    r = tl.where(valid, r, 0.0)
    count = tl.sum(valid.to(tl.float32), axis=1)
    r_max = tl.max(tl.where(valid, r, -float("inf")), axis=1)
    r_min = tl.min(tl.where(valid, r, float("inf")), axis=1)
    all_equal = (r_max == r_min) | (count < 2.0)
    # Every statistic in units of the group's power-of-two unit (~ its largest |reward|): no sum, mean or deviation
    # overflows for any finite reward, and for rewards below 2 in magnitude the unit is 1 (nothing changes).
    unit = _unit_of(tl.max(tl.abs(r), axis=1), IS_F64)
    u = r / unit[:, None]
    lo = r_min / unit
    hi = r_max / unit
    mean = tl.sum(u, axis=1) / tl.maximum(count, 1.0)
    mean = tl.where(count > 0.0, tl.minimum(tl.maximum(mean, lo), hi), 0.0)  # rounding never leaves [min, max]
    dev = tl.where(valid, u - mean[:, None], 0.0)
    # Scale-invariant std: deviations divided by the group's largest |deviation| before squaring (the reference's
    # _exact_stats does the same).
    top = tl.max(tl.abs(dev), axis=1)
    safe = tl.where(top > 0.0, top, 1.0)
    # not named x: the scale='batch' loops below reuse x for (BATCH_BLOCK,) chunks, and a compiled loop-carried
    # variable may not change shape (the interpreter does not notice)
    scaled = dev / safe[:, None]
    std = tl.where(top > 0.0, safe * tl.sqrt(tl.sum(scaled * scaled, axis=1) / tl.maximum(count - 1.0, 1.0)), 0.0)

    if HAS_CORRECT:
        c = tl.load(correct_ptr + offsets, mask=in_bounds, other=0.0).to(tl.float32)
        c = tl.where(valid, c, 0.0)
        n_correct = tl.sum(c, axis=1)
    else:
        c = tl.zeros([BLOCK_GROUPS, BLOCK_G], dtype=tl.float32)
        n_correct = tl.zeros([BLOCK_GROUPS], dtype=tl.float32)

    if ESTIMATOR == C_GRPO:
        if SCALE == C_SCALE_GROUP:
            adv = dev / (std + eps / unit)[:, None]
        elif SCALE == C_SCALE_BATCH:
            # pass 1: count, min and max of the batch (its unit); pass 2: the mean in that unit; pass 3: the squared
            # deviations divided by the largest one (max - mean or mean - min)
            n_total = tl.zeros([BATCH_BLOCK], dtype=tl.float32)
            b_lo = tl.full([BATCH_BLOCK], float("inf"), dtype=r.dtype)
            b_hi = tl.full([BATCH_BLOCK], -float("inf"), dtype=r.dtype)
            n_all = n_groups * group_size
            for start in range(0, n_all, BATCH_BLOCK):
                idx = start + tl.arange(0, BATCH_BLOCK)
                x = tl.load(rewards_ptr + idx, mask=idx < n_all, other=0.0).to(r.dtype)
                ok = (idx < n_all) & (tl.abs(x) < float("inf"))
                n_total += ok.to(tl.float32)
                b_lo = tl.minimum(b_lo, tl.where(ok, x, float("inf")))
                b_hi = tl.maximum(b_hi, tl.where(ok, x, -float("inf")))
            n_batch = tl.sum(n_total, axis=0)
            batch_min = tl.min(b_lo, axis=0)
            batch_max = tl.max(b_hi, axis=0)
            b_unit = _unit_of(tl.where(n_batch > 0.0, tl.maximum(-batch_min, batch_max), 0.0), IS_F64)
            total = tl.zeros([BATCH_BLOCK], dtype=r.dtype)
            for start in range(0, n_all, BATCH_BLOCK):
                idx = start + tl.arange(0, BATCH_BLOCK)
                x = tl.load(rewards_ptr + idx, mask=idx < n_all, other=0.0).to(r.dtype)
                ok = (idx < n_all) & (tl.abs(x) < float("inf"))
                total += tl.where(ok, x / b_unit, 0.0)
            b_low = batch_min / b_unit
            b_high = batch_max / b_unit
            batch_mean = tl.sum(total, axis=0) / tl.maximum(n_batch, 1.0)
            batch_mean = tl.where(n_batch > 0.0, tl.minimum(tl.maximum(batch_mean, b_low), b_high), 0.0)
            batch_top = tl.where(n_batch > 0.0, tl.maximum(b_high - batch_mean, batch_mean - b_low), 0.0)
            batch_safe = tl.where(batch_top > 0.0, batch_top, 1.0)
            sq = tl.zeros([BATCH_BLOCK], dtype=r.dtype)
            for start in range(0, n_all, BATCH_BLOCK):
                idx = start + tl.arange(0, BATCH_BLOCK)
                x = tl.load(rewards_ptr + idx, mask=idx < n_all, other=0.0).to(r.dtype)
                ok = (idx < n_all) & (tl.abs(x) < float("inf"))
                d = tl.where(ok, (x / b_unit - batch_mean) / batch_safe, 0.0)
                sq += d * d
            batch_std = batch_safe * tl.sqrt(tl.sum(sq, axis=0) / tl.maximum(n_batch - 1.0, 1.0))
            batch_std = tl.where(batch_top > 0.0, batch_std, 0.0)
            # (batch std + eps) in each group's unit (a ratio of powers of two: exact)
            adv = dev / ((batch_std + eps / b_unit) * (b_unit / unit))[:, None]
        else:
            adv = dev * unit[:, None]
    elif ESTIMATOR == C_DR_GRPO:
        adv = dev * unit[:, None]
    elif ESTIMATOR == C_RLOO:  # r_i - mean_{j != i} = n/(n-1) (r_i - mean), back to reward units last
        adv = dev * (count / tl.maximum(count - 1.0, 1.0))[:, None] * unit[:, None]
    elif ESTIMATOR == C_PSR:
        adv = c
    elif ESTIMATOR == C_NSR:
        adv = c - 1.0
    else:  # w_reinforce
        adv = tl.where(c > 0.5, lam, -1.0)

    if ESTIMATOR <= C_RLOO:  # centred estimators (grpo, dr_grpo, rloo): a group with nothing to compare gets exactly 0
        adv = tl.where(all_equal[:, None], 0.0, adv)
    if SAMPLE_MODE == C_SAMPLE_POSITIVE:
        adv = tl.maximum(adv, 0.0)
    elif SAMPLE_MODE == C_SAMPLE_NEGATIVE:
        adv = tl.minimum(adv, 0.0)
    adv = tl.where(valid, adv, 0.0)

    tl.store(adv_ptr + offsets, adv, mask=in_bounds)
    row_ok = groups < n_groups
    tl.store(mean_ptr + groups, mean * unit, mask=row_ok)
    tl.store(std_ptr + groups, std * unit, mask=row_ok)  # inf where the std itself is beyond float32's range
    tl.store(all_equal_ptr + groups, all_equal.to(tl.int8), mask=row_ok)
    if HAS_CORRECT:
        tl.store(solve_ptr + groups, n_correct / tl.maximum(count, 1.0), mask=row_ok)
        tl.store(all_correct_ptr + groups, ((n_correct == count) & (count > 0.0)).to(tl.int8), mask=row_ok)
        tl.store(all_wrong_ptr + groups, ((n_correct == 0.0) & (count > 0.0)).to(tl.int8), mask=row_ok)


class GroupAdvantageOutputs(NamedTuple):
    advantages: torch.Tensor  # (N,) float32
    mean: torch.Tensor  # (groups,) float32
    std: torch.Tensor  # (groups,) float32
    solve_rate: torch.Tensor  # (groups,) float32 (left unwritten when correct is None)
    flags: torch.Tensor  # (3, groups) int8: all_equal, all_correct, all_wrong (the last two 0 when correct is None)


def empty_outputs(n_groups: int, group_size: int, device: torch.device) -> GroupAdvantageOutputs:
    return GroupAdvantageOutputs(
        advantages=torch.empty(n_groups * group_size, dtype=torch.float32, device=device),
        mean=torch.empty(n_groups, dtype=torch.float32, device=device),
        std=torch.empty(n_groups, dtype=torch.float32, device=device),
        solve_rate=torch.empty(n_groups, dtype=torch.float32, device=device),
        flags=torch.zeros(3, n_groups, dtype=torch.int8, device=device),
    )


def group_advantage_fwd(
    rewards: torch.Tensor,
    correct: torch.Tensor | None,
    *,
    n_groups: int,
    group_size: int,
    estimator: int,
    scale: int,
    sample_mode: int,
    eps: float,
    lam: float,
    out: GroupAdvantageOutputs | None = None,
) -> GroupAdvantageOutputs:
    """Launch the kernel. ``rewards`` (N,) contiguous; ``correct`` (N,) float32 contiguous or None; n_groups >= 1.

    ``out`` may supply the output buffers (contiguous, shapes as in ``empty_outputs``), e.g. poisoned ones in tests.
    """
    out = out if out is not None else empty_outputs(n_groups, group_size, rewards.device)
    plan_group_advantage_fwd(
        rewards,
        correct,
        out,
        n_groups=n_groups,
        group_size=group_size,
        estimator=estimator,
        scale=scale,
        sample_mode=sample_mode,
        eps=eps,
        lam=lam,
    ).launch()
    return out


def plan_group_advantage_fwd(
    rewards: torch.Tensor,
    correct: torch.Tensor | None,
    out: GroupAdvantageOutputs,
    *,
    n_groups: int,
    group_size: int,
    estimator: int,
    scale: int,
    sample_mode: int,
    eps: float,
    lam: float,
) -> KernelLaunch:
    """The launch ``group_advantage_fwd`` runs (tile sizes chosen here), without running it."""
    block_g = triton.next_power_of_2(group_size)
    # float64 rewards (IS_F64) take two registers per element: half the tile (4096 fp64 elements spilled 144-284 B)
    tile = _TILE_ELEMENTS // 2 if rewards.dtype == torch.float64 else _TILE_ELEMENTS
    block_groups = max(1, min(tile // block_g, _MAX_BLOCK_GROUPS, triton.next_power_of_2(n_groups)))
    grid = (triton.cdiv(n_groups, block_groups),)
    return KernelLaunch(
        _group_advantage_fwd_kernel,
        grid,
        (
            rewards,
            correct if correct is not None else out.advantages,
            out.advantages,
            out.mean,
            out.std,
            out.solve_rate,
            out.flags[0],
            out.flags[1],
            out.flags[2],
            n_groups,
            group_size,
            eps,
            lam,
        ),
        dict(
            ESTIMATOR=estimator,
            SCALE=scale,
            SAMPLE_MODE=sample_mode,
            HAS_CORRECT=correct is not None,
            IS_F64=rewards.dtype == torch.float64,
            BLOCK_GROUPS=block_groups,
            BLOCK_G=block_g,
            BATCH_BLOCK=_BATCH_BLOCK,
        ),
        num_warps=4,
    )
