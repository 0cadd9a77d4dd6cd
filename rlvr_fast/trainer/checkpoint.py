"""Checkpoints in safetensors, written atomically, with everything an exact resume needs.

Layout: ``<output_dir>/checkpoints/step-000010/`` holds ``model.safetensors`` (the policy's weights),
``optimizer.safetensors`` (every tensor of the optimizer's state dict; the non-tensor structure rides in the file's
metadata as JSON) and ``trainer_state.json`` (step, RNG states, config, metrics needed to continue). A checkpoint is
written into a temporary folder and renamed into place; ``latest`` (a one-line file, itself replaced atomically) points
at the newest complete one. An interrupted write therefore never loses the last good checkpoint.

Verified before it counts (docs/design.md, "Failure guarantees"): every tensor is checked finite before anything is
written (a NaN names the step and the tensor), ``manifest.json`` records each file's size and BLAKE2b digest and the
run's config hash, and the folder is re-read against the manifest before ``latest`` moves to it. Resuming walks the
checkpoints newest first and takes the first that verifies (``find_resumable``), saying why it skipped any. Partial
``.step-*`` folders left by a killed write are removed. Loading is strict: a missing, unexpected or misshapen tensor is
an error.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

LATEST = "latest"
KEEP = 2  # complete checkpoints kept on disk
MANIFEST = "manifest.json"
FILES = ("model.safetensors", "optimizer.safetensors", "rng.safetensors", "trainer_state.json")
PARTIAL_PREFIX = ".step-"  # a checkpoint being written (renamed to step-N when complete)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (incomplete, corrupt, of another run or model); the message names the path."""


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


def save_checkpoint(
    output_dir: str,
    step: int,
    model: torch.nn.Module,
    optimizer,
    trainer_state: dict,
    *,
    weights: dict[str, torch.Tensor] | None = None,
    optim_state: dict | None = None,
) -> str:
    """Write ``checkpoints/step-<step>`` (verified) and move ``latest`` to it; keep the KEEP newest up to ``step``.

    ``trainer_state["config"]`` (a dict of RLVRConfig) is hashed into the manifest when present. ``weights`` /
    ``optim_state``: the model's and optimizer's full state dicts when they are not ``model``'s / ``optimizer``'s own
    (a sharded model gathers them first: ``trainer/distributed.py``)."""
    root = os.path.join(output_dir, "checkpoints")
    os.makedirs(root, exist_ok=True)
    remove_partial_checkpoints(output_dir)
    weights = model_state(model) if weights is None else {k: v.detach().cpu().contiguous() for k, v in weights.items()}
    check_finite_tensors(weights, "model", step)
    optim_state = optimizer.state_dict() if optim_state is None else optim_state
    check_finite_tensors(dict(_tensors_in(optim_state["state"], "state")), "optimizer", step)
    final = os.path.join(root, f"step-{step:06d}")
    tmp = tempfile.mkdtemp(prefix=f"{PARTIAL_PREFIX}{step:06d}-", dir=root)
    config_hash = _config_hash(trainer_state.get("config"))
    try:
        save_file(weights, os.path.join(tmp, "model.safetensors"))
        save_nested(os.path.join(tmp, "optimizer.safetensors"), optim_state)
        save_nested(os.path.join(tmp, "rng.safetensors"), _json_rng(rng_state()))
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump({"step": step, "config_hash": config_hash, **trainer_state}, f, indent=1)
        _write_manifest(tmp, step, config_hash)
        problem = verify_checkpoint(tmp, config_hash=config_hash, deep=False)
        if problem:
            raise CheckpointError(f"the checkpoint of step {step} failed verification after writing: {problem}")
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_atomic(os.path.join(root, LATEST), os.path.basename(final) + "\n")
    _prune(root, step)
    return final


def _prune(root: str, step: int) -> None:
    """Keep the KEEP newest checkpoints up to ``step``. Never counts a later one (set aside on resume, never ours to
    delete), so an older run's checkpoints can never push out the ones this run just wrote."""
    older = sorted(n for n in (_step_of(d) for d in os.listdir(root)) if n is not None and n < step)
    for n in older[: max(len(older) - (KEEP - 1), 0)]:
        shutil.rmtree(os.path.join(root, f"step-{n:06d}"), ignore_errors=True)


