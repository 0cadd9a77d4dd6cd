"""The patched GRPOTrainer under accelerate's FSDP2, 2 gloo processes on the CPU.

The same parity as tests/integrations/test_trl_integration.py, inside one 2-process world: on each rank TRL's stock
GRPOTrainer and the patched one train from the same seed with FSDP2 (``fsdp_config={"fsdp_version": 2}``: accelerate's
``fsdp2_prepare_model`` applies ``fully_shard`` to each LlamaDecoderLayer and to the root, whose parameters include the
tied embedding / LM head), the patched run replaying the stock run's rollouts; the loss of every micro-batch and the
full gradient of every parameter before every optimizer step (the reduce-scattered shards, gathered) must agree.

What was run, precisely: accelerate 1.16 turns FSDP on only for accelerator devices (``AcceleratorState`` selects
``DistributedType.FSDP`` for MULTI_GPU / NPU / XPU / ..., never MULTI_CPU; on a CPU it silently trains with DDP). So,
after transformers builds its ``Accelerator``, ``force_fsdp2_on_cpu`` sets the state's distributed type to FSDP with
the ``FullyShardedDataParallelPlugin`` built from the same ``fsdp_plugin_args`` transformers derived from the config;
from there everything is accelerate's, TRL's and torch's own code: ``fsdp2_prepare_model`` (``fully_shard``), the
reference model's ``prepare_fsdp``, FSDP2's all-gathers and reduce-scatters over gloo. The test checks the model was
really sharded (DTensor parameters and gradients).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("trl")

from helpers.gloo_world import run_world
from helpers.trl_parity import (
    PROMPTS,
    STOP_TOKENS,
    Recorder,
    grpo_config,
    record_or_replay_generation,
    reward_funcs,
)

from rlvr_fast.integrations.trl import UnsupportedTRLSetting
from rlvr_fast.integrations.trl import trainer as rf_trl
from rlvr_fast.testing import assert_close, char_tokenizer, tiny_causal_lm

WORLD = 2
# beta > 0 (a reference model, FSDP2-sharded too, scored through our head), num_iterations 2 (old log-probs through
# our head, ratios != 1), gradient accumulation (TRL's normalisers per micro-batch), dapo (the global token count).
CASE = dict(
    loss_type="dapo",
    beta=0.1,
    use_bias_correction_kl=False,
    num_iterations=2,
    gradient_accumulation_steps=2,
    per_device_train_batch_size=2,
    max_steps=2,
)
FSDP2 = dict(
    fsdp="full_shard",
    fsdp_config={"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]},
)
GRAD_RTOL = 2e-5
LOSS_ATOL = 2e-6


def force_fsdp2_on_cpu() -> None:
    """Let accelerate's FSDP path run on CPU processes (module doc: accelerate selects FSDP only on accelerators)."""
    from accelerate import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    from transformers import Trainer

    built = Trainer.create_accelerator_and_postprocess

    def create_accelerator_and_postprocess(self):
        built(self)
        if self.args.fsdp_plugin_args is not None and not self.is_fsdp_enabled:
            state = self.accelerator.state
            state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
            # AcceleratorState() copies PartialState's shared state into itself whenever it is built again: set both
            for shared in (state, PartialState()):
                shared.distributed_type = DistributedType.FSDP
            self.is_fsdp_enabled = True

    Trainer.create_accelerator_and_postprocess = create_accelerator_and_postprocess


class GatheringRecorder(Recorder):
    """Recorder whose gradients are the FSDP2 shards gathered to full tensors (every rank gathers, in step)."""

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        grads, kinds = {}, set()
        for name, p in model.named_parameters():
            if p.grad is not None:
                kinds.add(type(p.grad).__name__)
                grads[name] = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad.detach().clone()
        assert kinds == {"DTensor"}, f"the gradients are {kinds}, not FSDP2's sharded DTensors"
        self.grads.append(grads)


