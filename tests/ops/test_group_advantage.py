"""group_advantages: the Triton kernel (interpreted on CPU), the torch path and the CUDA C++ kernel (where the extension
rlvr_fast._C is built and a GPU is present; skipped with the reason elsewhere) against the float64 reference."""

import math
from types import SimpleNamespace

import pytest
import torch

import rlvr_fast
from rlvr_fast import BackendUnavailableError, group_advantages, group_advantages_reference
from rlvr_fast.backends import triton_interpreter_enabled
from rlvr_fast.ops.group_advantage import ESTIMATORS, SAMPLE_MODE_CODES, SCALES, TRITON_MAX_GROUP_SIZE
from rlvr_fast.testing import assert_all_written, assert_close, backend_params, cuda_backend_skip_reason, poisoned

ESTIMATOR_SCALES = [(name, scale) for name, est in ESTIMATORS.items() for scale in est.scales]
FUSED_BACKENDS = backend_params("triton", "torch", "cuda")
needs_cuda_backend = pytest.mark.skipif(cuda_backend_skip_reason() is not None, reason=cuda_backend_skip_reason() or "")


def draw_rewards(n_groups: int, group_size: int, gen: torch.Generator) -> torch.Tensor:
    """Rewards as RLVR produces them: per group, binary 0/1 (so ties and all-equal groups), continuous, or constant."""
    kind = torch.randint(0, 3, (n_groups, 1), generator=gen)
    binary = torch.randint(0, 2, (n_groups, group_size), generator=gen).float()
    continuous = torch.randn(n_groups, group_size, generator=gen) * 3.0 + 0.5
    constant = torch.randn(n_groups, 1, generator=gen).expand(n_groups, group_size)
    r = torch.where(kind == 0, binary, torch.where(kind == 1, continuous, constant))
    return r.reshape(-1).contiguous()


def assert_advantages_conditioned(out, ref, rewards, group_size, estimator, scale, eps, name):
    """|A - A_ref| within what float32 can promise for this input: r - mean cancels to ~u * max|r| in each group, and
    grpo divides that (and the std's own error, times |A|) by std + eps. A test with a flat rtol fails on near-constant
    groups whose tiny std amplifies ordinary rounding (not a kernel bug)."""
    r = rewards.detach().double().cpu().reshape(-1, group_size)
    r = torch.where(torch.isfinite(r), r, 0.0)
    big = r.abs().amax(dim=1, keepdim=True)
    denom = torch.ones_like(big)
    if estimator == "grpo" and (scale or "group") == "group":
        denom = ref.std.reshape(-1, 1).double() + eps
    elif estimator == "grpo" and scale == "batch":
        valid = rewards.detach().double().cpu().reshape(-1)
        valid = valid[torch.isfinite(valid)]
        denom = torch.full_like(big, (valid.std().item() if valid.numel() > 1 else 0.0) + eps)
    expected = ref.advantages.double().reshape(-1, group_size)
    actual = out.advantages.detach().double().cpu().reshape(-1, group_size)
    unit = 2.0**-24
    tol = 1e-6 + 64 * unit * group_size * big * (1 + expected.abs()) / denom
    err = (actual - expected).abs()
    assert bool((err <= tol).all()), (
        f"{name} advantages: worst error {float((err - tol).max()):.3e} over tolerance at "
        f"{int((err - tol).argmax())}; actual {actual.reshape(-1)[int((err - tol).argmax())].item()!r}, "
        f"expected {expected.reshape(-1)[int((err - tol).argmax())].item()!r}"
    )


