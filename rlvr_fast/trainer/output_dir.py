"""The output folder rule: a run's folder is new, or resumed (``--resume``), or refused; ``--overwrite`` clears it.

A folder "holds a run" when it contains any entry a run writes (``RUN_ARTIFACTS``, the lock file aside). Without
``--resume`` such a folder is refused, so a second run can never mix its checkpoints and metrics with an earlier one's
(nor prune them away). ``--overwrite`` deletes only what a run writes, and only of a folder that holds a run: a typo
such as ``--output_dir ~ --overwrite`` deletes nothing, and a user's own files beside a run are left (and named).
Symlinks are never followed out of the folder: one with a run's file name is unlinked, its target untouched.

The folder is locked (``run_lock``) before anything in it is deleted, so a live run's folder is never cleared or
shared.
"""

from __future__ import annotations

import os
import re
import shutil
import sys

from rlvr_fast.trainer.run_lock import LOCK_FILE, acquire_run_lock, release_run_lock
from rlvr_fast.trainer.schema import ConfigFieldError

CHECKPOINTS = "checkpoints"

# Every name a run writes at the top of its output_dir, and who writes it: the single list that "holds a run" and
# --overwrite read (tests/test_output_dir.py checks that a run writes nothing else).
RUN_ARTIFACTS = {
    CHECKPOINTS: "checkpoint.py, sharded_checkpoint.py (entries: CHECKPOINT_ENTRY)",
    "metrics.jsonl": "loop.py (run_log.MetricsLog)",
    "eval_before.json": "loop.py",
    "eval_after.json": "loop.py",
    "report.md": "report.py",
    "reward_curve.png": "report.py",
    "pass_at_k.png": "report.py",
    "update_sparsity.json": "study/updates.py (a study's run)",
    "update_sparsity.json.tmp": "study/updates.py (renamed into place)",
    "changed_fp32.safetensors": "study/updates.py",
    "changed_fp32.safetensors.tmp": "study/updates.py",
    "changed_bf16.safetensors": "study/updates.py",
    "changed_bf16.safetensors.tmp": "study/updates.py",
    LOCK_FILE: "run_lock.py: held while a run is live; not by itself a run, never deleted by --overwrite",
}

# What checkpoint.py writes inside checkpoints/: step-N, its partial .step-N-* while writing, step-N.bad set aside on
# resume, the latest pointer and that pointer's .tmp-* while it is replaced.
CHECKPOINT_ENTRY = re.compile(r"step-\d+|step-\d+\.bad|\.step-\d+-.+|latest|\.tmp-.+")


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


def run_artifacts(output_dir: str) -> list[str]:
    """The run artefacts present in ``output_dir`` (empty when it holds no run or does not exist). The lock file
    alone is no run: a run killed before writing anything leaves only that."""
    if not os.path.isdir(output_dir):
        return []
    return [n for n in RUN_ARTIFACTS if n != LOCK_FILE and os.path.lexists(os.path.join(output_dir, n))]


def check_writable(output_dir: str) -> None:
    """Raise ConfigFieldError('output_dir') unless ``output_dir`` is (or can be created as) a writable folder."""
    if os.path.islink(output_dir) and not os.path.exists(output_dir):
        raise ConfigFieldError(
            "output_dir",
            f"RLVRConfig.output_dir {output_dir!r}: expected a folder (or a symlink to one), got a symlink to "
            f"{os.readlink(output_dir)!r}, which does not exist",
        )
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ConfigFieldError("output_dir", f"RLVRConfig.output_dir {output_dir!r} exists and is not a folder")
    probe = os.path.abspath(output_dir)
    while not os.path.lexists(probe):  # the nearest existing ancestor is where the folder would be created
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise ConfigFieldError("output_dir", f"RLVRConfig.output_dir {output_dir!r}: {probe!r} is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigFieldError("output_dir", f"RLVRConfig.output_dir {output_dir!r}: {probe!r} is not writable")


def prepare_output_dir(output_dir: str, *, resume: bool, overwrite: bool, log=None) -> str:
    """Lock the folder for this run, then apply the rule; returns 'new', 'resume' or 'overwritten'. Raises
    ConfigFieldError naming the field (and then releases a lock this call took)."""
    log = log or _stderr
    check_writable(output_dir)
    took = acquire_run_lock(output_dir, log)  # before anything is deleted: a live run's folder is refused here
    try:
        return _apply_rule(output_dir, resume=resume, overwrite=overwrite, log=log)
    except BaseException:
        if took:
            release_run_lock(output_dir)
        raise


def _apply_rule(output_dir: str, *, resume: bool, overwrite: bool, log) -> str:
    found = run_artifacts(output_dir)
    if resume:
        return "resume"  # the checkpoint search says whether there is anything to resume
    if not found:
        return "new"
    if not overwrite:
        raise ConfigFieldError(
            "output_dir",
            f"RLVRConfig.output_dir {output_dir!r} holds an earlier run ({', '.join(found)}): pass --resume true to "
            f"continue it, --overwrite true to delete it, or choose another output_dir",
        )
    deleted, left = delete_run(output_dir)
    log(f"--overwrite: deleted the earlier run in {output_dir!r}: {', '.join(deleted)}")
    if left:
        log(f"--overwrite: left {len(left)} entr{'y' if len(left) == 1 else 'ies'} no run writes: {', '.join(left)}")
    return "overwritten"


def delete_run(output_dir: str) -> tuple[list[str], list[str]]:
    """Delete what a run wrote in ``output_dir`` (never the lock: the current run holds it by now); returns (the
    names deleted, the entries left because no run writes them, relative to ``output_dir``)."""
    deleted, left = [], []
    for name in sorted(os.listdir(output_dir)):
        path = os.path.join(output_dir, name)
        if name == LOCK_FILE:
            continue
        if name not in RUN_ARTIFACTS:
            left.append(name)
        elif os.path.islink(path) or os.path.isfile(path):  # a link is unlinked, never followed
            os.remove(path)
            deleted.append(name)
        elif name == CHECKPOINTS and os.path.isdir(path):
            foreign = _clear_checkpoints(path)
            if foreign:
                left += [f"{CHECKPOINTS}/{f}" for f in foreign]
            else:
                os.rmdir(path)
            deleted.append(name)
        else:  # e.g. a folder named report.md: not something a run writes
            left.append(name)
    return deleted, left


def _clear_checkpoints(root: str) -> list[str]:
    """Delete the entries of ``root`` that checkpoint.py writes; return the others (left, like any symlink: we never
    make one, and rmtree must not follow one out of the folder)."""
    foreign = []
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if os.path.islink(path) or not CHECKPOINT_ENTRY.fullmatch(name):
            foreign.append(name)
        elif os.path.isdir(path):
            shutil.rmtree(path)  # does not follow symlinks inside
        else:
            os.remove(path)
    return foreign
