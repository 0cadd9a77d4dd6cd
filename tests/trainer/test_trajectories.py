"""Trajectory processing (rlvr_fast/trainer/trajectories): the replay store, lessons that never carry the gold answer,
the rebuilt groups every later stage sees, LUFFY's shaped importance weight against a plain autograd reference, every
mode training on a tiny model, exact resume with the store, and the combinations refused before the model loads."""

import os
import random
import sys
import types

import pytest
import torch
from helpers.runs import TOKEN_BIAS, tiny_config, tiny_loaded

from rlvr_fast.testing import assert_close, char_tokenizer, tiny_causal_lm
from rlvr_fast.trainer.loop import Trainer
from rlvr_fast.trainer.model import LoadedModel
from rlvr_fast.trainer.reporting.log import reproducible_fields
from rlvr_fast.trainer.rollout.data import Problem
from rlvr_fast.trainer.schema import ConfigFieldError
from rlvr_fast.trainer.step import Rewards, build_update_batch, compute_advantages
from rlvr_fast.trainer.trajectories.lessons import SCRUBBED, default_lesson, diagnose, scrub_gold
from rlvr_fast.trainer.trajectories.modes import TRAJECTORY_MODES
from rlvr_fast.trainer.trajectories.rows import with_carrier
from rlvr_fast.trainer.trajectories.store import ReplayStore, StoredTrajectory
from rlvr_fast.trainer.update.loss import policy_step

# every prompt of the 4-problem task comes back each step (train_size == prompts_per_step): the store gets used
SMALL = dict(train_size=4, prompts_per_step=4, group_size=4, max_prompt_length=200, rewards={"correct": 1.0})


def trainer_for(tmp_path, **overrides) -> Trainer:
    return Trainer(tiny_config(tmp_path, **{**SMALL, **overrides}), loaded=tiny_loaded())


def entry(ids, step=0, text="5") -> StoredTrajectory:
    return StoredTrajectory(list(ids), [-0.5] * len(ids), text, False, step)


# ---- the store ---------------------------------------------------------------------------------------------------


def test_store_keeps_the_newest_capacity_per_prompt_and_round_trips():
    store = ReplayStore(capacity=2)
    store.extend([("a", entry([1], 0)), ("a", entry([2], 1)), ("b", entry([3], 1)), ("a", entry([4], 2))])
    assert [t.completion_ids for t in store.entries["a"]] == [[2], [4]] and len(store) == 3
    again = ReplayStore(capacity=2)
    again.load_state_dict(store.state_dict())
    assert again.state_dict() == store.state_dict()
    assert store.pick("missing", random.Random(0)) is None
    with pytest.raises(ValueError, match="tokens but"):
        StoredTrajectory([1, 2], [0.0], "x", False, 0)


# ---- lessons -----------------------------------------------------------------------------------------------------


def test_failures_are_diagnosed_by_kind():
    prompt = "What is 17 + 25? Reply with just the number."
    assert diagnose("41", True, prompt) == "truncated"
    assert diagnose("What is 17 + 25? Reply with", False, prompt) == "repeated_question"
    assert diagnose("I do not know", False, prompt) == "no_answer"
    assert diagnose("The answer is 41", False, prompt) == "wrong_answer"
    lesson = default_lesson(prompt, ["The answer is 41", "43", "hmm"], [False, False, False], [False] * 3)
    assert "41" in lesson and "43" in lesson and "no final answer" in lesson


@pytest.mark.parametrize(
    "text,scrubbed",
    [
        ("The answer is 42", True),
        ("42.0", True),
        ("\\boxed{42}", True),
        ("forty-two or 42.00", True),
        ("x = 42, not 41", False),  # its final answer is 41: the lesson never names 42
        ("\\frac{84}{2}", True),  # equal to the gold by the verifier's equivalence
        ("1042", True),  # any occurrence, inside another number too
    ],
)
def test_lesson_never_contains_the_gold_answer(text, scrubbed):
    prompt = "What is 17 + 25?"
    lesson = default_lesson(prompt, [text, "41"], [False, False], [False, False])
    clean, scrubs = scrub_gold(lesson, ["42"])
    assert "42" not in clean and "84" not in clean and (scrubs >= 1) == scrubbed
    assert "41" in clean  # the wrong answer stays (it is no gold)


