"""Per-row softmax statistics: merging pieces of a row, and the five numbers the sweeps keep.

A piece of a row (a chunk of the vocabulary, or one rank's shard of it) is summarised
relative to its own max m by s = sum exp(z - m), u = sum exp(z - m)(z - m) and the target
logit z_y where the piece holds it (else 0). Pieces merge exactly by rebasing to the common
max M and adding: that is how the fused-linear sweep merges its chunks and how
distributed.py merges the shards of a vocab-parallel row (one MAX, one SUM of three).

`finish` turns the merged statistics into the backend contract's five numbers
(docs/design.md), keeping the max and the log-sum apart: logprob = (z_y - M) - log S.
"""
from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype per-token math runs in: float32, or float64 for float64 inputs (the oracle)."""
    return torch.promote_types(dtype, torch.float32)


def shift_of(M: torch.Tensor) -> torch.Tensor:
    """The max to measure from: 0 for a row that is all -inf (so exp() sees -inf, not NaN)."""
    return torch.where(M == -float("inf"), 0.0, M)


def rebase(m: torch.Tensor, s: torch.Tensor, u: torch.Tensor, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, u) of a piece measured from its max m, re-measured from `shift` >= m.

    s -> exp(m - shift) s, u -> exp(m - shift) (u + (m - shift) s). A piece with s = 0 (all
    -inf, or nothing read) contributes 0: select before multiplying, as -inf * 0 is NaN.
    """
    live = s > 0
    rel = torch.where(live, m - shift, 0.0)
    w = torch.where(live, torch.exp(rel), 0.0)
    return w * s, w * (u + rel * s)


def finish(M: torch.Tensor, S: torch.Tensor, U: torch.Tensor, z_y: torch.Tensor, owned: torch.Tensor | None = None,
           active: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """(logprobs, entropy, m, log_sum, mean_rel) from merged statistics measured from shift_of(M).

    `owned` marks rows whose target some piece held (else the log-prob is NaN: an id outside
    the vocabulary); an inactive row gives five zeros.
    """
    shift = shift_of(M)
    log_s = torch.log(S)
    mean_rel = U / S
    logprobs = (z_y - shift) - log_s
    if owned is not None:
        logprobs = torch.where(owned, logprobs, float("nan"))
    outs = (logprobs, log_s - mean_rel, shift, log_s, mean_rel)
    if active is not None:
        outs = tuple(torch.where(active, t, 0.0) for t in outs)
    return outs
