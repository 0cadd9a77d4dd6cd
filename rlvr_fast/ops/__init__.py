"""Fused ops: each module holds the reference (the specification), the torch path, the dispatch to the Triton or CUDA
kernel, and the documented public function."""
