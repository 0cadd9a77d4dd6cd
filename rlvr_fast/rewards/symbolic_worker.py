"""The symbolic stage of answer checking (math-verify), in-process or in a worker process with a time and memory
bound.

``verify_pair`` is the one implementation. ``is_equivalent`` calls it in-process on the main thread when SIGALRM is
free (math-verify's own timeout then works); anywhere else (another thread: reward functions inside TRL, async or
distributed code) SIGALRM cannot interrupt it, so the pair goes to a worker process (``WorkerPool``): the worker runs
it under its own SIGALRM timeout and an address-space limit, and the caller waits at most ``timeout + GRACE_S``
seconds, killing the worker if it has not answered (the verdict is then "not shown equivalent").

The worker is this file run as a script (``python symbolic_worker.py``): it imports nothing from rlvr_fast (no torch),
speaks one JSON line per request on stdin and answers ``1`` or ``0`` on stdout.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import subprocess
import sys
import threading

MEMORY_LIMIT_BYTES = 2 << 30  # address space of a worker: sympy blowing up hits MemoryError, not the machine
GRACE_S = 2.0  # beyond the request's own timeout, before the caller kills a silent worker
STARTUP_TIMEOUT_S = 60.0  # importing math-verify / sympy in a fresh worker
MAX_IDLE_WORKERS = 4


def verify_pair(pred: str, ref: str, timeout: int | None) -> bool:
    """math-verify's verdict on two LaTeX answers (LaTeX extraction only: never its expression extractor, which calls
    sympy's parse_expr, i.e. eval). ``timeout``: seconds for its SIGALRM timeout (main thread only), None for none."""
    import math_verify as mv

    config = [mv.LatexExtractionConfig()]
    try:
        gold = mv.parse(f"${ref}$", extraction_config=config, parsing_timeout=timeout)
        target = mv.parse(f"${pred}$", extraction_config=config, parsing_timeout=timeout)
        if not gold or not target:
            return False
        return bool(mv.verify(gold, target, timeout_seconds=timeout))
    except Exception:  # any failure of the third-party verifier (MemoryError included): not shown equivalent
        return False


class _Worker:
    def __init__(self):
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            bufsize=1,
        )
        if self._readline(STARTUP_TIMEOUT_S) != "ready":
            self.kill()
            raise RuntimeError("the symbolic answer-checking worker did not start")

    def _readline(self, timeout: float) -> str | None:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            return None
        line = self.proc.stdout.readline()
        return line.strip() if line else None

    def ask(self, pred: str, ref: str, timeout: int) -> bool | None:
        """The verdict, or None when the worker did not answer within the bound (it is then dead)."""
        try:
            self.proc.stdin.write(json.dumps([pred, ref, timeout]) + "\n")
            self.proc.stdin.flush()
        except OSError:
            return None
        answer = self._readline(timeout + GRACE_S)
        return None if answer not in ("0", "1") else answer == "1"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


class WorkerPool:
    """Worker processes shared by all threads: a caller takes an idle one (or starts one), so concurrent callers never
    wait on each other; a worker that overran is killed and not reused."""

    def __init__(self):
        self._idle: list[_Worker] = []
        self._lock = threading.Lock()
        atexit.register(self.close)

    def verify(self, pred: str, ref: str, timeout: int) -> bool:
        with self._lock:
            worker = self._idle.pop() if self._idle else None
        if worker is None:
            try:
                worker = _Worker()
            except (OSError, RuntimeError):
                return False
        verdict = worker.ask(pred, ref, timeout)
        if verdict is None:
            worker.kill()
            return False
        with self._lock:
            if len(self._idle) < MAX_IDLE_WORKERS:
                self._idle.append(worker)
                worker = None
        if worker is not None:
            worker.kill()
        return verdict

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for worker in idle:
            worker.kill()


def _serve() -> None:
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT_BYTES, MEMORY_LIMIT_BYTES))
    except (ImportError, ValueError, OSError):
        pass  # no limit where the platform has none
    import math_verify  # noqa: F401  (imported before "ready": the first request pays no import)

    print("ready", flush=True)
    for line in sys.stdin:
        pred, ref, timeout = json.loads(line)
        print("1" if verify_pair(pred, ref, timeout or None) else "0", flush=True)


if __name__ == "__main__":
    _serve()
