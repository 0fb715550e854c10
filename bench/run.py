"""python -m bench.run: validate, then time, every implementation over a plan of cases.

For each case (shape x dtype x beta x level) the harness draws fresh inputs, computes the
float64 oracle once, and then for each implementation of the case: runs it once to compile,
measures the peak memory of one forward+backward and checks that call's loss and gradient
against the oracle, and only if they pass, times the forward and the forward+backward; on a
GPU it then profiles one more call (device time per kernel, host syncs: bench/probe.py). An
implementation that fails the check, or raises, gets a row with its error and no times.

Two plans (--plan):
  gpu   (the default on CUDA) SPEC section 18's rows in the order of what matters most, so a
        run cut short by its budget has those first: the copy bandwidth and one cuBLAS GEMM
        of the fused-linear shape; the logits work unit (8,192 x 151,936 bf16, dapo, beta
        0.04, token level) with ours bare and as a trainer calls it, Liger, TRL and eager;
        GSPO; the forward-only token_logprobs pass; 16,384 tokens; the fused-linear unit at
        8,192 then 16,384 tokens; then the rest of the grid (GPU_TAIL). See gpu_plan.
  grid  (the default on the CPU) every case of the grid (gpu_cases / cpu_cases, the
        fused-linear cases) with every implementation that runs there.
`--plan gpu --smoke` runs the GPU plan at tiny shapes; on the CPU with TRITON_INTERPRET=1 the
Triton implementations run under the interpreter, which exercises the GPU code path here.

Every row says which call it timed (`call`, bench/names.py): "bare", "trainer" (the model's
whole (B, T+1, V) output, a leaf, passed whole), "trainer-slice" (that leaf passed as
[:, :-1], autograd's slice backward timed with it), "forward" (no-grad log-probs) or "hidden"
(fused linear).

The results file is rewritten after every row, and before each implementation starts it
records what is in flight (`in_flight`: step, phase, start time, time limit). bench/supervise.py
runs this module in a child process, kills it when an implementation runs past its limit or
the run past its deadline, records the lost row from `in_flight`, and starts it again with
--resume, which skips every (step, implementation) already in the file.

    python -m bench.run                # the GPU plan on CUDA, the CPU grid otherwise
    python -m bench.run --quick        # GPU plan: without the tail; grid: the work-unit shapes only
    python -m bench.run --unit linear  # the fused-linear cases only (logits, logprobs: the others)
    python -m bench.run --padding heavy  # the padding-heavy cases only (--padding mild: the others)
    python -m bench.run --smoke --out /tmp/x   # tiny shapes, two reps: the test suite's check
    TRITON_INTERPRET=1 python -m bench.run --plan gpu --smoke --device cpu --out /tmp/x
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import measure, probe, report
from .impls import ALL, Impl, discover
from .problem import (LINEAR_TOLERANCE, LOGPROBS_TOLERANCE, PADDING_PROFILES, PADDINGS, TOLERANCE, Case, LinearCase,
                      LinearOracle, LinearProblem, LogprobsCase, Oracle, Problem, error, linear_error, linear_oracle,
                      logprobs_error, make_linear_problem, make_problem, oracle, padding_fraction)

DEFAULT_OUT = measure.REPO / "bench" / "results"

GPU_TOKENS = (4096, 8192, 16384)
GPU_VOCABS = (32000, 128256, 151936)  # Llama-2, Llama-3, Qwen-2.5/3
GPU_SEQ_LEN = 1024
BETAS = (0.0, 0.04)
LEVELS = ("token", "sequence")
# SPEC section 4's work unit: measured first, so a run cut short still has it.
WORK_UNIT = ((8192, 151936), (16384, 151936))
# The CPU grid: the shape named in issue 3 and a smaller vocabulary, so the plot has a slope.
CPU_TOKENS, CPU_VOCABS, CPU_SEQ_LEN = (512,), (8192, 32000), 128
SMOKE_TOKENS, SMOKE_VOCABS, SMOKE_SEQ_LEN = (64,), (500, 1000), 16
# The fused-linear unit of issue 6: Qwen's H and V, bf16, at the work unit's token counts.
# On the GPU only the full objective (beta = 0.04) at token level, right after the logits
# work unit: with the float64 oracle (four float64 GEMMs of 2NHV) and Liger's fp32
# backward GEMMs, a case takes about a minute (bench/NOTES.md), and the one-call budget
# of gpu_validate_and_time.sh has room for two.
LINEAR_HIDDEN, LINEAR_VOCAB, LINEAR_TOKENS = 4096, 151936, (8192, 16384)
# CPU: one tiny shape, both dtypes and levels; smoke: tinier still.
CPU_LINEAR = dict(n_tokens=256, vocab=4096, hidden=64, seq_len=64)
SMOKE_LINEAR = dict(n_tokens=64, vocab=500, hidden=32, seq_len=16)
UNITS = ("all", "logits", "linear", "logprobs")
PLANS = ("auto", "gpu", "grid")
# The GPU plan's shapes (gpu_plan): the work unit, its double, Qwen's H; smoke: tiny ones.
PLAN_SHAPES = {False: dict(n1=8192, n2=16384, vocab=151936, hidden=4096, seq_len=GPU_SEQ_LEN),
               True: dict(n1=32, n2=64, vocab=500, hidden=32, seq_len=16)}
# The GPU plan's logits implementations after its first steps: the rows a user picks between.
TAIL_IMPLS = ("ours-triton", "ours-trainer", "liger", "trl", "eager")
# Seconds one implementation may take on one case, setup (its first call: Triton's JIT,
# torch.compile, Liger's compile) included, before bench/supervise.py kills it as hung:
# several times what the H200 took at cedfb00 (research/part3.md), where that is known.
IMPL_LIMIT_S = {"compile": 240.0, "liger-linear": 150.0, "trl-linear": 90.0, "ours-linear": 90.0, "unfused": 60.0}
DEFAULT_LIMIT_S = 60.0
SETUP_LIMIT_S = 90.0  # inputs and the float64 oracle of one case
PROFILE_LIMIT_S = 45.0  # one profiled call and one sync-counted call
# Under the interpreter (the GPU plan exercised on a CPU) everything is slower.
INTERPRETED_FACTOR = 10.0
# A step slower than this (ms, measured on the validated call) is timed by a few single calls
# (probe.time_few_ms) instead of do_bench, whose five estimation calls alone would take seconds.
SLOW_STEP_MS = 250.0
SLOW_REPS = 1
# Exit status of a child that found the CUDA context broken (an illegal access poisons every
# later call): bench/supervise.py starts a fresh process, which resumes after the last row.
EXIT_CUDA_BROKEN = 3
# The padding-heavy cases (issue 11 item 4; problem.HEAVY_*): the full objective in every
# implementation, both levels. GPU: the work unit's two shapes in bf16, right after the
# mild work unit, and the first fused-linear shape after the mild fused-linear cases. CPU
# and smoke: the grid's smaller vocabulary in both dtypes, and the fused-linear shape in
# both dtypes. On this CPU they add about a minute to `make bench` (bench/NOTES.md).
HEAVY_BETA = 0.04
PADDING_CHOICES = ("all",) + PADDINGS
# Torch threads on the CPU. The development machine has two cores shared with other work,
# and while another process held one of them, two OpenMP threads ran the same step 5x
# slower than one: their barriers spin on a core they do not have (measured here on
# 2026-11-21: an eager step took 160 ms on 2 threads and 27 ms on 1). One thread makes the
# CPU figures repeatable; --threads overrides.
CPU_THREADS = 1


def gpu_cases(quick: bool) -> list[Case]:
    """bf16 over the whole grid, fp32 on a subset; the work unit first.

    --quick keeps the work unit's shapes (every beta and level) and one fp32 case.
    """
    shapes = WORK_UNIT if quick else [(n, v) for n in GPU_TOKENS for v in GPU_VOCABS]
    cases = [Case(n, v, "bfloat16", beta, level, GPU_SEQ_LEN)
             for n, v in shapes for level in LEVELS for beta in BETAS]
    cases += [Case(n, v, "bfloat16", HEAVY_BETA, level, GPU_SEQ_LEN, padding="heavy")
              for n, v in WORK_UNIT for level in LEVELS]
    fp32_vocabs = (151936,) if quick else GPU_VOCABS
    cases += [Case(8192, v, "float32", 0.04, "token", GPU_SEQ_LEN) for v in fp32_vocabs]
    return sorted(cases, key=lambda c: ((c.n_tokens, c.vocab) not in WORK_UNIT, c.dtype != "bfloat16",
                                        c.padding != "mild", c.n_tokens, c.vocab, c.level != "token", c.beta))


def linear_cases(mode: str, smoke: bool) -> list[LinearCase]:
    """The fused-linear cases: GPU as LINEAR_*, the CPU and smoke shapes otherwise."""
    if mode == "gpu" and not smoke:
        return [LinearCase(n, LINEAR_VOCAB, "bfloat16", 0.04, "token", GPU_SEQ_LEN, LINEAR_HIDDEN)
                for n in LINEAR_TOKENS] + [
            LinearCase(LINEAR_TOKENS[0], LINEAR_VOCAB, "bfloat16", HEAVY_BETA, "token", GPU_SEQ_LEN, LINEAR_HIDDEN,
                       padding="heavy")]
    shape = SMOKE_LINEAR if smoke else CPU_LINEAR
    return [LinearCase(beta=0.04, dtype=dtype, level=level, **shape)
            for dtype in ("float32", "bfloat16") for level in LEVELS] + [
        LinearCase(beta=HEAVY_BETA, dtype=dtype, level="token", padding="heavy", **shape)
        for dtype in ("float32", "bfloat16")]


def all_cases(mode: str, smoke: bool, quick: bool, unit: str, padding: str = "all") -> list[Case]:
    """The run's cases in order. GPU: the logits work unit (bf16; mild, then heavy padding)
    first, then the fused-linear cases, then the rest of the logits grid, so a run cut short
    by its budget has both units. `padding` keeps one profile's cases ("all": both)."""
    keep = lambda cases: [c for c in cases if padding in ("all", c.padding)]  # noqa: E731
    logits = keep(cpu_cases(smoke) if mode == "cpu" or smoke else gpu_cases(quick))
    linear = keep(linear_cases(mode, smoke))
    if unit == "logits":
        return logits
    if unit == "linear":
        return linear
    if mode != "gpu":
        return logits + linear
    # gpu_cases sorts the bf16 work-unit cases first.
    first = sum((c.n_tokens, c.vocab) in WORK_UNIT and c.dtype == "bfloat16" for c in logits)
    return logits[:first] + linear + logits[first:]


