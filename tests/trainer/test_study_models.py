"""``rlvr-fast study`` across models and tasks (cells): the planning of every cell (its runs, its base evaluation),
the lead table (paired pass@1 differences, the prediction and whether the data agree), the wrong label of a
reasoning-gym problem for the incorrect_label arm and its refusal, a dry run of the two presets with cells, and a tiny
multi-cell study end to end on tiny random models (no download)."""

import json
import math
import os

import numpy as np
import pytest
import torch
from helpers.runs import TOKEN_BIAS, write_task
from helpers.study_case import TINY_STUDY_BASE

from rlvr_fast.study import plan_study, run_study
from rlvr_fast.study.cells import LEAD_COMPARISONS, _lead_section, combine_seeds, compare
from rlvr_fast.study.plan import EVAL_DATA_FIELDS, _digest, eval_key
from rlvr_fast.study.predictions import PREDICTIONS, agreement, model_kind, predict, task_kind
from rlvr_fast.study.presets import BASIC_ARITHMETIC_PARAMS, PRESETS, REWARD_ARMS, StudyCell, StudyPreset
from rlvr_fast.tasks.reasoning_gym import WRONG_LABEL_OFFSETS, add_wrong_labels, wrong_label
from rlvr_fast.testing import char_tokenizer, tiny_causal_lm
from rlvr_fast.trainer.config import RLVRConfig
from rlvr_fast.trainer.evaluation.held_out import evaluation_kwargs
from rlvr_fast.trainer.model import LoadedModel
from rlvr_fast.trainer.rollout.data import load_problems
from rlvr_fast.trainer.schema import ConfigFieldError

GYM_PARAMS = BASIC_ARITHMETIC_PARAMS  # the models presets' basic_arithmetic generator


pytestmark = pytest.mark.usefixtures("single_thread")  # tests/trainer/conftest.py


def tiny_base() -> dict:
    """The base config of a tiny study: runs of 2 steps on 12 train / 4 eval problems x n=3."""
    return {
        **TINY_STUDY_BASE,
        "eval_size": 4,
        "max_prompt_length": 96,
        "steps": 2,
        "format_classes": {"digits_only": r"^\d+$", "has_five": "5"},
    }


def tiny_cells_preset(root, monkeypatch, *, with_gym: bool = True) -> str:
    """A preset of three cells: two tiny "models" on a JSONL task (with its wrong labels), one on reasoning-gym's
    basic_arithmetic; the four reward arms, one seed."""
    os.makedirs(root, exist_ok=True)
    train = write_task(os.path.join(root, "train.jsonl"), 12, "train")
    evaluation = write_task(os.path.join(root, "eval.jsonl"), 4, "eval")
    cells = [StudyCell("tiny-instruct", train, overrides={"eval_file": evaluation})]
    if with_gym:
        cells.append(StudyCell("tiny-instruct", "reasoning_gym:basic_arithmetic", GYM_PARAMS))
    cells.append(StudyCell("tiny-llama", train, overrides={"eval_file": evaluation}))
    preset = StudyPreset("tiny-cells", "test", tiny_base(), REWARD_ARMS, cells=tuple(cells))
    monkeypatch.setitem(PRESETS, "tiny-cells", preset)
    return "tiny-cells"


def make_loader(calls=None):
    """Each named model a tiny random Llama of its own (a seed from its name), biased to digits."""
    tok = char_tokenizer()

    def load(cfg):
        if calls is not None:
            calls.append(cfg.model)
        seed = sum(map(ord, cfg.model)) % 97
        return LoadedModel(
            tiny_causal_lm(tok, token_bias=TOKEN_BIAS, seed=seed), tok, torch.device("cpu"), torch.float32
        )

    return load


# --------------------------------------------------------------------------------------------------------------------
# Planning the cells
# --------------------------------------------------------------------------------------------------------------------


