"""verl 0.9.1's policy losses, computed by grpo_kernels' loss layer.

`policy_loss_fn(loss_mode)` returns a function with the signature of verl's policy losses
(`verl.trainer.ppo.core_algos.PolicyLossFn`)::

    fn(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None,
       rollout_is_weights=None) -> (loss, metrics)

that reads the same `ActorConfig` fields as verl's own function for that mode and returns the
same loss (value and gradient w.r.t. log_prob) and the same metrics under verl's names
(`actor/pg_clipfrac`, `actor/ppo_kl`, `actor/pg_clipfrac_lower`, as Python floats, as verl
returns them), computed by `grpo_kernels.loss.grpo_loss_from_logprobs`. Every mode of verl
0.9.1's registry is here except `bypass_mode` (a rollout-correction driver that calls vanilla
or REINFORCE after computing its own weights and masks; run it in verl).

verl mode -> grpo_kernels keywords
----------------------------------
==========  ===================================================================================
vanilla     loss_type="dapo", dual_clip=clip_ratio_c (3.0), log_ratio_clamp=20
dppo_tv     loss_type="dppo_tv", clip_ratio_c (verl's fallback 20.0 for a config without it),
            log_ratio_clamp=20; epsilon_low/high are the TV thresholds
dppo_kl     loss_type="dppo_kl", as dppo_tv with binary-KL thresholds
gspo        loss_type="dapo", importance_sampling_level="sequence_token" (GSPO-token),
            log_ratio_clamp=(None, 10)
sapo        loss_type="sapo", sapo_temperature_pos/neg=tau_pos/tau_neg, log_ratio_clamp=20,
            loss_agg_mode="seq-mean-token-mean" (verl forces it, whatever loss_agg_mode says)
gpg         loss_type="gpg"
clip_cov    loss_type="clip_cov", clip_cov_ratio/lb/ub
kl_cov      loss_type="kl_cov", kl_cov_ratio, ppo_kl_coef
geo_mean    loss_type="geo_mean" (verl ignores loss_agg_mode: a plain mean over sequences)
dro         loss_type="dro", dro_beta
cispo       loss_type="cispo_verl" (clip(r, 1 - eps_low, 1 + eps_high); TRL's "cispo" differs),
            log_ratio_clamp=20
==========  ===================================================================================

Everywhere: epsilon_low = clip_ratio_low (or clip_ratio when None), epsilon_high =
clip_ratio_high (or clip_ratio); loss_agg_mode as passed; dp_size, batch_num_tokens,
global_batch_size and loss_scale_factor from `config.global_batch_info` (what verl's ppo_loss
writes there); policy_loss.* fields with verl's fallbacks when None; verl_metrics=True.

clip_cov picks its tokens at random, like verl, but from a different random stream (ranks of
uniform keys instead of torch.randperm, so the count stays on the device): where more tokens
qualify than clip_cov_ratio allows, the chosen ones differ from verl's from call to call, as
verl's do. kl_cov's top-k is a stable sort: verl's torch.topk may break exact ties differently.

Registering in verl
-------------------
Importing this module registers every mode in verl's policy-loss registry as
"grpo_kernels_<mode>" (e.g. "grpo_kernels_dppo_tv") when verl is importable; without verl the
module imports and registers nothing. verl imports plugin modules itself::

    actor_rollout_ref.model.external_lib=grpo_kernels.integrations.verl \\
    actor_rollout_ref.actor.policy_loss.loss_mode=grpo_kernels_dppo_tv

(`external_lib` is imported by verl's HFModelConfig in every worker; the environment variable
VERL_USE_EXTERNAL_MODULES=grpo_kernels.integrations.verl does the same at `import verl`.)
The rest of verl's actor loss — the entropy bonus and the KL loss, which verl's ppo_loss adds
with agg_loss — stays verl's. To compute all of it in one call of `grpo_kernels.fused_grpo_loss`
instead: beta=kl_loss_coef, kl_estimator="k3", kl_clamp=10.0 (low_var_kl),
use_bias_correction_kl=False, entropy_coef=entropy_coeff, loss_agg_mode=loss_agg_mode, and the
keywords above (for sapo only with loss_agg_mode="seq-mean-token-mean": verl aggregates sapo's
policy term that way whatever loss_agg_mode says, its KL and entropy terms by loss_agg_mode; for
geo_mean pass loss_agg_mode explicitly: it then aggregates the KL and entropy terms only).

Differences from verl: an empty batch (no unmasked token) gives loss 0, where verl divides 0 by
0; verl computes its clip fractions in float32, we in the log-probs' dtype.
"""
from __future__ import annotations

import importlib.util
from typing import Any, Callable

import torch

from ..loss import grpo_loss_from_logprobs
from ..options import GRPOOptions

PREFIX = "grpo_kernels_"
MODES = ("vanilla", "dppo_tv", "dppo_kl", "gspo", "sapo", "gpg", "clip_cov", "kl_cov", "geo_mean", "dro", "cispo")
# verl's metric names, in the order its functions return them.
_METRICS = (("pg_clipfrac", "actor/pg_clipfrac"), ("ppo_kl", "actor/ppo_kl"),
            ("pg_clipfrac_lower", "actor/pg_clipfrac_lower"))


def _get(config: Any, name: str, default: Any = None) -> Any:
    """A field of an ActorConfig / PolicyLossConfig (verl's BaseConfig) or a DictConfig / dict."""
    if config is None:
        return default
    if hasattr(config, "get"):
        return config.get(name, default)
    return getattr(config, name, default)


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


