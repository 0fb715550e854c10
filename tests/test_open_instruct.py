"""open-instruct's GRPO loss (grpo_fast) against a float64 transcription of its source.

open-instruct is not on the package registry, so it cannot be called here. The functions
`oi_*` below transcribe its formulas, written from allenai/open-instruct at commit
e6c3044aa6201c8bfa4573c1b03142af599e730d:

- `oi_rho_weights`: open_instruct/grpo_utils.py lines 372-391 (`_rho_drop_masks`,
  `_sequence_level_mean`) and 410-463 (`compute_rho_correction`: the train/vLLM ratio rho,
  clamped, masked per token or per sequence, or by the sequence TV divergence);
- `oi_loss`: open_instruct/grpo_utils.py lines 504-538 (`compute_grpo_loss`: dapo / cispo, the
  rho weights, the KL estimators of open_instruct/model_utils.py lines 793-818 on new - ref
  clamped to [-40, 40]), open_instruct/grpo_fast.py lines 701-724 (ratio = exp(new - old),
  per_token_loss = pg_loss + beta * kl, masked_mean with loss_denominator, times world_size //
  sequence_parallel_size) and open_instruct/rl_utils.py lines 426-449 (`masked_mean`).

Our side is `grpo_kernels.integrations.open_instruct.loss_options` with the rho weights as
rollout_is_ratio, through `grpo_loss_from_logprobs` (and `fused_grpo_loss` from logits): loss
and gradient in float64 to 1e-10, for both loss_fn values, the four kl_estimator values,
with and without a reference policy, every rho option, both kinds of loss_denominator and a
DP x SP world.
"""
from __future__ import annotations

import itertools

import pytest
import torch

import grpo_kernels
from grpo_kernels.integrations.open_instruct import loss_options

# --- the transcription (float64) -----------------------------------------------------------


