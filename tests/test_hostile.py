"""A hostile user's cases (issue 9): never a silent wrong gradient, on every backend.

In-place writes tell autograd, overlapping rows are refused, constants of the objective are
detached, options are strictly typed, fp32 precision is no worse than eager PyTorch on the
inputs LLM policies produce (confident tokens, large logits), and the outputs handed to the
caller are the caller's to modify.
"""
from __future__ import annotations

import pytest
import torch

import grpo_kernels
from grpo_kernels.linear import fused_linear_grpo_loss, linear_token_logprobs
from grpo_kernels.linear import triton as triton_linear
from grpo_kernels.linear.triton import LinearConfig
from grpo_kernels.sweep import pytorch as torch_path
from helpers import rel_err

BACKENDS = ["torch", "triton"]
INPLACE_ERROR = "modified by an inplace operation"


def inputs(B=2, T=3, V=40, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=dtype)
    ids = torch.randint(0, V, (B, T), generator=g)
    adv = torch.randn(B, generator=g)
    return logits, ids, adv


# --- 1. in-place backward ---------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_after_another_loss_on_the_same_logits_raises(backend):
    """A z-loss saved the logits before the fused loss overwrote them: autograd must refuse."""
    logits, ids, adv = inputs()
    x = logits.clone().requires_grad_()
    l = x * 1  # noqa: E741
    z = l.logsumexp(-1).pow(2).mean()
    loss, _ = grpo_kernels.fused_grpo_loss(l, ids, adv, backend=backend, inplace_backward=True)
    with pytest.raises(RuntimeError, match=INPLACE_ERROR):
        (loss + z).backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_twice_raises(backend):
    logits, ids, adv = inputs()
    x = logits.clone().requires_grad_()
    l = x * 1  # noqa: E741
    loss, _ = grpo_kernels.fused_grpo_loss(l, ids, adv, backend=backend, inplace_backward=True)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match=INPLACE_ERROR):
        loss.backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_inplace_losses_on_the_same_logits_raise(backend):
    logits, ids, adv = inputs()
    x = logits.clone().requires_grad_()
    l = x * 1  # noqa: E741
    a, _ = grpo_kernels.fused_grpo_loss(l, ids, adv, backend=backend, inplace_backward=True)
    b, _ = grpo_kernels.fused_grpo_loss(l, ids, -adv, backend=backend, inplace_backward=True)
    with pytest.raises(RuntimeError, match=INPLACE_ERROR):
        (a + b).backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_refuses_rows_that_overlap(backend):
    logits, ids, adv = inputs(B=2, T=3)
    row = logits[:1, :1].clone().requires_grad_()
    expanded = row.expand(2, 3, logits.shape[-1])  # stride 0: every row is the same memory
    with pytest.raises(ValueError, match="overlap"):
        grpo_kernels.fused_grpo_loss(expanded, ids, adv, backend=backend, inplace_backward=True)
    # Out of place the same expanded logits are fine, and the gradient sums over the copies.
    loss, _ = grpo_kernels.fused_grpo_loss(expanded, ids, adv, backend=backend)
    (grad,) = torch.autograd.grad(loss, row)
    x = expanded.detach().clone().requires_grad_()
    want, _ = grpo_kernels.reference.grpo_loss(x, ids, adv)
    (g_want,) = torch.autograd.grad(want, x)
    assert rel_err(grad, g_want.sum((0, 1), keepdim=True)) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_gradient_is_right_when_nothing_else_needs_the_logits(backend):
    logits, ids, adv = inputs()
    want_x = logits.clone().requires_grad_()
    want, _ = grpo_kernels.fused_grpo_loss(want_x, ids, adv, backend=backend)
    want.backward()
    x = logits.clone().requires_grad_()
    loss, _ = grpo_kernels.fused_grpo_loss(x * 1, ids, adv, backend=backend, inplace_backward=True)
    loss.backward()
    assert torch.equal(x.grad, want_x.grad)


# --- 2. constants of the objective are detached ----------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_old_logprobs_with_a_graph_are_constants(backend):
    """old = token_logprobs(x, ids) without no_grad must not cancel the policy gradient."""
    logits, ids, adv = inputs(seed=1)
    ref_l = grpo_kernels.token_logprobs(logits, ids) - 0.3
    x = logits.clone().requires_grad_()
    old = grpo_kernels.token_logprobs(x, ids, backend=backend)  # carries a graph to x
    loss, _ = grpo_kernels.fused_grpo_loss(x, ids, adv, None, old, ref_l.clone().requires_grad_(), beta=0.1,
                                           rollout_is_ratio=torch.ones(2, 3, requires_grad=True), backend=backend)
    (grad,) = torch.autograd.grad(loss, x)
    y = logits.clone().requires_grad_()
    want, _ = grpo_kernels.fused_grpo_loss(y, ids, adv, None, old.detach(), ref_l, beta=0.1, backend=backend)
    (g_want,) = torch.autograd.grad(want, y)
    assert g_want.abs().max() > 1e-3
    assert torch.allclose(grad, g_want, atol=1e-7)


