"""grpo_loss: the Triton kernel (interpreted on CPU) and the torch path against the float64 reference, gradients
included; the normalisers and metrics against TRL's GRPOTrainer._compute_loss and Liger-Kernel's
LigerFusedLinearGRPOLoss; bad input, NaN policy, long sequences."""

import itertools
import math
import types
from collections import defaultdict

import pytest
import torch

from rlvr_fast.backends import triton_interpreter_enabled
from rlvr_fast.ops.constants import IGNORE_INDEX, N_STATS
from rlvr_fast.ops.fused_linear_grpo_loss import fused_linear_grpo_loss_reference
from rlvr_fast.ops.grpo_loss import grpo_loss, grpo_loss_reference
from rlvr_fast.ops.loss_types import IS_LEVELS, KL_ESTIMATORS, LOSS_TYPES
from rlvr_fast.ops.objective import FIELDS, PolicyObjective, flat_arguments
from rlvr_fast.testing import assert_all_written, assert_close, assert_nan_parity, poisoned

BACKENDS = ["triton", "torch"]
CLIPS = {  # name -> (eps_low, eps_high, dual_clip)
    "symmetric": (0.2, None, None),
    "clip_higher": (0.2, 0.28, None),
    "dual_clip": (0.2, 0.28, 3.0),
}
METRIC_NAMES = (
    "clip_low_frac",
    "clip_high_frac",
    "dual_clip_frac",
    "mean_ratio",
    "mean_kl",
    "mean_entropy",
    "tokens",
    "tokens_skipped",
)


def draw_batch(B, T, gen, device, *, dtype=torch.float32, mask_dtype=torch.bool, poison_padding=True):
    """A micro-batch as RLVR produces it: right-padded completions of random lengths with a few interior holes (tool
    tokens), one fully masked row, one zero-advantage row, ratios spread across both clip bounds (a per-completion
    drift so GSPO's sequence ratios clip too), and NaN / -inf garbage on the padding of every per-token input."""
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    lengths[:5] = lengths[:5].clamp(min=min(T, 8))  # the rows given clip roles below hold a few tokens
    mask = (torch.arange(T)[None, :] < lengths[:, None]) & (torch.rand(B, T, generator=gen) > 0.1)
    mask[:, 0] = True  # every completion has a first token ...
    if B >= 3:
        mask[1] = False  # ... except one fully masked row
    logp = -torch.rand(B, T, generator=gen, dtype=torch.float64) * 4.0 - 0.01
    drift = 0.5 * torch.randn(B, 1, generator=gen, dtype=torch.float64)
    adv = torch.randn(B, generator=gen, dtype=torch.float64)
    if B >= 4:  # rows whose ratios (token and sequence level alike) hit the high clip, the dual clip, the low clip
        for row, sign, log_ratio in ((0, 1.0, 0.9), (2, -1.0, 1.8), (3, -1.0, -0.9)):
            adv[row] = sign * (0.5 + adv[row].abs())
            drift[row] = log_ratio
    if B >= 5:
        drift[4] = 0.0  # and a row that mostly stays inside the clip range
    if B >= 2:
        adv[-1] = 0.0  # e.g. an all-equal group under grpo, NSR's correct samples
    # a log-probability is <= 0 (the losses reject old_logp > OLD_LOGP_MAX at counted tokens): the clamp touches only
    # tokens of the rows whose drift raises old above a near-certain logp
    old = (logp - drift - 0.3 * torch.randn(B, T, generator=gen, dtype=torch.float64)).clamp(max=0.0)
    ref = (logp + 0.3 * torch.randn(B, T, generator=gen, dtype=torch.float64)).clamp(max=0.0)  # likewise (beta > 0)
    entropy = torch.rand(B, T, generator=gen, dtype=torch.float64) * 3.0
    if poison_padding:
        garbage = torch.where(torch.rand(B, T, generator=gen) < 0.5, float("nan"), float("-inf")).double()
        logp, old, ref, entropy = (torch.where(mask, x, garbage) for x in (logp, old, ref, entropy))
    out = dict(logp=logp, old=old, ref=ref, entropy=entropy, adv=adv)
    out = {k: v.to(dtype).to(device) for k, v in out.items()}
    out["mask"] = mask.to(mask_dtype).to(device)
    return out


def run(fn, batch, *, with_old=True, with_ref=True, with_entropy=True, **kwargs):
    """Call ``fn`` (grpo_loss or the reference) and return (loss, d loss / d logp, metrics)."""
    x = batch["logp"].clone().requires_grad_(True)
    if fn is grpo_loss_reference:  # the reference takes the objective only: the flat settings become one
        objective = PolicyObjective(**flat_arguments(kwargs))
        kwargs = {k: v for k, v in kwargs.items() if k not in FIELDS} | {"objective": objective}
    loss, metrics = fn(
        x,
        batch["old"] if with_old else None,
        batch["ref"] if with_ref else None,
        batch["adv"],
        batch["mask"],
        entropy=batch["entropy"] if with_entropy else None,
        **kwargs,
    )
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach(), grad, metrics


def assert_matches(out, ref, name, *, rtol=1e-5):
    loss, grad, metrics = out
    ref_loss, ref_grad, ref_metrics = ref
    assert_close(loss, ref_loss, rtol=rtol, atol=1e-6, name=f"{name} loss")  # atol: losses near 0 cancel
    assert_close(grad, ref_grad, rtol=rtol, atol=1e-8, name=f"{name} grad")
    for m in METRIC_NAMES:
        a, e = getattr(metrics, m), getattr(ref_metrics, m)
        assert (a is None) == (e is None), f"{name} {m}: {a} vs {e}"
        if e is not None:
            assert_close(a, e, rtol=rtol, atol=1e-6, name=f"{name} {m}")


def loss_kwargs(loss_type, T):
    return {"max_completion_length": T + 5} if loss_type == "dr_grpo" else {}


# --------------------------------------------------------------------------------------------------------------------
# Against the reference: every loss type x IS level x KL kind x clip setting, gradients included
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("clip", sorted(CLIPS))
@pytest.mark.parametrize("kl", sorted(KL_ESTIMATORS))
@pytest.mark.parametrize("importance_sampling", sorted(IS_LEVELS))
@pytest.mark.parametrize("loss_type", sorted(LOSS_TYPES))
def test_matches_reference(loss_type, importance_sampling, kl, clip, backend, device, generator):
    B, T = 6, 63
    batch = draw_batch(B, T, generator, device)
    eps_low, eps_high, dual = CLIPS[clip]
    kwargs = dict(
        beta=0.04,
        kl=kl,
        eps_low=eps_low,
        eps_high=eps_high,
        dual_clip=dual,
        loss_type=loss_type,
        importance_sampling=importance_sampling,
        **loss_kwargs(loss_type, T),
    )
    expected = run(grpo_loss_reference, batch, **kwargs)
    out = run(grpo_loss, batch, backend=backend, **kwargs)
    assert out[2].backend == backend
    assert out[0].dtype == torch.float32 and out[1].dtype == torch.float32
    assert_matches(out, expected, f"{backend} {loss_type}/{importance_sampling}/{kl}/{clip}")
    inactive = ~batch["mask"].bool()
    assert (out[1][inactive] == 0).all(), "padding must receive exactly zero gradient"
    assert torch.isfinite(out[1]).all() and torch.isfinite(out[0])


