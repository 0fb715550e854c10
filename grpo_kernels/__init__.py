"""Fused GPU kernels for the GRPO family of RL losses (see README.md and docs/)."""
from . import reference
from .ops import fused_grpo_loss, token_logprobs

__all__ = ["fused_grpo_loss", "token_logprobs", "reference"]
__version__ = "0.1.0"
