"""Trajectory processing under a world of two (gloo, CPU): every rank holds the same replay store (the step's
candidates all-gathered in rank order), and the lesson re-sampling and log-prob passes keep the ranks' collectives in
step (FSDP and DDP alike)."""

import os

import pytest
import torch
from helpers.gloo_world import run_world
from helpers.runs import tiny_config, tiny_loaded

from rlvr_fast.trainer.loop import Trainer


def steps_on_rank(rank, world_size, folder, parallel, mode):
    data = os.path.join(folder, f"rank{rank}")  # each rank writes its own copy of the task files
    os.makedirs(data, exist_ok=True)
    from pathlib import Path

    cfg = tiny_config(
        Path(data),
        trajectory_processing=mode,
        parallel=parallel,
        train_size=4,
        prompts_per_step=4,
        group_size=4,
        max_prompt_length=200,
        steps=3,
        rewards={"correct": 1.0},
        output_dir=os.path.join(folder, "run"),
    )
    trainer = Trainer(cfg, loaded=tiny_loaded())
    assert trainer.world.world_size == world_size
    records = [trainer.train_step(step) for step in range(3)]
    traj = [{k: v for k, v in r.items() if k.startswith("traj_")} for r in records]
    return {"state": trainer.trajectories.state_dict(), "traj": traj}


@pytest.mark.parametrize("parallel,mode", [("ddp", "both"), ("fsdp", "uniform")])
def test_every_rank_holds_the_same_store(tmp_path, parallel, mode):
    got = run_world(steps_on_rank, world_size=2, args=(str(tmp_path), parallel, mode), timeout=600)
    assert got[0]["state"] == got[1]["state"]
    assert sum(len(v) for v in got[0]["state"]["store"]["entries"].values()) > 0
    assert got[0]["traj"] == got[1]["traj"]  # the step's decisions and their metrics are the whole step's
    assert sum(t["traj_groups_processed"] for t in got[0]["traj"]) > 0
    assert torch.distributed.is_available()
