"""Planning a study: preset + arms + flags -> one validated RLVRConfig per (arm, seed), in dependency order.

Every run's config is built and checked before anything trains, so an unknown arm, an unknown RLVRConfig field or a
bad value fails in a second with a message naming the arm and the field:

    RLVRConfig defaults <- preset.base <- --set key=value <- --model / --task / --steps <- arm.overrides
    <- preset.arm_overrides[arm] <- (seed, output_dir, mask_source) set by the study

Run ``i`` of an arm uses seed ``base seed + i`` and lives in ``<study>/arms/<arm>/seed<i>/``, a normal trainer run
folder. A sparse-reuse arm (``mask_from``) runs after the arm it takes its mask from, seed by seed.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from rlvr_fast.study.arms import ARMS, BASELINE_ARM, STUDY_OWNED_FIELDS, Arm, load_arms_file, resolve_arm_names
from rlvr_fast.study.presets import get_preset
from rlvr_fast.study.updates import MASK_FILES
from rlvr_fast.trainer.config import RLVRConfig
from rlvr_fast.trainer.evaluation.held_out import evaluation_kwargs

__all__ = ["RunSpec", "StudyPlan", "config_hash", "eval_key", "plan_study"]

MASK_DTYPE = "bfloat16"  # the changed set a sparse-reuse arm trains: Mukherjee et al.'s bf16 comparison
# Fields that never change a run's numbers: a finished run stays valid when only these differ.
NON_RESULT_FIELDS = ("output_dir", "resume", "progress", "checkpoint_every")
# Fields besides ``evaluation_kwargs`` that decide the held-out evaluation of the base model.
EVAL_DATA_FIELDS = (
    "model",
    "task",
    "task_preset",
    "prompt_template",
    "train_size",
    "eval_size",
    "eval_file",
    "attn_implementation",
    "dtype",
    "device",
    "max_prompt_length",
)


@dataclass
class RunSpec:
    """One training run of the study: ``key`` = "<arm>/seed<i>"."""

    key: str
    arm: str
    seed_index: int
    config: dict  # the complete RLVRConfig as a dict (output_dir = run_dir)
    run_dir: str
    eval_key: str  # runs with the same eval_key share one base-model evaluation
    depends_on: str | None = None  # the run whose changed set is this run's mask


@dataclass
class StudyPlan:
    output_dir: str
    preset: str
    arms: dict[str, Arm]  # the arms of this study, by name
    runs: list[RunSpec]  # in run order (dependencies first)
    base_overrides: dict  # what every arm starts from (preset.base, --set, --model, --task, --steps)
    primary: str  # the key of the baseline run (the correct arm's first seed, else the first run)
    extra: dict = field(default_factory=dict)

    def run(self, key: str) -> RunSpec:
        for r in self.runs:
            if r.key == key:
                return r
        raise KeyError(f"no run {key!r} in this study; runs: {[r.key for r in self.runs]}")


def _digest(obj: Any) -> str:
    return hashlib.blake2b(json.dumps(obj, sort_keys=True, default=str).encode(), digest_size=6).hexdigest()


def base_eval_path(study_dir: str, key: str) -> str:
    """Where the base model's held-out evaluation under eval key ``key`` is stored (shared by the arms agreeing)."""
    return os.path.join(study_dir, "base", key, "eval.json")


def config_hash(config: Mapping[str, Any]) -> str:
    """A hash of everything in a run's config that can change its numbers."""
    return _digest({k: v for k, v in config.items() if k not in NON_RESULT_FIELDS})


def eval_key(config: Mapping[str, Any]) -> str:
    """A hash of everything that decides the held-out evaluation of the base model under this config."""
    cfg = RLVRConfig.from_dict(dict(config))
    return _digest({"kwargs": evaluation_kwargs(cfg), **{k: config[k] for k in EVAL_DATA_FIELDS}})


def _check_fields(values: Mapping[str, Any], where: str) -> None:
    valid = set(RLVRConfig.field_names())
    unknown = sorted(set(values) - valid)
    if unknown:
        raise ValueError(
            f"{where}: unknown RLVRConfig field{'s' if len(unknown) > 1 else ''} {unknown}; valid "
            f"fields: {sorted(valid)}"
        )


def _ordered(names: list[str], arms: Mapping[str, Arm]) -> list[str]:
    """``names`` with every arm's mask_from source placed before it (a depth-first topological order)."""
    out: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in out:
            return
        if name in visiting:
            raise ValueError(f"arm {name!r}: mask_from forms a cycle ({sorted(visiting)})")
        visiting.add(name)
        source = arms[name].mask_from
        if source is not None:
            if source not in names:
                raise ValueError(
                    f"arm {name!r} takes its SparseAdamW mask from arm {source!r}, which is not in this "
                    f"study's arms {names}; add {source!r} to --arms"
                )
            visit(source)
        visiting.discard(name)
        out.append(name)

    for n in names:
        visit(n)
    return out


