"""GPU probe of the CUDA C++ two-pass loss (csrc/two_pass.cu), self-contained.

Run from the repository root on a machine with an NVIDIA GPU (issue 21; unattended, time-boxed):

    OUT=bench/results python bench/gpu_csrc_probe.py          # <= ~120 s including the build

Needs torch with CUDA, nvcc and ninja (torch.utils.cpp_extension builds csrc/ for this GPU only).
PROBE_BUDGET_S (default 115) bounds the whole run; PROBE_BUILD_DIR (default
/tmp/grpo_csrc_probe_build) keeps the build between runs.

Stages, each in its own try/except, each recorded in $OUT/gpu_csrc_probe.json as it finishes:
  1. build csrc/ with torch.utils.cpp_extension.load for this GPU only (the compiler's error is
     printed in full if it fails);
  2. the plan (cluster size, shared memory per block) for the timed shapes;
  3. validate at small shapes against the float64 contract (tests/two_pass_reference.py, loaded
     by path: torch only): bf16 / fp16 / fp32, V from 7 to 262,144, every cluster size the device
     allows, masked rows poisoned with NaN, per-token temperature, strided views, in place;
  4. time at 8,192 x 151,936 and 16,384 x 151,936 bf16 (the model's full output (B, T + 1, V),
     gradient of the whole tensor) against the copy floor (a device-to-device copy of the same
     bytes: read + write), each cluster size, in place, and the three-pass csrc sweeps.
A watchdog writes what is done and exits if the whole run passes PROBE_BUDGET_S (default 115 s).
The table comes last.
"""
from __future__ import annotations

import datetime
import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
OUT = Path(os.environ.get("OUT", ROOT / "bench" / "results"))
BUDGET_S = float(os.environ.get("PROBE_BUDGET_S", "115"))
START = time.time()
RESULT: dict = {"stages": {}}


def elapsed() -> float:
    return time.time() - START


def save() -> None:
    try:
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / "gpu_csrc_probe.json").write_text(json.dumps(RESULT, indent=2, default=str))
    except Exception as error:  # noqa: BLE001 - the probe must finish
        print(f"could not write the JSON: {error}", flush=True)


def watchdog() -> None:
    print(f"\nWATCHDOG: {BUDGET_S:.0f} s passed; writing what is done and exiting", flush=True)
    RESULT["watchdog"] = f"stopped after {elapsed():.1f} s"
    save()
    os._exit(3)


def stage(name):
    """Runs fn as stage `name`, records ok / error / seconds, never raises."""
    def wrap(fn):
        t0 = time.time()
        print(f"\n=== {name} (t = {elapsed():.1f} s)", flush=True)
        try:
            value = fn()
            RESULT["stages"][name] = {"ok": True, "seconds": round(time.time() - t0, 2)}
            return value
        except Exception as error:  # noqa: BLE001
            text = "".join(traceback.format_exception(error))
            print(text, flush=True)
            RESULT["stages"][name] = {"ok": False, "seconds": round(time.time() - t0, 2), "error": text[-4000:]}
            return None
        finally:
            save()
    return wrap


def environment() -> dict:
    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0]}
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                        text=True, timeout=5).stdout.strip()
    except Exception:  # noqa: BLE001
        info["commit"] = "?"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(device=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count)
    return info


# --- 1. Build -------------------------------------------------------------------------------------

def build():
    from torch.utils import cpp_extension

    major, minor = torch.cuda.get_device_capability()
    os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"  # this GPU only: the quickest build
    build_dir = Path(os.environ.get("PROBE_BUILD_DIR", "/tmp/grpo_csrc_probe_build"))
    build_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    try:
        module = cpp_extension.load(
            name="grpo_csrc_probe", sources=[str(CSRC / n) for n in ("binding.cpp", "grpo_sweep.cu", "two_pass.cu")],
            extra_cflags=["-O3"], extra_cuda_cflags=["-O3", "-lineinfo", "--resource-usage"],
            build_directory=str(build_dir), verbose=True)
    except Exception as error:
        print("BUILD FAILED; the compiler said:\n" + str(error), flush=True)
        for log in build_dir.glob("*.log"):
            print(log.read_text(), flush=True)
        raise
    RESULT["build_seconds"] = round(time.time() - t0, 1)
    return module


