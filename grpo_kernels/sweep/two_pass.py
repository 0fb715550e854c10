"""The two-pass loss (SPEC section 14): for a token-local loss, one launch reads each active row
of logits once, keeps it on chip, and writes its gradient once, with the loss and metrics.

A row of V = 151,936 bf16 logits is 297 KB: more than one multiprocessor holds (256 KB of
registers, 228 KB of shared memory), and too much for the L2 to keep between two reads of it
when hundreds of rows are in flight (a re-reading kernel measured 1.55x the two-pass floor on
an H200: research/part3.md). So a row is split over SPLIT = cdiv(V, BLOCK) programs, each of
which loads its BLOCK columns into registers once and keeps them there:

  1. each program folds its slice into (m, s, u) (online_softmax_step) and publishes them;
  2. it waits until the row's SPLIT programs have published (a counter per row, release and
     acquire atomics), merges the pieces (merge_statistics), and so knows log pi(y), the
     entropy and, through loss_triton.row_coefficients, c = dL/dl and e = dL/dH;
  3. it writes the gradient of its slice from the values it still holds.

Waiting for other programs is safe only if they are running or will run. Each program takes
its task from a ticket counter (an atomic increment) instead of its program id, so the tasks
that have started are always a prefix of the ticket order: the programs of every row but the
last started one have all started, and a row never waits for a program that cannot be
scheduled (the decoupled look-back argument; a row needs SPLIT <= the resident programs,
about 20 against several hundred). Under Triton's interpreter, which runs programs one after
another, a row is never split (BLOCK >= V).

The gradient is written in the forward, already multiplied by `grad_scale` (the upstream
gradient the caller promises: 1, or 1 / accumulation steps); the backward returns it as it is
when the upstream gradient equals that promise (a device-side check, no host sync) and scales
it in one pass otherwise (`_rescale_kernel`).
"""
from __future__ import annotations

import json
from typing import Optional

import torch
import triton
import triton.language as tl

from .. import loss_triton
from ..layout import Layout, Tokens
from ..options import GRPOOptions
from .triton import (_RUNTIME_INTS, _check_supported, _row_offset, _row_setup, _rows_aligned, expm1,
                     merge_statistics, online_softmax_step, row_args)

Tensor = torch.Tensor

# The largest number of programs one row is split into (the merge loads them as one block).
MAX_SPLIT = 64
# Polls of a row's arrival counter before giving up on it (NaN row): far beyond any real wait.
MAX_SPINS: tl.constexpr = tl.constexpr(1 << 22)


@triton.jit
def inv_inactive(x):
    """A float32 scalar of x's shape (for zeros of a row's outputs)."""
    return x.to(tl.float32)


@triton.jit(do_not_specialize=_RUNTIME_INTS + ["grad_stride_b", "grad_stride_t", "N"],
            do_not_specialize_on_alignment=["ids_ptr", "temperature_ptr", "active_ptr", "logprob_ptr", "entropy_ptr",
                                            "part_ptr", "count_ptr", "w_ptr", "mask_ptr", "adv_ptr", "old_ptr",
                                            "ref_ptr", "rollout_ptr", "scal_ptr", "sums_ptr"])
