"""The claims of docs/math.md, checked on fresh random toys.

Part 1 imports the functions of docs/kl_demo.py (the script whose output the doc quotes)
and checks its identities in float64: which KL form's expected gradient, under samples
from pi_old, is the gradient of which KL; the mu = 1 identity; the rank-one closed forms.

Part 2 drives the shipped code (grpo_kernels.reference, and fused_grpo_loss) on the same
toys: every outcome of a token position (or of a short sequence) becomes one row of the
batch, weighted through the float completion mask by its probability under pi_old, with
advantage 0 so that only the KL term acts. The gradient w.r.t. the logits is then the
exact expectation of the shipped KL term's gradient.

Part 3 checks the per-token coefficients c_t = dL/dl_t that docs/math.md tabulates for
every loss type against autograd through reference.grpo_loss_from_logprobs.
"""
from __future__ import annotations

import importlib.util
import math
import re
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import grpo_kernels
from grpo_kernels import reference
from grpo_kernels.options import GRPOOptions

_DEMO_PATH = Path(__file__).resolve().parents[1] / "docs" / "kl_demo.py"
_spec = importlib.util.spec_from_file_location("kl_demo", _DEMO_PATH)
demo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(demo)

F64 = torch.float64
EXACT = 1e-10   # float64 identities: only rounding error separates the two sides
APART = 1e-6    # two gradients that the math says differ are at least this far apart

seeds = st.integers(0, 2**31 - 1)
vocab = st.integers(2, 9)
temperatures = st.sampled_from([1.0, 0.7, 1.6])


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ---- Part 1: the demo script's identities ------------------------------------------------

@given(seed=seeds, V=vocab, tau=temperatures)
def test_r_k3_and_r_k1_give_the_reverse_kl_gradient_off_policy(seed, V, tau):
    theta, old, ref = demo.toy_policies(V, seed, tau)
    rev = demo.reverse_kl_gradient(theta, ref, tau)
    fwd = demo.forward_kl_gradient(theta, ref, tau)
    assert maxdiff(demo.expected_gradient(theta, old, ref, "r*k3", tau), rev) < EXACT
    assert maxdiff(demo.expected_gradient(theta, old, ref, "r*k1", tau), rev) < EXACT
    # A detached weight restores the on-policy distribution but not the score term: forward KL.
    assert maxdiff(demo.expected_gradient(theta, old, ref, "sg(r)*k3", tau), fwd) < EXACT


@given(seed=seeds, V=vocab, tau=temperatures)
def test_plain_k3_is_neither_kl_off_policy(seed, V, tau):
    theta, old, ref = demo.toy_policies(V, seed, tau)
    k3 = demo.expected_gradient(theta, old, ref, "k3", tau)
    assert maxdiff(k3, demo.reverse_kl_gradient(theta, ref, tau)) > APART
    assert maxdiff(k3, demo.forward_kl_gradient(theta, ref, tau)) > APART
    # Plain k1 off-policy descends -KL(pi_old || pi_theta): it does not involve pi_ref at all.
    k1 = demo.expected_gradient(theta, old, ref, "k1", tau)
    assert maxdiff(k1, -demo.old_kl_gradient(theta, old, tau)) < EXACT


@given(seed=seeds, V=vocab, tau=temperatures)
def test_on_policy_k3_gives_the_forward_kl_and_k2_the_reverse(seed, V, tau):
    theta, old, ref = demo.toy_policies(V, seed, tau, off_policy=False)
    rev = demo.reverse_kl_gradient(theta, ref, tau)
    fwd = demo.forward_kl_gradient(theta, ref, tau)
    assert maxdiff(demo.expected_gradient(theta, old, ref, "k3", tau), fwd) < EXACT
    assert maxdiff(demo.expected_gradient(theta, old, ref, "k3", tau), rev) > APART
    assert maxdiff(demo.expected_gradient(theta, old, ref, "k2", tau), rev) < EXACT
    assert maxdiff(demo.expected_gradient(theta, old, ref, "r*k3", tau), rev) < EXACT
    assert demo.expected_gradient(theta, old, ref, "k1", tau).abs().max().item() < EXACT


