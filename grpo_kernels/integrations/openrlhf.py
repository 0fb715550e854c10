"""OpenRLHF 0.11.2's policy loss and actor log-probs, computed by grpo_kernels.

Two drop-ins and a switch for a whole run; none imports OpenRLHF when this module is imported.

`install()`
    In an OpenRLHF process, replaces the `Actor` of its Ray trainer modules by a subclass whose
    instances are patched (`patch_actor`) and the trainer's `PolicyLoss` by ours. Run it in every
    Ray worker: `ray.init(runtime_env={"worker_process_setup_hook":
    "grpo_kernels.integrations.openrlhf.install"})` before OpenRLHF's `train` (docs/openrlhf.md).

`PolicyLoss`
    The constructor and forward of `openrlhf.models.loss.PolicyLoss` (ppo and gspo, dual clip,
    the train/rollout importance-sampling correction in every level, mode and gating, the
    dp_size / batch_num_tokens / global_batch_size normalisers) returning OpenRLHF's five
    values `(loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio)`; the loss and clip_ratio come
    from `grpo_kernels.grpo_loss_from_logprobs`. Swap the class where OpenRLHF builds it::

        import openrlhf.trainer.ray.ppo_actor as ppo_actor
        from grpo_kernels.integrations.openrlhf import PolicyLoss
        ppo_actor.PolicyLoss = PolicyLoss      # before ActorPPOTrainer is constructed

`patch_actor(actor, fused_linear=False)`
    Replaces `forward` on one `openrlhf.models.Actor` instance: the log-probs and the entropy come
    from one sweep over the logits (`grpo_kernels.token_logprobs`) that reads only the rows of
    the response tokens, applies the actor's temperature without a scaled copy and saves no
    softmax for the backward (the logits it read and a few numbers per row); with `fused_linear=True` from the last hidden states
    and the LM head (`grpo_kernels.linear_token_logprobs`), the logits never stored. Packed rows
    (`packing_samples`) and ring-attention slices go through OpenRLHF's own helpers
    (`openrlhf.models.ring_attn_utils`), as its forward does.

OpenRLHF option -> grpo_kernels keywords (PolicyLoss)
-----------------------------------------------------
====================================  ======================================================
policy_loss_type="ppo"                loss_type="dapo", log_ratio_clamp=20 (OpenRLHF clamps
                                      log r to [-20, 20])
policy_loss_type="gspo"               importance_sampling_level="sequence" (exp of the masked
                                      mean log-ratio, no clamp), aggregated per sequence
clip_eps_low / clip_eps_high          epsilon_low / epsilon_high
dual_clip                             dual_clip
token_level_loss True / False         loss_agg_mode "token-mean" / "seq-mean-token-mean"
batch_num_tokens, global_batch_size,  the same keywords (verl's agg_loss is OpenRLHF's
dp_size                               aggregate_loss); dp_size counts only where its
                                      normaliser is given, as in OpenRLHF
is_correction_*                       a detached per-token weight (`is_correction_weight`)
                                      passed as rollout_is_ratio (ppo only, as OpenRLHF)
====================================  ======================================================

The importance-sampling correction is a function of the old and rollout log-probs alone, so
it is computed here (`is_correction_weight`, which also gives OpenRLHF's is_filter_ratio) and
multiplied into the per-token loss by the loss layer; our loss layer's own
`vllm_importance_sampling_mode` is TRL's (a sequence ratio is the product, not the geometric
mean, and it has no binary-KL or TV gate), so it is not used.

Differences from OpenRLHF: where the whole micro-batch is masked, the loss, clip_ratio,
ppo_kl, vllm_kl and the token-level is_filter_ratio are 0 (OpenRLHF divides 0 by 0); an
`action_mask` of None means every token (OpenRLHF's gspo and normalised paths fail on None);
a missing `rollout_log_probs` where the correction needs them raises a ValueError (OpenRLHF
fails inside torch). The metrics are in the log-probs' dtype (OpenRLHF's clip_ratio and
is_filter_ratio are float32).

The patched actor (docs/openrlhf.md): the returned log-probs and entropy are float32 (as
OpenRLHF's, which casts the logits to float32); the entropy is 0 outside the response tokens
(OpenRLHF computes it everywhere; its trainer reads only the response); `output["logits"]`
is the model's own, neither cast nor divided by the temperature (fused_linear: no logits).
Without `action_mask` and without `return_logprobs` OpenRLHF's own forward runs.
Not supported, with an `UnsupportedOpenRLHFOption` naming the option: with fused_linear a
vision-language actor (`is_vlm`), an MoE model returning router logits
(`config.output_router_logits`, for `aux_loss_coef`), logit soft-capping or scaling in the
config, an LM head that is not a plain `torch.nn.Linear` (e.g. LoRA on lm_head), and a
DeepSpeed ZeRO-3-partitioned LM head.
"""
from __future__ import annotations

