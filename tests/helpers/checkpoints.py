"""Checkpoint files for the fault tests: a tiny module and its optimizer, an earlier run's folder, and the faults
(a truncated file, a corrupted byte)."""

from __future__ import annotations

import json
import os

import torch

from rlvr_fast.trainer.checkpoint.local import save_checkpoint


def tiny_module():
    """A Linear(3, 2) and its AdamW after one step (so the optimizer has state to save)."""
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    return model, optimizer


def fake_earlier_run(output_dir, steps=(3, 4)):
    """An earlier run's folder: its metrics and checkpoints at ``steps`` (a tiny module's, enough for the rule)."""
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    for step in steps:
        save_checkpoint(str(output_dir), step, model, optimizer, {})
    (output_dir / "metrics.jsonl").write_text(json.dumps({"step": 0}) + "\n")
    return sorted(os.listdir(output_dir / "checkpoints"))


def truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def corrupt(path):  # same size, different bytes: only the digest can tell
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
