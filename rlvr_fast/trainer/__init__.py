"""The lean trainer: ``RLVRConfig`` and ``train`` (rollout -> rewards -> advantages -> filter -> update batch -> update
-> log; ``trainer/loop.py``)."""

from rlvr_fast.trainer.config import RLVRConfig

__all__ = ["RLVRConfig", "train"]


def train(cfg: RLVRConfig):
    """Run training with ``cfg`` (imports the trainer's heavier dependencies on first use)."""
    from rlvr_fast.trainer.loop import train as _train

    return _train(cfg)
