"""The fused-linear sweep on the GPU: cuBLAS products in fp32 chunks of tokens, Triton row kernels
between them. log pi(y), entropy and their gradient from the hidden states and the output
projection, without the (N, V) logits: at most one chunk of `chunk_rows` tokens exists at a time,
in fp32 (never rounded to 16 bits).

With z = (hidden @ weight.T + bias) / temperature, p = softmax(z), y = ids - vocab_start, per chunk
of rows [r0, r1):

  x  = hidden[r0:r1] @ weight.T            cuBLAS, 16-bit inputs, fp32 output (`_logits_gemm`)
  `_chunk_stats_kernel`   one program per row: reads x (+ bias, / temperature) once; writes the
                          sweep contract's five numbers (logprob, entropy, m, log_sum, mean_rel)
                          or, for a vocab-parallel shard, (m, s, u, z_y)
  c, e = coefficients(r0, logprob, entropy)   dL/dlogprob, dL/dentropy of these rows
  `_chunk_dz_kernel`      one program per row: reads x once more; writes
                          dz = (c (onehot(y) - p) + e p (mean_rel - (z - m))) / T in the inputs'
                          dtype, into x's own storage (inplace_dz) or a scratch
  grad_hidden[r0:r1] = dz @ weight         cuBLAS (fp32 accumulation over the whole vocabulary)
  grad_weight += dz.T @ hidden[r0:r1]      cuBLAS addmm (fp32 sum of the chunk, one rounding)

Three GEMM-equivalents (`fused_forward`) when the coefficients of a chunk follow from its own
rows (a token-local loss, SPEC section 14): the gradient is complete when the forward returns.
Otherwise the contract's `forward` (GEMM + stats) and `backward` (GEMM + dz + the two gradient
GEMMs, with the forward's m, log_sum, mean_rel): four.

Why cuBLAS and fp32 chunks (docs/fused_linear.md): cuBLAS with fp32 output runs the product at
688 TFLOP/s on the H200, 3% slower than with bf16 output, and 1.4e-6 from float64; our tl.dot tiles
ran the same products at ~380 TFLOP/s. The price is memory traffic over each chunk: the GEMM writes
it (4 B per logit), the stats read it (4), dz reads it and writes 2: about 3 ms at 8,192 x 151,936
on the H200, against ~44 ms of GEMMs.

dz in place (LinearConfig.inplace_dz): row r of dz, 16-bit, takes the first half of the bytes of
row r of x. The dz kernel's program for row r walks its columns in increasing blocks; block
[b, b + B) writes the bytes of x's columns [b/2, (b + B)/2), all of which lie at or before the block
just read. A barrier after each block's load (bar.sync, which orders the plain loads before it;
the AOT test checks there are no asynchronous copies, which it would not order) makes every warp's
reads of block 0 happen before any warp's writes into it; a later block writes only into blocks
whose reads every warp finished before its own earlier stores, and so before this barrier. The
(n, V) dz view then has row stride 2V, which cuBLAS takes as its leading dimension. This halves
the chunk memory for the same chunk size, and the chunk size sets the accuracy of grad_weight (next).

grad_weight is accumulated in its own dtype: each chunk adds its fp32 product to the bf16 sum
and rounds once. Over K chunks that adds K roundings of a growing sum: relative error vs float64
2.4e-3 (K = 1) -> 3.9e-3 (K = 8) -> 4.4e-3 (K = 11) -> 5.0e-3 (K = 16) (measured on the CPU,
docs/fused_linear.md). An fp32 accumulator would keep 2.4e-3 but costs 4 V H bytes (2.5 GB for
Qwen's head), five times the memory budget; so the default chunk is the largest that fits
MEMORY_BUDGET, which at 8,192 x 151,936 is 768 rows, K = 11.

Inactive rows (mask 0) are not read by the row kernels, get dz = 0 and so a zero grad_hidden row;
their hidden rows still enter the products (they must be finite, as a model's hidden states are).
Bitwise reproducible: no atomics, every sum in a fixed order.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..sweep.triton import expm1, inv_temperature_of, online_softmax_step, row_args

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Extra memory the chunk may take by default (the fp32 logits chunk; dz lives inside it).
MEMORY_BUDGET = 480 * 2**20
# Rows per chunk: a multiple of ROW_QUANTUM, at least MIN_CHUNK_ROWS (smaller products lose the
# tensor cores' efficiency), at most MAX_CHUNK_ROWS (more rows buy nothing once the GEMMs are large).
ROW_QUANTUM = 128
MIN_CHUNK_ROWS = 256
MAX_CHUNK_ROWS = 4096

# Values that change per chunk or per batch: never specialised, so one compiled kernel serves all.
_RUNTIME_INTS = ["vocab_start"]
_PER_ROW_POINTERS = ["ids_ptr", "active_ptr", "temperature_ptr", "out0_ptr", "out1_ptr", "out2_ptr", "out3_ptr",
                     "out4_ptr", "m_ptr", "log_sum_ptr", "mean_rel_ptr", "c_ptr", "e_ptr"]


@triton.jit
def _row_setup(row, active_ptr, temperature_ptr, inv_temperature,
               HAS_ACTIVE: tl.constexpr, PER_ROW_TEMPERATURE: tl.constexpr):
    """(active as 0 or 1, 1 / temperature of the row; NaN for a temperature <= 0 or not finite)."""
    active = 1
    if HAS_ACTIVE:
        active = tl.load(active_ptr + row).to(tl.int32)
    inv_t = inv_temperature
    if PER_ROW_TEMPERATURE:
        inv_t = inv_temperature_of(tl.load(temperature_ptr + row))
    return active, inv_t


@triton.jit
def _logit(x_ptr, bias_ptr, cols, read, inv_t, HAS_BIAS: tl.constexpr):
    """z = (x[cols] + bias[cols]) * inv_t in fp32; -inf where not `read`."""
    x = tl.load(x_ptr + cols, mask=read, other=-float("inf"))
    if HAS_BIAS:
        x += tl.load(bias_ptr + cols, mask=read, other=0.0).to(tl.float32)
    return x * inv_t


@triton.jit(do_not_specialize=_RUNTIME_INTS, do_not_specialize_on_alignment=_PER_ROW_POINTERS)
def _chunk_stats_kernel(
    x_ptr, bias_ptr, ids_ptr, active_ptr, temperature_ptr, out0_ptr, out1_ptr, out2_ptr, out3_ptr, out4_ptr,
    V, stride_x, vocab_start, inv_temperature,
    HAS_BIAS: tl.constexpr, HAS_ACTIVE: tl.constexpr, PER_ROW_TEMPERATURE: tl.constexpr, PARTIAL: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Reads x[row, :V] fp32 (active rows only), bias, ids, active, temperature [row]; writes fp32
    [row]: out0..4 = logprob, entropy, m, log s, u/s; PARTIAL: out0..3 = m, s, u, z_y (as the logits
    sweep, grpo_kernels/sweep/triton.py). Inactive rows give zeros."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    active, inv_t = _row_setup(row, active_ptr, temperature_ptr, inv_temperature, HAS_ACTIVE, PER_ROW_TEMPERATURE)
    cols = tl.arange(0, BLOCK_V)
    m = -float("inf")
    s = 0.0
    u = 0.0
    for start in range(0, V * active, BLOCK_V):  # no read for an inactive row
        z = _logit(x_row, bias_ptr, start + cols, start + cols < V, inv_t, HAS_BIAS)
        m, s, u = online_softmax_step(m, s, u, z, 0)
    y = tl.load(ids_ptr + row).to(tl.int64) - vocab_start
    owned = (y >= 0) & (y < V) & (active != 0)
    z_y = _logit(x_row, bias_ptr, y, owned, inv_t, HAS_BIAS)
    z_y = tl.where(owned, z_y, 0.0)
    on = active != 0
    if PARTIAL:
        tl.store(out0_ptr + row, tl.where(on, m, 0.0))
        tl.store(out1_ptr + row, tl.where(on, s, 0.0))
        tl.store(out2_ptr + row, tl.where(on, u, 0.0))
        tl.store(out3_ptr + row, z_y)
    else:
        log_s = tl.log(s)
        mean_rel = u / s
        logprob = tl.where(owned, (z_y - m) - log_s, float("nan"))
        tl.store(out0_ptr + row, tl.where(on, logprob, 0.0))
        tl.store(out1_ptr + row, tl.where(on, log_s - mean_rel, 0.0))
        tl.store(out2_ptr + row, tl.where(on, m, 0.0))
        tl.store(out3_ptr + row, tl.where(on, log_s, 0.0))
        tl.store(out4_ptr + row, tl.where(on, mean_rel, 0.0))


@triton.jit(do_not_specialize=_RUNTIME_INTS, do_not_specialize_on_alignment=_PER_ROW_POINTERS)
def _chunk_dz_kernel(
    x_ptr, dz_ptr, bias_ptr, ids_ptr, active_ptr, temperature_ptr, m_ptr, log_sum_ptr, mean_rel_ptr, c_ptr, e_ptr,
    V, stride_x, stride_dz, vocab_start, inv_temperature,
    HAS_BIAS: tl.constexpr, HAS_ACTIVE: tl.constexpr, PER_ROW_TEMPERATURE: tl.constexpr, HAS_E: tl.constexpr,
    IN_PLACE: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Reads x[row, :V] fp32 (active rows only), bias, ids, active, temperature, m, log s, u/s,
    c = dL/dlogprob and e = dL/dentropy [row]; writes dz[row, :V] = dL/d(hidden @ W.T + b) in dz's
    dtype (zeros for an inactive row). With IN_PLACE dz[row] occupies the first bytes of x[row]:
    a barrier after each block's load orders every read of the block before any write
    (module docstring)."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    dz_row = dz_ptr + row * stride_dz
    active, inv_t = _row_setup(row, active_ptr, temperature_ptr, inv_temperature, HAS_ACTIVE, PER_ROW_TEMPERATURE)
    on = active != 0
    cols = tl.arange(0, BLOCK_V)
    y = tl.load(ids_ptr + row).to(tl.int64) - vocab_start
    m = tl.load(m_ptr + row)
    log_s = tl.load(log_sum_ptr + row)
    # The 1/temperature of dz/d(pre-temperature logits) folds into the per-row coefficients.
    c = tl.load(c_ptr + row) * inv_t
    if HAS_E:
        e = tl.load(e_ptr + row) * inv_t
        mean_rel = tl.load(mean_rel_ptr + row)
    owned = (y >= 0) & (y < V) & on
    # c (onehot - p) at the target is -c expm1(log p_y), once per row: exact for a confident token.
    target = -c * expm1((_logit(x_row, bias_ptr, y, owned, inv_t, HAS_BIAS) - m) - log_s)
    for start in range(0, V, BLOCK_V):
        in_row = start + cols < V
        z = _logit(x_row, bias_ptr, start + cols, start + cols < V * active, inv_t, HAS_BIAS)
        if IN_PLACE:
            tl.debug_barrier()
        z_rel = z - m
        p = tl.exp(z_rel - log_s)
        g = tl.where(start + cols == y, target, -c * p)
        if HAS_E:
            # dH/dz = p (E_p[z] - z); where p is 0 (a -inf logit) the term is 0, not 0 * inf.
            g += e * p * tl.where(p > 0.0, mean_rel - z_rel, 0.0)
        g = tl.where(on, g, 0.0)
        tl.store(dz_row + start + cols, g.to(dz_ptr.dtype.element_ty), mask=in_row)


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LinearConfig:
    """chunk_rows: tokens per chunk (the fp32 chunk is chunk_rows x V x 4 bytes);
    inplace_dz: dz written into the chunk's storage (else a chunk_rows x V scratch in the inputs' dtype);
    fp32_weight_accumulator: grad_weight summed over the chunks in fp32 (4 V H bytes more; for
    measurements) instead of in its own dtype; block_v, num_warps: the row kernels' block."""

    chunk_rows: int
    inplace_dz: bool = True
    fp32_weight_accumulator: bool = False
    block_v: int = 4096
    num_warps: int = 8

    def __post_init__(self) -> None:
        if self.chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {self.chunk_rows}")
        if self.block_v < 16 or self.block_v & (self.block_v - 1):
            raise ValueError(f"block_v must be a power of two >= 16, got {self.block_v}")


