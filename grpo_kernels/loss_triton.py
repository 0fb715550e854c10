"""The loss layer in Triton for the common cases: loss.py's formulas in two launches.

loss.py is the definition of the objective (PyTorch, autograd for the coefficients). On a GPU
its per-token graph costs ~90 small kernel launches per step, more than the two vocabulary
sweeps themselves for micro-batches of a few thousand tokens (issue 10). For the clipped
surrogate family (grpo, bnpo, dr_grpo, dapo, luspo) at token or sequence (GSPO) level, with
delta and dual clipping, the k1/k2/k3 KL with or without the ratio weight, per-token rollout
IS weights and the entropy bonus, this module computes the same value, metrics and per-token
coefficients in:

  `_loss_kernel`   one program per sequence: a pass for the sequence's mask sum and mean
                   log-ratio (GSPO), a pass that writes c_t = dL/dl_t (before the batch
                   normaliser) and the sequence's sums of loss, mask, KL, entropy and clip
                   indicators, and for GSPO a pass adding the gradient through the sequence
                   ratio, (sum_t' m dL_t'/ds) s m_t / n;
  `_sums_kernel`   one program: adds the per-sequence sums in a fixed order (deterministic)
                   and writes the loss, the metrics and the two backward scales.

The backward is then two scalar-by-vector products and the backward sweep: ~11 launches per
step with both sweeps. Anything else (other loss types, quantile or off-policy masks, verl's
aggregations, ...) runs loss.py, and the tests hold this module to it, option by option.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .options import CLIPPED_LOSS_TYPES, GRPOOptions

# Keywords this module implements; every other keyword must keep its default.
SUPPORTED_KEYWORDS = frozenset({
    "loss_type", "beta", "epsilon_low", "epsilon_high", "delta", "temperature", "importance_sampling_level",
    "use_bias_correction_kl", "kl_estimator", "kl_ratio", "max_completion_length", "num_items_in_batch",
    "num_sequences_in_batch", "dual_clip", "entropy_coef", "inplace_backward", "backend", "grad_scale",
})
LOSS_TYPES = CLIPPED_LOSS_TYPES
KL_ESTIMATOR_CODES = {"k1": 1, "k2": 2, "k3": 3}
# Per-sequence sums: loss, mask, KL, entropy, clip low, clip high, region (all masked).
NUM_SUMS = 7
BLOCK = 512


@triton.jit
def _d_min(a, b):
    """d min(a, b) / da as torch.minimum's backward: 1 where a < b, 1/2 at a tie."""
    return tl.where(a < b, 1.0, tl.where(a == b, 0.5, 0.0))


@triton.jit
def _nonfinite(x):
    """0 where x is finite, NaN where it is NaN or +-inf: added to a token's loss and coefficient, a
    non-finite input never gives a finite number (docs/design.md, "Non-finite inputs")."""
    return x - x


@triton.jit
def _sequence_rows(s, offsets_ptr, T, PACKED: tl.constexpr):
    """[start, end) of sequence s's rows: s T .. s T + T padded, offsets[s] .. offsets[s + 1] packed
    (layout.Layout's two layouts, as the kernels see them)."""
    if PACKED:
        start = tl.load(offsets_ptr + s)
        end = tl.load(offsets_ptr + s + 1)
    else:
        start = s * T
        end = start + T
    return start, end


@triton.jit
def _mask(mask_ptr, rows, ok, HAS_MASK: tl.constexpr):
    """The mask weights of a block of rows as fp32 (1 where there is no mask, 0 past the sequence)."""
    m = tl.where(ok, 1.0, 0.0)
    if HAS_MASK:
        m = tl.load(mask_ptr + rows, mask=ok, other=0).to(tl.float32)
    return m


@triton.jit
def _surrogate(ratio, A, eps_low, eps_high, delta, dual_clip, HAS_DELTA: tl.constexpr, HAS_DUAL_CLIP: tl.constexpr):
    """(-min(u A, c A) with u = min(ratio, delta), c = clamp(ratio, 1 - eps_low, 1 + eps_high),
    capped at -dual_clip A for A < 0; its derivative in the ratio), as loss.py with torch's
    derivatives of min and clamp. A NaN ratio or A gives a NaN loss, as torch.min and torch.clamp do
    (tl.minimum / tl.maximum drop a NaN operand unless told to propagate it)."""
    u = ratio
    du = tl.zeros_like(ratio) + 1.0
    if HAS_DELTA:
        u = tl.minimum(ratio, delta, propagate_nan=tl.PropagateNan.ALL)
        du = tl.where(ratio <= delta, 1.0, 0.0)
    c = tl.minimum(tl.maximum(ratio, 1.0 - eps_low, propagate_nan=tl.PropagateNan.ALL), 1.0 + eps_high,
                   propagate_nan=tl.PropagateNan.ALL)
    dc = tl.where((ratio >= 1.0 - eps_low) & (ratio <= 1.0 + eps_high), 1.0, 0.0)
    uA = u * A
    cA = c * A
    loss = -tl.minimum(uA, cA, propagate_nan=tl.PropagateNan.ALL)
    dloss = -(_d_min(uA, cA) * A * du + _d_min(cA, uA) * A * dc)
    if HAS_DUAL_CLIP:
        cap = -dual_clip * A
        dloss = dloss * tl.where(A < 0, _d_min(loss, cap), 1.0)
        loss = tl.where(A < 0, tl.minimum(loss, cap, propagate_nan=tl.PropagateNan.ALL), loss)
    return loss, dloss


