"""The rollout correction (truncated importance sampling of the rollout engine's samples) in grpo_loss and
fused_linear_grpo_loss: reference vs torch path vs Triton (interpreted), TRL's formula, the cap, the metrics and the
input checks. rlvr_fast.ops.rollout_correction; docs/design.md §2."""

from __future__ import annotations

import pytest
import torch

from rlvr_fast.ops.fused_linear_grpo_loss import (
    FusedLinearGrpoConfig,
    fused_linear_grpo_loss,
    fused_linear_grpo_loss_reference,
)
from rlvr_fast.ops.grpo_loss import grpo_loss, grpo_loss_reference
from rlvr_fast.ops.objective import PolicyObjective

MODES = ("token_truncate", "sequence_truncate")
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


def _objective(loss_type, mode, cap=1.3, **kw):
    extra = {"max_completion_length": 64} if loss_type == "dr_grpo" else {}
    return PolicyObjective(loss_type=loss_type, rollout_correction=mode, rollout_correction_cap=cap, **extra, **kw)


def _inputs(gen, B, T, spread=0.6):
    """Log-probs near each other (ratios around 1, some above the cap); a float mask with zero rows and padding
    poisoned with NaN (never read)."""
    base = -torch.rand(B, T, generator=gen) * 3
    logp = base + spread * torch.randn(B, T, generator=gen)
    old = base + spread * torch.randn(B, T, generator=gen)
    roll = base + spread * torch.randn(B, T, generator=gen)
    logp, old, roll = (x.clamp(max=0.0) for x in (logp, old, roll))
    mask = (torch.rand(B, T, generator=gen) > 0.25).float()
    mask[0] = 0.0  # a fully masked completion
    adv = torch.randn(B, generator=gen)
    ref = (base + 0.3 * torch.randn(B, T, generator=gen)).clamp(max=0.0)
    for x in (old, roll, ref):
        x.masked_fill_(mask == 0, float("nan"))
    return logp, old, roll, ref, mask, adv


def _run(fn, logp, *args, **kw):
    x = logp.detach().clone().requires_grad_()
    loss, m = fn(x, *args, **kw)
    loss.backward()
    return loss.detach().double(), x.grad.double(), m


def _close_metrics(a, b, tol):
    da, db = a.rollout_correction.as_dict(), b.rollout_correction.as_dict()
    assert da.keys() == db.keys()
    for k in da:
        assert da[k] == pytest.approx(db[k], rel=tol, abs=tol), k


# --------------------------------------------------------------------------------------------------------------------
# grpo_loss: reference vs torch vs Triton
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("with_old", [False, True])
def test_grpo_loss_paths_match_reference(mode, loss_type, with_old):
    gen = torch.Generator().manual_seed(hash((mode, loss_type, with_old)) % 2**31)
    B, T = 5, 13  # odd shapes
    logp, old, roll, ref, mask, adv = _inputs(gen, B, T)
    obj = _objective(loss_type, mode, beta=0.05)
    args = (old if with_old else None, ref, adv, mask)
    want_loss, want_grad, want_m = _run(grpo_loss_reference, logp, *args, objective=obj, rollout_logp=roll)
    for backend in ("torch", "triton"):
        loss, grad, m = _run(grpo_loss, logp, *args, objective=obj, rollout_logp=roll, backend=backend)
        assert torch.allclose(loss, want_loss, rtol=1e-5, atol=1e-6), backend
        assert torch.allclose(grad, want_grad, rtol=1e-4, atol=1e-6), backend
        _close_metrics(m, want_m, 1e-5)
    # the correction changed something: weights differ from 1 on these inputs
    _, plain_grad, _ = _run(grpo_loss_reference, logp, *args, objective=_objective(loss_type, None, beta=0.05))
    assert not torch.allclose(plain_grad, want_grad)