@given(seed=seeds, V=vocab, tau=temperatures)
def test_r_k2_is_biased(seed, V, tau):
    theta, old, ref = demo.toy_policies(V, seed, tau)
    assert maxdiff(demo.expected_gradient(theta, old, ref, "r*k2", tau),
                   demo.reverse_kl_gradient(theta, ref, tau)) > APART


@given(seed=seeds, V=vocab, tau=temperatures, y=st.integers(0, 8),
       adv=st.sampled_from([1.3, -0.7, 0.0, 2.5e-3, -40.0]))
def test_mu1_exp_of_detached_log_ratio_is_the_log_prob_gradient(seed, V, tau, y, adv):
    theta, _, _ = demo.toy_policies(V, seed, tau)
    autograd, paper = demo.mu1_gradients(theta, y % V, adv, tau)
    assert maxdiff(autograd, paper) < EXACT * max(1.0, abs(adv))


@given(seed=seeds, V=vocab, tau=temperatures, y=st.integers(0, 8))
def test_rank_one_and_entropy_closed_forms(seed, V, tau, y):
    theta, _, _ = demo.toy_policies(V, seed, tau)
    err_l, err_h = demo.rank_one_check(theta * 3, y % V, tau)
    assert err_l < EXACT and err_h < EXACT


@given(seed=seeds, V=st.integers(2, 5), T=st.integers(2, 3), tau=temperatures)
def test_gspo_kl_weight_toy(seed, V, T, tau):
    theta, old, ref = demo.toy_sequence(T, V, seed, tau)
    on = torch.log_softmax(theta / tau, -1)
    rev, fwd = demo.sequence_kl_gradients(theta, ref, tau)
    mix = (1 - 1 / T) * fwd + rev / T
    for sampling in (on, old):  # the per-token ratio is unbiased on- and off-policy
        assert maxdiff(demo.sequence_expected_gradient(theta, sampling, ref, "token", tau), rev) < EXACT
    # TRL 1.16's sequence-shaped weight, on-policy: only 1/T of the correction survives.
    seq_on = demo.sequence_expected_gradient(theta, on, ref, "sequence", tau)
    assert maxdiff(seq_on, mix) < EXACT
    assert maxdiff(seq_on, rev) > APART
    assert maxdiff(demo.sequence_expected_gradient(theta, old, ref, "sequence", tau), rev) > APART


def _normalised(text: str) -> list[str]:
    """Lines of the demo output with rounding-level numbers (< 1e-12) and signed zeros made uniform."""
    def tiny(match):
        return "~0" if abs(float(match.group())) < 1e-12 else match.group()
    text = re.sub(r"[+-]?\d\.\de[+-]\d\d|(?<=\| )0(?= \|)", tiny, text).replace("-0.00000", "+0.00000")
    return [line.strip() for line in text.strip().splitlines() if line.strip() and not line.startswith("```")]


def test_doc_quotes_the_demo_output(capsys):
    demo.main()
    printed = capsys.readouterr().out
    doc = (_DEMO_PATH.parent / "math.md").read_text()
    start, end = doc.index("```text\nToy:"), doc.index("Reading the tables:")
    assert _normalised(doc[start:end]) == _normalised(printed)


# ---- Part 2: the shipped KL term on the same toys ----------------------------------------

def enumerate_position(theta, old, ref):
    """One row per outcome y of one position: (logits, ids, mask weight pi_old(y), old, ref)."""
    V = theta.shape[-1]
    logits = theta.expand(V, 1, V)  # stride 0 on the leading dims: one leaf, gradients summed
    ids = torch.arange(V).unsqueeze(1)
    return logits, ids, old.exp().unsqueeze(1), old.unsqueeze(1), ref.unsqueeze(1)