def _two_pass_kernel(
    logits_ptr, grad_ptr, ids_ptr, temperature_ptr, active_ptr, logprob_ptr, entropy_ptr, part_ptr, count_ptr,
    w_ptr, mask_ptr, adv_ptr, old_ptr, ref_ptr, rollout_ptr, scal_ptr, sums_ptr, N,
    beta, eps_low, eps_high, delta, dual_clip,
    T, stride_b, stride_t, grad_stride_b, grad_stride_t, V, vocab_start, inv_temperature,
    BLOCK: tl.constexpr, SPLIT_BLOCK: tl.constexpr, ROWS_ALIGNED: tl.constexpr, HAS_ACTIVE: tl.constexpr,
    PER_ROW_TEMPERATURE: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr, TICKETS: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr, HAS_ROLLOUT: tl.constexpr,
    HAS_DELTA: tl.constexpr, HAS_DUAL_CLIP: tl.constexpr, KL_ESTIMATOR: tl.constexpr,
    KL_RATIO_WEIGHT: tl.constexpr,
):
    """Task (row, k): columns [k BLOCK, (k + 1) BLOCK) of row `row` of logits (B, T, V).
    Reads the slice once (active rows only), ids, temperature, active [row] and the plan;
    writes grad[row, slice] (zeros for an inactive row, not read), and from k = 0:
    logprob[row], entropy[row] and the row's sums. part (N, SPLIT, 3) and count (N + 1,)
    int32, zero on entry, are the exchange (count[N] is the ticket counter)."""
    split = tl.cdiv(V, BLOCK)
    if TICKETS:
        task = tl.atomic_add(count_ptr + N, 1).to(tl.int64)
    else:
        task = tl.program_id(0).to(tl.int64)
    row = task // split
    k = task - row * split
    row_ptr = logits_ptr + _row_offset(row, T, stride_b, stride_t, ROWS_ALIGNED)
    grad_row_ptr = grad_ptr + _row_offset(row, T, grad_stride_b, grad_stride_t, ROWS_ALIGNED)
    active, inv_t = _row_setup(row, temperature_ptr, active_ptr, inv_temperature, HAS_ACTIVE, PER_ROW_TEMPERATURE)
    cols = k * BLOCK + tl.arange(0, BLOCK)
    in_row = cols < V

    if active == 0:  # an inactive row is written, never read, and never waits
        tl.store(grad_row_ptr + cols, tl.zeros((BLOCK,), tl.float32).to(grad_ptr.dtype.element_ty), mask=in_row)
        if k == 0:
            zero = tl.zeros_like(inv_inactive(inv_t))
            tl.store(logprob_ptr + row, zero)
            tl.store(entropy_ptr + row, zero)
            # A masked row's sums are zeros, its inputs unread: row_coefficients of a dead row.
            loss_triton.row_coefficients(
                row, row < N, zero, zero, w_ptr, mask_ptr, adv_ptr, old_ptr, ref_ptr, rollout_ptr, scal_ptr,
                sums_ptr, N, beta, eps_low, eps_high, delta, dual_clip, HAS_MASK, HAS_OLD, HAS_REF, HAS_ROLLOUT,
                HAS_DELTA, HAS_DUAL_CLIP, KL_ESTIMATOR, KL_RATIO_WEIGHT)
    else:
        z = tl.load(row_ptr + cols, mask=in_row, other=-float("inf")).to(tl.float32) * inv_t
        m, s, u = online_softmax_step(-float("inf"), 0.0, 0.0, z, 0)
        if split > 1:
            # Publish this slice's statistics, then wait for the row's other slices.
            piece = part_ptr + (row * split + k) * 3
            tl.store(piece, m)
            tl.store(piece + 1, s)
            tl.store(piece + 2, u)
            tl.debug_barrier()  # every thread's stores before the release below
            tl.atomic_add(count_ptr + row, 1, sem="release")
            arrived = tl.atomic_add(count_ptr + row, 0, sem="acquire")
            spins = 0
            # Bounded: should a program never arrive (it cannot, by the ticket order), the row is
            # NaN after ~1 s instead of a hung process.
            while (arrived < split) & (spins < MAX_SPINS):
                arrived = tl.atomic_add(count_ptr + row, 0, sem="acquire")
                spins += 1
            ks = tl.arange(0, SPLIT_BLOCK)
            pieces = part_ptr + (row * split + ks) * 3
            there = ks < split
            # .cg: from the L2, where the other programs' stores are, never a stale L1 line.
            m, s, u = merge_statistics(tl.load(pieces, mask=there, other=-float("inf"), cache_modifier=".cg"),
                                       tl.load(pieces + 1, mask=there, other=0.0, cache_modifier=".cg"),
                                       tl.load(pieces + 2, mask=there, other=0.0, cache_modifier=".cg"), 0)
            m = tl.where(arrived >= split, m, float("nan"))
        log_s = tl.log(s)
        mean_rel = u / s
        y = tl.load(ids_ptr + row).to(tl.int64) - vocab_start
        owned = (y >= 0) & (y < V)
        z_y = tl.load(row_ptr + y, mask=owned, other=0.0).to(tl.float32) * inv_t
        logprob = tl.where(owned, (z_y - m) - log_s, float("nan"))
        entropy = log_s - mean_rel
        # Every program of the row computes the same c and e (and writes the same sums).
        c, e = loss_triton.row_coefficients(
            row, row < N, logprob, entropy, w_ptr, mask_ptr, adv_ptr, old_ptr, ref_ptr, rollout_ptr, scal_ptr,
            sums_ptr, N, beta, eps_low, eps_high, delta, dual_clip, HAS_MASK, HAS_OLD, HAS_REF, HAS_ROLLOUT,
            HAS_DELTA, HAS_DUAL_CLIP, KL_ESTIMATOR, KL_RATIO_WEIGHT)
        if k == 0:
            tl.store(logprob_ptr + row, logprob)
            tl.store(entropy_ptr + row, entropy)
        # The slice's gradient from the values still in registers; the 1/temperature of dz/dlogits
        # folds into c and e. At the target c (1 - p_y) = -c expm1(log p_y): exact when p_y ~ 1.
        c = c * inv_t
        z_rel = z - m
        p = tl.exp(z_rel - log_s)
        grad = tl.where(cols == y, -c * expm1(logprob), -c * p)
        if HAS_GRAD_ENTROPY:  # dH/dz = p (E_p[z] - z); a -inf logit has p = 0 and contributes 0
            grad += (e * inv_t) * p * tl.where(p > 0.0, mean_rel - z_rel, 0.0)
        tl.store(grad_row_ptr + cols, grad.to(grad_ptr.dtype.element_ty), mask=in_row)