def test_draws_exercise_every_branch(device, generator):
    """The matrix above is only as good as its data: its draws hit the low, high and dual clips at both levels, and
    leave unclipped tokens of both advantage signs."""
    batch = draw_batch(6, 63, generator, device)
    eps_low, eps_high, dual = CLIPS["dual_clip"]
    for level in IS_LEVELS:
        _, _, m = run(
            grpo_loss_reference, batch, eps_low=eps_low, eps_high=eps_high, dual_clip=dual, importance_sampling=level
        )
        assert m.clip_low_frac > 0 and m.clip_high_frac > 0 and m.dual_clip_frac > 0, (level, m)
        assert m.tokens_skipped > 0
        clipped_or_skipped = m.clip_low_frac + m.clip_high_frac + m.dual_clip_frac + m.tokens_skipped / m.tokens
        assert clipped_or_skipped < 0.99  # and tokens whose gradient flows


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("importance_sampling", sorted(IS_LEVELS))
@pytest.mark.parametrize("loss_type", sorted(LOSS_TYPES))
def test_beta_zero_and_on_policy(loss_type, importance_sampling, backend, device, generator):
    """beta = 0 never needs ref_logp; old_logp = None is on-policy (ratio 1, gradient -A m c / D)."""
    B, T = 5, 40
    batch = draw_batch(B, T, generator, device)
    kw = dict(loss_type=loss_type, importance_sampling=importance_sampling, **loss_kwargs(loss_type, T))
    for with_old in (True, False):
        expected = run(grpo_loss_reference, batch, with_old=with_old, with_ref=False, **kw)
        out = run(grpo_loss, batch, with_old=with_old, with_ref=False, backend=backend, **kw)
        assert_matches(out, expected, f"{backend} old={with_old}")
        assert out[2].mean_kl is None
        # beta = 0: the zero-advantage row has no gradient and is counted as skipped
        mask = batch["mask"].bool()
        assert float(out[2].tokens_skipped) == float(mask[batch["adv"] == 0].sum())
        assert (out[1][batch["adv"] == 0] == 0).all()
    # on-policy closed form: d loss / d logp_bt = -A_b m_bt c_b / D
    _, grad, metrics = out
    torch.testing.assert_close(metrics.mean_ratio.cpu(), torch.tensor(1.0), rtol=0, atol=1e-6)
    m = batch["mask"].float()
    n_row = m.sum(1, keepdim=True).clamp(min=1)
    per_seq = LOSS_TYPES[loss_type].per_sequence
    denom = {"grpo": B, "bnpo": m.sum(), "dapo": m.sum(), "dr_grpo": B * (T + 5)}[loss_type]
    expected_grad = -batch["adv"][:, None] * m / (n_row if per_seq else 1.0) / denom
    assert_close(grad, expected_grad, rtol=1e-6, atol=1e-9, name="on-policy gradient")


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's numpy exp
@pytest.mark.parametrize("backend", BACKENDS)
def test_ref_with_beta_zero_is_a_metric_only(backend, device, generator):
    """With beta = 0 a given ref_logp feeds mean_kl only: even an infinite KL must not reach the loss (0 * inf)."""
    batch = draw_batch(4, 30, generator, device)
    without = run(grpo_loss, batch, with_ref=False, backend=backend)
    batch["ref"] = torch.where(batch["mask"], batch["logp"] + 200.0, batch["ref"])  # exp(200) overflows fp32
    with_ref = run(grpo_loss, batch, backend=backend)
    assert torch.equal(without[0], with_ref[0]) and torch.equal(without[1], with_ref[1])
    assert with_ref[2].mean_kl is not None and math.isinf(float(with_ref[2].mean_kl))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("importance_sampling", sorted(IS_LEVELS))
@pytest.mark.parametrize("loss_type", sorted(LOSS_TYPES))
def test_gradcheck_fp64(loss_type, importance_sampling, backend, device, generator):
    """The closed-form gradient against finite differences of our own forward, in float64 on tiny shapes."""
    B, T = 3, 5
    batch = draw_batch(B, T, generator, device, dtype=torch.float64, poison_padding=False)
    kw = dict(
        beta=0.3,
        kl="k3",
        eps_low=0.2,
        eps_high=0.28,
        dual_clip=2.0,
        loss_type=loss_type,
        importance_sampling=importance_sampling,
        backend=backend,
        **loss_kwargs(loss_type, T),
    )

    def f(x):
        return grpo_loss(x, batch["old"], batch["ref"], batch["adv"], batch["mask"], **kw)[0]

    x = batch["logp"].clone().requires_grad_(True)
    assert f(x).dtype == torch.float64
    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-7, rtol=1e-5)


# --------------------------------------------------------------------------------------------------------------------
# The ratio-weighted KL (TRL's use_bias_correction_kl): r * KL with r differentiable, token and sequence level
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kl", sorted(KL_ESTIMATORS))
@pytest.mark.parametrize("importance_sampling", sorted(IS_LEVELS))
@pytest.mark.parametrize("loss_type", sorted(LOSS_TYPES))
def test_kl_ratio_weighted_matches_reference(loss_type, importance_sampling, kl, backend, device, generator):
    B, T = 6, 37
    batch = draw_batch(B, T, generator, device)
    kwargs = dict(
        beta=0.3,  # large enough that the KL term's gradient is a visible part of the total
        kl=kl,
        eps_high=0.28,
        dual_clip=3.0,
        loss_type=loss_type,
        importance_sampling=importance_sampling,
        kl_ratio_weighted=True,
        **loss_kwargs(loss_type, T),
    )
    expected = run(grpo_loss_reference, batch, **kwargs)
    out = run(grpo_loss, batch, backend=backend, **kwargs)
    assert_matches(out, expected, f"{backend} {loss_type}/{importance_sampling}/{kl} weighted")
    assert (out[1][~batch["mask"].bool()] == 0).all(), "padding must receive exactly zero gradient"
    # the weighting changes the objective: the plain KL's gradient is not the weighted one
    plain = run(grpo_loss_reference, batch, **{**kwargs, "kl_ratio_weighted": False})
    assert (plain[1] - expected[1]).abs().max() > 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("importance_sampling", sorted(IS_LEVELS))
