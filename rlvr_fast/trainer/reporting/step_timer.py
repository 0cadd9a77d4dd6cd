"""Where a training step's seconds go: wall time per part of the step, for metrics.jsonl and the progress
bar.

Parts (``STEP_PARTS``): generation (the rollout), scoring (rewards, advantages, difficulty filter, update batch),
fixed_logprobs (the old-policy and reference log-prob passes), forward_backward (the loss's forward and backward over
every micro-batch, every iteration), optimizer (gradient clipping and the optimizer step), weight_sync (pushing the
new weights into a rollout engine that holds its own copy, vLLM, and its sleep mode's release of its memory before the
update; 0 for the native engine); ``other`` is the rest of the step (micro-batch planning, the schedule step, the
finiteness checks, bookkeeping), so that the parts sum to the step's ``seconds``. On a GPU each part ends with a
synchronize, so queued kernels are charged to the part that launched them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

STEP_PARTS = ("generation", "scoring", "fixed_logprobs", "forward_backward", "optimizer", "weight_sync")


def part_key(part: str) -> str:
    """The metrics.jsonl field of a part: ``time_<part>_s``."""
    return f"time_{part}_s"


class StepTimer:
    """Seconds since construction, split into ``STEP_PARTS`` (timed with ``part``) and the rest."""

    def __init__(self, device: torch.device | None = None):
        self._sync = device is not None and device.type == "cuda"
        self._start = time.perf_counter()
        self._seconds = dict.fromkeys(STEP_PARTS, 0.0)
        self._open: list[str] = []  # the parts being timed, innermost last
        self._since = self._start  # when the innermost open part last started charging

    def _now(self) -> float:
        if self._sync:
            torch.cuda.synchronize()
        return time.perf_counter()

    @contextmanager
    def part(self, name: str) -> Iterator[None]:
        """Charge the block's wall time to part ``name`` (several blocks of one part add up). Parts nest: a part
        opened inside another (e.g. the generation of trajectory processing's lessons, inside scoring) is charged to
        itself only, the outer part pausing meanwhile, so that every second is counted once."""
        if name not in self._seconds:
            raise ValueError(f"StepTimer.part: name must be one of {STEP_PARTS}, got {name!r}")
        self._switch(name)
        try:
            with torch.profiler.record_function(f"step:{name}"):  # the part's label in a profile (a no-op otherwise)
                yield
        finally:
            self._switch(None)

    def _switch(self, opening: str | None) -> None:
        """Charge the innermost open part up to now, then open ``opening`` (None: close the innermost)."""
        now = self._now()
        if self._open:
            self._seconds[self._open[-1]] += now - self._since
        if opening is None:
            self._open.pop()
        else:
            self._open.append(opening)
        self._since = now

    def record(self) -> dict[str, float]:
        """``seconds`` (since construction) and ``time_<part>_s`` for each part and for ``other``; they sum to
        ``seconds``."""
        total = self._now() - self._start
        out = {"seconds": total, **{part_key(k): v for k, v in self._seconds.items()}}
        out[part_key("other")] = total - sum(self._seconds.values())
        return out
