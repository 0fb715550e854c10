"""TRL 1.16's GRPOTrainer with its policy loss computed by grpo_kernels.

One line switches a trainer over, in either of two ways::

    trainer = FusedGRPOTrainer(model, reward_funcs, args=GRPOConfig(...), train_dataset=...)  # instead of GRPOTrainer
    patch_grpo_trainer(trainer)                                # a GRPOTrainer built elsewhere (a script, a framework)

Both exist because both situations are common: a subclass is the clean choice for code that
constructs the trainer, and a patch function is the only choice for code that receives a built
one. They share every line that matters: `FusedGRPOTrainer` is `_FusedLoss` mixed into
`GRPOTrainer`, and `patch_grpo_trainer` binds the same `_FusedLoss` methods onto an instance;
both then run the same `_setup`, which validates the configuration.

What changes
------------
TRL 1.16 scores tokens with its chunked fused LM head (`trl.trainer.utils.add_fused_lm_head`):
the model returns per-token log-probs and entropies, and `_compute_loss` builds the loss from
them in eager PyTorch over (B, T) tensors. The drop-in overrides two methods:

- `_compute_loss`: one model forward, then one call of `grpo_kernels.fused_linear_grpo_loss`
  (head="hidden") or `grpo_kernels.fused_grpo_loss` (head="logits"), which computes the
  log-probs, the entropy (from the same sweep: no separate entropy pass), the loss and TRL's
  metrics, and whose backward writes the gradient in one more sweep. The metrics are logged
  under TRL's names into `self._metrics`.
- `_get_per_token_logps_and_entropies`: the no-grad old- and reference-policy passes, by the
  same sweep (`linear_token_logprobs` / `token_logprobs`).

Everything else — generation, rewards, advantages, the old/ref/vLLM inputs, the optimizer — is
TRL's own code, untouched.

`head` chooses what the model hands to the loss:

- "hidden" (default): the last hidden states (B, T, H) at the completion positions and the
  output projection go to `fused_linear_grpo_loss`; logits are never materialised, as with
  TRL 1.16's own fused head.
- "logits": the model's own logits (its forward runs the LM head, including any logit
  scaling or soft-capping) at the T completion positions, passed to `fused_grpo_loss`: the
  model computes exactly those positions (`logits_to_keep` as a tensor of positions), or, for
  a model that only takes a count, its whole output (B, T + 1, V), of which `fused_grpo_loss`
  scores rows [:-1] and writes the whole gradient itself (no slice for autograd to copy). The
  temperature is an argument of the sweep, never an in-place division. This
  holds the (B, T, V) logits and their gradient, which TRL 1.16's fused head does not, so it
  costs memory; it exists for models whose head the hidden path cannot reproduce (soft-capping)
  and for comparison. `inplace_backward=True` writes the gradient into the logits' storage;
  it is only valid when no autograd node saved the logits (a plain linear head: true for
  Llama/Qwen/Mistral; false with soft-capping, whose tanh saves its output).

GRPOConfig -> grpo_kernels keywords
-----------------------------------
======================================  ==================================================
loss_type, beta, delta                  same names
epsilon, epsilon_high                   epsilon_low, epsilon_high (None -> epsilon, as TRL)
temperature                             temperature (divided by the model's logit scale
                                        with head="hidden", as TRL's fused head applies it)
importance_sampling_level               importance_sampling_level
use_bias_correction_kl                  use_bias_correction_kl (estimator k3, as TRL)
max_completion_length                   max_completion_length (the dr_grpo normaliser)
sapo_temperature_pos/neg, vespo_*       same names
top_entropy_quantile                    top_entropy_quantile
off_policy_mask_threshold               off_policy_mask_threshold, with the batch's
                                        sampling_per_token_logps as sampling_logprobs
entropy_coef                            entropy_coef (rescaled for accumulation, below)
vLLM importance_sampling_ratio          rollout_is_ratio (only when use_vllm and
                                        vllm_importance_sampling_correction, as TRL)
completion_mask * tool_mask             completion_mask
======================================  ==================================================

Normalisation exactly as TRL 1.16: grpo, bnpo, dr_grpo, luspo and sapo divide the loss (entropy
bonus included) by the gradient accumulation steps in train mode; dapo, cispo and vespo divide
by ``num_items_in_batch.clamp(min=1) / num_processes * grad_accum / steps_per_generation``
(train) or ``num_items_in_batch.clamp(min=1) / num_processes`` (eval) and not by the
accumulation steps, while their entropy bonus is divided by them.

The KL weight under GSPO
------------------------
With importance_sampling_level="sequence", beta != 0 and use_bias_correction_kl, TRL 1.16
weights each token's KL with the sequence ratio s_i, which adds a spurious cross-token gradient
(TRL issue 6586); grpo_kernels weights it with the per-token ratio r_t, an unbiased estimate of
the gradient of KL(pi_theta || pi_ref) (docs/math.md). The drop-in keeps grpo_kernels' form by
default and logs a warning; pass ``kl_ratio="sequence"`` to reproduce TRL's numbers exactly.
Outside that combination the two are identical.

Not supported (ValueError when the trainer is built, never a silent change of the math)
----------------------------------------------------------------------------------------
- vision-language models: TRL's multimodal batch plumbing (pixel values, image grids, token
  type ids) is not mapped;
- Mixture-of-Experts models with the router load-balancing loss on (router_aux_loss_coef
  != 0): the aux loss comes out of TRL's fused head, which the drop-in bypasses;
- use_adaptive_entropy: the controller's window statistics are not mapped;
- top_entropy_quantile < 1 with several processes: TRL takes the entropy quantile over all
  ranks, grpo_kernels over the local batch;
- top_entropy_quantile < 1 together with an entropy bonus: TRL's `policy_loss` metric then
  needs the entropy over the masked tokens, which fused_grpo_loss does not report;
- a GRPOTrainer subclass that overrides `_compute_loss` (e.g. TRL's experimental GMPO): its
  loss is not this one (patch_grpo_trainer refuses it);
- head="hidden" with logit soft-capping (Gemma 2/3), a non-positive logit scale, DeepSpeed
  ZeRO-3 (the fused-linear backward reads the LM head weight outside the module's gather hooks)
  or FSDP version 1 (flat parameters): use head="logits" there;
- GRPOConfig values grpo_kernels rejects (e.g. delta <= 1 + epsilon_high, epsilon >= 1,
  loss_type="vespo" at sequence level);
- a backend that cannot run this head on the trainer's device, with the message the first step
  would give: backend="cuda" with head="hidden" (the fused-linear sweep has auto, triton and
  torch only; "cuda" is a logits sweep), "triton" on the CPU without TRITON_INTERPRET=1, "cuda"
  without a CUDA device or a usable build of csrc/.

`use_liger_kernel=True` is accepted: in TRL 1.16 it only swaps the model's layer kernels
(norms, MLP, RoPE) and never the loss.
"""
from __future__ import annotations

