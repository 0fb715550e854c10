"""The logits sweeps as torch.library operators (SPEC section 11): opaque to torch.compile,
FakeTensor and torch.export, which see only their fake (shape) functions, so a new T never
recompiles, and alignment and block choices are made inside, at run time.

  grpo_kernels::logits_sweep            rows of logits -> logprobs, entropy, m, log_sum, mean_rel (N,)
  grpo_kernels::logits_sweep_backward   -> dL/dlogits, a new tensor
  grpo_kernels::logits_sweep_backward_  -> dL/dlogits written into the logits (inplace_backward)

`logits` is the whole tensor the caller holds, (B, L, V), of which rows [row_start, row_start + T)
are swept (T = N / B); the backward writes the gradient of the whole tensor, zeros on the other
rows, so autograd never copies it through a slice (SPEC section 15). The three-pass path: the
forward reads each active row once, the backward once more and writes it once.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import backend_module, stats_dtype

Tensor = torch.Tensor


def scored(logits: Tensor, row_start: int, n: int) -> Tensor:
    """The (B, T, V) view of the rows [row_start, row_start + T) of logits (B, L, V) for N = n tokens."""
    T = n // logits.shape[0] if logits.shape[0] else 0
    return logits.narrow(1, row_start, T)


def zero_unscored(grad: Tensor, row_start: int, T: int) -> None:
    """The rows of grad (B, L, V) outside [row_start, row_start + T) set to zero (not scored: no gradient)."""
    if row_start > 0:
        grad[:, :row_start].zero_()
    if row_start + T < grad.shape[1]:
        grad[:, row_start + T:].zero_()


def _forward_kw(backend: str, need_entropy: bool) -> dict:
    # Only the Triton sweep has a variant without the entropy sums; the others compute it anyway.
    return {"entropy": need_entropy} if backend == "triton" else {}


@torch.library.custom_op("grpo_kernels::logits_sweep", mutates_args=())
def logits_sweep(logits: Tensor, row_start: int, ids: Tensor, temperature: float, temperature_rows: Optional[Tensor],
                 active: Optional[Tensor], vocab_start: int, partial: bool, backend: str, inplace: bool,
                 need_entropy: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The backend's forward sweep over the scored rows of logits (B, L, V). Returns five (N,)
    tensors: logprobs, entropy, m, log_sum, mean_rel (entropy and mean_rel are NaN when
    need_entropy is False on the Triton backend); with partial (a vocab-parallel shard) m, s, u,
    z_y and an empty fifth. `inplace` is read by the backward only."""
    rows = scored(logits, row_start, ids.shape[0])
    outs = backend_module(backend).forward(rows, ids, temperature if temperature_rows is None else temperature_rows,
                                           active, vocab_start, partial, **_forward_kw(backend, need_entropy))
    return (*outs, outs[0].new_empty(0)) if partial else tuple(outs)


@logits_sweep.register_fake
def _(logits, row_start, ids, temperature, temperature_rows, active, vocab_start, partial, backend, inplace,
      need_entropy):
    n = ids.shape[0]
    dtype = stats_dtype(logits.dtype, backend)
    outs = [logits.new_empty(n, dtype=dtype) for _ in range(4 if partial else 5)]
    return (*outs, logits.new_empty(0, dtype=dtype)) if partial else tuple(outs)


def _backward_into(logits, row_start, ids, temperature, temperature_rows, active, m, log_sum, mean_rel,
                   grad_logprobs, grad_entropy, vocab_start, backend, grad):
    """The backend's backward sweep writing the scored rows of grad, zeros on the others."""
    rows = scored(logits, row_start, ids.shape[0])
    zero_unscored(grad, row_start, rows.shape[1])
    backend_module(backend).backward(rows, ids, temperature if temperature_rows is None else temperature_rows, active,
                                     m, log_sum, mean_rel, grad_logprobs, grad_entropy,
                                     scored(grad, row_start, ids.shape[0]), vocab_start)


