"""The verl engine plugin (grpo_kernels.integrations.verl_engine) against verl 0.9.1's own code.

On a tiny random Qwen2 built from a config (no download), float32:

* FSDP logits path: verl's own FSDPEngineWithLMHead.prepare_model_inputs / prepare_model_outputs
  / forward_step, called on an engine object built without its __init__ (no process group, no
  FSDP wrapping: object.__new__ plus the attributes those methods read), against the same
  methods of our registered subclass. Log-probs, entropy (nested, same offsets) and every
  parameter's gradient agree to 1e-5, for remove-padding and padded micro-batches, temperature
  1, a float and one per sequence.
* Training: three SGD steps through verl's forward_step with verl's own ppo_loss (vanilla,
  entropy bonus, low_var_kl KL loss) on verl's engine, on ours, and on ours with our loss
  (policy_loss.loss_mode=grpo_kernels_vanilla): losses, metrics and parameters agree to 1e-5.
* Hidden-state path (use_fused_kernels=True): our linear_cross_entropy and FusedLinearForPPO
  against verl's torch reference FusedLinearForPPOFunction and verl's logprobs_from_logits /
  entropy_from_logits on explicit logits; and the whole micro-batch through verl's own
  forward_with_triton_backend / forward_with_torch_backend model patches (which then call ours)
  against verl's logits path. verl's Triton kernel itself needs CUDA and is not run here.
* Megatron: two gloo processes with megatron-core's parallel_state at TP = 2: our engine's
  _lm_head_logits_processor against verl's MegatronEngineWithLMHead._lm_head_logits_processor
  (vocab_parallel_entropy + Megatron's vocab_parallel_cross_entropy) on the bshd and thd
  shapes, and our linear_cross_entropy with dist_process_group against explicit logits.
* The registry (vendor key), the unsupported options' error, and an import without verl.
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys
import warnings
from functools import partial

import pytest

verl = pytest.importorskip("verl")
pytest.importorskip("peft")  # verl's FSDP engine module imports it

import torch  # noqa: E402

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import grpo_kernels.integrations.verl_engine as ve  # noqa: E402
    import verl.utils.torch_functional as verl_F  # noqa: E402
    from tensordict import TensorDict  # noqa: E402
    from transformers import Qwen2Config, Qwen2ForCausalLM  # noqa: E402
    from verl.utils import tensordict_utils as tu  # noqa: E402
    from verl.utils.experimental.torch_functional import FusedLinearForPPOFunction  # noqa: E402
    from verl.workers.config import FSDPEngineConfig  # noqa: E402
    from verl.workers.config.actor import ActorConfig, PolicyLossConfig  # noqa: E402
    from verl.workers.engine.base import EngineRegistry  # noqa: E402
    from verl.workers.engine.fsdp import transformer_impl as fsdp_impl  # noqa: E402
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead  # noqa: E402
    from verl.workers.utils.losses import ppo_loss  # noqa: E402
    from verl.workers.utils.padding import left_right_2_no_padding, no_padding_2_padding  # noqa: E402

TOL = dict(rtol=1e-5, atol=1e-5)
V, H = 64, 32
PLENS, RLENS = (2, 4, 3), (5, 2, 4)  # prompt and response lengths of the three sequences
P, R = max(PLENS), max(RLENS)


@pytest.fixture(scope="module", autouse=True)
def _installed():
    """The plugin as verl loads it; verl's own kernels and registry restored afterwards."""
    ve.install()
    assert ve.INSTALLED["fsdp_engine"] == "installed", ve.INSTALLED
    yield
    ve.uninstall()


@pytest.fixture(autouse=True)
def _cpu_device(monkeypatch):
    # verl's forward_step moves the micro-batch to get_device_id() and picks autocast from
    # get_device_name(); on a CPU-only machine verl falls back to the NVIDIA platform.
    monkeypatch.setattr(fsdp_impl, "get_device_id", lambda: "cpu")
    monkeypatch.setattr(fsdp_impl, "get_device_name", lambda: "cpu")


