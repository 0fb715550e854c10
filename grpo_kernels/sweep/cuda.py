"""The vocabulary sweep of csrc/ (CUDA C++), behind the backend contract of docs/design.md.

Selected with `backend="cuda"`. The compiled module is `grpo_kernels._C_sweep` when
`pip install` built it (setup.py does so when nvcc and a CUDA build of torch are present);
otherwise the first use compiles csrc/ with `torch.utils.cpp_extension.load` (about a
minute, cached under TORCH_EXTENSIONS_DIR; GRPO_KERNELS_NO_JIT=1 turns this off). Where
neither works, `is_available()` is False, `unavailable_reason()` says why, and `forward`,
`backward` and `require` raise a RuntimeError carrying that reason.
"""
from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path
from types import ModuleType

import torch

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Where the CUDA sources are: shipped as package data (grpo_kernels/csrc/, in a wheel), else the checkout's csrc/.
_PACKAGE = Path(__file__).resolve().parent.parent  # grpo_kernels/
CSRC_DIRS = (_PACKAGE / "csrc", _PACKAGE.parent / "csrc")
SOURCES = ("binding.cpp", "grpo_sweep.cu", "two_pass.cu")
# The JIT build targets the visible GPU (torch's default, or TORCH_CUDA_ARCH_LIST);
# setup.py builds for sm_80 and sm_90 with the same optimisation flags.
NVCC_FLAGS = ["-O3", "-lineinfo"]
CXX_FLAGS = ["-O3"]


@functools.cache
def _load() -> tuple[ModuleType | None, str]:
    """(module, "") or (None, why not). Tried once per process: a failed compile is not retried."""
    if torch.version.cuda is None:
        return None, (f"torch {torch.__version__} is a CPU build (torch.version.cuda is None); "
                      "backend='cuda' needs a CUDA build of torch")
    if not torch.cuda.is_available():
        return None, "no CUDA device is visible (torch.cuda.is_available() is False)"
    try:
        from .. import _C_sweep

        return _C_sweep, ""
    except ImportError as error:  # not built, or built against another torch
        prebuilt = f"grpo_kernels._C_sweep is not importable ({error})"
    return _jit_build(prebuilt)


def source_dir() -> Path | None:
    """The first of CSRC_DIRS that holds every file of SOURCES, or None."""
    return next((d for d in CSRC_DIRS if all((d / name).is_file() for name in SOURCES)), None)


def _jit_build(prebuilt: str) -> tuple[ModuleType | None, str]:
    """Compiles csrc/ with torch.utils.cpp_extension.load, or says why it cannot."""
    if os.environ.get("GRPO_KERNELS_NO_JIT") == "1":
        return None, f"{prebuilt}, and GRPO_KERNELS_NO_JIT=1 forbids compiling csrc/ on first use"
    csrc = source_dir()
    if csrc is None:
        return None, (f"{prebuilt}, and the sources to compile ({', '.join(SOURCES)}) are in none of "
                      f"{', '.join(str(d) for d in CSRC_DIRS)}")
    from torch.utils import cpp_extension

    nvcc = shutil.which("nvcc") or (cpp_extension.CUDA_HOME and shutil.which("nvcc", path=str(
        Path(cpp_extension.CUDA_HOME) / "bin")))
    if not nvcc:
        return None, f"{prebuilt}, and nvcc was not found to compile csrc/ (put it on PATH or set CUDA_HOME)"
    if not cpp_extension.is_ninja_available():
        return None, (f"{prebuilt}, and torch.utils.cpp_extension.load needs ninja to compile csrc/ "
                      "(pip install ninja, or build at install time: pip install --no-build-isolation -e .)")
    try:
        module = cpp_extension.load(
            name="grpo_kernels_C_sweep",
            sources=[str(csrc / name) for name in SOURCES],
            extra_cflags=CXX_FLAGS,
            extra_cuda_cflags=NVCC_FLAGS,
            verbose=os.environ.get("GRPO_KERNELS_VERBOSE_BUILD") == "1",
        )
    except Exception as error:  # the compiler's output is in the message
        return None, f"{prebuilt}, and compiling csrc/ failed: {error}"
    return module, ""


def is_available() -> bool:
    """Whether backend='cuda' can run here (compiling csrc/ on first call if needed)."""
    return _load()[0] is not None


def unavailable_reason() -> str:
    """Why backend='cuda' cannot run here; "" when it can."""
    return _load()[1]


def _module() -> ModuleType:
    module, reason = _load()
    if module is None:
        raise RuntimeError(f"backend='cuda' is not available: {reason}")
    return module


def require(device: torch.device) -> None:
    """Raises RuntimeError unless backend='cuda' can run on tensors on `device`."""
    if device.type != "cuda":
        raise RuntimeError(f"backend='cuda' needs CUDA tensors (got {device}); use backend='torch' or 'auto' "
                           "for CPU tensors")
    _module()


def _check_supported(logits: torch.Tensor, temperature: float | torch.Tensor) -> tuple[float, torch.Tensor | None]:
    """Rejects what csrc/ cannot run; returns the binding's (temperature, temperature_per_row)."""
    if logits.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"backend='cuda' takes float32, bfloat16 or float16 logits, got {logits.dtype}")
    if isinstance(temperature, torch.Tensor):
        return 1.0, temperature  # one per row; the scalar is then unused
    return float(temperature), None


