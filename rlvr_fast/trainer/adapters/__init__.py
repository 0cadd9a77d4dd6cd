"""Parameter-efficient fine-tuning: LoRA through HF PEFT, and QLoRA (LoRA on an NF4-quantised base), by name.

``RLVRConfig.adapter`` picks an entry of ``ADAPTERS``. With one, the policy stays the transformers causal LM the rest of
the trainer knows: PEFT injects its LoRA layers into that model in place (``PeftModel.base_model.model`` is the same
object), so the decoder forward (``model.decoder_hidden_states``), the data-parallel wrapper, the shared-prefix passes
and the fused log-prob / loss ops (hidden states x the frozen ``lm_head.weight``) run unchanged; only the LoRA A/B
matrices require grad, so the optimizer (``update/optimizers.py``) steps only them. ``lm_head`` is never adapted: the
fused ops read its weight directly and would silently ignore an adapted head's update.

With ``beta > 0`` the reference model is the same model with its adapters off (``Adapter.reference``): no second copy
of the weights. Checkpoints hold the adapter in PEFT's own format (``adapters/checkpoint.py``).
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from rlvr_fast.trainer.adapters.fields import (  # noqa: F401 (re-exported: the adapter package's names)
    ADAPTERS,
    ALL_LINEAR,
    INCOMPATIBLE_OPTIMIZERS,
    INCOMPATIBLE_PARALLEL,
    check_adapter_fields,
    target_names,
)
from rlvr_fast.trainer.adapters.layers import lora_layers
from rlvr_fast.trainer.schema import ConfigFieldError


def check_adapter_runtime(cfg, world_size: int = 1) -> None:
    """The packages an adapter needs, and under torchrun (``world_size`` > 1) the parallel mode (preflight). QLoRA's
    NF4 base runs on the CPU and on CUDA alike (``quantize.py``)."""
    if cfg.adapter == "none":
        return
    if world_size > 1 and cfg.parallel in INCOMPATIBLE_PARALLEL:
        raise ConfigFieldError(
            "parallel",
            f"RLVRConfig.parallel={cfg.parallel!r} with adapter={cfg.adapter!r} under torchrun: "
            f"{INCOMPATIBLE_PARALLEL[cfg.parallel]}",
        )
    if importlib.util.find_spec("peft") is None:
        raise ConfigFieldError(
            "adapter", f"RLVRConfig.adapter={cfg.adapter!r} needs peft (pip install 'rlvr_fast[lora]')"
        )
    if cfg.adapter == "qlora" and importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigFieldError(
            "adapter", "RLVRConfig.adapter='qlora' quantises the base with bitsandbytes (pip install 'rlvr_fast[gpu]')"
        )


def linear_names(model: torch.nn.Module) -> list[str]:
    """The distinct leaf names of the model's Linear layers that LoRA may target (the output head excluded)."""
    head = model.get_output_embeddings()
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head}
    return sorted(names)


def check_target_modules(cfg, model: torch.nn.Module) -> None:
    """Every name of ``lora_target_modules`` is a Linear layer of ``model`` (its config's architecture built on the
    meta device at preflight, or the loaded model before anything trains); the error names the valid ones."""
    targets = target_names(cfg.lora_target_modules)
    if targets is None:
        return
    valid = linear_names(model)
    unknown = [t for t in targets if t not in valid]
    if unknown:
        raise ConfigFieldError(
            "lora_target_modules",
            f"RLVRConfig.lora_target_modules names {unknown}, which {type(model).__name__} has no Linear layer of: "
            f"expected 'all-linear' or names from {valid}",
        )


def meta_model(model_folder: str) -> torch.nn.Module | None:
    """The architecture of a local HF model folder built on the meta device (no weights read, no memory), or None."""
    import os

    if not os.path.isfile(os.path.join(model_folder, "config.json")):
        return None
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(model_folder)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except Exception:  # an architecture this transformers cannot build: checked on the loaded model instead
        return None


@dataclass
class Adapter:
    """The PEFT wrapper of a policy whose LoRA layers were injected in place (``peft_model.base_model.model`` is the
    trainer's model)."""

    kind: str  # an ADAPTERS key
    peft_model: torch.nn.Module  # peft.PeftModel

    def disabled(self) -> contextlib.AbstractContextManager:
        """Within the block the model computes its base function (every LoRA layer bypassed)."""
        return self.peft_model.disable_adapter()

    def reference(self, policy) -> AdapterOffReference:
        """The reference model of ``beta > 0``: the policy itself with its adapters off (no copy of the weights)."""
        return AdapterOffReference(policy, self)


class AdapterOffReference:
    """The trainer's ``ref`` wrapper for an adapted policy: ``head_gathered()`` (the block in which the reference
    log-probs are computed) is the policy's, with the adapters disabled for its duration."""

    def __init__(self, policy, adapter: Adapter):
        self.policy, self.adapter = policy, adapter

    @contextlib.contextmanager
    def head_gathered(self) -> Iterator[None]:
        with self.policy.head_gathered(), self.adapter.disabled():
            yield

    def generation(self) -> contextlib.AbstractContextManager:
        return self.policy.generation()


def _lora_config(cfg):
    from peft import LoraConfig

    targets = target_names(cfg.lora_target_modules)
    return LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=ALL_LINEAR if targets is None else targets,
        bias="none",
        task_type="CAUSAL_LM",
    )


def apply_adapter(cfg, model: torch.nn.Module, compute_dtype: torch.dtype | None = None) -> Adapter | None:
    """Wrap ``model`` (in place) as ``cfg.adapter`` says; None for 'none'. QLoRA first quantises the base's Linear
    layers to NF4 (``quantize.quantize_base``). The LoRA weights are seeded from ``cfg.seed`` (B is zero, so the
    adapted model starts as the base)."""
    if cfg.adapter == "none":
        return None
    check_adapter_runtime(cfg)
    adapted = sum(1 for _ in lora_layers(model))
    if adapted:  # PEFT would silently re-create the adapter, discarding the one trained (another Trainer's, in place)
        raise ValueError(
            f"Trainer(loaded=...): adapter={cfg.adapter!r} adapts the model in place, and this model already holds "
            f"{adapted} LoRA layers (an earlier Trainer or get_peft_model adapted it); expected a model without "
            "adapters: load it again, or pass a copy.deepcopy of it taken before the first Trainer"
        )
    check_target_modules(cfg, model)
    from peft import get_peft_model

    if cfg.adapter == "qlora":
        from rlvr_fast.trainer.adapters.quantize import quantize_base

        quantize_base(model, compute_dtype or next(model.parameters()).dtype)
    with torch.random.fork_rng(devices=[]):  # LoRA's A init: the run's seed, the global stream untouched
        torch.manual_seed(cfg.seed)
        peft_model = get_peft_model(model, _lora_config(cfg))
    model.eval()
    adapter = Adapter(cfg.adapter, peft_model)
    from rlvr_fast.trainer.adapters.checkpoint import remember

    remember(adapter)  # a resume loads the checkpoint's adapter into this wrapper
    return adapter
