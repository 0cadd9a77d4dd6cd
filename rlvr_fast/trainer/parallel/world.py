"""Who this process is in a run (one process, or a rank of a torchrun world) and the step's data-parallel
bookkeeping: which rows are this rank's, the gathers and sums the step needs, equal micro-batch counts on every rank
(docs/design.md, "Data parallelism").

In a step each rank generates whole groups of an equal share of the prompts, every rank scores the whole step, and the
loss normalisers are the whole step's divided by the world size P (DDP and FSDP2 average the ranks' gradients, so the
average is the one-process gradient).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from rlvr_fast.ops.grpo_loss import TOKEN_MEAN_METRICS  # policy_step's per-token means, weighted by rank tokens
from rlvr_fast.trainer.config import RLVRConfig
from rlvr_fast.trainer.parallel.collectives import (
    all_gather_objects,
    broadcast_from_main,
    environment_world_size,
    join_process_group,
)
from rlvr_fast.trainer.parallel.filler import pad_update_batch
from rlvr_fast.trainer.parallel.wrappers import wrap_policy

# optimizers that cannot step FSDP2's DTensor shards yet, and why
SHARDED_OPTIMIZERS_MISSING = {
    "adamw8bit": "bitsandbytes' 8-bit state is not DTensor-aware",
}


@dataclass(frozen=True)
class TrainingWorld:
    """Who this process is in the run, and the collectives the trainer needs. ``world_size == 1``: every method is the
    identity (one process), so the training loop reads the same either way."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    mode: str | None = None  # "fsdp" | "ddp" with more than one process

    @classmethod
    def from_environment(cls, cfg: RLVRConfig) -> TrainingWorld:
        """One process unless torchrun (or a test harness) set WORLD_SIZE > 1; then join (or reuse) the default
        process group: nccl with CUDA, gloo on the CPU; a CUDA process uses device LOCAL_RANK. Refuses a step whose
        prompts do not split into whole groups per rank."""
        world = environment_world_size()
        if world <= 1:
            return cls()
        import torch.distributed as dist

        from rlvr_fast.trainer.model import resolve_device

        if cfg.prompts_per_step % world:
            raise ValueError(
                f"RLVRConfig.prompts_per_step ({cfg.prompts_per_step}) must divide by the world size ({world}): each "
                f"rank generates whole groups of an equal share of the step's prompts"
            )
        if cfg.parallel == "fsdp" and cfg.optimizer in SHARDED_OPTIMIZERS_MISSING:
            raise ValueError(
                f"RLVRConfig.optimizer={cfg.optimizer!r} does not run on FSDP-sharded parameters yet "
                f"({SHARDED_OPTIMIZERS_MISSING[cfg.optimizer]}); use parallel='ddp' or optimizer='adamw'"
            )
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = resolve_device(cfg.device)
        if device.type == "cuda":
            torch.cuda.set_device(local_rank)
        join_process_group("nccl" if device.type == "cuda" else "gloo")
        if dist.get_world_size() != world:
            raise RuntimeError(f"WORLD_SIZE is {world} but the process group has {dist.get_world_size()} ranks")
        return cls(world_size=world, rank=dist.get_rank(), local_rank=local_rank, mode=cfg.parallel)

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ---- the model ---------------------------------------------------------------------------------------------------

    def wrap(self, model: torch.nn.Module, dtype: torch.dtype, device: torch.device, trainable: bool = True):
        """The policy (``trainable``) or the frozen reference model, as this run's mode wraps it (module doc)."""
        return wrap_policy(model, self.mode if self.active else None, dtype, device, trainable)

    # ---- the step's data ---------------------------------------------------------------------------------------------

    def local(self, items: list) -> list:
        """This rank's equal, contiguous share of ``items`` (the step's prompts)."""
        return items[self.rows(len(items))]

    def rows(self, n: int) -> slice:
        """This rank's contiguous share of ``n`` items, prompt-major (``n`` divides by the world size)."""
        share = n // self.world_size
        return slice(self.rank * share, (self.rank + 1) * share)

    def gather_list(self, items: list) -> list:
        """The ranks' lists concatenated in rank order (all-gather of Python objects)."""
        if not self.active:
            return list(items)
        return [x for part in all_gather_objects(list(items)) for x in part]

    def gather_dict(self, local: dict) -> dict:
        """The union of the ranks' dicts (keys disjoint)."""
        if not self.active:
            return dict(local)
        return {k: v for part in all_gather_objects(local) for k, v in part.items()}

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sums over ranks (float64 all-reduce)."""
        if not self.active:
            return [float(v) for v in values]
        import torch.distributed as dist

        t = torch.tensor([float(v) for v in values], dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def max(self, value: int) -> int:
        if not self.active:
            return int(value)
        import torch.distributed as dist

        t = torch.tensor([int(value)], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t)

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()

    def main_decides(self, fn: Callable[[], object]):
        """``fn()`` on rank 0 only, its value broadcast to every rank. For what only one process may do to the file
        system (preparing the output folder) or need do (choosing and verifying the checkpoint to resume: one rank
        reads and hashes every file, not each of them). A rank 0 that raises ends the job (torchrun stops the
        others)."""
        value = fn() if self.is_main else None
        return broadcast_from_main(value) if self.active else value

    def global_update_batch(self, batch, rollout):
        """(``batch`` with the whole step's normalisers divided by the world size (the ranks' gradients are averaged:
        module doc), the step's global counts of the batch: rows updated, rows and tokens skipped). A rank without an
        update row in a step that has some gets one filler row (the source of its filler micro-batches,
        ``equal_micro_batches``). One process: ``batch`` unchanged."""
        counts = self.sum([len(batch.advantages), batch.step_rows, batch.step_tokens, batch.skipped_rows,
                           batch.skipped_tokens])  # fmt: skip
        stats = {
            "completions_updated": int(counts[0]),
            "skipped_rows": int(counts[3]),
            "skipped_tokens": counts[4],
        }
        if not self.active:
            return batch, stats
        batch = replace(batch, step_rows=counts[1] / self.world_size, step_tokens=counts[2] / self.world_size)
        if counts[0] > 0 and len(batch.advantages) == 0:
            batch = pad_update_batch(batch, rollout, 1)
        return batch, stats

    def equal_micro_batches(self, batch, plan):
        """(``batch``, ``plan``) with filler micro-batches appended (a filler row each: ``pad_update_batch``) up to the
        most micro-batches any rank has, so that every rank runs the same forwards and backwards, hence the same
        collectives. One process: unchanged."""
        if not self.active:
            return batch, plan
        missing = self.max(len(plan.parts)) - len(plan.parts)
        if missing <= 0:
            return batch, plan
        from rlvr_fast.trainer.update.micro_batches import row_micro_batches

        n = len(batch.advantages)
        batch = pad_update_batch(batch, batch.rollout, n + missing)
        rows = list(range(n, n + missing))
        fillers = row_micro_batches(batch.rollout, rows, shared_prefix=plan.shared_prefix)
        return batch, replace(plan, parts=[*plan.parts, *fillers])

    def reduce_plan_metrics(self, metrics: dict) -> dict:
        """``MicroBatchPlan.metrics`` over all ranks: decoder positions summed, the padding fraction of the sum;
        ``micro_batches`` is each rank's count (equal on all ranks, fillers included)."""
        if not self.active:
            return metrics
        computed = metrics["decoder_tokens"]
        total, unshared, padded = self.sum([computed, metrics["decoder_tokens_unshared"],
                                            metrics["padding_fraction"] * computed])  # fmt: skip
        return dict(
            metrics,
            decoder_tokens=int(total),
            decoder_tokens_unshared=int(unshared),
            padding_fraction=padded / total if total else 0.0,
        )

    def reduce_update_metrics(self, out: dict) -> dict:
        """An optimizer step's metrics over all ranks: the loss (each rank's is P times its share: the mean over ranks)
        and the tokens summed, the per-token means weighted by each rank's tokens (``policy_step``'s own weighting)."""
        if not self.active:
            return out
        # The same vector on every rank: a rank that ran only filler rows has no token means (tokens 0)
        keys = TOKEN_MEAN_METRICS
        tokens = out.get("tokens_updated", 0.0)
        weighted = [out[k] * tokens if k in out else 0.0 for k in keys]
        present = [1.0 if k in out else 0.0 for k in keys]
        summed = self.sum([out["loss"], tokens, *weighted, *present])
        result = dict(out, loss=summed[0] / self.world_size, tokens_updated=summed[1])
        for i, k in enumerate(keys):
            if summed[2 + len(keys) + i] > 0:  # some rank computed it
                result[k] = summed[2 + i] / summed[1] if summed[1] else 0.0
        return result