# --- 3, 6. strict options ---------------------------------------------------------------------------


@pytest.mark.parametrize("keyword,value", [("inplace_backward", "no"), ("use_bias_correction_kl", "false"),
                                           ("inplace_backward", 1), ("use_bias_correction_kl", None)])
def test_boolean_options_take_bools_only(keyword, value):
    logits, ids, adv = inputs()
    for fn in (grpo_kernels.fused_grpo_loss, grpo_kernels.reference.grpo_loss):
        with pytest.raises(TypeError, match=keyword):
            fn(logits, ids, adv, **{keyword: value})
    with pytest.raises(TypeError, match="return_entropy"):
        grpo_kernels.token_logprobs(logits, ids, return_entropy="yes")


@pytest.mark.parametrize("temperature", [1e-40, 2e-39])
def test_temperature_whose_inverse_overflows_is_refused(temperature):
    logits, ids, adv = inputs()
    with pytest.raises(ValueError, match="temperature"):
        grpo_kernels.fused_grpo_loss(logits, ids, adv, temperature=temperature)
    with pytest.raises(ValueError, match="temperature"):
        grpo_kernels.token_logprobs(logits, ids, temperature=temperature)


# --- 4. fp32 precision no worse than eager -----------------------------------------------------------


def _eager_errors(logits, ids, c):
    """Eager fp32 PyTorch's log-prob and gradient errors against float64, for L = sum c * logprob."""
    x64 = logits.double().requires_grad_()
    lp64 = torch.log_softmax(x64, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    (g64,) = torch.autograd.grad((c.double() * lp64).sum(), x64)
    x32 = logits.clone().requires_grad_()
    lp32 = torch.log_softmax(x32, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    (g32,) = torch.autograd.grad((c * lp32).sum(), x32)
    return lp64.detach(), g64, float((lp32 - lp64).abs().max()), rel_err(g32, g64)


def _confident_cases():
    g = torch.Generator().manual_seed(5)
    for name, scale, offset in (("offset-1e4", 3.0, 1e4), ("confident-50", 50.0, 0.0), ("confident-200", 200.0, 0.0)):
        logits = (torch.randn(4, 6, 300, generator=g) * scale + offset).float()
        ids = logits.argmax(-1) if offset == 0.0 else torch.randint(0, 300, (4, 6), generator=g)
        yield name, logits, ids, torch.randn(4, 6, generator=g)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_precision_within_twice_eager(backend):
    for name, logits, ids, c in _confident_cases():
        lp64, g64, eager_lp_err, eager_g_err = _eager_errors(logits, ids, c)
        x = logits.clone().requires_grad_()
        lp = grpo_kernels.token_logprobs(x, ids, backend=backend)
        (grad,) = torch.autograd.grad((c * lp).sum(), x)
        lp_err = float((lp.double() - lp64).abs().max())
        assert lp_err <= 2 * eager_lp_err + 1e-7, (name, lp_err, eager_lp_err)
        assert rel_err(grad, g64) <= 2 * eager_g_err + 1e-7, (name, rel_err(grad, g64), eager_g_err)


TINY = LinearConfig(chunk_rows=7, block_v=32, num_warps=4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_precision_of_the_fused_linear_sweep(backend, monkeypatch):
    """A bias of 1e4 (large logits) and a confident head: log-probs as exact as eager's."""
    monkeypatch.setattr(triton_linear, "default_config", lambda *_: TINY)
    g = torch.Generator().manual_seed(6)
    N, H, V = 12, 16, 100
    hidden, weight = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g)
    for bias_offset, scale in ((1e4, 1.0), (0.0, 20.0)):
        bias = torch.randn(V, generator=g) + bias_offset
        w = weight * scale
        logits64 = hidden.double() @ w.double().T + bias.double()
        ids = logits64.argmax(-1)
        lp64 = torch.log_softmax(logits64, -1).gather(-1, ids[:, None])[:, 0]
        # Eager: the fp32 GEMM, then log_softmax in fp32; both sides carry the GEMM's rounding.
        eager = torch.log_softmax(hidden @ w.T + bias, -1).gather(-1, ids[:, None])[:, 0]
        eager_err = float((eager.double() - lp64).abs().max())
        lp = linear_token_logprobs(hidden, w, ids, lm_head_bias=bias, backend=backend)
        assert float((lp.double() - lp64).abs().max()) <= 2 * eager_err + 1e-7, (bias_offset, scale)


# --- 5. outputs are the caller's to modify ------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_outputs_may_be_modified_in_place_before_backward(backend):
    logits, ids, adv = inputs(seed=2)
    ref_l = grpo_kernels.token_logprobs(logits, ids) - 0.2
    want_x = logits.clone().requires_grad_()
    want, _ = grpo_kernels.fused_grpo_loss(want_x, ids, adv, None, None, ref_l, beta=0.1, entropy_coef=0.1,
                                           backend=backend)
    want.backward()
    x = logits.clone().requires_grad_()
    loss, metrics = grpo_kernels.fused_grpo_loss(x, ids, adv, None, None, ref_l, beta=0.1, entropy_coef=0.1,
                                                 backend=backend)
    metrics["logprobs"].zero_()
    metrics["entropy"].zero_()
    loss.backward()
    assert torch.equal(x.grad, want_x.grad)

    y = logits.clone().requires_grad_()
    lp, ent = grpo_kernels.token_logprobs(y, ids, return_entropy=True, backend=backend)
    keep = (lp.detach() * 2 + ent.detach()).sum()
    (lp * 2).sum().backward(retain_graph=True)
    g1 = y.grad.clone()
    ent.mul_(0)  # the entropy output is not a view of the log-probs' buffer
    y.grad = None
    (lp * 2).sum().backward()
    assert torch.equal(y.grad, g1) and torch.isfinite(keep)


# --- 7. fused linear arguments --------------------------------------------------------------------------


def test_fused_linear_names_missing_weight_and_other_device():
    hidden, ids, adv = torch.randn(2, 3, 8), torch.zeros(2, 3, dtype=torch.long), torch.randn(2)
    with pytest.raises(TypeError, match="lm_head_weight"):
        fused_linear_grpo_loss(hidden, None, ids, adv)
    with pytest.raises(TypeError, match="lm_head_weight"):
        linear_token_logprobs(hidden, None, ids)
    weight = torch.randn(11, 8)
    with pytest.raises(ValueError, match="hidden"):
        fused_linear_grpo_loss(hidden.to("meta"), weight, ids, adv)
    with pytest.raises(ValueError, match="lm_head_weight"):
        fused_linear_grpo_loss(hidden, weight.to("meta"), ids, adv)


# --- 9. the CPU path chunks across sequences ----------------------------------------------------------


def test_cpu_path_chunks_across_short_sequences(monkeypatch):
    """On logits[:, :-1] with short sequences, a chunk holds many sequences' rows, not one sequence."""
    B, T, V = 64, 4, 256
    full = torch.randn(B, T + 1, V)
    logits = full[:, :-1]  # cannot be flattened without a copy
    ids = torch.randint(0, V, (B, T))
    seen = []
    read = torch_path._Rows.read
    monkeypatch.setattr(torch_path._Rows, "read", lambda self, idx, *a: seen.append(idx.numel()) or read(self, idx, *a))
    lp = grpo_kernels.token_logprobs(logits, ids, backend="torch")
    assert max(seen) == B * T  # 256 rows of 256 columns fit one chunk
    want = grpo_kernels.reference.token_logprobs(logits.double(), ids)[0]
    assert float((lp.double() - want).abs().max()) < 1e-5


@pytest.mark.parametrize("entry", ["fused_grpo_loss", "token_logprobs", "fused_linear_grpo_loss",
                                   "linear_token_logprobs"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_double_backward_raises_one_clear_error(backend, entry):
    """create_graph=True through the loss (issue 18): the same RuntimeError on every backend and entry
    point, at the first backward; a plain backward still works."""
    g = torch.Generator().manual_seed(5)
    V = 9
    ids, adv = torch.randint(0, V, (2, 3), generator=g), torch.randn(2, generator=g)
    x = torch.randn(2, 3, V if entry in ("fused_grpo_loss", "token_logprobs") else 4, generator=g,
                    requires_grad=True)
    weight = torch.randn(V, 4, generator=g)

    def loss():
        if entry == "fused_grpo_loss":
            return grpo_kernels.fused_grpo_loss(x, ids, adv, backend=backend)[0]
        if entry == "token_logprobs":
            return grpo_kernels.token_logprobs(x, ids, backend=backend).sum()
        if entry == "fused_linear_grpo_loss":
            return grpo_kernels.fused_linear_grpo_loss(x, weight, ids, adv, backend=backend)[0]
        return grpo_kernels.linear_token_logprobs(x, weight, ids, backend=backend).sum()

    with pytest.raises(RuntimeError, match="does not support double backward"):
        torch.autograd.grad(loss(), x, create_graph=True)
    (grad,) = torch.autograd.grad(loss(), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
