"""The two-pass loss (sweep/two_pass.py) and the model's full output, against the float64 reference.

The two-pass path is opt-in (GRPO_KERNELS_TWO_PASS=1) until a GPU measures it; these tests switch
it on and check that it was taken. Under the interpreter a row is one program (its programs run one
after another and could not wait for each other): the split of a row over programs is checked by
the GPU run (bench/gpu_two_pass_probe.py) and compiled for sm_80/sm_90 by tests/triton_aot.py.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import grpo_kernels
from grpo_kernels import reference
from grpo_kernels.options import CLIPPED_LOSS_TYPES, GRPOOptions
from grpo_kernels.sweep import two_pass
from test_fused_loss import assert_close, check_against_reference


@pytest.fixture
def two_passes(monkeypatch):
    """Switch the two-pass path on; the list records each call that took it."""
    monkeypatch.setenv("GRPO_KERNELS_TWO_PASS", "1")
    calls = []
    real = two_pass.fused_loss

    def spy(*args):
        calls.append(args[1])  # row_start
        return real(*args)

    monkeypatch.setattr(two_pass, "fused_loss", spy)
    return calls


@st.composite
def token_local_options(draw):
    o = dict(loss_type=draw(st.sampled_from(CLIPPED_LOSS_TYPES)), beta=draw(st.sampled_from([0.0, 0.04])),
             epsilon_low=draw(st.sampled_from([0.2, 0.1])), epsilon_high=draw(st.sampled_from([None, 0.28])),
             temperature=draw(st.sampled_from([1.0, 0.7])), kl_estimator=draw(st.sampled_from(["k1", "k2", "k3"])),
             use_bias_correction_kl=draw(st.booleans()))
    if draw(st.booleans()):
        o["delta"] = 1.0 + (o["epsilon_high"] or o["epsilon_low"]) + draw(st.sampled_from([0.1, 2.0]))
    if draw(st.booleans()):
        o["dual_clip"] = draw(st.sampled_from([1.5, 3.0]))
    if draw(st.booleans()):
        o["entropy_coef"] = 0.01
    if draw(st.booleans()):
        o["max_completion_length"] = 8
    if draw(st.booleans()):
        o["num_items_in_batch"] = draw(st.sampled_from([3, 17.0]))
    return o


@given(o=token_local_options(), B=st.integers(1, 3), T=st.integers(1, 6), V=st.sampled_from([1, 5, 37, 130]),
       dtype=st.sampled_from([torch.float32, torch.float16]), seed=st.integers(0, 2**31 - 1),
       sliced=st.booleans(), mask_kind=st.sampled_from(["none", "bool", "float"]), per_token_adv=st.booleans(),
       off_policy=st.booleans(), with_is_ratio=st.booleans())
@settings(max_examples=30)
def test_two_pass_matches_float64_reference(o, B, T, V, dtype, seed, sliced, mask_kind, per_token_adv, off_policy,
                                            with_is_ratio):
    taken = []
    real = two_pass.fused_loss
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GRPO_KERNELS_TWO_PASS", "1")
        mp.setattr(two_pass, "fused_loss", lambda *a: taken.append(1) or real(*a))
        check_against_reference("triton", dtype, B, T, V, seed, o, sliced=sliced, mask_kind=mask_kind,
                                per_token_adv=per_token_adv, off_policy=off_policy, with_is_ratio=with_is_ratio)
    assert taken


def _scored(full, T):
    """The rows of a (B, L, V) output that predict the T tokens: [L-1-T, L-1) when L > T."""
    L = full.shape[1]
    return full[:, L - 1 - T:L - 1] if L > T else full


def _problem(B, T, L, V, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    full = (torch.randn(B, L, V, generator=g, dtype=torch.float64) * 2).to(dtype)
    ids = torch.randint(0, V, (B, T), generator=g)
    adv = torch.randn(B, generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[0, 0] = True
    lp = torch.log_softmax(_scored(full, T).double(), -1).gather(-1, ids[..., None])[..., 0]
    old = (lp + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    ref = (lp + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    return full, ids, adv, mask, old, ref


def _reference_grad(full, ids, adv, mask, old, ref, **kw):
    T = ids.shape[1]
    x = full.detach().double().requires_grad_()
    kw = {k: v for k, v in kw.items() if k not in ("backend", "grad_scale", "inplace_backward")}
    loss, metrics = reference.grpo_loss(_scored(x, T), ids, adv.double(), mask, old.double(), ref.double(),
                                        **kw)
    loss.backward()
    return loss.detach(), metrics, x.grad


@pytest.mark.parametrize("two", [False, True], ids=["three-pass", "two-pass"])
@pytest.mark.parametrize("extra", [1, 3], ids=["T+1", "T+3"])
@pytest.mark.parametrize("inplace", [False, True])
def test_full_model_output_gets_the_whole_gradient(monkeypatch, two, extra, inplace):
    """logits (B, L, V) with L > T: rows L-1-T .. L-2 are scored (TRL's logits_to_keep + 1), the
    gradient of the whole tensor is written by our kernels, zeros on the other rows, and autograd
    never copies it through a slice."""
    if two:
        monkeypatch.setenv("GRPO_KERNELS_TWO_PASS", "1")
    B, T, V = 2, 5, 41
    full, ids, adv, mask, old, ref = _problem(B, T, T + extra, V, seed=extra + 10 * inplace)
    kw = dict(beta=0.04, entropy_coef=0.01, temperature=0.8, backend="triton")
    want_loss, want_metrics, want_grad = _reference_grad(full, ids, adv, mask, old, ref, **kw)
    leaf = full.clone().requires_grad_()
    logits = leaf * 1.0  # a model output: not a leaf, so in place is allowed
    loss, metrics = grpo_kernels.fused_grpo_loss(logits, ids, adv, mask, old, ref, inplace_backward=inplace, **kw)
    names = []
    stack = [loss.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is not None:
            names.append(type(fn).__name__)
            stack.extend(f for f, _ in fn.next_functions)
    assert not any("Slice" in n or "AsStrided" in n or "Copy" in n for n in names), names
    loss.backward()
    assert abs(float(loss) - float(want_loss)) < 1e-5 * (1 + abs(float(want_loss)))
    assert_close(leaf.grad, want_grad, 1e-5, "gradient", atol=1e-8)
    scored = torch.zeros(T + extra, dtype=torch.bool)
    scored[extra - 1:T + extra - 1] = True
    assert torch.equal(leaf.grad[:, ~scored], torch.zeros_like(leaf.grad[:, ~scored]))
    assert_close(metrics["logprobs"].masked_fill(~mask, 0), want_metrics["logprobs"].masked_fill(~mask, 0), 1e-5,
                 "logprobs")


def test_full_output_of_the_wrong_batch_is_refused():
    full, ids, adv, *_ = _problem(2, 4, 6, 9, seed=0)
    with pytest.raises(ValueError, match="full output"):
        grpo_kernels.fused_grpo_loss(full[:1], ids, adv, backend="triton")
    with pytest.raises(ValueError, match="logits must have shape"):
        grpo_kernels.fused_grpo_loss(full[:, :3], ids, adv, backend="torch")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("entropy", [False, True])
def test_token_logprobs_on_the_full_output(backend, entropy):
    B, T, V = 3, 4, 33
    full, ids, *_ = _problem(B, T, T + 1, V, seed=5)
    full[0, -1] = float("nan")  # the unscored last row is never read
    want = torch.log_softmax(full[:, :-1].double(), -1)
    out = grpo_kernels.token_logprobs(full, ids, return_entropy=entropy, backend=backend)
    lp = out[0] if entropy else out
    assert_close(lp, want.gather(-1, ids[..., None])[..., 0], 1e-6, "logprobs")
    if entropy:
        assert_close(out[1], -(want.exp() * want).sum(-1), 1e-5, "entropy")
    x = full.clone().requires_grad_()
    lp = grpo_kernels.token_logprobs(x, ids, return_entropy=entropy, backend=backend)
    (lp[0] if entropy else lp).sum().backward()
    assert torch.equal(x.grad[:, -1], torch.zeros_like(x.grad[:, -1]))
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("grad_scale,upstream", [(1.0, 1.0), (0.25, 0.25), (0.25, 3.0), (1.0, 0.0)])
@pytest.mark.parametrize("inplace", [False, True])
def test_grad_scale_is_a_promise_never_a_change_of_value(two_passes, grad_scale, upstream, inplace):
    """The gradient is written in the forward times grad_scale; any upstream gradient gives upstream x dL/dz."""
    B, T, V = 2, 4, 23
    full, ids, adv, mask, old, ref = _problem(B, T, T + 1, V, seed=3)
    _, _, want = _reference_grad(full, ids, adv, mask, old, ref, beta=0.04)
    leaf = full.clone().requires_grad_()
    loss, _ = grpo_kernels.fused_grpo_loss(leaf * 1.0, ids, adv, mask, old, ref, beta=0.04, backend="triton",
                                           grad_scale=grad_scale, inplace_backward=inplace)
    (loss * upstream).backward()
    assert two_passes == [0]
    assert_close(leaf.grad, upstream * want, 1e-5, "gradient", atol=1e-9)


@pytest.mark.parametrize("bad", [0.0, float("inf"), float("nan"), "1", True])
def test_grad_scale_is_checked(bad):
    with pytest.raises((ValueError, TypeError), match="grad_scale"):
        GRPOOptions(grad_scale=bad)


def test_two_pass_packed_rows_with_per_token_temperature(two_passes):
    """Packed rows (N, V) with cu_seqlens and one temperature per token, equal to the torch backend."""
    g = torch.Generator().manual_seed(9)
    lengths = [3, 0, 5, 1]
    N, V = sum(lengths), 29
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)))
    logits = torch.randn(N, V, generator=g, dtype=torch.float64).float()
    ids = torch.randint(0, V, (N,), generator=g)
    adv = torch.randn(len(lengths), 1, generator=g)
    mask = torch.rand(N, generator=g) > 0.2
    logits[~mask] = float("nan")  # masked rows are never read
    temperature = torch.rand(N, generator=g) + 0.5
    old = torch.randn(N, generator=g) * 0.3 - 3.3
    ref = torch.randn(N, generator=g) * 0.3 - 3.3
    kw = dict(cu_seqlens=cu, beta=0.04, temperature=temperature, loss_type="grpo", entropy_coef=0.01)
    out = {}
    for backend in ("torch", "triton"):
        x = logits.clone().requires_grad_()
        loss, metrics = grpo_kernels.fused_grpo_loss(x, ids, adv, mask, old, ref, backend=backend, **kw)
        loss.backward()
        out[backend] = (loss.detach(), x.grad, metrics)
    assert two_passes
    assert abs(float(out["torch"][0]) - float(out["triton"][0])) < 1e-5
    assert_close(out["triton"][1], out["torch"][1], 1e-5, "gradient", atol=1e-9)
    assert torch.equal(out["triton"][1][~mask], torch.zeros_like(out["triton"][1][~mask]))
    for name in ("kl", "entropy", "clip_ratio_low", "clip_ratio_high", "clip_ratio_region"):
        assert abs(float(out["torch"][2][name]) - float(out["triton"][2][name])) < 1e-5, name


def test_two_pass_ignores_masked_positions_and_propagates_active_nans(two_passes):
    B, T, V = 2, 4, 17
    full, ids, adv, mask, old, ref = _problem(B, T, T, V, seed=4)
    mask[1, 2] = False
    old[1, 2] = float("nan")
    ref[1, 2] = float("inf")
    x = full.clone().requires_grad_()
    loss, _ = grpo_kernels.fused_grpo_loss(x, ids, adv, mask, old, ref, beta=0.04, backend="triton")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    old[0, 0] = float("nan")  # an active position: the loss is NaN, never a number
    loss, _ = grpo_kernels.fused_grpo_loss(full, ids, adv, mask, old, ref, beta=0.04, backend="triton")
    assert torch.isnan(loss)


def test_csrc_glue_under_the_same_plan(two_passes, monkeypatch):
    """backend="cuda" takes csrc's two-pass kernel under the same Plan: here its float64 contract
    (tests/two_pass_reference.py) stands in for the kernel, so what is checked is the glue (the
    arguments, the sums, the full-output gradient) against the float64 reference of the loss."""
    from two_pass_reference import two_pass_reference

    from grpo_kernels import ops
    from grpo_kernels.sweep import cuda

    def kernel(logits, *args, grad=None, **kw):
        got = two_pass_reference(logits, *args, **kw)
        grad.copy_(got[0])
        return (grad, *(t.float() for t in got[1:]))

    monkeypatch.setattr(cuda, "two_pass", kernel)
    monkeypatch.setattr(two_pass, "available", lambda backend, logits: backend in ("triton", "cuda"))
    monkeypatch.setattr(ops, "require", lambda name, device: None)
    monkeypatch.setattr(ops, "resolve_backend", lambda name, device: name)
    B, T, V = 3, 4, 19
    full, ids, adv, mask, old, ref = _problem(B, T, T + 1, V, seed=8)
    kw = dict(beta=0.04, entropy_coef=0.01, temperature=0.9, loss_type="grpo", delta=2.0)
    want_loss, want_metrics, want_grad = _reference_grad(full, ids, adv, mask, old, ref, **kw)
    leaf = full.clone().requires_grad_()
    loss, metrics = grpo_kernels.fused_grpo_loss(leaf, ids, adv, mask, old, ref, backend="cuda", **kw)
    loss.backward()
    assert two_passes == [0]
    assert abs(float(loss) - float(want_loss)) < 1e-5 * (1 + abs(float(want_loss)))
    assert_close(leaf.grad, want_grad, 1e-5, "gradient", atol=1e-9)
    for name in ("kl", "entropy", "clip_ratio_low", "clip_ratio_high", "clip_ratio_region"):
        assert abs(float(metrics[name]) - float(want_metrics[name])) < 1e-5, name
