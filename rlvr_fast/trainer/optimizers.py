"""The optimizers a run can use, by name (a registry, not an if/elif chain).

- adamw: torch.optim.AdamW with its fused kernel (CUDA and CPU): one pass per parameter, no foreach temporaries (the
  foreach path allocates parameter-sized intermediates for every tensor at once: +1 GB of peak on a 135M model).
- sparse_adamw: rlvr_fast.optim.SparseAdamW on a masked subnetwork (Mukherjee et al. 2025, arXiv:2505.11711). The mask
  comes from ``mask_source``: ``random:<density>`` (seeded by the run's seed), ``grad:<density>[:<warm-up rollouts>]``
  (the largest accumulated |grad| over warm-up rollouts, global top-density; default 2 rollouts) or the path of a
  mask file written by ``rlvr_fast.optim.save_masks`` (e.g. from an earlier run's update: subnetwork reuse).
- adamw8bit: bitsandbytes' AdamW8bit, when bitsandbytes is installed (the [gpu] extra).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable

import torch

from rlvr_fast.optim import GradSaliency, SparseAdamW, load_masks, random_masks
from rlvr_fast.trainer.config import RLVRConfig

# Runs warm-up rollouts and backward passes, calling saliency.accumulate() after each (provided by the loop).
GradWarmup = Callable[[GradSaliency, int], None]


def _trainable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _adamw(cfg: RLVRConfig, model: torch.nn.Module, warmup: GradWarmup | None) -> torch.optim.Optimizer:
    params = [p for _, p in _trainable(model)]
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)


def parse_mask_source(source: str) -> tuple[str, float | str, int]:
    """('random' | 'grad' | 'file', density or path, warm-up rollouts)."""
    kind, _, rest = source.partition(":")
    if kind in ("random", "grad"):
        parts = rest.split(":")
        try:
            density = float(parts[0])
            rollouts = int(parts[1]) if len(parts) > 1 else 2
        except (ValueError, IndexError):
            raise ValueError(
                "RLVRConfig.mask_source must be random:<density>, grad:<density>[:<rollouts>] or a mask file, "
                f"got {source!r}"
            ) from None
        if not 0 < density <= 1:
            raise ValueError(f"RLVRConfig.mask_source density must be in (0, 1], got {density}")
        if rollouts < 1:
            raise ValueError(f"RLVRConfig.mask_source warm-up rollouts must be >= 1, got {rollouts}")
        return kind, density, rollouts
    if not os.path.exists(source):
        raise ValueError(
            f"RLVRConfig.mask_source: {source!r} is neither random:<d>, grad:<d> nor an existing mask file"
        )
    return "file", source, 0


def _sparse_adamw(cfg: RLVRConfig, model: torch.nn.Module, warmup: GradWarmup | None) -> torch.optim.Optimizer:
    named = _trainable(model)
    kind, value, rollouts = parse_mask_source(cfg.mask_source or "")
    if kind == "random":
        masks = random_masks(dict(named), value, seed=cfg.seed)
    elif kind == "grad":
        if warmup is None:
            raise ValueError("mask_source grad:<density> needs warm-up rollouts, which this caller cannot run")
        saliency = GradSaliency(named)
        warmup(saliency, rollouts)
        masks = saliency.masks(value, scope="global")
    else:
        device = named[0][1].device
        masks = load_masks(value, device=device)
    return SparseAdamW(named, masks, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _adamw8bit(cfg: RLVRConfig, model: torch.nn.Module, warmup: GradWarmup | None) -> torch.optim.Optimizer:
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError("RLVRConfig.optimizer='adamw8bit' needs bitsandbytes (pip install 'rlvr_fast[gpu]')")
    import bitsandbytes as bnb

    return bnb.optim.AdamW8bit([p for _, p in _trainable(model)], lr=cfg.lr, weight_decay=cfg.weight_decay)


OPTIMIZERS: dict[str, Callable[[RLVRConfig, torch.nn.Module, GradWarmup | None], torch.optim.Optimizer]] = {
    "adamw": _adamw,
    "sparse_adamw": _sparse_adamw,
    "adamw8bit": _adamw8bit,
}


def build_optimizer(cfg: RLVRConfig, model: torch.nn.Module, warmup: GradWarmup | None = None) -> torch.optim.Optimizer:
    if cfg.optimizer not in OPTIMIZERS:
        raise ValueError(f"RLVRConfig.optimizer must be one of {sorted(OPTIMIZERS)}, got {cfg.optimizer!r}")
    return OPTIMIZERS[cfg.optimizer](cfg, model, warmup)
