"""The GRPO objective in plain PyTorch: the oracle of every test, and the loss layer of the
fused path.

The objective depends on the logits only through two numbers per token, the log-prob of
the sampled token l_t and the entropy H_t (docs/design.md). So it splits in two:

- `token_logprobs`: logits (B, T, V) -> l, H (B, T). The fused backends replace this
  function with a vocabulary sweep; here it is log_softmax and autograd.
- `grpo_loss_from_logprobs`: (l, H) and the per-token inputs -> (loss, metrics). The
  ratio, clipping, KL, masks, aggregation and metrics of SPEC section 2, written once,
  in TRL 1.16's order. The fused path calls this very function, and autograd over these
  (B, T) tensors yields the per-token coefficients c_t = dL/dl_t and dL/dH_t that the
  backward sweeps need.

Everything runs in the dtype of the logits promoted to at least float32, so float64
inputs give a float64 oracle.
"""
from __future__ import annotations

import math

import torch

from .options import CLIPPED_LOSS_TYPES, GRPOOptions, check_inputs

Metrics = dict[str, "torch.Tensor | None"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype that per-token math runs in: float32, or float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def token_logprobs(
    logits: torch.Tensor, completion_ids: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(y) and the entropy of pi at each position; logits (..., V), ids (...)."""
    z = logits.to(compute_dtype(logits.dtype)) / temperature
    logp = torch.log_softmax(z, dim=-1)
    logprobs = logp.gather(-1, completion_ids.long().unsqueeze(-1)).squeeze(-1)
    # A -inf logit has p = 0 and adds nothing to the entropy; clamping its log keeps
    # 0 * log 0 (and its gradient) at 0 instead of NaN.
    entropy = -(logp.exp() * logp.clamp(min=torch.finfo(logp.dtype).min)).sum(-1)
    return logprobs, entropy


def _by_sign(positive: torch.Tensor, if_true: float, if_false: float, like: torch.Tensor) -> torch.Tensor:
    return torch.where(positive, like.new_tensor(if_true), like.new_tensor(if_false))


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """TRL's global_masked_mean for one process: (B, 1) values count once per sequence."""
    if x.shape[-1] == 1 and mask.shape[-1] != 1:
        return x.sum() / max(x.shape[0], 1)
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def _high_entropy_mask(entropy: torch.Tensor, mask: torch.Tensor, quantile: float) -> torch.Tensor:
    """Tokens whose entropy is at or above the (1 - quantile) quantile of the masked entropies."""
    active = entropy[mask.bool()]
    if active.numel() == 0:
        return torch.zeros_like(mask)
    threshold = torch.quantile(active, 1.0 - quantile)
    return ((entropy * mask >= threshold) & mask.bool()).to(mask.dtype)


def _off_policy_mask(advantages: torch.Tensor, logprobs: torch.Tensor, sampling_logprobs: torch.Tensor,
                     mask: torch.Tensor, threshold: float) -> torch.Tensor:
    """DeepSeek-V3.2's sequence mask: drop a sequence when A < 0 and mean(l_sampling - l) > threshold."""
    drift = torch.nan_to_num(sampling_logprobs - logprobs.detach(), nan=0.0)
    mean_drift = (drift * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0)
    return ((advantages >= 0) | (mean_drift <= threshold)).to(mask.dtype)


@torch.no_grad()
def _vespo_weight(advantages: torch.Tensor, log_ratio: torch.Tensor, mask: torch.Tensor,
                  rollout_is_ratio: torch.Tensor | None, o: GRPOOptions) -> torch.Tensor:
    """VESPO's detached gamma weight phi(w) = exp(lambda + k log w - lambda w), w the sequence ratio."""
    log_floor = math.log(1e-8)
    log_w = (log_ratio.clamp(-20.0, 20.0) * mask).sum(-1, keepdim=True)
    if rollout_is_ratio is not None:
        log_w = log_w + rollout_is_ratio.log().clamp(log_floor, 20.0).sum(-1, keepdim=True)
    log_w = log_w.clamp(log_floor, 20.0)
    nonneg = advantages >= 0
    k = _by_sign(nonneg, o.vespo_k_pos, o.vespo_k_neg, log_w)
    lam = _by_sign(nonneg, o.vespo_lambda_pos, o.vespo_lambda_neg, log_w).clamp(min=1e-4)
    phi = torch.exp(lam + k * log_w - lam * log_w.exp())
    return phi.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def _kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """Schulman's estimators of KL(pi_theta || pi_ref) on a sample, with Delta = l - l_ref."""
    delta = logprobs - ref_logprobs
    if estimator == "k1":
        return delta
    if estimator == "k2":
        return 0.5 * delta * delta
    return torch.exp(-delta) - 1.0 + delta


def grpo_loss_from_logprobs(
    logprobs: torch.Tensor,
    entropy: torch.Tensor,
    advantages: torch.Tensor,
    completion_mask: torch.Tensor | None,
    old_logprobs: torch.Tensor | None,
    ref_logprobs: torch.Tensor | None,
    rollout_is_ratio: torch.Tensor | None,
    sampling_logprobs: torch.Tensor | None,
    o: GRPOOptions,
) -> tuple[torch.Tensor, Metrics]:
    """The GRPO-family loss and its metrics from per-token log-probs and entropies (B, T).

    Follows TRL 1.16's GRPOTrainer._compute_loss for one process without gradient
    accumulation; where TRL differs (the GSPO KL weight), see GRPOOptions.kl_ratio.
    """
    dtype = logprobs.dtype
    B, T = logprobs.shape
    mask = torch.ones_like(logprobs) if completion_mask is None else completion_mask.to(dtype)
    A = advantages.to(dtype)
    A = A.unsqueeze(1) if A.dim() == 1 else A
    # mu = 1: old == current in value, so r == 1 while its gradient is that of l.
    old = logprobs.detach() if old_logprobs is None else old_logprobs.to(dtype)
    is_ratio = None if rollout_is_ratio is None else rollout_is_ratio.to(dtype)

    log_ratio = logprobs - old
    token_ratio = torch.exp(log_ratio)
    if o.importance_sampling_level == "sequence":  # GSPO: one ratio per sequence
        seq_log_ratio = (log_ratio * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0)
        ratio = torch.exp(seq_log_ratio)
    else:
        ratio = token_ratio

    eps_low, eps_high = o.epsilon_low, o.eps_high
    clip_low = clip_high = clip_region = None
    if o.loss_type in CLIPPED_LOSS_TYPES:
        clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
        unclipped = ratio if o.delta is None else torch.clamp(ratio, max=o.delta)
        per_token_loss = -torch.min(unclipped * A, clipped * A)
        if o.dual_clip is not None:  # for A < 0 the loss is capped at -c A
            per_token_loss = torch.where(A < 0, torch.min(per_token_loss, -o.dual_clip * A), per_token_loss)
        is_low = (ratio < 1.0 - eps_low) & (A < 0)
        is_high = (ratio > 1.0 + eps_high) & (A > 0)
        clip_low, clip_high = _masked_mean(is_low.to(dtype), mask), _masked_mean(is_high.to(dtype), mask)
        clip_region = _masked_mean((is_low | is_high).to(dtype), mask)
    elif o.loss_type == "cispo":  # epsilon_high is an absolute cap on the detached weight
        per_token_loss = -torch.clamp(ratio, max=eps_high).detach() * A * logprobs
        clip_high = _masked_mean(((ratio > eps_high) & (A > 0)).to(dtype), mask)
    elif o.loss_type == "sapo":
        tau = _by_sign(A > 0, o.sapo_temperature_pos, o.sapo_temperature_neg, A)
        per_token_loss = -(torch.sigmoid(tau * (ratio - 1.0)) * 4.0 / tau) * A
    else:  # vespo
        phi = _vespo_weight(A, log_ratio, mask, is_ratio, o)
        per_token_loss = -phi * A * logprobs

    # Multipliers of the policy term, in TRL's order.
    if o.off_policy_mask_threshold is not None:
        sampling = old if sampling_logprobs is None else sampling_logprobs.to(dtype)
        per_token_loss = per_token_loss * _off_policy_mask(A, logprobs, sampling, mask, o.off_policy_mask_threshold)
    entropy_mask = None
    if o.top_entropy_quantile < 1.0:
        entropy_mask = _high_entropy_mask(entropy.detach(), mask, o.top_entropy_quantile)
        per_token_loss = per_token_loss * entropy_mask
    if is_ratio is not None and o.loss_type != "vespo":
        per_token_loss = per_token_loss * is_ratio

    kl_metric = None
    if o.beta != 0.0:
        kl = _kl_estimate(logprobs, ref_logprobs.to(dtype), o.kl_estimator)
        if o.use_bias_correction_kl:  # r differentiable: an unbiased reverse-KL gradient for any mu
            kl = kl * (ratio if o.kl_ratio == "sequence" else token_ratio)
        per_token_loss = per_token_loss + o.beta * kl
        kl_metric = _masked_mean(kl.detach(), mask)

    # Means over sequences are sums / max(B, 1): an empty batch gives 0, not NaN.
    if o.loss_type in ("grpo", "sapo"):
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).sum() / max(B, 1)
    elif o.loss_type == "bnpo":
        loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    elif o.loss_type == "dr_grpo":
        loss = (per_token_loss * mask).sum() / max(B * (o.max_completion_length or T), 1)
    elif o.loss_type == "luspo":
        loss = (per_token_loss * mask).sum() / max(B, 1)
    else:  # dapo, cispo, vespo
        n_items = (mask.sum() if o.num_items_in_batch is None
                   else torch.as_tensor(o.num_items_in_batch, dtype=dtype, device=mask.device))
        loss = (per_token_loss * mask).sum() / n_items.clamp(min=1.0)

    if o.entropy_coef != 0.0:  # bonus over the tokens the policy term acts on; gradient flows through H
        bonus_mask = mask if entropy_mask is None else mask * entropy_mask
        loss = loss - o.entropy_coef * (entropy * bonus_mask).sum() / bonus_mask.sum().clamp(min=1.0)

    metrics: Metrics = {
        "kl": kl_metric,
        "entropy": _masked_mean(entropy.detach(), mask),
        "clip_ratio_low": clip_low,
        "clip_ratio_high": clip_high,
        "clip_ratio_region": clip_region,
        "logprobs": logprobs.detach(),
    }
    return loss, metrics


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
    **keywords,
) -> tuple[torch.Tensor, Metrics]:
    """The whole objective on materialised log-softmax: same signature as fused_grpo_loss."""
    o = GRPOOptions(**keywords)
    shapes = check_inputs(logits, completion_ids, advantages, completion_mask, old_logprobs, ref_logprobs,
                          rollout_is_ratio, sampling_logprobs, o)
    logits = logits if logits.dim() == 3 else logits.unflatten(0, (shapes.B, shapes.T))
    logprobs, entropy = token_logprobs(logits, completion_ids, o.temperature)
    return grpo_loss_from_logprobs(logprobs, entropy, advantages, completion_mask, old_logprobs, ref_logprobs,
                                   rollout_is_ratio, sampling_logprobs, o)
