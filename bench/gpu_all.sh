#!/usr/bin/env bash
# The GPU check of the project, for a CUDA machine (H100/H200): a thin wrapper around bench/gpu_run.py.
#
#   bench/gpu_all.sh                      # the first command (at most 8 minutes): preflight, Triton kernel tests,
#                                         # CUDA-only tests, copy ceiling and fused-op GB/s, the SD3.5-M 512 px round
#                                         # ladder, FP8 teacher accuracy; the verdict table is printed last
#   bench/gpu_all.sh round1024 engine     # named steps for a later command (preflight runs first)
#   bench/gpu_all.sh --dry-run [STEP ...] # the plan: each step, its command, its budget and why, the total
#
# Every step runs under its own timeout; a failing step does not stop the later ones. Logs and JSON go to $LOGS
# (default runs/gpu); with $OUT set (the device tool) $OUT gets summary.md and logs.tar.gz after every step. Wheels
# the machine lacks (diffusers, deepspeed, nvtx, pytest-benchmark: ../shared/tools/gpu-wheels.sh .whl) are installed
# from .whl/ into /tmp/site when the imports fail. Without a CUDA device it exits 2 at once (but --dry-run works).
set -uo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" bench/gpu_run.py "$@"
