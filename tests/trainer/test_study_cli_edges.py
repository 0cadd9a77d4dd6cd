"""``rlvr-fast study`` on the inputs a researcher gets wrong: an empty ``--arms``, an arms file that is not YAML, an arm
that changes a cell's model, a folder that another study holds or that holds a user's files, a changed config at the
command line, and a run that a killed study left "running" with a half-written folder. Tiny random models over the
character tokenizer (no download)."""

import fcntl
import json
import os

import pytest
from helpers.runs import main_exit
from helpers.study_case import tiny_loader, tiny_study_plan

from rlvr_fast.study import plan_study, run_study
from rlvr_fast.study.folder import claim_study_dir, release_study_dir
from rlvr_fast.study.state import STATE_FILE
from rlvr_fast.trainer.checkpoint.run_lock import LOCK_FILE
from rlvr_fast.trainer.reporting.log import reproducible_fields
from rlvr_fast.trainer.schema import ConfigFieldError

pytestmark = pytest.mark.usefixtures("single_thread")  # tests/trainer/conftest.py


loader = tiny_loader()


def tiny_plan(root, arms=("correct",), output="study"):
    """One seed per arm of 2 steps on 12 train / 4 eval problems x n=2, into root/<output>."""
    return tiny_study_plan(
        root, arms, seeds=1, output=output, group_size=4, max_completion_length=4, eval_samples=2, checkpoint_every=1
    )


def read_json(path):
    with open(path) as f:
        return json.load(f)


# --------------------------------------------------------------------------------------------------------------------
# Bad flags and arms files
# --------------------------------------------------------------------------------------------------------------------


def test_an_empty_arms_list_is_refused_not_read_as_the_presets(capsys):
    with pytest.raises(ValueError, match=r"--arms: expected one or more arm names .*got \[\]"):
        plan_study("quick", arms=[], output_dir="runs/never-written")
    for flag in ("", ","):
        code, err = main_exit(["study", "--preset", "quick", "--arms", flag, "--dry-run"], capsys)
        assert code == 2 and "--arms: expected one or more arm names" in err, (flag, err)
    assert not os.path.exists("runs/never-written")


def test_an_arms_file_that_is_not_yaml_is_refused_in_one_line(tmp_path, capsys):
    bad = tmp_path / "arms.yaml"
    bad.write_text("low_lr: {lr: [1e-5\n")
    code, err = main_exit(["study", "--preset", "quick", "--arms-file", str(bad), "--dry-run"], capsys)
    assert code == 2
    assert f"--arms-file {bad}: expected a YAML mapping arm name -> overrides, got invalid YAML" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_an_arm_may_not_change_a_cells_model_or_task(tmp_path, capsys):
    arms = tmp_path / "arms.yaml"
    arms.write_text("other_model: {model: HuggingFaceTB/SmolLM2-360M-Instruct}\n")
    argv = ["study", "--preset", "models-quick", "--cells", "smollm2-135m-instruct__arithmetic-tiny"]
    code, err = main_exit([*argv, "--arms-file", str(arms), "--arms", "correct,other_model", "--dry-run"], capsys)
    assert code == 2
    assert "arm 'other_model'" in err and "overrides ['model'], which every cell sets itself" in err
    # The same arm in a study without cells is a legitimate comparison (its own base evaluation).
    plan = plan_study("quick", arms=["correct", "other_model"], arms_file=str(arms), output_dir=str(tmp_path / "s"))
    assert plan.run("other_model/seed0").config["model"] == "HuggingFaceTB/SmolLM2-360M-Instruct"


def test_an_arm_with_a_missing_mask_file_is_refused_when_planned(tmp_path):
    """A sparse arm's mask file is checked with the plan (an arm reusing another's mask, mask_from, is not: that file
    is written by the study), not when the arm's turn comes after hours of other runs."""
    arms = tmp_path / "arms.yaml"
    arms.write_text(f"masked: {{optimizer: sparse_adamw, mask_source: {tmp_path / 'no-such-mask.safetensors'}}}\n")
    with pytest.raises(ValueError, match=r"arm 'masked'.*no-such-mask\.safetensors.*neither random:<d>, grad:<d> nor"):
        tiny_study_plan(str(tmp_path), ["correct", "masked"], arms_file=str(arms))
    tiny_study_plan(str(tmp_path), ["correct", "sparse_reuse"])  # mask_from: its file does not exist yet


