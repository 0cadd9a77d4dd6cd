"""Problems for training and evaluation: the built-in arithmetic task or JSONL files, rendered with the model's chat
template, and the order in which training visits them (a seeded permutation per epoch, so a resumed run visits the same
prompts as an uninterrupted one)."""

from __future__ import annotations

import random
from dataclasses import dataclass

from rlvr_fast.tasks import get_preset, load_jsonl, make_splits
from rlvr_fast.trainer.config import RLVRConfig


@dataclass(frozen=True)
class Problem:
    prompt: str  # the user message (before the chat template)
    answer: str
    extra: dict  # optional fields from the data (e.g. incorrect_label for the incorrect_label reward)


def load_problems(cfg: RLVRConfig) -> tuple[list[Problem], list[Problem]]:
    """(train, eval) problems; the built-in task's splits never share an expression."""
    if cfg.task == "arithmetic":
        splits = make_splits(
            get_preset(cfg.task_preset), cfg.train_size, cfg.eval_size, seed=cfg.seed, template=cfg.prompt_template
        )
        train, evaluation = splits["train"], splits["eval"]
    else:
        train = load_jsonl(cfg.task)[: cfg.train_size]
        if cfg.eval_file is None:
            raise ValueError(
                f"RLVRConfig.eval_file is required with a JSONL task ({cfg.task!r}): held-out problems must not "
                f"come from the training file"
            )
        evaluation = load_jsonl(cfg.eval_file)[: cfg.eval_size]
        if len(train) < cfg.prompts_per_step:
            raise ValueError(f"{cfg.task}: {len(train)} problems, fewer than prompts_per_step={cfg.prompts_per_step}")
    return [_problem(r) for r in train], [_problem(r) for r in evaluation]


def _problem(record: dict) -> Problem:
    extra = {k: v for k, v in record.items() if k not in ("prompt", "answer")}
    return Problem(prompt=str(record["prompt"]), answer=str(record["answer"]), extra=extra)


def chat_prompt(tokenizer, user_message: str, system_prompt: str | None) -> str:
    """The text the model sees: its chat template with a generation prompt, or the bare message without one."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": user_message}]
        if system_prompt is not None:
            messages.insert(0, {"role": "system", "content": system_prompt})
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return user_message if system_prompt is None else f"{system_prompt}\n\n{user_message}"


def batch_indices(n_problems: int, prompts_per_step: int, step: int, seed: int) -> list[int]:
    """Problem indices of training step ``step``: consecutive slices of a seeded permutation per epoch."""
    out: list[int] = []
    start = step * prompts_per_step
    while len(out) < prompts_per_step:
        epoch, offset = divmod(start + len(out), n_problems)
        order = list(range(n_problems))
        random.Random(f"{seed}:epoch:{epoch}").shuffle(order)
        out.append(order[offset])
    return out
