"""The fused-linear vocabulary sweep in chunked PyTorch: the CPU path and the fallback.

Same contract as grpo_kernels/triton/linear.py. With z = (hidden @ weight.T + bias) / temperature,
the (N, V) logits are never formed: the vocabulary is swept in chunks of columns, each
chunk's logits (N, chunk) are computed, reduced and dropped.

  forward   per chunk: the softmax statistics of each row relative to the chunk's max
            (m, s = sum exp(z - m), u = sum exp(z - m)(z - m), and the target logit z_y);
            `combine_chunk_stats` merges the chunks into logprobs, entropy, lse, mean_z.
  backward  per chunk, the logits once more and dz = (c (onehot(y) - p) + e p (mean_z - z)) / T;
            grad_hidden += dz @ W[chunk] (one running sum over the chunks, in the compute
            dtype), grad_weight[chunk] = dz.T @ hidden, grad_bias[chunk] = dz.sum(0).

Math runs in float32 (float64 for float64 inputs). Extra memory: the hidden states and the
running grad_hidden in the compute dtype, O(N * H), plus one chunk of logits, O(CHUNK_ELEMENTS).
"""
from __future__ import annotations

from collections.abc import Iterator

import torch

from .reference import compute_dtype

# Elements of one chunk of logits (64 MiB in fp32): wide chunks keep the two matmuls per
# chunk efficient, which matters more here than keeping a chunk in cache (torch_path).
CHUNK_ELEMENTS = 1 << 24
# Fewest columns per chunk: narrower matmuls waste more than they save.
MIN_CHUNK = 64


def vocab_chunks(V: int, chunk: int) -> Iterator[tuple[int, int]]:
    """[start, stop) column ranges of width `chunk` covering [0, V)."""
    for start in range(0, V, chunk):
        yield start, min(start + chunk, V)


