"""Data-parallel training on torch.distributed: ``torchrun --nproc_per_node=N -m rlvr_fast train ...`` (docs/design.md,
"Data parallelism").

Everything here rides on torch.distributed (FSDP2 ``fully_shard``, ``DistributedDataParallel``, collectives); nothing
is home-made but the bookkeeping of who holds which rows.

What each rank does in a step (``Trainer.train_step``):

- it generates WHOLE groups: the step's ``prompts_per_step`` prompts are split into ``world_size`` equal slices (a
  group never straddles ranks; ``prompts_per_step`` must divide by the world size), rank r sampling slice r with its
  own seed ``derived_seed(seed, "rollout", step, "rank", r)`` (one process keeps ``derived_seed(seed, "rollout",
  step)``: a world of N processes samples other completions of the same prompts than one process);
- the completions' texts are all-gathered and EVERY rank scores the whole step, computes the group advantages
  (``scale="batch"`` sees the whole batch) and the difficulty filter on it: identical on all ranks, equal to one
  process's on the same completions; each rank then keeps its own rows;
- the loss normalisers (``UpdateBatch.step_rows`` / ``step_tokens``, read through ``StepShare``) are the whole step's,
  all-reduced, divided by the world size P: DDP and FSDP2 AVERAGE the ranks' gradients, so each rank's loss is P times
  its share of the whole step's loss and the average is the one-process gradient (the convention of
  ``rlvr_fast.ops.loss_types``, "num_items", and of TRL's ``num_items_in_batch / num_processes``). Averaging, not
  summing, because DDP all-reduces the accumulated gradient after every micro-batch: an average of a gradient already
  equal on all ranks leaves it unchanged, a sum would count it P times;
- every forward/backward has collectives (DDP's all-reduce; FSDP's all-gathers and reduce-scatters), so every rank
  runs the same number of micro-batches: a rank whose micro-batch plan has fewer than the most loaded rank's appends
  filler micro-batches of one filler row each (loss mask 0, advantage 0: no gradient, and every loss type's partial
  normaliser is unchanged by rows without tokens, ``rlvr_fast.ops.loss_types``), trimmed and costed like any other
  (shared prefix or not);
- the metrics are global (sums and token-weighted means over ranks); only rank 0 writes metrics.jsonl, the
  evaluations, the report, checkpoints and the progress bar.

The model. The policy's forward in the update goes through one module, ``HiddenStates`` (decoder + LM head, whose
forward computes the last hidden states), which DDP wraps or which is FSDP2's root (each decoder layer its own FSDP
unit, the embeddings / final norm / LM head in the root's); ``model.hidden_states_pass`` routes the policy through it
(``route_hidden_states``), so DDP sees every forward and FSDP's root hooks run. The shared-prefix update
(``prefix_sharing.shared_prefix_hidden``) runs both of its decoder passes (the distinct prompts, recording each
layer's keys and values; then the completions against them) inside ONE forward of the wrapper: DDP's reducer sees one
forward per micro-batch and every parameter's gradient once (autograd sums a layer's two uses before its gradient hook
fires). Under FSDP2 each decoder layer then runs twice per forward; FSDP2 supports that (each call all-gathers the
layer and reshards it after; in the backward the completions' calls run first, then the prompts'), and because a
layer's parameters are used by both calls, autograd hands FSDP their gradient only after both backward calls: the
post-backward of the completions' call finds no gradient and only reshards, that of the prompts' call reduce-scatters
the whole gradient, once (tests/test_distributed.py counts it). The cost: each layer is all-gathered four times per
micro-batch (twice forward, twice backward) instead of twice, against fewer, cheaper micro-batches; no layer stays
unsharded longer than one call. The fused ops read the LM-head weight outside any forward: under FSDP the root's
parameters are unsharded for the duration of the update (``head_gathered``: ``unshard()``, no resharding between
micro-batches, ``reshard()`` after), and the weight's gradient goes through the root's reduce-scatter at the end of
each backward; the (tokens x vocab) logits are never formed. Generation and evaluation run with every FSDP unit
unsharded (``generation``): a decode step has no collective, so ranks that stop sampling at different steps cannot
deadlock.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import NoReturn

import torch

from rlvr_fast.ops.grpo_loss import TOKEN_MEAN_METRICS  # policy_step's per-token means, weighted by rank tokens
from rlvr_fast.trainer.config import RLVRConfig

PARALLEL_MODES = {
    "fsdp": "FSDP2 fully_shard: each decoder layer and the root (embeddings, final norm, LM head) sharded on dim 0",
    "ddp": "DistributedDataParallel: every rank holds the whole model, gradients all-reduced",
}
# optimizers that cannot step FSDP2's DTensor shards yet, and why
SHARDED_OPTIMIZERS_MISSING = {
    "adamw8bit": "bitsandbytes' 8-bit state is not DTensor-aware",
}
COLLECTIVE_TIMEOUT = timedelta(minutes=30)  # a rank that never joins a collective fails the others after this
# whether this process joined the default process group itself (DataParallel.from_environment): its gloo threads
# then live until the process ends (``exit_without_finalizing``)
_JOINED = {"group": False}


def environment_world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


class HiddenStates(torch.nn.Module):
    """The policy (a transformers causal LM) as one module whose forward computes its last hidden states: the unit DDP
    wraps and FSDP2's root. It holds the whole causal LM, so the LM head (tied or not) is among its parameters (DDP
    synchronises its gradient; FSDP shards it in the root's group).

    ``forward(compute, *inputs)`` returns ``compute(policy, *inputs)``: one decoder call
    (``model.decoder_hidden_states``) or the shared prefix's two (``prefix_sharing.shared_prefix_hidden``: the
    prompts, then the completions against their keys and values). Either way DDP and the FSDP root see ONE forward per
    micro-batch, with every decoder call inside it: DDP's reducer is armed for that forward's backward, FSDP's root
    hooks run around it, and each decoder layer's own FSDP hooks run at each of its calls."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.policy = model

    def forward(self, compute: Callable[..., torch.Tensor], *inputs) -> torch.Tensor:
        return compute(self.policy, *inputs)


