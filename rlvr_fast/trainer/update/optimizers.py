"""The optimizers a run can use, by name (a registry, not an if/elif chain).

- adamw: torch.optim.AdamW with its fused kernel (CUDA and CPU): one pass per parameter, no foreach temporaries (the
  foreach path allocates parameter-sized intermediates for every tensor at once: +1 GB of peak on a 135M model).
- sparse_adamw: rlvr_fast.optim.SparseAdamW on a masked subnetwork (Mukherjee et al. 2025, arXiv:2505.11711). The mask
  comes from ``mask_source``: ``random:<density>`` (seeded by the run's seed), ``grad:<density>[:<warm-up rollouts>]``
  (the largest accumulated |grad| over warm-up rollouts, global top-density; default 2 rollouts) or the path of a
  mask file written by ``rlvr_fast.optim.save_masks`` (e.g. from an earlier run's update: subnetwork reuse). A
  ``grad:`` mask is not built here: the caller runs the warm-up (``Trainer.warm_up_masks``, an explicit phase between
  construction and the first step) and passes its masks to ``build_optimizer``.
- adamw8bit: bitsandbytes' AdamW8bit, when bitsandbytes is installed (the [gpu] extra).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable

import torch

from rlvr_fast.optim import SparseAdamW, load_masks, random_masks
from rlvr_fast.trainer.config import RLVRConfig

Masks = dict[str, torch.Tensor]  # parameter name -> bool mask of its shape


def trainable_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of every parameter the optimizer updates, in the model's order."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _adamw(cfg: RLVRConfig, model: torch.nn.Module, masks: Masks | None) -> torch.optim.Optimizer:
    params = [p for _, p in trainable_parameters(model)]
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


def saliency_warmup(cfg: RLVRConfig) -> tuple[float, int] | None:
    """(density, warm-up rollouts) when the run's optimizer takes a gradient-saliency mask (``grad:...``), else None."""
    if cfg.optimizer != "sparse_adamw":
        return None
    kind, density, rollouts = parse_mask_source(cfg.mask_source or "")
    return (density, rollouts) if kind == "grad" else None


def _sparse_adamw(cfg: RLVRConfig, model: torch.nn.Module, masks: Masks | None) -> torch.optim.Optimizer:
    named = trainable_parameters(model)
    if masks is None:  # random or file (a grad: source's masks come from its warm-up, checked by build_optimizer)
        kind, value, _ = parse_mask_source(cfg.mask_source or "")
        masks = (
            random_masks(dict(named), value, seed=cfg.seed)
            if kind == "random"
            else load_masks(value, device=named[0][1].device)
        )
    return SparseAdamW(named, masks, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _adamw8bit(cfg: RLVRConfig, model: torch.nn.Module, masks: Masks | None) -> torch.optim.Optimizer:
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError("RLVRConfig.optimizer='adamw8bit' needs bitsandbytes (pip install 'rlvr_fast[gpu]')")
    import bitsandbytes as bnb

    return bnb.optim.AdamW8bit([p for _, p in trainable_parameters(model)], lr=cfg.lr, weight_decay=cfg.weight_decay)


OPTIMIZERS: dict[str, Callable[[RLVRConfig, torch.nn.Module, Masks | None], torch.optim.Optimizer]] = {
    "adamw": _adamw,
    "sparse_adamw": _sparse_adamw,
    "adamw8bit": _adamw8bit,
}


def build_optimizer(cfg: RLVRConfig, model: torch.nn.Module, masks: Masks | None = None) -> torch.optim.Optimizer:
    """The optimizer ``cfg.optimizer`` over the model's trainable parameters. ``masks``: the warm-up's masks when the
    mask source is ``grad:...`` (``saliency_warmup(cfg)`` is not None), and only then."""
    if cfg.optimizer not in OPTIMIZERS:
        raise ValueError(f"RLVRConfig.optimizer must be one of {sorted(OPTIMIZERS)}, got {cfg.optimizer!r}")
    warmup = saliency_warmup(cfg)
    if warmup is not None and masks is None:
        raise ValueError(
            f"RLVRConfig.mask_source={cfg.mask_source!r}: a gradient-saliency mask comes from warm-up rollouts; pass "
            "the warm-up's masks (Trainer.warm_up_masks does)"
        )
    if warmup is None and masks is not None:
        raise ValueError(
            f"build_optimizer: masks were given, but optimizer={cfg.optimizer!r} with mask_source="
            f"{cfg.mask_source!r} takes none (only a grad:<density> mask source does)"
        )
    return OPTIMIZERS[cfg.optimizer](cfg, model, masks)
