"""Problems for training and evaluation: the built-in arithmetic task, a reasoning-gym generator
(``task: reasoning_gym:<dataset>``, ``tasks.reasoning_gym``: what it refuses is listed there) or JSONL files, rendered
with the model's chat template, and the order in which training visits them (a seeded permutation per epoch, so a
resumed run visits the same prompts as an uninterrupted one).

What ``load_problems`` refuses (a ``ConfigFieldError`` naming the field, so ``rlvr-fast`` exits 2 before the model
loads): a task or eval file that does not load (``rlvr_fast.tasks.jsonl``: not a regular file, a line over 1 MiB, bad
UTF-8 / JSON / fields, each by file and line), a prompt template with a field other than ``{expression}``, a
built-in task asked for more problems than its preset has or than ``MAX_GENERATED_PROBLEMS``, and held-out problems
that are also training problems (``check_held_out``; ``allow_eval_overlap`` accepts them knowingly).
``check_prompt_lengths`` measures every prompt, after the chat template, against ``max_prompt_length``.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rlvr_fast.tasks import (
    check_template,
    expression_space_size,
    get_preset,
    load_jsonl_numbered,
    make_splits,
    reasoning_gym,
)
from rlvr_fast.tasks.splits import generate_problems
from rlvr_fast.trainer.config import RLVRConfig
from rlvr_fast.trainer.schema import ConfigFieldError

# Drawing a problem takes ~30-110 us (the random_calculation preset is the slowest): 100k per split is seconds, and
# far more than a run visits (steps x prompts_per_step). A larger set belongs in a JSONL file.
MAX_GENERATED_PROBLEMS = 100_000


@dataclass(frozen=True)
class Problem:
    prompt: str  # the user message (before the chat template)
    answer: str
    extra: dict  # optional fields from the data (e.g. incorrect_label for the incorrect_label reward)
    where: str = ""  # "train.jsonl, line 7" or "built-in task 'tiny', train problem 3": what the data checks name
    entry: Any = None  # a generated task's entry with its own scorer (tasks.reasoning_gym.GymEntry), else None


def _is_generated(task: str) -> bool:
    """The task draws its problems (and renders them with ``prompt_template``), as opposed to reading a file."""
    return task == "arithmetic" or reasoning_gym.is_reasoning_gym_task(task)


def load_problems(cfg: RLVRConfig) -> tuple[list[Problem], list[Problem]]:
    """(train, eval) problems, held out from each other (see the module docstring for what is refused)."""
    _check_prompt_template(cfg)  # with any task: a JSONL task does not use it, and says so
    if cfg.task_params and not reasoning_gym.is_reasoning_gym_task(cfg.task):
        raise ConfigFieldError(
            "task_params",
            f"RLVRConfig.task_params applies to {reasoning_gym.PREFIX}<dataset> tasks only: expected {{}} with "
            f"task={cfg.task!r}, got {cfg.task_params!r:.200}",
        )
    if cfg.task == "arithmetic":
        train, evaluation = _built_in_problems(cfg)
    elif reasoning_gym.is_reasoning_gym_task(cfg.task):
        train, evaluation = _reasoning_gym_problems(cfg)
    else:
        if cfg.eval_file is None:
            raise ConfigFieldError(
                "eval_file",
                f"RLVRConfig.eval_file is required with a JSONL task ({cfg.task!r}): held-out problems must not "
                f"come from the training file",
            )
        train = _file_problems("task", cfg.task, cfg.train_size)
        evaluation = _file_problems("eval_file", cfg.eval_file, cfg.eval_size)
        if len(train) < cfg.prompts_per_step:
            raise ConfigFieldError(
                "task", f"{cfg.task}: {len(train)} problems, fewer than prompts_per_step={cfg.prompts_per_step}"
            )
    if not cfg.allow_eval_overlap:
        built_in = f"the built-in task {cfg.task_preset!r}" if cfg.task == "arithmetic" else f"the task {cfg.task}"
        check_held_out(
            train,
            evaluation,
            field="eval_file" if cfg.eval_file else "task",
            sources=(built_in if _is_generated(cfg.task) else cfg.task, cfg.eval_file or built_in),
        )
    _say_short_files(cfg, train, evaluation)  # last: a refused config stays one line
    return train, evaluation


def _built_in_problems(cfg: RLVRConfig) -> tuple[list[Problem], list[Problem]]:
    """The built-in task's splits (disjoint by construction); with ``eval_file``, its generated train split and the
    file's problems as the held-out set."""
    preset = get_preset(cfg.task_preset)
    generated = (
        {"train_size": cfg.train_size} if cfg.eval_file else {"train_size": cfg.train_size, "eval_size": cfg.eval_size}
    )
    for name, size in generated.items():
        if size > MAX_GENERATED_PROBLEMS:
            raise ConfigFieldError(
                name,
                f"RLVRConfig.{name} with the built-in task: expected at most {MAX_GENERATED_PROBLEMS} "
                f"(MAX_GENERATED_PROBLEMS: each is drawn before the model loads; a larger set belongs in a JSONL "
                f"file), got {size}",
            )
    room = expression_space_size(preset)
    if sum(generated.values()) > room:
        asked = " + ".join(f"{n}={v}" for n, v in generated.items())
        raise ConfigFieldError(
            "train_size",
            f"RLVRConfig.{asked} with task_preset={cfg.task_preset!r}: expected at most {room} problems in all, the "
            f"distinct expressions the preset has; pick a larger preset or fewer problems",
        )
    where = f"built-in task {cfg.task_preset!r}"
    try:
        if cfg.eval_file:
            train = generate_problems(preset, cfg.train_size, seed=cfg.seed, template=cfg.prompt_template)
            evaluation = _file_problems("eval_file", cfg.eval_file, cfg.eval_size)
            return _generated(train, f"{where}, train problem"), evaluation
        splits = make_splits(preset, cfg.train_size, cfg.eval_size, seed=cfg.seed, template=cfg.prompt_template)
    except ConfigFieldError:
        raise
    except ValueError as exc:  # the preset's limits leave fewer distinct expressions than asked for
        raise ConfigFieldError("train_size", f"RLVRConfig.train_size / eval_size: {exc}") from None
    return _generated(splits["train"], f"{where}, train problem"), _generated(splits["eval"], f"{where}, eval problem")


