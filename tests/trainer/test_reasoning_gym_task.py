"""reasoning-gym as a task source (``task: reasoning_gym:<dataset>``, rlvr_fast/tasks/reasoning_gym.py): problems drawn
from a generator with ``task_params``, train and eval disjoint and reproducible, the ``task_score`` reward against the
dataset's own ``score_answer`` on fresh entries, the ``correct`` reward on the same problems, every refusal before the
model loads, and a 2-step run of a tiny random model on such a task.

reasoning-gym is a CI dependency (requirements-cpu.txt): without it this module fails with the install command rather
than skipping."""

from __future__ import annotations

import argparse
import sys

import pytest
from helpers.runs import main_exit, saved_tiny_model, tiny_config, tiny_loaded

from rlvr_fast.rewards import reward_fn
from rlvr_fast.tasks.reasoning_gym import INSTALL_HINT, GymEntry, check_params, check_reward_task
from rlvr_fast.trainer.checks.preflight import check_data
from rlvr_fast.trainer.config import RLVRConfig, add_config_arguments, config_from_args
from rlvr_fast.trainer.loop import Trainer
from rlvr_fast.trainer.rollout.data import load_problems, overlap_key
from rlvr_fast.trainer.schema import ConfigFieldError
from rlvr_fast.trainer.step import Scorer

try:
    import reasoning_gym
except ImportError:  # pragma: no cover - the failure is the message
    pytest.fail(f"reasoning-gym is not installed: {INSTALL_HINT}", pytrace=False)

TASK = "reasoning_gym:basic_arithmetic"
# "Calculate a + b." with a, b in 0..10: 121 distinct questions, so 60 + 30 draws must skip repeats to stay disjoint.
SMALL = {
    "min_terms": 2,
    "max_terms": 2,
    "min_digits": 1,
    "max_digits": 1,
    "operators": ["+"],
    "allow_parentheses": False,
}


def gym_config(**overrides) -> RLVRConfig:
    values = dict(task=TASK, task_params=SMALL, train_size=60, eval_size=30, prompts_per_step=2, group_size=2)
    values.update(overrides)
    return RLVRConfig(**values).validate()


def own_dataset(task: str, params: dict):
    """The dataset built by reasoning-gym's own factory (not through our module): its scorer is the reference."""
    return reasoning_gym.create_dataset(task.removeprefix("reasoning_gym:"), **params, seed=1, size=10)


# ---- loading and splitting -------------------------------------------------------------------------------------------


def test_splits_are_disjoint_distinct_sized_and_keep_the_entry():
    train, evaluation = load_problems(gym_config())
    assert (len(train), len(evaluation)) == (60, 30)
    train_keys = [overlap_key(p.prompt) for p in train]
    eval_keys = [overlap_key(p.prompt) for p in evaluation]
    assert len(set(train_keys)) == 60 and len(set(eval_keys)) == 30  # no repeats within a split
    assert not set(train_keys) & set(eval_keys)  # none shared
    for p in train + evaluation:
        assert isinstance(p.entry, GymEntry) and p.entry.dataset == "basic_arithmetic"
        assert set(p.entry.entry) == {"question", "answer", "metadata"}
        assert p.answer == str(p.entry.entry["answer"])
        assert p.prompt.startswith(p.entry.entry["question"]) and "\\boxed{}" in p.prompt  # the extractor's convention
        a, b = (int(x) for x in p.entry.entry["question"].removeprefix("Calculate ").rstrip(".").split(" + "))
        assert int(p.answer) == a + b  # the generator's answer, kept as generated


def test_splits_are_deterministic_per_seed():
    first = load_problems(gym_config(seed=3))
    again = load_problems(gym_config(seed=3))
    other = load_problems(gym_config(seed=4))
    prompts = [[p.prompt for p in split] for split in first]
    assert prompts == [[p.prompt for p in split] for split in again]
    assert prompts != [[p.prompt for p in split] for split in other]


