"""fused_grpo_loss and token_logprobs: the vocabulary sweep as an autograd.Function, then
the loss of reference.grpo_loss_from_logprobs over the (B, T) results.

The sweep's backward needs only c_t = dL/dlogprob_t and e_t = dL/dentropy_t; autograd
over the small (B, T) loss graph supplies them, so no loss formula is written twice
(docs/design.md).
"""
from __future__ import annotations

import os
from types import ModuleType

import torch

from . import torch_path
from .options import GRPOOptions, check_inputs, check_logits
from .reference import Metrics, grpo_loss_from_logprobs


def resolve_backend(name: str, device: torch.device) -> str:
    """'auto' made concrete (Triton on CUDA, chunked PyTorch elsewhere), with a clear error
    where the backend asked for cannot run on `device`."""
    if name == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if name == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"backend='triton' needs CUDA tensors (got {device}); on the CPU it runs only "
                           "under Triton's interpreter (TRITON_INTERPRET=1 set before importing triton). "
                           "Use backend='torch' or 'auto' for CPU tensors.")
    if name not in ("torch", "triton", "cuda"):
        raise ValueError(f"backend must be one of auto, triton, torch, cuda; got {name!r}")
    return name


def sweep_backend(name: str, device: torch.device) -> ModuleType:
    """The module implementing the vocabulary sweep for `backend` on `device`."""
    name = resolve_backend(name, device)
    if name == "torch":
        return torch_path
    if name == "triton":
        from .triton import logprobs as triton_logprobs

        return triton_logprobs
    from . import cuda

    cuda.require(device)
    return cuda


class TokenLogprobs(torch.autograd.Function):
    """logits (B, T, V) -> (logprobs, entropy), each (B, T), by a backend's vocabulary sweep.

    Saves two numbers per token (lse, E_p[z]); the backward reads the logits once and
    writes the gradient once, into the logits' own storage when `inplace` is set.
    """

    @staticmethod
    def forward(ctx, logits, ids, temperature, backend, inplace):
        logprobs, entropy, lse, mean_z = backend.forward(logits, ids, temperature)
        ctx.save_for_backward(logits, ids, lse, mean_z)
        ctx.temperature, ctx.backend, ctx.inplace = temperature, backend, inplace
        ctx.set_materialize_grads(False)
        return logprobs, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logprobs, grad_entropy):
        logits, ids, lse, mean_z = ctx.saved_tensors
        if grad_logprobs is None and grad_entropy is None:
            return None, None, None, None, None
        grad = logits if ctx.inplace else torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        ctx.backend.backward(logits, ids, ctx.temperature, lse, mean_z, grad_logprobs, grad_entropy, grad)
        return grad, None, None, None, None


def _sweep(logits: torch.Tensor, completion_ids: torch.Tensor, temperature: float, backend: str,
           inplace: bool) -> tuple[torch.Tensor, torch.Tensor]:
    B, T = completion_ids.shape
    logits = logits if logits.dim() == 3 else logits.unflatten(0, (B, T))  # a view, never a copy
    return TokenLogprobs.apply(logits, completion_ids, float(temperature),
                               sweep_backend(backend, logits.device), inplace)


def token_logprobs(
    logits: torch.Tensor,
    completion_ids: torch.Tensor,
    temperature: float = 1.0,
    return_entropy: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log pi(y_t) (B, T) in fp32 (and the entropy (B, T) with return_entropy), in one sweep.

    For the old- and reference-policy passes under torch.no_grad(); differentiable too.
    """
    GRPOOptions(temperature=temperature, backend=backend)  # validates both
    check_logits(logits, completion_ids)
    logprobs, entropy = _sweep(logits, completion_ids, temperature, backend, inplace=False)
    return (logprobs, entropy) if return_entropy else logprobs


def fused_grpo_loss(
    logits: torch.Tensor,
    completion_ids: torch.Tensor,
    advantages: torch.Tensor,
    completion_mask: torch.Tensor | None = None,
    old_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    *,
    rollout_is_ratio: torch.Tensor | None = None,
    sampling_logprobs: torch.Tensor | None = None,
    **options,
) -> tuple[torch.Tensor, Metrics]:
    """The GRPO-family loss over logits (B, T, V) or (N, V), and its metrics.

    Keywords are those of `GRPOOptions` (SPEC section 1): loss_type, beta, epsilon_low,
    epsilon_high, delta, temperature, importance_sampling_level, use_bias_correction_kl,
    kl_estimator, kl_ratio, max_completion_length, num_items_in_batch, sapo_temperature_*,
    vespo_*, dual_clip, entropy_coef, top_entropy_quantile, off_policy_mask_threshold,
    inplace_backward, backend. `sampling_logprobs` (B, T) are the sampler's log-probs for
    the off-policy mask (default: old_logprobs), as TRL uses with vLLM.

    Returns the 0-dim loss, which carries the gradient to `logits`, and detached metrics:
    kl, entropy, clip_ratio_low/high/region (masked means; None where they do not apply)
    and the per-token `logprobs` (B, T).
    """
    o = GRPOOptions(**options)
    check_inputs(logits, completion_ids, advantages, completion_mask, old_logprobs, ref_logprobs,
                 rollout_is_ratio, sampling_logprobs, o)
    logprobs, entropy = _sweep(logits, completion_ids, o.temperature, o.backend, o.inplace_backward)
    return grpo_loss_from_logprobs(logprobs, entropy, advantages, completion_mask, old_logprobs, ref_logprobs,
                                   rollout_is_ratio, sampling_logprobs, o)
