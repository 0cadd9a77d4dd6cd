"""rlvr_fast inside TRL's GRPOTrainer: the patched trainer trains exactly what the stock one does.

Each equivalence case runs TRL 1.16's GRPOTrainer twice on a tiny random Llama saved to a temporary folder, stock and
patched, from the same seed, and compares the loss of every micro-batch, the gradient of every parameter at every
optimizer step, and the logged metrics. Generation is the one thing the patch does not touch, and it is the one thing
whose output could drift between the runs (sampling from weights that differ by float rounding), so the patched run
replays the stock run's rollouts together with the RNG state after each, and everything downstream (rewards,
advantages, old / reference log-probs, the loss, the optimizer) runs for real on both sides.

Also here: the refusal of every setting the fused path cannot train exactly, the version pin, the reward-mode adapters
and the sample-mode / estimator options.
"""

from __future__ import annotations

import dataclasses
import re
import types

import pytest
import torch

pytest.importorskip("trl")

import trl
from datasets import Dataset
from helpers.trl_parity import (
    PROMPTS,
    STOP_TOKENS,
    Recorder,
    grpo_config,
    length_parity,
    record_or_replay_generation,
    reward_funcs,
)
from trl import GRPOTrainer

from rlvr_fast.backends import BackendUnavailableError
from rlvr_fast.integrations.policy_loss import hidden_state_policy_loss
from rlvr_fast.integrations.trl import (
    SUPPORTED_TRL,
    RLVRFastGRPOTrainer,
    UnsupportedTRLSetting,
    check_trl_version,
    patch_grpo_trainer,
    trl_reward_func,
)
from rlvr_fast.integrations.trl import trainer as rf_trl
from rlvr_fast.integrations.trl.config import REFUSALS, TRLLossSettings, check_model, check_settings
from rlvr_fast.ops.grpo_loss import grpo_loss
from rlvr_fast.ops.logprobs import token_logprobs
from rlvr_fast.ops.objective import PolicyObjective
from rlvr_fast.rewards import reward_fn
from rlvr_fast.testing import assert_close, char_tokenizer, tiny_causal_lm


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: these models are tiny, and on a loaded 2-core machine two MKL threads spin-wait so badly
    that a (48 x 32) @ (32 x 64) matmul takes 15 ms instead of 4 us."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("tiny_llama")
    model = tiny_causal_lm(tokenizer, hidden=32, layers=2, seed=1234)
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids(STOP_TOKENS)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def dataset():
    return Dataset.from_dict({"prompt": PROMPTS, "answer": [str(eval(p[:-1])) for p in PROMPTS]})


def run_stock(model_dir, tokenizer, dataset, args, funcs=None):
    rec = Recorder()
    trainer = GRPOTrainer(
        model=model_dir,
        reward_funcs=funcs or reward_funcs(),
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[rec],
    )
    rec.attach(trainer)
    rollouts = record_or_replay_generation(trainer, None)
    trainer.train()
    return rec, rollouts, trainer.state.log_history


def run_patched(model_dir, tokenizer, dataset, args, rollouts, *, via="subclass", funcs=None, **options):
    rec = Recorder()
    kwargs = dict(
        model=model_dir,
        reward_funcs=funcs or reward_funcs(),
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[rec],
    )
    if via == "subclass":
        trainer = RLVRFastGRPOTrainer(**kwargs, **options)
    else:
        trainer = patch_grpo_trainer(GRPOTrainer(**kwargs), **options)
    rec.attach(trainer)
    record_or_replay_generation(trainer, list(rollouts))
    trainer.train()
    return rec, trainer.state.log_history


# --------------------------------------------------------------------------------------------------------------------
# Stock vs patched: every loss type, token and sequence importance sampling, beta 0 and > 0
# --------------------------------------------------------------------------------------------------------------------

KL = dict(beta=0.1, use_bias_correction_kl=False)
BIAS_KL = dict(beta=0.04)  # TRL's default use_bias_correction_kl=True: the KL term times the importance ratio
ACCUM = dict(gradient_accumulation_steps=2, per_device_train_batch_size=4)
OFF_POLICY = dict(num_iterations=2)  # step 2 reuses step 1's rollouts: ratios != 1, old log-probs from our head

