#!/usr/bin/env bash
# One device call for what issues 20-22 leave to measure, inside the tool's 600 s: the validation
# and benchmark run (gpu_validate_and_time.sh), then the probes that choose between variants
# (gpu_two_pass_probe.py, gpu_linear_probe.py, gpu_csrc_probe.py), each time-boxed, the ones that
# do not fit skipped. From the repository root, after `bash bench/fetch_wheels.sh` here:
#
#   run(command="GRPO_BENCH_COMMIT=<sha> bash bench/gpu_session.sh", carry=[".whl"], timeout_s=600)
#
# The device tool returns at most 8 files: everything is written under $OUT/run and packed into
# $OUT/gpu_session.tgz at the end (the summary tables are also printed last). GPU_DRY=1 rehearses it on
# a machine without a GPU (tiny shapes, Triton's interpreter).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
RUN=$OUT/run
mkdir -p "$RUN"
START=$SECONDS
BUDGET_S=${GPU_SESSION_S:-585}
left() { echo $(( BUDGET_S - (SECONDS - START) )); }
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
if [ "${GPU_DRY:-0}" = 1 ]; then  # a rehearsal on a machine without a GPU (the probes' own dry modes)
    export PROBE_DRY=1 PROBE_SMOKE=1
fi

OUT=$RUN GPU_LIMIT_S=${GPU_LIMIT_S:-300} bash bench/gpu_validate_and_time.sh
export PYTHONPATH=$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}   # the wheels gpu_validate_and_time.sh installed

probe() {  # probe NAME SECONDS COMMAND...: run it if it fits in what is left
    local name=$1 need=$2
    shift 2
    if [ "$(left)" -lt $(( need + 15 )) ]; then
        echo "=== $name skipped: $(left) s left, needs $need"
        return
    fi
    echo "=== [$(( SECONDS - START )) s] $name"
    OUT=$RUN timeout -k 5 "$need" "$@" 2>&1 | tee "$RUN/$name.log" | tail -40
}
probe two_pass 120 env PROBE_LIMIT_S=90 "$PY" -m bench.gpu_two_pass_probe
probe linear 110 "$PY" bench/gpu_linear_probe.py
probe csrc 125 "$PY" bench/gpu_csrc_probe.py

tar -czf "$OUT/gpu_session.tgz" --exclude=./site -C "$RUN" . && rm -rf "$RUN"
echo "=== done in $(( SECONDS - START )) s: $OUT/gpu_session.tgz"