@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_kl_ratio_weighted_gradcheck_fp64(loss_type, importance_sampling, backend, device, generator):
    """The closed-form gradient of r * KL (including KL * dr/dlogp, across the completion at sequence level) against
    finite differences of our own forward."""
    B, T = 3, 5
    batch = draw_batch(B, T, generator, device, dtype=torch.float64, poison_padding=False)
    kw = dict(
        beta=0.3,
        kl="k3",
        eps_high=0.28,
        loss_type=loss_type,
        importance_sampling=importance_sampling,
        kl_ratio_weighted=True,
        backend=backend,
    )

    def f(x):
        return grpo_loss(x, batch["old"], batch["ref"], batch["adv"], batch["mask"], **kw)[0]

    x = batch["logp"].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("importance_sampling", sorted(IS_LEVELS))
def test_kl_ratio_weighted_on_policy_by_hand(importance_sampling, backend, device):
    """On-policy (old = None: r = 1, dr/dlogp = r) the loss equals the plain KL's, but the gradient gains KL_t (token
    level) or the completion's mean KL (sequence level): beta * (dKL + KLbar) per unit of the token's weight."""
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.2, -2.2]], device=device)
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-0.1, -2.0, 0.0]], device=device)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], device=device)
    adv = torch.tensor([0.0, 0.0], device=device)
    beta = 0.5
    x = logp.clone().requires_grad_(True)
    loss, m = grpo_loss(
        x, None, ref, adv, mask, beta=beta, loss_type="bnpo", importance_sampling=importance_sampling,
        kl_ratio_weighted=True, backend=backend,
    )  # fmt: skip
    (grad,) = torch.autograd.grad(loss, x)
    d = ref - logp
    kl = torch.exp(d) - d - 1
    w = mask.float()
    expected_loss = beta * (w * kl).sum() / w.sum()
    if importance_sampling == "token":
        kl_bar = kl
    else:
        kl_bar = ((w * kl).sum(1, keepdim=True) / w.sum(1, keepdim=True)).expand_as(kl)
    expected_grad = beta * w * ((1 - torch.exp(d)) + kl_bar) / w.sum()
    assert_close(loss, expected_loss, rtol=1e-6, name="loss")
    assert_close(grad, expected_grad, rtol=1e-5, atol=1e-8, name="grad")
    assert_close(m.mean_kl, (w * kl).sum() / w.sum(), rtol=1e-6, name="mean_kl")


def test_kl_ratio_weighted_needs_beta():
    logp = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"kl_ratio_weighted=True weights the KL term, which needs beta > 0"):
        grpo_loss(logp, None, logp, torch.zeros(2), torch.ones(2, 3), kl_ratio_weighted=True, backend="torch")


