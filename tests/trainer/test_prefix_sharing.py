"""Shared-prefix forward (rlvr_fast.trainer.update.shared_prefix_forward): each prompt run once, its completions against
its cached
keys and values, gives the hidden states, the loss and every parameter's gradient of the unshared path
(``policy.completion_hidden`` + the GRPO-family loss), on tiny random Llama / Qwen2 models built from a config.

fp64: relative error <= 1e-10. transformers' RMSNorm computes in float32 whatever the input dtype (it casts fp64 down
and back), which caps any fp64 comparison at fp32 rounding; the fp64 cases therefore swap each RMSNorm's forward for
the same formula in the input's dtype (``rlvr_fast.testing.fp64_faithful_norms``), and compute the loss with the fp64
reference (``fused_linear_grpo_loss_reference``), since the fused op accumulates in fp32. fp32: relative error <= 1e-5,
with the model as it is and the fused op.
"""

import logging

import pytest
import torch

from rlvr_fast.ops.fused_linear_grpo_loss import fused_linear_grpo_loss, fused_linear_grpo_loss_reference
from rlvr_fast.ops.objective import FIELDS, PolicyObjective, flat_arguments
from rlvr_fast.testing import assert_close, char_tokenizer, fp64_faithful_norms, random_rollout, tiny_causal_lm
from rlvr_fast.trainer.model import lm_head_weight
from rlvr_fast.trainer.update import shared_prefix_forward as prefix_sharing
from rlvr_fast.trainer.update.loss import completion_hidden
from rlvr_fast.trainer.update.memory import activation_checkpointed_forward, enable_activation_checkpointing
from rlvr_fast.trainer.update.shared_prefix_forward import (
    SharedPrompts,
    decoder_tokens,
    resolve_prefix_sharing,
    shared_completion_hidden,
    shared_prefix_hidden,
    supports_prefix_sharing,
)

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}
PROMPTS = ["What is 2 + 3?", "7-1=", "hello there, how many letters?"]  # different lengths: left padding differs


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


def build_model(tokenizer, arch, dtype, checkpointing=False, **kwargs):
    model = tiny_causal_lm(tokenizer, arch=arch, token_bias={"<eos>": 1.0}, **kwargs).to(dtype)
    if dtype == torch.float64:
        fp64_faithful_norms(model)
    if checkpointing:
        enable_activation_checkpointing(model)
    return model


def loss_and_grads(model, rollout, hidden_fn, loss_kwargs, dtype):
    """(hidden, loss, {parameter: gradient}) of one forward + backward through ``hidden_fn``."""
    model.zero_grad(set_to_none=True)
    weight, bias = lm_head_weight(model)
    with activation_checkpointed_forward(model):
        hidden = hidden_fn(model, rollout)
    loss_fn = fused_linear_grpo_loss_reference if dtype == torch.float64 else fused_linear_grpo_loss
    tensors = {k: v for k, v in loss_kwargs.items() if k not in FIELDS}  # the reference takes the objective only
    objective = PolicyObjective(**flat_arguments(loss_kwargs))
    loss, _ = loss_fn(
        hidden, weight, rollout.completion_ids, rollout.completion_mask, bias=bias, objective=objective, **tensors
    )
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return hidden.detach(), loss.detach(), grads


def assert_same_update(model, rollout, loss_kwargs, dtype):
    hidden_a, loss_a, grads_a = loss_and_grads(model, rollout, completion_hidden, loss_kwargs, dtype)
    hidden_b, loss_b, grads_b = loss_and_grads(model, rollout, shared_completion_hidden, loss_kwargs, dtype)
    tol = TOLERANCE[dtype]
    assert_close(hidden_b, hidden_a, rtol=tol, name="hidden")
    # the loss sums terms of size |A| that random advantages can cancel: its rounding is relative to them, not the sum
    atol = tol * float(loss_kwargs["advantages"].abs().mean())
    assert_close(loss_b, loss_a, rtol=tol, atol=atol, name="loss")
    assert grads_a.keys() == grads_b.keys()
    assert len(grads_a) == len(list(model.parameters()))  # every parameter gets a gradient
    for name in grads_a:
        assert_close(grads_b[name], grads_a[name], rtol=tol, name=name)