class TinyQwen2(Qwen2ForCausalLM):
    """A subclass, so verl's fused-kernel patch (which replaces type(model).forward) stays on it."""


def tiny_model(seed: int = 0, cls=Qwen2ForCausalLM):
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=V, hidden_size=H, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=False)
    return cls(cfg).float()


def engine(cls, module, pad_bucket: int | None = None):
    """verl's engine object without __init__: the attributes prepare_model_inputs/outputs and
    forward_step read (no Ulysses, eager entropy, fp32: no autocast; pad_bucket: verl's
    pad_to_length with that bucket, which appends padding rows to the packed sequence)."""
    e = object.__new__(cls)
    e.engine_config = FSDPEngineConfig()
    e.use_ulysses_sp, e.ulysses_device_mesh = False, None
    e.pad_to_length, e.pad_to_length_bucket = pad_bucket is not None, pad_bucket
    e.compute_entropy_from_logits = verl_F.entropy_from_logits
    e.module, e._autocast_dtype = module, torch.float32
    return e


def micro_batch(temperature=0.7, *, rmpad=True, seed=1, old_log_probs=None, **flags) -> TensorDict:
    """A verl micro-batch as its trainer builds one: left-padded prompts and right-padded
    responses through verl's left_right_2_no_padding (nested input_ids / position_ids)."""
    g = torch.Generator().manual_seed(seed)
    B = len(PLENS)
    prompts, responses = torch.zeros(B, P, dtype=torch.long), torch.zeros(B, R, dtype=torch.long)
    attention, response_mask = torch.zeros(B, P + R, dtype=torch.long), torch.zeros(B, R, dtype=torch.long)
    for i, (p, r) in enumerate(zip(PLENS, RLENS)):
        prompts[i, P - p:] = torch.randint(1, V, (p,), generator=g)
        responses[i, :r] = torch.randint(1, V, (r,), generator=g)
        attention[i, P - p:P + r] = 1
        response_mask[i, :r] = 1
    td = TensorDict({
        "prompts": prompts, "responses": responses, "input_ids": torch.cat([prompts, responses], 1),
        "attention_mask": attention, "response_mask": response_mask,
        "position_ids": (attention.cumsum(1) - 1).clamp(min=0),
        "old_log_probs": -torch.rand(B, R, generator=g) if old_log_probs is None else old_log_probs,
        "ref_log_prob": -4.0 - torch.rand(B, R, generator=g),
        "advantages": torch.randn(B, 1, generator=g).expand(B, R).contiguous(),
    }, batch_size=[B])
    td = left_right_2_no_padding(td)
    if isinstance(temperature, torch.Tensor):
        td["temperature"] = temperature
    else:
        tu.assign_non_tensor(td, temperature=temperature)
    tu.assign_non_tensor(td, use_remove_padding=rmpad, dp_size=1, batch_num_tokens=None, global_batch_size=None,
                         calculate_entropy=True)
    tu.assign_non_tensor(td, **flags)
    return td


def run_outputs(cls, model, td, entropy_weight=1.0, pad_bucket=None):
    """model_output of cls's prepare_model_inputs -> model -> prepare_model_outputs, and the
    parameters' gradients of a weighted sum of log-probs and entropy."""
    e = engine(cls, model, pad_bucket)
    model.zero_grad()
    inputs, output_args = e.prepare_model_inputs(td)
    out = e.prepare_model_outputs(model(**inputs, use_cache=False), output_args, td, None)
    w = torch.linspace(-1.0, 1.0, out["log_probs"].values().numel())
    loss = (out["log_probs"].values() * w).sum()
    if "entropy" in out:
        loss = loss + entropy_weight * (out["entropy"].values() * w.flip(0)).sum()
    loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_same(ref, got, ref_grads, got_grads, keys=("log_probs", "entropy")):
    for k in keys:
        assert (k in ref) == (k in got), k
        if k in ref:
            assert got[k].is_nested and got[k].layout == torch.jagged
            assert torch.equal(ref[k].offsets(), got[k].offsets())
            torch.testing.assert_close(got[k].values(), ref[k].values().float(), **TOL)
    for n in ref_grads:
        torch.testing.assert_close(got_grads[n], ref_grads[n], **TOL, msg=lambda m, n=n: f"{n}: {m}")


