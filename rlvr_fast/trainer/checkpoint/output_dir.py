"""The output folder rule: a run's folder is new, or resumed (``--resume``), or refused; ``--overwrite`` clears it.

A folder is refused without ``--resume`` when it holds any entry with a name a run writes (``RUN_ARTIFACTS``, the
lock file aside), so a second run can never mix its checkpoints and metrics with an earlier one's (nor prune them
away), nor write over a user's file of that name.

``--overwrite`` deletes by content, never by name alone:

- only a folder that shows EVIDENCE of a run of ours is cleared: a ``metrics.jsonl`` of step records, an
  ``eval_*.json`` or ``update_sparsity.json`` with our keys, or a checkpoint of ours in ``checkpoints/``
  (``Artifact.evidence``). Without it nothing is deleted and the folder is refused: a typo such as
  ``--output_dir ~ --overwrite`` deletes nothing, nor does a user's own ``report.md`` in a folder that holds no run;
- of such a folder, an entry is deleted only when its content is what our code writes there (``Artifact.ours``: the
  report's title line, a Matplotlib PNG, JSON with our keys, a checkpoint whose files are exactly its manifest's...);
- an entry the new run would write over or delete (a run's name whose content is not ours: a user's ``report.md``
  beside a run, a foreign ``checkpoints/step-000003/``) refuses the whole overwrite, deleting nothing, naming it;
- every other entry (not a run's name) is left and named.

Symlinks are never followed out of the folder: one with a run's top-level name is unlinked (the new run would
otherwise write through it), its target untouched; one inside ``checkpoints/`` is left.

The folder is locked (``run_lock``) before anything in it is deleted, so a live run's folder is never cleared or
shared; the same process preparing it again while it holds the lock (cli.py's preflight, then ``Trainer``) is told
the first outcome and deletes and says nothing more.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass

from rlvr_fast.trainer.checkpoint.run_lock import LOCK_FILE, acquire_run_lock, held_lock, release_run_lock
from rlvr_fast.trainer.schema import ConfigFieldError

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"  # checkpoint.MANIFEST (not imported: checkpoint.py loads torch)
REPORT_TITLE = "# rlvr_fast run report"  # report.write_report's first line
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_READ_LIMIT = 1 << 16  # bytes read of a file to judge its content (a header, a title line)


def _head(path: str, n: int = _READ_LIMIT) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def _json_with(path: str, keys: set[str]) -> bool:
    """A JSON object holding ``keys``."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return isinstance(data, dict) and keys <= data.keys()


def _metrics_log(path: str) -> bool:
    """metrics.jsonl (run_log.MetricsLog): JSON objects with an integer "step", one a line; the last may be cut short
    by a crash; empty as a run killed in its first evaluation leaves it."""
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [line for line in f.read().split("\n") if line.strip()]
    for line in lines[:-1]:
        record = json.loads(line)
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            return False
    if lines:
        try:
            record = json.loads(lines[-1])
        except ValueError:  # a cut-short last line: after whole records, or the first record's start (step first)
            return len(lines) > 1 or lines[-1].startswith('{"step": ')
        return isinstance(record, dict) and isinstance(record.get("step"), int)
    return True


def _report(path: str) -> bool:
    return _head(path, len(REPORT_TITLE) + 2).decode(errors="replace").splitlines()[:1] == [REPORT_TITLE]


def _matplotlib_png(path: str) -> bool:
    head = _head(path, 512)
    return head.startswith(PNG_SIGNATURE) and b"Matplotlib" in head  # its tEXt "Software" chunk


def _eval_result(path: str) -> bool:
    return _json_with(path, {"n", "correct_counts", "pass_at_k"})  # evaluation.EvalResult.to_dict()


UPDATE_KEYS = {"atol", "overall", "tensors", "masks"}  # study/updates.py's update_sparsity.json


def _update_sparsity(path: str) -> bool:
    return _json_with(path, UPDATE_KEYS)


def _update_sparsity_tmp(path: str) -> bool:
    return _head(path, 16).startswith(b'{"atol"')  # json.dump's first key, however far the write got


