"""Checkpoints of a torchrun run through torch.distributed.checkpoint (rlvr_fast/trainer/checkpoint/sharded.py), on 2
gloo processes (one spawned world for the whole module):

- every rank writes its own shard file and RNG file, nothing else (no safetensors of the whole model);
- exact resume on the same world size, through the Trainer's own save and load: a fresh trainer (other initial weights)
  resumed from step 2 holds the same weights, optimizer state (SparseAdamW under FSDP2 in its full layout, under DDP
  in its compact one; AdamW saved before its first step: no state, and none made by the save) and RNG state on each
  rank (each rank's own), and its next step equals the uninterrupted run's bit for bit;
- a write that fails midway on one rank fails the save on both ranks (no hang) and leaves the previous checkpoint, and
  a NaN in one rank's shard is refused on both ranks naming the step, tensor and rank;
- in the parent (one process): a corrupt, truncated or missing shard file, or a broken ``.metadata``, is refused naming
  the file and resume falls back to the previous checkpoint; another world size is refused by name; the model weights
  load in one process, strictly, equal to the run's.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace

import pytest
import torch
from helpers.checkpoints import corrupt, truncate
from helpers.gloo_world import run_world
from helpers.runs import TOKEN_BIAS
from helpers.world_cases import case_config, compared

from rlvr_fast.optim.sharding import local_tensor
from rlvr_fast.testing import char_tokenizer, tiny_causal_lm
from rlvr_fast.trainer.checkpoint.dcp_layout import DCP_METADATA, check_world_size
from rlvr_fast.trainer.checkpoint.folder import latest_checkpoint, load_model_weights
from rlvr_fast.trainer.checkpoint.strict_loading import CheckpointError
from rlvr_fast.trainer.checks.preflight import resume_point
from rlvr_fast.trainer.loop import Trainer, seed_everything
from rlvr_fast.trainer.model import LoadedModel

# (parallel, optimizer, tied LM head, a step before the checkpoints); the first case also takes the faults. The last
# saves AdamW before its first step: no optimizer state yet (only its hyper-parameters are saved, see
# ShardedStateDicts.checkpoint_state), and saving must not give it one (Adam's step count would be off by one)
CASES = [("fsdp", "sparse_adamw", True, True), ("ddp", "sparse_adamw", False, True), ("fsdp", "adamw", False, False)]
CASE_IDS = [f"{p}-{o}" + ("" if stepped else "-before-any-step") for p, o, _, stepped in CASES]
BEFORE = {"pass_at_k": {1: {"mean": 0.25}}}  # the evaluation before, as the trainer stores it


def config(folder: str, rank: int, parallel: str, optimizer: str):
    data = os.path.join(folder, f"rank{rank}")  # each rank writes its own copy of the task files
    os.makedirs(data, exist_ok=True)
    cfg = case_config(data, parallel, "dapo", optimizer, {"mask_source": "random:0.3", "steps": 3})
    return replace(cfg, output_dir=os.path.join(folder, "run"))


def tiny_model(tied: bool, seed: int):
    """The case's tiny causal LM (an untied head has a bias: ``token_bias``), initialised from ``seed``."""
    return tiny_causal_lm(char_tokenizer(), seed=seed, token_bias=None if tied else TOKEN_BIAS)


def trainer_for(cfg, tied: bool, seed: int) -> Trainer:
    model = tiny_model(tied, seed)
    return Trainer(cfg, loaded=LoadedModel(model, char_tokenizer(), torch.device("cpu"), torch.float32))


def local_state(trainer: Trainer) -> dict:
    """This rank's pieces of the weights and optimizer state, and its torch RNG state (copies)."""
    weights = {n: local_tensor(p.detach()).clone() for n, p in trainer.model.named_parameters()}
    names = {p: n for n, p in trainer.model.named_parameters()}
    optim = {
        f"{names[p]}.{k}": local_tensor(v).clone()
        for p, s in trainer.optimizer.state.items()
        for k, v in s.items()
        if isinstance(v, torch.Tensor)
    }
    return {"weights": weights, "optim": optim, "rng": torch.get_rng_state()}


def write_fails_midway(rank: int):
    """FileSystemWriter.write_data that writes, then raises on rank 1 (a disk that filled up mid-save)."""
    from torch.distributed.checkpoint import FileSystemWriter

    original = FileSystemWriter.write_data

    def failing(self, plan, planner):
        future = original(self, plan, planner)
        if rank == 1:
            future.wait()
            raise OSError("No space left on device (test)")
        return future

    return original, failing


