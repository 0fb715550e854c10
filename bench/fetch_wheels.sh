#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with the wheels the GPU machine lacks, for Python 3.12 there.
# Run it here, where PyPI is reachable; the GPU machine has no network. Then name ".whl"
# in the device tool's `carry` and run bench/gpu_validate_and_time.sh, which installs them.
#
# What is missing there (its image: see .library/device/KINDS.md): Liger-Kernel and TRL
# (the peers the benchmark times) and what `import trl` needs beyond that image, for the
# TRL-parity tests: datasets and its dill/multiprocess. All pure Python, about 3 MB.
# transformers, accelerate, pyarrow, pandas, matplotlib and hypothesis are in the image.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=(trl==1.16.0 liger-kernel==0.8.5 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19)

mkdir -p .whl
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${WHEELS[@]}"
ls -l .whl
