"""LoRA / QLoRA training (``RLVRConfig.adapter``, rlvr_fast/trainer/adapters): the config refusals before anything
loads, adapter-only training with the fused ops equal to a plain-PyTorch reference, the reference model as the policy
with its adapters off, PEFT-format checkpoints with an exact resume, ``rlvr-fast eval`` of an adapter checkpoint, and
the shared-prefix update with adapters."""

from __future__ import annotations

import argparse
import json
import os

import pytest
import torch
from helpers.runs import TOKEN_BIAS, saved_tiny_model, tiny_config

from rlvr_fast.testing import assert_close, char_tokenizer, fp64_faithful_norms, random_rollout, tiny_causal_lm
from rlvr_fast.trainer.adapters import apply_adapter
from rlvr_fast.trainer.checks.preflight import check_adapter
from rlvr_fast.trainer.config import add_config_arguments
from rlvr_fast.trainer.loop import Trainer
from rlvr_fast.trainer.model import LoadedModel
from rlvr_fast.trainer.schema import ConfigFieldError
from rlvr_fast.trainer.step import UpdateBatch
from rlvr_fast.trainer.update.loss import completion_hidden, policy_step, sequence_logprobs
from rlvr_fast.trainer.update.micro_batches import plan_micro_batches
from rlvr_fast.trainer.update.shared_prefix_forward import shared_completion_hidden

LORA = dict(adapter="lora", lora_rank=4, lora_alpha=8)


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


def loaded(tokenizer, seed: int = 0) -> LoadedModel:
    model = tiny_causal_lm(tokenizer, token_bias=TOKEN_BIAS, seed=seed)
    return LoadedModel(model, tokenizer, torch.device("cpu"), torch.float32)


def is_lora(name: str) -> bool:
    return "lora_A" in name or "lora_B" in name


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


# ---- 1. configuration: refused before the model loads -------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "field", "words"),
    [
        (dict(lora_rank=0), "lora_rank", ">= 1"),
        (dict(optimizer="sparse_adamw", mask_source="random:0.1"), "optimizer", "sparse_adamw"),
        (dict(mask_source="random:0.1"), "mask_source", "sparse_adamw"),
        (dict(lora_target_modules="q_proj,lm_head"), "lora_target_modules", "silently ignored"),
        (dict(lora_dropout=0.1), "lora_dropout", "eval mode"),
        (dict(adapter="dora"), "adapter", "lora"),
    ],
)
def test_bad_adapter_config_is_refused_by_name(tmp_path, overrides, field, words):
    with pytest.raises(ConfigFieldError) as info:
        tiny_config(tmp_path, **{**LORA, **overrides}).validate()
    assert info.value.field == field and words in str(info.value), str(info.value)


def test_unknown_target_module_refused_at_preflight_and_after_load(tmp_path, tokenizer):
    """A local model folder: refused by the meta-device architecture at preflight; a model given in memory: before any
    training, right after the load. Both name the valid module names."""
    folder = saved_tiny_model(tmp_path)
    cfg = tiny_config(tmp_path, model=folder, **LORA, lora_target_modules="q_proj,qkv")
    with pytest.raises(ConfigFieldError, match=r"\['qkv'\].*'q_proj'") as info:
        check_adapter(cfg)
    assert info.value.field == "lora_target_modules"
    check_adapter(tiny_config(tmp_path, model=folder, **LORA, lora_target_modules="q_proj,v_proj"))  # valid: passes
    with pytest.raises(ConfigFieldError, match="expected 'all-linear' or names from") as info:
        Trainer(tiny_config(tmp_path, **LORA, lora_target_modules="qkv"), loaded=loaded(tokenizer))


def test_cli_help_lists_the_adapter_flags():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    text = parser.format_help()
    for flag in ("--adapter", "--lora_rank", "--lora_alpha", "--lora_dropout", "--lora_target_modules"):
        assert flag in text, flag
    assert "{none,lora,qlora}" in text


# ---- 2. training: only the adapter moves, and the fused update equals a plain-PyTorch one ----------------------------


def test_lora_trains_only_the_adapter(tmp_path, tokenizer):
    trainer = Trainer(tiny_config(tmp_path, **LORA), loaded=loaded(tokenizer))
    before = snapshot(trainer.model)
    trained = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trained and all(is_lora(n) for n in trained)
    for step in range(2):
        trainer.train_step(step)
    after = snapshot(trainer.model)
    base = [n for n in before if not is_lora(n)]
    assert all(torch.equal(before[n], after[n]) for n in base)  # the base weights are bit-identical
    assert any(not torch.equal(before[n], after[n]) for n in after if "lora_B" in n)  # B starts at 0 and moved
    assert all(n in before for n in after)