CASES = {
    "grpo-token": dict(loss_type="grpo", **OFF_POLICY),
    "grpo-sequence-kl": dict(loss_type="grpo", importance_sampling_level="sequence", **KL, **OFF_POLICY),
    "bnpo-token-kl-accum": dict(loss_type="bnpo", **KL, **ACCUM),
    "bnpo-sequence-truncmask": dict(
        loss_type="bnpo",
        importance_sampling_level="sequence",
        mask_truncated_completions=True,
        max_completion_length=8,
        **OFF_POLICY,
    ),
    "dr_grpo-token-temperature": dict(loss_type="dr_grpo", temperature=0.7, scale_rewards="none", **OFF_POLICY),
    "dr_grpo-sequence-kl-accum": dict(loss_type="dr_grpo", importance_sampling_level="sequence", **KL, **ACCUM),
    # steps_per_generation != gradient_accumulation_steps: dapo's num_items_in_batch spans the generation batch and
    # TRL rescales it to one accumulation window
    "dapo-token-kl-accum-offpolicy": dict(
        loss_type="dapo", scale_rewards="batch", **KL, **ACCUM, **OFF_POLICY, steps_per_generation=4, max_steps=3
    ),
    # TRL's default objective at beta > 0, off-policy so that the ratio weighting the KL is not 1
    "bnpo-token-biaskl-offpolicy": dict(loss_type="bnpo", **BIAS_KL, **OFF_POLICY),
    "grpo-sequence-biaskl-offpolicy": dict(
        loss_type="grpo", importance_sampling_level="sequence", **BIAS_KL, **OFF_POLICY
    ),
    "dapo-sequence-dualclip": dict(
        loss_type="dapo", importance_sampling_level="sequence", epsilon=0.05, epsilon_high=0.08, delta=1.1, **OFF_POLICY
    ),
}

# Where a case goes through patch_grpo_trainer (an already-built trainer) instead of the subclass, and where the fused
# ops run their Triton kernels (compiled on a GPU; through the interpreter on a CPU under tests/conftest.py).
VIA_PATCH = {"bnpo-token-kl-accum", "dapo-sequence-dualclip"}
TRITON = {"grpo-sequence-kl", "grpo-sequence-biaskl-offpolicy"}

# float32 on both sides. The gradients differ by rounding only (~5e-7 relative observed). The loss is a sum of terms
# of size |A| ~ 1 that cancel (a group's advantages sum to 0), so it is compared to an absolute rounding floor.
GRAD_RTOL = 2e-5
LOSS_ATOL = 2e-6
METRIC_RTOL = 1e-4


def compare_runs(
    stock: Recorder, patched: Recorder, stock_log, patched_log, *, token_level: bool, entropy: bool = True
):
    assert len(stock.grads) == len(patched.grads) > 0
    assert len(stock.losses) == len(patched.losses) > 0
    for step, (g_stock, g_ours) in enumerate(zip(stock.grads, patched.grads)):
        assert g_stock.keys() == g_ours.keys()
        norm = sum(float(g.norm()) ** 2 for g in g_stock.values()) ** 0.5
        assert norm > 0, f"step {step}: the stock gradient is zero, the comparison would prove nothing"
        for name, g in g_stock.items():
            assert_close(g_ours[name], g, rtol=GRAD_RTOL, name=f"step {step} grad {name}")
    for i, (l_stock, l_ours) in enumerate(zip(stock.losses, patched.losses)):
        assert abs(float(l_ours) - float(l_stock)) <= LOSS_ATOL + 1e-4 * abs(float(l_stock)), (
            f"micro-batch {i}: loss {float(l_ours)!r} vs stock {float(l_stock)!r}"
        )
    metrics = ["entropy"] if entropy else []
    metrics += ["kl"]
    if token_level:  # at sequence level TRL averages its clip fractions per completion, we per token
        metrics += ["clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"]
    for step, (a, b) in enumerate(zip(stock_log, patched_log)):
        for key in metrics:
            if key in a:
                assert key in b, f"step {step}: the patched run does not log {key}"
                assert abs(b[key] - a[key]) <= METRIC_RTOL * max(abs(a[key]), 1e-3), (
                    f"step {step}: {key} {b[key]!r} vs stock {a[key]!r}"
                )


def entropy_comparable(stock: Recorder, args) -> bool:
    """The default (fused) implementation skips the LM head of zero-advantage completions when beta == 0, and its
    entropy metric then averages over the other tokens only; it equals TRL's when nothing was skipped."""
    return args.beta != 0 or all(bool((a != 0).all()) for a in stock.advantages)


@pytest.mark.parametrize("case", sorted(CASES))
def test_patched_matches_stock(case, tmp_path, model_dir, tokenizer, dataset, seeded):
    """The default implementation (policy_loss.DEFAULT_IMPLEMENTATION, the fused op) against stock TRL."""
    args = grpo_config(tmp_path, seeded % 10_000, **CASES[case])
    stock, rollouts, stock_log = run_stock(model_dir, tokenizer, dataset, args)
    patched, patched_log = run_patched(
        model_dir,
        tokenizer,
        dataset,
        args,
        rollouts,
        via="patch" if case in VIA_PATCH else "subclass",
        backend="auto" if case in TRITON else "torch",
    )
    compare_runs(
        stock,
        patched,
        stock_log,
        patched_log,
        token_level=args.importance_sampling_level == "token",
        entropy=entropy_comparable(stock, args),
    )
    if args.beta:
        assert any("kl" in row and row["kl"] > 0 for row in patched_log), "the KL term never came into play"


