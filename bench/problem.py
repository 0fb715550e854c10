"""One benchmark shape: realistic random inputs, the float64 oracle, and the error of a result.

Every implementation is handed the same storage: the model's output buffer of shape
(B, T+1, V), whose last position predicts nothing. Liger-Kernel takes that whole buffer
(its documented convention); everyone else takes the strided view [:, :-1] that a trainer
makes, as SPEC section 1 requires to work without a copy. The gradient is taken with
respect to that view, so no implementation is charged for autograd's slice-backward copy
(a cost of the trainer, not of the loss).

The fused-linear unit (issue 6) has its own case, inputs and oracle (LinearCase,
make_linear_problem, linear_oracle): hidden states (B, T, H) and lm_head.weight (V, H)
instead of logits, checked on the loss and on the gradients of both.

Each case has a padding profile (Case.padding): "mild", the default, where a completion
loses up to T/8 of its length, or "heavy" (issue 11 item 4), log-normal completion lengths
between T/8 and T that leave about half of the (B, T) rows masked (see HEAVY_MEDIAN).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from grpo_kernels import reference
from grpo_kernels.options import GRPOOptions

# Logits are Gaussian with this scale: a softmax over 32k-152k entries then has an entropy
# of a few nats, like a language model's, and the sampled tokens' log-probs are of order
# -1 to -10 rather than -log V. That keeps the comparison fair to eager PyTorch, whose bf16
# log-probs round to 2^-8 of their magnitude: uniform random ids (l ~ -12) would make it
# look far less accurate than it is in training.
LOGIT_SCALE = 4.0
# Spread of log pi_old and log pi_ref around log pi_theta. Ratios exp(0.3 n) land outside
# the clip band [0.8, 1.28] about half the time, as after a few policy updates (mu > 1),
# so both branches of the clipped objective are exercised and validated.
LOGPROB_NOISE = 0.3
# Completions lose up to 1/8 of their length to padding: the mask matters, yet the bytes
# of every row are still (almost all) part of the work, so GB/s stay comparable. This is
# the "mild" padding of Case.padding, the default.
MAX_PAD_FRACTION = 8
# The "heavy" padding (issue 11 item 4): completion lengths with the spread of a GRPO
# batch, where most answers stop well short of max_completion_length and some hit it.
# Each row's length is T * HEAVY_MEDIAN * exp(HEAVY_SIGMA * z), z ~ N(0, 1), rounded and
# clipped to [T / HEAVY_MIN_FRACTION, T]: a log-normal with median 0.4 T, a tail of about
# 11% of the rows truncated at T and about 6% at the floor T / 8. The expected share of
# masked (B, T) entries is 52.6%. The z of a batch are stratified: one per 1/B quantile
# band of N(0, 1), drawn uniformly from the middle half of its band, the bands in random
# order. The batch then spans the distribution from its short to its truncated answers,
# and its padding share stays in the intended 40-60% even for the bench's few sequences
# (B = 4 on the CPU, 8 and 16 at the GPU work unit). Over 1000 seeds it lies in
# [0.47, 0.58] at B = 4, T = 128 (independent draws: [0.04, 0.83]), [0.51, 0.55] at
# B = 8 and [0.52, 0.53] at B = 16, T = 1024.
HEAVY_MEDIAN, HEAVY_SIGMA, HEAVY_MIN_FRACTION = 0.4, 0.75, 8
HEAVY_EXPECTED_PADDING = 0.526
# Case.padding: the name of a padding profile, as written to the results, and what it is.
PADDINGS = ("mild", "heavy")
PADDING_PROFILES = {
    "mild": "each completion loses 0 to T/8 of its length, uniformly (about 6% of the rows masked)",
    "heavy": (f"completion lengths T * {HEAVY_MEDIAN} * exp({HEAVY_SIGMA} z), z ~ N(0, 1) stratified over the batch, "
              f"rounded and clipped to [T/{HEAVY_MIN_FRACTION}, T] (a clipped log-normal; about "
              f"{HEAVY_EXPECTED_PADDING:.0%} of the rows masked)"),
}
# Elements per chunk when a helper here walks the rows (sampling, the oracle): big
# enough to amortise launches, small enough to leave the GPU's memory to the candidates.
CHUNK_ELEMENTS = 1 << 25

# A result is accepted when max(loss error, gradient error) is below this. It is a gate
# against wrong answers (a mis-called API or a broken kernel errs by O(1)), set above the
# rounding that a correct implementation in each dtype shows: a bf16 gradient is rounded
# to within 2^-8 of each element. The loss error is relative to the larger of |loss| and
# the mean |advantage| over the tokens, the size of its terms: terms of both signs cancel,
# and the rounding of each term must not count as a large error of a small sum. The test
# suite holds our kernels to SPEC section 5's tighter bounds (1e-5 fp32, 1e-2 bf16).
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}
# How far, relative to max(1, |l|), a log-prob may be off when an implementation rounds it
# to the logits' dtype (eager PyTorch in bf16 does): four half-ulps of that dtype. The
# clipped objective's gradient jumps where the ratio crosses 1 - eps_low or 1 + eps_high,
# so a row whose exact log-ratio lies within this of a clip bound may legitimately get the
# other side's gradient; such rows are left out of the gradient check (not of the loss).
LOGPROB_ROUNDING = {torch.float32: 2.0**-22, torch.bfloat16: 2.0**-6, torch.float16: 2.0**-9}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Case:
    """One point of the grid: the shape and the objective's variant."""

    n_tokens: int
    vocab: int
    dtype: str  # a key of DTYPES, as written to the results
    beta: float
    level: str  # importance_sampling_level: "token" or "sequence" (GSPO)
    seq_len: int  # T; the batch is n_tokens / T sequences
    # A key of PADDINGS: "mild" (up to T/8 per row) or "heavy" (log-normal lengths, about
    # half the rows masked). Keyword-only, so positional Case(...) and LinearCase(...)
    # calls, and code that builds a Case without it, keep today's mild padding.
    padding: str = field(default="mild", kw_only=True)

    def __post_init__(self) -> None:
        if self.n_tokens % self.seq_len:
            raise ValueError(f"n_tokens={self.n_tokens} is not a multiple of seq_len={self.seq_len}")
        if self.padding not in PADDINGS:
            raise ValueError(f"padding={self.padding!r}; choose from {', '.join(PADDINGS)}")

    @property
    def batch(self) -> int:
        return self.n_tokens // self.seq_len

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def unit(self) -> str:
        """Which implementations take this case: "logits" (these) or "linear" (LinearCase)."""
        return "logits"

    @property
    def logits_bytes(self) -> int:
        return self.n_tokens * self.vocab * self.torch_dtype.itemsize

    @property
    def options(self) -> dict:
        """The keywords of fused_grpo_loss / reference.grpo_loss for this case.

        DAPO aggregation with clip-higher (epsilon_high = 0.28) is TRL's recommended
        setting and every implementation supports it. The bias-corrected KL (TRL's and our
        default) is on at token level, where all implementations compute the same exact
        gradient. At sequence level they disagree on it (TRL weights the KL with the
        sequence ratio, TRL issue 6586; Liger drops a term of that gradient; we use the
        token ratio), so there it is off and every implementation computes one objective.
        Either way it changes one per-token coefficient, not the bytes moved.
        """
        return dict(loss_type="dapo", beta=self.beta, epsilon_low=0.2, epsilon_high=0.28, temperature=1.0,
                    importance_sampling_level=self.level, use_bias_correction_kl=self.level == "token")


