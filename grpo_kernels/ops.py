"""fused_grpo_loss and token_logprobs: the public functions over the logits.

Three paths, chosen here, each computing the same objective (docs/design.md):
- two passes (sweep/two_pass.py): a token-local loss (SPEC section 14) on the Triton backend;
  one launch reads each active row once and writes its gradient in the forward (opt-in with
  GRPO_KERNELS_TWO_PASS=1 until a GPU measures it faster than three passes: two_pass.enabled);
- three passes with the Triton loss (`TokenLevelLoss`): the clipped family on the Triton backend
  (at token level while the two passes are off, and GSPO): the forward sweep, loss_triton.py's two
  kernels, the backward sweep;
- three passes with loss.py: everything else, and every other backend; autograd over loss.py's
  per-token graph supplies c_t = dL/dlogprob_t and e_t = dL/dentropy_t to the backward sweep.

`logits` may be the model's full output (B, L, V) with L > T: the rows that predict the T
completion tokens, [L - 1 - T, L - 1), are scored (layout.scored_rows) and the gradient of the
whole tensor is written by our kernels, so autograd never copies it through a slice.
"""
from __future__ import annotations

import torch

from . import loss_triton
from .distributed import vocab_bounds, vocab_parallel_sweep
from .layout import Tokens, build_tokens, check_inplace, logprobs_result, rows_without_sequences
from .loss import Metrics, objective
from .options import GRPOOptions, check_bool, check_temperature, single_backward
from .sweep import require, resolve_backend, two_pass
from .sweep.operators import sweep_backward

Tensor = torch.Tensor


def refuse_dtensor(**tensors) -> None:
    """DTensor inputs (FSDP2 / TP) are refused up front, with what to pass instead."""
    for name, t in tensors.items():
        if type(t).__name__ == "DTensor":
            raise TypeError(f"{name} is a DTensor; pass a plain tensor: its local shard (t.to_local()) with "
                            "tp_group=<the group it is sharded over> when it is split over the vocabulary, "
                            "or t.full_tensor() when it is replicated")


def sweep(logits: Tensor, tokens: Tokens, backend: str, inplace: bool, tp_group=None, vocab_start: int = 0,
          need_entropy: bool = True) -> tuple[Tensor, Tensor]:
    """logprobs and entropy (N,) of the rows of logits that tokens.layout describes (the entropy
    is not computed without need_entropy on the Triton backend)."""
    full, row_start = tokens.layout.scored_rows(logits)
    if inplace:
        check_inplace(full)
    t_scalar, t_rows = tokens.temperature_args
    ids = tokens.ids
    if tp_group is not None:  # the shards' statistics need the collective first: rows as a view
        return vocab_parallel_sweep(tokens.layout.logits_rows(logits), ids, t_scalar, t_rows, tokens.active,
                                    vocab_start, backend, inplace, tp_group)
    logprobs, entropy, *_ = torch.ops.grpo_kernels.logits_sweep(full, row_start, ids, t_scalar, t_rows, tokens.active,
                                                                0, False, backend, inplace, need_entropy)
    return logprobs, entropy


class TokenLevelLoss(torch.autograd.Function):
    """logits rows -> (loss, the five metric scalars, logprobs) through the forward sweep and
    loss_triton.py's two kernels; the backward is the backward sweep with c_t = g m_t dL_t/dl_t / n
    and e_t = -g coef m_t / sum(m): a handful of launches in all (issue 10)."""

    @staticmethod
    def forward(ctx, logits, row_start, tokens, o, backend):
        t_scalar, t_rows = tokens.temperature_args
        ids = tokens.ids
        logprobs, entropy, m, log_sum, mean_rel = torch.ops.grpo_kernels.logits_sweep(
            logits, row_start, ids, t_scalar, t_rows, tokens.active, 0, False, backend, o.inplace_backward, True)
        loss, out, coef = loss_triton.objective(logprobs, entropy, tokens, o)
        mask = tokens.mask
        # The two scales on their own: the metrics (views of out) are the caller's to modify.
        scales = out[5:].clone()
        ctx.save_for_backward(logits, ids, t_rows, tokens.active, m, log_sum, mean_rel, coef, scales,
                              None if mask is None or o.entropy_coef == 0.0 else mask)
        ctx.row_start, ctx.t_scalar, ctx.backend = row_start, t_scalar, backend
        ctx.inplace, ctx.entropy = o.inplace_backward, o.entropy_coef
        ctx.mark_non_differentiable(out, logprobs)
        ctx.set_materialize_grads(False)  # no zero tensors for the gradients of the metric outputs
        return loss, out, logprobs

    @staticmethod
    @single_backward
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_out, _grad_logprobs):
        logits, ids, t_rows, active, m, log_sum, mean_rel, coef, scales, mask = ctx.saved_tensors
        grad_logprobs = coef * (grad_loss * scales[0])
        grad_entropy = None
        if ctx.entropy != 0.0:
            e = grad_loss * scales[1]
            grad_entropy = e.expand_as(coef) if mask is None else mask * e
        grad = sweep_backward(logits, ctx.row_start, ids, ctx.t_scalar, t_rows, active, m, log_sum, mean_rel,
                              grad_logprobs, grad_entropy, 0, ctx.backend, ctx.inplace)
        return grad, None, None, None, None


def _clipped_loss(logits: Tensor, tokens: Tokens, o: GRPOOptions, backend: str, two_passes: bool
                  ) -> tuple[Tensor, Metrics]:
    """The clipped family in our kernels: in two passes when token-local (Triton, or csrc's on backend
    "cuda"), else the three passes with loss_triton's kernels."""
    full, row_start = tokens.layout.scored_rows(logits)
    if o.inplace_backward:
        check_inplace(full)
    if two_passes:
        loss, out, logprobs = two_pass.fused_loss(full, row_start, tokens, o, backend)
    else:
        loss, out, logprobs = TokenLevelLoss.apply(full, row_start, tokens, o, backend)
    if tokens.invalid is not None:
        loss = torch.where(tokens.invalid, float("nan"), loss)
    return loss, loss_triton.metrics(out, logprobs, tokens, o)


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
    logprobs, entropy = sweep(logits, tokens, name, False, tp_group, start, need_entropy=return_entropy)
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
    if two_pass.enabled() and two_pass.available(name, logits) and loss_triton.token_local(o, tokens, tp_group):
        return _clipped_loss(logits, tokens, o, name, two_passes=True)
    if loss_triton.supports(o, tokens, name, tp_group):
        return _clipped_loss(logits, tokens, o, name, two_passes=False)
    logprobs, entropy = sweep(logits, tokens, name, o.inplace_backward, tp_group, start)
    return objective(logprobs, entropy, tokens, o)
