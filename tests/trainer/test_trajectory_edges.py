"""Trajectory processing on inputs the main tests (test_trajectories.py) do not use: a store larger than a group, user
lesson builders that raise, take the wrong arguments or write far too much, prompts with no room for any lesson,
sample_mode against the lesson modes, and the smallest step (one prompt, groups of 2) under a rollout budget."""

import random
import sys
import types

import pytest
import torch
from helpers.runs import tiny_config, tiny_loaded

from rlvr_fast.trainer.loop import Trainer
from rlvr_fast.trainer.rollout.data import chat_prompt, load_problems
from rlvr_fast.trainer.schema import ConfigFieldError
from rlvr_fast.trainer.step import Rewards
from rlvr_fast.trainer.trajectories.checks import check_trajectory_processing

SMALL = dict(train_size=4, prompts_per_step=4, group_size=4, max_prompt_length=200, rewards={"correct": 1.0})


def trainer_for(tmp_path, **overrides) -> Trainer:
    return Trainer(tiny_config(tmp_path, **{**SMALL, **overrides}), loaded=tiny_loaded())


def all_wrong(n: int) -> Rewards:
    return Rewards(torch.zeros(n), torch.zeros(n, dtype=torch.bool), {"correct": [0.0] * n}, 0)


@pytest.fixture
def builders(monkeypatch):
    """A module of lesson builders importable as 'review_lessons:<name>'."""
    module = types.ModuleType("review_lessons")

    def raises(prompt, texts, correct, truncated):
        raise RuntimeError("builder bug")

    module.raises = raises
    module.one_argument = lambda prompt: "a lesson"
    module.flexible = lambda *args, **kwargs: "a lesson"
    module.verbose = lambda prompt, texts, correct, truncated: "Check every step twice. " * 4000
    monkeypatch.setitem(sys.modules, "review_lessons", module)
    return module


def test_uniform_store_with_replay_capacity_above_group_size(tmp_path):
    """The uniform control draws replay_capacity completions of each group: a capacity above group_size keeps the
    whole group (the store then holds several steps per prompt) instead of failing random.sample."""
    trainer = trainer_for(tmp_path, trajectory_processing="uniform", replay_capacity=6)
    problems = trainer.problems_at(0)
    rollout = trainer.rollout(problems, 0)
    trainer.trajectories.rebuild(trainer, problems, rollout, rollout.texts, all_wrong(16), 0)
    assert {k: len(v) for k, v in trainer.trajectories.store.entries.items()} == {p.prompt: 4 for p in problems}


def test_a_lesson_builder_that_raises_is_named(tmp_path, builders):
    trainer = trainer_for(tmp_path, trajectory_processing="lessons", lesson_builder="review_lessons:raises")
    problems = trainer.problems_at(0)
    correct = torch.zeros(4, 4, dtype=torch.bool)
    with pytest.raises(ConfigFieldError, match=r"review_lessons:raises.*RuntimeError: builder bug") as info:
        trainer.trajectories.lesson_for(trainer, problems, ["4"] * 16, correct, [False] * 16, 0, random.Random(0))
    assert info.value.field == "lesson_builder" and problems[0].prompt in str(info.value)


@pytest.mark.parametrize("name,refused", [("one_argument", True), ("flexible", False), ("verbose", False)])
def test_a_builder_that_cannot_take_the_arguments_is_refused_before_the_model_loads(tmp_path, builders, name, refused):
    cfg = tiny_config(tmp_path, **SMALL, trajectory_processing="lessons", lesson_builder=f"review_lessons:{name}")
    if not refused:
        check_trajectory_processing(cfg.validate())
        return
    with pytest.raises(ConfigFieldError, match=r"expected 'module:function'.*\(prompt, texts, correct, truncated\)"):
        check_trajectory_processing(cfg.validate())