def test_cells_plan_runs_and_one_base_evaluation_per_cell(tmp_path, monkeypatch):
    preset = tiny_cells_preset(str(tmp_path), monkeypatch)
    plan = plan_study(preset, output_dir=str(tmp_path / "study"))
    names = list(plan.cells)
    assert names == ["tiny-instruct__train", "tiny-instruct__basic_arithmetic", "tiny-llama__train"]
    assert [r.key for r in plan.runs] == [f"{c}/{a}/seed0" for c in names for a in REWARD_ARMS]
    for c in names:
        runs = [r for r in plan.runs if r.cell == c]
        cell = plan.cells[c]
        assert cell.dir == str(tmp_path / "study" / "cells" / c)
        assert [r.run_dir for r in runs] == [os.path.join(cell.dir, "arms", a, "seed0") for a in REWARD_ARMS]
        assert {r.config["model"] for r in runs} == {cell.model} and {r.config["task"] for r in runs} == {cell.task}
        assert len({r.eval_key for r in runs}) == 1  # the four arms share the cell's one base evaluation
        assert plan.base_dir(runs[0]) == cell.dir and cell.primary == f"{c}/correct/seed0"
    # cells differ in their evaluation (model or task): each has its own base evaluation
    assert len({plan.cells[c].primary for c in names}) == 3
    assert len({plan.run(plan.cells[c].primary).eval_key for c in names}) == 3
    gym = next(r for r in plan.runs if r.cell == names[1]).config
    assert gym["task_params"] == GYM_PARAMS

    # the cell as a single-cell plan: local keys, the cell's folder
    sub = plan.cell_plan(names[2])
    assert [r.key for r in sub.runs] == [f"{a}/seed0" for a in REWARD_ARMS] and sub.primary == "correct/seed0"
    assert sub.output_dir == plan.cells[names[2]].dir and not sub.cells
    assert sub.base_overrides["model"] == "tiny-llama"

    # --cells keeps the named cells, in the preset's order
    picked = plan_study(preset, cells=[names[2], names[0]], output_dir=str(tmp_path / "study"))
    assert list(picked.cells) == [names[0], names[2]] and len(picked.runs) == 8


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"model": "other"}, r"preset 'tiny-cells' sets the model and task per cell: .*got \['model'\]"),
        ({"overrides": {"task_params": {"a": 1}}}, r"sets the model and task per cell: .*got \['task_params'\]"),
        ({"cells": ["nope"]}, r"--cells: expected names from preset 'tiny-cells'.*got \['nope'\]"),
    ],
    ids=["model-flag", "task-params-set", "unknown-cell"],
)
def test_cells_refuse_flags_that_would_override_them(tmp_path, monkeypatch, kwargs, match):
    preset = tiny_cells_preset(str(tmp_path), monkeypatch, with_gym=False)
    with pytest.raises(ValueError, match=match):
        plan_study(preset, output_dir=str(tmp_path / "study"), **kwargs)


def test_duplicate_cell_names_are_refused(tmp_path, monkeypatch):
    preset = tiny_cells_preset(str(tmp_path), monkeypatch, with_gym=False)
    cells = PRESETS[preset].cells
    monkeypatch.setitem(
        PRESETS, preset, StudyPreset(preset, "test", PRESETS[preset].base, ("correct",), cells=(cells[0], cells[0]))
    )
    with pytest.raises(ValueError, match=r"two cells are named 'tiny-instruct__train'"):
        plan_study(preset, output_dir=str(tmp_path / "study"))


def test_single_cell_presets_plan_as_before(tmp_path):
    """quick keeps its keys, folders and evaluation keys (the hash a study already on disk was written under)."""
    plan = plan_study("quick", output_dir=str(tmp_path / "q"))
    assert plan.cells == {} and plan.primary == "correct/seed0"
    assert [r.key for r in plan.runs][:3] == ["correct/seed0", "correct/seed1", "random/seed0"]
    assert all(
        r.cell is None and r.run_dir == str(tmp_path / "q" / "arms" / r.arm / f"seed{r.seed_index}") for r in plan.runs
    )
    for r in plan.runs:
        cfg = RLVRConfig.from_dict(dict(r.config))
        legacy = _digest({"kwargs": evaluation_kwargs(cfg), **{k: r.config[k] for k in EVAL_DATA_FIELDS}})
        assert r.eval_key == legacy and plan.base_dir(r) == plan.output_dir
    # a generator's parameters decide its problems: they are part of the key when set
    gym = {**plan.runs[0].config, "task": "reasoning_gym:basic_arithmetic", "task_params": GYM_PARAMS}
    assert eval_key(gym) != eval_key({**gym, "task_params": {**GYM_PARAMS, "max_digits": 2}})


