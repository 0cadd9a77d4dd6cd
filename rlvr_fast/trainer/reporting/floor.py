"""Each part of a training step as a fraction of its floor, in every step record (docs/design.md, "Floors").

A part's floor is the longer of two times: its matmul FLOPs at the matmul rate, and the bytes it must move at the copy
bandwidth (a decode step of a small batch reads every weight for a few rows: bandwidth-bound), both measured in this
process (``benchmark.ceilings``) on the run's device, the matmuls in the dtype they run in. The fraction is floor /
measured seconds: 1.0 is the machine's limit, 0.05 means 95% of the part's time is something else (dispatch, Python,
copies, waiting).

What is counted (a lower bound: attention's score and value products, norms, activations and the sampler's own work
are left out, so the floors are low and the fractions err low):

- a decoder position costs ``2 * body`` FLOPs forward, ``body`` being the multiply-adds of one position through the
  decoder layers' linear layers (their weights' entries); an LM-head row costs ``2 * V * D``; backward is twice the
  forward, and activation checkpointing recomputes the forward once more;
- bytes: every pass over the model reads each weight once (a decode step, a micro-batch's forward; a backward
  counts as two passes: the weights read again and their gradients written);
- ``generation``: the prefill positions (each distinct prompt once with the shared prefix, else every row's prompt)
  and one decoder position and one LM-head row per sampled token; one pass per decode step;
- ``fixed_logprobs``: one forward per fixed pass (the old policy's when num_iterations > 1, the reference model's when
  beta > 0) over the update's decoder positions, with an LM-head row per updated completion token;
- ``forward_backward``: per optimizer step, forward + backward over the same positions and rows;
- ``optimizer``: bytes only: each updated entry's gradient read, its weight read and written, its optimizer state read
  and written (``OPTIMIZER_BYTES``).

Under torchrun each rank times its own share: the step's positions are divided by the world size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from rlvr_fast.benchmark.ceilings import Ceilings, measure_ceilings

FLOOR_PARTS = ("generation", "fixed_logprobs", "forward_backward", "optimizer")


@dataclass(frozen=True)
class ModelWork:
    """The matmul size of the policy: ``body`` multiply-adds per decoder position (the decoder layers' linear
    weights), ``head`` per LM-head row (V x D), and the element size of the weights its matmuls read (under autocast,
    the bf16 copies)."""

    body: int
    head: int
    weight_bytes: int

    @classmethod
    def of(cls, model: torch.nn.Module, compute_dtype: torch.dtype | None = None) -> ModelWork:
        """``model``'s matmul size; ``compute_dtype``: the dtype its matmuls read the weights in (default: theirs)."""
        decoder = getattr(model, model.base_model_prefix, model)
        layers = getattr(decoder, "layers", None)
        modules = layers.modules() if layers is not None else decoder.modules()
        body = sum(m.weight.numel() for m in modules if isinstance(m, torch.nn.Linear))
        head = model.get_output_embeddings().weight
        size = compute_dtype.itemsize if compute_dtype is not None else head.element_size()
        return cls(body=body, head=head.numel(), weight_bytes=size)


def _adamw_state_bytes(optimizer: torch.optim.Optimizer, entries: int) -> tuple[int, int]:
    # (updated entries, state bytes per entry read and written once each): exp_avg and exp_avg_sq in float32
    return entries, 2 * 4


def _sparse_adamw_state_bytes(optimizer, entries: int) -> tuple[int, int]:
    return optimizer.num_masked(), 2 * 4  # only the masked entries are read, updated and written


def _adamw8bit_state_bytes(optimizer, entries: int) -> tuple[int, int]:
    return entries, 2 * 1  # two 8-bit states (their block scales left out)


# optimizer name (RLVRConfig.optimizer) -> (optimizer, trainable entries) -> (updated entries, state bytes per entry)
OPTIMIZER_BYTES: dict[str, Callable[[torch.optim.Optimizer, int], tuple[int, int]]] = {
    "adamw": _adamw_state_bytes,
    "sparse_adamw": _sparse_adamw_state_bytes,
    "adamw8bit": _adamw8bit_state_bytes,
}


