"""Vocab-parallel logits over torch.distributed (SPEC section 9), on this CPU.

Several processes (torch.multiprocessing spawn, gloo, a file:// rendezvous: nothing leaves
the machine) split the vocabulary of tiny problems (B=2, T=3, V=16) into unequal shards.
Every rank computes the single-process call on the concatenated logits itself and checks
that its vocab-parallel call gives the same loss, metrics and log-probs, and the gradient
of its own shard (fp32 1e-5 relative, float64 on the torch backend 1e-10), on the torch
backend and the Triton kernels under the interpreter.

Starting a process costs seconds (torch and triton imports), so each world size is spawned
once and runs every case; one pytest test per (world size, case) reports its outcome. A
case that raises where it should not stops that world's run (the ranks' collectives could
be out of step after it); the process group's timeout and the join's bound any hang.
"""
from __future__ import annotations

import os

if os.environ.get("GRPO_TEST_NATIVE") != "1":  # the spawned ranks import this module, not conftest
    os.environ["TRITON_INTERPRET"] = "1"

import contextlib  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import zlib  # noqa: E402
from datetime import timedelta  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import grpo_kernels  # noqa: E402
from grpo_kernels import distributed as tp  # noqa: E402

B, T, H = 2, 3, 8
N = B * T
WIDTHS = {2: (9, 7), 3: (7, 5, 4)}  # unequal shards of V = 16
JOIN_TIMEOUT_S = 300  # per world size; a normal run takes well under a minute
CASES: dict[str, object] = {}


def case(fn):
    CASES[fn.__name__] = fn
    return fn


# ----------------------------------------------------------------------------- helpers


class Ctx:
    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world
        self.group = dist.group.WORLD
        self.widths = WIDTHS[world]
        self.starts = [sum(self.widths[:r]) for r in range(world)]
        self.V = sum(self.widths)

    @property
    def cols(self) -> slice:
        return slice(self.starts[self.rank], self.starts[self.rank] + self.widths[self.rank])


def close(name: str, got, want, tol: float, scale: float = 0.0) -> None:
    """Relative: max |got - want| <= tol * max(max |want|, scale); None must meet None, NaN meet NaN."""
    if want is None or got is None:
        assert got is None and want is None, f"{name}: {got} vs {want}"
        return
    got, want = torch.as_tensor(got).detach().double(), torch.as_tensor(want).detach().double()
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} vs {tuple(want.shape)}"
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan), f"{name}: NaN at different places"
    got, want = got[~nan], want[~nan]
    if want.numel() == 0:
        return
    err = float((got - want).abs().max())
    ref = max(float(want.abs().max()), scale, 1e-30)
    assert err <= tol * ref, f"{name}: max error {err:.3g} > {tol:g} * {ref:.3g}"


def tol_of(dtype: torch.dtype) -> float:
    return 1e-10 if dtype == torch.float64 else 1e-5


