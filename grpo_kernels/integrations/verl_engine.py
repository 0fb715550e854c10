"""verl 0.9.1 engine plugin: verl's actor log-probs and entropy computed by grpo_kernels' sweeps.

One line in a verl run switches it over, without forking verl::

    actor_rollout_ref.model.external_lib=grpo_kernels.integrations.verl_engine

verl's HFModelConfig imports `external_lib` in every worker before the engine is built
(`VERL_USE_EXTERNAL_MODULES=grpo_kernels.integrations.verl_engine` does the same at `import
verl`). Importing this module calls `install()`, which

1. imports `grpo_kernels.integrations.verl`, so verl's policy-loss registry also holds our
   losses as "grpo_kernels_<mode>" (`policy_loss.loss_mode=grpo_kernels_vanilla`, ...);
2. registers `GrpoKernelsFSDPEngineWithLMHead` (a subclass of verl's FSDPEngineWithLMHead) in
   verl's EngineRegistry for ("language_model", "fsdp" / "fsdp2", device "cuda", vendor
   "nvidia"). EngineRegistry.get_engine_cls looks the (device, vendor) key up before the plain
   "cuda" key verl's own engine sits under, so NVIDIA GPUs get ours, others keep verl's. Its
   prepare_model_outputs computes log-probs and entropy of the logits in one sweep
   (`fsdp_logprobs_entropy`): no temperature-scaled copy of the (N, V) logits, no second pass
   for the entropy, the gradient flowing back to the logits;
3. replaces verl's fused hidden-state kernels, used with `actor_rollout_ref.model.
   use_fused_kernels=True`: `verl.utils.kernel.linear_cross_entropy.linear_cross_entropy`
   (fused_kernel_options.impl_backend=triton, and Megatron's fused forward) by our
   `linear_cross_entropy`, and `verl.utils.experimental.torch_functional.FusedLinearForPPO`
   (impl_backend=torch / liger) by our `FusedLinearForPPO`: the fused-linear sweep, which never
   holds the logits;
4. registers `GrpoKernelsMegatronEngineWithLMHead` (when megatron-core imports) for
   ("language_model", "megatron", "cuda", "nvidia"): its `_lm_head_logits_processor` computes
   the vocab-parallel log-probs and entropy in one sweep over this rank's logits shard
   (`megatron_logprobs_entropy`, tp_group = Megatron's tensor-parallel group) instead of
   verl's in-place division, a full clone for vocab_parallel_entropy and Megatron's
   vocab_parallel_cross_entropy.

Every part is optional: what verl (or megatron-core, or peft for verl's FSDP engine) cannot
import is skipped, and `INSTALLED` says what was done. The module imports without verl.

Not supported, with the error raised at the first micro-batch (`UnsupportedVerlOption`, a
NotImplementedError naming the option): `calculate_sum_pi_squared` (optimal_token_baseline
needs sum p^2, which the sweep does not compute) and top-k distillation (`distillation_use_topk`,
`distillation_only`, which need the logits themselves). Remove the external_lib line for such
runs.

What differs from verl (documented in docs/verl.md): log-probs and entropy are float32 whatever
the logits' dtype (verl: the logits' dtype on the FSDP logits path); the Megatron path gives 0
on rows whose temperature is <= 0 (the alignment padding preprocess_thd_engine adds, which verl
divides by 1e-8 and postprocessing then drops) and never reads them; our sweeps reject ids
outside the vocabulary in eager CPU mode and give NaN for them on a GPU.
"""
from __future__ import annotations

import importlib
import sys
import warnings
from typing import Any

import torch

from ..linear import linear_token_logprobs
from ..ops import token_logprobs

Tensor = torch.Tensor

ENGINE_KEY = ("cuda", "nvidia")  # (device, vendor) in verl's EngineRegistry
FSDP_BACKENDS = ("fsdp", "fsdp2")
INSTALLED: dict[str, str] = {}  # part -> "installed" or why not
_ORIGINALS: dict[tuple[str, str], Any] = {}  # (module, attribute) -> verl's own object

