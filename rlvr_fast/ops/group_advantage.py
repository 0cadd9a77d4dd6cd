"""Group-relative advantages: one scalar per completion, from the rewards of the G completions of each prompt.

Formulas: docs/design.md §1.

| estimator    | A_i                                               | paper                                     |
|--------------|---------------------------------------------------|-------------------------------------------|
| grpo         | (r_i - mean_g) / (std_g + eps), std Bessel        | DeepSeekMath, Shao et al. 2024 (2402.03300) |
| grpo, batch  | (r_i - mean_g) / (std over the batch + eps)       | TRL ``scale_rewards="batch"``              |
| grpo, none   | r_i - mean_g  (identical to dr_grpo)              |                                           |
| dr_grpo      | r_i - mean_g                                      | Dr. GRPO, Liu et al. 2025 (2503.20783)    |
| rloo         | r_i - mean_{j != i} r_j = G/(G-1) (r_i - mean_g)  | Ahmadian et al. 2024 (2402.14740)         |
| psr          | c_i                                               | Zhu et al. 2025 (2506.01347)              |
| nsr          | c_i - 1                                           | Zhu et al. 2025                           |
| w_reinforce  | lam if c_i else -1                                | Zhu et al. 2025                           |

Centred estimators (grpo, dr_grpo, rloo) give exactly 0 to a group of size 1 and to a group whose rewards are all equal,
never NaN. psr / nsr / w_reinforce are uncentred REINFORCE objectives on the verifier's verdict ``correct``: as in Zhu
et al., an all-wrong group under nsr still pushes every sample down (-1) and an all-correct group under psr still pushes
every sample up (+1); their advantages do not depend on ``rewards`` at all. Sample modes apply on top of any estimator:
positive_only A' = max(A, 0), negative_only A' = min(A, 0).

Four pieces, as in every op: ``group_advantages_reference`` (the specification, a literal per-group loop in float64),
the Triton kernel ``rlvr_fast.kernels.group_advantage`` (one launch), the vectorised torch path, and the public
``group_advantages``. No autograd: advantages are constants of the loss. Where the optional extension ``rlvr_fast._C``
is built, a CUDA C++ kernel (``csrc/group_advantage.cu``, one launch, any group size) is a fifth: ``backend="cuda"``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import NamedTuple

import torch

from rlvr_fast.backends import select_backend
from rlvr_fast.ops.constants import (
    ADV_DR_GRPO,
    ADV_GRPO,
    ADV_NSR,
    ADV_PSR,
    ADV_RLOO,
    ADV_W_REINFORCE,
    SAMPLE_ALL,
    SAMPLE_NEGATIVE_ONLY,
    SAMPLE_POSITIVE_ONLY,
    SCALE_BATCH,
    SCALE_GROUP,
    SCALE_NONE,
)

OP = "group_advantages"

# Largest group the Triton kernel holds in one tile (Triton caps a block at 2**20 elements; one group is one row).
TRITON_MAX_GROUP_SIZE = 65536


class AdvantageStats(NamedTuple):
    """Per-group quantities an estimator's formula may use; every tensor is (groups, G) or (groups, 1).

    Rewards, deviations and stds are held in units of the group's ``unit`` (a power of two near its largest |reward|,
    ``unit_of``), so that no intermediate overflows for any finite reward; dividing by a power of two is exact, so for
    rewards of ordinary size the results are bit for bit those of the unscaled formulas. A formula returns the
    advantage in reward units: ``dev * unit`` for the unnormalised estimators, ``dev / denominator`` for grpo.
    """

    rewards: torch.Tensor  # (groups, G) rewards / unit, 0 where invalid
    dev: torch.Tensor  # (groups, G) (r_i - mean_g) / unit, 0 where invalid
    std: torch.Tensor  # (groups, 1) Bessel std over the group's valid rewards / unit
    denominator: torch.Tensor  # (groups, 1) grpo's divisor chosen by ``scale``, / unit: std + eps, batch std + eps, 1
    unit: torch.Tensor  # (groups, 1) the group's power-of-two unit
    count: torch.Tensor  # (groups, 1) number of valid rewards
    correct: torch.Tensor | None  # (groups, G) 0/1 verdicts
    eps: float
    lam: float


@dataclass(frozen=True)
class Estimator:
    """One row of the estimator table.

    ``code`` is the ``tl.constexpr`` id the Triton kernel switches on; ``formula`` is the vectorised torch form used by
    the torch path (the reference spells every formula out separately, per group).
    """

    name: str
    code: int
    centred: bool  # subtracts the group mean: groups of size 1 or with all-equal rewards get exactly 0
    needs_correct: bool
    scales: tuple[str, ...]  # accepted ``scale`` values; the first is the default
    formula: Callable[[AdvantageStats], torch.Tensor]
    paper: str


def _rloo_formula(s: AdvantageStats) -> torch.Tensor:
    # r_i - mean_{j != i} r_j == n/(n-1) * (r_i - mean); n < 2 is zeroed by the centred rule. Back to reward units
    # last, so only a result that is itself beyond the float's range overflows.
    return s.dev * (s.count / (s.count - 1.0).clamp_min(1.0)) * s.unit


ESTIMATORS: dict[str, Estimator] = {
    e.name: e
    for e in (
        Estimator(
            name="grpo",
            code=ADV_GRPO,
            centred=True,
            needs_correct=False,
            scales=("group", "batch", "none"),
            formula=lambda s: s.dev / s.denominator,
            paper="Shao et al. 2024, arXiv:2402.03300",
        ),
        Estimator(
            name="dr_grpo",
            code=ADV_DR_GRPO,
            centred=True,
            needs_correct=False,
            scales=("none",),
            formula=lambda s: s.dev * s.unit,
            paper="Liu et al. 2025, arXiv:2503.20783",
        ),
        Estimator(
            name="rloo",
            code=ADV_RLOO,
            centred=True,
            needs_correct=False,
            scales=("none",),
            formula=_rloo_formula,
            paper="Ahmadian et al. 2024, arXiv:2402.14740",
        ),
        Estimator(
            name="psr",
            code=ADV_PSR,
            centred=False,
            needs_correct=True,
            scales=("none",),
            formula=lambda s: s.correct,
            paper="Zhu et al. 2025, arXiv:2506.01347",
        ),
        Estimator(
            name="nsr",
            code=ADV_NSR,
            centred=False,
            needs_correct=True,
            scales=("none",),
            formula=lambda s: s.correct - 1.0,
            paper="Zhu et al. 2025, arXiv:2506.01347",
        ),
        Estimator(
            name="w_reinforce",
            code=ADV_W_REINFORCE,
            centred=False,
            needs_correct=True,
            scales=("none",),
            formula=lambda s: torch.where(s.correct > 0.5, s.lam, -1.0),
            paper="Zhu et al. 2025, arXiv:2506.01347",
        ),
    )
}

SCALES: dict[str, int] = {"group": SCALE_GROUP, "batch": SCALE_BATCH, "none": SCALE_NONE}

SAMPLE_MODES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "all": lambda a: a,
    "positive_only": lambda a: a.clamp_min(0.0),
    "negative_only": lambda a: a.clamp_max(0.0),
}
SAMPLE_MODE_CODES: dict[str, int] = {
    "all": SAMPLE_ALL,
    "positive_only": SAMPLE_POSITIVE_ONLY,
    "negative_only": SAMPLE_NEGATIVE_ONLY,
}

INVALID_POLICIES = ("raise", "mask")


@dataclass
class GroupAdvantages:
    """What ``group_advantages`` returns.

    advantages: float32, the shape of ``rewards`` ((N,) or (groups, G)).
    mean, std: (groups,) float32 statistics of each group's valid rewards (std Bessel-corrected; 0 below 2 rewards).
    all_equal: (groups,) bool, the group's valid rewards are all equal (or fewer than 2).
    solve_rate, all_correct, all_wrong: (groups,) statistics of ``correct``; None when ``correct`` was not given.
    valid: (N,) bool, False where a non-finite reward was masked out (``invalid="mask"``); all True otherwise.
    backend: the backend that computed it.
    """

    advantages: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    all_equal: torch.Tensor
    solve_rate: torch.Tensor | None
    all_correct: torch.Tensor | None
    all_wrong: torch.Tensor | None
    valid: torch.Tensor
    backend: str

    @property
    def num_invalid(self) -> int:
        return int((~self.valid).sum())


# --------------------------------------------------------------------------------------------------------------------
# Input checks (shared by the reference and the fused paths, so both reject the same inputs)
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Checked:
    rewards: torch.Tensor  # (N,) float, contiguous
    correct: torch.Tensor | None  # (N,) float32 0/1, contiguous
    group_size: int
    n_groups: int
    estimator: Estimator
    scale: str
    sample_mode: str
    out_shape: torch.Size
    masking: bool  # invalid="mask": non-finite rewards may be present and are masked out


def _check_inputs(
    rewards,
    group_size,
    estimator: str,
    scale: str | None,
    eps: float,
    lam: float,
    sample_mode: str,
    correct,
    invalid: str,
) -> _Checked:
    if not isinstance(rewards, torch.Tensor):
        try:
            rewards = torch.as_tensor(rewards, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(
                f"{OP}: rewards must be a tensor or a sequence of numbers, got {type(rewards).__name__}"
            ) from exc
    if rewards.is_complex() or not (rewards.is_floating_point() or rewards.dtype in _INTEGRAL_DTYPES):
        raise TypeError(f"{OP}: rewards must be a real floating, integer or bool tensor, got dtype {rewards.dtype}")
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"{OP}: group_size must be an int, got {type(group_size).__name__} {group_size!r}")
    if group_size < 1:
        raise ValueError(f"{OP}: group_size must be >= 1, got {group_size}")
    if rewards.dim() == 2:
        if rewards.shape[1] != group_size:
            raise ValueError(
                f"{OP}: 2-D rewards must have shape (groups, group_size={group_size}), got {tuple(rewards.shape)}"
            )
    elif rewards.dim() != 1:
        raise ValueError(f"{OP}: rewards must be 1-D (N,) or 2-D (groups, G), got shape {tuple(rewards.shape)}")
    n = rewards.numel()
    if n % group_size:
        raise ValueError(
            f"{OP}: the number of rewards ({n}) must be divisible by group_size ({group_size}); "
            f"{n % group_size} rewards are left over"
        )
    if estimator not in ESTIMATORS:
        raise ValueError(f"{OP}: unknown estimator {estimator!r}; valid estimators: {sorted(ESTIMATORS)}")
    est = ESTIMATORS[estimator]
    scale = est.scales[0] if scale is None else scale
    if scale not in SCALES:
        raise ValueError(f"{OP}: unknown scale {scale!r}; valid scales: {sorted(SCALES)}")
    if scale not in est.scales:
        raise ValueError(
            f"{OP}: scale={scale!r} does not apply to estimator={estimator!r} (it accepts {list(est.scales)}); "
            f"scale selects grpo's denominator, and estimator='dr_grpo' is grpo with scale='none'"
        )
    if sample_mode not in SAMPLE_MODES:
        raise ValueError(f"{OP}: unknown sample_mode {sample_mode!r}; valid sample modes: {sorted(SAMPLE_MODES)}")
    if invalid not in INVALID_POLICIES:
        raise ValueError(f"{OP}: invalid must be one of {INVALID_POLICIES}, got {invalid!r}")
    for name, value in (("eps", eps), ("lam", lam)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{OP}: {name} must be a finite number, got {value!r}")
    if eps < 0:
        raise ValueError(f"{OP}: eps must be >= 0, got {eps}")

    # Advantages are constants of the policy gradient: no backend tracks gradients through them (the Triton and CUDA
    # kernels cannot, so neither do the torch path and the reference), whatever the rewards' requires_grad says.
    flat = rewards.detach().reshape(-1)
    if not flat.is_floating_point():
        flat = flat.to(torch.float32)
    flat = flat.contiguous()
    if invalid == "raise" and n:
        bad = ~torch.isfinite(flat)
        if bool(bad.any()):
            first = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"{OP}: rewards must be finite; rewards[{first}] (flat index) = {flat[first].item()} "
                f"({int(bad.sum())} non-finite in all). Pass invalid='mask' to mask such completions out instead"
            )

    if correct is None:
        if est.needs_correct:
            raise ValueError(
                f"{OP}: estimator={estimator!r} needs correct= (the verifier's 0/1 verdict per completion), got None"
            )
        c = None
    else:
        c = correct.detach() if isinstance(correct, torch.Tensor) else torch.as_tensor(correct, device=rewards.device)
        if c.device != rewards.device:
            raise ValueError(f"{OP}: correct is on {c.device} but rewards are on {rewards.device}")
        if c.numel() != n:
            raise ValueError(
                f"{OP}: correct must have one entry per reward ({n}), got shape {tuple(c.shape)} ({c.numel()} entries)"
            )
        c = c.reshape(-1).to(torch.float32).contiguous()
        if n and not bool(((c == 0) | (c == 1)).all()):
            first = int(((c != 0) & (c != 1)).nonzero()[0, 0])
            raise ValueError(f"{OP}: correct must hold 0/1 (or bool) verdicts; correct[{first}] = {c[first].item()}")
    return _Checked(flat, c, group_size, n // group_size, est, scale, sample_mode, rewards.shape, invalid == "mask")


_INTEGRAL_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def unnormalised(chk: _Checked) -> bool:
    """The estimator returns differences of rewards (dr_grpo, rloo, grpo with scale="none"): the only advantages that
    can exceed float32's range (|r_i - mean_g| up to twice the largest |reward|; rloo's n/(n-1) up to twice more).
    Normalised ones are bounded by sqrt(G) (grpo) or by 1 and lam (psr, nsr, w_reinforce)."""
    return chk.estimator.name in ("dr_grpo", "rloo") or (chk.estimator.name == "grpo" and chk.scale == "none")


def check_representable(advantages: torch.Tensor, chk: _Checked) -> None:
    """Raise ValueError when an unnormalised estimator's advantage is beyond float32's range (the advantages' dtype):
    such a difference of two finite rewards has no float32 value, and a clamped or inf advantage would silently train
    on a wrong number. One reduction and one host sync, only for those estimators."""
    if not unnormalised(chk) or advantages.numel() == 0:
        return
    as_f32 = advantages.reshape(-1).to(torch.float32)
    bad = ~torch.isfinite(as_f32)
    if not bool(bad.any()):
        return
    first = int(bad.nonzero()[0, 0])
    g = first // chk.group_size
    members = chk.rewards[g * chk.group_size : (g + 1) * chk.group_size].double()
    members = members[torch.isfinite(members)]
    f32_max = torch.finfo(torch.float32).max
    raise ValueError(
        f"{OP}: estimator={chk.estimator.name!r} (scale={chk.scale!r}) advantages are differences of rewards, and "
        f"advantages[{first}] (flat index; group {g}, rewards in [{float(members.min()):.4g}, "
        f"{float(members.max()):.4g}]) is beyond float32's range (|A| <= {f32_max:.4g}); {int(bad.sum())} such in "
        f"all. Rescale the rewards, or use estimator='grpo' with scale='group' or 'batch', whose advantages are "
        f"finite for every finite reward"
    )


# --------------------------------------------------------------------------------------------------------------------
# 1. The reference: the specification, a literal per-group loop in float64
# --------------------------------------------------------------------------------------------------------------------


def _as_float(x: Fraction) -> float:
    """``x`` rounded to the nearest float; +-inf beyond the float's range (as float arithmetic would give)."""
    try:
        return float(x)
    except OverflowError:
        # The Fraction's own sign: math.copysign(inf, x) would convert x to float first and overflow again.
        return math.inf if x > 0 else -math.inf


class _ExactStats(NamedTuple):
    """A set of rewards' statistics in exact rational arithmetic (no rounding, no overflow)."""

    mean: Fraction
    devs: list[Fraction]  # r_i - mean, exactly
    top: Fraction  # largest |deviation| (0 when all equal or empty)
    std_over_top: float  # the Bessel std / top (in [0, sqrt(n)]; 0 when top is 0 or below 2 values)

    @property
    def std(self) -> float:
        return _as_float(self.top) * self.std_over_top

    def scaled(self, d: Fraction, eps: float) -> float:
        """d / (std + eps), computed as (d / top) / (std / top + eps / top): every term is a ratio of size <= sqrt(n)
        (eps / top may underflow to 0, its limit), so finite rewards of any size give a finite quotient."""
        if self.top == 0:
            return 0.0  # every deviation is 0 (the centred rule zeroes it anyway)
        return _as_float(d / self.top) / (self.std_over_top + _as_float(Fraction(eps) / self.top))


def _exact_stats(vals: list[float]) -> _ExactStats:
    exact = [Fraction(v) for v in vals]
    mean = sum(exact, Fraction(0)) / len(exact) if exact else Fraction(0)
    devs = [x - mean for x in exact]
    top = max((abs(d) for d in devs), default=Fraction(0))
    ratio = 0.0
    if len(vals) >= 2 and top > 0:
        ratio = math.sqrt(_as_float(sum(((d / top) ** 2 for d in devs), Fraction(0)) / (len(vals) - 1)))
    return _ExactStats(mean, devs, top, ratio)


def group_advantages_reference(
    rewards,
    group_size: int,
    estimator: str = "grpo",
    scale: str | None = None,
    eps: float = 1e-6,
    lam: float = 0.1,
    sample_mode: str = "all",
    correct=None,
    invalid: str = "raise",
) -> GroupAdvantages:
    """docs/design.md §1 written out per group, in exact rational arithmetic (``fractions.Fraction``) rounded once to
    float64 at the end of each formula: no intermediate rounds or overflows, for any finite reward. Slow on purpose:
    read it, test against it. Raises like ``group_advantages`` where an advantage is beyond float32's range."""
    chk = _check_inputs(rewards, group_size, estimator, scale, eps, lam, sample_mode, correct, invalid)
    r = chk.rewards.double().cpu()
    c = None if chk.correct is None else chk.correct.double().cpu()
    valid = torch.isfinite(r)
    n_groups, G = chk.n_groups, chk.group_size

    batch = _exact_stats([float(v) for v in r[valid]])

    adv = torch.zeros(n_groups * G, dtype=torch.float64)
    mean = torch.zeros(n_groups, dtype=torch.float64)
    std = torch.zeros(n_groups, dtype=torch.float64)
    all_equal = torch.zeros(n_groups, dtype=torch.bool)
    solve = torch.zeros(n_groups, dtype=torch.float64)
    all_correct = torch.zeros(n_groups, dtype=torch.bool)
    all_wrong = torch.zeros(n_groups, dtype=torch.bool)
    for g in range(n_groups):
        members = [g * G + j for j in range(G) if valid[g * G + j]]
        vals = [float(r[i]) for i in members]
        n = len(vals)
        st = _exact_stats(vals)  # exact rationals: the mean of 3.4e38 and 3.3e38 does not overflow
        equal = n < 2 or max(vals) == min(vals)
        mean[g], std[g], all_equal[g] = float(st.mean), st.std, equal
        if c is not None:
            verdicts = [float(c[i]) for i in members]
            solve[g] = sum(verdicts) / n if n else 0.0
            all_correct[g] = n > 0 and all(v == 1 for v in verdicts)
            all_wrong[g] = n > 0 and all(v == 0 for v in verdicts)
        for k, i in enumerate(members):
            d = st.devs[k]  # r_i - mean_g, exact
            if chk.estimator.name == "grpo":
                if chk.scale == "group":
                    a = st.scaled(d, eps)
                elif chk.scale == "batch":
                    a = batch.scaled(d, eps)
                else:
                    a = _as_float(d)
            elif chk.estimator.name == "dr_grpo":
                a = _as_float(d)
            elif chk.estimator.name == "rloo":
                ri = Fraction(vals[k])
                a = _as_float(ri - (sum(map(Fraction, vals)) - ri) / (n - 1)) if n > 1 else 0.0
            elif chk.estimator.name == "psr":
                a = float(c[i])
            elif chk.estimator.name == "nsr":
                a = float(c[i]) - 1.0
            else:  # w_reinforce
                a = lam if float(c[i]) == 1.0 else -1.0
            if chk.estimator.centred and equal:
                a = 0.0
            if sample_mode == "positive_only":
                a = max(a, 0.0)
            elif sample_mode == "negative_only":
                a = min(a, 0.0)
            adv[i] = a
    check_representable(adv, chk)
    has_c = c is not None
    return GroupAdvantages(
        advantages=adv.reshape(chk.out_shape),
        mean=mean,
        std=std,
        all_equal=all_equal,
        solve_rate=solve if has_c else None,
        all_correct=all_correct if has_c else None,
        all_wrong=all_wrong if has_c else None,
        valid=valid,
        backend="reference",
    )


# --------------------------------------------------------------------------------------------------------------------
# 2. The torch path: vectorised over groups, O(N) memory
# --------------------------------------------------------------------------------------------------------------------


# The exponent field of each float dtype the statistics are computed in: masking a value's bits with it gives the
# largest power of two <= |value| (for a normal value), with no rounding anywhere.
_EXPONENT_BITS = {torch.float32: (torch.int32, 0x7F800000), torch.float64: (torch.int64, 0x7FF0000000000000)}


def unit_of(peak: torch.Tensor) -> torch.Tensor:
    """The power-of-two unit rewards are divided by: 2^floor(log2(peak)) for ``peak`` >= 1 (the largest |reward| of a
    group, or of the batch), else 1. Rewards / unit lie in (-2, 2), so sums of G of them, their mean, deviations
    and their scaled squares stay finite for every finite reward, and the division is exact (a power of two), so
    rewards below 2 in magnitude are computed exactly as without it. The Triton and CUDA kernels take the same bits."""
    int_dtype, mask = _EXPONENT_BITS[peak.dtype]
    return (peak.view(int_dtype) & mask).view(peak.dtype).clamp_min(1.0)


def _scaled_std(dev: torch.Tensor, count: torch.Tensor, top: torch.Tensor | None = None) -> torch.Tensor:
    """(rows, 1) Bessel std of each row of deviations ``dev`` (rows, G) (zeros where masked), computed scale-invariantly
    like the reference's ``_exact_stats``: divided by the row's largest |deviation| before squaring. ``top``: that
    largest |deviation| (rows, 1) when the caller has it (max - mean, mean - min: the same subtractions, so the same
    value as ``dev.abs().amax``, one pass fewer)."""
    if top is None:
        top = dev.abs().amax(dim=1, keepdim=True)
    safe = torch.where(top > 0, top, torch.ones_like(top))
    x = dev / safe
    return safe * ((x * x).sum(dim=1, keepdim=True) / (count - 1.0).clamp_min(1.0)).sqrt() * (top > 0)


class _Moments(NamedTuple):
    """Mean and Bessel std of rows of values, in units of ``unit`` (all (rows, 1))."""

    unit: torch.Tensor
    mean: torch.Tensor  # mean / unit, clamped to [min, max] / unit (rounding never leaves the range)
    dev: torch.Tensor  # (rows, G) (value - mean) / unit, 0 where masked
    std: torch.Tensor  # Bessel std / unit
    r_min: torch.Tensor  # smallest valid value (inf for an empty row), in value units
    r_max: torch.Tensor


def _moments(r: torch.Tensor, count: torch.Tensor, valid: torch.Tensor | None) -> _Moments:
    """Row statistics of ``r`` (rows, G) (0 where ``valid`` is False; ``valid`` None: all valid), overflow-free."""
    if valid is None:
        r_min, r_max = torch.aminmax(r, dim=1, keepdim=True)
    else:
        r_min = torch.where(valid, r, math.inf).amin(dim=1, keepdim=True)
        r_max = torch.where(valid, r, -math.inf).amax(dim=1, keepdim=True)
    unit = unit_of(r.abs().amax(dim=1, keepdim=True))
    u = r / unit
    lo, hi = r_min / unit, r_max / unit
    nonempty = count > 0
    mean = u.sum(dim=1, keepdim=True) / count.clamp_min(1.0)
    mean = torch.where(nonempty, torch.minimum(torch.maximum(mean, lo), hi), 0.0)
    dev = u - mean if valid is None else torch.where(valid, u - mean, 0.0)
    top = torch.where(nonempty, torch.maximum(hi - mean, mean - lo), 0.0)  # an empty row has lo = inf
    return _Moments(unit, mean, dev, _scaled_std(dev, count, top), r_min, r_max)


def _group_advantages_torch(chk: _Checked, eps: float, lam: float) -> GroupAdvantages:
    G = chk.group_size
    # float64 rewards are computed in float64 (a float64 reward beyond float32's range stays finite); the rest in fp32
    compute = torch.float64 if chk.rewards.dtype == torch.float64 else torch.float32
    r = chk.rewards.to(compute).view(chk.n_groups, G)
    if chk.masking:  # invalid="mask": statistics over each group's finite rewards only
        valid = torch.isfinite(r)
        r = torch.where(valid, r, 0.0)
        vf = valid.to(torch.float32)
        count = vf.sum(dim=1, keepdim=True)
    else:  # every reward is finite (checked): the plain, faster path
        valid = vf = None
        count = torch.full((chk.n_groups, 1), float(G), device=r.device)
    m = _moments(r, count, valid)
    all_equal = (m.r_max == m.r_min) | (count < 2)

    if chk.scale == "batch":
        finite = (r if vf is None else r[valid]).reshape(1, -1)
        if finite.numel():
            n_finite = torch.full((1, 1), float(finite.numel()), dtype=compute, device=r.device)
            b = _moments(finite, n_finite, None)
            # (batch std + eps) in each group's unit; both units are powers of two, so the ratio is exact
            denominator = (b.std + eps / b.unit) * (b.unit / m.unit)
        else:  # every reward masked out: every advantage is 0 whatever the denominator
            denominator = eps / m.unit
    elif chk.scale == "group":
        denominator = m.std + eps / m.unit
    else:  # "none": dev / (1 / unit) == dev * unit exactly
        denominator = 1.0 / m.unit
    r, dev, std, mean = r / m.unit, m.dev, m.std, m.mean

    c = None if chk.correct is None else chk.correct.view(chk.n_groups, G)
    adv = chk.estimator.formula(AdvantageStats(r, dev, std, denominator, m.unit, count, c, eps, lam))
    if chk.estimator.centred:
        adv = torch.where(all_equal, 0.0, adv)
    adv = SAMPLE_MODES[chk.sample_mode](adv)
    if valid is not None:
        adv = torch.where(valid, adv, 0.0)

    if c is None:
        solve = all_correct = all_wrong = None
    else:
        n_correct = (c if vf is None else c * vf).sum(dim=1)
        n = count.squeeze(1)
        solve = n_correct / n.clamp_min(1.0)
        all_correct = (n_correct == n) & (n > 0)
        all_wrong = (n_correct == 0) & (n > 0)
    f32 = torch.float32
    return GroupAdvantages(
        advantages=adv.to(f32).reshape(chk.out_shape),
        mean=(mean * m.unit).squeeze(1).to(f32),
        std=(std * m.unit).squeeze(1).to(f32),  # inf where the std itself exceeds the float's range
        all_equal=all_equal.squeeze(1),
        solve_rate=None if solve is None else solve.to(f32),
        all_correct=all_correct,
        all_wrong=all_wrong,
        valid=torch.ones(r.numel(), dtype=torch.bool, device=r.device) if valid is None else valid.reshape(-1),
        backend="torch",
    )


# --------------------------------------------------------------------------------------------------------------------
# 3. The Triton path: one launch (rlvr_fast.kernels.group_advantage)
# --------------------------------------------------------------------------------------------------------------------


def _group_advantages_triton(chk: _Checked, eps: float, lam: float) -> GroupAdvantages:
    from rlvr_fast.kernels.group_advantage import group_advantage_fwd  # imported late: TRITON_INTERPRET must be set

    out = group_advantage_fwd(
        chk.rewards,
        chk.correct,
        n_groups=chk.n_groups,
        group_size=chk.group_size,
        estimator=chk.estimator.code,
        scale=SCALES[chk.scale],
        sample_mode=SAMPLE_MODE_CODES[chk.sample_mode],
        eps=eps,
        lam=lam,
    )
    return _from_kernel_outputs(chk, out.advantages, out.mean, out.std, out.solve_rate, out.flags, "triton")


def _from_kernel_outputs(chk: _Checked, advantages, mean, std, solve_rate, flags, backend: str) -> GroupAdvantages:
    """The fused kernels' outputs (flags: (3, groups) int8 all_equal / all_correct / all_wrong) as GroupAdvantages."""
    has_c = chk.correct is not None
    flags = flags.bool()
    return GroupAdvantages(
        advantages=advantages.reshape(chk.out_shape),
        mean=mean,
        std=std,
        all_equal=flags[0],
        solve_rate=solve_rate if has_c else None,
        all_correct=flags[1] if has_c else None,
        all_wrong=flags[2] if has_c else None,
        valid=torch.isfinite(chk.rewards),
        backend=backend,
    )


# --------------------------------------------------------------------------------------------------------------------
# 3b. The CUDA C++ path: one launch (csrc/group_advantage.cu through torch.ops.rlvr_fast, the extension rlvr_fast._C)
# --------------------------------------------------------------------------------------------------------------------

CUDA_OP = "group_advantage_fwd"  # torch.ops.rlvr_fast.<CUDA_OP>; no group-size limit (large groups take a block)


def check_float32_range(rewards: torch.Tensor, backend: str) -> None:
    """Raise ValueError when float64 ``rewards`` hold finite values that float32 cannot: the CUDA kernel reads every
    dtype as float32, where |r| > 3.4e38 would become inf (and leave the statistics) and 0 < |r| < 1.2e-38 would
    become 0 or lose digits, giving silently wrong advantages."""
    if rewards.dtype != torch.float64:
        return
    a = rewards.abs()
    f32 = torch.finfo(torch.float32)
    outside = torch.isfinite(a) & ((a > f32.max) | ((a > 0) & (a < f32.tiny)))
    if bool(outside.any()):
        bad = rewards[outside]
        raise ValueError(
            f"{OP}: backend={backend!r} computes in float32, and {int(outside.sum())} float64 rewards are outside its "
            f"range (e.g. {float(bad[0]):.3g}); use backend='torch' or 'triton' (float64 in float64) or rescale"
        )


def _group_advantages_cuda(chk: _Checked, eps: float, lam: float) -> GroupAdvantages:
    check_float32_range(chk.rewards, "cuda")
    n, n_groups, device = chk.rewards.numel(), chk.n_groups, chk.rewards.device
    advantages = torch.empty(n, dtype=torch.float32, device=device)
    mean, std, solve_rate = (torch.empty(n_groups, dtype=torch.float32, device=device) for _ in range(3))
    flags = torch.empty(3, n_groups, dtype=torch.int8, device=device)
    getattr(torch.ops.rlvr_fast, CUDA_OP)(
        chk.rewards,  # float32 / float64 / float16 / bfloat16, read as is and computed in float32
        chk.correct,
        chk.group_size,
        chk.estimator.code,
        SCALES[chk.scale],
        SAMPLE_MODE_CODES[chk.sample_mode],
        eps,
        lam,
        advantages,
        mean,
        std,
        solve_rate,
        flags,
    )
    return _from_kernel_outputs(chk, advantages, mean, std, solve_rate, flags, "cuda")


_PATHS = {"torch": _group_advantages_torch, "triton": _group_advantages_triton, "cuda": _group_advantages_cuda}


# --------------------------------------------------------------------------------------------------------------------
# 4. The public op
# --------------------------------------------------------------------------------------------------------------------


def group_advantages(
    rewards: torch.Tensor | Sequence[float],
    group_size: int,
    estimator: str = "grpo",
    scale: str | None = None,
    eps: float = 1e-6,
    lam: float = 0.1,
    sample_mode: str = "all",
    correct: torch.Tensor | Sequence[bool] | None = None,
    backend: str = "auto",
    invalid: str = "raise",
) -> GroupAdvantages:
    """Group-relative advantages of B prompts x G completions, with group statistics, in one kernel launch.

    Args:
        rewards: (N,) with N = groups * group_size, completions of a prompt contiguous, or (groups, G). Any real
            dtype; computed in float32.
        group_size: G >= 1.
        estimator: one of ``ESTIMATORS``: grpo, dr_grpo, rloo, psr, nsr, w_reinforce (formulas in the module doc).
        scale: grpo's denominator: "group" (default; Bessel std of the group), "batch" (Bessel std of the whole
            batch, TRL's scale_rewards="batch") or "none" (= dr_grpo). Other estimators have a fixed normalisation and
            accept only None / "none".
        eps: added to the std (verl uses 1e-6, TRL 1e-4).
        lam: w_reinforce's weight on correct samples (Zhu et al. use 0.1).
        sample_mode: "all", "positive_only" (A' = max(A, 0)) or "negative_only" (A' = min(A, 0)).
        correct: (N,) or the rewards' shape, 0/1 or bool verifier verdicts. Needed by psr / nsr / w_reinforce;
            optional otherwise (gives solve_rate, all_correct, all_wrong).
        backend: "auto" | "triton" | "cuda" | "torch" (see rlvr_fast.backends); an unavailable one raises.
        invalid: "raise" (default): a NaN/inf reward raises, naming its index. "mask": such completions get
            advantage 0, are left out of their group's statistics and are flagged False in ``valid``.

    Returns:
        GroupAdvantages (advantages float32 in the rewards' shape, per-group mean / std / all_equal, solve_rate /
        all_correct / all_wrong when ``correct`` is given, the valid mask and the backend used).
    """
    chk = _check_inputs(rewards, group_size, estimator, scale, eps, lam, sample_mode, correct, invalid)
    chosen = select_backend(
        backend,
        chk.rewards.device,
        op=OP,
        cuda_op=CUDA_OP,
        triton_ok=chk.group_size <= TRITON_MAX_GROUP_SIZE,
        triton_limit=f"group_size {chk.group_size} exceeds the kernel's {TRITON_MAX_GROUP_SIZE}",
    )
    if chk.n_groups == 0:  # nothing to launch; the torch path returns correctly shaped empty tensors
        return _group_advantages_torch(chk, eps, lam)
    out = _PATHS[chosen](chk, float(eps), float(lam))
    check_representable(out.advantages, chk)
    return out
