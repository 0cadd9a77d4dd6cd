"""The hard-problem arm and its shortcut signatures: the arm keeps only the groups its model almost never solves; the
signatures (answer repetition, skipped computation, answer-only output) on hand-made completions; and a tiny study of
the hard arm with its control, end to end on a tiny random Llama (no download), whose report section pairs pass@k and
the signatures on the study's normal held-out problems before and after."""

import json
import math
import os

import pytest
import torch
from helpers.runs import TOKEN_BIAS, write_task
from helpers.study_case import TINY_STUDY_BASE

from rlvr_fast.eval.shortcuts import (
    arithmetic_tokens,
    group_agreement,
    is_answer_only,
    is_short,
    paired_difference,
    per_problem_signatures,
    reference_working_tokens,
    summarize,
)
from rlvr_fast.study import plan_study, run_study
from rlvr_fast.study.arms import ARMS, resolve_arm_names
from rlvr_fast.study.plan import base_eval_path
from rlvr_fast.study.shortcuts_report import SHORTCUTS_JSON, hard_runs, shortcuts_section
from rlvr_fast.study.state import STATE_FILE
from rlvr_fast.study.stats import pass_at_k_deltas
from rlvr_fast.testing import char_tokenizer, tiny_causal_lm
from rlvr_fast.trainer.config import RLVRConfig
from rlvr_fast.trainer.evaluation.held_out import answer_key
from rlvr_fast.trainer.model import LoadedModel
from rlvr_fast.trainer.step import Rewards, apply_difficulty_filter

# --------------------------------------------------------------------------------------------------------------------
# The arm: which groups it trains on
# --------------------------------------------------------------------------------------------------------------------


def _rewards(correct_per_group: list[int], group_size: int) -> Rewards:
    rows = [[1.0] * c + [0.0] * (group_size - c) for c in correct_per_group]
    correct = torch.tensor(rows).flatten()
    return Rewards(total=correct.clone(), correct=correct.bool(), components={}, errors=0)


def test_hard_only_is_a_registered_difficulty_arm():
    arm = ARMS["hard_only"]
    assert arm.group == "difficulty" and resolve_arm_names(["hard_only"]) == ["hard_only"]
    assert arm.overrides["rewards"] == {"correct": 1.0} and arm.overrides["max_solve_rate"] == 0.125


def test_hard_only_keeps_only_groups_under_the_threshold_and_is_deterministic():
    cfg = RLVRConfig.from_dict({**RLVRConfig().to_dict(), **ARMS["hard_only"].overrides, "group_size": 8}).validate()
    solved = [0, 1, 2, 4, 8, 1, 3]
    kept = apply_difficulty_filter(_rewards(solved, 8), cfg)
    assert kept.keep.tolist() == [c / 8 <= 0.125 for c in solved] == [True, True, False, False, False, True, False]
    assert kept.removed == {"too_easy": 4}
    again = apply_difficulty_filter(_rewards(solved, 8), cfg)
    assert torch.equal(kept.keep, again.keep)


def test_hard_only_bad_threshold_names_the_field():
    values = {**RLVRConfig().to_dict(), **ARMS["hard_only"].overrides, "max_solve_rate": 1.5}
    with pytest.raises(ValueError, match="max_solve_rate"):
        RLVRConfig.from_dict(values).validate()


# --------------------------------------------------------------------------------------------------------------------
# The signatures on hand-made completions
# --------------------------------------------------------------------------------------------------------------------


def test_arithmetic_tokens_and_the_reference_working():
    assert arithmetic_tokens("3 + 4 = 7") == 5
    assert arithmetic_tokens("The answer is \\boxed{7}.") == 1
    assert arithmetic_tokens("12*3=36, 36-1=35") == 10
    assert reference_working_tokens(1) == 5 and reference_working_tokens(3) == 15
    assert is_short("\\boxed{7}", 5) and not is_short("3 + 4 = 7", 5)
    assert is_short("3 + 4 = 7", 15) and not is_short("3 + 4 = 7, 7 * 2 = 14", 15)
    with pytest.raises(ValueError, match="steps must be an int >= 1, got 0"):
        reference_working_tokens(0)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("7", True),
        (" \\boxed{7}.", True),
        ("$-3/4$", True),
        ("7 <confidence>0.9</confidence>", True),
        ("\\boxed{\\frac{3}{4}}", True),
        ("3 + 4 = 7", False),
        ("The answer is 7", False),
        ("7 because 3 + 4 = 7", False),
        ("", False),
        ("no idea", False),
    ],
)
def test_answer_only(text, expected):
    assert is_answer_only(text) is expected


