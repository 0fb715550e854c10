"""The benchmark harness keeps working: `python -m bench.run --smoke` on the CPU writes the
results file of SPEC section 5 and the plot, for the logits kernels and the fused-linear unit,
and its float64 oracles are reference.grpo_loss (through explicit logits for the linear one).

Not a timed test: the smoke run's figures are not looked at, only their shape.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from grpo_kernels import reference

REPO = Path(__file__).resolve().parent.parent
SPEC_TOP_KEYS = {"device", "commit", "date", "torch", "triton", "copy_gbps", "rows"}
SPEC_ROW_KEYS = {"impl", "n_tokens", "vocab", "dtype", "beta", "level", "fwd_ms", "fwd_bwd_ms", "peak_extra_mb"}
# SPEC section 5's impl names, and those of the fused-linear unit (issue 6; bench/NOTES.md).
IMPLS = {"eager", "compile", "liger", "trl", "ours-triton", "ours-trainer", "ours-cuda", "ours-torch"}
LINEAR_IMPLS = {"ours-linear", "unfused", "liger-linear", "trl-linear"}
# The intended share of masked (B, T) rows of the padding-heavy case (bench/problem.py).
HEAVY_RANGE = (0.40, 0.60)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> tuple[dict, Path, str]:
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run([sys.executable, "-m", "bench.run", "--smoke", "--device", "cpu", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (json_path,) = out.glob("*.json")
    return json.loads(json_path.read_text()), json_path, proc.stdout


def test_results_file_has_the_spec_schema(smoke_run):
    results, json_path, _ = smoke_run
    assert SPEC_TOP_KEYS <= results.keys()
    assert json_path.name.endswith(f"-{results['date']}.json") and json_path.name.startswith("cpu-")
    assert results["mode"] == "cpu" and results["complete"] is True and results["plan"] == "grid"
    assert results["in_flight"] is None and results["not_started"] == [] and results["gemm"] == []
    assert isinstance(results["copy_gbps"], float) and results["copy_gbps"] > 0
    assert results["commit"]
    rows = results["rows"]
    assert rows
    for row in rows:
        assert SPEC_ROW_KEYS <= row.keys()
        assert row["impl"] in (LINEAR_IMPLS if row["hidden"] else IMPLS)
        assert row["unit"] == ("linear" if row["hidden"] else "logits")
        assert row["dtype"] in ("float32", "bfloat16") and row["level"] in ("token", "sequence")
        assert row["peak_extra_mb"] is None  # no allocator counter on the CPU
        assert row["mode"] == "cpu"
        assert row["call"] == ("hidden" if row["hidden"] else "bare") and isinstance(row["step"], int)
        # issue 18 item 3: the CPU figure is the resident set's growth, where measure has it.
        from bench import measure

        if hasattr(measure, "peak_rss_growth"):
            assert row["peak_rss_mb"] is not None
    # On the CPU the harness compares eager PyTorch with our chunked path, and the unfused
    # matmul + logits kernel with our fused-linear path; all are right.
    logits, linear = [r for r in rows if not r["hidden"]], [r for r in rows if r["hidden"]]
    assert {r["impl"] for r in logits} == {"eager", "ours-torch"}
    assert {r["impl"] for r in linear} == {"ours-linear", "unfused"}
    assert {(r["dtype"], r["level"]) for r in linear} == {(d, lv) for d in ("float32", "bfloat16")
                                                          for lv in ("token", "sequence")}
    for row in rows:
        assert row["max_err"] is not None and row["max_err"] <= row["tolerance"], row
        assert row["fwd_ms"] > 0 and row["fwd_bwd_ms"] > 0
    # Every row records its padding: mild loses up to T/8 per row, heavy about half the rows.
    for row in rows:
        assert row["padding_kind"] in ("mild", "heavy")
        lo, hi = (0.0, 1 / 8) if row["padding_kind"] == "mild" else HEAVY_RANGE
        assert lo <= row["padding"] <= hi, row
    # The padding-heavy case is run by every implementation of both units, in both dtypes.
    heavy = [r for r in rows if r["padding_kind"] == "heavy"]
    assert {(r["impl"], r["dtype"], r["level"]) for r in heavy if not r["hidden"]} == {
        (i, d, lv) for i in ("eager", "ours-torch") for d in ("float32", "bfloat16") for lv in ("token", "sequence")}
    assert {(r["impl"], r["dtype"]) for r in heavy if r["hidden"]} == {
        (i, d) for i in ("ours-linear", "unfused") for d in ("float32", "bfloat16")}
    # Each heavy row's speed-up is over the eager row of the same heavy case, not the mild one.
    for row in heavy:
        if row["impl"] == "ours-torch":
            (eager,) = [r for r in heavy if r["impl"] == "eager" and r["dtype"] == row["dtype"]
                        and r["level"] == row["level"]]
            assert row["speedup"]["eager"] == pytest.approx(eager["fwd_bwd_ms"] / row["fwd_bwd_ms"], rel=1e-3)
    assert results["padding_profiles"].keys() == {"mild", "heavy"}
    for row in logits:
        assert math.isclose(row["gbps"] * row["fwd_bwd_ms"] / 1e3,
                            3 * row["n_tokens"] * row["vocab"] * (4 if row["dtype"] == "float32" else 2) / 1e9,
                            rel_tol=1e-2)
    for row in linear:
        assert row["grad_hidden_err"] <= row["tolerance"] and row["grad_weight_err"] <= row["tolerance"]
        assert math.isclose(row["tflops"] * 1e12 * row["fwd_bwd_ms"] / 1e3,
                            6 * row["n_tokens"] * row["hidden"] * row["vocab"], rel_tol=1e-2)
        # Ours keeps the logits in fp32: its bf16 error is the rounding of the gradients alone.
        if row["impl"] == "ours-linear":
            assert row["max_err"] <= (1e-5 if row["dtype"] == "float32" else 1e-2), row


def test_plot_and_table(smoke_run):
    _, json_path, stdout = smoke_run
    png = json_path.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "CPU figures" in stdout and "ours-torch" in stdout
    assert "fused linear" in stdout and "ours-linear" in stdout and "unfused" in stdout
    assert "padding heavy (" in stdout and "padding mild (" in stdout


@pytest.mark.parametrize("padding", ["mild", "heavy"])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_oracle_is_the_float64_reference(level, dtype, padding):
    """The harness's sampled-row oracle gives reference.grpo_loss's loss and gradient."""
    from bench.problem import Case, make_problem, oracle

    p = make_problem(Case(48, 300, dtype, 0.04, level, 12, padding=padding), torch.device("cpu"), seed=3)
    o = oracle(p, n_rows=20)
    logits = p.logits.double().requires_grad_(True)
    loss, _ = reference.grpo_loss(logits, p.ids, p.advantages.double(), p.mask, p.old.double(), p.ref.double(),
                                  **p.case.options)
    (grad,) = torch.autograd.grad(loss, logits)
    assert o.loss == pytest.approx(loss.item(), rel=1e-12, abs=1e-15)
    assert len(o.rows[0]) + o.near_clip_bound == 20
    torch.testing.assert_close(o.grad, grad[o.rows], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("padding", ["mild", "heavy"])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_linear_oracle_is_the_float64_reference(level, dtype, padding):
    """The fused-linear oracle gives reference.grpo_loss's loss and gradients through the
    explicit float64 logits hidden @ weight.T, and no ratio is left near a clip bound."""
    from bench import problem
    from bench.problem import LinearCase, linear_oracle, make_linear_problem

    case = LinearCase(48, 300, dtype, 0.04, level, 12, 16, padding=padding)
    p = make_linear_problem(case, torch.device("cpu"), seed=3)
    o = linear_oracle(p)
    hidden = p.hidden.double().requires_grad_(True)
    weight = p.weight.double().requires_grad_(True)
    loss, metrics = reference.grpo_loss(hidden @ weight.T, p.ids, p.advantages.double(), p.mask, p.old.double(),
                                        p.ref.double(), **case.options)
    grad_hidden, grad_weight = torch.autograd.grad(loss, (hidden, weight))
    assert o.loss == pytest.approx(loss.item(), rel=1e-12, abs=1e-15)
    torch.testing.assert_close(o.grad_hidden, grad_hidden, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(o.grad_weight, grad_weight, rtol=1e-10, atol=1e-14)

    # Every (token or sequence) log-ratio is at least the margin floor away from each bound.
    log_ratio = metrics["logprobs"].double() - p.old.double()
    mask = p.mask.double()
    if level == "sequence":
        log_ratio = (log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
    else:
        log_ratio = log_ratio[p.mask.bool()]
    for bound in (math.log(0.8), math.log(1.28)):
        assert (log_ratio - bound).abs().min() >= problem.CLIP_MARGIN_FLOOR * 0.999
    loss_err, hidden_err, weight_err = problem.linear_error(o, loss.detach(), grad_hidden, grad_weight)
    assert max(loss_err, hidden_err, weight_err) < 1e-12


def test_report_of_a_gpu_run(tmp_path):
    """The GPU-only parts of the report (memory, peers, a failed row) render without a GPU."""
    from bench import report

    def row(impl, fwd_bwd, peak, note=None):
        return {"impl": impl, "n_tokens": 8192, "vocab": 151936, "dtype": "bfloat16", "beta": 0.04, "level": "token",
                "fwd_ms": None if fwd_bwd is None else fwd_bwd / 3, "fwd_bwd_ms": fwd_bwd, "peak_extra_mb": peak,
                "max_err": 1e-3, "note": note, "mode": "gpu", "batch": 8, "seq_len": 1024}

    results = {"device": "NVIDIA H100 80GB HBM3", "commit": "0" * 40, "date": "2026-01-01", "torch": "2.11.0",
               "triton": "3.6.0", "copy_gbps": 3000.0, "mode": "gpu",
               "rows": [row("eager", 12.0, 7500.0), row("liger", 4.0, 30.0), row("trl", 3.5, 2500.0),
                        row("ours-triton", 2.6, 2495.0), row("compile", None, 5000.0, "FAILED validation")]}
    report.derive(results["rows"], results["copy_gbps"])
    ours = results["rows"][3]
    assert ours["floor_ms"] == pytest.approx(3 * 8192 * 151936 * 2 / 3000e9 * 1e3, rel=1e-3)
    assert ours["speedup"] == {"eager": pytest.approx(12 / 2.6, rel=1e-3), "liger": pytest.approx(4 / 2.6, rel=1e-3),
                               "trl": pytest.approx(3.5 / 2.6, rel=1e-3)}
    text = report.table(results)
    assert "ours-triton" in text and "FAILED validation" in text and "CPU figures" not in text
    report.write_json(results, tmp_path / "r.json")
    report.plot(results, tmp_path / "r.png")
    assert json.loads((tmp_path / "r.json").read_text())["rows"][3]["x_floor"] == pytest.approx(2.6 / 2.489, rel=1e-3)
    assert (tmp_path / "r.png").stat().st_size > 10_000


def test_report_of_a_gpu_run_with_fused_linear_rows(tmp_path):
    """Fused-linear rows get their own figures (TFLOP/s, ratios to unfused) beside logits rows
    of the same N, V, dtype, beta and level, and render in the table and the plot."""
    from bench import report

    def row(impl, fwd_bwd, peak, beyond, hidden=4096, note=None):
        return {"impl": impl, "n_tokens": 8192, "vocab": 151936, "dtype": "bfloat16", "beta": 0.04, "level": "token",
                "fwd_ms": None if fwd_bwd is None else fwd_bwd / 3, "fwd_bwd_ms": fwd_bwd, "peak_extra_mb": peak,
                "peak_beyond_grad_mb": beyond, "hidden": hidden, "unit": "linear" if hidden else "logits",
                "max_err": 1e-3, "note": note, "mode": "gpu", "batch": 8, "seq_len": 1024}

    results = {"device": "NVIDIA H100 80GB HBM3", "commit": "0" * 40, "date": "2026-01-01", "torch": "2.11.0",
               "triton": "3.6.0", "copy_gbps": 3000.0, "mode": "gpu",
               "rows": [row("ours-triton", 2.6, 2495.0, None, hidden=None), row("unfused", 55.0, 6300.0, 5000.0),
                        row("ours-linear", 60.0, 1500.0, 190.0), row("liger-linear", 450.0, 5000.0, 3700.0),
                        row("trl-linear", None, None, None, note="error: x")]}
    report.derive(results["rows"], results["copy_gbps"])
    logits_row, unfused, ours = results["rows"][:3]
    assert logits_row["speedup"] == {} and logits_row["x_floor"] is not None
    assert "x_floor" not in ours and "gbps" not in ours
    assert ours["speedup"] == {"unfused": pytest.approx(55 / 60, rel=1e-3), "liger-linear": pytest.approx(7.5)}
    assert ours["tflops"] == pytest.approx(6 * 8192 * 4096 * 151936 / 60e-3 / 1e12, rel=1e-3)
    assert ours["peak_vs_unfused"] == pytest.approx(1500 / 6300, rel=1e-3)
    assert ours["beyond_grad_vs_unfused"] == pytest.approx(190 / 5000, rel=1e-3)
    assert unfused["peak_vs_unfused"] is None
    text = report.table(results)
    assert "fused linear" in text and "x liger-linear" in text and "ours-triton" in text
    report.write_json(results, tmp_path / "r.json")
    report.plot(results, tmp_path / "r.png")
    assert (tmp_path / "r.png").stat().st_size > 10_000
    assert any("trl-linear at N=8192 V=151936 H=4096" in line for line in report.summarize_errors(results["rows"]))


def test_padding_profiles():
    """Mild padding draws what the harness always drew; heavy padding leaves 40-60% of the
    (B, T) rows masked at the bench's batch sizes, with lengths spread over [T/8, T]; and
    cases built without a profile (as ../shared/tools/traffic/meter.py builds them) are mild."""
    from bench import problem
    from bench.problem import Case, LinearCase, completion_lengths, make_problem, padding_fraction

    cpu = torch.device("cpu")
    for seed in range(20):
        B, T = 4, 16
        gen, old = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        assert torch.equal(completion_lengths("mild", B, T, gen, cpu),
                           T - torch.randint(0, T // 8 + 1, (B,), generator=old))
    for B, T in ((4, 16), (4, 128), (8, 64), (16, 1024)):
        for seed in range(50):
            lengths = completion_lengths("heavy", B, T, torch.Generator().manual_seed(seed), cpu)
            assert lengths.dtype == torch.int64 and lengths.shape == (B,)
            assert int(lengths.min()) >= T // 8 and int(lengths.max()) <= T
            share = 1 - float(lengths.sum()) / (B * T)
            assert HEAVY_RANGE[0] <= share <= HEAVY_RANGE[1], (B, T, seed, share)
    # Many rows: the clipped log-normal's expected share, with rows at both clip bounds.
    lengths = completion_lengths("heavy", 4096, 1024, torch.Generator().manual_seed(0), cpu)
    assert 1 - float(lengths.sum()) / (4096 * 1024) == pytest.approx(problem.HEAVY_EXPECTED_PADDING, abs=0.005)
    assert 0.05 < float((lengths == 1024).double().mean()) < 0.2 and float((lengths == 128).double().mean()) > 0.03

    p = make_problem(Case(64, 100, "float32", 0.04, "token", 16, padding="heavy"), cpu, seed=0)
    assert HEAVY_RANGE[0] <= padding_fraction(p.mask) <= HEAVY_RANGE[1]
    assert bool((p.mask[:, 0] == 1).all()) and bool((p.mask.diff(dim=1) <= 0).all())  # ones, then padding

    class MeterLike(Case):  # the meter's subclass: keyword construction, no padding named
        @property
        def options(self):
            return dict(Case.options.fget(self), loss_type="grpo")

    case = MeterLike(n_tokens=32, vocab=64, dtype="float32", beta=0.0, level="token", seq_len=16)
    assert case.padding == "mild" and case.options["loss_type"] == "grpo"
    assert padding_fraction(make_problem(case, cpu, seed=1).mask) <= 1 / 8
    assert LinearCase(48, 300, "float32", 0.04, "token", 12, 16).hidden == 16
    with pytest.raises(ValueError, match="padding"):
        Case(16, 10, "float32", 0.0, "token", 16, padding="extreme")


def test_case_selection():
    """Where the heavy cases sit in each mode's grid, and --padding's filter (no device needed)."""
    from bench import run

    gpu = run.all_cases("gpu", smoke=False, quick=False, unit="all")
    kinds = [(c.unit, c.padding, c.unit == "logits" and (c.n_tokens, c.vocab) in run.WORK_UNIT
              and c.dtype == "bfloat16") for c in gpu]
    heavy_logits = [c for c in gpu if c.padding == "heavy" and c.unit == "logits"]
    assert {(c.n_tokens, c.vocab, c.level) for c in heavy_logits} == {
        (n, v, lv) for n, v in run.WORK_UNIT for lv in run.LEVELS}
    assert all(c.dtype == "bfloat16" for c in heavy_logits)
    # The mild work unit, then the heavy one, then the fused-linear cases (mild, then heavy), then the rest.
    assert kinds[:12] == [("logits", "mild", True)] * 8 + [("logits", "heavy", True)] * 4
    assert kinds[12:15] == [("linear", "mild", False)] * 2 + [("linear", "heavy", False)]
    assert all(k[1] == "mild" for k in kinds[15:])
    quick = run.all_cases("gpu", smoke=False, quick=True, unit="logits")
    assert sum(c.padding == "heavy" for c in quick) == 4
    cpu = run.all_cases("cpu", smoke=False, quick=False, unit="all")
    assert {(c.unit, c.vocab) for c in cpu if c.padding == "heavy"} == {("logits", 8192), ("linear", 4096)}
    assert len(run.all_cases("cpu", smoke=False, quick=False, unit="all", padding="mild")) == 20  # as before
    only = run.all_cases("cpu", smoke=False, quick=False, unit="all", padding="heavy")
    assert only and all(c.padding == "heavy" for c in only)


def test_report_keeps_padding_profiles_apart():
    """Mild and heavy rows of one shape are separate cases in the derived figures and the
    table; rows written before profiles existed read as mild."""
    from bench import report

    def row(impl, ms, kind=None, share=None):
        r = {"impl": impl, "n_tokens": 8192, "vocab": 151936, "dtype": "bfloat16", "beta": 0.04, "level": "token",
             "fwd_ms": ms / 3, "fwd_bwd_ms": ms, "peak_extra_mb": 10.0, "max_err": 1e-3, "note": None,
             "mode": "gpu", "batch": 8, "seq_len": 1024}
        if kind:
            r.update(padding_kind=kind, padding=share)
        return r

    rows = [row("eager", 12.0), row("ours-triton", 3.0), row("eager", 10.0, "heavy", 0.53),
            row("ours-triton", 2.0, "heavy", 0.53)]
    report.derive(rows, 3000.0)
    assert rows[1]["speedup"]["eager"] == pytest.approx(4.0) and rows[3]["speedup"]["eager"] == pytest.approx(5.0)
    results = {"device": "NVIDIA H200", "commit": "0" * 40, "date": "2026-01-01", "torch": "2.11.0",
               "triton": "3.6.0", "copy_gbps": 3000.0, "mode": "gpu", "rows": rows}
    text = report.table(results)
    assert "padding mild" in text and "padding heavy (53.0% of rows masked)" in text


def test_gpu_plan_order():
    """SPEC section 18's rows in the order of the brief: the work unit (ours bare and as a
    trainer calls it, then the peers), GSPO, the forward-only pass, 16,384 tokens, fused linear;
    never the CPU path, compile only when asked for; the rest of the grid after."""
    from bench import run

    plan = run.gpu_plan(smoke=False)
    head = [(s.case.unit, s.case.n_tokens, s.case.level, s.case.beta, s.impls) for s in plan[:7]]
    linear = ("ours-linear", "unfused", "trl-linear", "liger-linear")
    assert head == [
        ("logits", 8192, "token", 0.04, ("ours-triton", "ours-trainer", "ours-2pass", "liger", "trl", "eager")),
        ("logits", 8192, "sequence", 0.04, ("ours-trainer", "liger")),
        ("logprobs", 8192, "token", 0.0, ("ours-logprobs", "ours-logprobs-entropy", "trl-logprobs")),
        ("logits", 16384, "token", 0.0, ("ours-trainer", "ours-2pass", "liger")),
        ("logits", 16384, "token", 0.04, ("ours-trainer", "ours-2pass", "liger")),
        ("linear", 8192, "token", 0.04, linear),
        ("linear", 16384, "token", 0.04, linear)]
    assert all(s.case.vocab == 151936 and s.case.dtype == "bfloat16" for s in plan[:7])
    assert plan[5].case.hidden == 4096
    assert not any(n in ("ours-torch", "ours-cuda", "compile") for s in plan for n in s.impls)
    assert "compile" in run.gpu_plan(smoke=False, with_compile=True)[0].impls
    assert len(plan) > 7 and len({s.case for s in plan}) == len(plan)  # the tail repeats no case
    assert len(run.gpu_plan(smoke=False, tail=False)) == 7


def _supervised(tmp_path, args, env=None, deadline_s=240, timeout=420):
    import os

    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "bench.supervise", "--json", str(out / "results.json"),
                           "--deadline-s", str(deadline_s), "--", "--out", str(out), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})
    results = json.loads((out / "results.json").read_text())
    return proc, results


def test_supervisor_records_a_hang_and_a_crash_and_goes_on(tmp_path):
    """An implementation that hangs is killed at its limit, one that kills its process is
    restarted after; each gets a row saying so, and every other row of the plan is measured."""
    proc, results = _supervised(tmp_path, ["--smoke", "--device", "cpu", "--plan", "grid", "--unit", "logits",
                                           "--padding", "heavy"],
                                env={"BENCH_FAULT": "hang:ours-torch:1,crash:eager:2", "BENCH_LIMIT_SCALE": "0.1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {(r["step"], r["impl"]): r for r in results["rows"]}
    assert set(rows) == {(i, n) for i in range(4) for n in ("eager", "ours-torch")}
    assert "ran past its limit" in rows[(1, "ours-torch")]["note"] and rows[(1, "ours-torch")]["fwd_ms"] is None
    assert "crashed" in rows[(2, "eager")]["note"]
    others = [r for k, r in rows.items() if k not in ((1, "ours-torch"), (2, "eager"))]
    assert all(r["note"] is None and r["fwd_bwd_ms"] > 0 for r in others)
    assert results["complete"] is True and results["restarts"] == 2 and results["supervised_children"] == 3
    assert results["in_flight"] is None


def test_gpu_plan_runs_under_the_interpreter(tmp_path):
    """The GPU plan's code path at tiny shapes, Triton under the interpreter: the GEMM baseline,
    the work unit with ours bare and as a trainer calls it (gradient into the whole output,
    zero at its last position), the forward-only pass; then the report's summary."""
    impls = "ours-triton,ours-trainer,ours-2pass,trl,eager,ours-logprobs,ours-logprobs-entropy,trl-logprobs,liger"
    proc, results = _supervised(tmp_path, ["--smoke", "--device", "cpu", "--plan", "gpu", "--steps", "0,2",
                                           "--impls", impls, "--profile", "on"], env={"TRITON_INTERPRET": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert results["plan"] == "gpu" and results["complete"] is True
    assert [g["name"] for g in results["gemm"]] == ["gemm", "gemm-fp32-out"]
    assert results["gemm"][0]["ms"] > 0 and results["gemm"][0]["rel_err_fp64_corner"] < 1e-2
    rows = {(r["step"], r["impl"]): r for r in results["rows"]}
    assert {k for k in rows if k[0] == 2} == {(2, "ours-logprobs"), (2, "ours-logprobs-entropy"), (2, "trl-logprobs")}
    assert rows[(0, "ours-triton")]["call"] == "bare" and rows[(0, "eager")]["call"] == "trainer-slice"
    assert rows[(0, "ours-trainer")]["call"] in ("trainer", "trainer-slice")
    assert rows[(0, "ours-2pass")]["call"] == rows[(0, "ours-trainer")]["call"]
    for key in ((0, "eager"), (0, "trl"), (2, "ours-logprobs"), (2, "ours-logprobs-entropy"), (2, "trl-logprobs")):
        assert rows[key]["note"] is None and rows[key]["fwd_ms"] > 0 and rows[key]["max_err"] <= rows[key]["tolerance"]
    for key in ((0, "eager"), (0, "trl")):
        assert rows[key]["unscored_grad_zero"] is True and rows[key]["x_floor2"] > 0
    assert rows[(2, "ours-logprobs")]["returns_entropy"] is False
    assert rows[(2, "ours-logprobs-entropy")]["returns_entropy"] is True and rows[(2, "ours-logprobs")]["x_floor1"] > 0
    assert rows[(0, "eager")]["kernels"] == {"error": "no device kernels on the CPU"}
    if "liger" not in results["skipped_impls"]:
        assert rows[(0, "liger")]["call"] == "trainer"
    from bench import report

    text = report.summary(results)
    assert "SUMMARY" in text and "gemm-fp32-out" in text and "trainer-slice" in text and "logprobs" in text
    assert not any("logprobs" in line for line in report.summarize_errors(results["rows"]))


def test_report_cli_and_settle(tmp_path):
    """python -m bench.report prints the table and the summary of a results file; a killed
    phase becomes rows with the reason (or a note on a profiled row); finalize lists what
    never started."""
    from bench import report

    def row(impl, step, ms=None, note=None):
        return {"impl": impl, "n_tokens": 8192, "vocab": 151936, "dtype": "bfloat16", "beta": 0.04, "level": "token",
                "fwd_ms": ms, "fwd_bwd_ms": ms, "peak_extra_mb": 10.0, "max_err": 1e-3, "note": note, "mode": "gpu",
                "batch": 8, "seq_len": 1024, "unit": "logits", "call": "bare", "step": step, "hidden": None}

    results = {"device": "NVIDIA H200", "commit": "0" * 40, "date": "2026-01-01", "torch": "2.11.0",
               "triton": "3.6.0", "copy_gbps": 4000.0, "mode": "gpu", "plan": "gpu", "rows": [row("eager", 0, 8.0)],
               "gemm": [{"name": "gemm", "n_tokens": 8192, "hidden": 4096, "vocab": 151936, "out_dtype": "bfloat16",
                         "ms": 15.0, "tflops": 680.0, "rel_err_fp64_corner": 1e-3}],
               "steps": [{"step": 0, "unit": "logits", "case": {}, "impls": ["eager", "ours-triton", "liger"]},
                         {"step": 1, "unit": "logits", "case": {"n_tokens": 1}, "impls": ["liger"]}],
               "in_flight": {"step": 0, "phase": "measure", "started": 0.0, "limit_s": 60,
                             "rows": [row("ours-triton", 0)], "row_index": None}}
    report.settle_in_flight(results, "ran past its limit of 60 s (hung or too slow): killed")
    assert results["in_flight"] is None and "ran past its limit" in results["rows"][-1]["note"]
    results["in_flight"] = {"step": 0, "phase": "profile", "started": 0.0, "limit_s": 45, "rows": [], "row_index": 0}
    report.settle_in_flight(results, "crashed")
    assert results["rows"][0]["kernels"] == {"error": "profiling: crashed"}
    report.finalize(results)
    assert results["not_started"] == ["step 0 liger", "step 1 liger"] and results["complete"] is False
    assert results["skipped_cases"] == [{"n_tokens": 1}]
    path = tmp_path / "r.json"
    report.derive(results["rows"], results["copy_gbps"])
    report.write_json(results, path)
    proc = subprocess.run([sys.executable, "-m", "bench.report", str(path), "--plot", str(tmp_path / "r.png")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.rstrip().splitlines()[0].startswith("N=8192") or "eager" in proc.stdout
    assert "SUMMARY" in proc.stdout and "not started (2)" in proc.stdout and "680.0 TFLOP/s" in proc.stdout
    assert "x 2pass" in proc.stdout


def test_native_mode_moves_the_tests_tensors():
    """GRPO_TEST_NATIVE=1 (tests/conftest.py): tensors that test code makes without a device go
    to the device (here "meta", which any machine has), requires_grad leaves stay leaves, and
    tensors made by library code, or with a device named, stay where they are made."""
    import conftest
    from bench.problem import completion_lengths

    g = torch.Generator().manual_seed(0)
    with conftest._TestTensorsOn(torch.device("meta")):
        x = torch.randn(2, 3, generator=g)
        leaf = torch.zeros(4, requires_grad=True)
        named = torch.ones(2, device="cpu")
        lengths = completion_lengths("mild", 4, 16, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert x.device.type == "meta" and leaf.device.type == "meta" and leaf.is_leaf and leaf.requires_grad
    assert named.device.type == "cpu" and lengths.device.type == "cpu"
    assert conftest._to_device({"a": [torch.ones(1)], "b": 1}, torch.device("meta"))["a"][0].device.type == "meta"
