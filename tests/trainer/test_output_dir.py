"""The output folder rule (new, resumed or refused; --overwrite clears it), the failures that used to come only after
the model loaded (now before it, exit 2, the field named), and a NaN/inf update stopping the run at the step."""

import importlib.util
import json
import os
from pathlib import Path

import pytest
from helpers.checkpoints import fake_earlier_run
from helpers.runs import main_exit, tiny_config, tiny_loaded

from rlvr_fast.cli import main
from rlvr_fast.trainer.checkpoint.folder import latest_checkpoint
from rlvr_fast.trainer.loop import Trainer
from rlvr_fast.trainer.schema import ConfigFieldError
from rlvr_fast.trainer.update.finite_guard import NonFiniteError


def test_a_second_run_into_a_used_folder_is_refused_and_loses_nothing(tmp_path, local_model, no_model_load):
    """The new run's pruning used to delete its own checkpoints; latest pointed at a deleted folder."""
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
    from rlvr_fast.trainer.checkpoint.output_dir import prepare_output_dir

    (tmp_path / "notes.txt").write_text("mine")
    assert prepare_output_dir(str(tmp_path), resume=False, overwrite=True) == "new"
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_an_infinite_learning_rate_stops_at_the_step_before_writing(tmp_path, capsys):
    """lr=inf used to write NaN into every tensor and the checkpoint latest points to."""
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
    """Each of these used to fail only after the 20-50 s model load, with a traceback."""
    for what, (argv, named) in late_failure_cases(tmp_path, local_model).items():
        code, err = main_exit(["train", *argv], capsys)
        assert code == 2 and named in err and "Traceback" not in err, (what, err)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere: no unwritable folder to test with")
def test_unwritable_output_dir_fails_before_the_model_loads(tmp_path, no_model_load):
    from rlvr_fast.trainer.checkpoint.output_dir import check_writable

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    with pytest.raises(ConfigFieldError, match=r"not writable"):
        check_writable(str(locked / "run"))


# --------------------------------------------------------------------------------------------------------------------
# --overwrite deletes only what a run writes
# --------------------------------------------------------------------------------------------------------------------


def overwrite(folder) -> list[str]:
    """``prepare_output_dir(..., overwrite=True)`` on ``folder``; returns its messages (the lock it takes released)."""
    from rlvr_fast.trainer.checkpoint.output_dir import prepare_output_dir
    from rlvr_fast.trainer.checkpoint.run_lock import release_run_lock

    messages = []
    try:
        assert prepare_output_dir(str(folder), resume=False, overwrite=True, log=messages.append) == "overwritten"
    finally:
        release_run_lock(str(folder))
    return messages


def test_overwrite_leaves_the_users_files_beside_a_run_and_names_them(tmp_path):
    """The reported case: report.md beside src/, data/ and thesis.tex; --overwrite deleted all of them."""
    out = tmp_path / "thesis"
    (out / "src").mkdir(parents=True)
    (out / "src" / "main.py").write_text("print('mine')\n")
    (out / "data").mkdir()
    (out / "data" / "dataset.jsonl").write_text("{}\n")
    (out / "thesis.tex").write_text("\\section{mine}\n")
    (out / "report.md").write_text("# rlvr_fast run report\n\nthe earlier run's\n")
    fake_earlier_run(out)
    messages = overwrite(out)
    assert (out / "src" / "main.py").read_text() == "print('mine')\n"
    assert (out / "data" / "dataset.jsonl").read_text() == "{}\n"
    assert (out / "thesis.tex").exists()
    assert not (out / "report.md").exists() and not (out / "checkpoints").exists()
    assert not (out / "metrics.jsonl").exists()
    left = [m for m in messages if "left" in m]
    assert len(left) == 1 and all(name in left[0] for name in ("data", "src", "thesis.tex")), messages
    assert any("deleted" in m and "report.md" in m and "checkpoints" in m for m in messages), messages