import functools
import inspect
import logging
import types
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils import is_peft_model
from torch.distributed.tensor import DTensor
from trl import GRPOTrainer
from trl.trainer.utils import nanmax, nanmin

import grpo_kernels
from grpo_kernels.linear import backend_module as linear_backend_module
from grpo_kernels.options import CLIPPED_LOSS_TYPES, GRPOOptions
from grpo_kernels.sweep import require as require_backend
from grpo_kernels.sweep import resolve_backend

__all__ = ["FusedGRPOTrainer", "patch_grpo_trainer", "HEADS", "KL_RATIOS"]

logger = logging.getLogger(__name__)

HEADS = ("hidden", "logits")
KL_RATIOS = ("token", "sequence")
# Loss types that TRL normalises by the generation batch's token count rather than per micro-batch.
_TOKEN_COUNT_NORMALISED = ("dapo", "cispo", "vespo")
# Batch fields of vision-language models: TRL passes them to the model; the drop-in does not.
_MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes",
                    "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")
# Keyword of the forward that `_add_hidden_states_forward` installs (head="hidden").
_HIDDEN_STATES = "grpo_kernels_hidden_states"


@dataclass(frozen=True)
class _Setup:
    """What `_setup` derived from the trainer's configuration, fixed for the run."""

    head: str
    options: dict[str, Any]  # fused_grpo_loss keywords fixed by the GRPOConfig (temperature per head)
    # What the model's forward takes as `logits_to_keep` (head="logits"): "positions" (a tensor of
    # positions, transformers >= 5), "count" (an int: the last n positions) or "none".
    logits_to_keep: str


