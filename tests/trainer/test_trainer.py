"""The lean trainer on a tiny random Llama / Qwen2 built from a config (no download): every estimator x sample mode,
the loss options, SparseAdamW, exact resume, bad input failing before any model work, and the pieces of one step on
their own (scorer, advantages and filter, update batch, mask warm-up phase, metrics of every iteration)."""

import os

import pytest
import torch
from helpers.runs import TOKEN_BIAS, tiny_config

from rlvr_fast.ops.group_advantage import ESTIMATORS, SAMPLE_MODES
from rlvr_fast.optim import SparseAdamW, random_masks
from rlvr_fast.rewards import filter_groups, reward_fn
from rlvr_fast.testing import assert_close, char_tokenizer, tiny_causal_lm
from rlvr_fast.trainer.config import RLVRConfig, add_config_arguments, config_from_args
from rlvr_fast.trainer.loop import Trainer
from rlvr_fast.trainer.model import LoadedModel
from rlvr_fast.trainer.reporting.log import reproducible_fields, step_breakdown
from rlvr_fast.trainer.reporting.step_timer import STEP_PARTS, StepTimer, part_key
from rlvr_fast.trainer.rollout.data import Problem
from rlvr_fast.trainer.rollout.engines import Rollout
from rlvr_fast.trainer.step import Rewards, Scorer, apply_difficulty_filter, build_update_batch, compute_advantages
from rlvr_fast.trainer.update.loss import policy_step
from rlvr_fast.trainer.update.optimizers import build_optimizer


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


def run(tmp_path, tokenizer, arch="llama", **overrides):
    cfg = tiny_config(tmp_path, **overrides)
    model = tiny_causal_lm(tokenizer, arch=arch, token_bias=TOKEN_BIAS)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = Trainer(cfg, loaded=LoadedModel(model, tokenizer, torch.device("cpu"), torch.float32))
    result = trainer.train()
    return trainer, result, before


def changed(model, before) -> bool:
    return any(not torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())


ESTIMATOR_REWARD = {  # a reward mode each; centred estimators learn from rewards, the others from the verdict
    "grpo": "correct",
    "dr_grpo": "numeric_continuous",
    "rloo": "random",
    "psr": "correct",
    "nsr": "inverse",
    "w_reinforce": "format",
}


@pytest.mark.parametrize("sample_mode", sorted(SAMPLE_MODES))
@pytest.mark.parametrize("estimator", sorted(ESTIMATORS))
def test_every_estimator_and_sample_mode_trains(tmp_path, tokenizer, estimator, sample_mode):
    arch = "qwen2" if estimator in ("rloo", "nsr") else "llama"
    trainer, result, before = run(
        tmp_path,
        tokenizer,
        arch=arch,
        estimator=estimator,
        sample_mode=sample_mode,
        rewards={ESTIMATOR_REWARD[estimator]: 1.0},
    )
    steps = [m for m in result.metrics if "reward_mean" in m]
    assert [m["step"] for m in steps] == [0, 1]
    updated = sum(m["completions_updated"] for m in steps)
    # nsr's advantages are <= 0 and psr's >= 0: clipped to the other sign nothing is left to learn, by construction.
    degenerate = (estimator, sample_mode) in {("nsr", "positive_only"), ("psr", "negative_only")}
    if degenerate:
        assert updated == 0 and not changed(trainer.model, before)
    else:
        assert updated > 0, f"no completion had a non-zero advantage: {steps}"
        assert changed(trainer.model, before)
    for m in steps:
        assert m["completions_updated"] + m["zero_advantage_completions_skipped"] == 16
        assert ("loss" in m) == (m["completions_updated"] > 0)
        assert "loss" not in m or torch.isfinite(torch.tensor(m["loss"]))
    assert set(result.before["pass_at_k"]) == {1, 2}
    out = tmp_path / "run"
    for name in (
        "metrics.jsonl",
        "report.md",
        "reward_curve.png",
        "pass_at_k.png",
        "eval_before.json",
        "eval_after.json",
    ):
        assert (out / name).exists(), name
    assert "| k | pass@k before" in result.table


