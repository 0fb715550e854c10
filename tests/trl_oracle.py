"""TRL 1.16's own GRPO loss as a test oracle.

`trl_compute_loss` runs the real `GRPOTrainer._compute_loss` (and the real
`_get_per_token_logps_and_entropies` it calls) on given logits, without building a
trainer, a model or a dataset. It stands up the few things that method touches:

- a trainer made with `object.__new__(GRPOTrainer)` carrying exactly the attributes
  `_compute_loss` reads, set the way `GRPOTrainer.__init__` sets them from a GRPOConfig;
- a one-process accelerator whose collectives are the identity;
- a stand-in causal LM. TRL 1.16 no longer reads logits: it patches the model with a
  fused LM head (`trl.trainer.utils.add_fused_lm_head`) and calls
  `model(input_ids, attention_mask, labels=labels, fused_lm_head=True)`, which returns
  per-token `log_probs` and `entropy`, zero where the label is -100. The stand-in's
  backbone returns our logits as its hidden states, so the position that predicts
  completion token t holds logits[:, t].

Two heads compute log-probs and entropies from those hidden states:
- head="exact" (default): the stand-in's own forward, in float64, with the fused head's
  conventions (temperature, shift, zero on masked labels). TRL's real head accumulates in
  float32, so only this head makes an oracle exact to ~1e-15.
- head="trl": TRL's real `add_fused_lm_head` over an identity LM head (hidden @ I = logits
  exactly). float32-accurate; it checks that the exact head follows TRL's conventions.

Single process, no gradient accumulation, train mode: the setting of SPEC section 1.
"""
from __future__ import annotations

import contextlib
import types
from collections import defaultdict

import torch
from trl import GRPOConfig
from trl.trainer.grpo_trainer import GRPOTrainer
from trl.trainer.utils import FusedCausalLMOutput, add_fused_lm_head

_CONFIG_DEFAULTS = {name: field.default for name, field in GRPOConfig.__dataclass_fields__.items()}


class _OneProcess:
    """The accelerate.Accelerator surface `_compute_loss` uses, for one process."""

    num_processes = 1
    is_main_process = True
    sync_gradients = True  # no gradient accumulation: every micro-batch ends an optimizer step

    def autocast(self):
        return contextlib.nullcontext()

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x

    def pad_across_processes(self, x, dim=0, pad_index=0):
        return x


class _TextConfig:
    """A config with none of the logit scalings add_fused_lm_head looks for (softcap, logit_scale, ...)."""

    def get_text_config(self):
        return self


class _Backbone(torch.nn.Module):
    """Returns the given logits as hidden states, followed by one dummy position.

    TRL prepends our one-token prompt, so input position j predicts token j + 1, and the
    fused head drops the last position (it predicts past the end): with logits at
    positions 0..T-1 and a dummy at T, position t predicts completion token t.
    """

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, input_ids, attention_mask=None, **kwargs):
        dummy = self.logits.new_zeros(self.logits.shape[0], 1, self.logits.shape[2])
        return types.SimpleNamespace(last_hidden_state=torch.cat([self.logits, dummy], dim=1))


class _StubCausalLM(torch.nn.Module):
    """A causal LM whose hidden states are the given logits and whose LM head is the identity.

    `forward` is the float64 fused head ("exact"); `add_fused_lm_head` replaces it with
    TRL's own ("trl").
    """

    def __init__(self, logits: torch.Tensor, temperature: float):
        super().__init__()
        self.config = _TextConfig()
        self.base_model = _Backbone(logits)
        vocab = logits.shape[-1]
        self.lm_head = torch.nn.Linear(vocab, vocab, bias=False, dtype=logits.dtype)
        with torch.no_grad():
            self.lm_head.weight.copy_(torch.eye(vocab, dtype=logits.dtype))
        self.lm_head.weight.requires_grad_(False)
        self.temperature = temperature

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids, attention_mask=None, labels=None, fused_lm_head=False, **kwargs):
        """What TRL's fused head returns, in float64: log p(label) and entropy, 0 where label == -100."""
        assert fused_lm_head, "_compute_loss only calls the fused head"
        z = self.base_model(input_ids).last_hidden_state[:, :-1].double() * (1.0 / self.temperature)
        labels = labels[:, 1:]
        valid = labels != -100
        logp = torch.log_softmax(z, dim=-1)
        log_probs = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        entropy = -(logp.exp() * logp).sum(-1)
        return FusedCausalLMOutput(
            log_probs=log_probs.masked_fill(~valid, 0.0), entropy=entropy.masked_fill(~valid, 0.0), label_mask=valid
        )


