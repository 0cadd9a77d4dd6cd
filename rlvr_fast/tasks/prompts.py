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
    only replacement field must be the bare ``{expression}``, used at least once. ``{0}``, ``{foo}``,
    ``{expression[0]}``, an unbalanced ``{``, a conversion (``{expression!r}``) and a format spec
    (``{expression:>99999999999}``, which would allocate that many characters) are refused with a ValueError here,
    from the parse alone: the user's format string is never formatted before it passes (``{{`` / ``}}`` stay literal
    braces)."""
    fmt = PROMPT_TEMPLATES.get(template, template)
    expected = f"prompt template must be one of {sorted(PROMPT_TEMPLATES)} or a format string whose only field is "
    expected += f"the bare '{{expression}}' (no conversion, no format spec), got {template!r:.200}"
    try:
        parsed = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(fmt) if name is not None]
    except ValueError as exc:  # an unbalanced brace
        raise ValueError(f"{expected} ({exc})") from None
    others = sorted({name for name, _, _ in parsed if name != "expression"}, key=str)
    decorated = [f"{{{name}{'!' + conv if conv else ''}{':' + spec if spec else ''}}}" for name, spec, conv in parsed]
    decorated = [d for d in decorated if d != "{expression}"]
    if others:
        raise ValueError(f"{expected} (the field(s) {['{' + n + '}' for n in others]})")
    if decorated:
        raise ValueError(f"{expected} (the field(s) {decorated[:3]!r:.200} carry a conversion or format spec)")
    if not parsed:
        raise ValueError(f"{expected} (no {{expression}})")
    return fmt


def render_prompt(expression: str, template: str = "boxed") -> str:
    """The prompt for ``expression`` with a named template from ``PROMPT_TEMPLATES`` (or a format string holding
    ``{expression}``; checked by ``check_template``)."""
    return check_template(template).format(expression=expression)
