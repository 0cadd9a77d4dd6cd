"""The cost and the shape of each arm's update: full AdamW vs SparseAdamW masks vs LoRA (preset ``update-modes-quick``).

Per run, after training (``record_resources``, written as ``resources.json`` beside the run's metrics): the trained
entries (what the optimizer writes: every entry of a full run, the masked entries of a SparseAdamW run, the adapter's
A/B matrices of a LoRA run; ``trainable_parameters`` counts the tensors with requires_grad, which a mask does not
shrink), the optimizer-state bytes measured from the optimizer's own state tensors at the end of training (torch
AdamW: two float32 moments per parameter and a step; SparseAdamW: two float32 moments and an int32 index per masked
entry; LoRA: AdamW over the adapter's A/B matrices only), the peak memory and the mean step time from the run's
``metrics.jsonl``.

What the update is: a full or masked run changes the weights themselves; a LoRA run leaves them frozen and applies
``scale * B @ A`` beside each adapted Linear. ``trained_weights`` gives the model's weights under the base model's
names, with each adapted weight merged as ``W + scale * B @ A`` (computed in float64, so that the difference with the
base is the adapter's product, not float32 rounding of W), so that ``updates.record_update`` compares every arm the
same way. With ``rank=True`` it also stores each 2-D tensor's effective rank (``optim.update_effective_rank``) and
numerical rank ratio (``optim.update_rank_ratio``) of that difference; a LoRA update of rank r has effective rank at
most r.

``update_modes`` (analysis) summarises per arm, ``update_modes_section`` writes the report's section.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping

import torch

from rlvr_fast.optim import SparseAdamW
from rlvr_fast.trainer.adapters.layers import lora_layers, merged_weight

__all__ = [
    "RESOURCES_FILE",
    "optimizer_state_bytes",
    "record_resources",
    "trained_weights",
    "update_modes",
    "update_modes_section",
]

RESOURCES_FILE = "resources.json"


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in ``optimizer.state`` (moments, steps, SparseAdamW's indices), each storage counted
    once (SparseAdamW's per-parameter tensors are disjoint views of flat buffers, so their sizes add up)."""
    total = 0
    for entry in optimizer.state.values():
        for value in entry.values():
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
    return total


def trained_weights(trainer) -> dict[str, torch.Tensor]:
    """The trained model's parameters under the base model's names: the parameters themselves for a full or masked
    run; for a LoRA run the frozen weights with each adapted one merged (``W + scale * B @ A`` in float64), the
    adapter's own A/B matrices left out."""
    model = trainer.model
    adapter = getattr(trainer, "adapter", None)
    if adapter is None:
        return {n: p.detach() for n, p in model.named_parameters()}
    out = {n.replace(".base_layer.", "."): p.detach() for n, p in model.named_parameters() if ".lora_" not in n}
    for name, layer in lora_layers(model):
        out[f"{name}.weight"] = merged_weight(layer, dtype=torch.float64)
    return out