@triton.jit(do_not_specialize=["T", "stride_b", "stride_t"])
def _rescale_kernel(grad_ptr, g_ptr, grad_scale, T, stride_b, stride_t, V,
                    BLOCK: tl.constexpr, ROWS_ALIGNED: tl.constexpr):
    """Row `row` of grad (B, T, V) *= g / grad_scale, g = g_ptr[0]; returns at once, reading
    nothing more, when g == grad_scale (the gradient was written for exactly that)."""
    g = tl.load(g_ptr).to(tl.float32)
    if g != grad_scale:
        row = tl.program_id(0).to(tl.int64)
        row_ptr = grad_ptr + _row_offset(row, T, stride_b, stride_t, ROWS_ALIGNED)
        factor = g / grad_scale
        cols = tl.arange(0, BLOCK)
        for start in range(0, V, BLOCK):
            x = tl.load(row_ptr + start + cols, mask=start + cols < V).to(tl.float32)
            tl.store(row_ptr + start + cols, (x * factor).to(grad_ptr.dtype.element_ty), mask=start + cols < V)


def default_block(V: int) -> tuple[int, int]:
    """(BLOCK, num_warps): the columns one program holds, and its warps. Under the interpreter a
    row is never split (its programs run one after another and could not wait for each other)."""
    import os

    if os.environ.get("TRITON_INTERPRET") == "1":
        return triton.next_power_of_2(V), 4
    block = max(8192, triton.next_power_of_2(triton.cdiv(V, MAX_SPLIT)))
    return min(block, triton.next_power_of_2(V)), 8