def plan_study(
    preset: str = "default",
    *,
    arms: list[str] | None = None,
    arms_file: str | None = None,
    steps: int | None = None,
    seeds: int | None = None,
    model: str | None = None,
    task: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    output_dir: str = "runs/study",
) -> StudyPlan:
    """Build and validate every run of a study (nothing is loaded or trained).

    Args:
        preset: a name in ``PRESETS`` (base config, arms, seeds).
        arms: arm names (or aliases) replacing the preset's list.
        arms_file: YAML of user arms merged into the registry (``load_arms_file``).
        steps, model, task: base overrides (as ``--steps``, ``--model``, ``--task`` of ``rlvr-fast train``).
        seeds: seeds per arm for every arm (default: the preset's, with its per-arm counts).
        overrides: more base overrides, RLVRConfig field -> value.

    Raises:
        ValueError: naming the arm and the field for an unknown arm, an unknown field, a bad value, an unknown reward
            mode, unreadable data or a missing mask_from source.
    """
    from rlvr_fast.trainer.rollout.data import load_problems
    from rlvr_fast.trainer.step import Scorer

    chosen = get_preset(preset)
    registry = dict(ARMS)
    if arms_file:
        registry.update(load_arms_file(arms_file))
    names = resolve_arm_names(list(arms) if arms else list(chosen.arms), registry)
    for name in chosen.arm_overrides:
        _check_fields(chosen.arm_overrides[name], f"preset {preset!r}, arm_overrides[{name!r}]")
    if seeds is not None and (isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1):
        raise ValueError(f"--seeds must be an integer >= 1, got {seeds!r}")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"--steps must be an integer >= 1, got {steps!r}")

    base = dict(chosen.base)
    _check_fields(base, f"preset {preset!r}")
    if overrides:
        _check_fields(overrides, "--set")
        owned = sorted(set(overrides) & {"output_dir", "resume"})
        if owned:
            raise ValueError(f"--set {owned}: the study sets these itself (use --output-dir)")
        base.update(overrides)
    base.update({k: v for k, v in (("model", model), ("task", task), ("steps", steps)) if v is not None})
    base_seed = int(base.get("seed", RLVRConfig().seed))

    ordered = _ordered(names, registry)
    counts = {n: seeds if seeds is not None else max(chosen.seeds, chosen.arm_seeds.get(n, 0)) for n in ordered}
    runs: list[RunSpec] = []
    for name in ordered:
        arm = registry[name]
        where = f"arm {name!r} ({'built-in' if arm.source == 'built-in' else 'from ' + arm.source})"
        _check_fields(arm.overrides, where)
        owned = sorted(set(arm.overrides) & set(STUDY_OWNED_FIELDS))
        if owned:
            raise ValueError(f"{where}: overrides {owned}, which the study sets itself")
        for i in range(counts[name]):
            key = f"{name}/seed{i}"
            run_dir = os.path.join(output_dir, "arms", name, f"seed{i}")
            values = {**RLVRConfig().to_dict(), **base, **arm.overrides, **chosen.arm_overrides.get(name, {})}
            values.update(seed=base_seed + i, output_dir=run_dir, resume=False)
            depends_on = None
            if arm.mask_from is not None:
                if values.get("optimizer") != "sparse_adamw":
                    raise ValueError(
                        f"{where}: mask_from={arm.mask_from!r} needs optimizer 'sparse_adamw', got "
                        f"{values.get('optimizer')!r}"
                    )
                j = i if i < counts[arm.mask_from] else 0
                depends_on = f"{arm.mask_from}/seed{j}"
                source_dir = os.path.join(output_dir, "arms", arm.mask_from, f"seed{j}")
                values["mask_source"] = os.path.join(source_dir, MASK_FILES[MASK_DTYPE])
            try:
                cfg = RLVRConfig.from_dict(values).validate()
                Scorer(cfg)  # reward modes and their parameters
                load_problems(cfg)  # the task and the held-out split
            except (ValueError, TypeError, OSError) as exc:
                raise ValueError(f"{where}, seed {base_seed + i}: {exc}") from exc
            runs.append(RunSpec(key, name, i, cfg.to_dict(), run_dir, eval_key(cfg.to_dict()), depends_on))
    keys = [r.key for r in runs]
    primary = f"{names[0]}/seed0"
    if f"{BASELINE_ARM}/seed0" in keys:
        primary = f"{BASELINE_ARM}/seed0"
    return StudyPlan(output_dir, preset, {n: registry[n] for n in ordered}, runs, base, primary)
