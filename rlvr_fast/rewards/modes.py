"""Reward modes by name (docs/design.md §5): the rewards whose effect the project measures.

| mode               | reward per completion                                         | paper                                  |
|--------------------|---------------------------------------------------------------|----------------------------------------|
| correct            | c = 1 if the extracted answer is equivalent to the label, else 0 | (verifier)                           |
| format             | 1 if the completion holds a non-empty ``\\boxed{}``, else 0     | Shao et al. 2025, arXiv:2506.10947     |
| random             | Bernoulli(gamma), seeded per (prompt, completion index, step)  | Shao et al. 2025                       |
| inverse            | 1 - c                                                          | Wu et al. 2025, arXiv:2507.10532       |
| incorrect_label    | c against a wrong label supplied with the data                 | Shao et al. 2025                       |
| majority_label     | c against the most frequent answer (of the group, or given)    | Shao et al. 2025                       |
| brier              | c - (q - c)^2 from ``<confidence>q</confidence>``; no valid q: c - 1 | RLCR, Damani et al. 2025, arXiv:2507.16806 |
| numeric_continuous | 1 - 0.5 min(d, 1) - 0.5 min(d / (abs(b) + 1e-6), 1), d = abs(a - b); unparseable: 0 | Wu et al. 2025 |
| task_score         | the task's own scorer on the extracted answer (reasoning-gym: the dataset's ``score_answer``, in [0, 1]) | reasoning-gym |

``reward_fn(name, **params)`` returns a ``RewardFunction``: ``(completions: list[str], answers: list[str], **ctx) ->
list[float]``. Parameters are keyword-only and checked against the mode's defaults (an unknown one is a TypeError).
Context keywords a mode reads (others are ignored, so one ctx dict can feed every mode):

- ``prompts`` (list[str]) or ``prompt_ids`` (list): the prompt of each completion (random's seed; default: the batch
  position of the completion, so draws still repeat exactly for a repeated batch);
- ``completion_index`` (list[int]): index within its group (random; default ``i % group_size`` when ``group_size`` is
  given, else the batch position);
- ``step`` (int, default 0): training step (random);
- ``group_size`` (int; also a parameter) or ``group_ids`` (list): groups for majority_label;
- ``majority_answers`` (list[str | None]): precomputed majority labels, e.g. ``majority_vote`` over 64 samples of the
  pre-RL model as in Shao et al.; when present majority_label uses them instead of voting within the group;
- ``incorrect_answers`` (list[str]): the wrong labels of incorrect_label (required there);
- ``entries`` (list): each completion's task entry with its own scorer, an object with ``score(answer: str | None) ->
  float`` such as ``tasks.reasoning_gym.GymEntry`` (task_score; required there).

Every mode is deterministic given its parameters and ``seed``; none raises on the content of a completion (empty,
unbalanced braces, ``10^10000``, ``nan``, lone surrogates, megabyte strings): malformed output gets the mode's value for
"no answer" (0 for correct / format / numeric_continuous / majority_label / incorrect_label, 1 for inverse, -1 for
brier). A caller error (wrong types, lengths, missing context) raises TypeError / ValueError naming the argument.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from rlvr_fast.rewards.equivalence import is_equivalent, parse_number
from rlvr_fast.rewards.extract import extract_answer, has_nonempty_boxed, last_tag_content

__all__ = [
    "REWARD_MODES",
    "RewardFunction",
    "RewardMode",
    "brier_reward",
    "majority_vote",
    "numeric_continuous_reward",
    "parse_confidence",
    "register_mode",
    "reward_fn",
]

# Parameters of every mode that compares answers (forwarded to ``is_equivalent``).
_MATCH_DEFAULTS: dict[str, Any] = {"abs_tol": 1e-6, "rel_tol": 0.0, "symbolic": True}

Compute = Callable[[Sequence[str], Sequence[str], Mapping[str, Any], Mapping[str, Any]], list[float]]


@dataclass(frozen=True)
class RewardMode:
    """One row of the registry: ``compute(completions, answers, ctx, params) -> list[float]``."""

    name: str
    compute: Compute
    defaults: Mapping[str, Any] = field(default_factory=dict)
    context: tuple[str, ...] = ()  # ctx keywords it reads
    no_answer_value: float | None = 0.0  # reward of a completion with no answer (None: the mode ignores answers)
    paper: str = ""


REWARD_MODES: dict[str, RewardMode] = {}


def register_mode(mode: RewardMode) -> RewardMode:
    """Add a mode to the registry (names are unique)."""
    if mode.name in REWARD_MODES:
        raise ValueError(f"register_mode: a reward mode named {mode.name!r} is already registered")
    REWARD_MODES[mode.name] = mode
    return mode


# ----------------------------------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------------------------------


def _match(params: Mapping[str, Any]) -> dict[str, Any]:
    return {k: params[k] for k in _MATCH_DEFAULTS}


def _verdicts(completions: Sequence[str], labels: Sequence[str | None], params: Mapping[str, Any]) -> list[bool]:
    """c_i: the completion's extracted answer is equivalent to its label (a missing label: False)."""
    kw = _match(params)
    return [lab is not None and is_equivalent(extract_answer(c), lab, **kw) for c, lab in zip(completions, labels)]


