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
  ours-trainer the same Triton call on the model's whole output (see the calls below)
  ours-2pass   ours-trainer with GRPO_KERNELS_TWO_PASS=1 during the call: the two-pass kernel
               for token-local losses (SPEC section 14), opt-in until a GPU measures it; on a
               checkout without that switch it times the default path (its `kernels` say which)

"The eager loss" is reference.grpo_loss_from_logprobs: TRL inlines its loss in
GRPOTrainer._compute_loss, which cannot be called on tensors alone, and the reference
transcribes that method op for op (SPEC section 1). Over (B, T) tensors it costs launches,
not bandwidth, and eager and trl share it, so their difference is the log-prob pass alone.

The fused-linear unit (issue 6) has its own implementations, each a function
loss(problem, hidden, weight) -> 0-dim loss carrying the gradient to hidden (B, T, H) and
weight (V, H) of a LinearProblem:

  ours-linear  grpo_kernels.fused_linear_grpo_loss (backend triton on CUDA, torch on the CPU)
  unfused      logits = F.linear(hidden, weight) in the inputs' dtype, then our
               fused_grpo_loss on them; autograd's matmul backward gives the two gradients
  liger-linear Liger-Kernel 0.8.x's LigerFusedLinearGRPOLoss (liger_kernel.chunked_loss)
  trl-linear   TRL 1.16's ChunkedLogProbFunction (trl/kernels/chunked_logprob.py) called as
               its add_fused_lm_head calls it in GRPOTrainer, + the eager loss

Each logits implementation also has a `call` (bench/names.py): ours-triton is timed "bare"
(on a (B, T, V) leaf); ours-trainer is the same kernels called as a trainer calls them, on
the model's whole (B, T+1, V) output (call "trainer" where fused_grpo_loss takes that
output, SPEC section 15; "trainer-slice", logits[:, :-1] and autograd's slice backward,
where this checkout's does not yet: full_output_supported decides once); liger takes the
whole output natively ("trainer"); trl, eager and compile slice it as TRL does
("trainer-slice"). On the CPU grid eager and ours-torch stay "bare", as before.

The logprobs unit (the old/ref passes, no gradient) has functions fn(problem, logits) ->
(logprobs, entropy or None) under torch.no_grad():

  ours-logprobs          grpo_kernels.token_logprobs, entropy off, on the whole output
                         (its [:, :-1] view where the whole is not taken yet)
  ours-logprobs-entropy  the same with return_entropy=True
  trl-logprobs           TRL 1.16's selective_log_softmax_and_entropy (log-probs and entropy)
  eager-logprobs         trl_style_selective_log_softmax (no entropy)
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import sys
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import grpo_kernels
from grpo_kernels import reference
from grpo_kernels.options import GRPOOptions

from .names import (ALL, BASELINES, LINEAR_BASELINES, LINEAR_IMPLS, LINEAR_PEERS, LOGITS_IMPLS,  # noqa: F401
                    LOGPROBS_IMPLS, PEERS)
from .problem import LinearProblem, Problem