GrpoKernelsFSDPEngineWithLMHead = None  # set by install() when verl's FSDP engine imports
GrpoKernelsMegatronEngineWithLMHead = None  # set by install() when verl's Megatron engine imports


class UnsupportedVerlOption(NotImplementedError):
    """A verl option the grpo_kernels engine plugin cannot compute."""


def _unsupported(option: str, why: str) -> UnsupportedVerlOption:
    return UnsupportedVerlOption(
        f"{option}=True is not supported by the grpo_kernels verl plugin "
        f"(actor_rollout_ref.model.external_lib=grpo_kernels.integrations.verl_engine): {why}. "
        "Run without the plugin (drop the external_lib line) or without this option.")


def check_micro_batch_flags(*, calculate_sum_pi_squared: bool = False, distillation_use_topk: bool = False,
                            distillation_only: bool = False) -> None:
    """Raise UnsupportedVerlOption for the verl options the plugin cannot compute."""
    if calculate_sum_pi_squared:
        raise _unsupported("calculate_sum_pi_squared", "sum p^2 (optimal_token_baseline) needs the probabilities "
                           "of every token, which the one-sweep log-prob / entropy kernel does not compute")
    if distillation_use_topk or distillation_only:
        raise _unsupported("distillation_use_topk" if distillation_use_topk else "distillation_only",
                           "top-k distillation needs the student logits themselves")


# ----------------------------------------------------------------------------- FSDP, logits path


def _full(logits: Tensor) -> Tensor:
    """verl gathers vocab-sharded DTensor logits (FSDP + TP) with full_tensor(); so do we."""
    return logits.full_tensor() if type(logits).__name__ == "DTensor" else logits


def fsdp_logprobs_entropy(logits_rmpad: Tensor, labels_rmpad: Tensor, temperature_rmpad: Tensor | float,
                          *, temperature_is_one: bool = False, calculate_entropy: bool = True,
                          backend: str = "auto") -> tuple[Tensor, Tensor | None]:
    """What verl's FSDPEngineWithLMHead.prepare_model_outputs computes on the remove-padding
    path, in one sweep: logits_rmpad (N, V) (or (1, N, V)), labels_rmpad (N,) (input_ids rolled
    by -1), temperature_rmpad (N,) per token (or a float) -> log_probs (N,) float32 and the
    entropy (N,) float32 (None unless calculate_entropy), both of softmax(logits / temperature).

    verl: logits / temperature.clamp(min=1e-8) (an (N, V) copy unless temperature_is_one),
    entropy_from_logits, then logprobs_from_logits. Here: grpo_kernels.token_logprobs(...,
    return_entropy=True), which reads the logits once and keeps two numbers per row; the
    backward writes d/dlogits of both outputs in one more read.
    """
    logits = _full(logits_rmpad)
    if logits.dim() == 3:
        logits = logits.squeeze(0)
    if temperature_is_one:
        temperature = 1.0
    elif isinstance(temperature_rmpad, Tensor):
        temperature = temperature_rmpad.reshape(-1).to(torch.float32).clamp(min=1e-8)
    else:
        temperature = max(float(temperature_rmpad), 1e-8)
    log_probs, entropy = token_logprobs(logits, labels_rmpad.reshape(-1), temperature, True, backend=backend)
    return log_probs, (entropy if calculate_entropy else None)


