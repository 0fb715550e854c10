"""Vocab-parallel logits (SPEC section 9): each rank holds the columns [vocab_start, vocab_start
+ V_local) of every row, in the process group `tp_group` (Megatron's tensor-parallel group).

A row's softmax statistics merge exactly over shards (stats.py): each rank sweeps its shard
into (m, s, u, z_y) measured from its own max, then

  1. one all-reduce MAX of m                      -> M, the row max over the whole vocabulary;
  2. each rank rebases (s, u) to M                 (local arithmetic, stats.rebase);
  3. one all-reduce SUM of the stacked (4, N) rows [s, u, z_y, owned]
                                                  -> S, U, the target logit Z and how many
                                                     shards own the target;
  4. stats.finish(M, S, U, Z) on every rank       -> logprobs = (Z - M) - log S,
                                                     entropy = log S - U / S, identical everywhere.

The fourth summed row (`owned`, 4 bytes per token beyond the issue's three numbers) turns an
id outside the global vocabulary into a NaN log-prob where no host check ran (on a GPU, or
under torch.compile); in eager mode on the CPU such an id has already raised (layout.check_ids
against the global V). Every rank then runs the loss on the same per-token values, so loss and
metrics agree on every rank, and the backward over the logits needs no communication: with
M, log S and U / S each rank has p_v = exp(z_v - M - log S) for its own columns, which is all
dL/dz_v needs (docs/math.md, "Vocab-parallel reduction").

The fused-linear form (vocab_parallel_linear_sweep) is the same over (hidden, weight shard,
bias shard); its backward sums grad_hidden over the group, or with sequence_parallel
all-gathers hidden in the forward and reduce-scatters its gradient.

The collectives are torch.distributed's (gloo on CPUs, NCCL on GPUs), called through the
module attribute (`dist.all_reduce`), so they can be counted or replaced in tests. Every
rank must make the same calls in the same order (SPMD), as with any collective; the process
group's timeout bounds a rank that does not.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from . import stats
from .layout import Layout
from .sweep.operators import sweep_backward

Tensor = torch.Tensor

# Codes for the dtype check of shard_bounds (any fixed numbering; -1: not given).
_DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}


def _world(group) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("tp_group was given but torch.distributed is not initialised "
                           "(call torch.distributed.init_process_group first)")
    return dist.get_rank(group), dist.get_world_size(group)


def _comm_device(group, device: torch.device) -> torch.device:
    """Where the small bounds tensor lives: the CPU for gloo, the tensors' device otherwise (NCCL)."""
    try:
        backend = str(dist.get_backend(group)).lower()
    except Exception:  # noqa: BLE001 - an unusual group object: use the data's device
        return torch.device(device)
    return torch.device("cpu") if backend == "gloo" else torch.device(device)


