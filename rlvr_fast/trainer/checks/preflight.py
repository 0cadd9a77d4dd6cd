"""Everything that can be checked before the model loads, in one place (docs/design.md, "Failure guarantees").

``preflight(cfg)`` runs in ``rlvr-fast train`` / ``eval`` before the 20-50 s model load and again (cheaply: checkpoint
verification is cached) at the top of ``Trainer``: the config schema, the model source, the data, the reward modes,
the optimizer's requirements, the output folder rule and, with ``--resume``, the checkpoint to resume from and whether
this config (and world size: ``dcp_layout.check_world_size``) may continue it. Every failure is a ValueError
naming the field (``rlvr-fast`` exits with status 2).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import sys

from rlvr_fast.trainer.checkpoint.dcp_layout import DCP_METADATA, check_world_size
from rlvr_fast.trainer.checkpoint.folder import (
    LATEST,
    ResumePoint,
    find_resumable,
    remove_partial_checkpoints,
    set_aside,
    verify_checkpoint,
    write_atomic,
)
from rlvr_fast.trainer.checkpoint.output_dir import prepare_output_dir
from rlvr_fast.trainer.checkpoint.strict_loading import CheckpointError
from rlvr_fast.trainer.checks.capacity import check_machine
from rlvr_fast.trainer.config import RLVRConfig
from rlvr_fast.trainer.parallel.collectives import environment_world_size
from rlvr_fast.trainer.reporting.log import check_metrics_log
from rlvr_fast.trainer.schema import ConfigFieldError, field_specs
from rlvr_fast.trainer.trajectories.checks import check_trajectory_processing

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def check_model_source(model: str) -> None:
    """A shipped model (``shipped_models.SHIPPED_MODELS``) is installed and its GGUF at hand (assembled here on first
    use, once), or ``model`` is a local HF model folder, or it is a well-formed hub id."""
    from rlvr_fast.trainer.shipped_models import ShippedModelError, shipped_model

    shipped = shipped_model(model)
    if shipped is not None:
        try:
            shipped.location()
        except (FileNotFoundError, ShippedModelError) as exc:
            raise ConfigFieldError("model", f"RLVRConfig.model: {exc}") from None
        return
    if os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, "config.json")):
            raise ConfigFieldError("model", f"RLVRConfig.model {model!r} is a folder without config.json")
        return
    if os.path.exists(model):
        raise ConfigFieldError("model", f"RLVRConfig.model {model!r} is a file, not a model folder")
    first = model.split("/")[0]
    if not _HUB_ID.match(model) or (first and os.path.isdir(first) and "/" in model):
        raise ConfigFieldError(
            "model", f"RLVRConfig.model {model!r} is neither an existing model folder nor a Hugging Face hub id"
        )
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(model, "config.json"), str):
            raise ConfigFieldError(
                "model", f"RLVRConfig.model {model!r}: HF_HUB_OFFLINE is set and the hub id is not in the local cache"
            )


def check_optimizer(cfg: RLVRConfig) -> None:
    if cfg.optimizer == "adamw8bit" and importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigFieldError(
            "optimizer", "RLVRConfig.optimizer='adamw8bit' needs bitsandbytes (pip install 'rlvr_fast[gpu]')"
        )
    if cfg.optimizer == "sparse_adamw":
        from rlvr_fast.trainer.update.optimizers import parse_mask_source

        try:
            parse_mask_source(cfg.mask_source or "")
        except ValueError as exc:
            raise ConfigFieldError("mask_source", str(exc)) from None


def check_adapter(cfg: RLVRConfig, *, check_model: bool = True) -> None:
    """The adapter's packages (``adapters.check_adapter_runtime``) and, for a local model folder, its target modules
    against the config's architecture built on the meta device (other models: right after the load, before training)."""
    from rlvr_fast.trainer.adapters import check_adapter_runtime, check_target_modules, meta_model, target_names

    check_adapter_runtime(cfg, environment_world_size())
    if cfg.adapter != "none" and check_model and target_names(cfg.lora_target_modules) is not None:
        model = meta_model(cfg.model) if os.path.isdir(cfg.model) else None
        if model is not None:
            check_target_modules(cfg, model)