def _trainer(model: torch.nn.Module, args: types.SimpleNamespace, **attributes) -> GRPOTrainer:
    """A GRPOTrainer with only the state `_compute_loss` reads (no __init__, no model loading)."""
    trainer = object.__new__(GRPOTrainer)
    trainer.model = model
    trainer.args = args
    trainer.accelerator = _OneProcess()
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    trainer.current_gradient_accumulation_steps = 1
    trainer.aux_loss_enabled = False
    trainer.use_adaptive_entropy = False
    for name, value in attributes.items():
        setattr(trainer, name, value)
    # As GRPOTrainer.__init__ derives them from the config.
    trainer.epsilon_low = args.epsilon
    trainer.epsilon_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
    trainer._entropy_bonus_enabled = trainer.entropy_coef != 0.0
    return trainer


def trl_compute_loss(
    logits: torch.Tensor,
    completion_ids: torch.Tensor,
    advantages: torch.Tensor,
    completion_mask: torch.Tensor | None = None,
    old_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    *,
    loss_type: str = "dapo",
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    delta: float | None = None,
    temperature: float = 1.0,
    importance_sampling_level: str = "token",
    use_bias_correction_kl: bool = True,
    max_completion_length: int | None = None,
    num_items_in_batch: float | torch.Tensor | None = None,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    rollout_is_ratio: torch.Tensor | None = None,
    top_entropy_quantile: float = 1.0,
    off_policy_mask_threshold: float | None = None,
    entropy_coef: float = 0.0,
    sampling_logprobs: torch.Tensor | None = None,
    vespo_k_pos: float = _CONFIG_DEFAULTS["vespo_k_pos"],
    vespo_lambda_pos: float = _CONFIG_DEFAULTS["vespo_lambda_pos"],
    vespo_k_neg: float = _CONFIG_DEFAULTS["vespo_k_neg"],
    vespo_lambda_neg: float = _CONFIG_DEFAULTS["vespo_lambda_neg"],
    kl_estimator: str = "k3",
    dual_clip: float | None = None,
    head: str = "exact",
) -> tuple[torch.Tensor, dict[str, float | None]]:
    """TRL 1.16's GRPO loss and logged metrics for logits (B, T, V), with our argument names.

    Returns the loss (float64 with head="exact", with its autograd graph back to `logits`)
    and {kl, entropy, clip_ratio_low, clip_ratio_high, clip_ratio_region}: what TRL logged
    in `_metrics` (clip_ratio/{low,high,region}_mean; cispo_clip_ratio as clip_ratio_high),
    None where it logs nothing.

    Our names -> TRL's: old_logprobs, ref_logprobs, sampling_logprobs, rollout_is_ratio and
    num_items_in_batch -> inputs["old_per_token_logps"], ["ref_per_token_logps"],
    ["sampling_per_token_logps"], ["importance_sampling_ratio"] (which TRL applies on its
    vLLM path only, so it is switched on with the ratio) and ["num_items_in_batch"];
    epsilon_low -> args.epsilon. Defaults follow SPEC section 1: max_completion_length=None
    means T, num_items_in_batch=None means mask.sum(). Features TRL 1.16 lacks
    (kl_estimator k1/k2, dual_clip) raise NotImplementedError. Under GSPO with a KL term,
    TRL weights the KL by the sequence ratio: compare with our kl_ratio="sequence".
    """
    if kl_estimator != "k3":
        raise NotImplementedError(f"TRL 1.16 has only the k3 KL estimator, not {kl_estimator!r}")
    if dual_clip is not None:
        raise NotImplementedError("TRL 1.16 has no dual-clip PPO (dual_clip)")
    if head not in ("exact", "trl"):
        raise ValueError(f"head must be 'exact' or 'trl', got {head!r}")
    B, T, _ = logits.shape
    if completion_mask is None:
        completion_mask = torch.ones(B, T, dtype=torch.long, device=logits.device)
    elif completion_mask.dtype == torch.bool:
        completion_mask = completion_mask.long()  # TRL's masks are integer; bool arithmetic differs
    if num_items_in_batch is None:
        num_items_in_batch = completion_mask.sum()

    model = _StubCausalLM(logits, temperature)
    if head == "trl":
        add_fused_lm_head(model, temperature=temperature, outputs=("log_probs", "entropy"))
    args = types.SimpleNamespace(
        epsilon=epsilon_low,
        epsilon_high=epsilon_high,
        delta=delta,
        use_bias_correction_kl=use_bias_correction_kl,
        sapo_temperature_pos=sapo_temperature_pos,
        sapo_temperature_neg=sapo_temperature_neg,
        vespo_k_pos=vespo_k_pos,
        vespo_lambda_pos=vespo_lambda_pos,
        vespo_k_neg=vespo_k_neg,
        vespo_lambda_neg=vespo_lambda_neg,
        steps_per_generation=1,
        report_to=[],
    )
    trainer = _trainer(
        model,
        args,
        loss_type=loss_type,
        beta=beta,
        temperature=temperature,
        importance_sampling_level=importance_sampling_level,
        max_completion_length=T if max_completion_length is None else max_completion_length,
        top_entropy_quantile=top_entropy_quantile,
        off_policy_mask_threshold=off_policy_mask_threshold,
        entropy_coef=entropy_coef,
        # TRL applies the sampler-mismatch weight only on its vLLM path.
        use_vllm=rollout_is_ratio is not None,
        vllm_importance_sampling_correction=rollout_is_ratio is not None,
    )

    inputs = {
        # A one-token prompt: TRL concatenates it before the completion (see _Backbone).
        "prompt_ids": completion_ids.new_zeros(B, 1),
        "prompt_mask": completion_mask.new_ones(B, 1),
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": advantages,
        "num_items_in_batch": torch.as_tensor(num_items_in_batch, dtype=torch.float64, device=logits.device),
    }
    optional = {
        "old_per_token_logps": old_logprobs,
        "ref_per_token_logps": ref_logprobs,
        "importance_sampling_ratio": rollout_is_ratio,
        "sampling_per_token_logps": sampling_logprobs,
    }
    inputs.update({key: value for key, value in optional.items() if value is not None})

    loss = trainer._compute_loss(model, inputs)

    logged = trainer._metrics["train"]
    names = {
        "kl": "kl",
        "entropy": "entropy",
        "clip_ratio_low": "clip_ratio/low_mean",
        "clip_ratio_high": "cispo_clip_ratio" if loss_type == "cispo" else "clip_ratio/high_mean",
        "clip_ratio_region": "clip_ratio/region_mean",
    }
    metrics = {ours: (logged[theirs][-1] if logged.get(theirs) else None) for ours, theirs in names.items()}
    return loss, metrics


