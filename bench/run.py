"""python -m bench.run: validate, then time, every implementation over a grid of shapes.

For each case (shape x dtype x beta x level) the harness draws fresh inputs, computes the
float64 oracle once, and then for each implementation: runs it once to compile, measures
the peak memory of one forward+backward and checks that call's loss and gradient against
the oracle, and only if they pass, times the forward and the forward+backward. An
implementation that fails the check, or raises, gets a row with its error and no times.

The fused-linear unit (issue 6: the loss from hidden states and lm_head, never the logits)
runs the same way on its own cases, with its own implementations: each is checked on its
loss and on the gradients of hidden and weight, against the float64 reference through the
explicit logits.

Every case has a padding profile (problem.Case.padding): "mild", where completions lose
up to T/8 of their length, or "heavy" (issue 11 item 4), log-normal completion lengths that
leave about half of the (B, T) rows masked. The heavy cases run every implementation at one
shape of each unit: the work unit's shapes (GPU) or the grid's smallest (CPU, smoke). Each
row records its profile ("padding_kind") and the share of its (B, T) rows masked ("padding").

The results file is rewritten after every case, so a run stopped by a time limit still
leaves every finished case on disk ("complete": false until the end).

    python -m bench.run                # GPU grid when CUDA is there, else the CPU grid
    python -m bench.run --quick        # the work-unit shapes only (GPU)
    python -m bench.run --unit linear  # the fused-linear cases only (--unit logits: the others)
    python -m bench.run --padding heavy  # the padding-heavy cases only (--padding mild: the others)
    python -m bench.run --smoke --out /tmp/x   # tiny shapes, two reps: the test suite's check
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from . import measure, report
from .impls import ALL, Impl, discover
from .problem import (LINEAR_TOLERANCE, PADDING_PROFILES, PADDINGS, TOLERANCE, Case, LinearCase, LinearOracle,
                      LinearProblem, Oracle, Problem, error, linear_error, linear_oracle, make_linear_problem,
                      make_problem, oracle, padding_fraction)

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
UNITS = ("all", "logits", "linear")
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


def compile_applies(case: Case, device: torch.device) -> bool:
    """torch.compile costs a minute of compilation per shape and variant on the GPU, so it
    is measured at the first work-unit shape only (bf16, token level, both betas). On the
    CPU, where it runs only when asked for, it runs everywhere."""
    return device.type != "cuda" or (
        (case.n_tokens, case.vocab) == WORK_UNIT[0] and case.dtype == "bfloat16" and case.level == "token")


def _row(case: Case, impl: Impl, mode: str) -> dict:
    """A results row before measurement: SPEC section 5's keys first, then ours. `hidden` is
    H for a fused-linear row and None for a logits row."""
    linear = isinstance(case, LinearCase)
    return {"impl": impl.name, "n_tokens": case.n_tokens, "vocab": case.vocab, "dtype": case.dtype,
            "beta": case.beta, "level": case.level, "fwd_ms": None, "fwd_bwd_ms": None, "peak_extra_mb": None,
            "unit": case.unit, "hidden": case.hidden if linear else None,
            "mode": mode, "batch": case.batch, "seq_len": case.seq_len,
            # The case's padding profile and the share of its (B, T) rows masked (run_case fills it).
            "padding_kind": case.padding, "padding": None, "inplace": impl.inplace,
            "max_err": None, "tolerance": (LINEAR_TOLERANCE if linear else TOLERANCE)[case.torch_dtype], "note": None}


def _time(out: dict, forward, step, device: torch.device, timing: measure.Timing) -> None:
    """fwd_ms and fwd_bwd_ms (and on the CPU their minima) into `out`."""
    for key, fn in (("fwd", forward), ("fwd_bwd", step)):
        median, minimum = measure.time_ms(fn, device, timing)
        out[f"{key}_ms"] = round(median, 4)
        if minimum is not None:
            out[f"{key}_min_ms"] = round(minimum, 4)


def measure_impl(impl: Impl, p: Problem, o: Oracle, device: torch.device, timing: measure.Timing) -> dict:
    """Validate one implementation on one problem and, if it passes, time it."""
    source = p.padded if impl.padded_input else p.logits
    x = p.padded.detach().clone()
    x = (x if impl.padded_input else x[:, :-1]).requires_grad_(True)

    def forward() -> torch.Tensor:
        return impl.loss(p, x)

    def step() -> tuple[torch.Tensor, torch.Tensor]:
        # autograd.grad, not backward(): nothing accumulates into x.grad between reps.
        loss = impl.loss(p, x)
        (grad,) = torch.autograd.grad(loss, x)
        return loss.detach(), grad

    def restore() -> None:  # an in-place implementation has written its gradient over x
        with torch.no_grad():
            x.copy_(source)

    step()  # compiles outside the measurements: Triton JIT, torch.compile, Liger's per-shape kernels
    restore()
    (loss, grad), peak = measure.peak_extra(step, device)
    own_grad = grad.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
    out: dict = {"peak_extra_mb": None if peak is None else round(peak, 1)}
    if peak is not None:
        # SPEC section 4's memory goal counts what is beyond the logits and their gradient.
        beyond = peak - (grad.nbytes / measure.MB if own_grad else 0.0)
        out["peak_beyond_grad_mb"] = round(beyond, 1)
        out["pct_of_logits"] = round(100 * beyond * measure.MB / p.case.logits_bytes, 3)
    loss_err, grad_err = error(o, loss, grad[:, :-1] if impl.padded_input else grad)
    err = max(loss_err, grad_err)
    tolerance = TOLERANCE[p.case.torch_dtype]
    for key, value in (("max_err", err), ("loss_err", loss_err), ("grad_err", grad_err)):
        out[key] = float(f"{value:.3e}") if math.isfinite(value) else None  # JSON has no inf
    out["rows_checked"], out["rows_near_clip_bound"] = len(o.rows[0]), o.near_clip_bound
    if not err <= tolerance:
        out["note"] = (f"FAILED validation against the float64 reference: error {err:.2e} (loss {loss_err:.1e}, "
                       f"gradient {grad_err:.1e}) > tolerance {tolerance:.0e}; not timed")
        return out
    del loss, grad
    restore()
    _time(out, forward, step, device, timing)
    return out


def measure_linear_impl(impl: Impl, p: LinearProblem, o: LinearOracle, device: torch.device,
                        timing: measure.Timing) -> dict:
    """measure_impl for the fused-linear unit: the gradients are those of hidden and weight.

    peak_extra_mb counts the returned gradients (grad_weight alone is V * H, 1.2 GB at
    Qwen's shape in bf16); peak_beyond_grad_mb takes them out.
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
    (loss, grad_hidden, grad_weight), peak = measure.peak_extra(step, device)
    grads_mb = (grad_hidden.nbytes + grad_weight.nbytes) / measure.MB
    out: dict = {"peak_extra_mb": None if peak is None else round(peak, 1), "grad_mb": round(grads_mb, 1)}
    if peak is not None:
        out["peak_beyond_grad_mb"] = round(peak - grads_mb, 1)
    loss_err, hidden_err, weight_err = linear_error(o, loss, grad_hidden, grad_weight)
    err = max(loss_err, hidden_err, weight_err)
    tolerance = LINEAR_TOLERANCE[p.case.torch_dtype]
    for key, value in (("max_err", err), ("loss_err", loss_err), ("grad_err", max(hidden_err, weight_err)),
                       ("grad_hidden_err", hidden_err), ("grad_weight_err", weight_err)):
        out[key] = float(f"{value:.3e}") if math.isfinite(value) else None  # JSON has no inf
    out["rows_nudged"] = p.nudged
    if not err <= tolerance:
        out["note"] = (f"FAILED validation against the float64 reference: error {err:.2e} (loss {loss_err:.1e}, "
                       f"grad_hidden {hidden_err:.1e}, grad_weight {weight_err:.1e}) > tolerance {tolerance:.0e}; "
                       "not timed")
        return out
    del loss, grad_hidden, grad_weight
    _time(out, forward, step, device, timing)
    return out


def run_case(case: Case, impls: list[Impl], device: torch.device, timing: measure.Timing, mode: str,
             seed: int, oracle_rows: int) -> list[dict]:
    linear = isinstance(case, LinearCase)
    impls = [i for i in impls if i.unit == case.unit]
    if not impls:
        return []
    if linear:
        p = make_linear_problem(case, device, seed)
        o = linear_oracle(p)
    else:
        p = make_problem(case, device, seed)
        o = oracle(p, oracle_rows)
    padding = round(padding_fraction(p.mask), 4)
    print(f"  padding {case.padding}: {padding:.1%} of the {case.batch} x {case.seq_len} rows masked", flush=True)
    measure_fn = measure_linear_impl if linear else measure_impl
    rows = []
    for impl in impls:
        if impl.name == "compile" and not compile_applies(case, device):
            continue
        row = _row(case, impl, mode)
        row["padding"] = padding
        t0 = time.perf_counter()
        try:
            row.update(measure_fn(impl, p, o, device, timing))
        except torch.cuda.OutOfMemoryError:
            row["note"] = "out of memory"
        except Exception as exc:  # noqa: BLE001 - one broken implementation must not end the run
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            row["note"] = f"error: {type(exc).__name__}: {first}"
        finally:
            measure.release(device)
        rows.append(row)
        note = f"  {row['note']}" if row["note"] else ""
        print(f"  {impl.name:<12} fwd {row['fwd_ms']} ms  fwd+bwd {row['fwd_bwd_ms']} ms  "
              f"peak {row['peak_extra_mb']} MB  err {row['max_err']}  ({time.perf_counter() - t0:.1f} s){note}",
              flush=True)
    del p, o
    measure.release(device)
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, two reps (the test suite's check)")
    ap.add_argument("--quick", action="store_true",
                    help="GPU: the work-unit shapes only (and the fused-linear cases, unless --unit logits)")
    ap.add_argument("--unit", choices=UNITS, default="all",
                    help="the logits-kernel cases, the fused-linear cases, or all (default)")
    ap.add_argument("--padding", choices=PADDING_CHOICES, default="all",
                    help="the mild-padding cases, the padding-heavy cases, or all (default)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="directory for the JSON and the PNG")
    ap.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available")
    ap.add_argument("--impls", help=f"comma-separated subset of: {', '.join(ALL)}")
    ap.add_argument("--budget-s", type=float, help="start no new case after this many seconds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--oracle-rows", type=int, default=64, help="rows whose gradient is checked per case")
    ap.add_argument("--threads", type=int, default=CPU_THREADS,
                    help="CPU: torch threads (default 1: see CPU_THREADS)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: CUDA is not available", file=sys.stderr)
        return 2
    mode = "gpu" if device.type == "cuda" else "cpu"
    if mode == "cpu":
        torch.set_num_threads(args.threads)
    cases = all_cases(mode, args.smoke, args.quick, args.unit, args.padding)
    if mode == "cpu":
        timing = measure.SMOKE_TIMING if args.smoke else measure.CPU_TIMING
    else:
        timing = measure.SMOKE_TIMING if args.smoke else measure.GPU_QUICK_TIMING if args.quick else measure.GPU_TIMING
    impls, skipped = discover(device, args.impls.split(",") if args.impls else None)

    env = measure.environment(device)
    copy_bytes = (16 << 20) if args.smoke else (1 << 30) if mode == "gpu" else (256 << 20)
    copy_gbps = round(measure.copy_gbps(device, copy_bytes, timing), 1)
    measure.release(device)
    results = {
        **{k: env[k] for k in ("device", "commit", "date", "torch", "triton")},
        "copy_gbps": copy_gbps,
        "mode": mode,
        "complete": False,
        "note": ("CPU figures: small shapes on a CPU; they rank implementations on this machine only and are not GPU "
                 "figures. peak_extra_mb is null: no allocator counter on the CPU." if mode == "cpu" else
                 "GPU figures: median of triton.testing.do_bench (L2 flushed between calls)."),
        "smoke": args.smoke,
        "environment": env,
        "versions": {i.name: i.version for i in impls if i.version},
        "case_options": {c.level: {k: v for k, v in c.options.items() if k != "beta"} for c in cases},
        "unit": args.unit,
        "padding": args.padding,
        "padding_profiles": {k: v for k, v in PADDING_PROFILES.items() if any(c.padding == k for c in cases)},
        "skipped_impls": skipped,
        "skipped_cases": [],
        "rows": [],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"{measure.slug(env['device'])}-{env['date']}"
    json_path, png_path = args.out / f"{stem}.json", args.out / f"{stem}.png"

    print(f"{mode.upper()} run on {env['device']}: {len(cases)} cases x {[i.name for i in impls]}; "
          f"copy bandwidth {copy_gbps} GB/s; not run: {skipped or 'none'}", flush=True)
    start = time.perf_counter()
    for i, case in enumerate(cases):
        if args.budget_s is not None and time.perf_counter() - start > args.budget_s:
            results["skipped_cases"] = [asdict(c) for c in cases[i:]]
            print(f"time budget of {args.budget_s:.0f} s spent: {len(cases) - i} case(s) not run", flush=True)
            break
        shape = f"N={case.n_tokens} V={case.vocab}" + (f" H={case.hidden} (fused linear)"
                                                        if isinstance(case, LinearCase) else "")
        print(f"[{i + 1}/{len(cases)}] {shape} {case.dtype} beta={case.beta} {case.level} padding={case.padding}",
              flush=True)
        results["rows"] += run_case(case, impls, device, timing, mode, args.seed + i, args.oracle_rows)
        report.derive(results["rows"], copy_gbps)
        report.write_json(results, json_path)
    results["complete"] = not results["skipped_cases"]
    results["wall_s"] = round(time.perf_counter() - start, 1)
    report.write_json(results, json_path)
    report.plot(results, png_path)
    print()
    print(report.table(results))
    failures = report.summarize_errors(results["rows"])
    print(f"\nwrote {json_path} and {png_path}; {len(results['rows'])} rows, {len(failures)} not timed")
    for line in failures:
        print("  " + line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
