"""Weighted composition of reward modes, and the policy for user reward functions that fail (docs/design.md §5).

``compose({"correct": 1.0, "brier": 1.0})`` or ``compose([(1.0, "correct"), (0.2, reward_fn("format")), (0.5, my_fn)])``
returns ``sum_j w_j * R_j``. Built-in modes (names or ``RewardFunction``) run as they are: they never raise on model
output, and a caller error in them (a missing context keyword) must surface. Any other callable is a user reward
function and runs inside ``guard``.

Failure policy of ``guard`` (reward functions never crash a run unless asked to):

1. the user function is called on the whole batch; if it raises, or returns something that is not one finite number per
   completion, it is called again on each completion alone (list-valued context keywords of batch length are sliced
   to that completion; other keywords pass unchanged) to find the offending samples; when every sample passes alone,
   the batch call's failure is logged once per guarded function on the ``rlvr_fast.rewards`` logger;
2. each offending sample is recorded as a ``RewardError`` (index, an excerpt of the completion, the answer, the
   exception) in ``.errors`` and logged once per call on the ``rlvr_fast.rewards`` logger;
3. its reward is then, by ``on_error``: ``"value"`` (default) -> ``error_value`` (default 0.0); ``"nan"`` -> NaN (so
   ``group_advantages(..., invalid="mask")`` drops it and reports it); ``"raise"`` -> ``RewardFunctionError`` naming the
   first offending sample, chained to the original exception.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rlvr_fast.rewards.modes import RewardFunction, _check_batch, reward_fn

__all__ = [
    "ON_ERROR_POLICIES",
    "ComposedReward",
    "GuardedReward",
    "RewardError",
    "RewardFunctionError",
    "compose",
    "guard",
]

logger = logging.getLogger("rlvr_fast.rewards")

EXCERPT_CHARS = 200


def _excerpt(text: Any) -> str:
    s = text if isinstance(text, str) else repr(text)
    if len(s) > EXCERPT_CHARS:
        s = s[: EXCERPT_CHARS // 2] + f"...<{len(s) - EXCERPT_CHARS} chars>..." + s[-EXCERPT_CHARS // 2 :]
    return ascii(s)  # lone surrogates and control characters stay printable in logs


@dataclass(frozen=True)
class RewardError:
    """One completion on which a user reward function failed."""

    reward: str
    index: int
    completion: str  # ascii() excerpt of at most ~EXCERPT_CHARS characters
    answer: str
    error: str  # repr of the exception, or why the returned value was rejected

    def __str__(self) -> str:
        return (
            f"reward {self.reward!r} failed on sample {self.index}: {self.error}; "
            f"completion={self.completion}, answer={self.answer}"
        )


class RewardFunctionError(RuntimeError):
    """Raised by ``guard(..., on_error="raise")``; ``.sample`` is the first offending ``RewardError``."""

    def __init__(self, sample: RewardError):
        super().__init__(str(sample))
        self.sample = sample


ON_ERROR_POLICIES: dict[str, Callable[[float], float]] = {
    "value": lambda error_value: error_value,
    "nan": lambda error_value: math.nan,
    "raise": lambda error_value: math.nan,  # never used as a value: the guard raises first
}


class _BadOutput(Exception):
    pass


def _as_rewards(out: Any, n: int) -> list[float]:
    if isinstance(out, (str, bytes)) or not hasattr(out, "__len__"):
        raise _BadOutput(f"returned {type(out).__name__}, expected a list of {n} floats")
    if len(out) != n:
        raise _BadOutput(f"returned {len(out)} values, expected {n}")
    values = []
    for v in out:
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise _BadOutput(f"returned a non-number {v!r}") from None
        if not math.isfinite(f):
            raise _BadOutput(f"returned a non-finite reward {f!r}")
        values.append(f)
    return values


def _slice_ctx(ctx: Mapping[str, Any], i: int, n: int) -> dict[str, Any]:
    return {k: [v[i]] if isinstance(v, (list, tuple)) and len(v) == n else v for k, v in ctx.items()}


class GuardedReward:
    """A user reward function run under the failure policy of the module docstring; ``.errors`` holds the last call's
    offending samples."""

    def __init__(
        self,
        fn: Callable[..., Sequence[float]],
        *,
        name: str | None = None,
        on_error: str = "value",
        error_value: float = 0.0,
    ):
        if not callable(fn):
            raise TypeError(f"guard: fn must be callable, got {type(fn).__name__}")
        if on_error not in ON_ERROR_POLICIES:
            raise ValueError(f"guard: on_error must be one of {sorted(ON_ERROR_POLICIES)}, got {on_error!r}")
        if isinstance(error_value, bool) or not isinstance(error_value, (int, float)) or not math.isfinite(error_value):
            raise ValueError(f"guard: error_value must be a finite number, got {error_value!r}")
        self.fn = fn
        self.name = name or getattr(fn, "__name__", type(fn).__name__)
        self.on_error = on_error
        self.error_value = float(error_value)
        self.errors: list[RewardError] = []
        self._batch_failure_logged = False

    def __call__(self, completions: Sequence[str], answers: Sequence[str], **ctx: Any) -> list[float]:
        _check_batch(completions, answers, self.name)
        n = len(completions)
        self.errors = []
        try:
            return _as_rewards(self.fn(completions, answers, **ctx), n)
        except Exception as exc:
            batch_error = repr(exc)
        rewards: list[float] = []
        for i in range(n):
            try:
                rewards.append(_as_rewards(self.fn([completions[i]], [answers[i]], **_slice_ctx(ctx, i, n)), 1)[0])
            except Exception as exc:
                err = RewardError(self.name, i, _excerpt(completions[i]), _excerpt(answers[i]), repr(exc))
                self.errors.append(err)
                if self.on_error == "raise":
                    raise RewardFunctionError(err) from exc
                rewards.append(ON_ERROR_POLICIES[self.on_error](self.error_value))
        if not self.errors and not self._batch_failure_logged:
            # every sample passed alone: the batch call's failure (a bug in the batched path, a wrong return shape)
            # would otherwise leave no trace while each call costs n + 1 calls of the function
            self._batch_failure_logged = True
            logger.warning(
                "reward function %r failed on the whole batch of %d (%s) but succeeded on each sample alone; its "
                "rewards come from per-sample calls (logged once per reward function)",
                self.name,
                n,
                batch_error,
            )
        if self.errors:
            logger.warning(
                "reward function %r failed on %d of %d samples (policy %r); first: %s",
                self.name,
                len(self.errors),
                n,
                self.on_error,
                self.errors[0],
            )
        return rewards


def guard(
    fn: Callable[..., Sequence[float]], *, name: str | None = None, on_error: str = "value", error_value: float = 0.0
) -> GuardedReward:
    """Wrap a user reward function ``(completions, answers, **ctx) -> list[float]`` in the failure policy."""
    return GuardedReward(fn, name=name, on_error=on_error, error_value=error_value)


class ComposedReward:
    """``sum_j w_j R_j`` over named components; ``components(...)`` returns each R_j for logging."""

    def __init__(self, terms: list[tuple[str, float, Callable[..., list[float]]]]):
        self.terms = terms

    @property
    def errors(self) -> list[RewardError]:
        """Offending samples of the guarded (user) components in the last call."""
        return [e for _, _, fn in self.terms for e in getattr(fn, "errors", [])]

    def components(self, completions: Sequence[str], answers: Sequence[str], **ctx: Any) -> dict[str, list[float]]:
        _check_batch(completions, answers, "compose")
        return {name: list(fn(completions, answers, **ctx)) for name, _, fn in self.terms}

    def weighted_sum(self, parts: Mapping[str, Sequence[float]]) -> list[float]:
        """``sum_j w_j R_j`` per completion from the ``components(...)`` already computed (no reward runs twice)."""
        total = [0.0] * len(next(iter(parts.values())))
        for name, weight, _ in self.terms:
            for i, r in enumerate(parts[name]):
                total[i] += weight * r
        return total

    def __call__(self, completions: Sequence[str], answers: Sequence[str], **ctx: Any) -> list[float]:
        return self.weighted_sum(self.components(completions, answers, **ctx))

    def __repr__(self) -> str:
        return "compose([" + ", ".join(f"({w!r}, {n!r})" for n, w, _ in self.terms) + "])"


def compose(
    terms: Mapping[str, float] | Sequence[tuple[float, str | Callable[..., Sequence[float]]]],
    *,
    on_error: str = "value",
    error_value: float = 0.0,
) -> ComposedReward:
    """Weighted sum of reward modes: a mapping ``{mode name: weight}`` (default parameters) or a sequence of
    ``(weight, name | RewardFunction | user callable)``. User callables run under ``guard(on_error, error_value)``."""
    if isinstance(terms, Mapping):
        items = list(terms.items())
    else:
        items = []
        for t in terms:
            if not isinstance(t, tuple) or len(t) != 2:
                raise TypeError(f"compose: each term must be a (weight, reward) pair, got {t!r}")
            items.append((t[1], t[0]))
    if not items:
        raise ValueError("compose: terms is empty; give at least one (weight, reward) pair")
    resolved: list[tuple[str, float, Callable[..., list[float]]]] = []
    seen: dict[str, int] = {}
    for spec, weight in items:
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ValueError(f"compose: the weight of {spec!r} must be a finite number, got {weight!r}")
        if isinstance(spec, str):
            fn: Callable[..., list[float]] = reward_fn(spec)
        elif isinstance(spec, (RewardFunction, GuardedReward, ComposedReward)):
            fn = spec
        elif callable(spec):
            fn = guard(spec, on_error=on_error, error_value=error_value)
        else:
            raise TypeError(
                f"compose: a term must be a mode name, a RewardFunction or a callable, got {type(spec).__name__}"
            )
        name = getattr(fn, "name", "composed")
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            name = f"{name}_{seen[name]}"
        resolved.append((name, float(weight), fn))
    return ComposedReward(resolved)