@pytest.mark.parametrize(
    "overrides",
    [
        dict(loss_type="grpo", importance_sampling="sequence", num_iterations=2, grad_accumulation=2),
        dict(loss_type="dr_grpo", beta=0.1, kl="k3", num_iterations=2, eps_high=0.28, dual_clip=3.0),
        dict(loss_type="bnpo", beta=0.05, kl="k2", grad_accumulation=4, mask_truncated_completions=True),
        dict(loss_type="dapo", filter_all_equal=True, min_solve_rate=0.1, lr_schedule="cosine", warmup_steps=1),
    ],
    ids=["grpo-seq-iter2", "drgrpo-kl-dualclip", "bnpo-k2-accum", "dapo-filters"],
)
def test_loss_options_train(tmp_path, tokenizer, overrides):
    trainer, result, before = run(tmp_path, tokenizer, rewards={"correct": 1.0}, **overrides)
    steps = [m for m in result.metrics if "reward_mean" in m]
    assert trainer.prefix_sharing  # auto, on a Llama
    for m in steps:
        assert_step_breakdown(m, fixed_logprobs=bool(overrides.get("beta") or overrides.get("num_iterations", 1) > 1))
    updated = any(m["completions_updated"] for m in steps)
    if overrides.get("beta"):
        # Updated completions all of advantage 0 (every reward equal) leave only the KL term, whose gradient is exactly
        # 0 while the policy still equals the reference: the model may then stay put even though completions ran.
        assert updated or not changed(trainer.model, before)
    else:  # with beta == 0 only completions of non-zero advantage run
        assert changed(trainer.model, before) == updated
    if overrides.get("beta"):
        assert all("mean_kl" in m for m in steps if m["completions_updated"])
        # with a KL term every kept completion runs, zero advantage or not
        assert all(m["zero_advantage_completions_skipped"] == 0 for m in steps)


def assert_step_breakdown(record: dict, fixed_logprobs: bool) -> None:
    """A step record's time split (present, >= 0, summing to its seconds) and its micro-batch fields."""
    parts = [part_key(p) for p in (*STEP_PARTS, "other")]
    assert all(record[k] >= 0 for k in parts), {k: record[k] for k in parts}
    assert sum(record[k] for k in parts) == pytest.approx(record["seconds"], rel=1e-9, abs=1e-12)
    assert record[part_key("generation")] > 0 and record[part_key("scoring")] > 0
    updated = record["completions_updated"] > 0
    assert (record[part_key("forward_backward")] > 0) == updated
    assert (record[part_key("fixed_logprobs")] > 0) == (updated and fixed_logprobs)
    assert record["micro_batches"] >= 1 if updated else record["micro_batches"] == 0
    assert 0 <= record["padding_fraction"] < 1
    if updated:  # G = 8 completions share each prompt's pass
        assert 0 < record["decoder_tokens"] < record["decoder_tokens_unshared"]
    text = step_breakdown(record)
    assert text.startswith("gen ") and " fb " in text


def test_step_breakdown_text():
    record = {part_key("generation"): 4.12, part_key("forward_backward"): 6.25, part_key("optimizer"): 0.31}
    record.update({part_key("scoring"): 0.01, part_key("fixed_logprobs"): 0.0, part_key("other"): 0.2})
    assert step_breakdown(record) == "gen 4.1s fb 6.2s opt 0.3s other 0.2s"
    with pytest.raises(ValueError, match=r"StepTimer.part: name must be one of .*got 'update'"):
        StepTimer().part("update").__enter__()


