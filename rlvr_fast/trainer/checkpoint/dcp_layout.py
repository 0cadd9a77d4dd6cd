"""What the checkpoint folder of a torchrun run holds (torch.distributed.checkpoint, "DCP"; written by
``trainer/checkpoint/sharded.py``), and what needs no process group: the files a manifest must list, the check that
DCP's ``.metadata`` index places every shard in a listed file, the model's tensor shapes, the world-size rule of
resume, and the one-process read of the model's weights (``rlvr-fast eval --checkpoint``)."""

from __future__ import annotations

import os

import torch

from rlvr_fast.trainer.checkpoint.folder import CheckpointFormat, register_format
from rlvr_fast.trainer.checkpoint.safe_unpickle import UnsafePickleError, dcp_load, read_index
from rlvr_fast.trainer.checkpoint.strict_loading import CheckpointError, check_model_matches, tied_names

DCP_METADATA = ".metadata"  # torch.distributed.checkpoint.filesystem's index file
MODEL_KEY, OPTIM_KEY = "model", "optim"  # the two parts of the saved state dict (DCP flattens to "model.<name>")


def rng_file(rank: int) -> str:
    return f"rng-rank{rank}.safetensors"


def required_files(world_size: int) -> tuple[str, ...]:
    """The files a DCP checkpoint's manifest must list (the shard files besides: whatever ``.metadata`` names)."""
    return (DCP_METADATA, "trainer_state.json", *(rng_file(r) for r in range(world_size)))


def check_world_size(path: str, state: dict, world_size: int) -> None:
    """Refuse to resume ``path`` (trainer state ``state``) with another world size than the one that wrote it."""
    saved = int(state.get("world_size", 1))
    if saved != world_size:
        raise CheckpointError(
            f"--resume: checkpoint {path} was written by {saved} process(es) and this run has {world_size}: a resumed "
            f"run continues the same run only on the world size that wrote it (each rank samples its share of a step "
            f"with its own seed and restores its own RNG state); run with torchrun --nproc_per_node={saved}"
            + (" (or without torchrun)" if saved == 1 else "")
            + ", or start a new run from its weights"
        )


def read_metadata(path: str):
    """DCP's index of the checkpoint at ``path``, unpickled by ``safe_unpickle`` (a pickle that names anything but
    the index's own types is refused, never run). Raises CheckpointError naming the file."""
    file = os.path.join(path, DCP_METADATA)
    try:
        return read_index(path)
    except UnsafePickleError as exc:  # names the file and the global it refused
        raise CheckpointError(str(exc)) from None
    except Exception as exc:  # a truncated / corrupt index: torch's own error names no file
        raise CheckpointError(f"checkpoint {file} is unreadable ({type(exc).__name__}: {exc})") from None


def check_storage_files(folder: str, files: dict[str, dict]) -> str | None:
    """None when every byte range ``.metadata`` names lies in a file of the manifest (``files``: name -> record),
    else the first file that does not hold it."""
    metadata = read_metadata(folder)
    for index, info in (metadata.storage_data or {}).items():
        file = os.path.join(folder, info.relative_path)
        if info.relative_path not in files:
            return f"{file}, which holds {index.fqn} ({DCP_METADATA}), is not in the manifest"
        if info.offset + info.length > files[info.relative_path]["bytes"]:
            return f"{file} is shorter than the bytes of {index.fqn} that {DCP_METADATA} places in it"
    return None


def saved_model_shapes(path: str) -> dict[str, tuple]:
    """name -> global shape of every model tensor in the DCP checkpoint at ``path``."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    prefix = MODEL_KEY + "."
    return {
        key[len(prefix) :]: tuple(md.size)
        for key, md in read_metadata(path).state_dict_metadata.items()
        if key.startswith(prefix) and isinstance(md, TensorStorageMetadata)
    }


def load_weights_one_process(path: str, model: torch.nn.Module) -> None:
    """The model's weights of a DCP checkpoint into the one-process ``model`` (no process group; each tensor read
    whole from the ranks' shards), strictly (``check_model_matches``): nothing is loaded unless all of it reads."""
    saved = saved_model_shapes(path)
    current = model.state_dict()
    check_model_matches(path, saved, {n: tuple(t.shape) for n, t in current.items()}, tied_names(model))
    template = {n: torch.empty_like(t) for n, t in current.items() if n in saved}
    try:
        dcp_load({MODEL_KEY: template}, path, no_dist=True)  # no pickle of it runs code (safe_unpickle)
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path}: its shards are unreadable ({type(exc).__name__}: {exc})") from None
    with torch.no_grad():
        for name, t in template.items():
            current[name].copy_(t)


def _dcp_metadata_readable(file: str, manifest: dict) -> str | None:
    return check_storage_files(os.path.dirname(file), manifest["files"])


register_format(
    "dcp",
    CheckpointFormat(
        "a torchrun run: each rank's shards through torch.distributed.checkpoint, an RNG file per rank",
        lambda manifest: required_files(int(manifest.get("world_size", 1))),
        load_weights_one_process,
        marker=DCP_METADATA,
        read_checks={DCP_METADATA: _dcp_metadata_readable},  # torch.distributed.checkpoint's index of every shard
    ),
)
