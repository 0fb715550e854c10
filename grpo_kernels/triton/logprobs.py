"""Vocabulary sweeps over logits (B, T, V) in Triton: log pi(y), entropy, and their gradient.

Per token t with z = logits[t] / temperature, p = softmax(z), y = completion_ids[t]:
  forward   reads z once (online max, sum of exp and sum of p*z) and writes four fp32
            numbers: logprob = z_y - lse, entropy = lse - E_p[z], lse, mean_z = E_p[z].
  backward  reads z once more and writes the gradient once:
            dlogits = (c * (onehot(y) - p) + e * p * (mean_z - z)) / temperature,
            with c = dL/dlogprob and e = dL/dentropy from the loss layer.

Rules (SPEC section 3): one program per row on a 1-D grid (rows up to 2^31), int64
offsets, any strides on B and T, fp32 accumulation, no atomics, and every value that
changes per batch (rows, T, strides, temperature) a runtime argument that never
specialises: only dtypes, the block size and flags that remove work are compile-time.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Sizes that vary per batch: excluded from Triton's divisibility specialisation, so a new
# T (or a new slice of the logits) reuses the compiled kernel. Alignment of the rows is
# passed instead as the ROWS_ALIGNED flag, which depends on V and dtype only.
_RUNTIME_INTS = ["n_rows", "T", "stride_b", "stride_t"]
# Pointers read or written once per row: their alignment (which moves with B * T when
# they are views of one buffer) buys nothing, so it must not select a compiled variant.
_PER_ROW_POINTERS = ["ids_ptr", "lse_ptr", "mean_z_ptr"]


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


@triton.jit(do_not_specialize=_RUNTIME_INTS,
            do_not_specialize_on_alignment=_PER_ROW_POINTERS + ["logprobs_ptr", "entropy_ptr"])
def _logprobs_fwd_kernel(
    logits_ptr, ids_ptr, logprobs_ptr, entropy_ptr, lse_ptr, mean_z_ptr,
    n_rows, T, stride_b, stride_t, V, inv_temperature,
    BLOCK_V: tl.constexpr, ROWS_ALIGNED: tl.constexpr,
):
    """Reads logits[row, :] and ids[row]; writes logprobs, entropy, lse, mean_z [row] (fp32)."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + _row_offset(row, T, stride_b, stride_t, ROWS_ALIGNED)
    cols = tl.arange(0, BLOCK_V)

    m = -float("inf")
    s = 0.0
    u = 0.0
    for start in range(0, V, BLOCK_V):
        z = tl.load(row_ptr + start + cols, mask=start + cols < V, other=-float("inf")).to(tl.float32)
        m, s, u = online_softmax_step(m, s, u, z * inv_temperature, 0)

    lse = m + tl.log(s)
    mean_z = m + u / s
    y = tl.load(ids_ptr + row).to(tl.int64)
    z_y = tl.load(row_ptr + y).to(tl.float32) * inv_temperature
    tl.store(logprobs_ptr + row, z_y - lse)
    tl.store(entropy_ptr + row, tl.log(s) - u / s)
    tl.store(lse_ptr + row, lse)
    tl.store(mean_z_ptr + row, mean_z)


@triton.jit(do_not_specialize=_RUNTIME_INTS + ["grad_stride_b", "grad_stride_t"],
            do_not_specialize_on_alignment=_PER_ROW_POINTERS + ["grad_logprobs_ptr", "grad_entropy_ptr"])