# ----------------------------------------------------------------------------- registry


def test_registered_for_nvidia_only(monkeypatch):
    monkeypatch.setenv("VERL_ENGINE_DEVICE", "cuda")
    monkeypatch.setenv("VERL_ENGINE_VENDOR", "nvidia")
    for backend in ("fsdp", "fsdp2"):
        assert EngineRegistry.get_engine_cls("language_model", backend) is ve.GrpoKernelsFSDPEngineWithLMHead
    assert issubclass(ve.GrpoKernelsFSDPEngineWithLMHead, FSDPEngineWithLMHead)
    if ve.INSTALLED.get("megatron_engine") == "installed":
        assert EngineRegistry.get_engine_cls("language_model", "megatron") is ve.GrpoKernelsMegatronEngineWithLMHead
        # Megatron's fused forward (use_fused_kernels=True) calls our linear_cross_entropy
        assert sys.modules["verl.models.mcore.model_forward_fused"].linear_cross_entropy is ve.linear_cross_entropy
    monkeypatch.setenv("VERL_ENGINE_VENDOR", "metax")  # another CUDA vendor with its own registration path
    assert EngineRegistry.get_engine_cls("language_model", "fsdp") is FSDPEngineWithLMHead
    assert EngineRegistry.get_engine_cls("value_model", "fsdp").__module__.startswith("verl.")
    # the plugin's import also registered the loss families
    from verl.trainer.ppo.core_algos import get_policy_loss_fn

    assert get_policy_loss_fn("grpo_kernels_vanilla") is not None
    import verl.utils.kernel.linear_cross_entropy as lce

    assert lce.linear_cross_entropy is ve.linear_cross_entropy
    assert ve.install() is ve.INSTALLED  # idempotent: a second import of the plugin changes nothing


# ----------------------------------------------------------------------------- FSDP, logits path


@pytest.mark.parametrize("rmpad", [True, False], ids=["rmpad", "padded"])
@pytest.mark.parametrize("temperature", ["one", "float", "per_sequence"])
def test_prepare_model_outputs_matches_verl(rmpad, temperature):
    t = {"one": 1.0, "float": 0.7, "per_sequence": torch.tensor([0.6, 1.0, 1.4])}[temperature]
    model = tiny_model()
    td = micro_batch(t, rmpad=rmpad)
    ref, ref_grads = run_outputs(FSDPEngineWithLMHead, model, td)
    got, got_grads = run_outputs(ve.GrpoKernelsFSDPEngineWithLMHead, model, td)
    assert got["log_probs"].dtype == torch.float32 and got["log_probs"].shape[0] == len(PLENS)
    assert_same(ref, got, ref_grads, got_grads)


def test_prepare_model_outputs_static_padding():
    """verl's pad_to_length: padding rows appended to the packed sequence, stripped afterwards."""
    model = tiny_model()
    td = micro_batch(0.7)
    ref, ref_grads = run_outputs(FSDPEngineWithLMHead, model, td, pad_bucket=16)
    got, got_grads = run_outputs(ve.GrpoKernelsFSDPEngineWithLMHead, model, td, pad_bucket=16)
    assert_same(ref, got, ref_grads, got_grads)


def test_prepare_model_outputs_without_entropy():
    model = tiny_model()
    td = micro_batch(0.9, calculate_entropy=False)
    ref, ref_grads = run_outputs(FSDPEngineWithLMHead, model, td)
    got, got_grads = run_outputs(ve.GrpoKernelsFSDPEngineWithLMHead, model, td)
    assert "entropy" not in got
    assert_same(ref, got, ref_grads, got_grads)


