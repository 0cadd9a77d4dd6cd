"""One run per output folder: ``<output_dir>/.rlvr-fast.lock``, held for the life of a run.

Two runs sharing a folder interleave their metrics.jsonl and delete each other's checkpoints (a resume's or a save's
cleanup of partial ``.step-*`` folders, ``--overwrite``). So the folder is locked before anything in it is deleted or
written, and a second run is refused (``ConfigFieldError('output_dir')``, exit 2) naming the holder.

Why ``fcntl.flock`` on an open descriptor: the kernel drops the lock when the holder's process ends, however it ends
(kill -9, OOM), so a lock left by a dead run can never pass for a live one and is taken over, with a message. The file
also records the holder (PID, host, start time, command line) for that message and for the refusal.

Release (``release_run_lock``: ``Trainer.train`` returning or raising, or interpreter exit) deletes the file while
still holding the lock, then closes it; an opener that was waiting on the old file sees it is no longer the file at
the path and starts again (so two processes can never each lock a different inode).

Re-entrant per process: ``rlvr-fast train`` runs preflight in cli.py and again in ``Trainer.__init__``; the second
acquisition is a no-op, and ``RunLock.prepared`` tells it what the first one did to the folder (nothing else can
have written there since), so ``--overwrite``'s messages print once. Under torchrun only rank 0 prepares the folder
(``TrainingWorld.main_decides``), so rank 0 holds the lock; releasing on another rank does nothing. On a file system
without flock (some network or FUSE mounts) it falls back, with a warning, to the recorded PID: refused while that
PID is alive on this host or the lock is another host's (delete the file if that run is gone).
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import json
import os
import socket
import sys
import time

from rlvr_fast.trainer.schema import ConfigFieldError

LOCK_FILE = ".rlvr-fast.lock"
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


def describe_holder(holder: dict) -> str:
    """'PID 123 on host h, since <time> (<command>)' from a lock file's record; {} is a holder still starting."""
    if not holder:
        return "a process that has just started (no record yet)"
    text = f"PID {holder.get('pid')} on host {holder.get('host')}"
    if holder.get("started"):
        text += f", since {holder['started']}"
    if holder.get("command"):
        text += f" ({holder['command'][:200]})"
    return text


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


class RunLock:
    """The lock of one output folder through one open descriptor. ``acquire`` raises ConfigFieldError('output_dir')
    while another descriptor (another run) holds it. Not re-entrant by itself: ``acquire_run_lock`` is."""

    def __init__(self, output_dir: str):
        self.output_dir = output_dir
        self.path = os.path.join(output_dir, LOCK_FILE)
        self.fd: int | None = None
        self.owner_pid = os.getpid()  # a forked child inherits the object, never the right to delete the file
        # What this process did to the folder while holding this lock (output_dir.prepare_output_dir's outcome): a
        # second preflight in the same process (cli.py, then Trainer) repeats nothing. Gone with the lock.
        self.prepared: dict = {}

    def acquire(self, log=None) -> None:
        log = log or _stderr
        while True:  # again only when the file was replaced between open and lock (a holder releasing it)
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                raise ConfigFieldError(
                    "output_dir",
                    f"RLVRConfig.output_dir {self.output_dir!r}: cannot open the run lock {self.path!r}: expected a "
                    f"regular file, got {type(exc).__name__}: {exc}",
                ) from None
            try:
                if self._lock(fd, log) and self._is_current(fd):
                    break
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        previous = _read_record(fd)
        if previous.get("pid") is not None:
            log(
                f"output_dir {self.output_dir!r}: taking over the lock left by a run that has ended "
                f"({describe_holder(previous)})"
            )
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": " ".join(sys.argv),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        os.fsync(fd)
        self.fd, self.owner_pid = fd, os.getpid()

    def _lock(self, fd: int, log) -> bool:
        """Lock ``fd`` or raise the refusal naming the holder."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            self._refuse(_read_record(fd))
        except OSError as exc:
            if exc.errno not in _NO_FLOCK:
                raise
        holder = _read_record(fd)  # no flock here: judge by the recorded PID
        log(f"output_dir {self.output_dir!r}: this file system has no flock; the run lock checks the recorded PID")
        if holder.get("pid") is not None and holder.get("pid") != os.getpid():
            here = holder.get("host") == socket.gethostname()
            if not here or _pid_alive(int(holder["pid"])):
                self._refuse(holder, other_host=not here)
        return True

    def _refuse(self, holder: dict, other_host: bool = False) -> None:
        hint = f"; if that run is gone, delete {self.path}" if other_host else ""
        raise ConfigFieldError(
            "output_dir",
            f"RLVRConfig.output_dir {self.output_dir!r} is in use by another run ({describe_holder(holder)}): "
            f"expected a folder no live run holds; wait for that run to end or choose another output_dir{hint}",
        )

    def _is_current(self, fd: int) -> bool:
        """Whether ``fd`` is still the file at the path (a releasing holder deletes it before closing)."""
        try:
            here = os.stat(self.path, follow_symlinks=False)
        except FileNotFoundError:
            return False
        mine = os.fstat(fd)
        return (here.st_dev, here.st_ino) == (mine.st_dev, mine.st_ino)

    def held(self) -> bool:
        return self.fd is not None and self._is_current(self.fd)

    def release(self) -> None:
        """Delete the file (still locked: see the module doc), then close it. Only in the process that took it."""
        if self.fd is None or os.getpid() != self.owner_pid:
            return
        try:
            if self._is_current(self.fd):
                os.unlink(self.path)
        except OSError:
            pass  # the folder went away: nothing left to unlock but the descriptor
        finally:
            os.close(self.fd)
            self.fd = None


def _read_record(fd: int) -> dict:
    try:
        text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        record = json.loads(text) if text else {}
        return record if isinstance(record, dict) else {}
    except (OSError, ValueError):
        return {}


_HELD: dict[str, RunLock] = {}  # realpath of the output folder -> this process's lock on it


def acquire_run_lock(output_dir: str, log=None) -> bool:
    """Lock ``output_dir`` (created if missing) for this process; True if this call took it, False if this process
    already held it. Raises ConfigFieldError('output_dir') while another run holds it."""
    os.makedirs(output_dir, exist_ok=True)
    key = os.path.realpath(output_dir)
    held = _HELD.get(key)
    if held is not None:
        if held.held():
            return False
        held.release()  # our file was deleted under us: lock afresh
        del _HELD[key]
    lock = RunLock(output_dir)
    lock.acquire(log)
    _HELD[key] = lock
    return True


def release_run_lock(output_dir: str) -> None:
    """Release this process's lock on ``output_dir``; nothing if it holds none (e.g. a rank other than 0)."""
    lock = _HELD.pop(os.path.realpath(output_dir), None)
    if lock is not None:
        lock.release()


def held_lock(output_dir: str) -> RunLock | None:
    """This process's lock on ``output_dir`` while it holds it, else None."""
    lock = _HELD.get(os.path.realpath(output_dir))
    return lock if lock is not None and lock.held() else None


def holds_run_lock(output_dir: str) -> bool:
    lock = _HELD.get(os.path.realpath(output_dir))
    return lock is not None and lock.held()


@atexit.register
def _release_all() -> None:
    for key in list(_HELD):
        _HELD.pop(key).release()
