"""Shared-prefix forward: each prompt runs through the decoder once, and the G completions of its group attend to that
one pass's keys and values.

Today's update runs every completion together with its prompt: G x (P + C) decoder tokens per group, forward and
backward, and again in the old-policy and reference log-prob passes. Here the prompts run once (batch = distinct
prompts), their per-layer keys and values are gathered to the completion rows with ``index_select`` (whose backward is
an ``index_add``: autograd sums the G gradient contributions into the one prompt pass), and the completions run against
them: P + G x (C - 1) decoder tokens per group (the last completion token predicts nothing the loss needs).

Equality with the unshared path (``loss.completion_hidden``): the completion rows see exactly the keys and values of
their own prompt, the same 2D padding mask (prompt mask, then completion mask) and the same position ids
(``model.last_hidden_states`` numbers positions by the cumulative sum of the mask, so left padding does not shift
them). The hidden state at the last prompt position, which predicts the first completion token, comes from the prompt
pass; the prompts are left-padded, so that position is always a real token.

Mechanism (transformers >= 5 cache API): the prompt pass hands the decoder a cache that only *records* each layer's
keys and values; the completion pass hands it a cache that *reads* the recorded prefix and returns prefix + new keys
without storing anything. Neither mutates state across calls, so a layer that activation checkpointing recomputes in
the backward gets the same inputs again; the decoder layers are told so (``_can_checkpoint_with_cache``) for the
duration of the call, otherwise transformers drops the cache inside checkpointed layers.

Where it applies (``supports_prefix_sharing``): a decoder-only model whose every layer is full (global) causal
attention through the transformers cache API, with eager or SDPA attention. Sliding-window, chunked, linear-attention
(SSM) and KV-sharing layers, encoder-decoders and other attention kernels are refused by name.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from rlvr_fast.trainer.model import hidden_states_pass

logger = logging.getLogger(__name__)

# Attention kernels whose masking of a (queries, prefix + queries) block from a 2D padding mask was checked equal to
# the unshared path (tests/trainer/test_prefix_sharing.py). flash_attention_2 takes the same 2D mask, but was not
# checked here.
VERIFIED_ATTENTION = ("eager", "sdpa")

PREFIX_SHARING_MODES = ("auto", "on", "off")


# --------------------------------------------------------------------------------------------------------------------
# Which models it applies to
# --------------------------------------------------------------------------------------------------------------------


def _decoder(model: torch.nn.Module) -> torch.nn.Module | None:
    return getattr(model, getattr(model, "base_model_prefix", ""), None)


def cache_argument(decoder: torch.nn.Module) -> str | None:
    """The name under which ``decoder.forward`` takes a KV cache (``cache`` in transformers >= 5.x, formerly
    ``past_key_values``), or None."""
    params = inspect.signature(decoder.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    return None


def supports_prefix_sharing(model: torch.nn.Module, *, sliding_window_ok: bool = False) -> tuple[bool, str]:
    """(True, "") when the shared-prefix forward gives exactly the unshared result for ``model``; else (False, why),
    the reason naming the model class and what stands in the way.

    ``sliding_window_ok``: sliding-window layers do not stand in the way (the rollout's shared-prefix sampler: its
    cache keeps transformers' sliding-window layers, whose masks transformers builds; tested token for token against
    ``generate`` on Gemma 3, tests/trainer/test_gemma3_model.py). The update's two-pass forward needs full attention."""
    name = type(model).__name__
    config = getattr(model, "config", None)
    if config is None:
        return False, f"{name} has no transformers config"
    if getattr(config, "is_encoder_decoder", False):
        return False, f"{name} is an encoder-decoder model"
    if not getattr(config, "is_causal", True):
        return False, f"{name} is configured with bidirectional attention (is_causal=False)"
    decoder = _decoder(model)
    if decoder is None:
        return False, f"{name} has no decoder module at model.{getattr(model, 'base_model_prefix', '?')}"
    if cache_argument(decoder) is None:
        return False, f"{type(decoder).__name__}.forward takes no KV cache argument"
    attention = getattr(config, "_attn_implementation", None)
    if attention not in VERIFIED_ATTENTION:
        return False, (
            f"{name} uses attn_implementation={attention!r}; the shared prefix is verified for {VERIFIED_ATTENTION}"
        )
    from transformers.cache_utils import get_layer_types_and_kwargs

    layer_types, _ = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    allowed = {"full_attention", "sliding_attention"} if sliding_window_ok else {"full_attention"}
    other = sorted({t for t in layer_types if t not in allowed})
    if other:
        return False, f"{name} has {', '.join(other)} layers; the shared prefix needs full attention in every layer"
    return True, ""


