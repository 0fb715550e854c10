"""The GRPO objective over per-token values: the loss layer, written once.

The objective depends on the logits only through two numbers per token, the log-prob of
the sampled token l_t and the entropy H_t (docs/design.md). Given those, this module
computes the ratio, clipping, KL, masks, aggregation and metrics of SPEC section 2, in
TRL 1.16's order, and verl 0.9.1's policy losses and agg_loss modes (SPEC section 10;
docs/math.md section 11). The reference (reference.py) and every fused path call it, and autograd
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
from .options import CLIPPED_LOSS_TYPES, VERL_LOSS_TYPES, GRPOOptions
from .stats import compute_dtype

Metrics = dict[str, "torch.Tensor | None"]


def _select(positive: torch.Tensor, if_true: float, if_false: float, like: torch.Tensor) -> torch.Tensor:
    return torch.where(positive, like.new_tensor(if_true), like.new_tensor(if_false))


class _Sums:
    """Mask sums, each computed once: over all tokens, and per sequence."""

    def __init__(self, layout: Layout, mask: torch.Tensor, integer_mask: bool = True):
        self.layout, self.mask = layout, mask
        self.total = mask.sum()
        self._per_seq = None
        self.integer_mask = integer_mask  # the caller's mask was bool/int (or None): see plus_eps

    def plus_eps(self, n: torch.Tensor) -> torch.Tensor:
        """verl's `count + 1e-8` denominators: with verl's bool masks the count is an int64 tensor and
        torch adds 1e-8 in float32, which leaves any count >= 1 exact; with a float mask, n + 1e-8."""
        return n.clamp(min=1e-8) if self.integer_mask else n + 1e-8

    @property
    def per_seq(self) -> torch.Tensor:
        if self._per_seq is None:
            self._per_seq = self.layout.seq_sum(self.mask)
        return self._per_seq

    def seq_mean(self, x: torch.Tensor) -> torch.Tensor:
        """(N,) -> (S,): each sequence's masked mean (0 for an empty one)."""
        return self.layout.seq_sum(x * self.mask) / self.per_seq.clamp(min=1.0)

    def token_mean(self, x: torch.Tensor, per_seq: bool = False) -> torch.Tensor:
        """TRL's global_masked_mean for one process: a per-token (N,) value is a masked mean over
        tokens; a per-sequence (S,) value (per_seq) counts once per sequence, empty ones included.
        (Said, not guessed from the shape: packed rows can have S == N.)"""
        if per_seq:
            return x.sum() / max(self.layout.num_seqs, 1)
        return (x * self.mask).sum() / self.total.clamp(min=1.0)


def _high_entropy_mask(entropy: torch.Tensor, sums: _Sums, quantile: float) -> torch.Tensor:
    """Tokens whose entropy is at or above the (1 - quantile) quantile of the masked entropies.

    The quantile of torch.quantile (linear interpolation between the two nearest ranks), taken on
    the entropies sorted with the masked-out ones last: no data-dependent shape, so it never waits
    for the device, and unlike torch.nanquantile it traces with symbolic sizes on torch 2.11
    (SPEC 19). With no masked token the threshold is NaN and no token passes.
    """
    mask = sums.mask
    if mask.numel() == 0:
        return mask
    on = mask != 0
    ranked = torch.where(on, entropy, float("inf")).sort().values
    pos = (1.0 - quantile) * (on.sum() - 1).to(ranked.dtype)
    lo = pos.floor().clamp(min=0)
    low, high = ranked.gather(0, torch.stack([lo, pos.ceil().clamp(min=0)]).long())  # gather: no .item()
    threshold = low + (pos - lo) * (high - low)
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
    if rollout_is_ratio is not None:  # TRL sums it over every position; a masked one reads as 1 here (never read)
        log_w = log_w + layout.seq_sum(rollout_is_ratio.log().clamp(log_floor, 20.0))
    log_w = layout.seq_expand(log_w.clamp(log_floor, 20.0))
    nonneg = A >= 0
    k = _select(nonneg, o.vespo_k_pos, o.vespo_k_neg, log_w)
    lam = _select(nonneg, o.vespo_lambda_pos, o.vespo_lambda_neg, log_w).clamp(min=1e-4)
    phi = torch.exp(lam + k * log_w - lam * log_w.exp())
    return phi.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def _masked_reader(active: torch.Tensor | None):
    """x -> x at the active positions and `neutral` at the masked ones: a masked position is never
    read, so a NaN or inf there changes nothing (docs/design.md, "Non-finite inputs")."""
    if active is None:
        return lambda x, neutral=0.0: x
    return lambda x, neutral=0.0: None if x is None else torch.where(active, x, neutral)


