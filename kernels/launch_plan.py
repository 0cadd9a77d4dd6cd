"""A Triton kernel launch as data: what a launcher runs, available without running it.

Every launcher in ``rlvr_fast.kernels`` builds a ``KernelLaunch`` (the ``@triton.jit`` function, its grid, its
runtime arguments, its constexprs, ``num_warps`` / ``num_stages``, or the autotuner whose configs it races) and calls
``launch()``. Inside ``record_launches()`` the call is recorded instead of run, so the ahead-of-time compile check
(``kernels/check/aot_compile.py``) calls the launchers themselves, on fake CUDA tensors, and compiles exactly what they
would launch: one source of truth for tile sizes, constexpr branches and autotune configs.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any

_RECORDER: contextvars.ContextVar[list[KernelLaunch] | None] = contextvars.ContextVar("kernel_launches", default=None)


@dataclasses.dataclass(frozen=True)
class KernelVariant:
    """One compilation a launch can trigger: all constexprs bound, the compile options fixed."""

    constexprs: dict[str, Any]
    num_warps: int | None  # None: Triton's default (4)
    num_stages: int | None  # None: the backend's default (3 on NVIDIA)
    config: str  # human-readable: the autotune config or "fixed"


@dataclasses.dataclass(frozen=True)
class KernelLaunch:
    """One launch of ``kernel`` over ``grid`` with ``args`` (positional, runtime) and ``constexprs`` (keywords).

    With ``autotuner`` (a ``triton.autotune`` wrapper of ``kernel``) the launch races the autotuner's configs, whose
    keywords complete ``constexprs``; otherwise ``num_warps`` / ``num_stages`` are the launch's compile options.
    """

    kernel: Any  # triton JITFunction
    grid: tuple[int, ...] | Callable[[dict], tuple[int, ...]]
    args: tuple
    constexprs: Mapping[str, Any]
    num_warps: int | None = None
    num_stages: int | None = None
    autotuner: Any = None

    @property
    def name(self) -> str:
        return self.kernel.__name__

    def variants(self) -> list[KernelVariant]:
        """Every (constexprs, num_warps, num_stages) this launch may compile: one, or one per autotune config."""
        if self.autotuner is None:
            return [KernelVariant(dict(self.constexprs), self.num_warps, self.num_stages, "fixed")]
        out = []
        for cfg in self.autotuner.configs:
            label = " ".join(f"{k}={v}" for k, v in cfg.kwargs.items())
            out.append(
                KernelVariant(
                    {**self.constexprs, **cfg.kwargs},
                    cfg.num_warps,
                    cfg.num_stages,
                    f"autotune {label} w{cfg.num_warps} s{cfg.num_stages}",
                )
            )
        return out

    def launch(self) -> None:
        recorded = _RECORDER.get()
        if recorded is not None:
            recorded.append(self)
            return
        if self.autotuner is not None:
            self.autotuner[self.grid](*self.args, **self.constexprs)
            return
        options = {}
        if self.num_warps is not None:
            options["num_warps"] = self.num_warps
        if self.num_stages is not None:
            options["num_stages"] = self.num_stages
        self.kernel[self.grid](*self.args, **self.constexprs, **options)


@contextlib.contextmanager
def record_launches() -> Iterator[list[KernelLaunch]]:
    """Within the block, ``KernelLaunch.launch()`` appends to the yielded list instead of launching."""
    recorded: list[KernelLaunch] = []
    token = _RECORDER.set(recorded)
    try:
        yield recorded
    finally:
        _RECORDER.reset(token)
