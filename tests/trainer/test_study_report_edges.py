"""The study report on the results a real study can end with: a run whose weights went NaN, no finished run at all,
a model whose every completion is wrong evaluated with n=1 sample, and numbers that are not Python floats. The
report must be written, say what happened, keep study.json strict JSON, and print the numbers the runs' own files
hold. Tiny random models over the character tokenizer (no download)."""

import json
import math
import os
import re

import numpy as np
import pytest
import torch
from helpers.runs import TOKEN_BIAS
from helpers.study_case import tiny_loader, tiny_study_plan

from rlvr_fast.study import run_study
from rlvr_fast.study.plan import base_eval_path
from rlvr_fast.study.state import json_safe
from rlvr_fast.trainer.loop import Trainer

Z95 = 1.959963984540054


pytestmark = pytest.mark.usefixtures("single_thread")  # tests/trainer/conftest.py


def tiny_plan(root, arms, *, samples=3):
    """One seed per arm of 2 steps: groups of 4, 4 new tokens, 6 held-out problems x n=``samples``."""
    return tiny_study_plan(
        root,
        arms,
        seeds=1,
        eval_problems=6,
        group_size=4,
        max_completion_length=4,
        eval_samples=samples,
        format_classes={"digits_only": r"^\d+$"},
    )


def strict_json(path):
    """The file parsed as strict JSON: NaN / Infinity tokens raise."""

    def refuse(token):
        raise AssertionError(f"{path}: {token} is not JSON")

    with open(path) as f:
        return json.load(f, parse_constant=refuse)


def read(path):
    with open(path) as f:
        return f.read()


def run(plan, bias=TOKEN_BIAS):
    outcome = run_study(plan, model_loader=tiny_loader(token_bias=bias), log=lambda s: None)
    return outcome, strict_json(outcome.study_json), read(outcome.report)


@pytest.fixture(scope="module")
def diverged(tmp_path_factory):
    """correct, psr and nsr; nsr's weights turn NaN after its first update (a run that blew up)."""
    mp = pytest.MonkeyPatch()
    update = Trainer.update

    def poisoning_update(self, *args, **kwargs):
        out = update(self, *args, **kwargs)
        if self.cfg.estimator == "nsr":
            with torch.no_grad():
                for p in self.model.parameters():
                    p.fill_(float("nan"))
        return out

    mp.setattr(Trainer, "update", poisoning_update)
    plan = tiny_plan(str(tmp_path_factory.mktemp("diverged")), ["correct", "psr", "nsr"])
    try:
        return (plan, *run(plan))
    finally:
        mp.undo()


def test_a_run_that_went_nan_is_failed_and_the_study_goes_on(diverged):
    _, outcome, study, report = diverged
    assert outcome.statuses == {"correct/seed0": "done", "psr/seed0": "done", "nsr/seed0": "failed"}
    runs = {r["run"]: r for r in study["runs"]}
    assert runs["nsr/seed0"]["error"]["type"] and runs["nsr/seed0"]["pass_at_1"] is None
    assert f"`nsr/seed0` failed after 1 attempt(s): `{runs['nsr/seed0']['error']['type']}" in report
    assert "nsr/seed0" not in study["findings"]["pass_at_k"]["runs"]
    assert "nan/inf" in runs["nsr/seed0"]["error"]["message"].lower()  # the trainer's finite guard named the cause
    assert [x for x in report.splitlines() if x.startswith("|") and re.search(r"\bnan\b", x.lower())] == []