@triton.jit
def _kl(l, ref, r, KL_ESTIMATOR: tl.constexpr, KL_RATIO_WEIGHT: tl.constexpr):
    """(the KL estimate, its derivative in l): k1, k2 or k3 of Delta = l - ref, times the token
    ratio r (differentiable, dr/dl = r) with KL_RATIO_WEIGHT."""
    d = l - ref
    if KL_ESTIMATOR == 1:
        kl = d
        dkl = tl.zeros_like(d) + 1.0
    elif KL_ESTIMATOR == 2:
        kl = 0.5 * d * d
        dkl = d
    else:
        rho = tl.exp(-d)
        kl = rho - 1.0 + d
        dkl = 1.0 - rho
    if KL_RATIO_WEIGHT:
        dkl = r * (kl + dkl)
        kl = r * kl
    return kl, dkl


@triton.jit
def token_terms(l, r, ratio, A, ref, rollout, beta, eps_low, eps_high, delta, dual_clip,
                HAS_DELTA: tl.constexpr, HAS_DUAL_CLIP: tl.constexpr, HAS_ROLLOUT: tl.constexpr,
                HAS_REF: tl.constexpr, KL_ESTIMATOR: tl.constexpr, KL_RATIO_WEIGHT: tl.constexpr):
    """One token's terms of the clipped objective, the one place they are written in Triton.

    l = log pi(y), r = exp(l - l_old) (the token ratio), `ratio` the ratio the surrogate clips
    (r at token level, the sequence's s under GSPO), A the advantage, ref = log pi_ref(y),
    rollout the sampler-mismatch weight. Returns (loss, dloss/dratio, dloss/dl through the
    KL term alone, kl, is_low, is_high): the caller adds dloss/dratio * dratio/dl for its level.
    """
    loss, dloss_dratio = _surrogate(ratio, A, eps_low, eps_high, delta, dual_clip, HAS_DELTA, HAS_DUAL_CLIP)
    if HAS_ROLLOUT:
        loss = loss * rollout
        dloss_dratio = dloss_dratio * rollout
    kl = tl.zeros_like(l)
    dkl_dl = tl.zeros_like(l)
    if HAS_REF:  # the KL weight is the token ratio at either level (kl_ratio="token")
        kl, dkl = _kl(l, ref, r, KL_ESTIMATOR, KL_RATIO_WEIGHT)
        loss = loss + beta * kl
        dkl_dl = beta * dkl
    is_low = tl.where((ratio < 1.0 - eps_low) & (A < 0), 1.0, 0.0)
    is_high = tl.where((ratio > 1.0 + eps_high) & (A > 0), 1.0, 0.0)
    return loss, dloss_dratio, dkl_dl, kl, is_low, is_high


@triton.jit
def read_token_terms(rows, ok, l, A, m, seq_ratio, old_ptr, ref_ptr, rollout_ptr, beta, eps_low, eps_high, delta,
                     dual_clip, SEQ_LEVEL: tl.constexpr, HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr,
                     HAS_ROLLOUT: tl.constexpr, HAS_DELTA: tl.constexpr, HAS_DUAL_CLIP: tl.constexpr,
                     KL_ESTIMATOR: tl.constexpr, KL_RATIO_WEIGHT: tl.constexpr):
    """Reads old, ref and the rollout weight of `rows` where ok (the rows to read: active ones) and
    evaluates token_terms with their log-probs l, advantages A and mask weights m; the surrogate
    clips the sequence ratio seq_ratio with SEQ_LEVEL, else the token ratio r. Returns (r, ratio,
    loss, dloss/dratio, dloss/dl through the KL, kl, is_low, is_high, bad), bad being NaN where an
    input is not finite (added to the loss and c: never a finite number from a NaN)."""
    old = l
    if HAS_OLD:
        old = tl.load(old_ptr + rows, mask=ok, other=0.0).to(tl.float32)
    r = tl.exp(l - old)
    ratio = r
    if SEQ_LEVEL:
        ratio = tl.zeros_like(r) + seq_ratio
    ref = l
    if HAS_REF:
        ref = tl.load(ref_ptr + rows, mask=ok, other=0.0).to(tl.float32)
    rollout = r
    if HAS_ROLLOUT:
        rollout = tl.load(rollout_ptr + rows, mask=ok, other=0.0).to(tl.float32)
    loss, dloss_dratio, dkl_dl, kl, is_low, is_high = token_terms(
        l, r, ratio, A, ref, rollout, beta, eps_low, eps_high, delta, dual_clip, HAS_DELTA, HAS_DUAL_CLIP, HAS_ROLLOUT,
        HAS_REF, KL_ESTIMATOR, KL_RATIO_WEIGHT)
    bad = _nonfinite(l) + _nonfinite(A) + _nonfinite(old) + _nonfinite(ref) + _nonfinite(m)
    if HAS_ROLLOUT:
        bad += _nonfinite(rollout)
    return r, ratio, loss, dloss_dratio, dkl_dl, kl, is_low, is_high, bad


