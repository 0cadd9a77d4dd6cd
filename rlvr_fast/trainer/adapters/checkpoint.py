"""The checkpoint of a one-process adapter run (format "adapter"): the folder rule of ``checkpoint/folder.py`` with the
adapter in PEFT's own format instead of the whole model.

``<output_dir>/checkpoints/step-000010/`` holds ``adapter_model.safetensors`` and ``adapter_config.json`` (exactly what
``PeftModel.save_pretrained`` writes, so ``PeftModel.from_pretrained(base, step_folder)`` loads it), and as a full run's
checkpoint ``optimizer.safetensors`` (the adapter's optimizer state), ``rng.safetensors`` and ``trainer_state.json``.
The frozen base is not stored: it is the run's ``model``. Resume and ``rlvr-fast eval --checkpoint`` load the adapter
through ``folder.load_model_weights`` (this format's ``load_weights``).
"""

from __future__ import annotations

import json
import os
import shutil
import weakref

import torch
from safetensors.torch import load_file, save_file

from rlvr_fast.trainer.adapters.layers import lora_layers
from rlvr_fast.trainer.checkpoint.folder import (
    WRITE_ERRORS,
    CheckpointFormat,
    commit_checkpoint,
    file_record,
    hash_of_run_config,
    new_partial_folder,
    register_format,
    remove_partial_checkpoints,
    write_failure,
    write_manifest,
    write_trainer_state,
)
from rlvr_fast.trainer.checkpoint.state import (
    check_finite_tensors,
    json_rng_state,
    rng_state,
    save_nested,
)
from rlvr_fast.trainer.checkpoint.strict_loading import CheckpointError

WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"  # peft's SAFETENSORS_WEIGHTS_NAME, CONFIG_NAME
FILES = (WEIGHTS, CONFIG, "optimizer.safetensors", "rng.safetensors", "trainer_state.json")

# model -> a weak reference to the PeftModel that adapted it in place: a resume loads the adapter into it
_PEFT_OF: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def remember(adapter) -> None:
    """Record ``adapter.peft_model`` as the PEFT wrapper of its inner model (for this format's loader)."""
    _PEFT_OF[adapter.peft_model.base_model.model] = weakref.ref(adapter.peft_model)


def _optimizer_tensors(state: dict) -> dict[str, torch.Tensor]:
    """The tensors of an optimizer state_dict's ``state`` (param index -> {name: value}), named for the error."""
    return {f"state.{i}.{k}": v for i, entry in state.items() for k, v in entry.items() if isinstance(v, torch.Tensor)}


def _remove_partial(tmp: str | None) -> None:
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)


def adapter_weights(adapter) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's names (what ``adapter_model.safetensors`` holds), on the CPU."""
    from peft import get_peft_model_state_dict

    return {n: t.detach().cpu().contiguous() for n, t in get_peft_model_state_dict(adapter.peft_model).items()}


def write_peft_adapter(folder: str, adapter, weights: dict[str, torch.Tensor] | None = None) -> list[str]:
    """Write the adapter into ``folder`` as PEFT does (``adapter_model.safetensors``, ``adapter_config.json``), so
    ``PeftModel.from_pretrained(base, folder)`` loads it; returns the two file names."""
    peft_model = adapter.peft_model
    save_file(adapter_weights(adapter) if weights is None else weights, os.path.join(folder, WEIGHTS), {"format": "pt"})
    peft_model.peft_config[peft_model.active_adapter].save_pretrained(folder)
    return [WEIGHTS, CONFIG]


def save_adapter_checkpoint(output_dir: str, step: int, adapter, optimizer, trainer_state: dict) -> str:
    """Write ``checkpoints/step-<step>`` of a one-process adapter run (verified), as ``local.save_checkpoint`` does for
    the whole model. Raises FloatingPointError (nothing written) for a non-finite tensor, CheckpointWriteError when the
    write fails."""
    root = os.path.join(output_dir, "checkpoints")
    weights = adapter_weights(adapter)
    check_finite_tensors(weights, "adapter", step)
    optim_state = optimizer.state_dict()
    check_finite_tensors(_optimizer_tensors(optim_state["state"]), "optimizer", step)
    config_hash = hash_of_run_config(trainer_state.get("config"))
    tmp = None
    try:
        os.makedirs(root, exist_ok=True)
        remove_partial_checkpoints(output_dir)
        tmp = new_partial_folder(root, step)
        write_peft_adapter(tmp, adapter, weights)
        save_nested(os.path.join(tmp, "optimizer.safetensors"), optim_state)
        save_nested(os.path.join(tmp, "rng.safetensors"), json_rng_state(rng_state()))
        write_trainer_state(tmp, step, config_hash, trainer_state)
        files = {name: file_record(os.path.join(tmp, name)) for name in FILES}
        write_manifest(tmp, step, config_hash, files, fmt="adapter")
        return commit_checkpoint(tmp, step, config_hash)
    except WRITE_ERRORS as exc:
        _remove_partial(tmp)
        raise write_failure(output_dir, step, f"{type(exc).__name__}: {exc}") from exc
    except BaseException:
        _remove_partial(tmp)
        raise


def _read_weights(path: str) -> dict[str, torch.Tensor]:
    file = os.path.join(path, WEIGHTS)
    try:
        return load_file(file)
    except Exception as exc:
        raise CheckpointError(f"checkpoint {file} is unreadable ({type(exc).__name__}: {exc})") from None


def _load_adapter(path: str, model: torch.nn.Module) -> None:
    """Put the checkpoint's adapter into ``model``: into the PEFT wrapper that adapted it (a resume), strictly; or, for
    a plain base model (``rlvr-fast eval``), inject it in place with ``PeftModel.from_pretrained``."""
    from peft import PeftModel, set_peft_model_state_dict

    ref = _PEFT_OF.get(model)
    peft_model = ref() if ref is not None else None
    if peft_model is None:
        if next(lora_layers(model), None) is not None:
            raise CheckpointError(f"checkpoint {path}: the model already holds LoRA layers of another adapter")
        PeftModel.from_pretrained(model, path, is_trainable=False)  # injects into ``model`` in place
        model.eval()
        return
    weights = _read_weights(path)
    result = set_peft_model_state_dict(peft_model, weights)
    expected = {n for n in peft_model.state_dict() if "lora_" in n}
    missing = sorted(n for n in result.missing_keys if n in expected)
    if result.unexpected_keys or missing:
        raise CheckpointError(
            f"checkpoint {path}: the adapter does not match this run's (missing {missing[:4]}, unexpected "
            f"{list(result.unexpected_keys)[:4]})"
        )


def _config_readable(file: str, manifest: dict) -> str | None:
    with open(file) as f:
        config = json.load(f)
    if not isinstance(config, dict) or "peft_type" not in config:
        return f"{file} is not a PEFT adapter config"
    return None


register_format(
    "adapter",
    CheckpointFormat(
        "one process with an adapter: the adapter in PEFT's format, its optimizer and RNG state",
        lambda manifest: FILES,
        _load_adapter,
        marker=CONFIG,
        read_checks={CONFIG: _config_readable},
    ),
)
