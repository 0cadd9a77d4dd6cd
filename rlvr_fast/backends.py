"""Backend selection shared by every op.

``auto`` picks, in order: the CUDA extension (``rlvr_fast._C``) when it is built, holds the op and the inputs are on a
CUDA device; Triton when the inputs are on a CUDA device, or on the CPU with the Triton interpreter on
(``TRITON_INTERPRET=1`` set before any kernel module is imported); else the plain PyTorch path. Asking for a backend
that is not available raises with the reason: nothing silently falls back.
"""

from __future__ import annotations

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


@cache
def _cuda_extension():
    try:
        from rlvr_fast import _C
    except ImportError:
        return None
    return _C


def has_cuda_extension() -> bool:
    """True when the optional extension ``rlvr_fast._C`` was built and imports."""
    return _cuda_extension() is not None


def cuda_op_available(op_name: str) -> bool:
    """True when the CUDA extension registers ``torch.ops.rlvr_fast.<op_name>``."""
    return has_cuda_extension() and hasattr(torch.ops.rlvr_fast, op_name)


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
    if not has_cuda_extension():
        return "the extension rlvr_fast._C is not built (it needs CUDA torch and nvcc at install time)"
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