def _all_gather_into(out: Tensor, inp: Tensor, group) -> None:
    """All-gather `inp` of every rank into `out` (rank-major), with the name this torch has."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, inp, group=group)


def shard_bounds(V_local: int, vocab_start: int | None, group, device, dtype: torch.dtype | None = None
                 ) -> tuple[int, int]:
    """(vocab_start, V_global) of this rank's shard, after checking that the shards of all ranks
    tile [0, V_global) without gaps or overlaps and hold one dtype.

    One small all-gather of (vocab_start, V_local, dtype) per call, so every rank sees the same
    table and raises the same ValueError on bad input (no rank is left waiting in a later
    collective). `vocab_start=None` means rank * V_local (Megatron's equal split). The host
    reads the gathered table (one sync on a GPU): the bounds are kernel arguments.
    """
    rank, world = _world(group)
    if vocab_start is None:
        start = rank * int(V_local)
    elif isinstance(vocab_start, bool) or not isinstance(vocab_start, int) or vocab_start < 0:
        start = -1  # raised below, on every rank, with the table
    else:
        start = vocab_start
    code = -1 if dtype is None else _DTYPE_CODES.get(dtype, -2)
    mine = torch.tensor([start, int(V_local), code], dtype=torch.int64, device=_comm_device(group, device))
    table = torch.empty(world * 3, dtype=torch.int64, device=mine.device)
    _all_gather_into(table, mine, group)
    rows = [tuple(r) for r in table.view(world, 3).tolist()]

    listing = ", ".join(f"rank {r}: [{s}, {s + v})" for r, (s, v, _) in enumerate(rows))
    bad_start = [r for r, (s, _, _) in enumerate(rows) if s < 0]
    if bad_start:
        raise ValueError(f"vocab_start must be a non-negative int or None on every rank of tp_group; ranks "
                         f"{bad_start} passed something else" +
                         (f" (this rank: {vocab_start!r})" if rank in bad_start else ""))
    codes = {c for _, _, c in rows}
    if len(codes) > 1:
        names = {c: n for n, c in ((str(k).replace("torch.", ""), v) for k, v in _DTYPE_CODES.items())}
        per_rank = ", ".join(f"rank {r}: {names.get(c, 'other')}" for r, (_, _, c) in enumerate(rows))
        raise ValueError(f"vocab-parallel shards of different dtypes in tp_group ({per_rank}); "
                         "every rank must pass logits (or lm_head_weight) of one dtype")
    end = 0
    for s, v in sorted((s, v) for s, v, _ in rows):
        if s != end:
            what = "a gap" if s > end else "an overlap"
            raise ValueError(f"the vocab shards of tp_group leave {what} at global column {min(s, end)}: "
                             f"they must tile [0, V) without gaps or overlaps ({listing})")
        end = s + v
    return start, end


def vocab_bounds(V_local: int, group, vocab_start: int | None, device, dtype: torch.dtype | None
                 ) -> tuple[int, int]:
    """(vocab_start, V_global) of logits (or an LM head) with V_local columns: (0, V_local) without a
    group, else the shards' bounds as shard_bounds checks them."""
    if group is None:
        if vocab_start not in (None, 0):
            raise ValueError("vocab_start is for a vocab-parallel shard: pass tp_group too")
        return 0, V_local
    return shard_bounds(V_local, vocab_start, group, device, dtype)


def _sum_rows(m: Tensor, s: Tensor, u: Tensor, z_y: Tensor, owned: Tensor, active: Tensor | None, group
              ) -> tuple[Tensor, ...]:
    """The two collectives of a vocab-parallel forward: MAX of m, then one SUM of (s, u, z_y, owned)
    rebased to the global max. Returns stats.finish's five numbers."""
    M = m.clone()
    dist.all_reduce(M, op=dist.ReduceOp.MAX, group=group)
    s, u = stats.rebase(m, s, u, stats.shift_of(M))
    # z_y only where this shard owns the target: the contract's 0 elsewhere, whatever a backend
    # left there (one (N,) select).
    summed = torch.stack((s, u, torch.where(owned, z_y, 0.0), owned.to(s.dtype)))
    dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=group)
    S, U, Z, count = summed.unbind(0)
    return stats.finish(M, S, U, Z, owned=count > 0, active=active)


def _owned(ids: Tensor, vocab_start: int, V_local: int) -> Tensor:
    local = ids - vocab_start
    return (local >= 0) & (local < V_local)


class _VocabParallelSweep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, ids, temperature, temperature_rows, active, vocab_start, backend, inplace, group):
        m, s, u, z_y, _ = torch.ops.grpo_kernels.logits_sweep(rows, 0, ids, temperature, temperature_rows, active,
                                                              vocab_start, True, backend, inplace, True)
        logprobs, entropy, shift, log_sum, mean_rel = _sum_rows(
            m, s, u, z_y, _owned(ids, vocab_start, rows.shape[-1]), active, group)
        ctx.save_for_backward(rows, ids, temperature_rows, active, shift, log_sum, mean_rel)
        ctx.temperature, ctx.vocab_start, ctx.backend, ctx.inplace = temperature, vocab_start, backend, inplace
        ctx.set_materialize_grads(False)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        if grad_logprobs is None and grad_entropy is None or not ctx.needs_input_grad[0]:
            return (None,) * 9
        rows, ids, temperature_rows, active, shift, log_sum, mean_rel = ctx.saved_tensors
        contiguous = lambda g: None if g is None else g.to(shift.dtype).contiguous()  # noqa: E731
        grad = sweep_backward(rows, 0, ids, ctx.temperature, temperature_rows, active, shift, log_sum, mean_rel,
                              contiguous(grad_logprobs), contiguous(grad_entropy), ctx.vocab_start, ctx.backend,
                              ctx.inplace)
        return (grad,) + (None,) * 8


def vocab_parallel_sweep(rows: Tensor, ids: Tensor, temperature: float, temperature_rows: Tensor | None,
                         active: Tensor | None, vocab_start: int, backend: str, inplace: bool, group
                         ) -> tuple[Tensor, Tensor]:
    """logprobs and entropy (N,) of rows (B, T, V_local), this rank's columns [vocab_start,
    vocab_start + V_local) of the logits; ids (N,) are global. Identical on every rank of `group`.

    Forward: one all-reduce MAX and one all-reduce SUM (module docstring). Backward: none;
    each rank gets the gradient of its own shard (written into `rows` with `inplace`).
    """
    return _VocabParallelSweep.apply(rows, ids, temperature, temperature_rows, active, vocab_start, backend,
                                     inplace, group)


