"""Synthetic tasks: every generated answer is re-derived from the expression *text* by an independent evaluator written
here (a shunting-yard over Fraction, sharing no code with the generator's tree), splits share no expression, and
JSONL loading reports malformed lines with their numbers (docs/design.md §8)."""

from __future__ import annotations

import json
import os
import re
from fractions import Fraction

import pytest

from rlvr_fast.rewards.equivalence import is_equivalent
from rlvr_fast.rewards.modes import reward_fn
from rlvr_fast.tasks.arithmetic import PRESETS, ArithmeticConfig, get_preset
from rlvr_fast.tasks.jsonl import JSONLFormatError, load_jsonl, parse_jsonl_lines, save_jsonl
from rlvr_fast.tasks.prompts import PROMPT_TEMPLATES, render_prompt
from rlvr_fast.tasks.splits import generate_problems, make_splits

# ------------------------------------------------------------------------------------------------------------------
# independent evaluator: tokens -> postfix (shunting-yard) -> value, recording every intermediate result
# ------------------------------------------------------------------------------------------------------------------

# "a/b" written without spaces is a fraction literal (a leaf); operations are written " op ".
_TOKENS = re.compile(r"\s*(\d+/\d+|\d+|[-+*/^()])")
_PREC = {"+": 1, "-": 1, "*": 2, "/": 2, "^": 3}


def evaluate_text(text: str) -> tuple[Fraction, list[Fraction], list[int]]:
    """(value, every intermediate result of + - * /, every integer literal) of an arithmetic string."""
    tokens = []
    pos = 0
    while pos < len(text):
        m = _TOKENS.match(text, pos)
        assert m, f"unexpected character at {pos} in {text!r}"
        tokens.append(m.group(1))
        pos = m.end()
        if text[pos:].strip() == "":
            break
    output: list[str] = []
    stack: list[str] = []
    for tok in tokens:
        if tok[0].isdigit():
            output.append(tok)
        elif tok == "(":
            stack.append(tok)
        elif tok == ")":
            while stack[-1] != "(":
                output.append(stack.pop())
            stack.pop()
        else:  # left-associative except ^
            while (
                stack
                and stack[-1] != "("
                and (_PREC[stack[-1]] > _PREC[tok] or (_PREC[stack[-1]] == _PREC[tok] and tok != "^"))
            ):
                output.append(stack.pop())
            stack.append(tok)
    output.extend(reversed(stack))
    values: list[Fraction] = []
    intermediates: list[Fraction] = []
    literals: list[int] = []
    for tok in output:
        if tok[0].isdigit():
            parts = [int(x) for x in tok.split("/")]
            literals.extend(parts)
            values.append(Fraction(*parts))
            continue
        b, a = values.pop(), values.pop()
        if tok == "^":
            values.append(a ** int(b))
            continue
        if tok == "/" and b == 0:
            raise ZeroDivisionError(text)
        r = {"+": a + b, "-": a - b, "*": a * b, "/": a / b if tok == "/" else None}[tok]
        values.append(r)
        intermediates.append(r)
    assert len(values) == 1
    return values[0], intermediates, literals


def test_independent_evaluator_itself():
    assert evaluate_text("2 + 3 * 4")[0] == 14
    assert evaluate_text("10 - (4 - 1)")[0] == 7
    assert evaluate_text("10 - 4 - 1")[0] == 5
    assert evaluate_text("2 ^ 3")[0] == 8
    assert evaluate_text("8 / (3/4) * 2")[0] == Fraction(64, 3)
    assert evaluate_text("2^3^2")[0] == 512
    assert evaluate_text("1 / (3/4)") == (Fraction(4, 3), [Fraction(4, 3)], [1, 3, 4])


