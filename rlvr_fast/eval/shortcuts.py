"""Shortcut signatures: what a model that learned to guess instead of compute leaves in its completions.

The claim under test (docs/study.md, "Hard problems"): training on problems a model almost never solves rewards lucky
guesses, and the model learns shortcuts (repeating one answer, skipping the computation) that damage skills it had.
Three signatures, each measured per problem (a problem's ``n`` completions: a held-out problem's samples or a
training group) so that two evaluations of the same problems can be compared pairwise:

- **answer repetition** (``all_same``, ``all_same_wrong``, ``modal_share``): ``all_same`` is 1 when every one of the
  problem's completions gives an answer and all answers are equal (``answer_key``: the same value), else 0;
  ``all_same_wrong`` is ``all_same`` with a wrong answer (the collapse onto a guess, as opposed to a problem the model
  reliably solves); ``modal_share`` is the count of the most frequent answer over ``n`` (completions without an answer
  count against it; 0 when none answers).
- **skipped computation** (``short``): the share of the problem's completions that write fewer than half the
  arithmetic tokens of a reference worked solution. Arithmetic tokens are numbers and the symbols ``+ - * / × ÷ = ^``
  (``ARITHMETIC_TOKEN``); a worked solution of a k-operation problem writes one equation ``a op b = c`` per operation,
  ``TOKENS_PER_OPERATION`` = 5 tokens each (``reference_working_tokens``). Prose does not count: "The answer is 7" is
  one arithmetic token, "3 + 4 = 7" five. Undefined (None) for a problem without a known operation count.
- **answer-only output** (``answer_only``): the share of completions that are just the answer: once a
  ``<confidence>`` block, ``\\boxed{}``, ``$``, ``\\(``/``\\)``, whitespace and a final period are removed, what is
  left is exactly the extracted answer (``rlvr_fast.rewards.extract_answer``).

Summaries are means over problems (with equal ``n`` these are shares of completions for ``short`` and
``answer_only``); ``paired_difference`` gives the after - before difference with a normal interval over problems, the
same error bar the study uses for paired pass@k differences.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from statistics import NormalDist

__all__ = [
    "ARITHMETIC_TOKEN",
    "SHORT_FRACTION",
    "SIGNATURES",
    "TOKENS_PER_OPERATION",
    "arithmetic_tokens",
    "group_agreement",
    "is_answer_only",
    "is_short",
    "paired_difference",
    "per_problem_signatures",
    "reference_working_tokens",
    "summarize",
]

ARITHMETIC_TOKEN = re.compile(r"\d+(?:\.\d+)?|[-+*/×÷=^]")
TOKENS_PER_OPERATION = 5  # "a op b = c"
SHORT_FRACTION = 0.5  # "much shorter": under half the reference working
SIGNATURES = ("all_same", "all_same_wrong", "modal_share", "short", "answer_only")

_CONFIDENCE_BLOCK = re.compile(r"(?s)<confidence>.*?(?:</confidence>|\Z)")
_WRAPPERS = re.compile(r"\\boxed\{|\\\(|\\\)|\$|\s")


def _default_key() -> Callable[[str], str | None]:
    # the held-out evaluation's own answer key, so keys computed here equal its per_completion["answer"]
    from rlvr_fast.trainer.evaluation.held_out import answer_key

    return answer_key


def arithmetic_tokens(text: str) -> int:
    """Numbers and arithmetic symbols written in ``text`` (``ARITHMETIC_TOKEN``)."""
    return len(ARITHMETIC_TOKEN.findall(text))


def reference_working_tokens(steps: int) -> int:
    """Arithmetic tokens of a worked solution of ``steps`` operations: one ``a op b = c`` per operation."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"reference_working_tokens: steps must be an int >= 1, got {steps!r}")
    return TOKENS_PER_OPERATION * steps


def is_short(text: str, reference_tokens: int, fraction: float = SHORT_FRACTION) -> bool:
    """Whether ``text`` writes fewer than ``fraction`` x ``reference_tokens`` arithmetic tokens."""
    return arithmetic_tokens(text) < fraction * reference_tokens


def is_answer_only(text: str) -> bool:
    """Whether ``text`` is just its answer (see the module docstring): ``"7"``, ``" \\boxed{7}."``, ``"$-3/4$"`` are;
    ``"3 + 4 = 7"`` and ``"The answer is 7"`` are not; a completion without an answer is not."""
    from rlvr_fast.rewards import extract_answer

    answer = extract_answer(text)
    if answer is None:
        return False
    body = _WRAPPERS.sub("", _CONFIDENCE_BLOCK.sub("", text)).rstrip(".")
    if body.endswith("}"):  # the closing brace of \boxed{...}
        body = body[:-1]
    return body != "" and body == re.sub(r"\s", "", answer)


