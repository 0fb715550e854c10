"""The vocabulary sweep in chunked PyTorch: the CPU path and the fallback.

Same contract as sweep/triton.py (docs/design.md). Rows are processed in chunks of active
rows gathered by index, across sequences (a logits[:, :-1] view with short sequences
costs no more than a contiguous tensor). An inactive row is never read. Math runs in
float32, or float64 for float64 logits.

Memory: each sweep allocates two (k, V) chunk buffers in the compute dtype once and does all
of a chunk's math in place in them (rows of bf16/fp16 logits pass through the buffer not in
use at the time), so what it holds beyond its outputs is those buffers. A chunk is at most
CHUNK_ELEMENTS and at most 1 / MIN_CHUNKS of the rows, so they stay a few per cent of the
logits however small these are (issue 18; bench/cpu_memory.py measures it).
"""
from __future__ import annotations

import torch

from ..stats import compute_dtype, shift_of

# Most elements of one chunk of rows (4 MiB in fp32): big enough to amortise the op
# launches, small enough that a chunk's buffers stay near the CPU's cache.
CHUNK_ELEMENTS = 1 << 20
# Fewest elements of a chunk, and fewest chunks a sweep is cut into where that minimum
# allows. The two buffers (8 bytes an element) then hold at most 1 / MIN_CHUNKS of the rows,
# 1.6% of the bytes of fp32 logits and 3.1% of bf16 ones, or 1 MiB for a sweep of fewer than
# 16M elements, while a chunk keeps enough elements that its ~25 op launches stay cheap.
MIN_CHUNK_ELEMENTS = 1 << 17
MIN_CHUNKS = 128
# The backward's floor for log p: below where exp underflows to 0 in fp32 (-104) and fp64 (-746),
# so it changes no p > 0, and small enough in size that e (H + log p) cannot overflow, so a -inf
# logit (p = 0) gets 0 whatever dL/dentropy, not 0 * -inf (as the Triton sweep's where(p > 0)).
LOG_P_FLOOR = -1e4