# ------------------------------------------------------------------------------------------------------------------
# generator
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_generated_answers_match_independent_evaluation(preset, seeded):
    cfg = PRESETS[preset]
    n = min(300, 100 if preset == "tiny" else 300)
    items = generate_problems(cfg, n, seed=seeded, split="check")
    assert len({it["expression"] for it in items}) == n
    for it in items:
        value, intermediates, literals = evaluate_text(it["expression"])  # raises on division by zero
        assert Fraction(it["answer"]) == value, it
        assert it["answer"] == (
            str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"
        )
        assert len(intermediates) == it["steps"] and cfg.min_steps <= it["steps"] <= cfg.max_steps
        assert all(abs(v.numerator) < 10**cfg.max_digits and v.denominator < 10**cfg.max_digits for v in intermediates)
        if cfg.nonnegative:
            assert all(v >= 0 for v in intermediates)
        # every literal is an operand, a fraction part, or the base / exponent of a square or cube
        assert all(x <= max(cfg.operand_max, cfg.max_denominator) or x in (2, 3) for x in literals), it
        assert it["expression"] in it["prompt"] and "\\boxed{}" in it["prompt"]
        assert it["incorrect_answer"] != it["answer"] and not is_equivalent(it["incorrect_answer"], it["answer"])


def test_random_calculation_covers_all_steps_and_operations(seeded):
    items = generate_problems("random_calculation", 500, seed=seeded)
    assert {it["steps"] for it in items} == set(range(1, 21))
    text = " ".join(it["expression"] for it in items)
    for piece in (" + ", " - ", " * ", " / ", "^2", "^3", "/"):
        assert piece in text
    assert re.search(r"\(\d+/\d+\)", text), "no fraction leaf"


def test_difficulty_knobs(seeded):
    cfg = ArithmeticConfig(
        min_steps=3, max_steps=3, operand_min=5, operand_max=9, ops=("*",), leaf_weights={"int": 1.0}
    )
    for it in generate_problems(cfg, 50, seed=seeded):
        _value, _intermediates, literals = evaluate_text(it["expression"])
        assert it["expression"].count("*") == 3 and all(5 <= x <= 9 for x in literals)
    ints = get_preset("medium", integer_values=True, leaf_weights={"int": 1.0})
    for it in generate_problems(ints, 100, seed=seeded):
        assert all(v.denominator == 1 for v in evaluate_text(it["expression"])[1])


def test_easy_preset_is_small_integer_addition_subtraction(seeded):
    items = generate_problems("easy", 200, seed=seeded)
    for it in items:
        assert re.fullmatch(r"[\d +\-()]+", it["expression"]), it["expression"]
        _, intermediates, literals = evaluate_text(it["expression"])
        assert 1 <= len(intermediates) <= 2 and all(0 <= x <= 20 for x in literals)
        assert 0 <= int(it["answer"]) <= 3 * 20
    # a completion that answers right is rewarded by the correct mode, the wrong label is not
    fn = reward_fn("correct")
    answers = [it["answer"] for it in items]
    assert fn([f"The answer is \\boxed{{{a}}}." for a in answers], answers) == [1.0] * len(items)
    assert fn([f"\\boxed{{{it['incorrect_answer']}}}" for it in items], answers) == [0.0] * len(items)


def test_config_errors():
    with pytest.raises(ValueError, match="min_steps"):
        ArithmeticConfig(min_steps=0).check()
    with pytest.raises(ValueError, match="ops must be"):
        ArithmeticConfig(ops=("%",)).check()
    with pytest.raises(ValueError, match="leaf_weights"):
        ArithmeticConfig(leaf_weights={"prime": 1.0}).check()
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("impossible")
    with pytest.raises(ValueError, match="at most 121 distinct expressions, fewer than the 200 requested"):
        generate_problems("tiny", 200)  # 11 x 11 distinct additions exist: refused before drawing
    nonnegative = ArithmeticConfig(1, 1, 0, 10, ("-",), {"int": 1.0}, nonnegative=True)  # 66 of the 121 are >= 0
    with pytest.raises(ValueError, match="found only 66 distinct expressions of the 100 requested"):
        generate_problems(nonnegative, 100)
    with pytest.raises(ValueError, match="n must be"):
        generate_problems("tiny", -1)


# ------------------------------------------------------------------------------------------------------------------
# splits and prompts
# ------------------------------------------------------------------------------------------------------------------