def enumerate_sequences(theta, old, ref):
    """One row per sequence y_1..y_T of independent positions, weighted by pi_old(y)."""
    T, V = theta.shape
    ids = torch.cartesian_prod(*[torch.arange(V)] * T).reshape(-1, T)
    pos = torch.arange(T)
    old_rows, ref_rows = old[pos, ids], ref[pos, ids]
    prob = old_rows.sum(-1, keepdim=True).exp().expand(-1, T)
    return theta.expand(len(ids), T, V), ids, prob, old_rows, ref_rows


def shipped_kl_gradient(fn, theta, logits_fn, old, ref, *, on_policy=False, **keywords):
    """sum over rows of pi_old(row) * grad_theta(the KL term of row), through `fn` (reference or fused).

    The mask carries pi_old(row) * K and num_items_in_batch = K: loss = sum_rows pi_old * kl.
    K keeps each row's mask sum >= 1 (the GSPO mean divides by max(sum m, 1)); it cancels.
    """
    th = theta.detach().clone().requires_grad_(True)
    if on_policy:  # the rows are weighted by pi_theta; the loss gets old_logprobs=None
        old = torch.log_softmax(theta / keywords.get("temperature", 1.0), -1)
    logits, ids, prob, old_rows, ref_rows = logits_fn(th, old, ref)
    K = 2.0 ** math.ceil(math.log2(1.0 / prob.min().item()))  # a power of two: exact in any float type
    B = ids.shape[0]
    loss, _ = fn(logits, ids, torch.zeros(B, dtype=F64), prob * K, None if on_policy else old_rows, ref_rows,
                 loss_type="dapo", beta=1.0, num_items_in_batch=K, **keywords)
    (grad,) = torch.autograd.grad(loss, th)
    return grad


def fused(backend, dtype=F64):
    def call(logits, *args, **keywords):
        return grpo_kernels.fused_grpo_loss(logits.to(dtype), *args, backend=backend, **keywords)
    return call


SHIPPED = [pytest.param(reference.grpo_loss, EXACT, id="reference"),
           pytest.param(fused("torch"), EXACT, id="fused-torch"),
           pytest.param(fused("triton", torch.float32), 1e-5, id="fused-triton")]  # fp32 only


@pytest.mark.parametrize("fn,tol", SHIPPED)
@given(seed=seeds, V=vocab, tau=temperatures)
def test_shipped_kl_term_expected_gradient(fn, tol, seed, V, tau):
    theta, old, ref = demo.toy_policies(V, seed, tau)
    rev = demo.reverse_kl_gradient(theta, ref, tau)
    scale = max(1.0, rev.abs().max().item())

    def shipped(estimator, corrected, on_policy=False):
        return shipped_kl_gradient(fn, theta, enumerate_position, old, ref, on_policy=on_policy, temperature=tau,
                                   kl_estimator=estimator, use_bias_correction_kl=corrected)

    # The default (k3 weighted by the differentiable r) is the reverse-KL gradient, off-policy.
    default = shipped("k3", True)
    assert maxdiff(default, rev) < tol * scale
    assert maxdiff(shipped("k1", True), rev) < tol * scale
    # Every (estimator, correction) pair matches the doc script's expectation of that form.
    for estimator in ("k1", "k2", "k3"):
        for corrected in (False, True):
            form = ("r*" if corrected else "") + estimator
            want = demo.expected_gradient(theta, old, ref, form, tau)
            assert maxdiff(shipped(estimator, corrected), want) < tol * scale, form
    # Without the weight, k3 is neither KL off-policy.
    assert maxdiff(shipped("k3", False), rev) > APART
    # On-policy (old_logprobs=None): corrected k3 is still the reverse KL, plain k3 the forward KL.
    assert maxdiff(shipped("k3", True, on_policy=True), rev) < tol * scale
    assert maxdiff(shipped("k3", False, on_policy=True), demo.forward_kl_gradient(theta, ref, tau)) < tol * scale


