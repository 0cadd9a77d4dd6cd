"""rlvr_fast inside verl 0.9.1, checked against verl's own functions on the CPU.

Our registered estimators vs verl's ``compute_grpo_outcome_advantage`` / RLOO on shuffled uids and unequal groups, our
policy loss vs ``compute_policy_loss_vanilla`` for every ``loss_agg_mode`` and clip setting (loss, gradient, metrics),
our fused log-probs vs verl's torch implementation of ``linear_cross_entropy`` (``FusedLinearForPPOFunction``),
gradients included. Needs verl (``pip install --no-deps verl==0.9.1 && pip install -r requirements-verl.txt``); skipped
without it, unless ``RLVR_FAST_REQUIRE_VERL=1`` (CI) turns the missing import into a failure.
"""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

try:
    import verl
    from omegaconf import OmegaConf
    from verl.trainer.ppo import core_algos
    from verl.utils.experimental import torch_functional as verl_torch_functional
    from verl.utils.kernel import linear_cross_entropy as verl_lce
    from verl.workers.config import ActorConfig
except ImportError as exc:  # pragma: no cover - depends on the environment
    if os.environ.get("RLVR_FAST_REQUIRE_VERL") == "1":
        raise
    pytest.skip(
        f"verl is not importable ({exc}); install it with: pip install --no-deps verl==0.9.1 && "
        f"pip install -r requirements-verl.txt",
        allow_module_level=True,
    )

from rlvr_fast.integrations.verl.advantages import ADVANTAGE_ESTIMATORS
from rlvr_fast.integrations.verl.compat import check_verl_version
from rlvr_fast.integrations.verl.logprobs import (
    disable_fused_linear_logprobs,
    fused_linear_logprobs_enabled,
    verl_linear_cross_entropy,
)
from rlvr_fast.integrations.verl.policy_loss import LOSS_AGG_MODES, verl_policy_loss
from rlvr_fast.integrations.verl.registration import register, unregister

ROOT = Path(__file__).resolve().parents[2]  # tests/integrations/ -> the repository


@pytest.fixture(autouse=True)
def registered():
    """Every test starts registered (fused log-probs off) and leaves verl as it found it."""
    register()
    yield
    unregister()


def _shuffled_batch(group_sizes, *, binary: bool, T: int = 5):
    """Rewards on the last response token, uids of unequal groups in a shuffled order (verl's layout)."""
    uids = np.array([f"uid-{g}" for g, size in enumerate(group_sizes) for _ in range(size)], dtype=object)
    perm = torch.randperm(len(uids))
    uids = uids[perm.numpy()]
    n = len(uids)
    lengths = torch.randint(1, T + 1, (n,))
    mask = (torch.arange(T) < lengths.unsqueeze(1)).to(torch.float32)
    score = torch.randint(0, 2, (n,)).float() if binary else torch.randn(n)
    rewards = torch.zeros(n, T)
    rewards[torch.arange(n), lengths - 1] = score
    return rewards, mask, uids


def _call_registered(name, rewards, mask, uids, config=None):
    # exactly the keywords verl's ray_trainer.compute_advantage passes to a registered estimator
    fn = core_algos.get_adv_estimator_fn(name)
    return fn(token_level_rewards=rewards, response_mask=mask, config=config, index=uids)


# --------------------------------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------------------------------


def test_register_is_idempotent_and_adds_every_name():
    first = register()
    second = register()
    assert first == second
    assert first.verl_version == verl.__version__ == "0.9.1"
    assert len(first.adv_estimators) == 18  # 6 estimators x 3 sample modes
    for name in ("rlvr_fast_grpo", "rlvr_fast_dr_grpo", "rlvr_fast_rloo", "rlvr_fast_nsr", "rlvr_fast_psr"):
        assert core_algos.get_adv_estimator_fn(name) is ADVANTAGE_ESTIMATORS[name]
    assert "rlvr_fast_w_reinforce_negative_only" in core_algos.ADV_ESTIMATOR_REGISTRY
    assert core_algos.get_policy_loss_fn("rlvr_fast") is verl_policy_loss
    unregister()
    assert "rlvr_fast_grpo" not in core_algos.ADV_ESTIMATOR_REGISTRY
    assert "rlvr_fast" not in core_algos.POLICY_LOSS_REGISTRY
    assert "grpo" in core_algos.ADV_ESTIMATOR_REGISTRY and "vanilla" in core_algos.POLICY_LOSS_REGISTRY


