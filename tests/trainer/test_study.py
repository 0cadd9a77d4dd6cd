"""``rlvr-fast study`` on a tiny random Llama built from a config (no download): a study end to end and its JSON
fields for every finding, each run being a normal trainer run, resumption after an interrupted arm, a failing arm
reported without losing the others, and bad arms failing before any training."""

import json
import os

import numpy as np
import pytest
import torch
from helpers.runs import TOKEN_BIAS
from helpers.study_case import tiny_loader, tiny_study_plan

from rlvr_fast.eval import pass_at_k, update_sparsity
from rlvr_fast.optim import load_masks
from rlvr_fast.study import run_study
from rlvr_fast.study.analysis import _crossings
from rlvr_fast.study.stats import agreement_confidence, bootstrap_calibration, wilson
from rlvr_fast.testing import char_tokenizer, tiny_causal_lm
from rlvr_fast.trainer.config import RLVRConfig
from rlvr_fast.trainer.loop import Trainer
from rlvr_fast.trainer.reporting.log import reproducible_fields

FINDINGS = ("pass_at_k", "reward", "sample", "calibration", "update_sparsity", "formats", "difficulty")


pytestmark = pytest.mark.usefixtures("single_thread")  # tests/trainer/conftest.py


def tiny_plan(root, arms, *, steps=4, seeds=None, arms_file=None, **extra):
    extra = {"checkpoint_every": 2, "format_classes": {"digits_only": r"^\d+$", "has_five": "5"}, **extra}
    return tiny_study_plan(root, arms, steps=steps, seeds=seeds, arms_file=arms_file, **extra)


def load_study(plan) -> dict:
    with open(os.path.join(plan.output_dir, "study.json")) as f:
        return json.load(f)