def assert_matches_reference(out, ref, name="", *, rewards, group_size, estimator="grpo", scale=None, eps=1e-6):
    assert_advantages_conditioned(out, ref, rewards, group_size, estimator, scale, eps, name)
    assert_close(out.mean, ref.mean, rtol=1e-6, atol=1e-6, name=f"{name} mean")
    assert_close(out.std, ref.std, rtol=1e-5, atol=1e-6, name=f"{name} std")
    assert torch.equal(out.all_equal.cpu(), ref.all_equal), f"{name} all_equal"
    assert torch.equal(out.valid.cpu(), ref.valid), f"{name} valid"
    if ref.solve_rate is None:
        assert out.solve_rate is None and out.all_correct is None and out.all_wrong is None
    else:
        assert_close(out.solve_rate, ref.solve_rate, rtol=1e-6, name=f"{name} solve_rate")
        assert torch.equal(out.all_correct.cpu(), ref.all_correct), f"{name} all_correct"
        assert torch.equal(out.all_wrong.cpu(), ref.all_wrong), f"{name} all_wrong"
    # Groups with nothing to compare get exactly 0 from the centred estimators, never NaN.
    assert torch.isfinite(out.advantages).all()


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("n_groups", [1, 3, 257])
@pytest.mark.parametrize("group_size", [1, 2, 8, 16])
@pytest.mark.parametrize("sample_mode", sorted(SAMPLE_MODE_CODES))
@pytest.mark.parametrize("estimator,scale", ESTIMATOR_SCALES)
def test_matches_reference(estimator, scale, sample_mode, group_size, n_groups, backend, device, generator):
    rewards = draw_rewards(n_groups, group_size, generator).to(device)
    correct = torch.rand(rewards.shape, generator=generator).to(device) < 0.4
    kwargs = dict(estimator=estimator, scale=scale, sample_mode=sample_mode, correct=correct, eps=1e-6, lam=0.3)
    ref = group_advantages_reference(rewards, group_size, **kwargs)
    out = group_advantages(rewards, group_size, backend=backend, **kwargs)
    assert out.backend == backend
    assert out.advantages.dtype == torch.float32 and out.advantages.device == rewards.device
    assert_matches_reference(
        out, ref, name=backend, rewards=rewards, group_size=group_size, estimator=estimator, scale=scale
    )
    if ESTIMATORS[estimator].centred:
        zero_groups = ref.all_equal.repeat_interleave(group_size)
        assert (out.advantages.cpu()[zero_groups] == 0).all()


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_without_correct_and_2d_rewards(backend, generator, device):
    rewards = draw_rewards(5, 6, generator).reshape(5, 6).to(device)
    out = group_advantages(rewards, 6, backend=backend)
    ref = group_advantages_reference(rewards, 6)
    assert out.advantages.shape == (5, 6)
    assert_matches_reference(out, ref, backend, rewards=rewards, group_size=6)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_hand_computed_grpo_uses_bessel_std_and_eps(backend, device):
    # Group [1, 0, 0, 0]: mean 0.25; Bessel std = sqrt((0.75^2 + 3 * 0.25^2) / 3) = 0.5 (the population std is 0.433).
    # With eps = 0.5 the lone success gets 0.75 / (0.5 + 0.5) = 0.75 exactly.
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0], device=device)
    out = group_advantages(rewards, 4, eps=0.5, backend=backend)
    torch.testing.assert_close(out.advantages.cpu(), torch.tensor([0.75, -0.25, -0.25, -0.25]), rtol=0, atol=1e-7)
    torch.testing.assert_close(out.std.cpu(), torch.tensor([0.5]), rtol=0, atol=1e-7)
    # Default eps is tiny: the lone-success advantage is (G-1)/sqrt(G) (docs/design.md §1).
    for G, expected in [(8, 2.4748737), (16, 3.75), (32, 5.4800546)]:
        r = torch.zeros(G, device=device)
        r[3] = 1.0
        a = group_advantages(r, G, backend=backend).advantages
        assert a[3].item() == pytest.approx(expected, rel=1e-5)
        a = group_advantages(r, G, estimator="dr_grpo", backend=backend).advantages
        assert a[3].item() == pytest.approx(1 - 1 / G, rel=1e-6)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_hand_computed_batch_scale_and_rloo(backend, device):
    rewards = torch.tensor([1.0, 0.0, 2.0, 2.0, 3.0, 5.0], device=device)
    mean = 13 / 6
    batch_std = math.sqrt(sum((v - mean) ** 2 for v in [1.0, 0.0, 2.0, 2.0, 3.0, 5.0]) / 5)  # Bessel, whole batch
    out = group_advantages(rewards, 2, scale="batch", eps=0.0, backend=backend)
    expected = torch.tensor([0.5, -0.5, 0.0, 0.0, -1.0, 1.0]) / batch_std
    torch.testing.assert_close(out.advantages.cpu(), expected, rtol=1e-6, atol=1e-7)
    # RLOO: r_i minus the mean of the others.
    r = torch.tensor([1.0, 0.0, 0.0, 4.0], device=device)
    out = group_advantages(r, 4, estimator="rloo", backend=backend)
    torch.testing.assert_close(out.advantages.cpu(), torch.tensor([1 - 4 / 3, -5 / 3, -5 / 3, 4 - 1 / 3]))


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_psr_nsr_w_reinforce_use_the_verdict(backend, device):
    rewards = torch.tensor([0.3, 0.3, 0.9, 0.1], device=device)  # ignored by these estimators
    correct = torch.tensor([True, False, True, False], device=device)
    psr = group_advantages(rewards, 2, estimator="psr", correct=correct, backend=backend).advantages
    nsr = group_advantages(rewards, 2, estimator="nsr", correct=correct, backend=backend).advantages
    wr = group_advantages(rewards, 2, estimator="w_reinforce", correct=correct, lam=0.1, backend=backend).advantages
    torch.testing.assert_close(psr.cpu(), torch.tensor([1.0, 0.0, 1.0, 0.0]))
    torch.testing.assert_close(nsr.cpu(), torch.tensor([0.0, -1.0, 0.0, -1.0]))
    torch.testing.assert_close(wr.cpu(), torch.tensor([0.1, -1.0, 0.1, -1.0]))


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("estimator,scale", ESTIMATOR_SCALES)
def test_invalid_mask_policy(backend, estimator, scale, generator, device):
    rewards = draw_rewards(7, 5, generator)
    rewards[[0, 6, 7, 8, 9, 33]] = torch.tensor([float("nan"), float("inf"), -float("inf"), float("nan"), 1.0, 2.0])
    rewards = rewards.to(device)
    correct = (torch.rand(35, generator=generator) < 0.5).to(device)
    kw = dict(estimator=estimator, scale=scale, correct=correct, invalid="mask")
    out = group_advantages(rewards, 5, backend=backend, **kw)
    ref = group_advantages_reference(rewards, 5, **kw)
    assert_matches_reference(out, ref, backend, rewards=rewards, group_size=5, estimator=estimator, scale=scale)
    assert out.num_invalid == 4
    assert (out.advantages[~out.valid] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.bool])
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_reward_dtypes(dtype, backend, generator, device):
    rewards = (torch.randn(24, generator=generator) * 4).to(dtype).to(device)
    out = group_advantages(rewards, 8, backend=backend)
    ref = group_advantages_reference(rewards, 8)
    assert out.advantages.dtype == torch.float32
    assert_matches_reference(out, ref, backend, rewards=rewards, group_size=8)


