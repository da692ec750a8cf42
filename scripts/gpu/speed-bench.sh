#!/usr/bin/env bash
# On the GPU machine (docs/performance.md, "torch.compile, a wide size, and older GPUs"): ours beside
# diffusers where flux-parity-bench.sh does not reach, on the same random full-size FLUX.1-dev weights:
#  - 1024x1024, 28 steps: ours against diffusers with torch.compile (its compiling first call timed apart);
#  - WIDE (default 1360x768): ours against diffusers eager;
#  - our Ampere path (`flux-bench --ampere`): one step against diffusers' output on the same inputs, and a
#    whole 1024x1024 generation.
# Needs the CUDA build of flux-bench (BENCH, default .gpu/flux-bench) and .whl/ with diffusers' wheel;
# reuses flux-parity-bench.sh's random model when it is there. Writes labelled JSON lines to
# $OUT/speed.jsonl (OUT default ./gpu-out), which `python3 bench/record.py speed $OUT` turns into a record.
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
BENCH=${BENCH:-.gpu/flux-bench}; M=${M:-/tmp/flux-rand}; R=${R:-/tmp/flux-ref.safetensors}
WIDE=${WIDE:-1360x768}; J="$OUT/speed.jsonl"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
if [ ! -f "$M/model_index.json" ] || [ ! -f "$R" ]; then
  BATCHES="" PYTHONUNBUFFERED=1 python3 "$HERE/full_size_reference.py" $M $R engine/tests/fixtures/tiny-flux-dev \
    > "$OUT/diffusers.json" 2> "$OUT/diffusers.log" || { tail -30 "$OUT/diffusers.log"; exit 1; }
fi
tag() { sed "s/^{/{\"label\": \"$1\", /" | tee -a "$J"; }
$BENCH generate --model $M --size 1024 --steps 28 2> "$OUT/ours-1024.log" | tag ours-1024
$BENCH generate --model $M --size ${WIDE%x*} --height ${WIDE#*x} --steps 28 2> "$OUT/wide.log" | tag wide-ours
python3 "$HERE/anchors_ref.py" $M eager $WIDE 2>> "$OUT/diffusers.log" | tag wide-diffusers
$BENCH --ampere forward --model $M --inputs $R 2> "$OUT/ampere-forward.log" | tag ampere-forward
$BENCH --ampere generate --model $M --size 1024 --steps 28 2> "$OUT/ampere-generate.log" | tag ampere-generate
# last: compiling takes minutes
timeout ${COMPILE_LIMIT:-400} python3 "$HERE/anchors_ref.py" $M compile 1024 2>> "$OUT/diffusers.log" | tag compile-diffusers
