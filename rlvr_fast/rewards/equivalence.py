"""Is a predicted answer equivalent to the reference? (docs/design.md §5, "correct").

Three stages, cheapest first:

1. **Normalised text.** Both strings are normalised (``normalize_answer``: math delimiters, ``\\left``/``\\right``,
   ``\\dfrac``/``\\tfrac``, spacing commands, ``\\text{}`` wrappers, trailing units, thousands separators, ``%``,
   degree signs, a ``\\boxed{}`` wrapper) and compared as strings. Equal non-empty strings are equivalent. Whitespace
   between two digits stays (one space, or one newline between rows): a list or grid is not the number its digits
   spell (``1 6\\n0 0`` is not ``1600``), nor a product for the symbolic stage.
2. **Exact rationals.** Both sides go through our own recursive-descent parser (``parse_number``): numbers (integer,
   decimal, scientific), ``+ - * / ^``, ``\\frac{a}{b}``, ``\\cdot``/``\\times``/``\\div``, brackets. Values are exact
   ``fractions.Fraction``; every intermediate result is capped at ``MAX_BITS`` bits, exponents are checked before they
   are computed, nesting is capped at ``MAX_DEPTH``, so ``10^{10^{10}}`` is rejected in microseconds. Two numbers
   are equivalent when equal exactly or, if either side was written as a decimal / in scientific notation (an
   approximation), when ``|p - r| <= max(abs_tol, rel_tol * |r|)`` (defaults: ``abs_tol=1e-6``, ``rel_tol=0``,
   so ``0.333333`` matches ``1/3`` and ``0.33`` does not; an integer or fraction answer is always compared exactly).
   A side that parses but is too large or undefined (``1/0``) is not equivalent to anything but its own text.
3. **Symbolic.** When a side is outside our numeric grammar (``\\sqrt{2}``, ``x+1``, ``\\pi``, tuples) and math-verify
   is installed, both are parsed by math-verify's LaTeX grammar (ANTLR, through latex2sympy2_extended) and compared by
   ``math_verify.verify``. Only its LaTeX extractor is used, never its expression extractor (which calls sympy's
   ``parse_expr``, i.e. Python ``eval``). Inputs must first pass ``_symbolic_safe``: at most
   ``MAX_SYMBOLIC_CHARS`` characters, a whitelist of characters and LaTeX commands, no factorial, no word (two or more
   letters in a row outside a command: "none" and "neon" are not the product n*o*n*e), short exponents and digit runs.
   Integers in an exponent are at most ``MAX_SYMBOLIC_POWER`` (checked before any symbolic work: ``(x+y)^{999}``
   never reaches sympy). math-verify's own timeout uses ``SIGALRM``: in the main thread, when no other alarm is
   pending and no other ``SIGALRM`` handler is installed, it runs in-process under that timeout
   (``symbolic_timeout`` seconds); on any other thread the pair goes to a worker process
   (``rlvr_fast.rewards.symbolic_worker``) with the same timeout, a memory limit, and a kill if it overruns, so the
   check is bounded in time and memory on any thread.
   Any exception inside the third-party verifier means "not shown equivalent" (False).

Model output never reaches ``eval``, ``exec``, ``sympify`` or ``parse_expr`` as code. One residual, inside the
sanctioned LaTeX parser: latex2sympy2_extended hands each NUMBER token of its ANTLR lexer (digits and a decimal point,
at most 30 digits after ``_symbolic_safe``) to ``sympy.Number``, which goes through ``sympify``, so sympy evaluates
strings such as ``Integer (16 )``. ``_symbolic_safe`` admits no quote, underscore, colon or word, so nothing resembling
Python reaches math-verify at all; ``tests/ops/test_rewards.py`` traps ``eval`` / ``exec`` to check that only such
numeric literals are evaluated. Strings longer than ``MAX_INPUT_CHARS`` are compared as stripped text only.
"""

from __future__ import annotations

import functools
import math
import re
import signal
import threading
import warnings
from fractions import Fraction
from typing import NamedTuple

