"""Build entry point for rlvr_fast.

Everywhere: a pure-Python install of the package ``rlvr_fast`` plus the top-level folder ``kernels/`` installed as the
subpackage ``rlvr_fast.kernels`` (never as a top-level ``kernels`` module: that import name belongs to another PyPI
project).

Only where torch has CUDA and nvcc is found: the optional extension ``rlvr_fast._C`` built from ``csrc/``.
``RLVR_FAST_SKIP_CUDA_BUILD=1`` skips it; ``RLVR_FAST_CUDA_ARCHS`` (e.g. "8.0;9.0") overrides the architectures.
Build it with ``pip install --no-build-isolation -e .`` (torch must be importable at build time). Without a GPU the
kernels can still be compile-checked: ``csrc/check/compile_check.sh``.
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


def _cuda_headers() -> list[str]:
    return sorted(p for pat in ("csrc/*.h", "csrc/*.cuh") for p in glob.glob(pat, root_dir=HERE))


def _ensure_cuda_home() -> None:
    """Point CUDA_HOME at a real toolkit before torch.utils.cpp_extension reads it (at import).

    torch guesses the toolkit as the folder above ``which nvcc``; where nvcc is a wrapper script outside the toolkit
    (e.g. /usr/local/bin/nvcc exec-ing /usr/local/cuda-13.0/bin/nvcc) that guess has no headers or libraries, and
    the binding would not find cuda_runtime_api.h. An explicit CUDA_HOME / CUDA_PATH always wins.
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    candidates = [os.path.dirname(os.path.dirname(p)) for p in (nvcc, nvcc and os.path.realpath(nvcc)) if p]
    for home in [*candidates, "/usr/local/cuda"]:
        if os.path.exists(os.path.join(home, "include", "cuda_runtime_api.h")) and os.path.exists(
            os.path.join(home, "bin", "nvcc")
        ):
            os.environ["CUDA_HOME"] = home
            return


def _cuda_build_reason() -> str | None:
    """Why the CUDA extension is not built, or None when it should be."""
    if os.environ.get("RLVR_FAST_SKIP_CUDA_BUILD", "0") not in ("", "0"):
        return "RLVR_FAST_SKIP_CUDA_BUILD is set"
    if not _cuda_sources():
        return "csrc/ holds no sources"
    _ensure_cuda_home()
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
    # cxx: torch adds the C++ standard its headers need (C++20 for torch >= 2.10); the .cu files include no torch
    # header and build as C++17. No --use_fast_math: AdamW must round as torch.optim.AdamW does (the kernels also use
    # explicit round-to-nearest intrinsics, csrc/rf_math.cuh, and flush no denormals).
    ext = CUDAExtension(
        name="rlvr_fast._C",
        sources=_cuda_sources(),
        depends=_cuda_headers(),
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-std=c++17", "-lineinfo"]},
    )
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["rlvr_fast", "rlvr_fast.*"]) + ["rlvr_fast.kernels"],
    package_dir={"rlvr_fast": "rlvr_fast", "rlvr_fast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