def test_prefix_sharing_setting(tmp_path, tokenizer, caplog):
    """One setting for the update and the rollout: on / off / auto on a Llama; a model the update cannot share (sliding
    window layers) is refused by on, naming the reason, and its update runs unshared under auto, said once by class
    name, while its rollout still shares the prompt (the sampler keeps transformers' sliding-window cache layers)."""
    import logging

    from rlvr_fast.trainer.update import shared_prefix_forward as prefix_sharing

    for mode, shared in (("on", True), ("off", False), ("auto", True)):
        trainer = trainer_for(tmp_path, tokenizer, prefix_sharing=mode)
        assert trainer.prefix_sharing is shared and trainer.generator.shared_prefix is shared

    def sliding_trainer(mode):
        model = tiny_causal_lm(tokenizer, arch="qwen2", token_bias=TOKEN_BIAS)
        model.config.layer_types = ["sliding_attention", "full_attention"]
        loaded = LoadedModel(model, tokenizer, torch.device("cpu"), torch.float32)
        return Trainer(tiny_config(tmp_path, prefix_sharing=mode), loaded=loaded)

    with pytest.raises(ValueError, match=r"prefix_sharing='on' but Qwen2ForCausalLM has sliding_attention layers"):
        sliding_trainer("on")
    prefix_sharing._reported.discard("Qwen2ForCausalLM")
    with caplog.at_level(logging.WARNING, logger=prefix_sharing.__name__):
        trainers = [sliding_trainer("auto"), sliding_trainer("auto")]
    assert not any(t.prefix_sharing for t in trainers) and all(t.generator.shared_prefix for t in trainers)
    said = [r.getMessage() for r in caplog.records if "Qwen2ForCausalLM" in r.getMessage()]
    assert len(said) == 1 and "sliding_attention" in said[0]


def test_sparse_adamw_leaves_unmasked_entries_unchanged(tmp_path, tokenizer):
    trainer, _result, before = run(
        tmp_path, tokenizer, optimizer="sparse_adamw", mask_source="random:0.2", rewards={"random": 1.0}
    )
    # The trainer's mask, rebuilt independently from the same seed and density.
    masks = random_masks(dict(trainer.model.named_parameters()), 0.2, seed=trainer.cfg.seed)
    n_changed_inside = n_changed_outside = 0
    for name, p in trainer.model.named_parameters():
        diff = ~torch.eq(p.detach(), before[name])
        n_changed_inside += int((diff & masks[name]).sum())
        n_changed_outside += int((diff & ~masks[name]).sum())
    assert n_changed_inside > 0
    assert n_changed_outside == 0


@pytest.mark.parametrize("loss_type", ["dapo", "bnpo", "grpo"])
def test_micro_batches_and_checkpointing_give_the_single_pass_gradient(tmp_path, tokenizer, loss_type):
    """Uneven micro-batches (3 over a batch that does not split evenly) with activation checkpointing give the gradient
    of one un-checkpointed pass over the whole step; the model stays in eval mode, the layers' flags restored."""
    from rlvr_fast.trainer.update.memory import _recomputed_layers

    grads = []
    for accumulation, checkpointing in ((1, False), (3, True)):
        cfg = tiny_config(
            tmp_path,
            loss_type=loss_type,
            grad_accumulation=accumulation,
            gradient_checkpointing=checkpointing,
            rewards={"correct": 1.0, "random": 0.5},
        )
        model = tiny_causal_lm(tokenizer, arch="llama", token_bias=TOKEN_BIAS)
        trainer = Trainer(cfg, loaded=LoadedModel(model, tokenizer, torch.device("cpu"), torch.float32))
        problems = trainer.train_problems[: cfg.prompts_per_step]
        rollout = trainer.rollout(problems, 0)
        rewards = trainer.scorer(rollout.texts, problems, 0)
        kept = apply_difficulty_filter(rewards, cfg)
        batch = build_update_batch(rollout, compute_advantages(rewards, cfg).advantages, kept, cfg)
        assert len(batch.advantages) > 3  # several micro-batches (the random reward leaves few zero advantages)
        model.zero_grad(set_to_none=True)
        policy_step(model, batch, cfg)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        assert not model.training and not any(layer.training for layer in _recomputed_layers(model))
        assert getattr(_recomputed_layers(model)[0], "gradient_checkpointing", False) == checkpointing
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-8, name=name)