def faults_on_rank(trainer: Trainer, rank: int, root: str) -> dict:
    """After checkpoint 1: a failing write, then a NaN in rank 1's shard; both refused on every rank."""
    from torch.distributed.checkpoint import FileSystemWriter

    out = {}
    original, failing = write_fails_midway(rank)
    FileSystemWriter.write_data = failing
    try:
        trainer._save_checkpoint(2, BEFORE)
    except CheckpointError as exc:
        out["write_error"] = str(exc)
    finally:
        FileSystemWriter.write_data = original
    trainer.world.barrier()
    out["after_failed_write"] = sorted(os.listdir(root))
    param = next(p for p in trainer.model.parameters() if local_tensor(p).numel())
    piece = local_tensor(param.data)
    kept = piece.clone()
    if rank == 1:
        piece.view(-1)[0] = float("nan")
    try:
        trainer._save_checkpoint(2, BEFORE)
    except FloatingPointError as exc:
        out["nan_error"] = str(exc)
    finally:
        piece.copy_(kept)
    trainer.world.barrier()
    out["after_nan"] = sorted(os.listdir(root))
    return out


def checkpoints_on_rank(rank, world_size, folder):
    out = []
    for i, (parallel, optimizer, tied, stepped) in enumerate(CASES):
        cfg = config(os.path.join(folder, f"case{i}"), rank, parallel, optimizer)
        root = os.path.join(cfg.output_dir, "checkpoints")
        a = trainer_for(cfg, tied, seed=0)
        a.warm_up_masks()
        if stepped:
            a.train_step(0)
        a._save_checkpoint(1, BEFORE)
        case = {"faults": faults_on_rank(a, rank, root) if i == 0 else None}
        seed_everything(1000 + rank)  # a state of each rank's own: the checkpoint must keep every rank's
        a._save_checkpoint(2, BEFORE)
        case["files"] = sorted(os.listdir(os.path.join(root, "step-000002")))
        case["saved"] = local_state(a)
        case["full_weights"] = {k: v.clone() for k, v in a.policy.full_state_dict().items()}
        uninterrupted = compared(a.train_step(2))
        weights_after = local_state(a)["weights"]
        case["adam_steps"] = sorted({float(s["step"]) for s in a.optimizer.state.values() if "step" in s})

        b = trainer_for(replace(cfg, resume=True), tied, seed=7)  # other initial weights: the checkpoint must win
        b.warm_up_masks()
        start, before = b._load_latest_checkpoint()
        assert (start, before["pass_at_k"][1]) == (2, BEFORE["pass_at_k"][1])
        case["loaded"] = local_state(b)
        resumed = compared(b.train_step(2))
        case["same_step"] = resumed == uninterrupted
        case["same_weights"] = all(torch.equal(w, weights_after[n]) for n, w in local_state(b)["weights"].items())
        case["lr"] = (b.scheduler.get_last_lr(), a.scheduler.get_last_lr())
        out.append(case)
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sharded")
    return folder, run_world(checkpoints_on_rank, world_size=2, args=(str(folder),), timeout=600)


def test_every_rank_writes_its_own_shards(world):
    _, results = world
    for case in results[0]:
        assert case["files"] == [
            ".metadata",
            "__0_0.distcp",
            "__1_0.distcp",
            "manifest.json",
            "rng-rank0.safetensors",
            "rng-rank1.safetensors",
            "trainer_state.json",
        ]


@pytest.mark.parametrize("case", range(len(CASES)), ids=CASE_IDS)
def test_resume_on_the_same_world_size_is_exact(world, case):
    folder, results = world
    stepped = CASES[case][3]
    sparse = CASES[case][1] == "sparse_adamw"  # SparseAdamW holds its state from the start
    for rank in (0, 1):
        got = results[rank][case]
        saved, loaded = got["saved"], got["loaded"]
        assert saved["weights"].keys() == loaded["weights"].keys()
        for name, w in saved["weights"].items():
            assert torch.equal(loaded["weights"][name], w), (rank, name)
        assert saved["optim"].keys() == loaded["optim"].keys()
        assert bool(saved["optim"]) == (stepped or sparse)
        for name, t in saved["optim"].items():
            assert torch.equal(loaded["optim"][name], t), (rank, name)
        assert torch.equal(loaded["rng"], saved["rng"]), rank
        assert got["same_step"] and got["same_weights"], rank
        assert got["lr"][0] == got["lr"][1]
        if not sparse:
            assert got["adam_steps"] == [1.0 + stepped]  # the checkpoints added no step
    assert not torch.equal(results[0][case]["saved"]["rng"], results[1][case]["saved"]["rng"])  # one per rank
    with open(folder / f"case{case}" / "run" / "checkpoints" / "step-000002" / "trainer_state.json") as f:
        state = json.load(f)
    assert (state["world_size"], state["parallel"]) == (2, CASES[case][0])
    assert ("optimizer_param_groups" in state) == (not stepped and not sparse)