# --------------------------------------------------------------------------------------------------------------------
# The study folder
# --------------------------------------------------------------------------------------------------------------------


def test_a_folder_another_study_holds_is_refused(tmp_path):
    plan = tiny_plan(str(tmp_path))
    os.makedirs(plan.output_dir)
    fd = os.open(os.path.join(plan.output_dir, LOCK_FILE), os.O_RDWR | os.O_CREAT)
    try:  # another open file description holding the flock: another live study (or run) in this folder
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ConfigFieldError, match=r"study --output-dir .*another study or run holds it") as info:
            run_study(plan, model_loader=loader, log=lambda s: None)
        assert info.value.field == "output_dir"
        assert not os.path.exists(os.path.join(plan.output_dir, STATE_FILE))  # nothing written, nothing trained
    finally:
        os.close(fd)


def test_a_folder_with_a_users_files_is_refused_and_left_as_it_was(tmp_path):
    plan = tiny_plan(str(tmp_path))
    os.makedirs(plan.output_dir)
    with open(os.path.join(plan.output_dir, "report.md"), "w") as f:
        f.write("my notes\n")
    with pytest.raises(ConfigFieldError, match=r"no study_state.json holding \['report.md'\]"):
        run_study(plan, model_loader=loader, log=lambda s: None)
    assert sorted(os.listdir(plan.output_dir)) == ["report.md"]
    with open(os.path.join(plan.output_dir, "report.md")) as f:
        assert f.read() == "my notes\n"
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ConfigFieldError, match=r"study --output-dir .*a_file': expected a folder, got a file"):
        claim_study_dir(str(tmp_path / "a_file"))
    # A folder whose files a study never writes is taken (and the lock released with the study).
    other = tmp_path / "notes"
    other.mkdir()
    (other / "arms.yaml").write_text("low_lr: {lr: 1.0e-5}\n")
    took = claim_study_dir(str(other))
    assert took and os.path.exists(other / LOCK_FILE)
    release_study_dir(str(other), took)
    assert sorted(os.listdir(other)) == ["arms.yaml"]


# --------------------------------------------------------------------------------------------------------------------
# Resuming
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A finished one-run study (correct, seed 0)."""
    root = str(tmp_path_factory.mktemp("ref"))
    plan = tiny_plan(root)
    outcome = run_study(plan, model_loader=loader, log=lambda s: None)
    assert outcome.statuses == {"correct/seed0": "done"}
    return root, plan


def test_cli_refuses_a_finished_run_with_a_changed_config_in_one_line(reference, capsys):
    _, plan = reference
    argv = ["study", "--preset", "quick", "--arms", "correct", "--seeds", "1", "--output-dir", plan.output_dir]
    code, err = main_exit(argv, capsys)  # the quick preset's config, not the tiny one the runs finished with
    assert code == 2
    assert "run correct/seed0 in" in err and "finished with a different config" in err
    assert "Traceback" not in err


def test_a_run_a_killed_study_left_running_is_trained_again_from_scratch(reference, tmp_path):
    _, ref = reference
    plan = tiny_plan(str(tmp_path))
    # What kill -9 during the first step leaves: the state says running, the run folder has half a metrics file.
    spec = plan.run("correct/seed0")
    os.makedirs(spec.run_dir)
    with open(os.path.join(spec.run_dir, "metrics.jsonl"), "w") as f:
        f.write('{"step": 0, "loss": 0.1')
    from rlvr_fast.study.plan import config_hash
    from rlvr_fast.study.state import StudyState

    StudyState(plan.output_dir).set("correct/seed0", status="running", attempts=1, config_hash=config_hash(spec.config))
    outcome = run_study(plan, model_loader=loader, log=lambda s: None)
    assert outcome.statuses == {"correct/seed0": "done"}
    assert read_json(os.path.join(plan.output_dir, STATE_FILE))["runs"]["correct/seed0"]["attempts"] == 2
    ref_dir = ref.run("correct/seed0").run_dir
    for name in ("eval_after.json", "update_sparsity.json"):
        assert read_json(os.path.join(spec.run_dir, name)) == read_json(os.path.join(ref_dir, name)), name

    def metrics(d):
        with open(os.path.join(d, "metrics.jsonl")) as f:
            return [reproducible_fields(json.loads(line)) for line in f if line.strip()]

    assert metrics(spec.run_dir) == metrics(ref_dir)
    assert not os.path.exists(os.path.join(plan.output_dir, LOCK_FILE))  # released when the study ended
