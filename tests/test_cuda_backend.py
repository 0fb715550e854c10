"""The CUDA C++ sweep (csrc/, grpo_kernels.sweep.cuda): how it reports itself where it cannot run,
and, on a GPU, its forward and backward (the backend sweep contract of docs/design.md)
against float64 PyTorch formulas written here.

Without a GPU only the first group runs; the second skips with the reason the backend gives
(CPU torch, no device, no nvcc, or the compiler's error). csrc/compile_check.sh is what
checks the sources compile on a machine without a GPU.
"""
from __future__ import annotations

import re
import sys

import pytest
import torch

import grpo_kernels
from grpo_kernels.sweep import cuda

# --- Where the backend cannot run ------------------------------------------------------------


@pytest.fixture
def fresh_load():
    """Forget the cached load result before and after a test that fakes the environment."""
    cuda._load.cache_clear()
    yield
    cuda._load.cache_clear()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour on a machine without a CUDA device")
def test_unavailable_without_cuda_says_why():
    assert cuda.is_available() is False
    reason = cuda.unavailable_reason()
    assert "CPU build" in reason or "no CUDA device" in reason, reason

    logits, ids = torch.randn(2, 3, 5), torch.zeros(6, dtype=torch.long)
    message = re.escape(f"backend='cuda' is not available: {reason}")
    with pytest.raises(RuntimeError, match=message):
        cuda.forward(logits, ids, 1.0, None)
    stats = torch.zeros(6), torch.zeros(6), torch.zeros(6)
    with pytest.raises(RuntimeError, match=message):
        cuda.backward(logits, ids, 1.0, None, *stats, torch.ones(6), None, torch.empty_like(logits))
    # Through the public entry points, which dispatch backend="cuda" here (padded (B, T) ids).
    with pytest.raises(RuntimeError, match="backend='cuda'"):
        grpo_kernels.token_logprobs(logits, ids.view(2, 3), backend="cuda")
    with pytest.raises(RuntimeError, match="backend='cuda'"):
        grpo_kernels.fused_grpo_loss(logits, ids.view(2, 3), torch.randn(2), backend="cuda")


def test_reason_cpu_build_of_torch(monkeypatch, fresh_load):
    monkeypatch.setattr(torch.version, "cuda", None)
    assert not cuda.is_available()
    assert "CPU build" in cuda.unavailable_reason()


def test_reason_no_device(monkeypatch, fresh_load):
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not cuda.is_available()
    assert "no CUDA device" in cuda.unavailable_reason()


def _pretend_cuda_without_prebuilt_module(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "grpo_kernels._C_sweep", None)  # importing it now fails


def test_reason_jit_disabled(monkeypatch, fresh_load):
    _pretend_cuda_without_prebuilt_module(monkeypatch)
    monkeypatch.setenv("GRPO_KERNELS_NO_JIT", "1")
    assert not cuda.is_available()
    reason = cuda.unavailable_reason()
    assert "grpo_kernels._C_sweep is not importable" in reason and "GRPO_KERNELS_NO_JIT=1" in reason
    with pytest.raises(RuntimeError, match="GRPO_KERNELS_NO_JIT"):
        cuda.require(torch.device("cuda"))


def test_reason_no_nvcc(monkeypatch, fresh_load):
    from torch.utils import cpp_extension

    _pretend_cuda_without_prebuilt_module(monkeypatch)
    monkeypatch.delenv("GRPO_KERNELS_NO_JIT", raising=False)
    monkeypatch.setattr(cuda.shutil, "which", lambda *args, **kwargs: None)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None)
    assert not cuda.is_available()
    assert "nvcc was not found" in cuda.unavailable_reason()


def test_require_rejects_cpu_tensors():
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        cuda.require(torch.device("cpu"))


def test_no_partial_sweep():
    """The vocab-parallel partial sweep is the Triton and torch backends' (tp_group); said
    before anything else, GPU or not."""
    logits, ids = torch.randn(2, 3, 5), torch.zeros(6, dtype=torch.long)
    with pytest.raises(NotImplementedError, match="no vocab-parallel"):
        cuda.forward(logits, ids, 1.0, None, vocab_start=5, partial=True)


# --- On a GPU: the sweep against float64 PyTorch -----------------------------------------------
#
# Contract (docs/design.md): logits (B, T, V) with row r = logits[r // T, r % T]; ids (N,)
# global ids, N = B * T; temperature a float or (N,) fp32; active (N,) bool or None;
# forward -> logprobs, entropy, m, log_sum, mean_rel, each (N,) fp32.