def reference_loss(model, batch: UpdateBatch, temperature: float) -> torch.Tensor:
    """dapo's loss with beta 0, on-policy, from the materialised logits of the (adapted) model's own forward."""
    ro = batch.rollout
    positions = (ro.attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    logits = model(input_ids=ro.input_ids, attention_mask=ro.attention_mask, position_ids=positions).logits
    lp = ro.prompt_ids.shape[1]
    logp = torch.log_softmax(logits[:, lp - 1 : -1].float() / temperature, dim=-1)
    logp = logp.gather(-1, ro.completion_ids[..., None]).squeeze(-1)
    ratio = torch.exp(logp - logp.detach())
    per_token = -ratio * batch.advantages[:, None]
    return (per_token * batch.loss_mask).sum() / batch.step_tokens


def test_fused_update_equals_plain_pytorch_on_the_adapted_model(tmp_path, tokenizer, generator):
    cfg = tiny_config(tmp_path, **LORA, loss_type="dapo")
    model = loaded(tokenizer).model
    apply_adapter(cfg, model)
    with torch.no_grad():  # B = 0 would make every A-gradient 0: give the adapter a non-trivial state
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=generator)
    rollout = random_rollout(tokenizer, ["a + b =", "c - 1 ="], group_size=3, max_completion=5, generator=generator)
    mask = rollout.completion_mask.float()
    batch = UpdateBatch(rollout, torch.randn(len(mask), generator=generator), mask, len(mask), float(mask.sum()), 0, 0)

    model.zero_grad(set_to_none=True)
    out = policy_step(model, batch, cfg, plan_micro_batches(rollout, shared_prefix=False, count=1))
    fused = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    loss = reference_loss(model, batch, cfg.temperature)
    loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    # the loss is a mean of signed terms that can cancel to ~1e-4: an absolute float32 rounding floor, not only a
    # relative one (seed 78: 1.4e-8 off on a loss of 1.5e-4)
    assert_close(torch.tensor(out["loss"]), loss.detach(), rtol=1e-5, atol=1e-6, name="loss")
    assert fused.keys() == plain.keys() and all(is_lora(n) for n in fused) and fused
    for n in fused:
        assert_close(fused[n], plain[n], rtol=1e-4, atol=1e-6, name=n)


# ---- 3. beta > 0: the reference is the policy with its adapters off ------------------------------------------------


def test_reference_is_the_base_with_adapters_off_and_no_copy(tmp_path, tokenizer, generator):
    base = loaded(tokenizer).model
    base_logp_model = tiny_causal_lm(tokenizer, token_bias=TOKEN_BIAS)  # the same base, never adapted
    trainer = Trainer(
        tiny_config(tmp_path, **LORA, beta=0.04),
        loaded=LoadedModel(base, tokenizer, torch.device("cpu"), torch.float32),
    )
    assert trainer.ref_model is trainer.model  # no second copy of the weights
    with torch.no_grad():
        for n, p in trainer.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5, generator=generator)  # the policy now differs from its base
    rollout = random_rollout(tokenizer, ["a + b ="], group_size=2, max_completion=4, generator=generator)
    with trainer.ref.head_gathered():
        ref = sequence_logprobs(trainer.ref_model, rollout, 1.0)
    policy = sequence_logprobs(trainer.model, rollout, 1.0)
    expected = sequence_logprobs(base_logp_model, rollout, 1.0)
    assert torch.equal(ref, expected)
    assert not torch.allclose(policy, expected)  # the adapters are back on after the block

    full = Trainer(tiny_config(tmp_path, beta=0.04, output_dir=str(tmp_path / "full")), loaded=loaded(tokenizer))
    own = {p.data_ptr() for p in full.model.parameters()}
    copied = sum(p.numel() * p.element_size() for p in full.ref_model.parameters() if p.data_ptr() not in own)
    assert copied > 0  # a full run's deepcopy: what the adapter run does not allocate
    print(f"reference copy avoided: {copied} bytes")


# ---- 4. checkpoints: PEFT's format, exact resume, rlvr-fast eval ---------------------------------------------------


def adapter_weights(model) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in model.state_dict().items() if is_lora(n)}