def test_prompt_template_other_than_default_wraps_the_question():
    train, _ = load_problems(gym_config(prompt_template="Q: {expression} Answer inside \\boxed{{}}."))
    assert train[0].prompt == f"Q: {train[0].entry.entry['question']} Answer inside \\boxed{{}}."


def test_task_params_from_the_cli_and_integral_floats_become_ints():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    args = parser.parse_args(
        ["--task", TASK, "--task_params", "max_terms=2,min_terms=2,max_digits=1", "--train_size", "8"]
    )
    cfg = config_from_args(args)
    assert cfg.task_params == {"max_terms": 2.0, "min_terms": 2.0, "max_digits": 1.0}  # _parse_mapping reads floats
    train, _ = load_problems(cfg)  # random.randint refuses 2.0: the loader made them ints
    assert all(p.entry.entry["metadata"]["num_terms"] == 2 for p in train)
    coerced = check_params(TASK, cfg.task_params)
    assert coerced == {"max_terms": 2, "min_terms": 2, "max_digits": 1}
    assert all(type(v) is int for v in coerced.values())
    assert check_params(TASK, {"max_terms": 2.5, "allow_negation": 1.0}) == {"max_terms": 2.5, "allow_negation": 1.0}
    args = parser.parse_args(["--task", TASK, "--task_params", "{operators: ['+'], allow_parentheses: false}"])
    assert config_from_args(args).task_params == {"operators": ["+"], "allow_parentheses": False}


# ---- rewards ---------------------------------------------------------------------------------------------------------

SCORED = [  # (task, params): integer answers, scorers that differ (exact match, decimal comparison, partial credit)
    (TASK, SMALL),
    ("reasoning_gym:chain_sum", {"min_terms": 2, "max_terms": 3}),
    ("reasoning_gym:leg_counting", {"min_animals": 1, "max_animals": 2}),
    ("reasoning_gym:letter_counting", {}),
]


def wrong_answer(answer: str) -> str:
    """A wrong integer that does not contain the right one (the default scorer gives partial credit for that)."""
    return next(w for w in (str(int(answer) + d) for d in range(1, 100)) if answer not in w)


@pytest.mark.parametrize(("task", "params"), SCORED, ids=[t for t, _ in SCORED])
def test_task_score_is_the_dataset_scorer(task, params):
    _, evaluation = load_problems(gym_config(task=task, task_params=params, train_size=4, eval_size=6))
    reference = own_dataset(task, params)
    fn = reward_fn("task_score")
    for p in evaluation:
        answers = [p.answer, wrong_answer(p.answer), f"{p.answer}0{p.answer}"]
        completions = [f"Let me think. \\boxed{{{a}}}" for a in answers] + ["no answer here"]
        got = fn(completions, [p.answer] * 4, entries=[p.entry] * 4)
        assert got == [reference.score_answer(a, p.entry.entry) for a in [*answers, None]]
        assert got[0] == 1.0 and got[1] == 0.0 and got[3] == 0.0  # right, wrong, no answer


@pytest.mark.parametrize(("task", "params"), SCORED[:2], ids=[t for t, _ in SCORED[:2]])
def test_correct_mode_on_gym_problems(task, params):
    _, evaluation = load_problems(gym_config(task=task, task_params=params, train_size=4, eval_size=5))
    fn = reward_fn("correct")
    for p in evaluation:
        completions = [f"\\boxed{{{p.answer}}}", f"\\boxed{{{wrong_answer(p.answer)}}}", f"so {p.answer}"]
        assert fn(completions, [p.answer] * 3) == [1.0, 0.0, 1.0]


def test_scorer_passes_each_completion_its_entry():
    cfg = gym_config(rewards={"task_score": 1.0, "correct": 0.5})
    train, _ = load_problems(cfg)
    problems = train[:2]
    texts = [f"\\boxed{{{problems[0].answer}}}", "\\boxed{x}", "\\boxed{x}", f"\\boxed{{{problems[1].answer}}}"]
    rewards = Scorer(cfg)(texts, problems, step=0)
    assert rewards.components["task_score"] == [1.0, 0.0, 0.0, 1.0]
    assert rewards.correct.tolist() == [True, False, False, True]
    assert rewards.total.tolist() == [1.5, 0.0, 0.0, 1.5]


