"""Ahead-of-time compile check of every Triton kernel the package launches, for sm_80 and sm_90, without a GPU.

What it does:

1. **Enumerate** the launches: the launchers of ``rlvr_fast.kernels`` are called on fake CUDA tensors (torch's
   ``FakeTensorMode``: shapes, dtypes and strides, no memory, no device) inside ``record_launches()``, so each returns
   the ``KernelLaunch`` it would run (kernel, grid, arguments, constexprs, num_warps / num_stages or the autotuner whose
   configs it races). Tile sizes, autotune configs and constexpr branches therefore come from the launchers themselves.
   The scenarios cover representative shapes (hidden size D in {576, 896, 4096}, vocabulary V in {49152, 151936,
   262144}, groups of 2-64 completions, few and many tokens), every input dtype (fp16 / bf16 / fp32 / fp64), every
   autotune config, and every value of every constexpr switch (loss type, KL estimator, IS level, estimator, sample
   mode, bias / entropy / reference on and off, ...). The switches are covered one at a time from a base case (all
   heavy options on) -- the full Cartesian product of a dozen booleans is thousands of compiles -- while tile
   configs x dtypes, which decide registers and shared memory, are crossed in full.
2. **Bind** each launch exactly as ``JITFunction.run`` does (Triton's own binder: argument types, the ``== 1`` and
   divisibility-by-16 specialisations of integers and pointers; a tensor's address is taken as its byte offset from a
   512-byte-aligned allocation, as the CUDA caching allocator gives), and drop duplicates.
3. **Compile** each unique (kernel, signature, constexprs, options) for ``GPUTarget("cuda", 80 | 90, 32)`` with
   ``triton.compile`` (Triton's bundled ptxas), in at most 2 worker processes, and read the registers, spill stores /
   loads and the stack from ptxas' report, the dynamic shared memory from Triton's metadata and the static shared
   memory, registers and local memory from ``cuobjdump --dump-resource-usage`` (bundled with Triton).
4. **Fail** on a compile error, on shared memory (dynamic + static) above the target's per-block opt-in limit
   (sm_80: 166912 B, sm_90: 232448 B), or on spills above ``SPILL_LIMIT_BYTES`` (64 bytes: see below). Print a
   table and write ``benchmarks/results/triton-aot-sm80-sm90.json``.

Spill threshold: 64 bytes per thread (spill stores + spill loads, as ptxas reports them). A spilled register lives
in local memory: a few loop-invariant values (ptxas spilled 8 + 4 bytes in several matmul configs) stay in L1 (64 B x
256 threads = 16 KiB) and are touched a few times per program, which costs nothing measurable next to a tile's loads;
a working set that does not fit registers spills hundreds of bytes to kilobytes (the 128 x 256 matmul tile spilled
156-268 B, the 8192-element combine tile 11-20 KB) and pays a memory round trip inside the loop. The threshold
separates the two; the CUDA kernels (``csrc/check/compile_check.sh``) are held to zero because they have no
autotuned alternatives to pick from.

Cache: a compile result is keyed by the SHA-256 of (``source_hash``: the kernel's source, the sources of the
``@triton.jit`` functions it calls and the globals it reads -- Triton's ``cache_key`` without line numbers --; the bound
signature, constexprs, specialisation attributes, compile options, target, Triton version). Results whose key is
found in the committed JSON are reused instead of recompiled (``--no-cache`` recompiles everything). So CI on a fresh
clone compiles only what changed since the JSON was committed -- new launch configurations, edited kernels -- and a
cold run (``--no-cache``, or a new Triton version) compiles all of it (see docs/kernels.md: it takes far longer
than CI's 5 minutes on 2 cores).

Usage: python kernels/check/aot_compile.py [--no-cache] [--jobs 2] [--targets 80,90] [--out PATH] [--kernels RE]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import hashlib
import importlib
import io
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    raise SystemExit(
        "aot_compile: unset TRITON_INTERPRET (the interpreter replaces the kernels that are compiled here)"
    )

import torch
import triton
import triton.language as tl
from rlvr_fast.kernels.launch_plan import KernelLaunch, record_launches
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode
from triton.backends.compiler import GPUTarget

from rlvr_fast.ops.constants import ROLLOUT_OFF, ROLLOUT_SEQUENCE, ROLLOUT_TOKEN

REPO = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "triton-aot-sm80-sm90.json"
SPILL_LIMIT_BYTES = 64  # per thread, stores + loads: see the module docstring


@dataclasses.dataclass(frozen=True)
class Target:
    capability: int
    sm_count: int  # the GPU the launchers plan for: A100 SXM (108 SMs), H100 SXM (132 SMs)
    shared_limit: int  # bytes of shared memory one block may opt in to (CUDA programming guide, compute capabilities)


TARGETS = {80: Target(80, 108, 166912), 90: Target(90, 132, 232448)}


# --------------------------------------------------------------------------------------------------------------------
# Scenarios: which launcher calls to record
# --------------------------------------------------------------------------------------------------------------------


def covering(base: dict[str, Any], branches: dict[str, list]) -> Iterator[dict[str, Any]]:
    """The base case, then each other value of each branch axis with every other axis at its base value."""
    yield dict(base)
    for name, values in branches.items():
        for value in values:
            if value != base[name]:
                yield {**base, name: value}


def crossed(axes: dict[str, list]) -> Iterator[dict[str, Any]]:
    """The full Cartesian product of ``axes``."""
    names = list(axes)
    for values in itertools.product(*(axes[n] for n in names)):
        yield dict(zip(names, values))


def _grid(*parts: Iterable[dict]) -> Iterator[dict]:
    """Merge every combination of one dict from each part."""
    for combo in itertools.product(*(list(p) for p in parts)):
        merged: dict = {}
        for c in combo:
            merged.update(c)
        yield merged


HALF = [torch.bfloat16, torch.float16]
FLOATS = [torch.bfloat16, torch.float16, torch.float32, torch.float64]
D_SIZES = [576, 896, 4096]
V_SIZES = [49152, 151936, 262144]


def _cuda(*shape, dtype=torch.float32) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="cuda")


def _group_advantage(target: Target) -> Iterator[None]:
    from rlvr_fast.kernels import group_advantage as k

    from rlvr_fast.ops import constants as codes

    estimators = [
        (codes.ADV_GRPO, codes.SCALE_GROUP),
        (codes.ADV_GRPO, codes.SCALE_BATCH),
        (codes.ADV_GRPO, codes.SCALE_NONE),
        (codes.ADV_DR_GRPO, codes.SCALE_NONE),
        (codes.ADV_RLOO, codes.SCALE_NONE),
        (codes.ADV_PSR, codes.SCALE_NONE),
        (codes.ADV_NSR, codes.SCALE_NONE),
        (codes.ADV_W_REINFORCE, codes.SCALE_NONE),
    ]
    base = dict(estimator=estimators[1], sample_mode=codes.SAMPLE_ALL, correct=True, dtype=torch.float32)
    branches = dict(
        estimator=estimators,
        sample_mode=[codes.SAMPLE_ALL, codes.SAMPLE_POSITIVE_ONLY, codes.SAMPLE_NEGATIVE_ONLY],
        correct=[True, False],
        dtype=[torch.float32, torch.bfloat16, torch.float64],
    )
    shapes = [dict(groups=g, size=s) for g, s in [(4096, 2), (4096, 16), (1024, 64), (7, 16)]]
    for c in _grid(covering(base, branches), shapes):
        n = c["groups"] * c["size"]
        out = k.empty_outputs(c["groups"], c["size"], torch.device("cuda"))
        k.group_advantage_fwd(
            _cuda(n, dtype=c["dtype"]),
            _cuda(n) if c["correct"] else None,
            n_groups=c["groups"],
            group_size=c["size"],
            estimator=c["estimator"][0],
            scale=c["estimator"][1],
            sample_mode=c["sample_mode"],
            eps=1e-6,
            lam=0.1,
            out=out,
        )
        yield


def _sparse_adamw(target: Target) -> Iterator[None]:
    from rlvr_fast.kernels import sparse_adamw as k

    axes = dict(
        dtype=list(k.SUPPORTED_PARAM_DTYPES),
        aligned=[True, False],
        index=[torch.int32, torch.int64],
        segments=[1, 211],
    )
    for c in crossed(axes):
        n, entries = c["segments"], 1 << 20
        k.plan_sparse_adamw(
            _cuda(k.INT_ROWS, n, dtype=torch.int64),
            _cuda(n, dtype=torch.int32),
            _cuda(k.HYPER_ROWS, n),
            _cuda(entries, dtype=c["index"]),
            _cuda(entries),
            _cuda(entries),
            n_segments=n,
            n_programs=entries // (k.BLOCK * k.ITERS),
            param_dtype=c["dtype"],
            aligned=c["aligned"],
            entry_align=16,
        ).launch()
        yield


LOSS_BRANCHES = dict(
    old=[True, False],
    ref=[True, False],
    beta=[0.04, 0.0],
    entropy=[True, False],
    kl=[0, 1, 2, 3],
    sequence=[False, True],
    row_norm=[True, False],
    dual_clip=[3.0, None],
    kl_weighted=[False, True],
    rollout=[ROLLOUT_OFF, ROLLOUT_TOKEN, ROLLOUT_SEQUENCE],
)
LOSS_BASE = dict(
    old=True,
    ref=True,
    beta=0.04,
    entropy=True,
    kl=2,
    sequence=False,
    row_norm=True,
    dual_clip=3.0,
    kl_weighted=False,
    rollout=ROLLOUT_OFF,
)


def _loss_cases(base: dict[str, Any], branches: dict[str, list]) -> Iterator[dict[str, Any]]:
    """``covering``, plus the ratio-weighted KL at sequence level (the row pre-pass's KL sum, GSPO's KL mean), and the
    per-completion rollout correction without old log-probs and under GSPO (the pre-pass's fourth column)."""
    yield from covering(base, branches)
    yield {**base, "kl_weighted": True, "sequence": True}
    yield {**base, "rollout": ROLLOUT_SEQUENCE, "old": False}
    yield {**base, "rollout": ROLLOUT_SEQUENCE, "sequence": True}


def _valid_loss_case(c: dict) -> bool:
    if c["rollout"] == ROLLOUT_TOKEN and c["sequence"]:
        return False  # token_truncate under GSPO is refused (PolicyObjective)
    if c["kl_weighted"] and (c["beta"] == 0.0 or not c["ref"]):
        return False  # the ratio-weighted KL needs a KL term in the loss (the objective checks it)
    return c["ref"] or c["beta"] == 0.0  # a KL term in the loss needs reference log-probs (the op checks it)


def _grpo_loss(target: Target) -> Iterator[None]:
    from rlvr_fast.kernels import grpo_loss as k

    base = {**LOSS_BASE, "write_grad": True, "dtype": torch.float32, "mask": torch.float32}
    branches = {
        **LOSS_BRANCHES,
        "write_grad": [True, False],
        "dtype": [torch.float32, torch.bfloat16, torch.float64],
        "mask": [torch.float32, torch.bool, torch.int64],
    }
    # (completions, tokens): BLOCK_T 32 (short completions), 128 (few long ones: the narrowest GPU block), 1024 (a
    # large batch: the widest)
    shapes = [dict(B=b, T=t) for b, t in [(64, 30), (8, 4096), (1024, 8192)]]
    for c in _grid(_loss_cases(base, branches), shapes):
        if not _valid_loss_case(c):
            continue
        B, T = c["B"], c["T"]
        logp = _cuda(B, T, dtype=c["dtype"])
        k.grpo_loss_fwd(
            logp,
            _cuda(B, T, dtype=c["dtype"]) if c["old"] else None,
            _cuda(B, T, dtype=c["dtype"]) if c["ref"] else None,
            _cuda(B, T, dtype=c["mask"]),
            _cuda(B),
            _cuda(B, T, dtype=c["dtype"]) if c["entropy"] else None,
            beta=c["beta"],
            eps_low=0.2,
            eps_high=0.28,
            dual_clip=c["dual_clip"],
            kl=c["kl"],
            sequence=c["sequence"],
            row_norm=c["row_norm"],
            write_grad=c["write_grad"],
            kl_weighted=c["kl_weighted"],
            rollout_logp=_cuda(B, T, dtype=c["dtype"]) if c["rollout"] != ROLLOUT_OFF else None,
            rollout=c["rollout"],
            rollout_cap=3.0,
        )
        yield


def _fused_linear_grpo(target: Target) -> Iterator[None]:
    from rlvr_fast.kernels import fused_linear_grpo as k

    # Row kernels: the chunk's logits z come from a GEMM with fp32 output (fp64 for fp64 models); dz is written in the
    # model's dtype. A chunk of n tokens: a few hundred to a few thousand rows.
    model_dtypes = FLOATS
    for dtype, v, n, bias, entropy in itertools.chain(
        ((d, V_SIZES[1], 1000, True, True) for d in model_dtypes),
        ((torch.bfloat16, v, 4096, b, e) for v in V_SIZES for b in (True, False) for e in (True, False)),
    ):
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        z = _cuda(n, v, dtype=acc)
        b = _cuda(v, dtype=dtype) if bias else None
        targets = _cuda(n, dtype=torch.int64)
        _, lse, _ = k.chunk_row_stats(z, b, targets, 1.0, with_entropy=entropy)
        k.chunk_dlogits(z, b, targets, lse, _cuda(n, dtype=acc), 1.0, _cuda(n, v, dtype=dtype))
        yield

    base = {**LOSS_BASE, "dtype": torch.float32}
    branches = {**LOSS_BRANCHES, "dtype": [torch.float32, torch.float64]}
    for c in _loss_cases(base, branches):
        if not _valid_loss_case(c):
            continue
        n, B = 5000, 64
        acc = c["dtype"]
        k.token_terms(
            _cuda(n, dtype=acc),
            _cuda(n, dtype=acc) if c["old"] else None,
            _cuda(n, dtype=acc) if c["ref"] else None,
            _cuda(n, dtype=acc),
            _cuda(n, dtype=torch.int64),
            _cuda(B, dtype=acc),
            _cuda(B, dtype=acc) if c["row_norm"] else None,
            _cuda(B, dtype=acc) if c["sequence"] else None,
            _cuda(B, dtype=acc) if c["sequence"] else None,
            _cuda(n, dtype=acc) if c["entropy"] else None,
            _cuda(B, dtype=acc) if c["sequence"] and c["kl_weighted"] else None,
            beta=c["beta"],
            eps_low=0.2,
            eps_high=0.28,
            dual_clip=c["dual_clip"],
            kl=c["kl"],
            kl_weighted=c["kl_weighted"],
            roll=_cuda(n, dtype=acc) if c["rollout"] == ROLLOUT_TOKEN else None,
            roll_row=_cuda(B, dtype=acc) if c["rollout"] == ROLLOUT_SEQUENCE else None,
            rollout=c["rollout"],
            rollout_cap=3.0,
        )
        yield


def _logprobs(target: Target) -> Iterator[None]:
    from rlvr_fast.kernels import logprobs as k

    # token_logprobs: a few tokens (the fixed small tile) and a training batch (the autotuned tiles), every dtype; the
    # bias / entropy / gradient switches for bf16; N = 1 plans the most vocabulary splits. The backward walks the
    # vocabulary in chunks (one recorded launch each), so it runs on the smallest model shape only: D and V change no
    # specialisation (all are multiples of 16) and no tile choice.
    small = (576, 49152)
    cases = [
        dict(dtype=d, n=n, shape=shape, bias=True, entropy=True, g=(True, True), backward=shape == small)
        for d in FLOATS
        for n in (64, 8192)
        for shape in (small, (896, 151936), (4096, 262144))
    ]
    cases += [
        dict(dtype=torch.bfloat16, n=n, shape=small, bias=b, entropy=e, g=g, backward=True)
        for n in (1, 64, 8192)
        for b in (True, False)
        for e in (True, False)
        for g in ((True, False), (False, True), (True, True))
    ]
    for c in cases:
        n, (d, v), dtype = c["n"], c["shape"], c["dtype"]
        hidden, weight = _cuda(n, d, dtype=dtype), _cuda(v, d, dtype=dtype)
        bias = _cuda(v, dtype=dtype) if c["bias"] else None
        targets = _cuda(n, dtype=torch.int64)
        splits = k._default_splits(n, hidden.device, sm_count=target.sm_count)
        _, entropy, lse = k.token_logprobs_fwd(
            hidden, weight, bias, targets, 1.0, with_entropy=c["entropy"], splits=splits
        )
        if c["backward"]:
            g_logp = _cuda(n) if c["g"][0] or not (c["g"][1] and c["entropy"]) else None
            g_ent = _cuda(n) if c["g"][1] and c["entropy"] else None
            k.token_logprobs_bwd(
                hidden,
                weight,
                bias,
                targets,
                lse,
                entropy,
                g_logp,
                g_ent,
                1.0,
                need_hidden=True,
                need_weight=True,
                need_bias=bias is not None,
            )
        yield
    # logprobs_from_logits: the materialised (N, V) logits of any dtype
    for dtype, v, entropy, g in itertools.chain(
        ((d, 151936, True, (True, True)) for d in FLOATS),
        (
            (torch.bfloat16, v, e, g)
            for v in V_SIZES + [100]
            for e in (True, False)
            for g in ((True, False), (False, True), (True, True))
        ),
    ):
        n = 512
        logits, targets = _cuda(n, v, dtype=dtype), _cuda(n, dtype=torch.int64)
        _, ent, lse = k.logprobs_from_logits_fwd(logits, targets, 1.0, -100, with_entropy=entropy)
        k.logprobs_from_logits_bwd(
            logits, targets, lse, ent, _cuda(n) if g[0] else None, _cuda(n) if g[1] and entropy else None, 1.0, -100
        )
        yield


SCENARIOS: dict[str, Callable[[Target], Iterator[None]]] = {
    "group_advantage": _group_advantage,
    "sparse_adamw": _sparse_adamw,
    "grpo_loss": _grpo_loss,
    "fused_linear_grpo": _fused_linear_grpo,
    "logprobs": _logprobs,
}


class _FakeCudaShims(TorchFunctionMode):
    """What a CPU-only torch cannot do even on fake CUDA tensors (it opens a CUDA device guard and fails), done another
    way: ``tensor[i]`` / ``tensor[a:b]`` through ``select`` / ``slice``; copies, assignments and ``out=`` calls (the
    GEMMs between the backward's launches) are skipped, returning the destination, since no value is ever read."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "out" in kwargs:
            return kwargs["out"]
        if func is torch.Tensor.copy_:
            return args[0]
        if func is torch.Tensor.__setitem__:
            return None
        if func is torch.Tensor.__getitem__:
            t, index = args
            parts = index if isinstance(index, tuple) else (index,)
            if all(isinstance(p, (int, slice)) for p in parts):
                dim = 0
                for p in parts:
                    if isinstance(p, int):
                        t = t.select(dim, p)
                    else:
                        start, stop, step = p.indices(t.shape[dim])
                        t = torch.ops.aten.slice(t, dim, start, stop, step)
                        dim += 1
                return t
        return func(*args, **kwargs)


def record(target: Target) -> list[KernelLaunch]:
    """Every launch the scenarios make on ``target``, recorded on fake CUDA tensors."""
    launches: list[KernelLaunch] = []
    with FakeTensorMode(allow_non_fake_inputs=True), _FakeCudaShims(), record_launches() as recorded:
        for scenario in SCENARIOS.values():
            for _ in scenario(target):
                launches.extend(recorded)
                recorded.clear()
    return launches


# --------------------------------------------------------------------------------------------------------------------
# Binding: a launch -> the compile jobs Triton would run
# --------------------------------------------------------------------------------------------------------------------


class _Address:
    """A tensor as Triton's binder sees it: a dtype and an address (its byte offset in a 512-byte aligned block)."""

    def __init__(self, t: torch.Tensor):
        self.dtype = t.dtype
        self._ptr = 512 + t.storage_offset() * t.element_size()

    def data_ptr(self) -> int:
        return self._ptr


@dataclasses.dataclass(frozen=True)
class Job:
    module: str
    kernel: str
    config: str
    capability: int
    signature: dict
    constexprs: dict  # {(index,): value}
    attrs: dict
    options: dict
    key: str
    describe: str  # the constexprs, readable
    arg_types: str  # the runtime arguments' types as bound (pointer element types, int widths), readable


def _readable(v: Any) -> str:
    return str(v) if not isinstance(v, tl.dtype) else v.name


def source_hash(fn, _seen: set | None = None) -> str:
    """SHA-256 of a kernel's source, the sources of the ``@triton.jit`` functions it calls (recursively) and the
    values of the plain globals it reads. Unlike Triton's ``cache_key`` it ignores line numbers, so an edit elsewhere
    in the file (an import added above the kernel) keeps the committed results valid; it changes only the PTX's line
    table, never registers, spills or shared memory."""
    seen = set() if _seen is None else _seen
    seen.add(fn)
    parts = [fn.src]
    for name in sorted(fn.fn.__code__.co_names):
        value = fn.__globals__.get(name)
        if isinstance(value, triton.runtime.jit.JITFunction):
            if value not in seen:
                parts.append(f"{name}:{source_hash(value, seen)}")
        elif isinstance(value, (int, float, str, bool, tl.constexpr)):
            parts.append(f"{name}={value!r}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


@functools.cache
def _binder(fn, capability: int):
    """Triton's backend for the target and the kernel's argument binder (what ``JITFunction.run`` builds per device)."""
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", capability, 32))
    return backend, create_function_from_signature(fn.signature, fn.params, backend)


def bind(launch: KernelLaunch, target: Target) -> list[Job]:
    fn = launch.kernel
    backend, binder = _binder(fn, target.capability)
    args = [_Address(a) if isinstance(a, torch.Tensor) else a for a in launch.args]
    jobs = []
    for variant in launch.variants():
        kwargs = dict(variant.constexprs)
        if variant.num_warps is not None:
            kwargs["num_warps"] = variant.num_warps
        if variant.num_stages is not None:
            kwargs["num_stages"] = variant.num_stages
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, options, bound, specialization, options)
        opts = {k: v for k, v in options.__dict__.items() if isinstance(v, (int, float, str, bool, tuple, type(None)))}
        key_text = repr(
            (
                source_hash(fn),
                sorted(signature.items()),
                sorted((k, _readable(v)) for k, v in constexprs.items()),
                sorted(attrs.items()),
                # extern_libs holds libdevice's absolute path, which differs between installs but not its content
                sorted((k, v) for k, v in opts.items() if k != "extern_libs"),
                target.capability,
                triton.__version__,
            )
        )
        names = [p.name for p in fn.params]
        describe = " ".join(f"{names[k[0]]}={_readable(v)}" for k, v in sorted(constexprs.items()))
        jobs.append(
            Job(
                fn.fn.__module__,
                fn.__name__,
                variant.config,
                target.capability,
                signature,
                constexprs,
                attrs,
                opts,
                hashlib.sha256(key_text.encode()).hexdigest(),
                describe,
                ",".join(t for t in signature.values() if t != "constexpr"),
            )
        )
    return jobs


# --------------------------------------------------------------------------------------------------------------------
# Compiling
# --------------------------------------------------------------------------------------------------------------------

_RE_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_RE_REGS = re.compile(r"Used (\d+) registers")
_RE_RES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def _cuobjdump() -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def compile_job(job: Job) -> dict:
    """Compile one job; the result row of the table (``error`` set when the compiler failed)."""
    from triton import knobs
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(job.module), job.kernel)
    row = dict(
        kernel=job.kernel,
        config=job.config,
        constexprs=job.describe,
        arg_types=job.arg_types,
        target=f"sm_{job.capability}",
        num_warps=job.options.get("num_warps"),
        num_stages=job.options.get("num_stages"),
        key=job.key,
    )
    knobs.nvidia.dump_ptxas_log = True  # ptxas -v report, printed to stdout: the spill counts
    knobs.compilation.always_compile = True  # a warm Triton cache would skip ptxas and its report
    log = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(
                ASTSource(fn, job.signature, job.constexprs, job.attrs),
                target=GPUTarget("cuda", job.capability, 32),
                options=job.options,
            )
    except Exception as e:  # the compiler's own error types vary by stage; every one is a failure to report
        row.update(error=f"{type(e).__name__}: {e}"[:2000], compile_s=round(time.perf_counter() - start, 2))
        return row
    row["compile_s"] = round(time.perf_counter() - start, 2)
    text = log.getvalue()
    spill = _RE_SPILL.search(text)
    regs = _RE_REGS.search(text)
    row.update(
        registers=int(regs.group(1)) if regs else None,
        stack_bytes=int(spill.group(1)) if spill else 0,
        spill_stores=int(spill.group(2)) if spill else 0,
        spill_loads=int(spill.group(3)) if spill else 0,
        dynamic_shared=int(compiled.metadata.shared),
    )
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True)
    res = _RE_RES.search(out.stdout)
    if res:
        row.update(registers=int(res.group(1)), static_shared=int(res.group(3)), local_bytes=int(res.group(4)))
    else:
        row.update(static_shared=0, error=f"cuobjdump gave no resource usage: {out.stdout[-300:]} {out.stderr[-300:]}")
    row["shared_bytes"] = row["dynamic_shared"] + row["static_shared"]
    return row