def two_pass_launch(rows: Tensor, grad_rows: Tensor, tokens: Tokens, plan: loss_triton.Plan, logprobs: Tensor,
                    entropy: Tensor, need_entropy_grad: bool, count: Tensor, part: Tensor,
                    block: Optional[int] = None, num_warps: Optional[int] = None, tickets: bool = True):
    """(kernel, grid, args, meta) of the two-pass kernel over rows (B', T', V) of logits, writing
    grad_rows (the same shape; may be rows themselves), logprobs, entropy (N,) and plan.sums.
    count (N + 1,) int32 zeros and part (N SPLIT 3,) fp32 are its exchange; `block`,
    `num_warps` and `tickets` override the defaults (the GPU probe measures them)."""
    B, T, V = rows.shape
    N = B * T
    default, warps = default_block(V)
    block = block or default
    split = triton.cdiv(V, block)
    if split > MAX_SPLIT:
        raise ValueError(f"a row of V = {V} needs BLOCK >= {triton.next_power_of_2(triton.cdiv(V, MAX_SPLIT))}")
    t_scalar, t_rows = tokens.temperature_args
    temp_arg, active_arg, inv, flags = row_args(tokens.ids, t_rows if t_rows is not None else t_scalar,
                                                tokens.active)
    args = (rows, grad_rows, tokens.ids, temp_arg, active_arg, logprobs, entropy, part, count, *plan.args,
            T, rows.stride(0), rows.stride(1), grad_rows.stride(0), grad_rows.stride(1), V, 0, inv)
    meta = dict(BLOCK=block, SPLIT_BLOCK=max(triton.next_power_of_2(split), 2),
                ROWS_ALIGNED=_rows_aligned(rows) and _rows_aligned(grad_rows), HAS_GRAD_ENTROPY=need_entropy_grad,
                TICKETS=tickets and split > 1, num_warps=num_warps or warps, **flags, **plan.meta)
    return _two_pass_kernel, (N * split,), args, meta


def launch(rows: Tensor, grad_rows: Tensor, tokens: Tokens, plan: loss_triton.Plan, logprobs: Tensor, entropy: Tensor,
           need_entropy_grad: bool, block: Optional[int] = None, num_warps: Optional[int] = None,
           tickets: bool = True) -> None:
    """Runs the two-pass kernel (two_pass_launch) with its exchange buffers."""
    B, T, V = rows.shape
    if B * T == 0:
        return
    split = triton.cdiv(V, block or default_block(V)[0])
    count = torch.zeros(B * T + 1, dtype=torch.int32, device=rows.device)
    part = torch.empty(B * T * split * 3 if split > 1 else 1, dtype=torch.float32, device=rows.device)
    kernel, grid, args, meta = two_pass_launch(rows, grad_rows, tokens, plan, logprobs, entropy, need_entropy_grad,
                                               count, part, block, num_warps, tickets)
    kernel[grid](*args, **meta)


def _zero_unscored(grad: Tensor, row_start: int, T: int) -> None:
    """The rows of a full model output (B, L, V) outside [row_start, row_start + T) get a zero gradient."""
    if row_start > 0:
        grad[:, :row_start].zero_()
    if row_start + T < grad.shape[1]:
        grad[:, row_start + T:].zero_()


def _tokens_of(ids, temperature, temperature_rows, mask, advantages, adv_per_seq, offsets, old, ref, rollout,
               num_seqs, seq_len) -> Tokens:
    N = ids.shape[0]
    layout = Layout(num_seqs, N, seq_len=None if offsets is not None else seq_len, offsets=offsets)
    return Tokens(layout, ids, mask, None if mask is None else mask != 0, advantages, old, ref, rollout, None,
                  temperature if temperature_rows is None else temperature_rows, None, adv_per_seq, False)


def _options_of(loss_type, beta, eps_low, eps_high, delta, dual_clip, kl_estimator, kl_ratio_weight, entropy_coef,
                grad_scale) -> GRPOOptions:
    return GRPOOptions(loss_type=loss_type, beta=beta, epsilon_low=eps_low, epsilon_high=eps_high, delta=delta,
                       dual_clip=dual_clip, kl_estimator=kl_estimator, use_bias_correction_kl=kl_ratio_weight,
                       entropy_coef=entropy_coef, grad_scale=grad_scale)


