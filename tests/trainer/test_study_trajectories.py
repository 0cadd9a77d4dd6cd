"""The trajectory-processing study (presets ``trajectories`` / ``trajectories-quick``) end to end on a tiny random model
(no download): every arm at the same generation budget, and the report's section recomputed from the runs' own
outputs (metrics, evaluations): what each mode sampled and added, and the paired comparisons after training."""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers.runs import write_task

from rlvr_fast.study import plan_study, run_study
from rlvr_fast.study.presets import PRESETS, TRAJECTORY_ARMS
from rlvr_fast.study.stats import pass_at_k_deltas
from rlvr_fast.study.trajectories_report import TRAJECTORIES_JSON
from rlvr_fast.testing import char_tokenizer, tiny_causal_lm
from rlvr_fast.trainer.model import LoadedModel

PER_STEP = 2 * 8  # prompts_per_step x group_size below


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A random tiny model never answers the task's 5: every group is all wrong, so every processing arm processes
    every group (lessons: G more completions each; replay: nothing stored to replay)."""
    root = str(tmp_path_factory.mktemp("traj"))
    tok = char_tokenizer()

    def load(cfg):
        return LoadedModel(tiny_causal_lm(tok, seed=1), tok, torch.device("cpu"), torch.float32)

    plan = plan_study(
        "trajectories-quick",
        arms=list(TRAJECTORY_ARMS),
        task=write_task(os.path.join(root, "train.jsonl"), 12, "train"),
        steps=4,
        overrides=dict(
            eval_file=write_task(os.path.join(root, "eval.jsonl"), 4, "eval"),
            train_size=12,
            eval_size=4,
            group_size=8,
            prompts_per_step=2,
            max_prompt_length=200,
            max_completion_length=6,
            eval_samples=4,  # pass@k reported at k = 1, 2, 4: a k without a curve point must not be asked for
            rollout_budget=3 * PER_STEP,
            lr=1e-2,
            grad_clip=None,
            progress=False,
            format_classes={"digits_only": r"^\d+$"},
        ),
        output_dir=os.path.join(root, "study"),
    )
    run_study(plan, model_loader=load, log=lambda s: None)
    with open(os.path.join(plan.output_dir, TRAJECTORIES_JSON)) as f:
        findings = json.load(f)
    with open(os.path.join(plan.output_dir, "report.md")) as f:
        report = f.read()
    return plan, findings, report


def metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [m for m in map(json.loads, f) if "reward_mean" in m]


def test_presets_compare_every_mode_at_one_budget():
    for name in ("trajectories", "trajectories-quick"):
        preset = PRESETS[name]
        assert preset.arms == TRAJECTORY_ARMS
        base = preset.base
        assert base["rollout_budget"] == base["steps"] * base["prompts_per_step"] * base["group_size"]


def test_every_arm_stops_at_the_budget_and_the_section_matches_the_runs(study):
    plan, findings, report = study
    assert "## Trajectory processing: successes as demonstrations, failures as lessons" in report
    assert f"stops once it has sampled {3 * PER_STEP} completions" in report
    runs = findings["runs"]
    assert set(runs) == {f"{arm}/seed0" for arm in TRAJECTORY_ARMS}
    lesson_modes = {"lessons", "both", "uniform", "random_lesson"}
    for key, entry in runs.items():
        spec = plan.run(key)
        steps = metrics(spec.run_dir)
        t = entry["training"]
        assert t["steps"] == len(steps)
        assert t["completions_sampled"] == sum(m["completions_sampled"] for m in steps)
        assert t["extra_completions"] == sum(m.get("traj_lesson_samples", 0) for m in steps)
        assert t["prompt_tokens_added"] == sum(m.get("traj_prompt_tokens_added", 0) for m in steps)
        mode = spec.config["trajectory_processing"]
        # lessons double a step's sampling here (every group all wrong): two steps reach the budget, not three
        assert len(steps) == (2 if mode in lesson_modes else 3), (key, len(steps))
        assert (t["extra_completions"] > 0) == (mode in lesson_modes)
        with open(os.path.join(spec.run_dir, "eval_after.json")) as f:
            after = json.load(f)
        assert entry["pass_at_k"]["1"]["after"]["mean"] == pytest.approx(after["pass_at_k"]["1"]["mean"])
        assert f"| `{key}` | {len(steps)} | {t['completions_sampled']} ({t['extra_completions']:+d})" in report


def test_the_comparisons_are_paired_differences_after_training(study):
    plan, findings, report = study
    pairs = {tuple(c["modes"]) for c in findings["comparisons"]}
    assert pairs == {("both", "uniform"), ("both", "off"), ("lessons", "random_lesson"), ("replay", "off")}
    for c in findings["comparisons"]:
        with open(os.path.join(plan.run(c["a"]).run_dir, "eval_after.json")) as f:
            a = json.load(f)
        with open(os.path.join(plan.run(c["b"]).run_dir, "eval_after.json")) as f:
            b = json.load(f)
        expected = pass_at_k_deltas(b, a)[1]
        got = c["delta"]["1"]
        assert got["delta"] == pytest.approx(expected["delta"])
        assert got["ci_low"] == pytest.approx(expected["ci_low"], nan_ok=True)
        assert f"| `{c['a']}` - `{c['b']}`:" in report
