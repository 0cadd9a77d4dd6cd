"""One LoRA and one QLoRA training step of the default model on CUDA (``RLVRConfig.adapter``), each with its peak
GPU memory, written to OUT/lora_gpu.json. Called by benchmarks/gpu/run.sh; ``--device cpu`` dry-runs it on a tiny
batch where no GPU is at hand (QLoRA on the CPU needs bitsandbytes' CPU NF4 kernel)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time


def one_step(adapter: str, device: str) -> dict:
    import torch

    from rlvr_fast.trainer.config import RLVRConfig
    from rlvr_fast.trainer.loop import Trainer

    with tempfile.TemporaryDirectory() as out:
        cfg = RLVRConfig(
            adapter=adapter, device=device, steps=1, prompts_per_step=2, group_size=4, max_completion_length=16,
            checkpoint_every=0, progress=False, output_dir=out, rewards={"correct": 1.0},
        )  # fmt: skip
        trainer = Trainer(cfg)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        record = trainer.train_step(0)
        seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    return {"adapter": adapter, "seconds": seconds, "peak_gpu_bytes": peak, "loss": record.get("loss")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    results = []
    for adapter in ("lora", "qlora"):
        try:
            results.append(one_step(adapter, args.device))
        except Exception as exc:  # recorded, and the other adapter still runs
            results.append({"adapter": adapter, "error": f"{type(exc).__name__}: {exc}"})
        print(json.dumps(results[-1]))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "lora_gpu.json"), "w") as f:
        json.dump(results, f, indent=1)
    return int(any("error" in r for r in results))


if __name__ == "__main__":
    sys.exit(main())
