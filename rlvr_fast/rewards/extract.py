"""Final-answer extraction from a model completion (docs/design.md §5, "correct").

Order of precedence, first hit wins:

1. the last non-empty ``\\boxed{...}`` (or ``\\fbox{...}``), braces matched so nested groups such as
   ``\\boxed{\\frac{1}{2}}`` come back whole; "last" means the box that opens last, as in the MATH grader's
   ``last_boxed_only_string``;
2. the content of the last ``<answer>...</answer>`` block (the RLCR output format, Damani et al. 2025);
3. the last "Answer:" / "Final answer:" / "The answer is:" line (the text after the colon, or the next line when the
   colon ends its line); in 2 and 3 a phrase with words is reduced to its last number, unless it is a comma list of
   single tokens (``100, Full, floats, taking``), an answer in itself;
4. the last number in the text: integers, decimals, negatives, thousands separators (``1,234``), ``a/b`` and LaTeX
   ``\\frac{a}{b}`` / ``\\dfrac{a}{b}`` (it holds the text's last digit, so only the ``LAST_NUMBER_WINDOW``
   characters before that digit are scanned).

``<confidence>...</confidence>`` blocks are removed before steps 2-4 so that the stated confidence of the Brier format
is never taken for the answer.

Model output is untrusted: every step is a linear scan (``str.find`` / ``str.rfind`` and regular expressions without
nested quantifiers), so megabyte strings, thousands of unbalanced braces and lone surrogates are handled in bounded
time and never raise. The returned string is the raw answer text, stripped of surrounding whitespace, ``$`` signs,
markdown bold and a trailing full stop; normalisation for comparison lives in ``equivalence.py``.
"""

from __future__ import annotations

import re

__all__ = ["extract_answer", "extract_boxed", "has_nonempty_boxed", "last_tag_content", "strip_tag_blocks"]

LAST_NUMBER_WINDOW = 4096  # characters before the last digit searched for the last number

_BOX_OPEN_OR_BRACE = re.compile(r"\\(?:boxed|fbox)\s*\{|[{}]")

# Steps 3-4. The sign of a number is taken only when the minus is not a binary minus (not after a digit, letter,
# closing bracket or another operand), so "10-3" ends with the number 3, not -3. U+2212 (the typographic minus) is a
# minus too: without it "the answer is −3" would read as 3.
_SIGN = r"(?:(?<![\w)\]}.])[-\u2212]\s?)?"
_LAST_NUMBER = re.compile(
    _SIGN
    + r"(?:\\[dt]?frac\{\s*-?\d+\s*\}\{\s*-?\d+\s*\}"  # \frac{3}{4}, \dfrac{-3}{4}
    + r"|(?<![\d.])\d{1,3}(?:,\d{3})+(?![\d])(?:\.\d+)?"  # 1,234,567.89
    + r"|\d+(?:\.\d+)?(?:/\d+)?"  # 42, 3.5, 3/4
    + r"|\.\d+)"  # .5
)
# One character class between "answer" and the colon: nested quantifiers here would backtrack quadratically.
_ANSWER_LINE = re.compile(r"(?i)(?<![a-z])(?:final\s+)?answer(?:\s+is)?[\s*]*[:\uff1a]")
_WORD = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{3,}")  # a word, not a LaTeX command name (\sqrt): prose, not math


