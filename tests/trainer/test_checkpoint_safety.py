"""Checkpoint safety: a checkpoint's pickles never run code; a failed save is one clear error and loses
nothing; a torn metrics.jsonl does not break resume; a diverged policy stops with a named error, not a deep one.

- A DCP ``.metadata`` whose pickle calls ``exec`` (the manifest rewritten to match) is refused by name by
  verification, resume (falls back) and ``rlvr-fast eval --checkpoint`` (exit 2), and the code never runs; so is a
  non-tensor value whose pickle calls ``exec``. A genuine DCP checkpoint (written in one process) still loads.
- A save that meets a full disk (a file of the checkpoint on /dev/full, or ENOSPC raised) or a read-only folder
  raises CheckpointWriteError naming the step, the folder, the cause and the last good checkpoint; no partial folder
  stays, ``latest`` is unchanged; ``rlvr-fast train`` prints it in one line and exits 1.
- A last line of metrics.jsonl cut short is dropped on resume, named; a damaged line before it is refused by
  preflight, before the model loads.
- NaN/inf logits in a rollout raise DivergedSamplingError (a NonFiniteError) naming the step, on both sampling paths;
  a learning rate of 1e30 (finite, absurd weights) stops at the update, before any checkpoint is written.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import pickle
import shutil
import warnings

import pytest
import torch
from helpers.checkpoints import tiny_module
from helpers.runs import TOKEN_BIAS, tiny_config

import rlvr_fast.trainer.checkpoint.folder as checkpoint_folder
import rlvr_fast.trainer.checkpoint.local as checkpoint
from rlvr_fast.cli import main
from rlvr_fast.testing import char_tokenizer, tiny_causal_lm
from rlvr_fast.trainer.checkpoint.dcp_layout import DCP_METADATA, MODEL_KEY, OPTIM_KEY, rng_file
from rlvr_fast.trainer.checkpoint.folder import (
    MANIFEST,
    file_record,
    latest_checkpoint,
    load_model_weights,
    verify_checkpoint,
    write_manifest,
    write_trainer_state,
)
from rlvr_fast.trainer.checkpoint.local import save_checkpoint
from rlvr_fast.trainer.checkpoint.safe_unpickle import UnsafePickleError, dcp_load
from rlvr_fast.trainer.checkpoint.state import save_nested
from rlvr_fast.trainer.checkpoint.strict_loading import CheckpointWriteError
from rlvr_fast.trainer.checks.preflight import resume_point
from rlvr_fast.trainer.loop import Trainer
from rlvr_fast.trainer.model import LoadedModel
from rlvr_fast.trainer.reporting.log import MetricsLog, MetricsLogError
from rlvr_fast.trainer.rollout.engines import HFGeneration
from rlvr_fast.trainer.rollout.shared_prefix_sampler import draw_tokens
from rlvr_fast.trainer.update.finite_guard import DivergedSamplingError, NonFiniteError, check_update_finite

# ---- helpers --------------------------------------------------------------------------------------------------------


class Payload:
    """A pickle that writes ``marker`` when unpickled (what an attacker's checkpoint would do, harmlessly)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def tiny_trained():
    """A tiny LM and an AdamW that has stepped (so the optimizer state has tensors and plain values)."""
    model = tiny_causal_lm(char_tokenizer(), token_bias=TOKEN_BIAS)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, model.config.vocab_size, (2, 5))
    model(input_ids=ids).logits.sum().backward()
    optimizer.step()
    return model, optimizer