@triton.jit(do_not_specialize=["T", "S"])
def _loss_kernel(
    logprobs_ptr, entropy_ptr, old_ptr, ref_ptr, adv_ptr, mask_ptr, rollout_ptr, offsets_ptr, coef_ptr, sums_ptr,
    T, S, beta, eps_low, eps_high, delta, dual_clip,
    PACKED: tl.constexpr, SEQ_LEVEL: tl.constexpr, SEQ_MEAN: tl.constexpr, HAS_OLD: tl.constexpr,
    HAS_REF: tl.constexpr, ADV_PER_SEQ: tl.constexpr, HAS_MASK: tl.constexpr, HAS_ROLLOUT: tl.constexpr,
    HAS_DELTA: tl.constexpr, HAS_DUAL_CLIP: tl.constexpr, KL_ESTIMATOR: tl.constexpr,
    KL_RATIO_WEIGHT: tl.constexpr, BLOCK: tl.constexpr,
):
    """For sequence s (rows [s T, s T + T), or offsets[s], offsets[s + 1] packed): reads l, H,
    old, ref, A (per token, or adv[s]), mask and rollout weight of its rows; writes coef[row] =
    dL_s/dl_row (with SEQ_MEAN the sequence's 1/n included) and sums[k, s], k < NUM_SUMS.
    A masked row (mask 0) is never read; a NaN or inf input of an active row makes the loss and that
    row's coefficient NaN (docs/design.md, "Non-finite inputs")."""
    s = tl.program_id(0).to(tl.int64)
    start, end = _sequence_rows(s, offsets_ptr, T, PACKED)
    idx = tl.arange(0, BLOCK)
    if ADV_PER_SEQ:
        A_seq = tl.load(adv_ptr + s).to(tl.float32)

    # Pass 1: the sequence's mask sum and, for GSPO, its masked mean log-ratio.
    n = 0.0
    log_ratio_sum = 0.0
    for b in range(start, end, BLOCK):
        rows = b + idx
        ok = rows < end
        m = _mask(mask_ptr, rows, ok, HAS_MASK)
        n += tl.sum(m, axis=0)
        if SEQ_LEVEL and HAS_OLD:
            act = ok & (m != 0)
            lr = tl.load(logprobs_ptr + rows, mask=act, other=0.0) - \
                tl.load(old_ptr + rows, mask=act, other=0.0).to(tl.float32)
            log_ratio_sum += tl.sum(m * lr, axis=0)
    n_div = tl.maximum(n, 1.0, propagate_nan=tl.PropagateNan.ALL)  # a NaN mask weight stays NaN, as torch.clamp
    seq_scale = 1.0
    if SEQ_MEAN:  # grpo: the sequence's masked mean
        seq_scale = 1.0 / n_div
    seq_ratio = tl.exp(log_ratio_sum / n_div)  # 1 in value when old is l (mu = 1)

    # Pass 2: per-token loss and coefficient, the sequence's sums.
    loss_sum = 0.0
    kl_sum = 0.0
    h_sum = 0.0
    low_sum = 0.0
    high_sum = 0.0
    region_sum = 0.0
    grad_seq_ratio = 0.0
    for b in range(start, end, BLOCK):
        rows = b + idx
        m = _mask(mask_ptr, rows, rows < end, HAS_MASK)
        ok = (rows < end) & (m != 0)  # the rows read: active ones (a NaN mask weight is active)
        l = tl.load(logprobs_ptr + rows, mask=ok, other=0.0)
        H = tl.load(entropy_ptr + rows, mask=ok, other=0.0)
        if ADV_PER_SEQ:
            A = tl.where(ok, A_seq, 0.0)
        else:
            A = tl.load(adv_ptr + rows, mask=ok, other=0.0).to(tl.float32)
        r, _, loss, dloss_dratio, dkl_dl, kl, is_low, is_high, bad = read_token_terms(
            rows, ok, l, A, m, seq_ratio, old_ptr, ref_ptr, rollout_ptr, beta, eps_low, eps_high, delta, dual_clip,
            SEQ_LEVEL, HAS_OLD, HAS_REF, HAS_ROLLOUT, HAS_DELTA, HAS_DUAL_CLIP, KL_ESTIMATOR, KL_RATIO_WEIGHT)
        if SEQ_LEVEL:  # the ratio's gradient reaches every token of the sequence: pass 3
            grad_seq_ratio += tl.sum(m * dloss_dratio, axis=0)
            dloss_dl = dkl_dl
        else:
            dloss_dl = dloss_dratio * r + dkl_dl
        tl.store(coef_ptr + rows, tl.where(ok, m * seq_scale * dloss_dl + bad, 0.0), mask=rows < end)
        loss_sum += tl.sum(m * loss + bad, axis=0)
        kl_sum += tl.sum(m * kl, axis=0)
        h_sum += tl.sum(m * H, axis=0)
        low_sum += tl.sum(m * is_low, axis=0)
        high_sum += tl.sum(m * is_high, axis=0)
        region_sum += tl.sum(m * tl.maximum(is_low, is_high), axis=0)

    # Pass 3 (GSPO): d seq_ratio / d l_t = seq_ratio m_t / n.
    if SEQ_LEVEL:
        through_ratio = seq_scale * grad_seq_ratio * seq_ratio / n_div
        for b in range(start, end, BLOCK):
            rows = b + idx
            ok = rows < end
            m = _mask(mask_ptr, rows, ok, HAS_MASK)
            c = tl.load(coef_ptr + rows, mask=ok, other=0.0)
            tl.store(coef_ptr + rows, c + through_ratio * m, mask=ok)

    if SEQ_LEVEL and ADV_PER_SEQ:  # TRL counts a (B, 1) ratio and advantage once per sequence
        low_sum = tl.where((seq_ratio < 1.0 - eps_low) & (A_seq < 0), 1.0, 0.0)
        high_sum = tl.where((seq_ratio > 1.0 + eps_high) & (A_seq > 0), 1.0, 0.0)
        region_sum = tl.maximum(low_sum, high_sum)
    out = sums_ptr + s
    tl.store(out, loss_sum * seq_scale)
    tl.store(out + S, n)
    tl.store(out + 2 * S, kl_sum)
    tl.store(out + 3 * S, h_sum)
    tl.store(out + 4 * S, low_sum)
    tl.store(out + 5 * S, high_sum)
    tl.store(out + 6 * S, region_sum)


