"""The vocabulary sweep in chunked PyTorch: the CPU path and the fallback.

Same contract as sweep/triton.py (docs/design.md). Rows are processed in chunks of active
rows gathered by index, across sequences (a logits[:, :-1] view with short sequences
costs no more than a contiguous tensor), and never more than one chunk is held in the
compute dtype, so the extra memory is O(chunk * V) whatever the number of tokens. An
inactive row is never read. Math runs in float32, or float64 for float64 logits.
"""
from __future__ import annotations

import torch

from ..stats import compute_dtype

# Elements of one chunk of rows (4 MiB in fp32): big enough to amortise the op launches,
# small enough that a chunk's fp32 temporaries stay in the CPU's cache.
CHUNK_ELEMENTS = 1 << 20


def _active_rows(active: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor:
    """Indices of the rows to read. (On the CPU; a CUDA caller of this fallback pays one sync here.)"""
    if active is None:
        return torch.arange(n, device=device)
    return active.nonzero().squeeze(-1)


def _chunks(rows: torch.Tensor, V: int):
    step = max(1, CHUNK_ELEMENTS // max(V, 1))
    for start in range(0, rows.numel(), step):
        yield rows[start:start + step]


def inv_temperature(temperature, dtype: torch.dtype, rows: torch.Tensor | None = None) -> torch.Tensor | float:
    """1 / temperature: a float, or (k, 1) for the given rows (all rows without `rows`), NaN where a
    per-token temperature is <= 0 or not finite."""
    if not isinstance(temperature, torch.Tensor):
        return 1.0 / temperature
    t = (temperature if rows is None else temperature[rows]).to(dtype)
    ok = torch.isfinite(t) & (t > 0)
    return torch.where(ok, 1.0 / t, float("nan")).unsqueeze(-1)


def _gather(logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """logits rows (k, V) of a (B, T, V) view by flat row index, as a fresh copy in the caller's dtype."""
    T = logits.shape[1]
    return logits[rows // T, rows % T]


def forward(logits, ids, temperature, active, vocab_start=0, partial=False):
    """The backend contract's forward (docs/design.md): five (N,) tensors, or four with partial."""
    B, T, V = logits.shape
    n = B * T
    dtype = compute_dtype(logits.dtype)
    outs = [torch.zeros(n, dtype=dtype, device=logits.device) for _ in range(4 if partial else 5)]
    for rows in _chunks(_active_rows(active, n, logits.device), V):
        z = _gather(logits, rows).to(dtype)
        z = z * inv_temperature(temperature, dtype, rows)
        m = z.amax(-1)
        # A row of -inf gives m = -inf; shift by 0 there so that exp() sees -inf, not NaN.
        shift = torch.where(m == -float("inf"), 0.0, m)
        z_rel = z.sub_(shift.unsqueeze(-1))
        e = z_rel.exp()
        s = e.sum(-1)
        u = (e * torch.where(e > 0, z_rel, 0.0)).sum(-1)  # a -inf logit adds 0, not 0 * -inf
        y = ids[rows] - vocab_start
        owned = (y >= 0) & (y < V)
        z_y_rel = z_rel.gather(-1, y.clamp(0, V - 1).unsqueeze(-1)).squeeze(-1)
        if partial:
            for out, value in zip(outs, (m, s, u, torch.where(owned, z_y_rel + shift, 0.0))):
                out[rows] = value
        else:
            log_s = s.log()
            mean_rel = u / s
            logprob = torch.where(owned, z_y_rel - log_s, float("nan"))
            for out, value in zip(outs, (logprob, log_s - mean_rel, m, log_s, mean_rel)):
                out[rows] = value
    return tuple(outs)


def backward(logits, ids, temperature, active, m, log_sum, mean_rel, grad_logprobs, grad_entropy, grad_out,
             vocab_start=0):
    """Writes dL/dlogits = (c (onehot - p) + e p (mean_rel - (z - m))) / temperature into grad_out.

    With log p = (z - m) - log s and H = log s - mean_rel, the entropy term is -e p (H + log p),
    so the row needs only log p and p: dz = c onehot - p (c + e (H + log p)).
    """
    B, T, V = logits.shape
    n = B * T
    dtype = compute_dtype(logits.dtype)
    rows_all = _active_rows(active, n, logits.device)
    if active is not None and rows_all.numel() < n:  # inactive rows: written as zeros, never read
        idle = (~active).nonzero().squeeze(-1)
        grad_out[idle // T, idle % T] = 0
    c_all = torch.zeros(n, dtype=dtype, device=logits.device) if grad_logprobs is None else grad_logprobs.to(dtype)
    for rows in _chunks(rows_all, V):
        inv_t = inv_temperature(temperature, dtype, rows)
        logp = (_gather(logits, rows).to(dtype) * inv_t).sub_(m[rows].to(dtype).unsqueeze(-1))
        logp = logp.sub_(log_sum[rows].to(dtype).unsqueeze(-1))
        p = logp.exp()
        c = c_all[rows].unsqueeze(-1)
        y = ids[rows] - vocab_start
        owned = ((y >= 0) & (y < V)).unsqueeze(-1)
        col = y.clamp(0, V - 1).unsqueeze(-1)
        logp_y = logp.gather(-1, col)
        # The target's c (1 - p_y) as -c expm1(log p_y): no cancellation for a confident token.
        target = -c * torch.expm1(logp_y)
        if grad_entropy is None:
            weight = c
        else:  # c + e (H + log p); log p clamped so that p = 0 gives 0, not 0 * -inf
            H = (log_sum[rows] - mean_rel[rows]).to(dtype).unsqueeze(-1)
            e = grad_entropy[rows].to(dtype).unsqueeze(-1)
            target = target - e * (logp_y.clamp(min=torch.finfo(dtype).min) + H) * logp_y.exp()
            weight = logp.clamp_(min=torch.finfo(dtype).min).add_(H).mul_(e).add_(c)
        grad = p.mul_(weight).neg_()
        grad.scatter_(-1, col, torch.where(owned, target, grad.gather(-1, col)))
        grad = grad * inv_t
        grad_out[rows // T, rows % T] = grad.to(grad_out.dtype)
