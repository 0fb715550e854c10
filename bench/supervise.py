"""python -m bench.supervise: run bench.run in a child process that nothing can hang.

    python -m bench.supervise --json OUT/results.json --deadline-s 200 -- --out OUT [bench.run options]

The child (python -m bench.run --json ... --resume --deadline ...) writes its results file
after every row and records, before each implementation, the phase in flight and its time
limit (bench/run.py's IMPL_LIMIT_S). This process polls that file; when the phase in flight
runs past its limit (a kernel that spins forever, a compile that never ends) or the run past
its deadline, it kills the child's process group, records the lost rows with the reason
(report.settle_in_flight), and, while time is left, starts a new child with --resume, which
skips everything already in the file. A child that dies by itself (a crash, or exit status 3:
the CUDA context broke) is restarted the same way. It imports neither torch nor the kernels,
so it cannot be hung by them.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from . import report

POLL_S = 0.5
# No child is started with less time than this left: its imports and CUDA start-up alone take
# several seconds, and then it would be killed before it measured anything.
MIN_START_S = 15.0
# Restarts in a row that add no row before the supervisor gives up (a child that cannot start).
MAX_FRUITLESS = 2
DEADLINE = "was still running at the run's deadline: killed"


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # not written yet (the child writes it atomically, so never half)


def _kill(child: subprocess.Popen) -> None:
    """SIGKILL to the child's process group (the child and anything it started)."""
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    child.wait()


def supervise(json_path: Path, deadline: float, child_args: list[str], python: str = sys.executable) -> int:
    """Run, watch, kill and restart bench.run until it finishes or the deadline passes; then
    finalize the results file. Returns 0 when the plan completed, 1 otherwise (the file then
    says what is missing), 2 when no results file was ever written."""
    fruitless, started_children = 0, 0
    while True:
        left = deadline - time.time()
        if left < MIN_START_S:
            print(f"supervise: {left:.0f} s left, no new child", flush=True)
            break
        before = _read(json_path)
        rows_before = len(before["rows"]) if before else 0
        cmd = [python, "-m", "bench.run", "--json", str(json_path), "--deadline", f"{deadline:.3f}",
               *(["--resume"] if before is not None else []), *child_args]
        print(f"supervise: starting {' '.join(cmd[2:])} ({left:.0f} s left)", flush=True)
        child = subprocess.Popen(cmd, start_new_session=True)
        started_children += 1
        reason = None
        while True:
            try:
                rc = child.wait(timeout=POLL_S)
                break
            except subprocess.TimeoutExpired:
                pass
            now = time.time()
            flight = (_read(json_path) or {}).get("in_flight")
            if now > deadline:
                reason = DEADLINE
            elif flight and now - flight.get("started", now) > flight.get("limit_s", float("inf")):
                reason = f"ran past its limit of {flight['limit_s']:.0f} s (hung or too slow): killed"
            if reason:
                print(f"supervise: {reason}: {flight and flight.get('phase')} of step {flight and flight.get('step')}",
                      flush=True)
                _kill(child)
                rc = child.returncode
                break
        results = _read(json_path)
        if results is None:
            print(f"supervise: the child exited ({rc}) without writing {json_path}", flush=True)
            fruitless += 1
            if fruitless > MAX_FRUITLESS:
                return 2
            continue
        if results.get("in_flight"):
            report.settle_in_flight(results, reason or f"crashed (the process ended with status {rc})")
            report.write_json(results, json_path)
        if rc == 0 and reason is None:
            break  # it finished its plan, or stopped at the deadline by itself
        if reason == DEADLINE:
            break
        fruitless = fruitless + 1 if len(results["rows"]) == rows_before else 0
        if fruitless > MAX_FRUITLESS:
            print("supervise: restarts add no rows; giving up", flush=True)
            break
    results = _read(json_path)
    if results is None:
        return 2
    report.finalize(results)
    results["supervised_children"] = started_children
    report.write_json(results, json_path)
    return 0 if results["complete"] else 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    child_args = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(prog="python -m bench.supervise", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, required=True, help="the results file bench.run writes and resumes")
    ap.add_argument("--deadline-s", type=float, required=True, help="seconds from now after which nothing runs")
    ap.add_argument("--fresh", action="store_true", help="remove an existing results file first")
    args = ap.parse_args(own)
    if args.fresh and args.json.exists():
        args.json.unlink()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    return supervise(args.json, time.time() + args.deadline_s, child_args)


if __name__ == "__main__":
    sys.exit(main())