def loss_options(rollout, loss_type, beta, generator, off_policy):
    rows, lc = rollout.completion_ids.shape
    advantages = torch.randn(rows, generator=generator)
    advantages[1] = 0.0  # a zero-advantage completion (skipped LM-head work in the fused op when beta == 0)
    near = (-1.0 + 0.3 * torch.randn(rows, lc, generator=generator)).clamp(max=0.0)  # log-probs are <= 0
    return dict(
        advantages=advantages,
        old_logp=near if off_policy else None,  # num_iterations > 1: ratios away from 1, some clipped
        ref_logp=(near + 0.2 * torch.randn(rows, lc, generator=generator)).clamp(max=0.0) if beta > 0 else None,
        beta=beta,
        loss_type=loss_type,
        eps_high=0.28,
        max_completion_length=lc if loss_type == "dr_grpo" else None,
    )


EVERY_LOSS = [(t, beta, beta > 0) for t in ("grpo", "bnpo", "dr_grpo", "dapo") for beta in (0.0, 0.04)]
# The loss type does not change what the decoder computes, only the gradient it receives: fp64 (the tight check) runs
# every loss type; fp32 and activation checkpointing (each decoder layer recomputed in the backward, our caches with it)
# run two configurations, on- and off-policy, with and without the KL term.
FEW_LOSSES = [("dapo", 0.0, False), ("grpo", 0.04, True)]


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_shared_prefix_equals_unshared(tokenizer, generator, arch, dtype, checkpointing):
    """Every loss type, beta 0 (on-policy) and beta > 0 with old log-probs (num_iterations > 1), in fp64; two of them
    in fp32 and with checkpointing on."""
    model = build_model(tokenizer, arch, dtype, checkpointing)
    rollout = random_rollout(tokenizer, PROMPTS, group_size=3, max_completion=5, generator=generator)
    every = dtype == torch.float64 and not checkpointing
    for loss_type, beta, off_policy in EVERY_LOSS if every else FEW_LOSSES:
        opts = loss_options(rollout, loss_type, beta, generator, off_policy)
        try:
            assert_same_update(model, rollout, opts, dtype)
        except AssertionError as e:
            raise AssertionError(f"loss_type={loss_type} beta={beta} off_policy={off_policy}: {e}") from e


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_sequence_importance_sampling_and_partial_groups(tokenizer, generator, arch):
    """GSPO's sequence-level ratio, and a micro-batch that holds some rows of a group only, out of order (what the
    trainer's zero-advantage skip and micro-batching leave)."""
    model = build_model(tokenizer, arch, torch.float64)
    rollout = random_rollout(tokenizer, PROMPTS, group_size=4, max_completion=6, generator=generator)
    rollout = rollout.select(torch.tensor([9, 0, 5, 6, 2, 11, 1]))
    opts = loss_options(rollout, "grpo", 0.04, generator, off_policy=True)
    assert_same_update(model, rollout, {**opts, "importance_sampling": "sequence"}, torch.float64)


def test_one_token_completions_and_one_prompt(tokenizer, generator):
    model = build_model(tokenizer, "llama", torch.float64)
    rollout = random_rollout(tokenizer, PROMPTS[:1], group_size=3, max_completion=1, generator=generator)
    assert_same_update(model, rollout, loss_options(rollout, "dapo", 0.0, generator, False), torch.float64)


@pytest.mark.parametrize("max_completion", [1, 4])
def test_same_decoder_calls_whatever_the_completion_width(tokenizer, generator, max_completion):
    """Each decoder layer runs twice forward and twice backward (the prompts, then the completions), one-column
    completions included: under torchrun each call of an FSDP unit is a collective, so a micro-batch of one-token
    completions on one rank only must not skip a call (it did, and the world hung)."""
    model = build_model(tokenizer, "llama", torch.float32)
    rollout = random_rollout(tokenizer, PROMPTS, group_size=2, max_completion=max_completion, generator=generator)
    assert rollout.completion_ids.shape[1] == max_completion
    layers = list(model.model.layers)
    forward, backward = [0] * len(layers), [0] * len(layers)
    for i, layer in enumerate(layers):
        layer.register_forward_hook(lambda *_, i=i: forward.__setitem__(i, forward[i] + 1))
        layer.register_full_backward_hook(lambda *_, i=i: backward.__setitem__(i, backward[i] + 1))
    hidden = shared_completion_hidden(model, rollout)
    assert hidden.shape[1] == max_completion
    hidden.square().sum().backward()
    assert forward == backward == [2] * len(layers)