def fsdp_padded_logprobs_entropy(logits: Tensor, labels_rmpad: Tensor, temperature: Tensor, cu_seqlens: Tensor, *,
                                 temperature_is_one: bool = False, calculate_entropy: bool = True,
                                 backend: str = "auto") -> tuple[Tensor, Tensor | None]:
    """verl's FSDP path without remove-padding: logits (B, S, V) of right-padded sequences whose
    lengths are cu_seqlens.diff(), labels_rmpad (N,) the packed rolled ids, temperature (B,) one
    per sequence -> log_probs and entropy (N,) float32 of the valid rows, in packed order.

    The padding rows are never read (a mask, not a copy of the valid rows' logits)."""
    logits = _full(logits)
    B, S = logits.shape[0], logits.shape[1]
    lengths = cu_seqlens.diff().to(logits.device)
    valid = torch.arange(S, device=logits.device).unsqueeze(0) < lengths.unsqueeze(1)  # (B, S)
    ids = torch.zeros(B, S, dtype=labels_rmpad.dtype, device=logits.device)
    ids[valid] = labels_rmpad
    if temperature_is_one:
        t: Tensor | float = 1.0
    else:
        t = temperature.reshape(B, 1).to(torch.float32).clamp(min=1e-8).expand(B, S).contiguous()
    log_probs, entropy = token_logprobs(logits, ids, t, True, mask=valid, backend=backend)
    return log_probs[valid], (entropy[valid] if calculate_entropy else None)


def fsdp_prepare_model_outputs(engine, output, output_args: dict, micro_batch, logits_processor_func=None,
                               *, backend: str = "auto") -> dict:
    """GrpoKernelsFSDPEngineWithLMHead.prepare_model_outputs: verl 0.9.1's method with the
    log-prob and entropy computation replaced by one sweep; same inputs, same model_output
    ({"log_probs", "entropy"} as nested (bsz, j) tensors whose offsets are input_ids.offsets()),
    Ulysses gathering and pad stripping through verl's own engine._gather_and_unpad_packed.
    With use_fused_kernels the model forward already returned log_probs / entropy (from our
    linear_cross_entropy / FusedLinearForPPO once installed): verl's own method handles that."""
    from verl.utils import tensordict_utils as tu
    from verl.utils.dataset.dataset_utils import DatasetPadMode
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

    def flag(key, default=False):
        return tu.get_non_tensor_data(data=micro_batch, key=key, default=default)

    check_micro_batch_flags(calculate_sum_pi_squared=flag("calculate_sum_pi_squared"),
                            distillation_use_topk=flag("distillation_use_topk"),
                            distillation_only=flag("distillation_only"))
    if flag("use_fused_kernels"):
        return FSDPEngineWithLMHead.prepare_model_outputs(engine, output, output_args, micro_batch,
                                                          logits_processor_func)
    pad_mode = flag("pad_mode", DatasetPadMode.NO_PADDING)
    if pad_mode != DatasetPadMode.NO_PADDING:
        raise NotImplementedError(f"pad_mode {pad_mode} not implemented")  # verl's own message
    calculate_entropy = flag("calculate_entropy")
    temperature_is_one = output_args.get("temperature_is_one", False)
    cu_seqlens = micro_batch["input_ids"].offsets()
    labels = output_args["input_ids_rmpad_rolled"]

    if flag("use_remove_padding", True):
        log_probs, entropy = fsdp_logprobs_entropy(
            output.logits.squeeze(0), labels, output_args["temperature_rmpad"], temperature_is_one=temperature_is_one,
            calculate_entropy=calculate_entropy, backend=backend)
        pad_size = output_args["pad_size"]
        log_probs = engine._gather_and_unpad_packed(log_probs, pad_size)
        if calculate_entropy:
            entropy = engine._gather_and_unpad_packed(entropy, pad_size)
    else:
        log_probs, entropy = fsdp_padded_logprobs_entropy(
            output.logits, labels, output_args["temperature"], cu_seqlens, temperature_is_one=temperature_is_one,
            calculate_entropy=calculate_entropy, backend=backend)

    model_output = {"log_probs": torch.nested.nested_tensor_from_jagged(log_probs, cu_seqlens)}
    if calculate_entropy:
        model_output["entropy"] = torch.nested.nested_tensor_from_jagged(entropy, cu_seqlens)
    return model_output


# ----------------------------------------------------------------------------- FSDP, hidden-state path


