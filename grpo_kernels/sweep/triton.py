"""Vocabulary sweeps over logits rows in Triton: log pi(y), entropy, and their gradient.

Per row r (token r of a (B, T, V) view) with z = logits[r] / temperature_r, p = softmax(z),
y = ids[r] - vocab_start (the column of the target in this shard):
  forward   reads z once (online max m, s = sum exp(z - m), u = sum exp(z - m)(z - m)) and
            writes fp32: logprob = (z_y - m) - log s, entropy = log s - u/s, m, log s, u/s;
            with PARTIAL (one shard of a vocab-parallel row), m, s, u and z_y instead.
  backward  reads z once more and writes the gradient once:
            dlogits = (c (onehot(y) - p) + e p (u/s - (z - m))) / temperature_r,
            p = exp((z - m) - log s), c = dL/dlogprob, e = dL/dentropy; at the target
            1 - p = -expm1(logprob), which keeps a confident token's gradient exact.
The max and the log-sum stay apart: a rounded lse = m + log s would cost eps * |lse| in
every log-prob and probability (docs/design.md).

An inactive row (mask 0) is never read: its loops run zero times and its outputs are 0;
the backward writes its gradient row as zeros without loading it. An id outside this
shard's columns gives a NaN log-prob (PARTIAL: z_y = 0), a temperature <= 0 or non-finite
NaN everything: never an out-of-bounds read, never a silent number.

Rules (SPEC section 3): one program per row on a 1-D grid, int64 offsets, any strides on B
and T, fp32 accumulation, no atomics, and every value that changes per batch (T, strides,
vocab_start, temperature) a runtime argument that never specialises: only dtypes, the
block size and flags that remove work are compile-time.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Sizes that vary per batch: excluded from Triton's divisibility specialisation, so a new
# T (or a new slice of the logits) reuses the compiled kernel. Alignment of the rows is
# passed instead as the ROWS_ALIGNED flag, which depends on V and dtype only.
_RUNTIME_INTS = ["T", "stride_b", "stride_t", "vocab_start"]
# Pointers read or written once per row: their alignment (which moves with B * T when
# they are views of one buffer) buys nothing, so it must not select a compiled variant.
_PER_ROW_POINTERS = ["ids_ptr", "temperature_ptr", "active_ptr", "out0_ptr", "out1_ptr", "out2_ptr", "out3_ptr",
                     "out4_ptr", "m_ptr", "log_sum_ptr", "mean_rel_ptr", "grad_logprobs_ptr", "grad_entropy_ptr"]


@triton.jit
def _row_offset(row, T, stride_b, stride_t, ROWS_ALIGNED: tl.constexpr):
    """Element offset of row `row` = b * T + t of a (B, T, V) tensor, in int64."""
    b = row // T
    t = row - b * T
    offset = b * stride_b + t * stride_t
    if ROWS_ALIGNED:  # every row starts on a 16-byte boundary: lets the loads vectorise
        offset = tl.multiple_of(offset, 16)
    return offset


@triton.jit
def online_softmax_step(m, s, u, z, AXIS: tl.constexpr):
    """Folds the tile z into running softmax statistics, reducing over AXIS; returns (m, s, u).

    Relative to the running max m: s = sum exp(z - m), u = sum exp(z - m) * (z - m).
    Keeping u relative to m avoids the cancellation of lse - E_p[z] when |z| is large.
    """
    m_new = tl.maximum(m, tl.max(z, axis=AXIS))
    # exp(-inf - -inf) is NaN: while every value so far is -inf, shift by 0 instead.
    shift = tl.where(m_new == -float("inf"), 0.0, m_new)
    alpha = tl.exp(m - shift)
    z_rel = z - tl.expand_dims(shift, AXIS)
    e = tl.exp(z_rel)
    # u rebased from m to m_new: alpha * (u + (m - m_new) * s). Select before multiplying:
    # 0 * -inf would be NaN.
    u = alpha * (u + tl.where(s > 0.0, m - shift, 0.0) * s) + tl.sum(e * tl.where(e > 0.0, z_rel, 0.0), axis=AXIS)
    s = s * alpha + tl.sum(e, axis=AXIS)
    return m_new, s, u


@triton.jit
def online_logsumexp_step(m, s, z, AXIS: tl.constexpr):
    """online_softmax_step without u: (m, s) only, for a sweep that needs no entropy."""
    m_new = tl.maximum(m, tl.max(z, axis=AXIS))
    shift = tl.where(m_new == -float("inf"), 0.0, m_new)
    s = s * tl.exp(m - shift) + tl.sum(tl.exp(z - tl.expand_dims(shift, AXIS)), axis=AXIS)
    return m_new, s


@triton.jit
def merge_statistics(m, s, u, AXIS: tl.constexpr):
    """Merges pieces of a row (their maxima m, s = sum exp(z - m), u = sum exp(z - m)(z - m),
    along AXIS) into the row's (m, s, u), measured from the common max; as stats.py's rebase:
    a piece with s = 0 (all -inf, or nothing read) contributes 0."""
    m_all = tl.max(m, axis=AXIS)
    shift = tl.where(m_all == -float("inf"), 0.0, m_all)
    live = s > 0.0
    rel = tl.where(live, m - tl.expand_dims(shift, AXIS), 0.0)
    w = tl.where(live, tl.exp(rel), 0.0)
    return m_all, tl.sum(w * s, axis=AXIS), tl.sum(w * (u + rel * s), axis=AXIS)


@triton.jit
def inv_temperature_of(t):
    """1 / t, NaN for a temperature <= 0 or not finite (a bad per-token temperature is never a number)."""
    return tl.where((t > 0.0) & (t < float("inf")), 1.0 / t, float("nan"))


@triton.jit
def _row_setup(row, temperature_ptr, active_ptr, inv_temperature,
               HAS_ACTIVE: tl.constexpr, PER_ROW_TEMPERATURE: tl.constexpr):
    """(active as 0 or 1, 1 / temperature of the row): NaN for a temperature <= 0 or not finite."""
    active = 1
    if HAS_ACTIVE:
        active = tl.load(active_ptr + row).to(tl.int32)
    inv_t = inv_temperature
    if PER_ROW_TEMPERATURE:
        inv_t = inv_temperature_of(tl.load(temperature_ptr + row))
    return active, inv_t


@triton.jit
def expm1(x):
    """exp(x) - 1 without the cancellation near 0 (Taylor to x^8 for |x| < 0.3, rel. error < 2e-10).

    The target's gradient is c (1 - p_y) = -c expm1(logprob): for a confident token p_y is 1
    to within eps, and 1 - p_y computed as a difference would lose all of it.
    """
    taylor = x * (1.0 + x * (1 / 2 + x * (1 / 6 + x * (1 / 24 + x * (1 / 120 + x * (1 / 720 + x * (
        1 / 5040 + x * (1 / 40320))))))))
    return tl.where(tl.abs(x) < 0.3, taylor, tl.exp(x) - 1.0)


@triton.jit
def _keep(x, active, HAS_ACTIVE: tl.constexpr):
    """x on an active row, 0 on an inactive one."""
    if HAS_ACTIVE:
        x = tl.where(active != 0, x, 0.0)
    return x


@triton.jit(do_not_specialize=_RUNTIME_INTS, do_not_specialize_on_alignment=_PER_ROW_POINTERS)
def _sweep_fwd_kernel(
    logits_ptr, ids_ptr, temperature_ptr, active_ptr, out0_ptr, out1_ptr, out2_ptr, out3_ptr, out4_ptr,
    T, stride_b, stride_t, V, vocab_start, inv_temperature,
    BLOCK_V: tl.constexpr, ROWS_ALIGNED: tl.constexpr, HAS_ACTIVE: tl.constexpr,
    PER_ROW_TEMPERATURE: tl.constexpr, PARTIAL: tl.constexpr, ENTROPY: tl.constexpr,
):
    """Reads logits[row, :] (active rows only), ids[row], temperature[row], active[row].
    Writes fp32 [row]: out0..4 = logprob, entropy, m, log s, u/s; PARTIAL: out0..3 = m, s, u, z_y.
    Without ENTROPY the u sums are not computed and entropy, u/s are NaN."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + _row_offset(row, T, stride_b, stride_t, ROWS_ALIGNED)
    active, inv_t = _row_setup(row, temperature_ptr, active_ptr, inv_temperature, HAS_ACTIVE, PER_ROW_TEMPERATURE)
    cols = tl.arange(0, BLOCK_V)

    m = -float("inf")
    s = 0.0
    u = 0.0
    for start in range(0, V * active, BLOCK_V):  # no iteration, and no read, for an inactive row
        z = tl.load(row_ptr + start + cols, mask=start + cols < V, other=-float("inf")).to(tl.float32)
        if ENTROPY:
            m, s, u = online_softmax_step(m, s, u, z * inv_t, 0)
        else:
            m, s = online_logsumexp_step(m, s, z * inv_t, 0)
    if not ENTROPY:
        u = float("nan") * s

    y = tl.load(ids_ptr + row).to(tl.int64) - vocab_start
    owned = (y >= 0) & (y < V)
    if HAS_ACTIVE:
        owned = owned & (active != 0)
    z_y = tl.load(row_ptr + y, mask=owned, other=0.0).to(tl.float32) * inv_t
    if PARTIAL:
        tl.store(out0_ptr + row, _keep(m, active, HAS_ACTIVE))
        tl.store(out1_ptr + row, _keep(s, active, HAS_ACTIVE))
        tl.store(out2_ptr + row, _keep(u, active, HAS_ACTIVE))
        tl.store(out3_ptr + row, tl.where(owned, z_y, 0.0))
    else:
        log_s = tl.log(s)
        mean_rel = u / s
        logprob = tl.where(owned, (z_y - m) - log_s, float("nan"))
        tl.store(out0_ptr + row, _keep(logprob, active, HAS_ACTIVE))
        tl.store(out1_ptr + row, _keep(log_s - mean_rel, active, HAS_ACTIVE))
        tl.store(out2_ptr + row, _keep(m, active, HAS_ACTIVE))
        tl.store(out3_ptr + row, _keep(log_s, active, HAS_ACTIVE))
        tl.store(out4_ptr + row, _keep(mean_rel, active, HAS_ACTIVE))