@functools.lru_cache(maxsize=2)
def tokenizer_for_checks(model: str):
    """``model``'s tokenizer alone (a few seconds, cached per process; the weights are not read), or None where it
    cannot be had cheaply: a local folder without tokenizer files (the model load then reports the folder)."""
    from rlvr_fast.trainer.model import load_tokenizer

    if os.path.isdir(model) and not any(
        os.path.isfile(os.path.join(model, name)) for name in ("tokenizer.json", "tokenizer_config.json")
    ):
        return None
    return load_tokenizer(model)  # as load_model reads it (a base model's prompt template included)


def check_data(cfg: RLVRConfig, *, measure_prompts: bool = True) -> None:
    """Load the problems (cheap) and the reward modes; neither may be empty or unknown. With ``measure_prompts``
    (the model is not loaded yet), every prompt is also measured in tokens with the model's tokenizer alone
    (``data.check_prompt_lengths``: file and line of one over ``max_prompt_length``)."""
    from rlvr_fast.tasks.reasoning_gym import check_reward_task
    from rlvr_fast.trainer.rollout.data import check_prompt_lengths, load_problems
    from rlvr_fast.trainer.step import Scorer

    Scorer(cfg)
    check_reward_task(cfg.task, cfg.rewards)  # a mode grading with the task's own scorer needs a task that has one
    train, evaluation = load_problems(cfg)
    if not evaluation:
        source = cfg.eval_file or f"the built-in task's eval split (eval_size={cfg.eval_size})"
        raise ConfigFieldError("eval_file", f"RLVRConfig.eval_file: no held-out problems in {source}")
    if len(train) < cfg.prompts_per_step:
        raise ConfigFieldError(
            "task", f"RLVRConfig.task: {len(train)} problems, fewer than prompts_per_step={cfg.prompts_per_step}"
        )
    if measure_prompts:
        tokenizer = tokenizer_for_checks(cfg.model)
        if tokenizer is not None:
            check_prompt_lengths(cfg, tokenizer, [*train, *evaluation])


def changed_run_fields(saved: dict, cfg: RLVRConfig) -> list[str]:
    """'field: old -> new' for every run-defining field whose value differs from the checkpoint's config."""
    current = json.loads(json.dumps(cfg.to_dict()))  # JSON-normalised like the saved one (tuples -> lists, ...)
    specs = field_specs(RLVRConfig)
    return [
        f"{name}: {saved[name]!r} -> {current[name]!r}"
        for name in RLVRConfig.field_names()
        if not specs[name].may_change_on_resume and name in saved and saved[name] != current[name]
    ]