def test_a_lesson_many_times_too_long_is_trimmed_to_fit(tmp_path, builders):
    """A builder's 96,000-character lesson (prompt budget: 200 tokens) is cut to a prefix that fits, not dropped."""
    trainer = trainer_for(tmp_path, trajectory_processing="lessons", lesson_builder="review_lessons:verbose")
    problems = trainer.problems_at(0)
    correct = torch.zeros(4, 4, dtype=torch.bool)
    built = trainer.trajectories.lesson_for(trainer, problems, ["4"] * 16, correct, [False] * 16, 0, random.Random(0))
    assert built is not None
    lesson, message = built
    tok = trainer.tokenizer
    length = len(tok(chat_prompt(tok, message, None), add_special_tokens=False)["input_ids"])
    assert length <= 200 and len(lesson) > 50
    assert builders.verbose("", [], [], []).startswith(lesson)


def test_no_room_for_any_lesson_leaves_the_groups_as_sampled(tmp_path):
    """max_prompt_length equal to the prompts' own length: no lesson fits, so no group is re-sampled (and nothing is
    generated from an empty prompt list); the step keeps its rollout."""
    tokenizer = tiny_loaded().tokenizer
    train, _ = load_problems(tiny_config(tmp_path, **SMALL))
    longest = max(
        len(tokenizer(chat_prompt(tokenizer, p.prompt, None), add_special_tokens=False)["input_ids"]) for p in train
    )
    trainer = trainer_for(tmp_path, trajectory_processing="lessons", max_prompt_length=longest)
    problems = trainer.problems_at(0)
    rollout = trainer.rollout(problems, 0)
    out, texts, _ = trainer.trajectories.rebuild(trainer, problems, rollout, rollout.texts, all_wrong(16), 0)
    assert texts == rollout.texts and torch.equal(out.completion_ids, rollout.completion_ids)
    assert not bool(trainer.trajectories.processed.any())
    assert trainer.trajectories.metrics["traj_lesson_samples"] == 0


@pytest.mark.parametrize("mode", ["lessons", "random_lesson", "uniform", "both"])
def test_negative_only_is_refused_with_every_rescuing_mode(tmp_path, mode):
    """A rescued group's new signal is its successes, whose positive advantages negative_only zeroes (and
    replay_positive_only zeroes the rest): the lesson modes are refused as replay is."""
    cfg = tiny_config(tmp_path, **SMALL, trajectory_processing=mode, sample_mode="negative_only").validate()
    with pytest.raises(ConfigFieldError, match="negative_only") as info:
        check_trajectory_processing(cfg)
    assert info.value.field == "sample_mode" and "expected 'all' or 'positive_only'" in str(info.value)


def test_one_prompt_groups_of_two_under_a_rollout_budget_count_the_lesson_samples(tmp_path):
    trainer = trainer_for(
        tmp_path,
        trajectory_processing="both",
        group_size=2,
        prompts_per_step=1,
        steps=6,
        rollout_budget=7,
        eval_size=1,
        eval_samples=1,
    )
    steps = [m for m in trainer.train().metrics if "reward_mean" in m]
    counts = [m["completions_sampled"] for m in steps]
    assert counts == [2 + m["traj_lesson_samples"] for m in steps] and any(m["traj_lesson_samples"] for m in steps)
    assert sum(counts[:-1]) < 7 <= sum(counts) and steps[-1]["completions_sampled_total"] == sum(counts)


@pytest.mark.parametrize("mode", ["replay", "lessons"])
def test_nsr_is_refused_with_a_rescuing_mode(tmp_path, mode):
    """nsr's advantage is c - 1: the successes a rescue adds get 0, and the failures they replace lose their -1."""
    cfg = tiny_config(tmp_path, **SMALL, trajectory_processing=mode, estimator="nsr").validate()
    with pytest.raises(ConfigFieldError, match=r"estimator='nsr' gives advantage 0; expected one of \[") as info:
        check_trajectory_processing(cfg)
    assert info.value.field == "estimator" and "got 'nsr'" in str(info.value)
    check_trajectory_processing(tiny_config(tmp_path, **SMALL, trajectory_processing=mode, estimator="psr").validate())