def _per_sample(ctx: Mapping[str, Any], key: str, n: int, mode: str, required: bool = False) -> Sequence[Any] | None:
    value = ctx.get(key)
    if value is None:
        if required:
            raise ValueError(
                f"reward mode {mode!r}: context keyword {key}= (a list with one entry per completion) is required"
            )
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(
            f"reward mode {mode!r}: {key} must be a list with one entry per completion, got {type(value).__name__}"
        )
    if len(value) != n:
        raise ValueError(f"reward mode {mode!r}: {key} has {len(value)} entries, expected {n} (one per completion)")
    return value


def _group_size(ctx: Mapping[str, Any], params: Mapping[str, Any], n: int, mode: str) -> int | None:
    g = params.get("group_size") or ctx.get("group_size")
    if g is None:
        return None
    if isinstance(g, bool) or not isinstance(g, int) or g < 1:
        raise ValueError(f"reward mode {mode!r}: group_size must be a positive int, got {g!r}")
    if n % g:
        raise ValueError(f"reward mode {mode!r}: {n} completions are not a whole number of groups of group_size={g}")
    return g


# ----------------------------------------------------------------------------------------------------------------
# The modes
# ----------------------------------------------------------------------------------------------------------------


def _correct(completions, answers, ctx, params) -> list[float]:
    return [float(v) for v in _verdicts(completions, answers, params)]


def _inverse(completions, answers, ctx, params) -> list[float]:
    return [1.0 - float(v) for v in _verdicts(completions, answers, params)]


def _format(completions, answers, ctx, params) -> list[float]:
    return [float(has_nonempty_boxed(c)) for c in completions]


def _incorrect_label(completions, answers, ctx, params) -> list[float]:
    wrong = _per_sample(ctx, "incorrect_answers", len(completions), "incorrect_label", required=True)
    for i, w in enumerate(wrong):
        if not isinstance(w, str):
            raise TypeError(
                f"reward mode 'incorrect_label': incorrect_answers[{i}] must be a str, got {type(w).__name__}"
            )
    return [float(v) for v in _verdicts(completions, wrong, params)]


def _uniform(seed: int, prompt_key: Any, index: Any, step: Any) -> float:
    """A uniform draw in [0, 1) that depends only on (seed, prompt, completion index, step): BLAKE2b of their text,
    so it is the same in every process and for any batch order (Python's ``hash`` is salted per process)."""
    key = f"{seed}\x1f{prompt_key}\x1f{index}\x1f{step}".encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") / 2.0**64


def _random(completions, answers, ctx, params) -> list[float]:
    n = len(completions)
    gamma, seed = params["gamma"], params["seed"]
    prompts = _per_sample(ctx, "prompts", n, "random") or _per_sample(ctx, "prompt_ids", n, "random")
    index = _per_sample(ctx, "completion_index", n, "random")
    g = _group_size(ctx, params, n, "random") if index is None else None
    step = ctx.get("step", 0)
    if isinstance(step, bool) or not isinstance(step, int):
        raise TypeError(f"reward mode 'random': step must be an int, got {type(step).__name__}")
    out = []
    for i in range(n):
        prompt_key = prompts[i] if prompts is not None else f"#{i // g if g else i}"
        idx = index[i] if index is not None else (i % g if g else i)
        out.append(1.0 if _uniform(seed, prompt_key, idx, step) < gamma else 0.0)
    return out


