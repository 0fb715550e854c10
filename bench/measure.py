"""Timing, peak memory, copy bandwidth, and the facts about the machine a result carries."""
from __future__ import annotations

import datetime
import gc
import os
import platform
import re
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
MB = 1e6  # decimal units throughout: MB, GB/s


@dataclass(frozen=True)
class Timing:
    """How long to time each function. On a GPU these are do_bench's warm-up and repetition
    budgets in ms; on the CPU, the loop's target duration in ms and its bounds on reps."""

    warmup_ms: float
    rep_ms: float
    min_reps: int
    max_reps: int


GPU_TIMING = Timing(warmup_ms=25, rep_ms=100, min_reps=1, max_reps=1000)
GPU_QUICK_TIMING = Timing(warmup_ms=10, rep_ms=40, min_reps=1, max_reps=1000)
CPU_TIMING = Timing(warmup_ms=0, rep_ms=1500, min_reps=3, max_reps=15)
SMOKE_TIMING = Timing(warmup_ms=0, rep_ms=0, min_reps=2, max_reps=2)


def time_ms(fn: Callable[[], object], device: torch.device, timing: Timing) -> tuple[float, float | None]:
    """(median, minimum) wall time of fn() in ms; the minimum on the CPU only.

    GPU: triton.testing.do_bench's median, timed with CUDA events, with the L2 cache
    flushed before every call, so a memory-bound kernel is timed as it runs in training,
    its inputs in HBM. CPU: a perf-counter loop after one untimed call, until rep_ms have
    passed (within [min_reps, max_reps]). On a shared machine other work only ever adds
    time, so the minimum is reported beside the median as the less disturbed figure.
    """
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=timing.warmup_ms, rep=timing.rep_ms, return_mode="median")), None
    fn()
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < timing.max_reps and (
            len(samples) < timing.min_reps or (time.perf_counter() - start) * 1e3 < timing.rep_ms):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples), min(samples)


def release(device: torch.device) -> None:
    """Return what the last implementation left to the allocator, so the next starts level."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def peak_extra(fn: Callable[[], object], device: torch.device) -> tuple[object, float | None]:
    """fn()'s result and the peak memory it allocated above what was allocated before, in MB.

    What was allocated before is the inputs (and the benchmark's own bookkeeping, the
    same for every implementation); what fn returns (the gradient) counts, since it is
    alive at the peak. CPU: None, as there is no allocator counter to read.
    """
    if device.type != "cuda":
        return fn(), None
    release(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize(device)
    return out, (torch.cuda.max_memory_allocated(device) - before) / MB


def _proc_status_kb(field: str) -> int:
    """A "kB" line of /proc/self/status (VmRSS, VmHWM), in kB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"no {field} in /proc/self/status")


def _malloc_trim() -> None:
    """Hand the C heap's free pages back to the kernel (glibc malloc_trim; a no-op elsewhere), so
    that memory freed by earlier work does not sit in the baseline and absorb the next peak."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_rss_growth(fn: Callable[[], object]) -> tuple[object, float | None]:
    """fn()'s result and the peak growth of this process's resident memory while fn ran, in MB.

    The CPU counterpart of peak_extra: the baseline is the resident set after a garbage
    collection and malloc_trim (the inputs, and whatever earlier work still holds); the peak
    is the kernel's high-water mark (VmHWM), reset to the current RSS just before fn by
    writing 5 to /proc/self/clear_refs. What fn returns (the gradient) counts, as it is
    alive at the peak. Resident memory is what a CPU user runs out of: it also counts pages
    the C heap keeps after a free, which an allocator counter would not. It undercounts
    what fn allocates into heap pages freed earlier and still resident, so for a figure that
    stands alone, call it first thing in a fresh process after a warm-up on a tiny shape
    (bench/cpu_memory.py does). None where /proc (Linux) is not there.
    """
    try:
        gc.collect()
        _malloc_trim()
        before = _proc_status_kb("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)
    except OSError:
        return fn(), None
    out = fn()
    return out, (_proc_status_kb("VmHWM") - before) * 1024 / MB


def copy_gbps(device: torch.device, nbytes: int, timing: Timing) -> float:
    """Device-to-device copy bandwidth in GB/s, counting the bytes read and the bytes written.

    This is the ceiling a memory-bound kernel is measured against, taken in the same run
    as the kernels (the H100 here: about 3.0 TB/s). `nbytes` must dwarf the caches.
    """
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    ms, _ = time_ms(lambda: dst.copy_(src), device, timing)
    return 2 * src.nbytes / (ms * 1e-3) / 1e9


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {model} ({os.cpu_count()} cores)"


def slug(text: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3', for file names."""
    text = re.sub(r"\((r|tm)\)", "", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def environment(device: torch.device) -> dict:
    """Device, versions, commit and date. GRPO_BENCH_COMMIT names the commit where the
    tree has no .git (the GPU machine gets a copy of the working tree, not the repository)."""
    import triton

    commit = os.environ.get("GRPO_BENCH_COMMIT") or _git("rev-parse", "HEAD") or "unknown"
    status = _git("status", "--porcelain", "--untracked-files=no")
    env = {
        "device": device_name(device),
        "commit": commit,
        # Uncommitted changes to tracked files: the commit alone does not name the code that ran.
        "dirty": None if status is None else bool(status),
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
        props = torch.cuda.get_device_properties(device)
        env["sm_count"] = props.multi_processor_count
        env["memory_gb"] = round(props.total_memory / 1e9, 1)
    else:
        env["threads"] = torch.get_num_threads()
    return env