def resume_point(cfg: RLVRConfig, log=None) -> ResumePoint:
    """The checkpoint to resume from: the newest that verifies (newer ones that do not are set aside, with the
    reason printed), and only if this config may continue its run."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    removed = remove_partial_checkpoints(cfg.output_dir)
    if removed:
        log(f"resume: removed {len(removed)} partial checkpoint folder(s) left by an interrupted write: {removed}")
    point = find_resumable(cfg.output_dir)
    for reason in point.skipped:
        log(f"resume: skipping a checkpoint that failed verification: {reason}")
    if point.skipped:
        for bad in _newer_than(cfg.output_dir, point.path):
            log(f"resume: set aside as {set_aside(bad)}")
        write_atomic(os.path.join(cfg.output_dir, "checkpoints", LATEST), os.path.basename(point.path) + "\n")
        log(f"resume: falling back to {point.path}")
    check_world_size(point.path, point.state, environment_world_size())  # exact only on the world that wrote it
    changed = changed_run_fields(point.state.get("config", {}), cfg)
    if changed:
        raise ConfigFieldError(
            changed[0].split(":")[0],
            f"--resume: this config changes the run saved in {point.path}: {'; '.join(changed)}. Only "
            f"{[n for n, s in field_specs(RLVRConfig).items() if s.may_change_on_resume]} may change on resume; "
            f"start a new run (another output_dir, or --overwrite true) to change the others",
        )
    check_metrics_log(cfg.output_dir)  # a log damaged before its last line: refused before the model loads
    return point


def _newer_than(output_dir: str, path: str) -> list[str]:
    from rlvr_fast.trainer.checkpoint.folder import list_checkpoints

    return [p for p in list_checkpoints(output_dir) if os.path.basename(p) > os.path.basename(path)]


def preflight(cfg: RLVRConfig, *, check_model: bool = True, log=None) -> ResumePoint | None:
    """Check everything that can be checked before the model loads; returns the resume point with ``cfg.resume``."""
    cfg.validate()
    if check_model:
        check_model_source(cfg.model)
    check_machine(cfg, check_model=check_model)  # device, world, attention, sequence length, rollout memory
    check_optimizer(cfg)
    check_adapter(cfg, check_model=check_model)
    check_trajectory_processing(cfg)  # trainer/trajectories: modes and their limits (vLLM refused by name first)
    check_rollout_engine(cfg)
    check_data(cfg, measure_prompts=check_model)  # a caller that loaded the model measures with its tokenizer
    prepare_output_dir(cfg.output_dir, resume=cfg.resume, overwrite=cfg.overwrite, log=log)  # locks it first
    return resume_point(cfg, log) if cfg.resume else None


def check_rollout_engine(cfg: RLVRConfig) -> None:
    """The rollout engine (``auto`` resolved, ``trainer/rollout/registry.py``) can run here and serve the settings that
    need it: a rollout correction needs an engine that reports log-probs; vLLM's sleep mode needs CUDA; the vLLM
    package must import at a supported version."""
    from rlvr_fast.trainer.rollout.registry import ROLLOUT_ENGINES, resolve_rollout_engine, runs_on_cuda

    name, why = resolve_rollout_engine(cfg)
    engine = ROLLOUT_ENGINES[name]
    if cfg.rollout_correction is not None and not engine.logprobs:
        chosen = f"rollout_engine={cfg.rollout_engine!r}"
        if name != cfg.rollout_engine:
            chosen += f" (resolved to {name!r}: {why})"
        raise ConfigFieldError(
            "rollout_correction",
            f"RLVRConfig.rollout_correction={cfg.rollout_correction!r} weights each token by the rollout engine's "
            f"log-probs, which {chosen} does not report; expected rollout_engine='vllm' or rollout_correction=None",
        )
    if cfg.vllm_sleep_mode and name == "vllm" and not runs_on_cuda(cfg):
        raise ConfigFieldError(
            "vllm_sleep_mode",
            "RLVRConfig.vllm_sleep_mode=True frees and refills vLLM's CUDA memory pool, and this run has no CUDA "
            f"device (device={cfg.device!r}); expected vllm_sleep_mode=False",
        )
    engine.check(cfg)


def preflight_eval(
    cfg: RLVRConfig, checkpoint: str | None, *, explicit: frozenset[str] = frozenset(), log=print
) -> RLVRConfig:
    """``rlvr-fast eval``'s checks: config, model source, a checkpoint that verifies (when given), and the data.
    Returns the config to evaluate with: with a checkpoint, its run's model, task, split and seed
    (``evaluation.command.checkpoint_eval_config``) replace those of ``cfg`` not named in ``explicit``, said by
    ``log``."""
    cfg.validate()
    if checkpoint is not None:
        check_eval_checkpoint(checkpoint)
        from rlvr_fast.trainer.evaluation.command import checkpoint_eval_config

        cfg = checkpoint_eval_config(cfg, checkpoint, explicit, log, check_model_source)  # its model, unless --model
    check_model_source(cfg.model)
    check_machine(cfg, training=False)  # device, attention kernel, sequence length, evaluation memory
    check_data(cfg)
    return cfg


def check_eval_checkpoint(checkpoint: str) -> None:
    """A checkpoint folder to evaluate: it holds weights (either format) and verifies deeply."""
    if not os.path.isdir(checkpoint):
        raise CheckpointError(f"--checkpoint {checkpoint}: not a folder")
    weights = ("model.safetensors", DCP_METADATA, "adapter_model.safetensors")  # the adapter: adapters/checkpoint.py
    if not any(os.path.isfile(os.path.join(checkpoint, name)) for name in weights):
        raise CheckpointError(
            f"--checkpoint {checkpoint}: no model.safetensors (one process) nor {DCP_METADATA} (a torchrun run's "
            f"torch.distributed.checkpoint) there"
        )
    problem = verify_checkpoint(checkpoint, deep=True)
    if problem is not None:
        raise CheckpointError(f"--checkpoint {checkpoint} failed verification: {problem}")
