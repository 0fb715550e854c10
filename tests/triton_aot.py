"""Compile the package's Triton kernels ahead of time for GPU targets, on a machine without a GPU.

Run in a process WITHOUT TRITON_INTERPRET (the interpreter replaces @triton.jit functions
with objects the compiler cannot read). Each launcher in the package exposes
`*_launch(...) -> (kernel, grid, args, meta)`; binding those arguments with Triton's own
binder gives exactly the signature, constexprs and specialisation a real launch would
compile, so what is checked here is what a GPU would run.

    python tests/triton_aot.py      # prints one JSON line per (kernel variant, arch)
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

ARCHS = (80, 90)


def as_jit(kernel) -> JITFunction:
    """The JITFunction behind a kernel (under the interpreter, a fresh one from its .fn)."""
    if isinstance(kernel, JITFunction):
        return kernel
    kw = {k: v for k, v in kernel.kwargs.items() if k in ("do_not_specialize", "do_not_specialize_on_alignment")}
    return JITFunction(kernel.fn, **kw)


def bind(kernel, args, meta, arch: int = 90):
    """Triton's own (specialisation, options) for a launch; equal keys mean one compiled kernel."""
    jit = as_jit(kernel)
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    bound, specialization, options = binder(*args, **meta)
    return jit, backend, bound, specialization, options


def specialization_key(kernel, args, meta) -> str:
    _, _, _, specialization, options = bind(kernel, args, meta)
    return repr((specialization, sorted(options.items())))


