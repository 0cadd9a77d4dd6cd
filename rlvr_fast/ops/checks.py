"""Argument checks and dtype rules shared by the ops (and the kernels' launchers): one definition each.

Every check raises with the caller's name (``where``: an op or a class), the argument's name, what was expected and
what was given.
"""

from __future__ import annotations

import math

import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums and gradients are accumulated in for inputs of ``dtype``: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype ``torch.autocast`` casts matmuls to on ``device`` now, or None when autocast is off there."""
    if device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def is_real_number(x) -> bool:
    """A Python int or float (a bool is not a number here: ``beta=True`` is a mistake, not 1.0)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def finite_number(
    where: str, name: str, value, *, low: float | None = None, high: float | None = None, low_open: bool = False
) -> float:
    """``value`` as a float, checked finite and within [low, high] (or (low, high] with ``low_open``)."""
    if not is_real_number(value) or not math.isfinite(value):
        raise ValueError(f"{where}: {name} must be a finite real number, got {value!r}")
    value = float(value)
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{where}: {name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{where}: {name} must be <= {high}, got {value}")
    return value


def real_tensor(where: str, name: str, x, *, floating: bool) -> torch.Tensor:
    """``x`` checked to be a real torch.Tensor (and a floating one with ``floating``)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.is_complex():
        raise TypeError(f"{where}: {name} must be real, got dtype {x.dtype}")
    if floating and not x.is_floating_point():
        raise TypeError(f"{where}: {name} must be a floating tensor (fp16, bf16, fp32 or fp64), got dtype {x.dtype}")
    return x
