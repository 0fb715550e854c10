"""What one call does on the device, and the ceilings measured in the same run (SPEC section 18).

  kernel_breakdown  one call under torch.profiler: device time and launches per kernel name
  host_syncs        one call under torch.cuda.set_sync_debug_mode("warn"): the synchronising
                    CUDA operations it makes (a .item(), a device-to-host copy, a nonzero...)
  gemm_baselines    one cuBLAS GEMM of the fused-linear shape, bf16 output and, where torch has
                    it, fp32 output (torch.mm(..., out_dtype=torch.float32)), with their error
                    against a float64 product on a corner of the output
  time_few_ms       a function too slow for do_bench's estimate-then-repeat (Liger's fused
                    linear, ~0.5 s a call): the median of a few calls, CUDA events around each

Each returns plain data for the results JSON and never raises for a failure of the thing it
measures: the failure becomes an "error" entry, as a row's note does.
"""
from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable

import torch

from . import measure

# Kernel names beyond this many (by device time) are summed into one "(other)" entry.
TOP_KERNELS = 12
NAME_CHARS = 160  # a templated CUDA kernel's name runs to kilobytes


def _error(exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0][:200]
    return f"{type(exc).__name__}: {first}"


def _trace_kernels(prof) -> list[tuple[str, float]]:
    """(name, device µs) of every kernel, memcpy and memset in the profiler's Chrome trace."""
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f).get("traceEvents", [])
    finally:
        os.unlink(path)
    out = []
    for e in events:
        cat = str(e.get("cat", "")).lower()
        if e.get("ph") == "X" and (cat == "kernel" or cat.startswith("gpu_mem")):
            out.append((str(e.get("name", "?")), float(e.get("dur", 0.0))))
    return out


def _event_kernels(prof) -> list[tuple[str, float]]:
    """The same from the profiler's event list (device-side events), where the trace had none."""
    out = []
    for e in prof.events():
        if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA:
            out.append((e.name, float(e.time_range.elapsed_us())))
    return out


def kernel_breakdown(fn: Callable[[], object], device: torch.device) -> dict:
    """Device time per kernel name of one fn() (warm: call it once before), top TOP_KERNELS by
    time. {"device_ms", "launches", "kernels": [{"name", "calls", "ms"}]} or {"error"}; on the
    CPU there are no device kernels and the entry says so."""
    from torch.profiler import ProfilerActivity, profile

    if device.type != "cuda":
        return {"error": "no device kernels on the CPU"}
    try:
        torch.cuda.synchronize(device)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize(device)
        events = _trace_kernels(prof) or _event_kernels(prof)
    except Exception as exc:  # noqa: BLE001 - a profiler failure must not cost the row
        return {"error": _error(exc)}
    totals: dict[str, list[float]] = {}
    for name, us in events:
        entry = totals.setdefault(name[:NAME_CHARS], [0, 0.0])
        entry[0] += 1
        entry[1] += us
    ranked = sorted(totals.items(), key=lambda kv: -kv[1][1])
    kernels = [{"name": n, "calls": c, "ms": round(us / 1e3, 4)} for n, (c, us) in ranked[:TOP_KERNELS]]
    rest = ranked[TOP_KERNELS:]
    if rest:
        kernels.append({"name": f"(other: {len(rest)} names)", "calls": sum(c for _, (c, _) in rest),
                        "ms": round(sum(us for _, (_, us) in rest) / 1e3, 4)})
    return {"device_ms": round(sum(us for _, us in events) / 1e3, 4), "launches": len(events), "kernels": kernels}


def host_syncs(fn: Callable[[], object], device: torch.device) -> dict:
    """{"count", "first"} of the synchronising CUDA operations in one fn(), as
    torch.cuda.set_sync_debug_mode("warn") reports them (one warning each), or {"error"}.
    What it sees is what goes through the CUDA caching allocator's and copy paths' sync
    points; a Triton launch never syncs. On the CPU: {"error"} (nothing to count)."""
    if device.type != "cuda":
        return {"error": "no host-device syncs on the CPU"}
    try:
        torch.cuda.synchronize(device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fn()
            finally:
                torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize(device)
    except Exception as exc:  # noqa: BLE001
        return {"error": _error(exc)}
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    return {"count": len(syncs), "first": str(syncs[0].message).splitlines()[0][:200] if syncs else None}


def time_few_ms(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    """Median ms of `reps` calls of fn() (already warm), each timed alone: CUDA events on the
    GPU, the wall clock on the CPU. For functions of hundreds of ms, where do_bench's five
    estimation calls and its repetitions would cost seconds each."""
    samples = []
    for _ in range(max(1, reps)):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def _gemm_error(out: torch.Tensor, h: torch.Tensor, w: torch.Tensor, rows: int = 64, cols: int = 4096) -> float:
    """Relative Frobenius error of out's top-left corner against the float64 product."""
    r, c = min(rows, out.shape[0]), min(cols, out.shape[1])
    want = h[:r].double() @ w[:c].double().T
    return float((out[:r, :c].double() - want).norm() / want.norm().clamp(min=1e-300))


def gemm_baselines(device: torch.device, n: int, hidden: int, vocab: int, dtype: torch.dtype,
                   timing: measure.Timing) -> list[dict]:
    """One GEMM of the fused-linear shape, logits = h (n, H) @ w (V, H).T: the ceiling its
    three-GEMM floor is counted in. bf16 output (what F.linear gives) and fp32 output (cuBLAS
    accumulating in fp32 and writing fp32, the accuracy the fused path keeps), each with ms,
    TFLOP/s of 2nHV and its error on a corner against float64; an entry with "error" where
    it cannot run (the CPU lacks out_dtype, memory)."""
    flops = 2 * n * hidden * vocab
    g = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(n, hidden, generator=g, device=device).to(dtype)
    w = (torch.randn(vocab, hidden, generator=g, device=device) / hidden**0.5).to(dtype)
    variants = [("gemm", f"torch.mm, {str(dtype).removeprefix('torch.')} out", lambda: torch.mm(h, w.T)),
                ("gemm-fp32-out", "torch.mm(out_dtype=torch.float32)",
                 lambda: torch.mm(h, w.T, out_dtype=torch.float32))]
    results = []
    for name, what, fn in variants:
        entry: dict = {"name": name, "what": what, "n_tokens": n, "hidden": hidden, "vocab": vocab,
                       "dtype": str(dtype).removeprefix("torch.")}
        try:
            out = fn()
            entry["out_dtype"] = str(out.dtype).removeprefix("torch.")
            entry["rel_err_fp64_corner"] = float(f"{_gemm_error(out, h, w):.3e}")
            del out
            ms, _ = measure.time_ms(fn, device, timing)
            entry["ms"] = round(ms, 4)
            entry["tflops"] = round(flops / (ms * 1e-3) / 1e12, 1)
        except Exception as exc:  # noqa: BLE001
            entry["error"] = _error(exc)
        finally:
            measure.release(device)
        results.append(entry)
    return results
