#!/usr/bin/env bash
# The GPU checks of one session in one command: CUDA tests, the step table, the fine-tune loader check.
# Logs go to $OUT (or ./gpu-checks) as they are written, so a run cut short keeps them.
#   bash bench/gpu_checks.sh [BENCH_STEP_VARIANTS]
#   PARTS=epoch bash bench/gpu_checks.sh      # one part only (PARTS="tests step" by default: the fifth
#                                             # session measured the epoch part's settings, GPU-bound)
# Without an argument the step table runs NEXT_VARIANTS: issue 9's targets and the questions
# bench/NOTES.md leaves open, sized for a 15-minute device budget.  Every compiled variant compiles
# first, side by side and beside the CUDA tests (mostly CPU work, untimed), so that the timed run,
# one variant at a time, finds inductor's caches warm.  Pass "all" for bench_step.py's full ladder.
set -uo pipefail
NEXT_VARIANTS="sdpa_cudnn-bf16-cudagraphs-bf16res-qkvsplit-cdt,sdpa_cudnn-bf16-cudagraphs-bf16res-qkvsplit-cdt-tritongeglu,\
sdpa_cudnn-bf16-cudagraphs-bf16res-infer-b512-cdt,\
sdpa_cudnn-bf16-cudagraphs-bf16res-cdt,sdpa_cudnn-bf16-cudagraphs-bf16res-qkvsplit-pointwise-cdt,\
sdpa_cudnn-bf16-stepgraph-bf16res-qkvsplit-cdt,sdpa_cudnn-bf16-cudagraphs-bf16res-infer-b256-cdt,\
sdpa_cudnn-bf16-cudagraphs-bf16res-qkvsplit-infer-b512-cdt,sdpa_cudnn-bf16-cudagraphs-bf16res-qkvsplit-bucket-cdt"
# Kernel families per step (bench_step's profile; the profiler sees inside CUDA-graph replays).  A
# profiled variant must be among those run (bench_step refuses the run otherwise), so variants given
# as an argument are profiled only as PROFILE=... names them.
DEFAULT_PROFILE="sdpa_cudnn-bf16-cudagraphs-bf16res-qkvsplit-cdt,sdpa_cudnn-bf16-cudagraphs-bf16res-qkvsplit-cdt-tritongeglu"
out="${OUT:-gpu-checks}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
# Without a GPU every part below fails or skips, one by one, and the script still exited 0.
if ! nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv > "$out/nvidia-smi.txt" 2>&1; then
    echo "gpu_checks.sh: no NVIDIA GPU here (nvidia-smi: $(tail -1 "$out/nvidia-smi.txt")); run it on a GPU machine" >&2
    exit 2
fi
cat "$out/nvidia-smi.txt"
variants="${1:-$NEXT_VARIANTS}"
if [ -z "${1:-}" ] || [ "$1" = all ]; then profile="${PROFILE-$DEFAULT_PROFILE}"; else profile="${PROFILE:-}"; fi
[ "$variants" = all ] && variants=""
# The exit status: 1 when any part failed (each part still runs, and its log is kept).
failed=0
parts=" ${PARTS:-tests step} "
if [[ $parts == *" tests "* ]]; then
python3 -m pytest -q -m gpu tests/clara/test_gpu.py tests/test_bench.py -p no:cacheprovider > "$out/pytest-gpu.txt" 2>&1 &
tests=$!
fi
if [[ $parts == *" step "* ]]; then
# Fewer inductor compile workers per process: the processes share the machine's cores.
TORCHINDUCTOR_COMPILE_THREADS=4 python3 bench/bench_step.py --device cuda --prewarm 8 --compile-only \
    ${variants:+--variants "$variants"} 2>&1 | tee "$out/prewarm.txt"
fi
if [[ $parts == *" tests "* ]]; then
wait "$tests" || failed=1
tail -3 "$out/pytest-gpu.txt"
fi
if [[ $parts == *" step "* ]]; then
python3 bench/bench_step.py --device cuda --json "$out/bench_step.jsonl" --profile "$profile" --profile-rows 30 \
    ${variants:+--variants "$variants"} 2>&1 | tee "$out/bench_step.txt" || failed=1
fi
if [[ $parts == *" epoch "* ]]; then
# 5,000 clips (half an epoch of MELD): the per-step figures are what matter, and the budget is short.
# cuDNN attention (a plan per new shape) against the default kernels, then the kit's default
# batching (bucketed by length) unpadded and padded to 64 frames.
python3 bench/bench_finetune_epoch.py --device cuda --clips 5000 --settings 4/off/1/cudnn,4/off,4/off/1/bucket,4/off/64/bucket \
    2>&1 | grep --line-buffered -v "^training" | tee "$out/bench_finetune_epoch.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || failed=1
fi
exit "$failed"