def record_resources(trainer, metrics: list[dict], run_dir: str) -> dict:
    """Write ``resources.json`` into ``run_dir`` and return it: what the run trained, the bytes its optimizer keeps,
    its peak memory (the largest ``peak_memory_bytes`` of its steps: on a GPU the allocator's peak, on Linux the peak
    RSS, each reset before the run by ``reporting.log.reset_peak_memory``; elsewhere the process's peak RSS) and its
    mean step seconds."""
    cfg = trainer.cfg
    steps = [m for m in metrics if "seconds" in m and "reward_mean" in m]
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    # a SparseAdamW run computes gradients for whole tensors but writes only its masked entries
    trained = trainer.optimizer.num_masked() if isinstance(trainer.optimizer, SparseAdamW) else trainable
    peaks = [int(m["peak_memory_bytes"]) for m in steps if "peak_memory_bytes" in m]
    out = {
        "optimizer": cfg.optimizer,
        "mask_source": cfg.mask_source,
        "adapter": cfg.adapter,
        "lora_rank": cfg.lora_rank if cfg.adapter != "none" else None,
        "trainable_parameters": trainable,
        "trained_entries": trained,
        "total_parameters": sum(p.numel() for p in trainer.model.parameters()),
        "optimizer_state_bytes": optimizer_state_bytes(trainer.optimizer),
        "peak_memory_bytes": max(peaks, default=None),
        "mean_step_seconds": sum(m["seconds"] for m in steps) / len(steps) if steps else None,
        "steps": len(steps),
        "device": str(trainer.loaded.device),
    }
    tmp = os.path.join(run_dir, RESOURCES_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(out, f)
    os.replace(tmp, os.path.join(run_dir, RESOURCES_FILE))
    return out


def _mean(values: list[float]) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return sum(values) / len(values) if values else float("nan")


def _ranks(update: Mapping) -> dict:
    """Mean effective rank and rank ratio of the update's 2-D tensors, by tensor kind and overall (None when the
    update was recorded without ranks)."""
    tensors = {n: t for n, t in update["tensors"].items() if "effective_rank" in t}
    if not tensors:
        return {}
    kinds: dict[str, list[dict]] = {}
    for t in tensors.values():
        kinds.setdefault(t["kind"], []).append(t)
    return {
        "overall": {
            "effective_rank": _mean([t["effective_rank"] for t in tensors.values()]),
            "rank_ratio": _mean([t["rank_ratio"] for t in tensors.values()]),
            "tensors": len(tensors),
        },
        "by_kind": {
            k: {
                "effective_rank": _mean([t["effective_rank"] for t in ts]),
                "rank_ratio": _mean([t["rank_ratio"] for t in ts]),
                "tensors": len(ts),
            }
            for k, ts in sorted(kinds.items())
        },
    }


def update_modes(runs) -> dict:
    """Per finished run (analysis ``_Run``s): its resources, unchanged fractions and ranks; {} when no run recorded
    resources. {"runs": {key: {"arm", "seed", "trained_entries", "trainable_parameters", "optimizer_state_bytes",
    "peak_memory_bytes", "mean_step_seconds", "unchanged": {dtype: frac}, "rank": {...}}}}."""
    out: dict = {"runs": {}}
    for r in runs:
        path = os.path.join(r.spec.run_dir, RESOURCES_FILE)
        if not r.done or not os.path.exists(path):
            continue
        with open(path) as f:
            res = json.load(f)
        out["runs"][r.key] = {
            "arm": r.arm,
            "seed": r.seed,
            **res,
            "unchanged": r.update["overall"],
            "rank": _ranks(r.update),
        }
    return out if out["runs"] else {}


def _mb(x) -> str:
    return "n/a" if x is None else f"{x / 1e6:.2f}"


def _num(x, fmt: str = ".2f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def update_modes_section(fnd: Mapping) -> list[str]:
    """The report's "Update modes" section: one row per run, then the mean effective rank by tensor kind."""
    if not fnd or not any(r["rank"] for r in fnd.get("runs", {}).values()):
        return []  # only the presets that record update ranks (StudyPreset.update_rank) get the section
    runs = fnd["runs"]
    lines = [
        "## Update modes: what each arm trains, what it costs, and the rank of its update",
        "",
        "Trained entries are the weights the optimizer writes (all of them for full AdamW, the mask's for "
        "SparseAdamW, the adapter's A/B matrices for LoRA). "
        "Optimizer-state bytes are measured from the optimizer's state tensors at the end of training; peak memory "
        "is the largest of the run's steps (on the CPU the process's peak RSS since the run started: it includes the "
        "base weights the study keeps for every run); unchanged = entries equal to the base in float32 / after "
        "bfloat16 rounding; the rank columns are "
        "the mean over the 2-D weights of the effective rank (exp of the entropy of the normalised singular values) "
        "and of the numerical rank / min(m, n) of the applied update (for LoRA the merged scale * B @ A).",
        "",
        "| run | trained entries | optimizer state (MB) | peak memory (MB) | mean step (s) | unchanged fp32 | "
        "unchanged bf16 | mean effective rank | mean rank ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, r in runs.items():
        overall = r["rank"].get("overall", {})
        lines.append(
            f"| {key} | {r['trained_entries']:,} | {_mb(r['optimizer_state_bytes'])} | "
            f"{_mb(r['peak_memory_bytes'])} | {_num(r['mean_step_seconds'])} | "
            f"{_num(r['unchanged'].get('float32'), '.3f')} | "
            f"{_num(r['unchanged'].get('bfloat16'), '.3f')} | {_num(overall.get('effective_rank'))} | "
            f"{_num(overall.get('rank_ratio'), '.3f')} |"
        )
    kinds = sorted({k for r in runs.values() for k in r["rank"].get("by_kind", {})})
    if kinds:
        lines += ["", "Mean effective rank of the update by tensor kind:", ""]
        lines += ["| kind | " + " | ".join(runs) + " |", "|---|" + "---|" * len(runs)]
        for kind in kinds:
            cells = [_num(r["rank"].get("by_kind", {}).get(kind, {}).get("effective_rank")) for r in runs.values()]
            lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    return lines + [""]
