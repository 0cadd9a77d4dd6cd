"""StepTimer's parts nest without counting a second twice, and the lesson re-sampling of trajectory processing, which
runs inside the step's scoring, is charged to generation and fixed_logprobs."""

import time
import types

import pytest
import torch
from helpers.runs import tiny_config, tiny_loaded

from rlvr_fast.trainer.loop import Trainer
from rlvr_fast.trainer.reporting import step_timer
from rlvr_fast.trainer.reporting.step_timer import StepTimer, part_key
from rlvr_fast.trainer.step import Rewards


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_nested_part_pauses_the_outer_one(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(step_timer.time, "perf_counter", clock)
    timer = StepTimer()
    clock.now += 1.0  # other
    with timer.part("scoring"):
        clock.now += 2.0
        with timer.part("generation"):
            clock.now += 5.0
            with timer.part("fixed_logprobs"):
                clock.now += 7.0
            clock.now += 11.0
        clock.now += 13.0
    with timer.part("generation"):
        clock.now += 17.0
    clock.now += 19.0  # other
    record = timer.record()
    assert record[part_key("scoring")] == 2.0 + 13.0
    assert record[part_key("generation")] == 5.0 + 11.0 + 17.0
    assert record[part_key("fixed_logprobs")] == 7.0
    assert record[part_key("other")] == 1.0 + 19.0
    assert record["seconds"] == sum(v for k, v in record.items() if k != "seconds") == 75.0


def test_a_part_closed_by_an_exception_is_still_charged(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(step_timer.time, "perf_counter", clock)
    timer = StepTimer()
    with pytest.raises(KeyError), timer.part("scoring"), timer.part("generation"):
        clock.now += 3.0
        raise KeyError("x")
    clock.now += 1.0
    with timer.part("scoring"):
        clock.now += 2.0
    record = timer.record()
    assert (record[part_key("generation")], record[part_key("scoring")], record[part_key("other")]) == (3.0, 2.0, 1.0)


def test_lesson_sampling_is_timed_as_generation_not_scoring(tmp_path, monkeypatch):
    """Every group all wrong, so every group gets a lesson and is re-sampled: with each generate call costing 1000 s of
    the timer's clock, the two calls (rollout, lessons) land in generation and scoring keeps less than one of them."""
    cfg = tiny_config(
        tmp_path,
        train_size=2,
        prompts_per_step=2,
        group_size=2,
        max_prompt_length=200,
        rewards={"correct": 1.0},
        trajectory_processing="lessons",
    )
    trainer = Trainer(cfg, loaded=tiny_loaded())
    generate = trainer.generator.generate
    calls = []
    # the timer's clock is the real one plus 1000 s per generate call, not a real sleep: scoring's own real seconds
    # stay far below one call however loaded the machine (a 0.3 s sleep left a loaded 2-core machine 3x of margin)
    skipped = [0.0]
    monkeypatch.setattr(
        step_timer, "time", types.SimpleNamespace(perf_counter=lambda: time.perf_counter() + skipped[0])
    )

    def slow_generate(*args, **kwargs):
        calls.append(len(args[0]))
        skipped[0] += 1000.0
        return generate(*args, **kwargs)

    def all_wrong(texts, problems, step):
        n = len(texts)
        return Rewards(torch.zeros(n), torch.zeros(n, dtype=torch.bool), {"correct": [0.0] * n}, 0)

    monkeypatch.setattr(trainer.generator, "generate", slow_generate)
    monkeypatch.setattr(trainer, "scorer", all_wrong)
    trainer.timer = StepTimer()
    trainer.prepare_step(trainer.problems_at(0), 0)
    record = trainer.timer.record()
    assert len(calls) == 2, calls  # the rollout, then the lesson groups
    assert record[part_key("generation")] >= 2000.0
    assert record[part_key("scoring")] < 1000.0
    assert record[part_key("fixed_logprobs")] > 0.0  # the with / without lesson log-prob passes