def _run(logits, row_start, ids, temperature, temperature_rows, mask, advantages, adv_per_seq, offsets, old, ref,
         rollout, n_items, num_seqs, seq_len, loss_type, beta, eps_low, eps_high, delta, dual_clip, kl_estimator,
         kl_ratio_weight, entropy_coef, divisor_code, divisor, grad_scale, grad):
    """The op body: plan, the two-pass kernel into grad, the sums. Returns (loss, out, logprobs)."""
    _check_supported(logits)
    tokens = _tokens_of(ids, temperature, temperature_rows, mask, advantages, adv_per_seq, offsets, old, ref,
                        rollout, num_seqs, seq_len)
    o = _options_of(loss_type, beta, eps_low, eps_high, delta, dual_clip, kl_estimator, kl_ratio_weight,
                    entropy_coef, grad_scale)
    plan = loss_triton.Plan(tokens, o, grad_scale, (divisor_code, divisor, n_items))
    N = ids.shape[0]
    T = N // logits.shape[0] if logits.shape[0] else 0
    logprobs = torch.empty(N, dtype=torch.float32, device=logits.device)
    entropy = torch.empty(N, dtype=torch.float32, device=logits.device)
    _zero_unscored(grad, row_start, T)
    launch(logits.narrow(1, row_start, T), grad.narrow(1, row_start, T), tokens, plan, logprobs, entropy,
           entropy_coef != 0.0)
    loss, out = plan.finish()
    return loss, out, logprobs


_SCHEMA_DOC = """(logits (B, L, V), row_start, per-token inputs, options) -> (loss, out (7,), logprobs (N,)[, grad])"""


