"""The keywords of the GRPO objective, validated once, and the checks on its tensors.

Every check of SPEC section 1 lives here, so the reference, every backend and every
integration reject the same bad input with the same message.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo", "vespo")
# Loss types whose policy term is the PPO clipped surrogate -min(r A, clip(r) A).
CLIPPED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
KL_ESTIMATORS = ("k1", "k2", "k3")
KL_RATIOS = ("token", "sequence")
BACKENDS = ("auto", "triton", "torch", "cuda")
LOGITS_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _finite(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
    return value


@dataclass(frozen=True)
class GRPOOptions:
    """The scalar keywords of `fused_grpo_loss`, checked on construction.

    `epsilon_high=None` resolves to `epsilon_low`, as TRL's `epsilon_high or epsilon`.
    `kl_ratio` chooses the ratio that weights the KL term when `use_bias_correction_kl`:
    "token" (default) is the per-token r even under GSPO; "sequence" reproduces TRL 1.16,
    which weights with the sequence ratio s_i there (TRL issue 6586).
    """

    loss_type: str = "dapo"
    beta: float = 0.0
    epsilon_low: float = 0.2
    epsilon_high: float | None = None
    delta: float | None = None
    temperature: float = 1.0
    importance_sampling_level: str = "token"
    use_bias_correction_kl: bool = True
    kl_estimator: str = "k3"
    kl_ratio: str = "token"
    max_completion_length: int | None = None
    num_items_in_batch: float | torch.Tensor | None = None
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    dual_clip: float | None = None
    entropy_coef: float = 0.0
    top_entropy_quantile: float = 1.0
    off_policy_mask_threshold: float | None = None
    inplace_backward: bool = False
    backend: str = "auto"

    def __post_init__(self) -> None:
        _choice("loss_type", self.loss_type, LOSS_TYPES)
        _choice("importance_sampling_level", self.importance_sampling_level, IMPORTANCE_SAMPLING_LEVELS)
        _choice("kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        _choice("kl_ratio", self.kl_ratio, KL_RATIOS)
        _choice("backend", self.backend, BACKENDS)
        _finite("beta", self.beta)
        if not 0.0 <= _finite("epsilon_low", self.epsilon_low) < 1.0:
            raise ValueError(f"epsilon_low must be in [0, 1), got {self.epsilon_low}")
        if self.epsilon_high is not None and _finite("epsilon_high", self.epsilon_high) < 0.0:
            raise ValueError(f"epsilon_high must be >= 0, got {self.epsilon_high}")
        if self.delta is not None and not _finite("delta", self.delta) > 1.0 + self.eps_high:
            raise ValueError(f"delta must be > 1 + epsilon_high = {1.0 + self.eps_high}, got {self.delta}")
        if not _finite("temperature", self.temperature) > 0.0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        for name in ("sapo_temperature_pos", "sapo_temperature_neg"):
            if not _finite(name, getattr(self, name)) > 0.0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg", "entropy_coef"):
            _finite(name, getattr(self, name))
        if self.dual_clip is not None and not _finite("dual_clip", self.dual_clip) > 1.0:
            raise ValueError(f"dual_clip must be > 1, got {self.dual_clip}")
        if not 0.0 <= _finite("top_entropy_quantile", self.top_entropy_quantile) <= 1.0:
            raise ValueError(f"top_entropy_quantile must be in [0, 1], got {self.top_entropy_quantile}")
        if self.off_policy_mask_threshold is not None:
            _finite("off_policy_mask_threshold", self.off_policy_mask_threshold)
        if self.max_completion_length is not None and (
            isinstance(self.max_completion_length, bool)
            or not isinstance(self.max_completion_length, int)
            or self.max_completion_length <= 0
        ):
            raise ValueError(f"max_completion_length must be a positive int, got {self.max_completion_length!r}")
        if self.num_items_in_batch is not None:
            n = self.num_items_in_batch
            if isinstance(n, torch.Tensor):
                if n.numel() != 1 or n.is_floating_point() and not bool(torch.isfinite(n).all()):
                    raise ValueError("num_items_in_batch must be a finite scalar")
                n = float(n)
            if _finite("num_items_in_batch", n) < 0:
                raise ValueError(f"num_items_in_batch must be >= 0, got {n}")
        if self.loss_type == "vespo" and self.importance_sampling_level != "token":
            raise ValueError("loss_type='vespo' computes its own sequence weight; use importance_sampling_level='token'")

    @property
    def eps_high(self) -> float:
        return self.epsilon_low if self.epsilon_high is None else self.epsilon_high


@dataclass(frozen=True)
class Shapes:
    B: int
    T: int
    V: int


def _check_tensor(name: str, t: torch.Tensor | None, shapes: tuple[tuple[int, ...], ...], device: torch.device,
                  floating: bool = True) -> None:
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) not in shapes:
        want = " or ".join(str(s) for s in shapes)
        raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but completion_ids are on {device}: "
                         "all tensors must share a device")
    if floating and not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def check_completion_ids(completion_ids: torch.Tensor) -> tuple[int, int]:
    """completion_ids must be an int32/int64 (B, T) tensor; returns (B, T)."""
    if not isinstance(completion_ids, torch.Tensor):
        raise TypeError(f"completion_ids must be a torch.Tensor, got {type(completion_ids).__name__}")
    if completion_ids.dim() != 2:
        raise ValueError(f"completion_ids must have shape (B, T), got {tuple(completion_ids.shape)}")
    if completion_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"completion_ids must be int32 or int64, got {completion_ids.dtype}")
    return tuple(completion_ids.shape)


def check_token_rows(name: str, t: torch.Tensor, B: int, T: int, last: str) -> int:
    """t must be (B, T, X) or (N, X) with N = B * T and X >= 1 (X is named `last`); returns X."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() == 3:
        if tuple(t.shape[:2]) != (B, T):
            raise ValueError(f"{name} must have shape (B, T, {last}) = ({B}, {T}, {last}) to match completion_ids, "
                             f"got {tuple(t.shape)}")
    elif t.dim() == 2:
        if t.shape[0] != B * T:
            raise ValueError(f"{name} of shape (N, {last}) needs N = B * T = {B * T} rows, got {t.shape[0]}")
    else:
        raise ValueError(f"{name} must have shape (B, T, {last}) or (N, {last}), got {tuple(t.shape)}")
    if t.shape[-1] < 1:
        raise ValueError(f"{name} must have a last dimension {last} of at least 1")
    return t.shape[-1]


