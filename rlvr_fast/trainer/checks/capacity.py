"""What a config asks of the machine, checked before the model loads (``preflight``; docs/design.md, "Failure
guarantees"), so that a config this machine cannot run fails in seconds with exit status 2 instead of after the load,
deep in a rollout, or after an hours-long swap-bound allocation.

- the device and the world: ``device='cuda'`` needs a CUDA device; under torchrun ``prompts_per_step`` splits into
  whole groups per rank and the optimizer runs on the sharding (``check_world``, run on every rank);
- the attention kernel: ``attn_implementation='flash_attention_2'`` needs flash-attn, a GPU and a 16-bit dtype
  (flash-attn has no float32 or CPU kernels);
- the sequence length: ``max_prompt_length + max_completion_length`` within the model's ``max_position_embeddings``
  (when its config says, read before the load: ``model.model_shape``);
- the rollout's memory. A rollout generates all its rows at once: training, ``prompts_per_step / world_size`` prompts
  x ``group_size`` completions per process; evaluation, up to ``EVAL_PROMPTS_PER_CALL`` problems x ``eval_samples``.
  When no completion stops early (a fresh or a collapsed policy), that holds the keys and values of every row's
  ``max_completion_length`` new tokens in every layer, plus one decode step's logits (rows x vocab). That is a lower
  bound of the rollout's peak (no prompt tokens, no weights, no activations); a config whose lower bound exceeds the
  device's whole memory cannot run and is refused. Without the model's sizes the bound is the token ids alone.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import torch

from rlvr_fast.trainer.config import RLVRConfig
from rlvr_fast.trainer.evaluation.held_out import EVAL_PROMPTS_PER_CALL
from rlvr_fast.trainer.model import ModelShape, model_shape, resolve_device, resolve_dtype
from rlvr_fast.trainer.parallel.collectives import environment_world_size
from rlvr_fast.trainer.parallel.world import SHARDED_OPTIMIZERS_MISSING
from rlvr_fast.trainer.schema import ConfigFieldError

TOKEN_ID_BYTES = 8  # int64 token ids: the floor per generated token when the model's sizes are unknown


def check_attention(cfg: RLVRConfig, device: torch.device, dtype: torch.dtype) -> None:
    """flash_attention_2 needs the flash_attn package, a CUDA device and a 16-bit dtype."""
    if cfg.attn_implementation != "flash_attention_2":
        return
    if importlib.util.find_spec("flash_attn") is None:
        why = "flash_attn is not installed; pip install 'rlvr_fast[gpu]' adds it"
    elif device.type != "cuda":
        why = f"flash-attn has no kernels for device {device.type!r}"
    elif dtype not in (torch.float16, torch.bfloat16):
        why = f"flash-attn runs in float16/bfloat16 only, and dtype resolves to {str(dtype).removeprefix('torch.')}"
    else:
        return
    raise ConfigFieldError(
        "attn_implementation",
        f"RLVRConfig.attn_implementation must be 'sdpa' or 'eager' here ({why}), got 'flash_attention_2'",
    )


def check_positions(cfg: RLVRConfig, shape: ModelShape | None) -> None:
    """A prompt and its completion must fit the model's position range (when its config says)."""
    if shape is None or shape.max_positions is None:
        return
    total = cfg.max_prompt_length + cfg.max_completion_length
    if total <= shape.max_positions:
        return
    field = "max_prompt_length" if cfg.max_prompt_length >= shape.max_positions else "max_completion_length"
    raise ConfigFieldError(
        field,
        f"RLVRConfig.max_prompt_length + max_completion_length must be <= {shape.max_positions} (the "
        f"max_position_embeddings of {cfg.model!r}), got {cfg.max_prompt_length} + {cfg.max_completion_length}",
    )


@dataclass(frozen=True)
class Rollout:
    """One generate call's size: ``rows`` sequences of up to ``new_tokens`` new tokens, set by ``fields``."""

    what: str
    rows: int
    new_tokens: int
    fields: dict[str, int]  # the config fields that set it, name -> value (the first is named in the error)


