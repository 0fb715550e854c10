"""open-instruct's GRPO loss (grpo_fast) as grpo_kernels keywords.

open-instruct is not on the package registry; this recipe was written from its source at
allenai/open-instruct commit e6c3044aa6201c8bfa4573c1b03142af599e730d:

- open_instruct/grpo_fast.py, lines 703-724 (the learner's loss): ratio = exp(new - old);
  rho = grpo_utils.compute_rho_correction(...); pg_loss, clipfrac, kl =
  grpo_utils.compute_grpo_loss(...); per_token_loss = pg_loss + beta * kl; loss =
  masked_mean(per_token_loss, response_mask, None, loss_denominator) * (world_size //
  sequence_parallel_size);
- open_instruct/grpo_utils.py, lines 504-538 (`compute_grpo_loss`: the dapo and cispo policy
  terms, the rho weights, the four KL estimators) and lines 410-463 (`compute_rho_correction`);
- open_instruct/model_utils.py, lines 793-818 (`estimate_kl`), open_instruct/rl_utils.py,
  lines 426-449 (`masked_mean` with a constant denominator).

`loss_options(config, loss_denominator, ...)` gives the keywords of `grpo_kernels.fused_grpo_loss`
(or `grpo_loss_from_logprobs`) that compute that loss; open-instruct's rho weights (computed by
its own `compute_rho_correction`, a detached function of the old and vLLM log-probs) go in as
`rollout_is_ratio`. docs/openrlhf.md ("open-instruct") shows the call in grpo_fast's loop.

open-instruct -> grpo_kernels
-----------------------------
=============================  ============================================================
loss_fn="dapo"                 loss_type="dapo", epsilon_low=clip_lower, epsilon_high=clip_higher
loss_fn="cispo"                loss_type="cispo", epsilon_high=1 + clip_higher (TRL's cispo caps
                               the detached ratio at epsilon_high itself)
beta, kl_estimator 0 / 1 / 2   beta, kl_estimator "k1" / "k2" / "k3", use_bias_correction_kl=False
kl_estimator 3 (ratio * k1)    kl_estimator="k1", use_bias_correction_kl=True (k1 times the
                               token ratio, the gradient through both)
load_ref_policy=False          beta=0 (open-instruct's KL is then 0)
loss_denominator ("token": the batch_num_tokens=loss_denominator, loss_agg_mode="token-mean"
accumulation group's tokens    (sum of the masked per-token loss / the denominator)
over the DP ranks, or a float)
world_size //                  dp_size
sequence_parallel_size
temperature                    temperature (streaming_config.temperature)
rho weights                    rollout_is_ratio=rho.weights
=============================  ============================================================

Differences: open-instruct clamps new - ref to [-40, 40] before its KL estimators; we do not
(it matters only where the policies differ by more than 40 nats on a token).
"""
from __future__ import annotations

from typing import Any

LOSS_FNS = ("dapo", "cispo")
KL_ESTIMATORS = {0: ("k1", False), 1: ("k2", False), 2: ("k3", False), 3: ("k1", True)}


def _get(config: Any, name: str, default: Any = None) -> Any:
    if isinstance(config, dict):
        return config.get(name, default)
    return getattr(config, name, default)


def loss_options(config: Any, loss_denominator: float, world_size: int | None = None,
                 sequence_parallel_size: int | None = None, temperature: float = 1.0) -> dict[str, Any]:
    """The grpo_kernels keywords that compute grpo_fast's loss under this GRPOExperimentConfig (or
    a dict with its fields: loss_fn, clip_lower, clip_higher, beta, kl_estimator, load_ref_policy,
    world_size, sequence_parallel_size). `loss_denominator` is the one grpo_fast divides by
    (accumulation_token_counts[batch_start])."""
    loss_fn = _get(config, "loss_fn", "dapo")
    loss_fn = getattr(loss_fn, "value", loss_fn)  # open-instruct's GRPOLossType is a StrEnum
    if loss_fn not in LOSS_FNS:
        raise ValueError(f"loss_fn must be one of {', '.join(LOSS_FNS)} (open-instruct's GRPOLossType); "
                         f"got {loss_fn!r}")
    estimator = _get(config, "kl_estimator", 2)
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be 0, 1, 2 or 3 (open-instruct's estimate_kl); got {estimator!r}")
    kl_estimator, bias_corrected = KL_ESTIMATORS[estimator]
    world = _get(config, "world_size", 1) if world_size is None else world_size
    sp = _get(config, "sequence_parallel_size", 1) if sequence_parallel_size is None else sequence_parallel_size
    clip_lower, clip_higher = float(_get(config, "clip_lower", 0.2)), float(_get(config, "clip_higher", 0.272))
    return dict(
        loss_type=loss_fn,
        epsilon_low=clip_lower,
        epsilon_high=clip_higher if loss_fn == "dapo" else 1.0 + clip_higher,
        beta=float(_get(config, "beta", 0.05)) if _get(config, "load_ref_policy", True) else 0.0,
        kl_estimator=kl_estimator,
        use_bias_correction_kl=bias_corrected,
        loss_agg_mode="token-mean",
        batch_num_tokens=loss_denominator,
        dp_size=int(world) // int(sp),
        temperature=temperature,
    )
