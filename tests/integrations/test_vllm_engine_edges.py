"""Edges of the vLLM rollout engine (rlvr_fast/trainer/rollout/vllm_engine.py) on the real vLLM CPU build: which
distribution its log-probs are of under top_p < 1, the truncated flags against vLLM's own finish reasons, one prompt
with one sample, refusals before sampling, and a LoRA-adapted policy's weights. Run in vLLM's virtualenv as
tests/integrations/test_vllm_engine.py says; skipped without vLLM unless ``RLVR_FAST_REQUIRE_VLLM=1``.

One engine for the module (enforce_eager: a few seconds to start), a tiny random Llama over the character tokenizer.
The config-level refusals (no vLLM needed) are in tests/trainer/test_rollout_engine_edges.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers.vllm_case import tiny_vllm_llama, vllm_or_skip

from rlvr_fast.testing import char_tokenizer
from rlvr_fast.trainer.rollout import vllm_engine

PROMPTS = ["12+3=", "hello world, ", "7*6=", "a"]
MAX_PROMPT, MAX_NEW = 16, 12
FLOAT32_TOL = 1e-4  # float32 engine vs float32 trainer forward: measured ~1e-6 (test_vllm_engine.py)


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_vllm_llama(tokenizer, MAX_PROMPT + MAX_NEW, seed=5)


@pytest.fixture(scope="module")
def engine(model, tokenizer):
    vllm_or_skip()
    eng = vllm_engine.VLLMGeneration(
        model, tokenizer, MAX_PROMPT, MAX_NEW, dtype="float32", enforce_eager=True, kv_cache_gib=0.25
    )
    yield eng
    eng.close()


@torch.no_grad()
def _scores(model, rollout, row: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (L, V) float32 at the row's completion positions, the completion's L tokens): a plain forward."""
    prompt = rollout.prompt_ids[row][rollout.prompt_mask[row].bool()]
    length = int(rollout.completion_mask[row].sum())
    completion = rollout.completion_ids[row, :length]
    logits = model(input_ids=torch.cat([prompt, completion])[None]).logits[0, len(prompt) - 1 : -1].float()
    return logits, completion