def cpu_cases(smoke: bool) -> list[Case]:
    tokens, vocabs, seq_len = (SMOKE_TOKENS, SMOKE_VOCABS, SMOKE_SEQ_LEN) if smoke else (
        CPU_TOKENS, CPU_VOCABS, CPU_SEQ_LEN)
    mild = [Case(n, v, dtype, beta, level, seq_len)
            for n in tokens for v in vocabs for dtype in ("float32", "bfloat16") for level in LEVELS for beta in BETAS]
    heavy = [Case(tokens[0], vocabs[0], dtype, HEAVY_BETA, level, seq_len, padding="heavy")
             for dtype in ("float32", "bfloat16") for level in LEVELS]
    return mild + heavy


@dataclass(frozen=True)
class Step:
    """One case of a plan and the implementations it runs (None: every discovered one of its unit)."""

    case: Case
    impls: tuple[str, ...] | None = None


def gpu_plan(smoke: bool, with_compile: bool = False, tail: bool = True) -> list[Step]:
    """SPEC section 18's rows in priority order (issues 18, 20 and 22): a step never started is
    lost, so what the issues need most comes first. ours-2pass (the opt-in two-pass kernel) runs
    beside ours-trainer wherever the loss is token-local. The copy bandwidth and the cuBLAS GEMM run
    before the first step (main). `with_compile` adds torch.compile of the reference to the
    first step (a minute of compilation); `tail` appends the rest of the grid."""
    n1, n2, V, H, T = (PLAN_SHAPES[smoke][k] for k in ("n1", "n2", "vocab", "hidden", "seq_len"))
    bf16 = "bfloat16"
    linear = ("ours-linear", "unfused", "trl-linear", "liger-linear")
    steps = [
        # (b) the logits work unit: ours on a (B, T, V) tensor and as a trainer calls it, the peers.
        Step(Case(n1, V, bf16, 0.04, "token", T),
             ("ours-triton", "ours-trainer", "ours-2pass", "liger", "trl", "eager")
             + (("compile",) if with_compile else ())),
        # (c) GSPO (sequence-level importance sampling).
        Step(Case(n1, V, bf16, 0.04, "sequence", T), ("ours-trainer", "liger")),
        # (d) the old/ref passes: forward only, entropy off and on, and TRL's kernel.
        Step(LogprobsCase(n1, V, bf16, 0.0, "token", T), ("ours-logprobs", "ours-logprobs-entropy", "trl-logprobs")),
        # (e) twice the tokens, without and with the KL.
        Step(Case(n2, V, bf16, 0.0, "token", T), ("ours-trainer", "ours-2pass", "liger")),
        Step(Case(n2, V, bf16, 0.04, "token", T), ("ours-trainer", "ours-2pass", "liger")),
        # (f) fused linear; Liger's last (about 0.5 s a call and its compile).
        Step(LinearCase(n1, V, bf16, 0.04, "token", T, H), linear),
        Step(LinearCase(n2, V, bf16, 0.04, "token", T, H), linear),
    ]
    if tail:
        seen = {s.case for s in steps}
        rest = [c for c in (cpu_cases(True) if smoke else gpu_cases(False)) if c not in seen]
        steps += [Step(c, TAIL_IMPLS) for c in rest]
    return steps


