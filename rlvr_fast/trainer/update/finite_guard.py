"""NaN/inf anywhere in an update stops the run before it writes anything, naming the step.

Checked after each optimizer step: the loss and gradient norm the step reported, and every trainable parameter
(an infinite learning rate, say, turns finite gradients into NaN weights; the next rollout would then die inside
``torch.multinomial`` with no step number, and the next checkpoint would be all NaN), finite and not beyond
``DIVERGED_MAGNITUDE`` (a learning rate of 1e30 leaves weights finite but ~1e30). Weights that diverge short of that
and give NaN/inf logits are caught by the rollout itself (``DivergedSamplingError``, named by ``rollout_of_step``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import torch


class NonFiniteError(FloatingPointError):
    """A NaN/inf in a training step; the message names the step and what was not finite."""


class DivergedSamplingError(NonFiniteError, RuntimeError):
    """NaN/inf next-token probabilities in a rollout: the policy's weights diverged. A RuntimeError too, as the
    ``torch.multinomial`` error it replaces."""


# A trainable parameter beyond this magnitude has diverged (trained weights are orders of magnitude smaller; fp16
# cannot even hold it): a learning rate of 1e30 leaves every weight finite but ~1e30, and the next rollout's logits
# inf. Stopping at the update keeps such weights out of the next checkpoint.
DIVERGED_MAGNITUDE = 1e6


def check_update_finite(step: int, metrics: dict, model: torch.nn.Module) -> None:
    """Raise NonFiniteError if the step's loss / grad norm is not finite, or any trainable parameter is not finite
    or beyond ``DIVERGED_MAGNITUDE``."""
    for key in ("loss", "grad_norm"):
        value = metrics.get(key)
        if value is not None and not math.isfinite(value):
            raise NonFiniteError(f"step {step}: the {key} is {value}; stopping before anything is written")
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        return
    # one pass per parameter, as an isfinite check: NaN compares false, so NaN, inf and huge all fail it
    sane = torch.stack([(p.detach().abs() <= DIVERGED_MAGNITUDE).all() for _, p in params])
    if bool(sane.all()):
        return
    name, param = params[int((~sane).nonzero()[0])]
    if bool(torch.isfinite(param.detach()).all()):
        what = f"values up to {float(param.detach().abs().max()):.3g} (beyond {DIVERGED_MAGNITUDE:g}: diverged)"
    else:
        what = "NaN/inf"
    raise NonFiniteError(
        f"step {step}: parameter {name!r} holds {what} after the optimizer step (learning rate or loss scale too "
        f"large, or no grad_clip?); stopping before anything is written (the last checkpoint is intact)"
    )


@contextmanager
def rollout_of_step(step: int):
    """Name the step (a warm-up rollout: ``step`` < 0) in a ``DivergedSamplingError`` raised by the rollout."""
    try:
        yield
    except DivergedSamplingError as exc:
        where = f"step {step}" if step >= 0 else f"warm-up rollout {-step}"
        raise DivergedSamplingError(
            f"{where}: {exc}; the checkpoints written since it diverged hold such weights: resume from an earlier one "
            f"with a lower lr, or start a new run"
        ) from exc


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