def problems(row: dict) -> list[str]:
    """Why a result row fails the check (empty: it passes)."""
    if row.get("error"):
        return [f"compile error: {row['error'].splitlines()[0][:300]}"]
    out = []
    limit = TARGETS[int(row["target"][3:])].shared_limit
    if row["shared_bytes"] > limit:
        out.append(f"shared memory {row['shared_bytes']} B > {limit} B, the {row['target']} per-block limit")
    spilled = row["spill_stores"] + row["spill_loads"]
    if spilled > SPILL_LIMIT_BYTES:
        out.append(
            f"spills {row['spill_stores']} B stored + {row['spill_loads']} B loaded > {SPILL_LIMIT_BYTES} B allowed"
        )
    return out


def run_jobs(jobs: list[Job], n_workers: int, compile_fn: Callable[[Job], dict] = compile_job) -> list[dict]:
    """Compile ``jobs`` in ``n_workers`` processes; each failing row is printed as soon as it is known."""
    # slowest first (the matmul kernels), so that no worker starts a long compile at the end
    order = sorted(range(len(jobs)), key=lambda i: "token_logprobs" not in jobs[i].kernel)
    out: list[dict] = [{}] * len(jobs)
    with ProcessPoolExecutor(max_workers=max(1, n_workers)) as pool:
        rows = pool.map(compile_fn, [jobs[i] for i in order], chunksize=1)
        for done, (i, row) in enumerate(zip(order, rows), 1):
            out[i] = row
            for p in problems(row):
                print(
                    f"  fail {row['kernel']} {row['target']} [{row['config']} | {row['constexprs']}]: {p}", flush=True
                )
            if done % 50 == 0 or done == len(jobs):
                print(f"  {done}/{len(jobs)} compiled", flush=True)
    return out


