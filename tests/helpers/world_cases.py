"""One training step of a data-parallel case (tests/distributed): its config, model and global rollout, and the
part of a step record that a world of two must reproduce."""

from __future__ import annotations

import os

import torch

from helpers.runs import TOKEN_BIAS, write_task
from rlvr_fast.testing import tiny_causal_lm
from rlvr_fast.trainer.config import RLVRConfig
from rlvr_fast.trainer.loop import Trainer
from rlvr_fast.trainer.model import LoadedModel
from rlvr_fast.trainer.reporting.log import reproducible_fields
from rlvr_fast.trainer.rollout.engines import Rollout

# besides the measured fields (reproducible_fields): what differs between a world of N processes and one
TIMING_KEYS = {"generation_seconds", "world_size", "parallel"}
# how the update was cut into micro-batches: the one-process reference runs unshared (its token budget packs other
# micro-batches than the world's shared ones), and the world pads its ranks to the same count with filler micro-batches
PLAN_KEYS = {"micro_batches", "decoder_tokens", "decoder_tokens_unshared", "padding_fraction"}


def compared(record: dict) -> dict:
    """A step record without its timings (``time_*_s`` too), world and micro-batch plan."""
    return {k: v for k, v in reproducible_fields(record).items() if k not in TIMING_KEYS | PLAN_KEYS}


def case_config(folder: str, parallel: str, loss_type: str, optimizer: str, extra: dict) -> RLVRConfig:
    values = dict(
        task=write_task(os.path.join(folder, "train.jsonl"), 8, "train", incorrect_answer=None),
        eval_file=write_task(os.path.join(folder, "eval.jsonl"), 40, "eval", incorrect_answer=None),
        train_size=8,
        eval_size=40,
        group_size=4,
        prompts_per_step=4,
        max_prompt_length=32,
        max_completion_length=6,
        steps=1,
        eval_samples=2,
        lr=1e-2,
        grad_clip=None,
        micro_batch_tokens=48,  # several micro-batches by token budget, their counts differing between the ranks
        checkpoint_every=0,
        progress=False,
        rewards={"correct": 1.0, "random": 0.5},  # mixed groups: few zero advantages
        output_dir=os.path.join(folder, "run"),
        parallel=parallel,
        loss_type=loss_type,
        optimizer=optimizer,
    )
    values.update({k: v for k, v in extra.items() if k != "rank1_truncated"})
    return RLVRConfig(**values)


def case_model(tokenizer, tied: bool):
    return tiny_causal_lm(tokenizer, token_bias=None if tied else TOKEN_BIAS)


def global_rollout(cfg: RLVRConfig, tokenizer, tied: bool) -> Rollout:
    """The step-0 rollout of the whole step, sampled on one process."""
    trainer = Trainer(
        cfg, loaded=LoadedModel(case_model(tokenizer, tied), tokenizer, torch.device("cpu"), torch.float32)
    )
    return trainer.rollout(trainer.problems_at(0), 0)
