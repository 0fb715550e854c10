"""Packed rows (logits (N, V) + cu_seqlens) against the padded layout and the float64 reference.

A packed call on S sequences must equal the padded call on the same sequences (B = S) in
value, metrics and gradient, for every option; rows whose mask is 0 are never read (they
hold NaN here), give log-prob and entropy 0 and a gradient row of exact zeros.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import grpo_kernels
from grpo_kernels import reference
from helpers import rel_err
from test_fused_loss import METRICS, loss_options

BACKENDS = ["torch", "triton"]


def packed_batch(lengths, V, seed, *, per_token_adv=False, with_is_ratio=False, temperature_rows=False,
                 dtype=torch.float32):
    """The same sequences packed (N rows) and padded (S, T), padding rows poisoned with NaN."""
    g = torch.Generator().manual_seed(seed)
    S, N, T = len(lengths), sum(lengths), max(max(lengths), 1)
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int32)
    logits = (torch.randn(N, V, generator=g, dtype=torch.float64) * 2).to(dtype)
    ids = torch.randint(0, V, (N,), generator=g)
    mask = (torch.rand(N, generator=g) > 0.25).float()  # prompt-like rows inside sequences too
    with torch.no_grad():
        l_now, _ = reference.token_logprobs(logits.double(), ids)
    old = (l_now + 0.5 * torch.randn(N, generator=g, dtype=torch.float64)).float()
    ref = (l_now + 0.5 * torch.randn(N, generator=g, dtype=torch.float64)).float()
    adv = torch.randn(N, generator=g) if per_token_adv else torch.randn(S, 1, generator=g)
    is_ratio = torch.rand(N, generator=g) * 2 if with_is_ratio else None
    temp = (0.5 + torch.rand(N, generator=g)) if temperature_rows else None
    logits[mask == 0] = float("nan")  # never read

    seq = torch.repeat_interleave(torch.arange(S), torch.tensor(lengths))
    pos = torch.arange(N) - cu[:-1].long()[seq]

    def pad(x, fill):
        out = torch.full((S, T) + tuple(x.shape[1:]), fill, dtype=x.dtype)
        out[seq, pos] = x
        return out

    packed = dict(logits=logits, ids=ids, adv=adv, mask=mask, old=old, ref=ref, is_ratio=is_ratio, temp=temp,
                  cu=cu)
    padded = dict(logits=pad(logits, float("nan")), ids=pad(ids, 0), adv=pad(adv, 0.0) if per_token_adv else adv[:, 0],
                  mask=pad(mask, 0.0), old=pad(old, 0.0), ref=pad(ref, 0.0),
                  is_ratio=None if is_ratio is None else pad(is_ratio, 1.0), temp=None if temp is None else pad(temp, 1.0),
                  cu=None)
    return packed, padded, (seq, pos)


def run(fn, batch, options, backend=None):
    x = batch["logits"].detach().clone().requires_grad_()
    kw = dict(options)
    if batch["temp"] is not None:
        kw["temperature"] = batch["temp"]
    if backend is not None:
        kw["backend"] = backend
    loss, metrics = fn(x, batch["ids"], batch["adv"], batch["mask"], batch["old"], batch["ref"],
                       rollout_is_ratio=batch["is_ratio"], cu_seqlens=batch["cu"], **kw)
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach(), metrics, grad


def as64(batch):
    out = dict(batch)
    for k in ("logits", "adv", "old", "ref", "is_ratio"):
        out[k] = None if batch[k] is None else batch[k].double()
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@given(o=loss_options(), lengths=st.lists(st.integers(0, 5), min_size=1, max_size=4), V=st.sampled_from([5, 37]),
       seed=st.integers(0, 2**31 - 1), per_token_adv=st.booleans(), with_is_ratio=st.booleans(),
       temperature_rows=st.booleans())
@settings(max_examples=15)
def test_packed_equals_padded_and_reference(backend, o, lengths, V, seed, per_token_adv, with_is_ratio,
                                            temperature_rows):
    if o["loss_type"] == "vespo" and with_is_ratio is False:
        with_is_ratio = False
    o = dict(o)
    o.pop("temperature", None)
    o["max_completion_length"] = max(max(lengths), 1)  # dr_grpo's normaliser: the padded T
    o.pop("num_items_in_batch", None)
    packed, padded, (seq, pos) = packed_batch(lengths, V, seed, per_token_adv=per_token_adv,
                                              with_is_ratio=with_is_ratio, temperature_rows=temperature_rows)
    loss_p, m_p, g_p = run(grpo_kernels.fused_grpo_loss, packed, o, backend)
    loss_d, m_d, g_d = run(grpo_kernels.fused_grpo_loss, padded, o, backend)
    want, m_w, g_w = run(reference.grpo_loss, as64(packed), o)

    # Rows with mask 0: never read (NaN there), gradient exactly 0, log-prob 0.
    off = packed["mask"] == 0
    assert torch.isfinite(g_p).all() and (g_p[off] == 0).all()
    assert (m_p["logprobs"][off] == 0).all()
    assert torch.isfinite(g_d).all() and (g_d[padded["mask"] == 0] == 0).all()

    assert abs(float(loss_p) - float(loss_d)) <= 1e-5 * (1 + abs(float(loss_d)))
    assert abs(float(loss_p) - float(want)) <= 1e-5 * (1 + abs(float(want)))
    scale = float(g_w.norm()) + 1e-6
    assert float((g_p.double() - g_d[seq, pos].double()).norm()) <= 1e-5 * scale
    assert float((g_p.double() - g_w).norm()) <= 1e-4 * scale
    assert torch.allclose(m_p["logprobs"], m_d["logprobs"][seq, pos])
    for name in METRICS:
        if m_w[name] is None:
            assert m_p[name] is None and m_d[name] is None
        else:
            for got in (m_p[name], m_d[name]):
                assert abs(float(got) - float(m_w[name])) <= 1e-4 * (1 + abs(float(m_w[name]))), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_token_logprobs_and_one_row_view(backend):
    packed, padded, (seq, pos) = packed_batch([3, 0, 1, 4], 17, 3, temperature_rows=True)
    lp, ent = grpo_kernels.token_logprobs(packed["logits"], packed["ids"], packed["temp"], True, packed["mask"],
                                          packed["cu"], backend=backend)
    want_l, want_h = reference.token_logprobs(torch.nan_to_num(packed["logits"].double()), packed["ids"],
                                              packed["temp"], packed["mask"] != 0)
    assert lp.shape == (8,) and rel_err(lp, want_l) < 1e-5 and rel_err(ent, want_h) < 1e-5
    # (1, N, V), as OpenRLHF and slime pack, and no cu_seqlens at all for the log-probs alone.
    lp3 = grpo_kernels.token_logprobs(packed["logits"].unsqueeze(0), packed["ids"], packed["temp"], False,
                                      packed["mask"], backend=backend)
    assert torch.equal(lp3, lp)


@pytest.mark.parametrize("backend", BACKENDS)
def test_num_sequences_in_batch_replaces_the_sequence_count(backend):
    packed, _, _ = packed_batch([2, 3, 1], 9, 4)
    for loss_type in ("grpo", "sapo", "luspo", "dr_grpo"):
        o = dict(loss_type=loss_type, max_completion_length=3)
        base, _, _ = run(grpo_kernels.fused_grpo_loss, packed, o, backend)
        scaled, _, _ = run(grpo_kernels.fused_grpo_loss, packed, dict(o, num_sequences_in_batch=12), backend)
        assert torch.allclose(scaled * 12, base * 3, rtol=1e-6), loss_type
        scaled_t, _, _ = run(grpo_kernels.fused_grpo_loss, packed,
                             dict(o, num_sequences_in_batch=torch.tensor(12.0)), backend)
        # (a tensor divisor runs loss.py on every backend, a number may run loss_triton.py: same value)
        assert torch.allclose(scaled_t, scaled, rtol=1e-6)


def test_fused_linear_packed_equals_padded():
    g = torch.Generator().manual_seed(8)
    lengths, H, V = [3, 1, 0, 2], 8, 13
    N, S = sum(lengths), len(lengths)
    cu = torch.tensor([0, 3, 4, 4, 6])
    hidden, weight = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g)
    ids, adv, mask = torch.randint(0, V, (N,), generator=g), torch.randn(S, generator=g), torch.rand(N, generator=g) > 0.2
    ref = torch.randn(N, generator=g) - 2
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    loss, _ = grpo_kernels.fused_linear_grpo_loss(h, w, ids, adv, mask, None, ref, beta=0.1, loss_type="grpo",
                                                  cu_seqlens=cu, backend="torch")
    loss.backward()
    logits = (hidden.double() @ weight.double().T).requires_grad_()
    want, _ = reference.grpo_loss(logits, ids, adv.double(), mask, None, ref.double(), beta=0.1, loss_type="grpo",
                                  cu_seqlens=cu)
    want.backward()
    assert abs(float(loss) - float(want)) < 1e-5 * abs(float(want))
    assert rel_err(w.grad, logits.grad.T @ hidden.double()) < 1e-5


# --- bad input ----------------------------------------------------------------------------------------


def _packed_call(**over):
    N, V = 6, 9
    args = dict(logits=torch.randn(N, V), completion_ids=torch.zeros(N, dtype=torch.long),
                advantages=torch.randn(2), cu_seqlens=torch.tensor([0, 4, 6]))
    args.update(over)
    return grpo_kernels.fused_grpo_loss(**args)


@pytest.mark.parametrize("over,error,words", [
    (dict(cu_seqlens=torch.tensor([1, 4, 6])), ValueError, "cu_seqlens"),
    (dict(cu_seqlens=torch.tensor([0, 5, 4, 6]), advantages=torch.randn(3)), ValueError, "cu_seqlens"),
    (dict(cu_seqlens=torch.tensor([0, 4, 5])), ValueError, "cu_seqlens"),
    (dict(cu_seqlens=torch.tensor([0.0, 4.0, 6.0])), TypeError, "cu_seqlens"),
    (dict(cu_seqlens=torch.tensor([0, 4, 6], device="meta")), ValueError, "cu_seqlens"),
    (dict(advantages=torch.randn(4)), ValueError, "advantages"),
    (dict(temperature=torch.tensor([1.0, 1, 0, 1, 1, 1])), ValueError, "temperature"),
    (dict(temperature=torch.tensor([1.0, 1, float("nan"), 1, 1, 1])), ValueError, "temperature"),
    (dict(temperature=torch.ones(5)), ValueError, "temperature"),
    (dict(completion_ids=torch.zeros(2, 3, dtype=torch.long)), ValueError, "completion_ids"),
    (dict(logits=torch.randn(7, 9)), ValueError, "logits"),
    (dict(loss_type="dr_grpo"), ValueError, "max_completion_length"),
])
def test_bad_packed_input_is_named(over, error, words):
    with pytest.raises(error, match=words):
        _packed_call(**over)


def test_bad_values_on_a_device_poison_the_loss_instead_of_waiting():
    """Where a check would need the device's values (CUDA, or under torch.compile), the loss is NaN."""
    from grpo_kernels import layout

    real = layout.eager_cpu
    try:
        layout.eager_cpu = lambda t: False  # as on a GPU: no host sync allowed
        loss, _ = _packed_call(cu_seqlens=torch.tensor([0, 5, 4]))
        assert torch.isnan(loss)
        loss, _ = _packed_call(temperature=torch.tensor([1.0, -1, 1, 1, 1, 1]))
        assert torch.isnan(loss)
        loss, _ = _packed_call()
        assert torch.isfinite(loss)
    finally:
        layout.eager_cpu = real


