"""What the research context predicts for a (model, task) cell, before any run: the expected sign of each reward
comparison, so the report can set the measured difference against it.

The research question: spurious rewards (random, incorrect labels) lift some models (Qwen2.5-Math) and not others
(Llama, OLMo), because pretraining decides which behaviours RL can surface (Shao et al. 2025, arXiv:2506.10947); on a
clean task, one the model cannot have memorised, only correct rewards help and inverse rewards hurt, whatever the model
(Wu et al. 2025, arXiv:2507.10532). A prediction is keyed by (model kind, task kind), each found from a small table of
names and patterns (``MODEL_KINDS``, ``model_kind``, ``task_kind``); a cell of unknown kind gets no prediction.

Signs: ``+`` (the difference is above 0), ``-`` (below 0), ``0`` (about 0: inside +-``EQUIVALENCE_MARGIN``), ``?``
(no sign predicted). ``agreement`` compares one with a measured 95% interval.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = [
    "COMPARISONS",
    "EQUIVALENCE_MARGIN",
    "MODEL_KINDS",
    "PREDICTIONS",
    "Prediction",
    "agreement",
    "model_kind",
    "predict",
    "task_kind",
]

# pass@1 differences within +-0.05 count as "about 0" for a "0" prediction: an interval inside it agrees, one that
# excludes 0 disagrees, anything between is inconclusive (an interval can show an effect is small, never that it is 0).
EQUIVALENCE_MARGIN = 0.05

# The comparisons a prediction signs: "a - b" of pass@1 after training (b "base": the base model), paired by problem.
COMPARISONS = (
    "correct - random",
    "correct - inverse",
    "correct - base",
    "random - base",
    "inverse - base",
    "incorrect_label - base",
)

# Model kinds by name: the shipped models by their names, others by a pattern on the name (first match wins).
MODEL_KINDS: dict[str, str] = {"smollm2-135m-instruct": "instruct", "gemma3-270m": "base"}
MODEL_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"qwen2\.5-math", "math_pretrained"),  # Shao et al.'s models that spurious rewards lift
    (r"instruct|[-_]chat\b|[-_]it\b", "instruct"),
    (r"llama|olmo|gemma|smollm|qwen|mistral|phi", "base"),  # named families without an instruct / chat suffix
)
MODEL_KIND_TEXT = {
    "instruct": "an instruction-tuned model",
    "base": "a base model (no instruction tuning, not math-heavy pretraining)",
    "math_pretrained": "a model pretrained heavily on math (Qwen2.5-Math)",
}
TASK_KIND_TEXT = {
    "procedural": "a clean procedural task (problems drawn by a seeded generator: none can have been memorised)",
    "data_file": "a task from a data file (possibly seen in pretraining)",
}


@dataclass(frozen=True)
class Prediction:
    """``signs``: comparison -> "+", "-", "0" or "?"; ``text``: the prediction in words; ``source``: whose finding."""

    signs: Mapping[str, str]
    text: str
    source: str


_CLEAN = {
    "correct - random": "+",
    "correct - inverse": "+",
    "correct - base": "+",
    "random - base": "0",
    "inverse - base": "-",
    "incorrect_label - base": "-",
}
_CLEAN_TEXT = (
    "only the correct reward helps: random about 0, inverse and incorrect labels hurt, so correct beats random and "
    "inverse"
)

PREDICTIONS: dict[tuple[str, str], Prediction] = {
    ("instruct", "procedural"): Prediction(_CLEAN, _CLEAN_TEXT, "Wu et al. 2025 (clean RandomCalculation)"),
    ("base", "procedural"): Prediction(_CLEAN, _CLEAN_TEXT, "Wu et al. 2025; Shao et al. 2025 (Llama, OLMo)"),
    ("math_pretrained", "procedural"): Prediction(
        _CLEAN, _CLEAN_TEXT + ", even for Qwen2.5-Math", "Wu et al. 2025 (Qwen2.5-Math on clean tasks)"
    ),
    ("instruct", "data_file"): Prediction(
        {**_CLEAN, "random - base": "?", "incorrect_label - base": "?"},
        "the correct reward helps and beats random and inverse; spurious rewards give little or hurt (no sign "
        "predicted)",
        "Shao et al. 2025 (Llama, OLMo)",
    ),
    ("base", "data_file"): Prediction(
        {**_CLEAN, "random - base": "?", "incorrect_label - base": "?"},
        "the correct reward helps and beats random and inverse; spurious rewards give little or hurt (no sign "
        "predicted)",
        "Shao et al. 2025 (Llama, OLMo)",
    ),
    ("math_pretrained", "data_file"): Prediction(
        {**_CLEAN, "correct - random": "?", "random - base": "+", "incorrect_label - base": "+"},
        "spurious rewards lift the model too (random, incorrect labels above the base), correct most; by how much "
        "correct beats random is not predicted",
        "Shao et al. 2025 (Qwen2.5-Math on MATH-500)",
    ),
}


def model_kind(model: str) -> str:
    """``MODEL_KINDS[model]``, else the first ``MODEL_PATTERNS`` match on the model's name, else "unknown"."""
    if model in MODEL_KINDS:
        return MODEL_KINDS[model]
    name = os.path.basename(model.rstrip("/")).lower() or model.lower()
    for pattern, kind in MODEL_PATTERNS:
        if re.search(pattern, name):
            return kind
    return "unknown"


def task_kind(task: str) -> str:
    """ "procedural" for the built-in arithmetic task and reasoning-gym generators, else "data_file"."""
    from rlvr_fast.tasks.reasoning_gym import is_reasoning_gym_task

    return "procedural" if task == "arithmetic" or is_reasoning_gym_task(task) else "data_file"


def predict(model: str, task: str) -> tuple[str, str, Prediction | None]:
    """(model kind, task kind, the prediction or None when the pair has none)."""
    mk, tk = model_kind(model), task_kind(task)
    return mk, tk, PREDICTIONS.get((mk, tk))


def agreement(sign: str, ci_low: float, ci_high: float, margin: float = EQUIVALENCE_MARGIN) -> str:
    """Whether a measured interval agrees with a predicted sign.

    "+": agree when the interval lies above 0, disagree when below, inconclusive when it includes 0; "-" mirrored;
    "0": agree when the interval lies inside [-margin, +margin], disagree when it excludes 0, else inconclusive; "?":
    "no prediction". A NaN bound (no measurement) is "inconclusive"."""
    if sign == "?":
        return "no prediction"
    if sign not in ("+", "-", "0"):
        raise ValueError(f"agreement: sign must be '+', '-', '0' or '?', got {sign!r}")
    if ci_low != ci_low or ci_high != ci_high:
        return "inconclusive"
    above, below = ci_low > 0, ci_high < 0
    if sign == "+":
        return "agree" if above else ("disagree" if below else "inconclusive")
    if sign == "-":
        return "agree" if below else ("disagree" if above else "inconclusive")
    if above or below:
        return "disagree"
    return "agree" if -margin <= ci_low and ci_high <= margin else "inconclusive"