def compile_launch(kernel, args, meta, arch: int):
    jit, backend, bound, specialization, options = bind(kernel, args, meta, arch)
    options, signature, constexprs, attrs = jit._pack_args(backend, options, bound, specialization, options)
    return triton.compile(ASTSource(jit, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                          options=options.__dict__)


def resource_usage(cubin: bytes) -> dict[str, int]:
    """REG, STACK, SHARED and LOCAL of the kernel in a cubin, read by the cuobjdump Triton ships."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    line = next(line for line in text.splitlines() if "REG:" in line)
    return {k.lower(): int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", line)}


def report(name: str, compiled, arch: int) -> dict:
    """What can be checked without a GPU: registers, spills (stack/local), shared memory, vector loads."""
    ptx = compiled.asm["ptx"]
    return {
        "kernel": name,
        "arch": arch,
        "num_warps": compiled.metadata.num_warps,
        **resource_usage(compiled.asm["cubin"]),
        "ld_global_v4": len(re.findall(r"ld\.global(?:\.\w+)*\.v4", ptx)),
        "ld_global": len(re.findall(r"ld\.global", ptx)),
    }


def shipped_launches():
    """One launch of every kernel variant we ship: each dtype, aligned or not, each flag
    (masked rows with per-token temperatures as packed batches use, the vocab-parallel partial forward)."""
    from grpo_kernels.sweep import triton as sweep

    for dtype in sweep.SUPPORTED_DTYPES:
        for V in (151936, 1001):  # rows aligned (V % 16 == 0) and not
            base = torch.empty(2, 5, V, dtype=dtype)
            logits = base[:, :-1]  # the strided view trainers pass
            B, T = logits.shape[:2]
            n = B * T
            ids = torch.zeros(n, dtype=torch.int64)
            active, temperature = torch.ones(n, dtype=torch.bool), torch.ones(n)
            outs = [torch.empty(n) for _ in range(5)]
            name = f"{str(dtype).removeprefix('torch.')}-V{V}"
            yield ("fwd-" + name, *sweep.forward_launch(logits, ids, 1.0, None, outs))
            yield ("fwd-rows-" + name, *sweep.forward_launch(logits, ids, temperature, active, outs))
            yield ("fwd-partial-" + name, *sweep.forward_launch(logits, ids, 1.0, None, outs[:4], 7, True))
            grad = torch.empty(B, T, V, dtype=dtype)
            for entropy_grad in (False, True):
                yield (f"bwd-{name}-entropy{int(entropy_grad)}",
                       *sweep.backward_launch(logits, ids, 1.0, None, *outs[2:5], outs[0],
                                              outs[1] if entropy_grad else None, grad))
            yield (f"bwd-rows-{name}-entropy1",
                   *sweep.backward_launch(logits, ids, temperature, active, *outs[2:5], outs[0], outs[1], grad, 7))


def loss_launches():
    """The Triton loss (loss_triton.py) in the variants the two layouts and the main options make."""
    from grpo_kernels import loss_triton
    from grpo_kernels.layout import build_tokens
    from grpo_kernels.options import GRPOOptions

    B, T = 4, 300
    ids = torch.zeros(B, T, dtype=torch.int64)
    lp, ent = torch.empty(B * T), torch.empty(B * T)
    for name, keywords in (("dapo", dict(beta=0.04, entropy_coef=0.01, delta=2.0, dual_clip=3.0)),
                           ("grpo-sequence", dict(loss_type="grpo", beta=0.04, importance_sampling_level="sequence")),
                           ("bnpo-k2", dict(loss_type="bnpo", beta=0.1, kl_estimator="k2",
                                            use_bias_correction_kl=False))):
        o = GRPOOptions(**keywords)
        for packed in (False, True):
            if packed:
                tokens = build_tokens(ids.reshape(-1), torch.empty(B, 1), torch.ones(B * T, dtype=torch.bool),
                                      torch.empty(B * T), torch.empty(B * T), torch.empty(B * T), None,
                                      torch.tensor([0, 100, 300, 700, 1200]), o)
            else:
                tokens = build_tokens(ids, torch.empty(B, T), torch.ones(B, T), torch.empty(B, T), torch.empty(B, T),
                                      None, None, None, o)
            coef, sums = torch.empty(B * T), torch.empty(loss_triton.NUM_SUMS, B)
            suffix = f"{name}-{'packed' if packed else 'padded'}"
            yield ("loss-" + suffix, *loss_triton.loss_launch(lp, ent, tokens, o, coef, sums))
            yield ("sums-" + suffix, *loss_triton.sums_launch(sums, tokens, o, torch.empty(()), torch.empty(7)))


def two_pass_launches():
    """The two-pass loss (sweep/two_pass.py) at V = 151,936 split over programs (as a GPU runs it, not
    the interpreter's unsplit rows), each dtype, with the plan and coefficient kernels of loss_triton."""
    from grpo_kernels import loss_triton
    from grpo_kernels.layout import build_tokens
    from grpo_kernels.options import GRPOOptions
    from grpo_kernels.sweep import two_pass

    B, T = 2, 4
    n = B * T
    ids = torch.zeros(B, T, dtype=torch.int64)
    for name, keywords, packed in (("dapo-beta", dict(beta=0.04), False),
                                   ("grpo-entropy-temp", dict(loss_type="grpo", beta=0.04, entropy_coef=0.01,
                                                              temperature=torch.ones(n)), True),
                                   ("bnpo-delta-dual", dict(loss_type="bnpo", delta=2.0, dual_clip=3.0), False)):
        o = GRPOOptions(**keywords)
        if packed:
            tokens = build_tokens(ids.reshape(-1), torch.empty(B, 1), torch.ones(n, dtype=torch.bool), torch.empty(n),
                                  torch.empty(n), None, None, torch.tensor([0, 3, n]), o)
        else:
            tokens = build_tokens(ids, torch.empty(B), torch.ones(B, T, dtype=torch.bool), torch.empty(B, T),
                                  torch.empty(B, T), None, None, None, o)
        plan = loss_triton.Plan(tokens, o, 1.0, run=False)
        for i, (kernel, grid, args, meta) in enumerate(plan.launches):
            yield (f"plan{i}-{name}", kernel, grid, args, meta)
        yield (f"coef-{name}", *plan.coefficients_launch(torch.empty(n), torch.empty(n), 0, torch.empty(n),
                                                          torch.empty(n)))
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            V = 151936
            full = torch.empty(B, T + 1, V, dtype=dtype)
            rows = full[:, :-1]
            for block, warps in ((8192, 8), (4096, 4)):
                yield (f"two-pass-{name}-{str(dtype).removeprefix('torch.')}-B{block}w{warps}",
                       *two_pass.two_pass_launch(rows, rows, tokens, plan, torch.empty(n), torch.empty(n),
                                                 o.entropy_coef != 0.0, torch.zeros(n + 1, dtype=torch.int32),
                                                 torch.empty(n * 19 * 3), block, warps))


def main() -> int:
    only = sys.argv[1] if len(sys.argv) > 1 else None
    launches = {"two_pass": two_pass_launches}.get(only)
    for name, kernel, _grid, args, meta in (launches() if launches else (*shipped_launches(), *loss_launches(),
                                                                          *two_pass_launches())):
        for arch in ARCHS:
            print(json.dumps(report(name, compile_launch(kernel, args, meta, arch), arch)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
