"""fused_grpo_loss and token_logprobs: the logits sweep as torch.library operators, then the
loss of loss.py over the per-token results.

The operators (SPEC section 11) make the sweep opaque to torch.compile, FakeTensor and
torch.export, which see only their fake (shape) functions: a new T never recompiles, and
alignment and block choices are made inside, at run time.

  grpo_kernels::logits_sweep            logits rows -> logprobs, entropy, m, log_sum, mean_rel (N,)
  grpo_kernels::logits_sweep_backward   -> dL/dlogits, a new tensor
  grpo_kernels::logits_sweep_backward_  -> dL/dlogits written into the logits (inplace_backward)

The backward needs only c_t = dL/dlogprob_t and e_t = dL/dentropy_t: autograd over loss.py's
small per-token graph supplies them, or, for the clipped family on the Triton backend,
loss_triton.py's two kernels (`TokenLevelLoss`: a step of ~11 launches). Each formula exists
once per language (docs/design.md).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import loss_triton
from .distributed import vocab_bounds
from .layout import Tokens, build_tokens, leading_dims_by_stride, logprobs_result, rows_without_sequences
from .loss import Metrics, objective
from .options import GRPOOptions, check_bool, check_temperature
from .sweep import backend_module, require, resolve_backend, stats_dtype

Tensor = torch.Tensor


@torch.library.custom_op("grpo_kernels::logits_sweep", mutates_args=())
def logits_sweep(logits: Tensor, ids: Tensor, temperature: float, temperature_rows: Optional[Tensor],
                 active: Optional[Tensor], vocab_start: int, partial: bool, backend: str, inplace: bool
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The backend's forward sweep over rows of logits (B, T, V). Returns five (N,) tensors:
    logprobs, entropy, m, log_sum, mean_rel; with partial (a vocab-parallel shard) m, s, u,
    z_y and an empty fifth. `inplace` is read by the backward only."""
    outs = backend_module(backend).forward(logits, ids, temperature if temperature_rows is None else temperature_rows,
                                           active, vocab_start, partial)
    return (*outs, outs[0].new_empty(0)) if partial else tuple(outs)


@logits_sweep.register_fake
def _(logits, ids, temperature, temperature_rows, active, vocab_start, partial, backend, inplace):
    n = logits.shape[0] * logits.shape[1]
    dtype = stats_dtype(logits.dtype, backend)
    outs = [logits.new_empty(n, dtype=dtype) for _ in range(4 if partial else 5)]
    return (*outs, logits.new_empty(0, dtype=dtype)) if partial else tuple(outs)


def _backward_args(logits, ids, temperature, temperature_rows, active, m, log_sum, mean_rel, grad_logprobs,
                   grad_entropy):
    return (logits, ids, temperature if temperature_rows is None else temperature_rows, active, m, log_sum, mean_rel,
            grad_logprobs, grad_entropy)


@torch.library.custom_op("grpo_kernels::logits_sweep_backward", mutates_args=())
def logits_sweep_backward(logits: Tensor, ids: Tensor, temperature: float, temperature_rows: Optional[Tensor],
                          active: Optional[Tensor], m: Tensor, log_sum: Tensor, mean_rel: Tensor,
                          grad_logprobs: Optional[Tensor], grad_entropy: Optional[Tensor], vocab_start: int,
                          backend: str) -> Tensor:
    """dL/dlogits (B, T, V) in the logits' dtype, from the forward's m, log_sum, mean_rel and
    the upstream gradients of logprobs and entropy (None: that term is 0)."""
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    backend_module(backend).backward(*_backward_args(logits, ids, temperature, temperature_rows, active, m, log_sum,
                                                     mean_rel, grad_logprobs, grad_entropy), grad, vocab_start)
    return grad


@logits_sweep_backward.register_fake
def _(logits, ids, temperature, temperature_rows, active, m, log_sum, mean_rel, grad_logprobs, grad_entropy,
      vocab_start, backend):
    return logits.new_empty(logits.shape)


