#!/usr/bin/env bash
# On the GPU machine (docs/performance.md): LoRA training steps at FLUX.1-dev size
# (`flux-bench train`, random bf16 weights, rank 16) with gradient checkpointing on and off, at 512x512 and
# 1024x1024, after engine/tests/gpu_training.rs (the gradients against the plain path); peak device memory
# of each process sampled by nvidia-smi every 50 ms.
# Needs the CUDA builds of flux-bench (BENCH, default .gpu/flux-bench) and of the training test
# (TRAINING_TESTS, default .gpu/gpu_training: docs/performance.md says how to build it). Writes
# summary.jsonl (one JSON line per measurement) and logs.tgz (logs and memory traces) to $OUT (or
# ./gpu-out); `python3 bench/record.py training $OUT` turns them (with peft's output saved as
# $OUT/peft.txt) into the run's record.
set -uo pipefail
FINAL=${OUT:-gpu-out}; mkdir -p "$FINAL"
OUT=$(mktemp -d)
BENCH=${BENCH:-.gpu/flux-bench}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
source "$(dirname "$0")/hog.sh"
# $1: the case's name; with CAP set (GiB), the run sees only that much memory (hog.sh) and the peak is
# its own (the hog's share subtracted).
case_() {
  local name=$1; shift
  local base=0
  if [ -n "${CAP-}" ]; then
    hog "$CAP"
    base=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)
  fi
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 50 > "$OUT/mem-$name.txt" &
  local poll=$!
  timeout 150 "$BENCH" train "$@" > "$OUT/train-$name.json" 2> "$OUT/train-$name.log"
  local rc=$?
  kill $poll; wait $poll 2>/dev/null
  [ -n "${CAP-}" ] && unhog
  # a failed run's last log line (out of memory, say) goes with its peak
  local err='""'
  [ $rc = 0 ] || err=$(tail -1 "$OUT/train-$name.log" | python3 -c 'import json, sys; print(json.dumps(sys.stdin.read().strip()[-300:]))')
  echo "{\"what\": \"peak_mem_mib\", \"case\": \"$name\", \"cap_gib\": \"${CAP-}\", \"args\": \"$*\", \"rc\": $rc, \"value\": $(( $(sort -n "$OUT/mem-$name.txt" | tail -1) - base )), \"error\": $err}" | tee -a "$OUT/summary.jsonl"
  tee -a "$OUT/summary.jsonl" < "$OUT/train-$name.json"
  [ $rc = 0 ] || tail -3 "$OUT/train-$name.log"
}
# The gradients first: no model weights needed beyond 4 blocks, fails fast.
TRAINING_TESTS=${TRAINING_TESTS:-.gpu/gpu_training}
timeout 120 "$TRAINING_TESTS" --nocapture 2>&1 | tee "$OUT/train-check.json" | tee -a "$OUT/summary.jsonl"
# A case may name the card size it runs on: cap16/1024-fp8 is 1024-fp8 beside a hog leaving 16 GiB.
for c in ${CASES:-512 512-all 1024 512-off 1024-off}; do
  CAP=""
  if [[ $c == cap*/* ]]; then CAP=${c%%/*}; CAP=${CAP#cap}; c=${c#*/}; fi
  case $c in
    512) case_ 512 --size 512 --steps 10 --rank 16 ;;
    512-all) case_ 512-all --size 512 --steps 10 --rank 16 --targets all_linear ;;
    1024) case_ 1024 --size 1024 --steps 6 --rank 16 ;;
    512-off) case_ 512-off --size 512 --steps 10 --rank 16 --no-checkpointing ;;
    1024-off) case_ 1024-off --size 1024 --steps 6 --rank 16 --no-checkpointing ;;
    # A small card's base (docs/memory.md): 512-fp8, 1024-fp8, 1024-q4_k, ... (checkpointing on);
    # STREAMED_GIB streams that much of it while training (the trainer's log says how much it streams).
    *-*) case_ "$c${CAP:+-cap$CAP}" --weights "${c#*-}" --size "${c%%-*}" --steps 6 --rank 16 --streamed-gib "${STREAMED_GIB:-0}" ;;
  esac
done
cp "$OUT/summary.jsonl" "$FINAL/"
tar czf "$FINAL/logs.tgz" -C "$OUT" .