def grid_plan(mode: str, smoke: bool, quick: bool, unit: str, padding: str) -> list[Step]:
    """Every case of the grid (all_cases) with every implementation of its unit."""
    return [Step(c) for c in all_cases(mode, smoke, quick, "all" if unit == "logprobs" else unit, padding)
            if unit != "logprobs"]


def make_plan(args: argparse.Namespace, mode: str) -> list[Step]:
    plan = args.plan if args.plan != "auto" else ("gpu" if mode == "gpu" else "grid")
    if plan == "grid":
        return grid_plan(mode, args.smoke, args.quick, args.unit, args.padding)
    steps = gpu_plan(args.smoke, args.with_compile, tail=not (args.quick or args.smoke))
    return [s for s in steps if args.unit in ("all", s.case.unit) and args.padding in ("all", s.case.padding)]


def compile_applies(case: Case, device: torch.device) -> bool:
    """torch.compile costs a minute of compilation per shape and variant on the GPU, so it
    is measured at the first work-unit shape only (bf16, token level, both betas). On the
    CPU, where it runs only when asked for, it runs everywhere."""
    return device.type != "cuda" or (
        (case.n_tokens, case.vocab) == WORK_UNIT[0] and case.dtype == "bfloat16" and case.level == "token")


def step_impls(step: Step, by_name: dict[str, Impl], device: torch.device) -> list[Impl]:
    """The implementations a step runs: those it names (all of its unit if none) that this
    machine has; on the grid, compile only where compile_applies."""
    names = step.impls or list(by_name)
    return [by_name[n] for n in names if n in by_name and by_name[n].unit == step.case.unit
            and not (step.impls is None and n == "compile" and not compile_applies(step.case, device))]


