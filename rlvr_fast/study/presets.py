"""Study presets: the base config every arm starts from, the arms, and how many seeds each arm runs.

- ``quick``: every finding of the report on a 2-core CPU in under 30 minutes with the embedded default model
  (SmolLM2-135M-Instruct) on the ``tiny`` arithmetic task: 5 steps of 4 prompts x 8 completions of at most 16 tokens
  per arm, 32 held-out problems x n=4, the arms that answer each finding, and two seeds of the correct arm (the seed
  overlap of the changed parameters).
- ``default``: sized for one GPU: every built-in arm, two seeds each, 40 steps of 16 prompts x 8 completions, 200
  held-out problems x n=16 (pass@k curves to k=16).

- ``models-quick``: the research question across models on a 2-core CPU: 2 models (SmolLM2-135M-Instruct, Gemma 3
  270M base) x 2 clean procedural tasks (built-in ``tiny`` arithmetic, reasoning-gym ``basic_arithmetic``) x the
  reward arms correct, random, inverse, incorrect_label, one seed each: 8 steps of 4 prompts x 8 completions, 32
  held-out problems x n=4.
- ``models``: the same question sized for one GPU: the two models x three tasks (adds reasoning-gym ``products``),
  40 steps of 16 x 8, n=16 samples per held-out problem, two seeds per arm; the tasks have few distinct problems (121
  tiny expressions, ~200 and 100 one-digit problems), so the cells hold out 56, 80 and 40 of them.

- ``hard-quick``: the overly-hard-samples claim on a 2-core CPU: the correct arm vs ``hard_only`` (only groups
  solved at most 1 in 8), two seeds each, 12 steps of 8 prompts x 8 completions; both are evaluated on the same
  (easy) held-out split, where a drop is damage to a skill the base model had; the report's shortcut section compares
  repeated answers, short and answer-only completions.

A preset's ``arm_overrides`` adds overrides to single arms within that preset (e.g. a longer completion budget for the
arms whose prompt asks for a stated confidence): the arm's identity stays the same, only its budget changes.

A preset with ``cells`` runs its arms once in every cell, a (model, task[, task_params, overrides]) pair: each cell has
its own base-model evaluation, runs and findings (``<study>/cells/<cell>/``), and the study's report leads with the
comparison of the reward arms across cells (``rlvr_fast.study.cells``). A preset without cells is one cell, the base
config itself, laid out as before (``<study>/arms/...``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from rlvr_fast.eval import DEFAULT_FORMAT_CLASSES

__all__ = ["PRESETS", "STUDY_FORMAT_CLASSES", "StudyCell", "StudyPreset", "get_preset", "register_preset"]

# Format classes tracked on every step's rollouts and on every evaluation (finding 6). Each is a regex searched in the
# completion; a completion may be in several classes.
STUDY_FORMAT_CLASSES: dict[str, str] = {
    "bare_number": r"(?s)\A\s*-?\d+(?:\.\d+)?\s*\.?\s*(?:<confidence>.*)?\Z",  # just the number (and a confidence)
    "equation": r"\d\s*[-+*/x]\s*\d+\s*=",  # writes the sum out: "3 + 4 = 7"
    "prose": r"[A-Za-z]{3,}(?:[ ,]+[A-Za-z']+){3,}",  # four or more words in a row
    "boxed": DEFAULT_FORMAT_CLASSES["boxed"],  # answers in \boxed{}
    "python_code": DEFAULT_FORMAT_CLASSES["python_code"],  # writes code
    "confidence_tag": DEFAULT_FORMAT_CLASSES["confidence_tag"],  # states a confidence
}


@dataclass(frozen=True)
class StudyCell:
    """One cell of a multi-cell study: the base ``model`` and training ``task`` every arm of the cell starts from,
    the task's generator parameters and any other RLVRConfig overrides of this cell (e.g. a longer completion budget
    for a task whose answers need it). ``name`` (letters, digits, ``.``, ``_``, ``-``) names its folder and its runs'
    keys (``<cell>/<arm>/seed<i>``); None derives it from the model and the task (``plan.cell_name``)."""

    model: str
    task: str
    task_params: Mapping[str, Any] = field(default_factory=dict)
    overrides: Mapping[str, Any] = field(default_factory=dict)
    name: str | None = None


@dataclass(frozen=True)
class StudyPreset:
    """``base``: RLVRConfig overrides shared by every arm; ``arms``: arm names in run order (dependencies are moved
    first by the planner); ``seeds``: seeds per arm; ``arm_seeds``: arms that run more seeds than that; ``cells``:
    the (model, task) cells the arms run in (empty: one cell, ``base`` itself)."""

    name: str
    doc: str
    base: Mapping[str, Any]
    arms: tuple[str, ...]
    seeds: int = 1
    arm_seeds: Mapping[str, int] = field(default_factory=dict)
    arm_overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    cells: tuple[StudyCell, ...] = ()
    # record the effective rank of every run's update per weight (an SVD each) and report the update-modes section
    update_rank: bool = False


PRESETS: dict[str, StudyPreset] = {}


def register_preset(preset: StudyPreset) -> StudyPreset:
    PRESETS[preset.name] = preset
    return preset


_COMMON = {
    "format_classes": STUDY_FORMAT_CLASSES,
    "eval_calibration": True,  # calibration of every arm from the same elicitation (finding 4)
}

register_preset(
    StudyPreset(
        "quick",
        "2-core CPU, embedded SmolLM2-135M-Instruct, under 30 minutes: every finding, small arms",
        {
            **_COMMON,
            "task": "arithmetic",
            "task_preset": "tiny",
            "steps": 5,
            "prompts_per_step": 4,
            "group_size": 8,
            "max_completion_length": 16,
            "eval_size": 32,
            "eval_samples": 4,
            "checkpoint_every": 3,
        },
        (
            "correct",
            "random",
            "inverse",
            "brier",
            "correct_conf",
            "psr",
            "nsr",
            "filter_all_equal",
            "solve_floor",
            "sparse_reuse",
        ),
        seeds=1,
        arm_seeds={"correct": 2},
        arm_overrides={"brier": {"max_completion_length": 24}, "correct_conf": {"max_completion_length": 24}},
    )
)

register_preset(
    StudyPreset(
        "default",
        "one GPU: every built-in arm, two seeds each, 40 steps of 16 x 8 completions, 200 problems x n=16",
        {
            **_COMMON,
            "task": "arithmetic",
            # 'easy' (1-2 additions / subtractions up to 20): 'tiny' has 121 distinct expressions, fewer than the
            # 640 + 200 problems asked for here (refused by the problem loader)
            "task_preset": "easy",
            "steps": 40,
            "prompts_per_step": 16,
            "group_size": 8,
            "max_completion_length": 32,
            "train_size": 640,
            "eval_size": 200,
            "eval_samples": 16,
            "checkpoint_every": 10,
        },
        (
            "correct",
            "format",
            "random",
            "inverse",
            "incorrect_label",
            "brier",
            "correct_conf",
            "psr",
            "nsr",
            "w_reinforce",
            "positive_only",
            "negative_only",
            "filter_all_equal",
            "solve_floor",
            "hard_only",
            "sparse_reuse",
        ),
        seeds=2,
        arm_overrides={"brier": {"max_completion_length": 48}, "correct_conf": {"max_completion_length": 48}},
    )
)


# ---- the research question across models: which rewards help which model, on clean procedural tasks ----------------

REWARD_ARMS = ("correct", "random", "inverse", "incorrect_label")
# reasoning-gym generators the default model partly solves (docs/training.md, "Tasks from reasoning-gym")
BASIC_ARITHMETIC_PARAMS = {
    "min_terms": 2,
    "max_terms": 2,
    "min_digits": 1,
    "max_digits": 1,
    "operators": ["+", "-"],
    "allow_parentheses": False,
}
PRODUCTS_PARAMS = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}
MODELS = ("smollm2-135m-instruct", "gemma3-270m")  # instruction-tuned vs base (docs/training.md, "Shipped models")


TRAJECTORY_ARMS = ("correct", "traj_replay", "traj_lessons", "traj_both", "traj_uniform", "traj_random_lesson")


def _cells(tasks: list[tuple[str, Mapping[str, Any], Mapping[str, Any]]]) -> tuple[StudyCell, ...]:
    """Every model x every (task, task_params, overrides), model-major (each model is loaded once)."""
    return tuple(StudyCell(m, t, params, ov) for m in MODELS for t, params, ov in tasks)


register_preset(
    StudyPreset(
        "models-quick",
        "2-core CPU: SmolLM2-135M-Instruct and Gemma 3 270M base x {tiny arithmetic, reasoning-gym basic_arithmetic} "
        "x {correct, random, inverse, incorrect_label}, one seed, 8 steps of 4 x 8, 32 held-out problems x n=4",
        {
            "format_classes": STUDY_FORMAT_CLASSES,
            "task_preset": "tiny",
            # sized from single runs on the 2-core CPU, idle: SmolLM2 ~4 s per step, Gemma ~6-7 s per step plus ~75 s
            # per run for its evaluation and the update record of 268M weights: an estimated ~26 minutes for 16 runs
            "steps": 8,
            "prompts_per_step": 4,
            "group_size": 8,
            "max_completion_length": 16,
            "train_size": 64,
            "eval_size": 32,
            "eval_samples": 4,
            "checkpoint_every": 0,
        },
        REWARD_ARMS,
        cells=_cells(
            [
                ("arithmetic", {}, {}),
                ("reasoning_gym:basic_arithmetic", BASIC_ARITHMETIC_PARAMS, {"max_completion_length": 24}),
            ]
        ),
    )
)

register_preset(
    StudyPreset(
        "models",
        "one GPU: the two shipped models x {tiny arithmetic, basic_arithmetic, products} x the four reward arms, "
        "two seeds, 40 steps of 16 x 8, held-out 56 / 80 / 40 problems x n=16",
        {
            "format_classes": STUDY_FORMAT_CLASSES,
            "task_preset": "tiny",
            "steps": 40,
            "prompts_per_step": 16,
            "group_size": 8,
            "max_completion_length": 32,
            "eval_samples": 16,
            "checkpoint_every": 10,
        },
        REWARD_ARMS,
        seeds=2,
        cells=_cells(
            [
                # the tiny preset (121 expressions) and the one-digit generators (~200 for basic_arithmetic, 100 for
                # products) have few distinct problems: the held-out and training splits share them out, and n=16
                # samples per problem narrow each problem's estimate
                ("arithmetic", {}, {"train_size": 64, "eval_size": 56}),
                (
                    "reasoning_gym:basic_arithmetic",
                    BASIC_ARITHMETIC_PARAMS,
                    {"max_completion_length": 64, "train_size": 100, "eval_size": 80},
                ),
                (
                    "reasoning_gym:products",
                    PRODUCTS_PARAMS,
                    {"max_completion_length": 48, "train_size": 50, "eval_size": 40},
                ),
            ]
        ),
    )
)


register_preset(
    StudyPreset(
        "hard-quick",
        "2-core CPU: the overly-hard-samples claim: correct vs hard_only (groups solved at most 1 in 8), two seeds "
        "each, 12 steps of 8 x 8 on the tiny arithmetic task, 56 held-out problems x n=4 (the easy split every arm is "
        "evaluated on)",
        {
            **_COMMON,  # eval_calibration on: the shortcut signatures read the held-out completions' answers
            "task": "arithmetic",
            "task_preset": "tiny",
            # the hard arm keeps only the groups solved at most once in 8: 8 prompts per step so that a step keeps
            # some (SmolLM2 solves ~30% of the tiny problems at temperature 1), 12 steps so that the kept groups add
            # up to more than the quick preset's 5-step arm saw
            "steps": 12,
            "prompts_per_step": 8,
            "group_size": 8,
            "max_completion_length": 16,
            # 121 distinct tiny expressions: 64 train + 56 held out
            "train_size": 64,
            "eval_size": 56,
            "eval_samples": 4,
            "checkpoint_every": 4,
        },
        ("correct", "hard_only"),
        seeds=2,
    )
)


register_preset(
    StudyPreset(
        "trajectories",
        "one GPU: all-wrong groups as demonstrations or lessons (trainer/trajectories) against GRPO and two controls, "
        "on the built-in task's medium split where many groups are all wrong, at equal generation budget (a lesson "
        "samples G more completions per processed group, so the lesson arms train fewer steps)",
        {
            **_COMMON,
            "task": "arithmetic",
            "task_preset": "medium",
            "steps": 40,
            "rollout_budget": 40 * 16 * 8,  # what the off arm samples in its 40 steps
            "prompts_per_step": 16,
            "group_size": 8,
            "max_completion_length": 64,
            "max_prompt_length": 384,  # the lesson goes into the prompt
            "train_size": 64,  # every prompt comes back every 4 steps: the store gets used
            "eval_size": 200,
            "eval_samples": 16,
            "checkpoint_every": 10,
        },
        TRAJECTORY_ARMS,
        seeds=2,
    )
)

register_preset(
    StudyPreset(
        "trajectories-quick",
        "2-core CPU: the trajectories preset's six arms on the built-in task's easy split (SmolLM2 leaves many groups "
        "all wrong there), one seed, 12 steps of 8 x 8 at equal generation budget, 48 held-out problems x n=4",
        {
            **_COMMON,
            "eval_calibration": False,
            "task": "arithmetic",
            "task_preset": "easy",
            "steps": 12,
            "rollout_budget": 12 * 8 * 8,
            "prompts_per_step": 8,
            "group_size": 8,
            "max_completion_length": 16,
            "max_prompt_length": 256,
            "train_size": 32,  # every prompt comes back every 4 steps: the store gets used
            "eval_size": 48,
            "eval_samples": 4,
            "checkpoint_every": 0,
        },
        TRAJECTORY_ARMS,
    )
)


register_preset(
    StudyPreset(
        "update-modes-quick",
        "2-core CPU: full AdamW vs SparseAdamW (random and gradient-saliency masks at 10% and 30%) vs LoRA at the rank "
        "whose optimizer state equals the 10% mask's: trained entries, optimizer-state bytes, peak memory, step "
        "time, update sparsity and the effective rank of each update; 8 steps of 4 x 8, 32 held-out problems x n=4",
        {
            **_COMMON,
            "eval_calibration": False,  # no calibration arm here
            "task": "arithmetic",
            "task_preset": "tiny",
            "steps": 8,
            "prompts_per_step": 4,
            "group_size": 8,
            "max_completion_length": 16,
            "train_size": 64,
            "eval_size": 32,
            "eval_samples": 4,
            "checkpoint_every": 0,
        },
        ("correct", "sparse_random10", "sparse_random30", "sparse_grad10", "sparse_grad30", "lora_r66"),
        update_rank=True,
    )
)


def get_preset(name: str) -> StudyPreset:
    if name not in PRESETS:
        raise ValueError(f"unknown study preset {name!r}; known presets: {sorted(PRESETS)}")
    return PRESETS[name]