def default_chunk_rows(V: int, budget: int = MEMORY_BUDGET) -> int:
    """The most rows whose fp32 chunk fits `budget`, in multiples of ROW_QUANTUM, within
    [MIN_CHUNK_ROWS, MAX_CHUNK_ROWS]: 768 at V = 151,936. Depends on V only, not on the batch (cuBLAS
    may still pick another algorithm for a shorter last chunk, so a token's log-prob is not promised
    bitwise the same in every batch, as it was with our own tl.dot tiles)."""
    rows = budget // (4 * max(V, 1)) // ROW_QUANTUM * ROW_QUANTUM
    return max(MIN_CHUNK_ROWS, min(MAX_CHUNK_ROWS, rows))


def default_config(N: int, V: int, H: int, dtype: torch.dtype) -> LinearConfig:
    block_v = min(triton.next_power_of_2(max(V, 16)), 4096)
    return LinearConfig(chunk_rows=default_chunk_rows(V), block_v=block_v, num_warps=8 if block_v >= 2048 else 4)


# ----------------------------------------------------------------------------------------------
# Launches (each returns (kernel, grid, args, meta); tests compile them ahead of time)
# ----------------------------------------------------------------------------------------------

def stats_launch(x, bias, ids, temperature, active, outs, config: LinearConfig, vocab_start=0, partial=False):
    """The stats kernel over the rows of x (n, V) fp32; ids, temperature (if per row), active and
    the outputs are this chunk's (n,) slices."""
    n, V = x.shape
    temp_arg, active_arg, inv, flags = row_args(ids, temperature, active)
    outs = list(outs) + [outs[0]] * (5 - len(outs))
    args = (x, x if bias is None else bias, ids, active_arg, temp_arg, *outs, V, x.stride(0), vocab_start, inv)
    meta = dict(HAS_BIAS=bias is not None, PARTIAL=partial, BLOCK_V=config.block_v, num_warps=config.num_warps,
                **flags)
    return _chunk_stats_kernel, (n,), args, meta


