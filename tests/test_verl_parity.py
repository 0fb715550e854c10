"""Parity with verl 0.9.1's own policy losses (verl.trainer.ppo.core_algos), called here.

- `grpo_kernels.integrations.verl.policy_loss_fn(mode)` against verl's `get_policy_loss_fn(mode)`
  for every mode of verl's registry but bypass_mode, every loss_agg_mode, with and without
  rollout_is_weights, on a real `ActorConfig`: loss and gradient w.r.t. log_prob in float64 to
  1e-10, and verl's metrics.
- The new loss types from logits: the reference against verl's function on log-probs computed
  from the same logits (gradient w.r.t. the logits), and fused_grpo_loss (torch and Triton, the
  latter interpreted: tiny shapes) against the float64 reference.
- verl's whole actor loss (policy loss, agg_loss of the k3/low_var_kl KL and of the entropy) in
  one call of ours.

verl computes its clip fractions in float32 (`torch.gt(...).float()` over a bool mask), so those
metrics are compared to 1e-6 absolute (distinct fractions k/n, n <= 24, differ by > 1e-3);
ppo_kl is float64 in verl and compared to 1e-10.

clip_cov picks a random subset of its candidate tokens. verl and we draw from different random
streams, so the parity tests give clip_cov_ratio = 1.0 (every candidate is picked: no randomness
left), and test_clip_cov_random_pick checks the random regime by making verl's torch.randperm
pick the tokens we picked.
"""
from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

core_algos = pytest.importorskip("verl.trainer.ppo.core_algos", reason="verl 0.9.1 is not installed (Makefile)")
from verl.workers.config.actor import ActorConfig, PolicyLossConfig  # noqa: E402

import grpo_kernels  # noqa: E402
from grpo_kernels import reference  # noqa: E402
from grpo_kernels.integrations import verl as ours  # noqa: E402
from grpo_kernels.options import LOSS_AGG_MODES, VERL_LOSS_TYPES  # noqa: E402

MODES = ours.MODES
FRACTIONS = ("actor/pg_clipfrac", "actor/pg_clipfrac_lower")
# Our new loss types and the verl mode that defines each.
VERL_MODE_OF = {"dppo_tv": "dppo_tv", "dppo_kl": "dppo_kl", "gpg": "gpg", "clip_cov": "clip_cov", "kl_cov": "kl_cov",
                "geo_mean": "geo_mean", "dro": "dro", "cispo_verl": "cispo"}

seeds = st.integers(0, 2**31 - 1)


def actor_config(*, policy: dict | None = None, **fields) -> ActorConfig:
    """A real verl ActorConfig (its __post_init__ checks run), with PolicyLossConfig fields in `policy`."""
    fields.setdefault("strategy", "fsdp")
    fields.setdefault("rollout_n", 1)
    fields.setdefault("ppo_micro_batch_size_per_gpu", 1)
    defaults = dict(clip_cov_ratio=1.0, dro_beta=0.1)  # clip_cov_ratio = 1: no randomness (module docstring)
    return ActorConfig(policy_loss=PolicyLossConfig(**{**defaults, **(policy or {})}), **fields)


@st.composite
def configs(draw) -> ActorConfig:
    """verl configurations over every field its policy losses read, global batch info included."""
    lsf = draw(st.sampled_from([None, 7]))
    info = draw(st.sampled_from([
        {},
        dict(dp_size=1, batch_num_tokens=None, global_batch_size=None, loss_scale_factor=lsf),
        dict(dp_size=2, batch_num_tokens=13, global_batch_size=5, loss_scale_factor=lsf),
    ]))
    return actor_config(
        clip_ratio=draw(st.sampled_from([0.2, 0.3])),
        clip_ratio_low=draw(st.sampled_from([None, 0.1, 0.2])),
        clip_ratio_high=draw(st.sampled_from([None, 0.28])),
        clip_ratio_c=draw(st.sampled_from([3.0, 1.5])),
        tau_pos=draw(st.sampled_from([1.0, 0.5])),
        tau_neg=draw(st.sampled_from([1.05, 2.0])),
        loss_scale_factor=lsf,
        global_batch_info=info,
        policy=dict(
            clip_cov_lb=draw(st.sampled_from([1.0, 0.0])),
            clip_cov_ub=draw(st.sampled_from([5.0, 0.8])),
            kl_cov_ratio=draw(st.sampled_from([0.0002, 0.3])),
            ppo_kl_coef=draw(st.sampled_from([0.1, 1.0])),
            dro_beta=draw(st.sampled_from([0.1, 2.0])),
        ),
    )


