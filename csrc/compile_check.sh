#!/usr/bin/env bash
# Compile-only check of the CUDA sources, for machines without a GPU (CI: `make csrc-check`).
#
#  1. csrc/grpo_sweep.cu and csrc/two_pass.cu with nvcc for sm_80 and sm_90, warnings as
#     errors (nvcc, host compiler and ptxas, which also rejects register spills and local
#     memory), with the flags torch's CUDAExtension adds (no half operators / conversions) so
#     the build that setup.py runs compiles too; prints ptxas's registers / spills / shared
#     memory per kernel.
#  2. The PTX of every sweep kernel must use 16-byte global loads (ld.global.*v4), and the
#     backward kernels 16-byte stores: the vectorised path exists and is not optimised away.
#     The two-pass kernels must copy 16-byte packs into shared memory (cp.async ... 16) and
#     store 16-byte packs; on sm_90 their cluster variants must use the cluster barrier and
#     distributed shared memory (barrier.cluster, mapa / shared::cluster).
#  3. If a Python with torch is found (PYTHON, else .venv/bin/python, else python3),
#     csrc/binding.cpp is compiled too (-fsyntax-only: a CPU torch has nothing to link).
#
# Exits non-zero on any failure. Nothing here runs a kernel.
set -euo pipefail
cd "$(dirname "$0")/.."

NVCC=${NVCC:-nvcc}
if ! command -v "$NVCC" >/dev/null 2>&1; then
    echo "compile_check: nvcc not found (set NVCC or put it on PATH)" >&2
    exit 1
fi
ARCHS=${ARCHS:-"80 90"}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

COMMON=(
    -std=c++17 -O3 -lineinfo -Icsrc
    # what torch.utils.cpp_extension adds to every nvcc command
    -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
    -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr
    -Werror all-warnings
    -Xcompiler -Wall,-Wextra,-Werror
    -Xptxas -warn-spills,-warn-lmem-usage,-Werror
)

