"""The arms of a study: named RLVRConfig overrides, one registry (built-in arms plus the user's from YAML).

An arm is a change to the base run that answers one question of the research context (docs/design.md, "Research
questions"; docs/design.md §§1, 4-6). Every arm starts from the same base model and base config; only its overrides
differ.

| group       | arms                                                                 | question                  |
|-------------|----------------------------------------------------------------------|---------------------------|
| reward      | correct, format, random (gamma 0.5), inverse, incorrect_label, brier | does the reward matter?   |
| calibration | correct_conf (correct reward, brier's confidence-eliciting prompt)   | RLCR's RLVR baseline      |
| sample      | psr, nsr, w_reinforce (lambda 0.1), positive_only, negative_only     | which samples teach?      |
| difficulty  | filter_all_equal, solve_floor (min_solve_rate 0.25), hard_only       | do hard groups hurt?      |
| optimizer   | sparse_reuse (SparseAdamW on the entries the correct arm changed)    | is the subnetwork enough? |

``correct`` is the baseline of every group: GRPO on all samples (alias ``all``), no filter (``no_filter``), dense AdamW
(``dense``). Users add arms with a YAML file mapping a name to its overrides (``{name: {lr: 1e-5}}``) or to
``{overrides: {...}, doc: ..., group: ..., mask_from: ...}``; a user arm with a built-in name replaces it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ALIASES",
    "ARMS",
    "BASELINE_ARM",
    "CONFIDENCE_PROMPT",
    "GROUPS",
    "STUDY_OWNED_FIELDS",
    "Arm",
    "load_arms_file",
    "register_arm",
    "resolve_arm_names",
]

GROUPS = ("reward", "calibration", "sample", "difficulty", "optimizer", "user")
BASELINE_ARM = "correct"
# Fields the study sets per run (the seed loop, the run folder, resumption): an arm may not override them.
STUDY_OWNED_FIELDS = ("seed", "output_dir", "resume")

# The brier arm's user message: the default prompt plus a request for a stated confidence (RLCR, Damani et al. 2025,
# arXiv:2507.16806). The answer extractor removes <confidence> blocks before it looks for the number.
CONFIDENCE_PROMPT = (
    "What is {expression}? Answer with the number followed by your confidence that it is right, like this: "
    "12 <confidence>0.8</confidence>"
)


@dataclass(frozen=True)
class Arm:
    """One arm: ``overrides`` (RLVRConfig field -> value) applied on top of the study's base config.

    ``mask_from``: for a sparse-reuse arm, the arm whose update gives the SparseAdamW mask (the entries that arm
    changed, compared in bf16 as Mukherjee et al. 2025, arXiv:2505.11711); the study runs that arm first and points
    ``mask_source`` at its mask file.
    """

    name: str
    overrides: Mapping[str, Any]
    doc: str
    group: str = "user"
    mask_from: str | None = None
    source: str = "built-in"


ARMS: dict[str, Arm] = {}
ALIASES: dict[str, str] = {"all": BASELINE_ARM, "grpo": BASELINE_ARM, "no_filter": BASELINE_ARM, "dense": BASELINE_ARM}


def register_arm(arm: Arm) -> Arm:
    """Add (or replace) an arm in the registry."""
    if arm.group not in GROUPS:
        raise ValueError(f"arm {arm.name!r}: group must be one of {list(GROUPS)}, got {arm.group!r}")
    if arm.name in ALIASES:
        raise ValueError(f"arm {arm.name!r}: the name is an alias of {ALIASES[arm.name]!r}; pick another name")
    owned = sorted(set(arm.overrides) & set(STUDY_OWNED_FIELDS))
    if owned:
        raise ValueError(f"arm {arm.name!r} overrides {owned}, which the study sets itself (one run per seed)")
    ARMS[arm.name] = arm
    return arm


_CORRECT = {"rewards": {"correct": 1.0}}
for _arm in (
    # ---- reward arms (Shao et al. 2025, arXiv:2506.10947; Wu et al. 2025, arXiv:2507.10532; Damani et al. 2025)
    Arm(
        "correct",
        _CORRECT,
        "the verifier's 0/1 verdict; the baseline of every group (GRPO, all samples, dense)",
        "reward",
    ),
    Arm(
        "format",
        {"rewards": {"format": 1.0}},
        "1 for a non-empty \\boxed{}, right or wrong (Shao et al. 2025)",
        "reward",
    ),
    Arm(
        "random",
        {"rewards": {"random": 1.0}, "reward_params": {"random": {"gamma": 0.5}}},
        "Bernoulli(0.5) whatever the completion says (Shao et al. 2025)",
        "reward",
    ),
    Arm("inverse", {"rewards": {"inverse": 1.0}}, "1 - verdict: rewards wrong answers (Wu et al. 2025)", "reward"),
    Arm(
        "incorrect_label",
        {"rewards": {"incorrect_label": 1.0}},
        "the verdict against a wrong label (true answer + a nonzero offset; Shao et al. 2025)",
        "reward",
    ),
    Arm(
        "brier",
        {"rewards": {"brier": 1.0}, "prompt_template": CONFIDENCE_PROMPT},
        "c - (q - c)^2 with a stated confidence q (RLCR, Damani et al. 2025, arXiv:2507.16806)",
        "reward",
    ),
    Arm(
        "correct_conf",
        {"rewards": {"correct": 1.0}, "prompt_template": CONFIDENCE_PROMPT},
        "the verdict, asked for a confidence as brier is but not rewarded for it: RLCR's RLVR baseline",
        "calibration",
    ),
    # ---- sample arms (Zhu et al. 2025, arXiv:2506.01347)
    Arm(
        "psr",
        {**_CORRECT, "estimator": "psr"},
        "positive sample reinforcement: A = 1 on right answers, 0 else",
        "sample",
    ),
    Arm(
        "nsr",
        {**_CORRECT, "estimator": "nsr"},
        "negative sample reinforcement: A = -1 on wrong answers, 0 else",
        "sample",
    ),
    Arm(
        "w_reinforce",
        {**_CORRECT, "estimator": "w_reinforce", "lam": 0.1},
        "A = 0.1 on right answers, -1 on wrong ones (Zhu et al.'s weighted REINFORCE)",
        "sample",
    ),
    Arm(
        "positive_only",
        {**_CORRECT, "estimator": "grpo", "sample_mode": "positive_only"},
        "GRPO advantages clipped at 0 from below: only the better-than-average samples",
        "sample",
    ),
    Arm(
        "negative_only",
        {**_CORRECT, "estimator": "grpo", "sample_mode": "negative_only"},
        "GRPO advantages clipped at 0 from above: only the worse-than-average samples",
        "sample",
    ),
    # ---- difficulty arms (docs/design.md §6)
    Arm(
        "filter_all_equal",
        {**_CORRECT, "filter_all_equal": True},
        "drop groups whose rewards are all equal (DAPO dynamic sampling, Yu et al. 2025)",
        "difficulty",
    ),
    Arm(
        "solve_floor",
        {**_CORRECT, "min_solve_rate": 0.25},
        "drop groups solved by fewer than 25% of their samples (lone lucky successes)",
        "difficulty",
    ),
    Arm(
        "hard_only",
        {**_CORRECT, "max_solve_rate": 0.125},
        "keep only groups solved by at most 1 in 8 samples: train on what the model almost never solves",
        "difficulty",
    ),
    # ---- optimizer arm (Mukherjee et al. 2025, arXiv:2505.11711)
    Arm(
        "sparse_reuse",
        {**_CORRECT, "optimizer": "sparse_adamw"},
        "SparseAdamW on the entries the correct arm's update changed (bf16 comparison): subnetwork reuse",
        "optimizer",
        mask_from=BASELINE_ARM,
    ),
):
    register_arm(_arm)


def resolve_arm_names(names: list[str], registry: Mapping[str, Arm] | None = None) -> list[str]:
    """Registry names for ``names`` (aliases resolved, duplicates dropped, order kept); unknown names raise."""
    registry = ARMS if registry is None else registry
    out: list[str] = []
    for raw in names:
        name = ALIASES.get(raw.strip(), raw.strip())
        if name not in registry:
            raise ValueError(
                f"unknown arm {raw!r}; known arms: {sorted(registry)}, aliases: {ALIASES} (add arms with --arms-file)"
            )
        if name not in out:
            out.append(name)
    return out


def load_arms_file(path: str) -> dict[str, Arm]:
    """Arms from a YAML file: ``name: {field: value, ...}`` or ``name: {overrides: {...}, doc: ..., group: ...,
    mask_from: ...}``. Returns them without registering (the caller merges them into a copy of the registry)."""
    import yaml

    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"--arms-file {path}: expected a mapping arm name -> overrides, got {type(data).__name__}")
    arms: dict[str, Arm] = {}
    for name, spec in data.items():
        if not isinstance(name, str) or not name or "/" in name:
            raise ValueError(f"--arms-file {path}: arm names must be non-empty strings without '/', got {name!r}")
        if not isinstance(spec, dict):
            raise ValueError(f"--arms-file {path}: arm {name!r} must map to a mapping of overrides, got {spec!r}")
        if "overrides" in spec:
            extra = sorted(set(spec) - {"overrides", "doc", "group", "mask_from"})
            if extra:
                raise ValueError(
                    f"--arms-file {path}: arm {name!r} has unknown keys {extra} next to 'overrides' "
                    f"(allowed: doc, group, mask_from)"
                )
            overrides = spec["overrides"] or {}
            if not isinstance(overrides, dict):
                raise ValueError(f"--arms-file {path}: arm {name!r}: 'overrides' must be a mapping, got {overrides!r}")
            arm = Arm(
                name,
                overrides,
                str(spec.get("doc", f"user arm from {path}")),
                spec.get("group", "user"),
                spec.get("mask_from"),
                source=path,
            )
        else:
            arm = Arm(name, spec, f"user arm from {path}", "user", source=path)
        if arm.group not in GROUPS:
            raise ValueError(
                f"--arms-file {path}: arm {name!r}: group must be one of {list(GROUPS)}, got {arm.group!r}"
            )
        owned = sorted(set(arm.overrides) & set(STUDY_OWNED_FIELDS))
        if owned:
            raise ValueError(f"--arms-file {path}: arm {name!r} overrides {owned}, which the study sets itself")
        if name in ALIASES:
            raise ValueError(f"--arms-file {path}: arm name {name!r} is an alias of {ALIASES[name]!r}")
        arms[name] = arm
    return arms
