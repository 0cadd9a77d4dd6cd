"""Rewards: extraction, equivalence, every reward mode against hand-computed values, composition and the failure
policy, difficulty filters, and a fuzz test of every mode on hostile strings (docs/design.md §§5-6)."""

from __future__ import annotations

import builtins
import logging
import math
import random
import re
import string
import time
from fractions import Fraction

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlvr_fast.rewards.compose import RewardFunctionError, compose, guard
from rlvr_fast.rewards.equivalence import (
    _equivalent_cached,
    is_equivalent,
    normalize_answer,
    parse_number,
    symbolic_available,
)
from rlvr_fast.rewards.extract import extract_answer, has_nonempty_boxed
from rlvr_fast.rewards.filters import filter_groups
from rlvr_fast.rewards.modes import REWARD_MODES, majority_vote, parse_confidence, reward_fn

HYP = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ------------------------------------------------------------------------------------------------------------------
# extract_answer
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so the result is \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
        ("\\boxed{1} then \\boxed{ 2 }", "2"),
        ("\\boxed{3} and an empty \\boxed{ }", "3"),  # empty boxes are skipped
        ("\\boxed{\\left( 3, 4 \\right)}", "\\left( 3, 4 \\right)"),
        ("\\boxed{7} stray } brace", "7"),
        ("\\boxed{a{b} then 12", "12"),  # unclosed box: falls back to the last number
        ("\\fbox{9}", "9"),
        ("<answer>12</answer><confidence>0.9</confidence>", "12"),
        ("I think 5 <confidence>0.9</confidence>", "5"),  # the confidence is never the answer
        ("Answer: 42 apples", "42"),
        ("**Final Answer:** $3/4$.", "3/4"),
        ("The answer is: x = -2", "-2"),
        ("Answer: \\sqrt{2} + 1", "\\sqrt{2} + 1"),  # math is kept whole, prose is reduced to its last number
        ("Answer:\n\n  17\n", "17"),
        ("so 10-3=7", "7"),
        ("we get -5", "-5"),
        ("a total of 1,234,567 dollars", "1,234,567"),
        ("it is 3.25.", "3.25"),
        ("half: \\dfrac{1}{2}", "\\dfrac{1}{2}"),
        ("ratio 3/4", "3/4"),
        ("12 then 7 " + "words " * 2000, "7"),  # the last number, far before the end
        ("1" * 10000 + " x", "1" * 4097),  # longer than the scan window: cut, still never a short answer
        ("no digits here", None),
        ("", None),
    ],
)
def test_extract_answer_cases(text, expected):
    assert extract_answer(text) == expected


_PLAIN = st.text(alphabet=string.ascii_letters + string.digits + " .,:+-*=()\n", max_size=40)


@st.composite
def _balanced(draw, depth=0):
    """Text with balanced braces and no box command."""
    parts = draw(st.lists(st.one_of(_PLAIN, st.sampled_from(["\\frac", "\\sqrt", "\\pi", "^", "_"])), max_size=4))
    if depth < 3 and draw(st.booleans()):
        parts.append("{" + draw(_balanced(depth + 1)) + "}")
    return "".join(parts)


@HYP
@given(prefix=_PLAIN, content=_balanced(), suffix=_PLAIN)
def test_boxed_content_is_extracted(prefix, content, suffix):
    if not content.strip():
        content = "0" + content
    text = f"{prefix}\\boxed{{{content}}}{suffix}"
    assert extract_answer(text) == content.strip()
    assert has_nonempty_boxed(text)


@HYP
@given(
    words=st.lists(st.text(alphabet=string.ascii_letters + " ", min_size=1, max_size=12), max_size=5),
    value=st.fractions(max_denominator=50),
)
def test_last_number_is_extracted(words, value):
    prose = " ".join(words)
    number = f"{value.numerator}" if value.denominator == 1 else f"{value.numerator}/{value.denominator}"
    got = extract_answer(f"{prose} 12 then {number} {prose}")
    assert got is not None and is_equivalent(got, number)