def test_the_runs_table_is_the_runs_own_evaluations(diverged):
    """pass@1 and its paired difference to the base, recomputed from eval_after.json and the base's eval.json."""
    plan, _, study, report = diverged
    runs = {r["run"]: r for r in study["runs"]}
    for key in ("correct/seed0", "psr/seed0"):
        spec = plan.run(key)
        after = strict_json(os.path.join(spec.run_dir, "eval_after.json"))
        base = strict_json(base_eval_path(plan.output_dir, spec.eval_key))
        assert strict_json(os.path.join(spec.run_dir, "eval_before.json"))["correct_counts"] == base["correct_counts"]
        a = np.array(after["correct_counts"]) / after["n"]
        d = a - np.array(base["correct_counts"]) / base["n"]
        row = runs[key]
        for got, values in ((row["pass_at_1"], a), (row["delta_pass_at_1"], d)):
            mean, se = values.mean(), values.std(ddof=1) / math.sqrt(values.size)
            assert got.get("mean", got.get("delta")) == pytest.approx(mean)
            assert (got["ci_low"], got["ci_high"]) == pytest.approx((mean - Z95 * se, mean + Z95 * se))
        line = next(x for x in report.splitlines() if x.startswith(f"| `{key}` |"))
        half = Z95 * a.std(ddof=1) / math.sqrt(a.size)
        low, high = a.mean() - half, a.mean() + half
        assert f"| {a.mean():.3f} [{low:.3f}, {high:.3f}] |" in line, line


def test_a_study_with_no_finished_run_still_reports(tmp_path, monkeypatch):
    def fails(self, *args, **kwargs):
        raise RuntimeError("out of memory (injected)")

    monkeypatch.setattr(Trainer, "train", fails)
    plan = tiny_plan(str(tmp_path), ["correct", "nsr", "sparse_reuse"])
    outcome, study, report = run(plan)
    assert outcome.statuses == {"correct/seed0": "failed", "nsr/seed0": "failed", "sparse_reuse/seed0": "skipped"}
    assert "Runs: 0 done, 2 failed, 1 skipped" in report
    assert [r["pass_at_1"] for r in study["runs"]] == [None, None, None]
    assert "base" in study["findings"]["pass_at_k"]["base"]  # the base evaluation was made and is reported


def test_every_completion_wrong_and_one_sample_per_problem(tmp_path):
    """pass@k is 0 everywhere and only k=1 exists: intervals [0, 0], no crossing, figures drawn, strict JSON."""
    plan = tiny_plan(str(tmp_path), ["correct", "random", "psr", "nsr"], samples=1)
    outcome, study, report = run(plan, bias={"x": 9.0})  # the model writes x's: never a number
    assert set(outcome.statuses.values()) == {"done"}
    curves = study["findings"]["pass_at_k"]
    for name, entry in [*curves["base"].items(), *curves["runs"].items()]:
        assert list(entry["curve"]) == ["1"], name
        assert (entry["curve"]["1"]["mean"], entry["curve"]["1"]["ci_low"], entry["curve"]["1"]["ci_high"]) == (0, 0, 0)
    assert "Improved pass@1 over the base: no reward arm." in report
    for png in ("pass_at_k.png", "pass1_delta.png"):
        assert os.path.getsize(os.path.join(plan.output_dir, png)) > 1000


def test_json_safe_takes_numpy_numbers_as_numbers():
    data = {"ece": np.float32("nan"), "count": np.int64(3), "curve": np.array([0.5, np.inf]), 1: (np.bool_(True),)}
    assert json.dumps(json_safe(data), allow_nan=False) == (
        '{"ece": null, "count": 3, "curve": [0.5, null], "1": [true]}'
    )


def test_a_difference_without_an_interval_is_not_called_inconclusive_about_0():
    """One held-out problem gives no interval (NaN bounds): the report says so instead of "the interval includes 0"."""
    from rlvr_fast.study.analysis import verdict
    from rlvr_fast.study.cells import _measured_sentence
    from rlvr_fast.study.report import _verdict_text

    nan = float("nan")
    assert verdict(nan, nan) == "no interval" and verdict(-0.1, 0.2) == "no detectable change"
    assert "no interval" in _verdict_text(verdict(nan, nan))
    measured = {"delta": 0.25, "ci_low": nan, "ci_high": nan, "seeds": 1, "problems": [1]}
    text = _measured_sentence("correct - random", {"measured": measured, "predicted": "+", "data": "inconclusive"})
    assert "no interval" in text and "includes 0" not in text
