"""The CUDA C++ sweep (csrc/, grpo_kernels.cuda): how it reports itself where it cannot run,
and, on a GPU, its forward and backward against float64 PyTorch.

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
from grpo_kernels import cuda, reference

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


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

    logits, ids = torch.randn(2, 3, 5), torch.zeros(2, 3, dtype=torch.long)
    message = re.escape(f"backend='cuda' is not available: {reason}")
    with pytest.raises(RuntimeError, match=message):
        cuda.forward(logits, ids, 1.0)
    with pytest.raises(RuntimeError, match=message):
        cuda.backward(logits, ids, 1.0, torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3), None,
                      torch.empty_like(logits))
    # Through the public entry points, which dispatch backend="cuda" here.
    with pytest.raises(RuntimeError, match="backend='cuda'"):
        grpo_kernels.token_logprobs(logits, ids, backend="cuda")
    with pytest.raises(RuntimeError, match="backend='cuda'"):
        grpo_kernels.fused_grpo_loss(logits, ids, torch.randn(2), backend="cuda")


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


# --- On a GPU: the sweep against float64 PyTorch -----------------------------------------------


@pytest.fixture(scope="module")
def device():
    """The CUDA device, once the backend is built; skips with the backend's reason otherwise."""
    if not cuda.is_available():
        pytest.skip(f"backend='cuda' is not available: {cuda.unavailable_reason()}")
    return torch.device("cuda")


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


def reference_sweep(logits, ids, temperature, grad_logprobs, grad_entropy):
    """Float64 logprobs, entropy and dL/dlogits of L = sum(gl * logprobs + ge * entropy)."""
    x = logits.detach().double().requires_grad_()
    logprobs, entropy = reference.token_logprobs(x, ids, temperature)
    loss = (0.0 if grad_logprobs is None else (grad_logprobs.double() * logprobs).sum())
    if grad_entropy is not None:
        loss = loss + (grad_entropy.double() * entropy).sum()
    (grad,) = torch.autograd.grad(loss, x)
    return logprobs.detach(), entropy.detach(), grad


def check_forward(logits, ids, temperature, out):
    logprobs, entropy, lse, mean_z = out
    want_l, want_h = reference.token_logprobs(logits.double(), ids, temperature)
    z = logits.double() / temperature
    want_lse = torch.logsumexp(z, -1)
    # fp32 math on the same rounded inputs: the error is absolute, in units of the largest |z|.
    atol = 4e-6 * (1 + float(z.abs().max()))
    for got, want in ((logprobs, want_l), (entropy, want_h), (lse, want_lse), (mean_z, want_lse - want_h)):
        assert got.dtype == torch.float32 and got.shape == ids.shape
        assert (got.double() - want).abs().max().item() <= atol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("V", [1, 2, 7, 100, 4097, 32_001])  # none a multiple of a pack or block
@pytest.mark.parametrize("layout", ["contiguous", "sliced", "shifted"])
def test_sweep_matches_float64(device, dtype, V, layout):
    B, T = 3, 5
    for seed, (temperature, entropy_grad) in enumerate([(1.0, False), (0.7, True), (1.3, True)]):
        logits = make_logits(B, T, V, dtype, device, seed, layout)
        g = torch.Generator(device=device).manual_seed(seed + 100)
        ids = torch.randint(0, V, (B, T), generator=g, device=device)
        gl = torch.randn(B, T, generator=g, device=device)
        ge = torch.randn(B, T, generator=g, device=device) if entropy_grad else None

        out = cuda.forward(logits, ids, temperature)
        check_forward(logits, ids, temperature, out)

        _, _, want_grad = reference_sweep(logits, ids, temperature, gl, ge)
        grad = torch.full(logits.shape, float("nan"), dtype=dtype, device=device)  # poison: all must be written
        _, _, lse, mean_z = out
        cuda.backward(logits, ids, temperature, lse, mean_z, gl, ge, grad)
        assert torch.isfinite(grad).all()
        assert rel_err(grad, want_grad) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "sliced", "shifted"])