def test_any_builder_is_scrubbed_including_a_malicious_one(tmp_path, monkeypatch):
    module = types.ModuleType("leaky_lessons")
    module.build = lambda prompt, texts, correct, truncated: "Hint: it is 5, or 5.0, or 10/2."
    monkeypatch.setitem(sys.modules, "leaky_lessons", module)
    trainer = trainer_for(tmp_path, trajectory_processing="lessons", lesson_builder="leaky_lessons:build")
    problems = trainer.problems_at(0)
    texts = ["5"] * 16
    correct = torch.zeros(4, 4, dtype=torch.bool)
    lesson, message = trainer.trajectories.lesson_for(
        trainer, problems, texts, correct, [False] * 16, 0, random.Random(0)
    )
    assert "5" not in lesson and lesson.count(SCRUBBED) == 3
    assert message == f"{problems[0].prompt}\n\n{lesson}" and trainer.trajectories.scrubs_total == 3


def test_random_lesson_comes_from_another_problem_and_is_scrubbed_of_both_golds(tmp_path):
    trainer = trainer_for(tmp_path, trajectory_processing="random_lesson")
    problems = [Problem("first question", "7", {}), Problem("second question", "9", {})]
    texts = ["The answer is 3"] * 4 + ["8", "9", "it is 7", "8"]
    correct = torch.zeros(2, 4, dtype=torch.bool)
    lesson, message = trainer.trajectories.lesson_for(
        trainer, problems, texts, correct, [False] * 8, 0, random.Random(0)
    )
    assert message.startswith("first question") and "8" in lesson and "3" not in lesson
    assert "7" not in lesson and "9" not in lesson


# ---- the rebuilt groups ------------------------------------------------------------------------------------------


def all_wrong(n: int) -> Rewards:
    return Rewards(torch.zeros(n), torch.zeros(n, dtype=torch.bool), {"correct": [0.0] * n}, 0)


def test_replay_replaces_one_sample_of_an_all_wrong_group_and_every_stage_sees_it(tmp_path):
    trainer = trainer_for(tmp_path, trajectory_processing="replay")
    problems = trainer.problems_at(0)
    rollout = trainer.rollout(problems, 0)
    five = trainer.tokenizer("5", add_special_tokens=False)["input_ids"] + [trainer.tokenizer.eos_token_id]
    trainer.trajectories.store.add(problems[1].prompt, entry(five))
    rollout.texts = ["4"] * 16  # every sample wrong (answer 5)
    out, texts, rewards = trainer.trajectories.rebuild(trainer, problems, rollout, rollout.texts, all_wrong(16), 0)
    assert len(texts) == 16 and texts[7] == "5" and out.completion_ids.shape[0] == 16
    assert out.completion_ids[7, : len(five)].tolist() == five and int(out.completion_mask[7].sum()) == len(five)
    off = ~torch.isnan(out.rollout_logprobs).any(dim=1)
    assert off.nonzero().flatten().tolist() == [7]
    assert out.rollout_logprobs[7, : len(five)].tolist() == [-0.5] * len(five)
    assert rewards.correct.tolist() == [False] * 7 + [True] + [False] * 8  # re-scored: group 1 now has signal
    assert trainer.trajectories.processed.tolist() == [False, True, False, False]
    assert trainer.trajectories.metrics["traj_groups_rescued"] == 1
    # advantages and the filter see the rebuilt group; replay_positive_only zeroes its negatives
    adv = trainer.trajectories.shape_advantages(compute_advantages(rewards, trainer.cfg))
    group = adv.advantages[4:8]
    assert group[3] > 0 and bool((group[:3] == 0).all()) and bool((adv.advantages[[0, 8, 12]] == 0).all())
    plain = compute_advantages(rewards, trainer.cfg).advantages[4:8]
    assert bool((plain[:3] < 0).all())  # without the option they were negative


