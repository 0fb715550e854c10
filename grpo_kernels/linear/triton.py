"""The fused-linear vocabulary sweep in Triton: log pi(y) and entropy from hidden states and
the output projection, and their gradient, without materialising the (N, V) logits.

With z = (hidden @ weight.T + bias) / temperature, p = softmax(z), y = ids:

  forward   `_linear_fwd_kernel`, one program per (token tile, vocabulary chunk): computes
            the logits tiles of its chunk on the tensor cores (fp32 accumulation) and folds
            them into online softmax statistics per row (max m, sum exp(z - m), sum
            exp(z - m)(z - m), target logit). `merge_chunks` merges the chunks in a fixed
            order and stats.finish gives the five numbers of the sweep contract
            (logprobs = (z_y - m) - log_sum, entropy, m, log_sum, mean_rel; docs/design.md).

  backward  the vocabulary is swept in chunks of `vocab_chunk` columns, three kernels each:
            `_linear_dz_kernel`           recomputes the chunk's logits tile by tile and writes
                                          dz = (c (onehot(y) - p) + e p (mean_rel - (z - m))) / T into a
                                          (N, vocab_chunk) scratch (+ fp32 column sums for the bias);
            `_linear_grad_hidden_kernel`  grad_hidden += dz @ W[chunk], into ONE fp32 running sum
                                          across all chunks (written in the input dtype after the last);
            `_linear_grad_weight_kernel`  grad_weight[chunk] = dz.T @ hidden, the whole token sum
                                          in one fp32 accumulator.

Why chunks in the backward: an output row of grad_hidden is H wide (4,096 for an 8B model),
too wide to stay on chip while a program sweeps the vocabulary, and keeping it in global
memory costs a read-modify-write of BLOCK_N x H fp32 per 128 vocabulary columns. Writing dz
for a chunk of vocab_chunk ~ H columns instead costs N x vocab_chunk (the size of the hidden
states, independent of V) and turns both gradients into plain GEMMs with full tiles and full
occupancy, each reduction owned by one program: no atomics, bitwise reproducible.

Peak extra memory: dz (N x vocab_chunk, input dtype) + the fp32 grad_hidden sum (N x H)
+ the chunk statistics (4 x V/vocab_chunk x N fp32): O(N * H), independent of N * V.

Rules as for the logits sweep (SPEC section 3): int64 offsets, fp32 accumulation, no atomics,
and every size that changes per batch (N, chunk bounds) and the temperature are runtime
arguments that never specialise; only dtypes, tile sizes and flags that remove work are
compile-time. fp32 inputs use IEEE fp32 dots (torch's default matmul precision), 16-bit
inputs the tensor cores.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..stats import finish
from ..sweep.triton import expm1, inv_temperature_of, online_softmax_step, row_args
from .pytorch import merge_chunks, vocab_chunks

# The token count varies per batch: never specialised, so a new N reuses the compiled kernel.
# The chunk bounds that the backward passes (v_begin, chunk_width) are multiples of the vocabulary
# tile, so they always specialise the same way ("divisible by 16") and keep the loads and
# stores of dz vectorised; V and H are fixed per model.
_RUNTIME_INTS = ["N", "vocab_start"]
_PER_ROW_POINTERS = ["ids_ptr", "active_ptr", "temperature_ptr"]


@triton.jit
def _tile_rows(rows, N, active_ptr, temperature_ptr, inv_temperature,
               HAS_ACTIVE: tl.constexpr, PER_ROW_TEMPERATURE: tl.constexpr):
    """(row_ok, inv_t) of a token tile: rows < N and active (an inactive row is read as zeros and
    adds nothing), and 1 / temperature as a scalar or per row (BLOCK_N, 1), NaN where a per-row
    temperature is <= 0 or not finite."""
    row_ok = rows < N
    if HAS_ACTIVE:
        row_ok = row_ok & (tl.load(active_ptr + rows, mask=rows < N, other=0) != 0)
    if PER_ROW_TEMPERATURE:
        inv_t = inv_temperature_of(tl.load(temperature_ptr + rows, mask=rows < N, other=1.0))[:, None]
    else:
        inv_t = inv_temperature
    return row_ok, inv_t


@triton.jit
def _tile_coords(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program `pid` in grouped order (Triton's matmul tutorial): GROUP_M row
    tiles sweep the column tiles together, so the operands they share are served from L2."""
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m
    return pid_m, pid_n


