"""Triton kernels of rlvr_fast, installed as ``rlvr_fast.kernels``.

Only ``@triton.jit`` functions and their launchers live here: no autograd and no policy (that is ``rlvr_fast.ops``).
Import a kernel module only after deciding on the Triton interpreter: ``TRITON_INTERPRET=1`` must be set before the
first ``@triton.jit`` definition is executed for kernels to run on CPU tensors.
"""
