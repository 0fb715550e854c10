"""What can be checked of the Triton kernels without a GPU.

- Every shipped kernel variant compiles ahead of time for sm_80 and sm_90 (the
  interpreter accepts code the real compiler rejects), without register spills, within
  shared memory, and with 16-byte global loads where rows are aligned.
- Calls with 20 different T, beta and temperature map to one specialisation key per
  kernel: a new batch shape or hyperparameter never recompiles.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import grpo_kernels
from grpo_kernels.sweep import triton as sweep

sys.path.insert(0, str(Path(__file__).parent))
import triton_aot  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "triton_aot.py")], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def test_every_variant_compiles_for_sm80_and_sm90(compiled):
    names = {r["kernel"] for r in compiled}
    two_pass = {n for n in names if n.startswith(("two-pass-", "plan", "coef-"))}
    # the two-pass loss: 3 option sets x (3 dtypes x 2 blocks, the plan's two kernels, the coefficients)
    assert len(two_pass) == 3 * (3 * 2 + 3)
    names -= two_pass
    sweeps = {n for n in names if not n.startswith(("loss-", "sums-"))}
    # dtypes x alignment x (fwd, fwd with row mask and temperatures, partial fwd, bwd, bwd with entropy,
    # bwd with row mask, temperatures and entropy)
    assert len(sweeps) == 3 * 2 * 6
    # the Triton loss: 3 option sets x 2 layouts, two kernels each
    assert len(names - sweeps) == 3 * 2 * 2
    assert {(r["kernel"], r["arch"]) for r in compiled} == {(n, a) for n in names | two_pass for a in (80, 90)}


def test_no_spills_and_shared_memory_within_limits(compiled):
    for r in compiled:
        assert r["stack"] == 0 and r["local"] == 0, r  # spilled registers live in local memory
        assert r["shared"] <= 48 * 1024, r
        assert r["reg"] <= 128, r  # leaves room for 2+ resident blocks of 8 warps


def test_aligned_rows_use_16_byte_loads(compiled):
    for r in compiled:
        if "V151936" in r["kernel"]:
            assert r["ld_global_v4"] > 0, r


def test_twenty_shapes_and_hyperparameters_share_one_compiled_variant():
    keys: dict[str, set[str]] = {}

    def record(kernel):
        def hook(*args, **meta):
            keys.setdefault(kernel.fn.__name__, set()).add(triton_aot.specialization_key(kernel, args, meta))
        return hook

    hooks = [(k, record(k)) for k in (sweep._sweep_fwd_kernel, sweep._sweep_bwd_kernel)]
    for kernel, hook in hooks:
        kernel.add_pre_run_hook(hook)
    try:
        g = torch.Generator().manual_seed(0)
        V, B = 64, 2
        for i in range(20):
            T = 3 + i  # 20 different lengths, odd and even, multiples of 16 or not
            full = torch.randn(B, T + 1, V, generator=g, dtype=torch.bfloat16)
            x = full[:, :-1].detach().requires_grad_()
            ids = torch.randint(0, V, (B, T), generator=g)
            loss, _ = grpo_kernels.fused_grpo_loss(
                x, ids, torch.randn(B, generator=g), ref_logprobs=torch.randn(B, T, generator=g) - 4,
                beta=0.01 * (i + 1), temperature=0.5 + 0.05 * i, backend="triton")
            loss.backward()
    finally:
        for kernel, hook in hooks:
            kernel.pre_run_hooks.remove(hook)
    assert set(keys) == {"_sweep_fwd_kernel", "_sweep_bwd_kernel"}
    for name, variants in keys.items():
        assert len(variants) == 1, (name, variants)