def majority_vote(
    answers: Sequence[str | None], *, abs_tol: float = 1e-6, rel_tol: float = 0.0, symbolic: bool = True
) -> str | None:
    """The most frequent answer, counting equivalent answers as one (None entries are abstentions).

    Numeric answers are grouped by exact value (one dict lookup each); the others are compared with ``is_equivalent``
    against each class's first member. Ties go to the class seen first, so the vote is deterministic. Returns the first
    member of the winning class, or None when every entry is None.

    Use it on the pre-RL model's samples (Shao et al. sample 64 per prompt) to build ``majority_answers``.
    """
    counts: dict[Hashable, int] = {}
    representative: dict[Hashable, str] = {}
    others: list[Hashable] = []  # classes of non-numeric answers, in order of first appearance
    for a in answers:
        if a is None:
            continue
        if not isinstance(a, str):
            raise TypeError(f"majority_vote: answers must be str or None, got {type(a).__name__}")
        number = parse_number(a)
        if number is not None:
            key: Hashable = ("number", number.value)
        else:
            key = next(
                (
                    k
                    for k in others
                    if is_equivalent(a, representative[k], abs_tol=abs_tol, rel_tol=rel_tol, symbolic=symbolic)
                ),
                ("text", len(others)),
            )
            if key not in counts:
                others.append(key)
        if key not in counts:
            counts[key], representative[key] = 0, a
        counts[key] += 1
    if not counts:
        return None
    best = max(counts.values())
    winner = next(k for k, c in counts.items() if c == best)  # dicts keep insertion order: first seen wins ties
    return representative[winner]


def _majority_label(completions, answers, ctx, params) -> list[float]:
    n = len(completions)
    given = _per_sample(ctx, "majority_answers", n, "majority_label")
    if given is not None:
        return [float(v) for v in _verdicts(completions, given, params)]
    extracted = [extract_answer(c) for c in completions]
    group_ids = _per_sample(ctx, "group_ids", n, "majority_label")
    if group_ids is None:
        g = _group_size(ctx, params, n, "majority_label")
        if g is None:
            raise ValueError(
                "reward mode 'majority_label': pass group_size (parameter or context), group_ids=, "
                "or majority_answers= "
                "to say which completions vote together"
            )
        group_ids = [i // g for i in range(n)]
    members: dict[Hashable, list[int]] = {}
    for i, gid in enumerate(group_ids):
        members.setdefault(gid, []).append(i)
    labels: list[str | None] = [None] * n
    for idx in members.values():
        winner = majority_vote([extracted[i] for i in idx], **_match(params))
        for i in idx:
            labels[i] = winner
    kw = _match(params)
    return [float(lab is not None and is_equivalent(e, lab, **kw)) for e, lab in zip(extracted, labels)]


def parse_confidence(text: str) -> float | None:
    """q from the last ``<confidence>q</confidence>`` block: a number in [0, 1] (``0.8``, ``.8``, ``4/5``) or a
    percentage (``80%``); None when missing, unparseable, not finite or outside [0, 1]."""
    content = last_tag_content(text, "confidence")
    if content is None:
        return None
    content = content.strip()
    scale = Fraction(1)
    if content.endswith("%"):
        content, scale = content[:-1].rstrip().removesuffix("\\"), Fraction(1, 100)
    number = parse_number(content)
    if number is None:
        return None
    q = number.value * scale
    return float(q) if 0 <= q <= 1 else None


def brier_reward(correct: float, confidence: float | None) -> float:
    """RLCR: c - (q - c)^2; a missing confidence counts as the worst Brier term, 1 (so c - 1)."""
    if confidence is None:
        return correct - 1.0
    return correct - (confidence - correct) ** 2


def _brier(completions, answers, ctx, params) -> list[float]:
    verdicts = _verdicts(completions, answers, params)
    return [brier_reward(float(v), parse_confidence(c)) for c, v in zip(completions, verdicts)]


_EPS_NC = Fraction(1, 10**6)


def numeric_continuous_reward(pred: Fraction, ref: Fraction) -> float:
    """Wu et al. 2025: 1 - 0.5 min(|a-b|, 1) - 0.5 min(|a-b| / (|b| + 1e-6), 1), computed exactly then rounded."""
    d = abs(pred - ref)
    return float(1 - Fraction(1, 2) * min(d, 1) - Fraction(1, 2) * min(d / (abs(ref) + _EPS_NC), 1))


def _numeric_continuous(completions, answers, ctx, params) -> list[float]:
    out = []
    for c, a in zip(completions, answers):
        pred_text = extract_answer(c)
        pred = parse_number(pred_text) if pred_text is not None else None
        ref = parse_number(a)
        out.append(0.0 if pred is None or ref is None else numeric_continuous_reward(pred.value, ref.value))
    return out


def _task_score(completions, answers, ctx, params) -> list[float]:
    entries = _per_sample(ctx, "entries", len(completions), "task_score", required=True)
    for i, e in enumerate(entries):
        if not callable(getattr(e, "score", None)):
            raise TypeError(
                f"reward mode 'task_score': entries[{i}] must have a score(answer) method (a task entry with its own "
                f"scorer, e.g. rlvr_fast.tasks.reasoning_gym.GymEntry), got {type(e).__name__}"
            )
    # The entry's scorer owns the comparison (partial credit, answer formats); it never raises on a completion.
    return [float(e.score(extract_answer(c))) for c, e in zip(completions, entries)]


for _mode in (
    RewardMode("correct", _correct, dict(_MATCH_DEFAULTS)),
    RewardMode("format", _format, {}, paper="Shao et al. 2025, arXiv:2506.10947"),
    RewardMode(
        "random",
        _random,
        {"gamma": 0.5, "seed": 0, "group_size": None},
        ("prompts", "prompt_ids", "completion_index", "step", "group_size"),
        no_answer_value=None,
        paper="Shao et al. 2025, arXiv:2506.10947",
    ),
    RewardMode(
        "inverse", _inverse, dict(_MATCH_DEFAULTS), no_answer_value=1.0, paper="Wu et al. 2025, arXiv:2507.10532"
    ),
    RewardMode(
        "incorrect_label",
        _incorrect_label,
        dict(_MATCH_DEFAULTS),
        ("incorrect_answers",),
        paper="Shao et al. 2025, arXiv:2506.10947",
    ),
    RewardMode(
        "majority_label",
        _majority_label,
        {**_MATCH_DEFAULTS, "group_size": None},
        ("majority_answers", "group_ids", "group_size"),
        paper="Shao et al. 2025, arXiv:2506.10947",
    ),
    RewardMode(
        "brier", _brier, dict(_MATCH_DEFAULTS), no_answer_value=-1.0, paper="Damani et al. 2025, arXiv:2507.16806"
    ),
    RewardMode("numeric_continuous", _numeric_continuous, {}, paper="Wu et al. 2025, arXiv:2507.10532"),
    RewardMode("task_score", _task_score, {}, ("entries",), paper="reasoning-gym (Stojanovski et al. 2025)"),
):
    register_mode(_mode)


# ----------------------------------------------------------------------------------------------------------------
# Parameter checks and the public factory
# ----------------------------------------------------------------------------------------------------------------


def _check_params(mode: str, params: dict[str, Any]) -> None:
    if "gamma" in params:
        g = params["gamma"]
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not (0.0 <= g <= 1.0):
            raise ValueError(f"reward_fn({mode!r}): gamma must be a probability in [0, 1], got {g!r}")
    if "seed" in params and (isinstance(params["seed"], bool) or not isinstance(params["seed"], int)):
        raise TypeError(f"reward_fn({mode!r}): seed must be an int, got {type(params['seed']).__name__}")
    for name in ("abs_tol", "rel_tol"):
        if name in params:
            v = params[name]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"reward_fn({mode!r}): {name} must be a finite number >= 0, got {v!r}")