def test_fsdp_function_against_verl_functions():
    """The replaced computation on its own, against verl's own functions on the same tensors."""
    g = torch.Generator().manual_seed(3)
    N = 11
    logits = (torch.randn(N, V, generator=g) * 4).requires_grad_()
    labels = torch.randint(0, V, (N,), generator=g)
    temp = torch.rand(N, generator=g) + 0.5
    w1, w2 = torch.randn(N, generator=g), torch.randn(N, generator=g)
    scaled = logits / temp.clamp(min=1e-8).unsqueeze(-1)
    ref_lp = verl_F.logprobs_from_logits(scaled, labels, inplace_backward=False)
    ref_ent = verl_F.entropy_from_logits(scaled)
    (ref_grad,) = torch.autograd.grad((ref_lp * w1).sum() + (ref_ent * w2).sum(), logits)
    lp, ent = ve.fsdp_logprobs_entropy(logits, labels, temp)
    (grad,) = torch.autograd.grad((lp * w1).sum() + (ent * w2).sum(), logits)
    torch.testing.assert_close(lp, ref_lp, **TOL)
    torch.testing.assert_close(ent, ref_ent, **TOL)
    torch.testing.assert_close(grad, ref_grad, **TOL)


def actor_config(loss_mode: str) -> ActorConfig:
    return ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, entropy_coeff=0.01,
                       use_kl_loss=True, kl_loss_coef=0.1, kl_loss_type="low_var_kl", loss_agg_mode="token-mean",
                       policy_loss=PolicyLossConfig(loss_mode=loss_mode))


@pytest.mark.parametrize("rmpad", [True, False], ids=["rmpad", "padded"])
def test_training_loop_matches_verl(rmpad):
    """Three SGD steps of verl's forward_step + ppo_loss: verl's engine, ours, ours with our loss."""
    base = tiny_model()
    # old log-probs near the current ones, so most ratios sit inside the clip range and move the model
    probe = micro_batch(0.8, rmpad=rmpad)
    with torch.no_grad():
        e = engine(FSDPEngineWithLMHead, base)
        inputs, args = e.prepare_model_inputs(probe)
        lp = e.prepare_model_outputs(base(**inputs, use_cache=False), args, probe, None)["log_probs"]
    noise = 0.05 * torch.randn(len(PLENS), R, generator=torch.Generator().manual_seed(5))
    old = no_padding_2_padding(lp, probe) + noise
    td = micro_batch(0.8, rmpad=rmpad, old_log_probs=old)

    runs = {}
    for name, cls, mode in (("verl", FSDPEngineWithLMHead, "vanilla"),
                            ("ours", ve.GrpoKernelsFSDPEngineWithLMHead, "vanilla"),
                            ("ours+loss", ve.GrpoKernelsFSDPEngineWithLMHead, "grpo_kernels_vanilla")):
        model = copy.deepcopy(base)
        e = engine(cls, model)
        opt = torch.optim.SGD(model.parameters(), lr=2.0)
        config, losses, metrics = actor_config(mode), [], []
        for _ in range(3):
            loss, out = e.forward_step(td, partial(ppo_loss, config), forward_only=False)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
            metrics.append({k: float(v.values[0]) if hasattr(v, "values") else float(v)
                            for k, v in out["metrics"].items()})
        runs[name] = (losses, metrics, {n: p.detach().clone() for n, p in model.named_parameters()})

    ref_losses, ref_metrics, ref_params = runs["verl"]
    moved = max((ref_params[n] - p).abs().max().item() for n, p in base.named_parameters())
    assert moved > 1e-3, f"the loop must move the parameters (moved {moved})"
    for name in ("ours", "ours+loss"):
        losses, metrics, params = runs[name]
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), **TOL)
        for m, ref_m in zip(metrics, ref_metrics):
            assert m.keys() == ref_m.keys()
            torch.testing.assert_close(torch.tensor(list(m.values())), torch.tensor(list(ref_m.values())), **TOL)
        for n in ref_params:
            torch.testing.assert_close(params[n], ref_params[n], **TOL, msg=lambda m, n=n: f"{name} {n}: {m}")


