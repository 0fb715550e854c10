"""The two-pass loss (SPEC section 14): for a token-local loss, one launch reads each active row
of logits once, keeps it on chip, and writes its gradient once, with the loss and metrics.

A row of V = 151,936 bf16 logits is 297 KB: more than one multiprocessor holds (256 KB of
registers, 228 KB of shared memory), and too much for the L2 to keep between two reads of it
when hundreds of rows are in flight (a re-reading kernel measured 1.55x the two-pass floor on
an H200: research/part3.md). So a row is split over split = cdiv(V, BLOCK) programs, each of
which loads its BLOCK columns into registers once and keeps them there:

  1. each program folds its slice into (m, s, u) (online_softmax_step) and publishes them;
  2. it waits until the row's other programs have published (a counter per row, release and
     acquire atomics), merges the pieces (merge_statistics), and so knows log pi(y), the
     entropy and, through loss_triton.row_coefficients, c = dL/dl and e = dL/dH;
  3. it writes the gradient of its slice from the values it still holds.

Programs that wait for each other must all be running: the grid is persistent and co-resident
(a cooperative launch of as many programs as the multiprocessors hold), program (g, k) takes
slice k of rows g, g + groups, ..., and loads the next row's slice before it waits for this
one's, so the wait overlaps a load. (A first version gave every (row, slice) its own program,
ordered by an atomic ticket: correct, and 4.2-5.5 ms at the work unit on an H200, because a
row's programs were scheduled far apart and waited idle: bench/NOTES.md.) Under Triton's
interpreter, which runs programs one after another, a row is never split (BLOCK >= V).

The gradient is written in the forward, already multiplied by `grad_scale` (the upstream
gradient the caller promises: 1, or 1 / accumulation steps); the backward returns it as it is
when the upstream gradient equals that promise (a device-side check, no host sync) and scales
it in one pass otherwise (`_rescale_kernel`).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from .. import loss_triton
from ..layout import Layout, Tokens
from ..options import GRPOOptions, single_backward
from .operators import zero_unscored
from .triton import (_RUNTIME_INTS, _check_supported, _row_offset, _row_setup, _rows_aligned, expm1,
                     merge_statistics, online_softmax_step, row_args)

Tensor = torch.Tensor


def enabled() -> bool:
    """Whether token-local losses take this path on the Triton backend (GRPO_KERNELS_TWO_PASS=1).
    Off by default until a GPU measures it faster than the three passes: the first version ran
    4.2-5.5 ms at the work unit against 2.1 ms for three passes (bench/NOTES.md); this one is
    unmeasured."""
    return os.environ.get("GRPO_KERNELS_TWO_PASS") == "1"


def available(backend: str, logits: Tensor) -> bool:
    """Whether `backend` has a two-pass kernel for these logits: Triton always; csrc's where it is
    built and its row fits (cuda.two_pass_unavailable_reason); the PyTorch path never."""
    if backend == "triton":
        return True
    if backend == "cuda" and logits.device.type == "cuda":
        from . import cuda

        return not cuda.two_pass_unavailable_reason(logits)
    return False


# The largest number of programs one row is split into (the merge loads them as one block).
MAX_SPLIT = 128
# Polls of a row's arrival counter before giving up on it (NaN row): far beyond any real wait.
MAX_SPINS: tl.constexpr = tl.constexpr(1 << 22)


@triton.jit
def _load_slice(row_ptr, cols, in_row, row, N, active, HAS_ACTIVE: tl.constexpr):
    """The slice `cols` of row `row` as stored (-inf past V); nothing is read for a row past N or
    not active."""
    read = in_row & ((cols * 0 + row) < N)
    if HAS_ACTIVE:
        read = read & ((cols * 0 + active) != 0)
    return tl.load(row_ptr + cols, mask=read, other=-float("inf"))


@triton.jit
def _row_slice_pass(x, row, k, split, V, row_ptr, grad_row_ptr, cols, in_row, active, inv_t, ids_ptr, logprob_ptr,
                    entropy_ptr, part_ptr, count_ptr, w_ptr, mask_ptr, adv_ptr, old_ptr, ref_ptr, rollout_ptr,
                    scal_ptr, sums_ptr, N, beta, eps_low, eps_high, delta, dual_clip,
                    SPLIT_BLOCK: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr, HAS_MASK: tl.constexpr,
                    HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr, HAS_ROLLOUT: tl.constexpr,
                    HAS_DELTA: tl.constexpr, HAS_DUAL_CLIP: tl.constexpr, KL_ESTIMATOR: tl.constexpr,
                    KL_RATIO_WEIGHT: tl.constexpr):
    """Slice k of row `row`, whose logits x (as loaded) this program holds: the slice's statistics,
    the exchange with the row's other slices, the row's log-prob, entropy and (c, e), then the
    slice's gradient into grad_row_ptr. An inactive row gets zeros (x was not read)."""
    if active == 0:
        tl.store(grad_row_ptr + cols, tl.zeros_like(x), mask=in_row)
        if k == 0:
            zero = tl.zeros_like(inv_t)
            tl.store(logprob_ptr + row, zero)
            tl.store(entropy_ptr + row, zero)
            # A masked row's sums are zeros, its inputs unread: row_coefficients of a dead row.
            loss_triton.row_coefficients(
                row, row < N, zero, zero, w_ptr, mask_ptr, adv_ptr, old_ptr, ref_ptr, rollout_ptr, scal_ptr,
                sums_ptr, N, beta, eps_low, eps_high, delta, dual_clip, HAS_MASK, HAS_OLD, HAS_REF, HAS_ROLLOUT,
                HAS_DELTA, HAS_DUAL_CLIP, KL_ESTIMATOR, KL_RATIO_WEIGHT)
    else:
        z = x.to(tl.float32) * inv_t
        m, s, u = online_softmax_step(-float("inf"), 0.0, 0.0, z, 0)
        if split > 1:
            # Publish this slice's statistics, then wait for the row's other slices.
            piece = part_ptr + (row * split + k) * 3
            tl.store(piece, m)
            tl.store(piece + 1, s)
            tl.store(piece + 2, u)
            tl.debug_barrier()  # every thread's stores before the release below
            tl.atomic_add(count_ptr + row, 1, sem="release")
            arrived = tl.atomic_add(count_ptr + row, 0, sem="acquire")
            spins = 0
            # Bounded: should a slice never arrive (the grid is co-resident, so it cannot), the row
            # is NaN after ~1 s instead of a hung process.
            while (arrived < split) & (spins < MAX_SPINS):
                arrived = tl.atomic_add(count_ptr + row, 0, sem="acquire")
                spins += 1
            ks = tl.arange(0, SPLIT_BLOCK)
            pieces = part_ptr + (row * split + ks) * 3
            there = ks < split
            # .cg: from the L2, where the other programs' stores are, never a stale L1 line.
            m, s, u = merge_statistics(tl.load(pieces, mask=there, other=-float("inf"), cache_modifier=".cg"),
                                       tl.load(pieces + 1, mask=there, other=0.0, cache_modifier=".cg"),
                                       tl.load(pieces + 2, mask=there, other=0.0, cache_modifier=".cg"), 0)
            m = tl.where(arrived >= split, m, float("nan"))
        log_s = tl.log(s)
        mean_rel = u / s
        y = tl.load(ids_ptr + row).to(tl.int64)
        owned = (y >= 0) & (y < V)
        z_y = tl.load(row_ptr + y, mask=owned, other=0.0).to(tl.float32) * inv_t
        logprob = tl.where(owned, (z_y - m) - log_s, float("nan"))
        entropy = log_s - mean_rel
        # Every program of the row computes the same c and e (and writes the same sums).
        c, e = loss_triton.row_coefficients(
            row, row < N, logprob, entropy, w_ptr, mask_ptr, adv_ptr, old_ptr, ref_ptr, rollout_ptr, scal_ptr,
            sums_ptr, N, beta, eps_low, eps_high, delta, dual_clip, HAS_MASK, HAS_OLD, HAS_REF, HAS_ROLLOUT,
            HAS_DELTA, HAS_DUAL_CLIP, KL_ESTIMATOR, KL_RATIO_WEIGHT)
        if k == 0:
            tl.store(logprob_ptr + row, logprob)
            tl.store(entropy_ptr + row, entropy)
        # The slice's gradient from the values still in registers; the 1/temperature of dz/dlogits
        # folds into c and e. At the target c (1 - p_y) = -c expm1(log p_y): exact when p_y ~ 1.
        c = c * inv_t
        z_rel = z - m
        p = tl.exp(z_rel - log_s)
        grad = tl.where(cols == y, -c * expm1(logprob), -c * p)
        if HAS_GRAD_ENTROPY:  # dH/dz = p (E_p[z] - z); a -inf logit has p = 0 and contributes 0
            grad += (e * inv_t) * p * tl.where(p > 0.0, mean_rel - z_rel, 0.0)
        tl.store(grad_row_ptr + cols, grad.to(x.dtype), mask=in_row)