def _active_rows(active: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor:
    """Indices of the rows to read. (On the CPU; a CUDA caller of this fallback pays one sync here.)"""
    if active is None:
        return torch.arange(n, device=device)
    return active.nonzero().squeeze(-1)


def chunk_rows(n: int, V: int) -> int:
    """Rows per chunk for a sweep over n rows of V columns (see CHUNK_ELEMENTS, MIN_CHUNKS)."""
    elements = min(CHUNK_ELEMENTS, max(MIN_CHUNK_ELEMENTS, -(-n * V // MIN_CHUNKS)))
    return max(1, min(n, elements // max(V, 1)))


def inv_temperature(temperature, dtype: torch.dtype, rows: torch.Tensor | None = None) -> torch.Tensor | float:
    """1 / temperature: a float, or (k, 1) for the given rows (all rows without `rows`), NaN where a
    per-token temperature is <= 0 or not finite."""
    if not isinstance(temperature, torch.Tensor):
        return 1.0 / temperature
    t = (temperature if rows is None else temperature[rows]).to(dtype)
    ok = torch.isfinite(t) & (t > 0)
    return torch.where(ok, 1.0 / t, float("nan")).unsqueeze(-1)


class _Rows:
    """The rows of (B, T, V) logits (or of their gradient) addressed by flat row index b * T + t,
    read into and written from chunk buffers without a temporary where the strides allow.

    Where x[b, t] is row b * step + t of one (R, V) strided view of x's storage (a batch
    stride that is a whole number of row strides: contiguous logits, logits[:, :-1], one
    sequence, one token per sequence), rows move with index_select(out=) and index_copy_.
    Otherwise (rows repeated along t) by advanced indexing, which makes one copy per chunk.
    """

    def __init__(self, x: torch.Tensor):
        B, T, V = x.shape
        sb, st, sv = x.stride()
        self.x, self.T = x, T
        if B * T == 0:
            self.matrix = None
            return
        if T == 1:
            step, st = 1, sb
        elif B == 1:
            step = T
        elif st > 0 and sb % st == 0:
            step = sb // st
        else:
            self.matrix = None
            return
        self.matrix, self.step = x.as_strided(((B - 1) * step + T, V), (st, sv)), step

    def index(self, rows: torch.Tensor) -> torch.Tensor:
        """The flat row indices `rows` as indices into self.matrix."""
        return rows if self.matrix is None or self.step == self.T else rows // self.T * self.step + rows % self.T

    def read(self, idx: torch.Tensor, out: torch.Tensor, stage: torch.Tensor | None) -> torch.Tensor:
        """Rows `idx` (from self.index) into `out` (k, V), through `stage` (k, V) in x's dtype
        where out's dtype differs. Returns out."""
        if self.matrix is None:
            return out.copy_(self.x[idx // self.T, idx % self.T])
        if stage is None:
            return torch.index_select(self.matrix, 0, idx, out=out)
        return out.copy_(torch.index_select(self.matrix, 0, idx, out=stage))

    def target(self, rows: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
        """The logits x[b, t, col] (k, 1) of flat rows `rows` and columns col (k, 1)."""
        return self.x[(rows // self.T).unsqueeze(-1), (rows % self.T).unsqueeze(-1), col]

    def write(self, idx: torch.Tensor, values: torch.Tensor, stage: torch.Tensor | None) -> None:
        """values (k, V) into rows `idx` (from self.index), through `stage` (k, V) in x's dtype
        where values' dtype differs."""
        if stage is not None:
            values = stage.copy_(values)
        if self.matrix is None:
            self.x[idx // self.T, idx % self.T] = values
        else:
            self.matrix.index_copy_(0, idx, values)

    def zero(self, idx: torch.Tensor) -> None:
        if self.matrix is None:
            self.x[idx // self.T, idx % self.T] = 0
        else:
            self.matrix.index_fill_(0, idx, 0)


def _buffers(k: int, V: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Two (k, V) chunk buffers in the compute dtype."""
    return tuple(torch.empty((k, V), dtype=dtype, device=device) for _ in range(2))


def _stage(buf: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """A (k, V) tensor in `dtype` over the first bytes of the chunk buffer buf (k, V), for moving
    rows of bf16/fp16 logits through buf while buf's values are not needed; None for fp32/fp64."""
    if dtype == buf.dtype:
        return None
    return buf.view(-1).view(torch.uint8)[:buf.numel() * dtype.itemsize].view(dtype).view(buf.shape)


def _chunks(n: int, step: int):
    """(start, stop) of each chunk of [0, n)."""
    for start in range(0, n, step):
        yield start, min(start + step, n)


def forward(logits, ids, temperature, active, vocab_start=0, partial=False):
    """The backend contract's forward (docs/design.md): five (N,) tensors, or four with partial."""
    B, T, V = logits.shape
    n = B * T
    dtype = compute_dtype(logits.dtype)
    device = logits.device
    rows = _active_rows(active, n, device)
    k = rows.numel()
    src = _Rows(logits)
    idx = src.index(rows)
    scale = temperature if isinstance(temperature, torch.Tensor) or temperature != 1.0 else None
    inv_t = None if scale is None else inv_temperature(temperature, dtype, rows)
    y = ids[rows] - vocab_start
    owned = (y >= 0) & (y < V)
    col = y.clamp(0, V - 1).unsqueeze(-1)
    # Per active row: the max, and relative to shift_of(max) the sum of exp, the sum of
    # exp * logit and the target logit.
    m, s, u, z_y_rel = (torch.empty(k, dtype=dtype, device=device) for _ in range(4))
    step = chunk_rows(k, V)
    z_buf, e_buf = _buffers(step, V, dtype, device) if k else (None, None)
    stage = None if not k else _stage(e_buf, logits.dtype)  # e_buf is free while a chunk is read
    lowest = torch.finfo(dtype).min
    for start, stop in _chunks(k, step):
        j = slice(start, stop)
        z = src.read(idx[j], z_buf[:stop - start], None if stage is None else stage[:stop - start])
        if scale is not None:
            z.mul_(inv_t if isinstance(inv_t, float) else inv_t[j])
        torch.amax(z, -1, out=m[j])
        z.sub_(shift_of(m[j]).unsqueeze(-1))
        torch.gather(z, -1, col[j], out=z_y_rel[j].unsqueeze(-1))
        e = torch.exp(z, out=e_buf[:stop - start])
        torch.sum(e, -1, out=s[j])
        # A -inf logit must add 0 to u, not 0 * -inf = NaN: the lowest finite value has e = 0 too.
        torch.sum(z.clamp_(min=lowest).mul_(e), -1, out=u[j])
    if partial:
        values = (m, s, u, torch.where(owned, z_y_rel + shift_of(m), 0.0))
    else:
        log_s = s.log()
        mean_rel = u / s
        values = (torch.where(owned, z_y_rel - log_s, float("nan")), log_s - mean_rel, m, log_s, mean_rel)
    if active is None:
        return tuple(values)
    return tuple(torch.zeros(n, dtype=dtype, device=device).index_copy_(0, rows, v) for v in values)


def backward(logits, ids, temperature, active, m, log_sum, mean_rel, grad_logprobs, grad_entropy, grad_out,
             vocab_start=0):
    """Writes dL/dlogits = (c (onehot - p) + e p (mean_rel - (z - m))) / temperature into grad_out.

    With log p = (z - m) - log s and H = log s - mean_rel, the entropy term is -e p (H + log p),
    so the row needs only log p and p: dz = c onehot - p (c + e (H + log p)).
    """
    B, T, V = logits.shape
    n = B * T
    dtype = compute_dtype(logits.dtype)
    device = logits.device
    rows = _active_rows(active, n, device)
    k = rows.numel()
    src, dst = _Rows(logits), _Rows(grad_out)
    if k < n:  # inactive rows: written as zeros, never read
        dst.zero(dst.index((~active).nonzero().squeeze(-1)))
    if k == 0:
        return
    src_idx, dst_idx = src.index(rows), dst.index(rows)
    scale = temperature if isinstance(temperature, torch.Tensor) or temperature != 1.0 else None
    inv_t = None if scale is None else inv_temperature(temperature, dtype, rows)

    def log_p(z: torch.Tensor, j: slice) -> torch.Tensor:
        """log p of logits z (k, V) or (k, 1) of rows j, in place (z is in the compute dtype)."""
        if scale is not None:
            z = z.mul_(inv_t if isinstance(inv_t, float) else inv_t[j])
        return z.sub_(m_r[j]).sub_(log_s[j])

    # Per active row, (k, 1): the shifts, -c and -e, the target's column, and the gradient at
    # the target (from its log p computed as in the chunk, so the values match bit for bit).
    m_r, log_s = m[rows].to(dtype).unsqueeze(-1), log_sum[rows].to(dtype).unsqueeze(-1)
    neg_c = (torch.zeros(k, 1, dtype=dtype, device=device) if grad_logprobs is None
             else grad_logprobs[rows].to(dtype).neg().unsqueeze(-1))
    y = ids[rows] - vocab_start
    owned = ((y >= 0) & (y < V)).unsqueeze(-1)
    col = y.clamp(0, V - 1).unsqueeze(-1)
    logp_y = log_p(src.target(rows, col).to(dtype), slice(None))
    # The target's c (1 - p_y) as -c expm1(log p_y): no cancellation for a confident token.
    target = neg_c * torch.expm1(logp_y)
    if grad_entropy is not None:  # -e p_y (H + log p_y), log p floored so that p = 0 gives 0 (LOG_P_FLOOR)
        H = (log_sum[rows] - mean_rel[rows]).to(dtype).unsqueeze(-1)
        neg_e = grad_entropy[rows].to(dtype).neg().unsqueeze(-1)
        target = target + neg_e * (logp_y.clamp(min=LOG_P_FLOOR) + H) * logp_y.exp()
    step = chunk_rows(k, V)
    logp_buf, p_buf = _buffers(step, V, dtype, device)
    # Staging for bf16/fp16 rows: p_buf is free while a chunk is read, logp_buf once p holds the gradient.
    stage_in, stage_out = _stage(p_buf, logits.dtype), _stage(logp_buf, grad_out.dtype)
    for start, stop in _chunks(k, step):
        j, w = slice(start, stop), stop - start
        logp = log_p(src.read(src_idx[j], logp_buf[:w], None if stage_in is None else stage_in[:w]), j)
        p = torch.exp(logp, out=p_buf[:w])
        if grad_entropy is None:
            grad = p.mul_(neg_c[j])
        else:  # -p (c + e (H + log p))
            grad = p.mul_(logp.clamp_(min=LOG_P_FLOOR).add_(H[j]).mul_(neg_e[j]).add_(neg_c[j]))
        grad.scatter_(-1, col[j], torch.where(owned[j], target[j], grad.gather(-1, col[j])))
        if scale is not None:
            grad.mul_(inv_t if isinstance(inv_t, float) else inv_t[j])
        dst.write(dst_idx[j], grad, None if stage_out is None else stage_out[:w])
