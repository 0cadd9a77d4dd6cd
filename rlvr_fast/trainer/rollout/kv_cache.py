"""A KV cache for the rollout whose storage is allocated once per generate call and written in place.

transformers' ``DynamicCache`` appends each decode step's keys and values with ``torch.cat``: every step copies every
layer's whole cache (rows x kv heads x length x head dim, twice) into a new tensor, so a completion of T tokens copies
the cache T times. ``preallocated_cache`` keeps the same ``Cache`` object and the same layer types, but each
full-attention layer stores its keys and values in buffers of ``capacity`` positions made at the prefill: a decode step
writes one position per row, and the attention reads a view of the positions written so far. The view holds the same
values as the concatenated tensor, so the logits, and the tokens drawn from them, are identical to the dynamic cache's.

Dropping finished rows (``batch_select_indices``) moves the kept rows to the front of the same buffers; repeating the
prefilled prompt for its samples (``batch_repeat_interleave``) allocates the buffers at the repeated row count once.
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def _layer_classes():
    """(DynamicCache, DynamicLayer, PreallocatedLayer), made once: transformers is imported on first use."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    class PreallocatedLayer(DynamicLayer):
        """A full-attention cache layer whose keys and values are views of (rows, kv heads, ``capacity``, head dim)
        buffers: ``update`` writes the new positions in place (no ``torch.cat``)."""

        def __init__(self, capacity: int):
            super().__init__()
            self.capacity = capacity
            self.key_buffer: torch.Tensor | None = None
            self.value_buffer: torch.Tensor | None = None

        def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
            self.device = key_states.device
            self._allocate(key_states.shape[0], key_states, value_states)
            self.is_initialized = True

        def _allocate(self, rows: int, key_like: torch.Tensor, value_like: torch.Tensor) -> None:
            """Buffers of ``rows`` rows and ``capacity`` positions; the keys / values views start empty."""
            heads, key_dim = key_like.shape[1], key_like.shape[3]
            self.key_buffer = key_like.new_empty(rows, heads, self.capacity, key_dim)
            self.value_buffer = value_like.new_empty(rows, value_like.shape[1], self.capacity, value_like.shape[3])
            self.keys = self.key_buffer[:, :, :0]
            self.values = self.value_buffer[:, :, :0]

        def update(
            self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
        ) -> tuple[torch.Tensor, torch.Tensor]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            rows, start = self.keys.shape[0], self.keys.shape[2]
            end = start + key_states.shape[2]
            if key_states.shape[0] != rows:
                raise ValueError(f"KV cache: {key_states.shape[0]} rows of new keys for a cache of {rows} rows")
            if end > self.capacity:
                raise ValueError(
                    f"KV cache: {end} positions needed, the cache was allocated for {self.capacity}; the rollout "
                    f"wrote past its prompt width + max_new_tokens"
                )
            self.key_buffer[:rows, :, start:end] = key_states
            self.value_buffer[:rows, :, start:end] = value_states
            self.keys = self.key_buffer[:rows, :, :end]
            self.values = self.value_buffer[:rows, :, :end]
            return self.keys, self.values

        def batch_repeat_interleave(self, repeats: int) -> None:
            if self.get_seq_length() == 0:
                return
            keys, values = self.keys.repeat_interleave(repeats, dim=0), self.values.repeat_interleave(repeats, dim=0)
            self._allocate(keys.shape[0], keys, values)
            self.update(keys, values)

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            length = self.get_seq_length()
            if length == 0:
                return
            rows = indices.shape[0]
            # gather first (a copy of the kept rows), then write to the front: the source rows may overlap the targets
            self.key_buffer[:rows, :, :length] = self.key_buffer[indices, :, :length]
            self.value_buffer[:rows, :, :length] = self.value_buffer[indices, :, :length]
            self.keys = self.key_buffer[:rows, :, :length]
            self.values = self.value_buffer[:rows, :, :length]

        def crop(self, tokens_to_remove: int) -> None:
            raise NotImplementedError("the rollout's preallocated KV cache is never cropped")

    return DynamicCache, DynamicLayer, PreallocatedLayer


def preallocated_cache(config, capacity: int):
    """A ``DynamicCache`` for ``config`` whose full-attention layers write into buffers of ``capacity`` positions
    (module doc); layers of other kinds (sliding window, linear attention) keep transformers' own classes.

    Args:
        config: the model's ``PretrainedConfig``.
        capacity: positions per row: the prompt width plus the new tokens the call may sample.
    """
    if capacity < 1:
        raise ValueError(f"KV cache capacity must be >= 1, got {capacity}")
    dynamic_cache, dynamic_layer, preallocated_layer = _layer_classes()
    cache = dynamic_cache(config=config)
    cache.layers = [preallocated_layer(capacity) if type(layer) is dynamic_layer else layer for layer in cache.layers]
    return cache