def problem(seed: int, V: int, dtype=torch.float32, ids_in=None, packed: bool = False, nan_masked: bool = False):
    """Full logits (B, T, V) (packed: (N, V)) and per-token inputs; the same on every rank."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, T, V, generator=g) * 2).to(dtype)
    lo, hi = ids_in if ids_in is not None else (0, V)
    ids = torch.randint(lo, hi, (B, T), generator=g)
    mask = torch.ones(B, T)
    mask[0, 2] = 0
    mask[1, 0] = 0
    if nan_masked:
        logits[0, 2] = float("nan")
        logits[1, 0] = float("nan")
    logp = torch.log_softmax(logits.double().nan_to_num(), -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    old = (logp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).to(dtype)
    ref = (logp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).to(dtype)
    adv = torch.randn(B, generator=g, dtype=torch.float64).to(dtype)
    temp = (0.5 + torch.rand(B, T, generator=g)).to(dtype)
    if packed:
        return dict(logits=logits.reshape(N, V), ids=ids.reshape(N), mask=mask.reshape(N), old=old.reshape(N),
                    ref=ref.reshape(N), adv=adv, temp=temp.reshape(N),
                    cu_seqlens=torch.tensor([0, T, N], dtype=torch.int32))
    return dict(logits=logits, ids=ids, mask=mask, old=old, ref=ref, adv=adv, temp=temp, cu_seqlens=None)


def shard(x: torch.Tensor, cols: slice) -> torch.Tensor:
    return x[..., cols].clone().requires_grad_(True)


def loss_call(logits, p, opts, **tp_kw):
    o = dict(opts)
    if o.pop("per_token_temperature", False):
        o["temperature"] = p["temp"]
    use_mask = o.pop("use_mask", True)
    return grpo_kernels.fused_grpo_loss(logits, p["ids"], p["adv"], p["mask"] if use_mask else None, p["old"],
                                        p["ref"], cu_seqlens=p["cu_seqlens"], **o, **tp_kw)


def compare_loss(c: Ctx, p, opts, backend: str, *, vocab_start="explicit", tol=None):
    """The single-process call on p['logits'] against this rank's vocab-parallel call on its shard."""
    opts = dict(opts, backend=backend)
    dtype = p["logits"].dtype
    tol = tol or tol_of(dtype)
    full = p["logits"].clone().requires_grad_(True)
    loss_ref, met_ref = loss_call(full, p, opts)
    loss_ref.backward()
    grad_ref = full.grad[..., c.cols]

    x = shard(p["logits"], c.cols)
    start = c.starts[c.rank] if vocab_start == "explicit" else None
    loss, met = loss_call(x, p, opts, tp_group=c.group, vocab_start=start)
    loss.backward()
    close("loss", loss, loss_ref, tol)
    assert set(met) == set(met_ref), f"metric keys {sorted(met)} vs {sorted(met_ref)}"
    for k in met_ref:
        close(f"metrics[{k}]", met[k], met_ref[k], tol)
    close("grad", x.grad, grad_ref, tol)
    # Identical on every rank: the loss and metrics are the same numbers everywhere.
    vals = torch.stack([loss.detach().double()] + [met[k].detach().double().reshape(-1)[0] for k in sorted(met)
                                                    if met[k] is not None])
    gathered = [torch.empty_like(vals) for _ in range(c.world)]
    dist.all_gather(gathered, vals, group=c.group)
    for r, v in enumerate(gathered):
        assert torch.equal(v, vals), f"rank {r} returned a different loss or metrics"


# ----------------------------------------------------------------------------- cases
# Each takes (ctx, backend); cases that do not depend on the backend run once.

OPTION_SETS = {
    "dapo_mask": dict(loss_type="dapo"),
    "grpo_beta_entropy": dict(loss_type="grpo", beta=0.04, entropy_coef=0.01),
    "gspo_temperature": dict(loss_type="grpo", importance_sampling_level="sequence", per_token_temperature=True),
    "bnpo_beta_k1": dict(loss_type="bnpo", beta=0.1, kl_estimator="k1", use_mask=False),
    "cispo": dict(loss_type="cispo", epsilon_high=0.3),
    "sapo_entropy": dict(loss_type="sapo", entropy_coef=-0.02, temperature=0.7),
}


def _options_case(name, opts, packed):
    def run(c: Ctx, backend: str):
        seed = zlib.crc32(name.encode()) % 1000 + (7 if packed else 0)  # the same on every rank
        p = problem(seed, c.V, packed=packed, nan_masked=opts.get("use_mask", True))
        compare_loss(c, p, opts, backend)

    run.__name__ = f"{'packed' if packed else 'padded'}_{name}"
    case(run)


for _name, _opts in OPTION_SETS.items():
    _options_case(_name, _opts, packed=False)
for _name in ("dapo_mask", "gspo_temperature", "grpo_beta_entropy"):
    _options_case(_name, OPTION_SETS[_name], packed=True)


@case
def dr_grpo_packed(c: Ctx, backend):
    compare_loss(c, problem(3, c.V, packed=True), dict(loss_type="dr_grpo", max_completion_length=T), backend)


@case
def float64_torch(c: Ctx, backend):
    if backend != "torch":
        return "skip"
    p = problem(4, c.V, dtype=torch.float64)
    compare_loss(c, p, dict(loss_type="grpo", beta=0.04, entropy_coef=0.01), backend)
    compare_loss(c, problem(5, c.V, dtype=torch.float64, packed=True), dict(loss_type="dapo"), backend)


