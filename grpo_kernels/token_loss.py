"""The token-level loss in Triton: the loss layer's formulas for the common case, in two launches.

loss.py is the definition of the objective (PyTorch, autograd for the coefficients). On a GPU
its per-token graph costs ~90 small kernel launches per step, more than the two vocabulary
sweeps themselves for micro-batches of a few thousand tokens (issue 10). For the losses that
only sum over tokens — dapo, bnpo, dr_grpo at token level, with the clipped surrogate (delta,
dual clip), the k1/k2/k3 KL with or without the ratio weight, rollout IS weights and the entropy
bonus — this module computes the same value, metrics and per-token coefficients in:

  `_token_loss_kernel`   one program per block of tokens: reads l, H, old, ref, A, mask,
                         rollout weight per token; writes c_t (dL/dl_t before the 1/n of the
                         aggregation) and this block's partial sums of the masked loss, mask,
                         KL, entropy and clip indicators;
  `_token_sums_kernel`   one program: adds the partial sums in a fixed order (deterministic)
                         and writes loss, the metrics and the scales 1/n and -coef/sum(m).

The backward then needs two scalar-by-vector products and the backward sweep: with the
forward sweep and the mask test, ~9 launches per step instead of ~94. Anything else (other
loss types, GSPO, quantile or off-policy masks, verl's aggregations...) runs loss.py, and the
tests hold this module to it, option by option.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .options import GRPOOptions

# Keywords this module implements; every other keyword must keep its default.
SUPPORTED_KEYWORDS = frozenset({
    "loss_type", "beta", "epsilon_low", "epsilon_high", "delta", "temperature", "use_bias_correction_kl",
    "kl_estimator", "kl_ratio", "max_completion_length", "num_items_in_batch", "num_sequences_in_batch",
    "dual_clip", "entropy_coef", "inplace_backward", "backend",
})
LOSS_TYPES = ("dapo", "bnpo", "dr_grpo")
KL_ESTIMATOR_CODES = {"k1": 1, "k2": 2, "k3": 3}
# Partial sums per block: masked loss, mask, masked KL, masked entropy, clip low, clip high, region.
NUM_SUMS = 7
BLOCK = 1024


@triton.jit
def _d_min(a, b):
    """d min(a, b) / da as torch.minimum's backward: 1 where a < b, 1/2 at a tie."""
    return tl.where(a < b, 1.0, tl.where(a == b, 0.5, 0.0))