def test_a_failed_write_or_a_nan_on_one_rank_fails_the_save_on_both_and_keeps_the_last_checkpoint(world):
    _, results = world
    for rank in (0, 1):
        faults = results[rank][0]["faults"]
        assert "step 2 was not written" in faults["write_error"] and "rank 1" in faults["write_error"], faults
        assert "No space left on device (test)" in faults["write_error"]
        assert faults["after_failed_write"] == ["latest", "step-000001"]  # no partial folder, latest untouched
        assert faults["nan_error"].startswith("step 2: model tensor") and "rank 1's shard" in faults["nan_error"]
        assert faults["after_nan"] == ["latest", "step-000001"]


def copied_run(world, tmp_path, monkeypatch, case: int = 0):
    folder, _ = world
    shutil.copytree(folder / f"case{case}" / "run", tmp_path / "run")
    parallel, optimizer, _, _ = CASES[case]
    cfg = config(str(folder / f"case{case}"), 0, parallel, optimizer)
    monkeypatch.setenv("WORLD_SIZE", "2")  # the checks of rank 0 of a resumed world of 2
    return replace(cfg, output_dir=str(tmp_path / "run"), resume=True)


SHARD_FAULTS = {
    "corrupt shard": ("__1_0.distcp", corrupt),
    "truncated shard": ("__0_0.distcp", truncate),
    "missing shard": ("__1_0.distcp", os.remove),
    "missing rng of rank 1": ("rng-rank1.safetensors", os.remove),
    "corrupt index": (DCP_METADATA, corrupt),
}


@pytest.mark.parametrize("fault", sorted(SHARD_FAULTS))
def test_a_bad_shard_is_named_and_resume_falls_back(world, tmp_path, monkeypatch, fault):
    cfg = copied_run(world, tmp_path, monkeypatch)
    name, damage = SHARD_FAULTS[fault]
    newest = tmp_path / "run" / "checkpoints" / "step-000002"
    damage(newest / name)
    messages = []
    point = resume_point(cfg, log=messages.append)
    assert point.path.endswith("step-000001") and point.state["world_size"] == 2
    said = "\n".join(messages)
    assert str(newest / name) in said and "falling back" in said, said
    assert latest_checkpoint(cfg.output_dir).endswith("step-000001")


def test_another_world_size_is_refused_by_name(world, tmp_path, monkeypatch):
    cfg = copied_run(world, tmp_path, monkeypatch)
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(CheckpointError, match=r"written by 2 process\(es\) and this run has 1.*--nproc_per_node=2"):
        resume_point(cfg, log=lambda m: None)
    # and the reverse: a one-process checkpoint (no world size recorded) under torchrun
    with pytest.raises(CheckpointError, match=r"written by 1 process\(es\) and this run has 2.*or without torchrun"):
        check_world_size("step-000001", {"step": 1}, 2)


@pytest.mark.parametrize("case", range(len(CASES)), ids=CASE_IDS)
def test_one_process_loads_the_weights_strictly(world, case):
    folder, results = world
    path = folder / f"case{case}" / "run" / "checkpoints" / "step-000002"
    tied = CASES[case][2]
    model = tiny_model(tied, seed=3)
    load_model_weights(str(path), model)
    expected = results[0][case]["full_weights"]
    assert model.state_dict().keys() == expected.keys()
    for name, w in model.state_dict().items():
        assert torch.equal(w, expected[name]), name
    other = tiny_causal_lm(char_tokenizer(), arch="qwen2")
    before = {n: t.clone() for n, t in other.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"does not match the model"):
        load_model_weights(str(path), other)
    assert all(torch.equal(before[n], t) for n, t in other.state_dict().items())  # nothing half-loaded
