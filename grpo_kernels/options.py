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


def check_bool(name: str, value: object) -> bool:
    """Only True or False: a string such as "false" is truthy and would switch the option on."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return value


def check_temperature(temperature: object) -> None:
    """A positive float whose inverse is finite in fp32 (the sweeps multiply by 1/temperature),
    or a tensor of per-token temperatures (checked against the layout in layout.py)."""
    if isinstance(temperature, torch.Tensor):
        if not temperature.is_floating_point():
            raise TypeError(f"temperature must be a float or a floating-point tensor, got {temperature.dtype}")
        return
    if not _finite("temperature", temperature) > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 1.0 / temperature <= torch.finfo(torch.float32).max:
        raise ValueError(f"temperature must be at least {1 / torch.finfo(torch.float32).max:.3g}, so that "
                         f"1 / temperature is finite in float32; got {temperature}")


def _divisor(name: str, n: object) -> None:
    """num_items_in_batch / num_sequences_in_batch: a number >= 0, or a one-element tensor that
    stays on its device (checked only where that needs no wait for it: eager CPU)."""
    if n is None:
        return
    if isinstance(n, torch.Tensor):
        if n.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got shape {tuple(n.shape)}")
        if n.device.type == "cpu" and not torch.compiler.is_compiling():
            n = float(n)
        else:
            return
    if _finite(name, n) < 0:
        raise ValueError(f"{name} must be >= 0, got {n}")


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
    num_sequences_in_batch: float | torch.Tensor | None = None
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
        check_temperature(self.temperature)
        check_bool("use_bias_correction_kl", self.use_bias_correction_kl)
        check_bool("inplace_backward", self.inplace_backward)
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
        _divisor("num_items_in_batch", self.num_items_in_batch)
        _divisor("num_sequences_in_batch", self.num_sequences_in_batch)
        if self.loss_type == "vespo" and self.importance_sampling_level != "token":
            raise ValueError("loss_type='vespo' computes its own sequence weight; use importance_sampling_level='token'")

    @property
    def eps_high(self) -> float:
        return self.epsilon_low if self.epsilon_high is None else self.epsilon_high


def check_tensor(name: str, t: torch.Tensor | None, shapes: tuple[tuple[int, ...], ...], device: torch.device,
                 floating: bool = True) -> None:
    """t is None, or a tensor of one of `shapes` on `device` (floating-point unless told otherwise)."""
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
