"""Backend selection shared by every op.

``auto`` picks, in order: the CUDA extension (``rlvr_fast._C``) when it is built, holds the op and the inputs are on a
CUDA device; Triton when the inputs are on a CUDA device, or on the CPU with the Triton interpreter on
(``TRITON_INTERPRET=1`` set before any kernel module is imported); else the plain PyTorch path. Asking for a backend
that is not available raises with the reason: nothing silently falls back.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from functools import cache

import torch

BACKENDS = ("auto", "cuda", "triton", "torch")


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run this call (the message says why)."""


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


CUDA_EXTENSION = "rlvr_fast._C"
NOT_BUILT = f"the extension {CUDA_EXTENSION} is not built (it needs CUDA torch and nvcc at install time)"


@cache
def _cuda_extension() -> tuple[object | None, str | None]:
    """(the module, None) when ``rlvr_fast._C`` imports, else (None, why not).

    "Not built" only when no such module exists; a build that exists but fails to import (an undefined symbol, a torch
    it was not compiled against) keeps its error, so ``backend="cuda"`` says what is wrong instead of "not built".
    """
    if importlib.util.find_spec(CUDA_EXTENSION) is None:
        return None, NOT_BUILT
    try:
        return importlib.import_module(CUDA_EXTENSION), None
    except ImportError as exc:
        return None, f"the extension {CUDA_EXTENSION} is built but failed to import: {type(exc).__name__}: {exc}"


def has_cuda_extension() -> bool:
    """True when the optional extension ``rlvr_fast._C`` was built and imports."""
    return _cuda_extension()[0] is not None


def triton_unavailable_reason(device: torch.device) -> str | None:
    if not _triton_installed():
        return "triton is not installed"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and triton_interpreter_enabled():
        return None
    return (
        f"Triton kernels need CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before rlvr_fast.kernels is "
        f"imported; got tensors on {device}"
    )


def cuda_unavailable_reason(device: torch.device, cuda_op: str | None) -> str | None:
    if cuda_op is None:
        return "this op has no CUDA C++ kernel"
    extension, why_not = _cuda_extension()
    if extension is None:
        return why_not
    if not hasattr(torch.ops.rlvr_fast, cuda_op):
        return f"rlvr_fast._C does not provide {cuda_op}"
    if device.type != "cuda":
        return f"the CUDA kernel needs CUDA tensors; got tensors on {device}"
    return None


def select_backend(
    backend: str,
    device: torch.device,
    *,
    op: str,
    cuda_op: str | None = None,
    triton_ok: bool = True,
    triton_limit: str | None = None,
) -> str:
    """Resolve ``backend`` to one of ``"cuda"``, ``"triton"``, ``"torch"`` for inputs on ``device``.

    ``triton_ok=False`` (with ``triton_limit`` saying why) marks inputs the op's Triton kernel does not cover;
    ``auto`` then takes the torch path and an explicit ``backend="triton"`` raises.
    """
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    if backend == "cuda":
        reason = cuda_unavailable_reason(device, cuda_op)
        if reason:
            raise BackendUnavailableError(f"{op}: backend='cuda' is unavailable: {reason}")
        return "cuda"
    if backend == "triton":
        reason = triton_unavailable_reason(device) or (None if triton_ok else triton_limit)
        if reason:
            raise BackendUnavailableError(f"{op}: backend='triton' is unavailable: {reason}")
        return "triton"
    # auto
    if cuda_unavailable_reason(device, cuda_op) is None:
        return "cuda"
    if triton_ok and triton_unavailable_reason(device) is None:
        return "triton"
    return "torch"


def check_backend_name(where: str, backend) -> str:
    """``backend`` checked to be one of ``BACKENDS`` (a ValueError naming ``where`` otherwise)."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"{where}: backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def check_backend_available(where: str, backend: str, device: torch.device, ops: dict[str, str | None]) -> None:
    """Raise now, as the first call of each op would, when ``backend`` cannot run the ops ``ops`` (op name -> its CUDA
    op, or None) on ``device``: for wrappers (the TRL trainer) that would otherwise find out after generation."""
    check_backend_name(where, backend)
    for op, cuda_op in ops.items():
        try:
            select_backend(backend, device, op=op, cuda_op=cuda_op)
        except BackendUnavailableError as exc:
            raise BackendUnavailableError(f"{where}: backend={backend!r} cannot run {op} on {device}: {exc}") from exc
