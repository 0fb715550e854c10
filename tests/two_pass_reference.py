"""The two-pass loss contract (csrc/two_pass.h) in float64, from torch ops only, and the inputs and
checks its tests share.

Independent of every kernel: the tests of grpo_kernels.cuda.two_pass (tests/test_cuda_backend.py)
and the GPU probe (bench/gpu_csrc_probe.py, which loads this file by path) compare against it.
Only torch is imported, so the probe can load it on a machine where nothing else is set up.
"""
from __future__ import annotations

import torch

NUM_SUMS = 7


def _d_min(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """d min(a, b) / da as torch.minimum's backward: 1 where a < b, 1/2 at a tie."""
    return torch.where(a < b, 1.0, torch.where(a == b, 0.5, 0.0)).to(a.dtype)


def two_pass_reference(logits, row_start, T, ids, inv_temperature, temperature_rows, active, w, mask, advantages,
                       old_logprobs, ref_logprobs, rollout, scalars, *, beta, eps_low, eps_high, delta=None,
                       dual_clip=None, kl_estimator=3, kl_ratio_weight=False, has_entropy_grad=False):
    """-> (grad (B, L, V), logprobs (N,), entropy (N,), sums (7, N)), all float64, N = B * T.

    Row r = b * T + t is logits[b, row_start + t]. Inactive rows give zeros everywhere (their
    inputs, NaN or not, are not looked at); rows outside the window get a zero gradient. A
    non-finite per-token input, or a non-finite logprob or entropy, on an active row makes its
    sums and its gradient row NaN."""
    B, L, V = logits.shape
    N = B * T
    dev = logits.device
    f64 = torch.float64
    act = torch.ones(N, dtype=torch.bool, device=dev) if active is None else active.reshape(N).bool()
    x = logits[:, row_start:row_start + T].reshape(N, V).to(f64)
    if temperature_rows is not None:
        t = temperature_rows.reshape(N).to(f64)
        inv_t = torch.where((t > 0) & torch.isfinite(t), 1.0 / t, torch.nan)
    else:
        inv_t = torch.full((N,), float(inv_temperature), dtype=f64, device=dev)
    # Inactive rows are replaced by harmless values, then zeroed: nothing of them reaches the output.
    x = torch.where(act[:, None], x, 0.0)
    inv_t = torch.where(act, inv_t, 1.0)

    def tok(v, default):
        if v is None:
            return torch.full((N,), default, dtype=f64, device=dev)
        return torch.where(act, v.reshape(N).to(f64), default)

    z = x * inv_t[:, None]
    m = z.max(-1).values
    d = z - m[:, None]
    e = torch.exp(d)
    s = e.sum(-1)
    u = (e * torch.where(e > 0, d, 0.0)).sum(-1)  # a -inf logit adds 0
    log_s = torch.log(s)
    mean_rel = u / s
    H = log_s - mean_rel
    ids = torch.where(act, ids.reshape(N), 0)
    valid = (ids >= 0) & (ids < V)
    z_y = z.gather(1, ids.clamp(0, V - 1)[:, None])[:, 0]
    lp = torch.where(valid, (z_y - m) - log_s, torch.nan)

    A = tok(advantages, 0.0)
    wt = tok(w, 0.0)
    mt = tok(mask, 0.0)
    old = tok(old_logprobs, 0.0) if old_logprobs is not None else lp
    r = torch.exp(lp - old)
    ratio = r
    # The clipped surrogate (loss_triton._surrogate), torch's derivatives of min and clamp.
    uu, du = ratio, torch.ones_like(ratio)
    if delta is not None:
        uu = torch.minimum(ratio, torch.tensor(float(delta), dtype=f64, device=dev))
        du = (ratio <= delta).to(f64)
    # The clip bounds as the kernels form them, in fp32 (a ratio on the bound is then classified alike).
    lo = float(torch.tensor(1.0, dtype=torch.float32) - torch.tensor(eps_low, dtype=torch.float32))
    hi = float(torch.tensor(1.0, dtype=torch.float32) + torch.tensor(eps_high, dtype=torch.float32))
    c = ratio.clamp(lo, hi)
    dc = ((ratio >= lo) & (ratio <= hi)).to(f64)
    uA, cA = uu * A, c * A
    loss = -torch.minimum(uA, cA)
    dloss = -(_d_min(uA, cA) * A * du + _d_min(cA, uA) * A * dc)
    if dual_clip is not None:
        cap = -float(dual_clip) * A
        neg = A < 0
        dloss = dloss * torch.where(neg, _d_min(loss, cap), 1.0)
        loss = torch.where(neg, torch.minimum(loss, cap), loss)
    ro = tok(rollout, 1.0)
    loss = loss * ro
    dloss = dloss * ro
    dl = dloss * r
    kl = torch.zeros_like(lp)
    ref = tok(ref_logprobs, 0.0)
    if ref_logprobs is not None:
        dd = lp - ref
        if kl_estimator == 1:
            kl, dkl = dd, torch.ones_like(dd)
        elif kl_estimator == 2:
            kl, dkl = 0.5 * dd * dd, dd
        else:
            rho = torch.exp(-dd)
            kl, dkl = rho - 1.0 + dd, 1.0 - rho
        if kl_ratio_weight:
            dkl = r * (kl + dkl)
            kl = r * kl
        loss = loss + beta * kl
        dl = dl + beta * dkl
    sc = scalars.to(f64)
    coef_c = wt * dl * sc[0]
    coef_e = mt * sc[1] if has_entropy_grad else torch.zeros_like(lp)
    low = ((ratio < lo) & (A < 0)).to(f64)
    high = ((ratio > hi) & (A > 0)).to(f64)
    sums = torch.stack([wt * loss, mt, mt * kl, mt * H, mt * low, mt * high, mt * torch.maximum(low, high)])
    finite = torch.isfinite(lp) & torch.isfinite(H) & torch.isfinite(wt) & torch.isfinite(mt) & torch.isfinite(A) \
        & torch.isfinite(old) & torch.isfinite(ref) & torch.isfinite(ro)
    coef_c = torch.where(finite, coef_c, torch.nan)
    if has_entropy_grad:
        coef_e = torch.where(finite, coef_e, torch.nan)
    sums = torch.where(finite[None], sums, torch.nan)

    p = torch.exp(d - log_s[:, None])
    g = -coef_c[:, None] * p
    # The target's c (1 - p_y) as -c expm1(l), as the kernel writes it.
    g_y = -coef_c * torch.expm1(lp)
    g = g.scatter(1, ids.clamp(0, V - 1)[:, None], g_y[:, None])  # an invalid id: the row is NaN anyway
    if has_entropy_grad:
        ent = torch.where(p > 0, p * (mean_rel[:, None] - d), 0.0)
        g = g + coef_e[:, None] * ent
    g = g * inv_t[:, None]
    g = torch.where(act[:, None], g, 0.0)

    grad = torch.zeros(B, L, V, dtype=f64, device=dev)
    grad[:, row_start:row_start + T] = g.reshape(B, T, V)
    zero = torch.zeros((), dtype=f64, device=dev)
    lp = torch.where(act, lp, zero)
    H = torch.where(act, H, zero)
    sums = torch.where(act[None], sums, zero)
    return grad, lp, H, sums


# --- Inputs and checks shared by the tests of csrc/two_pass.cu (on a GPU, and its CPU emulation) --

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}  # relative error of the gradient


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return float((got - want).norm() / want.norm().clamp(min=1e-30))


