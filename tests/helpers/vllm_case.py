"""What the vLLM engine's test modules share: the skip-or-fail on a missing vLLM, and the tiny random Llama the
engine can run on a CPU (head_dim 64, which vLLM's CPU attention kernels support) over rlvr_fast.testing's character
tokenizer."""

from __future__ import annotations

import os

import pytest
import torch

from rlvr_fast.trainer.rollout.vllm_engine import VLLMUnavailableError, require_vllm


def vllm_or_skip():
    """vLLM's version, or skip the test; ``RLVR_FAST_REQUIRE_VLLM=1`` (CI's vLLM job) turns the skip into a failure."""
    try:
        return require_vllm()
    except VLLMUnavailableError as exc:
        if os.environ.get("RLVR_FAST_REQUIRE_VLLM") == "1":
            raise
        pytest.skip(str(exc))


def tiny_vllm_llama(tokenizer, max_positions: int, seed: int = 0):
    """A 2-layer random Llama drawn from ``seed`` (the global RNG left as it was), with a likelier EOS so that some
    completions end early and others are truncated."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=max_positions,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.get_input_embeddings().weight[tokenizer.eos_token_id] *= 4.0
    return model