@case
def bfloat16_logits(c: Ctx, backend):
    # Statistics in fp32 from the same bf16 values: loss, metrics and log-probs to fp32 accuracy;
    # the bf16 gradient may round one element a unit (2^-8) differently.
    p = problem(24, c.V, dtype=torch.bfloat16)
    opts = dict(backend=backend, loss_type="grpo", beta=0.04, entropy_coef=0.01)
    full = p["logits"].clone().requires_grad_(True)
    loss_ref, met_ref = loss_call(full, p, opts)
    loss_ref.backward()
    x = shard(p["logits"], c.cols)
    loss, met = loss_call(x, p, opts, tp_group=c.group, vocab_start=c.starts[c.rank])
    loss.backward()
    close("loss", loss, loss_ref, 1e-5)
    for k in met_ref:
        close(f"metrics[{k}]", met[k], met_ref[k], 1e-5)
    assert x.grad.dtype == torch.bfloat16
    close("grad", x.grad, full.grad[..., c.cols], 2 ** -7)


@case
def equal_split_default_vocab_start(c: Ctx, backend):
    # vocab_start=None: rank * V_local, Megatron's equal split.
    V = 5 * c.world
    c2 = Ctx(c.rank, c.world)
    c2.widths, c2.starts, c2.V = (5,) * c.world, [5 * r for r in range(c.world)], V
    compare_loss(c2, problem(6, V), dict(loss_type="grpo", beta=0.04), backend, vocab_start=None)


