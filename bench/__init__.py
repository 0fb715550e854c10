"""Benchmark harness for grpo_kernels: `python -m bench.run` (see bench/NOTES.md).

Modules, in the order data flows through them:
  problem   one benchmark shape: realistic random inputs, the float64 oracle, the error check
  impls     the implementations compared (eager, compile, liger, trl, ours-*), one signature
  measure   timing (triton.testing.do_bench on GPU, a perf-counter loop on CPU), peak memory,
            copy bandwidth, and the facts about the machine that a result must carry
  report    the stdout table, the JSON of SPEC section 5 and the PNG plot
  run       the command line: the grid of shapes, validate-then-time, write as it goes
"""
