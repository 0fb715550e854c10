"""Build hook: the package is pure Python, plus the optional CUDA extension
grpo_kernels._C_sweep (csrc/, see csrc/README.md), built only when nvcc and a CUDA build of
torch are both present at build time. Otherwise the install is pure Python, without error,
and grpo_kernels.sweep.cuda compiles csrc/ on first use where it can.

The CUDA sources also ship as package data: build_py copies csrc/*.cu, *.cuh, *.h, *.cpp into
the built package as grpo_kernels/csrc/, where grpo_kernels.sweep.cuda looks for them first (the
checkout's csrc/ second), so the first-use build works from an installed wheel too. csrc/ stays
where it is in the repository (compile_check.sh and the extension use those paths); MANIFEST.in
puts it in the sdist, and a wheel built from the sdist copies it the same way.

torch is not a build requirement (it would pull several GB of CUDA wheels into pip's
isolated build environment), so `pip install -e .` sees torch only without build isolation:
`pip install --no-build-isolation -e .` builds the extension; a plain install skips it, and so
does GRPO_KERNELS_NO_CUDA_EXTENSION=1.
"""
from __future__ import annotations

import glob
import os
import shutil
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
# The CUDA sources that grpo_kernels.sweep.cuda compiles on first use (and their headers).
CUDA_SOURCE_PATTERNS = ("*.cu", "*.cuh", "*.h", "*.cpp")

# Ampere (A100) and Hopper (H100/H200) cubins, plus compute_90 PTX that newer GPUs JIT.
GENCODE = [
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90,code=sm_90",
    "-gencode=arch=compute_90,code=compute_90",
]


def _cuda_extension_or_reason():
    """([CUDAExtension], {"build_ext": BuildExtension}) or (None, why it is skipped)."""
    if os.environ.get("GRPO_KERNELS_NO_CUDA_EXTENSION") == "1":
        return None, "GRPO_KERNELS_NO_CUDA_EXTENSION=1 (the first use compiles the shipped sources instead)"
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
        sources=["csrc/binding.cpp", "csrc/grpo_sweep.cu", "csrc/two_pass.cu"],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo", *GENCODE]},
    )
    return ([extension], {"build_ext": cpp_extension.BuildExtension}), ""


class build_py_with_cuda_sources(build_py):
    """build_py, plus csrc/'s CUDA sources copied into the built package as grpo_kernels/csrc/.

    Not in an editable install: there grpo_kernels.sweep.cuda finds the checkout's csrc/ itself.
    """

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        target = os.path.join(self.build_lib, "grpo_kernels", "csrc")
        self.mkpath(target)
        for pattern in CUDA_SOURCE_PATTERNS:
            for source in sorted(glob.glob(os.path.join(HERE, "csrc", pattern))):
                self.copy_file(source, os.path.join(target, os.path.basename(source)))

    def get_outputs(self, include_bytecode=True):
        outputs = super().get_outputs(include_bytecode)
        if getattr(self, "editable_mode", False):
            return outputs
        target = os.path.join(self.build_lib, "grpo_kernels", "csrc")
        return outputs + [os.path.join(target, os.path.basename(source)) for pattern in CUDA_SOURCE_PATTERNS
                          for source in sorted(glob.glob(os.path.join(HERE, "csrc", pattern)))]


built, reason = _cuda_extension_or_reason()
if built is None:
    print(f"grpo_kernels: installing without the CUDA extension: {reason}", file=sys.stderr)
    setup(cmdclass={"build_py": build_py_with_cuda_sources})
else:
    ext_modules, cmdclass = built
    setup(ext_modules=ext_modules, cmdclass={**cmdclass, "build_py": build_py_with_cuda_sources})