def test_unsupported_options_raise():
    model = tiny_model()
    for flag in ("calculate_sum_pi_squared", "distillation_use_topk"):
        td = micro_batch(0.7, **{flag: True})
        e = engine(ve.GrpoKernelsFSDPEngineWithLMHead, model)
        inputs, args = e.prepare_model_inputs(td)
        with pytest.raises(ve.UnsupportedVerlOption, match=f"{flag}=True is not supported.*external_lib"):
            e.prepare_model_outputs(model(**inputs, use_cache=False), args, td, None)
    with pytest.raises(NotImplementedError, match="calculate_sum_pi_squared"):
        ve.megatron_lm_head_logits_processor(None, torch.zeros(1, 2, V), torch.zeros(1, 2, dtype=torch.long),
                                             torch.ones(1, 2), calculate_sum_pi_squared=True, calculate_entropy=True,
                                             distillation_use_topk=False, distillation_only=False, tp_group=None)


# ----------------------------------------------------------------------------- FSDP, hidden-state path


def _linear_problem(seed=4, N=13):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g)
    weight = torch.randn(V, H, generator=g) / H ** 0.5 * 3
    labels = torch.randint(0, V, (N,), generator=g)
    return hidden, weight, labels, torch.randn(N, generator=g), torch.randn(N, generator=g)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_linear_cross_entropy_matches_verl_reference(reduction):
    hidden, weight, labels, w1, w2 = _linear_problem()
    T = 0.8
    h0, W0 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    # verl's torch reference of the fused kernel (what impl_backend=torch runs)
    ref_lp, ref_ent = FusedLinearForPPOFunction.apply(h0, W0, labels, T, 5)
    # and verl's own logits-path functions on explicit logits
    logits = (h0 @ W0.T) / T
    torch.testing.assert_close(ref_lp, verl_F.logprobs_from_logits(logits, labels, inplace_backward=False), **TOL)
    torch.testing.assert_close(ref_ent, verl_F.entropy_from_logits(logits), **TOL)
    red = {"none": lambda x: x, "sum": torch.sum, "mean": torch.mean}[reduction]
    ref_out = red(ref_lp)
    scale = w1 if reduction == "none" else 0.7
    ref_gh, ref_gw = torch.autograd.grad((ref_out * scale).sum() + (ref_ent * w2).sum(), (h0, W0))

    h1, W1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    lp, ent = ve.linear_cross_entropy(h1.view(1, -1, H), W1, labels.view(1, -1), T, reduction)
    assert lp.shape == ref_out.shape and ent.shape == (hidden.shape[0],)  # verl's: flat (N,) or a 0-dim reduction
    gh, gw = torch.autograd.grad((lp * scale).sum() + (ent * w2).sum(), (h1, W1))
    torch.testing.assert_close(lp, ref_out, **TOL)
    torch.testing.assert_close(ent, ref_ent, **TOL)
    torch.testing.assert_close(gh, ref_gh, **TOL)
    torch.testing.assert_close(gw, ref_gw, **TOL)


def test_linear_cross_entropy_argument_errors():
    hidden, weight, labels, *_ = _linear_problem()
    with pytest.raises(TypeError, match="temperature must be a float"):
        ve.linear_cross_entropy(hidden, weight, labels, torch.tensor(1.0))
    with pytest.raises(ValueError, match="Invalid reduction"):
        ve.linear_cross_entropy(hidden, weight, labels, 1.0, "max")


def test_fused_linear_for_ppo_matches_verl():
    original = ve._ORIGINALS[("verl.utils.experimental.torch_functional", "FusedLinearForPPO")]
    hidden, weight, labels, w1, w2 = _linear_problem(N=12)
    hidden, labels, w1, w2 = hidden.view(3, 4, H), labels.view(3, 4), w1.view(3, 4), w2.view(3, 4)
    outs = []
    for cls in (original, ve.FusedLinearForPPO):
        h, W = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        lp, ent = cls(chunk_size=5).forward(h, W, labels, temperature=1.3)
        outs.append((lp, ent, *torch.autograd.grad((lp * w1).sum() + (ent * w2).sum(), (h, W))))
    for ref, got in zip(*outs):
        assert got.shape == ref.shape
        torch.testing.assert_close(got, ref, **TOL)