@torch.library.custom_op("grpo_kernels::two_pass_loss", mutates_args=())
def two_pass_loss(logits: Tensor, row_start: int, ids: Tensor, temperature: float, temperature_rows: Optional[Tensor],
                  mask: Optional[Tensor], advantages: Tensor, adv_per_seq: bool, offsets: Optional[Tensor],
                  old: Optional[Tensor], ref: Optional[Tensor], rollout: Optional[Tensor], n_items: Optional[Tensor],
                  num_seqs: int, seq_len: int, loss_type: str, beta: float, eps_low: float, eps_high: float,
                  delta: Optional[float], dual_clip: Optional[float], kl_estimator: str, kl_ratio_weight: bool,
                  entropy_coef: float, divisor_code: int, divisor: float, grad_scale: float
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The token-local loss of the rows [row_start, row_start + T) of logits (B, L, V): the loss,
    out (kl, entropy, clip low/high/region, 1/n, e_scale), the log-probs (N,), and the gradient
    of the whole of logits times grad_scale (zeros on the rows not scored)."""
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    loss, out, logprobs = _run(logits, row_start, ids, temperature, temperature_rows, mask, advantages, adv_per_seq,
                               offsets, old, ref, rollout, n_items, num_seqs, seq_len, loss_type, beta, eps_low,
                               eps_high, delta, dual_clip, kl_estimator, kl_ratio_weight, entropy_coef, divisor_code,
                               divisor, grad_scale, grad)
    return loss, out, logprobs, grad


@torch.library.custom_op("grpo_kernels::two_pass_loss_", mutates_args=("logits",))
def two_pass_loss_(logits: Tensor, row_start: int, ids: Tensor, temperature: float, temperature_rows: Optional[Tensor],
                   mask: Optional[Tensor], advantages: Tensor, adv_per_seq: bool, offsets: Optional[Tensor],
                   old: Optional[Tensor], ref: Optional[Tensor], rollout: Optional[Tensor], n_items: Optional[Tensor],
                   num_seqs: int, seq_len: int, loss_type: str, beta: float, eps_low: float, eps_high: float,
                   delta: Optional[float], dual_clip: Optional[float], kl_estimator: str, kl_ratio_weight: bool,
                   entropy_coef: float, divisor_code: int, divisor: float, grad_scale: float
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """two_pass_loss with the gradient written into the logits' own storage (inplace_backward):
    each element is read before it is overwritten; the declared mutation bumps their version."""
    return _run(logits, row_start, ids, temperature, temperature_rows, mask, advantages, adv_per_seq, offsets, old,
                ref, rollout, n_items, num_seqs, seq_len, loss_type, beta, eps_low, eps_high, delta, dual_clip,
                kl_estimator, kl_ratio_weight, entropy_coef, divisor_code, divisor, grad_scale, logits)


def _fake_outputs(logits, ids):
    f32 = dict(dtype=torch.float32, device=logits.device)
    return logits.new_empty((), **f32), logits.new_empty(7, **f32), logits.new_empty(ids.shape[0], **f32)


@two_pass_loss.register_fake
def _(logits, row_start, ids, *rest):
    return (*_fake_outputs(logits, ids), logits.new_empty(logits.shape))


@two_pass_loss_.register_fake
def _(logits, row_start, ids, *rest):
    return _fake_outputs(logits, ids)


@torch.library.custom_op("grpo_kernels::rescale_gradient_", mutates_args=("grad",))
def rescale_gradient_(grad: Tensor, g: Tensor, grad_scale: float) -> None:
    """grad (B, L, V) *= g / grad_scale, in one pass, unless g == grad_scale (checked on the device)."""
    B, L, V = grad.shape
    if B * L == 0:
        return
    if grad.device.type != "cuda" and not _interpreted():
        grad.mul_(torch.where(g == grad_scale, 1.0, g / grad_scale).to(grad.dtype))
        return
    _rescale_kernel[(B * L,)](grad, g.reshape(1), float(grad_scale), L, grad.stride(0), grad.stride(1), V,
                              BLOCK=min(triton.next_power_of_2(V), 4096), ROWS_ALIGNED=_rows_aligned(grad),
                              num_warps=8)


@rescale_gradient_.register_fake
def _(grad, g, grad_scale):
    return None


def _interpreted() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"


def _setup_context(ctx, inputs, output):
    ctx.grad_scale = inputs[-1]
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(output[3])  # the gradient, an output of the op


def _backward(ctx, grad_loss, *_):
    if grad_loss is None:
        return (None,) * 27
    (grad,) = ctx.saved_tensors
    torch.ops.grpo_kernels.rescale_gradient_(grad, grad_loss, ctx.grad_scale)
    return (grad,) + (None,) * 26


two_pass_loss.register_autograd(_backward, setup_context=_setup_context)


class _TwoPassInPlace(torch.autograd.Function):
    """two_pass_loss_ under autograd: the mutation bumps the logits' version (a later use of
    their overwritten values raises), and the backward hands back the logits, which hold the
    gradient (rescaled only when the upstream gradient is not grad_scale)."""

    @staticmethod
    def forward(ctx, logits, *args):
        loss, out, logprobs = torch.ops.grpo_kernels.two_pass_loss_(logits, *args)
        ctx.grad_scale = args[-1]
        ctx.save_for_backward(logits)
        ctx.mark_non_differentiable(out, logprobs)
        return loss, out, logprobs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, *_):
        (grad,) = ctx.saved_tensors
        torch.ops.grpo_kernels.rescale_gradient_(grad, grad_loss, ctx.grad_scale)
        return (grad,) + (None,) * 26


def fused_loss(logits: Tensor, row_start: int, tokens: Tokens, o: GRPOOptions) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, out (7,), logprobs (N,)) of a token-local loss through the two-pass op; `logits` is the
    model's full output (B, L, V), of which rows [row_start, row_start + T) are scored."""
    layout = tokens.layout
    t_scalar, t_rows = tokens.temperature_args
    code, divisor, n_items = loss_triton.divisor_of(o, tokens)
    args = (logits, row_start, tokens.ids, t_scalar, t_rows, tokens.mask, tokens.advantages,
            tokens.advantages_per_seq, layout.offsets, tokens.old_logprobs, tokens.ref_logprobs,
            tokens.rollout_is_ratio, n_items, layout.num_seqs, layout.seq_len or 0, o.loss_type, float(o.beta),
            float(o.epsilon_low), float(o.eps_high), o.delta, o.dual_clip, o.kl_estimator,
            o.use_bias_correction_kl, float(o.entropy_coef), code, float(divisor), float(o.grad_scale))
    if o.inplace_backward:
        loss, out, logprobs = _TwoPassInPlace.apply(*args)
    else:
        loss, out, logprobs, _ = torch.ops.grpo_kernels.two_pass_loss(*args)
    return loss, out, logprobs
