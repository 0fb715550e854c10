#!/usr/bin/env bash
# The one command a session with a GPU runs: the kernels' tests on the GPU, then the benchmark,
# every stage time-boxed, the summary table last. From this repository's root, after
# `bash bench/fetch_wheels.sh` here (it fills .whl/, which the GPU machine cannot download):
#
#   run(command="GRPO_BENCH_COMMIT=<sha> GPU_LIMIT_S=330 bash bench/gpu_validate_and_time.sh",
#       carry=[".whl"], timeout_s=<GPU_LIMIT_S + 30>)
#
# Stages (GPU_STAGES, comma-separated, default all, in this order):
#   wheels   install .whl/*.whl into /tmp/site, one at a time (one that fails costs only its rows)
#   env      nvidia-smi, versions, commit -> $OUT/env.txt
#   tests    the kernels' test files (GPU_TEST_FILES) with GRPO_TEST_NATIVE=1, one pytest process per
#            file, all at once, each killed at GPU_TEST_LIMIT_S (default 120 s) -> $OUT/tests-*.log
#   bench    python -m bench.supervise running bench.run (GPU plan, bench/run.py) until GPU_LIMIT_S
#            minus SUMMARY_RESERVE_S; a hung implementation is killed at its own limit and the run goes
#            on in a new process -> $OUT/results.json (rewritten after every row), $OUT/bench.log
#   summary  the tests' tally, then the benchmark's table and compact summary (python -m bench.report)
# Environment: GPU_LIMIT_S (default 330: the seconds this script may use, all stages), GPU_TEST_LIMIT_S,
# BENCH_ARGS (more options for bench.run, e.g. "--with-compile", "--unit linear", "--quick"),
# GRPO_BENCH_COMMIT (the commit that ran, for a tree copied without .git), OUT (default bench/results;
# everything lands there; with another OUT the JSON and PNG are also copied into bench/results/).
# GPU_DRY=1 runs the same stages on a machine without a GPU: the tests are only collected and the
# benchmark runs its GPU plan at tiny shapes on the CPU under Triton's interpreter.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
LIMIT_S=${GPU_LIMIT_S:-330}
TEST_LIMIT_S=${GPU_TEST_LIMIT_S:-120}
SUMMARY_RESERVE_S=${SUMMARY_RESERVE_S:-25}
STAGES=${GPU_STAGES:-wheels,env,tests,bench,summary}
DRY=${GPU_DRY:-0}
TEST_FILES=${GPU_TEST_FILES:-tests/test_sweep.py tests/test_fused_loss.py tests/test_packed.py \
tests/test_loss_triton.py tests/test_two_pass.py tests/test_linear.py tests/test_hostile.py tests/test_cuda_backend.py}
# Not GPU tests: ahead-of-time compiles for sm_80/sm_90 in subprocesses (minutes of CPU; CI runs them).
DESELECT=(--deselect tests/test_linear.py::test_kernels_compile_for_sm80_and_sm90)
START=$SECONDS
export PYTHONUNBUFFERED=1
left() { echo $(( LIMIT_S - (SECONDS - START) )); }
stage() { [[ ",$STAGES," == *",$1,"* ]]; }
say() { echo "=== [$(( SECONDS - START )) s] $*"; }
SITE=/tmp/site
if [ "$DRY" = 1 ]; then
    export TRITON_INTERPRET=1       # no GPU: the Triton kernels run under the interpreter
    BENCH_ARGS=${BENCH_ARGS:---smoke --plan gpu --device cpu}
    SITE=$OUT/site                  # not the GPU machine's path, on a shared machine
else
    unset TRITON_INTERPRET          # compiled kernels only, never Triton's interpreter
    BENCH_ARGS=${BENCH_ARGS:-}
fi

