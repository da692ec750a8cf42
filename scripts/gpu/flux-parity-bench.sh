#!/usr/bin/env bash
# On the GPU machine (see docs/performance.md): random full-size FLUX.1-dev through diffusers and
# through our flux-bench binary, same weights and inputs, one run; prints the run's record last.
# Needs: the CUDA build of flux-bench (BENCH, default .gpu/flux-bench) and of the kernel tests
# (KERNEL_TESTS, default .gpu/gpu_kernels: docs/performance.md says how to build them), .whl/ with
# diffusers' wheel.
# Writes JSON lines and logs to $OUT (or ./gpu-out). SKIP_F32=1 skips our f32 parity step.
# Batches: ours `--batch 2` and `--batch 4` at 1024x1024 beside diffusers' num_images_per_prompt 1, 2, 4
# (full_size_reference.py; BATCHES="1 2 4" to change both sides); the step cache at STEP_CACHE (0.08)
# against the full run. SKIP_BATCHES=1 / SKIP_CACHE=1 leave them out.
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
M=/tmp/flux-rand; R=/tmp/flux-ref.safetensors
# the images-a-request counts both sides measure (full_size_reference.py reads it too)
if [ "${SKIP_BATCHES:-0}" = 1 ]; then BATCHES=""; else BATCHES=${BATCHES:-1 2 4}; fi; export BATCHES
BENCH=${BENCH:-.gpu/flux-bench}
# the fused kernels against the plain path first (engine/tests/gpu_kernels.rs): no model needed, fails fast
KERNEL_TESTS=${KERNEL_TESTS:-.gpu/gpu_kernels}
"$KERNEL_TESTS" --nocapture --test-threads=1 2>&1 | tee -a "$OUT/ours.jsonl" || { echo "kernel check failed"; exit 1; }
PYTHONUNBUFFERED=1 python3 "$HERE/full_size_reference.py" $M $R engine/tests/fixtures/tiny-flux-dev \
  > "$OUT/diffusers.json" 2> "$OUT/diffusers.log" || { tail -30 "$OUT/diffusers.log"; exit 1; }
cat "$OUT/diffusers.json"
# peak device memory of our process, sampled every 50 ms
poll() { nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 50 > "$OUT/mem-$1.txt" & echo $!; }
modes="forward generate-1024 generate-512"; [ "${SKIP_F32:-0}" = 1 ] || modes="forward forward-f32 generate-1024 generate-512"
for n in $BATCHES; do [ "$n" = 1 ] || modes="$modes generate-1024-b$n"; done
[ "${SKIP_CACHE:-0}" = 1 ] || modes="$modes cache-1024"
for mode in $modes; do
  p=$(poll $mode)
  case $mode in
    forward) $BENCH forward --model $M --inputs $R --compare-plain ;;
    forward-f32) $BENCH forward --model $M --inputs $R --f32 ;;
    generate-1024) $BENCH generate --model $M --size 1024 --steps 28 ;;
    generate-512) $BENCH generate --model $M --size 512 --steps 28 ;;
    generate-1024-b*) $BENCH generate --model $M --size 1024 --steps 28 --batch "${mode#generate-1024-b}" ;;
    cache-1024) $BENCH generate --model $M --size 1024 --steps 28 --step-cache "${STEP_CACHE:-0.08}" ;;
  esac 2>&1 | tee -a "$OUT/ours.jsonl"
  kill $p; echo "{\"what\": \"peak_mem_mib\", \"mode\": \"$mode\", \"value\": $(sort -n "$OUT/mem-$mode.txt" | tail -1)}" | tee -a "$OUT/ours.jsonl"
done
# The run's compact record: save it as bench/results/DATE-generation-runN.json, then
# `cargo run -p tools --bin bench-tables -- write` renders the docs' tables from it.
python3 "$HERE/../../bench/record.py" generation "$OUT" --command "bash scripts/gpu/flux-parity-bench.sh" | tee "$OUT/record.json"