def _seq_mean(values, mask):
    """Per-row masked mean broadcast to every token; an empty row gives 0."""
    m = mask.to(values.dtype)
    return ((values * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp_min(1.0)).expand_as(values)


def _drops(rho, mask, lower, upper):
    low = (rho < lower) & mask if lower > 0.0 else torch.zeros_like(mask)
    high = (rho > upper) & mask if upper > 0.0 else torch.zeros_like(mask)
    return low, high


def oi_rho_weights(old, vllm, mask, advantages, cfg):
    diff = torch.where(mask, (old - vllm).clamp(-10.0, 10.0), torch.zeros_like(old))
    rho = torch.exp(diff)
    if not cfg["use_rho_correction"]:
        return torch.ones_like(rho)
    effective = torch.exp(_seq_mean(diff, mask)) if cfg["rho_mask_sequence_level"] else rho
    if cfg["rho_mask_tv_divergence"]:
        low, high = _drops(_seq_mean((rho - 1.0).abs(), mask), mask, cfg["rho_mask_lower_bound"],
                           cfg["rho_mask_upper_bound"])
        raises_tv = torch.sign(diff) * advantages > 0
        low, high = low & raises_tv, high & raises_tv
    else:
        low, high = _drops(effective, mask, cfg["rho_mask_lower_bound"], cfg["rho_mask_upper_bound"])
    keep = mask & ~low & ~high
    clamped = effective
    if cfg["rho_clamp_lower_bound"] > 0.0:
        clamped = clamped.clamp(min=cfg["rho_clamp_lower_bound"])
    if cfg["rho_clamp_upper_bound"] > 0.0:
        clamped = clamped.clamp(max=cfg["rho_clamp_upper_bound"])
    return torch.where(keep, clamped, torch.zeros_like(clamped))


def oi_loss(new, old, advantages, ref, mask, rho_weights, cfg, denominator):
    ratio = torch.exp(new - old)
    if cfg["loss_fn"] == "dapo":
        pg_loss = torch.max(-advantages * ratio,
                            -advantages * ratio.clamp(1.0 - cfg["clip_lower"], 1.0 + cfg["clip_higher"]))
    else:
        pg_loss = -advantages * ratio.detach().clamp(max=1.0 + cfg["clip_higher"]) * new
    pg_loss = pg_loss * rho_weights
    if ref is not None:
        d = (new - ref).clamp(-40.0, 40.0)
        kl = (d, d ** 2 / 2, torch.expm1(-d) + d, ratio * d)[cfg["kl_estimator"]]
    else:
        kl = torch.zeros_like(pg_loss)
    per_token = pg_loss + cfg["beta"] * kl
    numerator = (per_token * mask).sum()
    loss = numerator / denominator if denominator > 0 else torch.zeros_like(numerator)
    return loss * (cfg["world_size"] // cfg["sequence_parallel_size"])


# --- inputs and configurations ----------------------------------------------------------------

RHO = {  # open-instruct's defaults first (truncated IS at 2), then its masks
    "off": dict(use_rho_correction=False),
    "clamp": dict(),
    "token_mask": dict(rho_clamp_lower_bound=0.8, rho_clamp_upper_bound=1.5, rho_mask_lower_bound=0.7,
                       rho_mask_upper_bound=1.6),
    "seq_mask": dict(rho_mask_sequence_level=True, rho_mask_lower_bound=0.9, rho_mask_upper_bound=1.1),
    "tv": dict(rho_mask_tv_divergence=True, rho_mask_upper_bound=0.3, rho_clamp_upper_bound=1.4),
}
RHO_DEFAULTS = dict(use_rho_correction=True, rho_clamp_lower_bound=0.0, rho_clamp_upper_bound=2.0,
                    rho_mask_lower_bound=0.0, rho_mask_upper_bound=0.0, rho_mask_sequence_level=False,
                    rho_mask_tv_divergence=False)


def config(**fields) -> dict:
    base = dict(loss_fn="dapo", clip_lower=0.2, clip_higher=0.272, beta=0.05, kl_estimator=2, load_ref_policy=True,
                world_size=1, sequence_parallel_size=1, **RHO_DEFAULTS)
    return {**base, **fields}


def make_inputs(seed: int, B: int = 3, T: int = 7, V: int = 11) -> dict:
    """grpo_fast's per-token tensors: log-probs of sampled tokens under the current, old, vLLM and
    reference policies (nearby), per-token advantages, a bool response mask with holes and an empty row."""
    g = torch.Generator().manual_seed(seed)
    logits = 1.5 * torch.randn(B, T, V, generator=g, dtype=torch.float64)
    ids = torch.randint(0, V, (B, T), generator=g)

    def logprobs(z):
        return torch.log_softmax(z, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)

    def near(scale):
        return logprobs(logits + scale * torch.randn(B, T, V, generator=g, dtype=torch.float64))

    mask = torch.rand(B, T, generator=g) < 0.8
    mask[1] = False
    mask[0, 0] = True
    advantages = torch.randn(B, 1, generator=g, dtype=torch.float64).expand(B, T).clone()  # one per sequence
    advantages[2] = 0.0 if seed % 2 else advantages[2]
    return dict(logits=logits, ids=ids, new=logprobs(logits), old=near(0.4), vllm=near(0.3), ref=near(0.5),
                mask=mask, advantages=advantages)


def ours(x: dict, cfg: dict, denominator: float, with_old: bool = True, with_ref: bool = True):
    new = x["new"].clone().requires_grad_()
    weights = oi_rho_weights(x["old"] if with_old else x["new"], x["vllm"], x["mask"], x["advantages"], cfg)
    loss, _ = grpo_kernels.grpo_loss_from_logprobs(
        new, None, x["advantages"], x["mask"], x["old"] if with_old else None, x["ref"] if with_ref else None,
        weights, **loss_options(cfg, denominator))
    (grad,) = torch.autograd.grad(loss, new)
    return loss, grad


def theirs(x: dict, cfg: dict, denominator: float, with_old: bool = True, with_ref: bool = True):
    new = x["new"].clone().requires_grad_()
    old = x["old"] if with_old else new.detach()  # grpo_fast's first epoch with one mini-batch
    weights = oi_rho_weights(old, x["vllm"], x["mask"], x["advantages"], cfg)
    loss = oi_loss(new, old, x["advantages"], x["ref"] if with_ref and cfg["load_ref_policy"] else None, x["mask"],
                   weights, cfg, denominator)
    (grad,) = torch.autograd.grad(loss, new)
    return loss, grad


def rel_err(got, want) -> float:
    got, want = got.detach(), want.detach()
    scale = want.norm().item()
    return (got - want).norm().item() / (scale if scale > 0 else 1.0)


def assert_matches(x, cfg, denominator, **kw) -> None:
    (want, want_grad), (got, grad) = theirs(x, cfg, denominator, **kw), ours(x, cfg, denominator, **kw)
    assert rel_err(got, want) <= 1e-10, f"loss {got.item()!r} vs transcription {want.item()!r}"
    assert rel_err(grad, want_grad) <= 1e-10, f"grad rel err {rel_err(grad, want_grad):.3g}"


def denominators(x: dict) -> list[float]:
    """loss_denominator: "token" (the tokens of the accumulation group over the ranks: here this
    batch's count times 3) or a float (Dr GRPO's constant)."""
    return [3.0 * float(x["mask"].sum()), 64.0]


@pytest.mark.parametrize("loss_fn, kl_estimator", list(itertools.product(("dapo", "cispo"), (0, 1, 2, 3))))
def test_loss_matches_transcription(loss_fn: str, kl_estimator: int) -> None:
    for seed, (rho, fields), world in itertools.product(range(2), RHO.items(), ((1, 1), (4, 2))):
        x = make_inputs(seed)
        cfg = config(loss_fn=loss_fn, kl_estimator=kl_estimator, world_size=world[0],
                     sequence_parallel_size=world[1], **fields)
        for denominator in denominators(x):
            try:
                assert_matches(x, cfg, denominator)
            except AssertionError as e:
                raise AssertionError(f"seed {seed}, rho {rho}, world {world}, denominator {denominator}: {e}") from e


@pytest.mark.parametrize("loss_fn", ("dapo", "cispo"))
def test_without_reference_and_first_epoch(loss_fn: str) -> None:
    """load_ref_policy=False (no KL term), and grpo_fast's first epoch with one mini-batch (old = new,
    detached): our old_logprobs=None."""
    x = make_inputs(5)
    assert_matches(x, config(loss_fn=loss_fn, load_ref_policy=False), 20.0, with_ref=False)
    assert_matches(x, config(loss_fn=loss_fn, kl_estimator=3), 20.0, with_old=False)


def test_inputs_reach_every_branch() -> None:
    """Not vacuous: the ratios leave the clip band on both sides, every rho option drops some
    tokens and keeps others, and the rho clamp acts."""
    seen = {key: [] for key in ("clip_low", "clip_high", *RHO)}
    for seed in range(2):
        x = make_inputs(seed)
        ratio, m = torch.exp(x["new"] - x["old"])[x["mask"]], x["mask"]
        seen["clip_low"].append(float((ratio < 0.8).any()))
        seen["clip_high"].append(float((ratio > 1.272).any()))
        for rho, fields in RHO.items():
            w = oi_rho_weights(x["old"], x["vllm"], m, x["advantages"], config(**fields))[m]
            seen[rho].append(float((w == 0).any()) + 2 * float(((w != 0) & (w != 1)).any()))
    assert all(max(v) > 0 for k, v in seen.items() if k != "off"), seen
    for rho in ("token_mask", "seq_mask", "tv"):
        assert any(v in (1.0, 3.0) for v in seen[rho]), rho  # some token dropped
    assert max(seen["clamp"]) >= 2  # reweighted, none dropped


@pytest.mark.parametrize("loss_fn", ("dapo", "cispo"))
def test_fused_loss_from_logits(loss_fn: str) -> None:
    """The recipe as grpo_fast would call it: fused_grpo_loss on the model's logits[:, :-1] with
    the temperature, against the transcription over forward_for_logprobs' log-probs
    (grpo_utils.py lines 541-574: logits / temperature, log_softmax, gather); gradient w.r.t. the logits."""
    g = torch.Generator().manual_seed(11)
    B, L, V, temperature = 3, 8, 13, 0.7
    out_logits = 2.0 * torch.randn(B, L, V, generator=g, dtype=torch.float64)  # the model's output
    query_responses = torch.randint(0, V, (B, L), generator=g)
    response_mask = torch.rand(B, L, generator=g) < 0.7
    labels, mask = query_responses[:, 1:], response_mask[:, 1:]
    advantages = torch.randn(B, L, generator=g, dtype=torch.float64)[:, 1:]
    with torch.no_grad():
        base = torch.log_softmax(out_logits[:, :-1] / temperature, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    old = base + 0.3 * torch.randn(B, L - 1, generator=g, dtype=torch.float64)
    vllm = base + 0.3 * torch.randn(B, L - 1, generator=g, dtype=torch.float64)
    ref = base + 0.4 * torch.randn(B, L - 1, generator=g, dtype=torch.float64)
    cfg = config(loss_fn=loss_fn, kl_estimator=2, world_size=2, **RHO["token_mask"])
    weights = oi_rho_weights(old, vllm, mask, advantages, cfg)
    denominator = float(mask.sum())

    z = out_logits.clone().requires_grad_()
    new = torch.log_softmax(z[:, :-1] / temperature, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    want = oi_loss(new, old, advantages, ref, mask, weights, cfg, denominator)
    (want_grad,) = torch.autograd.grad(want, z)

    z = out_logits.clone().requires_grad_()
    got, _ = grpo_kernels.fused_grpo_loss(z[:, :-1], labels, advantages, mask, old, ref, rollout_is_ratio=weights,
                                          backend="torch", **loss_options(cfg, denominator, temperature=temperature))
    (grad,) = torch.autograd.grad(got, z)
    assert rel_err(got, want) <= 1e-10 and rel_err(grad, want_grad) <= 1e-10


def test_loss_options_table_and_errors() -> None:
    o = loss_options(config(loss_fn="cispo", kl_estimator=3, world_size=8, sequence_parallel_size=2), 100.0)
    assert (o["loss_type"], o["epsilon_high"], o["kl_estimator"], o["use_bias_correction_kl"], o["dp_size"]) == \
        ("cispo", 1.272, "k1", True, 4)
    assert loss_options(config(load_ref_policy=False), 1.0)["beta"] == 0.0
    with pytest.raises(ValueError, match="loss_fn"):
        loss_options(config(loss_fn="grpo"), 1.0)
    with pytest.raises(ValueError, match="kl_estimator"):
        loss_options(config(kl_estimator=4), 1.0)
