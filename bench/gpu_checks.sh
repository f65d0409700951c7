#!/usr/bin/env bash
# The GPU checks of one session in one command: CUDA tests, the fine-tune loader check, the step
# table.  Logs go to $OUT (or ./gpu-checks) as they are written, so a run cut short keeps them.
#   bash bench/gpu_checks.sh [BENCH_STEP_VARIANTS]
# Without an argument the step table runs NEXT_VARIANTS: the questions bench/NOTES.md leaves open,
# most important first, sized for a 15-minute device budget (each whole-model compile warms up for
# about a minute cold; --prewarm overlaps those minutes).  Pass "all" for bench_step.py's full ladder.
set -uo pipefail
NEXT_VARIANTS="sdpa_cudnn-bf16-compile-bf16res-pointwise-b256,sdpa-bf16-cudagraphs-bf16res,\
sdpa_cudnn-bf16-cudagraphs-bf16res-qkvsplit,sdpa_cudnn-bf16-cudagraphs-bf16res-infer-b256,sdpa-bf16-cudagraphs-bf16res-infer-b256,\
sdpa_cudnn-bf16-cudagraphs-bf16res-qkvsplit-infer-b256,sdpa_cudnn-bf16-cudagraphs-bf16res-pointwise,\
sdpa_cudnn-bf16-compile-bf16res-aggressive-b256"
out="${OUT:-gpu-checks}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$out/nvidia-smi.txt"
python3 -m pytest -q -m gpu tests/clara/test_gpu.py -p no:cacheprovider 2>&1 | tail -5 | tee "$out/pytest-gpu.txt"
# 5,000 clips (half an epoch of MELD): the per-step figures are what matter, and the budget is short.
# Its default settings compare cuDNN attention (a plan per new shape) with the kit's default kernels.
python3 bench/bench_finetune_epoch.py --device cuda --clips 5000 2>&1 | grep --line-buffered -v "^training" | tee "$out/bench_finetune_epoch.txt"
variants="${1:-$NEXT_VARIANTS}"
[ "$variants" = all ] && variants=""
# --prewarm 4: the compiled variants compile side by side first (mostly CPU work), then each is timed
# alone with warm compile caches; one that runs out of memory beside the others compiles cold instead.
python3 bench/bench_step.py --device cuda --json "$out/bench_step.jsonl" --prewarm 4 \
    ${variants:+--variants "$variants"} 2>&1 | tee "$out/bench_step.txt"