def dcp_checkpoint(output_dir: str, step: int, model, optimizer, extra: dict | None = None) -> str:
    """``checkpoints/step-<step>`` in the DCP format of a world of 1, written in this process (no process group):
    model and optimizer through torch.distributed.checkpoint, RNG file, trainer state, manifest, ``latest``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    folder = os.path.join(output_dir, "checkpoints", f"step-{step:06d}")
    os.makedirs(folder)
    state = {MODEL_KEY: model.state_dict(), OPTIM_KEY: get_optimizer_state_dict(model, optimizer), **(extra or {})}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "torch.distributed is disabled": one process is the intent
        dcp.save(state, storage_writer=FileSystemWriter(folder, single_file_per_rank=True), no_dist=True)
    save_nested(os.path.join(folder, rng_file(0)), checkpoint.json_rng_state(checkpoint.rng_state()))
    write_trainer_state(folder, step, None, {"world_size": 1})
    rewrite_manifest(folder, step)
    with open(os.path.join(output_dir, "checkpoints", "latest"), "w") as f:
        f.write(os.path.basename(folder) + "\n")
    return folder


def rewrite_manifest(folder: str, step: int) -> None:
    """A manifest that matches the folder's files as they are now (what an attacker who swaps a file does too)."""
    files = {n: file_record(os.path.join(folder, n)) for n in sorted(os.listdir(folder)) if n != MANIFEST}
    write_manifest(folder, step, None, files, fmt="dcp", world_size=1)


def poison_index(folder: str, marker: str) -> None:
    """Replace the folder's ``.metadata`` by the genuine index carrying a ``Payload`` (it still loads under a plain
    unpickler, having run the payload), and rewrite the manifest to match."""
    path = os.path.join(folder, DCP_METADATA)
    with open(path, "rb") as f:
        metadata = pickle.load(f)
    metadata.planner_data = {"x": Payload(marker)}
    with open(path, "wb") as f:
        pickle.dump(metadata, f)
    with open(os.path.join(folder, MANIFEST)) as f:
        step = json.load(f)["step"]
    rewrite_manifest(folder, step)


@pytest.fixture
def dcp_run(tmp_path):
    """A run folder with two DCP checkpoints (steps 1 and 2), the model that wrote them, a config resuming it."""
    model, optimizer = tiny_trained()
    out = tmp_path / "run"
    dcp_checkpoint(str(out), 1, model, optimizer)
    newest = dcp_checkpoint(str(out), 2, model, optimizer)
    cfg = dataclasses.replace(tiny_config(tmp_path), output_dir=str(out), resume=True)
    return cfg, newest, model


# ---- item 1: a checkpoint's pickles never run code ------------------------------------------------------------------


def test_the_payload_runs_under_a_plain_unpickler(dcp_run, tmp_path):
    """The attack is real: torch's own FileSystemReader runs it (what verification did before the fix)."""
    from torch.distributed.checkpoint import FileSystemReader

    _, newest, _ = dcp_run
    marker = tmp_path / "ran"
    poison_index(newest, str(marker))
    FileSystemReader(newest).read_metadata()
    assert marker.read_text() == "ran"


def test_a_metadata_pickle_that_runs_code_is_refused_by_name_and_never_runs(dcp_run, tmp_path):
    cfg, newest, _ = dcp_run
    marker = tmp_path / "ran"
    poison_index(newest, str(marker))
    problem = verify_checkpoint(newest, deep=True)
    assert problem is not None and os.path.join(newest, DCP_METADATA) in problem and "builtins.exec" in problem
    messages = []
    point = resume_point(cfg, log=messages.append)  # resume falls back to the previous checkpoint
    assert point.path.endswith("step-000001") and "builtins.exec" in "\n".join(messages)
    assert latest_checkpoint(cfg.output_dir).endswith("step-000001")
    assert not marker.exists()


def test_eval_refuses_a_metadata_pickle_that_runs_code(dcp_run, tmp_path, capsys, monkeypatch):
    import rlvr_fast.trainer.checks.preflight as preflight
    import rlvr_fast.trainer.evaluation.command as evaluate_cli

    cfg, newest, _ = dcp_run
    marker = tmp_path / "ran"
    poison_index(newest, str(marker))
    monkeypatch.setattr(preflight, "check_model_source", lambda model: None)
    monkeypatch.setattr(evaluate_cli, "load_model", lambda cfg: pytest.fail("loaded the model"))
    with pytest.raises(SystemExit) as info:
        main(["eval", "--task", cfg.task, "--eval_file", cfg.eval_file, "--checkpoint", newest])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "builtins.exec" in err and DCP_METADATA in err and "Traceback" not in err
    assert not marker.exists()


