"""The vocabulary sweep in chunked PyTorch: the CPU path and the fallback.

Same contract as grpo_kernels/triton/logprobs.py (forward / backward, see docs/design.md);
it never holds more than one chunk of rows in the compute dtype, so its extra memory is
O(chunk * V) whatever the number of tokens. Math runs in float32, or float64 for float64
logits.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch

from .reference import compute_dtype

# Elements of one chunk of rows (4 MiB in fp32): big enough to amortise the op launches,
# small enough that a chunk's fp32 temporaries stay in the CPU's cache.
CHUNK_ELEMENTS = 1 << 20


def _rows(t: torch.Tensor) -> torch.Tensor:
    """View (B, T, ...) as (1, B*T, ...) when that needs no copy, so chunks span sequences."""
    B, T = t.shape[:2]
    if B > 1 and t.stride(0) == T * t.stride(1):
        return t.view(1, B * T, *t.shape[2:])
    return t


def _row_chunks(B: int, T: int, V: int) -> Iterator[tuple[int, slice]]:
    """(b, t-slice) chunks that cover (B, T) without flattening (which could copy a strided view)."""
    rows = max(1, CHUNK_ELEMENTS // max(V, 1))
    for b in range(B):
        for t0 in range(0, T, rows):
            yield b, slice(t0, min(t0 + rows, T))


def _scaled(chunk: torch.Tensor, dtype: torch.dtype, temperature: float) -> torch.Tensor:
    """z = logits / temperature for one chunk, as a fresh tensor the caller may overwrite."""
    z = chunk.to(dtype, copy=True)
    return z if temperature == 1.0 else z.div_(temperature)


def forward(logits: torch.Tensor, ids: torch.Tensor, temperature: float):
    """logits (B, T, V), ids (B, T) -> logprobs, entropy, lse, mean_z, each (B, T)."""
    dtype = compute_dtype(logits.dtype)
    out = torch.empty((4, *logits.shape[:2]), dtype=dtype, device=logits.device)
    logits = _rows(logits)
    B, T, V = logits.shape
    ids = ids.reshape(B, T)
    logprobs, entropy, lse, mean_z = out.view(4, B, T).unbind(0)
    for b, ts in _row_chunks(B, T, V):
        z = _scaled(logits[b, ts], dtype, temperature)
        y = ids[b, ts].long().unsqueeze(-1)
        z_y = z.gather(-1, y).squeeze(-1)
        logp = torch.log_softmax(z, dim=-1)
        logprobs[b, ts] = logp.gather(-1, y).squeeze(-1)
        lse[b, ts] = z_y - logprobs[b, ts]
        # -sum p log p; log p clamped so that a -inf logit adds 0, not 0 * -inf. (This is
        # ~9x faster on the CPU than torch.special.entr.)
        p = logp.exp()
        entropy[b, ts] = -p.mul_(logp.clamp_(min=torch.finfo(dtype).min)).sum(-1)
    torch.sub(lse, entropy, out=mean_z)
    return out.unbind(0)


def backward(logits: torch.Tensor, ids: torch.Tensor, temperature: float, lse: torch.Tensor,
             mean_z: torch.Tensor, grad_logprobs: torch.Tensor | None, grad_entropy: torch.Tensor | None,
             grad_out: torch.Tensor) -> None:
    """Writes dL/dlogits = (c (onehot - p) + e p (mean_z - z)) / temperature into grad_out.

    With log p = z - lse and H = lse - mean_z, the entropy term is -e p (H + log p), so
    the row needs only log p and p: dz = c onehot - p (c + e (H + log p)).
    """
    dtype = compute_dtype(logits.dtype)
    rows_logits, rows_grad = _rows(logits), _rows(grad_out)
    if rows_logits.shape[0] == rows_grad.shape[0]:  # both merge, or neither
        logits, grad_out = rows_logits, rows_grad
    B, T, V = logits.shape
    ids, lse, mean_z = ids.reshape(B, T), lse.reshape(B, T), mean_z.reshape(B, T)
    c_all = torch.zeros_like(lse) if grad_logprobs is None else grad_logprobs.reshape(B, T).to(dtype)
    e_all = None if grad_entropy is None else grad_entropy.reshape(B, T).to(dtype)
    for b, ts in _row_chunks(B, T, V):
        logp = _scaled(logits[b, ts], dtype, temperature).sub_(lse[b, ts].unsqueeze(-1))
        p = logp.exp()
        c = c_all[b, ts].unsqueeze(-1)
        if e_all is None:
            weight = c
        else:  # c + e (H + log p); log p clamped so that p = 0 gives 0, not 0 * -inf
            H = (lse[b, ts] - mean_z[b, ts]).unsqueeze(-1)
            weight = logp.clamp_(min=torch.finfo(dtype).min).add_(H).mul_(e_all[b, ts].unsqueeze(-1)).add_(c)
        grad = p.mul_(weight).neg_()
        grad.scatter_add_(-1, ids[b, ts].long().unsqueeze(-1), c)
        grad_out[b, ts] = grad if temperature == 1.0 else grad.div_(temperature)