@pytest.mark.parametrize(
    "case",
    ["grpo-sequence-kl", "bnpo-sequence-truncmask", "dapo-token-kl-accum-offpolicy", "grpo-sequence-biaskl-offpolicy"],
)
def test_composed_implementation_matches_stock(case, tmp_path, model_dir, tokenizer, dataset, seeded):
    """The same comparison through the two-op implementation (token_logprobs + grpo_loss), entropy included."""
    args = grpo_config(tmp_path, seeded % 10_000, **CASES[case])
    stock, rollouts, stock_log = run_stock(model_dir, tokenizer, dataset, args)
    patched, patched_log = run_patched(
        model_dir, tokenizer, dataset, args, rollouts, backend="torch", implementation="composed"
    )
    compare_runs(stock, patched, stock_log, patched_log, token_level=args.importance_sampling_level == "token")


def test_clipping_and_dual_clip_are_exercised(tmp_path, model_dir, tokenizer, dataset):
    """A fixed setup (seed, lr, small epsilon) where the second update of a rollout is clipped on both sides and the
    dual-clip bound binds, so the equality of the gradients covers those branches (TRL's delta = our dual_clip)."""
    args = grpo_config(
        tmp_path,
        2,
        loss_type="dapo",
        epsilon=0.02,
        epsilon_high=0.03,
        delta=1.05,
        learning_rate=1.0,
        num_iterations=2,
        max_steps=2,
    )
    stock, rollouts, stock_log = run_stock(model_dir, tokenizer, dataset, args)
    patched, patched_log = run_patched(model_dir, tokenizer, dataset, args, rollouts, backend="torch")
    compare_runs(stock, patched, stock_log, patched_log, token_level=True, entropy=entropy_comparable(stock, args))
    second = patched_log[1]
    assert second["clip_ratio/low_mean"] > 0 and second["clip_ratio/high_mean"] > 0, second
    assert second["rlvr_fast/dual_clip_frac"] > 0, second
    assert second["clip_ratio/region_mean"] < 1, "everything clipped: the gradient would be zero"


# --------------------------------------------------------------------------------------------------------------------
# The one loss function and the head
# --------------------------------------------------------------------------------------------------------------------


def test_hidden_state_policy_loss_composes_the_two_ops(generator):
    """The integration's single loss call equals token_logprobs + grpo_loss spelled out, and ignores what lies under
    the mask (targets there may be anything: they are skipped, not projected)."""
    B, T, D, V = 3, 5, 8, 11
    hidden = torch.randn(B, T, D, generator=generator, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, D, generator=generator, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, V, (B, T), generator=generator)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, 3:] = 0
    mask[2, 1:] = 0
    adv = torch.randn(B, generator=generator, dtype=torch.float64)
    old = -torch.rand(B, T, generator=generator, dtype=torch.float64) * 3
    spec = PolicyObjective(loss_type="grpo", eps_low=0.1, eps_high=0.15, temperature=0.8)
    loss, metrics = hidden_state_policy_loss(
        hidden,
        weight,
        targets.masked_fill(mask == 0, 10_000),
        mask,
        adv,
        spec,
        old_logp=old,
        backend="torch",
        implementation="composed",
    )
    loss.backward()
    got = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    logp, ent = token_logprobs(hidden, weight, targets, temperature=0.8, return_entropy=True, backend="torch")
    ref, ref_metrics = grpo_loss(
        logp, old, None, adv, mask, eps_low=0.1, eps_high=0.15, loss_type="grpo", entropy=ent.detach(), backend="torch"
    )
    ref.backward()
    assert_close(loss, ref, rtol=1e-12, name="loss")
    assert_close(got[0], hidden.grad, rtol=1e-10, name="d hidden")
    assert_close(got[1], weight.grad, rtol=1e-10, name="d weight")
    assert_close(metrics.mean_ratio, ref_metrics.mean_ratio, rtol=1e-12, name="mean_ratio")
    with pytest.raises(ValueError, match="implementation"):
        hidden_state_policy_loss(hidden, weight, targets, mask, adv, spec, implementation="nope")
    # The default, fused implementation computes in float64 throughout, while token_logprobs hands grpo_loss float32
    # log-probs: the two differ by float32 rounding of O(1) per-token terms, so a loss near 0 needs an absolute bound.
    fused, _ = hidden_state_policy_loss(
        hidden.detach(), weight.detach(), targets, mask, adv, spec, old_logp=old, backend="torch"
    )
    assert_close(fused, ref, rtol=1e-6, atol=1e-6, name="fused loss")


