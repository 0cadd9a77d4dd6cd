"""The LoRA layers PEFT injected into a model, and the weight each one computes, without importing PEFT.

One place for what three readers need: the adapter's own checks (is a model already adapted?), the vLLM weight push
(an engine has only the plain layer names, so each adapted layer goes in as one merged weight) and the update-modes
study (the applied update of a LoRA run is the merged weight minus the base). A PEFT LoRA layer keeps the original
layer as ``base_layer`` and its adapters in the ModuleDicts ``lora_A`` / ``lora_B`` with ``scaling`` per adapter name;
its forward is ``base(x) + scaling * B(A(x))`` for every active adapter (dropout 0: the only setting the trainer
accepts), i.e. the weight ``W + scaling * B @ A``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

__all__ = ["is_lora_layer", "lora_layers", "merged_weight"]


def is_lora_layer(module: torch.nn.Module) -> bool:
    """A layer PEFT's LoRA injected in place: the original layer as ``base_layer``, the adapters beside it."""
    return hasattr(module, "base_layer") and isinstance(getattr(module, "lora_A", None), torch.nn.ModuleDict)


def lora_layers(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module]]:
    """(module name, LoRA layer) for every layer PEFT adapted, in the model's order."""
    return ((name, m) for name, m in model.named_modules() if is_lora_layer(m))


def merged_weight(layer: torch.nn.Module, weight: torch.Tensor | None = None, dtype: torch.dtype = torch.float32):
    """The weight the layer computes with, in ``dtype``: ``weight`` (default: its base layer's; pass a gathered one)
    plus ``scaling * B @ A`` of every active adapter, the product itself formed in ``dtype`` (float64: the difference
    with the base is the adapter's product, not float32 rounding). Adapters off, or merged into the base already:
    the base weight itself."""
    weight = layer.base_layer.weight if weight is None else weight
    if getattr(layer, "disable_adapters", False) or getattr(layer, "merged", False):
        return weight
    out = weight.detach().to(dtype)
    for name in getattr(layer, "active_adapters", ()):
        if name not in layer.lora_A:
            continue
        a = layer.lora_A[name].weight.detach().to(dtype)  # (r, in)
        b = layer.lora_B[name].weight.detach().to(dtype)  # (out, r)
        delta = layer.scaling[name] * (b @ a)
        out = out + (delta.T if getattr(layer, "fan_in_fan_out", False) else delta)
    return out
