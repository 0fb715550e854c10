"""The fused-linear sweep (grpo_kernels/linear/triton.py, grpo_kernels/linear/pytorch.py) and
fused_linear_grpo_loss, against float64 PyTorch through explicit logits.

The Triton kernels run under the interpreter (tests/conftest.py), on tiny shapes with tiny
tiles so that every tile edge, chunk edge and multi-chunk path is crossed. The interpreter
returns garbage for bf16 x bf16 dots, so the kernels are checked here in fp32 and fp16 and
compiled ahead of time for sm_80 and sm_90 (bf16 included) in a subprocess.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from grpo_kernels.linear import fused_linear_grpo_loss, linear_token_logprobs
from grpo_kernels.linear import pytorch as linear_torch
from grpo_kernels.linear import triton as triton_linear
from grpo_kernels.linear.triton import LinearConfig
from grpo_kernels.reference import grpo_loss

TESTS = os.path.dirname(os.path.abspath(__file__))

# Tiny chunks and blocks: several chunks of tokens and several vocabulary blocks per row on shapes of
# a few dozen (the last chunk and the last block partial). TINY writes dz into the fp32 chunk, as
# shipped; TINY_SCRATCH into a separate buffer.
TINY = LinearConfig(chunk_rows=7, block_v=32, num_warps=4)
TINY_SCRATCH = LinearConfig(chunk_rows=7, inplace_dz=False, block_v=32, num_warps=4)


def rel_err(actual: torch.Tensor, expected: torch.Tensor, floor: float = 1e-3) -> float:
    """||actual - expected|| / ||expected|| in float64 (absolute below a norm of `floor`)."""
    actual, expected = actual.double(), expected.double()
    return (torch.linalg.vector_norm(actual - expected) / max(torch.linalg.vector_norm(expected).item(), floor)).item()


def make_inputs(N: int, V: int, H: int, dtype: torch.dtype, bias: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).to(dtype)
    # Logits with a spread of a few units: peaked and flat rows, no saturation.
    weight = (3.0 * torch.randn(V, H, generator=g) / H**0.5).to(dtype)
    b = torch.randn(V, generator=g).to(dtype) if bias else None
    ids = torch.randint(0, V, (N,), generator=g)
    return hidden, weight, b, ids, g


def oracle_sweep(hidden, weight, bias, ids, temperature, grad_logprobs, grad_entropy):
    """Float64 (logprobs, entropy, lse, mean_z), the gradients of
    sum(grad_logprobs * logprobs + grad_entropy * entropy) w.r.t. (hidden, weight, bias) by
    autograd through the explicit logits, and the scale of each gradient's sums:
    |dlogits| @ |W|, |dlogits|.T @ |hidden|, |dlogits|.sum(0)."""
    leaves = [t.detach().double().requires_grad_() for t in (hidden, weight) + ((bias,) if bias is not None else ())]
    logits = leaves[0] @ leaves[1].T
    if bias is not None:
        logits = logits + leaves[2]
    logits.retain_grad()
    z = logits / temperature
    lse = torch.logsumexp(z, -1)
    logp = z - lse[:, None]
    logprobs = logp.gather(-1, ids.long()[:, None])[:, 0]
    mean_z = (logp.exp() * z).sum(-1)
    entropy = lse - mean_z
    objective = (grad_logprobs.double() * logprobs).sum()
    if grad_entropy is not None:
        objective = objective + (grad_entropy.double() * entropy).sum()
    objective.backward()
    dz = logits.grad.abs()
    scales = (dz @ leaves[1].detach().abs(), dz.T @ leaves[0].detach().abs(), dz.sum(0))
    return (logprobs, entropy, lse, mean_z), [t.grad for t in leaves], scales


def check_sweep(backend, dtype, N, V, H, bias, entropy_grad, temperature, seed, fwd_tol, grad_tol, **kw):
    hidden, weight, b, ids, g = make_inputs(N, V, H, dtype, bias, seed)
    grad_logprobs = torch.randn(N, generator=g)
    grad_entropy = torch.randn(N, generator=g) if entropy_grad else None
    stats = backend.forward(hidden, weight, b, ids, temperature, **kw)
    grads = backend.backward(hidden, weight, b, ids, temperature, None, *stats[2:], grad_logprobs, grad_entropy, **kw)
    want_stats, want_grads, scales = oracle_sweep(hidden, weight, b, ids, temperature, grad_logprobs, grad_entropy)
    logprobs, entropy, m, log_sum, mean_rel = stats
    got_stats = (logprobs, entropy, m.double() + log_sum.double(), m.double() + mean_rel.double())
    for name, got, want in zip(("logprobs", "entropy", "lse", "mean_z"), got_stats, want_stats):
        if name in ("logprobs", "entropy"):
            assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        # Log-domain values: their rounding is absolute at unit scale (a near-deterministic row's
        # entropy of 1e-3 is right to ~1e-7, not to 1e-5 of itself), hence a per-element floor of 0.01.
        assert rel_err(got, want, floor=1e-2 * N**0.5) < fwd_tol, name
    for name, got, want, scale, like in zip(("grad_hidden", "grad_weight", "grad_bias"), grads, want_grads, scales,
                                            (hidden, weight, b)):
        assert got.dtype == like.dtype and got.shape == like.shape, name
        # Relative to the sums of |terms|: a sum that cancels to a small value keeps the
        # absolute rounding of its terms, whatever the order of the sum.
        err = torch.linalg.vector_norm(got.double() - want) / max(torch.linalg.vector_norm(scale).item(), 1e-3)
        assert err < grad_tol, name
    if b is None:
        assert grads[2] is None


# ---------------------------------------------------------------------------------------------
# The sweep
# ---------------------------------------------------------------------------------------------

sweep_shapes = dict(
    N=st.integers(1, 70), V=st.integers(1, 230), H=st.integers(1, 72), bias=st.booleans(),
    entropy_grad=st.booleans(), temperature=st.floats(0.3, 2.0), seed=st.integers(0, 2**31 - 1),
)


@settings(max_examples=25)
@given(dtype=st.sampled_from([torch.float32, torch.float16]), config=st.sampled_from([TINY, TINY_SCRATCH]),
       **sweep_shapes)
def test_triton_sweep_matches_float64(dtype, config, N, V, H, bias, entropy_grad, temperature, seed):
    # z accumulates in fp32 from exact products, so the forward is fp32-accurate for fp16
    # inputs too; fp16 gradients carry the rounding of dz and of the outputs.
    check_sweep(triton_linear, dtype, N, V, H, bias, entropy_grad, temperature, seed,
                fwd_tol=1e-5, grad_tol=1e-5 if dtype == torch.float32 else 5e-3, config=config)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_sweep_default_config(dtype):
    """The shipped configuration (one chunk, one vocabulary block of 512) on a small problem."""
    check_sweep(triton_linear, dtype, 45, 300, 40, True, True, 0.8, 0, fwd_tol=1e-5,
                grad_tol=1e-5 if dtype == torch.float32 else 5e-3)


@given(dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16]), chunk=st.integers(1, 100),
       **sweep_shapes)
def test_torch_sweep_matches_float64(dtype, chunk, N, V, H, bias, entropy_grad, temperature, seed):
    tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    check_sweep(linear_torch, dtype, N, V, H, bias, entropy_grad, temperature, seed,
                fwd_tol=tol if dtype == torch.float64 else 1e-5, grad_tol=tol, vocab_chunk=chunk)


@pytest.mark.parametrize("backend,kw", [(triton_linear, dict(config=TINY)), (linear_torch, dict(vocab_chunk=7))])
def test_sweep_skips_unneeded_gradients(backend, kw):
    hidden, weight, b, ids, _ = make_inputs(20, 50, 24, torch.float32, True, 1)
    _, _, *row = backend.forward(hidden, weight, b, ids, 1.0, **kw)
    gl = torch.randn(20)
    full = backend.backward(hidden, weight, b, ids, 1.0, None, *row, gl, None, **kw)
    for needs in [(True, False, False), (False, True, False), (False, False, True), (False, False, False)]:
        part = backend.backward(hidden, weight, b, ids, 1.0, None, *row, gl, None, needs_grad=needs, **kw)
        for need, got, want in zip(needs, part, full):
            assert (got is None) != need
            if need:
                torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_triton_sweep_is_deterministic():
    hidden, weight, b, ids, g = make_inputs(50, 150, 40, torch.float16, True, 2)
    gl, ge = torch.randn(50, generator=g), torch.randn(50, generator=g)

    def run():
        stats = triton_linear.forward(hidden, weight, b, ids, 0.9, config=TINY)
        return stats + triton_linear.backward(hidden, weight, b, ids, 0.9, None, *stats[2:], gl, ge, config=TINY)

    for first, second in zip(run(), run()):
        assert torch.equal(first, second)


def test_triton_sweep_empty_batch():
    hidden, weight, b, ids, _ = make_inputs(0, 40, 16, torch.float32, True, 3)
    stats = triton_linear.forward(hidden, weight, b, ids, 1.0, config=TINY)
    assert all(s.shape == (0,) for s in stats)
    gh, gw, gb = triton_linear.backward(hidden, weight, b, ids, 1.0, None, *stats[2:], torch.zeros(0), None,
                                        config=TINY)
    assert gh.shape == (0, 16) and not gw.any() and not gb.any()


def test_no_recompile_across_batches_and_temperatures():
    """Every kernel maps calls with any chunk size, chunk position and temperature to one specialisation."""
    sys.path.insert(0, TESTS)
    from triton_aot import specialization_key

    V, H, dtype = 1000, 64, torch.float16
    config = triton_linear.default_config(4096, V, H, dtype)
    keys = {}
    N = 5000
    bias = torch.empty(V, dtype=dtype)
    ids, row, temp = torch.empty(N, dtype=torch.int64), torch.empty(N), torch.empty(N)
    for n, r0, temperature in [(64, 0, 1.0), (77, 3, 0.3), (1, 4097, 2.5), (1000, 1, 0.9), (768, 4001, 1.7)]:
        x = torch.empty(n, V)
        launches = {
            "stats": triton_linear.stats_launch(x, bias, ids[r0:r0 + n], temperature, None,
                                                [row[r0:r0 + n]] * 5, config),
            "stats-temprows": triton_linear.stats_launch(x, bias, ids[r0:r0 + n], temp[r0:r0 + n], None,
                                                         [row[r0:r0 + n]] * 5, config),
            "dz": triton_linear.dz_launch(x, x.view(dtype)[:, :V], bias, ids[r0:r0 + n], temperature, None,
                                          *[row[r0:r0 + n]] * 5, config),
        }
        for name, (kernel, _grid, args, meta) in launches.items():
            keys.setdefault(name, set()).add(specialization_key(kernel, args, meta))
    assert {name: len(k) for name, k in keys.items()} == {"stats": 1, "stats-temprows": 1, "dz": 1}


# ---------------------------------------------------------------------------------------------
# fused_linear_grpo_loss against reference.grpo_loss(hidden @ W.T + b)
# ---------------------------------------------------------------------------------------------

LOSS_CASES = [
    dict(loss_type="grpo"),
    dict(loss_type="dapo", beta=0.1),  # r * k3, the default KL form
    dict(loss_type="bnpo", beta=0.05, kl_estimator="k3", use_bias_correction_kl=False),
    dict(loss_type="dr_grpo", beta=0.1, kl_estimator="k2", use_bias_correction_kl=False),
    dict(loss_type="luspo", beta=0.1, kl_estimator="k1"),  # r * k1
    dict(loss_type="cispo", epsilon_high=3.0, beta=0.02, kl_estimator="k2"),
    dict(loss_type="sapo", temperature=0.7),
    dict(loss_type="vespo"),
    dict(loss_type="grpo", importance_sampling_level="sequence", beta=0.1),  # GSPO
    dict(loss_type="dapo", entropy_coef=0.05, top_entropy_quantile=0.6, temperature=1.3),  # entropy gradient
    dict(loss_type="dapo", dual_clip=3.0, delta=2.0, off_policy_mask_threshold=0.1),
]


def loss_inputs(B, T, H, V, dtype, seed):
    hidden, weight, bias, ids, g = make_inputs(B * T, V, H, dtype, True, seed)
    hidden, ids = hidden.view(B, T, H), ids.view(B, T)
    with torch.no_grad():
        logprobs = torch.log_softmax(hidden.double() @ weight.double().T + bias.double(), -1)
        logprobs = logprobs.gather(-1, ids[..., None])[..., 0]
    # Ratios from inside to far outside the clip band; advantages of both signs and zero.
    old = (logprobs + 0.6 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    ref = (logprobs + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    advantages = torch.randn(B, generator=g)
    advantages[0] = 0.0
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[-1] = False  # a fully masked sequence
    return hidden, weight, bias, ids, advantages, mask, old, ref


def check_loss(options, backend, dtype, tol, B=3, T=5, H=24, V=70, seed=0):
    hidden, weight, bias, ids, advantages, mask, old, ref = loss_inputs(B, T, H, V, dtype, seed)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    loss, metrics = fused_linear_grpo_loss(leaves[0], leaves[1], ids, advantages, mask, old, ref,
                                           lm_head_bias=leaves[2], backend=backend, **options)
    loss.backward()

    oracle = [t.detach().double().requires_grad_() for t in (hidden, weight, bias)]
    logits = oracle[0] @ oracle[1].T + oracle[2]
    want, want_metrics = grpo_loss(logits, ids, advantages, mask, old, ref, **options)
    want.backward()

    assert rel_err(loss.detach(), want.detach()) < tol
    for name, got in metrics.items():
        if got is None:
            assert want_metrics[name] is None, name
        else:
            assert rel_err(got, want_metrics[name]) < tol, name
    for name, leaf, o in zip(("hidden", "weight", "bias"), leaves, oracle):
        assert leaf.grad.dtype == dtype
        assert rel_err(leaf.grad, o.grad) < tol, name


@pytest.mark.parametrize("options", LOSS_CASES, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_loss_triton_matches_reference(options, monkeypatch):
    monkeypatch.setattr(triton_linear, "default_config", lambda *_: TINY)
    check_loss(options, "triton", torch.float32, 1e-5)


@pytest.mark.parametrize("options", LOSS_CASES, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_loss_torch_matches_reference(options):
    check_loss(options, "torch", torch.float32, 1e-5)
    check_loss(options, "torch", torch.float64, 1e-10, seed=1)


@pytest.mark.parametrize("options", [LOSS_CASES[1], LOSS_CASES[9]], ids=["dapo-k3", "entropy"])
def test_loss_triton_fp16(options):
    check_loss(options, "triton", torch.float16, 1e-2)


# ---------------------------------------------------------------------------------------------
# The three-GEMM path (token-local losses): the engine, the autograd function, grad_scale
# ---------------------------------------------------------------------------------------------

class ScaffoldTokenLocal:
    """A stand-in for loss_triton's token-local API (token_local, Plan), for tests of the engine and
    its autograd function apart from loss_triton: each chunk's coefficients by autograd through
    loss.py, on the log-probs seen so far (the other rows do not change a token-local coefficient);
    finish runs loss.py on all of them."""

    def __init__(self, cases=("grpo", "dapo", "bnpo", "dr_grpo", "luspo")):
        self.cases, self.chunks = cases, []
        api = self

        class Plan:
            def __init__(self, tokens, o, grad_scale):
                N = tokens.layout.num_rows
                self.tokens, self.o, self.grad_scale = tokens, o, grad_scale
                self.lp, self.ent = torch.zeros(N), torch.zeros(N)

            def _objective(self):
                from grpo_kernels.loss import objective

                with torch.enable_grad():  # called inside an autograd function's forward
                    lp, ent = self.lp.clone().requires_grad_(), self.ent.clone().requires_grad_()
                    loss, metrics = objective(lp, ent, self.tokens, self.o)
                return lp, ent, loss, metrics

            def chunk_coefficients(self, logprobs_c, entropy_c, row_start):
                r1 = row_start + logprobs_c.shape[0]
                api.chunks.append((row_start, r1))
                self.lp[row_start:r1], self.ent[row_start:r1] = logprobs_c, entropy_c
                lp, ent, loss, _ = self._objective()
                c, e = torch.autograd.grad(loss, (lp, ent), allow_unused=True, materialize_grads=True)
                return c[row_start:r1] * self.grad_scale, e[row_start:r1] * self.grad_scale

            def finish(self):
                _, _, loss, m = self._objective()
                zero = torch.zeros(())
                out = torch.stack([zero if m[k] is None else m[k].detach() for k in
                                   ("kl", "entropy", "clip_ratio_low", "clip_ratio_high", "clip_ratio_region")]
                                  + [zero, zero])
                return loss.detach(), out

        self.Plan = Plan

    def token_local(self, o, tokens, tp_group):
        return o.loss_type in self.cases and o.importance_sampling_level == "token" and o.top_entropy_quantile == 1.0


@pytest.fixture
def scaffold(monkeypatch):
    import grpo_kernels.linear as linear

    api = ScaffoldTokenLocal()
    monkeypatch.setattr(linear, "_token_local_api", lambda: api)
    monkeypatch.setattr(triton_linear, "default_config", lambda *_: TINY)
    return api


@pytest.mark.parametrize("config", [TINY, TINY_SCRATCH], ids=["inplace", "scratch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_forward_equals_the_four_gemm_path(config, dtype):
    """The same coefficients give bitwise the same gradients in three GEMMs as in four, with masked
    rows, a per-token temperature and a bias; inactive rows get exactly zero."""
    N, V, H = 23, 70, 24
    hidden, weight, b, ids, g = make_inputs(N, V, H, dtype, True, 11)
    active = torch.rand(N, generator=g) > 0.3
    temperature = 0.5 + torch.rand(N, generator=g)
    c, e = torch.randn(N, generator=g), torch.randn(N, generator=g)
    calls = []

    def coefficients(r0, lp, ent):
        calls.append((r0, lp.shape[0]))
        return c[r0:r0 + lp.shape[0]], e[r0:r0 + lp.shape[0]]

    got = triton_linear.fused_forward(hidden, weight, b, ids, temperature, active, coefficients, config=config)
    stats = triton_linear.forward(hidden, weight, b, ids, temperature, active, config=config)
    want = triton_linear.backward(hidden, weight, b, ids, temperature, active, *stats[2:], c, e, config=config)
    assert calls == [(r, min(7, N - r)) for r in range(0, N, 7)]
    for x, y in zip(got[:2], stats[:2]):
        assert torch.equal(x, y)
    for x, y in zip(got[2:], want):
        assert torch.equal(x, y)
    assert not got[2][~active].any() and got[2][active].abs().sum() > 0
    # and against float64 through explicit logits (only active rows carry a coefficient)
    on = active.float()
    _, want64, _ = oracle_sweep(hidden, weight, b, ids, temperature.double()[:, None], c * on, e * on)
    tol = 1e-5 if dtype == torch.float32 else 5e-3
    for x, y in zip(got[2:], want64):
        assert rel_err(x, y) < tol


@settings(max_examples=15, deadline=None)
@given(N=st.integers(0, 40), V=st.integers(1, 150), H=st.integers(1, 40), rows=st.integers(1, 50),
       block_v=st.sampled_from([16, 32, 64]), inplace=st.booleans(), bias=st.booleans(),
       entropy_grad=st.booleans(), masked=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_fused_forward_any_chunking(N, V, H, rows, block_v, inplace, bias, entropy_grad, masked, seed):
    """Any chunk size (past N too) and vocabulary block: the three-GEMM engine equals the four-GEMM path
    bitwise and both equal float64 (fp16 inputs: dz and the outputs carry fp16 rounding)."""
    config = LinearConfig(chunk_rows=rows, inplace_dz=inplace, block_v=block_v, num_warps=4)
    hidden, weight, b, ids, g = make_inputs(N, V, H, torch.float16, bias, seed)
    active = torch.rand(N, generator=g) > 0.3 if masked else None
    c = torch.randn(N, generator=g)
    e = torch.randn(N, generator=g) if entropy_grad else None
    got = triton_linear.fused_forward(hidden, weight, b, ids, 0.9, active,
                                      lambda r0, lp, ent: (c[r0:r0 + lp.shape[0]],
                                                           None if e is None else e[r0:r0 + lp.shape[0]]),
                                      config=config)
    stats = triton_linear.forward(hidden, weight, b, ids, 0.9, active, config=config)
    want = triton_linear.backward(hidden, weight, b, ids, 0.9, active, *stats[2:], c, e, config=config)
    for x, y in zip(got[2:], want):
        assert (x is None and y is None) or torch.equal(x, y)
    on = torch.ones(N) if active is None else active.float()
    _, want64, scales = oracle_sweep(hidden, weight, b, ids, 0.9, c * on, None if e is None else e * on)
    for x, y, scale in zip(got[2:], want64, scales):
        err = torch.linalg.vector_norm(x.double() - y) / max(torch.linalg.vector_norm(scale).item(), 1e-3)
        assert err < 5e-3


@pytest.mark.parametrize("options", [LOSS_CASES[1], LOSS_CASES[3], dict(loss_type="grpo", beta=0.05,
                                                                         entropy_coef=0.1, temperature=0.7)],
                         ids=["dapo-k3", "dr_grpo-k2", "grpo-entropy"])
def test_token_local_path_matches_reference(options, scaffold):
    """fused_linear_grpo_loss through the three-GEMM path (a scaffold coefficient API) against float64."""
    check_loss(options, "triton", torch.float32, 1e-5)
    assert scaffold.chunks, "the three-GEMM path did not run"


def test_token_local_losses_take_three_gemms(monkeypatch):
    """With loss_triton's own API: a token-local loss runs fused_forward once (no backward sweep), a
    sequence-level one the four-GEMM operators."""
    monkeypatch.setattr(triton_linear, "default_config", lambda *_: TINY)
    calls = []
    for name in ("fused_forward", "forward", "backward"):
        real = getattr(triton_linear, name)
        monkeypatch.setattr(triton_linear, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or
                            _real(*a, **k))
    for options, want in ((LOSS_CASES[1], ["fused_forward"]), (LOSS_CASES[8], ["forward", "backward"])):
        calls.clear()
        check_loss(options, "triton", torch.float32, 1e-5)
        assert calls == want, options


def _token_local_grads(scale, grad_scale, seed=8, **kw):
    hidden, weight, bias, ids, advantages, mask, old, ref = loss_inputs(3, 5, 24, 70, torch.float32, seed)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    loss, _ = fused_linear_grpo_loss(leaves[0], leaves[1], ids, advantages, mask, old, ref, lm_head_bias=leaves[2],
                                     backend="triton", beta=0.1, grad_scale=grad_scale, **kw)
    (loss * scale).backward()
    return loss, [leaf.grad for leaf in leaves]


def test_grad_scale(scaffold):
    """grad_scale = the upstream gradient: the gradients handed over as computed (bitwise those of a
    scaled loss); any other upstream gradient scales them by g / grad_scale."""
    loss1, want = _token_local_grads(1.0, 1.0)
    for scale, grad_scale in ((0.25, 0.25), (0.25, 1.0), (3.0, 0.5), (-1.0, 1.0)):
        loss, got = _token_local_grads(scale, grad_scale)
        assert torch.equal(loss, loss1)
        for x, y in zip(got, want):
            torch.testing.assert_close(x, scale * y, rtol=1e-6, atol=0)
    _, got = _token_local_grads(float("nan"), 1.0)
    assert all(torch.isnan(x).all() for x in got)


def test_grad_scale_matched_is_no_pass():
    """The rescale operator the backward uses, on a (1, rows, H) view: bitwise untouched (poisoned with
    NaN: not even x * 1) when g == grad_scale, scaled otherwise."""
    x = torch.randn(50, 64)
    x[::7, ::3] = float("nan")
    before = x.clone()
    torch.ops.grpo_kernels.rescale_gradient_(x.view(1, 50, -1), torch.tensor(0.3), 0.3)
    assert torch.equal(x.isnan(), before.isnan()) and torch.equal(x.nan_to_num(), before.nan_to_num())
    torch.ops.grpo_kernels.rescale_gradient_(x.view(1, 50, -1), torch.tensor(0.6), 0.3)
    torch.testing.assert_close(x.nan_to_num(), 2 * before.nan_to_num())


def test_token_local_backward_twice_raises(scaffold):
    hidden, weight, bias, ids, advantages, mask, old, ref = loss_inputs(2, 4, 16, 40, torch.float32, 3)
    h = hidden.clone().requires_grad_()
    loss, _ = fused_linear_grpo_loss(h, weight, ids, advantages, mask, old, ref, backend="triton", beta=0.1)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="a second time"):
        loss.backward()


@pytest.mark.parametrize("grad_scale", [0.0, float("inf"), float("nan")])
def test_bad_grad_scale(grad_scale):
    with pytest.raises(ValueError, match="grad_scale"):
        _call(grad_scale=grad_scale)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_hidden_layouts_and_frozen_weight(backend, monkeypatch):
    """(N, H) hidden, a strided (B, T-1, H) view, and a frozen lm_head (no grad_weight work)."""
    monkeypatch.setattr(triton_linear, "default_config", lambda *_: TINY)
    hidden, weight, bias, ids, advantages, mask, old, ref = loss_inputs(2, 6, 16, 40, torch.float32, 4)
    base = hidden.clone().requires_grad_()
    view = base[:, :-1]  # what a trainer slices off the model's output
    loss, _ = fused_linear_grpo_loss(view, weight, ids[:, :-1], advantages, mask[:, :-1], backend=backend,
                                     lm_head_bias=bias)
    loss.backward()
    flat = view.detach().reshape(-1, 16).clone().requires_grad_()
    loss2, _ = fused_linear_grpo_loss(flat, weight, ids[:, :-1], advantages, mask[:, :-1], backend=backend,
                                      lm_head_bias=bias)
    loss2.backward()
    assert torch.equal(loss, loss2)
    torch.testing.assert_close(base.grad[:, :-1].reshape(-1, 16), flat.grad)
    assert not base.grad[:, -1].any()
    assert weight.grad is None and bias.grad is None


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_token_local_packed_rows_with_per_token_temperature(loss_type, monkeypatch):
    """Packed sequences (an empty one among them), a per-token temperature and masked rows poisoned
    with large hidden states, through the three-GEMM path, against float64."""
    monkeypatch.setattr(triton_linear, "default_config", lambda *_: TINY)
    calls = []
    real = triton_linear.fused_forward
    monkeypatch.setattr(triton_linear, "fused_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    g = torch.Generator().manual_seed(12)
    lengths, H, V = [9, 1, 0, 12], 20, 90
    N, S = sum(lengths), len(lengths)
    cu = torch.tensor([0, 9, 10, 10, 22])
    hidden, weight, bias, ids, _ = make_inputs(N, V, H, torch.float32, True, 12)
    mask = torch.rand(N, generator=g) > 0.25
    hidden[~mask] *= 1e3  # read but never weighed: their gradient rows must be exactly 0
    temperature = 0.5 + torch.rand(N, generator=g)
    adv, ref = torch.randn(S, generator=g), -3 * torch.rand(N, generator=g)
    old = ref + 0.3 * torch.randn(N, generator=g)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    kw = dict(loss_type=loss_type, beta=0.05, temperature=temperature, cu_seqlens=cu)
    loss, metrics = fused_linear_grpo_loss(leaves[0], leaves[1], ids, adv, mask, old, ref, lm_head_bias=leaves[2],
                                           backend="triton", **kw)
    loss.backward()
    assert calls, "the three-GEMM path did not run"
    oracle = [t.detach().double().requires_grad_() for t in (hidden, weight, bias)]
    want, want_metrics = grpo_loss(oracle[0] @ oracle[1].T + oracle[2], ids, adv, mask, old, ref, **kw)
    want.backward()
    assert rel_err(loss.detach(), want.detach()) < 1e-5
    for name in ("kl", "entropy", "clip_ratio_region"):
        assert rel_err(metrics[name], want_metrics[name]) < 1e-5, name
    for leaf, o in zip(leaves, oracle):
        assert rel_err(leaf.grad, o.grad) < 1e-5
    assert not leaves[0].grad[~mask].any()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_autocast_computes_in_the_autocast_dtype(backend, monkeypatch):
    """bf16 autocast over fp32 master weights, as F.linear: same loss as on the bf16-cast inputs,
    gradients in fp32. The strided bias is a view the kernels cannot read as is."""
    monkeypatch.setattr(triton_linear, "default_config", lambda *_: TINY)
    hidden, weight, bias, ids, advantages, mask, old, ref = loss_inputs(2, 5, 16, 40, torch.float32, 7)
    leaves = [hidden.clone().requires_grad_(), weight.clone().requires_grad_(),
              bias.repeat_interleave(2).clone().requires_grad_()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = fused_linear_grpo_loss(leaves[0], leaves[1], ids, advantages, mask, old, ref, beta=0.1,
                                         lm_head_bias=leaves[2][::2], backend=backend)
    loss.backward()
    cast = [t.to(torch.bfloat16).double().requires_grad_() for t in (hidden, weight, bias)]
    want, _ = grpo_loss(cast[0] @ cast[1].T + cast[2], ids, advantages, mask, old, ref, beta=0.1)
    want.backward()
    # Both sides see the same bf16 values; the sweep itself stays in fp32 (autocast off inside).
    assert rel_err(loss.detach(), want.detach()) < 1e-5
    # The gradients are produced in bf16 (the compute dtype, as with F.linear), then cast to fp32.
    assert all(leaf.grad.dtype == torch.float32 for leaf in leaves)
    assert rel_err(leaves[0].grad, cast[0].grad) < 1e-2 and rel_err(leaves[1].grad, cast[1].grad) < 1e-2
    assert rel_err(leaves[2].grad[::2], cast[2].grad) < 1e-2 and not leaves[2].grad[1::2].any()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_empty_batch_gives_zero_loss(backend):
    hidden = torch.randn(0, 4, 16, requires_grad=True)
    weight = torch.randn(30, 16, requires_grad=True)
    loss, _ = fused_linear_grpo_loss(hidden, weight, torch.zeros(0, 4, dtype=torch.long), torch.zeros(0),
                                     backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and not weight.grad.any()


def test_linear_token_logprobs_matches_sweep():
    hidden, weight, bias, ids, *_ = loss_inputs(2, 5, 16, 40, torch.float32, 5)
    logprobs, entropy = linear_token_logprobs(hidden, weight, ids, 0.8, return_entropy=True, lm_head_bias=bias)
    (want_lp, want_ent, _, _), _, _ = oracle_sweep(hidden.view(10, 16), weight, bias, ids.view(10), 0.8,
                                                torch.zeros(10), None)
    assert rel_err(logprobs, want_lp.view(2, 5)) < 1e-5 and rel_err(entropy, want_ent.view(2, 5)) < 1e-5


def test_vocabulary_of_one():
    hidden, weight, bias, ids, g = make_inputs(6, 1, 8, torch.float32, True, 6)
    for backend, kw in ((triton_linear, dict(config=TINY)), (linear_torch, {})):
        logprobs, entropy, *_ = backend.forward(hidden, weight, bias, ids, 1.0, **kw)
        assert not logprobs.any() and not entropy.any()


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------

def _call(hidden=None, weight=None, ids=None, bias=None, **kw):
    B, T, H, V = 2, 3, 8, 11
    hidden = torch.randn(B, T, H) if hidden is None else hidden
    weight = torch.randn(V, H) if weight is None else weight
    ids = torch.randint(0, V, (B, T)) if ids is None else ids
    return fused_linear_grpo_loss(hidden, weight, ids, torch.randn(B), lm_head_bias=bias, **kw)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(weight=torch.randn(11, 9)), ValueError, r"lm_head_weight must have shape \(V, H\) = \(V, 8\)"),
    (dict(weight=torch.randn(11)), ValueError, "lm_head_weight must have shape"),
    (dict(weight=torch.randn(0, 8)), ValueError, "lm_head_weight must have at least one row"),
    (dict(bias=torch.randn(10)), ValueError, r"lm_head_bias must have shape \(V,\) = \(11,\)"),
    (dict(bias=torch.randn(11, 1)), ValueError, "lm_head_bias must have shape"),
    (dict(bias=torch.zeros(11, dtype=torch.long)), TypeError, "lm_head_bias must be a floating-point"),
    (dict(ids=torch.randint(0, 11, (2, 4))), ValueError, r"hidden must have shape \(B, T, H\) = \(2, 4, H\)"),
    (dict(ids=torch.randint(0, 11, (6,))), ValueError, r"completion_ids must have shape \(B, T\)"),
    (dict(ids=torch.full((2, 3), 11)), ValueError, r"completion_ids must lie in \[0, V\) = \[0, 11\)"),
    (dict(ids=torch.zeros(2, 3)), TypeError, "completion_ids must be int32 or int64"),
    (dict(hidden=torch.randn(2, 3, 1, 8)), ValueError, "hidden must have shape"),
    (dict(hidden=torch.randn(7, 8)), ValueError, "with N = 6"),
    (dict(hidden=torch.randn(2, 3, 0), weight=torch.randn(11, 0)), ValueError, "hidden must have a last dimension H of at least 1"),
    (dict(weight=torch.randn(11, 8, dtype=torch.float64)), TypeError, "lm_head_weight .* must have the dtype of"),
    (dict(hidden=torch.randint(0, 3, (2, 3, 8))), TypeError, "hidden must be float32"),
    (dict(hidden=[1.0]), TypeError, "hidden must be a torch.Tensor"),
    (dict(backend="cuda"), ValueError, "backend='cuda' has no fused-linear sweep"),
    (dict(backend="tpu"), ValueError, "backend must be one of"),
    (dict(temperature=0.0), ValueError, "temperature must be > 0"),
    (dict(beta=0.1), ValueError, "ref_logprobs"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_bad_input_raises_clear_error(kwargs, error, match):
    with pytest.raises(error, match=match):
        _call(**kwargs)


def test_triton_backend_rejects_what_it_cannot_run(monkeypatch):
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        _call(hidden=torch.randn(2, 3, 8, dtype=torch.float64), weight=torch.randn(11, 8, dtype=torch.float64),
              backend="triton")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        _call(backend="triton")


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compilation for the GPUs (subprocess: the compiler cannot read interpreted kernels)
# ---------------------------------------------------------------------------------------------

# Shared memory a block may use: 163 KiB on sm_80 (A100), 227 KiB on sm_90 (H100).
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


def shipped_launches(N=8192, V=151936, H=4096):
    """(name, kernel, grid, args, meta) of every kernel variant we ship, at a production shape
    (torch.empty allocates no pages: the fp32 chunk costs nothing here)."""
    for dtype in triton_linear.SUPPORTED_DTYPES:
        cfg = triton_linear.default_config(N, V, H, dtype)
        n = cfg.chunk_rows
        x = torch.empty(n, V)
        dz = x.view(dtype)[:, :V] if dtype != torch.float32 else x
        bias, ids, row = torch.empty(V, dtype=dtype), torch.empty(n, dtype=torch.int64), torch.empty(n)
        name = str(dtype).removeprefix("torch.")
        active, temperature = torch.empty(n, dtype=torch.bool), torch.empty(n)
        # Masked rows and a per-token temperature (packed batches) beside the plain rows.
        for rows_name, act, temp in (("", None, 1.0), ("-masked-temprows", active, temperature)):
            for b in (None, bias):
                tag = f"{name}-bias{int(b is not None)}{rows_name}"
                for partial in (False, True):
                    yield (f"stats-{tag}-partial{int(partial)}",
                           *triton_linear.stats_launch(x, b, ids, temp, act, [row] * (4 if partial else 5), cfg,
                                                       partial=partial))
                for entropy in (False, True):
                    for out, place in ((dz, "inplace"), (torch.empty(n, V, dtype=dtype), "scratch")):
                        yield (f"dz-{tag}-entropy{int(entropy)}-{place}",
                               *triton_linear.dz_launch(x, out, b, ids, temp, act, row, row, row, row,
                                                        row if entropy else None, cfg))


def _print_aot_reports(arch: int) -> None:
    """Entry point of the subprocess: one JSON line per variant compiled for sm_<arch>."""
    import re

    from triton_aot import compile_launch, report

    for name, kernel, _grid, args, meta in shipped_launches():
        compiled = compile_launch(kernel, args, meta, arch)
        ptx = compiled.asm["ptx"]
        print(json.dumps({**report(name, compiled, arch), "shared_dynamic": compiled.metadata.shared,
                          "mma": len(re.findall(r"\b(?:wgmma\.mma_async|mma\.sync)", ptx)),
                          "st_global_16bit": len(re.findall(r"st\.global\.b16", ptx)),
                          "barriers": len(re.findall(r"\bbar\.sync|\bbarrier\.sync", ptx)),
                          "cp_async": len(re.findall(r"\bcp\.async", ptx))}), flush=True)


@pytest.fixture(scope="module")
def aot_reports():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    # One process per architecture, side by side: the compiles are single-threaded.
    procs = [subprocess.Popen([sys.executable, "-c", f"import test_linear; test_linear._print_aot_reports({arch})"],
                              cwd=TESTS, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for arch in (80, 90)]
    reports = []
    for proc in procs:
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-4000:]
        reports += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return reports


def test_kernels_compile_for_sm80_and_sm90(aot_reports):
    names = {name for name, *_ in shipped_launches()}
    assert {(r["kernel"], r["arch"]) for r in aot_reports} == {(n, a) for n in names for a in (80, 90)}
    for r in aot_reports:
        where = f"{r['kernel']} sm_{r['arch']}: {r}"
        assert r["stack"] == 0 and r["local"] == 0, "register spills in " + where
        assert r["shared"] + r["shared_dynamic"] <= SMEM_LIMIT[r["arch"]], "shared memory over the limit in " + where
        # The row kernels stream whole 16-byte vectors of the fp32 chunk.
        if r["kernel"].startswith(("stats", "dz")):
            assert r["ld_global_v4"] > 0, "no vector loads in " + where
        # In place, every block's reads are ordered before its writes by a barrier (triton.py): plain
        # loads, which bar.sync orders (asynchronous copies it would not).
        if r["kernel"].startswith("dz") and r["kernel"].endswith("inplace"):
            assert r["barriers"] > 0 and r["cp_async"] == 0, "unordered in-place reads and writes in " + where
