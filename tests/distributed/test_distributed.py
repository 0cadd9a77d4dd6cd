"""Data-parallel training (rlvr_fast/trainer/parallel/) on 2 gloo processes: one step at world size 2 equals the
step at world size 1 on the same global batch (loss, metrics, gradients, updated weights), under FSDP2 and DDP, for
several loss types, with AdamW and SparseAdamW, with the shared-prefix update, activation checkpointing and filler
micro-batches; evaluation split across ranks equals one process's; through ``torchrun``: a run killed after a
checkpoint and resumed equals the uninterrupted one, its checkpoint (torch.distributed.checkpoint) loads in one-process
eval, and a failing rank ends the job with its error and rank number in bounded time.

The global batch: one rollout of the step's prompts sampled once (one process), each rank's ``Trainer.rollout``
returning its share of it (a rank's own sampling uses its own seed, so it would differ from one process's).

The world runs the update with the shared prefix (each distinct prompt once per micro-batch, both decoder passes inside
the wrapper's forward); the one-process reference runs it unshared (each completion with its prompt), so the check does
not lean on the shared path it tests: a decoder layer whose gradient the wrapper dropped or counted twice gives another
gradient. Under FSDP each parameter's gradient must also reach reduce-scatter exactly once per backward, though each
decoder layer runs twice in its forward (the prompts, then the completions)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace

import pytest
import torch
from helpers.gloo_world import run_world
from helpers.runs import saved_tiny_model
from helpers.torchrun import torchrun, train_args
from helpers.world_cases import case_config, case_model, compared, global_rollout

from rlvr_fast.testing import assert_close, char_tokenizer, tiny_causal_lm
from rlvr_fast.trainer.config import RLVRConfig
from rlvr_fast.trainer.loop import Trainer
from rlvr_fast.trainer.model import LoadedModel
from rlvr_fast.trainer.parallel.filler import pad_update_batch
from rlvr_fast.trainer.parallel.world import TrainingWorld
from rlvr_fast.trainer.rollout.engines import Rollout

# (parallel, loss_type, optimizer, tied LM head, extra config): one world runs them all, one after the other. The world
# shares prompt prefixes in the update (prefix_sharing auto, or on where given: both pick it for these models); with a
# token budget of 48 the ranks' micro-batch counts differ, so a rank runs filler micro-batches in most cases
CASES = [
    ("fsdp", "grpo", "adamw", True, {"prefix_sharing": "on"}),
    ("fsdp", "dr_grpo", "adamw", False, {"grad_accumulation": 3, "gradient_checkpointing": True}),
    ("fsdp", "dapo", "adamw", True, {"beta": 0.1, "num_iterations": 2, "grad_clip": 0.5}),
    ("ddp", "grpo", "adamw", False, {"prefix_sharing": "on", "gradient_checkpointing": True}),
    ("ddp", "dapo", "sparse_adamw", True, {"mask_source": "random:0.3", "grad_accumulation": 2}),
    ("ddp", "dr_grpo", "adamw", True, {"scale": "batch", "filter_all_equal": True}),
    ("fsdp", "dapo", "sparse_adamw", False, {"mask_source": "random:0.3"}),
    # rank 1's completions all truncated and masked: it updates nothing but runs filler micro-batches (checkpointed)
    ("fsdp", "grpo", "adamw", False,
     {"mask_truncated_completions": True, "rank1_truncated": True, "gradient_checkpointing": True}),
    ("ddp", "dapo", "adamw", True,
     {"mask_truncated_completions": True, "rank1_truncated": True, "beta": 0.1, "gradient_checkpointing": True}),
]  # fmt: skip


@contextlib.contextmanager
def fsdp_reduce_counts() -> Iterator[Counter]:
    """Within the block, how many times FSDP2 reduce-scatters each parameter's gradient (by name): FSDP2's
    ``foreach_reduce``, which a unit's post-backward calls with the parameters that hold a gradient (torch 2.13)."""
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group as param_group

    counts: Counter = Counter()
    original = param_group.foreach_reduce

    def counted(fsdp_params, *args, **kwargs):
        counts.update(p._param_fqn for p in fsdp_params)
        return original(fsdp_params, *args, **kwargs)

    param_group.foreach_reduce = counted
    try:
        yield counts
    finally:
        param_group.foreach_reduce = original


