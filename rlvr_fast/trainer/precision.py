"""The run's numeric precision: which dtype the weights are stored in and which dtype the forward passes compute in.

``RLVRConfig.dtype`` names one of ``PRECISIONS``; ``auto`` picks by device (``AUTO``):

- a CUDA GPU: bfloat16 weights (as before);
- a CPU that computes bf16 natively (AMX or AVX512-BF16, ``native_bf16_features``): ``autocast_bf16``, float32
  weights, gradients and optimizer state, every forward under ``torch.autocast(dtype=bfloat16)``. A bf16 matmul runs at
  about 10x the float32 rate on such a CPU (AMX), while float32 master weights keep small updates from rounding away;
- any other CPU: float32 (bf16 would be emulated there, slower than float32).

Where autocast applies (``Precision.autocast``): every model forward of a run, the rollout (one region around a whole
``generate`` call), the held-out evaluation's generation, the fixed log-prob passes and the update's forward. Autocast
caches the bf16 copy of each trainable leaf weight for the duration of its outermost region, so the regions are chosen
long: the 135M weights are cast once per rollout and once per update pass, not once per decode token or micro-batch.
Backward passes run outside autocast (``outside_autocast``), in the dtypes the forward chose (autocast's usual rule).
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from dataclasses import dataclass

import torch

from rlvr_fast.trainer.schema import ConfigFieldError


@dataclass(frozen=True)
class PrecisionMode:
    weights: torch.dtype  # parameters, gradients and optimizer state
    compute: torch.dtype | None  # torch.autocast's dtype for every forward; None: no autocast (compute = weights)
    text: str  # how the run's log names it


# RLVRConfig.dtype -> its precision (``auto`` resolves to one of these: ``AUTO``).
PRECISIONS = {
    "float32": PrecisionMode(torch.float32, None, "float32 weights and compute"),
    "bfloat16": PrecisionMode(torch.bfloat16, None, "bfloat16 weights and compute"),
    "autocast_bf16": PrecisionMode(torch.float32, torch.bfloat16, "bf16 autocast over float32 weights"),
}

# What ``auto`` chooses on each kind of device (``device_kind``), and why (``{features}``: the CPU's bf16 features).
AUTO = {
    "cuda": ("bfloat16", "auto on a CUDA GPU"),
    "cpu_native_bf16": ("autocast_bf16", "the CPU computes bf16 natively: {features}"),
    "cpu": ("float32", "the CPU has no native bf16 (no AMX or AVX512-BF16): bf16 would be emulated, slower"),
}

# CPU features (torch.cpu.get_capabilities() keys, the same names as /proc/cpuinfo's flags) that compute bf16 matmuls
# in hardware, with the name the log gives them. ARM's bf16 instructions are left out: not measured here.
NATIVE_BF16_FEATURES = {"amx_bf16": "AMX", "avx512_bf16": "AVX512-BF16"}


def _cpu_flags() -> set[str]:
    """The CPU's feature flags: torch's own detection (``torch.cpu.get_capabilities``, public since torch 2.8), else
    /proc/cpuinfo's ``flags`` line on Linux; empty when neither is available."""
    get_capabilities = getattr(torch.cpu, "get_capabilities", None)
    if get_capabilities is not None:
        return {name for name, value in get_capabilities().items() if value is True}
    if sys.platform.startswith("linux"):
        try:
            with open("/proc/cpuinfo") as fh:
                for line in fh:
                    if line.startswith("flags"):
                        return set(line.split(":", 1)[1].split())
        except OSError:
            pass
    return set()


def native_bf16_features() -> tuple[str, ...]:
    """The names ("AMX", "AVX512-BF16") of this CPU's features that compute bf16 natively; empty when none."""
    flags = _cpu_flags()
    return tuple(label for flag, label in NATIVE_BF16_FEATURES.items() if flag in flags)


def device_kind(device: torch.device) -> str:
    """The key of ``AUTO`` for ``device``."""
    if device.type == "cuda":
        return "cuda"
    return "cpu_native_bf16" if native_bf16_features() else "cpu"


