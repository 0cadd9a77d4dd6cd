"""One run per output folder. Two runs started together on one folder deleted each other's
checkpoints and wrote one metrics.jsonl; now the folder is locked (``run_lock``) for the life of a run, before
anything in it is deleted, and a second run is refused before the model loads, naming the holder."""

import json
import os
import subprocess
import sys

import pytest
from helpers.checkpoints import fake_earlier_run
from helpers.runs import main_exit, tiny_config, tiny_loaded

from rlvr_fast.trainer.checkpoint.output_dir import prepare_output_dir
from rlvr_fast.trainer.checkpoint.run_lock import LOCK_FILE, RunLock, holds_run_lock, release_run_lock
from rlvr_fast.trainer.checks.preflight import preflight
from rlvr_fast.trainer.loop import Trainer
from rlvr_fast.trainer.schema import ConfigFieldError

HOLDER = """
import sys
from rlvr_fast.trainer.checkpoint.run_lock import RunLock
RunLock(sys.argv[1]).acquire()
print("held", flush=True)
sys.stdin.read()  # until killed
"""


@pytest.fixture
def other_process(tmp_path):
    """Start a process holding the lock of a folder; yields (folder, process). Killed (-9) at the end if alive."""
    out = tmp_path / "run"
    out.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == b"held"
    yield out, proc
    proc.kill()
    proc.wait()


def cli_args(tmp_path, local_model, out) -> list[str]:
    cfg = tiny_config(tmp_path)
    return ["train", "--model", local_model, "--task", cfg.task, "--eval_file", cfg.eval_file, "--train_size", "12",
            "--prompts_per_step", "2", "--output_dir", str(out)]  # fmt: skip


def test_a_second_run_is_refused_then_takes_over_when_the_first_is_killed(
    tmp_path, other_process, local_model, no_model_load, capsys
):
    """The reported case, as two processes: B is refused (exit 2, before the model loads, naming A's PID and host)
    and deletes nothing of A's; once A is killed -9 its lock is stale and taken over, with a message."""
    out, proc = other_process
    fake_earlier_run(out, steps=(1,))
    (out / "checkpoints" / ".step-000002-inflight").mkdir()  # A's checkpoint being written
    before = sorted(os.listdir(out / "checkpoints"))
    for extra in (["--overwrite", "true"], ["--resume", "true"], []):
        code, err = main_exit([*cli_args(tmp_path, local_model, out), *extra], capsys)
        assert code == 2 and "RLVRConfig.output_dir" in err and "Traceback" not in err, (extra, err)
        assert f"in use by another run (PID {proc.pid} on host" in err, err
        assert sorted(os.listdir(out / "checkpoints")) == before and (out / "metrics.jsonl").exists(), extra

    proc.kill()
    proc.wait()
    messages = []
    cfg = tiny_config(tmp_path, output_dir=str(out), overwrite=True)
    try:
        preflight(cfg, check_model=False, log=messages.append)
        assert holds_run_lock(str(out))
        assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()
    finally:
        release_run_lock(str(out))
    assert any(f"taking over the lock left by a run that has ended (PID {proc.pid}" in m for m in messages), messages
    assert not (out / "checkpoints").exists()  # the overwrite went ahead once the folder was ours


def test_a_held_lock_refuses_the_trainer_before_anything_is_deleted(tmp_path):
    """Another holder (an open descriptor of its own, like another process's) refuses preflight in Trainer, and
    the resume's cleanup of partial checkpoints does not run."""
    out = tmp_path / "run"
    out.mkdir()
    fake_earlier_run(out)
    (out / "checkpoints" / ".step-000005-inflight").mkdir()
    before = sorted(os.listdir(out / "checkpoints"))
    holder = RunLock(str(out))
    holder.acquire()
    try:
        for flags in ({"resume": True}, {"overwrite": True}):
            with pytest.raises(ConfigFieldError, match=rf"in use by another run \(PID {os.getpid()} on host") as info:
                Trainer(tiny_config(tmp_path, output_dir=str(out), **flags), loaded=tiny_loaded())
            assert info.value.field == "output_dir"
            assert sorted(os.listdir(out / "checkpoints")) == before, flags
    finally:
        holder.release()
    assert not (out / LOCK_FILE).exists()


def test_a_stale_lock_of_a_dead_pid_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "run"
    out.mkdir()
    record = {"pid": dead.pid, "host": "elsewhere", "started": "2024-01-01T00:00:00", "command": "rlvr-fast train"}
    (out / LOCK_FILE).write_text(json.dumps(record))
    messages = []
    try:
        assert prepare_output_dir(str(out), resume=False, overwrite=False, log=messages.append) == "new"
        assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()
    finally:
        release_run_lock(str(out))
    assert any(f"taking over the lock left by a run that has ended (PID {dead.pid} on host elsewhere" in m
               for m in messages), messages  # fmt: skip


def test_the_lock_is_reentrant_held_through_the_run_and_released_after_train(tmp_path):
    """preflight runs twice in one process (cli.py, then Trainer): the second is no refusal and the overwrite does
    not delete the lock. Released when train() returns, and when it raises."""
    out = tmp_path / "run"
    out.mkdir()
    fake_earlier_run(out)
    cfg = tiny_config(tmp_path, output_dir=str(out), overwrite=True, rewards={"random": 1.0})
    preflight(cfg, check_model=False)  # as cli.py does
    trainer = Trainer(cfg, loaded=tiny_loaded())  # and again in the Trainer
    assert holds_run_lock(str(out)) and json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()
    with pytest.raises(ConfigFieldError, match="in use by another run"):  # another descriptor: refused
        RunLock(str(out)).acquire()
    trainer.train()
    assert not holds_run_lock(str(out)) and not (out / LOCK_FILE).exists()
    free = RunLock(str(out))
    free.acquire()  # nobody holds it now
    free.release()

    resumed = tiny_config(tmp_path, output_dir=str(out), resume=True, rewards={"random": 1.0})
    failing = Trainer(resumed, loaded=tiny_loaded())
    assert holds_run_lock(str(out))

    def broken_eval():
        raise RuntimeError("the evaluation failed")

    failing.evaluate = broken_eval  # train() raises at its evaluation after training
    with pytest.raises(RuntimeError, match="the evaluation failed"):
        failing.train()
    assert not holds_run_lock(str(out)) and not (out / LOCK_FILE).exists()


def test_a_refused_folder_is_not_left_locked(tmp_path):
    """A folder refused for holding an earlier run keeps no lock of this process (nor a new lock file)."""
    out = tmp_path / "run"
    out.mkdir()
    fake_earlier_run(out)
    with pytest.raises(ConfigFieldError, match="holds an earlier run"):
        prepare_output_dir(str(out), resume=False, overwrite=False)
    assert not holds_run_lock(str(out)) and not (out / LOCK_FILE).exists()


def test_a_lock_file_alone_is_no_run(tmp_path):
    """A run killed before writing anything leaves only its lock file: the folder is free for a new run."""
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_FILE).write_text("")
    try:
        assert prepare_output_dir(str(out), resume=False, overwrite=False, log=lambda m: None) == "new"
    finally:
        release_run_lock(str(out))


def test_a_symlinked_lock_file_is_refused_not_followed(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    target = tmp_path / "elsewhere.txt"
    target.write_text("not a lock")
    (out / LOCK_FILE).symlink_to(target)
    with pytest.raises(ConfigFieldError, match=r"output_dir .*cannot open the run lock .*expected a regular file"):
        prepare_output_dir(str(out), resume=False, overwrite=False)
    assert target.read_text() == "not a lock"