def one_step(cfg: RLVRConfig, tokenizer, tied: bool, rollout: Rollout, world: TrainingWorld) -> dict:
    """Step 0 on the given global rollout: the record, updated full weights, the gradients each optimizer step applied,
    the micro-batch plans (shared prefix or not, filler micro-batches appended) and, under FSDP, how often each
    parameter's gradient was reduce-scattered. One process (the reference) runs the update unshared."""
    trainer = Trainer(
        cfg, loaded=LoadedModel(case_model(tokenizer, tied), tokenizer, torch.device("cpu"), torch.float32)
    )
    assert trainer.world.world_size == world.world_size
    if not world.active:
        trainer.prefix_sharing = False  # the reference: each completion with its prompt (module doc)
    rows = trainer.world.rows(len(rollout.texts))
    mine = rollout.select(torch.arange(rows.start, rows.stop))
    trainer.rollout = lambda problems, step: mine
    # the held-out evaluation of the initial weights: 40 problems, 3 generate calls (2 on rank 0, 1 on rank 1)
    evaluation = trainer.evaluate().to_dict() if cfg.loss_type == "grpo" else None
    trainer.warm_up_masks()
    grads = []  # the gradient each optimizer step applies (whole tensors; FSDP: gathered from the shards)
    step = trainer.optimizer.step

    def recording_step(*args, **kwargs):
        named = [(n, p.grad) for n, p in trainer.model.named_parameters() if p.grad is not None]
        grads.append({n: (g.full_tensor() if hasattr(g, "full_tensor") else g).clone() for n, g in named})
        return step(*args, **kwargs)

    trainer.optimizer.step = recording_step
    plans = []  # (shared prefix, micro-batches, of which fillers) of each update
    plan_micro_batches = trainer.plan_micro_batches

    def recording_plan(batch):
        batch_out, plan = plan_micro_batches(batch)
        fillers = sum(1 for part in plan.parts if int(part.rows.min()) >= len(batch.advantages))
        plans.append((plan.shared_prefix, len(plan.parts), fillers))
        return batch_out, plan

    trainer.plan_micro_batches = recording_plan
    with fsdp_reduce_counts() as reduces:
        record = trainer.train_step(0)
    weights = {k: v.detach().clone() for k, v in trainer.policy.full_state_dict().items()}
    fsdp_parameters = (
        sorted(n for n, _ in trainer.policy.root.named_parameters()) if trainer.world.mode == "fsdp" else []
    )
    return {"record": compared(record), "weights": weights, "grads": grads,
            "eval": evaluation, "plans": plans, "reduces": dict(reduces), "fsdp_parameters": fsdp_parameters,
            "world": (record.get("world_size"), record.get("parallel"))}  # fmt: skip


def steps_on_rank(rank, world_size, folder, rollouts):
    tokenizer = char_tokenizer()
    out = []
    for i, (parallel, loss_type, optimizer, tied, extra) in enumerate(CASES):
        data = os.path.join(folder, f"case{i}", f"rank{rank}")  # each rank writes its own copy of the task files
        os.makedirs(data, exist_ok=True)
        cfg = case_config(data, parallel, loss_type, optimizer, extra)
        cfg.output_dir = os.path.join(folder, f"case{i}", "run2")
        out.append(one_step(cfg, tokenizer, tied, rollouts[i], TrainingWorld(world_size=world_size)))
    return out


