"""Kernel launches and host syncs per step (issue 10), counted on the CPU.

Triton launches are counted at the interpreter's entry; aten ops that would be device kernels
through a dispatch mode (views, metadata and allocations excluded; ops the interpreter itself
runs to move a launch's arguments excluded). The eager-CPU value checks (the id range, which
reads the ids on the host) are switched off as on a GPU, where they never run.
"""
from __future__ import annotations

import pytest
import torch
import triton.runtime.interpreter as interpreter
from torch.utils._python_dispatch import TorchDispatchMode

import grpo_kernels
from grpo_kernels import layout, options

FREE = {"view", "_unsafe_view", "expand", "t", "permute", "detach", "alias", "as_strided", "empty", "empty_like",
        "new_empty", "empty_strided", "slice", "select", "unsqueeze", "squeeze", "unbind", "split", "lift_fresh",
        "transpose", "_reshape_alias", "unflatten", "reshape"}
SYNCS = {"_local_scalar_dense", "item", "nonzero"}


class Launches(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.aten, self.triton, self.syncs, self.inside = [], [], [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not self.inside and func.namespace == "aten":
            if name in SYNCS:
                self.syncs.append(name)
            elif name not in FREE:
                self.aten.append(name)
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return len(self.aten) + len(self.triton)


@pytest.fixture
def counter(monkeypatch):
    """A Launches mode that also counts Triton launches; value checks as on a GPU (no host reads)."""
    mode = Launches()
    run = interpreter.InterpretedFunction.run

    def counted(self, *args, **kwargs):
        mode.triton.append(self.fn.__name__)
        mode.inside += 1
        try:
            return run(self, *args, **kwargs)
        finally:
            mode.inside -= 1

    monkeypatch.setattr(interpreter.InterpretedFunction, "run", counted)
    monkeypatch.setattr(options, "eager_cpu", lambda t: False)
    monkeypatch.setattr(layout, "eager_cpu", lambda t: False)
    return mode


def _inputs(B=2, T=16, V=64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, V, generator=g, requires_grad=True)
    ids = torch.randint(0, V, (B, T), generator=g)
    adv = torch.randn(B, generator=g)
    old = torch.randn(B, T, generator=g) - 4
    ref = torch.randn(B, T, generator=g) - 4
    mask = torch.rand(B, T, generator=g) > 0.1
    return x, ids, adv, mask, old, ref


def test_token_level_step_is_at_most_twelve_launches_and_no_sync(counter):
    x, ids, adv, mask, old, ref = _inputs()
    n_items = mask.sum()  # as TRL passes it: a tensor on the device
    with counter:
        loss, metrics = grpo_kernels.fused_grpo_loss(x, ids, adv, mask, old, ref, loss_type="dapo", beta=0.04,
                                                     entropy_coef=0.01, num_items_in_batch=n_items,
                                                     backend="triton")
        loss.backward()
    assert counter.triton == ["_sweep_fwd_kernel", "_loss_kernel", "_sums_kernel", "_sweep_bwd_kernel"]
    assert counter.total <= 12, (counter.triton, counter.aten, counter.total)
    assert counter.syncs == []
    assert all(metrics[k] is not None for k in ("kl", "entropy", "clip_ratio_low", "clip_ratio_high",
                                                "clip_ratio_region", "logprobs"))


def test_token_logprobs_is_at_most_three_launches(counter):
    x, ids, *_ = _inputs()
    with counter:
        grpo_kernels.token_logprobs(x.detach(), ids, backend="triton")
    assert counter.total <= 3 and counter.syncs == [], (counter.triton, counter.aten)


def test_sequence_level_step_is_at_most_twenty_launches_and_no_sync(counter):
    """GSPO (TRL's grpo at sequence level) on the same kernels: the sequence ratio's pass is inside
    the per-sequence loss kernel."""
    x, ids, adv, mask, old, ref = _inputs()
    with counter:
        loss, _ = grpo_kernels.fused_grpo_loss(x, ids, adv, mask, old, ref, loss_type="grpo", beta=0.04,
                                               importance_sampling_level="sequence", backend="triton")
        loss.backward()
    assert counter.syncs == []
    assert counter.triton == ["_sweep_fwd_kernel", "_loss_kernel", "_sums_kernel", "_sweep_bwd_kernel"]
    assert counter.total <= 20, (counter.triton, counter.aten, counter.total)


def test_the_loss_layer_path_has_no_sync_either(counter):
    """Options the Triton loss does not cover (here the entropy quantile) run loss.py: more launches,
    still no host sync."""
    x, ids, adv, mask, old, ref = _inputs()
    with counter:
        loss, _ = grpo_kernels.fused_grpo_loss(x, ids, adv, mask, old, ref, loss_type="grpo", beta=0.04,
                                               top_entropy_quantile=0.5, backend="triton")
        loss.backward()
    assert counter.syncs == []
    assert counter.triton == ["_sweep_fwd_kernel", "_sweep_bwd_kernel"]


def test_two_pass_step_is_at_most_eight_launches_and_no_sync(counter, monkeypatch):
    """The two-pass path on the model's full output (B, T + 1, V): the plan (two kernels), the two-pass
    kernel, the sums, and a backward that checks the upstream gradient on the device."""
    monkeypatch.setenv("GRPO_KERNELS_TWO_PASS", "1")
    x, ids, adv, mask, old, ref = _inputs()
    full = torch.cat([x.detach(), x.detach()[:, :1]], dim=1).requires_grad_()
    with counter:
        loss, _ = grpo_kernels.fused_grpo_loss(full, ids, adv, mask, old, ref, loss_type="dapo", beta=0.04,
                                               entropy_coef=0.01, backend="triton")
        loss.backward()
    assert counter.syncs == []
    assert counter.triton == ["_plan_kernel", "_plan_scalars_kernel", "_two_pass_kernel", "_sums_kernel",
                              "_rescale_kernel"]
    assert counter.total <= 8, (counter.triton, counter.aten, counter.total)


def test_three_pass_step_on_the_full_output_adds_one_fill(counter):
    """The full output's gradient is written by the backward sweep; the unscored last row is one fill."""
    x, ids, adv, mask, old, ref = _inputs()
    full = torch.cat([x.detach(), x.detach()[:, :1]], dim=1).requires_grad_()
    with counter:
        loss, _ = grpo_kernels.fused_grpo_loss(full, ids, adv, mask, old, ref, loss_type="dapo", beta=0.04,
                                               backend="triton")
        loss.backward()
    assert counter.syncs == []
    assert counter.triton == ["_sweep_fwd_kernel", "_loss_kernel", "_sums_kernel", "_sweep_bwd_kernel"]
    assert "copy_" not in counter.aten and "slice_backward" not in counter.aten, counter.aten
    assert counter.total <= 13, (counter.triton, counter.aten, counter.total)