def test_a_non_tensor_value_that_runs_code_is_refused(tmp_path):
    """DCP unpickles non-tensor values with torch.load(weights_only=False); ours reads them as plain data only."""
    import torch.distributed.checkpoint as dcp

    model, optimizer = tiny_trained()
    marker = tmp_path / "ran"
    folder = dcp_checkpoint(str(tmp_path / "run"), 1, model, optimizer, extra={"evil": Payload(str(marker))})
    with pytest.raises(UnsafePickleError, match=r"'evil'.*not plain data"):
        dcp_load({"evil": None}, folder, no_dist=True)
    assert not marker.exists()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.load({"evil": None}, checkpoint_id=folder, no_dist=True)  # torch's own planner runs it
    assert marker.read_text() == "ran"


def test_a_genuine_dcp_checkpoint_loads(dcp_run):
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    cfg, newest, saved = dcp_run
    assert verify_checkpoint(newest, deep=True) is None
    model = tiny_causal_lm(char_tokenizer(), token_bias=TOKEN_BIAS, seed=7)
    load_model_weights(newest, model)
    for name, t in saved.state_dict().items():
        assert torch.equal(model.state_dict()[name], t), name
    # the optimizer's plain values (lr, betas, ...) and tensors load through the safe planner too
    other, optimizer = tiny_trained()
    optimizer.param_groups[0]["lr"] = 0.5
    template = {OPTIM_KEY: get_optimizer_state_dict(other, optimizer)}
    dcp_load(template, newest, no_dist=True)
    group = template[OPTIM_KEY]["param_groups"][0]
    assert group["lr"] == 1e-3 and tuple(group["betas"]) == (0.9, 0.999)
    assert resume_point(cfg, log=lambda m: None).path == newest


def test_a_manifest_naming_a_file_outside_the_folder_is_refused(dcp_run, tmp_path):
    _, newest, _ = dcp_run
    (tmp_path / "outside").write_bytes(b"x")
    with open(os.path.join(newest, MANIFEST)) as f:
        manifest = json.load(f)
    manifest["files"]["../../../outside"] = file_record(str(tmp_path / "outside"))
    with open(os.path.join(newest, MANIFEST), "w") as f:
        json.dump(manifest, f)
    assert "not a file of the checkpoint's folder" in verify_checkpoint(newest, deep=True)


# ---- item 2: a failed save is one clear error and loses nothing -----------------------------------------------------


def full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def safetensors_full_disk(*args, **kwargs):
    from safetensors import SafetensorError

    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


# each writer of a checkpoint, failing as a full disk makes it fail
WRITERS = {
    "save_file": safetensors_full_disk,  # model.safetensors
    "save_nested": full_disk,  # optimizer / RNG state (its save_file is the model's)
    "write_trainer_state": full_disk,
    "write_manifest": full_disk,
    "folder.write_atomic": full_disk,  # latest, after the folder is complete and renamed (folder.commit_checkpoint)
}


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_a_full_disk_during_a_save_is_one_clear_error_and_loses_nothing(tmp_path, monkeypatch, writer):
    model, optimizer = tiny_module()
    first = save_checkpoint(str(tmp_path), 1, model, optimizer, {})
    module, _, name = writer.rpartition(".")
    monkeypatch.setattr(checkpoint_folder if module == "folder" else checkpoint, name, WRITERS[writer])
    with pytest.raises(CheckpointWriteError) as info:
        save_checkpoint(str(tmp_path), 2, model, optimizer, {})
    message = str(info.value)
    assert message.startswith(f"the checkpoint of step 2 was not written to {tmp_path}/checkpoints/step-000002: ")
    assert "No space left on device" in message and f"the last good checkpoint, {first}, is intact" in message
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["latest", "step-000001"]  # no partial folder
    monkeypatch.undo()
    assert latest_checkpoint(str(tmp_path)) == first and verify_checkpoint(first) is None


