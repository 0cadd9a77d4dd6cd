"""Format frequency: how often completions use each user-named format, and how accurate each format is
(docs/design.md §7).

Shao et al. 2025 (arXiv:2506.10947) track the share of "code reasoning" (the model writes Python without running it)
as spurious rewards shift Qwen2.5-Math towards it; Zhao et al. 2025 (arXiv:2504.07912) show RL collapsing onto one
pretraining format within an epoch, and report each format's own accuracy. A class is a regular expression searched
anywhere in the completion (``re.search``); a completion can belong to several classes, so the frequencies need not sum
to one. ``unmatched`` counts the completions no class matched.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["DEFAULT_FORMAT_CLASSES", "UNMATCHED", "FormatStats", "format_frequency"]

UNMATCHED = "unmatched"

# Examples; pass your own mapping. Patterns are linear-time (no quantifier that can span the lines a ``^`` starts) so
# megabyte outputs stay cheap.
DEFAULT_FORMAT_CLASSES: dict[str, str] = {
    "python_code": r"```\s*(?:python|py)\b|^[ \t]*(?:def|import|from)[ \t]+\w|\bprint\(",
    "boxed": r"\\boxed\s*\{",
    "numbered_steps": r"(?im)^[ \t]*(?:step[ \t]*\d+|\d+[.)])\s",
    "confidence_tag": r"<confidence>",
}


@dataclass(frozen=True)
class FormatStats:
    """count and frequency of a class over all completions; accuracy among its members (None without verdicts or
    members)."""

    count: int
    frequency: float
    accuracy: float | None


def _compile(classes: Mapping[str, Any]) -> dict[str, re.Pattern[str]]:
    if not isinstance(classes, Mapping) or not classes:
        raise ValueError("format_frequency: classes must be a non-empty mapping {name: regex}")
    compiled = {}
    for name, pattern in classes.items():
        if not isinstance(name, str) or name == UNMATCHED:
            raise ValueError(f"format_frequency: class names must be strings other than {UNMATCHED!r}, got {name!r}")
        if isinstance(pattern, re.Pattern):
            compiled[name] = pattern
            continue
        if not isinstance(pattern, str):
            raise TypeError(
                f"format_frequency: the pattern of class {name!r} must be a str or re.Pattern, "
                f"got {type(pattern).__name__}"
            )
        try:
            compiled[name] = re.compile(pattern, re.MULTILINE)
        except re.error as exc:
            raise ValueError(f"format_frequency: the pattern of class {name!r} is not a valid regex: {exc}") from exc
    return compiled


def format_frequency(
    completions: Sequence[str],
    classes: Mapping[str, str | re.Pattern[str]] = DEFAULT_FORMAT_CLASSES,
    correct: Sequence[Any] | None = None,
) -> dict[str, FormatStats]:
    """Per class (and ``unmatched``): how many completions match, the fraction, and the accuracy among them.

    Args:
        completions: list of N completions.
        classes: {name: regex}; string patterns are compiled with ``re.MULTILINE``.
        correct: N verdicts (0/1 or bool), optional.
    """
    if isinstance(completions, str) or not isinstance(completions, Sequence):
        raise TypeError(f"format_frequency: completions must be a list of str, got {type(completions).__name__}")
    patterns = _compile(classes)
    n = len(completions)
    if correct is not None:
        correct = [float(v) for v in correct]
        if len(correct) != n:
            raise ValueError(f"format_frequency: correct has {len(correct)} entries, completions {n} (expected equal)")
        if any(v not in (0.0, 1.0) for v in correct):
            raise ValueError("format_frequency: correct must hold only 0/1 (or bool)")
    members: dict[str, list[int]] = {name: [] for name in [*patterns, UNMATCHED]}
    for i, text in enumerate(completions):
        if not isinstance(text, str):
            raise TypeError(f"format_frequency: completions[{i}] must be a str, got {type(text).__name__}")
        hit = False
        for name, pattern in patterns.items():
            if pattern.search(text):
                members[name].append(i)
                hit = True
        if not hit:
            members[UNMATCHED].append(i)
    out = {}
    for name, idx in members.items():
        acc = sum(correct[i] for i in idx) / len(idx) if (correct is not None and idx) else None
        out[name] = FormatStats(len(idx), len(idx) / n if n else 0.0, acc)
    return out