def make_inputs(seed: int, *, B: int | None = None, T: int | None = None, V: int | None = None) -> dict:
    """Logits and verl's batch: bool response mask with holes (and sometimes an empty row, never an
    empty batch), per-token
    advantages with zeros, old log-probs ~0.6 nats away (ratios past both ends of every band),
    rollout_is_weights in [0, 2.5)."""
    g = torch.Generator().manual_seed(seed)

    def randint(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi + 1, (), generator=g))

    B, T, V = B or randint(1, 4), T or randint(2, 6), V or randint(2, 40)
    logits = 2.0 * torch.randn(B, T, V, generator=g, dtype=torch.float64)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) < 0.75
    if B > 1 and randint(0, 1):
        mask[randint(0, B - 1)] = False
    if not mask.any():  # verl divides 0 by 0 on an empty batch; we give 0 (test_fully_masked_batch_is_zero)
        mask[0, 0] = True
    advantages = torch.randn(B, T, generator=g, dtype=torch.float64)
    advantages[torch.rand(B, T, generator=g) < 0.2] = 0.0
    logprobs = torch.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    return dict(
        logits=logits, ids=ids, mask=mask, advantages=advantages, logprobs=logprobs,
        old=logprobs + 0.6 * torch.randn(B, T, generator=g, dtype=torch.float64),
        ref=logprobs + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64),
        weights=2.5 * torch.rand(B, T, generator=g, dtype=torch.float64),
    )


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double(), want.detach().double()
    scale = want.norm().item()
    return (got - want).norm().item() / (scale if scale > 0 else 1.0)


def run_policy_loss(fn, x: dict, agg: str, config, with_weights: bool):
    log_prob = x["logprobs"].clone().requires_grad_()
    # As verl's ppo_loss (verl/workers/utils/losses.py) calls get_policy_loss_fn(loss_mode).
    loss, metrics = fn(old_log_prob=x["old"], log_prob=log_prob, advantages=x["advantages"], response_mask=x["mask"],
                       loss_agg_mode=agg, config=config, rollout_is_weights=x["weights"] if with_weights else None)
    (grad,) = torch.autograd.grad(loss, log_prob, allow_unused=True)
    return loss, torch.zeros_like(log_prob) if grad is None else grad, metrics


def assert_metrics_match(got: dict, want: dict) -> None:
    assert got.keys() == want.keys(), (got.keys(), want.keys())
    for name, value in want.items():
        assert isinstance(got[name], float)
        limit = 1e-6 if name in FRACTIONS else 1e-10 * max(abs(value), 1.0)
        assert abs(got[name] - value) <= limit, f"{name}: ours {got[name]!r}, verl {value!r}"


def assert_matches_verl(mode: str, x: dict, agg: str, config, with_weights: bool, tol: float = 1e-10) -> None:
    want_loss, want_grad, want_metrics = run_policy_loss(core_algos.get_policy_loss_fn(mode), x, agg, config,
                                                         with_weights)
    loss, grad, metrics = run_policy_loss(ours.policy_loss_fn(mode), x, agg, config, with_weights)
    assert rel_err(loss, want_loss) <= tol, f"loss {loss.item()!r} vs verl {want_loss.item()!r}"
    assert rel_err(grad, want_grad) <= tol, f"grad rel err {rel_err(grad, want_grad):.3g}"
    assert_metrics_match(metrics, want_metrics)


