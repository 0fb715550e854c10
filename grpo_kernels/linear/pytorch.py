"""The fused-linear vocabulary sweep in chunked PyTorch: the CPU path and the fallback.

Same contract as grpo_kernels/triton/linear.py. With z = (hidden @ weight.T + bias) / temperature,
the (N, V) logits are never formed: the vocabulary is swept in chunks of columns, each
chunk's logits (N, chunk) are computed, reduced and dropped.

  forward   per chunk: the softmax statistics of each row relative to the chunk's max
            (m, s = sum exp(z - m), u = sum exp(z - m)(z - m), and the target logit z_y);
            `merge_chunks` merges the chunks and stats.finish gives the five numbers of the
            sweep contract (logprobs, entropy, m, log_sum, mean_rel; docs/design.md).
  backward  per chunk, the logits once more and dz = (c (onehot(y) - p) + e p (mean_rel - (z - m))) / T;
            grad_hidden += dz @ W[chunk] (one running sum over the chunks, in the compute
            dtype), grad_weight[chunk] = dz.T @ hidden, grad_bias[chunk] = dz.sum(0).

Math runs in float32 (float64 for float64 inputs). Extra memory: the hidden states and the
running grad_hidden in the compute dtype, O(N * H), plus two chunks of logits, O(CHUNK_ELEMENTS)
(the chunk math runs in place: issue 18).
"""
from __future__ import annotations

from collections.abc import Iterator

import torch

from ..stats import compute_dtype, finish, rebase, shift_of
from ..sweep.pytorch import inv_temperature

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
    """Softmax statistics of the rows of one chunk of logits z (N, C), relative to the row max
    (z is overwritten).

    `local_ids` are the targets' column indices within the chunk (outside [0, C) when the
    target lies in another chunk). Returns m, s, u, z_y, each (N,): the max, sum exp(z - m),
    sum exp(z - m)(z - m) (kept relative to m: lse - E_p[z] then never cancels two large
    numbers), and the target logit (0 when not in this chunk).
    """
    m = z.amax(-1)
    C = z.shape[-1]
    in_chunk = (local_ids >= 0) & (local_ids < C)
    z_y = z.gather(-1, local_ids.clamp(0, C - 1).unsqueeze(-1)).squeeze(-1)
    # In place in z (the caller's fresh chunk): one more chunk-sized tensor, e, not five.
    z_rel = z.sub_(shift_of(m).unsqueeze(-1))
    e = torch.exp(z_rel)
    s = e.sum(-1)
    # A -inf logit must add 0 to u, not 0 * -inf = NaN: the lowest finite value has e = 0 too.
    u = z_rel.clamp_(min=torch.finfo(z.dtype).min).mul_(e).sum(-1)
    return m, s, u, torch.where(in_chunk, z_y, 0.0)