def test_task_score_never_raises_on_a_completion_and_checks_its_context():
    def failing(answer, entry):
        raise ValueError("the scorer could not parse it")

    entries = [
        GymEntry("x", {"answer": "1"}, failing),
        GymEntry("x", {"answer": "1"}, lambda a, e: float("nan")),
        GymEntry("x", {"answer": "1"}, lambda a, e: "1.0"),
    ]
    fn = reward_fn("task_score")
    assert fn(["\\boxed{1}"] * 3, ["1"] * 3, entries=entries) == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="entries"):
        fn(["\\boxed{1}"], ["1"])
    with pytest.raises(TypeError, match=r"entries\[0\] must have a score"):
        fn(["\\boxed{1}"], ["1"], entries=[{"answer": "1"}])


# ---- refusals, before the model loads --------------------------------------------------------------------------------


def refusal(field: str, **overrides) -> str:
    with pytest.raises(ConfigFieldError) as info:
        load_problems(gym_config(**overrides))
    assert info.value.field == field, info.value
    return str(info.value)


def test_unknown_dataset_lists_the_closest_names():
    message = refusal("task", task="reasoning_gym:basic_arithmetc")
    assert "'reasoning_gym:basic_arithmetc'" in message and "basic_arithmetic" in message
    assert "closest" in message and "in all" in message


def test_a_dataset_without_answers_is_refused():
    message = refusal("task", task="reasoning_gym:propositional_logic", task_params={})
    assert "answer is None" in message and "'reasoning_gym:propositional_logic'" in message


def test_unknown_or_trainer_owned_parameters_list_the_config_fields():
    message = refusal("task_params", task_params={"max_term": 3})
    assert "['max_term']" in message and "'max_terms'" in message and "'operators'" in message
    assert "BasicArithmeticDatasetConfig" in message
    message = refusal("task_params", task_params={"seed": 5})
    assert "['seed']" in message and "the run's seed" in message


def test_invalid_parameter_values_are_refused_with_the_generator_message():
    message = refusal("task_params", task_params={"min_terms": 0})
    assert "min_terms must be positive" in message and "'min_terms': 0" in message
    message = refusal("task_params", task_params={"operators": ["%"]})
    assert "unsupported operator" in message


def test_a_failing_generator_is_refused(monkeypatch):
    from reasoning_gym.arithmetic.basic_arithmetic import BasicArithmeticDataset

    def broken(self, idx):
        raise KeyError("no such item")

    monkeypatch.setattr(BasicArithmeticDataset, "__getitem__", broken)
    message = refusal("task_params")
    assert "item 0 of the eval split failed" in message and "KeyError" in message


def test_more_problems_than_the_generator_has_is_refused():
    message = refusal("train_size", train_size=150)  # 121 questions in all, 30 of them held out
    assert "train_size=150" in message and "distinct" in message


def test_not_installed_says_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "reasoning_gym", None)
    monkeypatch.setitem(sys.modules, "reasoning_gym.factory", None)
    message = refusal("task")
    assert "pip install 'reasoning-gym==0.1.25'" in message and "rlvr_fast[tasks]" in message


def test_task_params_without_a_gym_task_is_refused(tmp_path):
    with pytest.raises(ConfigFieldError) as info:
        load_problems(tiny_config(tmp_path, task_params={"max_terms": 2}).validate())
    assert info.value.field == "task_params" and "reasoning_gym:<dataset>" in str(info.value)


def test_task_score_needs_a_gym_task(tmp_path):
    with pytest.raises(ConfigFieldError) as info:
        check_data(tiny_config(tmp_path, rewards={"task_score": 1.0}).validate(), measure_prompts=False)
    assert info.value.field == "rewards"
    assert "task_score" in str(info.value) and "reasoning_gym:<dataset>" in str(info.value)
    check_reward_task(TASK, {"task_score": 1.0})  # accepted with a reasoning-gym task