def _launch_key(launch: KernelLaunch, target: Target) -> tuple:
    """What binding depends on, cheaply: launches with equal keys bind to the same jobs (a tensor counts by dtype and
    16-byte alignment, an integer by the specialisations Triton makes: 1, divisible by 16, beyond int32)."""

    def arg(a):
        if isinstance(a, torch.Tensor):
            return (a.dtype, _Address(a).data_ptr() % 16 == 0)
        if isinstance(a, bool) or not isinstance(a, int):
            return type(a).__name__
        return (a == 1, a % 16 == 0, -(2**31) <= a < 2**31)

    return (
        launch.kernel,
        target.capability,
        tuple(arg(a) for a in launch.args),
        tuple(sorted((k, _readable(v)) for k, v in launch.constexprs.items())),
        launch.num_warps,
        launch.num_stages,
        id(launch.autotuner),
    )


def plan_jobs(targets: list[Target]) -> list[Job]:
    """Unique compile jobs of every recorded launch on every target, in a stable order."""
    seen: dict[str, Job] = {}
    bound: set[tuple] = set()
    for target in targets:
        for launch in record(target):
            key = _launch_key(launch, target)
            if key in bound:
                continue
            bound.add(key)
            for job in bind(launch, target):
                seen.setdefault(job.key, job)
    return sorted(seen.values(), key=lambda j: (j.kernel, j.capability, j.config, j.describe))