@triton.jit(do_not_specialize=["N", "T", "num_blocks"])
def _token_loss_kernel(
    logprobs_ptr, entropy_ptr, old_ptr, ref_ptr, adv_ptr, mask_ptr, rollout_ptr, coef_ptr, partial_ptr,
    N, T, num_blocks, beta, eps_low, eps_high, delta, dual_clip,
    HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr, ADV_PER_SEQ: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_ROLLOUT: tl.constexpr, HAS_DELTA: tl.constexpr, HAS_DUAL_CLIP: tl.constexpr, KL_ESTIMATOR: tl.constexpr,
    KL_RATIO_WEIGHT: tl.constexpr, BLOCK: tl.constexpr,
):
    """Reads l, H, old, ref, A (per token, or per sequence at row // T), mask and the rollout weight
    for tokens [pid * BLOCK, +BLOCK); writes coef = m * dL_t/dl_t and the block's NUM_SUMS partial
    sums to partial[k, pid]."""
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = rows < N
    l = tl.load(logprobs_ptr + rows, mask=ok, other=0.0)
    H = tl.load(entropy_ptr + rows, mask=ok, other=0.0)
    m = tl.where(ok, 1.0, 0.0)
    if HAS_MASK:
        m = tl.load(mask_ptr + rows, mask=ok, other=0).to(tl.float32)
    if ADV_PER_SEQ:
        A = tl.load(adv_ptr + rows // T, mask=ok, other=0.0).to(tl.float32)
    else:
        A = tl.load(adv_ptr + rows, mask=ok, other=0.0).to(tl.float32)
    old = l  # mu = 1: r == 1 in value, dr/dl = r
    if HAS_OLD:
        old = tl.load(old_ptr + rows, mask=ok, other=0.0).to(tl.float32)
    r = tl.exp(l - old)

    # -min(u A, c A), u = min(r, delta), c = clamp(r, 1 - eps_low, 1 + eps_high)
    u = r
    du = tl.full((BLOCK,), 1.0, tl.float32)
    if HAS_DELTA:
        u = tl.minimum(r, delta)
        du = tl.where(r <= delta, 1.0, 0.0)
    c = tl.minimum(tl.maximum(r, 1.0 - eps_low), 1.0 + eps_high)
    dc = tl.where((r >= 1.0 - eps_low) & (r <= 1.0 + eps_high), 1.0, 0.0)
    uA = u * A
    cA = c * A
    loss = -tl.minimum(uA, cA)
    dloss_dr = -(_d_min(uA, cA) * A * du + _d_min(cA, uA) * A * dc)
    if HAS_DUAL_CLIP:  # for A < 0 the loss is capped at -c A
        cap = -dual_clip * A
        keep = tl.where(A < 0, _d_min(loss, cap), 1.0)
        loss = tl.where(A < 0, tl.minimum(loss, cap), loss)
        dloss_dr = dloss_dr * keep
    dloss_dl = dloss_dr * r
    if HAS_ROLLOUT:
        w = tl.load(rollout_ptr + rows, mask=ok, other=0.0).to(tl.float32)
        loss = loss * w
        dloss_dl = dloss_dl * w

    kl = tl.zeros((BLOCK,), tl.float32)
    if HAS_REF:
        d = l - tl.load(ref_ptr + rows, mask=ok, other=0.0).to(tl.float32)
        if KL_ESTIMATOR == 1:
            kl = d
            dkl = tl.full((BLOCK,), 1.0, tl.float32)
        elif KL_ESTIMATOR == 2:
            kl = 0.5 * d * d
            dkl = d
        else:
            rho = tl.exp(-d)
            kl = rho - 1.0 + d
            dkl = 1.0 - rho
        if KL_RATIO_WEIGHT:  # r k with r differentiable: d(r k)/dl = r k + r dk/dl
            dkl = r * (kl + dkl)
            kl = r * kl
        loss = loss + beta * kl
        dloss_dl = dloss_dl + beta * dkl

    tl.store(coef_ptr + rows, m * dloss_dl, mask=ok)
    is_low = tl.where((r < 1.0 - eps_low) & (A < 0), 1.0, 0.0)
    is_high = tl.where((r > 1.0 + eps_high) & (A > 0), 1.0, 0.0)
    out = partial_ptr + pid
    tl.store(out, tl.sum(m * loss, axis=0))
    tl.store(out + num_blocks, tl.sum(m, axis=0))
    tl.store(out + 2 * num_blocks, tl.sum(m * kl, axis=0))
    tl.store(out + 3 * num_blocks, tl.sum(m * H, axis=0))
    tl.store(out + 4 * num_blocks, tl.sum(m * is_low, axis=0))
    tl.store(out + 5 * num_blocks, tl.sum(m * is_high, axis=0))
    tl.store(out + 6 * num_blocks, tl.sum(m * tl.maximum(is_low, is_high), axis=0))


@triton.jit(do_not_specialize=["num_blocks"])
def _token_sums_kernel(
    partial_ptr, n_items_ptr, loss_ptr, out_ptr, num_blocks, divisor, entropy_coef,
    DIVISOR: tl.constexpr, BLOCK: tl.constexpr,
):
    """Reads partial[NUM_SUMS, num_blocks] (and n_items[0] with DIVISOR == 2); writes the loss and
    out = [kl, entropy, clip low, clip high, region, 1/n, -entropy_coef/max(sum m, 1)].
    DIVISOR: 0 = sum of the mask, 1 = the scalar `divisor`, 2 = the tensor n_items."""
    idx = tl.arange(0, BLOCK)
    total_loss = 0.0
    total_m = 0.0
    total_kl = 0.0
    total_h = 0.0
    total_low = 0.0
    total_high = 0.0
    total_region = 0.0
    for start in range(0, num_blocks, BLOCK):
        ok = start + idx < num_blocks
        p = partial_ptr + start + idx
        total_loss += tl.sum(tl.load(p, mask=ok, other=0.0), axis=0)
        total_m += tl.sum(tl.load(p + num_blocks, mask=ok, other=0.0), axis=0)
        total_kl += tl.sum(tl.load(p + 2 * num_blocks, mask=ok, other=0.0), axis=0)
        total_h += tl.sum(tl.load(p + 3 * num_blocks, mask=ok, other=0.0), axis=0)
        total_low += tl.sum(tl.load(p + 4 * num_blocks, mask=ok, other=0.0), axis=0)
        total_high += tl.sum(tl.load(p + 5 * num_blocks, mask=ok, other=0.0), axis=0)
        total_region += tl.sum(tl.load(p + 6 * num_blocks, mask=ok, other=0.0), axis=0)
    m_div = tl.maximum(total_m, 1.0)
    if DIVISOR == 0:
        n = m_div
    elif DIVISOR == 1:
        n = tl.maximum(divisor, 1.0)
    else:
        n = tl.maximum(tl.load(n_items_ptr).to(tl.float32), 1.0)
    e_scale = -entropy_coef / m_div
    tl.store(loss_ptr, total_loss / n + e_scale * total_h)
    tl.store(out_ptr, total_kl / m_div)
    tl.store(out_ptr + 1, total_h / m_div)
    tl.store(out_ptr + 2, total_low / m_div)
    tl.store(out_ptr + 3, total_high / m_div)
    tl.store(out_ptr + 4, total_region / m_div)
    tl.store(out_ptr + 5, 1.0 / n)
    tl.store(out_ptr + 6, e_scale)


def supports(o: GRPOOptions, tokens, backend: str, tp_group) -> bool:
    """Whether this module computes the loss for these options (else loss.py does)."""
    if backend != "triton" or tp_group is not None or torch.compiler.is_compiling():
        return False
    if o.loss_type not in LOSS_TYPES or o.importance_sampling_level != "token":
        return False
    default = GRPOOptions()
    for name in GRPOOptions.__dataclass_fields__:
        if name not in SUPPORTED_KEYWORDS and getattr(o, name) is not getattr(default, name) \
                and getattr(o, name) != getattr(default, name):
            return False
    if o.loss_type == "dr_grpo" and isinstance(o.num_sequences_in_batch, torch.Tensor):
        return False
    layout = tokens.layout
    if tokens.per_seq(tokens.rollout_is_ratio):
        return False
    if tokens.advantages_per_seq and layout.packed:
        return False
    return tokens.mask is None or tokens.mask.dtype != torch.float64


def _divisor(o: GRPOOptions, tokens) -> tuple[int, float, torch.Tensor | None]:
    """(DIVISOR code, scalar divisor, tensor divisor) of the aggregation, as loss.py's."""
    layout = tokens.layout
    if o.loss_type == "bnpo" or (o.loss_type == "dapo" and o.num_items_in_batch is None):
        return 0, 1.0, None
    if o.loss_type == "dapo":
        n = o.num_items_in_batch
        return (2, 1.0, n.reshape(1)) if isinstance(n, torch.Tensor) else (1, float(n), None)
    num_seqs = layout.num_seqs if o.num_sequences_in_batch is None else float(o.num_sequences_in_batch)
    return 1, float(max(num_seqs, 1) * (o.max_completion_length or layout.seq_len or 1)), None


def token_loss(logprobs: torch.Tensor, entropy: torch.Tensor, tokens, o: GRPOOptions):
    """-> (loss (), out (7,) fp32: kl, entropy, clip low/high/region, 1/n, e_scale; coef (N,) = m dL_t/dl_t)."""
    N = logprobs.shape[0]
    device = logprobs.device
    num_blocks = max(triton.cdiv(N, BLOCK), 1)
    coef = torch.empty(N, dtype=torch.float32, device=device)
    partial = torch.empty((NUM_SUMS, num_blocks), dtype=torch.float32, device=device)
    loss = torch.empty((), dtype=torch.float32, device=device)
    out = torch.empty(7, dtype=torch.float32, device=device)
    mask = tokens.mask
    if mask is not None and mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)
    placeholder = logprobs
    args = (logprobs, entropy, placeholder if tokens.old_logprobs is None else tokens.old_logprobs,
            placeholder if tokens.ref_logprobs is None else tokens.ref_logprobs, tokens.advantages,
            placeholder if mask is None else mask,
            placeholder if tokens.rollout_is_ratio is None else tokens.rollout_is_ratio, coef, partial,
            N, tokens.layout.seq_len or 1, num_blocks, float(o.beta), float(o.epsilon_low), float(o.eps_high),
            float(o.delta or 0.0), float(o.dual_clip or 0.0))
    meta = dict(HAS_OLD=tokens.old_logprobs is not None, HAS_REF=o.beta != 0.0, ADV_PER_SEQ=tokens.advantages_per_seq,
                HAS_MASK=mask is not None, HAS_ROLLOUT=tokens.rollout_is_ratio is not None,
                HAS_DELTA=o.delta is not None, HAS_DUAL_CLIP=o.dual_clip is not None,
                KL_ESTIMATOR=KL_ESTIMATOR_CODES[o.kl_estimator], KL_RATIO_WEIGHT=o.use_bias_correction_kl,
                BLOCK=BLOCK, num_warps=4)
    if N > 0:
        _token_loss_kernel[(num_blocks,)](*args, **meta)
    else:
        partial.zero_()
    code, divisor, n_items = _divisor(o, tokens)
    _token_sums_kernel[(1,)](partial, out if n_items is None else n_items, loss, out, num_blocks, divisor,
                             float(o.entropy_coef), DIVISOR=code, BLOCK=256, num_warps=4)
    return loss, out, coef
