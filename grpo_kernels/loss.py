"""The GRPO objective over per-token values: the loss layer, written once.

The objective depends on the logits only through two numbers per token, the log-prob of
the sampled token l_t and the entropy H_t (docs/design.md). Given those, this module
computes the ratio, clipping, KL, masks, aggregation and metrics of SPEC section 2, in
TRL 1.16's order. The reference (reference.py) and every fused path call it, and autograd
over these per-token tensors yields the coefficients c_t = dL/dl_t and e_t = dL/dH_t that
the backward sweeps need.

Per-token tensors are flat (N,) in row order; per-sequence ones (S,); the layout
(layout.py) sums over sequences and spreads over tokens, so padded and packed rows share
every line here. Everything runs in the dtype of l (float32, or float64 for the oracle).
"""
from __future__ import annotations

import math

import torch

from .layout import Layout, Tokens, build_tokens
from .options import CLIPPED_LOSS_TYPES, GRPOOptions

Metrics = dict[str, "torch.Tensor | None"]


def _select(positive: torch.Tensor, if_true: float, if_false: float, like: torch.Tensor) -> torch.Tensor:
    return torch.where(positive, like.new_tensor(if_true), like.new_tensor(if_false))


class _Sums:
    """Mask sums, each computed once: over all tokens, and per sequence."""

    def __init__(self, layout: Layout, mask: torch.Tensor):
        self.layout, self.mask = layout, mask
        self.total = mask.sum()
        self._per_seq = None

    @property
    def per_seq(self) -> torch.Tensor:
        if self._per_seq is None:
            self._per_seq = self.layout.seq_sum(self.mask)
        return self._per_seq

    def seq_mean(self, x: torch.Tensor) -> torch.Tensor:
        """(N,) -> (S,): each sequence's masked mean (0 for an empty one)."""
        return self.layout.seq_sum(x * self.mask) / self.per_seq.clamp(min=1.0)

    def token_mean(self, x: torch.Tensor) -> torch.Tensor:
        """TRL's global_masked_mean for one process: a per-sequence (S,) value counts once per sequence."""
        if x.shape[0] == self.layout.num_seqs and x.shape[0] != self.mask.shape[0]:
            return x.sum() / max(x.shape[0], 1)
        return (x * self.mask).sum() / self.total.clamp(min=1.0)


def _high_entropy_mask(entropy: torch.Tensor, sums: _Sums, quantile: float) -> torch.Tensor:
    """Tokens whose entropy is at or above the (1 - quantile) quantile of the masked entropies.

    nanquantile over the masked values (NaN elsewhere) needs no data-dependent shape, so it
    never waits for the device; with no masked token the threshold is NaN and no token passes.
    """
    mask = sums.mask
    on = mask != 0
    threshold = torch.nanquantile(torch.where(on, entropy, float("nan")), 1.0 - quantile)
    return ((entropy * mask >= threshold) & on).to(mask.dtype)


def _off_policy_mask(A: torch.Tensor, logprobs: torch.Tensor, sampling: torch.Tensor, sums: _Sums,
                     threshold: float) -> torch.Tensor:
    """DeepSeek-V3.2's sequence mask: drop a sequence when A < 0 and mean(l_sampling - l) > threshold."""
    drift = torch.nan_to_num(sampling - logprobs.detach(), nan=0.0)
    mean_drift = sums.layout.seq_expand(sums.seq_mean(drift))
    return ((A >= 0) | (mean_drift <= threshold)).to(sums.mask.dtype)


@torch.no_grad()
def _vespo_weight(A: torch.Tensor, log_ratio: torch.Tensor, sums: _Sums, rollout_is_ratio: torch.Tensor | None,
                  o: GRPOOptions) -> torch.Tensor:
    """VESPO's detached gamma weight phi(w) = exp(lambda + k log w - lambda w), w the sequence ratio (per token)."""
    layout = sums.layout
    log_floor = math.log(1e-8)
    log_w = layout.seq_sum(log_ratio.clamp(-20.0, 20.0) * sums.mask)
    if rollout_is_ratio is not None:  # TRL sums the sampler's log-ratio over every position
        log_w = log_w + layout.seq_sum(rollout_is_ratio.log().clamp(log_floor, 20.0))
    log_w = layout.seq_expand(log_w.clamp(log_floor, 20.0))
    nonneg = A >= 0
    k = _select(nonneg, o.vespo_k_pos, o.vespo_k_neg, log_w)
    lam = _select(nonneg, o.vespo_lambda_pos, o.vespo_lambda_neg, log_w).clamp(min=1e-4)
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


