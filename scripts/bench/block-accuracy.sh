#!/usr/bin/env bash
# The weight formats' accuracy per block (docs/formats.md, "Accuracy per block"): FLUX.1-dev's double and
# single blocks at full width with random weights, each alone in a one-block transformer, our output in
# each format against diffusers' bf16 and f32 outputs of the same bf16 weights on the same inputs.
# Runs on the CPU (our CPU products) or on a GPU machine (the GPU's products, fp8 on FP8 tensor cores).
#
#   OUT=block-accuracy BENCH=target/release/flux-bench PYTHON=python3 bash scripts/bench/block-accuracy.sh
#   python3 bench/record.py block-accuracy block-accuracy --run N --command "..." > bench/results/DATE-block-accuracy-runN.json
#
# PYTHON needs torch and diffusers (scripts/fixtures/requirements.txt); BENCH is a flux-bench build (with
# `--features cuda` for the GPU). FORMATS (default: every format) and SIZE (the image side the inputs'
# tokens come from, 512 by default) choose what runs.
set -euo pipefail
OUT=${OUT:-block-accuracy}
BENCH=${BENCH:-target/release/flux-bench}
PYTHON=${PYTHON:-python3}
SIZE=${SIZE:-512}
FORMATS=${FORMATS:-"bf16 fp8 q8_0 q6_k q5_k q4_k q4_0"}
[ -x "$BENCH" ] || { echo "no flux-bench at $BENCH: cargo build --release -p tools --bin flux-bench" >&2; exit 1; }
mkdir -p "$OUT"
if command -v nvidia-smi >/dev/null && nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name --format=csv,noheader | head -1 > "$OUT/gpu.txt"
else
  echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores" > "$OUT/gpu.txt"
fi
"$PYTHON" scripts/bench/block_accuracy.py "$OUT" "$SIZE" | tee "$OUT/references.jsonl"
: > "$OUT/ours.jsonl"
for block in double single; do
  for format in $FORMATS; do
    "$BENCH" --weights "$format" forward --accuracy-only --model "$OUT/$block" \
      --inputs "$OUT/$block.safetensors" | tee -a "$OUT/ours.jsonl"
  done
done