def _poison(*values: torch.Tensor | None) -> torch.Tensor:
    """(N,): 0, or NaN at the tokens where one of `values` (per token, already 0 at the masked
    positions) is NaN or +-inf. Added as sum(poison * l) to the loss, it makes the loss NaN and
    dL/dl NaN at those tokens: a non-finite input never gives a finite number."""
    bad = None
    for x in values:
        if x is not None:
            b = ~torch.isfinite(x)
            bad = b if bad is None else bad | b
    return torch.where(bad, float("nan"), 0.0).to(values[0].dtype)


def _kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str,
                 clamp: float | None = None) -> torch.Tensor:
    """Schulman's estimators of KL(pi_theta || pi_ref) on a sample, with Delta = l - l_ref.

    With `clamp` (kl_clamp) the estimate is clamped to [-clamp, clamp] (OpenRLHF, verl's
    low_var_kl) and k3 is computed as verl's kl_penalty_forward: log rho clamped to [-20, 20]."""
    delta = logprobs - ref_logprobs
    if estimator == "k1":
        kl = delta
    elif estimator == "k2":
        kl = 0.5 * delta * delta
    elif clamp is not None:
        log_rho = torch.clamp(ref_logprobs - logprobs, min=-20, max=20)
        kl = torch.exp(log_rho) - log_rho - 1
    else:
        kl = torch.exp(-delta) - 1.0 + delta
    return kl if clamp is None else torch.clamp(kl, min=-clamp, max=clamp)


def _divisor(n: float | torch.Tensor | None, default: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
    """num_items_in_batch / num_sequences_in_batch (kept on the device), or the default, at least 1."""
    value = default if n is None else n
    if isinstance(value, torch.Tensor):
        return value.to(like.dtype).clamp(min=1.0)
    # full() keeps a symbolic count symbolic under torch.compile (as_tensor would specialise it).
    return like.new_full((), value).clamp(min=1.0)


def _verl_mean(x: torch.Tensor, sums: _Sums) -> torch.Tensor:
    """verl's masked_mean: sum(where(m, x, 0) m) / (sum m + 1e-8), its metrics' and covariances' mean."""
    mask = sums.mask
    x = x.to(mask.dtype)
    return (torch.where(mask != 0, x, 0.0) * mask).sum() / sums.plus_eps(sums.total)


def _ranks(keys: torch.Tensor, descending: bool = False) -> torch.Tensor:
    """Each entry's position in the (stable) sorted order: a top-k with a k on the device, no host sync."""
    order = torch.argsort(keys, descending=descending, stable=True)
    return torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=keys.device))


