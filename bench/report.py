"""The results: derived figures, the stdout table, the JSON of SPEC section 5, the PNG plot.

Rows of the fused-linear unit (issue 6) carry `hidden` (H); their figures are FLOP rates and
ratios to the unfused path, not bandwidths, and they get their own blocks and panels.

Rows carry their case's padding profile (`padding_kind`: "mild" or "heavy", issue 11 item 4)
and the share of the (B, T) rows masked (`padding`). The profile is part of the case: a heavy
row is compared with the heavy rows of its shape only, and gets its own block in the table.
Rows written before profiles existed read as mild.

Rows of the logprobs unit (the forward-only log-prob pass) have a forward time only; their
floor is one pass over the logits. Every row says which call it timed (`call`, bench/names.py).

This module needs neither torch nor the kernels: `python -m bench.report RESULTS.json` prints
the table and the compact summary of a results file (gpu_validate_and_time.sh does, last), and
settle_in_flight / finalize are what bench/supervise.py records when it kills a run."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Iterable
from itertools import groupby
from pathlib import Path

from .names import ALL, BASELINES, LINEAR_BASELINES, LOGPROBS_BASELINES

# Columns of SPEC section 5, in its order; every row has them, None where not measured.
SPEC_ROW_KEYS = ("impl", "n_tokens", "vocab", "dtype", "beta", "level", "fwd_ms", "fwd_bwd_ms", "peak_extra_mb")
SPEC_TOP_KEYS = ("device", "commit", "date", "torch", "triton", "copy_gbps", "rows")
# The passes over the logits that a fused GRPO loss makes: forward read, backward read,
# gradient write. Every peer makes these three; the floor is their bytes at copy bandwidth.
PASSES = 3
# Element size of each dtype name, so that the results can be derived without torch.
ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}


def padding_kind(row: dict) -> str:
    return row.get("padding_kind") or "mild"


def unit_of(row: dict) -> str:
    """The row's unit; rows written before units were recorded are logits or linear rows."""
    return row.get("unit") or ("linear" if row.get("hidden") else "logits")


def case_key(row: dict) -> tuple:
    return (row["n_tokens"], row["vocab"], row["dtype"], row["beta"], row["level"], row.get("hidden") or 0,
            padding_kind(row), unit_of(row))


def _padding_note(row: dict) -> str:
    """The case's padding for a block header: profile and masked share where known."""
    share = row.get("padding")
    return f"padding {padding_kind(row)}" + (f" ({share:.1%} of rows masked)" if share is not None else "")


def is_linear(row: dict) -> bool:
    return bool(row.get("hidden"))


def linear_flops(row: dict) -> int:
    """The model FLOPs of one forward+backward of the fused-linear unit: 6 N H V (forward
    2NHV, the gradients of hidden and weight 2NHV each). A design that recomputes the
    logits in its backward executes 8 N H V; the rate is of the useful 6."""
    return 6 * row["n_tokens"] * row["hidden"] * row["vocab"]


def logits_bytes(row: dict) -> int:
    return row["n_tokens"] * row["vocab"] * ITEMSIZE[row["dtype"]]


