"""torch.compile, FakeTensor, meta and torch.export see through the four entry points (issue 10).

The sweeps are torch.library operators with fake functions, so dynamo traces fullgraph with
dynamic shapes, a new T does not recompile, and no value check waits for the device (a check
that could fail becomes a NaN in the loss instead). The compile tests use the aot_eager
backend: it runs dynamo, AOTAutograd and the fake tensors — where graph breaks, recompiles and
host syncs show — without Inductor's C++ build, which costs minutes on this CPU.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._subclasses.fake_tensor import FakeTensorMode

import grpo_kernels
import grpo_kernels.options

V = 11
H = 8
# The T values each compiled function sees: the first compiles (dynamic), the others must not.
TS = (3, 5, 8)


def counted(fn):
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    return torch.compile(fn, fullgraph=True, dynamic=True, backend=counter), counter


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


def _tensors(out):
    """The tensors of an entry point's result (loss and metrics, or log-probs), in a fixed order."""
    if out is None:
        return []
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for k in sorted(out) for t in _tensors(out[k])]
    return [t for o in out for t in _tensors(o)]


def _compare(fn, compiled, args, grad_arg=0):
    """compiled(*args) == fn(*args), outputs and the gradient of args[grad_arg] (NaN where eager has NaN)."""
    eager_args = [a.detach().clone().requires_grad_() if i == grad_arg else a for i, a in enumerate(args)]
    comp_args = [a.detach().clone().requires_grad_() if i == grad_arg else a for i, a in enumerate(args)]
    want, got = _tensors(fn(*eager_args)), _tensors(compiled(*comp_args))
    assert len(want) == len(got)
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, equal_nan=True)
    want[0].sum().backward()
    got[0].sum().backward()
    torch.testing.assert_close(comp_args[grad_arg].grad, eager_args[grad_arg].grad, equal_nan=True)


def _no_recompile_over_T(fn, make):
    """fn compiles once (fullgraph, dynamic), agrees with eager at every T of TS, and a new T never
    recompiles: the frame count after the first T stays."""
    compiled, counter = counted(fn)
    frames = None
    for T in TS:
        _compare(fn, compiled, make(T))
        frames = counter.frame_count if frames is None else frames
        assert counter.frame_count == frames, f"recompiled at T={T}"
    assert frames >= 1


# ---- every keyword at its default (dynamo turns a default float into a symbolic one: issue 18) ----

def _padded(T, seed=0):
    logits, ids, adv, ref, mask = batch(T, seed=seed)
    return logits, ids, adv


def _padded_linear(T):
    _, ids, adv, _, _ = batch(T)
    g = torch.Generator().manual_seed(100 + T)
    return torch.randn(2, T, H, generator=g), ids, adv


WEIGHT = torch.randn(V, H, generator=torch.Generator().manual_seed(7))
BIAS = torch.randn(V, generator=torch.Generator().manual_seed(8))

DEFAULTS = {
    "fused_grpo_loss": (lambda logits, ids, adv: grpo_kernels.fused_grpo_loss(logits, ids, adv), _padded),
    "token_logprobs": (lambda logits, ids, adv: grpo_kernels.token_logprobs(logits, ids), _padded),
    "fused_linear_grpo_loss": (lambda h, ids, adv: grpo_kernels.fused_linear_grpo_loss(h, WEIGHT, ids, adv),
                               _padded_linear),
    "linear_token_logprobs": (lambda h, ids, adv: grpo_kernels.linear_token_logprobs(h, WEIGHT, ids),
                              _padded_linear),
}


@pytest.mark.parametrize("entry", sorted(DEFAULTS))
def test_compile_with_every_keyword_at_its_default(entry):
    fn, make = DEFAULTS[entry]
    _no_recompile_over_T(fn, make)


# ---- each keyword set: the keywords travel as an argument, so their floats are symbolic too ----

def _full(T, seed=0):
    """Padded batch with every per-token tensor: (logits, ids, adv, mask, old, ref, rollout, sampling)."""
    logits, ids, adv, ref, mask = batch(T, seed=seed)
    g = torch.Generator().manual_seed(200 + T)
    old = torch.randn(2, T, generator=g) - 2.0
    rollout = torch.rand(2, T, generator=g) + 0.5
    sampling = old + 0.1 * torch.randn(2, T, generator=g)
    return logits, ids, adv, mask, old, ref, rollout, sampling