@triton.jit
def _logits_tile(
    hidden_ptr, weight_ptr, bias_ptr, rows, row_ok, cols, V, H,
    stride_hn, stride_hh, stride_wv, stride_wh, inv_t,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """z = (hidden[rows] @ weight[cols].T + bias[cols]) * inv_t, a (BLOCK_N, BLOCK_V) fp32 tile.
    Columns >= V are -inf, so they drop out of every softmax sum; rows not row_ok (past N, or
    inactive) read zeros and their results are never used."""
    col_ok = cols < V
    ks = tl.arange(0, BLOCK_H)
    h_ptrs = hidden_ptr + rows[:, None] * stride_hn + ks[None, :] * stride_hh  # (BLOCK_N, BLOCK_H)
    w_ptrs = weight_ptr + ks[:, None] * stride_wh + cols[None, :] * stride_wv  # (BLOCK_H, BLOCK_V) = W^T
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k in range(0, H, BLOCK_H):
        k_ok = ks < H - k
        a = tl.load(h_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        h_ptrs += BLOCK_H * stride_hh
        w_ptrs += BLOCK_H * stride_wh
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return tl.where(col_ok[None, :], acc * inv_t, -float("inf"))


@triton.jit(do_not_specialize=_RUNTIME_INTS, do_not_specialize_on_alignment=_PER_ROW_POINTERS)
def _linear_fwd_kernel(
    hidden_ptr, weight_ptr, bias_ptr, ids_ptr, active_ptr, temperature_ptr, stats_ptr,
    N, V, H, stride_hn, stride_hh, stride_wv, stride_wh, vocab_start, inv_temperature,
    HAS_BIAS: tl.constexpr, HAS_ACTIVE: tl.constexpr, PER_ROW_TEMPERATURE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    VOCAB_CHUNK: tl.constexpr, GROUP_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Reads hidden[rows], ids[rows] and weight, bias over one vocabulary chunk, for one token
    tile; writes that chunk's statistics of each row to stats (4, num_chunks, N) fp32:
    m = max z, s = sum exp(z - m), u = sum exp(z - m)(z - m), and z_y (0 when y is not in
    the chunk; y is ids - vocab_start). merge_chunks merges the chunks."""
    num_chunks = tl.cdiv(V, VOCAB_CHUNK)
    pid_n, chunk = _tile_coords(tl.program_id(0), tl.cdiv(N, BLOCK_N), num_chunks, GROUP_N)
    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, inv_t = _tile_rows(rows, N, active_ptr, temperature_ptr, inv_temperature, HAS_ACTIVE,
                               PER_ROW_TEMPERATURE)
    y = tl.load(ids_ptr + rows, mask=rows < N, other=-1).to(tl.int64) - vocab_start

    m = tl.full((BLOCK_N,), -float("inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    u = tl.zeros((BLOCK_N,), dtype=tl.float32)
    z_y = tl.zeros((BLOCK_N,), dtype=tl.float32)
    v_begin = chunk.to(tl.int64) * VOCAB_CHUNK
    v_end = tl.minimum(v_begin + VOCAB_CHUNK, V)
    for v in range(v_begin, v_end, BLOCK_V):
        cols = v + tl.arange(0, BLOCK_V)
        z = _logits_tile(hidden_ptr, weight_ptr, bias_ptr, rows, row_ok, cols, v_end, H,
                         stride_hn, stride_hh, stride_wv, stride_wh, inv_t,
                         HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION)
        m, s, u = online_softmax_step(m, s, u, z, 1)
        # The target logit from the very tile the statistics saw, so logprob and p_y agree.
        # (A target in the -inf tail of the last tile is not owned: the caller masks it, so no
        # extra column test here, which would spill the 16-bit tile on sm_80.)
        z_y += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), axis=1)

    # V (and so num_chunks) may be a compile-time 1; N never is.
    plane = N.to(tl.int64) * num_chunks
    out = stats_ptr + chunk * N.to(tl.int64) + rows
    row_ok = rows < N
    tl.store(out, m, mask=row_ok)
    tl.store(out + plane, s, mask=row_ok)
    tl.store(out + 2 * plane, u, mask=row_ok)
    tl.store(out + 3 * plane, z_y, mask=row_ok)


@triton.jit(do_not_specialize=_RUNTIME_INTS, do_not_specialize_on_alignment=_PER_ROW_POINTERS)
def _linear_dz_kernel(
    hidden_ptr, weight_ptr, bias_ptr, ids_ptr, active_ptr, temperature_ptr, m_ptr, log_sum_ptr, mean_rel_ptr,
    grad_logprobs_ptr, grad_entropy_ptr, dz_ptr, bias_partial_ptr,
    N, V, H, v_begin, chunk_width, stride_hn, stride_hh, stride_wv, stride_wh, stride_dzn, stride_bpn, vocab_start,
    inv_temperature,
    HAS_BIAS: tl.constexpr, BIAS_GRAD: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr,
    HAS_ACTIVE: tl.constexpr, PER_ROW_TEMPERATURE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, GROUP_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Reads hidden[rows], weight and bias over columns [v_begin, v_begin + chunk_width), and
    ids, active, temperature, m, log_sum, mean_rel and the upstream gradients [rows]; writes,
    for one (token, column) tile,
    dz[rows, col - v_begin] = dL/d(hidden @ W.T + b) in dz's dtype and, with BIAS_GRAD, the
    tile's fp32 column sums to bias_partial[token tile, col - v_begin]. chunk_width is a whole
    number of tiles; columns >= V get dz = 0 (p = 0 there and no target), so the consumers
    read whole tiles. Rows past N or inactive get dz = 0."""
    num_n = tl.cdiv(N, BLOCK_N)
    pid_n, pid_v = _tile_coords(tl.program_id(0), num_n, tl.cdiv(chunk_width, BLOCK_V), GROUP_N)
    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    local = pid_v.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    cols = v_begin + local
    row_ok, inv_t = _tile_rows(rows, N, active_ptr, temperature_ptr, inv_temperature, HAS_ACTIVE,
                               PER_ROW_TEMPERATURE)
    col_ok = local < chunk_width

    z = _logits_tile(hidden_ptr, weight_ptr, bias_ptr, rows, row_ok, cols, V, H,
                     stride_hn, stride_hh, stride_wv, stride_wh, inv_t,
                     HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION)
    y = tl.load(ids_ptr + rows, mask=row_ok, other=-1).to(tl.int64) - vocab_start
    m = tl.load(m_ptr + rows, mask=row_ok, other=0.0)
    log_s = tl.load(log_sum_ptr + rows, mask=row_ok, other=0.0)
    # The 1/temperature of dz/d(pre-temperature logits) folds into the per-row coefficients.
    c = tl.load(grad_logprobs_ptr + rows, mask=row_ok, other=0.0)[:, None] * inv_t
    z_rel = z - m[:, None]
    logp = z_rel - log_s[:, None]
    p = tl.exp(logp)
    # c (onehot - p): at the target -c expm1(log p_y), one value per row (for a confident token
    # p_y is 1 to within eps, and 1 - p_y as a difference would lose it all).
    is_y = cols[None, :] == y[:, None]
    logp_y = tl.sum(tl.where(is_y, logp, 0.0), axis=1)
    dz = tl.where(is_y, -c * expm1(logp_y)[:, None], -c * p)
    if HAS_GRAD_ENTROPY:
        e = tl.load(grad_entropy_ptr + rows, mask=row_ok, other=0.0)[:, None] * inv_t
        mean_rel = tl.load(mean_rel_ptr + rows, mask=row_ok, other=0.0)
        # dH/dz = p (E_p[z] - z); where p underflows to 0 the term is 0, not 0 * inf.
        dz += e * p * tl.where(p > 0.0, mean_rel[:, None] - z_rel, 0.0)
    # Rows past N or inactive must add nothing to the bias sums.
    dz = tl.where(row_ok[:, None], dz, 0.0)
    tl.store(dz_ptr + rows[:, None] * stride_dzn + local[None, :], dz.to(dz_ptr.dtype.element_ty),
             mask=(rows < N)[:, None] & col_ok[None, :])
    if BIAS_GRAD:
        # Column sums of the fp32 dz (not of its rounded copy); summed over token tiles later.
        tl.store(bias_partial_ptr + pid_n.to(tl.int64) * stride_bpn + local, tl.sum(dz, axis=0), mask=col_ok)


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _linear_grad_hidden_kernel(
    dz_ptr, weight_ptr, acc_ptr, out_ptr,
    N, V, H, v_begin, chunk_width, stride_dzn, stride_wv, stride_wh, stride_gn,
    ACCUMULATE: tl.constexpr, STORE_OUT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_V: tl.constexpr, GROUP_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """For one (token, feature) tile: acc += dz[rows, :chunk_width] @ weight[v_begin + :chunk_width, feats]
    (weight rows >= V read as 0, against dz's zero padding).

    acc (N, H) fp32 is the running sum over vocabulary chunks: read unless ACCUMULATE is off
    (first chunk), written back, or with STORE_OUT (last chunk) written to out (N, H) in
    out's dtype instead. The sum never passes through a 16-bit value."""
    num_n = tl.cdiv(N, BLOCK_N)
    pid_n, pid_h = _tile_coords(tl.program_id(0), num_n, tl.cdiv(H, BLOCK_H), GROUP_N)
    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    feats = pid_h.to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)
    row_ok = rows < N
    feat_ok = feats < H
    tile = rows[:, None] * stride_gn + feats[None, :]
    tile_ok = row_ok[:, None] & feat_ok[None, :]
    if ACCUMULATE:
        acc = tl.load(acc_ptr + tile, mask=tile_ok, other=0.0)
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_H), dtype=tl.float32)

    ks = tl.arange(0, BLOCK_V)
    dz_ptrs = dz_ptr + rows[:, None] * stride_dzn + ks[None, :]  # (BLOCK_N, BLOCK_V)
    vocab = v_begin + ks.to(tl.int64)  # int64 before the product: V * H may pass 2^31
    w_ptrs = weight_ptr + vocab[:, None] * stride_wv + feats[None, :] * stride_wh  # (BLOCK_V, BLOCK_H)
    for k in range(0, chunk_width, BLOCK_V):
        a = tl.load(dz_ptrs, mask=row_ok[:, None] & (ks < chunk_width - k)[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=(vocab < V - k)[:, None] & feat_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        dz_ptrs += BLOCK_V
        w_ptrs += BLOCK_V * stride_wv

    if STORE_OUT:
        tl.store(out_ptr + tile, acc.to(out_ptr.dtype.element_ty), mask=tile_ok)
    else:
        tl.store(acc_ptr + tile, acc, mask=tile_ok)


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _linear_grad_weight_kernel(
    dz_ptr, hidden_ptr, grad_weight_ptr,
    N, V, H, v_begin, chunk_width, stride_dzn, stride_hn, stride_hh, stride_gv,
    BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_V: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """For one (column, feature) tile of the chunk: reads dz[:, cols] and hidden[:, feats] over
    all N tokens; writes grad_weight[v_begin + cols, feats] = dz[:, cols].T @ hidden[:, feats]
    in grad_weight's dtype (rows < V). The token sum is one fp32 accumulator, owned by this program.
    Inactive tokens have dz = 0; their hidden rows are still read here (O(N * H), and a mask load
    per step spills the fp32 variant), so they must be finite, as a model's hidden states are."""
    pid_v, pid_h = _tile_coords(tl.program_id(0), tl.cdiv(chunk_width, BLOCK_V), tl.cdiv(H, BLOCK_H), GROUP_V)
    local = pid_v.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    feats = pid_h.to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_ok = local < chunk_width
    feat_ok = feats < H

    ks = tl.arange(0, BLOCK_N).to(tl.int64)
    dz_ptrs = dz_ptr + ks[None, :] * stride_dzn + local[:, None]  # (BLOCK_V, BLOCK_N) = dz^T
    h_ptrs = hidden_ptr + ks[:, None] * stride_hn + feats[None, :] * stride_hh  # (BLOCK_N, BLOCK_H)
    acc = tl.zeros((BLOCK_V, BLOCK_H), dtype=tl.float32)
    for k in range(0, N, BLOCK_N):
        k_ok = ks < N - k
        a = tl.load(dz_ptrs, mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(h_ptrs, mask=k_ok[:, None] & feat_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        dz_ptrs += BLOCK_N * stride_dzn
        h_ptrs += BLOCK_N * stride_hn

    vocab = v_begin + local
    out = grad_weight_ptr + vocab[:, None] * stride_gv + feats[None, :]
    tl.store(out, acc.to(grad_weight_ptr.dtype.element_ty), mask=(vocab < V)[:, None] & feat_ok[None, :])


# ----------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class GemmTiles:
    """Tile of one GEMM-shaped kernel: output block_m x block_n, contraction steps of block_k."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 8
    num_stages: int = 3

    def meta(self) -> dict[str, int]:
        return dict(num_warps=self.num_warps, num_stages=self.num_stages)


@dataclass(frozen=True)
class LinearConfig:
    """Tiles of the four kernels and the width of the backward's vocabulary chunks.

    logits:       tokens x vocabulary tiles, contracting the hidden size (forward and dz kernels)
    grad_hidden:  tokens x features tiles, contracting a chunk of the vocabulary
    grad_weight:  vocabulary x features tiles, contracting the tokens
    vocab_chunk:  columns per forward chunk and per backward dz scratch (N x vocab_chunk);
                  a multiple of the logits tile's vocabulary width
    group:        tiles per L2 group in the grouped launch order
    """

    logits: GemmTiles
    grad_hidden: GemmTiles
    grad_weight: GemmTiles
    vocab_chunk: int
    group: int = 8

    def __post_init__(self) -> None:
        for tiles in (self.logits, self.grad_hidden, self.grad_weight):
            # tl.dot needs every tile dimension >= 16; powers of two for tl.arange.
            for size in (tiles.block_m, tiles.block_n, tiles.block_k):
                if size < 16 or size & (size - 1):
                    raise ValueError(f"tile sizes must be powers of two >= 16, got {tiles}")
        if self.vocab_chunk <= 0 or self.vocab_chunk % self.logits.block_n:
            raise ValueError(f"vocab_chunk ({self.vocab_chunk}) must be a positive multiple of the logits "
                             f"tile's vocabulary width ({self.logits.block_n})")


def default_config(N: int, V: int, H: int, dtype: torch.dtype) -> LinearConfig:
    """Tiles by dtype; a vocabulary chunk about as wide as the hidden size, so the dz scratch
    (N x vocab_chunk) is about the size of the hidden states. Independent of N: a token's
    results never depend on the batch around it."""
    if dtype == torch.float32:  # IEEE fp32 dots run on the FMA units: the largest tile that compiles without spills
        tiles = GemmTiles(32, 64, 32, num_warps=4, num_stages=2)
    else:  # starting points for the tensor cores; tuned on the GPU
        tiles = GemmTiles(128, 128, 64, num_warps=8, num_stages=3)
    # 16-bit logits tiles of 64 vocabulary columns: 128 spill the dz tile with the entropy gradient
    # or a per-token temperature (sm_80 and sm_90, triton 3.6 and 3.9; the AOT test checks).
    logits = tiles if dtype == torch.float32 else GemmTiles(128, 64, 64, num_warps=8, num_stages=3)
    chunk = max(1024, triton.cdiv(H, 1024) * 1024)
    chunk = min(chunk, triton.cdiv(V, logits.block_n) * logits.block_n)
    return LinearConfig(logits=logits, grad_hidden=tiles, grad_weight=tiles, vocab_chunk=chunk)


def _dot_precision(dtype: torch.dtype) -> str:
    # torch computes fp32 matmuls in full precision by default; tf32 would cost ~1e-3 relative.
    return "ieee" if dtype == torch.float32 else "tf32"


def forward_launch(hidden, weight, bias, ids, temperature, active, stats, config: LinearConfig, vocab_start=0):
    """(kernel, grid, args, meta) of the forward sweep writing stats (4, num_chunks, N)."""
    N, H = hidden.shape
    V = weight.shape[0]
    t = config.logits
    grid = (triton.cdiv(N, t.block_m) * triton.cdiv(V, config.vocab_chunk),)
    temp_arg, active_arg, inv, flags = row_args(ids, temperature, active)
    args = (hidden, weight, hidden if bias is None else bias, ids, active_arg, temp_arg, stats, N, V, H,
            *hidden.stride(), *weight.stride(), vocab_start, inv)
    meta = dict(HAS_BIAS=bias is not None, BLOCK_N=t.block_m, BLOCK_V=t.block_n, BLOCK_H=t.block_k,
                VOCAB_CHUNK=config.vocab_chunk, GROUP_N=config.group, DOT_PRECISION=_dot_precision(hidden.dtype),
                **flags, **t.meta())
    return _linear_fwd_kernel, grid, args, meta


def _padded_width(V: int, v_begin: int, config: LinearConfig) -> int:
    """Columns of the chunk starting at v_begin, rounded up to whole vocabulary tiles."""
    width = min(config.vocab_chunk, V - v_begin)
    return triton.cdiv(width, config.logits.block_n) * config.logits.block_n


def dz_launch(hidden, weight, bias, ids, temperature, active, m, log_sum, mean_rel, grad_logprobs, grad_entropy, dz,
              bias_partial, v_begin: int, config: LinearConfig, vocab_start=0):
    """(kernel, grid, args, meta) writing dz[:, :chunk_width] (and bias_partial) for the chunk at v_begin."""
    N, H = hidden.shape
    V = weight.shape[0]
    chunk_width = _padded_width(V, v_begin, config)
    t = config.logits
    grid = (triton.cdiv(N, t.block_m) * triton.cdiv(chunk_width, t.block_n),)
    temp_arg, active_arg, inv, flags = row_args(ids, temperature, active)
    args = (hidden, weight, hidden if bias is None else bias, ids, active_arg, temp_arg, m, log_sum, mean_rel,
            grad_logprobs, grad_logprobs if grad_entropy is None else grad_entropy, dz,
            m if bias_partial is None else bias_partial,
            N, V, H, v_begin, chunk_width, *hidden.stride(), *weight.stride(), dz.stride(0),
            0 if bias_partial is None else bias_partial.stride(0), vocab_start, inv)
    meta = dict(HAS_BIAS=bias is not None, BIAS_GRAD=bias_partial is not None,
                HAS_GRAD_ENTROPY=grad_entropy is not None, BLOCK_N=t.block_m, BLOCK_V=t.block_n, BLOCK_H=t.block_k,
                GROUP_N=config.group, DOT_PRECISION=_dot_precision(hidden.dtype), **flags, **t.meta())
    return _linear_dz_kernel, grid, args, meta


def grad_hidden_launch(dz, weight, acc, out, v_begin: int, first: bool, last: bool, config: LinearConfig):
    """(kernel, grid, args, meta) adding dz @ weight[chunk at v_begin] to the fp32 sum acc (N, H)."""
    N, H = out.shape
    V = weight.shape[0]
    t = config.grad_hidden
    grid = (triton.cdiv(N, t.block_m) * triton.cdiv(H, t.block_n),)
    args = (dz, weight, acc, out, N, V, H, v_begin, _padded_width(V, v_begin, config), dz.stride(0),
            *weight.stride(), out.stride(0))
    meta = dict(ACCUMULATE=not first, STORE_OUT=last, BLOCK_N=t.block_m, BLOCK_H=t.block_n, BLOCK_V=t.block_k,
                GROUP_N=config.group, DOT_PRECISION=_dot_precision(dz.dtype), **t.meta())
    return _linear_grad_hidden_kernel, grid, args, meta


def grad_weight_launch(dz, hidden, grad_weight, v_begin: int, config: LinearConfig):
    """(kernel, grid, args, meta) writing the rows of grad_weight in the chunk at v_begin."""
    N, H = hidden.shape
    V = grad_weight.shape[0]
    chunk_width = _padded_width(V, v_begin, config)
    t = config.grad_weight
    grid = (triton.cdiv(chunk_width, t.block_m) * triton.cdiv(H, t.block_n),)
    args = (dz, hidden, grad_weight, N, V, H, v_begin, chunk_width, dz.stride(0), *hidden.stride(),
            grad_weight.stride(0))
    meta = dict(BLOCK_V=t.block_m, BLOCK_H=t.block_n, BLOCK_N=t.block_k, GROUP_V=config.group,
                DOT_PRECISION=_dot_precision(dz.dtype), **t.meta())
    return _linear_grad_weight_kernel, grid, args, meta


# ----------------------------------------------------------------------------------------------
# The backend contract
# ----------------------------------------------------------------------------------------------

def _check_supported(hidden: torch.Tensor, weight: torch.Tensor) -> None:
    if hidden.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"backend='triton' takes float32, bfloat16 or float16 hidden states, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"lm_head_weight ({weight.dtype}) must have the hidden states' dtype ({hidden.dtype})")
    if weight.stride(1) != 1 or hidden.stride(1) != 1:
        # Any row stride works; contiguous features are what the tensor-core loads assume.
        raise ValueError("hidden and lm_head_weight must be contiguous along the hidden dimension")


def forward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, ids: torch.Tensor,
            temperature, active: torch.Tensor | None = None, vocab_start: int = 0, partial: bool = False, *,
            config: LinearConfig | None = None):
    """hidden (N, H), weight (V, H), bias (V,) | None, ids (N,) -> the five (N,) fp32 numbers of the
    sweep contract (docs/design.md), or with partial this shard's (m, s, u, z_y)."""
    _check_supported(hidden, weight)
    N, H = hidden.shape
    V = weight.shape[0]
    config = config or default_config(N, V, H, hidden.dtype)
    ids = ids.contiguous()
    stats = torch.empty((4, triton.cdiv(V, config.vocab_chunk), N), dtype=torch.float32, device=hidden.device)
    if N > 0:
        # The forward reads inactive rows' hidden states (O(N * H); a row-mask load spills the
        # 16-bit tile on sm_80) and finish() zeroes their outputs; the backward skips them.
        kernel, grid, args, meta = forward_launch(hidden, weight, bias, ids, temperature, None, stats, config,
                                                  vocab_start)
        kernel[grid](*args, **meta)
    merged = merge_chunks(stats)
    if partial:
        return merged
    local = ids - vocab_start
    return finish(*merged, owned=(local >= 0) & (local < V), active=active)


def backward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, ids: torch.Tensor,
             temperature, active: torch.Tensor | None, m: torch.Tensor, log_sum: torch.Tensor,
             mean_rel: torch.Tensor, grad_logprobs: torch.Tensor | None, grad_entropy: torch.Tensor | None, *,
             needs_grad: tuple[bool, bool, bool] = (True, True, True), vocab_start: int = 0,
             config: LinearConfig | None = None):
    """-> (grad_hidden, grad_weight, grad_bias) in their inputs' dtypes (None where not needed)."""
    _check_supported(hidden, weight)
    N, H = hidden.shape
    V = weight.shape[0]
    config = config or default_config(N, V, H, hidden.dtype)
    device = hidden.device
    needs_hidden, needs_weight, needs_bias = needs_grad
    grad_hidden = torch.empty((N, H), dtype=hidden.dtype, device=device) if needs_hidden else None
    grad_weight = torch.empty((V, H), dtype=weight.dtype, device=device) if needs_weight else None
    grad_bias = torch.empty((V,), dtype=bias.dtype, device=device) if needs_bias and bias is not None else None
    if N == 0 or grad_hidden is grad_weight is grad_bias is None:
        for grad in (grad_hidden, grad_weight, grad_bias):
            if grad is not None:
                grad.zero_()
        return grad_hidden, grad_weight, grad_bias

    ids = ids.contiguous()
    # The (N,) upstream gradients may arrive expanded or in float64: make them plain fp32.
    grad_logprobs = torch.zeros_like(m) if grad_logprobs is None else grad_logprobs.float().contiguous()
    grad_entropy = None if grad_entropy is None else grad_entropy.float().contiguous()
    chunk = config.vocab_chunk
    # One chunk of dz, whole tiles wide (its padding columns hold zeros).
    scratch_width = _padded_width(V, 0, config)
    dz = torch.empty((N, scratch_width), dtype=hidden.dtype, device=device)
    # The fp32 running sum of grad_hidden across chunks; an fp32 output is its own accumulator,
    # and a single chunk needs none.
    acc = None
    if grad_hidden is not None:
        acc = grad_hidden if hidden.dtype == torch.float32 or V <= chunk else torch.empty(
            (N, H), dtype=torch.float32, device=device)
    bias_partial = None
    if grad_bias is not None:
        bias_partial = torch.empty((triton.cdiv(N, config.logits.block_m), scratch_width), dtype=torch.float32,
                                   device=device)

    last = triton.cdiv(V, chunk) - 1
    for i, (v_begin, v_end) in enumerate(vocab_chunks(V, chunk)):
        # Inactive rows have c = e = 0 (the loss weighs them by a zero mask), so their dz is 0
        # without a row-mask load, which spills the 16-bit dz tile on sm_80.
        kernel, grid, args, meta = dz_launch(hidden, weight, bias, ids, temperature, None, m, log_sum, mean_rel,
                                             grad_logprobs, grad_entropy, dz, bias_partial, v_begin, config,
                                             vocab_start)
        kernel[grid](*args, **meta)
        if grad_hidden is not None:
            kernel, grid, args, meta = grad_hidden_launch(dz, weight, acc, grad_hidden, v_begin, i == 0, i == last,
                                                          config)
            kernel[grid](*args, **meta)
        if grad_weight is not None:
            kernel, grid, args, meta = grad_weight_launch(dz, hidden, grad_weight, v_begin, config)
            kernel[grid](*args, **meta)
        if grad_bias is not None:
            # A fixed-order sum over token tiles of fp32 partials: deterministic.
            grad_bias[v_begin:v_end] = bias_partial[:, :v_end - v_begin].sum(0)
    return grad_hidden, grad_weight, grad_bias