def _mask_file(path: str) -> bool:
    """study/updates.save_masks: a safetensors file whose header metadata records the dtype and atol."""
    head = _head(path)
    if len(head) < 8:
        return False
    (size,) = struct.unpack("<Q", head[:8])
    with open(path, "rb") as f:
        f.seek(8)
        header = json.loads(f.read(min(size, 1 << 24)))
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return isinstance(meta, dict) and {"dtype", "atol"} <= meta.keys()


@dataclass(frozen=True)
class Artifact:
    """An entry a run writes at the top of its output_dir: who writes it, whether a regular file there is ours by
    its content (``ours(path)``; None: checked otherwise), and whether one of ours shows the folder holds a run."""

    writer: str
    ours: Callable[[str], bool] | None
    evidence: bool = False


# Every name a run writes at the top of its output_dir: the single list the rule and --overwrite read
# (tests/trainer/test_output_dir.py checks that a run writes nothing else and that each check accepts what a run
# writes).
RUN_ARTIFACTS = {
    CHECKPOINTS: Artifact(
        "checkpoint/local.py, checkpoint/sharded.py (entries: _checkpoint_entry)", None, evidence=True
    ),
    "metrics.jsonl": Artifact("loop.py (reporting/log.MetricsLog)", _metrics_log, evidence=True),
    "eval_before.json": Artifact("loop.py", _eval_result, evidence=True),
    "eval_after.json": Artifact("loop.py", _eval_result, evidence=True),
    "report.md": Artifact("reporting/report.py", _report),
    "reward_curve.png": Artifact("reporting/report.py", _matplotlib_png),
    "pass_at_k.png": Artifact("reporting/report.py", _matplotlib_png),
    "update_sparsity.json": Artifact("study/updates.py (a study's run)", _update_sparsity, evidence=True),
    "update_sparsity.json.tmp": Artifact("study/updates.py (renamed into place)", _update_sparsity_tmp),
    "changed_fp32.safetensors": Artifact("study/updates.py", _mask_file),
    "changed_fp32.safetensors.tmp": Artifact("study/updates.py", _mask_file),
    "changed_bf16.safetensors": Artifact("study/updates.py", _mask_file),
    "changed_bf16.safetensors.tmp": Artifact("study/updates.py", _mask_file),
    LOCK_FILE: Artifact(
        "run_lock.py: held while a run is live; not by itself a run, never deleted by --overwrite", None
    ),
}

# What checkpoint.py writes inside checkpoints/: step-N, its partial .step-N-* while writing, step-N.bad set aside on
# resume, the latest pointer and that pointer's .tmp-* while it is replaced.
CHECKPOINT_ENTRY = re.compile(r"step-\d+|step-\d+\.bad|\.step-\d+-.+|latest|\.tmp-.+")
# The entries of checkpoints/ a new run writes over or deletes by name: `latest`, every `.step-*` (its first save
# removes them), and step-N / step-N.bad as checkpoint.py spells step N (step-000007: prune, commit, set_aside).
STEP_FOLDER = re.compile(r"step-(?:\d{6}|[1-9]\d{6,})(?:\.bad)?")  # checkpoint.py's f"step-{step:06d}", set aside
RUN_TOUCHES = re.compile(r"latest|\.step-.*|step-(?:\d{6}|[1-9]\d{6,})(?:\.bad)?")
# The files checkpoint code writes inside a checkpoint folder: checkpoint.FILES, manifest.json, dcp_layout's
# rng-rank<r>.safetensors and .metadata, torch.distributed.checkpoint's shards and its metadata's temporary file.
CHECKPOINT_FILE = re.compile(
    r"(?:model|optimizer|rng)\.safetensors|rng-rank\d+\.safetensors|trainer_state\.json|manifest\.json"
    r"|\.metadata(?:\.tmp)?|__\d+_\d+\.distcp|__\d+\.metadata(?:\.tmp)?"
)
POINTER = re.compile(rb"(?:step-\d+\s*)?")  # latest's content (its .tmp-* replacement may still be empty)


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


