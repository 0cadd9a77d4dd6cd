"""SparseAdamW under FSDP2: 2 gloo processes against one process.

What is proved, in one spawned world (tests/helpers/gloo_world.py) per test:
- a few steps on a ``fully_shard``-ed tiny model (real FSDP2 gradients: reduce-scatter of the two half batches) equal
  the same steps on the whole batch in one process (fp32 tolerance), with the torch path and the Triton kernel;
- with the same gradients given to both (bf16 and fp32 parameters), the sharded steps equal the one-process steps bit
  for bit, and unmasked entries stay bit-identical;
- the odd cases: dim 0 not divisible by the world size, a parameter whose local piece is empty (shape (1, n) over 2
  ranks), one whose local piece is fully unmasked, an all-True mask (dense), an all-False mask (frozen);
- the optimizer state holds only the rank's local masked entries;
- optimizer state saved through torch.distributed.checkpoint (get/set_optimizer_state_dict) at world size 2 resumes at
  world size 1 and the reverse, and mask files written at one world size load at the other;
- GradSaliency over the sharded gradients picks, on every rank, the full masks one process picks.
"""

from __future__ import annotations

import torch
import torch.distributed.checkpoint as dcp
from helpers.gloo_world import run_world
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from rlvr_fast.optim import GradSaliency, SparseAdamW, load_masks, save_masks
from rlvr_fast.optim.sharding import full_tensor, like_sharded, local_part, local_tensor

WORLD = 2
STEPS = 3
BATCH = 8  # global batch; each rank takes BATCH // WORLD rows
HYPER = dict(lr=3e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)


class Tiny(nn.Module):
    """Odd shapes on purpose: dim 0 of 11 and 7 does not divide by 2; ``one`` (1, 5) leaves rank 1 an empty piece."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.hidden = nn.Linear(6, 7)
        self.out = nn.Linear(7, 3)
        self.one = nn.Parameter(torch.randn(1, 5))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.hidden(self.embed(ids)))
        return (self.out(h) - 0.5).pow(2).mean() + 0.1 * (self.one - 1.0).pow(2).sum()


def build_model(seed: int, dtype=torch.float32) -> Tiny:
    torch.manual_seed(seed)
    return Tiny().to(dtype)


def build_masks(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Full-shape masks: random, one with rank 1's rows (4..6 of 7) all unmasked, all-True, all-False, one whose
    only kept entries sit on rank 0 (rank 1's piece of ``one`` is empty)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    masks = {
        "embed.weight": torch.rand(shapes["embed.weight"], generator=gen) < 0.4,
        "hidden.weight": torch.rand(shapes["hidden.weight"], generator=gen) < 0.5,
        "out.weight": torch.ones(shapes["out.weight"], dtype=torch.bool),  # all True: dense
        "out.bias": torch.zeros(shapes["out.bias"], dtype=torch.bool),  # all False: frozen
        "one": torch.rand(shapes["one"], generator=gen) < 0.6,
    }  # hidden.bias: no mask (dense)
    masks["hidden.weight"][4:] = False  # rank 1's rows: its local piece is fully unmasked
    masks["hidden.weight"][0, 0] = True
    masks["one"][0, 0] = True
    return masks


def global_batch(step: int) -> torch.Tensor:
    return torch.randint(0, 11, (BATCH, 4), generator=torch.Generator().manual_seed(100 + step))


def shard(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    fully_shard(model.hidden)
    fully_shard(model)
    return model


def full_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: full_tensor(p.detach()).clone() for n, p in model.named_parameters()}


def train_steps(model, opt, steps, rank=0, world=1):
    losses = []
    for step in steps:
        rows = BATCH // world
        ids = global_batch(step)[rank * rows : (rank + 1) * rows]
        loss = model(ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = loss.detach().clone()
        if world > 1:
            torch.distributed.all_reduce(loss)
            loss /= world
        losses.append(float(loss))
    return losses


def checkpoint(model, opt) -> dict:
    return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}


def restore(model, opt, path) -> None:
    state = checkpoint(model, opt)
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])


def sharded_training_on_rank(rank, world, workdir, backends):
    """Per backend: STEPS steps on the FSDP2 model, a DCP checkpoint after step 2; then the ws-1 checkpoint resumed
    for the last step. Also the local state sizes and the unmasked entries' bits."""
    masks = load_masks(f"{workdir}/masks_ws1.safetensors")  # written by the one-process side
    out = {"runs": {}}
    for backend in backends:
        model = shard(build_model(seed=0))
        before = {n: local_tensor(p).detach().clone() for n, p in model.named_parameters()}
        opt = SparseAdamW(model.named_parameters(), masks, backend=backend, **HYPER)
        assert opt.state_layout == "full"
        losses = train_steps(model, opt, range(2), rank, world)
        if backend == backends[0]:
            dcp.save(checkpoint(model, opt), checkpoint_id=f"{workdir}/ws2")
        losses += train_steps(model, opt, range(2, STEPS), rank, world)
        unmasked_same = {}
        for n, p in model.named_parameters():
            keep = local_part(masks[n], p) if n in masks else torch.ones_like(before[n], dtype=torch.bool)
            unmasked_same[n] = torch.equal(local_tensor(p).detach()[~keep], before[n][~keep])
        out["runs"][backend] = {"losses": losses, "params": full_params(model), "unmasked_same": unmasked_same}
        out["num_masked"] = opt.num_masked()
        out["local_numel"] = {n: local_tensor(p).numel() for n, p in model.named_parameters()}
        out["state_sizes"] = {n: opt.state[p]["exp_avg"].numel() for n, p in model.named_parameters() if p in opt.state}
        if backend == backends[0]:
            full_osd = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))
            out["full_osd_masks"] = {n: s["mask"].clone() for n, s in full_osd["state"].items() if "mask" in s}

    # The one-process checkpoint (saved after step 2), resumed here at world size 2 for the last steps.
    model = shard(build_model(seed=1))  # other weights: the checkpoint must overwrite them
    opt = SparseAdamW(model.named_parameters(), masks, **HYPER)
    restore(model, opt, f"{workdir}/ws1")
    out["resumed_from_ws1"] = train_steps(model, opt, range(2, STEPS), rank, world)
    out["resumed_from_ws1_params"] = full_params(model)

    # A mask file written here (from DTensor masks, gathered; rank 0 writes) for the one-process side.
    params = dict(model.named_parameters())
    dtensor_masks = {n: like_sharded(local_part(m, params[n]), params[n]) for n, m in masks.items()}
    out["num_masked_from_dtensor_masks"] = SparseAdamW(model.named_parameters(), dtensor_masks).num_masked()
    out["errors"] = errors = {}
    try:  # a mask of the local shape, not the full one
        SparseAdamW(
            model.named_parameters(), {"embed.weight": local_part(masks["embed.weight"], params["embed.weight"])}
        )
    except ValueError as exc:
        errors["local_mask"] = str(exc)
    sharded_opt = SparseAdamW(model.named_parameters(), masks, state_layout="full")
    compact_state = SparseAdamW(full_params(model).values(), list(masks.get(n) for n in params)).state_dict()
    try:  # the rank-local compact layout cannot be loaded by a sharded optimizer
        sharded_opt.load_state_dict(compact_state)
    except ValueError as exc:
        errors["compact_into_sharded"] = str(exc)
    try:
        SparseAdamW(model.named_parameters(), masks, state_layout="compact")
    except ValueError as exc:
        errors["compact_layout"] = str(exc)
    save_masks(dtensor_masks, f"{workdir}/masks_ws2.safetensors")
    return out