def test_kernel_writes_every_output(generator, device):
    from rlvr_fast.kernels.group_advantage import GroupAdvantageOutputs, group_advantage_fwd

    n_groups, G = 37, 7
    rewards = draw_rewards(n_groups, G, generator).to(device)
    correct = (torch.rand(n_groups * G, generator=generator) < 0.5).float().to(device)
    out = GroupAdvantageOutputs(
        poisoned(n_groups * G, device=device),
        poisoned(n_groups, device=device),
        poisoned(n_groups, device=device),
        poisoned(n_groups, device=device),
        torch.full((3, n_groups), 7, dtype=torch.int8, device=device),
    )
    group_advantage_fwd(
        rewards,
        correct,
        n_groups=n_groups,
        group_size=G,
        estimator=0,
        scale=0,
        sample_mode=0,
        eps=1e-6,
        lam=0.1,
        out=out,
    )
    for name in ("advantages", "mean", "std", "solve_rate"):
        assert_all_written(getattr(out, name), name)
    assert set(out.flags.unique().tolist()) <= {0, 1}


@needs_cuda_backend
@pytest.mark.parametrize("scale", ["group", "batch"])
@pytest.mark.parametrize("with_correct", [True, False])
def test_cuda_op_writes_every_output(scale, with_correct, generator, device):
    """The CUDA op fills every output, poisoned first: the statistics of every group (also without ``correct``: solve
    rate and the correctness flags are then 0), and every advantage (also on the batch scale's cooperative path)."""
    n_groups, G = 300, 7  # several blocks of 32 groups (teams of 8 lanes), a partial last one
    rewards = draw_rewards(n_groups, G, generator).to(device)
    correct = (torch.rand(n_groups * G, generator=generator) < 0.5).float().to(device) if with_correct else None
    outs = [poisoned(n_groups * G, device=device)] + [poisoned(n_groups, device=device) for _ in range(3)]
    flags = torch.full((3, n_groups), 7, dtype=torch.int8, device=device)
    torch.ops.rlvr_fast.group_advantage_fwd(
        rewards, correct, G, ESTIMATORS["grpo"].code, SCALES[scale], SAMPLE_MODE_CODES["all"], 1e-6, 0.1, *outs, flags
    )
    for name, t in zip(("advantages", "mean", "std", "solve_rate"), outs):
        assert_all_written(t, name)
    assert set(flags.unique().tolist()) <= {0, 1}
    if not with_correct:
        assert bool((outs[3] == 0).all()) and bool((flags[1:] == 0).all())
    ref = group_advantages_reference(rewards, G, scale=scale)
    assert_advantages_conditioned(SimpleNamespace(advantages=outs[0]), ref, rewards, G, "grpo", scale, 1e-6, "cuda op")