# --------------------------------------------------------------------------------------------------------------------
# The lead table and the predictions
# --------------------------------------------------------------------------------------------------------------------


def fake_eval(counts, n):
    return {"n": n, "correct_counts": list(counts)}


def test_compare_pairs_by_problem_and_combines_seeds():
    rng = np.random.default_rng(0)
    n, problems = 4, 30
    base = rng.integers(0, n + 1, problems)
    correct = [rng.integers(0, n + 1, problems) for _ in range(2)]
    random_ = [rng.integers(0, n + 1, problems) for _ in range(2)]
    evals = {
        "correct": {i: (f"k{i}", fake_eval(correct[i], n)) for i in range(2)},
        "random": {0: ("k0", fake_eval(random_[0], n)), 1: ("other", fake_eval(random_[1], n))},
    }
    bases = {"k0": fake_eval(base, n), "k1": fake_eval(base, n)}
    # seed 1 of random was evaluated under another setting: only seed 0 is paired
    d = compare(evals, bases, "correct", "random")
    diff = (correct[0] - random_[0]) / n
    se = diff.std(ddof=1) / math.sqrt(problems)
    assert d["seeds"] == 1 and d["problems"] == [problems]
    assert d["delta"] == pytest.approx(diff.mean()) and d["se"] == pytest.approx(se)
    assert (d["ci_low"], d["ci_high"]) == pytest.approx((diff.mean() - 1.959964 * se, diff.mean() + 1.959964 * se))
    # against the base: both seeds, averaged, standard errors combined as independent
    d = compare(evals, bases, "correct", "base")
    diffs = [(c - base) / n for c in correct]
    ses = [x.std(ddof=1) / math.sqrt(problems) for x in diffs]
    assert d["seeds"] == 2 and d["delta"] == pytest.approx(np.mean([x.mean() for x in diffs]))
    assert d["se"] == pytest.approx(math.sqrt(ses[0] ** 2 + ses[1] ** 2) / 2)
    assert compare(evals, bases, "inverse", "random") is None  # an arm without a finished run
    assert combine_seeds([]) is None


@pytest.mark.parametrize(
    "sign,low,high,expected",
    [
        ("+", 0.01, 0.3, "agree"),
        ("+", -0.3, -0.01, "disagree"),
        ("+", -0.1, 0.2, "inconclusive"),
        ("-", -0.3, -0.01, "agree"),
        ("-", 0.02, 0.1, "disagree"),
        ("-", -0.2, 0.0, "inconclusive"),
        ("0", -0.04, 0.03, "agree"),
        ("0", 0.01, 0.04, "disagree"),
        ("0", -0.2, 0.1, "inconclusive"),
        ("?", 0.1, 0.2, "no prediction"),
        ("+", float("nan"), float("nan"), "inconclusive"),
    ],
)
def test_agreement_of_prediction_and_interval(sign, low, high, expected):
    assert agreement(sign, low, high) == expected


def test_predictions_by_model_and_task_kind():
    assert model_kind("smollm2-135m-instruct") == "instruct" and model_kind("gemma3-270m") == "base"
    assert model_kind("Qwen/Qwen2.5-Math-7B") == "math_pretrained" and model_kind("/x/tiny-llama") == "base"
    assert model_kind("meta-llama/Llama-3.2-1B-Instruct") == "instruct" and model_kind("/tmp/model") == "unknown"
    assert task_kind("arithmetic") == task_kind("reasoning_gym:products") == "procedural"
    assert task_kind("data/train.jsonl") == "data_file"
    _, _, p = predict("smollm2-135m-instruct", "reasoning_gym:basic_arithmetic")
    assert p is PREDICTIONS[("instruct", "procedural")]
    assert (p.signs["correct - random"], p.signs["correct - inverse"], p.signs["random - base"]) == ("+", "+", "0")
    assert predict("/tmp/model", "arithmetic")[2] is None
    with pytest.raises(ValueError, match=r"sign must be"):
        agreement("up", 0.1, 0.2)