@triton.jit
def _normalisers(total_m, divisor, n_items_ptr, DIVISOR: tl.constexpr):
    """(max(sum of the mask, 1), n): the mask's normaliser and the batch normaliser n of the loss.
    DIVISOR: 0 = the mask's sum, 1 = the scalar `divisor`, 2 = the tensor n_items[0]. A NaN stays
    NaN, as torch.clamp."""
    m_div = tl.maximum(total_m, 1.0, propagate_nan=tl.PropagateNan.ALL)
    if DIVISOR == 0:
        n = m_div
    elif DIVISOR == 1:
        n = tl.maximum(divisor, 1.0)
    else:
        n = tl.maximum(tl.load(n_items_ptr).to(tl.float32), 1.0, propagate_nan=tl.PropagateNan.ALL)
    return m_div, n


@triton.jit(do_not_specialize=["S"])
def _sums_kernel(
    sums_ptr, n_items_ptr, loss_ptr, out_ptr, S, divisor, entropy_coef,
    DIVISOR: tl.constexpr, CLIP_PER_SEQ: tl.constexpr, BLOCK: tl.constexpr,
):
    """Reads sums[NUM_SUMS, S] (and n_items[0] with DIVISOR == 2); writes the loss and out =
    [kl, entropy, clip low, clip high, region, 1/n, -entropy_coef/max(sum m, 1)].
    DIVISOR: 0 = the mask's sum, 1 = the scalar `divisor`, 2 = the tensor n_items. With
    CLIP_PER_SEQ the clip ratios are means over sequences, else masked means over tokens."""
    idx = tl.arange(0, BLOCK)
    total_loss = 0.0
    total_m = 0.0
    total_kl = 0.0
    total_h = 0.0
    total_low = 0.0
    total_high = 0.0
    total_region = 0.0
    for start in range(0, S, BLOCK):
        ok = start + idx < S
        p = sums_ptr + start + idx
        total_loss += tl.sum(tl.load(p, mask=ok, other=0.0), axis=0)
        total_m += tl.sum(tl.load(p + S, mask=ok, other=0.0), axis=0)
        total_kl += tl.sum(tl.load(p + 2 * S, mask=ok, other=0.0), axis=0)
        total_h += tl.sum(tl.load(p + 3 * S, mask=ok, other=0.0), axis=0)
        total_low += tl.sum(tl.load(p + 4 * S, mask=ok, other=0.0), axis=0)
        total_high += tl.sum(tl.load(p + 5 * S, mask=ok, other=0.0), axis=0)
        total_region += tl.sum(tl.load(p + 6 * S, mask=ok, other=0.0), axis=0)
    m_div, n = _normalisers(total_m, divisor, n_items_ptr, DIVISOR)
    clip_div = m_div
    if CLIP_PER_SEQ:
        clip_div = tl.maximum(S * 1.0, 1.0)
    e_scale = -entropy_coef / m_div
    tl.store(loss_ptr, total_loss / n + e_scale * total_h)
    tl.store(out_ptr, total_kl / m_div)
    tl.store(out_ptr + 1, total_h / m_div)
    tl.store(out_ptr + 2, total_low / clip_div)
    tl.store(out_ptr + 3, total_high / clip_div)
    tl.store(out_ptr + 4, total_region / clip_div)
    tl.store(out_ptr + 5, 1.0 / n)
    tl.store(out_ptr + 6, e_scale)


