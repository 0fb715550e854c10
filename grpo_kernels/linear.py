"""fused_linear_grpo_loss: the GRPO objective from the last hidden states and the output
projection, without materialising the (N, V) logits.

Same two layers as fused_grpo_loss (docs/design.md): the fused-linear vocabulary sweep
(`LinearTokenLogprobs`: hidden, lm_head -> logprobs and entropy (B, T)), then the very same
loss, `reference.grpo_loss_from_logprobs`, over those (B, T) tensors. Autograd over the small
loss graph gives the sweep's backward its per-token coefficients c_t = dL/dl_t and
e_t = dL/dH_t; the sweep turns them into the gradients of hidden, weight and bias.
"""
from __future__ import annotations

from types import ModuleType

import torch

from . import linear_torch
from .ops import resolve_backend
from .options import GRPOOptions, check_completion_ids, check_inputs, check_logits, check_token_rows
from .reference import Metrics, grpo_loss_from_logprobs

HIDDEN_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def linear_backend(name: str, device: torch.device) -> ModuleType:
    """The module implementing the fused-linear sweep for `backend` on `device`."""
    name = resolve_backend(name, device)
    if name == "torch":
        return linear_torch
    if name == "triton":
        from .triton import linear as triton_linear

        return triton_linear
    raise ValueError("backend='cuda' has no fused-linear sweep; use 'auto', 'triton' or 'torch'")


class LinearTokenLogprobs(torch.autograd.Function):
    """hidden (N, H), weight (V, H), bias (V,) | None -> (logprobs, entropy), each (N,) fp32,
    with z = (hidden @ weight.T + bias) / temperature swept tile by tile, never stored.

    Saves two fp32 numbers per token (lse, E_p[z]); the backward recomputes the logits.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, temperature, backend):
        # The backends choose their own precision (fp32 accumulation); autocast must not
        # turn the PyTorch path's fp32 matmuls into bf16 ones.
        with torch.autocast(hidden.device.type, enabled=False):
            logprobs, entropy, lse, mean_z = backend.forward(hidden, weight, bias, ids, temperature)
        ctx.save_for_backward(hidden, weight, bias, ids, lse, mean_z)
        ctx.temperature, ctx.backend = temperature, backend
        ctx.set_materialize_grads(False)
        return logprobs, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logprobs, grad_entropy):
        if grad_logprobs is None and grad_entropy is None:
            return None, None, None, None, None, None
        hidden, weight, bias, ids, lse, mean_z = ctx.saved_tensors
        with torch.autocast(hidden.device.type, enabled=False):
            grad_hidden, grad_weight, grad_bias = ctx.backend.backward(
                hidden, weight, bias, ids, ctx.temperature, lse, mean_z, grad_logprobs, grad_entropy,
                needs_grad=tuple(ctx.needs_input_grad[:3]))
        return grad_hidden, grad_weight, grad_bias, None, None, None


def check_linear(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 completion_ids: torch.Tensor) -> int:
    """Check hidden (B, T, H) or (N, H), lm_head_weight (V, H) and lm_head_bias (V,) against
    each other and completion_ids (B, T); returns V. The ids' range is checked by check_inputs."""
    for name, t in (("lm_head_weight", weight), ("lm_head_bias", bias)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    B, T = check_completion_ids(completion_ids)
    H = check_token_rows("hidden", hidden, B, T, "H")
    if hidden.dtype not in HIDDEN_DTYPES:
        raise TypeError(f"hidden must be float32, bfloat16, float16 or float64, got {hidden.dtype}")
    if weight.dim() != 2 or weight.shape[1] != H:
        raise ValueError(f"lm_head_weight must have shape (V, H) = (V, {H}) to match hidden's last dimension, "
                         f"got {tuple(weight.shape)}")
    V = weight.shape[0]
    if V < 1:
        raise ValueError("lm_head_weight must have at least one row (vocabulary size V >= 1)")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"lm_head_weight ({weight.dtype}) must have the dtype of hidden ({hidden.dtype})")
    if bias is not None:
        if tuple(bias.shape) != (V,):
            raise ValueError(f"lm_head_bias must have shape (V,) = ({V},) to match lm_head_weight, "
                             f"got {tuple(bias.shape)}")
        if not bias.is_floating_point():
            raise TypeError(f"lm_head_bias must be a floating-point tensor, got {bias.dtype}")
    for name, t in (("hidden", hidden), ("lm_head_weight", weight), ("lm_head_bias", bias)):
        if t is not None and t.device != completion_ids.device:
            raise ValueError(f"{name} is on {t.device} but completion_ids are on {completion_ids.device}: "
                             "all tensors must share a device")
    return V


