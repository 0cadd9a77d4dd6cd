"""Planning a study: preset + arms + flags -> one validated RLVRConfig per (arm, seed), in dependency order.

Every run's config is built and checked before anything trains, so an unknown arm, an unknown RLVRConfig field or a
bad value fails in a second with a message naming the arm and the field:

    RLVRConfig defaults <- preset.base <- --set key=value <- --model / --task / --steps <- arm.overrides
    <- preset.arm_overrides[arm] <- (seed, output_dir, mask_source) set by the study

Run ``i`` of an arm uses seed ``base seed + i`` and lives in ``<study>/arms/<arm>/seed<i>/``, a normal trainer run
folder. A sparse-reuse arm (``mask_from``) runs after the arm it takes its mask from, seed by seed.

A preset with cells (``StudyCell``: model, task, task_params, overrides) runs every arm in every cell:

    RLVRConfig defaults <- preset.base <- cell (model, task, task_params, overrides) <- --set <- --steps
    <- arm.overrides <- preset.arm_overrides[arm] <- (seed, output_dir, mask_source)

Run ``i`` of an arm in cell ``c`` has the key ``c/<arm>/seed<i>`` and lives in
``<study>/cells/<c>/arms/<arm>/seed<i>/``; the cell's base-model evaluations live in ``<study>/cells/<c>/base/``.
``StudyPlan.cell_plan(c)`` is the cell as a single-cell plan (keys ``<arm>/seed<i>``, output_dir the cell's folder),
which the single-cell analysis and report take as they are.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from rlvr_fast.study.arms import ARMS, BASELINE_ARM, STUDY_OWNED_FIELDS, Arm, load_arms_file, resolve_arm_names
from rlvr_fast.study.presets import StudyCell, get_preset
from rlvr_fast.study.updates import MASK_FILES
from rlvr_fast.trainer.config import RLVRConfig
from rlvr_fast.trainer.evaluation.held_out import evaluation_kwargs
from rlvr_fast.trainer.update.optimizers import parse_mask_source

__all__ = ["CellSpec", "RunSpec", "StudyPlan", "cell_name", "config_hash", "eval_key", "plan_study"]

CELL_OWNED_FIELDS = ("model", "task", "task_params")  # set by a cell: no arm of a preset with cells overrides them
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
    cell: str | None = None  # the cell of a multi-cell study (key "<cell>/<arm>/seed<i>"), else None


@dataclass
class CellSpec:
    """One cell of a multi-cell study: what its arms start from and where its runs and base evaluations live."""

    name: str
    model: str
    task: str
    task_params: dict
    overrides: dict  # the cell's own overrides (besides model, task, task_params)
    dir: str  # <study>/cells/<name>
    primary: str  # the key of the cell's baseline run (its correct arm's first seed, else its first run)


@dataclass
class StudyPlan:
    output_dir: str
    preset: str
    arms: dict[str, Arm]  # the arms of this study, by name
    runs: list[RunSpec]  # in run order (dependencies first)
    base_overrides: dict  # what every arm starts from (preset.base, --set, --model, --task, --steps)
    primary: str  # the key of the baseline run (the correct arm's first seed, else the first run)
    extra: dict = field(default_factory=dict)
    cells: dict[str, CellSpec] = field(default_factory=dict)  # empty: a single-cell study

    def run(self, key: str) -> RunSpec:
        for r in self.runs:
            if r.key == key:
                return r
        raise KeyError(f"no run {key!r} in this study; runs: {[r.key for r in self.runs]}")

    def base_dir(self, spec: RunSpec) -> str:
        """The folder whose ``base/`` holds the base evaluations of ``spec``'s runs: its cell's, else the study's."""
        return self.cells[spec.cell].dir if spec.cell is not None else self.output_dir

    def cell_plan(self, name: str) -> StudyPlan:
        """Cell ``name`` as a single-cell plan: its runs with the keys ``<arm>/seed<i>`` (and dependencies likewise),
        output_dir the cell's folder, so ``analyse`` and ``write_study_report`` read and write it as a study."""
        cell = self.cells[name]
        prefix = f"{name}/"
        runs = [
            dataclasses.replace(
                r,
                key=r.key[len(prefix) :],
                depends_on=None if r.depends_on is None else r.depends_on[len(prefix) :],
                cell=None,
            )
            for r in self.runs
            if r.cell == name
        ]
        base = {**self.base_overrides, **cell.overrides, "model": cell.model, "task": cell.task}
        if cell.task_params:
            base["task_params"] = cell.task_params
        return StudyPlan(cell.dir, self.preset, dict(self.arms), runs, base, cell.primary[len(prefix) :])


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
    data = {k: config[k] for k in EVAL_DATA_FIELDS}
    if config.get("task_params"):  # a generator's parameters decide its problems (left out when empty: older keys)
        data["task_params"] = config["task_params"]
    return _digest({"kwargs": evaluation_kwargs(cfg), **data})


_SLUG = re.compile(r"[^a-z0-9._-]+")


def _slug(text: str) -> str:
    return _SLUG.sub("-", text.lower()).strip("-.") or "x"