def _row(case: Case, impl: Impl, mode: str) -> dict:
    """A results row before measurement: SPEC section 5's keys first, then ours. `hidden` is
    H for a fused-linear row and None otherwise."""
    linear = isinstance(case, LinearCase)
    tolerance = (LINEAR_TOLERANCE if linear else LOGPROBS_TOLERANCE if case.unit == "logprobs" else TOLERANCE)
    return {"impl": impl.name, "n_tokens": case.n_tokens, "vocab": case.vocab, "dtype": case.dtype,
            "beta": case.beta, "level": case.level, "fwd_ms": None, "fwd_bwd_ms": None, "peak_extra_mb": None,
            "unit": case.unit, "call": impl.call, "hidden": case.hidden if linear else None,
            "mode": mode, "batch": case.batch, "seq_len": case.seq_len,
            # The case's padding profile and the share of its (B, T) rows masked (run_step fills it).
            "padding_kind": case.padding, "padding": None, "inplace": impl.inplace,
            "max_err": None, "tolerance": tolerance[case.torch_dtype], "note": None}


def _time(out: dict, fns: dict, device: torch.device, timing: measure.Timing, step_ms: float | None) -> None:
    """`{key}_ms` for each fns[key] (and on the CPU their minima) into `out`. On a GPU a function
    whose validated call took over SLOW_STEP_MS is timed by SLOW_REPS single calls instead of
    do_bench (out["timing"] says which)."""
    slow = device.type == "cuda" and step_ms is not None and step_ms > SLOW_STEP_MS
    out["timing"] = (f"median of {SLOW_REPS} single call(s), CUDA events (slow: {step_ms:.0f} ms a step)" if slow
                     else "triton.testing.do_bench median, L2 flushed" if device.type == "cuda"
                     else "perf_counter loop, median (min beside)")
    for key, fn in fns.items():
        if slow:
            out[f"{key}_ms"] = round(probe.time_few_ms(fn, device, SLOW_REPS), 4)
            continue
        median, minimum = measure.time_ms(fn, device, timing)
        out[f"{key}_ms"] = round(median, 4)
        if minimum is not None:
            out[f"{key}_min_ms"] = round(minimum, 4)


def _peak(fn, device: torch.device) -> tuple[object, dict, float]:
    """fn()'s result, its memory figures and its wall time in ms. GPU: the allocator's peak above
    what was allocated before (peak_extra_mb). CPU: the resident set's peak growth
    (peak_rss_mb), where measure has peak_rss_growth; in a long process it can undercount (heap
    pages freed earlier are reused), bench/cpu_memory.py measures it in fresh processes."""
    rss = getattr(measure, "peak_rss_growth", None)
    elapsed = []

    def timed():
        t0 = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed.append((time.perf_counter() - t0) * 1e3)
        return result

    if device.type == "cpu" and rss is not None:
        result, mb = rss(timed)
        figures = {"peak_rss_mb": None if mb is None else round(mb, 1)}
    else:
        result, mb = measure.peak_extra(timed, device)
        figures = {"peak_extra_mb": None if mb is None else round(mb, 1)}
    return result, figures, elapsed[0]


def _finite_or_none(out: dict, **values: float | None) -> None:
    for key, value in values.items():
        out[key] = None if value is None or not math.isfinite(value) else float(f"{value:.3e}")  # JSON has no inf