@torch.library.custom_op("grpo_kernels::logits_sweep_backward", mutates_args=())
def logits_sweep_backward(logits: Tensor, row_start: int, ids: Tensor, temperature: float,
                          temperature_rows: Optional[Tensor], active: Optional[Tensor], m: Tensor, log_sum: Tensor,
                          mean_rel: Tensor, grad_logprobs: Optional[Tensor], grad_entropy: Optional[Tensor],
                          vocab_start: int, backend: str) -> Tensor:
    """dL/dlogits (B, L, V) in the logits' dtype, from the forward's m, log_sum, mean_rel and the
    upstream gradients of logprobs and entropy (None: that term is 0)."""
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    _backward_into(logits, row_start, ids, temperature, temperature_rows, active, m, log_sum, mean_rel,
                   grad_logprobs, grad_entropy, vocab_start, backend, grad)
    return grad


@logits_sweep_backward.register_fake
def _(logits, row_start, ids, temperature, temperature_rows, active, m, log_sum, mean_rel, grad_logprobs,
      grad_entropy, vocab_start, backend):
    return logits.new_empty(logits.shape)


@torch.library.custom_op("grpo_kernels::logits_sweep_backward_", mutates_args=("logits",))
def logits_sweep_backward_(logits: Tensor, row_start: int, ids: Tensor, temperature: float,
                           temperature_rows: Optional[Tensor], active: Optional[Tensor], m: Tensor, log_sum: Tensor,
                           mean_rel: Tensor, grad_logprobs: Optional[Tensor], grad_entropy: Optional[Tensor],
                           vocab_start: int, backend: str) -> None:
    """logits_sweep_backward written into the logits' own storage. As a declared mutation it
    bumps their autograd version: a later use of the overwritten values raises."""
    _backward_into(logits, row_start, ids, temperature, temperature_rows, active, m, log_sum, mean_rel,
                   grad_logprobs, grad_entropy, vocab_start, backend, logits)


@logits_sweep_backward_.register_fake
def _(logits, row_start, ids, temperature, temperature_rows, active, m, log_sum, mean_rel, grad_logprobs,
      grad_entropy, vocab_start, backend):
    return None


def sweep_backward(logits, row_start, ids, temperature, temperature_rows, active, m, log_sum, mean_rel,
                   grad_logprobs, grad_entropy, vocab_start, backend, inplace) -> Tensor:
    """The gradient of the whole of logits, written into them with `inplace`."""
    args = (logits, row_start, ids, temperature, temperature_rows, active, m, log_sum, mean_rel, grad_logprobs,
            grad_entropy, vocab_start, backend)
    if inplace:
        torch.ops.grpo_kernels.logits_sweep_backward_(*args)
        return logits
    return torch.ops.grpo_kernels.logits_sweep_backward(*args)


def _setup_context(ctx, inputs, output):
    logits, row_start, ids, temperature, temperature_rows, active, vocab_start, partial, backend, inplace, _ = inputs
    _, _, m, log_sum, mean_rel = output
    ctx.save_for_backward(logits, ids, temperature_rows, active, m, log_sum, mean_rel)
    ctx.row_start, ctx.temperature, ctx.vocab_start, ctx.backend, ctx.inplace = (row_start, temperature, vocab_start,
                                                                                 backend, inplace)
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(m, log_sum, mean_rel)


def _backward(ctx, grad_logprobs, grad_entropy, *_):
    if grad_logprobs is None and grad_entropy is None:
        return (None,) * 11
    logits, ids, temperature_rows, active, m, log_sum, mean_rel = ctx.saved_tensors
    grad = sweep_backward(logits, ctx.row_start, ids, ctx.temperature, temperature_rows, active, m, log_sum, mean_rel,
                          grad_logprobs, grad_entropy, ctx.vocab_start, ctx.backend, ctx.inplace)
    return (grad,) + (None,) * 10


logits_sweep.register_autograd(_backward, setup_context=_setup_context)
