#!/usr/bin/env bash
# Every GPU check of the project in one script, for a CUDA machine (H100/H200), in stages:
#
#   kernels    bench/gpu_check.py: build the extensions, CUDA/Triton kernel tests, copy-bandwidth ceiling, kernel table
#   tests      the CUDA tests of teachers and attention (side stream == serial, no host sync, FP8, TE, cuDNN/flash)
#   accuracy   FP8 vs bf16 vs fp32 teacher velocity at SD3.5-M (512, 1024 px) and FLUX.1 (random weights)
#   round512   the round ladder at SD3.5-M 512 px: images/s, phases, memory, MFU, loss / gradient verdict (>= 2x)
#   round1024  the same at 1024 px: official-like, up to FP8 teachers, and ours without torch.compile (for time)
#   engine     full-parameter SD3.5-M student under ZeRO-3, with and without offload (bf16, 512 px, NCCL world 1)
#   profile    nsys capture of two rounds of the tiny config through --profile-steps, NVTX ranges listed
#
#   bench/gpu_all.sh                          # every stage, then the tables
#   bench/gpu_all.sh kernels tests accuracy   # some stages
#
# A plan for a 30-minute device budget (machine start-up included): three calls of at most 9 minutes,
#   STAGE_S=170 bench/gpu_all.sh kernels tests accuracy
#   STAGE_S=500 bench/gpu_all.sh round512
#   STAGE_S=250 bench/gpu_all.sh round1024 engine profile
# The round stages rewrite their table after every variant, so a stage cut short keeps the variants it finished.
#
# Runs from anywhere with python3 or $PYTHON (the machine's torch). Wheels the machine lacks (diffusers, deepspeed,
# nvtx: make them with ../shared/tools/gpu-wheels.sh .whl) are installed from .whl/ when the imports fail. Logs and
# JSON go to $LOGS (default runs/gpu). Where $OUT is set (the device tool), after every stage $OUT gets summary.md
# (the tables) and logs.tar.gz (everything): two files, so a call cut short still returns what finished. STAGE_S (0 =
# none) bounds each stage in seconds. Knobs: ROUNDS_512 (3), ROUNDS_1024 (2), VARIANTS_1024 (official,fp8,cudnn).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOGS=${LOGS:-$PWD/runs/gpu}
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(kernels tests accuracy round512 round1024 engine profile)

if ! $PY -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "gpu_all.sh: no CUDA device here; these are the GPU checks (their CPU paths run in tests/test_bench.py)" >&2
  exit 2
fi
if ! $PY -c "import diffusers, nvtx, peft, deepspeed" 2>/dev/null; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
  else
    echo "diffusers/nvtx/peft/deepspeed do not import and no .whl/ was carried:" \
      "run ../shared/tools/gpu-wheels.sh .whl here and carry .whl" >&2
    exit 1
  fi
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
mkdir -p "$LOGS"
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$LOGS/gpu.txt"
$PY - <<'EOF' | tee -a "$LOGS/gpu.txt"
import importlib, torch
import opd_fast.fp8 as fp8
vers = {m: getattr(importlib.import_module(m), "__version__", "?")
        for m in ("torch", "triton", "diffusers", "peft", "transformers", "deepspeed", "numpy")}
print(" ".join(f"{m} {v}" for m, v in vers.items()), "| cuda", torch.version.cuda)
print("transformer_engine:", fp8.te_available(), "| capability:", torch.cuda.get_device_capability())
EOF

summary() {  # the tables of whatever has finished, printed and (with $OUT) returned with every log
  {
    echo "# GPU checks ($(date -u +%F), $(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1))"
    [ -f "$LOGS/kernels/results.md" ] && { echo; echo "## kernels"; cat "$LOGS/kernels/results.md"; }
    for f in fp8_sd35m fp8_sd35m_1024 fp8_flux; do
      [ -f "$LOGS/$f.log" ] && { echo; echo "## $f"; sed -n '/^$/,$p' "$LOGS/$f.log"; }
    done
    for f in round512 round1024 engine profile; do
      [ -f "$LOGS/$f.md" ] && { echo; echo "## $f"; cat "$LOGS/$f.md"; }
    done
    for f in kernels/tests tests; do [ -f "$LOGS/$f.log" ] && { echo; echo "## $f"; tail -n 15 "$LOGS/$f.log"; }; done
  } > "$LOGS/summary.md"
  if [ -n "${OUT:-}" ]; then
    cp "$LOGS/summary.md" "$OUT/summary.md"
    # text only: the device tool returns files up to 16 MiB (the profile stage copies a small .nsys-rep itself)
    tar -czf "$OUT/logs.tar.gz" --exclude='*.nsys-rep' --exclude='*.sqlite' --exclude='*.safetensors' \
      --exclude=tensorboard -C "$(dirname "$LOGS")" "$(basename "$LOGS")"
  fi
}

