"""csrc/two_pass.cu's kernel run on the CPU (csrc/emulation/emulate.py) against the float64
contract (tests/two_pass_reference.py): its logic (slices, alignment, the cluster's exchange of
(m, s, u), the per-token loss, the NaN rules, in place) checked where no GPU is at hand.

The emulation rewrites only the hardware paths (cp.async, ex2.approx, the cluster barrier and
distributed shared memory, 64 threads per block); those, the launchers and the speed are what
tests/test_cuda_backend.py checks on a GPU. Skipped without g++ or the CUDA headers.
"""
from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path

import pytest
import torch

from two_pass_reference import (OPTION_SETS, check_two_pass, make_two_pass_inputs, nan_poisoned,
                                poison_inactive, reference_two_pass)

_SPEC = importlib.util.spec_from_file_location(
    "two_pass_emulation", Path(__file__).resolve().parent.parent / "csrc" / "emulation" / "emulate.py")
emulate = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(emulate)

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def so():
    reason = emulate.unavailable_reason()
    if reason:
        pytest.skip(reason)
    return emulate.build(Path(tempfile.gettempdir()) / "grpo_kernels_two_pass_emulation")


# (V, L, row_start, rows off a 16-byte boundary, temperature, cluster size): one block (sm_80's
# path) and clusters of 4, 8 and 16, where the target's block is often not rank 0, slices are
# equal or not, and the last blocks of a short row hold nothing.
LAYOUTS = [(7, 6, 0, False, "scalar", 1), (1027, 7, 2, True, "per_row", 4), (3001, 5, 1, True, "scalar", 8),
           (1024, 6, 1, False, "scalar", 4),  # packs a multiple of the cluster: equal slices
           (7, 4, 0, True, "per_row", 16)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("options", list(OPTION_SETS))
def test_emulated_two_pass_matches_float64(so, dtype, options):
    for seed, (V, L, row_start, shifted, temperature, cluster) in enumerate(LAYOUTS):
        if cluster == 16 and dtype != torch.float32:
            continue  # 1,024 host threads per row: once per option set is enough
        T = L - row_start - (1 if L - row_start > 4 else 0)
        kw = make_two_pass_inputs(2, L, V, T, row_start, dtype, CPU, seed, OPTION_SETS[options],
                                  temperature=temperature, shifted=shifted)
        got = emulate.two_pass(so, kw, nan_poisoned(kw["logits"]), cluster)
        check_two_pass(kw, got, reference_two_pass(kw), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cluster", [1, 4])
def test_emulated_inactive_rows_are_never_read_and_in_place(so, dtype, cluster):
    """Inactive rows hold NaN logits, garbage ids, zero temperatures and NaN per-token inputs:
    outputs 0, gradient rows 0; in place gives bitwise the same numbers."""
    B, L, T, V = 3, 8, 6, 2053
    kw = make_two_pass_inputs(B, L, V, T, 1, dtype, CPU, 21, OPTION_SETS["everything"], temperature="per_row",
                              active_fraction=0.6, shifted=True)
    clean = reference_two_pass(kw)
    poison_inactive(kw, T)
    inactive = ~kw["active"]
    got = emulate.two_pass(so, kw, nan_poisoned(kw["logits"]), cluster)
    check_two_pass(kw, got, clean, dtype)
    for out in got[1:]:
        assert (out[..., inactive] == 0).all()
    inplace = emulate.two_pass(so, kw, kw["logits"], cluster)
    for a, b in zip(got, inplace):
        assert torch.equal(a, b)


def test_emulated_strided_output_view(so):
    dtype = torch.bfloat16
    kw = make_two_pass_inputs(2, 5, 1000, 3, 1, dtype, CPU, 41, OPTION_SETS["on_policy_k1"])
    big = torch.randn(2, 8, 1003).to(dtype)
    view = big[:, 2:7, 3:]
    view.copy_(kw["logits"])
    kw["logits"] = view
    grad_big = torch.full((3, 6, 1010), float("nan"), dtype=dtype)
    grad = grad_big[1:, 1:, 5:1005]  # another alignment than the logits: element-wise stores
    got = emulate.two_pass(so, kw, grad, 4)
    check_two_pass(kw, got, reference_two_pass(kw), dtype)
    assert torch.isnan(grad_big[0]).all() and torch.isnan(grad_big[:, 0]).all()


def test_emulated_non_finite_inputs_poison_their_row(so):
    base = make_two_pass_inputs(2, 5, 777, 4, 1, torch.float32, CPU, 51, OPTION_SETS["everything"])
    for name, value in (("advantages", float("nan")), ("old_logprobs", float("inf")), ("w", float("nan")),
                        ("ref_logprobs", -float("inf")), ("rollout", float("nan")), ("mask", float("inf"))):
        kw = dict(base)
        kw[name] = base[name].clone()
        kw[name][3] = value
        got = emulate.two_pass(so, kw, nan_poisoned(kw["logits"]), 4)
        check_two_pass(kw, got, reference_two_pass(kw), torch.float32)
        assert torch.isnan(got[3][:, 3]).all(), name
        assert torch.isnan(got[0][0, 1 + 3]).all(), name
    kw = dict(base)
    kw["ids"] = base["ids"].clone()
    kw["ids"][2] = 777  # outside [0, V): NaN logprob, never an out-of-bounds read
    got = emulate.two_pass(so, kw, nan_poisoned(kw["logits"]), 4)
    assert torch.isnan(got[1][2])
    check_two_pass(kw, got, reference_two_pass(kw), torch.float32)


def test_emulation_notices_an_unknown_kernel_edit(monkeypatch):
    """The rewrites fail loudly when the kernel changes under them."""
    original = Path.read_text

    def edited(self, *args, **kwargs):
        text = original(self, *args, **kwargs)
        return text.replace("barrier.cluster.wait.acquire.aligned", "barrier.cluster.wait.aligned") \
            if self.name == "two_pass.cu" else text
    monkeypatch.setattr(Path, "read_text", edited)
    with pytest.raises(RuntimeError, match="update the emulation"):
        emulate.emulated_source()


@pytest.mark.parametrize("cluster", [2, 4, 8])
@pytest.mark.parametrize("V", [1024, 1027])
def test_emulated_target_at_every_slice_boundary(so, cluster, V):
    """Each row's target is the first or last column of one block's slice (for that row's own
    alignment): the block that holds it, and only that one, supplies z_y to the whole cluster."""
    dtype, kvec, T = torch.bfloat16, 8, 24
    kw = make_two_pass_inputs(1, T + 1, V, T, 1, dtype, CPU, 61, OPTION_SETS["dapo_k3"], shifted=V % 8 != 0)
    ids = []
    for t in range(T):
        phase = (kw["logits"][0, 1 + t].data_ptr() % 16) // 2
        packs = (V + phase + kvec - 1) // kvec
        per = (packs + cluster - 1) // cluster
        edges = sorted({min(V - 1, max(0, k * kvec - phase + d)) for k in range(0, packs + 1, per) for d in (-1, 0)})
        ids.append(edges[t % len(edges)])
    kw["ids"] = torch.tensor(ids)
    got = emulate.two_pass(so, kw, nan_poisoned(kw["logits"]), cluster)
    check_two_pass(kw, got, reference_two_pass(kw), dtype)
