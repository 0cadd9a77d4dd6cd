"""Keeping a step's peak memory low: activation checkpointing of the decoder layers during the loss, and (on the CPU)
handing freed tensor memory back to the operating system.

Activation checkpointing: the policy's forward keeps only each decoder layer's input and recomputes the layer in the
backward (one more forward: about a third more update FLOPs). On SmolLM2-135M a micro-batch of 8 completions of
~100 tokens saves ~0.9 GB of fp32 activations without it (30 layers x ~12k floats per token per layer), ~20 MB with it.
TRL's GRPOConfig turns it on by default too. Our default turns it on on a GPU only: on the CPU the step is compute
bound and RAM is plentiful (measured on SmolLM2-135M, 32 completions of 64 tokens, 2-core CPU: the update took 27 s
with it, 20 s without, peak RSS 2.9 GB vs 4.1 GB at 4 micro-batches).

Host memory (benchmarks/results/cpu-host-memory-settings-2026-12-03.json: the main job's default
step, 2 steps per setting, one thread, each in a fresh process). A CPU step allocates and frees a few GB of tensors,
some larger than 32 MiB (e.g. the (V, D) = 113 MB gradient of SmolLM2's tied embedding). How glibc's malloc serves
them trades page faults (system CPU time, "sys") against freed memory that stays resident (peak RSS):

- glibc's default raises its mmap threshold each time a large mmapped block is freed (to at most 32 MiB, also the most
  mallopt accepts) with a trim threshold of twice that: blocks over 32 MiB still get a fresh mapping, which the kernel
  zeroes page by page, and the heap's top is trimmed and regrown: sys 7.0% of user, 0.8 million faults per step,
  peak RSS 3.28 GiB.
- A fixed 128 KiB threshold (this module's first setting) unmaps every freed tensor over 128 KiB at once: the lowest
  peak RSS (2.97 GiB) but 5-6 million faults per step, sys 40% of user. A fixed 32 MiB threshold, with or without a
  per-step ``malloc_trim``, behaves as the default (sys 6%, 3.27 GiB).
- Transparent huge pages for glibc's blocks (``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``, settable at process start
  only, so out of a library's reach anyway) cut the faults 500-fold but not sys (7.7%): the kernel still zeroes, and
  compacts for, every fresh block.
- No mmapped blocks at all (``M_MMAP_MAX`` = 0) with a 512 MiB trim threshold: every tensor comes from the heap and a
  freed one is reused by the next allocation of its size. Alone: sys 2.2%, peak RSS 3.32 GiB (the heap keeps what a
  step fragmented). With ``malloc_trim(0)`` at the end of each step, where little is live, the free pages inside the
  heap go back to the OS and the next step faults in only what it touches: sys 3.0% of user (0.2-0.5 million faults
  per step), peak RSS 3.28 GiB. A second trim between the rollout and the update gained 0.03 GiB of peak (3.25 GiB).

The trainer takes the last (``return_freed_host_memory`` at construction on the CPU, ``release_free_host_memory`` at
the end of ``Trainer.train_step``). It meets the system-time half of the target, not the peak-RSS half: its peak is
glibc's default's, ~0.3 GiB (10%) above the 128 KiB threshold's, as a step's freed memory stays resident until the
step ends. The setting is process-wide: in a user's own code in the same process, large freed blocks stay resident
until the next trim (call ``release_free_host_memory`` to hand them back).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
MMAP_MAX = 0  # no mmapped chunks: every block from the heap, reused when freed (module doc)
TRIM_THRESHOLD_BYTES = 512 * 1024 * 1024  # free memory at the heap's top kept between trims


@functools.lru_cache(maxsize=1)
def glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (it has mallopt and malloc_trim) on Linux, else None."""
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt, libc.malloc_trim  # noqa: B018 - musl and other C libraries lack them
    except (OSError, AttributeError):
        return None
    return libc


def return_freed_host_memory() -> bool:
    """Serve every block from glibc's heap and keep up to ``TRIM_THRESHOLD_BYTES`` free at its top (module doc); True
    when applied (Linux with glibc), False elsewhere. Pair with ``release_free_host_memory`` once per step."""
    libc = glibc()
    if libc is None:
        return False
    ok_mmap = libc.mallopt(_M_MMAP_MAX, MMAP_MAX)
    ok_trim = libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    return bool(ok_mmap and ok_trim)


def release_free_host_memory() -> bool:
    """Hand the free pages of glibc's heaps back to the OS (``malloc_trim(0)``); True when some were released, False
    when none were or off glibc. Called by the trainer at the end of each step on the CPU (module doc)."""
    libc = glibc()
    return bool(libc is not None and libc.malloc_trim(0))


def _recomputed_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Turn on transformers' per-layer activation checkpointing (non-reentrant); raise ValueError naming the model when
    it has none."""
    if not getattr(model, "supports_gradient_checkpointing", False) or not _recomputed_layers(model):
        raise ValueError(
            f"RLVRConfig.gradient_checkpointing=True but {type(model).__name__} does not support activation "
            f"checkpointing; set gradient_checkpointing=False"
        )
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.x; older: the deprecated name
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:  # pragma: no cover - older transformers
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


@contextmanager
def activation_checkpointed_forward(model: torch.nn.Module) -> Iterator[None]:
    """Within the block, grad-enabled forwards of ``model`` checkpoint each decoder layer, when
    ``enable_activation_checkpointing`` turned it on (otherwise the block changes nothing).

    transformers checkpoints a layer only when the layer's own ``training`` flag is set, and our model stays in eval
    mode (the loss must see the function that sampled: no dropout). So only the layers' own flags are raised, not their
    children's: dropout modules inside stay in eval mode, and attention reads its dropout from its own (eval) flag.
    """
    layers = [layer for layer in _recomputed_layers(model) if layer.gradient_checkpointing]
    if not layers:
        yield
        return
    flags = [layer.training for layer in layers]
    for layer in layers:
        layer.training = True
    try:
        yield
    finally:
        for layer, flag in zip(layers, flags):
            layer.training = flag
