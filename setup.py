"""Build entry point for rlvr_fast.

Everywhere: a pure-Python install of the package ``rlvr_fast`` plus the top-level folder ``kernels/`` installed as the
subpackage ``rlvr_fast.kernels`` (never as a top-level ``kernels`` module: that import name belongs to another PyPI
project).

Only where torch has CUDA and nvcc is found: the optional extension ``rlvr_fast._C`` built from ``csrc/``.
``RLVR_FAST_SKIP_CUDA_BUILD=1`` skips it; ``RLVR_FAST_CUDA_ARCHS`` (e.g. "8.0;9.0") overrides the architectures.
"""

from __future__ import annotations

import glob
import os
import shutil

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0"


def _cuda_sources() -> list[str]:
    patterns = ("csrc/*.cpp", "csrc/*.cu")
    return sorted(p for pat in patterns for p in glob.glob(pat, root_dir=HERE))


def _cuda_build_reason() -> str | None:
    """Why the CUDA extension is not built, or None when it should be."""
    if os.environ.get("RLVR_FAST_SKIP_CUDA_BUILD", "0") not in ("", "0"):
        return "RLVR_FAST_SKIP_CUDA_BUILD is set"
    if not _cuda_sources():
        return "csrc/ holds no sources"
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
    except ImportError:
        return "torch is not importable at build time (build with --no-build-isolation)"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} has no CUDA"
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else shutil.which("nvcc")
    if not nvcc or not os.path.exists(nvcc):
        return "nvcc was not found (set CUDA_HOME)"
    return None


def _extensions() -> tuple[list, dict]:
    reason = _cuda_build_reason()
    if reason is not None:
        print(f"rlvr_fast: building without the CUDA extension rlvr_fast._C ({reason})")
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", os.environ.get("RLVR_FAST_CUDA_ARCHS", DEFAULT_CUDA_ARCHS))
    ext = CUDAExtension(
        name="rlvr_fast._C",
        sources=_cuda_sources(),
        extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": ["-O3", "-std=c++17", "--use_fast_math"]},
    )
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["rlvr_fast", "rlvr_fast.*"]) + ["rlvr_fast.kernels"],
    package_dir={"rlvr_fast": "rlvr_fast", "rlvr_fast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