def _written_here(o: GRPOOptions, tokens) -> bool:
    """Whether these options are the clipped family with only the keywords this module implements."""
    if o.loss_type not in LOSS_TYPES:
        return False
    default = GRPOOptions()
    for name in GRPOOptions.__dataclass_fields__:
        value = getattr(o, name)
        if name not in SUPPORTED_KEYWORDS and value is not getattr(default, name) and value != getattr(default, name):
            return False
    if isinstance(o.num_sequences_in_batch, torch.Tensor) and o.loss_type in ("grpo", "dr_grpo", "luspo"):
        return False
    return not tokens.rollout_per_seq


def supports(o: GRPOOptions, tokens, backend: str, tp_group) -> bool:
    """Whether this module computes the loss for these options (else loss.py does)."""
    if backend != "triton" or tp_group is not None or torch.compiler.is_compiling():
        return False
    if not _written_here(o, tokens) or o.importance_sampling_level not in ("token", "sequence"):
        return False
    # TRL's sequence-ratio KL weight under GSPO: loss.py
    return not (o.importance_sampling_level == "sequence" and o.kl_ratio != "token" and o.beta != 0.0)


def divisor_of(o: GRPOOptions, tokens) -> tuple[int, float, torch.Tensor | None]:
    """(DIVISOR code, scalar divisor, tensor divisor) of the aggregation, as loss.py's."""
    layout = tokens.layout
    if o.loss_type == "bnpo" or (o.loss_type == "dapo" and o.num_items_in_batch is None):
        return 0, 1.0, None
    if o.loss_type == "dapo":
        n = o.num_items_in_batch
        return (2, 1.0, n.reshape(1)) if isinstance(n, torch.Tensor) else (1, float(n), None)
    num_seqs = float(max(layout.num_seqs if o.num_sequences_in_batch is None else o.num_sequences_in_batch, 1))
    if o.loss_type == "dr_grpo":
        return 1, num_seqs * (o.max_completion_length or layout.seq_len or 1), None
    return 1, num_seqs, None  # grpo, luspo


def loss_launch(logprobs, entropy, tokens, o: GRPOOptions, coef, sums):
    """(kernel, grid, args, meta) of `_loss_kernel` writing coef (N,) and sums (NUM_SUMS, S)."""
    layout = tokens.layout
    mask = tokens.mask
    if mask is not None and mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)  # the same bytes, no copy
    placeholder = logprobs
    args = (logprobs, entropy, placeholder if tokens.old_logprobs is None else tokens.old_logprobs,
            placeholder if tokens.ref_logprobs is None else tokens.ref_logprobs, tokens.advantages,
            placeholder if mask is None else mask,
            placeholder if tokens.rollout_is_ratio is None else tokens.rollout_is_ratio,
            layout.offsets if layout.packed else placeholder, coef, sums,
            0 if layout.packed else layout.seq_len, layout.num_seqs, float(o.beta), float(o.epsilon_low),
            float(o.eps_high), float(o.delta or 0.0), float(o.dual_clip or 0.0))
    meta = dict(PACKED=layout.packed, SEQ_LEVEL=o.importance_sampling_level == "sequence",
                SEQ_MEAN=o.loss_type == "grpo", HAS_OLD=tokens.old_logprobs is not None, HAS_REF=o.beta != 0.0,
                ADV_PER_SEQ=tokens.advantages_per_seq, HAS_MASK=mask is not None,
                HAS_ROLLOUT=tokens.rollout_is_ratio is not None, HAS_DELTA=o.delta is not None,
                HAS_DUAL_CLIP=o.dual_clip is not None, KL_ESTIMATOR=KL_ESTIMATOR_CODES[o.kl_estimator],
                KL_RATIO_WEIGHT=o.use_bias_correction_kl, BLOCK=BLOCK, num_warps=4)
    return _loss_kernel, (layout.num_seqs,), args, meta


def sums_launch(sums, tokens, o: GRPOOptions, loss, out, width: int | None = None, divisor=None):
    """(kernel, grid, args, meta) of `_sums_kernel` writing loss () and out (7,). `width` is the
    number of columns of sums: the sequences (default), or the rows for the token-local plan;
    `divisor` the aggregation's (code, scalar, tensor) if already known."""
    code, divisor, n_items = divisor_of(o, tokens) if divisor is None else divisor
    per_seq_clip = o.importance_sampling_level == "sequence" and tokens.advantages_per_seq
    args = (sums, out if n_items is None else n_items, loss, out,
            tokens.layout.num_seqs if width is None else width, divisor, float(o.entropy_coef))
    return _sums_kernel, (1,), args, dict(DIVISOR=code, CLIP_PER_SEQ=per_seq_clip, BLOCK=256, num_warps=4)


