"""The study folder rule: one live study per folder, and never a folder holding someone else's files the study writes.

A study rewrites ``study_state.json`` whole after every change and ``report.md``, ``study.json``, ``plan.json`` and the
figures at the top of its folder. Two studies in one folder would each overwrite the other's state with its own (the
runs one finished vanish from the record) and train the same runs side by side; a study started in a folder that is
not a study (a trainer run, a folder of notes) would overwrite the user's ``report.md``. So ``claim_study_dir``:

- locks the folder with the trainer's run lock (``trainer.checkpoint.run_lock``: ``fcntl.flock``, released by the
  kernel however the holder ends, so a killed study never blocks the next one), refusing a folder that a live study or
  trainer run holds, naming the holder;
- refuses a folder without ``study_state.json`` that holds an entry a study writes (its names are listed below),
  deleting and writing nothing.

Both refusals are ``ConfigFieldError('output_dir')`` (a ValueError): ``rlvr-fast study`` prints them in one line.
"""

from __future__ import annotations

import os

from rlvr_fast.study.state import STATE_FILE
from rlvr_fast.trainer.checkpoint.run_lock import LOCK_FILE, acquire_run_lock, release_run_lock
from rlvr_fast.trainer.schema import ConfigFieldError

__all__ = ["STUDY_WRITES", "claim_study_dir", "release_study_dir"]

# Entries at the top of a study folder that a study writes or fills (the figures: any *.png).
STUDY_WRITES = ("report.md", "study.json", "plan.json", "arms", "cells", "base", "shortcuts.json", "trajectories.json")


def _collisions(output_dir: str) -> list[str]:
    """The entries of a folder that is not (yet) a study which a study would write over or into."""
    if not os.path.isdir(output_dir) or os.path.exists(os.path.join(output_dir, STATE_FILE)):
        return []
    return sorted(e for e in os.listdir(output_dir) if e in STUDY_WRITES or e.endswith(".png"))


def claim_study_dir(output_dir: str) -> bool:
    """Lock ``output_dir`` (created if missing) for this study and check it is a study's folder or holds nothing a
    study writes. Returns whether this call took the lock (False: this process already held it), for
    ``release_study_dir``. Raises ConfigFieldError('output_dir') naming the holder or the colliding entries."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ConfigFieldError("output_dir", f"study --output-dir {output_dir!r}: expected a folder, got a file")
    foreign = _collisions(output_dir)  # before the lock creates the folder or its lock file
    if foreign:
        raise ConfigFieldError(
            "output_dir",
            f"study --output-dir {output_dir!r}: expected a new folder, an empty one or an earlier study's (with "
            f"{STATE_FILE}), got a folder with no {STATE_FILE} holding {foreign}, which the study would write over; "
            f"nothing was written: choose another --output-dir",
        )
    try:
        return acquire_run_lock(output_dir)
    except ConfigFieldError as exc:
        raise ConfigFieldError(
            "output_dir", f"study --output-dir {output_dir!r} ({LOCK_FILE}): another study or run holds it: {exc}"
        ) from None


def release_study_dir(output_dir: str, took: bool) -> None:
    """Release the lock ``claim_study_dir`` took (nothing when this process held it already)."""
    if took:
        release_run_lock(output_dir)
