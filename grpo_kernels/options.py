"""The keywords of the GRPO objective, validated once, and the checks on its tensors.

Every check of SPEC section 1 lives here, so the reference, every backend and every
integration reject the same bad input with the same message.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import is_fake

# TRL 1.16's eight loss types (the set the TRL parity tests sweep).
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo", "vespo")
# verl 0.9.1's policy losses that TRL lacks, under verl's registry names; "cispo_verl" is verl's
# "cispo" (two-sided clip of the detached weight), which differs from TRL's "cispo" (cap at epsilon_high).
VERL_LOSS_TYPES = ("dppo_tv", "dppo_kl", "gpg", "clip_cov", "kl_cov", "geo_mean", "dro", "cispo_verl")
ALL_LOSS_TYPES = LOSS_TYPES + VERL_LOSS_TYPES
# Loss types whose policy term is the PPO clipped surrogate -min(r A, clip(r) A).
CLIPPED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
# "sequence_token": GSPO-token, s_t = sg(s_i) exp(l_t - sg(l_t)), verl's "gspo" (docs/math.md).
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence", "sequence_token")
# verl 0.9.1's agg_loss modes (None: the loss type's own TRL aggregation).
LOSS_AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
# TRL 1.16's vllm_importance_sampling_mode values, applied to rollout_is_ratio.
VLLM_IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
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
        if eager_cpu(n):
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

    verl 0.9.1 (docs/math.md, "Loss families from verl"; docs of each field there):
    - `loss_agg_mode` None keeps each loss type's TRL aggregation; one of LOSS_AGG_MODES is verl's
      `agg_loss` exactly, with its global normalisers `dp_size`, `batch_num_tokens`,
      `global_batch_size` and `loss_scale_factor` (None: verl's local defaults). It also
      aggregates the KL term and the entropy bonus, as verl's ppo_loss does.
    - verl's clip_ratio_low / clip_ratio_high are `epsilon_low` / `epsilon_high` for every loss
      type (for dppo_* they are the divergence thresholds delta_low / delta_high, as in verl).
      verl's clip_ratio_c is `dual_clip` for the PPO losses and `clip_ratio_c` (the cap of the
      detached weight, default 3.0 as ActorConfig) for dppo_tv / dppo_kl.
    - `clip_cov_ratio`, `clip_cov_lb`, `clip_cov_ub`, `kl_cov_ratio`, `ppo_kl_coef`, `dro_beta`:
      verl's PolicyLossConfig fields and defaults.
    - `log_ratio_clamp`: c clamps log r (or log s under GSPO) to [-c, c]; a pair (low, high)
      clamps to it, None on a side leaving it open. verl clamps at 20 (vanilla, dppo, sapo,
      cispo) and at (None, 10) (gspo). None: no clamp, as TRL.
    - `kl_clamp`: c clamps the KL estimate to [-c, c] (verl's low_var_kl and OpenRLHF use 10; for
      k3 the log-ratio is then also clamped to [-20, 20], as verl). None: no clamp, as TRL.
    - `verl_metrics`: also return verl's metrics ppo_kl, pg_clipfrac, pg_clipfrac_lower (always on
      for the verl loss types).
    - `vllm_importance_sampling_mode` (TRL 1.16's field, with `vllm_importance_sampling_clip_max`
      and `vllm_importance_sampling_clip_min`): rollout_is_ratio is then the raw sampler ratio
      exp(l_old - l_sampler), truncated or masked per token or per sequence as TRL does.
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
    # verl 0.9.1 (docs/math.md, "Loss families from verl"): aggregation and its global normalisers.
    loss_agg_mode: str | None = None
    dp_size: int = 1
    batch_num_tokens: float | torch.Tensor | None = None
    global_batch_size: float | torch.Tensor | None = None
    loss_scale_factor: float | None = None
    # verl's policy-loss parameters, under verl's names and with the defaults of its ActorConfig.
    clip_ratio_c: float = 3.0
    clip_cov_ratio: float = 0.0002
    clip_cov_lb: float = 1.0
    clip_cov_ub: float = 5.0
    kl_cov_ratio: float = 0.0002
    ppo_kl_coef: float = 0.1
    dro_beta: float | None = None
    log_ratio_clamp: float | tuple | None = None
    kl_clamp: float | None = None
    verl_metrics: bool = False
    # TRL 1.16's vLLM importance-sampling correction, applied to rollout_is_ratio.
    vllm_importance_sampling_mode: str | None = None
    vllm_importance_sampling_clip_max: float | None = 3.0
    vllm_importance_sampling_clip_min: float | None = None
    # The upstream gradient the caller's backward will bring to the loss (1 / gradient accumulation
    # steps, an AMP loss scale): a promise, never a change of value. Where the gradient is computed
    # in the forward (the two-pass and fused-linear paths), it is written already scaled by this,
    # so the backward is free when the promise holds and one scaling pass when it does not.
    grad_scale: float = 1.0

    def __post_init__(self) -> None:
        _choice("loss_type", self.loss_type, ALL_LOSS_TYPES)
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
        if _finite("grad_scale", self.grad_scale) == 0.0:
            raise ValueError("grad_scale must be finite and non-zero (the upstream gradient the loss will get)")
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
        self._check_verl()
        self._check_vllm()

    def _check_verl(self) -> None:
        """The keywords of verl's losses and aggregation (issue 13), each against verl's own asserts."""
        if self.loss_agg_mode is not None:
            _choice("loss_agg_mode", self.loss_agg_mode, LOSS_AGG_MODES)
        if isinstance(self.dp_size, bool) or not isinstance(self.dp_size, int) or self.dp_size < 1:
            raise ValueError(f"dp_size must be a positive int, got {self.dp_size!r}")
        _divisor("batch_num_tokens", self.batch_num_tokens)
        _divisor("global_batch_size", self.global_batch_size)
        if self.dp_size > 1:  # verl's agg_loss raises the same
            if self.loss_agg_mode == "token-mean" and self.batch_num_tokens is None:
                raise ValueError("(global) batch_num_tokens is required when dp_size > 1 with "
                                 "loss_agg_mode='token-mean'")
            if (self.loss_agg_mode or "").startswith("seq-mean") and self.global_batch_size is None:
                raise ValueError(f"global_batch_size is required when dp_size > 1 with "
                                 f"loss_agg_mode={self.loss_agg_mode!r}")
        if self.loss_scale_factor is not None and not _finite("loss_scale_factor", self.loss_scale_factor) > 0:
            raise ValueError(f"loss_scale_factor must be > 0, got {self.loss_scale_factor}")
        if not _finite("clip_ratio_c", self.clip_ratio_c) > 0.0:
            raise ValueError(f"clip_ratio_c must be > 0, got {self.clip_ratio_c}")
        for name in ("clip_cov_ratio", "kl_cov_ratio"):  # verl asserts > 0; topk needs kl_cov_ratio <= 1
            value = _finite(name, getattr(self, name))
            if not (0.0 < value <= 1.0 if name == "kl_cov_ratio" else value > 0.0):
                raise ValueError(f"{name} must be in {'(0, 1]' if name == 'kl_cov_ratio' else '(0, inf)'}, got {value}")
        _finite("clip_cov_lb", self.clip_cov_lb)
        _finite("clip_cov_ub", self.clip_cov_ub)
        _finite("ppo_kl_coef", self.ppo_kl_coef)
        if self.dro_beta is not None:
            _finite("dro_beta", self.dro_beta)
        if self.loss_type == "dro" and not (self.dro_beta is not None and self.dro_beta > 0):
            raise ValueError(f"loss_type='dro' needs dro_beta > 0 (verl: policy_loss.dro_beta), got {self.dro_beta}")
        self.log_ratio_bounds  # validates log_ratio_clamp
        if self.kl_clamp is not None and not _finite("kl_clamp", self.kl_clamp) > 0.0:
            raise ValueError(f"kl_clamp must be > 0, got {self.kl_clamp}")
        check_bool("verl_metrics", self.verl_metrics)
        if self.loss_type in VERL_LOSS_TYPES and self.importance_sampling_level != "token":
            raise ValueError(f"loss_type={self.loss_type!r} is a token-level verl loss; "
                             "use importance_sampling_level='token'")
        if self.loss_type == "geo_mean" and (self.top_entropy_quantile < 1.0 or
                                             self.off_policy_mask_threshold is not None):
            raise ValueError("loss_type='geo_mean' is a sequence-level objective: top_entropy_quantile < 1 and "
                             "off_policy_mask_threshold (per-token masks) do not apply to it")

    def _check_vllm(self) -> None:
        """TRL 1.16's checks of its vllm_importance_sampling_* fields (GRPOConfig.__post_init__)."""
        lo, hi = self.vllm_importance_sampling_clip_min, self.vllm_importance_sampling_clip_max
        for name, value in (("vllm_importance_sampling_clip_min", lo), ("vllm_importance_sampling_clip_max", hi)):
            if value is not None:
                _finite(name, value)
        if self.vllm_importance_sampling_mode is None:
            return
        mode = _choice("vllm_importance_sampling_mode", self.vllm_importance_sampling_mode, VLLM_IS_MODES)
        if lo is not None and hi is not None and lo >= hi:
            raise ValueError(f"vllm_importance_sampling_clip_min ({lo}) must be less than "
                             f"vllm_importance_sampling_clip_max ({hi})")
        if mode.endswith("_truncate") and lo is None and hi is None:
            raise ValueError("At least one of vllm_importance_sampling_clip_min or vllm_importance_sampling_clip_max "
                             "must be set when vllm_importance_sampling_mode is a *_truncate mode")
        if self.loss_type == "vespo" and mode.startswith("sequence"):
            raise ValueError("loss_type='vespo' needs vllm_importance_sampling_mode 'token_truncate' or 'token_mask' "
                             f"(as TRL); got {mode!r}")

    @property
    def log_ratio_bounds(self) -> tuple[float | None, float | None]:
        """log_ratio_clamp as (low, high): c -> (-c, c); a pair as given (None: unbounded on that side)."""
        c = self.log_ratio_clamp
        if c is None:
            return None, None
        if isinstance(c, (tuple, list)):
            if len(c) != 2:
                raise ValueError(f"log_ratio_clamp must be a number or a pair (low, high), got {c!r}")
            lo, hi = (None if v is None else _finite("log_ratio_clamp", v) for v in c)
            if lo is not None and hi is not None and not lo < hi:
                raise ValueError(f"log_ratio_clamp (low, high) needs low < high, got {c!r}")
            return lo, hi
        if not _finite("log_ratio_clamp", c) > 0.0:
            raise ValueError(f"log_ratio_clamp must be > 0 (or a pair (low, high)), got {c}")
        return -float(c), float(c)

    @property
    def eps_high(self) -> float:
        return self.epsilon_low if self.epsilon_high is None else self.epsilon_high