def _nucleus_logprobs(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """log_softmax over the top-p nucleus (the smallest set of likeliest tokens whose mass reaches top_p), -inf
    elsewhere: what sampling with top_p draws from. Written from the definition, not from either sampler."""
    probs = torch.softmax(logits, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    before = sorted_probs.cumsum(dim=-1) - sorted_probs  # the mass of the likelier tokens
    keep_sorted = before < top_p  # a token is in while the likelier ones have not reached top_p yet
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return torch.log_softmax(logits.masked_fill(~keep, float("-inf")), dim=-1)


def test_top_p_logprobs_are_of_the_renormalised_nucleus(engine, model):
    """top_p < 1: each sampled token's log-prob is log_softmax(logits / T) over the nucleus, not over the vocabulary
    (the trainer's): higher by -log(nucleus mass) at every token. That gap is why the rollout correction is refused
    with top_p < 1 (registry._check_vllm)."""
    temperature, top_p = 0.8, 0.5
    r = engine.generate(PROMPTS, n=4, max_new_tokens=MAX_NEW, temperature=temperature, top_p=top_p, seed=3)
    nucleus_gap, vocab_gap = 0.0, []
    for row in range(r.completion_ids.shape[0]):
        logits, completion = _scores(model, r, row)
        logits = logits / temperature
        engine_logp = r.rollout_logprobs[row, : len(completion)]
        nucleus = _nucleus_logprobs(logits, top_p).gather(1, completion[:, None])[:, 0]
        vocab = torch.log_softmax(logits, dim=-1).gather(1, completion[:, None])[:, 0]
        nucleus_gap = max(nucleus_gap, float((engine_logp - nucleus).abs().max()))
        vocab_gap.append(engine_logp - vocab)
    vocab_gap = torch.cat(vocab_gap)
    print(f"\ntop_p={top_p}: |engine - nucleus| max {nucleus_gap:.2e}; engine - vocabulary {vocab_gap.min():.3f}..")
    assert nucleus_gap <= FLOAT32_TOL
    assert float(vocab_gap.min()) > 0.1  # every token: -log(mass) > 0 (the mass is ~0.5 here)


def test_truncated_is_exactly_vllms_length_finish(engine, tokenizer, monkeypatch):
    """``truncated`` is True exactly where vLLM stopped for length (no EOS within max_new_tokens), an EOS drawn at the
    last position included (a stop, not truncated); the mask covers the tokens up to and including that EOS."""
    finishes = []
    generate = engine.llm.generate

    def recording(*args, **kwargs):
        outputs = generate(*args, **kwargs)
        finishes.extend(s.finish_reason for o in outputs for s in sorted(o.outputs, key=lambda s: s.index))
        return outputs

    monkeypatch.setattr(engine.llm, "generate", recording)
    new = 3  # short: many completions stop on the last token, others run out
    r = engine.generate(PROMPTS, n=16, max_new_tokens=new, temperature=1.0, top_p=1.0, seed=7)
    assert r.completion_ids.shape == (len(PROMPTS) * 16, new)
    assert r.truncated.tolist() == [f == "length" for f in finishes]
    lengths = r.completion_mask.sum(dim=1)
    last_eos = (~r.truncated) & (lengths == new)
    assert int(r.truncated.sum()) > 0 and int(last_eos.sum()) > 0, "both edges should occur with this seed"
    eos = tokenizer.eos_token_id
    assert torch.all(r.completion_ids[last_eos, new - 1] == eos)


def test_one_prompt_one_sample(engine):
    r = engine.generate(["7*6="], n=1, max_new_tokens=MAX_NEW, temperature=1.0, top_p=1.0, seed=0)
    assert r.completion_ids.shape == r.rollout_logprobs.shape == (1, MAX_NEW) and r.prompt_ids.shape[0] == 1
    assert len(r.texts) == 1 and r.truncated.shape == (1,)


def test_refusals_before_sampling(engine):
    with pytest.raises(ValueError, match=r"a prompt has 17 tokens, more than max_prompt_length=16"):
        engine.generate(["x" * 17], n=2, max_new_tokens=4, temperature=1.0, top_p=1.0, seed=0)
    with pytest.raises(ValueError, match=r"max_new_tokens=13 exceeds the engine's max_new_tokens=12"):
        engine.generate(PROMPTS, n=2, max_new_tokens=MAX_NEW + 1, temperature=1.0, top_p=1.0, seed=0)
    # vLLM would silently sample at 0.01 (and report the log-probs of that distribution)
    with pytest.raises(ValueError, match=r"temperature must be at least 0\.01 .*got 0\.005"):
        engine.generate(PROMPTS, n=2, max_new_tokens=4, temperature=0.005, top_p=1.0, seed=0)
    r = engine.generate(PROMPTS, n=2, max_new_tokens=4, temperature=0.01, top_p=1.0, seed=0)  # the floor samples
    assert r.completion_ids.shape == (8, 4)


class _LoraLinear(torch.nn.Module):
    """HF PEFT's LoRA layer as the trainer's policy holds it (``adapter='lora'``, injected in place): the original
    Linear as ``base_layer``, ``lora_A`` / ``lora_B`` and ``scaling`` per adapter name; forward = base(x) +
    scale * B(A(x)). The same attribute names and parameter names as peft's (vLLM's virtualenv has no peft; the
    main environment's test checks these names against peft's merge_and_unload)."""

    def __init__(self, base: torch.nn.Linear, rank: int, scale: float, generator: torch.Generator):
        super().__init__()
        self.base_layer = base
        self.lora_A = torch.nn.ModuleDict({"default": torch.nn.Linear(base.in_features, rank, bias=False)})
        self.lora_B = torch.nn.ModuleDict({"default": torch.nn.Linear(rank, base.out_features, bias=False)})
        with torch.no_grad():
            self.lora_A["default"].weight.copy_(0.2 * torch.randn(rank, base.in_features, generator=generator))
            self.lora_B["default"].weight.copy_(0.2 * torch.randn(base.out_features, rank, generator=generator))
        self.scale = scale
        self.scaling = {"default": scale}
        self.active_adapters = ["default"]
        self.disable_adapters = False
        self.merged = False

    def forward(self, x):
        return self.base_layer(x) + self.scale * self.lora_B["default"](self.lora_A["default"](x))


def _adapted(model):
    """A copy of ``model`` with every attention and MLP projection LoRA-adapted, B trained away from 0."""
    adapted = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    for layer in adapted.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear):
                    setattr(parent, name, _LoraLinear(child, rank=4, scale=2.0, generator=g))
    return adapted


def test_a_lora_policy_is_sampled_with_its_adapters(engine, model):
    """``adapter='lora'``: the policy's parameters are named ``<layer>.base_layer.weight`` and ``<layer>.lora_A...``,
    which vLLM's model does not have (the push failed: "QKVParallelLinear has no attribute base_layer"); the engine
    gets each adapted layer's merged weight under the plain name and samples the adapted policy (float32 parity)."""
    adapted = _adapted(model)
    engine.sync_weights(adapted)
    try:
        r = engine.generate(PROMPTS, n=4, max_new_tokens=MAX_NEW, temperature=1.0, top_p=1.0, seed=1)
        gaps, base_gaps = [], []
        for row in range(r.completion_ids.shape[0]):
            logits, completion = _scores(adapted, r, row)
            base_logits, _ = _scores(model, r, row)
            engine_logp = r.rollout_logprobs[row, : len(completion)]
            gaps.append(engine_logp - torch.log_softmax(logits, -1).gather(1, completion[:, None])[:, 0])
            base_gaps.append(engine_logp - torch.log_softmax(base_logits, -1).gather(1, completion[:, None])[:, 0])
        gap, base_gap = float(torch.cat(gaps).abs().max()), float(torch.cat(base_gaps).abs().max())
        print(f"\nLoRA policy: max |engine - adapted| {gap:.2e}, |engine - base| {base_gap:.2e}")
        assert gap <= FLOAT32_TOL
        assert base_gap > 100 * FLOAT32_TOL  # the adapters change the function: the parity above could fail
    finally:
        engine.sync_weights(model)


def test_stop_strings_cut_vllm_completions_as_the_native_engine_does(engine, tokenizer, monkeypatch):
    """A base template's stop strings (rollout/stop_strings.py) end vLLM's completions too: the same draw (same
    seed, one engine) with and without stop strings agrees up to the token completing the first stop string, its
    log-probs included; past it the row is masked, padded and zero, and the text stops before the stop string."""
    from rlvr_fast.trainer.rollout.stop_strings import stop_strings_of

    assert engine.stop_strings == stop_strings_of(tokenizer) == ()  # the character tokenizer has no base template
    settings = dict(n=8, max_new_tokens=MAX_NEW, temperature=1.0, top_p=1.0, seed=11)
    whole = engine.generate(PROMPTS, **settings)
    stops = ("e", "1")  # frequent characters of a random model's output: some rows hold one, others not
    monkeypatch.setattr(engine, "stop_strings", stops)
    cut = engine.generate(PROMPTS, **settings)
    rows = [i for i, t in enumerate(whole.texts) if any(s in t for s in stops)]
    assert 0 < len(rows) < len(whole.texts), whole.texts
    for i, text in enumerate(whole.texts):
        if i not in rows:
            assert cut.texts[i] == text and torch.equal(cut.completion_mask[i], whole.completion_mask[i])
            continue
        first = min(text.find(s) for s in stops if s in text)
        kept = first + 1  # one character per token: the stop string's token is the last kept
        assert cut.texts[i] == text[:first] and not bool(cut.truncated[i])
        assert int(cut.completion_mask[i].sum()) == kept
        assert torch.equal(cut.completion_ids[i, :kept], whole.completion_ids[i, :kept])
        assert torch.equal(cut.rollout_logprobs[i, :kept], whole.rollout_logprobs[i, :kept])
        assert bool((cut.rollout_logprobs[i, kept:] == 0).all())
