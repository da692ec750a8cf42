#!/usr/bin/env bash
# On the GPU machine (see README "GPU"): random full-size FLUX.1-dev through diffusers and through
# our flux-bench binary, same weights and inputs, one run. Needs: .gpu/flux-bench (CUDA build),
# .whl/ with diffusers' wheel. Writes JSON lines and logs to $OUT (or ./gpu-out).
set -uo pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
M=/tmp/flux-rand; R=/tmp/flux-ref.safetensors
PYTHONUNBUFFERED=1 python3 scripts/gpu/full_size_reference.py $M $R engine/tests/fixtures/tiny-flux-dev \
  > "$OUT/diffusers.json" 2> "$OUT/diffusers.log" || { tail -30 "$OUT/diffusers.log"; exit 1; }
cat "$OUT/diffusers.json"
# peak device memory of our process, sampled every 50 ms
poll() { nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 50 > "$OUT/mem-$1.txt" & echo $!; }
for mode in forward generate-1024 generate-512; do
  p=$(poll $mode)
  case $mode in
    forward) .gpu/flux-bench forward --model $M --inputs $R ;;
    generate-1024) .gpu/flux-bench generate --model $M --size 1024 --steps 28 ;;
    generate-512) .gpu/flux-bench generate --model $M --size 512 --steps 28 ;;
  esac 2>&1 | tee -a "$OUT/ours.jsonl"
  kill $p; echo "{\"what\": \"peak_mem_mib\", \"mode\": \"$mode\", \"value\": $(sort -n "$OUT/mem-$mode.txt" | tail -1)}" | tee -a "$OUT/ours.jsonl"
done