def sizes_match(sizes, shapes: tuple[tuple[int, ...], ...]) -> bool:
    """Whether `sizes` equals one of `shapes`, by plain comparisons of sizes, which torch.compile's
    symbolic shapes can guard on (a tuple `in` test, or formatting them, would specialise them)."""
    for shape in shapes:
        if len(sizes) == len(shape):
            same = True
            for a, b in zip(sizes, shape):
                same = same and a == b
            if same:
                return True
    return False


def has_shape(t: torch.Tensor, shapes: tuple[tuple[int, ...], ...]) -> bool:
    """Whether t has one of `shapes` (sizes_match on its shape)."""
    return sizes_match(tuple(t.shape), shapes)


def eager_cpu(t: torch.Tensor) -> bool:
    """Whether a value check may look at t's values: a real CPU tensor, outside torch.compile's tracing."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling() and not is_fake(t)


def check_ids_range(completion_ids: torch.Tensor, V: int) -> None:
    """In eager mode on the CPU, ids outside [0, V) raise; elsewhere (no waiting for the device) the
    sweeps turn such an id into a NaN log-prob, never an out-of-bounds read."""
    ids = completion_ids
    if ids.numel() > 0 and eager_cpu(ids) and bool(((ids < 0) | (ids >= V)).any()):
        raise ValueError(f"completion_ids must lie in [0, V) = [0, {V}); found values in "
                         f"[{int(ids.min())}, {int(ids.max())}]")


def check_tensor(name: str, t: torch.Tensor | None, shapes: tuple[tuple[int, ...], ...], device: torch.device,
                 floating: bool = True) -> None:
    """t is None, or a tensor of one of `shapes` on `device` (floating-point unless told otherwise)."""
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not has_shape(t, shapes):
        want = " or ".join(str(s) for s in shapes)
        raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but completion_ids are on {device}: "
                         "all tensors must share a device")
    if floating and not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