def derive(rows: list[dict], copy_gbps: float) -> None:
    """Fill each row's bandwidth figures and its speed-up over each baseline of its case.

    gbps: the three passes' bytes (PASSES * N * V * itemsize) over the forward+backward
    time: the bandwidth the implementation would need to move just those bytes, whatever
    it actually moves; fwd_gbps: one pass over the forward time; pct_copy: gbps as a share
    of the copy bandwidth; floor_ms: the three passes at copy bandwidth; x_floor: time over
    floor. speedup[b] = time of baseline b / time of this row (> 1: faster than b).
    """
    for _, group in groupby(sorted(rows, key=case_key), key=case_key):
        group = list(group)
        if is_linear(group[0]):
            derive_linear(group)
            continue
        if unit_of(group[0]) == "logprobs":
            derive_logprobs(group, copy_gbps)
            continue
        times = {r["impl"]: r["fwd_bwd_ms"] for r in group if r["fwd_bwd_ms"]}
        for r in group:
            nbytes = logits_bytes(r)
            floor_ms = PASSES * nbytes / (copy_gbps * 1e9) * 1e3
            floor2_ms = 2 * nbytes / (copy_gbps * 1e9) * 1e3
            t, tf = r["fwd_bwd_ms"], r["fwd_ms"]
            r["floor_ms"] = _sig(floor_ms)
            # SPEC section 14's two-pass floor (read the logits once, write the gradient once).
            r["floor2_ms"] = _sig(floor2_ms)
            r["x_floor2"] = _sig(t / floor2_ms) if t else None
            r["gbps"] = _sig(PASSES * nbytes / (t * 1e-3) / 1e9) if t else None
            r["fwd_gbps"] = _sig(nbytes / (tf * 1e-3) / 1e9) if tf else None
            r["pct_copy"] = _sig(100 * PASSES * nbytes / (t * 1e-3) / 1e9 / copy_gbps) if t else None
            r["x_floor"] = _sig(t / floor_ms) if t else None
            r["speedup"] = {b: _sig(times[b] / t) for b in BASELINES if t and b in times and b != r["impl"]}


def derive_logprobs(group: list[dict], copy_gbps: float) -> None:
    """The forward-only rows of one case: floor1_ms, one read of the logits at copy bandwidth;
    x_floor1 = fwd_ms / floor1_ms (issue 20 item 3: <= 1.1 without entropy, 1.2 with it);
    fwd_gbps, the logits' bytes over fwd_ms; speedup[b] over LOGPROBS_BASELINES by fwd_ms."""
    times = {r["impl"]: r["fwd_ms"] for r in group if r["fwd_ms"]}
    for r in group:
        floor1 = logits_bytes(r) / (copy_gbps * 1e9) * 1e3
        t = r["fwd_ms"]
        r["floor1_ms"] = _sig(floor1)
        r["x_floor1"] = _sig(t / floor1) if t else None
        r["fwd_gbps"] = _sig(logits_bytes(r) / (t * 1e-3) / 1e9) if t else None
        r["speedup"] = {b: _sig(times[b] / t) for b in LOGPROBS_BASELINES if t and b in times and b != r["impl"]}


def derive_linear(group: list[dict]) -> None:
    """The fused-linear rows of one case: tflops = 6NHV over the forward+backward time,
    fwd_tflops = 2NHV over the forward time, speedup[b] over each of LINEAR_BASELINES, and
    the peak memory as a share of the unfused path's, with and without the gradients
    (peak_vs_unfused, beyond_grad_vs_unfused; issue 6 item 4 asks < 10%)."""
    times = {r["impl"]: r["fwd_bwd_ms"] for r in group if r["fwd_bwd_ms"]}
    unfused = next((r for r in group if r["impl"] == "unfused"), {})
    for r in group:
        t, tf = r["fwd_bwd_ms"], r["fwd_ms"]
        flops = linear_flops(r)
        r["tflops"] = _sig(flops / (t * 1e-3) / 1e12) if t else None
        r["fwd_tflops"] = _sig(flops / 3 / (tf * 1e-3) / 1e12) if tf else None
        r["speedup"] = {b: _sig(times[b] / t) for b in LINEAR_BASELINES if t and b in times and b != r["impl"]}
        for key, ref_key in (("peak_vs_unfused", "peak_extra_mb"), ("beyond_grad_vs_unfused", "peak_beyond_grad_mb")):
            mine, theirs = r.get(ref_key), unfused.get(ref_key)
            r[key] = _sig(mine / theirs) if mine is not None and theirs and r["impl"] != "unfused" else None


def _sig(x: float, digits: int = 4) -> float:
    """x to `digits` significant digits: enough for any figure here, no false precision."""
    return float(f"{x:.{digits}g}")


def _fmt(value, spec: str = ".3g", none: str = "-") -> str:
    if value is None:
        return none
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return format(value, spec)


