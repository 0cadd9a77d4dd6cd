"""Train / eval splits of generated arithmetic problems that never share an expression.

The eval split is drawn first, from its own seeded stream; the train split is drawn from another stream and skips every
expression text already in eval (and repeats within itself). Streams are ``random.Random`` seeded with a string of
(seed, split name), which Python hashes with SHA-512: the same items come back in every process and on every platform.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from typing import Any

from rlvr_fast.tasks.arithmetic import (
    ArithmeticConfig,
    expression_space_size,
    format_answer,
    get_preset,
    sample_expression,
)
from rlvr_fast.tasks.prompts import render_prompt

__all__ = ["generate_problems", "make_splits"]


def _rng(seed: int, split: str) -> random.Random:
    return random.Random(f"rlvr_fast.tasks.arithmetic:{seed}:{split}")


def _config(config: ArithmeticConfig | str) -> ArithmeticConfig:
    return get_preset(config) if isinstance(config, str) else config.check()


def generate_problems(
    config: ArithmeticConfig | str,
    n: int,
    *,
    seed: int = 0,
    split: str = "train",
    template: str = "boxed",
    exclude: Iterable[str] = (),
    max_draws: int | None = None,
) -> list[dict[str, Any]]:
    """``n`` distinct problems as records ``{"id", "prompt", "answer", "expression", "steps", "incorrect_answer",
    "split"}``.

    ``incorrect_answer`` is the true answer plus a nonzero integer offset in [-10, 10] (drawn from the same stream): the
    wrong label for the ``incorrect_label`` reward mode. Expressions in ``exclude`` are skipped.

    Raises:
        ValueError: the configuration has fewer distinct expressions than ``n`` plus those excluded (refused before
            drawing: ``arithmetic.expression_space_size``), or fewer than ``n`` were found in ``max_draws`` draws
            (default ``20 n + 1000``): the configuration's limits leave too few for the request.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"generate_problems: n must be an int >= 0, got {n!r}")
    cfg = _config(config)
    seen = set(exclude)
    room = expression_space_size(cfg)
    if n + len(seen) > room:
        excluded = f" besides the {len(seen)} excluded" if seen else ""
        raise ValueError(
            f"generate_problems: the configuration has at most {room} distinct expressions, fewer than the {n} "
            f"requested{excluded}; widen the configuration (more steps, a larger operand range, more operations)"
        )
    rng = _rng(seed, split)
    out: list[dict[str, Any]] = []
    budget = 20 * n + 1000 if max_draws is None else max_draws
    for _ in range(budget):
        if len(out) == n:
            break
        expr = sample_expression(rng, cfg)
        offset = rng.choice([d for d in range(-10, 11) if d != 0])
        if expr.text in seen:
            continue
        seen.add(expr.text)
        out.append(
            {
                "id": f"{split}-{seed}-{len(out)}",
                "prompt": render_prompt(expr.text, template),
                "answer": format_answer(expr.value),
                "expression": expr.text,
                "steps": expr.steps,
                "incorrect_answer": format_answer(expr.value + offset),
                "split": split,
            }
        )
    if len(out) < n:
        raise ValueError(
            f"generate_problems: found only {len(out)} distinct expressions of the {n} requested in {budget} draws; "
            "widen the configuration (more steps, a larger operand range, more operations)"
        )
    return out


def make_splits(
    config: ArithmeticConfig | str, n_train: int, n_eval: int, *, seed: int = 0, template: str = "boxed"
) -> dict[str, list[dict[str, Any]]]:
    """``{"train": [...], "eval": [...]}`` with no expression in both (see the module docstring)."""
    eval_items = generate_problems(config, n_eval, seed=seed, split="eval", template=template)
    train_items = generate_problems(
        config, n_train, seed=seed, split="train", template=template, exclude={r["expression"] for r in eval_items}
    )
    return {"train": train_items, "eval": eval_items}