def test_head_scores_only_the_labelled_positions(model_dir, tokenizer):
    """model(..., fused_lm_head=True) answers TRL's call from our head: the same log-probs and entropy as the full
    logits, zero where the label is -100, generation untouched; installing twice is refused."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = tokenizer(["1+2=34", "7+1=8x"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits.double() / 0.7
    rf_trl.install_hidden_state_head(model, temperature=0.7, with_entropy=True, backend="torch")
    labels = ids.masked_fill(torch.arange(ids.shape[1]) < 4, -100)
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, fused_lm_head=True)
    logp_full = torch.log_softmax(logits[:, :-1], -1)
    expected = logp_full.gather(-1, ids[:, 1:, None]).squeeze(-1).masked_fill(labels[:, 1:] == -100, 0.0)
    entropy = -(logp_full.exp() * logp_full).sum(-1).masked_fill(labels[:, 1:] == -100, 0.0)
    assert_close(out.log_probs, expected, rtol=1e-5, name="log_probs")
    assert_close(out.entropy, entropy, rtol=1e-5, name="entropy")
    hidden = model(input_ids=ids, rlvr_fast_hidden_last=2)
    assert hidden.shape == (2, 2, 32)
    with torch.no_grad():
        assert_close(model(input_ids=ids).logits, logits.float() * 0.7, rtol=1e-5, name="plain forward")
    with pytest.raises(RuntimeError, match="already"):
        rf_trl.install_hidden_state_head(model, temperature=1.0)


# --------------------------------------------------------------------------------------------------------------------
# Refusals: every setting the fused path cannot train exactly, named
# --------------------------------------------------------------------------------------------------------------------

REFUSED = {
    "loss_type": [dict(loss_type=t) for t in ("cispo", "sapo", "luspo", "vespo")],
    "importance_sampling_level": [dict(importance_sampling_level="document")],
    "top_entropy_quantile": [dict(top_entropy_quantile=0.2)],
    "entropy_coef": [dict(entropy_coef=0.01)],
    "use_adaptive_entropy": [dict(use_adaptive_entropy=True)],
    "off_policy_mask_threshold": [dict(off_policy_mask_threshold=0.5)],
    "delta": [dict(delta=1.1, epsilon_high=0.28), dict(delta=0.9)],
    "vllm_importance_sampling_mode": [
        dict(use_vllm=True, vllm_importance_sampling_mode="token_mask"),
        dict(use_vllm=True, importance_sampling_level="sequence", vllm_importance_sampling_mode="token_truncate"),
    ],
    "vllm_importance_sampling_clip_min": [
        dict(use_vllm=True, vllm_importance_sampling_mode=m, vllm_importance_sampling_clip_min=0.5)
        for m in ("token_truncate", "sequence_truncate")
    ],
}


def test_every_refusal_is_tested():
    assert set(REFUSED) | {"router_aux_loss_coef"} == {r.field for r in REFUSALS}


@pytest.mark.parametrize(
    "field,overrides",
    [(f, o) for f, cases in REFUSED.items() for o in cases],
    ids=lambda x: x if isinstance(x, str) else ",".join(f"{k}={v}" for k, v in x.items()),
)
def test_unsupported_setting_is_refused_before_loading(field, overrides, tmp_path, tokenizer, dataset):
    args = grpo_config(tmp_path, 0, **overrides)
    # a model path that does not exist: the refusal must come before TRL loads anything
    with pytest.raises(UnsupportedTRLSetting, match=rf"GRPOConfig\.{field}"):
        RLVRFastGRPOTrainer(
            model=str(tmp_path / "not-a-model"),
            reward_funcs=reward_funcs(),
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
        )


def test_supported_neighbours_are_accepted(tmp_path):
    """The refusals are not over-broad: the settings next to them train."""
    # TRL's default use_bias_correction_kl=True: the ratio-weighted KL at beta > 0, nothing at beta == 0 (TRL too)
    assert rf_trl.check_grpo_config(grpo_config(tmp_path, 0, beta=0.04)).kl_ratio_weighted
    assert not rf_trl.check_grpo_config(
        grpo_config(tmp_path, 0, beta=0.04, use_bias_correction_kl=False)
    ).kl_ratio_weighted
    assert not rf_trl.check_grpo_config(grpo_config(tmp_path, 0, beta=0.0)).kl_ratio_weighted
    for overrides in (
        dict(delta=1.3, epsilon_high=0.28),
        dict(beta=0.04, use_bias_correction_kl=False),
        dict(use_vllm=True, vllm_importance_sampling_correction=False),
        dict(use_vllm=True),  # TRL's default correction with vLLM: sequence_mask, clip_max 3
        dict(use_vllm=True, vllm_importance_sampling_mode="token_truncate"),
        dict(use_vllm=True, vllm_importance_sampling_mode="sequence_mask", vllm_importance_sampling_clip_min=0.5),
        dict(use_vllm=True, importance_sampling_level="sequence", vllm_importance_sampling_mode="sequence_truncate"),
        dict(top_entropy_quantile=1.0),
    ):
        spec = rf_trl.check_grpo_config(grpo_config(tmp_path, 0, **overrides))
        assert isinstance(spec, PolicyObjective)
    spec = rf_trl.check_grpo_config(
        grpo_config(
            tmp_path,
            0,
            loss_type="dr_grpo",
            epsilon=0.1,
            epsilon_high=0.3,
            delta=1.5,
            importance_sampling_level="sequence",
            temperature=0.6,
        )
    )
    assert spec == PolicyObjective(
        loss_type="dr_grpo",
        beta=0.0,
        kl="k3",
        eps_low=0.1,
        eps_high=0.3,
        dual_clip=1.5,
        importance_sampling="sequence",
        temperature=0.6,
        max_completion_length=6,
    )


def test_moe_aux_loss_is_refused(tmp_path):
    settings = TRLLossSettings.from_config(grpo_config(tmp_path, 0))
    with pytest.raises(UnsupportedTRLSetting, match="router_aux_loss_coef"):
        check_settings(dataclasses.replace(settings, router_aux_loss=True))


def test_patch_refusal_leaves_the_stock_trainer(tmp_path, model_dir, tokenizer, dataset):
    trainer = GRPOTrainer(
        model=model_dir,
        reward_funcs=reward_funcs(),
        args=grpo_config(tmp_path, 0),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    trainer.args.top_entropy_quantile = 0.5  # changed after the trainer was built
    with pytest.raises(UnsupportedTRLSetting, match="top_entropy_quantile"):
        patch_grpo_trainer(trainer)
    assert type(trainer) is GRPOTrainer
    trainer.args.top_entropy_quantile = 1.0
    patch_grpo_trainer(trainer, backend="torch")
    with pytest.raises(RuntimeError, match="already"):
        patch_grpo_trainer(trainer)
    # TRL's loss reads the trainer's attributes on every call, and so does the patched one
    trainer.top_entropy_quantile = 0.5
    with pytest.raises(UnsupportedTRLSetting, match="top_entropy_quantile"):
        trainer.train()


def test_models_it_cannot_reproduce_are_refused(tokenizer):
    model = tiny_causal_lm(tokenizer)
    check_model(model)
    for attr, value in (("final_logit_softcapping", 30.0), ("logit_scale", 0.5), ("logits_scaling", 8.0)):
        bad = tiny_causal_lm(tokenizer)
        setattr(bad.config, attr, value)
        with pytest.raises(UnsupportedTRLSetting, match=attr):
            check_model(bad)
    multimodal = tiny_causal_lm(tokenizer)
    multimodal.config.get_text_config = lambda *a, **k: types.SimpleNamespace()
    with pytest.raises(UnsupportedTRLSetting, match="multimodal"):
        check_model(multimodal)
    adapted = tiny_causal_lm(tokenizer)
    adapted.lm_head.base_layer = torch.nn.Linear(2, 2)  # what a PEFT tuner layer looks like from outside
    with pytest.raises(UnsupportedTRLSetting, match="lm_head"):
        check_model(adapted)


def test_trl_version_is_pinned(monkeypatch, tmp_path, tokenizer, dataset):
    assert check_trl_version() == trl.__version__
    for bad in ("1.15.9", "1.17.0", "2.0.0", "not-a-version"):
        with pytest.raises(ImportError, match=re.escape(SUPPORTED_TRL)):
            check_trl_version(bad)
    assert check_trl_version("1.16.4") == "1.16.4"
    monkeypatch.setattr(trl, "__version__", "1.17.0")
    with pytest.raises(ImportError, match=r"found trl 1\.17\.0"):
        RLVRFastGRPOTrainer(
            model="unused",
            reward_funcs=reward_funcs(),
            args=grpo_config(tmp_path, 0),
            train_dataset=dataset,
            processing_class=tokenizer,
        )


# --------------------------------------------------------------------------------------------------------------------
# Reward-mode adapters
# --------------------------------------------------------------------------------------------------------------------


def test_reward_modes_as_trl_reward_functions():
    prompts = ["2+3=", "2+3=", "1+1=", "1+1="]
    texts = ["it is 5", "\\boxed{6}", "2", "two"]
    answers = [5, 5, 2, 2]
    f = trl_reward_func("correct")
    assert f.__name__ == "rlvr_fast_correct"
    assert f(prompts, texts, answer=answers) == reward_fn("correct")(texts, [str(a) for a in answers])
    # conversational prompts and completions: the last assistant message is the answer
    chat_prompts = [[{"role": "user", "content": p}] for p in prompts]
    chat = [[{"role": "assistant", "content": [{"type": "text", "text": t}]}] for t in texts]
    assert f(chat_prompts, chat, answer=answers) == f(prompts, texts, answer=answers)
    with pytest.raises(ValueError, match="'answer'"):
        f(prompts, texts, solution=answers)
    fmt = trl_reward_func("format", answer_column=None)
    assert fmt(prompts, texts) == [0.0, 1.0, 0.0, 0.0]
    with pytest.raises(TypeError, match="gamma"):
        trl_reward_func("correct", gamma=0.5)
    with pytest.raises(ValueError, match="unknown reward mode"):
        trl_reward_func("nope")


def test_random_mode_keys_on_prompt_index_and_step():
    f = trl_reward_func("random", answer_column=None, gamma=0.5, seed=11)
    prompts = ["a"] * 8 + ["b"] * 8
    texts = ["x"] * 16
    state = types.SimpleNamespace(global_step=3)
    got = f(prompts, texts, trainer_state=state)
    expected = reward_fn("random", gamma=0.5, seed=11)(
        texts, [""] * 16, prompts=prompts, completion_index=[i % 8 for i in range(16)], step=3
    )
    assert got == expected
    assert got != f(prompts, texts, trainer_state=types.SimpleNamespace(global_step=4))  # a new draw every step
    assert 0 < sum(got) < 16


def test_majority_and_incorrect_label_modes_read_groups_and_columns():
    prompts = ["p"] * 3 + ["q"] * 3
    texts = ["7", "7", "8", "1", "2", "2"]
    assert trl_reward_func("majority_label", answer_column=None)(prompts, texts) == [1, 1, 0, 0, 1, 1]
    wrong = trl_reward_func("incorrect_label", answer_column=None, context_columns={"incorrect_answers": "bad"})
    assert wrong(prompts, texts, bad=["8"] * 3 + ["1"] * 3) == [0, 0, 1, 1, 0, 0]
    with pytest.raises(ValueError, match="'bad'"):
        wrong(prompts, texts)


# --------------------------------------------------------------------------------------------------------------------
# Sample modes and estimators: they change the advantages TRL computes, and only those
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stock_reference(tmp_path_factory, model_dir, tokenizer, dataset):
    """One stock step with scale_rewards='none' (TRL's advantage = r - group mean), its rollouts and advantages."""
    tmp = tmp_path_factory.mktemp("stock_adv")
    args = grpo_config(tmp, 5, max_steps=1, scale_rewards="none", reward_weights=[1.0, 0.5, 0.0])
    funcs = [*reward_funcs(), length_parity]
    rec, rollouts, _ = run_stock(model_dir, tokenizer, dataset, args, funcs)
    return args, funcs, rollouts, rec


def parity_of(rec: Recorder) -> torch.Tensor:
    return (rec.completion_mask[0].sum(dim=1) % 2).float()


ADVANTAGE_OPTIONS = {
    "positive_only": (dict(sample_mode="positive_only"), lambda stock, c: stock.clamp_min(0.0)),
    "negative_only": (dict(sample_mode="negative_only"), lambda stock, c: stock.clamp_max(0.0)),
    "grpo-as-trl": (dict(estimator="grpo"), lambda stock, c: stock),
    "rloo": (dict(estimator="rloo"), lambda stock, c: stock * 4 / 3),  # G / (G - 1) (r - mean)
    "psr": (dict(estimator="psr", verifier="length_parity"), lambda stock, c: c),
    "nsr-negative_only": (
        dict(estimator="nsr", verifier="length_parity", sample_mode="negative_only"),
        lambda stock, c: c - 1,
    ),
    "w_reinforce": (
        dict(estimator="w_reinforce", verifier="length_parity", lam=0.25),
        lambda stock, c: torch.where(c > 0, 0.25, -1.0),
    ),
}


@pytest.mark.parametrize("name", sorted(ADVANTAGE_OPTIONS))
def test_sample_modes_and_estimators(name, stock_reference, model_dir, tokenizer, dataset):
    args, funcs, rollouts, stock = stock_reference
    options, expected = ADVANTAGE_OPTIONS[name]
    patched, log = run_patched(model_dir, tokenizer, dataset, args, rollouts, funcs=funcs, backend="torch", **options)
    assert torch.equal(patched.completion_mask[0], stock.completion_mask[0])  # same rollouts, same order
    want = expected(stock.advantages[0], parity_of(stock))
    assert_close(patched.advantages[0], want, rtol=1e-5, atol=1e-6, name=f"{name} advantages")
    assert log[0]["rlvr_fast/advantage_nonzero_frac"] == pytest.approx(float((want != 0).float().mean()))


def test_advantage_options_are_checked(tmp_path, model_dir, tokenizer, dataset):
    kwargs = dict(model=model_dir, reward_funcs=reward_funcs(), train_dataset=dataset, processing_class=tokenizer)
    with pytest.raises(ValueError, match="sample_mode"):
        RLVRFastGRPOTrainer(args=grpo_config(tmp_path, 0), sample_mode="both", **kwargs)
    with pytest.raises(ValueError, match="verifier"):
        RLVRFastGRPOTrainer(args=grpo_config(tmp_path, 0), estimator="psr", **kwargs)
    with pytest.raises(ValueError, match="scale_rewards"):  # psr has its own normalisation: say so explicitly
        RLVRFastGRPOTrainer(args=grpo_config(tmp_path, 0), estimator="psr", verifier="char_sum_reward", **kwargs)
    with pytest.raises(ValueError, match="not one of the trainer's reward functions"):
        RLVRFastGRPOTrainer(
            args=grpo_config(tmp_path, 0, scale_rewards="none"), estimator="psr", verifier="nope", **kwargs
        )
    with pytest.raises(ValueError, match="multi_objective_aggregation"):
        RLVRFastGRPOTrainer(
            args=grpo_config(tmp_path, 0, multi_objective_aggregation="normalize_then_sum"), estimator="grpo", **kwargs
        )


def test_readme_example_trains(tmp_path, model_dir):
    """examples/trl_grpo.py (the README's "use inside TRL" example) runs end to end on the tiny model: the patched
    trainer, our reward modes as TRL reward functions, a sample mode."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "examples", "trl_grpo.py")
    spec = importlib.util.spec_from_file_location("trl_grpo_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = example.main(
        ["--model", model_dir, "--steps", "1", "--sample-mode", "negative_only", "--output-dir", str(tmp_path / "out")]
    )
    assert isinstance(out["trainer"], RLVRFastGRPOTrainer)
    assert len(out["rewards"]) == 1 and 0.0 <= out["rewards"][0] <= 2.0


def test_backend_and_implementation_are_checked_at_construction(tmp_path, model_dir, tokenizer, dataset):
    """backend="junk" used to be accepted at construction, and an unavailable backend failed only at the first
    loss call, after generation. Both now fail while the trainer is built: a bad name before any model loads."""
    kwargs = dict(reward_funcs=reward_funcs(), train_dataset=dataset, processing_class=tokenizer)
    missing = str(tmp_path / "not-a-model")  # a refusal that comes first never gets to load it
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'cuda', 'triton', 'torch'\), got 'junk'"):
        RLVRFastGRPOTrainer(model=missing, args=grpo_config(tmp_path, 0), backend="junk", **kwargs)
    with pytest.raises(ValueError, match=r"implementation must be None or one of .*got 'junk'"):
        RLVRFastGRPOTrainer(model=missing, args=grpo_config(tmp_path, 0), implementation="junk", **kwargs)
    # a valid name the machine cannot run (the loss ops have no CUDA C++ kernel; the model is on the CPU)
    with pytest.raises(BackendUnavailableError, match=r"backend='cuda' cannot run token_logprobs on cpu"):
        RLVRFastGRPOTrainer(model=model_dir, args=grpo_config(tmp_path, 0), backend="cuda", **kwargs)
    trainer = GRPOTrainer(model=model_dir, args=grpo_config(tmp_path, 0), **kwargs)
    for bad, error in (("junk", ValueError), ("cuda", BackendUnavailableError)):
        with pytest.raises(error, match="backend"):
            patch_grpo_trainer(trainer, backend=bad)
        assert type(trainer) is GRPOTrainer  # a refused trainer stays the stock one


# --------------------------------------------------------------------------------------------------------------------
# vLLM's importance-sampling correction (TRL's default with use_vllm=True)
# --------------------------------------------------------------------------------------------------------------------

# (TRL's vllm_importance_sampling_mode, importance_sampling_level, clip_min)
VLLM_IS_CASES = [
    ("token_truncate", "token", None),
    ("sequence_truncate", "token", None),
    ("sequence_mask", "token", None),
    ("sequence_mask", "token", 0.7),
    ("sequence_truncate", "sequence", None),
    ("sequence_mask", "sequence", 0.7),
]


def trl_vllm_is_ratio(old, sampling, mask, mode: str, clip_max: float, clip_min: float | None) -> torch.Tensor:
    """TRL 1.16's importance_sampling_ratio (trl/trainer/grpo_trainer.py, _generate_and_score_completions), restated:
    exp of the masked log-difference (summed per completion for sequence modes), clamped (truncate modes) or zeroed
    outside [clip_min, clip_max] (mask modes)."""
    diff = torch.nan_to_num((old - sampling) * mask, nan=0.0)
    if mode.startswith("sequence"):
        diff = diff.sum(dim=-1, keepdim=True)
    ratio = torch.exp(diff)
    if mode.endswith("truncate"):
        return torch.clamp(ratio, min=clip_min, max=clip_max)
    low = clip_min if clip_min is not None else -float("inf")
    return ratio.masked_fill((ratio < low) | (ratio > clip_max), 0.0)


def _vllm_is_inputs(trainer, mode: str, clip_max: float, clip_min: float | None, seed: int) -> dict:
    """One micro-batch of TRL inputs: old log-probs (the model's own plus noise, some tokens near-certain, as real
    ones are) and vLLM's sampling log-probs (old plus noise, <= 0), with TRL's ratio computed from them as its mode
    does; the noise is wide enough that some ratios are truncated or masked and some are not."""
    g = torch.Generator().manual_seed(seed)
    b, p, t, vocab = 8, 5, 6, trainer.model.config.vocab_size
    prompt_ids = torch.randint(3, vocab, (b, p), generator=g)
    completion_ids = torch.randint(3, vocab, (b, t), generator=g)
    lengths = torch.tensor([6, 1, 4, 6, 3, 5, 2, 6])
    completion_mask = (torch.arange(t)[None, :] < lengths[:, None]).long()
    with torch.no_grad():
        logits = trainer.model(input_ids=torch.cat([prompt_ids, completion_ids], 1)).logits[:, p - 1 : -1]
        logp = torch.log_softmax(logits.float() / trainer.temperature, -1).gather(-1, completion_ids[..., None])[..., 0]
    old = logp + 0.2 * torch.randn(b, t, generator=g)
    old[:, 0] = -0.01  # a near-certain token in every completion: the rollout log-probs must stay <= 0 there too
    sampling = (old + 0.5 * torch.randn(b, t, generator=g)).clamp(max=0.0)
    ratio = trl_vllm_is_ratio(old, sampling, completion_mask, mode, clip_max, clip_min)
    if mode.endswith("truncate"):
        assert (ratio == clip_max).any() and (ratio < clip_max).any()
    else:
        assert (ratio == 0).any() and (ratio > 0).any()
    return {
        "prompt_ids": prompt_ids,
        "prompt_mask": torch.ones_like(prompt_ids),
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": torch.randn(b, generator=g),
        "old_per_token_logps": old,
        "importance_sampling_ratio": ratio,
        "num_items_in_batch": completion_mask.sum(),
    }


@pytest.mark.parametrize("mode,level,clip_min", VLLM_IS_CASES, ids=str)
def test_vllm_importance_sampling_correction_matches_stock(
    mode, level, clip_min, tmp_path, model_dir, tokenizer, dataset
):
    """With use_vllm and vllm_importance_sampling_correction (TRL's default with vLLM), TRL multiplies the policy term
    by its precomputed ``importance_sampling_ratio``; the patched trainer turns that ratio into the fused loss's
    rollout correction (``trainer.rollout_inputs_from_ratio``). Stock and patched ``_compute_loss`` on the same
    micro-batch: the same loss and gradients, for every mode we accept, at token level and under GSPO. The same inputs
    with the ratio all ones give another loss, so the comparison can fail."""
    clip_max = 1.5
    args = grpo_config(
        tmp_path,
        0,
        loss_type="bnpo",
        importance_sampling_level=level,
        vllm_importance_sampling_clip_max=clip_max,
        vllm_importance_sampling_clip_min=clip_min,
    )
    kwargs = dict(model=model_dir, reward_funcs=reward_funcs(), args=args, train_dataset=dataset)
    stock = GRPOTrainer(**kwargs, processing_class=tokenizer)
    ours = RLVRFastGRPOTrainer(**kwargs, processing_class=tokenizer, backend="torch")
    for trainer in (stock, ours):  # what TRL sets with use_vllm=True (its construction would need vLLM installed)
        trainer.use_vllm, trainer.vllm_importance_sampling_correction = True, True
        trainer.vllm_importance_sampling_mode = mode
        trainer.current_gradient_accumulation_steps = 1
        trainer.model.train()
    inputs = _vllm_is_inputs(stock, mode, clip_max, clip_min, seed=len(mode) + len(level))

    def loss_and_grads(trainer, compute, batch):
        trainer.model.zero_grad(set_to_none=True)
        loss = compute(trainer.model, batch)
        loss.backward()
        return loss.detach(), {n: q.grad.clone() for n, q in trainer.model.named_parameters() if q.grad is not None}

    stock_loss, stock_grads = loss_and_grads(stock, lambda m, x: GRPOTrainer._compute_loss(stock, m, x), inputs)
    our_loss, our_grads = loss_and_grads(ours, ours._compute_loss, inputs)
    assert abs(float(our_loss) - float(stock_loss)) <= LOSS_ATOL + 1e-4 * abs(float(stock_loss)), (our_loss, stock_loss)
    assert stock_grads.keys() == our_grads.keys() and stock_grads
    for name, grad in stock_grads.items():
        assert_close(our_grads[name], grad, rtol=GRAD_RTOL, name=f"grad {name}")
    uncorrected = {**inputs, "importance_sampling_ratio": torch.ones_like(inputs["importance_sampling_ratio"])}
    other_loss, _ = loss_and_grads(ours, ours._compute_loss, uncorrected)
    assert abs(float(other_loss) - float(our_loss)) > 100 * LOSS_ATOL


def test_rollout_inputs_from_ratio_reproduce_the_ratio():
    g = torch.Generator().manual_seed(0)
    old = -torch.rand(3, 5, generator=g) * 4.0
    old[:, 0] = -1e-3
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    adv = torch.tensor([1.0, -2.0, 0.5])
    sampling = (old + torch.randn(3, 5, generator=g)).clamp(max=0.0)
    ratio = trl_vllm_is_ratio(old, sampling, mask, "token_truncate", 2.0, None)
    rollout, same_adv = rf_trl.rollout_inputs_from_ratio(old, ratio, mask, adv, "token_truncate")
    assert_close(torch.exp(old - rollout).clamp(max=2.0), ratio, rtol=1e-5, name="token ratio")
    assert torch.equal(same_adv, adv) and bool((rollout <= 1e-6).all())
    per_sequence = torch.tensor([[0.5], [0.0], [1.7]])  # the second dropped by a mask mode
    rollout, masked_adv = rf_trl.rollout_inputs_from_ratio(old, per_sequence, mask, adv, "sequence_truncate")
    summed = ((old - rollout) * mask).sum(-1)
    assert_close(torch.exp(summed[[0, 2]]), per_sequence[[0, 2], 0], rtol=1e-5, name="sequence ratio")
    assert torch.equal(masked_adv, torch.tensor([1.0, 0.0, 0.5]))
    assert torch.equal(rollout[mask == 0], old[mask == 0]) and bool((rollout <= 1e-6).all())
    with pytest.raises(ValueError, match=r"\(B, 1\) for a sequence-level correction"):
        rf_trl.rollout_inputs_from_ratio(old, ratio, mask, adv, "sequence_truncate")