def test_a_read_only_checkpoint_folder_is_one_clear_error(tmp_path, monkeypatch):
    model, optimizer = tiny_module()
    first = save_checkpoint(str(tmp_path), 1, model, optimizer, {})
    root = tmp_path / "checkpoints"
    if os.geteuid() == 0:  # chmod does not stop root: the error a read-only filesystem gives, raised where it would

        def read_only(root, step):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(root))

        monkeypatch.setattr(checkpoint, "new_partial_folder", read_only)
    else:
        os.chmod(root, 0o555)
    try:
        with pytest.raises(
            CheckpointWriteError, match=r"step 2 was not written to .*step-000002: .*(Read-only|denied)"
        ):
            save_checkpoint(str(tmp_path), 2, model, optimizer, {})
    finally:
        os.chmod(root, 0o755)
    assert sorted(os.listdir(root)) == ["latest", "step-000001"] and latest_checkpoint(str(tmp_path)) == first


def test_train_prints_a_failed_save_in_one_line_and_exits_1(tmp_path, monkeypatch, capsys):
    import rlvr_fast.trainer.loop as loop

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    tokenizer = char_tokenizer()
    loaded = LoadedModel(
        tiny_causal_lm(tokenizer, token_bias=TOKEN_BIAS), tokenizer, torch.device("cpu"), torch.float32
    )
    monkeypatch.setattr(loop, "load_model", lambda cfg: loaded)

    def full_disk(tensors, path, metadata=None):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    cfg = tiny_config(tmp_path)
    argv = ["train", "--model", str(model_dir), "--task", cfg.task, "--eval_file", cfg.eval_file, "--train_size", "12"]
    argv += ["--prompts_per_step", "2", "--group_size", "4", "--max_completion_length", "4", "--eval_samples", "1"]
    argv += ["--steps", "1", "--checkpoint_every", "1", "--progress", "false", "--output_dir", str(tmp_path / "out")]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1 and "the checkpoint of step 1 was not written to" in lines[0], err
    assert "No space left on device" in lines[0] and "there is no earlier checkpoint" in lines[0]
    assert not [d for d in os.listdir(tmp_path / "out" / "checkpoints") if d.startswith(".step-")]


# ---- item 3: a torn metrics.jsonl ------------------------------------------------------------------------------------


