#!/usr/bin/env bash
# The GPU checks of the teacher runtime and the round benchmark, in one script for a CUDA machine (H100/H200).
#
#   bench/gpu_round.sh                      # every stage: tests accuracy round512 round1024, then the tables
#   bench/gpu_round.sh accuracy round512    # some stages (each fits a 10-minute call on an H200)
#
# Runs from the repository root with python3 (the machine's torch). Wheels the machine lacks (diffusers, nvtx, ...:
# make them here with ../shared/tools/gpu-wheels.sh .whl) are installed from .whl/ when the imports fail. Logs,
# JSON and the markdown tables go to $OUT (default ./gpu_round_out); the tables are printed last.
# Knobs: ROUNDS_512 (3), ROUNDS_1024 (2), VARIANTS_1024 (the ladder without compile, for time).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_round_out}
mkdir -p "$OUT"
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(tests accuracy round512 round1024)

if ! python3 -c "import diffusers, nvtx, peft" 2>/dev/null; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
  else
    echo "diffusers/nvtx/peft do not import and no .whl/ was carried: run ../shared/tools/gpu-wheels.sh .whl here" >&2
    exit 1
  fi
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 - <<'EOF' | tee -a "$OUT/gpu.txt"
import diffusers, torch
import opd_fast.fp8 as fp8
print("torch", torch.__version__, "cuda", torch.version.cuda, "diffusers", diffusers.__version__)
print("transformer_engine:", fp8.te_available(), "capability:", torch.cuda.get_device_capability())
EOF

for stage in "${stages[@]}"; do
  case $stage in
    tests)  # the CUDA tests that skip on CPU: side stream == serial, no host sync, record_stream, FP8 on CUDA, TE
      python3 -m pytest -q -rs tests/test_fp8.py tests/test_teacher_runtime.py 2>&1 | tee "$OUT/tests.log" ;;
    accuracy)  # FP8 vs bf16 vs fp32 teacher velocity at the released architectures (random weights)
      python3 bench/fp8_accuracy.py --preset sd3.5-medium --device cuda --resolution 512 --per-layer \
        --json "$OUT/fp8_sd35m.json" 2>&1 | tee "$OUT/fp8_sd35m.log"
      python3 bench/fp8_accuracy.py --preset sd3.5-medium --device cuda --resolution 1024 --batch 2 \
        --json "$OUT/fp8_sd35m_1024.json" 2>&1 | tee "$OUT/fp8_sd35m_1024.log"
      python3 bench/fp8_accuracy.py --preset flux.1-dev --device cuda --resolution 512 --batch 2 \
        --json "$OUT/fp8_flux.json" 2>&1 | tee "$OUT/fp8_flux.log" ;;
    round512)
      python3 bench/bench_round.py --preset sd3.5-medium --device cuda --resolution 512 --rounds "${ROUNDS_512:-3}" \
        --json "$OUT/round512.json" 2>"$OUT/round512.err" | tee "$OUT/round512.md" ;;
    round1024)
      python3 bench/bench_round.py --preset sd3.5-medium --device cuda --resolution 1024 \
        --rounds "${ROUNDS_1024:-2}" \
        --variants "${VARIANTS_1024:-official,one_pass,fused,merged,fp8,side,cudnn,adapter}" \
        --json "$OUT/round1024.json" 2>"$OUT/round1024.err" | tee "$OUT/round1024.md" ;;
    *) echo "unknown stage $stage (tests accuracy round512 round1024)" >&2; exit 2 ;;
  esac
done

echo; echo "================ results ($OUT) ================"
for f in fp8_sd35m fp8_sd35m_1024 fp8_flux; do [ -f "$OUT/$f.log" ] && sed -n '/^$/,$p' "$OUT/$f.log"; done
for f in round512 round1024; do [ -f "$OUT/$f.md" ] && { echo; cat "$OUT/$f.md"; }; done
[ -f "$OUT/tests.log" ] && tail -n 15 "$OUT/tests.log"
exit 0