# --- 3. Validation ----------------------------------------------------------------------------------

def load_reference():
    spec = importlib.util.spec_from_file_location("two_pass_reference", ROOT / "tests" / "two_pass_reference.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.two_pass_reference


OPTIONS = {
    "dapo_k3": dict(old=True, ref=True, rollout=False, beta=0.04, eps_low=0.2, eps_high=0.28, kl_estimator=3),
    "everything": dict(old=True, ref=True, rollout=True, beta=0.1, eps_low=0.2, eps_high=0.2, delta=1.5,
                       dual_clip=3.0, kl_estimator=2, kl_ratio_weight=True, has_entropy_grad=True),
    "on_policy_k1": dict(old=False, ref=True, rollout=False, beta=0.02, eps_low=0.2, eps_high=0.28, kl_estimator=1,
                         has_entropy_grad=True),
}
ARG_ORDER = ("row_start", "T", "ids", "inv_temperature", "temperature_rows", "active", "w", "mask", "advantages",
             "old_logprobs", "ref_logprobs", "rollout", "scalars", "beta", "eps_low", "eps_high", "delta",
             "dual_clip", "kl_estimator", "kl_ratio_weight", "has_entropy_grad")


def inputs(B, L, V, T, row_start, dtype, seed, options, per_row=False, active_fraction=1.0, shifted=False,
           device="cuda"):
    g = torch.Generator(device=device).manual_seed(seed)
    full = (torch.randn(B, L, V + int(shifted), generator=g, device=device) * 3.0).to(dtype)
    logits = full[..., int(shifted):]
    N = B * T
    ids = torch.randint(0, V, (N,), generator=g, device=device)
    trows = 0.5 + torch.rand(N, generator=g, device=device) if per_row else None
    t = trows.double() if per_row else torch.full((N,), 0.7, device=device, dtype=torch.float64)
    # The true log-probs (in chunks of rows: 16,384 x 151,936 in float64 would be 20 GB), so that
    # old / ref put the ratio around 1, some tokens clipped and some not.
    rows = logits[:, row_start:row_start + T].reshape(N, V)
    lp = torch.empty(N, device=device)
    for i in range(0, N, 1024):
        x = rows[i:i + 1024].double() / t[i:i + 1024, None]
        lp[i:i + 1024] = torch.log_softmax(x, -1).gather(1, ids[i:i + 1024, None])[:, 0].float()
    del rows
    mask = (torch.rand(N, generator=g, device=device) < 0.85).float()
    active = None
    if active_fraction < 1.0:
        active = torch.rand(N, generator=g, device=device) < active_fraction
        active[0] = False
        mask = mask * active.float()
    n = max(float(mask.sum()), 1.0)
    kw = dict(row_start=row_start, T=T, ids=ids, inv_temperature=1 / 0.7, temperature_rows=trows, active=active,
              w=mask / n, mask=mask, advantages=torch.randn(N, generator=g, device=device),
              old_logprobs=lp + 0.3 * torch.randn(N, generator=g, device=device) if options["old"] else None,
              ref_logprobs=lp + 0.2 * torch.randn(N, generator=g, device=device) if options["ref"] else None,
              rollout=0.5 + torch.rand(N, generator=g, device=device) if options["rollout"] else None,
              scalars=torch.tensor([1.7, -0.01 / n * 1.7], device=device), delta=None, dual_clip=None,
              kl_ratio_weight=False, has_entropy_grad=False)
    kw.update({k: v for k, v in options.items() if k not in ("old", "ref", "rollout")})
    return logits, kw


def call(module, logits, kw, grad, cluster_size=0):
    args = [kw[name] for name in ARG_ORDER]
    return (grad, *module.two_pass(logits, *args, grad, cluster_size))


def compare(logits, kw, got, want, dtype) -> dict:
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}[dtype]
    grad, lp, H, sums = got
    w_grad, w_lp, w_H, w_sums = want
    x = logits.double()
    finite = x[torch.isfinite(x)]
    t_min = 0.5 if kw["temperature_rows"] is not None else 0.7
    atol = 4e-6 * (1 + (float(finite.abs().max()) if finite.numel() else 0.0) / t_min)
    report, ok = {}, True
    for name, a, b in (("logprobs", lp, w_lp), ("entropy", H, w_H), ("sums", sums, w_sums)):
        same_nan = torch.equal(torch.isnan(a), torch.isnan(b))
        fin = ~torch.isnan(b)
        err = float((a.double()[fin] - b[fin]).abs().max()) if fin.any() else 0.0
        bound = atol if name != "sums" else atol * 10 * (1 + float(b[fin].abs().max()) if fin.any() else 1.0)
        report[name] = err
        ok &= same_nan and err <= bound
    same_nan = torch.equal(torch.isnan(grad), torch.isnan(w_grad))
    fin = ~torch.isnan(w_grad)
    g64, w64 = grad.double()[fin], w_grad[fin]
    rel = float((g64 - w64).norm() / w64.norm().clamp(min=1e-30))
    zeros_ok = bool((grad[w_grad == 0] == 0).all())
    report.update(grad_rel=rel, nan_pattern=same_nan, zeros_written=zeros_ok)
    ok &= same_nan and rel < tol and zeros_ok
    report["ok"] = bool(ok)
    return report


