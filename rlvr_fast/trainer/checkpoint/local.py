"""The checkpoint of a one-process run: ``<output_dir>/checkpoints/step-000010/`` holds ``model.safetensors`` (the
policy's weights), ``optimizer.safetensors`` (every tensor of the optimizer's state dict; the non-tensor structure rides
in the file's metadata as JSON), ``rng.safetensors`` and ``trainer_state.json`` (step, schedule, config, the evaluation
before), written and committed by the folder rule of ``folder.py``."""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file, save_file

from rlvr_fast.trainer.checkpoint.folder import (
    WRITE_ERRORS,
    CheckpointFormat,
    _remove,
    checkpoint_format,
    commit_checkpoint,
    file_record,
    hash_of_run_config,
    load_model_weights,
    new_partial_folder,
    register_format,
    remove_partial_checkpoints,
    write_failure,
    write_manifest,
    write_trainer_state,
)
from rlvr_fast.trainer.checkpoint.state import (
    _tensors_in,
    check_finite_tensors,
    json_rng_state,
    load_nested,
    model_state,
    rng_state,
    save_nested,
    set_rng_state,
)
from rlvr_fast.trainer.checkpoint.strict_loading import CheckpointError, check_model_matches, tied_names

FILES = ("model.safetensors", "optimizer.safetensors", "rng.safetensors", "trainer_state.json")


def save_checkpoint(output_dir: str, step: int, model: torch.nn.Module, optimizer, trainer_state: dict) -> str:
    """Write ``checkpoints/step-<step>`` of one process (verified) and move ``latest`` to it; keep the KEEP newest up
    to ``step``. ``trainer_state["config"]`` (a dict of RLVRConfig) is hashed into the manifest when present. A
    torchrun run writes its shards instead: ``sharded.save_sharded_checkpoint``. Raises FloatingPointError
    (nothing written) for a non-finite tensor, CheckpointWriteError (``write_failure``) when the write fails."""
    root = os.path.join(output_dir, "checkpoints")
    weights = model_state(model)
    check_finite_tensors(weights, "model", step)
    optim_state = optimizer.state_dict()
    check_finite_tensors(dict(_tensors_in(optim_state["state"], "state")), "optimizer", step)
    config_hash = hash_of_run_config(trainer_state.get("config"))
    tmp = None
    try:
        os.makedirs(root, exist_ok=True)
        remove_partial_checkpoints(output_dir)
        tmp = new_partial_folder(root, step)
        save_file(weights, os.path.join(tmp, "model.safetensors"))
        save_nested(os.path.join(tmp, "optimizer.safetensors"), optim_state)
        save_nested(os.path.join(tmp, "rng.safetensors"), json_rng_state(rng_state()))
        write_trainer_state(tmp, step, config_hash, trainer_state)
        write_manifest(tmp, step, config_hash, {name: file_record(os.path.join(tmp, name)) for name in FILES})
        return commit_checkpoint(tmp, step, config_hash)
    except WRITE_ERRORS as exc:  # a full disk, a read-only folder: one line naming all of it, no traceback
        _remove(tmp)
        raise write_failure(output_dir, step, f"{type(exc).__name__}: {exc}") from exc
    except BaseException:
        _remove(tmp)
        raise


def _safetensors_load_weights(path: str, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The checked full tensors of ``path``/model.safetensors (the caller puts them into the model)."""
    file = os.path.join(path, "model.safetensors")
    if not os.path.isfile(file):
        raise CheckpointError(f"checkpoint {path}: no model.safetensors there")
    try:
        weights = load_file(file)
    except Exception as exc:  # a truncated / corrupt file: safetensors' own error names no file
        raise CheckpointError(f"checkpoint {file} is unreadable ({type(exc).__name__}: {exc})") from None
    shapes = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    check_model_matches(path, {n: tuple(t.shape) for n, t in weights.items()}, shapes, tied_names(model))
    return weights


def load_checkpoint(path: str, model: torch.nn.Module, optimizer) -> dict:
    """Restore a one-process checkpoint's model, optimizer and RNG state in place; returns the trainer state (step,
    ...). A torchrun run's checkpoint resumes through ``sharded.load_sharded_checkpoint``."""
    if checkpoint_format(path) not in ("safetensors", "adapter"):  # the adapter format: adapters/checkpoint.py
        raise CheckpointError(
            f"checkpoint {path} holds a torchrun run's shards (torch.distributed.checkpoint): resume it under torchrun "
            f"with the world size that wrote it"
        )
    load_model_weights(path, model)
    optimizer.load_state_dict(load_nested(os.path.join(path, "optimizer.safetensors")))
    set_rng_state(load_nested(os.path.join(path, "rng.safetensors")))
    with open(os.path.join(path, "trainer_state.json")) as f:
        return json.load(f)


register_format(
    "safetensors",
    CheckpointFormat(
        "one process: model, optimizer and RNG state as whole tensors in safetensors files",
        lambda manifest: FILES,
        _safetensors_load_weights,
    ),
)
