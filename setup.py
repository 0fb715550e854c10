"""Build hook: the package is pure Python, plus the optional CUDA extension
grpo_kernels._C_sweep (csrc/, see csrc/README.md), built only when nvcc and a CUDA build of
torch are both present at build time. Otherwise the install is pure Python, without error,
and grpo_kernels.cuda compiles csrc/ on first use where it can.

torch is not a build requirement (it would pull several GB of CUDA wheels into pip's
isolated build environment), so `pip install -e .` sees torch only without build isolation:
`pip install --no-build-isolation -e .` builds the extension; a plain install skips it.
"""
from __future__ import annotations

import os
import shutil
import sys

from setuptools import setup

# Ampere (A100) and Hopper (H100/H200) cubins, plus compute_90 PTX that newer GPUs JIT.
GENCODE = [
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90,code=sm_90",
    "-gencode=arch=compute_90,code=compute_90",
]


def _cuda_extension_or_reason():
    """([CUDAExtension], {"build_ext": BuildExtension}) or (None, why it is skipped)."""
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        return None, "torch is not importable at build time (use pip install --no-build-isolation to build it)"
    if torch.version.cuda is None:
        return None, f"torch {torch.__version__} is a CPU build"
    nvcc = shutil.which("nvcc") or (cpp_extension.CUDA_HOME and shutil.which(
        "nvcc", path=os.path.join(cpp_extension.CUDA_HOME, "bin")))
    if not nvcc:
        return None, "nvcc was not found (put it on PATH or set CUDA_HOME)"
    extension = cpp_extension.CUDAExtension(
        name="grpo_kernels._C_sweep",
        sources=["csrc/binding.cpp", "csrc/grpo_sweep.cu"],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo", *GENCODE]},
    )
    return ([extension], {"build_ext": cpp_extension.BuildExtension}), ""


built, reason = _cuda_extension_or_reason()
if built is None:
    print(f"grpo_kernels: installing without the CUDA extension: {reason}", file=sys.stderr)
    setup()
else:
    ext_modules, cmdclass = built
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