# --------------------------------------------------------------------------------------------------------------------
# Shapes, layouts, dtypes
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1, 1), (1, 63), (7, 1), (2, 4097)])
def test_odd_shapes(shape, backend, device, generator):
    B, T = shape
    batch = draw_batch(B, T, generator, device)
    for level, loss_type in itertools.product(IS_LEVELS, ("grpo", "dapo")):
        kw = dict(beta=0.1, importance_sampling=level, loss_type=loss_type)
        assert_matches(run(grpo_loss, batch, backend=backend, **kw), run(grpo_loss_reference, batch, **kw), str(shape))


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs_and_mask_dtypes(backend, device, generator):
    """Views with row strides != T (e.g. logp sliced out of a (B, T + 1) buffer) and bool / int / float masks."""
    B, T = 4, 33
    for mask_dtype in (torch.bool, torch.int64, torch.float32):
        batch = draw_batch(B, T, generator, device, mask_dtype=mask_dtype)
        expected = run(grpo_loss_reference, batch, beta=0.1, loss_type="grpo", importance_sampling="sequence")
        wide = {k: torch.cat([v, v[:, :1]], dim=1)[:, :T] if v.dim() == 2 else v for k, v in batch.items()}
        assert not wide["logp"].is_contiguous()
        out = run(grpo_loss, wide, beta=0.1, loss_type="grpo", importance_sampling="sequence", backend=backend)
        assert_matches(out, expected, f"{backend} strided mask={mask_dtype}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("importance_sampling", sorted(IS_LEVELS))
def test_fractional_mask_weights(importance_sampling, backend, device, generator):
    """A float mask acts as per-token weights, including completions whose weights sum to less than one token (the
    max(sum m, 1) clamps of grpo's row mean and of GSPO's ratio then differ from the plain sum)."""
    B, T = 6, 20
    batch = draw_batch(B, T, generator, device, mask_dtype=torch.float32, poison_padding=False)
    weights = torch.rand(B, T, generator=generator).to(device) * batch["mask"]
    weights[4] = 0.0  # row 4: unclipped, nonzero advantage (see draw_batch)
    weights[4, :2] = torch.tensor([0.3, 0.25])  # sum 0.55 < 1
    batch["mask"] = weights
    for loss_type in sorted(LOSS_TYPES):
        kw = dict(beta=0.1, loss_type=loss_type, importance_sampling=importance_sampling, **loss_kwargs(loss_type, T))
        out = run(grpo_loss, batch, backend=backend, **kw)
        assert_matches(out, run(grpo_loss_reference, batch, **kw), f"{backend} {loss_type} weights")
        torch.testing.assert_close(out[2].tokens.cpu(), weights.sum().cpu(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(dtype, backend, device, generator):
    """bf16 / fp16 log-probs: computed in fp32 from the rounded inputs; the gradient comes back in the input dtype."""
    batch = draw_batch(5, 40, generator, device, dtype=dtype)
    kw = dict(beta=0.1, loss_type="bnpo")
    loss, grad, _ = run(grpo_loss, batch, backend=backend, **kw)
    ref_loss, ref_grad, _ = run(grpo_loss_reference, batch, **kw)  # float64 from the same rounded values
    assert grad.dtype == dtype and loss.dtype == torch.float32
    assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6, name="loss")  # atol: losses near 0 cancel (seed 109: -1.5e-3)
    assert_close(grad, ref_grad, rtol=1e-2, name="grad")  # the gradient's own rounding to bf16 / fp16


@pytest.mark.parametrize("backend", BACKENDS)
def test_long_sequence_beyond_grid_limits(backend, device, generator):
    """T = 70,000 > 65,535 (the grid-dimension limit that crashed Liger PR #1294's unchunked kernel)."""
    B, T = 1, 70_000
    batch = draw_batch(B, T, generator, device)
    kw = dict(beta=0.1, loss_type="grpo", importance_sampling="sequence")
    assert_matches(run(grpo_loss, batch, backend=backend, **kw), run(grpo_loss_reference, batch, **kw), "long")


def test_grid_math_has_no_dimension_limit():
    from rlvr_fast.kernels.grpo_loss import grpo_layout

    for B, T in [(1, 65_536), (8, 1 << 20), (65_536, 8192), (1, 1 << 31)]:
        for interpreted in (False, True):
            layout = grpo_layout(B, T, interpreted=interpreted)
            assert len(layout.grid) == 1 and layout.grid[0] <= 2**31 - 1, (B, T, layout)
            assert layout.n_chunks * layout.block_t >= T > (layout.n_chunks - 1) * layout.block_t
            assert layout.grid[0] == B * layout.n_chunks


@pytest.mark.skipif(not (torch.cuda.is_available() or triton_interpreter_enabled()), reason="needs Triton")
def test_kernel_multi_chunk_rows_and_poisoned_outputs(device, generator):
    """Small blocks force several programs per completion (row pre-pass partials summed across chunks); the gradient
    buffer starts as NaN and must be written everywhere (zeros on padding)."""
    from rlvr_fast.kernels import grpo_loss as k

    B, T = 3, 63
    batch = draw_batch(B, T, generator, device)
    for sequence, row_norm, weighted in itertools.product((False, True), repeat=3):
        dlogp = poisoned((B, T), torch.float32, device)
        out = k.grpo_loss_fwd(
            batch["logp"],
            batch["old"],
            batch["ref"],
            batch["mask"],
            batch["adv"],
            batch["entropy"],
            beta=0.1,
            eps_low=0.2,
            eps_high=0.2,
            dual_clip=None,
            kl=k.KL_K3,
            sequence=sequence,
            row_norm=row_norm,
            write_grad=True,
            kl_weighted=weighted,
            dlogp_out=dlogp,
            block_t=16,
        )
        assert out.partials.shape == (B * 4, N_STATS)  # 4 programs per completion
        assert_all_written(dlogp, "dlogp")
        loss_type = "grpo" if row_norm else "bnpo"
        level = "sequence" if sequence else "token"
        kw = dict(beta=0.1, loss_type=loss_type, importance_sampling=level, kl_ratio_weighted=weighted)
        ref_loss, ref_grad, _ = run(grpo_loss_reference, batch, **kw)
        denom = B if row_norm else batch["mask"].sum()
        assert_close(out.partials.sum(0)[0] / denom, ref_loss, rtol=1e-5, name="multi-chunk loss")
        assert_close(dlogp / denom, ref_grad, rtol=1e-5, atol=1e-9, name="multi-chunk grad")


# --------------------------------------------------------------------------------------------------------------------
# Normaliser semantics, masks, KL details
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", sorted(LOSS_TYPES))
def test_all_zero_mask_gives_zero_loss_and_gradient(loss_type, backend, device, generator):
    batch = draw_batch(4, 20, generator, device)
    batch["mask"] = torch.zeros_like(batch["mask"])
    batch["logp"] = torch.full_like(batch["logp"], float("nan"))  # all padding: never read
    for level in IS_LEVELS:
        loss, grad, m = run(
            grpo_loss,
            batch,
            beta=0.1,
            importance_sampling=level,
            backend=backend,
            loss_type=loss_type,
            **loss_kwargs(loss_type, 20),
        )
        assert float(loss) == 0.0 and (grad == 0).all()
        assert float(m.tokens) == 0 and float(m.mean_ratio) == 0 and float(m.mean_kl) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_dapo_num_items_accumulates_to_the_global_token_mean(backend, device, generator):
    """Two micro-batches normalised by the step's total token count sum to the token mean of the whole step (DAPO);
    per-micro-batch normalisation (the default) does not when their token counts differ."""
    a, b = draw_batch(3, 24, generator, device), draw_batch(5, 24, generator, device)
    whole = {k: torch.cat([a[k], b[k]]) for k in a}
    n_items = int(whole["mask"].sum())
    kw = dict(beta=0.04, loss_type="dapo", backend=backend)
    parts = [run(grpo_loss, mb, num_items=n_items, **kw) for mb in (a, b)]
    for num_items in (n_items, torch.tensor(n_items, device=device), float(n_items)):
        assert_close(run(grpo_loss, a, num_items=num_items, **kw)[0], parts[0][0], rtol=1e-7, name="num_items types")
    token_mean = run(grpo_loss, whole, beta=0.04, loss_type="bnpo", backend=backend)
    assert_close(parts[0][0] + parts[1][0], token_mean[0], rtol=1e-5, atol=1e-6, name="accumulated loss")  # as above
    assert_close(torch.cat([parts[0][1], parts[1][1]]), token_mean[1], rtol=1e-5, name="accumulated grad")
    # the default divides each micro-batch by its own token count n_k, num_items by the step's: the bias num_items
    # removes is the factor n_items / n_k (an identity for any draw; n_k < n_items, so an ignored num_items fails)
    for mb, part in zip((a, b), parts):
        n_k = int(mb["mask"].sum())
        assert n_k < n_items
        default = run(grpo_loss, mb, **kw)[0]
        atol = 1e-6 * n_items  # sums of n_k and n_items terms: the mean's 1e-6 floor scaled to a sum
        assert_close(default * n_k, part[0] * n_items, rtol=1e-5, atol=atol, name="per-micro-batch normaliser")


@pytest.mark.parametrize("backend", BACKENDS)
def test_dr_grpo_normaliser_is_rows_times_max_completion_length(backend, device, generator):
    B, T = 4, 30
    batch = draw_batch(B, T, generator, device)
    bnpo = run(grpo_loss, batch, beta=0.1, loss_type="bnpo", backend=backend)
    tokens = float(batch["mask"].sum())
    for L in (T, 2 * T, 4096):
        dr = run(grpo_loss, batch, beta=0.1, loss_type="dr_grpo", max_completion_length=L, backend=backend)
        scale = tokens / (B * L)  # bnpo divides by the token count, dr_grpo by B * L
        assert_close(dr[0], bnpo[0] * scale, rtol=1e-6, name=f"dr_grpo loss L={L}")
        assert_close(dr[1], bnpo[1] * scale, rtol=1e-6, name=f"dr_grpo grad L={L}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_grpo_weights_each_completion_equally(backend, device):
    """grpo: mean over completions of each one's token mean, fully masked ones counted in B (TRL's .mean())."""
    logp = torch.zeros(3, 4, device=device)
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]], device=device)
    adv = torch.tensor([1.0, 2.0, 5.0], device=device)
    x = logp.clone().requires_grad_(True)
    loss, m = grpo_loss(x, None, None, adv, mask, loss_type="grpo", backend=backend)
    # on-policy: every token's pg = -A; row means -1 and -2, the empty row contributes 0, divided by B = 3
    torch.testing.assert_close(loss.cpu(), torch.tensor(-1.0), rtol=0, atol=1e-7)
    loss.backward()
    expected = torch.tensor([[-0.25] * 4, [-2.0, 0, 0, 0], [0.0] * 4]) / 3
    torch.testing.assert_close(x.grad.cpu(), expected, rtol=0, atol=1e-7)
    assert float(m.tokens) == 5


