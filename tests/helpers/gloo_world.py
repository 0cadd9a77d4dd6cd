"""Run a function on N CPU processes joined in one gloo process group, so the data-parallel code (DDP, FSDP2,
torch.distributed.checkpoint) is tested on a machine without GPUs.

    from helpers.gloo_world import run_world
    results = run_world(step_on_rank, world_size=2, args=(config,), timeout=180)

``fn(rank, world_size, *args)`` must be importable by name (a module-level function of a test module): the processes
are spawned, not forked. Each process sees the environment torchrun would give it (RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and joins the default process group (gloo) before ``fn`` runs; the group
is destroyed after, and the process ends without the interpreter's finalization (``exit_without_finalizing``).
Returns ``fn``'s return values by rank (anything ``torch.save`` can hold).

A rank that raises fails the call with that rank's number and traceback, and the other ranks are killed (they may be
waiting on a collective the failed rank never joins); a world that does not finish within ``timeout`` seconds is killed
and the call fails naming the ranks still running.
"""

from __future__ import annotations

import io
import os
import queue
import socket
import time
import traceback

import torch
import torch.multiprocessing as mp

from rlvr_fast.trainer.parallel.collectives import exit_without_finalizing


def free_port() -> int:
    """A TCP port free on this machine now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_environment(rank: int, world_size: int, port: int) -> dict[str, str]:
    return {
        "RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_RANK": str(rank),
        "LOCAL_WORLD_SIZE": str(world_size),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }


def _rank_main(rank: int, world_size: int, port: int, fn, args: tuple, results) -> None:
    import torch.distributed as dist

    os.environ.update(torchrun_environment(rank, world_size, port))
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        value = fn(rank, world_size, *args)
        buffer = io.BytesIO()
        torch.save(value, buffer)  # bytes, not shared-memory tensors: the rank may exit before the parent reads
        results.put((rank, "ok", buffer.getvalue()))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    # the result into the pipe, then end before the interpreter's finalization, where the group's gloo threads (alive
    # past destroy_process_group) can abort the process (rlvr_fast.trainer.parallel.collectives.exit_without_finalizing)
    results.close()
    results.join_thread()
    exit_without_finalizing(0)


def run_world(fn, world_size: int = 2, args: tuple = (), timeout: float = 180.0) -> list:
    """``fn(rank, world_size, *args)`` on ``world_size`` gloo processes; their return values by rank (module doc)."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world_size, port, fn, args, results)) for r in range(world_size)]
    for p in procs:
        p.start()
    values: dict[int, object] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(values) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                running = [r for r in range(world_size) if r not in values]
                raise TimeoutError(f"run_world({fn.__name__}): ranks {running} still running after {timeout:.0f} s")
            try:
                rank, status, payload = results.get(timeout=min(left, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if r not in values and p.exitcode not in (None, 0)]
                if dead:
                    raise AssertionError(
                        f"run_world({fn.__name__}): rank {dead[0]} died with exit code {procs[dead[0]].exitcode}"
                    ) from None
                continue
            if status == "error":
                raise AssertionError(f"run_world({fn.__name__}): rank {rank} of {world_size} raised:\n{payload}")
            values[rank] = torch.load(io.BytesIO(payload), weights_only=False)
    finally:
        for p in procs:
            p.join(timeout=10 if len(values) == world_size else 0.1)
            if p.is_alive():
                p.kill()
                p.join()
    return [values[r] for r in range(world_size)]