@dataclass(frozen=True)
class LogprobsCase(Case):
    """A case of the logprobs unit: the forward-only pass of the old/ref policies (token_logprobs
    under torch.no_grad()) over the same inputs as a logits case; only the temperature of
    `options` matters."""

    @property
    def unit(self) -> str:
        return "logprobs"


@dataclass
class Problem:
    """The inputs of one case, on one device."""

    case: Case
    padded: torch.Tensor  # (B, T+1, V) logits as a model returns them; position T is never read
    ids: torch.Tensor  # (B, T) int64, sampled from softmax(logits)
    advantages: torch.Tensor  # (B,) fp32
    mask: torch.Tensor  # (B, T) int64, ones then padding, as TRL's completion_mask
    old: torch.Tensor  # (B, T) fp32 log pi_old
    ref: torch.Tensor | None  # (B, T) fp32 log pi_ref; None when beta == 0

    @property
    def logits(self) -> torch.Tensor:
        """The (B, T, V) strided view a trainer passes: logits[:, t] predicts ids[:, t]."""
        return self.padded[:, :-1]


def _row_chunks(B: int, T: int, V: int):
    """(b, t-slice) pairs covering (B, T) in chunks of about CHUNK_ELEMENTS elements."""
    rows = max(1, CHUNK_ELEMENTS // V)
    for b in range(B):
        for t0 in range(0, T, rows):
            yield b, slice(t0, min(t0 + rows, T))


def completion_lengths(padding: str, B: int, T: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """(B,) int64 completion lengths in [1, T] for a padding profile (see MAX_PAD_FRACTION,
    HEAVY_*). "mild" draws exactly what make_problem drew before profiles existed, so
    mild problems are unchanged seed for seed."""
    if padding == "mild":
        return T - torch.randint(0, T // MAX_PAD_FRACTION + 1, (B,), generator=gen, device=device)
    if padding != "heavy":
        raise ValueError(f"padding={padding!r}; choose from {', '.join(PADDINGS)}")
    # One uniform per 1/B band, from the middle half of it, the bands in random order.
    band = torch.randperm(B, generator=gen, device=device).double()
    u = (band + 0.25 + 0.5 * torch.rand(B, generator=gen, device=device, dtype=torch.float64)) / B
    z = torch.special.ndtri(u)  # u in (0, 1): finite
    lengths = (T * HEAVY_MEDIAN * torch.exp(HEAVY_SIGMA * z)).round()
    return lengths.clamp(max(1, T // HEAVY_MIN_FRACTION), T).to(torch.int64)


def completion_mask(case: Case, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """(B, T) int64: ones then padding, as TRL's completion_mask, for case.padding."""
    B, T = case.batch, case.seq_len
    lengths = completion_lengths(case.padding, B, T, gen, device)
    return (torch.arange(T, device=device) < lengths.unsqueeze(1)).to(torch.int64)


def padding_fraction(mask: torch.Tensor) -> float:
    """The share of the (B, T) entries that are padding (mask 0): the "padding" of a results row."""
    return 1.0 - float(mask.sum()) / max(mask.numel(), 1)


def make_problem(case: Case, device: torch.device, seed: int = 0) -> Problem:
    """Fresh random inputs for `case`, reproducible from `seed`."""
    B, T, V = case.batch, case.seq_len, case.vocab
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=gen, device=device)

    # Drawn in the logits' own dtype: no float32 N x V temporary on the way.
    padded = torch.empty((B, T + 1, V), dtype=case.torch_dtype, device=device).normal_(0.0, LOGIT_SCALE,
                                                                                      generator=gen)
    logits = padded[:, :-1]
    ids = torch.empty((B, T), dtype=torch.int64, device=device)
    logprobs = torch.empty((B, T), dtype=torch.float32, device=device)
    for b, ts in _row_chunks(B, T, V):
        z = logits[b, ts].float()
        # Gumbel-max: argmax(z + G) with G ~ Gumbel(0, 1) is a sample from softmax(z).
        u = torch.rand(z.shape, generator=gen, device=device).clamp_(min=1e-20)
        y = (z - torch.log(-torch.log(u))).argmax(-1)
        ids[b, ts] = y
        logprobs[b, ts] = z.log_softmax(-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)

    mask = completion_mask(case, gen, device)
    old = logprobs + LOGPROB_NOISE * randn(B, T)
    ref = logprobs + LOGPROB_NOISE * randn(B, T) if case.beta != 0.0 else None
    return Problem(case, padded, ids, randn(B), mask, old, ref)


@dataclass
class Oracle:
    """The float64 reference loss, and its gradient at a sample of rows."""

    loss: float
    loss_scale: float  # mean |A| over the completion tokens, the size of the loss's terms
    rows: tuple[torch.Tensor, torch.Tensor]  # (b, t) of the rows whose gradient is checked
    grad: torch.Tensor  # (k, V) float64: dL/dlogits at those rows
    near_clip_bound: int  # sampled rows left out of the gradient check (see LOGPROB_ROUNDING)
    logprobs: torch.Tensor | None = None  # (B, T) float64 log pi(y_t) at every row (the logprobs unit's check)
    entropy: torch.Tensor | None = None  # (B, T) float64 entropy at every row


def _near_clip_bound(p: Problem, lp: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: rows whose ratio is within rounding of a clip bound (see LOGPROB_ROUNDING)."""
    o = p.case.options
    mask = p.mask.double()
    log_ratio = lp - p.old.double()
    slack = LOGPROB_ROUNDING[p.case.torch_dtype] * lp.abs().clamp(min=1.0)
    if o["importance_sampling_level"] == "sequence":  # one ratio per sequence: the errors of its tokens add up
        n = mask.sum(-1, keepdim=True).clamp(min=1.0)
        log_ratio = ((log_ratio * mask).sum(-1, keepdim=True) / n).expand_as(lp)
        slack = ((slack * mask).sum(-1, keepdim=True) / n).expand_as(lp)
    eps_high = o["epsilon_low"] if o.get("epsilon_high") is None else o["epsilon_high"]
    bounds = (math.log(1.0 - o["epsilon_low"]), math.log(1.0 + eps_high))
    return torch.stack([(log_ratio - b).abs() <= slack for b in bounds]).any(0) & p.mask.bool()


def oracle(p: Problem, n_rows: int = 64, seed: int = 1) -> Oracle:
    """reference.grpo_loss in float64 on the upcast inputs, without a float64 N x V tensor.

    reference.grpo_loss is reference.token_logprobs (logits -> l_t, H_t) followed by
    reference.grpo_loss_from_logprobs; the loss sees each row of logits only through its
    l_t and H_t. So the sampled rows go through token_logprobs with autograd, the other
    rows' l_t and H_t (computed chunk by chunk) enter as constants, and the loss and the
    sampled rows' gradient are exactly those of the whole reference. (tests/
    test_bench_smoke.py checks this against reference.grpo_loss on a small case.)
    """
    case, logits = p.case, p.logits
    B, T, V = case.batch, case.seq_len, case.vocab
    temperature = case.options["temperature"]
    lp = torch.empty((B, T), dtype=torch.float64, device=logits.device)
    ent = torch.empty_like(lp)
    with torch.no_grad():
        for b, ts in _row_chunks(B, T, V):
            lp[b, ts], ent[b, ts] = reference.token_logprobs(logits[b, ts].double(), p.ids[b, ts], temperature)

    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    flat = torch.randperm(B * T, generator=gen)[: min(n_rows, B * T)].to(logits.device)
    rows = (flat // T, flat % T)
    z = logits[rows].double().requires_grad_(True)  # (k, V), a copy
    lp_rows, ent_rows = reference.token_logprobs(z, p.ids[rows], temperature)
    loss, _ = reference.grpo_loss_from_logprobs(
        lp.index_put(rows, lp_rows), ent.index_put(rows, ent_rows), p.advantages.double(), p.mask,
        p.old.double(), None if p.ref is None else p.ref.double(), None, None, GRPOOptions(**case.options))
    (grad,) = torch.autograd.grad(loss, z)
    keep = ~_near_clip_bound(p, lp)[rows]
    mask = p.mask.double()
    scale = float((p.advantages.double().abs().unsqueeze(1) * mask).sum() / mask.sum().clamp(min=1.0))
    return Oracle(loss.item(), scale, (rows[0][keep], rows[1][keep]), grad[keep], int((~keep).sum()), lp, ent)


def error(o: Oracle, loss: torch.Tensor, grad: torch.Tensor) -> tuple[float, float]:
    """(loss error, gradient error) of a result against the oracle; inf where not finite.

    The loss error is relative to max(|loss|, mean |A|) (see TOLERANCE); the gradient error
    is the relative Frobenius error over the checked rows of `grad`, the gradient with
    respect to the (B, T, V) logits.
    """
    g = grad[o.rows].double()
    value = float(loss)
    if not (math.isfinite(value) and bool(torch.isfinite(g).all())):
        return math.inf, math.inf
    loss_err = abs(value - o.loss) / max(abs(o.loss), o.loss_scale, torch.finfo(torch.float64).tiny)
    ref_norm = float(o.grad.norm())
    # No rows to check (all near a clip bound, or all masked, with a zero gradient) is no error.
    grad_err = float((g - o.grad).norm()) / ref_norm if ref_norm > 0 else float(g.norm() > 0)
    return loss_err, grad_err


# The gate of the logprobs unit: the largest error of a log-prob or an entropy over the rows
# scored (mask 1), relative to max(1, |value|). Every implementation here computes in fp32 from
# the same rounded logits (~1e-6); a wrong answer errs by O(1).
LOGPROBS_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-3, torch.float16: 1e-3}


def logprobs_error(o: Oracle, mask: torch.Tensor, logprobs: torch.Tensor,
                   entropy: torch.Tensor | None) -> tuple[float, float | None]:
    """(log-prob error, entropy error or None) of a forward-only pass against the oracle, over
    the rows with mask 1 (a masked row is not read and its value is the implementation's);
    inf where a scored value is not finite."""
    keep = mask.bool()
    errs = []
    for got, want in ((logprobs, o.logprobs), (entropy, o.entropy)):
        if got is None:
            errs.append(None)
            continue
        g, w = got.reshape(want.shape)[keep].double(), want[keep]
        if not bool(torch.isfinite(g).all()):
            errs.append(math.inf)
            continue
        errs.append(float(((g - w).abs() / w.abs().clamp(min=1.0)).max()) if g.numel() else 0.0)
    return errs[0], errs[1]


# --- the fused-linear unit: the loss from hidden states and the output projection ----------

# The gate for the fused-linear rows; the error itself is the rows' accuracy column (issue 22).
# Three of the four implementations (unfused, Liger's, TRL's) round each logit to bf16 before
# the softmax, as any bf16 matmul output does; ours keeps the fp32 accumulator. A logit of 16
# (where the sampled tokens sit with LOGIT_SCALE = 4) then moves by up to 2^-9 * 16 = 0.03,
# its token's log-prob and ratio by about as much, and the gradient of hidden and weight by
# 2e-2 in relative norm at 512 x 256 x 32,000 (float64 with the logits rounded to bf16, here)
# and 1.4e-1 at 8,192 x 4,096 x 151,936 (the unfused path on an H200, research/part3.md).
# 0.3 passes that rounding and still fails an O(1) wrong answer (a dropped term, a sign).
LINEAR_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 0.3, torch.float16: 0.3}
# The least distance, in log-ratio, that old_logprobs keep from a clip bound, beyond twice
# the row's own bf16 rounding (see make_linear_problem): the order of an fp32 sum over H.
CLIP_MARGIN_FLOOR = 1e-3


@dataclass(frozen=True)
class LinearCase(Case):
    """A case of the fused-linear unit: the logits are hidden (B, T, H) @ weight (V, H).T."""

    hidden: int  # H

    @property
    def unit(self) -> str:
        return "linear"

    @property
    def flops(self) -> int:
        """2 N H V: one (N, H) x (H, V) matmul, the forward's work; the backward's two
        gradient matmuls are twice that, and a design that recomputes the logits adds one more."""
        return 2 * self.n_tokens * self.hidden * self.vocab


@dataclass
class LinearProblem:
    """The inputs of one fused-linear case, on one device. Duck-types Problem's per-token fields."""

    case: LinearCase
    hidden: torch.Tensor  # (B, T, H), the last hidden states at the positions that predict ids
    weight: torch.Tensor  # (V, H), lm_head.weight (no bias: Qwen and Llama have none)
    ids: torch.Tensor  # (B, T) int64, sampled from softmax(hidden @ weight.T)
    advantages: torch.Tensor  # (B,) fp32
    mask: torch.Tensor  # (B, T) int64
    old: torch.Tensor  # (B, T) fp32, kept off the clip bounds (see make_linear_problem)
    ref: torch.Tensor | None  # (B, T) fp32; None when beta == 0
    nudged: int  # tokens (token level) or sequences (sequence level) whose old log-probs were moved


def _flat_chunks(N: int, V: int):
    """Row slices covering [0, N) in chunks of about CHUNK_ELEMENTS logits."""
    rows = max(1, CHUNK_ELEMENTS // V)
    for start in range(0, N, rows):
        yield slice(start, min(start + rows, N))


def _keep_off_clip_bounds(case: Case, lp: torch.Tensor, old: torch.Tensor, mask: torch.Tensor,
                          margin: torch.Tensor) -> tuple[torch.Tensor, int]:
    """old log-probs moved so that no ratio lies within `margin` (B, T) of a clip bound.

    The clipped objective's gradient jumps at 1 - eps_low and 1 + eps_high. The logits
    harness leaves the rows near a bound out of its gradient check, but grad_weight sums
    every row, so here no row may be near one: a log-ratio within the margin of a bound is
    moved to the margin's edge, on its side. At sequence level the ratio is the masked mean
    of the token log-ratios, so a whole sequence's old log-probs move together.
    """
    o = case.options
    eps_high = o["epsilon_low"] if o.get("epsilon_high") is None else o["epsilon_high"]
    bounds = (math.log(1.0 - o["epsilon_low"]), math.log(1.0 + eps_high))
    maskf = mask.double()
    log_ratio = lp - old.double()
    if o["importance_sampling_level"] == "sequence":
        n = maskf.sum(-1, keepdim=True).clamp(min=1.0)
        log_ratio, margin = (log_ratio * maskf).sum(-1, keepdim=True) / n, (margin * maskf).sum(-1, keepdim=True) / n
        live = maskf.sum(-1, keepdim=True) > 0
    else:
        live = mask.bool()
    target = log_ratio
    for b in bounds:
        near = ((target - b).abs() < margin) & live
        target = torch.where(near, b + torch.where(target >= b, margin, -margin), target)
    moved = int((target != log_ratio).sum())
    return (old.double() - (target - log_ratio)).to(old.dtype), moved


def make_linear_problem(case: LinearCase, device: torch.device, seed: int = 0) -> LinearProblem:
    """Fresh random inputs for a fused-linear case, reproducible from `seed`.

    hidden ~ N(0, 1) and weight ~ N(0, LOGIT_SCALE^2 / H) in their dtype, so the logits have
    the scale of the logits harness's. Tokens are sampled from the exact softmax (float64
    logits, chunk by chunk); old and ref log-probs are the exact log-probs plus noise, as in
    make_problem, and then kept off the clip bounds by twice each token's log-prob change
    under bf16 rounding of its logits plus CLIP_MARGIN_FLOOR (see _keep_off_clip_bounds).
    """
    B, T, V, H = case.batch, case.seq_len, case.vocab, case.hidden
    N = B * T
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=gen, device=device)

    dtype = case.torch_dtype
    hidden = torch.empty((B, T, H), dtype=dtype, device=device).normal_(0.0, 1.0, generator=gen)
    weight = torch.empty((V, H), dtype=dtype, device=device).normal_(0.0, LOGIT_SCALE / math.sqrt(H), generator=gen)
    flat, w64 = hidden.view(N, H), weight.double()
    ids = torch.empty(N, dtype=torch.int64, device=device)
    lp = torch.empty(N, dtype=torch.float64, device=device)
    rounding = torch.empty_like(lp)  # |log-prob change| when the logits are rounded to the inputs' dtype
    for rows in _flat_chunks(N, V):
        z = flat[rows].double() @ w64.T
        u = torch.rand(z.shape, generator=gen, device=device).clamp_(min=1e-20)
        y = (z - torch.log(-torch.log(u))).argmax(-1, keepdim=True)
        del u
        ids[rows] = y.squeeze(-1)
        lp[rows] = z.log_softmax(-1).gather(-1, y).squeeze(-1)
        rounding[rows] = (z.to(dtype).double().log_softmax(-1).gather(-1, y).squeeze(-1) - lp[rows]).abs()
        del z
    del w64
    ids, lp, rounding = ids.view(B, T), lp.view(B, T), rounding.view(B, T)

    mask = completion_mask(case, gen, device)
    old = lp.float() + LOGPROB_NOISE * randn(B, T)
    ref = lp.float() + LOGPROB_NOISE * randn(B, T) if case.beta != 0.0 else None
    old, nudged = _keep_off_clip_bounds(case, lp, old, mask, 2 * rounding + CLIP_MARGIN_FLOOR)
    return LinearProblem(case, hidden, weight, ids, randn(B), mask, old, ref, nudged)


@dataclass
class LinearOracle:
    """The float64 reference loss and its exact gradients with respect to hidden and weight."""

    loss: float
    loss_scale: float  # mean |A| over the completion tokens (see TOLERANCE)
    grad_hidden: torch.Tensor  # (B, T, H) float64
    grad_weight: torch.Tensor  # (V, H) float64


def linear_oracle(p: LinearProblem) -> LinearOracle:
    """reference.grpo_loss in float64 on the explicit logits hidden @ weight.T, without a
    float64 N x V tensor.

    As in `oracle`, the loss sees row t of the logits only through l_t and H_t. A first
    sweep computes them in float64 chunk by chunk; autograd through
    reference.grpo_loss_from_logprobs then gives c_t = dL/dl_t and e_t = dL/dH_t; a second
    sweep recomputes each chunk's logits z with autograd, pulls (c, e) back through
    reference.token_logprobs to dL/dz, and applies the chain rule of z = hidden @ weight.T:
    grad_hidden = dL/dz @ weight, grad_weight = sum over chunks of dL/dz.T @ hidden. These
    are exactly the gradients of the whole reference (tests/test_bench_smoke.py checks it).
    """
    case = p.case
    B, T, V, H = case.batch, case.seq_len, case.vocab, case.hidden
    N, temperature = B * T, case.options["temperature"]
    h64, w64, ids = p.hidden.reshape(N, H).double(), p.weight.double(), p.ids.reshape(N)
    lp = torch.empty(N, dtype=torch.float64, device=h64.device)
    ent = torch.empty_like(lp)
    with torch.no_grad():
        for rows in _flat_chunks(N, V):
            lp[rows], ent[rows] = reference.token_logprobs(h64[rows] @ w64.T, ids[rows], temperature)
    lp, ent = lp.view(B, T).requires_grad_(True), ent.view(B, T).requires_grad_(True)
    loss, _ = reference.grpo_loss_from_logprobs(
        lp, ent, p.advantages.double(), p.mask, p.old.double(), None if p.ref is None else p.ref.double(), None, None,
        GRPOOptions(**case.options))
    c, e = torch.autograd.grad(loss, (lp, ent), allow_unused=True)
    c = torch.zeros_like(lp) if c is None else c  # unused: e.g. every token masked
    e = torch.zeros_like(ent) if e is None else e  # the entropy is only a metric here
    c, e = c.reshape(N), e.reshape(N)
    grad_hidden = torch.empty_like(h64)
    grad_weight = torch.zeros_like(w64)
    for rows in _flat_chunks(N, V):
        z = (h64[rows] @ w64.T).requires_grad_(True)
        lp_rows, ent_rows = reference.token_logprobs(z, ids[rows], temperature)
        (dz,) = torch.autograd.grad((lp_rows, ent_rows), z, (c[rows], e[rows]))
        del z, lp_rows, ent_rows
        grad_hidden[rows] = dz @ w64
        grad_weight.addmm_(dz.T, h64[rows])
        del dz
    mask = p.mask.double()
    scale = float((p.advantages.double().abs().unsqueeze(1) * mask).sum() / mask.sum().clamp(min=1.0))
    return LinearOracle(loss.item(), scale, grad_hidden.view(B, T, H), grad_weight)


def _rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error of x against ref, a block of rows at a time (no float64 copy
    of a V x H gradient); inf where x is not finite."""
    num = den = 0.0
    x, ref = x.reshape(-1, x.shape[-1]), ref.reshape(-1, ref.shape[-1])
    step = max(1, CHUNK_ELEMENTS // max(x.shape[-1], 1))
    for start in range(0, x.shape[0], step):
        a, b = x[start:start + step].double(), ref[start:start + step]
        if not bool(torch.isfinite(a).all()):
            return math.inf
        num += float(((a - b) ** 2).sum())
        den += float((b**2).sum())
    return math.sqrt(num / den) if den > 0 else float(num > 0)


def linear_error(o: LinearOracle, loss: torch.Tensor, grad_hidden: torch.Tensor,
                 grad_weight: torch.Tensor) -> tuple[float, float, float]:
    """(loss error, grad_hidden error, grad_weight error) against the oracle; inf where not finite.

    The loss error is that of `error`; each gradient error is the relative Frobenius error
    over the whole tensor (every row: none is near a clip bound, see _keep_off_clip_bounds).
    """
    value = float(loss)
    if not math.isfinite(value):
        return math.inf, math.inf, math.inf
    loss_err = abs(value - o.loss) / max(abs(o.loss), o.loss_scale, torch.finfo(torch.float64).tiny)
    return loss_err, _rel_err(grad_hidden, o.grad_hidden), _rel_err(grad_weight, o.grad_weight)
