"""Benchmark harness for grpo_kernels: `python -m bench.run` (see bench/NOTES.md).

Modules, in the order data flows through them:
  problem   one benchmark shape: realistic random inputs, the float64 oracle, the error check
  impls     the implementations compared (eager, compile, liger, trl, ours-*), one signature
  measure   timing (triton.testing.do_bench on GPU, a perf-counter loop on CPU), peak memory,
            copy bandwidth, and the facts about the machine that a result must carry
  probe     per-kernel device time and host syncs of one call; the cuBLAS GEMM ceiling
  names     the implementations' names, units and calls (no torch: report reads them)
  report    the stdout table, the compact summary, the JSON of SPEC section 5 and the PNG plot
  run       the command line: the plan of cases, validate-then-time, write as it goes
  supervise runs `run` in a child process, kills what hangs, resumes (gpu_validate_and_time.sh)
"""
