"""Checkpoints, written atomically, with everything an exact resume needs; verified before they count.

Two formats share the folder rule, the manifest, verification and resume (``FORMATS``): "safetensors" (one process,
below) and "dcp" (a torchrun run: every rank writes its own shards through torch.distributed.checkpoint,
``trainer/sharded_checkpoint.py``). The manifest names the format (one written before the field: "safetensors").

One process: ``<output_dir>/checkpoints/step-000010/`` holds ``model.safetensors`` (the policy's weights),
``optimizer.safetensors`` (every tensor of the optimizer's state dict; the non-tensor structure rides in the file's
metadata as JSON), ``rng.safetensors`` and ``trainer_state.json`` (step, schedule, config, the evaluation before). A
checkpoint is written into a temporary ``.step-*`` folder and renamed into place; ``latest`` (a one-line file, itself
replaced atomically) points at the newest complete one. An interrupted write therefore never loses the last good one.

Verified before it counts (docs/design.md, "Failure guarantees"): every tensor is checked finite before anything is
written (a NaN names the step and the tensor); ``manifest.json`` records each file's size and BLAKE2b digest, the
format, the world size and the run's config hash; the folder is re-read against the manifest before ``latest`` moves
to it (``commit_checkpoint``). Resuming walks the checkpoints newest first and takes the first that verifies
(``find_resumable``), saying why it skipped any. Partial ``.step-*`` folders left by a killed write are removed.
A write that fails (a full disk, a read-only folder) raises one ``CheckpointWriteError`` naming the step, the folder,
the cause and the last good checkpoint; its partial folder is removed and ``latest`` stays (``write_failure``).
Loading is strict: a missing, unexpected or misshapen tensor is an error. Nothing read runs code: safetensors and JSON
hold none, and a DCP checkpoint's pickles are read by ``safe_unpickle``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from rlvr_fast.trainer import dcp_layout
from rlvr_fast.trainer.strict_loading import CheckpointError, CheckpointWriteError, check_model_matches, tied_names

LATEST = "latest"
KEEP = 2  # complete checkpoints kept on disk
MANIFEST = "manifest.json"
FILES = ("model.safetensors", "optimizer.safetensors", "rng.safetensors", "trainer_state.json")
PARTIAL_PREFIX = ".step-"  # a checkpoint being written (renamed to step-N when complete)


def _flatten(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace every tensor in a nested dict/list by a {"__tensor__": key} marker, collecting the tensors."""
    if isinstance(obj, torch.Tensor):
        key = prefix or "root"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {
            "__dict__": [
                [_flatten(k, f"{prefix}.k{i}", tensors), _flatten(v, f"{prefix}.{i}", tensors)]
                for i, (k, v) in enumerate(obj.items())
            ]
        }
    if isinstance(obj, (list, tuple)):
        kind = "__tuple__" if isinstance(obj, tuple) else "__list__"
        return {kind: [_flatten(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint a value of type {type(obj).__name__} at {prefix!r}")


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {_unflatten(k, tensors): _unflatten(v, tensors) for k, v in obj["__dict__"]}
        if "__tuple__" in obj:
            return tuple(_unflatten(v, tensors) for v in obj["__tuple__"])
        if "__list__" in obj:
            return [_unflatten(v, tensors) for v in obj["__list__"]]
    return obj


def save_nested(path: str, state: Any) -> None:
    """Save a nested structure of tensors and plain values (e.g. an optimizer state dict) as one safetensors file."""
    tensors: dict[str, torch.Tensor] = {}
    tree = _flatten(state, "s", tensors)
    save_file(tensors, path, metadata={"tree": json.dumps(tree)})


def load_nested(path: str) -> Any:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        tree = json.loads(f.metadata()["tree"])
    return _unflatten(tree, load_file(path))


def rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _json_rng(state: dict) -> dict:
    """RNG states as JSON-able values (tensors stay tensors for save_nested)."""
    version, internal, gauss = state["python"]
    kind, keys, pos, has_gauss, cached = state["numpy"]
    out = dict(state)
    out["python"] = [version, list(internal), gauss]
    out["numpy"] = [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    return out


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors, tied weights stored once (safetensors refuses shared storage)."""
    seen: set[tuple] = set()
    out = {}
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            continue
        seen.add(key)
        out[name] = t.detach().cpu().contiguous()
    return out


def _tensors_in(obj: Any, prefix: str):
    """(dotted name, tensor) for every tensor in a nested dict / list, in place (no copies)."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors_in(v, f"{prefix}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors_in(v, f"{prefix}.{i}")


def check_finite_tensors(tensors: dict[str, torch.Tensor], what: str, step: int) -> None:
    """Raise FloatingPointError naming the first non-finite floating tensor (nothing is written then)."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise FloatingPointError(
                f"step {step}: {what} tensor {name!r} holds NaN/inf; refusing to write a poisoned checkpoint"
            )


def save_checkpoint(output_dir: str, step: int, model: torch.nn.Module, optimizer, trainer_state: dict) -> str:
    """Write ``checkpoints/step-<step>`` of one process (verified) and move ``latest`` to it; keep the KEEP newest up
    to ``step``. ``trainer_state["config"]`` (a dict of RLVRConfig) is hashed into the manifest when present. A
    torchrun run writes its shards instead: ``sharded_checkpoint.save_sharded_checkpoint``. Raises FloatingPointError
    (nothing written) for a non-finite tensor, CheckpointWriteError (``write_failure``) when the write fails."""
    root = os.path.join(output_dir, "checkpoints")
    weights = model_state(model)
    check_finite_tensors(weights, "model", step)
    optim_state = optimizer.state_dict()
    check_finite_tensors(dict(_tensors_in(optim_state["state"], "state")), "optimizer", step)
    config_hash = _config_hash(trainer_state.get("config"))
    tmp = None
    try:
        os.makedirs(root, exist_ok=True)
        remove_partial_checkpoints(output_dir)
        tmp = new_partial_folder(root, step)
        save_file(weights, os.path.join(tmp, "model.safetensors"))
        save_nested(os.path.join(tmp, "optimizer.safetensors"), optim_state)
        save_nested(os.path.join(tmp, "rng.safetensors"), _json_rng(rng_state()))
        write_trainer_state(tmp, step, config_hash, trainer_state)
        write_manifest(tmp, step, config_hash, {name: file_record(os.path.join(tmp, name)) for name in FILES})
        return commit_checkpoint(tmp, step, config_hash)
    except WRITE_ERRORS as exc:  # a full disk, a read-only folder: one line naming all of it, no traceback
        _remove(tmp)
        raise write_failure(output_dir, step, f"{type(exc).__name__}: {exc}") from exc
    except BaseException:
        _remove(tmp)
        raise


# What a failed write raises (a full disk, a read-only or vanished folder): safetensors' own error for its files,
# OSError for the rest, CheckpointError for a folder that does not verify after writing
WRITE_ERRORS = (OSError, SafetensorError, CheckpointError)


def _remove(tmp: str | None) -> None:
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)


def write_failure(output_dir: str, step: int, cause: str) -> CheckpointWriteError:
    """The error of a checkpoint of ``step`` that could not be written (its partial folder already removed): names
    the step, the folder, ``cause`` and the last good checkpoint, which ``latest`` still points at."""
    folder = os.path.join(output_dir, "checkpoints", f"step-{step:06d}")
    try:
        last = latest_checkpoint(output_dir)
    except OSError:
        last = None
    kept = f"the last good checkpoint, {last}, is intact" if last else "there is no earlier checkpoint"
    return CheckpointWriteError(
        f"the checkpoint of step {step} was not written to {folder}: {cause}; {kept} (its partial folder was removed)"
    )


def new_partial_folder(root: str, step: int) -> str:
    """A fresh ``.step-<step>-*`` folder in ``root`` to write a checkpoint into (renamed when complete)."""
    return tempfile.mkdtemp(prefix=f"{PARTIAL_PREFIX}{step:06d}-", dir=root)


def write_trainer_state(folder: str, step: int, config_hash: str | None, trainer_state: dict) -> None:
    with open(os.path.join(folder, "trainer_state.json"), "w") as f:
        json.dump({"step": step, "config_hash": config_hash, **trainer_state}, f, indent=1)


def commit_checkpoint(tmp: str, step: int, config_hash: str | None) -> str:
    """The commit of a written checkpoint: ``tmp`` re-read against its manifest, renamed to ``step-<step>``,
    ``latest`` moved to it, the older ones pruned. Returns the final path; raises CheckpointError (``tmp`` is then
    the caller's to remove) when the folder does not verify."""
    problem = verify_checkpoint(tmp, config_hash=config_hash, deep=False)
    if problem:
        raise CheckpointError(f"the checkpoint of step {step} failed verification after writing: {problem}")
    root = os.path.dirname(tmp)
    final = os.path.join(root, f"step-{step:06d}")
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    try:
        _write_atomic(os.path.join(root, LATEST), os.path.basename(final) + "\n")
    except BaseException:  # latest not moved (a full disk): the step was not written, as if it failed before
        shutil.rmtree(final, ignore_errors=True)
        raise
    _prune(root, step)
    return final


def _prune(root: str, step: int) -> None:
    """Keep the KEEP newest checkpoints up to ``step``. Never counts a later one (set aside on resume, never ours to
    delete), so an older run's checkpoints can never push out the ones this run just wrote."""
    older = sorted(n for n in (_step_of(d) for d in os.listdir(root)) if n is not None and n < step)
    for n in older[: max(len(older) - (KEEP - 1), 0)]:
        shutil.rmtree(os.path.join(root, f"step-{n:06d}"), ignore_errors=True)


def _step_of(name: str) -> int | None:
    """The step of a checkpoint folder's name exactly as ``save_checkpoint`` spells it (``step-000007``), else None:
    a user's ``step-7`` or ``step-+7`` is no checkpoint of ours (``int`` alone would read both as 7)."""
    if not name.startswith("step-") or not name[len("step-") :].isdigit():
        return None
    step = int(name[len("step-") :])
    return step if name == f"step-{step:06d}" else None


def remove_partial_checkpoints(output_dir: str) -> list[str]:
    """Delete ``.step-*`` folders left by an interrupted write (never complete: the rename is the commit)."""
    root = os.path.join(output_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    removed = [os.path.join(root, d) for d in os.listdir(root) if d.startswith(PARTIAL_PREFIX)]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def _config_hash(config: dict | None) -> str | None:
    if config is None:
        return None
    from rlvr_fast.trainer.config import RLVRConfig

    known = {k: v for k, v in config.items() if k in RLVRConfig.field_names()}
    return RLVRConfig(**known).run_hash()


def _digest(path: str) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def file_record(path: str) -> dict:
    """A file's entry in the manifest: its size and BLAKE2b digest."""
    return {"bytes": os.path.getsize(path), "blake2b": _digest(path)}


def write_manifest(
    folder: str,
    step: int,
    config_hash: str | None,
    files: dict[str, dict],
    *,
    fmt: str = "safetensors",
    world_size: int = 1,
) -> None:
    """``manifest.json``: the step, config hash, format (``FORMATS``), world size and every file's ``file_record``."""
    manifest = {"step": step, "config_hash": config_hash, "format": fmt, "world_size": world_size, "files": files}
    with open(os.path.join(folder, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


# (path, deep) -> (mtime_ns and size of every file, verdict): a checkpoint is hashed once per process
_VERIFIED: dict[tuple[str, bool], tuple[tuple, str | None]] = {}


def verify_checkpoint(path: str, config_hash: str | None = None, deep: bool = True) -> str | None:
    """None when the checkpoint at ``path`` is usable, else why not (one line).

    Checks: every file of the manifest present with its recorded size, the safetensors headers readable, the trainer
    state parseable and of the manifest's step, and (``deep``) every file's digest; with ``config_hash``, the run's
    config hash recorded in the manifest."""
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest_path):
        return f"{manifest_path} is missing (an incomplete checkpoint, or one written before manifests)"
    try:
        stamp = tuple(
            (n, os.stat(os.path.join(path, n)).st_mtime_ns, os.path.getsize(os.path.join(path, n)))
            for n in sorted(os.listdir(path))
        )
    except OSError as exc:
        return f"{path}: {exc}"
    cached = _VERIFIED.get((path, deep))
    if cached is not None and cached[0] == stamp:
        problem = cached[1]
    else:
        problem = _verify_files(path, manifest_path, deep)
        _VERIFIED[(path, deep)] = (stamp, problem)
    if problem is None and config_hash is not None:
        with open(manifest_path) as f:
            recorded = json.load(f).get("config_hash")
        if recorded != config_hash:
            problem = f"{path} was written by a run with another config (hash {recorded}, this run's {config_hash})"
    return problem


def _verify_files(path: str, manifest_path: str, deep: bool) -> str | None:
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
        files = manifest["files"]
        fmt = FORMATS[manifest.get("format", "safetensors")]  # written before the field: one process's safetensors
        required = fmt.required_files(manifest)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{manifest_path} is unreadable ({type(exc).__name__}: {exc})"
    for name in required:
        if name not in files:
            return f"{manifest_path} does not list {name}"
    for name, record in files.items():
        file = os.path.join(path, name)
        if os.path.basename(name) != name or name in (".", ".."):  # every file of a checkpoint is in its folder
            return f"{manifest_path} lists {name!r}, which is not a file of the checkpoint's folder"
        if not os.path.isfile(file):
            return f"{file} is missing"
        size = os.path.getsize(file)
        if size != record["bytes"]:
            return f"{file} has {size} bytes, the manifest records {record['bytes']} (truncated or replaced)"
        if deep and _digest(file) != record["blake2b"]:
            return f"{file} does not match its digest in the manifest (corrupt)"
        try:
            problem = _read_check(name)(file, manifest)
        except CheckpointError as exc:  # names the file and why (e.g. an index that would run code: refused)
            return str(exc)
        except Exception as exc:  # safetensors / pickle raise their own error types; any failure means unusable
            return f"{file} is unreadable ({type(exc).__name__}: {exc})"
        if problem:
            return problem
    return None


def _safetensors_readable(file: str, manifest: dict) -> str | None:
    from safetensors import safe_open

    with safe_open(file, framework="pt") as st:
        st.keys()
    return None


def _trainer_state_readable(file: str, manifest: dict) -> str | None:
    with open(file) as f:
        state = json.load(f)
    if state.get("step") != manifest.get("step"):
        return f"{file} is of step {state.get('step')}, the manifest of step {manifest.get('step')}"
    return None


def _dcp_metadata_readable(file: str, manifest: dict) -> str | None:
    return dcp_layout.check_storage_files(os.path.dirname(file), manifest["files"])


# How a file of a checkpoint is checked readable, by its name's ending (others: size and digest only)
READ_CHECKS = {
    ".safetensors": _safetensors_readable,
    "trainer_state.json": _trainer_state_readable,
    dcp_layout.DCP_METADATA: _dcp_metadata_readable,  # torch.distributed.checkpoint's index of every shard
}


def _read_check(name: str):
    for ending, check in READ_CHECKS.items():
        if name.endswith(ending):
            return check
    return lambda file, manifest: None


def checkpoint_format(path: str) -> str:
    """The format of the checkpoint folder ``path``: "dcp" where torch.distributed.checkpoint's ``.metadata`` is,
    else "safetensors"."""
    return "dcp" if os.path.isfile(os.path.join(path, dcp_layout.DCP_METADATA)) else "safetensors"


@dataclass(frozen=True)
class ResumePoint:
    path: str  # the checkpoint folder to resume from
    state: dict  # its trainer_state.json
    skipped: tuple[str, ...]  # newer checkpoints that failed verification, each with the reason


def list_checkpoints(output_dir: str) -> list[str]:
    """Complete checkpoint folders, newest (highest step) first."""
    root = os.path.join(output_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    steps = sorted((n for n in (_step_of(d) for d in os.listdir(root)) if n is not None), reverse=True)
    folders = [os.path.join(root, f"step-{n:06d}") for n in steps]
    return [f for f in folders if os.path.isdir(f) and not os.path.islink(f)]  # we write folders, never links


def find_resumable(output_dir: str) -> ResumePoint:
    """The newest checkpoint in ``output_dir`` that verifies, the reasons the newer ones did not.

    Raises CheckpointError naming every checkpoint and its problem when none verifies (or there is none)."""
    skipped = []
    candidates = list_checkpoints(output_dir)
    for path in candidates:
        problem = verify_checkpoint(path, deep=True)
        if problem is None:
            with open(os.path.join(path, "trainer_state.json")) as f:
                return ResumePoint(path, json.load(f), tuple(skipped))
        skipped.append(problem)
    root = os.path.join(output_dir, "checkpoints")
    if not candidates:
        raise CheckpointError(f"--resume: no checkpoint in {root}")
    raise CheckpointError(f"--resume: no usable checkpoint in {root}: " + "; ".join(skipped))


def set_aside(path: str) -> str:
    """Rename a checkpoint that failed verification to ``<path>.bad`` (kept for inspection, out of every count)."""
    target = path + ".bad"
    if os.path.exists(target):
        shutil.rmtree(target)
    os.replace(path, target)
    return target


def _write_atomic(path: str, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk: no stray temporary file; ``path`` is as it was
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def latest_checkpoint(output_dir: str) -> str | None:
    root = os.path.join(output_dir, "checkpoints")
    pointer = os.path.join(root, LATEST)
    if not os.path.exists(pointer):
        return None
    with open(pointer) as f:
        path = os.path.join(root, f.read().strip())
    return path if os.path.isdir(path) else None


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


def load_model_weights(path: str, model: torch.nn.Module) -> None:
    """Load the checkpoint's model weights into the one-process ``model`` strictly (``check_model_matches``), from
    either format (``FORMATS``): nothing is loaded unless everything matches."""
    weights = FORMATS[checkpoint_format(path)].load_weights(path, model)
    if weights is None:  # loaded in place
        return
    model.load_state_dict(weights, strict=False)  # strictness checked, tied names excepted


@dataclass(frozen=True)
class CheckpointFormat:
    """A checkpoint format: what its manifest must list, how one process loads its model weights."""

    description: str
    required_files: Callable[[dict], tuple[str, ...]]  # manifest -> the files it must list (each then present)
    # (path, model) -> checked full tensors for the model, or None when loaded into it in place
    load_weights: Callable[[str, torch.nn.Module], dict[str, torch.Tensor] | None]


FORMATS = {
    "safetensors": CheckpointFormat(
        "one process: model, optimizer and RNG state as whole tensors in safetensors files",
        lambda manifest: FILES,
        _safetensors_load_weights,
    ),
    "dcp": CheckpointFormat(
        "a torchrun run: each rank's shards through torch.distributed.checkpoint, an RNG file per rank",
        lambda manifest: dcp_layout.required_files(int(manifest.get("world_size", 1))),
        dcp_layout.load_weights_one_process,
    ),
}


def load_checkpoint(path: str, model: torch.nn.Module, optimizer) -> dict:
    """Restore a one-process checkpoint's model, optimizer and RNG state in place; returns the trainer state (step,
    ...). A torchrun run's checkpoint resumes through ``sharded_checkpoint.load_sharded_checkpoint``."""
    if checkpoint_format(path) != "safetensors":
        raise CheckpointError(
            f"checkpoint {path} holds a torchrun run's shards (torch.distributed.checkpoint): resume it under torchrun "
            f"with the world size that wrote it"
        )
    load_model_weights(path, model)
    optimizer.load_state_dict(load_nested(os.path.join(path, "optimizer.safetensors")))
    set_rng_state(load_nested(os.path.join(path, "rng.safetensors")))
    with open(os.path.join(path, "trainer_state.json")) as f:
        return json.load(f)