def _random_subset(candidates: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """A uniformly random subset of min(k, #candidates) of the candidates (verl's randperm pick),
    made by ranking i.i.d. uniform keys, so the count k may stay on the device."""
    keys = torch.rand(candidates.shape, dtype=torch.float64, device=candidates.device)
    return candidates & (_ranks(torch.where(candidates, keys, 2.0)) < k)


def _vllm_is_ratio(raw: torch.Tensor, per_seq: bool, sums: _Sums, o: GRPOOptions) -> tuple[torch.Tensor, bool]:
    """TRL 1.16's vLLM importance-sampling correction of the raw sampler ratio exp(l_old - l_sampler).

    As TRL computes it (grpo_trainer.py, _generate_and_score_completions): the log-ratio weighted by
    the mask, NaN -> 0 (ratio 1); summed over each sequence for the sequence_* modes; then clamped
    to [clip_min, clip_max] (*_truncate) or set to 0 outside it (*_mask). A ratio given per
    sequence is that sequence's ratio already. Returns the ratio and whether it is per sequence."""
    mode = o.vllm_importance_sampling_mode
    lo, hi = o.vllm_importance_sampling_clip_min, o.vllm_importance_sampling_clip_max
    log_r = torch.log(raw)
    if not per_seq:
        log_r = torch.where(sums.mask != 0, log_r, 0.0) * sums.mask
    log_r = torch.nan_to_num(log_r, nan=0.0)
    if mode.startswith("sequence") and not per_seq:
        log_r, per_seq = sums.layout.seq_sum(log_r), True
    ratio = torch.exp(log_r)
    if mode.endswith("_truncate"):
        ratio = torch.clamp(ratio, min=lo, max=hi)
    else:
        outside = (ratio < (-math.inf if lo is None else lo)) | (ratio > (math.inf if hi is None else hi))
        ratio = ratio.masked_fill(outside, 0.0)
    return ratio, per_seq


def _verl_agg(x: torch.Tensor, sums: _Sums, o: GRPOOptions, mode: str) -> torch.Tensor:
    """verl 0.9.1's agg_loss(x, mask, mode, dp_size, batch_num_tokens, global_batch_size, loss_scale_factor).

    Exactly verl's arithmetic, except that an empty batch (a zero normaliser) gives 0, not NaN."""
    layout, mask = sums.layout, sums.mask
    as_t = lambda v: torch.as_tensor(v, dtype=x.dtype, device=x.device)  # noqa: E731
    nonzero = lambda n: torch.where(n == 0, torch.ones_like(n), n)  # noqa: E731
    masked = torch.where(mask != 0, x, 0.0) * mask
    if mode == "token-sum":
        return masked.sum() * o.dp_size
    if mode == "token-mean":
        n = sums.total if o.batch_num_tokens is None else as_t(o.batch_num_tokens)
        return masked.sum() / nonzero(n) * o.dp_size
    per_seq = sums.per_seq
    seq = layout.seq_sum(masked)
    if mode == "seq-mean-token-mean":
        seq = seq / sums.plus_eps(per_seq)
    seq_mask = (per_seq > 0).to(x.dtype)  # fully masked sequences do not count
    n = seq_mask.sum() if o.global_batch_size is None else as_t(o.global_batch_size)
    loss = (torch.where(seq_mask != 0, seq, 0.0) * seq_mask).sum() / nonzero(n) * o.dp_size
    if mode == "seq-mean-token-sum-norm":
        factor = o.loss_scale_factor if o.loss_scale_factor is not None else layout.seq_len
        if factor is None:
            raise ValueError("loss_agg_mode='seq-mean-token-sum-norm' on packed rows needs loss_scale_factor "
                             "(verl's default is the padded response length)")
        loss = loss / factor
    return loss


class _VerlTerm:
    """A verl-only policy term: the per-token loss (None for geo_mean), geo_mean's per-sequence loss,
    the TRL-named clip metrics and verl's metrics."""

    def __init__(self, per_token, seq=None, clip=(None, None, None), verl=None):
        self.per_token, self.seq, self.clip, self.verl = per_token, seq, clip, verl


def _verl_policy(o: GRPOOptions, logprobs: torch.Tensor, old: torch.Tensor, log_ratio: torch.Tensor,
                 ratio: torch.Tensor, A: torch.Tensor, sums: _Sums, is_ratio: torch.Tensor | None) -> _VerlTerm:
    """verl 0.9.1's per-token formulas (core_algos.compute_policy_loss_<mode>) for the loss types TRL lacks."""
    mask, layout = sums.mask, sums.layout
    dtype = mask.dtype
    vm = lambda x: _verl_mean(x.detach(), sums)  # noqa: E731
    tm = lambda b: sums.token_mean(b.to(dtype))  # noqa: E731
    eps_low, eps_high = o.epsilon_low, o.eps_high
    ppo_kl = vm(-log_ratio)
    zero = mask.new_zeros(())
    lt = o.loss_type
    if lt in ("dppo_tv", "dppo_kl"):  # a trust region on the probability, by the sign of A
        w = torch.clamp(ratio, max=o.clip_ratio_c).detach()
        p, p_old = torch.exp(logprobs), torch.exp(old)
        if lt == "dppo_tv":
            keep_pos, keep_neg = (p - p_old) <= eps_high, (p - p_old) >= -eps_low
        else:
            binary_kl = p_old * (old - logprobs) + (1 - p_old) * torch.log((1.0 - p_old + 1e-8) / (1.0 - p + 1e-8))
            keep_pos, keep_neg = (binary_kl <= eps_high) | (p <= p_old), (binary_kl <= eps_low) | (p >= p_old)
        positive = A > 0
        valid = torch.where(positive, keep_pos, keep_neg).detach().to(dtype)
        out = valid == 0
        return _VerlTerm(-A * w * logprobs * valid,
                         clip=(tm(out & ~positive), tm(out & positive), tm(out)),
                         verl=dict(ppo_kl=ppo_kl, pg_clipfrac=vm(1.0 - valid),
                                   pg_clipfrac_lower=vm((ratio > o.clip_ratio_c).to(dtype) * valid)))
    if lt == "gpg":
        return _VerlTerm(-logprobs * A, verl=dict(ppo_kl=None, pg_clipfrac=None, pg_clipfrac_lower=None))
    if lt == "dro":
        return _VerlTerm(-(logprobs * A - 0.5 * o.dro_beta * log_ratio.square()),
                         verl=dict(ppo_kl=ppo_kl, pg_clipfrac=None, pg_clipfrac_lower=None))
    if lt == "cispo_verl":  # the detached weight clipped on both sides
        clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
        low, high = ratio < 1 - eps_low, ratio > 1 + eps_high
        return _VerlTerm(-clipped.detach() * A * logprobs, clip=(tm(low), tm(high), tm(low | high)),
                         verl=dict(ppo_kl=ppo_kl, pg_clipfrac=vm((ratio != clipped).to(dtype)),
                                   pg_clipfrac_lower=zero))
    active = mask != 0
    if lt == "clip_cov":  # PPO clip; a random few tokens of high cov(A, l) lose their gradient
        pg1, pg2 = -A * ratio, -A * torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
        by_origin = (pg2 > pg1) & active
        lp = logprobs.detach()
        cov = (A - vm(A)) * (lp - vm(lp))
        candidates = (cov < o.clip_cov_ub) & (cov > o.clip_cov_lb) & active & ~by_origin
        k = torch.floor(o.clip_cov_ratio * mask.sum().to(torch.float64)).clamp(min=1.0)
        chosen = _random_subset(candidates, k)
        is_low, is_high = (ratio < 1 - eps_low) & (A < 0), (ratio > 1 + eps_high) & (A > 0)
        return _VerlTerm(torch.maximum(pg1, pg2) * (~chosen).to(dtype),
                         clip=(tm(is_low), tm(is_high), tm(is_low | is_high)),
                         verl=dict(ppo_kl=ppo_kl, pg_clipfrac=vm(chosen), pg_clipfrac_lower=None))
    if lt == "kl_cov":  # the top kl_cov_ratio of tokens by cov(A, l) get + ppo_kl_coef |l - l_old|
        n = active.sum()
        act, nf = active.to(dtype), n.to(dtype)
        lp = logprobs.detach()
        cov = torch.where(active, (A - (A * act).sum() / nf) * (lp - (lp * act).sum() / nf), -math.inf)
        k = torch.floor(n.to(torch.float64) * o.kl_cov_ratio).clamp(min=1.0)
        top = (_ranks(cov, descending=True) < k) & active
        abs_kl = log_ratio.abs()
        pg1 = -A * ratio
        return _VerlTerm(torch.where(top, -A * ratio + o.ppo_kl_coef * abs_kl, pg1),
                         verl=dict(ppo_kl=vm(abs_kl), pg_clipfrac=None, pg_clipfrac_lower=None))
    # geo_mean (GMPO): the geometric mean of the sign-clipped token ratios, one term per sequence
    sign = torch.sign(A)
    clamped = torch.clamp(log_ratio, -eps_low, eps_high)
    log_min = sign * torch.min(sign * log_ratio, sign * clamped)
    n = sums.plus_eps(sums.per_seq)
    seq_loss = -(layout.seq_sum(A * mask) / n) * torch.exp(layout.seq_sum(log_min * mask) / n)
    if is_ratio is not None:  # verl: the geometric mean of the token weights
        seq_loss = seq_loss * torch.exp(layout.seq_sum(torch.log(is_ratio + 1e-10) * mask) / n)
    clipped = log_ratio != clamped
    return _VerlTerm(None, seq=seq_loss,
                     clip=(tm(clipped & (A < 0)), tm(clipped & (A > 0)), tm(clipped & (A != 0))),
                     verl=dict(ppo_kl=ppo_kl, pg_clipfrac=vm(clipped & (A > 0)),
                               pg_clipfrac_lower=vm(clipped & (A < 0))))


def _verl_metrics_trl(o: GRPOOptions, log_ratio: torch.Tensor, ratio: torch.Tensor, A: torch.Tensor,
                      sums: _Sums) -> Metrics:
    """verl's metrics (ppo_kl, pg_clipfrac, pg_clipfrac_lower) for the TRL loss types, as verl's
    vanilla / gspo / sapo / cispo compute them (verl_metrics=True)."""
    vm = lambda x: _verl_mean(x.detach(), sums)  # noqa: E731
    zero = sums.mask.new_zeros(())
    out: Metrics = dict(ppo_kl=vm(-log_ratio), pg_clipfrac=None, pg_clipfrac_lower=None)
    if o.loss_type in CLIPPED_LOSS_TYPES:
        pg1, pg2 = -A * ratio, -A * torch.clamp(ratio, 1.0 - o.epsilon_low, 1.0 + o.eps_high)
        out["pg_clipfrac"] = vm(pg2 > pg1)
        out["pg_clipfrac_lower"] = zero if o.dual_clip is None else \
            vm((torch.maximum(pg1, pg2) > -A * o.dual_clip) & (A < 0))
    elif o.loss_type == "cispo":
        out["pg_clipfrac"], out["pg_clipfrac_lower"] = vm(ratio != torch.clamp(ratio, max=o.eps_high)), zero
    elif o.loss_type == "sapo":
        out["pg_clipfrac"], out["pg_clipfrac_lower"] = zero, zero
    return out


def objective(logprobs: torch.Tensor, entropy: torch.Tensor, tokens: Tokens, o: GRPOOptions
              ) -> tuple[torch.Tensor, Metrics]:
    """The loss and metrics from flat (N,) log-probs and entropies and the checked inputs."""
    layout = tokens.layout
    dtype = logprobs.dtype
    S = layout.num_seqs
    as_dtype = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    mask = torch.ones_like(logprobs) if tokens.mask is None else tokens.mask.to(dtype)
    sums = _Sums(layout, mask, tokens.mask is None or not tokens.mask.is_floating_point())
    tok = lambda t, per_seq: layout.seq_expand(t) if per_seq else t  # noqa: E731
    keep = _masked_reader(tokens.active)
    logprobs, entropy = keep(logprobs), keep(entropy)

    adv_per_seq = tokens.advantages_per_seq
    A_raw = tokens.advantages.to(dtype)  # (S,) or (N,)
    A = keep(tok(A_raw, adv_per_seq))
    # mu = 1: old == current in value, so r == 1 while its gradient is that of l.
    old = logprobs.detach() if tokens.old_logprobs is None else keep(tokens.old_logprobs.to(dtype))
    ref = keep(as_dtype(tokens.ref_logprobs))
    sampling = old if tokens.sampling_logprobs is None else keep(tokens.sampling_logprobs.to(dtype))
    is_ratio = as_dtype(tokens.rollout_is_ratio)
    is_per_seq = tokens.rollout_per_seq
    if is_ratio is not None and o.vllm_importance_sampling_mode is not None:  # TRL's vLLM correction
        is_ratio, is_per_seq = _vllm_is_ratio(is_ratio, is_per_seq, sums, o)
    is_ratio = None if is_ratio is None else keep(tok(is_ratio, is_per_seq), 1.0)
    # Every input the options read, at the active positions (a mask weight of NaN is active).
    uses_entropy = o.entropy_coef != 0.0 or o.top_entropy_quantile < 1.0
    poison = _poison(logprobs, A, old, ref if o.beta != 0.0 else None, is_ratio,
                     sampling if o.off_policy_mask_threshold is not None else None,
                     entropy if uses_entropy else None, mask if tokens.mask is not None else None)

    log_ratio = logprobs - old
    lo, hi = o.log_ratio_bounds  # log_ratio_clamp (verl's stability clamp): on log r, or on log s under GSPO
    clamp = (lambda x: x) if lo is None and hi is None else (lambda x: torch.clamp(x, min=lo, max=hi))  # noqa: E731
    level = o.importance_sampling_level
    if level == "token":
        log_ratio = clamp(log_ratio)
    token_ratio = torch.exp(log_ratio)
    seq_level = level == "sequence"
    if seq_level:  # GSPO: one ratio per sequence
        seq_ratio = torch.exp(clamp(sums.seq_mean(log_ratio)))  # (S,)
        ratio = layout.seq_expand(seq_ratio)
    elif level == "sequence_token":  # GSPO-token (verl's gspo): the value s_i, the gradient of l_t alone
        ratio = torch.exp(clamp(logprobs - logprobs.detach() + layout.seq_expand(sums.seq_mean(log_ratio.detach()))))
    else:
        ratio = token_ratio
    # TRL's metrics count a (B, 1) quantity once per sequence.
    metric_per_seq = seq_level and adv_per_seq
    metric_ratio, metric_A = (seq_ratio, A_raw) if metric_per_seq else (ratio, A)

    eps_low, eps_high = o.epsilon_low, o.eps_high
    clip_low = clip_high = clip_region = None
    seq_policy_loss = verl_metrics = None
    if o.loss_type in VERL_LOSS_TYPES:
        term = _verl_policy(o, logprobs, old, log_ratio, ratio, A, sums, is_ratio)
        per_token_loss, seq_policy_loss, verl_metrics = term.per_token, term.seq, term.verl
        clip_low, clip_high, clip_region = term.clip
    elif o.loss_type in CLIPPED_LOSS_TYPES:
        clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
        unclipped = ratio if o.delta is None else torch.clamp(ratio, max=o.delta)
        per_token_loss = -torch.min(unclipped * A, clipped * A)
        if o.dual_clip is not None:  # for A < 0 the loss is capped at -c A
            per_token_loss = torch.where(A < 0, torch.min(per_token_loss, -o.dual_clip * A), per_token_loss)
        is_low = (metric_ratio < 1.0 - eps_low) & (metric_A < 0)
        is_high = (metric_ratio > 1.0 + eps_high) & (metric_A > 0)
        clip_low = sums.token_mean(is_low.to(dtype), metric_per_seq)
        clip_high = sums.token_mean(is_high.to(dtype), metric_per_seq)
        clip_region = sums.token_mean((is_low | is_high).to(dtype), metric_per_seq)
    elif o.loss_type == "cispo":  # epsilon_high is an absolute cap on the detached weight
        per_token_loss = -torch.clamp(ratio, max=eps_high).detach() * A * logprobs
        clip_high = sums.token_mean(((metric_ratio > eps_high) & (metric_A > 0)).to(dtype), metric_per_seq)
    elif o.loss_type == "sapo":
        tau = _select(A > 0, o.sapo_temperature_pos, o.sapo_temperature_neg, A)
        per_token_loss = -(torch.sigmoid(tau * (ratio - 1.0)) * 4.0 / tau) * A
    else:  # vespo
        phi = _vespo_weight(A, log_ratio, sums, is_ratio, o)
        per_token_loss = -phi * A * logprobs

    # Multipliers of the policy term, in TRL's order.
    if o.off_policy_mask_threshold is not None:
        per_token_loss = per_token_loss * _off_policy_mask(A, logprobs, sampling, sums, o.off_policy_mask_threshold)
    entropy_mask = None
    if o.top_entropy_quantile < 1.0:
        entropy_mask = _high_entropy_mask(entropy.detach(), sums, o.top_entropy_quantile)
        per_token_loss = per_token_loss * entropy_mask
    if is_ratio is not None and o.loss_type not in ("vespo", "geo_mean"):  # those two fold it into their weight
        per_token_loss = per_token_loss * is_ratio
    if verl_metrics is None and o.verl_metrics:
        verl_metrics = _verl_metrics_trl(o, log_ratio, ratio, A, sums)

    kl_metric = None
    if o.beta != 0.0:
        kl = _kl_estimate(logprobs, ref, o.kl_estimator, o.kl_clamp)
        if o.use_bias_correction_kl:  # r differentiable: an unbiased reverse-KL gradient for any mu
            kl = kl * (ratio if o.kl_ratio == "sequence" else token_ratio)
        per_token_loss = o.beta * kl if per_token_loss is None else per_token_loss + o.beta * kl
        kl_metric = sums.token_mean(kl.detach())

    # Means over sequences divide by max(S, 1): an empty batch gives 0, not NaN.
    num_seqs = _divisor(o.num_sequences_in_batch, S, mask)
    # verl's loss types without a loss_agg_mode aggregate with verl's default, token-mean.
    agg_mode = o.loss_agg_mode or ("token-mean" if o.loss_type in VERL_LOSS_TYPES else None)
    if seq_policy_loss is not None:  # geo_mean: verl's plain mean over sequences, then any per-token term
        loss = seq_policy_loss.sum() / num_seqs
        if per_token_loss is not None:
            loss = loss + _verl_agg(per_token_loss, sums, o, agg_mode)
    elif agg_mode is not None:
        loss = _verl_agg(per_token_loss, sums, o, agg_mode)
    elif o.loss_type in ("grpo", "sapo"):
        loss = sums.seq_mean(per_token_loss).sum() / num_seqs
    elif o.loss_type == "bnpo":
        loss = (per_token_loss * mask).sum() / sums.total.clamp(min=1.0)
    elif o.loss_type == "dr_grpo":
        loss = (per_token_loss * mask).sum() / (num_seqs * (o.max_completion_length or layout.seq_len or 1))
    elif o.loss_type == "luspo":
        loss = (per_token_loss * mask).sum() / num_seqs
    else:  # dapo, cispo, vespo
        loss = (per_token_loss * mask).sum() / _divisor(o.num_items_in_batch, sums.total, mask)

    if o.entropy_coef != 0.0 and agg_mode is not None:  # verl's ppo_loss: agg_loss of the entropy
        loss = loss - o.entropy_coef * _verl_agg(entropy if entropy_mask is None else entropy * entropy_mask,
                                                 sums, o, agg_mode)
    elif o.entropy_coef != 0.0:  # bonus over the tokens the policy term acts on; gradient flows through H
        bonus_mask = mask if entropy_mask is None else mask * entropy_mask
        loss = loss - o.entropy_coef * (entropy * bonus_mask).sum() / bonus_mask.sum().clamp(min=1.0)

    loss = loss + (poison * logprobs).sum()  # 0 (l is finite where poison is 0), or NaN
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
    if verl_metrics is not None:  # verl's names; None where verl's function does not report it
        metrics.update(verl_metrics)
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
    dtype = compute_dtype(logprobs.dtype)
    lp = flat(logprobs).to(dtype)
    ent = torch.zeros_like(lp) if entropy is None else flat(entropy).to(dtype)
    return objective(lp, ent, tokens, o)