# --- the registry ---------------------------------------------------------------------------


def test_every_registry_mode_is_covered():
    """policy_loss_fn knows every verl 0.9.1 policy loss except bypass_mode, and registered them as ours."""
    theirs = {name for name in core_algos.POLICY_LOSS_REGISTRY if not name.startswith(ours.PREFIX)}
    assert theirs - set(MODES) == {"bypass_mode"}
    assert ours.REGISTERED == [ours.PREFIX + mode for mode in MODES]
    fn = core_algos.get_policy_loss_fn("grpo_kernels_dppo_tv")
    assert fn.__name__ == "grpo_kernels_policy_loss_dppo_tv"
    x = make_inputs(0, B=3, T=5)
    config = actor_config()
    assert_matches_verl("dppo_tv", x, "token-mean", config, True)
    want, _, _ = run_policy_loss(core_algos.get_policy_loss_fn("dppo_tv"), x, "token-mean", config, True)
    got, _, _ = run_policy_loss(fn, x, "token-mean", config, True)
    assert rel_err(got, want) < 1e-10
    with pytest.raises(ValueError, match="bypass_mode"):
        ours.policy_loss_fn("bypass_mode")


def test_importable_without_verl():
    """integrations.verl imports (and registers nothing) where verl cannot be imported."""
    code = ("import sys; sys.modules['verl'] = None\n"
            "import grpo_kernels.integrations.verl as v\n"
            "assert v.REGISTERED == [] and callable(v.policy_loss_fn('vanilla'))\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_inputs_reach_every_branch():
    """The generated inputs and configs are not vacuous: ratios leave both ends of the band, dppo's
    trust region drops tokens, clip_cov has candidates and geo_mean clips on both sides."""
    config = actor_config(clip_ratio_c=1.5, policy=dict(clip_cov_lb=0.0))
    seen: dict[str, float] = {}
    for seed in range(12):
        x = make_inputs(seed, B=4, T=6)
        for mode in ("vanilla", "dppo_tv", "dppo_kl", "clip_cov", "geo_mean"):
            _, _, m = run_policy_loss(core_algos.get_policy_loss_fn(mode), x, "token-mean", config, False)
            for name, value in m.items():
                seen[f"{mode}:{name}"] = max(seen.get(f"{mode}:{name}", 0.0), value)
    for key in ("vanilla:actor/pg_clipfrac", "vanilla:actor/pg_clipfrac_lower", "dppo_tv:actor/pg_clipfrac",
                "dppo_kl:actor/pg_clipfrac", "dppo_tv:actor/pg_clipfrac_lower", "clip_cov:actor/pg_clipfrac",
                "geo_mean:actor/pg_clipfrac", "geo_mean:actor/pg_clipfrac_lower"):
        assert seen[key] > 0, key


# --- policy_loss_fn against verl --------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("agg", LOSS_AGG_MODES)
@pytest.mark.parametrize("with_weights", [False, True], ids=["no_is", "rollout_is"])
@given(seed=seeds, config=configs())
@settings(max_examples=2)
def test_policy_loss_matches_verl(mode, agg, with_weights, seed, config):
    """Every mode x every aggregation x with/without rollout_is_weights: value, gradient, metrics."""
    assert_matches_verl(mode, make_inputs(seed), agg, config, with_weights)


@pytest.mark.parametrize("mode", ["vanilla", "dppo_tv", "dppo_kl", "gspo", "sapo", "cispo"])
def test_stability_clamps_match_verl(mode):
    """verl clamps log r to [-20, 20] (and GSPO's log s above at 10): far-off tokens and sequences."""
    x = make_inputs(4, B=4, T=5, V=9)
    x["mask"][:] = True
    shift = torch.tensor([[25.0, -25.0, 0.0, 30.0, -0.3],   # past +-20 per token
                          [12.0, 11.0, 13.0, 12.5, 11.5],   # a sequence mean above 10
                          [-12.0, -11.0, -13.0, -12.5, -11.5],  # one below -10 (GSPO does not clamp it)
                          [0.1, -0.2, 0.3, 0.0, 0.2]], dtype=torch.float64)
    x["old"] = x["logprobs"] - shift
    x["advantages"][:, :] = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0], dtype=torch.float64)
    for agg in ("token-mean", "seq-mean-token-mean"):
        assert_matches_verl(mode, x, agg, actor_config(clip_ratio_c=3.0), True)


