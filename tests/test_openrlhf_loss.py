"""Parity with OpenRLHF 0.11.2's own PolicyLoss (openrlhf/models/loss.py), called here.

`grpo_kernels.integrations.openrlhf.PolicyLoss` against `openrlhf.models.loss.PolicyLoss`, both
built with the same arguments, on the same float64 inputs: every policy_loss_type (ppo, gspo),
with and without dual clip, both token_level_loss settings, every valid combination of the
train/rollout correction (is_correction_level x mode x gating), and the three ways OpenRLHF's
trainer passes its normalisers (none; global batch_num_tokens / global_batch_size with dp_size).
Loss and gradient w.r.t. log_probs to 1e-10 (relative), ppo_kl and vllm_kl to 1e-10; clip_ratio
and is_filter_ratio, which OpenRLHF computes in float32 (`.float()` of a bool mask), to 1e-6
(distinct fractions k/n, n <= 24, differ by > 1e-3).

OpenRLHF is loaded without flash_attn and deepspeed (tests/openrlhf_oracle.py).
"""
from __future__ import annotations

import inspect
import subprocess
import sys

import pytest
import torch

pytest.importorskip("openrlhf", reason="openrlhf 0.11.2 is not installed (Makefile)")
import openrlhf_oracle  # noqa: E402

from grpo_kernels.integrations import openrlhf as ours  # noqa: E402

theirs = openrlhf_oracle.load()["loss"]

# (level, mode, gating, threshold): every combination OpenRLHF's constructor accepts, with bands
# that filter some units of the inputs below and keep others (test_inputs_reach_every_branch).
CORRECTIONS = [
    ("off", "mask", "ratio", (0.5, 5.0)),
    ("token", "mask", "ratio", (0.6, 1.6)),
    ("seq", "mask", "ratio", (0.8, 1.25)),
    ("token", "clip", "ratio", (0.6, 1.6)),
    ("token", "mask", "binary_kl", (0.0, 0.02)),
    ("seq", "mask", "binary_kl", (0.0, 0.02)),
    ("token", "mask", "tv", (0.0, 0.08)),
    ("seq", "mask", "tv", (0.0, 0.06)),
]
# What ppo_actor passes (openrlhf/utils/loss_utils.py get_loss_batch_info): nothing (the local
# means), or the global token / sample counts as float32 tensors with the DP world size; and a
# dp_size without its normaliser, which OpenRLHF's aggregate_loss ignores.
NORMALISERS = {
    "local": {},
    "local_dp2": dict(dp_size=2),
    "global_dp2": dict(dp_size=2, batch_num_tokens=torch.tensor(29.0), global_batch_size=torch.tensor(7.0)),
    "global_dp1": dict(dp_size=1, batch_num_tokens=torch.tensor(11.0), global_batch_size=torch.tensor(3.0)),
}
SEEDS = range(2)