def _reasoning_gym_problems(cfg: RLVRConfig) -> tuple[list[Problem], list[Problem]]:
    """A reasoning-gym task's splits (``tasks.reasoning_gym``: disjoint by construction, each problem with its entry
    and scorer); with ``eval_file``, its train split and the file's problems as the held-out set."""
    sizes = {"train_size": cfg.train_size}
    if not cfg.eval_file:
        sizes["eval_size"] = cfg.eval_size
    for name, size in sizes.items():
        if size > MAX_GENERATED_PROBLEMS:
            raise ConfigFieldError(
                name,
                f"RLVRConfig.{name} with task {cfg.task}: expected at most {MAX_GENERATED_PROBLEMS} "
                f"(MAX_GENERATED_PROBLEMS: each is drawn before the model loads), got {size}",
            )
    default = RLVRConfig.__dataclass_fields__["prompt_template"].default
    train, evaluation = reasoning_gym.generate_splits(
        cfg.task,
        cfg.task_params,
        cfg.train_size,
        None if cfg.eval_file else cfg.eval_size,
        seed=cfg.seed,
        template=reasoning_gym.prompt_format(cfg.prompt_template, default),
        key=overlap_key,
    )

    def problems(pairs, split: str) -> list[Problem]:
        return [
            Problem(prompt, str(e.entry["answer"]), {}, f"task {cfg.task}, {split} problem {i}", e)
            for i, (prompt, e) in enumerate(pairs, start=1)
        ]

    train_problems = problems(train, "train")
    if "incorrect_label" in cfg.rewards:  # its wrong label, derived from the entry (refused for non-numeric answers)
        reasoning_gym.add_wrong_labels(cfg.task, train_problems, seed=cfg.seed)
    if cfg.eval_file:
        return train_problems, _file_problems("eval_file", cfg.eval_file, cfg.eval_size)
    return train_problems, problems(evaluation, "eval")


def _generated(records: list[dict], where: str) -> list[Problem]:
    return [_problem(r, f"{where} {i}") for i, r in enumerate(records, start=1)]


def _file_problems(field: str, path: str, size: int) -> list[Problem]:
    """The first ``size`` problems of a JSONL file; the whole file is checked (``load_jsonl_numbered``)."""
    try:
        numbered = load_jsonl_numbered(path)
    except ValueError as exc:
        raise ConfigFieldError(field, f"RLVRConfig.{field}: {exc}") from None
    except OSError as exc:
        raise ConfigFieldError(field, f"RLVRConfig.{field} {path!r}: cannot read it ({exc.strerror or exc})") from None
    return [_problem(r, f"{path}, line {line}") for line, r in numbered[:size]]


_NOTICED: set[str] = set()  # the preflight loads the problems, then the run again: say each notice once


