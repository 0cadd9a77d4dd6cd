"""Checkpoints, written atomically, with everything an exact resume needs; verified before they count.

The folder rule every checkpoint format shares: the partial folder and its commit, ``latest``, pruning, the manifest,
verification and resume. The formats register themselves (``FORMATS``): "safetensors" (one process, ``local.py``) and
"dcp" (a torchrun run: every rank writes its own shards through torch.distributed.checkpoint, ``dcp_layout.py`` and
``sharded.py``). The manifest names the format (one written before the field: "safetensors").

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
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from safetensors import SafetensorError

from rlvr_fast.trainer.checkpoint.strict_loading import CheckpointError, CheckpointWriteError

LATEST = "latest"


KEEP = 2  # complete checkpoints kept on disk


MANIFEST = "manifest.json"


PARTIAL_PREFIX = ".step-"  # a checkpoint being written (renamed to step-N when complete)


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
        write_atomic(os.path.join(root, LATEST), os.path.basename(final) + "\n")
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


def hash_of_run_config(config: dict | None) -> str | None:
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
            problem = _read_check(name, fmt)(file, manifest)
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


# How a file of a checkpoint is checked readable, by its name's ending (others: size and digest only); a format adds
# its own (``CheckpointFormat.read_checks``)
READ_CHECKS = {
    ".safetensors": _safetensors_readable,
    "trainer_state.json": _trainer_state_readable,
}


def _read_check(name: str, fmt: CheckpointFormat):
    for ending, check in {**READ_CHECKS, **fmt.read_checks}.items():
        if name.endswith(ending):
            return check
    return lambda file, manifest: None


@dataclass(frozen=True)
class CheckpointFormat:
    """A checkpoint format: what its manifest must list, how its own files are checked readable, the file whose
    presence identifies it (``marker``; None for the one-process format, the default), and how one process loads its
    model weights."""

    description: str
    required_files: Callable[[dict], tuple[str, ...]]  # manifest -> the files it must list (each then present)
    # (path, model) -> checked full tensors for the model, or None when loaded into it in place
    load_weights: Callable[[str, torch.nn.Module], dict[str, torch.Tensor] | None]
    marker: str | None = None
    read_checks: dict[str, Callable[[str, dict], str | None]] = field(default_factory=dict)


# The formats by the name a manifest records: each format's module registers itself (``register_format``), and the
# package imports both, so the registry is whole whenever any checkpoint module is imported
FORMATS: dict[str, CheckpointFormat] = {}


def register_format(name: str, fmt: CheckpointFormat) -> None:
    FORMATS[name] = fmt


def checkpoint_format(path: str) -> str:
    """The format of the checkpoint folder ``path``: the one whose marker file is there, else "safetensors"."""
    for name, fmt in FORMATS.items():
        if fmt.marker is not None and os.path.isfile(os.path.join(path, fmt.marker)):
            return name
    return "safetensors"


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


def write_atomic(path: str, text: str) -> None:
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


def load_model_weights(path: str, model: torch.nn.Module) -> None:
    """Load the checkpoint's model weights into the one-process ``model`` strictly (``check_model_matches``), from
    either format (``FORMATS``): nothing is loaded unless everything matches."""
    weights = FORMATS[checkpoint_format(path)].load_weights(path, model)
    if weights is None:  # loaded in place
        return
    model.load_state_dict(weights, strict=False)  # strictness checked, tied names excepted