def train_on_rank(trainer_cls, model_dir, args, rollouts, **options):
    from datasets import Dataset

    rec = GatheringRecorder()
    trainer = trainer_cls(
        model=model_dir,
        reward_funcs=reward_funcs(),
        args=args,
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        processing_class=char_tokenizer(),
        callbacks=[rec],
        **options,
    )
    assert trainer.is_fsdp_enabled and trainer.accelerator.is_fsdp2
    rec.attach(trainer)
    recorded = record_or_replay_generation(trainer, rollouts)
    trainer.train()
    head = trainer.model.get_output_embeddings().weight
    assert type(head).__name__ == "DTensor", "the LM head is not sharded after training"
    with pytest.raises(UnsupportedTRLSetting, match="still sharded"):  # outside the forward: refused, not misread
        rf_trl._head_params(trainer.model)
    return rec, recorded, trainer.state.log_history


def stock_and_patched_on_rank(rank, world, model_dir, workdir, seed):
    from trl import GRPOTrainer

    from rlvr_fast.integrations.trl import RLVRFastGRPOTrainer

    torch.set_num_threads(1)
    force_fsdp2_on_cpu()
    args = grpo_config(workdir, seed, **CASE, **FSDP2)
    stock, rollouts, stock_log = train_on_rank(GRPOTrainer, model_dir, args, None)
    out = {"stock": (stock.grads, stock.losses, stock_log)}
    for implementation in ("fused", "composed"):
        patched, _, log = train_on_rank(
            RLVRFastGRPOTrainer, model_dir, args, list(rollouts), backend="torch", implementation=implementation
        )
        out[implementation] = (patched.grads, patched.losses, log)
    return out


def test_patched_matches_stock_under_accelerate_fsdp2(tmp_path, seeded):
    tokenizer = char_tokenizer()
    model = tiny_causal_lm(tokenizer, hidden=32, layers=2, seed=1234)  # tied embedding / LM head
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids(STOP_TOKENS)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model_dir = tmp_path / "tiny_llama"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)

    ranks = run_world(
        stock_and_patched_on_rank, world_size=WORLD, args=(str(model_dir), tmp_path, seeded % 10_000), timeout=600
    )
    for rank, out in enumerate(ranks):
        stock_grads, stock_losses, stock_log = out["stock"]
        assert len(stock_grads) == CASE["max_steps"] and len(stock_losses) > 0
        for implementation in ("fused", "composed"):
            grads, losses, log = out[implementation]
            assert len(grads) == len(stock_grads) and len(losses) == len(stock_losses)
            for step, (g_stock, g_ours) in enumerate(zip(stock_grads, grads)):
                assert g_stock.keys() == g_ours.keys()
                assert float(g_stock["model.embed_tokens.weight"].norm()) > 0  # the tied head's gradient is there
                for name, g in g_stock.items():
                    where = f"rank {rank} {implementation} step {step} grad {name}"
                    assert_close(g_ours[name], g, rtol=GRAD_RTOL, name=where)
            for i, (l_stock, l_ours) in enumerate(zip(stock_losses, losses)):
                assert abs(float(l_ours) - float(l_stock)) <= LOSS_ATOL + 1e-4 * abs(float(l_stock)), (
                    f"rank {rank} {implementation} micro-batch {i}: loss {float(l_ours)!r} vs stock {float(l_stock)!r}"
                )
            for step, (a, b) in enumerate(zip(stock_log, log)):
                if "kl" in a:
                    assert abs(b["kl"] - a["kl"]) <= 1e-4 * max(abs(a["kl"]), 1e-3), (rank, implementation, step)
    # The two ranks trained one model: their gathered gradients agree.
    for step, (g0, g1) in enumerate(zip(ranks[0]["fused"][0], ranks[1]["fused"][0])):
        for name, g in g0.items():
            assert torch.equal(g, g1[name]), f"step {step} {name}: the ranks' full gradients differ"


def test_fsdp1_is_refused():
    """FSDP1 (flat parameters) is not what the head was tested with: refused by name, FSDP2 accepted."""
    from types import SimpleNamespace

    def trainer(version):
        plugin = SimpleNamespace(fsdp_version=version)
        return SimpleNamespace(
            is_fsdp_enabled=True, accelerator=SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin))
        )

    with pytest.raises(UnsupportedTRLSetting, match="fsdp_version=1"):
        rf_trl._refuse_sharded_head(trainer(1))
    rf_trl._refuse_sharded_head(trainer(2))
