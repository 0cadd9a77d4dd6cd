"""rollout_budget: a run stops after the step at which its sampled completions (rollouts plus trajectory processing's
lesson re-samples) reach the budget, so settings that sample more per step train fewer steps; resume restores the
count, and the run it continues equals the uninterrupted one."""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers.runs import tiny_config, tiny_loaded

from rlvr_fast.testing import char_tokenizer, tiny_causal_lm
from rlvr_fast.trainer.config import RLVRConfig
from rlvr_fast.trainer.loop import Trainer
from rlvr_fast.trainer.model import LoadedModel
from rlvr_fast.trainer.reporting.log import reproducible_fields
from rlvr_fast.trainer.schema import ConfigFieldError

PER_STEP = 2 * 8  # tiny_config: 2 prompts x groups of 8


def step_records(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if "completions_sampled" in r]


def test_the_budget_ends_the_run_at_the_step_that_reaches_it(tmp_path):
    cfg = tiny_config(tmp_path, steps=6, rollout_budget=2 * PER_STEP + 1, checkpoint_every=0)
    result = Trainer(cfg, loaded=tiny_loaded()).train()
    records = step_records(cfg.output_dir)
    assert [r["step"] for r in records] == [0, 1, 2]  # 32 < 33 after two steps, 48 >= 33 after the third
    assert [r["completions_sampled"] for r in records] == [PER_STEP] * 3
    assert [r["completions_sampled_total"] for r in records] == [16, 32, 48]
    with open(os.path.join(cfg.output_dir, "checkpoints", "latest")) as f:
        assert f.read().strip() == "step-000003"  # the last step's checkpoint is written, as at the end of `steps`
    assert result.after is not None
    with open(os.path.join(cfg.output_dir, "report.md")) as f:
        report = f.read()
    assert "completions_sampled" in report and "48" in report


def test_resume_restores_the_count(tmp_path):
    full = tiny_config(tmp_path, steps=6, rollout_budget=3 * PER_STEP, output_dir=str(tmp_path / "full"))
    Trainer(full, loaded=tiny_loaded()).train()
    part = tiny_config(tmp_path, steps=2, rollout_budget=3 * PER_STEP, output_dir=str(tmp_path / "part"))
    Trainer(part, loaded=tiny_loaded()).train()
    resumed = tiny_config(tmp_path, steps=6, rollout_budget=3 * PER_STEP, output_dir=part.output_dir, resume=True)
    Trainer(resumed, loaded=tiny_loaded()).train()
    a, b = step_records(full.output_dir), step_records(part.output_dir)
    assert [r["step"] for r in b] == [0, 1, 2]  # continued from 32 sampled completions, stopped at 48
    assert [reproducible_fields(r) for r in a] == [reproducible_fields(r) for r in b]


def test_lesson_resamples_count_toward_the_budget(tmp_path):
    """A random tiny model never answers 5: every group is all wrong, each gets a lesson and G more completions, so a
    step samples twice its rollout and the budget of three plain steps ends the run after two."""
    tokenizer = char_tokenizer()
    loaded = LoadedModel(tiny_causal_lm(tokenizer, seed=1), tokenizer, torch.device("cpu"), torch.float32)
    cfg = tiny_config(
        tmp_path,
        steps=6,
        rollout_budget=3 * PER_STEP,
        rewards={"correct": 1.0},
        max_prompt_length=200,
        trajectory_processing="lessons",
    )
    Trainer(cfg, loaded=loaded).train()
    records = step_records(cfg.output_dir)
    for r in records:
        assert r["completions_sampled"] == PER_STEP + r["traj_lesson_samples"]
    assert all(r["traj_lesson_samples"] == PER_STEP for r in records), [r["traj_lesson_samples"] for r in records]
    assert [r["step"] for r in records] == [0, 1]
    assert records[-1]["completions_sampled_total"] == 4 * PER_STEP


@pytest.mark.parametrize("budget", [0, -5])
def test_a_budget_below_one_is_refused(tmp_path, budget):
    with pytest.raises(ConfigFieldError, match="rollout_budget"):
        RLVRConfig(**{**tiny_config(tmp_path).to_dict(), "rollout_budget": budget}).validate()