def _autocast(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """Under torch.autocast, the dtype F.linear would compute in (e.g. bf16 activations with fp32
    master weights); autograd casts the gradients back to each input's dtype."""
    if not isinstance(hidden, torch.Tensor) or not torch.is_autocast_enabled(hidden.device.type):
        return hidden, weight, bias
    dtype = torch.get_autocast_dtype(hidden.device.type)

    def cast(t):
        return t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t

    return cast(hidden), cast(weight), cast(bias)


def _sweep(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, completion_ids: torch.Tensor,
           temperature: float, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    B, T = completion_ids.shape
    H = hidden.shape[-1]
    # (N, H) rows with contiguous features; a copy only for views that cannot be flattened
    # (O(N * H), never O(N * V)). Autograd routes grad_hidden back through the reshape.
    rows = hidden.reshape(B * T, H)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    if bias is not None and bias.stride(0) != 1:
        bias = bias.contiguous()
    logprobs, entropy = LinearTokenLogprobs.apply(rows, weight, bias, completion_ids.reshape(B * T),
                                                  float(temperature), linear_backend(backend, hidden.device))
    return logprobs.view(B, T), entropy.view(B, T)


def linear_token_logprobs(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    completion_ids: torch.Tensor,
    temperature: float = 1.0,
    return_entropy: bool = False,
    *,
    lm_head_bias: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log pi(y_t) (B, T) fp32 (and the entropy with return_entropy) from hidden states (B, T, H)
    and the output projection, in one sweep without the logits. For the old- and
    reference-policy passes under torch.no_grad(); differentiable too."""
    GRPOOptions(temperature=temperature, backend=backend)  # validates both
    hidden, lm_head_weight, lm_head_bias = _autocast(hidden, lm_head_weight, lm_head_bias)
    V = check_linear(hidden, lm_head_weight, lm_head_bias, completion_ids)
    check_logits(None, completion_ids, vocab_size=V)  # the ids' dtype and range
    logprobs, entropy = _sweep(hidden, lm_head_weight, lm_head_bias, completion_ids, temperature, backend)
    return (logprobs, entropy) if return_entropy else logprobs


def fused_linear_grpo_loss(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    completion_ids: torch.Tensor,
    advantages: torch.Tensor,
    completion_mask: torch.Tensor | None = None,
    old_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    *,
    lm_head_bias: torch.Tensor | None = None,
    rollout_is_ratio: torch.Tensor | None = None,
    sampling_logprobs: torch.Tensor | None = None,
    **options,
) -> tuple[torch.Tensor, Metrics]:
    """The GRPO-family loss of fused_grpo_loss with logits = hidden @ lm_head_weight.T + lm_head_bias,
    computed without materialising them.

    hidden (B, T, H) or (N, H) are the last hidden states at the positions that predict
    completion_ids (B, T); lm_head_weight is (V, H) in hidden's dtype, lm_head_bias (V,) or None.
    Keywords and returns are those of fused_grpo_loss; the loss carries the gradient to hidden,
    lm_head_weight and lm_head_bias. Under torch.autocast the three compute in the autocast
    dtype, as F.linear would. `inplace_backward` has no effect (there are no logits to
    overwrite), and backend is auto (Triton on CUDA, chunked PyTorch on the CPU), triton or torch.
    """
    o = GRPOOptions(**options)
    hidden, lm_head_weight, lm_head_bias = _autocast(hidden, lm_head_weight, lm_head_bias)
    V = check_linear(hidden, lm_head_weight, lm_head_bias, completion_ids)
    check_inputs(None, completion_ids, advantages, completion_mask, old_logprobs, ref_logprobs,
                 rollout_is_ratio, sampling_logprobs, o, vocab_size=V)
    logprobs, entropy = _sweep(hidden, lm_head_weight, lm_head_bias, completion_ids, o.temperature, o.backend)
    return grpo_loss_from_logprobs(logprobs, entropy, advantages, completion_mask, old_logprobs, ref_logprobs,
                                   rollout_is_ratio, sampling_logprobs, o)
