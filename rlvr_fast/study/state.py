"""The study's progress on disk: ``<study>/study_state.json``, rewritten atomically (temp file + os.replace) after every
change, so a study killed at any moment leaves either the old or the new state, never half of one.

Per run (key "<arm>/seed<i>"): status (pending, running, done, failed, skipped, interrupted), the hash of the config it
ran with (a finished run is reused only when its config is unchanged), attempts, timings, and for a failed or skipped
run the error (type, message, the last lines of the traceback) or the reason.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from typing import Any

__all__ = ["STATE_FILE", "STATUSES", "StudyState", "json_safe", "write_json_atomic"]

STATE_FILE = "study_state.json"
STATUSES = ("pending", "running", "done", "failed", "skipped", "interrupted")
FORMAT = "rlvr_fast.study_state/1"


def json_safe(obj: Any) -> Any:
    """``obj`` as strict JSON takes it: NaN and inf become null, keys become strings (lists and dicts recursively);
    a numpy scalar or array is taken as its Python value first (``json.dump(default=str)`` would write it as a string,
    a NaN as "nan")."""
    if hasattr(obj, "dtype") and hasattr(obj, "tolist"):  # numpy scalars and arrays (np.float32 is no float)
        obj = obj.tolist()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_json_atomic(path: str, data: Any, indent: int | None = 1) -> None:
    """Write JSON to ``path`` through a temporary file in the same folder and os.replace (atomic on POSIX)."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=indent, default=str)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the mode open() would
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class StudyState:
    """Load with ``StudyState(study_dir)``; every ``set`` writes the file."""

    def __init__(self, study_dir: str):
        self.path = os.path.join(study_dir, STATE_FILE)
        if os.path.exists(self.path):
            with open(self.path) as f:
                self.data = json.load(f)
            if self.data.get("format") != FORMAT:
                raise ValueError(
                    f"{self.path}: not a study state file (format {self.data.get('format')!r}, expected {FORMAT!r})"
                )
        else:
            self.data = {"format": FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "runs": {}, "sessions": []}

    def run(self, key: str) -> dict:
        return self.data["runs"].get(key, {"status": "pending"})

    def status(self, key: str) -> str:
        return self.run(key)["status"]

    def set(self, key: str, **fields: Any) -> dict:
        if "status" in fields and fields["status"] not in STATUSES:
            raise ValueError(f"StudyState.set: status must be one of {STATUSES}, got {fields['status']!r}")
        entry = self.data["runs"].setdefault(key, {"status": "pending", "attempts": 0})
        entry.update(fields)
        self.save()
        return entry

    def add_session(self, **fields: Any) -> None:
        self.data.setdefault("sessions", []).append(fields)
        self.save()

    def update_session(self, **fields: Any) -> None:
        self.data["sessions"][-1].update(fields)
        self.save()

    def save(self) -> None:
        write_json_atomic(self.path, self.data)