def forward(logits: torch.Tensor, ids: torch.Tensor, temperature: float | torch.Tensor,
            active: torch.Tensor | None, vocab_start: int = 0, partial: bool = False):
    """logits (B, T, V), ids (N,) global ids (N = B * T), temperature a float or (N,), active
    (N,) bool or None -> logprobs, entropy, m, log_sum, mean_rel: five (N,) fp32 tensors."""
    if partial:
        raise NotImplementedError("backend='cuda' has no vocab-parallel (partial) sweep; use backend='triton' "
                                  "or 'torch' with tp_group")
    module = _module()
    scalar, per_row = _check_supported(logits, temperature)
    logprobs, entropy, m, log_sum, mean_rel = module.forward(logits, ids, scalar, per_row, active, int(vocab_start))
    return logprobs, entropy, m, log_sum, mean_rel


def backward(logits: torch.Tensor, ids: torch.Tensor, temperature: float | torch.Tensor,
             active: torch.Tensor | None, m: torch.Tensor, log_sum: torch.Tensor, mean_rel: torch.Tensor,
             grad_logprobs: torch.Tensor | None, grad_entropy: torch.Tensor | None, grad_out: torch.Tensor,
             vocab_start: int = 0) -> None:
    """Writes dL/dlogits into every element of grad_out (B, T, V), which may be the logits
    themselves; inactive rows get 0."""
    module = _module()
    scalar, per_row = _check_supported(logits, temperature)
    module.backward(logits, ids, scalar, per_row, active, m, log_sum, mean_rel, grad_logprobs, grad_entropy,
                    grad_out, int(vocab_start))


# --- The two-pass token-local loss (csrc/two_pass.cu, csrc/two_pass.h) -------------------------
# One launch reads each active row of the model's (B, L, V) output once, holds it on chip (split
# over a thread-block cluster on sm_90) and writes the gradient of the whole tensor once, with
# the per-token loss of loss_triton.py. The contract is csrc/two_pass.h; the Triton two-pass
# kernel implements the same, so the caller may use either.

def two_pass_plan(logits: torch.Tensor, cluster_size: int = 0) -> tuple[int, int]:
    """(blocks per row, shared memory bytes per block) the kernel uses for these logits.
    Raises RuntimeError with the reason where it cannot hold their rows on chip (sm_80 with a
    row over one block's shared memory, a build without sm_90 code, an unsupported dtype)."""
    module = _module()
    if logits.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"two_pass takes float32, bfloat16 or float16 logits, got {logits.dtype}")
    blocks, smem = module.two_pass_plan(logits, int(cluster_size))
    return int(blocks), int(smem)


def two_pass_unavailable_reason(logits: torch.Tensor) -> str:
    """Why two_pass cannot run on these logits here; "" when it can."""
    if logits.device.type != "cuda":
        return f"two_pass needs CUDA tensors (got {logits.device})"
    reason = unavailable_reason()
    if reason:
        return f"backend='cuda' is not available: {reason}"
    try:
        two_pass_plan(logits)
    except (RuntimeError, TypeError) as error:
        return str(error)
    return ""


def two_pass(logits: torch.Tensor, row_start: int, T: int, ids: torch.Tensor, inv_temperature: float,
             temperature_rows: torch.Tensor | None, active: torch.Tensor | None, w: torch.Tensor,
             mask: torch.Tensor, advantages: torch.Tensor, old_logprobs: torch.Tensor | None,
             ref_logprobs: torch.Tensor | None, rollout: torch.Tensor | None, scalars: torch.Tensor, *,
             beta: float, eps_low: float, eps_high: float, delta: float | None = None,
             dual_clip: float | None = None, kl_estimator: int = 3, kl_ratio_weight: bool = False,
             has_entropy_grad: bool = False, grad: torch.Tensor | None = None, cluster_size: int = 0):
    """logits (B, L, V), row r = b * T + t scoring logits[b, row_start + t] -> (grad (B, L, V) in
    the logits' dtype, every element written; logprobs (N,), entropy (N,), sums (7, N) fp32).
    grad=None allocates it; grad=logits computes in place. scalars (2,) fp32 on the device
    ([c scale, e scale]) is never read on the host. See csrc/two_pass.h for the formulas."""
    module = _module()
    if logits.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"two_pass takes float32, bfloat16 or float16 logits, got {logits.dtype}")
    if grad is None:
        grad = torch.empty_like(logits)
    logprobs, entropy, sums = module.two_pass(
        logits, int(row_start), int(T), ids, float(inv_temperature), temperature_rows, active, w, mask, advantages,
        old_logprobs, ref_logprobs, rollout, scalars, float(beta), float(eps_low), float(eps_high),
        None if delta is None else float(delta), None if dual_clip is None else float(dual_clip), int(kl_estimator),
        bool(kl_ratio_weight), bool(has_entropy_grad), grad, int(cluster_size))
    return grad, logprobs, entropy, sums
