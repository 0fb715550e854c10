"""Runs csrc/two_pass.cu's kernel on the CPU: a check of its logic where no GPU is at hand.

The kernel source is rewritten only where hardware is needed (the rest compiles as host C++ with
shim.h): cp.async becomes a 16-byte copy, ex2.approx.ftz an exp2f that flushes below 2^-126,
the cluster barrier and distributed shared memory host barriers and per-block arenas, __shared__
declarations per-block variables, and a block has 64 threads instead of 256 (the code is generic
in kThreads; fewer host threads). Each rewrite asserts that it found its target, so an edit of
the kernel that this file does not know fails loudly here instead of being emulated wrongly.

Not emulated: the hardware paths themselves, the launchers (plan, occupancy, launch
attributes), ex2.approx's rounding, speed. tests/test_cuda_emulation.py runs it.
"""
from __future__ import annotations

import ctypes
import hashlib
import re
import shutil
import subprocess
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
CSRC = HERE.parent
EMULATED_THREADS = 64


def _replace(src: str, old: str, new: str) -> str:
    if old not in src:
        raise RuntimeError(f"emulate.py: {old[:60]!r} is no longer in two_pass.cu; update the emulation")
    return src.replace(old, new)


def _sub(src: str, pattern: str, new: str) -> str:
    out, n = re.subn(pattern, new, src, flags=re.S)
    if n == 0:
        raise RuntimeError(f"emulate.py: {pattern[:60]!r} matches nothing in two_pass.cu; update the emulation")
    return out


def _shared(src: str) -> str:
    """__shared__ declarations -> per-block variables of shim.h."""
    src = src.replace("extern __shared__ __align__(16) unsigned char smem_raw[];",
                      "unsigned char* smem_raw = tctx->block->dyn.data();")

    def declaration(m):
        typ, name, array = m.group(1), m.group(2), m.group(3)
        if array:
            return f"using {name}_t = {typ}{array}; SHARED_VAR({name}_t, {name});"
        return f"SHARED_VAR({typ}, {name});"
    return re.sub(r"__shared__ ([\w:<>]+) (\w+)(\[[^\]]*\])?;", declaration, src)


def emulated_source() -> str:
    """two_pass.cu (with grpo_device.cuh inlined) rewritten for the host, up to its launchers."""
    src = (CSRC / "two_pass.cu").read_text()
    device = _shared((CSRC / "grpo_device.cuh").read_text())
    src = _shared(src)
    if "__shared__" in src.split("// Launchers.")[0] or "__shared__" in device:
        raise RuntimeError("emulate.py: a __shared__ declaration it cannot rewrite; update the emulation")
    src = _replace(src, '#include "grpo_device.cuh"', device)
    src = _replace(src, "#include <cooperative_groups.h>", "")
    src = _sub(src, r"(__device__ __forceinline__ float exp2_ftz\(float x\) \{).*?\n\}",
               r"\1 return x < -126.f ? 0.f : exp2f(x); }")
    src = _sub(src, r"(__device__ __forceinline__ void cp_async_16\(void\* smem, const void\* gmem\) \{).*?\n\}",
               r"\1 memcpy(smem, gmem, 16); }")
    src = _sub(src, r"(__device__ __forceinline__ void cp_async_wait_all\(\) \{).*?\n\}", r"\1 }")
    src = _replace(src, 'asm volatile("barrier.cluster.arrive.relaxed.aligned;\\n" ::: "memory");',
                   "emu_cluster_arrive();")
    src = _replace(src, 'asm volatile("barrier.cluster.wait.acquire.aligned;\\n" ::: "memory");',
                   "emu_cluster_wait();")
    src = _replace(src, "constexpr int kThreads = 256;", f"constexpr int kThreads = {EMULATED_THREADS};")
    cut = src.index("// ---------------------------------------------------------------------------------------\n"
                    "// Launchers.")
    src = '#include "shim.h"\n' + src[:cut] + (HERE / "driver.inc").read_text()
    if "asm" in re.sub(r"//.*", "", src):
        raise RuntimeError("emulate.py: inline PTX it does not know is left in two_pass.cu; update the emulation")
    return src