def test_splits_are_disjoint_and_deterministic(seeded):
    splits = make_splits("easy", 1500, 300, seed=seeded)
    train = [r["expression"] for r in splits["train"]]
    evals = [r["expression"] for r in splits["eval"]]
    assert len(set(train)) == 1500 and len(set(evals)) == 300
    assert not set(train) & set(evals)
    assert {r["split"] for r in splits["train"]} == {"train"} and {r["split"] for r in splits["eval"]} == {"eval"}
    again = make_splits("easy", 1500, 300, seed=seeded)
    assert again == splits
    # eval is drawn first from its own stream: it does not depend on the size of train
    assert make_splits("easy", 10, 300, seed=seeded)["eval"] == splits["eval"]
    other = make_splits("easy", 1500, 300, seed=seeded + 1)
    assert [r["expression"] for r in other["eval"]] != evals


def test_prompt_templates():
    for name in PROMPT_TEMPLATES:
        p = render_prompt("3 + 4", name)
        assert "3 + 4" in p and "\\boxed{}" in p
    assert "<confidence>" in render_prompt("1 + 1", "boxed_confidence")
    assert render_prompt("1 + 1", "Solve {expression} now") == "Solve 1 + 1 now"
    with pytest.raises(ValueError, match="template must be one of"):
        render_prompt("1 + 1", "nope")
    items = generate_problems("tiny", 3, template="boxed_confidence")
    assert all("<confidence>" in it["prompt"] for it in items)


# ------------------------------------------------------------------------------------------------------------------
# JSONL
# ------------------------------------------------------------------------------------------------------------------


def test_jsonl_round_trip(tmp_path, seeded):
    items = generate_problems("medium", 20, seed=seeded)
    path = tmp_path / "tasks.jsonl"
    save_jsonl(items, path)
    assert load_jsonl(path) == items