def _logprobs_bwd_kernel(
    logits_ptr, grad_ptr, ids_ptr, lse_ptr, mean_z_ptr, grad_logprobs_ptr, grad_entropy_ptr,
    n_rows, T, stride_b, stride_t, grad_stride_b, grad_stride_t, V, inv_temperature,
    BLOCK_V: tl.constexpr, ROWS_ALIGNED: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr,
):
    """Reads logits[row, :], ids, lse, mean_z and the upstream gradients [row];
    writes grad[row, :] in grad's dtype. grad may alias logits: each block is read before written."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + _row_offset(row, T, stride_b, stride_t, ROWS_ALIGNED)
    grad_row_ptr = grad_ptr + _row_offset(row, T, grad_stride_b, grad_stride_t, ROWS_ALIGNED)
    cols = tl.arange(0, BLOCK_V)

    y = tl.load(ids_ptr + row).to(tl.int64)
    lse = tl.load(lse_ptr + row)
    # The 1/temperature of dz/dlogits folds into the per-row coefficients.
    c = tl.load(grad_logprobs_ptr + row) * inv_temperature
    if HAS_GRAD_ENTROPY:
        e = tl.load(grad_entropy_ptr + row) * inv_temperature
        mean_z = tl.load(mean_z_ptr + row)
    for start in range(0, V, BLOCK_V):
        in_row = start + cols < V
        z = tl.load(row_ptr + start + cols, mask=in_row, other=-float("inf")).to(tl.float32) * inv_temperature
        p = tl.exp(z - lse)
        grad = tl.where(start + cols == y, c, 0.0) - c * p
        if HAS_GRAD_ENTROPY:
            # dH/dz = p (E_p[z] - z); a -inf logit has p = 0 and contributes 0, not 0 * inf.
            grad += e * p * tl.where(p > 0.0, mean_z - z, 0.0)
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


def forward_launch(logits: torch.Tensor, ids: torch.Tensor, temperature: float, out: torch.Tensor):
    """(kernel, grid, args, meta) of the forward sweep writing out[0..3] = logprobs, entropy, lse, mean_z."""
    B, T, V = logits.shape
    block_v, num_warps = _launch_config(V)
    args = (logits, ids, *out.unbind(0), B * T, T, logits.stride(0), logits.stride(1), V, 1.0 / temperature)
    meta = dict(BLOCK_V=block_v, ROWS_ALIGNED=_rows_aligned(logits), num_warps=num_warps)
    return _logprobs_fwd_kernel, (B * T,), args, meta


def backward_launch(logits: torch.Tensor, ids: torch.Tensor, temperature: float, lse: torch.Tensor,
                    mean_z: torch.Tensor, grad_logprobs: torch.Tensor, grad_entropy: torch.Tensor | None,
                    grad_out: torch.Tensor):
    """(kernel, grid, args, meta) of the backward sweep writing grad_out."""
    B, T, V = logits.shape
    block_v, num_warps = _launch_config(V)
    has_grad_entropy = grad_entropy is not None
    args = (logits, grad_out, ids, lse, mean_z, grad_logprobs, grad_entropy if has_grad_entropy else grad_logprobs,
            B * T, T, logits.stride(0), logits.stride(1), grad_out.stride(0), grad_out.stride(1), V, 1.0 / temperature)
    meta = dict(BLOCK_V=block_v, ROWS_ALIGNED=_rows_aligned(logits) and _rows_aligned(grad_out),
                HAS_GRAD_ENTROPY=has_grad_entropy, num_warps=num_warps)
    return _logprobs_bwd_kernel, (B * T,), args, meta


def forward(logits: torch.Tensor, ids: torch.Tensor, temperature: float):
    """logits (B, T, V), ids (B, T) -> logprobs, entropy, lse, mean_z, each (B, T) fp32."""
    _check_supported(logits)
    B, T, _ = logits.shape
    out = torch.empty((4, B, T), dtype=torch.float32, device=logits.device)
    if B * T > 0:
        kernel, grid, args, meta = forward_launch(logits, ids.contiguous(), temperature, out)
        kernel[grid](*args, **meta)
    return out.unbind(0)


def backward(logits: torch.Tensor, ids: torch.Tensor, temperature: float, lse: torch.Tensor,
             mean_z: torch.Tensor, grad_logprobs: torch.Tensor | None, grad_entropy: torch.Tensor | None,
             grad_out: torch.Tensor) -> None:
    """Writes dL/dlogits into grad_out (B, T, V), which may alias logits."""
    _check_supported(logits)
    B, T, _ = logits.shape
    if B * T == 0:
        return
    # The (B, T) upstream gradients may arrive expanded or in float64: make them plain fp32 rows.
    grad_logprobs = torch.zeros_like(lse) if grad_logprobs is None else grad_logprobs.float().contiguous()
    grad_entropy = None if grad_entropy is None else grad_entropy.float().contiguous()
    kernel, grid, args, meta = backward_launch(logits, ids.contiguous(), temperature, lse, mean_z,
                                               grad_logprobs, grad_entropy, grad_out)
    kernel[grid](*args, **meta)
