"""Task and verifier edges the other task tests do not use: reasoning-gym datasets whose answers are not one number
(grids, lists, hexadecimal, word lists), graded by the ``correct`` reward against the dataset's own ``score_answer``;
signs written with U+2212; ``task_params`` of the wrong type for an int field."""

from __future__ import annotations

import random

import pytest

from rlvr_fast.rewards import extract_answer, is_equivalent, reward_fn, symbolic_available
from rlvr_fast.trainer.schema import ConfigFieldError

CORRECT = reward_fn("correct")


def _entries(dataset: str, n: int, **params):
    """``n`` entries of a reasoning-gym dataset and the dataset (its own scorer)."""
    pytest.importorskip("reasoning_gym")
    from rlvr_fast.tasks.reasoning_gym import make_dataset

    ds = make_dataset(f"reasoning_gym:{dataset}", params, seed=1, size=n)
    return [ds[i] for i in range(n)], ds


# ---- grids and lists of numbers ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pred, ref, expected",
    [
        ("1600", "1 6\n0 0", False),  # the digits of a 2x2 grid are not the number 1600
        ("1 6 0 0", "1 6\n0 0", False),  # nor its rows run together
        ("16 00", "1 6 0 0", False),
        ("1 6\n0  0 ", "1  6 \n 0 0", True),  # spacing inside the grid is not the answer
        ("4 6 7", "4 6 7", True),
        ("2 x", "2x", True),  # a coefficient before a variable still closes up
    ],
)
def test_numbers_side_by_side_are_not_one_number(pred, ref, expected):
    assert is_equivalent(pred, ref) is expected


@pytest.mark.parametrize("dataset", ["rotate_matrix", "spiral_matrix", "binary_matrix"])
def test_grid_datasets_agree_with_their_own_scorer(dataset):
    """The gold grid in a box scores 1; the same digits without their spacing score what the dataset's scorer gives
    them (0), where the old normalisation called them equal."""
    entries, ds = _entries(dataset, 20)
    for e in entries:
        gold = str(e["answer"])
        squashed = "".join(gold.split())
        assert CORRECT([f"so \\boxed{{{gold}}}."], [gold]) == [1.0], gold
        assert CORRECT([f"\\boxed{{{squashed}}}"], [gold]) == [float(ds.score_answer(squashed, e) == 1.0)], gold


# ---- hexadecimal answers ------------------------------------------------------------------------------------------


@pytest.mark.skipif(not symbolic_available(), reason="the false products came from the symbolic stage")
@pytest.mark.parametrize("pred, ref", [("f3", "3f"), ("4a0", "4e0"), ("4a0", "0"), ("a0", "b0"), ("0a", "0b")])
def test_hexadecimal_answers_are_not_products(pred, ref):
    assert is_equivalent(pred, ref) is False
    assert is_equivalent(ref, ref) is True


@pytest.mark.skipif(not symbolic_available(), reason="the symbolic stage compares these")
@pytest.mark.parametrize(
    "pred, ref", [("3\\sqrt2", "3\\sqrt{2}"), ("3 \\sqrt 2", "\\sqrt{18}"), ("2\\pi", "\\pi 2"), ("2x", "x*2")]
)
def test_a_command_between_digits_is_still_math(pred, ref):
    """The side-by-side check reads a LaTeX command as standing between its neighbours: 3\\sqrt2 is not "3 2"."""
    assert is_equivalent(pred, ref) is True


def test_base_conversion_agrees_with_its_own_scorer():
    """50 base_conversion problems (hexadecimal and other bases): the gold answer scores 1, each one-character change
    scores as the dataset's own scorer says."""
    entries, ds = _entries("base_conversion", 50)
    for i, e in enumerate(entries):
        gold = str(e["answer"])
        rng = random.Random(i)
        for _ in range(3):
            j = rng.randrange(len(gold))
            wrong = gold[:j] + rng.choice([c for c in "0123456789abcdef" if c != gold[j]]) + gold[j + 1 :]
            want = float(ds.score_answer(wrong, e) == 1.0)
            assert CORRECT([f"\\boxed{{{wrong}}}"], [gold]) == [want], (gold, wrong)
        assert CORRECT([f"\\boxed{{{gold}}}"], [gold]) == [1.0]


# ---- answer lines and tags holding a list ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<answer>100, Full, floats, taking</answer>", "100, Full, floats, taking"),
        ("Answer: agreement, 1, Hall, we, have.", "agreement, 1, Hall, we, have"),
        ("Answer: 3, 4", "3, 4"),
        ("Answer: 42 apples", "42"),  # prose around one number still gives the number
        ("Answer: the total is 42, I think", "42"),
    ],
)
def test_a_list_in_an_answer_line_is_kept_whole(text, expected):
    assert extract_answer(text) == expected


def test_word_lists_in_answer_tags_agree_with_their_own_scorer():
    """reasoning-gym's own format is <answer>...</answer>: a sorted word list holding a number was cut to the number."""
    for dataset in ("word_sorting", "word_sequence_reversal"):
        entries, ds = _entries(dataset, 50)
        for e in entries:
            gold = str(e["answer"])
            assert ds.score_answer(gold, e) == 1.0
            assert CORRECT([f"<answer>{gold}</answer>"], [gold]) == [1.0], gold


# ---- signs ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("label, want", [("-3", 1.0), ("3", 0.0)])
def test_typographic_minus_in_prose_keeps_its_sign(label, want):
    """ "the answer is −3" (U+2212) read as 3: right for the label 3, wrong for -3."""
    assert CORRECT(["The answer is \u22123.", "we get \u2212 3"], [label, label]) == [want, want]


# ---- task_params of an int field ------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [True, 2.5, "3"])
def test_int_task_param_of_another_type_is_refused_by_name(value):
    pytest.importorskip("reasoning_gym")
    from rlvr_fast.tasks.reasoning_gym import make_dataset

    with pytest.raises(ConfigFieldError, match=r"task_params.*word_sorting.*whole numbers.*\['min_words'\]") as info:
        make_dataset("reasoning_gym:word_sorting", {"min_words": value, "max_words": 6}, seed=0, size=4)
    assert info.value.field == "task_params" and repr(value) in str(info.value)
    # a CLI number (3.0) is still taken as the int it is
    assert make_dataset("reasoning_gym:word_sorting", {"min_words": 3.0}, seed=0, size=4).config.min_words == 3
