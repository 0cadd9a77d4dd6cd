"""Each part of a step as a fraction of its floor (rlvr_fast/trainer/reporting/floor.py): the counts against numbers
worked out by hand, the model's matmul size against its config, and every step record carrying a fraction per part
that is a lower bound (never above 1)."""

from __future__ import annotations

import pytest
import torch
from helpers.runs import TOKEN_BIAS, tiny_config

from rlvr_fast.benchmark.ceilings import Ceilings
from rlvr_fast.testing import char_tokenizer, tiny_causal_lm
from rlvr_fast.trainer.loop import Trainer
from rlvr_fast.trainer.model import LoadedModel
from rlvr_fast.trainer.reporting.floor import (
    FLOOR_PARTS,
    OPTIMIZER_BYTES,
    ModelWork,
    StepWork,
    floor_record,
    optimizer_bytes,
    part_costs,
)
from rlvr_fast.trainer.update.optimizers import OPTIMIZERS

WORK = StepWork(
    prefill_positions=100,
    sampled_tokens=40,
    decode_steps=10,
    update_positions=120,
    update_rows=40,
    micro_batches=2,
    fixed_passes=1,
    optimizer_steps=2,
    recompute=True,
)
MODEL = ModelWork(body=1000, head=500, weight_bytes=4)


def test_part_costs_by_hand():
    costs = part_costs(WORK, MODEL)
    # generation: 140 decoder positions (prefill + sampled) x 2 x 1000, 40 head rows x 2 x 500; 11 passes of 6,000 B
    assert costs["generation"] == (2 * 1000 * 140 + 2 * 500 * 40, 11 * 1500 * 4)
    # one forward over 120 positions and 40 rows, once per fixed pass and per micro-batch for the bytes
    assert costs["fixed_logprobs"] == (2 * 1000 * 120 + 2 * 500 * 40, 2 * 1500 * 4)
    # 2 optimizer steps x (forward + backward 2x + recomputed forward) = 8 forwards
    assert costs["forward_backward"] == (8 * (2 * 1000 * 120 + 2 * 500 * 40), 8 * 2 * 1500 * 4)
    without = part_costs(StepWork(**{**WORK.__dict__, "recompute": False}), MODEL)
    assert without["forward_backward"][0] == 6 * (2 * 1000 * 120 + 2 * 500 * 40)


def test_the_floor_is_the_longer_of_compute_and_bytes():
    ceilings = Ceilings(copy_gbps=1.0, matmul_tflops=1e-3, matmul_dtype="float32")  # 1 GB/s, 1 GFLOP/s
    costs = {"generation": (2e9, 1e8), "fixed_logprobs": (1e8, 3e9), "forward_backward": (0.0, 0.0)}
    times = {"time_generation_s": 4.0, "time_fixed_logprobs_s": 6.0, "time_forward_backward_s": 0.0}
    out = floor_record(costs, 5e8, times, ceilings)
    assert out["floor_generation_s"] == pytest.approx(2.0) and out["floor_fraction_generation"] == pytest.approx(0.5)
    assert out["floor_fixed_logprobs_s"] == pytest.approx(3.0)  # bytes-bound
    assert out["floor_fraction_fixed_logprobs"] == pytest.approx(0.5)
    assert out["floor_fraction_forward_backward"] is None  # the part did not run
    assert out["floor_optimizer_s"] == pytest.approx(0.5) and out["floor_fraction_optimizer"] is None
    assert set(out) == {f"floor_{p}_s" for p in FLOOR_PARTS} | {f"floor_fraction_{p}" for p in FLOOR_PARTS}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_model_work_counts_the_linear_layers_from_the_config(arch):
    tokenizer = char_tokenizer()
    model = tiny_causal_lm(tokenizer, arch=arch, hidden=32, layers=3)
    c = model.config
    head_dim = c.hidden_size // c.num_attention_heads
    attention = c.hidden_size * head_dim * (2 * c.num_attention_heads + 2 * c.num_key_value_heads)  # q, o; k, v
    mlp = 3 * c.hidden_size * c.intermediate_size  # gate, up, down
    work = ModelWork.of(model)
    assert work.body == c.num_hidden_layers * (attention + mlp)
    assert work.head == c.vocab_size * c.hidden_size and work.weight_bytes == 4
    assert ModelWork.of(model, torch.bfloat16).weight_bytes == 2  # under autocast the matmuls read bf16 copies


def test_every_optimizer_has_a_byte_count():
    assert set(OPTIMIZER_BYTES) == set(OPTIMIZERS)


def test_optimizer_bytes_of_adamw():
    model = torch.nn.Linear(10, 3, bias=False)
    moved = optimizer_bytes("adamw", torch.optim.AdamW(model.parameters()), model, steps=2)
    assert moved == 2 * 30 * (3 * 4 + 2 * 8)  # grad read, weight read + write, two fp32 states read + write
    with pytest.raises(ValueError, match="no byte count for optimizer 'sgd'"):
        optimizer_bytes("sgd", torch.optim.SGD(model.parameters()), model, steps=1)


def test_every_step_record_gives_each_part_as_a_fraction_of_its_floor(tmp_path):
    tokenizer = char_tokenizer()
    model = tiny_causal_lm(tokenizer, token_bias=TOKEN_BIAS)
    cfg = tiny_config(tmp_path, steps=1, num_iterations=2, beta=0.1, rewards={"random": 1.0})
    trainer = Trainer(cfg, loaded=LoadedModel(model, tokenizer, torch.device("cpu"), torch.float32))
    record = trainer.train_step(0)
    for part in FLOOR_PARTS:
        fraction = record[f"floor_fraction_{part}"]
        assert record[f"floor_{part}_s"] > 0, (part, record)
        assert fraction is not None and 0 < fraction <= 1.0, (part, fraction)  # a floor is a lower bound
