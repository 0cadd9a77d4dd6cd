"""Benchmark cases of SparseAdamW: one optimizer step against torch.optim.AdamW (foreach on the CPU, fused on CUDA).

Workload: the fp32 parameters of decoder layers of a Qwen2.5-1.5B-shaped model (hidden 1536, intermediate 8960,
12 query / 2 key-value heads of 128; 12 tensors per layer, 46.8M entries): 2 layers (94M entries, 24 tensors) on the
CPU, 21 layers (983M entries, 252 tensors) on CUDA. Every tensor gets a uniformly random mask at the density (1.0 =
no mask, the dense path). Gradients are set once and stay set, so each call is exactly one ``step()``; parameters,
gradients and the baseline optimizer are shared by the cases and built on the first call (collection stays cheap).

The floor, counted for this layout (bytes per parameter at density d, fp32 parameters and gradients):
- what the design notes count: 32 d (index 4, gradient 4, parameter 4 + 4, moments 8 + 8);
- what the memory system moves: the compact streams (index, moments) are contiguous, 20 d; the gradient and the
  parameter are gathered and scattered in 32-byte sectors, and a random mask touches a fraction 1 - (1 - d)^8 of the
  sectors: 20 d + 12 (1 - (1 - d)^8). That is the Floor used here (8.8 B at d = 0.1, 4.7 B at d = 0.05).
- dense (d = 1, no index): 28, as torch's fused AdamW.
So against fused AdamW (28 B) a random mask at d = 0.1 can win at most 28 / 8.8 = 3.2x (less if the memory system
fetches 64-byte pieces). Structured masks touch fewer sectors: the "rows" case keeps whole rows of each matrix (each
row with probability d; 1-D tensors per entry), so every touched sector is fully used and the floor is 32 d.

Implementations: "rlvr_fast" is the Triton kernel on CUDA (the torch path on the CPU); where the extension rlvr_fast._C
is built, "rlvr_fast_cuda" times the CUDA C++ kernel on the same parameters and masks.
"""

from __future__ import annotations

import torch

from rlvr_fast.backends import cuda_unavailable_reason
from rlvr_fast.benchmark.cases.registry import Case, Floor, register

DENSITIES = (0.05, 0.1, 0.3, 1.0)
ROW_DENSITIES = (0.1,)  # structured-mask cases (whole rows)
LAYERS = {"cpu": 2, "cuda": 21}
HIDDEN, INTERMEDIATE, KV = 1536, 8960, 256
LAYER_SHAPES = (
    ("self_attn.q_proj.weight", (HIDDEN, HIDDEN)),
    ("self_attn.q_proj.bias", (HIDDEN,)),
    ("self_attn.k_proj.weight", (KV, HIDDEN)),
    ("self_attn.k_proj.bias", (KV,)),
    ("self_attn.v_proj.weight", (KV, HIDDEN)),
    ("self_attn.v_proj.bias", (KV,)),
    ("self_attn.o_proj.weight", (HIDDEN, HIDDEN)),
    ("mlp.gate_proj.weight", (INTERMEDIATE, HIDDEN)),
    ("mlp.up_proj.weight", (INTERMEDIATE, HIDDEN)),
    ("mlp.down_proj.weight", (HIDDEN, INTERMEDIATE)),
    ("input_layernorm.weight", (HIDDEN,)),
    ("post_attention_layernorm.weight", (HIDDEN,)),
)
LR = 1e-6  # RL fine-tuning scale: parameters barely move, so repeated timing steps stay on the same data


def floor_bytes_per_param(density: float, structure: str = "random", elem_bytes: int = 4, sector: int = 32) -> float:
    """Bytes per parameter the step must move (see the module docstring)."""
    if density >= 1.0:
        return 7.0 * elem_bytes  # grad, param r+w, exp_avg r+w, exp_avg_sq r+w
    touched = density if structure == "rows" else 1.0 - (1.0 - density) ** (sector // elem_bytes)
    return 20.0 * density + 3.0 * elem_bytes * touched


def _mask(shape, density: float, structure: str, device: torch.device, gen: torch.Generator) -> torch.Tensor | None:
    if density >= 1.0:
        return None
    if structure == "rows" and len(shape) == 2:
        return (torch.rand(shape[0], 1, device=device, generator=gen) < density).expand(shape).contiguous()
    return torch.rand(shape, device=device, generator=gen) < density


class _Workload:
    """Parameters with gradients set, shared by every case of one device; built on first use."""

    def __init__(self, device: torch.device):
        self.device = device
        self.names = [f"model.layers.{i}.{n}" for i in range(LAYERS[device.type]) for n, _ in LAYER_SHAPES]
        self.shapes = [s for _ in range(LAYERS[device.type]) for _, s in LAYER_SHAPES]
        self.numel = sum(torch.Size(s).numel() for s in self.shapes)
        self._params = None
        self._baseline = None

    def params(self) -> list[torch.Tensor]:
        if self._params is None:
            gen = torch.Generator(device=self.device).manual_seed(0)
            params = []
            for shape in self.shapes:
                p = torch.randn(shape, device=self.device, generator=gen) * 0.02
                p.grad = torch.randn(shape, device=self.device, generator=gen) * 1e-3
                params.append(p)
            self._params = params
        return self._params

    def baseline_step(self) -> None:
        if self._baseline is None:
            kind = {"fused": True} if self.device.type == "cuda" else {"foreach": True}
            self._baseline = torch.optim.AdamW(self.params(), lr=LR, **kind)
        self._baseline.step()


def _sparse_step(work: _Workload, density: float, structure: str, backend: str):
    holder = {}

    def step() -> None:
        if "opt" not in holder:
            from rlvr_fast.optim.sparse_adamw import SparseAdamW

            params = work.params()
            gen = torch.Generator(device=work.device).manual_seed(1)
            masks = [_mask(p.shape, density, structure, work.device, gen) for p in params]
            holder["opt"] = SparseAdamW(params, masks, lr=LR, backend=backend)
        holder["opt"].step()

    return step


@register("sparse_adamw")
def sparse_adamw_cases(device: torch.device) -> list[Case]:
    work = _Workload(device)
    backend = "triton" if device.type == "cuda" else "torch"
    baseline = "torch_adamw_fused" if device.type == "cuda" else "torch_adamw_foreach"
    with_cuda = cuda_unavailable_reason(device, "sparse_adamw_step") is None
    cases = []
    variants = [(d, "random") for d in DENSITIES] + [(d, "rows") for d in ROW_DENSITIES]
    for density, structure in variants:
        n = work.numel
        floor = floor_bytes_per_param(density, structure)
        cases.append(
            Case(
                op="sparse_adamw",
                label=f"d={density} {'rows ' if structure == 'rows' else ''}{n / 1e6:.0f}M fp32",
                impls={
                    "rlvr_fast": _sparse_step(work, density, structure, backend),
                    **({"rlvr_fast_cuda": _sparse_step(work, density, structure, "cuda")} if with_cuda else {}),
                    baseline: work.baseline_step,
                },
                floor=Floor(flops=16.0 * density * n, bytes=floor * n),
                baseline=baseline,
                params={
                    "density": density,
                    "mask": structure,
                    "numel": n,
                    "tensors": len(work.shapes),
                    "backend": backend,
                    "floor_bytes_per_param": floor,
                    "design_floor_bytes_per_param": 28.0 if density >= 1.0 else 32.0 * density,
                    "dense_adamw_bytes_per_param": 28.0,
                },
            )
        )
    return cases
