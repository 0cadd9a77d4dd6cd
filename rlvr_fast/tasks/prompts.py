"""Prompt templates for the synthetic tasks: ask for the answer in ``\\boxed{}`` and, for the Brier reward (RLCR,
Damani et al. 2025, arXiv:2507.16806), a stated confidence in ``<confidence></confidence>``.

Templates are plain ``str.format`` strings with one field, ``{expression}``; they hold the user message only (the
trainer applies the model's chat template).
"""

from __future__ import annotations

__all__ = ["PROMPT_TEMPLATES", "render_prompt"]

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


def render_prompt(expression: str, template: str = "boxed") -> str:
    """The prompt for ``expression`` with a named template from ``PROMPT_TEMPLATES`` (or a format string holding
    ``{expression}``)."""
    fmt = PROMPT_TEMPLATES.get(template, template)
    if "{expression}" not in fmt:
        raise ValueError(
            f"render_prompt: template must be one of {sorted(PROMPT_TEMPLATES)} or a format string with "
            f"'{{expression}}', got {template!r}"
        )
    return fmt.format(expression=expression)