run() { timeout "${STAGE_S:-0}" "$@"; }

for stage in "${stages[@]}"; do
  echo "=== stage $stage ($(date -u +%T))"
  case $stage in
    kernels)
      run $PY bench/gpu_check.py --out "$LOGS/kernels" 2>&1 | tee "$LOGS/kernels.log" ;;
    tests)
      run $PY -m pytest -q -rs tests/test_fp8.py tests/test_teacher_runtime.py tests/test_attention.py 2>&1 |
        tee "$LOGS/tests.log" ;;
    accuracy)
      run $PY bench/fp8_accuracy.py --preset sd3.5-medium --device cuda --resolution 512 --per-layer \
        --json "$LOGS/fp8_sd35m.json" 2>&1 | tee "$LOGS/fp8_sd35m.log"
      run $PY bench/fp8_accuracy.py --preset sd3.5-medium --device cuda --resolution 1024 --batch 2 \
        --json "$LOGS/fp8_sd35m_1024.json" 2>&1 | tee "$LOGS/fp8_sd35m_1024.log"
      run $PY bench/fp8_accuracy.py --preset flux.1-dev --device cuda --resolution 512 --batch 2 \
        --json "$LOGS/fp8_flux.json" 2>&1 | tee "$LOGS/fp8_flux.log" ;;
    round512)
      run $PY bench/bench_round.py --preset sd3.5-medium --device cuda --resolution 512 \
        --rounds "${ROUNDS_512:-3}" --json "$LOGS/round512.json" --md "$LOGS/round512.md" 2>&1 |
        tee "$LOGS/round512.log" ;;
    round1024)
      run $PY bench/bench_round.py --preset sd3.5-medium --device cuda --resolution 1024 \
        --rounds "${ROUNDS_1024:-2}" \
        --variants "${VARIANTS_1024:-official,fp8,cudnn}" --json "$LOGS/round1024.json" --md "$LOGS/round1024.md" \
        2>&1 | tee "$LOGS/round1024.log" ;;
    engine)
      run $PY bench/bench_engine.py --preset sd3.5-medium --full --world 1 --bf16 --resolution 512 \
        --num-steps 10 --batch 3 --tokens 333 --steps 3 --variants zero3,zero3-offload-optimizer,zero3-offload-all \
        --json "$LOGS/engine.json" 2>"$LOGS/engine.err" | tee "$LOGS/engine.md" ;;
    profile)
      rm -rf "$LOGS/profile_run"  # a warm machine keeps runs/ from an earlier call; train refuses a used --out
      if command -v nsys >/dev/null; then
        run nsys profile --capture-range=cudaProfilerApi --capture-range-end=stop-shutdown \
          --trace=cuda,nvtx --sample=none --cpuctxsw=none --force-overwrite=true -o "$LOGS/profile" \
          $PY -m opd_fast.cli train configs/tiny.yaml --out "$LOGS/profile_run" --set train.rounds=4 \
          --set logging.progress=false --profile-steps 2:4 > "$LOGS/profile.log" 2>&1
        { echo "nsys $(nsys --version | tail -n 1): NVTX ranges of rounds 2-3 (tiny config, CUDA)"; echo '```';
          nsys stats --report nvtx_sum --format csv "$LOGS/profile.nsys-rep" 2>&1 | tail -n 20; echo '```'; } \
          > "$LOGS/profile.md"
        [ -n "${OUT:-}" ] && [ "$(stat -c %s "$LOGS/profile.nsys-rep" 2>/dev/null || echo 0)" -lt 15000000 ] &&
          cp "$LOGS/profile.nsys-rep" "$OUT/"
      else
        echo "nsys is not on this machine: the capture window ran without a profiler attached" > "$LOGS/profile.md"
        run $PY -m opd_fast.cli train configs/tiny.yaml --out "$LOGS/profile_run" --set train.rounds=4 \
          --set logging.progress=false --profile-steps 2:4 > "$LOGS/profile.log" 2>&1
        grep -i "profil" "$LOGS/profile.log" | head -n 5 >> "$LOGS/profile.md"
      fi ;;
    *) echo "unknown stage $stage (kernels tests accuracy round512 round1024 engine profile)" >&2; exit 2 ;;
  esac
  summary
done

echo; echo "================ results ($LOGS) ================"
cat "$LOGS/summary.md"
exit 0
