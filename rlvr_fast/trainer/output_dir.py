"""The output folder rule: a run's folder is new, or resumed (``--resume``), or refused; ``--overwrite`` clears it.

A folder "holds a run" when it contains any file a run writes (``RUN_ARTIFACTS``). Without ``--resume`` such a folder
is refused, so a second run can never mix its checkpoints and metrics with an earlier one's (nor prune them away).
``--overwrite`` deletes the folder's contents first, and only of a folder that holds a run: a typo such as
``--output_dir ~ --overwrite`` deletes nothing.
"""

from __future__ import annotations

import os
import shutil

from rlvr_fast.trainer.schema import ConfigFieldError

# Names a run writes at the top of its output_dir (trainer/loop.py, report.py, checkpoint.py).
RUN_ARTIFACTS = (
    "checkpoints",
    "metrics.jsonl",
    "eval_before.json",
    "eval_after.json",
    "report.md",
    "reward_curve.png",
    "pass_at_k.png",
)


def run_artifacts(output_dir: str) -> list[str]:
    """The run artefacts present in ``output_dir`` (empty when it holds no run or does not exist)."""
    if not os.path.isdir(output_dir):
        return []
    return [name for name in RUN_ARTIFACTS if os.path.exists(os.path.join(output_dir, name))]


def check_writable(output_dir: str) -> None:
    """Raise ConfigFieldError('output_dir') unless ``output_dir`` is (or can be created as) a writable folder."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ConfigFieldError("output_dir", f"RLVRConfig.output_dir {output_dir!r} exists and is not a folder")
    probe = os.path.abspath(output_dir)
    while not os.path.exists(probe):  # the nearest existing ancestor is where the folder would be created
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise ConfigFieldError("output_dir", f"RLVRConfig.output_dir {output_dir!r}: {probe!r} is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigFieldError("output_dir", f"RLVRConfig.output_dir {output_dir!r}: {probe!r} is not writable")


def prepare_output_dir(output_dir: str, *, resume: bool, overwrite: bool) -> str:
    """Apply the rule; returns 'new', 'resume' or 'overwritten'. Raises ConfigFieldError naming the field."""
    check_writable(output_dir)
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
    for name in os.listdir(output_dir):
        path = os.path.join(output_dir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    return "overwritten"
