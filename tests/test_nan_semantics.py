"""Non-finite inputs, one semantics on every backend (docs/design.md, "Non-finite inputs"; issue 18).

- A masked position (mask 0) is never read: NaN or inf there in old/ref log-probs, advantages,
  rollout weights, sampler log-probs or the logits changes nothing (loss, metrics, gradient).
- A NaN or inf at an active position in an input the options read (a NaN mask weight is active)
  makes the loss NaN, never a finite number, and the gradient of that token's row NaN on every
  backend; the other rows' gradient is what each formula gives (non-finite too where the token
  reaches them: its sequence's GSPO ratio, a NaN normaliser), equal wherever two backends both
  give a finite number. Masked rows' gradient is 0.
- A -inf target logit at an active row: a NaN loss.

Each backend (the float64 reference, the torch and Triton logits paths, the fused-linear paths)
is held to it on the same inputs, and their metrics agree with the reference's, NaN for NaN.
"""
from __future__ import annotations

import pytest
import torch

import grpo_kernels
from grpo_kernels import reference

B, T, V, H = 2, 5, 7, 6
NAN, INF = float("nan"), float("inf")
BACKENDS = ("reference", "torch", "triton", "linear-torch", "linear-triton")
# Options that reach each path: the Triton loss kernels (token and sequence level, delta, dual clip,
# KL), and loss.py on every backend (VESPO's sequence weight, verl's geo_mean, the off-policy mask).
OPTION_SETS = {
    "dapo_kl": dict(beta=0.04),
    "gspo_delta_dual": dict(loss_type="grpo", importance_sampling_level="sequence", beta=0.04, delta=2.0,
                            dual_clip=3.0, epsilon_high=0.28),
    "vespo": dict(loss_type="vespo"),
    "geo_mean": dict(loss_type="geo_mean", beta=0.04, kl_estimator="k2"),
    "off_policy": dict(loss_type="bnpo", off_policy_mask_threshold=0.3, entropy_coef=0.01),
}


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) / 2
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T)
    mask[0, 3:] = 0.0
    mask[1, 0] = 0.0
    old = torch.randn(B, T, generator=g) * 0.3 - 2.0
    return dict(hidden=hidden, weight=weight, ids=ids, adv=torch.randn(B, T, generator=g), mask=mask, old=old,
                ref=old + 0.2 * torch.randn(B, T, generator=g), rollout=torch.rand(B, T, generator=g) + 0.5,
                sampling=old + 0.2 * torch.randn(B, T, generator=g))


ACTIVE = inputs()["mask"] != 0


def run(backend, x, **options):
    """(loss, metrics, the gradient of the rows: dL/dlogits, or dL/dhidden on the fused-linear paths)."""
    linear = backend.startswith("linear")
    leaf = x["hidden"].clone().requires_grad_()
    args = (x["ids"], x["adv"], x["mask"], x["old"], x["ref"])
    kw = dict(rollout_is_ratio=x["rollout"], sampling_logprobs=x["sampling"], **options)
    if linear:
        loss, metrics = grpo_kernels.fused_linear_grpo_loss(leaf, x["weight"], *args, backend=backend[7:], **kw)
    else:
        logits = x["logits"].clone().requires_grad_() if "logits" in x else None
        if logits is None:
            logits = (leaf @ x["weight"].T).detach().requires_grad_()
        if backend == "reference":
            loss, metrics = reference.grpo_loss(logits.double(), *args, **kw)
        else:
            loss, metrics = grpo_kernels.fused_grpo_loss(logits, *args, backend=backend, **kw)
        leaf = logits
    loss.backward()
    return loss.detach(), metrics, leaf.grad


def same_metrics(got, want):
    for name, value in want.items():
        if name == "logprobs" or value is None:
            continue
        torch.testing.assert_close(got[name].double(), value.double(), rtol=1e-4, atol=1e-5, equal_nan=True,
                                   msg=lambda m: f"metric {name}: {m}")