_reported: set[str] = set()


def resolve_prefix_sharing(model: torch.nn.Module, mode: str, *, sliding_window_ok: bool = False) -> bool:
    """Whether to share prompts for ``model`` under ``prefix_sharing`` = ``mode``.

    ``off``: never. ``on``: always; raise ValueError with the reason when the model cannot. ``auto``: when the model
    can; otherwise run unshared and log the reason once per model class. ``sliding_window_ok``: as
    ``supports_prefix_sharing`` (the rollout passes True).
    """
    if mode not in PREFIX_SHARING_MODES:
        raise ValueError(f"prefix_sharing must be one of {PREFIX_SHARING_MODES}, got {mode!r}")
    if mode == "off":
        return False
    ok, reason = supports_prefix_sharing(model, sliding_window_ok=sliding_window_ok)
    if ok:
        return True
    if mode == "on":
        raise ValueError(f"prefix_sharing='on' but {reason}; set prefix_sharing='auto' or 'off'")
    if type(model).__name__ not in _reported:
        _reported.add(type(model).__name__)
        logger.warning("prefix_sharing='auto': running each completion with its prompt, because %s", reason)
    return False


# --------------------------------------------------------------------------------------------------------------------
# The two caches: record the prompt's keys and values, then read them under the completions
# --------------------------------------------------------------------------------------------------------------------


def _layer_classes():
    from transformers.cache_utils import DynamicLayer

    class RecordingLayer(DynamicLayer):
        """Stores the keys and values of the last call (overwriting: a checkpoint recompute stores the same again)."""

        def update(self, key_states, value_states, *args, **kwargs):
            self.keys, self.values = key_states, value_states
            self.is_initialized = True
            return key_states, value_states

        def get_seq_length(self) -> int:
            return 0  # nothing precedes the prompt

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return query_length, 0

    class PrefixLayer(DynamicLayer):
        """Read-only: returns (prefix keys + new keys, prefix values + new values), stores nothing."""

        def __init__(self, keys: torch.Tensor, values: torch.Tensor):
            super().__init__()
            self.keys, self.values = keys, values
            self.is_initialized = True

        def update(self, key_states, value_states, *args, **kwargs):
            return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)

        def get_seq_length(self) -> int:
            return self.keys.shape[-2]

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return self.keys.shape[-2] + query_length, 0

    return RecordingLayer, PrefixLayer


def _recording_cache(num_layers: int):
    from transformers.cache_utils import Cache

    recording_layer, _ = _layer_classes()
    return Cache(layers=[recording_layer() for _ in range(num_layers)])


def _prefix_cache(recorded, rows: torch.Tensor):
    """A read-only cache holding, for each completion row, the recorded keys and values of its prompt."""
    from transformers.cache_utils import Cache

    _, prefix_layer = _layer_classes()
    layers = []
    for layer in recorded.layers:
        if not layer.is_initialized:
            raise RuntimeError("the prompt pass recorded no keys/values for a decoder layer; the model is unsupported")
        layers.append(prefix_layer(layer.keys.index_select(0, rows), layer.values.index_select(0, rows)))
    return Cache(layers=layers)