def _check_prompt_template(cfg: RLVRConfig) -> None:
    """The template is checked whatever the task; a JSONL task's prompts are used as written, so a template other than
    the default given with one is said once (stderr), not silently dropped."""
    try:
        check_template(cfg.prompt_template)
    except ValueError as exc:
        raise ConfigFieldError("prompt_template", f"RLVRConfig.prompt_template: {exc}") from None
    default = RLVRConfig.__dataclass_fields__["prompt_template"].default
    message = (
        f"data: RLVRConfig.prompt_template={cfg.prompt_template!r} applies to the built-in task only: the prompts of "
        f"{cfg.task} are used as written"
    )
    if not _is_generated(cfg.task) and cfg.prompt_template != default and message not in _NOTICED:
        _NOTICED.add(message)
        print(message, file=sys.stderr)


def _say_short_files(cfg: RLVRConfig, train: Sequence[Problem], evaluation: Sequence[Problem]) -> None:
    """One line on stderr (once per process) for each file with fewer problems than its size asks for: it is used
    whole, as "the first N lines" says, but a run of 8 problems asked for 10^9 should not pass unremarked."""
    files = [("task", cfg.task, "train_size", cfg.train_size, train)] if not _is_generated(cfg.task) else []
    files += [("eval_file", cfg.eval_file, "eval_size", cfg.eval_size, evaluation)] if cfg.eval_file else []
    for field, path, size_field, size, problems in files:
        message = (
            f"data: RLVRConfig.{size_field}={size} asks for more problems than {field} {path} has: using all "
            f"{len(problems)} of its problem lines"
        )
        if len(problems) < size and message not in _NOTICED:
            _NOTICED.add(message)
            print(message, file=sys.stderr)


def _problem(record: dict, where: str) -> Problem:
    extra = {k: v for k, v in record.items() if k not in ("prompt", "answer")}
    return Problem(prompt=str(record["prompt"]), answer=str(record["answer"]), extra=extra, where=where)


# ---- held out ---------------------------------------------------------------------------------------------------


def overlap_key(prompt: str) -> str:
    """What makes two problems the same for the held-out check: the prompt text with every run of whitespace made
    one space (the answer is not part of it: the same question with another label is still seen in training)."""
    return " ".join(prompt.split())


def check_held_out(
    train: Sequence[Problem],
    evaluation: Sequence[Problem],
    *,
    field: str = "eval_file",
    sources: tuple[str, str] = ("the training set", "the held-out set"),
) -> None:
    """Refuse held-out problems whose prompt (``overlap_key``) is also a training prompt: their pass@k would measure
    memorisation, silently. The message names how many, both ``sources`` (train, eval), two examples with where each
    is, and the way out."""
    seen = {overlap_key(p.prompt): p for p in train}
    shared = [(p, seen[overlap_key(p.prompt)]) for p in evaluation if overlap_key(p.prompt) in seen]
    if not shared:
        return
    examples = "; ".join(f"{e.where} = {t.where}: {e.prompt!r:.80}" for e, t in shared[:2])
    raise ConfigFieldError(
        field,
        f"RLVRConfig.{field}: {len(shared)} of the {len(evaluation)} held-out problems (from {sources[1]}) are also "
        f"training problems (from {sources[0]}): the same prompt once whitespace is normalised, e.g. "
        f"{examples}. Held-out scores on them would measure memorisation; use disjoint files, or pass "
        f"--allow_eval_overlap true to accept the overlap knowingly",
    )


# ---- what the model sees -------------------------------------------------------------------------------------------


def chat_prompt(tokenizer, user_message: str, system_prompt: str | None) -> str:
    """The text the model sees: its chat template with a generation prompt, or the bare message without one."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": user_message}]
        if system_prompt is not None:
            messages.insert(0, {"role": "system", "content": system_prompt})
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return user_message if system_prompt is None else f"{system_prompt}\n\n{user_message}"


def check_prompt_lengths(cfg: RLVRConfig, tokenizer, problems: Sequence[Problem], chunk: int = 1024) -> None:
    """Refuse any prompt longer than ``max_prompt_length`` tokens as the rollout would tokenize it (``chat_prompt``,
    no special tokens added), naming where the first is, its length and the limit: before any step, not at the step
    that first draws it. ``problems``: train and eval together."""
    over: list[tuple[Problem, int]] = []
    for start in range(0, len(problems), chunk):
        part = problems[start : start + chunk]
        texts = [chat_prompt(tokenizer, p.prompt, cfg.system_prompt) for p in part]
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        over += [(p, len(row)) for p, row in zip(part, ids) if len(row) > cfg.max_prompt_length]
    if over:
        p, n = over[0]
        raise ConfigFieldError(
            "max_prompt_length",
            f"RLVRConfig.max_prompt_length: {len(over)} prompt(s) are longer as the model sees them (chat template "
            f"and system prompt applied), the first {p.where}: {n} tokens, more than "
            f"max_prompt_length={cfg.max_prompt_length}; raise max_prompt_length or shorten the prompts",
        )


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