def test_group_agreement():
    assert group_agreement(["7", "7", "7"]) == (True, 1.0, "7")
    assert group_agreement(["7", "7", None]) == (False, 2 / 3, "7")
    assert group_agreement([None, None]) == (False, 0.0, None)
    with pytest.raises(ValueError, match="at least one"):
        group_agreement([])


# three problems x n=3: one collapsed onto a wrong bare answer, one worked (mostly), one never answered
TEXTS = [
    "\\boxed{7}",
    "\\boxed{7}",
    "7.",
    "2 + 3 = 5",
    "2+3=5 so \\boxed{5}",
    "The answer is 4",
    "hmm",
    "I am not sure",
    "...",
]
CORRECT = [0, 0, 0, 1, 1, 0, 0, 0, 0]


def test_signatures_on_hand_made_completions():
    sig = per_problem_signatures(3, texts=TEXTS, correct=CORRECT, steps=[1, 1, 1])
    assert sig["all_same"] == [1.0, 0.0, 0.0]
    assert sig["all_same_wrong"] == [1.0, 0.0, 0.0]
    assert sig["modal_share"] == [1.0, 2 / 3, 0.0]
    assert sig["answer_only"] == [1.0, 0.0, 0.0]
    assert sig["short"] == [1.0, 1 / 3, 1.0]  # "The answer is 4" skips the sum; no digits at all is short too
    s = summarize(sig)
    assert s["all_same"] == {"value": 1 / 3, "problems": 3}
    assert math.isclose(s["modal_share"]["value"], (1 + 2 / 3) / 3)
    # the answers are the held-out evaluation's keys, so stored per-completion answers give the same numbers
    stored = per_problem_signatures(3, answers=[answer_key(t) for t in TEXTS], correct=CORRECT)
    assert stored["all_same"] == sig["all_same"] and "short" not in stored and "answer_only" not in stored


def test_all_same_right_answer_is_not_a_wrong_collapse():
    sig = per_problem_signatures(2, texts=["\\boxed{5}", "5"], correct=[1, 1], steps=[None])
    assert sig["all_same"] == [1.0] and sig["all_same_wrong"] == [0.0]
    assert sig["short"] == [None]  # no operation count: undefined, not 0
    assert summarize(sig)["short"]["problems"] == 0


def test_signature_shapes_are_checked():
    with pytest.raises(ValueError, match="not problems x n=2"):
        per_problem_signatures(2, answers=["1", "2", "3"])
    with pytest.raises(ValueError, match="2 correct for 4 answers"):
        per_problem_signatures(2, answers=["1"] * 4, correct=[1, 0])
    with pytest.raises(ValueError, match="expected answers or texts"):
        per_problem_signatures(2)


def test_paired_difference():
    d = paired_difference([0, 0, 0, 0], [1, 1, 0, 0])
    se = math.sqrt((1 / 3) / 4)  # sample variance 1/3 of the differences, over 4 problems
    assert d["delta"] == 0.5 and d["problems"] == 4 and math.isclose(d["se"], se)
    z = 1.959963984540054  # the 97.5% normal quantile
    assert math.isclose(d["ci_low"], 0.5 - z * se) and math.isclose(d["ci_high"], 0.5 + z * se)
    assert paired_difference([None, 0.5], [1.0, 0.25])["problems"] == 1
    with pytest.raises(ValueError, match="same problems"):
        paired_difference([0], [0, 1])