@pytest.mark.parametrize("backend", ["auto", *FUSED_BACKENDS])
def test_empty_batch(backend, device):
    empty = torch.empty(0, device=device)
    out = group_advantages(empty, 4, backend=backend, correct=empty.bool())
    assert out.advantages.shape == (0,) and out.mean.shape == (0,) and out.solve_rate.shape == (0,)


@needs_cuda_backend
@pytest.mark.parametrize("group_size,n_groups", [(33, 5), (1000, 3), (2049, 2), (TRITON_MAX_GROUP_SIZE + 1, 1)])
@pytest.mark.parametrize("scale", ["group", "batch"])
def test_cuda_large_groups(group_size, n_groups, scale, generator, device):
    """The CUDA kernel has no group-size limit: a warp per group up to 2048, a block per group beyond."""
    rewards = draw_rewards(n_groups, group_size, generator).to(device)
    rewards[1] = float("nan")
    kw = dict(scale=scale, invalid="mask")
    out = group_advantages(rewards, group_size, backend="cuda", **kw)
    ref = group_advantages_reference(rewards, group_size, **kw)
    assert_matches_reference(out, ref, "cuda", rewards=rewards, group_size=group_size, scale=scale)
    assert group_advantages(rewards, group_size, **kw).backend == "cuda"  # auto prefers the extension


def test_large_and_odd_group_sizes(generator, device):
    rewards = draw_rewards(3, 1000, generator).to(device)
    ref = group_advantages_reference(rewards, 1000)
    assert_matches_reference(
        group_advantages(rewards, 1000, backend="triton"), ref, "triton", rewards=rewards, group_size=1000
    )
    # Beyond the Triton kernel's tile the auto backend takes the CUDA kernel where it runs (no group-size limit), else
    # the torch path; asking for Triton explicitly raises.
    big = torch.rand(TRITON_MAX_GROUP_SIZE + 1, generator=generator).to(device)
    expected = "cuda" if cuda_backend_skip_reason() is None else "torch"
    assert group_advantages(big, big.numel()).backend == expected
    with pytest.raises(BackendUnavailableError, match="group_size 65537 exceeds"):
        group_advantages(big, big.numel(), backend="triton")


# --------------------------------------------------------------------------------------------------------------------
# Backend dispatch
# --------------------------------------------------------------------------------------------------------------------


def test_auto_backend_choice_on_cpu(monkeypatch):
    if not triton_interpreter_enabled():
        pytest.skip("the CPU choice is tested where the interpreter is on (CPU machines)")
    rewards = torch.rand(8)
    assert group_advantages(rewards, 4).backend == "triton"  # the interpreter is on in tests
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert group_advantages(rewards, 4).backend == "torch"
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET=1"):
        group_advantages(rewards, 4, backend="triton")


