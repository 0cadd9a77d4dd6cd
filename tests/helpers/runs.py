"""Tiny trainer runs (no download): the task files, the run config, the model in memory or saved, the CLI's exit."""

from __future__ import annotations

import json

import pytest
import torch

from rlvr_fast.cli import main
from rlvr_fast.testing import char_tokenizer, tiny_causal_lm
from rlvr_fast.trainer.config import RLVRConfig
from rlvr_fast.trainer.model import LoadedModel

# Digits likely and '5' likelier: the verifier's verdict (answer 5) is then right for a good share of completions, so
# groups are mixed and every estimator has something to learn from; EOS likely enough that completions end.
TOKEN_BIAS = {**{str(d): 3.0 for d in range(10)}, "5": 4.5, "<eos>": 1.5}


def write_task(path, n: int, split: str, incorrect_answer: str | None = "4") -> str:
    """``n`` JSONL problems "<split> <i>: a + b =" whose answer is 5, each with ``incorrect_answer`` (the wrong label
    the incorrect-label reward reads) unless it is None; returns the path."""
    with open(path, "w") as f:
        for i in range(n):
            a = i % 6
            row = {"prompt": f"{split} {i}: {a} + {5 - a} =", "answer": "5"}
            if incorrect_answer is not None:
                row["incorrect_answer"] = incorrect_answer
            f.write(json.dumps(row) + "\n")
    return str(path)


def tiny_config(tmp_path, **overrides) -> RLVRConfig:
    """A 2-step run of groups of 8 on 12 train / 4 eval problems written under ``tmp_path``, into tmp_path/run."""
    values = dict(
        task=write_task(tmp_path / "train.jsonl", 12, "train"),
        eval_file=write_task(tmp_path / "eval.jsonl", 4, "eval"),
        train_size=12,
        eval_size=4,
        group_size=8,
        prompts_per_step=2,
        max_prompt_length=32,
        max_completion_length=6,
        steps=2,
        eval_samples=2,
        lr=1e-2,
        grad_clip=None,
        checkpoint_every=0,
        progress=False,
        output_dir=str(tmp_path / "run"),
    )
    values.update(overrides)
    return RLVRConfig(**values)


def tiny_loaded() -> LoadedModel:
    """A tiny random Llama biased to TOKEN_BIAS with a character tokenizer, loaded on the CPU in float32."""
    tokenizer = char_tokenizer()
    return LoadedModel(tiny_causal_lm(tokenizer, token_bias=TOKEN_BIAS), tokenizer, torch.device("cpu"), torch.float32)


def saved_tiny_model(folder) -> str:
    """A tiny random Llama and its character tokenizer saved to folder/model (a path ``--model`` takes)."""
    tokenizer = char_tokenizer()
    path = str(folder / "model")
    tiny_causal_lm(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def main_exit(argv, capsys):
    """(exit status, stderr) of ``rlvr-fast <argv>`` that must exit through SystemExit."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    return info.value.code, capsys.readouterr().err