def test_clip_cov_random_pick():
    """With more candidates than clip_cov_ratio allows, we pick min(k, #candidates) of them at random.

    Our pick is read off the gradient (a picked token's gradient is zeroed); verl's torch.randperm is
    then made to pick the same tokens, and verl's loss and gradient must equal ours exactly. Over
    repeated calls every candidate gets picked at some point, and nothing else ever is."""
    x = make_inputs(7, B=4, T=6, V=11)
    x["mask"][:] = True
    x["advantages"] = torch.randn(4, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    everything = actor_config(policy=dict(clip_cov_ratio=1.0, clip_cov_lb=0.0))
    # clip_cov_ratio = 1: every candidate is picked; the candidates are the tokens whose gradient vanishes.
    _, all_picked, _ = run_policy_loss(core_algos.get_policy_loss_fn("clip_cov"), x, "token-mean", everything, False)
    _, none_picked, _ = run_policy_loss(core_algos.get_policy_loss_fn("clip_cov"), x, "token-mean",
                                        actor_config(policy=dict(clip_cov_lb=100.0, clip_cov_ub=101.0)), False)
    candidates = (all_picked == 0) & (none_picked != 0)
    n_candidates = int(candidates.sum())
    config = actor_config(policy=dict(clip_cov_ratio=0.1, clip_cov_lb=0.0))  # k = max(int(0.1 * 24), 1) = 2
    k = 2
    assert n_candidates > k + 1, n_candidates
    ever = torch.zeros_like(candidates)
    for _ in range(40):
        loss, grad, metrics = run_policy_loss(ours.policy_loss_fn("clip_cov"), x, "token-mean", config, False)
        picked = (grad == 0) & (none_picked != 0)
        assert int(picked.sum()) == k and bool((picked <= candidates).all())
        ever |= picked
        # verl's pick: the rows of nonzero(candidates) that randperm puts first.
        order = torch.nonzero(candidates)
        first = [i for i, (b, t) in enumerate(order.tolist()) if picked[b, t]]
        perm = torch.tensor(first + [i for i in range(len(order)) if i not in first])
        real = torch.randperm
        torch.randperm = lambda n, *a, **kw: perm if n == len(order) else real(n, *a, **kw)
        try:
            want_loss, want_grad, want_metrics = run_policy_loss(core_algos.get_policy_loss_fn("clip_cov"), x,
                                                                 "token-mean", config, False)
        finally:
            torch.randperm = real
        assert rel_err(loss, want_loss) < 1e-12 and rel_err(grad, want_grad) < 1e-12
        assert_metrics_match(metrics, want_metrics)
    assert bool((ever == candidates).all())


# --- from logits ------------------------------------------------------------------------------


def keywords(o) -> dict:
    return {f.name: getattr(o, f.name) for f in dataclasses.fields(o)}


@pytest.mark.parametrize("mode", MODES)
@given(seed=seeds, agg=st.sampled_from(LOSS_AGG_MODES), with_weights=st.booleans(), config=configs())
@settings(max_examples=3)
def test_reference_from_logits_matches_verl(mode, seed, agg, with_weights, config):
    """reference.grpo_loss on logits against verl's function on log-probs taken from the same logits:
    value and gradient w.r.t. the logits in float64."""
    x = make_inputs(seed)
    logits = x["logits"].clone().requires_grad_()
    weights = x["weights"] if with_weights else None
    log_prob = torch.log_softmax(logits, -1).gather(-1, x["ids"].unsqueeze(-1)).squeeze(-1)
    want, _ = core_algos.get_policy_loss_fn(mode)(x["old"], log_prob, x["advantages"], x["mask"], agg, config, weights)
    (want_grad,) = torch.autograd.grad(want, logits, allow_unused=True)
    want_grad = torch.zeros_like(logits) if want_grad is None else want_grad

    o = ours.options_for(mode, agg, config)
    logits2 = x["logits"].clone().requires_grad_()
    got, _ = reference.grpo_loss(logits2, x["ids"], x["advantages"], x["mask"], x["old"], rollout_is_ratio=weights,
                                 **keywords(o))
    (got_grad,) = torch.autograd.grad(got, logits2)
    assert rel_err(got, want) <= 1e-10 and rel_err(got_grad, want_grad) <= 1e-10


def fused_vs_reference(backend: str, dtype: torch.dtype, x: dict, kw: dict, tol: float) -> None:
    logits = x["logits"].to(dtype).requires_grad_()
    inputs = (x["ids"], x["advantages"], x["mask"], x["old"], x["ref"])
    loss, metrics = grpo_kernels.fused_grpo_loss(logits, *inputs, rollout_is_ratio=x["weights"], backend=backend, **kw)
    (grad,) = torch.autograd.grad(loss, logits)
    logits64 = logits.detach().double().requires_grad_()
    want, want_metrics = reference.grpo_loss(logits64, *inputs, rollout_is_ratio=x["weights"], **kw)
    (want_grad,) = torch.autograd.grad(want, logits64)
    assert grad.dtype == dtype
    assert rel_err(loss, want) <= tol, (loss.item(), want.item())
    assert rel_err(grad, want_grad) <= tol, rel_err(grad, want_grad)
    assert want_metrics.keys() == metrics.keys()
    for name, value in want_metrics.items():
        if value is None:
            assert metrics[name] is None, name
        else:
            assert rel_err(metrics[name], value) <= max(tol, 1e-6), name


NEW_TYPE_KW = {
    "dppo_tv": dict(epsilon_low=0.2, epsilon_high=0.28, clip_ratio_c=3.0),
    "dppo_kl": dict(epsilon_low=0.05, epsilon_high=0.1, clip_ratio_c=20.0),
    "gpg": dict(),
    "clip_cov": dict(clip_cov_ratio=1.0, clip_cov_lb=0.0, epsilon_high=0.28),  # every candidate: deterministic
    "kl_cov": dict(kl_cov_ratio=0.3, ppo_kl_coef=1.0),
    "geo_mean": dict(epsilon_low=0.2, epsilon_high=0.4),
    "dro": dict(dro_beta=0.5),
    "cispo_verl": dict(epsilon_low=0.2, epsilon_high=0.28),
}


@pytest.mark.parametrize("loss_type", VERL_LOSS_TYPES)
@given(seed=seeds, agg=st.sampled_from((None,) + LOSS_AGG_MODES), beta=st.sampled_from([0.0, 0.04]),
       entropy_coef=st.sampled_from([0.0, 0.01]), temperature=st.sampled_from([1.0, 0.7]))
@settings(max_examples=3)
def test_fused_torch_new_loss_types(loss_type, seed, agg, beta, entropy_coef, temperature):
    """fused_grpo_loss(backend="torch") on float64 logits against the float64 reference: 1e-10."""
    kw = dict(loss_type=loss_type, loss_agg_mode=agg, beta=beta, entropy_coef=entropy_coef, temperature=temperature,
              **NEW_TYPE_KW[loss_type])
    fused_vs_reference("torch", torch.float64, make_inputs(seed), kw, 1e-10)


@pytest.mark.parametrize("loss_type", VERL_LOSS_TYPES)
def test_fused_triton_new_loss_types(loss_type):
    """The Triton sweeps (interpreted) for each new loss type, fp32 logits against the float64 reference."""
    kw = dict(loss_type=loss_type, beta=0.04, loss_agg_mode="seq-mean-token-mean" if loss_type == "dro" else None,
              **NEW_TYPE_KW[loss_type])
    x = make_inputs(21, B=2, T=3, V=37)
    x["mask"] = torch.tensor([[True, True, False], [True, True, True]])
    fused_vs_reference("triton", torch.float32, x, kw, 1e-5)


def test_fused_triton_verl_options():
    """GSPO-token, a verl aggregation, both stability clamps and a vLLM mode on the Triton path."""
    kw = dict(loss_type="dapo", importance_sampling_level="sequence_token", log_ratio_clamp=(None, 10.0),
              loss_agg_mode="seq-mean-token-sum-norm", beta=0.04, kl_clamp=10.0, dual_clip=3.0,
              vllm_importance_sampling_mode="token_truncate", vllm_importance_sampling_clip_min=0.5)
    x = make_inputs(22, B=2, T=3, V=37)
    x["mask"] = torch.tensor([[True, True, False], [True, True, True]])
    fused_vs_reference("triton", torch.float32, x, kw, 1e-5)


# --- verl's actor loss in one call -----------------------------------------------------------

KL_TYPES = {"low_var_kl": dict(kl_estimator="k3", kl_clamp=10.0), "k1": dict(kl_estimator="k1"),
            "mse": dict(kl_estimator="k2")}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kl_type", list(KL_TYPES))
@given(seed=seeds, agg=st.sampled_from(LOSS_AGG_MODES), config=configs())
@settings(max_examples=2)
def test_actor_loss_in_one_call(mode, kl_type, seed, agg, config):
    """verl's ppo_loss: pg_loss - entropy_coeff * agg(entropy) + kl_loss_coef * agg(kl_penalty), the
    log-probs and entropies from the logits, against one fused_grpo_loss(backend="torch") call."""
    if mode == "sapo":  # verl aggregates sapo's policy term by seq-mean-token-mean whatever loss_agg_mode says,
        agg = "seq-mean-token-mean"  # and its KL and entropy by loss_agg_mode: one call has one aggregation
    x = make_inputs(seed)
    if kl_type == "low_var_kl":  # far-off reference tokens, so that verl's clamps of k3 bind
        x["ref"] = x["ref"] + 12.0 * (torch.rand(x["ref"].shape, generator=torch.Generator().manual_seed(seed)) < 0.3)
    kl_coef, entropy_coeff = 0.3, 0.01
    logits = x["logits"].clone().requires_grad_()
    logp = torch.log_softmax(logits, -1)
    log_prob = logp.gather(-1, x["ids"].unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    pg, _ = core_algos.get_policy_loss_fn(mode)(x["old"], log_prob, x["advantages"], x["mask"], agg, config,
                                               x["weights"])
    info = config.global_batch_info

    def agg_loss(values):
        return core_algos.agg_loss(values, x["mask"], agg, **info)

    want = (pg - entropy_coeff * agg_loss(entropy)
            + kl_coef * agg_loss(core_algos.kl_penalty(log_prob, x["ref"], kl_type)))
    (want_grad,) = torch.autograd.grad(want, logits)

    kw = keywords(ours.options_for(mode, agg, config))
    kw.update(beta=kl_coef, use_bias_correction_kl=False, entropy_coef=entropy_coeff, backend="torch",
              **KL_TYPES[kl_type])
    if mode == "geo_mean":  # verl's geo_mean ignores loss_agg_mode; its KL and entropy terms do not
        kw["loss_agg_mode"] = agg
    logits2 = x["logits"].clone().requires_grad_()
    got, _ = grpo_kernels.fused_grpo_loss(logits2, x["ids"], x["advantages"], x["mask"], x["old"], x["ref"],
                                          rollout_is_ratio=x["weights"], **kw)
    (got_grad,) = torch.autograd.grad(got, logits2)
    assert rel_err(got, want) <= 1e-10 and rel_err(got_grad, want_grad) <= 1e-10


# --- layouts and edge cases ------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", VERL_LOSS_TYPES)
@pytest.mark.parametrize("agg", (None,) + LOSS_AGG_MODES)
def test_packed_matches_padded(loss_type, agg):
    """The same sequences packed (cu_seqlens) and padded give the same loss and gradient."""
    x = make_inputs(5, B=3, T=5, V=13)
    lengths = [5, 2, 4]
    mask = torch.zeros(3, 5, dtype=torch.bool)
    for b, n in enumerate(lengths):
        mask[b, :n] = True
    kw = dict(loss_type=loss_type, loss_agg_mode=agg, beta=0.04, **NEW_TYPE_KW[loss_type])
    if agg == "seq-mean-token-sum-norm":
        kw["loss_scale_factor"] = 5
    pad = x["logits"].clone().requires_grad_()
    want, _ = reference.grpo_loss(pad, x["ids"], x["advantages"], mask, x["old"], x["ref"],
                                  rollout_is_ratio=x["weights"], **kw)
    (want_grad,) = torch.autograd.grad(want, pad)
    pack = lambda t: t[mask]  # noqa: E731
    packed = x["logits"][mask].clone().requires_grad_()
    got, _ = reference.grpo_loss(packed, pack(x["ids"]), pack(x["advantages"]), None, pack(x["old"]), pack(x["ref"]),
                                 rollout_is_ratio=pack(x["weights"]),
                                 cu_seqlens=torch.tensor([0, 5, 7, 11]), **kw)
    (got_grad,) = torch.autograd.grad(got, packed)
    assert rel_err(got, want) < 1e-12 and rel_err(got_grad, want_grad[mask]) < 1e-12


@pytest.mark.parametrize("loss_type", VERL_LOSS_TYPES)
@pytest.mark.parametrize("agg", (None,) + LOSS_AGG_MODES)
def test_fully_masked_batch_is_zero(loss_type, agg):
    """No active token: loss 0 and zero gradient, not NaN (verl's token-mean divides 0 by 0 here)."""
    x = make_inputs(6, B=2, T=3, V=7)
    logits = x["logits"].clone().requires_grad_()
    loss, metrics = reference.grpo_loss(logits, x["ids"], x["advantages"], torch.zeros(2, 3, dtype=torch.bool),
                                        x["old"], x["ref"], rollout_is_ratio=x["weights"], loss_type=loss_type,
                                        loss_agg_mode=agg, beta=0.04, entropy_coef=0.01, **NEW_TYPE_KW[loss_type])
    (grad,) = torch.autograd.grad(loss, logits)
    assert loss.item() == 0.0 and bool((grad == 0).all())
    assert all(v is None or bool(torch.isfinite(v).all()) for v in metrics.values())


def test_option_errors():
    """verl's own asserts, as ValueErrors naming the keyword."""
    from grpo_kernels.options import GRPOOptions

    for kw, match in [
        (dict(loss_type="dro"), "dro_beta"),
        (dict(loss_agg_mode="mean"), "loss_agg_mode"),
        (dict(loss_agg_mode="token-mean", dp_size=2), "batch_num_tokens"),
        (dict(loss_agg_mode="seq-mean-token-mean", dp_size=2), "global_batch_size"),
        (dict(loss_type="clip_cov", clip_cov_ratio=0.0), "clip_cov_ratio"),
        (dict(loss_type="kl_cov", kl_cov_ratio=1.5), "kl_cov_ratio"),
        (dict(loss_type="dppo_tv", importance_sampling_level="sequence"), "token"),
        (dict(loss_type="geo_mean", top_entropy_quantile=0.5), "geo_mean"),
        (dict(log_ratio_clamp=(2.0, 1.0)), "log_ratio_clamp"),
        (dict(log_ratio_clamp=-1.0), "log_ratio_clamp"),
        (dict(kl_clamp=0.0), "kl_clamp"),
        (dict(clip_ratio_c=0.0), "clip_ratio_c"),
        (dict(dp_size=0), "dp_size"),
    ]:
        with pytest.raises(ValueError, match=match):
            GRPOOptions(**kw)
    with pytest.raises(ValueError, match="loss_scale_factor"):
        reference.grpo_loss(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), torch.ones(2),
                            cu_seqlens=torch.tensor([0, 1, 4]), loss_type="gpg",
                            loss_agg_mode="seq-mean-token-sum-norm")


def test_math_md_coefficients():
    """docs/math.md section 11's closed forms of c_t = dL/dl_t, against autograd through the loss layer."""
    from grpo_kernels.loss import grpo_loss_from_logprobs

    g = torch.Generator().manual_seed(1)
    B, T, el, eh = 3, 5, 0.2, 0.3
    lp = (torch.randn(B, T, generator=g, dtype=torch.float64) - 1.5).clamp(max=-0.05)
    old = lp + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)
    A = torch.randn(B, T, generator=g, dtype=torch.float64)
    A[0, 1] = 0.0
    m = torch.rand(B, T, generator=g) > 0.2
    w = 2 * torch.rand(B, T, generator=g, dtype=torch.float64)

    def c_of(**kw):
        x = lp.clone().requires_grad_()
        loss, _ = grpo_loss_from_logprobs(x, None, A, m, old, None, w, epsilon_low=el, epsilon_high=eh, **kw)
        return torch.autograd.grad(loss, x)[0]

    mf, d = m.double(), lp - old
    n = mf.sum(-1, keepdim=True)  # bool mask: n + 1e-8 is n (section 11.1)
    r, p, p_old = torch.exp(d), lp.exp(), old.exp()
    token_mean = mf / mf.sum()
    sgn = torch.sign(A)
    dt = sgn * torch.min(sgn * d, sgn * d.clamp(-el, eh))
    g_i = torch.exp((dt * mf).sum(-1, keepdim=True) / n)
    A_i = (A * mf).sum(-1, keepdim=True) / n
    w_i = torch.exp((torch.log(w + 1e-10) * mf).sum(-1, keepdim=True) / n)
    live = (A != 0) & ~((A > 0) & (d > eh)) & ~((A < 0) & (d < -el))
    keep = torch.where(A > 0, p - p_old <= eh, p - p_old >= -el).double()
    cov = torch.where(m, (A - A[m].mean()) * (lp - lp[m].mean()), -torch.inf)
    top = torch.zeros(B * T, dtype=torch.bool)
    top[cov.flatten().topk(max(1, int(m.sum() * 0.3))).indices] = True
    s_i = torch.exp((d * mf).sum(-1, keepdim=True) / n.clamp(min=1))
    band = ((A > 0) & (s_i <= 1 + eh)) | ((A < 0) & (s_i >= 1 - el))
    n_seqs = int((n > 0).sum())
    cases = [
        (dict(loss_type="geo_mean"), -(1 / B) * A_i * g_i * w_i * mf / n * live),
        (dict(loss_type="dppo_tv", clip_ratio_c=1.3), -A * r.clamp(max=1.3) * keep * w * token_mean),
        (dict(loss_type="dro", dro_beta=0.7, loss_agg_mode="seq-mean-token-sum"), (-A + 0.7 * d) * w * mf / n_seqs),
        (dict(loss_type="kl_cov", kl_cov_ratio=0.3, ppo_kl_coef=0.5),
         (-A * r + 0.5 * torch.sign(d) * top.view(B, T)) * w * token_mean),
        (dict(loss_type="cispo_verl"), -r.clamp(1 - el, 1 + eh) * A * w * token_mean),
        (dict(loss_type="gpg", loss_agg_mode="token-sum"), -A * w * mf),
        (dict(loss_type="dapo", importance_sampling_level="sequence_token", loss_agg_mode="seq-mean-token-mean"),
         -A * s_i * band * w * mf / (n * n_seqs)),
    ]
    for kw, want in cases:
        assert float((c_of(**kw) - want).abs().max()) < 1e-15, kw