def test_unavailable_cuda_backend_raises():
    """CPU rewards: backend='cuda' raises, with the reason (the extension is absent, or the tensors are on the CPU)."""
    built = rlvr_fast.HAS_CUDA_EXT
    reason = "the CUDA kernel needs CUDA tensors" if built else r"the extension rlvr_fast\._C is not built"
    with pytest.raises(BackendUnavailableError, match=f"backend='cuda' is unavailable: {reason}"):
        group_advantages(torch.rand(8), 4, backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        group_advantages(torch.rand(8), 4, backend="cutlass")


# --------------------------------------------------------------------------------------------------------------------
# Bad input: every error names the argument, what was expected and what came
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (
            dict(rewards=torch.rand(2, 3, 4)),
            ValueError,
            r"rewards must be 1-D \(N,\) or 2-D \(groups, G\), got shape \(2, 3, 4\)",
        ),
        (dict(rewards=torch.rand(3, 5), group_size=4), ValueError, r"shape \(groups, group_size=4\), got \(3, 5\)"),
        (
            dict(rewards=torch.rand(10), group_size=4),
            ValueError,
            r"number of rewards \(10\) must be divisible by group_size \(4\)",
        ),
        (dict(group_size=0), ValueError, r"group_size must be >= 1, got 0"),
        (dict(group_size=2.0), TypeError, r"group_size must be an int, got float"),
        (
            dict(rewards=torch.rand(8, dtype=torch.complex64)),
            TypeError,
            r"real floating, integer or bool tensor, got dtype torch.complex64",
        ),
        (dict(rewards="abc"), TypeError, r"rewards must be a tensor or a sequence of numbers, got str"),
        (
            dict(estimator="ppo"),
            ValueError,
            r"unknown estimator 'ppo'; valid estimators: \['dr_grpo', 'grpo', 'nsr', 'psr', 'rloo', 'w_reinforce'\]",
        ),
        (dict(scale="token"), ValueError, r"unknown scale 'token'; valid scales"),
        (dict(estimator="rloo", scale="group"), ValueError, r"scale='group' does not apply to estimator='rloo'"),
        (
            dict(sample_mode="negative"),
            ValueError,
            r"unknown sample_mode 'negative'; valid sample modes: \['all', 'negative_only', 'positive_only'\]",
        ),
        (dict(estimator="nsr"), ValueError, r"estimator='nsr' needs correct="),
        (dict(estimator="psr"), ValueError, r"estimator='psr' needs correct="),
        (dict(estimator="w_reinforce"), ValueError, r"estimator='w_reinforce' needs correct="),
        (
            dict(correct=torch.ones(7, dtype=torch.bool)),
            ValueError,
            r"correct must have one entry per reward \(8\), got shape \(7,\)",
        ),
        (
            dict(correct=torch.tensor([0, 1, 2, 0, 1, 0, 1, 1.0])),
            ValueError,
            r"correct must hold 0/1 \(or bool\) verdicts; correct\[2\] = 2.0",
        ),
        (dict(eps=-1.0), ValueError, r"eps must be >= 0, got -1.0"),
        (dict(eps=float("nan")), ValueError, r"eps must be a finite number, got nan"),
        (dict(lam=float("inf")), ValueError, r"lam must be a finite number, got inf"),
        (dict(invalid="drop"), ValueError, r"invalid must be one of \('raise', 'mask'\), got 'drop'"),
    ],
)
@pytest.mark.parametrize("fn", [group_advantages, group_advantages_reference])
def test_bad_input(fn, kwargs, error, match, device):
    args = dict(rewards=torch.rand(8, device=device), group_size=4)
    args.update({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()})
    with pytest.raises(error, match=match):
        fn(**args)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_reward_names_first_index(bad, device):
    rewards = torch.rand(12, device=device)
    rewards[5] = bad
    rewards[9] = float("nan")
    with pytest.raises(ValueError, match=rf"rewards\[5\] \(flat index\) = {bad} \(2 non-finite in all\)"):
        group_advantages(rewards, 4)


def test_correct_on_another_device_is_rejected():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device to put correct elsewhere")
    with pytest.raises(ValueError, match="correct is on cuda"):
        group_advantages(torch.rand(8), 4, correct=torch.ones(8, device="cuda"))


def test_estimator_table_is_documented():
    doc = rlvr_fast.ops.group_advantage.__doc__
    for name, est in ESTIMATORS.items():
        assert name in doc and "arXiv" in est.paper
    assert not math.isnan(group_advantages(torch.ones(1), 1).advantages.item())


# --------------------------------------------------------------------------------------------------------------------
# Rewards near float32's maximum; requires_grad
# --------------------------------------------------------------------------------------------------------------------

F32_MAX = torch.finfo(torch.float32).max
NEAR_MAX_BACKENDS = ["reference", *FUSED_BACKENDS]


def _advantages(backend, rewards, group_size, device, **kw):
    if backend == "reference":
        return group_advantages_reference(rewards, group_size, **kw)
    return group_advantages(rewards.to(device), group_size, backend=backend, **kw)