def test_jsonl_accepts_numbers_and_blank_lines(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(
        '{"prompt": "p1", "answer": 42}\n\n   \n{"prompt": "p2", "answer": "x", "level": 3}\n', encoding="utf-8"
    )
    assert load_jsonl(path) == [{"prompt": "p1", "answer": "42"}, {"prompt": "p2", "answer": "x", "level": 3}]


@pytest.mark.parametrize(
    "lines, line_no, message",
    [
        (['{"prompt": "a", "answer": "1"}', '{"prompt": "b", "answer": "2"', ""], 2, "invalid JSON"),
        (['{"prompt": "a", "answer": "1"}', "", '{"prompt": "b"}'], 3, r"missing field\(s\) \['answer'\]"),
        (['["prompt", "answer"]'], 1, "expected a JSON object, got list"),
        (['{"prompt": "", "answer": "1"}'], 1, "'prompt' must be a non-empty string"),
        (['{"prompt": "a", "answer": true}'], 1, "'answer' must be a string or a number"),
        (['{"prompt": "a", "answer": null}'], 1, "'answer' must be a string or a number"),
    ],
)
def test_jsonl_errors_name_the_line(tmp_path, lines, line_no, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(JSONLFormatError, match=rf"bad\.jsonl, line {line_no}: .*{message}") as info:
        load_jsonl(path)
    assert info.value.line == line_no


def test_jsonl_invalid_utf8_and_custom_fields(tmp_path):
    path = tmp_path / "bin.jsonl"
    path.write_bytes(b'{"prompt": "a", "answer": "1"}\n{"prompt": "\xff\xfe", "answer": "1"}\n')
    with pytest.raises(JSONLFormatError, match="line 2: invalid UTF-8"):
        load_jsonl(path)
    recs = parse_jsonl_lines([json.dumps({"question": "q"})], required=("question",))
    assert recs == [{"question": "q"}]
    with pytest.raises(JSONLFormatError, match=r"<jsonl>, line 1: missing field\(s\) \['question'\]"):
        parse_jsonl_lines(['{"prompt": "q"}'], required=("question",))


# ------------------------------------------------------------------------------------------------------------------
# Templates, sizes and files that used to give a traceback, a hang or unbounded memory
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "template, named",
    [
        ("{expression}{0}", r"\['\{0\}'\]"),
        ("{expression}{foo}", r"\['\{foo\}'\]"),
        ("{expression[0]}", r"\['\{expression\[0\]\}'\]"),
        ("What is {expression", "expected '}'"),
        ("{expression!x}", r"\['\{expression!x\}'\] carry a conversion or format spec"),
        ("{expression:{width}}", "width"),
        # the spec used to be tried on a test string: MemoryError, not a refusal
        ("{expression:>99999999999}", r"\['\{expression:>99999999999\}'\] carry"),
        ("{expression!r}", r"\['\{expression!r\}'\] carry"),
        ("{expression:>6}", r"\['\{expression:>6\}'\] carry"),
    ],
)
def test_templates_with_other_fields_are_a_value_error(template, named):
    """'{expression}{0}' used to raise IndexError and '{expression}{foo}' KeyError at the first render; a format
    spec or conversion is refused from the parse alone, never tried."""
    with pytest.raises(ValueError, match=rf"only field is the bare '\{{expression\}}' .*, got .*{named}"):
        render_prompt("1 + 1", template)
    assert render_prompt("1 + 1", "{{literal}} {expression} }}") == "{literal} 1 + 1 }"


def test_expression_space_size_is_exact_without_limits_and_refuses_at_once():
    from rlvr_fast.tasks.arithmetic import expression_space_size

    tiny = get_preset("tiny")
    assert expression_space_size(tiny) == 121 == len(generate_problems(tiny, 121))  # all of them, found
    two_ops = ArithmeticConfig(1, 2, 0, 2, ("+", "*"), {"int": 1.0})
    assert expression_space_size(two_ops) == 2 * 3**2 + 2 * 4 * 3**3
    assert len(generate_problems(two_ops, expression_space_size(two_ops))) == 234
    with pytest.raises(ValueError, match=r"at most 121 distinct expressions, fewer than the 100 requested besides"):
        generate_problems("tiny", 100, exclude=[f"{a} + 0" for a in range(30)])


def test_jsonl_refuses_what_is_not_a_regular_file(tmp_path):
    """--task /dev/zero used to grow without bound until the kernel killed it; a FIFO blocks the open."""
    fifo = tmp_path / "fifo.jsonl"
    os.mkfifo(fifo)
    for path, kind in [("/dev/zero", "a character device"), (fifo, "a FIFO"), (tmp_path, "a folder")]:
        with pytest.raises(ValueError, match=f"expected a regular JSONL file, got {kind}"):
            load_jsonl(path)


def test_jsonl_lines_are_bounded_nested_and_unicode_checked(tmp_path):
    from rlvr_fast.tasks.jsonl import MAX_LINE_BYTES

    path = tmp_path / "t.jsonl"
    fits = b'{"prompt": "' + b"x" * (MAX_LINE_BYTES - 30) + b'", "answer": "1"}'
    path.write_bytes(fits + b"\n" + b'{"prompt": "' + b"y" * MAX_LINE_BYTES + b'", "answer": "1"}\n')
    with pytest.raises(JSONLFormatError, match=r"t\.jsonl, line 2: line longer than 1048576 bytes \(.*1 MiB\)"):
        load_jsonl(path)
    path.write_bytes(fits + b"\n")
    assert len(load_jsonl(path)[0]["prompt"]) == MAX_LINE_BYTES - 30  # a line of exactly the limit is read
    path.write_text('{"prompt": "a", "answer": "1"}\n' + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(JSONLFormatError, match=r"line 2: invalid JSON: nested too deeply"):
        load_jsonl(path)
    path.write_text('{"prompt": "a", "answer": "1"}\n{"prompt": "a", "answer": "1", "meta": {"\\udc80": 1}}\n')
    with pytest.raises(
        JSONLFormatError, match=r"line 2: field 'meta'\['\\udc80'\] \(its name\) holds a lone surrogate"
    ):
        load_jsonl(path)
    with pytest.raises(JSONLFormatError, match=r"line 1: field 'prompt' holds a lone surrogate \\ud800"):
        parse_jsonl_lines(['{"prompt": "q \\ud800", "answer": "1"}'])