def cuda_include() -> Path | None:
    """A directory holding cuda_bf16.h (the host parts of the CUDA headers), or None."""
    candidates = [Path("/usr/local/cuda/include")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        out = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", "/dev/null"], capture_output=True, text=True)
        candidates += [Path(p) for p in re.findall(r'INCLUDES="-I([^"]*)"', out.stderr + out.stdout)]
    return next((d for d in candidates if (d / "cuda_bf16.h").is_file()), None)


def unavailable_reason() -> str:
    if shutil.which("g++") is None:
        return "no g++ to compile the emulation"
    if cuda_include() is None:
        return "no CUDA headers (cuda_bf16.h) for the emulation's element types"
    return ""


def build(directory: Path) -> ctypes.CDLL:
    """Compiles the emulation into `directory` (reused when the sources are unchanged)."""
    reason = unavailable_reason()
    if reason:
        raise RuntimeError(reason)
    src = emulated_source()
    shim = (HERE / "shim.h").read_text()
    key = hashlib.sha256((src + shim).encode()).hexdigest()[:16]
    directory.mkdir(parents=True, exist_ok=True)
    lib = directory / f"two_pass_emulation_{key}.so"
    if not lib.exists():
        (directory / "shim.h").write_text(shim)
        cpp = directory / "two_pass_emulation.cpp"
        cpp.write_text(src)
        cmd = ["g++", "-std=c++20", "-O1", "-fPIC", "-shared", "-pthread", "-Wno-attributes",
               f"-I{cuda_include()}", f"-I{CSRC}", f"-I{directory}", str(cpp), "-o", str(lib)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError("emulate.py: the emulation does not compile:\n" + done.stderr[-4000:])
    so = ctypes.CDLL(str(lib))
    P, I, F, C = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
    so.emu_two_pass.argtypes = [C, P, I, I, P, I, I, I, I, I, I, I, P, P, P, F, P, P, P, P, P, P, P, F, F, F, F, F,
                                C, C, C, C, C, P, P, P, C]
    return so


_DTYPE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # grpo_dtype


def two_pass(so: ctypes.CDLL, kw: dict, grad: torch.Tensor | None = None, cluster_size: int = 1):
    """The emulated kernel on CPU tensors, with the keyword arguments of grpo_kernels.sweep.cuda.two_pass
    (kw as tests/two_pass_reference.make_two_pass_inputs builds them) -> (grad, logprobs, entropy, sums).
    The per-token tensors are converted as binding.cpp does; outputs start as 777 (unwritten shows)."""
    logits = kw["logits"]
    B, L, V = logits.shape
    T = kw["T"]
    N = B * T
    grad = torch.empty_like(logits) if grad is None else grad

    def f32(t):
        return None if t is None else t.float().contiguous().view(N)
    keep = [kw["ids"].long().contiguous(), None if kw["active"] is None else kw["active"].to(torch.uint8).contiguous(),
            f32(kw["temperature_rows"]), f32(kw["w"]), f32(kw["mask"]), f32(kw["advantages"]),
            f32(kw["old_logprobs"]), f32(kw["ref_logprobs"]), f32(kw["rollout"]), kw["scalars"].float().contiguous()]
    ids, active, trows, w, mask, adv, old, ref, rollout, scalars = (
        None if t is None else ctypes.c_void_p(t.data_ptr()) for t in keep)
    lp, ent, sums = torch.full((N,), 777.0), torch.full((N,), 777.0), torch.full((7, N), 777.0)
    delta, dual = kw.get("delta"), kw.get("dual_clip")
    so.emu_two_pass(_DTYPE[logits.dtype], logits.data_ptr(), logits.stride(0), logits.stride(1), grad.data_ptr(),
                    grad.stride(0), grad.stride(1), B, L, V, kw["row_start"], T, ids, active, trows,
                    kw["inv_temperature"], w, mask, adv, old, ref, rollout, scalars, kw["beta"], kw["eps_low"],
                    kw["eps_high"], delta or 0.0, dual or 0.0, int(delta is not None), int(dual is not None),
                    kw["kl_estimator"], int(kw.get("kl_ratio_weight", False)), int(kw.get("has_entropy_grad", False)),
                    lp.data_ptr(), ent.data_ptr(), sums.data_ptr(), cluster_size)
    return grad, lp, ent, sums