def table(results: dict) -> str:
    """The results as aligned text, one block per case."""
    lines = []
    if results.get("mode") == "cpu":
        rss = any(r.get("peak_rss_mb") is not None for r in results["rows"])
        lines.append(f"*** CPU figures, measured on {results['device']}: they rank the implementations on this "
                     "machine only and say nothing about GPU performance. "
                     + ("Peak MB on the CPU is the process's resident-set growth during one step (indicative in a "
                        "long process: bench/cpu_memory.py measures it in fresh ones). ***" if rss else
                        "Peak memory is not measured on the CPU. ***"))
    dirty = " (with uncommitted changes)" if results.get("environment", {}).get("dirty") else ""
    lines.append(f"device {results['device']}  commit {results['commit'][:12]}{dirty}"
                 f"  date {results['date']}  torch {results['torch']}  triton {results['triton']}"
                 f"  copy bandwidth {results['copy_gbps']:.1f} GB/s")
    # "beyond %": peak memory beyond the logits' gradient, in % of the logits (SPEC section 4: < 1%).
    head = (f"{'impl':<14}{'call':<14}{'fwd ms':>9}{'fwd+bwd ms':>12}{'peak MB':>10}{'beyond %':>10}{'GB/s':>8}"
            f"{'%copy':>7}{'x floor':>9}{'x 2pass':>9}"
            + "".join(f"{'x ' + b:>11}" for b in BASELINES) + f"{'max err':>10}  note")
    logprobs_head = (f"{'impl':<24}{'fwd ms':>9}{'peak MB':>10}{'GB/s':>8}{'x 1pass':>9}"
                     + "".join(f"{'x ' + b:>17}" for b in LOGPROBS_BASELINES) + f"{'max err':>10}  note")
    # Fused linear: "beyond MB" is the peak without the returned gradients; "% unfused" both
    # peaks as shares of the unfused path's (issue 6 item 4: < 10%); TFLOP/s of 6 N H V.
    linear_head = (f"{'impl':<13}{'fwd ms':>9}{'fwd+bwd ms':>12}{'peak MB':>10}{'beyond MB':>11}{'% unfused':>14}"
                   f"{'TFLOP/s':>10}" + "".join(f"{'x ' + b:>16}" for b in LINEAR_BASELINES) + f"{'max err':>10}  note")
    order = {name: i for i, name in enumerate(ALL)}
    # Each shape's mild block first, then its heavy one.
    rows = sorted(results["rows"], key=lambda r: (case_key(r)[:-1], padding_kind(r) != "mild", case_key(r),
                                                  order.get(r["impl"], 99)))
    for key, group in groupby(rows, key=case_key):
        group = list(group)
        n, v, dtype, beta, level, h, _, unit = key
        r0 = group[0]
        lines.append("")
        if unit == "logprobs":
            lines.append(f"N={n} V={v} {dtype}: token_logprobs forward only (no gradient), {_padding_note(r0)}  "
                         f"(logits {logits_bytes(r0) / 1e9:.3g} GB; one-pass floor {_fmt(r0.get('floor1_ms'), '.3g')} "
                         "ms)")
            lines.append(logprobs_head)
            for r in group:
                speed = r.get("speedup") or {}
                lines.append(
                    f"{r['impl']:<24}{_fmt(r['fwd_ms'], '.3f'):>9}{_fmt(peak_mb(r), '.0f'):>10}"
                    f"{_fmt(r.get('fwd_gbps'), '.4g'):>8}{_fmt(r.get('x_floor1'), '.2f'):>9}"
                    + "".join(f"{_fmt(speed.get(b), '.2f'):>17}" for b in LOGPROBS_BASELINES)
                    + f"{_fmt(r.get('max_err'), '.1e'):>10}  {r.get('note') or ''}")
            continue
        if h:
            lines.append(f"N={n} V={v} H={h} {dtype} beta={beta} {level}-level, fused linear, {_padding_note(r0)}  "
                         f"(B={r0.get('batch')}, T={r0.get('seq_len')}; the logits would be "
                         f"{logits_bytes(r0) / 1e9:.3g} GB; "
                         f"6NHV = {linear_flops(r0) / 1e12:.3g} TFLOP)")
            lines.append(linear_head)
            for r in group:
                speed = r.get("speedup") or {}
                share = (f"{_fmt(r.get('peak_vs_unfused'), '.1%')}/{_fmt(r.get('beyond_grad_vs_unfused'), '.1%')}"
                         if r.get("peak_vs_unfused") is not None else "-")
                lines.append(
                    f"{r['impl']:<13}{_fmt(r['fwd_ms'], '.3f'):>9}{_fmt(r['fwd_bwd_ms'], '.3f'):>12}"
                    f"{_fmt(peak_mb(r), '.0f'):>10}{_fmt(r.get('peak_beyond_grad_mb'), '.0f'):>11}{share:>14}"
                    f"{_fmt(r.get('tflops'), '.3g'):>10}"
                    + "".join(f"{_fmt(speed.get(b), '.2f'):>16}" for b in LINEAR_BASELINES)
                    + f"{_fmt(r.get('max_err'), '.1e'):>10}  {r.get('note') or ''}")
            continue
        lines.append(f"N={n} V={v} {dtype} beta={beta} {level}-level, {_padding_note(r0)}  "
                     f"(B={r0.get('batch')}, T={r0.get('seq_len')}; "
                     f"logits {logits_bytes(r0) / 1e9:.3g} GB; three-pass floor {_fmt(r0.get('floor_ms'), '.3g')} ms)")
        lines.append(head)
        for r in group:
            speed = r.get("speedup") or {}
            lines.append(
                f"{r['impl']:<14}{r.get('call') or 'bare':<14}{_fmt(r['fwd_ms'], '.3f'):>9}"
                f"{_fmt(r['fwd_bwd_ms'], '.3f'):>12}"
                f"{_fmt(peak_mb(r), '.0f'):>10}{_fmt(r.get('pct_of_logits'), '.2g'):>10}"
                f"{_fmt(r.get('gbps'), '.4g'):>8}{_fmt(r.get('pct_copy'), '.3g'):>7}"
                f"{_fmt(r.get('x_floor'), '.2f'):>9}{_fmt(r.get('x_floor2'), '.2f'):>9}"
                + "".join(f"{_fmt(speed.get(b), '.2f'):>11}" for b in BASELINES)
                + f"{_fmt(r.get('max_err'), '.1e'):>10}  {r.get('note') or ''}")
    if results.get("skipped_impls"):
        lines.append("")
        lines.extend(f"not run: {name}: {why}" for name, why in results["skipped_impls"].items())
    if results.get("skipped_cases"):
        lines.append(f"not run (time budget): {len(results['skipped_cases'])} case(s)")
    return "\n".join(lines)


