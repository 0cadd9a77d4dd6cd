"""Prompt templates for the synthetic tasks: ask for the answer in ``\\boxed{}`` and, for the Brier reward (RLCR,
Damani et al. 2025, arXiv:2507.16806), a stated confidence in ``<confidence></confidence>``.

Templates are plain ``str.format`` strings with one field, ``{expression}``; they hold the user message only (the
trainer applies the model's chat template).
"""

from __future__ import annotations

import string

__all__ = ["PROMPT_TEMPLATES", "check_template", "render_prompt"]

PROMPT_TEMPLATES: dict[str, str] = {
    # short on purpose: small instruct models follow short instructions best
    "boxed": "What is {expression}? Put your final answer in \\boxed{{}}.",
    "boxed_exact": (
        "Calculate {expression}. Give the exact result as an integer or a fraction in lowest terms, "
        "and put your final answer in \\boxed{{}}."
    ),
    "boxed_confidence": (
        "Calculate {expression}. Put your final answer in \\boxed{{}}. Then state how confident you are that it is "
        "correct, as a probability between 0 and 1, in the form <confidence>0.7</confidence>."
    ),
}


def check_template(template: str) -> str:
    """The format string of ``template`` (a name in ``PROMPT_TEMPLATES`` or a format string): it must parse, and its
    only replacement field must be ``{expression}``, used at least once (``{0}``, ``{foo}``, ``{expression[0]}`` and an
    unbalanced ``{`` are refused with a ValueError here, not an IndexError / KeyError at the first render)."""
    fmt = PROMPT_TEMPLATES.get(template, template)
    expected = f"prompt template must be one of {sorted(PROMPT_TEMPLATES)} or a format string whose only field is "
    expected += f"'{{expression}}', got {template!r}"
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(fmt) if name is not None]
        others = sorted({name for name in fields if name != "expression"}, key=str)
        if others or not fields:
            found = f"the field(s) {['{' + n + '}' for n in others]}" if others else "no {expression}"
            raise ValueError(f"{expected} ({found})")
        fmt.format(expression="1 + 1")  # a bad conversion (!x) or a field nested in a format spec fails here
    except (ValueError, KeyError, IndexError, AttributeError, TypeError) as exc:
        raise ValueError(exc.args[0] if str(exc).startswith(expected) else f"{expected} ({exc})") from None
    return fmt


def render_prompt(expression: str, template: str = "boxed") -> str:
    """The prompt for ``expression`` with a named template from ``PROMPT_TEMPLATES`` (or a format string holding
    ``{expression}``; checked by ``check_template``)."""
    return check_template(template).format(expression=expression)
