"""loss_triton.py (the loss in two Triton kernels) against loss.py, option by option.

The fast path runs for the clipped family at token and sequence level on the Triton backend; these tests
hold its value, every metric and the gradient to the PyTorch loss layer on the same sweep
outputs, and check that every other option falls back to loss.py.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import grpo_kernels
from grpo_kernels import loss_triton, reference
from grpo_kernels.layout import build_tokens
from grpo_kernels.options import GRPOOptions
from helpers import rel_err

METRICS = ("kl", "entropy", "clip_ratio_low", "clip_ratio_high", "clip_ratio_region")


@st.composite
def fast_options(draw):
    o = dict(loss_type=draw(st.sampled_from(loss_triton.LOSS_TYPES)), beta=draw(st.sampled_from([0.0, 0.04, 0.5])),
             epsilon_low=draw(st.sampled_from([0.2, 0.1])), epsilon_high=draw(st.sampled_from([None, 0.28])),
             kl_estimator=draw(st.sampled_from(["k1", "k2", "k3"])), use_bias_correction_kl=draw(st.booleans()),
             temperature=draw(st.sampled_from([1.0, 0.7])),
             importance_sampling_level=draw(st.sampled_from(["token", "sequence"])))
    if draw(st.booleans()):
        o["delta"] = 1.5 + draw(st.sampled_from([0.0, 1.0]))
    if draw(st.booleans()):
        o["dual_clip"] = draw(st.sampled_from([1.5, 3.0]))
    if draw(st.booleans()):
        o["entropy_coef"] = 0.05
    if o["loss_type"] == "dapo" and draw(st.booleans()):
        o["num_items_in_batch"] = draw(st.sampled_from([5.0, torch.tensor(9.0)]))
    if o["loss_type"] == "dr_grpo":
        o["max_completion_length"] = draw(st.sampled_from([None, 8]))
    if o["loss_type"] in ("grpo", "dr_grpo", "luspo") and draw(st.booleans()):
        o["num_sequences_in_batch"] = 7
    return o


def _run(backend, x, ids, adv, mask, old, ref, is_ratio, o):
    xx = x.clone().requires_grad_()
    loss, metrics = grpo_kernels.fused_grpo_loss(xx, ids, adv, mask, old, ref, rollout_is_ratio=is_ratio,
                                                 backend=backend, **o)
    (grad,) = torch.autograd.grad(loss, xx)
    return loss.detach(), metrics, grad


@given(o=fast_options(), B=st.integers(1, 3), T=st.integers(1, 7), V=st.sampled_from([3, 40]),
       seed=st.integers(0, 2**31 - 1), mask_kind=st.sampled_from(["none", "bool", "float"]),
       per_token_adv=st.booleans(), off_policy=st.booleans(), with_is_ratio=st.booleans())
@settings(max_examples=40)
def test_fast_path_equals_the_loss_layer(o, B, T, V, seed, mask_kind, per_token_adv, off_policy, with_is_ratio):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, V, generator=g) * 2
    ids = torch.randint(0, V, (B, T), generator=g)
    adv = torch.randn(B, T, generator=g) if per_token_adv else torch.randn(B, generator=g)
    mask = None
    if mask_kind != "none":
        mask = torch.rand(B, T, generator=g) > 0.3
        mask = mask if mask_kind == "bool" else mask.float() * torch.rand(B, T, generator=g) * 2
    l_now = reference.token_logprobs(x.double(), ids)[0]
    old = (l_now + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)).float() if off_policy else None
    ref = (l_now + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    is_ratio = torch.rand(B, T, generator=g) * 2 if with_is_ratio else None
    tokens = build_tokens(ids, adv, mask, old, ref, is_ratio, None, None, GRPOOptions(**o), logits=x)
    assert loss_triton.supports(GRPOOptions(**o), tokens, "triton", None)

    loss, metrics, grad = _run("triton", x, ids, adv, mask, old, ref, is_ratio, o)
    want, want_metrics, want_grad = _run("torch", x, ids, adv, mask, old, ref, is_ratio, o)
    assert abs(float(loss) - float(want)) <= 1e-5 * (1 + abs(float(want)))
    assert rel_err(grad, want_grad) <= 1e-5 or float((grad - want_grad).norm()) < 1e-7
    for name in METRICS:
        if want_metrics[name] is None:
            assert metrics[name] is None
        else:
            assert abs(float(metrics[name]) - float(want_metrics[name])) <= 1e-5 * (1 + abs(float(want_metrics[name])))
    assert torch.allclose(metrics["logprobs"], want_metrics["logprobs"], atol=1e-6)


@pytest.mark.parametrize("keywords", [dict(loss_type="sapo"), dict(importance_sampling_level="sequence_token"),
                                      dict(importance_sampling_level="sequence", beta=0.1, kl_ratio="sequence"),
                                      dict(top_entropy_quantile=0.5), dict(off_policy_mask_threshold=0.1),
                                      dict(loss_agg_mode="token-mean"), dict(kl_clamp=10.0),
                                      dict(vllm_importance_sampling_mode="token_truncate"),
                                      dict(loss_type="dr_grpo", num_sequences_in_batch=torch.tensor(3.0))])
def test_everything_else_runs_the_loss_layer(keywords):
    x, ids, adv = torch.randn(2, 3, 9), torch.zeros(2, 3, dtype=torch.long), torch.randn(2)
    o = GRPOOptions(**keywords)
    tokens = build_tokens(ids, adv, None, None, torch.randn(2, 3) - 2, torch.ones(2, 3), None, None, o, logits=x)
    assert not loss_triton.supports(o, tokens, "triton", None)
    assert not loss_triton.supports(GRPOOptions(), tokens, "torch", None)
