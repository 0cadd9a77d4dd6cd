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
|             | sparse_random10/30, sparse_grad10/30, lora_r66 (same state as 10%)   | which subset should train?|
| trajectory  | traj_replay, traj_lessons, traj_both, traj_uniform, traj_random_lesson | which trajectories teach? |

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

GROUPS = ("reward", "calibration", "sample", "difficulty", "optimizer", "trajectory", "user")
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

# ---- trajectory-processing arms (rlvr_fast/trainer/trajectories): all-wrong groups as demonstrations or lessons
for _mode, _doc in (
    ("replay", "a stored success replaces one sample of an all-wrong group, LUFFY-shaped (arXiv:2504.14945)"),
    ("lessons", "an all-wrong group re-sampled with a lesson from its failures (NuRL 2509.25666, HiLL 2604.00698)"),
    ("both", "replay where the prompt has a stored success, else a lesson"),
    ("uniform", "control: both's processing on as many groups drawn at random; the store keeps any completion"),
    ("random_lesson", "control: the lesson of another problem of the step"),
):
    register_arm(Arm(f"traj_{_mode}", {**_CORRECT, "trajectory_processing": _mode}, _doc, "trajectory"))

# ---- update-mode arms (preset update-modes-quick): which subset of the weights trains, at what optimizer cost
for _kind, _density in (("random", 0.1), ("random", 0.3), ("grad", 0.1), ("grad", 0.3)):
    register_arm(
        Arm(
            f"sparse_{_kind}{round(_density * 100)}",
            {**_CORRECT, "optimizer": "sparse_adamw", "mask_source": f"{_kind}:{_density}"},
            f"SparseAdamW on {'a random' if _kind == 'random' else 'the largest-|grad| (warm-up saliency)'} "
            f"{round(_density * 100)}% of every weight's entries",
            "optimizer",
        )
    )
# LoRA at the rank whose AdamW state equals the 10% mask's, for SmolLM2-135M (30 layers, hidden 576, MLP 1536, 3 KV
# heads of 64; 134,515,008 parameters in 272 tensors, tied head). SparseAdamW keeps 12 bytes per masked entry (two
# float32 moments + an int32 index) and a 4-byte step per tensor: 12 x 13,451,501 + 4 x 272 = 161,419,964 bytes at 10%.
# LoRA all-linear adds r x (in + out) parameters per Linear: r x 30 x (1152 + 768 + 768 + 1152 + 3 x 2112) =
# r x 305,280, each with two float32 moments (8 bytes): 2,442,240 bytes per unit of rank, so r = 161.4M / 2.44M = 66.1
# -> 66 (161,189,520 bytes with the 210 step counts, 0.14% under). tests/trainer/test_update_modes.py recomputes both.
# alpha = 2r keeps the default config's scale alpha / r = 2. The learning rate is 10x the full run's: LoRA's best
# learning rate sits about 10x above full fine-tuning's across model sizes (Schulman et al. 2025, "LoRA Without
# Regret", Thinking Machines); at the full run's 2e-5 the adapter barely moves in a quick preset's few steps.
LORA_MATCHED_RANK = 66
LORA_LR = 2e-4  # 10x RLVRConfig's default lr (2e-5), which the other arms keep
register_arm(
    Arm(
        f"lora_r{LORA_MATCHED_RANK}",
        {
            **_CORRECT,
            "adapter": "lora",
            "lora_rank": LORA_MATCHED_RANK,
            "lora_alpha": 2 * LORA_MATCHED_RANK,
            "lr": LORA_LR,
        },
        "LoRA on every Linear (HF PEFT) at the rank whose AdamW state matches the 10% SparseAdamW mask's, at 10x the "
        "full run's learning rate",
        "optimizer",
    )
)


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
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as exc:  # a ValueError, so the CLI reports it in one line like any bad option
            raise ValueError(
                f"--arms-file {path}: expected a YAML mapping arm name -> overrides, got invalid YAML: "
                f"{' '.join(str(exc).split())}"
            ) from None
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
