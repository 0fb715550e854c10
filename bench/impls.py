"""The implementations the benchmark compares, behind one signature.

Each is a function loss(problem, logits) -> 0-dim loss carrying the gradient to `logits`,
which is the (B, T, V) view of the problem's buffer, or the whole (B, T+1, V) buffer for
an implementation with `padded_input`. All compute the objective of Case.options:

  eager        TRL-style selective_log_softmax (written here, TRL 1.16's eager semantics)
               + the eager loss over (B, T) log-probs
  compile      torch.compile of grpo_kernels.reference.grpo_loss
  liger        Liger-Kernel 0.8.x's Triton GRPO loss (triton_grpo_loss, reduce=True)
  trl          TRL 1.16's fused Triton log-prob/entropy kernel + the eager loss
  ours-triton, ours-torch, ours-cuda
               grpo_kernels.fused_grpo_loss(..., backend=...)

"The eager loss" is reference.grpo_loss_from_logprobs: TRL inlines its loss in
GRPOTrainer._compute_loss, which cannot be called on tensors alone, and the reference
transcribes that method op for op (SPEC section 1). Over (B, T) tensors it costs launches,
not bandwidth, and eager and trl share it, so their difference is the log-prob pass alone.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import grpo_kernels
from grpo_kernels import reference
from grpo_kernels.options import GRPOOptions

from .problem import Problem

LossFn = Callable[[Problem, torch.Tensor], torch.Tensor]

ALL = ("eager", "compile", "liger", "trl", "ours-triton", "ours-torch", "ours-cuda")
# The peers a ratio is reported against (SPEC section 4: >= 5x eager, >= 1.3x the best peer).
BASELINES = ("eager", "compile", "liger", "trl")
PEERS = ("liger", "trl")


@dataclass(frozen=True)
class Impl:
    name: str
    loss: LossFn
    padded_input: bool = False  # takes the whole (B, T+1, V) buffer (Liger's convention)
    inplace: bool = False  # the gradient overwrites the logits: fresh logits are needed to read results
    version: str | None = None  # of the third-party package, recorded with the results


# --- eager ------------------------------------------------------------------------------


def trl_style_selective_log_softmax(logits: torch.Tensor, index: torch.Tensor,
                                    temperature: float = 1.0) -> torch.Tensor:
    """log_softmax(logits / temperature) gathered at `index`, as TRL 1.16's eager branch.

    TRL's own selective_log_softmax dispatches to its Triton kernel on CUDA, so the eager
    semantics are written out here (trl/trainer/utils.py, the non-Triton branch):
    float32/64 gathers and subtracts a per-sequence logsumexp; bf16/fp16 runs log_softmax
    one sequence at a time ("logsumexp approach is unstable with bfloat16"), so one
    sequence's log-softmax is live at a time in the forward, and autograd keeps all of
    them (the logits' size in their dtype) for the backward.
    """
    if temperature != 1.0:
        logits = logits / temperature
    index = index.unsqueeze(-1)
    if logits.dtype in (torch.float32, torch.float64):
        selected = torch.gather(logits, dim=-1, index=index).squeeze(-1)
        return selected - torch.stack([torch.logsumexp(row, dim=-1) for row in logits])
    return torch.stack([F.log_softmax(row, dim=-1).gather(-1, idx).squeeze(-1)
                        for row, idx in zip(logits, index, strict=True)])


def _loss_from_logprobs(p: Problem, logprobs: torch.Tensor, entropy: torch.Tensor | None) -> torch.Tensor:
    """The eager GRPO loss over (B, T) log-probs, computed in float32 like TRL's.

    TRL subtracts float32 old log-probs from its bf16 log-probs, which promotes to float32;
    the upcast here gives those same values. An implementation that computes no entropy
    passes None: the entropy is only a logged metric in this objective, so zeros stand in.
    """
    logprobs = logprobs.float()
    entropy = torch.zeros_like(logprobs) if entropy is None else entropy
    loss, _ = reference.grpo_loss_from_logprobs(logprobs, entropy, p.advantages, p.mask, p.old, p.ref, None, None,
                                                GRPOOptions(**p.case.options))
    return loss


def _eager(p: Problem, logits: torch.Tensor) -> torch.Tensor:
    # No entropy: TRL computes it in a separate pass only when logged, and skipping it
    # makes eager the strongest plain-PyTorch baseline.
    return _loss_from_logprobs(p, trl_style_selective_log_softmax(logits, p.ids, p.case.options["temperature"]),
                               None)


# --- compile ----------------------------------------------------------------------------

_compiled_reference = None


def _compile(p: Problem, logits: torch.Tensor) -> torch.Tensor:
    global _compiled_reference
    if _compiled_reference is None:
        # dynamic=False: one graph per shape, the fastest code for it; the harness compiles
        # only a few shapes (see run.COMPILE_CASES) and times calls after the first.
        _compiled_reference = torch.compile(reference.grpo_loss, dynamic=False)
    loss, _ = _compiled_reference(logits, p.ids, p.advantages, p.mask, p.old, p.ref, **p.case.options)
    return loss


# --- Liger-Kernel -----------------------------------------------------------------------


def _liger_loss() -> LossFn:
    from liger_kernel.transformers.grpo_loss import triton_grpo_loss

    def loss(p: Problem, padded: torch.Tensor) -> torch.Tensor:
        o = p.case.options
        # Every keyword explicit: Liger's defaults differ from TRL's (temperature 0.9,
        # eps_high 0.4). inplace=True is Liger's default, what its users run.
        value, _ = triton_grpo_loss(
            padded, p.old, p.ref, p.ids, p.advantages, p.mask, temperature=o["temperature"], beta=o["beta"],
            eps_low=o["epsilon_low"], eps_high=o["epsilon_high"], inplace=True, loss_type=o["loss_type"],
            importance_sampling_level=o["importance_sampling_level"], reduce=True,
            use_bias_correction_kl=o["use_bias_correction_kl"])
        return value

    return loss


# --- TRL's Triton kernel ----------------------------------------------------------------


def _trl_kernel_module():
    """trl/kernels/logprob_entropy.py, loaded from its file.

    `import trl` pulls in transformers, accelerate and datasets (seconds, and packages the
    GPU machine may lack); the kernel's file needs only torch and triton.
    """
    spec = importlib.util.find_spec("trl")
    if spec is None or spec.origin is None:
        raise ImportError("trl is not installed")
    path = Path(spec.origin).parent / "kernels" / "logprob_entropy.py"
    if not path.is_file():
        raise ImportError(f"this trl has no {path.relative_to(Path(spec.origin).parent)}")
    name = "bench._trl_logprob_entropy"
    module = sys.modules.get(name)
    if module is None:
        file_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(file_spec)
        file_spec.loader.exec_module(module)
        sys.modules[name] = module
    return module


def _trl_loss() -> LossFn:
    kernel = _trl_kernel_module().selective_log_softmax_and_entropy

    def loss(p: Problem, logits: torch.Tensor) -> torch.Tensor:
        # row_mask skips padded rows, as TRL passes its completion mask.
        logprobs, entropy = kernel(logits, p.ids, temperature=p.case.options["temperature"], row_mask=p.mask)
        return _loss_from_logprobs(p, logprobs, entropy.detach())

    return loss


# --- ours -------------------------------------------------------------------------------


def _ours(backend: str) -> LossFn:
    def loss(p: Problem, logits: torch.Tensor) -> torch.Tensor:
        value, _ = grpo_kernels.fused_grpo_loss(logits, p.ids, p.advantages, p.mask, p.old, p.ref, backend=backend,
                                                **p.case.options)
        return value

    return loss


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cuda_backend_available() -> bool:
    try:
        from grpo_kernels import cuda
    except ImportError:
        return False
    return bool(cuda.is_available())


def discover(device: torch.device, requested: Sequence[str] | None = None) -> tuple[list[Impl], dict[str, str]]:
    """The implementations that can run on `device`, and why each other one cannot.

    `requested` (default: all that apply) may also ask for "compile" on the CPU, which is
    left out there by default: Inductor's C++ build takes minutes on a small machine.
    """
    on_gpu = device.type == "cuda"
    names = list(requested) if requested else [n for n in ALL if on_gpu or n != "compile"]
    unknown = sorted(set(names) - set(ALL))
    if unknown:
        raise ValueError(f"unknown implementation(s) {unknown}; choose from {', '.join(ALL)}")
    impls: list[Impl] = []
    skipped: dict[str, str] = {}
    for name in names:
        try:
            if name == "eager":
                impls.append(Impl(name, _eager))
            elif name == "compile":
                impls.append(Impl(name, _compile))
            elif name == "ours-torch":
                impls.append(Impl(name, _ours("torch")))
            elif not on_gpu:  # the rest are Triton or CUDA code
                skipped[name] = "needs a CUDA device"
            elif name == "ours-triton":
                impls.append(Impl(name, _ours("triton")))
            elif name == "ours-cuda":
                if _cuda_backend_available():
                    impls.append(Impl(name, _ours("cuda")))
                else:
                    skipped[name] = "grpo_kernels.cuda is not built or not available"
            elif name == "liger":
                impls.append(Impl(name, _liger_loss(), padded_input=True, inplace=True,
                                  version=_version("liger-kernel") or _version("liger_kernel")))
            elif name == "trl":
                impls.append(Impl(name, _trl_loss(), version=_version("trl")))
        except ImportError as exc:
            skipped[name] = f"not importable: {exc}"
    return impls, skipped
