"""``rlvr-fast eval``: the held-out evaluation of a model, or of a checkpoint's weights, without training.

A checkpoint's ``trainer_state.json`` holds its run's config (one-process and torchrun checkpoints alike). Its
held-out split is defined by ``EVAL_SPLIT_FIELDS``: evaluating a ``--seed 1`` run with the default seed would score a
split half of which that run trained on. So with ``--checkpoint`` those fields come from the checkpoint, unless the
command line (a flag or ``--config``) gives them, and the command says which (``checkpoint_eval_config``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from collections.abc import Callable

from rlvr_fast.trainer.checkpoint import load_model_weights
from rlvr_fast.trainer.config import RLVRConfig
from rlvr_fast.trainer.data import load_problems
from rlvr_fast.trainer.evaluation import evaluate, evaluation_kwargs
from rlvr_fast.trainer.generation import HFGeneration
from rlvr_fast.trainer.model import load_model
from rlvr_fast.trainer.schema import ConfigFieldError

# The fields that decide which problems a run held out and how they are posed to the model.
EVAL_SPLIT_FIELDS = (
    "task",
    "task_preset",
    "prompt_template",
    "train_size",
    "eval_size",
    "eval_file",
    "seed",
    "system_prompt",
    "allow_eval_overlap",
)


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
    """(the config a checkpoint's run saved, the file it is in); ({}, file) for a checkpoint without one."""
    path = os.path.join(checkpoint, "trainer_state.json")
    try:
        with open(path) as f:
            state = json.load(f)
    except (OSError, ValueError) as exc:
        raise ConfigFieldError("checkpoint", f"--checkpoint {checkpoint}: cannot read {path} ({exc})") from None
    saved = state.get("config") if isinstance(state, dict) else None
    return (saved if isinstance(saved, dict) else {}), path


def checkpoint_eval_config(
    cfg: RLVRConfig, checkpoint: str, explicit: frozenset[str], log: Callable[[str], None] = print
) -> RLVRConfig:
    """``cfg`` with the checkpoint's ``EVAL_SPLIT_FIELDS`` except those in ``explicit`` (the user's, kept); ``log``
    says which values came from the checkpoint and which explicit ones differ from it."""
    saved, path = saved_run_config(checkpoint)
    names = [n for n in EVAL_SPLIT_FIELDS if n in saved]
    if not names:
        log(f"eval: {path} saves no run config: using this command's task, split and seed")
        return cfg
    adopted = {n: saved[n] for n in names if n not in explicit}
    new = dataclasses.replace(cfg, **adopted)
    try:
        new.validate()
    except ValueError as exc:
        raise ConfigFieldError(getattr(exc, "field", "checkpoint"), f"{exc} (the value saved in {path})") from None
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
        load_model_weights(checkpoint, loaded.model)  # strict: a checkpoint of another model is an error
    _, problems = load_problems(cfg)
    generator = HFGeneration(loaded.model, loaded.tokenizer, cfg.max_prompt_length, prefix_sharing=cfg.prefix_sharing)
    result = evaluate(generator, loaded.tokenizer, problems, **evaluation_kwargs(cfg))
    lines = [f"{len(problems)} problems x n={result.n}: pass@k [95% CI]"]
    for k, s in result.pass_at_k.items():
        lines.append(f"  pass@{k}: {s['mean']:.3f} [{s['ci_low']:.3f}, {s['ci_high']:.3f}]")
    if result.calibration:
        lines.append("calibration: " + json.dumps(result.calibration))
    for name, f in result.formats.items():
        lines.append(f"format {name}: frequency {f['frequency']:.3f}, accuracy {f['accuracy']}")
    return "\n".join(lines)