def load_cache(path: Path) -> dict[str, dict]:
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    if data.get("triton_version") != triton.__version__:
        return {}
    return {r["key"]: r for r in data.get("results", []) if not r.get("error")}


def print_table(rows: list[dict], file=sys.stdout) -> None:
    header = f"{'kernel':34} {'target':6} {'w':>2} {'s':>2} {'regs':>4} {'spill st/ld':>11} {'shared':>7} {'secs':>6}"
    print(header + "  config | constexprs   (* = reused from the committed JSON)", file=file)
    for r in rows:
        if r.get("error"):
            print(f"{r['kernel']:34} {r['target']:6} ERROR {r['error'].splitlines()[0][:90]}", file=file)
            continue
        cached = "*" if r.get("cached") else " "
        print(
            f"{r['kernel']:34} {r['target']:6} {r['num_warps']:>2} {r['num_stages']:>2} {r['registers']:>4} "
            f"{r['spill_stores']:>5}/{r['spill_loads']:<5} {r['shared_bytes']:>7} {r['compile_s']:>5}{cached}  "
            f"{r['config']} | {r['constexprs']}",
            file=file,
        )


def summarise(rows: list[dict]) -> dict:
    """Per kernel and target: configurations compiled, max registers / shared bytes / spills."""
    out: dict[str, dict] = {}
    for r in rows:
        s = out.setdefault(
            f"{r['kernel']} {r['target']}",
            dict(configs=0, errors=0, max_registers=0, max_shared_bytes=0, max_spill_bytes=0),
        )
        s["configs"] += 1
        if r.get("error"):
            s["errors"] += 1
            continue
        s["max_registers"] = max(s["max_registers"], r["registers"] or 0)
        s["max_shared_bytes"] = max(s["max_shared_bytes"], r["shared_bytes"])
        s["max_spill_bytes"] = max(s["max_spill_bytes"], r["spill_stores"] + r["spill_loads"])
    return out