def test_fsdp2_sparse_adamw_matches_one_process_and_resumes_across_world_sizes(tmp_path):
    workdir = str(tmp_path)
    model = build_model(seed=0)
    masks = build_masks(model, seed=7)
    save_masks(masks, f"{workdir}/masks_ws1.safetensors")

    # One process, the whole batch: the reference, and a checkpoint after step 2 in the world-size independent layout.
    opt = SparseAdamW(model.named_parameters(), masks, backend="torch", state_layout="full", **HYPER)
    ref_losses = train_steps(model, opt, range(2))
    dcp.save(checkpoint(model, opt), checkpoint_id=f"{workdir}/ws1")
    ref_losses += train_steps(model, opt, range(2, STEPS))
    ref_params = full_params(model)

    backends = ("torch", "triton")
    ranks = run_world(sharded_training_on_rank, world_size=WORLD, args=(workdir, backends), timeout=300)

    for backend in backends:
        for rank, out in enumerate(ranks):
            run = out["runs"][backend]
            torch.testing.assert_close(torch.tensor(run["losses"]), torch.tensor(ref_losses), rtol=1e-5, atol=1e-6)
            for name, expected in ref_params.items():
                torch.testing.assert_close(run["params"][name], expected, rtol=1e-5, atol=1e-6, msg=name)
            assert all(run["unmasked_same"].values()), (backend, rank, run["unmasked_same"])

    # State only for the rank's local masked entries (dense parameters: their whole local piece; frozen: none).
    for rank, out in enumerate(ranks):
        expected_sizes = {}
        for name, p in model.named_parameters():
            chunk = -(-p.shape[0] // WORLD)
            local_rows = slice(rank * chunk, min((rank + 1) * chunk, p.shape[0]))
            mask = masks.get(name)
            if mask is None or bool(mask.all()):
                expected_sizes[name] = p[local_rows].numel()
            elif bool(mask.any()):
                expected_sizes[name] = int(mask[local_rows].sum())
        assert out["state_sizes"] == expected_sizes, (rank, out["state_sizes"], expected_sizes)
        assert out["num_masked"] == sum(expected_sizes.values())
    assert ranks[1]["local_numel"]["one"] == 0 and ranks[1]["state_sizes"]["one"] == 0  # the empty piece
    assert ranks[1]["state_sizes"]["hidden.weight"] == 0  # the fully unmasked piece
    for name, mask in ranks[0]["full_osd_masks"].items():  # the gathered (full_state_dict) layout: full masks
        assert torch.equal(mask, masks[name]), name

    # World size 1 -> 2: the one-process checkpoint resumed on 2 ranks gives the uninterrupted run's last step.
    for out in ranks:
        torch.testing.assert_close(torch.tensor(out["resumed_from_ws1"]), torch.tensor(ref_losses[2:]))
        for name, expected in ref_params.items():
            torch.testing.assert_close(out["resumed_from_ws1_params"][name], expected, rtol=1e-5, atol=1e-6)

    # World size 2 -> 1: the sharded checkpoint resumed in one process (full layout: the DCP template has full shapes).
    model = build_model(seed=1)
    opt = SparseAdamW(model.named_parameters(), masks, backend="torch", state_layout="full", **HYPER)
    restore(model, opt, f"{workdir}/ws2")
    resumed = train_steps(model, opt, range(2, STEPS))
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(ref_losses[2:]), rtol=1e-5, atol=1e-6)
    for name, expected in ref_params.items():
        torch.testing.assert_close(model.get_parameter(name).detach(), expected, rtol=1e-5, atol=1e-6, msg=name)

    # DTensor masks (sharded like the parameters) work as the full ones; bad input is named.
    for out in ranks:
        assert out["num_masked_from_dtensor_masks"] == out["num_masked"]
        errors = out["errors"]
        assert "must have the parameter's full shape (11, 6)" in errors["local_mask"], errors
        assert "compact (rank-local indices)" in errors["compact_into_sharded"], errors
        assert "state_layout='compact' with DTensor" in errors["compact_layout"], errors

    # Mask files: the one written at world size 2 (from DTensor masks) is the same full masks.
    reloaded = load_masks(f"{workdir}/masks_ws2.safetensors")
    assert reloaded.keys() == masks.keys()
    for name, mask in masks.items():
        assert torch.equal(reloaded[name], mask), name