def dz_launch(x, dz, bias, ids, temperature, active, m, log_sum, mean_rel, c, e, config: LinearConfig,
              vocab_start=0):
    """The dz kernel: x (n, V) fp32 -> dz (n, V) (a view of x's storage when in place)."""
    n, V = x.shape
    temp_arg, active_arg, inv, flags = row_args(ids, temperature, active)
    in_place = dz.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
    args = (x, dz, x if bias is None else bias, ids, active_arg, temp_arg, m, log_sum, mean_rel, c,
            c if e is None else e, V, x.stride(0), dz.stride(0), vocab_start, inv)
    meta = dict(HAS_BIAS=bias is not None, HAS_E=e is not None, IN_PLACE=in_place, BLOCK_V=config.block_v,
                num_warps=config.num_warps, **flags)
    return _chunk_dz_kernel, (n,), args, meta


# ----------------------------------------------------------------------------------------------
# The products: cuBLAS on CUDA; on the CPU (Triton's interpreter, tests) the same fp32 arithmetic
# ----------------------------------------------------------------------------------------------

# Whether torch.mm(..., out_dtype=torch.float32, out=...) exists here (torch's aten::mm.dtype_out).
_MM_DTYPE_OUT = True


def _on_cuda(t: torch.Tensor) -> bool:
    return t.device.type == "cuda"