# 1. The wheels brought along (Liger-Kernel, TRL, datasets), beside the image's packages.
if stage wheels; then
    say "wheels"
    if compgen -G ".whl/*.whl" >/dev/null; then
        for whl in .whl/*.whl; do
            timeout -k 5 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
                --target "$SITE" "$whl" >/dev/null 2>"$OUT/pip-$(basename "$whl").err" \
                && rm -f "$OUT/pip-$(basename "$whl").err" \
                || echo "could not install $whl: $(tail -1 "$OUT/pip-$(basename "$whl").err")"
        done
        export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
    else
        echo "no .whl/: liger and trl will be reported as not importable (see bench/fetch_wheels.sh)"
    fi
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}   # grpo_kernels from this tree: no install step

# 2. What it runs on.
if stage env; then
    say "env"
    {
        timeout -k 2 20 nvidia-smi || echo "nvidia-smi: not available"
        timeout -k 2 60 "$PY" -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda,
"triton", triton.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device")'
        timeout -k 2 30 "$PY" -m pip list 2>/dev/null \
            | grep -i -E '^(torch|triton|trl|liger|liger-kernel|transformers|datasets|accelerate) '
        echo "commit ${GRPO_BENCH_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
    } >"$OUT/env.txt" 2>&1
    cat "$OUT/env.txt"
fi

# 3. The kernels' tests on CUDA tensors: with GRPO_TEST_NATIVE=1 tests/conftest.py leaves the
#    interpreter off and makes the tensors the tests create on the GPU. One process per file, in
#    parallel (Triton's compiles use the CPU cores; the GPU work is tiny), each time-boxed.
TEST_RC=0
if stage tests; then
    say "tests: $TEST_FILES (each at most $TEST_LIMIT_S s)"
    rm -f "$OUT/tests-status.txt"
    pids=()
    for f in $TEST_FILES; do
        [ -f "$f" ] || { echo "no $f: skipped"; continue; }
        name=$(basename "$f" .py)
        if [ "$DRY" = 1 ]; then
            args=(--collect-only -q)
        else
            args=(-v --tb=short -rfE)
        fi
        GRPO_TEST_NATIVE=1 timeout -k 5 "$TEST_LIMIT_S" "$PY" -m pytest -p no:cacheprovider "${args[@]}" \
            "${DESELECT[@]}" "$f" >"$OUT/$name.log" 2>&1 &
        pids+=("$!:$name")
    done
    for entry in "${pids[@]}"; do
        wait "${entry%%:*}"
        rc=$?
        echo "${entry#*:} $rc" >>"$OUT/tests-status.txt"
        [ "$rc" != 0 ] && TEST_RC=$rc
    done
    say "tests done (exit $TEST_RC)"
fi

# The tests' tally from their logs (also for a file killed by its time limit: -v prints a line per test).
test_tally() {
    [ -f "$OUT/tests-status.txt" ] || { echo "tests: not run"; return; }
    echo "TESTS (GRPO_TEST_NATIVE=1; exit 124 = killed at ${TEST_LIMIT_S} s)"
    while read -r name rc; do
        log="$OUT/$name.log"
        printf '  %-24s exit %-4s passed %-4s failed %-4s errors %-4s skipped %-4s %s\n' "$name" "$rc" \
            "$(grep -c ' PASSED' "$log")" "$(grep -c ' FAILED' "$log")" "$(grep -c ' ERROR' "$log")" \
            "$(grep -c ' SKIPPED' "$log")" "$(tail -1 "$log" | cut -c1-90)"
        grep -E '^(FAILED|ERROR) ' "$log" | head -10 | cut -c1-200 | sed 's/^/      /'
    done <"$OUT/tests-status.txt"
}

# 4. The benchmark in the time left, under its supervisor. It validates every implementation
#    against the float64 reference before timing it and rewrites its JSON after every row.
BENCH_RC=0
if stage bench; then
    BENCH_S=$(( $(left) - SUMMARY_RESERVE_S ))
    say "bench: $BENCH_S s (bench.run $BENCH_ARGS)"
    if [ "$BENCH_S" -gt 20 ]; then
        # shellcheck disable=SC2086
        timeout -k 5 $(( BENCH_S + 15 )) "$PY" -m bench.supervise --json "$OUT/results.json" --fresh \
            --deadline-s "$BENCH_S" -- --out "$OUT" $BENCH_ARGS 2>&1 | tee "$OUT/bench.log"
        BENCH_RC=${PIPESTATUS[0]}
    else
        echo "no time left for the benchmark"
        BENCH_RC=1
    fi
fi

# 5. The summary, last: the tests' tally, then the benchmark's table and its compact summary.
if stage summary; then
    say "summary"
    COPY=()
    [ "$OUT" != bench/results ] && [ "$DRY" != 1 ] && COPY=(--copy-to bench/results)
    if [ -f "$OUT/results.json" ]; then
        timeout -k 5 60 "$PY" -m bench.report "$OUT/results.json" --plot "$OUT/results.png" "${COPY[@]}" \
            >"$OUT/report.txt" 2>&1
        test_tally
        cat "$OUT/report.txt"
    else
        test_tally
        echo "no $OUT/results.json: the benchmark wrote nothing (see $OUT/bench.log)"
    fi
fi
say "done: tests exit $TEST_RC, bench exit $BENCH_RC"
exit $(( TEST_RC != 0 ? 1 : BENCH_RC ))
