"""LoRA under data parallelism (2 gloo processes): DDP keeps the adapters identical on every rank, with the shared
prefix and the disabled-adapter reference model (beta > 0); FSDP2 with an adapter is refused by name before loading."""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers.gloo_world import run_world
from helpers.world_cases import case_config

from rlvr_fast.testing import char_tokenizer, tiny_causal_lm
from rlvr_fast.trainer.adapters import check_adapter_runtime
from rlvr_fast.trainer.loop import Trainer
from rlvr_fast.trainer.model import LoadedModel
from rlvr_fast.trainer.schema import ConfigFieldError

LORA = {"adapter": "lora", "lora_rank": 4, "lora_alpha": 8, "beta": 0.1, "prefix_sharing": "on"}


def lora_steps_on_rank(rank, world_size, folder):
    tokenizer = char_tokenizer()
    data = os.path.join(folder, f"rank{rank}")
    os.makedirs(data, exist_ok=True)
    cfg = case_config(data, "ddp", "dapo", "adamw", LORA)
    cfg.output_dir = os.path.join(folder, "run")
    model = tiny_causal_lm(tokenizer, token_bias={"5": 3.0, "<eos>": 1.5})
    base = {n: t.detach().clone() for n, t in model.state_dict().items()}
    trainer = Trainer(cfg, loaded=LoadedModel(model, tokenizer, torch.device("cpu"), torch.float32))
    assert trainer.world.mode == "ddp" and trainer.ref_model is trainer.model
    start = {n: t.detach().clone() for n, t in trainer.model.state_dict().items() if "lora_" in n}
    for step in range(2):
        trainer.train_step(step)
    trainer._save_checkpoint(2, {})  # the torchrun (DCP) checkpoint, with the adapter in PEFT's format too
    state = trainer.model.state_dict()
    return {
        "adapter": {n: t.detach().clone() for n, t in state.items() if "lora_" in n},
        "start": start,
        "base_unchanged": all(torch.equal(state[n], t) for n, t in base.items() if n in state),
    }


def test_ddp_lora_adapters_identical_on_both_ranks(tmp_path):
    rank0, rank1 = run_world(lora_steps_on_rank, world_size=2, args=(str(tmp_path),), timeout=300)
    assert rank0["adapter"].keys() == rank1["adapter"].keys() and rank0["adapter"]
    for name, tensor in rank0["adapter"].items():
        assert torch.equal(tensor, rank1["adapter"][name]), name
    assert any(not torch.equal(t, rank0["start"][n]) for n, t in rank0["adapter"].items())  # it trained
    assert rank0["base_unchanged"] and rank1["base_unchanged"]
    # the checkpoint loads with PEFT alone, onto a fresh base: the adapter it holds is the ranks' adapter
    from peft import PeftModel

    step = os.path.join(str(tmp_path), "run", "checkpoints", "step-000002")
    with open(os.path.join(step, "manifest.json")) as f:
        manifest = json.load(f)
    assert manifest["format"] == "dcp"
    assert {"adapter_model.safetensors", "adapter_config.json"} <= set(manifest["files"])
    loaded = PeftModel.from_pretrained(tiny_causal_lm(char_tokenizer(), token_bias={"5": 3.0, "<eos>": 1.5}), step)
    state = loaded.base_model.model.state_dict()
    for name, tensor in rank0["adapter"].items():
        assert torch.equal(state[name], tensor), name


def test_fsdp_with_an_adapter_is_refused_by_name_under_torchrun(tmp_path):
    cfg = case_config(str(tmp_path), "fsdp", "dapo", "adamw", {"adapter": "lora"})
    with pytest.raises(ConfigFieldError, match="FSDP2") as info:
        check_adapter_runtime(cfg, world_size=2)
    assert info.value.field == "parallel"
    check_adapter_runtime(cfg, world_size=1)  # one process: parallel is unused