import importlib
import os
import types
from typing import Any

import torch

from .. import grpo_loss_from_logprobs, linear_token_logprobs, token_logprobs  # the public API
from ..options import GRPOOptions

Tensor = torch.Tensor

POLICY_LOSS_TYPES = ("ppo", "gspo")
IS_LEVELS = ("off", "token", "seq")
IS_MODES = ("mask", "clip")
IS_GATINGS = ("ratio", "binary_kl", "tv")
# OpenRLHF clamps the per-token log-ratio of its ppo loss to [-20, 20] before exp.
PPO_LOG_RATIO_CLAMP = 20.0
# OpenRLHF clamps the probabilities of its binary-KL and TV gates to [1e-6, 1 - 1e-6].
GATE_PROB_CLAMP = 1e-6


class UnsupportedOpenRLHFOption(NotImplementedError):
    """An OpenRLHF option the grpo_kernels drop-ins cannot compute."""


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
    return value


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """The mean of x over the mask's tokens, 0 where there are none."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def _row_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Each row's masked mean (B, 1), NaN for a row without tokens: OpenRLHF's per-sequence gate
    statistic, which then fails every band (the row counts as filtered)."""
    mask = mask.to(x.dtype)
    return ((x * mask).sum(-1) / mask.sum(-1)).unsqueeze(-1)


@torch.no_grad()
def is_correction_weight(old_log_probs: Tensor, rollout_log_probs: Tensor, mask: Tensor, level: str, mode: str,
                         gating: str, threshold) -> tuple[Tensor, Tensor]:
    """OpenRLHF's train/rollout correction as a detached per-token weight, and is_filter_ratio.

    The statistic is the ratio pi_old / pi_rollout per token (or the exponentiated masked mean
    of its log per sequence), or a divergence of the sampled token's probabilities (binary KL,
    TV; per token or the masked mean per sequence). mode="mask": units outside [low, high]
    get weight 0, the others their per-token ratio; mode="clip" (per-token ratio only): the
    ratio clamped to [low, high]. is_filter_ratio is the fraction of units outside the band
    (tokens: over the mask; sequences: over all rows)."""
    low, high = threshold
    seq = level == "seq"
    log_is = old_log_probs - rollout_log_probs
    token_is = log_is.exp()
    if gating == "ratio":
        stat = _row_mean(log_is, mask).exp() if seq else token_is
    else:
        p = rollout_log_probs.exp().clamp(GATE_PROB_CLAMP, 1 - GATE_PROB_CLAMP)
        q = old_log_probs.exp().clamp(GATE_PROB_CLAMP, 1 - GATE_PROB_CLAMP)
        if gating == "binary_kl":  # KL(Bernoulli(p) || Bernoulli(q)) of the sampled token
            stat = p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q))
        else:
            stat = (p - q).abs()
        if seq:
            stat = _row_mean(stat, mask)
    if mode == "clip":
        weight, outside = stat.clamp(min=low, max=high), (stat < low) | (stat > high)
    else:
        inside = (stat >= low) & (stat <= high)
        weight, outside = torch.where(inside, token_is, 0.0), ~inside
    outside = outside.to(old_log_probs.dtype)
    filter_ratio = outside.mean() if seq else _masked_mean(outside, mask)
    return weight.expand_as(old_log_probs), filter_ratio


