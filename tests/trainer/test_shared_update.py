"""The trainer's update with the shared prefix: ``policy_step``'s loss and every parameter's gradient, and
the old-policy / reference log-prob passes (``sequence_logprobs``), equal the unshared path; and the micro-batches by
token budget: the result does not depend on the budget, each micro-batch keeps to it, and the decoder positions
reported are the ones the forward computes.

Tiny random Llama / Qwen2 models from a config, left-padded prompts of different lengths, random completions of random
lengths. fp64 (relative error <= 1e-10) with each RMSNorm computing in fp64 (``rlvr_fast.testing.fp64_faithful_norms``),
fp32 (<= 1e-5) with the model as it is; the update's own fused loss in both.
"""

import copy
from dataclasses import replace

import pytest
import torch

from rlvr_fast.ops.loss_types import LOSS_TYPES
from rlvr_fast.testing import assert_close, char_tokenizer, fp64_faithful_norms, random_rollout, tiny_causal_lm
from rlvr_fast.trainer.config import RLVRConfig
from rlvr_fast.trainer.step import UpdateBatch
from rlvr_fast.trainer.update.loss import plan_micro_batches_by_config, policy_step, sequence_logprobs
from rlvr_fast.trainer.update.memory import enable_activation_checkpointing
from rlvr_fast.trainer.update.micro_batches import plan_micro_batches

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}
PROMPTS = ["What is 2 + 3?", "7-1=", "hello there, how many letters?", "9*9"]  # different lengths: left padding
GROUP, MAX_COMPLETION = 3, 6
BUDGET = 160  # a few micro-batches on both paths


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


def build_models(tokenizer, arch, dtype, checkpointing, generator):
    """(policy, old policy, reference): the old and reference models are the policy with perturbed weights, so ratios
    are away from 1 (some clipped) and the KL is not 0."""
    model = tiny_causal_lm(tokenizer, arch=arch, token_bias={"<eos>": 1.0}).to(dtype)
    if dtype == torch.float64:
        fp64_faithful_norms(model)
    others = []
    for _ in range(2):
        other = copy.deepcopy(model).requires_grad_(False)
        with torch.no_grad():
            for p in other.parameters():
                p.add_(0.05 * p.abs().mean() * torch.randn(p.shape, generator=generator, dtype=dtype))
        others.append(other)
    if checkpointing:
        enable_activation_checkpointing(model)
    return model, *others


def update_batch(rollout, generator) -> UpdateBatch:
    """The update batch of ``rollout``; two more completions (zero advantage, skipped) count in the normaliser."""
    rows = rollout.completion_ids.shape[0]
    advantages = torch.randn(rows, generator=generator)
    loss_mask = rollout.completion_mask.float()
    return UpdateBatch(
        rollout=rollout,
        advantages=advantages,
        loss_mask=loss_mask,
        step_rows=rows + 2,
        step_tokens=float(loss_mask.sum()) + 7.0,
        skipped_rows=2,
        skipped_tokens=7.0,
    )


def run_update(model, old_model, ref_model, batch, cfg):
    """(loss, {parameter: gradient}, plan) of the update under ``cfg``: the fixed log-probs through the same
    micro-batches and path as the loss, then ``policy_step``."""
    plan = plan_micro_batches_by_config(model, batch, cfg)
    old = sequence_logprobs(old_model, batch.rollout, cfg.temperature, plan) if cfg.num_iterations > 1 else None
    ref = sequence_logprobs(ref_model, batch.rollout, cfg.temperature, plan) if cfg.beta > 0 else None
    model.zero_grad(set_to_none=True)
    out = policy_step(model, replace(batch, old_logp=old, ref_logp=ref), cfg, plan)
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return torch.tensor(out["loss"], dtype=torch.float64), grads, plan


def update_config(**overrides) -> RLVRConfig:
    values = dict(eps_high=0.28, max_completion_length=MAX_COMPLETION, micro_batch_tokens=BUDGET)
    return RLVRConfig(**{**values, **overrides}).validate()


def assert_same(a, b, tol, what, loss_atol=0.0):
    loss_a, grads_a = a[:2]
    loss_b, grads_b = b[:2]
    assert_close(loss_b, loss_a, rtol=tol, atol=loss_atol, name=f"{what}: loss")
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        assert_close(grads_b[name], grads_a[name], rtol=tol, name=f"{what}: {name}")


# beta > 0 runs the reference pass, num_iterations > 1 the old-policy pass; both through the path under test. Every loss
# type once, the four (beta, num_iterations) combinations spread over them, and GSPO's sequence-level ratio.
EVERY_LOSS = [
    dict(loss_type="grpo", beta=0.04, num_iterations=2),
    dict(loss_type="bnpo", beta=0.0, num_iterations=1),
    dict(loss_type="dr_grpo", beta=0.0, num_iterations=2, dual_clip=3.0),
    dict(loss_type="dapo", beta=0.04, num_iterations=1, kl="k2"),
    dict(loss_type="grpo", beta=0.04, num_iterations=2, importance_sampling="sequence", temperature=0.7),
]
FEW_LOSSES = [
    dict(loss_type="dapo", beta=0.0, num_iterations=1),
    dict(loss_type="grpo", beta=0.04, num_iterations=2, dual_clip=3.0),
]
# Each architecture in each dtype, each with and without activation checkpointing, in four runs.
COMBINATIONS = [
    ("llama", torch.float64, False),
    ("llama", torch.float32, True),
    ("qwen2", torch.float64, True),
    ("qwen2", torch.float32, False),
]


