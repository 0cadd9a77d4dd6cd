"""Peak RSS (ru_maxrss) and optimizer-state bytes after each training step of the default ``rlvr-fast train`` config
(SmolLM2-135M-Instruct on the CPU): where the main job's peak grows between its first and second step.

    python benchmarks/rss_by_step.py --steps 3

Measured 2026-12-04 on this project's 2-core CPU machine at 3d972cb: 1.25 GB after loading, 2.89 GB after step 0,
3.75 / 3.77 GB after steps 1 and 2; AdamW's state 1.08 GB from step 0 on (created by the first optimizer step, after
that step's peak).
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time

import torch

from rlvr_fast.trainer.config import RLVRConfig
from rlvr_fast.trainer.loop import Trainer


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux: KiB


def optimizer_state_bytes(optimizer) -> int:
    return sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args()
    cfg = RLVRConfig(output_dir=tempfile.mkdtemp() + "/run", progress=False, checkpoint_every=0, steps=args.steps)
    trainer = Trainer(cfg)
    print(f"after loading: peak RSS {peak_rss_gb():.2f} GB")
    for step in range(args.steps):
        start = time.perf_counter()
        trainer.train_step(step)
        state = optimizer_state_bytes(trainer.optimizer) / 1e9
        print(f"step {step}: peak RSS {peak_rss_gb():.2f} GB, optimizer state {state:.2f} GB, "
              f"{time.perf_counter() - start:.0f} s", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
