"""Vocab-parallel cost on the CPU: 2 gloo ranks (loopback), bytes communicated and extra time.

    python -m bench.tp_cpu [--tokens 512] [--vocab 8192] [--reps 30]

Each rank holds V / 2 columns of fp32 logits (torch backend, one thread per rank, so the two
ranks use the two cores) and times, barrier to barrier, fwd+bwd of fused_grpo_loss
  - on its own shard without tp_group (the same sweep work, no communication), and
  - on its shard with tp_group (the vocab-parallel call),
and, alone, the two forward collectives on (N,) and (4, N) fp32 tensors, and the whole
vocabulary on one rank. The calls are interleaved rep by rep; extra_ms is the median of the
paired differences (with tp_group - without): what tensor parallelism adds, the collectives
plus the (N,)-sized merge arithmetic. Rank 0 prints one JSON line with the commit.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _commit() -> str:
    if os.environ.get("GRPO_BENCH_COMMIT"):  # e.g. when run from an exported tree
        return os.environ["GRPO_BENCH_COMMIT"]
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except Exception:  # noqa: BLE001
        return "unknown"


def _time(fns: dict, reps: int) -> dict:
    """Median ms of each fn() over reps, the fns interleaved rep by rep (so that the load of a
    shared machine drifts over all of them alike), each call started together on every rank;
    plus the median of the paired differences shard_tp - shard_no_tp."""
    for fn in fns.values():
        fn()  # warm-up
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            times[k].append((time.perf_counter() - t0) * 1e3)
    out = {k: statistics.median(v) for k, v in times.items()}
    out["extra"] = statistics.median(a - b for a, b in zip(times["shard_tp"], times["shard_no_tp"]))
    t = torch.tensor(list(out.values()), dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the slowest rank's: what a step waits for
    return dict(zip(out, t.tolist()))


def _worker(rank: int, world: int, init_file: str, args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    import grpo_kernels

    N, V = args.tokens, args.vocab
    V_local = V // world
    g = torch.Generator().manual_seed(0)
    B = 8
    T = N // B
    logits = torch.randn(B, T, V, generator=g) * 2
    ids = torch.randint(0, V, (B, T), generator=g)
    adv = torch.randn(B, generator=g)
    old = torch.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1) + 0.1
    ref = old - 0.05
    mine = logits[..., rank * V_local:(rank + 1) * V_local].contiguous().requires_grad_(True)
    # Without tp_group the ids must lie in the shard: the same sweep work, no communication.
    local_ids = ids % V_local
    opts = dict(loss_type="grpo", beta=0.04, backend="torch")

    def no_tp():
        mine.grad = None
        loss, _ = grpo_kernels.fused_grpo_loss(mine, local_ids, adv, None, old, ref, **opts)
        loss.backward()

    def with_tp():
        mine.grad = None
        loss, _ = grpo_kernels.fused_grpo_loss(mine, ids, adv, None, old, ref, tp_group=dist.group.WORLD, **opts)
        loss.backward()

    m, stacked = torch.randn(N), torch.randn(4, N)

    def collectives():
        dist.all_reduce(m, op=dist.ReduceOp.MAX)
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM)

    full = logits.clone().requires_grad_(True)

    def single_full():
        full.grad = None
        loss, _ = grpo_kernels.fused_grpo_loss(full, ids, adv, None, old, ref, **opts)
        loss.backward()

    res = _time(dict(shard_no_tp=no_tp, shard_tp=with_tp, collectives_only=collectives,
                     full_vocab_one_rank=single_full), args.reps)
    if rank == 0:
        info = dict(machine="CPU", cores=os.cpu_count(), load_average_1min=round(os.getloadavg()[0], 1),
                    commit=_commit(), torch=torch.__version__, ranks=world, threads_per_rank=1,
                    tokens=N, vocab=V, vocab_local=V_local, dtype="float32", backend="torch", reps=args.reps,
                    bytes_per_token_forward=dict(all_reduce_max=4, all_reduce_sum=16, total=20),
                    **{f"{k}_ms": round(v, 3) for k, v in res.items()})
        print(json.dumps(info))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--ranks", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(args.ranks, os.path.join(tmp, "rendezvous"), args), nprocs=args.ranks)


if __name__ == "__main__":
    main()
