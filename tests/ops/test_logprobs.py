"""token_logprobs / logprobs_from_logits: the Triton kernels (interpreted on the CPU) and the chunked torch path against
the float64 reference, plus TRL's implementations where they apply."""

from __future__ import annotations

import math

import pytest
import torch

from rlvr_fast.backends import BackendUnavailableError
from rlvr_fast.ops.logprobs import (
    LogprobsConfig,
    LogprobsFromLogitsFunction,
    TokenLogprobsFunction,
    logprobs_from_logits,
    token_logprobs,
)
from rlvr_fast.ops.logprobs_reference import logprobs_from_logits_reference, token_logprobs_reference
from rlvr_fast.testing import assert_all_written, assert_close, assert_low_precision_close, poisoned

BACKENDS = ["triton", "torch"]
IGNORE = -100
# Small chunks so that every chunk, split and tile boundary is crossed by shapes the interpreter runs quickly:
# torch path 40 x 96 logits per GEMM; Triton forward in 3 vocabulary splits, backward in 160-column chunks (not a
# multiple of the interpreted BLOCK_V = 64), logits kernels 64 columns per step.
SMALL = LogprobsConfig(tokens=40, vocab=96, splits=3, dz_chunk=160, block_v=64)
DEFAULT = LogprobsConfig()
SPLITS16 = LogprobsConfig(splits=16)  # one 64-column split per interpreted program: a wide merge
# 256-column steps for V = 1000 keep the interpreted backward grid small; SMALL (64) crosses step boundaries at 65/129.
WIDE = LogprobsConfig(tokens=40, vocab=96, block_v=256)
CONFIG_IDS = {id(DEFAULT): "default", id(SMALL): "small", id(SPLITS16): "splits16", id(WIDE): "wide"}
FP32_RTOL = 1e-5  # relative RMS error of an fp32 path against the fp64 reference


def make_inputs(n, d, v, gen, device, *, dtype=torch.float32, bias=True, n_ignored=0, logit_scale=2.0):
    """Fresh draws: logits with std ~ logit_scale, a bias, targets in [0, v) with n_ignored rows set to IGNORE."""
    hidden = torch.randn(n, d, generator=gen)
    weight = torch.randn(v, d, generator=gen) * (logit_scale / math.sqrt(d))
    b = torch.randn(v, generator=gen) * 0.5 if bias else None
    targets = torch.randint(0, v, (n,), generator=gen)
    if n_ignored:
        targets[torch.randperm(n, generator=gen)[:n_ignored]] = IGNORE
    leaf = lambda x: None if x is None else x.to(device=device, dtype=dtype).requires_grad_()  # noqa: E731
    return leaf(hidden), leaf(weight), leaf(b), targets.to(device)


def upstream(n, gen, device):
    """Random upstream gradients for logp and entropy (a loss that weights both)."""
    return torch.randn(n, generator=gen).to(device), torch.randn(n, generator=gen).to(device)


def grads_of(outputs, weights, inputs):
    loss = sum((o.float() * w).sum() for o, w in zip(outputs, weights))
    present = [x for x in inputs if x is not None]
    got = iter(torch.autograd.grad(loss, present))
    return [None if x is None else next(got) for x in inputs]


def check_ranges(logp, entropy=None):
    assert (logp <= 0).all(), f"logp > 0 at {(logp > 0).nonzero()[:5].tolist()}: max {logp.max().item()}"
    if entropy is not None:
        assert (entropy >= 0).all(), f"entropy < 0 at {(entropy < 0).nonzero()[:5].tolist()}"