def test_overwrite_keeps_foreign_entries_of_checkpoints(tmp_path):
    """checkpoints/ is deleted only when everything in it is checkpoint.py's; other entries stay, named."""
    out = tmp_path / "run"
    out.mkdir()
    fake_earlier_run(out)
    ckpt = out / "checkpoints"
    (ckpt / "step-000002.bad").mkdir()  # set aside on resume
    (ckpt / ".step-000005-abc").mkdir()  # a partial write
    (ckpt / ".tmp-xyz").write_text("step-000004\n")  # latest's replacement in flight
    (ckpt / "my_notes.txt").write_text("mine")
    (ckpt / "other_tool").mkdir()
    messages = overwrite(out)
    assert sorted(os.listdir(ckpt)) == ["my_notes.txt", "other_tool"]
    assert any("checkpoints/my_notes.txt" in m and "checkpoints/other_tool" in m for m in messages), messages


def test_overwrite_never_follows_a_symlink_out_of_the_folder(tmp_path):
    outside = tmp_path / "outside"
    (outside / "ckpts" / "step-000001").mkdir(parents=True)
    (outside / "ckpts" / "step-000001" / "model.safetensors").write_text("weights")
    (outside / "report.md").write_text("someone else's report")
    (outside / "precious").mkdir()
    (outside / "precious" / "a.txt").write_text("a")
    out = tmp_path / "run"
    out.mkdir()
    fake_earlier_run(out)
    (out / "checkpoints" / "precious").symlink_to(outside / "precious")  # not ours, no name the run writes: left
    (out / "report.md").symlink_to(outside / "report.md")  # a run's name: the link goes, its target stays
    (out / "eval_before.json").symlink_to(outside / "ckpts")
    messages = overwrite(out)
    assert (outside / "ckpts" / "step-000001" / "model.safetensors").read_text() == "weights"
    assert (outside / "report.md").read_text() == "someone else's report"
    assert (outside / "precious" / "a.txt").read_text() == "a"
    assert not os.path.lexists(out / "report.md") and not os.path.lexists(out / "eval_before.json")
    assert os.listdir(out / "checkpoints") == ["precious"]
    assert any("checkpoints/precious" in m for m in messages), messages

    linked = tmp_path / "linked"  # checkpoints/ itself a symlink: unlinked, the folder it points to untouched
    linked.mkdir()
    (linked / "metrics.jsonl").write_text(json.dumps({"step": 0}) + "\n")
    (linked / "checkpoints").symlink_to(outside / "ckpts")
    overwrite(linked)
    assert not os.path.lexists(linked / "checkpoints")
    assert (outside / "ckpts" / "step-000001" / "model.safetensors").read_text() == "weights"


def test_run_artifacts_name_everything_a_run_writes(tmp_path):
    """RUN_ARTIFACTS is the single list: a real run (and a study's additions) writes nothing outside it, so
    --overwrite can clear every run it refuses."""
    from rlvr_fast.study.updates import MASK_FILES, UPDATE_FILE
    from rlvr_fast.trainer.checkpoint.output_dir import CHECKPOINT_ENTRY, RUN_ARTIFACTS

    out = tmp_path / "run"
    cfg = tiny_config(tmp_path, output_dir=str(out), checkpoint_every=1, rewards={"random": 1.0})
    Trainer(cfg, loaded=tiny_loaded()).train()
    assert set(os.listdir(out)) <= set(RUN_ARTIFACTS), sorted(set(os.listdir(out)) - set(RUN_ARTIFACTS))
    assert {"metrics.jsonl", "report.md", "checkpoints"} <= set(os.listdir(out))
    assert all(CHECKPOINT_ENTRY.fullmatch(name) for name in os.listdir(out / "checkpoints"))
    for name in (UPDATE_FILE, *MASK_FILES.values()):  # study/updates.py writes them via <name>.tmp
        assert name in RUN_ARTIFACTS and name + ".tmp" in RUN_ARTIFACTS, name


def test_a_dangling_symlink_output_dir_is_refused_before_the_model_loads(tmp_path, local_model, no_model_load, capsys):
    """It used to pass check_writable and fail late, at the first write."""
    from rlvr_fast.trainer.checkpoint.output_dir import check_writable

    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "gone")
    with pytest.raises(ConfigFieldError, match=r"output_dir .*dangling.*symlink to .*gone.*does not exist") as info:
        check_writable(str(dangling))
    assert info.value.field == "output_dir"
    argv = late_failure_cases(tmp_path, local_model)["empty eval file"][0][:-2]  # the base arguments
    code, err = main_exit(["train", *argv, "--output_dir", str(dangling)], capsys)
    assert code == 2 and "does not exist" in err and "Traceback" not in err