def test_extract_answer_rejects_non_str():
    with pytest.raises(TypeError, match="text must be a str"):
        extract_answer(b"\\boxed{1}")


# ------------------------------------------------------------------------------------------------------------------
# is_equivalent
# ------------------------------------------------------------------------------------------------------------------


def _integer_forms(n: int) -> list[str]:
    forms = [
        str(n),
        f"{n}.0",
        f"\\frac{{{2 * n}}}{{2}}",
        f"\\left( {n} \\right)",
        f"${n}$",
        f"{n:,}",
        f"\\boxed{{{n}}}",
    ]
    if n >= 0:
        forms += [f"+{n}", f"{n} apples", f"x = {n}"]
    return forms


def _fraction_forms(x: Fraction) -> list[str]:
    p, q = x.numerator, x.denominator
    forms = [f"{p}/{q}", f"\\frac{{{p}}}{{{q}}}", f"\\dfrac{{{3 * p}}}{{{3 * q}}}", f"({p})/({q})", f"{p} \\div {q}"]
    if p < 0:
        forms += [f"-\\frac{{{-p}}}{{{q}}}", f"-{-p}/{q}"]
    q_rest = q
    for f in (2, 5):
        while q_rest % f == 0:
            q_rest //= f
    if q_rest == 1:  # a terminating decimal, written exactly: p/q = p * (10^k / q) / 10^k
        k = next(k for k in range(64) if 10**k % q == 0)
        digits = str(abs(p) * (10**k // q)).rjust(k + 1, "0")
        forms.append(("-" if p < 0 else "") + digits[:-k] + "." + digits[-k:])
    return forms


@HYP
@given(n=st.integers(-(10**9), 10**9))
def test_integer_written_several_ways_is_equivalent(n):
    """Example forms of 7: 7, 7.0, \\frac{14}{2}, \\left( 7 \\right), $7$, 7 (thousands separators), \\boxed{7}, +7."""
    forms = _integer_forms(n)
    for a in forms:
        for b in forms:
            assert is_equivalent(a, b), (a, b)
        assert not is_equivalent(a, str(n + 1)), a


@HYP
@given(x=st.fractions(max_denominator=400).filter(lambda f: f.denominator > 1))
def test_fraction_written_several_ways_is_equivalent(x):
    forms = _fraction_forms(x)
    other = x + Fraction(1, x.denominator + 1)
    for a in forms:
        for b in forms:
            assert is_equivalent(a, b), (a, b)
        assert not is_equivalent(a, f"{other.numerator}/{other.denominator}"), a


@HYP
@given(a=st.fractions(max_denominator=60), b=st.fractions(max_denominator=60))
def test_equivalence_of_rationals_is_exact_and_symmetric(a, b):
    sa, sb = f"{a.numerator}/{a.denominator}", f"\\frac{{{b.numerator}}}{{{b.denominator}}}"
    assert is_equivalent(sa, sb) == (a == b) == is_equivalent(sb, sa)


@pytest.mark.parametrize(
    "pred, ref, expected",
    [
        ("0.333333", "1/3", True),  # a decimal rounded to 6 places: within abs_tol=1e-6
        ("0.33", "1/3", False),
        ("1234567.5", "1234567", False),  # tolerance never blurs integers
        ("1e3", "1000", True),
        ("2^{10}", "1024", True),
        ("2^{-1}", "\\frac12", True),
        ("50\\%", "50", True),
        ("5^\\circ", "5", True),
        ("1{,}000", "1000", True),
        ("", "0", False),
        ("5 cm", "5", True),
        ("5\\text{ cm}", "5", True),
        ("2x", "2", False),
        ("1/0", "2", False),
        ("nan", "ann", False),  # letters are not multiplied into equal products
        ("none", "neon", False),
        ("10^{10000}", "1", False),
        ("10^{10^{10}}", "10", False),
        ("(" * 100 + "1" + ")" * 100, "1", False),  # deeper than MAX_DEPTH: not valued
    ],
)
def test_equivalence_cases(pred, ref, expected):
    assert is_equivalent(pred, ref) is expected


def test_equivalence_tolerance_parameters():
    assert is_equivalent("0.33", "1/3", abs_tol=0.01)
    assert not is_equivalent("0.333333", "1/3", abs_tol=0.0)
    assert is_equivalent("1000.5", "1000", abs_tol=0.0, rel_tol=1e-3)
    with pytest.raises(ValueError, match="abs_tol"):
        is_equivalent("1", "1", abs_tol=-1.0)
    with pytest.raises(ValueError, match="rel_tol"):
        is_equivalent("1", "1", rel_tol=float("nan"))
    with pytest.raises(TypeError, match="pred must be a str"):
        is_equivalent(1, "1")
    with pytest.raises(TypeError, match="ref must be a str"):
        is_equivalent("1", 1)
    assert is_equivalent(None, "1") is False


@pytest.mark.skipif(not symbolic_available(), reason="math-verify not installed")
@pytest.mark.parametrize(
    "pred, ref, expected",
    [
        ("\\sqrt{4}", "2", True),
        ("x+1", "1+x", True),
        ("2\\sqrt{2}", "\\sqrt{8}", True),
        ("\\sqrt{3}", "2", False),
        ("(1,2)", "(2,1)", False),
    ],
)
def test_symbolic_equivalence(pred, ref, expected):
    assert is_equivalent(pred, ref) is expected
    assert is_equivalent(pred, ref, symbolic=False) is (normalize_answer(pred) == normalize_answer(ref))


def test_model_output_never_reaches_eval_or_exec(monkeypatch):
    """sympify / parse_expr evaluate strings through builtins.eval: record every eval / exec while comparing hostile
    and symbolic answers (fresh strings, so no verdict comes from a cache). Only numeric literals built from number
    tokens of math-verify's LaTeX lexer may be evaluated (see equivalence.py); nothing of the hostile text."""
    is_equivalent("\\sqrt{9}", "3")  # warm imports (module bodies run through exec on first import)
    _equivalent_cached.cache_clear()
    evaluated = []
    real_eval, real_exec = builtins.eval, builtins.exec

    def recorder(real):
        def f(source, *args, **kwargs):
            if isinstance(source, str):
                evaluated.append(source)
            return real(source, *args, **kwargs)

        return f

    monkeypatch.setattr(builtins, "eval", recorder(real_eval))
    monkeypatch.setattr(builtins, "exec", recorder(real_exec))
    hostile = [
        "__import__('os').system('echo pwned')",
        "().__class__.__bases__[0].__subclasses__()",
        "lambda: 1",
        "x**2 + 1",
        "\\sqrt{16} + y",
        "2\\pi r",
        "\\frac{\\sqrt{2}}{2}",
        "(1, 2, 3)",
        "\\sin(x)^2 + \\cos(x)^2",
        "1.5\\sqrt{2}",
    ]
    for pred in hostile:
        for ref in ("4", "y + 4", "1", "2\\pi r"):
            is_equivalent(pred, ref)
    for name in REWARD_MODES:
        reward_fn(name)(
            [f"\\boxed{{{h}}}" for h in hostile],
            ["1"] * len(hostile),
            incorrect_answers=["2"] * len(hostile),
            entries=[ExactEntry("1")] * len(hostile),
            group_size=len(hostile),
        )
    monkeypatch.undo()
    numeric_literal = re.compile(r"^(?:Integer \(\d+ \)|Float \('\d*\.?\d*' \))$")
    from_model = [
        src
        for src in evaluated
        if any(m in src for m in ("__import__", "__class__", "__subclasses__", "lambda", "pwned", "x**2"))
    ]
    assert from_model == []
    numbers = [src for src in evaluated if src.startswith(("Integer", "Float"))]
    assert numbers, "the symbolic stage was not exercised"
    assert all(numeric_literal.match(src) for src in numbers), numbers


def test_parse_number_values():
    assert parse_number("-\\frac{6}{8}").value == Fraction(-3, 4)
    assert parse_number("1,250.5") == (Fraction(2501, 2), True)
    assert parse_number("3 \\times 4 - 2^{3}").value == 4
    assert parse_number("\\sqrt{2}") is None
    assert parse_number("10^{100000}") is None


# ------------------------------------------------------------------------------------------------------------------
# reward modes, hand-computed
# ------------------------------------------------------------------------------------------------------------------


class ExactEntry:
    """A task entry with its own scorer (the ``task_score`` mode's context): 1 for the exact answer text, else 0."""

    def __init__(self, answer: str):
        self.answer = answer

    def score(self, answer: str | None) -> float:
        return float(answer == self.answer)


COMPLETIONS = ["so \\boxed{4}", "I get 5", "", "\\boxed{}", "Answer: 4.0"]


ANSWERS = ["4", "4", "4", "4", "4"]


def test_correct_inverse_format():
    assert reward_fn("correct")(COMPLETIONS, ANSWERS) == [1.0, 0.0, 0.0, 0.0, 1.0]
    assert reward_fn("inverse")(COMPLETIONS, ANSWERS) == [0.0, 1.0, 1.0, 1.0, 0.0]
    assert reward_fn("format")(COMPLETIONS, ANSWERS) == [1.0, 0.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize("name", sorted(n for n, m in REWARD_MODES.items() if m.no_answer_value is not None))
def test_no_answer_gets_the_documented_value(name):
    hopeless = ["", "}{", "\\boxed{", "no digits", "\ud800"]
    r = reward_fn(name, group_size=1) if name == "majority_label" else reward_fn(name)
    got = r(hopeless, ["4"] * len(hopeless), incorrect_answers=["5"] * len(hopeless), entries=[ExactEntry("4")] * 5)
    assert got == [REWARD_MODES[name].no_answer_value] * len(hopeless)


def test_incorrect_label():
    fn = reward_fn("incorrect_label")
    assert fn(COMPLETIONS, ANSWERS, incorrect_answers=["5"] * 5) == [0.0, 1.0, 0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="incorrect_answers"):
        fn(COMPLETIONS, ANSWERS)
    with pytest.raises(ValueError, match="3 entries, expected 5"):
        fn(COMPLETIONS, ANSWERS, incorrect_answers=["5"] * 3)


def test_majority_label_groups_and_ties():
    completions = [
        "\\boxed{3}",
        "3.0",
        "\\boxed{5}",
        "nothing",  # group 0: 3 wins
        "\\boxed{1/2}",
        "\\boxed{0.5}",
        "\\boxed{\\frac{1}{2}}",
        "\\boxed{2}",  # group 1: equivalent forms
        "\\boxed{7}",
        "\\boxed{8}",
        "\\boxed{8}",
        "\\boxed{7}",
    ]  # group 2: tie -> first seen (7)
    answers = ["0"] * 12  # the true labels play no part
    fn = reward_fn("majority_label", group_size=4)
    assert fn(completions, answers) == [1, 1, 0, 0, 1, 1, 1, 0, 1, 0, 0, 1]
    assert reward_fn("majority_label")(completions, answers, group_ids=[i // 4 for i in range(12)]) == fn(
        completions, answers
    )
    given = reward_fn("majority_label")(completions[:2], answers[:2], majority_answers=["5", None])
    assert given == [0.0, 0.0]
    with pytest.raises(ValueError, match="group_size"):
        reward_fn("majority_label")(completions, answers)
    with pytest.raises(ValueError, match="whole number of groups"):
        reward_fn("majority_label", group_size=5)(completions, answers)
    assert majority_vote([None, "2", "\\frac{4}{2}", "3", "x", "x"]) == "2"
    assert majority_vote([None, None]) is None


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("\\boxed{4} <confidence>1</confidence>", 1.0),  # right and sure
        ("\\boxed{4} <confidence>0</confidence>", 0.0),  # right, claims no confidence: 1 - 1
        ("\\boxed{5} <confidence>1.0</confidence>", -1.0),  # wrong and sure: 0 - 1
        ("\\boxed{5} <confidence>0.0</confidence>", 0.0),  # wrong and says so
        ("\\boxed{4} <confidence>0.7</confidence>", 1.0 - 0.3**2),
        ("\\boxed{5} <confidence>70%</confidence>", -(0.7**2)),
        ("\\boxed{4}", 0.0),  # missing confidence: c - 1
        ("\\boxed{5}", -1.0),
        ("\\boxed{4} <confidence>high</confidence>", 0.0),  # unparseable
        ("\\boxed{4} <confidence>1.5</confidence>", 0.0),  # outside [0, 1]
        ("\\boxed{4} <confidence>nan</confidence>", 0.0),
        ("\\boxed{4} <confidence>0.2", 0.0),  # unclosed tag
    ],
)
def test_brier_reward(completion, expected):
    assert reward_fn("brier")([completion], ["4"]) == [pytest.approx(expected, abs=1e-12)]


def test_parse_confidence():
    assert parse_confidence("a <confidence>0.1</confidence> b <confidence> .25 </confidence>") == 0.25
    assert parse_confidence("<confidence>4/5</confidence>") == pytest.approx(0.8)
    assert parse_confidence("<confidence>-0.1</confidence>") is None


@pytest.mark.parametrize(
    "pred, ref, expected",
    [
        ("10", "10", 1.0),
        ("10.5", "10", 1 - 0.25 - 0.5 * (0.5 / (10 + 1e-6))),
        ("9", "10", 1 - 0.5 - 0.5 * (1 / (10 + 1e-6))),
        ("0.5", "0", 1 - 0.25 - 0.5),  # relative term saturates at b = 0
        ("3", "1", 0.0),  # both terms saturate
        ("102", "100", 1 - 0.5 - 0.5 * (2 / (100 + 1e-6))),
        ("-1/2", "1/2", 1 - 0.5 - 0.5),
        ("no number", "10", 0.0),
    ],
)
def test_numeric_continuous_known_points(pred, ref, expected):
    assert reward_fn("numeric_continuous")([f"Answer: {pred}"], [ref]) == [
        pytest.approx(expected, rel=1e-12, abs=1e-15)
    ]


def test_numeric_continuous_unparseable_reference():
    assert reward_fn("numeric_continuous")(["\\boxed{3}"], ["\\sqrt{2}"]) == [0.0]


def test_random_reward_is_seeded_bernoulli(seeded):
    n = 20000
    prompts = [f"p{i // 8}" for i in range(n)]
    index = [i % 8 for i in range(n)]
    fn = reward_fn("random", gamma=0.3, seed=seeded)
    r = fn(["x"] * n, ["1"] * n, prompts=prompts, completion_index=index, step=5)
    assert set(r) <= {0.0, 1.0}
    sd = math.sqrt(0.3 * 0.7 / n)
    assert abs(sum(r) / n - 0.3) < 5 * sd
    assert fn(["x"] * n, ["1"] * n, prompts=prompts, completion_index=index, step=5) == r  # deterministic
    # the draw belongs to (prompt, completion index, step), not to the batch position
    perm = list(range(n))
    random.shuffle(perm)
    r_perm = fn(
        ["x"] * n, ["1"] * n, prompts=[prompts[i] for i in perm], completion_index=[index[i] for i in perm], step=5
    )
    assert r_perm == [r[i] for i in perm]
    other_step = fn(["x"] * n, ["1"] * n, prompts=prompts, completion_index=index, step=6)
    other_seed = reward_fn("random", gamma=0.3, seed=seeded + 1)(
        ["x"] * n, ["1"] * n, prompts=prompts, completion_index=index, step=5
    )
    agree = 0.3**2 + 0.7**2  # independent draws agree this often
    for other in (other_step, other_seed):
        frac = sum(a == b for a, b in zip(r, other)) / n
        assert abs(frac - agree) < 0.03
    assert reward_fn("random", gamma=0.0)(["x"] * 50, ["1"] * 50) == [0.0] * 50
    assert reward_fn("random", gamma=1.0)(["x"] * 50, ["1"] * 50) == [1.0] * 50


def test_reward_fn_argument_errors():
    with pytest.raises(ValueError, match="unknown reward mode 'corect'"):
        reward_fn("corect")
    with pytest.raises(TypeError, match="unexpected parameter"):
        reward_fn("correct", gamma=0.5)
    with pytest.raises(ValueError, match="gamma"):
        reward_fn("random", gamma=1.5)
    with pytest.raises(TypeError, match="seed"):
        reward_fn("random", seed=0.5)
    fn = reward_fn("correct")
    with pytest.raises(ValueError, match="2 completions but 1 answers"):
        fn(["a", "b"], ["1"])
    with pytest.raises(TypeError, match=r"completions\[1\] must be a str"):
        fn(["a", None], ["1", "2"])
    with pytest.raises(TypeError, match="completions must be a list"):
        fn("abc", ["1"])


# ------------------------------------------------------------------------------------------------------------------
# composition and the failure policy
# ------------------------------------------------------------------------------------------------------------------


def test_compose_weighted_sum():
    combo = compose({"correct": 1.0, "format": 0.25})
    assert combo(COMPLETIONS, ANSWERS) == [1.25, 0.0, 0.0, 0.0, 1.0]
    parts = combo.components(COMPLETIONS, ANSWERS)
    assert parts == {"correct": [1.0, 0.0, 0.0, 0.0, 1.0], "format": [1.0, 0.0, 0.0, 0.0, 0.0]}
    combo2 = compose([(2.0, reward_fn("correct")), (-1.0, "correct"), (0.5, lambda c, a, **k: [1.0] * len(c))])
    assert combo2(COMPLETIONS, ANSWERS) == [1.5, 0.5, 0.5, 0.5, 1.5]
    with pytest.raises(ValueError, match="weight"):
        compose({"correct": float("inf")})
    with pytest.raises(ValueError, match="empty"):
        compose({})
    with pytest.raises(TypeError, match="pair"):
        compose([("correct",)])


def _flaky(completions, answers, **ctx):
    out = []
    for c in completions:
        if "boom" in c:
            raise RuntimeError("user bug")
        out.append(float(len(c) % 2))
    return out


def test_guard_value_policy_reports_the_sample(caplog):
    g = guard(_flaky, error_value=-0.5)
    comps = ["ab", "xx boom yy", "abc"]
    with caplog.at_level(logging.WARNING, logger="rlvr_fast.rewards"):
        assert g(comps, ["1"] * 3) == [0.0, -0.5, 1.0]
    assert [e.index for e in g.errors] == [1]
    assert "boom" in g.errors[0].completion and "RuntimeError('user bug')" in g.errors[0].error
    assert "sample 1" in caplog.text and "boom" in caplog.text
    assert g(["ab"], ["1"]) == [0.0] and g.errors == []  # errors belong to the last call


def test_guard_nan_and_raise_policies():
    assert math.isnan(guard(_flaky, on_error="nan")(["boom"], ["1"])[0])
    with pytest.raises(RewardFunctionError, match="sample 2") as info:
        guard(_flaky, on_error="raise")(["a", "b", "boom!"], ["1"] * 3)
    assert info.value.sample.index == 2 and isinstance(info.value.__cause__, RuntimeError)
    with pytest.raises(ValueError, match="on_error"):
        guard(_flaky, on_error="ignore")


def test_guard_rejects_bad_outputs_per_sample():
    def wrong_length(c, a, **k):
        return [1.0] * (len(c) + 1) if len(c) > 1 else [2.0]

    assert guard(wrong_length)(["a", "b"], ["1", "1"]) == [2.0, 2.0]

    def non_finite(c, a, **k):
        return [float("nan") if "n" in x else 1.0 for x in c]

    g = guard(non_finite)
    assert g(["a", "n"], ["1", "1"]) == [1.0, 0.0] and "non-finite" in g.errors[0].error

    def per_sample_ctx(c, a, *, weights, **k):
        return [w * len(x) for x, w in zip(c, weights)]

    # list-valued context of batch length is sliced with its sample when the batch call fails
    def fails_on_batch(c, a, **k):
        if len(c) > 1:
            raise RuntimeError("batch")
        return per_sample_ctx(c, a, **k)

    assert guard(fails_on_batch)(["ab", "abc"], ["1", "1"], weights=[1.0, 2.0]) == [2.0, 6.0]


# ------------------------------------------------------------------------------------------------------------------
# difficulty filters
# ------------------------------------------------------------------------------------------------------------------


def test_filter_groups_counts_each_rule():
    correct = torch.tensor(
        [[1, 1, 1, 1], [0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 0, 1], [1, 1, 0, 0], [0, 1, 0, 0]], dtype=torch.float32
    )
    res = filter_groups(correct, p_min=0.3, p_max=0.7)
    assert res.keep.tolist() == [False, False, False, False, True, False]
    assert res.removed == {"all_equal": 2, "too_hard": 2, "too_easy": 1}
    assert res.matched == {"all_equal": 2, "too_hard": 3, "too_easy": 2}
    assert sum(res.removed.values()) == res.total - res.kept
    assert res.solve_rate.tolist() == pytest.approx([1, 0, 0.25, 0.75, 0.5, 0.25])
    assert res.completion_mask(4).tolist() == [False] * 16 + [True] * 4 + [False] * 4
    only_equal = filter_groups(correct.reshape(-1), group_size=4)
    assert only_equal.removed == {"all_equal": 2} and only_equal.kept == 4


def test_filter_groups_with_shaped_rewards():
    rewards = torch.tensor([[0.9, 0.9, 0.9], [0.1, 0.5, 0.9], [-1.0, -1.0, -1.0 + 1e-9]])
    correct = torch.tensor([[1, 1, 1], [0, 0, 1], [0, 0, 0]])
    res = filter_groups(rewards, correct, p_min=0.5, atol=1e-6)
    assert res.keep.tolist() == [False, False, False]
    assert res.removed == {"all_equal": 2, "too_hard": 1}
    assert filter_groups(rewards, correct, drop_all_equal=False).removed == {}


def test_filter_groups_errors():
    r = torch.zeros(2, 4)
    with pytest.raises(ValueError, match=r"p_min=0\.8 > p_max=0\.2"):
        filter_groups(r, p_min=0.8, p_max=0.2)
    with pytest.raises(ValueError, match="p_max must be in"):
        filter_groups(r, p_max=1.5)
    with pytest.raises(ValueError, match="NaN"):
        filter_groups(torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(ValueError, match="needs correct="):
        filter_groups(torch.tensor([[0.5, 0.2]]), p_min=0.1)
    with pytest.raises(ValueError, match="group_size"):
        filter_groups(torch.zeros(6))
    with pytest.raises(ValueError, match="whole number of groups"):
        filter_groups(torch.zeros(6), group_size=4)
    with pytest.raises(ValueError, match="only 0 and 1"):
        filter_groups(r, torch.full((2, 4), 0.5))
    with pytest.raises(ValueError, match="shape"):
        filter_groups(r, torch.zeros(2, 3))


# ------------------------------------------------------------------------------------------------------------------
# fuzz: hostile strings through every mode
# ------------------------------------------------------------------------------------------------------------------

_FRAGMENTS = [
    "\\boxed{",
    "}",
    "{",
    "\\boxed{}",
    "\\fbox{",
    "\\frac{",
    "\\dfrac",
    "\\left(",
    "\\right)",
    "10^{10000}",
    "10^{10^{10}}",
    "9" * 50,
    "nan",
    "inf",
    "-",
    "+",
    "/",
    "0",
    "1/0",
    "3.14",
    "1,234",
    "Answer:",
    "answer is",
    "<confidence>",
    "</confidence>",
    "<answer>",
    "</answer>",
    "0.7",
    "\ud800",
    "\udfff",
    "\x00",
    "\n",
    " ",
    "$",
    "\\",
    "^",
    "(",
    ")",
    "x",
    "\\sqrt{",
    "abc",
    "é",
    "∞",
    "\\text{",
    "%",
    "e5",
    "--",
    "..",
    "\\pi",
]


def _fuzz_strings(rng: random.Random, count: int) -> list[str]:
    out = ["", " ", "nan", "\\boxed{nan}", "10^10000", "\\boxed{10^{10000}}", "}{" * 50, "\ud800\\boxed{\udfff}"]
    while len(out) < count:
        k = rng.randint(1, 25)
        out.append(
            "".join(rng.choice(_FRAGMENTS) if rng.random() < 0.7 else chr(rng.randint(0, 0x2FFF)) for _ in range(k))
        )
    return out


_RANGES = {
    "correct": (0.0, 1.0),
    "format": (0.0, 1.0),
    "random": (0.0, 1.0),
    "inverse": (0.0, 1.0),
    "incorrect_label": (0.0, 1.0),
    "majority_label": (0.0, 1.0),
    "brier": (-1.0, 1.0),
    "numeric_continuous": (0.0, 1.0),
    "task_score": (0.0, 1.0),
}


def test_fuzz_every_mode_never_raises_and_is_fast(seeded):
    rng = random.Random(seeded)
    completions = _fuzz_strings(rng, 3000)
    answers = [
        rng.choice(["4", "-3/7", "0.5", "\\frac{1}{2}", "x+1", "\\sqrt{2}"]) if i % 3 else s
        for i, s in enumerate(reversed(completions))
    ]
    ctx = dict(
        prompts=[s[:10] for s in completions],
        step=3,
        group_size=8,
        incorrect_answers=list(reversed(answers)),
        entries=[ExactEntry(a) for a in answers],
    )
    assert set(_RANGES) == set(REWARD_MODES)
    for name in REWARD_MODES:
        start = time.perf_counter()
        r = reward_fn(name)(completions, answers, **ctx)
        elapsed = time.perf_counter() - start
        lo, hi = _RANGES[name]
        assert len(r) == len(completions) and all(isinstance(v, float) and lo <= v <= hi for v in r), name
        assert elapsed < 20.0, f"{name} took {elapsed:.1f}s for {len(completions)} fuzz strings"


def test_fuzz_megabyte_strings_are_bounded():
    """Every scan is linear: one MiB of hostile text costs each mode ~0.03 s (measured on a shared 2-core machine);
    the bound, 0.5 s per string, leaves room for noise."""
    mb = 1 << 20
    huge = [
        "x" * mb,
        "{" * mb,
        "\\boxed{" * (mb // 7),
        "9" * mb,
        "1," * (mb // 2),
        "<confidence>" * (mb // 12),
        "answer " * (mb // 7),
        "\n" * mb,
        "(" * mb,
        "\ud800" * mb,
    ]
    completions = huge + [" " * mb + "\\boxed{1}", "\\boxed{" + "1" * mb + "}"]
    answers = ["1"] * (len(completions) - 1) + [huge[3]]
    n = len(completions)
    for name in REWARD_MODES:
        fn = reward_fn(name, group_size=n) if name == "majority_label" else reward_fn(name)
        start = time.perf_counter()
        r = fn(completions, answers, incorrect_answers=["2"] * n, entries=[ExactEntry("1")] * n)
        elapsed = time.perf_counter() - start
        assert len(r) == n and all(math.isfinite(v) for v in r)
        if name in ("correct", "format", "majority_label", "numeric_continuous", "task_score"):
            assert r[-2] == 1.0  # the answer after a MiB of spaces is still found
        assert elapsed < 0.5 * n, f"{name} took {elapsed:.2f}s on {n} one-MiB strings"