def _logits_gemm(h: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, w32: torch.Tensor | None) -> None:
    """out (n, V) fp32 = h @ weight.T with fp32 accumulation and output (cuBLAS: 16-bit inputs, fp32
    output; never rounded to 16 bits). w32: the fp32 weight for the CPU path."""
    global _MM_DTYPE_OUT
    if h.dtype == torch.float32:
        torch.mm(h, weight.T, out=out)
    elif _on_cuda(h):
        if _MM_DTYPE_OUT:
            try:
                torch.mm(h, weight.T, out_dtype=torch.float32, out=out)
                return
            except (RuntimeError, TypeError):  # a torch without the out= form: a temporary instead
                _MM_DTYPE_OUT = False
        out.copy_(torch.mm(h, weight.T, out_dtype=torch.float32))
    else:  # products of 16-bit values are exact in fp32: the same arithmetic as cuBLAS's
        torch.mm(h.float(), w32.T, out=out)


def _dz_gemm(dz: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, w32: torch.Tensor | None) -> None:
    """out (n, H) = dz @ weight, fp32 accumulation over the vocabulary, one rounding to out's dtype."""
    if _on_cuda(dz) or dz.dtype == torch.float32:
        torch.mm(dz, weight, out=out)
    else:
        out.copy_(dz.float() @ w32)