@pytest.mark.parametrize("mode", MODES)
def test_grpo_loss_sequence_ratio_gspo_combination(mode):
    """GSPO with the sequence-level correction (one constant weight per completion); token_truncate under GSPO is
    refused by the objective."""
    gen = torch.Generator().manual_seed(7)
    logp, old, roll, _, mask, adv = _inputs(gen, 4, 9)
    if mode == "token_truncate":
        with pytest.raises(ValueError, match="not supported with importance_sampling='sequence'"):
            _objective("grpo", mode, importance_sampling="sequence")
        return
    obj = _objective("grpo", mode, importance_sampling="sequence")
    want_loss, want_grad, _ = _run(grpo_loss_reference, logp, old, None, adv, mask, objective=obj, rollout_logp=roll)
    for backend in ("torch", "triton"):
        loss, grad, _ = _run(grpo_loss, logp, old, None, adv, mask, objective=obj, rollout_logp=roll, backend=backend)
        assert torch.allclose(loss, want_loss, rtol=1e-5, atol=1e-6)
        assert torch.allclose(grad, want_grad, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------------------------------------
# TRL's formula (trl 1.16.0, trl/trainer/grpo_trainer.py: GRPOTrainer._generate_and_score_completions computes
# ``vllm_importance_sampling_ratio`` and its metrics; _compute_loss multiplies ``per_token_loss`` by it before adding
# the KL). The lines live inside trainer methods (not callable alone), so they are transcribed here.
# --------------------------------------------------------------------------------------------------------------------


def _trl_is_ratio(old_per_token_logps, sampling_per_token_logps, completion_mask, mode, clip_max, clip_min=None):
    mask = completion_mask
    per_token_logps_diff = (old_per_token_logps - sampling_per_token_logps) * mask
    per_token_logps_diff = torch.nan_to_num(per_token_logps_diff, nan=0.0)
    sequence_level_is = mode in ["sequence_mask", "sequence_truncate"]
    if sequence_level_is:
        logps_diff = per_token_logps_diff.sum(dim=-1, keepdim=True)
    else:
        logps_diff = per_token_logps_diff
    ratio = torch.exp(logps_diff)
    ratio = torch.clamp(ratio, min=clip_min, max=clip_max)
    return ratio, sequence_level_is


def _trl_metrics(ratio, old, sampling, completion_mask, sequence_level_is):
    delta = torch.abs(old - sampling)
    mask = completion_mask.bool()
    delta = delta[mask & ~torch.isnan(delta)]
    flat = ratio.flatten() if sequence_level_is else ratio[mask]
    return {
        "rollout_is_ratio_min": float(flat.min()),
        "rollout_is_ratio_mean": float(flat.mean()),
        "rollout_is_ratio_max": float(flat.max()),
        "rollout_is_logp_diff_mean": float(delta.mean()),
        "rollout_is_logp_diff_max": float(delta.max()),
    }


def _trl_bnpo_loss(per_token_logps, old_per_token_logps, advantages, mask, is_ratio, eps, beta, ref):
    coef_1 = torch.exp(per_token_logps - old_per_token_logps)
    coef_2 = torch.clamp(coef_1, 1 - eps, 1 + eps)
    per_token_loss = -torch.min(coef_1 * advantages.unsqueeze(1), coef_2 * advantages.unsqueeze(1))
    per_token_loss = per_token_loss * is_ratio
    kl = torch.exp(ref - per_token_logps) - (ref - per_token_logps) - 1
    per_token_loss = per_token_loss + beta * kl
    return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("with_old", [False, True])
def test_weights_loss_and_metrics_equal_trl(mode, with_old):
    gen = torch.Generator().manual_seed(11 + with_old)
    B, T = 6, 11
    logp, old, roll, ref, mask, adv = _inputs(gen, B, T)
    mask = (mask != 0).float()  # TRL's completion mask is 0/1
    mask[0, :3] = 1.0
    cap = 1.2
    filled = [torch.nan_to_num(x, nan=-1.0) for x in (old, roll, ref)]  # TRL's inputs hold no NaN padding
    old_f, roll_f, ref_f = filled
    # TRL's old_per_token_logps: the trainer's own log-probs before the update (here: logp itself when one update)
    trl_old = old_f if with_old else logp.detach()
    ratio, seq = _trl_is_ratio(trl_old, roll_f, mask, mode, cap)
    x = logp.clone().requires_grad_()
    trl_loss = _trl_bnpo_loss(x.double(), trl_old.double(), adv.double(), mask, ratio.double(), 0.2, 0.04, ref_f)
    trl_loss.backward()
    obj = _objective("bnpo", mode, cap=cap, beta=0.04)
    for fn, kw in ((grpo_loss_reference, {}), (grpo_loss, {"backend": "torch"}), (grpo_loss, {"backend": "triton"})):
        loss, grad, m = _run(
            fn, logp, old_f if with_old else None, ref_f, adv, mask, objective=obj, rollout_logp=roll_f, **kw
        )
        assert float(loss) == pytest.approx(float(trl_loss), rel=1e-5, abs=1e-7)
        assert torch.allclose(grad, x.grad.double(), rtol=1e-4, atol=1e-7)
        got = m.rollout_correction.as_dict()
        for k, v in _trl_metrics(ratio, trl_old, roll_f, mask, seq).items():
            assert got[k] == pytest.approx(v, rel=1e-5, abs=1e-7), k


# --------------------------------------------------------------------------------------------------------------------
# The cap and the constant weight
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_cap_truncates_and_clipped_fraction_counts_it(backend):
    gen = torch.Generator().manual_seed(3)
    logp, old, roll, _, mask, adv = _inputs(gen, 4, 10, spread=1.0)
    roll = torch.where(mask != 0, old - 5.0 * torch.rand(4, 10, generator=gen), roll)  # every ratio e^d > 1
    d = old - roll
    # a huge cap truncates nothing, a cap at 1 truncates every counted token: w = 1 there, the plain loss
    huge = _objective("bnpo", "token_truncate", cap=1e30)
    _, _, m = _run(grpo_loss, logp, old, None, adv, mask, objective=huge, rollout_logp=roll, backend=backend)
    assert float(m.rollout_correction.clipped_frac) == 0.0
    w = mask
    want_mean = float((w * torch.exp(torch.where(w != 0, d, 0.0))).sum() / w.sum())
    assert float(m.rollout_correction.ratio_mean) == pytest.approx(want_mean, rel=1e-5)
    one = _objective("bnpo", "token_truncate", cap=1.0)
    loss1, grad1, m1 = _run(grpo_loss, logp, old, None, adv, mask, objective=one, rollout_logp=roll, backend=backend)
    assert float(m1.rollout_correction.clipped_frac) == 1.0
    assert float(m1.rollout_correction.ratio_max) == 1.0 and float(m1.rollout_correction.ratio_min) == 1.0
    plain, plain_grad, _ = _run(grpo_loss, logp, old, None, adv, mask, loss_type="bnpo", backend=backend)
    assert torch.allclose(loss1, plain) and torch.allclose(grad1, plain_grad)
    # a cap in between: the fraction of counted tokens whose ratio exceeds it
    mid = _objective("bnpo", "token_truncate", cap=3.0)
    _, _, m3 = _run(grpo_loss, logp, old, None, adv, mask, objective=mid, rollout_logp=roll, backend=backend)
    exceeded = ((torch.exp(torch.where(w != 0, d, 0.0)) > 3.0) & (w != 0)).float()
    assert float(m3.rollout_correction.clipped_frac) == pytest.approx(float((w * exceeded).sum() / w.sum()))
    assert 0.0 < float(m3.rollout_correction.clipped_frac) < 1.0


def test_weight_is_a_constant_on_the_policy_term_only():
    """Token mode, beta = 0, no old_logp: each token's gradient is w_t times the uncorrected one, with w_t =
    min(exp(logp_t - rollout_t), C) of the detached logp (no gradient through w)."""
    gen = torch.Generator().manual_seed(5)
    logp, _, roll, _, mask, adv = _inputs(gen, 3, 8)
    obj = _objective("bnpo", "token_truncate", cap=1.5)
    w = torch.exp(torch.where(mask != 0, logp - roll, 0.0)).clamp(max=1.5)
    _, plain_grad, _ = _run(grpo_loss_reference, logp, None, None, adv, mask, objective=_objective("bnpo", None))
    for backend in ("torch", "triton"):
        _, grad, _ = _run(grpo_loss, logp, None, None, adv, mask, objective=obj, rollout_logp=roll, backend=backend)
        assert torch.allclose(grad, w.double() * plain_grad, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------------------------------------------------
# fused_linear_grpo_loss
# --------------------------------------------------------------------------------------------------------------------


def _run_fused(fn, h, W, *args, **kw):
    h, W = h.detach().clone().requires_grad_(), W.detach().clone().requires_grad_()
    loss, m = fn(h, W, *args, **kw)
    loss.backward()
    return loss.detach().double(), h.grad.double(), W.grad.double(), m


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("with_old", [False, True])
def test_fused_paths_match_reference(mode, loss_type, with_old):
    gen = torch.Generator().manual_seed(hash(("fused", mode, loss_type, with_old)) % 2**31)
    B, T, D, V = 4, 9, 6, 13
    h = torch.randn(B, T, D, generator=gen)
    W = torch.randn(V, D, generator=gen) * 0.5
    targets = torch.randint(0, V, (B, T), generator=gen)
    _, old, roll, ref, mask, adv = _inputs(gen, B, T)
    targets = torch.where(mask != 0, targets, -100)
    adv[1] = 0.0  # a skipped completion (beta = 0)
    obj = _objective(
        loss_type, mode, cap=1.5, importance_sampling="sequence" if mode == "sequence_truncate" else "token"
    )
    kw = dict(old_logp=old if with_old else None, ref_logp=ref, objective=obj, rollout_logp=roll)
    want = _run_fused(fused_linear_grpo_loss_reference, h, W, targets, mask, adv, **kw)
    # chunk_tokens=4: completions longer than a chunk take the log-prob pre-pass under sequence_truncate
    for backend in ("torch", "triton"):
        for cfg in (FusedLinearGrpoConfig(chunk_tokens=4), FusedLinearGrpoConfig(skip_zero_advantage=False)):
            got = _run_fused(fused_linear_grpo_loss, h, W, targets, mask, adv, backend=backend, config=cfg, **kw)
            assert torch.allclose(got[0], want[0], rtol=1e-5, atol=1e-6), (backend, cfg)
            assert torch.allclose(got[1], want[1], rtol=1e-4, atol=1e-6), (backend, cfg)
            assert torch.allclose(got[2], want[2], rtol=1e-4, atol=1e-6), (backend, cfg)
            if not cfg.skip_zero_advantage:  # every token evaluated: the metrics are the reference's
                _close_metrics(got[3], want[3], 1e-5)


# --------------------------------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------------------------------


def test_rollout_logp_is_checked_by_name():
    gen = torch.Generator().manual_seed(1)
    logp, old, roll, _, mask, adv = _inputs(gen, 3, 5)
    on = _objective("dapo", "token_truncate")
    with pytest.raises(ValueError, match=r"rollout_correction='token_truncate' needs rollout_logp .*got None"):
        grpo_loss(logp, old, None, adv, mask, objective=on)
    with pytest.raises(ValueError, match=r"rollout_logp is read only with a rollout_correction .*got rollout_corr"):
        grpo_loss(logp, old, None, adv, mask, rollout_logp=roll)
    with pytest.raises(ValueError, match=r"rollout_logp must have logp's shape \(B, T\) = \(3, 5\), got rollout_lo"):
        grpo_loss(logp, old, None, adv, mask, objective=on, rollout_logp=roll[:, :4])
    with pytest.raises(TypeError, match=r"rollout_logp must be a floating tensor .*got dtype torch.int64"):
        grpo_loss(logp, old, None, adv, mask, objective=on, rollout_logp=roll.long())
    bad = roll.clone()
    b, t = (mask != 0).nonzero()[0].tolist()
    bad[b, t] = float("nan")
    with pytest.raises(ValueError, match=rf"rollout_logp must be a finite log-probability .*rollout_logp\[{b}, {t}\]"):
        grpo_loss(logp, old, None, adv, mask, objective=on, rollout_logp=bad)
    bad[b, t] = 0.5  # a probability, not a log-probability
    with pytest.raises(ValueError, match=r"rollout_logp must be a finite log-probability"):
        grpo_loss_reference(logp, old, None, adv, mask, objective=on, rollout_logp=bad)
    # padding may hold anything (_inputs put NaN there)
    assert torch.isnan(roll[mask == 0]).all()
    grpo_loss(logp, old, None, adv, mask, objective=on, rollout_logp=roll)
    # the fused op: the same checks, named the same
    h, W = torch.randn(3, 5, 4), torch.randn(7, 4)
    targets = torch.where(mask != 0, torch.randint(0, 7, (3, 5)), -100)
    with pytest.raises(ValueError, match=r"fused_linear_grpo_loss: rollout_correction='token_truncate' needs"):
        fused_linear_grpo_loss(h, W, targets, mask, adv, objective=on)
    with pytest.raises(ValueError, match=r"fused_linear_grpo_loss: rollout_logp must be \(B, T\) = \(3, 5\)"):
        fused_linear_grpo_loss(h, W, targets, mask, adv, objective=on, rollout_logp=roll[:2])
    with pytest.raises(ValueError, match=r"fused_linear_grpo_loss: rollout_logp must be a finite log-probability"):
        fused_linear_grpo_loss(h, W, targets, mask, adv, objective=on, rollout_logp=bad)


def test_objective_fields_are_checked_and_flat_keywords_work():
    with pytest.raises(ValueError, match=r"unknown rollout_correction 'token_mask'; expected None or one of"):
        PolicyObjective(rollout_correction="token_mask")
    with pytest.raises(ValueError, match=r"rollout_correction_cap must be > 0.0, got 0.0"):
        PolicyObjective(rollout_correction="token_truncate", rollout_correction_cap=0.0)
    gen = torch.Generator().manual_seed(2)
    logp, old, roll, _, mask, adv = _inputs(gen, 3, 6)
    flat, _ = grpo_loss(
        logp,
        old,
        None,
        adv,
        mask,
        rollout_correction="sequence_truncate",
        rollout_correction_cap=2.0,
        rollout_logp=roll,
    )
    obj = PolicyObjective(rollout_correction="sequence_truncate", rollout_correction_cap=2.0)
    assert torch.equal(flat, grpo_loss(logp, old, None, adv, mask, objective=obj, rollout_logp=roll)[0])
    # metrics: in as_dict, not among the token-mean metric fields
    _, m = grpo_loss(logp, old, None, adv, mask, objective=obj, rollout_logp=roll)
    assert {"rollout_is_ratio_mean", "rollout_is_ratio_max", "rollout_is_clipped_frac"} <= m.as_dict().keys()
    _, off = grpo_loss(logp, old, None, adv, mask)
    assert off.rollout_correction is None and not any(k.startswith("rollout") for k in off.as_dict())
