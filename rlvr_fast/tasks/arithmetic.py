"""Seeded, contamination-free arithmetic problems in the style of RandomCalculation (Wu et al. 2025, "Reasoning or
Memorization?", arXiv:2507.10532; docs/design.md §8).

An expression of k steps is a random binary tree with k operations (``+ - * /``) whose leaves are integers in
``[operand_min, operand_max]`` (0-100 by default) and values derived from them: proper fractions ``(a/b)``, squares
``n^2`` and cubes ``n^3``. Answers are exact ``fractions.Fraction`` values computed while the tree is built; a divisor
is never zero, and any node whose value outgrows ``max_digits`` (numerator or denominator) is drawn again, so answers
stay checkable by hand. Text is bracketed so that the usual reading (precedence, then left to right) computes exactly
the tree's intermediate values, which are the ones kept within bounds: a left operand is bracketed when it binds more
loosely than its operation (``(a + b) * c``), a right operand when it does not bind more tightly (``a + (b + c)``, ``a -
(b - c)``, ``a * (b / c)``); ``a + b * c`` needs none.

Problems are generated fresh from a seed, so no model can have seen them in pretraining; difficulty is set by the
number of steps, the operand range, the operations and the leaf kinds. ``PRESETS`` holds named settings, from ``tiny``
(one addition of small integers: a 135M instruct model such as SmolLM2-135M-Instruct solves a fair share) to
``random_calculation`` (1-20 steps over everything).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from fractions import Fraction

__all__ = [
    "OPERATIONS",
    "PRESETS",
    "ArithmeticConfig",
    "Expression",
    "expression_space_size",
    "format_answer",
    "get_preset",
    "sample_expression",
]


@dataclass(frozen=True)
class Operation:
    symbol: str
    precedence: int
    apply: Callable[[Fraction, Fraction], Fraction]


OPERATIONS: dict[str, Operation] = {
    "+": Operation("+", 1, lambda a, b: a + b),
    "-": Operation("-", 1, lambda a, b: a - b),
    "*": Operation("*", 2, lambda a, b: a * b),
    "/": Operation("/", 2, lambda a, b: a / b),
}
_ATOM = 3  # precedence of a leaf: never bracketed


@dataclass(frozen=True)
class ArithmeticConfig:
    """Difficulty knobs of the generator (all validated by ``check``)."""

    min_steps: int = 1
    max_steps: int = 20
    operand_min: int = 0
    operand_max: int = 100
    ops: tuple[str, ...] = ("+", "-", "*", "/")
    leaf_weights: Mapping[str, float] = field(
        default_factory=lambda: {"int": 0.7, "fraction": 0.1, "square": 0.1, "cube": 0.1}
    )
    max_denominator: int = 12  # fraction leaves a/b with 2 <= b <= max_denominator, 1 <= a < b
    max_square_base: int = 30
    max_cube_base: int = 10
    max_digits: int = 12  # every intermediate numerator and denominator stays below 10**max_digits
    nonnegative: bool = False  # every intermediate value >= 0 (easier for small models)
    integer_values: bool = False  # every intermediate value an integer (no fractions appear at all)
    mul_symbol: str = "*"
    div_symbol: str = "/"

    def check(self) -> ArithmeticConfig:
        if not (
            isinstance(self.min_steps, int)
            and isinstance(self.max_steps, int)
            and 1 <= self.min_steps <= self.max_steps
        ):
            raise ValueError(
                f"ArithmeticConfig: need 1 <= min_steps <= max_steps, got {self.min_steps}, {self.max_steps}"
            )
        if not (0 <= self.operand_min <= self.operand_max):
            raise ValueError(
                f"ArithmeticConfig: need 0 <= operand_min <= operand_max, got {self.operand_min}, {self.operand_max}"
            )
        unknown = [op for op in self.ops if op not in OPERATIONS]
        if not self.ops or unknown:
            raise ValueError(
                f"ArithmeticConfig: ops must be a non-empty subset of {sorted(OPERATIONS)}, got {self.ops!r}"
            )
        bad = [k for k in self.leaf_weights if k not in LEAF_KINDS]
        if bad or not any(w > 0 for w in self.leaf_weights.values()) or any(w < 0 for w in self.leaf_weights.values()):
            raise ValueError(
                f"ArithmeticConfig: leaf_weights must map kinds from {sorted(LEAF_KINDS)} to weights >= 0 (one > 0), "
                f"got {dict(self.leaf_weights)!r}"
            )
        if self.leaf_weights.get("fraction", 0) > 0 and (self.max_denominator < 2 or self.integer_values):
            raise ValueError("ArithmeticConfig: fraction leaves need max_denominator >= 2 and integer_values=False")
        if self.max_digits < 1:
            raise ValueError(f"ArithmeticConfig: max_digits must be >= 1, got {self.max_digits}")
        return self


# ----------------------------------------------------------------------------------------------------------------
# Leaves: (value, text) from a generator of random numbers
# ----------------------------------------------------------------------------------------------------------------


def _int_leaf(rng: random.Random, cfg: ArithmeticConfig) -> tuple[Fraction, str]:
    n = rng.randint(cfg.operand_min, cfg.operand_max)
    return Fraction(n), str(n)


def _fraction_leaf(rng: random.Random, cfg: ArithmeticConfig) -> tuple[Fraction, str]:
    b = rng.randint(2, cfg.max_denominator)
    a = rng.randint(1, b - 1)
    return Fraction(a, b), f"({a}/{b})"


def _power_leaf(exponent: int, max_base_attr: str) -> Callable[[random.Random, ArithmeticConfig], tuple[Fraction, str]]:
    def leaf(rng: random.Random, cfg: ArithmeticConfig) -> tuple[Fraction, str]:
        top = max(cfg.operand_min, min(cfg.operand_max, getattr(cfg, max_base_attr)))
        n = rng.randint(cfg.operand_min, top)
        return Fraction(n**exponent), f"{n}^{exponent}"

    return leaf


LEAF_KINDS: dict[str, Callable[[random.Random, ArithmeticConfig], tuple[Fraction, str]]] = {
    "int": _int_leaf,
    "fraction": _fraction_leaf,
    "square": _power_leaf(2, "max_square_base"),
    "cube": _power_leaf(3, "max_cube_base"),
}


# ----------------------------------------------------------------------------------------------------------------
# Trees
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Expression:
    """A node: a leaf (op None) or an operation on two sub-expressions; ``value`` is exact, ``text`` fully rendered."""

    value: Fraction
    text: str
    precedence: int
    steps: int
    op: str | None = None
    left: Expression | None = None
    right: Expression | None = None


class _Retry(Exception):
    pass


_NODE_ATTEMPTS = 50


def _fits(x: Fraction, cfg: ArithmeticConfig) -> bool:
    limit = 10**cfg.max_digits
    if abs(x.numerator) >= limit or x.denominator >= limit:
        return False
    if cfg.nonnegative and x < 0:
        return False
    return not (cfg.integer_values and x.denominator != 1)


def _render(op: Operation, left: Expression, right: Expression, cfg: ArithmeticConfig) -> str:
    lt = f"({left.text})" if left.precedence < op.precedence else left.text
    rt = f"({right.text})" if right.precedence <= op.precedence else right.text
    symbol = {"*": cfg.mul_symbol, "/": cfg.div_symbol}.get(op.symbol, op.symbol)
    return f"{lt} {symbol} {rt}"


def _leaf(rng: random.Random, cfg: ArithmeticConfig) -> Expression:
    kinds = [k for k, w in cfg.leaf_weights.items() if w > 0]
    kind = rng.choices(kinds, weights=[cfg.leaf_weights[k] for k in kinds])[0]
    value, text = LEAF_KINDS[kind](rng, cfg)
    return Expression(value, text, _ATOM, 0)


def _build(rng: random.Random, cfg: ArithmeticConfig, steps: int) -> Expression:
    if steps == 0:
        return _leaf(rng, cfg)
    for _ in range(_NODE_ATTEMPTS):
        left_steps = rng.randint(0, steps - 1)
        left = _build(rng, cfg, left_steps)
        right = _build(rng, cfg, steps - 1 - left_steps)
        # Try the allowed operations in random order: when "*" overflows, "+" on the same operands usually fits.
        for symbol in rng.sample(cfg.ops, len(cfg.ops)):
            op = OPERATIONS[symbol]
            if symbol == "/" and right.value == 0:
                continue  # never divide by zero
            value = op.apply(left.value, right.value)
            if _fits(value, cfg):
                return Expression(value, _render(op, left, right, cfg), op.precedence, steps, symbol, left, right)
    raise _Retry


def sample_expression(
    rng: random.Random, cfg: ArithmeticConfig, steps: int | None = None, attempts: int = 200
) -> Expression:
    """One expression of ``steps`` operations (default: uniform in [min_steps, max_steps]) drawn from ``rng``."""
    cfg.check()
    k = rng.randint(cfg.min_steps, cfg.max_steps) if steps is None else steps
    for _ in range(attempts):
        try:
            return _build(rng, cfg, k)
        except _Retry:
            continue
    raise ValueError(
        f"sample_expression: no {k}-step expression satisfied the limits in {attempts} attempts "
        f"(max_digits={cfg.max_digits}, nonnegative={cfg.nonnegative}, "
        f"integer_values={cfg.integer_values}); loosen them"
    )


def _leaf_texts(kind: str, cfg: ArithmeticConfig) -> int:
    """How many distinct texts a leaf of ``kind`` can have under ``cfg``."""
    if kind == "int":
        return cfg.operand_max - cfg.operand_min + 1
    if kind == "fraction":
        return sum(b - 1 for b in range(2, cfg.max_denominator + 1))
    top = max(cfg.operand_min, min(cfg.operand_max, cfg.max_square_base if kind == "square" else cfg.max_cube_base))
    return top - cfg.operand_min + 1


def expression_space_size(cfg: ArithmeticConfig) -> int:
    """An upper bound on the number of distinct expression texts ``cfg`` can produce: over every step count k,
    Catalan(k) tree shapes x ops^k x leaf texts^(k+1). Exact when no limit (max_digits, nonnegative, integer_values)
    rejects a tree; the generator refuses a request above it at once instead of drawing until its budget runs out."""
    cfg.check()
    leaves = sum(_leaf_texts(kind, cfg) for kind, w in cfg.leaf_weights.items() if w > 0)
    shapes = {k: math.comb(2 * k, k) // (k + 1) for k in range(cfg.min_steps, cfg.max_steps + 1)}  # Catalan numbers
    return sum(count * len(cfg.ops) ** k * leaves ** (k + 1) for k, count in shapes.items())


def format_answer(x: Fraction) -> str:
    """Canonical answer text: ``"-7"``, ``"3/4"``, ``"-5/2"`` (reduced, sign on the numerator)."""
    return str(x.numerator) if x.denominator == 1 else f"{x.numerator}/{x.denominator}"


PRESETS: dict[str, ArithmeticConfig] = {
    # one addition of two small integers: the floor for a 135M instruct model
    "tiny": ArithmeticConfig(
        min_steps=1, max_steps=1, operand_min=0, operand_max=10, ops=("+",), leaf_weights={"int": 1.0}
    ),
    # 1-2 additions / subtractions of integers up to 20, never negative: SmolLM2-135M-Instruct succeeds sometimes
    "easy": ArithmeticConfig(
        min_steps=1,
        max_steps=2,
        operand_min=0,
        operand_max=20,
        ops=("+", "-"),
        leaf_weights={"int": 1.0},
        nonnegative=True,
    ),
    # up to 4 steps, all operations, integers to 100 with some fractions
    "medium": ArithmeticConfig(
        min_steps=1, max_steps=4, ops=("+", "-", "*", "/"), leaf_weights={"int": 0.85, "fraction": 0.15}, max_digits=8
    ),
    # Wu et al.'s RandomCalculation range: 1-20 steps over integers 0-100, fractions, squares and cubes
    "random_calculation": ArithmeticConfig(),
}


def get_preset(name: str, **overrides) -> ArithmeticConfig:
    """A named preset, optionally with fields replaced: ``get_preset("easy", operand_max=50)``."""
    if name not in PRESETS:
        raise ValueError(f"get_preset: unknown preset {name!r}; known presets: {sorted(PRESETS)}")
    return replace(PRESETS[name], **overrides).check()
