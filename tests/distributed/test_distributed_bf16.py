"""bfloat16 training at world size 2 (mixed precision where the dtype asks for it): one step under FSDP2
(bf16 parameters and computation, gradients reduce-scattered in float32) and under DDP equals the one-process bf16 step
on the same global rollout, within what bf16 allows.

What bf16 allows: the ranks' forward and backward see other micro-batches than one process (and FSDP reduces in
float32 where one process accumulates bf16 gradients), so gradients differ by bf16 rounding. Adam's first step moves
every weight by about lr * sign(grad): a rounding difference moves a weight only where its gradient is near zero
(sign flips: at most 2 lr) or where the update lands on a bf16 rounding tie (one ulp). Both are rare; a gradient that
reached no rank's optimizer moves whole tensors and fails the fraction check; one counted twice fails the gradient
norm."""

from __future__ import annotations

import os

import torch
from helpers.gloo_world import run_world
from helpers.world_cases import case_config, case_model, compared, global_rollout

from rlvr_fast.testing import char_tokenizer
from rlvr_fast.trainer.loop import Trainer
from rlvr_fast.trainer.model import LoadedModel

CASES = [("fsdp", "dapo"), ("ddp", "grpo")]
LR = 1e-2


def bf16_step(cfg, tokenizer, rollout, world_size: int, rank: int) -> dict:
    model = case_model(tokenizer, tied=True).to(torch.bfloat16)
    trainer = Trainer(cfg, loaded=LoadedModel(model, tokenizer, torch.device("cpu"), torch.bfloat16))
    share = len(rollout.texts) // world_size
    mine = rollout.select(torch.arange(rank * share, (rank + 1) * share))
    trainer.rollout = lambda problems, step: mine
    record = trainer.train_step(0)
    weights = {k: v.detach().clone() for k, v in trainer.policy.full_state_dict().items()}
    return {"record": compared(record), "weights": weights}


def bf16_steps_on_rank(rank: int, world_size: int, folder: str, rollouts: list) -> list:
    tokenizer = char_tokenizer()
    out = []
    for i, (parallel, loss_type) in enumerate(CASES):
        data = os.path.join(folder, f"case{i}", f"rank{rank}")
        os.makedirs(data, exist_ok=True)
        cfg = case_config(data, parallel, loss_type, "adamw", {"dtype": "bfloat16", "lr": LR})
        cfg.output_dir = os.path.join(folder, f"case{i}", "run2")
        out.append(bf16_step(cfg, tokenizer, rollouts[i], world_size, rank))
    return out


def test_bf16_world_of_two_steps_like_one_process(tmp_path):
    tokenizer = char_tokenizer()
    rollouts, expected = [], []
    for i, (parallel, loss_type) in enumerate(CASES):
        folder = tmp_path / f"case{i}"
        folder.mkdir()
        cfg = case_config(str(folder), parallel, loss_type, "adamw", {"dtype": "bfloat16", "lr": LR})
        rollouts.append(global_rollout(cfg, tokenizer, True))
        expected.append(bf16_step(cfg, tokenizer, rollouts[-1], 1, 0))
    got = run_world(bf16_steps_on_rank, world_size=2, args=(str(tmp_path), rollouts), timeout=300)
    for i, case in enumerate(CASES):
        one, two = expected[i], got[0][i]
        assert one["record"]["completions_updated"] > 0, case
        for key in ("reward_mean", "advantage_abs_mean", "completions_updated", "completion_tokens"):
            assert two["record"][key] == one["record"][key], (case, key)  # scoring is exact, in any dtype
        # the gradient's scale (Adam's first step is blind to it): a sum over ranks instead of a mean doubles it
        for key in ("grad_norm", "mean_entropy", "tokens_updated"):
            a, b = one["record"][key], two["record"][key]
            assert abs(b - a) <= 2e-2 * abs(a), (case, key, a, b)
        moved = 0
        for name, w1 in one["weights"].items():
            w2 = two["weights"][name]
            assert w2.dtype == w1.dtype == torch.bfloat16, name
            assert torch.equal(got[1][i]["weights"][name], w2), name  # rank 1 holds the same model
            a, b = w1.float(), w2.float()
            ulp = torch.finfo(torch.bfloat16).eps * torch.maximum(a.abs(), b.abs())
            gap = (a - b).abs()
            assert float((gap - ulp - 2 * LR).max()) <= 0, (case, name, float(gap.max()))
            moved += int((gap > ulp).sum())
        total = sum(w.numel() for w in one["weights"].values())
        assert moved <= 0.01 * total, (case, moved, total)