def test_adapter_checkpoint_is_peft_format_and_resume_is_exact(tmp_path, tokenizer):
    common = dict(**LORA, steps=4, checkpoint_every=2)
    full = Trainer(tiny_config(tmp_path, output_dir=str(tmp_path / "full"), **common), loaded=loaded(tokenizer))
    full_result = full.train()

    part_dir = tmp_path / "part"
    interrupted = Trainer(tiny_config(tmp_path, output_dir=str(part_dir), **common), loaded=loaded(tokenizer))
    interrupted.cfg.steps = 2  # the process dies after step 2's checkpoint
    interrupted.train()
    step2 = part_dir / "checkpoints" / "step-000002"
    assert {"adapter_model.safetensors", "adapter_config.json", "optimizer.safetensors"} <= set(os.listdir(step2))
    assert "model.safetensors" not in os.listdir(step2)  # the frozen base is not stored

    from peft import PeftModel

    reloaded = PeftModel.from_pretrained(loaded(tokenizer).model, str(step2))
    saved = adapter_weights(reloaded.base_model.model)
    live = adapter_weights(interrupted.model)
    assert saved.keys() == live.keys() and all(torch.equal(saved[n], live[n]) for n in live)

    resumed = Trainer(tiny_config(tmp_path, output_dir=str(part_dir), resume=True, **common), loaded=loaded(tokenizer))
    with torch.no_grad():  # a different adapter state: the checkpoint must win
        for n, p in resumed.model.named_parameters():
            if is_lora(n):
                p.add_(1.0)
    resumed_result = resumed.train()
    a, b = adapter_weights(full.model), adapter_weights(resumed.model)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert full_result.after == resumed_result.after


def test_eval_of_an_adapter_checkpoint_is_base_plus_adapter(tmp_path, tokenizer):
    from rlvr_fast.trainer.checks.preflight import check_eval_checkpoint
    from rlvr_fast.trainer.evaluation.command import run_eval

    folder = saved_tiny_model(tmp_path)
    cfg = tiny_config(tmp_path, model=folder, device="cpu", dtype="float32", **LORA, steps=1)
    trainer = Trainer(cfg)
    trainer.train()
    step = os.path.join(cfg.output_dir, "checkpoints", "step-000001")
    check_eval_checkpoint(step)
    plain = tiny_config(tmp_path, model=folder, device="cpu", dtype="float32")
    from rlvr_fast.trainer.model import load_model

    base = load_model(plain)
    text = run_eval(plain, checkpoint=step, loaded=base)
    assert "pass@1" in text
    a, b = adapter_weights(trainer.model), adapter_weights(base.model)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.parametrize("hidden", [32, 64])  # 32: input widths that are no multiple of NF4's 64-wide blocks
def test_qlora_gradients_equal_the_dequantised_twin_after_an_inference_pass(tmp_path, tokenizer, generator, hidden):
    """QLoRA's adapter gradients flow back through every NF4 base layer: they equal those of a float twin whose base
    Linear weights are the dequantised NF4 ones, also after a no-grad forward (generation) ran first. On a CPU with
    AVX512-BF16, bitsandbytes repacks an eval-mode layer's weight for a fast inference kernel on its first no-grad
    call, and that kernel has no backward: every later gradient through the layer would be silently wrong."""
    bnb = pytest.importorskip("bitsandbytes")
    cfg = tiny_config(tmp_path, adapter="qlora", lora_rank=4, lora_alpha=8, loss_type="dapo")
    model = tiny_causal_lm(tokenizer, token_bias=TOKEN_BIAS, hidden=hidden)
    apply_adapter(cfg, model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=generator)
    dequantised = {
        n: bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state).float()
        for n, m in model.named_modules()
        if isinstance(m, bnb.nn.Linear4bit)
    }
    twin = tiny_causal_lm(tokenizer, token_bias=TOKEN_BIAS, hidden=hidden)
    apply_adapter(tiny_config(tmp_path, **{**LORA, "lora_rank": 4, "lora_alpha": 8}), twin)
    twin_modules = dict(twin.named_modules())
    with torch.no_grad():
        for n, w in dequantised.items():
            twin_modules[n].weight.copy_(w)
        lora = {n: p for n, p in model.named_parameters() if is_lora(n)}
        for n, p in twin.named_parameters():
            if is_lora(n):
                p.copy_(lora[n])
    rollout = random_rollout(tokenizer, ["a + b =", "c - 1 ="], group_size=3, max_completion=5, generator=generator)
    with torch.no_grad():  # what generation does before the update
        model(input_ids=rollout.prompt_ids, attention_mask=rollout.prompt_mask)
    mask = rollout.completion_mask.float()
    batch = UpdateBatch(rollout, torch.randn(len(mask), generator=generator), mask, len(mask), float(mask.sum()), 0, 0)
    grads = []
    for m in (model, twin):
        m.zero_grad(set_to_none=True)
        policy_step(m, batch, cfg, plan_micro_batches(rollout, shared_prefix=False, count=1))
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        assert_close(grads[0][n], grads[1][n], rtol=1e-3, atol=1e-6, name=n)


