"""The GRPO objective in plain PyTorch, written for clarity: the oracle of every test.

`token_logprobs` is the log-softmax gather and entropy on materialised logits; the loss over
the per-token values is loss.py's, the very function the fused paths call. Everything runs
in the dtype of the logits promoted to at least float32, so float64 inputs give a float64
oracle. Rows whose mask is 0 give log-prob and entropy 0 and no gradient, whatever their
logits hold, as in the fused paths.
"""
from __future__ import annotations

import torch

from .layout import build_tokens
from .loss import Metrics, grpo_loss_from_logprobs, objective  # noqa: F401  (grpo_loss_from_logprobs: public here too)
from .options import GRPOOptions
from .stats import compute_dtype


def token_logprobs(
    logits: torch.Tensor, completion_ids: torch.Tensor, temperature: float | torch.Tensor = 1.0,
    active: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(y) and the entropy of pi at each position; logits (..., V), ids (...), temperature a
    float or a tensor shaped like ids, active (bool, like ids) or None."""
    z = logits.to(compute_dtype(logits.dtype))
    if isinstance(temperature, torch.Tensor):
        z = z / temperature.to(z.dtype).unsqueeze(-1)
    else:
        z = z / temperature
    if active is not None:
        z = torch.where(active.unsqueeze(-1), z, 0.0)
    logp = torch.log_softmax(z, dim=-1)
    logprobs = logp.gather(-1, completion_ids.long().unsqueeze(-1)).squeeze(-1)
    # A -inf logit has p = 0 and adds nothing to the entropy; clamping its log keeps
    # 0 * log 0 (and its gradient) at 0 instead of NaN.
    entropy = -(logp.exp() * logp.clamp(min=torch.finfo(logp.dtype).min)).sum(-1)
    if active is not None:
        logprobs, entropy = torch.where(active, logprobs, 0.0), torch.where(active, entropy, 0.0)
    return logprobs, entropy


def grpo_loss(
    logits: torch.Tensor,
    completion_ids: torch.Tensor,
    advantages: torch.Tensor,
    completion_mask: torch.Tensor | None = None,
    old_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    *,
    rollout_is_ratio: torch.Tensor | None = None,
    sampling_logprobs: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    **keywords,
) -> tuple[torch.Tensor, Metrics]:
    """The whole objective on materialised log-softmax: same signature as fused_grpo_loss."""
    o = GRPOOptions(**keywords)
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    tokens = build_tokens(completion_ids, advantages, completion_mask, old_logprobs, ref_logprobs, rollout_is_ratio,
                          sampling_logprobs, cu_seqlens, o, logits=logits)
    rows = logits.reshape(tokens.layout.num_rows, logits.shape[-1])
    logprobs, entropy = token_logprobs(rows, tokens.ids, tokens.temperature, tokens.active)
    return objective(logprobs, entropy, tokens, o)
