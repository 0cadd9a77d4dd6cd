"""LoRA on settings the main tests (test_lora.py) do not combine: the reference log-probs inside a step with
num_iterations > 1 against a separately loaded base, activation checkpointing, and a checkpoint of an explicit target
list read back by PEFT itself."""

import json
import os

import pytest
import torch
from helpers.runs import TOKEN_BIAS, tiny_config, tiny_loaded

from rlvr_fast.testing import assert_close, char_tokenizer, tiny_causal_lm
from rlvr_fast.trainer.loop import Trainer
from rlvr_fast.trainer.update.loss import policy_step, sequence_logprobs

LORA = dict(adapter="lora", lora_rank=4, lora_alpha=8)


def lora_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_reference_logprobs_in_a_step_are_the_base_models_with_num_iterations_2(tmp_path, generator):
    """beta > 0 and two optimizer steps per rollout: the reference log-probs the update reads equal, bit for bit,
    those of the base loaded on its own, while the old policy's (the trained adapter on) differ."""
    cfg = tiny_config(tmp_path, **LORA, beta=0.1, num_iterations=2, group_size=4)
    trainer = Trainer(cfg, loaded=tiny_loaded())
    seen = []
    fixed = trainer.with_fixed_logprobs

    def capture(batch, plan):
        out = fixed(batch, plan)
        seen.append((out, plan))
        return out

    trainer.with_fixed_logprobs = capture
    with torch.no_grad():  # a trained adapter: the policy (and the old policy) differ from the base
        for n, p in trainer.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=generator)
    trainer.train_step(0)
    base = tiny_causal_lm(char_tokenizer(), token_bias=TOKEN_BIAS)  # what tiny_loaded builds, never adapted
    (batch, plan), mask = seen[0], seen[0][0].loss_mask > 0
    expected = sequence_logprobs(base, batch.rollout, trainer.cfg.temperature, plan, trainer.precision)
    assert mask.any() and torch.equal(batch.ref_logp[mask], expected[mask])
    assert not torch.allclose(batch.old_logp[mask], batch.ref_logp[mask])  # the adapters were on for the old policy


def test_activation_checkpointing_gives_the_same_adapter_gradients(tmp_path, generator):
    """gradient_checkpointing=True with LoRA (frozen embeddings, recomputed layers): the adapter's gradients on one
    batch equal those without recomputation."""
    grads, batch = [], None
    seed = int(torch.randint(0, 2**31, (1,), generator=generator))
    for on in (False, True):
        cfg = tiny_config(tmp_path, **LORA, beta=0.05, gradient_checkpointing=on, output_dir=str(tmp_path / f"gc{on}"))
        trainer = Trainer(cfg, loaded=tiny_loaded())
        assert trainer.recomputes is on
        with torch.no_grad():  # B = 0 would make every A-gradient 0: the same non-trivial adapter in both
            g = torch.Generator().manual_seed(seed)
            for n, p in trainer.model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05, generator=g)
        if batch is None:
            batch = trainer.prepare_step(trainer.problems_at(0), 0).batch
        planned, plan = trainer.plan_micro_batches(batch)
        planned = trainer.with_fixed_logprobs(planned, plan)
        trainer.model.zero_grad(set_to_none=True)
        policy_step(trainer.model, planned, trainer.cfg, plan, trainer.precision)
        grads.append({n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and all("lora_" in n for n in grads[0]) and grads[0]
    for n in grads[0]:
        assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-8, name=n)


def test_peft_reads_a_checkpoint_of_an_explicit_target_list_as_the_trained_policy(tmp_path):
    """lora_target_modules=' q_proj , down_proj' (spaces around the names) and a fractional alpha: the step folder's
    adapter_config.json names exactly those modules, and PeftModel.from_pretrained on a fresh base gives the trained
    policy's logits bit for bit."""
    from peft import PeftModel

    cfg = tiny_config(
        tmp_path,
        adapter="lora",
        lora_rank=3,
        lora_alpha=5.5,
        lora_target_modules=" q_proj , down_proj",
        steps=1,
        eval_size=1,
        eval_samples=1,
    )
    trainer = Trainer(cfg, loaded=tiny_loaded())
    trainer.train()
    step = os.path.join(cfg.output_dir, "checkpoints", "step-000001")
    with open(os.path.join(step, "adapter_config.json")) as f:
        saved = json.load(f)
    assert sorted(saved["target_modules"]) == ["down_proj", "q_proj"] and (saved["r"], saved["lora_alpha"]) == (3, 5.5)
    tokenizer = char_tokenizer()
    reread = PeftModel.from_pretrained(tiny_causal_lm(tokenizer, token_bias=TOKEN_BIAS), step)
    ids = torch.tensor([tokenizer("train 1: 1 + 4 = 5", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        got, trained = reread(input_ids=ids).logits, trainer.model(input_ids=ids).logits
        base = tiny_causal_lm(tokenizer, token_bias=TOKEN_BIAS)(input_ids=ids).logits
    assert torch.equal(got, trained) and not torch.equal(trained, base)


def test_a_model_adapted_by_an_earlier_trainer_is_refused_and_its_adapter_kept(tmp_path):
    """PEFT adapts the given model in place: a second Trainer on the same ``loaded`` (a notebook sweep) would silently
    re-create the adapter, discarding the first run's trained one. It is refused, naming the argument, and the first
    trainer's adapter is untouched."""
    loaded = tiny_loaded()
    first = Trainer(tiny_config(tmp_path, **LORA, output_dir=str(tmp_path / "first")), loaded=loaded)
    first.train_step(0)
    trained = lora_weights(first.model)
    with pytest.raises(ValueError, match=r"Trainer\(loaded=\.\.\.\).*already holds 14 LoRA layers.*expected a model"):
        Trainer(tiny_config(tmp_path, **{**LORA, "lora_rank": 2}, output_dir=str(tmp_path / "second")), loaded=loaded)
    kept = lora_weights(first.model)
    assert kept.keys() == trained.keys() and all(torch.equal(kept[n], trained[n]) for n in kept)