def cell_name(model: str, task: str, task_preset: str) -> str:
    """A cell's default name, ``<model>__<task>``: the model's last path part; ``arithmetic-<preset>`` for the
    built-in task, the dataset for a reasoning-gym one, the file's stem for a JSONL file."""
    from rlvr_fast.tasks.reasoning_gym import dataset_name, is_reasoning_gym_task

    if task == "arithmetic":
        t = f"arithmetic-{task_preset}"
    elif is_reasoning_gym_task(task):
        t = dataset_name(task)
    else:
        t = os.path.splitext(os.path.basename(task.rstrip("/")))[0]
    return f"{_slug(os.path.basename(model.rstrip('/')))}__{_slug(t)}"


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


def _check_wrong_labels(cfg: RLVRConfig, train: list) -> None:
    """The incorrect_label reward on a reasoning-gym task: every training problem needs a numeric answer to derive
    its wrong label from (``tasks.reasoning_gym.wrong_label``); refused by dataset name otherwise."""
    from rlvr_fast.tasks import reasoning_gym

    if "incorrect_label" not in cfg.rewards or not reasoning_gym.is_reasoning_gym_task(cfg.task):
        return
    for p in train:
        if "incorrect_answer" not in p.extra:
            entry = p.entry.entry if p.entry is not None else {"question": p.prompt, "answer": p.answer}
            reasoning_gym.wrong_label(cfg.task, str(entry["question"]), entry["answer"], seed=cfg.seed, where=p.where)


def _cell_runs(
    names: list[str],
    registry: Mapping[str, Arm],
    preset: Any,
    base: dict,
    counts: Mapping[str, int],
    root: str,
    cell: str | None,
) -> list[RunSpec]:
    """The validated runs of ``names`` (dependency order) from ``base``, under ``root`` (the study's folder, or the
    cell's); keys ``<arm>/seed<i>``, prefixed ``<cell>/`` in a cell."""
    from rlvr_fast.trainer.rollout.data import load_problems
    from rlvr_fast.trainer.step import Scorer

    prefix = f"{cell}/" if cell is not None else ""
    where_cell = f"cell {cell!r}, " if cell is not None else ""
    base_seed = int(base.get("seed", RLVRConfig().seed))
    runs: list[RunSpec] = []
    for name in names:
        arm = registry[name]
        where = f"{where_cell}arm {name!r} ({'built-in' if arm.source == 'built-in' else 'from ' + arm.source})"
        _check_fields(arm.overrides, where)
        owned = sorted(set(arm.overrides) & set(STUDY_OWNED_FIELDS))
        if owned:
            raise ValueError(f"{where}: overrides {owned}, which the study sets itself")
        # in a cell the model and task are the cell's: an arm changing them would train another cell's pair and
        # report it under this cell's name
        owned_by_cell = sorted(set(arm.overrides) & set(CELL_OWNED_FIELDS)) if cell is not None else []
        if owned_by_cell:
            raise ValueError(
                f"{where}: overrides {owned_by_cell}, which every cell sets itself: expected none of "
                f"{list(CELL_OWNED_FIELDS)} in an arm of a preset with cells (add a cell to the preset instead)"
            )
        for i in range(counts[name]):
            key = f"{prefix}{name}/seed{i}"
            run_dir = os.path.join(root, "arms", name, f"seed{i}")
            values = {**RLVRConfig().to_dict(), **base, **arm.overrides, **preset.arm_overrides.get(name, {})}
            values.update(seed=base_seed + i, output_dir=run_dir, resume=False)
            depends_on = None
            if arm.mask_from is not None:
                if values.get("optimizer") != "sparse_adamw":
                    raise ValueError(
                        f"{where}: mask_from={arm.mask_from!r} needs optimizer 'sparse_adamw', got "
                        f"{values.get('optimizer')!r}"
                    )
                j = i if i < counts[arm.mask_from] else 0
                depends_on = f"{prefix}{arm.mask_from}/seed{j}"
                source_dir = os.path.join(root, "arms", arm.mask_from, f"seed{j}")
                values["mask_source"] = os.path.join(source_dir, MASK_FILES[MASK_DTYPE])
            try:
                cfg = RLVRConfig.from_dict(values).validate()
                if arm.mask_from is None and cfg.mask_source is not None:  # a missing file fails here, not at its run
                    parse_mask_source(cfg.mask_source)
                Scorer(cfg)  # reward modes and their parameters
                train, _ = load_problems(cfg)  # the task and the held-out split
                _check_wrong_labels(cfg, train)
            except (ValueError, TypeError, OSError) as exc:
                raise ValueError(f"{where}, seed {base_seed + i}: {exc}") from exc
            runs.append(RunSpec(key, name, i, cfg.to_dict(), run_dir, eval_key(cfg.to_dict()), depends_on, cell))
    return runs


def _primary(names: list[str], runs: list[RunSpec], prefix: str = "") -> str:
    keys = [r.key for r in runs]
    if f"{prefix}{BASELINE_ARM}/seed0" in keys:
        return f"{prefix}{BASELINE_ARM}/seed0"
    return f"{prefix}{names[0]}/seed0"


