"""``rlvr-fast`` with one rank SIGKILLed right after a given checkpoint is in place, as a crash or the OOM killer would
end it: the fault injection of tests/distributed/test_distributed.py, kept out of the library.

    torchrun --nproc_per_node=2 tests/distributed/killed_after_checkpoint.py <rank> <step> train --steps 3 ...
"""

from __future__ import annotations

import os
import signal
import sys

from rlvr_fast.cli import main
from rlvr_fast.trainer.loop import Trainer


def kill_after_checkpoint(rank: int, step: int) -> None:
    save = Trainer._save_checkpoint

    def save_then_die(self, at_step: int, *args, **kwargs):
        save(self, at_step, *args, **kwargs)
        if (self.world.rank, at_step) == (rank, step):
            # said before the kill: torchrun's own report of it is not certain (its agent once crashed reading a
            # surviving rank's half-written error file, JSONDecodeError, and printed no signal name)
            print(f"killed_after_checkpoint: rank {rank} sends itself SIGKILL after step {step}", file=sys.stderr)
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    Trainer._save_checkpoint = save_then_die


if __name__ == "__main__":
    kill_after_checkpoint(int(sys.argv[1]), int(sys.argv[2]))
    sys.exit(main(sys.argv[3:]))