def local_rows_layout(hidden: Tensor, layout: Layout, group) -> Layout:
    """The layout of this rank's hidden rows under sequence_parallel=True: hidden is (N / TP, H)
    (or (1, N / TP, H)), rank r holding tokens [r N / TP, (r + 1) N / TP) of the flat token order
    of completion_ids, which are given for all N tokens. Raises unless rows * TP == N."""
    if group is None:
        raise ValueError("sequence_parallel=True needs tp_group (the group the tokens are split over)")
    if not isinstance(hidden, Tensor):
        raise TypeError(f"hidden must be a torch.Tensor, got {type(hidden).__name__}")
    _, world = _world(group)
    N = layout.num_rows
    n = hidden.shape[-2] if hidden.dim() in (2, 3) else -1
    if hidden.dim() not in (2, 3) or (hidden.dim() == 3 and hidden.shape[0] != 1) or n * world != N:
        raise ValueError(f"with sequence_parallel=True, hidden must hold this rank's N / TP rows, shape "
                         f"(N / TP, H) = ({N // world if N % world == 0 else N / world}, H) for N = {N} tokens "
                         f"(completion_ids cover all of them) and TP = {world}, got {tuple(hidden.shape)}")
    return Layout(1, n, seq_len=n)


class _VocabParallelLinearSweep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, weight, bias, ids, temperature, temperature_rows, active, vocab_start, backend, group,
                sequence_parallel):
        if sequence_parallel:
            _, world = _world(group)
            full = rows.new_empty((rows.shape[0] * world, rows.shape[1]))
            _all_gather_into(full, rows.contiguous(), group)
        else:
            full = rows
        m, s, u, z_y, _ = torch.ops.grpo_kernels.linear_sweep(full, weight, bias, ids, temperature,
                                                              temperature_rows, active, vocab_start, True, backend)
        logprobs, entropy, shift, log_sum, mean_rel = _sum_rows(
            m, s, u, z_y, _owned(ids, vocab_start, weight.shape[0]), active, group)
        ctx.save_for_backward(full, weight, bias, ids, temperature_rows, active, shift, log_sum, mean_rel)
        ctx.temperature, ctx.vocab_start, ctx.backend = temperature, vocab_start, backend
        ctx.group, ctx.sequence_parallel = group, sequence_parallel
        ctx.set_materialize_grads(False)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        needs = list(ctx.needs_input_grad[:3])
        if grad_logprobs is None and grad_entropy is None or not any(needs):
            return (None,) * 11
        full, weight, bias, ids, temperature_rows, active, shift, log_sum, mean_rel = ctx.saved_tensors
        needs[2] = needs[2] and bias is not None
        contiguous = lambda g: None if g is None else g.to(shift.dtype).contiguous()  # noqa: E731
        grad_hidden, grad_weight, grad_bias = torch.ops.grpo_kernels.linear_sweep_backward(
            full, weight, bias, ids, ctx.temperature, temperature_rows, active, shift, log_sum, mean_rel,
            contiguous(grad_logprobs), contiguous(grad_entropy), ctx.vocab_start, needs, ctx.backend)
        if needs[0]:
            # Each rank's grad_hidden is the part of dL/dhidden that flows through its columns.
            if ctx.sequence_parallel:
                _, world = _world(ctx.group)
                local = grad_hidden.new_empty((grad_hidden.shape[0] // world, grad_hidden.shape[1]))
                scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
                scatter(local, grad_hidden.contiguous(), op=dist.ReduceOp.SUM, group=ctx.group)
                grad_hidden = local
            else:
                dist.all_reduce(grad_hidden, op=dist.ReduceOp.SUM, group=ctx.group)
        grads = tuple(g if need else None for g, need in zip((grad_hidden, grad_weight, grad_bias), needs))
        return (*grads,) + (None,) * 8


def vocab_parallel_linear_sweep(rows: Tensor, weight: Tensor, bias: Tensor | None, ids: Tensor, temperature: float,
                                temperature_rows: Tensor | None, active: Tensor | None, vocab_start: int,
                                backend: str, group, sequence_parallel: bool) -> tuple[Tensor, Tensor]:
    """logprobs and entropy (N,) from hidden rows (N, H) and this rank's lm_head shard weight
    (V_local, H), bias (V_local,) | None, columns [vocab_start, vocab_start + V_local); identical
    on every rank of `group`.

    Forward: one all-reduce MAX and one SUM, as vocab_parallel_sweep. Backward: grad_hidden is
    summed over the group (each rank keeps its own grad_weight / grad_bias shard).

    With sequence_parallel, `rows` are this rank's (N / TP, H) slice of the tokens (rank r holds
    tokens [r N / TP, (r + 1) N / TP)); ids, active and temperature_rows are for all N tokens.
    The forward all-gathers the hidden rows (and keeps the gathered copy for the backward), the
    backward reduce-scatters grad_hidden back to each rank's slice. This is Megatron's
    sequence-parallel split when the batch is one packed row ([N / TP, 1, H]); for [s / TP, b, H]
    with b > 1 the gathered order is position-major, which the caller's ids would have to follow.
    """
    return _VocabParallelLinearSweep.apply(rows, weight, bias, ids, temperature, temperature_rows, active,
                                           vocab_start, backend, group, bool(sequence_parallel))