def _group_world(group) -> int:
    if group is None:
        return 1
    import torch.distributed as dist

    return dist.get_world_size(group)


class _PartialHiddenGradLinear(torch.autograd.Function):
    """The vocab-parallel fused-linear sweep with verl's gradient contract: each rank returns
    the part of dL/dhidden that flows through its own vocabulary columns (the caller reduces it,
    as Megatron's gather_from_sequence_parallel_region does in its backward), and its own
    dL/dweight shard. Forward: one all-gather of the shard bounds, one MAX, one SUM."""

    @staticmethod
    def forward(ctx, rows, weight, ids, temperature, group, backend):
        from ..distributed import _owned, _sum_rows, shard_bounds

        start, _ = shard_bounds(weight.shape[0], None, group, rows.device, rows.dtype)
        m, s, u, z_y, _ = torch.ops.grpo_kernels.linear_sweep(rows, weight, None, ids, temperature, None, None, start,
                                                              True, backend)
        logprobs, entropy, shift, log_sum, mean_rel = _sum_rows(m, s, u, z_y, _owned(ids, start, weight.shape[0]),
                                                                None, group)
        ctx.save_for_backward(rows, weight, ids, shift, log_sum, mean_rel)
        ctx.temperature, ctx.start, ctx.backend = temperature, start, backend
        ctx.set_materialize_grads(False)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        needs = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], False]
        if grad_logprobs is None and grad_entropy is None or not any(needs):
            return (None,) * 6
        rows, weight, ids, shift, log_sum, mean_rel = ctx.saved_tensors
        contiguous = lambda g: None if g is None else g.to(shift.dtype).contiguous()  # noqa: E731
        grad_hidden, grad_weight, _ = torch.ops.grpo_kernels.linear_sweep_backward(
            rows, weight, None, ids, ctx.temperature, None, None, shift, log_sum, mean_rel, contiguous(grad_logprobs),
            contiguous(grad_entropy), ctx.start, needs, ctx.backend)
        return (grad_hidden if needs[0] else None, grad_weight if needs[1] else None) + (None,) * 4


def linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, temperature: float = 1.0,
                         reduction: str = "none", dist_process_group=None, *, backend: str = "auto"
                         ) -> tuple[Tensor, Tensor]:
    """Drop-in for verl 0.9.1's verl.utils.kernel.linear_cross_entropy.linear_cross_entropy.

    hidden (N, H) or (..., H), weight (V, H) (under dist_process_group this rank's (V / TP, H)
    shard of an equal split: global columns [rank V / TP, (rank + 1) V / TP)), labels (N,) or
    shaped like hidden[..., 0] with global ids, temperature a float. Returns, as verl's:
    logprobs log softmax(hidden @ weight.T / temperature)[label], flattened to (N,) float32
    for reduction="none", their sum or mean (a 0-dim tensor) for "sum" / "mean"; and the
    entropy (N,) float32. Gradients flow to hidden and weight; under dist_process_group each
    rank gets its own shard's dL/dweight and, as verl's kernel, its own columns' part of
    dL/dhidden (not summed over the group: verl's callers reduce it).

    Computed by the fused-linear sweep (Triton on CUDA, chunked PyTorch on the CPU): the
    (N, V) logits are never stored. verl's kernel additionally needs CUDA, contiguous inputs
    and H % 128 == 0; this one does not.
    """
    if isinstance(temperature, Tensor) or isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float, but got {type(temperature)}")
    if not isinstance(reduction, str) or reduction.lower() not in ("none", "sum", "mean"):
        raise ValueError(f"Invalid reduction: {reduction}")
    reduction = reduction.lower()
    H = hidden.shape[-1]
    rows = hidden.reshape(-1, H)
    ids = labels.reshape(-1)
    if _group_world(dist_process_group) == 1:
        logprobs, entropy = linear_token_logprobs(rows, weight, ids, float(temperature), True, backend=backend)
    else:
        from ..linear import _autocast
        from ..sweep import resolve_backend

        name = resolve_backend(backend, rows.device)
        rows, weight, _ = _autocast(rows, weight, None)
        rows = rows if rows.stride(-1) == 1 else rows.contiguous()
        weight = weight if weight.stride(-1) == 1 else weight.contiguous()
        logprobs, entropy = _PartialHiddenGradLinear.apply(rows, weight, ids.contiguous(), float(temperature),
                                                           dist_process_group, name)
    if reduction == "sum":
        logprobs = logprobs.sum()
    elif reduction == "mean":
        logprobs = logprobs.mean()
    return logprobs, entropy