def rollouts(cfg: RLVRConfig, training: bool) -> list[Rollout]:
    """The largest generate calls of a run (``training``) or of ``rlvr-fast eval``."""
    eval_prompts = min(EVAL_PROMPTS_PER_CALL, cfg.eval_size)
    out = [
        Rollout(
            "an evaluation call",
            eval_prompts * cfg.eval_samples,
            cfg.max_completion_length,
            {"eval_samples": cfg.eval_samples, "max_completion_length": cfg.max_completion_length},
        )
    ]
    if training:
        prompts = max(1, cfg.prompts_per_step // environment_world_size())
        fields = {
            "group_size": cfg.group_size,
            "prompts_per_step": cfg.prompts_per_step,
            "max_completion_length": cfg.max_completion_length,
        }
        defaults = RLVRConfig()
        fields = dict(sorted(fields.items(), key=lambda kv: -kv[1] / max(1, getattr(defaults, kv[0]))))
        out.insert(0, Rollout("a training rollout", prompts * cfg.group_size, cfg.max_completion_length, fields))
    return out


def rollout_bytes(rollout: Rollout, shape: ModelShape | None, itemsize: int) -> tuple[int, str]:
    """(lower bound of the call's peak bytes, what it counts)."""
    if shape is None:
        floor = rollout.rows * rollout.new_tokens * TOKEN_ID_BYTES
        return floor, f"{TOKEN_ID_BYTES}-byte token ids alone (the model's sizes are not known before the load)"
    kv = rollout.rows * rollout.new_tokens * shape.layers * 2 * shape.kv_width * itemsize
    logits = rollout.rows * shape.vocab * itemsize
    what = (
        f"keys and values of {shape.layers} layers x {shape.kv_width} features per token, plus one decode step's "
        f"{shape.vocab} logits per row, at {itemsize} bytes"
    )
    return kv + logits, what


def device_memory_bytes(device: torch.device) -> int | None:
    """The whole memory of ``device``: this process's GPU (LOCAL_RANK under torchrun), or the host's RAM (capped by a
    cgroup v2 limit). None when unknown."""
    if device.type == "cuda":
        index = device.index if device.index is not None else int(os.environ.get("LOCAL_RANK", "0"))
        return int(torch.cuda.get_device_properties(index).total_memory)
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
    try:
        with open("/sys/fs/cgroup/memory.max") as fh:
            limit = fh.read().strip()
        if limit.isdigit():
            total = min(total, int(limit))
    except OSError:
        pass
    return total


def _gb(n: int) -> str:
    """Bytes in the largest decimal unit below them (up to EB): '6.68 PB', '25.3 GB'."""
    units = ("B", "kB", "MB", "GB", "TB", "PB", "EB")
    i = 0
    while i + 1 < len(units) and n >= 1000 ** (i + 1):
        i += 1
    return f"{n / 1000**i:.3g} {units[i]}"


def check_rollout_memory(
    cfg: RLVRConfig,
    shape: ModelShape | None,
    device: torch.device,
    itemsize: int,
    *,
    training: bool,
    memory: int | None = None,
) -> None:
    """Refuse a rollout whose lower-bound peak (module doc) exceeds the device's whole memory."""
    memory = device_memory_bytes(device) if memory is None else memory
    if memory is None:
        return
    for rollout in rollouts(cfg, training):
        need, what = rollout_bytes(rollout, shape, itemsize)
        if need <= memory:
            continue
        names = list(rollout.fields)
        got = ", ".join(f"{k}={v}" for k, v in rollout.fields.items())
        raise ConfigFieldError(
            names[0],
            f"RLVRConfig.{names[0]}: {rollout.what} of {rollout.rows} rows x {rollout.new_tokens} new tokens needs "
            f"at least {_gb(need)} ({what}), more than the {_gb(memory)} of {device.type}: expected smaller "
            f"{', '.join(names)}, got {got}",
        )


def check_world(cfg: RLVRConfig) -> None:
    """What every process checks before it joins a torchrun world (``TrainingWorld.from_environment`` raises the same
    later): the device exists; with WORLD_SIZE > 1, each rank gets whole groups of an equal share of the step's
    prompts, and the optimizer runs on the chosen sharding. ``rlvr-fast train`` runs it on every rank first, so a
    refusal is the same on all of them (said once, by rank 0) and none raises it alone in the Trainer."""
    resolve_device(cfg.device)
    world = environment_world_size()
    if world <= 1:
        return
    if cfg.prompts_per_step % world:
        raise ConfigFieldError(
            "prompts_per_step",
            f"RLVRConfig.prompts_per_step must divide by the world size ({world}): each rank generates whole groups "
            f"of an equal share of the step's prompts; got {cfg.prompts_per_step}",
        )
    if cfg.parallel == "fsdp" and cfg.optimizer in SHARDED_OPTIMIZERS_MISSING:
        raise ConfigFieldError(
            "optimizer",
            f"RLVRConfig.optimizer={cfg.optimizer!r} does not run on FSDP-sharded parameters yet "
            f"({SHARDED_OPTIMIZERS_MISSING[cfg.optimizer]}): expected parallel='ddp' or optimizer='adamw'",
        )


def check_machine(cfg: RLVRConfig, *, training: bool = True, check_model: bool = True) -> None:
    """Device, world, attention kernel, sequence length and rollout memory (module doc), before the model loads.
    ``check_model=False``: the caller brings a loaded model, not ``cfg.model``'s, so its sizes are not read."""
    if training:
        check_world(cfg)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    check_attention(cfg, device, dtype)
    shape = model_shape(cfg.model) if check_model else None
    check_positions(cfg, shape)
    check_rollout_memory(cfg, shape, device, dtype.itemsize, training=training)