@pytest.mark.parametrize("backend", NEAR_MAX_BACKENDS)
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy: the std output overflows to inf
def test_sums_and_stds_beyond_float32_max_give_finite_advantages(backend, device):
    """[3e38, -3e38] gave [0, -0] under grpo (the std 4.2e38 overflowed); [3.4e38, 3.3e38] gave NaN under grpo and
    -inf under dr_grpo (the sum 6.7e38 overflowed)."""
    got = _advantages(backend, torch.tensor([3e38, -3e38]), 2, device).advantages.cpu()
    assert_close(got.double(), torch.tensor([0.5**0.5, -(0.5**0.5)], dtype=torch.float64), rtol=1e-5, name="grpo")
    r = torch.tensor([3.4e38, 3.3e38])
    for scale in ("group", "batch"):
        out = _advantages(backend, r, 2, device, scale=scale)
        assert_close(out.advantages.cpu().double(), torch.tensor([0.5**0.5, -(0.5**0.5)]).double(), rtol=1e-5)
        assert_close(out.mean.cpu().double(), r.double().mean().reshape(1), rtol=1e-6, name="mean")
    dev = (r.double() - r.double().mean()).float()  # +-5e36, representable
    got = _advantages(backend, r, 2, device, estimator="dr_grpo").advantages.cpu()
    assert_close(got, dev, rtol=1e-6, name="dr_grpo")


@pytest.mark.parametrize("backend", NEAR_MAX_BACKENDS)
@pytest.mark.parametrize("estimator,scale", [("dr_grpo", None), ("rloo", None), ("grpo", "none")])
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy: the overflow being tested
def test_unrepresentable_differences_raise(estimator, scale, backend, device):
    """dr_grpo / rloo / grpo-none return r_i - mean (rloo: r_i - mean of the others), a difference of two finite
    rewards that can exceed float32's range (4.5e38 here): every backend refuses it by name instead of returning inf."""
    r = torch.tensor([1.0, 2.0, 3.0, 3.4e38, -3.4e38, -3.4e38])  # group 1's first member: 3.4e38 + 2.3e38
    with pytest.raises(ValueError, match=rf"estimator='{estimator}'.* advantages\[3\] \(flat index; group 1.*beyond"):
        _advantages(backend, r, 3, device, estimator=estimator, scale=scale)
    # a representable difference at the very edge is returned, finite and exact
    out = _advantages(backend, torch.tensor([F32_MAX, -F32_MAX]), 2, device, estimator="dr_grpo")
    assert out.advantages.cpu().tolist() == [F32_MAX, -F32_MAX]


def _near_max_rewards(n_groups, group_size, gen, magnitude):
    """Random rewards within [-magnitude, magnitude]: per group, spread across the range, clustered near +-magnitude
    (the case where the sum overflows), or with an all-equal group at the maximum."""
    kind = torch.randint(0, 3, (n_groups, 1), generator=gen)
    spread = (torch.rand(n_groups, group_size, generator=gen, dtype=torch.float64) * 2 - 1) * magnitude
    sign = torch.where(torch.rand(n_groups, 1, generator=gen) < 0.5, -1.0, 1.0).double()
    near = sign * magnitude * (1 - 0.05 * torch.rand(n_groups, group_size, generator=gen, dtype=torch.float64))
    equal = sign * magnitude * torch.ones(n_groups, group_size, dtype=torch.float64)
    r = torch.where(kind == 0, spread, torch.where(kind == 1, near, equal))
    return r.float().reshape(-1)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("group_size", [3, 5, 7])
@pytest.mark.parametrize("estimator,scale", ESTIMATOR_SCALES)
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_random_rewards_near_float32_max(estimator, scale, group_size, backend, device, generator):
    """Every estimator and scale, odd group sizes: the fused backends equal the exact reference on rewards up to
    float32's maximum, finite wherever the result is representable; where an unnormalised difference is not, every
    backend raises alike."""
    n_groups = 6
    correct = torch.randint(0, 2, (n_groups * group_size,), generator=generator).bool()
    for magnitude in (F32_MAX, 1e38, 0.26 * F32_MAX):  # the last: differences stay within range (|A| <= 4x max|r|)
        rewards = _near_max_rewards(n_groups, group_size, generator, magnitude)
        kw = dict(estimator=estimator, scale=scale, correct=correct)
        try:
            ref = group_advantages_reference(rewards, group_size, **kw)
        except ValueError as exc:
            assert magnitude > 0.25 * F32_MAX and "beyond float32's range" in str(exc)
            with pytest.raises(ValueError, match="beyond float32's range"):
                group_advantages(rewards.to(device), group_size, backend=backend, **kw)
            continue
        out = group_advantages(rewards.to(device), group_size, backend=backend, **kw)
        assert torch.isfinite(out.advantages).all(), f"{backend} magnitude {magnitude:.3g}"
        assert torch.isfinite(out.mean).all()
        if (ESTIMATORS[estimator].centred and estimator != "grpo") or scale == "none":
            # differences: relative to the largest |reward| of the group
            big = rewards.double().abs().reshape(-1, group_size).amax(dim=1, keepdim=True)
            err = (out.advantages.cpu().double().reshape(-1, group_size) - ref.advantages.reshape(-1, group_size)).abs()
            assert bool((err <= 1e-5 * big).all()), f"{backend} {estimator} magnitude {magnitude:.3g}"
        else:
            assert_close(out.advantages.cpu().double(), ref.advantages, rtol=1e-4, atol=1e-4, name=backend)
        assert_close(out.mean.cpu().double(), ref.mean, rtol=1e-5, name="mean")
        assert torch.equal(out.all_equal.cpu(), ref.all_equal)


