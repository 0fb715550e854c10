"""GPU probe of the two-pass loss and the forward sweep (issue 20): validate, then time variants.

Run on the GPU machine (one call, ~2 minutes):  OUT=... python -m bench.gpu_two_pass_probe
1. the copy floor: a device-to-device copy of the logits' bytes (read + write);
2. correctness of fused_grpo_loss (two-pass path) and token_logprobs against the float64 reference
   at V = 151,936 (rows split over ~19 programs), 50,257 and 1,000, bf16/fp16/fp32, padded full
   output, packed rows with per-token temperature, in place, grad_scale;
3. time at the work unit (8 x 1024 tokens x 151,936 bf16, dapo, beta 0.04, the full (B, T+1, V)
   output): the two-pass fwd+bwd for several (BLOCK, num_warps, tickets), the forward sweep
   (token_logprobs) for several (BLOCK_V, num_warps) with and without entropy, GSPO (three passes),
   and Liger's triton_grpo_loss when it imports.
Prints a table last; writes two_pass_probe.json under $OUT.
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback

DRY = os.environ.get("PROBE_DRY") == "1"  # on the CPU under Triton's interpreter, tiny shapes: a test of this script
if DRY:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import triton  # noqa: E402

import grpo_kernels  # noqa: E402
from grpo_kernels import reference  # noqa: E402
from grpo_kernels.sweep import triton as sweep_triton  # noqa: E402
from grpo_kernels.sweep import two_pass  # noqa: E402

OUT = os.environ.get("OUT", "bench/results")
DEADLINE = time.time() + float(os.environ.get("PROBE_LIMIT_S", "150"))
RESULTS: dict = {"device": "cpu (dry run)" if DRY else torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                 "commit": os.environ.get("GRPO_BENCH_COMMIT", "unknown"), "checks": [], "times": []}
dev = torch.device("cpu" if DRY else "cuda")


def shape(B, T, V):
    return (1, 4, min(V, 300)) if DRY else (B, T, V)


def save():
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "two_pass_probe.json"), "w") as f:
        json.dump(RESULTS, f, indent=1)


def bench(fn, rep=60):
    if DRY:
        fn()
        return float("nan")
    return triton.testing.do_bench(fn, warmup=10, rep=rep, return_mode="median")


def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def inputs(B, T, V, dtype, seed=0, full=True):
    B, T, V = shape(B, T, V)
    g = torch.Generator(device=dev).manual_seed(seed)
    logits = (torch.randn(B, T + (1 if full else 0), V, device=dev, generator=g) * 2).to(dtype)
    ids = torch.randint(0, V, (B, T), device=dev, generator=g)
    adv = torch.randn(B, device=dev, generator=g)
    mask = torch.rand(B, T, device=dev, generator=g) > 0.1
    lp = torch.randn(B, T, device=dev, generator=g) * 0.3 - 3
    old = lp + torch.randn(B, T, device=dev, generator=g) * 0.2
    ref = lp + torch.randn(B, T, device=dev, generator=g) * 0.2
    return logits, ids, adv, mask, old, ref


def check(name, B, T, V, dtype, **kw):
    logits, ids, adv, mask, old, ref = inputs(B, T, V, dtype, seed=B + T + V)
    if DRY and dtype == torch.bfloat16:  # the interpreter has no bf16 arithmetic worth checking here
        logits = logits.float()
    x = logits.clone().requires_grad_()
    loss, met = grpo_kernels.fused_grpo_loss(x, ids, adv, mask, old, ref, **kw)
    loss.backward()
    xr = logits.double().requires_grad_()
    kw_ref = {k: v for k, v in kw.items() if k not in ("grad_scale", "inplace_backward", "backend")}
    lr, mr = reference.grpo_loss(xr[:, :-1], ids, adv, mask.double(), old.double(), ref.double(), **kw_ref)
    lr.backward()
    g = x.grad
    tol = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}[dtype]
    errs = dict(loss=abs(float(loss) - float(lr)) / max(abs(float(lr)), 1e-12), grad=rel(g, xr.grad),
                last_row_zero=float(g[:, -1].abs().max()),
                kl=abs(float(met["kl"]) - float(mr["kl"])) if met.get("kl") is not None else 0.0,
                logprobs=float((met["logprobs"] - torch.log_softmax(logits[:, :-1].double(), -1).gather(
                    -1, ids[..., None])[..., 0]).masked_fill(~mask, 0).abs().max()))
    ok = errs["loss"] < tol and errs["grad"] < tol and errs["last_row_zero"] == 0 and torch.isfinite(g).all()
    RESULTS["checks"].append(dict(name=name, ok=bool(ok), **errs))
    print(f"check {name:40s} {'ok ' if ok else 'BAD'} " + " ".join(f"{k}={v:.2e}" for k, v in errs.items()),
          flush=True)


def checks():
    check("two-pass bf16 V=151936 (split)", 2, 64, 151936, torch.bfloat16, beta=0.04, backend="triton")
    check("two-pass fp32 V=151936 ent+grpo", 2, 33, 151936, torch.float32, beta=0.04, loss_type="grpo",
          entropy_coef=0.01, temperature=0.7, backend="triton")
    check("two-pass fp16 V=50257 delta/dual", 3, 40, 50257, torch.float16, beta=0.04, delta=2.0, dual_clip=3.0,
          backend="triton")
    check("two-pass bf16 V=1000 bnpo k1", 4, 50, 1000, torch.bfloat16, beta=0.04, kl_estimator="k1",
          loss_type="bnpo", backend="triton")
    check("two-pass bf16 V=151936 inplace gs=.25", 2, 64, 151936, torch.bfloat16, beta=0.04, inplace_backward=True,
          grad_scale=0.25, backend="triton")
    # token_logprobs on the full output, with and without entropy
    logits, ids, *_ = inputs(2, 64, 151936, torch.bfloat16, seed=7)
    want = torch.log_softmax(logits[:, :-1].double(), -1)
    lp = grpo_kernels.token_logprobs(logits, ids)
    lp2, H = grpo_kernels.token_logprobs(logits, ids, return_entropy=True)
    wl = want.gather(-1, ids[..., None])[..., 0]
    wh = -(want.exp() * want).sum(-1)
    errs = dict(lp=float((lp - wl).abs().max()), lp2=float((lp2 - wl).abs().max()), H=float((H - wh).abs().max()))
    ok = all(v < 1e-3 for v in errs.values())
    RESULTS["checks"].append(dict(name="token_logprobs full output", ok=ok, **errs))
    print(f"check token_logprobs full output {'ok' if ok else 'BAD'} {errs}", flush=True)
    # Determinism of the split path (a race would move the result).
    logits, ids, adv, mask, old, ref = inputs(2, 64, 151936, torch.bfloat16, seed=3)
    outs = []
    for _ in range(3):
        x = logits.clone().requires_grad_()
        loss, _ = grpo_kernels.fused_grpo_loss(x, ids, adv, mask, old, ref, beta=0.04)
        loss.backward()
        outs.append((float(loss), x.grad.float().sum().item()))
    RESULTS["checks"].append(dict(name="two-pass repeatable", ok=len(set(outs)) == 1, values=outs))
    print("check two-pass repeatable", len(set(outs)) == 1, outs, flush=True)


def timed(name, fn, **extra):
    if time.time() > DEADLINE:
        print(f"skip {name}: out of time", flush=True)
        return None
    try:
        fn()
        if not DRY:
            torch.cuda.synchronize()
        ms = bench(fn)
        RESULTS["times"].append(dict(name=name, ms=ms, **extra))
        print(f"time {name:55s} {ms:8.3f} ms", flush=True)
        save()
        return ms
    except Exception as e:  # a variant that fails to compile or run is recorded, not fatal
        RESULTS["times"].append(dict(name=name, error=repr(e)[:400], **extra))
        print(f"FAIL {name}: {e!r}"[:400], flush=True)
        return None


def main():
    try:
        checks()
    except Exception:
        traceback.print_exc()
        RESULTS["checks"].append(dict(name="checks raised", ok=False, error=traceback.format_exc()[-2000:]))
    save()
    B, T, V = 8, 1024, 151936
    logits, ids, adv, mask, old, ref = inputs(B, T, V, torch.float32 if DRY else torch.bfloat16)
    nbytes = logits[:, :-1].numel() * 2
    dst = torch.empty_like(logits)
    copy_ms = bench(lambda: dst.copy_(logits))
    bw = 2 * logits.numel() * 2 / copy_ms / 1e9
    del dst
    RESULTS.update(copy_ms=copy_ms, bandwidth_tb_s=bw, floor_one_pass_ms=nbytes / bw / 1e9,
                   floor_two_pass_ms=2 * nbytes / bw / 1e9)
    print(f"copy {copy_ms:.3f} ms = {bw:.2f} TB/s; two-pass floor {2 * nbytes / bw / 1e9:.3f} ms", flush=True)
    leaf = logits.clone().requires_grad_()

    def step(**kw):
        def f():
            leaf.grad = None
            loss, _ = grpo_kernels.fused_grpo_loss(leaf, ids, adv, mask, old, ref, beta=0.04, backend="triton", **kw)
            loss.backward()
        return f

    timed("two-pass default fwd+bwd (full output)", step())
    default_block = two_pass.default_block
    launch_defaults = two_pass.launch.__defaults__
    for block, warps, tickets in [(8192, 8, True), (8192, 16, True), (4096, 4, True), (4096, 8, True),
                                  (16384, 16, True), (8192, 8, False), (4096, 8, False)]:
        two_pass.default_block = lambda V, b=block, w=warps: (b, w)
        two_pass.launch.__defaults__ = launch_defaults[:-1] + (tickets,)
        timed(f"two-pass BLOCK={block} warps={warps} tickets={tickets}", step(), block=block, warps=warps,
              tickets=tickets)
    two_pass.default_block = default_block
    two_pass.launch.__defaults__ = launch_defaults

    def fwd_only():
        with torch.no_grad():
            grpo_kernels.fused_grpo_loss(logits, ids, adv, mask, old, ref, beta=0.04, backend="triton")
    timed("two-pass default forward only (no_grad)", fwd_only)
    timed("GSPO three-pass fwd+bwd", step(importance_sampling_level="sequence"))

    config = sweep_triton._launch_config
    for block, warps in [(4096, 8), (8192, 8), (8192, 16), (16384, 16), (2048, 4)]:
        sweep_triton._launch_config = lambda V, b=block, w=warps: (b, w)
        for ent in (False, True):
            timed(f"token_logprobs BLOCK_V={block} warps={warps} entropy={ent}",
                  lambda e=ent: grpo_kernels.token_logprobs(logits, ids, return_entropy=e, backend="triton"), block=block,
                  warps=warps, entropy=ent)
    sweep_triton._launch_config = config
    try:
        sys.path.insert(0, "/tmp/site")
        from liger_kernel.transformers.grpo_loss import triton_grpo_loss

        def liger():  # as bench/impls.py calls it: Liger's default inplace=True, every keyword explicit
            leaf.grad = None
            value, _ = triton_grpo_loss(leaf, old, ref, ids, adv, mask, temperature=1.0, beta=0.04, eps_low=0.2,
                                        eps_high=0.2, inplace=True, loss_type="dapo", importance_sampling_level="token",
                                        reduce=True, use_bias_correction_kl=True)
            value.backward()
        timed("liger triton_grpo_loss fwd+bwd", liger)
    except Exception as e:
        print("liger not timed:", repr(e)[:300])
    save()
    print("\n== summary ==")
    print(f"device {RESULTS['device']} torch {RESULTS['torch']} triton {RESULTS['triton']} "
          f"copy {RESULTS['bandwidth_tb_s']:.2f} TB/s two-pass floor {RESULTS['floor_two_pass_ms']:.3f} ms")
    for c in RESULTS["checks"]:
        print(f"  {'ok ' if c['ok'] else 'BAD'} {c['name']}")
    for t in RESULTS["times"]:
        print(f"  {t['name']:60s} {t.get('ms', float('nan')):8.3f} ms {t.get('error', '')[:80]}")


if __name__ == "__main__":
    main()