def test_lead_table_rows_from_synthetic_cells():
    def entry(delta, low, high, sign):
        m = {"delta": delta, "se": 0.01, "ci_low": low, "ci_high": high, "seeds": 1, "problems": [24]}
        return {"measured": m, "predicted": sign, "data": agreement(sign, low, high)}

    cells = {
        "a": {
            "comparisons": {
                "correct - random": entry(0.2, 0.1, 0.3, "+"),
                "correct - inverse": entry(0.1, -0.05, 0.25, "+"),
            }
        },
        "b": {
            "comparisons": {
                "correct - random": entry(-0.2, -0.3, -0.1, "+"),
                "correct - inverse": entry(0.0, 0, 0, "?"),
            }
        },
    }
    lead = [
        {"cell": c, "model": f"m-{c}", "task": "arithmetic", "task_params": {}, **cells[c]["comparisons"]}
        for c in cells
    ]
    lines = _lead_section({"lead_table": lead, "cells": cells})
    assert "| model | task | correct - random | correct - inverse | prediction | data (random, inverse) |" in lines
    assert (
        "| `m-a` | `arithmetic` | +0.200 [+0.100, +0.300] | +0.100 [-0.050, +0.250] | +, + | agree, inconclusive |"
        in lines
    )
    assert (
        "| `m-b` | `arithmetic` | -0.200 [-0.300, -0.100] | +0.000 [+0.000, +0.000] | +, ? | disagree, no prediction |"
        in lines
    )
    assert LEAD_COMPARISONS == ("correct - random", "correct - inverse")


# --------------------------------------------------------------------------------------------------------------------
# The wrong label of a reasoning-gym problem
# --------------------------------------------------------------------------------------------------------------------


def test_wrong_label_is_a_seeded_nonzero_offset_of_a_numeric_answer():
    task = "reasoning_gym:basic_arithmetic"
    labels = {}
    for i, answer in enumerate(["7", "-3", "4.50", " 12 ", "0"]):
        q = f"What is {i}?"
        label = wrong_label(task, q, answer, seed=0)
        assert label == wrong_label(task, q, answer, seed=0)  # deterministic
        offset = float(label) - float(answer)
        assert offset == int(offset) and int(offset) in WRONG_LABEL_OFFSETS, (answer, label)
        labels[answer] = label
    assert labels["4.50"].endswith(".50")  # the answer's own digits kept
    offsets = {int(float(wrong_label(task, f"q{i}", "10", seed=0))) - 10 for i in range(200)}
    assert 0 not in offsets and len(offsets) > 10  # spread over the offsets, never 0
    assert [wrong_label(task, f"q{i}", "10", seed=1) for i in range(20)] != [
        wrong_label(task, f"q{i}", "10", seed=0) for i in range(20)
    ]  # the run's seed is part of the draw
    for bad in ("olleh", "[1, 2]", "nan", "inf", ""):
        with pytest.raises(
            ConfigFieldError, match=r"'incorrect_label' on reasoning_gym:spell_backward .*expected numeric"
        ) as info:
            wrong_label("reasoning_gym:spell_backward", "spell hello backwards", bad, seed=0, where="train problem 1")
        assert info.value.field == "rewards" and "train problem 1" in str(info.value)