LossFn = Callable[[Problem, torch.Tensor], torch.Tensor]
LinearLossFn = Callable[[LinearProblem, torch.Tensor, torch.Tensor], torch.Tensor]
LogprobsFn = Callable[[Problem, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]
# Run on the CPU only when asked for with --impls: their CPU code is a fallback (Liger's
# loss without torch.compile, TRL's torch tiles instead of its Triton fold), useful to
# check an adapter here, not what their users run.
CPU_ON_REQUEST = ("compile", "liger-linear", "trl-linear")


@dataclass(frozen=True)
class Impl:
    name: str
    loss: LossFn | LinearLossFn
    padded_input: bool = False  # takes the whole (B, T+1, V) buffer (Liger's convention)
    inplace: bool = False  # the gradient overwrites the logits: fresh logits are needed to read results
    version: str | None = None  # of the third-party package, recorded with the results
    unit: str = "logits"  # the cases it takes: "logits", "logprobs" (a Problem) or "linear" (a LinearProblem)
    call: str = "bare"  # how it is handed the model's output (bench/names.py)


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


def _trl_file_module(relative: str, name: str):
    """A file of the installed trl package (e.g. "kernels/logprob_entropy.py"), loaded on
    its own as module `name`.

    `import trl` pulls in transformers, accelerate and datasets (seconds, and packages the
    GPU machine may lack); the kernels' files need only torch, triton and transformers.utils.
    """
    spec = importlib.util.find_spec("trl")
    if spec is None or spec.origin is None:
        raise ImportError("trl is not installed")
    path = Path(spec.origin).parent / relative
    if not path.is_file():
        raise ImportError(f"this trl has no {relative}")
    module = sys.modules.get(name)
    if module is None:
        file_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(file_spec)
        file_spec.loader.exec_module(module)
        sys.modules[name] = module
    return module


def _trl_kernel_module():
    """trl/kernels/logprob_entropy.py: the Triton log-prob/entropy kernel of the trl row."""
    return _trl_file_module("kernels/logprob_entropy.py", "bench._trl_logprob_entropy")


def _trl_loss() -> LossFn:
    kernel = _trl_kernel_module().selective_log_softmax_and_entropy

    def loss(p: Problem, logits: torch.Tensor) -> torch.Tensor:
        # row_mask skips padded rows, as TRL passes its completion mask.
        logprobs, entropy = kernel(logits, p.ids, temperature=p.case.options["temperature"], row_mask=p.mask)
        return _loss_from_logprobs(p, logprobs, entropy.detach())

    return loss


# TRL 1.16's vocabulary width per projection tile (_CHUNKED_LOGPROB_CHUNK_SIZE in
# trl/trainer/utils.py, which add_fused_lm_head passes; the token width is the kernel
# file's TOKEN_CHUNK_SIZE, 4096). Copied, as that module cannot be imported on its own.
TRL_LOGPROB_CHUNK_SIZE = 32768


def _trl_chunked_logprob_module():
    """trl/kernels/chunked_logprob.py, loaded from its file (see _trl_file_module).

    Its backward imports maybe_gather_lm_head_ctx from trl/trainer/utils.py, which imports
    all of trl's trainer stack. That function gathers a DeepSpeed ZeRO-3 partitioned
    lm_head and returns contextlib.nullcontext() without ZeRO-3; a stand-in that returns
    nullcontext() is put where the file's relative import finds it.
    """
    base = "bench._trl_chunked"
    utils = f"{base}.trainer.utils"
    if utils not in sys.modules:
        for name in (base, f"{base}.trainer", f"{base}.kernels"):
            sys.modules.setdefault(name, types.ModuleType(name))
        shim = types.ModuleType(utils)
        shim.maybe_gather_lm_head_ctx = lambda *params: contextlib.nullcontext()
        sys.modules[utils] = shim
    return _trl_file_module("kernels/chunked_logprob.py", f"{base}.kernels.chunked_logprob")


# --- ours -------------------------------------------------------------------------------


def _ours(backend: str) -> LossFn:
    def loss(p: Problem, logits: torch.Tensor) -> torch.Tensor:
        value, _ = grpo_kernels.fused_grpo_loss(logits, p.ids, p.advantages, p.mask, p.old, p.ref, backend=backend,
                                                **p.case.options)
        return value

    return loss


@contextlib.contextmanager
def _environ(name: str, value: str):
    """os.environ[name] = value inside the block, as it was after."""
    import os

    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            del os.environ[name]
        else:
            os.environ[name] = before


def _ours_two_pass() -> LossFn:
    inner = _ours("triton")

    def loss(p: Problem, logits: torch.Tensor) -> torch.Tensor:
        # The switch is read when the loss runs its forward, which computes the gradient too.
        with _environ("GRPO_KERNELS_TWO_PASS", "1"):
            return inner(p, logits)

    return loss


def full_output_supported() -> bool:
    """Whether this checkout's fused_grpo_loss and token_logprobs take the model's whole output
    (B, L, V), L > T, with completion_ids (B, T) (SPEC section 15), decided once by a tiny call
    on the CPU (torch backend). Before that API lands they refuse the shape."""
    global _FULL_OUTPUT
    if _FULL_OUTPUT is None:
        g = torch.Generator().manual_seed(0)
        B, T, V = 2, 3, 5
        full = torch.randn(B, T + 1, V, generator=g)
        ids = torch.randint(0, V, (B, T), generator=g)
        try:
            loss, _ = grpo_kernels.fused_grpo_loss(full.requires_grad_(True), ids, torch.randn(B, generator=g),
                                                   backend="torch")
            (grad,) = torch.autograd.grad(loss, full)
            logprobs = grpo_kernels.token_logprobs(full.detach(), ids, backend="torch")
            _FULL_OUTPUT = grad.shape == full.shape and logprobs.shape == ids.shape
        except (ValueError, TypeError, RuntimeError):
            _FULL_OUTPUT = False
    return _FULL_OUTPUT


_FULL_OUTPUT: bool | None = None


# --- the forward-only log-prob pass (the old/ref policies) --------------------------------


def _ours_logprobs(entropy: bool) -> LogprobsFn:
    def fn(p: Problem, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = grpo_kernels.token_logprobs(logits, p.ids, p.case.options["temperature"], return_entropy=entropy,
                                          mask=p.mask, backend="triton")
        return out if entropy else (out, None)

    return fn


def _trl_logprobs() -> LogprobsFn:
    kernel = _trl_kernel_module().selective_log_softmax_and_entropy

    def fn(p: Problem, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        logprobs, entropy = kernel(logits, p.ids, temperature=p.case.options["temperature"], row_mask=p.mask)
        return logprobs, entropy

    return fn


def _eager_logprobs(p: Problem, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    return trl_style_selective_log_softmax(logits, p.ids, p.case.options["temperature"]), None


# --- the fused-linear unit --------------------------------------------------------------


def _ours_linear(backend: str) -> LinearLossFn:
    def loss(p: LinearProblem, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        value, _ = grpo_kernels.fused_linear_grpo_loss(hidden, weight, p.ids, p.advantages, p.mask, p.old, p.ref,
                                                       backend=backend, **p.case.options)
        return value

    return loss


def _unfused(backend: str) -> LinearLossFn:
    def loss(p: LinearProblem, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # The (B, T, V) logits in the inputs' dtype, as a model's lm_head returns them, then our
        # logits kernel (not in place: its default). Autograd keeps the logits for the loss's
        # backward and runs the matmul backward on the (B, T, V) gradient.
        logits = F.linear(hidden, weight)
        value, _ = grpo_kernels.fused_grpo_loss(logits, p.ids, p.advantages, p.mask, p.old, p.ref, backend=backend,
                                                **p.case.options)
        return value

    return loss


def _liger_linear_loss(compiled: bool) -> LinearLossFn:
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    def loss(p: LinearProblem, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        o = p.case.options
        # Every keyword explicit: Liger's defaults differ from ours (epsilon_high 0.2, beta
        # 0.04, use_bias_correction_kl False). use_ref_model must be on for the KL to use
        # ref_logprobs: off, Liger takes the current log-probs as the reference (KL = 0).
        # chunk_size is in sequences (its default, 1). compiled=True (its default) wraps the
        # loss math in torch.compile, not the matmuls; off on the CPU (Inductor's C++ build).
        module = LigerFusedLinearGRPOLoss(
            beta=o["beta"], compiled=compiled, use_ref_model=o["beta"] != 0.0, chunk_size=1,
            epsilon_low=o["epsilon_low"], epsilon_high=o["epsilon_high"], loss_type=o["loss_type"],
            max_completion_length=None, importance_sampling_level=o["importance_sampling_level"],
            sapo_temperature_pos=1.0, sapo_temperature_neg=1.05, temperature=o["temperature"], delta=None,
            use_bias_correction_kl=o["use_bias_correction_kl"], vespo_k_pos=2.0, vespo_lambda_pos=3.0,
            vespo_k_neg=3.0, vespo_lambda_neg=2.0)
        value, _ = module(hidden, weight, p.ids, p.mask, p.advantages, bias=None, ref_per_token_logps=p.ref,
                          old_per_token_logps=p.old, ref_input=None, ref_weight=None, ref_bias=None,
                          vllm_is_ratio=None, num_items_in_batch=None)
        return value

    return loss


def _trl_linear_loss() -> LinearLossFn:
    module = _trl_chunked_logprob_module()

    def loss(p: LinearProblem, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # As add_fused_lm_head's forward in GRPOTrainer (outputs log_probs and entropy): on a
        # Triton device only the completion tokens are projected (hidden[mask], a copy of
        # O(N * H)) and scattered back; elsewhere every position, masked to 0 afterwards.
        mask = p.mask.bool()
        compact = module._use_triton(hidden.device)
        rows = hidden[mask] if compact else hidden.reshape(-1, hidden.shape[-1])
        targets = p.ids[mask] if compact else p.ids.reshape(-1)
        # Positional: autograd.Function.apply takes no keywords. (bias, temperature, chunk_size,
        # final_logit_softcapping, logit_scale, outputs) as add_fused_lm_head passes them.
        logprobs, entropy, *_ = module.ChunkedLogProbFunction.apply(
            rows, weight, None, targets, p.case.options["temperature"], TRL_LOGPROB_CHUNK_SIZE, None, 1.0,
            ("log_probs", "entropy"))
        if compact:
            logprobs, entropy = (x.new_zeros(mask.shape).masked_scatter(mask, x) for x in (logprobs, entropy))
        else:
            logprobs, entropy = (x.view(mask.shape).masked_fill(~mask, 0) for x in (logprobs, entropy))
        return _loss_from_logprobs(p, logprobs, entropy.detach())

    return loss


def _interpreted() -> bool:
    """Triton's interpreter is on: the Triton implementations run on CPU tensors (slowly), which
    lets the GPU plan be exercised on a machine without a GPU (--plan gpu --smoke)."""
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cuda_backend_available() -> bool:
    try:
        from grpo_kernels.sweep import cuda
    except ImportError:
        return False
    return bool(cuda.is_available())


def discover(device: torch.device, requested: Sequence[str] | None = None) -> tuple[list[Impl], dict[str, str]]:
    """The implementations that can run on `device`, and why each other one cannot.

    `requested` (default: all that apply) may also ask for those of CPU_ON_REQUEST on the
    CPU, which are left out there by default: Inductor's C++ build takes minutes on a small
    machine, and Liger's and TRL's fused-linear paths run fallback code there.
    """
    on_gpu = device.type == "cuda"
    names = list(requested) if requested else [n for n in LOGITS_IMPLS + LINEAR_IMPLS
                                                if on_gpu or n not in CPU_ON_REQUEST]
    unknown = sorted(set(names) - set(ALL))
    if unknown:
        raise ValueError(f"unknown implementation(s) {unknown}; choose from {', '.join(ALL)}")
    impls: list[Impl] = []
    skipped: dict[str, str] = {}
    if not requested and not on_gpu:
        skipped.update({n: "CPU: runs only when named in --impls (see impls.CPU_ON_REQUEST)" for n in CPU_ON_REQUEST})
    liger_version = _version("liger-kernel") or _version("liger_kernel")
    # Under the interpreter the Triton implementations run on the CPU when named (the GPU plan
    # exercised here names its implementations); the CPU grid's default set stays CPU code.
    triton_runs = on_gpu or (_interpreted() and bool(requested))
    # The peers and eager are called as a trainer calls them wherever the trainer calls exist
    # (the GPU, or the GPU plan exercised under the interpreter); the CPU grid keeps them bare.
    sliced = "trainer-slice" if triton_runs else "bare"
    for name in names:
        try:
            if name == "eager":
                impls.append(Impl(name, _eager, call=sliced))
            elif name == "compile":
                impls.append(Impl(name, _compile, call=sliced))
            elif name == "eager-logprobs":
                impls.append(Impl(name, _eager_logprobs, unit="logprobs", call="forward"))
            elif name == "ours-torch":
                impls.append(Impl(name, _ours("torch")))
            elif name == "ours-linear":
                impls.append(Impl(name, _ours_linear("triton" if on_gpu else "torch"), unit="linear", call="hidden"))
            elif name == "unfused":
                impls.append(Impl(name, _unfused("triton" if on_gpu else "torch"), unit="linear", call="hidden"))
            elif name == "liger-linear":
                impls.append(Impl(name, _liger_linear_loss(compiled=on_gpu), version=liger_version, unit="linear",
                                  call="hidden"))
            elif name == "trl-linear":
                impls.append(Impl(name, _trl_linear_loss(), version=_version("trl"), unit="linear", call="hidden"))
            elif not triton_runs or (name == "ours-cuda" and not on_gpu):  # the rest are Triton or CUDA code
                skipped[name] = "needs a CUDA device"
            elif name == "ours-triton":
                impls.append(Impl(name, _ours("triton")))
            elif name == "ours-trainer":
                full = full_output_supported()
                # The same call as ours-triton: fused_grpo_loss recognises the whole output by its shape.
                impls.append(Impl(name, _ours("triton"), padded_input=full,
                                  call="trainer" if full else "trainer-slice"))
            elif name == "ours-2pass":
                full = full_output_supported()
                impls.append(Impl(name, _ours_two_pass(), padded_input=full,
                                  call="trainer" if full else "trainer-slice"))
            elif name in ("ours-logprobs", "ours-logprobs-entropy"):
                impls.append(Impl(name, _ours_logprobs(name.endswith("entropy")), unit="logprobs",
                                  call="forward", padded_input=full_output_supported()))
            elif name == "trl-logprobs":
                impls.append(Impl(name, _trl_logprobs(), unit="logprobs", call="forward", version=_version("trl")))
            elif name == "ours-cuda":
                if _cuda_backend_available():
                    impls.append(Impl(name, _ours("cuda")))
                else:
                    skipped[name] = "grpo_kernels.sweep.cuda is not built or not available"
            elif name == "liger":
                impls.append(Impl(name, _liger_loss(), padded_input=True, inplace=True, version=liger_version,
                                  call="trainer"))
            elif name == "trl":
                impls.append(Impl(name, _trl_loss(), version=_version("trl"), call=sliced))
        except ImportError as exc:
            skipped[name] = f"not importable: {exc}"
    return impls, skipped
