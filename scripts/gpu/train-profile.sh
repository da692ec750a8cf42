#!/usr/bin/env bash
# On the GPU machine: every kernel of one LoRA training step at
# FLUX.1-dev size (`flux-bench train --profile-step`, random bf16 weights, rank 16 on the attention
# projections), timed by Nsight Compute with the clocks left alone, then summed per kernel name by
# kernel-summary.py. Usage: CASES="512-off 512" bash scripts/gpu/train-profile.sh
# Needs the CUDA build of flux-bench (BENCH, default .gpu/flux-bench) and ncu on the PATH (or NCU).
# Writes, per case, kernels-CASE.csv.gz (every kernel in launch order) and summary-CASE.txt to $OUT.
# ncu's replays make this slow: several minutes for the two 512² cases (one step each).
set -uo pipefail
FINAL=${OUT:-gpu-out}; mkdir -p "$FINAL"
BENCH=${BENCH:-.gpu/flux-bench}
NCU=${NCU:-$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)}
HERE=$(dirname "$0")
for c in ${CASES:-512-off 512}; do
  case $c in
    512) args="--size 512 --steps 1" ;;
    512-off) args="--size 512 --steps 1 --no-checkpointing" ;;
    1024) args="--size 1024 --steps 1" ;;
    1024-off) args="--size 1024 --steps 1 --no-checkpointing" ;;
    *) echo "unknown case $c"; exit 2 ;;
  esac
  # shellcheck disable=SC2086
  timeout 400 "$NCU" --profile-from-start off --clock-control none --metrics gpu__time_duration.sum \
    --print-kernel-base function --csv --print-units base --log-file "$FINAL/kernels-$c.csv" \
    "$BENCH" train $args --profile-step > "$FINAL/train-$c.json" 2> "$FINAL/train-$c.log"
  echo "case $c: rc $?"
  python3 "$HERE/kernel-summary.py" "$FINAL/kernels-$c.csv" | tee "$FINAL/summary-$c.txt"
  gzip -f "$FINAL/kernels-$c.csv"
done
