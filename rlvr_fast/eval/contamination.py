"""Contamination probe: can the model finish a benchmark question it was only shown part of? (docs/design.md
section 7; Wu et al. 2025, "Reasoning or Memorization?", arXiv:2507.10532.)

For each prompt and each fraction f (default 40 / 60 / 80 %), the first round(f * L) of its L whitespace-separated words
are kept (the original text up to the end of the last kept word), the model greedily continues that prefix, and the
continuation is compared with the true remainder:

- ROUGE-L F1 (Lin 2004): LCS of the word sequences, P = LCS / |continuation|, R = LCS / |remainder|,
  F1 = 2PR / (P + R); the continuation is first cut to the remainder's length in words, since a model that recites the
  question usually goes on to answer it;
- exact match: that cut continuation equals the remainder word for word;
- answer contained: the full continuation contains the reference answer (as a standalone token, or as its extracted
  final answer).

Generation is a callable ``generate(prefixes: list[str]) -> list[str]`` (one batched call per fraction), so the probe
runs against any model, or a stub in tests. The LCS uses the bit-parallel algorithm of Allison & Dix (1986) /
Hyyrö (2004): one big-integer add, subtract and mask per word of the second sequence, O(m n / 64) machine work.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from rlvr_fast.rewards.equivalence import is_equivalent
from rlvr_fast.rewards.extract import extract_answer

__all__ = ["ContaminationReport", "FractionSummary", "ProbeSample", "contamination_probe", "lcs_length", "rouge_l"]

_WORD = re.compile(r"\S+")


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token sequences (bit-parallel)."""
    if len(a) < len(b):
        a, b = b, a  # the bit vector runs along the longer sequence: fewer big-int steps
    m = len(a)
    if m == 0 or not b:
        return 0
    positions: dict[str, int] = {}
    for i, tok in enumerate(a):
        positions[tok] = positions.get(tok, 0) | (1 << i)
    mask = (1 << m) - 1
    v = mask  # zero bits of v mark the LCS matches found so far
    for tok in b:
        u = v & positions.get(tok, 0)
        v = ((v + u) | (v - u)) & mask
    return m - v.bit_count()


@dataclass(frozen=True)
class RougeL:
    precision: float
    recall: float
    f1: float


def rouge_l(candidate: Sequence[str], reference: Sequence[str]) -> RougeL:
    """ROUGE-L of token sequences (F1 with beta = 1); zeros when either side is empty."""
    lcs = lcs_length(candidate, reference)
    if lcs == 0:
        return RougeL(0.0, 0.0, 0.0)
    p, r = lcs / len(candidate), lcs / len(reference)
    return RougeL(p, r, 2 * p * r / (p + r))


@dataclass(frozen=True)
class ProbeSample:
    index: int
    fraction: float
    prefix: str
    remainder: str
    continuation: str
    rouge_l: float
    exact_match: bool
    answer_contained: bool | None  # None when no answer was given for this prompt


@dataclass(frozen=True)
class FractionSummary:
    fraction: float
    prompts: int
    rouge_l: float
    exact_match: float
    answer_contained: float | None


@dataclass
class ContaminationReport:
    """Per-fraction means and every probed sample. Prompts shorter than two words cannot be split and are listed in
    ``skipped``."""

    summary: dict[float, FractionSummary]
    samples: list[ProbeSample] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)


def _contains_answer(continuation: str, answer: str) -> bool:
    ans = answer.strip()
    if not ans:
        return False
    if re.search(r"(?<![\w.])" + re.escape(ans) + r"(?![\w])", continuation):
        return True
    return is_equivalent(extract_answer(continuation), ans)


def _split(prompt: str, fraction: float) -> tuple[str, str, int] | None:
    words = list(_WORD.finditer(prompt))
    if len(words) < 2:
        return None
    keep = min(max(round(fraction * len(words)), 1), len(words) - 1)
    return prompt[: words[keep - 1].end()], prompt[words[keep].start() :], len(words) - keep


def contamination_probe(
    prompts: Sequence[str],
    generate: Callable[[list[str]], Sequence[str]],
    answers: Sequence[str] | None = None,
    *,
    fractions: Sequence[float] = (0.4, 0.6, 0.8),
) -> ContaminationReport:
    """Run the partial-prompt probe (see the module docstring).

    Args:
        prompts: the benchmark questions (raw text, without a chat template).
        generate: greedy continuation of a batch of prefixes: ``list[str] -> list[str]`` (same length).
        answers: reference answers, for "answer contained" (optional).
        fractions: prefix fractions, each in (0, 1).
    """
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise TypeError(f"contamination_probe: prompts must be a list of str, got {type(prompts).__name__}")
    if not callable(generate):
        raise TypeError(f"contamination_probe: generate must be callable, got {type(generate).__name__}")
    if answers is not None and len(answers) != len(prompts):
        raise ValueError(
            f"contamination_probe: answers has {len(answers)} entries, prompts {len(prompts)} (expected equal)"
        )
    for f in fractions:
        if not (isinstance(f, (int, float)) and 0.0 < f < 1.0):
            raise ValueError(f"contamination_probe: each fraction must be in (0, 1), got {f!r}")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"contamination_probe: prompts[{i}] must be a str, got {type(p).__name__}")
    skipped = [i for i, p in enumerate(prompts) if _split(p, 0.5) is None]
    skipped_set = set(skipped)
    usable = [i for i in range(len(prompts)) if i not in skipped_set]
    report = ContaminationReport(summary={}, skipped=skipped)
    for f in fractions:
        splits = {i: _split(prompts[i], f) for i in usable}
        prefixes = [splits[i][0] for i in usable]
        outputs = list(generate(prefixes)) if prefixes else []
        if len(outputs) != len(prefixes):
            raise ValueError(
                f"contamination_probe: generate returned {len(outputs)} continuations for {len(prefixes)} prefixes"
            )
        rows = []
        for i, out in zip(usable, outputs):
            if not isinstance(out, str):
                raise TypeError(
                    f"contamination_probe: generate returned a {type(out).__name__} for prompt {i}, expected str"
                )
            prefix, remainder, n_rem = splits[i]
            truth = remainder.split()
            cut = out.split()[:n_rem]
            contained = _contains_answer(out, answers[i]) if answers is not None else None
            rows.append(
                ProbeSample(i, float(f), prefix, remainder, out, rouge_l(cut, truth).f1, cut == truth, contained)
            )
        report.samples.extend(rows)
        k = len(rows)
        report.summary[float(f)] = FractionSummary(
            fraction=float(f),
            prompts=k,
            rouge_l=sum(r.rouge_l for r in rows) / k if k else float("nan"),
            exact_match=sum(r.exact_match for r in rows) / k if k else float("nan"),
            answer_contained=(sum(bool(r.answer_contained) for r in rows) / k if k else float("nan"))
            if answers is not None
            else None,
        )
    return report