@dataclass(frozen=True)
class Precision:
    """The resolved precision of a run on ``device_type``: ``name`` (a key of ``PRECISIONS``, or the weights' dtype for
    a model loaded by the caller), the weights' dtype, the autocast dtype (None: none) and why it was chosen."""

    name: str
    weights: torch.dtype
    autocast_dtype: torch.dtype | None
    device_type: str
    reason: str

    @classmethod
    def of(cls, name: str, device_type: str, reason: str) -> Precision:
        mode = PRECISIONS[name]
        return cls(name, mode.weights, mode.compute, device_type, reason)

    @property
    def compute(self) -> torch.dtype:
        """The dtype the matmuls run in (the autocast dtype, else the weights')."""
        return self.autocast_dtype or self.weights

    def autocast(self) -> contextlib.AbstractContextManager:
        """A region whose forwards compute in ``compute`` (torch.autocast), or a no-op without autocast. One region
        caches each trainable weight's cast until it ends: open it around a whole pass, never around an optimizer
        step (the cache would hold the old weights), and run backward outside it (``outside_autocast``)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.autocast_dtype)

    def describe(self) -> str:
        """The run log's line, e.g. "precision: bf16 autocast over float32 weights (the CPU computes bf16 natively:
        AMX, AVX512-BF16)"."""
        mode = PRECISIONS.get(self.name)
        text = mode.text if mode is not None else f"{_short(self.weights)} weights and compute"
        return f"precision: {text} ({self.reason})"

    def record(self) -> dict[str, str]:
        """The resolved precision as the report's settings record it."""
        return {
            "precision": self.name,
            "weights_dtype": _short(self.weights),
            "compute_dtype": _short(self.compute),
            "precision_reason": self.reason,
        }


def _short(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def autocast_region(precision: Precision | None) -> contextlib.AbstractContextManager:
    """``precision.autocast()``, or a no-op when there is no precision (a caller that never set one)."""
    return precision.autocast() if precision is not None else contextlib.nullcontext()


def outside_autocast(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast off for a backward called inside an autocast region: torch runs a CPU backward on the calling thread
    with its autocast state, which would re-cast the backward's float32 work to bf16. A nested region: it does not
    clear the outer region's cache of weight casts."""
    return torch.autocast(device_type, enabled=False)


def resolve_precision(name: str, device: torch.device) -> Precision:
    """The precision of ``RLVRConfig.dtype`` = ``name`` on ``device``. ``autocast_bf16`` on a CPU without native bf16
    is allowed with a warning (correct, only slower than float32: useful to check results on any machine)."""
    if name == "auto":
        kind = device_kind(device)
        chosen, why = AUTO[kind]
        return Precision.of(chosen, device.type, why.format(features=", ".join(native_bf16_features())))
    if name not in PRECISIONS:
        raise ConfigFieldError("dtype", f"RLVRConfig.dtype must be one of {['auto', *PRECISIONS]}, got {name!r}")
    if name == "autocast_bf16" and device.type == "cpu" and not native_bf16_features():
        warnings.warn(
            "RLVRConfig.dtype='autocast_bf16' on a CPU without native bf16 (no AMX or AVX512-BF16): results are right "
            "but bf16 is emulated there, slower than dtype='float32'",
            stacklevel=2,
        )
        return Precision.of(name, device.type, "set by RLVRConfig.dtype; this CPU has no native bf16: emulated")
    return Precision.of(name, device.type, "set by RLVRConfig.dtype")


def precision_of_loaded(name: str, device: torch.device, weights: torch.dtype) -> Precision:
    """The precision of a model the caller loaded (not ``load_model``: tests, a study's shared copy) with ``weights``
    dtype: ``autocast_bf16`` when the config names it (the weights must be float32), else the weights as they are.
    ``auto`` does not add autocast to such a model: its loader chose the weights, and the run computes in them."""
    if name == "autocast_bf16":
        if weights != torch.float32:
            raise ConfigFieldError(
                "dtype",
                f"RLVRConfig.dtype='autocast_bf16' needs float32 weights (autocast over float32 master weights), got "
                f"a model loaded in {weights}",
            )
        return resolve_precision(name, device)
    return Precision(_short(weights), weights, None, device.type, "as the caller loaded the model")