def test_lessons_resample_the_group_and_train_without_the_lesson(tmp_path):
    trainer = trainer_for(tmp_path, trajectory_processing="lessons")
    problems = trainer.problems_at(0)
    rollout = trainer.rollout(problems, 0)
    out, texts, _ = trainer.trajectories.rebuild(trainer, problems, rollout, rollout.texts, all_wrong(16), 0)
    assert texts != rollout.texts and len(trainer.trajectories.lessons) == 4
    # without: the prompt rows are the original prompts (re-padded), each carrying the lesson-conditioned log-probs
    for r in range(16):
        keep = out.prompt_mask[r].bool()
        assert out.prompt_ids[r][keep].tolist() == rollout.prompt_ids[r][rollout.prompt_mask[r].bool()].tolist()
    assert not torch.isnan(out.rollout_logprobs).any()
    m = trainer.trajectories.metrics
    assert m["traj_lesson_samples"] == 16 and m["traj_prompt_tokens_added"] > 0 and "traj_hint_reliance" in m


def test_lessons_with_the_lesson_train_on_policy_under_the_lesson_prompt(tmp_path):
    trainer = trainer_for(tmp_path, trajectory_processing="lessons", lesson_training="with")
    problems = trainer.problems_at(0)
    rollout = trainer.rollout(problems, 0)
    out, _, _ = trainer.trajectories.rebuild(trainer, problems, rollout, rollout.texts, all_wrong(16), 0)
    assert bool(torch.isnan(out.rollout_logprobs).all(dim=1).all())  # no off-policy row
    assert bool((out.prompt_mask.sum(dim=1) > rollout.prompt_mask.sum(dim=1)).all())


def test_uniform_processes_as_many_groups_as_are_all_wrong_chosen_at_random(tmp_path):
    trainer = trainer_for(tmp_path, trajectory_processing="uniform")
    problems = trainer.problems_at(0)
    rollout = trainer.rollout(problems, 0)
    correct = torch.zeros(16, dtype=torch.bool)
    correct[[0, 4, 8]] = True  # only group 3 is all wrong
    rewards = Rewards(correct.float(), correct, {"correct": correct.float().tolist()}, 0)
    trainer.trajectories.rebuild(trainer, problems, rollout, rollout.texts, rewards, 0)
    assert int(trainer.trajectories.processed.sum()) == 1
    assert len(trainer.trajectories.store) == 4 * 2  # any completions: replay_capacity per group, whatever the verdict


# ---- LUFFY's shaped weight through the loss -------------------------------------------------------------------------


