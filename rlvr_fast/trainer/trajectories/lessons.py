"""Lessons from failed attempts, and the guarantee that no lesson carries the gold answer.

The default template (``default_lesson``) says what the verifier saw in each failed attempt of a group, by kind
(``FAILURE_KINDS``, in order; the first that applies):

- ``truncated``: the completion hit max_completion_length without EOS;
- ``repeated_question``: the completion repeats the question (the prompt's text, or 12+ of its characters in a row);
- ``no_answer``: ``rewards.extract.extract_answer`` finds no final answer;
- ``wrong_answer``: it found one, and the verifier said wrong: the lesson lists these wrong answers.

Its sentences hold no digits (a count like "3 attempts" could be the gold). A user builder (``lesson_builder:
"module:function"``, called as ``fn(prompt, texts, correct, truncated) -> str``) may build it instead.

Whoever built it, ``scrub_gold`` then removes the gold answer: every occurrence (case-insensitive, inside other words
or numbers too) of the answer's text and of its normalised form (``rewards.equivalence.normalize_answer``), and every
number in the lesson that the verifier's equivalence (``is_equivalent``) calls equal to the gold ("5.0", "5.00" for
"5"); each removal is counted. The lesson is scrubbed last, after any trimming to fit ``max_prompt_length``.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable

from rlvr_fast.rewards.equivalence import is_equivalent, normalize_answer
from rlvr_fast.rewards.extract import extract_answer
from rlvr_fast.trainer.schema import ConfigFieldError

SCRUBBED = "[...]"
# numbers ("5", "-1,000.5", "3/4") and LaTeX fractions: each is compared with the gold by the verifier's equivalence
_NUMBER = re.compile(r"\\d?frac\{[^{}]*\}\{[^{}]*\}|[-+]?\d[\d,]*(?:\.\d+)?(?:/\d+)?")


def _repeats_question(text: str, prompt: str) -> bool:
    body, question = " ".join(text.split()), " ".join(prompt.split())
    if not body or not question:
        return False
    if question in body:
        return True
    window = 12
    return len(question) >= window and any(question[i : i + window] in body for i in range(len(question) - window + 1))


FAILURE_KINDS: dict[str, tuple[Callable[[str, bool, str], bool], str]] = {
    "truncated": (lambda text, truncated, prompt: truncated, "Some attempts ran out of length before finishing."),
    "repeated_question": (
        lambda text, truncated, prompt: _repeats_question(text, prompt),
        "Some attempts repeated the question instead of solving it.",
    ),
    "no_answer": (
        lambda text, truncated, prompt: extract_answer(text) is None,
        "Some attempts gave no final answer.",
    ),
    "wrong_answer": (lambda text, truncated, prompt: True, "Some attempts gave a wrong final answer."),
}


def diagnose(text: str, truncated: bool, prompt: str) -> str:
    """The failure kind of one wrong completion (the first of ``FAILURE_KINDS`` that applies)."""
    return next(kind for kind, (applies, _) in FAILURE_KINDS.items() if applies(text, truncated, prompt))


def default_lesson(prompt: str, texts: list[str], correct: list[bool], truncated: list[bool]) -> str:
    """The template's lesson from a group's attempts (only the wrong ones are described)."""
    kinds: dict[str, int] = {}
    wrong: list[str] = []
    for text, ok, cut in zip(texts, correct, truncated, strict=True):
        if ok:
            continue
        kind = diagnose(text, cut, prompt)
        kinds[kind] = kinds.get(kind, 0) + 1
        answer = extract_answer(text) if kind == "wrong_answer" else None
        if answer is not None and answer not in wrong:
            wrong.append(answer)
    lines = ["Lesson from earlier attempts at this problem:"]
    for kind in FAILURE_KINDS:
        if kind in kinds:
            line = FAILURE_KINDS[kind][1]
            if kind == "wrong_answer" and wrong:
                line = f"These final answers are wrong: {', '.join(wrong[:8])}."
            lines.append(f"- {line}")
    if len(lines) == 1:
        lines.append("- Check each step before giving the final answer.")
    lines.append("Avoid these mistakes and end with one final answer.")
    return "\n".join(lines)


def load_lesson_builder(spec: str) -> Callable[..., str]:
    """The function ``module:function`` names; ConfigFieldError naming lesson_builder when it does not import."""

    def fail(why: str):
        raise ConfigFieldError(
            "lesson_builder",
            f"RLVRConfig.lesson_builder: expected 'module:function' naming a callable, got {spec!r} ({why})",
        )

    module_name, sep, name = spec.partition(":")
    if not sep or not module_name or not name:
        fail("no ':' between module and function")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any import failure of user code is a configuration error
        fail(f"{type(exc).__name__}: {exc}")
    fn = getattr(module, name, None)
    if not callable(fn):
        fail(f"module {module_name!r} has no callable {name!r}")
    try:  # called as fn(prompt, texts, correct, truncated): a function that cannot take them fails here, not mid-run
        inspect.signature(fn).bind("", [], [], [])
    except TypeError as exc:
        fail(f"{name} cannot be called as {name}(prompt, texts, correct, truncated): {exc}")
    except ValueError:  # no signature to read (some builtins): checked by the first call
        pass
    return fn


def gold_forms(answer: str) -> list[str]:
    """The gold answer's spellings that are removed wherever they occur: its text and its normalised form."""
    forms = {answer.strip(), normalize_answer(answer)}
    return sorted((f for f in forms if f), key=len, reverse=True)  # longest first: "12.5" before "12"


def scrub_gold(lesson: str, answers: list[str]) -> tuple[str, int]:
    """(the lesson without any of ``answers``, how many occurrences were removed) (module doc)."""
    scrubs = 0
    for answer in answers:
        for form in gold_forms(answer):
            lesson, n = re.subn(re.escape(form), SCRUBBED, lesson, flags=re.IGNORECASE)
            scrubs += n

        def equal_number(match: re.Match, gold: str = answer) -> str:
            nonlocal scrubs
            if is_equivalent(match.group(), gold):
                scrubs += 1
                return SCRUBBED
            return match.group()

        lesson = _NUMBER.sub(equal_number, lesson)
    return lesson, scrubs