@pytest.mark.parametrize("options", sorted(OPTION_SETS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_positions_are_never_read(backend, options):
    """NaN and +-inf at every masked position of every per-token input: the same loss, metrics and
    gradient as clean inputs, and the reference's values."""
    kw = OPTION_SETS[options]
    clean = inputs()
    dirty = {k: v.clone() for k, v in clean.items()}
    masked = ~ACTIVE
    for name, value in (("old", NAN), ("ref", -INF), ("adv", NAN), ("rollout", INF), ("sampling", NAN)):
        dirty[name][masked] = value
    if backend != "linear-triton":  # (its backward reads masked hidden rows: the test below)
        dirty["hidden"][masked] = NAN  # the logits of a masked row too
    want_loss, want_metrics, want_grad = run(backend, clean, **kw)
    got_loss, got_metrics, got_grad = run(backend, dirty, **kw)
    assert torch.isfinite(want_loss)
    torch.testing.assert_close(got_loss, want_loss)
    same_metrics(got_metrics, want_metrics)
    torch.testing.assert_close(got_grad[ACTIVE], want_grad[ACTIVE])
    assert (got_grad[~ACTIVE] == 0).all()
    if backend != "reference":
        ref_loss, ref_metrics, _ = run("reference", clean, **kw)
        torch.testing.assert_close(got_loss.double(), ref_loss, rtol=1e-4, atol=1e-5)


def assert_nan_with_nan_gradient(backend, x, kw, rows):
    """The loss is NaN, the gradient NaN on `rows` (a bool (B, T) or an index), 0 on masked rows and,
    NaN for NaN, the reference's elsewhere; the metrics are the reference's, NaN for NaN."""
    loss, metrics, grad = run(backend, x, **kw)
    assert torch.isnan(loss), f"{backend}: loss {loss.item()} from a non-finite input"
    assert torch.isnan(grad[rows]).all(), f"{backend}: a finite gradient for a non-finite input"
    assert (grad[~ACTIVE] == 0).all()
    if backend != "reference":
        _, want_metrics, want = run("reference", x, **kw)
        # Elsewhere each formula propagates as it does (a clipped token's zero derivative times a
        # NaN normaliser is 0 in torch.minimum's backward, NaN in the kernels): equal where both are finite.
        if not backend.startswith("linear"):  # (the reference's rows are logits, not hidden states)
            finite = torch.isfinite(want) & torch.isfinite(grad)
            torch.testing.assert_close(grad[finite], want[finite].to(grad.dtype), rtol=1e-4, atol=1e-6)
        same_metrics(metrics, want_metrics)
    return metrics


# (input, the options that read it)
READ_BY = {"old": {}, "adv": {}, "ref": dict(beta=0.04), "rollout": {}, "sampling": dict(off_policy_mask_threshold=0.3),
           "mask": {}}


@pytest.mark.parametrize("value", [NAN, INF, -INF], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("name", sorted(READ_BY))
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_non_finite_input_at_an_active_position_makes_the_loss_nan(backend, name, value):
    """One NaN or inf at one active position (-inf old log-probs included: the clip would otherwise
    make it a finite number; a NaN mask weight included): a NaN loss, a NaN gradient, and the
    metrics of the reference, NaN for NaN."""
    for kw in (READ_BY[name], {**READ_BY[name], "loss_type": "grpo", "importance_sampling_level": "sequence"}):
        x = inputs(1)
        x[name][1, 2] = value
        assert_nan_with_nan_gradient(backend, x, kw, (1, 2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_old_logprobs_nan_give_a_nan_loss(backend):
    """Issue 18's case: old_logprobs all NaN gave 0.542 with the Triton kernels."""
    x = inputs(2)
    x["old"].fill_(NAN)
    assert_nan_with_nan_gradient(backend, x, dict(beta=0.04), ACTIVE)


@pytest.mark.parametrize("options", ["dapo_kl", "gspo_delta_dual", "vespo"])
@pytest.mark.parametrize("backend", ("reference", "torch", "triton"))
def test_a_minus_inf_target_logit_gives_a_nan_loss(backend, options):
    x = inputs(3)
    logits = x["hidden"] @ x["weight"].T
    logits[0, 1, x["ids"][0, 1]] = -INF
    x["logits"] = logits
    assert_nan_with_nan_gradient(backend, x, OPTION_SETS[options], (0, 1))


@pytest.mark.parametrize("backend", ("torch", "triton"))
def test_per_sequence_advantage_nan_of_a_fully_masked_sequence_is_not_read(backend):
    x = inputs(4)
    x["mask"][0] = 0.0
    active = x["mask"] != 0
    adv = torch.randn(B)
    logits = (x["hidden"] @ x["weight"].T)
    clean = grpo_kernels.fused_grpo_loss(logits, x["ids"], adv, x["mask"], x["old"], backend=backend)[0]
    adv[0] = NAN
    dirty = grpo_kernels.fused_grpo_loss(logits, x["ids"], adv, x["mask"], x["old"], backend=backend)[0]
    assert active.any() and torch.isfinite(clean)
    torch.testing.assert_close(dirty, clean)


def test_linear_triton_never_reads_masked_hidden_rows():
    """NaN hidden states on masked rows reach no gradient (the cuBLAS-chunk engine reads active rows only)."""
    clean = inputs()
    dirty = {k: v.clone() for k, v in clean.items()}
    dirty["hidden"][~ACTIVE] = NAN
    want_loss, _, want_grad = run("linear-triton", clean)
    got_loss, _, got_grad = run("linear-triton", dirty)
    torch.testing.assert_close(got_loss, want_loss)
    torch.testing.assert_close(got_grad[ACTIVE], want_grad[ACTIVE])
    assert (got_grad[~ACTIVE] == 0).all()