def options_for(loss_mode: str, loss_agg_mode: str | None, config: Any) -> GRPOOptions:
    """The GRPOOptions that reproduce verl's `loss_mode` under this ActorConfig (table in the module docstring)."""
    mode = loss_mode[len(PREFIX):] if loss_mode.startswith(PREFIX) else loss_mode
    if mode not in MODES:
        raise ValueError(f"loss_mode must be one of {', '.join(MODES)} (verl 0.9.1's registry without bypass_mode); "
                         f"got {loss_mode!r}")
    if config is None:
        raise ValueError("config (verl's ActorConfig) is required, as verl's policy losses assert")
    clip_ratio = _get(config, "clip_ratio")
    info = dict(_or(_get(config, "global_batch_info"), {}))
    dp_size = info.get("dp_size")
    kw: dict[str, Any] = dict(
        epsilon_low=_or(_get(config, "clip_ratio_low"), clip_ratio),
        epsilon_high=_or(_get(config, "clip_ratio_high"), clip_ratio),
        loss_agg_mode=loss_agg_mode,
        dp_size=1 if dp_size is None else int(dp_size),
        batch_num_tokens=info.get("batch_num_tokens"),
        global_batch_size=info.get("global_batch_size"),
        loss_scale_factor=info.get("loss_scale_factor"),
        verl_metrics=True,
    )
    policy = _get(config, "policy_loss")
    if mode == "vanilla":
        kw.update(loss_type="dapo", dual_clip=float(_get(config, "clip_ratio_c", 3.0)), log_ratio_clamp=20.0)
    elif mode in ("dppo_tv", "dppo_kl"):
        kw.update(loss_type=mode, clip_ratio_c=float(_get(config, "clip_ratio_c", 20.0)), log_ratio_clamp=20.0)
    elif mode == "gspo":
        kw.update(loss_type="dapo", importance_sampling_level="sequence_token", log_ratio_clamp=(None, 10.0))
    elif mode == "sapo":
        kw.update(loss_type="sapo", sapo_temperature_pos=float(_get(config, "tau_pos")),
                  sapo_temperature_neg=float(_get(config, "tau_neg")), log_ratio_clamp=20.0,
                  loss_agg_mode="seq-mean-token-mean")
    elif mode == "gpg":
        kw.update(loss_type="gpg")
    elif mode == "clip_cov":
        kw.update(loss_type="clip_cov", clip_cov_ratio=float(_or(_get(policy, "clip_cov_ratio"), 0.0002)),
                  clip_cov_lb=float(_or(_get(policy, "clip_cov_lb"), 1.0)),
                  clip_cov_ub=float(_or(_get(policy, "clip_cov_ub"), 5.0)))
    elif mode == "kl_cov":
        kw.update(loss_type="kl_cov", kl_cov_ratio=float(_or(_get(policy, "kl_cov_ratio"), 0.0002)),
                  ppo_kl_coef=float(_or(_get(policy, "ppo_kl_coef"), 1.0)))
    elif mode == "geo_mean":
        kw.update(loss_type="geo_mean", loss_agg_mode=None)
    elif mode == "dro":
        beta = _get(policy, "dro_beta")
        if beta is None or beta <= 0:
            raise ValueError("policy_loss.dro_beta must be a positive value when using DRO")
        kw.update(loss_type="dro", dro_beta=float(beta))
    else:  # cispo
        kw.update(loss_type="cispo_verl", log_ratio_clamp=20.0)
    return GRPOOptions(**kw)


def policy_loss_fn(loss_mode: str) -> Callable[..., tuple[torch.Tensor, dict[str, float]]]:
    """A drop-in for `verl.trainer.ppo.core_algos.get_policy_loss_fn(loss_mode)`, computed by grpo_kernels."""
    mode = loss_mode[len(PREFIX):] if loss_mode.startswith(PREFIX) else loss_mode
    if mode not in MODES:
        raise ValueError(f"loss_mode must be one of {', '.join(MODES)} (verl 0.9.1's registry without bypass_mode); "
                         f"got {loss_mode!r}")

    def compute_policy_loss(
        old_log_prob: torch.Tensor,
        log_prob: torch.Tensor,
        advantages: torch.Tensor,
        response_mask: torch.Tensor,
        loss_agg_mode: str = "token-mean",
        config: Any = None,
        rollout_is_weights: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        o = options_for(mode, loss_agg_mode, config)
        loss, metrics = grpo_loss_from_logprobs(log_prob, None, advantages, response_mask, old_log_prob, None,
                                                rollout_is_weights, o=o)
        return loss, {theirs: metrics[ours].item() for ours, theirs in _METRICS if metrics.get(ours) is not None}

    compute_policy_loss.__name__ = f"grpo_kernels_policy_loss_{mode}"
    compute_policy_loss.__qualname__ = compute_policy_loss.__name__
    return compute_policy_loss


def register(prefix: str = PREFIX) -> list[str]:
    """Register every mode in verl's policy-loss registry as prefix + mode; returns the names."""
    from verl.trainer.ppo.core_algos import register_policy_loss

    names = []
    for mode in MODES:
        register_policy_loss(prefix + mode)(policy_loss_fn(mode))
        names.append(prefix + mode)
    return names


REGISTERED: list[str] = []
if importlib.util.find_spec("verl") is not None:  # verl loads this module as a plugin: register ours
    try:
        REGISTERED = register()
    except ImportError:  # a verl without core_algos' dependencies: nothing to register into
        REGISTERED = []