@contextmanager
def _cache_survives_checkpointing(decoder: torch.nn.Module) -> Iterator[None]:
    """Let checkpointed decoder layers keep our caches: both are pure functions of the call (module doc)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in decoder.modules() if isinstance(m, GradientCheckpointingLayer)]
    missing = object()
    before = [vars(layer).get("_can_checkpoint_with_cache", missing) for layer in layers]
    for layer in layers:
        layer._can_checkpoint_with_cache = True
    try:
        yield
    finally:
        for layer, value in zip(layers, before):
            if value is missing:
                del layer._can_checkpoint_with_cache  # back to the class default
            else:
                layer._can_checkpoint_with_cache = value


# --------------------------------------------------------------------------------------------------------------------
# The forward
# --------------------------------------------------------------------------------------------------------------------


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids as ``model.last_hidden_states`` numbers them: the count of real tokens before each one (left
    padding does not shift a row; right padding repeats the last position)."""
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


def shared_prefix_hidden(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    prompt_index: torch.Tensor,
) -> torch.Tensor:
    """(R, Lc, D) final hidden states at the positions that predict each completion token, each prompt run once.

    Args:
        prompt_ids: (U, P) distinct prompts, left-padded (the last column is a real token in every row).
        prompt_mask: (U, P) 1 on prompt tokens.
        completion_ids: (R, Lc) right-padded completions.
        completion_mask: (R, Lc) 1 on completion tokens.
        prompt_index: (R,) int64, the prompt row of each completion.

    Equals ``loss.completion_hidden`` on the rollout whose row r is (prompt_ids[prompt_index[r]], completion r), and
    so do its gradients (module doc). Under torchrun both decoder passes run inside one forward of the data-parallel
    wrapper (``model.hidden_states_pass``; docs/design.md, "Data parallelism").
    """
    _check_inputs(prompt_ids, prompt_mask, completion_ids, completion_mask, prompt_index)
    return hidden_states_pass(
        model, _shared_prefix_passes, prompt_ids, prompt_mask, completion_ids, completion_mask, prompt_index
    )


def _shared_prefix_passes(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    prompt_index: torch.Tensor,
) -> torch.Tensor:
    """The two decoder passes of ``shared_prefix_hidden`` (inputs checked): the prompts, recording each layer's keys
    and values, then the completions reading them. Each decoder layer is called twice; under FSDP2 each call gathers
    the layer's parameters, and the layer's gradient, summed by autograd over both calls, is reduce-scattered once
    (docs/design.md, "Data parallelism")."""
    p = prompt_ids.shape[1]
    decoder = _decoder(model)
    cache_arg = cache_argument(decoder)
    num_layers = model.config.get_text_config(decoder=True).num_hidden_layers
    with _cache_survives_checkpointing(decoder):
        recorded = _recording_cache(num_layers)
        prompt_out = decoder(
            input_ids=prompt_ids,
            attention_mask=prompt_mask,
            position_ids=positions_from_mask(prompt_mask),
            use_cache=False,  # our cache is passed explicitly; use_cache only asks the model to make one
            **{cache_arg: recorded},
        )
        first = prompt_out.last_hidden_state[:, -1].index_select(0, prompt_index).unsqueeze(1)  # (R, 1, D)
        lc = completion_ids.shape[1]
        # The last completion token predicts nothing, so the pass runs the first lc - 1. With lc == 1 it still runs,
        # on the one token, its output cut to nothing: every call of this function makes the same decoder calls
        # whatever the data, since under torchrun each call of an FSDP unit is a collective that all ranks must join.
        width = max(lc - 1, 1)
        mask = torch.cat([prompt_mask.index_select(0, prompt_index), completion_mask.to(prompt_mask.dtype)], dim=1)
        mask = mask[:, : p + width]
        completion_out = decoder(
            input_ids=completion_ids[:, :width],
            attention_mask=mask,
            position_ids=positions_from_mask(mask)[:, p:],
            use_cache=False,
            **{cache_arg: _prefix_cache(recorded, prompt_index)},
        )
    return torch.cat([first, completion_out.last_hidden_state[:, : lc - 1]], dim=1)