@triton.jit(do_not_specialize=_RUNTIME_INTS + ["grad_stride_b", "grad_stride_t"],
            do_not_specialize_on_alignment=_PER_ROW_POINTERS)
def _sweep_bwd_kernel(
    logits_ptr, grad_ptr, ids_ptr, temperature_ptr, active_ptr, m_ptr, log_sum_ptr, mean_rel_ptr,
    grad_logprobs_ptr, grad_entropy_ptr,
    T, stride_b, stride_t, grad_stride_b, grad_stride_t, V, vocab_start, inv_temperature,
    BLOCK_V: tl.constexpr, ROWS_ALIGNED: tl.constexpr, HAS_ACTIVE: tl.constexpr,
    PER_ROW_TEMPERATURE: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr,
):
    """Reads logits[row, :] (active rows only), ids, temperature, active, m, log s, u/s and the
    upstream gradients [row]; writes grad[row, :] in grad's dtype (zeros for an inactive row).
    grad may alias logits: each block is read before it is written."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + _row_offset(row, T, stride_b, stride_t, ROWS_ALIGNED)
    grad_row_ptr = grad_ptr + _row_offset(row, T, grad_stride_b, grad_stride_t, ROWS_ALIGNED)
    active, inv_t = _row_setup(row, temperature_ptr, active_ptr, inv_temperature, HAS_ACTIVE, PER_ROW_TEMPERATURE)
    cols = tl.arange(0, BLOCK_V)

    y = tl.load(ids_ptr + row).to(tl.int64) - vocab_start
    m = tl.load(m_ptr + row)
    log_s = tl.load(log_sum_ptr + row)
    # The 1/temperature of dz/dlogits folds into the per-row coefficients.
    c = _keep(tl.load(grad_logprobs_ptr + row) * inv_t, active, HAS_ACTIVE)
    if HAS_GRAD_ENTROPY:
        e = _keep(tl.load(grad_entropy_ptr + row) * inv_t, active, HAS_ACTIVE)
        mean_rel = tl.load(mean_rel_ptr + row)
    # c (onehot - p) at the target is c (1 - p_y) = -c expm1(log p_y), once per row: for a
    # confident token p_y is 1 to within eps, and 1 - p_y as a difference would lose it all.
    owned = (y >= 0) & (y < V)
    if HAS_ACTIVE:
        owned = owned & (active != 0)
    z_y = tl.load(row_ptr + y, mask=owned, other=0.0).to(tl.float32)
    target = -c * expm1((z_y * inv_t - m) - log_s)
    for start in range(0, V, BLOCK_V):
        in_row = start + cols < V
        read = in_row
        if HAS_ACTIVE:  # an inactive row is written, never read
            read = (start + cols < V * active)
        z = tl.load(row_ptr + start + cols, mask=read, other=-float("inf")).to(tl.float32)
        z_rel = z * inv_t - m
        p = tl.exp(z_rel - log_s)
        grad = tl.where(start + cols == y, target, -c * p)
        if HAS_GRAD_ENTROPY:
            # dH/dz = p (E_p[z] - z); a -inf logit has p = 0 and contributes 0, not 0 * inf.
            grad += e * p * tl.where(p > 0.0, mean_rel - z_rel, 0.0)
        grad = _keep(grad, active, HAS_ACTIVE)
        tl.store(grad_row_ptr + start + cols, grad.to(grad_ptr.dtype.element_ty), mask=in_row)


SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _launch_config(V: int) -> tuple[int, int]:
    """Block over the vocabulary and warps per row: the block size depends on V alone."""
    block_v = min(triton.next_power_of_2(V), 4096)
    return block_v, 8 if block_v >= 2048 else 4


def _rows_aligned(t: torch.Tensor) -> bool:
    """Whether every row offset of t (B, T, V) is a multiple of 16 elements, as the kernels
    then assume; for a (sliced) logits tensor V decides this, not T."""
    return t.data_ptr() % 16 == 0 and t.stride(0) % 16 == 0 and t.stride(1) % 16 == 0


def _check_supported(logits: torch.Tensor) -> None:
    if logits.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"backend='triton' takes float32, bfloat16 or float16 logits, got {logits.dtype}")


def row_args(ids, temperature, active):
    """(temperature pointer, active pointer, scalar 1/temperature, flags) of a launch that reads the
    per-row temperature and mask (these sweeps and the fused-linear kernels)."""
    per_row = isinstance(temperature, torch.Tensor)
    inv = 1.0 if per_row else 1.0 / temperature
    # A bool mask is read as bytes: the same storage, no copy.
    active_arg = ids if active is None else active.view(torch.uint8)
    return (temperature if per_row else ids, active_arg, inv,
            dict(HAS_ACTIVE=active is not None, PER_ROW_TEMPERATURE=per_row))


def forward_launch(logits, ids, temperature, active, outs, vocab_start=0, partial=False, entropy=True):
    """(kernel, grid, args, meta) of the forward sweep writing the tensors `outs` (five, or four with partial);
    without `entropy`, the entropy and u/s outputs are NaN and cost nothing."""
    B, T, V = logits.shape
    block_v, num_warps = _launch_config(V)
    temp_arg, active_arg, inv, flags = row_args(ids, temperature, active)
    outs = list(outs) + [outs[0]] * (5 - len(outs))
    args = (logits, ids, temp_arg, active_arg, *outs, T, logits.stride(0), logits.stride(1), V, vocab_start, inv)
    meta = dict(BLOCK_V=block_v, ROWS_ALIGNED=_rows_aligned(logits), PARTIAL=partial, ENTROPY=entropy or partial,
                num_warps=num_warps, **flags)
    return _sweep_fwd_kernel, (B * T,), args, meta


def backward_launch(logits, ids, temperature, active, m, log_sum, mean_rel, grad_logprobs, grad_entropy, grad_out,
                    vocab_start=0):
    """(kernel, grid, args, meta) of the backward sweep writing grad_out."""
    B, T, V = logits.shape
    block_v, num_warps = _launch_config(V)
    temp_arg, active_arg, inv, flags = row_args(ids, temperature, active)
    has_grad_entropy = grad_entropy is not None
    args = (logits, grad_out, ids, temp_arg, active_arg, m, log_sum, mean_rel, grad_logprobs,
            grad_entropy if has_grad_entropy else grad_logprobs,
            T, logits.stride(0), logits.stride(1), grad_out.stride(0), grad_out.stride(1), V, vocab_start, inv)
    meta = dict(BLOCK_V=block_v, ROWS_ALIGNED=_rows_aligned(logits) and _rows_aligned(grad_out),
                HAS_GRAD_ENTROPY=has_grad_entropy, num_warps=num_warps, **flags)
    return _sweep_bwd_kernel, (B * T,), args, meta


def forward(logits, ids, temperature, active, vocab_start=0, partial=False, entropy=True):
    """The backend contract's forward (docs/design.md): five (N,) fp32 tensors, or four with partial
    (without `entropy`: the entropy and u/s are NaN, not computed)."""
    _check_supported(logits)
    B, T, _ = logits.shape
    outs = tuple(torch.empty(B * T, dtype=torch.float32, device=logits.device) for _ in range(4 if partial else 5))
    if B * T > 0:
        kernel, grid, args, meta = forward_launch(logits, ids, temperature, active, outs, vocab_start, partial,
                                                  entropy)
        kernel[grid](*args, **meta)
    return outs


def backward(logits, ids, temperature, active, m, log_sum, mean_rel, grad_logprobs, grad_entropy, grad_out,
             vocab_start=0):
    """Writes dL/dlogits into grad_out (B, T, V), which may alias logits."""
    _check_supported(logits)
    B, T, _ = logits.shape
    if B * T == 0:
        return
    # The (N,) upstream gradients may arrive expanded or in float64: make them plain fp32 rows.
    grad_logprobs = torch.zeros_like(m) if grad_logprobs is None else grad_logprobs.float().contiguous()
    grad_entropy = None if grad_entropy is None else grad_entropy.float().contiguous()
    kernel, grid, args, meta = backward_launch(logits, ids, temperature, active, m, log_sum, mean_rel,
                                               grad_logprobs, grad_entropy, grad_out, vocab_start)
    kernel[grid](*args, **meta)
