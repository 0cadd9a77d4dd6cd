"""Running a study: the planned runs one by one, each a normal trainer run in ``<study>/arms/<arm>/seed<i>/``.

The study holds its folder for the whole invocation (``folder.claim_study_dir``: one live study per folder, never a
folder of someone else's files). Per run:
1. skip it when the state says done with the same config (a rerun of a finished study trains nothing);
2. skip it, with the reason, when the run it takes its mask from did not finish;
3. start from a fresh copy of the base model (loaded once per study, kept untouched), resuming through the trainer's
   own checkpoint (``cfg.resume``) when the run's folder holds one, so a killed study continues where it stopped;
4. evaluate the base model once per evaluation setting (shared by every run with the same ``eval_key``: same problems,
   same sampling seeds as the runs' after-evaluation; in a multi-cell study once per cell and setting, under the
   cell's folder), and hand it to the trainer as its "before";
5. train, then compare the final weights with the base weights (``updates.record_update``);
6. record done, or the exception (type, message, traceback tail) as failed, and go on with the next run.

A KeyboardInterrupt marks the run interrupted and stops the study (rerun to continue). The report is written at the
end of every invocation from whatever has finished: for a multi-cell study one full single-cell report per cell
(``<study>/cells/<cell>/report.md``) and the study's own report leading with the comparison across cells
(``rlvr_fast.study.cells``).

The incorrect_label reward reads a wrong label per training problem: the built-in task and JSONL files carry one;
for a reasoning-gym task the run's training problems get one derived from their answer
(``tasks.reasoning_gym.add_wrong_labels``) before training.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import json
import os
import platform
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import torch

from rlvr_fast.study.folder import claim_study_dir, release_study_dir
from rlvr_fast.study.plan import RunSpec, StudyPlan, base_eval_path, config_hash
from rlvr_fast.study.presets import PRESETS
from rlvr_fast.study.state import StudyState, write_json_atomic
from rlvr_fast.study.update_modes import record_resources, trained_weights
from rlvr_fast.study.updates import record_update
from rlvr_fast.tasks.reasoning_gym import add_wrong_labels, is_reasoning_gym_task
from rlvr_fast.trainer.checkpoint.folder import latest_checkpoint
from rlvr_fast.trainer.config import RLVRConfig
from rlvr_fast.trainer.evaluation.held_out import eval_dict_from_json
from rlvr_fast.trainer.model import LoadedModel
from rlvr_fast.trainer.reporting.log import reset_peak_memory
from rlvr_fast.trainer.schema import ConfigFieldError

__all__ = ["KEEP_CHECKPOINTS", "StudyOutcome", "base_eval_path", "run_study"]

KEEP_CHECKPOINTS = ("all", "final", "none")  # what stays of a finished run's checkpoints
ModelLoader = Callable[[RLVRConfig], LoadedModel]


@dataclass
class StudyOutcome:
    output_dir: str
    statuses: dict[str, str]  # run key -> status
    report: str | None  # path of report.md
    study_json: str | None


class BaseModels:
    """The base model, loaded once per (model, dtype, device, attention) and never trained: each run gets a deep copy,
    and its parameters are the reference the update sparsity is measured against."""

    def __init__(self, loader: ModelLoader):
        self.loader = loader
        self.key: tuple | None = None
        self.pristine: LoadedModel | None = None

    def fresh(self, cfg: RLVRConfig) -> LoadedModel:
        key = (cfg.model, cfg.dtype, cfg.device, cfg.attn_implementation)
        if key != self.key:
            self.pristine, self.key = None, None
            gc.collect()
            self.pristine, self.key = self.loader(cfg), key
        p = self.pristine
        return dataclasses.replace(p, model=copy.deepcopy(p.model))  # the loader's precision (dtype: auto) kept

    def parameters(self) -> dict:
        return dict(self.pristine.model.named_parameters())


def _error(exc: BaseException) -> dict:
    tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
    return {"type": type(exc).__name__, "message": str(exc), "traceback": "".join(tb)[-3000:]}


def _prune_checkpoints(run_dir: str, keep: str) -> None:
    root = os.path.join(run_dir, "checkpoints")
    if keep == "all" or not os.path.isdir(root):
        return
    if keep == "none":
        shutil.rmtree(root, ignore_errors=True)
        return
    latest = latest_checkpoint(run_dir)
    for d in os.listdir(root):
        path = os.path.join(root, d)
        if (
            d.startswith("step-")
            and os.path.isdir(path)
            and (latest is None or os.path.abspath(path) != os.path.abspath(latest))
        ):
            shutil.rmtree(path, ignore_errors=True)


def _run_one(spec: RunSpec, plan: StudyPlan, models: BaseModels, keep: str, log) -> dict:
    from rlvr_fast.trainer.loop import Trainer

    cfg = RLVRConfig.from_dict(dict(spec.config))
    os.makedirs(spec.run_dir, exist_ok=True)
    cfg.resume = latest_checkpoint(spec.run_dir) is not None
    cfg.overwrite = not cfg.resume  # a failed attempt without a checkpoint is retried from scratch
    # each run's peak memory its own (resources.json): CUDA's allocator peak, or on Linux the process's peak RSS
    reset_peak_memory(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    trainer = Trainer(cfg, loaded=models.fresh(cfg))
    if "incorrect_label" in cfg.rewards and is_reasoning_gym_task(cfg.task):
        add_wrong_labels(cfg.task, trainer.train_problems, seed=cfg.seed)
    path = base_eval_path(plan.base_dir(spec), spec.eval_key)
    if os.path.exists(path):
        with open(path) as f:
            base = eval_dict_from_json(json.load(f))
    else:  # the trainer's model holds the base weights until train() loads a checkpoint
        t0 = time.perf_counter()
        base = trainer.evaluate().to_dict()
        write_json_atomic(path, base)
        write_json_atomic(
            os.path.join(os.path.dirname(path), "eval_config.json"),
            {"first_run": spec.key, "config": spec.config, "seconds": time.perf_counter() - t0},
        )
        log(
            f"  base model evaluated for {spec.key}'s evaluation setting {spec.eval_key}: pass@1 "
            f"{base['pass_at_k'][1]['mean']:.3f} ({time.perf_counter() - t0:.0f} s)"
        )
    if cfg.resume:
        log(f"  resuming {spec.key} from {latest_checkpoint(spec.run_dir)}")
    result = trainer.train(before_eval=base)
    preset = PRESETS.get(plan.preset)
    rank = preset is not None and preset.update_rank  # an SVD per weight: only where the preset asks
    # a LoRA run's weights merged (W + scale * B @ A) under the base names: every arm's update compared alike
    update = record_update(models.parameters(), trained_weights(trainer), spec.run_dir, rank=rank)
    record_resources(trainer, result.metrics, spec.run_dir)  # trainable params, optimizer bytes, memory, step time
    _prune_checkpoints(spec.run_dir, keep)
    del trainer
    gc.collect()
    return {
        "pass_at_1": result.after["pass_at_k"][1]["mean"],
        "base_pass_at_1": base["pass_at_k"][1]["mean"],
        "unchanged": update["overall"],
    }


def run_study(
    plan: StudyPlan,
    *,
    model_loader: ModelLoader | None = None,
    keep_checkpoints: str = "none",
    retry_failed: bool = True,
    command: str | None = None,
    log: Callable[[str], None] = print,
) -> StudyOutcome:
    """Run every planned run that has not finished, then write the report (markdown, PNGs, study.json).

    Args:
        plan: from ``plan_study``.
        model_loader: RLVRConfig -> LoadedModel (default: the trainer's ``load_model``); tests pass a tiny model.
        keep_checkpoints: of a finished run, keep all checkpoints, the final one, or none (default: a finished
            run's results are in its metrics, report and update masks; a kept SmolLM2-135M checkpoint with its AdamW
            state is 1.6 GB, and the models-quick preset's 16 runs kept 37 GB).
        retry_failed: rerun failed and skipped runs (default); False leaves them as recorded.
        command: the command line, for the report header.

    Raises:
        ConfigFieldError('output_dir'): the folder is held by a live study or run, is not a study's and holds
            entries a study writes (``folder.claim_study_dir``), or holds a finished run whose config has changed.
    """
    if keep_checkpoints not in KEEP_CHECKPOINTS:
        raise ValueError(f"keep_checkpoints must be one of {KEEP_CHECKPOINTS}, got {keep_checkpoints!r}")
    took = claim_study_dir(plan.output_dir)  # one live study per folder; never a folder of someone else's files
    try:
        return _run_claimed(plan, model_loader, keep_checkpoints, retry_failed, command, log)
    finally:
        release_study_dir(plan.output_dir, took)


def _run_claimed(plan, model_loader, keep_checkpoints, retry_failed, command, log) -> StudyOutcome:
    """``run_study`` in a folder this process holds."""
    from rlvr_fast.trainer.model import load_model

    state = StudyState(plan.output_dir)
    if not os.path.exists(state.path):  # the folder is a study's before anything else is written into it
        state.save()
    for spec in plan.runs:  # a finished run is reused only if it ran this very config
        entry = state.run(spec.key)
        if entry["status"] == "done" and entry.get("config_hash") != config_hash(spec.config):
            raise ConfigFieldError(
                "output_dir",
                f"run {spec.key} in {plan.output_dir} finished with a different config (hash "
                f"{entry.get('config_hash')} vs {config_hash(spec.config)} now); use another --output-dir or delete "
                f"{spec.run_dir}",
            )
    write_json_atomic(
        os.path.join(plan.output_dir, "plan.json"),
        {
            "preset": plan.preset,
            "base_overrides": plan.base_overrides,
            "primary": plan.primary,
            **({"cells": {n: dataclasses.asdict(c) for n, c in plan.cells.items()}} if plan.cells else {}),
            "runs": [
                {
                    "key": r.key,
                    **({"cell": r.cell} if plan.cells else {}),
                    "arm": r.arm,
                    "seed": r.config["seed"],
                    "run_dir": r.run_dir,
                    "eval_key": r.eval_key,
                    "depends_on": r.depends_on,
                    "config": r.config,
                }
                for r in plan.runs
            ],
        },
    )
    started = time.time()
    state.add_session(
        started=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        started_epoch=started,
        command=command or " ".join(sys.argv),
        host=platform.node(),
    )
    models = BaseModels(model_loader or load_model)
    for spec in plan.runs:
        status = state.status(spec.key)
        if status == "done" or (status in ("failed", "skipped") and not retry_failed):
            log(f"[{spec.key}] {status} earlier: not run again")
            continue
        if spec.depends_on is not None and state.status(spec.depends_on) != "done":
            dep = state.run(spec.depends_on)
            why = dep.get("error", {}).get("message") or dep.get("reason") or ""
            reason = f"needs the mask of {spec.depends_on}, which is {dep['status']}" + (f" ({why})" if why else "")
            state.set(spec.key, status="skipped", reason=reason, error=None)
            log(f"[{spec.key}] skipped: {reason}")
            continue
        previous = state.run(spec.key).get("config_hash")
        if previous not in (None, config_hash(spec.config)) and os.path.isdir(spec.run_dir):
            log(f"[{spec.key}] its config changed since the last attempt: starting over in {spec.run_dir}")
            shutil.rmtree(os.path.join(spec.run_dir, "checkpoints"), ignore_errors=True)
        attempts = state.run(spec.key).get("attempts", 0) + 1
        state.set(
            spec.key,
            status="running",
            attempts=attempts,
            config_hash=config_hash(spec.config),
            run_dir=spec.run_dir,
            started=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            error=None,
            reason=None,
        )
        log(f"[{spec.key}] running (attempt {attempts})")
        t0 = time.perf_counter()
        try:
            summary = _run_one(spec, plan, models, keep_checkpoints, log)
        except KeyboardInterrupt:
            state.set(spec.key, status="interrupted", seconds=time.perf_counter() - t0)
            state.update_session(interrupted_at=spec.key, seconds=time.time() - started)
            raise
        except Exception as exc:  # one failing arm must not lose the others
            state.set(spec.key, status="failed", error=_error(exc), seconds=time.perf_counter() - t0)
            log(f"[{spec.key}] failed: {type(exc).__name__}: {exc}")
            gc.collect()
            continue
        seconds = time.perf_counter() - t0
        state.set(
            spec.key, status="done", seconds=seconds, finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"), summary=summary
        )
        log(
            f"[{spec.key}] done in {seconds:.0f} s: pass@1 {summary['base_pass_at_1']:.3f} -> "
            f"{summary['pass_at_1']:.3f}"
        )
    models.pristine = None
    state.update_session(finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"), seconds=time.time() - started)

    from rlvr_fast.study.analysis import analyse
    from rlvr_fast.study.report import write_study_report

    if plan.cells:
        from rlvr_fast.study.cells import write_cells_report

        report, study_json = write_cells_report(plan, state.data)
    else:
        findings = analyse(plan, state.data)
        report, study_json = write_study_report(plan, state.data, findings)
    return StudyOutcome(plan.output_dir, {r.key: state.status(r.key) for r in plan.runs}, report, study_json)
