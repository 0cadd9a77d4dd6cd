"""``rlvr-fast`` under torchrun with two probes of tests/distributed/test_distributed.py, kept out of the library:

    torchrun --nproc_per_node=2 tests/distributed/torchrun_probe.py <marker file> <failing rank or -1> train ...

- every rank holds an object that appends "rank <r> finalized" to the marker file when the interpreter's finalization
  frees it (module globals are cleared there; ``atexit`` handlers run before, so they would not tell);
- the failing rank (if not -1) raises in the reward of step 0's completions, after the all-gather of their texts:
  mid-run, while the other rank goes on to the next collective. Raised in the test's own hook, so no check of the
  library's can refuse the run before it starts.
"""

from __future__ import annotations

import os
import sys

from rlvr_fast.cli import main
from rlvr_fast.trainer.step import Scorer

RANK = int(os.environ.get("RANK", "0"))


class FinalizationMarker:
    """Appends a line to ``path`` when freed: by the interpreter's finalization, for a module global."""

    def __init__(self, path: str):
        self.path, self.rank = path, RANK  # the module's globals are cleared before this object is freed

    def __del__(self, _open=open):  # builtins may be gone by then: bind open now
        with _open(self.path, "a") as f:
            f.write(f"rank {self.rank} finalized\n")


def fail_in_reward(rank: int) -> None:
    score = Scorer.__call__

    def failing_score(self, texts, problems, step):
        if (RANK, step) == (rank, 0):
            raise RuntimeError(f"injected reward failure on rank {rank}")
        return score(self, texts, problems, step)

    Scorer.__call__ = failing_score


if __name__ == "__main__":
    marker = FinalizationMarker(sys.argv[1])
    if int(sys.argv[2]) >= 0:
        fail_in_reward(int(sys.argv[2]))
    sys.exit(main(sys.argv[3:]))
