"""QLoRA's base: every Linear layer of the decoder quantised to NF4 (bitsandbytes ``Linear4bit``), frozen.

The output head stays as it is: the fused log-prob / loss ops read ``lm_head.weight`` as a dense matrix (and a tied
head is the embedding table). bitsandbytes >= 0.45 quantises and runs NF4 on the CPU as well as on CUDA, so QLoRA runs
on either (tests/trainer/test_lora.py runs it on the CPU).
"""

from __future__ import annotations

import torch


def quantize_base(model: torch.nn.Module, compute_dtype: torch.dtype) -> int:
    """Replace each ``torch.nn.Linear`` of ``model`` but its output head by an NF4 ``Linear4bit`` on the same device,
    computing in ``compute_dtype``; returns how many were replaced."""
    import bitsandbytes as bnb

    head = model.get_output_embeddings()
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not torch.nn.Linear or child is head:
                continue
            device = child.weight.device
            quantized = bnb.nn.Linear4bit(
                child.in_features,
                child.out_features,
                bias=child.bias is not None,
                compute_dtype=compute_dtype,
                quant_type="nf4",
                device="cpu",
            )
            quantized.weight = bnb.nn.Params4bit(
                child.weight.data.detach().to("cpu"), requires_grad=False, quant_type="nf4"
            )
            if child.bias is not None:
                quantized.bias = torch.nn.Parameter(child.bias.data.detach().to("cpu"), requires_grad=False)
            # On a CPU with AVX512-BF16, bitsandbytes repacks an eval-mode layer's weight on its first no-grad call
            # (generation) for an inference kernel that has no backward, and keeps it repacked: every later gradient
            # through the layer, which the adapters before it need, would be silently wrong. The policy runs in eval
            # mode throughout, so keep the dequantise-and-matmul path, whose backward is exact.
            quantized.support_avx512bf16_for_cpu = False
            setattr(parent, name, quantized.to(device))  # the move quantises the weight (on the CPU too)
            replaced += 1
    return replaced