def measure_impl(impl: Impl, p: Problem, o: Oracle, device: torch.device, timing: measure.Timing):
    """Validate one logits implementation on one problem and, if it passes, time it.

    The leaf the gradient is taken to depends on the call (bench/names.py): bare, a (B, T, V)
    view of a copy of the model's output; otherwise the whole (B, T+1, V) copy, passed whole
    ("trainer") or as [:, :-1] inside the step ("trainer-slice", so autograd's slice backward
    is timed). Returns (the row's figures, the step for probe.py, or None when not timed).
    """
    whole = impl.call in ("trainer", "trainer-slice") or impl.padded_input
    source = p.padded if whole else p.logits
    x = p.padded.detach().clone()
    x = (x if whole else x[:, :-1]).requires_grad_(True)
    arg = (lambda: x[:, :-1]) if impl.call == "trainer-slice" else (lambda: x)

    def forward() -> torch.Tensor:
        return impl.loss(p, arg())

    def step() -> tuple[torch.Tensor, torch.Tensor]:
        # autograd.grad, not backward(): nothing accumulates into x.grad between reps.
        loss = impl.loss(p, arg())
        (grad,) = torch.autograd.grad(loss, x)
        return loss.detach(), grad

    def restore() -> None:  # an in-place implementation has written its gradient over x
        with torch.no_grad():
            x.copy_(source)

    step()  # compiles outside the measurements: Triton JIT, torch.compile, Liger's per-shape kernels
    restore()
    (loss, grad), out, step_ms = _peak(step, device)
    peak = out.get("peak_extra_mb")
    own_grad = grad.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
    if peak is not None:
        # SPEC section 4's memory goal counts what is beyond the logits and their gradient.
        beyond = peak - (grad.nbytes / measure.MB if own_grad else 0.0)
        out["peak_beyond_grad_mb"] = round(beyond, 1)
        out["pct_of_logits"] = round(100 * beyond * measure.MB / p.case.logits_bytes, 3)
    loss_err, grad_err = error(o, loss, grad[:, :-1] if whole else grad)
    err = max(loss_err, grad_err)
    _finite_or_none(out, max_err=err, loss_err=loss_err, grad_err=grad_err)
    out["rows_checked"], out["rows_near_clip_bound"] = len(o.rows[0]), o.near_clip_bound
    tolerance = TOLERANCE[p.case.torch_dtype]
    if whole:
        # The trainer's leaf: the position that predicts nothing must get a zero gradient.
        out["unscored_grad_zero"] = bool((grad[:, -1] == 0).all())
    if not err <= tolerance:
        out["note"] = (f"FAILED validation against the float64 reference: error {err:.2e} (loss {loss_err:.1e}, "
                       f"gradient {grad_err:.1e}) > tolerance {tolerance:.0e}; not timed")
        return out, None
    if whole and not out["unscored_grad_zero"]:
        out["note"] = "FAILED validation: nonzero gradient at the unscored last position of the output; not timed"
        return out, None
    del loss, grad
    restore()
    _time(out, {"fwd": forward, "fwd_bwd": step}, device, timing, step_ms)
    return out, step


def measure_logprobs_impl(impl: Impl, p: Problem, o: Oracle, device: torch.device, timing: measure.Timing):
    """Validate a forward-only log-prob pass (no gradient) on every scored row and time it:
    fwd_ms is the pass; fwd_bwd_ms stays None. Returns (figures, the pass for probe.py or None)."""
    x = p.padded if impl.padded_input else p.logits

    def forward():
        with torch.no_grad():
            return impl.loss(p, x)

    forward()
    (logprobs, entropy), out, step_ms = _peak(forward, device)
    lp_err, ent_err = logprobs_error(o, p.mask, logprobs, entropy)
    err = max(e for e in (lp_err, ent_err) if e is not None)
    _finite_or_none(out, max_err=err, logprobs_err=lp_err, entropy_err=ent_err)
    out["returns_entropy"] = entropy is not None
    out["rows_checked"] = int(p.mask.sum())
    tolerance = LOGPROBS_TOLERANCE[p.case.torch_dtype]
    if not err <= tolerance:
        out["note"] = (f"FAILED validation against the float64 reference: log-prob error {lp_err:.2e}, entropy "
                       f"error {ent_err if ent_err is None else format(ent_err, '.2e')} > tolerance "
                       f"{tolerance:.0e}; not timed")
        return out, None
    del logprobs, entropy
    _time(out, {"fwd": forward}, device, timing, step_ms)
    return out, forward


def measure_linear_impl(impl: Impl, p: LinearProblem, o: LinearOracle, device: torch.device,
                        timing: measure.Timing):
    """measure_impl for the fused-linear unit: the gradients are those of hidden and weight.

    peak_extra_mb counts the returned gradients (grad_weight alone is V * H, 1.2 GB at
    Qwen's shape in bf16); peak_beyond_grad_mb takes them out. The errors of the gradients
    against the float64 oracle are the accuracy column (issue 22).
    """
    # Leaves sharing the problem's storage: no implementation here writes into its inputs.
    hidden = p.hidden.detach().requires_grad_(True)
    weight = p.weight.detach().requires_grad_(True)

    def forward() -> torch.Tensor:
        return impl.loss(p, hidden, weight)

    def step() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        loss = impl.loss(p, hidden, weight)
        grad_hidden, grad_weight = torch.autograd.grad(loss, (hidden, weight))
        return loss.detach(), grad_hidden, grad_weight

    step()  # compiles outside the measurements: Triton JIT, Liger's torch.compile of its loss
    (loss, grad_hidden, grad_weight), out, step_ms = _peak(step, device)
    peak = out.get("peak_extra_mb")
    grads_mb = (grad_hidden.nbytes + grad_weight.nbytes) / measure.MB
    out["grad_mb"] = round(grads_mb, 1)
    if peak is not None:
        out["peak_beyond_grad_mb"] = round(peak - grads_mb, 1)
    loss_err, hidden_err, weight_err = linear_error(o, loss, grad_hidden, grad_weight)
    err = max(loss_err, hidden_err, weight_err)
    _finite_or_none(out, max_err=err, loss_err=loss_err, grad_err=max(hidden_err, weight_err),
                    grad_hidden_err=hidden_err, grad_weight_err=weight_err)
    out["rows_nudged"] = p.nudged
    tolerance = LINEAR_TOLERANCE[p.case.torch_dtype]
    if not err <= tolerance:
        out["note"] = (f"FAILED validation against the float64 reference: error {err:.2e} (loss {loss_err:.1e}, "
                       f"grad_hidden {hidden_err:.1e}, grad_weight {weight_err:.1e}) > tolerance {tolerance:.0e}; "
                       "not timed")
        return out, None
    del loss, grad_hidden, grad_weight
    _time(out, {"fwd": forward, "fwd_bwd": step}, device, timing, step_ms)
    return out, step