def validate(module):
    reference = load_reference()
    cases = []
    device = "cuda"

    def nan_like(t):
        return torch.full(t.shape, float("nan"), dtype=t.dtype, device=t.device)

    def one(label, logits, kw, dtype, cluster_size=0, grad=None, want=None):
        grad = nan_like(logits) if grad is None else grad
        got = call(module, logits, kw, grad, cluster_size)
        torch.cuda.synchronize()
        want = want if want is not None else reference(logits, **{k: kw[k] for k in ARG_ORDER[:13]},
                                                        **{k: kw[k] for k in ARG_ORDER[13:]})
        rep = compare(logits, kw, got, want, dtype)
        rep["case"] = label
        cases.append(rep)
        print(f"  {'ok  ' if rep['ok'] else 'FAIL'} {label:58s} grad_rel {rep['grad_rel']:.2e} "
              f"logprob {rep['logprobs']:.1e} sums {rep['sums']:.1e}", flush=True)
        return got, want

    seed = 0
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for V in (7, 4097, 32_001):
            for opt in OPTIONS:
                seed += 1
                shifted, per_row = seed % 2 == 0, seed % 3 == 0
                L, row_start = (6, 0) if seed % 2 else (7, 2)
                logits, kw = inputs(3, L, V, 5, row_start, dtype, seed, OPTIONS[opt], per_row=per_row,
                                    shifted=shifted)
                one(f"{str(dtype)[6:]} V={V} {opt} shifted={shifted} per_row_t={per_row}", logits, kw, dtype)
    # Long rows: every cluster size the device allows.
    for dtype, V in ((torch.bfloat16, 151_936), (torch.float32, 151_936), (torch.bfloat16, 262_144)):
        seed += 1
        logits, kw = inputs(2, 5, V, 4, 1, dtype, seed, OPTIONS["everything"], per_row=True, shifted=True)
        want = None
        for size in (0, 1, 2, 4, 8, 16):
            try:
                plan = module.two_pass_plan(logits, size)
            except RuntimeError as error:
                print(f"  (cluster_size {size}, V={V} {dtype}: {str(error)[:100]})")
                continue
            _, want = one(f"{str(dtype)[6:]} V={V} cluster_size={size} plan={plan}", logits, kw, dtype, size,
                          want=want)
    # Inactive rows poisoned with NaN (logits, ids, temperatures, per-token inputs); in place.
    for dtype in (torch.bfloat16, torch.float32):
        seed += 1
        logits, kw = inputs(3, 9, 151_936, 7, 1, dtype, seed, OPTIONS["everything"], per_row=True,
                            active_fraction=0.6, shifted=True)
        want = reference(logits, **{k: kw[k] for k in ARG_ORDER[:13]}, **{k: kw[k] for k in ARG_ORDER[13:]})
        inactive = ~kw["active"]
        r = inactive.nonzero()[:, 0]
        logits[r // 7, 1 + r % 7] = float("nan")
        kw["ids"][inactive] = -(10**15)
        kw["temperature_rows"][inactive] = 0.0
        for name in ("w", "mask", "advantages", "old_logprobs", "ref_logprobs", "rollout"):
            kw[name][inactive] = float("nan")
        apart, _ = one(f"{str(dtype)[6:]} V=151936 inactive rows poisoned", logits, kw, dtype, want=want)
        inplace = call(module, logits, kw, logits)
        torch.cuda.synchronize()
        same = all(torch.equal(a, b) for a, b in zip(apart, inplace))
        cases.append({"case": f"{str(dtype)[6:]} in place == apart, bitwise", "ok": same})
        print(f"  {'ok  ' if same else 'FAIL'} {str(dtype)[6:]} in place == apart, bitwise", flush=True)
    RESULT["validation"] = cases
    failed = [c["case"] for c in cases if not c["ok"]]
    RESULT["validation_failed"] = failed
    print(f"  {len(cases) - len(failed)} / {len(cases)} cases ok", flush=True)
    return not failed


# --- 4. Timing --------------------------------------------------------------------------------------

def bench(fn, iters=15, warmup=3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()  # releases the GIL: the watchdog can still fire
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def timing(module):
    rows = []
    RESULT["timing"] = rows
    V = 151_936
    for B in (8, 16):
        if elapsed() > BUDGET_S - 20:
            print("  (skipping the rest: time budget)")
            break
        T = 1024
        logits, kw = inputs(B, T + 1, V, T, 0, torch.bfloat16, 7, OPTIONS["dapo_k3"])
        tokens = B * T
        nbytes = logits.numel() * logits.element_size()
        dst = torch.empty_like(logits)
        copy_ms = bench(lambda: dst.copy_(logits))
        floor = {"tokens": tokens, "what": "copy floor (read + write)", "ms": copy_ms,
                 "TB/s": 2 * nbytes / copy_ms / 1e9}
        rows.append(floor)
        print(f"  {tokens} x {V}: copy {copy_ms:.3f} ms ({floor['TB/s']:.2f} TB/s)", flush=True)
        grad = dst

        def add(what, fn):
            try:
                ms = bench(fn)
                rows.append({"tokens": tokens, "what": what, "ms": ms, "x_floor": ms / copy_ms,
                             "TB/s": 2 * nbytes / ms / 1e9})
                print(f"  {tokens} x {V}: {what}: {ms:.3f} ms = {ms / copy_ms:.2f}x the floor", flush=True)
            except Exception as error:  # noqa: BLE001
                rows.append({"tokens": tokens, "what": what, "error": str(error)[:300]})
                print(f"  {what}: {error}", flush=True)

        try:
            auto = str(module.two_pass_plan(logits, 0))
        except RuntimeError as error:  # no plan here (no clusters): the rows below record the error
            auto = f"(no plan: {str(error)[:80]})"
        add("two_pass auto " + auto, lambda: call(module, logits, kw, grad))
        for size in (2, 4, 8, 16):
            try:
                plan = module.two_pass_plan(logits, size)
            except RuntimeError:
                continue
            add(f"two_pass cluster_size={size} smem={plan[1]}", lambda s=size: call(module, logits, kw, grad, s))
        ent = dict(kw, has_entropy_grad=True)
        add("two_pass auto + entropy gradient", lambda: call(module, logits, ent, grad))
        add("two_pass auto, in place", lambda: call(module, logits, kw, logits))
        # The three-pass sweeps of csrc/ (forward, then backward) on the scored (B, T, V) view.
        view = logits[:, :T]
        gl = torch.ones(tokens, device="cuda")

        def three_pass():
            out = module.forward(view, kw["ids"], 0.7, None, None, 0)
            module.backward(view, kw["ids"], 0.7, None, None, out[2], out[3], out[4], gl, None, grad[:, :T], 0)
        add("three-pass csrc sweeps (forward + backward)", three_pass)
        # Side by side: the Triton two-pass path of main (grpo_kernels.fused_grpo_loss on the full output,
        # forward + backward through autograd, its plan kernels included), when it imports and time is left.
        if B == 8 and elapsed() < BUDGET_S - 45:
            try:
                import grpo_kernels

                leaf = logits.detach().clone().requires_grad_()
                shape2 = (B, T)
                args = (kw["ids"].view(shape2), kw["advantages"].view(shape2), kw["mask"].view(shape2) > 0,
                        kw["old_logprobs"].view(shape2), kw["ref_logprobs"].view(shape2))

                def triton_step():
                    leaf.grad = None
                    loss, _ = grpo_kernels.fused_grpo_loss(leaf, *args, beta=0.04, backend="triton")
                    loss.backward()
                triton_step()  # compile outside the timing
                add("fused_grpo_loss backend='triton' fwd+bwd (main's choice of path, autograd)", triton_step)
                del leaf
            except Exception as error:  # noqa: BLE001
                rows.append({"tokens": tokens, "what": "triton fused_grpo_loss", "error": str(error)[:300]})
                print(f"  triton side by side: {error}", flush=True)
        del logits, dst, grad, view
        torch.cuda.empty_cache()
    return rows


def table() -> None:
    print("\n" + "=" * 96)
    env = RESULT.get("env", {})
    print(f"csrc two-pass probe: {env.get('device')} torch {env.get('torch')} CUDA {env.get('cuda')} "
          f"commit {env.get('commit')} {env.get('date')}")
    for name, st in RESULT["stages"].items():
        print(f"  stage {name:12s} {'ok' if st['ok'] else 'FAILED'} ({st['seconds']} s)")
    if "validation_failed" in RESULT:
        n = len(RESULT["validation"])
        print(f"  validation: {n - len(RESULT['validation_failed'])} / {n} ok; failed: {RESULT['validation_failed']}")
    print(f"  {'tokens':>6} | {'what':58s} | {'ms':>7} | {'x floor':>7} | {'TB/s':>5}")
    for row in RESULT.get("timing", []):
        if "error" in row:
            print(f"  {row['tokens']:>6} | {row['what'][:58]:58s} | error: {row['error'][:60]}")
        else:
            print(f"  {row['tokens']:>6} | {row['what'][:58]:58s} | {row['ms']:7.3f} | "
                  f"{row.get('x_floor', 1.0):7.2f} | {row['TB/s']:5.2f}")
    print(f"  total {elapsed():.1f} s; JSON: {OUT / 'gpu_csrc_probe.json'}")


def main() -> int:
    timer = threading.Timer(BUDGET_S, watchdog)
    timer.daemon = True
    timer.start()
    RESULT["env"] = environment()
    print(RESULT["env"], flush=True)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to probe")
        save()
        return 1
    module = stage("build")(build)
    if module is not None:
        stage("plan")(lambda: plans(module))
        stage("validate")(lambda: validate(module))
        if elapsed() < BUDGET_S - 25:
            stage("timing")(lambda: timing(module))
    timer.cancel()
    save()
    table()
    return 0


def plans(module) -> None:
    """The (cluster size, shared memory per block) chosen for a few vocabularies, or why none."""
    out = {}
    for dtype in (torch.bfloat16, torch.float32):
        for V in (32_000, 151_936, 262_144):
            try:
                out[f"{dtype} V={V}"] = module.two_pass_plan(torch.empty(1, 1, V, dtype=dtype, device="cuda"), 0)
            except RuntimeError as error:
                out[f"{dtype} V={V}"] = str(error)
            print(f"  {dtype} V={V}: {out[f'{dtype} V={V}']}", flush=True)
    RESULT["plans"] = out


if __name__ == "__main__":
    sys.exit(main())