# --------------------------------------------------------------------------------------------------------------------
# The same gradients on both sides: the sharded step is the one-process step, bit for bit (bf16 and fp32 parameters)
# --------------------------------------------------------------------------------------------------------------------

SHAPES = {"a": ((5, 3), torch.bfloat16), "b": ((1, 4), torch.bfloat16), "c": ((3, 2), torch.float32)}


class Params(nn.Module):
    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(3)
        for name, (shape, dtype) in SHAPES.items():
            self.register_parameter(name, nn.Parameter(torch.randn(shape, generator=gen).to(dtype)))


def given_grads(step: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(200 + step)
    grads = {name: torch.randn(shape, generator=gen).to(dtype) for name, (shape, dtype) in SHAPES.items()}
    grads["a"][0, 0] = float("nan")  # unmasked below: never read
    return grads


def given_masks() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(4)
    masks = {name: torch.rand(shape, generator=gen) < 0.5 for name, (shape, _) in SHAPES.items()}
    masks["a"][0, 0], masks["a"][1, 1], masks["b"][0, 1], masks["c"][2, 0] = False, True, True, True
    return masks


def given_grad_steps(module, backend: str) -> dict[str, torch.Tensor]:
    opt = SparseAdamW(module.named_parameters(), given_masks(), backend=backend, **HYPER)
    for step in range(STEPS):
        for name, p in module.named_parameters():
            g = given_grads(step)[name]
            p.grad = like_sharded(local_part(g, p), p)
        opt.step()
    return full_params(module)


def saliency_masks(module) -> dict[str, torch.Tensor]:
    """GradSaliency over the given gradients of STEPS steps, global top 40%."""
    saliency = GradSaliency(module.named_parameters(), mode="sq")
    for step in range(STEPS):
        for name, p in module.named_parameters():
            g = given_grads(step)[name].nan_to_num(0.0)  # the planted NaN is for the optimizer's unmasked entry
            p.grad = like_sharded(local_part(g, p), p)
        saliency.accumulate()
    return saliency.masks(density=0.4, scope="global")


def given_grads_on_rank(rank, world, backends):
    from torch.distributed.fsdp import fully_shard

    out = {backend: given_grad_steps(fully_shard(Params()), backend) for backend in backends}
    out["saliency"] = saliency_masks(fully_shard(Params()))
    return out


def test_fsdp2_same_grads_bit_identical_to_one_process_bf16():
    backends = ("torch", "triton")
    ranks = run_world(given_grads_on_rank, world_size=WORLD, args=(backends,), timeout=300)
    initial = full_params(Params())
    for backend in backends:
        expected = given_grad_steps(Params(), backend)
        assert not torch.equal(expected["a"], initial["a"])  # the steps moved the masked entries
        for name, mask in given_masks().items():
            assert torch.equal(expected[name][~mask], initial[name][~mask]), name  # unmasked: bit-identical
        for rank, out in enumerate(ranks):
            for name, value in expected.items():
                assert value.dtype == SHAPES[name][1]
                assert torch.equal(out[backend][name], value), (backend, rank, name)
    # GradSaliency on the sharded gradients picks, on every rank, the full masks one process picks.
    expected = saliency_masks(Params())
    for out in ranks:
        assert out["saliency"].keys() == expected.keys()
        for name, mask in expected.items():
            assert torch.equal(out["saliency"][name], mask), name