def peak_mb(row: dict) -> float | None:
    """The row's peak memory: the allocator's (GPU) or the resident set's growth (CPU)."""
    return row["peak_extra_mb"] if row.get("peak_extra_mb") is not None else row.get("peak_rss_mb")


def _case_label(row: dict) -> str:
    unit = unit_of(row)
    label = f"{row['n_tokens']}x{row['vocab']}" + (f"xH{row['hidden']}" if row.get("hidden") else "")
    label += f" {'bf16' if row['dtype'] == 'bfloat16' else row['dtype']}"
    if unit == "logprobs":
        return label + " logprobs"
    label += f" b{row['beta']:g} {'gspo' if row['level'] == 'sequence' else 'tok'}"
    return label + (" heavy" if padding_kind(row) == "heavy" else "") + (" linear" if unit == "linear" else "")


def summary(results: dict) -> str:
    """The run in a few dozen lines, for the end of a log: the ceilings, then one line per row
    in the order measured (ms; x2/x1: the two-pass floor, or the one-pass floor for a forward
    row; TF/s for fused linear), then what was not run or not finished."""
    lines = [f"SUMMARY {results.get('device')}  commit {str(results.get('commit'))[:12]}  {results.get('date')}  "
             f"torch {results.get('torch')}  triton {results.get('triton')}  plan {results.get('plan', '-')}  "
             f"complete {results.get('complete')}  restarts {results.get('restarts', 0)}",
             f"copy {results.get('copy_gbps')} GB/s ({(results.get('copy_bytes') or 0) / 1e9:.2g} GB read + written)"
             f"  full-output API {results.get('full_output_api', '-')}"]
    for g in results.get("gemm") or []:
        lines.append(f"{g['name']:<14} {g['n_tokens']}x{g['hidden']}x{g['vocab']} {g.get('out_dtype', '')} out: "
                     + (f"{g['ms']:.3f} ms  {g['tflops']} TFLOP/s  err vs fp64 {g.get('rel_err_fp64_corner')}"
                        if g.get("ms") is not None else f"not measured: {str(g.get('error'))[:100]}"))
    lines.append(f"{'case':<32} {'impl':<21} {'call':<13} {'fwd':>8} {'fwd+bwd':>8} {'x2/x1':>6} {'TF/s':>5} "
                 f"{'peakMB':>7} {'err':>7} {'sync':>4} {'krn':>4}  note")
    for r in results.get("rows", []):
        unit = unit_of(r)
        ratio = r.get("x_floor1") if unit == "logprobs" else r.get("x_floor2")
        kernels, syncs = r.get("kernels") or {}, r.get("host_syncs") or {}
        lines.append(f"{_case_label(r):<32} {r['impl']:<21} {r.get('call') or 'bare':<13} "
                     f"{_fmt(r['fwd_ms'], '.4g'):>8} {_fmt(r['fwd_bwd_ms'], '.4g'):>8} {_fmt(ratio, '.3g'):>6} "
                     f"{_fmt(r.get('tflops'), '.0f'):>5} {_fmt(peak_mb(r), '.0f'):>7} "
                     f"{_fmt(r.get('max_err'), '.1e'):>7} {_fmt(syncs.get('count'), 'd'):>4} "
                     f"{_fmt(kernels.get('launches'), 'd'):>4}  {(r.get('note') or '')[:110]}")
    if results.get("not_started"):
        lines.append(f"not started ({len(results['not_started'])}): " + "; ".join(results["not_started"][:12])
                     + (" ..." if len(results["not_started"]) > 12 else ""))
    if results.get("skipped_impls"):
        lines.append("not available: " + "; ".join(f"{k}: {v}" for k, v in results["skipped_impls"].items()))
    return "\n".join(lines)