# Together these set every GRPOOptions keyword (test_keyword_sets_cover_every_option checks it), each
# to a value other than its default, in combinations the options accept.
LOSS_KEYWORD_SETS = {
    "trl_clipped": dict(loss_type="dr_grpo", beta=0.04, epsilon_low=0.1, epsilon_high=0.3, delta=2.0,
                        temperature=0.7, use_bias_correction_kl=False, kl_estimator="k2", max_completion_length=16,
                        entropy_coef=0.01, top_entropy_quantile=0.8, off_policy_mask_threshold=0.5,
                        dual_clip=3.0, backend="torch"),
    "sequence": dict(loss_type="grpo", importance_sampling_level="sequence", kl_ratio="sequence", beta=0.02,
                     num_items_in_batch=7.0, num_sequences_in_batch=2.0),
    "sapo": dict(loss_type="sapo", sapo_temperature_pos=0.9, sapo_temperature_neg=1.2,
                 importance_sampling_level="sequence_token"),
    "vespo": dict(loss_type="vespo", vespo_k_pos=1.5, vespo_lambda_pos=2.5, vespo_k_neg=2.5, vespo_lambda_neg=1.5),
    "dppo_verl_agg": dict(loss_type="dppo_tv", clip_ratio_c=2.5, loss_agg_mode="seq-mean-token-sum-norm",
                          loss_scale_factor=0.5, log_ratio_clamp=(None, 10.0), kl_clamp=10.0, verl_metrics=True,
                          beta=0.01, kl_estimator="k1"),
    "clip_cov": dict(loss_type="clip_cov", clip_cov_ratio=0.3, clip_cov_lb=0.5, clip_cov_ub=4.0),
    "kl_cov": dict(loss_type="kl_cov", kl_cov_ratio=0.3, ppo_kl_coef=0.2, log_ratio_clamp=20.0),
    "dro": dict(loss_type="dro", dro_beta=0.5),
    "dp_global": dict(loss_agg_mode="token-mean", dp_size=2, batch_num_tokens=9.0, global_batch_size=4.0,
                      grad_scale=0.5),
    "vllm_is": dict(vllm_importance_sampling_mode="token_truncate", vllm_importance_sampling_clip_max=2.0,
                    vllm_importance_sampling_clip_min=0.5),
    "triton_inplace": dict(backend="triton", inplace_backward=True, beta=0.04, temperature=0.9),
}
# The keyword tensors of the entry points, set in the calls below.
LOSS_TENSOR_KEYWORDS = ("completion_mask", "old_logprobs", "ref_logprobs", "rollout_is_ratio", "sampling_logprobs")


def _loss_with(kw):
    def fn(logits, ids, adv, mask, old, ref, rollout, sampling, kw):
        return grpo_kernels.fused_grpo_loss(logits, ids, adv, mask, old, ref, rollout_is_ratio=rollout,
                                            sampling_logprobs=sampling, **kw)

    return lambda *args: fn(*args, kw)


def test_keyword_sets_cover_every_option():
    set_ = {k for kw in LOSS_KEYWORD_SETS.values() for k in kw}
    fields = {f.name for f in dataclasses.fields(grpo_kernels.options.GRPOOptions)}
    assert fields <= set_, sorted(fields - set_)
    for name, kw in LOSS_KEYWORD_SETS.items():
        grpo_kernels.options.GRPOOptions(**kw)  # each set is one the options accept


@pytest.mark.parametrize("name", sorted(LOSS_KEYWORD_SETS))
def test_compile_fused_grpo_loss_with_each_keyword_set(name):
    kw = LOSS_KEYWORD_SETS[name]
    if not kw.get("inplace_backward"):
        _no_recompile_over_T(_loss_with(kw), _full)
        return
    # The gradient overwrites the logits, which a trainer gets from its lm_head (not a leaf): compare
    # with the out-of-place eager loss on the gradient that reaches the leaf before them.
    compiled, counter = counted(_loss_with(kw))
    frames = None
    for T in TS:
        args = _full(T)
        a, b = args[0].clone().requires_grad_(), args[0].clone().requires_grad_()
        want = _loss_with({**kw, "inplace_backward": False})(a * 2.0, *args[1:])[0]
        got = compiled(b * 2.0, *args[1:])[0]
        torch.testing.assert_close(got, want)
        want.backward()
        got.backward()
        torch.testing.assert_close(b.grad, a.grad)
        frames = counter.frame_count if frames is None else frames
        assert counter.frame_count == frames, f"recompiled at T={T}"


def _packed(T):
    """Two sequences packed into N = 2T - 1 rows: (logits (N, V), ids (N,), adv (2,), cu_seqlens, mask (N,))."""
    logits, ids, adv, _, mask = batch(T)
    n = 2 * T - 1
    cu = torch.tensor([0, T, n])
    return logits.reshape(-1, V)[:n], ids.reshape(-1)[:n], adv, cu, mask.reshape(-1)[:n]


def test_compile_fused_grpo_loss_packed():
    fn = lambda logits, ids, adv, cu, mask: grpo_kernels.fused_grpo_loss(  # noqa: E731
        logits, ids, adv, mask, None, None, cu_seqlens=cu, beta=0.0, importance_sampling_level="sequence")
    _no_recompile_over_T(fn, _packed)