def make_inputs(seed: int, B: int = 4, T: int = 6, V: int = 12) -> dict:
    """Log-probs of sampled tokens under three nearby policies (current, old, rollout), per-token
    advantages with zeros, a bool action mask with holes and an empty row (never an empty batch)."""
    g = torch.Generator().manual_seed(seed)
    logits = 1.5 * torch.randn(B, T, V, generator=g, dtype=torch.float64)
    ids = torch.randint(0, V, (B, T, 1), generator=g)

    def logprobs(z: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(z, -1).gather(-1, ids).squeeze(-1)

    mask = torch.rand(B, T, generator=g) < 0.8
    mask[1] = False
    mask[0, 0] = True
    advantages = torch.randn(B, T, generator=g, dtype=torch.float64)
    advantages[torch.rand(B, T, generator=g) < 0.15] = 0.0
    return dict(
        log_probs=logprobs(logits),
        old=logprobs(logits + 0.5 * torch.randn(B, T, V, generator=g, dtype=torch.float64)),
        rollout=logprobs(logits + 0.3 * torch.randn(B, T, V, generator=g, dtype=torch.float64)),
        advantages=advantages, mask=mask,
    )


def run(loss_fn, x: dict, normalisers: dict, with_rollout: bool = True):
    log_probs = x["log_probs"].clone().requires_grad_()
    out = loss_fn(log_probs, x["old"], x["advantages"], action_mask=x["mask"],
                  rollout_log_probs=x["rollout"] if with_rollout else None, **normalisers)
    (grad,) = torch.autograd.grad(out[0], log_probs)
    return out, grad


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double(), want.detach().double()
    scale = want.norm().item()
    return (got - want).norm().item() / (scale if scale > 0 else 1.0)


def assert_matches(kwargs: dict, x: dict, normalisers: dict) -> None:
    (want, want_grad), (got, grad) = run(theirs.PolicyLoss(**kwargs), x, normalisers), \
        run(ours.PolicyLoss(**kwargs), x, normalisers)
    assert rel_err(got[0], want[0]) <= 1e-10, f"loss {got[0].item()!r} vs OpenRLHF {want[0].item()!r}"
    assert rel_err(grad, want_grad) <= 1e-10, f"grad rel err {rel_err(grad, want_grad):.3g}"
    for name, i, tol in (("clip_ratio", 1, 1e-6), ("ppo_kl", 2, 1e-10), ("vllm_kl", 3, 1e-10),
                         ("is_filter_ratio", 4, 1e-6)):
        if want[i] is None:
            assert got[i] is None, name
            continue
        assert got[i].shape == want[i].shape, name
        assert abs(got[i].item() - want[i].item()) <= tol * max(1.0, abs(want[i].item())), \
            f"{name}: ours {got[i].item()!r}, OpenRLHF {want[i].item()!r}"


def configs():
    for policy_loss_type in ("ppo", "gspo"):
        for level, mode, gating, threshold in CORRECTIONS:
            if policy_loss_type == "gspo" and (mode, gating) != ("mask", "ratio"):
                continue  # GSPO only switches its ratio to the rollout policy: the gate is unused
            for dual_clip in (None, 2.0):
                for token_level_loss in (True, False):
                    yield pytest.param(
                        dict(policy_loss_type=policy_loss_type, dual_clip=dual_clip, token_level_loss=token_level_loss,
                             clip_eps_low=0.2, clip_eps_high=0.28, is_correction_level=level, is_correction_mode=mode,
                             is_correction_gating=gating, is_correction_threshold=threshold),
                        id=f"{policy_loss_type}-{level}-{mode}-{gating}-dual{dual_clip}-token{token_level_loss}")


@pytest.mark.parametrize("kwargs", list(configs()))
def test_policy_loss_matches_openrlhf(kwargs: dict) -> None:
    for seed in SEEDS:
        x = make_inputs(seed)
        for name, normalisers in NORMALISERS.items():
            try:
                assert_matches(kwargs, x, normalisers)
            except AssertionError as e:
                raise AssertionError(f"seed {seed}, normalisers {name}: {e}") from e


def test_importable_without_openrlhf() -> None:
    """integrations.openrlhf imports, and its PolicyLoss runs, where openrlhf cannot be imported."""
    code = ("import sys; sys.modules['openrlhf'] = None\n"
            "import torch\n"
            "from grpo_kernels.integrations.openrlhf import PolicyLoss\n"
            "lp = torch.zeros(2, 3)\n"
            "print(float(PolicyLoss()(lp, lp, torch.ones(2, 3))[0]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "-1.0", out.stderr[-2000:]


def test_same_signatures() -> None:
    """A drop-in: the constructor's and forward's parameters, their order and defaults are OpenRLHF's."""
    for method in ("__init__", "forward"):
        want = inspect.signature(getattr(theirs.PolicyLoss, method)).parameters
        got = inspect.signature(getattr(ours.PolicyLoss, method)).parameters
        assert list(got) == list(want), method
        for name in want:
            assert got[name].default == want[name].default, (method, name)


def test_inputs_reach_every_branch() -> None:
    """The inputs are not vacuous: both clip sides, the dual clip and every correction gate act on
    some units and spare others."""
    seen: dict[str, list[float]] = {}
    for seed in SEEDS:
        x = make_inputs(seed)
        for level, mode, gating, threshold in CORRECTIONS[1:]:
            _, _, _, _, filtered = theirs.PolicyLoss(is_correction_level=level, is_correction_mode=mode,
                                                     is_correction_gating=gating,
                                                     is_correction_threshold=threshold)(
                x["log_probs"], x["old"], x["advantages"], x["mask"], x["rollout"])
            seen.setdefault(f"{level}-{mode}-{gating}", []).append(filtered.item())
        _, clip_ratio, *_ = theirs.PolicyLoss(clip_eps_low=0.2, clip_eps_high=0.28)(
            x["log_probs"], x["old"], x["advantages"], x["mask"])
        seen.setdefault("clip", []).append(clip_ratio.item())
        plain = theirs.PolicyLoss()(x["log_probs"], x["old"], x["advantages"], x["mask"])[0]
        dual = theirs.PolicyLoss(dual_clip=2.0)(x["log_probs"], x["old"], x["advantages"], x["mask"])[0]
        seen.setdefault("dual", []).append(abs((plain - dual).item()))
    for key, values in seen.items():
        assert max(values) > 0, key
        if key not in ("clip", "dual"):
            assert min(values) < 1, key


def test_float_mask_and_mask_none() -> None:
    """A float action mask gives OpenRLHF's numbers too; None means every token (OpenRLHF's
    ppo with local means accepts None; there it is the plain mean)."""
    x = make_inputs(7)
    x["mask"] = x["mask"].double()
    assert_matches(dict(), x, {})
    assert_matches(dict(token_level_loss=False, dual_clip=3.0), x, NORMALISERS["global_dp2"])
    x["mask"] = None
    assert_matches(dict(), x, {})


def test_log_ratio_clamp_and_extremes() -> None:
    """ppo clamps log r to [-20, 20] as OpenRLHF; ppo_kl uses the raw log-ratio, as OpenRLHF."""
    x = make_inputs(3)
    x["old"] = x["old"].clone()
    x["old"][0, 0], x["old"][2, 1] = x["log_probs"][0, 0] - 25.0, x["log_probs"][2, 1] + 30.0
    x["mask"][2, 1] = True
    for kwargs in (dict(), dict(dual_clip=1.5), dict(token_level_loss=False)):
        assert_matches(kwargs, x, {})


def test_fully_masked_batch_is_zero() -> None:
    """Where OpenRLHF divides 0 by 0 (NaN), the loss, its gradient and the batch metrics are 0."""
    x = make_inputs(0)
    x["mask"] = torch.zeros_like(x["mask"])
    for kwargs in (dict(), dict(policy_loss_type="gspo"), dict(is_correction_level="token")):
        (loss, clip_ratio, ppo_kl, vllm_kl, filtered), grad = run(ours.PolicyLoss(**kwargs), x, {})
        assert loss.item() == 0.0 and clip_ratio.item() == 0.0 and ppo_kl.item() == 0.0
        assert torch.equal(grad, torch.zeros_like(grad))
        if vllm_kl is not None:
            assert vllm_kl.item() == 0.0 and filtered.item() == 0.0


def test_nonfinite_log_probs_stay_nonfinite() -> None:
    """A NaN log-prob on a response token never becomes a finite loss."""
    x = make_inputs(1)
    x["log_probs"] = x["log_probs"].clone()
    x["log_probs"][0, 0] = float("nan")
    for kwargs in (dict(), dict(policy_loss_type="gspo"), dict(token_level_loss=False)):
        assert torch.isnan(ours.PolicyLoss(**kwargs)(x["log_probs"], x["old"], x["advantages"], x["mask"])[0])


@pytest.mark.parametrize("kwargs, match", [
    (dict(policy_loss_type="grpo"), "policy_loss_type"),
    (dict(dual_clip=1.0), "dual_clip"),
    (dict(is_correction_level="sequence"), "is_correction_level"),
    (dict(is_correction_mode="truncate"), "is_correction_mode"),
    (dict(is_correction_gating="kl"), "is_correction_gating"),
    (dict(is_correction_level="seq", is_correction_mode="clip"), "is_correction_mode='clip'"),
    (dict(is_correction_level="token", is_correction_mode="clip", is_correction_gating="tv",
          is_correction_threshold=(0.0, 0.1)), "is_correction_mode='clip'"),
    (dict(is_correction_level="token", is_correction_gating="tv"), "upper bound only"),
    (dict(is_correction_threshold=(0.5,)), "is_correction_threshold"),
    (dict(clip_eps_low=1.5), "epsilon_low"),
])
def test_bad_options_raise(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ours.PolicyLoss(**kwargs)


def test_missing_rollout_log_probs_raise() -> None:
    x = make_inputs(0)
    for kwargs in (dict(is_correction_level="token"), dict(policy_loss_type="gspo", is_correction_level="seq")):
        with pytest.raises(ValueError, match="rollout_log_probs"):
            run(ours.PolicyLoss(**kwargs), x, {}, with_rollout=False)