# --------------------------------------------------------------------------------------------------------------------
# A tiny study of the hard arm, end to end
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hard_study(tmp_path_factory):
    """The correct arm (the control) and hard_only on sums whose answer the tiny model's bias favours (so some groups
    are solved often, some rarely), trained and evaluated once."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    tok = char_tokenizer()

    def load(cfg):
        return LoadedModel(tiny_causal_lm(tok, token_bias=TOKEN_BIAS), tok, torch.device("cpu"), torch.float32)

    root = str(tmp_path_factory.mktemp("hard"))
    eval_file = os.path.join(root, "eval.jsonl")
    rows = [json.loads(line) for line in _text(write_task(eval_file, 4, "eval")).splitlines()]
    with open(eval_file, "w") as f:  # one-operation sums, with the operation count the length signature reads
        f.writelines(json.dumps({**row, "steps": 1}) + "\n" for row in rows)
    plan = plan_study(
        "quick",
        arms=["correct", "hard_only"],
        task=write_task(os.path.join(root, "train.jsonl"), 12, "train"),
        steps=3,
        seeds=1,
        overrides={**TINY_STUDY_BASE, "eval_file": eval_file, "eval_size": 4, "max_prompt_length": 128},
        output_dir=os.path.join(root, "study"),
    )
    outcome = run_study(plan, model_loader=load, log=lambda s: None)
    torch.set_num_threads(before)
    return plan, outcome


def _read(path):
    with open(path) as f:
        return json.load(f)


def _text(path):
    with open(path) as f:
        return f.read()


def test_hard_study_reports_easy_pass_at_k_and_signatures(hard_study):
    plan, outcome = hard_study
    assert outcome.statuses == {"correct/seed0": "done", "hard_only/seed0": "done"}
    assert [r.key for r in hard_runs(plan)] == ["hard_only/seed0"]
    hard, control = plan.run("hard_only/seed0"), plan.run("correct/seed0")
    # evaluated on the study's normal held-out problems: the same evaluation as the baseline arm's
    assert hard.eval_key == control.eval_key
    found = _read(os.path.join(plan.output_dir, SHORTCUTS_JSON))
    assert set(found) == {"hard_only/seed0", "correct/seed0"}
    entry = found["hard_only/seed0"]
    base = _read(base_eval_path(plan.output_dir, hard.eval_key))
    after = _read(os.path.join(hard.run_dir, "eval_after.json"))
    expected = pass_at_k_deltas(base, after)
    for k, row in entry["pass_at_k"].items():
        assert math.isclose(row["delta"]["delta"], expected[int(k)]["delta"])
        assert row["after"]["mean"] == after["pass_at_k"][k]["mean"]
    # answer repetition, recomputed from the stored per-completion answers
    for when, ev in (("before", base), ("after", after)):
        pc = ev["per_completion"]
        sig = summarize(per_problem_signatures(ev["n"], answers=pc["answer"], correct=pc["correct"]))
        for name in ("all_same", "all_same_wrong", "modal_share"):
            assert entry["signatures"][name][when]["value"] == pytest.approx(sig[name]["value"], nan_ok=True)
    metrics = [json.loads(line) for line in _text(os.path.join(hard.run_dir, "metrics.jsonl")).splitlines() if line]
    removed = sum(sum((m.get("groups_filtered") or {}).values()) for m in metrics if "reward_mean" in m)
    assert entry["training"]["groups_kept"] == 3 * 2 - removed
    # the filter fired (often-solved groups dropped) and the rarely solved ones still trained
    control_training = found["correct/seed0"]["training"]
    assert removed > 0 and control_training["groups_kept"] == 6
    assert 0 < entry["training"]["completions_updated"] < control_training["completions_updated"]
    report = _text(outcome.report)
    assert "## Hard problems: damage to skills the model had, and shortcut signatures" in report
    assert "### `hard_only/seed0`" in report and "(control: the baseline arm, same seed)" in report


def test_hard_study_uses_completion_texts_when_the_evaluation_keeps_them(hard_study, tmp_path):
    """An evaluation that kept its texts gets the length and answer-only signatures, paired over problems."""
    plan, _ = hard_study
    hard = plan.run("hard_only/seed0")
    paths = {
        "before": base_eval_path(plan.output_dir, hard.eval_key),
        "after": os.path.join(hard.run_dir, "eval_after.json"),
    }
    saved = {w: _text(p) for w, p in paths.items()}
    texts = {  # 4 problems x n=3: the base model works the sums, the trained one answers bare
        "before": ["1 + 2 = 3"] * 12,
        "after": ["\\boxed{3}"] * 9 + ["1 + 2 = 3"] * 3,
    }
    try:
        for when, path in paths.items():
            ev = _read(path)
            ev["per_completion"]["text"] = texts[when]
            with open(path, "w") as f:
                json.dump(ev, f)
        state = _read(os.path.join(plan.output_dir, STATE_FILE))
        lines = shortcuts_section(plan, state)
    finally:
        for when, path in paths.items():
            with open(path, "w") as f:
                f.write(saved[when])
    entry = _read(os.path.join(plan.output_dir, SHORTCUTS_JSON))["hard_only/seed0"]
    for name in ("answer_only", "short"):
        s = entry["signatures"][name]
        assert s["before"]["value"] == 0.0 and s["after"]["value"] == 0.75 and s["delta"]["problems"] == 4
        assert s["delta"]["delta"] == 0.75
    assert entry["not_measured"] == []
    assert any(line.startswith("| answer-only completions | 0.000") for line in lines)