def group_agreement(answers: Sequence[str | None]) -> tuple[bool, float, str | None]:
    """(all_same, modal_share, modal answer) of one problem's completions' answer keys (None: no answer)."""
    if not answers:
        raise ValueError("group_agreement: expected at least one answer key, got none")
    given = Counter(a for a in answers if a is not None)
    if not given:
        return False, 0.0, None
    modal, count = given.most_common(1)[0]
    return count == len(answers), count / len(answers), modal


def per_problem_signatures(
    n: int,
    *,
    answers: Sequence[str | None] | None = None,
    texts: Sequence[str] | None = None,
    correct: Sequence[float] | None = None,
    steps: Sequence[int | None] | None = None,
    key: Callable[[str], str | None] | None = None,
) -> dict[str, list[float | None]]:
    """Signature name -> one value per problem, for problem-major completions (problem i's ``n`` at [i n, (i+1) n)).

    Args:
        n: completions per problem.
        answers: answer keys per completion; computed from ``texts`` with ``key`` (default: the held-out evaluation's
            ``answer_key``) when None.
        texts: the completions; without them ``short`` and ``answer_only`` are left out.
        correct: verdicts (0/1) per completion; without them ``all_same_wrong`` is left out.
        steps: operations per problem (the reference working), None where unknown; without it ``short`` is left out.

    Raises:
        ValueError: lengths that are not problems x n, or neither answers nor texts.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"per_problem_signatures: n must be an int >= 1, got {n!r}")
    if answers is None:
        if texts is None:
            raise ValueError("per_problem_signatures: expected answers or texts, got neither")
        answers = [(key or _default_key())(t) for t in texts]
    total = len(answers)
    if total % n:
        raise ValueError(f"per_problem_signatures: {total} answers is not problems x n={n}")
    for name, seq in (("texts", texts), ("correct", correct)):
        if seq is not None and len(seq) != total:
            raise ValueError(f"per_problem_signatures: {len(seq)} {name} for {total} answers; expected equal counts")
    problems = total // n
    if steps is not None and len(steps) != problems:
        raise ValueError(f"per_problem_signatures: {len(steps)} steps for {problems} problems; expected one each")
    out: dict[str, list[float | None]] = {"all_same": [], "modal_share": []}
    if correct is not None:
        out["all_same_wrong"] = []
    if texts is not None:
        out["answer_only"] = []
        if steps is not None:
            out["short"] = []
    for p in range(problems):
        lo, hi = p * n, (p + 1) * n
        same, share, _ = group_agreement(answers[lo:hi])
        out["all_same"].append(float(same))
        out["modal_share"].append(share)
        if correct is not None:
            out["all_same_wrong"].append(float(same and not any(correct[lo:hi])))
        if texts is not None:
            out["answer_only"].append(sum(is_answer_only(t) for t in texts[lo:hi]) / n)
            if steps is not None:
                ref = reference_working_tokens(steps[p]) if steps[p] else None
                out["short"].append(None if ref is None else sum(is_short(t, ref) for t in texts[lo:hi]) / n)
    return out


def _defined(values: Sequence[float | None]) -> list[float]:
    return [v for v in values if v is not None]


def summarize(per_problem: dict[str, list[float | None]]) -> dict[str, dict]:
    """Signature -> {"value": mean over problems where defined, "problems": how many}; NaN when none."""
    out = {}
    for name, values in per_problem.items():
        v = _defined(values)
        out[name] = {"value": sum(v) / len(v) if v else float("nan"), "problems": len(v)}
    return out


def paired_difference(before: Sequence[float | None], after: Sequence[float | None], confidence: float = 0.95) -> dict:
    """after - before over the problems both define: {"delta", "se", "ci_low", "ci_high", "problems"} with a normal
    interval over problems (NaN bounds with fewer than 2 problems)."""
    if len(before) != len(after):
        raise ValueError(f"paired_difference: {len(before)} vs {len(after)} problems (expected the same problems)")
    d = [a - b for a, b in zip(after, before) if a is not None and b is not None]
    if not d:
        nan = float("nan")
        return {"delta": nan, "se": nan, "ci_low": nan, "ci_high": nan, "problems": 0}
    mean = sum(d) / len(d)
    if len(d) < 2:
        return {"delta": mean, "se": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "problems": 1}
    se = math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d))
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    return {"delta": mean, "se": se, "ci_low": mean - z * se, "ci_high": mean + z * se, "problems": len(d)}
