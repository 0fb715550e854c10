"""Rows and sequences: the one place that knows the padded (B, T) and packed (cu_seqlens) layouts.

Both layouts reach the layers above as the same thing:
- the logits as a (B', T', V) view whose row r = b' * T' + t' is token r (padded: B' = B,
  T' = T; packed: B' = 1, T' = N), never a copy;
- every per-token tensor flat, (N,) in row order; per-sequence ones (S,);
- a `Layout` that sums per-token values over each sequence (`seq_sum`) and spreads
  per-sequence values over its tokens (`seq_expand`).

`Tokens` is the record of the per-token inputs of the objective, checked and flattened once
here, so the loss layer and the sweeps take (logits, tokens, options) and have no second
version per layout.

Checks of values (ids in range, cu_seqlens well formed, temperatures positive) never wait
for the device: in eager mode on the CPU they raise the ValueError naming the argument; on
a GPU, or while torch.compile traces, they become a device-side flag that turns the loss
and the log-probs into NaN (`Tokens.invalid`). See docs/design.md.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import options as option_checks
from .options import LOGITS_DTYPES, GRPOOptions, check_tensor, eager_cpu, has_shape, sizes_match


@dataclass(frozen=True, eq=False)
class Layout:
    """How N rows form S sequences: padded (S, T) rows, or packed rows split by offsets."""

    num_seqs: int
    num_rows: int
    seq_len: int | None = None  # T of the padded layout; None when packed
    offsets: torch.Tensor | None = None  # (S + 1,) int64 row offsets, packed only

    @property
    def packed(self) -> bool:
        return self.offsets is not None

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of a per-token tensor as the caller passes and gets it: (B, T) or (N,)."""
        return (self.num_rows,) if self.packed else (self.num_seqs, self.seq_len)

    def flat(self, x: torch.Tensor) -> torch.Tensor:
        """A per-token tensor in the caller's shape -> (N,)."""
        return x.reshape(self.num_rows)

    def unflat(self, x: torch.Tensor) -> torch.Tensor:
        """(N,) -> the caller's shape."""
        return x.view(self.shape)

    def seq_sum(self, x: torch.Tensor) -> torch.Tensor:
        """(N,) -> (S,): the sum of each sequence's rows (0 for an empty sequence)."""
        if not self.packed:
            return x.view(self.num_seqs, self.seq_len).sum(-1)
        # One pass per sequence in row order: deterministic, unlike a scatter-add on a GPU.
        return torch.segment_reduce(x, "sum", offsets=self.offsets, unsafe=True, initial=0)

    def seq_expand(self, v: torch.Tensor) -> torch.Tensor:
        """(S,) -> (N,): each sequence's value on each of its rows."""
        if not self.packed:
            return v.unsqueeze(-1).expand(self.num_seqs, self.seq_len).reshape(self.num_rows)
        return _SeqExpand.apply(v, self)

    def logits_rows(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits (or hidden states) as a (B', T', X) view of the rows, never a copy."""
        full, row_start = self.scored_rows(logits)
        return full.narrow(1, row_start, self.num_rows if self.packed else self.seq_len)

    def scored_rows(self, logits: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(the logits as a (B', L, X) view, row_start): rows [row_start, row_start + T') of each
        batch entry are the scored ones. L > T only for the model's full output (B, L, V) of the
        padded layout, whose rows L - 1 - T .. L - 2 predict the T completion tokens (TRL's
        logits_to_keep + 1, Liger's (B, T + 1, V)); the kernels then write the gradient of the
        whole tensor, zeros on the other rows."""
        if logits.dim() == 3:
            L = logits.shape[1]
            return logits, (L - 1 - self.seq_len if not self.packed and L > self.seq_len else 0)
        if self.packed:
            return logits.unsqueeze(0), 0
        return logits.unflatten(0, (self.num_seqs, self.seq_len)), 0


class _SeqExpand(torch.autograd.Function):
    """Spread (S,) over the rows of a packed layout; the backward is the deterministic seq_sum."""

    @staticmethod
    def forward(ctx, v, layout):
        ctx.layout = layout
        return torch.repeat_interleave(v, layout.offsets.diff(), output_size=layout.num_rows)

    @staticmethod
    def backward(ctx, grad):
        return ctx.layout.seq_sum(grad), None


def _flag(bad: torch.Tensor, message: str, invalid: torch.Tensor | None) -> torch.Tensor | None:
    """Raise `message` if bad (eager CPU), else fold the 0-dim bool `bad` into the device-side flag."""
    if eager_cpu(bad):
        if bool(bad):
            raise ValueError(message)
        return invalid
    return bad if invalid is None else invalid | bad


def _offsets(cu_seqlens: torch.Tensor, N: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """cu_seqlens checked, as int64 offsets made safe to index with (clamped to [0, N], non-decreasing)."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens must have shape (S + 1,), got {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but completion_ids are on {device}")
    cu = cu_seqlens.long()
    bad = (cu[0] != 0) | (cu[-1] != N)
    if cu.numel() > 1:
        bad = bad | (cu.diff() < 0).any()
    # The message names N and the values in eager CPU mode only, where it can be raised: formatting
    # a symbolic N under torch.compile would specialise it (a recompile for every N).
    invalid = _flag(bad, f"cu_seqlens must start at 0, never decrease and end at N = {N}; got "
                         f"{cu_seqlens.tolist() if cu.numel() <= 16 else 'other values'}" if eager_cpu(cu) else "",
                    None)
    # Whatever the values, offsets that start at 0, end at N and never decrease: every later
    # op stays in bounds, and the loss carries the NaN flag above if they were not as given.
    safe = torch.cummax(cu.clamp(0, N), 0).values
    if safe.numel() > 1:
        safe = torch.cat([safe.new_zeros(1), safe[1:-1], safe.new_full((1,), N)])
    return safe, invalid


@dataclass(frozen=True, eq=False)
class Tokens:
    """The per-token inputs of the objective, checked and flat.

    advantages and rollout_is_ratio are (S,) when given per sequence, else (N,); old, ref
    and sampling log-probs (N,) or None; mask (N,) in its own dtype or None; active (N,)
    bool (mask != 0) or None; temperature a float or (N,) fp32; advantages_per_seq and
    rollout_per_seq say which of the two shapes those have. All but ids and mask are
    detached: they are constants of the objective. `invalid` is the device-side flag of
    the value checks (None when every check ran on the host).
    """

    layout: Layout
    ids: torch.Tensor
    mask: torch.Tensor | None
    active: torch.Tensor | None
    advantages: torch.Tensor | None
    old_logprobs: torch.Tensor | None
    ref_logprobs: torch.Tensor | None
    rollout_is_ratio: torch.Tensor | None
    sampling_logprobs: torch.Tensor | None
    temperature: float | torch.Tensor
    invalid: torch.Tensor | None
    advantages_per_seq: bool = False
    rollout_per_seq: bool = False

    @property
    def temperature_args(self) -> tuple[float, torch.Tensor | None]:
        """(scalar, per-token tensor or None): the two temperature arguments of the sweep operators."""
        t = self.temperature
        return (1.0, t) if isinstance(t, torch.Tensor) else (float(t), None)



def _layout_of(completion_ids: torch.Tensor, cu_seqlens: torch.Tensor | None) -> tuple[Layout, torch.Tensor | None]:
    if not isinstance(completion_ids, torch.Tensor):
        raise TypeError(f"completion_ids must be a torch.Tensor, got {type(completion_ids).__name__}")
    if completion_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"completion_ids must be int32 or int64, got {completion_ids.dtype}")
    if cu_seqlens is None:
        if completion_ids.dim() != 2:
            raise ValueError(f"completion_ids must have shape (B, T) (or (N,) with cu_seqlens), "
                             f"got {tuple(completion_ids.shape)}")
        B, T = completion_ids.shape
        return Layout(B, B * T, seq_len=T), None
    if completion_ids.dim() != 1:
        raise ValueError(f"with cu_seqlens, completion_ids must be packed, shape (N,), got {tuple(completion_ids.shape)}")
    N = completion_ids.shape[0]
    offsets, invalid = _offsets(cu_seqlens, N, completion_ids.device)
    return Layout(cu_seqlens.shape[0] - 1, N, offsets=offsets), invalid


def rows_without_sequences(completion_ids, mask, temperature, cu_seqlens):
    """(ids, mask, temperature) for a log-prob pass, which needs no sequences: packed ids (N,) without
    cu_seqlens are read as one padded row (1, N), with their mask and per-token temperature."""
    if not (isinstance(completion_ids, torch.Tensor) and completion_ids.dim() == 1 and cu_seqlens is None):
        return completion_ids, mask, temperature
    return (completion_ids.unsqueeze(0), None if mask is None else mask.unsqueeze(0),
            temperature.unsqueeze(0) if isinstance(temperature, torch.Tensor) else temperature)


def logprobs_result(tokens: Tokens, logprobs: torch.Tensor, entropy: torch.Tensor, shape, return_entropy: bool):
    """A log-prob pass's outputs shaped like its ids: NaN log-probs where a value check failed on the
    device, and the entropy too with return_entropy."""
    if tokens.invalid is not None:
        logprobs = torch.where(tokens.invalid, float("nan"), logprobs)
    logprobs, entropy = logprobs.view(shape), entropy.view(shape)
    return (logprobs, entropy) if return_entropy else logprobs


def leading_dims_by_stride(rows: torch.Tensor) -> list[tuple[int, int]]:
    """(stride, size) of each leading dimension of rows (all but the last) of size > 1, smallest
    stride first. An insertion sort of plain comparisons: torch.compile cannot sort symbolic keys."""
    dims: list[tuple[int, int]] = []
    for i in range(rows.dim() - 1):
        if rows.shape[i] > 1:
            at = len(dims)
            while at > 0 and rows.stride(i) < dims[at - 1][0]:
                at -= 1
            dims.insert(at, (rows.stride(i), rows.shape[i]))
    return dims


def check_rows(name: str, t: torch.Tensor, layout: Layout, last: str, full_output: bool = False) -> int:
    """t must hold one row per token: (B, T, X) or (N, X) (padded), (N, X) or (1, N, X) (packed); returns X.
    With full_output, a padded (B, L, X) with L > T is the model's whole output (Layout.scored_rows)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    N = layout.num_rows
    allowed = ((N,), (1, N)) if layout.packed else ((N,), (layout.num_seqs, layout.seq_len))
    if full_output and not layout.packed and t.dim() == 3 and sizes_match(tuple(t.shape[:1]), ((layout.num_seqs,),)) \
            and t.shape[1] > layout.seq_len:
        allowed = ((layout.num_seqs, t.shape[1]),)
    if t.dim() not in (2, 3) or not sizes_match(tuple(t.shape[:-1]), allowed):
        # (The message is formatted only here: formatting sizes would specialise them under torch.compile.)
        if layout.packed:
            want = f"(N, {last}) or (1, N, {last}) with N = {N}"
        else:
            want = f"(B, T, {last}) = ({layout.num_seqs}, {layout.seq_len}, {last}) or (N, {last}) with N = {N}"
            if full_output:
                want += f", or the full output (B, L, {last}) with L > T"
        raise ValueError(f"{name} must have shape {want} to match completion_ids, got {tuple(t.shape)}")
    if t.shape[-1] < 1:
        raise ValueError(f"{name} must have a last dimension {last} of at least 1")
    return t.shape[-1]


def check_logits(logits: torch.Tensor, layout: Layout) -> int:
    """logits rows against the layout; returns V (this shard's width under tensor parallelism)."""
    V = check_rows("logits", logits, layout, "V", full_output=True)
    if logits.dtype not in LOGITS_DTYPES:
        raise TypeError(f"logits must be float32, bfloat16 or float16, got {logits.dtype}")
    if logits.stride(-1) != 1 and V > 1:
        raise ValueError("logits must be contiguous in the vocabulary dimension (stride(-1) == 1); "
                         "leading dimensions may have any strides")
    return V


def rows_overlap(rows: torch.Tensor) -> bool:
    """Whether two rows of a (B, T, V) view share memory (expanded or overlapping strides)."""
    extent = rows.shape[-1]
    for stride, size in leading_dims_by_stride(rows):
        if stride < extent:
            return True
        extent += stride * (size - 1)
    return False


def check_inplace(rows: torch.Tensor) -> None:
    """inplace_backward writes the gradient into the logits: their rows must not share memory."""
    if rows_overlap(rows):
        raise ValueError("inplace_backward=True needs logits whose rows do not overlap in memory (these are "
                         "expanded or have overlapping strides): writing the gradient into them would mix rows. "
                         "Pass a materialised tensor or inplace_backward=False.")


def check_ids(ids: torch.Tensor, V: int) -> None:
    # Through the module attribute, so a tool that wraps the check (the traffic meter) sees it.
    option_checks.check_ids_range(ids, V)


def _per_token(name: str, t: torch.Tensor | None, layout: Layout, device: torch.device, *, per_seq: bool = False,
               floating: bool = True) -> torch.Tensor | None:
    """A per-token (or, with per_seq, per-sequence) argument checked and made flat;
    returns (flat tensor, whether it is per sequence).

    (S, 1) is always per sequence. A 1-D tensor of N values is per token, also when S == N
    on the packed layout (pass (S, 1) there for per-sequence values)."""
    if t is None:
        return None, False
    shapes = [layout.shape]
    S = layout.num_seqs
    if per_seq:
        shapes += [(S,), (S, 1)]
    check_tensor(name, t, tuple(shapes), device, floating=floating)
    seq = per_seq and has_shape(t, ((S,), (S, 1))) and not has_shape(t, (layout.shape, (layout.num_rows,)))
    return t.reshape(-1), seq


def build_tokens(
    completion_ids: torch.Tensor,
    advantages: torch.Tensor | None,
    completion_mask: torch.Tensor | None,
    old_logprobs: torch.Tensor | None,
    ref_logprobs: torch.Tensor | None,
    rollout_is_ratio: torch.Tensor | None,
    sampling_logprobs: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    options: GRPOOptions,
    *,
    logits: torch.Tensor | None = None,
    vocab_size: int | None = None,
    needs_advantages: bool = True,
) -> Tokens:
    """Check every per-token argument against the layout that completion_ids and cu_seqlens
    define, and flatten them once. With `logits` given, they are checked against the layout
    too; `vocab_size` is the global vocabulary the ids must lie in (default: the logits'
    last dimension; None without logits: not checked)."""
    layout, invalid = _layout_of(completion_ids, cu_seqlens)
    device = completion_ids.device
    if logits is not None:
        V = check_logits(logits, layout)
        if logits.device != device:
            raise ValueError(f"completion_ids is on {device} but logits are on {logits.device}")
        vocab_size = V if vocab_size is None else vocab_size
    o = options
    if needs_advantages and advantages is None:
        raise ValueError("advantages is required, shape (B,) or (B, T) (packed: (S,) or (N,))")
    adv, adv_per_seq = _per_token("advantages", advantages, layout, device, per_seq=True)
    mask, _ = _per_token("completion_mask", completion_mask, layout, device, floating=False)
    old, _ = _per_token("old_logprobs", old_logprobs, layout, device)
    ref, _ = _per_token("ref_logprobs", ref_logprobs, layout, device)
    sampling, _ = _per_token("sampling_logprobs", sampling_logprobs, layout, device)
    rollout, rollout_per_seq = _per_token("rollout_is_ratio", rollout_is_ratio, layout, device, per_seq=True)
    if o.beta != 0.0 and ref is None:
        raise ValueError("ref_logprobs (B, T) is required when beta != 0")
    if o.loss_type == "vespo" and rollout is not None and rollout.numel() != layout.num_rows:
        raise ValueError("rollout_is_ratio must be per token with loss_type='vespo'")
    if o.loss_type == "dr_grpo" and layout.packed and o.max_completion_length is None:
        raise ValueError("loss_type='dr_grpo' on packed rows needs max_completion_length (the padded length T "
                         "it normalises by)")

    ids = completion_ids.reshape(-1).contiguous()  # one int per row, as the kernels read them
    if vocab_size is not None:
        check_ids(ids, vocab_size)

    temperature = o.temperature
    if isinstance(temperature, torch.Tensor):
        check_tensor("temperature", temperature, (layout.shape,), device)
        temperature = temperature.detach().reshape(-1).float().contiguous()
        bad = ~(torch.isfinite(temperature) & (temperature > 0)).all()
        invalid = _flag(bad, "temperature must be finite and > 0 in every entry", invalid)
        # The sweeps also give NaN for a non-positive or non-finite per-token temperature.

    detach = lambda t: None if t is None else t.detach()  # noqa: E731
    active = None if mask is None else mask != 0
    adv, rollout = detach(adv), detach(rollout)
    return Tokens(layout, ids, mask, active, adv, detach(old), detach(ref), rollout, detach(sampling), temperature,
                  invalid, adv_per_seq, rollout_per_seq)
