"""Checkpoint faults: truncate, delete or corrupt each file of the newest checkpoint in turn; resume falls back to the
previous good one and says why, or refuses naming the path. Also: partial .step-* folders are removed, pruning never
counts another run's checkpoints, NaN never reaches a checkpoint, and loading is strict (train and eval)."""

import dataclasses
import os
import shutil

import pytest
import torch
from helpers.checkpoints import corrupt, tiny_module, truncate
from helpers.runs import TOKEN_BIAS, tiny_config
from safetensors.torch import save_file

from rlvr_fast.testing import char_tokenizer, tiny_causal_lm
from rlvr_fast.trainer.checkpoint.folder import MANIFEST, latest_checkpoint, load_model_weights
from rlvr_fast.trainer.checkpoint.local import FILES, save_checkpoint
from rlvr_fast.trainer.checkpoint.strict_loading import CheckpointError
from rlvr_fast.trainer.checks.preflight import resume_point
from rlvr_fast.trainer.loop import Trainer
from rlvr_fast.trainer.model import LoadedModel
from rlvr_fast.trainer.schema import ConfigFieldError


def loaded(tokenizer, **kw):
    return LoadedModel(
        tiny_causal_lm(tokenizer, token_bias=TOKEN_BIAS, **kw), tokenizer, torch.device("cpu"), torch.float32
    )


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tokenizer):
    """A 2-step run with a checkpoint after each step: checkpoints/step-000001 and step-000002."""
    tmp = tmp_path_factory.mktemp("run")
    cfg = tiny_config(tmp, steps=2, checkpoint_every=1)
    Trainer(cfg, loaded=loaded(tokenizer)).train()
    root = tmp / "run" / "checkpoints"
    assert sorted(os.listdir(root)) == ["latest", "step-000001", "step-000002"]
    return tmp, cfg


def copy_run(finished_run, tmp_path):
    """A copy of the finished run's folder and its config with resume=True (same task files: the same run)."""
    src, cfg = finished_run
    shutil.copytree(src / "run", tmp_path / "run")
    return dataclasses.replace(cfg, output_dir=str(tmp_path / "run"), resume=True)


FAULTS = {"truncate": truncate, "delete": os.remove, "corrupt": corrupt}


@pytest.mark.parametrize("fault", sorted(FAULTS))
@pytest.mark.parametrize("name", [*FILES, MANIFEST])
def test_a_fault_in_the_newest_checkpoint_falls_back_to_the_previous_one(finished_run, tmp_path, name, fault):
    cfg = copy_run(finished_run, tmp_path)
    newest = tmp_path / "run" / "checkpoints" / "step-000002"
    FAULTS[fault](newest / name)
    messages = []
    point = resume_point(cfg, log=messages.append)
    assert point.path.endswith("step-000001") and point.state["step"] == 1
    said = "\n".join(messages)
    assert str(newest) in said and "falling back" in said, said
    assert name in said or MANIFEST in said, said
    # the bad checkpoint is set aside (kept, out of every count) and latest points at the good one
    assert latest_checkpoint(str(tmp_path / "run")).endswith("step-000001")
    assert os.path.isdir(str(newest) + ".bad") and not newest.exists()


def test_no_usable_checkpoint_refuses_naming_every_path(finished_run, tmp_path):
    cfg = copy_run(finished_run, tmp_path)
    root = tmp_path / "run" / "checkpoints"
    truncate(root / "step-000002" / "model.safetensors")
    os.remove(root / "step-000001" / "optimizer.safetensors")
    with pytest.raises(CheckpointError, match=r"no usable checkpoint") as info:
        resume_point(cfg, log=lambda m: None)
    assert "step-000002/model.safetensors" in str(info.value) and "step-000001/optimizer.safetensors" in str(info.value)


def test_resume_after_a_truncated_checkpoint_trains_from_the_previous_one(finished_run, tmp_path, tokenizer, capsys):
    cfg = copy_run(finished_run, tmp_path)
    truncate(tmp_path / "run" / "checkpoints" / "step-000002" / "model.safetensors")
    trainer = Trainer(cfg, loaded=loaded(tokenizer, seed=99))
    assert trainer.resume_point.path.endswith("step-000001")
    result = trainer.train()  # redoes step 2 from step 1's state
    assert [m["step"] for m in result.metrics if "reward_mean" in m] == [0, 1]
    assert latest_checkpoint(cfg.output_dir).endswith("step-000002")
    assert "falling back" in capsys.readouterr().err


def test_partial_checkpoint_folders_are_removed(finished_run, tmp_path):
    cfg = copy_run(finished_run, tmp_path)
    partial = tmp_path / "run" / "checkpoints" / ".step-000003-abc"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"\0" * 1000)
    messages = []
    resume_point(cfg, log=messages.append)
    assert not partial.exists() and "partial" in messages[0]


