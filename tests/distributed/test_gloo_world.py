"""The multi-process harness of the data-parallel tests (tests/helpers/gloo_world.py): results by rank, a failing rank
named, a hung world stopped in bounded time."""

import time

import pytest
import torch
import torch.distributed as dist
from helpers.gloo_world import run_world


def all_reduce_rank(rank, world_size):
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return {"rank": rank, "sum": t}


def rank_one_raises(rank, world_size):
    if rank == 1:
        raise ValueError("planted failure on rank 1")
    dist.barrier()  # rank 0 waits on a collective that rank 1 never joins


def rank_one_hangs(rank, world_size):
    if rank == 1:
        time.sleep(600)
    return rank


def test_results_by_rank():
    out = run_world(all_reduce_rank, world_size=2, timeout=120)
    assert [o["rank"] for o in out] == [0, 1]
    assert all(float(o["sum"]) == 3.0 for o in out)


def test_failing_rank_named_in_bounded_time():
    start = time.monotonic()
    with pytest.raises(AssertionError, match=r"rank 1 of 2 raised:(.|\n)*planted failure on rank 1"):
        run_world(rank_one_raises, world_size=2, timeout=120)
    assert time.monotonic() - start < 60


def test_hung_world_times_out():
    # rank 1 never returns; rank 0 may not have returned either when the machine is busy (spawning takes seconds)
    with pytest.raises(TimeoutError, match=r"ranks \[(0, )?1\] still running after 30 s"):
        run_world(rank_one_hangs, world_size=2, timeout=30)
