"""fused_linear_grpo_loss: the GRPO objective from the last hidden states and the output
projection, without materialising the (N, V) logits.

Same two layers as fused_grpo_loss (docs/design.md): the fused-linear vocabulary sweep
(hidden, lm_head -> logprobs and entropy per token; pytorch.py and triton.py here), then the
very same loss (loss.py) over those per-token values. Autograd over the small loss graph
gives the sweep's backward its per-token coefficients c_t = dL/dl_t and e_t = dL/dH_t; the
sweep turns them into the gradients of hidden, weight and bias.

  grpo_kernels::linear_sweep            hidden (N, H), weight (V, H), bias -> the five (N,) numbers
  grpo_kernels::linear_sweep_backward   -> grad_hidden, grad_weight, grad_bias (empty where not needed)

That is four GEMM-equivalents (the backward recomputes the logits). On the Triton backend a
token-local loss (SPEC section 14) takes three instead (`_TokenLocalLinear`, eager mode): each
chunk's coefficients come from loss_triton's token-local API as soon as its log-probs exist, and
its gradient is computed where its fp32 logits are (triton.fused_forward; docs/fused_linear.md).
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import loss_triton
from ..distributed import vocab_bounds
from ..layout import Tokens, build_tokens, check_ids, check_rows, logprobs_result, rows_without_sequences
from ..loss import Metrics, objective
from ..options import GRPOOptions, check_bool, check_temperature, single_backward
from ..sweep import resolve_backend, stats_dtype
from ..sweep import two_pass  # noqa: F401 - registers grpo_kernels::rescale_gradient_, which the backward uses

Tensor = torch.Tensor
# Token-local losses on the Triton backend in three GEMM-equivalents (`_TokenLocalLinear`); False
# sends every loss through the operators' four (docs/fused_linear.md).
THREE_GEMM = True
HIDDEN_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def backend_module(name: str):
    """The module implementing the fused-linear sweep for a resolved backend name."""
    if name == "torch":
        from . import pytorch as torch_linear

        return torch_linear
    if name == "triton":
        from . import triton as triton_linear

        return triton_linear
    raise ValueError("backend='cuda' has no fused-linear sweep; use 'auto', 'triton' or 'torch'")


def _temperature(temperature: float, temperature_rows: Tensor | None):
    return temperature if temperature_rows is None else temperature_rows


@torch.library.custom_op("grpo_kernels::linear_sweep", mutates_args=())
def linear_sweep(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], ids: Tensor, temperature: float,
                 temperature_rows: Optional[Tensor], active: Optional[Tensor], vocab_start: int, partial: bool,
                 backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """z = (hidden @ weight.T + bias) / temperature swept tile by tile, never stored. Returns
    logprobs, entropy, m, log_sum, mean_rel (N,); with partial (a vocab-parallel shard)
    m, s, u, z_y and an empty fifth."""
    # The backends choose their own precision (fp32 accumulation); autocast must not turn
    # the PyTorch path's fp32 matmuls into bf16 ones.
    with torch.autocast(hidden.device.type, enabled=False):
        outs = backend_module(backend).forward(hidden, weight, bias, ids, _temperature(temperature, temperature_rows),
                                               active, vocab_start, partial)
    outs = tuple(t.contiguous() for t in outs)
    return (*outs, outs[0].new_empty(0)) if partial else outs


@linear_sweep.register_fake
def _(hidden, weight, bias, ids, temperature, temperature_rows, active, vocab_start, partial, backend):
    dtype = stats_dtype(hidden.dtype, backend)
    outs = [hidden.new_empty(hidden.shape[0], dtype=dtype) for _ in range(4 if partial else 5)]
    return (*outs, hidden.new_empty(0, dtype=dtype)) if partial else tuple(outs)


@torch.library.custom_op("grpo_kernels::linear_sweep_backward", mutates_args=())
def linear_sweep_backward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], ids: Tensor, temperature: float,
                          temperature_rows: Optional[Tensor], active: Optional[Tensor], m: Tensor, log_sum: Tensor,
                          mean_rel: Tensor, grad_logprobs: Optional[Tensor], grad_entropy: Optional[Tensor],
                          vocab_start: int, needs_grad: list[bool], backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_hidden, grad_weight, grad_bias), each in its input's dtype, an empty tensor where not needed."""
    with torch.autocast(hidden.device.type, enabled=False):
        grads = backend_module(backend).backward(
            hidden, weight, bias, ids, _temperature(temperature, temperature_rows), active, m, log_sum, mean_rel,
            grad_logprobs, grad_entropy, needs_grad=tuple(needs_grad), vocab_start=vocab_start)
    return tuple(hidden.new_empty(0) if g is None else g for g in grads)