def test_a_torn_last_metrics_line_is_dropped_with_a_message(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "loss": 1}\n{"step": 1, "loss": 2}\n{"step": 2, "lo')
    messages = []
    log = MetricsLog(str(path), resume_step=2, log=messages.append)
    assert len(messages) == 1 and str(path) in messages[0] and "line 3" in messages[0]
    log.write({"step": 2, "loss": 3})
    assert [r["step"] for r in log.read()] == [0, 1, 2]


def test_a_last_line_without_its_newline_keeps_the_next_record_apart(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0}\n{"step": 1}')  # complete, but the newline was never written
    log = MetricsLog(str(path), resume_step=2, log=lambda m: pytest.fail(m))
    log.write({"step": 2})
    assert [r["step"] for r in log.read()] == [0, 1, 2]


def test_a_damaged_line_before_the_last_is_refused_by_preflight(tmp_path):
    model, optimizer = tiny_module()
    cfg = dataclasses.replace(tiny_config(tmp_path), resume=True)
    save_checkpoint(cfg.output_dir, 1, model, optimizer, {})
    path = os.path.join(cfg.output_dir, "metrics.jsonl")
    with open(path, "w") as f:
        f.write('{"step": 0}\n{"step": 1, "lo\n{"step": 2}\n')
    with pytest.raises(MetricsLogError, match=r"metrics.jsonl line 2 is not a JSON record .*not the last line"):
        resume_point(cfg, log=lambda m: None)


def test_resume_after_a_torn_metrics_line_trains_on(tmp_path, capsys):
    tokenizer = char_tokenizer()

    def loaded():
        model = tiny_causal_lm(tokenizer, token_bias=TOKEN_BIAS)
        return LoadedModel(model, tokenizer, torch.device("cpu"), torch.float32)

    cfg = tiny_config(tmp_path, steps=2, checkpoint_every=1, group_size=4, eval_samples=1)
    Trainer(cfg, loaded=loaded()).train()
    path = os.path.join(cfg.output_dir, "metrics.jsonl")
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:  # checkpoint 2 is newest; the last line cut short as a crash leaves it
        f.write(text.rstrip("\n")[:-10])
    shutil.rmtree(os.path.join(cfg.output_dir, "checkpoints", "step-000002"))
    with open(os.path.join(cfg.output_dir, "checkpoints", "latest"), "w") as f:
        f.write("step-000001\n")
    result = Trainer(dataclasses.replace(cfg, resume=True), loaded=loaded()).train()
    assert [m["step"] for m in result.metrics if "reward_mean" in m] == [0, 1]
    assert "metrics.jsonl line" in capsys.readouterr().err


# ---- item 4: a diverged policy ---------------------------------------------------------------------------------------


def test_draw_tokens_raises_the_trainers_error_on_nan():
    scores = torch.zeros(2, 5)
    scores[1, 2] = float("nan")
    with pytest.raises(DivergedSamplingError, match=r"row 1 contain inf or NaN: the policy diverged") as info:
        draw_tokens(scores, torch.full((2,), 0.5, dtype=torch.float64))
    assert isinstance(info.value, NonFiniteError) and isinstance(info.value, RuntimeError)


@pytest.mark.parametrize("prefix_sharing", ["on", "off"])
def test_nan_logits_in_either_sampling_path_raise_the_trainers_error(prefix_sharing):
    tokenizer = char_tokenizer()
    model = tiny_causal_lm(tokenizer, token_bias=TOKEN_BIAS)
    with torch.no_grad():
        model.lm_head.weight.fill_(float("inf"))  # logits inf / NaN
    gen = HFGeneration(model, tokenizer, 64, prefix_sharing=prefix_sharing)
    with pytest.raises(DivergedSamplingError, match=r"policy diverged"):
        gen.generate(["1+1="], n=2, max_new_tokens=3, temperature=1.0, top_p=1.0, seed=0)


def test_a_rollout_of_a_diverged_policy_names_the_step(tmp_path):
    tokenizer = char_tokenizer()
    model = tiny_causal_lm(tokenizer, token_bias=TOKEN_BIAS)
    trainer = Trainer(tiny_config(tmp_path), loaded=LoadedModel(model, tokenizer, torch.device("cpu"), torch.float32))
    with torch.no_grad():
        model.lm_head.weight.fill_(float("inf"))
    with pytest.raises(DivergedSamplingError, match=r"^step 3: sampling: .*policy diverged.*resume from an earlier"):
        trainer.train_step(3)


def test_absurd_weights_stop_at_the_update_naming_the_parameter():
    model = torch.nn.Linear(3, 2)
    check_update_finite(0, {"loss": 1.0}, model)
    with torch.no_grad():
        model.bias[1] = 3e30
    with pytest.raises(NonFiniteError, match=r"^step 4: parameter 'bias' holds values up to 3e\+30 .*diverged"):
        check_update_finite(4, {"loss": 1.0}, model)


def test_a_learning_rate_of_1e30_stops_before_a_diverged_checkpoint_is_written(tmp_path):
    """``--lr 1e30 --grad_clip none`` used to write a checkpoint of ~1e30 weights, then sampling crashed."""
    tokenizer = char_tokenizer()
    model = tiny_causal_lm(tokenizer, token_bias=TOKEN_BIAS)
    cfg = tiny_config(tmp_path, rewards={"correct": 1.0, "random": 0.5}, checkpoint_every=1, grad_clip=None)
    trainer = Trainer(cfg, loaded=LoadedModel(model, tokenizer, torch.device("cpu"), torch.float32))
    for group in trainer.optimizer.param_groups:  # past the config's bounds: the guard must still stop it
        group["lr"] = 1e30
    with pytest.raises(NonFiniteError, match=r"^step 0: parameter .*(beyond|NaN)"):
        trainer.train()
    assert not (tmp_path / "run" / "checkpoints").exists()
