"""Bad input gets a ValueError/TypeError naming the argument, never a crash or a wrong number."""
from __future__ import annotations

import pytest
import torch

import grpo_kernels

B, T, V = 2, 3, 11


def good(**over):
    g = torch.Generator().manual_seed(0)
    args = dict(logits=torch.randn(B, T, V, generator=g), completion_ids=torch.randint(0, V, (B, T), generator=g),
                advantages=torch.randn(B, generator=g))
    args.update(over)
    return args


CASES = [
    # (arguments, keywords, exception, words the message must contain)
    (good(logits=torch.randn(B, T - 1, V)), {}, ValueError, "logits"),  # (B, T + 1, V) is the model's full output
    (good(logits=torch.randn(B + 1, T + 1, V)), {}, ValueError, "logits"),
    (good(logits=torch.randn(B * T + 1, V)), {}, ValueError, "logits"),
    (good(logits=torch.randn(B, T)), {}, ValueError, "logits"),
    (good(logits=torch.randint(0, 3, (B, T, V))), {}, TypeError, "logits"),
    (good(logits=torch.randn(B, T, V * 2)[..., ::2]), {}, ValueError, "logits"),
    (good(completion_ids=torch.randint(0, V, (B,))), {}, ValueError, "completion_ids"),
    (good(completion_ids=torch.rand(B, T)), {}, TypeError, "completion_ids"),
    (good(completion_ids=torch.full((B, T), V)), {}, ValueError, "completion_ids"),
    (good(completion_ids=torch.full((B, T), -1)), {}, ValueError, "completion_ids"),
    (good(advantages=torch.randn(B + 1)), {}, ValueError, "advantages"),
    (good(advantages=torch.randn(B, T + 1)), {}, ValueError, "advantages"),
    (good(completion_mask=torch.ones(B, T + 1)), {}, ValueError, "completion_mask"),
    (good(old_logprobs=torch.randn(B, T - 1)), {}, ValueError, "old_logprobs"),
    (good(ref_logprobs=torch.randn(B + 1, T)), {"beta": 0.1}, ValueError, "ref_logprobs"),
    (good(), {"rollout_is_ratio": torch.rand(B, 2)}, ValueError, "rollout_is_ratio"),
    (good(), {"beta": 0.04}, ValueError, "ref_logprobs"),
    (good(), {"temperature": 0.0}, ValueError, "temperature"),
    (good(), {"temperature": -1.0}, ValueError, "temperature"),
    (good(), {"temperature": float("nan")}, ValueError, "temperature"),
    (good(), {"epsilon_low": 1.0}, ValueError, "epsilon_low"),
    (good(), {"epsilon_low": -0.1}, ValueError, "epsilon_low"),
    (good(), {"epsilon_high": -0.1}, ValueError, "epsilon_high"),
    (good(), {"delta": 1.2}, ValueError, "delta"),
    (good(), {"epsilon_high": 0.28, "delta": 1.28}, ValueError, "delta"),
    (good(), {"loss_type": "ppo"}, ValueError, "loss_type"),
    (good(), {"importance_sampling_level": "seq"}, ValueError, "importance_sampling_level"),
    (good(), {"kl_estimator": "k4"}, ValueError, "kl_estimator"),
    (good(), {"kl_ratio": "both"}, ValueError, "kl_ratio"),
    (good(), {"backend": "jax"}, ValueError, "backend"),
    (good(), {"dual_clip": 1.0}, ValueError, "dual_clip"),
    (good(), {"top_entropy_quantile": 1.5}, ValueError, "top_entropy_quantile"),
    (good(), {"max_completion_length": 0}, ValueError, "max_completion_length"),
    (good(), {"num_items_in_batch": -1}, ValueError, "num_items_in_batch"),
    (good(), {"beta": "0.1"}, TypeError, "beta"),
    (good(), {"loss_type": "vespo", "importance_sampling_level": "sequence"}, ValueError, "vespo"),
    (good(), {"not_an_option": 1}, TypeError, "not_an_option"),
]


@pytest.mark.parametrize("args,keywords,error,words", CASES)
@pytest.mark.parametrize("fn", [grpo_kernels.fused_grpo_loss, grpo_kernels.reference.grpo_loss])
def test_bad_input_is_named(fn, args, keywords, error, words):
    with pytest.raises(error, match=words):
        fn(**args, **keywords)


def test_mismatched_devices_are_named():
    args = good(advantages=torch.randn(B, device="meta"))
    with pytest.raises(ValueError, match="advantages"):
        grpo_kernels.fused_grpo_loss(**args)


def test_triton_backend_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        grpo_kernels.fused_grpo_loss(**good(), backend="triton")


def test_triton_backend_rejects_float64():
    with pytest.raises(TypeError, match="float64"):
        grpo_kernels.fused_grpo_loss(**good(logits=torch.randn(B, T, V, dtype=torch.float64)), backend="triton")


def test_token_logprobs_checks_its_arguments():
    args = good()
    with pytest.raises(ValueError, match="temperature"):
        grpo_kernels.token_logprobs(args["logits"], args["completion_ids"], temperature=0.0)
    with pytest.raises(ValueError, match="completion_ids"):
        grpo_kernels.token_logprobs(args["logits"], args["completion_ids"] + V)
