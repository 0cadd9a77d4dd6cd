"""Data parallelism under torchrun: ``world`` (who this process is, the step's bookkeeping), ``collectives`` (the
process group, gathers of Python objects, how a rank ends), ``wrappers`` (DDP / FSDP2 around the policy), ``filler``
(the rows that keep every rank's micro-batch count equal). docs/design.md, "Data parallelism", says why it is built
this way."""