def _box_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of the content of every closed ``\\boxed{`` / ``\\fbox{``, in order of their opening.

    One pass over the braces after the first box: a stack of open braces, each remembering whether it opened a box.
    Stray closing braces are ignored; a box still open at the end of the text is not an answer.
    """
    first = text.find("\\boxed")
    first_fbox = text.find("\\fbox")
    starts = [p for p in (first, first_fbox) if p >= 0]
    if not starts:
        return []
    stack: list[tuple[bool, int]] = []
    spans: list[tuple[int, int]] = []
    for m in _BOX_OPEN_OR_BRACE.finditer(text, min(starts)):
        tok = m.group()
        if tok == "}":
            if stack:
                is_box, content_start = stack.pop()
                if is_box:
                    spans.append((content_start, m.start()))
        else:
            stack.append((tok != "{", m.end()))
    spans.sort()
    return spans


def extract_boxed(text: str) -> str | None:
    """Content of the last non-empty ``\\boxed{...}``, stripped, or None."""
    for start, end in reversed(_box_spans(text)):
        content = text[start:end].strip()
        if content:
            return content
    return None


def has_nonempty_boxed(text: str) -> bool:
    """True when the text holds at least one closed ``\\boxed{}`` with non-blank content (the "format" reward)."""
    return extract_boxed(text) is not None


def strip_tag_blocks(text: str, tag: str) -> str:
    """Remove every ``<tag>...</tag>`` block; an unclosed ``<tag>`` removes the rest of the text.

    Written with ``str.find`` rather than a lazy regex, which is quadratic on many unclosed tags.
    """
    open_tag, close_tag = f"<{tag}>", f"</{tag}>"
    pieces: list[str] = []
    pos = 0
    while True:
        start = text.find(open_tag, pos)
        if start < 0:
            pieces.append(text[pos:])
            break
        pieces.append(text[pos:start])
        end = text.find(close_tag, start + len(open_tag))
        if end < 0:
            break
        pos = end + len(close_tag)
    return "".join(pieces)


def last_tag_content(text: str, tag: str) -> str | None:
    """Content of the last closed ``<tag>...</tag>`` block, or None (two ``rfind`` calls: linear)."""
    close = text.rfind(f"</{tag}>")
    if close < 0:
        return None
    open_ = text.rfind(f"<{tag}>", 0, close)
    if open_ < 0:
        return None
    return text[open_ + len(tag) + 2 : close]


def _clean(s: str) -> str:
    """Strip markdown bold, inline-math markers and a sentence's full stop (linear: no strip-until-stable loop)."""
    s = s.lstrip(" \t\r*$").rstrip(" \t\r*$.")
    if s.startswith("\\(") and s.endswith("\\)"):
        s = s[2:-2].strip()
    return s


def _is_token_list(s: str) -> bool:
    """A comma list of single tokens ("100, Full, floats, taking", "2, 3, 5"): an answer in itself (a sorted word
    list, a sequence), not prose around a number."""
    parts = s.split(",")
    return len(parts) > 1 and all(p.strip() and len(p.split()) == 1 for p in parts)


def _answer_from_phrase(s: str) -> str | None:
    """An answer line or an <answer> block: keep it whole when it reads as math, else take its last number."""
    s = _clean(s)
    if not s:
        return None
    if "=" in s:  # "x = 5" -> "5"
        s = _clean(s.rsplit("=", 1)[1]) or s
    if _WORD.search(s) is None or _is_token_list(s):
        return s
    last = _last_number(s)
    return last if last is not None else s


def _last_number(text: str) -> str | None:
    # The last number holds the text's last digit (every digit belongs to some match), so only a window before that
    # digit is scanned: a few C-level rfind calls instead of running the pattern over a megabyte of prose. A number
    # longer than the window comes back truncated, i.e. still thousands of characters long: never a short answer.
    p = max(text.rfind(d) for d in "0123456789")
    if p < 0:
        return None
    last = None
    for match in _LAST_NUMBER.finditer(text, max(0, p - LAST_NUMBER_WINDOW), min(len(text), p + 256)):
        last = match
    if last is None:
        return None
    return re.sub(r"\s+", "", last.group())


def _answer_line(text: str) -> str | None:
    last = None
    for match in _ANSWER_LINE.finditer(text):
        last = match
    if last is None:
        return None
    rest = text[last.end() :]
    line, _, after = rest.partition("\n")
    if not _clean(line):  # "Answer:\n42": the answer is on the next non-blank line
        for nxt in after.split("\n", 8)[:8]:
            if _clean(nxt):
                line = nxt
                break
    return _answer_from_phrase(line)


def extract_answer(text: str) -> str | None:
    """The completion's final answer as a string, or None when it has none (see the module docstring for the rules).

    Args:
        text: the completion (a ``str``; any content, including malformed LaTeX or megabyte strings).

    Returns:
        The answer text, stripped, or None.

    Raises:
        TypeError: ``text`` is not a ``str`` (a caller error; the content itself never makes it raise).
    """
    if not isinstance(text, str):
        raise TypeError(f"extract_answer: text must be a str, got {type(text).__name__}")
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed
    body = strip_tag_blocks(text, "confidence")
    tagged = last_tag_content(body, "answer")
    if tagged is not None:
        found = _answer_from_phrase(tagged)
        if found is not None:
            return found
    line = _answer_line(body)
    if line is not None:
        return line
    return _last_number(body)