@triton.jit(do_not_specialize=_RUNTIME_INTS + ["grad_stride_b", "grad_stride_t", "N", "groups"],
            do_not_specialize_on_alignment=["ids_ptr", "temperature_ptr", "active_ptr", "logprob_ptr", "entropy_ptr",
                                            "part_ptr", "count_ptr", "w_ptr", "mask_ptr", "adv_ptr", "old_ptr",
                                            "ref_ptr", "rollout_ptr", "scal_ptr", "sums_ptr"])
def _two_pass_kernel(
    logits_ptr, grad_ptr, ids_ptr, temperature_ptr, active_ptr, logprob_ptr, entropy_ptr, part_ptr, count_ptr,
    w_ptr, mask_ptr, adv_ptr, old_ptr, ref_ptr, rollout_ptr, scal_ptr, sums_ptr, N,
    beta, eps_low, eps_high, delta, dual_clip,
    T, stride_b, stride_t, grad_stride_b, grad_stride_t, V, vocab_start, inv_temperature, groups,
    BLOCK: tl.constexpr, SPLIT_BLOCK: tl.constexpr, ROWS_ALIGNED: tl.constexpr, HAS_ACTIVE: tl.constexpr,
    PER_ROW_TEMPERATURE: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr, HAS_ROLLOUT: tl.constexpr,
    HAS_DELTA: tl.constexpr, HAS_DUAL_CLIP: tl.constexpr, KL_ESTIMATOR: tl.constexpr,
    KL_RATIO_WEIGHT: tl.constexpr,
):
    """Program (g, k) of a co-resident grid of groups x split programs: columns [k BLOCK, (k + 1) BLOCK)
    of rows g, g + groups, g + 2 groups, ... of logits (B, T, V). Reads each slice once (active rows
    only; the next row's slice is loaded while this one waits for its row), ids, temperature,
    active [row] and the plan; writes grad[row, slice] (zeros for an inactive row), and from k = 0
    logprob[row], entropy[row] and the row's sums. part (N, split, 3) fp32 and count (N,) int32
    (zero on entry) are the exchange between a row's programs."""
    split = tl.cdiv(V, BLOCK)
    pid = tl.program_id(0)
    g = (pid // split).to(tl.int64)
    k = pid % split
    cols = k * BLOCK + tl.arange(0, BLOCK)
    in_row = cols < V
    # Software pipelining by hand: the slice of the next row is in flight during this row's wait.
    active, inv_t = _row_setup(g, temperature_ptr, active_ptr, inv_temperature, HAS_ACTIVE, PER_ROW_TEMPERATURE)
    row_ptr = logits_ptr + _row_offset(g, T, stride_b, stride_t, ROWS_ALIGNED)
    x_next = _load_slice(row_ptr, cols, in_row, g, N, active, HAS_ACTIVE)
    for row in range(g, N, groups):
        x = x_next
        row_ptr = logits_ptr + _row_offset(row, T, stride_b, stride_t, ROWS_ALIGNED)
        grad_row_ptr = grad_ptr + _row_offset(row, T, grad_stride_b, grad_stride_t, ROWS_ALIGNED)
        this_active = active
        this_inv_t = inv_t
        nxt = row + groups
        active, inv_t = _row_setup(tl.minimum(nxt, N - 1), temperature_ptr, active_ptr, inv_temperature, HAS_ACTIVE,
                                   PER_ROW_TEMPERATURE)
        next_ptr = logits_ptr + _row_offset(tl.minimum(nxt, N - 1), T, stride_b, stride_t, ROWS_ALIGNED)
        x_next = _load_slice(next_ptr, cols, in_row, nxt, N, active, HAS_ACTIVE)
        _row_slice_pass(x, row, k, split, V, row_ptr, grad_row_ptr, cols, in_row, this_active, this_inv_t, ids_ptr,
                        logprob_ptr, entropy_ptr, part_ptr, count_ptr, w_ptr, mask_ptr, adv_ptr, old_ptr, ref_ptr,
                        rollout_ptr, scal_ptr, sums_ptr, N, beta, eps_low, eps_high, delta, dual_clip, SPLIT_BLOCK,
                        HAS_GRAD_ENTROPY, HAS_MASK, HAS_OLD, HAS_REF, HAS_ROLLOUT, HAS_DELTA, HAS_DUAL_CLIP,
                        KL_ESTIMATOR, KL_RATIO_WEIGHT)


@triton.jit(do_not_specialize=["T", "stride_b", "stride_t"])
def _rescale_kernel(grad_ptr, g_ptr, grad_scale, T, stride_b, stride_t, V,
                    BLOCK: tl.constexpr, ROWS_ALIGNED: tl.constexpr):
    """Row `row` of grad (B, T, V) *= g / grad_scale, g = g_ptr[0]; returns at once, reading
    nothing more, when g == grad_scale (the gradient was written for exactly that)."""
    g = tl.load(g_ptr).to(tl.float32)
    if g != grad_scale:
        row = tl.program_id(0).to(tl.int64)
        row_ptr = grad_ptr + _row_offset(row, T, stride_b, stride_t, ROWS_ALIGNED)
        factor = g / grad_scale
        cols = tl.arange(0, BLOCK)
        for start in range(0, V, BLOCK):
            x = tl.load(row_ptr + start + cols, mask=start + cols < V).to(tl.float32)
            tl.store(row_ptr + start + cols, (x * factor).to(grad_ptr.dtype.element_ty), mask=start + cols < V)


def default_block(V: int) -> tuple[int, int]:
    """(BLOCK, num_warps): the columns one program holds, and its warps. 16 columns a thread keep
    the kernel near 60 registers on sm_90 (32 a thread need ~170: too few programs resident).
    Under the interpreter a row is never split (its programs run one after another and could
    not wait for each other)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return triton.next_power_of_2(V), 4
    block = max(4096, triton.next_power_of_2(triton.cdiv(V, MAX_SPLIT)))
    return min(block, triton.next_power_of_2(V)), 8


def two_pass_launch(rows: Tensor, grad_rows: Tensor, tokens: Tokens, plan: loss_triton.Plan, logprobs: Tensor,
                    entropy: Tensor, need_entropy_grad: bool, count: Tensor, part: Tensor, groups: int,
                    block: Optional[int] = None, num_warps: Optional[int] = None):
    """(kernel, grid, args, meta) of the two-pass kernel over rows (B', T', V) of logits, writing
    grad_rows (the same shape; may be rows themselves), logprobs, entropy (N,) and plan.sums, with
    `groups` rows in flight. count (N,) int32 zeros and part (N split 3,) fp32 are its exchange;
    `block` and `num_warps` override the defaults (the GPU probe measures them)."""
    B, T, V = rows.shape
    default, warps = default_block(V)
    block = block or default
    split = triton.cdiv(V, block)
    if split > MAX_SPLIT:
        raise ValueError(f"a row of V = {V} needs BLOCK >= {triton.next_power_of_2(triton.cdiv(V, MAX_SPLIT))}")
    t_scalar, t_rows = tokens.temperature_args
    temp_arg, active_arg, inv, flags = row_args(tokens.ids, t_rows if t_rows is not None else t_scalar,
                                                tokens.active)
    args = (rows, grad_rows, tokens.ids, temp_arg, active_arg, logprobs, entropy, part, count, *plan.args,
            T, rows.stride(0), rows.stride(1), grad_rows.stride(0), grad_rows.stride(1), V, 0, inv, groups)
    meta = dict(BLOCK=block, SPLIT_BLOCK=max(triton.next_power_of_2(split), 2),
                ROWS_ALIGNED=_rows_aligned(rows) and _rows_aligned(grad_rows), HAS_GRAD_ENTROPY=need_entropy_grad,
                num_warps=num_warps or warps, **flags, **plan.meta)
    if split > 1 and _COOPERATIVE:  # a row's programs wait for each other: all must be resident at once
        meta["launch_cooperative_grid"] = True
    return _two_pass_kernel, (groups * split,), args, meta


_RESIDENT: dict = {}


def _cooperative_launch_supported() -> bool:
    """Whether this Triton launches a grid cooperatively (CUDAOptions.launch_cooperative_grid)."""
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    return "launch_cooperative_grid" in getattr(CUDAOptions, "__dataclass_fields__", {})


_COOPERATIVE = _cooperative_launch_supported()


def co_resident(kernel, args, meta, device: torch.device) -> int:
    """How many programs of this compiled variant fit on the device at once (registers, threads,
    shared memory per multiprocessor), so that a grid of that many is co-resident."""
    key = (device.index, tuple(sorted((k, v) for k, v in meta.items() if k != "launch_cooperative_grid")),
           args[0].dtype)
    if key not in _RESIDENT:
        compiled = kernel.warmup(*args, grid=(1,), **meta)
        compiled._init_handles()
        warps = compiled.metadata.num_warps
        regs_per_warp = -(-max(compiled.n_regs, 1) * 32 // 256) * 256  # allocated per warp in units of 256
        props = torch.cuda.get_device_properties(device)
        limits = [65536 // (regs_per_warp * warps), 2048 // (32 * warps), 32]
        shared = compiled.metadata.shared
        if shared:
            per_sm = getattr(props, "shared_memory_per_multiprocessor", 228 * 1024)
            limits.append(per_sm // (shared + 1024))
        _RESIDENT[key] = max(1, min(limits)) * props.multi_processor_count
    return _RESIDENT[key]


def launch(rows: Tensor, grad_rows: Tensor, tokens: Tokens, plan: loss_triton.Plan, logprobs: Tensor, entropy: Tensor,
           need_entropy_grad: bool, block: Optional[int] = None, num_warps: Optional[int] = None) -> None:
    """Runs the two-pass kernel (two_pass_launch) with its exchange buffers: one program per row
    when a row fits one program, else a co-resident grid of as many row groups as fit."""
    B, T, V = rows.shape
    N = B * T
    if N == 0:
        return
    split = triton.cdiv(V, block or default_block(V)[0])
    # The exchange buffers, only where a row is split (else placeholders that are never touched).
    count = torch.zeros(N, dtype=torch.int32, device=rows.device) if split > 1 else tokens.ids
    part = torch.empty(N * split * 3, dtype=torch.float32, device=rows.device) if split > 1 else logprobs
    make = lambda groups: two_pass_launch(rows, grad_rows, tokens, plan, logprobs, entropy,  # noqa: E731
                                          need_entropy_grad, count, part, groups, block, num_warps)
    kernel, grid, args, meta = make(N)
    if split > 1:
        kernel, grid, args, meta = make(max(1, min(N, co_resident(kernel, args, meta, rows.device) // split)))
    kernel[grid](*args, **meta)


def _tokens_of(ids, temperature, temperature_rows, mask, active, advantages, adv_per_seq, offsets, old, ref, rollout,
               num_seqs, seq_len) -> Tokens:
    N = ids.shape[0]
    layout = Layout(num_seqs, N, seq_len=None if offsets is not None else seq_len, offsets=offsets)
    return Tokens(layout, ids, mask, active, advantages, old, ref, rollout, None,
                  temperature if temperature_rows is None else temperature_rows, None, adv_per_seq, False)


def _options_of(loss_type, beta, eps_low, eps_high, delta, dual_clip, kl_estimator, kl_ratio_weight, entropy_coef,
                grad_scale) -> GRPOOptions:
    return GRPOOptions(loss_type=loss_type, beta=beta, epsilon_low=eps_low, epsilon_high=eps_high, delta=delta,
                       dual_clip=dual_clip, kl_estimator=kl_estimator, use_bias_correction_kl=kl_ratio_weight,
                       entropy_coef=entropy_coef, grad_scale=grad_scale)


def _run(logits, row_start, ids, temperature, temperature_rows, mask, active, advantages, adv_per_seq, offsets, old,
         ref, rollout, n_items, num_seqs, seq_len, loss_type, beta, eps_low, eps_high, delta, dual_clip, kl_estimator,
         kl_ratio_weight, entropy_coef, divisor_code, divisor, grad_scale, backend, grad):
    """The op body: plan, the two-pass kernel into grad (Triton, or csrc's on backend "cuda"), the
    sums. Returns (loss, out, logprobs)."""
    _check_supported(logits)
    tokens = _tokens_of(ids, temperature, temperature_rows, mask, active, advantages, adv_per_seq, offsets, old, ref,
                        rollout, num_seqs, seq_len)
    o = _options_of(loss_type, beta, eps_low, eps_high, delta, dual_clip, kl_estimator, kl_ratio_weight,
                    entropy_coef, grad_scale)
    plan = loss_triton.Plan(tokens, o, grad_scale, (divisor_code, divisor, n_items))
    N = ids.shape[0]
    T = N // logits.shape[0] if logits.shape[0] else 0
    logprobs = torch.empty(N, dtype=torch.float32, device=logits.device)
    entropy = torch.empty(N, dtype=torch.float32, device=logits.device)
    if backend == "cuda":
        _csrc_two_pass(logits, row_start, T, tokens, plan, o, grad, logprobs)
    else:
        zero_unscored(grad, row_start, T)
        launch(logits.narrow(1, row_start, T), grad.narrow(1, row_start, T), tokens, plan, logprobs, entropy,
               entropy_coef != 0.0)
    loss, out = plan.finish()
    return loss, out, logprobs


def _csrc_two_pass(logits, row_start, T, tokens: Tokens, plan: loss_triton.Plan, o: GRPOOptions, grad, logprobs):
    """csrc/two_pass.cu's kernel (a thread-block cluster per row on sm_90) under the same plan: it
    writes the whole gradient (zeros outside the window), the log-probs and the rows' sums."""
    from . import cuda

    N = tokens.ids.shape[0]
    f32 = lambda t: None if t is None else t.float().contiguous()  # noqa: E731  (the contract's dtypes)
    t_scalar, t_rows = tokens.temperature_args
    mask = torch.ones(N, dtype=torch.float32, device=logits.device) if tokens.mask is None else f32(tokens.mask)
    active = None if tokens.active is None else tokens.active.view(torch.uint8)
    _, lp, _, sums = cuda.two_pass(
        logits, row_start, T, tokens.ids, 1.0 / t_scalar, t_rows, active, plan.w, mask, f32(plan.adv),
        f32(tokens.old_logprobs), f32(tokens.ref_logprobs), f32(tokens.rollout_is_ratio), plan.scal, beta=o.beta,
        eps_low=o.epsilon_low, eps_high=o.eps_high, delta=o.delta, dual_clip=o.dual_clip,
        kl_estimator=loss_triton.KL_ESTIMATOR_CODES[o.kl_estimator], kl_ratio_weight=o.use_bias_correction_kl,
        has_entropy_grad=o.entropy_coef != 0.0, grad=grad)
    logprobs.copy_(lp)
    plan.sums = sums


@torch.library.custom_op("grpo_kernels::two_pass_loss", mutates_args=())
def two_pass_loss(logits: Tensor, row_start: int, ids: Tensor, temperature: float, temperature_rows: Optional[Tensor],
                  mask: Optional[Tensor], active: Optional[Tensor], advantages: Tensor, adv_per_seq: bool,
                  offsets: Optional[Tensor], old: Optional[Tensor], ref: Optional[Tensor], rollout: Optional[Tensor],
                  n_items: Optional[Tensor], num_seqs: int, seq_len: int, loss_type: str, beta: float, eps_low: float,
                  eps_high: float, delta: Optional[float], dual_clip: Optional[float], kl_estimator: str,
                  kl_ratio_weight: bool, entropy_coef: float, divisor_code: int, divisor: float, grad_scale: float,
                  backend: str
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The token-local loss of the rows [row_start, row_start + T) of logits (B, L, V): the loss,
    out (kl, entropy, clip low/high/region, 1/n, e_scale), the log-probs (N,), and the gradient
    of the whole of logits times grad_scale (zeros on the rows not scored)."""
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    loss, out, logprobs = _run(logits, row_start, ids, temperature, temperature_rows, mask, active, advantages,
                               adv_per_seq, offsets, old, ref, rollout, n_items, num_seqs, seq_len, loss_type, beta,
                               eps_low, eps_high, delta, dual_clip, kl_estimator, kl_ratio_weight, entropy_coef,
                               divisor_code, divisor, grad_scale, backend, grad)
    return loss, out, logprobs, grad


@torch.library.custom_op("grpo_kernels::two_pass_loss_", mutates_args=("logits",))
def two_pass_loss_(logits: Tensor, row_start: int, ids: Tensor, temperature: float, temperature_rows: Optional[Tensor],
                   mask: Optional[Tensor], active: Optional[Tensor], advantages: Tensor, adv_per_seq: bool,
                   offsets: Optional[Tensor], old: Optional[Tensor], ref: Optional[Tensor], rollout: Optional[Tensor],
                   n_items: Optional[Tensor], num_seqs: int, seq_len: int, loss_type: str, beta: float, eps_low: float,
                   eps_high: float, delta: Optional[float], dual_clip: Optional[float], kl_estimator: str,
                   kl_ratio_weight: bool, entropy_coef: float, divisor_code: int, divisor: float, grad_scale: float,
                  backend: str
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """two_pass_loss with the gradient written into the logits' own storage (inplace_backward):
    each element is read before it is overwritten; the declared mutation bumps their version."""
    return _run(logits, row_start, ids, temperature, temperature_rows, mask, active, advantages, adv_per_seq, offsets,
                old,
                ref, rollout, n_items, num_seqs, seq_len, loss_type, beta, eps_low, eps_high, delta, dual_clip,
                kl_estimator, kl_ratio_weight, entropy_coef, divisor_code, divisor, grad_scale, backend, logits)


def _fake_outputs(logits, ids):
    f32 = dict(dtype=torch.float32, device=logits.device)
    return logits.new_empty((), **f32), logits.new_empty(7, **f32), logits.new_empty(ids.shape[0], **f32)


@two_pass_loss.register_fake
def _(logits, row_start, ids, *rest):
    return (*_fake_outputs(logits, ids), logits.new_empty(logits.shape))


@two_pass_loss_.register_fake
def _(logits, row_start, ids, *rest):
    return _fake_outputs(logits, ids)


@torch.library.custom_op("grpo_kernels::rescale_gradient_", mutates_args=("grad",))
def rescale_gradient_(grad: Tensor, g: Tensor, grad_scale: float) -> None:
    """grad (B, L, V) *= g / grad_scale, in one pass, unless g == grad_scale (checked on the device)."""
    B, L, V = grad.shape
    if B * L == 0:
        return
    if grad.device.type != "cuda" and not _interpreted():
        grad.mul_(torch.where(g == grad_scale, 1.0, g / grad_scale).to(grad.dtype))
        return
    _rescale_kernel[(B * L,)](grad, g.reshape(1), float(grad_scale), L, grad.stride(0), grad.stride(1), V,
                              BLOCK=min(triton.next_power_of_2(V), 4096), ROWS_ALIGNED=_rows_aligned(grad),
                              num_warps=8)


@rescale_gradient_.register_fake
def _(grad, g, grad_scale):
    return None


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _setup_context(ctx, inputs, output):
    ctx.grad_scale = inputs[-2]
    ctx.set_materialize_grads(False)  # no zero tensors for the outputs that take no gradient
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(output[3])  # the gradient, an output of the op


@single_backward
def _backward(ctx, grad_loss, *_):
    if grad_loss is None:
        return (None,) * 29
    (grad,) = ctx.saved_tensors
    torch.ops.grpo_kernels.rescale_gradient_(grad, grad_loss, ctx.grad_scale)
    return (grad,) + (None,) * 28


two_pass_loss.register_autograd(_backward, setup_context=_setup_context)


class _TwoPassInPlace(torch.autograd.Function):
    """two_pass_loss_ under autograd: the mutation bumps the logits' version (a later use of
    their overwritten values raises), and the backward hands back the logits, which hold the
    gradient (rescaled only when the upstream gradient is not grad_scale)."""

    @staticmethod
    def forward(ctx, logits, *args):
        loss, out, logprobs = torch.ops.grpo_kernels.two_pass_loss_(logits, *args)
        ctx.grad_scale = args[-2]
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(logits)
        ctx.mark_non_differentiable(out, logprobs)
        return loss, out, logprobs

    @staticmethod
    @single_backward
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, *_):
        (grad,) = ctx.saved_tensors
        torch.ops.grpo_kernels.rescale_gradient_(grad, grad_loss, ctx.grad_scale)
        return (grad,) + (None,) * 28


def fused_loss(logits: Tensor, row_start: int, tokens: Tokens, o: GRPOOptions, backend: str = "triton"
               ) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, out (7,), logprobs (N,)) of a token-local loss through the two-pass op; `logits` is the
    model's full output (B, L, V), of which rows [row_start, row_start + T) are scored."""
    layout = tokens.layout
    t_scalar, t_rows = tokens.temperature_args
    code, divisor, n_items = loss_triton.divisor_of(o, tokens)
    args = (logits, row_start, tokens.ids, t_scalar, t_rows, tokens.mask, tokens.active, tokens.advantages,
            tokens.advantages_per_seq, layout.offsets, tokens.old_logprobs, tokens.ref_logprobs,
            tokens.rollout_is_ratio, n_items, layout.num_seqs, layout.seq_len or 0, o.loss_type, float(o.beta),
            float(o.epsilon_low), float(o.eps_high), o.delta, o.dual_clip, o.kl_estimator,
            o.use_bias_correction_kl, float(o.entropy_coef), code, float(divisor), float(o.grad_scale), backend)
    if o.inplace_backward:
        loss, out, logprobs = _TwoPassInPlace.apply(*args)
    else:
        loss, out, logprobs, _ = torch.ops.grpo_kernels.two_pass_loss(*args)
    return loss, out, logprobs
