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


def _row_chunks(B: int, T: int, V: int) -> Iterator[tuple[int, slice]]:
    """(b, t-slice) chunks that cover (B, T) without flattening (which could copy a strided view)."""
    rows = max(1, CHUNK_ELEMENTS // max(V, 1))
    for b in range(B):
        for t0 in range(0, T, rows):
            yield b, slice(t0, min(t0 + rows, T))


def _rows(t: torch.Tensor) -> torch.Tensor:
    """View (B, T, ...) as (1, B*T, ...) when that needs no copy, so chunks span sequences."""
    B, T = t.shape[:2]
    if B > 1 and t.stride(0) == T * t.stride(1):
        return t.view(1, B * T, *t.shape[2:])
    return t


def _stats(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """lse, mean_z = E_p[z] and p for a chunk of scaled logits z (rows, V)."""
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    p = torch.exp(z - lse)
    # A -inf logit has p = 0 and adds nothing to E_p[z] (not 0 * -inf).
    mean_z = (p * torch.where(p > 0, z, 0.0)).sum(-1, keepdim=True)
    return lse, mean_z, p


def forward(logits: torch.Tensor, ids: torch.Tensor, temperature: float):
    """logits (B, T, V), ids (B, T) -> logprobs, entropy, lse, mean_z, each (B, T)."""
    dtype = compute_dtype(logits.dtype)
    out = torch.empty((4, *logits.shape[:2]), dtype=dtype, device=logits.device)
    logits = _rows(logits)
    B, T, V = logits.shape
    ids = ids.reshape(B, T)
    logprobs, entropy, lse, mean_z = out.view(4, B, T).unbind(0)
    for b, ts in _row_chunks(B, T, V):
        z = logits[b, ts].to(dtype) / temperature
        chunk_lse, chunk_mean_z, _ = _stats(z)
        z_y = z.gather(-1, ids[b, ts].long().unsqueeze(-1))
        logprobs[b, ts] = (z_y - chunk_lse).squeeze(-1)
        entropy[b, ts] = (chunk_lse - chunk_mean_z).squeeze(-1)
        lse[b, ts] = chunk_lse.squeeze(-1)
        mean_z[b, ts] = chunk_mean_z.squeeze(-1)
    return out.unbind(0)


def backward(logits: torch.Tensor, ids: torch.Tensor, temperature: float, lse: torch.Tensor,
             mean_z: torch.Tensor, grad_logprobs: torch.Tensor | None, grad_entropy: torch.Tensor | None,
             grad_out: torch.Tensor) -> None:
    """Writes dL/dlogits = (c (onehot - p) + e p (mean_z - z)) / temperature into grad_out."""
    dtype = compute_dtype(logits.dtype)
    rows_logits, rows_grad = _rows(logits), _rows(grad_out)
    if rows_logits.shape[0] == rows_grad.shape[0]:  # both merge, or neither
        logits, grad_out = rows_logits, rows_grad
    B, T, V = logits.shape
    ids, lse, mean_z = ids.reshape(B, T), lse.reshape(B, T), mean_z.reshape(B, T)
    grad_logprobs = None if grad_logprobs is None else grad_logprobs.reshape(B, T)
    grad_entropy = None if grad_entropy is None else grad_entropy.reshape(B, T)
    for b, ts in _row_chunks(B, T, V):
        z = logits[b, ts].to(dtype) / temperature
        p = torch.exp(z - lse[b, ts].unsqueeze(-1))
        grad = torch.zeros_like(z)
        if grad_logprobs is not None:
            c = grad_logprobs[b, ts].to(dtype).unsqueeze(-1)
            grad = -c * p
            grad.scatter_add_(-1, ids[b, ts].long().unsqueeze(-1), c)
        if grad_entropy is not None:
            e = grad_entropy[b, ts].to(dtype).unsqueeze(-1)
            grad += e * p * torch.where(p > 0, mean_z[b, ts].unsqueeze(-1) - z, 0.0)
        grad_out[b, ts] = grad / temperature
