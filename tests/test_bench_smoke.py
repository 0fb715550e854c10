"""The benchmark harness keeps working: `python -m bench.run --smoke` on the CPU writes the
results file of SPEC section 5 and the plot, and its float64 oracle is reference.grpo_loss.

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
IMPLS = {"eager", "compile", "liger", "trl", "ours-triton", "ours-cuda", "ours-torch"}


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
    assert results["mode"] == "cpu" and results["complete"] is True
    assert isinstance(results["copy_gbps"], float) and results["copy_gbps"] > 0
    assert results["commit"]
    rows = results["rows"]
    assert rows
    for row in rows:
        assert SPEC_ROW_KEYS <= row.keys()
        assert row["impl"] in IMPLS
        assert row["dtype"] in ("float32", "bfloat16") and row["level"] in ("token", "sequence")
        assert row["peak_extra_mb"] is None  # no allocator counter on the CPU
        assert row["mode"] == "cpu"
    # On the CPU the harness compares eager PyTorch with our chunked path, and both are right.
    assert {r["impl"] for r in rows} == {"eager", "ours-torch"}
    for row in rows:
        assert row["max_err"] is not None and row["max_err"] <= row["tolerance"], row
        assert row["fwd_ms"] > 0 and row["fwd_bwd_ms"] > 0
        assert math.isclose(row["gbps"] * row["fwd_bwd_ms"] / 1e3,
                            3 * row["n_tokens"] * row["vocab"] * (4 if row["dtype"] == "float32" else 2) / 1e9,
                            rel_tol=1e-2)


def test_plot_and_table(smoke_run):
    _, json_path, stdout = smoke_run
    png = json_path.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "CPU figures" in stdout and "ours-torch" in stdout


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_oracle_is_the_float64_reference(level, dtype):
    """The harness's sampled-row oracle gives reference.grpo_loss's loss and gradient."""
    from bench.problem import Case, make_problem, oracle

    p = make_problem(Case(48, 300, dtype, 0.04, level, 12), torch.device("cpu"), seed=3)
    o = oracle(p, n_rows=20)
    logits = p.logits.double().requires_grad_(True)
    loss, _ = reference.grpo_loss(logits, p.ids, p.advantages.double(), p.mask, p.old.double(), p.ref.double(),
                                  **p.case.options)
    (grad,) = torch.autograd.grad(loss, logits)
    assert o.loss == pytest.approx(loss.item(), rel=1e-12, abs=1e-15)
    assert len(o.rows[0]) + o.near_clip_bound == 20
    torch.testing.assert_close(o.grad, grad[o.rows], rtol=1e-10, atol=1e-14)


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