@case
def ids_in_every_shard(c: Ctx, backend):
    p = problem(8, c.V)
    ids = torch.tensor([c.starts[i % c.world] + (i // c.world) % c.widths[i % c.world] for i in range(N)])
    p["ids"] = ids.view(B, T)
    assert {int(i) for i in p["ids"].reshape(-1)} and all(
        ((p["ids"] >= s) & (p["ids"] < s + w)).any() for s, w in zip(c.starts, c.widths))
    compare_loss(c, p, dict(loss_type="grpo", entropy_coef=0.01), backend)


@case
def shard_with_no_target(c: Ctx, backend):
    # Every target lies in rank 0's columns: the other shards own none.
    compare_loss(c, problem(9, c.V, ids_in=(0, c.widths[0])), dict(loss_type="dapo", beta=0.04), backend)
    # ... and every target in the last shard.
    compare_loss(c, problem(10, c.V, ids_in=(c.starts[-1], c.V)), dict(loss_type="dapo"), backend)


@case
def inplace_backward(c: Ctx, backend):
    p = problem(11, c.V)
    full = p["logits"].clone().requires_grad_(True)
    loss_ref, _ = loss_call(full, p, dict(backend=backend, entropy_coef=0.01))
    loss_ref.backward()
    x = p["logits"][..., c.cols].clone().requires_grad_(True)
    y = x * 1.0  # a non-leaf whose storage the backward may overwrite
    loss, _ = loss_call(y, p, dict(backend=backend, entropy_coef=0.01, inplace_backward=True), tp_group=c.group,
                        vocab_start=c.starts[c.rank])
    loss.backward()
    close("loss", loss, loss_ref, 1e-5)
    close("grad", x.grad, full.grad[..., c.cols], 1e-5)


@case
def megatron_padded_vocab(c: Ctx, backend):
    # Real V = 5 * world - 2; Megatron pads to 5 * world, the padding (on the last rank) holding -inf.
    Vp = 5 * c.world
    V = Vp - 2
    p = problem(12, V)
    padded = torch.cat([p["logits"], torch.full((B, T, 2), -float("inf"))], -1)
    cols = slice(5 * c.rank, 5 * c.rank + 5)
    full = p["logits"].clone().requires_grad_(True)
    opts = dict(backend=backend, loss_type="grpo", beta=0.04, entropy_coef=0.01)
    loss_ref, met_ref = loss_call(full, p, opts)
    loss_ref.backward()
    grad_ref = torch.cat([full.grad, torch.zeros(B, T, 2)], -1)[..., cols]
    x = shard(padded, cols)
    loss, met = loss_call(x, p, opts, tp_group=c.group)  # vocab_start=None: rank * 5
    loss.backward()
    close("loss", loss, loss_ref, 1e-5)
    for k in met_ref:
        close(f"metrics[{k}]", met[k], met_ref[k], 1e-5)
    close("grad", x.grad, grad_ref, 1e-5)
    if c.rank == c.world - 1:
        assert torch.equal(x.grad[..., -2:], torch.zeros(B, T, 2)), "padding columns got a gradient"
    # The padding excluded instead: the last rank passes only its real columns.
    widths = [5] * (c.world - 1) + [3]
    cols = slice(5 * c.rank, 5 * c.rank + widths[c.rank])
    x = shard(p["logits"], cols)
    loss, _ = loss_call(x, p, opts, tp_group=c.group, vocab_start=5 * c.rank)
    loss.backward()
    close("loss (excluded padding)", loss, loss_ref, 1e-5)
    close("grad (excluded padding)", x.grad, full.grad[..., cols], 1e-5)
    # A shard of padding only (every logit -inf): it contributes nothing and gets a zero gradient.
    real = [V // (c.world - 1) + (r < V % (c.world - 1)) for r in range(c.world - 1)]
    widths, starts = real + [3], [sum(real[:r]) for r in range(c.world)]
    x = (padded[..., starts[c.rank]:starts[c.rank] + widths[c.rank]] if c.rank < c.world - 1
         else torch.full((B, T, 3), -float("inf"))).clone().requires_grad_(True)
    loss, met = loss_call(x, p, opts, tp_group=c.group, vocab_start=starts[c.rank])
    loss.backward()
    close("loss (padding shard)", loss, loss_ref, 1e-5)
    close("metrics[entropy] (padding shard)", met["entropy"], met_ref["entropy"], 1e-5)
    mine = slice(starts[c.rank], starts[c.rank] + widths[c.rank])
    want = torch.zeros(B, T, 3) if c.rank == c.world - 1 else full.grad[..., mine]
    close("grad (padding shard)", x.grad, want, 1e-5, scale=1e-30)


@case
def token_logprobs_tp(c: Ctx, backend):
    for packed in (False, True):
        p = problem(13, c.V, packed=packed, nan_masked=True)
        kw = dict(mask=p["mask"], cu_seqlens=p["cu_seqlens"], backend=backend)
        full = p["logits"].clone().requires_grad_(True)
        lp_ref, ent_ref = grpo_kernels.token_logprobs(full, p["ids"], p["temp"], True, **kw)
        (lp_ref.sum() + 0.1 * ent_ref.sum()).backward()
        x = shard(p["logits"], c.cols)
        lp, ent = grpo_kernels.token_logprobs(x, p["ids"], p["temp"], True, **kw, tp_group=c.group,
                                              vocab_start=c.starts[c.rank])
        (lp.sum() + 0.1 * ent.sum()).backward()
        close("logprobs", lp, lp_ref, 1e-5)
        close("entropy", ent, ent_ref, 1e-5)
        close("grad", x.grad, full.grad[..., c.cols], 1e-5)
    # Under no_grad too (the old / reference pass), and without a mask.
    p = problem(14, c.V)
    with torch.no_grad():
        lp_ref = grpo_kernels.token_logprobs(p["logits"].reshape(N, c.V), p["ids"], backend=backend)
        lp = grpo_kernels.token_logprobs(p["logits"][..., c.cols], p["ids"], backend=backend, tp_group=c.group,
                                         vocab_start=c.starts[c.rank])
    close("no_grad logprobs", lp, lp_ref, 1e-5)


def _linear_problem(seed: int, V: int):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.5
    bias = torch.randn(V, generator=g) * 0.5
    return hidden, weight, bias


@case
def fused_linear(c: Ctx, backend):
    p = problem(15, c.V)
    hidden, weight, bias = _linear_problem(16, c.V)
    opts = dict(backend=backend, loss_type="grpo", beta=0.04, entropy_coef=0.01)
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    loss_ref, met_ref = grpo_kernels.fused_linear_grpo_loss(leaves[0], leaves[1], p["ids"], p["adv"], p["mask"],
                                                            p["old"], p["ref"], lm_head_bias=leaves[2], **opts)
    loss_ref.backward()
    for sp in (False, True):
        rows = slice(c.rank * N // c.world, (c.rank + 1) * N // c.world) if sp else slice(0, N)
        h = hidden[rows].clone().requires_grad_(True)
        w = weight[c.cols].clone().requires_grad_(True)
        b = bias[c.cols].clone().requires_grad_(True)
        loss, met = grpo_kernels.fused_linear_grpo_loss(h, w, p["ids"], p["adv"], p["mask"], p["old"], p["ref"],
                                                        lm_head_bias=b, tp_group=c.group, sequence_parallel=sp,
                                                        vocab_start=c.starts[c.rank], **opts)
        loss.backward()
        tag = "sequence_parallel " if sp else ""
        close(tag + "loss", loss, loss_ref, 1e-5)
        for k in met_ref:
            close(f"{tag}metrics[{k}]", met[k], met_ref[k], 1e-5)
        close(tag + "grad_hidden", h.grad, leaves[0].grad[rows], 1e-5)
        close(tag + "grad_weight", w.grad, leaves[1].grad[c.cols], 1e-5)
        close(tag + "grad_bias", b.grad, leaves[2].grad[c.cols], 1e-5)


@case
def linear_token_logprobs_tp(c: Ctx, backend):
    p = problem(17, c.V, packed=True)
    hidden, weight, bias = _linear_problem(18, c.V)
    lp_ref, ent_ref = grpo_kernels.linear_token_logprobs(hidden, weight, p["ids"], p["temp"], True, p["mask"],
                                                         p["cu_seqlens"], lm_head_bias=bias, backend=backend)
    lp, ent = grpo_kernels.linear_token_logprobs(hidden, weight[c.cols], p["ids"], p["temp"], True, p["mask"],
                                                 p["cu_seqlens"], lm_head_bias=bias[c.cols], backend=backend,
                                                 tp_group=c.group, vocab_start=c.starts[c.rank])
    close("logprobs", lp, lp_ref, 1e-5)
    close("entropy", ent, ent_ref, 1e-5)


def _counting():
    """Patch every torch.distributed collective to record (name, op); returns (log, undo)."""
    names = ["all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "reduce_scatter",
             "reduce_scatter_tensor", "reduce_scatter_single", "broadcast", "reduce", "all_to_all",
             "all_to_all_single", "barrier", "gather", "scatter", "all_gather_object", "broadcast_object_list"]
    log, saved, depth = [], {}, [0]
    for n in names:
        f = getattr(dist, n, None)
        if f is None:
            continue
        saved[n] = f

        def wrapped(*a, _f=f, _n=n, **k):
            if depth[0] == 0:  # an alias calling another collective counts once
                op = k.get("op", a[1] if _n == "all_reduce" and len(a) > 1 else None)
                log.append((_n, None if op is None else str(op).split(".")[-1]))
            depth[0] += 1
            try:
                return _f(*a, **k)
            finally:
                depth[0] -= 1

        setattr(dist, n, wrapped)

    def undo():
        for n, f in saved.items():
            setattr(dist, n, f)

    return log, undo


def _kinds(log):
    return sorted(f"{n}:{op}" if op else n for n, op in log)


@case
def collective_counts(c: Ctx, backend):
    """Per forward one bounds all-gather, one MAX and one SUM all-reduce; none in the logits backward."""
    p = problem(19, c.V)
    x = shard(p["logits"], c.cols)
    hidden, weight, bias = _linear_problem(20, c.V)
    counts = {}
    log, undo = _counting()
    try:
        loss, _ = loss_call(x, p, dict(backend=backend, beta=0.04, entropy_coef=0.01), tp_group=c.group,
                            vocab_start=c.starts[c.rank])
        counts["logits forward"], log[:] = _kinds(log), []
        loss.backward()
        counts["logits backward"], log[:] = _kinds(log), []
        with torch.no_grad():
            grpo_kernels.token_logprobs(x, p["ids"], backend=backend, tp_group=c.group, vocab_start=c.starts[c.rank])
        counts["token_logprobs"], log[:] = _kinds(log), []
        for sp in (False, True):
            rows = slice(c.rank * N // c.world, (c.rank + 1) * N // c.world) if sp else slice(0, N)
            h = hidden[rows].clone().requires_grad_(True)
            w = weight[c.cols].clone().requires_grad_(True)
            loss, _ = grpo_kernels.fused_linear_grpo_loss(h, w, p["ids"], p["adv"], p["mask"], p["old"], p["ref"],
                                                          tp_group=c.group, vocab_start=c.starts[c.rank],
                                                          sequence_parallel=sp, backend=backend)
            counts[f"linear{' sp' if sp else ''} forward"], log[:] = _kinds(log), []
            loss.backward()
            counts[f"linear{' sp' if sp else ''} backward"], log[:] = _kinds(log), []
    finally:
        undo()
    gather = "all_gather_single" if hasattr(dist, "all_gather_single") else "all_gather_into_tensor"
    scatter = "reduce_scatter_single" if hasattr(dist, "reduce_scatter_single") else "reduce_scatter_tensor"
    want = {
        "logits forward": sorted([gather, "all_reduce:MAX", "all_reduce:SUM"]),
        "logits backward": [],
        "token_logprobs": sorted([gather, "all_reduce:MAX", "all_reduce:SUM"]),
        "linear forward": sorted([gather, "all_reduce:MAX", "all_reduce:SUM"]),
        "linear backward": ["all_reduce:SUM"],
        "linear sp forward": sorted([gather, gather, "all_reduce:MAX", "all_reduce:SUM"]),
        "linear sp backward": [scatter + ":SUM"],
    }
    assert counts == want, f"collectives {counts} != {want}"
    return counts


def _raises_everywhere(c: Ctx, fn, match: str):
    try:
        fn()
    except ValueError as e:
        assert match in str(e), f"message {str(e)!r} lacks {match!r}"
    else:
        raise AssertionError(f"no ValueError ({match})")
    # Every rank raised; the group is still in step (this barrier would time out otherwise).
    dist.barrier(group=c.group)


@case
def bad_input(c: Ctx, backend):
    p = problem(21, c.V)
    x = shard(p["logits"], c.cols)
    opts = dict(backend=backend)
    gap = [s + (1 if r == c.world - 1 else 0) for r, s in enumerate(c.starts)]
    overlap = [s - (1 if r == c.world - 1 else 0) for r, s in enumerate(c.starts)]
    for starts, what in ((gap, "a gap"), (overlap, "an overlap")):
        _raises_everywhere(c, lambda: loss_call(x, p, opts, tp_group=c.group, vocab_start=starts[c.rank]), what)
        _raises_everywhere(c, lambda: grpo_kernels.token_logprobs(x, p["ids"], backend=backend, tp_group=c.group,
                                                                  vocab_start=starts[c.rank]), what)
    # Shards not starting at 0 (every rank shifted by one).
    _raises_everywhere(c, lambda: loss_call(x, p, opts, tp_group=c.group, vocab_start=c.starts[c.rank] + 1), "a gap")
    # One rank passes a negative vocab_start.
    _raises_everywhere(c, lambda: loss_call(x, p, opts, tp_group=c.group,
                                            vocab_start=-3 if c.rank == 1 else c.starts[c.rank]), "vocab_start must be")
    # Shards of different dtypes.
    if backend == "torch":
        xd = x.detach().double() if c.rank == 0 else x.detach()
        _raises_everywhere(c, lambda: loss_call(xd, p, opts, tp_group=c.group, vocab_start=c.starts[c.rank]),
                           "different dtypes")
    # Ids outside the global vocabulary (eager CPU check against the global V).
    bad = dict(p, ids=p["ids"].clone())
    bad["ids"][0, 0] = c.V
    _raises_everywhere(c, lambda: loss_call(x, bad, opts, tp_group=c.group, vocab_start=c.starts[c.rank]),
                       f"[0, {c.V})")
    # The fused-linear form: bounds, and sequence_parallel with the wrong number of rows.
    hidden, weight, bias = _linear_problem(22, c.V)
    _raises_everywhere(c, lambda: grpo_kernels.fused_linear_grpo_loss(
        hidden, weight[c.cols], p["ids"], p["adv"], tp_group=c.group, vocab_start=gap[c.rank], backend=backend),
        "a gap")
    _raises_everywhere(c, lambda: grpo_kernels.fused_linear_grpo_loss(
        hidden, weight[c.cols], p["ids"], p["adv"], tp_group=c.group, vocab_start=c.starts[c.rank],
        sequence_parallel=True, backend=backend), "sequence_parallel=True")


@case
def unowned_id_gives_nan(c: Ctx, backend):
    """Where the ids are not checked on the host (a GPU), an id no shard owns gives a NaN log-prob
    on every rank (the owner count summed with the statistics), never a silent finite value."""
    p = problem(23, c.V)
    ids = p["ids"].reshape(-1).clone()
    ids[1] = c.V
    ids[4] = -1
    rows = p["logits"][..., c.cols]
    lp, ent = tp.vocab_parallel_sweep(rows, ids, 1.0, None, None, c.starts[c.rank], backend, False, c.group)
    with torch.no_grad():
        lp_ref, ent_ref = grpo_kernels.token_logprobs(p["logits"].reshape(N, c.V),
                                                      p["ids"].reshape(-1).clamp(0, c.V - 1),
                                                      return_entropy=True, backend=backend)
    assert lp[1].isnan() and lp[4].isnan(), f"unowned ids gave {lp[1]}, {lp[4]}"
    keep = torch.ones(N, dtype=torch.bool)
    keep[[1, 4]] = False
    close("logprobs", lp[keep], lp_ref[keep], 1e-5)
    close("entropy", ent, ent_ref, 1e-5)


# ----------------------------------------------------------------------------- the ranks


def _worker(rank: int, world: int, init_file: str, out_dir: str, backends: list[str]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    c = Ctx(rank, world)
    results, stop = {}, False
    only = os.environ.get("GRPO_TP_CASES")  # comma-separated case names, for a quick local run
    cases = {k: v for k, v in CASES.items() if only is None or k in only.split(",")}
    for backend in backends:
        for name, fn in cases.items():
            key = f"{name}[{backend}]"
            if stop:
                results[key] = "not run: an earlier case raised"
                continue
            t0 = time.perf_counter()
            try:
                out = fn(c, backend)
                results[key] = "skip" if out == "skip" else "ok" + (f" {json.dumps(out)}" if out else "")
            except AssertionError as e:  # raised after the case's collectives: the ranks are in step
                results[key] = f"FAIL: {e}"
            except Exception:  # noqa: BLE001
                results[key] = "ERROR: " + traceback.format_exc(limit=6)
                stop = True
            results[key + ":seconds"] = round(time.perf_counter() - t0, 2)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    with contextlib.suppress(Exception):
        dist.destroy_process_group()


def _run_world(world: int, tmp) -> list[dict]:
    import torch.multiprocessing as mp

    init_file = str(tmp / "rendezvous")
    backends = ["torch", "triton"]
    procs = mp.spawn(_worker, args=(world, init_file, str(tmp), backends), nprocs=world, join=False)
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    try:
        while not procs.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the {world} ranks did not finish in {JOIN_TIMEOUT_S} s")
    finally:
        for proc in procs.processes:
            if proc.is_alive():
                proc.terminate()
    out = []
    for r in range(world):
        with open(tmp / f"rank{r}.json") as f:
            out.append(json.load(f))
    return out


_RESULTS: dict[int, object] = {}


def _results(world: int, tmp_path_factory) -> list[dict]:
    if world not in _RESULTS:
        try:
            _RESULTS[world] = _run_world(world, tmp_path_factory.mktemp(f"tp{world}"))
        except Exception as e:  # noqa: BLE001 - reported by every test of this world size
            _RESULTS[world] = e
    got = _RESULTS[world]
    if isinstance(got, Exception):
        pytest.fail(f"the {world}-rank run failed: {got!r}")
    return got


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("world", [2, 3])
def test_tensor_parallel(world, name, backend, tmp_path_factory):
    ranks = _results(world, tmp_path_factory)
    outcomes = {r: res.get(f"{name}[{backend}]", "missing") for r, res in enumerate(ranks)}
    if all(o == "skip" for o in outcomes.values()):
        pytest.skip("not for this backend")
    bad = {r: o for r, o in outcomes.items() if not o.startswith("ok")}
    assert not bad, "\n".join(f"rank {r}: {o}" for r, o in bad.items())