@given(seed=seeds, V=st.integers(2, 4), T=st.integers(2, 3), tau=temperatures)
def test_shipped_gspo_kl_weight(seed, V, T, tau):
    theta, old, ref = demo.toy_sequence(T, V, seed, tau)
    rev, fwd = demo.sequence_kl_gradients(theta, ref, tau)

    def shipped(kl_ratio, on_policy):
        return shipped_kl_gradient(reference.grpo_loss, theta, enumerate_sequences, old, ref, on_policy=on_policy,
                                   temperature=tau, importance_sampling_level="sequence", kl_ratio=kl_ratio)

    # Default under GSPO: the per-token r, unbiased for the reverse KL on- and off-policy.
    assert maxdiff(shipped("token", False), rev) < EXACT
    assert maxdiff(shipped("token", True), rev) < EXACT
    # kl_ratio="sequence" reproduces TRL 1.16 (issue 6586), the doc script's "sequence" weight.
    on = torch.log_softmax(theta / tau, -1)
    assert maxdiff(shipped("sequence", True), (1 - 1 / T) * fwd + rev / T) < EXACT
    assert maxdiff(shipped("sequence", True), demo.sequence_expected_gradient(theta, on, ref, "sequence", tau)) < EXACT
    assert maxdiff(shipped("sequence", False),
                   demo.sequence_expected_gradient(theta, old, ref, "sequence", tau)) < EXACT


# ---- Part 3: the table of c_t = dL/dl_t in docs/math.md -----------------------------------

def aggregation_weights(loss_type, mask, o):
    """omega_{i,t} = dL/d(per-token loss_{i,t}) for each loss type (docs/math.md)."""
    B, T = mask.shape
    if loss_type in ("grpo", "sapo"):
        return mask / (B * mask.sum(-1, keepdim=True).clamp(min=1.0))
    if loss_type == "bnpo":
        return mask / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        return mask / (B * (o.max_completion_length or T))
    if loss_type == "luspo":
        return mask / B
    n = mask.sum() if o.num_items_in_batch is None else torch.tensor(float(o.num_items_in_batch), dtype=F64)
    return mask / n.clamp(min=1.0)


def ratio_loss_derivative(loss_type, ratio, A, o):
    """d(per-token policy loss)/d(ratio) for the ratio-based losses f(ratio, A)."""
    if loss_type == "sapo":
        tau = torch.where(A > 0, torch.tensor(o.sapo_temperature_pos, dtype=F64),
                          torch.tensor(o.sapo_temperature_neg, dtype=F64))
        sig = torch.sigmoid(tau * (ratio - 1.0))
        return -4.0 * sig * (1.0 - sig) * A
    delta = math.inf if o.delta is None else o.delta
    cap = math.inf if o.dual_clip is None else o.dual_clip
    live = ((A > 0) & (ratio <= 1.0 + o.eps_high)) | ((A < 0) & (ratio >= 1.0 - o.epsilon_low) & (ratio <= delta)
                                                      & (ratio <= cap))
    return -A * live.to(F64)


def kl_value_and_slope(estimator, d):
    if estimator == "k1":
        return d, torch.ones_like(d)
    if estimator == "k2":
        return 0.5 * d * d, d
    return torch.exp(-d) - 1.0 + d, 1.0 - torch.exp(-d)


def vespo_phi(A, log_ratio, mask, is_ratio, o):
    """VESPO's detached weight: the sequence ratio (a sum of log-ratios, times the rollout ratio) through phi.
    A masked position is never read (docs/design.md, "Non-finite inputs"): its rollout ratio counts as 1."""
    floor = math.log(1e-8)
    is_ratio = torch.where(mask != 0, is_ratio, 1.0)
    log_w = (log_ratio.clamp(-20.0, 20.0) * mask).sum(-1, keepdim=True)
    log_w = (log_w + is_ratio.log().clamp(floor, 20.0).sum(-1, keepdim=True)).clamp(floor, 20.0)
    k = torch.where(A >= 0, torch.tensor(o.vespo_k_pos, dtype=F64), torch.tensor(o.vespo_k_neg, dtype=F64))
    lam = torch.where(A >= 0, torch.tensor(o.vespo_lambda_pos, dtype=F64), torch.tensor(o.vespo_lambda_neg, dtype=F64))
    return torch.exp(lam + k * log_w - lam * log_w.exp())