def merge_chunks(stats: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Merge per-chunk statistics stats (4, K, N) = (m, s, u, z_y) into one row's (M, S, U, z_y),
    S and U measured from shift_of(M) (stats.py). The sums over K run in a fixed order, so the
    result is bitwise reproducible."""
    m, s, u, z_y = stats.unbind(0)
    M = m.amax(0)
    s, u = rebase(m, s, u, shift_of(M))
    return M, s.sum(0), u.sum(0), z_y.sum(0)


def _rows(hidden: torch.Tensor, active: torch.Tensor | None) -> torch.Tensor:
    """hidden in the compute dtype, inactive rows read as zeros (their values never reach a sum)."""
    h = hidden.to(compute_dtype(hidden.dtype))
    return h if active is None else torch.where(active.unsqueeze(-1), h, 0.0)


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, start: int, stop: int,
                  inv_t) -> tuple[torch.Tensor, torch.Tensor]:
    """(z, w): the scaled logits of columns [start, stop) and that slice of the weight, in h's dtype."""
    w = weight[start:stop].to(h.dtype)
    z = h @ w.T
    if bias is not None:
        z += bias[start:stop].to(h.dtype)
    return z.mul_(inv_t), w


def forward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, ids: torch.Tensor,
            temperature, active: torch.Tensor | None = None, vocab_start: int = 0, partial: bool = False, *,
            vocab_chunk: int | None = None):
    """hidden (N, H), weight (V, H), bias (V,) | None, ids (N,) -> the five numbers of the sweep
    contract (docs/design.md), or with partial this shard's (m, s, u, z_y), each (N,)."""
    N, V = hidden.shape[0], weight.shape[0]
    h = _rows(hidden, active)
    inv_t = inv_temperature(temperature, h.dtype)
    local = ids.long() - vocab_start
    chunk = vocab_chunk or default_chunk(N, V)
    stats = torch.empty((4, -(-V // chunk), N), dtype=h.dtype, device=h.device)
    for k, (start, stop) in enumerate(vocab_chunks(V, chunk)):
        z, _ = _chunk_logits(h, weight, bias, start, stop, inv_t)
        for out, value in zip(stats[:, k], chunk_stats(z, local - start)):
            out.copy_(value)
    merged = merge_chunks(stats)
    owned = (local >= 0) & (local < V)
    if partial:
        return merged
    return finish(*merged, owned=owned, active=active)


def backward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, ids: torch.Tensor,
             temperature, active: torch.Tensor | None, m: torch.Tensor, log_sum: torch.Tensor,
             mean_rel: torch.Tensor, grad_logprobs: torch.Tensor | None, grad_entropy: torch.Tensor | None, *,
             needs_grad: tuple[bool, bool, bool] = (True, True, True), vocab_start: int = 0,
             vocab_chunk: int | None = None):
    """-> (grad_hidden, grad_weight, grad_bias), each in its input's dtype (None where not needed).
    Inactive rows get a zero gradient and add nothing to grad_weight and grad_bias."""
    N, V = hidden.shape[0], weight.shape[0]
    needs_hidden, needs_weight, needs_bias = needs_grad
    needs_bias = needs_bias and bias is not None
    h = _rows(hidden, active)
    inv_t = inv_temperature(temperature, h.dtype)
    ids = ids.long() - vocab_start
    grad_hidden = torch.zeros_like(h) if needs_hidden else None
    grad_weight = torch.empty_like(weight) if needs_weight else None
    grad_bias = torch.empty_like(bias) if needs_bias else None
    on = None if active is None else active.to(h.dtype).unsqueeze(-1)
    coef = lambda g: None if g is None else g.to(h.dtype).unsqueeze(-1) * (1.0 if on is None else on)  # noqa: E731
    c, e = coef(grad_logprobs), coef(grad_entropy)
    m, log_sum, mean_rel = (t.to(h.dtype).unsqueeze(-1) for t in (m, log_sum, mean_rel))
    chunk = vocab_chunk or default_chunk(N, V)
    for start, stop in vocab_chunks(V, chunk):
        z, w = _chunk_logits(h, weight, bias, start, stop, inv_t)
        # In place in z, beside one more chunk-sized tensor (p, then dz) and a mask.
        z_rel = z.sub_(m)
        dz = p = torch.sub(z_rel, log_sum).exp_()
        local = ids - start
        in_chunk = ((local >= 0) & (local < stop - start)).unsqueeze(-1)
        col = local.clamp(0, stop - start - 1).unsqueeze(-1)
        z_y_rel = z_rel.gather(-1, col)
        dz_y = None
        if c is not None:
            # The target's c (1 - p_y) as -c expm1(log p_y): no cancellation for a confident token.
            dz_y = -c * torch.expm1(z_y_rel - log_sum)
        if e is not None:
            # e p (mean_rel - (z - m)), 0 where p = 0 (there z - m may be -inf).
            p_y = p.gather(-1, col)
            at_y = e * p_y * torch.where(p_y > 0, mean_rel - z_y_rel, 0.0)
            dz_y = at_y if dz_y is None else dz_y + at_y
            factor = z_rel.neg_().add_(mean_rel).masked_fill_(p == 0, 0.0).mul_(e)
            dz = p.mul_(factor if c is None else factor.sub_(c))
        elif c is not None:
            dz = p.mul_(-c)
        else:
            dz = p.zero_()
        if dz_y is not None:
            dz.scatter_(-1, col, torch.where(in_chunk, dz_y, dz.gather(-1, col)))
        dz *= inv_t
        if grad_hidden is not None:
            grad_hidden.addmm_(dz, w)
        if grad_weight is not None:
            grad_weight[start:stop] = dz.T @ h
        if grad_bias is not None:
            grad_bias[start:stop] = dz.sum(0)
    if grad_hidden is not None:
        grad_hidden = grad_hidden.to(hidden.dtype)
    return grad_hidden, grad_weight, grad_bias