def test_wrong_labels_of_generated_problems(tmp_path):
    cfg = RLVRConfig(
        task="reasoning_gym:basic_arithmetic",
        task_params=GYM_PARAMS,
        train_size=30,
        eval_size=5,
        output_dir=str(tmp_path),
    )
    train, _ = load_problems(cfg)
    assert all("incorrect_answer" not in p.extra for p in train)
    add_wrong_labels(cfg.task, train, seed=cfg.seed)
    for p in train:
        assert float(p.extra["incorrect_answer"]) != float(p.answer)
        assert p.extra["incorrect_answer"] == wrong_label(cfg.task, p.entry.entry["question"], p.answer, seed=cfg.seed)
    kept = train[0].extra["incorrect_answer"]
    add_wrong_labels(cfg.task, train, seed=cfg.seed + 1)  # idempotent: an existing label is kept
    assert train[0].extra["incorrect_answer"] == kept


def test_incorrect_label_arm_refuses_a_dataset_without_numeric_answers(tmp_path):
    with pytest.raises(
        ValueError, match=r"arm 'incorrect_label'.*reasoning_gym:spell_backward .*expected numeric answers"
    ):
        plan_study(
            "quick",
            arms=["correct", "incorrect_label"],
            task="reasoning_gym:spell_backward",
            overrides={"train_size": 16, "eval_size": 4},
            output_dir=str(tmp_path / "s"),
        )
    # the other arms are fine on it: only the arm that needs a wrong label is refused
    plan = plan_study(
        "quick",
        arms=["correct"],
        task="reasoning_gym:spell_backward",
        overrides={"train_size": 16, "eval_size": 4},
        output_dir=str(tmp_path / "s"),
    )
    assert [r.key for r in plan.runs] == ["correct/seed0", "correct/seed1"]