def write_json(path: Path, targets: list[Target], rows: list[dict], n_failures: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = dict(
        triton_version=triton.__version__,
        torch_version=torch.__version__.split("+")[0],
        targets={f"sm_{t.capability}": dataclasses.asdict(t) for t in targets},
        spill_limit_bytes=SPILL_LIMIT_BYTES,
        compilations=len(rows),
        failures=n_failures,
        summary=summarise(rows),
        results=[{k: v for k, v in r.items() if k != "cached"} for r in rows],
    )
    path.write_text(json.dumps(data, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--targets", default="80,90", help="compute capabilities, comma-separated (a subset writes no JSON)"
    )
    parser.add_argument("--jobs", type=int, default=2, help="compile processes (the CI machine has 2 cores)")
    parser.add_argument("--no-cache", action="store_true", help="recompile everything, ignoring the committed JSON")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the JSON written (and read as the cache)")
    parser.add_argument("--kernels", default=None, help="only kernels whose name matches this regex (no JSON written)")
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    wanted = args.targets.split(",")
    unknown = [c for c in wanted if not c.isdigit() or int(c) not in TARGETS]
    if unknown:
        parser.error(f"--targets: expected compute capabilities among {sorted(TARGETS)}, got {unknown}")
    targets = [TARGETS[int(c)] for c in wanted]
    jobs = plan_jobs(targets)
    if args.kernels:
        jobs = [j for j in jobs if re.search(args.kernels, j.kernel)]
    planned_s = time.perf_counter() - t0
    cache = {} if args.no_cache else load_cache(args.out)
    todo = [j for j in jobs if j.key not in cache]
    print(
        f"aot_compile: {len(jobs)} unique compilations planned in {planned_s:.1f} s; {len(jobs) - len(todo)} reused "
        f"from {args.out.name} (same source, launch and Triton {triton.__version__}), {len(todo)} to compile with "
        f"{args.jobs} processes",
        flush=True,
    )
    fresh = {j.key: r for j, r in zip(todo, run_jobs(todo, args.jobs))}
    rows = [fresh[j.key] if j.key in fresh else {**cache[j.key], "cached": True} for j in jobs]
    print_table(rows)
    failures = [(r, p) for r in rows for p in problems(r)]
    partial = bool(args.kernels) or set(targets) != set(TARGETS.values())  # a subset: leave the JSON whole
    if not partial:
        write_json(args.out, targets, rows, len(failures))
    compile_s = sum(r["compile_s"] for r in fresh.values())
    print(
        f"aot_compile: {len(rows)} compilations ({len(fresh)} compiled now, {compile_s:.0f} s of compiler time), "
        f"{time.perf_counter() - t0:.0f} s wall" + ("" if partial else f"; wrote {args.out}")
    )
    for r, p in failures:
        print(f"FAIL  {r['kernel']} {r['target']} [{r['config']} | {r['constexprs']}]: {p}")
    print("aot_compile: " + ("FAILED" if failures else "passed"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