from rlvr_fast.rewards.extract import extract_boxed
from rlvr_fast.rewards.symbolic_worker import WorkerPool, verify_pair

__all__ = [
    "MAX_BITS",
    "MAX_DEPTH",
    "MAX_EXPR_CHARS",
    "MAX_INPUT_CHARS",
    "MAX_SYMBOLIC_CHARS",
    "Number",
    "is_equivalent",
    "normalize_answer",
    "parse_number",
    "symbolic_available",
]

MAX_INPUT_CHARS = 1000  # longer answers (surely not a number a grader should read): stripped-text comparison only
MAX_EXPR_CHARS = 1000  # longest normalised string given to the numeric parser
MAX_CACHED_CHARS = 256  # answers up to this length have their verdicts cached (bounds the cache's memory)
MAX_LITERAL_DIGITS = 1000  # digits in one number literal
MAX_BITS = 40_000  # numerator / denominator size of any intermediate value (10^10000 has 33,220 bits)
MAX_DEPTH = 64  # nesting of brackets / unary signs / powers (the parser recurses ~5 frames per level)
MAX_SYMBOLIC_CHARS = 200
MAX_SYMBOLIC_POWER = 12  # largest integer in an exponent given to sympy: (x+y+z+w)^{999} would expand for minutes
DEFAULT_WORKER_TIMEOUT_S = 2  # off the main thread with symbolic_timeout=0: the worker's bound still applies


class Number(NamedTuple):
    """An exactly parsed numeric answer: its value and whether it was written as an approximation (decimal point or
    scientific notation), which turns on the numeric tolerance."""

    value: Fraction
    approximate: bool


# ----------------------------------------------------------------------------------------------------------------
# Normalisation
# ----------------------------------------------------------------------------------------------------------------