def limit_scale() -> float:
    """The factor on every time limit: INTERPRETED_FACTOR under the interpreter, times
    BENCH_LIMIT_SCALE (tests shrink the limits with it)."""
    interpreted = INTERPRETED_FACTOR if os.environ.get("TRITON_INTERPRET") == "1" else 1.0
    return interpreted * float(os.environ.get("BENCH_LIMIT_SCALE", "1"))


def impl_limit_s(name: str) -> float:
    return IMPL_LIMIT_S.get(name, DEFAULT_LIMIT_S) * limit_scale()


def _cuda_broken(device: torch.device) -> bool:
    """Whether the CUDA context still works after an error (an illegal memory access makes every
    later call fail with the same error: only a new process recovers)."""
    if device.type != "cuda":
        return False
    try:
        torch.cuda.synchronize(device)
        torch.empty(1, device=device).add_(1).item()
        return False
    except Exception:  # noqa: BLE001
        return True


class Run:
    """The results being written: rows, the in-flight record, the file after every change."""

    def __init__(self, results: dict, path: Path, copy_gbps: float):
        self.results, self.path, self.copy_gbps = results, path, copy_gbps

    def write(self) -> None:
        report.derive(self.results["rows"], self.copy_gbps)
        report.write_json(self.results, self.path)

    def in_flight(self, step: int, phase: str, limit_s: float, rows: list[dict] | None = None,
                  row_index: int | None = None) -> None:
        """What a supervisor must record if this process dies now (report.settle_in_flight)."""
        self.results["in_flight"] = {"step": step, "phase": phase, "started": time.time(),
                                     "limit_s": round(limit_s, 1), "pid": os.getpid(), "rows": rows or [],
                                     "row_index": row_index}
        self.write()

    def landed(self) -> None:
        self.results["in_flight"] = None
        self.write()