def test_in_place_backward(device, dtype, layout):
    """grad_out aliasing the logits (inplace_backward): same values as a separate buffer."""
    B, T, V = 2, 4, 4099
    logits = make_logits(B, T, V, dtype, device, seed=1, layout=layout)
    ids = torch.randint(0, V, (B, T), device=device)
    gl, ge = torch.randn(B, T, device=device), torch.randn(B, T, device=device)
    _, _, lse, mean_z = cuda.forward(logits, ids, 0.9)
    separate = torch.empty(logits.shape, dtype=dtype, device=device)
    cuda.backward(logits, ids, 0.9, lse, mean_z, gl, ge, separate)
    cuda.backward(logits, ids, 0.9, lse, mean_z, gl, ge, logits)  # in place
    assert torch.equal(logits, separate)


def test_optional_upstream_gradients_and_their_layouts(device):
    """grad_logprobs may be None (entropy only); (B, T) inputs may be float64, expanded or int32 ids."""
    B, T, V = 2, 3, 257
    logits = make_logits(B, T, V, torch.float32, device, seed=5)
    ids = torch.randint(0, V, (B, T), device=device, dtype=torch.int32)
    ge = torch.randn(B, 1, device=device, dtype=torch.float64).expand(B, T)
    _, _, lse, mean_z = cuda.forward(logits, ids, 1.0)
    grad = torch.empty(logits.shape, device=device)
    cuda.backward(logits, ids, 1.0, lse, mean_z, None, ge, grad)
    _, _, want = reference_sweep(logits, ids.long(), 1.0, None, ge)
    assert rel_err(grad, want) < 1e-5


def test_many_rows(device):
    """N >= 65,536 rows: a 1-D grid over rows, not (B, T)."""
    B, T, V = 2, 40_000, 5
    logits = make_logits(B, T, V, torch.float32, device, seed=2)
    ids = torch.randint(0, V, (B, T), device=device)
    gl = torch.randn(B, T, device=device)
    out = cuda.forward(logits, ids, 1.0)
    check_forward(logits, ids, 1.0, out)
    grad = torch.empty(logits.shape, device=device)
    cuda.backward(logits, ids, 1.0, out[2], out[3], gl, None, grad)
    assert rel_err(grad, reference_sweep(logits, ids, 1.0, gl, None)[2]) < 1e-5


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
    ids = torch.randint(0, V, (B, T), device=device)
    gl = torch.randn(B, T, device=device)
    logprobs, entropy, lse, mean_z = cuda.forward(logits, ids, 1.0)
    grad = torch.empty(logits.shape, dtype=torch.bfloat16, device=device)
    cuda.backward(logits, ids, 1.0, lse, mean_z, gl, None, grad)
    tail = slice(T - 3, T)
    check_forward(logits[:, tail], ids[:, tail], 1.0, (logprobs[:, tail], entropy[:, tail], lse[:, tail],
                                                      mean_z[:, tail]))
    want = reference_sweep(logits[:, tail], ids[:, tail], 1.0, gl[:, tail], None)[2]
    assert rel_err(grad[:, tail], want) < 1e-2
    del full, grad


def test_empty_batch(device):
    for B, T in ((0, 4), (2, 0)):
        logits = torch.randn(B, T, 9, device=device)
        ids = torch.zeros(B, T, dtype=torch.long, device=device)
        out = cuda.forward(logits, ids, 1.0)
        assert all(o.shape == (B, T) for o in out)
        cuda.backward(logits, ids, 1.0, out[2], out[3], torch.ones(B, T, device=device), None,
                      torch.empty_like(logits))