def test_cli_refuses_before_the_model_loads(tmp_path, capsys):
    model = saved_tiny_model(tmp_path)
    argv = ["train", "--model", model, "--output_dir", str(tmp_path / "run"), "--task", "reasoning_gym:nope"]
    status, err = main_exit(argv, capsys)
    assert status == 2 and "RLVRConfig.task" in err and "reasoning_gym:nope" in err and "Traceback" not in err
    status, err = main_exit([*argv[:-1], TASK, "--task_params", "bogus=1"], capsys)
    assert status == 2 and "task_params" in err and "bogus" in err and "Traceback" not in err


# ---- a run -----------------------------------------------------------------------------------------------------------


def test_two_step_run_on_a_gym_task(tmp_path):
    cfg = tiny_config(
        tmp_path,
        task=TASK,
        task_params=SMALL,
        eval_file=None,
        train_size=12,
        eval_size=4,
        max_prompt_length=64,
        rewards={"task_score": 1.0, "correct": 0.5},
    )
    trainer = Trainer(cfg, loaded=tiny_loaded())
    assert all(isinstance(p.entry, GymEntry) for p in trainer.train_problems + trainer.eval_problems)
    result = trainer.train()
    steps = [m for m in result.metrics if "reward_mean" in m]
    assert [m["step"] for m in steps] == [0, 1]
    for m in steps:
        assert 0.0 <= m["reward_mean"] <= 1.5


def test_task_score_runs_only_reviewed_scorers():
    """Some reasoning-gym scorers eval the model's answer (countdown parses it with sympy's parse_expr, which evaluates
    it): task_score is refused on them before anything loads, and their entries carry no scorer; a dataset that keeps
    the base string comparison (basic_arithmetic) or a reviewed override (products) is accepted."""
    from rlvr_fast.tasks.reasoning_gym import generate_splits, scorer_is_reviewed

    with pytest.raises(ConfigFieldError, match=r"CountdownDataset\.score_answer .* not reviewed") as info:
        check_reward_task("reasoning_gym:countdown", {"task_score": 1.0})
    assert info.value.field == "rewards"
    check_reward_task("reasoning_gym:countdown", {"correct": 1.0})  # our own verifier: fine
    assert scorer_is_reviewed("reasoning_gym:basic_arithmetic") and scorer_is_reviewed("reasoning_gym:products")
    assert not scorer_is_reviewed("reasoning_gym:countdown")
    _, evaluation = generate_splits(
        "reasoning_gym:countdown", {}, 3, 2, seed=0, template="{expression}", key=lambda prompt: prompt
    )
    entry = evaluation[0][1]
    assert entry.scorer is None
    with pytest.raises(ValueError, match="not reviewed"):
        entry.score("__import__('os').getcwd()")


def test_train_derives_wrong_labels_for_incorrect_label(tmp_path):
    """``rlvr-fast train`` with the incorrect_label reward on a reasoning-gym task: every training problem carries a
    wrong label (its numeric answer plus a nonzero offset), deterministic for a seed; without that reward none."""
    from rlvr_fast.trainer.rollout.data import load_problems

    params = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}
    common = dict(task=TASK, task_params=params, train_size=6, eval_size=4, eval_file=None)
    train, _ = load_problems(tiny_config(tmp_path, rewards={"incorrect_label": 1.0}, **common))
    again, _ = load_problems(tiny_config(tmp_path, rewards={"incorrect_label": 1.0}, **common))
    assert all(p.extra["incorrect_answer"] != p.answer for p in train)
    assert all(abs(float(p.extra["incorrect_answer"]) - float(p.answer)) <= 10 for p in train)
    assert [p.extra["incorrect_answer"] for p in train] == [p.extra["incorrect_answer"] for p in again]
    plain, _ = load_problems(tiny_config(tmp_path, rewards={"correct": 1.0}, **common))
    assert not any("incorrect_answer" in p.extra for p in plain)
