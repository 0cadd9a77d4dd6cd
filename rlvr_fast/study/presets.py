"""Study presets: the base config every arm starts from, the arms, and how many seeds each arm runs.

- ``quick``: every finding of the report on a 2-core CPU in under 30 minutes with the embedded default model
  (SmolLM2-135M-Instruct) on the ``tiny`` arithmetic task: 5 steps of 4 prompts x 8 completions of at most 16 tokens
  per arm, 32 held-out problems x n=4, the arms that answer each finding, and two seeds of the correct arm (the seed
  overlap of the changed parameters).
- ``default``: sized for one GPU: every built-in arm, two seeds each, 40 steps of 16 prompts x 8 completions, 200
  held-out problems x n=16 (pass@k curves to k=16).

A preset's ``arm_overrides`` adds overrides to single arms within that preset (e.g. a longer completion budget for the
arms whose prompt asks for a stated confidence): the arm's identity stays the same, only its budget changes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from rlvr_fast.eval import DEFAULT_FORMAT_CLASSES

__all__ = ["PRESETS", "STUDY_FORMAT_CLASSES", "StudyPreset", "get_preset", "register_preset"]

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
class StudyPreset:
    """``base``: RLVRConfig overrides shared by every arm; ``arms``: arm names in run order (dependencies are moved
    first by the planner); ``seeds``: seeds per arm; ``arm_seeds``: arms that run more seeds than that."""

    name: str
    doc: str
    base: Mapping[str, Any]
    arms: tuple[str, ...]
    seeds: int = 1
    arm_seeds: Mapping[str, int] = field(default_factory=dict)
    arm_overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


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
            "task_preset": "tiny",
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
            "sparse_reuse",
        ),
        seeds=2,
        arm_overrides={"brier": {"max_completion_length": 48}, "correct_conf": {"max_completion_length": 48}},
    )
)


def get_preset(name: str) -> StudyPreset:
    if name not in PRESETS:
        raise ValueError(f"unknown study preset {name!r}; known presets: {sorted(PRESETS)}")
    return PRESETS[name]
