#!/usr/bin/env bash
# Compile (never run) the standalone CUDA kernels for sm_90 with this machine's nvcc, so a broken CUDA build is caught
# on a machine without a GPU (CI; tests/test_cuda_build.py calls this). The torch binding is not compiled here: it
# needs a CUDA build of torch (setup.py builds it as opd_fast._C_cuda where there is one).
#   csrc/check_nvcc.sh [OUT.o]        NVCC=/path/to/nvcc picks the compiler (default: nvcc on PATH)
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-nvcc}
if ! command -v "$NVCC" >/dev/null; then
  echo "check_nvcc: $NVCC not found" >&2
  exit 127
fi
out=${1:-$(mktemp -d)/opd_step_cuda.o}
"$NVCC" -arch=sm_90 -O3 -std=c++17 -c csrc/opd_step_cuda.cu -o "$out"
echo "check_nvcc: ok, $("$NVCC" --version | tail -1) -> $out"