def _step_of(name: str) -> int | None:
    if not name.startswith("step-"):
        return None
    try:
        return int(name[len("step-") :])
    except ValueError:
        return None


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


def _write_manifest(folder: str, step: int, config_hash: str | None) -> None:
    files = {
        name: {"bytes": os.path.getsize(os.path.join(folder, name)), "blake2b": _digest(os.path.join(folder, name))}
        for name in FILES
    }
    with open(os.path.join(folder, MANIFEST), "w") as f:
        json.dump({"step": step, "config_hash": config_hash, "files": files}, f, indent=1)
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
    from safetensors import safe_open

    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{manifest_path} is unreadable ({type(exc).__name__}: {exc})"
    for name in FILES:
        file = os.path.join(path, name)
        if name not in files:
            return f"{manifest_path} does not list {name}"
        if not os.path.isfile(file):
            return f"{file} is missing"
        size = os.path.getsize(file)
        if size != files[name]["bytes"]:
            return f"{file} has {size} bytes, the manifest records {files[name]['bytes']} (truncated or replaced)"
        if deep and _digest(file) != files[name]["blake2b"]:
            return f"{file} does not match its digest in the manifest (corrupt)"
        try:
            if name.endswith(".safetensors"):
                with safe_open(file, framework="pt") as st:
                    st.keys()
            else:
                with open(file) as f:
                    state = json.load(f)
                if state.get("step") != manifest.get("step"):
                    return f"{file} is of step {state.get('step')}, the manifest of step {manifest.get('step')}"
        except Exception as exc:  # safetensors raises its own error type; any failure means unusable
            return f"{file} is unreadable ({type(exc).__name__}: {exc})"
    return None


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
    return [os.path.join(root, f"step-{n:06d}") for n in steps]


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
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def latest_checkpoint(output_dir: str) -> str | None:
    root = os.path.join(output_dir, "checkpoints")
    pointer = os.path.join(root, LATEST)
    if not os.path.exists(pointer):
        return None
    with open(pointer) as f:
        path = os.path.join(root, f.read().strip())
    return path if os.path.isdir(path) else None


def load_model_weights(path: str, model: torch.nn.Module, load=None) -> None:
    """Load ``path``/model.safetensors into ``model`` strictly: every tensor of the model present (tied weights stored
    once), none unexpected, shapes equal. Raises CheckpointError naming the path otherwise. ``load(weights)``: how a
    sharded model takes the checked full tensors (default ``model.load_state_dict``)."""
    file = os.path.join(path, "model.safetensors")
    if not os.path.isfile(file):
        raise CheckpointError(f"checkpoint {path}: no model.safetensors there")
    try:
        weights = load_file(file)
    except Exception as exc:  # a truncated / corrupt file: safetensors' own error names no file
        raise CheckpointError(f"checkpoint {file} is unreadable ({type(exc).__name__}: {exc})") from None
    expected = model.state_dict()
    # Tied weights were stored once: whatever is missing must be tied to a tensor that was loaded.
    tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
    missing = [n for n in expected if n not in weights and n not in tied]
    unexpected = [n for n in weights if n not in expected]
    misshapen = [
        f"{n} {tuple(weights[n].shape)} vs {tuple(t.shape)}"
        for n, t in expected.items()
        if n in weights and weights[n].shape != t.shape
    ]
    if missing or unexpected or misshapen:
        raise CheckpointError(
            f"checkpoint {path} does not match the model ({len(expected)} tensors): {len(missing)} missing "
            f"{missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}, {len(misshapen)} of another shape "
            f"{misshapen[:3]}"
        )
    if load is not None:
        load(weights)
        return
    model.load_state_dict(weights, strict=False)  # strictness checked above, tied names excepted


def load_checkpoint(path: str, model: torch.nn.Module, optimizer, load_weights=None, load_optimizer=None) -> dict:
    """Restore model, optimizer and RNG state in place; returns the trainer state (step, ...). ``load_weights`` /
    ``load_optimizer``: how a sharded model and its optimizer take the full state dicts (``trainer/distributed.py``)."""
    load_model_weights(path, model, load_weights)
    optim_state = load_nested(os.path.join(path, "optimizer.safetensors"))
    (load_optimizer or optimizer.load_state_dict)(optim_state)
    set_rng_state(load_nested(os.path.join(path, "rng.safetensors")))
    with open(os.path.join(path, "trainer_state.json")) as f:
        return json.load(f)
