"""The rollout's preallocated KV cache (rlvr_fast.trainer.rollout.kv_cache): written in place, read as a view of the
positions written so far, and exactly the dynamic cache's values, so the sampler draws the same tokens for a seed.

- Keys and values equal ``DynamicCache``'s after a prefill, a repeat for the samples, decode steps and row drops in
  any order of kept rows; every decode step writes into the same storage (no per-step copy of the cache).
- ``sample_shared_prefix`` draws token for token what it drew on the dynamic cache, for random sampling with rows
  dropping at EOS, in float32 and under bf16 autocast, on Llama and Qwen2.
- Writing past the capacity is a clear error; sliding-window layers keep transformers' own class.
"""

import pytest
import torch
from transformers import DynamicCache

from rlvr_fast.testing import char_tokenizer, tiny_causal_lm
from rlvr_fast.trainer.rollout import shared_prefix_sampler
from rlvr_fast.trainer.rollout.kv_cache import preallocated_cache

PROMPTS = ["What is 2 + 3?", "7-1=", "hello there, how many letters?"]


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


def random_kv(generator, rows, length, heads=2, dim=8):
    def draw():
        return torch.randn(rows, heads, length, dim, generator=generator)

    return draw(), draw()


def test_layer_matches_the_dynamic_cache_through_repeat_decode_and_drops(generator):
    config = tiny_causal_lm(char_tokenizer(), layers=1).config
    dynamic, static = DynamicCache(config=config), preallocated_cache(config, capacity=5 + 6)
    both = (dynamic, static)
    keys, values = random_kv(generator, rows=2, length=5)
    for cache in both:
        cache.update(keys, values, 0)
        cache.batch_repeat_interleave(3)
    storage = static.layers[0].keys.untyped_storage().data_ptr()
    for step, keep in enumerate([None, torch.tensor([0, 2, 3, 5]), None, torch.tensor([3, 1]), None]):
        if keep is not None:
            for cache in both:
                cache.batch_select_indices(keep)
        rows = dynamic.layers[0].keys.shape[0]
        keys, values = random_kv(generator, rows=rows, length=1)
        for cache in both:
            cache.update(keys, values, 0)
        assert torch.equal(static.layers[0].keys, dynamic.layers[0].keys), step
        assert torch.equal(static.layers[0].values, dynamic.layers[0].values), step
        assert static.get_seq_length() == dynamic.get_seq_length() == 6 + step
        assert static.layers[0].keys.untyped_storage().data_ptr() == storage  # written in place, never re-allocated


def test_writing_past_the_capacity_is_an_error(generator):
    config = tiny_causal_lm(char_tokenizer(), layers=1).config
    cache = preallocated_cache(config, capacity=4)
    cache.update(*random_kv(generator, rows=2, length=4), 0)
    with pytest.raises(ValueError, match="5 positions needed, the cache was allocated for 4"):
        cache.update(*random_kv(generator, rows=2, length=1), 0)
    with pytest.raises(ValueError, match="capacity must be >= 1, got 0"):
        preallocated_cache(config, capacity=0)


def test_sliding_window_layers_keep_their_own_class():
    import transformers

    config = transformers.Qwen2Config(
        num_hidden_layers=2,
        layer_types=["full_attention", "sliding_attention"],
        use_sliding_window=True,
        sliding_window=4,
    )
    kinds = [type(layer).__name__ for layer in preallocated_cache(config, capacity=16).layers]
    assert kinds[0] == "PreallocatedLayer" and kinds[1] == type(DynamicCache(config=config).layers[1]).__name__


@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bf16_autocast"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_sampler_draws_the_dynamic_cache_tokens(tokenizer, arch, autocast, monkeypatch):
    """Random sampling (temperature 1, top_p 0.95) with rows dropping at EOS: the same seed, the same tokens."""
    model = tiny_causal_lm(tokenizer, arch=arch, token_bias={"<eos>": 1.5, "5": 2.0})
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True, add_special_tokens=False)

    def sample():
        torch.manual_seed(7)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return shared_prefix_sampler.sample_shared_prefix(
                model,
                enc["input_ids"],
                enc["attention_mask"],
                n=4,
                max_new_tokens=24,
                temperature=1.0,
                top_p=0.95,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )

    preallocated = sample()

    def dynamic_cache(config, capacity):
        return DynamicCache(config=config)

    monkeypatch.setattr(shared_prefix_sampler, "preallocated_cache", dynamic_cache)
    dynamic = sample()
    finished = (preallocated == tokenizer.eos_token_id).any(dim=1)
    assert bool(finished.any()) and not bool(finished.all())  # rows dropped mid-rollout, others ran to the end
    assert torch.equal(preallocated, dynamic)
