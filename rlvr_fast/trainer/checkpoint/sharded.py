"""The checkpoint of a torchrun run, through torch.distributed.checkpoint (DCP): every rank writes its own shards.

Layout of ``<output_dir>/checkpoints/step-000010/`` (format "dcp" in ``checkpoint.FORMATS``; docs/design.md, "Data
parallelism" and "Failure guarantees"):

- ``__<rank>_0.distcp``: what rank ``rank`` wrote of ``{"model": ..., "optim": ...}``, the model's and optimizer's
  state dicts keyed by parameter name (``torch.distributed.checkpoint.state_dict``): under FSDP2 each rank's shards of
  every parameter and of its Adam moments (SparseAdamW: its world-size independent "full" layout, DTensors laid out
  like the parameters); under DDP every tensor is on every rank and DCP has each written once, the writes spread over
  the ranks. Nothing is gathered to one rank;
- ``.metadata``: DCP's index (every tensor's global shape, its chunks and the file and byte range of each), written by
  rank 0 once every rank has written;
- ``rng-rank<r>.safetensors``: the Python, NumPy, torch (and CUDA) RNG states of rank ``r``, one per rank;
- ``trainer_state.json`` (rank 0): step, schedule, the evaluation before, config, ``world_size``, ``parallel``;
- ``manifest.json`` (rank 0): every file's size and BLAKE2b digest (each rank digests the files it wrote), the format
  and world size, the config hash.

The write is atomic as on one process: every rank checks ITS tensors (local shards) finite and the ranks agree on the
verdict (a NaN names the step, the tensor and the rank) before anything is written; then all write into one
``.step-*`` folder (rank 0 makes it); a failure on any rank (DCP raises on all ranks when one rank's write fails) is
agreed on and the folder removed; rank 0 then writes the manifest, re-reads the folder against it, renames it into place
and moves ``latest`` (``folder.commit_checkpoint``), and tells every rank the outcome. A job killed at any point
leaves the last good checkpoint and at most a partial ``.step-*`` folder, removed on resume.

Resume is exact on the world size that wrote the checkpoint (each rank restores its shards, its optimizer state and
its own RNG state); another world size is refused by preflight (``dcp_layout.check_world_size``): DCP would reshard
the tensors exactly, but each rank samples its share of the step with its own seed, so the continued run would be
neither run.
One process (``rlvr-fast eval --checkpoint``) reads the model's tensors whole, without a process group
(``dcp_layout.load_weights_one_process``; ``dcp_layout`` holds what needs no process group).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from typing import Any

import torch

from rlvr_fast.trainer.checkpoint.dcp_layout import (
    DCP_METADATA,
    MODEL_KEY,
    OPTIM_KEY,
    check_world_size,
    rng_file,
    saved_model_shapes,
)
from rlvr_fast.trainer.checkpoint.folder import (
    commit_checkpoint,
    file_record,
    hash_of_run_config,
    new_partial_folder,
    remove_partial_checkpoints,
    write_failure,
    write_manifest,
    write_trainer_state,
)
from rlvr_fast.trainer.checkpoint.safe_unpickle import dcp_load
from rlvr_fast.trainer.checkpoint.state import json_rng_state, load_nested, rng_state, save_nested, set_rng_state
from rlvr_fast.trainer.checkpoint.strict_loading import CheckpointWriteError, check_model_matches, tied_names
from rlvr_fast.trainer.parallel.collectives import all_gather_objects, broadcast_from_main

# ---- save -----------------------------------------------------------------------------------------------------------


def _local_tensors(obj: Any, prefix: str):
    """(dotted name, this rank's piece) of every tensor in a nested state dict (a DTensor's local shard)."""
    from rlvr_fast.optim.sharding import local_tensor

    if isinstance(obj, torch.Tensor):
        yield prefix, local_tensor(obj)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _local_tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _local_tensors(v, f"{prefix}.{i}")


def _non_finite(state: dict, step: int, rank: int) -> str | None:
    """Why this rank's pieces of ``state`` must not be written (the first non-finite tensor), or None."""
    for part, what in ((MODEL_KEY, "model"), (OPTIM_KEY, "optimizer")):
        for name, t in _local_tensors(state.get(part, {}), ""):
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                return (
                    f"step {step}: {what} tensor {name!r} holds NaN/inf (rank {rank}'s shard); refusing to write a "
                    f"poisoned checkpoint"
                )
    return None


def _own_files(folder: str, rank: int) -> list[str]:
    """The files rank ``rank`` wrote into ``folder``: its DCP shard files and its RNG state."""
    shards = sorted(n for n in os.listdir(folder) if n.startswith(f"__{rank}_") and n.endswith(".distcp"))
    return [*shards, rng_file(rank)]


def _json_param_groups(optimizer) -> list[dict]:
    """The optimizer's hyper-parameters per group (learning rate, betas, ...), JSON-able; parameters by index."""
    return json.loads(json.dumps(optimizer.state_dict()["param_groups"]))