@torch.library.custom_op("grpo_kernels::logits_sweep_backward_", mutates_args=("logits",))
def logits_sweep_backward_(logits: Tensor, ids: Tensor, temperature: float, temperature_rows: Optional[Tensor],
                           active: Optional[Tensor], m: Tensor, log_sum: Tensor, mean_rel: Tensor,
                           grad_logprobs: Optional[Tensor], grad_entropy: Optional[Tensor], vocab_start: int,
                           backend: str) -> None:
    """logits_sweep_backward written into the logits' own storage. As a declared mutation it
    bumps their autograd version: a later use of the overwritten values raises."""
    backend_module(backend).backward(*_backward_args(logits, ids, temperature, temperature_rows, active, m, log_sum,
                                                     mean_rel, grad_logprobs, grad_entropy), logits, vocab_start)


@logits_sweep_backward_.register_fake
def _(logits, ids, temperature, temperature_rows, active, m, log_sum, mean_rel, grad_logprobs, grad_entropy,
      vocab_start, backend):
    return None


def sweep_backward(logits, ids, temperature, temperature_rows, active, m, log_sum, mean_rel, grad_logprobs,
                   grad_entropy, vocab_start, backend, inplace) -> Tensor:
    """The gradient of the logits, written into them with `inplace`."""
    args = (logits, ids, temperature, temperature_rows, active, m, log_sum, mean_rel, grad_logprobs, grad_entropy,
            vocab_start, backend)
    if inplace:
        torch.ops.grpo_kernels.logits_sweep_backward_(*args)
        return logits
    return torch.ops.grpo_kernels.logits_sweep_backward(*args)


def _setup_context(ctx, inputs, output):
    logits, ids, temperature, temperature_rows, active, vocab_start, partial, backend, inplace = inputs
    _, _, m, log_sum, mean_rel = output
    ctx.save_for_backward(logits, ids, temperature_rows, active, m, log_sum, mean_rel)
    ctx.temperature, ctx.vocab_start, ctx.backend, ctx.inplace = temperature, vocab_start, backend, inplace
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(m, log_sum, mean_rel)


def _backward(ctx, grad_logprobs, grad_entropy, *_):
    if grad_logprobs is None and grad_entropy is None:
        return (None,) * 9
    logits, ids, temperature_rows, active, m, log_sum, mean_rel = ctx.saved_tensors
    grad = sweep_backward(logits, ids, ctx.temperature, temperature_rows, active, m, log_sum, mean_rel,
                          grad_logprobs, grad_entropy, ctx.vocab_start, ctx.backend, ctx.inplace)
    return (grad,) + (None,) * 8


logits_sweep.register_autograd(_backward, setup_context=_setup_context)


def rows_overlap(rows: Tensor) -> bool:
    """Whether two rows of a (B, T, V) view share memory (expanded or overlapping strides)."""
    extent = rows.shape[-1]
    for stride, size in leading_dims_by_stride(rows):
        if stride < extent:
            return True
        extent += stride * (size - 1)
    return False


def check_inplace(rows: Tensor) -> None:
    """inplace_backward writes the gradient into the logits: their rows must not share memory."""
    if rows_overlap(rows):
        raise ValueError("inplace_backward=True needs logits whose rows do not overlap in memory (these are "
                         "expanded or have overlapping strides): writing the gradient into them would mix rows. "
                         "Pass a materialised tensor or inplace_backward=False.")


def refuse_dtensor(**tensors) -> None:
    """DTensor inputs (FSDP2 / TP) are refused up front, with what to pass instead."""
    for name, t in tensors.items():
        if type(t).__name__ == "DTensor":
            raise TypeError(f"{name} is a DTensor; pass a plain tensor: its local shard (t.to_local()) with "
                            "tp_group=<the group it is sharded over> when it is split over the vocabulary, "
                            "or t.full_tensor() when it is replicated")