# Literal substitutions, applied in order (longer spellings first: "\left." before "\left").
_REPLACEMENTS: tuple[tuple[str, str], ...] = (
    ("\\left.", ""),
    ("\\right.", ""),
    ("\\left", ""),
    ("\\right", ""),
    ("\\displaystyle", ""),
    ("\\dfrac", "\\frac"),
    ("\\tfrac", "\\frac"),
    ("\\!", ""),
    ("\\,", ""),
    ("\\;", ""),
    ("\\:", ""),
    ("\\ ", " "),
    ("~", " "),
    ("\\%", ""),
    ("%", ""),
    ("\\$", ""),
    ("$", ""),
    ("{,}", ""),  # LaTeX thousands separator 1{,}000
    ("^{\\circ}", ""),
    ("^\\circ", ""),
    ("\u00b0", ""),
    ("\u2212", "-"),  # unicode minus
    ("\u00d7", "*"),
    ("\u00b7", "*"),
    ("\u00f7", "/"),
    ("\\times", "*"),
    ("\\cdot", "*"),
    ("\\div", "/"),
)
_TEXT_WRAPPER = re.compile(r"\\(?:text|textrm|textbf|textit|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
# "5 apples" -> "5"; a word of two letters or more after a space, so "2x" and "5 x" stay expressions
_TRAILING_UNITS = re.compile(r"^([-+]?[\d.,/ ]*\d\.?)\s+[A-Za-z]{2,}[A-Za-z .]*$")
_THOUSANDS = re.compile(r"(?<![\d.])\d{1,3}(?:,\d{3})+(?![\d,])")
_FRAC_DIGITS = re.compile(r"\\frac(\d)(\d)")  # TeX's \frac12
_VARIABLE_ASSIGNMENT = re.compile(r"^[A-Za-z]\s*=")  # "x = 5" -> "5"
_INNER_SPACE = re.compile(r"(?<=[A-Za-z])\s+(?=[A-Za-z])")  # keeps "\pi r" from becoming "\pir"
_OTHER_SPACE = re.compile(r"(?<![A-Za-z\d])\s+|\s+(?![A-Za-z\d])|(?<=[A-Za-z])\s+(?=\d)|(?<=\d)\s+(?=[A-Za-z])")
# Whitespace between two digits separates numbers ("1 6\n0 0", a grid; "4 6 7", a list): kept, one space or one newline,
# so that "1600" is not the grid "1 6\n0 0" (at the cost of "1 000" no longer reading as 1000).
_DIGIT_SPACE = re.compile(r"(?<=\d)\s+(?=\d)")


def normalize_answer(text: str) -> str:
    """Canonical text of an answer for comparison (see the module docstring). Linear in ``len(text)``."""
    s = text.strip()
    if "\\boxed" in s or "\\fbox" in s:
        s = extract_boxed(s) or s
    for _ in range(2):  # strip math delimiters, possibly nested in one another
        for left, right in (("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
            if s.startswith(left) and s.endswith(right) and len(s) >= len(left) + len(right):
                s = s[len(left) : len(s) - len(right)].strip()
    s = _TEXT_WRAPPER.sub(r" \1 ", s)
    for old, new in _REPLACEMENTS:
        if old in s:
            s = s.replace(old, new)
    s = s.strip()
    if _VARIABLE_ASSIGNMENT.match(s) and s.count("=") == 1:
        s = s.split("=", 1)[1].strip()
    units = _TRAILING_UNITS.match(s)
    if units:
        s = units.group(1).strip()
    s = _THOUSANDS.sub(lambda m: m.group().replace(",", ""), s)
    s = _INNER_SPACE.sub(" ", s)
    s = _DIGIT_SPACE.sub(lambda m: "\n" if "\n" in m.group() else " ", s)
    s = _OTHER_SPACE.sub("", s)
    s = _FRAC_DIGITS.sub(r"\\frac{\1}{\2}", s)
    return s.rstrip(".,")


# ----------------------------------------------------------------------------------------------------------------
# Exact numeric grammar
# ----------------------------------------------------------------------------------------------------------------


class _OutsideGrammar(Exception):
    """Not a numeric expression of our grammar (may still be symbolic: \\sqrt{2}, x + 1)."""


class _Rejected(Exception):
    """A numeric expression we refuse to value: too large, too deep, or undefined (division by zero)."""


_TOKEN = re.compile(
    r"(?P<num>(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)"
    r"|(?P<frac>\\frac)"
    r"|(?P<op>[-+*/^(){}\[\]])"
)
_OPEN_TO_CLOSE = {"(": ")", "{": "}", "[": "]"}
_EXPONENT_LIMIT = MAX_BITS  # |exponent| above this can only be valued for bases 0 and +-1


def _tokenize(s: str) -> list[str]:
    tokens: list[str] = []
    pos = 0
    while pos < len(s):
        m = _TOKEN.match(s, pos)
        if m is None:
            raise _OutsideGrammar(s[pos : pos + 10])
        tokens.append(m.group())
        pos = m.end()
    return tokens


def _check(x: Fraction) -> Fraction:
    if x.numerator.bit_length() > MAX_BITS or x.denominator.bit_length() > MAX_BITS:
        raise _Rejected("value exceeds MAX_BITS")
    return x


def _literal(tok: str) -> tuple[Fraction, bool]:
    mantissa, _, exp = tok.lower().partition("e")
    if sum(c.isdigit() for c in mantissa) > MAX_LITERAL_DIGITS:
        raise _Rejected("literal too long")
    if exp and abs(int(exp)) > 4 * MAX_LITERAL_DIGITS:
        raise _Rejected("scientific exponent too large")
    return _check(Fraction(tok)), ("." in tok or bool(exp))


def _power(base: Fraction, exponent: Fraction) -> Fraction:
    if exponent.denominator != 1:
        raise _OutsideGrammar("non-integer exponent")  # 4^{1/2}: left to the symbolic stage
    e = exponent.numerator
    if base == 0:
        if e < 0:
            raise _Rejected("0 to a negative power")
        return Fraction(1) if e == 0 else Fraction(0)
    if base == 1:
        return base
    if base == -1:
        return Fraction(-1 if e % 2 else 1)
    # Size of the result is |e| * log2(max(|num|, den)) bits: refuse before computing it.
    if (
        abs(e) > _EXPONENT_LIMIT
        or abs(e) * max(abs(base.numerator).bit_length(), base.denominator.bit_length()) > MAX_BITS + 64
    ):
        raise _Rejected("power too large")
    return _check(base**e)


class _Parser:
    """expr := term (('+'|'-') term)* ; term := unary (('*'|'/') unary)* ; unary := ('+'|'-') unary | power ;
    power := atom ('^' unary)? ; atom := NUMBER | '(' expr ')' | '{' expr '}' | '[' expr ']' | \\frac atom atom."""

    def __init__(self, tokens: list[str]):
        self.tokens = tokens
        self.pos = 0
        self.depth = 0
        self.approximate = False

    def peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> str:
        tok = self.peek()
        if tok is None:
            raise _OutsideGrammar("unexpected end")
        self.pos += 1
        return tok

    def enter(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise _Rejected("nesting too deep")

    def parse(self) -> Fraction:
        value = self.expr()
        if self.peek() is not None:
            raise _OutsideGrammar(f"trailing {self.peek()!r}")
        return value

    def expr(self) -> Fraction:
        value = self.term()
        while self.peek() in ("+", "-"):
            op = self.take()
            rhs = self.term()
            value = _check(value + rhs if op == "+" else value - rhs)
        return value

    def term(self) -> Fraction:
        value = self.unary()
        while self.peek() in ("*", "/"):
            op = self.take()
            rhs = self.unary()
            if op == "*":
                value = _check(value * rhs)
            elif rhs == 0:
                raise _Rejected("division by zero")
            else:
                value = _check(value / rhs)
        return value

    def unary(self) -> Fraction:
        if self.peek() in ("+", "-"):
            op = self.take()
            self.enter()
            value = self.unary()
            self.depth -= 1
            return -value if op == "-" else value
        return self.power()

    def power(self) -> Fraction:
        base = self.atom()
        if self.peek() == "^":
            self.take()
            self.enter()
            exponent = self.unary()
            self.depth -= 1
            return _power(base, exponent)
        return base

    def atom(self) -> Fraction:
        tok = self.take()
        if tok in _OPEN_TO_CLOSE:
            self.enter()
            value = self.expr()
            if self.take() != _OPEN_TO_CLOSE[tok]:
                raise _OutsideGrammar("unbalanced bracket")
            self.depth -= 1
            return value
        if tok == "\\frac":
            num = self.atom()
            den = self.atom()
            if den == 0:
                raise _Rejected("division by zero")
            return _check(num / den)
        if tok[0].isdigit() or tok[0] == ".":
            value, approx = _literal(tok)
            self.approximate |= approx
            return value
        raise _OutsideGrammar(f"unexpected {tok!r}")


def _parse_normalized(s: str) -> Number:
    """Raises _OutsideGrammar or _Rejected."""
    if len(s) > MAX_EXPR_CHARS:
        raise _Rejected("expression too long")
    parser = _Parser(_tokenize(s))
    value = parser.parse()
    return Number(value, parser.approximate)


def parse_number(text: str) -> Number | None:
    """The exact value of a numeric answer (``"3/4"``, ``"-\\frac{6}{8}"``, ``"1,250.5"``, ``"2^{10}"``), or None
    when the text is not a number of our grammar, too large, or undefined. Never evaluates code."""
    if not isinstance(text, str):
        raise TypeError(f"parse_number: text must be a str, got {type(text).__name__}")
    if len(text) > MAX_INPUT_CHARS:
        return None
    try:
        return _parse_normalized(normalize_answer(text))
    except (_OutsideGrammar, _Rejected):
        return None


# ----------------------------------------------------------------------------------------------------------------
# Symbolic stage (math-verify, optional)
# ----------------------------------------------------------------------------------------------------------------

_SYMBOLIC_COMMANDS = frozenset(
    [
        "frac",
        "sqrt",
        "pi",
        "cdot",
        "times",
        "div",
        "ln",
        "log",
        "sin",
        "cos",
        "tan",
        "cot",
        "sec",
        "csc",
        "exp",
        "infty",
        "pm",
        "mp",
        "le",
        "ge",
        "leq",
        "geq",
        "neq",
        "lt",
        "gt",
        "cup",
        "cap",
    ]
)
_SYMBOLIC_CHARS = re.compile(r"^[0-9A-Za-z\\{}()\[\]+\-*/^.,=<>| ]*$")
_COMMAND = re.compile(r"\\([A-Za-z]+)")
_EXPONENT = re.compile(r"\^(\{[^{}]*\}|[^{])")
# Text that juxtaposition would misread as a product: numbers side by side ("1 6 0 0", a list or grid row: 0), a
# letter before a digit or a zero before a letter ("4a0", "f3", "0b": hexadecimal, where 4*a*0 = 0 = 0*b and
# 3*f = f*3). No math answer is written so.
_NOT_A_PRODUCT = re.compile(r"\d\s+\d|[A-Za-z]\d|(?<![\d.])0+[A-Za-z]")


def _symbolic_safe(s: str) -> bool:
    """Bounded input for sympy: short, whitelisted characters and commands, no words, small exponents and digits, and
    nothing juxtaposition would misread as a product (``_NOT_A_PRODUCT``)."""
    if not s or len(s) > MAX_SYMBOLIC_CHARS or _SYMBOLIC_CHARS.match(s) is None:
        return False
    if any(name not in _SYMBOLIC_COMMANDS for name in _COMMAND.findall(s)):
        return False
    if re.search(r"[A-Za-z]{2,}", _COMMAND.sub(" ", s)):  # a word, not a product of variables
        return False
    if _NOT_A_PRODUCT.search(_COMMAND.sub("@", s)):  # "3\sqrt2": the command stands between 3 and 2
        return False
    if re.search(r"\d{31,}", s) or s.count("^") > 4:
        return False
    exponents = _EXPONENT.findall(s)
    if len(exponents) != s.count("^"):
        return False  # a "^" we could not read: "^{" with nested braces, "^" at the end
    return all(len(e) <= 8 and all(int(d) <= MAX_SYMBOLIC_POWER for d in re.findall(r"\d+", e)) for e in exponents)


@functools.lru_cache(maxsize=1)
def _math_verify():
    try:
        import math_verify
    except ImportError:
        return None
    return math_verify


def symbolic_available() -> bool:
    """True when math-verify is installed (the symbolic stage of ``is_equivalent`` is then active)."""
    return _math_verify() is not None


def _alarm_timeout_usable() -> bool:
    """math-verify's timeout arms SIGALRM and then cancels any alarm: only safe when nobody else uses it."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGALRM"):
        return False
    return signal.getsignal(signal.SIGALRM) in (signal.SIG_DFL, None) and signal.getitimer(signal.ITIMER_REAL) == (
        0.0,
        0.0,
    )


@functools.cache
def _warn_no_math_verify() -> None:
    """Once per process: without math-verify every answer outside the numeric grammar is graded incorrect, which
    would otherwise look like a model that never gets ``\\sqrt{2}`` or ``x+1`` right."""
    warnings.warn(
        "math-verify is not installed: symbolic answer checks (answers outside the numeric grammar, e.g. "
        "\\sqrt{2}, x+1, \\pi, tuples) count as incorrect; pip install 'rlvr_fast[rewards]' to grade them",
        RuntimeWarning,
        stacklevel=5,  # past this, _symbolic_equal, _equivalent and is_equivalent: the code that asked for the check
    )


def _symbolic_equal(pred: str, ref: str, timeout: int) -> bool:
    if not (_symbolic_safe(pred) and _symbolic_safe(ref)):
        return False
    if _math_verify() is None:
        _warn_no_math_verify()
        return False
    if _alarm_timeout_usable():  # the fast path: in-process, bounded by math-verify's SIGALRM timeout
        return verify_pair(pred, ref, timeout if timeout > 0 else None)
    # Off the main thread (or with SIGALRM taken) nothing can interrupt sympy in this process: a worker process
    # answers under its own alarm and a memory limit, and is killed if it overruns.
    return _workers().verify(pred, ref, timeout if timeout > 0 else DEFAULT_WORKER_TIMEOUT_S)


@functools.lru_cache(maxsize=1)
def _workers() -> WorkerPool:
    return WorkerPool()


# ----------------------------------------------------------------------------------------------------------------
# Public comparison
# ----------------------------------------------------------------------------------------------------------------


def _numbers_equal(p: Number, r: Number, abs_tol: float, rel_tol: float) -> bool:
    if p.value == r.value:
        return True
    if not (p.approximate or r.approximate):
        return False
    tol = max(Fraction(abs_tol), Fraction(rel_tol) * abs(r.value))
    return abs(p.value - r.value) <= tol


def _classify(s: str) -> tuple[Number | None, bool]:
    """(number or None, rejected)."""
    try:
        return _parse_normalized(s), False
    except _OutsideGrammar:
        return None, False
    except _Rejected:
        return None, True


def _equivalent(pred: str, ref: str, abs_tol: float, rel_tol: float, symbolic: bool, timeout: int) -> bool:
    p, r = normalize_answer(pred), normalize_answer(ref)
    if not p or not r:
        return False
    if p == r:
        return True
    pn, p_rejected = _classify(p)
    rn, r_rejected = _classify(r)
    if pn is not None and rn is not None:
        return _numbers_equal(pn, rn, abs_tol, rel_tol)
    if p_rejected or r_rejected or not symbolic:
        return False
    return _symbolic_equal(p, r, timeout)


_equivalent_cached = functools.lru_cache(maxsize=16384)(_equivalent)


def _check_tolerance(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"is_equivalent: {name} must be a finite number >= 0, got {value!r}")
    return float(value)


def is_equivalent(
    pred: str | None,
    ref: str,
    *,
    abs_tol: float = 1e-6,
    rel_tol: float = 0.0,
    symbolic: bool = True,
    symbolic_timeout: int = 2,
) -> bool:
    """Whether the predicted answer ``pred`` is equivalent to the reference ``ref`` (see the module docstring).

    Args:
        pred: the extracted answer (``extract_answer``'s output), untrusted; None (no answer) is never equivalent.
        ref: the reference answer.
        abs_tol, rel_tol: tolerance for answers written as decimals: ``|p - r| <= max(abs_tol, rel_tol * |r|)``.
        symbolic: use math-verify for expressions outside the numeric grammar (when installed).
        symbolic_timeout: whole seconds for math-verify's SIGALRM timeout: in-process on the main thread when no
            other alarm is set (0 disables it there), in a worker process killed after it plus a grace period on any
            other thread (0 means DEFAULT_WORKER_TIMEOUT_S there).

    Returns:
        bool. Never raises on the content of ``pred`` / ``ref``; results are cached (LRU) per argument tuple.

    Raises:
        TypeError: ``pred`` is not a str or None, or ``ref`` is not a str.
        ValueError: a tolerance is negative or not finite.
    """
    if pred is not None and not isinstance(pred, str):
        raise TypeError(f"is_equivalent: pred must be a str or None, got {type(pred).__name__}")
    if not isinstance(ref, str):
        raise TypeError(f"is_equivalent: ref must be a str, got {type(ref).__name__}")
    abs_tol = _check_tolerance("abs_tol", abs_tol)
    rel_tol = _check_tolerance("rel_tol", rel_tol)
    if pred is None:
        return False
    if len(pred) > MAX_INPUT_CHARS or len(ref) > MAX_INPUT_CHARS:
        p, r = pred.strip(), ref.strip()
        return bool(p) and p == r
    compare = _equivalent_cached if max(len(pred), len(ref)) <= MAX_CACHED_CHARS else _equivalent
    return compare(pred, ref, abs_tol, rel_tol, bool(symbolic), int(symbolic_timeout))