class FusedLinearForPPO(torch.nn.Module):
    """Drop-in for verl 0.9.1's verl.utils.experimental.torch_functional.FusedLinearForPPO
    (use_fused_kernels=True with impl_backend torch or liger): forward(hidden_states (B, S, H)
    or (N, H), vocab_weights (V, H), input_ids shaped like hidden_states[..., 0], temperature)
    -> (log_probs, entropy) float32 shaped like input_ids, by the fused-linear sweep.
    chunk_size and impl_backend are accepted for verl's call and ignored (the sweep tiles
    itself; one implementation serves every impl_backend)."""

    def __init__(self, chunk_size: int = 512, impl_backend: str = "torch"):
        super().__init__()
        if impl_backend not in ("torch", "liger", "triton"):
            raise ValueError(f"Unsupported FusedLinearForPPO backend: {impl_backend}. Choose 'torch' or 'liger'.")
        self.chunk_size, self.impl_backend = chunk_size, impl_backend

    def forward(self, hidden_states: Tensor, vocab_weights: Tensor, input_ids: Tensor, temperature: float = 1.0
                ) -> tuple[Tensor, Tensor]:
        if hidden_states.ndim not in (2, 3):
            raise ValueError(f"hidden_states must be 2D or 3D, got shape {tuple(hidden_states.shape)}")
        if tuple(input_ids.shape) != tuple(hidden_states.shape[:-1]):
            raise ValueError(f"input_ids shape {tuple(input_ids.shape)} must match hidden_states shape "
                             f"{tuple(hidden_states.shape[:-1])}")
        ids = input_ids.to(torch.int64)
        rows = hidden_states.reshape(-1, hidden_states.shape[-1])
        log_probs, entropy = linear_token_logprobs(rows, vocab_weights, ids.reshape(-1), float(temperature), True)
        return log_probs.view(input_ids.shape), entropy.view(input_ids.shape)


# ----------------------------------------------------------------------------- Megatron


def megatron_logprobs_entropy(logits: Tensor, label: Tensor, temperature: Tensor, *, calculate_entropy: bool = True,
                              tp_group=None, backend: str = "auto") -> tuple[Tensor, Tensor | None]:
    """What verl 0.9.1's MegatronEngineWithLMHead._lm_head_logits_processor computes, in one
    vocab-parallel sweep: logits (B, S, V / TP) this rank's shard of the output layer's columns
    ([rank V / TP, (rank + 1) V / TP), Megatron's equal split) for the "bshd" layout or
    (1, T / CP, V / TP) packed ("thd"), label (B, S) global ids (rolled), temperature (B, S) one
    per token, 0 on alignment padding -> log_probs (B, S) and entropy (B, S) float32, identical
    on every rank of tp_group (None: no tensor parallelism).

    verl: temperature[temperature <= 0] = 1e-8, logits.div_(temperature) in place, a clone of
    the logits for vocab_parallel_entropy (three all-reduces, the softmax saved for the
    backward), then Megatron's vocab_parallel_cross_entropy (three more). Here: the logits are
    neither modified nor copied; one all-reduce MAX and one SUM per forward, none in the
    backward; rows with temperature <= 0 are never read and give 0.
    """
    active = temperature > 0
    t = torch.where(active, temperature.to(torch.float32), 1.0)
    log_probs, entropy = token_logprobs(logits, label, t, True, mask=active, backend=backend, tp_group=tp_group)
    return log_probs, (entropy if calculate_entropy else None)