def _strip_timing(records):
    return [reproducible_fields(r) for r in records]


def test_resume_equals_uninterrupted_run(tmp_path, tokenizer):
    full_dir, part_dir = tmp_path / "full", tmp_path / "part"
    common = dict(steps=4, checkpoint_every=2, rewards={"correct": 1.0, "random": 0.5})
    full, full_result, _ = run(tmp_path, tokenizer, output_dir=str(full_dir), **common)

    # The interrupted run: stop after step 2 (its checkpoint), then a fresh process resumes from it.
    cfg = tiny_config(tmp_path, output_dir=str(part_dir), **{**common, "steps": 4})
    model = tiny_causal_lm(tokenizer, token_bias=TOKEN_BIAS)
    interrupted = Trainer(cfg, loaded=LoadedModel(model, tokenizer, torch.device("cpu"), torch.float32))
    interrupted.cfg.steps = 2  # same schedule (built for 4 steps), but the process dies after step 2
    interrupted.train()
    assert sorted(os.listdir(part_dir / "checkpoints")) == ["latest", "step-000002"]

    cfg_resume = tiny_config(tmp_path, output_dir=str(part_dir), resume=True, **common)
    model2 = tiny_causal_lm(tokenizer, token_bias=TOKEN_BIAS, seed=123)  # different init: the checkpoint must win
    resumed = Trainer(cfg_resume, loaded=LoadedModel(model2, tokenizer, torch.device("cpu"), torch.float32))
    resumed_result = resumed.train()

    for (n, a), (_, b) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), n
    assert _strip_timing(full_result.metrics) == _strip_timing(resumed_result.metrics)
    assert full_result.after == resumed_result.after


# --------------------------------------------------------------------------------------------------------------------
# Configuration and bad input: fail before the model loads
# --------------------------------------------------------------------------------------------------------------------


def test_help_lists_every_option_with_its_default():
    import argparse

    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    text = parser.format_help()
    for name in RLVRConfig.field_names():
        assert f"--{name}" in text, name
    assert "(default: 8)" in text and "(default: 'dapo')" in text


def test_flags_override_yaml(tmp_path):
    import argparse

    path = tmp_path / "run.yaml"
    path.write_text("group_size: 4\nlr: 0.001\nrewards: {correct: 1.0, format: 0.2}\n")
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    cfg = config_from_args(parser.parse_args(["--config", str(path), "--lr", "3e-5", "--eps_high", "none"]))
    assert cfg.group_size == 4 and cfg.lr == 3e-5 and cfg.eps_high is None
    assert cfg.rewards == {"correct": 1.0, "format": 0.2}
    path.write_text("group_sise: 4\n")
    with pytest.raises(ValueError, match=r"unknown config keys \['group_sise'\]"):
        config_from_args(parser.parse_args(["--config", str(path)]))


