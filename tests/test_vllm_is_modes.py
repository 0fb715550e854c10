"""TRL 1.16's vLLM importance-sampling modes (vllm_importance_sampling_mode, _clip_max, _clip_min).

TRL turns the sampler's log-probs into `importance_sampling_ratio` in
`_generate_and_score_completions`, then `_compute_loss` multiplies by it. The oracle runs both of
TRL's own code paths: the ratio block (trl_oracle.trl_vllm_importance_sampling_ratio, TRL's source)
and `_compute_loss` (trl_oracle.trl_compute_loss). Ours gets the raw sampler ratio
rollout_is_ratio = exp(l_old - l_sampler) and the mode, and must give TRL's loss, gradient and
metrics in float64 to 1e-10.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_trl_parity import CLIP_METRICS, LOSS_LEVELS, METRICS, SAPO_TAUS, make_inputs, rel_err, run_ours
from trl_oracle import trl_compute_loss, trl_vllm_importance_sampling_ratio

import grpo_kernels
from grpo_kernels.options import VLLM_IS_MODES, GRPOOptions
from grpo_kernels.reference import grpo_loss

# (clip_min, clip_max) pairs: TRL's default (None, 3.0), both bounds, and only a floor.
CLIPS = [(None, 3.0), (0.5, 1.5), (0.8, None)]


def with_sampler(inputs: dict, seed: int, spread: float = 0.4) -> torch.Tensor:
    """Sampler log-probs ~spread nats from the old ones, a NaN where vLLM could not score a token."""
    g = torch.Generator().manual_seed(seed)
    old = inputs["old_logprobs"]
    sampling = old + spread * torch.randn(old.shape, generator=g, dtype=torch.float64)
    sampling[0, -1] = float("nan")
    return sampling


@pytest.mark.parametrize("mode", VLLM_IS_MODES)
@pytest.mark.parametrize("clips", CLIPS, ids=lambda c: f"min{c[0]}-max{c[1]}")
@given(seed=st.integers(0, 2**31 - 1), loss_level=st.sampled_from(LOSS_LEVELS), float_mask=st.booleans(),
       beta=st.sampled_from([0.0, 0.04]))
@settings(max_examples=4)
def test_vllm_modes_match_trl(mode, clips, seed, loss_level, float_mask, beta):
    """Every mode x clip bounds, random loss types and levels: reference and torch backend against TRL."""
    loss_type, level = loss_level
    clip_min, clip_max = clips
    if mode.endswith("_truncate") and clip_min is None and clip_max is None:
        return
    if loss_type == "vespo" and mode.startswith("sequence"):
        loss_type = "dapo"  # TRL refuses VESPO with a sequence mode, as we do
    inputs = make_inputs(seed, float_mask=float_mask, ref=beta != 0.0)
    sampling = with_sampler(inputs, seed)
    trl_ratio = trl_vllm_importance_sampling_ratio(inputs["old_logprobs"], sampling, inputs["completion_mask"], mode,
                                                   clip_max=clip_max, clip_min=clip_min)
    kw = dict(loss_type=loss_type, importance_sampling_level=level, beta=beta, **SAPO_TAUS)
    ours = dict(vllm_importance_sampling_mode=mode, vllm_importance_sampling_clip_min=clip_min,
                vllm_importance_sampling_clip_max=clip_max)
    assert_matches_trl(inputs, trl_ratio, torch.exp(inputs["old_logprobs"] - sampling), kw, ours)


def assert_matches_trl(inputs: dict, trl_ratio: torch.Tensor, raw_ratio: torch.Tensor, kw: dict, ours: dict) -> None:
    """TRL (given TRL's ratio) against our reference and torch backend (given the raw ratio and the mode)."""
    logits = inputs["logits"].detach().double().requires_grad_()
    trl_loss, trl_metrics = trl_compute_loss(**dict(inputs, logits=logits), rollout_is_ratio=trl_ratio, **kw)
    (trl_grad,) = torch.autograd.grad(trl_loss, logits)
    ours_kw = dict(kw, **ours)
    if kw.get("importance_sampling_level") == "sequence":
        ours_kw["kl_ratio"] = "sequence"  # TRL 1.16's GSPO KL weight (TRL issue 6586)
    for fn in (grpo_loss, lambda *a, **k: grpo_kernels.fused_grpo_loss(*a, backend="torch", **k)):
        loss, metrics, grad = run_ours(fn, dict(inputs, rollout_is_ratio=raw_ratio), **ours_kw)
        assert rel_err(loss, trl_loss) <= 1e-10, f"loss {loss.item()!r} vs TRL {trl_loss.item()!r}"
        assert rel_err(grad, trl_grad) <= 1e-10, f"grad rel err {rel_err(grad, trl_grad):.3g}"
        for name in METRICS:
            got, want = metrics[name], trl_metrics[name]
            assert (got is None) == (want is None), name
            if want is not None:
                limit = 1e-6 if name in CLIP_METRICS else 1e-10 * max(abs(want), 1.0)
                assert abs(float(got) - want) <= limit, f"{name}: ours {float(got)!r}, TRL {want!r}"


def test_oracle_block_is_trls_and_runs():
    """The oracle's ratio: TRL's formula, written out, for each mode (the block is TRL's source, run as is)."""
    inputs = make_inputs(3, B=3, T=4, V=7)
    mask = inputs["completion_mask"]
    sampling = with_sampler(inputs, 3)
    diff = torch.nan_to_num((inputs["old_logprobs"] - sampling) * mask, nan=0.0)
    seq = torch.exp(diff.sum(-1, keepdim=True))
    tok = torch.exp(diff)
    want = {"token_truncate": tok.clamp(0.5, 1.5), "token_mask": tok * ((tok >= 0.5) & (tok <= 1.5)),
            "sequence_truncate": seq.clamp(0.5, 1.5), "sequence_mask": seq * ((seq >= 0.5) & (seq <= 1.5))}
    for mode, value in want.items():
        got = trl_vllm_importance_sampling_ratio(inputs["old_logprobs"], sampling, mask, mode, 1.5, 0.5)
        assert torch.equal(got, value), mode


@pytest.mark.parametrize("mode", VLLM_IS_MODES)
def test_per_sequence_ratio_is_taken_as_the_sequence_ratio(mode):
    """A rollout_is_ratio given per sequence (B,) is that sequence's ratio for the sequence_* modes, and
    truncated or masked as one value per sequence for the token_* modes."""
    inputs = make_inputs(8, B=3, T=4, V=7)
    seq_ratio = torch.tensor([0.3, 1.2, 2.5], dtype=torch.float64)
    kw = dict(loss_type="dapo", vllm_importance_sampling_mode=mode, vllm_importance_sampling_clip_min=0.5,
              vllm_importance_sampling_clip_max=2.0)
    got, _ = grpo_loss(**inputs, rollout_is_ratio=seq_ratio, **kw)
    inside = (seq_ratio <= 2.0) & (seq_ratio >= 0.5)
    corrected = seq_ratio.clamp(0.5, 2.0) if mode.endswith("_truncate") else seq_ratio * inside
    want, _ = grpo_loss(**inputs, rollout_is_ratio=corrected, loss_type="dapo")
    assert float((got - want).detach().abs()) < 1e-12


def test_vllm_option_errors():
    """TRL's own checks of these fields (GRPOConfig.__post_init__, the VESPO check of GRPOTrainer)."""
    for kw, match in [
        (dict(vllm_importance_sampling_mode="token"), "vllm_importance_sampling_mode"),
        (dict(vllm_importance_sampling_mode="token_mask", vllm_importance_sampling_clip_min=2.0,
              vllm_importance_sampling_clip_max=1.0), "less than"),
        (dict(vllm_importance_sampling_mode="sequence_truncate", vllm_importance_sampling_clip_max=None),
         "At least one"),
        (dict(loss_type="vespo", vllm_importance_sampling_mode="sequence_mask"), "vespo"),
    ]:
        with pytest.raises(ValueError, match=match):
            GRPOOptions(**kw)
