"""torch.compile, FakeTensor, meta and torch.export see through the four entry points (issue 10).

The sweeps are torch.library operators with fake functions, so dynamo traces fullgraph with
dynamic shapes, a new T does not recompile, and no value check waits for the device (a check
that could fail becomes a NaN in the loss instead). The compile tests use the aot_eager
backend: it runs dynamo, AOTAutograd and the fake tensors — where graph breaks, recompiles and
host syncs show — without Inductor's C++ build, which costs minutes on this CPU.
"""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._subclasses.fake_tensor import FakeTensorMode

import grpo_kernels

V = 11


def batch(T, B=2, seed=0, packed=False):
    g = torch.Generator().manual_seed(seed + T)
    logits = torch.randn(B, T, V, generator=g)
    ids = torch.randint(0, V, (B, T), generator=g)
    adv = torch.randn(B, generator=g)
    ref = torch.randn(B, T, generator=g) - 2.0
    mask = torch.rand(B, T, generator=g) > 0.2
    return logits, ids, adv, ref, mask


def loss_fn(logits, ids, adv, ref, mask):
    loss, metrics = grpo_kernels.fused_grpo_loss(logits, ids, adv, mask, None, ref, beta=0.04, entropy_coef=0.01,
                                                 num_items_in_batch=mask.sum(), backend="torch")
    return loss, metrics["kl"], metrics["clip_ratio_region"], metrics["logprobs"]


def logprobs_fn(logits, ids, adv, ref, mask):
    return grpo_kernels.token_logprobs(logits, ids, 0.7, True, mask, backend="torch")


def linear_fn(hidden, ids, adv, ref, mask, weight):
    loss, metrics = grpo_kernels.fused_linear_grpo_loss(hidden, weight, ids, adv, mask, None, ref, beta=0.04,
                                                        backend="torch")
    return loss, metrics["entropy"]


def linear_logprobs_fn(hidden, ids, adv, ref, mask, weight):
    return grpo_kernels.linear_token_logprobs(hidden, weight, ids, 0.9, True, mask, backend="torch")


def _compare(fn, compiled, args, grad_arg):
    eager_args = [a.detach().clone().requires_grad_() if i == grad_arg else a for i, a in enumerate(args)]
    comp_args = [a.detach().clone().requires_grad_() if i == grad_arg else a for i, a in enumerate(args)]
    want, got = fn(*eager_args), compiled(*comp_args)
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w)
    want[0].sum().backward()
    got[0].sum().backward()
    torch.testing.assert_close(comp_args[grad_arg].grad, eager_args[grad_arg].grad)


@pytest.mark.parametrize("fn", [loss_fn, logprobs_fn], ids=["fused_grpo_loss", "token_logprobs"])
def test_compile_fullgraph_dynamic_does_not_recompile_for_new_T(fn):
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend=counter)
    for T in range(3, 13):
        _compare(fn, compiled, batch(T), 0)
    assert counter.frame_count <= 2, counter.frame_count


@pytest.mark.parametrize("fn", [linear_fn, linear_logprobs_fn], ids=["fused_linear_grpo_loss", "linear_token_logprobs"])
def test_compile_fullgraph_dynamic_fused_linear(fn):
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend=counter)
    weight = torch.randn(V, 8)
    for T in range(3, 13):
        _, ids, adv, ref, mask = batch(T)
        hidden = torch.randn(2, T, 8)
        _compare(fn, compiled, (hidden, ids, adv, ref, mask, weight), 0)
    assert counter.frame_count <= 2, counter.frame_count


def test_fake_tensors_and_meta_tensors():
    with FakeTensorMode():
        logits, ids, adv, ref, mask = (torch.empty(2, 5, V), torch.zeros(2, 5, dtype=torch.long), torch.empty(2),
                                       torch.empty(2, 5), torch.ones(2, 5, dtype=torch.bool))
        loss, metrics = grpo_kernels.fused_grpo_loss(logits.requires_grad_(), ids, adv, mask, None, ref, beta=0.04)
        assert loss.shape == () and metrics["logprobs"].shape == (2, 5)
        loss.backward()
        assert logits.grad.shape == logits.shape
    meta = dict(device="meta")
    logits = torch.empty(2, 5, V, **meta, requires_grad=True)
    loss, metrics = grpo_kernels.fused_grpo_loss(logits, torch.zeros(2, 5, dtype=torch.long, **meta),
                                                 torch.empty(2, **meta), backend="torch")
    loss.backward()
    assert loss.device.type == "meta" and logits.grad.shape == logits.shape
    lp = grpo_kernels.token_logprobs(torch.empty(7, V, **meta), torch.zeros(7, dtype=torch.long, **meta),
                                     cu_seqlens=torch.tensor([0, 3, 7], **meta))
    assert lp.shape == (7,)


def test_torch_export_with_a_dynamic_T():
    class Loss(torch.nn.Module):
        def forward(self, logits, ids, adv, ref, mask):
            return loss_fn(logits, ids, adv, ref, mask)[0]

    T = torch.export.Dim("T", min=2, max=512)
    args = batch(6)
    program = torch.export.export(Loss(), args, dynamic_shapes=({1: T}, {1: T}, None, {1: T}, {1: T}))
    for t in (6, 9):
        a = batch(t)
        torch.testing.assert_close(program.module()(*a), Loss()(*a))


def test_registered_operators_pass_opcheck():
    logits, ids, *_ = batch(4)
    rows = logits.requires_grad_()
    flat = ids.reshape(-1)
    active = torch.rand(8) > 0.3
    for backend in ("torch", "triton"):
        torch.library.opcheck(torch.ops.grpo_kernels.logits_sweep.default,
                              (rows, 0, flat, 0.8, None, active, 0, False, backend, False, True),
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    hidden, weight = torch.randn(8, 4, requires_grad=True), torch.randn(V, 4, requires_grad=True)
    torch.library.opcheck(torch.ops.grpo_kernels.linear_sweep.default,
                          (hidden, weight, None, flat, 1.0, None, active, 0, False, "torch"),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_dtensor_inputs_are_refused_with_what_to_pass():
    class DTensor(torch.Tensor):  # stands in for torch.distributed.tensor.DTensor: the check is by type name
        pass

    logits, ids, adv, _, _ = batch(3)
    with pytest.raises(TypeError, match="to_local"):
        grpo_kernels.fused_grpo_loss(logits.as_subclass(DTensor), ids, adv)