def check_token_against_reference(
    hidden,
    weight,
    bias,
    targets,
    gen,
    *,
    backend,
    config,
    temperature=1.0,
    rtol=FP32_RTOL,
    grad_rtol=2 * FP32_RTOL,
    **kw,
):
    g_logp, g_ent = upstream(targets.numel(), gen, targets.device)
    g_logp, g_ent = g_logp.reshape(targets.shape), g_ent.reshape(targets.shape)
    logp, ent = token_logprobs(
        hidden,
        weight,
        targets,
        bias=bias,
        temperature=temperature,
        return_entropy=True,
        backend=backend,
        config=config,
        **kw,
    )
    assert logp.dtype == torch.float32 and ent.dtype == torch.float32
    assert logp.shape == targets.shape and ent.shape == targets.shape
    ref_logp, ref_ent = token_logprobs_reference(
        hidden, weight, targets, bias=bias, temperature=temperature, return_entropy=True, **kw
    )
    assert_close(logp, ref_logp, rtol=rtol, name=f"{backend} logp")
    assert_close(ent, ref_ent, rtol=rtol, name=f"{backend} entropy")
    check_ranges(logp, ent)
    inputs = (hidden, weight, bias)
    ours = grads_of((logp, ent), (g_logp, g_ent), inputs)
    ref = grads_of((ref_logp, ref_ent), (g_logp, g_ent), inputs)
    for name, x, a, e in zip(("dhidden", "dweight", "dbias"), inputs, ours, ref):
        if x is not None:
            assert a.dtype == x.dtype and a.shape == x.shape
            assert_close(a, e, rtol=grad_rtol, name=f"{backend} {name}")
    return logp, ent, ours


# --------------------------------------------------------------------------------------------------------------------
# token_logprobs against the fp64 reference
# --------------------------------------------------------------------------------------------------------------------

# (N, V, config): N in {1, 63, 130}; V = 1, 1000 and sizes either side of the interpreted BLOCK_V (64), of the SMALL
# torch vocabulary chunk (96) and Triton split granule (64 / 192 / 384).
TOKEN_SHAPES = [
    (1, 1, DEFAULT),
    (63, 1000, DEFAULT),
    (130, 65, DEFAULT),
    (130, 63, SMALL),
    (63, 97, SMALL),
    (1, 129, SMALL),
    (130, 1000, SMALL),
    (63, 385, SMALL),
    (63, 1000, SPLITS16),
]