@pytest.mark.parametrize("impl_backend", ["triton", "torch"])
def test_fused_kernels_micro_batch_matches_verl_logits_path(impl_backend, monkeypatch):
    """use_fused_kernels=True: verl's own model patch (forward_with_triton_backend or
    forward_with_torch_backend) now calls our linear_cross_entropy / FusedLinearForPPO; the
    engine's outputs and gradients equal verl's logits path on the same weights."""
    from verl.models.transformers.monkey_patch import patch_forward_with_backends

    module_name, attr = {"triton": ("verl.utils.kernel.linear_cross_entropy", "linear_cross_entropy"),
                         "torch": ("verl.utils.experimental.torch_functional", "FusedLinearForPPO")}[impl_backend]
    ours, calls = getattr(sys.modules[module_name], attr), []
    assert ours in (ve.linear_cross_entropy, ve.FusedLinearForPPO)
    monkeypatch.setattr(sys.modules[module_name], attr, lambda *a, **k: calls.append(1) or ours(*a, **k))

    ref_model = tiny_model()
    cls = type("TinyQwen2" + impl_backend.title(), (TinyQwen2,), {})  # one class per patch
    fused_model = tiny_model(cls=cls)
    fused_model.load_state_dict(ref_model.state_dict())
    patch_forward_with_backends(fused_model, use_fused_kernels=True, fused_kernels_backend=impl_backend)
    ref, ref_grads = run_outputs(FSDPEngineWithLMHead, ref_model, micro_batch(0.7))
    got, got_grads = run_outputs(ve.GrpoKernelsFSDPEngineWithLMHead, fused_model, micro_batch(0.7,
                                                                                             use_fused_kernels=True))
    assert calls, "verl's fused forward did not reach the plugin's kernel"
    assert_same(ref, got, ref_grads, got_grads)


# ----------------------------------------------------------------------------- Megatron, 2 gloo ranks


