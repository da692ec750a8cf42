#!/usr/bin/env bash
# On the GPU machine (docs/memory.md): FLUX.1-dev at full size (random bf16 weights) in the weight formats
# a small card needs, and on emulated card sizes, beside diffusers' configurations for the same memory.
#  1. FORMATS (default "fp8 q8_0"): per format, one transformer step against diffusers' bf16 and f32
#     outputs on the same inputs (the format's error) and a 1024x1024 28-step generation (time, peak).
#  2. CAPS (default "24 16 12 8", GiB): another process holds all free GPU memory but the cap before our
#     binary starts, so the memory plan sees the card's size; diffusers gets the same cap
#     (anchors_ref.py cap:N:HOW) in each of REF_MODES. OURS=0 leaves our side out, REF_MODES="" theirs.
# Needs the CUDA build of flux-bench (BENCH, default .gpu/flux-bench) and .whl/ with diffusers' wheel.
# Reuses the random model of flux-parity-bench.sh when it is there. Writes one JSON line per
# measurement to $OUT/small-gpu.jsonl (OUT default ./gpu-out).
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
BENCH=${BENCH:-.gpu/flux-bench}; M=${M:-/tmp/flux-rand}; R=${R:-/tmp/flux-ref.safetensors}
J="$OUT/small-gpu.jsonl"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
if [ ! -f "$M/model_index.json" ] || [ ! -f "$R" ]; then
  PYTHONUNBUFFERED=1 python3 "$HERE/full_size_reference.py" $M $R engine/tests/fixtures/tiny-flux-dev \
    > "$OUT/diffusers.json" 2> "$OUT/diffusers.log" || { tail -30 "$OUT/diffusers.log"; exit 1; }
fi
# $1: label; the rest: the command. Its JSON lines and its peak device memory (nvidia-smi every 50 ms,
# the hog's share subtracted) go to $J.
measure() {
  local label=$1; shift
  local base; base=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 50 > "$OUT/mem.txt" &
  local poll=$!
  timeout ${LIMIT:-240} "$@" 2> "$OUT/$label.log" | sed "s/^{/{\"label\": \"$label\", /" | tee -a "$J"
  local rc=${PIPESTATUS[0]}
  kill $poll; wait $poll 2>/dev/null
  # a failure's last line (our refusal's reason, say) goes with it; a run cut off by the limit says so
  # first (its last line is only the log's latest step)
  local last=""; [ "$rc" = 0 ] || last=$(tail -1 "$OUT/$label.log")
  [ "$rc" = 124 ] && last="no result within ${LIMIT:-240} s; last log line: $last"
  local err; err=$(printf '%s' "$last" | python3 -c 'import json, sys; print(json.dumps(sys.stdin.read().strip()[-300:]))')
  echo "{\"label\": \"$label\", \"what\": \"peak_mem_mib\", \"rc\": $rc, \"value\": $(( $(sort -n "$OUT/mem.txt" | tail -1) - base )), \"error\": $err}" | tee -a "$J"
  [ "$rc" = 0 ] || tail -5 "$OUT/$label.log"
}
for f in ${FORMATS-fp8 q8_0}; do
  measure "forward-$f" $BENCH --weights $f forward --model $M --inputs $R
  # FORWARD_ONLY: formats timed by their step alone (a whole generation reloads, and quantizes, again)
  [[ " ${FORWARD_ONLY-} " == *" $f "* ]] || measure "generate-1024-$f" $BENCH --weights $f generate --model $M --size 1024 --steps 28
done
source "$HERE/hog.sh"
for cap in ${CAPS-24 16 12 8}; do
  # OURS=0 / REF_MODES="": one side only, when both do not fit in one device call
  if [ "${OURS-1}" = 1 ]; then
    hog $cap
    measure "generate-1024-cap$cap" $BENCH generate --model $M --size 1024 --steps 28
    unhog
  fi
  # REF_MODES_<cap> (e.g. REF_MODES_16="group_offload") overrides REF_MODES for one card size
  modes_var="REF_MODES_$cap"
  for how in ${!modes_var-${REF_MODES-fp8_layerwise group_offload}}; do
    LIMIT=300 measure "diffusers-cap$cap-$how" python3 "$HERE/anchors_ref.py" $M cap:$cap:$how 1024
  done
done
