"""The vocabulary sweep of each backend against float64 autograd through log_softmax.

The sweep's contract (docs/design.md): logits (B, T, V) -> logprobs, entropy (B, T); the
backward maps (dL/dlogprobs, dL/dentropy) to dL/dlogits. Checked on fresh random inputs,
with outputs poisoned beforehand so an element a kernel forgets to write shows up.
"""
from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import grpo_kernels
from grpo_kernels import reference
from grpo_kernels.sweep import backend_module
from grpo_kernels.sweep import pytorch as torch_path
from grpo_kernels.sweep import triton as triton_sweep
from helpers import fp32_grad_atol, rel_err

BACKENDS = ["torch", "triton"]
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def random_logits(B, T, V, dtype, seed, scale=3.0, sliced=True):
    """Logits (B, T, V) in `dtype`; with `sliced`, the logits[:, :-1] view a trainer passes."""
    g = torch.Generator().manual_seed(seed)
    full = (torch.randn(B, T + int(sliced), V, generator=g, dtype=torch.float64) * scale).to(dtype)
    return full[:, :-1] if sliced else full


def reference_sweep(logits, ids, temperature, grad_logprobs, grad_entropy):
    """Float64 outputs and dL/dlogits of L = sum(gl * logprobs + ge * entropy) by autograd."""
    x = logits.detach().double().requires_grad_()
    logprobs, entropy = reference.token_logprobs(x, ids, temperature)
    loss = (grad_logprobs.double() * logprobs).sum()
    if grad_entropy is not None:
        loss = loss + (grad_entropy.double() * entropy).sum()
    (grad,) = torch.autograd.grad(loss, x)
    return logprobs.detach(), entropy.detach(), grad