@pytest.mark.parametrize("version", ["0.8.5", "0.10.0", "not-a-version"])
def test_unsupported_verl_versions_are_refused_by_name(version):
    with pytest.raises(ImportError, match=f"found verl {version}"):
        check_verl_version(version)


def test_plugin_module_registers_through_verls_external_modules_hook():
    """VERL_USE_EXTERNAL_MODULES (how every verl Ray process gets the names) with the fused log-probs switched on."""
    env = dict(os.environ, VERL_USE_EXTERNAL_MODULES="rlvr_fast.integrations.verl.plugin")
    env["RLVR_FAST_VERL_FUSED_LOGPROBS"] = "1"
    code = (
        "import verl\n"
        "from verl.trainer.ppo import core_algos\n"
        "from verl.utils.kernel import linear_cross_entropy as lce\n"
        "from rlvr_fast.integrations.verl.advantages import ADVANTAGE_ESTIMATORS\n"
        "from rlvr_fast.integrations.verl.logprobs import verl_linear_cross_entropy\n"
        "from rlvr_fast.integrations.verl.policy_loss import verl_policy_loss\n"
        "assert core_algos.get_adv_estimator_fn('rlvr_fast_nsr') is ADVANTAGE_ESTIMATORS['rlvr_fast_nsr']\n"
        "assert core_algos.get_policy_loss_fn('rlvr_fast') is verl_policy_loss\n"
        "assert lce.linear_cross_entropy is verl_linear_cross_entropy\n"
        "print('registered')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "registered" in out.stdout


def test_old_plugin_path_still_registers_and_warns_with_the_new_path():
    """VERL_USE_EXTERNAL_MODULES=rlvr_fast.integrations.verl_plugin (the path before the verl package) keeps working:
    a FutureWarning naming the new path, and the new plugin's very registration. In a fresh process, where the
    alias is imported for the first time (a module warns once, on import)."""
    env = dict(os.environ, VERL_USE_EXTERNAL_MODULES="rlvr_fast.integrations.verl_plugin")
    env["RLVR_FAST_VERL_FUSED_LOGPROBS"] = "1"
    code = (
        "import warnings\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import verl  # imports the modules of VERL_USE_EXTERNAL_MODULES\n"
        "import sys\n"
        "assert 'rlvr_fast.integrations.verl_plugin' in sys.modules, 'verl did not import the old path'\n"
        "moved = [str(w.message) for w in caught if issubclass(w.category, FutureWarning) and 'verl_plugin' in "
        "str(w.message)]\n"
        "assert len(moved) == 1, [str(w.message) for w in caught]\n"
        "assert 'rlvr_fast.integrations.verl.plugin' in moved[0], moved[0]\n"
        "from verl.trainer.ppo import core_algos\n"
        "from verl.utils.kernel import linear_cross_entropy as lce\n"
        "from rlvr_fast.integrations import verl_plugin as old\n"
        "from rlvr_fast.integrations.verl import plugin as new\n"
        "from rlvr_fast.integrations.verl.advantages import ADVANTAGE_ESTIMATOR_NAMES, ADVANTAGE_ESTIMATORS\n"
        "from rlvr_fast.integrations.verl.logprobs import verl_linear_cross_entropy\n"
        "from rlvr_fast.integrations.verl.policy_loss import POLICY_LOSS_NAME, verl_policy_loss\n"
        "from rlvr_fast.integrations.verl.registration import Registration\n"
        "assert old.REGISTRATION is new.REGISTRATION and old.FUSED_LOGPROBS_ENV == new.FUSED_LOGPROBS_ENV\n"
        "expected = Registration(verl.__version__, ADVANTAGE_ESTIMATOR_NAMES, POLICY_LOSS_NAME, True)\n"
        "assert new.REGISTRATION == expected, new.REGISTRATION\n"
        "for name, fn in ADVANTAGE_ESTIMATORS.items():\n"
        "    assert core_algos.get_adv_estimator_fn(name) is fn, name\n"
        "assert core_algos.get_policy_loss_fn(POLICY_LOSS_NAME) is verl_policy_loss\n"
        "assert lce.linear_cross_entropy is verl_linear_cross_entropy\n"
        "print('registered through the old path')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "registered through the old path" in out.stdout


# --------------------------------------------------------------------------------------------------------------------
# Advantage estimators vs verl's
# --------------------------------------------------------------------------------------------------------------------

GROUPINGS = [(4, 4, 4, 4), (2, 5, 3, 4, 6)]  # equal groups, and unequal ones (all >= 2)


@pytest.mark.parametrize("group_sizes", GROUPINGS)
@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize("norm", [True, False])
def test_grpo_matches_verl_on_shuffled_uids(group_sizes, binary, norm):
    rewards, mask, uids = _shuffled_batch(group_sizes, binary=binary)
    config = OmegaConf.create({"norm_adv_by_std_in_grpo": norm})
    ours, returns = _call_registered("rlvr_fast_grpo", rewards, mask, uids, config)
    theirs, _ = core_algos.compute_grpo_outcome_advantage(rewards, mask, uids, norm_adv_by_std_in_grpo=norm)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert returns is ours
    # Dr. GRPO is grpo without the std: verl's norm_adv_by_std_in_grpo=False
    dr, _ = _call_registered("rlvr_fast_dr_grpo", rewards, mask, uids)
    plain, _ = core_algos.compute_grpo_outcome_advantage(rewards, mask, uids, norm_adv_by_std_in_grpo=False)
    torch.testing.assert_close(dr, plain, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("group_sizes", GROUPINGS)
def test_rloo_matches_verl_on_shuffled_uids(group_sizes):
    rewards, mask, uids = _shuffled_batch(group_sizes, binary=False)
    ours, _ = _call_registered("rlvr_fast_rloo", rewards, mask, uids)
    for verl_rloo in (core_algos.compute_rloo_outcome_advantage, core_algos.compute_rloo_vectorized_outcome_advantage):
        theirs, _ = verl_rloo(token_level_rewards=rewards, response_mask=mask, index=uids)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["positive_only", "negative_only"])
def test_sample_modes_clip_verls_grpo_advantage(mode):
    rewards, mask, uids = _shuffled_batch((3, 5, 4), binary=True)
    ours, _ = _call_registered(f"rlvr_fast_grpo_{mode}", rewards, mask, uids)
    theirs, _ = core_algos.compute_grpo_outcome_advantage(rewards, mask, uids)
    expected = theirs.clamp_min(0.0) if mode == "positive_only" else theirs.clamp_max(0.0)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["all", "positive_only", "negative_only"])
def test_psr_nsr_w_reinforce_read_the_verdict_score_above_threshold(mode):
    rewards, mask, uids = _shuffled_batch((3, 4, 2), binary=False)
    lam, threshold = 0.25, 0.1
    config = OmegaConf.create({"rlvr_fast": {"lam": lam, "correct_threshold": threshold}})
    correct = (rewards.sum(-1) > threshold).float()
    formulas = {"psr": correct, "nsr": correct - 1.0, "w_reinforce": torch.where(correct > 0, lam, -1.0)}
    clip = {"all": lambda a: a, "positive_only": lambda a: a.clamp_min(0), "negative_only": lambda a: a.clamp_max(0)}
    for estimator, advantage in formulas.items():
        name = f"rlvr_fast_{estimator}" + ("" if mode == "all" else f"_{mode}")
        ours, _ = _call_registered(name, rewards, mask, uids, config)
        torch.testing.assert_close(ours, clip[mode](advantage).unsqueeze(-1) * mask)


def test_epsilon_from_the_config_and_the_argument():
    rewards, mask, uids = _shuffled_batch((4, 4), binary=True)
    config = OmegaConf.create({"rlvr_fast": {"epsilon": 0.5}})
    ours, _ = _call_registered("rlvr_fast_grpo", rewards, mask, uids, config)
    theirs, _ = core_algos.compute_grpo_outcome_advantage(rewards, mask, uids, epsilon=0.5)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    direct, _ = ADVANTAGE_ESTIMATORS["rlvr_fast_grpo"](rewards, mask, uids, epsilon=0.25, config=config)
    theirs, _ = core_algos.compute_grpo_outcome_advantage(rewards, mask, uids, epsilon=0.25)
    torch.testing.assert_close(direct, theirs, rtol=1e-5, atol=1e-6)


def test_singleton_group_gets_zero_where_verl_passes_the_reward_through():
    """The documented difference: a prompt with one completion has no group baseline."""
    rewards = torch.tensor([[0.0, 1.0], [0.0, 0.0], [0.0, 1.0]])
    mask = torch.ones(3, 2)
    uids = np.array(["a", "b", "a"], dtype=object)  # group b has one completion
    ours, _ = _call_registered("rlvr_fast_grpo", rewards, mask, uids)
    rewards[1, 1] = 1.0
    ours_one, _ = _call_registered("rlvr_fast_grpo", rewards, mask, uids)
    theirs, _ = core_algos.compute_grpo_outcome_advantage(rewards, mask, uids)
    assert ours[1].abs().max() == 0 and ours_one[1].abs().max() == 0
    assert theirs[1, 0] == pytest.approx(1.0, rel=1e-5)


def test_estimator_input_errors_name_the_argument():
    rewards, mask, uids = _shuffled_batch((2, 2), binary=True)
    with pytest.raises(ValueError, match=r"index: .*uid"):
        _call_registered("rlvr_fast_grpo", rewards, mask, None)
    with pytest.raises(ValueError, match="index must hold one uid per completion"):
        _call_registered("rlvr_fast_grpo", rewards, mask, uids[:3])
    bad = rewards.clone()
    bad[2, -1] = float("nan")
    with pytest.raises(ValueError, match="completion 2 is nan"):
        _call_registered("rlvr_fast_rloo", bad, mask, uids)
    with pytest.raises(ValueError, match=r"algorithm.rlvr_fast: unknown option\(s\) \['lamda'\]"):
        _call_registered("rlvr_fast_w_reinforce", rewards, mask, uids, OmegaConf.create({"rlvr_fast": {"lamda": 1}}))
    with pytest.raises(ValueError, match="response_mask must have"):
        _call_registered("rlvr_fast_grpo", rewards, mask[:, :2], uids)


# --------------------------------------------------------------------------------------------------------------------
# Policy loss vs verl's compute_policy_loss_vanilla
# --------------------------------------------------------------------------------------------------------------------

CLIPS = [  # (clip_ratio_low, clip_ratio_high, clip_ratio_c): verl's defaults, DAPO's clip-higher, an active dual clip
    (0.2, 0.2, 3.0),
    (0.2, 0.28, 3.0),
    (0.1, 0.3, 1.2),
]


def _actor_config(low, high, c, global_batch_info=None):
    config = ActorConfig(
        strategy="fsdp",
        rollout_n=4,
        ppo_micro_batch_size_per_gpu=2,
        clip_ratio_low=low,
        clip_ratio_high=high,
        clip_ratio_c=c,
    )
    config.global_batch_info.update(global_batch_info or {})
    return config


def _loss_inputs(B=6, T=7, dtype=torch.float64):
    lengths = torch.randint(1, T + 1, (B,))
    lengths[2] = 0  # a fully masked completion: excluded from verl's sequence means
    mask = torch.arange(T) < lengths.unsqueeze(1)
    per_completion = torch.randn(B, dtype=dtype)
    per_completion[4] = 0.0
    old = -torch.rand(B, T, dtype=dtype) * 3
    logp = (old + 0.4 * torch.randn(B, T, dtype=dtype)).clamp_max(0.0)  # ratios well outside [0.7, 1.3]
    # for certain: a negative-advantage token under the dual clip (ratio e > 1.2) and a clipped positive one
    per_completion[0], per_completion[1] = -1.0 - per_completion[0].abs(), 0.5 + per_completion[1].abs()
    old[:2, 0], logp[:2, 0] = -2.0, -1.0
    advantages = per_completion.unsqueeze(1) * mask
    return old, logp, advantages, mask


def _both_losses(config, mode, old, logp, advantages, mask, weights=None):
    results = []
    for fn in (core_algos.compute_policy_loss_vanilla, core_algos.get_policy_loss_fn("rlvr_fast")):
        lp = logp.clone().requires_grad_(True)
        loss, metrics = fn(old, lp, advantages, mask, loss_agg_mode=mode, config=config, rollout_is_weights=weights)
        loss.backward()
        results.append((loss.detach(), lp.grad, metrics))
    return results


@pytest.mark.parametrize("mode", list(LOSS_AGG_MODES))
@pytest.mark.parametrize("clip", CLIPS)
@pytest.mark.parametrize("global_info", [False, True])
def test_policy_loss_matches_verl_vanilla(mode, clip, global_info):
    old, logp, advantages, mask = _loss_inputs()
    info = {}
    if global_info:  # what verl's actor puts in config.global_batch_info under data parallelism
        info = {"dp_size": 4, "batch_num_tokens": 97, "global_batch_size": 19, "loss_scale_factor": 11}
    config = _actor_config(*clip, info)
    (verl_loss, verl_grad, verl_metrics), (loss, grad, metrics) = _both_losses(
        config, mode, old, logp, advantages, mask
    )
    # fp64 inputs; the Triton kernel (auto on the CPU under the interpreter, and on a GPU) computes in fp32
    torch.testing.assert_close(loss.to(verl_loss.dtype), verl_loss, rtol=1e-5, atol=5e-6)
    torch.testing.assert_close(grad, verl_grad, rtol=1e-5, atol=5e-6)
    assert metrics.keys() == verl_metrics.keys()
    for key, value in verl_metrics.items():
        assert metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    assert grad[2].abs().max() == 0  # the fully masked completion


def test_policy_loss_dual_clip_and_both_clips_are_active_in_the_parity_inputs():
    """The parity test above would pass vacuously if no token were clipped: check that its inputs clip."""
    old, logp, advantages, mask = _loss_inputs()
    _, metrics = verl_policy_loss(old, logp, advantages, mask, config=_actor_config(0.1, 0.3, 1.2))
    assert metrics["actor/pg_clipfrac"] > 0 and metrics["actor/pg_clipfrac_lower"] > 0


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_policy_loss_with_rollout_correction_weights_matches_verl(mode):
    old, logp, advantages, mask = _loss_inputs(dtype=torch.float32)
    weights = torch.rand(mask.shape) * 2
    config = _actor_config(0.2, 0.28, 3.0)
    (verl_loss, verl_grad, verl_metrics), (loss, grad, metrics) = _both_losses(
        config, mode, old, logp, advantages, mask, weights
    )
    torch.testing.assert_close(loss, verl_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, verl_grad, rtol=1e-5, atol=1e-6)
    for key, value in verl_metrics.items():
        assert metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_policy_loss_reads_an_omegaconf_actor_config():
    old, logp, advantages, mask = _loss_inputs()
    dict_config = OmegaConf.create({"clip_ratio": 0.2, "clip_ratio_low": None, "clip_ratio_high": 0.28})
    ours, _ = verl_policy_loss(old, logp, advantages, mask, "token-mean", dict_config)
    theirs, _ = core_algos.compute_policy_loss_vanilla(
        old, logp, advantages, mask, config=_actor_config(0.2, 0.28, 3.0)
    )
    torch.testing.assert_close(ours.to(theirs.dtype), theirs, rtol=1e-5, atol=5e-6)


def test_policy_loss_refuses_what_it_cannot_train():
    old, logp, advantages, mask = _loss_inputs()
    config = _actor_config(0.2, 0.2, 3.0)
    per_token = torch.randn(mask.shape, dtype=old.dtype) * mask
    with pytest.raises(ValueError, match="one advantage per completion"):
        verl_policy_loss(old, logp, per_token, mask, config=config)
    with pytest.raises(ValueError, match="loss_agg_mode must be one of"):
        verl_policy_loss(old, logp, advantages, mask, "seq-sum", config)
    with pytest.raises(ValueError, match=r"clip_ratio_c .* must be > 1\.0, got 0\.5"):
        verl_policy_loss(old, logp, advantages, mask, config=OmegaConf.create({"clip_ratio_c": 0.5}))
    config.global_batch_info.update({"dp_size": 2})
    with pytest.raises(ValueError, match=r"global_batch_info\['batch_num_tokens'\] is required when dp_size > 1"):
        verl_policy_loss(old, logp, advantages, mask, "token-mean", config)


# --------------------------------------------------------------------------------------------------------------------
# Fused log-probs vs verl's torch implementation of linear_cross_entropy
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("shape", [(3, 5), (13,)])
def test_linear_cross_entropy_matches_verls_torch_implementation(temperature, shape):
    D, V = 24, 37
    hidden = torch.randn(*shape, D, dtype=torch.float64)
    weight = torch.randn(V, D, dtype=torch.float64) * 0.3
    labels = torch.randint(0, V, shape)
    g_logp, g_ent = torch.randn(2, *shape, dtype=torch.float64)

    results = []
    for fn in (
        lambda h, w: verl_torch_functional.FusedLinearForPPOFunction.apply(h, w, labels, temperature, 4),
        lambda h, w: verl_linear_cross_entropy(h, w, labels, temperature, "none"),
    ):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        logp, entropy = fn(h, w)
        ((logp.reshape(shape) * g_logp).sum() + (entropy.reshape(shape) * g_ent).sum()).backward()
        results.append((logp.reshape(shape), entropy.reshape(shape), h.grad, w.grad))
    # Both sides compute in float32 from these float64 inputs (ours returns float32): they differ by float32 rounding of
    # sums over tokens and the vocabulary, measured up to 4.9e-6 beyond rtol on the weight gradient over 1,200 draws
    # (atol 1e-6 failed once in CI, at 1.1e-6 on the weight gradient).
    for ours, theirs in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(ours.to(theirs.dtype), theirs, rtol=1e-5, atol=1e-5)


def test_fused_logprobs_switch_on_and_off():
    original_lce = verl_lce.linear_cross_entropy
    original_forward = verl_torch_functional.FusedLinearForPPO.forward
    hidden, weight, labels = torch.randn(2, 4, 16), torch.randn(29, 16), torch.randint(0, 29, (2, 4))
    verl_logp, verl_entropy = verl_torch_functional.FusedLinearForPPO()(hidden, weight, labels, 0.9)

    registration = register(fused_linear_logprobs=True)
    assert registration.fused_linear_logprobs and fused_linear_logprobs_enabled()
    register(fused_linear_logprobs=True)  # idempotent: the originals stay saved once
    from verl.utils.kernel.linear_cross_entropy import linear_cross_entropy  # what verl's HF forwards do per call

    assert linear_cross_entropy is verl_linear_cross_entropy
    logp, entropy = verl_torch_functional.FusedLinearForPPO()(hidden, weight, labels, 0.9)  # the torch backend
    assert logp.shape == labels.shape
    torch.testing.assert_close(logp, verl_logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy, verl_entropy, rtol=1e-5, atol=1e-5)

    disable_fused_linear_logprobs()
    assert verl_lce.linear_cross_entropy is original_lce
    assert verl_torch_functional.FusedLinearForPPO.forward is original_forward
    assert not fused_linear_logprobs_enabled()


def test_linear_cross_entropy_refuses_what_it_does_not_implement():
    hidden, weight, labels = torch.randn(4, 8), torch.randn(11, 8), torch.randint(0, 11, (4,))
    with pytest.raises(ValueError, match=r"reduction: .* 'none' only, got 'mean'"):
        verl_linear_cross_entropy(hidden, weight, labels, 1.0, "mean")
    with pytest.raises(ValueError, match="dist_process_group"):
        verl_linear_cross_entropy(hidden, weight, labels, 1.0, "none", object())


# --------------------------------------------------------------------------------------------------------------------
# The README's example
# --------------------------------------------------------------------------------------------------------------------


def test_example_verl_registration_runs(capsys):
    runpy.run_path(os.path.join(ROOT, "examples", "verl_registration.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "max |ours - verl's grpo|" in out and "policy loss" in out
    assert not fused_linear_logprobs_enabled()  # the example switches the fused path off again