@pytest.mark.parametrize("backend", NEAR_MAX_BACKENDS)
def test_advantages_never_require_grad(backend, device):
    """torch used to return advantages with requires_grad=True (from rewards that require it), Triton False.
    Advantages are constants of the policy gradient: no backend records a graph through them."""
    rewards = torch.tensor([0.0, 1.0, 1.0, 3.0], device=device if backend != "reference" else "cpu")
    rewards.requires_grad_(True)
    for estimator in ("grpo", "dr_grpo"):
        out = _advantages(backend, rewards, 2, device, estimator=estimator)
        assert not out.advantages.requires_grad and not out.mean.requires_grad and not out.std.requires_grad
        assert out.advantages.grad_fn is None


F64_MAX = torch.finfo(torch.float64).max


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("estimator,scale", ESTIMATOR_SCALES)
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy: the float32 mean / std overflow
def test_float64_rewards_near_float64_max(estimator, scale, backend, device, generator):
    """The exact reference used to raise OverflowError on finite float64 rewards whose deviation from the
    mean (1.8e308 for [1.7e308, -1e308, -1e308]) is beyond float64's range (its std overflowed while taking the sign
    of the exact Fraction). Every estimator: the reference and the fused backends agree, finite where the advantage
    is representable (normalised estimators), or all refuse alike (differences beyond float32)."""
    cases = [[1.7e308, -1e308, -1e308], [F64_MAX, -F64_MAX, 0.0], [-F64_MAX, F64_MAX, F64_MAX]]
    spread = (torch.rand(4, 3, generator=generator, dtype=torch.float64) * 2 - 1) * F64_MAX
    rewards = torch.cat([torch.tensor(cases, dtype=torch.float64), spread]).reshape(-1)
    correct = torch.tensor([1, 0, 0]).repeat(rewards.numel() // 3)
    kw = dict(estimator=estimator, scale=scale, correct=correct)
    if backend == "cuda":  # it reads float64 as float32: such rewards are refused, never silently inf
        with pytest.raises(
            ValueError, match=r"backend='cuda' computes in float32, and \d+ float64 rewards are outside"
        ):
            group_advantages(rewards.to(device), 3, backend=backend, **kw)
        return
    try:
        ref = group_advantages_reference(rewards, 3, **kw)
    except ValueError as exc:
        assert ESTIMATORS[estimator].name in ("dr_grpo", "rloo", "grpo") and "beyond float32's range" in str(exc)
        with pytest.raises(ValueError, match="beyond float32's range"):
            group_advantages(rewards.to(device), 3, backend=backend, **kw)
        return
    out = group_advantages(rewards.to(device), 3, backend=backend, **kw)
    assert torch.isfinite(ref.advantages).all() and torch.isfinite(out.advantages).all(), backend
    assert_close(out.advantages.cpu().double(), ref.advantages, rtol=1e-4, atol=1e-4, name=backend)
    assert torch.equal(out.all_equal.cpu(), ref.all_equal)
    # the reported case, by hand: (r - mean) / std with std = 1.8e308 * sqrt(3) / 3 (grpo); the verdicts (psr ...)
    by_hand = {"group": [2 / 3**0.5, -1 / 3**0.5, -1 / 3**0.5], "psr": [1, 0, 0], "w_reinforce": [0.1, -1, -1]}
    expected = by_hand.get(scale if estimator == "grpo" else estimator)
    if expected is not None:
        assert_close(ref.advantages[:3], torch.tensor(expected, dtype=torch.float64), rtol=1e-6, name="reference")
