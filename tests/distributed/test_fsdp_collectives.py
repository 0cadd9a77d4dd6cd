"""The bytes FSDP2 moves in a training step at world size 2 equal the count on paper (docs/design.md, "Data
parallelism"): generation gathers the whole model once, each micro-batch gathers every decoder layer at each of its
calls in the forward (two with the shared prefix: the prompts, then the completions) and again in the backward, the
update gathers the root (embeddings, final norm, LM head) once, and every parameter's gradient is reduce-scattered
once per micro-batch. Nothing else: a stray prefetch (FSDP2's default backward prefetch followed the no-grad forwards
of generation and gathered one whole layer per step that nothing used) fails here.

The counter and the count on paper are the ones benchmarks/bench_distributed.py reports."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from helpers.gloo_world import run_world

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_distributed.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_distributed", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def step_volume_on_rank(rank: int, world_size: int, folder: str) -> dict:
    import torch

    from rlvr_fast.testing import char_tokenizer, tiny_causal_lm
    from rlvr_fast.trainer.config import RLVRConfig
    from rlvr_fast.trainer.loop import Trainer
    from rlvr_fast.trainer.model import LoadedModel

    bench = _bench()
    tokenizer = char_tokenizer()
    cfg = RLVRConfig(task="arithmetic", train_size=16, eval_size=2, group_size=4, prompts_per_step=4,
                     max_prompt_length=64, max_completion_length=8, steps=3, progress=False, checkpoint_every=0,
                     grad_clip=1.0, parallel="fsdp", output_dir=f"{folder}/run", overwrite=True)  # fmt: skip
    model = tiny_causal_lm(tokenizer, hidden=32, layers=3)
    trainer = Trainer(cfg, loaded=LoadedModel(model, tokenizer, torch.device("cpu"), torch.float32))
    trainer.train_step(0)  # lazy initialisation gathers outside any step
    counts: dict = {}
    bench._count_collectives(counts)
    record = trainer.train_step(1)
    micro = record["micro_batches"]  # every rank's count, fillers included (equal on all ranks)
    return {"measured": counts, "paper": bench._paper_bytes(trainer, micro, "fsdp", world_size), "micro": micro}


def test_fsdp_step_moves_the_bytes_on_paper(tmp_path):
    results = run_world(step_volume_on_rank, world_size=2, args=(str(tmp_path),), timeout=240)
    for rank, out in enumerate(results):
        for collective, paper in out["paper"].items():
            assert out["measured"].get(collective) == paper, (rank, collective, out)
