"""What the study test modules share: a tiny study's base settings, its plan over tiny JSONL tasks, and a model loader
of the tiny biased Llama, so that ``run_study`` trains in seconds."""

from __future__ import annotations

import os

import torch

from helpers.runs import TOKEN_BIAS, write_task
from rlvr_fast.study import plan_study
from rlvr_fast.testing import char_tokenizer, tiny_causal_lm
from rlvr_fast.trainer.model import LoadedModel

# Every run of a tiny study: 12 train problems, groups of 8 x 2 prompts, 6 new tokens, n=3 held-out samples.
TINY_STUDY_BASE = dict(
    train_size=12,
    group_size=8,
    prompts_per_step=2,
    max_prompt_length=32,
    max_completion_length=6,
    eval_samples=3,
    lr=1e-2,
    grad_clip=None,
    checkpoint_every=0,
    progress=False,
)


def tiny_loader(calls: list | None = None, token_bias: dict[str, float] | None = TOKEN_BIAS):
    """``run_study``'s model_loader: a fresh tiny Llama over the character tokenizer, biased to digits (the same
    weights for every run); appends each loaded ``cfg.model`` to ``calls`` when given."""

    def load(cfg):
        if calls is not None:
            calls.append(cfg.model)
        tok = char_tokenizer()
        return LoadedModel(tiny_causal_lm(tok, token_bias=token_bias), tok, torch.device("cpu"), torch.float32)

    return load


def tiny_study_plan(
    root: str,
    arms,
    *,
    steps: int = 2,
    seeds: int | None = None,
    arms_file: str | None = None,
    eval_problems: int = 4,
    output: str = "study",
    preset: str = "quick",
    **overrides,
):
    """The plan of ``preset`` with ``arms`` on tiny tasks written into ``root`` (train.jsonl: 12 problems,
    eval.jsonl: ``eval_problems``), ``TINY_STUDY_BASE`` updated by ``overrides``, into ``root/<output>``."""
    os.makedirs(root, exist_ok=True)
    values = {
        **TINY_STUDY_BASE,
        "eval_file": write_task(os.path.join(root, "eval.jsonl"), eval_problems, "eval"),
        "eval_size": eval_problems,
        **overrides,
    }
    return plan_study(
        preset,
        arms=None if arms is None else list(arms),
        arms_file=arms_file,
        task=write_task(os.path.join(root, "train.jsonl"), 12, "train"),
        steps=steps,
        seeds=seeds,
        overrides=values,
        output_dir=os.path.join(root, output),
    )
