"""NaN/inf anywhere in an update stops the run before it writes anything, naming the step.

Checked after each optimizer step: the loss and gradient norm the step reported, and every trainable parameter
(an infinite learning rate, say, turns finite gradients into NaN weights; the next rollout would then die inside
``torch.multinomial`` with no step number, and the next checkpoint would be all NaN).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch


class NonFiniteError(FloatingPointError):
    """A NaN/inf in a training step; the message names the step and what was not finite."""


def check_update_finite(step: int, metrics: dict, model: torch.nn.Module) -> None:
    """Raise NonFiniteError if the step's loss / grad norm or any trainable parameter is not finite."""
    for key in ("loss", "grad_norm"):
        value = metrics.get(key)
        if value is not None and not math.isfinite(value):
            raise NonFiniteError(f"step {step}: the {key} is {value}; stopping before anything is written")
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        return
    finite = torch.stack([torch.isfinite(p.detach()).all() for _, p in params])
    if not bool(finite.all()):
        name = params[int((~finite).nonzero()[0])][0]
        raise NonFiniteError(
            f"step {step}: parameter {name!r} holds NaN/inf after the optimizer step (learning rate or loss "
            f"scale too large?); stopping before anything is written (the last checkpoint is intact)"
        )


def checked_update(step: int, update: Callable[[Any], dict], batch: Any, model: torch.nn.Module) -> dict:
    """Run one update (``update(batch)`` returns its metrics) and check it; any FloatingPointError names the step."""
    try:
        metrics = update(batch)
    except NonFiniteError:
        raise
    except FloatingPointError as exc:
        raise NonFiniteError(f"step {step}: {exc}") from exc
    check_update_finite(step, metrics, model)
    return metrics