def default_chunk(N: int, V: int) -> int:
    return min(V, max(MIN_CHUNK, CHUNK_ELEMENTS // max(N, 1)))


def chunk_stats(z: torch.Tensor, local_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Softmax statistics of the rows of one chunk of logits z (N, C), relative to the row max.

    `local_ids` are the targets' column indices within the chunk (outside [0, C) when the
    target lies in another chunk). Returns m, s, u, z_y, each (N,): the max, sum exp(z - m),
    sum exp(z - m)(z - m) (kept relative to m: lse - E_p[z] then never cancels two large
    numbers), and the target logit (0 when not in this chunk).
    """
    m = z.amax(-1)
    # A row of -inf gives m = -inf; shift by 0 there so that exp() sees -inf, not NaN.
    shift = torch.where(m == -float("inf"), 0.0, m).unsqueeze(-1)
    e = torch.exp(z - shift)
    s = e.sum(-1)
    u = (e * torch.where(e > 0, z - shift, 0.0)).sum(-1)  # a -inf logit adds 0, not 0 * -inf
    C = z.shape[-1]
    in_chunk = (local_ids >= 0) & (local_ids < C)
    z_y = z.gather(-1, local_ids.clamp(0, C - 1).unsqueeze(-1)).squeeze(-1)
    return m, s, u, torch.where(in_chunk, z_y, 0.0)


def combine_chunk_stats(stats: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Merge per-chunk statistics stats (4, K, N) = (m, s, u, z_y) into logprobs, entropy,
    lse and mean_z, each (N,), in stats' dtype.

    Each chunk k is rebased from its max m_k to the global max M:
    s -> exp(m_k - M) s_k and u -> exp(m_k - M) (u_k + (m_k - M) s_k). The sums over K run in
    a fixed order, so the result is bitwise reproducible.
    """
    m, s, u, z_y = stats.unbind(0)
    M = m.amax(0)
    shift = torch.where(M == -float("inf"), 0.0, M)
    # A chunk with s = 0 (all -inf) contributes nothing; select before multiplying, as -inf * 0 is NaN.
    live = s > 0
    rel = torch.where(live, m - shift, 0.0)
    w = torch.where(live, torch.exp(rel), 0.0)
    S = (w * s).sum(0)
    U = (w * (u + rel * s)).sum(0)
    log_s = torch.log(S)
    mean_rel = U / S
    lse = shift + log_s
    return z_y.sum(0) - lse, log_s - mean_rel, lse, shift + mean_rel


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, start: int, stop: int,
                  temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(z, w): the scaled logits of columns [start, stop) and that slice of the weight, in h's dtype."""
    w = weight[start:stop].to(h.dtype)
    z = h @ w.T
    if bias is not None:
        z += bias[start:stop].to(h.dtype)
    return z.div_(temperature), w


def forward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, ids: torch.Tensor,
            temperature: float, *, vocab_chunk: int | None = None):
    """hidden (N, H), weight (V, H), bias (V,) | None, ids (N,) -> logprobs, entropy, lse, mean_z, each (N,)."""
    N, V = hidden.shape[0], weight.shape[0]
    h = hidden.to(compute_dtype(hidden.dtype))
    ids = ids.long()
    chunk = vocab_chunk or default_chunk(N, V)
    stats = torch.empty((4, -(-V // chunk), N), dtype=h.dtype, device=h.device)
    for k, (start, stop) in enumerate(vocab_chunks(V, chunk)):
        z, _ = _chunk_logits(h, weight, bias, start, stop, temperature)
        for out, value in zip(stats[:, k], chunk_stats(z, ids - start)):
            out.copy_(value)
    return combine_chunk_stats(stats)


def backward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, ids: torch.Tensor,
             temperature: float, lse: torch.Tensor, mean_z: torch.Tensor, grad_logprobs: torch.Tensor | None,
             grad_entropy: torch.Tensor | None, *, needs_grad: tuple[bool, bool, bool] = (True, True, True),
             vocab_chunk: int | None = None):
    """-> (grad_hidden, grad_weight, grad_bias), each in its input's dtype (None where not needed)."""
    N, V = hidden.shape[0], weight.shape[0]
    needs_hidden, needs_weight, needs_bias = needs_grad
    needs_bias = needs_bias and bias is not None
    h = hidden.to(compute_dtype(hidden.dtype))
    ids = ids.long()
    grad_hidden = torch.zeros_like(h) if needs_hidden else None
    grad_weight = torch.empty_like(weight) if needs_weight else None
    grad_bias = torch.empty_like(bias) if needs_bias else None
    c = None if grad_logprobs is None else grad_logprobs.to(h.dtype).unsqueeze(-1)
    e = None if grad_entropy is None else grad_entropy.to(h.dtype).unsqueeze(-1)
    lse, mean_z = lse.to(h.dtype).unsqueeze(-1), mean_z.to(h.dtype).unsqueeze(-1)
    chunk = vocab_chunk or default_chunk(N, V)
    for start, stop in vocab_chunks(V, chunk):
        z, w = _chunk_logits(h, weight, bias, start, stop, temperature)
        p = torch.exp(z - lse)
        dz = torch.zeros_like(z)
        if c is not None:
            dz = -c * p
            local = ids - start
            in_chunk = ((local >= 0) & (local < stop - start)).unsqueeze(-1)
            dz.scatter_add_(-1, local.clamp(0, stop - start - 1).unsqueeze(-1), torch.where(in_chunk, c, 0.0))
        if e is not None:
            dz += e * p * torch.where(p > 0, mean_z - z, 0.0)
        dz /= temperature
        if grad_hidden is not None:
            grad_hidden.addmm_(dz, w)
        if grad_weight is not None:
            grad_weight[start:stop] = dz.T @ h
        if grad_bias is not None:
            grad_bias[start:stop] = dz.sum(0)
    if grad_hidden is not None:
        grad_hidden = grad_hidden.to(hidden.dtype)
    return grad_hidden, grad_weight, grad_bias