def test_flags_with_hyphens_and_the_new_fields(capsys):
    import argparse

    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    args = [
        "--prefix-sharing",
        "off",
        "--micro-batch-tokens",
        "256",
        "--output-dir",
        "/tmp/x",
        "--grad_accumulation",
        "2",
    ]
    cfg = config_from_args(parser.parse_args(args))
    assert (cfg.prefix_sharing, cfg.micro_batch_tokens, cfg.output_dir, cfg.grad_accumulation) == (
        "off",
        256,
        "/tmp/x",
        2,
    )
    assert RLVRConfig().prefix_sharing == "auto" and RLVRConfig().grad_accumulation is None
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--prefix-sharing", "yes"])
    assert exit_info.value.code == 2
    assert "RLVRConfig.prefix_sharing must be one of ['auto', 'on', 'off'], got 'yes'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(group_size=0), r"RLVRConfig.group_size must be >= 1, got 0"),
        (dict(temperature=0.0), r"RLVRConfig.temperature must be >= 0.0001, got 0.0"),
        (dict(estimator="ppo"), r"RLVRConfig.estimator must be one of .*got 'ppo'"),
        (dict(estimator="rloo", scale="batch"), r"scale='batch' does not apply to estimator='rloo'"),
        (dict(loss_type="cispo"), r"RLVRConfig.loss_type must be one of .*got 'cispo'"),
        (dict(optimizer="sparse_adamw"), r"mask_source is required"),
        (dict(rewards={}), r"rewards must name at least one reward mode"),
        (dict(rewards={"correct": "high"}), r"rewards\['correct'\] must be a finite number"),
        (dict(grad_accumulation=0), r"RLVRConfig.grad_accumulation must be >= 1 or None, got 0"),
        (dict(micro_batch_tokens=0), r"RLVRConfig.micro_batch_tokens must be >= 1, got 0"),
        (dict(prefix_sharing="yes"), r"RLVRConfig.prefix_sharing must be one of \['auto', 'on', 'off'\], got 'yes'"),
        (dict(min_solve_rate=0.8, max_solve_rate=0.2), r"min_solve_rate \(0.8\) must be <= max_solve_rate \(0.2\)"),
    ],
)
def test_bad_config_fails_with_the_field_name(overrides, match):
    with pytest.raises(ValueError, match=match):
        RLVRConfig(**overrides).validate()


def test_bad_reward_and_data_fail_before_the_model_loads(tmp_path, monkeypatch):
    import rlvr_fast.trainer.loop as loop

    def no_model(cfg):  # pragma: no cover - reaching it is the failure
        raise AssertionError("the model was loaded before the configuration was checked")

    monkeypatch.setattr(loop, "load_model", no_model)
    with pytest.raises(ValueError, match=r"unknown reward modes \['corect'\]"):
        Trainer(tiny_config(tmp_path, rewards={"corect": 1.0}))
    with pytest.raises(ValueError, match=r"eval_file is required with a JSONL task"):
        Trainer(tiny_config(tmp_path, eval_file=None))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1 + 1", "answer": "2"}\n{"prompt": "2 + 2"}\n')
    with pytest.raises(ValueError, match=r"line 2"):
        Trainer(tiny_config(tmp_path, task=str(bad)))


def test_prompt_longer_than_max_prompt_length_is_rejected(tmp_path, tokenizer):
    with pytest.raises(ValueError, match=r"more than max_prompt_length=4"):
        run(tmp_path, tokenizer, max_prompt_length=4)


# --------------------------------------------------------------------------------------------------------------------
# The pieces of one step on their own: the scorer (rewards and verdicts, nothing else), advantages and the difficulty
# filter, the update batch, the warm-up phase of a gradient-saliency mask, the metrics of every iteration
# --------------------------------------------------------------------------------------------------------------------


def trainer_for(tmp_path, tokenizer, **overrides) -> Trainer:
    cfg = tiny_config(tmp_path, **overrides)
    model = tiny_causal_lm(tokenizer, arch="llama", token_bias=TOKEN_BIAS)
    return Trainer(cfg, loaded=LoadedModel(model, tokenizer, torch.device("cpu"), torch.float32))


# ---- scoring, advantages, filter -------------------------------------------------------------------------------------

TEXTS = ["5", "The answer is 5.", "4", "<think>x</think> 5", "7", "abc"]
PROBLEMS = [Problem("2 + 3 =", "5", {}), Problem("1 + 3 =", "4", {})]