def sweep(logits: Tensor, tokens: Tokens, backend: str, inplace: bool, tp_group=None, vocab_start: int = 0
          ) -> tuple[Tensor, Tensor]:
    """logprobs and entropy (N,) of the rows of logits that tokens.layout describes."""
    rows = tokens.layout.logits_rows(logits)
    if inplace:
        check_inplace(rows)
    t_scalar, t_rows = tokens.temperature_args
    ids = tokens.ids
    if tp_group is not None:
        from .distributed import vocab_parallel_sweep

        return vocab_parallel_sweep(rows, ids, t_scalar, t_rows, tokens.active, vocab_start, backend, inplace,
                                    tp_group)
    logprobs, entropy, *_ = torch.ops.grpo_kernels.logits_sweep(rows, ids, t_scalar, t_rows, tokens.active, 0,
                                                                False, backend, inplace)
    return logprobs, entropy


class TokenLevelLoss(torch.autograd.Function):
    """logits rows -> (loss, the five metric scalars, logprobs) through the forward sweep and
    loss_triton.py's two kernels; the backward is the backward sweep with c_t = g m_t dL_t/dl_t / n
    and e_t = -g coef m_t / sum(m): a handful of launches in all (issue 10)."""

    @staticmethod
    def forward(ctx, rows, tokens, o, backend):
        t_scalar, t_rows = tokens.temperature_args
        ids = tokens.ids
        logprobs, entropy, m, log_sum, mean_rel = torch.ops.grpo_kernels.logits_sweep(
            rows, ids, t_scalar, t_rows, tokens.active, 0, False, backend, o.inplace_backward)
        loss, out, coef = loss_triton.objective(logprobs, entropy, tokens, o)
        mask = tokens.mask
        # The two scales on their own: the metrics (views of out) are the caller's to modify.
        scales = out[5:].clone()
        ctx.save_for_backward(rows, ids, t_rows, tokens.active, m, log_sum, mean_rel, coef, scales,
                              None if mask is None or o.entropy_coef == 0.0 else mask)
        ctx.t_scalar, ctx.backend, ctx.inplace, ctx.entropy = t_scalar, backend, o.inplace_backward, o.entropy_coef
        ctx.mark_non_differentiable(out, logprobs)
        ctx.set_materialize_grads(False)  # no zero tensors for the gradients of the metric outputs
        if tokens.invalid is not None:
            loss = torch.where(tokens.invalid, float("nan"), loss)
        return loss, out, logprobs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_out, _grad_logprobs):
        rows, ids, t_rows, active, m, log_sum, mean_rel, coef, scales, mask = ctx.saved_tensors
        grad_logprobs = coef * (grad_loss * scales[0])
        grad_entropy = None
        if ctx.entropy != 0.0:
            e = grad_loss * scales[1]
            grad_entropy = e.expand_as(coef) if mask is None else mask * e
        grad = sweep_backward(rows, ids, ctx.t_scalar, t_rows, active, m, log_sum, mean_rel, grad_logprobs,
                              grad_entropy, 0, ctx.backend, ctx.inplace)
        return grad, None, None, None


def _token_level(logits: Tensor, tokens: Tokens, o: GRPOOptions, backend: str) -> tuple[Tensor, Metrics]:
    rows = tokens.layout.logits_rows(logits)
    if o.inplace_backward:
        check_inplace(rows)
    loss, out, logprobs = TokenLevelLoss.apply(rows, tokens, o, backend)
    metrics: Metrics = {"kl": out[0] if o.beta != 0.0 else None, "entropy": out[1], "clip_ratio_low": out[2],
                        "clip_ratio_high": out[3], "clip_ratio_region": out[4],
                        "logprobs": tokens.layout.unflat(logprobs)}
    return loss, metrics


def _vocab(logits: Tensor, tp_group, vocab_start: int | None) -> tuple[int, int]:
    """(vocab_start, global V) of these logits (a non-tensor is refused by build_tokens next)."""
    if not isinstance(logits, Tensor) or logits.dim() < 1:
        return 0, 0
    return vocab_bounds(logits.shape[-1], tp_group, vocab_start, logits.device, logits.dtype)