def _check_inputs(prompt_ids, prompt_mask, completion_ids, completion_mask, prompt_index) -> None:
    if prompt_ids.dim() != 2 or prompt_mask.shape != prompt_ids.shape:
        raise ValueError(
            f"prompt_ids and prompt_mask must be (U, P) of one shape, got {tuple(prompt_ids.shape)} and "
            f"{tuple(prompt_mask.shape)}"
        )
    if completion_ids.dim() != 2 or completion_mask.shape != completion_ids.shape or completion_ids.shape[1] < 1:
        raise ValueError(
            f"completion_ids and completion_mask must be (R, Lc >= 1) of one shape, got {tuple(completion_ids.shape)} "
            f"and {tuple(completion_mask.shape)}"
        )
    u, p = prompt_ids.shape
    if p < 1:
        raise ValueError(f"prompt_ids must hold at least one token per prompt, got shape {tuple(prompt_ids.shape)}")
    if prompt_index.shape != (completion_ids.shape[0],) or prompt_index.dtype != torch.long:
        raise ValueError(
            f"prompt_index must be int64 of shape ({completion_ids.shape[0]},), got {prompt_index.dtype} of shape "
            f"{tuple(prompt_index.shape)}"
        )
    if prompt_index.numel() and (int(prompt_index.min()) < 0 or int(prompt_index.max()) >= u):
        raise ValueError(
            f"prompt_index must lie in [0, {u}), got values in [{int(prompt_index.min())}, {int(prompt_index.max())}]"
        )
    if not bool(prompt_mask[:, -1].bool().all()):
        raise ValueError("prompts must be left-padded: prompt_mask[:, -1] must be 1 in every row")


# --------------------------------------------------------------------------------------------------------------------
# On a rollout
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class SharedPrompts:
    """The distinct prompts of a batch of rows: (U, P) ids and mask, left-padding columns that every prompt pads
    removed, and the (R,) prompt row of each completion row."""

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    prompt_index: torch.Tensor

    @classmethod
    def from_rows(cls, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> SharedPrompts:
        """Deduplicate (R, Lp) left-padded prompt rows (a group's G rows repeat one prompt)."""
        keys = torch.cat([prompt_ids, prompt_mask.to(prompt_ids.dtype)], dim=1)
        unique, index = torch.unique(keys, dim=0, return_inverse=True)
        lp = prompt_ids.shape[1]
        ids, mask = unique[:, :lp], unique[:, lp:].to(prompt_mask.dtype)
        real = mask.bool().any(dim=0)
        start = int(real.int().argmax()) if bool(real.any()) else lp - 1
        return cls(ids[:, start:].contiguous(), mask[:, start:].contiguous(), index)


def shared_completion_hidden(model: torch.nn.Module, rollout) -> torch.Tensor:
    """Drop-in for ``loss.completion_hidden(model, rollout)``: (R, Lc, D), each distinct prompt run once."""
    shared = SharedPrompts.from_rows(rollout.prompt_ids, rollout.prompt_mask)
    return shared_prefix_hidden(
        model,
        shared.prompt_ids,
        shared.prompt_mask,
        rollout.completion_ids,
        rollout.completion_mask,
        shared.prompt_index,
    )


def decoder_tokens(rollout) -> dict[str, int]:
    """Decoder token positions a forward over ``rollout`` computes, padding included: ``unshared`` = R x (Lp + Lc)
    (each completion with its prompt), ``shared`` = U x P + R x (Lc - 1) (each distinct prompt once)."""
    rows, lc = rollout.completion_ids.shape
    shared = SharedPrompts.from_rows(rollout.prompt_ids, rollout.prompt_mask)
    u, p = shared.prompt_ids.shape
    return {"unshared": rows * (rollout.prompt_ids.shape[1] + lc), "shared": u * p + rows * max(lc - 1, 1)}
