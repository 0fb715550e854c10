"""GPU probe of the fused-linear path (issue 22): validate against float64, then time the variants
that decide its defaults, in one self-contained call of at most ~100 s.

    OUT=<dir> python bench/gpu_linear_probe.py            # from the repository root, on a CUDA machine

1. validation, N = 512, H = 256, V = 5,000 (bf16 and fp32, dapo + k3 KL, masked rows, a bias):
   loss, grad_hidden and grad_weight of fused_linear_grpo_loss and of the three-GEMM engine
   (triton.fused_forward with the float64 coefficients) against float64 autograd through explicit logits;
2. at 8,192 x 4,096 x 151,936 bf16, dapo with beta 0.04 (the issue's work unit):
   - one cuBLAS GEMM of the shape with bf16 output and with fp32 output (torch.mm(out_dtype=...));
   - the engine, fwd+bwd-equivalent (it leaves the gradients), at several chunk sizes, dz in place
     or in a scratch, grad_weight accumulated in bf16 or fp32, with a per-stage breakdown of one;
   - fused_linear_grpo_loss fwd + loss.backward() (three GEMMs where loss_triton has the token-local
     API, else four), the four-GEMM path alone, and unfused (F.linear + fused_grpo_loss);
   - for each: median ms, peak memory beyond inputs and gradients (torch.cuda.max_memory_allocated),
     relative error of grad_hidden and grad_weight against a float64 computation of the full shape
     (logits, softmax, dz and both products in float64 on the GPU, chunked; the coefficients from
     loss.py in float64);
   - the default variant again at 16,384 tokens.
Each variant runs under try/except and is skipped once the time box (PROBE_LIMIT_S, default 95 s) is
near. Prints a table last; writes $OUT/gpu_linear_probe.json (OUT defaults to bench/results).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
import traceback

T0 = time.time()
LIMIT_S = float(os.environ.get("PROBE_LIMIT_S", "95"))
# PROBE_SMOKE=1: the whole script on the CPU (Triton's interpreter) at toy shapes, to check the script.
SMOKE = os.environ.get("PROBE_SMOKE") == "1"
if SMOKE:
    os.environ["TRITON_INTERPRET"] = "1"
else:
    os.environ.pop("TRITON_INTERPRET", None)
DEVICE = "cpu" if SMOKE else "cuda"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import grpo_kernels  # noqa: E402
from grpo_kernels import linear as linear_api  # noqa: E402
from grpo_kernels.layout import build_tokens  # noqa: E402
from grpo_kernels.linear import triton as tlin  # noqa: E402
from grpo_kernels.loss import objective  # noqa: E402
from grpo_kernels.options import GRPOOptions  # noqa: E402

OPTIONS = dict(loss_type="dapo", beta=0.04, backend="triton")
RESULTS: dict = {"rows": [], "validation": [], "errors": []}


class _Event:
    """torch.cuda.Event, or wall time in the CPU smoke run."""

    def __init__(self):
        self.ev = None if SMOKE else _Event()

    def record(self):
        if SMOKE:
            self.t = time.perf_counter()
        else:
            self.ev.record()

    def elapsed_time(self, other) -> float:
        return 1e3 * (other.t - self.t) if SMOKE else self.ev.elapsed_time(other.ev)


def sync():
    if not SMOKE:
        sync()


def mem_allocated() -> int:
    return 0 if SMOKE else torch.cuda.memory_allocated()


def mem_peak(reset=False) -> int:
    if SMOKE:
        return 0
    if reset:
        torch.cuda.reset_peak_memory_stats()
    return torch.cuda.max_memory_allocated()


def empty_cache():
    if not SMOKE:
        empty_cache()


def left() -> float:
    return LIMIT_S - (time.time() - T0)


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


# ------------------------------------------------------------------------------------------------
# The problem and its float64 reference
# ------------------------------------------------------------------------------------------------

def problem(N, H, V, dtype, seed=0, bias=False, B=8):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    T = N // B
    hidden = torch.randn(N, H, device=DEVICE, generator=g).to(dtype)
    weight = (2.0 * torch.randn(V, H, device=DEVICE, generator=g) / H**0.5).to(dtype)
    b = torch.randn(V, device=DEVICE, generator=g).to(dtype) if bias else None
    ids = torch.randint(0, V, (B, T), device=DEVICE, generator=g)
    adv = torch.randn(B, device=DEVICE, generator=g)
    mask = torch.rand(B, T, device=DEVICE, generator=g) > 0.1
    mask[-1, T // 2:] = False
    return dict(hidden=hidden, weight=weight, bias=b, ids=ids, adv=adv, mask=mask, N=N, H=H, V=V, B=B, T=T)


def reference(p, rows_per_chunk=2048):
    """Float64: log-probs and entropies, loss.py's loss and coefficients (autograd over (N,) values),
    then dz and both products, chunked over rows. Also sets p's old/ref log-probs (from the float64
    log-probs, with noise) so the clipping and the KL act."""
    N, V = p["N"], p["V"]
    h64, w64 = p["hidden"].double(), p["weight"].double()
    b64 = None if p["bias"] is None else p["bias"].double()
    ids = p["ids"].reshape(-1)
    lp = torch.empty(N, dtype=torch.float64, device=DEVICE)
    ent = torch.empty_like(lp)
    for r0 in range(0, N, rows_per_chunk):
        z = h64[r0:r0 + rows_per_chunk] @ w64.T
        if b64 is not None:
            z += b64
        logp = torch.log_softmax(z, -1)
        lp[r0:r0 + rows_per_chunk] = logp.gather(-1, ids[r0:r0 + rows_per_chunk, None])[:, 0]
        ent[r0:r0 + rows_per_chunk] = -(logp.exp() * logp).sum(-1)
        del z, logp
    if "old" not in p:
        g = torch.Generator(device=DEVICE).manual_seed(1)
        noise = lambda s: s * torch.randn(lp.shape, device=DEVICE, generator=g, dtype=torch.float64)  # noqa: E731
        p["old"] = (lp + noise(0.3)).float().view(p["B"], p["T"])
        p["ref"] = (lp + noise(0.2)).float().view(p["B"], p["T"])
    o = GRPOOptions(**OPTIONS)
    tokens = build_tokens(p["ids"], p["adv"], p["mask"], p["old"], p["ref"], None, None, None, o)
    lpv, entv = lp.clone().requires_grad_(), ent.clone().requires_grad_()
    loss, _ = objective(lpv, entv, tokens, o)
    c, e = torch.autograd.grad(loss, (lpv, entv), allow_unused=True, materialize_grads=True)
    gh = torch.empty_like(h64)
    gw = torch.zeros_like(w64)
    for r0 in range(0, N, rows_per_chunk):
        r1 = min(r0 + rows_per_chunk, N)
        z = h64[r0:r1] @ w64.T
        if b64 is not None:
            z += b64
        logp = torch.log_softmax(z, -1)
        pr = logp.exp()
        mean = (pr * z).sum(-1, keepdim=True)
        dz = -c[r0:r1, None] * pr
        dz.scatter_add_(1, ids[r0:r1, None], c[r0:r1, None])
        dz += e[r0:r1, None] * pr * (mean - z)
        gh[r0:r1] = dz @ w64
        gw.addmm_(dz.T, h64[r0:r1])
        del z, logp, pr, dz
    return dict(loss=loss.detach(), c=c.float(), e=e.float(), grad_hidden=gh, grad_weight=gw)


def rel_err(x, ref, rows=4096) -> float:
    """||x - ref|| / ||ref||, in float64, over row chunks (no full-size float64 copy of x)."""
    num = den = 0.0
    x2, r2 = x.reshape(x.shape[0], -1), ref.reshape(ref.shape[0], -1)
    for r0 in range(0, x2.shape[0], rows):
        d = x2[r0:r0 + rows].double() - r2[r0:r0 + rows]
        num += float((d * d).sum())
        den += float((r2[r0:r0 + rows] ** 2).sum())
    return math.sqrt(num / max(den, 1e-300))


# ------------------------------------------------------------------------------------------------
# The implementations: each f(p, leaves) -> (grad_hidden, grad_weight), leaves fresh per call
# ------------------------------------------------------------------------------------------------

def engine(config, ref):
    """The three-GEMM engine with the float64 reference's coefficients (so its error is its own)."""
    c, e = ref["c"], ref["e"]
    has_e = bool(e.abs().max() > 0)

    @torch.no_grad()
    def run(p):
        act = p["mask"].reshape(-1)
        return tlin.fused_forward(p["hidden"], p["weight"], p["bias"], p["ids"].reshape(-1), 1.0, act,
                                  lambda r0, lp, en: (c[r0:r0 + lp.shape[0]],
                                                      e[r0:r0 + lp.shape[0]] if has_e else None),
                                  config=config)[2:4]
    return run