# --- TRL's vLLM importance-sampling correction ----------------------------------------------

_VLLM_IS_START = "if self.use_vllm and self.vllm_importance_sampling_correction:"
_VLLM_IS_MARK = "per_token_logps_diff = (old_per_token_logps - sampling_per_token_logps) * mask"


def _vllm_is_block() -> str:
    """TRL 1.16's own code that turns sampler log-probs into `importance_sampling_ratio`.

    It sits inside the 400-line `GRPOTrainer._generate_and_score_completions` (generation,
    rewards, advantages), which cannot run without a model and a vLLM server. The oracle runs
    that block's source as TRL ships it: the `if` statement that computes the ratio, found by
    its first lines and cut at its end by indentation. A TRL that moves or rewrites the block
    makes this raise instead of testing something else.
    """
    import inspect
    import textwrap

    lines = inspect.getsource(GRPOTrainer._generate_and_score_completions).splitlines()
    for i, line in enumerate(lines):
        if line.strip() == _VLLM_IS_START and any(_VLLM_IS_MARK in nxt for nxt in lines[i + 1:i + 4]):
            indent = len(line) - len(line.lstrip())
            end = i + 1
            while end < len(lines) and (not lines[end].strip() or len(lines[end]) - len(lines[end].lstrip()) > indent):
                end += 1
            return textwrap.dedent("\n".join(lines[i:end]))
    raise RuntimeError("TRL's vLLM importance-sampling block was not found in _generate_and_score_completions")


def trl_vllm_importance_sampling_ratio(old_logprobs: torch.Tensor, sampling_logprobs: torch.Tensor,
                                       completion_mask: torch.Tensor, mode: str, clip_max: float | None = 3.0,
                                       clip_min: float | None = None) -> torch.Tensor:
    """inputs["importance_sampling_ratio"] as TRL 1.16 computes it: (B, T) for token_* modes, (B, 1) for sequence_*."""
    import math

    trainer = types.SimpleNamespace(
        use_vllm=True,
        vllm_importance_sampling_correction=True,
        vllm_importance_sampling_mode=mode,
        vllm_importance_sampling_clip_max=clip_max,
        vllm_importance_sampling_clip_min=clip_min,
    )
    namespace = {
        "torch": torch, "math": math, "self": trainer, "completion_mask": completion_mask, "tool_mask": None,
        "old_per_token_logps": old_logprobs, "sampling_per_token_logps": sampling_logprobs,
    }
    exec(compile(_vllm_is_block(), "<trl vllm importance sampling>", "exec"), namespace)  # noqa: S102
    return namespace["vllm_importance_sampling_ratio"]