def _logit_scale(model: torch.nn.Module) -> float:
    """The factor TRL 1.16's fused LM head multiplies the logits by (its add_fused_lm_head, verbatim)."""
    config = model.config.get_text_config()
    scale = getattr(config, "logit_scale", None)
    if scale is None:
        scale = getattr(config, "output_multiplier", None)
    if scale is None:
        scale = getattr(config, "lm_head_multiplier", None)
    if scale is None and getattr(config, "logits_scaling", None) is not None:
        scale = config.logits_scaling if config.model_type == "hyperclovax" else 1 / config.logits_scaling
    return 1.0 if scale is None else float(scale)


def _lm_module(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a PEFT wrapper: the one TRL patched with its fused head."""
    return model.get_base_model() if is_peft_model(model) else model


def _add_hidden_states_forward(model: torch.nn.Module) -> None:
    """Let `model(..., grpo_kernels_hidden_states=True)` return the backbone's last hidden states and
    the LM head's weight and bias.

    Going through the model's own forward (rather than calling its backbone directly) keeps every
    wrapper on the way in the loop: DDP's gradient-sync bookkeeping, PEFT, accelerate's autocast.
    Without the flag the forward is the previous one (TRL's fused head, then the original), so
    generation is unchanged. Mirrors TRL's add_fused_lm_head, lookups included (`base_model` for
    the backbone, transformers >= 5 text models; the head on each call, since FSDP and PEFT may
    replace it after patching).

    The head is used after the forward returns, so DDP with find_unused_parameters (the Trainer's
    default without gradient checkpointing, and for PEFT models) would find no path to it from the
    forward's outputs, mark it ready at once, and fail when its gradient arrives. DDP searches from
    the outputs' grad_fn, which a parameter lacks, so the forward also returns an empty view of each
    head parameter: it has a grad_fn leading to the parameter, and costs nothing (DDP clones such
    outputs; these hold no elements).
    """
    previous = model.forward

    @functools.wraps(type(model).forward)  # `generate` validates its kwargs against this signature
    def forward(self, *args, **kwargs):
        if not kwargs.pop(_HIDDEN_STATES, False):
            return previous(*args, **kwargs)
        kwargs.pop("labels", None)  # PEFT's wrapper passes labels=None along; the backbone takes none
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state
        head = self.get_output_embeddings()
        return hidden, head.weight, head.bias, tuple(p[:0] for p in head.parameters())

    model.forward = types.MethodType(forward, model)


def _unsupported(trainer: GRPOTrainer, head: str, inplace_backward: bool) -> list[str]:
    """Why the drop-in cannot reproduce this trainer's loss exactly; empty when it can."""
    args = trainer.args
    softcapping = getattr(trainer.model.config.get_text_config(), "final_logit_softcapping", None)
    problems = []
    if trainer._is_vlm:
        problems.append("vision-language models are not supported (TRL's multimodal inputs are not mapped)")
    if trainer.aux_loss_enabled:
        problems.append("the MoE router load-balancing loss is not supported; set router_aux_loss_coef=0.0")
    if trainer.use_adaptive_entropy:
        problems.append("use_adaptive_entropy=True is not supported; use a fixed entropy_coef")
    if trainer.top_entropy_quantile < 1.0 and trainer.accelerator.num_processes > 1:
        problems.append("top_entropy_quantile < 1 with several processes is not supported: TRL takes the quantile "
                        "over all ranks, grpo_kernels over the local batch")
    if trainer.top_entropy_quantile < 1.0 and trainer.entropy_coef != 0.0:
        problems.append("top_entropy_quantile < 1 together with entropy_coef != 0 is not supported: TRL's "
                        "policy_loss metric needs the entropy over the high-entropy tokens, which is not reported")
    if inplace_backward and softcapping is not None:
        problems.append("inplace_backward=True with logit soft-capping: its tanh saves the logits for its backward")
    if head == "hidden":
        if softcapping is not None:
            problems.append("logit soft-capping (final_logit_softcapping) needs head='logits'")
        if not _logit_scale(trainer.model) > 0.0:
            problems.append(f"a logit scale of {_logit_scale(trainer.model)} needs head='logits'")
        fsdp = getattr(trainer.accelerator.state, "fsdp_plugin", None)
        if fsdp is not None and getattr(fsdp, "fsdp_version", 1) != 2:
            problems.append("FSDP (version 1) needs head='logits' (its flat parameters are only whole inside "
                            "the module's forward; FSDP2 is supported)")
        if args.deepspeed_plugin is not None and args.deepspeed_plugin.zero_stage == 3:
            problems.append("DeepSpeed ZeRO-3 needs head='logits' (the fused-linear backward reads the LM head "
                            "weight outside the module's parameter gathering)")
    return problems


def _config_options(trainer: GRPOTrainer, kl_ratio: str, backend: str, inplace_backward: bool) -> dict[str, Any]:
    """The fused_grpo_loss keywords that the GRPOConfig fixes, read where TRL's _compute_loss reads them."""
    args = trainer.args
    return dict(
        loss_type=trainer.loss_type,
        beta=trainer.beta,
        epsilon_low=trainer.epsilon_low,
        epsilon_high=trainer.epsilon_high,
        delta=args.delta,
        temperature=trainer.temperature,
        importance_sampling_level=trainer.importance_sampling_level,
        use_bias_correction_kl=args.use_bias_correction_kl,
        kl_estimator="k3",
        kl_ratio=kl_ratio,
        max_completion_length=trainer.max_completion_length,
        sapo_temperature_pos=args.sapo_temperature_pos,
        sapo_temperature_neg=args.sapo_temperature_neg,
        vespo_k_pos=args.vespo_k_pos,
        vespo_lambda_pos=args.vespo_lambda_pos,
        vespo_k_neg=args.vespo_k_neg,
        vespo_lambda_neg=args.vespo_lambda_neg,
        top_entropy_quantile=trainer.top_entropy_quantile,
        off_policy_mask_threshold=trainer.off_policy_mask_threshold,
        inplace_backward=inplace_backward,
        backend=backend,
    )


def _check_backend(head: str, backend: str, device: torch.device) -> None:
    """Raise ValueError now, with the message the first step would raise, if `backend` cannot run
    this head's sweep on the trainer's device: 'cuda' has no fused-linear sweep (head="hidden");
    'triton' needs CUDA tensors, or the CPU under TRITON_INTERPRET=1; 'cuda' needs a CUDA device
    and the compiled (or compilable) csrc/ module. Same checks, in the same order, as
    fused_linear_grpo_loss and fused_grpo_loss make before their sweeps."""
    try:
        name = resolve_backend(backend, device)
        if head == "hidden":
            linear_backend_module(name)  # raises for 'cuda'
        else:
            require_backend(name, device)
    except (RuntimeError, ValueError) as error:
        raise ValueError(str(error)) from error


def _setup(trainer: GRPOTrainer, head: str, kl_ratio: str, backend: str, inplace_backward: bool) -> None:
    """Validate the configuration and prepare the model; raises ValueError for anything unsupported."""
    if head not in HEADS:
        raise ValueError(f"head must be one of {', '.join(HEADS)}; got {head!r}")
    if kl_ratio not in KL_RATIOS:
        raise ValueError(f"kl_ratio must be one of {', '.join(KL_RATIOS)}; got {kl_ratio!r}")
    if inplace_backward and head != "logits":
        raise ValueError("inplace_backward=True applies to head='logits' (head='hidden' holds no logits)")
    problems = _unsupported(trainer, head, inplace_backward)
    if problems:
        raise ValueError("grpo_kernels cannot reproduce TRL's GRPO loss for this configuration:\n- "
                         + "\n- ".join(problems))
    options = _config_options(trainer, kl_ratio, backend, inplace_backward)
    if head == "hidden":  # TRL's fused head computes logit_scale * (h W^T + b) / temperature
        options["temperature"] = trainer.temperature / _logit_scale(trainer.model)
    try:
        GRPOOptions(**options)
    except (TypeError, ValueError) as error:
        raise ValueError(f"grpo_kernels rejects this GRPOConfig: {error}") from error
    _check_backend(head, backend, trainer.accelerator.device)

    keep = inspect.signature(_lm_module(trainer.model).forward).parameters.get("logits_to_keep")
    logits_to_keep = "none" if keep is None else "positions" if "Tensor" in str(keep.annotation) else "count"
    if head == "hidden":
        models = [trainer.model, trainer.ref_model]
        for model in models:
            if model is not None:
                _add_hidden_states_forward(_lm_module(trainer.accelerator.unwrap_model(model)))
    trainer._grpo_kernels = _Setup(head=head, options=options, logits_to_keep=logits_to_keep)

    if (trainer.importance_sampling_level == "sequence" and trainer.beta != 0.0 and
            trainer.args.use_bias_correction_kl and kl_ratio == "token"):
        logger.warning(
            "grpo_kernels weights the KL term with the per-token ratio under importance_sampling_level='sequence', "
            "where TRL 1.16 uses the sequence ratio (TRL issue 6586: a spurious cross-token gradient). Pass "
            "kl_ratio='sequence' to reproduce TRL exactly.")


def _reject_multimodal(fields: dict[str, Any]) -> None:
    present = [key for key in _MULTIMODAL_KEYS if fields.get(key) is not None]
    if present:
        raise ValueError(f"grpo_kernels' TRL drop-in scores text-only batches; this one has {', '.join(present)}")


class _FusedLoss:
    """The methods that replace GRPOTrainer's; shared by FusedGRPOTrainer and patch_grpo_trainer."""

    _grpo_kernels: _Setup

    def _completion_logits(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                           logits_to_keep: int) -> torch.Tensor:
        """The model's logits at the K positions that predict the completion (position j predicts
        token j + 1: the K positions before the last one): exactly (B, K, V), or the model's whole
        output (B, L', V), whose rows L' - 1 - K .. L' - 2 our kernels score (the full-output form)."""
        K, L, keep = logits_to_keep, input_ids.size(1), self._grpo_kernels.logits_to_keep
        with self.accelerator.autocast():
            if keep == "positions":
                # The LM head runs on exactly those K positions: the logits need no slicing, so their
                # gradient reaches the head as is (a slice's backward would allocate the full tensor).
                positions = torch.arange(L - K - 1, L - 1, device=input_ids.device)
                return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                             logits_to_keep=positions).logits
            count = {"logits_to_keep": K + 1} if keep == "count" else {}
            logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **count).logits
        return logits  # the full output: its gradient is written whole by our kernels, no slice backward

    def _completion_hidden(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                           logits_to_keep: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The last hidden states (B, K, H) at the K positions that predict the completion, and the LM
        head's weight and bias, in the dtype TRL's fused head multiplies them in: float32 with
        cast_lm_head_to_fp32, else the autocast dtype under mixed precision, else the hidden states' own."""
        with self.accelerator.autocast():
            hidden, weight, bias, _ = model(input_ids=input_ids, attention_mask=attention_mask,
                                            **{_HIDDEN_STATES: True})
            autocast_dtype = torch.get_autocast_dtype(hidden.device.type) \
                if torch.is_autocast_enabled(hidden.device.type) else None
        hidden = hidden[:, :-1][:, -logits_to_keep:]
        if isinstance(weight, DTensor):  # FSDP2 shards the head; TRL gathers it the same way
            weight = weight.full_tensor()
            bias = None if bias is None else bias.full_tensor()
        dtype = torch.float32 if self.args.cast_lm_head_to_fp32 else autocast_dtype or hidden.dtype
        # No-ops without mixed precision; with it, part of the graph (gradients reach the float32
        # master weights). The sweep itself runs outside autocast and accumulates in float32.
        return hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)

    def _token_logprobs(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        logits_to_keep: int) -> tuple[torch.Tensor, torch.Tensor]:
        """log pi(y_t) and the entropy (B, K) of the completion tokens; the sweep yields both at once."""
        setup = self._grpo_kernels
        completion_ids = input_ids[:, -logits_to_keep:]
        temperature, backend = setup.options["temperature"], setup.options["backend"]
        if setup.head == "logits":
            logits = self._completion_logits(model, input_ids, attention_mask, logits_to_keep)
            return grpo_kernels.token_logprobs(logits, completion_ids, temperature=temperature,
                                               return_entropy=True, backend=backend)
        hidden, weight, bias = self._completion_hidden(model, input_ids, attention_mask, logits_to_keep)
        return grpo_kernels.linear_token_logprobs(hidden, weight, completion_ids, temperature=temperature,
                                                  return_entropy=True, lm_head_bias=bias, backend=backend)

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **multimodal):
        """TRL's old/ref-policy scoring (no_grad at its call sites), by grpo_kernels' sweep."""
        if compute_aux_loss:
            raise ValueError("grpo_kernels' TRL drop-in does not compute the MoE aux loss")
        _reject_multimodal(multimodal)
        batch_size = batch_size or input_ids.size(0)
        logps, entropies = [], []
        for start in range(0, input_ids.size(0), batch_size):
            rows = slice(start, start + batch_size)
            lp, ent = self._token_logprobs(model, input_ids[rows], attention_mask[rows], logits_to_keep)
            logps.append(lp)
            entropies.append(ent)
        return torch.cat(logps), (torch.cat(entropies) if compute_entropy else None), None

    def _compute_loss(self, model, inputs: dict[str, Any]) -> torch.Tensor:
        setup = self._grpo_kernels
        _reject_multimodal(inputs)
        mode = "train" if self.model.training else "eval"
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        # TRL scales for gradient accumulation itself (the Trainer's own scaling is off), in train mode only.
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0

        # fused_grpo_loss returns  policy - entropy_coef * H.  TRL returns  policy / accumulation - coef * H /
        # accumulation  for grpo, bnpo, dr_grpo, luspo, sapo: divide our loss by the accumulation steps. For
        # dapo, cispo, vespo it returns  sum / normaliser - coef * H / accumulation: pass the normaliser and a
        # coefficient already divided by the accumulation steps.
        num_items, entropy_coef, divisor = None, self.entropy_coef, accumulation
        if setup.options["loss_type"] in _TOKEN_COUNT_NORMALISED:
            normaliser = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":  # num_items_in_batch spans the generation batch: rescale to one accumulation window
                normaliser = normaliser * accumulation / self.args.steps_per_generation
            # grpo_kernels clamps the normaliser at 1, TRL only the token count: below 1 (fewer active tokens
            # than processes), pass 1 and scale the whole loss back, exactly.
            shrink = min(float(normaliser), 1.0)
            num_items, entropy_coef, divisor = normaliser / shrink, self.entropy_coef * shrink / accumulation, shrink

        advantages = inputs["advantages"]
        old_logprobs = inputs.get("old_per_token_logps")
        use_is_ratio = self.use_vllm and self.vllm_importance_sampling_correction
        tensors = dict(
            completion_mask=mask,
            old_logprobs=old_logprobs,
            ref_logprobs=inputs.get("ref_per_token_logps") if self.beta != 0.0 else None,
            rollout_is_ratio=inputs.get("importance_sampling_ratio") if use_is_ratio else None,
            sampling_logprobs=inputs.get("sampling_per_token_logps"),
            num_items_in_batch=num_items,
            entropy_coef=entropy_coef,
            **setup.options,
        )
        K = completion_ids.size(1)
        if setup.head == "logits":
            logits = self._completion_logits(model, input_ids, attention_mask, K)
            loss, metrics = grpo_kernels.fused_grpo_loss(logits, completion_ids, advantages, **tensors)
        else:
            hidden, weight, bias = self._completion_hidden(model, input_ids, attention_mask, K)
            loss, metrics = grpo_kernels.fused_linear_grpo_loss(hidden, weight, completion_ids, advantages,
                                                                lm_head_bias=bias, **tensors)
        if self._entropy_bonus_enabled:
            # TRL logs the loss before the bonus (and, for grpo-like types, before the accumulation division).
            # Its bonus averages the entropy over `mask`, as metrics["entropy"] does (top_entropy_quantile is 1
            # here, see _unsupported).
            policy_loss = loss.detach() + entropy_coef * metrics["entropy"]
            if setup.options["loss_type"] in _TOKEN_COUNT_NORMALISED:
                policy_loss = policy_loss / divisor
            self._metrics[mode]["policy_loss"].append(self.accelerator.gather(policy_loss).nanmean().item())
            if mode == "train" and self.accelerator.sync_gradients:
                self._metrics[mode]["entropy_coef"].append(self.entropy_coef)
        self._log_loss_metrics(mode, metrics, advantages, old_logprobs, mask, inputs)
        return loss / divisor

    def _log_loss_metrics(self, mode: str, metrics: dict[str, Any], advantages: torch.Tensor,
                          old_logprobs: torch.Tensor | None, mask: torch.Tensor, inputs: dict[str, Any]) -> None:
        """TRL's metrics under TRL's names, reduced over processes as TRL's global_masked_mean does.

        fused_grpo_loss reports local masked means; times the local count they are the local sums
        that TRL reduces. The per-sequence extremes (clip_ratio/low_min, high_max) and VESPO's weight
        need the ratio per token, recomputed here from the log-probs the loss returned.
        """
        setup, log = self._grpo_kernels, self._metrics[mode]
        tokens = mask.sum().float()

        def global_mean(mean: torch.Tensor, count: torch.Tensor) -> float:
            totals = self.accelerator.reduce(torch.stack([mean.float() * count, count]), reduction="sum")
            return (totals[0] / totals[1].clamp(min=1.0)).item()

        def count_of(x: torch.Tensor) -> torch.Tensor:  # (B, 1) values count once per sequence, as in TRL
            return tokens.new_tensor(float(x.shape[0])) if x.shape[1] == 1 else tokens

        if setup.options["beta"] != 0.0:
            log["kl"].append(global_mean(metrics["kl"], tokens))
        log["entropy"].append(global_mean(metrics["entropy"], tokens))

        loss_type = setup.options["loss_type"]
        if loss_type not in CLIPPED_LOSS_TYPES and loss_type not in ("cispo", "vespo"):
            return
        A = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
        log_ratio = metrics["logprobs"] - (metrics["logprobs"] if old_logprobs is None else old_logprobs)
        if loss_type == "vespo":
            phi = self.get_gamma_weights(A, log_ratio, mask, inputs.get("importance_sampling_ratio"),
                                         self.args.vespo_k_pos, self.args.vespo_lambda_pos,
                                         self.args.vespo_k_neg, self.args.vespo_lambda_neg)
            log["vespo/phi_seq_mean"].append(global_mean(_masked_mean(phi, mask), count_of(phi)))
            return
        if setup.options["importance_sampling_level"] == "sequence":
            log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
        ratio = torch.exp(log_ratio)
        if loss_type == "cispo":
            is_clipped = (ratio > self.epsilon_high) & (A > 0)
            log["cispo_clip_ratio"].append(global_mean(metrics["clip_ratio_high"], count_of(is_clipped)))
            return
        low = (ratio < 1 - self.epsilon_low) & (A < 0)
        high = (ratio > 1 + self.epsilon_high) & (A > 0)
        count = count_of(low)
        log["clip_ratio/low_mean"].append(global_mean(metrics["clip_ratio_low"], count))
        log["clip_ratio/high_mean"].append(global_mean(metrics["clip_ratio_high"], count))
        log["clip_ratio/region_mean"].append(global_mean(metrics["clip_ratio_region"], count))
        log["clip_ratio/low_min"].append(nanmin(self.accelerator.gather(_sequence_mean(low.float(), mask))).item())
        log["clip_ratio/high_max"].append(nanmax(self.accelerator.gather(_sequence_mean(high.float(), mask))).item())


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Local mean over `mask`, or over sequences for (B, 1) values (TRL's global_masked_mean, one process)."""
    if x.shape[1] == 1:
        return x.sum() / max(x.shape[0], 1)
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def _sequence_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence masked mean (NaN for an empty sequence, which TRL's nanmin/nanmax skip)."""
    if x.shape[1] == 1:
        return x.squeeze(1)
    return (x * mask).sum(-1) / mask.sum(-1)


class FusedGRPOTrainer(_FusedLoss, GRPOTrainer):
    """GRPOTrainer whose policy loss, log-probs and metrics come from grpo_kernels.

    Takes GRPOTrainer's arguments, and keyword-only:

    - head: "hidden" (default; hidden states and LM head, no logits) or "logits" (module docstring).
    - kl_ratio: "token" (default) or "sequence" (TRL 1.16's KL weight under GSPO).
    - backend: grpo_kernels backend, "auto" (Triton on CUDA, chunked PyTorch on the CPU).
    - inplace_backward: head="logits" only; write the gradient into the logits' storage.

    Raises ValueError, when built, for a configuration whose TRL loss it cannot reproduce.
    """

    def __init__(self, *args: Any, head: str = "hidden", kl_ratio: str = "token", backend: str = "auto",
                 inplace_backward: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _setup(self, head, kl_ratio, backend, inplace_backward)


def patch_grpo_trainer(trainer: GRPOTrainer, *, head: str = "hidden", kl_ratio: str = "token",
                       backend: str = "auto", inplace_backward: bool = False) -> GRPOTrainer:
    """Switch a built GRPOTrainer to grpo_kernels' loss, in place; returns it.

    The keywords are FusedGRPOTrainer's. Call it before `trainer.train()`. Raises ValueError for
    a configuration whose TRL loss it cannot reproduce, for a trainer already switched, and for a
    GRPOTrainer subclass that brings its own `_compute_loss` or log-prob pass.
    """
    if not isinstance(trainer, GRPOTrainer):
        raise TypeError(f"patch_grpo_trainer expects a trl GRPOTrainer, got {type(trainer).__name__}")
    if hasattr(trainer, "_grpo_kernels"):
        raise ValueError("this trainer already computes its loss with grpo_kernels")
    for name in ("_compute_loss", "_get_per_token_logps_and_entropies"):
        if getattr(type(trainer), name) is not getattr(GRPOTrainer, name):
            raise ValueError(f"{type(trainer).__name__} overrides GRPOTrainer.{name}; its loss is not TRL's GRPO "
                             "loss, so grpo_kernels cannot stand in for it")
    _setup(trainer, head, kl_ratio, backend, inplace_backward)
    for name in ("_completion_logits", "_completion_hidden", "_token_logprobs",
                 "_get_per_token_logps_and_entropies", "_compute_loss", "_log_loss_metrics"):
        setattr(trainer, name, types.MethodType(getattr(_FusedLoss, name), trainer))
    return trainer