def objective(logprobs: torch.Tensor, entropy: torch.Tensor, tokens, o: GRPOOptions):
    """-> (loss (), out (7,) fp32: kl, entropy, clip low/high/region, 1/n, e_scale; coef (N,) = dL/dl
    before the batch normaliser 1/n)."""
    N, S = logprobs.shape[0], tokens.layout.num_seqs
    device = logprobs.device
    coef = torch.empty(N, dtype=torch.float32, device=device)
    sums = torch.empty((NUM_SUMS, max(S, 1)), dtype=torch.float32, device=device)
    loss = torch.empty((), dtype=torch.float32, device=device)
    out = torch.empty(7, dtype=torch.float32, device=device)
    if S > 0:
        kernel, grid, args, meta = loss_launch(logprobs, entropy, tokens, o, coef, sums)
        kernel[grid](*args, **meta)
    else:
        sums.zero_()
    kernel, grid, args, meta = sums_launch(sums, tokens, o, loss, out)
    kernel[grid](*args, **meta)
    return loss, out, coef


# ---------------------------------------------------------------------------------------------
# Token-local losses (SPEC section 14): the coefficients of a row from its own statistics.
#
# For the clipped family at token level, c_t = dL/dl_t and e_t = dL/dH_t depend on the row's
# log-prob and entropy, its per-token inputs, and normalisers that depend on the mask alone.
# `plan` computes those normalisers on the device first (two small launches); a kernel that
# holds a row's statistics (the two-pass logits kernel, the fused-linear chunks) then calls
# `row_coefficients` for it, which also records the row's sums; `finish` adds the sums in a
# fixed order into the loss and the metrics.
# ---------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["T", "S"])
def _plan_kernel(mask_ptr, adv_ptr, offsets_ptr, w_ptr, adv_tok_ptr, seq_n_ptr, T, S,
                 PACKED: tl.constexpr, HAS_MASK: tl.constexpr, SEQ_MEAN: tl.constexpr,
                 ADV_PER_SEQ: tl.constexpr, BLOCK: tl.constexpr):
    """For sequence s: reads its rows' mask (and adv[s]); writes seq_n[s] = sum of the mask,
    w[row] = mask (/ max(seq_n, 1) with SEQ_MEAN: grpo's per-sequence mean) and, with
    ADV_PER_SEQ, adv_tok[row] = adv[s]."""
    s = tl.program_id(0).to(tl.int64)
    start, end = _sequence_rows(s, offsets_ptr, T, PACKED)
    idx = tl.arange(0, BLOCK)
    n = 0.0
    for b in range(start, end, BLOCK):
        ok = b + idx < end
        n += tl.sum(_mask(mask_ptr, b + idx, ok, HAS_MASK), axis=0)
    scale = 1.0
    if SEQ_MEAN:
        scale = 1.0 / tl.maximum(n, 1.0, propagate_nan=tl.PropagateNan.ALL)
    for b in range(start, end, BLOCK):
        rows = b + idx
        ok = rows < end
        tl.store(w_ptr + rows, _mask(mask_ptr, rows, ok, HAS_MASK) * scale, mask=ok)
        if ADV_PER_SEQ:
            tl.store(adv_tok_ptr + rows, tl.zeros((BLOCK,), tl.float32) + tl.load(adv_ptr + s).to(tl.float32),
                     mask=ok)
    tl.store(seq_n_ptr + s, n)


@triton.jit(do_not_specialize=["S"])
def _plan_scalars_kernel(seq_n_ptr, n_items_ptr, scal_ptr, S, divisor, entropy_coef, grad_scale,
                         DIVISOR: tl.constexpr, BLOCK: tl.constexpr):
    """One program: reads seq_n[S] (and n_items[0] with DIVISOR == 2); writes scal[0] =
    grad_scale / n (the batch normaliser, as `_sums_kernel` computes it) and scal[1] =
    -entropy_coef grad_scale / max(sum of the mask, 1)."""
    idx = tl.arange(0, BLOCK)
    total = 0.0
    for start in range(0, S, BLOCK):
        total += tl.sum(tl.load(seq_n_ptr + start + idx, mask=start + idx < S, other=0.0), axis=0)
    m_div, n = _normalisers(total, divisor, n_items_ptr, DIVISOR)
    tl.store(scal_ptr, grad_scale / n)
    tl.store(scal_ptr + 1, -entropy_coef * grad_scale / m_div)