def _weight_update(acc: torch.Tensor, dz: torch.Tensor, h: torch.Tensor, first: bool) -> None:
    """acc (V, H) (+)= dz.T @ h: the chunk's product in fp32, added to acc and rounded once to
    acc's dtype (cuBLAS's beta = 1)."""
    if _on_cuda(dz) and acc.dtype == dz.dtype:
        if first:
            torch.mm(dz.T, h, out=acc)
        else:
            acc.addmm_(dz.T, h)
    elif _on_cuda(dz):  # an fp32 accumulator of 16-bit products
        if first:
            torch.mm(dz.T, h, out_dtype=torch.float32, out=acc)
        else:
            torch.addmm(acc, dz.T, h, out_dtype=torch.float32, out=acc)
    else:
        part = dz.float().T @ h.float()
        acc.copy_(part if first else acc.float() + part)


# ----------------------------------------------------------------------------------------------
# The chunk loop
# ----------------------------------------------------------------------------------------------

def _check_supported(hidden: torch.Tensor, weight: torch.Tensor) -> None:
    if hidden.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"backend='triton' takes float32, bfloat16 or float16 hidden states, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"lm_head_weight ({weight.dtype}) must have the hidden states' dtype ({hidden.dtype})")
    if weight.stride(1) != 1 or hidden.stride(1) != 1:
        raise ValueError("hidden and lm_head_weight must be contiguous along the hidden dimension")