def test_scorer_returns_rewards_and_verdicts_only(tmp_path):
    cfg = tiny_config(tmp_path, group_size=3, rewards={"correct": 1.0, "format": 0.25})
    rewards = Scorer(cfg)(TEXTS, PROBLEMS, step=0)
    assert isinstance(rewards, Rewards)
    assert set(vars(rewards)) == {"total", "correct", "components", "errors"}  # no advantages, no filter
    answers = ["5"] * 3 + ["4"] * 3
    correct = reward_fn("correct")(TEXTS, answers)
    fmt = reward_fn("format")(TEXTS, answers)
    assert rewards.components == {"correct": correct, "format": fmt}
    expected = torch.tensor([1.0 * c + 0.25 * f for c, f in zip(correct, fmt)], dtype=torch.float32)
    assert torch.equal(rewards.total, expected)
    assert rewards.correct.dtype == torch.bool and rewards.correct.tolist() == [c > 0.5 for c in correct]
    assert rewards.errors == 0


def test_advantages_and_filter_read_the_run_config(tmp_path):
    cfg = tiny_config(
        tmp_path, group_size=3, estimator="grpo", filter_all_equal=True, min_solve_rate=0.2, max_solve_rate=0.9
    )
    total = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5])
    rewards = Rewards(total, total > 0.5, {"correct": total.tolist()}, 0)
    adv = compute_advantages(rewards, cfg)
    group = total.view(3, 3)
    manual = (group - group.mean(1, keepdim=True)) / (group.std(1, keepdim=True) + cfg.adv_eps)
    torch.testing.assert_close(adv.advantages, manual.flatten())
    kept = apply_difficulty_filter(rewards, cfg)
    # group 1 is all correct (solve rate 1 > 0.9, and all equal), group 2 all equal with solve rate 0
    assert kept.keep.tolist() == [True, False, False]
    assert kept.removed == filter_groups(total, total > 0.5, group_size=3, p_min=0.2, p_max=0.9).removed


# ---- the update batch ------------------------------------------------------------------------------------------------


def toy_rollout(completion_mask: list[list[int]], truncated: list[bool]) -> Rollout:
    n, lc = len(completion_mask), len(completion_mask[0])
    return Rollout(
        prompt_ids=torch.arange(n * 2).view(n, 2),
        prompt_mask=torch.ones(n, 2, dtype=torch.long),
        completion_ids=torch.arange(n * lc).view(n, lc),
        completion_mask=torch.tensor(completion_mask),
        truncated=torch.tensor(truncated),
        texts=[f"c{i}" for i in range(n)],
    )


@pytest.mark.parametrize("beta", [0.0, 0.1])
@pytest.mark.parametrize("mask_truncated", [False, True])
def test_update_batch_keeps_filtered_groups_and_skips_zero_advantages(tmp_path, beta, mask_truncated):
    cfg = tiny_config(tmp_path, group_size=2, beta=beta, mask_truncated_completions=mask_truncated)
    # 3 groups of 2; group 1 dropped by the filter; completion 2 has no tokens; completion 4 is truncated.
    mask = [[1, 1, 0], [1, 1, 1], [0, 0, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0]]
    rollout = toy_rollout(mask, [False, False, False, False, True, False])
    advantages = torch.tensor([0.5, 0.0, 0.0, 0.0, -1.0, 0.0])
    kept = filter_groups(torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0, 1.0]), group_size=2, drop_all_equal=True)
    assert kept.keep.tolist() == [True, False, True]
    batch = build_update_batch(rollout, advantages, kept, cfg)

    tokens = torch.tensor(mask).float().sum(1)
    if mask_truncated:
        tokens[4] = 0
    in_kept = [0, 1, 4, 5]
    counted = [i for i in in_kept if tokens[i] > 0]
    runs = [i for i in counted if advantages[i] != 0 or beta > 0]
    skipped = [i for i in counted if i not in runs]
    assert batch.rollout.texts == [f"c{i}" for i in runs]
    assert torch.equal(batch.advantages, advantages[runs])
    assert batch.loss_mask.sum(1).tolist() == tokens[runs].tolist()
    assert batch.step_rows == len(in_kept)
    assert batch.step_tokens == float(tokens[in_kept].sum())
    assert (batch.skipped_rows, batch.skipped_tokens) == (len(skipped), float(tokens[skipped].sum()))
    assert batch.old_logp is None and batch.ref_logp is None  # the update computes them