@linear_sweep_backward.register_fake
def _(hidden, weight, bias, ids, temperature, temperature_rows, active, m, log_sum, mean_rel, grad_logprobs,
      grad_entropy, vocab_start, needs_grad, backend):
    likes = (hidden, weight, bias)
    return tuple(torch.empty_like(t) if need and t is not None else hidden.new_empty(0)
                 for t, need in zip(likes, needs_grad))


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, ids, temperature, temperature_rows, active, vocab_start, partial, backend = inputs
    _, _, m, log_sum, mean_rel = output
    ctx.save_for_backward(hidden, weight, bias, ids, temperature_rows, active, m, log_sum, mean_rel)
    ctx.temperature, ctx.vocab_start, ctx.backend = temperature, vocab_start, backend
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(m, log_sum, mean_rel)


@single_backward
def _backward(ctx, grad_logprobs, grad_entropy, *_):
    needs = list(ctx.needs_input_grad[:3])
    if (grad_logprobs is None and grad_entropy is None) or not any(needs):
        return (None,) * 10
    hidden, weight, bias, ids, temperature_rows, active, m, log_sum, mean_rel = ctx.saved_tensors
    needs[2] = needs[2] and bias is not None
    grads = torch.ops.grpo_kernels.linear_sweep_backward(
        hidden, weight, bias, ids, ctx.temperature, temperature_rows, active, m, log_sum, mean_rel, grad_logprobs,
        grad_entropy, ctx.vocab_start, needs, ctx.backend)
    grads = tuple(g if need else None for g, need in zip(grads, needs))
    return (*grads,) + (None,) * 7


linear_sweep.register_autograd(_backward, setup_context=_setup_context)


def check_linear(hidden: Tensor, weight: Tensor, bias: Tensor | None, tokens_layout) -> int:
    """Check hidden rows, lm_head_weight (V, H) and lm_head_bias (V,) against each other and the
    layout of completion_ids; returns V (this shard's under tensor parallelism)."""
    for name, t in (("hidden", hidden), ("lm_head_weight", weight), ("lm_head_bias", bias)):
        if t is None and name != "lm_head_bias":
            raise TypeError(f"{name} is required (a torch.Tensor), got None")
        if t is not None and not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    H = check_rows("hidden", hidden, tokens_layout, "H")
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
    return V


def _check_devices(completion_ids: Tensor, **tensors) -> None:
    """Before anything else (autocast included) touches them: one device for all."""
    device = completion_ids.device if isinstance(completion_ids, Tensor) else None
    for name, t in tensors.items():
        if t is None and name == "lm_head_weight":
            raise TypeError("lm_head_weight is required (the (V, H) output projection), got None")
        if isinstance(t, Tensor) and device is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device} but completion_ids are on {device}: "
                             "all tensors must share a device")


def _autocast(hidden: Tensor, weight: Tensor, bias: Tensor | None):
    """Under torch.autocast, the dtype F.linear would compute in (e.g. bf16 activations with fp32
    master weights); autograd casts the gradients back to each input's dtype."""
    if not isinstance(hidden, Tensor) or not torch.is_autocast_enabled(hidden.device.type):
        return hidden, weight, bias
    dtype = torch.get_autocast_dtype(hidden.device.type)

    def cast(t):
        return t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() else t

    return cast(hidden), cast(weight), cast(bias)