@triton.jit
def row_coefficients(rows, ok, l, H, w_ptr, mask_ptr, adv_ptr, old_ptr, ref_ptr, rollout_ptr, scal_ptr, sums_ptr, N,
                     beta, eps_low, eps_high, delta, dual_clip,
                     HAS_MASK: tl.constexpr, HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr,
                     HAS_ROLLOUT: tl.constexpr, HAS_DELTA: tl.constexpr, HAS_DUAL_CLIP: tl.constexpr,
                     KL_ESTIMATOR: tl.constexpr, KL_RATIO_WEIGHT: tl.constexpr):
    """(c, e) of `rows` (a scalar row or a block; `ok` marks the real ones) from their log-probs l
    and entropies H: c = w dL_t/dl_t scal[0], e = mask scal[1] (batch normaliser and grad_scale
    folded in). Reads the plan's w, adv and the per-token inputs of live rows; writes
    sums[k, rows] (k < NUM_SUMS, as `_loss_kernel` per sequence). A masked row is ignored
    entirely: none of its inputs is read, its sums and coefficients are 0."""
    m = _mask(mask_ptr, rows, ok, HAS_MASK)
    live = ok & (m != 0.0)  # a NaN mask weight is live: it makes the loss NaN
    l = tl.where(live, l, 0.0)
    H = tl.where(live, H, 0.0)
    w = tl.load(w_ptr + rows, mask=live, other=0.0)
    A = tl.load(adv_ptr + rows, mask=live, other=0.0)
    r, _, loss, dloss_dratio, dkl_dl, kl, is_low, is_high, bad = read_token_terms(
        rows, live, l, A, m, 1.0, old_ptr, ref_ptr, rollout_ptr, beta, eps_low, eps_high, delta, dual_clip, False,
        HAS_OLD, HAS_REF, HAS_ROLLOUT, HAS_DELTA, HAS_DUAL_CLIP, KL_ESTIMATOR, KL_RATIO_WEIGHT)
    c = tl.where(live, w * (dloss_dratio * r + dkl_dl) * tl.load(scal_ptr) + bad, 0.0)
    e = tl.where(live, m * tl.load(scal_ptr + 1), 0.0)
    z = tl.zeros_like(c)
    tl.store(sums_ptr + rows, tl.where(live, w * loss + bad, z), mask=ok)
    tl.store(sums_ptr + N + rows, tl.where(live, m, z), mask=ok)
    tl.store(sums_ptr + 2 * N + rows, tl.where(live, m * kl, z), mask=ok)
    tl.store(sums_ptr + 3 * N + rows, tl.where(live, m * H, z), mask=ok)
    tl.store(sums_ptr + 4 * N + rows, tl.where(live, m * is_low, z), mask=ok)
    tl.store(sums_ptr + 5 * N + rows, tl.where(live, m * is_high, z), mask=ok)
    tl.store(sums_ptr + 6 * N + rows, tl.where(live, m * tl.maximum(is_low, is_high), z), mask=ok)
    return c, e


@triton.jit(do_not_specialize=["N", "row_start", "n_rows"])
def _coefficients_kernel(logprobs_ptr, entropy_ptr, c_ptr, e_ptr, w_ptr, mask_ptr, adv_ptr, old_ptr, ref_ptr,
                         rollout_ptr, scal_ptr, sums_ptr, N, row_start, n_rows,
                         beta, eps_low, eps_high, delta, dual_clip,
                         HAS_MASK: tl.constexpr, HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr,
                         HAS_ROLLOUT: tl.constexpr, HAS_DELTA: tl.constexpr, HAS_DUAL_CLIP: tl.constexpr,
                         KL_ESTIMATOR: tl.constexpr, KL_RATIO_WEIGHT: tl.constexpr, BLOCK: tl.constexpr):
    """Rows row_start + i, i < n_rows: reads logprobs[i], entropy[i] (a chunk's) and the plan;
    writes c[i], e[i] and the rows' sums (`row_coefficients`)."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n_rows
    l = tl.load(logprobs_ptr + i, mask=ok, other=0.0)
    H = tl.load(entropy_ptr + i, mask=ok, other=0.0)
    c, e = row_coefficients(row_start + i, ok, l, H, w_ptr, mask_ptr, adv_ptr, old_ptr, ref_ptr, rollout_ptr,
                            scal_ptr, sums_ptr, N, beta, eps_low, eps_high, delta, dual_clip, HAS_MASK, HAS_OLD,
                            HAS_REF, HAS_ROLLOUT, HAS_DELTA, HAS_DUAL_CLIP, KL_ESTIMATOR, KL_RATIO_WEIGHT)
    tl.store(c_ptr + i, c, mask=ok)
    tl.store(e_ptr + i, e, mask=ok)


def metrics(out: torch.Tensor, logprobs: torch.Tensor, tokens, o: GRPOOptions) -> dict:
    """The metrics dict of fused_grpo_loss from out (7,) (kl, entropy, clip low/high/region, ...) and
    the (N,) log-probs, as loss.py returns them."""
    return {"kl": out[0] if o.beta != 0.0 else None, "entropy": out[1], "clip_ratio_low": out[2],
            "clip_ratio_high": out[3], "clip_ratio_region": out[4], "logprobs": tokens.layout.unflat(logprobs)}


def token_local(o: GRPOOptions, tokens, tp_group) -> bool:
    """Whether the loss is token-local (SPEC 14) and written here: the clipped family at token
    level, whose c_t and e_t follow from the row's own statistics once `Plan` has run."""
    return tp_group is None and o.importance_sampling_level == "token" and _written_here(o, tokens)