@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_estimators_by_hand(backend, device):
    """k1 / k2 / k3 / low_var_kl values and gradients at chosen d = ref - logp (one active token per row), including
    d far beyond verl's clamps: our k3 is unclamped (as TRL's and Liger's), low_var_kl reproduces verl's clamps."""
    d = torch.tensor([1e-4, -0.3, 2.0, 15.0, -25.0], dtype=torch.float64)
    # logp -1, or -16 where d > 1: ref = logp + d stays a log-probability (<= 0, as checked when beta > 0), and
    # every value is exact in float32 but -0.9999 and -1.3 (as with logp = -1 everywhere)
    logp = torch.where(d > 1, -16.0, -1.0)[:, None].to(device)
    ref = logp + d[:, None].to(device)
    mask = torch.ones(5, 1, dtype=torch.bool, device=device)
    adv = torch.zeros(5, dtype=torch.float64, device=device)  # only the KL term remains
    k3 = torch.expm1(d) - d
    expected = {
        "k1": (-d, torch.ones_like(d)),
        "k2": (d * d / 2, -d),
        "k3": (k3, -torch.expm1(d)),
        "low_var_kl": (torch.where(k3 > 10, 10.0, k3), torch.where(k3 > 10, 0.0, -torch.expm1(d))),
    }
    assert float(expected["low_var_kl"][0][3]) == 10.0 and float(expected["k3"][0][3]) > 3e6
    for name, (value, dvalue) in expected.items():
        for dtype in (torch.float32, torch.float64):
            x = logp.to(dtype).clone().requires_grad_(True)
            loss, m = grpo_loss(
                x,
                None,
                ref.to(dtype),
                adv,
                mask,
                beta=1.0,
                kl=name,
                loss_type="dr_grpo",
                max_completion_length=1,
                backend=backend,
            )
            loss.backward()  # dr_grpo with B = 5, L = 1: loss = sum KL / 5
            rtol = 1e-6 if dtype == torch.float32 else 1e-12
            assert_close(x.grad.squeeze(1) * 5, dvalue, rtol=rtol, atol=1e-12, name=f"{name} dKL {dtype}")
            assert_close(m.mean_kl, value.mean(), rtol=rtol, name=f"{name} mean KL {dtype}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_k3_is_accurate_for_tiny_d_in_fp32(backend, device, generator):
    """exp(d) - d - 1 evaluated naively in fp32 has no correct digit at |d| ~ 1e-4 (the policy barely moved from the
    reference): the KL metric and its gradient must still match float64."""
    B, T = 4, 50
    logp = -torch.rand(B, T, generator=generator) * 3
    ref = logp + 1e-4 * torch.randn(B, T, generator=generator)
    mask = torch.ones(B, T, dtype=torch.bool)
    adv = torch.zeros(B)
    naive = (torch.exp(ref - logp) - (ref - logp) - 1).mean()
    exact = (torch.expm1((ref - logp).double()) - (ref - logp).double()).mean()
    assert abs(float(naive) / float(exact) - 1) > 1e-3  # the naive fp32 formula really is off
    args = [t.to(device) for t in (logp, ref, adv, mask)]
    expected = run(
        grpo_loss_reference,
        dict(logp=args[0], old=None, ref=args[1], adv=args[2], mask=args[3], entropy=None),
        with_old=False,
        with_entropy=False,
        beta=0.5,
    )
    out = run(
        grpo_loss,
        dict(logp=args[0], old=None, ref=args[1], adv=args[2], mask=args[3], entropy=None),
        with_old=False,
        with_entropy=False,
        beta=0.5,
        backend=backend,
    )
    assert_close(out[2].mean_kl, expected[2].mean_kl, rtol=1e-5, name="mean k3")
    assert_close(out[0], expected[0], rtol=1e-5, name="loss")
    assert_close(out[1], expected[1], rtol=1e-5, name="grad")


# --------------------------------------------------------------------------------------------------------------------
# NaN policy and bad input
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("importance_sampling", sorted(IS_LEVELS))
@pytest.mark.parametrize("kl", sorted(KL_ESTIMATORS))
def test_nan_at_active_positions_propagates_like_the_reference(kl, importance_sampling, backend, device, generator):
    """Padding garbage never leaks (covered everywhere above); a NaN at an active token of logp / ref reaches the
    loss and exactly the gradients the reference's autograd reaches. A NaN advantage is rejected by both."""
    B, T = 4, 16
    batch = draw_batch(B, T, generator, device)
    batch["adv"] = batch["adv"].clone()
    batch["adv"][0] = float("nan")
    for fn, extra in ((grpo_loss_reference, {}), (grpo_loss, {"backend": backend})):
        with pytest.raises(ValueError, match=r"advantages must be finite, got NaN/inf at rows \[0\]"):
            run(fn, batch, beta=0.1, kl=kl, importance_sampling=importance_sampling, loss_type="grpo", **extra)
    # a NaN old_logp at an active token is an input error: rejected by both, naming the position
    batch = draw_batch(B, T, generator, device)
    batch["old"] = batch["old"].clone()
    batch["old"][0, 0] = float("nan")
    for fn, extra in ((grpo_loss_reference, {}), (grpo_loss, {"backend": backend})):
        with pytest.raises(ValueError, match=r"old_logp must be a finite log-probability .* old_logp\[0, 0\] = nan"):
            run(fn, batch, beta=0.1, kl=kl, importance_sampling=importance_sampling, loss_type="grpo", **extra)
    # a NaN in logp (the model's output) propagates; so does one in ref_logp at beta = 0 (only mean_kl reads it)
    for field, where, beta in (("logp", (0, 0), 0.1), ("ref", (0, 0), 0.0)):
        batch = draw_batch(B, T, generator, device)
        batch[field] = batch[field].clone()
        batch[field][where] = float("nan")
        kw = dict(beta=beta, kl=kl, importance_sampling=importance_sampling, loss_type="grpo")
        exp_loss, exp_grad, exp_metrics = run(grpo_loss_reference, batch, **kw)
        loss, grad, metrics = run(grpo_loss, batch, backend=backend, **kw)
        if field == "ref":
            assert math.isnan(float(exp_metrics.mean_kl)) and math.isnan(float(metrics.mean_kl))
            assert torch.isfinite(loss) and torch.isfinite(exp_loss)
        else:
            assert math.isnan(float(exp_loss)) and math.isnan(float(loss)), field
        assert_nan_parity(grad, exp_grad, f"{field} NaN grad")
        assert_close(grad, exp_grad, rtol=1e-5, atol=1e-8, name=f"{field} finite grads")


def _bad_inputs(B=3, T=5):
    good = dict(
        logp=-torch.rand(B, T),
        old_logp=-torch.rand(B, T),
        ref_logp=-torch.rand(B, T),
        advantages=torch.randn(B),
        mask=torch.ones(B, T, dtype=torch.bool),
    )
    cases = [
        (
            {"old_logp": torch.zeros(B, T + 1)},
            ValueError,
            r"old_logp must have logp's shape \(B, T\) = \(3, 5\), got old_logp shape \(3, 6\)",
        ),
        ({"ref_logp": torch.zeros(B + 1, T)}, ValueError, r"ref_logp must have logp's shape"),
        ({"mask": torch.ones(B, T - 1)}, ValueError, r"mask must have logp's shape"),
        ({"entropy": torch.zeros(T)}, ValueError, r"entropy must have logp's shape"),
        ({"advantages": torch.zeros(B, 1)}, ValueError, r"advantages must be \(B,\) = \(3,\).*got shape \(3, 1\)"),
        ({"advantages": torch.zeros(B + 2)}, ValueError, r"advantages must be \(B,\)"),
        ({"logp": -torch.rand(B * T)}, ValueError, r"logp must be 2-D \(B, T\)"),
        ({"logp": torch.zeros(B, T, dtype=torch.long)}, TypeError, r"logp must be a floating tensor"),
        ({"old_logp": [0.0] * T}, TypeError, r"old_logp must be a torch.Tensor"),
        ({"mask": None}, TypeError, r"mask must be a \(B, T\) tensor"),
        (
            {"loss_type": "ppo"},
            ValueError,
            r"unknown loss_type 'ppo'; valid loss types: \['bnpo', 'dapo', 'dr_grpo', 'grpo'\]",
        ),
        ({"kl": "k4"}, ValueError, r"unknown kl 'k4'; valid KL estimators: \['k1', 'k2', 'k3', 'low_var_kl'\]"),
        (
            {"importance_sampling": "seq"},
            ValueError,
            r"unknown importance_sampling 'seq'; valid levels: \['sequence', 'token'\]",
        ),
        ({"eps_low": -0.1}, ValueError, r"eps_low must be >= 0.0, got -0.1"),
        ({"eps_low": 1.5}, ValueError, r"eps_low must be <= 1.0, got 1.5"),
        ({"eps_low": float("nan")}, ValueError, r"eps_low must be a finite real number"),
        ({"eps_high": -0.2}, ValueError, r"eps_high must be >= 0.0"),
        ({"eps_high": float("inf")}, ValueError, r"eps_high must be a finite real number"),
        ({"dual_clip": 1.0}, ValueError, r"dual_clip must be > 1.0, got 1.0"),
        ({"dual_clip": 0.5}, ValueError, r"dual_clip must be > 1.0"),
        ({"beta": -0.1}, ValueError, r"beta must be >= 0.0"),
        ({"beta": float("nan")}, ValueError, r"beta must be a finite real number"),
        ({"beta": 0.04, "ref_logp": None}, ValueError, r"beta=0.04 > 0 needs ref_logp"),
        ({"num_items": 0}, ValueError, r"num_items must be > 0"),
        ({"num_items": -3.0}, ValueError, r"num_items must be > 0"),
        ({"num_items": torch.tensor(0.0)}, ValueError, r"num_items must be > 0"),
        ({"num_items": torch.ones(2)}, ValueError, r"num_items must be a number or a one-element tensor"),
        ({"num_items": 10, "loss_type": "grpo"}, ValueError, r"num_items=10 is used only by loss types \['dapo'\]"),
        ({"loss_type": "dr_grpo"}, ValueError, r"loss_type='dr_grpo' needs max_completion_length, got None"),
        (
            {"loss_type": "dr_grpo", "max_completion_length": T - 1},
            ValueError,
            r"max_completion_length \(4\) must be >= 1 and >= the completion length T = 5",
        ),
        ({"loss_type": "dr_grpo", "max_completion_length": 8.0}, TypeError, r"max_completion_length must be an int"),
        ({"max_completion_length": 8}, ValueError, r"max_completion_length=8 is used only by loss types \['dr_grpo'\]"),
        ({"backend": "cuda_graph"}, ValueError, r"backend must be one of"),
        # refused: NaN mask weights; NaN or positive old_logp where the mask counts, named by position
        (
            {"mask": _with(torch.ones(B, T), 1, 2, float("nan"))},
            ValueError,
            r"mask weights must be >= 0, got 0 negative \(min .*\) and 1 NaN/inf .* mask\[1, 2\] = nan",
        ),
        ({"mask": _with(torch.ones(B, T), 0, 0, float("inf"))}, ValueError, r"1 NaN/inf .*mask\[0, 0\] = inf"),
        (
            {"old_logp": _with(-torch.rand(B, T), 2, 4, float("nan"))},
            ValueError,
            r"old_logp must be a finite log-probability \(<= 0.0001, not NaN or -inf\) at every token with "
            r"mask != 0, got 1 such tokens: old_logp\[2, 4\] = nan",
        ),
        ({"old_logp": _with(-torch.rand(B, T), 0, 3, 0.5)}, ValueError, r"got 1 such tokens: old_logp\[0, 3\] = 0.5"),
        ({"old_logp": _with(-torch.rand(B, T), 1, 1, 2e-4)}, ValueError, r"old_logp\[1, 1\] = 0.0002"),
        # refused: -inf old_logp (an underflowed sampler probability) used to give loss inf under a negative
        # advantage; ref_logp (used when beta > 0) gets the same checks: NaN gave NaN gradients, -inf loss inf
        (
            {"old_logp": _with(-torch.rand(B, T), 1, 3, -math.inf)},
            ValueError,
            r"1 such tokens: old_logp\[1, 3\] = -inf",
        ),
        ({"old_logp": _with(-torch.rand(B, T), 0, 1, math.inf)}, ValueError, r"old_logp\[0, 1\] = inf"),
        (
            {"ref_logp": _with(-torch.rand(B, T), 2, 0, math.nan), "beta": 0.1},
            ValueError,
            r"ref_logp must be a finite log-probability \(<= 0.0001, not NaN or -inf\) at every token with "
            r"mask != 0, got 1 such tokens: ref_logp\[2, 0\] = nan",
        ),
        ({"ref_logp": _with(-torch.rand(B, T), 1, 4, -math.inf), "beta": 0.1}, ValueError, r"ref_logp\[1, 4\] = -inf"),
        ({"ref_logp": _with(-torch.rand(B, T), 0, 0, 5.0), "beta": 0.04}, ValueError, r"ref_logp\[0, 0\] = 5"),
        (
            {"ref_logp": _with(_with(-torch.rand(B, T), 0, 0, 5.0), 2, 2, -math.inf), "beta": 0.04},
            ValueError,
            r"got 2 such tokens: ref_logp\[0, 0\] = 5, ref_logp\[2, 2\] = -inf",
        ),
    ]
    return good, cases


def _with(x: torch.Tensor, row: int, position: int, value) -> torch.Tensor:
    """A copy of ``x`` with ``x[row, position] = value``."""
    x = x.clone()
    x[row, position] = value
    return x


@pytest.mark.parametrize("backend", BACKENDS)
def test_old_logp_is_checked_only_where_the_mask_counts(backend, device):
    """old_logp and ref_logp within OLD_LOGP_MAX of 0 (rounding of a near-certain token's log-prob) are accepted; on
    padding (mask 0) they may hold anything, NaN, -inf and positive values included."""
    B, T = 3, 5
    logp = -torch.rand(B, T, device=device)
    mask = torch.ones(B, T, device=device)
    mask[2, 3:] = 0.0
    mask[1, 4] = 0.0
    garbage = [(0, 0, 5e-5), (2, 3, float("nan")), (2, 4, 3.0), (1, 4, -math.inf)]
    old, ref_logp = -torch.rand(B, T, device=device), -torch.rand(B, T, device=device)
    for row, position, value in garbage:
        old, ref_logp = _with(old, row, position, value), _with(ref_logp, row, position, value)
    adv = -torch.rand(B, device=device) - 0.5  # negative: a -inf old_logp under mask 1 would give loss inf
    loss, _ = grpo_loss(logp, old, ref_logp, adv, mask, beta=0.1, backend=backend)
    ref, _ = grpo_loss_reference(logp, old, ref_logp, adv, mask, objective=PolicyObjective(beta=0.1))
    assert torch.isfinite(loss) and torch.allclose(loss.double().cpu(), ref.cpu(), rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_old_and_ref_logp_are_refused_on_every_backend(backend, device, generator):
    """-inf old_logp under mask 1 used to give loss inf (negative advantage); ref_logp NaN (beta > 0) gave
    NaN gradients, -inf loss inf, +5 was accepted. Every backend and the reference refuse them, one fused check."""
    batch = draw_batch(4, 8, generator, device)
    batch["adv"] = -batch["adv"].abs() - 0.5
    for field, name, value in (
        ("old", "old_logp", -math.inf),
        ("ref", "ref_logp", math.nan),
        ("ref", "ref_logp", -math.inf),
        ("ref", "ref_logp", 5.0),
    ):
        bad = dict(batch, **{field: _with(batch[field], 3, 0, value)})
        for fn, extra in ((grpo_loss_reference, {}), (grpo_loss, {"backend": backend})):
            with pytest.raises(ValueError, match=rf"{name} must be a finite log-probability .* {name}\[3, 0\]"):
                run(fn, bad, beta=0.1, loss_type="grpo", **extra)


@pytest.mark.parametrize("case", range(len(_bad_inputs()[1])))
def test_bad_input_raises_clear_errors(case):
    good, cases = _bad_inputs()
    change, exc, pattern = cases[case]
    args = {**good, **change}
    positional = [args.pop(k) for k in ("logp", "old_logp", "ref_logp", "advantages", "mask")]
    backend = args.pop("backend", "torch")
    with pytest.raises(exc, match=pattern):
        grpo_loss(*positional, backend=backend, **args)
    if "backend" not in change:  # the reference shares the checks
        with pytest.raises(exc, match=pattern):
            grpo_loss_reference(
                *positional, entropy=args.get("entropy"), objective=PolicyObjective(**flat_arguments(args))
            )


def test_auto_backend_and_no_grad(device, generator):
    batch = draw_batch(3, 10, generator, device)
    loss, m = grpo_loss(batch["logp"], batch["old"], None, batch["adv"], batch["mask"])
    expected = "triton" if (device.type == "cuda" or triton_interpreter_enabled()) else "torch"
    assert m.backend == expected and not loss.requires_grad
    assert set(m.as_dict()) == {
        "clip_low_frac",
        "clip_high_frac",
        "dual_clip_frac",
        "mean_ratio",
        "tokens",
        "tokens_skipped",
    }


# --------------------------------------------------------------------------------------------------------------------
# Parity with TRL (its real GRPOTrainer._compute_loss, run on a stand-in trainer) and Liger-Kernel
# --------------------------------------------------------------------------------------------------------------------


def trl_compute_loss(
    logp,
    ent,
    batch,
    *,
    loss_type,
    importance_sampling,
    beta,
    eps_high,
    max_completion_length,
    num_items,
    bias_correction_kl=False,
):
    """TRL 1.16's GRPOTrainer._compute_loss (trl/trainer/grpo_trainer.py) called unbound on a stand-in trainer: one
    process, gradient-accumulation factor 1, no vLLM / entropy masking / off-policy masking. Returns (loss, metrics)."""
    from trl.trainer.grpo_trainer import GRPOTrainer

    B, T = logp.shape
    metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    accelerator = types.SimpleNamespace(
        num_processes=1, gather=lambda t: t, reduce=lambda t, reduction: t, gather_for_metrics=lambda t: t
    )
    trainer = types.SimpleNamespace(
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level=importance_sampling,
        beta=beta,
        loss_type=loss_type,
        epsilon_low=0.2,
        epsilon_high=eps_high,
        use_vllm=False,
        vllm_importance_sampling_correction=False,
        model=types.SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        max_completion_length=max_completion_length,
        accelerator=accelerator,
        _entropy_bonus_enabled=False,
        aux_loss_enabled=False,
        _metrics=metrics,
        args=types.SimpleNamespace(use_bias_correction_kl=bias_correction_kl, delta=None, steps_per_generation=1),
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, ent, None),
    )
    empty = torch.zeros(B, 0, dtype=torch.long, device=logp.device)
    inputs = dict(
        prompt_ids=empty,
        prompt_mask=empty,
        completion_ids=torch.zeros(B, T, dtype=torch.long, device=logp.device),
        completion_mask=batch["mask"].long(),
        advantages=batch["adv"],
        old_per_token_logps=batch["old"],
        ref_per_token_logps=batch["ref"],
        num_items_in_batch=torch.tensor(float(num_items), device=logp.device),
    )
    loss = GRPOTrainer._compute_loss(trainer, None, inputs)
    return loss, {k: v[-1] for k, v in metrics["train"].items()}


@pytest.mark.parametrize("beta, bias_correction_kl", [(0.0, False), (0.04, False), (0.04, True)])
@pytest.mark.parametrize("importance_sampling", sorted(IS_LEVELS))
@pytest.mark.parametrize("loss_type", sorted(LOSS_TYPES))
def test_parity_with_trl(loss_type, importance_sampling, beta, bias_correction_kl, device, generator):
    """TRL's _compute_loss; with use_bias_correction_kl (TRL's default) as kl_ratio_weighted."""
    pytest.importorskip("trl")
    B, T = 6, 24
    batch = draw_batch(B, T, generator, device, poison_padding=False)  # TRL multiplies by the mask: finite padding
    batch["mask"] = batch["mask"].long()
    L = T + 8
    num_items = int(batch["mask"].sum()) + 17  # as if other micro-batches held 17 more tokens
    x = batch["logp"].clone().requires_grad_(True)
    trl_loss, trl_metrics = trl_compute_loss(
        x,
        batch["entropy"],
        batch,
        loss_type=loss_type,
        importance_sampling=importance_sampling,
        beta=beta,
        eps_high=0.28,
        max_completion_length=L,
        num_items=num_items,
        bias_correction_kl=bias_correction_kl,
    )
    (trl_grad,) = torch.autograd.grad(trl_loss, x)
    extra = {"dr_grpo": {"max_completion_length": L}, "dapo": {"num_items": num_items}}.get(loss_type, {})
    for backend in BACKENDS:
        loss, grad, m = run(
            grpo_loss,
            batch,
            with_ref=beta > 0,
            backend=backend,
            beta=beta,
            eps_high=0.28,
            loss_type=loss_type,
            importance_sampling=importance_sampling,
            kl_ratio_weighted=bias_correction_kl,
            **extra,
        )
        assert_close(loss, trl_loss, rtol=1e-5, atol=1e-6, name=f"{backend} loss vs TRL")
        assert_close(grad, trl_grad, rtol=1e-5, atol=1e-9, name=f"{backend} grad vs TRL")
        assert_close(m.mean_entropy, torch.tensor(trl_metrics["entropy"]), rtol=1e-5, name="entropy vs TRL")
        if beta > 0:
            assert_close(m.mean_kl, torch.tensor(trl_metrics["kl"]), rtol=1e-5, name="kl vs TRL")
        if importance_sampling == "token":  # TRL's sequence-level clip metrics average per completion instead
            assert_close(m.clip_low_frac, torch.tensor(trl_metrics["clip_ratio/low_mean"]), rtol=1e-5, name="low")
            assert_close(m.clip_high_frac, torch.tensor(trl_metrics["clip_ratio/high_mean"]), rtol=1e-5, name="high")


def plain_token_logprobs(hidden, weight, targets, bias, temperature):
    """A user's own fp32 log-prob computation (materialised logits), to compose with grpo_loss."""
    logits = (hidden @ weight.T + bias) / temperature
    return torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("importance_sampling", sorted(IS_LEVELS))
@pytest.mark.parametrize("loss_type", sorted(LOSS_TYPES))
def test_parity_with_liger_fused_linear_grpo(loss_type, importance_sampling, beta, device, generator):
    """Liger's LigerFusedLinearGRPOLoss (pure-PyTorch chunks, compiled=False; use_ref_model=True whenever beta > 0,
    since with False it silently drops the KL term) against our reference and against grpo_loss composed with a
    plain log-prob: loss, d/d hidden, d/d weight, d/d bias, KL and clip metrics."""
    liger_grpo = pytest.importorskip("liger_kernel.chunked_loss.grpo_loss")
    B, T, D, V, temperature = 4, 12, 16, 37, 0.7
    batch = draw_batch(B, T, generator, device, poison_padding=False)
    mask = batch["mask"].long()
    hidden = torch.randn(B, T, D, generator=generator).to(device)
    weight = (torch.randn(V, D, generator=generator) / math.sqrt(D)).to(device)
    bias = (0.1 * torch.randn(V, generator=generator)).to(device)
    targets = torch.randint(0, V, (B, T), generator=generator).to(device)
    with torch.no_grad():  # old / ref: the same head, perturbed, so ratios and KL are not trivial
        old = plain_token_logprobs(hidden, weight + 0.05 * torch.randn_like(weight), targets, bias, temperature)
        ref = plain_token_logprobs(hidden, weight + 0.05 * torch.randn_like(weight), targets, bias, temperature)
    L = T + 4
    liger = liger_grpo.LigerFusedLinearGRPOLoss(
        beta=beta,
        compiled=False,
        use_ref_model=beta > 0,
        chunk_size=1,
        epsilon_low=0.2,
        epsilon_high=0.28,
        loss_type=loss_type,
        max_completion_length=L if loss_type == "dr_grpo" else None,
        importance_sampling_level=importance_sampling,
        temperature=temperature,
    )
    params = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    liger_loss, liger_metrics = liger(
        params[0],
        params[1],
        targets,
        mask,
        batch["adv"],
        bias=params[2],
        ref_per_token_logps=ref,
        old_per_token_logps=old,
    )
    liger_grads = torch.autograd.grad(liger_loss, params)
    liger_clip = liger_metrics[-1]

    opts = dict(
        beta=beta,
        eps_high=0.28,
        loss_type=loss_type,
        importance_sampling=importance_sampling,
        **({"max_completion_length": L} if loss_type == "dr_grpo" else {}),
    )
    ours = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    ref_loss, ref_metrics = fused_linear_grpo_loss_reference(
        ours[0],
        ours[1],
        targets,
        mask,
        batch["adv"],
        old_logp=old,
        ref_logp=ref if beta > 0 else None,
        bias=ours[2],
        objective=PolicyObjective(temperature=temperature, **opts),
    )
    results = {"reference": (ref_loss, torch.autograd.grad(ref_loss, ours), ref_metrics)}
    for backend in BACKENDS:
        ps = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
        logp = plain_token_logprobs(ps[0], ps[1], targets, ps[2], temperature)
        loss, m = grpo_loss(logp, old, ref if beta > 0 else None, batch["adv"], mask, backend=backend, **opts)
        results[backend] = (loss, torch.autograd.grad(loss, ps), m)
    for name, (loss, grads, m) in results.items():
        # atol: the loss is a mean of O(1) per-token terms that can cancel to ~1e-3; two float32 sums of them in
        # different orders differ by ~sqrt(tokens) x 6e-8 (2.4e-7 seen at a loss of -3.7e-3 with atol 1e-7)
        assert_close(loss, liger_loss, rtol=2e-5, atol=1e-6, name=f"{name} loss vs Liger")
        for g, lg, what in zip(grads, liger_grads, ("hidden", "weight", "bias")):
            assert_close(g, lg, rtol=2e-5, atol=1e-8, name=f"{name} d/d {what} vs Liger")
        assert_close(m.clip_low_frac + m.clip_high_frac, liger_clip, rtol=1e-5, atol=1e-7, name=f"{name} clip")
        if beta > 0:
            assert_close(m.mean_kl, liger_metrics[0], rtol=2e-5, atol=1e-8, name=f"{name} KL vs Liger")


def test_fused_linear_reference_composes_logprobs_and_entropy(device, generator):
    B, T, D, V = 3, 7, 8, 11
    hidden = torch.randn(B, T, D, generator=generator).to(device)
    weight = torch.randn(V, D, generator=generator).to(device)
    targets = torch.randint(0, V, (B, T), generator=generator).to(device)
    mask = torch.ones(B, T, dtype=torch.bool, device=device)
    targets[0, -2:] = IGNORE_INDEX
    mask[0, -2:] = False
    adv = torch.randn(B, generator=generator).to(device)
    loss, m = fused_linear_grpo_loss_reference(
        hidden, weight, targets, mask, adv, objective=PolicyObjective(temperature=2.0), return_entropy=True
    )
    logits = (hidden.double() @ weight.double().T) / 2.0
    logprobs = torch.log_softmax(logits, -1)
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    assert_close(m.mean_entropy, entropy[mask].mean(), rtol=1e-12, name="entropy")
    logp = logprobs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    assert (logp <= 0).all()  # verl #2656: a log-prob is never positive
    expected, _ = grpo_loss_reference(logp, None, None, adv, mask)
    assert_close(loss, expected, rtol=1e-12, name="loss")
    with pytest.raises(ValueError, match=r"targets must be in \[0, V=11\) or -100"):
        fused_linear_grpo_loss_reference(hidden, weight, targets.clamp(min=0) + V, mask, adv)
    with pytest.raises(ValueError, match=r"weight must be \(V, D\) with D = hidden's 8"):
        fused_linear_grpo_loss_reference(hidden, weight[:, :5], targets, mask, adv)
