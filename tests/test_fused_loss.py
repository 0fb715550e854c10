"""fused_grpo_loss against the float64 reference, over every option, dtype and backend.

Each example draws fresh logits, ids, masks (with empty rows), advantages (negative and
zero too), old log-probs far enough from the current ones to leave the clip band, and a
combination of keywords; the reference runs in float64 on the same (rounded) values.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import grpo_kernels
from grpo_kernels import reference
from grpo_kernels.options import LOSS_TYPES, GRPOOptions
from helpers import fp32_grad_atol

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
METRICS = ("kl", "entropy", "clip_ratio_low", "clip_ratio_high", "clip_ratio_region")


@st.composite
def loss_options(draw):
    loss_type = draw(st.sampled_from(LOSS_TYPES))
    level = "token" if loss_type == "vespo" else draw(st.sampled_from(["token", "sequence"]))
    eps_low = draw(st.sampled_from([0.2, 0.1]))
    eps_high = draw(st.sampled_from([None, 0.28, 5.0 if loss_type == "cispo" else 0.3]))
    o = dict(loss_type=loss_type, importance_sampling_level=level, epsilon_low=eps_low, epsilon_high=eps_high,
             beta=draw(st.sampled_from([0.0, 0.04])), temperature=draw(st.sampled_from([1.0, 0.7])),
             kl_estimator=draw(st.sampled_from(["k1", "k2", "k3"])),
             use_bias_correction_kl=draw(st.booleans()), kl_ratio=draw(st.sampled_from(["token", "sequence"])))
    if draw(st.booleans()):
        o["delta"] = 1.0 + (eps_high if eps_high is not None else eps_low) + draw(st.sampled_from([0.1, 2.0]))
    if loss_type in ("grpo", "dapo") and draw(st.booleans()):
        o["dual_clip"] = draw(st.sampled_from([1.5, 3.0]))
    if draw(st.booleans()):
        o["entropy_coef"] = 0.01
    if draw(st.booleans()):
        o["top_entropy_quantile"] = draw(st.sampled_from([0.2, 0.5]))
    if draw(st.booleans()):
        o["off_policy_mask_threshold"] = draw(st.sampled_from([0.0, 0.5]))
    if draw(st.booleans()):
        o["max_completion_length"] = 8
    if draw(st.booleans()):
        o["num_items_in_batch"] = draw(st.sampled_from([3, 17.0]))
    return o


def make_inputs(B, T, V, dtype, seed, *, sliced, mask_kind, per_token_adv, off_policy, with_is_ratio):
    g = torch.Generator().manual_seed(seed)
    full = (torch.randn(B, T + 1, V, generator=g, dtype=torch.float64) * 2).to(dtype)
    logits = full[:, :-1] if sliced else full[:, 1:].contiguous()
    ids = torch.randint(0, V, (B, T), generator=g)
    adv = torch.randn(B, T, generator=g) if per_token_adv else torch.randn(B, generator=g)
    adv[0] = 0.0  # zero advantages must pass through
    mask = None
    if mask_kind != "none":
        mask = torch.rand(B, T, generator=g) > 0.3
        mask[-1] = False  # an empty row
        mask = mask if mask_kind == "bool" else mask.float() * torch.rand(B, T, generator=g) * 2
    with torch.no_grad():
        l_now, _ = reference.token_logprobs(logits.double(), ids)
    old = None
    if off_policy:  # spread 0.5 puts ratios on both sides of the clip band
        old = (l_now + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    ref = (l_now + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    is_ratio = torch.rand(B, T, generator=g) * 2 if with_is_ratio else None
    return logits, ids, adv, mask, old, ref, is_ratio


def assert_close(got, want, tol, what, atol=1e-9):
    got, want = got.double(), want.double()
    err = float((got - want).norm())
    assert err <= tol * float(want.norm()) + atol, f"{what}: error {err} vs norm {float(want.norm())}, atol {atol}"


def check_against_reference(backend, dtype, B, T, V, seed, o, *, sliced, mask_kind, per_token_adv, off_policy,
                            with_is_ratio):
    logits, ids, adv, mask, old, ref, is_ratio = make_inputs(
        B, T, V, dtype, seed, sliced=sliced, mask_kind=mask_kind, per_token_adv=per_token_adv,
        off_policy=off_policy, with_is_ratio=with_is_ratio)
    x = logits.detach().requires_grad_()
    loss, metrics = grpo_kernels.fused_grpo_loss(x, ids, adv, mask, old, ref, rollout_is_ratio=is_ratio,
                                                 backend=backend, **o)
    (grad,) = torch.autograd.grad(loss, x)

    x64 = logits.detach().double().requires_grad_()
    as64 = lambda t: None if t is None else t.double()  # noqa: E731
    want_loss, want_metrics = reference.grpo_loss(x64, ids, as64(adv), mask, as64(old), as64(ref),
                                                  rollout_is_ratio=as64(is_ratio), **o)
    (want_grad,) = torch.autograd.grad(want_loss, x64)
    # The reference's per-token coefficients c = dL/dlogprob, e = dL/dentropy size fp32's error.
    options = GRPOOptions(**o)
    lp, ent = reference.token_logprobs(x64.detach(), ids, options.temperature)
    lp.requires_grad_(), ent.requires_grad_()
    loss_again, _ = reference.grpo_loss_from_logprobs(lp, ent, as64(adv), mask, as64(old), as64(ref),
                                                      as64(is_ratio), None, options)
    c, e = torch.autograd.grad(loss_again, (lp, ent), allow_unused=True, create_graph=True)
    # fp32 log-probs carry an absolute error dl (about eps * max|z|, a cancellation); through
    # the loss it moves c by the Hessian-vector product dc = (dc/dl) dl, which is large
    # relative to c where c is small (a KL term with l ~ l_ref).
    dl = metrics["logprobs"].double() - lp.detach()
    dc = None
    if c is not None and c.requires_grad:
        (dc,) = torch.autograd.grad(c, lp, grad_outputs=dl, allow_unused=True)
    c, e = (None if t is None else t.detach() for t in (c, e))

    tol = TOL[dtype]
    assert grad.dtype == dtype and grad.shape == x.shape
    loss, want_loss = loss.detach(), want_loss.detach()
    assert abs(float(loss) - float(want_loss)) <= tol * (1 + abs(float(want_loss)))
    atol = 1e-9
    if dtype == torch.float16:  # gradients below fp16's normal range keep an absolute step of 2^-24
        atol += 2.0**-24 * grad.numel() ** 0.5
    if dtype == torch.float32:
        atol = fp32_grad_atol(logits, options.temperature, c, e)
        atol += 0.0 if dc is None else 2.0 * float(dc.norm()) / options.temperature  # ||onehot - p|| <= sqrt 2
    assert_close(grad, want_grad, tol, "gradient", atol)
    assert_close(metrics["logprobs"], want_metrics["logprobs"], 1e-5 if dtype == torch.float32 else 1e-4,
                 "logprobs")
    for name in METRICS:
        if want_metrics[name] is None:
            assert metrics[name] is None, name
        else:
            assert abs(float(metrics[name]) - float(want_metrics[name])) <= 1e-4 * (1 + abs(float(want_metrics[name]))), name


@pytest.mark.parametrize("backend", ["torch", "triton"])
@given(
    o=loss_options(),
    B=st.integers(1, 3),
    T=st.integers(1, 6),
    V=st.sampled_from([1, 5, 37, 130]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    seed=st.integers(0, 2**31 - 1),
    sliced=st.booleans(),
    mask_kind=st.sampled_from(["none", "bool", "float"]),
    per_token_adv=st.booleans(),
    off_policy=st.booleans(),
    with_is_ratio=st.booleans(),
)
@settings(max_examples=60)
def test_fused_matches_float64_reference(backend, o, B, T, V, dtype, seed, sliced, mask_kind, per_token_adv,
                                         off_policy, with_is_ratio):
    check_against_reference(backend, dtype, B, T, V, seed, o, sliced=sliced, mask_kind=mask_kind,
                            per_token_adv=per_token_adv, off_policy=off_policy, with_is_ratio=with_is_ratio)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_every_loss_type_fp32_triton(loss_type):
    """Each loss type at least once on the Triton path, off-policy, with the KL on."""
    check_against_reference("triton", torch.float32, 3, 5, 64, 1234, dict(loss_type=loss_type, beta=0.04),
                            sliced=True, mask_kind="bool", per_token_adv=False, off_policy=True, with_is_ratio=True)


def test_reference_gradcheck():
    """The oracle's own gradient, by finite differences in float64."""
    g = torch.Generator().manual_seed(0)
    B, T, V = 2, 3, 5
    x = torch.randn(B, T, V, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, V, (B, T), generator=g)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    old = torch.randn(B, T, generator=g, dtype=torch.float64) * 0.1 - 1.6
    ref = torch.randn(B, T, generator=g, dtype=torch.float64) - 1.6
    # cispo and vespo weight with a stop-gradient, which finite differences cannot see.
    for loss_type in ("sapo", "grpo", "luspo"):
        fn = lambda x: reference.grpo_loss(x, ids, adv, None, old, ref, loss_type=loss_type, beta=0.1,  # noqa: E731
                                           entropy_coef=0.05, epsilon_low=0.9, epsilon_high=5.0)[0]
        assert torch.autograd.gradcheck(fn, (x,))