def test_eval_of_a_qlora_checkpoint_quantises_the_base_as_training_did(tmp_path, tokenizer):
    """The checkpoint's run config says qlora: ``rlvr-fast eval`` quantises the same Linear layers to NF4 before the
    adapter goes in, so it evaluates the model that trained, and its pass@k equals the run's own evaluation after
    training (same problems, same sampling seed)."""
    bnb = pytest.importorskip("bitsandbytes")
    from rlvr_fast.trainer.evaluation.command import checkpoint_eval_config, run_eval
    from rlvr_fast.trainer.model import load_model

    folder = str(tmp_path / "model64")
    tiny_causal_lm(tokenizer, token_bias=TOKEN_BIAS, hidden=64).save_pretrained(folder)  # CPU NF4: 64-wide blocks
    tokenizer.save_pretrained(folder)
    cfg = tiny_config(
        tmp_path, model=folder, device="cpu", dtype="float32", adapter="qlora", lora_rank=4, lora_alpha=8, steps=1
    )
    trainer = Trainer(cfg)
    trainer.train()
    step = os.path.join(cfg.output_dir, "checkpoints", "step-000001")
    plain = tiny_config(tmp_path, model=folder, device="cpu", dtype="float32")
    said = []
    adopted = checkpoint_eval_config(plain, step, explicit=frozenset(), log=said.append)
    assert adopted.adapter == "qlora" and any("adapter='qlora'" in line for line in said)
    base = load_model(adopted)
    text = run_eval(adopted, checkpoint=step, loaded=base)
    quantized = [m for m in base.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == len([m for m in trainer.model.modules() if isinstance(m, bnb.nn.Linear4bit)]) > 0
    a, b = adapter_weights(trainer.model), adapter_weights(base.model)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    with open(os.path.join(cfg.output_dir, "eval_after.json")) as f:
        after = json.load(f)
    assert f"pass@1: {after['pass_at_k']['1']['mean']:.3f}" in text, text


# ---- 5. the shared-prefix update with adapters ---------------------------------------------------------------------


def test_shared_prefix_update_with_lora_equals_unshared(tmp_path, tokenizer, generator):
    model = tiny_causal_lm(tokenizer, token_bias={"<eos>": 1.0}).double()
    fp64_faithful_norms(model)  # RMSNorm's float32 upcast would otherwise cap the agreement at float32's
    apply_adapter(tiny_config(tmp_path, **LORA), model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=generator)
    rollout = random_rollout(tokenizer, ["a + b =", "c - 1 ="], group_size=3, max_completion=5, generator=generator)
    mask = rollout.completion_mask.bool()
    probe = torch.randn(*mask.shape, 32, generator=generator, dtype=torch.float64) * mask[..., None]  # real tokens only
    results = []
    for hidden_fn in (completion_hidden, shared_completion_hidden):
        model.zero_grad(set_to_none=True)
        hidden = hidden_fn(model, rollout)
        (hidden * probe).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((hidden.detach(), grads))
    (h_a, g_a), (h_b, g_b) = results
    assert_close(h_b[mask], h_a[mask], rtol=1e-10, name="hidden")
    assert g_a.keys() == g_b.keys() and all(is_lora(n) for n in g_a)
    for n in g_a:
        assert_close(g_b[n], g_a[n], rtol=1e-9, atol=1e-12, name=n)


def test_lora_run_with_prefix_sharing_on_trains(tmp_path, tokenizer):
    trainer = Trainer(tiny_config(tmp_path, **LORA, prefix_sharing="on"), loaded=loaded(tokenizer))
    assert trainer.prefix_sharing
    before = adapter_weights(trainer.model)
    trainer.train_step(0)
    after = adapter_weights(trainer.model)
    assert any(not torch.equal(before[n], after[n]) for n in after)


# ---- QLoRA on the CPU (bitsandbytes >= 0.45 runs NF4 there) ----------------------------------------------------------


def test_qlora_trains_on_the_cpu(tmp_path, tokenizer):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    model = tiny_causal_lm(tokenizer, token_bias=TOKEN_BIAS, hidden=64)  # bitsandbytes' CPU NF4: 64-wide blocks
    cfg = tiny_config(tmp_path, adapter="qlora", lora_rank=4, lora_alpha=8)
    trainer = Trainer(cfg, loaded=LoadedModel(model, tokenizer, torch.device("cpu"), torch.float32))
    quantized = [m for m in trainer.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantized and all(m.weight.dtype == torch.uint8 for m in quantized)  # packed NF4
    assert not isinstance(trainer.model.get_output_embeddings(), bnb.nn.Linear4bit)
    before = adapter_weights(trainer.model)
    trainer.train_step(0)
    after = adapter_weights(trainer.model)
    assert any(not torch.equal(before[n], after[n]) for n in after)