@pytest.fixture(scope="module")
def device():
    """The CUDA device, once the backend is built; skips with the backend's reason otherwise."""
    if not cuda.is_available():
        pytest.skip(f"backend='cuda' is not available: {cuda.unavailable_reason()}")
    return torch.device("cuda")


TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return float((got - want).norm() / want.norm().clamp(min=1e-30))


def make_logits(B, T, V, dtype, device, seed, layout="sliced", scale=3.0):
    """Logits (B, T, V) with stride 1 on V and the given layout of the leading dims:
    "contiguous"; "sliced", the logits[:, :-1] view a trainer passes; "shifted", a view whose
    rows start one element past a 16-byte boundary (odd row stride), so every row has a
    different alignment phase and the kernels' partial first and last packs are exercised."""
    g = torch.Generator(device=device).manual_seed(seed)
    extra_t, extra_v = {"contiguous": (0, 0), "sliced": (1, 0), "shifted": (0, 1)}[layout]
    full = torch.randn(B, T + extra_t, V + extra_v, generator=g, device=device, dtype=torch.float32) * scale
    full = full.to(dtype)
    return full[:, :T, extra_v:]


def rows(t: torch.Tensor) -> torch.Tensor:
    """(B, T, V) -> (N, V), row r = t[r // T, r % T] (a copy where a view is impossible)."""
    return t.reshape(-1, t.shape[-1])


def set_rows(t: torch.Tensor, which: torch.Tensor, value: float) -> None:
    """t[r // T, r % T] = value for the rows r in `which` (bool (N,)), through any view."""
    r = which.nonzero()[:, 0]
    t[r // t.shape[1], r % t.shape[1]] = value


def _per_row(temperature, n, device) -> torch.Tensor:
    if isinstance(temperature, torch.Tensor):
        return temperature.double()
    return torch.full((n,), float(temperature), dtype=torch.float64, device=device)


def reference_sweep(logits, ids, temperature, active=None, vocab_start=0, grad_logprobs=None,
                    grad_entropy=None):
    """The contract in float64: (logprobs, entropy, m, log_sum, mean_rel) (N,) each, and
    dL/dlogits (B, T, V) of L = sum(gl * lp + ge * H), where lp = (z_y - lse) with the z_y
    term only where this shard owns y (the backward's onehot); inactive rows give 0 and no
    gradient, whatever their logits, ids or temperature hold."""
    n, V = logits.shape[0] * logits.shape[1], logits.shape[2]
    act = torch.ones(n, dtype=torch.bool, device=logits.device) if active is None else active
    x = rows(logits.detach()).double().requires_grad_()
    t = torch.where(act, _per_row(temperature, n, logits.device), 1.0)
    z = torch.where(act[:, None], x / t[:, None], 0.0)
    logp = torch.log_softmax(z, dim=-1)
    p = logp.exp()
    m = z.max(-1).values
    log_sum = torch.logsumexp(z - m[:, None].detach(), -1)
    mean_rel = (p * torch.where(p > 0, z - m[:, None], 0.0)).sum(-1)
    entropy = -(p * torch.where(p > 0, logp, 0.0)).sum(-1)  # a -inf logit adds 0 (and no NaN gradient)
    col = ids - vocab_start
    inside = (col >= 0) & (col < V) & act
    z_y = z.gather(-1, col.clamp(0, V - 1)[:, None])[:, 0]
    lse = torch.logsumexp(z, -1)
    logprobs = torch.where(inside, z_y - lse, torch.nan)
    loss = (z * 0.0).sum()  # a graph even without upstream gradients (then dL/dlogits = 0)
    if grad_logprobs is not None:
        loss = loss + (grad_logprobs.double() * torch.where(act, torch.where(inside, z_y, 0.0) - lse, 0.0)).sum()
    if grad_entropy is not None:
        loss = loss + (grad_entropy.double() * torch.where(act, entropy, 0.0)).sum()
    (grad,) = torch.autograd.grad(loss, x)
    out = [torch.where(act, v, 0.0).detach() for v in (logprobs, entropy, m, log_sum, mean_rel)]
    return (*out, grad.reshape(logits.shape))


def check_forward(logits, ids, temperature, out, active=None, vocab_start=0):
    want = reference_sweep(logits, ids, temperature, active, vocab_start)[:5]
    act = torch.ones_like(ids, dtype=torch.bool) if active is None else active
    t = _per_row(temperature, ids.numel(), ids.device)[act]
    t_min = float(t.min()) if t.numel() else 1.0
    # fp32 math on the same rounded inputs: the error is absolute, in units of the largest |z|.
    x = rows(logits).double()[act]
    finite = x[torch.isfinite(x)]
    atol = 4e-6 * (1 + float(finite.abs().max() if finite.numel() else 0.0) / t_min)
    names = ("logprobs", "entropy", "m", "log_sum", "mean_rel")
    for name, got, w in zip(names, out, want):
        assert got.dtype == torch.float32 and got.shape == ids.shape, name
        assert torch.equal(torch.isnan(got), torch.isnan(w)), name
        ok = ~torch.isnan(w)
        assert (got.double()[ok] - w[ok]).abs().max().item() <= atol, name
    # Each its own allocation, not views of one buffer.
    assert len({o.untyped_storage().data_ptr() for o in out}) == 5
    return want


def run_backward(logits, ids, temperature, active, out, gl, ge, vocab_start=0, grad=None):
    """cuda.backward into a NaN-poisoned buffer (every element must be written)."""
    if grad is None:
        grad = torch.full(logits.shape, float("nan"), dtype=logits.dtype, device=logits.device)
    _, _, m, log_sum, mean_rel = out
    cuda.backward(logits, ids, temperature, active, m, log_sum, mean_rel, gl, ge, grad, vocab_start)
    return grad


def row_temperatures(n, device, seed):
    g = torch.Generator(device=device).manual_seed(seed)
    return 0.5 + torch.rand(n, generator=g, device=device)  # (N,) fp32 in [0.5, 1.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("V", [1, 2, 7, 100, 4097, 32_001])  # none a multiple of a pack or block
@pytest.mark.parametrize("layout", ["contiguous", "sliced", "shifted"])
def test_sweep_matches_float64(device, dtype, V, layout):
    B, T = 3, 5
    n = B * T
    cases = [(1.0, False, True), (0.7, True, True), ("per-row", True, True), (1.3, True, False)]
    for seed, (temperature, entropy_grad, logprob_grad) in enumerate(cases):
        logits = make_logits(B, T, V, dtype, device, seed, layout)
        g = torch.Generator(device=device).manual_seed(seed + 100)
        if temperature == "per-row":
            temperature = row_temperatures(n, device, seed)
        ids = torch.randint(0, V, (n,), generator=g, device=device)
        gl = torch.randn(n, generator=g, device=device) if logprob_grad else None
        ge = torch.randn(n, generator=g, device=device) if entropy_grad else None

        out = cuda.forward(logits, ids, temperature, None)
        check_forward(logits, ids, temperature, out)

        want_grad = reference_sweep(logits, ids, temperature, None, 0, gl, ge)[5]
        grad = run_backward(logits, ids, temperature, None, out, gl, ge)
        assert torch.isfinite(grad).all()
        assert rel_err(grad, want_grad) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "sliced", "shifted"])
