"""The process group of a torchrun run and the collectives of Python objects the trainer uses; how a rank ends.

Everything rides on torch.distributed; nothing here is home-made but joining and leaving the default group.
"""

from __future__ import annotations

import contextlib
import os
import sys
from datetime import timedelta
from typing import NoReturn

COLLECTIVE_TIMEOUT = timedelta(minutes=30)  # a rank that never joins a collective fails the others after this
# whether this process joined the default process group itself (``join_process_group``): its gloo threads then live
# until the process ends (``exit_without_finalizing``)
_JOINED = {"group": False}


def environment_world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def join_process_group(backend: str) -> None:
    """Join the default process group (``backend``: nccl with CUDA, gloo on the CPU), unless this process already
    has; ``COLLECTIVE_TIMEOUT`` bounds every collective."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
        _JOINED["group"] = True


def joined_process_group() -> bool:
    """Whether this process joined a process group (``join_process_group``), destroyed since or not."""
    return _JOINED["group"]


def leave_process_group() -> None:
    """Destroy the default process group, if one is initialised (no barrier: on an error path the peers may be gone,
    and a barrier would wait for them until ``COLLECTIVE_TIMEOUT``)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def exit_status(exc: BaseException) -> int:
    """The exit status, and the message on stderr, that the interpreter gives an exception ending the program."""
    if isinstance(exc, SystemExit):
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        print(exc.code, file=sys.stderr)
        return 1
    sys.excepthook(type(exc), exc, exc.__traceback__)
    return 1


def exit_without_finalizing(code: int) -> NoReturn:
    """End this process with status ``code`` as the interpreter would (atexit handlers run, stdout and stderr
    flushed), but skipping the interpreter's finalization. Never returns.

    Why: a rank's gloo threads outlive ``destroy_process_group``, which joins them only when nothing else holds the
    group: under torch 2.13 an ``nn.Parameter`` of a DTensor (FSDP2's sharded parameters) is never freed and holds
    it, and so does DDP's wrapper (``model.route_hidden_states`` keeps it for the life of the process). The group's
    worker and transport threads then run on into the interpreter's finalization. A worker that drops the last
    work's tensors then needs the GIL; a thread asking for it during finalization is ended by ``pthread_exit``, whose
    unwinding through C++ code aborts the process: "terminate called without an active exception", SIGABRT, a
    successful rank reported as failed (seen under load; tests/distributed/test_distributed.py,
    ``test_torchrun_ranks_end_before_interpreter_finalization``).
    ``os._exit`` ends every thread at once, before any of that."""
    import atexit

    try:
        atexit._run_exitfuncs()  # what the interpreter runs first at exit: logging.shutdown, worker pools, ...
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)


def all_gather_objects(value) -> list:
    """``value`` of every rank, by rank (all-gather of Python objects). Collective."""
    import torch.distributed as dist

    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, value)
    return parts


def broadcast_from_main(value):
    """Rank 0's ``value`` on every rank (broadcast of a Python object). Collective."""
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
