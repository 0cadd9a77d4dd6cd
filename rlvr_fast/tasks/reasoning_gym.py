"""reasoning-gym as a task source: ``task: reasoning_gym:<dataset>`` draws problems from one of reasoning-gym's
procedural generators (PyPI ``reasoning-gym``; ``pip install 'rlvr_fast[tasks]'``), with the generator's parameters in
``task_params``, and keeps each generator entry with the dataset that made it, so the ``task_score`` reward mode can
grade a completion with the dataset's own ``score_answer``.

Splits: the eval problems come from one seeded generator, the train problems from another (seeds derived from the
run's seed and the split name, ``derived_seed``); the eval split is drawn first and the train split skips every prompt
already in it, and repeats within itself (``overlap_key``: reasoning-gym items are functions of seed + index, and small
generators repeat questions), so the two are disjoint by construction and the held-out check of ``load_problems``
confirms it. The same seed gives the same problems in every process.

The prompt is the generator's question inside the built-in task's convention: the default template asks for the answer
in ``\\boxed{}``, the first thing ``rewards.extract.extract_answer`` looks for; a ``prompt_template`` other than the
config default is used instead, with the question as its ``{expression}``.

Refused with a ``ConfigFieldError`` before the model loads: reasoning-gym not installed (the pip command), an unknown
dataset (the closest names), a dataset without a label in its entries (``answer`` None: ``rubiks_cube``,
``propositional_logic``, ...; the verifier compares with it), ``task_params`` the dataset's config does not have (its
fields), sets the trainer owns (``seed``, ``size``) or rejects (its own validation; an int field given a bool, a
string or 2.5), a generator that fails or has fewer distinct problems than asked for, and the ``task_score`` reward
with a task that is not a reasoning-gym one (``check_reward_task``).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from rlvr_fast.tasks.prompts import check_template
from rlvr_fast.trainer.rollout.seeds import derived_seed
from rlvr_fast.trainer.schema import ConfigFieldError

__all__ = [
    "DEFAULT_TEMPLATE",
    "INSTALL_HINT",
    "PREFIX",
    "WRONG_LABEL_OFFSETS",
    "GymEntry",
    "add_wrong_labels",
    "check_reward_task",
    "dataset_name",
    "generate_splits",
    "is_reasoning_gym_task",
    "wrong_label",
]

PREFIX = "reasoning_gym:"
INSTALL_HINT = "pip install 'reasoning-gym==0.1.25' (or pip install 'rlvr_fast[tasks]')"
# The built-in task's answer convention (tasks/prompts.py "boxed"): the extractor's first choice, and one that works
# for answers that are not numbers (words, lists, grids), where "the last number" of the built-in default would not.
DEFAULT_TEMPLATE = "{expression}\nPut your final answer in \\boxed{{}}."
OWNED_PARAMS = {"seed": "the run's seed", "size": "train_size / eval_size"}  # set by the trainer, not task_params
SCORED_MODES = ("task_score",)  # reward modes that need a task whose problems carry their own scorer
_CLOSEST = 5  # names suggested for an unknown dataset (reasoning-gym has ~100)


def is_reasoning_gym_task(task: str) -> bool:
    return task.startswith(PREFIX)


def dataset_name(task: str) -> str:
    """``"reasoning_gym:basic_arithmetic"`` -> ``"basic_arithmetic"``."""
    return task[len(PREFIX) :]


@dataclass(frozen=True)
class GymEntry:
    """One generated problem: the generator's entry (``question``, ``answer``, ``metadata``) and the ``score_answer``
    of the dataset instance that generated it (some scorers read that instance's config, so it must be the same one)."""

    dataset: str
    entry: dict
    scorer: Callable[[str | None, dict], float] | None = field(repr=False, compare=False)

    def score(self, answer: str | None) -> float:
        """The dataset's score of ``answer`` (the extracted final answer, None without one), a finite float.

        Model output is untrusted and the scorers are third-party parsers: only a reviewed scorer runs
        (``scorer_is_reviewed``; None here otherwise, refused). A scorer that raises, or returns something other than
        a finite number, scores 0, the value of "no answer", so no completion can stop a run."""
        if self.scorer is None:
            raise ValueError(
                f"reasoning_gym:{self.dataset}'s own scorer was not reviewed for running model output as code "
                f"(scorer_is_reviewed); grade it with the correct reward mode"
            )
        try:
            value = self.scorer(answer, self.entry)
        except Exception:  # any failure on a model's answer is a wrong answer, not a crash
            return 0.0
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return 0.0
        return float(value)


# ---- the registry --------------------------------------------------------------------------------------------------


def _registry() -> Mapping[str, tuple[type, type]]:
    """reasoning-gym's datasets, name -> (dataset class, config class); refused with the pip command when the
    package (or one of its dependencies) is missing."""
    try:
        from reasoning_gym.factory import DATASETS
    except ImportError as exc:
        name = getattr(exc, "name", None) or ""
        missing = f" (its dependency {name} is missing)" if name and not name.startswith("reasoning_gym") else ""
        raise ConfigFieldError(
            "task",
            f"RLVRConfig.task: a reasoning_gym:<dataset> task needs the reasoning-gym package{missing}: expected it "
            f"installed, got ImportError ({exc}); install it with {INSTALL_HINT}",
        ) from None
    return DATASETS


def _dataset_classes(task: str) -> tuple[type, type]:
    registry = _registry()
    name = dataset_name(task)
    if name not in registry:
        names = sorted(registry)
        close = difflib.get_close_matches(name, names, n=_CLOSEST, cutoff=0.5) or names[:_CLOSEST]
        raise ConfigFieldError(
            "task",
            f"RLVRConfig.task: expected reasoning_gym:<dataset> with a dataset reasoning-gym registers, got {task!r}; "
            f"closest: {close} ({len(names)} in all: sorted(reasoning_gym.factory.DATASETS))",
        )
    return registry[name]


# ---- parameters ------------------------------------------------------------------------------------------------------


def _int_fields(config_cls: type) -> set[str]:
    """Fields annotated ``int`` or ``int | None``: a CLI ``key=3`` arrives as 3.0 (``_parse_mapping`` reads numbers
    as floats), and the generators pass these to ``random.randint``, which refuses floats."""
    try:
        hints = typing.get_type_hints(config_cls)
    except Exception:  # an annotation that does not resolve: fall back to the defaults' types
        hints = {}
    out = set()
    for f in dataclasses.fields(config_cls):
        hint = hints.get(f.name)
        args = set(typing.get_args(hint)) - {type(None)}
        if hint is int or args == {int} or (hint is None and type(f.default) is int):
            out.add(f.name)
    return out


def _whole(value: Any) -> bool:
    """An int, or a float with no fractional part (a CLI number); not a bool, a string or 2.5."""
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and value.is_integer())