@pytest.mark.parametrize("backend", BACKENDS)
def test_sequence_level_clip_ratios_count_every_sequence_when_s_equals_n(backend):
    """GSPO's clip ratios with per-sequence advantages count once per sequence, empty ones included
    (TRL's masked_batch_mean of a (B, 1) tensor), also when the packed rows happen to number S: with
    lengths [0, 0, 0, 4] a per-sequence vector was once taken for a per-token one (0.333 for 0.25)."""
    o = dict(loss_type="grpo", importance_sampling_level="sequence", beta=0.0, max_completion_length=4)
    for seed in range(6):
        packed, padded, _ = packed_batch([0, 0, 0, 4], 5, seed)
        _, m_p, _ = run(grpo_kernels.fused_grpo_loss, packed, o, backend)
        _, m_d, _ = run(grpo_kernels.fused_grpo_loss, padded, o, backend)
        _, m_w, _ = run(reference.grpo_loss, as64(packed), o)
        for name in ("clip_ratio_low", "clip_ratio_high", "clip_ratio_region"):
            assert float(m_w[name]) * 4 == round(float(m_w[name]) * 4), (name, float(m_w[name]))  # k / S
            for got in (m_p[name], m_d[name]):
                assert abs(float(got) - float(m_w[name])) < 1e-6, (seed, name, float(got), float(m_w[name]))