def _divisor(n: float | torch.Tensor | None, default: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
    """num_items_in_batch / num_sequences_in_batch (kept on the device), or the default, at least 1."""
    value = default if n is None else n
    return torch.as_tensor(value, dtype=like.dtype, device=like.device).clamp(min=1.0)


def objective(logprobs: torch.Tensor, entropy: torch.Tensor, tokens: Tokens, o: GRPOOptions
              ) -> tuple[torch.Tensor, Metrics]:
    """The loss and metrics from flat (N,) log-probs and entropies and the checked inputs."""
    layout = tokens.layout
    dtype = logprobs.dtype
    N, S = layout.num_rows, layout.num_seqs
    as_dtype = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    mask = torch.ones_like(logprobs) if tokens.mask is None else tokens.mask.to(dtype)
    sums = _Sums(layout, mask)
    tok = lambda t, per_seq: layout.seq_expand(t) if per_seq else t  # noqa: E731

    adv_per_seq = tokens.per_seq(tokens.advantages)
    A_raw = tokens.advantages.to(dtype)  # (S,) or (N,)
    A = tok(A_raw, adv_per_seq)
    # mu = 1: old == current in value, so r == 1 while its gradient is that of l.
    old = logprobs.detach() if tokens.old_logprobs is None else tokens.old_logprobs.to(dtype)
    is_ratio = as_dtype(tokens.rollout_is_ratio)
    is_ratio = None if is_ratio is None else tok(is_ratio, tokens.per_seq(tokens.rollout_is_ratio))

    log_ratio = logprobs - old
    token_ratio = torch.exp(log_ratio)
    seq_level = o.importance_sampling_level == "sequence"
    if seq_level:  # GSPO: one ratio per sequence
        seq_ratio = torch.exp(sums.seq_mean(log_ratio))  # (S,)
        ratio = layout.seq_expand(seq_ratio)
    else:
        ratio = token_ratio
    # TRL's metrics count a (B, 1) quantity once per sequence.
    metric_ratio, metric_A = (seq_ratio, A_raw) if seq_level and adv_per_seq else (ratio, A)

    eps_low, eps_high = o.epsilon_low, o.eps_high
    clip_low = clip_high = clip_region = None
    if o.loss_type in CLIPPED_LOSS_TYPES:
        clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
        unclipped = ratio if o.delta is None else torch.clamp(ratio, max=o.delta)
        per_token_loss = -torch.min(unclipped * A, clipped * A)
        if o.dual_clip is not None:  # for A < 0 the loss is capped at -c A
            per_token_loss = torch.where(A < 0, torch.min(per_token_loss, -o.dual_clip * A), per_token_loss)
        is_low = (metric_ratio < 1.0 - eps_low) & (metric_A < 0)
        is_high = (metric_ratio > 1.0 + eps_high) & (metric_A > 0)
        clip_low, clip_high = sums.token_mean(is_low.to(dtype)), sums.token_mean(is_high.to(dtype))
        clip_region = sums.token_mean((is_low | is_high).to(dtype))
    elif o.loss_type == "cispo":  # epsilon_high is an absolute cap on the detached weight
        per_token_loss = -torch.clamp(ratio, max=eps_high).detach() * A * logprobs
        clip_high = sums.token_mean(((metric_ratio > eps_high) & (metric_A > 0)).to(dtype))
    elif o.loss_type == "sapo":
        tau = _select(A > 0, o.sapo_temperature_pos, o.sapo_temperature_neg, A)
        per_token_loss = -(torch.sigmoid(tau * (ratio - 1.0)) * 4.0 / tau) * A
    else:  # vespo
        phi = _vespo_weight(A, log_ratio, sums, is_ratio, o)
        per_token_loss = -phi * A * logprobs

    # Multipliers of the policy term, in TRL's order.
    if o.off_policy_mask_threshold is not None:
        sampling = old if tokens.sampling_logprobs is None else tokens.sampling_logprobs.to(dtype)
        per_token_loss = per_token_loss * _off_policy_mask(A, logprobs, sampling, sums, o.off_policy_mask_threshold)
    entropy_mask = None
    if o.top_entropy_quantile < 1.0:
        entropy_mask = _high_entropy_mask(entropy.detach(), sums, o.top_entropy_quantile)
        per_token_loss = per_token_loss * entropy_mask
    if is_ratio is not None and o.loss_type != "vespo":
        per_token_loss = per_token_loss * is_ratio

    kl_metric = None
    if o.beta != 0.0:
        kl = _kl_estimate(logprobs, tokens.ref_logprobs.to(dtype), o.kl_estimator)
        if o.use_bias_correction_kl:  # r differentiable: an unbiased reverse-KL gradient for any mu
            kl = kl * (ratio if o.kl_ratio == "sequence" else token_ratio)
        per_token_loss = per_token_loss + o.beta * kl
        kl_metric = sums.token_mean(kl.detach())

    # Means over sequences divide by max(S, 1): an empty batch gives 0, not NaN.
    num_seqs = _divisor(o.num_sequences_in_batch, S, mask)
    if o.loss_type in ("grpo", "sapo"):
        loss = sums.seq_mean(per_token_loss).sum() / num_seqs
    elif o.loss_type == "bnpo":
        loss = (per_token_loss * mask).sum() / sums.total.clamp(min=1.0)
    elif o.loss_type == "dr_grpo":
        loss = (per_token_loss * mask).sum() / (num_seqs * (o.max_completion_length or layout.seq_len or 1))
    elif o.loss_type == "luspo":
        loss = (per_token_loss * mask).sum() / num_seqs
    else:  # dapo, cispo, vespo
        loss = (per_token_loss * mask).sum() / _divisor(o.num_items_in_batch, sums.total, mask)

    if o.entropy_coef != 0.0:  # bonus over the tokens the policy term acts on; gradient flows through H
        bonus_mask = mask if entropy_mask is None else mask * entropy_mask
        loss = loss - o.entropy_coef * (entropy * bonus_mask).sum() / bonus_mask.sum().clamp(min=1.0)

    if tokens.invalid is not None:  # a value check that could not raise without waiting for the device
        loss = torch.where(tokens.invalid, float("nan"), loss)
    metrics: Metrics = {
        "kl": kl_metric,
        "entropy": sums.token_mean(entropy.detach()),
        "clip_ratio_low": clip_low,
        "clip_ratio_high": clip_high,
        "clip_ratio_region": clip_region,
        # A copy: the caller may modify it in place without touching what autograd saved.
        "logprobs": layout.unflat(logprobs.detach().clone()),
    }
    return loss, metrics


def grpo_loss_from_logprobs(
    logprobs: torch.Tensor,
    entropy: torch.Tensor | None,
    advantages: torch.Tensor,
    completion_mask: torch.Tensor | None = None,
    old_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    rollout_is_ratio: torch.Tensor | None = None,
    sampling_logprobs: torch.Tensor | None = None,
    o: GRPOOptions | None = None,
    *,
    cu_seqlens: torch.Tensor | None = None,
    **keywords,
) -> tuple[torch.Tensor, Metrics]:
    """The GRPO-family loss and its metrics from per-token log-probs (and entropies).

    logprobs (B, T) (or packed (N,) with cu_seqlens) may carry a gradient: the loss is
    differentiable in them (and in entropy). For a trainer that computes its log-probs
    itself (verl's policy loss, a custom loop). Options as `GRPOOptions` (or its keywords).
    """
    o = GRPOOptions(**keywords) if o is None else o
    if not isinstance(logprobs, torch.Tensor) or not logprobs.is_floating_point():
        raise TypeError("logprobs must be a floating-point tensor")
    # The shape and dtype checks of completion_ids stand in for those of the per-token layout.
    ids = torch.zeros(logprobs.shape, dtype=torch.int64, device=logprobs.device)
    tokens = build_tokens(ids, advantages, completion_mask, old_logprobs, ref_logprobs, rollout_is_ratio,
                          sampling_logprobs, cu_seqlens, o)
    flat = tokens.layout.flat
    dtype = torch.promote_types(logprobs.dtype, torch.float32)
    lp = flat(logprobs).to(dtype)
    ent = torch.zeros_like(lp) if entropy is None else flat(entropy).to(dtype)
    return objective(lp, ent, tokens, o)