def _decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    decoder = getattr(model, model.base_model_prefix)
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise ValueError(
            f"RLVRConfig.parallel='fsdp' shards each decoder layer, but {type(model).__name__}'s decoder has no "
            "'layers' list; use parallel='ddp'"
        )
    return list(layers)


class ReplicatedPolicy:
    """One process, or a model that needs no gradient synchronisation: nothing to wrap, nothing to gather."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def generation(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def head_gathered(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()


class ShardedCheckpointing:
    """The checkpoint methods of a policy under torchrun (``trainer/sharded_checkpoint.py``): each rank's own state
    dicts for torch.distributed.checkpoint, keyed by parameter name (``torch.distributed.checkpoint.state_dict``);
    under FSDP2 DTensors of the rank's shards, under DDP the plain (replicated) tensors. Nothing is gathered."""

    model: torch.nn.Module

    def checkpoint_state(self, optimizer, for_loading: bool = False) -> tuple[dict, dict | None]:
        """(model state dict, optimizer state dict) of this rank. The optimizer's is None while it holds no state
        (no step yet) unless ``for_loading``: torch builds a missing state with a zero-gradient step, which would
        advance Adam's step count of the live run; for loading, that state is the template the checkpoint fills."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        weights = get_model_state_dict(self.model)
        if not optimizer.state and not for_loading:
            return weights, None
        return weights, get_optimizer_state_dict(self.model, optimizer)

    def loaders(self, optimizer) -> tuple[Callable, Callable]:
        """How the state dicts ``checkpoint_state`` made (filled by torch.distributed.checkpoint) go back into the
        model and optimizer. Collective under FSDP2."""
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        def load_weights(weights: dict) -> None:
            set_model_state_dict(self.model, weights)

        def load_optimizer(state: dict) -> None:
            set_optimizer_state_dict(self.model, optimizer, state)

        return load_weights, load_optimizer


class DDPPolicy(ShardedCheckpointing, ReplicatedPolicy):
    """DDP over ``HiddenStates(model)``: the update's forwards go through it (``route_hidden_states``), its backward
    all-reduces (averages) the gradients."""

    def __init__(self, model: torch.nn.Module, device: torch.device):
        from torch.nn.parallel import DistributedDataParallel

        from rlvr_fast.trainer.model import route_hidden_states

        super().__init__(model)
        self.wrapped = DistributedDataParallel(
            HiddenStates(model),
            device_ids=[device.index] if device.type == "cuda" else None,
            forward_sync_buffers=False,  # buffers (rotary tables) are equal on every rank; no collective per forward
        )
        route_hidden_states(model, self.wrapped)


class FSDPPolicy(ShardedCheckpointing, ReplicatedPolicy):
    """FSDP2 over ``HiddenStates(model)``: ``fully_shard`` on each decoder layer, then on the wrapper (the root: the
    embeddings, final norm and LM head). Gradients are averaged over ranks (a SUM reduce-scatter, then a division:
    gloo has no AVG / PREMUL_SUM).
    ``mixed_precision``: the parameter dtype of the computation when it is not float32 (gradients reduced in float32).
    """

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype, device: torch.device, trainable: bool):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        from rlvr_fast.trainer.model import route_hidden_states

        super().__init__(model)
        mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype != torch.float32 else None
        kwargs = {"mp_policy": mp} if mp is not None else {}
        self.layers = [fully_shard(layer, **kwargs) for layer in _decoder_layers(model)]
        self.root = fully_shard(HiddenStates(model), **kwargs)
        if trainable:  # average the ranks' gradients as SUM, then divide (gloo has no AVG / PREMUL_SUM)
            for unit in self._units():
                unit.set_force_sum_reduction_for_comms(True)
        route_hidden_states(model, self.root)
        self._prefetch_in_backward_order()
        self._initialise_root(device)

    def _prefetch_in_backward_order(self) -> None:
        """Backward prefetches the layer before, explicitly. FSDP2's default follows its record of post-forward calls,
        which keeps the no-grad forwards of generation and of the old-policy pass until the next backward ends: layer
        0's backward then prefetched the last layer of the last decode step, an all-gather of one whole layer per step
        that nothing used (measured with benchmarks/bench_distributed.py). Layer 0 names the root, whose parameters
        the update holds gathered (``head_gathered``): its prefetch is a no-op, and an empty list would mean the
        default. With the shared prefix the backward runs the layers' completion calls, then their prompt calls: the
        last layer's prompt call is then gathered by its own pre-backward, not prefetched (the same bytes, counted by
        tests/test_fsdp_collectives.py)."""
        self.root.set_modules_to_backward_prefetch([self.layers[-1]] if self.layers else [])
        for before, layer in zip([self.root, *self.layers[:-1]], self.layers, strict=True):
            layer.set_modules_to_backward_prefetch([before])

    @torch.no_grad()
    def _initialise_root(self, device: torch.device) -> None:
        """One tiny forward through the root, so FSDP takes it as the root (FSDP2 picks the first module to run
        forward; generation calls the causal LM itself, whose layers would otherwise claim it). Collective."""
        from rlvr_fast.trainer.model import decoder_hidden_states

        ids = torch.zeros(1, 1, dtype=torch.long, device=device)
        self.root(decoder_hidden_states, ids, torch.ones_like(ids), torch.zeros_like(ids))
        self.root.reshard()

    def _units(self) -> list:
        return [*self.layers, self.root]

    @contextlib.contextmanager
    def generation(self) -> Iterator[None]:
        """Every unit unsharded for the block, none resharded after a forward: the causal LM runs as on one process,
        without a collective per decode step. Collective on entry (the all-gathers); all ranks must enter."""
        for unit in self.layers:
            unit.set_reshard_after_forward(False, recurse=False)
        for unit in self._units():
            unit.unshard()
        try:
            yield
        finally:
            for unit in self._units():
                unit.reshard()
            for unit in self.layers:
                unit.set_reshard_after_forward(True, recurse=False)

    @contextlib.contextmanager
    def head_gathered(self) -> Iterator[None]:
        """The root's parameters (embeddings, final norm, LM head) unsharded for the block and kept so through every
        micro-batch's backward, so that the fused ops read the whole LM-head weight; its gradient is reduce-scattered
        at the end of each backward (FSDP's root post-backward). Collective on entry."""
        self.root.set_reshard_after_backward(False, recurse=False)
        self.root.unshard()
        try:
            yield
        finally:
            self.root.reshard()
            self.root.set_reshard_after_backward(True, recurse=False)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's state dict (plain CPU tensors) on every rank. Collective."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=False))


def joined_process_group() -> bool:
    """Whether this process joined a process group (``DataParallel.from_environment``), destroyed since or not."""
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
    successful rank reported as failed (seen under load; tests/test_distributed.py,
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


@dataclass(frozen=True)
class DataParallel:
    """Who this process is in the run, and the collectives the trainer needs. ``world_size == 1``: every method is the
    identity (one process), so the training loop reads the same either way."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    mode: str | None = None  # "fsdp" | "ddp" with more than one process

    @classmethod
    def from_environment(cls, cfg: RLVRConfig) -> DataParallel:
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
        if not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
            _JOINED["group"] = True
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
        if not self.active:
            return ReplicatedPolicy(model)
        if self.mode == "fsdp":
            return FSDPPolicy(model, dtype, device, trainable)
        if not trainable:  # a frozen model under DDP: every rank holds it whole, nothing to synchronise
            return ReplicatedPolicy(model)
        return DDPPolicy(model, device)

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
        from rlvr_fast.trainer.micro_batches import row_micro_batches

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


def pad_update_batch(batch, rollout, rows: int):
    """``batch`` with filler rows appended up to ``rows``: copies of ``rollout``'s first completion with loss mask 0
    and advantage 0 (and old / reference log-probs 0 when the batch holds them). They add nothing to the loss or the
    gradient, and a loss type's partial normaliser is unchanged by rows without tokens (grpo / dr_grpo divide by the
    rows of the call and scale by its share of the step's rows: the two cancel), yet they make every rank run the same
    micro-batches, hence the same collectives."""
    from rlvr_fast.trainer.generation import Rollout

    missing = rows - len(batch.advantages)
    if missing <= 0:
        return batch
    filler = rollout.select(torch.zeros(missing, dtype=torch.long))
    ro = batch.rollout
    if len(batch.advantages):
        width_p = max(ro.prompt_ids.shape[1], filler.prompt_ids.shape[1])
        width_c = max(ro.completion_ids.shape[1], filler.completion_ids.shape[1])
        ro, filler = _widen(ro, width_p, width_c), _widen(filler, width_p, width_c)
        merged = Rollout(
            prompt_ids=torch.cat([ro.prompt_ids, filler.prompt_ids]),
            prompt_mask=torch.cat([ro.prompt_mask, filler.prompt_mask]),
            completion_ids=torch.cat([ro.completion_ids, filler.completion_ids]),
            completion_mask=torch.cat([ro.completion_mask, filler.completion_mask]),
            truncated=torch.cat([ro.truncated, filler.truncated]),
            texts=ro.texts + filler.texts,
        )
    else:
        merged = filler
    lc = merged.completion_ids.shape[1]

    def grow(t: torch.Tensor | None, fill_rows: int) -> torch.Tensor | None:
        if t is None:
            return None
        t = torch.nn.functional.pad(t, (0, lc - t.shape[1])) if t.dim() == 2 else t
        shape = (fill_rows, *t.shape[1:])
        return torch.cat([t, t.new_zeros(shape)])

    return replace(
        batch,
        rollout=merged,
        advantages=grow(batch.advantages, missing),
        loss_mask=grow(batch.loss_mask, missing),
        old_logp=grow(batch.old_logp, missing),
        ref_logp=grow(batch.ref_logp, missing),
    )


def _widen(ro, prompt_width: int, completion_width: int):
    """``ro`` left-padded to ``prompt_width`` prompt columns and right-padded to ``completion_width`` completion
    columns (mask 0 on the padding; the token id of the padding is never read)."""
    from torch.nn.functional import pad

    from rlvr_fast.trainer.generation import Rollout

    dp, dc = prompt_width - ro.prompt_ids.shape[1], completion_width - ro.completion_ids.shape[1]
    return Rollout(
        prompt_ids=pad(ro.prompt_ids, (dp, 0)),
        prompt_mask=pad(ro.prompt_mask, (dp, 0)),
        completion_ids=pad(ro.completion_ids, (0, dc)),
        completion_mask=pad(ro.completion_mask, (0, dc)),
        truncated=ro.truncated,
        texts=ro.texts,
    )
