"""The results: derived figures, the stdout table, the JSON of SPEC section 5, the PNG plot.

Rows of the fused-linear unit (issue 6) carry `hidden` (H); their figures are FLOP rates and
ratios to the unfused path, not bandwidths, and they get their own blocks and panels.

Rows carry their case's padding profile (`padding_kind`: "mild" or "heavy", issue 11 item 4)
and the share of the (B, T) rows masked (`padding`). The profile is part of the case: a heavy
row is compared with the heavy rows of its shape only, and gets its own block in the table.
Rows written before profiles existed read as mild."""
from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from itertools import groupby
from pathlib import Path

from .impls import ALL, BASELINES, LINEAR_BASELINES, PEERS

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


def case_key(row: dict) -> tuple:
    return (row["n_tokens"], row["vocab"], row["dtype"], row["beta"], row["level"], row.get("hidden") or 0,
            padding_kind(row))


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
        times = {r["impl"]: r["fwd_bwd_ms"] for r in group if r["fwd_bwd_ms"]}
        for r in group:
            nbytes = logits_bytes(r)
            floor_ms = PASSES * nbytes / (copy_gbps * 1e9) * 1e3
            t, tf = r["fwd_bwd_ms"], r["fwd_ms"]
            r["floor_ms"] = _sig(floor_ms)
            r["gbps"] = _sig(PASSES * nbytes / (t * 1e-3) / 1e9) if t else None
            r["fwd_gbps"] = _sig(nbytes / (tf * 1e-3) / 1e9) if tf else None
            r["pct_copy"] = _sig(100 * PASSES * nbytes / (t * 1e-3) / 1e9 / copy_gbps) if t else None
            r["x_floor"] = _sig(t / floor_ms) if t else None
            r["speedup"] = {b: _sig(times[b] / t) for b in BASELINES if t and b in times and b != r["impl"]}


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
        lines.append(f"*** CPU figures, measured on {results['device']}: they rank the implementations on this "
                     "machine only and say nothing about GPU performance. Peak memory is not measured on the CPU. ***")
    dirty = " (with uncommitted changes)" if results.get("environment", {}).get("dirty") else ""
    lines.append(f"device {results['device']}  commit {results['commit'][:12]}{dirty}"
                 f"  date {results['date']}  torch {results['torch']}  triton {results['triton']}"
                 f"  copy bandwidth {results['copy_gbps']:.1f} GB/s")
    # "beyond %": peak memory beyond the logits' gradient, in % of the logits (SPEC section 4: < 1%).
    head = (f"{'impl':<12}{'fwd ms':>9}{'fwd+bwd ms':>12}{'peak MB':>10}{'beyond %':>10}{'GB/s':>8}{'%copy':>7}"
            f"{'x floor':>9}"
            + "".join(f"{'x ' + b:>11}" for b in BASELINES) + f"{'max err':>10}  note")
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
        n, v, dtype, beta, level, h, _ = key
        r0 = group[0]
        lines.append("")
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
                    f"{_fmt(r['peak_extra_mb'], '.0f'):>10}{_fmt(r.get('peak_beyond_grad_mb'), '.0f'):>11}{share:>14}"
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
                f"{r['impl']:<12}{_fmt(r['fwd_ms'], '.3f'):>9}{_fmt(r['fwd_bwd_ms'], '.3f'):>12}"
                f"{_fmt(r['peak_extra_mb'], '.0f'):>10}{_fmt(r.get('pct_of_logits'), '.2g'):>10}"
                f"{_fmt(r.get('gbps'), '.4g'):>8}{_fmt(r.get('pct_copy'), '.3g'):>7}"
                f"{_fmt(r.get('x_floor'), '.2f'):>9}"
                + "".join(f"{_fmt(speed.get(b), '.2f'):>11}" for b in BASELINES)
                + f"{_fmt(r.get('max_err'), '.1e'):>10}  {r.get('note') or ''}")
    if results.get("skipped_impls"):
        lines.append("")
        lines.extend(f"not run: {name}: {why}" for name, why in results["skipped_impls"].items())
    if results.get("skipped_cases"):
        lines.append(f"not run (time budget): {len(results['skipped_cases'])} case(s)")
    return "\n".join(lines)


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
    rows = [r for r in timed if not is_linear(r)]
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
        if r["fwd_bwd_ms"] is None:
            shape = f"N={r['n_tokens']} V={r['vocab']}" + (f" H={r['hidden']}" if is_linear(r) else "")
            pad = "" if padding_kind(r) == "mild" else f" {padding_kind(r)} padding"
            lines.append(f"{r['impl']} at {shape} {r['dtype']} beta={r['beta']} {r['level']}{pad}: {r['note']}")
    return lines