def token_logprobs(
    logits: Tensor,
    completion_ids: Tensor,
    temperature: float | Tensor = 1.0,
    return_entropy: bool = False,
    mask: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    *,
    backend: str = "auto",
    tp_group=None,
    vocab_start: int | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """log pi(y_t) in fp32, shaped like completion_ids (and the entropy with return_entropy), in one sweep.

    logits (B, T, V) / (N, V) padded, or (N, V) / (1, N, V) packed with ids (N,); a row whose
    `mask` is 0 is never read and gives 0. `temperature` is a float or one per token. For the
    old- and reference-policy passes under torch.no_grad(); differentiable too.
    """
    check_temperature(temperature)
    check_bool("return_entropy", return_entropy)
    refuse_dtensor(logits=logits)
    ids, mask, temperature = rows_without_sequences(completion_ids, mask, temperature, cu_seqlens)
    o = GRPOOptions(temperature=temperature, backend=backend)
    start, V = _vocab(logits, tp_group, vocab_start)
    tokens = build_tokens(ids, None, mask, None, None, None, None, cu_seqlens, o, logits=logits, vocab_size=V,
                          needs_advantages=False)
    name = resolve_backend(o.backend, logits.device)
    require(name, logits.device)
    logprobs, entropy = sweep(logits, tokens, name, False, tp_group, start)
    return logprobs_result(tokens, logprobs, entropy, completion_ids.shape, return_entropy)


def fused_grpo_loss(
    logits: Tensor,
    completion_ids: Tensor,
    advantages: Tensor,
    completion_mask: Tensor | None = None,
    old_logprobs: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    *,
    rollout_is_ratio: Tensor | None = None,
    sampling_logprobs: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    tp_group=None,
    vocab_start: int | None = None,
    **options,
) -> tuple[Tensor, Metrics]:
    """The GRPO-family loss over logits, and its metrics.

    Layouts (SPEC sections 1 and 8): padded logits (B, T, V) or (N, V) with per-token tensors
    (B, T); packed logits (N, V) or (1, N, V) with per-token tensors (N,) and `cu_seqlens`
    (S + 1,). Rows whose completion_mask is 0 are never read. Vocab-parallel (section 9):
    `tp_group` with this rank's shard of the columns (global ids; `vocab_start` defaults to
    rank * V_local).

    Keywords are those of `GRPOOptions`: loss_type, beta, epsilon_low, epsilon_high, delta,
    temperature (a float or one per token), importance_sampling_level, use_bias_correction_kl,
    kl_estimator, kl_ratio, max_completion_length, num_items_in_batch, num_sequences_in_batch,
    sapo_temperature_*, vespo_*, dual_clip, entropy_coef, top_entropy_quantile,
    off_policy_mask_threshold, inplace_backward, backend. `sampling_logprobs` are the
    sampler's log-probs for the off-policy mask (default: old_logprobs), as TRL uses with vLLM.

    Returns the 0-dim loss, which carries the gradient to `logits`, and detached metrics:
    kl, entropy, clip_ratio_low/high/region (masked means; None where they do not apply)
    and the per-token `logprobs` (shaped like completion_ids, the caller's to modify).
    """
    o = GRPOOptions(**options)
    refuse_dtensor(logits=logits, advantages=advantages)
    start, V = _vocab(logits, tp_group, vocab_start)
    tokens = build_tokens(completion_ids, advantages, completion_mask, old_logprobs, ref_logprobs, rollout_is_ratio,
                          sampling_logprobs, cu_seqlens, o, logits=logits, vocab_size=V)
    name = resolve_backend(o.backend, logits.device)
    require(name, logits.device)
    if loss_triton.supports(o, tokens, name, tp_group):
        return _token_level(logits, tokens, o, name)
    logprobs, entropy = sweep(logits, tokens, name, o.inplace_backward, tp_group, start)
    return objective(logprobs, entropy, tokens, o)