def _megatron_tp_group():
    from megatron.core import parallel_state as mpu

    if mpu.get_tensor_model_parallel_world_size() <= 1:
        return None
    return mpu.get_tensor_model_parallel_group()


def megatron_lm_head_logits_processor(engine, logits, label, temperature, *, calculate_sum_pi_squared: bool,
                                      calculate_entropy: bool, distillation_use_topk: bool, distillation_only: bool,
                                      logits_processor_func=None, batch=None, data_format: str = "thd",
                                      tp_group: Any = "megatron", backend: str = "auto") -> dict:
    """GrpoKernelsMegatronEngineWithLMHead._lm_head_logits_processor: verl's signature and
    return ({"log_probs": (B, S)} and "entropy" with calculate_entropy), by
    megatron_logprobs_entropy over Megatron's tensor-parallel group (tp_group="megatron"; pass
    a group or None to choose another)."""
    assert logits.shape[:2] == label.shape[:2]
    check_micro_batch_flags(calculate_sum_pi_squared=calculate_sum_pi_squared,
                            distillation_use_topk=distillation_use_topk, distillation_only=distillation_only)
    group = _megatron_tp_group() if isinstance(tp_group, str) and tp_group == "megatron" else tp_group
    log_probs, entropy = megatron_logprobs_entropy(logits, label, temperature, calculate_entropy=calculate_entropy,
                                                   tp_group=group, backend=backend)
    ret = {"entropy": entropy} if calculate_entropy else {}
    ret["log_probs"] = log_probs
    return ret


# ----------------------------------------------------------------------------- installation


def _patch(module_name: str, attr: str, new: Any) -> None:
    module = sys.modules.get(module_name) or importlib.import_module(module_name)
    key = (module_name, attr)
    if key not in _ORIGINALS:
        _ORIGINALS[key] = getattr(module, attr)
    setattr(module, attr, new)


def _register(registry, backend: str, engine_cls) -> None:
    """engine_cls under (device "cuda", vendor "nvidia") for ("language_model", backend), replacing
    an earlier registration of ours (a re-import) but never another plugin's."""
    slot = registry._engines.setdefault("language_model", {}).setdefault(backend, {})
    current = slot.get(ENGINE_KEY)
    if current is not None and current.__name__ != engine_cls.__name__:
        raise RuntimeError(f"verl's EngineRegistry already has {current.__module__}.{current.__qualname__} for "
                           f"language_model/{backend} on {ENGINE_KEY}: two plugins replace the same engine")
    slot[ENGINE_KEY] = engine_cls


def _install_fsdp() -> str:
    global GrpoKernelsFSDPEngineWithLMHead
    from verl.workers.engine.base import EngineRegistry
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

    if GrpoKernelsFSDPEngineWithLMHead is None:
        class GrpoKernelsFSDPEngineWithLMHead(FSDPEngineWithLMHead):  # noqa: F811 - module attribute, see below
            """verl's FSDP LM-head engine with log-probs and entropy from one grpo_kernels sweep."""

            def prepare_model_outputs(self, output, output_args, micro_batch, logits_processor_func):
                return fsdp_prepare_model_outputs(self, output, output_args, micro_batch, logits_processor_func)

        GrpoKernelsFSDPEngineWithLMHead.__module__ = __name__  # pickled by reference as a module attribute
        GrpoKernelsFSDPEngineWithLMHead.__qualname__ = "GrpoKernelsFSDPEngineWithLMHead"
    for backend in FSDP_BACKENDS:
        _register(EngineRegistry, backend, GrpoKernelsFSDPEngineWithLMHead)
    return "installed"