class _Chunks:
    """One fp32 chunk buffer and the row kernels over it, for a call's hidden, weight and rows."""

    def __init__(self, hidden, weight, bias, ids, temperature, active, config: LinearConfig | None, vocab_start):
        _check_supported(hidden, weight)
        N, H = hidden.shape
        V = weight.shape[0]
        self.config = config or default_config(N, V, H, hidden.dtype)
        self.hidden, self.weight, self.bias, self.vocab_start = hidden, weight, bias, vocab_start
        self.ids, self.temperature, self.active = ids.contiguous(), temperature, active
        self.N, self.V = N, V
        rows = min(self.config.chunk_rows, max(N, 1))
        self.x = torch.empty((rows, V), dtype=torch.float32, device=hidden.device)
        self.scratch = None
        if not self.config.inplace_dz:
            self.scratch = torch.empty((rows, V), dtype=hidden.dtype, device=hidden.device)
        self.w32 = None if _on_cuda(hidden) or hidden.dtype == torch.float32 else weight.float()

    def ranges(self):
        n = self.config.chunk_rows
        for r0 in range(0, self.N, n):
            yield r0, min(r0 + n, self.N)

    def _rows(self, r0, r1):
        t = self.temperature
        return (self.ids[r0:r1], t[r0:r1] if isinstance(t, torch.Tensor) else t,
                None if self.active is None else self.active[r0:r1])

    def logits(self, r0, r1) -> torch.Tensor:
        x = self.x[: r1 - r0]
        _logits_gemm(self.hidden[r0:r1], self.weight, x, self.w32)
        return x

    def stats(self, x, r0, r1, outs, partial=False) -> None:
        ids, t, active = self._rows(r0, r1)
        kernel, grid, args, meta = stats_launch(x, self.bias, ids, t, active, [o[r0:r1] for o in outs], self.config,
                                                self.vocab_start, partial)
        kernel[grid](*args, **meta)

    def dz(self, x, r0, r1, m, log_sum, mean_rel, c, e) -> torch.Tensor:
        n = r1 - r0
        if self.config.inplace_dz:
            dz = x.view(self.hidden.dtype)[:, : self.V] if x.dtype != self.hidden.dtype else x
        else:
            dz = self.scratch[:n]
        ids, t, active = self._rows(r0, r1)
        kernel, grid, args, meta = dz_launch(x, dz, self.bias, ids, t, active, m, log_sum, mean_rel, c, e,
                                             self.config, self.vocab_start)
        kernel[grid](*args, **meta)
        return dz


class _Grads:
    """grad_hidden, grad_weight and grad_bias being accumulated chunk by chunk."""

    def __init__(self, chunks: _Chunks, needs_grad):
        hidden, weight, bias = chunks.hidden, chunks.weight, chunks.bias
        needs_hidden, needs_weight, needs_bias = needs_grad
        device = hidden.device
        self.chunks = chunks
        self.hidden = torch.empty_like(hidden) if needs_hidden else None
        self.weight = torch.empty_like(weight) if needs_weight else None
        self.acc = self.weight
        if self.weight is not None and chunks.config.fp32_weight_accumulator and weight.dtype != torch.float32:
            self.acc = torch.empty(weight.shape, dtype=torch.float32, device=device)
        self.bias = torch.zeros(bias.shape, dtype=torch.float32, device=device) if needs_bias and bias is not None \
            else None
        self.first = True

    @property
    def any(self) -> bool:
        return self.hidden is not None or self.weight is not None or self.bias is not None

    def add(self, dz, r0, r1) -> None:
        c = self.chunks
        if self.hidden is not None:
            _dz_gemm(dz, c.weight, self.hidden[r0:r1], c.w32)
        if self.acc is not None:
            _weight_update(self.acc, dz, c.hidden[r0:r1], self.first)
        if self.bias is not None:
            self.bias += dz.sum(0, dtype=torch.float32)
        self.first = False

    def result(self, bias_like):
        if self.first:  # no rows: zero gradients
            for g in (self.hidden, self.acc):
                if g is not None:
                    g.zero_()
        weight = self.weight
        if weight is not None and self.acc is not weight:
            weight.copy_(self.acc)
        bias = None if self.bias is None else self.bias.to(bias_like.dtype)
        return self.hidden, weight, bias


def _stat_outputs(N, device, count):
    return tuple(torch.empty(N, dtype=torch.float32, device=device) for _ in range(count))


# ----------------------------------------------------------------------------------------------
# The backend contract (docs/design.md) and the three-GEMM forward
# ----------------------------------------------------------------------------------------------