class PolicyLoss(torch.nn.Module):
    """OpenRLHF 0.11.2's `PolicyLoss` (same constructor, forward and returns), on grpo_kernels' loss layer."""

    def __init__(
        self,
        clip_eps_low: float = 0.2,
        clip_eps_high: float = 0.2,
        dual_clip: float | None = None,
        token_level_loss: bool = True,
        policy_loss_type: str = "ppo",
        is_correction_level: str = "off",
        is_correction_mode: str = "mask",
        is_correction_gating: str = "ratio",
        is_correction_threshold=(0.5, 5.0),
    ) -> None:
        super().__init__()
        _choice("policy_loss_type", policy_loss_type, POLICY_LOSS_TYPES)
        _choice("is_correction_level", is_correction_level, IS_LEVELS)
        _choice("is_correction_mode", is_correction_mode, IS_MODES)
        _choice("is_correction_gating", is_correction_gating, IS_GATINGS)
        if is_correction_mode == "clip" and (is_correction_level == "seq" or is_correction_gating != "ratio"):
            raise ValueError("is_correction_mode='clip' requires is_correction_level='token' and "
                             "is_correction_gating='ratio' (a clamped weight is a per-token ratio)")
        if len(tuple(is_correction_threshold)) != 2:
            raise ValueError(f"is_correction_threshold must be a pair (low, high), got {is_correction_threshold!r}")
        low, high = (float(v) for v in is_correction_threshold)
        if is_correction_gating != "ratio" and is_correction_level != "off" and low > 0:
            raise ValueError(f"is_correction_gating={is_correction_gating!r} takes an upper bound only: "
                             f"is_correction_threshold must be (0, delta), got {is_correction_threshold!r}")
        self.clip_eps_low, self.clip_eps_high = clip_eps_low, clip_eps_high
        self.dual_clip = dual_clip
        self.policy_loss_type = policy_loss_type
        self.token_level_loss = token_level_loss and policy_loss_type != "gspo"  # GSPO: per-sequence mean
        self.is_correction_level, self.is_correction_mode = is_correction_level, is_correction_mode
        self.is_correction_gating, self.is_correction_threshold = is_correction_gating, (low, high)
        self.options(1, None, None)  # the scalar checks (epsilons, dual_clip > 1), now rather than at the first step

    def options(self, dp_size: int, batch_num_tokens, global_batch_size) -> GRPOOptions:
        """The GRPOOptions of this loss under one forward's normalisers (table in the module docstring)."""
        token = self.token_level_loss
        normaliser = batch_num_tokens if token else global_batch_size
        gspo = self.policy_loss_type == "gspo"
        return GRPOOptions(
            loss_type="dapo", epsilon_low=self.clip_eps_low, epsilon_high=self.clip_eps_high, dual_clip=self.dual_clip,
            importance_sampling_level="sequence" if gspo else "token",
            log_ratio_clamp=None if gspo else PPO_LOG_RATIO_CLAMP,
            loss_agg_mode="token-mean" if token else "seq-mean-token-mean",
            # OpenRLHF multiplies by dp_size only when the global normaliser is given.
            dp_size=1 if normaliser is None else int(dp_size),
            batch_num_tokens=batch_num_tokens if token else None,
            global_batch_size=None if token else global_batch_size,
            verl_metrics=True,
        )

    def forward(
        self,
        log_probs: Tensor,
        old_log_probs: Tensor,
        advantages: Tensor,
        action_mask: Tensor | None = None,
        rollout_log_probs: Tensor | None = None,
        dp_size: int = 1,
        batch_num_tokens=None,
        global_batch_size=None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
        """(loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio), as OpenRLHF's; the last two None
        unless the correction is on (ppo)."""
        o = self.options(dp_size, batch_num_tokens, global_batch_size)
        mask = torch.ones_like(log_probs, dtype=torch.bool) if action_mask is None else action_mask
        corrected = self.is_correction_level != "off"
        if corrected and rollout_log_probs is None:
            raise ValueError(f"rollout_log_probs are required with is_correction_level={self.is_correction_level!r}")
        old = old_log_probs
        weight = vllm_kl = is_filter_ratio = None
        if corrected and self.policy_loss_type == "gspo":  # GSPO's ratio is then against the rollout policy
            old = rollout_log_probs
        elif corrected:
            weight, is_filter_ratio = is_correction_weight(
                old_log_probs.detach(), rollout_log_probs.detach(), mask, self.is_correction_level,
                self.is_correction_mode, self.is_correction_gating, self.is_correction_threshold)
            vllm_kl = _masked_mean((rollout_log_probs - old_log_probs).detach(), mask)
        loss, metrics = grpo_loss_from_logprobs(log_probs, None, advantages, mask, old, None, weight, o=o)
        ppo_kl = _masked_mean((old_log_probs - log_probs).detach(), mask)
        return loss, metrics["pg_clipfrac"], ppo_kl, vllm_kl, is_filter_ratio


# --- the actor -------------------------------------------------------------------------------


def _unsupported(option: str, why: str) -> UnsupportedOpenRLHFOption:
    return UnsupportedOpenRLHFOption(
        f"{option} is not supported by grpo_kernels.integrations.openrlhf.patch_actor(fused_linear=True): {why}. "
        "Patch with fused_linear=False (the logits sweep) or leave this actor unpatched.")


def _lm_head(model: torch.nn.Module) -> torch.nn.Linear:
    """The model's output projection, checked for what the fused-linear sweep computes: logits = h W^T + b."""
    config = getattr(model, "config", None)
    if getattr(config, "output_router_logits", False):
        raise _unsupported("config.output_router_logits (MoE aux_loss)",
                           "the router logits come from the causal-LM forward, which the sweep bypasses")
    for name in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        value = getattr(config, name, None)
        if value not in (None, 1, 1.0):
            raise _unsupported(f"config.{name}={value}", "the sweep computes logits = hidden @ lm_head.weight^T "
                                                         "(+ bias) and nothing after it")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not torch.nn.Linear:
        raise _unsupported(f"an LM head of type {type(head).__name__}",
                           "the sweep needs the plain torch.nn.Linear weight (and bias) of the output projection")
    return head


def check_actor(actor: torch.nn.Module, fused_linear: bool) -> None:
    """What patch_actor can compute for this actor (raises UnsupportedOpenRLHFOption / TypeError)."""
    if not isinstance(actor, torch.nn.Module) or not isinstance(getattr(actor, "model", None), torch.nn.Module):
        raise TypeError(f"actor must be an openrlhf.models.Actor (a module with .model), got {type(actor).__name__}")
    if fused_linear:
        if getattr(actor, "is_vlm", False):
            raise _unsupported("a vision-language actor (is_vlm)",
                               "its decoder takes the image inputs through the model's own forward")
        _lm_head(actor.model)
        if not hasattr(actor.model, "get_decoder"):
            raise _unsupported(f"a model without get_decoder() ({type(actor.model).__name__})",
                               "the sweep needs the decoder's last hidden states")


def _response_rows(batch: int, seqlen: int, action_mask: Tensor | None, device) -> Tensor | None:
    """(B, S) bool: the positions whose next-token log-prob becomes an action log-prob (OpenRLHF
    keeps log_probs[:, :-1][:, -A:] * action_mask); None: every position (return_logprobs)."""
    if action_mask is None:
        return None
    rows = torch.zeros(batch, seqlen, dtype=torch.bool, device=device)
    A = action_mask.shape[1]
    rows[:, seqlen - 1 - A:seqlen - 1] = action_mask.to(device=device, dtype=torch.bool)
    return rows


def _forward(self, sequences: Tensor, action_mask: Tensor | None = None, attention_mask: Tensor | None = None,
             return_output: bool = False, allgather_logits: bool = False, return_logprobs: bool = False,
             ring_attn_group=None, packed_seq_lens=None, return_entropy: bool = False, **mm_inputs):
    """openrlhf.models.Actor.forward with the log-probs and entropy of one grpo_kernels sweep."""
    state = self._grpo_kernels
    if action_mask is None and not return_logprobs:  # the logits themselves were asked for
        return state["forward"](sequences, action_mask, attention_mask, return_output, allgather_logits,
                                return_logprobs, ring_attn_group, packed_seq_lens, return_entropy, **mm_inputs)
    if return_entropy and not return_output:
        raise ValueError("return_entropy=True needs return_output=True (the entropy is returned on the output)")
    batch, seqlen = sequences.size()
    rows = _response_rows(batch, seqlen, action_mask, sequences.device)
    packed = self.packing_samples
    if packed:
        from openrlhf.models.ring_attn_utils import (gather_and_pad_tensor, get_tensor_in_current_ring_attn_rank,
                                                     unpad_and_slice_tensor)
        flat_rows = None if rows is None else rows[attention_mask.bool()].unsqueeze(0)  # rows in unpad_input's order
        sequences, position_ids, labels, pad_len, indices = unpad_and_slice_tensor(sequences, attention_mask,
                                                                                   ring_attn_group)
        if flat_rows is not None and ring_attn_group is not None:  # this rank's slice, as the sequences
            flat_rows, _ = get_tensor_in_current_ring_attn_rank(flat_rows, ring_attn_group, 0)
        rows, forward_mask = flat_rows, None
    else:
        labels = torch.roll(sequences, shifts=-1, dims=1)  # position t predicts token t + 1
        forward_mask = attention_mask
        if getattr(self, "is_vlm", False):
            position_ids = None
            if mm_inputs:  # OpenRLHF's token types for the vision tokens of the whole sequence
                cfg = self._vlm_config
                token_types = (sequences == cfg.image_token_id).to(torch.int32)
                if getattr(cfg, "video_token_id", None) is not None:
                    token_types[sequences == cfg.video_token_id] = 2
                mm_inputs["mm_token_type_ids" if "image_grid_thw" in mm_inputs else "token_type_ids"] = token_types
        else:
            position_ids = attention_mask.long().cumsum(-1) - 1
            position_ids.masked_fill_(attention_mask == 0, 1)

    temperature = float(self.temperature)
    if state["fused_linear"]:
        head = _lm_head(self.model)
        if hasattr(head.weight, "ds_id"):
            raise _unsupported("DeepSpeed ZeRO-3 (a partitioned lm_head.weight)",
                               "the sweep reads the LM head's weight outside the module's own forward")
        output = self.model.get_decoder()(input_ids=sequences, attention_mask=forward_mask,
                                          position_ids=position_ids)
        log_probs, entropy = linear_token_logprobs(output["last_hidden_state"], head.weight, labels, temperature,
                                                   True, rows, lm_head_bias=head.bias, backend=state["backend"])
    else:
        output = self.model(sequences, attention_mask=forward_mask, position_ids=position_ids, **mm_inputs)
        log_probs, entropy = token_logprobs(output["logits"], labels, temperature, True, rows,
                                            backend=state["backend"])
    if packed:
        log_probs = gather_and_pad_tensor(log_probs, ring_attn_group, pad_len, indices, batch, seqlen)
        if return_entropy:
            entropy = gather_and_pad_tensor(entropy, ring_attn_group, pad_len, indices, batch, seqlen)
    if return_entropy:
        setattr(output, "entropy", entropy[:, :-1])
    log_probs = log_probs[:, :-1]
    if action_mask is None:
        return (log_probs, output) if return_output else log_probs
    action_log_probs = log_probs[:, -action_mask.shape[1]:] * action_mask.float()
    return (action_log_probs, output) if return_output else action_log_probs


def patch_actor(actor: torch.nn.Module, fused_linear: bool = False, backend: str = "auto") -> torch.nn.Module:
    """Make this OpenRLHF Actor compute its log-probs and entropy with grpo_kernels; returns it.

    The instance's `forward` is replaced (the class is untouched; DeepSpeed's engine calls the
    instance). fused_linear=True sweeps the decoder's last hidden states against the LM head
    instead of the logits. `unpatch_actor` restores OpenRLHF's forward."""
    if not isinstance(fused_linear, bool):
        raise TypeError(f"fused_linear must be a bool, got {type(fused_linear).__name__}")
    GRPOOptions(backend=backend)  # checks the name
    check_actor(actor, fused_linear)
    original = actor.__dict__.get("_grpo_kernels", {}).get("forward", actor.forward)
    actor._grpo_kernels = dict(forward=original, fused_linear=fused_linear, backend=backend)
    actor.forward = types.MethodType(_forward, actor)
    return actor


def unpatch_actor(actor: torch.nn.Module) -> torch.nn.Module:
    """Undo patch_actor."""
    state = actor.__dict__.pop("_grpo_kernels", None)
    if state is not None:
        actor.__dict__.pop("forward", None)
    return actor


# --- the trainer -----------------------------------------------------------------------------

# OpenRLHF's Ray workers build their Actors and the PolicyLoss from these modules' globals.
TRAINER_MODULES = ("openrlhf.trainer.ray.ppo_actor", "openrlhf.trainer.ray.launcher")
FUSED_LINEAR_ENV = "GRPO_KERNELS_OPENRLHF_FUSED_LINEAR"
_ORIGINALS: dict[tuple[str, str], Any] = {}  # (module, name) -> OpenRLHF's own object


def _patching_actor_class(actor_cls: type, fused_linear: bool) -> type:
    """A subclass of OpenRLHF's Actor whose instances are patched as they are built."""

    class GrpoKernelsActor(actor_cls):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            patch_actor(self, fused_linear=fused_linear)

    GrpoKernelsActor.__qualname__ = GrpoKernelsActor.__name__ = f"GrpoKernels{actor_cls.__name__}"
    return GrpoKernelsActor


def install(fused_linear: bool | None = None, modules=None) -> list[str]:
    """Switch an OpenRLHF process over: every Actor its Ray workers build (policy, reference, EMA)
    is patched (`patch_actor`) and the trainer's PolicyLoss is ours. Run it in each worker, e.g. as
    Ray's `worker_process_setup_hook` (docs/openrlhf.md). fused_linear None reads the environment
    variable GRPO_KERNELS_OPENRLHF_FUSED_LINEAR ("1": the fused-linear sweep). `modules`: the
    modules to patch (default OpenRLHF's TRAINER_MODULES). Returns what was replaced."""
    if fused_linear is None:
        fused_linear = os.environ.get(FUSED_LINEAR_ENV, "0") == "1"
    if modules is None:
        modules = [importlib.import_module(name) for name in TRAINER_MODULES]
    done = []
    for module in modules:
        for name, replacement in (("Actor", None), ("PolicyLoss", PolicyLoss)):
            current = getattr(module, name, None)
            if current is None:
                continue
            original = _ORIGINALS.setdefault((module.__name__, name), current)
            setattr(module, name, _patching_actor_class(original, fused_linear) if replacement is None else replacement)
            done.append(f"{module.__name__}.{name}")
    return done


def uninstall(modules=None) -> None:
    """Put OpenRLHF's own Actor and PolicyLoss back (Actors built meanwhile stay patched)."""
    if modules is None:
        modules = [importlib.import_module(name) for name in TRAINER_MODULES]
    for module in modules:
        for name in ("Actor", "PolicyLoss"):
            original = _ORIGINALS.pop((module.__name__, name), None)
            if original is not None:
                setattr(module, name, original)