def check_ids_range(completion_ids: torch.Tensor, V: int) -> None:
    # One host sync per call: an id outside [0, V) would otherwise be an out-of-bounds read.
    if completion_ids.numel() > 0 and bool(((completion_ids < 0) | (completion_ids >= V)).any()):
        lo, hi = int(completion_ids.min()), int(completion_ids.max())
        raise ValueError(f"completion_ids must lie in [0, V) = [0, {V}); found values in [{lo}, {hi}]")


def check_logits(logits: torch.Tensor, completion_ids: torch.Tensor, vocab_size: int | None = None) -> Shapes:
    """Check logits (B, T, V) or (N, V) against completion_ids (B, T); returns (B, T, V).

    With `vocab_size` given (the fused-linear path) there are no logits: only the ids are
    checked, against that vocabulary.
    """
    B, T = check_completion_ids(completion_ids)
    if vocab_size is None:
        V = check_token_rows("logits", logits, B, T, "V")
        if logits.dtype not in LOGITS_DTYPES:
            raise TypeError(f"logits must be float32, bfloat16 or float16, got {logits.dtype}")
        if logits.stride(-1) != 1 and logits.numel() > 1:
            raise ValueError("logits must be contiguous in the vocabulary dimension (stride(-1) == 1); "
                             "leading dimensions may have any strides")
        if completion_ids.device != logits.device:
            raise ValueError(f"completion_ids is on {completion_ids.device} but logits are on {logits.device}")
    else:
        V = vocab_size
    check_ids_range(completion_ids, V)
    return Shapes(B, T, V)


def check_inputs(
    logits: torch.Tensor,
    completion_ids: torch.Tensor,
    advantages: torch.Tensor,
    completion_mask: torch.Tensor | None,
    old_logprobs: torch.Tensor | None,
    ref_logprobs: torch.Tensor | None,
    rollout_is_ratio: torch.Tensor | None,
    sampling_logprobs: torch.Tensor | None,
    options: GRPOOptions,
    vocab_size: int | None = None,
) -> Shapes:
    """Check every tensor argument against SPEC section 1; returns (B, T, V).

    With `vocab_size` given (the fused-linear path) `logits` is not inspected: the caller
    checks the hidden states and weight.
    """
    shapes = check_logits(logits, completion_ids, vocab_size)
    B, T, device = shapes.B, shapes.T, completion_ids.device
    if advantages is None:
        raise ValueError("advantages is required, shape (B,) or (B, T)")
    _check_tensor("advantages", advantages, ((B,), (B, 1), (B, T)), device)
    _check_tensor("completion_mask", completion_mask, ((B, T),), device, floating=False)
    _check_tensor("old_logprobs", old_logprobs, ((B, T),), device)
    _check_tensor("ref_logprobs", ref_logprobs, ((B, T),), device)
    _check_tensor("sampling_logprobs", sampling_logprobs, ((B, T),), device)
    _check_tensor("rollout_is_ratio", rollout_is_ratio, ((B, T), (B, 1)), device)
    if options.beta != 0.0 and ref_logprobs is None:
        raise ValueError("ref_logprobs (B, T) is required when beta != 0")
    if options.loss_type == "vespo" and rollout_is_ratio is not None and rollout_is_ratio.shape != (B, T):
        raise ValueError("rollout_is_ratio must be per token, shape (B, T), with loss_type='vespo'")
    return shapes