class Plan:
    """The device-side normalisers of a token-local loss (`plan`), and the buffers its rows fill.

    w (N,): the mask weight times grpo's 1/|o_i|; adv (N,) the advantage of each row; scal (2,):
    grad_scale / n and -entropy_coef grad_scale / max(sum m, 1); sums (NUM_SUMS, N), filled by
    `row_coefficients`; `args` and `meta` are the launch arguments every caller of
    row_coefficients passes on."""

    def __init__(self, tokens, o: GRPOOptions, grad_scale: float, divisor=None, run: bool = True):
        layout = tokens.layout
        N, S = layout.num_rows, layout.num_seqs
        device = tokens.ids.device
        f32 = dict(dtype=torch.float32, device=device)
        self.tokens, self.o, self.N = tokens, o, N
        mask = tokens.mask
        if mask is not None and mask.dtype == torch.bool:
            mask = mask.view(torch.uint8)  # the same bytes, no copy
        self.w = torch.empty(max(N, 1), **f32)
        if tokens.advantages_per_seq:
            self.adv = torch.empty(max(N, 1), **f32)
        else:
            self.adv = tokens.advantages if tokens.advantages.dtype == torch.float32 else tokens.advantages.float()
        self.scal = torch.empty(2, **f32)
        self.sums = torch.empty((NUM_SUMS, max(N, 1)), **f32)
        self.divisor = divisor_of(o, tokens) if divisor is None else divisor
        code, divisor, n_items = self.divisor
        seq_n = torch.empty(max(S, 1), **f32)
        placeholder = self.w
        # (kernel, grid, args, meta) of the two launches, run here unless `run` is False (AOT checks).
        self.launches = [(_plan_kernel, (S,), (
            placeholder if mask is None else mask, tokens.advantages, layout.offsets if layout.packed else placeholder,
            self.w, self.adv, seq_n, 0 if layout.packed else layout.seq_len, S), dict(
            PACKED=layout.packed, HAS_MASK=mask is not None, SEQ_MEAN=o.loss_type == "grpo",
            ADV_PER_SEQ=tokens.advantages_per_seq, BLOCK=BLOCK, num_warps=4))] if S > 0 else []
        self.launches.append((_plan_scalars_kernel, (1,), (
            seq_n, self.scal if n_items is None else n_items, self.scal, S, divisor, float(o.entropy_coef),
            float(grad_scale)), dict(DIVISOR=code, BLOCK=256, num_warps=4)))
        if run:
            if S == 0:
                seq_n.zero_()
            for kernel, grid, args, meta in self.launches:
                kernel[grid](*args, **meta)
        self.args = (self.w, placeholder if mask is None else mask, self.adv,
                     placeholder if tokens.old_logprobs is None else tokens.old_logprobs,
                     placeholder if tokens.ref_logprobs is None else tokens.ref_logprobs,
                     placeholder if tokens.rollout_is_ratio is None else tokens.rollout_is_ratio,
                     self.scal, self.sums, N, float(o.beta), float(o.epsilon_low), float(o.eps_high),
                     float(o.delta or 0.0), float(o.dual_clip or 0.0))
        self.meta = dict(HAS_MASK=mask is not None, HAS_OLD=tokens.old_logprobs is not None, HAS_REF=o.beta != 0.0,
                         HAS_ROLLOUT=tokens.rollout_is_ratio is not None, HAS_DELTA=o.delta is not None,
                         HAS_DUAL_CLIP=o.dual_clip is not None, KL_ESTIMATOR=KL_ESTIMATOR_CODES[o.kl_estimator],
                         KL_RATIO_WEIGHT=o.use_bias_correction_kl)

    def coefficients_launch(self, logprobs, entropy, row_start: int, c, e):
        """(kernel, grid, args, meta) of chunk_coefficients."""
        n = logprobs.shape[0]
        block = 256
        return (_coefficients_kernel, (triton.cdiv(n, block),),
                (logprobs, entropy, c, e, *self.args[:9], row_start, n, *self.args[9:]),
                dict(**self.meta, BLOCK=block, num_warps=4))

    def chunk_coefficients(self, logprobs: torch.Tensor, entropy: torch.Tensor, row_start: int
                           ) -> tuple[torch.Tensor, torch.Tensor]:
        """(c, e) of rows [row_start, row_start + n) from their fp32 log-probs and entropies (n,),
        recording their sums: one launch."""
        n = logprobs.shape[0]
        c = torch.empty(n, dtype=torch.float32, device=logprobs.device)
        e = torch.empty_like(c)
        if n > 0:
            kernel, grid, args, meta = self.coefficients_launch(logprobs, entropy, row_start, c, e)
            kernel[grid](*args, **meta)
        return c, e

    def finish(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss (), out (7,): kl, entropy, clip low, high, region, 1/n, e_scale) from the rows' sums,
        added in a fixed order (deterministic)."""
        device = self.w.device
        loss = torch.empty((), dtype=torch.float32, device=device)
        out = torch.empty(7, dtype=torch.float32, device=device)
        if self.N == 0:
            self.sums.zero_()
        kernel, grid, args, meta = sums_launch(self.sums, self.tokens, self.o, loss, out, width=self.N,
                                                divisor=self.divisor)
        kernel[grid](*args, **meta)
        return loss, out