@pytest.mark.parametrize("n,v,config", TOKEN_SHAPES, ids=lambda x: CONFIG_IDS.get(id(x)))
@pytest.mark.parametrize("backend", BACKENDS)
def test_token_logprobs_matches_reference(backend, n, v, config, device, generator):
    hidden, weight, bias, targets = make_inputs(n, 40, v, generator, device, n_ignored=n // 10)
    check_token_against_reference(
        hidden, weight, bias, targets, generator, backend=backend, config=config, temperature=0.7
    )


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.45, 1.6])
@pytest.mark.parametrize("backend", BACKENDS)
def test_token_logprobs_bias_and_temperature(backend, temperature, with_bias, device, generator):
    hidden, weight, bias, targets = make_inputs(50, 24, 300, generator, device, bias=with_bias)
    check_token_against_reference(
        hidden, weight, bias, targets, generator, backend=backend, config=SMALL, temperature=temperature
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_logprobs_3d_inputs(backend, device, generator):
    hidden, weight, bias, targets = make_inputs(2 * 33, 16, 200, generator, device, n_ignored=9)
    hidden3 = hidden.detach().reshape(2, 33, 16).requires_grad_()
    check_token_against_reference(
        hidden3, weight, bias, targets.reshape(2, 33), generator, backend=backend, config=SMALL
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_logprobs_without_entropy(backend, device, generator):
    hidden, weight, bias, targets = make_inputs(37, 16, 150, generator, device)
    logp = token_logprobs(hidden, weight, targets, bias=bias, backend=backend, config=SMALL)
    assert isinstance(logp, torch.Tensor) and logp.shape == (37,)
    ref = token_logprobs_reference(hidden, weight, targets, bias=bias)
    assert_close(logp, ref, rtol=FP32_RTOL, name="logp")
    ours = torch.autograd.grad(logp.sum(), (hidden, weight, bias))
    expected = torch.autograd.grad(ref.sum(), (hidden, weight, bias))
    for a, e, name in zip(ours, expected, ("dhidden", "dweight", "dbias")):
        assert_close(a, e, rtol=2 * FP32_RTOL, name=name)


@pytest.mark.parametrize("which", ["entropy_only", "logp_only", "hidden_only", "weight_only"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_token_logprobs_partial_gradients(backend, which, device, generator):
    """Gradient through one output only (the other unused), or w.r.t. one input only (a frozen LM head)."""
    hidden, weight, bias, targets = make_inputs(45, 16, 130, generator, device, n_ignored=4)
    if which == "hidden_only":
        weight.requires_grad_(False)
        bias.requires_grad_(False)
    if which == "weight_only":
        hidden.requires_grad_(False)
    inputs = [x for x in (hidden, weight, bias) if x.requires_grad]
    logp, ent = token_logprobs(hidden, weight, targets, bias=bias, return_entropy=True, backend=backend, config=SMALL)
    ref_logp, ref_ent = token_logprobs_reference(hidden, weight, targets, bias=bias, return_entropy=True)
    losses = {"entropy_only": lambda a, b: b.sum(), "logp_only": lambda a, b: a.sum()}
    pick = losses.get(which, lambda a, b: (a - b).sum())
    ours = torch.autograd.grad(pick(logp, ent), inputs)
    expected = torch.autograd.grad(pick(ref_logp, ref_ent), inputs)
    for a, e in zip(ours, expected):
        assert_close(a, e, rtol=2 * FP32_RTOL, name=f"{which} gradient")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_token_logprobs_low_precision(backend, dtype, device, generator):
    """bf16 / fp16 inputs: error against the fp32 reference at most 2x that of plain PyTorch in the same dtype."""
    hidden, weight, bias, targets = make_inputs(70, 32, 500, generator, device, dtype=dtype, n_ignored=5)
    g_logp, g_ent = upstream(70, generator, device)
    inputs = (hidden, weight, bias)
    logp, ent = token_logprobs(
        hidden, weight, targets, bias=bias, temperature=0.8, return_entropy=True, backend=backend, config=SMALL
    )
    ours = grads_of((logp, ent), (g_logp, g_ent), inputs)
    ref = token_logprobs_reference(
        hidden, weight, targets, bias=bias, temperature=0.8, return_entropy=True, compute_dtype=torch.float32
    )
    ref_grads = grads_of(ref, (g_logp, g_ent), inputs)
    # plain PyTorch in the low precision: the naive path every baseline starts from
    keep = targets != IGNORE
    z = (hidden @ weight.t() + bias) / 0.8
    log_probs = torch.log_softmax(z, dim=-1)
    plain_logp = torch.where(keep, log_probs.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1), 0)
    plain_ent = torch.where(keep, -(log_probs.exp() * log_probs).sum(-1), 0)
    plain_grads = grads_of((plain_logp, plain_ent), (g_logp, g_ent), inputs)
    assert_low_precision_close(logp, ref[0], plain_logp, atol=1e-6, name="logp")
    assert_low_precision_close(ent, ref[1], plain_ent, atol=1e-6, name="entropy")
    for name, a, e, p in zip(("dhidden", "dweight", "dbias"), ours, ref_grads, plain_grads):
        assert a.dtype == dtype
        assert_low_precision_close(a, e, p, atol=1e-4, name=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_logprobs_large_logits_do_not_overflow(backend, device, generator):
    """|z| ~ 1e4: exp would overflow without the running max; logp stays <= 0, entropy >= 0, nothing inf or NaN."""
    hidden, weight, _bias, targets = make_inputs(40, 16, 300, generator, device, bias=False, logit_scale=1e4)
    logp, ent = token_logprobs(hidden, weight, targets, return_entropy=True, backend=backend, config=SMALL)
    ref_logp, ref_ent = token_logprobs_reference(hidden, weight, targets, return_entropy=True)
    assert float(ref_logp.detach().abs().max()) > 1e3
    assert torch.isfinite(logp).all() and torch.isfinite(ent).all()
    check_ranges(logp, ent)
    assert_close(logp, ref_logp, rtol=FP32_RTOL, name="logp")
    # the fp32 logits themselves carry ~1e-3 of rounding at this scale; near-one-hot rows have entropy ~ 0
    assert_close(ent, ref_ent, rtol=FP32_RTOL, atol=1e-2, name="entropy")
    grads = torch.autograd.grad((logp + ent).sum(), (hidden, weight))
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("ignore_index", [IGNORE, -1, 305])
@pytest.mark.parametrize("backend", BACKENDS)
def test_token_logprobs_ignored_rows(backend, ignore_index, device, generator):
    """Ignored rows: logp = entropy = 0 exactly, zero gradient, and a NaN in their hidden state reaches nothing."""
    hidden, weight, bias, targets = make_inputs(48, 16, 300, generator, device)
    ignored = torch.tensor([0, 5, 6, 47], device=device)
    targets[ignored] = ignore_index
    with torch.no_grad():
        hidden[ignored] = float("nan")
    logp, ent, (dh, dw, db) = check_token_against_reference(
        hidden, weight, bias, targets, generator, backend=backend, config=SMALL, ignore_index=ignore_index
    )
    assert (logp[ignored] == 0).all() and (ent[ignored] == 0).all()
    assert (dh[ignored] == 0).all()
    assert torch.isfinite(dw).all() and torch.isfinite(db).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_logprobs_all_rows_ignored(backend, device, generator):
    hidden, weight, bias, targets = make_inputs(6, 8, 20, generator, device)
    targets.fill_(IGNORE)
    logp, ent = token_logprobs(hidden, weight, targets, bias=bias, return_entropy=True, backend=backend)
    assert (logp == 0).all() and (ent == 0).all()
    dh, dw, db = torch.autograd.grad((logp + ent).sum(), (hidden, weight, bias))
    assert (dh == 0).all() and (dw == 0).all() and (db == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_logprobs_empty(backend, device, generator):
    _, weight, bias, _ = make_inputs(1, 8, 20, generator, device)
    for shape in [(0, 8), (3, 0, 8)]:
        hidden = torch.randn(shape, device=device, requires_grad=True)
        targets = torch.zeros(shape[:-1], dtype=torch.long, device=device)
        logp, ent = token_logprobs(hidden, weight, targets, bias=bias, return_entropy=True, backend=backend)
        assert logp.shape == shape[:-1] and ent.shape == shape[:-1] and logp.dtype == torch.float32
        dh, dw, db = torch.autograd.grad((logp.sum() + ent.sum()), (hidden, weight, bias), allow_unused=True)
        assert dh.shape == shape and (dw is None or (dw == 0).all()) and (db is None or (db == 0).all())


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # numpy, under the interpreter
@pytest.mark.parametrize("backend", BACKENDS)
def test_token_logprobs_nan_rows_stay_in_their_rows(backend, device, generator):
    hidden, weight, bias, targets = make_inputs(40, 16, 200, generator, device)
    with torch.no_grad():
        hidden[[3, 17]] = float("nan")
        hidden[25, 2] = float("nan")
    logp, ent = token_logprobs(hidden, weight, targets, bias=bias, return_entropy=True, backend=backend, config=SMALL)
    ref_logp, ref_ent = token_logprobs_reference(hidden, weight, targets, bias=bias, return_entropy=True)
    nan_rows = torch.zeros(40, dtype=torch.bool, device=device)
    nan_rows[[3, 17, 25]] = True
    assert torch.isnan(logp[nan_rows]).all() and torch.isnan(ent[nan_rows]).all()
    assert_close(logp, ref_logp, rtol=FP32_RTOL, name="logp")  # NaN parity + the other rows
    assert_close(ent, ref_ent, rtol=FP32_RTOL, name="entropy")
    (dh,) = torch.autograd.grad(logp.nansum() + ent.nansum(), (hidden,))
    assert torch.isfinite(dh[~nan_rows]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_logprobs_under_autocast(backend, device, generator):
    """fp32 weights with autocast on: the matmul runs in the autocast dtype, gradients come back in fp32."""
    hidden, weight, bias, targets = make_inputs(33, 16, 120, generator, device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        logp = token_logprobs(hidden, weight, targets, bias=bias, backend=backend, config=SMALL)
    dh, dw = torch.autograd.grad(logp.sum(), (hidden, weight))
    assert dh.dtype == torch.float32 and dw.dtype == torch.float32
    h16, w16 = (x.detach().bfloat16().requires_grad_() for x in (hidden, weight))
    expected = token_logprobs(h16, w16, targets, bias=bias.detach(), backend=backend, config=SMALL)
    assert_close(logp, expected, rtol=1e-6, name="logp under autocast")
    e_dh, e_dw = torch.autograd.grad(expected.sum(), (h16, w16))
    assert_close(dh, e_dh.float(), rtol=1e-6, name="dhidden under autocast")
    assert_close(dw, e_dw.float(), rtol=1e-6, name="dweight under autocast")


# --------------------------------------------------------------------------------------------------------------------
# fp64 gradcheck (the autograd Functions, both backends, several chunks and splits)
# --------------------------------------------------------------------------------------------------------------------

TINY = LogprobsConfig(tokens=2, vocab=3, splits=2, dz_chunk=3, block_v=16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_logprobs_gradcheck_fp64(backend, device, generator):
    hidden, weight, bias, targets = make_inputs(5, 3, 7, generator, device, dtype=torch.float64)

    def fn(h, w, b):
        return TokenLogprobsFunction.apply(h, w, b, targets, 1 / 0.8, True, backend, TINY)

    assert torch.autograd.gradcheck(fn, (hidden, weight, bias), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_logprobs_from_logits_gradcheck_fp64(backend, device, generator):
    logits = (torch.randn(3, 11, generator=generator, dtype=torch.float64) * 2).to(device).requires_grad_()
    targets = torch.randint(0, 11, (3,), generator=generator).to(device)
    targets[1] = IGNORE
    config = LogprobsConfig(tokens=1, vocab=11, block_v=8)  # one row per torch chunk, two kernel steps per row

    def fn(z):
        return LogprobsFromLogitsFunction.apply(z, targets, 1 / 1.3, IGNORE, True, backend, config)

    assert torch.autograd.gradcheck(fn, (logits,), eps=1e-6, atol=1e-7)


# --------------------------------------------------------------------------------------------------------------------
# logprobs_from_logits
# --------------------------------------------------------------------------------------------------------------------

LOGITS_SHAPES = [(1, 1, DEFAULT), (63, 1000, DEFAULT), (130, 65, SMALL), (130, 1000, WIDE), (63, 129, SMALL)]


def check_logits_against_reference(logits, targets, gen, *, backend, config, temperature=1.0, **kw):
    g_logp, g_ent = (g.reshape(targets.shape) for g in upstream(targets.numel(), gen, targets.device))
    logp, ent = logprobs_from_logits(
        logits, targets, temperature=temperature, return_entropy=True, backend=backend, config=config, **kw
    )
    ref = logprobs_from_logits_reference(logits, targets, temperature=temperature, return_entropy=True, **kw)
    assert logp.dtype == torch.float32 and logp.shape == targets.shape
    assert_close(logp, ref[0], rtol=FP32_RTOL, name=f"{backend} logp")
    assert_close(ent, ref[1], rtol=FP32_RTOL, name=f"{backend} entropy")
    check_ranges(logp, ent)
    (dz,) = grads_of((logp, ent), (g_logp, g_ent), (logits,))
    (ref_dz,) = grads_of(ref, (g_logp, g_ent), (logits,))
    assert dz.dtype == logits.dtype and dz.shape == logits.shape
    assert_close(dz, ref_dz, rtol=2 * FP32_RTOL, name=f"{backend} dlogits")
    return logp, ent, dz


@pytest.mark.parametrize("n,v,config", LOGITS_SHAPES, ids=lambda x: CONFIG_IDS.get(id(x)))
@pytest.mark.parametrize("backend", BACKENDS)
def test_logprobs_from_logits_matches_reference(backend, n, v, config, device, generator):
    logits = (torch.randn(n, v, generator=generator) * 3).to(device).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=generator).to(device)
    targets[: n // 10] = IGNORE
    check_logits_against_reference(logits, targets, generator, backend=backend, config=config, temperature=0.7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_logprobs_from_logits_3d_ignore_nan_and_large(backend, device, generator):
    logits = torch.randn(2, 30, 150, generator=generator) * 3
    logits[1, 4:9] *= 3e3  # |z| ~ 1e4
    targets = torch.randint(0, 150, (2, 30), generator=generator)
    targets[0, [2, 7]] = IGNORE
    logits[0, 2] = float("nan")  # an ignored row's NaN reaches nothing
    logits = logits.to(device).requires_grad_()
    targets = targets.to(device)
    logp, ent, dz = check_logits_against_reference(logits, targets, generator, backend=backend, config=SMALL)
    assert (logp[0, [2, 7]] == 0).all() and (ent[0, [2, 7]] == 0).all()
    assert (dz[0, [2, 7]] == 0).all()
    # a NaN in a row that is not ignored stays in that row
    poisoned_logits = logits.detach().clone()
    poisoned_logits[1, 11, 5] = float("nan")
    logp = logprobs_from_logits(poisoned_logits, targets, backend=backend, config=SMALL)
    assert torch.isnan(logp[1, 11]) and torch.isfinite(logp[0]).all() and torch.isfinite(logp[1, :11]).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_logprobs_from_logits_low_precision(backend, dtype, device, generator):
    logits = (torch.randn(50, 400, generator=generator) * 3).to(device=device, dtype=dtype).requires_grad_()
    targets = torch.randint(0, 400, (50,), generator=generator).to(device)
    g_logp, g_ent = upstream(50, generator, device)
    logp, ent = logprobs_from_logits(
        logits, targets, temperature=0.9, return_entropy=True, backend=backend, config=SMALL
    )
    (dz,) = grads_of((logp, ent), (g_logp, g_ent), (logits,))
    ref = logprobs_from_logits_reference(
        logits, targets, temperature=0.9, return_entropy=True, compute_dtype=torch.float32
    )
    (ref_dz,) = grads_of(ref, (g_logp, g_ent), (logits,))
    log_probs = torch.log_softmax(logits / 0.9, dim=-1)
    plain = (log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1), -(log_probs.exp() * log_probs).sum(-1))
    (plain_dz,) = grads_of(plain, (g_logp, g_ent), (logits,))
    assert dz.dtype == dtype
    assert_low_precision_close(logp, ref[0], plain[0], atol=1e-6, name="logp")
    assert_low_precision_close(ent, ref[1], plain[1], atol=1e-6, name="entropy")
    assert_low_precision_close(dz, ref_dz, plain_dz, atol=1e-4, name="dlogits")


# --------------------------------------------------------------------------------------------------------------------
# Every buffer written before it is read; no buffer of size (N, V)
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_poisoned_buffers(backend, dtype, device, generator):
    """Every buffer the fused paths allocate starts as NaN: a single unwritten element read anywhere shows up."""
    config = LogprobsConfig(tokens=24, vocab=80, splits=2, dz_chunk=96, block_v=64, empty=poisoned)
    hidden, weight, bias, targets = make_inputs(50, 16, 230, generator, device, dtype=dtype, n_ignored=3)
    g_logp, g_ent = upstream(50, generator, device)
    tol = FP32_RTOL if dtype == torch.float32 else 2e-2
    for b in (bias, None):  # the torch path forms the logits differently with and without a bias
        inputs = (hidden, weight) if b is None else (hidden, weight, b)
        out = token_logprobs(
            hidden, weight, targets, bias=b, temperature=0.8, return_entropy=True, backend=backend, config=config
        )
        ref = token_logprobs_reference(hidden, weight, targets, bias=b, temperature=0.8, return_entropy=True)
        got = (*out, *grads_of(out, (g_logp, g_ent), inputs))
        expected = (*ref, *grads_of(ref, (g_logp, g_ent), inputs))
        for name, x, e in zip(("logp", "entropy", "dhidden", "dweight", "dbias"), got, expected):
            assert_all_written(x, name)
            assert_close(x, e, rtol=2 * tol, name=name)

    logits = (torch.randn(30, 150, generator=generator) * 2).to(device=device, dtype=dtype).requires_grad_()
    t = torch.randint(0, 150, (30,), generator=generator).to(device)
    t[4] = IGNORE
    logp, ent = logprobs_from_logits(logits, t, return_entropy=True, backend=backend, config=config)
    (dz,) = grads_of((logp, ent), (g_logp[:30], g_ent[:30]), (logits,))
    for name, x in (("logp", logp), ("entropy", ent), ("dlogits", dz)):
        assert_all_written(x, name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_buffers_stay_chunk_sized(backend, device, generator):
    """Record every buffer the fused path allocates: none is as large as the (N, V) logits."""
    sizes = []

    def recording_empty(shape, dtype, device):
        sizes.append(math.prod(shape))
        return torch.empty(shape, dtype=dtype, device=device)

    n, d, v = 96, 8, 640
    config = LogprobsConfig(tokens=32, vocab=128, splits=2, dz_chunk=128, empty=recording_empty)
    hidden, weight, bias, targets = make_inputs(n, d, v, generator, device)
    logp, ent = token_logprobs(hidden, weight, targets, bias=bias, return_entropy=True, backend=backend, config=config)
    torch.autograd.grad((logp + ent).sum(), (hidden, weight, bias))
    assert sizes and max(sizes) <= max(v * d, n * 128) < n * v, sorted(sizes)[-5:]


# --------------------------------------------------------------------------------------------------------------------
# TRL's implementations (the APIs users migrate from)
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_agrees_with_trl(backend, device, generator):
    trl_utils = pytest.importorskip("trl.trainer.utils")
    from trl.kernels import ChunkedLogProbFunction

    hidden, weight, bias, targets = make_inputs(64, 24, 333, generator, device)
    logp, ent = token_logprobs(
        hidden, weight, targets, bias=bias, temperature=0.9, return_entropy=True, backend=backend, config=SMALL
    )
    ours = torch.autograd.grad((logp + 0.5 * ent).sum(), (hidden, weight, bias))
    # selective_log_softmax + entropy_from_logits on materialised logits
    logits = (hidden @ weight.t() + bias).detach() / 0.9
    assert_close(logp, trl_utils.selective_log_softmax(logits, targets), rtol=FP32_RTOL, name="vs selective")
    assert_close(ent, trl_utils.entropy_from_logits(logits), rtol=FP32_RTOL, name="vs entropy_from_logits")
    # ChunkedLogProbFunction (hidden, weight, bias, targets, temperature, chunk_size, softcap, scale, outputs)
    trl_logp, trl_ent, *_ = ChunkedLogProbFunction.apply(
        hidden, weight, bias, targets, 0.9, 128, None, 1.0, ("entropy",)
    )
    assert_close(logp, trl_logp, rtol=FP32_RTOL, name="vs ChunkedLogProbFunction logp")
    assert_close(ent, trl_ent, rtol=FP32_RTOL, name="vs ChunkedLogProbFunction entropy")
    theirs = torch.autograd.grad((trl_logp + 0.5 * trl_ent).sum(), (hidden, weight, bias))
    for a, e, name in zip(ours, theirs, ("dhidden", "dweight", "dbias")):
        assert_close(a, e, rtol=2 * FP32_RTOL, name=f"vs ChunkedLogProbFunction {name}")


# --------------------------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------------------------


def _bad_token_calls(device):
    h = torch.randn(4, 8, device=device)
    w = torch.randn(10, 8, device=device)
    t = torch.randint(0, 10, (4,), device=device)
    meta_w = torch.empty(10, 8, device="meta")
    return [
        ("hidden size mismatch", lambda: token_logprobs(h, torch.randn(10, 7, device=device), t), ValueError, "D=8"),
        (
            "target = V",
            lambda: token_logprobs(h, w, torch.tensor([0, 1, 10, 2], device=device)),
            ValueError,
            r"targets\[2\]",
        ),
        (
            "negative target",
            lambda: token_logprobs(h, w, torch.tensor([0, -1, 3, 2], device=device)),
            ValueError,
            r"\[0, 10\)",
        ),
        ("integer hidden", lambda: token_logprobs(h.long(), w, t), TypeError, "hidden must be a floating"),
        ("different devices", lambda: token_logprobs(h, meta_w, t), ValueError, "weight is on meta"),
        ("temperature 0", lambda: token_logprobs(h, w, t, temperature=0.0), ValueError, "temperature"),
        ("temperature < 0", lambda: token_logprobs(h, w, t, temperature=-1.0), ValueError, "temperature"),
        ("temperature nan", lambda: token_logprobs(h, w, t, temperature=float("nan")), ValueError, "temperature"),
        ("temperature str", lambda: token_logprobs(h, w, t, temperature="1"), TypeError, "temperature"),
        ("1-D hidden", lambda: token_logprobs(h[0], w, t[0]), ValueError, "hidden must be"),
        ("3-D weight", lambda: token_logprobs(h, w[None], t), ValueError, "weight must be"),
        ("targets shape", lambda: token_logprobs(h, w, t[:3]), ValueError, "targets must have shape"),
        ("float targets", lambda: token_logprobs(h, w, t.float()), TypeError, "integer"),
        ("dtype mismatch", lambda: token_logprobs(h, w.double(), t), TypeError, "share a dtype"),
        ("bias shape", lambda: token_logprobs(h, w, t, bias=torch.randn(9, device=device)), ValueError, "bias"),
        ("ignore_index float", lambda: token_logprobs(h, w, t, ignore_index=-100.0), TypeError, "ignore_index"),
        ("return_entropy int", lambda: token_logprobs(h, w, t, return_entropy=1), TypeError, "return_entropy"),
        ("unknown backend", lambda: token_logprobs(h, w, t, backend="tpu"), ValueError, "backend"),
        ("empty vocabulary", lambda: token_logprobs(h, w[:0], t), ValueError, "V >= 1"),
        ("logits int", lambda: logprobs_from_logits(t, t), TypeError, "logits must be a floating"),
        (
            "logits target out of range",
            lambda: logprobs_from_logits(torch.randn(4, 10, device=device), t + 10),
            ValueError,
            "targets",
        ),
        ("logits shape", lambda: logprobs_from_logits(torch.randn(3, 10, device=device), t), ValueError, "shape"),
        (
            "logits temperature",
            lambda: logprobs_from_logits(torch.randn(4, 10, device=device), t, temperature=0),
            ValueError,
            "temperature",
        ),
        (
            "logits devices",
            lambda: logprobs_from_logits(torch.empty(4, 10, device="meta"), t),
            ValueError,
            "targets are on",
        ),
    ]


@pytest.mark.parametrize("case", range(len(_bad_token_calls("cpu"))), ids=[c[0] for c in _bad_token_calls("cpu")])
def test_bad_input_raises_clear_errors(case, device):
    _, call, exc, match = _bad_token_calls(device)[case]
    with pytest.raises(exc, match=match):
        call()


def test_unavailable_backend_raises(device):
    h, w, t = torch.randn(2, 4, device=device), torch.randn(5, 4, device=device), torch.tensor([1, 2], device=device)
    with pytest.raises(BackendUnavailableError, match="cuda"):
        token_logprobs(h, w, t, backend="cuda")


# --------------------------------------------------------------------------------------------------------------------
# Grid math for long inputs (Liger PR #1294: a grid axis past 65535 crashed at L >= 65536)
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,v", [(3_000_000, 262_144), (1, 151_936), (65_537, 7)])
def test_grids_stay_within_cuda_limits(n, v):
    """Every launch's grid, for every GPU tile and the small tile, at up to N = 3M tokens and V = 262144: token
    blocks or rows on axis 0 (< 2**31), vocabulary splits / chunk tiles on axis 1 (<= 65535)."""
    import rlvr_fast.kernels.logprobs as k

    grids = []
    for bn, bv, bd, *_ in [*k.GPU_TILES, *k.GPU_TILES_EXACT, k.SMALL_TILE]:
        meta = {"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_D": bd}
        for splits in (1, 64, 10**9):  # a request far beyond V still yields at most cdiv(V, granule) splits
            per_split, n_splits = k.split_plan(v, splits)
            assert per_split * (n_splits - 1) < v <= per_split * n_splits  # every split non-empty, V covered
            grids.append(k.fwd_grid(n, n_splits)(meta))
        width = min(v, k._dz_chunk(n, v))
        grids.append(k.dlogits_grid(n, width)(meta))
    grids += [k.logits_fwd_grid(n), k.logits_bwd_grid(n, v, 1024), k.logits_bwd_grid(n, v, 64)]
    for grid in grids:
        assert 1 <= grid[0] < 2**31 and all(1 <= g <= 65535 for g in grid[1:]), grid
