"""``rlvr-fast eval``: the held-out evaluation of a model, or of a checkpoint's weights, without training.

A checkpoint's ``trainer_state.json`` holds its run's config (one-process and torchrun checkpoints alike). Its
held-out split is defined by ``EVAL_SPLIT_FIELDS``: evaluating a ``--seed 1`` run with the default seed would score a
split half of which that run trained on. Its model and how that model was asked (``EVAL_RUN_FIELDS``) define the run
too: the weights fit only the model they were trained from. So with ``--checkpoint`` the ``CHECKPOINT_FIELDS`` come from
the checkpoint, unless the command line (a flag or ``--config``) gives them, and the command says which
(``checkpoint_eval_config``). The rest are evaluation settings the user picks: ``eval_samples``, ``eval_temperature``,
``eval_calibration`` and where and how it computes (``device``, ``dtype``, ``attn_implementation``,
``prefix_sharing``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from collections.abc import Callable

from rlvr_fast.tasks import check_template
from rlvr_fast.trainer.checkpoint.folder import load_model_weights
from rlvr_fast.trainer.config import RLVRConfig
from rlvr_fast.trainer.evaluation.held_out import evaluate, evaluation_kwargs
from rlvr_fast.trainer.model import load_model
from rlvr_fast.trainer.precision import precision_of_loaded
from rlvr_fast.trainer.rollout.data import load_problems
from rlvr_fast.trainer.rollout.engines import HFGeneration
from rlvr_fast.trainer.schema import ConfigFieldError

# The fields that decide which problems a run held out and how they are posed to the model.
EVAL_SPLIT_FIELDS = (
    "task",
    "task_params",
    "task_preset",
    "prompt_template",
    "train_size",
    "eval_size",
    "eval_file",
    "seed",
    "system_prompt",
    "allow_eval_overlap",
)
# The model the weights belong to (a mismatch with an explicit --model is refused before anything loads,
# ``check_model_agrees``), and how the run posed problems to it and sampled and classified its answers.
# ``adapter``: an adapter checkpoint is evaluated on the base it trained on (QLoRA's NF4-quantised one).
EVAL_RUN_FIELDS = ("model", "max_prompt_length", "max_completion_length", "top_p", "format_classes", "adapter")
CHECKPOINT_FIELDS = ("model", *EVAL_SPLIT_FIELDS, *EVAL_RUN_FIELDS[1:])  # the order "eval: using ..." names them


def explicit_fields(args: argparse.Namespace) -> frozenset[str]:
    """The RLVRConfig fields the command line set: its flags (argparse leaves the others unset,
    ``config.add_config_arguments``) and the keys of its ``--config`` YAML (already read and checked once)."""
    names = {name for name in RLVRConfig.field_names() if hasattr(args, name)}
    if getattr(args, "config", None):
        import yaml

        with open(args.config) as fh:
            names |= set(yaml.safe_load(fh) or {})
    return frozenset(names)


def saved_run_config(checkpoint: str) -> tuple[dict, str]:
    """(the config a checkpoint's run saved, the file it is in); ({}, file) for a checkpoint whose state has no
    ``config`` (an older one). A state or ``config`` that is not a mapping is refused: silently evaluating with the
    defaults would score another split, or another model."""
    path = os.path.join(checkpoint, "trainer_state.json")
    try:
        with open(path) as f:
            state = json.load(f)
    except (OSError, ValueError) as exc:
        raise ConfigFieldError("checkpoint", f"--checkpoint {checkpoint}: cannot read {path} ({exc})") from None
    saved = state.get("config", {}) if isinstance(state, dict) else state
    if not isinstance(saved, dict):
        where = "its 'config'" if isinstance(state, dict) else "the file"
        raise ConfigFieldError(
            "checkpoint",
            f"--checkpoint {checkpoint}: the checkpoint's config is unreadable: expected {where} in {path} to be a "
            f"mapping, got {type(saved).__name__}",
        )
    return saved, path


def check_model_agrees(explicit_model: str, saved_model: str, path: str) -> None:
    """Refuse an explicit ``--model`` whose shape (layers, key/value width, vocabulary; ``model_shape``: config files
    only, nothing loads) differs from that of the model the checkpoint was trained from. Where either shape is
    unknown (the run's model folder is gone, an uncached hub id) the strict weight load refuses a mismatch later."""
    from rlvr_fast.trainer.model import model_shape

    if explicit_model == saved_model:
        return
    mine, theirs = model_shape(explicit_model), model_shape(saved_model)
    if mine is None or theirs is None or (mine.layers, mine.kv_width, mine.vocab) == (
        theirs.layers, theirs.kv_width, theirs.vocab):  # fmt: skip
        return
    raise ConfigFieldError(
        "model",
        f"RLVRConfig.model {explicit_model!r}: expected the checkpoint's model {saved_model!r} (saved in {path}) or "
        f"one of its shape, got layers={mine.layers}, kv_width={mine.kv_width}, vocab={mine.vocab} where the "
        f"checkpoint's has layers={theirs.layers}, kv_width={theirs.kv_width}, vocab={theirs.vocab}; leave --model "
        f"out to evaluate the checkpoint's own",
    )


def _check_saved_template(template: str) -> None:
    try:
        check_template(template)
    except ValueError as exc:
        raise ConfigFieldError("prompt_template", f"RLVRConfig.prompt_template: {exc}") from None


def checkpoint_eval_config(
    cfg: RLVRConfig,
    checkpoint: str,
    explicit: frozenset[str],
    log: Callable[[str], None] = print,
    check_model_source: Callable[[str], None] = lambda model: None,
) -> RLVRConfig:
    """``cfg`` with the checkpoint's ``CHECKPOINT_FIELDS`` except those in ``explicit`` (the user's, kept); ``log``
    says which values came from the checkpoint and which explicit ones differ from it. ``check_model_source``: how a
    saved model is checked before it is adopted (preflight passes its own, so the error names the saved file)."""
    saved, path = saved_run_config(checkpoint)
    names = [n for n in CHECKPOINT_FIELDS if n in saved]
    if not names:
        log(f"eval: {path} saves no run config: using this command's model, task, split and seed")
        return cfg
    adopted = {n: saved[n] for n in names if n not in explicit}
    try:
        new = dataclasses.replace(cfg, **adopted).validate()
        if "model" in adopted:
            check_model_source(new.model)
        if "prompt_template" in adopted:  # checked from its parse alone: a tampered format spec is never used
            _check_saved_template(new.prompt_template)
    except ValueError as exc:
        raise ConfigFieldError(getattr(exc, "field", "checkpoint"), f"{exc} (the value saved in {path})") from None
    if "model" in explicit and "model" in saved:
        check_model_agrees(cfg.model, saved["model"], path)
    if adopted:
        shown = ", ".join(f"{n}={v!r}" for n, v in adopted.items())
        log(f"eval: using the checkpoint's {shown} (saved in {path})")
    for n in names:
        if n in explicit and saved[n] != getattr(cfg, n):
            log(f"eval: using {n}={getattr(cfg, n)!r} from the command line, not the checkpoint's {saved[n]!r}")
    return new


def run_eval(cfg: RLVRConfig, checkpoint: str | None = None, loaded=None) -> str:
    """Evaluate the configured model (``loaded``: an already loaded one), with ``checkpoint``'s weights when given."""
    loaded = loaded or load_model(cfg)
    if checkpoint is not None:
        if cfg.adapter == "qlora":  # the adapter trained on the NF4 base: quantise the same layers the same way first
            from rlvr_fast.trainer.adapters.quantize import quantize_base

            quantize_base(loaded.model, next(loaded.model.parameters()).dtype)
        load_model_weights(checkpoint, loaded.model)  # strict: a checkpoint of another model is an error
    _, problems = load_problems(cfg)
    precision = loaded.precision or precision_of_loaded(cfg.dtype, loaded.device, loaded.dtype)
    generator = HFGeneration(
        loaded.model, loaded.tokenizer, cfg.max_prompt_length, prefix_sharing=cfg.prefix_sharing, precision=precision
    )
    result = evaluate(generator, loaded.tokenizer, problems, **evaluation_kwargs(cfg))
    lines = [f"{len(problems)} problems x n={result.n}: pass@k [95% CI]"]
    if cfg.rollout_engine != "native":  # said, not silently swapped: this command has the native sampler only
        lines.insert(0, f"sampled with the native engine (rollout_engine={cfg.rollout_engine!r} is for training)")
    for k, s in result.pass_at_k.items():
        lines.append(f"  pass@{k}: {s['mean']:.3f} [{s['ci_low']:.3f}, {s['ci_high']:.3f}]")
    if result.calibration:
        lines.append("calibration: " + json.dumps(result.calibration))
    for name, f in result.formats.items():
        lines.append(f"format {name}: frequency {f['frequency']:.3f}, accuracy {f['accuracy']}")
    return "\n".join(lines)