def test_old_policy_logprobs_pass_without_grad(tokenizer, generator):
    """The old-policy / reference passes run under no_grad; the shared hidden states are those of the unshared."""
    model = build_model(tokenizer, "qwen2", torch.float32)
    rollout = random_rollout(tokenizer, PROMPTS, group_size=2, max_completion=4, generator=generator)
    with torch.no_grad():
        assert_close(shared_completion_hidden(model, rollout), completion_hidden(model, rollout), rtol=1e-5)


def test_shared_prompts_dedupe_and_trim(tokenizer):
    enc = tokenizer(["ab", "abcd", "ab"], return_tensors="pt", padding=True, add_special_tokens=False)
    ids = torch.cat([torch.full((3, 2), tokenizer.pad_token_id), enc["input_ids"]], dim=1)  # 2 extra pad columns
    mask = torch.cat([torch.zeros(3, 2, dtype=torch.long), enc["attention_mask"]], dim=1)
    shared = SharedPrompts.from_rows(ids, mask)
    assert shared.prompt_ids.shape == (2, 4)  # two distinct prompts; only the columns some prompt uses
    assert torch.equal(shared.prompt_ids[shared.prompt_index], enc["input_ids"])
    assert torch.equal(shared.prompt_mask[shared.prompt_index], enc["attention_mask"])


def test_decoder_token_counts(tokenizer, generator):
    rollout = random_rollout(tokenizer, ["abc", "abcde"], group_size=4, max_completion=6, generator=generator)
    counts = decoder_tokens(rollout)
    assert counts == {"unshared": 8 * (5 + 6), "shared": 2 * 5 + 8 * 5}


def test_bad_input_names_the_argument(tokenizer):
    model = build_model(tokenizer, "llama", torch.float32)
    ids, mask = torch.tensor([[5, 6, 7]]), torch.tensor([[1, 1, 1]])
    comp, cmask = torch.tensor([[8, 9]]), torch.tensor([[1, 1]])
    with pytest.raises(ValueError, match="prompt_index must lie in"):
        shared_prefix_hidden(model, ids, mask, comp, cmask, torch.tensor([1]))
    with pytest.raises(ValueError, match="prompt_index must be int64"):
        shared_prefix_hidden(model, ids, mask, comp, cmask, torch.tensor([0], dtype=torch.int32))
    with pytest.raises(ValueError, match="left-padded"):
        shared_prefix_hidden(model, ids, torch.tensor([[1, 1, 0]]), comp, cmask, torch.tensor([0]))
    with pytest.raises(ValueError, match="completion_ids and completion_mask"):
        shared_prefix_hidden(model, ids, mask, comp, cmask[:, :1], torch.tensor([0]))


def test_supported_and_unsupported_architectures(tokenizer, caplog):
    assert supports_prefix_sharing(build_model(tokenizer, "llama", torch.float32)) == (True, "")
    assert supports_prefix_sharing(build_model(tokenizer, "qwen2", torch.float32)) == (True, "")
    sliding = tiny_causal_lm(tokenizer, arch="qwen2")
    sliding.config.layer_types = ["sliding_attention", "full_attention"]
    ok, reason = supports_prefix_sharing(sliding)
    assert not ok and "Qwen2ForCausalLM" in reason and "sliding_attention" in reason
    other_kernel = tiny_causal_lm(tokenizer, arch="llama")
    other_kernel.config._attn_implementation = "flash_attention_2"
    ok, reason = supports_prefix_sharing(other_kernel)
    assert not ok and "flash_attention_2" in reason

    assert resolve_prefix_sharing(build_model(tokenizer, "llama", torch.float32), "auto")
    assert not resolve_prefix_sharing(build_model(tokenizer, "llama", torch.float32), "off")
    with pytest.raises(ValueError, match="prefix_sharing='on' but Qwen2ForCausalLM has sliding_attention"):
        resolve_prefix_sharing(sliding, "on")
    with pytest.raises(ValueError, match="prefix_sharing must be one of"):
        resolve_prefix_sharing(sliding, "yes")
    prefix_sharing._reported.discard("Qwen2ForCausalLM")
    with caplog.at_level(logging.WARNING, logger=prefix_sharing.__name__):
        assert not resolve_prefix_sharing(sliding, "auto")
        assert not resolve_prefix_sharing(sliding, "auto")
    said = [r.getMessage() for r in caplog.records if "sliding_attention" in r.getMessage()]
    assert len(said) == 1  # said once, by name