def _settable(config_cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(config_cls) if f.name not in OWNED_PARAMS]


def check_params(task: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` as the dataset's config takes them (integral floats of int fields made ints), or ConfigFieldError
    naming the unknown / trainer-owned keys and the config's fields; values are checked by ``make_dataset``."""
    _, config_cls = _dataset_classes(task)
    fields = _settable(config_cls)
    owned = sorted(k for k in params if k in OWNED_PARAMS)
    if owned:
        why = "; ".join(f"{k}: set from {OWNED_PARAMS[k]}" for k in owned)
        raise ConfigFieldError(
            "task_params",
            f"RLVRConfig.task_params for {task}: expected keys from {fields}, got {owned}, which the trainer sets "
            f"({why})",
        )
    unknown = sorted(k for k in params if k not in fields)
    if unknown:
        raise ConfigFieldError(
            "task_params",
            f"RLVRConfig.task_params for {task}: unknown parameter(s) {unknown}; expected keys from "
            f"{config_cls.__name__}'s fields {fields}",
        )
    ints = _int_fields(config_cls)
    return {
        k: int(v) if k in ints and isinstance(v, float) and v.is_integer() else v  # CLI numbers arrive as floats
        for k, v in params.items()
    }


def make_dataset(task: str, params: Mapping[str, Any], seed: int, size: int):
    """The dataset instance of ``task`` with ``params`` (``check_params``), a fixed ``seed`` and virtual ``size``;
    a value the config refuses (its ``validate`` asserts, or a wrong type) is a ConfigFieldError naming the values."""
    dataset_cls, config_cls = _dataset_classes(task)
    values = check_params(task, params)
    ints = _int_fields(config_cls)
    not_whole = {k: v for k, v in values.items() if k in ints and v is not None and not _whole(v)}
    if not_whole:  # True would pass as 1, and 2.5 fail inside the generator, far from the parameter
        raise ConfigFieldError(
            "task_params",
            f"RLVRConfig.task_params for {task}: expected whole numbers for {config_cls.__name__}'s int field(s) "
            f"{sorted(not_whole)}, got {not_whole!r:.200}",
        )
    try:
        config = config_cls(**values, seed=seed, size=size)
        if callable(getattr(config, "validate", None)):
            config.validate()
        return dataset_cls(config=config)
    except (AssertionError, ValueError, TypeError) as exc:
        raise ConfigFieldError(
            "task_params",
            f"RLVRConfig.task_params for {task}: expected values {config_cls.__name__} accepts (fields: "
            f"{_settable(config_cls)}), got {dict(params)!r:.300}: {exc or type(exc).__name__}",
        ) from None


# ---- splits ----------------------------------------------------------------------------------------------------------


def _draw(
    task: str,
    params: Mapping[str, Any],
    n: int,
    *,
    seed: int,
    split: str,
    template: str,
    exclude: set[str],
    key: Callable[[str], str],
) -> list[tuple[str, GymEntry]]:
    """``n`` (prompt, entry) pairs of ``split`` whose ``key(prompt)`` is not in ``exclude`` nor repeated; adds their
    keys to ``exclude``. Draws at most ``20 n + 1000`` items (as ``tasks.splits.generate_problems``)."""
    budget = 20 * n + 1000
    split_seed = derived_seed(seed, "reasoning_gym", dataset_name(task), split)
    dataset = make_dataset(task, params, split_seed, budget)
    out: list[tuple[str, GymEntry]] = []
    for idx in range(budget):
        if len(out) == n:
            break
        try:
            item = dataset[idx]
            question, answer = item["question"], item["answer"]
        except Exception as exc:  # a third-party generator failing on these parameters
            raise ConfigFieldError(
                "task_params",
                f"RLVRConfig.task_params for {task}: expected parameters its generator can draw from, got "
                f"{dict(params)!r:.300}: item {idx} of the {split} split failed ({type(exc).__name__}: {exc})",
            ) from None
        if answer is None:  # scored by checking the answer (a valid colouring, a solving move list), not by a label
            raise ConfigFieldError(
                "task",
                f"RLVRConfig.task: expected a dataset whose entries carry the answer, got {task!r}, whose answer is "
                f"None (item {idx}): the verifier (the correct reward, held-out pass@k) compares with it; pick "
                f"another dataset",
            )
        prompt = template.format(expression=question)
        if key(prompt) in exclude:
            continue
        exclude.add(key(prompt))
        entry = {"question": question, "answer": answer, "metadata": item.get("metadata", {})}
        scorer = dataset.score_answer if scorer_is_reviewed(task) else None
        out.append((prompt, GymEntry(dataset_name(task), entry, scorer)))
    if len(out) < n:
        field_name = "eval_size" if split == "eval" else "train_size"
        raise ConfigFieldError(
            field_name,
            f"RLVRConfig.{field_name}={n} with task {task}: expected at most as many distinct problems as the "
            f"generator gives, got only {len(out)} new ones in {budget} draws; widen task_params or ask for fewer",
        )
    return out


def prompt_format(prompt_template: str, default: str) -> str:
    """The format string of the prompts: ``DEFAULT_TEMPLATE`` when ``prompt_template`` is the config's default (the
    built-in task's wording, which asks for "just the number"), else ``prompt_template`` (checked)."""
    return check_template(DEFAULT_TEMPLATE if prompt_template == default else prompt_template)


def generate_splits(
    task: str,
    params: Mapping[str, Any],
    train_size: int,
    eval_size: int | None,
    *,
    seed: int,
    template: str,
    key: Callable[[str], str],
) -> tuple[list[tuple[str, GymEntry]], list[tuple[str, GymEntry]]]:
    """(train, eval) lists of (prompt, entry), disjoint by ``key`` (see the module docstring); ``eval_size`` None: no
    eval split (the held-out problems come from a file). ``template``: a format string with ``{expression}``."""
    seen: set[str] = set()
    evaluation = (
        _draw(task, params, eval_size, seed=seed, split="eval", template=template, exclude=seen, key=key)
        if eval_size is not None
        else []
    )
    train = _draw(task, params, train_size, seed=seed, split="train", template=template, exclude=seen, key=key)
    return train, evaluation


# ---- rewards ---------------------------------------------------------------------------------------------------------


# Datasets whose own score_answer override was read and parses the answer without running it: products and chain_sum
# compare Decimals (reasoning_gym.utils.compute_decimal_reward). Others override it with eval, sympy's parse_expr
# (countdown, bitwise_arithmetic, the integration and polynomial tasks, ...) or were not read; a dataset that keeps
# ProceduralDataset.score_answer (string comparison) is safe as it is.
REVIEWED_SCORERS = frozenset({"products", "chain_sum"})


def scorer_is_reviewed(task: str) -> bool:
    """Whether ``task``'s own scorer may see model output: the base string comparison, or a reviewed override."""
    from reasoning_gym.dataset import ProceduralDataset

    dataset_cls, _ = _dataset_classes(task)
    inherited = getattr(dataset_cls, "score_answer", None) is ProceduralDataset.score_answer
    return inherited or dataset_name(task) in REVIEWED_SCORERS


def check_reward_task(task: str, rewards: Mapping[str, float]) -> None:
    """Refuse a reward mode that grades with the task's own scorer (``SCORED_MODES``) on a task without one (its
    problems carry no entries to score), or on a dataset whose scorer was not reviewed: some reasoning-gym scorers
    ``eval`` the model's answer or parse it with sympy's ``parse_expr`` (which evaluates), running model output as
    code in the training process."""
    scored = sorted(m for m in rewards if m in SCORED_MODES)
    if scored and not is_reasoning_gym_task(task):
        raise ConfigFieldError(
            "rewards",
            f"RLVRConfig.rewards: reward mode(s) {scored} grade with the task's own scorer: expected a task "
            f"{PREFIX}<dataset>, got task={task!r}; use 'correct' with this task",
        )
    if scored and not scorer_is_reviewed(task):
        dataset_cls, _ = _dataset_classes(task)
        raise ConfigFieldError(
            "rewards",
            f"RLVRConfig.rewards: reward mode(s) {scored} would run {dataset_cls.__name__}.score_answer on model "
            f"output, and that scorer was not reviewed (some reasoning-gym scorers eval the answer or parse it with "
            f"sympy's parse_expr, running it as code): expected a dataset that keeps the base string comparison or "
            f"one of {sorted(REVIEWED_SCORERS)}, got {task!r}; grade it with 'correct' instead",
        )


# ---- wrong labels (the incorrect_label reward) -----------------------------------------------------------------------

WRONG_LABEL_OFFSETS = tuple(d for d in range(-10, 11) if d != 0)  # as the built-in task's incorrect_answer


def _numeric(answer: Any) -> Decimal | None:
    """``answer`` as a finite Decimal ("12", "-3", "4.50", " 7 "), or None when it is not one number."""
    if isinstance(answer, bool):
        return None
    try:
        value = Decimal(str(answer).strip())
    except (InvalidOperation, ValueError):
        return None
    return value if value.is_finite() else None


def wrong_label(task: str, question: str, answer: Any, *, seed: int, where: str = "") -> str:
    """A deterministic wrong label for one problem of ``task``: its numeric ``answer`` plus a nonzero integer offset in
    [-10, 10], chosen by a hash of (seed, dataset, question), so the same problem gets the same label in every process
    and the offset never leaves the answer right. Decimal arithmetic keeps the answer's own digits ("4.50" + 3 ->
    "7.50").

    Raises:
        ConfigFieldError (field ``rewards``): the answer is not a number (a word, a list, a grid): no offset makes a
            wrong label of it, so the ``incorrect_label`` reward is refused for this dataset, by name.
    """
    value = _numeric(answer)
    if value is None:
        at = f" ({where})" if where else ""
        raise ConfigFieldError(
            "rewards",
            f"RLVRConfig.rewards: reward mode 'incorrect_label' on {task} derives each problem's wrong label as its "
            f"answer plus a nonzero offset: expected numeric answers, got {str(answer)!r:.80}{at}; {task} is refused "
            f"for this reward (use a dataset with numeric answers: basic_arithmetic, products, chain_sum, ...)",
        )
    draw = derived_seed(seed, "incorrect_label", dataset_name(task), question)
    offset = WRONG_LABEL_OFFSETS[draw % len(WRONG_LABEL_OFFSETS)]
    return str(value + offset)


def add_wrong_labels(task: str, problems: list, *, seed: int) -> list:
    """Set ``extra["incorrect_answer"]`` (what the ``incorrect_label`` reward reads) on every problem of a reasoning-gym
    ``task`` that has none, from its entry (``wrong_label``); returns ``problems``. Idempotent: a label the data
    already carries is kept."""
    for p in problems:
        if "incorrect_answer" not in p.extra:
            entry = p.entry.entry if p.entry is not None else {"question": p.prompt, "answer": p.answer}
            p.extra["incorrect_answer"] = wrong_label(
                task, str(entry["question"]), entry["answer"], seed=seed, where=p.where
            )
    return problems