def settle_in_flight(results: dict, reason: str) -> None:
    """Record what was in flight when its process died or was killed (bench/run.py's
    `in_flight`): the rows it would have written, with `reason` as their note; for a profiling
    phase, `reason` added to the row already written. Then no longer in flight."""
    flight = results.get("in_flight")
    if not flight:
        return
    results["in_flight"] = None
    if flight.get("phase") == "profile" and flight.get("row_index") is not None:
        row = results["rows"][flight["row_index"]]
        row["kernels"] = {"error": f"profiling: {reason}"}
        return
    what = {"setup": "inputs and oracle", "gemm": "GEMM baseline"}.get(flight.get("phase"), "measurement")
    elapsed = time.time() - flight.get("started", time.time())
    for row in flight.get("rows", []):
        row = dict(row)
        row["note"] = f"not measured: {what} {reason} ({elapsed:.0f} s after it started)"
        results["rows"].append(row)
    if flight.get("phase") == "gemm":
        results["gemm"] = [{"name": "gemm", "n_tokens": 0, "hidden": 0, "vocab": 0, "error": f"{what} {reason}"}]


def finalize(results: dict) -> None:
    """Which planned (step, implementation) pairs have no row (`not_started`, and
    `skipped_cases` for the steps with none at all), and whether the run is complete."""
    done = {(r.get("step"), r["impl"]) for r in results.get("rows", [])}
    not_started, skipped = [], []
    for step in results.get("steps", []):
        missing = [n for n in step["impls"] if (step["step"], n) not in done]
        not_started += [f"step {step['step']} {n}" for n in missing]
        if missing and len(missing) == len(step["impls"]):
            skipped.append(step["case"])
    results["not_started"] = not_started
    results["skipped_cases"] = skipped
    results["complete"] = not not_started and not results.get("in_flight")




