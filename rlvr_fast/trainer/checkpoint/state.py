"""What a checkpoint holds besides the files' layout: nested state (an optimizer's state dict) as safetensors, the
random-number generators' state, the model's state dict, and the check that every tensor is finite before anything is
written. Both formats use them (``local``: one process, ``sharded``: every rank's own RNG file)."""

from __future__ import annotations

import json
import random
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file


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


def json_rng_state(state: dict) -> dict:
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