@pytest.mark.parametrize(
    ("arch", "dtype", "checkpointing"),
    COMBINATIONS,
    ids=["llama-fp64", "llama-fp32-ckpt", "qwen2-fp64-ckpt", "qwen2-fp32"],
)
def test_shared_update_equals_unshared(tokenizer, generator, arch, dtype, checkpointing):
    """Every loss type (with and without the KL term and old log-probs, and GSPO) on Llama in fp64; two settings on
    the other combinations."""
    model, old_model, ref_model = build_models(tokenizer, arch, dtype, checkpointing, generator)
    rollout = random_rollout(tokenizer, PROMPTS, GROUP, MAX_COMPLETION, generator)
    batch = update_batch(rollout, generator)
    every = arch == "llama" and dtype == torch.float64
    assert {s["loss_type"] for s in EVERY_LOSS} == set(LOSS_TYPES)
    for settings in EVERY_LOSS if every else FEW_LOSSES:
        unshared = run_update(model, old_model, ref_model, batch, update_config(prefix_sharing="off", **settings))
        shared = run_update(model, old_model, ref_model, batch, update_config(prefix_sharing="on", **settings))
        assert shared[2].shared_prefix and not unshared[2].shared_prefix
        assert len(shared[2].parts) > 1 and len(unshared[2].parts) > 1
        assert len(unshared[1]) == len(list(model.parameters()))  # every parameter has a gradient
        # the loss sums terms of size |A| that random advantages can cancel (seed 20: 6e-4, 1.1e-8 apart in fp32): its
        # rounding is relative to those terms, not to the sum
        atol = TOLERANCE[dtype] * float(batch.advantages.abs().mean())
        assert_same(unshared, shared, TOLERANCE[dtype], str(settings), loss_atol=atol)


def test_fixed_logprobs_equal_unshared(tokenizer, generator):
    """The old-policy / reference pass on its own: shared == unshared == one plain pass, on every real token; the
    columns a micro-batch trims are 0."""
    model = fp64_faithful_norms(tiny_causal_lm(tokenizer, arch="qwen2").to(torch.float64))
    rollout = random_rollout(tokenizer, PROMPTS, GROUP, MAX_COMPLETION, generator)
    one_pass = sequence_logprobs(model, rollout, 0.8)
    mask = rollout.completion_mask.bool()
    for shared in (False, True):
        plan = plan_micro_batches(rollout, shared_prefix=shared, budget=BUDGET)
        logp = sequence_logprobs(model, rollout, 0.8, plan)
        assert_close(logp[mask], one_pass[mask], rtol=1e-6, name=f"shared={shared}")  # fp32 outputs
        for part in plan.parts:
            assert not logp[part.rows, part.completion_width :].any()


def count_decoder_positions(model):
    """A hook on the embedding adding up the token positions each decoder call computes: (counter, handle)."""
    seen = [0]

    def hook(_module, args):
        seen[0] += args[0].numel()

    return seen, model.get_input_embeddings().register_forward_pre_hook(hook)


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "unshared"])
def test_budget_changes_nothing_and_is_kept(tokenizer, generator, shared):
    """Budgets from one micro-batch for the whole step down to groups split by rows and rows alone over the budget, and
    the split by count, give the same loss and gradients (fp64, 1e-10); each micro-batch keeps to the budget unless it
    is one row that alone exceeds it (or rows whose prompt alone exceeds it and whose completions add nothing), holds
    whole groups unless its group alone exceeds it, and computes exactly the decoder positions the plan reports."""
    model, old_model, ref_model = build_models(tokenizer, "llama", torch.float64, False, generator)
    rollout = random_rollout(tokenizer, PROMPTS, GROUP, MAX_COMPLETION, generator)
    keep = torch.tensor([0, 1, 2, 4, 5, 6, 7, 9, 10, 11])  # groups of 3, 2, 2, 3 rows (zero-advantage rows dropped)
    kept = rollout.select(keep)
    batch = update_batch(kept, generator)
    group_of_row = keep // GROUP
    mode = "on" if shared else "off"
    settings = dict(loss_type="bnpo", beta=0.04, num_iterations=2, prefix_sharing=mode)
    results = []
    for budget in (10**6, 40, 20):
        cfg = update_config(micro_batch_tokens=budget, **settings)
        seen, handle = count_decoder_positions(model)
        try:
            results.append(run_update(model, old_model, ref_model, batch, cfg))
        finally:
            handle.remove()
        plan = results[-1][2]
        metrics = plan.metrics()
        # the old-policy and reference passes run on other models: only the loss's forward is counted here
        assert seen[0] == metrics["decoder_tokens"]
        assert sorted(torch.cat([p.rows for p in plan.parts]).tolist()) == list(range(len(keep)))
        for part in plan.parts:
            groups = set(group_of_row[part.rows].tolist())
            whole = all(int((group_of_row == g).sum()) == int((group_of_row[part.rows] == g).sum()) for g in groups)
            # over the budget only where one of its rows alone is (a prompt longer than the budget: its rows cost
            # nothing more together than apart when their completions are one token, so they stay together)
            alone = max(_alone_tokens(kept, int(r), shared) for r in part.rows)
            assert part.decoder_tokens <= max(budget, alone), (budget, alone, part)
            assert part.decoder_tokens <= budget or len(part.rows) == 1 or alone == part.decoder_tokens, (budget, part)
            assert whole or len(groups) == 1, (budget, part)
        if budget == 10**6:
            assert metrics["micro_batches"] == 1
    results.append(run_update(model, old_model, ref_model, batch, update_config(grad_accumulation=3, **settings)))
    assert len(results[-1][2].parts) == 3
    for other in results[1:]:
        assert_same(results[0], other, 1e-10, f"{len(other[2].parts)} micro-batches")


