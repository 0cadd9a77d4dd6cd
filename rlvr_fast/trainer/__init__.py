"""The lean trainer: ``RLVRConfig`` and ``train``.

One step, top to bottom (``loop.Trainer.train_step``): the rollout (``rollout/``) -> rewards, advantages, difficulty
filter and update batch (``step.py``) -> the update (``update/``) -> the metrics record (``reporting/``). Around it:
the config (``config.py``, ``schema.py``), the model and its hidden-states forward (``model.py``), the checks before
the model loads (``checks/``), run checkpoints and the output folder (``checkpoint/``), torchrun data parallelism
(``parallel/``) and held-out evaluation (``evaluation/``).
"""

from rlvr_fast.trainer.config import RLVRConfig

__all__ = ["RLVRConfig", "train"]


def train(cfg: RLVRConfig):
    """Run training with ``cfg`` (imports the trainer's heavier dependencies on first use)."""
    from rlvr_fast.trainer.loop import train as _train

    return _train(cfg)