def strip_timing(records):
    return [reproducible_fields(r) for r in records]


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A study of the correct arm (two seeds) and the calibration pair brier / correct_conf, run once."""
    root = str(tmp_path_factory.mktemp("study"))
    plan = tiny_plan(root, ["correct", "brier", "correct_conf"])
    calls: list = []
    outcome = run_study(plan, model_loader=tiny_loader(calls), keep_checkpoints="final", log=lambda s: None)
    return plan, outcome, load_study(plan), calls


# --------------------------------------------------------------------------------------------------------------------
# A study end to end
# --------------------------------------------------------------------------------------------------------------------


def test_study_json_has_every_finding(finished):
    plan, outcome, study, calls = finished
    assert outcome.statuses == {
        "correct/seed0": "done",
        "correct/seed1": "done",
        "brier/seed0": "done",
        "correct_conf/seed0": "done",
    }
    assert calls == [plan.runs[0].config["model"]]  # the base model is loaded once and copied per run
    fnd = study["findings"]
    assert set(fnd) == set(FINDINGS)

    # 1. pass@k curves for k = 1..n of every base setting and run, with paired differences and crossings
    pk = fnd["pass_at_k"]
    assert set(pk["base"]) == {
        "base",
        "base (seed=1)",
        "base (prompt_template=the confidence prompt, max_completion_length=24)",
    }
    for key in ("correct/seed0", "correct/seed1", "brier/seed0", "correct_conf/seed0"):
        r = pk["runs"][key]
        assert sorted(r["curve"]) == ["1", "2", "3"] and sorted(r["delta"]) == ["1", "2", "3"]
        assert all(r["curve"][k]["ci_low"] <= r["curve"][k]["mean"] <= r["curve"][k]["ci_high"] for k in r["curve"])
        assert isinstance(r["crossings"], list)
    # 2. reward arms with a verdict each; 3. the sample comparison at the largest k
    rows = {row["run"]: row for row in fnd["reward"]["rows"]}
    assert set(rows) == {"correct/seed0", "correct/seed1", "brier/seed0"}
    assert all(row["verdict"] in ("improved", "worsened", "no detectable change") for row in rows.values())
    assert fnd["reward"]["task"]["clean"] is False  # a JSONL task: contamination unchecked
    assert [row["k"] for row in fnd["sample"]["rows"]] == [3, 3]
    # 4. calibration: brier against correct_conf (same prompt and evaluation: paired), stated and agreement
    (pair,) = fnd["calibration"]["pairs"]
    assert pair["brier"] == "brier/seed0" and pair["reference"] == "correct_conf/seed0" and pair["paired"] is True
    for name in ("brier/seed0", "correct_conf/seed0"):
        assert pair["stated"][name]["answered"]["value"] == 0.0  # a random model states no confidence
        ece = pair["agreement"][name]["ece"]
        assert 0 <= ece["value"] <= 1 and ece["ci_low"] <= ece["value"] <= ece["ci_high"]
    agreement = pair["agreement"]
    expected = agreement["brier/seed0"]["brier"]["value"] - agreement["correct_conf/seed0"]["brier"]["value"]
    assert pair["difference"]["agreement"]["brier"]["value"] == pytest.approx(expected)
    assert pair["difference"]["stated"]["ece"]["value"] is None  # undefined on both sides: null in the JSON
    # 5. sparsity of every run, seed overlap of correct's two seeds, arm overlaps
    sp = fnd["update_sparsity"]
    for key, r in sp["runs"].items():
        assert 0 <= r["unchanged"]["float32"] <= r["unchanged"]["bfloat16"] <= 1, key  # bf16-equal is a superset
    assert sp["seed_pairs"]["bfloat16"]["pairs"] == 1 and sp["arm_pairs"]["bfloat16"]["pairs"] == 5
    # 6. format frequency per step of every run; 7. groups seen / removed
    for key in ("correct/seed0", "brier/seed0"):
        f = fnd["formats"]["runs"][key]
        assert f["steps"] == [0, 1, 2, 3] and set(f["train"]) == {"digits_only", "has_five", "unmatched"}
        assert all(len(v) == 4 for v in f["train"].values())
    diff = {row["run"]: row for row in fnd["difficulty"]["rows"]}
    assert set(diff) == {"correct/seed0", "correct/seed1"}
    assert all(row["groups_seen"] == 4 * 2 and row["removed_total"] == 0 for row in diff.values())
    assert {r["run"]: r["status"] for r in study["runs"]} == outcome.statuses

    with open(outcome.report) as f:
        report = f.read()
    for n in range(1, 8):
        assert f"\n## {n}. " in report
    assert "- brier/seed0 minus correct_conf/seed0 on the same problems (paired bootstrap over problems): ECE" in report
    for png in ("pass_at_k.png", "pass1_delta.png", "calibration.png", "sparsity.png", "formats.png"):
        assert os.path.getsize(os.path.join(plan.output_dir, png)) > 1000, png


def test_numbers_match_the_runs_own_outputs(finished):
    plan, _, study, _ = finished
    spec = plan.run("correct/seed0")
    with open(os.path.join(spec.run_dir, "eval_after.json")) as f:
        after = json.load(f)
    n, counts = after["n"], after["correct_counts"]
    for k in range(1, n + 1):
        expected = float(np.mean(pass_at_k([n] * len(counts), counts, k)))
        curve = study["findings"]["pass_at_k"]["runs"]["correct/seed0"]["curve"]
        assert curve[str(k)]["mean"] == pytest.approx(expected)

    # Update sparsity, recomputed from the final checkpoint's weights against a fresh base model.
    from safetensors.torch import load_file

    with open(os.path.join(spec.run_dir, "checkpoints", "latest")) as f:
        latest = f.read().strip()
    final = load_file(os.path.join(spec.run_dir, "checkpoints", latest, "model.safetensors"))
    base = dict(tiny_causal_lm(char_tokenizer(), token_bias=TOKEN_BIAS).named_parameters())
    for dtype, label in ((torch.float32, "float32"), (torch.bfloat16, "bfloat16")):
        expected = update_sparsity(base, {n: final[n] for n in base}, atol=0.0, dtype=dtype)["overall"]
        unchanged = study["findings"]["update_sparsity"]["runs"]["correct/seed0"]["unchanged"]
        assert unchanged[label] == pytest.approx(expected)

    # Seed overlap, recomputed from the saved changed sets.
    a = load_masks(os.path.join(spec.run_dir, "changed_bf16.safetensors"))
    b = load_masks(os.path.join(plan.run("correct/seed1").run_dir, "changed_bf16.safetensors"))
    inter = sum(int((a[n] & b[n]).sum()) for n in a)
    union = sum(int((a[n] | b[n]).sum()) for n in a)
    pair = study["findings"]["update_sparsity"]["overlap"]["bfloat16"]["pairs"]["correct/seed0|correct/seed1"]
    assert (pair["intersection"], pair["union"]) == (inter, union)
    assert pair["jaccard"] == pytest.approx(inter / union)


def test_each_run_is_a_normal_trainer_run(finished, tmp_path):
    """The study's run equals `rlvr-fast train` with the same config: same before/after evaluations and metrics
    (the shared base evaluation is exactly the trainer's own before-evaluation)."""
    plan, _, _, _ = finished
    spec = plan.run("correct/seed1")
    cfg = RLVRConfig.from_dict({**spec.config, "output_dir": str(tmp_path / "alone")})
    result = Trainer(cfg, loaded=tiny_loader()(cfg)).train()
    for name in ("eval_before.json", "eval_after.json"):
        with open(os.path.join(spec.run_dir, name)) as f, open(tmp_path / "alone" / name) as g:
            assert json.load(f) == json.load(g), name
    assert strip_timing(read_metrics(spec.run_dir)) == strip_timing(result.metrics)


def test_rerun_of_a_finished_study_trains_nothing(finished, monkeypatch):
    plan, _, study, _ = finished

    def no_training(self, *a, **k):  # pragma: no cover - reaching it is the failure
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(Trainer, "train", no_training)
    outcome = run_study(plan, model_loader=tiny_loader(), log=lambda s: None)
    assert set(outcome.statuses.values()) == {"done"}
    again = load_study(plan)
    assert again["findings"]["pass_at_k"] == study["findings"]["pass_at_k"]
    # A finished run whose config changed is refused, not silently reused.
    changed = tiny_plan(os.path.dirname(plan.output_dir), ["correct", "brier", "correct_conf"], lr=5e-3)
    with pytest.raises(ValueError, match=r"run correct/seed0 in .* finished with a different config"):
        run_study(changed, model_loader=tiny_loader(), log=lambda s: None)


# --------------------------------------------------------------------------------------------------------------------
# Resumption and failures
# --------------------------------------------------------------------------------------------------------------------


def test_interrupted_arm_resumes_to_the_uninterrupted_numbers(tmp_path, monkeypatch):
    import rlvr_fast.trainer.loop as loop

    reference = tiny_plan(str(tmp_path / "a"), ["correct", "nsr"], seeds=1)
    run_study(reference, model_loader=tiny_loader(), log=lambda s: None)

    plan = tiny_plan(str(tmp_path / "b"), ["correct", "nsr"], seeds=1)
    save = loop.save_checkpoint

    def dies_after_nsr_step_2(output_dir, step, *args, **kwargs):
        path = save(output_dir, step, *args, **kwargs)
        if "nsr" in output_dir and step == 2:
            raise KeyboardInterrupt  # the process is killed right after the step-2 checkpoint
        return path

    monkeypatch.setattr(loop, "save_checkpoint", dies_after_nsr_step_2)
    with pytest.raises(KeyboardInterrupt):
        run_study(plan, model_loader=tiny_loader(), log=lambda s: None)
    with open(os.path.join(plan.output_dir, "study_state.json")) as f:
        state = json.load(f)["runs"]
    assert state["correct/seed0"]["status"] == "done" and state["nsr/seed0"]["status"] == "interrupted"
    monkeypatch.setattr(loop, "save_checkpoint", save)

    trained = []
    train = Trainer.train

    def recording(self, *args, **kwargs):
        trained.append((self.cfg.output_dir, self.cfg.resume))
        return train(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "train", recording)
    outcome = run_study(plan, model_loader=tiny_loader(), log=lambda s: None)
    assert outcome.statuses == {"correct/seed0": "done", "nsr/seed0": "done"}
    assert trained == [(plan.run("nsr/seed0").run_dir, True)]  # correct not rerun; nsr continued from its checkpoint
    # The default keeps no checkpoint of a finished run (a resumed one included): its results are written.
    assert not os.path.exists(os.path.join(plan.run("nsr/seed0").run_dir, "checkpoints"))

    for key in ("correct/seed0", "nsr/seed0"):
        a, b = reference.run(key).run_dir, plan.run(key).run_dir
        for name in ("eval_after.json", "update_sparsity.json"):
            with open(os.path.join(a, name)) as f, open(os.path.join(b, name)) as g:
                assert json.load(f) == json.load(g), (key, name)
        assert strip_timing(read_metrics(a)) == strip_timing(read_metrics(b)), key
    fa, fb = load_study(reference)["findings"], load_study(plan)["findings"]
    assert fa["pass_at_k"]["runs"] == fb["pass_at_k"]["runs"]
    assert fa["update_sparsity"]["overlap"] == fb["update_sparsity"]["overlap"]


def test_failing_arm_is_reported_and_the_others_kept(tmp_path, monkeypatch):
    from rlvr_fast.trainer.update.finite_guard import NonFiniteError

    # An lr that diverges is refused when the study is planned (lr <= 1), so the arm's update fails by hand: the arm
    # with lr 0.5 raises in its first update, as a run whose weights blew up would.
    update = Trainer.update

    def diverging_update(self, *args, **kwargs):
        if self.cfg.lr == 0.5:
            raise NonFiniteError("step 0: the loss is nan (injected by the test)")
        return update(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "update", diverging_update)
    arms = tmp_path / "arms.yaml"
    arms.write_text(
        "diverges:\n  lr: 0.5\n"
        "reuse_diverged:\n  overrides: {optimizer: sparse_adamw}\n  mask_from: diverges\n  group: optimizer\n"
    )
    plan = tiny_plan(str(tmp_path), ["correct", "diverges", "reuse_diverged"], seeds=1, arms_file=str(arms))
    outcome = run_study(plan, model_loader=tiny_loader(), log=lambda s: None)
    assert outcome.statuses == {"correct/seed0": "done", "diverges/seed0": "failed", "reuse_diverged/seed0": "skipped"}
    study = load_study(plan)
    runs = {r["run"]: r for r in study["runs"]}
    err = runs["diverges/seed0"]["error"]
    assert err["type"] and err["message"] and "Traceback" in err["traceback"]
    assert "needs the mask of diverges/seed0, which is failed" in runs["reuse_diverged/seed0"]["reason"]
    assert runs["correct/seed0"]["pass_at_1"] is not None
    assert "correct/seed0" in study["findings"]["update_sparsity"]["runs"]
    assert "diverges/seed0" in study["findings"]["formats"]["missing"]
    with open(outcome.report) as f:
        report = f.read()
    assert f"`diverges/seed0` failed after 1 attempt(s): `{err['type']}" in report
    assert "`reuse_diverged/seed0` was skipped: needs the mask of diverges/seed0" in report


# --------------------------------------------------------------------------------------------------------------------
# Bad input fails before any training
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arms_yaml,arms,match",
    [
        (None, ["correct", "corect"], r"unknown arm 'corect'; known arms: \[.*'correct'"),
        (
            "typo: {lrr: 0.1}\n",
            ["correct", "typo"],
            r"arm 'typo' \(from .*arms.yaml\): unknown RLVRConfig field \['lrr'\]",
        ),
        ("zero: {group_size: 0}\n", ["correct", "zero"], r"arm 'zero' .*seed 0: RLVRConfig.group_size must be >= 1"),
        (
            "bad_reward: {rewards: {corect: 1.0}}\n",
            ["correct", "bad_reward"],
            r"arm 'bad_reward' .*unknown reward modes \['corect'\]",
        ),
        ("own_seed: {seed: 3}\n", ["correct", "own_seed"], r"arm 'own_seed' overrides \['seed'\], which the study"),
        (None, ["sparse_reuse"], r"arm 'sparse_reuse' takes its SparseAdamW mask from arm 'correct', which is"),
    ],
    ids=["unknown-arm", "unknown-field", "bad-value", "unknown-reward", "study-owned-field", "missing-mask-source"],
)
def test_bad_arms_fail_before_training(tmp_path, arms_yaml, arms, match):
    path = None
    if arms_yaml is not None:
        path = tmp_path / "arms.yaml"
        path.write_text(arms_yaml)
    with pytest.raises(ValueError, match=match):
        tiny_plan(str(tmp_path), arms, arms_file=str(path) if path else None)
    assert not os.path.exists(tmp_path / "study")  # nothing was created, let alone trained