def run_artifacts(output_dir: str) -> list[str]:
    """The names of ``RUN_ARTIFACTS`` present in ``output_dir`` (empty when it does not exist). The lock file alone
    is no run: a run killed before writing anything leaves only that."""
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
    ConfigFieldError naming the field (and then releases a lock this call took). Called again by the process that
    holds the lock (cli.py's preflight, then Trainer), it returns the first call's outcome and says nothing."""
    log = log or _stderr
    check_writable(output_dir)
    took = acquire_run_lock(output_dir, log)  # before anything is deleted: a live run's folder is refused here
    lock = held_lock(output_dir)
    key = ("output_dir", resume, overwrite)
    if not took and key in lock.prepared:
        return lock.prepared[key]  # this process, holding the lock since, prepared it: nothing else wrote there
    try:
        outcome = _apply_rule(output_dir, resume=resume, overwrite=overwrite, log=log)
    except BaseException:
        if took:
            release_run_lock(output_dir)
        raise
    lock.prepared[key] = outcome
    return outcome


@dataclass
class Survey:
    """What ``output_dir`` holds, by content: ``deletable`` (ours, relative paths), ``blocking`` (a run's name, not
    ours: "path (why)"), ``left`` (no run's name), and whether anything of ours shows a run (``evidence``)."""

    deletable: list[str]
    blocking: list[str]
    left: list[str]
    evidence: bool = False


def _apply_rule(output_dir: str, *, resume: bool, overwrite: bool, log) -> str:
    found = run_artifacts(output_dir)
    if resume:
        return "resume"  # the checkpoint search says whether there is anything to resume
    if not found:
        return "new"
    survey = survey_run(output_dir)
    where = f"RLVRConfig.output_dir {output_dir!r}"
    if not survey.evidence:
        raise ConfigFieldError(
            "output_dir",
            f"{where} holds {', '.join(found)}, which a run writes, but no run of rlvr_fast (no metrics.jsonl of step "
            f"records, evaluation JSON or checkpoint of ours): expected a folder without them; a run would write over "
            f"them, and --overwrite deletes only a run's files, so nothing was deleted: move them, or choose another "
            f"output_dir",
        )
    if not overwrite:
        raise ConfigFieldError(
            "output_dir",
            f"{where} holds an earlier run ({', '.join(found)}): pass --resume true to continue it, --overwrite true "
            f"to delete it, or choose another output_dir",
        )
    if survey.blocking:
        raise ConfigFieldError(
            "output_dir",
            f"{where} holds an earlier run, and beside it entries with a run's name that are not a run's (the new run "
            f"would write over or delete them): {'; '.join(survey.blocking)}; --overwrite deleted nothing: move them, "
            f"or choose another output_dir",
        )
    delete_entries(output_dir, survey.deletable)
    log(f"--overwrite: deleted the earlier run in {output_dir!r}: {', '.join(survey.deletable)}")
    if survey.left:
        n = len(survey.left)
        log(f"--overwrite: left {n} entr{'y' if n == 1 else 'ies'} no run writes: {', '.join(survey.left)}")
    return "overwritten"


def survey_run(output_dir: str) -> Survey:
    """Classify every entry of ``output_dir`` (and of its ``checkpoints/``) by content; deletes nothing."""
    survey = Survey([], [], [])
    for name in sorted(os.listdir(output_dir)):
        path = os.path.join(output_dir, name)
        artifact = RUN_ARTIFACTS.get(name)
        if name == LOCK_FILE:
            continue
        if artifact is None:
            survey.left.append(name)
        elif os.path.islink(path):  # never ours, never followed: unlinked, else the new run writes through it
            survey.deletable.append(name)
        elif name == CHECKPOINTS and os.path.isdir(path):
            _survey_checkpoints(path, survey)
        elif os.path.isfile(path) and _judge(artifact.ours, path):
            survey.deletable.append(name)
            survey.evidence |= artifact.evidence
        else:
            what = "a folder" if os.path.isdir(path) else f"not what {artifact.writer} writes"
            survey.blocking.append(f"{name} ({what})")
    return survey


def _judge(check: Callable[[str], bool], path: str) -> bool:
    """``check(path)``, False for a file it cannot read or parse: not ours then."""
    try:
        return bool(check(path))
    except (OSError, ValueError, UnicodeError, struct.error, AttributeError, TypeError):
        return False


def _survey_checkpoints(root: str, survey: Survey) -> None:
    """checkpoints/: each entry ours (``_checkpoint_entry``), or blocking where a new run writes or deletes that
    name (``RUN_TOUCHES``), else left. The folder itself is deleted when all of it is."""
    before = len(survey.deletable)
    foreign = 0
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        rel = f"{CHECKPOINTS}/{name}"
        verdict = None if os.path.islink(path) else _checkpoint_entry(name, path)
        if verdict is not None:
            survey.deletable.append(rel)
            survey.evidence |= verdict
            continue
        foreign += 1
        # a link is never followed (rmtree refuses it); one named as a step folder the new run writes would make that
        # write fail, so it blocks like a foreign folder of that name (``latest`` and ``.step-*`` are replaced or new)
        linked_step = os.path.islink(path) and STEP_FOLDER.fullmatch(name)
        if (os.path.islink(path) and not linked_step) or not RUN_TOUCHES.fullmatch(name):
            survey.left.append(rel)
        elif linked_step:
            survey.blocking.append(f"{rel} (a symbolic link where the run writes its checkpoint folder)")
        else:
            survey.blocking.append(f"{rel} (not a checkpoint of ours: {_why_not_checkpoint(path)})")
    if not foreign:
        del survey.deletable[before:]
        survey.deletable.append(CHECKPOINTS)


def _checkpoint_entry(name: str, path: str) -> bool | None:
    """None when the entry ``name`` of checkpoints/ is not ours; else whether it is evidence of a run (a complete
    checkpoint). Ours: a step-N folder that is a checkpoint of ours (``_manifest_folder``); a partial ``.step-*`` or
    set-aside ``step-N.bad`` folder that is one, or holds only files checkpoint code writes (no manifest yet, or a
    damaged one); ``latest`` / ``.tmp-*`` holding a step folder's name."""
    if not CHECKPOINT_ENTRY.fullmatch(name):
        return None
    if name == "latest" or name.startswith(".tmp-"):
        return True if os.path.isfile(path) and _judge(lambda p: POINTER.fullmatch(_head(p, 256)), path) else None
    if not os.path.isdir(path):
        return None
    if _manifest_folder(path):
        return name.startswith("step-")
    if name.startswith("step-") and not name.endswith(".bad"):
        return None
    return False if _checkpoint_files_only(path) else None


def _manifest_folder(path: str) -> bool:
    """A checkpoint of ours: manifest.json parses as checkpoint.write_manifest's and the folder holds exactly the
    files it lists, and it."""
    try:
        with open(os.path.join(path, MANIFEST), encoding="utf-8") as f:
            manifest = json.load(f)
        files = manifest["files"]
        entries = set(os.listdir(path))
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if not isinstance(files, dict) or not {"step", "format", "world_size"} <= manifest.keys():
        return False
    return entries == set(files) | {MANIFEST} and all(_regular(os.path.join(path, n)) for n in entries)


def _checkpoint_files_only(path: str) -> bool:
    return all(CHECKPOINT_FILE.fullmatch(n) and _regular(os.path.join(path, n)) for n in os.listdir(path))


def _regular(path: str) -> bool:
    return os.path.isfile(path) and not os.path.islink(path)


def _why_not_checkpoint(path: str) -> str:
    if not os.path.isdir(path):
        return "not a folder"
    if not os.path.isfile(os.path.join(path, MANIFEST)):
        return f"no {MANIFEST}"
    try:
        with open(os.path.join(path, MANIFEST), encoding="utf-8") as f:
            listed = set(json.load(f)["files"]) | {MANIFEST}
    except (OSError, ValueError, KeyError, TypeError):
        return f"its {MANIFEST} is not a checkpoint's"
    extra = sorted(set(os.listdir(path)) - listed)
    return f"holds {', '.join(extra)}, which its manifest does not list" if extra else "files of its manifest missing"


def delete_entries(output_dir: str, entries: list[str]) -> None:
    """Delete ``entries`` (paths relative to ``output_dir``, as ``survey_run`` found them: ours). A symlink is
    unlinked, never followed; rmtree does not follow links inside a folder."""
    for rel in entries:
        path = os.path.join(output_dir, rel)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
