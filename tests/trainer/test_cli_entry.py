"""The entry points as a user starts them: ``python -m rlvr_fast`` and ``torchrun -m rlvr_fast`` from the
clone's root, where the top-level ``kernels/`` would shadow the PyPI package ``kernels`` that transformers imports; and
a refusal under torchrun, which is one line (not one traceback per rank) with the usage text left out."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.runs import saved_tiny_model

from rlvr_fast import cli
from rlvr_fast.cli import main

ROOT = Path(__file__).resolve().parents[2]


def clone_root_env() -> dict:
    """The environment of a user's shell: no PYTHONSAFEPATH (conftest sets it for the tests), nothing of torchrun."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    for name in ("PYTHONSAFEPATH", "PYTHONPATH", "WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def run(argv: list[str], cwd, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, env=clone_root_env(), capture_output=True, text=True, timeout=timeout)


def test_the_clone_root_shadows_kernels_for_plain_python():
    """The hazard itself: from the root, a plain ``python -c`` imports our kernels/ as ``kernels`` (so -m needs the
    fix below; if this ever stops holding, the root no longer shadows anything)."""
    done = run([sys.executable, "-c", "import kernels; print(kernels.__file__)"], cwd=ROOT)
    assert done.returncode == 0 and Path(done.stdout.strip()).parent == ROOT / "kernels", done.stdout + done.stderr


