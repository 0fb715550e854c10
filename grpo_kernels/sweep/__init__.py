"""The logits sweeps: one contract (docs/design.md), three backends.

- pytorch.py chunked PyTorch: the CPU path and the fallback
- triton.py  the Triton kernels (CUDA, or the CPU under TRITON_INTERPRET=1)
- grpo_kernels/sweep/cuda.py loads and calls the CUDA C++ sweeps of csrc/
"""
from __future__ import annotations

import os
from types import ModuleType

import torch

from ..stats import compute_dtype

BACKENDS = ("torch", "triton", "cuda")


def resolve_backend(name: str, device: torch.device) -> str:
    """'auto' made concrete (Triton on CUDA, chunked PyTorch elsewhere), with a clear error
    where the backend asked for cannot run on `device`."""
    if name == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if name == "triton" and device.type not in ("cuda", "meta") and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"backend='triton' needs CUDA tensors (got {device}); on the CPU it runs only "
                           "under Triton's interpreter (TRITON_INTERPRET=1 set before importing triton). "
                           "Use backend='torch' or 'auto' for CPU tensors.")
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of auto, triton, torch, cuda; got {name!r}")
    return name


def stats_dtype(dtype: torch.dtype, backend: str) -> torch.dtype:
    """The dtype of a backend's per-row outputs: fp32, except that the PyTorch paths run float64
    inputs in float64 (the oracle's precision)."""
    return compute_dtype(dtype) if backend == "torch" else torch.float32


def backend_module(name: str) -> ModuleType:
    """The module implementing the sweep contract for a resolved backend name."""
    if name == "torch":
        from . import pytorch as torch_sweep

        return torch_sweep
    if name == "triton":
        from . import triton as triton_sweep

        return triton_sweep
    from . import cuda

    return cuda


def require(name: str, device: torch.device) -> None:
    """Raise a clear error now, not at the first kernel, if backend `name` cannot run on `device`."""
    if name == "cuda" and device.type != "meta":
        from . import cuda

        cuda.require(device)