def _check_batch(completions: Any, answers: Any, mode: str) -> None:
    for arg, value in (("completions", completions), ("answers", answers)):
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise TypeError(f"reward mode {mode!r}: {arg} must be a list of str, got {type(value).__name__}")
    if len(completions) != len(answers):
        raise ValueError(
            f"reward mode {mode!r}: {len(completions)} completions but {len(answers)} answers (expected equal)"
        )
    for arg, value in (("completions", completions), ("answers", answers)):
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise TypeError(f"reward mode {mode!r}: {arg}[{i}] must be a str, got {type(item).__name__}")


class RewardFunction:
    """A named reward mode with bound parameters: ``(completions, answers, **ctx) -> list[float]``."""

    def __init__(self, mode: RewardMode, params: Mapping[str, Any]):
        self.mode = mode
        self.name = mode.name
        self.params = dict(params)

    def __call__(self, completions: Sequence[str], answers: Sequence[str], **ctx: Any) -> list[float]:
        _check_batch(completions, answers, self.name)
        return self.mode.compute(completions, answers, ctx, self.params)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"reward_fn({self.name!r}{', ' + args if args else ''})"


def reward_fn(name: str, **params: Any) -> RewardFunction:
    """The reward mode ``name`` with keyword parameters, e.g. ``reward_fn("random", gamma=0.5, seed=0)``.

    Raises:
        ValueError: unknown mode name (the message lists the known ones), or a parameter out of range.
        TypeError: a parameter the mode does not take.
    """
    if name not in REWARD_MODES:
        raise ValueError(f"reward_fn: unknown reward mode {name!r}; known modes: {sorted(REWARD_MODES)}")
    mode = REWARD_MODES[name]
    unknown = sorted(set(params) - set(mode.defaults))
    if unknown:
        raise TypeError(f"reward_fn({name!r}): unexpected parameter(s) {unknown}; it takes {sorted(mode.defaults)}")
    bound = {**mode.defaults, **params}
    _check_params(name, bound)
    return RewardFunction(mode, bound)
