"""The output folder rule (new, resumed or refused; --overwrite clears it), the failures that used to come only after
the model loaded (now before it, exit 2, the field named), and a NaN/inf update stopping the run at the step."""

import importlib.util
import json
import os

import pytest
import torch
from test_trainer import TOKEN_BIAS, tiny_config

from rlvr_fast.cli import main
from rlvr_fast.testing import char_tokenizer, tiny_causal_lm
from rlvr_fast.trainer.checkpoint import latest_checkpoint, save_checkpoint
from rlvr_fast.trainer.finite_guard import NonFiniteError
from rlvr_fast.trainer.loop import Trainer
from rlvr_fast.trainer.model import LoadedModel
from rlvr_fast.trainer.schema import ConfigFieldError


@pytest.fixture
def no_model_load(monkeypatch):
    import rlvr_fast.trainer.loop as loop

    def refuse(cfg):  # pragma: no cover - reaching it is the failure
        raise AssertionError("the model was loaded before the configuration was checked")

    monkeypatch.setattr(loop, "load_model", refuse)


def tiny_loaded():
    tokenizer = char_tokenizer()
    return LoadedModel(tiny_causal_lm(tokenizer, token_bias=TOKEN_BIAS), tokenizer, torch.device("cpu"), torch.float32)


def fake_earlier_run(output_dir, steps=(3, 4)):
    """An earlier run's folder: its metrics and checkpoints at ``steps`` (a tiny module's, enough for the rule)."""
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    for step in steps:
        save_checkpoint(str(output_dir), step, model, optimizer, {})
    (output_dir / "metrics.jsonl").write_text(json.dumps({"step": 0}) + "\n")
    return sorted(os.listdir(output_dir / "checkpoints"))


def test_a_second_run_into_a_used_folder_is_refused_and_loses_nothing(tmp_path, local_model, no_model_load):
    """Issue 16 item 1: the new run's pruning deleted its own checkpoints; latest pointed at a deleted folder."""
    out = tmp_path / "run"
    out.mkdir()
    before = fake_earlier_run(out)
    with pytest.raises(ConfigFieldError, match=r"output_dir .* holds an earlier run .*--resume true.*--overwrite true"):
        Trainer(tiny_config(tmp_path, output_dir=str(out), model=local_model))
    assert sorted(os.listdir(out / "checkpoints")) == before and (out / "metrics.jsonl").exists()


def test_overwrite_clears_the_earlier_run_then_the_new_run_resumes(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    fake_earlier_run(out)
    cfg = tiny_config(tmp_path, output_dir=str(out), overwrite=True, checkpoint_every=1, rewards={"random": 1.0})
    Trainer(cfg, loaded=tiny_loaded()).train()
    assert sorted(os.listdir(out / "checkpoints")) == ["latest", "step-000001", "step-000002"]
    assert latest_checkpoint(str(out)).endswith("step-000002")
    resumed = tiny_config(tmp_path, output_dir=str(out), resume=True, checkpoint_every=1, rewards={"random": 1.0})
    assert Trainer(resumed, loaded=tiny_loaded()).resume_point.path.endswith("step-000002")


def test_overwrite_refuses_nothing_but_deletes_nothing_outside_a_run(tmp_path):
    """--overwrite on a folder that holds no run is a new run: the user's files stay."""
    from rlvr_fast.trainer.output_dir import prepare_output_dir

    (tmp_path / "notes.txt").write_text("mine")
    assert prepare_output_dir(str(tmp_path), resume=False, overwrite=True) == "new"
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_an_infinite_learning_rate_stops_at_the_step_before_writing(tmp_path, capsys):
    """Issue 16 item 3: lr=inf wrote NaN into every tensor and the checkpoint latest points to."""
    assert main_exit(["train", "--lr", "inf"], capsys)[0] == 2  # refused as a config value first
    cfg = tiny_config(tmp_path, rewards={"correct": 1.0, "random": 0.5}, checkpoint_every=1)
    trainer = Trainer(cfg, loaded=tiny_loaded())
    for group in trainer.optimizer.param_groups:  # past the config check: the guard must still stop it
        group["lr"] = float("inf")
    with pytest.raises(NonFiniteError, match=r"^step 0: .*(NaN|inf)"):
        trainer.train()
    out = tmp_path / "run"
    assert not (out / "checkpoints").exists()
    lines = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []
    assert not any("reward_mean" in json.loads(line) for line in lines)


def main_exit(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    return info.value.code, capsys.readouterr().err


@pytest.fixture
def local_model(tmp_path):
    """A folder that passes the model-source check (the loader itself is patched to fail)."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    return str(folder)


def late_failure_cases(tmp_path, local_model):
    cfg = tiny_config(tmp_path)
    base = ["--model", local_model, "--task", cfg.task, "--eval_file", cfg.eval_file, "--train_size", "12"]
    base += ["--prompts_per_step", "2", "--output_dir", str(tmp_path / "out")]
    a_file = tmp_path / "file"
    a_file.write_text("x")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    cases = {
        "output_dir is a file": (base + ["--output_dir", str(a_file)], "RLVRConfig.output_dir"),
        "empty eval file": (base + ["--eval_file", str(empty)], "RLVRConfig.eval_file"),
        "bad mask_source": (base + ["--optimizer", "sparse_adamw", "--mask_source", "bogus"], "mask_source"),
        "resume without a checkpoint": (base + ["--resume", "true"], "no checkpoint"),
        "model path that does not exist": (base + ["--model", str(tmp_path / "nope")], "RLVRConfig.model"),
        "model folder without config.json": (base + ["--model", str(tmp_path)], "RLVRConfig.model"),
        "unknown reward mode": (base + ["--rewards", "corect=1"], "RLVRConfig.rewards"),
    }
    if importlib.util.find_spec("bitsandbytes") is None:
        cases["adamw8bit without bitsandbytes"] = (base + ["--optimizer", "adamw8bit"], "RLVRConfig.optimizer")
    return cases


def test_late_failures_now_fail_before_the_model_loads(tmp_path, local_model, no_model_load, capsys):
    """Issue 16 item 7: each of these failed only after the 20-50 s model load, with a traceback."""
    for what, (argv, named) in late_failure_cases(tmp_path, local_model).items():
        code, err = main_exit(["train", *argv], capsys)
        assert code == 2 and named in err and "Traceback" not in err, (what, err)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere: no unwritable folder to test with")
def test_unwritable_output_dir_fails_before_the_model_loads(tmp_path, no_model_load):
    from rlvr_fast.trainer.output_dir import check_writable

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    with pytest.raises(ConfigFieldError, match=r"not writable"):
        check_writable(str(locked / "run"))
