"""Fused GPU kernels for the GRPO family of RL losses (see README.md and docs/)."""
from . import reference
from .linear import fused_linear_grpo_loss, linear_token_logprobs
from .loss import grpo_loss_from_logprobs
from .ops import fused_grpo_loss, token_logprobs

__all__ = ["fused_grpo_loss", "token_logprobs", "fused_linear_grpo_loss", "linear_token_logprobs",
           "grpo_loss_from_logprobs", "reference"]
__version__ = "0.2.0"
