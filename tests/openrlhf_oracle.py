"""OpenRLHF 0.11.2's own model code as a test oracle, loaded without flash_attn and deepspeed.

`openrlhf.models/__init__.py` imports model.py (deepspeed, and openrlhf.utils, which pulls in
sympy, pylatexenc, ...) and actor.py imports ring_attn_utils, which imports flash_attn at the top;
neither flash_attn nor deepspeed builds on a CPU-only machine. `load()`:

1. registers `openrlhf.models` as a bare package (its real __path__, its __init__ not run), so
   that `openrlhf.models.loss`, `.utils`, `.ring_attn_utils` and `.actor` import one by one,
   each from OpenRLHF's installed file, unchanged;
2. while they import, puts stand-ins in sys.modules for what they import at the top:
   `deepspeed` (only `deepspeed.utils.set_z3_leaf_modules` is referenced, called for MoE models),
   `flash_attn.bert_padding` (`unpad_input`, `pad_input`, `index_first_axis`, `rearrange`:
   flash_attn's padding helpers, written here in plain torch for the one einops pattern OpenRLHF
   uses) and `flash_attn.utils.distributed.all_gather`;
3. removes the stand-ins again, so nothing else (transformers' flash_attn probe included) sees
   them. OpenRLHF's `log_probs_from_logits` then takes its own fallback path (gather minus
   chunked logsumexp) where it would call flash_attn's Triton cross-entropy: the same numbers.

The modules stay in sys.modules under their names, so `patch_actor`'s lazy import of
`openrlhf.models.ring_attn_utils` finds the one loaded here.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import sys
import types

import torch
import torch.distributed as dist

_LOADED: dict[str, types.ModuleType] = {}


def _unpad_input(hidden: torch.Tensor, attention_mask: torch.Tensor):
    """flash_attn.bert_padding.unpad_input: the rows where the mask is 1, in row-major order."""
    seqlens = attention_mask.sum(dim=-1, dtype=torch.int32)
    indices = torch.nonzero(attention_mask.flatten(), as_tuple=False).flatten()
    cu_seqlens = torch.nn.functional.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))
    rows = hidden.reshape(-1, *hidden.shape[2:])[indices]
    return rows, indices, cu_seqlens, int(seqlens.max()), seqlens


def _pad_input(rows: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """flash_attn.bert_padding.pad_input: the rows scattered back to (batch, seqlen, ...), zeros elsewhere."""
    out = rows.new_zeros(batch * seqlen, *rows.shape[1:])
    out = out.index_put((indices,), rows)  # out of place: autograd flows back to the rows
    return out.reshape(batch, seqlen, *rows.shape[1:])


def _index_first_axis(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    return x[indices]


def _rearrange(x: torch.Tensor, pattern: str) -> torch.Tensor:
    if pattern.replace(" ", "") != "bs...->(bs)...":
        raise NotImplementedError(f"the stand-in rearrange knows OpenRLHF's one pattern, not {pattern!r}")
    return x.reshape(-1, *x.shape[2:])


class _AllGather(torch.autograd.Function):
    """flash_attn.utils.distributed.all_gather: the ranks' tensors concatenated along dim 0; the
    backward sums the gradient over the ranks and keeps this rank's part (flash_attn: a
    reduce-scatter, which gloo lacks)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad.chunk(dist.get_world_size(ctx.group))[dist.get_rank(ctx.group)], None


def _all_gather(x: torch.Tensor, group) -> torch.Tensor:
    return _AllGather.apply(x, group)


def _stand_ins() -> dict[str, types.ModuleType]:
    flash_attn = types.ModuleType("flash_attn")
    bert_padding = types.ModuleType("flash_attn.bert_padding")
    bert_padding.unpad_input, bert_padding.pad_input = _unpad_input, _pad_input
    bert_padding.index_first_axis, bert_padding.rearrange = _index_first_axis, _rearrange
    utils = types.ModuleType("flash_attn.utils")
    distributed = types.ModuleType("flash_attn.utils.distributed")
    distributed.all_gather = _all_gather
    flash_attn.bert_padding, flash_attn.utils, utils.distributed = bert_padding, utils, distributed
    deepspeed = types.ModuleType("deepspeed")
    deepspeed.utils = types.SimpleNamespace(set_z3_leaf_modules=lambda model, classes: None)
    return {"flash_attn": flash_attn, "flash_attn.bert_padding": bert_padding, "flash_attn.utils": utils,
            "flash_attn.utils.distributed": distributed, "deepspeed": deepspeed}


def load() -> dict[str, types.ModuleType]:
    """OpenRLHF's models.loss, models.utils, models.ring_attn_utils and models.actor (see the module docstring)."""
    if _LOADED:
        return _LOADED
    spec = importlib.util.find_spec("openrlhf")
    if spec is None:
        raise ImportError("openrlhf is not installed (Makefile: pip install --no-deps openrlhf==0.11.2)")
    version = importlib.metadata.version("openrlhf")
    if version != "0.11.2":
        raise ImportError(f"these tests hold OpenRLHF 0.11.2's code; found openrlhf {version}")
    models_dir = spec.submodule_search_locations[0] + "/models"
    package = types.ModuleType("openrlhf.models")
    package.__path__ = [models_dir]
    package.__package__ = "openrlhf.models"
    # What actor.py imports from transformers and peft, imported before the stand-ins exist: their
    # availability probes (importlib.util.find_spec("deepspeed"), ...) must see the real environment.
    import peft  # noqa: F401
    import peft.tuners.lora  # noqa: F401
    import transformers.integrations.deepspeed  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, BitsAndBytesConfig  # noqa: F401

    stand_ins = _stand_ins()
    saved = {name: sys.modules.get(name) for name in stand_ins}
    sys.modules.update(stand_ins)
    sys.modules["openrlhf.models"] = package
    try:
        for name in ("utils", "loss", "ring_attn_utils", "actor"):
            _LOADED[name] = importlib.import_module(f"openrlhf.models.{name}")
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    return _LOADED
