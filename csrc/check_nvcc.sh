#!/usr/bin/env bash
# Compile (never run) the standalone CUDA kernels for sm_90 with this machine's nvcc, so a broken CUDA build is caught
# on a machine without a GPU (CI; tests/test_cuda_build.py calls this). The torch binding is not compiled here: it
# needs a CUDA build of torch (setup.py builds it as opd_fast._C_cuda where there is one).
#   csrc/check_nvcc.sh [OUT.o]        host object with the sm_90 kernels embedded (the extern "C" launchers)
#   csrc/check_nvcc.sh OUT.cubin      device code only, for reading the SASS: cuobjdump -sass OUT.cubin
# NVCC=/path/to/nvcc picks the compiler (default: nvcc on PATH).
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-nvcc}
if ! command -v "$NVCC" >/dev/null; then
  echo "check_nvcc: $NVCC not found" >&2
  exit 127
fi
out=${1:-$(mktemp -d)/opd_step_cuda.o}
mode=-c
[[ $out == *.cubin ]] && mode=-cubin
# The defines torch's CUDAExtension passes to nvcc (no implicit half / bfloat16 operators): the build setup.py runs
# must compile too.
torch_flags=(-D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__
  -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr)
"$NVCC" -arch=sm_90 -O3 -std=c++17 "${torch_flags[@]}" "$mode" csrc/opd_step_cuda.cu -o "$out"
echo "check_nvcc: ok, $("$NVCC" --version | tail -1) -> $out"
