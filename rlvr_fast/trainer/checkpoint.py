"""Checkpoints in safetensors, written atomically, with everything an exact resume needs.

Layout: ``<output_dir>/checkpoints/step-000010/`` holds ``model.safetensors`` (the policy's weights),
``optimizer.safetensors`` (every tensor of the optimizer's state dict; the non-tensor structure rides in the file's
metadata as JSON) and ``trainer_state.json`` (step, RNG states, config, metrics needed to continue). A checkpoint is
written into a temporary folder and renamed into place; ``latest`` (a one-line file, itself replaced atomically) points
at the newest complete one. An interrupted write therefore never loses the last good checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

LATEST = "latest"
KEEP = 2  # complete checkpoints kept on disk


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


def save_checkpoint(output_dir: str, step: int, model: torch.nn.Module, optimizer, trainer_state: dict) -> str:
    root = os.path.join(output_dir, "checkpoints")
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"step-{step:06d}")
    tmp = tempfile.mkdtemp(prefix=f".step-{step:06d}-", dir=root)
    try:
        save_file(model_state(model), os.path.join(tmp, "model.safetensors"))
        save_nested(os.path.join(tmp, "optimizer.safetensors"), optimizer.state_dict())
        save_nested(os.path.join(tmp, "rng.safetensors"), _json_rng(rng_state()))
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump({"step": step, **trainer_state}, f, indent=1)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_atomic(os.path.join(root, LATEST), os.path.basename(final) + "\n")
    complete = sorted(d for d in os.listdir(root) if d.startswith("step-"))
    for old in complete[:-KEEP]:
        shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    return final


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


def load_checkpoint(path: str, model: torch.nn.Module, optimizer) -> dict:
    """Restore model, optimizer and RNG state in place; returns the trainer state (step, ...)."""
    weights = load_file(os.path.join(path, "model.safetensors"))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    # Tied weights were stored once: whatever is missing must be tied to a tensor that was loaded.
    tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
    really_missing = [m for m in missing if m not in tied]
    if really_missing or unexpected:
        raise ValueError(
            f"checkpoint {path} does not match the model: missing {really_missing[:5]}, unexpected {unexpected[:5]}"
        )
    optimizer.load_state_dict(load_nested(os.path.join(path, "optimizer.safetensors")))
    set_rng_state(load_nested(os.path.join(path, "rng.safetensors")))
    with open(os.path.join(path, "trainer_state.json")) as f:
        return json.load(f)
