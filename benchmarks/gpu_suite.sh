#!/usr/bin/env bash
# Every GPU figure of benchmarks/README.md in one run:
#
#   bash benchmarks/gpu_suite.sh                # the real sizes
#   REPEATS=1 SIZES="1 2" bash benchmarks/gpu_suite.sh --layers 1   # every code path, on a CPU too
#
# 1. DALL·E Mega 3x3, bfloat16, end to end (text encoding + sampling + VQGAN decode + CLIP
#    ViT-B/32 scoring), compiled cold into an empty persistent compilation cache;
# 2. the same in a new process with that cache: what restarting the app costs;
# 3. Mega per step and images per second (sampling + decode) at 1, 9, 16, 32 and 64 images per
#    decoding loop;
# 4. min-dalle 0.4.11 on the same GPU, Mega 1 and 3x3 images, bfloat16 (skipped when the
#    `min_dalle` package is not installed; it needs PyTorch with CUDA).
#
# One JSON line per measurement goes to $OUT/gpu_suite.jsonl (OUT defaults to ./out), progress
# and the machine's description to $OUT/gpu_suite.log. Extra arguments go to every script.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out}"
mkdir -p "$OUT"
RESULTS="$OUT/gpu_suite.jsonl"
LOG="$OUT/gpu_suite.log"
: > "$RESULTS"
: > "$LOG"
CACHE="$(mktemp -d)"
SIZES="${SIZES:-1 9 16 32 64}"  # loop sizes of step 3
REPEATS="${REPEATS:-5}"          # timed calls of step 1 (best kept); steps 3 and 4 make 3
export PYTHONUNBUFFERED=1

step() { echo "== $* ($(date -u +%FT%TZ))" | tee -a "$LOG"; }
measure() { "$@" 2>>"$LOG" | tee -a "$RESULTS"; }

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"
  python -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
  lscpu | grep -m1 "Model name"; } >> "$LOG" 2>&1

step "mega 3x3 bfloat16 end to end, cold compilation into an empty cache"
measure python benchmarks/generate.py --size mega --images 9 --dtype bfloat16 --clip --repeats "$REPEATS" \
    --cache-dir "$CACHE" "$@"
step "the same after a restart: programs from the persistent cache"
measure python benchmarks/generate.py --size mega --images 9 --dtype bfloat16 --clip --repeats 1 \
    --cache-dir "$CACHE" "$@"
step "mega per loop size: $SIZES images (sampling + decode)"
# shellcheck disable=SC2086  # SIZES is a list of numbers
measure python benchmarks/generate.py --size mega --images $SIZES --dtype bfloat16 --decode --repeats 3 \
    --cache-dir "$CACHE" "$@"
step "min-dalle 0.4.11, mega, same GPU"
if python -c "import min_dalle" 2>/dev/null; then
  measure python benchmarks/min_dalle_generate.py --size mega --grid 1 3 --dtype bfloat16 --repeats 3 "$@"
else
  echo "min_dalle is not installed: skipped" | tee -a "$LOG"
fi
step "done"
rm -rf "$CACHE"