def _kernel_layout(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """(N, H) rows with contiguous features, and weight and bias as the kernels read them; a copy
    only for views that cannot be flattened (O(N * H), never O(N * V)). Autograd routes grad_hidden
    back through the reshape."""
    rows = hidden.reshape(-1, hidden.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    if bias is not None and bias.stride(0) != 1:
        bias = bias.contiguous()
    return rows, weight, bias


def linear_sweep_rows(hidden: Tensor, weight: Tensor, bias: Tensor | None, tokens: Tokens, backend: str,
                      tp_group=None, vocab_start: int = 0, sequence_parallel: bool = False) -> tuple[Tensor, Tensor]:
    """logprobs and entropy (N,) of the tokens from their hidden states."""
    rows, weight, bias = _kernel_layout(hidden, weight, bias)
    t_scalar, t_rows = tokens.temperature_args
    ids = tokens.ids
    if tp_group is not None:
        from ..distributed import vocab_parallel_linear_sweep

        return vocab_parallel_linear_sweep(rows, weight, bias, ids, t_scalar, t_rows, tokens.active, vocab_start,
                                           backend, tp_group, sequence_parallel)
    logprobs, entropy, *_ = torch.ops.grpo_kernels.linear_sweep(rows, weight, bias, ids, t_scalar, t_rows,
                                                               tokens.active, 0, False, backend)
    return logprobs, entropy


def _token_local_api():
    """loss_triton's API for token-local losses (token_local, Plan). Tests replace it with a stand-in."""
    return loss_triton


class _TokenLocalLinear(torch.autograd.Function):
    """hidden rows (N, H), weight, bias -> (loss, the (7,) metric scalars, logprobs) in three
    GEMM-equivalents (triton.fused_forward): the forward leaves the complete gradients for the
    upstream gradient grad_scale; the backward hands them over, scaled by g / grad_scale on the
    device only when g differs from grad_scale (the rescale_gradient_ operator: its programs return
    at once when g == grad_scale, so no pass over them then)."""

    @staticmethod
    def forward(ctx, rows, weight, bias, tokens, o, api):
        from . import triton as triton_linear

        needs = tuple(ctx.needs_input_grad[:3])
        plan = api.Plan(tokens, o, o.grad_scale)
        t_scalar, t_rows = tokens.temperature_args
        logprobs, _, *grads = triton_linear.fused_forward(
            rows, weight, bias, tokens.ids, t_scalar if t_rows is None else t_rows, tokens.active,
            lambda r0, lp, ent: plan.chunk_coefficients(lp, ent, r0), needs_grad=needs)
        loss, out = plan.finish()
        grad_scale = o.grad_scale
        # Held on ctx, not saved: the backward gives them away (AccumulateGrad keeps the tensor
        # itself when nothing else refers to it, instead of copying grad_weight).
        ctx.grads, ctx.grad_scale = grads, grad_scale
        ctx.mark_non_differentiable(out, logprobs)
        ctx.set_materialize_grads(False)
        if tokens.invalid is not None:
            loss = torch.where(tokens.invalid, float("nan"), loss)
        return loss, out, logprobs

    @staticmethod
    @single_backward
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_out, _grad_logprobs):
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise RuntimeError("fused_linear_grpo_loss computes its gradients in the forward and hands them over "
                               "once: backward through it a second time (retain_graph=True) is not supported")
        if grad_loss is None:
            return (None,) * 6
        for grad in grads:
            if grad is not None and grad.numel() > 0:  # (rows, H): nothing read when g == grad_scale
                torch.ops.grpo_kernels.rescale_gradient_(grad.view(1, grad.shape[0], -1), grad_loss,
                                                         ctx.grad_scale)
        return (*grads, None, None, None)


def _token_local_loss(hidden, weight, bias, tokens, o, api) -> tuple[Tensor, Metrics]:
    rows, weight, bias = _kernel_layout(hidden, weight, bias)
    loss, out, logprobs = _TokenLocalLinear.apply(rows, weight, bias, tokens, o, api)
    return loss, loss_triton.metrics(out, logprobs, tokens, o)


def _prepare(hidden, weight, bias, completion_ids, advantages, mask, old, ref, rollout, sampling, cu_seqlens, o,
             tp_group, vocab_start, needs_advantages, sequence_parallel):
    _check_devices(completion_ids, hidden=hidden, lm_head_weight=weight, lm_head_bias=bias)
    hidden, weight, bias = _autocast(hidden, weight, bias)
    tokens = build_tokens(completion_ids, advantages, mask, old, ref, rollout, sampling, cu_seqlens, o,
                          needs_advantages=needs_advantages)
    if sequence_parallel:  # hidden holds this rank's N / TP rows (distributed.local_rows_layout)
        from ..distributed import local_rows_layout

        check_linear(hidden, weight, bias, local_rows_layout(hidden, tokens.layout, tp_group))
    else:
        check_linear(hidden, weight, bias, tokens.layout)
    start, V = vocab_bounds(weight.shape[0], tp_group, vocab_start, weight.device, weight.dtype)
    check_ids(tokens.ids, V)
    name = resolve_backend(o.backend, hidden.device)
    if name == "cuda":
        raise ValueError("backend='cuda' has no fused-linear sweep; use 'auto', 'triton' or 'torch'")
    return hidden, weight, bias, tokens, name, start


def linear_token_logprobs(
    hidden: Tensor,
    lm_head_weight: Tensor,
    completion_ids: Tensor,
    temperature: float | Tensor = 1.0,
    return_entropy: bool = False,
    mask: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    *,
    lm_head_bias: Tensor | None = None,
    backend: str = "auto",
    tp_group=None,
    vocab_start: int | None = None,
    sequence_parallel: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """log pi(y_t) fp32 shaped like completion_ids (and the entropy with return_entropy) from hidden
    states (B, T, H) / (N, H) and the output projection, in one sweep without the logits. For the
    old- and reference-policy passes under torch.no_grad(); differentiable too."""
    check_temperature(temperature)
    check_bool("return_entropy", return_entropy)
    ids, mask, temperature = rows_without_sequences(completion_ids, mask, temperature, cu_seqlens)
    o = GRPOOptions(temperature=temperature, backend=backend)
    hidden, weight, bias, tokens, name, start = _prepare(
        hidden, lm_head_weight, lm_head_bias, ids, None, mask, None, None, None, None, cu_seqlens, o, tp_group,
        vocab_start, False, sequence_parallel)
    logprobs, entropy = linear_sweep_rows(hidden, weight, bias, tokens, name, tp_group, start, sequence_parallel)
    return logprobs_result(tokens, logprobs, entropy, completion_ids.shape, return_entropy)


def fused_linear_grpo_loss(
    hidden: Tensor,
    lm_head_weight: Tensor,
    completion_ids: Tensor,
    advantages: Tensor,
    completion_mask: Tensor | None = None,
    old_logprobs: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    *,
    lm_head_bias: Tensor | None = None,
    rollout_is_ratio: Tensor | None = None,
    sampling_logprobs: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    tp_group=None,
    vocab_start: int | None = None,
    sequence_parallel: bool = False,
    **options,
) -> tuple[Tensor, Metrics]:
    """The GRPO-family loss of fused_grpo_loss with logits = hidden @ lm_head_weight.T + lm_head_bias,
    computed without materialising them.

    hidden (B, T, H) / (N, H) (packed: (N, H) with cu_seqlens) are the last hidden states at the
    positions that predict completion_ids; lm_head_weight is (V, H) in hidden's dtype (under
    tensor parallelism this rank's (V_local, H) shard), lm_head_bias (V,) or None. Keywords and
    returns are those of fused_grpo_loss; the loss carries the gradient to hidden,
    lm_head_weight and lm_head_bias. Under torch.autocast the three compute in the autocast
    dtype, as F.linear would. `inplace_backward` has no effect (there are no logits to
    overwrite), and backend is auto (Triton on CUDA, chunked PyTorch on the CPU), triton or torch.

    On the Triton backend a token-local loss (SPEC section 14) runs in three GEMM-equivalents (in
    eager mode): the forward computes the gradients too, for an upstream gradient of the option
    `grad_scale` (default 1.0, what loss.backward() brings; a trainer that scales the loss after this
    call, e.g. by 1 / gradient_accumulation_steps, passes that factor). The backward then only hands
    them over; for any other upstream gradient it scales them once by g / grad_scale, decided on the
    device (no host sync). Backward runs once (retain_graph=True and a second backward raise).
    """
    o = GRPOOptions(**options)
    hidden, weight, bias, tokens, name, start = _prepare(
        hidden, lm_head_weight, lm_head_bias, completion_ids, advantages, completion_mask, old_logprobs,
        ref_logprobs, rollout_is_ratio, sampling_logprobs, cu_seqlens, o, tp_group, vocab_start, True,
        sequence_parallel)
    api = _token_local_api() if THREE_GEMM and name == "triton" and tp_group is None \
        and not torch.compiler.is_compiling() else None
    if api is not None and api.token_local(o, tokens, tp_group):
        return _token_local_loss(hidden, weight, bias, tokens, o, api)
    logprobs, entropy = linear_sweep_rows(hidden, weight, bias, tokens, name, tp_group, start, sequence_parallel)
    return objective(logprobs, entropy, tokens, o)