def forward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, ids: torch.Tensor,
            temperature, active: torch.Tensor | None = None, vocab_start: int = 0, partial: bool = False, *,
            config: LinearConfig | None = None):
    """hidden (N, H), weight (V, H), bias (V,) | None, ids (N,) -> the five (N,) fp32 numbers of the
    sweep contract, or with partial this shard's (m, s, u, z_y). One fp32 GEMM + one row pass per chunk."""
    chunks = _Chunks(hidden, weight, bias, ids, temperature, active, config, vocab_start)
    outs = _stat_outputs(chunks.N, hidden.device, 4 if partial else 5)
    with torch.autocast(hidden.device.type, enabled=False):
        for r0, r1 in chunks.ranges():
            chunks.stats(chunks.logits(r0, r1), r0, r1, outs, partial)
    return outs


def backward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, ids: torch.Tensor,
             temperature, active: torch.Tensor | None, m: torch.Tensor, log_sum: torch.Tensor,
             mean_rel: torch.Tensor, grad_logprobs: torch.Tensor | None, grad_entropy: torch.Tensor | None, *,
             needs_grad: tuple[bool, bool, bool] = (True, True, True), vocab_start: int = 0,
             config: LinearConfig | None = None):
    """-> (grad_hidden, grad_weight, grad_bias) in their inputs' dtypes (None where not needed): the
    logits recomputed per chunk (the fourth GEMM-equivalent), then dz and the two gradient products."""
    chunks = _Chunks(hidden, weight, bias, ids, temperature, active, config, vocab_start)
    grads = _Grads(chunks, needs_grad)
    if grads.any and chunks.N > 0:
        # The (N,) upstream gradients may arrive expanded or in float64: plain fp32 rows.
        c = torch.zeros_like(m) if grad_logprobs is None else grad_logprobs.float().contiguous()
        e = None if grad_entropy is None else grad_entropy.float().contiguous()
        m, log_sum, mean_rel = (t.float().contiguous() for t in (m, log_sum, mean_rel))
        with torch.autocast(hidden.device.type, enabled=False):
            for r0, r1 in chunks.ranges():
                x = chunks.logits(r0, r1)
                dz = chunks.dz(x, r0, r1, m[r0:r1], log_sum[r0:r1], mean_rel[r0:r1], c[r0:r1],
                               None if e is None else e[r0:r1])
                grads.add(dz, r0, r1)
    return grads.result(bias)


def fused_forward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, ids: torch.Tensor,
                  temperature, active: torch.Tensor | None, coefficients, *,
                  needs_grad: tuple[bool, bool, bool] = (True, True, True), config: LinearConfig | None = None):
    """Three GEMM-equivalents for a token-local loss: per chunk of rows [r0, r1), the fp32 logits,
    their statistics, `coefficients(r0, logprobs[r0:r1], entropy[r0:r1]) -> (c, e)` (dL/dlogprob and
    dL/dentropy of those rows, e may be None), dz and both gradient products.

    Returns (logprobs, entropy, grad_hidden, grad_weight, grad_bias): the gradients are complete,
    for the upstream gradient the coefficients assumed (None where not needed). The callback is
    called once per chunk, in row order, also when no gradient is needed."""
    chunks = _Chunks(hidden, weight, bias, ids, temperature, active, config, 0)
    grads = _Grads(chunks, needs_grad)
    logprobs, entropy, m, log_sum, mean_rel = outs = _stat_outputs(chunks.N, hidden.device, 5)
    with torch.autocast(hidden.device.type, enabled=False):
        for r0, r1 in chunks.ranges():
            x = chunks.logits(r0, r1)
            chunks.stats(x, r0, r1, outs)
            c, e = coefficients(r0, logprobs[r0:r1], entropy[r0:r1])
            if grads.any:
                dz = chunks.dz(x, r0, r1, m[r0:r1], log_sum[r0:r1], mean_rel[r0:r1], c.float().contiguous(),
                               None if e is None else e.float().contiguous())
                grads.add(dz, r0, r1)
    return (logprobs, entropy, *grads.result(bias))
