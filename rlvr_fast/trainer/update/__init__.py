"""The policy update of a step: the micro-batch plan (``micro_batches``), the shared-prefix forward
(``shared_prefix_forward``), the loss call through the fused ops (``loss``), activation checkpointing and host memory
(``memory``), the optimizers and the learning-rate schedule (``optimizers``, ``schedule``), and the NaN/inf guard
around it all (``finite_guard``)."""