def write_json(results: dict, path: Path) -> None:
    """Atomically: a run cut short by a time limit leaves the last complete file, never half of one."""
    missing = [k for k in SPEC_TOP_KEYS if k not in results] + sorted(
        {k for r in results["rows"] for k in SPEC_ROW_KEYS if k not in r})
    if missing:
        raise ValueError(f"results lack the keys {missing} of SPEC section 5")
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(results, indent=1, allow_nan=False) + "\n")
    os.replace(tmp, path)


def _plot_slice(rows: list[dict]) -> dict:
    """The (dtype, beta, level) the plot shows: the full objective (largest beta) at token
    level, in bf16 where it was measured: the setting of SPEC section 4. Mild padding where
    the run has it: the heavy cases are one shape each, in the table and the JSON."""
    kinds = {padding_kind(r) for r in rows}
    kind = "mild" if "mild" in kinds else sorted(kinds)[0]
    rows = [r for r in rows if padding_kind(r) == kind]
    dtypes = {r["dtype"] for r in rows}
    return {"dtype": "bfloat16" if "bfloat16" in dtypes else sorted(dtypes)[0],
            "beta": max(r["beta"] for r in rows),
            "level": "token" if any(r["level"] == "token" for r in rows) else rows[0]["level"],
            "padding_kind": kind}


def _in_slice(row: dict, sl: dict) -> bool:
    return all((padding_kind(row) if k == "padding_kind" else row[k]) == v for k, v in sl.items())


