#!/usr/bin/env bash
# The GPU checks of one session in one command: CUDA tests, the fine-tune loader check, the step
# table.  Logs go to $OUT (or ./gpu-checks) as they are written, so a run cut short keeps them.
#   bash bench/gpu_checks.sh [BENCH_STEP_VARIANTS]
set -uo pipefail
out="${OUT:-gpu-checks}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$out/nvidia-smi.txt"
python3 -m pytest -q -m gpu tests/clara/test_gpu.py -p no:cacheprovider 2>&1 | tail -5 | tee "$out/pytest-gpu.txt"
python3 bench/bench_finetune_epoch.py --device cuda 2>&1 | grep --line-buffered -v "^training" | tee "$out/bench_finetune_epoch.txt"
variants="${1:-}"
python3 bench/bench_step.py --device cuda --json "$out/bench_step.jsonl" --profile sdpa-bf16-compile-bf16res --profile-rows 30 \
    ${variants:+--variants "$variants"} 2>&1 | tee "$out/bench_step.txt"