def _install_megatron() -> str:
    global GrpoKernelsMegatronEngineWithLMHead
    from verl.workers.engine.base import EngineRegistry
    from verl.workers.engine.megatron.transformer_impl import MegatronEngineWithLMHead

    if GrpoKernelsMegatronEngineWithLMHead is None:
        class GrpoKernelsMegatronEngineWithLMHead(MegatronEngineWithLMHead):  # noqa: F811
            """verl's Megatron LM-head engine with vocab-parallel log-probs and entropy from one sweep."""

            def _lm_head_logits_processor(self, logits, label, temperature, **kwargs):
                return megatron_lm_head_logits_processor(self, logits, label, temperature, **kwargs)

        GrpoKernelsMegatronEngineWithLMHead.__module__ = __name__
        GrpoKernelsMegatronEngineWithLMHead.__qualname__ = "GrpoKernelsMegatronEngineWithLMHead"
    _register(EngineRegistry, "megatron", GrpoKernelsMegatronEngineWithLMHead)
    return "installed"


def _install_losses() -> str:
    importlib.import_module("grpo_kernels.integrations.verl")  # registers grpo_kernels_<mode> on import
    return "installed"


def _install_fused() -> str:
    _patch("verl.utils.kernel.linear_cross_entropy", "linear_cross_entropy", linear_cross_entropy)
    _patch("verl.utils.experimental.torch_functional", "FusedLinearForPPO", FusedLinearForPPO)
    # Megatron's fused forwards bind the name at import: patch those already imported (later
    # imports read the patched attribute above).
    for name in _MCORE_FUSED:
        if name in sys.modules and hasattr(sys.modules[name], "linear_cross_entropy"):
            _patch(name, "linear_cross_entropy", linear_cross_entropy)
    return "installed"


_MCORE_FUSED = ("verl.models.mcore.model_forward_fused", "verl.models.mcore.model_forward_1f1b_overlap")


def install() -> dict[str, str]:
    """Register the engines and replace verl's fused kernels (idempotent). Returns INSTALLED:
    for each part, "installed" or the reason it was skipped."""
    if importlib.util.find_spec("verl") is None:
        INSTALLED.update({part: "skipped: verl is not importable"
                          for part in ("losses", "fsdp_engine", "fused_kernels", "megatron_engine")})
        return INSTALLED
    for part, fn in (("losses", _install_losses), ("fused_kernels", _install_fused), ("fsdp_engine", _install_fsdp),
                     ("megatron_engine", _install_megatron)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # verl's optional-backend import warnings
                INSTALLED[part] = fn()
        except ImportError as e:
            INSTALLED[part] = f"skipped: {e}"
        except Exception as e:  # noqa: BLE001 - e.g. a megatron-core verl cannot use: keep the other parts
            if part != "megatron_engine" or isinstance(e, RuntimeError) and "EngineRegistry" in str(e):
                raise
            INSTALLED[part] = f"skipped: {type(e).__name__}: {e}"
    return INSTALLED


def uninstall() -> None:
    """Undo install(): verl's own kernels and engines back (for tests)."""
    verl_lce = _ORIGINALS.get(("verl.utils.kernel.linear_cross_entropy", "linear_cross_entropy"))
    for (module_name, attr), original in list(_ORIGINALS.items()):
        setattr(sys.modules[module_name], attr, original)
    for name in _MCORE_FUSED:  # imported after install(): they bound ours
        module = sys.modules.get(name)
        if verl_lce is not None and getattr(module, "linear_cross_entropy", None) is linear_cross_entropy:
            module.linear_cross_entropy = verl_lce
    _ORIGINALS.clear()
    if "verl.workers.engine.base" in sys.modules:
        registry = sys.modules["verl.workers.engine.base"].EngineRegistry
        for backend, slot in registry._engines.get("language_model", {}).items():
            cls = slot.get(ENGINE_KEY)
            if cls is not None and cls.__module__ == __name__:
                del slot[ENGINE_KEY]
    INSTALLED.clear()


install()