def test_fused_torch_path_gradcheck():
    """The fused path's hand-written backward, by finite differences (float64 on the torch path)."""
    g = torch.Generator().manual_seed(1)
    B, T, V = 2, 3, 6
    x = torch.randn(B, T + 1, V, generator=g, dtype=torch.float64)[:, :-1].detach().requires_grad_()
    ids = torch.randint(0, V, (B, T), generator=g)
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    # Explicit old log-probs: with None the ratio is exp(l - sg(l)), constant in value, and
    # finite differences cannot see the gradient the stop-gradient defines.
    old = torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3 - 1.8
    ref = torch.randn(B, T, generator=g, dtype=torch.float64) - 1.8
    fn = lambda x: grpo_kernels.fused_grpo_loss(x, ids, adv, None, old, ref, loss_type="sapo", beta=0.2,  # noqa: E731
                                                 entropy_coef=0.05, temperature=0.8, backend="torch")[0]
    assert torch.autograd.gradcheck(fn, (x,))


def test_fused_triton_directional_derivative():
    """Central differences of the Triton path's loss along a random direction, in fp32."""
    g = torch.Generator().manual_seed(2)
    B, T, V = 2, 4, 50
    x = torch.randn(B, T, V, generator=g)
    ids = torch.randint(0, V, (B, T), generator=g)
    adv = torch.randn(B, generator=g)
    old = torch.randn(B, T, generator=g) * 0.3 - 3.9
    ref = torch.randn(B, T, generator=g) - 3.9
    kw = dict(loss_type="sapo", beta=0.1, entropy_coef=0.05, temperature=0.9, backend="triton")
    xg = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(grpo_kernels.fused_grpo_loss(xg, ids, adv, None, old, ref, **kw)[0], xg)
    d = torch.randn(B, T, V, generator=g)
    h = 1e-2
    f = lambda y: float(grpo_kernels.fused_grpo_loss(y, ids, adv, None, old, ref, **kw)[0])  # noqa: E731
    numeric = (f(x + h * d) - f(x - h * d)) / (2 * h)
    analytic = float((grad * d).sum())
    assert abs(numeric - analytic) <= 2e-3 * (abs(analytic) + 1e-3)


def test_kl_ratio_default_is_per_token_under_gspo():
    """Under GSPO the KL weight is the per-token ratio unless TRL's sequence form is asked for."""
    g = torch.Generator().manual_seed(3)
    B, T, V = 2, 4, 9
    x = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    ids = torch.randint(0, V, (B, T), generator=g)
    l_now, _ = reference.token_logprobs(x, ids)
    old = l_now + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    ref = l_now - 0.5
    kw = dict(loss_type="grpo", beta=1.0, importance_sampling_level="sequence")
    zero_adv = torch.zeros(B, dtype=torch.float64)
    _, m_tok = reference.grpo_loss(x, ids, zero_adv, None, old, ref, **kw)
    _, m_seq = reference.grpo_loss(x, ids, zero_adv, None, old, ref, kl_ratio="sequence", **kw)
    k3 = torch.exp(ref - l_now) - 1 + (l_now - ref)
    r_tok = torch.exp(l_now - old)
    r_seq = torch.exp((l_now - old).mean(-1, keepdim=True))
    assert torch.allclose(m_tok["kl"], (r_tok * k3).mean())
    assert torch.allclose(m_seq["kl"], (r_seq * k3).mean())