def _leaves(p):
    """hidden and weight as leaves that take a gradient, with none held from a previous call (the
    inputs themselves: no copy of the 1.2 GB weight counts as extra memory)."""
    h, w = p["hidden"].requires_grad_(), p["weight"].requires_grad_()
    h.grad = w.grad = None
    return h, w


def _take(h, w):
    grads = h.grad, w.grad
    h.grad = w.grad = None
    return grads


def public(p):
    h, w = _leaves(p)
    loss, _ = grpo_kernels.fused_linear_grpo_loss(h, w, p["ids"], p["adv"], p["mask"], p["old"], p["ref"],
                                                  lm_head_bias=p["bias"], **OPTIONS)
    loss.backward()
    p["_loss"] = loss.detach()
    return _take(h, w)


def four_gemm(p):
    """The operators' path (forward stats, backward recompute) whatever loss_triton offers."""
    saved = linear_api._token_local_api
    linear_api._token_local_api = lambda: None
    try:
        return public(p)
    finally:
        linear_api._token_local_api = saved


def unfused(p):
    h, w = _leaves(p)
    logits = F.linear(h, w, p["bias"])
    loss, _ = grpo_kernels.fused_grpo_loss(logits.view(p["B"], p["T"], -1), p["ids"], p["adv"], p["mask"], p["old"],
                                           p["ref"], **OPTIONS)
    loss.backward()
    return _take(h, w)


