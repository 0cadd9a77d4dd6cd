"""Strict loading of checkpoints (docs/design.md, "Failure guarantees" 5): the error a checkpoint that cannot be used
raises, and the check that a checkpoint's tensors are exactly the model's (none missing but tied ones, none
unexpected, every shape equal), for every checkpoint format."""

from __future__ import annotations

import torch


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (incomplete, corrupt, of another run or model); the message names the path."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint that could not be written (a full disk, a read-only folder, a failed DCP write): the message names
    the step, the folder, the cause and the last good checkpoint, which stays as it was. ``rlvr-fast train`` prints it
    in one line and exits 1."""


def check_model_matches(path: str, saved: dict[str, tuple], model_shapes: dict[str, tuple], tied: set[str]) -> None:
    """Strict loading: every tensor of the model in the checkpoint (tied weights may be stored once), none
    unexpected, shapes equal. ``saved`` / ``model_shapes``: name -> shape. Raises CheckpointError naming ``path``."""
    missing = [n for n in model_shapes if n not in saved and n not in tied]
    unexpected = [n for n in saved if n not in model_shapes]
    misshapen = [
        f"{n} {tuple(saved[n])} vs {tuple(shape)}"
        for n, shape in model_shapes.items()
        if n in saved and tuple(saved[n]) != tuple(shape)
    ]
    if missing or unexpected or misshapen:
        raise CheckpointError(
            f"checkpoint {path} does not match the model ({len(model_shapes)} tensors): {len(missing)} missing "
            f"{missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}, {len(misshapen)} of another shape "
            f"{misshapen[:3]}"
        )


def tied_names(model: torch.nn.Module) -> set[str]:
    """The names of parameters that are another parameter (tied weights: stored once in a safetensors file)."""
    return {n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