OPTION_SETS = {
    # dapo with k3 KL: the common case.
    "dapo_k3": dict(old=True, ref=True, rollout=False, beta=0.04, eps_low=0.2, eps_high=0.28, kl_estimator=3),
    # Every option at once: delta, dual clip, rollout IS weights, k2 with the ratio weight, entropy bonus.
    "everything": dict(old=True, ref=True, rollout=True, beta=0.1, eps_low=0.2, eps_high=0.2, delta=1.5,
                       dual_clip=3.0, kl_estimator=2, kl_ratio_weight=True, has_entropy_grad=True),
    # On-policy (no old: ratio 1), k1, entropy bonus, no KL weight.
    "on_policy_k1": dict(old=False, ref=True, rollout=False, beta=0.02, eps_low=0.2, eps_high=0.28, kl_estimator=1,
                         has_entropy_grad=True),
    # No KL at all.
    "no_kl": dict(old=True, ref=False, rollout=False, beta=0.0, eps_low=0.1, eps_high=0.3, kl_estimator=3),
}


def make_two_pass_inputs(B, L, V, T, row_start, dtype, device, seed, options, *, temperature="scalar",
                         active_fraction=1.0, shifted=False):
    """Logits (B, L, V) (rows starting off a 16-byte boundary when `shifted`) and the per-token
    inputs of two_pass, as the keyword arguments of cuda.two_pass / two_pass_reference."""
    g = torch.Generator(device=device).manual_seed(seed)
    full = (torch.randn(B, L, V + int(shifted), generator=g, device=device) * 3.0).to(dtype)
    logits = full[..., int(shifted):]
    N = B * T
    ids = torch.randint(0, V, (N,), generator=g, device=device)
    temperature_rows = None
    inv_temperature = 1.0 / 0.7
    if temperature == "per_row":
        temperature_rows = 0.5 + torch.rand(N, generator=g, device=device)
    # The true log-probs, so old / ref put the ratio around 1 (some clipped, some not).
    t_rows = temperature_rows.double() if temperature_rows is not None else torch.full((N,), 0.7, device=device,
                                                                                       dtype=torch.float64)
    x = logits[:, row_start:row_start + T].reshape(N, V).double() / t_rows[:, None]
    lp = torch.log_softmax(x, -1).gather(1, ids[:, None])[:, 0].float()
    mask = (torch.rand(N, generator=g, device=device) < 0.85).float()
    active = None
    if active_fraction < 1.0:
        active = torch.rand(N, generator=g, device=device) < active_fraction
        active[0] = False
        mask = mask * active.float()
    n = max(float(mask.sum()), 1.0)
    kw = dict(
        logits=logits, row_start=row_start, T=T, ids=ids, inv_temperature=inv_temperature,
        temperature_rows=temperature_rows, active=active, w=mask / n, mask=mask,
        advantages=torch.randn(N, generator=g, device=device),
        old_logprobs=lp + 0.3 * torch.randn(N, generator=g, device=device) if options["old"] else None,
        ref_logprobs=lp + 0.2 * torch.randn(N, generator=g, device=device) if options["ref"] else None,
        rollout=0.5 + torch.rand(N, generator=g, device=device) if options["rollout"] else None,
        scalars=torch.tensor([1.0 * 1.7, -0.01 / n * 1.7], device=device),
    )
    kw.update({k: v for k, v in options.items() if k not in ("old", "ref", "rollout")})
    return kw