@pytest.mark.parametrize("V", [1, 33, 5000])
def test_non_finite_rows_give_non_finite_outputs(device, V):
    """All -inf, NaN or +inf in a row: non-finite outputs for that row, finite elsewhere, no fault."""
    B, T = 1, 4
    logits = make_logits(B, T, V, torch.float32, device, seed=3, layout="contiguous")
    logits[0, 0] = float("-inf")
    logits[0, 1, V // 2] = float("nan")
    logits[0, 2, V // 3] = float("inf")
    ids = torch.zeros(B, T, dtype=torch.long, device=device)
    logprobs, entropy, lse, mean_z = cuda.forward(logits, ids, 1.0)
    assert not torch.isfinite(logprobs[0, :3]).any()
    assert torch.isfinite(logprobs[0, 3]) and torch.isfinite(entropy[0, 3])
    grad = torch.empty_like(logits)
    cuda.backward(logits, ids, 1.0, lse, mean_z, torch.ones(B, T, device=device), torch.ones(B, T, device=device),
                  grad)
    torch.cuda.synchronize()
    assert all(not torch.isfinite(grad[0, t]).all() for t in range(3))
    assert torch.isfinite(grad[0, 3]).all()


def test_negative_infinite_logits_are_a_vocabulary_mask(device):
    B, T, V = 2, 3, 40
    logits = make_logits(B, T, V, torch.float32, device, seed=4, layout="contiguous")
    logits[..., ::3] = float("-inf")
    ids = torch.ones(B, T, dtype=torch.long, device=device)
    logprobs, entropy, lse, mean_z = cuda.forward(logits, ids, 1.0)
    keep = torch.arange(V, device=device) % 3 != 0
    want_l, want_h = reference.token_logprobs(logits[..., keep].double(), torch.zeros_like(ids))
    assert torch.allclose(logprobs.double(), want_l, atol=1e-5)
    assert torch.allclose(entropy.double(), want_h, atol=1e-5)
    grad = torch.empty_like(logits)
    cuda.backward(logits, ids, 1.0, lse, mean_z, torch.randn(B, T, device=device), torch.randn(B, T, device=device),
                  grad)
    assert torch.isfinite(grad).all() and (grad[..., ::3] == 0).all()


def test_bitwise_deterministic(device):
    B, T, V = 4, 8, 50_000
    logits = make_logits(B, T, V, torch.bfloat16, device, seed=6)
    ids = torch.randint(0, V, (B, T), device=device)
    gl, ge = torch.randn(B, T, device=device), torch.randn(B, T, device=device)

    def run():
        out = cuda.forward(logits, ids, 0.8)
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=device)
        cuda.backward(logits, ids, 0.8, out[2], out[3], gl, ge, grad)
        return (*out, grad)

    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


def test_rejects_what_it_cannot_run(device):
    logits = torch.randn(2, 3, 8, device=device)
    ids = torch.zeros(2, 3, dtype=torch.long, device=device)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        cuda.forward(logits.double(), ids, 1.0)
    with pytest.raises(RuntimeError, match="stride"):
        cuda.forward(logits.transpose(0, 2), ids.new_zeros(8, 3), 1.0)
    _, _, lse, mean_z = cuda.forward(logits, ids, 1.0)
    with pytest.raises(RuntimeError, match="grad_out must have the logits' shape"):
        cuda.backward(logits, ids, 1.0, lse, mean_z, None, None, torch.empty(2, 3, 7, device=device))
    # A grad_out that overlaps the logits without being them would race: in place or apart.
    full = torch.randn(2, 3, 9, device=device)
    with pytest.raises(RuntimeError, match="not overlap"):
        cuda.backward(full[..., :8], ids, 1.0, lse, mean_z, torch.ones(2, 3, device=device), None, full[..., 1:])


def test_fused_loss_through_cuda_backend(device):
    """fused_grpo_loss(backend="cuda") against the float64 reference objective, value and gradient."""
    B, T, V = 3, 6, 1003
    logits = make_logits(B, T, V, torch.float32, device, seed=7)
    ids = torch.randint(0, V, (B, T), device=device)
    advantages = torch.randn(B, device=device)
    current, _ = reference.token_logprobs(logits.double(), ids)
    old = (current + 0.3 * torch.randn(B, T, device=device, dtype=torch.float64)).float()  # ratios in and out of the band
    ref = (current + 0.3 * torch.randn(B, T, device=device, dtype=torch.float64)).float()
    kwargs = dict(beta=0.04, entropy_coef=0.01, loss_type="dapo")

    x = logits.detach().clone().requires_grad_()
    loss, _ = grpo_kernels.fused_grpo_loss(x, ids, advantages, None, old, ref, backend="cuda", **kwargs)
    (grad,) = torch.autograd.grad(loss, x)

    x64 = logits.detach().double().requires_grad_()
    want, _ = reference.grpo_loss(x64, ids, advantages, None, old.double(), ref.double(), **kwargs)
    (want_grad,) = torch.autograd.grad(want, x64)
    assert abs(loss.item() - want.item()) <= 1e-5 * (1 + abs(want.item()))
    assert rel_err(grad, want_grad) < 1e-5
