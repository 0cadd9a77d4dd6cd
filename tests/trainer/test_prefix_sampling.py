"""The shared-prefix rollout (rlvr_fast.trainer.rollout.shared_prefix_sampler, HFGeneration): each prompt prefilled
once.

- The sampler draws from softmax(warped scores) exactly (inverse CDF on a grid of uniforms gives the probabilities).
- Cached decoding with left-padded prompts and rows dropping out at EOS computes the same next-token distribution as
  transformers' ``generate``: with top_p so small that only the most probable token survives, both paths emit the same
  tokens, on an fp64 model (no near-ties).
- Seeded rollouts repeat exactly; EOS ends a row (mask up to and including it, pad after, not truncated); finished
  rows stop costing decode work.
"""

import pytest
import torch

from rlvr_fast.testing import char_tokenizer, tiny_causal_lm
from rlvr_fast.trainer.rollout.engines import HFGeneration
from rlvr_fast.trainer.rollout.shared_prefix_sampler import (
    draw_tokens,
    sampling_warpers,
    unreproduced_generation_settings,
)

PROMPTS = ["What is 2 + 3?", "7-1=", "hello there, how many letters?"]


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


def model_for(tokenizer, arch="llama", eos_bias=1.5, dtype=torch.float32):
    return tiny_causal_lm(tokenizer, arch=arch, token_bias={"<eos>": eos_bias, "5": 2.0}).to(dtype)


def test_draw_tokens_follows_the_probabilities(generator):
    """On a grid of N uniforms, each token is drawn round(p N) times (+-1); filtered tokens (prob 0) never."""
    scores = torch.randn(1, 50, generator=generator) * 2
    scores = sampling_warpers(0.7, 0.9)(None, scores)  # temperature + top-p as generate applies them
    probs = torch.softmax(scores, dim=-1)[0]
    n = 20000
    uniforms = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    tokens = draw_tokens(scores.expand(n, -1), uniforms)
    counts = torch.bincount(tokens, minlength=50).double()
    assert float((counts - probs.double() * n).abs().max()) <= 1.0 + 1e-6
    assert bool((counts[probs == 0] == 0).all()) and bool((probs == 0).any())
    assert int(draw_tokens(scores, torch.tensor([1.0 - 2**-53], dtype=torch.float64))) == int(probs.nonzero().max())


def test_non_finite_probabilities_raise():
    scores = torch.zeros(3, 5)
    scores[2, 1] = float("nan")
    with pytest.raises(RuntimeError, match="row 2 contain inf or NaN"):
        draw_tokens(scores, torch.full((3,), 0.5, dtype=torch.float64))


def test_warpers_reject_bad_settings():
    with pytest.raises(ValueError, match="temperature must be > 0"):
        sampling_warpers(0.0, 1.0)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        sampling_warpers(1.0, 1.5)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_most_probable_token_path_equals_generate(tokenizer, arch):
    """top_p tiny: the sampler keeps only the most probable token, so both paths are deterministic and must agree
    token for token: the cache, positions, masks of the shared prefix and the EOS drop-out are exact."""
    model = model_for(tokenizer, arch, eos_bias=0.5, dtype=torch.float64)
    shared = HFGeneration(model, tokenizer, 64, prefix_sharing="on")
    plain = HFGeneration(model, tokenizer, 64, prefix_sharing="off")
    assert shared.shared_prefix and not plain.shared_prefix
    args = dict(n=3, max_new_tokens=12, temperature=0.8, top_p=1e-9, seed=1)
    a, b = shared.generate(PROMPTS, **args), plain.generate(PROMPTS, **args)
    for field in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "truncated"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert a.texts == b.texts


def test_seeded_rollouts_repeat_and_eos_ends_rows(tokenizer):
    model = model_for(tokenizer, eos_bias=2.5)
    gen = HFGeneration(model, tokenizer, 64)
    assert gen.shared_prefix  # auto on a Llama
    args = dict(n=4, max_new_tokens=10, temperature=1.0, top_p=0.95)
    a, b = gen.generate(PROMPTS, seed=7, **args), gen.generate(PROMPTS, seed=7, **args)
    c = gen.generate(PROMPTS, seed=8, **args)
    assert torch.equal(a.completion_ids, b.completion_ids) and a.texts == b.texts
    assert not torch.equal(a.completion_ids, c.completion_ids)
    ids, mask = a.completion_ids, a.completion_mask
    assert ids.shape == (12, 10) and torch.equal(a.prompt_ids[::4], a.prompt_ids[1::4])
    eos = ids == tokenizer.eos_token_id
    ended = eos.any(dim=1)
    assert bool(ended.any()) and bool((~ended).any())  # both kinds present at this bias (seeded)
    assert torch.equal(a.truncated, ~ended)
    lengths = mask.sum(dim=1)
    first_eos = torch.where(ended, eos.int().argmax(dim=1), 10)
    assert torch.equal(lengths, torch.where(ended, first_eos + 1, 10))
    after = torch.arange(10)[None, :] >= lengths[:, None]
    assert bool((ids[after] == tokenizer.pad_token_id).all())


def test_finished_rows_stop_costing_decode_work(tokenizer):
    model = model_for(tokenizer, eos_bias=3.0)
    rows_per_call = []
    hook = model.model.register_forward_pre_hook(
        lambda module, args, kwargs: rows_per_call.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    try:
        rollout = HFGeneration(model, tokenizer, 64).generate(
            PROMPTS, n=4, max_new_tokens=8, temperature=1.0, top_p=1.0, seed=3
        )
    finally:
        hook.remove()
    prefill, *decode = rows_per_call
    assert prefill[0] == len(PROMPTS)  # each prompt prefilled once, not n times
    assert all(shape[1] == 1 for shape in decode)
    # each decode call runs exactly the rows that had not emitted EOS before it
    lengths = rollout.completion_mask.sum(dim=1)
    expected = [int((lengths > step).sum()) for step in range(1, len(decode) + 1)]
    assert [shape[0] for shape in decode] == expected
    assert expected[-1] < len(lengths)  # some rows did stop early


def test_generation_config_extras_keep_generate(tokenizer):
    model = model_for(tokenizer)
    assert unreproduced_generation_settings(model) == []
    model.generation_config.repetition_penalty = 1.05
    assert unreproduced_generation_settings(model) == ["repetition_penalty=1.05"]
    assert not HFGeneration(model, tokenizer, 64).shared_prefix
    with pytest.raises(ValueError, match=r"repetition_penalty=1\.05"):
        HFGeneration(model, tokenizer, 64, prefix_sharing="on")
