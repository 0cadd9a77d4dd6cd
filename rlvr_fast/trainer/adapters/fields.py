"""The adapter's config names and rules between fields: a leaf module (nothing of the trainer imported), so
``RLVRConfig.validate`` can check them without importing the adapter package, whose checkpoint format imports the
checkpoint folder code, which imports the config."""

from __future__ import annotations

from collections.abc import Callable

ADAPTERS = {
    "none": "full fine-tuning: every weight trains",
    "lora": "LoRA (HF PEFT): the base frozen, a low-rank update B @ A trained on the target Linear layers",
    "qlora": "LoRA on a base whose Linear layers (lm_head excepted) are quantised to NF4 by bitsandbytes",
}
ALL_LINEAR = "all-linear"
# optimizers that cannot take an adapter's parameters, and why
INCOMPATIBLE_OPTIMIZERS = {
    "sparse_adamw": "sparse_adamw masks a subnetwork of the full weights; an adapter already restricts the update to "
    "its low-rank matrices",
}
# parallel modes refused with an adapter, and why
INCOMPATIBLE_PARALLEL = {
    "fsdp": "FSDP2 shards every parameter across ranks, while an adapter checkpoint (PEFT's format) is the whole "
    "adapter written by one process, and QLoRA's packed NF4 weights cannot be sharded as DTensors; use parallel='ddp'",
}


def check_adapter_fields(cfg, fail: Callable[[str, str], None]) -> None:
    """The adapter's rules between fields (``RLVRConfig.validate``): nothing loads here."""
    if cfg.adapter == "none":
        return
    if cfg.lora_dropout != 0:
        fail(
            "lora_dropout",
            f"lora_dropout must be 0.0: the policy runs in eval mode (generation and the loss must see the same "
            f"function), so dropout would never apply; got {cfg.lora_dropout}",
        )
    if cfg.optimizer in INCOMPATIBLE_OPTIMIZERS:
        fail(
            "optimizer",
            f"optimizer={cfg.optimizer!r} cannot train adapter={cfg.adapter!r}: "
            f"{INCOMPATIBLE_OPTIMIZERS[cfg.optimizer]}; expected optimizer 'adamw' or 'adamw8bit'",
        )
    if cfg.mask_source:
        fail(
            "mask_source",
            f"mask_source is sparse_adamw's and has no meaning with adapter={cfg.adapter!r}; expected None, "
            f"got {cfg.mask_source!r}",
        )
    targets = target_names(cfg.lora_target_modules)
    if targets is None:
        return
    if not targets:
        fail(
            "lora_target_modules",
            f"lora_target_modules must be 'all-linear' or module names, got {cfg.lora_target_modules!r}",
        )
    if "lm_head" in targets:
        fail(
            "lora_target_modules",
            "lora_target_modules must not name 'lm_head': the fused log-prob ops project the hidden states through "
            "lm_head.weight directly, so an adapted head's update would be silently ignored; got "
            f"{cfg.lora_target_modules!r}",
        )


def target_names(spec: str) -> list[str] | None:
    """The module names of ``RLVRConfig.lora_target_modules`` (None: 'all-linear')."""
    if spec.strip() == ALL_LINEAR:
        return None
    return [name.strip() for name in spec.split(",") if name.strip()]
