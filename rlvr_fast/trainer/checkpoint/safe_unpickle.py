"""Reading a torchrun checkpoint (torch.distributed.checkpoint, "DCP") without running code it names.

DCP stores two kinds of pickle: its index ``.metadata`` (read by ``FileSystemReader.read_metadata`` with a plain
``pickle.load``) and each non-tensor value of the state dict (the optimizer's hyper-parameters; read by
``DefaultLoadPlanner.load_bytes`` with ``torch.load(weights_only=False)``). A plain unpickler calls whatever a pickle
names: a checkpoint folder from anywhere would run its author's code when verified, evaluated or resumed.
The digests of the manifest do not help: whoever replaces a file can rewrite the manifest too.

So every DCP read of ours goes through ``SafeFileSystemReader`` and ``SafeLoadPlanner`` (``dcp_load``):

- ``.metadata`` is unpickled by ``IndexUnpickler``, which resolves only the classes a DCP index is made of
  (``ALLOWED``: torch.distributed.checkpoint's metadata dataclasses, ``torch.Size``, torch's dtypes / layouts /
  memory formats, a path) and refuses any other global by name (``UnsafePickleError``) before anything is called;
- a non-tensor value is read with ``torch.load(weights_only=True)`` (plain values, containers and tensors only).

Tensors themselves DCP already reads with ``weights_only=True``.
"""

from __future__ import annotations

import functools
import io
import os
import pickle
import re
import warnings
from typing import Any

import torch

# module -> the names a DCP index may refer to (what torch 2.x writes; docs/design.md, "Failure guarantees")
ALLOWED: dict[str, frozenset[str]] = {
    "torch.distributed.checkpoint.metadata": frozenset(
        {
            "Metadata",
            "MetadataIndex",
            "StorageMeta",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "TensorProperties",
            "_MEM_FORMAT_ENCODING",
        }
    ),
    "torch.distributed.checkpoint.filesystem": frozenset({"_StorageInfo"}),
    "torch": frozenset({"Size"}),
    "torch.serialization": frozenset({"_get_layout"}),  # a layout by its name (copyreg's reduction of torch.layout)
    "pathlib": frozenset({"PosixPath", "PurePosixPath", "PureWindowsPath"}),  # StorageMeta.checkpoint_id
    "collections": frozenset({"OrderedDict"}),
    "builtins": frozenset({"set", "frozenset", "complex"}),
}
# torch.<name> constants a DCP index holds by reference (torch.float32, torch.strided, torch.contiguous_format, ...)
TORCH_CONSTANTS = (torch.dtype, torch.layout, torch.memory_format)


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle in a checkpoint refers to something a DCP index never holds (a function that would run on load)."""


class IndexUnpickler(pickle.Unpickler):
    """An unpickler that resolves only ``ALLOWED`` globals and torch's dtype / layout / memory-format constants."""

    def __init__(self, file, source: str):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if name in ALLOWED.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), TORCH_CONSTANTS):
            return getattr(torch, name)
        raise UnsafePickleError(
            f"{self.source} refers to {module}.{name}, which a torch.distributed.checkpoint index never holds; "
            f"refusing to unpickle it (it would run when loaded)"
        )


def load_index(file, source: str):
    """The DCP ``Metadata`` pickled in the binary stream ``file`` (``source``: its name for errors), read by
    ``IndexUnpickler``. Raises UnsafePickleError for a foreign global, or when the result is no ``Metadata``."""
    from torch.distributed.checkpoint.metadata import Metadata

    metadata = IndexUnpickler(file, source).load()
    if not isinstance(metadata, Metadata):
        raise UnsafePickleError(f"{source} holds a {type(metadata).__name__}, not a torch.distributed.checkpoint index")
    return metadata


@functools.cache  # defined on first use: torch.distributed.checkpoint is imported only by what reads one
def _reader_class():
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeFileSystemReader(FileSystemReader):
        """torch's FileSystemReader whose ``read_metadata`` unpickles ``.metadata`` with ``load_index``."""

        def read_metadata(self, *args: Any, **kwargs: Any):
            path = self._get_metadata_path(kwargs.get("rank"))
            with self.fs.create_stream(path, "rb") as stream:
                metadata = load_index(stream, os.fspath(path))
            if getattr(metadata, "storage_meta", None) is None:  # as torch's own: an index written before the field
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeFileSystemReader


@functools.cache
def _planner_class():
    from torch.distributed.checkpoint._traverse import set_element
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    class SafeLoadPlanner(DefaultLoadPlanner):
        """torch's DefaultLoadPlanner whose non-tensor values are read with ``torch.load(weights_only=True)``."""

        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            fqn = read_item.dest_index.fqn
            try:
                loaded = torch.load(value, weights_only=True)
            except pickle.UnpicklingError as exc:  # torch's message is a page long: keep the global it names
                named = re.search(r"Unsupported global: [^.]*\S*", str(exc))
                raise UnsafePickleError(
                    f"the value of {fqn!r} in the checkpoint is not plain data; refusing to unpickle it "
                    f"({named.group(0).rstrip('.') if named else str(exc).splitlines()[0]})"
                ) from None
            if self.flatten_state_dict:  # as DefaultLoadPlanner.load_bytes, but for the unpickler
                set_element(self.original_state_dict, self.mappings[fqn], loaded)
            else:
                self.state_dict[fqn] = loaded

    return SafeLoadPlanner


def safe_reader(path: str):
    """A ``SafeFileSystemReader`` of the DCP folder ``path``."""
    return _reader_class()(path)


def safe_planner():
    """A ``SafeLoadPlanner`` (DCP's default load plan; non-tensor values as plain data only)."""
    return _planner_class()()


def read_index(path: str):
    """The DCP index (``Metadata``) of the checkpoint folder ``path``, read safely."""
    return safe_reader(path).read_metadata()


def dcp_load(state_dict: dict, path: str, **kwargs: Any) -> None:
    """``torch.distributed.checkpoint.load`` of ``state_dict`` in place from ``path`` through the safe reader and
    planner (``kwargs``: e.g. ``no_dist=True``)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with warnings.catch_warnings():
            if kwargs.get("no_dist"):  # torch warns that no process group is there: one process is the intent
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state_dict, storage_reader=safe_reader(path), planner=safe_planner(), **kwargs)
    except CheckpointException as exc:  # DCP wraps each rank's error (on every rank): a refusal is raised as itself
        for failure in (getattr(exc, "failures", None) or {}).values():
            error = failure[0] if isinstance(failure, tuple) else failure
            if isinstance(error, UnsafePickleError):
                raise UnsafePickleError(str(error)) from None
        raise