def _megatron_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import json
    import traceback
    from datetime import timedelta
    from types import SimpleNamespace

    import torch._dynamo as dynamo
    import torch.distributed as dist

    torch.set_num_threads(1)
    dynamo.config.disable = True  # verl's vocab_parallel_entropy torch.compiles a helper: eager on the CPU
    results = {}
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=120))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from megatron.core import parallel_state as mpu

            mpu.initialize_model_parallel(tensor_model_parallel_size=world)
            import grpo_kernels.integrations.verl_engine as plugin
            from verl.workers.engine.megatron.transformer_impl import MegatronEngineWithLMHead
        assert plugin.INSTALLED["megatron_engine"] == "installed", plugin.INSTALLED
        ours = object.__new__(plugin.GrpoKernelsMegatronEngineWithLMHead)
        ours.engine_config = SimpleNamespace(entropy_from_logits_with_chunking=False)
        group = mpu.get_tensor_model_parallel_group()
        kw = dict(calculate_sum_pi_squared=False, distillation_use_topk=False, distillation_only=False,
                  logits_processor_func=None, batch=None)
        Vl = V // world
        cols = slice(rank * Vl, (rank + 1) * Vl)
        for name, shape in (("bshd", (2, 5)), ("thd", (1, 9))):
            for calculate_entropy in (True, False):
                g = torch.Generator().manual_seed(7)
                full = torch.randn(*shape, V, generator=g) * 3
                label = torch.randint(0, V, shape, generator=g)
                temp = torch.rand(*shape, generator=g) + 0.5
                temp.view(-1)[-2:] = 0  # alignment padding: verl sets 1e-8 there, postprocessing drops it
                active = temp > 0
                w1, w2 = torch.randn(shape, generator=g) * active, torch.randn(shape, generator=g) * active
                outs = []
                for fn in (MegatronEngineWithLMHead._lm_head_logits_processor,
                           plugin.GrpoKernelsMegatronEngineWithLMHead._lm_head_logits_processor):
                    shard = full[..., cols].clone().requires_grad_()
                    logits = shard * 1.0 if fn is MegatronEngineWithLMHead._lm_head_logits_processor else shard
                    ret = fn(ours, logits, label.clone(), temp.clone(), calculate_entropy=calculate_entropy,
                             data_format=name, **kw)
                    loss = (ret["log_probs"] * w1).sum() + ((ret["entropy"] * w2).sum() if calculate_entropy else 0)
                    loss.backward()
                    outs.append((ret, shard.grad))
                (ref, ref_grad), (got, grad) = outs
                assert set(ref) == set(got), (set(ref), set(got))
                for k in ref:
                    assert got[k].shape == ref[k].shape
                    torch.testing.assert_close(got[k][active], ref[k][active].float(), **TOL)
                    assert torch.all(got[k][~active] == 0)
                torch.testing.assert_close(grad, ref_grad, **TOL)
                assert shard.equal(full[..., cols]), "our path must not modify the logits"
                results[f"processor_{name}_entropy={calculate_entropy}"] = "ok"
        # the hidden-state drop-in under tensor parallelism (Megatron's fused forward calls it
        # with the output layer's shard and the TP group)
        hidden, weight, labels, w1, w2 = _linear_problem(N=10)
        h_ref, W_ref = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        logits = h_ref @ W_ref.T / 0.9
        lp_ref = verl_F.logprobs_from_logits(logits, labels, inplace_backward=False)
        ent_ref = verl_F.entropy_from_logits(logits)
        dz, = torch.autograd.grad((lp_ref * w1).sum() + (ent_ref * w2).sum(), logits, retain_graph=True)
        gw_ref = (dz.T @ h_ref.detach()) / 0.9
        partial_gh_ref = dz[:, cols] @ weight[cols] / 0.9  # this rank's columns' part, verl's contract
        h, W = hidden.clone().requires_grad_(), weight[cols].clone().requires_grad_()
        lp, ent = plugin.linear_cross_entropy(h, W, labels, 0.9, "none", group)
        gh, gw = torch.autograd.grad((lp * w1).sum() + (ent * w2).sum(), (h, W))
        torch.testing.assert_close(lp, lp_ref.detach(), **TOL)
        torch.testing.assert_close(ent, ent_ref.detach(), **TOL)
        torch.testing.assert_close(gw, gw_ref[cols], **TOL)
        torch.testing.assert_close(gh, partial_gh_ref, **TOL)
        summed = gh.clone()
        dist.all_reduce(summed, group=group)
        torch.testing.assert_close(summed, dz @ weight / 0.9, **TOL)
        results["linear_cross_entropy_tp"] = "ok"
    except Exception:  # noqa: BLE001 - reported by the test
        results["error"] = traceback.format_exc(limit=8)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    try:
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001
        pass


def test_megatron_vocab_parallel_matches_verl(tmp_path):
    pytest.importorskip("megatron.core")
    import json

    import torch.multiprocessing as mp

    if os.environ.get("GRPO_TEST_NATIVE") != "1":
        os.environ["TRITON_INTERPRET"] = "1"  # inherited by the spawned ranks (restored by conftest)
    ctx = mp.spawn(_megatron_worker, args=(2, str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2, join=False)
    ctx.join(timeout=240)
    for p in ctx.processes:
        if p.is_alive():
            p.terminate()
    results = []
    for r in range(2):
        path = tmp_path / f"rank{r}.json"
        assert path.exists(), f"rank {r} wrote no result"
        results.append(json.loads(path.read_text()))
    for r, res in enumerate(results):
        assert "error" not in res, f"rank {r}:\n{res['error']}"
        assert len(res) == 5, res


# ----------------------------------------------------------------------------- without verl


def test_imports_without_verl():
    code = ("import sys; sys.modules['verl'] = None\n"
            "import grpo_kernels.integrations.verl_engine as ve\n"
            "assert all(v.startswith('skipped') for v in ve.INSTALLED.values()), ve.INSTALLED\n"
            "assert ve.GrpoKernelsFSDPEngineWithLMHead is None\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
