"""rlvr_fast's reward modes (correct, format, random, inverse, brier, ...) as TRL reward functions.

TRL calls a reward function as ``f(prompts=..., completions=..., completion_ids=..., trainer_state=..., **columns)``
with one entry per completion in every list (dataset columns already repeated ``num_generations`` times), and reads
``f.__name__`` for its logs. Prompts and completions are strings, or message lists for conversational datasets.

The adapter turns that call into a reward mode's ``(completions, answers, **ctx)``:
- completion text: the string, or the text of the last assistant message (string content or its text parts);
- answers: the dataset column ``answer_column`` (``None`` for modes that read no label: format, random, ...);
- ctx ``prompts``: the prompt's text (random's seed key); ``group_ids``: the prompt, so majority_label votes among
  the completions of one prompt; ``completion_index``: the k-th completion of that prompt in this call (random's
  per-completion key); ``step``: ``trainer_state.global_step`` (random draws anew every step);
- any other context keyword a mode reads (incorrect_answers, majority_answers) from the columns in
  ``context_columns`` ({ctx keyword: dataset column}).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from rlvr_fast.rewards import reward_fn


def message_text(message: Mapping[str, Any]) -> str:
    """Text of one chat message: its string content, or its text parts joined (image parts are skipped)."""
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, Mapping) and part.get("type") == "text")


def completion_text(completion: str | Sequence[Mapping[str, Any]]) -> str:
    """A TRL completion as text: the string itself, or the last assistant message of a conversational completion."""
    if isinstance(completion, str):
        return completion
    for message in reversed(completion):
        if message.get("role") == "assistant":
            return message_text(message)
    return ""


def prompt_key(prompt: str | Sequence[Mapping[str, Any]]) -> str:
    """A stable text key for a prompt (a string, or its messages serialised), the same in every process."""
    if isinstance(prompt, str):
        return prompt
    return json.dumps([{"role": m.get("role"), "content": message_text(m)} for m in prompt], ensure_ascii=False)


def trl_reward_func(
    name: str,
    *,
    answer_column: str | None = "answer",
    context_columns: Mapping[str, str] | None = None,
    **params: Any,
) -> Callable[..., list[float]]:
    """The reward mode ``name`` (``rlvr_fast.rewards.REWARD_MODES``) as a TRL reward function.

    Args:
        name: a reward mode, e.g. "correct", "format", "random", "inverse", "brier", "majority_label".
        answer_column: the dataset column holding each prompt's reference answer (converted with ``str``); None for
            modes that read no label (format, random, majority_label without majority_answers...), which then get "".
        context_columns: {context keyword of the mode: dataset column}, e.g. {"incorrect_answers": "wrong_answer"}.
        **params: the mode's parameters (checked now: an unknown one is a TypeError), e.g. gamma=0.5, seed=0.

    Returns:
        ``f(prompts, completions, **kwargs) -> list[float]`` named ``rlvr_fast_<name>``.
    """
    mode = reward_fn(name, **params)  # validates the name and the parameters before training starts
    columns = dict(context_columns or {})
    for key, column in columns.items():
        if not isinstance(key, str) or not isinstance(column, str):
            raise TypeError(f"trl_reward_func: context_columns must map str to str, got {key!r}: {column!r}")

    def reward(prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
        n = len(completions)
        if len(prompts) != n:
            raise ValueError(f"rlvr_fast_{name}: {len(prompts)} prompts but {n} completions (expected equal)")
        texts = [completion_text(c) for c in completions]
        if answer_column is None:
            answers = [""] * n
        else:
            if answer_column not in kwargs:
                raise ValueError(
                    f"rlvr_fast_{name}: the dataset has no column {answer_column!r} with the reference answers "
                    f"(columns passed by TRL: {sorted(k for k in kwargs if k != 'trainer_state')}); pass "
                    f"answer_column=<column>, or answer_column=None for a mode that reads no label"
                )
            answers = [str(a) for a in kwargs[answer_column]]
        keys = [prompt_key(p) for p in prompts]
        seen: dict[str, int] = {}
        index = []
        for k in keys:
            index.append(seen.get(k, 0))
            seen[k] = index[-1] + 1
        state = kwargs.get("trainer_state")
        ctx: dict[str, Any] = {
            "prompts": keys,
            "group_ids": keys,
            "completion_index": index,
            "step": int(state.global_step) if state is not None else 0,
        }
        for key, column in columns.items():
            if column not in kwargs:
                raise ValueError(f"rlvr_fast_{name}: context column {column!r} (for {key}) is not in the dataset")
            ctx[key] = [None if v is None else str(v) for v in kwargs[column]]
        return mode(texts, answers, **ctx)

    reward.__name__ = reward.__qualname__ = f"rlvr_fast_{name}"
    reward.mode = mode  # the bound RewardFunction, for inspection
    return reward