def test_pruning_never_counts_another_runs_later_checkpoints(tmp_path):
    """An earlier run's step-3/4 in the folder made pruning delete the steps just written."""
    model, optimizer = tiny_module()
    for step in (3, 4):
        save_checkpoint(str(tmp_path), step, model, optimizer, {})
    for step in (1, 2):
        save_checkpoint(str(tmp_path), step, model, optimizer, {})
    root = tmp_path / "checkpoints"
    assert {"step-000001", "step-000002"} <= set(os.listdir(root))
    assert latest_checkpoint(str(tmp_path)).endswith("step-000002")


def test_pruning_keeps_the_two_newest(tmp_path):
    model, optimizer = tiny_module()
    for step in (1, 2, 3):
        save_checkpoint(str(tmp_path), step, model, optimizer, {})
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["latest", "step-000002", "step-000003"]


def test_a_nan_tensor_is_never_written(tmp_path):
    model, optimizer = tiny_module()
    save_checkpoint(str(tmp_path), 1, model, optimizer, {})
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"step 2: model tensor 'weight' holds NaN"):
        save_checkpoint(str(tmp_path), 2, model, optimizer, {})
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["latest", "step-000001"]
    assert latest_checkpoint(str(tmp_path)).endswith("step-000001")


@pytest.mark.parametrize("kind", ["other_model", "empty", "one_tensor"])
def test_loading_is_strict(tmp_path, tokenizer, kind):
    """eval --checkpoint used to silently evaluate the base model on such checkpoints."""
    model = tiny_causal_lm(tokenizer, token_bias=TOKEN_BIAS)
    state = {n: t.clone().contiguous() for n, t in model.state_dict().items()}
    if kind == "other_model":
        other = tiny_causal_lm(tokenizer, arch="qwen2", token_bias=TOKEN_BIAS)
        weights = {n: t.clone().contiguous() for n, t in other.state_dict().items()}
    elif kind == "empty":
        weights = {}
    else:
        name = next(iter(state))
        weights = {name: state[name]}
    save_file(weights, str(tmp_path / "model.safetensors"))
    before = {n: t.clone() for n, t in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"does not match the model"):
        load_model_weights(str(tmp_path), model)
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())  # nothing half-loaded


def test_eval_refuses_a_checkpoint_of_another_model(tmp_path, tokenizer):
    from rlvr_fast.trainer.evaluation.command import run_eval

    cfg = tiny_config(tmp_path)
    other = tiny_causal_lm(tokenizer, arch="qwen2", token_bias=TOKEN_BIAS)
    save_file({n: t.clone().contiguous() for n, t in other.state_dict().items()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"does not match the model"):
        run_eval(cfg, checkpoint=str(tmp_path), loaded=loaded(tokenizer))


def test_eval_cli_refuses_a_checkpoint_folder_without_weights(tmp_path, capsys, monkeypatch):
    import rlvr_fast.trainer.checks.preflight as preflight
    import rlvr_fast.trainer.evaluation.command as evaluate_cli
    from rlvr_fast.cli import main

    monkeypatch.setattr(preflight, "check_model_source", lambda model: None)
    monkeypatch.setattr(evaluate_cli, "load_model", lambda cfg: pytest.fail("loaded the model"))
    cfg = tiny_config(tmp_path)
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(SystemExit) as info:
        main(["eval", "--task", cfg.task, "--eval_file", cfg.eval_file, "--checkpoint", str(tmp_path / "ckpt")])
    assert info.value.code == 2 and "no model.safetensors" in capsys.readouterr().err


def test_resume_refuses_a_changed_run_and_accepts_a_changed_cadence(finished_run, tmp_path):
    """Group size and learning rate used to change silently on resume."""
    cfg = copy_run(finished_run, tmp_path)
    cfg.group_size, cfg.lr = 4, 1e-4
    with pytest.raises(ConfigFieldError, match=r"group_size: 8 -> 4.*lr: 0.01 -> 0.0001"):
        resume_point(cfg, log=lambda m: None)
    cfg = copy_run(finished_run, tmp_path / "again")
    cfg.steps, cfg.eval_every, cfg.checkpoint_every, cfg.progress = 5, 2, 3, True
    assert resume_point(cfg, log=lambda m: None).path.endswith("step-000002")


def test_checkpoint_of_another_config_fails_verification(finished_run, tmp_path):
    from rlvr_fast.trainer.checkpoint.folder import verify_checkpoint

    cfg = copy_run(finished_run, tmp_path)
    newest = os.path.join(cfg.output_dir, "checkpoints", "step-000002")
    assert verify_checkpoint(newest, config_hash=cfg.run_hash()) is None
    cfg.seed = 1
    assert "another config" in verify_checkpoint(newest, config_hash=cfg.run_hash())
