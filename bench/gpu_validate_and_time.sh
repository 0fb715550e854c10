#!/usr/bin/env bash
# The one command a session with a GPU runs: validate, then time, all in one call of the
# device tool (which stops a command at 600 s). From this repository's root, after
# `bash bench/fetch_wheels.sh` here:
#
#   run(command="GRPO_BENCH_COMMIT=<sha> bash bench/gpu_validate_and_time.sh",
#       carry=[".whl"], timeout_s=600)
#
# GRPO_BENCH_COMMIT names the commit that ran, for a tree copied without its .git.
# BENCH_ARGS passes options to bench.run (e.g. "--quick", or "--unit linear" for the fused-linear
# cases alone, which otherwise run right after the logits work unit); GPU_SKIP_TESTS=1 gives a second
# call's whole time to the benchmark once the suite has passed. Everything it writes lands in
# $OUT (bench/results when run by hand): env.txt, tests.log, bench.log and the results
# JSON and PNG, which then belong in bench/results/ with the commit that measured them.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
LIMIT_S=${GPU_LIMIT_S:-570}           # inside the tool's 600 s, with time to write the files
TEST_LIMIT_S=${GPU_TEST_LIMIT_S:-200}
START=$SECONDS
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET                # compiled kernels only, never Triton's interpreter

# 1. The wheels brought along (Liger-Kernel, TRL, datasets), beside the image's packages.
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
else
    echo "no .whl/: liger and trl will be reported as not importable (see bench/fetch_wheels.sh)"
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}   # grpo_kernels from this tree: no install step

# 2. What it runs on.
{
    nvidia-smi
    "$PY" -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton",
triton.__version__, torch.cuda.get_device_name())'
    "$PY" -m pip list 2>/dev/null | grep -i -E '^(torch|triton|trl|liger|transformers|datasets|accelerate) '
    echo "commit ${GRPO_BENCH_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# 3. The test suite on the compiled kernels: tests/conftest.py turns the interpreter on
#    unless GRPO_TEST_NATIVE=1.
if [ "${GPU_SKIP_TESTS:-0}" = 1 ]; then
    TEST_RC=0
else
    # The kernels' tests (the interpreter-only launch counts, the multi-process, packaging and
    # trainer tests stay on the CPU): sweeps, fused loss, packed rows, the Triton loss, fused
    # linear, hostile cases and the CUDA C++ backend.
    GRPO_TEST_NATIVE=1 timeout "$TEST_LIMIT_S" "$PY" -m pytest -q -p no:cacheprovider tests/test_sweep.py \
        tests/test_fused_loss.py tests/test_packed.py tests/test_loss_triton.py tests/test_linear.py \
        tests/test_hostile.py tests/test_cuda_backend.py 2>&1 | tee "$OUT/tests.log"
    TEST_RC=${PIPESTATUS[0]}
fi

# 4. The benchmark in the time left. It validates every implementation at every shape
#    against the float64 reference before timing it, starts no case after --budget-s,
#    and rewrites its JSON after each case, so a cut-off run keeps what it measured.
LEFT=$(( LIMIT_S - (SECONDS - START) ))
BUDGET=$(( LEFT > 150 ? LEFT - 90 : 60 ))      # 90 s for the case in flight, the table and the plot
timeout "$LEFT" "$PY" -m bench.run --out "$OUT" --budget-s "$BUDGET" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"
BENCH_RC=${PIPESTATUS[0]}

if [ "$OUT" != bench/results ]; then
    cp "$OUT"/*.json "$OUT"/*.png bench/results/ 2>/dev/null || true
fi
echo "tests exit $TEST_RC, bench exit $BENCH_RC, $(( SECONDS - START )) s"
exit $(( TEST_RC != 0 ? TEST_RC : BENCH_RC ))