def run_step(index: int, step: Step, impls: list[Impl], device: torch.device, timing: measure.Timing, mode: str,
             seed: int, oracle_rows: int, run: Run, deadline: float | None, profile: bool) -> bool:
    """Measure `impls` on the step's case, a row each, written as they land. Returns False when
    the process must stop: the CUDA context broke (main exits with EXIT_CUDA_BROKEN)."""
    case = step.case
    linear = isinstance(case, LinearCase)
    templates = []
    for impl in impls:
        row = _row(case, impl, mode)
        row["step"] = index
        templates.append(row)
    run.in_flight(index, "setup", SETUP_LIMIT_S * limit_scale(), templates)
    t0 = time.perf_counter()
    if linear:
        p = make_linear_problem(case, device, seed)
        o = linear_oracle(p)
    else:
        p = make_problem(case, device, seed)
        o = oracle(p, oracle_rows)
    padding = round(padding_fraction(p.mask), 4)
    print(f"  padding {case.padding}: {padding:.1%} of the {case.batch} x {case.seq_len} rows masked; inputs and "
          f"float64 oracle {time.perf_counter() - t0:.1f} s", flush=True)
    measure_fn = (measure_linear_impl if linear else measure_logprobs_impl if case.unit == "logprobs"
                  else measure_impl)
    for impl, row in zip(impls, templates):
        if deadline is not None and time.time() > deadline:
            print(f"  {impl.name}: not started (deadline)", flush=True)
            break
        row["padding"] = padding
        run.in_flight(index, "measure", impl_limit_s(impl.name), [dict(row, note=None)])
        t0 = time.perf_counter()
        step_fn = None
        try:
            figures, step_fn = measure_fn(impl, p, o, device, timing)
            row.update(figures)
        except torch.cuda.OutOfMemoryError:
            row["note"] = "out of memory"
        except Exception as exc:  # noqa: BLE001 - one broken implementation must not end the run
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            row["note"] = f"error: {type(exc).__name__}: {first}"
        row["seconds"] = round(time.perf_counter() - t0, 1)
        broken = row["note"] is not None and _cuda_broken(device)
        if broken:
            row["note"] += " (the CUDA context is broken: the run goes on in a new process)"
        run.results["rows"].append(row)
        run.landed()
        if step_fn is not None and profile and not broken:
            run.in_flight(index, "profile", PROFILE_LIMIT_S * limit_scale(), row_index=len(run.results["rows"]) - 1)
            row["kernels"] = probe.kernel_breakdown(step_fn, device)
            row["host_syncs"] = probe.host_syncs(step_fn, device)
            run.landed()
        del step_fn
        measure.release(device)
        syncs = (row.get("host_syncs") or {}).get("count")
        launches = (row.get("kernels") or {}).get("launches")
        peak = report.peak_mb(row)
        note = f"  {row['note']}" if row["note"] else ""
        print(f"  {impl.name:<22}{impl.call:<14} fwd {row['fwd_ms']} ms  fwd+bwd {row['fwd_bwd_ms']} ms  "
              f"peak {peak} MB  err {row['max_err']}  syncs {syncs}  launches {launches}  ({row['seconds']} s){note}",
              flush=True)
        if broken:
            return False
    del p, o
    measure.release(device)
    return True


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, two reps (the test suite's check)")
    ap.add_argument("--quick", action="store_true",
                    help="GPU plan: without the tail of the grid; grid: the work-unit shapes only")
    ap.add_argument("--plan", choices=PLANS, default="auto",
                    help="gpu: SPEC 18's rows in priority order; grid: every case x implementation; "
                         "auto (default): gpu on CUDA, grid on the CPU")
    ap.add_argument("--unit", choices=UNITS, default="all",
                    help="the logits-kernel cases, the fused-linear cases, the forward-only log-prob cases, or all")
    ap.add_argument("--padding", choices=PADDING_CHOICES, default="all",
                    help="the mild-padding cases, the padding-heavy cases, or all (default)")
    ap.add_argument("--steps", help="comma-separated indices of the plan's steps to run (default: all)")
    ap.add_argument("--with-compile", action="store_true",
                    help="GPU plan: add torch.compile of the reference to the work unit (about a minute to compile)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="directory for the JSON and the PNG")
    ap.add_argument("--json", type=Path, help="the results file (default: OUT/<device>-<date>.json)")
    ap.add_argument("--resume", action="store_true",
                    help="keep the rows of an existing --json file and run only the (step, implementation) "
                         "pairs it lacks (bench/supervise.py restarts a killed run with it)")
    ap.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available")
    ap.add_argument("--impls", help=f"comma-separated subset of: {', '.join(ALL)}")
    ap.add_argument("--budget-s", type=float, help="start no new implementation after this many seconds")
    ap.add_argument("--deadline", type=float, help="start no new implementation after this time (epoch seconds)")
    ap.add_argument("--profile", choices=("auto", "on", "off"), default="auto",
                    help="one profiled call (kernel breakdown, host syncs) per timed row; auto: on a GPU")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--oracle-rows", type=int, default=64, help="rows whose gradient is checked per case")
    ap.add_argument("--threads", type=int, default=CPU_THREADS,
                    help="CPU: torch threads (default 1: see CPU_THREADS)")
    return ap.parse_args(argv)


def _fault_injection(impls: list[Impl]) -> list[Impl]:
    """BENCH_FAULT=<hang|crash>:<impl>:<step>[,...] (tests only): at that step that
    implementation sleeps for an hour or ends its process, so that tests/test_bench_smoke.py
    can check the supervisor's recovery."""
    faults = {}
    for fault in filter(None, os.environ.get("BENCH_FAULT", "").split(",")):
        kind, name, at = fault.split(":")
        faults[(name, int(at))] = kind

    def faulty(impl: Impl) -> Impl:
        def loss(p, *args):
            kind = faults.get((impl.name, FAULT_STEP[0]))
            if kind == "hang":
                time.sleep(3600)
            if kind == "crash":
                os._exit(9)
            return impl.loss(p, *args)

        return Impl(impl.name, loss, impl.padded_input, impl.inplace, impl.version, impl.unit, impl.call)

    return [faulty(i) if any(name == i.name for name, _ in faults) else i for i in impls]


FAULT_STEP = [-1]  # the step being measured, for _fault_injection


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: CUDA is not available", file=sys.stderr)
        return 2
    mode = "gpu" if device.type == "cuda" else "cpu"
    if mode == "cpu":
        torch.set_num_threads(args.threads)
    plan = make_plan(args, mode)
    gpu_plan_run = args.plan == "gpu" or (args.plan == "auto" and mode == "gpu")
    if mode == "cpu":
        timing = measure.SMOKE_TIMING if args.smoke else measure.CPU_TIMING
    else:
        timing = measure.SMOKE_TIMING if args.smoke else measure.GPU_QUICK_TIMING if args.quick else measure.GPU_TIMING
    wanted = args.impls.split(",") if args.impls else None
    if wanted is None and gpu_plan_run:
        wanted = list(dict.fromkeys(n for s in plan for n in (s.impls or ())))
    impls, skipped = discover(device, wanted)
    impls = _fault_injection(impls)
    by_name = {i.name: i for i in impls}
    profile = args.profile == "on" or (args.profile == "auto" and mode == "gpu")
    start = time.time()
    deadline = min([t for t in (args.deadline, None if args.budget_s is None else start + args.budget_s)
                    if t is not None], default=None)

    env = measure.environment(device)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"{measure.slug(env['device'])}-{env['date']}"
    json_path = args.json or args.out / f"{stem}.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    png_path = json_path.with_suffix(".png")
    results = json.loads(json_path.read_text()) if args.resume and json_path.is_file() else None
    if results is not None and results.get("in_flight"):
        # Left by a process that died without a supervisor to say why.
        report.settle_in_flight(results, "the process ended while it ran (no supervisor recorded why)")
    if results is None:
        copy_bytes = (16 << 20) if args.smoke else (2 << 30) if mode == "gpu" else (256 << 20)
        copy_gbps = round(measure.copy_gbps(device, copy_bytes, timing), 1)
        measure.release(device)
        results = {
            **{k: env[k] for k in ("device", "commit", "date", "torch", "triton")},
            "copy_gbps": copy_gbps,
            "copy_bytes": copy_bytes,
            "mode": mode,
            "plan": "gpu" if gpu_plan_run else "grid",
            "complete": False,
            "note": ("CPU figures: small shapes on a CPU; they rank implementations on this machine only and are not "
                     "GPU figures. peak_extra_mb is null: no allocator counter on the CPU; peak_rss_mb, where "
                     "present, is the process's resident-set growth during one step." if mode == "cpu" else
                     "GPU figures: median of triton.testing.do_bench (L2 flushed between calls), or of single "
                     "calls where a row's `timing` says so."),
            "smoke": args.smoke,
            "file_stem": stem,
            "environment": env,
            "versions": {i.name: i.version for i in impls if i.version},
            "full_output_api": any(i.call == "trainer" and i.name.startswith("ours") for i in impls) or (
                any(i.name.startswith("ours-logprobs") and i.padded_input for i in impls)),
            "steps": [{"step": i, "unit": s.case.unit, "case": asdict(s.case),
                       "impls": [impl.name for impl in step_impls(s, by_name, device)]} for i, s in enumerate(plan)
                      if args.steps is None or i in {int(j) for j in args.steps.split(",")}],
            "case_options": {c.level: {k: v for k, v in c.options.items() if k != "beta"}
                             for c in (s.case for s in plan)},
            "unit": args.unit,
            "padding": args.padding,
            "padding_profiles": {k: v for k, v in PADDING_PROFILES.items() if any(s.case.padding == k for s in plan)},
            "skipped_impls": skipped,
            "skipped_cases": [],
            "gemm": [],
            "in_flight": None,
            "rows": [],
            "restarts": 0,
        }
    else:
        results["restarts"] = results.get("restarts", 0) + 1
    run = Run(results, json_path, results["copy_gbps"])
    run.write()
    print(f"{mode.upper()} run on {env['device']} ({results['plan']} plan): {len(plan)} steps x "
          f"{[i.name for i in impls]}; copy bandwidth {results['copy_gbps']} GB/s; not run: {skipped or 'none'}"
          + (f"; resumed with {len(results['rows'])} rows" if results["restarts"] else ""), flush=True)
    if gpu_plan_run and not results["gemm"] and (deadline is None or time.time() < deadline):
        run.in_flight(-1, "gemm", DEFAULT_LIMIT_S * limit_scale())
        shape = PLAN_SHAPES[args.smoke]
        results["gemm"] = probe.gemm_baselines(device, shape["n1"], shape["hidden"], shape["vocab"], torch.bfloat16,
                                               timing)
        run.landed()
        for g in results["gemm"]:
            print(f"  {g['name']:<14} {g.get('ms')} ms  {g.get('tflops')} TFLOP/s  error vs float64 "
                  f"{g.get('rel_err_fp64_corner')}  {g.get('error') or ''}", flush=True)
    done = {(r.get("step"), r["impl"]) for r in results["rows"]}
    only_steps = None if args.steps is None else {int(i) for i in args.steps.split(",")}
    for index, step in enumerate(plan):
        todo = [impl for impl in step_impls(step, by_name, device) if (index, impl.name) not in done]
        if not todo or (only_steps is not None and index not in only_steps):
            continue
        if deadline is not None and time.time() > deadline:
            print(f"deadline reached: step {index} and later not started", flush=True)
            break
        case = step.case
        shape = f"N={case.n_tokens} V={case.vocab}" + (f" H={case.hidden} (fused linear)"
                                                        if isinstance(case, LinearCase) else "")
        print(f"[{index + 1}/{len(plan)}] {case.unit}: {shape} {case.dtype} beta={case.beta} {case.level} "
              f"padding={case.padding}", flush=True)
        FAULT_STEP[0] = index
        if not run_step(index, step, todo, device, timing, mode, args.seed + index, args.oracle_rows, run, deadline,
                        profile):
            return EXIT_CUDA_BROKEN
    report.finalize(results)
    results["wall_s"] = round(time.time() - start, 1)
    run.write()
    try:
        report.plot(results, png_path)
    except Exception as exc:  # noqa: BLE001 - a plot must not cost the results
        print(f"plot failed: {type(exc).__name__}: {exc}", flush=True)
    print()
    print(report.table(results))
    failures = report.summarize_errors(results["rows"])
    print(f"\nwrote {json_path} and {png_path}; {len(results['rows'])} rows, {len(failures)} not timed")
    for line in failures:
        print("  " + line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