LOGPROBS_KEYWORD_SETS = {
    "float_temperature_entropy_mask": lambda T: (dict(temperature=0.7, return_entropy=True,
                                                      mask=batch(T)[4], backend="torch"), _padded(T)),
    "tensor_temperature": lambda T: (dict(temperature=torch.rand(2, T) + 0.5), _padded(T)),
    "packed": lambda T: (dict(cu_seqlens=_packed(T)[3], mask=_packed(T)[4], return_entropy=True),
                         _packed(T)[:3]),
    "triton": lambda T: (dict(backend="triton", temperature=1.3), _padded(T)),
}


@pytest.mark.parametrize("name", sorted(LOGPROBS_KEYWORD_SETS))
def test_compile_token_logprobs_with_each_keyword_set(name):
    def make(T):
        kw, (logits, ids, _) = LOGPROBS_KEYWORD_SETS[name](T)
        return logits, ids, kw

    _no_recompile_over_T(lambda logits, ids, kw: grpo_kernels.token_logprobs(logits, ids, **kw), make)


LINEAR_KEYWORD_SETS = {
    "bias_temperature_entropy_mask": lambda T: dict(lm_head_bias=BIAS, temperature=0.7, return_entropy=True,
                                                    mask=batch(T)[4], backend="torch"),
    "tensor_temperature_triton": lambda T: dict(temperature=torch.rand(2, T) + 0.5, backend="triton"),
}


@pytest.mark.parametrize("name", sorted(LINEAR_KEYWORD_SETS))
def test_compile_linear_token_logprobs_with_each_keyword_set(name):
    def make(T):
        h, ids, _ = _padded_linear(T)
        return h, ids, LINEAR_KEYWORD_SETS[name](T)

    _no_recompile_over_T(lambda h, ids, kw: grpo_kernels.linear_token_logprobs(h, WEIGHT, ids, **kw), make)


# The fused-linear loss shares GRPOOptions and the objective with fused_grpo_loss: a few sets that
# reach its own code (bias, packed rows, the Triton sweep) and two loss families.
LINEAR_LOSS_SETS = ("trl_clipped", "dppo_verl_agg", "vllm_is", "triton_inplace")


@pytest.mark.parametrize("name", LINEAR_LOSS_SETS)
def test_compile_fused_linear_grpo_loss_with_keyword_sets(name):
    kw = {**LOSS_KEYWORD_SETS[name], "lm_head_bias": BIAS}

    def fn(h, ids, adv, mask, old, ref, rollout, sampling, kw):
        return grpo_kernels.fused_linear_grpo_loss(h, WEIGHT, ids, adv, mask, old, ref, rollout_is_ratio=rollout,
                                                   sampling_logprobs=sampling, **kw)

    def make(T):
        _, ids, adv, mask, old, ref, rollout, sampling = _full(T)
        return (_padded_linear(T)[0], ids, adv, mask, old, ref, rollout, sampling, kw)

    _no_recompile_over_T(fn, make)


def test_compile_fused_linear_grpo_loss_packed():
    def make(T):
        _, ids, adv, cu, mask = _packed(T)
        return torch.randn(ids.shape[0], H), ids, adv, cu, mask

    fn = lambda h, ids, adv, cu, mask: grpo_kernels.fused_linear_grpo_loss(  # noqa: E731
        h, WEIGHT, ids, adv, mask, cu_seqlens=cu, importance_sampling_level="sequence")
    _no_recompile_over_T(fn, make)


@pytest.mark.parametrize("bad, match", [(dict(temperature=-1.0), "temperature must be > 0"),
                                        (dict(epsilon_low=1.5), "epsilon_low must be in"),
                                        (dict(beta=float("nan")), "beta must be finite")])
def test_a_bad_keyword_still_raises_under_compile(bad, match):
    """The checks run on the symbolic floats too (as guards): a bad value is refused with its message,
    as the ValueError itself where dynamo may fall back to eager, inside dynamo's error under fullgraph."""
    logits, ids, adv = _padded(3)
    fn = lambda logits, ids, adv, kw: grpo_kernels.fused_grpo_loss(logits, ids, adv, **kw)[0]  # noqa: E731
    compiled, _ = counted(fn)
    compiled(logits, ids, adv, dict(temperature=0.8, epsilon_low=0.2, beta=0.0))
    with pytest.raises(Exception, match=match):
        compiled(logits, ids, adv, bad)
    torch._dynamo.reset()
    with pytest.raises(ValueError, match=match):
        torch.compile(fn, dynamic=True, backend="aot_eager")(logits, ids, adv, bad)


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