# ------------------------------------------------------------------------------------------------
# Measuring
# ------------------------------------------------------------------------------------------------

def measure(name, fn, p, ref, iters=5, warmup=1, **extra):
    if left() < 8:
        log(f"skip {name}: time box")
        RESULTS["rows"].append(dict(name=name, skipped="time box", **extra))
        return None
    row = dict(name=name, N=p["N"], **extra)
    try:
        grads = None
        for _ in range(warmup):
            grads = fn(p)
        del grads
        sync()
        base = mem_allocated()
        mem_peak(reset=True)
        times = []
        for i in range(iters):
            start, end = _Event(), _Event()
            start.record()
            grads = fn(p)
            end.record()
            sync()
            times.append(start.elapsed_time(end))
            if i == 0:
                peak = mem_peak()
                grad_bytes = sum(g.numel() * g.element_size() for g in grads if g is not None)
                row["extra_GB"] = round((peak - base - grad_bytes) / 1e9, 3)
            if i < iters - 1:
                del grads
            if left() < 5:
                break
        times.sort()
        row["ms"] = round(times[len(times) // 2], 2)
        row["ms_min"] = round(times[0], 2)
        if ref is not None:
            row["err_grad_hidden"] = float(f"{rel_err(grads[0], ref['grad_hidden']):.3e}")
            row["err_grad_weight"] = float(f"{rel_err(grads[1], ref['grad_weight']):.3e}")
            if "_loss" in p:
                want = float(ref["loss"])
                row["err_loss"] = float(f"{abs(float(p.pop('_loss')) - want) / max(abs(want), 1e-30):.3e}")
        del grads
    except Exception as exc:  # noqa: BLE001 - a failed variant is a result, not the end of the probe
        row["error"] = f"{type(exc).__name__}: {exc}"[:400]
        RESULTS["errors"].append(dict(name=name, trace=traceback.format_exc()[-2000:]))
    empty_cache()
    log(name, {k: v for k, v in row.items() if k != "name"})
    RESULTS["rows"].append(row)
    return row


def time_gemms(p):
    h, w = p["hidden"], p["weight"]
    N, V = h.shape[0], w.shape[0]
    out = {}
    for name, fn in (("gemm-bf16-out", lambda: torch.mm(h, w.T)),
                     ("gemm-fp32-out", lambda: torch.mm(h, w.T, out_dtype=torch.float32))):
        try:
            fn()
            sync()
            times = []
            for _ in range(5):
                s, e = _Event(), _Event()
                s.record()
                r = fn()
                e.record()
                sync()
                times.append(s.elapsed_time(e))
                del r
            ms = sorted(times)[2]
            out[name] = dict(ms=round(ms, 2), tflops=round(2 * N * V * h.shape[1] / ms / 1e9, 1))
        except Exception as exc:  # noqa: BLE001
            out[name] = dict(error=f"{type(exc).__name__}: {exc}"[:300])
        empty_cache()
    try:  # does torch.mm(out_dtype=fp32, out=buffer) exist here (the engine's form)?
        buf = torch.empty(256, V, device=DEVICE)
        torch.mm(h[:256], w.T, out_dtype=torch.float32, out=buf)
        out["mm_out_dtype_with_out"] = True
    except Exception as exc:  # noqa: BLE001
        out["mm_out_dtype_with_out"] = f"{type(exc).__name__}: {exc}"[:300]
    log("gemms", out)
    RESULTS["gemm"] = out


@torch.no_grad()
def breakdown(p, ref, config):
    """Per-stage device time of the engine at one config (events around each stage of each chunk)."""
    stages = {"logits_gemm": 0.0, "stats": 0.0, "dz": 0.0, "grad_hidden_gemm": 0.0, "grad_weight_gemm": 0.0}
    try:
        c = ref["c"]
        act = p["mask"].reshape(-1)
        chunks = tlin._Chunks(p["hidden"], p["weight"], p["bias"], p["ids"].reshape(-1), 1.0, act, config, 0)
        grads = tlin._Grads(chunks, (True, True, False))
        outs = tlin._stat_outputs(chunks.N, p["hidden"].device, 5)
        ev = []
        for r0, r1 in chunks.ranges():
            e = [_Event() for _ in range(6)]
            e[0].record()
            x = chunks.logits(r0, r1)
            e[1].record()
            chunks.stats(x, r0, r1, outs)
            e[2].record()
            dz = chunks.dz(x, r0, r1, outs[2][r0:r1], outs[3][r0:r1], outs[4][r0:r1], c[r0:r1], None)
            e[3].record()
            tlin._dz_gemm(dz, chunks.weight, grads.hidden[r0:r1], chunks.w32)
            e[4].record()
            tlin._weight_update(grads.acc, dz, chunks.hidden[r0:r1], grads.first)
            grads.first = False
            e[5].record()
            ev.append(e)
        sync()
        for e in ev:
            for k, name in enumerate(stages):
                stages[name] += e[k].elapsed_time(e[k + 1])
        stages = {k: round(v, 2) for k, v in stages.items()}
        stages["chunks"] = len(ev)
    except Exception as exc:  # noqa: BLE001
        stages = dict(error=f"{type(exc).__name__}: {exc}"[:300])
    log("breakdown", config, stages)
    RESULTS["breakdown"] = dict(config=str(config), stages=stages)
    empty_cache()


def validate(dtype):
    p = problem(48, 32, 300, dtype, seed=3, bias=True, B=4) if SMOKE else \
        problem(512, 256, 5000, dtype, seed=3, bias=True, B=4)
    ref = reference(p)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for name, fn in (("public", public), ("four_gemm", four_gemm),
                     ("engine", engine(tlin.LinearConfig(chunk_rows=20 if SMOKE else 200), ref)),
                     ("engine-scratch", engine(tlin.LinearConfig(chunk_rows=20 if SMOKE else 200, inplace_dz=False),
                                               ref))):
        row = dict(name=name, dtype=str(dtype))
        try:
            gh, gw = fn(p)[:2]
            row["err_grad_hidden"] = rel_err(gh, ref["grad_hidden"])
            row["err_grad_weight"] = rel_err(gw, ref["grad_weight"])
            if "_loss" in p:
                row["err_loss"] = abs(float(p.pop("_loss")) - float(ref["loss"])) / abs(float(ref["loss"]))
            row["ok"] = all(v < tol for k, v in row.items() if k.startswith("err"))
        except Exception as exc:  # noqa: BLE001
            row["error"] = f"{type(exc).__name__}: {exc}"[:400]
            row["ok"] = False
            RESULTS["errors"].append(dict(name=f"validate-{name}", trace=traceback.format_exc()[-2000:]))
        log("validate", row)
        RESULTS["validation"].append(row)


def main():
    assert SMOKE or torch.cuda.is_available(), "a CUDA device is needed"
    try:
        commit = os.environ.get("GRPO_BENCH_COMMIT") or subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=os.path.dirname(__file__)).stdout.strip()
    except Exception:  # noqa: BLE001
        commit = "unknown"
    import triton

    RESULTS["env"] = dict(device="cpu (smoke)" if SMOKE else torch.cuda.get_device_name(), torch=torch.__version__,
                          triton=triton.__version__,
                          commit=commit or "unknown", date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                          token_local_api=linear_api._token_local_api() is not None)
    log(RESULTS["env"])
    for dtype in (torch.float32, torch.bfloat16):
        validate(dtype)

    N, H, V = (64, 32, 300) if SMOKE else (8192, 4096, 151936)
    p = problem(N, H, V, torch.bfloat16)
    ref = reference(p)
    log("float64 reference done")
    time_gemms(p)
    default = tlin.default_config(N, V, H, torch.bfloat16)
    RESULTS["default_config"] = str(default)
    variants = [("engine", default)]
    for rows in (16, 32) if SMOKE else (512, 1024, 2048):
        if rows != default.chunk_rows:
            variants.append((f"engine-rows{rows}", tlin.LinearConfig(chunk_rows=rows)))
    variants += [("engine-scratch", tlin.LinearConfig(chunk_rows=default.chunk_rows, inplace_dz=False)),
                 ("engine-fp32acc", tlin.LinearConfig(chunk_rows=default.chunk_rows, fp32_weight_accumulator=True))]
    for name, cfg in variants:
        measure(name, engine(cfg, ref), p, ref, chunk_rows=cfg.chunk_rows, inplace_dz=cfg.inplace_dz,
                fp32_acc=cfg.fp32_weight_accumulator)
    breakdown(p, ref, default)
    measure("fused_linear_grpo_loss", public, p, ref, path="3-GEMM" if RESULTS["env"]["token_local_api"] else "4-GEMM")
    measure("four-gemm-path", four_gemm, p, ref)
    measure("unfused", unfused, p, ref)
    del ref
    empty_cache()
    if left() > 20:
        p2 = problem(2 * N, H, V, torch.bfloat16, seed=5, B=16)
        g = torch.Generator(device=DEVICE).manual_seed(2)
        p2["old"] = -torch.rand(p2["B"], p2["T"], device=DEVICE, generator=g) * 5
        p2["ref"] = p2["old"] + 0.1
        measure("fused_linear_grpo_loss", public, p2, None, iters=3)
        c2 = torch.randn(2 * N, device=DEVICE) / (2 * N)
        measure("engine", engine(default, dict(c=c2, e=torch.zeros_like(c2))), p2, None, iters=3,
                chunk_rows=default.chunk_rows)


def table():
    lines = []
    env = RESULTS.get("env", {})
    lines.append(f"device {env.get('device')} torch {env.get('torch')} triton {env.get('triton')} "
                 f"commit {env.get('commit')} {env.get('date')}; token-local API: {env.get('token_local_api')}")
    for v in RESULTS["validation"]:
        errs = " ".join(f"{k}={v[k]:.2e}" for k in v if k.startswith("err"))
        lines.append(f"validate {v['name']:>16} {v['dtype']:>15} ok={v.get('ok')} {errs} {v.get('error', '')}")
    for k, v in RESULTS.get("gemm", {}).items():
        lines.append(f"{k}: {v}")
    lines.append(f"{'variant':<26}{'N':>7}{'rows':>6}{'inpl':>6}{'fp32acc':>8}{'ms':>9}{'extra GB':>10}"
                 f"{'err gh':>10}{'err gw':>10}")
    for r in RESULTS["rows"]:
        if "ms" not in r:
            lines.append(f"{r['name']:<26} {r.get('error') or r.get('skipped')}")
            continue
        lines.append(f"{r['name']:<26}{r['N']:>7}{str(r.get('chunk_rows', '')):>6}{str(r.get('inplace_dz', '')):>6}"
                     f"{str(r.get('fp32_acc', '')):>8}{r['ms']:>9.2f}{r.get('extra_GB', float('nan')):>10.3f}"
                     f"{r.get('err_grad_hidden', float('nan')):>10.2e}{r.get('err_grad_weight', float('nan')):>10.2e}")
    if "breakdown" in RESULTS:
        lines.append(f"breakdown (ms, default config): {RESULTS['breakdown']['stages']}")
    return "\n".join(lines)


if __name__ == "__main__":
    try:
        main()
    except Exception:  # noqa: BLE001
        RESULTS["errors"].append(dict(name="main", trace=traceback.format_exc()[-3000:]))
        traceback.print_exc()
    RESULTS["wall_s"] = round(time.time() - T0, 1)
    out = os.environ.get("OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "gpu_linear_probe.json"), "w") as f:
        json.dump(RESULTS, f, indent=1, default=str)
    print(table())