@dataclass(frozen=True)
class StepWork:
    """What one step computed, for this rank: decoder positions and LM-head rows of each part, optimizer steps."""

    prefill_positions: float
    sampled_tokens: float
    decode_steps: int  # the sampler's steps: the longest completion
    update_positions: float  # one pass over the update batch (the micro-batch plan's decoder positions)
    update_rows: float  # LM-head rows of one pass (the updated completion tokens)
    micro_batches: int  # of one pass over the update batch
    fixed_passes: int
    optimizer_steps: int
    recompute: bool  # activation checkpointing: one more forward in the backward


def part_costs(work: StepWork, model: ModelWork) -> dict[str, tuple[float, float]]:
    """(matmul FLOPs, bytes moved) of each part but the optimizer's (``optimizer_bytes``)."""
    weights = float((model.body + model.head) * model.weight_bytes)  # one pass reads every weight

    def forward(positions: float, rows: float) -> float:
        return 2.0 * (model.body * positions + model.head * rows)

    passes = 3 + (1 if work.recompute else 0)  # forward, backward (2x), the recomputed forward
    update_passes = work.optimizer_steps * passes
    return {
        "generation": (
            forward(work.prefill_positions + work.sampled_tokens, work.sampled_tokens),
            (1 + work.decode_steps) * weights,
        ),
        "fixed_logprobs": (
            work.fixed_passes * forward(work.update_positions, work.update_rows),
            work.fixed_passes * work.micro_batches * weights,
        ),
        "forward_backward": (
            update_passes * forward(work.update_positions, work.update_rows),
            update_passes * work.micro_batches * weights,
        ),
    }


def optimizer_bytes(name: str, optimizer: torch.optim.Optimizer, model: torch.nn.Module, steps: int) -> float:
    """Bytes the optimizer part moves in ``steps`` optimizer steps: per updated entry its gradient read, its weight
    read and written and its state read and written."""
    params = [p for p in model.parameters() if p.requires_grad]
    entries = sum(p.numel() for p in params)
    size = params[0].element_size() if params else 4
    if name not in OPTIMIZER_BYTES:
        raise ValueError(f"floor: no byte count for optimizer {name!r}; known: {sorted(OPTIMIZER_BYTES)}")
    updated, state = OPTIMIZER_BYTES[name](optimizer, entries)
    return float(steps * updated * (3 * size + 2 * state))


_CEILINGS: dict[tuple[str, torch.dtype], Ceilings] = {}


def ceilings_for(device: torch.device, dtype: torch.dtype) -> Ceilings:
    """The matmul rate in ``dtype`` and the copy bandwidth of ``device``, measured once per process (about 0.2 s on
    a CPU), so that every run of one process compares against the same machine."""
    key = (str(device), dtype)
    if key not in _CEILINGS:
        cpu = device.type == "cpu"
        _CEILINGS[key] = measure_ceilings(
            device,
            dtype=dtype,
            copy_bytes=(128 << 20) if cpu else None,
            matmul_n=1024 if cpu else None,
            min_time_s=0.05,
        )
    return _CEILINGS[key]


def floor_record(
    costs: dict[str, tuple[float, float]], optimizer_byte_count: float, seconds: dict[str, float], ceilings: Ceilings
) -> dict[str, float | None]:
    """``floor_<part>_s`` (the part's floor) and ``floor_fraction_<part>`` (floor / the part's measured seconds; None
    when the part took no time) for each of ``FLOOR_PARTS``; ``costs``: ``part_costs``; ``seconds``: the step
    timer's ``time_<part>_s``."""
    rate = ceilings.matmul_tflops * 1e12
    bandwidth = ceilings.copy_gbps * 1e9
    floors = {part: max(flops / rate, nbytes / bandwidth) for part, (flops, nbytes) in costs.items()}
    floors["optimizer"] = optimizer_byte_count / bandwidth
    out: dict[str, float | None] = {}
    for part in FLOOR_PARTS:
        took = seconds.get(f"time_{part}_s", 0.0)
        out[f"floor_{part}_s"] = floors[part]
        out[f"floor_fraction_{part}"] = floors[part] / took if took > 0 else None
    return out