"$NVCC" --version | tail -n 2
status=0
for arch in $ARCHS; do
    for src in grpo_sweep two_pass; do
    echo "== sm_$arch $src.cu"
    if ! "$NVCC" "${COMMON[@]}" -gencode "arch=compute_$arch,code=sm_$arch" --resource-usage \
            -c "csrc/$src.cu" -o "$TMP/${src}_sm$arch.o" >"$TMP/ptxas_${src}_$arch.log" 2>&1; then
        cat "$TMP/ptxas_${src}_$arch.log" >&2
        echo "compile_check: nvcc failed for $src.cu on sm_$arch" >&2
        exit 1
    fi
    # One line per kernel: name with template arguments, registers, spills, shared memory.
    DEMANGLE=cat
    if command -v c++filt >/dev/null 2>&1; then DEMANGLE=c++filt; fi
    "$DEMANGLE" <"$TMP/ptxas_${src}_$arch.log" | awk -v arch="sm_$arch" '
        /Compiling entry function/ {
            name = $0; sub(/^[^\x27]*\x27(void )?/, "", name); sub(/\(anonymous namespace\)::/, "", name)
            sub(/\(.*/, "", name)
        }
        /spill stores/ { spills = $5 "/" $9 }
        /Used [0-9]+ registers/ {
            smem = 0; for (i = 1; i < NF; i++) if ($(i + 1) == "bytes" && $(i + 2) ~ /^smem/) smem = $i
            printf "  %-5s %-48s %3d registers, spill stores/loads %s bytes, static smem %s bytes\n", arch, name, $5, spills, smem
        }'

    "$NVCC" "${COMMON[@]}" -arch="compute_$arch" -ptx "csrc/$src.cu" -o "$TMP/${src}_$arch.ptx"
    if [ "$src" = grpo_sweep ]; then
        if ! awk '
            /^\.visible \.entry|^\.entry|^\.weak \.entry/ { kernel = $NF; sub(/\($/, "", kernel); kernels[kernel] = 1 }
            /ld\.global(\.nc)?\.v4\./ { loads[kernel]++ }
            /st\.global\.v4\./        { stores[kernel]++ }
            END {
                bad = 0
                for (k in kernels) {
                    if (!loads[k]) { print "  no 16-byte global load in " k; bad = 1 }
                    if (k ~ /backward/ && !stores[k]) { print "  no 16-byte global store in " k; bad = 1 }
                }
                exit bad
            }' "$TMP/${src}_$arch.ptx"; then
            echo "compile_check: sm_$arch PTX of $src.cu lacks vectorised accesses" >&2
            status=1
        else
            echo "  sm_$arch PTX: every sweep kernel loads 16-byte packs; backward kernels store them"
        fi
    else
        # Cluster kernels (template argument kCluster = true: "Lb1E" in the mangled name) must use
        # the cluster barrier and distributed shared memory on sm_90; all must copy and store 16 B.
        if ! awk -v arch="$arch" '
            /^\.visible \.entry|^\.entry|^\.weak \.entry/ { kernel = $NF; sub(/\($/, "", kernel); kernels[kernel] = 1 }
            /cp\.async\.cg\.shared\.global.*16;/ { copies[kernel]++ }
            /st\.global\.v4\./                  { stores[kernel]++ }
            /barrier\.cluster/                   { barriers[kernel]++ }
            /mapa|shared::cluster/                { dsmem[kernel]++ }
            END {
                bad = 0
                for (k in kernels) {
                    if (!copies[k]) { print "  no 16-byte cp.async in " k; bad = 1 }
                    if (!stores[k]) { print "  no 16-byte global store in " k; bad = 1 }
                    if (arch >= 90 && k ~ /Lb1ELb/ && (!barriers[k] || !dsmem[k])) {
                        print "  no cluster barrier / distributed shared memory in " k; bad = 1
                    }
                }
                exit bad
            }' "$TMP/${src}_$arch.ptx"; then
            echo "compile_check: sm_$arch PTX of $src.cu lacks its copies, stores or cluster exchange" >&2
            status=1
        else
            echo "  sm_$arch PTX: every two-pass kernel copies and stores 16-byte packs$( [ "$arch" -ge 90 ] && echo '; cluster kernels use barrier.cluster and distributed shared memory')"
        fi
    fi
    done
done

# 3. The torch binding, when torch's headers are at hand.
PY=${PYTHON:-}
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
if TORCH_INC=$("$PY" -c 'from torch.utils.cpp_extension import include_paths; print(" ".join(include_paths()))' 2>/dev/null) \
        && PY_INC=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])' 2>/dev/null); then
    # Where this nvcc finds cuda_runtime.h (nvcc may be a wrapper script outside the toolkit).
    CUDA_INC=$("$NVCC" --dryrun -c -x cu /dev/null 2>&1 | sed -n 's/.* INCLUDES="-I\([^"]*\)".*/\1/p' | head -n 1)
    INCLUDES=()
    for dir in $TORCH_INC "$PY_INC" "$CUDA_INC"; do INCLUDES+=(-isystem "$dir"); done
    # A CPU build of torch ships c10/cuda's headers without this generated one.
    TORCH_ROOT_INC=${TORCH_INC%% *}
    if [ ! -f "$TORCH_ROOT_INC/c10/cuda/impl/cuda_cmake_macros.h" ]; then
        mkdir -p "$TMP/stub/c10/cuda/impl"
        printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' >"$TMP/stub/c10/cuda/impl/cuda_cmake_macros.h"
        INCLUDES+=(-isystem "$TMP/stub")
    fi
    CXX=${CXX:-c++}
    if "$CXX" -std=c++17 -fsyntax-only -Wall -Wextra -Werror -Icsrc "${INCLUDES[@]}" \
            -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C_sweep csrc/binding.cpp; then
        echo "== binding.cpp compiles against torch's headers ($("$PY" -c 'import torch; print(torch.__version__)'))"
    else
        echo "compile_check: csrc/binding.cpp does not compile" >&2
        status=1
    fi
else
    echo "== binding.cpp not checked: no Python with torch ($PY)"
fi

exit $status