# --------------------------------------------------------------------------------------------------------------------
# --overwrite deletes by content, with evidence of a run; messages once
# --------------------------------------------------------------------------------------------------------------------


def refused(folder, overwrite_it=True) -> str:
    """``prepare_output_dir`` on ``folder``, which must refuse it; returns the message (no lock left held)."""
    from rlvr_fast.trainer.checkpoint.output_dir import prepare_output_dir
    from rlvr_fast.trainer.checkpoint.run_lock import holds_run_lock

    with pytest.raises(ConfigFieldError) as info:
        prepare_output_dir(str(folder), resume=False, overwrite=overwrite_it, log=lambda m: None)
    assert info.value.field == "output_dir" and not holds_run_lock(str(folder))
    return str(info.value)


def tree(folder) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes) and every folder (-> b"<dir>"), the lock file aside."""
    out = {}
    for top, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(top, name)
            rel = os.path.relpath(path, folder)
            if name != ".rlvr-fast.lock":
                out[rel] = b"<dir>" if os.path.isdir(path) else Path(path).read_bytes()
    return out


def test_overwrite_deletes_nothing_of_a_folder_without_a_run(tmp_path):
    """The verifier's repro: a user's report.md (no run there) was taken for an earlier run and deleted."""
    out = tmp_path / "ow2"
    (out / "src").mkdir(parents=True)
    (out / "report.md").write_text("my report\n")
    for overwrite_it in (True, False):
        message = refused(out, overwrite_it)
        assert "report.md" in message and "no run of rlvr_fast" in message and "move them" in message, message
    assert (out / "report.md").read_text() == "my report\n" and (out / "src").is_dir()

    users = tmp_path / "users"  # run-named files of the user's, content not a run's: no evidence, nothing deleted
    users.mkdir()
    (users / "metrics.jsonl").write_text("loss 0.3\nloss 0.2\n")
    (users / "eval_before.json").write_text(json.dumps({"accuracy": 0.5}))
    (users / "reward_curve.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)  # a PNG, but not a run's plot
    before = tree(users)
    assert "no run of rlvr_fast" in refused(users)
    assert tree(users) == before


def test_overwrite_refuses_a_users_file_with_a_runs_name_beside_a_run(tmp_path):
    """Beside a real run, a user's report.md would be deleted by name (or written over by the new run): refused,
    named, nothing deleted."""
    out = tmp_path / "run"
    out.mkdir()
    fake_earlier_run(out)
    (out / "report.md").write_text("my report\n")
    before = tree(out)
    message = refused(out)
    assert "report.md (not what reporting/report.py writes)" in message and "deleted nothing" in message, message
    assert tree(out) == before


def test_a_users_file_inside_a_checkpoint_folder_survives_and_is_named(tmp_path):
    """checkpoints/step-000004/ of a real run plus a user's file: no longer exactly its manifest's files, so not
    ours; the new run would prune or replace that folder, so --overwrite refuses, naming the folder and the file."""
    out = tmp_path / "run"
    out.mkdir()
    fake_earlier_run(out)
    (out / "checkpoints" / "step-000004" / "notes.txt").write_text("mine")
    before = tree(out)
    message = refused(out)
    assert "checkpoints/step-000004" in message and "notes.txt" in message, message
    assert tree(out) == before


def test_a_users_step_folder_in_checkpoints_survives(tmp_path):
    """checkpoints/step-7/ (a user's, by its name a checkpoint's) was rmtree'd; now a step folder goes only when it
    is a checkpoint of ours. Partial .step-* folders go when they hold only files checkpoint code writes."""
    out = tmp_path / "run"
    out.mkdir()
    fake_earlier_run(out)
    ckpt = out / "checkpoints"
    (ckpt / "step-7").mkdir()
    (ckpt / "step-7" / "weights.bin").write_text("mine")
    (ckpt / ".step-000005-abc").mkdir()  # a killed write: no manifest yet
    for name in ("model.safetensors", "trainer_state.json", "__0_0.distcp", ".metadata.tmp"):
        (ckpt / ".step-000005-abc" / name).write_text("partial")
    messages = overwrite(out)
    assert sorted(os.listdir(ckpt)) == ["step-7"] and (ckpt / "step-7" / "weights.bin").read_text() == "mine"
    assert any("left" in m and "checkpoints/step-7" in m for m in messages), messages
    assert not (out / "metrics.jsonl").exists()

    (ckpt / ".step-000006-def").mkdir()  # a "partial" holding a user's file: the new run would delete it
    (ckpt / ".step-000006-def" / "notes.txt").write_text("mine")
    (out / "metrics.jsonl").write_text(json.dumps({"step": 0}) + "\n")
    assert "checkpoints/.step-000006-def" in refused(out)
    assert (ckpt / ".step-000006-def" / "notes.txt").read_text() == "mine"


def test_overwrite_deletes_all_of_a_real_run(tmp_path):
    """Every file a real run writes passes its content check (RUN_ARTIFACTS' registry): --overwrite leaves nothing,
    and the report's title is the one report.py writes."""
    from rlvr_fast.trainer.checkpoint.output_dir import REPORT_TITLE

    out = tmp_path / "run"
    cfg = tiny_config(tmp_path, output_dir=str(out), checkpoint_every=1, rewards={"random": 1.0})
    Trainer(cfg, loaded=tiny_loaded()).train()
    assert (out / "report.md").read_text().splitlines()[0] == REPORT_TITLE
    (out / "checkpoints" / ".step-000009-killed").mkdir()  # a write killed before its first file
    messages = overwrite(out)
    assert os.listdir(out) == [], os.listdir(out)
    assert len(messages) == 1 and "deleted" in messages[0], messages


def test_overwrite_messages_print_once_through_the_cli(tmp_path, local_model, no_model_load, capsys):
    """preflight runs in cli.py and again in Trainer.__init__: the second pass repeated (or, by content, refused)
    what the first had done; now it says nothing."""
    out = tmp_path / "run"
    out.mkdir()
    fake_earlier_run(out)
    (out / "checkpoints" / "my_notes.txt").write_text("mine")
    (out / "src").mkdir()
    argv = late_failure_cases(tmp_path, local_model)["empty eval file"][0][:-2]  # the base arguments
    with pytest.raises(AssertionError, match="the model was loaded"):  # past both preflights
        main(["train", *argv, "--output_dir", str(out), "--overwrite", "true"])
    err = capsys.readouterr().err
    assert err.count("--overwrite: deleted") == 1 and err.count("--overwrite: left") == 1, err
    assert "checkpoints/my_notes.txt" in err and "src" in err
    assert (out / "checkpoints" / "my_notes.txt").read_text() == "mine"


def test_only_checkpoint_names_as_written_are_checkpoints(tmp_path):
    """A user's ``checkpoints/step-7`` (or ``step-+7``, or a link named like a step folder) is no checkpoint: resume
    used to read it as step 7, try to set aside ``step-000007`` (which does not exist) and crash."""
    from rlvr_fast.trainer.checkpoint.folder import find_resumable, list_checkpoints

    fake_earlier_run(tmp_path, steps=(3,))
    root = tmp_path / "checkpoints"
    for name in ("step-7", "step-+7", "step-7_0"):
        (root / name).mkdir()
    elsewhere = tmp_path.parent / f"{tmp_path.name}-elsewhere"
    elsewhere.mkdir()
    (root / "step-000009").symlink_to(elsewhere, target_is_directory=True)
    assert [os.path.basename(p) for p in list_checkpoints(str(tmp_path))] == ["step-000003"]
    point = find_resumable(str(tmp_path))
    assert point.path.endswith("step-000003") and not point.skipped


def test_a_link_named_as_a_step_folder_blocks_the_overwrite(tmp_path):
    """A symbolic link ``checkpoints/step-000002`` where the new run writes its step-2 checkpoint: it used to be left,
    after which the run deleted the earlier run and then failed at its first save (rmtree refuses a link)."""
    fake_earlier_run(tmp_path, steps=(3,))
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("mine")
    (tmp_path / "checkpoints" / "step-000002").symlink_to(outside, target_is_directory=True)
    before = tree(tmp_path)
    message = refused(tmp_path)
    assert "checkpoints/step-000002" in message and "symbolic link" in message
    assert tree(tmp_path) == before and (outside / "keep.txt").read_text() == "mine"


def test_a_run_killed_in_its_first_metrics_line_is_a_run(tmp_path):
    """metrics.jsonl holding only the torn start of its first record (the run killed while writing it) is evidence of
    a run: ``--overwrite`` clears the folder instead of refusing it for good."""
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "rew')
    overwrite(tmp_path)
    assert not (tmp_path / "metrics.jsonl").exists()
