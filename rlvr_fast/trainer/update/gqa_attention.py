"""SDPA attention that keeps grouped-query attention grouped on the CPU: ``attn_implementation="sdpa_gqa"``.

transformers' ``sdpa`` attention (``integrations/sdpa_attention.py``) asks torch for grouped-query attention
(``enable_gqa=True``) only where no mask is given (CUDA's fused kernels need that). With a padding mask and more than
one query token, the update's case, it calls ``repeat_kv`` instead: each layer's keys and values are copied
``num_key_value_groups`` times (SmolLM2-135M: 3 kv heads -> 9) before SDPA, and the backward sums the copies' gradients
back. torch's CPU SDPA computes the same attention from the un-repeated heads with ``enable_gqa=True``: the same
output, without the copies (measured on a 2-core CPU: 17% faster in bf16, 29% in float32, per forward + backward of
one (4, 9, 63, 108) call with a bool mask).

``sdpa_gqa_attention_forward`` takes that one case and hands every other to transformers' ``sdpa_attention_forward``
unchanged (``gqa_branch_applies`` says which). The new name is registered twice (``register_gqa_attention``): with
``AttentionInterface`` (the layers' attention function) and with ``AttentionMaskInterface``, as SDPA's mask builder:
transformers builds *no* mask for a name its mask interface does not know, which would silently drop the padding
mask.

A model switches with ``use_gqa_attention(model, device)``: only one running SDPA on the CPU (on CUDA a masked
``enable_gqa`` call may fall back to the math kernel; there transformers' choice stays).
"""

from __future__ import annotations

import torch

GQA_ATTENTION = "sdpa_gqa"

# The implementation each of ours computes like: checks of the form "is this model's attention sdpa?" (the shared-prefix
# forward's VERIFIED_ATTENTION) read a model's implementation through ``base_attention``.
BASE_ATTENTION = {GQA_ATTENTION: "sdpa"}


def base_attention(implementation: str | None) -> str | None:
    """The transformers implementation that ``implementation`` computes like ('sdpa' for 'sdpa_gqa'; others as
    given)."""
    return BASE_ATTENTION.get(implementation, implementation) if isinstance(implementation, str) else implementation


def gqa_branch_applies(
    module: torch.nn.Module,
    query: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_bias: torch.Tensor | None,
    kwargs: dict,
) -> bool:
    """Whether ``sdpa_gqa_attention_forward`` computes this call itself: grouped kv heads, a tensor mask, more than one
    query token, on the CPU, and nothing transformers' sdpa treats specially (position bias, softcap, a request for
    the attention weights). Everything else is transformers' own path."""
    return (
        getattr(module, "num_key_value_groups", 1) > 1
        and isinstance(attention_mask, torch.Tensor)
        and query.shape[2] > 1
        and query.device.type == "cpu"
        and position_bias is None
        and kwargs.get("softcap") is None
        and not kwargs.get("output_attentions", False)
    )


def sdpa_gqa_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    position_bias: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature. query (B, Hq, Lq, d), key and value (B, Hkv, Lk, d) with
    Hq = Hkv x ``module.num_key_value_groups``, attention_mask broadcastable to (B, Hq, Lq, Lk) (bool or additive);
    returns ((B, Lq, Hq, d) contiguous, None), as ``sdpa_attention_forward`` does.

    The masked grouped case runs SDPA on the un-repeated key and value with ``enable_gqa=True``; head h of the query
    reads kv head h // groups, as ``repeat_kv`` arranges it. ``is_causal`` is False there, by transformers' rule (a
    mask is given, so causality is in the mask).
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not gqa_branch_applies(module, query, attention_mask, position_bias, kwargs):
        return sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            is_causal=is_causal,
            position_bias=position_bias,
            **kwargs,
        )
    q_length = query.shape[2]
    out = torch.nn.functional.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attention_mask,
        dropout_p=dropout,
        scale=scaling,
        is_causal=False,
        enable_gqa=True,
    )
    # (B, Hq, Lq, d) -> (B, Lq, Hq, d), the layout the layers' o_proj reads; batch from the output (SDPA broadcasts)
    out = out.reshape(out.shape[0], -1, q_length, value.shape[-1])
    return out.transpose(1, 2).contiguous(), None


def register_gqa_attention() -> str:
    """Register ``GQA_ATTENTION`` with transformers (idempotent: the same entries again); returns the name."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(GQA_ATTENTION, sdpa_gqa_attention_forward)
    # the same masks as sdpa: without an entry here transformers would build no padding mask for this name
    AttentionMaskInterface.register(GQA_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    return GQA_ATTENTION


def gqa_attention_for(implementation: str | None, device: torch.device) -> str | None:
    """The attention implementation to run in place of ``implementation`` on ``device``: 'sdpa_gqa' for 'sdpa' on the
    CPU, anything else unchanged."""
    if implementation == "sdpa" and torch.device(device).type == "cpu":
        return GQA_ATTENTION
    return implementation


def use_gqa_attention(model: torch.nn.Module, device: torch.device) -> bool:
    """Switch a transformers ``model`` whose attention is 'sdpa' to 'sdpa_gqa' when it runs on a CPU ``device``
    (``gqa_attention_for``); True when its attention is 'sdpa_gqa' afterwards. A model that cannot switch its
    attention function (not built on ``AttentionInterface``; transformers warns) keeps 'sdpa'."""
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    wanted = gqa_attention_for(current, device)
    if wanted != current and hasattr(model, "set_attn_implementation"):
        register_gqa_attention()
        model.set_attn_implementation(wanted)
    return getattr(config, "_attn_implementation", None) == GQA_ATTENTION