def test_python_m_rlvr_fast_works_from_the_clone_root(tmp_path):
    """`python -m rlvr_fast train --help`, and a command that loads a model class through transformers (which imports
    the PyPI `kernels`): before the fix, ImportError: cannot import name 'CUDAProperties' from 'kernels'."""
    done = run([sys.executable, "-m", "rlvr_fast", "train", "--help"], cwd=ROOT)
    assert done.returncode == 0 and "--max_completion_length" in done.stdout, done.stderr
    model = saved_tiny_model(tmp_path)
    task, held_out = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    task.write_text('{"prompt": "1 + 1 =", "answer": "2"}\n')
    held_out.write_text('{"prompt": "2 + 2 =", "answer": "4"}\n')
    flags = dict(model=model, task=task, eval_file=held_out, train_size=1, eval_size=1, eval_samples=1)
    flags.update(prompts_per_step=1, max_completion_length=1, device="cpu", progress="false")
    argv = [sys.executable, "-m", "rlvr_fast", "eval", *[f"--{k}={v}" for k, v in flags.items()]]
    done = run(argv, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "CUDAProperties" not in done.stderr


def test_torchrun_m_rlvr_fast_help_works_from_the_clone_root():
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    done = run([*torchrun, "-m", "rlvr_fast", "train", "--help"], cwd=ROOT)
    assert done.returncode == 0 and "--max_completion_length" in done.stdout, done.stderr


def torchrun_refusal(tmp_path, argv: list[str]) -> str:
    """stderr of ``torchrun --nproc_per_node=2 -m rlvr_fast train <argv>`` started in ``tmp_path``."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    done = run([*torchrun, "-m", "rlvr_fast", "train", *argv], cwd=tmp_path)
    assert done.returncode != 0, done.stderr
    return done.stderr


def assert_one_line(err: str, message: str) -> None:
    """The message once, no rank's traceback, no usage text. torchrun's own agent still ends with its
    ChildFailedError report (a traceback of torchrun's frames only), which names rank 0's exit status 2."""
    assert err.count(message) == 1, err
    assert "[rank" not in err and "usage:" not in err, err
    assert f"{os.sep}rlvr_fast{os.sep}" not in err.split("ChildFailedError")[0], err  # no frame of ours
    assert err.count("Traceback") <= 1 and "exitcode  : 2" in err, err


def test_a_refusal_under_torchrun_is_one_line(tmp_path):
    """A pre-load refusal (a file where output_dir should be): one line from the world, not a traceback from every
    rank (a bad flag, the other path to a refusal, is the in-process test below)."""
    (tmp_path / "afile").write_text("x")
    model = saved_tiny_model(tmp_path)  # not the default model: the README's test install leaves it out
    err = torchrun_refusal(tmp_path, ["--model", model, "--output_dir", "afile", "--device", "cpu"])
    assert_one_line(err, "rlvr-fast train: error: RLVRConfig.output_dir 'afile' exists and is not a folder")


def test_a_flag_error_on_a_torchrun_rank_is_one_line(monkeypatch, capsys):
    """In process: rank 0 of a world prints the argparse error alone, without the usage text each rank would print."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit) as info:
        main(["train", "--lr", "-1"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith("rlvr-fast train: error: argument --lr: RLVRConfig.lr must be > 0"), err


@pytest.mark.parametrize("rank", ["0", "1"])
def test_a_world_refusal_is_said_by_rank_0_or_late_by_its_own_rank(rank, monkeypatch, capsys, tmp_path):
    """prompts_per_step that does not split into whole groups per rank used to raise in every rank's Trainer (a
    traceback each); now every rank refuses it before joining the group, rank 0 at once, another rank only after the
    grace period in which torchrun would have stopped it (here 0 s), tagged with its rank."""
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setattr("rlvr_fast.cli.NON_MAIN_RANK_GRACE_S", 0.0)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")  # a model folder as the model-source check wants it
    argv = ["train", "--model", str(tmp_path / "model"), "--device", "cpu", "--prompts_per_step", "4"]
    argv += ["--output_dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1, err
    prefix = "" if rank == "0" else "[rank 1] "
    assert err.startswith(f"{prefix}rlvr-fast train: error: RLVRConfig.prompts_per_step must divide by the world size")


@pytest.mark.parametrize(
    "argv,prog,message",
    [
        (["train", "--temperature", "1e-300"], "rlvr-fast train", "argument --temperature: RLVRConfig.temperature"),
        (["train", "--temperature", "nan"], "rlvr-fast train", "argument --temperature: RLVRConfig.temperature"),
        (["train", "--lr", "1e30"], "rlvr-fast train", "argument --lr: RLVRConfig.lr"),
        (["train", "--seed", str(2**64)], "rlvr-fast train", "argument --seed: RLVRConfig.seed"),
        (["train", "--seed", "-1"], "rlvr-fast train", "argument --seed: RLVRConfig.seed"),
        (["train", "--eval_size", "0"], "rlvr-fast train", "argument --eval_size/--eval-size: RLVRConfig.eval_size"),
        (["eval", "--eval_size", "0"], "rlvr-fast eval", "argument --eval_size/--eval-size: RLVRConfig.eval_size"),
        (["study", "--set", "lr"], "rlvr-fast study", "argument --set: expected key=value, got 'lr'"),
        (["train", "--no_such_flag", "3"], "rlvr-fast train", "unrecognized arguments: --no_such_flag 3"),
        (["trian"], "rlvr-fast", "argument command: invalid choice: 'trian'"),
        ([], "rlvr-fast", "the following arguments are required: command"),
    ],
)
def test_a_flag_error_is_one_line_on_one_process(argv, prog, message, capsys, monkeypatch):
    """An error the argument parser catches used to print argparse's usage block (47 lines for train:
    every option) before its one error line. Now any command's parser error is that line alone, exit 2, naming the
    command and pointing at its --help."""
    for name in ("WORLD_SIZE", "RANK"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SystemExit) as info:
        main(argv)
    captured = capsys.readouterr()
    assert info.value.code == 2 and captured.out == "", captured
    assert captured.err.count("\n") == 1 and "usage:" not in captured.err, captured.err
    assert captured.err.startswith(f"{prog}: error: {message}"), captured.err
    assert captured.err.rstrip().endswith(f"({prog} --help lists every option)"), captured.err


@pytest.mark.parametrize("rank", ["0", "1"])
def test_a_checkpoint_write_error_under_torchrun_is_said_by_rank_0(rank, monkeypatch, capsys, tmp_path):
    """A checkpoint a full disk refused (every rank raises it) used to print the same error line once per
    rank. Rank 0 says it at once; another rank keeps quiet for the grace period in which torchrun stops it after rank
    0's exit status 1, and only then says it, tagged with its rank. Both exit 1."""
    from rlvr_fast.trainer import loop
    from rlvr_fast.trainer.checkpoint.strict_loading import CheckpointWriteError
    from rlvr_fast.trainer.checks import capacity, preflight

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setattr(preflight, "preflight", lambda cfg: None)
    monkeypatch.setattr(capacity, "check_world", lambda cfg: None)

    def full_disk(cfg):
        raise CheckpointWriteError("checkpoint step 4 to out/checkpoints/step-4: [Errno 28] No space left on device")

    monkeypatch.setattr(loop, "train", full_disk)
    said_before_sleeping = []

    def sleep(seconds):  # torchrun would stop this rank here; record what it had said by then
        said_before_sleeping.append((seconds, capsys.readouterr().err))

    monkeypatch.setattr("rlvr_fast.cli.time.sleep", sleep)
    code = main(["train", "--device", "cpu", "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    line = "rlvr-fast train: error: checkpoint step 4 to out/checkpoints/step-4: [Errno 28] No space left on device"
    assert code == 1
    if rank == "0":
        assert err == line + "\n" and said_before_sleeping == []
    else:
        assert said_before_sleeping == [(cli.NON_MAIN_RANK_GRACE_S, "")]
        assert err == f"[rank 1] {line}\n"