@pytest.mark.parametrize("per_row_temperature", [False, True])
def test_inactive_rows_are_never_read(device, dtype, layout, per_row_temperature):
    """Inactive rows hold NaN logits, garbage ids and (per row) a zero temperature: their five
    outputs are exactly 0 and their gradient rows exactly 0 (grad_out poisoned with NaN first,
    and in place); active rows are unaffected."""
    B, T, V = 3, 7, 4099
    n = B * T
    logits = make_logits(B, T, V, dtype, device, seed=11, layout=layout)
    g = torch.Generator(device=device).manual_seed(12)
    ids = torch.randint(0, V, (n,), generator=g, device=device)
    active = torch.rand(n, generator=g, device=device) < 0.6
    active[0], active[-1] = False, True
    temperature = row_temperatures(n, device, 13) if per_row_temperature else 0.8
    set_rows(logits, ~active, float("nan"))
    ids[~active] = -(10**15)
    if per_row_temperature:
        temperature[~active] = 0.0
    gl, ge = torch.randn(n, generator=g, device=device), torch.randn(n, generator=g, device=device)

    out = cuda.forward(logits, ids, temperature, active)
    check_forward(logits, ids, temperature, out, active)
    for o in out:
        assert (o[~active] == 0).all()

    want_grad = reference_sweep(logits, ids, temperature, active, 0, gl, ge)[5]
    grad = run_backward(logits, ids, temperature, active, out, gl, ge)
    assert (rows(grad)[~active] == 0).all()
    assert torch.isfinite(rows(grad)[active]).all()
    assert rel_err(rows(grad)[active], rows(want_grad)[active]) < TOL[dtype]

    run_backward(logits, ids, temperature, active, out, gl, ge, grad=logits)  # in place
    assert torch.equal(logits, grad)

    # All rows inactive: all outputs 0, the whole gradient 0.
    none = torch.zeros(n, dtype=torch.bool, device=device)
    out = cuda.forward(logits, ids, temperature, none)
    assert all((o == 0).all() for o in out)
    assert (run_backward(logits, ids, temperature, none, out, gl, ge) == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_token_temperature(device, dtype):
    """One temperature per row: each row as if swept alone at its own temperature."""
    B, T, V = 2, 6, 5003
    n = B * T
    logits = make_logits(B, T, V, dtype, device, seed=21)
    ids = torch.randint(0, V, (n,), device=device)
    temperature = row_temperatures(n, device, 22)
    gl, ge = torch.randn(n, device=device), torch.randn(n, device=device)
    out = cuda.forward(logits, ids, temperature, None)
    check_forward(logits, ids, temperature, out)
    grad = run_backward(logits, ids, temperature, None, out, gl, ge)
    assert rel_err(grad, reference_sweep(logits, ids, temperature, None, 0, gl, ge)[5]) < TOL[dtype]
    # Row by row with the scalar temperature: the same numbers.
    for r in (0, 7, n - 1):
        b, t = divmod(r, T)
        one = cuda.forward(logits[b:b + 1, t:t + 1], ids[r:r + 1], float(temperature[r]), None)
        for a, o in zip(out, one):
            assert torch.allclose(a[r], o[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vocab_start(device, dtype):
    """A shard whose column 0 is global id vocab_start: ids inside map to column y - vocab_start,
    ids outside (below, above, far away) give a NaN logprob and no onehot; with the full row's
    statistics the shard's backward is that slice of the full row's gradient."""
    B, T, V, vocab_start, shard = 2, 8, 3001, 1000, 1201
    n = B * T
    full = make_logits(B, T, V, dtype, device, seed=31)
    logits = full[..., vocab_start:vocab_start + shard]
    g = torch.Generator(device=device).manual_seed(32)
    ids = torch.randint(vocab_start, vocab_start + shard, (n,), generator=g, device=device)
    ids[::4] = torch.randint(0, vocab_start, (len(ids[::4]),), generator=g, device=device)  # below
    ids[1::4] = vocab_start + shard  # just past the end
    ids[2::8] = -1
    ids[3::8] = 2**62
    inside = (ids >= vocab_start) & (ids < vocab_start + shard)
    assert inside.any() and (~inside).any()
    gl, ge = torch.randn(n, generator=g, device=device), torch.randn(n, generator=g, device=device)

    out = cuda.forward(logits, ids, 0.9, None, vocab_start=vocab_start)
    check_forward(logits, ids, 0.9, out, None, vocab_start)
    assert torch.isnan(out[0][~inside]).all() and torch.isfinite(out[0][inside]).all()
    assert all(torch.isfinite(o).all() for o in out[1:])
    grad = run_backward(logits, ids, 0.9, None, out, gl, ge, vocab_start)
    assert torch.isfinite(grad).all()
    assert rel_err(grad, reference_sweep(logits, ids, 0.9, None, vocab_start, gl, ge)[5]) < TOL[dtype]

    # Tensor parallelism's backward: the full row's m, log_sum, mean_rel, this shard's columns.
    whole = cuda.forward(full, ids, 0.9, None)
    want = run_backward(full, ids, 0.9, None, whole, gl, ge)[..., vocab_start:vocab_start + shard]
    got = run_backward(logits, ids, 0.9, None, whole, gl, ge, vocab_start)
    assert rel_err(got, want) < (1e-6 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("scale", [50.0, 200.0])
@pytest.mark.parametrize("V", [1000, 32_000])
def test_confident_tokens_keep_fp32_precision(device, scale, V):
    """Large logits (|z| ~ 10 * scale): logprobs and entropies at most twice as far from
    float64 as eager fp32 torch.log_softmax's, for ids = argmax (logprob ~ 0: (z_y - m) is
    exactly 0, so only log_sum's fp32 error is left, where z_y - lse with a rounded lse would
    lose eps * |lse| ~ 1e-4) and for random ids. Errors are relative to max(1, |value|), plus
    2^-24 (half an ulp of 1) for the kernel's approximate exp2."""
    T = 256
    g = torch.Generator(device=device).manual_seed(int(scale) + V)
    logits = torch.randn(1, T, V, generator=g, device=device) * scale + 10 * scale

    def err(got, want):
        return ((got.double() - want) / want.abs().clamp(min=1.0)).abs().max().item()

    want_logp = torch.log_softmax(logits[0].double(), -1)
    want_h = -(want_logp.exp() * want_logp).sum(-1)
    eager_logp = torch.log_softmax(logits[0], -1)
    eager_h = -(eager_logp.exp() * eager_logp).sum(-1)
    for ids in (logits[0].argmax(-1), torch.randint(0, V, (T,), generator=g, device=device)):
        logprobs, entropy, _, _, _ = cuda.forward(logits, ids, 1.0, None)
        want = want_logp.gather(-1, ids[:, None])[:, 0]
        eager = eager_logp.gather(-1, ids[:, None])[:, 0]
        assert err(logprobs, want) <= 2 * err(eager, want) + 2**-24, (err(logprobs, want), err(eager, want))
        assert err(entropy, want_h) <= 2 * err(eager_h, want_h) + 2**-24, (err(entropy, want_h), err(eager_h, want_h))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "sliced", "shifted"])
def test_in_place_backward(device, dtype, layout):
    """grad_out is the logits themselves (inplace_backward): same values as a separate buffer."""
    B, T, V = 2, 4, 4099
    n = B * T
    logits = make_logits(B, T, V, dtype, device, seed=1, layout=layout)
    ids = torch.randint(0, V, (n,), device=device)
    gl, ge = torch.randn(n, device=device), torch.randn(n, device=device)
    temperature = row_temperatures(n, device, 2)
    out = cuda.forward(logits, ids, temperature, None)
    separate = run_backward(logits, ids, temperature, None, out, gl, ge)
    run_backward(logits, ids, temperature, None, out, gl, ge, grad=logits)  # in place
    assert torch.equal(logits, separate)


def test_optional_upstream_gradients_and_their_layouts(device):
    """grad_logprobs may be None (entropy only), or both; per-row inputs may be float64,
    strided, or int32 ids: the binding converts them."""
    B, T, V = 2, 3, 257
    n = B * T
    logits = make_logits(B, T, V, torch.float32, device, seed=5)
    ids = torch.randint(0, V, (n,), device=device, dtype=torch.int32)
    ge = torch.randn(2 * n, device=device, dtype=torch.float64)[::2]
    out = cuda.forward(logits, ids, 1.0, None)
    grad = run_backward(logits, ids, 1.0, None, out, None, ge)
    assert rel_err(grad, reference_sweep(logits, ids.long(), 1.0, None, 0, None, ge)[5]) < 1e-5
    assert (run_backward(logits, ids, 1.0, None, out, None, None) == 0).all()


def test_many_rows(device):
    """N >= 65,536 rows: a 1-D grid over rows, not (B, T)."""
    B, T, V = 2, 40_000, 5
    n = B * T
    logits = make_logits(B, T, V, torch.float32, device, seed=2)
    ids = torch.randint(0, V, (n,), device=device)
    active = torch.rand(n, device=device) < 0.9
    gl = torch.randn(n, device=device)
    out = cuda.forward(logits, ids, 1.0, active)
    check_forward(logits, ids, 1.0, out, active)
    grad = run_backward(logits, ids, 1.0, active, out, gl, None)
    assert rel_err(grad, reference_sweep(logits, ids, 1.0, active, 0, gl, None)[5]) < 1e-5


def test_offsets_past_two_to_the_31_elements(device):
    """A logits[:, :-1] view of 16,385 x 151,936 bf16 (> 2^31 elements): rows at the far end
    read and write the right memory (int64 offsets)."""
    B, T, V = 1, 16_384, 151_936
    need = 2 * (B * (T + 1) * V) * 2 + (1 << 30)
    if torch.cuda.get_device_properties(device).total_memory < need:
        pytest.skip(f"needs {need / 2**30:.0f} GiB of GPU memory")
    full = torch.randn(B, T + 1, V, device=device, dtype=torch.bfloat16)
    logits = full[:, :-1]
    assert logits.numel() > 2**31
    ids = torch.randint(0, V, (T,), device=device)
    gl = torch.randn(T, device=device)
    out = cuda.forward(logits, ids, 1.0, None)
    grad = torch.empty(logits.shape, dtype=torch.bfloat16, device=device)
    run_backward(logits, ids, 1.0, None, out, gl, None, grad=grad)
    tail = slice(T - 3, T)
    check_forward(logits[:, tail], ids[tail], 1.0, tuple(o[tail].clone() for o in out))
    want = reference_sweep(logits[:, tail], ids[tail], 1.0, None, 0, gl[tail], None)[5]
    assert rel_err(grad[:, tail], want) < 1e-2
    del full, grad


def test_empty_batch(device):
    for B, T in ((0, 4), (2, 0)):
        logits = torch.randn(B, T, 9, device=device)
        ids = torch.zeros(B * T, dtype=torch.long, device=device)
        out = cuda.forward(logits, ids, 1.0, None)
        assert len(out) == 5 and all(o.shape == (B * T,) for o in out)
        run_backward(logits, ids, 1.0, None, out, torch.ones(B * T, device=device), None)


@pytest.mark.parametrize("V", [1, 33, 5000])
def test_non_finite_rows_give_non_finite_outputs(device, V):
    """All -inf, NaN or +inf in a row: non-finite outputs for that row, finite elsewhere, no
    fault; an id outside the vocabulary: a NaN logprob, the rest of the row valid."""
    B, T = 1, 5
    logits = make_logits(B, T, V, torch.float32, device, seed=3, layout="contiguous")
    logits[0, 0] = float("-inf")
    logits[0, 1, V // 2] = float("nan")
    logits[0, 2, V // 3] = float("inf")
    ids = torch.zeros(B * T, dtype=torch.long, device=device)
    ids[4] = V
    out = cuda.forward(logits, ids, 1.0, None)
    logprobs, entropy = out[:2]
    assert not torch.isfinite(logprobs[:3]).any() and not torch.isfinite(entropy[:3]).any()
    assert all(torch.isfinite(o[3]) for o in out)
    assert torch.isnan(logprobs[4]) and all(torch.isfinite(o[4]) for o in out[1:])
    ones = torch.ones(B * T, device=device)
    grad = run_backward(logits, ids, 1.0, None, out, ones, ones)
    torch.cuda.synchronize()
    assert all(not torch.isfinite(grad[0, t]).all() for t in range(3))
    assert torch.isfinite(grad[0, 3:]).all()


def test_negative_infinite_logits_are_a_vocabulary_mask(device):
    B, T, V = 2, 3, 40
    n = B * T
    logits = make_logits(B, T, V, torch.float32, device, seed=4, layout="contiguous")
    logits[..., ::3] = float("-inf")
    ids = torch.ones(n, dtype=torch.long, device=device)
    out = cuda.forward(logits, ids, 1.0, None)
    check_forward(logits, ids, 1.0, out)
    keep = torch.arange(V, device=device) % 3 != 0
    want = check_forward(logits[..., keep].contiguous(), torch.zeros_like(ids), 1.0, out)
    assert torch.isfinite(torch.stack(want)).all()
    gl, ge = torch.randn(n, device=device), torch.randn(n, device=device)
    grad = run_backward(logits, ids, 1.0, None, out, gl, ge)
    assert torch.isfinite(grad).all() and (grad[..., ::3] == 0).all()
    assert rel_err(grad, reference_sweep(logits, ids, 1.0, None, 0, gl, ge)[5]) < 1e-5


def test_bitwise_deterministic(device):
    B, T, V = 4, 8, 50_000
    n = B * T
    logits = make_logits(B, T, V, torch.bfloat16, device, seed=6)
    ids = torch.randint(0, V, (n,), device=device)
    gl, ge = torch.randn(n, device=device), torch.randn(n, device=device)
    active = torch.rand(n, device=device) < 0.7
    temperature = row_temperatures(n, device, 7)

    def run(temperature, active):
        out = cuda.forward(logits, ids, temperature, active)
        return (*out, run_backward(logits, ids, temperature, active, out, gl, ge))

    for args in ((0.8, None), (temperature, active)):
        for a, b in zip(run(*args), run(*args)):
            assert torch.equal(a, b)
    # An all-true mask is no mask.
    for a, b in zip(run(0.8, None), run(0.8, torch.ones(n, dtype=torch.bool, device=device))):
        assert torch.equal(a, b)


def test_rejects_what_it_cannot_run(device):
    logits = torch.randn(2, 3, 8, device=device)
    ids = torch.zeros(6, dtype=torch.long, device=device)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        cuda.forward(logits.double(), ids, 1.0, None)
    with pytest.raises(RuntimeError, match="stride"):
        cuda.forward(logits.transpose(0, 2), ids.new_zeros(24), 1.0, None)
    with pytest.raises(RuntimeError, match="ids must have shape"):
        cuda.forward(logits, ids[:5], 1.0, None)
    with pytest.raises(RuntimeError, match="vocab_start"):
        cuda.forward(logits, ids, 1.0, None, vocab_start=-1)
    with pytest.raises(RuntimeError, match="temperature must be finite"):
        cuda.forward(logits, ids, 0.0, None)
    with pytest.raises(NotImplementedError, match="partial"):
        cuda.forward(logits, ids, 1.0, None, partial=True)
    out = cuda.forward(logits, ids, 1.0, None)
    _, _, m, log_sum, mean_rel = out
    with pytest.raises(RuntimeError, match="grad_out must have the logits' shape"):
        cuda.backward(logits, ids, 1.0, None, m, log_sum, mean_rel, None, None, torch.empty(2, 3, 7, device=device))
    # A grad_out that overlaps the logits without being them would race: in place or apart.
    full = torch.randn(2, 3, 9, device=device)
    with pytest.raises(RuntimeError, match="not overlap"):
        cuda.backward(full[..., :8], ids, 1.0, None, m, log_sum, mean_rel, torch.ones(6, device=device), None,
                      full[..., 1:])


# --- The two-pass loss (csrc/two_pass.cu) against the float64 contract ---------------------------
#
# grpo_kernels.cuda.two_pass: logits (B, L, V), the rows [row_start, row_start + T) of each
# sequence scored; returns the gradient of the whole tensor and logprobs / entropy / sums. The
# float64 contract is tests/two_pass_reference.py (torch ops only, independent of the kernel).

from two_pass_reference import (OPTION_SETS, check_two_pass, make_two_pass_inputs, nan_poisoned,  # noqa: E402
                                poison_inactive, reference_two_pass)  # (tests/ is on sys.path)


def test_two_pass_unavailable_says_why():
    """Off a GPU (or where the kernel cannot hold the rows) the reason is a sentence, not a crash."""
    logits = torch.randn(2, 3, 5)
    reason = cuda.two_pass_unavailable_reason(logits)
    assert "CUDA tensors" in reason or "not available" in reason, reason


@pytest.fixture(scope="module")
def two_pass_device(device):
    """The device, once the two-pass kernel can run there at a small V; skips with its reason."""
    reason = cuda.two_pass_unavailable_reason(torch.empty(1, 1, 64, device=device))
    if reason:
        pytest.skip(reason)
    return device


def run_two_pass(kw, grad=None, cluster_size=0):
    kw = dict(kw)
    logits = kw.pop("logits")
    return cuda.two_pass(logits, kw.pop("row_start"), kw.pop("T"), kw.pop("ids"), kw.pop("inv_temperature"),
                         kw.pop("temperature_rows"), kw.pop("active"), kw.pop("w"), kw.pop("mask"),
                         kw.pop("advantages"), kw.pop("old_logprobs"), kw.pop("ref_logprobs"), kw.pop("rollout"),
                         kw.pop("scalars"), grad=grad, cluster_size=cluster_size, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("V", [7, 100, 4097, 32_001])
@pytest.mark.parametrize("options", list(OPTION_SETS))
def test_two_pass_matches_float64(two_pass_device, dtype, V, options):
    """The model's full output (B, T + 1, V), the first T positions scored (Liger's layout), and
    the last T (logits_to_keep), rows at every alignment; the gradient into a NaN-poisoned buffer."""
    B, T = 3, 5
    for seed, (L, row_start, shifted, temperature) in enumerate(
            [(T + 1, 0, False, "scalar"), (T + 2, 2, True, "per_row"), (T, 0, True, "scalar")]):
        kw = make_two_pass_inputs(B, L, V, T, row_start, dtype, two_pass_device, seed, OPTION_SETS[options],
                                  temperature=temperature, shifted=shifted)
        got = run_two_pass(kw, grad=nan_poisoned(kw["logits"]))
        check_two_pass(kw, got, reference_two_pass(kw), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("V", [151_936, 262_144])
def test_two_pass_long_rows(two_pass_device, dtype, V):
    """Vocabularies that need a thread-block cluster (sm_90): every cluster size the device
    allows gives the contract's numbers; where none can hold the row the plan says why."""
    kw = make_two_pass_inputs(2, 4, V, 3, 1, dtype, two_pass_device, 5, OPTION_SETS["everything"],
                              temperature="per_row", shifted=True)
    try:
        cuda.two_pass_plan(kw["logits"])
    except RuntimeError as error:
        assert "three-pass" in str(error)
        pytest.skip(str(error))
    want = reference_two_pass(kw)
    check_two_pass(kw, run_two_pass(kw, grad=nan_poisoned(kw["logits"])), want, dtype)
    for size in (1, 2, 4, 8, 16):
        try:
            cuda.two_pass_plan(kw["logits"], size)
        except RuntimeError:
            continue
        check_two_pass(kw, run_two_pass(kw, grad=nan_poisoned(kw["logits"]), cluster_size=size), want, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shifted", [False, True])
def test_two_pass_inactive_rows_are_never_read(two_pass_device, dtype, shifted):
    """Inactive rows hold NaN logits, garbage ids, zero temperatures and NaN per-token inputs:
    their outputs are exactly 0, their gradient rows 0, and the active rows are unaffected."""
    B, L, T, V = 3, 9, 7, 4099
    kw = make_two_pass_inputs(B, L, V, T, 1, dtype, two_pass_device, 21, OPTION_SETS["everything"],
                              temperature="per_row", active_fraction=0.6, shifted=shifted)
    clean = reference_two_pass(kw)
    poison_inactive(kw, T)
    inactive = ~kw["active"]
    got = run_two_pass(kw, grad=nan_poisoned(kw["logits"]))
    check_two_pass(kw, got, clean, dtype)
    for out in got[1:]:
        assert (out[..., inactive] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_two_pass_in_place(two_pass_device, dtype):
    """grad = logits: the same numbers as into a separate buffer, bitwise."""
    kw = make_two_pass_inputs(2, 6, 32_001, 5, 0, dtype, two_pass_device, 31, OPTION_SETS["dapo_k3"])
    apart = run_two_pass(kw, grad=nan_poisoned(kw["logits"]))
    logits = kw["logits"]
    inplace = run_two_pass(kw, grad=logits)
    assert inplace[0] is logits
    for a, b in zip(apart, inplace):
        assert torch.equal(a, b)


def test_two_pass_strided_output_view(two_pass_device):
    """logits and grad as strided views of larger buffers (both leading strides padded)."""
    dtype = torch.bfloat16
    kw = make_two_pass_inputs(3, 6, 1000, 4, 1, dtype, two_pass_device, 41, OPTION_SETS["on_policy_k1"])
    big = torch.randn(3, 9, 1003, device=two_pass_device).to(dtype)
    view = big[:, 2:8, 3:]
    view.copy_(kw["logits"])
    kw["logits"] = view
    grad_big = torch.full((4, 7, 1010), float("nan"), dtype=dtype, device=two_pass_device)
    grad = grad_big[1:, 1:, 5:1005]
    got = run_two_pass(kw, grad=grad)
    check_two_pass(kw, got, reference_two_pass(kw), dtype)
    assert torch.isnan(grad_big[0]).all() and torch.isnan(grad_big[:, 0]).all()  # nothing outside the view


def test_two_pass_non_finite_inputs_poison_their_row(two_pass_device):
    """A NaN or inf in one active row's per-token input makes its sums and gradient row NaN, never
    a finite number; the other rows are unaffected."""
    dtype = torch.float32
    base = make_two_pass_inputs(2, 5, 777, 4, 1, dtype, two_pass_device, 51, OPTION_SETS["everything"])
    for name, value in (("advantages", float("nan")), ("old_logprobs", float("inf")), ("w", float("nan")),
                        ("ref_logprobs", -float("inf")), ("rollout", float("nan")), ("mask", float("inf"))):
        kw = dict(base)
        kw[name] = base[name].clone()
        kw[name][3] = value
        got = run_two_pass(kw, grad=nan_poisoned(kw["logits"]))
        want = reference_two_pass(kw)
        check_two_pass(kw, got, want, dtype)
        assert torch.isnan(got[3][:, 3]).all(), name
        assert torch.isnan(got[0][0, 1 + 3]).all(), name  # row 3 = b 0, position 1 + 3
    kw = dict(base)
    kw["ids"] = base["ids"].clone()
    kw["ids"][2] = 777  # outside [0, V): NaN logprob, never an out-of-bounds read
    got = run_two_pass(kw, grad=nan_poisoned(kw["logits"]))
    assert torch.isnan(got[1][2])
    check_two_pass(kw, got, reference_two_pass(kw), dtype)


def test_two_pass_bitwise_deterministic(two_pass_device):
    kw = make_two_pass_inputs(4, 9, 151_936, 8, 1, torch.bfloat16, two_pass_device, 61, OPTION_SETS["dapo_k3"])
    reason = cuda.two_pass_unavailable_reason(kw["logits"])
    if reason:
        pytest.skip(reason)
    first = run_two_pass(kw)
    for _ in range(2):
        for a, b in zip(first, run_two_pass(kw)):
            assert torch.equal(a, b)


def test_two_pass_rejects_what_it_cannot_run(two_pass_device):
    kw = make_two_pass_inputs(2, 4, 50, 3, 1, torch.float32, two_pass_device, 71, OPTION_SETS["dapo_k3"])
    with pytest.raises(RuntimeError, match="within the"):
        run_two_pass(dict(kw, row_start=2))
    with pytest.raises(RuntimeError, match="kl_estimator"):
        run_two_pass(dict(kw, kl_estimator=4))
    with pytest.raises(RuntimeError, match="scalars"):
        run_two_pass(dict(kw, scalars=kw["scalars"].cpu()))
    with pytest.raises(RuntimeError, match="w must have"):
        run_two_pass(dict(kw, w=kw["w"][:-1]))
    with pytest.raises(RuntimeError, match="inv_temperature"):
        run_two_pass(dict(kw, inv_temperature=0.0))
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        run_two_pass(dict(kw, logits=kw["logits"].double()))
    full = torch.randn(2, 4, 52, device=two_pass_device)
    with pytest.raises(RuntimeError, match="not overlap"):
        run_two_pass(dict(kw, logits=full[..., :50]), grad=full[..., 2:])
