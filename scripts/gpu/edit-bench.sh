#!/usr/bin/env bash
# On the GPU machine (docs/editing.md): image-to-image and an instruction edit at 1024x1024, 28 steps, ours
# beside diffusers' FluxImg2ImgPipeline and FluxKontextPipeline on the same random full-size weights, one
# call. FLUX.1-Kontext's transformer has FLUX.1-dev's shape, so the Kontext folder is the random dev model
# with model_index.json naming FluxKontextPipeline (what tells both pipelines the mode).
# Needs the CUDA build of flux-bench (BENCH, default .gpu/flux-bench) and .whl/ with diffusers' wheel;
# reuses flux-parity-bench.sh's random model when it is there. STRENGTH (default 0.75) for image-to-image.
# Writes JSON lines to $OUT/edit.jsonl (OUT default ./gpu-out).
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
BENCH=${BENCH:-.gpu/flux-bench}; M=${M:-/tmp/flux-rand}; R=${R:-/tmp/flux-ref.safetensors}; K=/tmp/flux-kontext
S=${STRENGTH:-0.75}; J="$OUT/edit.jsonl"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
if [ ! -f "$M/model_index.json" ]; then
  BATCHES="" PYTHONUNBUFFERED=1 python3 "$HERE/full_size_reference.py" $M $R engine/tests/fixtures/tiny-flux-dev \
    > "$OUT/diffusers.json" 2> "$OUT/diffusers.log" || { tail -30 "$OUT/diffusers.log"; exit 1; }
fi
mkdir -p $K
for d in "$M"/*/; do ln -sfn "$d" "$K/$(basename "$d")"; done
python3 - "$M/model_index.json" "$K/model_index.json" <<'PY'
import json, sys
index = json.load(open(sys.argv[1]))
index["_class_name"] = "FluxKontextPipeline"
json.dump(index, open(sys.argv[2], "w"))
PY
tag() { sed "s/^{/{\"label\": \"$1\", /" | tee -a "$J"; }
$BENCH generate --model $M --size 1024 --steps 28 --edit-strength $S 2> "$OUT/img2img.log" | tag img2img-ours
$BENCH generate --model $K --size 1024 --steps 28 --edit-strength 1 2> "$OUT/kontext.log" | tag kontext-ours
python3 "$HERE/anchors_ref.py" $M img2img:$S 1024 2>> "$OUT/diffusers.log" | tag img2img-diffusers
python3 "$HERE/anchors_ref.py" $K kontext 1024 2>> "$OUT/diffusers.log" | tag kontext-diffusers