def closed_form_c(o, l, old, ref, A, mask, is_ratio):
    """c_{i,t} of docs/math.md, written from the doc's formulas (not from reference.py)."""
    omega = aggregation_weights(o.loss_type, mask, o)
    r = torch.exp(l - old)
    n_i = mask.sum(-1, keepdim=True).clamp(min=1.0)
    s = torch.exp(((l - old) * mask).sum(-1, keepdim=True) / n_i)
    sequence = o.importance_sampling_level == "sequence"
    w_pg = omega * is_ratio
    if o.loss_type == "cispo":
        c = -w_pg * torch.clamp(s if sequence else r, max=o.eps_high) * A
    elif o.loss_type == "vespo":
        c = -omega * vespo_phi(A, l - old, mask, is_ratio, o) * A  # the rollout ratio is inside phi
    elif sequence:  # d s_i / d l_t = s_i m_t / |o_i|: every token gets the sequence's sum
        c = (s * mask / n_i) * (w_pg * ratio_loss_derivative(o.loss_type, s, A, o)).sum(-1, keepdim=True)
    else:
        c = w_pg * r * ratio_loss_derivative(o.loss_type, r, A, o)
    if o.beta:
        d = l - ref
        k, slope = kl_value_and_slope(o.kl_estimator, d)
        if not o.use_bias_correction_kl:
            c = c + o.beta * omega * slope
        elif sequence and o.kl_ratio == "sequence":  # TRL 1.16: own term + the cross-token term of issue 6586
            c = c + o.beta * (omega * s * slope + (s * mask / n_i) * (omega * k).sum(-1, keepdim=True))
        else:  # d(r k)/dl = r (k + k')
            c = c + o.beta * omega * r * (k + slope)
    return c


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo", "vespo"])
@given(seed=seeds, level=st.sampled_from(["token", "sequence"]), estimator=st.sampled_from(["k1", "k2", "k3"]),
       corrected=st.booleans(), kl_ratio=st.sampled_from(["token", "sequence"]), extras=st.integers(0, 7))
def test_coefficient_table(loss_type, seed, level, estimator, corrected, kl_ratio, extras):
    if loss_type == "vespo":
        level = "token"
    B, T = 3, 5
    g = torch.Generator().manual_seed(seed)
    l = -torch.rand(B, T, generator=g, dtype=F64) * 3 - 0.05
    old = l + torch.randn(B, T, generator=g, dtype=F64) * 0.4  # ratios inside and outside the band
    ref = l + torch.randn(B, T, generator=g, dtype=F64)
    A = torch.randn(B, T if extras & 1 else 1, generator=g, dtype=F64)
    mask = (torch.rand(B, T, generator=g, dtype=F64) > 0.25).to(F64) * torch.rand(B, T, generator=g, dtype=F64) * 2
    mask[-1, 1:] = 0.0  # a short row
    is_ratio = torch.rand(B, T, generator=g, dtype=F64) + 0.5 if extras & 2 else None
    keywords = dict(loss_type=loss_type, importance_sampling_level=level, beta=0.3, kl_estimator=estimator,
                    use_bias_correction_kl=corrected, kl_ratio=kl_ratio, epsilon_low=0.2,
                    epsilon_high=5.0 if loss_type == "cispo" else 0.28, max_completion_length=7)
    if extras & 4 and loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
        keywords.update(delta=1.6, dual_clip=1.4)
    if loss_type in ("dapo", "cispo", "vespo") and extras & 1:
        keywords["num_items_in_batch"] = 9
    o = GRPOOptions(**keywords)
    lp = l.clone().requires_grad_(True)
    loss, _ = reference.grpo_loss_from_logprobs(lp, torch.zeros_like(l), A, mask, old, ref, is_ratio, None, o)
    (autograd_c,) = torch.autograd.grad(loss, lp)
    want = closed_form_c(o, l, old, ref, A.expand(B, T), mask, torch.ones_like(l) if is_ratio is None else is_ratio)
    assert maxdiff(autograd_c, want) < 1e-12