# ---- the warm-up phase of a gradient-saliency mask -------------------------------------------------------------------


def count_warm_up_rollouts(trainer: Trainer) -> list[int]:
    calls = []
    original = trainer.rollout

    def counting(problems, step):
        calls.append(step)
        return original(problems, step)

    trainer.rollout = counting
    return calls


def test_grad_mask_warm_up_is_a_phase_that_runs_once_and_again_on_resume(tmp_path, tokenizer):
    common = dict(
        steps=2, checkpoint_every=1, optimizer="sparse_adamw", mask_source="grad:0.3:2", rewards={"random": 1.0}
    )
    first = trainer_for(tmp_path, tokenizer, **common)
    calls = count_warm_up_rollouts(first)
    assert first.optimizer is None  # construction runs no rollout: the warm-up is its own phase
    with pytest.raises(RuntimeError, match=r"needs warm_up_masks\(\) before the first update"):
        first.update(None)
    first.warm_up_masks()
    assert calls == [-1, -2] and isinstance(first.optimizer, SparseAdamW)
    optimizer = first.optimizer
    first.cfg.steps = 1  # same schedule (built for 2 steps), but the process dies after step 1's checkpoint
    result = first.train()  # train() calls warm_up_masks() again: a no-op now
    assert calls == [-1, -2, 0] and first.optimizer is optimizer
    assert all("iterations" not in m for m in result.metrics)  # one iteration: no per-iteration list

    resumed = trainer_for(tmp_path, tokenizer, resume=True, **common)
    calls = count_warm_up_rollouts(resumed)
    resumed_result = resumed.train()
    # The masks are not in the checkpoint: the warm-up runs again (once) on the base weights before the checkpoint
    # loads, and SparseAdamW.load_state_dict raises unless its masks are the checkpoint's.
    assert calls == [-1, -2, 1]
    assert [m["step"] for m in resumed_result.metrics if "reward_mean" in m] == [0, 1]


def test_build_optimizer_takes_masks_only_from_a_grad_warm_up(tmp_path, tokenizer):
    model = tiny_causal_lm(tokenizer, arch="llama")
    masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in model.named_parameters()}
    grad_cfg = tiny_config(tmp_path, optimizer="sparse_adamw", mask_source="grad:0.1").validate()
    with pytest.raises(ValueError, match=r"mask_source='grad:0.1'.*warm-up"):
        build_optimizer(grad_cfg, model)
    assert isinstance(build_optimizer(grad_cfg, model, masks), SparseAdamW)
    with pytest.raises(ValueError, match=r"masks were given, but optimizer='adamw'"):
        build_optimizer(tiny_config(tmp_path).validate(), model, masks)


# ---- metrics of every iteration --------------------------------------------------------------------------------------


def test_metrics_cover_every_iteration(tmp_path, tokenizer):
    trainer = trainer_for(tmp_path, tokenizer, steps=1, num_iterations=2, rewards={"random": 1.0})
    result = trainer.train()
    steps = [m for m in result.metrics if "reward_mean" in m]  # read back from metrics.jsonl
    assert steps and all(m["completions_updated"] > 0 for m in steps)
    for m in steps:
        first, last = m["iterations"]
        for it in (first, last):
            assert {"loss", "grad_norm", "mean_ratio", "tokens_updated"} <= set(it)
        assert {k: m[k] for k in last} == last  # the top level is the last iteration's
        assert first["mean_ratio"] == pytest.approx(1.0, abs=1e-5)  # on-policy before the first optimizer step
        assert first["loss"] != last["loss"]  # the second iteration sees the weights the first one stepped to