def _chosen_cells(preset: str, cells: tuple[StudyCell, ...], base: dict, wanted: list[str] | None) -> list[tuple]:
    """(name, cell) of the preset's cells, names derived where not given and checked unique; ``wanted`` keeps those
    named (in the preset's order)."""
    out: list[tuple[str, StudyCell]] = []
    for c in cells:
        preset_of_task = c.overrides.get("task_preset", base.get("task_preset", RLVRConfig().task_preset))
        name = c.name or cell_name(c.model, c.task, preset_of_task)
        if _slug(name) != name or "/" in name:
            raise ValueError(f"preset {preset!r}: cell name {name!r}: expected letters, digits, '.', '_' or '-'")
        if name in [n for n, _ in out]:
            raise ValueError(f"preset {preset!r}: two cells are named {name!r}; give them distinct StudyCell.name")
        out.append((name, c))
    if wanted is not None:
        known = [n for n, _ in out]
        unknown = [w for w in wanted if w not in known]
        if not known:
            raise ValueError(f"--cells: preset {preset!r} has no cells (it is a single-cell study), got {wanted}")
        if unknown or not wanted:
            raise ValueError(f"--cells: expected names from preset {preset!r}'s cells {known}, got {wanted}")
        out = [(n, c) for n, c in out if n in wanted]
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
    cells: list[str] | None = None,
) -> StudyPlan:
    """Build and validate every run of a study (nothing is loaded or trained).

    Args:
        preset: a name in ``PRESETS`` (base config, arms, seeds, cells).
        arms: arm names (or aliases) replacing the preset's list.
        arms_file: YAML of user arms merged into the registry (``load_arms_file``).
        steps, model, task: base overrides (as ``--steps``, ``--model``, ``--task`` of ``rlvr-fast train``); a preset
            with cells sets the model and task per cell, so ``model`` / ``task`` are refused there.
        seeds: seeds per arm for every arm (default: the preset's, with its per-arm counts).
        overrides: more base overrides, RLVRConfig field -> value.
        cells: names of the preset's cells to run (default: all of them).

    Raises:
        ValueError: naming the cell, the arm and the field for an unknown arm, an unknown field, a bad value, an
            unknown reward mode, unreadable data, a missing mask_from source, or a task whose answers give no wrong
            label for the incorrect_label arm.
    """
    chosen = get_preset(preset)
    registry = dict(ARMS)
    if arms_file:
        registry.update(load_arms_file(arms_file))
    if arms is not None and not [a for a in arms if str(a).strip()]:  # an empty --arms is a mistake, not "all"
        raise ValueError(f"--arms: expected one or more arm names (known: {sorted(registry)}), got {list(arms)!r}")
    names = resolve_arm_names(list(arms) if arms is not None else list(chosen.arms), registry)
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
    flags = {k: v for k, v in (("model", model), ("task", task), ("steps", steps)) if v is not None}
    ordered = _ordered(names, registry)
    counts = {n: seeds if seeds is not None else max(chosen.seeds, chosen.arm_seeds.get(n, 0)) for n in ordered}
    arms_used = {n: registry[n] for n in ordered}

    if not chosen.cells:
        if cells is not None:
            _chosen_cells(preset, (), base, cells)  # refused: no cells to choose from
        base.update(overrides or {})
        base.update(flags)
        runs = _cell_runs(ordered, registry, chosen, base, counts, output_dir, None)
        return StudyPlan(output_dir, preset, arms_used, runs, base, _primary(names, runs))

    given = sorted(k for k in ("model", "task", "task_params") if k in flags or k in (overrides or {}))
    if given:
        raise ValueError(
            f"preset {preset!r} sets the model and task per cell: expected no --model / --task (or --set of them or "
            f"of task_params), got {given}; pick cells with --cells, or use a single-cell preset"
        )
    plan_cells: dict[str, CellSpec] = {}
    runs: list[RunSpec] = []
    for name, c in _chosen_cells(preset, chosen.cells, base, cells):
        _check_fields(c.overrides, f"preset {preset!r}, cell {name!r}")
        if set(c.overrides) & {"model", "task", "task_params", *STUDY_OWNED_FIELDS}:
            raise ValueError(
                f"preset {preset!r}, cell {name!r}: overrides may not set model, task, task_params (the cell's own "
                f"fields) or {list(STUDY_OWNED_FIELDS)}, got {sorted(c.overrides)}"
            )
        cell_base = {**base, **c.overrides, "model": c.model, "task": c.task, "task_params": dict(c.task_params)}
        cell_base.update(overrides or {})
        cell_base.update(flags)
        cell_dir = os.path.join(output_dir, "cells", name)
        cell_runs = _cell_runs(ordered, registry, chosen, cell_base, counts, cell_dir, name)
        primary = _primary(names, cell_runs, f"{name}/")
        plan_cells[name] = CellSpec(name, c.model, c.task, dict(c.task_params), dict(c.overrides), cell_dir, primary)
        runs += cell_runs
    base.update(overrides or {})
    base.update(flags)
    first = next(iter(plan_cells.values()))
    return StudyPlan(output_dir, preset, arms_used, runs, base, first.primary, cells=plan_cells)