@pytest.mark.parametrize("backend", BACKENDS)
@given(
    B=st.integers(1, 3),
    T=st.integers(1, 5),
    V=st.sampled_from([1, 2, 7, 100, 4097]),  # 4097: more than one 4096-wide block, odd size
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    temperature=st.sampled_from([1.0, 0.7, 1.3]),
    entropy_grad=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
@settings(max_examples=15)
def test_sweep_matches_float64(backend, B, T, V, dtype, temperature, entropy_grad, seed):
    logits = random_logits(B, T, V, dtype, seed)
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, V, (B, T), generator=g)
    grad_logprobs = torch.randn(B, T, generator=g)
    grad_entropy = torch.randn(B, T, generator=g) if entropy_grad else None
    want_l, want_h, want_grad = reference_sweep(logits, ids, temperature, grad_logprobs, grad_entropy)

    sweep = backend_module(backend)
    logprobs, entropy, m, log_sum, mean_rel = sweep.forward(logits, ids.reshape(-1), temperature, None)
    logprobs, entropy = logprobs.view(B, T), entropy.view(B, T)
    # fp32 math on the same rounded inputs: z_y - lse cancels for a near-certain token, so the
    # error bound is absolute, in units of the largest scaled logit.
    atol = 4e-6 * (1 + float(logits.double().abs().max()) / temperature)
    assert (logprobs.double() - want_l).abs().max() <= atol
    assert (entropy.double() - want_h).abs().max() <= atol

    grad = torch.full(logits.shape, float("nan"), dtype=dtype)  # poison: every element must be written
    sweep.backward(logits, ids.reshape(-1), temperature, None, m, log_sum, mean_rel, grad_logprobs.reshape(-1),
                   None if grad_entropy is None else grad_entropy.reshape(-1), grad)
    assert torch.isfinite(grad).all()
    err = float((grad.double() - want_grad).norm())
    atol = fp32_grad_atol(logits, temperature, grad_logprobs, grad_entropy)
    assert err <= TOL[dtype] * float(want_grad.norm()) + atol, (rel_err(grad, want_grad), atol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_writes_into_logits_storage(backend):
    B, T, V = 2, 3, 50
    logits = random_logits(B, T, V, torch.float32, seed=3)
    ids = torch.randint(0, V, (B, T))
    advantages = torch.randn(B)
    reference_logits = logits.detach().clone().requires_grad_()
    loss_ref, _ = grpo_kernels.fused_grpo_loss(reference_logits, ids, advantages, backend=backend)
    (want,) = torch.autograd.grad(loss_ref, reference_logits)

    x = logits.detach().clone().requires_grad_()
    storage = x.data_ptr()
    loss, _ = grpo_kernels.fused_grpo_loss(x, ids, advantages, backend=backend, inplace_backward=True)
    (grad,) = torch.autograd.grad(loss, x)
    assert grad.data_ptr() == storage  # no N x V allocation for the gradient
    assert torch.equal(grad, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_flat_and_batched_logits_agree(backend):
    B, T, V = 2, 4, 33
    logits = random_logits(B, T, V, torch.float32, seed=5, sliced=False)
    ids = torch.randint(0, V, (B, T))
    advantages = torch.randn(B, T)
    x3 = logits.clone().requires_grad_()
    x2 = logits.reshape(B * T, V).clone().requires_grad_()
    loss3, _ = grpo_kernels.fused_grpo_loss(x3, ids, advantages, backend=backend)
    loss2, _ = grpo_kernels.fused_grpo_loss(x2, ids, advantages, backend=backend)
    (g3,) = torch.autograd.grad(loss3, x3)
    (g2,) = torch.autograd.grad(loss2, x2)
    assert torch.equal(loss3, loss2)
    assert torch.equal(g3.reshape(B * T, V), g2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bitwise_deterministic(backend):
    B, T, V = 3, 4, 300
    logits = random_logits(B, T, V, torch.bfloat16, seed=11)
    ids = torch.randint(0, V, (B, T))
    advantages = torch.randn(B)
    ref = torch.randn(B, T) - 4

    def run():
        x = logits.detach().clone().requires_grad_()
        loss, _ = grpo_kernels.fused_grpo_loss(x, ids, advantages, ref_logprobs=ref, beta=0.04,
                                               entropy_coef=0.01, backend=backend)
        return loss, torch.autograd.grad(loss, x)[0]

    (l1, g1), (l2, g2) = run(), run()
    assert torch.equal(l1, l2) and torch.equal(g1, g2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_negative_infinite_logits_are_masked_vocabulary(backend):
    """-inf logits (a vocabulary mask) have p = 0: finite logprob, entropy and gradient."""
    B, T, V = 2, 3, 40
    logits = random_logits(B, T, V, torch.float32, seed=2, sliced=False)
    logits[..., ::3] = float("-inf")
    logits[..., 0] = float("-inf")  # the first block starts with -inf
    ids = torch.full((B, T), 1)
    x = logits.clone().requires_grad_()
    loss, metrics = grpo_kernels.fused_grpo_loss(x, ids, torch.randn(B), entropy_coef=0.1, backend=backend)
    (grad,) = torch.autograd.grad(loss, x)
    finite = logits[..., torch.arange(V) % 3 != 0]  # the same distribution without the masked entries
    want_l, want_h = reference.token_logprobs(finite.double(), torch.zeros(B, T, dtype=torch.long))
    assert torch.allclose(metrics["logprobs"].double(), want_l, atol=1e-5)
    assert torch.allclose(metrics["entropy"].double(), want_h.mean(), atol=1e-5)
    assert torch.isfinite(grad).all() and (grad[..., ::3] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_logits_give_non_finite_loss(backend):
    B, T, V = 2, 3, 20
    for bad in (float("nan"), float("inf")):
        logits = random_logits(B, T, V, torch.float32, seed=4, sliced=False)
        logits[1, 2, 5] = bad
        x = logits.clone().requires_grad_()
        loss, _ = grpo_kernels.fused_grpo_loss(x, torch.zeros(B, T, dtype=torch.long), torch.ones(B),
                                               backend=backend)
        assert not torch.isfinite(loss)
        torch.autograd.grad(loss, x)  # no crash


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "luspo", "dr_grpo"])
def test_empty_batch_and_masked_rows(backend, loss_type):
    for B, T in ((0, 4), (2, 0)):
        x = torch.randn(B, T, 9, requires_grad=True)
        loss, _ = grpo_kernels.fused_grpo_loss(x, torch.zeros(B, T, dtype=torch.long), torch.randn(B),
                                               loss_type=loss_type, backend=backend)
        (grad,) = torch.autograd.grad(loss, x)
        assert loss.item() == 0.0 and grad.shape == x.shape
    x = torch.randn(2, 3, 9, requires_grad=True)
    loss, metrics = grpo_kernels.fused_grpo_loss(x, torch.zeros(2, 3, dtype=torch.long), torch.randn(2),
                                                 torch.zeros(2, 3), loss_type=loss_type, backend=backend)
    (grad,) = torch.autograd.grad(loss, x)
    assert loss.item() == 0.0 and (grad == 0).all()
    assert all(v is None or torch.isfinite(v).all() for v in metrics.values())


@triton.jit
def _offsets_kernel(out_ptr, first_row, T, stride_b, stride_t):
    row = first_row + tl.program_id(0).to(tl.int64)
    tl.store(out_ptr + tl.program_id(0), triton_sweep._row_offset(row, T, stride_b, stride_t, False))


def test_row_offsets_are_int64_past_two_to_the_31():
    """The row offset the kernels use, at N * V well past 2^31 elements (16,384+ tokens of a
    logits[:, :-1] view with V = 151,936), against Python's unbounded ints."""
    V, T = 151_936, 1024
    stride_b, stride_t = (T + 1) * V, V
    first_row, n = 16_380 * 4, 8
    out = torch.empty(n, dtype=torch.int64)
    _offsets_kernel[(n,)](out, first_row, T, stride_b, stride_t)
    rows = range(first_row, first_row + n)
    want = [(r // T) * stride_b + (r % T) * stride_t for r in rows]
    assert want[0] > 2**31 * 4
    assert out.tolist() == want


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grad_entropy", [0.5, 3.0, -40.0])
def test_minus_inf_logit_gets_zero_gradient(backend, grad_entropy):
    """A -inf logit (a masked-out token) has p = 0 and gets gradient 0 at any dL/dentropy, also
    where e (H + log p) would overflow if log p were floored at the lowest finite value."""
    logits = random_logits(2, 3, 8, torch.float32, seed=4)
    logits[..., 5] = -float("inf")
    ids = torch.randint(0, 5, (6,))
    module = backend_module(backend)
    outs = module.forward(logits, ids, 1.0, None)
    grad = torch.full(logits.shape, float("nan"))
    module.backward(logits, ids, 1.0, None, *outs[2:], torch.randn(6), torch.full((6,), grad_entropy), grad)
    assert torch.isfinite(grad).all() and (grad[..., 5] == 0).all()


class _NewStorages(TorchDispatchMode):
    """Records the bytes of every storage an op returns that none of its inputs had: what it allocated."""

    def __init__(self):
        super().__init__()
        self.nbytes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        seen = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        self.nbytes += [t.untyped_storage().nbytes() for t in tree_leaves(out)
                        if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen]
        return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", ["sliced", "expanded"])
def test_torch_path_holds_one_chunk(monkeypatch, dtype, rows):
    """The CPU path never allocates more than one chunk of rows in fp32, forward and backward, with
    per-token temperature, entropy gradient and masked rows (issue 18: no copy or upcast of all
    rows), and on rows it can index_select, nothing of a row's size but its two buffers a sweep."""
    monkeypatch.setattr(torch_path, "CHUNK_ELEMENTS", 64)
    monkeypatch.setattr(torch_path, "MIN_CHUNK_ELEMENTS", 64)
    B, T, V = 2, 5, 16  # 4 rows per chunk, 10 rows in all
    logits = random_logits(B, T, V, dtype, seed=9)
    if rows == "expanded":  # rows repeated along t: read by indexing, not index_select
        logits = logits[:, :1].expand(B, T, V)
    ids = torch.randint(0, V, (B * T,))
    temperature = torch.rand(B * T) + 0.5
    active = torch.ones(B * T, dtype=torch.bool)
    active[[3, 7]] = False
    grad_out = torch.empty(B, T, V, dtype=dtype)
    chunk_bytes = 4 * V * 4
    grads = torch.randn(B * T), torch.randn(B * T)
    with _NewStorages() as spy:
        outs = torch_path.forward(logits, ids, temperature, active)
        torch_path.backward(logits, ids, temperature, active, *outs[2:], *grads, grad_out)
    assert chunk_bytes in spy.nbytes and max(spy.nbytes) <= chunk_bytes
    # The same numbers as from a contiguous copy, whichever way the rows were moved.
    want = torch_path.forward(logits.contiguous(), ids, temperature, active)
    want_grad = torch.empty_like(grad_out)
    torch_path.backward(logits.contiguous(), ids, temperature, active, *want[2:], *grads, want_grad)
    for got, ref in zip((*outs, grad_out), (*want, want_grad)):
        assert torch.equal(got.nan_to_num(), ref.nan_to_num())
    if rows == "sliced":  # two chunk buffers per sweep, all math in place in them: no temporary of a chunk
        assert sum(n >= 2 * V * 4 for n in spy.nbytes) == 4  # two fp32 rows: more than a per-row vector