def test_world_of_two_steps_like_one_process(tmp_path):
    tokenizer = char_tokenizer()
    rollouts, expected = [], []
    for i, (parallel, loss_type, optimizer, tied, extra) in enumerate(CASES):
        folder = tmp_path / f"case{i}"
        folder.mkdir()
        cfg = case_config(str(folder), parallel, loss_type, optimizer, extra)
        rollout = global_rollout(cfg, tokenizer, tied)
        if extra.get("rank1_truncated"):
            half = len(rollout.texts) // 2
            rollout.truncated[half:] = True
            rollout.truncated[:half] = False
        rollouts.append(rollout)
        cfg1 = replace(case_config(str(folder), parallel, loss_type, optimizer, extra), overwrite=True)
        expected.append(one_step(cfg1, tokenizer, tied, rollout, TrainingWorld()))
    got = run_world(steps_on_rank, world_size=2, args=(str(tmp_path), rollouts), timeout=600)
    for i, case in enumerate(CASES):
        one, two = expected[i], got[0][i]
        assert two["world"] == (2, case[0]), case
        assert one["record"]["completions_updated"] > 0, case
        for key, value in one["record"].items():
            if isinstance(value, float):
                assert abs(two["record"][key] - value) <= 1e-5 * max(1.0, abs(value)), (
                    case,
                    key,
                    value,
                    two["record"][key],
                )
            elif key != "iterations":
                assert two["record"][key] == value, (case, key)
        assert len(one["grads"]) == len(two["grads"]) == case[4].get("num_iterations", 1)
        for iteration, (g1, g2) in enumerate(zip(one["grads"], two["grads"])):
            assert g1.keys() == g2.keys()
            # the first iteration's gradient is of equal weights; a later one's of weights already an Adam step apart
            # (the weight tolerance below), so its own tolerance is looser
            rtol = 1e-5 if iteration == 0 else 1e-3
            for name, g in g1.items():
                assert_close(g2[name], g, rtol=rtol, atol=1e-7, name=f"{case} grad {iteration} {name}")
        # Adam divides by sqrt(v) + eps: where |grad| is near eps, fp32 differences in the gradient move the update by
        # up to ~1e-3 of lr; the gradients above are the sharp check, the weights that the update was applied
        assert one["weights"].keys() == two["weights"].keys()
        for name, w in one["weights"].items():
            assert_close(two["weights"][name], w, rtol=1e-5, atol=5e-5, name=f"{case} {name}")
        assert one["eval"] == two["eval"] == got[1][i]["eval"], case  # evaluation split across ranks: the same numbers
        # the world shared the prompts in every update, the reference did not
        assert [plan[0] for plan in one["plans"]] == [False], case
        iterations = case[4].get("num_iterations", 1)
        for rank in (0, 1):
            plans = got[rank][i]["plans"]
            assert [plan[0] for plan in plans] == [True], (case, rank)
            if case[0] == "fsdp":  # each parameter's gradient reduce-scattered once per backward, none left out
                backwards = plans[0][1] * iterations
                names = got[rank][i]["fsdp_parameters"]
                assert got[rank][i]["reduces"] == dict.fromkeys(names, backwards), (case, rank)
        for name, w in got[1][i]["weights"].items():  # rank 1 holds the same model
            assert torch.equal(w, two["weights"][name]), name
    # filler micro-batches ran with the shared prefix under both wrappers, with and without activation checkpointing
    fillers = {(case[0], bool(case[4].get("gradient_checkpointing"))) for i, case in enumerate(CASES)
               if any(got[rank][i]["plans"][0][2] for rank in (0, 1))}  # fmt: skip
    assert fillers == {(mode, checkpointed) for mode in ("fsdp", "ddp") for checkpointed in (False, True)}, fillers


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_filler_rows_change_no_gradient(tmp_path, loss_type):
    """The rows a rank pads its update batch with (to run as many micro-batches as the most loaded rank) add nothing:
    the same loss and gradient with 3 filler rows, over 2 micro-batches; a batch of fillers alone has zero gradient."""
    from rlvr_fast.trainer.update.loss import policy_step

    tokenizer = char_tokenizer()
    cfg = case_config(str(tmp_path), "ddp", loss_type, "adamw", {"grad_accumulation": 2})
    model = case_model(tokenizer, tied=False)
    trainer = Trainer(cfg, loaded=LoadedModel(model, tokenizer, torch.device("cpu"), torch.float32))
    front = trainer.prepare_step(trainer.problems_at(0), 0)
    batch = front.batch
    assert len(batch.advantages) > 2

    def loss_and_grads(b):
        model.zero_grad(set_to_none=True)
        out = policy_step(model, b, cfg)
        return out["loss"], {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss, grads = loss_and_grads(batch)
    padded = pad_update_batch(batch, front.rollout, len(batch.advantages) + 3)
    assert len(padded.advantages) == len(batch.advantages) + 3 and float(padded.loss_mask[-3:].sum()) == 0
    padded_loss, padded_grads = loss_and_grads(padded)
    assert abs(padded_loss - loss) <= 1e-6 * max(1.0, abs(loss))
    for name, g in grads.items():
        assert_close(padded_grads[name], g, rtol=1e-5, atol=1e-8, name=name)
    empty = replace(batch, rollout=batch.rollout.select(torch.arange(0)), advantages=batch.advantages[:0],
                    loss_mask=batch.loss_mask[:0])  # fmt: skip
    only_fillers = pad_update_batch(empty, front.rollout, 2)
    filler_loss, filler_grads = loss_and_grads(only_fillers)
    assert filler_loss == 0.0 and all(float(g.abs().max()) == 0.0 for g in filler_grads.values())


_MARKERS: list = []  # a world rank's finalization marker, freed (and written) only by the interpreter's finalization


def plant_finalization_marker(rank, world_size, path):
    from torchrun_probe import FinalizationMarker

    _MARKERS.append(FinalizationMarker(path))
    dist_sum = torch.ones(1)
    torch.distributed.all_reduce(dist_sum)  # a collective: the group's gloo threads are busy once
    return float(dist_sum)


def test_gloo_world_ranks_end_before_interpreter_finalization(tmp_path):
    """run_world's ranks end like a torchrun rank (test_torchrun_ranks_end_before_interpreter_finalization): after the
    group is destroyed and the result sent, without the interpreter's finalization (run_world has joined them when it
    returns)."""
    marker = str(tmp_path / "finalized.txt")
    assert run_world(plant_finalization_marker, world_size=2, args=(marker,), timeout=120) == [2.0, 2.0]
    assert not os.path.exists(marker), finalized(marker)


def test_prompts_per_step_must_split_into_whole_groups_per_rank(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "3")
    cfg = case_config(str(tmp_path), "fsdp", "grpo", "adamw", {})
    with pytest.raises(ValueError, match=r"prompts_per_step \(4\) must divide by the world size \(3\)"):
        TrainingWorld.from_environment(replace(cfg, device="cpu"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    eight_bit = replace(cfg, device="cpu", optimizer="adamw8bit")
    with pytest.raises(ValueError, match=r"optimizer='adamw8bit' does not run on FSDP-sharded parameters yet"):
        TrainingWorld.from_environment(eight_bit)


# --------------------------------------------------------------------------------------------------------------------
# Through the real entry point: torchrun --nproc_per_node=2 -m rlvr_fast train
# --------------------------------------------------------------------------------------------------------------------


def test_torchrun_train_killed_resumed_and_one_process_eval(tmp_path):
    """torchrun --nproc_per_node=2 under FSDP: the records carry the world; every checkpoint is torch.distributed.
    checkpoint's (each rank's shard file, an RNG file per rank, no whole-model file). A job whose rank 1 is SIGKILLed
    right after the checkpoint of step 2 landed, resumed with --resume, equals the uninterrupted run (metrics and final
    weights); the checkpoint loads in one-process ``rlvr-fast eval`` (no torchrun)."""
    from rlvr_fast.trainer.checkpoint.folder import latest_checkpoint, load_model_weights

    model = saved_tiny_model(tmp_path)
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    rc, out, _ = torchrun(train_args(tmp_path, model, full, steps=3, checkpoint_every=1), timeout=300)
    assert rc == 0, out
    rc, out, _ = torchrun(
        train_args(tmp_path, model, part, steps=3, checkpoint_every=1), timeout=300, kill_after=(1, 2)
    )
    assert rc != 0 and "SIGKILL" in out, out[-3000:]
    assert latest_checkpoint(part).endswith("step-000002")
    assert not os.path.exists(os.path.join(part, "checkpoints", "step-000003"))
    rc, out, _ = torchrun(train_args(tmp_path, model, part, steps=3, checkpoint_every=1, resume="true"), timeout=300)
    assert rc == 0, out

    def records(folder):
        with open(os.path.join(folder, "metrics.jsonl")) as f:
            lines = [json.loads(line) for line in f]
        return [{**compared(r), "world": (r["world_size"], r["parallel"])} for r in lines]

    full_records = records(full)
    assert [r["step"] for r in full_records] == [0, 1, 2]
    assert all(r["world"] == (2, "fsdp") for r in full_records)
    assert records(part) == full_records
    last = os.path.join("checkpoints", "step-000003")
    assert sorted(os.listdir(os.path.join(full, last))) == [".metadata", "__0_0.distcp", "__1_0.distcp",
        "manifest.json", "rng-rank0.safetensors", "rng-rank1.safetensors", "trainer_state.json"]  # fmt: skip
    a, b = tiny_causal_lm(char_tokenizer(), seed=1), tiny_causal_lm(char_tokenizer(), seed=2)
    load_model_weights(os.path.join(full, last), a)
    load_model_weights(os.path.join(part, last), b)
    assert all(torch.equal(t, b.state_dict()[k]) for k, t in a.state_dict().items())

    eval_args = train_args(tmp_path, model, str(tmp_path / "eval_out"))[1:]
    done = subprocess.run(
        [sys.executable, "-m", "rlvr_fast", "eval", "--checkpoint", os.path.join(full, last), *eval_args],
        capture_output=True,
        text=True,
        timeout=300,
        env={k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK")},
    )
    assert done.returncode == 0 and "pass@1" in done.stdout, done.stdout + done.stderr


def finalized(marker: str) -> str:
    with open(marker) as f:
        return f.read()


def test_failing_rank_ends_the_torchrun_job_naming_it(tmp_path):
    """One rank raises mid-run (in step 0's reward, a hook of the test's: tests/distributed/torchrun_probe.py) while the
    other waits in a collective; torchrun stops the job, non-zero, naming the rank and its error, in bounded time. The
    failing rank ends without the interpreter's finalization (see the test below), the other is stopped by torchrun."""
    model = saved_tiny_model(tmp_path)
    marker = str(tmp_path / "finalized.txt")
    args = train_args(tmp_path, model, str(tmp_path / "run"), train_size=2, steps=1)
    rc, out, seconds = torchrun(args, timeout=240, probe=(marker, 1))
    assert rc != 0
    assert seconds < 180
    assert re.search(r"rank\s*:\s*1\b", out), out[-3000:]
    assert "injected reward failure on rank 1" in out, out[-3000:]
    assert not os.path.exists(marker), finalized(marker)


def test_torchrun_ranks_end_before_interpreter_finalization(tmp_path):
    """Each rank of a torchrun job ends (``os._exit`` with its status, after its atexit handlers and a flush of stdout
    and stderr) before the interpreter's finalization. The process group's gloo threads outlive
    ``destroy_process_group`` (torch 2.13: FSDP2's sharded parameters keep the group alive), and one that touches a
    tensor's Python object during finalization aborts the rank ("terminate called without an active exception",
    SIGABRT): a finished job then failed now and then on a loaded machine. A rank that finalized writes to the
    marker file (tests/distributed/torchrun_probe.py); rank 0's report still reaches stdout."""
    model = saved_tiny_model(tmp_path)
    marker = str(tmp_path / "finalized.txt")
    args = train_args(tmp_path, model, str(tmp_path / "run"), steps=1)
    rc, out, _ = torchrun(args, timeout=300, probe=(marker, -1))
    assert rc == 0, out[-3000:]
    assert "held-out pass@k before and after training" in out, out[-3000:]
    assert not os.path.exists(marker), finalized(marker)


def test_a_hidden_state_route_keeps_neither_its_model_nor_its_wrapper_alive():
    """``route_hidden_states`` routes a model's decoder passes through its wrapper while the wrapper's owner keeps it,
    and holds neither: the wrapper holds the model, so a strong route would keep both (and a process group) alive for
    the life of the process (fails with the route held strongly)."""
    import gc
    import weakref

    from rlvr_fast.trainer.model import hidden_states_pass, route_hidden_states

    class Wrapper(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model, self.calls = model, 0

        def forward(self, compute, *inputs):
            self.calls += 1
            return compute(self.model, *inputs)

    model = torch.nn.Linear(3, 2)
    wrapper = Wrapper(model)
    route_hidden_states(model, wrapper)
    x = torch.randn(4, 3)
    assert torch.equal(hidden_states_pass(model, lambda m, t: m(t), x), model(x)) and wrapper.calls == 1
    model_ref, wrapper_ref = weakref.ref(model), weakref.ref(wrapper)
    del model, wrapper
    gc.collect()
    assert model_ref() is None and wrapper_ref() is None