def test_cli_rejects_a_bad_arm_in_one_line(capsys):
    from rlvr_fast.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["study", "--preset", "quick", "--arms", "correct,corect", "--dry-run"])
    assert exc.value.code == 2
    assert "rlvr-fast study: error: unknown arm 'corect'" in capsys.readouterr().err
    assert main(["study", "--preset", "quick", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "11 runs" in out and "sparse_reuse/seed0" in out and "correct/seed1" in out


# --------------------------------------------------------------------------------------------------------------------
# The statistics behind the findings
# --------------------------------------------------------------------------------------------------------------------


def test_calibration_bootstrap_point_values_and_pairing():
    from rlvr_fast.eval import auroc, brier_score, expected_calibration_error

    rng = np.random.default_rng(0)
    n, problems = 4, 30
    conf = rng.uniform(size=n * problems)
    correct = (rng.uniform(size=n * problems) < conf).astype(float)
    stated = [None if i % 7 == 0 else float(q) for i, q in enumerate(conf)]
    pc = {"confidence": stated, "correct": correct.tolist()}
    m = bootstrap_calibration(pc, n, resamples=200)
    keep = [i for i, q in enumerate(stated) if q is not None]
    q, c = conf[keep], correct[keep]
    assert m["answered"]["value"] == pytest.approx(len(keep) / len(stated))
    assert m["ece"]["value"] == pytest.approx(expected_calibration_error(q, c))
    assert m["brier"]["value"] == pytest.approx(brier_score(q, c))
    assert m["auroc"]["value"] == pytest.approx(auroc(q, c))
    for k in ("ece", "brier", "auroc"):
        assert m[k]["ci_low"] <= m[k]["value"] <= m[k]["ci_high"]
    same = bootstrap_calibration(pc, n, pc, resamples=50)["difference"]
    assert all(same[k]["value"] == 0 and same[k]["ci_low"] == 0 == same[k]["ci_high"] for k in ("ece", "brier"))


def test_agreement_confidence_wilson_and_crossings():
    pc = {"answer": ["7", "7", "8", None, None, None, "1", "1"]}
    assert agreement_confidence(pc, 4) == [0.5, 0.5, 0.25, 0.25, 0.5, 0.5, 0.5, 0.5]
    lo, hi = wilson(8, 10)  # the textbook value: 0.8 of 10 -> [0.490, 0.943]
    assert (round(lo, 3), round(hi, 3)) == (0.49, 0.943)
    deltas = {1: 0.3, 2: 0.1, 3: 0.0, 4: -0.05, 5: -0.1}
    assert _crossings({k: {"delta": v} for k, v in deltas.items()}) == [[2, 4]]
    assert _crossings({k: {"delta": abs(v)} for k, v in deltas.items()}) == []
