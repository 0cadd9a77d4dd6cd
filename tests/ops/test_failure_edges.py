"""Answer checking bounded on any thread; group_advantages on huge finite rewards (reference,
torch and Triton agree); grpo_loss rejects negative mask weights and NaN advantages; random_masks on a list."""

import os
import signal
import threading
import time

import pytest
import torch

from rlvr_fast.ops.group_advantage import check_float32_range, group_advantages, group_advantages_reference
from rlvr_fast.ops.grpo_loss import grpo_loss
from rlvr_fast.optim import SparseAdamW, random_masks
from rlvr_fast.rewards.equivalence import is_equivalent, symbolic_available
from rlvr_fast.testing import backend_params

needs_symbolic = pytest.mark.skipif(not symbolic_available(), reason="math-verify is not installed")


def in_thread(fn, *args, **kwargs):
    out = {}

    def target():
        t0 = time.perf_counter()
        out["value"] = fn(*args, **kwargs)
        out["seconds"] = time.perf_counter() - t0

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), "answer checking did not return within 60 s on a thread"
    return out["value"], out["seconds"]


@needs_symbolic
def test_a_huge_power_is_rejected_fast_on_a_thread():
    value, seconds = in_thread(is_equivalent, "(x+y+z+w)^{999}", "(x+y+z+w)^{998}")
    assert value is False and seconds < 10


@needs_symbolic
@pytest.mark.parametrize(
    "pred,ref,expected", [("\\sqrt{8}", "2\\sqrt{2}", True), ("(x+1)^2", "x^2+2x+1", True), ("x+1", "x+2", False)]
)
def test_symbolic_verdicts_off_the_main_thread_match_the_main_thread(pred, ref, expected):
    assert in_thread(is_equivalent, pred, ref)[0] is expected
    assert is_equivalent(pred, ref) is expected


@needs_symbolic
def test_a_worker_that_overruns_is_killed_and_the_answer_is_false(monkeypatch):
    from rlvr_fast.rewards import symbolic_worker

    monkeypatch.setattr(symbolic_worker, "GRACE_S", 0.5)
    worker = symbolic_worker._Worker()
    os.kill(worker.proc.pid, signal.SIGSTOP)  # a worker stuck in sympy, as far as the caller can tell
    t0 = time.perf_counter()
    assert worker.ask("x+1", "1+x", timeout=1) is None
    assert time.perf_counter() - t0 < 5
    worker.kill()
    assert worker.proc.poll() is not None


BASE = torch.tensor([0.0, 1.0, 1.0, 3.0, 2.0, 2.0, 5.0, -1.0, 4.0, 4.0, 4.0, 4.0], dtype=torch.float64)


@pytest.mark.parametrize(
    "dtype,magnitude", [(torch.float32, 1e20), (torch.float32, 1e30), (torch.float64, 1e200), (torch.float64, 1e-200)]
)
@pytest.mark.parametrize("scale", ["group", "batch"])
@pytest.mark.parametrize("backend", ["reference", *backend_params("torch", "triton", "cuda")])
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy: masked 0/0 and fp32 stats overflow
def test_group_advantages_are_scale_invariant(dtype, magnitude, scale, backend, device):
    """fp32 rewards >= ~1e20 used to give all zeros; fp64 +-1e200 gave NaN (torch) and 0 (Triton)."""
    rewards = (BASE * magnitude).to(dtype)
    if backend == "cuda" and dtype == torch.float64:
        with pytest.raises(ValueError, match=r"backend='cuda' computes in float32, and 11 float64 rewards are outside"):
            group_advantages(rewards.to(device), 4, scale=scale, eps=1e-300, backend=backend)
        return
    if backend == "reference":
        got = group_advantages_reference(rewards, 4, scale=scale, eps=1e-300).advantages
    else:
        got = group_advantages(rewards.to(device), 4, scale=scale, eps=1e-300, backend=backend).advantages.cpu()
    want = group_advantages_reference(BASE, 4, scale=scale, eps=1e-300).advantages
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert (got[8:] == 0).all()  # the all-equal group


def loss_inputs(B=3, T=5):
    logp = -torch.rand(B, T, dtype=torch.float32)
    return logp, torch.randn(B), torch.ones(B, T)


def test_grpo_loss_rejects_negative_mask_weights():
    logp, adv, mask = loss_inputs()
    mask[1, 2] = -0.5
    with pytest.raises(ValueError, match=r"mask weights must be >= 0, got 1 negative"):
        grpo_loss(logp, None, None, adv, mask)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_grpo_loss_rejects_non_finite_advantages(bad):
    logp, adv, mask = loss_inputs()
    adv[2] = bad
    with pytest.raises(ValueError, match=r"advantages must be finite, got NaN/inf at rows \[2\]"):
        grpo_loss(logp, None, None, adv, mask)


def test_random_masks_on_a_list_of_parameters():
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(7))]
    masks = random_masks(params, 0.5, seed=3)
    named = random_masks({"a": params[0], "b": params[1]}, 0.5, seed=3)
    assert isinstance(masks, list) and [m.shape for m in masks] == [p.shape for p in params]
    assert torch.equal(masks[0], named["a"]) and torch.equal(masks[1], named["b"])  # same draws, same order
    SparseAdamW(params, masks, lr=0.1)  # the form the optimizer takes for unnamed parameters
    with pytest.raises(TypeError, match=r"shapes must be a mapping .* or a sequence"):
        random_masks(params[0], 0.5)
    with pytest.raises(TypeError, match=r"shapes\[1\] must be a tensor or a shape, got str"):
        random_masks([params[0], "x"], 0.5)


@pytest.mark.parametrize("magnitude", [1e39, 1e-39])
def test_float32_backend_refuses_float64_rewards_beyond_float32(magnitude):
    """The CUDA kernel reads rewards as float32: float64 rewards it cannot hold are refused by name, not zeroed."""
    rewards = BASE * magnitude
    with pytest.raises(ValueError, match=r"backend='cuda' computes in float32, and 11 float64 rewards are outside"):
        check_float32_range(rewards, "cuda")
    check_float32_range(BASE, "cuda")  # in range: accepted
    check_float32_range(rewards.float(), "cuda")  # float32 input: nothing to lose