def reference_logp(model, ro, temperature):
    ids = torch.cat([ro.prompt_ids, ro.completion_ids], dim=1)
    mask = torch.cat([ro.prompt_mask, ro.completion_mask], dim=1)
    pos = (mask.long().cumsum(-1) - 1).clamp_min(0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float()
    lp = ro.prompt_ids.shape[1]
    logits = logits[:, lp - 1 : -1] / temperature
    return torch.log_softmax(logits, dim=-1).gather(-1, ro.completion_ids.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("gamma", [0.1, 0.7])
def test_off_policy_gradient_equals_the_plain_luffy_reference(tmp_path, gamma):
    trainer = trainer_for(tmp_path, trajectory_processing="replay", replay_gamma=gamma)
    cfg, model = trainer.cfg, trainer.model
    problems = trainer.problems_at(0)
    rollout = trainer.rollout(problems, 0)
    torch.manual_seed(1)
    with torch.no_grad():
        base = reference_logp(model, rollout, cfg.temperature)
    off_rows = [1, 6, 11]
    behaviour = torch.full_like(base, float("nan"))
    behaviour[off_rows] = base[off_rows] + torch.randn(3, base.shape[1]) * 1.5  # another policy sampled these
    carried = with_carrier(rollout, torch.nan_to_num(behaviour, nan=0.0))
    carried.rollout_logprobs[[r for r in range(16) if r not in off_rows]] = float("nan")
    advantages = torch.linspace(-1.0, 1.0, 16)
    kept = types.SimpleNamespace(completion_mask=lambda g: torch.ones(16, dtype=torch.bool))
    batch = build_update_batch(carried, advantages, kept, cfg)
    batch = trainer.trajectories.weight_batch(trainer, batch, carried)
    assert batch.rollout.rollout_logprobs is None
    model.zero_grad(set_to_none=True)
    policy_step(model, batch, cfg)
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    # the reference, written out: on-policy rows the GRPO surrogate at ratio 1, off-policy rows -f(r) A with
    # f(r) = r / (r + gamma), r = pi_theta / pi_behaviour per token, no clipping; token mean over the step (dapo)
    model.zero_grad(set_to_none=True)
    logp = reference_logp(model, rollout, cfg.temperature)
    mask = rollout.completion_mask.float()
    on_term = torch.exp(logp - logp.detach())
    r = torch.exp(logp - torch.nan_to_num(behaviour, nan=0.0))
    off_term = r / (r + gamma)
    is_off = torch.zeros(16, 1, dtype=torch.bool)
    is_off[off_rows] = True
    per_token = -torch.where(is_off, off_term, on_term) * advantages[:, None]
    loss = (per_token * mask).sum() / mask.sum()
    loss.backward()
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert_close(got[name], p.grad, rtol=2e-4, atol=1e-7, name=name)
    m = trainer.trajectories.metrics
    f = off_term.detach()[off_rows][mask[off_rows] > 0]
    assert abs(m["traj_is_weight_mean"] - float(f.mean())) < 1e-5
    assert abs(m["traj_is_weight_min"] - float(f.min())) < 1e-5 and abs(m["traj_is_weight_max"] - float(f.max())) < 1e-5


# ---- whole runs --------------------------------------------------------------------------------------------------


def test_off_leaves_the_step_as_it_was(tmp_path):
    trainer = trainer_for(tmp_path, steps=1)
    problems = trainer.problems_at(0)
    rollout = trainer.rollout(problems, 0)
    rewards = all_wrong(16)
    assert trainer.trajectories.rebuild(trainer, problems, rollout, rollout.texts, rewards, 0)[0] is rollout
    result = trainer.train()
    assert not any(k.startswith("traj_") for m in result.metrics for k in m)
    assert trainer.trajectories.state_dict()["store"] is None


@pytest.mark.parametrize(
    "mode,extra",
    [(m, {}) for m in sorted(TRAJECTORY_MODES) if m != "off"] + [("lessons", {"lesson_training": "with"})],
)
def test_every_mode_trains(tmp_path, mode, extra):
    trainer = trainer_for(tmp_path, trajectory_processing=mode, steps=3, **extra)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    metrics = [m for m in trainer.train().metrics if "reward_mean" in m]
    assert any(not torch.equal(p.detach(), before[n]) for n, p in trainer.model.named_parameters())
    assert all("traj_rescued_frac" in m and "traj_all_wrong_groups" in m for m in metrics)
    assert sum(m["traj_groups_processed"] for m in metrics) > 0


def test_resume_with_the_store_equals_the_uninterrupted_run(tmp_path):
    common = dict(trajectory_processing="both", steps=4, checkpoint_every=2)
    tokenizer = char_tokenizer()

    def make(out, **kw):
        cfg = tiny_config(tmp_path, **{**SMALL, **common, "output_dir": str(tmp_path / out), **kw})
        model = tiny_causal_lm(tokenizer, token_bias=TOKEN_BIAS)
        return Trainer(cfg, loaded=LoadedModel(model, tokenizer, torch.device("cpu"), torch.float32))

    full = make("full")
    full_result = full.train()
    interrupted = make("part")
    interrupted.cfg.steps = 2
    interrupted.train()
    assert sorted(os.listdir(tmp_path / "part" / "checkpoints")) == ["latest", "step-000002"]
    resumed = Trainer(
        tiny_config(tmp_path, **{**SMALL, **common, "output_dir": str(tmp_path / "part"), "resume": True}),
        loaded=LoadedModel(tiny_causal_lm(tokenizer, token_bias=TOKEN_BIAS, seed=123), tokenizer,
                           torch.device("cpu"), torch.float32),
    )  # fmt: skip
    resumed_result = resumed.train()
    assert len(full.trajectories.store) > 0
    assert resumed.trajectories.state_dict() == full.trajectories.state_dict()
    for (n, a), (_, b) in zip(full.model.named_parameters(), resumed.model.named_parameters(), strict=True):
        assert torch.equal(a, b), n
    assert [reproducible_fields(r) for r in full_result.metrics] == [
        reproducible_fields(r) for r in resumed_result.metrics
    ]
    assert sum(m.get("traj_replayed_samples", 0) for m in full_result.metrics) > 0


# ---- refused before the model loads --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides,field",
    [
        ({"trajectory_processing": "replay", "rollout_engine": "vllm"}, "rollout_engine"),
        ({"trajectory_processing": "replay", "num_iterations": 2}, "num_iterations"),
        ({"trajectory_processing": "lessons", "loss_type": "grpo"}, "loss_type"),
        ({"trajectory_processing": "replay", "importance_sampling": "sequence"}, "importance_sampling"),
        ({"trajectory_processing": "replay", "top_p": 0.9}, "top_p"),
        ({"trajectory_processing": "replay", "sample_mode": "negative_only"}, "sample_mode"),
        ({"trajectory_processing": "random_lesson", "prompts_per_step": 1, "train_size": 4}, "prompts_per_step"),
        ({"trajectory_processing": "lessons", "lesson_builder": "no_such_module_xyz:build"}, "lesson_builder"),
        ({"trajectory_processing": "lessons", "lesson_builder": "os.path"}, "lesson_builder"),
        ({"trajectory_processing": "replay", "lesson_builder": "os.path:join"}, "lesson_builder"),
        ({"trajectory_processing": "sometimes"}, "trajectory_processing"),
        ({"lesson_training": "maybe"}, "lesson_training"),
        ({"replay_gamma": 0.0}, "replay_gamma"),
    ],
)
def test_bad_combinations_are_refused_by_name(tmp_path, overrides, field):
    with pytest.raises(ConfigFieldError) as info:
        Trainer(tiny_config(tmp_path, **{**SMALL, **overrides}), loaded=tiny_loaded())
    assert info.value.field == field and ("expected" in str(info.value) or "must be" in str(info.value))
    assert "got" in str(info.value)


def test_lessons_with_grpo_loss_is_allowed_when_no_row_is_off_policy(tmp_path):
    trainer = trainer_for(tmp_path, trajectory_processing="lessons", lesson_training="with", loss_type="grpo")
    assert trainer.trajectories.active


# ---- the study preset ------------------------------------------------------------------------------------------------


def test_trajectories_preset_arms_pass_preflight_checks(tmp_path):
    from rlvr_fast.study.arms import ARMS
    from rlvr_fast.study.presets import get_preset
    from rlvr_fast.trainer.config import RLVRConfig
    from rlvr_fast.trainer.trajectories.checks import check_trajectory_processing

    preset = get_preset("trajectories")
    modes = set()
    for arm in preset.arms:
        cfg = RLVRConfig(**{**preset.base, **ARMS[arm].overrides, "output_dir": str(tmp_path)}).validate()
        check_trajectory_processing(cfg)
        modes.add(cfg.trajectory_processing)
    assert modes == set(TRAJECTORY_MODES)  # off (the correct arm) and every mode, at one base
