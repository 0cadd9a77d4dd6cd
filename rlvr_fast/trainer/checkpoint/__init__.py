"""Run checkpoints (not activation checkpointing, which is ``trainer/update/memory.py``): the folder rule every format
shares (``folder``), what a checkpoint holds (``state``), the one-process format (``local``), the torchrun format
(``dcp_layout``, ``sharded``), reading DCP's pickles without running code (``safe_unpickle``), strict loading
(``strict_loading``), and the output folder a run owns (``output_dir``, ``run_lock``).

Importing the package registers both formats (``folder.FORMATS``), whichever module is imported first."""

from rlvr_fast.trainer.adapters import checkpoint as _adapter_checkpoint  # noqa: F401 (format "adapter")
from rlvr_fast.trainer.checkpoint import dcp_layout, local  # noqa: F401 (each registers its format)
