"""fused_linear_grpo_loss: the interpreted Triton path and the chunked torch path against the float64 reference
(loss, metrics and the gradients w.r.t. hidden, weight and bias), chunking and skipping, low precision, poisoned
buffers, bad input, and parity with Liger-Kernel's LigerFusedLinearGRPOLoss."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch

from rlvr_fast.ops.fused_linear_grpo_loss import (
    IGNORE_INDEX,
    FusedLinearGrpoConfig,
    _chunk_sizes,
    _chunks,
    _Plan,
    fused_linear_grpo_loss,
    fused_linear_grpo_loss_reference,
)
from rlvr_fast.ops.grpo_loss import grpo_loss_reference
from rlvr_fast.ops.logprobs_reference import token_logprobs_reference
from rlvr_fast.ops.loss_types import IS_LEVELS, KL_ESTIMATORS, LOSS_TYPES
from rlvr_fast.ops.objective import FIELDS, PolicyObjective, flat_arguments
from rlvr_fast.testing import assert_all_written, assert_close, assert_low_precision_close, poisoned

BACKENDS = ["triton", "torch"]
CLIPS = {  # name -> (eps_low, eps_high, dual_clip)
    "symmetric": (0.2, None, None),
    "clip_higher": (0.2, 0.28, None),
    "dual_clip": (0.2, 0.28, 3.0),
}
METRICS = (
    "clip_low_frac",
    "clip_high_frac",
    "dual_clip_frac",
    "mean_ratio",
    "mean_kl",
    "mean_entropy",
    "tokens",
    "tokens_skipped",
)
TEMPERATURE = 0.7
# Small chunks so that chunk and buffer boundaries are crossed: 8 tokens of logits at a time, dz of two chunks per
# dweight GEMM (Triton path), 16 columns per kernel step (V = 37 is not a multiple); GSPO completions with more than
# 8 tokens take the log-prob pre-pass, shorter ones are packed whole into chunks.
SMALL = FusedLinearGrpoConfig(chunk_tokens=8, grad_tokens=16, block_v=16)
# One chunk per call: the interpreter pays ~50 ms per kernel launch, and the terms kernel (the only code that differs
# across loss options) is the same whatever the chunking.
ONE_CHUNK = FusedLinearGrpoConfig(chunk_tokens=4096)
CONFIGS = {"torch": SMALL, "triton": ONE_CHUNK}
# Triton path with fp32 dz written over the logits in place (one chunk per dweight GEMM, the default off the GPU)
IN_PLACE = FusedLinearGrpoConfig(chunk_tokens=8, block_v=16)
RTOL = 1e-5  # relative RMS error of an fp32 path against the fp64 reference


def draw(B, T, D, V, gen, device, *, dtype=torch.float32, bias=True, nan_padding=True, zero_adv_rows=(-1,)):
    """A micro-batch from a tiny LM head: right-padded completions of random lengths with interior holes, one fully
    masked row, zero-advantage rows, and old / ref log-probs drawn around the policy's own so that the rows given clip
    roles (as in test_grpo_loss) hit the high, dual and low clips at token and sequence level. Padding positions hold
    target -100 and NaN hidden states (they must never be read)."""
    hidden = torch.randn(B, T, D, generator=gen, dtype=torch.float64)
    weight = torch.randn(V, D, generator=gen, dtype=torch.float64) * (2.0 / math.sqrt(D))
    b = 0.5 * torch.randn(V, generator=gen, dtype=torch.float64) if bias else None
    targets = torch.randint(0, V, (B, T), generator=gen)
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    lengths[: min(B, 5)] = lengths[: min(B, 5)].clamp(min=min(T, 6))
    if B > 5:  # one short completion past the five rows of given roles (under GSPO, packed with others in a chunk)
        lengths[-1] = lengths[-1].clamp(max=max(1, min(T, 6)))
    mask = (torch.arange(T)[None, :] < lengths[:, None]) & (torch.rand(B, T, generator=gen) > 0.1)
    mask[:, 0] = True
    mask[0] = True  # one completion without holes or padding (under GSPO, longer than SMALL's chunks)
    if B >= 3:
        mask[1] = False
    with torch.no_grad():
        logp = token_logprobs_reference(hidden, weight, targets, bias=b, temperature=TEMPERATURE)
    drift = 0.4 * torch.randn(B, 1, generator=gen, dtype=torch.float64)
    adv = torch.randn(B, generator=gen, dtype=torch.float64)
    if B >= 4:
        for row, sign, log_ratio in ((0, 1.0, 0.9), (2, -1.0, 1.8), (3, -1.0, -0.9)):
            adv[row] = sign * (0.5 + adv[row].abs())
            drift[row] = log_ratio
    if B >= 2:
        for row in zero_adv_rows:
            adv[row] = 0.0
    # a log-probability is <= 0 (old_logp, and ref_logp when beta > 0, > OLD_LOGP_MAX at a counted token is rejected)
    old = (logp - drift - 0.2 * torch.randn(B, T, generator=gen, dtype=torch.float64)).clamp(max=0.0)
    ref = (logp + 0.3 * torch.randn(B, T, generator=gen, dtype=torch.float64)).clamp(max=0.0)
    targets = torch.where(mask, targets, IGNORE_INDEX)
    if nan_padding:
        hidden = torch.where(mask[..., None], hidden, float("nan"))
        old, ref = (torch.where(mask, x, float("nan")) for x in (old, ref))
    batch = dict(hidden=hidden, weight=weight, bias=b, old=old, ref=ref, adv=adv)
    batch = {k: None if v is None else v.to(device=device, dtype=dtype) for k, v in batch.items()}
    batch["adv"] = adv.to(device=device, dtype=torch.float32)
    batch.update(targets=targets.to(device), mask=mask.to(device))
    return batch


def run(fn, batch, *, with_old=True, with_ref=True, **kwargs):
    """(loss, (d/d hidden, d/d weight, d/d bias), metrics) of ``fn`` (ours or the reference) on ``batch``."""
    params = [None if batch[k] is None else batch[k].clone().requires_grad_(True) for k in ("hidden", "weight", "bias")]
    kwargs.setdefault("temperature", TEMPERATURE)
    if fn is fused_linear_grpo_loss_reference:  # the reference takes the objective only: the flat settings become one
        objective = PolicyObjective(**flat_arguments(kwargs))
        kwargs = {k: v for k, v in kwargs.items() if k not in FIELDS} | {"objective": objective}
    loss, metrics = fn(
        params[0],
        params[1],
        batch["targets"],
        batch["mask"],
        batch["adv"],
        bias=params[2],
        old_logp=batch["old"] if with_old else None,
        ref_logp=batch["ref"] if with_ref else None,
        **kwargs,
    )
    present = [p for p in params if p is not None]
    grads = iter(torch.autograd.grad(loss, present))
    return loss.detach(), tuple(None if p is None else next(grads) for p in params), metrics


def assert_matches(out, ref, name, *, rtol=RTOL, metrics=METRICS):
    loss, grads, m = out
    ref_loss, ref_grads, ref_m = ref
    # atol: the loss sums terms of both signs (it may cancel to ~1e-2), each carrying the ~1e-7 |z| rounding of an
    # fp32 logit, so its absolute error is ~1e-7 whatever its size
    assert_close(loss, ref_loss, rtol=rtol, atol=1e-6, name=f"{name} loss")
    for what, g, e in zip(("hidden", "weight", "bias"), grads, ref_grads):
        assert (g is None) == (e is None), what
        if e is not None:
            assert g.dtype == e.dtype and g.shape == e.shape
            assert_close(g, e, rtol=rtol, atol=1e-9, name=f"{name} d/d {what}")
    for key in metrics:
        a, e = getattr(m, key), getattr(ref_m, key)
        assert (a is None) == (e is None), f"{name} {key}: {a} vs {e}"
        if e is not None:
            # atol as the loss's: a mean of signed terms (k1's logp - ref, weighted by the ratio) may cancel to a few
            # 1e-2 while each fp32 term carries ~1e-7 of rounding (measured: 1.2e-6 on a mean_kl of 0.076, seed
            # 636223300)
            assert_close(a, e, rtol=rtol, atol=4e-6, name=f"{name} {key}")


def loss_kwargs(loss_type, T):
    return {"max_completion_length": T + 5} if loss_type == "dr_grpo" else {}


# --------------------------------------------------------------------------------------------------------------------
# Against the reference: every loss type x IS level x KL kind x clip setting, gradients included
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("clip", sorted(CLIPS))
@pytest.mark.parametrize("kl", sorted(KL_ESTIMATORS))
@pytest.mark.parametrize("importance_sampling", sorted(IS_LEVELS))
@pytest.mark.parametrize("loss_type", sorted(LOSS_TYPES))
def test_matches_reference(loss_type, importance_sampling, kl, clip, device, generator):
    B, T, D, V = 6, 13, 16, 37
    batch = draw(B, T, D, V, generator, device)
    eps_low, eps_high, dual = CLIPS[clip]
    kw = dict(
        beta=0.04,
        kl=kl,
        eps_low=eps_low,
        eps_high=eps_high,
        dual_clip=dual,
        loss_type=loss_type,
        importance_sampling=importance_sampling,
        return_entropy=True,
        **loss_kwargs(loss_type, T),
    )
    expected = run(fused_linear_grpo_loss_reference, batch, **kw)
    for backend in BACKENDS:
        out = run(fused_linear_grpo_loss, batch, backend=backend, config=CONFIGS[backend], **kw)
        assert out[2].backend == backend and out[0].dtype == torch.float32
        assert_matches(out, expected, f"{backend} {loss_type}/{importance_sampling}/{kl}/{clip}")
        padding = ~batch["mask"]
        assert (out[1][0][padding] == 0).all(), "padding must receive exactly zero gradient"


def test_draws_exercise_every_branch(device, generator):
    """The matrix is only as good as its data: its draws hit the low, high and dual clips at both levels, and leave
    tokens whose gradient flows; and the GSPO chunking of SMALL both packs completions and pre-passes long ones."""
    batch = draw(6, 13, 16, 37, generator, device)
    for level in IS_LEVELS:
        _, _, m = run(fused_linear_grpo_loss_reference, batch, eps_high=0.28, dual_clip=3.0, importance_sampling=level)
        assert m.clip_low_frac > 0 and m.clip_high_frac > 0 and m.dual_clip_frac > 0, (level, m)
        assert m.clip_low_frac + m.clip_high_frac + m.dual_clip_frac < 0.99  # and tokens whose gradient flows
    counts = batch["mask"].sum(1).tolist()
    assert any(c > SMALL.chunk_tokens for c in counts) and any(0 < c <= SMALL.chunk_tokens for c in counts), counts


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("importance_sampling", sorted(IS_LEVELS))
@pytest.mark.parametrize("loss_type", sorted(LOSS_TYPES))
def test_multi_chunk_paths(loss_type, importance_sampling, backend, device, generator):
    """Both paths through several chunks (and GSPO's pre-pass and packing), with bias and entropy, at beta > 0; the
    Triton path writing dz over the logits in place (chunks of uneven sizes under GSPO)."""
    B, T = 5, 11
    batch = draw(B, T, 12, 29, generator, device)
    kw = dict(
        beta=0.1,
        loss_type=loss_type,
        importance_sampling=importance_sampling,
        return_entropy=True,
        **loss_kwargs(loss_type, T),
    )
    expected = run(fused_linear_grpo_loss_reference, batch, **kw)
    config = IN_PLACE if backend == "triton" else SMALL
    assert_matches(run(fused_linear_grpo_loss, batch, backend=backend, config=config, **kw), expected, backend)


@pytest.mark.parametrize("kl", sorted(KL_ESTIMATORS))
@pytest.mark.parametrize("importance_sampling", sorted(IS_LEVELS))
def test_kl_ratio_weighted_matches_reference(importance_sampling, kl, device, generator):
    """TRL's use_bias_correction_kl (r * KL, r differentiable) on both paths through several chunks: GSPO's packed
    completions and its pre-pass of long ones both carry the completion's KL sum; every loss type."""
    B, T = 5, 11
    batch = draw(B, T, 12, 29, generator, device)
    for loss_type in sorted(LOSS_TYPES):
        kw = dict(
            beta=0.3,
            kl=kl,
            eps_high=0.28,
            dual_clip=3.0,
            loss_type=loss_type,
            importance_sampling=importance_sampling,
            kl_ratio_weighted=True,
            **loss_kwargs(loss_type, T),
        )
        expected = run(fused_linear_grpo_loss_reference, batch, **kw)
        for backend, config in (("torch", SMALL), ("triton", IN_PLACE), ("triton", ONE_CHUNK)):
            out = run(fused_linear_grpo_loss, batch, backend=backend, config=config, **kw)
            assert_matches(out, expected, f"{backend} {loss_type}/{importance_sampling}/{kl} weighted")


@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_ratio_weighted_fp64_gradcheck(backend, device, generator):
    """The closed-form gradients of r * KL against finite differences (float64, several chunks, both levels)."""
    batch = draw(3, 5, 3, 7, generator, device, dtype=torch.float64, nan_padding=False)
    config = FusedLinearGrpoConfig(chunk_tokens=3, grad_tokens=6, block_v=4)
    for level in IS_LEVELS:
        kw = dict(
            beta=0.3,
            eps_high=0.28,
            loss_type="grpo",
            importance_sampling=level,
            kl_ratio_weighted=True,
            backend=backend,
            config=config,
        )

        def f(h, w, kw=kw):
            return fused_linear_grpo_loss(
                h,
                w,
                batch["targets"],
                batch["mask"],
                batch["adv"].double(),
                old_logp=batch["old"],
                ref_logp=batch["ref"],
                **kw,
            )[0]

        params = tuple(batch[k].clone().requires_grad_(True) for k in ("hidden", "weight"))
        assert torch.autograd.gradcheck(f, params, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


# --------------------------------------------------------------------------------------------------------------------
# Zero-advantage skipping, on-policy, beta = 0
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("importance_sampling", sorted(IS_LEVELS))
@pytest.mark.parametrize("loss_type", sorted(LOSS_TYPES))
def test_zero_advantage_skipping(loss_type, importance_sampling, backend, device, generator):
    """beta = 0: completions with A == 0 never reach the LM head (NaN hidden states there reach nothing), yet the loss
    and every gradient equal the full computation's and the reference's; their tokens are counted as skipped and the
    normalisers still count them."""
    B, T = 6, 12
    batch = draw(B, T, 12, 29, generator, device, zero_adv_rows=(3, 5))
    kw = dict(
        loss_type=loss_type,
        importance_sampling=importance_sampling,
        return_entropy=True,
        eps_high=0.28,
        **loss_kwargs(loss_type, T),
    )
    expected = run(fused_linear_grpo_loss_reference, batch, **kw)
    no_skip = dataclasses.replace(SMALL, skip_zero_advantage=False)
    full = run(fused_linear_grpo_loss, batch, backend=backend, config=no_skip, **kw)
    zero_rows = batch["adv"] == 0
    poisoned_batch = dict(batch, hidden=torch.where(zero_rows[:, None, None], float("nan"), batch["hidden"]))
    skipped = run(fused_linear_grpo_loss, poisoned_batch, backend=backend, config=SMALL, **kw)

    live_metrics = ("clip_low_frac", "clip_high_frac", "dual_clip_frac", "tokens")
    assert_matches(full, expected, f"{backend} without skipping", metrics=METRICS[:-1])
    assert_matches(skipped, expected, f"{backend} skipping", metrics=live_metrics + ("tokens_skipped",))
    n_skipped = float(batch["mask"][zero_rows].sum())
    assert n_skipped > 0 and float(skipped[2].tokens_skipped) == n_skipped and float(full[2].tokens_skipped) == 0
    assert (skipped[1][0][zero_rows] == 0).all()
    # mean ratio / KL / entropy: over the evaluated tokens, i.e. the reference's with the skipped rows masked out
    live = dict(batch, mask=batch["mask"] & ~zero_rows[:, None])
    live_ref = run(fused_linear_grpo_loss_reference, live, **kw)[2]
    for key in ("mean_ratio", "mean_kl", "mean_entropy"):
        assert_close(getattr(skipped[2], key), getattr(live_ref, key), rtol=RTOL, name=f"skipped {key}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("importance_sampling", sorted(IS_LEVELS))
def test_on_policy_without_reference(importance_sampling, backend, device, generator):
    """old_logp=None (ratio 1, gradient A * grad logp) and no ref_logp at beta = 0: no KL metric."""
    batch = draw(5, 10, 12, 29, generator, device)
    kw = dict(with_old=False, with_ref=False, loss_type="grpo", importance_sampling=importance_sampling)
    out = run(fused_linear_grpo_loss, batch, backend=backend, config=SMALL, **kw)
    assert_matches(out, run(fused_linear_grpo_loss_reference, batch, **kw), backend)
    assert out[2].mean_kl is None and out[2].mean_entropy is None
    torch.testing.assert_close(out[2].mean_ratio.cpu(), torch.tensor(1.0), rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------------------------------------
# Shapes, masks, temperature, precision
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1, 63, 8, 37), (3, 1, 8, 1), (2, 9, 5, 70)])
def test_odd_shapes(shape, backend, device, generator):
    """B = 1, T = 63; T = 1 with V = 1 (logp = 0 exactly); V = 70, not a multiple of the 16-column step (SMALL)."""
    B, T, D, V = shape
    batch = draw(B, T, D, V, generator, device)
    for level in IS_LEVELS:
        kw = dict(beta=0.1, importance_sampling=level, loss_type="grpo", return_entropy=True)
        expected = run(fused_linear_grpo_loss_reference, batch, **kw)
        assert_matches(run(fused_linear_grpo_loss, batch, backend=backend, config=SMALL, **kw), expected, str(shape))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", sorted(LOSS_TYPES))
def test_all_masked_gives_zero_loss_and_gradients(loss_type, backend, device, generator):
    """An all-zero mask: loss 0, zero gradients, zero metrics, never NaN (the hidden states are all NaN here)."""
    batch = draw(4, 7, 8, 19, generator, device)
    batch["mask"] = torch.zeros_like(batch["mask"])
    batch["hidden"] = torch.full_like(batch["hidden"], float("nan"))
    for level in IS_LEVELS:
        loss, (dh, dw, db), m = run(
            fused_linear_grpo_loss,
            batch,
            beta=0.1,
            importance_sampling=level,
            loss_type=loss_type,
            backend=backend,
            config=SMALL,
            return_entropy=True,
            **loss_kwargs(loss_type, 7),
        )
        assert float(loss) == 0.0 and (dh == 0).all() and (dw == 0).all() and (db == 0).all()
        assert float(m.tokens) == 0 and float(m.mean_ratio) == 0 and float(m.mean_kl) == 0
        assert float(m.mean_entropy) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_untargeted_tokens_that_count_are_refused(backend, device, generator):
    """mask != 0 where the target is -100: such a token had logp = 0 by convention and entered the loss and
    its normaliser as a token predicted with certainty. The reference and the op now refuse it, naming the
    (row, position) pairs; with mask 0 there the same targets are padding and pass."""
    batch = draw(4, 10, 8, 23, generator, device, nan_padding=False)
    batch["mask"] = batch["mask"].clone()
    batch["mask"][0, 1] = batch["mask"][2, 0] = True
    batch["targets"] = batch["targets"].clone()
    batch["targets"][0, 1] = batch["targets"][2, 0] = IGNORE_INDEX
    kw = dict(beta=0.1, return_entropy=True, loss_type="grpo", importance_sampling="sequence")
    pattern = r"ignore index -100 \(padding\) at 2 \(row, position\) where mask != 0: \(0, 1\), \(2, 0\)"
    with pytest.raises(ValueError, match=pattern):
        run(fused_linear_grpo_loss_reference, batch, **kw)
    with pytest.raises(ValueError, match=pattern):
        run(fused_linear_grpo_loss, batch, backend=backend, config=SMALL, **kw)
    batch["mask"][0, 1] = batch["mask"][2, 0] = False
    assert_matches(
        run(fused_linear_grpo_loss, batch, backend=backend, config=SMALL, **kw),
        run(fused_linear_grpo_loss_reference, batch, **kw),
        backend,
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_or_positive_old_and_ref_logp_are_refused_where_counted(backend, device, generator):
    """Under mask != 0, old_logp = -inf used to give loss inf (negative advantage), ref_logp NaN gave NaN
    gradients, -inf loss inf, and +5 was accepted (beta > 0). The reference and the op refuse each by name and
    (row, position); the same values on padding pass, and so does ref_logp's at beta = 0 (only mean_kl reads it)."""
    batch = draw(4, 10, 8, 23, generator, device, nan_padding=False)
    counted = batch["mask"].nonzero()[-1].tolist()  # a counted token of the last row (negative advantage below)
    padding = (~batch["mask"]).nonzero()[0].tolist()
    batch["adv"] = -batch["adv"].abs() - 0.5
    kw = dict(beta=0.1, loss_type="grpo", config=SMALL)
    for field, name, value in (
        ("old", "old_logp", -math.inf),
        ("ref", "ref_logp", math.nan),
        ("ref", "ref_logp", -math.inf),
        ("ref", "ref_logp", 5.0),
    ):
        bad = dict(batch, **{field: _with(batch[field], *counted, value)})
        pattern = rf"{name} must be a finite log-probability .* got 1 such tokens: {name}\[{counted[0]}, {counted[1]}\]"
        with pytest.raises(ValueError, match=pattern):
            run(fused_linear_grpo_loss_reference, bad, beta=0.1, loss_type="grpo")
        with pytest.raises(ValueError, match=pattern):
            run(fused_linear_grpo_loss, bad, backend=backend, **kw)
        padded = dict(batch, **{field: _with(batch[field], *padding, value)})
        loss = run(fused_linear_grpo_loss, padded, backend=backend, **kw)[0]
        assert torch.isfinite(loss), f"{name} = {value} on padding"
    at_beta_0 = dict(batch, ref=_with(batch["ref"], *counted, 5.0))  # not a log-prob, but unused by the loss
    loss, _, metrics = run(fused_linear_grpo_loss, at_beta_0, backend=backend, beta=0.0, loss_type="grpo", config=SMALL)
    assert torch.isfinite(loss) and metrics.mean_kl is not None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [0.35, 1.0, 1.8])
@pytest.mark.parametrize("with_bias", [False, True])
def test_temperature_and_bias(with_bias, temperature, backend, device, generator):
    batch = draw(4, 9, 8, 31, generator, device, bias=with_bias)
    kw = dict(beta=0.05, temperature=temperature, loss_type="bnpo", return_entropy=True)
    expected = run(fused_linear_grpo_loss_reference, batch, **kw)
    assert_matches(run(fused_linear_grpo_loss, batch, backend=backend, config=SMALL, **kw), expected, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fractional_mask_weights(backend, device, generator):
    """A float mask acts as per-token weights, including completions weighing less than one token in all."""
    batch = draw(5, 10, 8, 23, generator, device, nan_padding=False)
    weights = torch.rand(5, 10, generator=generator).to(device) * batch["mask"]
    weights[4] = 0.0
    weights[4, :2] = torch.tensor([0.3, 0.25])
    batch["mask"] = weights
    batch["targets"] = torch.where(weights != 0, batch["targets"].clamp(min=0), IGNORE_INDEX)
    for level, loss_type in itertools.product(IS_LEVELS, ("grpo", "dapo")):
        kw = dict(beta=0.1, loss_type=loss_type, importance_sampling=level)
        expected = run(fused_linear_grpo_loss_reference, batch, **kw)
        assert_matches(run(fused_linear_grpo_loss, batch, backend=backend, config=SMALL, **kw), expected, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(dtype, backend, device, generator):
    """bf16 / fp16 hidden, weight and bias: error against the fp64 reference (on the same rounded inputs) at most twice
    that of plain PyTorch in that dtype (matmul, log_softmax, gather, then the loss), for the loss and every
    gradient."""
    batch = draw(4, 16, 32, 300, generator, device, dtype=dtype, nan_padding=False)
    kw = dict(beta=0.04, loss_type="dapo", eps_high=0.28)
    loss, grads, _ = run(fused_linear_grpo_loss, batch, backend=backend, config=SMALL, **kw)
    ref_loss, ref_grads, _ = run(fused_linear_grpo_loss_reference, batch, **kw)

    def plain(hidden, weight, targets, mask, adv, *, bias, old_logp, ref_logp, temperature, **opts):
        logits = (hidden @ weight.t() + bias) / temperature
        logp = torch.log_softmax(logits, dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return grpo_loss_reference(logp, old_logp, ref_logp, adv, mask, objective=PolicyObjective(**opts))

    plain_loss, plain_grads, _ = run(plain, batch, **kw)
    assert loss.dtype == torch.float32
    assert_low_precision_close(loss, ref_loss, plain_loss, atol=1e-6, name="loss")
    for what, g, e, p in zip(("hidden", "weight", "bias"), grads, ref_grads, plain_grads):
        assert g.dtype == dtype
        assert_low_precision_close(g, e, p, atol=1e-4, name=f"d/d {what}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp64_gradcheck(backend, device, generator):
    """The closed-form gradients against finite differences of our own forward (float64, several chunks)."""
    batch = draw(3, 5, 3, 7, generator, device, dtype=torch.float64, nan_padding=False)
    config = FusedLinearGrpoConfig(chunk_tokens=3, grad_tokens=6, block_v=4)
    for level in IS_LEVELS:
        kw = dict(
            beta=0.3,
            eps_high=0.28,
            dual_clip=2.0,
            loss_type="grpo",
            importance_sampling=level,
            temperature=0.8,
            backend=backend,
            config=config,
        )

        def f(h, w, b, kw=kw):
            return fused_linear_grpo_loss(
                h,
                w,
                batch["targets"],
                batch["mask"],
                batch["adv"].double(),
                bias=b,
                old_logp=batch["old"],
                ref_logp=batch["ref"],
                **kw,
            )[0]

        params = tuple(batch[k].clone().requires_grad_(True) for k in ("hidden", "weight", "bias"))
        assert f(*params).dtype == torch.float64
        assert torch.autograd.gradcheck(f, params, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


# --------------------------------------------------------------------------------------------------------------------
# Autograd plumbing, buffers
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_partial_gradients_and_grad_output(backend, device, generator):
    """A frozen head (only hidden needs a gradient), a frozen trunk (only weight), no gradient at all, and a
    grad_output != 1 (the loss scaled before backward)."""
    batch = draw(4, 8, 8, 19, generator, device)
    kw = dict(
        beta=0.05,
        old_logp=batch["old"],
        ref_logp=batch["ref"],
        bias=batch["bias"],
        backend=backend,
        config=SMALL,
        temperature=TEMPERATURE,
    )
    args = (batch["targets"], batch["mask"], batch["adv"])
    full = run(fused_linear_grpo_loss, batch, beta=0.05, backend=backend, config=SMALL)
    h = batch["hidden"].clone().requires_grad_(True)
    loss, _ = fused_linear_grpo_loss(h, batch["weight"], *args, **kw)
    (dh,) = torch.autograd.grad(3.0 * loss, (h,))
    assert_close(dh, 3.0 * full[1][0], rtol=1e-6, name="d/d hidden x 3")
    w = batch["weight"].clone().requires_grad_(True)
    loss, _ = fused_linear_grpo_loss(batch["hidden"], w, *args, **kw)
    (dw,) = torch.autograd.grad(loss, (w,))
    assert_close(dw, full[1][1], rtol=1e-6, name="d/d weight alone")
    with torch.no_grad():
        loss, _m = fused_linear_grpo_loss(batch["hidden"], batch["weight"], *args, **kw)
    assert not loss.requires_grad
    assert_close(loss, full[0], rtol=1e-6, name="no-grad loss")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_poisoned_buffers(backend, dtype, device, generator):
    """Every buffer the op allocates itself starts as NaN: any element read before it is written would show up."""
    config = FusedLinearGrpoConfig(chunk_tokens=8, grad_tokens=16, block_v=16, empty=poisoned)
    batch = draw(5, 11, 12, 29, generator, device, dtype=dtype)
    for level, entropy in zip(sorted(IS_LEVELS), (True, False)):  # with and without the entropy's extra scratch
        kw = dict(beta=0.1, loss_type="grpo", importance_sampling=level, return_entropy=entropy)
        loss, grads, m = run(fused_linear_grpo_loss, batch, backend=backend, config=config, **kw)
        _ref_loss, ref_grads, _ = run(fused_linear_grpo_loss_reference, batch, **kw)
        for name, x in (("loss", loss), ("ratio", m.mean_ratio), ("dh", grads[0]), ("dw", grads[1]), ("db", grads[2])):
            assert_all_written(x, name)
        assert entropy == (m.mean_entropy is not None)
        tol = RTOL if dtype == torch.float32 else 2e-2
        for name, x, e in zip(("dh", "dw", "db"), grads, ref_grads):
            assert_close(x, e, rtol=tol, name=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_buffers_stay_chunk_sized(backend, device, generator):
    """Record every buffer the op allocates: none holds as many elements as the (N, V) logits."""
    sizes = []

    def recording_empty(shape, dtype, device):
        sizes.append(math.prod(shape))
        return torch.empty(shape, dtype=dtype, device=device)

    B, T, D, V = 4, 24, 8, 160
    batch = draw(B, T, D, V, generator, device)
    config = FusedLinearGrpoConfig(chunk_tokens=16, grad_tokens=32, empty=recording_empty)
    for level in IS_LEVELS:
        run(fused_linear_grpo_loss, batch, beta=0.1, importance_sampling=level, backend=backend, config=config)
    assert sizes and max(sizes) <= max(V * D, 32 * V) < B * T * V, sorted(sizes)[-5:]


def test_row_kernels_one_row_per_program(device, generator):
    """The GPU's launch configuration (one row per program) through the interpreter too."""
    batch = draw(3, 7, 8, 41, generator, device)
    config = FusedLinearGrpoConfig(chunk_tokens=6, block_v=16, block_rows=1)
    kw = dict(beta=0.1, return_entropy=True, importance_sampling="sequence")
    out = run(fused_linear_grpo_loss, batch, backend="triton", config=config, **kw)
    assert_matches(out, run(fused_linear_grpo_loss_reference, batch, **kw), "one row per program")


# --------------------------------------------------------------------------------------------------------------------
# Chunk planning and budgets
# --------------------------------------------------------------------------------------------------------------------


def _plan_with_counts(counts):
    n = sum(counts)
    empty = torch.zeros(n, dtype=torch.long)
    return _Plan(
        index=empty,
        rows=empty,
        targets=empty,
        w=empty.float(),
        old=None,
        ref=None,
        row_weight=torch.zeros(len(counts)),
        tokens=torch.zeros(()),
        skipped=torch.zeros(()),
        counts=list(counts),
        any_untargeted=False,
    )


def test_gspo_chunks_hold_whole_completions():
    """GSPO: completions are packed whole (finalised in their chunk); longer ones are split and pre-passed."""
    plan = _plan_with_counts([3, 0, 4, 9, 2, 2, 5, 0])
    chunks, prepass = _chunks(plan, 5, sequence=True)
    assert chunks == [(0, 3, (0, 1)), (3, 7, (2, 3)), (7, 12, None), (12, 16, None), (16, 20, (4, 6)), (20, 25, (6, 7))]
    assert prepass == [(3, 7, 16)]
    token_chunks, none = _chunks(plan, 5, sequence=False)
    assert token_chunks == [(i, min(i + 5, 25), None) for i in range(0, 25, 5)] and none == []


def test_default_chunk_budgets():
    """CPU: 128 MiB of fp32 logits per chunk; GPU (Triton): 256 MiB of logits, and a 1 GiB bf16 dz buffer whose rows
    (the K of each dweight GEMM) are a multiple of the chunk's."""
    default = FusedLinearGrpoConfig()
    rows, grad = _chunk_sizes(default, 4096, 49152, torch.device("cpu"), "torch", 4)
    assert (rows, grad) == (640, 640) and rows * 49152 * 4 <= 128 << 20
    rows, grad = _chunk_sizes(default, 16384, 151936, torch.device("cuda"), "triton", 2)
    assert rows == 384 and grad % rows == 0 and grad * 151936 * 2 <= 1 << 30 and grad >= 8 * rows
    assert _chunk_sizes(default, 10, 151936, torch.device("cuda"), "triton", 2) == (10, 10)


# --------------------------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------------------------


def _with(x: torch.Tensor, row: int, position: int, value) -> torch.Tensor:
    """A copy of ``x`` with ``x[row, position] = value``."""
    x = x.clone()
    x[row, position] = value
    return x


def _bad_calls(device):
    B, T, D, V = 3, 5, 4, 11
    good = dict(
        hidden=torch.randn(B, T, D, device=device),
        weight=torch.randn(V, D, device=device),
        targets=torch.randint(0, V, (B, T), device=device),
        mask=torch.ones(B, T, device=device),
        advantages=torch.randn(B, device=device),
    )

    def call(**change):
        args = {**good, **change}
        positional = [args.pop(k) for k in ("hidden", "weight", "targets", "mask", "advantages")]
        args.setdefault("backend", "torch")
        return lambda: fused_linear_grpo_loss(*positional, **args)

    return [
        (
            "old shape",
            call(old_logp=torch.zeros(B, T + 1, device=device)),
            ValueError,
            r"old_logp must be \(B, T\) = \(3, 5\) like hidden, got torch.Size\(\[3, 6\]\)",
        ),
        ("ref shape", call(ref_logp=torch.zeros(B + 1, T, device=device)), ValueError, r"ref_logp must be \(B, T\)"),
        ("mask shape", call(mask=torch.ones(B, T - 1, device=device)), ValueError, r"mask must be \(B, T\)"),
        (
            "targets shape",
            call(targets=torch.zeros(B, T + 2, dtype=torch.long, device=device)),
            ValueError,
            r"targets must be \(B, T\) = \(3, 5\)",
        ),
        (
            "advantages shape",
            call(advantages=torch.zeros(B, 1, device=device)),
            ValueError,
            r"advantages must be \(B,\) = \(3,\)",
        ),
        ("hidden 2-D", call(hidden=torch.randn(B * T, D, device=device)), ValueError, r"hidden must be \(B, T, D\)"),
        (  # refused: NaN mask weights, NaN / positive old_logp where the mask counts, ignore-index targets there
            "NaN mask weight",
            call(mask=_with(torch.ones(B, T, device=device), 1, 2, math.nan)),
            ValueError,
            r"mask weights must be >= 0, got 0 negative \(min .*\) and 1 NaN/inf .* mask\[1, 2\] = nan",
        ),
        (
            "NaN old_logp",
            call(old_logp=_with(-torch.ones(B, T, device=device), 2, 4, math.nan)),
            ValueError,
            r"old_logp must be a finite log-probability \(<= 0.0001, not NaN or -inf\) .* got 1 such tokens: "
            r"old_logp\[2, 4\] = nan",
        ),
        (
            "positive old_logp",
            call(old_logp=_with(-torch.ones(B, T, device=device), 0, 3, 0.5)),
            ValueError,
            r"old_logp must be a finite log-probability .* old_logp\[0, 3\] = 0.5",
        ),
        (  # refused: -inf old_logp used to give loss inf (negative advantage); ref_logp NaN / -inf / positive at
            # beta > 0 gave NaN gradients, loss inf, or was accepted
            "-inf old_logp",
            call(old_logp=_with(-torch.ones(B, T, device=device), 1, 2, -math.inf)),
            ValueError,
            r"old_logp must be a finite log-probability .* got 1 such tokens: old_logp\[1, 2\] = -inf",
        ),
        (
            "NaN ref_logp",
            call(ref_logp=_with(-torch.ones(B, T, device=device), 0, 4, math.nan), beta=0.1),
            ValueError,
            r"ref_logp must be a finite log-probability \(<= 0.0001, not NaN or -inf\) at every token with "
            r"mask != 0, got 1 such tokens: ref_logp\[0, 4\] = nan",
        ),
        (
            "-inf ref_logp",
            call(ref_logp=_with(-torch.ones(B, T, device=device), 2, 1, -math.inf), beta=0.1),
            ValueError,
            r"ref_logp\[2, 1\] = -inf",
        ),
        (
            "positive ref_logp",
            call(ref_logp=_with(-torch.ones(B, T, device=device), 1, 1, 5.0), beta=0.1),
            ValueError,
            r"got 1 such tokens: ref_logp\[1, 1\] = 5",
        ),
        (
            "ignore-index target under mask 1",
            call(targets=_with(good["targets"], 1, 0, IGNORE_INDEX)),
            ValueError,
            r"targets hold the ignore index -100 \(padding\) at 1 \(row, position\) where mask != 0: \(1, 0\)",
        ),
        ("D mismatch", call(weight=torch.randn(V, D + 1, device=device)), ValueError, r"weight must be \(V, D\)"),
        (
            "target out of range",
            call(targets=torch.full((B, T), V, device=device)),
            ValueError,
            r"targets must be in \[0, V=11\) or -100",
        ),
        ("float targets", call(targets=torch.zeros(B, T, device=device)), TypeError, "integer tensor of token ids"),
        ("beta without ref", call(beta=0.04), ValueError, r"beta=0.04 > 0 needs ref_logp"),
        (
            "unknown loss type",
            call(loss_type="ppo"),
            ValueError,
            r"unknown loss_type 'ppo'; valid loss types: \['bnpo', 'dapo', 'dr_grpo', 'grpo'\]",
        ),
        ("unknown kl", call(kl="k4"), ValueError, r"unknown kl 'k4'; valid KL estimators"),
        ("unknown level", call(importance_sampling="seq"), ValueError, r"unknown importance_sampling 'seq'"),
        ("num_items 0", call(num_items=0), ValueError, r"num_items must be > 0"),
        ("dr_grpo without L", call(loss_type="dr_grpo"), ValueError, r"needs max_completion_length"),
        ("temperature", call(temperature=0.0), ValueError, "temperature must be a positive number"),
        (
            "dtype mismatch",
            call(weight=torch.randn(V, D, device=device, dtype=torch.float64)),
            TypeError,
            "hidden and weight must share a dtype",
        ),
        ("bias shape", call(bias=torch.randn(V + 1, device=device)), ValueError, r"bias must be \(V,\)"),
        ("weight device", call(weight=torch.empty(V, D, device="meta")), ValueError, "weight is on meta"),
        (
            "empty vocabulary",
            call(
                weight=torch.randn(0, D, device=device),
                targets=torch.full((B, T), -100, device=device),
                mask=torch.zeros(B, T, device=device),  # padding everywhere: no ignore-index target counts
            ),
            ValueError,
            "V >= 1",
        ),
        ("return_entropy", call(return_entropy=1), TypeError, "return_entropy must be a bool"),
        ("config type", call(config={"chunk_tokens": 4}), TypeError, "config must be a FusedLinearGrpoConfig"),
        ("backend", call(backend="tpu"), ValueError, "backend must be one of"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls("cpu"))), ids=[c[0] for c in _bad_calls("cpu")])
def test_bad_input_raises_clear_errors(case, device):
    _, fn, exc, pattern = _bad_calls(device)[case]
    with pytest.raises(exc, match=pattern):
        fn()


def test_bad_config_raises():
    with pytest.raises(ValueError, match="chunk_tokens must be a positive int"):
        FusedLinearGrpoConfig(chunk_tokens=0)
    with pytest.raises(ValueError, match="block_v must be a power of two"):
        FusedLinearGrpoConfig(block_v=24)
    with pytest.raises(TypeError, match="skip_zero_advantage must be a bool"):
        FusedLinearGrpoConfig(skip_zero_advantage=1)


# --------------------------------------------------------------------------------------------------------------------
# Parity with Liger-Kernel's LigerFusedLinearGRPOLoss (pure-PyTorch chunks, runs on the CPU)
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("importance_sampling", sorted(IS_LEVELS))
@pytest.mark.parametrize("loss_type", sorted(LOSS_TYPES))
def test_parity_with_liger(loss_type, importance_sampling, beta, device, generator):
    """Same loss, d/d hidden, d/d weight, d/d bias, KL and clip metrics as LigerFusedLinearGRPOLoss (compiled=False;
    use_ref_model=True whenever beta > 0, since with False it silently drops the KL term). The draw holds a
    zero-advantage completion, which at beta = 0 we skip and Liger computes."""
    liger_grpo = pytest.importorskip("liger_kernel.chunked_loss.grpo_loss")
    B, T, D, V = 4, 12, 16, 37
    batch = draw(B, T, D, V, generator, device, nan_padding=False)
    targets = torch.where(batch["mask"], batch["targets"], 0)  # Liger gathers at every position
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
        temperature=TEMPERATURE,
    )
    params = [batch[k].clone().requires_grad_(True) for k in ("hidden", "weight", "bias")]
    liger_loss, liger_metrics = liger(
        params[0],
        params[1],
        targets,
        batch["mask"].long(),
        batch["adv"],
        bias=params[2],
        ref_per_token_logps=batch["ref"],
        old_per_token_logps=batch["old"],
    )
    liger_grads = torch.autograd.grad(liger_loss, params)
    opts = dict(
        beta=beta,
        eps_high=0.28,
        loss_type=loss_type,
        importance_sampling=importance_sampling,
        with_ref=beta > 0,
        **({"max_completion_length": L} if loss_type == "dr_grpo" else {}),
    )
    for backend in BACKENDS:
        loss, grads, m = run(
            fused_linear_grpo_loss, dict(batch, targets=targets), backend=backend, config=CONFIGS[backend], **opts
        )
        assert_close(loss, liger_loss, rtol=2e-5, atol=1e-6, name=f"{backend} loss vs Liger")
        for what, g, lg in zip(("hidden", "weight", "bias"), grads, liger_grads):
            assert_close(g, lg, rtol=2e-5, atol=1e-8, name=f"{backend} d/d {what} vs Liger")
        assert_close(m.clip_low_frac + m.clip_high_frac, liger_metrics[-1], rtol=1e-5, atol=1e-7, name="clip")
        if beta > 0:
            assert_close(m.mean_kl, liger_metrics[0], rtol=2e-5, atol=1e-8, name=f"{backend} KL vs Liger")
