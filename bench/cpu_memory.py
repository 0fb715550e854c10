"""CPU memory of one fwd+bwd: our chunked PyTorch path (backend="torch") beside TRL-style eager.

    python -m bench.cpu_memory                     # the two shapes of issue 18, both implementations
    python -m bench.cpu_memory --impls ours-torch --cases fp32-152k

Each (implementation, case) runs in a fresh Python process, so no figure inherits heap pages
from another: the child builds the bench's problem (bench/problem.py: logits the strided
(B, T, V) view of a (B, T+1, V) buffer, dapo, beta 0.04, mild padding), runs one warm-up
step of the same implementation on a tiny shape (code paths, thread pools, lazy imports),
then measures one fwd+bwd, `torch.autograd.grad(loss, logits)` as the bench's step, with
measure.peak_rss_growth: the peak resident-set growth of the process while the step ran,
the gradient it returns included.

The figures (MB = 1e6 bytes):
  growth        peak RSS growth during the step, the returned gradient included
  beyond grad   growth - the gradient's bytes: what the loss costs besides its result
  x logits      growth / logits bytes. For fp32 (gradient as big as the logits) this is
                issue 18's "peak above the logits, gradient included" (goal <= 1.05)
  x (l+g)       (logits + growth) / (logits + gradient): the process's footprint for the
                step against the least it can be, the logits and their gradient. This is
                the bf16 goal (<= 1.05), where the fp32 chunk of the compute, not the
                gradient, is what can outgrow a small tensor of logits

Measured on CPU AMD EPYC (2 cores), torch 2.13.0+cpu, one thread, 2026-12-04, three fresh
processes a cell (growth MB; x logits / x (l+g)):
  fp32-152k  ours-torch  629.7   1.012 / 1.006   (at cedfb00, before issue 18: 655.5, 1.053 / 1.027)
             eager       1244.6  2.000 / 1.500
  bf16-32k   ours-torch  34.0    1.037 / 1.019   (at cedfb00: 74.4-88.8, 2.27-2.71 / 1.64-1.85)
             eager       106.6-147.6  3.25-4.50 / 2.13-2.75
ours-torch at a182477. Eager's bf16 figure moves from process to process with the C heap.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

CASES = {  # name: (n_tokens, vocab, dtype); issue 18's two shapes
    "fp32-152k": (1024, 151936, "float32"),
    "bf16-32k": (512, 32000, "bfloat16"),
}
IMPLS = ("ours-torch", "eager")
SEQ_LEN, BETA = 128, 0.04
WARMUP = (128, 1000)  # tokens, vocab of the warm-up step
GOAL = 1.05


def _child(impl_name: str, case_name: str, threads: int) -> dict:
    import torch

    from . import measure
    from .impls import discover
    from .problem import Case, make_problem

    torch.set_num_threads(threads)
    (impl,), _ = discover(torch.device("cpu"), [impl_name])
    n_tokens, vocab, dtype = CASES[case_name]

    def step_of(case: Case):
        p = make_problem(case, torch.device("cpu"))
        # The (B, T, V) view of the problem's own buffer: no second copy of the logits.
        x = p.padded[:, :-1].detach().requires_grad_(True)

        def step():
            (grad,) = torch.autograd.grad(impl.loss(p, x), x)
            return grad

        return p, x, step

    warm = Case(WARMUP[0], WARMUP[1], dtype, BETA, "token", SEQ_LEN)
    _, _, step = step_of(warm)
    step()
    del step
    case = Case(n_tokens, vocab, dtype, BETA, "token", SEQ_LEN)
    p, x, step = step_of(case)
    grad, growth = measure.peak_rss_growth(step)
    logits_mb = case.logits_bytes / measure.MB
    grad_mb = grad.nbytes / measure.MB
    return {"impl": impl_name, "case": case_name, "n_tokens": n_tokens, "vocab": vocab, "dtype": dtype,
            "threads": threads, "logits_mb": round(logits_mb, 1), "grad_mb": round(grad_mb, 1),
            "growth_mb": None if growth is None else round(growth, 1),
            "beyond_grad_mb": None if growth is None else round(growth - grad_mb, 1),
            "x_logits": None if growth is None else round(growth / logits_mb, 3),
            "x_logits_grad": None if growth is None else round((logits_mb + growth) / (logits_mb + grad_mb), 3)}


def run_one(impl: str, case: str, threads: int, timeout: float = 600) -> dict:
    """One measurement in a fresh interpreter (this file's --child mode)."""
    repo = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (str(repo), os.environ.get("PYTHONPATH")))))
    cmd = [sys.executable, "-m", "bench.cpu_memory", "--child", impl, case, "--threads", str(threads)]
    done = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        return {"impl": impl, "case": case, "error": (done.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    head = (f"{'case':<10} {'impl':<11} {'logits MB':>9} {'grad MB':>8} {'growth MB':>9} {'beyond grad':>11} "
            f"{'x logits':>8} {'x (l+g)':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['case']:<10} {r['impl']:<11} error: {r['error']}")
            continue
        lines.append(f"{r['case']:<10} {r['impl']:<11} {r['logits_mb']:>9.1f} {r['grad_mb']:>8.1f} "
                     f"{r['growth_mb']:>9.1f} {r['beyond_grad_mb']:>11.1f} {r['x_logits']:>8.3f} "
                     f"{r['x_logits_grad']:>8.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child", nargs=2, metavar=("IMPL", "CASE"), help=argparse.SUPPRESS)
    ap.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as bench.run on the CPU)")
    ap.add_argument("--repeat", type=int, default=1, help="fresh processes per cell (the table shows each)")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(_child(*args.child, args.threads)))
        return 0
    rows = []
    for case in args.cases:
        for impl in args.impls:
            for _ in range(args.repeat):
                rows.append(run_one(impl, case, args.threads))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(table(rows))
    print(f"goal (issue 18): ours-torch x logits <= {GOAL} on fp32-152k, x (l+g) <= {GOAL} on bf16-32k")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
