"""How the policy and the reference model are wrapped for a run: as they are on one process, DDP or FSDP2 under
torchrun (docs/design.md, "Data parallelism", the model).

The policy's forward in the update goes through one module, ``HiddenStateForward`` (decoder + LM head, whose forward
computes the last hidden states), which DDP wraps or which is FSDP2's root (each decoder layer its own FSDP unit, the
embeddings / final norm / LM head in the root's); ``model.hidden_states_pass`` routes the policy through it
(``route_hidden_states``), so DDP sees every forward and FSDP's root hooks run. The shared-prefix update runs both of
its decoder passes inside ONE forward of the wrapper. The fused ops read the LM-head weight outside any forward: under
FSDP the root's parameters are unsharded for the duration of the update (``head_gathered``). Generation and
evaluation run with every FSDP unit unsharded (``generation``): a decode step has no collective, so ranks that stop
sampling at different steps cannot deadlock. docs/design.md gives the reasons and the costs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

PARALLEL_MODES = {
    "fsdp": "FSDP2 fully_shard: each decoder layer and the root (embeddings, final norm, LM head) sharded on dim 0",
    "ddp": "DistributedDataParallel: every rank holds the whole model, gradients all-reduced",
}


class HiddenStateForward(torch.nn.Module):
    """The policy (a transformers causal LM) as one module whose forward computes its last hidden states: the unit DDP
    wraps and FSDP2's root. It holds the whole causal LM, so the LM head (tied or not) is among its parameters (DDP
    synchronises its gradient; FSDP shards it in the root's group).

    ``forward(compute, *inputs)`` returns ``compute(policy, *inputs)``: one decoder call
    (``model.decoder_hidden_states``) or the shared prefix's two (``shared_prefix_forward.shared_prefix_hidden``: the
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


class UnwrappedPolicy:
    """One process, or a model that needs no gradient synchronisation: nothing to wrap, nothing to gather."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def generation(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def head_gathered(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()


class ShardedStateDicts:
    """The checkpoint methods of a policy under torchrun (``trainer/checkpoint/sharded.py``): each rank's own state
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


class DDPPolicy(ShardedStateDicts, UnwrappedPolicy):
    """DDP over ``HiddenStateForward(model)``: the update's forwards go through it (``route_hidden_states``), its
    backward all-reduces (averages) the gradients."""

    def __init__(self, model: torch.nn.Module, device: torch.device):
        from torch.nn.parallel import DistributedDataParallel

        from rlvr_fast.trainer.model import route_hidden_states

        super().__init__(model)
        self.wrapped = DistributedDataParallel(
            HiddenStateForward(model),
            device_ids=[device.index] if device.type == "cuda" else None,
            forward_sync_buffers=False,  # buffers (rotary tables) are equal on every rank; no collective per forward
        )
        route_hidden_states(model, self.wrapped)


class FSDPPolicy(ShardedStateDicts, UnwrappedPolicy):
    """FSDP2 over ``HiddenStateForward(model)``: ``fully_shard`` on each decoder layer, then on the wrapper (the root:
    the embeddings, final norm and LM head). Gradients are averaged over ranks (a SUM reduce-scatter, then a division:
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
        self.root = fully_shard(HiddenStateForward(model), **kwargs)
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
        tests/distributed/test_fsdp_collectives.py)."""
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


def wrap_policy(model: torch.nn.Module, mode: str | None, dtype: torch.dtype, device: torch.device, trainable: bool):
    """The policy (``trainable``) or the frozen reference model as run mode ``mode`` wraps it: ``None`` (one
    process): as it is; "fsdp": FSDP2; "ddp": DDP, or as it is when frozen (every rank holds it whole, nothing to
    synchronise)."""
    if mode is None:
        return UnwrappedPolicy(model)
    if mode == "fsdp":
        return FSDPPolicy(model, dtype, device, trainable)
    if not trainable:
        return UnwrappedPolicy(model)
    return DDPPolicy(model, device)