def plot(results: dict, path: Path) -> None:
    """Forward+backward time and peak extra memory against V, one line per implementation,
    one row of panels per token count; then, where the run has fused-linear rows, one row of
    bars: their time and peak memory (solid: beyond the gradients) per token count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in results["rows"] if r["fwd_bwd_ms"] is not None] or results["rows"]
    rows = [r for r in timed if unit_of(r) == "logits"]
    linear = [r for r in timed if is_linear(r)]
    titles = []
    if rows:
        sl = _plot_slice(rows)
        rows = [r for r in rows if _in_slice(r, sl)]
        titles.append(f"{sl['dtype']}, beta = {sl['beta']}, {sl['level']}-level, DAPO loss, "
                      f"{sl['padding_kind']} padding")
    if linear:
        sl_linear = _plot_slice(linear)
        linear = [r for r in linear if _in_slice(r, sl_linear)]
        titles.append(f"fused linear (H = {linear[0]['hidden']}, V = {linear[0]['vocab']}): {sl_linear['dtype']}, "
                      f"beta = {sl_linear['beta']}, {sl_linear['level']}-level, {sl_linear['padding_kind']} padding")
    token_counts = sorted({r["n_tokens"] for r in rows}) or ([] if linear else [0])
    n_panels = len(token_counts) + bool(linear)
    fig, axes = plt.subplots(n_panels, 2, figsize=(11, 3.6 * n_panels), squeeze=False)
    # One colour per implementation in every panel (the tab10 cycle, then black).
    colour = {name: f"C{i}" if i < 10 else "black" for i, name in enumerate(ALL)}
    for (ax_t, ax_m), n in zip(axes, token_counts, strict=False):
        for name in ALL:
            style = dict(marker="o", label=name, color=colour[name])
            pts = sorted((r["vocab"], r["fwd_bwd_ms"], r["peak_extra_mb"]) for r in rows
                         if r["impl"] == name and r["n_tokens"] == n)
            if not pts:
                continue
            vs = [p[0] for p in pts]
            ax_t.plot(vs, [p[1] for p in pts], **style)
            if any(p[2] is not None for p in pts):
                ax_m.plot(vs, [p[2] for p in pts], **style)
        floors = sorted({(r["vocab"], r["floor_ms"]) for r in rows if r["n_tokens"] == n and r.get("floor_ms")})
        if floors:
            ax_t.plot([f[0] for f in floors], [f[1] for f in floors], "k--", lw=1, label="three-pass floor")
        ax_t.set(xlabel="vocabulary V", ylabel="forward+backward ms (median)", title=f"time, N = {n} tokens")
        ax_t.set_yscale("log")
        ax_m.set(xlabel="vocabulary V", ylabel="peak memory above inputs, MB", title=f"memory, N = {n} tokens")
        if not ax_m.lines:
            ax_m.text(0.5, 0.5, "not measured on the CPU", ha="center", va="center", transform=ax_m.transAxes)
        for ax in (ax_t, ax_m):
            ax.grid(True, alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=8)
    if linear:
        _plot_linear(axes[-1], linear, colour)
    label = "CPU measurement (not a GPU figure)" if results.get("mode") == "cpu" else "GPU measurement"
    fig.suptitle(f"{label}: {results['device']}, {results['date']}, commit {results['commit'][:10]}\n"
                 + "; ".join(titles), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_linear(axes, rows: list[dict], colour: dict[str, str]) -> None:
    """Bars of the fused-linear rows: forward+backward time and peak memory, grouped by N."""
    ax_t, ax_m = axes
    token_counts = sorted({r["n_tokens"] for r in rows})
    names = [n for n in ALL if any(r["impl"] == n for r in rows)]
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        mine = {r["n_tokens"]: r for r in rows if r["impl"] == name}
        xs = [j + (i - (len(names) - 1) / 2) * width for j, n in enumerate(token_counts) if n in mine]
        ns = [n for n in token_counts if n in mine]
        ax_t.bar(xs, [mine[n]["fwd_bwd_ms"] or 0 for n in ns], width, label=name, color=colour[name])
        peaks = [mine[n]["peak_extra_mb"] for n in ns]
        if any(p is not None for p in peaks):
            ax_m.bar(xs, [p or 0 for p in peaks], width, color=colour[name], alpha=0.35)
            ax_m.bar(xs, [mine[n].get("peak_beyond_grad_mb") or 0 for n in ns], width, label=name,
                     color=colour[name])
    for ax in (ax_t, ax_m):
        ax.set_xticks(range(len(token_counts)), [f"N = {n}" for n in token_counts])
        ax.grid(True, axis="y", alpha=0.3)
    ax_t.set(ylabel="forward+backward ms (median)", title="fused linear: time")
    ax_m.set(ylabel="peak memory above inputs, MB",
             title="fused linear: memory (pale: with gradients)")
    if ax_t.patches:
        ax_t.legend(fontsize=8)
    if ax_m.patches:
        ax_m.legend(fontsize=8)
    else:
        ax_m.text(0.5, 0.5, "not measured on the CPU", ha="center", va="center", transform=ax_m.transAxes)


def summarize_errors(rows: Iterable[dict]) -> list[str]:
    """One line per row that was not timed, for the end of the run."""
    lines = []
    for r in rows:
        if r["fwd_ms" if unit_of(r) == "logprobs" else "fwd_bwd_ms"] is None:
            shape = f"N={r['n_tokens']} V={r['vocab']}" + (f" H={r['hidden']}" if is_linear(r) else "")
            pad = "" if padding_kind(r) == "mild" else f" {padding_kind(r)} padding"
            lines.append(f"{r['impl']} at {shape} {r['dtype']} beta={r['beta']} {r['level']}{pad}: {r['note']}")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.report", description="Print a results file's table and "
                                 "summary (and optionally plot it).")
    ap.add_argument("json", type=Path)
    ap.add_argument("--plot", type=Path, help="write the PNG here")
    ap.add_argument("--copy-to", type=Path, help="also copy the JSON (and PNG) here as <device>-<date>.json")
    ap.add_argument("--no-table", action="store_true", help="the compact summary only")
    args = ap.parse_args(argv)
    results = json.loads(args.json.read_text())
    derive(results.get("rows", []), results["copy_gbps"])
    if args.plot:
        try:
            plot(results, args.plot)
        except Exception as exc:  # noqa: BLE001 - the table matters more than the plot
            print(f"plot failed: {type(exc).__name__}: {exc}")
    if args.copy_to and results.get("file_stem"):
        args.copy_to.mkdir(parents=True, exist_ok=True)
        write_json(results, args.copy_to / f"{results['file_stem']}.json")
        if args.plot and args.plot.is_file():
            (args.copy_to / f"{results['file_stem']}.png").write_bytes(args.plot.read_bytes())
    if not args.no_table:
        print(table(results))
        print()
    print(summary(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