# --------------------------------------------------------------------------------------------------------------------
# The presets with cells
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset,cells,seeds", [("models-quick", 4, 1), ("models", 6, 2)])
def test_dry_run_of_the_presets_with_cells(preset, cells, seeds, capsys):
    from rlvr_fast.cli import main

    assert main(["study", "--preset", preset, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"{cells * len(REWARD_ARMS) * seeds} runs" in out
    for model in ("smollm2-135m-instruct", "gemma3-270m"):
        assert (
            f"{model}__basic_arithmetic/incorrect_label/seed0" in out
            and f"{model}__arithmetic-tiny/correct/seed0" in out
        )
    plan = plan_study(preset, output_dir="runs/never-written")
    assert [c.model for c in plan.cells.values()].count("gemma3-270m") == cells // 2
    if preset == "models":
        assert "gemma3-270m__products" in plan.cells


def test_cli_cells_flag_picks_cells_and_refuses_unknown_ones(capsys):
    from rlvr_fast.cli import main

    assert main(["study", "--preset", "models-quick", "--cells", "gemma3-270m__arithmetic-tiny", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "4 runs: gemma3-270m__arithmetic-tiny/correct/seed0, gemma3-270m__arithmetic-tiny/random/seed0" in out
    with pytest.raises(SystemExit) as exc:
        main(["study", "--preset", "models-quick", "--cells", "gemma__tiny", "--dry-run"])
    assert exc.value.code == 2
    assert "--cells: expected names from preset 'models-quick'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["study", "--preset", "quick", "--cells", "x", "--dry-run"])
    assert "preset 'quick' has no cells" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------------------
# A tiny multi-cell study end to end
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("cells")
    preset = tiny_cells_preset(str(root), mp)
    plan = plan_study(preset, output_dir=str(root / "study"))
    calls: list = []
    outcome = run_study(plan, model_loader=make_loader(calls), log=lambda s: None)
    mp.undo()
    with open(outcome.study_json) as f:
        study = json.load(f)
    with open(outcome.report) as f:
        report = f.read()
    return plan, outcome, study, report, calls


def read_json(path):
    with open(path) as f:
        return json.load(f)


def test_tiny_multi_cell_study_runs_every_cell(finished):
    plan, outcome, _, _, calls = finished
    assert outcome.statuses == {r.key: "done" for r in plan.runs}, outcome.statuses
    assert calls == ["tiny-instruct", "tiny-llama"]  # one load per model: cells run model-major
    saved = read_json(os.path.join(plan.output_dir, "plan.json"))
    assert list(saved["cells"]) == list(plan.cells) and saved["runs"][0]["cell"] == plan.runs[0].cell
    for name, cell in plan.cells.items():
        (key,) = os.listdir(os.path.join(cell.dir, "base"))  # one base evaluation per cell
        base = read_json(os.path.join(cell.dir, "base", key, "eval.json"))
        for r in (r for r in plan.runs if r.cell == name):
            # every arm's "before" is the cell's base evaluation: same problems, same sampling seeds
            assert read_json(os.path.join(r.run_dir, "eval_before.json")) == base, r.key
        assert os.path.exists(os.path.join(cell.dir, "report.md"))  # the full single-cell report of the cell
        assert set(read_json(os.path.join(cell.dir, "study.json"))["findings"]) >= {"pass_at_k", "reward", "formats"}


def test_lead_table_numbers_are_the_runs_paired_differences(finished):
    plan, _, study, _, _ = finished
    assert list(study)[:2] == ["format", "lead_table"]  # study.json leads with the table
    assert [row["cell"] for row in study["lead_table"]] == list(plan.cells)
    for row in study["lead_table"]:
        cell = plan.cells[row["cell"]]
        after = {arm: read_json(os.path.join(cell.dir, "arms", arm, "seed0", "eval_after.json")) for arm in REWARD_ARMS}
        for comp in LEAD_COMPARISONS:
            other = comp.split(" - ")[1]
            n = after["correct"]["n"]
            diff = (np.array(after["correct"]["correct_counts"]) - np.array(after[other]["correct_counts"])) / n
            m = row[comp]["measured"]
            assert m["delta"] == pytest.approx(diff.mean()) and m["problems"] == [len(diff)]
            assert m["ci_low"] <= m["delta"] <= m["ci_high"]
            assert row[comp]["data"] == agreement(row[comp]["predicted"], m["ci_low"], m["ci_high"])
    cells = study["cells"]
    instruct = cells["tiny-instruct__train"]
    assert (instruct["model_kind"], instruct["task_kind"]) == ("instruct", "data_file")
    assert instruct["prediction"]["signs"]["correct - random"] == "+"
    gym = cells["tiny-instruct__basic_arithmetic"]
    assert gym["task_kind"] == "procedural" and gym["comparisons"]["random - base"]["predicted"] == "0"
    assert gym["runs"]["incorrect_label/seed0"]["status"] == "done"  # wrong labels derived for the generated problems
    assert gym["clean"] is False and "reasoning-gym generator" in gym["contamination"]
    # the rollout entropy of a run: its first and last logged mean_entropy (steps that updated)
    logged = 0
    for name, c in cells.items():
        for key, r in c["runs"].items():
            path = os.path.join(plan.cells[name].dir, "arms", key.split("/")[0], "seed0", "metrics.jsonl")
            with open(path) as f:
                steps = [m for m in map(json.loads, f) if "mean_entropy" in m]
            if not steps:
                assert r["entropy"] is None
                continue
            logged += 1
            assert (r["entropy"]["first"], r["entropy"]["last"]) == (
                steps[0]["mean_entropy"],
                steps[-1]["mean_entropy"],
            )
            assert (r["entropy"]["first_step"], r["entropy"]["last_step"]) == (steps[0]["step"], steps[-1]["step"])
    assert logged > 0


def test_report_leads_with_the_table_and_labels_predictions(finished):
    plan, _, study, report, _ = finished
    sections = [line for line in report.splitlines() if line.startswith("## ")]
    assert sections[0].startswith("## Which rewards help which model")
    assert "| model | task | correct - random | correct - inverse | prediction | data (random, inverse) |" in report
    assert report.count("**Prediction** (research context, not measured") == len(plan.cells)
    gym = study["cells"]["tiny-instruct__basic_arithmetic"]
    d = gym["comparisons"]["correct - random"]
    m = d["measured"]
    assert (
        f"- correct - random: {m['delta']:+.3f} [{m['ci_low']:+.3f}, {m['ci_high']:+.3f}] (1 seed, 4 problems); "
        f"predicted above 0: the data **{d['data']}**"
    ) in report
    assert "[cells/tiny-llama__train/report.md](cells/tiny-llama__train/report.md)" in report