def save_sharded_checkpoint(
    output_dir: str,
    step: int,
    policy,
    optimizer,
    trainer_state: dict,
    extra_files: Callable[[str], list[str]] | None = None,
) -> str:
    """Write ``checkpoints/step-<step>`` of a torchrun run (module doc) and move ``latest`` to it. Collective: every
    rank calls it; every rank returns the final path or raises the same error (FloatingPointError for a non-finite
    tensor, CheckpointWriteError for a failed write, naming the rank, the folder and the last good checkpoint).

    ``policy``: the rank's ``DDPPolicy`` / ``FSDPPolicy`` (``checkpoint_state``: this rank's state dicts).
    ``trainer_state``: what rank 0 writes to trainer_state.json (schedule, evaluation before, config).
    ``extra_files``: rank 0 calls it with the folder before the manifest, to write more files (their names returned)
    that the manifest then covers, e.g. a DDP run's adapter in PEFT's format (replicated: any rank holds all of it)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.api import CheckpointException

    rank, world = dist.get_rank(), dist.get_world_size()
    model_state, optim_state = policy.checkpoint_state(optimizer)
    state = {MODEL_KEY: model_state}
    extra = {"world_size": world}
    if optim_state is None:  # no optimizer step yet: only its hyper-parameters (see checkpoint_state)
        extra["optimizer_param_groups"] = _json_param_groups(optimizer)
    else:
        state[OPTIM_KEY] = optim_state
    poisoned = [p for p in all_gather_objects(_non_finite(state, step, rank)) if p]
    if poisoned:
        raise FloatingPointError(poisoned[0])

    root = os.path.join(output_dir, "checkpoints")
    tmp = problem = None
    if rank == 0:
        try:
            os.makedirs(root, exist_ok=True)
            remove_partial_checkpoints(output_dir)
            tmp = new_partial_folder(root, step)
        except OSError as exc:  # told to every rank below, rather than leaving them in the broadcast
            problem = str(write_failure(output_dir, step, f"rank 0: {type(exc).__name__}: {exc}"))
    tmp, problem = broadcast_from_main((tmp, problem))
    if problem is not None:
        raise CheckpointWriteError(problem)
    try:
        dcp.save(state, storage_writer=FileSystemWriter(tmp, single_file_per_rank=True, sync_files=True))
        save_nested(os.path.join(tmp, rng_file(rank)), json_rng_state(rng_state()))
        report = (None, {name: file_record(os.path.join(tmp, name)) for name in _own_files(tmp, rank)})
    except (Exception, CheckpointException) as exc:  # (a BaseException) agreed on below: no rank waits for another
        report = (_reason(exc, rank), {})
    reports = all_gather_objects(report)
    errors = list(dict.fromkeys(error for error, _ in reports if error))  # DCP's failure: the same on every rank
    verdict = "; ".join(errors) if errors else None  # the cause; rank 0 words the error below
    final = None
    if rank == 0 and verdict is None:
        try:
            files = {name: record for _, mine in reports for name, record in mine.items()}
            config_hash = hash_of_run_config(trainer_state.get("config"))
            write_trainer_state(tmp, step, config_hash, {**trainer_state, **extra})
            names = [DCP_METADATA, "trainer_state.json", *(extra_files(tmp) if extra_files is not None else [])]
            for name in names:
                files[name] = file_record(os.path.join(tmp, name))
            write_manifest(tmp, step, config_hash, files, fmt="dcp", world_size=world)
            final = commit_checkpoint(tmp, step, config_hash)
        except Exception as exc:
            verdict = f"rank 0, committing it: {type(exc).__name__}: {exc}"
    if rank == 0 and verdict is not None:
        shutil.rmtree(tmp, ignore_errors=True)
        verdict = str(write_failure(output_dir, step, verdict))  # names the folder and the last good checkpoint
    verdict, final = broadcast_from_main((verdict, final))
    if verdict is not None:
        raise CheckpointWriteError(verdict)
    return final


def _reason(exc: BaseException, rank: int) -> str:
    """One line for rank ``rank``'s error; DCP's CheckpointException (raised on every rank): each failed rank's own
    error, without the traceback."""
    failures = getattr(exc, "failures", None)
    if not isinstance(failures, dict) or not failures:
        return f"rank {rank}: {type(exc).__name__}: {exc}"
    parts = []
    for failed, wrapped in sorted(failures.items()):
        error = wrapped[0] if isinstance(wrapped, tuple) else wrapped  # (exception, traceback summary)
        parts.append(f"rank {failed}: {type(error).__name__}: {error}")
    return "; ".join(parts)


# ---- load -----------------------------------------------------------------------------------------------------------


def load_sharded_checkpoint(path: str, policy, optimizer) -> dict:
    """Restore this rank's model shards, optimizer state and RNG state from the DCP checkpoint ``path`` (collective);
    returns the trainer state. Strict: the checkpoint's model tensors must be the model's, of the same shapes."""
    import torch.distributed as dist

    with open(os.path.join(path, "trainer_state.json")) as f:
        state = json.load(f)
    check_world_size(path, state, dist.get_world_size())
    groups = state.get("optimizer_param_groups")  # saved before the optimizer's first step: no state to load
    model_state, optim_state = policy.checkpoint_state(optimizer, for_loading=groups is None)
    shapes = {n: tuple(t.shape) for n, t in model_state.items()}  # DTensors: their global shape
    check_model_matches(path, saved_model_shapes(path), shapes, tied_names(policy.model))
    template = {MODEL_KEY: model_state}
    if optim_state is not None:
        template[OPTIM_KEY] = optim_state
    dcp_load(template, path)  # .metadata and non-tensor values read without running pickled code (safe_unpickle)
    load_model, load_optimizer = policy.loaders(optimizer)
    load_model(template[MODEL_KEY])
    if optim_state is not None:
        load_optimizer(template[OPTIM_KEY])
    else:
        current = optimizer.state_dict()["param_groups"]
        optimizer.load_state_dict(
            {"state": {}, "param_groups": [{**g, "params": c["params"]} for g, c in zip(groups, current)]}
        )
    set_rng_state(load_nested(os.path.join(path, rng_file(dist.get_rank()))))
    return state