def check_two_pass(kw, got, want, dtype):
    """got = cuda.two_pass's (grad, logprobs, entropy, sums), want = the float64 contract's."""
    grad, lp, H, sums = got
    w_grad, w_lp, w_H, w_sums = want
    x = kw["logits"].double()
    finite = x[torch.isfinite(x)]
    t_min = 0.5 if kw["temperature_rows"] is not None else 0.7
    atol = 4e-6 * (1 + (float(finite.abs().max()) if finite.numel() else 0.0) / t_min)
    for name, a, b in (("logprobs", lp, w_lp), ("entropy", H, w_H), ("sums", sums, w_sums)):
        assert a.dtype == torch.float32 and a.shape == b.shape, name
        assert torch.equal(torch.isnan(a), torch.isnan(b)), name
        ok = ~torch.isnan(b)
        tol = atol if name != "sums" else atol * 10 * (1 + b[ok].abs())
        assert ((a.double()[ok] - b[ok]).abs() <= tol).all(), (name, float((a.double()[ok] - b[ok]).abs().max()))
    assert grad.dtype == dtype and grad.shape == kw["logits"].shape
    assert torch.equal(torch.isnan(grad), torch.isnan(w_grad))
    ok = ~torch.isnan(w_grad)
    assert rel_err(grad[ok], w_grad[ok]) < TOL[dtype]
    assert (grad[w_grad == 0] == 0).all()  # rows outside the window and inactive rows: exactly 0


def reference_two_pass(kw):
    kw = dict(kw)
    logits = kw.pop("logits")
    return two_pass_reference(logits, kw.pop("row_start"), kw.pop("T"), kw.pop("ids"), kw.pop("inv_temperature"),
                              kw.pop("temperature_rows"), kw.pop("active"), kw.pop("w"), kw.pop("mask"),
                              kw.pop("advantages"), kw.pop("old_logprobs"), kw.pop("ref_logprobs"), kw.pop("rollout"),
                              kw.pop("scalars"), **kw)


def nan_poisoned(logits):
    return torch.full(logits.shape, float("nan"), dtype=logits.dtype, device=logits.device)


def poison_inactive(kw, T: int) -> None:
    """Every input of the inactive rows made hostile (NaN logits and per-token inputs, an id far out of
    range, temperature 0): a kernel that reads any of them shows it."""
    inactive = ~kw["active"]
    r = inactive.nonzero()[:, 0]
    kw["logits"][r // T, 1 + r % T] = float("nan")
    kw["ids"][inactive] = -(10**15)
    kw["temperature_rows"][inactive] = 0.0
    for name in ("w", "mask", "advantages", "old_logprobs", "ref_logprobs", "rollout"):
        kw[name][inactive] = float("nan")