def _alone_tokens(rollout, row: int, shared: bool) -> int:
    """Decoder positions of a micro-batch of row ``row`` of ``rollout`` alone."""
    one = rollout.select(torch.tensor([row]))
    return plan_micro_batches(one, shared_prefix=shared, budget=10**6).metrics()["decoder_tokens"]


def test_decoder_token_and_padding_counts(tokenizer):
    """Hand-counted: prompts of 3 and 5 tokens, two completions each of lengths (2, 4) and (1, 3)."""
    enc = tokenizer(["abc", "abcde"], return_tensors="pt", padding=True, add_special_tokens=False)
    lengths = torch.tensor([2, 4, 1, 3])
    cmask = (torch.arange(6)[None, :] < lengths[:, None]).long()  # two all-padding columns on the right
    rollout = random_rollout(tokenizer, ["abc", "abcde"], 2, 6, torch.Generator().manual_seed(0))
    rollout = replace(rollout, completion_mask=cmask, completion_ids=torch.where(cmask.bool(), 5, 0))
    assert torch.equal(rollout.prompt_ids[::2], enc["input_ids"])

    one = plan_micro_batches(rollout, shared_prefix=True, budget=10**6)
    (part,) = one.parts
    assert (part.prompt_start, part.completion_width) == (0, 4)
    # shared: 2 prompts x 5 columns + 4 rows x 3 completion columns; padding: 2 in the short prompt, 0+1+2+0 in the
    # completions' first 3 columns
    assert one.metrics() == {
        "micro_batches": 1,
        "decoder_tokens": 2 * 5 + 4 * 3,
        "decoder_tokens_unshared": 4 * (5 + 6),
        "padding_fraction": (2 + 3) / 22,
    }
    unshared = plan_micro_batches(rollout, shared_prefix=False, budget=10**6).metrics()
    assert unshared["decoder_tokens"] == 4 * (5 + 4)  # the right padding columns trimmed
    assert unshared["padding_fraction"] == (2 * 2 + (2 + 0 + 3 + 1)) / 36

    by_group = plan_micro_batches(rollout, shared_prefix=True, budget=13)  # one group at a time, shorter first
    assert [p.rows.tolist() for p in by_group.parts] == [[2, 3], [0, 1]]
    short_prompt = by_group.parts[1]
    assert (short_prompt.prompt_start, short_prompt.completion_width, short_prompt.decoder_tokens) == (2, 4, 3 + 6)
    assert short_prompt.padding_tokens == 1  # the row of length 2, third completion column


def test_groups_of_similar_length_share_a_micro_batch(tokenizer, generator):
    """Sorted by length: with room for two groups, the two short groups go together and the two long ones too."""
    rollout = random_rollout(tokenizer, ["a", "b", "c", "d"], 2, 8, generator)
    lengths = torch.tensor([8, 7, 1, 2, 8, 6, 2, 1])  # groups' longest completions 8, 2, 8, 2
    cmask = (torch.arange(8)[None, :] < lengths[:, None]).long()
    rollout = replace(rollout, completion_mask=cmask)
    plan = plan_micro_batches(rollout, shared_prefix=True, budget=2 * 1 + 4 * 7)
    assert sorted(sorted(p.rows.tolist()) for p in plan.parts) == [[0, 1, 4, 5], [2, 3, 6, 7]]


def test_bad_plan_arguments_are_named():
    rollout = random_rollout(char_tokenizer(), ["ab"], 2, 3, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="exactly one of budget and count"):
        plan_micro_batches(rollout, shared_prefix=True, budget=10, count=2)
    with pytest.raises(ValueError, match="budget must be >= 1, got 0"):
        plan_micro_batches(rollout, shared_prefix=True, budget=0)
